//! The ComputeJob controller: read the job and its tasks in every member cluster, decide
//! ([`crate::lifecycle`]), cancel what must stop, submit what needs a node to the
//! scheduler, and write status by server-side apply. A finalizer removes the job's tasks
//! from every member cluster, waiting for unreachable ones, before the job goes away.

use crate::conditions;
use crate::context::{Context, FIELD_MANAGER, JOB_FINALIZER};
use crate::decimal::Amount;
use crate::fleet::Member;
use crate::lifecycle::{self, BudgetView, JobView, TaskView};
use crate::rewards::settle;
use crate::rewards::store::Totals;
use crate::scheduler::{Work, selector_matches};
use crate::shard_pages;
use edgeloom_crds::commitment::REVEAL_ANNOTATION;
use edgeloom_crds::compute_job::{ComputeJobStatus, IssuedAttempt, ShardStatus};
use edgeloom_crds::compute_task::JOB_UID_LABEL;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::{ComputeJob, EdgePool, JobPhase, TaskPhase};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for one call to a member's API server inside a job reconcile.
const MEMBER_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest wait for a read of the ledger (totals, trust) inside a job reconcile.
const LEDGER_READ_TIMEOUT: Duration = Duration::from_secs(5);
const LEDGER_SLOW: &str = "the ledger did not answer within 5 s";

/// Errors of the job controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing to the hub failed.
    #[error("hub API: {0}")]
    Hub(#[source] kube::Error),
    /// Tasks remain in member clusters that cannot be reached yet.
    #[error("{0} task(s) remain in unreachable member clusters: {1}")]
    CleanupPending(usize, String),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// Paying failed (ledger, trust records, reward arithmetic).
    #[error(transparent)]
    Rewards(#[from] settle::Error),
    /// A deleted job's results wait for the ledger before its tasks go.
    #[error("settlement pending: {0}")]
    SettlementPending(String),
}

impl Error {
    /// Bounded category for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Hub(_) => "hub_api",
            Error::CleanupPending(..) => "cleanup_pending",
            Error::Finalizer(_) => "finalizer",
            Error::Rewards(settle::Error::Ledger(..)) => "ledger",
            Error::Rewards(settle::Error::Reward(..)) => "reward",
            Error::SettlementPending(_) => "settlement_pending",
        }
    }
}

