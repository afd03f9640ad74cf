//! The scheduling cycle: the job controller submits jobs with slots that need a node;
//! each cycle orders them ([`crate::queue`]), builds one capacity snapshot of every member
//! cluster, places them in order ([`crate::placement`]) and creates their ComputeTasks.
//! Task names are deterministic, so creating a task that already exists (after a restart,
//! or while a cache lags) finds the existing one instead of doubling work.

use crate::fleet::{Fleet, Member};
use crate::lifecycle::{Need, task_name, task_prefix};
use crate::metrics::Metrics;
use crate::placement::{self, Interner, Request, ScoreInputs, Slot, Snapshot, Spread};
use crate::quantity;
use crate::queue::{self, Waiting};
use crate::rewards::trust;
use edgeloom_crds::ComputeJob;
use edgeloom_crds::TaskPhase;
use edgeloom_crds::commitment;
use edgeloom_crds::compute_job::{ComputeJobSpec, Spread as SpecSpread};
use edgeloom_crds::compute_task::{
    ComputeTask, ComputeTaskSpec, JOB_UID_LABEL, JobReference, NODE_LABEL, TaskLimits,
};
use edgeloom_crds::edge_pool::EdgePoolSpec;
use edgeloom_crds::inventory::{ARCH_LABEL, OWNER_LABEL};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Annotation on a ComputeTask naming the operator replica that created it.
pub const CREATED_BY_ANNOTATION: &str = "edgeloom.io/created-by";

/// A job's request for placement.
#[derive(Clone, Debug)]
pub struct Work {
    /// Namespace of the job.
    pub namespace: String,
    /// Name of the job.
    pub name: String,
    /// UID of the job.
    pub uid: String,
    /// Priority.
    pub priority: i32,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    /// The job's spec.
    pub spec: Arc<ComputeJobSpec>,
    /// Slots to place.
    pub needs: Vec<Need>,
    /// (member, node) of the job's running tasks, for spreading.
    pub used: Vec<(String, String)>,
    /// (member, node) of each shard's other running replicas.
    pub replicas: BTreeMap<u32, Vec<(String, String)>>,
    /// Member keys the job may use.
    pub members: Arc<[String]>,
    /// Place all or none (the job's first placement with `gang: true`).
    pub gang: bool,
    /// For a job with a budget: how many of its tasks had finished when this work was
    /// decided. Once more have finished, the work waits for the job's next decision (a
    /// receipt may have used up the budget), so no stale work overspends it.
    pub finished_seen: Option<usize>,
}

/// Requested resources of one task, kept until the task shows up in its member's cache.
#[derive(Clone, Debug)]
struct InFlight {
    member: String,
    name: String,
    node: String,
    cpu_millis: u64,
    memory_mib: u64,
    gpus: u32,
    since: Instant,
}

/// Shared state between the job controller and the scheduling loop.
#[derive(Default)]
pub struct Scheduler {
    pending: Mutex<HashMap<String, Work>>,
    /// Per pool, the nodes ("cluster/node") caught too often to get work.
    quarantine: Mutex<HashMap<String, HashSet<String>>>,
    /// Per pool, each timed node's verified speed relative to its peers (thousandths).
    speeds: Mutex<HashMap<String, HashMap<String, u32>>>,
    unfit: Mutex<HashMap<String, String>>,
    in_flight: Mutex<HashMap<String, InFlight>>,
    derived: Mutex<Derived>,
    /// (member, node) taken by a placement whose task could not be created: the capacity
    /// it held in that cycle counts as grown in the next (verdicts made after it in that
    /// cycle may be wrong).
    released: Mutex<Vec<(String, String)>>,
    /// Per job: a fingerprint of its submitted work, and the verdict of the last cycle
    /// that could place none of it.
    verdicts: Mutex<HashMap<String, Verdict>>,
    /// Per job UID, the cycles fencing or creating its tasks now: a deleted job's cleanup
    /// waits for them, so no task is created after cleanup listed the job's tasks.
    creating: Mutex<HashMap<String, usize>>,
    notify: Notify,
}

/// One cycle's claim on a job's task creation, released when dropped.
struct Creating<'a> {
    map: &'a Mutex<HashMap<String, usize>>,
    uid: String,
}

impl<'a> Creating<'a> {
    fn new(map: &'a Mutex<HashMap<String, usize>>, uid: &str) -> Creating<'a> {
        if let Ok(mut m) = map.lock() {
            *m.entry(uid.to_string()).or_default() += 1;
        }
        Creating {
            map,
            uid: uid.to_string(),
        }
    }
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.lock()
            && let Some(n) = m.get_mut(&self.uid)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.uid);
            }
        }
    }
}

/// A job found unplaceable, kept while neither the job's work nor the fleet's capacity
/// changed: nothing could fit then either, so the job is not tried again (at 100,000
/// nodes an unplaceable job costs milliseconds to prove so).
#[derive(Clone, Debug, Default)]
struct Verdict {
    /// Of the work as submitted (spec, needs, nodes used and avoided, members).
    submitted: u64,
    /// Of the work as last tried (with what was created since), and the capacity epoch
    /// then; None while the job has not been found unplaceable.
    tried: Option<(u64, u64, Instant)>,
}

/// A verdict is tried again after this long even if nothing seems to have changed.
const VERDICT_MAX_AGE: Duration = Duration::from_secs(30);

fn work_fingerprint(w: &Work) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(&*w.spec)
        .unwrap_or_default()
        .hash(&mut h);
    (&w.uid, w.priority, w.gang, w.finished_seen, &w.members).hash(&mut h);
    for n in &w.needs {
        (n.shard, n.replica, n.attempt, &n.avoid).hash(&mut h);
    }
    (&w.used, &w.replicas).hash(&mut h);
    h.finish()
}

/// The work of a cycle (after what is in flight was taken off it) on top of what was
/// submitted.
fn tried_fingerprint(submitted: u64, w: &Work) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    submitted.hash(&mut h);
    for n in &w.needs {
        (n.shard, n.replica, n.attempt).hash(&mut h);
    }
    (&w.used, &w.replicas).hash(&mut h);
    h.finish()
}

impl Scheduler {
    /// Whether node "cluster/node" of `pool` is quarantined.
    pub fn quarantined(&self, pool: &str, node: &str) -> bool {
        self.quarantine
            .lock()
            .is_ok_and(|q| q.get(pool).is_some_and(|n| n.contains(node)))
    }

    /// Replaces the quarantined nodes ("cluster/node") of `pool`.
    pub fn set_quarantined(&self, pool: &str, nodes: HashSet<String>) {
        if let Ok(mut q) = self.quarantine.lock() {
            if nodes.is_empty() {
                q.remove(pool);
            } else {
                q.insert(pool.to_string(), nodes);
            }
        }
    }

    /// Replaces the verified relative speeds of `pool`'s nodes ("cluster/node").
    pub fn set_relative_speeds(&self, pool: &str, speeds: HashMap<String, u32>) {
        if let Ok(mut s) = self.speeds.lock() {
            s.insert(pool.to_string(), speeds);
        }
    }

    /// The verified relative speed of node "cluster/node" of `pool`, if it was timed.
    pub fn relative_speed(&self, pool: &str, node: &str) -> Option<u32> {
        self.speeds
            .lock()
            .ok()
            .and_then(|s| s.get(pool).and_then(|p| p.get(node)).copied())
    }

    /// Asks for placement of `work` (replacing an earlier request of the same job).
    pub fn submit(&self, work: Work) {
        let key = format!("{}/{}", work.namespace, work.name);
        let submitted = work_fingerprint(&work);
        let mut same = false;
        if let Ok(mut v) = self.verdicts.lock() {
            let e = v.entry(key.clone()).or_default();
            same = e.submitted == submitted;
            if !same {
                *e = Verdict {
                    submitted,
                    tried: None,
                };
            }
        }
        let mut wake = true;
        if let Ok(mut p) = self.pending.lock() {
            // The same work again (a periodic reconcile) wakes no cycle: the periodic
            // cycle tries it with whatever capacity changed. New or changed work does.
            // It still replaces what is pending (a cycle trims what it placed; a task
            // that then vanished must be needed again).
            wake = !(same && p.contains_key(&key));
            p.insert(key, work);
        }
        if wake {
            self.notify.notify_one();
        }
    }

