//! A simulated node agent for operator tests, until the real agent runs in e2e: it
//! publishes each node's inventory, renews its heartbeat Lease, claims the node's
//! ComputeTasks and completes them after a delay with a deterministic digest. Nodes can be
//! "killed" (heartbeat and work stop) and made to fail their tasks.

use edgeloom_crds::TaskPhase;
use edgeloom_crds::commitment;
use edgeloom_crds::compute_task::{ComputeTask, ComputeTaskStatus, NODE_LABEL, Usage};
use edgeloom_crds::inventory::{ACCOUNT_LABEL, ARCH_LABEL, NodeInventory, SYSTEM_NAMESPACE};
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// CPU core-milliseconds a simulated agent reports for every task (2 core-seconds).
pub const SIM_CPU_CORE_MILLIS: u64 = 2000;

/// Field manager of the simulated agent.
pub const MANAGER: &str = "edgeloom-sim-agent";

/// Behaviour of a simulated node.
#[derive(Clone, Debug)]
pub struct SimNode {
    /// Node name.
    pub name: String,
    /// What it offers.
    pub inventory: NodeInventory,
}

impl SimNode {
    /// A CPU node with 4 cores, 8 GiB and the given account.
    pub fn cpu(name: &str, account: &str) -> SimNode {
        SimNode {
            name: name.into(),
            inventory: NodeInventory {
                agent: true,
                account: Some(account.into()),
                cpu_cores: 4,
                memory_mib: 8192,
                tflops: 0.1,
                ..NodeInventory::default()
            },
        }
    }

    /// The same node, advertising that it runs `slots` tasks at once.
    pub fn with_slots(mut self, slots: u32) -> SimNode {
        self.inventory.task_slots = slots;
        self
    }
}

#[derive(Default)]
struct Control {
    dead: HashSet<String>,
    failing: HashSet<String>,
    /// Nodes that claim their tasks and then never progress nor finish (a hung runner).
    hung: HashSet<String>,
    /// Seconds each node's clock runs ahead (its Lease renew times).
    skew: BTreeMap<String, i64>,
    /// Nodes that write every status field to the schema's limit (a malicious agent).
    filling: HashSet<String>,
    /// Nodes that report wrong results once they have reported this many good ones.
    cheat_after: BTreeMap<String, u32>,
    /// Results reported per node.
    reported: BTreeMap<String, u32>,
}