/// Runs the controller until the stream ends. `trigger` carries job references from task
/// changes in member clusters.
pub async fn run(
    ctx: Arc<Context>,
    trigger: futures::channel::mpsc::UnboundedReceiver<ObjectRef<ComputeJob>>,
) {
    let jobs: Api<ComputeJob> = Api::all(ctx.client.clone());
    Controller::new(jobs, kube::runtime::watcher::Config::default())
        .reconcile_on(trigger)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn error_policy(job: Arc<ComputeJob>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["computejob", error.category()])
        .inc();
    tracing::warn!(job = %job.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

#[tracing::instrument(skip_all, fields(job = %job.name_any(), ns = job.namespace().unwrap_or_default()))]
async fn reconcile(job: Arc<ComputeJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics
        .reconciles
        .with_label_values(&["computejob"])
        .inc();
    let ns = job.namespace().unwrap_or_default();
    let api: Api<ComputeJob> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, JOB_FINALIZER, job, |event| async {
        match event {
            Finalizer::Apply(job) => apply(job, &ctx).await,
            Finalizer::Cleanup(job) => cleanup(job, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconcile_duration
        .with_label_values(&["computejob"])
        .observe(start.elapsed().as_secs_f64());
    result
}

/// The member clusters a job may use: those of its pools (by name, selector or all).
fn members_for(job: &ComputeJob, ctx: &Context) -> Vec<Arc<Member>> {
    pools_for(job, ctx)
        .iter()
        .flat_map(|p| ctx.fleet.pool_members(&p.name_any()))
        .collect()
}

/// The pools the job's placement selects.
fn pools_for(job: &ComputeJob, ctx: &Context) -> Vec<Arc<EdgePool>> {
    let placement = &job.spec.placement;
    ctx.pools
        .state()
        .into_iter()
        .filter(|p| {
            let name = p.name_any();
            if !placement.pools.is_empty() {
                placement.pools.contains(&name)
            } else if let Some(sel) = &placement.pool_selector {
                selector_matches(sel, p.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
            } else {
                true
            }
        })
        .collect()
}

/// Why some member clusters of `pools` are not known to this process: a pool whose
/// clusters were not all tried yet (an operator connects them one after another when
/// it starts or takes over, and a job judged in between would take the tasks of the
/// clusters not connected yet for vanished ones, and place them again), or a cluster
/// that could not be connected (its kubeconfig Secret unusable). With `grace`, a cluster
/// not connected counts only for its pool's heartbeat timeout after the first try, as
/// an unreachable one does (then its tasks count as lost).
fn members_unknown(
    pools: &[Arc<EdgePool>],
    ctx: &Context,
    now: Timestamp,
    grace: bool,
) -> Vec<String> {
    let mut unknown = Vec::new();
    for p in pools {
        let name = p.name_any();
        let Some(since) = ctx.fleet.pool_connected_at(&name) else {
            unknown.push(format!("{name} (its clusters are being connected)"));
            continue;
        };
        let known: Vec<String> = ctx
            .fleet
            .pool_members(&name)
            .iter()
            .map(|m| m.spec.name.clone())
            .collect();
        let timeout = jiff::SignedDuration::from_secs(p.spec.heartbeat_timeout_seconds as i64);
        if grace && now > since + timeout {
            continue;
        }
        for c in p.spec.clusters.iter().filter(|c| !known.contains(&c.name)) {
            unknown.push(format!("{name}/{} (not connected)", c.name));
        }
    }
    unknown
}

/// Copies the job's model ConfigMap (hub, job namespace) into every member's system
/// namespace as `<uid16>-<name>`, where agents read it. Returns the mirrored name and the
/// members that hold the copy now, or why it cannot be had. Members are written at once,
/// each bounded in time, and one that is unreachable or refuses is skipped (tried again
/// next reconcile): the job is placed where its model is.
async fn mirror_model(
    job: &ComputeJob,
    members: &[Arc<Member>],
    ctx: &Context,
) -> Result<Option<(String, Vec<String>)>, String> {
    let Some(cm) = job
        .spec
        .workload
        .model
        .as_ref()
        .and_then(|m| m.config_map.as_ref())
    else {
        return Ok(None);
    };
    let ns = job.namespace().unwrap_or_default();
    let uid = job.uid().unwrap_or_default();
    let source = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&cm.name)
        .await
        .map_err(|e| format!("reading ConfigMap {ns}/{}: {e}", cm.name))?
        .ok_or_else(|| format!("ConfigMap {ns}/{} (the job's model) not found", cm.name))?;
    let has_key = source
        .binary_data
        .as_ref()
        .is_some_and(|d| d.contains_key(&cm.key))
        || source
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(&cm.key));
    if !has_key {
        return Err(format!("ConfigMap {ns}/{} has no key {}", cm.name, cm.key));
    }
    let mirrored: String = format!("{}-{}", lifecycle::task_prefix(&uid), cm.name)
        .chars()
        .take(253)
        .collect();
    let copy = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": mirrored, "labels": {JOB_UID_LABEL: uid}},
        "binaryData": source.binary_data, "data": source.data,
    });
    let copies = members.iter().map(|m| {
        let (copy, mirrored) = (&copy, &mirrored);
        async move {
            let h = m.health();
            if !h.reachable && h.unreachable_since.is_some() {
                return Err(format!("{}: unreachable", m.key));
            }
            let api = Api::<ConfigMap>::namespaced(m.client.clone(), SYSTEM_NAMESPACE);
            let (params, patch) = (
                PatchParams::apply(FIELD_MANAGER).force(),
                Patch::Apply(copy),
            );
            match tokio::time::timeout(MEMBER_CALL_TIMEOUT, api.patch(mirrored, &params, &patch))
                .await
            {
                Ok(Ok(_)) => Ok(m.key.clone()),
                Ok(Err(e)) => Err(format!("{}: {e}", m.key)),
                Err(_) => Err(format!("{}: no answer in time", m.key)),
            }
        }
    });
    let (copied, failed): (Vec<_>, Vec<_>) = futures::future::join_all(copies)
        .await
        .into_iter()
        .partition(Result::is_ok);
    let copied: Vec<String> = copied.into_iter().filter_map(Result::ok).collect();
    if copied.is_empty() {
        let why: Vec<String> = failed.into_iter().filter_map(Result::err).collect();
        return Err(format!(
            "copying the model ConfigMap to any member failed: {}",
            why.join("; ")
        ));
    }
    Ok(Some((mirrored, copied)))
}

/// How long an issued attempt may stay unseen in a reachable, synced member before it
/// counts as vanished (its creation failed or timed out, or the task was deleted).
/// (Safety does not depend on it: a creation landing later is a stale attempt, cancelled;
/// the grace only spares re-placing work that is on its way. A creation is bounded by 5 s.)
const ISSUED_GRACE: jiff::SignedDuration = jiff::SignedDuration::from_secs(15);

/// The job's tasks in every member's cache, and the attempts the scheduler issued that no
/// cache shows yet (docs/ARCHITECTURE.md, "Fencing"): such an attempt is current, on its
/// node, until its task appears, or its node or member is lost, or it stays unseen past
/// [`ISSUED_GRACE`] in a member that answers.
fn task_views(
    uid: &str,
    issued: &BTreeMap<String, IssuedAttempt>,
    ctx: &Context,
    now: Timestamp,
) -> Vec<TaskView> {
    let mut views = visible_task_views(uid, ctx, now);
    for (key, at) in issued {
        let Some((shard, replica)) = key
            .split_once('/')
            .and_then(|(s, r)| Some((s.parse::<u32>().ok()?, r.parse::<u32>().ok()?)))
        else {
            continue;
        };
        if views
            .iter()
            .any(|v| v.shard == shard && v.replica == replica && v.attempt >= at.attempt)
        {
            continue;
        }
        let member_key = format!("{}/{}", at.pool, at.cluster);
        let member = ctx
            .fleet
            .members()
            .into_iter()
            .find(|m| m.key == member_key);
        let node_lost = match &member {
            None => true,
            Some(m) => {
                m.lost(now)
                    || (m.synced() && !m.node_ready(&at.node, now))
                    || (m.synced() && m.health().reachable && now > at.at.0 + ISSUED_GRACE)
            }
        };
        views.push(TaskView {
            member: member_key,
            cluster: at.cluster.clone(),
            name: lifecycle::task_name(uid, shard, replica, at.attempt),
            shard,
            replica,
            attempt: at.attempt,
            node: at.node.clone(),
            node_lost,
            dispatched: Some(at.at.0),
            ..TaskView::default()
        });
    }
    views
}

/// The job's tasks in every member's cache.
fn visible_task_views(uid: &str, ctx: &Context, now: Timestamp) -> Vec<TaskView> {
    let mut views = Vec::new();
    for m in ctx.fleet.members() {
        let lost_cluster = m.lost(now);
        for t in m.tasks.by_key(uid) {
            let terminal = t.terminal();
            let mut status = t.status.as_deref().cloned().unwrap_or_default();
            // A reveal sealed for the operator: opened here (a box that does not open
            // leaves no result, so the reveal counts as broken).
            if let Some(sealed) = status.sealed_reveal.take()
                && let Some(key) = ctx.books.reveal_secret()
                && let Ok(r) = edgeloom_crds::commitment::open(&key, &sealed)
            {
                status.result_digest = Some(r.digest);
                status.result_vector = r.vector;
                status.metrics = r
                    .metrics
                    .into_iter()
                    .take(crate::cache::METRICS_KEPT)
                    .collect();
                status.result_summary = r.summary;
                status.salt = Some(r.salt);
            }
            views.push(TaskView {
                member: m.key.clone(),
                cluster: m.spec.name.clone(),
                name: t.name.to_string(),
                shard: t.shard,
                replica: t.replica,
                attempt: t.attempt,
                node: t.node.to_string(),
                phase: status.phase,
                progress: status.progress,
                started_at: status.started_at.map(|t| t.0),
                finished_at: status.finished_at.map(|t| t.0),
                digest: status.result_digest,
                vector: status.result_vector,
                metrics: status.metrics,
                message: status.message,
                node_lost: !terminal && (lost_cluster || !m.node_ready(&t.node, now)),
                cpu_core_millis: status.usage.as_ref().map_or(0, |u| u.cpu_core_millis),
                gpu_millis: status.usage.as_ref().map_or(0, |u| u.gpu_millis),
                nonce: t.nonce.as_deref().map(String::from),
                commitment: status.commitment,
                salt: status.salt,
                reveal_requested_at: t.reveal_requested_at,
                dispatched: t.dispatched_at,
            });
        }
    }
    views
}

/// What a decision on a job is made from, beside its tasks, trust and payments.
struct JobInputs {
    created: Timestamp,
    start_time: Option<Timestamp>,
    max_replicas: u32,
    unschedulable: Option<String>,
    progress_timeout: jiff::SignedDuration,
    max_amount: Option<Amount>,
    /// Shards decided and paid for good (see `settled_shards`).
    settled: std::collections::BTreeSet<u32>,
}

impl JobInputs {
    fn of(
        job: &ComputeJob,
        old: &ComputeJobStatus,
        views: &[TaskView],
        members: &[Arc<Member>],
        ctx: &Context,
        now: Timestamp,
    ) -> Result<JobInputs, Error> {
        let ns = job.namespace().unwrap_or_default();
        let name = job.name_any();
        let max_amount = job
            .spec
            .budget
            .as_ref()
            .map(|b| {
                b.max_amount.0.parse::<Amount>().map_err(|e| {
                    Error::Rewards(settle::Error::Reward(
                        format!("{ns}/{name} budget"),
                        e.to_string(),
                    ))
                })
            })
            .transpose()?;
        let created = job
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0)
            .unwrap_or(now);
        let start_time = old
            .start_time
            .as_ref()
            .map(|t| t.0)
            .or_else(|| (!views.is_empty()).then_some(now));
        let max_replicas = members
            .iter()
            .map(|m| m.pool_spec().verification.max_replicas)
            .max()
            .unwrap_or(3);
        let progress_timeout = jiff::SignedDuration::from_secs(
            job.spec
                .progress_timeout_seconds
                .or_else(|| {
                    members
                        .iter()
                        .map(|m| m.pool_spec().progress_timeout_seconds)
                        .max()
                })
                .unwrap_or_else(edgeloom_crds::edge_pool::default_progress_timeout)
                as i64,
        );
        Ok(JobInputs {
            created,
            start_time,
            max_replicas,
            unschedulable: ctx.scheduler.unfit(&ns, &name),
            progress_timeout,
            max_amount,
            settled: Default::default(),
        })
    }

    /// What the job may still spend, after `paid`.
    fn budget(&self, paid: &Totals) -> Option<BudgetView> {
        self.max_amount.map(|max| BudgetView {
            max,
            spent: paid.total,
            per_task: (paid.receipts > 0)
                .then(|| Amount::from_atto(paid.total.atto() / paid.receipts as u128)),
        })
    }

    fn view<'a>(
        &self,
        job: &'a ComputeJob,
        old: &'a ComputeJobStatus,
        trusted: std::collections::BTreeSet<(String, String)>,
        spot_checked: std::collections::BTreeSet<u32>,
        budget: Option<BudgetView>,
    ) -> JobView<'a> {
        JobView {
            spec: &job.spec,
            created: self.created,
            start_time: self.start_time,
            phase: old.phase,
            recorded: &old.shards,
            unschedulable: self.unschedulable.clone(),
            max_replicas: self.max_replicas,
            trusted,
            spot_checked,
            budget,
            progress_timeout: self.progress_timeout,
            settled: self.settled.clone(),
        }
    }
}

