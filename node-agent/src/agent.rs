//! The agent's loop (docs/ARCHITECTURE.md, "The agent"): measure the node, publish its
//! inventory on the Node, renew the heartbeat Lease, and run this node's ComputeTasks, at
//! most `maxTasks` at a time: claim (status Running), run edgeloom-runner, report progress
//! every few seconds and a final status with metrics, usage and the result digest. A task
//! of a verified job (a nonce in its spec) first reports only a commitment to its result
//! (phase Committed) and reveals the result when the operator asks. A deleted task is
//! cancelled; on SIGTERM running tasks get a grace period, then are cancelled.

use crate::config::Config;
use crate::execution::{self, Execution, Limits, Outcome};
use crate::metrics::Metrics;
use crate::model_source;
use crate::outbox;
use crate::probe::{self, Gpus};
use crate::sealed::{self, Sealed};
use edgeloom_crds::TaskPhase;
use edgeloom_crds::commitment::{self, REVEAL_ANNOTATION};
use edgeloom_crds::compute_task::{ComputeTask, ComputeTaskStatus, JOB_UID_LABEL};
use edgeloom_crds::inventory::{
    CHECKPOINTS_ANNOTATION, CHECKPOINTS_CONFIGMAP, NodeInventory, SYSTEM_NAMESPACE,
};
use edgeloom_crds::runner_protocol::Spec as RunnerSpec;
use edgeloom_crds::workload::{Workload, WorkloadKind, WorkloadParameters};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// The latest progress a runner reported: percent and note.
type Progress = (u8, Option<String>);

/// Keeps `new`, a ledger checkpoint of `pool` the hub shows, if its signature holds (by
/// the key of the checkpoint kept before, once there is one) and it extends the one kept
/// (larger); the same one again changes nothing; a smaller one, another root at the same
/// size, or one that is not signed by the pinned key is refused (the history shown before
/// was truncated or rewritten, or the checkpoint forged).
pub fn keep_checkpoint(
    kept: &mut serde_json::Map<String, serde_json::Value>,
    pool: String,
    new: serde_json::Value,
) -> Result<(), String> {
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    let pinned = kept.get(&pool).map(|old| text(old, "publicKey"));
    if text(&new, "pool") != pool {
        return Err(format!(
            "a checkpoint of pool {} published as pool {pool}",
            text(&new, "pool")
        ));
    }
    edgeloom_crds::checkpoint::verify(
        &pool,
        new["size"].as_u64().unwrap_or(0),
        &text(&new, "root"),
        &text(&new, "time"),
        &text(&new, "publicKey"),
        &text(&new, "signature"),
        pinned.as_deref(),
    )
    .map_err(|e| {
        format!("pool {pool}: the hub shows a ledger checkpoint that does not verify: {e}")
    })?;
    let size = |v: &serde_json::Value| v["size"].as_u64().unwrap_or(0);
    match kept.get(&pool) {
        Some(old)
            if size(&new) < size(old)
                || (size(&new) == size(old) && new["root"] != old["root"]) =>
        {
            Err(format!(
                "pool {pool}: the hub shows a ledger checkpoint of {} entries (root {}) that does not extend the one of {} entries (root {}) this node kept: history may have been rewritten",
                size(&new),
                new["root"],
                size(old),
                old["root"]
            ))
        }
        Some(old) if size(&new) == size(old) => Ok(()),
        _ => {
            kept.insert(pool, new);
            Ok(())
        }
    }
}

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "edgeloom-agent";

/// The agent of one node.
pub struct Agent {
    client: kube::Client,
    config: Config,
    gpus: Gpus,
    /// Its metrics.
    pub metrics: Metrics,
    /// Set once the inventory is published.
    pub ready: Arc<AtomicBool>,
    running: Mutex<HashMap<String, watch::Sender<Option<String>>>>,
    /// The latest signed ledger checkpoint seen of each pool (kept on the Lease).
    checkpoints: tokio::sync::Mutex<Option<serde_json::Map<String, serde_json::Value>>>,
    /// The operator's public key for sealed reveals, once read.
    reveal_key: tokio::sync::Mutex<Option<String>>,
    /// Tasks this agent has revealed: the task watch may still show them Committed for a
    /// moment, and their sealed result is gone by then (not lost).
    revealed: Mutex<std::collections::HashSet<String>>,
    /// Tasks whose phase the operator finished while they ran (e.g. failed for making no
    /// progress): their runner is stopped and nothing is reported over that verdict.
    stopped: Mutex<std::collections::HashSet<String>>,
    stopping: AtomicBool,
    wake: Notify,
    /// The node's X25519 key: the operator seals a Federated task's URLs to its public
    /// half (published on the Node), so no other agent can read them.
    box_secret: crypto_box::SecretKey,
}

