//! Compact caches of member-cluster objects. The operator keeps, per member, only what it
//! reads: a node's labels and inventory, a Lease's renew time, and a task's placement and
//! status. Fed by the same watchers as kube-runtime's reflector (relists included), but a
//! Kubernetes object costs several KiB in memory (every `ObjectMeta` and label map), and
//! at 10,000 nodes and tasks that is what dominated the operator's footprint.

use edgeloom_crds::compute_task::{ComputeTask, ComputeTaskStatus};
use edgeloom_crds::inventory::NodeInventory;
use futures::{Stream, StreamExt};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::PartialObjectMeta;
use kube::runtime::watcher;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A name-keyed cache of projections of one kind.
pub struct Cache<V> {
    inner: RwLock<Inner<V>>,
    ready: AtomicBool,
    /// Bumped whenever an entry is added, changed or removed (not when a watch event
    /// repeats what is cached): the scheduler rebuilds what it derives from a cache only
    /// when this moved (docs/ARCHITECTURE.md, "Scheduling").
    generation: AtomicU64,
    /// What of an entry some reader derives from (see [`Cache::with_shape`]).
    shape: Option<fn(&V) -> u64>,
    /// Bumped when an entry is added or removed, or its shape changed.
    shape_generation: AtomicU64,
    /// A secondary key of each entry (e.g. a task's job UID), see [`Cache::by_key`].
    index: Option<fn(&V) -> &str>,
}

struct Inner<V> {
    map: HashMap<Box<str>, Arc<V>>,
    /// Names by secondary key (only with an index).
    by_key: HashMap<Box<str>, HashSet<Box<str>>>,
}

impl<V> Inner<V> {
    fn insert(&mut self, index: Option<fn(&V) -> &str>, name: Box<str>, value: Arc<V>) {
        if let Some(key) = index {
            let stale = self
                .map
                .get(&name)
                .map(|old| Box::<str>::from(key(old)))
                .filter(|old_key| **old_key != *key(&value));
            if let Some(old_key) = stale {
                self.unindex(&old_key, &name);
            }
            self.by_key
                .entry(key(&value).into())
                .or_default()
                .insert(name.clone());
        }
        self.map.insert(name, value);
    }

    fn remove(&mut self, index: Option<fn(&V) -> &str>, name: &str) -> Option<Arc<V>> {
        let old = self.map.remove(name)?;
        if let Some(key) = index {
            self.unindex(key(&old), name);
        }
        Some(old)
    }

    fn unindex(&mut self, key: &str, name: &str) {
        if let Some(names) = self.by_key.get_mut(key) {
            names.remove(name);
            if names.is_empty() {
                self.by_key.remove(key);
            }
        }
    }

    fn replace(&mut self, index: Option<fn(&V) -> &str>, map: HashMap<Box<str>, Arc<V>>) {
        self.by_key.clear();
        if let Some(key) = index {
            for (name, v) in &map {
                self.by_key
                    .entry(key(v).into())
                    .or_default()
                    .insert(name.clone());
            }
        }
        self.map = map;
        self.map.shrink_to_fit();
    }
}

impl<V> Default for Cache<V> {
    fn default() -> Self {
        Cache {
            inner: RwLock::new(Inner {
                map: HashMap::new(),
                by_key: HashMap::new(),
            }),
            ready: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            shape: None,
            shape_generation: AtomicU64::new(0),
            index: None,
        }
    }
}