async fn apply(job: Arc<ComputeJob>, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    // Every slot, a big job's pages read back.
    let old = full_status(&job, ctx).await?;
    let members = members_for(&job, ctx);
    // Never decide on a cold cache: right after an operator restart a member whose tasks
    // or heartbeats are not listed yet would look empty or dead, and a job that ran
    // somewhere whose pools are not connected yet would look as if it never had.
    if members
        .iter()
        .any(|m| !m.synced() && !m.lost(now) && m.sync_problem(now).is_none())
        || (members.is_empty() && old.shards.iter().any(|s| !s.node.is_empty()))
        || !members_unknown(&pools_for(&job, ctx), ctx, now, true).is_empty()
    {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    // Federated jobs run in rounds, not shards (docs/ARCHITECTURE.md, "Federated learning
    // in a tree").
    if job.spec.workload.kind == edgeloom_crds::workload::WorkloadKind::Federated {
        return crate::federated::apply(job, ctx, members).await;
    }
    // Sealed reveals need the operator's key: load it before deciding on them.
    if ctx.books.reveal_secret().is_none()
        && members.iter().any(|m| {
            m.tasks
                .by_key(&uid)
                .iter()
                .any(|t| t.status.as_ref().is_some_and(|s| s.sealed_reveal.is_some()))
        })
        && ctx.books.signing_key(false).await.is_err()
    {
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let views = task_views(&uid, &old.issued, ctx, now);
    // The ledger is not needed to run the job: when it cannot be read or written, work
    // goes on, receipts wait (they are idempotent, so they are written once it is back),
    // and a budgeted job places nothing (its spending cannot be checked).
    // Reads of the ledger are bounded: one that is busy or stuck (its store not
    // answering) never holds up the job's work.
    let mut ledger_problem: Option<String> = None;
    let paid_before =
        match tokio::time::timeout(LEDGER_READ_TIMEOUT, settle::job_totals(&uid, &members, ctx))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                ledger_problem = Some(e.to_string());
                Totals::default()
            }
            Err(_) => {
                ledger_problem = Some(LEDGER_SLOW.into());
                Totals::default()
            }
        };
    let (trusted, spot_checked) = match tokio::time::timeout(
        LEDGER_READ_TIMEOUT,
        settle::trust_view(&job, &views, ctx),
    )
    .await
    {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            ledger_problem.get_or_insert(e.to_string());
            Default::default()
        }
        Err(_) => {
            ledger_problem.get_or_insert(LEDGER_SLOW.into());
            Default::default()
        }
    };
    let mut inputs = JobInputs::of(&job, &old, &views, &members, ctx, now)?;
    let Some(settled) = settled_shards(&uid, &old, &views, &members, ctx).await else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    inputs.settled = settled;
    let max_amount = inputs.max_amount;
    let budget_view = |paid: &Totals| inputs.budget(paid);
    let start_time = inputs.start_time;
    let decide = |budget: Option<BudgetView>| {
        lifecycle::decide(
            &inputs.view(&job, &old, trusted.clone(), spot_checked.clone(), budget),
            &views,
            now,
        )
    };
    let mut decision = decide(budget_view(&paid_before));
    // Pay first: the ledger is written before anything else depends on this decision.
    let mut paid = paid_before.clone();
    let mut reward_problem: Option<String> = None;
    if ledger_problem.is_none() {
        match settle::settle(&job, &decision, ctx, now, max_amount, &paid_before).await {
            Ok(problems) => {
                reward_problem = (!problems.is_empty()).then(|| problems.join("; "));
                match settle::job_totals(&uid, &members, ctx).await {
                    Ok(t) => paid = t,
                    Err(e) => ledger_problem = Some(e.to_string()),
                }
            }
            Err(e) => ledger_problem = Some(e.to_string()),
        }
    }
    if max_amount.is_some() && paid != paid_before {
        // What was just paid counts against the budget before anything more is placed.
        decision = decide(budget_view(&paid));
    }
    if let Some(why) = &ledger_problem {
        tracing::warn!(job = %name, problem = %why, "receipts are waiting for the ledger");
        if max_amount.is_some() && !decision.needs.is_empty() {
            decision.needs.clear();
        }
    }

    // Reveals (asked for only once every replica of a shard has committed) and
    // cancellations go to the members at once, each bounded by MEMBER_CALL_TIMEOUT, and
    // not to a member that is unreachable now (it gets them on a later reconcile): one
    // slow or dead member never holds up this job's status or any other member.
    let reachable = |key: &str| {
        ctx.fleet.members().into_iter().find(|m| {
            let h = m.health();
            // Not known to fail (a member not probed yet is tried).
            m.key == key && (h.reachable || h.unreachable_since.is_none())
        })
    };
    let reveals = decision.reveal.iter().filter_map(|(member, task)| {
        let m = reachable(member)?;
        let patch =
            serde_json::json!({"metadata": {"annotations": {REVEAL_ANNOTATION: now.to_string()}}});
        Some(async move {
            let api = m.tasks_api();
            let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
            let call = api.patch(task, &params, &patch);
            match tokio::time::timeout(MEMBER_CALL_TIMEOUT, call).await {
                Ok(Ok(_)) => tracing::info!(task = %task, %member, "asked for the sealed result"),
                Ok(Err(e)) => {
                    tracing::debug!(task = %task, error = %e, "reveal request failed; will retry")
                }
                Err(_) => {
                    tracing::debug!(task = %task, %member, "reveal request timed out; will retry")
                }
            }
        })
    });
    let cancels = decision.cancel.iter().filter_map(|c| {
        let m = reachable(&c.member)?;
        Some(async move {
            let api = m.tasks_api();
            let params = DeleteParams::default();
            let call = api.delete(&c.name, &params);
            match tokio::time::timeout(MEMBER_CALL_TIMEOUT, call).await {
                Ok(Ok(_)) => {
                    tracing::info!(task = %c.name, member = %c.member, reason = c.reason, "cancelled task")
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => {}
                Ok(Err(e)) => tracing::debug!(task = %c.name, error = %e, "cancel failed; will retry"),
                Err(_) => tracing::debug!(task = %c.name, member = %c.member, "cancel timed out; will retry"),
            }
        })
    });
    // A task silent past its progress timeout is failed where it is, by the operator:
    // its agent stops the runner, the failure counts against maxRetries and against the
    // node (docs/ARCHITECTURE.md, "Failure model").
    let stalls = decision.stalled.iter().filter_map(|st| {
        let m = reachable(&st.member)?;
        Some(async move {
            let api = m.tasks_api();
            let patch = serde_json::json!({
                "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask",
                "status": {"phase": TaskPhase::Failed, "message": st.message, "finishedAt": Time(now)},
            });
            let (params, patch) = (
                PatchParams::apply(FIELD_MANAGER).force(),
                Patch::Apply(&patch),
            );
            let call = api.patch_status(&st.name, &params, &patch);
            match tokio::time::timeout(MEMBER_CALL_TIMEOUT, call).await {
                Ok(Ok(_)) => {
                    tracing::warn!(task = %st.name, member = %st.member, "failed a task that made no progress")
                }
                Ok(Err(e)) => tracing::debug!(task = %st.name, error = %e, "failing a stalled task failed; will retry"),
                Err(_) => tracing::debug!(task = %st.name, "failing a stalled task timed out; will retry"),
            }
        })
    });
    futures::future::join3(
        futures::future::join_all(reveals),
        futures::future::join_all(cancels),
        futures::future::join_all(stalls),
    )
    .await;
    ctx.metrics.stalled.inc_by(decision.stalled.len() as u64);

    let mut model_problem: Option<String> = None;
    if decision.needs.is_empty() {
        ctx.scheduler.withdraw(&ns, &name);
    } else {
        let current: Vec<&TaskView> = views
            .iter()
            .filter(|v| {
                !v.node_lost
                    && decision.shards.iter().any(|s| {
                        s.index == v.shard && s.replica == v.replica && s.attempt == v.attempt
                    })
            })
            .collect();
        let mut replicas: BTreeMap<u32, Vec<(String, String)>> = BTreeMap::new();
        for v in &current {
            replicas
                .entry(v.shard)
                .or_default()
                .push((v.member.clone(), v.node.clone()));
        }
        let mut spec = job.spec.clone();
        // The members the job may be placed in: where its model is, for a ConfigMap model.
        let mut usable: Vec<String> = members.iter().map(|m| m.key.clone()).collect();
        match mirror_model(&job, &members, ctx).await {
            Ok(Some((mirrored, copied))) => {
                if let Some(cm) = spec
                    .workload
                    .model
                    .as_mut()
                    .and_then(|m| m.config_map.as_mut())
                {
                    cm.name = mirrored;
                }
                usable.retain(|k| copied.contains(k));
            }
            Ok(None) => {}
            Err(why) => {
                model_problem = Some(why);
            }
        }
        if model_problem.is_none() {
            ctx.scheduler.submit(Work {
                namespace: ns.clone(),
                name: name.clone(),
                uid: uid.clone(),
                priority: job.spec.priority,
                created: inputs.created.as_second(),
                spec: Arc::new(spec),
                needs: decision.needs.clone(),
                used: current
                    .iter()
                    .map(|v| (v.member.clone(), v.node.clone()))
                    .collect(),
                replicas,
                members: usable.into(),
                gang: job.spec.placement.gang == Some(true) && views.is_empty(),
                finished_seen: job.spec.budget.is_some().then(|| {
                    views
                        .iter()
                        .filter(|v| {
                            matches!(
                                v.phase,
                                Some(
                                    TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::Cancelled
                                )
                            )
                        })
                        .count()
                }),
            });
        } else {
            ctx.scheduler.withdraw(&ns, &name);
        }
    }
    ctx.metrics
        .retries
        .with_label_values(&["failed"])
        .inc_by(decision.retried as u64);
    ctx.metrics
        .retries
        .with_label_values(&["node_lost"])
        .inc_by(decision.replaced_lost as u64);

    // Status.
    let generation = job.metadata.generation;
    let mut conds = old.conditions.clone();
    let placed = decision.needs.is_empty()
        && decision
            .shards
            .iter()
            .all(|s| !s.node.is_empty() || s.phase == TaskPhase::Cancelled);
    let unfit = model_problem
        .as_ref()
        .map(|why| format!("ModelUnavailable: {why}"))
        .or_else(|| ctx.scheduler.unfit(&ns, &name));
    // A finished job's verdict is frozen: its shards, result, metrics and placement stay
    // as they were when it finished, even if its tasks vanish or trust changes later.
    let frozen = matches!(old.phase, Some(JobPhase::Succeeded | JobPhase::Failed));
    let finishing = matches!(decision.phase, JobPhase::Succeeded | JobPhase::Failed);
    match (&unfit, placed) {
        // A finished job has nothing left to place (and its placement is frozen).
        _ if frozen || finishing => {
            if conditions::get(&conds, "Scheduled").is_none_or(|c| c.reason != "Finished") {
                conditions::set(
                    &mut conds,
                    "Scheduled",
                    true,
                    "Finished",
                    "the job finished: nothing left to place",
                    generation,
                    now,
                );
            }
        }
        (_, true) => conditions::set(
            &mut conds,
            "Scheduled",
            true,
            "Placed",
            &decision.placement.clone().unwrap_or_default(),
            generation,
            now,
        ),
        (Some(why), false) => conditions::set(
            &mut conds,
            "Scheduled",
            false,
            "Unschedulable",
            why,
            generation,
            now,
        ),
        (None, false) => conditions::set(
            &mut conds,
            "Scheduled",
            false,
            "Waiting",
            "waiting for placement",
            generation,
            now,
        ),
    }
    match &decision.budget_stopped {
        Some(why) => conditions::set(
            &mut conds,
            "BudgetExceeded",
            true,
            "BudgetExceeded",
            why,
            generation,
            now,
        ),
        None if job.spec.budget.is_some() => conditions::set(
            &mut conds,
            "BudgetExceeded",
            false,
            "WithinBudget",
            &format!(
                "{} of {} spent",
                paid.total,
                job.spec
                    .budget
                    .as_ref()
                    .map(|b| b.max_amount.0.clone())
                    .unwrap_or_default()
            ),
            generation,
            now,
        ),
        None => {}
    }
    match (&ledger_problem, &reward_problem) {
        (Some(why), _) => conditions::set(
            &mut conds,
            "Paid",
            false,
            "LedgerUnavailable",
            &format!("receipts wait until the ledger can be written: {why}"),
            generation,
            now,
        ),
        (None, Some(why)) => conditions::set(
            &mut conds,
            "Paid",
            false,
            "ReceiptRefused",
            why,
            generation,
            now,
        ),
        (None, None) if paid.receipts > 0 => conditions::set(
            &mut conds,
            "Paid",
            true,
            "ReceiptsIssued",
            &format!(
                "{} receipt(s) in the ledger for accepted results",
                paid.receipts
            ),
            generation,
            now,
        ),
        (None, None) => {}
    }
    let finished = matches!(decision.phase, JobPhase::Succeeded | JobPhase::Failed);
    // A finished job keeps the verdict it was given.
    if !matches!(old.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
        let (ok, failed) = (
            decision.phase == JobPhase::Succeeded,
            decision.phase == JobPhase::Failed,
        );
        conditions::set(
            &mut conds,
            "Complete",
            ok,
            decision.reason,
            &decision.message,
            generation,
            now,
        );
        conditions::set(
            &mut conds,
            "Failed",
            failed,
            decision.reason,
            &decision.message,
            generation,
            now,
        );
    }
    let (progress, placement, shards, metrics, result) = if frozen {
        (
            old.progress.clone(),
            old.placement.clone(),
            old.shards.clone(),
            old.metrics.clone(),
            old.result.clone(),
        )
    } else {
        (
            Some(decision.progress.clone()),
            decision.placement.clone(),
            decision.shards.clone(),
            decision.metrics.clone(),
            decision.result.clone(),
        )
    };
    let status = ComputeJobStatus {
        phase: Some(decision.phase),
        conditions: conds,
        observed_generation: generation,
        progress,
        placement,
        shards,
        metrics,
        result,
        rewards: settle::rewards_summary(&paid, &members).or(old.rewards.clone()),
        start_time: start_time.map(Time),
        completion_time: old
            .completion_time
            .clone()
            .or_else(|| finished.then_some(Time(now))),
        // The scheduler's (written before it creates a task); never applied from here.
        issued: old.issued.clone(),
        // Set by `shard_pages::page_out` when the job is big.
        shard_pages: Vec::new(),
        slot_attempts: None,
        federated: None,
    };
    // A big job's slots go to pages first, then the status naming them.
    let (written, pages) = shard_pages::page_out(&status, &uid, ctx.inline_slots);
    if Some(&written) != job.status.as_ref() {
        write_pages(&uid, &old, pages, ctx).await?;
        let api: Api<ComputeJob> = Api::namespaced(ctx.client.clone(), &ns);
        let mut applied = written.clone();
        applied.issued.clear();
        let patch = serde_json::json!({
            "apiVersion": "edgeloom.io/v1alpha1",
            "kind": "ComputeJob",
            "status": applied,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Hub)?;
        delete_stale_pages(&old, &written, ctx).await?;
        publish_events(&job, &old, &status, &unfit, ctx).await;
        if finished && !matches!(old.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
            ctx.metrics
                .verification
                .with_label_values(&["rejected"])
                .inc_by(u64::from(decision.reason == "VerificationFailed"));
            ctx.metrics
                .jobs_finished
                .with_label_values(&[phase_label(decision.phase)])
                .inc();
        }
    }
    Ok(match decision.phase {
        _ if ledger_problem.is_some() => Action::requeue(Duration::from_secs(10)),
        JobPhase::Succeeded | JobPhase::Failed if decision.cancel.is_empty() => {
            Action::requeue(Duration::from_secs(300))
        }
        _ => Action::requeue(Duration::from_secs(2)),
    })
}

fn phase_label(p: JobPhase) -> &'static str {
    match p {
        JobPhase::Pending => "Pending",
        JobPhase::Running => "Running",
        JobPhase::Succeeded => "Succeeded",
        JobPhase::Failed => "Failed",
    }
}

