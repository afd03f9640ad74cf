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
use edgeloom_crds::TaskPhase;
use edgeloom_crds::commitment;
use edgeloom_crds::compute_job::{ComputeJobSpec, Spread as SpecSpread};
use edgeloom_crds::compute_task::{
    ComputeTask, ComputeTaskSpec, JOB_UID_LABEL, JobReference, NODE_LABEL, TaskLimits,
};
use edgeloom_crds::inventory::{ARCH_LABEL, NodeInventory, OWNER_LABEL};
use jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
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
    pub members: Vec<String>,
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
    notify: Notify,
}

impl Scheduler {
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
        if let Ok(mut p) = self.pending.lock() {
            p.insert(key, work);
        }
        self.notify.notify_one();
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
    pub async fn run(
        self: Arc<Self>,
        fleet: Arc<Fleet>,
        metrics: Metrics,
        identity: String,
        interval: Duration,
    ) {
        loop {
            let _ = tokio::time::timeout(interval, self.notify.notified()).await;
            self.cycle(&fleet, &metrics, &identity).await;
        }
    }

    /// One cycle.
    pub async fn cycle(&self, fleet: &Fleet, metrics: &Metrics, identity: &str) {
        let work: Vec<Work> = self
            .pending
            .lock()
            .map(|p| p.values().cloned().collect())
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
        let quarantine = self
            .quarantine
            .lock()
            .map(|q| q.clone())
            .unwrap_or_default();
        let speeds = self.speeds.lock().map(|s| s.clone()).unwrap_or_default();
        let mut world = World::build(&members, now, &in_flight, &quarantine, &speeds);
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
        for Waiting { key: work, .. } in queue::order(waiting) {
            let job_key = format!("{}/{}", work.namespace, work.name);
            // No verdict before the job's member caches are filled: an empty cache is not
            // an empty cluster.
            let cold = work.members.is_empty()
                || members
                    .iter()
                    .filter(|m| work.members.contains(&m.key))
                    .any(|m| !m.synced() && !m.lost(now));
            if cold {
                continue;
            }
            if let Some(seen) = work.finished_seen {
                let finished: usize = members
                    .iter()
                    .filter(|m| work.members.contains(&m.key))
                    .map(|m| {
                        m.tasks
                            .state()
                            .iter()
                            .filter(|t| *t.job_uid == *work.uid && t.terminal())
                            .count()
                    })
                    .sum();
                if finished > seen {
                    continue;
                }
            }
            let started = Instant::now();
            let (request, slots) = world.request(&work);
            let outcome = placement::place(&mut world.snapshot, &request);
            metrics
                .placement_duration
                .observe(started.elapsed().as_secs_f64());
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
            let creates = outcome.assigned.iter().map(|(slot, node)| {
                let need = &slots[*slot];
                let (member_key, node_name) = world.node_names[*node as usize].clone();
                let member = members.iter().find(|m| m.key == member_key).cloned();
                let task = build_task(&work, need, &member_key, &node_name, identity);
                async move {
                    let member = member?;
                    let name = task.metadata.name.clone().unwrap_or_default();
                    // Bounded, so that one slow member never stalls the cycle for all jobs.
                    let api = member.tasks_api();
                    let params = PostParams::default();
                    let call = api.create(&params, &task);
                    match tokio::time::timeout(Duration::from_secs(5), call).await {
                        Ok(Ok(_)) => Some((true, member_key, node_name, name)),
                        Ok(Err(kube::Error::Api(s))) if s.code == 409 => Some((false, member_key, node_name, name)),
                        Ok(Err(e)) => {
                            tracing::warn!(task = %name, member = %member_key, error = %e, "creating task failed; will retry");
                            None
                        }
                        Err(_) => {
                            tracing::warn!(task = %name, member = %member_key, "creating task timed out; will retry");
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
                .map(|((slot, node), _)| {
                    (slots[*slot].shard, world.node_names[*node as usize].clone())
                })
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

fn build_task(work: &Work, need: &Need, member: &str, node: &str, identity: &str) -> ComputeTask {
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
            // Replicated results are committed before they are revealed.
            nonce: spec
                .verification
                .as_ref()
                .is_some_and(|v| v.replicas > 1)
                .then(|| commitment::nonce(&work.uid, need.shard, need.replica, need.attempt)),
        },
        status: None,
    }
}

/// The snapshot of every member's nodes plus the names behind its indices.
pub struct World {
    /// The placement snapshot.
    pub snapshot: Snapshot,
    /// Interned strings.
    pub interner: Interner,
    /// (member key, node name) per node index.
    pub node_names: Vec<(String, String)>,
    index: HashMap<(String, String), u32>,
    member_index: HashMap<String, u32>,
}

impl World {
    /// Builds the snapshot from the members' caches at `now`.
    fn build(
        members: &[Arc<Member>],
        now: Timestamp,
        in_flight: &[InFlight],
        quarantine: &HashMap<String, HashSet<String>>,
        speeds: &HashMap<String, HashMap<String, u32>>,
    ) -> World {
        let mut interner = Interner::default();
        let mut nodes = Vec::new();
        let mut node_names = Vec::new();
        let mut index = HashMap::new();
        let mut member_index = HashMap::new();
        let mut reachable = Vec::new();
        let mut raw: Vec<(NodeInventory, f64, f64)> = Vec::new(); // inventory, reliability, latency secs
        let mut whose: Vec<(String, String)> = Vec::new(); // (pool, "cluster/node") of each raw
        for (ci, m) in members.iter().enumerate() {
            member_index.insert(m.key.clone(), ci as u32);
            let health = m.health();
            reachable.push(health.reachable);
            let pool = m.pool_spec();
            let selector = pool.node_selector.as_ref();
            // Usage and history per node from the member's tasks.
            let mut used: HashMap<String, (u32, u64, u64, u32)> = HashMap::new();
            let mut history: HashMap<String, (u32, u32)> = HashMap::new();
            for t in m.tasks.state() {
                let node = t.node.to_string();
                if t.busy() {
                    let e = used.entry(node).or_default();
                    e.0 += 1;
                    e.1 += t.cpu_millis;
                    e.2 += t.memory_mib;
                    e.3 += t.gpus;
                } else {
                    let e = history.entry(node).or_default();
                    match t.status.as_ref().and_then(|s| s.phase) {
                        Some(TaskPhase::Succeeded) => e.0 += 1,
                        Some(TaskPhase::Failed) => e.1 += 1,
                        _ => {}
                    }
                }
            }
            for f in in_flight.iter().filter(|f| f.member == m.key) {
                let e = used.entry(f.node.clone()).or_default();
                e.0 += 1;
                e.1 += f.cpu_millis;
                e.2 += f.memory_mib;
                e.3 += f.gpus;
            }
            let region = m.spec.region.as_deref().map(|r| interner.intern(r));
            let zone = m.spec.zone.as_deref().map(|z| interner.intern(z));
            let quarantined = quarantine.get(&m.pool);
            for entry in m.nodes.state() {
                let name = entry.name.to_string();
                if let Some(sel) = selector
                    && !selector_matches(sel, &entry.label_map())
                {
                    continue;
                }
                if quarantined.is_some_and(|q| q.contains(&format!("{}/{name}", m.spec.name))) {
                    continue;
                }
                let inv = entry.inventory.clone();
                let (slots, cpu, mem, gpus) = used.get(&name).copied().unwrap_or_default();
                let pairs = entry.labels.iter().map(|(k, v)| format!("{k}={v}"));
                let cluster_pairs = m.spec.labels.iter().map(|(k, v)| format!("{k}={v}"));
                let mut label_syms: Vec<u32> = pairs
                    .chain(cluster_pairs)
                    .map(|kv| interner.intern(&kv))
                    .collect();
                label_syms.sort_unstable();
                label_syms.dedup();
                let mut datasets: Vec<u32> =
                    inv.datasets.iter().map(|d| interner.intern(d)).collect();
                datasets.sort_unstable();
                let (ok, failed) = history.get(&name).copied().unwrap_or_default();
                let reliability = (ok as f64 + 1.0) / ((ok + failed) as f64 + 2.0);
                let idx = nodes.len() as u32;
                let cap = task_slots(inv.task_slots, pool.max_tasks_per_node);
                nodes.push(placement::Node {
                    cluster: ci as u32,
                    ready: m.node_ready(&name, now),
                    free_slots: cap.saturating_sub(slots),
                    total_slots: cap,
                    free_cpu_millis: (inv.cpu_cores as u64 * 1000).saturating_sub(cpu),
                    free_memory_mib: inv.memory_mib.saturating_sub(mem),
                    free_gpus: inv.gpus.saturating_sub(gpus),
                    gpu_memory_mib: inv.gpu_memory_mib,
                    gpu_product: inv.gpu_product.as_deref().map(|p| interner.intern(p)),
                    labels: label_syms,
                    datasets,
                    region,
                    zone,
                    account: inv.account.as_deref().map(|a| interner.intern(a)),
                    owner: entry
                        .labels
                        .iter()
                        .find(|(k, _)| &**k == OWNER_LABEL)
                        .map(|(_, v)| interner.intern(&format!("owner:{v}"))),
                    arch: entry
                        .labels
                        .iter()
                        .find(|(k, _)| &**k == ARCH_LABEL)
                        .map(|(_, v)| interner.intern(v)),
                    score: 0.0,
                });
                raw.push((
                    inv,
                    reliability,
                    health.latency.map(|l| l.as_secs_f64()).unwrap_or(1.0),
                ));
                whose.push((m.pool.clone(), format!("{}/{name}", m.spec.name)));
                index.insert((m.key.clone(), name.clone()), idx);
                node_names.push((m.key.clone(), name));
            }
        }
        // Speed is the agent's claim: it counts only as far as verified work shows.
        let mut claims: HashMap<&str, Vec<f64>> = HashMap::new();
        for ((inv, _, _), (pool, _)) in raw.iter().zip(&whose) {
            claims.entry(pool.as_str()).or_default().push(inv.tflops);
        }
        let medians: HashMap<&str, f64> = claims
            .into_iter()
            .map(|(pool, v)| (pool, trust::median_claim(v)))
            .collect();
        for ((inv, _, _), (pool, key)) in raw.iter_mut().zip(&whose) {
            inv.tflops = trust::verified_tflops(
                inv.tflops,
                medians.get(pool.as_str()).copied().unwrap_or(0.0),
                speeds.get(pool).and_then(|s| s.get(key)).copied(),
            );
        }
        let max_tflops = raw.iter().map(|r| r.0.tflops).fold(0.0, f64::max);
        let min_latency = raw.iter().map(|r| r.2).fold(f64::INFINITY, f64::min);
        for (n, (inv, reliability, latency)) in nodes.iter_mut().zip(&raw) {
            n.score = placement::score(ScoreInputs {
                speed: if max_tflops > 0.0 {
                    inv.tflops / max_tflops
                } else {
                    0.0
                },
                reliability: *reliability,
                price_factor: inv.price_factor,
                locality: if *latency > 0.0 {
                    (min_latency / latency).min(1.0)
                } else {
                    1.0
                },
            });
        }
        World {
            snapshot: Snapshot::new(nodes, reachable),
            interner,
            node_names,
            index,
            member_index,
        }
    }

    /// Translates a job's work into a placement request (and the needs by slot index).
    fn request(&mut self, work: &Work) -> (Request, Vec<Need>) {
        let spec = &work.spec;
        let lookup = |k: &(String, String)| self.index.get(k).copied();
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