impl Agent {
    /// A new agent; nothing runs until [`Agent::run`].
    pub fn new(client: kube::Client, config: Config, metrics: Metrics) -> Agent {
        let config_work_dir = config.work_dir.clone();
        Agent {
            client,
            gpus: Gpus::init(),
            config,
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
            running: Mutex::new(HashMap::new()),
            checkpoints: tokio::sync::Mutex::new(None),
            reveal_key: tokio::sync::Mutex::new(None),
            revealed: Mutex::new(std::collections::HashSet::new()),
            stopped: Mutex::new(std::collections::HashSet::new()),
            stopping: AtomicBool::new(false),
            wake: Notify::new(),
            box_secret: crate::federated::box_key(&config_work_dir),
        }
    }

    fn tasks_api(&self) -> Api<ComputeTask> {
        Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE)
    }

    /// Runs the node's Benchmark once to measure TFLOP/s (0 when skipped or failing).
    async fn measure(&self) -> f64 {
        if self.config.benchmark_matrix_size == 0 {
            return 0.0;
        }
        let spec = RunnerSpec {
            workload: Workload {
                kind: WorkloadKind::Benchmark,
                model: None,
                dataset: None,
                parameters: WorkloadParameters {
                    matrix_size: self.config.benchmark_matrix_size,
                    deterministic: false,
                    ..WorkloadParameters::default()
                },
                federation: None,
            },
            shard: 0,
            shards: 1,
            model_path: None,
            data_path: None,
            device: Some(
                if self.gpus.read().is_empty() {
                    "cpu"
                } else {
                    "auto"
                }
                .to_string(),
            ),
            threads: None,
            checkpoint_dir: None,
            federated: None,
        };
        let (_tx, rx) = watch::channel(None);
        let log = self.config.work_dir.join("benchmark.log");
        let run = execution::execute(
            &self.config.runner,
            &spec,
            &Limits {
                timeout: Some(Duration::from_secs(120)),
                memory_mib: None,
            },
            &log,
            |_, _| {},
            rx,
        )
        .await;
        match run.outcome {
            Outcome::Succeeded { metrics, .. } => {
                let t = metrics.get("tflops").copied().unwrap_or(0.0);
                tracing::info!(tflops = t, gpu = run.gpu, "measured this node");
                t
            }
            other => {
                tracing::warn!(outcome = ?other, "the start-up benchmark failed; publishing 0 TFLOP/s");
                0.0
            }
        }
    }

    /// Publishes the node's inventory as labels and annotations of its Node.
    async fn publish(&self, tflops: f64) -> Result<(), kube::Error> {
        let gpus = self.gpus.read();
        let inv = NodeInventory {
            agent: true,
            account: None,
            gpu_product: gpus.first().map(|g| g.name.clone()),
            gpus: gpus.len() as u32,
            gpu_memory_mib: gpus.iter().map(|g| g.memory_total_mib).min().unwrap_or(0),
            cpu_cores: self.config.cpu_cores.unwrap_or_else(probe::cpu_cores),
            memory_mib: self.config.memory_mib.unwrap_or_else(probe::memory_mib),
            tflops,
            datasets: self.config.datasets.keys().cloned().collect(),
            price_factor: self.config.price_factor,
            task_slots: self.config.max_tasks.min(u32::MAX as usize) as u32,
            box_key: Some(edgeloom_crds::commitment::public_hex(&self.box_secret)),
        };
        let (labels, annotations) = inv.to_metadata();
        let node = &self.config.node;
        let patch = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": labels, "annotations": annotations}
        });
        Api::<Node>::all(self.client.clone())
            .patch(
                node,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        self.metrics.tflops.set(tflops);
        tracing::info!(node = %node, gpus = inv.gpus, cpu = inv.cpu_cores, datasets = ?inv.datasets, "published inventory");
        Ok(())
    }

    /// Keeps the latest ledger checkpoint of each pool that the operator publishes in this
    /// cluster: a checkpoint replaces the kept one only if it is larger, and one that is
    /// smaller or has another root at the same size (history rewritten) is refused, logged
    /// and counted. Returns what is kept, as JSON for the Lease.
    async fn record_checkpoints(&self, api: &Api<Lease>) -> Option<String> {
        let mut kept = self.checkpoints.lock().await;
        if kept.is_none() {
            // After a restart: what this agent kept before, from its own Lease.
            let before = api
                .get_opt(&self.config.node)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.metadata.annotations)
                .and_then(|a| a.get(CHECKPOINTS_ANNOTATION).cloned())
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            *kept = Some(before);
        }
        let kept = kept.as_mut()?;
        let mut shown = self.published().await;
        // The operator's reveal key comes with the checkpoints: keep it for reveals.
        if let Some(k) = shown.remove(commitment::REVEAL_KEY_FIELD) {
            *self.reveal_key.lock().await = Some(k);
        }
        for (pool, text) in shown {
            let Ok(new) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if let Err(why) = keep_checkpoint(kept, pool, new) {
                self.metrics.checkpoint_conflicts.inc();
                tracing::error!(%why, "keeping the old ledger checkpoint as evidence");
            }
        }
        (!kept.is_empty()).then(|| serde_json::Value::Object(kept.clone()).to_string())
    }

    async fn heartbeat(&self) {
        let node = &self.config.node;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), SYSTEM_NAMESPACE);
        let duration = (self.config.heartbeat_seconds * 4) as i32;
        let mut metadata =
            serde_json::json!({"name": node, "labels": {"edgeloom.io/heartbeat": "agent"}});
        if let Some(kept) = self.record_checkpoints(&api).await {
            metadata["annotations"] = serde_json::json!({CHECKPOINTS_ANNOTATION: kept});
        }
        let patch = serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": metadata,
            "spec": {"holderIdentity": node, "leaseDurationSeconds": duration, "renewTime": MicroTime(Timestamp::now())}
        });
        match api
            .patch(
                node,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(_) => self.metrics.heartbeats.inc(),
            Err(e) => {
                self.metrics.heartbeat_failures.inc();
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }

    async fn set_status(&self, name: &str, status: &ComputeTaskStatus) -> Result<(), kube::Error> {
        let patch = serde_json::json!({"apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask", "status": status});
        self.tasks_api()
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map(|_| ())
    }

    /// Fails tasks this node was running before the agent restarted: their runner died
    /// with the previous agent process.
    async fn fail_orphans(&self, store: &Store<ComputeTask>) {
        for t in store.state() {
            let status = t.status.clone().unwrap_or_default();
            if t.spec.node_name == self.config.node
                && status.phase == Some(TaskPhase::Running)
                && !self.is_running(&t.name_any())
                && !outbox::holds(&self.outbox_dir(), &t.name_any())
            {
                let mut s = status;
                s.phase = Some(TaskPhase::Failed);
                s.finished_at = Some(Time(Timestamp::now()));
                s.message = Some("the agent restarted while this task ran".into());
                let _ = self.set_status(&t.name_any(), &s).await;
            }
        }
    }

    fn is_running(&self, name: &str) -> bool {
        self.running
            .lock()
            .map(|r| r.contains_key(name))
            .unwrap_or(false)
    }

    fn running_count(&self) -> usize {
        self.running.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Claims and starts pending tasks of this node while there is room.
    async fn claim(self: &Arc<Self>, store: &Store<ComputeTask>) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let mut pending: Vec<Arc<ComputeTask>> = store
            .state()
            .into_iter()
            .filter(|t| t.spec.node_name == self.config.node)
            .filter(|t| {
                matches!(
                    t.status.as_ref().and_then(|s| s.phase),
                    None | Some(TaskPhase::Pending)
                )
            })
            .filter(|t| !self.is_running(&t.name_any()))
            .collect();
        pending.sort_by_key(|t| t.metadata.creation_timestamp.as_ref().map(|c| c.0));
        for task in pending {
            if self.running_count() >= self.config.max_tasks {
                return;
            }
            let name = task.name_any();
            let claimed = ComputeTaskStatus {
                phase: Some(TaskPhase::Running),
                started_at: Some(Time(Timestamp::now())),
                message: Some(format!("running on {}", self.config.node)),
                ..Default::default()
            };
            if let Err(e) = self.set_status(&name, &claimed).await {
                tracing::debug!(task = %name, error = %e, "claim failed");
                continue;
            }
            let (tx, rx) = watch::channel(None);
            if let Ok(mut r) = self.running.lock() {
                r.insert(name.clone(), tx);
            }
            self.metrics.running.set(self.running_count() as i64);
            let agent = self.clone();
            tokio::spawn(async move {
                agent.run_task(task, claimed, rx).await;
                if let Ok(mut r) = agent.running.lock() {
                    r.remove(&name);
                }
                if let Ok(mut s) = agent.stopped.lock() {
                    s.remove(&name);
                }
                agent.metrics.running.set(agent.running_count() as i64);
                agent.wake.notify_one();
            });
        }
    }

    #[tracing::instrument(skip_all, fields(task = %task.name_any()))]
    async fn run_task(
        &self,
        task: Arc<ComputeTask>,
        mut status: ComputeTaskStatus,
        cancel: watch::Receiver<Option<String>>,
    ) {
        if self.config.copy_peers {
            return self.copy_peer(&task, status, cancel).await;
        }
        let name = task.name_any();
        let spec = &task.spec;
        let workload = &spec.workload;
        let data_path = match workload
            .dataset
            .as_ref()
            .and_then(|d| d.node_local.as_ref())
        {
            Some(ds) => match self.config.datasets.get(ds) {
                Some(p) => Some(p.display().to_string()),
                None => {
                    return self
                        .fail_before_run(
                            &task,
                            status,
                            format!("node {} holds no dataset {ds}", self.config.node),
                        )
                        .await;
                }
            },
            None => None,
        };
        let model_path = match workload.model.as_ref() {
            Some(source) => match model_source::fetch(
                &self.client,
                source,
                &spec.model_downloads,
                &self.config.work_dir.join("models"),
            )
            .await
            {
                Ok(path) => path.map(|p| p.display().to_string()),
                Err(e) => {
                    return self.fail_before_run(&task, status, e.to_string()).await;
                }
            },
            None => None,
        };
        // A Federated task's inputs come from the store first (docs/ARCHITECTURE.md,
        // "Federated learning in a tree").
        let federated = match &spec.federated {
            Some(f) => {
                let (mut f, federation) =
                    (f.clone(), workload.federation.clone().unwrap_or_default());
                let opened = match f.sealed_urls.take() {
                    Some(sealed) => {
                        edgeloom_crds::commitment::open_sealed(&self.box_secret, &sealed)
                            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                            .map(|urls| f.urls = urls)
                            .map_err(|e| {
                                format!("the task's URLs do not open with this node's key: {e}")
                            })
                    }
                    None => Ok(()),
                };
                let scratch = self.config.work_dir.join("federated").join(&name);
                let prepared = match opened {
                    Ok(()) => tokio::task::spawn_blocking(move || {
                        crate::federated::prepare(&f, &federation, &scratch)
                    })
                    .await
                    .unwrap_or_else(|e| Err(e.to_string())),
                    Err(e) => Err(e),
                };
                match prepared {
                    Ok(p) => Some(p),
                    Err(e) => {
                        return self.fail_before_run(&task, status, e).await;
                    }
                }
            }
            None => None,
        };
        let dir = self.config.work_dir.join("tasks");
        let _ = std::fs::create_dir_all(&dir);
        let checkpoints = self
            .config
            .work_dir
            .join("checkpoints")
            .join(format!("{}-{}-{}", spec.job.uid, spec.shard, spec.replica));
        let threads = spec
            .limits
            .cpu
            .as_ref()
            .and_then(|q| q.value())
            .map(|c| c.ceil().max(1.0) as u32);
        let runner_spec = RunnerSpec {
            workload: workload.clone(),
            shard: spec.shard,
            shards: spec.shards,
            model_path,
            data_path,
            device: Some(if spec.limits.gpus > 0 { "auto" } else { "cpu" }.to_string()),
            threads,
            checkpoint_dir: Some(checkpoints.display().to_string()),
            federated: federated.as_ref().map(|p| p.step.clone()),
        };
        let limits = Limits {
            timeout: spec
                .limits
                .timeout_seconds
                .map(|s| Duration::from_secs(s as u64)),
            memory_mib: spec.limits.memory.as_ref().and_then(|q| q.mebibytes()),
        };
        let latest: Arc<Mutex<Option<Progress>>> = Arc::default();
        let sink = latest.clone();
        let energy_before: u64 = self.gpus.read().iter().filter_map(|g| g.energy_mj).sum();
        // Progress goes out at most every 2 seconds.
        let reporter = {
            let latest = latest.clone();
            let base = status.clone();
            let api = self.tasks_api();
            let name = name.clone();
            tokio::spawn(async move {
                let mut last: Option<u8> = None;
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let now = latest.lock().ok().and_then(|l| l.clone());
                    if let Some((p, msg)) = now
                        && Some(p) != last
                    {
                        last = Some(p);
                        let mut s = base.clone();
                        s.progress = p;
                        s.message = msg.or(s.message);
                        let patch = serde_json::json!({"apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask", "status": s});
                        let _ = api
                            .patch_status(
                                &name,
                                &PatchParams::apply(FIELD_MANAGER).force(),
                                &Patch::Apply(&patch),
                            )
                            .await;
                    }
                }
            })
        };
        let log = dir.join(format!("{name}.log"));
        let mut run = execution::execute(
            &self.config.runner,
            &runner_spec,
            &limits,
            &log,
            move |p, m| {
                if let Ok(mut l) = sink.lock() {
                    *l = Some((p, m));
                }
            },
            cancel,
        )
        .await;
        // Wait for the progress reporter to be gone, so that no progress patch of its can
        // land after the final status.
        reporter.abort();
        let _ = reporter.await;
        if run.gpu {
            let after: u64 = self.gpus.read().iter().filter_map(|g| g.energy_mj).sum();
            run.usage.energy_millijoules = Some(after.saturating_sub(energy_before));
        }
        if let Some((p, _)) = latest.lock().ok().and_then(|l| l.clone()) {
            status.progress = p;
        }
        if let Some(prepared) = federated {
            run.outcome = crate::federated::finish(
                prepared,
                run.outcome,
                spec.federated.as_ref().map(|f| f.step),
            )
            .await;
        }
        self.finish(&task, status, run).await;
    }

    fn sealed_dir(&self) -> std::path::PathBuf {
        self.config.work_dir.join("sealed")
    }

    /// Fails a task whose runner never started (its data, model or inputs cannot be had).
    async fn fail_before_run(&self, task: &ComputeTask, status: ComputeTaskStatus, why: String) {
        let run = Execution {
            outcome: Outcome::Failed(why),
            usage: Default::default(),
            gpu: false,
        };
        self.finish(task, status, run).await
    }

    async fn finish(&self, task: &ComputeTask, mut status: ComputeTaskStatus, run: Execution) {
        let name = task.name_any();
        let name = name.as_str();
        let nonce = task.spec.nonce.as_deref();
        status.finished_at = Some(Time(Timestamp::now()));
        status.usage = Some(run.usage.clone());
        if self.config.inflate_usage
            && let Some(u) = status.usage.as_mut()
        {
            tracing::warn!(task = %name, "inflateUsage is set: claiming more than was used (test only)");
            u.cpu_core_millis = u.cpu_core_millis.saturating_mul(1000).max(3_600_000);
            u.gpu_millis = 3_600_000;
        }
        let outcome = match run.outcome {
            Outcome::Succeeded {
                digest,
                metrics,
                summary,
                vector,
            } => {
                if let Some(s) = metrics.get("samplesPerSecond") {
                    self.metrics.samples_per_second.set(*s);
                }
                status.progress = 100;
                status.message = None;
                let digest = if self.config.corrupt_results {
                    tracing::warn!(task = %name, "corruptResults is set: reporting an altered digest (test only)");
                    format!(
                        "{:032x}",
                        u128::from_str_radix(&digest[..32], 16)
                            .unwrap_or(0)
                            .wrapping_add(1)
                    ) + &digest[32..]
                } else {
                    digest
                };
                match nonce {
                    // A verified job: seal the result, publish only the commitment.
                    Some(nonce) => match sealed::salt().and_then(|salt| {
                        let s = Sealed {
                            digest,
                            vector,
                            metrics,
                            summary,
                            salt,
                        };
                        sealed::save(&s, &self.sealed_dir(), name).map(|()| s)
                    }) {
                        Ok(s) => {
                            status.phase = Some(TaskPhase::Committed);
                            status.commitment =
                                Some(commitment::commitment(nonce, &s.digest, &s.vector, &s.salt));
                            "succeeded"
                        }
                        Err(e) => {
                            status.phase = Some(TaskPhase::Failed);
                            status.message = Some(format!("sealing the result failed: {e}"));
                            "failed"
                        }
                    },
                    None => {
                        status.phase = Some(TaskPhase::Succeeded);
                        status.result_digest = Some(digest);
                        status.metrics = metrics;
                        status.result_summary = summary;
                        status.result_vector = vector;
                        "succeeded"
                    }
                }
            }
            Outcome::Failed(why) => {
                status.phase = Some(TaskPhase::Failed);
                status.message = Some(why);
                "failed"
            }
            Outcome::Cancelled(why) => {
                status.phase = Some(TaskPhase::Cancelled);
                status.message = Some(why);
                "cancelled"
            }
        };
        self.metrics.tasks.with_label_values(&[outcome]).inc();
        self.metrics
            .task_seconds
            .observe(run.usage.wall_millis as f64 / 1000.0);
        if self.stopped.lock().is_ok_and(|mut s| s.remove(name)) {
            tracing::warn!(task = %name, "the operator finished this task while it ran; its verdict stands");
            return;
        }
        tracing::info!(task = %name, outcome, message = ?status.message, "task finished");
        // Kept on disk before it is sent: a result is never lost to an API server that
        // does not answer, nor to an agent restart.
        let pending = outbox::Pending {
            task: name.to_string(),
            uid: task.metadata.uid.clone().unwrap_or_default(),
            status,
        };
        if let Err(e) = outbox::save(&self.outbox_dir(), &pending) {
            tracing::warn!(task = %name, error = %e, "keeping the result on disk failed");
        }
        self.report(&pending, true).await;
    }

    fn outbox_dir(&self) -> std::path::PathBuf {
        self.config.work_dir.join("outbox")
    }

    /// Sends a final status kept in the outbox; forgets it once the API server took it,
    /// refused it for good (a task someone else finished: its phase is final) or the task
    /// is gone. Returns whether it is settled.
    async fn report(&self, p: &outbox::Pending, first: bool) -> bool {
        let settled = match self.set_status(&p.task, &p.status).await {
            Ok(()) => {
                if !first {
                    tracing::info!(task = %p.task, "reported a result kept while the API server did not answer");
                }
                true
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                tracing::info!(task = %p.task, "task finished after its ComputeTask was deleted");
                true
            }
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                tracing::warn!(task = %p.task, error = %s.message, "the result was refused");
                true
            }
            Err(e) => {
                if first {
                    tracing::warn!(task = %p.task, error = %e, "reporting the result failed; it is kept to report when the API server answers");
                }
                false
            }
        };
        if settled {
            outbox::remove(&self.outbox_dir(), &p.task);
        }
        settled
    }

    /// Sends the results kept in the outbox (after an outage, or from before a restart).
    async fn flush_outbox(&self, store: &Store<ComputeTask>) {
        for p in outbox::all(&self.outbox_dir()) {
            // A task still finishing reports its own result.
            if self.is_running(&p.task) {
                continue;
            }
            // Another object of the same name is not the task this result is for.
            let other = store.state().into_iter().any(|t| {
                t.name_any() == p.task && t.metadata.uid.as_deref().is_some_and(|u| u != p.uid)
            });
            if other {
                outbox::remove(&self.outbox_dir(), &p.task);
                continue;
            }
            self.report(&p, false).await;
        }
    }

    /// Reveals the sealed results the operator asked for: the result and the salt that
    /// open the commitment. A result that was lost (work directory gone) fails the task.
    async fn reveal(&self, store: &Store<ComputeTask>) {
        for t in store.state() {
            let Some(status) = t.status.as_ref() else {
                continue;
            };
            if t.spec.node_name != self.config.node
                || status.phase != Some(TaskPhase::Committed)
                || !t.annotations().contains_key(REVEAL_ANNOTATION)
            {
                continue;
            }
            let name = t.name_any();
            if self.revealed.lock().is_ok_and(|r| r.contains(&name)) {
                continue;
            }
            let mut s = status.clone();
            if self.config.copy_peers {
                // TEST ONLY: whatever another replica revealed, as it is.
                match self
                    .peer(&t, |p| p.sealed_reveal.is_some() || p.salt.is_some())
                    .await
                {
                    Some(p) => {
                        s.phase = Some(TaskPhase::Succeeded);
                        s.sealed_reveal = p.sealed_reveal;
                        s.result_digest = p.result_digest;
                        s.result_vector = p.result_vector;
                        s.metrics = p.metrics;
                        s.result_summary = p.result_summary;
                        s.salt = p.salt;
                    }
                    None => continue, // nothing to copy yet
                }
            } else {
                match sealed::load(&self.sealed_dir(), &name) {
                    // For the operator's eyes only when it published its key.
                    Some(o) => {
                        s.phase = Some(TaskPhase::Succeeded);
                        let sealed_for_operator = match self.reveal_key().await {
                            Some(k) => commitment::seal(&k, &o)
                                .inspect_err(
                                    |e| tracing::warn!(error = %e, "revealing in the open"),
                                )
                                .ok(),
                            None => None,
                        };
                        match sealed_for_operator {
                            Some(b) => s.sealed_reveal = Some(b),
                            None => {
                                s.result_digest = Some(o.digest);
                                s.result_vector = o.vector;
                                s.metrics = o.metrics;
                                s.result_summary = o.summary;
                                s.salt = Some(o.salt);
                            }
                        }
                    }
                    None => {
                        s.phase = Some(TaskPhase::Failed);
                        s.message = Some(
                            "the sealed result was lost before its reveal (the agent's work directory is gone)"
                                .into(),
                        );
                    }
                }
            }
            match self.set_status(&name, &s).await {
                Ok(()) => {
                    if let Ok(mut r) = self.revealed.lock() {
                        r.insert(name.clone());
                    }
                    sealed::remove(&self.sealed_dir(), &name);
                    tracing::info!(task = %name, phase = ?s.phase, "revealed the sealed result");
                }
                Err(e) => tracing::debug!(task = %name, error = %e, "reveal failed; will retry"),
            }
        }
    }

    /// What the operator publishes in this cluster's `edgeloom-ledger-checkpoints`
    /// ConfigMap: each pool's signed checkpoint and its reveal key (empty when unreadable).
    async fn published(&self) -> std::collections::BTreeMap<String, String> {
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
            self.client.clone(),
            SYSTEM_NAMESPACE,
        )
        .get_opt(CHECKPOINTS_CONFIGMAP)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.data)
        .unwrap_or_default()
    }

    /// The operator's public key for sealed reveals, as published in this cluster (kept by
    /// the heartbeat; read here only before the first one has).
    async fn reveal_key(&self) -> Option<String> {
        let mut cached = self.reveal_key.lock().await;
        if cached.is_none() {
            *cached = self.published().await.remove(commitment::REVEAL_KEY_FIELD);
        }
        cached.clone()
    }

    /// The status of another replica of the same shard that satisfies `has` (any cluster
    /// task is readable to agents: the reason results are committed before they are shown).
    async fn peer(
        &self,
        task: &ComputeTask,
        has: impl Fn(&ComputeTaskStatus) -> bool,
    ) -> Option<ComputeTaskStatus> {
        let lp = ListParams::default().labels(&format!("{JOB_UID_LABEL}={}", task.spec.job.uid));
        let list = self.tasks_api().list(&lp).await.ok()?;
        list.items
            .into_iter()
            .filter(|p| p.spec.shard == task.spec.shard && p.spec.replica != task.spec.replica)
            .filter_map(|p| p.status)
            .find(|s| has(s))
    }

    /// TEST ONLY (`copyPeers`): does no work and reports what another replica reported:
    /// its commitment where the task asks for one (to be revealed with the peer's result
    /// and salt later), else its result.
    async fn copy_peer(
        &self,
        task: &ComputeTask,
        mut status: ComputeTaskStatus,
        cancel: watch::Receiver<Option<String>>,
    ) {
        let name = task.name_any();
        tracing::warn!(task = %name, "copyPeers is set: copying another replica's result (test only)");
        let sealed = task.spec.nonce.is_some();
        let until = tokio::time::Instant::now() + Duration::from_secs(300);
        loop {
            if cancel.borrow().is_some() {
                return;
            }
            let found = self
                .peer(task, |p| {
                    if sealed {
                        p.commitment.is_some()
                    } else {
                        p.result_digest.is_some()
                    }
                })
                .await;
            if let Some(p) = found {
                status.progress = 100;
                status.finished_at = Some(Time(Timestamp::now()));
                status.usage = p.usage;
                status.message = None;
                if sealed {
                    status.phase = Some(TaskPhase::Committed);
                    status.commitment = p.commitment;
                } else {
                    status.phase = Some(TaskPhase::Succeeded);
                    status.result_digest = p.result_digest;
                    status.result_vector = p.result_vector;
                    status.metrics = p.metrics;
                    status.result_summary = p.result_summary;
                }
                let _ = self.set_status(&name, &status).await;
                return;
            }
            if tokio::time::Instant::now() > until {
                status.phase = Some(TaskPhase::Failed);
                status.message = Some("no replica to copy".into());
                let _ = self.set_status(&name, &status).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    fn cancel(&self, name: &str, why: &str) {
        if let Ok(r) = self.running.lock()
            && let Some(tx) = r.get(name)
        {
            let _ = tx.send(Some(why.to_string()));
        }
    }

    /// Runs until `shutdown` resolves, then drains.
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.config.work_dir)?;
        let tflops = self.measure().await;
        loop {
            match self.publish(tflops).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "publishing the inventory failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
        self.heartbeat().await;
        self.ready.store(true, Ordering::Relaxed);
        let beat = self.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(beat.config.heartbeat_seconds.max(1))).await;
                beat.heartbeat().await;
                beat.metrics
                    .observe_gpus(&beat.gpus.read(), &beat.config.node);
            }
        });
        let (store, writer) = reflector::store();
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", self.config.node));
        let events = watcher(self.tasks_api(), cfg)
            .default_backoff()
            .reflect(writer);
        let me = self.clone();
        let watch_store = store.clone();
        let watching = tokio::spawn(async move {
            futures::pin_mut!(events);
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(watcher::Event::Delete(t)) => {
                        me.cancel(
                            &t.name_any(),
                            "the ComputeTask was deleted (cancelled or superseded)",
                        );
                        sealed::remove(&me.sealed_dir(), &t.name_any());
                        if let Ok(mut r) = me.revealed.lock() {
                            r.remove(&t.name_any());
                        }
                    }
                    Ok(watcher::Event::Apply(t)) => {
                        // Finished by someone else (the operator fails a task that made no
                        // progress): stop its runner, and report nothing over it.
                        let status = t.status.as_ref();
                        let finished = matches!(
                            status.and_then(|s| s.phase),
                            Some(TaskPhase::Failed | TaskPhase::Cancelled | TaskPhase::Succeeded)
                        );
                        let name = t.name_any();
                        if finished
                            && me.is_running(&name)
                            && me.stopped.lock().is_ok_and(|mut s| s.insert(name.clone()))
                        {
                            let why = status
                                .and_then(|s| s.message.clone())
                                .unwrap_or_else(|| "finished by the operator".into());
                            me.cancel(&name, &format!("stopped by the operator: {why}"));
                        }
                        me.wake.notify_one();
                    }
                    Ok(_) => me.wake.notify_one(),
                    Err(e) => tracing::debug!(error = %e, "task watch error"),
                }
            }
            drop(watch_store);
        });
        let _ = store.wait_until_ready().await;
        // Results finished before a restart are reported, not failed as orphans.
        self.flush_outbox(&store).await;
        self.fail_orphans(&store).await;
        let me = self.clone();
        let loop_store = store.clone();
        let claiming = tokio::spawn(async move {
            loop {
                me.flush_outbox(&loop_store).await;
                me.reveal(&loop_store).await;
                me.claim(&loop_store).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), me.wake.notified()).await;
            }
        });
        shutdown.await;
        tracing::info!(
            running = self.running_count(),
            "shutting down: no new tasks"
        );
        self.stopping.store(true, Ordering::Relaxed);
        claiming.abort();
        let grace =
            tokio::time::Instant::now() + Duration::from_secs(self.config.shutdown_grace_seconds);
        while self.running_count() > 0 && tokio::time::Instant::now() < grace {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let names: Vec<String> = self
            .running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default();
        for n in &names {
            self.cancel(n, "the agent is shutting down");
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.running_count() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        watching.abort();
        heartbeat.abort();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(key: &ed25519_dalek::SigningKey, size: u64, root: &str) -> serde_json::Value {
        use ed25519_dalek::Signer;
        let time = "2026-11-25T00:00:00Z";
        let root = root.repeat(32);
        let sig =
            key.sign(edgeloom_crds::checkpoint::message("edge", size, &root, time).as_bytes());
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        serde_json::json!({"pool": "edge", "size": size, "root": root, "time": time,
            "publicKey": hex(&key.verifying_key().to_bytes()), "signature": hex(&sig.to_bytes())})
    }

    #[test]
    fn a_kept_checkpoint_is_replaced_only_by_one_that_extends_it() {
        let operator = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let cp = |size: u64, root: &str| signed(&operator, size, root);
        let mut kept = serde_json::Map::new();
        keep_checkpoint(&mut kept, "edge".into(), cp(3, "aa")).expect("first");
        keep_checkpoint(&mut kept, "edge".into(), cp(3, "aa")).expect("the same again");
        keep_checkpoint(&mut kept, "edge".into(), cp(5, "bb")).expect("grown");
        assert_eq!(kept["edge"], cp(5, "bb"));
        let err = keep_checkpoint(&mut kept, "edge".into(), cp(4, "cc")).expect_err("shorter");
        assert!(
            err.contains("rewritten") && err.contains("4 entries"),
            "{err}"
        );
        assert!(
            keep_checkpoint(&mut kept, "edge".into(), cp(5, "dd")).is_err(),
            "same size, other root"
        );
        assert_eq!(kept["edge"], cp(5, "bb"), "the evidence is kept");
        // Signed by another key (a forged history), or altered: refused.
        let forger = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let err = keep_checkpoint(&mut kept, "edge".into(), signed(&forger, 9, "ff"))
            .expect_err("another key");
        assert!(err.contains("trusted key"), "{err}");
        let mut altered = cp(9, "ff");
        altered["size"] = 10.into();
        assert!(keep_checkpoint(&mut kept, "edge".into(), altered).is_err());
        assert_eq!(kept["edge"], cp(5, "bb"));
    }
}