/// Events from what changed between the old and the new status.
async fn publish_events(
    job: &ComputeJob,
    old: &ComputeJobStatus,
    new: &ComputeJobStatus,
    unfit: &Option<String>,
    ctx: &Context,
) {
    let mut events = Vec::new();
    let key = |s: &ShardStatus| (s.index, s.replica);
    let before: BTreeMap<(u32, u32), &ShardStatus> =
        old.shards.iter().map(|s| (key(s), s)).collect();
    // One event per kind and reconcile (the recorder folds same-reason events into a series).
    let mut placed = Vec::new();
    let mut replaced = Vec::new();
    for s in new.shards.iter().filter(|s| !s.node.is_empty()) {
        match before.get(&key(s)) {
            Some(prev) if prev.attempt == s.attempt && !prev.node.is_empty() => {}
            Some(prev) if !prev.node.is_empty() => replaced.push(format!(
                "shard {}/{} attempt {} on {}/{} (attempt {} on {}/{} {})",
                s.index,
                s.replica,
                s.attempt,
                s.cluster,
                s.node,
                prev.attempt,
                prev.cluster,
                prev.node,
                replaced_because(prev)
            )),
            _ => placed.push(format!(
                "shard {}/{} attempt {} on {}/{}",
                s.index, s.replica, s.attempt, s.cluster, s.node
            )),
        }
    }
    // Events of one reason form a series that keeps only the latest note, so the note
    // states the whole placement, then what is new.
    if !placed.is_empty() {
        let bound = new.shards.iter().filter(|s| !s.node.is_empty()).count();
        events.push((
            EventType::Normal,
            "Placed",
            format!(
                "{bound}/{} shard replica(s) placed ({}); new: {}",
                new.shards.len(),
                new.placement.clone().unwrap_or_default(),
                placed.join("; ")
            ),
        ));
    }
    if !replaced.is_empty() {
        events.push((
            EventType::Warning,
            "Replaced",
            format!(
                "{} task(s) re-placed: {}",
                replaced.len(),
                replaced.join("; ")
            ),
        ));
    }
    let old_unfit = conditions::get(&old.conditions, "Scheduled")
        .filter(|c| c.reason == "Unschedulable")
        .map(|c| c.message.clone());
    if let Some(why) = unfit
        && old_unfit.as_ref() != Some(why)
    {
        events.push((EventType::Warning, "Unschedulable", why.clone()));
    }
    if new.phase != old.phase {
        let message = conditions::get(
            &new.conditions,
            if new.phase == Some(JobPhase::Failed) {
                "Failed"
            } else {
                "Complete"
            },
        )
        .map(|c| c.message.clone())
        .unwrap_or_default();
        match new.phase {
            Some(JobPhase::Succeeded) => events.push((EventType::Normal, "Succeeded", message)),
            Some(JobPhase::Failed) => events.push((EventType::Warning, "Failed", message)),
            _ => {}
        }
    }
    let reference = job.object_ref(&());
    for (type_, reason, note) in events {
        crate::events::publish(&ctx.recorder, &reference, type_, reason, "Reconcile", &note).await;
    }
}