    /// Withdraws a job's request.
    pub fn withdraw(&self, namespace: &str, name: &str) {
        let key = format!("{namespace}/{name}");
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&key);
        }
        if let Ok(mut u) = self.unfit.lock() {
            u.remove(&key);
        }
        if let Ok(mut v) = self.verdicts.lock() {
            v.remove(&key);
        }
    }

    /// Waits (at most `bound`) until no cycle is fencing or creating tasks of job `uid`;
    /// false if one still is. A cycle that starts later sees the job's deletion when it
    /// fences and creates nothing, so after a withdrawal and this wait no task of the job
    /// appears.
    pub async fn creations_done(&self, uid: &str, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            let busy = self
                .creating
                .lock()
                .map(|m| m.contains_key(uid))
                .unwrap_or(false);
            if !busy {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Why the job could not be placed in the last cycle, if it could not.
    pub fn unfit(&self, namespace: &str, name: &str) -> Option<String> {
        self.unfit
            .lock()
            .ok()
            .and_then(|u| u.get(&format!("{namespace}/{name}")).cloned())
    }

    /// Jobs waiting.
    pub fn depth(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Runs scheduling cycles forever: on every submit, and at least every `interval`.
    /// Attempts are fenced through the jobs in `hub`.
    pub async fn run(
        self: Arc<Self>,
        fleet: Arc<Fleet>,
        hub: kube::Client,
        metrics: Metrics,
        identity: String,
        interval: Duration,
    ) {
        loop {
            let _ = tokio::time::timeout(interval, self.notify.notified()).await;
            self.cycle(&fleet, Some(&hub), &metrics, &identity).await;
        }
    }

    /// One cycle. Without a `hub` (benchmarks and unit tests, which have no API server)
    /// attempts are not fenced.
    pub async fn cycle(
        &self,
        fleet: &Fleet,
        hub: Option<&kube::Client>,
        metrics: &Metrics,
        identity: &str,
    ) {
        let work: Vec<Work> = self
            .pending
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        // The fingerprint of each job's work as copied here: a submission during this
        // cycle must not inherit the verdict of the work it replaced.
        let submitted_now: HashMap<String, u64> = self
            .verdicts
            .lock()
            .map(|v| v.iter().map(|(k, e)| (k.clone(), e.submitted)).collect())
            .unwrap_or_default();
        metrics.queue_depth.set(work.len() as i64);
        if work.is_empty() {
            return;
        }
        let members = fleet.members();
        let now = Timestamp::now();
        let in_flight = self.in_flight_snapshot(&members);
        // A task created in an earlier cycle and not yet in its member's cache must not be
        // placed again: its name is unique only within one member cluster.
        let created: HashSet<&str> = in_flight.iter().map(|f| f.name.as_str()).collect();
        let work: Vec<Work> = work
            .into_iter()
            .map(|mut w| {
                w.needs.retain(|n| {
                    !created.contains(task_name(&w.uid, n.shard, n.replica, n.attempt).as_str())
                });
                // Tasks of this job created in an earlier cycle and not in the job
                // controller's view yet still count for spreading and for keeping a
                // shard's replicas apart.
                let prefix = format!("{}-", task_prefix(&w.uid));
                for f in &in_flight {
                    let Some(rest) = f.name.strip_prefix(&prefix) else {
                        continue;
                    };
                    let at = (f.member.clone(), f.node.clone());
                    if !w.used.contains(&at) {
                        w.used.push(at.clone());
                    }
                    if let Some(shard) = rest.split('-').next().and_then(|s| s.parse().ok()) {
                        let r = w.replicas.entry(shard).or_default();
                        if !r.contains(&at) {
                            r.push(at);
                        }
                    }
                }
                w
            })
            .filter(|w| !w.needs.is_empty())
            .collect();
        let started = Instant::now();
        let mut world = self.world(&members, now, &in_flight);
        metrics
            .snapshot_duration
            .observe(started.elapsed().as_secs_f64());
        let waiting = work
            .into_iter()
            .map(|w| Waiting {
                namespace: w.namespace.clone(),
                priority: w.priority,
                created: w.created,
                name: w.name.clone(),
                key: w,
            })
            .collect();
        let cold_members: HashSet<&str> = members
            .iter()
            .filter(|m| !m.synced() && !m.lost(now) && m.sync_problem(now).is_none())
            .map(|m| m.key.as_str())
            .collect();
        for Waiting { key: work, .. } in queue::order(waiting) {
            let job_key = format!("{}/{}", work.namespace, work.name);
            // No verdict before the job's member caches are filled: an empty cache is not
            // an empty cluster.
            let cold = work.members.is_empty()
                || work
                    .members
                    .iter()
                    .any(|k| cold_members.contains(k.as_str()));
            if cold {
                continue;
            }
            if let Some(seen) = work.finished_seen {
                let finished: usize = members
                    .iter()
                    .filter(|m| work.members.contains(&m.key))
                    .map(|m| {
                        m.tasks
                            .by_key(&work.uid)
                            .iter()
                            .filter(|t| t.terminal())
                            .count()
                    })
                    .sum();
                if finished > seen {
                    continue;
                }
            }
            // Unplaceable last time, and neither the job nor the capacity changed since.
            let submitted = self.verdicts.lock().ok().and_then(|v| {
                v.get(&job_key)
                    .filter(|e| submitted_now.get(&job_key) == Some(&e.submitted))
                    .map(|e| (e.submitted, e.tried))
            });
            let tried = submitted.map(|(s, _)| tried_fingerprint(s, &work));
            if let (Some((_, Some((fp, epoch, at)))), Some(now_fp)) = (submitted, tried)
                && fp == now_fp
                && at.elapsed() < VERDICT_MAX_AGE
                && let Some(grown) = world.grown_since(epoch)
            {
                // Only a node that grew could make it fit now (kube-scheduler's queueing
                // hints, in spirit): none of them passing the job's filters, the verdict
                // stands.
                let helped = !grown.is_empty() && {
                    let (request, _) = world.request(&work);
                    grown
                        .iter()
                        .any(|id| placement::check(&world.snapshot, *id, &request).is_ok())
                };
                if !helped {
                    metrics.verdicts_reused.inc();
                    if let Ok(mut v) = self.verdicts.lock()
                        && let Some(e) = v.get_mut(&job_key)
                        && submitted_now.get(&job_key) == Some(&e.submitted)
                    {
                        e.tried = Some((fp, world.capacity_epoch, at));
                    }
                    continue;
                }
            }
            let started = Instant::now();
            let (request, slots) = world.request(&work);
            let outcome = placement::place(&mut world.snapshot, &request);
            metrics
                .placement_duration
                .observe(started.elapsed().as_secs_f64());
            if let (Ok(mut v), Some(fp)) = (self.verdicts.lock(), tried)
                && let Some(e) = v.get_mut(&job_key)
                && submitted_now.get(&job_key) == Some(&e.submitted)
            {
                e.tried = outcome
                    .assigned
                    .is_empty()
                    .then(|| (fp, world.capacity_epoch, Instant::now()));
            }
            if let Some((_, unfit)) = outcome.unplaced.first() {
                let text = unfit.to_string();
                if let Ok(mut u) = self.unfit.lock() {
                    u.insert(job_key.clone(), text);
                }
            } else if let Ok(mut u) = self.unfit.lock() {
                u.remove(&job_key);
            }
            if outcome.assigned.is_empty() {
                continue;
            }
            // Fencing: each attempt is recorded in the hub before its task is created.
            let _creating = Creating::new(&self.creating, &work.uid);
            let issue: Vec<(&Need, (String, String))> = outcome
                .assigned
                .iter()
                .map(|(slot, node)| (&slots[*slot], world.node_name(*node)))
                .collect();
            let allowed = match hub {
                Some(hub) => fence(hub, &work, &issue).await,
                None => vec![true; issue.len()],
            };
            let released = &self.released;
            let creates = outcome.assigned.iter().zip(&allowed).map(|((slot, node), allowed)| {
                let need = &slots[*slot];
                let (member_key, node_name) = world.node_name(*node);
                let member = members.iter().find(|m| m.key == member_key).cloned();
                let downloads = member
                    .as_ref()
                    .map(|m| m.pool_spec().model_downloads.clone())
                    .unwrap_or_default();
                let task = build_task(&work, need, &member_key, &node_name, identity, downloads);
                let uid = work.uid.as_str();
                async move {
                    if !allowed {
                        released.lock().ok()?.push((member_key, node_name));
                        return None;
                    }
                    let member = member?;
                    let name = task.metadata.name.clone().unwrap_or_default();
                    // Bounded, so that one slow member never stalls the cycle for all jobs.
                    let api = member.tasks_api();
                    let params = PostParams::default();
                    crate::context::failpoint_delay("before-task-create").await;
                    let call = api.create(&params, &task);
                    match tokio::time::timeout(Duration::from_secs(5), call).await {
                        Ok(Ok(_)) => {
                            crate::context::failpoint("after-task-create");
                            Some((true, member_key, node_name, name))
                        }
                        Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                            // Already there: after a restart, ours; but a task of another
                            // job under the same name is not, and is never taken for it.
                            let found = tokio::time::timeout(Duration::from_secs(5), api.get_opt(&name)).await;
                            let owner = match &found {
                                Ok(Ok(Some(t))) => t.labels().get(JOB_UID_LABEL).cloned(),
                                _ => None,
                            };
                            if owner.as_deref() == Some(uid) {
                                Some((false, member_key, node_name, name))
                            } else {
                                tracing::error!(task = %name, member = %member_key, job = %uid, owner = ?owner, "a task of this name exists and is not this job's; not taking it");
                                released.lock().ok()?.push((member_key, node_name));
                                None
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(task = %name, member = %member_key, error = %e, "creating task failed; will retry");
                            released.lock().ok()?.push((member_key, node_name));
                            None
                        }
                        Err(_) => {
                            tracing::warn!(task = %name, member = %member_key, "creating task timed out; will retry");
                            released.lock().ok()?.push((member_key, node_name));
                            None
                        }
                    }
                }
            });
            let results = futures::future::join_all(creates).await;
            let all_ok = results.iter().all(Option::is_some);
            // (shard, replica, attempt) of every need whose task now exists (join_all keeps order).
            let made: HashSet<(u32, u32, u32)> = outcome
                .assigned
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_some())
                .map(|((slot, _), _)| {
                    (
                        slots[*slot].shard,
                        slots[*slot].replica,
                        slots[*slot].attempt,
                    )
                })
                .collect();
            // (shard, (member, node)) of each task just created.
            let placed_at: Vec<(u32, (String, String))> = outcome
                .assigned
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_some())
                .map(|((slot, node), _)| (slots[*slot].shard, world.node_name(*node)))
                .collect();
            for (created, member, node, name) in results.into_iter().flatten() {
                if created {
                    metrics.tasks_created.inc();
                    tracing::info!(job = %job_key, task = %name, %member, %node, "placed");
                }
                if let Ok(mut f) = self.in_flight.lock() {
                    f.insert(
                        format!("{member}/{name}"),
                        InFlight {
                            member,
                            name: name.clone(),
                            node,
                            cpu_millis: request.cpu_millis,
                            memory_mib: request.memory_mib,
                            gpus: request.gpus,
                            since: Instant::now(),
                        },
                    );
                }
            }
            // Placed: the job controller resubmits whatever still needs a node once the
            // new tasks are in its cache; until then the placed needs are dropped here.
            if let Ok(mut p) = self.pending.lock() {
                if all_ok && outcome.unplaced.is_empty() {
                    p.remove(&job_key);
                } else if let Some(w) = p.get_mut(&job_key) {
                    w.needs
                        .retain(|n| !made.contains(&(n.shard, n.replica, n.attempt)));
                    // What was just placed counts for the rest: replicas of a shard stay on
                    // distinct nodes, and spreading sees the new tasks.
                    for (shard, at) in &placed_at {
                        w.replicas.entry(*shard).or_default().push(at.clone());
                        w.used.push(at.clone());
                    }
                }
            }
        }
        metrics.queue_depth.set(self.depth() as i64);
    }

    /// In-flight creations not yet in their member's cache (dropped after 30 s).
    fn in_flight_snapshot(&self, members: &[Arc<Member>]) -> Vec<InFlight> {
        let Ok(mut f) = self.in_flight.lock() else {
            return vec![];
        };
        f.retain(|key, v| {
            let name = key.rsplit('/').next().unwrap_or_default();
            let cached = members
                .iter()
                .any(|m| m.key == v.member && m.tasks.get(name).is_some());
            !cached && v.since.elapsed() < Duration::from_secs(30)
        });
        f.values().cloned().collect()
    }
}

