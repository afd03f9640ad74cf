//! Replicas, routing, retries, ejection and the hold-while-cold queue
//! (docs/ARCHITECTURE.md, "Serving").

use crate::config::{EndpointConfig, GatewayConfig, Routing};
use crate::metrics::Metrics;
use axum::extract::ws::{Message, WebSocket};
use edgeloom_crds::serving::{Claims, FailCode, Frame, ReplicaStatus};
use futures::{SinkExt, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};

/// Why a request failed at the gateway; each maps to one HTTP status.
#[derive(Debug, PartialEq)]
pub enum InferError {
    /// 400: the request does not fit the endpoint.
    BadRequest(String),
    /// 404: no such endpoint.
    NotFound(String),
    /// 503: no replica became ready in time, or the hold queue is full.
    Unavailable(String),
    /// 502: the replicas tried all failed.
    Upstream(String),
    /// 504: the request's time ran out on a replica.
    Timeout(String),
}

impl InferError {
    pub fn status(&self) -> u16 {
        match self {
            InferError::BadRequest(_) => 400,
            InferError::NotFound(_) => 404,
            InferError::Unavailable(_) => 503,
            InferError::Upstream(_) => 502,
            InferError::Timeout(_) => 504,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            InferError::BadRequest(m)
            | InferError::NotFound(m)
            | InferError::Unavailable(m)
            | InferError::Upstream(m)
            | InferError::Timeout(m) => m,
        }
    }
}

/// A model's answer: `shape[0]` rows.
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
    /// The replica that answered.
    pub replica: String,
}

/// One connected replica (one agent's WebSocket).
pub struct Replica {
    conn: u64,
    /// Who it is, from the signed credential.
    pub claims: Claims,
    out: mpsc::UnboundedSender<Message>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    in_flight: AtomicU32,
    /// EWMA of the latency the gateway measured, in microseconds (0: none yet).
    ewma_micros: AtomicU64,
    ready: AtomicBool,
    draining: AtomicBool,
    failures: AtomicU32,
    ejected: AtomicBool,
    output_shape: Mutex<Vec<u32>>,
    /// Milliseconds since the gateway started when the replica was last heard from.
    last_seen: AtomicU64,
}

impl Replica {
    fn usable(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && !self.draining.load(Ordering::Acquire)
            && !self.ejected.load(Ordering::Acquire)
    }

    fn cost(&self, unknown: u64) -> u64 {
        let ewma = match self.ewma_micros.load(Ordering::Relaxed) {
            0 => unknown,
            e => e,
        };
        (u64::from(self.in_flight.load(Ordering::Relaxed)) + 1) * ewma.max(1)
    }

    fn record_latency(&self, micros: u64) {
        let old = self.ewma_micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            micros
        } else {
            (old * 4 + micros) / 5
        };
        self.ewma_micros.store(new.max(1), Ordering::Relaxed);
    }

    /// Sends one request and waits for its answer.
    async fn call(
        &self,
        id: u64,
        shape: &[u32],
        data: &[f32],
        timeout: Duration,
    ) -> Result<Frame, CallError> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        struct Done<'a>(&'a Replica, u64);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&self.1);
                self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _done = Done(self, id);
        let frame = Frame::Request {
            id,
            shape: shape.to_vec(),
            data: data.to_vec(),
        };
        if self
            .out
            .send(Message::Binary(frame.encode().into()))
            .is_err()
        {
            return Err(CallError::Lost("the replica's connection closed"));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(frame)) => Ok(frame),
            // The sender was dropped: the replica disconnected or was ejected.
            Ok(Err(_)) => Err(CallError::Lost("the replica's connection closed")),
            Err(_) => Err(CallError::Timeout),
        }
    }
}

