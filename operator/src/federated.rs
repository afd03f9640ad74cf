//! Federated jobs: rounds of local training on node-local data, aggregated along the tree
//! node → member cluster → hub (docs/ARCHITECTURE.md, "Federated learning in a tree").
//!
//! A Federated job does not go through the shard lifecycle. Its state is
//! `status.federated`, written only here and only with the job's resourceVersion as a
//! precondition (a PUT of the status), so two operators never both advance a round: the
//! loser's write fails and it reads again. Every side effect of a stage is derived from a
//! status already written (the participants a round closed with, the verdicts), and is
//! idempotent: task names are deterministic, models are written create-only and are the
//! same bytes when computed again, receipts are keyed by (job, round, participant). An
//! operator killed at any point resumes from the status and counts no round twice.
//!
//! Who writes what. The agent of a participant writes its task's status: a digest of its
//! update, the examples it trained on, losses and accuracies. These are claims: an update
//! counts only if the bytes in the store have that digest, its weight is bounded by the
//! round's median claim, and under the robust rules it must not be an outlier. The node
//! aggregating a member cluster is a participant too, and its verdicts and member model
//! are its claims (see the architecture's "Federated learning in a tree" for what checks
//! them and what does not yet).

use crate::cache::TaskEntry;
use crate::conditions;
use crate::context::{Context, FIELD_MANAGER};
use crate::decimal::Amount;
use crate::fleet::Member;
use crate::job_controller::Error;
use crate::lifecycle::{Accepted, Caught, Outvoted, bound_usage, task_prefix};
use crate::rewards::settle;
use edgeloom_crds::compute_task::{
    ComputeTask, ComputeTaskSpec, DISPATCHED_AT_ANNOTATION, JOB_UID_LABEL, JobReference,
    NODE_LABEL, TaskLimits,
};
use edgeloom_crds::federated::{
    AuditResult, FederatedStatus, FederatedStepKind, FederatedTask, FederatedUrls, MemberModel,
    ModelObject, Participant, ParticipantState, RoundStage, RoundSummary, StoredModel,
};
use edgeloom_crds::workload::{AggregationRule, Federation, Topology};
use edgeloom_crds::{ComputeJob, ComputeJobStatus, JobPhase, TaskPhase};
use futures::TryStreamExt as _;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutPayload};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Presigned URLs outlive the round's timeout by this much (a task finishing at the
/// deadline can still upload).
const URL_SLACK_SECS: i64 = 120;
/// Nodes tried for one member's aggregation before the member is left out of the round.
const AGGREGATOR_ATTEMPTS: u32 = 3;
/// An update's weight is at most this many times the round's median claimed examples.
const WEIGHT_CAP: f64 = 3.0;
/// Elements read from each model at a time when the hub aggregates.
const CHUNK: usize = 1 << 16;
/// The largest model the hub reads (the operator holds one in memory to write it).
const MAX_MODEL_BYTES: u64 = 256 << 20;

/// The receipt replica (and task replica) of each step.
fn replica_of(step: FederatedStepKind) -> u32 {
    match step {
        FederatedStepKind::Train => 0,
        FederatedStepKind::Aggregate => 1,
        FederatedStepKind::Init => 2,
        FederatedStepKind::Evaluate => 3,
    }
}

/// `<job prefix>-r<round>-<t|a|i|e><index>-<attempt>`.
pub fn task_name(
    uid: &str,
    round: u32,
    step: FederatedStepKind,
    index: u32,
    attempt: u32,
) -> String {
    let letter = match step {
        FederatedStepKind::Train => 't',
        FederatedStepKind::Aggregate => 'a',
        FederatedStepKind::Init => 'i',
        FederatedStepKind::Evaluate => 'e',
    };
    format!("{}-r{round}-{letter}{index}-{attempt}", task_prefix(uid))
}

/// Where a job's models live in the store (docs/ARCHITECTURE.md, "Federated learning in a
/// tree"): the hub's under `jobs/<uid>/`, each member's under `members/<pool>/<cluster>/`
/// (the prefix standing for the member's own store), never a node update at the hub in
/// Tree mode.
#[derive(Clone, Debug)]
pub struct Keys {
    root: String,
    uid: String,
}

impl Keys {
    /// Keys of job `uid` under the store's `root`.
    pub fn new(root: &ObjectPath, uid: &str) -> Keys {
        let root = root.as_ref().trim_matches('/').to_string();
        Keys {
            root,
            uid: uid.to_string(),
        }
    }

    fn at(&self, rest: String) -> String {
        if self.root.is_empty() {
            rest
        } else {
            format!("{}/{rest}", self.root)
        }
    }

    /// The hub's prefix of the job.
    pub fn hub(&self) -> String {
        self.at(format!("jobs/{}", self.uid))
    }

    /// A member's prefix of the job.
    pub fn member(&self, member: &str) -> String {
        let (pool, cluster) = member.split_once('/').unwrap_or((member, member));
        self.at(format!("members/{pool}/{cluster}/jobs/{}", self.uid))
    }

    /// Init builder `index`'s model (each attempt its own object).
    fn init(&self, index: u32, attempt: u32) -> String {
        format!("{}/rounds/0/init-{index}-{attempt}.safetensors", self.hub())
    }

    /// The prefix of round `round`'s global model (its name ends with its digest).
    fn global(&self, round: u32) -> String {
        format!("{}/rounds/{round}/global", self.hub())
    }

    fn momentum(&self, round: u32) -> String {
        format!("{}/rounds/{round}/momentum", self.hub())
    }

    /// Where participant `index` writes its update of `round`.
    fn update(&self, topology: Topology, member: &str, round: u32, index: u32) -> String {
        match topology {
            Topology::Flat => format!("{}/rounds/{round}/updates/{index}.safetensors", self.hub()),
            Topology::Tree => format!(
                "{}/rounds/{round}/updates/{index}.safetensors",
                self.member(member)
            ),
        }
    }

    /// A member's model of `round`, by its aggregation's attempt.
    fn member_model(&self, member: &str, round: u32, attempt: u32) -> String {
        format!(
            "{}/rounds/{round}/model-{attempt}.safetensors",
            self.member(member)
        )
    }
}

/// What one reconcile of a Federated job works with.
struct Run<'a> {
    job: &'a ComputeJob,
    ctx: &'a Context,
    uid: String,
    fed: Federation,
    rounds: u32,
    members: Vec<Arc<Member>>,
    now: Timestamp,
    keys: Keys,
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn object_store::signer::Signer>>,
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

impl Run<'_> {
    fn member(&self, key: &str) -> Option<&Arc<Member>> {
        self.members.iter().find(|m| m.key == key)
    }

    /// The task of `name` in `member`, as the cache has it.
    fn task(&self, member: &str, name: &str) -> Option<Arc<TaskEntry>> {
        self.member(member)?.tasks.get(name)
    }

    /// Whether `node` of `member` is alive (its heartbeat, by the operator's clock).
    fn alive(&self, member: &str, node: &str) -> bool {
        self.member(member)
            .is_some_and(|m| !m.lost(self.now) && m.node_ready(node, self.now))
    }

    /// Nodes that may take part: alive agents holding the job's dataset, in its regions
    /// and zones, with its required labels and GPUs, not quarantined; sorted.
    fn eligible(&self) -> Vec<(String, String)> {
        let spec = &self.job.spec;
        let placement = &spec.placement;
        let dataset = spec
            .workload
            .dataset
            .as_ref()
            .and_then(|d| d.node_local.clone());
        let mut out = Vec::new();
        for m in &self.members {
            if m.lost(self.now) {
                continue;
            }
            // An empty list allows any region or zone.
            let allowed = |list: &[String], v: &Option<String>| {
                list.is_empty() || v.as_ref().is_some_and(|x| list.contains(x))
            };
            if !allowed(&placement.regions, &m.spec.region)
                || !allowed(&placement.zones, &m.spec.zone)
            {
                continue;
            }
            for n in m.nodes.state() {
                let inv = &n.inventory;
                let labels = n.label_map();
                let ok = inv.agent
                    && inv.box_key.is_some()
                    && m.node_ready(&n.name, self.now)
                    && dataset.as_ref().is_none_or(|d| inv.datasets.contains(d))
                    && spec.resources.gpus <= inv.gpus
                    && placement
                        .required_labels
                        .iter()
                        .all(|(k, v)| labels.get(k) == Some(v) || m.spec.labels.get(k) == Some(v))
                    && !self
                        .ctx
                        .scheduler
                        .quarantined(&m.pool, &format!("{}/{}", m.spec.name, n.name));
                if ok {
                    out.push((m.key.clone(), n.name.to_string()));
                }
            }
        }
        out.sort();
        out
    }

    /// Up to `n` participants: `prefer` first (those still eligible), then the others
    /// taken from each member in turn.
    fn pick(&self, n: usize, prefer: &[(String, String)]) -> Vec<(String, String)> {
        let eligible = self.eligible();
        let mut picked: Vec<(String, String)> = prefer
            .iter()
            .filter(|p| eligible.contains(p))
            .take(n)
            .cloned()
            .collect();
        let mut by_member: BTreeMap<&str, Vec<&(String, String)>> = BTreeMap::new();
        for e in &eligible {
            if !picked.contains(e) {
                by_member.entry(e.0.as_str()).or_default().push(e);
            }
        }
        let mut queues: Vec<std::collections::VecDeque<&(String, String)>> =
            by_member.into_values().map(Into::into).collect();
        while picked.len() < n && queues.iter().any(|q| !q.is_empty()) {
            for q in &mut queues {
                if picked.len() >= n {
                    break;
                }
                if let Some(e) = q.pop_front() {
                    picked.push(e.clone());
                }
            }
        }
        picked
    }

    async fn presign(
        &self,
        method: object_store::signer::Method,
        key: &str,
    ) -> Result<String, String> {
        let expires =
            Duration::from_secs(self.fed.round_timeout_seconds as u64 + URL_SLACK_SECS as u64);
        let Some(signer) = &self.signer else {
            return Err("the object store cannot presign URLs".into());
        };
        signer
            .signed_url(method, &ObjectPath::from(key), expires)
            .await
            .map(|u| u.to_string())
            .map_err(|e| format!("presigning {key}: {e}"))
    }

    async fn get_url(
        &self,
        model: &StoredModel,
        weight: Option<f64>,
    ) -> Result<ModelObject, String> {
        Ok(ModelObject {
            url: self
                .presign(object_store::signer::Method::GET, &model.key)
                .await?,
            sha256: model.sha256.clone(),
            weight,
        })
    }

    /// Creates a task (if it does not exist yet) on `node` of `member`.
    #[allow(clippy::too_many_arguments)]
    async fn ensure_task(
        &self,
        member: &str,
        node: &str,
        round: u32,
        step: FederatedStepKind,
        index: u32,
        attempt: u32,
        urls: FederatedUrls,
    ) -> Result<(), String> {
        let name = task_name(&self.uid, round, step, index, attempt);
        let Some(m) = self.member(member) else {
            return Err(format!("member {member} is not connected"));
        };
        if m.tasks.get(&name).is_some() {
            return Ok(());
        }
        // The URLs are sealed to the node's key: other agents of the cluster read the task
        // but cannot use them (see "Who may write what").
        let key = m
            .nodes
            .get(node)
            .and_then(|n| n.inventory.box_key.clone())
            .ok_or_else(|| format!("node {node} of {member} publishes no key to seal to"))?;
        let plain = serde_json::to_vec(&urls).map_err(|e| e.to_string())?;
        let sealed = edgeloom_crds::commitment::seal_to(&key, &plain)?;
        let spec = &self.job.spec;
        let (pool, cluster) = member.split_once('/').unwrap_or((member, member));
        let expires = self.now
            + SignedDuration::from_secs(self.fed.round_timeout_seconds as i64 + URL_SLACK_SECS);
        let task = ComputeTask {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (JOB_UID_LABEL.to_string(), self.uid.clone()),
                    (NODE_LABEL.to_string(), node.to_string()),
                ])),
                annotations: Some(BTreeMap::from([
                    (
                        crate::scheduler::CREATED_BY_ANNOTATION.to_string(),
                        self.ctx.identity.clone(),
                    ),
                    (DISPATCHED_AT_ANNOTATION.to_string(), self.now.to_string()),
                ])),
                ..Default::default()
            },
            spec: ComputeTaskSpec {
                job: JobReference {
                    namespace: self.job.namespace().unwrap_or_default(),
                    name: self.job.name_any(),
                    uid: self.uid.clone(),
                },
                pool: pool.to_string(),
                cluster: cluster.to_string(),
                shard: index,
                shards: spec.shards.max(index + 1),
                replica: replica_of(step),
                attempt,
                node_name: node.to_string(),
                workload: spec.workload.clone(),
                limits: TaskLimits {
                    timeout_seconds: Some(self.fed.round_timeout_seconds),
                    memory: spec.resources.memory.clone(),
                    cpu: spec.resources.cpu.clone(),
                    gpus: spec.resources.gpus,
                },
                model_downloads: m.pool_spec().model_downloads.clone(),
                nonce: None,
                federated: Some(FederatedTask {
                    round,
                    step,
                    urls: FederatedUrls::default(),
                    sealed_urls: Some(sealed),
                    expires_at: time(expires),
                }),
            },
            status: None,
        };
        let api = m.tasks_api();
        match tokio::time::timeout(
            Duration::from_secs(5),
            api.create(&PostParams::default(), &task),
        )
        .await
        {
            Ok(Ok(_)) => {
                self.ctx.metrics.tasks_created.inc();
                Ok(())
            }
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => {
                let found = api.get_opt(&name).await.map_err(|e| e.to_string())?;
                match found.and_then(|t| t.labels().get(JOB_UID_LABEL).cloned()) {
                    Some(owner) if owner == self.uid => Ok(()),
                    owner => Err(format!("task {name} exists and belongs to job {owner:?}")),
                }
            }
            Ok(Err(e)) => Err(format!("creating task {name} in {member}: {e}")),
            Err(_) => Err(format!("creating task {name} in {member} timed out")),
        }
    }

    /// Usage paid for a finished task: its claim bounded by the time from the stage's
    /// start to now (the operator's clock) at the job's CPU and GPU request.
    fn usage(&self, t: &TaskEntry, since: Timestamp) -> (u64, u64) {
        let claimed = t
            .status
            .as_ref()
            .and_then(|s| s.usage.clone())
            .unwrap_or_default();
        let observed = (self.now.as_millisecond() - since.as_millisecond()).max(0) as u64;
        bound_usage(
            claimed.cpu_core_millis,
            claimed.gpu_millis,
            observed,
            t.cpu_millis,
            t.gpus,
        )
    }

    /// The model `member`'s participants start the current round from.
    fn base_of(&self, st: &FederatedStatus, member: &str) -> Option<StoredModel> {
        st.bases
            .get(member)
            .cloned()
            .or_else(|| st.global_model.clone())
    }
}

