//! The fleet: one connection per member cluster of every EdgePool, each with reflectors of
//! its agent Nodes (metadata only), heartbeat Leases and ComputeTasks, and a probe that
//! measures reachability and API latency. The pool controller adds, updates and removes
//! members; the job controller and the scheduler read them.

use crate::cache::{self, Cache, NodeEntry, TaskEntry};
use edgeloom_crds::ComputeJob;
use edgeloom_crds::compute_task::ComputeTask;
use edgeloom_crds::edge_pool::{EdgePoolSpec, MemberCluster};
use edgeloom_crds::inventory::{AGENT_LABEL, SYSTEM_NAMESPACE};
use futures::channel::mpsc;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, ObjectMeta, PartialObjectMeta, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Why a member cluster cannot be connected.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The kubeconfig does not parse or names no usable cluster.
    #[error("kubeconfig is invalid: {0}")]
    Kubeconfig(String),
    /// A client could not be built from it.
    #[error("cannot build a client: {0}")]
    Client(String),
}

impl ConnectError {
    /// Bounded category for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            ConnectError::Kubeconfig(_) => "kubeconfig",
            ConnectError::Client(_) => "client",
        }
    }
}

/// Reachability of a member cluster, updated by its probe.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The last probe succeeded.
    pub reachable: bool,
    /// When a probe last succeeded.
    pub last_seen: Option<Timestamp>,
    /// Since when probes fail (None while reachable).
    pub unreachable_since: Option<Timestamp>,
    /// Round-trip time of the last successful probe.
    pub latency: Option<Duration>,
    /// The last probe's error.
    pub error: Option<String>,
    /// Per cache ("nodes", "leases", "tasks"): since when its watch fails, and how.
    pub watch_errors: BTreeMap<&'static str, (Timestamp, String)>,
}

/// How long a member may answer its probe without its caches listing (or with a watch
/// failing) before it counts as not syncing: its jobs are placed elsewhere, and its pool
/// says why (docs/ARCHITECTURE.md, "Failure model").
pub const SYNC_GRACE: SignedDuration = SignedDuration::from_secs(15);

/// One member cluster of one pool.
pub struct Member {
    /// "pool/cluster".
    pub key: String,
    /// Pool name.
    pub pool: String,
    /// The member's entry in the pool spec.
    pub spec: MemberCluster,
    /// The pool's spec (heartbeat timeout, slots per node, node selector).
    pub pool_spec: RwLock<Arc<EdgePoolSpec>>,
    /// Client for the member's API server.
    pub client: kube::Client,
    /// Agent nodes: labels and inventory.
    pub nodes: Arc<Cache<NodeEntry>>,
    /// Heartbeat Leases in the system namespace: last renewal per node, as seen.
    pub leases: Arc<Cache<cache::Heartbeat>>,
    /// ComputeTasks in the system namespace.
    pub tasks: Arc<Cache<TaskEntry>>,
    /// Reachability, written by the probe and the sync watcher.
    pub health: Arc<RwLock<Health>>,
    /// Unique per connection (a reconnected member is another), so that what the
    /// scheduler derived from an old connection's caches is never taken for the new one's.
    pub id: u64,
    /// When this connection was made.
    pub connected_at: Timestamp,
    fingerprint: u64,
    workers: Vec<JoinHandle<()>>,
}

impl Drop for Member {
    fn drop(&mut self) {
        for w in &self.workers {
            w.abort();
        }
    }
}

/// A member's task cache: its usage shape drives the scheduler's usage rebuild, and it is
/// indexed by job UID.
fn tasks_cache() -> Cache<TaskEntry> {
    Cache::default()
        .with_shape(TaskEntry::usage_shape)
        .with_index(|t| &t.job_uid)
}