impl<V> Cache<V> {
    fn read_inner<R>(&self, f: impl FnOnce(&Inner<V>) -> R) -> R {
        match self.inner.read() {
            Ok(i) => f(&i),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// The entry for `name`.
    pub fn get(&self, name: &str) -> Option<Arc<V>> {
        self.read_inner(|i| i.map.get(name).cloned())
    }

    /// Every entry.
    pub fn state(&self) -> Vec<Arc<V>> {
        self.read_inner(|i| i.map.values().cloned().collect())
    }

    /// The entries whose secondary key is `key` (see [`Cache::with_index`]); none in a
    /// cache without an index.
    pub fn by_key(&self, key: &str) -> Vec<Arc<V>> {
        self.read_inner(|i| {
            i.by_key
                .get(key)
                .into_iter()
                .flatten()
                .filter_map(|name| i.map.get(name).cloned())
                .collect()
        })
    }

    /// Calls `f` with the whole map under one read lock (no copy of the entries).
    pub fn read<R>(&self, f: impl FnOnce(&HashMap<Box<str>, Arc<V>>) -> R) -> R {
        self.read_inner(|i| f(&i.map))
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.read_inner(|i| i.map.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first full list has been applied.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// A cache whose [`Cache::shape_generation`] moves only when `shape` of an entry
    /// changes (or entries come and go): e.g. a task's node, resources and whether it
    /// runs, not its progress.
    pub fn with_shape(mut self, shape: fn(&V) -> u64) -> Self {
        self.shape = Some(shape);
        self
    }

    /// A cache that also finds entries by a secondary key ([`Cache::by_key`]), e.g. a
    /// task's job UID: a job's reconcile then reads its own tasks, not every task of the
    /// member (docs/ARCHITECTURE.md, "Scheduling").
    pub fn with_index(mut self, index: fn(&V) -> &str) -> Self {
        self.index = Some(index);
        self
    }

    /// Changes so far (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Changes of shape so far (every change, without a shape function).
    pub fn shape_generation(&self) -> u64 {
        self.shape_generation.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.shape_generation.fetch_add(1, Ordering::AcqRel);
    }

    /// `old` was replaced by `new` (equal ones are no change).
    fn changed(&self, old: Option<&V>, new: &V) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let same_shape = match (self.shape, old) {
            (Some(shape), Some(old)) => shape(old) == shape(new),
            _ => false,
        };
        if !same_shape {
            self.shape_generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl<V: PartialEq> Cache<V> {
    /// Sets `name` to `value` unless it already is (as a watch event does).
    pub fn upsert(&self, name: &str, value: V) {
        self.upsert_then(name, value, |_| {});
    }

    /// [`Cache::upsert`], then calls `after` with the value, once the cache holds it (so
    /// that whoever `after` wakes reads the new value).
    fn upsert_then(&self, name: &str, value: V, after: impl FnOnce(&V)) {
        let value = Arc::new(value);
        if let Ok(mut inner) = self.inner.write()
            && inner.map.get(name).is_none_or(|old| **old != *value)
        {
            self.changed(inner.map.get(name).map(|o| &**o), &value);
            inner.insert(self.index, name.into(), value.clone());
        }
        after(&value);
    }

    /// Removes `name` (as a watch event does).
    pub fn remove(&self, name: &str) {
        if let Ok(mut inner) = self.inner.write()
            && inner.remove(self.index, name).is_some()
        {
            self.bump();
        }
    }

    /// Replaces every entry (a relist) and marks the cache as listed.
    fn replace_all(&self, map: HashMap<Box<str>, Arc<V>>) {
        if let Ok(mut inner) = self.inner.write() {
            inner.replace(self.index, map);
        }
        self.mark_ready();
    }

    /// Marks the cache as listed (for benchmarks and tests, with [`Cache::upsert`]).
    pub fn mark_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.bump();
    }
}

/// Applies a watcher's events to `cache` through `project` (name and value, or `None` to
/// skip an object), calling `touched` with each applied or deleted object's value, and
/// `watching` with each event's outcome: `None` when it arrived, the error when the watch
/// failed (a missing CRD, missing RBAC: a member that answers but cannot be watched).
pub async fn feed<K, V: PartialEq, S>(
    stream: S,
    cache: Arc<Cache<V>>,
    project: impl Fn(&K) -> Option<(String, V)>,
    touched: impl Fn(&V),
    watching: impl Fn(Option<String>),
    member: String,
    what: &'static str,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    futures::pin_mut!(stream);
    let mut buffer: Option<HashMap<Box<str>, Arc<V>>> = None;
    while let Some(event) = stream.next().await {
        // `Init` comes before the list that may fail; anything else proves a list or watch.
        match &event {
            Err(e) => watching(Some(e.to_string())),
            Ok(watcher::Event::Init) => {}
            Ok(_) => watching(None),
        }
        match event {
            Ok(watcher::Event::Init) => buffer = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(obj)) => {
                if let (Some(buf), Some((name, v))) = (buffer.as_mut(), project(&obj)) {
                    buf.insert(name.into_boxed_str(), Arc::new(v));
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(buf) = buffer.take() {
                    let listed: Vec<Arc<V>> = buf.values().cloned().collect();
                    cache.replace_all(buf);
                    for v in &listed {
                        touched(v);
                    }
                }
            }
            // The cache changes before `touched` wakes anyone, so a reconcile it triggers
            // never reads the state from before the event.
            Ok(watcher::Event::Apply(obj)) => {
                if let Some((name, v)) = project(&obj) {
                    cache.upsert_then(&name, v, &touched);
                }
            }
            Ok(watcher::Event::Delete(obj)) => {
                if let Some((name, v)) = project(&obj) {
                    cache.remove(&name);
                    touched(&v);
                }
            }
            Err(e) => tracing::debug!(%member, what, error = %e, "watch error"),
        }
    }
}

/// What the operator knows of an agent node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeEntry {
    /// Node name.
    pub name: Box<str>,
    /// Its labels, sorted by key (for node selectors and required labels).
    pub labels: Box<[(Box<str>, Box<str>)]>,
    /// Its published offer.
    pub inventory: NodeInventory,
}

impl NodeEntry {
    /// Labels as a map (for selector matching).
    pub fn label_map(&self) -> BTreeMap<String, String> {
        self.labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// Projects a node's metadata.
pub fn node(meta: &PartialObjectMeta<Node>) -> Option<(String, NodeEntry)> {
    let name = meta.metadata.name.clone()?;
    let labels = meta.metadata.labels.clone().unwrap_or_default();
    let annotations = meta.metadata.annotations.clone().unwrap_or_default();
    let inventory = NodeInventory::parse(&labels, &annotations);
    let labels = labels
        .into_iter()
        .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
        .collect();
    Some((
        name.clone(),
        NodeEntry {
            name: name.into_boxed_str(),
            labels,
            inventory,
        },
    ))
}

/// A node's heartbeat as the operator judges it (docs/ARCHITECTURE.md, "Failure model").
/// The Lease's renew time is the agent's claim, by the agent's clock; what counts is when
/// the operator saw it move, by its own clock. A node whose clock runs ahead cannot stay
/// ready by writing a time in the future once, and a node that stops renewing is lost one
/// timeout after the operator last saw a renewal, whatever time it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// The renew (or acquire) time the agent wrote.
    pub claimed: Option<Timestamp>,
    /// When the operator saw that value appear. On first sight of a Lease (a restart or a
    /// relist of one it did not know) it is the claim, but never later than now.
    pub seen: Option<Timestamp>,
}

impl Heartbeat {
    /// A renewal claimed and seen at `t` (tests and benchmarks).
    pub fn at(t: Timestamp) -> Heartbeat {
        Heartbeat {
            claimed: Some(t),
            seen: Some(t),
        }
    }

    /// The heartbeat after a Lease claiming `claimed` is seen at `now`, given what was
    /// cached for it before.
    pub fn observe(
        previous: Option<&Heartbeat>,
        claimed: Option<Timestamp>,
        now: Timestamp,
    ) -> Heartbeat {
        let seen = match previous {
            Some(p) if p.claimed == claimed => p.seen,
            Some(_) => claimed.map(|_| now),
            None => claimed.map(|c| c.min(now)),
        };
        Heartbeat { claimed, seen }
    }
}

/// Projects heartbeat Leases for `cache` (which it reads, to keep when each renewal was
/// first seen).
pub fn lease(cache: Arc<Cache<Heartbeat>>) -> impl Fn(&Lease) -> Option<(String, Heartbeat)> {
    move |l: &Lease| {
        let spec = l.spec.as_ref();
        let claimed = spec
            .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
            .map(|t| t.0);
        let name = l.metadata.name.clone()?;
        let previous = cache.get(&name);
        let beat = Heartbeat::observe(previous.as_deref(), claimed, Timestamp::now());
        Some((name, beat))
    }
}

/// What the operator knows of a ComputeTask.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEntry {
    /// Object name.
    pub name: Box<str>,
    /// Job namespace.
    pub job_namespace: Box<str>,
    /// Job name.
    pub job_name: Box<str>,
    /// Job UID.
    pub job_uid: Box<str>,
    /// The EdgePool it was placed through.
    pub pool: Box<str>,
    /// Shard index.
    pub shard: u32,
    /// Replica index.
    pub replica: u32,
    /// Attempt number.
    pub attempt: u32,
    /// Bound node.
    pub node: Box<str>,
    /// CPU requested, millicores.
    pub cpu_millis: u64,
    /// Memory requested, MiB.
    pub memory_mib: u64,
    /// GPUs requested.
    pub gpus: u32,
    /// The agent's status, if any.
    pub status: Option<Box<ComputeTaskStatus>>,
    /// The commit–reveal nonce of its spec (verified jobs).
    pub nonce: Option<Box<str>>,
    /// When the operator asked for its sealed result.
    pub reveal_requested_at: Option<jiff::Timestamp>,
    /// When the operator created it (its own clock, an annotation it set at creation).
    pub dispatched_at: Option<jiff::Timestamp>,
}

impl TaskEntry {
    /// What the scheduler derives from a task (node, resources, whether it holds them,
    /// how it ended), for [`Cache::with_shape`]: progress reports do not change it.
    pub fn usage_shape(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            &self.node,
            self.cpu_millis,
            self.memory_mib,
            self.gpus,
            self.busy(),
            self.status.as_ref().and_then(|s| s.phase),
        )
            .hash(&mut h);
        h.finish()
    }

    /// Whether the task is finished (and so holds no capacity).
    pub fn terminal(&self) -> bool {
        use edgeloom_crds::TaskPhase;
        matches!(
            self.status.as_ref().and_then(|s| s.phase),
            Some(TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::Cancelled)
        )
    }

    /// Whether the task may still use its node: not finished and not merely waiting to
    /// reveal a sealed result (its runner has exited).
    pub fn busy(&self) -> bool {
        use edgeloom_crds::TaskPhase;
        !self.terminal() && self.status.as_ref().and_then(|s| s.phase) != Some(TaskPhase::Committed)
    }
}

/// Characters of an agent's message the operator keeps (and shows in a job's status).
pub const MESSAGE_CHARS: usize = 256;
/// Metrics of one task the operator keeps.
pub const METRICS_KEPT: usize = 16;

/// What the operator keeps of an agent's status is bounded whatever the agent writes
/// (docs/ARCHITECTURE.md, "Who may write what"): its message cut to [`MESSAGE_CHARS`], at
/// most [`METRICS_KEPT`] metrics; a result's summary and a plain result vector are not
/// kept (a verified result carries them in its sealed reveal, opened when decided; an
/// unverified one needs neither).
pub fn bound_status(s: &mut ComputeTaskStatus) {
    s.result_summary.clear();
    s.result_vector.clear();
    if let Some(m) = s.message.as_mut()
        && let Some((cut, _)) = m.char_indices().nth(MESSAGE_CHARS)
    {
        m.truncate(cut);
    }
    if s.metrics.len() > METRICS_KEPT {
        s.metrics = std::mem::take(&mut s.metrics)
            .into_iter()
            .take(METRICS_KEPT)
            .collect();
    }
}

/// Projects a ComputeTask.
pub fn task(t: &ComputeTask) -> Option<(String, TaskEntry)> {
    let name = t.metadata.name.clone()?;
    let spec = &t.spec;
    Some((
        name.clone(),
        TaskEntry {
            name: name.into_boxed_str(),
            job_namespace: spec.job.namespace.clone().into_boxed_str(),
            job_name: spec.job.name.clone().into_boxed_str(),
            job_uid: spec.job.uid.clone().into_boxed_str(),
            pool: spec.pool.clone().into_boxed_str(),
            shard: spec.shard,
            replica: spec.replica,
            attempt: spec.attempt,
            node: spec.node_name.clone().into_boxed_str(),
            cpu_millis: crate::quantity::millicores(spec.limits.cpu.as_ref()),
            memory_mib: crate::quantity::mebibytes(spec.limits.memory.as_ref()),
            gpus: spec.limits.gpus,
            status: t.status.clone().map(|mut s| {
                // An aggregation's verdicts (one per update it was given) are kept.
                let verdicts = spec
                    .federated
                    .as_ref()
                    .is_some_and(|f| {
                        f.step == edgeloom_crds::federated::FederatedStepKind::Aggregate
                    })
                    .then(|| {
                        s.result_vector
                            .iter()
                            .take(1000)
                            .copied()
                            .collect::<Vec<f64>>()
                    });
                bound_status(&mut s);
                if let Some(v) = verdicts {
                    s.result_vector = v;
                }
                Box::new(s)
            }),
            nonce: spec.nonce.clone().map(String::into_boxed_str),
            // A value that is not a time is asked again (with a time).
            reveal_requested_at: t
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(edgeloom_crds::commitment::REVEAL_ANNOTATION))
                .and_then(|v| v.parse().ok()),
            dispatched_at: t
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(edgeloom_crds::compute_task::DISPATCHED_AT_ANNOTATION))
                .and_then(|v| v.parse().ok()),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream;

    /// Feeds `events` of Leases into `cache`, as a member's watcher would.
    async fn feed_leases(
        cache: &Arc<Cache<Heartbeat>>,
        events: Vec<Result<watcher::Event<Lease>, watcher::Error>>,
    ) {
        feed(
            stream::iter(events),
            cache.clone(),
            lease(cache.clone()),
            |_| {},
            |_| {},
            "m".into(),
            "leases",
        )
        .await;
    }

    #[tokio::test]
    async fn relists_replace_and_events_update() {
        let cache: Arc<Cache<Heartbeat>> = Arc::default();
        let mk = |name: &str| {
            serde_json::from_value::<Lease>(
                serde_json::json!({"metadata": {"name": name}, "spec": {}}),
            )
            .expect("lease")
        };
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(mk("a"))),
            Ok(watcher::Event::InitApply(mk("b"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(mk("a"))),
            Ok(watcher::Event::Apply(mk("c"))),
            // A relist replaces everything.
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(mk("d"))),
            Ok(watcher::Event::InitDone),
        ];
        feed_leases(&cache, events).await;
        assert!(cache.ready());
        assert_eq!(cache.len(), 1);
        assert!(cache.get("d").is_some());
    }

    /// The secondary index follows every change: a new entry, one moved to another key,
    /// one removed, and a relist that replaces everything.
    #[test]
    fn the_index_follows_inserts_moves_removals_and_relists() {
        let cache: Cache<(String, u32)> = Cache::default().with_index(|v| v.0.as_str());
        let keys = |k: &str| {
            let mut v: Vec<u32> = cache.by_key(k).iter().map(|e| e.1).collect();
            v.sort_unstable();
            v
        };
        cache.upsert("a", ("job-1".into(), 1));
        cache.upsert("b", ("job-1".into(), 2));
        cache.upsert("c", ("job-2".into(), 3));
        assert_eq!((keys("job-1"), keys("job-2")), (vec![1, 2], vec![3]));
        cache.upsert("b", ("job-2".into(), 2));
        assert_eq!((keys("job-1"), keys("job-2")), (vec![1], vec![2, 3]));
        cache.remove("a");
        assert!(keys("job-1").is_empty());
        cache.replace_all(HashMap::from([(
            "z".into(),
            Arc::new(("job-3".to_string(), 9)),
        )]));
        assert_eq!((keys("job-2"), keys("job-3")), (vec![], vec![9]));
        assert!(cache.by_key("nothing").is_empty());
    }

    /// The generation moves only when what is cached changes, so the scheduler rebuilds
    /// nothing for a watch event that repeats it (a resync, or an unprojected field).
    #[tokio::test]
    async fn the_generation_moves_only_when_an_entry_changes() {
        let cache: Arc<Cache<Heartbeat>> = Arc::default();
        let mk = |name: &str, t: Option<&str>| {
            serde_json::from_value::<Lease>(serde_json::json!({
                "metadata": {"name": name}, "spec": {"renewTime": t}
            }))
            .expect("lease")
        };
        let t1 = Some("2026-01-01T00:00:00.000000Z");
        let t2 = Some("2026-01-01T00:00:10.000000Z");
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(mk("a", t1))),
            Ok(watcher::Event::InitDone),
        ];
        feed_leases(&cache, events).await;
        let listed = cache.generation();
        let same = vec![Ok(watcher::Event::Apply(mk("a", t1)))];
        feed_leases(&cache, same).await;
        assert_eq!(cache.generation(), listed, "a repeat is no change");
        let renewed = vec![Ok(watcher::Event::Apply(mk("a", t2)))];
        feed_leases(&cache, renewed).await;
        assert_eq!(cache.generation(), listed + 1);
        let gone = vec![
            Ok(watcher::Event::Delete(mk("a", t2))),
            Ok(watcher::Event::Delete(mk("a", t2))),
        ];
        feed_leases(&cache, gone).await;
        assert_eq!(
            cache.generation(),
            listed + 2,
            "deleting twice is one change"
        );
    }

    /// Whatever an agent writes into its task's status, the operator keeps a bounded
    /// projection of it: the message cut, a few metrics, no summary, no plain vector.
    #[test]
    fn a_status_filled_to_the_limit_is_kept_bounded() {
        let status = ComputeTaskStatus {
            phase: Some(edgeloom_crds::TaskPhase::Succeeded),
            message: Some("é".repeat(4096)),
            metrics: (0..64).map(|i| (format!("{i:063}"), i as f64)).collect(),
            result_summary: (0..64)
                .map(|i| (format!("{i:063}"), "x".repeat(256)))
                .collect(),
            result_vector: vec![1.0; 4096],
            ..ComputeTaskStatus::default()
        };
        let full = serde_json::to_vec(&status).expect("json").len();
        let mut kept = status.clone();
        bound_status(&mut kept);
        let bytes = serde_json::to_vec(&kept).expect("json").len();
        assert!(full > 45_000, "{full}");
        assert!(bytes < 2_500, "kept {bytes} of {full} bytes");
        assert_eq!(
            kept.message.as_deref().map(|m| m.chars().count()),
            Some(256)
        );
        assert_eq!(kept.metrics.len(), METRICS_KEPT);
        assert!(kept.result_summary.is_empty() && kept.result_vector.is_empty());
    }

    /// A heartbeat counts from when the operator saw it, not from the time the agent
    /// wrote: a clock running ahead buys nothing once renewals stop, a repeat of the same
    /// renewal (a relist) is not a new one, and a Lease first seen stale stays stale.
    #[test]
    fn heartbeats_are_judged_by_when_the_operator_saw_them() {
        let t = |s: i64| -> Timestamp {
            "2026-01-01T00:00:00Z".parse::<Timestamp>().expect("time")
                + jiff::SignedDuration::from_secs(s)
        };
        // An agent whose clock is an hour ahead: seen now, not an hour from now.
        let first = Heartbeat::observe(None, Some(t(3600)), t(0));
        assert_eq!(first.seen, Some(t(0)));
        // It writes the same value again at t=30 (it stopped renewing): still t=0.
        let again = Heartbeat::observe(Some(&first), Some(t(3600)), t(30));
        assert_eq!(again.seen, Some(t(0)));
        // A real renewal (a new value, in the future or not) is seen when it arrives.
        let renewed = Heartbeat::observe(Some(&again), Some(t(3610)), t(40));
        assert_eq!(renewed.seen, Some(t(40)));
        let behind = Heartbeat::observe(Some(&renewed), Some(t(-100)), t(50));
        assert_eq!(behind.seen, Some(t(50)));
        // First seen with an old renewal (a dead node, at an operator restart): stale.
        let stale = Heartbeat::observe(None, Some(t(-600)), t(0));
        assert_eq!(stale.seen, Some(t(-600)));
        // No renewal at all: never ready.
        assert_eq!(Heartbeat::observe(None, None, t(0)).seen, None);
    }
}
