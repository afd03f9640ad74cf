//! A job's life as a pure function (docs/ARCHITECTURE.md, "A job's life", "Failure model"): from the job and the ComputeTasks
//! seen in every member cluster, decide the phase, which shard replicas need a node and
//! with which attempt number (the fencing token), which tasks to cancel, and the status.
//!
//! Rules:
//! - Each (shard, replica) slot's current task is its highest attempt. Only the current
//!   attempt's result counts; an older attempt that is still running is cancelled, and a
//!   late result from it is never taken.
//! - A failed current task is retried with attempt+1 on another node while the slot's
//!   failures are at most `maxRetries`; then the job fails with the task's message.
//! - A current task whose node is lost (stale heartbeat, or its cluster unreachable past
//!   the pool's timeout) is re-placed with attempt+1; that does not count as a failure.
//! - Attempt numbers never repeat: a new attempt is above every attempt seen in the
//!   clusters and every attempt recorded in the job's status.
//! - Deadline and gang timeout fail the job with the reason (a gang only once the
//!   scheduler has actually found it unplaceable); a finished job cancels all of its
//!   unfinished tasks.

use crate::decimal::Amount;
use crate::quantity;
use crate::rewards::trust;
use crate::verification::{self, ReplicaResult, Verdict};
use edgeloom_crds::compute_job::{ComputeJobSpec, ResultSummary, ShardStatus};
use edgeloom_crds::{JobPhase, TaskPhase};
use jiff::{SignedDuration, Timestamp};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// What the operator itself saw of one attempt: when it first saw the task (dispatched)
/// and when it first saw its result (reported).
type Observed = (Option<Timestamp>, Option<Timestamp>);

/// Distinct metric names a job's status averages (the first seen).
pub const JOB_METRICS: usize = 32;

/// Seconds a gang job waits for room when it names no `gangTimeoutSeconds`.
pub const DEFAULT_GANG_TIMEOUT_SECONDS: u32 = 300;

/// A ComputeTask as the job's lifecycle sees it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TaskView {
    /// Member key ("pool/cluster").
    pub member: String,
    /// Member cluster name (for status).
    pub cluster: String,
    /// Object name.
    pub name: String,
    /// Shard index.
    pub shard: u32,
    /// Replica index.
    pub replica: u32,
    /// Attempt number.
    pub attempt: u32,
    /// Node it is bound to.
    pub node: String,
    /// Phase reported by the agent (None: not yet claimed).
    pub phase: Option<TaskPhase>,
    /// Percent done.
    pub progress: u8,
    /// Claimed at.
    pub started_at: Option<Timestamp>,
    /// Finished at.
    pub finished_at: Option<Timestamp>,
    /// Result digest.
    pub digest: Option<String>,
    /// Result vector (for tolerance-based verification).
    pub vector: Vec<f64>,
    /// Workload metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Agent's message.
    pub message: Option<String>,
    /// Its node's heartbeat is stale or its cluster unreachable past the pool's timeout.
    pub node_lost: bool,
    /// CPU core-milliseconds the agent reported.
    pub cpu_core_millis: u64,
    /// GPU-milliseconds the agent reported.
    pub gpu_millis: u64,
    /// Its commit–reveal nonce (tasks of verified jobs).
    pub nonce: Option<String>,
    /// The agent's commitment to its result.
    pub commitment: Option<String>,
    /// The salt revealed with the result.
    pub salt: Option<String>,
    /// When the operator asked for the reveal.
    pub reveal_requested_at: Option<Timestamp>,
    /// When this operator created the task, by its own clock (unknown after a restart).
    pub dispatched: Option<Timestamp>,
}

impl TaskView {
    /// A reported result that may be counted: without a nonce any result; with one, only a
    /// revealed result that opens the commitment made before any result was shown.
    fn opens(&self) -> bool {
        match (&self.nonce, &self.commitment, &self.salt, &self.digest) {
            (None, ..) => true,
            (Some(nonce), Some(c), Some(salt), Some(digest)) => {
                edgeloom_crds::commitment::opens(c, nonce, digest, &self.vector, salt)
            }
            _ => false,
        }
    }

    fn terminal(&self) -> bool {
        matches!(
            self.phase,
            Some(TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::Cancelled)
        )
    }
}

/// A slot that needs a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Need {
    /// Shard index.
    pub shard: u32,
    /// Replica index.
    pub replica: u32,
    /// Attempt number to create.
    pub attempt: u32,
    /// Nodes ("member", "node") it must not use: where it failed or was lost before.
    pub avoid: Vec<(String, String)>,
}

/// A task to cancel (delete) in a member cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    /// Member key.
    pub member: String,
    /// Task name.
    pub name: String,
    /// Why.
    pub reason: &'static str,
}

/// A task that made no progress within its timeout: the operator fails it on its node
/// (and its next attempt goes elsewhere, as after any failure).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    /// Member key.
    pub member: String,
    /// Task name.
    pub name: String,
    /// Why, for the task's status.
    pub message: String,
}

/// An accepted result: the work to pay for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Shard index.
    pub shard: u32,
    /// Replica index.
    pub replica: u32,
    /// The accepted attempt.
    pub attempt: u32,
    /// Member key.
    pub member: String,
    /// Member cluster name.
    pub cluster: String,
    /// Node.
    pub node: String,
    /// Result digest.
    pub digest: String,
    /// CPU core-milliseconds.
    pub cpu_core_millis: u64,
    /// GPU-milliseconds.
    pub gpu_millis: u64,
    /// Agreed with at least one other replica (counts towards the node's trust).
    pub verified: bool,
    /// Verified: its speed relative to the replicas it agreed with, by the operator's own
    /// timing (thousandths; see `trust::relative_speeds`).
    pub relative_speed_milli: Option<u32>,
}

/// Why a result was caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caught {
    /// A quorum agreed on another result.
    Outvoted,
    /// Its reveal did not open the commitment (a copied or changed result), it was shown
    /// without one, or the task failed or vanished after committing (withdrawn).
    BrokenReveal,
}

/// A result that a quorum outvoted or whose reveal failed: not paid, and its node loses
/// its trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outvoted {
    /// Why.
    pub why: Caught,
    /// The attempt caught.
    pub attempt: u32,
    /// Shard index.
    pub shard: u32,
    /// Replica index.
    pub replica: u32,
    /// Member key.
    pub member: String,
    /// Member cluster name.
    pub cluster: String,
    /// Node.
    pub node: String,
}

/// What the job may still spend, in the pool's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetView {
    /// `spec.budget.maxAmount`.
    pub max: Amount,
    /// Paid so far (the ledger's receipts for this job).
    pub spent: Amount,
    /// Mean paid per receipt so far; None before the first receipt.
    pub per_task: Option<Amount>,
}

/// What the job's state is and what to do about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// New phase.
    pub phase: JobPhase,
    /// Machine-readable reason for the phase (e.g. DeadlineExceeded).
    pub reason: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Slots to place.
    pub needs: Vec<Need>,
    /// Tasks to cancel.
    pub cancel: Vec<Cancel>,
    /// Tasks to fail for lack of progress.
    pub stalled: Vec<Stall>,
    /// Per-slot status, in (shard, replica) order.
    pub shards: Vec<ShardStatus>,
    /// "done/total" shards.
    pub progress: String,
    /// Tasks per cluster, e.g. "edge-a:2,edge-b:2".
    pub placement: Option<String>,
    /// Mean of each metric over the current succeeded tasks.
    pub metrics: BTreeMap<String, f64>,
    /// Combined result once succeeded.
    pub result: Option<ResultSummary>,
    /// Slots re-placed in this decision because their node was lost.
    pub replaced_lost: usize,
    /// Slots retried in this decision after a failure.
    pub retried: usize,
    /// Results to pay for.
    pub accepted: Vec<Accepted>,
    /// Results outvoted by a quorum or with a broken reveal.
    pub outvoted: Vec<Outvoted>,
    /// Committed tasks ("member", "name") to ask for their reveal now.
    pub reveal: Vec<(String, String)>,
    /// Why placement stopped for the budget, if it did.
    pub budget_stopped: Option<String>,
}

/// The job as the lifecycle sees it.
#[derive(Clone, Debug)]
pub struct JobView<'a> {
    /// Its spec.
    pub spec: &'a ComputeJobSpec,
    /// When it was created.
    pub created: Timestamp,
    /// When its first task was placed.
    pub start_time: Option<Timestamp>,
    /// Previous phase.
    pub phase: Option<JobPhase>,
    /// Previous per-slot status (for attempt numbers of tasks no longer visible).
    pub recorded: &'a [ShardStatus],
    /// Why the scheduler could not place it, if it tried and failed.
    pub unschedulable: Option<String>,
    /// Most replicas one shard may get when results disagree (the pool's maxReplicas).
    pub max_replicas: u32,
    /// Trusted nodes ("member", "node"), for adaptive verification.
    pub trusted: BTreeSet<(String, String)>,
    /// Shards picked for a spot check, for adaptive verification.
    pub spot_checked: BTreeSet<u32>,
    /// The job's budget, if it has one.
    pub budget: Option<BudgetView>,
    /// How long a task may go without progress (the job's, else its pools').
    pub progress_timeout: SignedDuration,
    /// Shards with a receipt in the ledger: decided and paid for good.
    pub settled: BTreeSet<u32>,
}

fn to_time(t: Option<Timestamp>) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    t.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time)
}

/// An observation time at the precision the job's status keeps (whole seconds, rounded
/// down): the window paid for is the same whether the result is settled in the reconcile
/// that saw it or in a later one that reads it back from the status.
fn observed_time(t: Timestamp) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    to_time(Some(Timestamp::from_second(t.as_second()).unwrap_or(t)))
}