enum CallError {
    Lost(&'static str),
    Timeout,
}

/// One endpoint: its configuration and its connected replicas.
pub struct Endpoint {
    pub cfg: EndpointConfig,
    label: String,
    replicas: RwLock<Vec<Arc<Replica>>>,
    rr: AtomicUsize,
    changed: Notify,
    queued: AtomicUsize,
}

impl Endpoint {
    fn snapshot(&self) -> Vec<Arc<Replica>> {
        self.replicas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Picks a replica by the endpoint's policy, never `exclude`.
    fn pick(&self, region: Option<&str>, exclude: &[u64], seed: u64) -> Option<Arc<Replica>> {
        let all: Vec<Arc<Replica>> = self
            .snapshot()
            .into_iter()
            .filter(|r| r.usable() && !exclude.contains(&r.conn))
            .collect();
        if all.is_empty() {
            return None;
        }
        match self.cfg.routing {
            Routing::RoundRobin => {
                let i = self.rr.fetch_add(1, Ordering::Relaxed) % all.len();
                Some(all[i].clone())
            }
            Routing::LeastLoaded => {
                let local: Vec<&Arc<Replica>> = match region {
                    Some(g) if !g.is_empty() => {
                        all.iter().filter(|r| r.claims.region == g).collect()
                    }
                    _ => Vec::new(),
                };
                let pool: Vec<&Arc<Replica>> = if local.is_empty() {
                    all.iter().collect()
                } else {
                    local
                };
                // A replica not measured yet costs as much as the fastest one measured, so
                // a new replica gets traffic without being flooded.
                let unknown = pool
                    .iter()
                    .map(|r| r.ewma_micros.load(Ordering::Relaxed))
                    .filter(|e| *e > 0)
                    .min()
                    .unwrap_or(1_000);
                let n = pool.len();
                let a = (seed % n as u64) as usize;
                if n == 1 {
                    return Some(pool[0].clone());
                }
                let b = (a + 1 + ((seed >> 32) % (n as u64 - 1)) as usize) % n;
                let (ra, rb) = (pool[a], pool[b]);
                Some(if rb.cost(unknown) < ra.cost(unknown) {
                    rb.clone()
                } else {
                    ra.clone()
                })
            }
        }
    }

    fn update_gauges(&self, metrics: &Metrics) {
        let reps = self.snapshot();
        let count = |f: &dyn Fn(&Replica) -> bool| reps.iter().filter(|r| f(r)).count() as i64;
        metrics
            .replicas
            .with_label_values(&[self.label.as_str(), "ready"])
            .set(count(&|r| r.usable()));
        metrics
            .replicas
            .with_label_values(&[self.label.as_str(), "draining"])
            .set(count(&|r| r.draining.load(Ordering::Acquire)));
        metrics
            .replicas
            .with_label_values(&[self.label.as_str(), "unready"])
            .set(count(&|r| {
                !r.ready.load(Ordering::Acquire) && !r.draining.load(Ordering::Acquire)
            }));
    }
}

/// A replica as `/v2/models/{model}` and the tests see it.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaView {
    pub replica: String,
    pub node: String,
    pub cluster: String,
    pub region: String,
    pub ready: bool,
    pub draining: bool,
    pub in_flight: u32,
    pub ewma_micros: u64,
}

/// The gateway: endpoints and their replicas.
pub struct Gateway {
    pub config: GatewayConfig,
    key: ed25519_dalek::VerifyingKey,
    pub metrics: Metrics,
    endpoints: BTreeMap<(String, String), Arc<Endpoint>>,
    next_id: AtomicU64,
    next_conn: AtomicU64,
    rng: AtomicU64,
    started: Instant,
}

impl Gateway {
    pub fn new(config: GatewayConfig, metrics: Metrics) -> Result<Arc<Gateway>, String> {
        config.validate()?;
        let key = config.key()?;
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                (
                    (e.namespace.clone(), e.name.clone()),
                    Arc::new(Endpoint {
                        cfg: e.clone(),
                        label: format!("{}/{}", e.namespace, e.name),
                        replicas: RwLock::new(Vec::new()),
                        rr: AtomicUsize::new(0),
                        changed: Notify::new(),
                        queued: AtomicUsize::new(0),
                    }),
                )
            })
            .collect();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Ok(Arc::new(Gateway {
            config,
            key,
            metrics,
            endpoints,
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            rng: AtomicU64::new(seed),
            started: Instant::now(),
        }))
    }

    fn now_millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A 64-bit random number (splitmix64 over a shared counter; routing needs spread, not
    /// secrecy).
    fn random(&self) -> u64 {
        let mut z = self
            .rng
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The endpoint a v2 model name (`<name>.<namespace>`) stands for.
    pub fn endpoint_by_model(&self, model: &str) -> Option<Arc<Endpoint>> {
        let (name, namespace) = model.split_once('.')?;
        self.endpoint(namespace, name)
    }

    pub fn endpoint(&self, namespace: &str, name: &str) -> Option<Arc<Endpoint>> {
        self.endpoints
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The replicas of an endpoint, for status and tests.
    pub fn replicas(&self, ep: &Endpoint) -> Vec<ReplicaView> {
        ep.snapshot()
            .iter()
            .map(|r| ReplicaView {
                replica: r.claims.replica.clone(),
                node: r.claims.node.clone(),
                cluster: r.claims.cluster.clone(),
                region: r.claims.region.clone(),
                ready: r.ready.load(Ordering::Acquire),
                draining: r.draining.load(Ordering::Acquire),
                in_flight: r.in_flight.load(Ordering::Relaxed),
                ewma_micros: r.ewma_micros.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Whether an endpoint has a replica that takes requests.
    pub fn ready(&self, ep: &Endpoint) -> bool {
        ep.snapshot().iter().any(|r| r.usable())
    }

    /// Checks an agent's credential: `Ok` with its claims when the operator signed it for
    /// an endpoint this gateway serves.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<(Claims, Arc<Endpoint>), String> {
        let token = bearer
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or("an Authorization: Bearer <replica credential> header is required")?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let claims = edgeloom_crds::serving::Credential::verify(token.trim(), &self.key, now)?;
        let ep = self
            .endpoint(&claims.namespace, &claims.endpoint)
            .ok_or_else(|| {
                format!(
                    "this gateway serves no endpoint {}/{}",
                    claims.namespace, claims.endpoint
                )
            })?;
        Ok((claims, ep))
    }

    /// Runs one request: validates it, picks a replica, retries once elsewhere on failure,
    /// and holds it while no replica is ready (up to the queue limit and the timeout).
    pub async fn infer(
        &self,
        ep: &Endpoint,
        shape: Vec<u32>,
        data: Vec<f32>,
        region: Option<&str>,
    ) -> Result<Output, InferError> {
        let started = Instant::now();
        let result = self.infer_inner(ep, shape, data, region, started).await;
        let code = match &result {
            Ok(_) => 200,
            Err(e) => e.status(),
        };
        self.metrics
            .requests
            .with_label_values(&[ep.label.as_str(), &code.to_string()])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[ep.label.as_str()])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn infer_inner(
        &self,
        ep: &Endpoint,
        shape: Vec<u32>,
        data: Vec<f32>,
        region: Option<&str>,
        started: Instant,
    ) -> Result<Output, InferError> {
        check_shape(&ep.cfg, &shape, data.len())?;
        let deadline = started + Duration::from_millis(ep.cfg.timeout_millis);
        let mut tried: Vec<u64> = Vec::new();
        let mut last_error = String::new();
        loop {
            // A retry goes to another replica when there is one; otherwise it waits for
            // any (the one tried may be restarting its runner).
            let replica = match ep.pick(region, &tried, self.random()) {
                Some(r) => r,
                None => self
                    .wait_for_replica(ep, region, deadline)
                    .await
                    .map_err(|e| match e {
                        InferError::Unavailable(m) if !tried.is_empty() => {
                            InferError::Upstream(format!("{last_error}; then {m}"))
                        }
                        e => e,
                    })?,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let failure = match replica.call(id, &shape, &data, left).await {
                Ok(Frame::Reply {
                    shape: out_shape,
                    data: out,
                    ..
                }) => {
                    let rows_ok = out_shape.first() == shape.first()
                        && out_shape
                            .iter()
                            .try_fold(1usize, |n, d| n.checked_mul(*d as usize))
                            == Some(out.len());
                    if rows_ok {
                        replica.record_latency(sent.elapsed().as_micros() as u64);
                        replica.failures.store(0, Ordering::Relaxed);
                        return Ok(Output {
                            shape: out_shape,
                            data: out,
                            replica: replica.claims.replica.clone(),
                        });
                    }
                    format!(
                        "replica {} answered shape {out_shape:?} for input shape {shape:?}",
                        replica.claims.replica
                    )
                }
                Ok(Frame::Failed {
                    code: FailCode::BadRequest,
                    message,
                    ..
                }) => return Err(InferError::BadRequest(message)),
                Ok(Frame::Failed { code, message, .. }) => {
                    format!(
                        "replica {} failed ({code:?}): {message}",
                        replica.claims.replica
                    )
                }
                Ok(other) => format!(
                    "replica {} answered with a {other:?} frame",
                    replica.claims.replica
                ),
                Err(CallError::Lost(why)) => format!("replica {}: {why}", replica.claims.replica),
                Err(CallError::Timeout) => {
                    self.failed(ep, &replica);
                    return Err(InferError::Timeout(format!(
                        "no answer within the endpoint's {} ms timeout (last replica tried: {})",
                        ep.cfg.timeout_millis, replica.claims.replica
                    )));
                }
            };
            self.failed(ep, &replica);
            last_error = failure;
            tried.push(replica.conn);
            if tried.len() > ep.cfg.retries as usize || Instant::now() >= deadline {
                return Err(InferError::Upstream(last_error));
            }
            self.metrics
                .retries
                .with_label_values(&[ep.label.as_str()])
                .inc();
        }
    }

    /// Counts a request answered without the model's help (a 400 found by the gateway).
    pub fn count(&self, ep: &Endpoint, code: u16) {
        self.metrics
            .requests
            .with_label_values(&[ep.label.as_str(), &code.to_string()])
            .inc();
    }

    /// Counts a failure against a replica; ejects it after too many in a row. A replica
    /// that has said it is not ready (its runner is restarting) is not counted: it failed
    /// what it held honestly, and it gets no new requests until it is ready again.
    fn failed(&self, ep: &Endpoint, replica: &Arc<Replica>) {
        if !replica.ready.load(Ordering::Acquire) {
            return;
        }
        let n = replica.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.config.eject_after_failures {
            self.eject(ep, replica, "failures");
        }
    }

    /// Holds a request until a replica is usable (scale from zero, a restarting runner).
    async fn wait_for_replica(
        &self,
        ep: &Endpoint,
        region: Option<&str>,
        deadline: Instant,
    ) -> Result<Arc<Replica>, InferError> {
        let queued = ep.queued.fetch_add(1, Ordering::AcqRel) + 1;
        struct Leave<'a>(&'a Endpoint, &'a Metrics);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let n = self.0.queued.fetch_sub(1, Ordering::AcqRel) - 1;
                self.1
                    .queued
                    .with_label_values(&[self.0.label.as_str()])
                    .set(n as i64);
            }
        }
        let _leave = Leave(ep, &self.metrics);
        self.metrics
            .queued
            .with_label_values(&[ep.label.as_str()])
            .set(queued as i64);
        if queued > ep.cfg.queue_limit as usize {
            return Err(InferError::Unavailable(format!(
                "no replica of {} is ready and its hold queue is full ({} requests)",
                ep.label, ep.cfg.queue_limit
            )));
        }
        loop {
            let notified = ep.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = ep.pick(region, &[], self.random()) {
                return Ok(r);
            }
            if tokio::time::timeout_at(deadline.into(), notified)
                .await
                .is_err()
            {
                return Err(InferError::Unavailable(format!(
                    "no replica of {} became ready within its {} ms timeout",
                    ep.label, ep.cfg.timeout_millis
                )));
            }
        }
    }

    /// Takes a replica out of rotation and closes its connection; its pending requests fail
    /// over (their callers retry elsewhere).
    pub fn eject(&self, ep: &Endpoint, replica: &Arc<Replica>, reason: &str) {
        if replica.ejected.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(endpoint = %ep.label, replica = %replica.claims.replica, node = %replica.claims.node, reason, "ejecting replica");
        self.metrics
            .ejections
            .with_label_values(&[ep.label.as_str(), reason])
            .inc();
        self.remove(ep, replica);
        let _ = replica.out.send(Message::Close(None));
    }

    fn remove(&self, ep: &Endpoint, replica: &Arc<Replica>) {
        ep.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| r.conn != replica.conn);
        // Dropping the senders fails the requests still waiting on this replica.
        replica
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        ep.update_gauges(&self.metrics);
        ep.changed.notify_waiters();
    }

    /// Serves one agent's WebSocket until it closes or is ejected.
    pub async fn run_replica(self: Arc<Self>, ws: WebSocket, claims: Claims, ep: Arc<Endpoint>) {
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let replica = Arc::new(Replica {
            conn: self.next_conn.fetch_add(1, Ordering::Relaxed),
            claims,
            out,
            pending: Mutex::new(HashMap::new()),
            in_flight: AtomicU32::new(0),
            ewma_micros: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            output_shape: Mutex::new(Vec::new()),
            last_seen: AtomicU64::new(self.now_millis()),
        });
        // A replica that connects again (a restarted agent) replaces its old connection.
        let old: Vec<Arc<Replica>> = {
            let mut reps = ep.replicas.write().unwrap_or_else(|p| p.into_inner());
            let old = reps
                .iter()
                .filter(|r| r.claims.replica == replica.claims.replica)
                .cloned()
                .collect();
            reps.retain(|r| r.claims.replica != replica.claims.replica);
            reps.push(replica.clone());
            old
        };
        for o in old {
            o.ejected.store(true, Ordering::Release);
            o.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let _ = o.out.send(Message::Close(None));
        }
        ep.update_gauges(&self.metrics);
        tracing::info!(endpoint = %ep.label, replica = %replica.claims.replica, node = %replica.claims.node, cluster = %replica.claims.cluster, "replica connected");

        let writer = tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let close = matches!(m, Message::Close(_));
                if sink.send(m).await.is_err() || close {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let heartbeat = Duration::from_millis(self.config.heartbeat_millis);
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if replica.ejected.load(Ordering::Acquire) {
                        break;
                    }
                    let silent = self.now_millis().saturating_sub(replica.last_seen.load(Ordering::Relaxed));
                    if silent > 3 * self.config.heartbeat_millis {
                        self.eject(&ep, &replica, "heartbeat");
                        break;
                    }
                    let _ = replica.out.send(Message::Ping(Vec::new().into()));
                }
                msg = stream.next() => {
                    let Some(Ok(msg)) = msg else { break };
                    replica.last_seen.store(self.now_millis(), Ordering::Relaxed);
                    match msg {
                        Message::Binary(b) => self.on_frame(&ep, &replica, &b),
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
            }
        }
        if !replica.ejected.swap(true, Ordering::AcqRel) {
            tracing::info!(endpoint = %ep.label, replica = %replica.claims.replica, "replica disconnected");
            self.remove(&ep, &replica);
        }
        let _ = replica.out.send(Message::Close(None));
        let _ = writer.await;
    }

    fn on_frame(&self, ep: &Endpoint, replica: &Arc<Replica>, bytes: &[u8]) {
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(replica = %replica.claims.replica, error = %e, "undecodable frame from replica");
                self.metrics
                    .unsolicited
                    .with_label_values(&[ep.label.as_str()])
                    .inc();
                return;
            }
        };
        match frame {
            Frame::Status(ReplicaStatus {
                ready,
                draining,
                output_shape,
                ..
            }) => {
                replica.ready.store(ready, Ordering::Release);
                replica.draining.store(draining, Ordering::Release);
                *replica
                    .output_shape
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = output_shape;
                ep.update_gauges(&self.metrics);
                ep.changed.notify_waiters();
            }
            Frame::Reply { id, .. } | Frame::Failed { id, .. } => {
                // Only a request sent to this very replica can be answered by it.
                let waiter = replica
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                match waiter {
                    Some(w) => {
                        let _ = w.send(frame);
                    }
                    None => {
                        self.metrics
                            .unsolicited
                            .with_label_values(&[ep.label.as_str()])
                            .inc();
                    }
                }
            }
            Frame::Request { .. } => {
                self.metrics
                    .unsolicited
                    .with_label_values(&[ep.label.as_str()])
                    .inc();
            }
        }
    }
}