/// The next [`Member::id`].
static NEXT_MEMBER_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Member {
    /// A member with empty caches and no watchers or probe, for benchmarks and tests that
    /// fill its caches themselves ([`Cache::upsert`]); reachable, with `latency`.
    pub fn detached(
        pool: &str,
        pool_spec: Arc<EdgePoolSpec>,
        spec: MemberCluster,
        client: kube::Client,
        latency: Duration,
    ) -> Member {
        Member {
            key: format!("{pool}/{}", spec.name),
            pool: pool.to_string(),
            spec,
            pool_spec: RwLock::new(pool_spec),
            client,
            nodes: Arc::default(),
            leases: Arc::default(),
            tasks: Arc::new(tasks_cache()),
            health: Arc::new(RwLock::new(Health {
                reachable: true,
                last_seen: Some(Timestamp::now()),
                latency: Some(latency),
                ..Health::default()
            })),
            id: NEXT_MEMBER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connected_at: Timestamp::now(),
            fingerprint: 0,
            workers: Vec::new(),
        }
    }

    /// The ComputeTask API in the member's system namespace.
    pub fn tasks_api(&self) -> Api<ComputeTask> {
        Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE)
    }

    /// The Node, Lease and ComputeTask caches have all completed their first list and the
    /// probe has answered once; until then nothing is decided from them (a cold cache
    /// looks like lost nodes, and a member not yet probed like an unreachable one, so a
    /// job placed then would avoid it).
    pub fn synced(&self) -> bool {
        let probed = self
            .health
            .read()
            .map(|h| h.last_seen.is_some() || h.unreachable_since.is_some())
            .unwrap_or(false);
        self.nodes.ready() && self.leases.ready() && self.tasks.ready() && probed
    }

    /// A snapshot of its health.
    pub fn health(&self) -> Health {
        self.health.read().map(|h| h.clone()).unwrap_or_default()
    }

    /// The pool's spec as last seen.
    pub fn pool_spec(&self) -> Arc<EdgePoolSpec> {
        self.pool_spec
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The pool's heartbeat timeout.
    pub fn timeout(&self) -> SignedDuration {
        SignedDuration::from_secs(self.pool_spec().heartbeat_timeout_seconds as i64)
    }

    /// Unreachable, or answering but not watchable, for longer than the pool's heartbeat
    /// timeout: its tasks count as lost.
    pub fn lost(&self, now: Timestamp) -> bool {
        let h = self.health();
        let cutoff = now - self.timeout();
        h.unreachable_since.is_some_and(|since| since < cutoff)
            || self
                .not_syncing_since(&h)
                .is_some_and(|since| since < cutoff)
    }

    /// Why the member answers but cannot be used (its caches never listed, or a watch keeps
    /// failing) for longer than [`SYNC_GRACE`]: nothing is placed there and no job waits
    /// for it.
    pub fn sync_problem(&self, now: Timestamp) -> Option<String> {
        let h = self.health();
        let since = self.not_syncing_since(&h)?;
        if now <= since + SYNC_GRACE {
            return None;
        }
        let failing: Vec<String> = h
            .watch_errors
            .iter()
            .map(|(what, (_, error))| format!("watching {what}: {error}"))
            .collect();
        Some(if failing.is_empty() {
            format!(
                "answers but its caches did not list within {}s",
                SYNC_GRACE.as_secs()
            )
        } else {
            failing.join("; ")
        })
    }

    /// Since when the member, while it answers, cannot be watched: the first watch error
    /// still standing, or its connection if its caches never listed.
    fn not_syncing_since(&self, h: &Health) -> Option<Timestamp> {
        if !h.reachable {
            return None;
        }
        let listed = self.nodes.ready() && self.leases.ready() && self.tasks.ready();
        h.watch_errors
            .values()
            .map(|(since, _)| *since)
            .min()
            .or_else(|| (!listed).then_some(self.connected_at))
    }

    /// The node's heartbeat is fresh (its Lease was renewed within the timeout).
    pub fn node_ready(&self, node: &str, now: Timestamp) -> bool {
        let cutoff = self.heartbeat_cutoff(now);
        self.leases
            .get(node)
            .and_then(|beat| beat.seen)
            .is_some_and(|seen| seen >= cutoff)
    }

    /// A heartbeat renewed at or after this is fresh at `now` (one subtraction, for
    /// callers that judge many nodes at once).
    pub fn heartbeat_cutoff(&self, now: Timestamp) -> Timestamp {
        now - self.timeout()
    }
}

/// Every member cluster of every pool.
pub struct Fleet {
    members: RwLock<BTreeMap<String, Arc<Member>>>,
    /// Pools whose clusters this process has tried to connect, all of them, at least
    /// once, with when it first did: before that, a pool's members are only partly known
    /// (they are connected one after another) and none of its jobs may be judged.
    connected: RwLock<BTreeMap<String, Timestamp>>,
    job_trigger: mpsc::UnboundedSender<ObjectRef<ComputeJob>>,
}