/// Field manager of the scheduler's writes to a job's status (`status.issued`).
pub const SCHEDULER_FIELD_MANAGER: &str = "edgeloom-scheduler";

/// Records the attempts of `issue` (need, (member key, node)) in the job's
/// `status.issued`, conditional on the job's resourceVersion, before their tasks are
/// created (docs/ARCHITECTURE.md, "Fencing"). Returns which of them may be created: none
/// when the job is gone, being deleted or changed meanwhile (the next cycle decides
/// again), and not a need whose attempt is not above every attempt the job has issued or
/// recorded for its slot (stale work of an earlier decision).
async fn fence(hub: &kube::Client, work: &Work, issue: &[(&Need, (String, String))]) -> Vec<bool> {
    // The job controller writes the job's status too: a conflict is read again, a few
    // times, rather than leaving the placement to the next cycle.
    for _ in 0..3 {
        match fence_once(hub, work, issue).await {
            Fenced::Done(allowed) => return allowed,
            Fenced::Conflict => continue,
        }
    }
    tracing::debug!(job = %work.name, "the job kept changing while its attempts were fenced; next cycle");
    vec![false; issue.len()]
}

enum Fenced {
    Done(Vec<bool>),
    Conflict,
}

/// Attempts issued and not yet recorded in a job's shards, at most: `status.issued`
/// stays bounded however many slots one cycle could place (the rest wait a cycle).
pub const ISSUED_MAX: usize = 500;