/// Checks a request's shape against the endpoint before any replica sees it.
pub fn check_shape(cfg: &EndpointConfig, shape: &[u32], values: usize) -> Result<(), InferError> {
    let want = || {
        let dims: Vec<String> = cfg.input_shape.iter().map(|d| d.to_string()).collect();
        format!("[N, {}]", dims.join(", "))
    };
    if shape.len() != cfg.input_shape.len() + 1 || shape[1..] != cfg.input_shape[..] {
        return Err(InferError::BadRequest(format!(
            "shape {shape:?} does not fit the model's input {} (N rows)",
            want()
        )));
    }
    if shape[0] == 0 || shape[0] > cfg.max_rows {
        return Err(InferError::BadRequest(format!(
            "shape {shape:?}: a request holds 1 to {} rows",
            cfg.max_rows
        )));
    }
    let n: usize = shape.iter().map(|d| *d as usize).product();
    if n != values {
        return Err(InferError::BadRequest(format!(
            "data holds {values} values, shape {shape:?} needs {n}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Cases a real network cannot aim at: a replica answering a request that is pending on
    //! another replica at that very moment, and the routing policies' choices.
    use super::*;
    use crate::config::GatewayConfig;

    fn gateway(routing: Routing) -> Arc<Gateway> {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let mut cfg = GatewayConfig::from_yaml(&format!(
            "verifyingKey: {}\nendpoints:\n- namespace: ml\n  name: d\n  inputShape: [2]\n  timeoutMillis: 5000\n",
            hex::encode(key.to_bytes())
        ))
        .unwrap();
        cfg.endpoints[0].routing = routing;
        Gateway::new(cfg, Metrics::new().unwrap()).unwrap()
    }

    fn replica(
        gw: &Gateway,
        name: &str,
        region: &str,
    ) -> (Arc<Replica>, mpsc::UnboundedReceiver<Message>) {
        let (out, rx) = mpsc::unbounded_channel();
        let r = Arc::new(Replica {
            conn: gw.next_conn.fetch_add(1, Ordering::Relaxed),
            claims: Claims {
                namespace: "ml".into(),
                endpoint: "d".into(),
                replica: name.into(),
                node: name.into(),
                cluster: "c".into(),
                region: region.into(),
                account: name.into(),
                expires: u64::MAX,
            },
            out,
            pending: Mutex::new(HashMap::new()),
            in_flight: AtomicU32::new(0),
            ewma_micros: AtomicU64::new(0),
            ready: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            ejected: AtomicBool::new(false),
            output_shape: Mutex::new(vec![1]),
            last_seen: AtomicU64::new(0),
        });
        gw.endpoint("ml", "d")
            .unwrap()
            .replicas
            .write()
            .unwrap()
            .push(r.clone());
        (r, rx)
    }

    fn request_id(m: Message) -> u64 {
        match m {
            Message::Binary(b) => Frame::decode(&b).unwrap().id().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_replica_cannot_answer_a_request_pending_on_another() {
        let gw = gateway(Routing::RoundRobin);
        let ep = gw.endpoint("ml", "d").unwrap();
        let (a, mut a_rx) = replica(&gw, "a", "");
        let (b, _b_rx) = replica(&gw, "b", "");
        let mut call = {
            let (gw, ep) = (gw.clone(), ep.clone());
            tokio::spawn(async move { gw.infer(&ep, vec![1, 2], vec![1.0, 2.0], None).await })
        };
        // Round robin sends the first request to `a`.
        let id = request_id(a_rx.recv().await.unwrap());
        let forged = Frame::Reply {
            id,
            shape: vec![1, 1],
            data: vec![666.0],
        };
        gw.on_frame(&ep, &b, &forged.encode());
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut call)
                .await
                .is_err(),
            "b's forged answer must not resolve a's request"
        );
        assert_eq!(gw.metrics.unsolicited.with_label_values(&["ml/d"]).get(), 1);
        let honest = Frame::Reply {
            id,
            shape: vec![1, 1],
            data: vec![3.0],
        };
        gw.on_frame(&ep, &a, &honest.encode());
        let out = call.await.unwrap().unwrap();
        assert_eq!((out.data, out.replica), (vec![3.0], "a".to_string()));
    }

    #[tokio::test]
    async fn least_loaded_prefers_the_callers_region_then_the_lighter_replica() {
        let gw = gateway(Routing::LeastLoaded);
        let ep = gw.endpoint("ml", "d").unwrap();
        let (eu, _e) = replica(&gw, "eu", "eu");
        let (us_fast, _f) = replica(&gw, "us-fast", "us");
        let (us_slow, _s) = replica(&gw, "us-slow", "us");
        us_fast.ewma_micros.store(1_000, Ordering::Relaxed);
        us_slow.ewma_micros.store(5_000, Ordering::Relaxed);
        eu.ewma_micros.store(50_000, Ordering::Relaxed);
        for seed in 0..64u64 {
            let s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            // The caller in eu gets the eu replica, however slow.
            assert_eq!(ep.pick(Some("eu"), &[], s).unwrap().claims.replica, "eu");
            // Among the two in us, the faster always wins the two choices.
            assert_eq!(
                ep.pick(Some("us"), &[], s).unwrap().claims.replica,
                "us-fast"
            );
        }
        // Load counts: the fast replica with 9 requests in flight costs 10 ms > 5 ms.
        us_fast.in_flight.store(9, Ordering::Relaxed);
        assert_eq!(
            ep.pick(Some("us"), &[], 3).unwrap().claims.replica,
            "us-slow"
        );
        // A replica that is draining, not ready or excluded is never picked.
        us_slow.draining.store(true, Ordering::Relaxed);
        eu.ready.store(false, Ordering::Relaxed);
        for seed in 0..16 {
            assert_eq!(ep.pick(None, &[], seed).unwrap().claims.replica, "us-fast");
        }
        assert!(ep.pick(None, &[us_fast.conn], 0).is_none());
    }

    #[tokio::test]
    async fn round_robin_takes_each_ready_replica_in_turn() {
        let gw = gateway(Routing::RoundRobin);
        let ep = gw.endpoint("ml", "d").unwrap();
        let _r: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| replica(&gw, n, ""))
            .collect();
        let picks: Vec<String> = (0..6)
            .map(|s| ep.pick(None, &[], s).unwrap().claims.replica.clone())
            .collect();
        assert_eq!(picks, ["a", "b", "c", "a", "b", "c"]);
    }
}
