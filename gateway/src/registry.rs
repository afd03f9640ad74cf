//! Replicas, routing, retries, ejection and the hold-while-cold queue
//! (docs/ARCHITECTURE.md, "Serving").

use crate::config::{EndpointConfig, GatewayConfig, Routing};
use crate::metrics::Metrics;
use axum::extract::ws::{Message, WebSocket};
use edgeloom_crds::serving::{Claims, FailCode, Frame, ReplicaStatus, brief};
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
    /// To the connection's writer; bounded, so a replica that stops reading costs at
    /// most [`OUT_QUEUE`] messages, then its requests fail over.
    out: mpsc::Sender<Message>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    in_flight: AtomicU32,
    /// EWMA of the latency the gateway measured, in microseconds (0: none yet).
    ewma_micros: AtomicU64,
    ready: AtomicBool,
    draining: AtomicBool,
    failures: AtomicU32,
    ejected: AtomicBool,
    output_shape: Mutex<Vec<u32>>,
    /// Milliseconds since the gateway started when the replica last answered a ping.
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
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            // Checked under the lock that ejection clears the table under, so a request
            // is never parked on a replica that is already gone.
            if self.ejected.load(Ordering::Acquire) {
                return Err(CallError::Lost("the replica was disconnected"));
            }
            pending.insert(id, tx);
        }
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
        let bytes = Frame::request_bytes(id, shape, data);
        match self.out.try_send(Message::Binary(bytes.into())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(CallError::Lost("the replica is not reading its connection"));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(CallError::Lost("the replica's connection closed"));
            }
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

/// Messages queued to one replica's connection at most.
const OUT_QUEUE: usize = 256;
/// A request with less time than this left is not sent (it could only time out there and
/// charge an innocent replica).
const MIN_SEND: Duration = Duration::from_millis(5);