async fn fence_once(
    hub: &kube::Client,
    work: &Work,
    issue: &[(&Need, (String, String))],
) -> Fenced {
    use edgeloom_crds::compute_job::slot_key;
    let none = Fenced::Done(vec![false; issue.len()]);
    let api: Api<ComputeJob> = Api::namespaced(hub.clone(), &work.namespace);
    let job = match tokio::time::timeout(Duration::from_secs(5), api.get_opt(&work.name)).await {
        Ok(Ok(Some(j))) => j,
        Ok(Ok(None)) => return none,
        Ok(Err(e)) => {
            tracing::warn!(job = %work.name, error = %e, "reading the job to fence its attempts failed; will retry");
            return none;
        }
        Err(_) => return none,
    };
    if job.metadata.uid.as_deref() != Some(work.uid.as_str())
        || job.metadata.deletion_timestamp.is_some()
    {
        return none;
    }
    let status = job.status.clone().unwrap_or_default();
    // Every slot's highest attempt: a slot waiting to be placed again shows its last one
    // without a node.
    let mut highest: BTreeMap<String, u32> = BTreeMap::new();
    for s in &status.shards {
        let e = highest.entry(slot_key(s.index, s.replica)).or_default();
        *e = (*e).max(s.attempt);
    }
    // A big job's slots are paged; their attempts are in the status as runs.
    if let Some(text) = &status.slot_attempts {
        let decoded = crate::shard_pages::decode_attempts(text, |shard, replica, attempt| {
            let e = highest.entry(slot_key(shard, replica)).or_default();
            *e = (*e).max(attempt);
        });
        if let Err(e) = decoded {
            tracing::warn!(job = %work.name, error = %e, "the job's slot attempts do not read; nothing issued");
            return none;
        }
    }
    let recorded = highest.clone();
    // Entries the job's shards have caught up with are no longer needed; the rest
    // bound how many more may be issued now.
    let outstanding = status
        .issued
        .iter()
        .filter(|(key, i)| recorded.get(*key).is_none_or(|r| *r < i.attempt))
        .count();
    for (key, i) in &status.issued {
        let e = highest.entry(key.clone()).or_default();
        *e = (*e).max(i.attempt);
    }
    let now = Time(Timestamp::now());
    let mut entries = serde_json::Map::new();
    let allowed: Vec<bool> = issue
        .iter()
        .map(|(need, (member, node))| {
            let key = slot_key(need.shard, need.replica);
            let ok = need.attempt > highest.get(&key).copied().unwrap_or(0)
                && !entries.contains_key(&key)
                && outstanding + entries.len() < ISSUED_MAX;
            if ok {
                let (pool, cluster) = member.split_once('/').unwrap_or((member, member));
                entries.insert(
                    key,
                    serde_json::json!({
                        "attempt": need.attempt, "pool": pool, "cluster": cluster,
                        "node": node, "at": now,
                    }),
                );
            }
            ok
        })
        .collect();
    if entries.is_empty() {
        return none;
    }
    // Entries the job's shards have caught up with are no longer needed.
    for (key, i) in &status.issued {
        if !entries.contains_key(key) && recorded.get(key).is_some_and(|r| *r >= i.attempt) {
            entries.insert(key.clone(), serde_json::Value::Null);
        }
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": job.metadata.resource_version},
        "status": {"issued": entries},
    });
    let params = PatchParams {
        field_manager: Some(SCHEDULER_FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = Patch::Merge(&patch);
    let call = api.patch_status(&work.name, &params, &patch);
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Ok(_)) => Fenced::Done(allowed),
        Ok(Err(kube::Error::Api(s))) if s.code == 409 => Fenced::Conflict,
        Ok(Err(e)) => {
            tracing::warn!(job = %work.name, error = %e, "recording issued attempts failed; will retry");
            none
        }
        Err(_) => none,
    }
}

fn build_task(
    work: &Work,
    need: &Need,
    member: &str,
    node: &str,
    identity: &str,
    model_downloads: edgeloom_crds::edge_pool::ModelDownloads,
) -> ComputeTask {
    let name = task_name(&work.uid, need.shard, need.replica, need.attempt);
    let (pool, cluster) = member.split_once('/').unwrap_or((member, member));
    let spec = &work.spec;
    ComputeTask {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(BTreeMap::from([
                (JOB_UID_LABEL.to_string(), work.uid.clone()),
                (NODE_LABEL.to_string(), node.to_string()),
            ])),
            annotations: Some(BTreeMap::from([
                (CREATED_BY_ANNOTATION.to_string(), identity.to_string()),
                (
                    edgeloom_crds::compute_task::DISPATCHED_AT_ANNOTATION.to_string(),
                    Timestamp::now().to_string(),
                ),
            ])),
            ..Default::default()
        },
        spec: ComputeTaskSpec {
            job: JobReference {
                namespace: work.namespace.clone(),
                name: work.name.clone(),
                uid: work.uid.clone(),
            },
            pool: pool.to_string(),
            cluster: cluster.to_string(),
            shard: need.shard,
            shards: spec.shards,
            replica: need.replica,
            attempt: need.attempt,
            node_name: node.to_string(),
            workload: spec.workload.clone(),
            limits: TaskLimits {
                timeout_seconds: spec.deadline_seconds,
                memory: spec.resources.memory.clone(),
                cpu: spec.resources.cpu.clone(),
                gpus: spec.resources.gpus,
            },
            model_downloads,
            // Replicated results are committed before they are revealed.
            nonce: spec
                .verification
                .as_ref()
                .is_some_and(|v| v.replicas > 1)
                .then(|| commitment::nonce(&work.uid, need.shard, need.replica, need.attempt)),
            federated: None,
        },
        status: None,
    }
}

/// The snapshot of every member's nodes plus the names behind its indices.
pub struct World {
    /// The placement snapshot.
    pub snapshot: Snapshot,
    /// Interned strings.
    pub interner: Arc<Interner>,
    /// Each member's base, by snapshot cluster index; its nodes start at `offsets[i]`.
    bases: Vec<Arc<MemberBase>>,
    offsets: Vec<u32>,
    member_index: HashMap<String, u32>,
    /// Changes whenever capacity may have grown (see [`Verdict`]).
    pub capacity_epoch: u64,
    /// The nodes that grew at each recent epoch.
    grown: GrownLog,
}

/// One member's candidate nodes before usage: what the scheduler derives from the
/// member's node cache, its pool's spec (node selector, `maxTasksPerNode`, the cluster's
/// region, zone and labels) and the pool's quarantine. Rebuilt only when one of those
/// changed (docs/ARCHITECTURE.md, "Scheduling": the snapshot is incremental).
pub struct MemberBase {
    key: String,
    member_id: u64,
    nodes_generation: u64,
    pool_spec: Arc<EdgePoolSpec>,
    quarantine: u64,
    /// Unique per build, so that an order computed over these nodes is reused only for them.
    version: u64,
    names: Vec<Box<str>>,
    /// Full capacity, not ready, score 0; `cluster` is set per cycle.
    nodes: Vec<placement::Node>,
    /// (claimed TFLOP/s, price factor) per node.
    claims: Vec<(f64, f64)>,
    by_name: HashMap<Box<str>, u32>,
}

/// Tasks on a node and its finished history, from the member's task cache.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    tasks: u32,
    cpu_millis: u64,
    memory_mib: u64,
    gpus: u32,
    succeeded: u32,
    failed: u32,
}

/// A member's usage per base node, rebuilt when its task cache or its base changed.
struct MemberUsage {
    tasks_generation: u64,
    base_version: u64,
    per_node: Vec<Usage>,
}

/// What one cycle keeps for the next (see [`MemberBase`]).
#[derive(Default)]
pub struct Derived {
    interner: Arc<Interner>,
    /// Symbols interned when the interner was last started afresh.
    symbols_at_reset: usize,
    bases: HashMap<String, Arc<MemberBase>>,
    usage: HashMap<String, MemberUsage>,
    /// The last order by score, and the base versions it ranks.
    order: Option<(Vec<u64>, Vec<u32>)>,
    /// Base rebuilds so far (for the benchmark and metrics).
    pub rebuilds: u64,
    /// Per member: its base version, each node's free capacity and readiness, and
    /// whether its cluster was reachable, at the start of the last cycle.
    capacity: HashMap<String, (u64, Vec<Capacity>, bool)>,
    /// Bumped whenever capacity may have grown since the last cycle (see [`Verdict`]).
    epoch: u64,
    /// The nodes (member key, node name) that grew at each of the last epochs.
    grown: GrownLog,
}

/// Per epoch, the nodes (member key, node name) whose capacity grew.
type GrownLog = std::collections::VecDeque<(u64, Arc<Vec<(Arc<str>, Box<str>)>>)>;

/// Epochs whose grown nodes are kept; a verdict older than that is tried again.
const GROWN_KEPT: usize = 64;

/// What decides whether a node can take a task, bar the job's own filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Capacity {
    ready: bool,
    slots: u32,
    cpu_millis: u64,
    memory_mib: u64,
    gpus: u32,
}

impl Capacity {
    fn of(n: &placement::Node) -> Capacity {
        Capacity {
            ready: n.ready,
            slots: n.free_slots,
            cpu_millis: n.free_cpu_millis,
            memory_mib: n.free_memory_mib,
            gpus: n.free_gpus,
        }
    }

    /// Whether `self` may fit something `before` could not.
    fn grew_from(&self, before: &Capacity) -> bool {
        (self.ready && !before.ready)
            || self.slots > before.slots
            || self.cpu_millis > before.cpu_millis
            || self.memory_mib > before.memory_mib
            || self.gpus > before.gpus
    }
}