/// Why an attempt was replaced, in words: its failure, or that it was lost.
fn replaced_because(s: &ShardStatus) -> String {
    match s.phase {
        TaskPhase::Failed => format!(
            "failed{}",
            s.message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
        TaskPhase::Cancelled => "was cancelled".into(),
        phase => {
            let was = format!("{phase:?}").to_lowercase();
            format!(
                "was lost while {was} (its node stopped heartbeating, its cluster became unreachable or its task vanished)"
            )
        }
    }
}

/// Shards whose recorded result is paid while a finished task of theirs is no longer
/// seen (its member lost, or never listed by this operator): a receipt for the slot is in
/// the ledger of one of the job's pools. Such a shard is decided for good and never runs
/// again. None when a ledger cannot answer (right after a leader starts, before it has
/// checked the pool's checkpoint): the job is not decided until it can (the chaos run
/// found a paid shard run again in that window).
async fn settled_shards(
    uid: &str,
    old: &ComputeJobStatus,
    views: &[TaskView],
    members: &[Arc<Member>],
    ctx: &Context,
) -> Option<std::collections::BTreeSet<u32>> {
    let seen: std::collections::BTreeSet<(u32, u32)> =
        views.iter().map(|v| (v.shard, v.replica)).collect();
    let candidates: Vec<(u32, u32)> = old
        .shards
        .iter()
        .filter(|s| s.phase == TaskPhase::Succeeded && !seen.contains(&(s.index, s.replica)))
        .map(|s| (s.index, s.replica))
        .collect();
    let mut settled = std::collections::BTreeSet::new();
    if candidates.is_empty() {
        return Some(settled);
    }
    let keys: Vec<String> = candidates
        .iter()
        .map(|(shard, replica)| format!("{uid}/{shard}/{replica}"))
        .collect();
    let pools: std::collections::BTreeSet<String> =
        members.iter().map(|m| m.pool.clone()).collect();
    for pool in pools {
        let ledger = ctx.books.ledger(&pool);
        let Ok(Ok(found)) = tokio::time::timeout(LEDGER_READ_TIMEOUT, ledger.has_keys(&keys)).await
        else {
            return None;
        };
        for (i, paid) in found.iter().enumerate() {
            if *paid {
                settled.insert(candidates[i].0);
            }
        }
    }
    Some(settled)
}

/// The job's status with every slot: a big job's pages read back (cached by hash).
async fn full_status(job: &ComputeJob, ctx: &Context) -> Result<ComputeJobStatus, Error> {
    let written = job.status.clone().unwrap_or_default();
    if written.shard_pages.is_empty() {
        return Ok(written);
    }
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let mut pages = Vec::new();
    for p in &written.shard_pages {
        if let Some(hit) = ctx.pages.get(&p.name, &p.hash) {
            pages.push(Some(hit));
            continue;
        }
        let found = api.get_opt(&p.name).await.map_err(Error::Hub)?;
        let text = found
            .as_ref()
            .and_then(|cm| cm.data.as_ref())
            .and_then(|d| d.get(shard_pages::PAGE_KEY));
        match text.map(|t| (t, serde_json::from_str::<Vec<ShardStatus>>(t))) {
            Some((t, Ok(slots))) => {
                let slots = Arc::new(slots);
                ctx.pages
                    .put(&p.name, &shard_pages::PageCache::hash_of(t), slots.clone());
                pages.push(Some(slots));
            }
            Some((_, Err(e))) => {
                tracing::warn!(job = %job.name_any(), page = %p.name, error = %e, "a shard status page does not parse; its slots keep their attempts only");
                pages.push(None);
            }
            None => {
                tracing::warn!(job = %job.name_any(), page = %p.name, "a shard status page is missing; its slots keep their attempts only");
                pages.push(None);
            }
        }
    }
    Ok(shard_pages::page_in(&written, &pages))
}

/// Writes the pages that changed since `old` was written (ConfigMaps in the operator's
/// namespace, labelled with the job's UID), before the status that names them.
async fn write_pages(
    uid: &str,
    old: &ComputeJobStatus,
    pages: Vec<shard_pages::Page>,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for page in pages {
        let r = &page.reference;
        if old.shard_pages.contains(r) && ctx.pages.get(&r.name, &r.hash).is_some() {
            continue;
        }
        let cm = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": r.name,
                "labels": {JOB_UID_LABEL: uid, "app.kubernetes.io/managed-by": "edgeloom"},
            },
            "data": {shard_pages::PAGE_KEY: page.json},
        });
        api.patch(
            &r.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(Error::Hub)?;
        ctx.pages.put(&r.name, &r.hash, page.slots);
    }
    Ok(())
}