/// A stable fingerprint of what a member connection depends on.
pub fn fingerprint(spec: &MemberCluster, kubeconfig: Option<&str>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    spec.name.hash(&mut h);
    spec.local.hash(&mut h);
    kubeconfig.hash(&mut h);
    h.finish()
}

impl Fleet {
    /// An empty fleet; task changes are sent to `job_trigger` as the owning job's reference.
    pub fn new(job_trigger: mpsc::UnboundedSender<ObjectRef<ComputeJob>>) -> Fleet {
        Fleet {
            members: RwLock::new(BTreeMap::new()),
            connected: RwLock::new(BTreeMap::new()),
            job_trigger,
        }
    }

    /// Records that every cluster of `pool` was tried (connected, or found unusable) at
    /// `now`; the first time counts.
    pub fn pool_connected(&self, pool: &str, now: Timestamp) {
        if let Ok(mut c) = self.connected.write() {
            c.entry(pool.to_string()).or_insert(now);
        }
    }

    /// When every cluster of `pool` was first tried by this process (None: not yet).
    pub fn pool_connected_at(&self, pool: &str) -> Option<Timestamp> {
        self.connected.read().ok()?.get(pool).copied()
    }

    /// All members, by key.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.members
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds a member built by [`Member::detached`] (benchmarks and tests).
    pub fn insert_for_tests(&self, member: Arc<Member>) {
        self.pool_connected(&member.pool, Timestamp::UNIX_EPOCH);
        if let Ok(mut m) = self.members.write() {
            m.insert(member.key.clone(), member);
        }
    }

    /// The members of one pool.
    pub fn pool_members(&self, pool: &str) -> Vec<Arc<Member>> {
        self.members()
            .into_iter()
            .filter(|m| m.pool == pool)
            .collect()
    }

    /// Removes members of `pool` whose cluster is not in `keep`, and all members of pools
    /// not in `pools` when given.
    pub fn retain(&self, pool: &str, keep: &[String]) {
        if let Ok(mut m) = self.members.write() {
            m.retain(|_, member| member.pool != pool || keep.contains(&member.spec.name));
        }
    }

    /// Removes every member of a deleted pool.
    pub fn remove_pool(&self, pool: &str) {
        self.retain(pool, &[]);
        if let Ok(mut c) = self.connected.write() {
            c.remove(pool);
        }
    }

    /// Connects (or keeps) the member `spec` of `pool`. `hub` serves `local: true` members;
    /// `kubeconfig` is the Secret's text for remote ones. A member whose credentials did not
    /// change keeps its connection and caches.
    pub async fn ensure(
        &self,
        pool: &str,
        pool_spec: Arc<EdgePoolSpec>,
        spec: &MemberCluster,
        hub: &kube::Client,
        kubeconfig: Option<&str>,
    ) -> Result<Arc<Member>, ConnectError> {
        let key = format!("{pool}/{}", spec.name);
        let fp = fingerprint(spec, kubeconfig);
        if let Some(existing) = self.members.read().ok().and_then(|m| m.get(&key).cloned())
            && existing.fingerprint == fp
        {
            if let Ok(mut s) = existing.pool_spec.write() {
                *s = pool_spec;
            }
            return Ok(existing);
        }
        let client = if spec.local {
            hub.clone()
        } else {
            client_from_kubeconfig(kubeconfig.unwrap_or_default()).await?
        };
        let member = Arc::new(self.connect(key.clone(), pool, pool_spec, spec.clone(), client, fp));
        if let Ok(mut m) = self.members.write() {
            m.insert(key, member.clone());
        }
        Ok(member)
    }