/// [`observed_time`] rounded up: the end of a paid window, so that a task that ran less
/// than a second is never paid for a window of 0 (CI paid an honest replica 0). A node
/// gains at most a second of bound by it; its own claim still caps what it is paid.
fn observed_time_up(t: Timestamp) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time> {
    let up = if t.subsec_nanosecond() > 0 {
        t.as_second().saturating_add(1)
    } else {
        t.as_second()
    };
    to_time(Some(Timestamp::from_second(up).unwrap_or(t)))
}

/// Slots a shard may have: its replicas or the extra ones it was given.
fn slots_before_settle(extra: &BTreeMap<u32, u32>, shard: u32, replicas: u32) -> u32 {
    extra.get(&shard).copied().unwrap_or(0).max(replicas).max(1)
}

/// Decides the job's state at `now`.
pub fn decide(job: &JobView<'_>, tasks: &[TaskView], now: Timestamp) -> Decision {
    let spec = job.spec;
    let replicas = spec
        .verification
        .as_ref()
        .map(|v| v.replicas.max(1))
        .unwrap_or(1);
    let adaptive = spec.verification.as_ref().is_some_and(|v| v.adaptive) && replicas > 1;
    let max_replicas = job.max_replicas.max(replicas);
    let quorum = spec
        .verification
        .as_ref()
        .and_then(|v| v.quorum)
        .unwrap_or_else(|| verification::majority(replicas));
    let tolerance = spec
        .verification
        .as_ref()
        .map(|v| v.tolerance)
        .unwrap_or(0.0);
    let mut by_slot: BTreeMap<(u32, u32), Vec<&TaskView>> = BTreeMap::new();
    // Replicas beyond the spec's exist once disagreement asked for them (tasks or status).
    let mut extra: BTreeMap<u32, u32> = BTreeMap::new();
    for t in tasks {
        if t.shard < spec.shards && t.replica < max_replicas {
            by_slot.entry((t.shard, t.replica)).or_default().push(t);
            let e = extra.entry(t.shard).or_default();
            *e = (*e).max(t.replica + 1);
        }
    }
    for s in job
        .recorded
        .iter()
        .filter(|s| !s.node.is_empty() && s.replica < max_replicas)
    {
        let e = extra.entry(s.index).or_default();
        *e = (*e).max(s.replica + 1);
    }
    // What the operator observed of each attempt before: (dispatched, reported).
    let seen_at: BTreeMap<(u32, u32, u32), Observed> = job
        .recorded
        .iter()
        .filter(|s| !s.node.is_empty())
        .map(|s| {
            (
                (s.index, s.replica, s.attempt),
                (
                    s.dispatched_at.as_ref().map(|t| t.0),
                    s.reported_at.as_ref().map(|t| t.0),
                ),
            )
        })
        .collect();
    // The highest attempt each slot ever had. A slot never placed shows 0; one whose task
    // vanished and waits to be placed again shows its last attempt without a node, and
    // that attempt was real (forgetting it would issue it again: the chaos run found it).
    let recorded: BTreeMap<(u32, u32), u32> = job
        .recorded
        .iter()
        .filter(|s| s.attempt > 0)
        .map(|s| ((s.index, s.replica), s.attempt))
        .collect();

    // The last recorded status of each slot that was bound to a node.
    let recorded_status: BTreeMap<(u32, u32), &ShardStatus> = job
        .recorded
        .iter()
        .filter(|s| !s.node.is_empty())
        .map(|s| ((s.index, s.replica), s))
        .collect();
    let finished = matches!(job.phase, Some(JobPhase::Succeeded | JobPhase::Failed));
    let mut needs = Vec::new();
    let mut cancel = Vec::new();
    let mut stalled = Vec::new();
    let mut shards = Vec::new();
    let mut failed_reason: Option<(&'static str, String)> = None;
    let mut done_shards = vec![true; spec.shards as usize];
    let mut placement: BTreeMap<String, u32> = BTreeMap::new();
    let mut metric_sums: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    let mut digests: Vec<String> = Vec::new();
    let (mut replaced_lost, mut retried) = (0, 0);
    let mut accepted = Vec::new();
    let mut outvoted = Vec::new();
    let mut reveal = Vec::new();

    for shard in 0..spec.shards {
        let extra_slots = extra.get(&shard).copied().unwrap_or(0);
        // Adaptive: one replica first; all of them once its node is known to be untrusted
        // or the shard is spot-checked. A shard that ever had more keeps them.
        let alone = adaptive && extra_slots <= 1 && {
            let first = by_slot
                .get(&(shard, 0))
                .and_then(|ts| ts.iter().max_by_key(|t| t.attempt));
            match first {
                None => true,
                // A spot check is decided only once the node has committed to its result,
                // so a node never sees whether its shard will be checked before it commits.
                Some(t) => {
                    let committed =
                        matches!(t.phase, Some(TaskPhase::Committed | TaskPhase::Succeeded));
                    !t.node_lost
                        && (!committed || !job.spot_checked.contains(&shard))
                        && job.trusted.contains(&(t.member.clone(), t.node.clone()))
                }
            }
        };
        // A shard whose accepted results are paid is decided for good: when one of its
        // finished tasks vanishes (its member lost, an operator that never listed it), its
        // recorded slots stand and nothing of it runs again (the chaos run found paid
        // shards placed anew, their new results unpaid).
        if job.settled.contains(&shard) {
            let kept: Vec<&ShardStatus> =
                job.recorded.iter().filter(|s| s.index == shard).collect();
            let vanished = kept.iter().any(|s| {
                s.phase == TaskPhase::Succeeded && !by_slot.contains_key(&(shard, s.replica))
            });
            if vanished {
                for s in &kept {
                    shards.push((*s).clone());
                    *placement.entry(s.cluster.clone()).or_default() += 1;
                }
                if let Some(d) = kept
                    .iter()
                    .filter(|s| s.phase == TaskPhase::Succeeded)
                    .find_map(|s| s.result_digest.clone())
                {
                    digests.push(d);
                }
                for replica in 0..slots_before_settle(&extra, shard, replicas) {
                    for t in by_slot.remove(&(shard, replica)).unwrap_or_default() {
                        if !t.terminal() {
                            cancel.push(Cancel {
                                member: t.member.clone(),
                                name: t.name.clone(),
                                reason: "Verified",
                            });
                        }
                    }
                }
                continue;
            }
        }
        let (shard_replicas, shard_quorum) = if alone { (1, 1) } else { (replicas, quorum) };
        let verifying = shard_replicas > 1 || adaptive;
        let slots = shard_replicas.max(extra_slots);
        let mut results: Vec<ReplicaResult> = Vec::new();
        let mut broken: Vec<&TaskView> = Vec::new();
        let mut withdrawn: Vec<&TaskView> = Vec::new();
        let mut current_tasks: Vec<&TaskView> = Vec::new();
        let first_status = shards.len();
        let needs_before = needs.len();
        for replica in 0..slots {
            let mut slot_tasks = by_slot.remove(&(shard, replica)).unwrap_or_default();
            slot_tasks.sort_by_key(|t| t.attempt);
            let current = slot_tasks.last().copied();
            let max_attempt = current
                .map(|t| t.attempt)
                .unwrap_or(0)
                .max(recorded.get(&(shard, replica)).copied().unwrap_or(0));
            for stale in slot_tasks
                .iter()
                .filter(|t| Some(t.attempt) < current.map(|c| c.attempt))
            {
                if !stale.terminal() {
                    cancel.push(Cancel {
                        member: stale.member.clone(),
                        name: stale.name.clone(),
                        reason: "Superseded",
                    });
                }
            }
            let failures = slot_tasks
                .iter()
                .filter(|t| t.phase == Some(TaskPhase::Failed))
                .count() as u32;
            let avoid: Vec<(String, String)> = slot_tasks
                .iter()
                .filter(|t| t.phase == Some(TaskPhase::Failed) || t.node_lost)
                .map(|t| (t.member.clone(), t.node.clone()))
                .collect();
            let mut status = ShardStatus::unplaced(shard, replica, max_attempt);
            let mut need = |attempt: u32, avoid: Vec<(String, String)>| {
                needs.push(Need {
                    shard,
                    replica,
                    attempt,
                    avoid,
                })
            };
            if let Some(t) = current {
                current_tasks.push(t);
            }
            match current {
                Some(t) => {
                    // The operator's own observations of this attempt, kept once made.
                    let seen = seen_at.get(&(shard, replica, t.attempt));
                    // Dispatch: when the operator created the task (its own clock), else
                    // when it first saw it; a task that ran faster than a reconcile is
                    // then still paid for the time it really took.
                    status.dispatched_at =
                        observed_time(seen.and_then(|s| s.0).or(t.dispatched).unwrap_or(now));
                    let reported = matches!(
                        t.phase,
                        Some(TaskPhase::Committed | TaskPhase::Succeeded | TaskPhase::Failed)
                    );
                    status.reported_at = seen
                        .and_then(|s| s.1)
                        .or_else(|| reported.then_some(now))
                        .and_then(observed_time_up);
                    status.attempt = t.attempt;
                    status.cluster = t.cluster.clone();
                    status.node = t.node.clone();
                    status.phase = t.phase.unwrap_or(TaskPhase::Pending);
                    status.progress = t.progress.min(100);
                    status.started_at = to_time(t.started_at);
                    status.finished_at = to_time(t.finished_at);
                    status.result_digest = t.digest.clone();
                    status.message = t.message.clone();
                    *placement.entry(t.cluster.clone()).or_default() += 1;
                    // Progress liveness, by the operator's own clock: the attempt advanced
                    // when it was first seen, claimed, its progress rose or its phase
                    // changed. Lowering progress is no advance, so a stalling node cannot
                    // keep a slot forever by moving its progress up and down.
                    let before = recorded_status
                        .get(&(shard, replica))
                        .filter(|p| p.attempt == t.attempt);
                    let advanced = before
                        .is_none_or(|p| status.progress > p.progress || status.phase != p.phase);
                    let progressed = if advanced {
                        now
                    } else {
                        before
                            .and_then(|p| p.progressed_at.as_ref().or(p.dispatched_at.as_ref()))
                            .map(|t| t.0)
                            .unwrap_or(now)
                    };
                    status.progressed_at = observed_time(progressed);
                    let silent = matches!(
                        t.phase,
                        None | Some(TaskPhase::Pending | TaskPhase::Running)
                    ) && !t.node_lost
                        && now > progressed + job.progress_timeout;
                    match t.phase {
                        _ if silent => {
                            // Failed on its node by the operator; the next decision sees
                            // the failure and retries elsewhere, within maxRetries.
                            done_shards[shard as usize] = false;
                            let message = format!(
                                "no progress for {}s on node {} (progressTimeoutSeconds): failed there by the operator",
                                job.progress_timeout.as_secs(),
                                t.node
                            );
                            status.message = Some(message.clone());
                            stalled.push(Stall {
                                member: t.member.clone(),
                                name: t.name.clone(),
                                message,
                            });
                        }
                        Some(TaskPhase::Succeeded) if !t.opens() => {
                            status.message = Some(
                                "reveal rejected: the result does not open the commitment made before any replica's result was shown".into(),
                            );
                            broken.push(t);
                        }
                        Some(TaskPhase::Succeeded) => {
                            for (k, v) in &t.metrics {
                                // The job's metrics are bounded however many names
                                // its tasks' agents make up.
                                if metric_sums.len() >= JOB_METRICS && !metric_sums.contains_key(k)
                                {
                                    continue;
                                }
                                let e = metric_sums.entry(k.clone()).or_default();
                                e.0 += v;
                                e.1 += 1;
                            }
                            results.push(ReplicaResult {
                                replica,
                                digest: t.digest.clone().unwrap_or_default(),
                                vector: t.vector.clone(),
                            });
                        }
                        Some(TaskPhase::Failed) => {
                            done_shards[shard as usize] = false;
                            if t.commitment.is_some() {
                                // Bound to a result, then backed out (e.g. on seeing its
                                // shard spot-checked): caught, not a mere failure.
                                withdrawn.push(t);
                            }
                            if failures > spec.max_retries {
                                failed_reason.get_or_insert((
                                    "ShardFailed",
                                    format!(
                                        "shard {shard} replica {replica} failed {failures} time(s) (maxRetries {}): {}",
                                        spec.max_retries,
                                        t.message.as_deref().unwrap_or("no message")
                                    ),
                                ));
                            } else {
                                retried += 1;
                                need(max_attempt + 1, avoid);
                            }
                        }
                        Some(TaskPhase::Committed)
                            if !t.node_lost
                                && t.reveal_requested_at.is_some_and(|at| {
                                    now > at
                                        + SignedDuration::from_secs(
                                            edgeloom_crds::commitment::REVEAL_DEADLINE_SECONDS,
                                        )
                                }) =>
                        {
                            // Asked to reveal and silent past the deadline: withholding
                            // (stalling its shard) is caught, and the slot re-placed.
                            done_shards[shard as usize] = false;
                            withdrawn.push(t);
                            status.message = Some(format!(
                                "withheld its reveal past the {}s deadline; re-placing",
                                edgeloom_crds::commitment::REVEAL_DEADLINE_SECONDS
                            ));
                            need(max_attempt + 1, avoid);
                        }
                        _ if t.node_lost => {
                            done_shards[shard as usize] = false;
                            if t.phase == Some(TaskPhase::Committed) {
                                // Gone between its commitment and its reveal.
                                withdrawn.push(t);
                            }
                            status.message = Some(format!("node {} lost; re-placing", t.node));
                            replaced_lost += 1;
                            need(max_attempt + 1, avoid);
                        }
                        Some(TaskPhase::Cancelled) => {
                            done_shards[shard as usize] = false;
                            need(max_attempt + 1, avoid);
                        }
                        _ => done_shards[shard as usize] = false,
                    }
                }
                None => {
                    done_shards[shard as usize] = false;
                    status.message = job.unschedulable.clone();
                    // A recorded attempt whose task vanished is never reused.
                    need(max_attempt + 1, avoid);
                }
            }
            shards.push(status);
        }
        // What the operator itself saw of a replica: milliseconds from dispatch to result.
        let observed_ms = |replica: u32| {
            shards[first_status..]
                .iter()
                .find(|s| s.replica == replica)
                .and_then(|s| Some((s.dispatched_at.as_ref()?.0, s.reported_at.as_ref()?.0)))
                .map(|(from, to)| to.duration_since(from).as_millis().max(0) as u64)
        };
        // Usage is the agent's claim: pay at most what the operator observed itself, over
        // `observed` milliseconds.
        let paid = |t: &TaskView, verified: bool, observed: u64| {
            let (cpu_core_millis, gpu_millis) = bound_usage(
                t.cpu_core_millis,
                t.gpu_millis,
                observed,
                quantity::millicores(spec.resources.cpu.as_ref()),
                spec.resources.gpus,
            );
            Accepted {
                shard,
                replica: t.replica,
                attempt: t.attempt,
                member: t.member.clone(),
                cluster: t.cluster.clone(),
                node: t.node.clone(),
                digest: t.digest.clone().unwrap_or_default(),
                cpu_core_millis,
                gpu_millis,
                verified,
                relative_speed_milli: None,
            }
        };
        if !verifying {
            if let Some(r) = results.iter().find(|r| r.replica == 0) {
                digests.push(r.digest.clone());
                if let Some(t) = current_tasks.iter().find(|t| t.replica == 0) {
                    accepted.push(paid(t, false, observed_ms(t.replica).unwrap_or(0)));
                }
            }
            continue;
        }
        // Commit–reveal: once every replica of the shard has committed (and none is
        // lost), the sealed ones are asked to reveal; until they have, nothing is decided
        // on them. A broken reveal is caught at once.
        let sealed: Vec<&TaskView> = current_tasks
            .iter()
            .filter(|t| {
                t.phase == Some(TaskPhase::Committed)
                    && !t.node_lost
                    && !withdrawn.iter().any(|w| w.name == t.name)
            })
            .copied()
            .collect();
        let all_committed = current_tasks.len() as u32 == slots
            && current_tasks.iter().all(|t| {
                !t.node_lost && matches!(t.phase, Some(TaskPhase::Committed | TaskPhase::Succeeded))
            });
        if all_committed {
            reveal.extend(
                sealed
                    .iter()
                    .filter(|t| t.reveal_requested_at.is_none())
                    .map(|t| (t.member.clone(), t.name.clone())),
            );
        }
        let caught = |t: &TaskView, why: Caught| Outvoted {
            why,
            shard,
            replica: t.replica,
            attempt: t.attempt,
            member: t.member.clone(),
            cluster: t.cluster.clone(),
            node: t.node.clone(),
        };
        for t in broken.iter().chain(&withdrawn) {
            outvoted.push(caught(t, Caught::BrokenReveal));
        }
        // Verification: the shard is done when a quorum of its replicas agrees.
        let running = slots.saturating_sub((results.len() + broken.len()) as u32);
        match verification::decide(
            &results,
            running,
            slots,
            shard_quorum,
            tolerance,
            max_replicas,
        ) {
            Verdict::Accepted { .. } if !sealed.is_empty() => {
                // Every committed replica reveals before the shard is decided, so that an
                // honest replica slower to reveal is still paid.
                done_shards[shard as usize] = false;
            }
            Verdict::Accepted {
                digest,
                agreeing,
                dissenting,
            } => {
                done_shards[shard as usize] = true;
                digests.push(digest);
                needs.truncate(needs_before);

                let verified = agreeing.len() >= 2;
                let agreed: Vec<&TaskView> = current_tasks
                    .iter()
                    .filter(|t| agreeing.contains(&t.replica))
                    .copied()
                    .collect();
                // A window of 0 means the operator first saw the task finished (after a
                // restart or a backlog): unknown, not infinitely fast.
                let windows: Vec<Option<u64>> = agreed
                    .iter()
                    .map(|t| observed_ms(t.replica).filter(|w| *w > 0))
                    .collect();
                // Replicas of one shard did the same work: each is paid for at most the
                // median time the agreeing replicas took (for two, their mean), so a
                // stalling node earns little by it and an unknown window still pays.
                let mut known: Vec<u64> = windows.iter().flatten().copied().collect();
                known.sort_unstable();
                let k = known.len();
                let typical = (k > 0).then(|| (known[(k - 1) / 2] + known[k / 2]) / 2);
                for ((t, speed), own) in agreed
                    .iter()
                    .zip(trust::relative_speeds(&windows))
                    .zip(&windows)
                {
                    let window = if verified {
                        typical.or(*own).unwrap_or(0)
                    } else {
                        own.unwrap_or(0)
                    };
                    let mut a = paid(t, verified, window);
                    a.relative_speed_milli = speed.filter(|_| verified);
                    accepted.push(a);
                }
                for t in &current_tasks {
                    if dissenting.contains(&t.replica) {
                        outvoted.push(caught(t, Caught::Outvoted));
                    }
                }
                for st in shards[first_status..].iter_mut() {
                    if dissenting.contains(&st.replica) {
                        st.message = Some(format!(
                            "result outvoted: replicas {agreeing:?} agree on another result"
                        ));
                    } else if agreeing.contains(&st.replica) {
                        st.message = Some(if verified {
                            format!("verified: replicas {agreeing:?} agree")
                        } else {
                            "accepted alone: trusted node, not spot-checked".into()
                        });
                    }
                }
                // Replicas the decided shard no longer needs (their task cancelled and gone,
                // or never placed) say so, with the node they last had, rather than look
                // like a slot waiting for placement.
                for st in shards[first_status..]
                    .iter_mut()
                    .filter(|st| st.node.is_empty())
                {
                    if let Some(prev) = recorded_status.get(&(shard, st.replica)) {
                        st.attempt = prev.attempt;
                        st.cluster = prev.cluster.clone();
                        st.node = prev.node.clone();
                        st.started_at = prev.started_at.clone();
                        st.finished_at = prev.finished_at.clone();
                    }
                    st.phase = TaskPhase::Cancelled;
                    st.message = Some("not needed: the shard was decided without it".into());
                }
                for t in current_tasks.iter().filter(|t| !t.terminal()) {
                    cancel.push(Cancel {
                        member: t.member.clone(),
                        name: t.name.clone(),
                        reason: "Verified",
                    });
                }
            }
            Verdict::Pending { more } => {
                done_shards[shard as usize] = false;
                let avoid: Vec<(String, String)> = current_tasks
                    .iter()
                    .map(|t| (t.member.clone(), t.node.clone()))
                    .collect();
                for k in 0..more {
                    needs.push(Need {
                        shard,
                        replica: slots + k,
                        attempt: 1,
                        avoid: avoid.clone(),
                    });
                }
            }
            Verdict::Rejected { reason } => {
                done_shards[shard as usize] = false;
                failed_reason
                    .get_or_insert(("VerificationFailed", format!("shard {shard}: {reason}")));
            }
        }
    }

    // A slot is placed at most 1 + maxRetries + maxReplacements times: attempt numbers
    // count every placement (they are never reused), so a slot that keeps losing its
    // node cannot be re-placed forever.
    let max_attempts = 1 + spec.max_retries + spec.max_replacements;
    if let Some(n) = needs.iter().find(|n| n.attempt > max_attempts) {
        let last = shards
            .iter()
            .find(|s| s.index == n.shard && s.replica == n.replica)
            .and_then(|s| s.message.clone())
            .unwrap_or_else(|| "no message".into());
        failed_reason.get_or_insert((
            "AttemptsExhausted",
            format!(
                "shard {} replica {} was placed {} time(s) without a result (at most 1 + maxRetries {} + maxReplacements {}); last: {last}",
                n.shard,
                n.replica,
                n.attempt - 1,
                spec.max_retries,
                spec.max_replacements
            ),
        ));
        needs.retain(|n| n.attempt <= max_attempts);
    }

    // Budget: stop placing once the projected spend would pass it.
    let mut budget_stopped = None;
    let running = shards
        .iter()
        .filter(|s| {
            !s.node.is_empty() && matches!(s.phase, TaskPhase::Pending | TaskPhase::Running)
        })
        .count() as u64;
    if let Some(b) = job.budget
        && !needs.is_empty()
    {
        let projected = b
            .per_task
            .map(|p| {
                p.mul_div(running + needs.len() as u64, 1)
                    .and_then(|more| more.checked_add(b.spent))
            })
            .unwrap_or(Ok(b.spent));
        let over = match projected {
            Ok(p) => b.spent >= b.max || p > b.max,
            Err(_) => true,
        };
        if over {
            budget_stopped = Some(format!(
                "budget {} reached: {} spent{}, {running} task(s) running; placing {} more would exceed it",
                b.max,
                b.spent,
                b.per_task
                    .map(|p| format!(" (about {p} per task)"))
                    .unwrap_or_default(),
                needs.len()
            ));
            needs.clear();
        }
    }

    let done = done_shards.iter().filter(|d| **d).count();
    let any_task = !tasks.is_empty();
    let (mut phase, mut reason, mut message) = if let Some((reason, message)) = failed_reason {
        (JobPhase::Failed, reason, message)
    } else if done == spec.shards as usize {
        (
            JobPhase::Succeeded,
            "Completed",
            format!("all {} shard(s) succeeded", spec.shards),
        )
    } else if any_task {
        (
            JobPhase::Running,
            "Running",
            format!("{done}/{} shard(s) done", spec.shards),
        )
    } else {
        (
            JobPhase::Pending,
            "Waiting",
            job.unschedulable
                .clone()
                .unwrap_or_else(|| "waiting for placement".into()),
        )
    };
    if let Some(why) = &budget_stopped
        && running == 0
        && phase != JobPhase::Succeeded
        && phase != JobPhase::Failed
    {
        (phase, reason, message) = (JobPhase::Failed, "BudgetExceeded", why.clone());
    }
    if phase != JobPhase::Succeeded && phase != JobPhase::Failed {
        if let (Some(start), Some(deadline)) = (job.start_time, spec.deadline_seconds)
            && now > start + SignedDuration::from_secs(deadline as i64)
        {
            (phase, reason, message) = (
                JobPhase::Failed,
                "DeadlineExceeded",
                format!(
                    "{done}/{} shard(s) done when the {deadline}s deadline passed",
                    spec.shards
                ),
            );
        } else if spec.placement.gang == Some(true) && !any_task && job.unschedulable.is_some() {
            let timeout = spec
                .placement
                .gang_timeout_seconds
                .unwrap_or(DEFAULT_GANG_TIMEOUT_SECONDS);
            if now > job.created + SignedDuration::from_secs(timeout as i64) {
                (phase, reason, message) = (
                    JobPhase::Failed,
                    "Unschedulable",
                    format!(
                        "gang of {} task(s) could not be placed within {timeout}s: {}",
                        spec.shards * replicas,
                        job.unschedulable.as_deref().unwrap_or_default()
                    ),
                );
            }
        }
    }
    // A finished job (now or before) places nothing and cancels what still runs.
    if finished || matches!(phase, JobPhase::Succeeded | JobPhase::Failed) {
        if finished {
            phase = job.phase.unwrap_or(phase);
        }
        needs.clear();
        reveal.clear();
        stalled.clear();
        (replaced_lost, retried) = (0, 0);
        // Slots the end of the job cut off say so (their last attempt and node, or that
        // they were never placed) instead of looking like work still waiting or running.
        if !finished {
            for st in shards.iter_mut().filter(|st| {
                matches!(
                    st.phase,
                    TaskPhase::Pending | TaskPhase::Running | TaskPhase::Committed
                )
            }) {
                if st.node.is_empty()
                    && let Some(prev) = recorded_status.get(&(st.index, st.replica))
                {
                    st.attempt = prev.attempt;
                    st.cluster = prev.cluster.clone();
                    st.node = prev.node.clone();
                    st.started_at = prev.started_at.clone();
                }
                let what = if st.node.is_empty() {
                    "never placed"
                } else {
                    "cut off"
                };
                st.phase = TaskPhase::Cancelled;
                st.message = Some(format!("{what}: the job ended ({reason}) first"));
            }
        }
        for t in tasks.iter().filter(|t| !t.terminal()) {
            if !cancel
                .iter()
                .any(|c| c.name == t.name && c.member == t.member)
            {
                cancel.push(Cancel {
                    member: t.member.clone(),
                    name: t.name.clone(),
                    reason: "JobFinished",
                });
            }
        }
    }
    let metrics = metric_sums
        .into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect::<BTreeMap<_, _>>();
    let result = (phase == JobPhase::Succeeded).then(|| {
        let mut h = Sha256::new();
        for d in &digests {
            h.update(d.as_bytes());
            h.update(b"\n");
        }
        ResultSummary {
            digest: Some(hex::encode(h.finalize())),
            summary: metrics
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:.4}")))
                .collect(),
        }
    });
    Decision {
        phase,
        reason,
        message,
        needs,
        cancel,
        stalled,
        shards,
        progress: format!("{done}/{}", spec.shards),
        placement: (!placement.is_empty()).then(|| {
            placement
                .iter()
                .map(|(c, n)| format!("{c}:{n}"))
                .collect::<Vec<_>>()
                .join(",")
        }),
        metrics,
        result,
        replaced_lost,
        retried,
        accepted,
        outvoted,
        reveal,
        budget_stopped,
    }
}