/// Deletes the pages `old` named and `written` no longer does, once `written` is the
/// job's status (deleted before, a failed status write would leave it naming them).
async fn delete_stale_pages(
    old: &ComputeJobStatus,
    written: &ComputeJobStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    for gone in old
        .shard_pages
        .iter()
        .filter(|p| !written.shard_pages.iter().any(|w| w.name == p.name))
    {
        match api.delete(&gone.name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Hub(e)),
        }
        ctx.pages.forget_page(&gone.name);
    }
    Ok(())
}

/// Pays what the job's tasks earned and nobody paid yet (a job deleted right after its
/// results arrived, or while its ledger was unavailable): nothing is silently unpaid.
async fn settle_before_cleanup(job: &ComputeJob, ctx: &Context) -> Result<(), Error> {
    // A Federated job pays each round as it closes; the updates of a round that never
    // closed were never aggregated, and are not paid (docs/ARCHITECTURE.md, "Federated
    // learning in a tree").
    if job.spec.workload.kind == edgeloom_crds::workload::WorkloadKind::Federated {
        return Ok(());
    }
    let now = Timestamp::now();
    let uid = job.uid().unwrap_or_default();
    let old = full_status(job, ctx).await?;
    let views = task_views(&uid, &old.issued, ctx, now);
    if !views
        .iter()
        .any(|v| matches!(v.phase, Some(TaskPhase::Succeeded)))
    {
        return Ok(());
    }
    let members = members_for(job, ctx);
    let slow = |_| Error::SettlementPending(LEDGER_SLOW.into());
    let paid = tokio::time::timeout(LEDGER_READ_TIMEOUT, settle::job_totals(&uid, &members, ctx))
        .await
        .map_err(slow)??;
    let (trusted, spot_checked) =
        tokio::time::timeout(LEDGER_READ_TIMEOUT, settle::trust_view(job, &views, ctx))
            .await
            .map_err(slow)??;
    let mut inputs = JobInputs::of(job, &old, &views, &members, ctx, now)?;
    inputs.settled = settled_shards(&uid, &old, &views, &members, ctx)
        .await
        .ok_or_else(|| Error::SettlementPending(LEDGER_SLOW.into()))?;
    let decision = lifecycle::decide(
        &inputs.view(job, &old, trusted, spot_checked, inputs.budget(&paid)),
        &views,
        now,
    );
    let problems = settle::settle(job, &decision, ctx, now, inputs.max_amount, &paid).await?;
    if !problems.is_empty() {
        tracing::warn!(job = %job.name_any(), problems = %problems.join("; "), "receipts refused while the job was deleted");
    }
    Ok(())
}