static NEXT_BASE_VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn set_fingerprint(set: Option<&HashSet<String>>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut items: Vec<&String> = set.into_iter().flatten().collect();
    items.sort_unstable();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    items.hash(&mut h);
    h.finish()
}

/// Network latency in quarter-octave steps (about 19%), so that the jitter of every probe
/// does not reorder the whole fleet.
fn quantized_latency(secs: f64) -> f64 {
    if secs <= 0.0 || !secs.is_finite() {
        return secs.max(0.0);
    }
    let steps = (secs.log2() * 4.0).round();
    (steps / 4.0).exp2()
}

impl MemberBase {
    fn build(
        m: &Member,
        pool_spec: Arc<EdgePoolSpec>,
        quarantined: Option<&HashSet<String>>,
        quarantine: u64,
        nodes_generation: u64,
        interner: &mut Interner,
    ) -> MemberBase {
        // The cluster's entry as the pool spec says now (region, zone and labels may have
        // changed without a reconnect).
        let cluster = pool_spec
            .clusters
            .iter()
            .find(|c| c.name == m.spec.name)
            .unwrap_or(&m.spec)
            .clone();
        let region = cluster.region.as_deref().map(|r| interner.intern(r));
        let zone = cluster.zone.as_deref().map(|z| interner.intern(z));
        let cluster_pairs: Vec<String> = cluster
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let selector = pool_spec.node_selector.as_ref();
        let mut names = Vec::new();
        let mut nodes = Vec::new();
        let mut claims = Vec::new();
        let mut by_name = HashMap::new();
        let mut entries = m.nodes.state();
        // Deterministic order (the cache is a hash map).
        entries.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        let mut kv = String::new();
        for entry in entries {
            if let Some(sel) = selector
                && !selector_matches(sel, &entry.label_map())
            {
                continue;
            }
            if quarantined.is_some_and(|q| q.contains(&format!("{}/{}", m.spec.name, entry.name))) {
                continue;
            }
            let inv = &entry.inventory;
            let mut labels: Vec<u32> = Vec::with_capacity(entry.labels.len() + cluster_pairs.len());
            for (k, v) in entry.labels.iter() {
                kv.clear();
                kv.push_str(k);
                kv.push('=');
                kv.push_str(v);
                labels.push(interner.intern(&kv));
            }
            for p in &cluster_pairs {
                labels.push(interner.intern(p));
            }
            labels.sort_unstable();
            labels.dedup();
            let mut datasets: Vec<u32> = inv.datasets.iter().map(|d| interner.intern(d)).collect();
            datasets.sort_unstable();
            let cap = task_slots(inv.task_slots, pool_spec.max_tasks_per_node);
            let label = |key: &str| {
                entry
                    .labels
                    .iter()
                    .find(|(k, _)| &**k == key)
                    .map(|(_, v)| v.clone())
            };
            by_name.insert(entry.name.clone(), nodes.len() as u32);
            names.push(entry.name.clone());
            nodes.push(placement::Node {
                cluster: 0,
                ready: false,
                free_slots: cap,
                total_slots: cap,
                free_cpu_millis: inv.cpu_cores as u64 * 1000,
                free_memory_mib: inv.memory_mib,
                free_gpus: inv.gpus,
                gpu_memory_mib: inv.gpu_memory_mib,
                gpu_product: inv.gpu_product.as_deref().map(|p| interner.intern(p)),
                labels: labels.into(),
                datasets: datasets.into(),
                region,
                zone,
                account: inv.account.as_deref().map(|a| interner.intern(a)),
                owner: label(OWNER_LABEL).map(|v| interner.intern(&format!("owner:{v}"))),
                arch: label(ARCH_LABEL).map(|v| interner.intern(&v)),
                score: 0.0,
            });
            claims.push((inv.tflops, inv.price_factor));
        }
        MemberBase {
            key: m.key.clone(),
            member_id: m.id,
            nodes_generation,
            pool_spec,
            quarantine,
            version: NEXT_BASE_VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            names,
            nodes,
            claims,
            by_name,
        }
    }
}

fn usage_of(m: &Member, base: &MemberBase) -> Vec<Usage> {
    let mut per_node = vec![Usage::default(); base.nodes.len()];
    m.tasks.read(|tasks| {
        for t in tasks.values() {
            let Some(&i) = base.by_name.get(&t.node) else {
                continue;
            };
            let u = &mut per_node[i as usize];
            if t.busy() {
                u.tasks += 1;
                u.cpu_millis += t.cpu_millis;
                u.memory_mib += t.memory_mib;
                u.gpus += t.gpus;
            } else {
                match t.status.as_ref().and_then(|s| s.phase) {
                    Some(TaskPhase::Succeeded) => u.succeeded += 1,
                    Some(TaskPhase::Failed) => u.failed += 1,
                    _ => {}
                }
            }
        }
    });
    per_node
}

impl Scheduler {
    /// The snapshot a cycle would place on now (for the scheduler benchmark).
    pub fn snapshot_now(&self, members: &[Arc<Member>], now: Timestamp) -> World {
        let in_flight = self.in_flight_snapshot(members);
        self.world(members, now, &in_flight)
    }

    /// Base rebuilds so far (see [`MemberBase`]).
    pub fn base_rebuilds(&self) -> u64 {
        self.derived.lock().map(|d| d.rebuilds).unwrap_or(0)
    }