/// One endpoint: its configuration and its connected replicas.
pub struct Endpoint {
    pub cfg: EndpointConfig,
    label: String,
    replicas: RwLock<Vec<Arc<Replica>>>,
    rr: AtomicUsize,
    changed: Notify,
    queued: AtomicUsize,
    /// Replica names ejected recently, and until when they may not connect again.
    barred: Mutex<HashMap<String, Instant>>,
    /// Serialises gauge updates, so an older count never overwrites a newer one.
    gauges: Mutex<()>,
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
        let _serial = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
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
    permits: Arc<tokio::sync::Semaphore>,
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
                        barred: Mutex::new(HashMap::new()),
                        gauges: Mutex::new(()),
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
            key,
            metrics,
            endpoints,
            next_id: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            rng: AtomicU64::new(seed),
            started: Instant::now(),
            permits: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_requests as usize,
            )),
            config,
        }))
    }

    /// A permit to work on one inference request, or `None` when the gateway is at its
    /// `maxConcurrentRequests` (the caller answers 503).
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
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

    /// Checks an agent's credential: its claims and endpoint when the operator signed it
    /// for an endpoint this gateway serves, else the HTTP status and why (401: the
    /// credential; 403: the replica was ejected and is cooling down; 409: another node
    /// holds that replica's connection).
    pub fn authenticate(
        &self,
        bearer: Option<&str>,
    ) -> Result<(Claims, Arc<Endpoint>), (u16, String)> {
        let token = bearer.and_then(|h| h.strip_prefix("Bearer ")).ok_or((
            401,
            "an Authorization: Bearer <replica credential> header is required".to_string(),
        ))?;
        let claims =
            edgeloom_crds::serving::Credential::verify(token.trim(), &self.key, unix_now())
                .map_err(|e| (401, e))?;
        let ep = self
            .endpoint(&claims.namespace, &claims.endpoint)
            .ok_or_else(|| {
                (
                    401,
                    format!(
                        "this gateway serves no endpoint {}/{}",
                        claims.namespace, claims.endpoint
                    ),
                )
            })?;
        {
            let mut barred = ep.barred.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            barred.retain(|_, until| *until > now);
            if let Some(until) = barred.get(&claims.replica) {
                return Err((
                    403,
                    format!(
                        "replica {} was ejected; it may connect again in {} s",
                        claims.replica,
                        until.saturating_duration_since(now).as_secs() + 1
                    ),
                ));
            }
        }
        if let Some(holder) = ep.snapshot().into_iter().find(|r| {
            r.claims.replica == claims.replica
                && (r.claims.node != claims.node
                    || r.claims.account != claims.account
                    || r.claims.cluster != claims.cluster)
        }) {
            return Err((
                409,
                format!(
                    "replica {} is connected from node {} already",
                    claims.replica, holder.claims.node
                ),
            ));
        }
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
            if left < MIN_SEND {
                return Err(InferError::Timeout(format!(
                    "no answer within the endpoint's {} ms timeout{}",
                    ep.cfg.timeout_millis,
                    if last_error.is_empty() {
                        String::new()
                    } else {
                        format!(" ({last_error})")
                    }
                )));
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let sent = Instant::now();
            let who = &replica.claims.replica;
            // What went wrong, and whether it counts towards ejecting the replica.
            let (failure, charge) = match replica.call(id, &shape, &data, left).await {
                Ok(Frame::Reply {
                    shape: out_shape,
                    data: out,
                    ..
                }) => {
                    // Decoding checked that the values match the shape; the shape must be
                    // the request's rows of the endpoint's output rows.
                    let fits = out_shape.len() == ep.cfg.output_shape.len() + 1
                        && out_shape[0] == shape[0]
                        && out_shape[1..] == ep.cfg.output_shape[..];
                    if fits {
                        replica.record_latency(sent.elapsed().as_micros() as u64);
                        replica.failures.store(0, Ordering::Relaxed);
                        return Ok(Output {
                            shape: out_shape,
                            data: out,
                            replica: who.clone(),
                        });
                    }
                    (
                        format!(
                            "replica {who} answered shape {out_shape:?} for input shape {shape:?}"
                        ),
                        true,
                    )
                }
                // The gateway checked the request against the endpoint already: a replica
                // refusing it is misconfigured or lying, and the request goes elsewhere.
                Ok(Frame::Failed {
                    code: FailCode::BadRequest,
                    message,
                    ..
                }) => (
                    format!("replica {who} refused the request: {}", brief(&message)),
                    true,
                ),
                // The model failed on this input: likely on every replica (a poisoned input
                // must not eject honest replicas), but worth one retry (out of memory).
                Ok(Frame::Failed {
                    code: FailCode::Model,
                    message,
                    ..
                }) => (
                    format!("the model failed on replica {who}: {}", brief(&message)),
                    false,
                ),
                // Unavailable or lost: honest when the replica said it is not ready first.
                Ok(Frame::Failed { message, .. }) => (
                    format!("replica {who} is unavailable: {}", brief(&message)),
                    replica.ready.load(Ordering::Acquire),
                ),
                Ok(other) => (
                    format!("replica {who} answered with a {} frame", kind(&other)),
                    true,
                ),
                Err(CallError::Lost(why)) => (
                    format!("replica {who}: {why}"),
                    replica.ready.load(Ordering::Acquire),
                ),
                Err(CallError::Timeout) => {
                    self.failed(ep, &replica, true);
                    return Err(InferError::Timeout(format!(
                        "no answer within the endpoint's {} ms timeout (last replica tried: {who})",
                        ep.cfg.timeout_millis
                    )));
                }
            };
            self.failed(ep, &replica, charge);
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

    /// Counts a failure against a replica (when `charge`); ejects it after
    /// `ejectAfterFailures` in a row.
    fn failed(&self, ep: &Endpoint, replica: &Arc<Replica>, charge: bool) {
        if !charge {
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
        let gauge = self.metrics.queued.with_label_values(&[ep.label.as_str()]);
        gauge.inc();
        struct Leave<'a>(&'a Endpoint, prometheus::IntGauge);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.queued.fetch_sub(1, Ordering::AcqRel);
                self.1.dec();
            }
        }
        let _leave = Leave(ep, gauge);
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
    /// over (their callers retry elsewhere). After failures or missed heartbeats its name
    /// may not connect again for `ejectCooldownMillis`, so a reconnect does not wipe its
    /// record.
    pub fn eject(&self, ep: &Endpoint, replica: &Arc<Replica>, reason: &str) {
        if replica.ejected.swap(true, Ordering::AcqRel) {
            return;
        }
        if matches!(reason, "failures" | "heartbeat") {
            ep.barred.lock().unwrap_or_else(|p| p.into_inner()).insert(
                replica.claims.replica.clone(),
                Instant::now() + Duration::from_millis(self.config.eject_cooldown_millis),
            );
        }
        tracing::warn!(endpoint = %ep.label, replica = %replica.claims.replica, node = %replica.claims.node, reason, "ejecting replica");
        self.metrics
            .ejections
            .with_label_values(&[ep.label.as_str(), reason])
            .inc();
        self.remove(ep, replica);
        let _ = replica.out.try_send(Message::Close(None));
    }

    fn remove(&self, ep: &Endpoint, replica: &Arc<Replica>) {
        ep.replicas
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| r.conn != replica.conn);
        // Dropping the senders fails the requests still waiting on this replica (`call`
        // checks `ejected` under this lock, so none is added after).
        replica.ejected.store(true, Ordering::Release);
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
        let (out, mut out_rx) = mpsc::channel::<Message>(OUT_QUEUE);
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
        // The same replica connecting again (a restarted agent, a new connection after a
        // network blip) replaces its old connection; the same replica name from another
        // node, account or cluster does not (`authenticate` refused it with 409; checked
        // again here under the lock).
        let old: Result<Vec<Arc<Replica>>, ()> = {
            let mut reps = ep.replicas.write().unwrap_or_else(|p| p.into_inner());
            let same = |r: &Arc<Replica>| r.claims.replica == replica.claims.replica;
            if reps.iter().any(|r| {
                same(r)
                    && (r.claims.node != replica.claims.node
                        || r.claims.account != replica.claims.account
                        || r.claims.cluster != replica.claims.cluster)
            }) {
                Err(())
            } else {
                let old = reps.iter().filter(|r| same(r)).cloned().collect();
                reps.retain(|r| !same(r));
                reps.push(replica.clone());
                Ok(old)
            }
        };
        let Ok(old) = old else {
            let _ = sink.send(Message::Close(None)).await;
            return;
        };
        for o in old {
            o.ejected.store(true, Ordering::Release);
            o.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
            let _ = o.out.try_send(Message::Close(None));
        }
        ep.update_gauges(&self.metrics);
        tracing::info!(endpoint = %ep.label, replica = %replica.claims.replica, node = %replica.claims.node, cluster = %replica.claims.cluster, "replica connected");

        // A replica that stops reading blocks this writer; after 10 s of a blocked send the
        // connection is given up (and the queue in front of it is bounded).
        let mut writer = tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                let close = matches!(m, Message::Close(_));
                match tokio::time::timeout(Duration::from_secs(10), sink.send(m)).await {
                    Ok(Ok(())) if !close => {}
                    _ => break,
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        });
        let heartbeat = Duration::from_millis(self.config.heartbeat_millis);
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut writer_done = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if replica.ejected.load(Ordering::Acquire) {
                        break;
                    }
                    // Only pongs count as signs of life: a replica that talks but never
                    // reads (and so never answers) is as dead as a silent one.
                    let silent = self.now_millis().saturating_sub(replica.last_seen.load(Ordering::Relaxed));
                    if silent > 3 * self.config.heartbeat_millis {
                        self.eject(&ep, &replica, "heartbeat");
                        break;
                    }
                    if replica.claims.expires <= unix_now() {
                        self.eject(&ep, &replica, "expired");
                        break;
                    }
                    let _ = replica.out.try_send(Message::Ping(Vec::new().into()));
                }
                _ = &mut writer => {
                    writer_done = true;
                    break;
                }
                msg = stream.next() => {
                    let Some(Ok(msg)) = msg else { break };
                    match msg {
                        Message::Binary(b) => self.on_frame(&ep, &replica, &b),
                        Message::Pong(_) => replica.last_seen.store(self.now_millis(), Ordering::Relaxed),
                        Message::Close(_) => break,
                        _ => {}
                    }
                }
            }
        }
        if !replica.ejected.load(Ordering::Acquire) {
            tracing::info!(endpoint = %ep.label, replica = %replica.claims.replica, "replica disconnected");
        }
        self.remove(&ep, &replica);
        let _ = replica.out.try_send(Message::Close(None));
        // (A completed JoinHandle must not be polled again.)
        if !writer_done
            && tokio::time::timeout(Duration::from_secs(2), &mut writer)
                .await
                .is_err()
        {
            writer.abort();
        }
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
                // A model that answers rows of another shape than the endpoint's is not
                // ready, whatever the replica says.
                let fits = output_shape == ep.cfg.output_shape;
                if ready && !fits {
                    tracing::warn!(replica = %replica.claims.replica, ?output_shape, want = ?ep.cfg.output_shape, "replica's model answers another output shape; not routing to it");
                }
                let ready = ready && fits;
                let was_ready = replica.ready.swap(ready, Ordering::AcqRel);
                let was_draining = replica.draining.swap(draining, Ordering::AcqRel);
                *replica
                    .output_shape
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = output_shape;
                // Only a change wakes the held requests (a status flood costs no more).
                if (was_ready, was_draining) != (ready, draining) {
                    ep.update_gauges(&self.metrics);
                    ep.changed.notify_waiters();
                }
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

fn kind(f: &Frame) -> &'static str {
    match f {
        Frame::Request { .. } => "request",
        Frame::Reply { .. } => "reply",
        Frame::Failed { .. } => "failure",
        Frame::Status(_) => "status",
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
            "verifyingKey: {}\nendpoints:\n- namespace: ml\n  name: d\n  inputShape: [2]\n  outputShape: [1]\n  timeoutMillis: 5000\n",
            hex::encode(key.to_bytes())
        ))
        .unwrap();
        cfg.endpoints[0].routing = routing;
        Gateway::new(cfg, Metrics::new().unwrap()).unwrap()
    }

    fn replica(gw: &Gateway, name: &str, region: &str) -> (Arc<Replica>, mpsc::Receiver<Message>) {
        let (out, rx) = mpsc::channel(OUT_QUEUE);
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