/// The usage paid for a result: the agent's claims, each at most what the operator saw
/// itself, `observed_millis` from dispatch to result, times what the job requested
/// (`cpu_millicores`, 1 core when it named none; `gpus`, so no GPU time without a GPU).
pub fn bound_usage(
    claimed_cpu_core_millis: u64,
    claimed_gpu_millis: u64,
    observed_millis: u64,
    cpu_millicores: u64,
    gpus: u32,
) -> (u64, u64) {
    let cores_milli = if cpu_millicores == 0 {
        1000
    } else {
        cpu_millicores
    };
    let cpu_bound = (observed_millis as u128 * cores_milli as u128 / 1000).min(u64::MAX as u128);
    let gpu_bound = (observed_millis as u128 * gpus as u128).min(u64::MAX as u128);
    (
        claimed_cpu_core_millis.min(cpu_bound as u64),
        claimed_gpu_millis.min(gpu_bound as u64),
    )
}

/// The deterministic name of a task: `<first 16 of job uid>-<shard>-<replica>-<attempt>`.
/// Creating the same attempt twice (after a restart) finds the first one (the scheduler
/// checks that what it found is this job's).
pub fn task_name(job_uid: &str, shard: u32, replica: u32, attempt: u32) -> String {
    format!("{}-{shard}-{replica}-{attempt}", task_prefix(job_uid))
}