/// The phase, progress and conditions of a Federated job's status.
fn job_status(
    run: &Run<'_>,
    old: &ComputeJobStatus,
    st: FederatedStatus,
    verdict: Option<(bool, &str, String)>,
    paid: &crate::rewards::store::Totals,
) -> ComputeJobStatus {
    let generation = run.job.metadata.generation;
    let mut conds = old.conditions.clone();
    let placement = {
        let mut by: BTreeMap<String, u32> = BTreeMap::new();
        for p in &st.participants {
            let cluster = p.member.split_once('/').map_or(p.member.as_str(), |x| x.1);
            *by.entry(cluster.to_string()).or_default() += 1;
        }
        (!by.is_empty()).then(|| {
            by.iter()
                .map(|(c, n)| format!("{c}:{n}"))
                .collect::<Vec<_>>()
                .join(",")
        })
    };
    let phase = match &verdict {
        Some((true, _, _)) => JobPhase::Succeeded,
        Some((false, _, _)) => JobPhase::Failed,
        None if st.participants.is_empty() => JobPhase::Pending,
        None => JobPhase::Running,
    };
    match &verdict {
        Some((ok, reason, msg)) => {
            conditions::set(
                &mut conds,
                "Scheduled",
                true,
                "Finished",
                msg,
                generation,
                run.now,
            );
            let (complete, failed) = if *ok {
                (*reason, "Succeeded")
            } else {
                ("Failed", *reason)
            };
            conditions::set(
                &mut conds, "Complete", *ok, complete, msg, generation, run.now,
            );
            conditions::set(&mut conds, "Failed", !*ok, failed, msg, generation, run.now);
        }
        None => {
            let placed = !st.participants.is_empty();
            let msg = if placed {
                format!(
                    "round {} of {}: {} participants",
                    st.round,
                    run.rounds,
                    st.participants.len()
                )
            } else {
                "no node can take part: none alive holds the job's dataset within its placement"
                    .to_string()
            };
            let reason = if placed { "Placed" } else { "Unschedulable" };
            conditions::set(
                &mut conds,
                "Scheduled",
                placed,
                reason,
                &msg,
                generation,
                run.now,
            );
            conditions::set(
                &mut conds, "Complete", false, "Running", &msg, generation, run.now,
            );
            conditions::set(
                &mut conds, "Failed", false, "Running", &msg, generation, run.now,
            );
        }
    }
    let mut metrics = BTreeMap::new();
    if let Some(a) = st
        .final_accuracy
        .or_else(|| st.rounds.iter().rev().find_map(|r| r.accuracy))
    {
        metrics.insert("accuracy".to_string(), a);
    }
    if let Some(l) = st.rounds.last().and_then(|r| r.loss) {
        metrics.insert("loss".to_string(), l);
    }
    let finished = matches!(phase, JobPhase::Succeeded | JobPhase::Failed);
    ComputeJobStatus {
        phase: Some(phase),
        conditions: conds,
        observed_generation: generation,
        progress: Some(format!("{}/{} rounds", st.completed_rounds, run.rounds)),
        placement,
        shards: Vec::new(),
        metrics,
        result: None,
        rewards: settle::rewards_summary(paid, &run.members).or(old.rewards.clone()),
        start_time: old.start_time.clone().or_else(|| Some(time(run.now))),
        completion_time: old
            .completion_time
            .clone()
            .or_else(|| finished.then(|| time(run.now))),
        issued: BTreeMap::new(),
        shard_pages: Vec::new(),
        slot_attempts: None,
        federated: Some(st),
    }
}

/// Writes the status with the job's resourceVersion as precondition: `Ok(false)` when
/// another writer got there first (read again and decide again).
async fn write(run: &Run<'_>, status: ComputeJobStatus) -> Result<bool, Error> {
    if Some(&status) == run.job.status.as_ref() {
        return Ok(true);
    }
    let api: Api<ComputeJob> = Api::namespaced(
        run.ctx.client.clone(),
        &run.job.namespace().unwrap_or_default(),
    );
    let mut obj = run.job.clone();
    obj.status = Some(status);
    obj.metadata.managed_fields = None;
    match api
        .replace_status(
            &run.job.name_any(),
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &obj,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(Error::Hub(e)),
    }
}

async fn event(run: &Run<'_>, type_: EventType, reason: &str, note: &str) {
    crate::events::publish(
        &run.ctx.recorder,
        &run.job.object_ref(&()),
        type_,
        reason,
        "Federate",
        note,
    )
    .await;
}