    fn connect(
        &self,
        key: String,
        pool: &str,
        pool_spec: Arc<EdgePoolSpec>,
        spec: MemberCluster,
        client: kube::Client,
        fingerprint: u64,
    ) -> Member {
        let health = Arc::new(RwLock::new(Health::default()));
        let mut workers = Vec::new();

        // Only agent nodes, and only their metadata.
        let nodes: Arc<Cache<NodeEntry>> = Arc::default();
        let node_api: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
        let node_cfg = watcher::Config::default().labels(&format!("{AGENT_LABEL}=true"));
        let stream = watcher(node_api, node_cfg).default_backoff();
        workers.push(tokio::spawn(cache::feed(
            stream,
            nodes.clone(),
            cache::node,
            |_| {},
            watching(&health, &key, "nodes"),
            key.clone(),
            "nodes",
        )));

        let leases: Arc<Cache<cache::Heartbeat>> = Arc::default();
        let lease_api: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        let stream = watcher(lease_api, watcher::Config::default()).default_backoff();
        workers.push(tokio::spawn(cache::feed(
            stream,
            leases.clone(),
            cache::lease(leases.clone()),
            |_| {},
            watching(&health, &key, "leases"),
            key.clone(),
            "leases",
        )));

        let tasks: Arc<Cache<TaskEntry>> = Arc::new(tasks_cache());
        let task_api: Api<ComputeTask> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        let stream = watcher(task_api, watcher::Config::default()).default_backoff();
        let trigger = self.job_trigger.clone();
        let touched = move |t: &TaskEntry| {
            let _ = trigger.unbounded_send(ObjectRef::new(&t.job_name).within(&t.job_namespace));
        };
        workers.push(tokio::spawn(cache::feed(
            stream,
            tasks.clone(),
            cache::task,
            touched,
            watching(&health, &key, "tasks"),
            key.clone(),
            "tasks",
        )));

        workers.push(tokio::spawn(probe(
            client.clone(),
            health.clone(),
            key.clone(),
        )));

        Member {
            key,
            pool: pool.to_string(),
            spec,
            pool_spec: RwLock::new(pool_spec),
            client,
            nodes,
            leases,
            tasks,
            health,
            id: NEXT_MEMBER_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            connected_at: Timestamp::now(),
            fingerprint,
            workers,
        }
    }
}

/// Records a cache's watch outcomes in the member's health (`what` failing since its
/// first error, until an event arrives again).
fn watching(
    health: &Arc<RwLock<Health>>,
    member: &str,
    what: &'static str,
) -> impl Fn(Option<String>) + use<> {
    let health = health.clone();
    let member = member.to_string();
    move |error: Option<String>| {
        let Ok(mut h) = health.write() else {
            return;
        };
        match error {
            None => {
                if h.watch_errors.remove(what).is_some() {
                    tracing::info!(%member, what, "member cluster watch recovered");
                }
            }
            Some(e) => {
                if !h.watch_errors.contains_key(what) {
                    tracing::warn!(%member, what, error = %e, "member cluster watch failing");
                }
                let since = h.watch_errors.get(what).map(|(s, _)| *s);
                h.watch_errors
                    .insert(what, (since.unwrap_or_else(Timestamp::now), e));
            }
        }
    }
}

/// Probes the member every 2 s (2 s timeout): reachability and latency. On the first
/// success it makes sure the system namespace exists.
async fn probe(client: kube::Client, health: Arc<RwLock<Health>>, member: String) {
    let mut namespace_ready = false;
    loop {
        let start = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(2), client.apiserver_version()).await;
        let now = Timestamp::now();
        let ok = matches!(result, Ok(Ok(_)));
        if let Ok(mut h) = health.write() {
            let was = h.reachable;
            h.reachable = ok;
            if ok {
                h.last_seen = Some(now);
                h.unreachable_since = None;
                h.latency = Some(start.elapsed());
                h.error = None;
            } else {
                h.unreachable_since.get_or_insert(now);
                h.error = Some(match result {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer within 2s".into(),
                });
            }
            if was != ok {
                tracing::info!(%member, reachable = ok, "member cluster reachability changed");
            }
        }
        if ok && !namespace_ready {
            namespace_ready = ensure_namespace(&client).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

async fn ensure_namespace(client: &kube::Client) -> bool {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(SYSTEM_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 409 => true,
        Err(e) => {
            tracing::debug!(error = %e, "cannot create the system namespace yet");
            false
        }
    }
}

/// A client from a kubeconfig's text (its current context).
pub async fn client_from_kubeconfig(text: &str) -> Result<kube::Client, ConnectError> {
    let kc = kube::config::Kubeconfig::from_yaml(text)
        .map_err(|e| ConnectError::Kubeconfig(e.to_string()))?;
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kc, &options)
        .await
        .map_err(|e| ConnectError::Kubeconfig(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| ConnectError::Client(e.to_string()))
}