/// The part of a job's task names that names the job: the first 16 alphanumerics of its
/// UID (64 bits), lower case; two jobs sharing a prefix is then a one-in-a-billion event
/// even among a hundred thousand jobs, and the owner label is checked anyway.
pub fn task_prefix(job_uid: &str) -> String {
    let prefix: String = job_uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect();
    prefix.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloom_crds::workload::{Workload, WorkloadKind};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn spec(shards: u32) -> ComputeJobSpec {
        serde_json::from_value(serde_json::json!({
            "workload": {"kind": "Benchmark"}, "shards": shards, "maxRetries": 1
        }))
        .expect("spec")
    }

    fn t0() -> Timestamp {
        "2026-01-01T00:00:00Z".parse().expect("time")
    }

    fn task(shard: u32, attempt: u32, node: &str, phase: Option<TaskPhase>) -> TaskView {
        TaskView {
            member: "edge/edge-a".into(),
            cluster: "edge-a".into(),
            name: task_name("abcdef123456", shard, 0, attempt),
            shard,
            attempt,
            node: node.into(),
            phase,
            digest: (phase == Some(TaskPhase::Succeeded)).then(|| format!("d{shard}")),
            ..TaskView::default()
        }
    }

    fn view(spec: &ComputeJobSpec) -> JobView<'_> {
        JobView {
            spec,
            created: t0(),
            start_time: None,
            phase: None,
            recorded: &[],
            unschedulable: None,
            max_replicas: 3,
            trusted: BTreeSet::new(),
            spot_checked: BTreeSet::new(),
            budget: None,
            progress_timeout: SignedDuration::from_secs(600),
            settled: BTreeSet::new(),
        }
    }

    #[test]
    fn a_task_without_progress_is_failed_on_its_node_then_retried_elsewhere() {
        let s = spec(1); // maxRetries 1
        let running = task(0, 1, "n0", Some(TaskPhase::Running));
        // First seen: the timeout starts now.
        let d = decide(&view(&s), std::slice::from_ref(&running), t0());
        assert!(d.stalled.is_empty());
        assert_eq!(d.shards[0].progressed_at.as_ref().map(|t| t.0), Some(t0()));
        let recorded = d.shards.clone();
        let mut v = view(&s);
        v.recorded = &recorded;
        // Progress that rises within the timeout keeps it alive, and restarts the clock.
        let mut moving = running.clone();
        moving.progress = 40;
        let at = t0() + SignedDuration::from_secs(500);
        let d = decide(&v, std::slice::from_ref(&moving), at);
        assert!(d.stalled.is_empty());
        assert_eq!(d.shards[0].progressed_at.as_ref().map(|t| t.0), Some(at));
        let recorded = d.shards.clone();
        v.recorded = &recorded;
        // Progress moved down is no progress: silent for the timeout, it is failed there.
        let mut lowered = moving.clone();
        lowered.progress = 10;
        let later = at + SignedDuration::from_secs(601);
        let d = decide(&v, std::slice::from_ref(&lowered), later);
        assert_eq!(
            d.stalled,
            [Stall {
                member: "edge/edge-a".into(),
                name: running.name.clone(),
                message: "no progress for 600s on node n0 (progressTimeoutSeconds): failed there by the operator".into()
            }]
        );
        assert!(d.needs.is_empty(), "placed again once it shows Failed");
        assert_eq!(d.phase, JobPhase::Running);
        // Once failed, it counts as a failure of that node: retried elsewhere.
        let mut failed = running.clone();
        failed.phase = Some(TaskPhase::Failed);
        let d = decide(&v, std::slice::from_ref(&failed), later);
        assert_eq!(d.needs.len(), 1);
        assert_eq!(d.needs[0].attempt, 2);
        assert_eq!(d.needs[0].avoid, [("edge/edge-a".into(), "n0".into())]);
        // A task never claimed is judged the same way; a committed one is not (its
        // reveal deadline applies).
        for (phase, stalls) in [(None, 1), (Some(TaskPhase::Committed), 0)] {
            let t = task(0, 1, "n0", phase);
            let seen = decide(&view(&s), std::slice::from_ref(&t), t0()).shards;
            let mut v = view(&s);
            v.recorded = &seen;
            let d = decide(
                &v,
                std::slice::from_ref(&t),
                t0() + SignedDuration::from_secs(601),
            );
            assert_eq!(d.stalled.len(), stalls, "{phase:?}");
        }
    }

    #[test]
    fn a_slot_that_keeps_losing_its_node_fails_the_job_when_its_attempts_run_out() {
        let mut s = spec(1); // maxRetries 1
        s.max_replacements = 2;
        // Attempts 1..=4 may be placed (1 + 1 + 2); attempt 4 lost needs a fifth.
        let mut lost = task(0, 3, "n0", Some(TaskPhase::Running));
        lost.node_lost = true;
        let d = decide(&view(&s), std::slice::from_ref(&lost), t0());
        assert_eq!(d.needs.iter().map(|n| n.attempt).collect::<Vec<_>>(), [4]);
        assert_eq!(d.phase, JobPhase::Running);
        let mut lost = task(0, 4, "n1", Some(TaskPhase::Running));
        lost.node_lost = true;
        let d = decide(&view(&s), std::slice::from_ref(&lost), t0());
        assert!(d.needs.is_empty());
        assert_eq!(d.phase, JobPhase::Failed);
        assert_eq!(d.reason, "AttemptsExhausted");
        assert!(
            d.message.starts_with(
                "shard 0 replica 0 was placed 4 time(s) without a result (at most 1 + maxRetries 1 + maxReplacements 2); last: node n1 lost"
            ),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_new_job_needs_every_slot_at_attempt_one() {
        let s = spec(3);
        let d = decide(&view(&s), &[], t0());
        assert_eq!(d.phase, JobPhase::Pending);
        assert_eq!(
            d.needs
                .iter()
                .map(|n| (n.shard, n.attempt))
                .collect::<Vec<_>>(),
            [(0, 1), (1, 1), (2, 1)]
        );
        assert_eq!(d.progress, "0/3");
    }

    #[test]
    fn running_then_succeeded_with_a_combined_digest() {
        let s = spec(2);
        let running = [
            task(0, 1, "n0", Some(TaskPhase::Running)),
            task(1, 1, "n1", None),
        ];
        let d = decide(&view(&s), &running, t0());
        assert_eq!(d.phase, JobPhase::Running);
        assert!(d.needs.is_empty());
        assert_eq!(d.placement.as_deref(), Some("edge-a:2"));
        let mut done = [
            task(0, 1, "n0", Some(TaskPhase::Succeeded)),
            task(1, 1, "n1", Some(TaskPhase::Succeeded)),
        ];
        done[0].metrics.insert("accuracy".into(), 0.9);
        done[1].metrics.insert("accuracy".into(), 1.0);
        let d = decide(&view(&s), &done, t0());
        assert_eq!(d.phase, JobPhase::Succeeded);
        assert_eq!(d.metrics["accuracy"], 0.95);
        assert_eq!(d.progress, "2/2");
        assert_eq!(d.result.and_then(|r| r.digest).map(|d| d.len()), Some(64));
    }

    #[test]
    fn a_failure_is_retried_elsewhere_then_fails_the_job() {
        let s = spec(1); // maxRetries 1
        let mut first = task(0, 1, "n0", Some(TaskPhase::Failed));
        first.message = Some("corrupt model".into());
        let d = decide(&view(&s), std::slice::from_ref(&first), t0());
        assert_eq!(d.phase, JobPhase::Running);
        assert_eq!(
            d.needs,
            [Need {
                shard: 0,
                replica: 0,
                attempt: 2,
                avoid: vec![("edge/edge-a".into(), "n0".into())]
            }]
        );
        assert_eq!(d.retried, 1);
        let second = task(0, 2, "n1", Some(TaskPhase::Failed));
        let d = decide(&view(&s), &[first, second], t0());
        assert_eq!(d.phase, JobPhase::Failed);
        assert_eq!(d.reason, "ShardFailed");
        assert!(d.needs.is_empty());
    }

    #[test]
    fn a_lost_node_is_replaced_and_its_late_result_never_counts() {
        let s = spec(1);
        let mut lost = task(0, 1, "n0", Some(TaskPhase::Running));
        lost.node_lost = true;
        let d = decide(&view(&s), std::slice::from_ref(&lost), t0());
        assert_eq!(d.needs.len(), 1);
        assert_eq!(d.needs[0].attempt, 2);
        assert_eq!(d.replaced_lost, 1);
        // Attempt 2 runs; attempt 1 is now stale and cancelled.
        let mut old = lost.clone();
        old.node_lost = false;
        let new = task(0, 2, "n1", Some(TaskPhase::Running));
        let d = decide(&view(&s), &[old.clone(), new.clone()], t0());
        assert_eq!(
            d.cancel,
            [Cancel {
                member: "edge/edge-a".into(),
                name: old.name.clone(),
                reason: "Superseded"
            }]
        );
        // The old attempt reports success late: the job is still running attempt 2.
        let late = task(0, 1, "n0", Some(TaskPhase::Succeeded));
        let d = decide(&view(&s), &[late, new], t0());
        assert_eq!(d.phase, JobPhase::Running);
        assert_eq!(d.shards[0].attempt, 2);
        assert!(d.result.is_none());
    }

    #[test]
    fn an_unplaced_slot_in_status_is_not_an_attempt() {
        let s = spec(1);
        let first = decide(&view(&s), &[], t0());
        assert_eq!(first.shards[0].attempt, 0, "no attempt yet");
        let mut v = view(&s);
        v.recorded = &first.shards;
        assert_eq!(decide(&v, &[], t0()).needs[0].attempt, 1);
    }

    #[test]
    fn a_recorded_attempt_is_never_reused() {
        let s = spec(1);
        let recorded = [ShardStatus {
            index: 0,
            replica: 0,
            attempt: 4,
            cluster: "edge-b".into(),
            node: "gone".into(),
            phase: TaskPhase::Running,
            progress: 0,
            started_at: None,
            finished_at: None,
            dispatched_at: None,
            progressed_at: None,
            reported_at: None,
            result_digest: None,
            message: None,
        }];
        let mut v = view(&s);
        v.recorded = &recorded;
        let d = decide(&v, &[], t0());
        assert_eq!(d.needs[0].attempt, 5);
        // While attempt 5 waits to be placed, the slot shows attempt 4 without a node; that
        // is still the slot's highest attempt, never to be issued again.
        assert_eq!((d.shards[0].attempt, d.shards[0].node.as_str()), (4, ""));
        let waiting = d.shards.clone();
        v.recorded = &waiting;
        assert_eq!(decide(&v, &[], t0()).needs[0].attempt, 5);
    }

    #[test]
    fn deadline_and_gang_timeout_fail_with_the_reason() {
        let mut s = spec(2);
        s.deadline_seconds = Some(60);
        let mut v = view(&s);
        v.start_time = Some(t0());
        let running = [task(0, 1, "n0", Some(TaskPhase::Running))];
        let d = decide(&v, &running, t0() + SignedDuration::from_secs(61));
        assert_eq!((d.phase, d.reason), (JobPhase::Failed, "DeadlineExceeded"));
        assert_eq!(d.cancel.len(), 1, "the running task is cancelled");

        // The slots the deadline cut off say so: the running one on its node and attempt,
        // one whose task was lost on the node it last had, one never placed with no node.
        let mut s3 = spec(3);
        s3.deadline_seconds = Some(60);
        let mut v = view(&s3);
        v.start_time = Some(t0());
        let first = decide(
            &v,
            &[
                task(0, 1, "n0", Some(TaskPhase::Running)),
                task(1, 2, "n1", Some(TaskPhase::Running)),
            ],
            t0(),
        );
        v.recorded = &first.shards;
        let d = decide(
            &v,
            &[task(0, 1, "n0", Some(TaskPhase::Running))],
            t0() + SignedDuration::from_secs(61),
        );
        let shown: Vec<(u32, &str, TaskPhase, &str)> = d
            .shards
            .iter()
            .map(|s| {
                (
                    s.attempt,
                    s.node.as_str(),
                    s.phase,
                    s.message.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            shown,
            [
                (
                    1,
                    "n0",
                    TaskPhase::Cancelled,
                    "cut off: the job ended (DeadlineExceeded) first"
                ),
                (
                    2,
                    "n1",
                    TaskPhase::Cancelled,
                    "cut off: the job ended (DeadlineExceeded) first"
                ),
                (
                    0,
                    "",
                    TaskPhase::Cancelled,
                    "never placed: the job ended (DeadlineExceeded) first"
                ),
            ]
        );

        let mut g = spec(2);
        g.placement.gang = Some(true);
        g.placement.gang_timeout_seconds = Some(30);
        let mut v = view(&g);
        let late = t0() + SignedDuration::from_secs(31);
        assert_eq!(
            decide(&v, &[], late).phase,
            JobPhase::Pending,
            "no verdict from the scheduler yet"
        );
        v.unschedulable = Some("0/4 nodes fit: 4 lack free GPUs".into());
        assert_eq!(
            decide(&v, &[], t0() + SignedDuration::from_secs(29)).phase,
            JobPhase::Pending
        );
        let d = decide(&v, &[], t0() + SignedDuration::from_secs(31));
        assert_eq!((d.phase, d.reason), (JobPhase::Failed, "Unschedulable"));
        assert!(d.message.contains("4 lack free GPUs"), "{}", d.message);
    }

    #[test]
    fn replicas_are_separate_slots() {
        let mut s = spec(2);
        s.workload = Workload {
            kind: WorkloadKind::Benchmark,
            model: None,
            dataset: None,
            parameters: Default::default(),
            federation: None,
        };
        s.verification =
            Some(serde_json::from_value(serde_json::json!({"replicas": 2})).expect("verification"));
        let d = decide(&view(&s), &[], t0());
        assert_eq!(d.needs.len(), 4);
        assert_eq!(d.shards.len(), 4);
    }

    fn verified(replicas: u32, quorum: Option<u32>) -> ComputeJobSpec {
        let mut s = spec(1);
        s.verification = Some(
            serde_json::from_value(serde_json::json!({"replicas": replicas, "quorum": quorum}))
                .expect("verification"),
        );
        s
    }

    fn replica(r: u32, node: &str, digest: Option<&str>) -> TaskView {
        let mut t = task(
            0,
            1,
            node,
            Some(if digest.is_some() {
                TaskPhase::Succeeded
            } else {
                TaskPhase::Running
            }),
        );
        t.replica = r;
        t.name = task_name("abcdef123456", 0, r, 1);
        t.digest = digest.map(String::from);
        t
    }

    #[test]
    fn agreeing_replicas_verify_the_shard() {
        let s = verified(2, None);
        let d = decide(
            &view(&s),
            &[replica(0, "n0", Some("aa")), replica(1, "n1", Some("aa"))],
            t0(),
        );
        assert_eq!(d.phase, JobPhase::Succeeded);
        assert!(d.shards.iter().all(|x| {
            x.message
                .as_deref()
                .is_some_and(|m| m.starts_with("verified"))
        }));
    }

    #[test]
    fn disagreement_adds_a_replica_on_another_node_then_the_quorum_outvotes_the_cheat() {
        let s = verified(2, None);
        let split = [
            replica(0, "n0", Some("aa")),
            replica(1, "cheat", Some("zz")),
        ];
        let d = decide(&view(&s), &split, t0());
        assert_eq!(d.phase, JobPhase::Running);
        assert_eq!(d.needs.len(), 1);
        assert_eq!((d.needs[0].replica, d.needs[0].attempt), (2, 1));
        assert_eq!(
            d.needs[0].avoid.len(),
            2,
            "not on a node that already ran this shard"
        );
        let mut three = split.to_vec();
        three.push(replica(2, "n2", Some("aa")));
        let d = decide(&view(&s), &three, t0());
        assert_eq!(d.phase, JobPhase::Succeeded);
        let cheat = d.shards.iter().find(|x| x.replica == 1).expect("replica 1");
        assert!(
            cheat
                .message
                .as_deref()
                .is_some_and(|m| m.contains("outvoted")),
            "{cheat:?}"
        );
    }

    #[test]
    fn no_quorum_within_the_bound_fails_the_job_with_the_reason() {
        let s = verified(2, None);
        let all_differ = [
            replica(0, "n0", Some("aa")),
            replica(1, "n1", Some("bb")),
            replica(2, "n2", Some("cc")),
        ];
        let d = decide(&view(&s), &all_differ, t0());
        assert_eq!(
            (d.phase, d.reason),
            (JobPhase::Failed, "VerificationFailed")
        );
        assert!(d.message.contains("no quorum"), "{}", d.message);
    }

    #[test]
    fn a_reached_quorum_cancels_replicas_still_running() {
        let s = verified(3, Some(2));
        let d = decide(
            &view(&s),
            &[
                replica(0, "n0", Some("aa")),
                replica(1, "n1", Some("aa")),
                replica(2, "n2", None),
            ],
            t0(),
        );
        assert_eq!(d.phase, JobPhase::Succeeded);
        assert_eq!(
            d.cancel.iter().map(|c| c.reason).collect::<Vec<_>>(),
            ["Verified"]
        );
    }

    /// A third replica placed to break a tie and then not needed (the shard was decided,
    /// its task cancelled and gone): its slot says Cancelled, on the node it last had, not
    /// "Pending, no node".
    #[test]
    fn a_replica_the_decided_shard_no_longer_needs_says_cancelled() {
        let s = verified(2, None);
        let running = vec![
            replica(0, "n0", None),
            replica(1, "n1", None),
            replica(2, "n2", None),
        ];
        let mut v = view(&s);
        v.max_replicas = 3;
        // Three slots recorded with their nodes (the third a tie-breaker).
        let first = decide(&v, &running, t0());
        let mut recorded = first.shards.clone();
        if recorded.len() < 3 {
            let mut third = recorded[1].clone();
            third.replica = 2;
            third.node = "n2".into();
            recorded.push(third);
        }
        v.recorded = &recorded;
        // Replicas 0 and 1 agree; replica 2's task is gone.
        let done = vec![replica(0, "n0", Some("aa")), replica(1, "n1", Some("aa"))];
        let d = decide(&v, &done, t0() + SignedDuration::from_secs(5));
        let third = d
            .shards
            .iter()
            .find(|s| s.replica == 2)
            .expect("the third slot is still shown");
        assert_eq!(
            (third.phase, third.node.as_str()),
            (TaskPhase::Cancelled, "n2"),
            "{third:?}"
        );
        assert!(d.needs.is_empty(), "nothing re-placed: {:?}", d.needs);
    }

    #[test]
    fn accepted_and_outvoted_results_are_reported_for_payment_and_trust() {
        let s = verified(2, None);
        let mut three = vec![
            replica(0, "n0", Some("aa")),
            replica(1, "cheat", Some("zz")),
            replica(2, "n2", Some("aa")),
        ];
        three[0].cpu_core_millis = 1200;
        // The operator saw the tasks at t0 and their results 10 s later.
        let running: Vec<TaskView> = three
            .iter()
            .map(|t| replica(t.replica, &t.node, None))
            .collect();
        let first = decide(&view(&s), &running, t0());
        let mut v = view(&s);
        v.recorded = &first.shards;
        let d = decide(&v, &three, t0() + SignedDuration::from_secs(10));
        assert_eq!(d.shards[0].dispatched_at, Some(Time(t0())));
        assert_eq!(
            d.shards[0].reported_at,
            Some(Time(t0() + SignedDuration::from_secs(10)))
        );
        let paid: Vec<(u32, &str, bool)> = d
            .accepted
            .iter()
            .map(|a| (a.replica, a.node.as_str(), a.verified))
            .collect();
        assert_eq!(paid, [(0, "n0", true), (2, "n2", true)]);
        assert_eq!(d.accepted[0].cpu_core_millis, 1200);
        assert_eq!(d.outvoted.len(), 1);
        assert_eq!(d.outvoted[0].node, "cheat");
        // Before a quorum nothing is paid and nobody is caught.
        let d = decide(&view(&s), &three[..2], t0());
        assert!(d.accepted.is_empty() && d.outvoted.is_empty());
    }

    /// A task that ran faster than a reconcile is first seen with its result: its window
    /// starts when the operator created it (the annotation it set), not at that first
    /// sight, so an honest fast node is not paid 0.
    #[test]
    fn a_task_first_seen_with_its_result_is_paid_from_its_creation() {
        let s = verified(2, None);
        let mut two = vec![replica(0, "n0", Some("aa")), replica(1, "n1", Some("aa"))];
        for t in &mut two {
            t.cpu_core_millis = 300;
            t.dispatched = Some(t0() - SignedDuration::from_secs(2));
        }
        let d = decide(&view(&s), &two, t0());
        assert_eq!(
            d.shards[0].dispatched_at,
            Some(Time(t0() - SignedDuration::from_secs(2)))
        );
        assert_eq!(d.accepted.len(), 2);
        assert!(
            d.accepted.iter().all(|a| a.cpu_core_millis == 300),
            "{:?}",
            d.accepted
        );
        // Without the creation time (e.g. a task of an earlier operator), first sight it is.
        for t in &mut two {
            t.dispatched = None;
        }
        let d = decide(&view(&s), &two, t0());
        assert!(d.accepted.iter().all(|a| a.cpu_core_millis == 0));
    }

    #[test]
    fn paid_usage_is_bounded_by_what_the_operator_observed() {
        // 10 s observed, 2 cores asked for: at most 20 core-s; no GPU asked for: none paid.
        assert_eq!(
            bound_usage(1_000_000, 3_600_000, 10_000, 2000, 0),
            (20_000, 0)
        );
        // An honest claim below the bound is paid as claimed.
        assert_eq!(bound_usage(15_000, 9_000, 10_000, 2000, 1), (15_000, 9_000));
        // No CPU named: one core.
        assert_eq!(bound_usage(50_000, 0, 10_000, 0, 0), (10_000, 0));
        // Never seen finishing: nothing.
        assert_eq!(bound_usage(50_000, 50_000, 0, 4000, 2), (0, 0));
        // No overflow at the extremes.
        assert_eq!(
            bound_usage(u64::MAX, u64::MAX, u64::MAX, u64::MAX, 16),
            (u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn the_operators_observations_of_an_attempt_are_kept_and_bound_its_pay() {
        let s = spec(1);
        let mut v = view(&s);
        let first = decide(&v, &[task(0, 1, "n0", Some(TaskPhase::Running))], t0());
        v.recorded = &first.shards;
        let mut done = task(0, 1, "n0", Some(TaskPhase::Succeeded));
        done.cpu_core_millis = 1_000_000;
        done.gpu_millis = 5_000;
        let later = t0() + SignedDuration::from_secs(3);
        let d = decide(&v, std::slice::from_ref(&done), later);
        assert_eq!(
            (d.accepted[0].cpu_core_millis, d.accepted[0].gpu_millis),
            (3_000, 0)
        );
        // Seen again later: the recorded times stand (a result is not paid for waiting).
        let second = d.shards.clone();
        v.recorded = &second;
        let d = decide(&v, &[done], later + SignedDuration::from_secs(60));
        assert_eq!(d.shards[0].reported_at, Some(Time(later)));
        assert_eq!(d.accepted[0].cpu_core_millis, 3_000);
    }

    #[test]
    fn a_paid_shard_whose_task_vanishes_is_never_run_again() {
        let s = spec(2);
        let mut v = view(&s);
        let done = [
            task(0, 1, "n0", Some(TaskPhase::Succeeded)),
            task(1, 1, "n1", Some(TaskPhase::Running)),
        ];
        let first = decide(&v, &done, t0());
        assert_eq!(first.accepted.len(), 1);
        v.recorded = &first.shards;
        // Shard 0's task is gone (its member lost, or never listed by a new operator).
        let later = t0() + SignedDuration::from_secs(5);
        let unpaid = decide(&v, &done[1..], later);
        assert_eq!(
            unpaid
                .needs
                .iter()
                .map(|n| (n.shard, n.attempt))
                .collect::<Vec<_>>(),
            [(0, 2)],
            "not known to be paid: placed again"
        );
        v.settled = BTreeSet::from([0]);
        let paid = decide(&v, &done[1..], later);
        assert!(paid.needs.is_empty(), "{:?}", paid.needs);
        let shard0 = paid.shards.iter().find(|s| s.index == 0).expect("shard 0");
        assert_eq!((shard0.attempt, shard0.phase), (1, TaskPhase::Succeeded));
        assert!(paid.accepted.is_empty(), "paid already");
    }

    #[test]
    fn observation_times_are_whole_seconds_so_the_pay_is_the_same_when_read_back() {
        // The status keeps whole seconds; a window measured at finer precision in the
        // reconcile that saw the result would pay differently from a later one.
        let s = spec(1);
        let mut v = view(&s);
        let start = t0() + SignedDuration::from_millis(900);
        let first = decide(&v, &[task(0, 1, "n0", Some(TaskPhase::Running))], start);
        assert_eq!(first.shards[0].dispatched_at, Some(Time(t0())));
        v.recorded = &first.shards;
        let mut done = task(0, 1, "n0", Some(TaskPhase::Succeeded));
        done.cpu_core_millis = 1_000_000;
        let end = t0() + SignedDuration::from_millis(2_200);
        let d = decide(&v, std::slice::from_ref(&done), end);
        assert_eq!(
            d.shards[0].reported_at,
            Some(Time(t0() + SignedDuration::from_secs(3))),
            "the end of the window rounded up"
        );
        let paid_first = d.accepted[0].cpu_core_millis;
        let read_back = d.shards.clone();
        v.recorded = &read_back;
        let again = decide(&v, &[done], end + SignedDuration::from_secs(30));
        assert_eq!(paid_first, 3_000);
        assert_eq!(again.accepted[0].cpu_core_millis, paid_first);
    }

    #[test]
    fn a_single_replica_job_pays_its_current_attempt_only() {
        let s = spec(1);
        let old = task(0, 1, "n0", Some(TaskPhase::Succeeded));
        let new = task(0, 2, "n1", Some(TaskPhase::Succeeded));
        let d = decide(&view(&s), &[old, new], t0());
        assert_eq!(d.accepted.len(), 1);
        assert_eq!(
            (d.accepted[0].attempt, d.accepted[0].node.as_str()),
            (2, "n1")
        );
        assert!(
            !d.accepted[0].verified,
            "an unverified result earns no trust"
        );
    }

    fn adaptive(replicas: u32) -> ComputeJobSpec {
        let mut s = spec(1);
        s.verification = Some(
            serde_json::from_value(serde_json::json!({"replicas": replicas, "adaptive": true}))
                .expect("verification"),
        );
        s
    }

    #[test]
    fn adaptive_runs_one_replica_first_and_accepts_a_trusted_node_alone() {
        let s = adaptive(2);
        let d = decide(&view(&s), &[], t0());
        assert_eq!(d.needs.len(), 1, "one replica first");
        let mut v = view(&s);
        v.trusted.insert(("edge/edge-a".into(), "n0".into()));
        let d = decide(&v, &[replica(0, "n0", None)], t0());
        assert!(d.needs.is_empty(), "a trusted node runs alone");
        let d = decide(&v, &[replica(0, "n0", Some("aa"))], t0());
        assert_eq!(d.phase, JobPhase::Succeeded);
        assert_eq!(d.accepted.len(), 1);
        assert!(!d.accepted[0].verified);
        assert!(
            d.shards[0]
                .message
                .as_deref()
                .is_some_and(|m| m.contains("trusted"))
        );
    }

    #[test]
    fn adaptive_replicates_untrusted_and_spot_checked_shards() {
        let s = adaptive(2);
        // Untrusted node: the second replica is needed at once, not after the result.
        let d = decide(&view(&s), &[replica(0, "n0", None)], t0());
        assert_eq!(d.needs.iter().map(|n| n.replica).collect::<Vec<_>>(), [1]);
        let d = decide(&view(&s), &[replica(0, "n0", Some("aa"))], t0());
        assert_eq!(d.phase, JobPhase::Running, "not accepted alone");
        // Trusted but spot-checked.
        let mut v = view(&s);
        v.trusted.insert(("edge/edge-a".into(), "n0".into()));
        v.spot_checked.insert(0);
        let d = decide(&v, &[replica(0, "n0", Some("aa"))], t0());
        assert_eq!(d.needs.len(), 1);
        let d = decide(
            &v,
            &[replica(0, "n0", Some("aa")), replica(1, "n1", Some("aa"))],
            t0(),
        );
        assert_eq!(d.phase, JobPhase::Succeeded);
        assert!(
            d.accepted.iter().all(|a| a.verified),
            "a spot check that agrees earns trust"
        );
        // Once a shard had a second replica it keeps needing a quorum, trusted or not.
        let mut v = view(&s);
        v.trusted.insert(("edge/edge-a".into(), "n0".into()));
        let d = decide(
            &v,
            &[replica(0, "n0", Some("aa")), replica(1, "n1", None)],
            t0(),
        );
        assert_eq!(d.phase, JobPhase::Running);
    }

    /// Replica `r` of shard 0 with commit–reveal: Running (None), Committed (Some(None)) or
    /// revealed (Some(Some(digest))), committed to `committed_to`.
    fn sealed(r: u32, node: &str, committed_to: &str, revealed: Option<Option<&str>>) -> TaskView {
        use edgeloom_crds::commitment;
        let mut t = replica(r, node, None);
        let nonce = commitment::nonce("abcdef123456", 0, r, 1);
        let salt = format!("salt-{node}");
        if let Some(revealed) = revealed {
            t.commitment = Some(commitment::commitment(&nonce, committed_to, &[], &salt));
            t.phase = Some(TaskPhase::Committed);
            if let Some(d) = revealed {
                t.phase = Some(TaskPhase::Succeeded);
                t.digest = Some(d.into());
                t.salt = Some(salt);
            }
        }
        t.nonce = Some(nonce);
        t
    }

    #[test]
    fn reveals_are_asked_for_only_when_every_replica_has_committed() {
        let s = verified(2, None);
        let one = [
            sealed(0, "n0", "aa", Some(None)),
            sealed(1, "n1", "aa", None),
        ];
        let d = decide(&view(&s), &one, t0());
        assert!(d.reveal.is_empty(), "replica 1 still runs: {:?}", d.reveal);
        assert_eq!(d.phase, JobPhase::Running);
        let both = [
            sealed(0, "n0", "aa", Some(None)),
            sealed(1, "n1", "aa", Some(None)),
        ];
        let d = decide(&view(&s), &both, t0());
        assert_eq!(d.reveal.len(), 2, "{:?}", d.reveal);
        assert!(d.accepted.is_empty());
        // Asked once: not again.
        let mut asked = both.clone();
        asked
            .iter_mut()
            .for_each(|t| t.reveal_requested_at = Some(t0()));
        assert!(decide(&view(&s), &asked, t0()).reveal.is_empty());
        // One revealed, one not yet: the shard waits for it rather than leaving it unpaid.
        let mut half = asked.clone();
        half[0] = sealed(0, "n0", "aa", Some(Some("aa")));
        let d = decide(&view(&s), &half, t0());
        assert_eq!(d.phase, JobPhase::Running);
        assert!(d.accepted.is_empty() && d.cancel.is_empty());
        let done = [
            sealed(0, "n0", "aa", Some(Some("aa"))),
            sealed(1, "n1", "aa", Some(Some("aa"))),
        ];
        let d = decide(&view(&s), &done, t0());
        assert_eq!(d.phase, JobPhase::Succeeded);
        assert_eq!(d.accepted.len(), 2);
        assert!(d.accepted.iter().all(|a| a.verified));
    }

    #[test]
    fn a_copied_result_does_not_open_the_copiers_commitment_and_is_caught() {
        let s = verified(2, None);
        // The copier committed to something else (it had seen nothing), then revealed the
        // honest replica's result; or it copied the honest commitment itself.
        let mut copied_commitment = sealed(1, "copier", "aa", Some(Some("aa")));
        copied_commitment.commitment = sealed(0, "n0", "aa", Some(None)).commitment;
        for copier in [
            sealed(1, "copier", "guess", Some(Some("aa"))),
            copied_commitment,
        ] {
            let tasks = [sealed(0, "n0", "aa", Some(Some("aa"))), copier];
            let d = decide(&view(&s), &tasks, t0());
            assert_eq!(d.phase, JobPhase::Running, "no quorum without the copier");
            assert_eq!(d.outvoted.len(), 1);
            assert_eq!(
                (d.outvoted[0].why, d.outvoted[0].node.as_str()),
                (Caught::BrokenReveal, "copier")
            );
            assert!(d.accepted.is_empty(), "nobody paid yet");
            assert_eq!(
                d.needs.iter().map(|n| n.replica).collect::<Vec<_>>(),
                [2],
                "a third replica decides"
            );
            let msg = d.shards[1].message.clone().unwrap_or_default();
            assert!(msg.contains("does not open the commitment"), "{msg}");
        }
        // A result shown without any commitment is caught the same way.
        let mut open = replica(1, "early", Some("aa"));
        open.nonce = Some(edgeloom_crds::commitment::nonce("abcdef123456", 0, 1, 1));
        let d = decide(
            &view(&s),
            &[sealed(0, "n0", "aa", Some(Some("aa"))), open],
            t0(),
        );
        assert_eq!(d.outvoted.len(), 1);
        assert_eq!(d.outvoted[0].why, Caught::BrokenReveal);
    }

    #[test]
    fn backing_out_after_committing_is_caught_not_just_a_failure() {
        let s = verified(2, None);
        // Committed, then failed (say, on seeing its shard spot-checked): caught, retried.
        let mut backed_out = sealed(0, "n0", "bad", Some(None));
        backed_out.phase = Some(TaskPhase::Failed);
        let d = decide(
            &view(&s),
            &[backed_out, sealed(1, "n1", "aa", Some(None))],
            t0(),
        );
        assert_eq!(d.outvoted.len(), 1);
        assert_eq!(
            (d.outvoted[0].why, d.outvoted[0].node.as_str()),
            (Caught::BrokenReveal, "n0")
        );
        assert_eq!(
            d.needs
                .iter()
                .map(|n| (n.replica, n.attempt))
                .collect::<Vec<_>>(),
            [(0, 2)]
        );
        // Its node gone between commitment and reveal: the same.
        let mut gone = sealed(0, "n0", "aa", Some(None));
        gone.node_lost = true;
        let d = decide(&view(&s), &[gone, sealed(1, "n1", "aa", Some(None))], t0());
        assert_eq!(d.outvoted.len(), 1);
        // Asked to reveal and silent past the deadline: caught, and the slot re-placed.
        let mut silent = sealed(0, "n0", "aa", Some(None));
        silent.reveal_requested_at = Some(t0());
        let mut revealed = sealed(1, "n1", "aa", Some(Some("aa")));
        revealed.reveal_requested_at = Some(t0());
        let both = [silent, revealed];
        let d = decide(&view(&s), &both, t0() + SignedDuration::from_secs(30));
        assert!(
            d.outvoted.is_empty() && d.needs.is_empty(),
            "still within the deadline"
        );
        let d = decide(&view(&s), &both, t0() + SignedDuration::from_secs(61));
        assert_eq!(d.outvoted.len(), 1);
        assert_eq!(d.outvoted[0].node, "n0");
        assert_eq!(
            d.needs
                .iter()
                .map(|n| (n.replica, n.attempt))
                .collect::<Vec<_>>(),
            [(0, 2)]
        );
        // A failure before committing is an ordinary failure.
        let mut failed = sealed(0, "n0", "aa", None);
        failed.phase = Some(TaskPhase::Failed);
        let d = decide(
            &view(&s),
            &[failed, sealed(1, "n1", "aa", Some(None))],
            t0(),
        );
        assert!(d.outvoted.is_empty());
    }

    #[test]
    fn a_spot_check_is_decided_only_after_the_trusted_node_has_committed() {
        let s = adaptive(2);
        let mut v = view(&s);
        v.trusted.insert(("edge/edge-a".into(), "n0".into()));
        v.spot_checked.insert(0);
        // Running: the node sees no other replica of its shard.
        let d = decide(&v, &[sealed(0, "n0", "aa", None)], t0());
        assert!(d.needs.is_empty(), "{:?}", d.needs);
        // Committed: now the check is placed, and nothing is revealed before it commits.
        let d = decide(&v, &[sealed(0, "n0", "aa", Some(None))], t0());
        assert_eq!(d.needs.iter().map(|n| n.replica).collect::<Vec<_>>(), [1]);
        assert!(d.reveal.is_empty());
        // Not spot-checked: revealed and accepted alone.
        v.spot_checked.clear();
        let d = decide(&v, &[sealed(0, "n0", "aa", Some(None))], t0());
        assert!(d.needs.is_empty());
        assert_eq!(d.reveal.len(), 1);
        let d = decide(&v, &[sealed(0, "n0", "aa", Some(Some("aa")))], t0());
        assert_eq!(d.phase, JobPhase::Succeeded);
    }

    #[test]
    fn the_budget_stops_placement_and_fails_the_job_when_nothing_runs() {
        let s = spec(4);
        let amount = |x: &str| x.parse::<Amount>().expect("amount");
        let mut v = view(&s);
        v.budget = Some(BudgetView {
            max: amount("1"),
            spent: amount("0.5"),
            per_task: Some(amount("0.25")),
        });
        // Shards 0 and 1 done (paid 0.5), 2 running, 3 needs a node: 0.5 + 2 x 0.25 = 1 fits.
        let tasks = [
            task(0, 1, "n0", Some(TaskPhase::Succeeded)),
            task(1, 1, "n1", Some(TaskPhase::Succeeded)),
            task(2, 1, "n2", Some(TaskPhase::Running)),
        ];
        let d = decide(&v, &tasks, t0());
        assert_eq!(d.needs.len(), 1);
        assert!(d.budget_stopped.is_none());
        // Dearer tasks: 0.5 + 2 x 0.3 > 1: nothing more is placed, the running task goes on.
        v.budget = Some(BudgetView {
            per_task: Some(amount("0.3")),
            ..v.budget.expect("budget")
        });
        let d = decide(&v, &tasks, t0());
        assert!(d.needs.is_empty());
        assert_eq!(d.phase, JobPhase::Running);
        assert!(
            d.budget_stopped
                .as_deref()
                .is_some_and(|m| m.contains("budget 1"))
        );
        // Nothing running any more and still a shard without a node: the job fails.
        let mut done = tasks.to_vec();
        done[2] = task(2, 1, "n2", Some(TaskPhase::Succeeded));
        v.budget = Some(BudgetView {
            spent: amount("0.8"),
            ..v.budget.expect("budget")
        });
        let d = decide(&v, &done, t0());
        assert_eq!((d.phase, d.reason), (JobPhase::Failed, "BudgetExceeded"));
        // Before the first receipt there is no estimate: placement goes on.
        v.budget = Some(BudgetView {
            max: amount("1"),
            spent: Amount::ZERO,
            per_task: None,
        });
        assert_eq!(decide(&v, &[], t0()).needs.len(), 4);
    }

    #[test]
    fn task_names_are_deterministic_and_valid() {
        assert_eq!(task_name("6F1C-2b3d-4e5f", 3, 1, 2), "6f1c2b3d4e5f-3-1-2");
        assert_eq!(
            task_name("0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9", 3, 1, 2),
            "0a1b2c3d4e5f6071-3-1-2",
            "64 bits of the UID"
        );
        assert_eq!(
            task_name("6F1C-2b3d-4e5f", 3, 1, 2),
            task_name("6F1C-2b3d-4e5f", 3, 1, 2)
        );
    }
}