/// Agents for some nodes of one member cluster, driven by one background task.
pub struct SimAgents {
    control: Arc<Mutex<Control>>,
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for SimAgents {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// The salt of a simulated agent's commitment for task `name` (a real agent's is random).
fn sim_salt(name: &str) -> String {
    hex::encode(Sha256::digest(format!("sim-salt/{name}")))
}

/// The digest a simulated agent reports for a shard: equal for equal (job, shard) on
/// amd64 nodes; on a node of another architecture (label `kubernetes.io/arch`) it differs,
/// as honest results of real hardware of another determinism class do.
pub fn digest(job_uid: &str, shard: u32, arch: &str) -> String {
    if arch == "amd64" || arch.is_empty() {
        hex::encode(Sha256::digest(format!("{job_uid}/{shard}")))
    } else {
        hex::encode(Sha256::digest(format!("{job_uid}/{shard}/{arch}")))
    }
}

impl SimAgents {
    /// Publishes inventories and starts heartbeats and the task loop; each task takes
    /// `work` to finish.
    pub async fn start(
        client: kube::Client,
        nodes: Vec<SimNode>,
        work: Duration,
    ) -> Result<SimAgents, kube::Error> {
        crate::federation::ensure_namespace(&client, SYSTEM_NAMESPACE).await?;
        let node_api: Api<Node> = Api::all(client.clone());
        let mut arch = BTreeMap::new();
        for n in &nodes {
            let a = node_api
                .get(&n.name)
                .await?
                .metadata
                .labels
                .unwrap_or_default()
                .get(ARCH_LABEL)
                .cloned()
                .unwrap_or_default();
            arch.insert(n.name.clone(), a);
            let (mut labels, annotations) = n.inventory.to_metadata();
            // The simulation also plays the platform team, who labels the account (a real
            // agent may not: docs/ARCHITECTURE.md, "Who may write what").
            if let Some(a) = &n.inventory.account {
                labels.insert(ACCOUNT_LABEL.to_string(), a.clone());
            }
            let patch = serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": n.name, "labels": labels, "annotations": annotations}
            });
            node_api
                .patch(
                    &n.name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await?;
        }
        let control = Arc::new(Mutex::new(Control::default()));
        let handle = tokio::spawn(run(client, nodes, arch, work, control.clone()));
        Ok(SimAgents { control, handle })
    }

    /// Stops a node's heartbeat and work, as a crash or network loss would.
    pub fn kill(&self, node: &str) {
        if let Ok(mut c) = self.control.lock() {
            c.dead.insert(node.to_string());
        }
    }

    /// Undoes [`SimAgents::kill`]: the node heartbeats and works again, as an agent
    /// restarted after a crash would (its tasks from before go on where they were).
    pub fn revive(&self, node: &str) {
        if let Ok(mut c) = self.control.lock() {
            c.dead.remove(node);
        }
    }

    /// Makes a node honest for its first `n` results, then cheat (wrong digests): the
    /// "honest until trusted" cheater.
    pub fn cheat_after(&self, node: &str, n: u32) {
        if let Ok(mut c) = self.control.lock() {
            c.cheat_after.insert(node.to_string(), n);
        }
    }

    /// Makes a node claim its tasks and then never progress or finish them, while its
    /// heartbeat goes on.
    pub fn hang(&self, node: &str) {
        if let Ok(mut c) = self.control.lock() {
            c.hung.insert(node.to_string());
        }
    }

    /// Makes a node fill every field of its results to the schema's limit: a 4,096
    /// character message, 64 metrics and 64 summary values under 63-character names, a
    /// 4,096-element vector.
    pub fn fill(&self, node: &str) {
        if let Ok(mut c) = self.control.lock() {
            c.filling.insert(node.to_string());
        }
    }

    /// Undoes [`SimAgents::hang`]: the node finishes its tasks again.
    pub fn resume(&self, node: &str) {
        if let Ok(mut c) = self.control.lock() {
            c.hung.remove(node);
        }
    }

    /// Makes a node's clock run `seconds` ahead: the renew times it writes are that far in
    /// the future.
    pub fn skew_clock(&self, node: &str, seconds: i64) {
        if let Ok(mut c) = self.control.lock() {
            c.skew.insert(node.to_string(), seconds);
        }
    }

    /// Makes a node fail every task it runs.
    pub fn fail(&self, node: &str) {
        if let Ok(mut c) = self.control.lock() {
            c.failing.insert(node.to_string());
        }
    }
}

async fn run(
    client: kube::Client,
    nodes: Vec<SimNode>,
    arch: BTreeMap<String, String>,
    work: Duration,
    control: Arc<Mutex<Control>>,
) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let tasks: Api<ComputeTask> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
    let mut started: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    // The digest each task committed to, revealed when asked.
    let mut committed: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let (dead, failing, hung, skew, filling) = match control.lock() {
            Ok(c) => (
                c.dead.clone(),
                c.failing.clone(),
                c.hung.clone(),
                c.skew.clone(),
                c.filling.clone(),
            ),
            Err(_) => return,
        };
        let now = Timestamp::now();
        for n in nodes.iter().filter(|n| !dead.contains(&n.name)) {
            let clock =
                now + jiff::SignedDuration::from_secs(skew.get(&n.name).copied().unwrap_or(0));
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(n.name.clone()),
                    labels: Some(BTreeMap::from([(
                        "edgeloom.io/heartbeat".to_string(),
                        "agent".to_string(),
                    )])),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(n.name.clone()),
                    renew_time: Some(MicroTime(clock)),
                    lease_duration_seconds: Some(10),
                    ..Default::default()
                }),
            };
            let mut patch = serde_json::to_value(&lease).unwrap_or_default();
            patch["apiVersion"] = "coordination.k8s.io/v1".into();
            patch["kind"] = "Lease".into();
            if let Err(e) = leases
                .patch(
                    &n.name,
                    &PatchParams::apply(MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                tracing::debug!(node = %n.name, error = %e, "simulated heartbeat not written");
            }
        }
        if let Ok(list) = tasks.list(&Default::default()).await {
            for t in list.items {
                let node = t
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(NODE_LABEL))
                    .cloned()
                    .unwrap_or_default();
                if dead.contains(&node) || !nodes.iter().any(|n| n.name == node) {
                    continue;
                }
                let name = t.metadata.name.clone().unwrap_or_default();
                let phase = t.status.as_ref().and_then(|s| s.phase);
                let status = match phase {
                    None | Some(TaskPhase::Pending) => {
                        started.insert(name.clone(), std::time::Instant::now());
                        Some(ComputeTaskStatus {
                            phase: Some(TaskPhase::Running),
                            started_at: Some(Time(now)),
                            ..Default::default()
                        })
                    }
                    Some(TaskPhase::Running) if hung.contains(&node) => None,
                    Some(TaskPhase::Running) => {
                        let since = *started
                            .entry(name.clone())
                            .or_insert_with(std::time::Instant::now);
                        // The operator pays at most the time it saw the task run: a
                        // simulated task runs a second longer than the usage it claims.
                        let at_least = Duration::from_millis(SIM_CPU_CORE_MILLIS + 1000);
                        (since.elapsed() >= work.max(at_least)).then(|| {
                            let mut s = t.status.clone().unwrap_or_default();
                            s.finished_at = Some(Time(now));
                            s.progress = 100;
                            if failing.contains(&node) {
                                s.phase = Some(TaskPhase::Failed);
                                s.message = Some(format!("simulated failure on {node}"));
                            } else {
                                let cheats = control.lock().is_ok_and(|mut c| {
                                    let n = c.reported.entry(node.clone()).or_default();
                                    *n += 1;
                                    let n = *n;
                                    c.cheat_after.get(&node).is_some_and(|after| n > *after)
                                });
                                let d = if cheats {
                                    digest(&t.spec.job.uid, t.spec.shard, "cheat")
                                } else {
                                    digest(&t.spec.job.uid, t.spec.shard, &arch[&node])
                                };
                                committed.insert(name.clone(), d.clone());
                                // Commit–reveal for verified jobs, as the real agent does.
                                match &t.spec.nonce {
                                    Some(nonce) => {
                                        s.phase = Some(TaskPhase::Committed);
                                        s.commitment = Some(commitment::commitment(
                                            nonce,
                                            &d,
                                            &[],
                                            &sim_salt(&name),
                                        ));
                                    }
                                    None => {
                                        s.phase = Some(TaskPhase::Succeeded);
                                        s.result_digest = Some(d);
                                    }
                                }
                                s.usage = Some(Usage {
                                    cpu_core_millis: SIM_CPU_CORE_MILLIS,
                                    wall_millis: work.as_millis() as u64,
                                    ..Usage::default()
                                });
                                s.metrics = BTreeMap::from([(
                                    "accuracy".to_string(),
                                    0.9 + t.spec.shard as f64 * 0.01,
                                )]);
                                if filling.contains(&node) {
                                    let name = |i: usize| {
                                        format!("{node}-{}-{i:0>40}", t.spec.shard)
                                            .chars()
                                            .rev()
                                            .take(63)
                                            .collect::<String>()
                                    };
                                    s.message = Some("m".repeat(4096));
                                    s.metrics = (0..64).map(|i| (name(i), i as f64)).collect();
                                    s.result_summary =
                                        (0..64).map(|i| (name(i), "v".repeat(256))).collect();
                                    if t.spec.nonce.is_none() {
                                        s.result_vector = vec![0.5; 4096];
                                    }
                                }
                            }
                            s
                        })
                    }
                    Some(TaskPhase::Committed)
                        if t.metadata
                            .annotations
                            .as_ref()
                            .and_then(|a| a.get(commitment::REVEAL_ANNOTATION))
                            .is_some() =>
                    {
                        let mut s = t.status.clone().unwrap_or_default();
                        s.phase = Some(TaskPhase::Succeeded);
                        s.result_digest = committed.get(&name).cloned();
                        s.salt = Some(sim_salt(&name));
                        Some(s)
                    }
                    _ => None,
                };
                if let Some(status) = status {
                    let patch = serde_json::json!({
                        "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask", "status": status
                    });
                    let _ = tasks
                        .patch_status(
                            &name,
                            &PatchParams::apply(MANAGER).force(),
                            &Patch::Apply(&patch),
                        )
                        .await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