    /// Builds the placement snapshot of `members` at `now`, rebuilding only what changed
    /// since the last cycle (see [`MemberBase`]); `in_flight` are tasks created but not yet
    /// in their member's cache.
    fn world(&self, members: &[Arc<Member>], now: Timestamp, in_flight: &[InFlight]) -> World {
        let quarantine = self
            .quarantine
            .lock()
            .map(|q| q.clone())
            .unwrap_or_default();
        let speeds = self.speeds.lock().map(|s| s.clone()).unwrap_or_default();
        let mut guard = self.derived.lock().unwrap_or_else(|p| p.into_inner());
        let d = &mut *guard;
        d.bases
            .retain(|k, b| members.iter().any(|m| m.key == *k && m.id == b.member_id));
        d.usage.retain(|k, _| d.bases.contains_key(k));
        // Strings of nodes long gone stay interned: start afresh when that is most of it.
        if d.interner.len() > 4 * d.symbols_at_reset.max(50_000) {
            d.bases.clear();
            d.usage.clear();
            d.order = None;
            d.interner = Arc::default();
        }
        let mut bases = Vec::with_capacity(members.len());
        let mut usages: Vec<Vec<Usage>> = Vec::with_capacity(members.len());
        for m in members {
            let pool_spec = m.pool_spec();
            let quarantined = quarantine.get(&m.pool);
            let q = set_fingerprint(quarantined);
            // The generation is read before the cache, so that a change in between is
            // seen again next cycle rather than missed.
            let generation = m.nodes.generation();
            let fresh = d.bases.get(&m.key).filter(|b| {
                b.member_id == m.id
                    && b.nodes_generation == generation
                    && b.quarantine == q
                    && (Arc::ptr_eq(&b.pool_spec, &pool_spec) || *b.pool_spec == *pool_spec)
            });
            let base = match fresh {
                Some(b) => b.clone(),
                None => {
                    let interner = Arc::make_mut(&mut d.interner);
                    let b = Arc::new(MemberBase::build(
                        m,
                        pool_spec,
                        quarantined,
                        q,
                        generation,
                        interner,
                    ));
                    d.rebuilds += 1;
                    d.bases.insert(m.key.clone(), b.clone());
                    b
                }
            };
            // Usage depends on tasks' nodes, resources and phases, not on their progress.
            let tasks_generation = m.tasks.shape_generation();
            let usage = match d.usage.get(&m.key) {
                Some(u)
                    if u.tasks_generation == tasks_generation && u.base_version == base.version =>
                {
                    u.per_node.clone()
                }
                _ => {
                    let per_node = usage_of(m, &base);
                    d.usage.insert(
                        m.key.clone(),
                        MemberUsage {
                            tasks_generation,
                            base_version: base.version,
                            per_node: per_node.clone(),
                        },
                    );
                    per_node
                }
            };
            bases.push(base);
            usages.push(usage);
        }
        if d.bases.len() == bases.len() && d.order.is_none() {
            d.symbols_at_reset = d.interner.len();
        }

        // Assemble: copy each base, then its usage, tasks in flight, heartbeats and score.
        let total: usize = bases.iter().map(|b| b.nodes.len()).sum();
        let mut nodes = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(bases.len());
        let mut member_index = HashMap::with_capacity(bases.len());
        let mut reachable = Vec::with_capacity(bases.len());
        let mut reliability = Vec::with_capacity(total);
        let mut latency = Vec::with_capacity(total);
        let mut claims: HashMap<&str, Vec<f64>> = HashMap::new();
        for (ci, ((m, base), usage)) in members.iter().zip(&bases).zip(&mut usages).enumerate() {
            member_index.insert(m.key.clone(), ci as u32);
            offsets.push(nodes.len() as u32);
            let health = m.health();
            // A member that answers but cannot be watched gets no work.
            reachable.push(health.reachable && m.sync_problem(now).is_none());
            let lat = quantized_latency(health.latency.map(|l| l.as_secs_f64()).unwrap_or(1.0));
            for f in in_flight.iter().filter(|f| f.member == m.key) {
                if let Some(&i) = base.by_name.get(f.node.as_str()) {
                    let u = &mut usage[i as usize];
                    u.tasks += 1;
                    u.cpu_millis += f.cpu_millis;
                    u.memory_mib += f.memory_mib;
                    u.gpus += f.gpus;
                }
            }
            let cutoff = m.heartbeat_cutoff(now);
            m.leases.read(|leases| {
                for ((n, name), u) in base.nodes.iter().zip(&base.names).zip(usage.iter()) {
                    let mut n = n.clone();
                    n.cluster = ci as u32;
                    n.ready = leases
                        .get(name)
                        .and_then(|beat| beat.seen)
                        .is_some_and(|seen| seen >= cutoff);
                    n.free_slots = n.free_slots.saturating_sub(u.tasks);
                    n.free_cpu_millis = n.free_cpu_millis.saturating_sub(u.cpu_millis);
                    n.free_memory_mib = n.free_memory_mib.saturating_sub(u.memory_mib);
                    n.free_gpus = n.free_gpus.saturating_sub(u.gpus);
                    nodes.push(n);
                    reliability
                        .push((u.succeeded as f64 + 1.0) / ((u.succeeded + u.failed) as f64 + 2.0));
                    latency.push(lat);
                }
            });
            claims
                .entry(m.pool.as_str())
                .or_default()
                .extend(base.claims.iter().map(|c| c.0));
        }
        // Capacity may have grown: a node freed or ready again; every node of a member
        // whose base was rebuilt (nodes joined or changed) or whose cluster is back.
        let mut grown: Vec<(Arc<str>, Box<str>)> = Vec::new();
        let mut capacity = HashMap::with_capacity(bases.len());
        for (ci, (base, up)) in bases.iter().zip(&reachable).enumerate() {
            let start = offsets[ci] as usize;
            let now_cap: Vec<Capacity> = nodes[start..start + base.nodes.len()]
                .iter()
                .map(Capacity::of)
                .collect();
            let key: Arc<str> = base.key.as_str().into();
            match d.capacity.get(&base.key) {
                Some((version, old, was_up)) if *version == base.version && (*was_up || !*up) => {
                    for (i, (now, was)) in now_cap.iter().zip(old).enumerate() {
                        if now.grew_from(was) {
                            grown.push((key.clone(), base.names[i].clone()));
                        }
                    }
                }
                _ => grown.extend(base.names.iter().map(|n| (key.clone(), n.clone()))),
            }
            capacity.insert(base.key.clone(), (base.version, now_cap, *up));
        }
        d.capacity = capacity;
        if let Ok(mut r) = self.released.lock() {
            grown.extend(r.drain(..).map(|(m, n)| (Arc::from(m.as_str()), n.into())));
        }
        if !grown.is_empty() {
            d.epoch += 1;
            let epoch = d.epoch;
            d.grown.push_back((epoch, Arc::new(grown)));
            while d.grown.len() > GROWN_KEPT {
                d.grown.pop_front();
            }
        }
        let capacity_epoch = d.epoch;
        let versions: Vec<u64> = bases.iter().map(|b| b.version).collect();
        let grown = d.grown.clone();
        // Speed is the agent's claim: it counts only as far as verified work shows.
        let medians: HashMap<&str, f64> = claims
            .into_iter()
            .map(|(pool, v)| (pool, trust::median_claim(v)))
            .collect();
        let mut tflops = Vec::with_capacity(total);
        for (m, base) in members.iter().zip(&bases) {
            let median = medians.get(m.pool.as_str()).copied().unwrap_or(0.0);
            let timed = speeds.get(&m.pool);
            for (name, (claimed, _)) in base.names.iter().zip(&base.claims) {
                let verified = timed.and_then(|s| s.get(&format!("{}/{name}", m.spec.name)));
                tflops.push(trust::verified_tflops(*claimed, median, verified.copied()));
            }
        }
        let max_tflops = tflops.iter().copied().fold(0.0, f64::max);
        let min_latency = latency.iter().copied().fold(f64::INFINITY, f64::min);
        let prices = bases.iter().flat_map(|b| b.claims.iter().map(|c| c.1));
        for ((((n, t), r), l), price) in nodes
            .iter_mut()
            .zip(&tflops)
            .zip(&reliability)
            .zip(&latency)
            .zip(prices)
        {
            n.score = placement::score(ScoreInputs {
                speed: if max_tflops > 0.0 {
                    t / max_tflops
                } else {
                    0.0
                },
                reliability: *r,
                price_factor: price,
                locality: if *l > 0.0 {
                    (min_latency / l).min(1.0)
                } else {
                    1.0
                },
            });
        }
        // The last order is where this one starts when it ranks the same nodes: scores
        // move little between cycles, and the adaptive sort is then nearly linear.
        let hint = d
            .order
            .take()
            .filter(|(v, o)| *v == versions && o.len() == nodes.len())
            .map(|(_, o)| o);
        let snapshot = Snapshot::with_order_hint(nodes, reachable, hint);
        d.order = Some((versions, snapshot.order.clone()));
        World {
            snapshot,
            interner: d.interner.clone(),
            bases,
            offsets,
            member_index,
            capacity_epoch,
            grown,
        }
    }
}

impl World {
    /// (member key, node name) of snapshot node `idx`.
    pub fn node_name(&self, idx: u32) -> (String, String) {
        let ci = self.offsets.partition_point(|o| *o <= idx) - 1;
        let base = &self.bases[ci];
        (
            base.key.clone(),
            base.names[(idx - self.offsets[ci]) as usize].to_string(),
        )
    }

    /// The snapshot indices of the nodes whose capacity grew after `epoch`, if every
    /// epoch since is still logged (None: any may have).
    fn grown_since(&self, epoch: u64) -> Option<Vec<u32>> {
        if epoch == self.capacity_epoch {
            return Some(Vec::new());
        }
        if self.grown.front().is_none_or(|(e, _)| *e > epoch + 1) {
            return None;
        }
        let mut nodes: Vec<u32> = self
            .grown
            .iter()
            .filter(|(e, _)| *e > epoch)
            .flat_map(|(_, g)| g.iter())
            .filter_map(|(member, node)| self.lookup(member, node))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        Some(nodes)
    }

    /// The snapshot index of node `node` of member `member`.
    fn lookup(&self, member: &str, node: &str) -> Option<u32> {
        let ci = *self.member_index.get(member)?;
        let i = *self.bases[ci as usize].by_name.get(node)?;
        Some(self.offsets[ci as usize] + i)
    }