/// Reconciles a Federated job (called by the job controller for jobs of that kind).
pub async fn apply(
    job: Arc<ComputeJob>,
    ctx: &Context,
    members: Vec<Arc<Member>>,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    let old = job.status.clone().unwrap_or_default();
    if matches!(old.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        cleanup_tasks(&job, &members, &BTreeSet::new()).await;
        return Ok(Action::await_change());
    }
    let uid = job.uid().unwrap_or_default();
    let backend = ctx.books.backend();
    let fed = job.spec.workload.federation.clone().unwrap_or_default();
    let paid = settle::job_totals(&uid, &members, ctx)
        .await
        .unwrap_or_default();
    if backend.signer.is_none() {
        // Without presigned URLs agents could not reach the models: say so and stop.
        let st = old.federated.clone().unwrap_or_default();
        let run = Run {
            job: &job,
            ctx,
            uid: uid.clone(),
            fed,
            rounds: job.spec.workload.parameters.rounds,
            members,
            now,
            keys: Keys::new(&backend.root, &uid),
            store: backend.store.clone(),
            signer: None,
        };
        let status = job_status(
            &run,
            &old,
            st,
            Some((
                false,
                "NoObjectStore",
                format!(
                    "a Federated job needs an S3 object store to move its models (the Secret {} in the operator's namespace); the operator keeps its ledger in {}, which cannot presign URLs for agents",
                    crate::rewards::backend::STORE_SECRET,
                    backend.url
                ),
            )),
            &paid,
        );
        write(&run, status).await?;
        return Ok(Action::await_change());
    };
    let run = Run {
        job: &job,
        ctx,
        uid: uid.clone(),
        rounds: job.spec.workload.parameters.rounds,
        fed,
        members,
        now,
        keys: Keys::new(&backend.root, &uid),
        store: backend.store.clone(),
        signer: backend.signer.clone(),
    };
    let st = old.federated.clone().unwrap_or_default();
    let outcome = match st.stage {
        None => start(&run, st).await,
        Some(RoundStage::Init) => init(&run, st).await,
        Some(RoundStage::Training) => training(&run, st).await,
        Some(RoundStage::Aggregating) => aggregating(&run, st).await,
        Some(RoundStage::Settling) => settling(&run, st).await,
        Some(RoundStage::Evaluating) => evaluating(&run, st).await,
        Some(RoundStage::Done) => Step::Done(st),
    };
    let (st, verdict, wait) = match outcome {
        Step::Wait(st, d) => (st, None, d),
        Step::Advance(st) => (st, None, Duration::ZERO),
        Step::Done(st) => {
            let msg = format!(
                "{} rounds complete{}",
                st.completed_rounds,
                st.final_accuracy
                    .map(|a| format!("; final accuracy {a:.4} on the participants' held-out data"))
                    .unwrap_or_default()
            );
            (st, Some((true, "RoundsComplete", msg)), Duration::ZERO)
        }
        Step::Fail(st, reason, msg) => (st, Some((false, reason, msg)), Duration::ZERO),
        Step::Retry(why) => {
            tracing::info!(job = %job.name_any(), %why, "federated job waits");
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
    };
    let paid = settle::job_totals(&uid, &run.members, ctx)
        .await
        .unwrap_or(paid);
    let finished = verdict.is_some();
    let status = job_status(&run, &old, st.clone(), verdict.clone(), &paid);
    if !write(&run, status).await? {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // Only after the status naming them is written: the tasks the current stage needs,
    // and the removal of every other task of the job (stragglers of closed rounds).
    if finished {
        let phase = if verdict.as_ref().is_some_and(|v| v.0) {
            "Succeeded"
        } else {
            "Failed"
        };
        ctx.metrics.jobs_finished.with_label_values(&[phase]).inc();
        if let Some((ok, _, msg)) = &verdict {
            let (t, reason) = if *ok {
                (EventType::Normal, "Succeeded")
            } else {
                (EventType::Warning, "Failed")
            };
            event(&run, t, reason, msg).await;
        }
        cleanup_tasks(&job, &run.members, &BTreeSet::new()).await;
        return Ok(Action::await_change());
    }
    let keep = dispatch(&run, &st).await;
    cleanup_tasks(&job, &run.members, &keep).await;
    if wait.is_zero() {
        Ok(Action::requeue(Duration::from_millis(50)))
    } else {
        Ok(Action::requeue(wait))
    }
}

/// What a stage decided.
enum Step {
    /// Written as is; look again after the duration (tasks are running).
    Wait(FederatedStatus, Duration),
    /// Written; the next stage starts at once.
    Advance(FederatedStatus),
    /// Every round is done.
    Done(FederatedStatus),
    /// The job cannot go on.
    Fail(FederatedStatus, &'static str, String),
    /// Nothing written: something it needs is not there yet (the ledger, the store).
    Retry(String),
}

fn participant(index: u32, member: &str, node: &str) -> Participant {
    Participant {
        index,
        member: member.to_string(),
        node: node.to_string(),
        state: ParticipantState::Running,
        examples: None,
        digest: None,
        start_accuracy: None,
        reason: None,
        loss: None,
        cpu_core_millis: 0,
        gpu_millis: 0,
        attempt: 1,
        blamed: false,
    }
}

fn stage(mut st: FederatedStatus, stage: RoundStage, now: Timestamp) -> FederatedStatus {
    st.stage = Some(stage);
    st.stage_started_at = Some(time(now));
    st
}

fn started(st: &FederatedStatus, now: Timestamp) -> Timestamp {
    st.stage_started_at.as_ref().map_or(now, |t| t.0)
}

/// No stage yet: pick the nodes that build the initial model (two, in distinct members
/// where possible, whose models must agree).
async fn start(run: &Run<'_>, st: FederatedStatus) -> Step {
    let picked = run.pick(2, &[]);
    if picked.is_empty() {
        return Step::Wait(st, Duration::from_secs(5));
    }
    let mut st = stage(st, RoundStage::Init, run.now);
    st.round = 0;
    st.participants = picked
        .iter()
        .enumerate()
        .map(|(i, (m, n))| participant(i as u32, m, n))
        .collect();
    Step::Advance(st)
}

/// Marks a running participant lost when its node or task is gone or its task failed,
/// and reported when its task succeeded.
fn observe(
    run: &Run<'_>,
    p: &mut Participant,
    round: u32,
    step: FederatedStepKind,
    since: Timestamp,
) {
    if p.state != ParticipantState::Running {
        return;
    }
    let name = task_name(&run.uid, round, step, p.index, p.attempt);
    let lost = |p: &mut Participant, why: String| {
        p.state = ParticipantState::Lost;
        p.reason = Some(why);
    };
    match run.task(&p.member, &name) {
        Some(t) => match t.status.as_ref().and_then(|s| s.phase) {
            Some(TaskPhase::Succeeded) => {
                let s = t.status.as_ref().expect("a phase has a status");
                match &s.result_digest {
                    Some(d) => {
                        p.digest = Some(d.clone());
                        p.examples = s.metrics.get("examples").map(|e| e.max(0.0) as u64);
                        p.start_accuracy = s
                            .metrics
                            .get("startAccuracy")
                            .or(s.metrics.get("accuracy"))
                            .copied()
                            .filter(|a| a.is_finite());
                        p.loss = s.metrics.get("loss").copied().filter(|l| l.is_finite());
                        let (cpu, gpu) = run.usage(&t, since);
                        p.cpu_core_millis = cpu;
                        p.gpu_millis = gpu;
                        p.state = ParticipantState::Reported;
                    }
                    None => lost(p, "its task succeeded without a result digest".into()),
                }
            }
            Some(TaskPhase::Failed | TaskPhase::Cancelled) => {
                let msg = t.status.as_ref().and_then(|s| s.message.clone());
                lost(p, format!("its task ended: {}", msg.unwrap_or_default()))
            }
            _ if !run.alive(&p.member, &p.node) => lost(p, "its node was lost".into()),
            _ => {}
        },
        None if !run.alive(&p.member, &p.node) => lost(p, "its node was lost".into()),
        None => {}
    }
}

/// A participant that reported an update it never wrote (only it holds the update's PUT
/// URL, and the agent uploads before it reports) is blamed and left out: a report alone
/// never counts towards a round's quorum.
async fn check_uploaded(run: &Run<'_>, p: &mut Participant, key: &str) {
    if p.state != ParticipantState::Reported {
        return;
    }
    match run.store.head(&ObjectPath::from(key)).await {
        Ok(m) if m.size > 0 && m.size <= MAX_MODEL_BYTES => {}
        Ok(m) => {
            p.state = ParticipantState::Rejected;
            p.blamed = true;
            p.reason = Some(format!("its update is {} bytes", m.size));
        }
        Err(object_store::Error::NotFound { .. }) => {
            p.state = ParticipantState::Rejected;
            p.blamed = true;
            p.reason = Some("it reported an update that is not in the store".into());
        }
        // The store did not answer: look again at the next reconcile.
        Err(_) => p.state = ParticipantState::Running,
    }
}

async fn init(run: &Run<'_>, mut st: FederatedStatus) -> Step {
    let since = started(&st, run.now);
    let timed_out =
        run.now >= since + SignedDuration::from_secs(run.fed.round_timeout_seconds as i64);
    for p in &mut st.participants {
        observe(run, p, 0, FederatedStepKind::Init, since);
        if p.state == ParticipantState::Running && timed_out {
            p.state = ParticipantState::Lost;
            p.reason = Some("it did not build the model in time".into());
        }
        if p.state == ParticipantState::Reported {
            // The builder's own object must hold the digest it reported.
            let m = StoredModel {
                round: 0,
                key: run.keys.init(p.index, p.attempt),
                sha256: p.digest.clone().unwrap_or_default(),
            };
            match verify_object(run, &m).await {
                Ok(true) => {}
                Ok(false) => {
                    p.state = ParticipantState::Lost;
                    p.blamed = true;
                    p.reason = Some("its model is not what it reported".into());
                }
                Err(e) => return Step::Retry(e),
            }
        }
    }
    // A lost builder is replaced by another node (a new attempt, its own key).
    let taken: Vec<(String, String)> = st
        .participants
        .iter()
        .map(|p| (p.member.clone(), p.node.clone()))
        .collect();
    let mut restarted = false;
    for p in st
        .participants
        .iter_mut()
        .filter(|p| p.state == ParticipantState::Lost && p.attempt < AGGREGATOR_ATTEMPTS)
    {
        if let Some((m, n)) = run
            .pick(taken.len() + 1, &taken)
            .into_iter()
            .find(|c| !taken.contains(c))
        {
            let attempt = p.attempt + 1;
            *p = participant(p.index, &m, &n);
            p.attempt = attempt;
            restarted = true;
        }
    }
    if restarted {
        st.stage_started_at = Some(time(run.now));
    }
    if st
        .participants
        .iter()
        .any(|p| p.state == ParticipantState::Running)
    {
        return Step::Wait(st, Duration::from_secs(1));
    }
    let reported: Vec<&Participant> = st
        .participants
        .iter()
        .filter(|p| p.state == ParticipantState::Reported)
        .collect();
    let Some(first) = reported.first() else {
        return Step::Fail(
            st,
            "InitFailed",
            "no node could build the job's initial model".into(),
        );
    };
    if reported.iter().any(|p| p.digest != first.digest) {
        let seen: Vec<String> = reported
            .iter()
            .map(|p| {
                format!(
                    "{}/{}: {}",
                    p.member,
                    p.node,
                    p.digest.clone().unwrap_or_default()
                )
            })
            .collect();
        return Step::Fail(
            st,
            "InitDisagrees",
            format!(
                "the nodes building the initial model disagree (their libtorch builds differ, or one lies): {}",
                seen.join(", ")
            ),
        );
    }
    let built = StoredModel {
        round: 0,
        key: run.keys.init(first.index, first.attempt),
        sha256: first.digest.clone().unwrap_or_default(),
    };
    // The builder's object stays writable through its URL until that expires: the round
    // starts from a write-once copy named by its digest, which nobody can change.
    let global = match write_once_copy(run, &built, &run.keys.global(0)).await {
        Ok(m) => m,
        Err(e) => return Step::Retry(e),
    };
    // Only builders whose own object verified are paid.
    let builders: Vec<Participant> = reported.into_iter().cloned().collect();
    let caught: Vec<Participant> = st
        .participants
        .iter()
        .filter(|p| p.blamed)
        .cloned()
        .collect();
    if let Err(e) = pay(run, &builders, &caught, 0, FederatedStepKind::Init).await {
        return Step::Retry(e);
    }
    st.global_model = Some(global);
    st.round = 1;
    st.participants.clear();
    start_round(run, st)
}

/// Copies `m` (checked against its digest) to a create-only object named by its digest
/// under `prefix`.
async fn write_once_copy(
    run: &Run<'_>,
    m: &StoredModel,
    prefix: &str,
) -> Result<StoredModel, String> {
    let dir = scratch(run, "copy")?;
    let path = dir.join("model.safetensors");
    let result = async {
        if !download(run, m, &path).await? {
            return Err(format!("{} changed after it was checked", m.key));
        }
        let (key, sha256) =
            put_content_addressed(run, prefix, &path)
                .await
                .map_err(|e| match e {
                    HubError::Retry(e) | HubError::Models(e) => e,
                })?;
        Ok(StoredModel {
            round: m.round,
            key,
            sha256,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Starts `st.round`: its stage is Training from now on, with the participants there are
/// (last round's accepted ones first); with none it waits in Training for some.
fn start_round(run: &Run<'_>, mut st: FederatedStatus) -> Step {
    let prefer: Vec<(String, String)> = st
        .participants
        .iter()
        .filter(|p| p.state == ParticipantState::Accepted)
        .map(|p| (p.member.clone(), p.node.clone()))
        .collect();
    let picked = run.pick(run.job.spec.shards as usize, &prefer);
    st = stage(st, RoundStage::Training, run.now);
    st.participants = picked
        .iter()
        .enumerate()
        .map(|(i, (m, n))| participant(i as u32, m, n))
        .collect();
    st.members.clear();
    Step::Advance(st)
}

/// Training: the round closes when enough updates arrived, nothing is running any more,
/// or its timeout passed; the updates that arrived then are the round's (later ones are
/// ignored, their tasks removed).
async fn training(run: &Run<'_>, mut st: FederatedStatus) -> Step {
    if st.participants.is_empty() {
        // No node could take part when the round began: try again (the round's clock
        // starts when it has participants).
        return match start_round(run, st) {
            Step::Advance(st) if st.participants.is_empty() => {
                Step::Wait(st, Duration::from_secs(5))
            }
            other => other,
        };
    }
    let since = started(&st, run.now);
    let round = st.round;
    for p in &mut st.participants {
        observe(run, p, round, FederatedStepKind::Train, since);
        let key = run.keys.update(run.fed.topology, &p.member, round, p.index);
        check_uploaded(run, p, &key).await;
    }
    let count =
        |s: ParticipantState| st.participants.iter().filter(|p| p.state == s).count() as u32;
    let reported = count(ParticipantState::Reported);
    let running = count(ParticipantState::Running);
    let need = run.fed.min_participants_of(st.participants.len() as u32);
    let timed_out =
        run.now >= since + SignedDuration::from_secs(run.fed.round_timeout_seconds as i64);
    if reported < need && running > 0 && !timed_out {
        return Step::Wait(st, Duration::from_millis(500));
    }
    let closed_by = if reported >= need {
        "Quorum"
    } else {
        "Timeout"
    };
    for p in &mut st.participants {
        if p.state == ParticipantState::Running {
            p.state = ParticipantState::Late;
            p.reason = Some(format!("the round closed ({closed_by}) without its update"));
        }
    }
    // The accuracy of the model this round started from, on the reporting nodes' own
    // held-out rows, belongs to the previous round.
    if let Some(a) = weighted_accuracy(
        st.participants
            .iter()
            .filter(|p| p.state == ParticipantState::Reported),
    ) && let Some(prev) = st.rounds.iter_mut().find(|r| r.round + 1 == round)
    {
        prev.accuracy = Some(a);
    }
    st.rounds.push(RoundSummary {
        round,
        participants: st.participants.len() as u32,
        closed_by: closed_by.into(),
        ..RoundSummary::default()
    });
    if reported == 0 {
        return Step::Fail(
            st,
            "RoundFailed",
            format!(
                "round {round}: no update arrived within {} s",
                run.fed.round_timeout_seconds
            ),
        );
    }
    let mut st = stage(st, RoundStage::Aggregating, run.now);
    if run.fed.topology == Topology::Tree {
        let mut members: BTreeMap<String, String> = BTreeMap::new();
        for p in st
            .participants
            .iter()
            .filter(|p| p.state == ParticipantState::Reported)
        {
            members
                .entry(p.member.clone())
                .or_insert_with(|| p.node.clone());
        }
        st.members = members
            .into_iter()
            .map(|(member, node)| MemberModel {
                member,
                node,
                attempt: 1,
                digest: None,
                weight: 0.0,
                cpu_core_millis: 0,
                dropped: false,
                verdicts: Vec::new(),
                blamed: false,
                audit: None,
                audit_bytes: 0,
                tampered: Vec::new(),
                model_key: None,
            })
            .collect();
    }
    Step::Advance(st)
}

/// The example-weighted mean of the starting-model accuracies `participants` reported
/// (their claims), if any reported one.
fn weighted_accuracy<'a>(participants: impl Iterator<Item = &'a Participant>) -> Option<f64> {
    let (mut acc, mut w) = (0.0, 0.0);
    for p in participants {
        if let (Some(a), Some(e)) = (p.start_accuracy, p.examples) {
            acc += a * e as f64;
            w += e as f64;
        }
    }
    (w > 0.0).then(|| acc / w)
}

/// The weights of the reported updates: claimed examples, at most [`WEIGHT_CAP`] times
/// the round's median claim (a node claiming a billion examples does not outweigh the
/// rest), at least 1.
fn weights(st: &FederatedStatus) -> BTreeMap<u32, f64> {
    let counted = |p: &&Participant| {
        matches!(
            p.state,
            ParticipantState::Reported | ParticipantState::Accepted | ParticipantState::Rejected
        ) && p.digest.is_some()
    };
    let mut claims: Vec<u64> = st
        .participants
        .iter()
        .filter(counted)
        .map(|p| p.examples.unwrap_or(1).max(1))
        .collect();
    claims.sort_unstable();
    let median = claims.get(claims.len() / 2).copied().unwrap_or(1) as f64;
    st.participants
        .iter()
        .filter(counted)
        .map(|p| {
            (
                p.index,
                (p.examples.unwrap_or(1).max(1) as f64).min(WEIGHT_CAP * median),
            )
        })
        .collect()
}

async fn aggregating(run: &Run<'_>, st: FederatedStatus) -> Step {
    match run.fed.topology {
        Topology::Flat => aggregate_flat(run, st).await,
        Topology::Tree => aggregate_tree(run, st).await,
    }
}

/// The participants of member `member` whose updates its aggregation was given, in order.
fn member_updates(st: &FederatedStatus, member: &str) -> Vec<u32> {
    st.participants
        .iter()
        .filter(|p| {
            p.member == member
                && matches!(
                    p.state,
                    ParticipantState::Reported
                        | ParticipantState::Accepted
                        | ParticipantState::Rejected
                )
                && !p.blamed
        })
        .map(|p| p.index)
        .collect()
}

/// Tree: one aggregation task per member. Each member's result (digest, verdicts) is
/// recorded in the status as it comes; once every member is resolved, the verdicts are
/// applied, the hub aggregates the member models (every `hubEvery` rounds and at the
/// last) or each member keeps its own, and the round goes to Settling.
async fn aggregate_tree(run: &Run<'_>, mut st: FederatedStatus) -> Step {
    let round = st.round;
    let since = started(&st, run.now);
    let mut changed = false;
    let updates: Vec<Vec<u32>> = st
        .members
        .iter()
        .map(|m| member_updates(&st, &m.member))
        .collect();
    for (i, mm) in st.members.iter_mut().enumerate() {
        if mm.digest.is_some() || mm.dropped {
            continue;
        }
        let name = task_name(
            &run.uid,
            round,
            FederatedStepKind::Aggregate,
            i as u32,
            mm.attempt,
        );
        let failed = match run.task(&mm.member, &name) {
            Some(t) => match t.status.as_ref().and_then(|s| s.phase) {
                Some(TaskPhase::Succeeded) => {
                    let s = t.status.as_ref().expect("status");
                    let n = updates[i].len();
                    if s.result_vector.len() != n || s.result_digest.is_none() {
                        Some(format!(
                            "its aggregation reported {} verdicts for {n} updates",
                            s.result_vector.len()
                        ))
                    } else {
                        mm.digest = s.result_digest.clone();
                        mm.verdicts = s.result_vector.iter().map(|v| verdict_of(*v)).collect();
                        mm.cpu_core_millis = run.usage(&t, since).0;
                        changed = true;
                        None
                    }
                }
                Some(TaskPhase::Failed | TaskPhase::Cancelled) => Some(
                    t.status
                        .as_ref()
                        .and_then(|s| s.message.clone())
                        .unwrap_or_else(|| "failed".into()),
                ),
                _ if !run.alive(&mm.member, &mm.node) => Some("its node was lost".into()),
                _ => None,
            },
            None if !run.alive(&mm.member, &mm.node) => Some("its node was lost".into()),
            None => None,
        };
        if let Some(why) = failed {
            changed = true;
            tracing::info!(job = %run.job.name_any(), member = %mm.member, node = %mm.node, %why, "member aggregation failed");
            // Another alive node of the member, if any is left to try.
            let next = run
                .eligible()
                .into_iter()
                .filter(|(m, n)| m == &mm.member && n != &mm.node)
                .nth((mm.attempt as usize).saturating_sub(1));
            match next {
                Some((_, node)) if mm.attempt < AGGREGATOR_ATTEMPTS => {
                    mm.attempt += 1;
                    mm.node = node;
                }
                _ => mm.dropped = true,
            }
        }
    }
    if st.members.iter().any(|m| m.digest.is_none() && !m.dropped) {
        let timed_out =
            run.now >= since + SignedDuration::from_secs(run.fed.round_timeout_seconds as i64 * 2);
        if !timed_out {
            let wait = if changed { 100 } else { 500 };
            return Step::Wait(st, Duration::from_millis(wait));
        }
        for m in st.members.iter_mut().filter(|m| m.digest.is_none()) {
            m.dropped = true;
        }
        // Record the drops before anything depends on them.
        return Step::Wait(st, Duration::ZERO);
    }
    if changed {
        // Every member's result is recorded first: what follows depends only on the
        // status, so a redo after a crash or a lost write decides the same.
        return Step::Wait(st, Duration::ZERO);
    }
    // The hub's audit (`auditRate`). The draw is made once every member has reported, so
    // an aggregator cannot know whether it will be checked, and recorded before it is
    // acted on; each audit's outcome is recorded before the next.
    let undrawn = |m: &MemberModel| m.audit.is_none() && m.digest.is_some() && !m.dropped;
    if st.members.iter().any(undrawn) {
        for m in st.members.iter_mut().filter(|m| undrawn(m)) {
            m.audit = Some(if must_audit(m) || draw() < run.fed.audit_rate {
                AuditResult::Pending
            } else {
                AuditResult::Skipped
            });
        }
        return Step::Wait(st, Duration::ZERO);
    }
    if let Some(i) = st
        .members
        .iter()
        .position(|m| m.audit == Some(AuditResult::Pending))
    {
        match audit(run, &st, i, &updates[i]).await {
            Ok(outcome) => record_audit(run, &mut st, i, outcome).await,
            Err(e) => return Step::Retry(e),
        }
        return Step::Wait(st, Duration::ZERO);
    }
    // Verdicts per participant, from its member's recorded aggregation (or the hub's
    // recomputation of it).
    let w = weights(&st);
    for (i, mm) in st.members.clone().iter().enumerate() {
        for (k, idx) in updates[i].iter().enumerate() {
            let p = st
                .participants
                .iter_mut()
                .find(|p| p.index == *idx)
                .expect("participant");
            if mm.dropped {
                p.state = ParticipantState::Lost;
                p.reason = Some(if mm.blamed {
                    "its member's aggregation was caught by the hub's audit and could not be redone"
                        .into()
                } else {
                    "its member cluster's aggregation failed on every node tried".into()
                });
                continue;
            }
            if mm.tampered.contains(idx) {
                p.state = ParticipantState::Rejected;
                p.blamed = true;
                p.reason = Some(
                    "its update in the store changed after it reported it (found by the hub's audit)"
                        .into(),
                );
                continue;
            }
            match mm.verdicts.get(k).copied().unwrap_or(-1) {
                1 => p.state = ParticipantState::Accepted,
                0 => {
                    p.state = ParticipantState::Rejected;
                    p.blamed = true;
                    p.reason = Some(
                        "its update was rejected by its member's aggregation (an outlier or a broken model)"
                            .into(),
                    );
                }
                -2 => {
                    p.state = ParticipantState::Rejected;
                    p.reason = Some(
                        "its update was far smaller than the round's (not held against it)".into(),
                    );
                }
                _ => {
                    p.state = ParticipantState::Rejected;
                    p.reason = Some("its member's aggregator could not read its update".into());
                }
            }
        }
        // The member's weight is the operator's: the bounded weights of the updates its
        // aggregation accepted (never the aggregator's own claim).
        let weight: f64 = updates[i]
            .iter()
            .filter(|idx| {
                st.participants
                    .iter()
                    .any(|p| p.index == **idx && p.state == ParticipantState::Accepted)
            })
            .filter_map(|idx| w.get(idx))
            .sum();
        st.members[i].weight = weight;
    }
    let mut bytes_in_members = 0u64;
    let audited = st
        .members
        .iter()
        .filter(|m| {
            matches!(
                m.audit,
                Some(
                    AuditResult::Matched
                        | AuditResult::Mismatched
                        | AuditResult::Corrected
                        | AuditResult::Inconclusive
                )
            )
        })
        .count() as u32;
    let audits_failed = st
        .members
        .iter()
        .filter(|m| m.audit == Some(AuditResult::Mismatched))
        .count() as u32;
    let audit_bytes: u64 = st.members.iter().map(|m| m.audit_bytes).sum();
    for p in st.participants.iter().filter(|p| {
        matches!(
            p.state,
            ParticipantState::Accepted | ParticipantState::Rejected
        )
    }) {
        let key = run.keys.update(Topology::Tree, &p.member, round, p.index);
        bytes_in_members += size_of(run, &key).await.unwrap_or(0);
    }
    let hub = round.is_multiple_of(run.fed.hub_every) || round >= run.rounds;
    let mut bytes_to_hub = audit_bytes;
    let live: Vec<usize> = (0..st.members.len())
        .filter(|i| !st.members[*i].dropped && st.members[*i].weight > 0.0)
        .collect();
    if hub {
        let models: Vec<(StoredModel, f64)> = live
            .iter()
            .map(|i| {
                let m = &st.members[*i];
                (
                    StoredModel {
                        round,
                        key: member_model_key(run, m, round),
                        sha256: m.digest.clone().unwrap_or_default(),
                    },
                    m.weight,
                )
            })
            .collect();
        for (m, _) in &models {
            bytes_to_hub += size_of(run, &m.key).await.unwrap_or(0);
        }
        let base = st.global_model.clone();
        match hub_aggregate(run, &mut st, base, &models, AggregationRule::Mean).await {
            Ok(verdicts) => {
                // A member model that is not in the store, or not what its aggregator
                // reported, is its aggregator's doing: that member is left out.
                for (i, v) in live.iter().zip(verdicts) {
                    if let Verdict::Rejected(why, _) = v {
                        let member = st.members[*i].member.clone();
                        st.members[*i].dropped = true;
                        st.members[*i].blamed = true;
                        for p in st
                            .participants
                            .iter_mut()
                            .filter(|p| p.member == member && p.state == ParticipantState::Accepted)
                        {
                            p.state = ParticipantState::Lost;
                            p.reason = Some(format!("its member's model could not be used: {why}"));
                        }
                    }
                }
            }
            Err(HubError::Retry(e)) => return Step::Retry(e),
            Err(HubError::Models(e)) => {
                return Step::Fail(st, "AggregationFailed", format!("round {round}: {e}"));
            }
        }
        st.bases.clear();
    } else {
        // Between hub rounds each member starts from its own model; the next round's
        // participants check its bytes against the recorded digest when they download it.
        for i in &live {
            let m = &st.members[*i];
            st.bases.insert(
                m.member.clone(),
                StoredModel {
                    round,
                    key: member_model_key(run, m, round),
                    sha256: m.digest.clone().unwrap_or_default(),
                },
            );
        }
    }
    if !st
        .participants
        .iter()
        .any(|p| p.state == ParticipantState::Accepted)
    {
        return Step::Fail(
            st,
            "RoundFailed",
            format!("round {round}: no member cluster's aggregation could be used"),
        );
    }
    summarize(&mut st, bytes_in_members, bytes_to_hub, hub, run.now);
    if let Some(s) = st.rounds.iter_mut().find(|r| r.round == round) {
        s.audited = audited;
        s.audits_failed = audits_failed;
        s.bytes_audited = audit_bytes;
    }
    Step::Advance(stage(st, RoundStage::Settling, run.now))
}

/// Where member `m`'s model of `round` is: its aggregator's object, or the hub's
/// recomputation after a failed audit.
fn member_model_key(run: &Run<'_>, m: &MemberModel, round: u32) -> String {
    m.model_key
        .clone()
        .unwrap_or_else(|| run.keys.member_model(&m.member, round, m.attempt))
}

/// A verdict of the runner's aggregation result vector: 1 accepted, 0 rejected as
/// misbehaviour, -1 unreadable (not held against the node), -2 far smaller than the
/// round's (not held against it either).
fn verdict_of(v: f64) -> i8 {
    if v >= 0.5 {
        1
    } else if v > -0.5 {
        0
    } else if v > -1.5 {
        -1
    } else {
        -2
    }
}

/// Whether member aggregation `m` is audited whatever the draw: one that rejected any
/// update. A rejection costs an honest node its pay (and, for an outlier, a trust strike),
/// so no aggregator may reject unchecked; honest rounds rarely reject, so this costs
/// little.
fn must_audit(m: &MemberModel) -> bool {
    m.verdicts.iter().any(|v| *v != 1)
}

/// A uniform draw in [0, 1) from the operator's random source (not predictable by nodes).
fn draw() -> f64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No random source: audit (the safe side).
        return 0.0;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// What the hub's audit of one member aggregation found.
enum Audit {
    /// Same model, same verdicts.
    Matched { bytes: u64 },
    /// The aggregator computed honestly from what it had, but left out as unreadable
    /// updates the hub could read: the hub's model (key, digest) and verdicts replace its
    /// own, and nobody is blamed.
    Corrected {
        model: (String, String, Vec<i8>),
        bytes: u64,
    },
    /// Not what the aggregator reported: the hub's model (key, digest) and verdicts, or
    /// `None` when the hub's own aggregation of those inputs accepts no update (the
    /// aggregator reported a model where there can be none).
    Mismatched {
        model: Option<(String, String, Vec<i8>)>,
        bytes: u64,
        why: String,
    },
    /// An input no longer has its reported digest (`tampered`: the participants whose
    /// update changed), so nothing is concluded of the aggregator.
    Inconclusive {
        tampered: Vec<u32>,
        bytes: u64,
        why: String,
    },
}

/// Recomputes member `i`'s aggregation at the hub from the inputs its aggregator was given
/// (the member's base, its updates with the operator's weights, the job's rule), with the
/// same code the runner runs (`edgeloom-fl`), and compares digest and verdicts; on a match
/// it also checks that the aggregator's stored model has the digest it reported. An update
/// the aggregator said it could not read is included when the hub can read it (and, if
/// that alone explains the difference, the hub's model is used without blame). `Err` when
/// the store did not answer or the hub itself failed: the audit is retried.
async fn audit(
    run: &Run<'_>,
    st: &FederatedStatus,
    i: usize,
    ours: &[u32],
) -> Result<Audit, String> {
    let round = st.round;
    let mm = &st.members[i];
    let Some(base) = run.base_of(st, &mm.member) else {
        return Ok(Audit::Inconclusive {
            tampered: Vec::new(),
            bytes: 0,
            why: "no base model".into(),
        });
    };
    let w = weights(st);
    let dir = scratch(run, "audit")?;
    let result = async {
        let mut bytes = 0u64;
        let base_path = dir.join("base.safetensors");
        match download(run, &base, &base_path).await {
            Ok(true) => bytes += size_of(run, &base.key).await.unwrap_or(0),
            Ok(false) => {
                return Ok(Audit::Inconclusive {
                    tampered: Vec::new(),
                    bytes,
                    why: format!("the member's base {} differs from its digest", base.key),
                });
            }
            Err(e) => return Err(e),
        }
        let missing = dir.join("missing");
        // (path, weight) of each update as the hub has it, and which of the updates the
        // aggregator called unreadable the hub could read.
        let mut inputs = Vec::new();
        let mut recovered = Vec::new();
        let mut tampered = Vec::new();
        for (k, idx) in ours.iter().enumerate() {
            let p = st
                .participants
                .iter()
                .find(|p| p.index == *idx)
                .ok_or_else(|| format!("participant {idx} is not in the round"))?;
            let claimed_unreadable = mm.verdicts.get(k).copied() == Some(-1);
            let m = StoredModel {
                round,
                key: run.keys.update(Topology::Tree, &p.member, round, p.index),
                sha256: p.digest.clone().unwrap_or_default(),
            };
            let path = dir.join(format!("u{k}.safetensors"));
            let ok = match download(run, &m, &path).await {
                Ok(true) => {
                    bytes += size_of(run, &m.key).await.unwrap_or(0);
                    true
                }
                Ok(false) => false,
                Err(e)
                    if e.contains("not found")
                        || e.contains("NotFound")
                        || e.contains("larger") =>
                {
                    false
                }
                Err(e) => return Err(e),
            };
            if !ok {
                // Its object is not what its participant reported. If the aggregator
                // could not read it either, that is consistent; if it used it, the bytes
                // it saw are gone and nothing can be concluded of it.
                tampered.push(*idx);
                if !claimed_unreadable {
                    return Ok(Audit::Inconclusive {
                        why: format!("update {idx} changed after it was reported"),
                        tampered,
                        bytes,
                    });
                }
            } else if claimed_unreadable {
                recovered.push(k);
            }
            let weight = w.get(idx).copied().unwrap_or(1.0);
            inputs.push((if ok { path } else { missing.clone() }, weight));
        }
        let opts = fl_options(run, run.fed.aggregation);
        let aggregate = |inputs: Vec<(std::path::PathBuf, f64)>, name: &str| {
            let (b, o) = (base_path.clone(), dir.join(name));
            async move {
                let ups = inputs
                    .into_iter()
                    .map(|(path, weight)| edgeloom_fl::Update { path, weight })
                    .collect::<Vec<_>>();
                let out = o.clone();
                let r = tokio::task::spawn_blocking(move || {
                    edgeloom_fl::aggregate(&b, &ups, &opts, &out, Default::default())
                })
                .await
                .map_err(|e| e.to_string())?;
                Ok::<_, String>((r, o))
            }
        };
        let verdicts_of = |o: &edgeloom_fl::Outcome| -> Vec<i8> {
            (0..ours.len())
                .map(|k| match o.rejected.iter().find(|(j, _)| *j == k) {
                    None => 1,
                    Some((_, edgeloom_fl::Rejection::Small { .. })) => -2,
                    Some((_, r)) if r.is_misbehaviour() => 0,
                    Some(_) => -1,
                })
                .collect()
        };
        let (full, full_path) = aggregate(inputs.clone(), "full.safetensors").await?;
        let full = match full {
            Ok(o) => o,
            Err(edgeloom_fl::AggregateError::NoUpdates(_)) => {
                return Ok(Audit::Mismatched {
                    model: None,
                    bytes,
                    why: "the hub's aggregation of the same inputs accepts no update".into(),
                });
            }
            Err(e) => return Err(format!("the hub's aggregation failed: {e}")),
        };
        let full_verdicts = verdicts_of(&full);
        let reported = |sha: &str, v: &[i8]| Some(sha) == mm.digest.as_deref() && v == mm.verdicts;
        let put = |path: std::path::PathBuf| async move {
            let prefix = format!("{}/rounds/{round}/audited", run.keys.member(&mm.member));
            put_content_addressed(run, &prefix, &path)
                .await
                .map_err(|e| match e {
                    HubError::Retry(e) | HubError::Models(e) => e,
                })
        };
        if reported(&full.sha256, &full_verdicts) {
            // The aggregator's stored model must be what it reported.
            let stored = StoredModel {
                round,
                key: member_model_key(run, mm, round),
                sha256: mm.digest.clone().unwrap_or_default(),
            };
            let held = dir.join("stored.safetensors");
            return match download(run, &stored, &held).await {
                Ok(true) => Ok(Audit::Matched {
                    bytes: bytes + size_of(run, &stored.key).await.unwrap_or(0),
                }),
                Ok(false) => {
                    let (key, sha) = put(full_path).await?;
                    Ok(Audit::Mismatched {
                        model: Some((key, sha, full_verdicts)),
                        bytes,
                        why: "its stored model is not the one it reported".into(),
                    })
                }
                Err(e)
                    if e.contains("not found")
                        || e.contains("NotFound")
                        || e.contains("larger") =>
                {
                    let (key, sha) = put(full_path).await?;
                    Ok(Audit::Mismatched {
                        model: Some((key, sha, full_verdicts)),
                        bytes,
                        why: format!("its stored model cannot be used: {e}"),
                    })
                }
                Err(e) => Err(e),
            };
        }
        if !recovered.is_empty() {
            // Did it compute honestly from what it says it had?
            let mut claimed = inputs.clone();
            for k in &recovered {
                claimed[*k].0 = missing.clone();
            }
            if let (Ok(o), _) = aggregate(claimed, "claimed.safetensors").await?
                && reported(&o.sha256, &verdicts_of(&o))
            {
                let (key, sha) = put(full_path).await?;
                return Ok(Audit::Corrected {
                    model: (key, sha, full_verdicts),
                    bytes,
                });
            }
        }
        let why = if Some(&full.sha256) != mm.digest.as_ref() {
            "its model differs from the hub's recomputation".to_string()
        } else {
            format!(
                "its verdicts {:?} differ from the hub's {:?}",
                mm.verdicts, full_verdicts
            )
        };
        let (key, sha) = put(full_path).await?;
        Ok(Audit::Mismatched {
            model: Some((key, sha, full_verdicts)),
            bytes,
            why,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Records the audit of member `i` in the status, with an event and a metric.
async fn record_audit(run: &Run<'_>, st: &mut FederatedStatus, i: usize, outcome: Audit) {
    let round = st.round;
    let m = &mut st.members[i];
    let (result, note) = match outcome {
        Audit::Matched { bytes } => {
            m.audit = Some(AuditResult::Matched);
            m.audit_bytes = bytes;
            ("matched", None)
        }
        Audit::Corrected {
            model: (key, sha, verdicts),
            bytes,
        } => {
            m.audit = Some(AuditResult::Corrected);
            m.audit_bytes = bytes;
            m.model_key = Some(key);
            m.digest = Some(sha);
            m.verdicts = verdicts;
            let note = format!(
                "round {round}: member {}'s aggregator {} left out updates it said it could not read, which the hub could: the hub's aggregation with them is used",
                m.member, m.node
            );
            (
                "corrected",
                Some((EventType::Normal, "AggregationAuditCorrected", note)),
            )
        }
        Audit::Mismatched { model, bytes, why } => {
            m.audit = Some(AuditResult::Mismatched);
            m.audit_bytes = bytes;
            m.blamed = true;
            match model {
                Some((key, sha, verdicts)) => {
                    m.model_key = Some(key);
                    m.digest = Some(sha);
                    m.verdicts = verdicts;
                }
                None => m.dropped = true,
            }
            let note = format!(
                "round {round}: the aggregation of member {} by node {} was not reproduced by the hub ({why}); the node is caught and not paid{}",
                m.member,
                m.node,
                if m.dropped {
                    ", and the member is left out of the round"
                } else {
                    ", and the hub's recomputation is used"
                }
            );
            (
                "mismatched",
                Some((EventType::Warning, "AggregationAuditFailed", note)),
            )
        }
        Audit::Inconclusive {
            tampered,
            bytes,
            why,
        } => {
            m.audit = Some(AuditResult::Inconclusive);
            m.audit_bytes = bytes;
            m.tampered = tampered;
            let note = format!(
                "round {round}: the audit of member {}'s aggregation is inconclusive: {why}",
                m.member
            );
            (
                "inconclusive",
                Some((EventType::Warning, "AggregationAuditInconclusive", note)),
            )
        }
    };
    run.ctx
        .metrics
        .federated_audits
        .with_label_values(&[result])
        .inc();
    if let Some((t, reason, note)) = note {
        tracing::warn!(job = %run.job.name_any(), %note, "federated audit");
        event(run, t, reason, &note).await;
    }
}

/// The `edgeloom-fl` settings of the job under `rule`: those the runner's aggregation
/// uses too, so that the hub's recomputation of a member's aggregation is exact.
fn fl_options(run: &Run<'_>, rule: AggregationRule) -> edgeloom_fl::Options {
    edgeloom_fl::Options {
        rule: match rule {
            AggregationRule::Mean => edgeloom_fl::Rule::Mean,
            AggregationRule::TrimmedMean => edgeloom_fl::Rule::TrimmedMean {
                trim: run.fed.trim_fraction,
            },
            AggregationRule::Median => edgeloom_fl::Rule::Median,
        },
        chunk: CHUNK,
        outlier_cutoff: run.fed.outlier_cutoff,
    }
}

/// Flat: the hub aggregates every update itself.
async fn aggregate_flat(run: &Run<'_>, mut st: FederatedStatus) -> Step {
    let round = st.round;
    let reported: Vec<Participant> = st
        .participants
        .iter()
        .filter(|p| p.state == ParticipantState::Reported)
        .cloned()
        .collect();
    let w = weights(&st);
    let models: Vec<(StoredModel, f64)> = reported
        .iter()
        .map(|p| {
            (
                StoredModel {
                    round,
                    key: run.keys.update(Topology::Flat, &p.member, round, p.index),
                    sha256: p.digest.clone().unwrap_or_default(),
                },
                w.get(&p.index).copied().unwrap_or(1.0),
            )
        })
        .collect();
    let mut bytes_to_hub = 0u64;
    for (m, _) in &models {
        bytes_to_hub += size_of(run, &m.key).await.unwrap_or(0);
    }
    let base = st.global_model.clone();
    let rule = run.fed.aggregation;
    let verdicts = match hub_aggregate(run, &mut st, base, &models, rule).await {
        Ok(v) => v,
        Err(HubError::Retry(e)) => return Step::Retry(e),
        Err(HubError::Models(e)) => {
            return Step::Fail(st, "AggregationFailed", format!("round {round}: {e}"));
        }
    };
    for (p, v) in reported.iter().zip(verdicts) {
        let q = st
            .participants
            .iter_mut()
            .find(|q| q.index == p.index)
            .expect("participant");
        match v {
            Verdict::Accepted => q.state = ParticipantState::Accepted,
            Verdict::Rejected(why, blame) => {
                q.state = ParticipantState::Rejected;
                q.reason = Some(why);
                q.blamed = blame;
            }
        }
    }
    summarize(&mut st, 0, bytes_to_hub, true, run.now);
    Step::Advance(stage(st, RoundStage::Settling, run.now))
}

/// Fills the round's summary from its recorded verdicts.
fn summarize(
    st: &mut FederatedStatus,
    bytes_in_members: u64,
    bytes_to_hub: u64,
    hub: bool,
    now: Timestamp,
) {
    let round = st.round;
    let count =
        |s: ParticipantState| st.participants.iter().filter(|p| p.state == s).count() as u32;
    let (accepted, rejected) = (
        count(ParticipantState::Accepted),
        count(ParticipantState::Rejected),
    );
    let missing = st.participants.len() as u32 - accepted - rejected;
    let losses: Vec<f64> = st
        .participants
        .iter()
        .filter(|p| p.state == ParticipantState::Accepted)
        .filter_map(|p| p.loss)
        .collect();
    if let Some(s) = st.rounds.iter_mut().find(|r| r.round == round) {
        s.accepted = accepted;
        s.rejected = rejected;
        s.missing = missing;
        s.hub = hub;
        s.loss = (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64);
        s.bytes_in_members = bytes_in_members;
        s.bytes_to_hub = bytes_to_hub;
        s.closed_at = Some(time(now));
    }
}

/// Settling: pays what the recorded verdicts accepted (updates and aggregations), counts
/// what they blame against its nodes, and starts the next round or the final evaluation.
/// Everything here comes from the status, so a redo pays the same receipts (idempotent).
async fn settling(run: &Run<'_>, mut st: FederatedStatus) -> Step {
    let round = st.round;
    let caught: Vec<Participant> = st
        .participants
        .iter()
        .filter(|p| p.blamed)
        .cloned()
        .collect();
    if let Err(e) = pay(
        run,
        &st.participants,
        &caught,
        round,
        FederatedStepKind::Train,
    )
    .await
    {
        return Step::Retry(e);
    }
    let aggregators: Vec<Participant> = st
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.digest.is_some())
        .map(|(i, m)| Participant {
            cpu_core_millis: m.cpu_core_millis,
            digest: m.digest.clone(),
            attempt: m.attempt,
            state: if m.blamed {
                ParticipantState::Rejected
            } else {
                ParticipantState::Accepted
            },
            blamed: m.blamed,
            ..participant(i as u32, &m.member, &m.node)
        })
        .collect();
    let blamed: Vec<Participant> = aggregators.iter().filter(|a| a.blamed).cloned().collect();
    if let Err(e) = pay(
        run,
        &aggregators,
        &blamed,
        round,
        FederatedStepKind::Aggregate,
    )
    .await
    {
        return Step::Retry(e);
    }
    let summary = st
        .rounds
        .iter()
        .find(|r| r.round == round)
        .cloned()
        .unwrap_or_default();
    let (accepted, rejected_n, missing, hub) = (
        summary.accepted,
        summary.rejected,
        summary.missing,
        summary.hub,
    );
    for p in st.participants.iter().filter(|p| p.blamed) {
        let cluster = p.member.split_once('/').map_or(p.member.as_str(), |x| x.1);
        let key = format!("{cluster}/{}", p.node);
        if st.rejected_updates.len() < 1000 || st.rejected_updates.contains_key(&key) {
            *st.rejected_updates.entry(key).or_default() += 1;
        }
    }
    let keep = run.fed.history.max(1) as usize;
    if st.rounds.len() > keep {
        let drop = st.rounds.len() - keep;
        st.rounds.drain(..drop);
    }
    st.bytes_in_members += summary.bytes_in_members;
    st.bytes_to_hub += summary.bytes_to_hub;
    st.completed_rounds = round;
    let m = &run.ctx.metrics;
    m.federated_rounds
        .with_label_values(&[&format!("{:?}", run.fed.topology)])
        .inc();
    m.federated_updates
        .with_label_values(&["accepted"])
        .inc_by(accepted as u64);
    m.federated_updates
        .with_label_values(&["rejected"])
        .inc_by(rejected_n as u64);
    m.federated_updates
        .with_label_values(&["missing"])
        .inc_by(missing as u64);
    m.federated_bytes
        .with_label_values(&["member"])
        .inc_by(summary.bytes_in_members);
    m.federated_bytes
        .with_label_values(&["hub"])
        .inc_by(summary.bytes_to_hub);
    let why: Vec<String> = st
        .participants
        .iter()
        .filter(|p| p.state == ParticipantState::Rejected)
        .map(|p| {
            format!(
                "{}/{}: {}",
                p.member,
                p.node,
                p.reason.clone().unwrap_or_default()
            )
        })
        .collect();
    event(
        run,
        if rejected_n > 0 {
            EventType::Warning
        } else {
            EventType::Normal
        },
        "RoundCompleted",
        &format!(
            "round {round}/{}: {accepted} of {} updates accepted, {rejected_n} rejected, {missing} missing{}{}",
            run.rounds,
            st.participants.len(),
            if hub { "; hub aggregated" } else { "" },
            if why.is_empty() {
                String::new()
            } else {
                format!("; rejected {}", why.join("; "))
            }
        ),
    )
    .await;
    if round >= run.rounds {
        let prefer: Vec<(String, String)> = st
            .participants
            .iter()
            .filter(|p| p.state == ParticipantState::Accepted)
            .map(|p| (p.member.clone(), p.node.clone()))
            .collect();
        let picked = run.pick(run.job.spec.shards as usize, &prefer);
        let mut st = stage(st, RoundStage::Evaluating, run.now);
        st.participants = picked
            .iter()
            .enumerate()
            .map(|(i, (m, n))| participant(i as u32, m, n))
            .collect();
        st.members.clear();
        if st.participants.is_empty() {
            st.stage = Some(RoundStage::Done);
            return Step::Done(st);
        }
        return Step::Advance(st);
    }
    st.round += 1;
    start_round(run, st)
}

/// Evaluation of the final model on the last participants' held-out rows. Its results
/// are claims that cannot be checked, so evaluations are not paid (they take seconds).
async fn evaluating(run: &Run<'_>, mut st: FederatedStatus) -> Step {
    let since = started(&st, run.now);
    for p in &mut st.participants {
        observe(run, p, run.rounds, FederatedStepKind::Evaluate, since);
    }
    let timed_out =
        run.now >= since + SignedDuration::from_secs(run.fed.round_timeout_seconds as i64);
    if st
        .participants
        .iter()
        .any(|p| p.state == ParticipantState::Running)
        && !timed_out
    {
        return Step::Wait(st, Duration::from_millis(500));
    }
    let accuracy = weighted_accuracy(
        st.participants
            .iter()
            .filter(|p| p.state == ParticipantState::Reported),
    );
    for p in st.participants.iter_mut() {
        if p.state == ParticipantState::Reported {
            p.state = ParticipantState::Accepted;
        } else if p.state == ParticipantState::Running {
            p.state = ParticipantState::Late;
        }
    }
    if let Some(a) = accuracy {
        st.final_accuracy = Some(a);
        if let Some(last) = st.rounds.iter_mut().find(|r| r.round == run.rounds) {
            last.accuracy = Some(a);
        }
    }
    st.stage = Some(RoundStage::Done);
    Step::Done(st)
}

/// Creates the tasks the current stage needs (after its status is written) and returns
/// the names of every task of the job that is still wanted.
async fn dispatch(run: &Run<'_>, st: &FederatedStatus) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    let Some(stage) = st.stage else { return keep };
    let round = st.round;
    let mut creates = Vec::new();
    match stage {
        RoundStage::Init | RoundStage::Training | RoundStage::Evaluating => {
            let step = match stage {
                RoundStage::Init => FederatedStepKind::Init,
                RoundStage::Training => FederatedStepKind::Train,
                _ => FederatedStepKind::Evaluate,
            };
            for p in &st.participants {
                let name = task_name(&run.uid, round, step, p.index, p.attempt);
                keep.insert(name);
                if p.state != ParticipantState::Running {
                    continue;
                }
                let urls = match step {
                    FederatedStepKind::Init => run
                        .presign(
                            object_store::signer::Method::PUT,
                            &run.keys.init(p.index, p.attempt),
                        )
                        .await
                        .map(|out| FederatedUrls {
                            output: Some(out),
                            ..Default::default()
                        }),
                    FederatedStepKind::Train => match run.base_of(st, &p.member) {
                        Some(base) => {
                            let key = run.keys.update(run.fed.topology, &p.member, round, p.index);
                            match (
                                run.get_url(&base, None).await,
                                run.presign(object_store::signer::Method::PUT, &key).await,
                            ) {
                                (Ok(model), Ok(out)) => Ok(FederatedUrls {
                                    model: Some(model),
                                    output: Some(out),
                                    updates: Vec::new(),
                                }),
                                (Err(e), _) | (_, Err(e)) => Err(e),
                            }
                        }
                        None => Err("no model to start from".into()),
                    },
                    _ => match &st.global_model {
                        Some(g) => run.get_url(g, None).await.map(|model| FederatedUrls {
                            model: Some(model),
                            ..Default::default()
                        }),
                        None => Err("no model to evaluate".into()),
                    },
                };
                match urls {
                    Ok(urls) => creates.push(
                        run.ensure_task(&p.member, &p.node, round, step, p.index, p.attempt, urls),
                    ),
                    Err(e) => {
                        tracing::warn!(job = %run.job.name_any(), error = %e, "federated task not created")
                    }
                }
            }
        }
        RoundStage::Aggregating | RoundStage::Settling => {
            // The updates the round closed with stay until it is paid; stragglers go.
            for p in st.participants.iter().filter(|p| {
                matches!(
                    p.state,
                    ParticipantState::Reported
                        | ParticipantState::Accepted
                        | ParticipantState::Rejected
                )
            }) {
                keep.insert(task_name(
                    &run.uid,
                    round,
                    FederatedStepKind::Train,
                    p.index,
                    p.attempt,
                ));
            }
            if run.fed.topology == Topology::Tree && stage == RoundStage::Aggregating {
                let w = weights(st);
                for (i, mm) in st.members.iter().enumerate() {
                    let name = task_name(
                        &run.uid,
                        round,
                        FederatedStepKind::Aggregate,
                        i as u32,
                        mm.attempt,
                    );
                    keep.insert(name);
                    if mm.digest.is_some() || mm.dropped {
                        continue;
                    }
                    let Some(base) = run.base_of(st, &mm.member) else {
                        continue;
                    };
                    let mut updates = Vec::new();
                    let mut failed = None;
                    let ours = member_updates(st, &mm.member);
                    for p in st.participants.iter().filter(|p| ours.contains(&p.index)) {
                        let m = StoredModel {
                            round,
                            key: run.keys.update(Topology::Tree, &p.member, round, p.index),
                            sha256: p.digest.clone().unwrap_or_default(),
                        };
                        match run.get_url(&m, w.get(&p.index).copied()).await {
                            Ok(o) => updates.push(o),
                            Err(e) => failed = Some(e),
                        }
                    }
                    let urls = match (
                        failed,
                        run.get_url(&base, None).await,
                        run.presign(
                            object_store::signer::Method::PUT,
                            &run.keys.member_model(&mm.member, round, mm.attempt),
                        )
                        .await,
                    ) {
                        (None, Ok(model), Ok(out)) => FederatedUrls {
                            model: Some(model),
                            output: Some(out),
                            updates,
                        },
                        (Some(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                            tracing::warn!(job = %run.job.name_any(), error = %e, "aggregation task not created");
                            continue;
                        }
                    };
                    creates.push(run.ensure_task(
                        &mm.member,
                        &mm.node,
                        round,
                        FederatedStepKind::Aggregate,
                        i as u32,
                        mm.attempt,
                        urls,
                    ));
                }
            }
        }
        RoundStage::Done => {}
    }
    for r in futures::future::join_all(creates).await {
        if let Err(e) = r {
            tracing::warn!(job = %run.job.name_any(), error = %e, "federated task not created; will retry");
        }
    }
    keep
}

/// Deletes the job's tasks that are not in `keep` (closed rounds' stragglers, finished
/// stages), in every member.
async fn cleanup_tasks(job: &ComputeJob, members: &[Arc<Member>], keep: &BTreeSet<String>) {
    let uid = job.uid().unwrap_or_default();
    let mut deletes = Vec::new();
    for m in members {
        for t in m.tasks.by_key(&uid) {
            if keep.contains(&*t.name) {
                continue;
            }
            let api = m.tasks_api();
            let name = t.name.to_string();
            deletes.push(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    api.delete(&name, &DeleteParams::background()),
                )
                .await;
            });
        }
    }
    futures::future::join_all(deletes).await;
}

/// Size of an object (a fact the store tells), for the bytes moved.
async fn size_of(run: &Run<'_>, key: &str) -> Option<u64> {
    run.store
        .head(&ObjectPath::from(key))
        .await
        .ok()
        .map(|m| m.size)
}

/// Whether the object's bytes have its digest (streamed to a scratch file, at most
/// [`MAX_MODEL_BYTES`]); `Err` when the store did not answer.
async fn verify_object(run: &Run<'_>, m: &StoredModel) -> Result<bool, String> {
    let dir = scratch(run, "verify")?;
    let got = download(run, m, &dir.join("object")).await;
    let _ = std::fs::remove_dir_all(&dir);
    match got {
        Ok(ok) => Ok(ok),
        Err(e) if e.contains("not found") || e.contains("NotFound") || e.contains("larger") => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// A fresh scratch directory of this job (the operator's temporary directory: an
/// emptyDir under the chart).
fn scratch(run: &Run<'_>, what: &str) -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "edgeloom-{what}-{}-{}-{}",
        task_prefix(&run.uid),
        std::process::id(),
        SCRATCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

static SCRATCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

enum HubError {
    /// The store did not answer: try again.
    Retry(String),
    /// The models cannot be aggregated.
    Models(String),
}

/// What the hub's aggregation says of one input.
enum Verdict {
    Accepted,
    /// Why, and whether its writer is to blame.
    Rejected(String, bool),
}

/// Downloads `base` and `models` (checking each against its digest, at most
/// [`MAX_MODEL_BYTES`] each) into a scratch directory, aggregates them under `rule`
/// (streamed, bounded memory), applies the job's server step and writes the round's
/// global model under a name derived from its digest, create-only: a redo writes the same
/// object, or, had its inputs changed, another one that nothing names.
async fn hub_aggregate(
    run: &Run<'_>,
    st: &mut FederatedStatus,
    base: Option<StoredModel>,
    models: &[(StoredModel, f64)],
    rule: AggregationRule,
) -> Result<Vec<Verdict>, HubError> {
    let round = st.round;
    let Some(base) = base else {
        return Err(HubError::Models(
            "no global model to aggregate against".into(),
        ));
    };
    let dir = scratch(run, "hub").map_err(HubError::Retry)?;
    let result = async {
        let base_path = dir.join("base.safetensors");
        match download(run, &base, &base_path).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(HubError::Models(format!(
                    "the round's model {} differs from its digest",
                    base.key
                )));
            }
            Err(e) => return Err(HubError::Retry(e)),
        }
        let mut updates = Vec::new();
        let mut mismatched = BTreeSet::new();
        for (i, (m, w)) in models.iter().enumerate() {
            let path = dir.join(format!("u{i}.safetensors"));
            match download(run, m, &path).await {
                Ok(true) => {}
                Ok(false) => {
                    mismatched.insert(i);
                }
                Err(e)
                    if e.contains("not found")
                        || e.contains("NotFound")
                        || e.contains("larger") =>
                {
                    mismatched.insert(i);
                }
                Err(e) => return Err(HubError::Retry(e)),
            }
            // Inputs whose bytes are not what their writer reported never reach the
            // aggregation.
            let path = if mismatched.contains(&i) {
                dir.join("missing")
            } else {
                path
            };
            updates.push(edgeloom_fl::Update { path, weight: *w });
        }
        let opts = fl_options(run, rule);
        let agg_path = dir.join("aggregate.safetensors");
        let outcome = {
            let (b, a) = (base_path.clone(), agg_path.clone());
            tokio::task::spawn_blocking(move || {
                edgeloom_fl::aggregate(&b, &updates, &opts, &a, Default::default())
            })
            .await
            .map_err(|e| HubError::Retry(e.to_string()))?
        };
        let outcome = outcome.map_err(|e| HubError::Models(e.to_string()))?;
        let step = edgeloom_fl::ServerStep {
            lr: run.fed.server_learning_rate,
            beta: run.fed.server_momentum,
        };
        let model_path = if step.is_plain() {
            agg_path.clone()
        } else {
            let momentum_path = dir.join("momentum-in.safetensors");
            let had_momentum = match &st.momentum {
                Some(m) => match download(run, m, &momentum_path).await {
                    Ok(true) => true,
                    Ok(false) => {
                        return Err(HubError::Models(
                            "the momentum buffer differs from its digest".into(),
                        ));
                    }
                    Err(e) => return Err(HubError::Retry(e)),
                },
                None => false,
            };
            let (out_model, out_momentum) = (
                dir.join("model.safetensors"),
                dir.join("momentum.safetensors"),
            );
            let (b, a, mi, om, ov) = (
                base_path.clone(),
                agg_path.clone(),
                momentum_path.clone(),
                out_model.clone(),
                out_momentum.clone(),
            );
            tokio::task::spawn_blocking(move || {
                step.apply(
                    &b,
                    &a,
                    had_momentum.then_some(mi.as_path()),
                    &om,
                    &ov,
                    CHUNK,
                )
            })
            .await
            .map_err(|e| HubError::Retry(e.to_string()))?
            .map_err(|e| HubError::Models(e.to_string()))?;
            let (key, sha) = put_content_addressed(run, &run.keys.momentum(round), &out_momentum).await?;
            st.momentum = Some(StoredModel {
                round,
                key,
                sha256: sha,
            });
            out_model
        };
        let (key, sha) = put_content_addressed(run, &run.keys.global(round), &model_path).await?;
        st.global_model = Some(StoredModel {
            round,
            key,
            sha256: sha,
        });
        let verdicts = (0..models.len())
            .map(|i| {
                if mismatched.contains(&i) {
                    return Verdict::Rejected(
                        "its update is not in the store, or its bytes differ from the digest it reported"
                            .into(),
                        true,
                    );
                }
                match outcome.rejected.iter().find(|(j, _)| *j == i) {
                    None => Verdict::Accepted,
                    Some((_, r)) => Verdict::Rejected(
                        format!("its update was rejected: {r}"),
                        r.is_misbehaviour(),
                    ),
                }
            })
            .collect();
        Ok(verdicts)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Downloads `m` to `path`: `Ok(false)` when its bytes are not its digest; an object
/// larger than [`MAX_MODEL_BYTES`] is an error naming it.
async fn download(run: &Run<'_>, m: &StoredModel, path: &std::path::Path) -> Result<bool, String> {
    use sha2::Digest as _;
    use tokio::io::AsyncWriteExt as _;
    let got = run
        .store
        .get(&ObjectPath::from(m.key.as_str()))
        .await
        .map_err(|e| format!("reading {}: {e}", m.key))?;
    if got.meta.size > MAX_MODEL_BYTES {
        return Err(format!(
            "{} is larger than {MAX_MODEL_BYTES} bytes, the most the hub aggregates",
            m.key
        ));
    }
    let mut stream = got.into_stream();
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| e.to_string())?;
    let mut h = sha2::Sha256::new();
    let mut total = 0u64;
    while let Some(chunk) = stream
        .try_next()
        .await
        .map_err(|e| format!("reading {}: {e}", m.key))?
    {
        total += chunk.len() as u64;
        if total > MAX_MODEL_BYTES {
            return Err(format!("{} is larger than {MAX_MODEL_BYTES} bytes", m.key));
        }
        h.update(&chunk);
        file.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    Ok(hex::encode(h.finalize()) == m.sha256)
}

/// Writes a model create-only under `<prefix>-<first 16 hex of its sha256>.safetensors`;
/// an object already there holds the same bytes. Returns its key and digest.
async fn put_content_addressed(
    run: &Run<'_>,
    prefix: &str,
    path: &std::path::Path,
) -> Result<(String, String), HubError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| HubError::Retry(e.to_string()))?;
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    let key = format!("{prefix}-{}.safetensors", &sha[..16]);
    let at = ObjectPath::from(key.as_str());
    match run
        .store
        .put_opts(&at, PutPayload::from(bytes), PutMode::Create.into())
        .await
    {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok((key, sha)),
        Err(e) => Err(HubError::Retry(format!("writing {key}: {e}"))),
    }
}

/// Pays the accepted ones of `done` (a step's tasks of `round`; for training only the
/// accepted updates) and counts `caught` against their nodes, through the ledger
/// (idempotent by job, round, participant and step).
async fn pay(
    run: &Run<'_>,
    done: &[Participant],
    caught: &[Participant],
    round: u32,
    step: FederatedStepKind,
) -> Result<(), String> {
    let replica = replica_of(step);
    let cluster = |m: &str| m.split_once('/').map_or(m.to_string(), |x| x.1.to_string());
    let accepted: Vec<Accepted> = done
        .iter()
        .filter(|p| match step {
            FederatedStepKind::Train => p.state == ParticipantState::Accepted,
            _ => matches!(
                p.state,
                ParticipantState::Accepted | ParticipantState::Reported
            ),
        })
        .map(|p| Accepted {
            shard: p.index,
            replica,
            attempt: p.attempt,
            member: p.member.clone(),
            cluster: cluster(&p.member),
            node: p.node.clone(),
            digest: p.digest.clone().unwrap_or_default(),
            cpu_core_millis: p.cpu_core_millis,
            gpu_millis: p.gpu_millis,
            verified: false,
            relative_speed_milli: None,
        })
        .collect();
    let outvoted: Vec<Outvoted> = caught
        .iter()
        .map(|p| Outvoted {
            why: Caught::Outvoted,
            attempt: p.attempt,
            shard: p.index,
            replica,
            member: p.member.clone(),
            cluster: cluster(&p.member),
            node: p.node.clone(),
        })
        .collect();
    if accepted.is_empty() && outvoted.is_empty() {
        return Ok(());
    }
    let budget: Option<Amount> = run
        .job
        .spec
        .budget
        .as_ref()
        .and_then(|b| b.max_amount.0.parse().ok());
    let paid_before = settle::job_totals(&run.uid, &run.members, run.ctx)
        .await
        .map_err(|e| e.to_string())?;
    let problems = settle::pay(
        run.job,
        (&accepted, &outvoted, Some(round)),
        run.ctx,
        run.now,
        budget,
        &paid_before,
    )
    .await
    .map_err(|e| e.to_string())?;
    for p in problems {
        tracing::warn!(job = %run.job.name_any(), problem = %p, "federated receipt not issued");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_updates_of_a_tree_stay_under_their_members_prefix() {
        let k = Keys::new(&ObjectPath::from("edgeloom"), "uid-1");
        let hub = k.hub();
        assert_eq!(hub, "edgeloom/jobs/uid-1");
        let tree = k.update(Topology::Tree, "pool/edge-a", 3, 2);
        assert_eq!(
            tree,
            "edgeloom/members/pool/edge-a/jobs/uid-1/rounds/3/updates/2.safetensors"
        );
        assert!(!tree.starts_with(&hub));
        assert!(
            k.member_model("pool/edge-a", 3, 1)
                .starts_with(&k.member("pool/edge-a"))
        );
        assert_ne!(
            k.member_model("pool/edge-a", 3, 1),
            k.member_model("pool/edge-a", 3, 2)
        );
        assert_ne!(k.init(0, 1), k.init(0, 2));
        assert!(
            k.update(Topology::Flat, "pool/edge-a", 3, 2)
                .starts_with(&hub)
        );
        assert!(k.global(3).starts_with(&hub));
        assert_eq!(Keys::new(&ObjectPath::default(), "u").hub(), "jobs/u");
    }

    #[test]
    fn a_claimed_example_count_weighs_at_most_three_medians() {
        let mut st = FederatedStatus::default();
        for (i, e) in [100u64, 120, 90, 1_000_000_000].iter().enumerate() {
            let mut p = participant(i as u32, "p/a", &format!("n{i}"));
            p.state = ParticipantState::Reported;
            p.examples = Some(*e);
            p.digest = Some("d".repeat(64));
            st.participants.push(p);
        }
        let mut lost = participant(9, "p/a", "n9");
        lost.state = ParticipantState::Lost;
        lost.examples = Some(5);
        st.participants.push(lost);
        let w = weights(&st);
        assert_eq!(w.len(), 4);
        assert_eq!(w[&0], 100.0);
        // The median of (90, 100, 120, 1e9) taken as the upper middle: 120.
        assert_eq!(w[&3], 360.0);
    }

    #[test]
    fn a_member_aggregation_that_rejects_anything_is_always_audited() {
        let member = |verdicts: Vec<i8>| MemberModel {
            member: "edge/a".into(),
            node: "n".into(),
            attempt: 1,
            digest: Some("d".into()),
            weight: 0.0,
            cpu_core_millis: 0,
            dropped: false,
            verdicts,
            blamed: false,
            audit: None,
            audit_bytes: 0,
            tampered: Vec::new(),
            model_key: None,
        };
        assert!(!must_audit(&member(vec![1, 1, 1])));
        for v in [0, -1, -2] {
            assert!(must_audit(&member(vec![1, v, 1])), "{v}");
        }
        // The runner's result vector, as the operator reads it.
        assert_eq!([1.0, 0.0, -1.0, -2.0].map(verdict_of), [1, 0, -1, -2]);
        let draws: Vec<f64> = (0..1000).map(|_| draw()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let share = draws.iter().filter(|d| **d < 0.1).count();
        assert!(
            (40..=170).contains(&share),
            "{share} of 1000 draws below 0.1"
        );
    }

    #[test]
    fn task_names_are_distinct_per_round_step_index_and_attempt() {
        let uid = "0123456789abcdef-rest";
        let mut seen = BTreeSet::new();
        for round in [0, 1, 10] {
            for step in [
                FederatedStepKind::Init,
                FederatedStepKind::Train,
                FederatedStepKind::Aggregate,
                FederatedStepKind::Evaluate,
            ] {
                for index in [0, 1, 11] {
                    for attempt in [1, 2] {
                        assert!(seen.insert(task_name(uid, round, step, index, attempt)));
                    }
                }
            }
        }
        assert!(
            seen.iter()
                .all(|n| n.len() <= 63 && n.starts_with("0123456789abcdef-r"))
        );
    }
}