/// Deletes the job's tasks everywhere, once what they earned is paid; members that may
/// still hold some and cannot be asked keep the finalizer (the error requeues) until they
/// answer or their pool is removed: a member never listed (an operator restarted while
/// it was unreachable) is not taken for an empty one.
async fn cleanup(job: Arc<ComputeJob>, ctx: &Context) -> Result<Action, Error> {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    ctx.scheduler.withdraw(&ns, &name);
    // Right after a start the EdgePools may not be listed yet: with none known, no member
    // would be waited for and the job would go while its tasks stay (CI found it).
    let pools_listed = tokio::time::timeout(Duration::from_secs(10), ctx.pools.wait_until_ready());
    if !matches!(pools_listed.await, Ok(Ok(()))) {
        return Err(Error::CleanupPending(
            1,
            "the EdgePools are not listed yet".into(),
        ));
    }
    // A scheduling cycle that fenced an attempt before the deletion may still be creating
    // its task: listed before that create, the task would be left behind.
    if !ctx
        .scheduler
        .creations_done(&uid, Duration::from_secs(30))
        .await
    {
        return Err(Error::CleanupPending(
            1,
            "a scheduling cycle is still creating the job's tasks".into(),
        ));
    }
    if let Err(e) = settle_before_cleanup(&job, ctx).await {
        crate::events::publish(
            &ctx.recorder,
            &job.object_ref(&()),
            EventType::Warning,
            "SettlementPending",
            "Cleanup",
            &format!("the job's results are paid before its tasks go: {e}"),
        )
        .await;
        return Err(e);
    }
    let now = Timestamp::now();
    let issued = job.status.clone().unwrap_or_default().issued;
    // Clusters not connected may hold tasks too: the job waits for them as for members
    // never listed (those of its pools, and of the pools its attempts went to).
    let mut pools = pools_for(&job, ctx);
    for p in ctx.pools.state() {
        if issued.values().any(|i| i.pool == p.name_any())
            && !pools.iter().any(|q| q.name_any() == p.name_any())
        {
            pools.push(p);
        }
    }
    let mut pending = members_unknown(&pools, ctx, now, false);
    for m in ctx.fleet.members() {
        let mut names: Vec<String> = m
            .tasks
            .by_key(&uid)
            .iter()
            .map(|t| t.name.to_string())
            .collect();
        // Attempts issued here whose creation the cache may not show yet.
        for (key, at) in &issued {
            if format!("{}/{}", at.pool, at.cluster) == m.key
                && let Some((shard, replica)) = key
                    .split_once('/')
                    .and_then(|(s, r)| Some((s.parse().ok()?, r.parse().ok()?)))
            {
                names.push(lifecycle::task_name(&uid, shard, replica, at.attempt));
            }
        }
        let api = m.tasks_api();
        let listed = if m.health().reachable {
            api.list(&ListParams::default().labels(&format!("{JOB_UID_LABEL}={uid}")))
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .map(ResourceExt::name_any)
                        .collect::<Vec<_>>()
                })
                .ok()
        } else {
            None
        };
        if listed.is_none() && !m.tasks.ready() {
            pending.push(format!(
                "{} (never listed since the operator started)",
                m.key
            ));
        }
        names.extend(listed.clone().unwrap_or_default());
        names.sort();
        names.dedup();
        for task in names {
            match api.delete(&task, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(_) => pending.push(format!("{}/{task}", m.key)),
            }
        }
        if m.health().reachable {
            let cms: Api<ConfigMap> = Api::namespaced(m.client.clone(), SYSTEM_NAMESPACE);
            let _ = cms
                .delete_collection(
                    &DeleteParams::default(),
                    &ListParams::default().labels(&format!("{JOB_UID_LABEL}={uid}")),
                )
                .await;
        }
        if listed.is_none() && !m.health().reachable {
            tracing::info!(member = %m.key, job = %name, unreachable_for = ?m.health().unreachable_since.map(|s| now - s), "member unreachable during cleanup");
        }
    }
    if !pending.is_empty() {
        crate::events::publish(
            &ctx.recorder,
            &job.object_ref(&()),
            EventType::Warning,
            "CleanupPending",
            "Cleanup",
            &format!(
                "waiting for unreachable member clusters to delete: {}",
                pending.join(", ")
            ),
        )
        .await;
        return Err(Error::CleanupPending(pending.len(), pending.join(", ")));
    }
    // A big job's shard status pages go with it.
    let pages: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    pages
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{JOB_UID_LABEL}={uid}")),
        )
        .await
        .map_err(Error::Hub)?;
    ctx.pages.forget(&uid);
    tracing::info!(job = %name, "tasks removed from every member cluster");
    Ok(Action::await_change())
}

/// Tasks of all members by phase, for the tasks gauge.
pub fn count_tasks(ctx: &Context) -> BTreeMap<&'static str, i64> {
    let mut counts = BTreeMap::from([
        ("Pending", 0),
        ("Running", 0),
        ("Committed", 0),
        ("Succeeded", 0),
        ("Failed", 0),
        ("Cancelled", 0),
    ]);
    for m in ctx.fleet.members() {
        for t in m.tasks.state() {
            let phase = match t.status.as_ref().and_then(|s| s.phase) {
                None | Some(TaskPhase::Pending) => "Pending",
                Some(TaskPhase::Running) => "Running",
                Some(TaskPhase::Committed) => "Committed",
                Some(TaskPhase::Succeeded) => "Succeeded",
                Some(TaskPhase::Failed) => "Failed",
                Some(TaskPhase::Cancelled) => "Cancelled",
            };
            *counts.entry(phase).or_default() += 1;
        }
    }
    counts
}