    /// Translates a job's work into a placement request (and the needs by slot index).
    fn request(&mut self, work: &Work) -> (Request, Vec<Need>) {
        let spec = &work.spec;
        let lookup = |k: &(String, String)| self.lookup(&k.0, &k.1);
        let slots = work
            .needs
            .iter()
            .map(|n| {
                let mut avoid: Vec<u32> = n.avoid.iter().filter_map(lookup).collect();
                let others = work.replicas.get(&n.shard).cloned().unwrap_or_default();
                avoid.extend(others.iter().filter_map(lookup));
                let avoid_accounts = others
                    .iter()
                    .filter_map(lookup)
                    .flat_map(|i| {
                        let n = &self.snapshot.nodes[i as usize];
                        [n.account, n.owner]
                    })
                    .flatten()
                    .collect();
                Slot {
                    shard: n.shard,
                    replica: n.replica,
                    avoid,
                    avoid_accounts,
                    // Set below, once the request (GPU or CPU job) is known.
                    class: None,
                }
            })
            .collect();
        let interner = &self.interner;
        let request = Request {
            slots,
            cpu_millis: quantity::millicores(spec.resources.cpu.as_ref()),
            memory_mib: quantity::mebibytes(spec.resources.memory.as_ref()),
            gpus: spec.resources.gpus,
            gpu_memory_mib: quantity::mebibytes(spec.resources.gpu_memory.as_ref()),
            gpu_products: spec
                .resources
                .gpu_products
                .iter()
                .map(|p| interner.get(p))
                .collect(),
            required_labels: spec
                .placement
                .required_labels
                .iter()
                .map(|(k, v)| interner.get(&format!("{k}={v}")))
                .collect(),
            dataset: spec
                .workload
                .dataset
                .as_ref()
                .and_then(|d| d.node_local.as_ref())
                .map(|d| interner.get(d)),
            regions: spec
                .placement
                .regions
                .iter()
                .map(|r| interner.get(r))
                .collect(),
            zones: spec
                .placement
                .zones
                .iter()
                .map(|z| interner.get(z))
                .collect(),
            clusters: work
                .members
                .iter()
                .filter_map(|m| self.member_index.get(m).copied())
                .collect(),
            spread: match spec.placement.spread.unwrap_or_default() {
                SpecSpread::None => Spread::None,
                SpecSpread::Node => Spread::Node,
                SpecSpread::Cluster => Spread::Cluster,
            },
            gang: work.gang,
            used_nodes: work.used.iter().filter_map(lookup).collect(),
            replicas: spec.verification.as_ref().map_or(1, |v| v.replicas.max(1)),
            wants: wants(spec),
        };
        let mut request = request;
        let gpus = request.gpus;
        for (slot, need) in request.slots.iter_mut().zip(&work.needs) {
            slot.class = work
                .replicas
                .get(&need.shard)
                .into_iter()
                .flatten()
                .filter_map(lookup)
                .find_map(|i| placement::class(&self.snapshot.nodes[i as usize], gpus));
        }
        (request, work.needs.clone())
    }
}

/// A node's task slots: what its agent says it runs at once (a claim), never more than the
/// pool's `maxTasksPerNode` (the platform team's); an agent that says nothing gets the
/// pool's number.
pub fn task_slots(advertised: u32, pool_cap: u32) -> u32 {
    match advertised {
        0 => pool_cap,
        n => n.min(pool_cap),
    }
}

/// What a job wants, in words, by the filter that checks it (named when a slot does not
/// fit, e.g. "0/4 nodes fit: 4 have no GPU (job wants 1 x NVIDIA A100)").
fn wants(spec: &ComputeJobSpec) -> BTreeMap<placement::Filter, String> {
    use placement::Filter;
    let r = &spec.resources;
    let p = &spec.placement;
    let mut w = BTreeMap::new();
    if r.gpus > 0 {
        let product = match r.gpu_products.as_slice() {
            [] => "any GPU".to_string(),
            [one] => one.clone(),
            many => many.join(" or "),
        };
        let gpu = format!("{} x {product}", r.gpus);
        w.insert(Filter::NoGpu, gpu.clone());
        w.insert(Filter::GpuProduct, gpu.clone());
        w.insert(Filter::Gpus, gpu);
        if let Some(m) = &r.gpu_memory {
            w.insert(Filter::GpuMemory, format!("{} per GPU", m.as_string()));
        }
    }
    if let Some(c) = &r.cpu {
        w.insert(Filter::Cpu, format!("{} CPU", c.as_string()));
    }
    if let Some(m) = &r.memory {
        w.insert(Filter::Memory, format!("{} memory", m.as_string()));
    }
    if !p.required_labels.is_empty() {
        let labels: Vec<String> = p
            .required_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        w.insert(Filter::Labels, format!("label {}", labels.join(", ")));
    }
    if let Some(d) = spec
        .workload
        .dataset
        .as_ref()
        .and_then(|d| d.node_local.as_ref())
    {
        w.insert(Filter::Dataset, format!("node-local dataset {d}"));
    }
    let mut topology = Vec::new();
    if !p.regions.is_empty() {
        topology.push(format!("region {}", p.regions.join(" or ")));
    }
    if !p.zones.is_empty() {
        topology.push(format!("zone {}", p.zones.join(" or ")));
    }
    if !topology.is_empty() {
        w.insert(Filter::Topology, topology.join(", "));
    }
    w
}

/// Whether a label selector matches labels (matchLabels and matchExpressions).
pub fn selector_matches(
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    let labels_ok = sel
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let exprs_ok = sel.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let values = e.values.clone().unwrap_or_default();
            let v = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => v.is_some_and(|v| values.contains(v)),
                "NotIn" => v.is_none_or(|v| !values.contains(v)),
                "Exists" => v.is_some(),
                "DoesNotExist" => v.is_none(),
                _ => false,
            }
        })
    });
    labels_ok && exprs_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{NodeEntry, TaskEntry};
    use edgeloom_crds::compute_task::ComputeTaskStatus;
    use edgeloom_crds::edge_pool::MemberCluster;
    use edgeloom_crds::inventory::NodeInventory;
    use jiff::SignedDuration;

    fn pool_spec(clusters: &[&str]) -> Arc<EdgePoolSpec> {
        let clusters: Vec<serde_json::Value> = clusters
            .iter()
            .map(|c| serde_json::json!({"name": c, "local": true, "region": "eu-1", "labels": {"tier": c}}))
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({"clusters": clusters, "maxTasksPerNode": 2, "rewards": {"perGpuSecond": "0.001", "perCpuCoreSecond": "0.0001", "unit": "credits"}}))
                .expect("pool spec"),
        )
    }

    fn client() -> kube::Client {
        kube::Client::try_from(kube::Config::new(
            "http://127.0.0.1:9".parse().expect("url"),
        ))
        .expect("client")
    }

    fn member(name: &str, spec: &Arc<EdgePoolSpec>) -> Arc<Member> {
        let cluster: MemberCluster = spec
            .clusters
            .iter()
            .find(|c| c.name == name)
            .cloned()
            .expect("cluster");
        let m = Member::detached(
            "edge",
            spec.clone(),
            cluster,
            client(),
            Duration::from_millis(5),
        );
        m.nodes.mark_ready();
        m.leases.mark_ready();
        m.tasks.mark_ready();
        Arc::new(m)
    }

    fn node(name: &str, labels: &[(&str, &str)], gpus: u32, tflops: f64) -> NodeEntry {
        NodeEntry {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (Box::from(*k), Box::from(*v)))
                .collect(),
            inventory: NodeInventory {
                agent: true,
                cpu_cores: 4,
                memory_mib: 8192,
                gpus,
                gpu_product: (gpus > 0).then(|| "NVIDIA L4".to_string()),
                gpu_memory_mib: if gpus > 0 { 24_000 } else { 0 },
                tflops,
                price_factor: 1.0,
                ..NodeInventory::default()
            },
        }
    }

    fn task(name: &str, node: &str, phase: Option<TaskPhase>) -> TaskEntry {
        TaskEntry {
            name: name.into(),
            job_namespace: "ns".into(),
            job_name: "j".into(),
            job_uid: "uid".into(),
            pool: "edge".into(),
            shard: 0,
            replica: 0,
            attempt: 1,
            node: node.into(),
            cpu_millis: 1000,
            memory_mib: 1024,
            gpus: 0,
            status: phase.map(|p| {
                Box::new(ComputeTaskStatus {
                    phase: Some(p),
                    ..ComputeTaskStatus::default()
                })
            }),
            nonce: None,
            reveal_requested_at: None,
            dispatched_at: None,
        }
    }

    /// A snapshot's nodes with names instead of symbols (two interners number alike
    /// strings differently), in score order.
    fn described(w: &World) -> Vec<String> {
        let names = |syms: &[u32]| {
            let mut v: Vec<&str> = syms.iter().map(|s| w.interner.name(*s)).collect();
            v.sort_unstable();
            v.join(",")
        };
        w.snapshot
            .order
            .iter()
            .map(|&i| {
                let n = &w.snapshot.nodes[i as usize];
                format!(
                    "{:?} c{} ready={} slots={}/{} cpu={} mem={} gpus={} product={:?} labels=[{}] region={:?} score={:.6}",
                    w.node_name(i),
                    n.cluster,
                    n.ready,
                    n.free_slots,
                    n.total_slots,
                    n.free_cpu_millis,
                    n.free_memory_mib,
                    n.free_gpus,
                    n.gpu_product.map(|p| w.interner.name(p)),
                    names(&n.labels),
                    n.region.map(|r| w.interner.name(r)),
                    n.score
                )
            })
            .collect()
    }

    /// The incremental snapshot (rebuilding only what changed) equals one built from
    /// nothing, through heartbeats, tasks starting and finishing, nodes joining, leaving
    /// and relabelled, a quarantine and a pool spec change.
    #[tokio::test]
    async fn an_incremental_snapshot_equals_one_built_from_nothing() {
        let spec = pool_spec(&["a", "b"]);
        let members = vec![member("a", &spec), member("b", &spec)];
        let now = Timestamp::now();
        let kept = Scheduler::default();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..300 {
            let m = &members[rand(2) as usize];
            let i = rand(12);
            let name = format!("{}-n{i}", m.spec.name);
            match rand(8) {
                0 | 1 => m.leases.upsert(
                    &name,
                    crate::cache::Heartbeat::at(now - SignedDuration::from_secs(rand(60) as i64)),
                ),
                2 => m.nodes.upsert(
                    &name,
                    node(
                        &name,
                        &[("zone", if rand(2) == 0 { "x" } else { "y" })],
                        rand(2) as u32,
                        rand(100) as f64 / 10.0,
                    ),
                ),
                3 => m.tasks.upsert(
                    &format!("t{round}"),
                    task(&format!("t{round}"), &name, Some(TaskPhase::Running)),
                ),
                4 => m.tasks.upsert(
                    &format!("t{}", rand(round + 1)),
                    task(
                        "t",
                        &name,
                        Some(if rand(2) == 0 {
                            TaskPhase::Succeeded
                        } else {
                            TaskPhase::Failed
                        }),
                    ),
                ),
                5 => {
                    kept.set_quarantined("edge", HashSet::from([format!("{}/{name}", m.spec.name)]))
                }
                6 => {
                    let mut s = (*m.pool_spec()).clone();
                    s.max_tasks_per_node = 1 + rand(3) as u32;
                    *m.pool_spec.write().expect("spec") = Arc::new(s);
                }
                _ => kept.set_quarantined("edge", HashSet::new()),
            }
            let fresh = Scheduler::default();
            if let Ok(q) = kept.quarantine.lock() {
                for (pool, nodes) in q.iter() {
                    fresh.set_quarantined(pool, nodes.clone());
                }
            }
            let incremental = kept.world(&members, now, &[]);
            let scratch = fresh.world(&members, now, &[]);
            assert_eq!(
                described(&incremental),
                described(&scratch),
                "round {round}"
            );
        }
        let rebuilds = kept.derived.lock().expect("derived").rebuilds;
        assert!(
            rebuilds < 2 * 300,
            "bases are rebuilt only when their inputs change: {rebuilds}"
        );
    }

    /// An unplaceable job is not tried again while neither it nor the capacity changed;
    /// once a node that fits joins, it is.
    #[tokio::test]
    async fn an_unplaceable_verdict_is_kept_until_capacity_grows() {
        let spec = pool_spec(&["a", "b"]);
        let m = member("a", &spec);
        let other = member("b", &spec);
        let now = Timestamp::now();
        m.nodes.upsert("a-n0", node("a-n0", &[], 0, 1.0));
        m.leases.upsert("a-n0", crate::cache::Heartbeat::at(now));
        let fleet = Fleet::new(futures::channel::mpsc::unbounded().0);
        fleet.insert_for_tests(m.clone());
        fleet.insert_for_tests(other.clone());
        let metrics = Metrics::new().expect("metrics");
        let s = Scheduler::default();
        let job: ComputeJobSpec = serde_json::from_value(serde_json::json!({
            "workload": {"kind": "Benchmark"}, "shards": 1,
            "resources": {"gpus": 1}
        }))
        .expect("spec");
        s.submit(Work {
            namespace: "ns".into(),
            name: "gpu".into(),
            uid: "uid-gpu".into(),
            priority: 0,
            created: 0,
            spec: Arc::new(job),
            needs: vec![Need {
                shard: 0,
                replica: 0,
                attempt: 1,
                avoid: vec![],
            }],
            used: vec![],
            replicas: BTreeMap::new(),
            members: vec![m.key.clone()].into(),
            gang: false,
            finished_seen: None,
        });
        s.cycle(&fleet, None, &metrics, "op").await;
        let why = s.unfit("ns", "gpu").expect("unplaceable");
        assert!(why.contains("1 have no GPU"), "{why}");
        assert_eq!(metrics.verdicts_reused.get(), 0);
        // Heartbeats and a busier node change nothing that could make it fit.
        m.leases.upsert(
            "a-n0",
            crate::cache::Heartbeat::at(now + SignedDuration::from_secs(1)),
        );
        m.tasks
            .upsert("t1", task("t1", "a-n0", Some(TaskPhase::Running)));
        s.cycle(&fleet, None, &metrics, "op").await;
        s.cycle(&fleet, None, &metrics, "op").await;
        assert_eq!(metrics.verdicts_reused.get(), 2, "not tried again");
        assert_eq!(s.unfit("ns", "gpu").as_deref(), Some(why.as_str()));
        // A task ends on the GPU-less node: capacity grew, but only where the job cannot
        // fit, so it is still not tried.
        m.tasks
            .upsert("t1", task("t1", "a-n0", Some(TaskPhase::Succeeded)));
        s.cycle(&fleet, None, &metrics, "op").await;
        assert_eq!(metrics.verdicts_reused.get(), 3, "a node that cannot help");
        // A GPU node joins another cluster, one the job may not use: still not tried.
        other.nodes.upsert("b-n0", node("b-n0", &[], 1, 1.0));
        other
            .leases
            .upsert("b-n0", crate::cache::Heartbeat::at(now));
        s.cycle(&fleet, None, &metrics, "op").await;
        assert_eq!(metrics.verdicts_reused.get(), 4, "a node elsewhere");
        // A GPU node joins: capacity grew, the job is tried (and placed; creating its
        // task fails here, there is no API server, and is retried).
        m.nodes.upsert("a-n1", node("a-n1", &[], 1, 1.0));
        m.leases.upsert("a-n1", crate::cache::Heartbeat::at(now));
        s.cycle(&fleet, None, &metrics, "op").await;
        assert_eq!(metrics.verdicts_reused.get(), 4, "tried again");
        assert_eq!(s.unfit("ns", "gpu"), None);
    }

    /// Task slots are the agent's claim: an agent that claims a thousand runs no more
    /// than the pool allows, and one that runs one task at a time is never given two.
    #[test]
    fn an_agent_claiming_more_slots_gets_at_most_the_pools_cap() {
        assert_eq!(task_slots(1000, 2), 2);
        assert_eq!(task_slots(1, 2), 1);
        assert_eq!(
            task_slots(0, 2),
            2,
            "an agent that says nothing: the pool's number"
        );
    }
}
