//! ComputeJob: what a user wants run (namespaced, in the hub cluster).

use crate::schema::{Decimal, dns_label_set, label_map, short_string_set};
use crate::workload::{Resources, Workload};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A unit of work for the edge pool: a workload split into shards, placed on edge nodes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgeloom.io",
    version = "v1alpha1",
    kind = "ComputeJob",
    namespaced,
    status = "ComputeJobStatus",
    shortname = "cjob",
    category = "edgeloom",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Shards","type":"integer","jsonPath":".spec.shards"}"#,
    printcolumn = r#"{"name":"Placement","type":"string","jsonPath":".status.placement"}"#,
    printcolumn = r#"{"name":"Rewards","type":"string","jsonPath":".status.rewards.total"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.workload == oldSelf.spec.workload").message("spec.workload is immutable once the job has started").field_path(".spec.workload"),
    validation = Rule::new("!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' || self.spec.shards == oldSelf.spec.shards").message("spec.shards is immutable once the job has started").field_path(".spec.shards")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.verification) || self.verification.replicas == 1 || !has(self.placement.spread) || self.placement.spread != 'None'").message("verification replicas need distinct nodes: placement.spread must not be None").field_path(".placement.spread"))]
#[x_kube(validation = Rule::new("!has(self.placement) || !has(self.placement.gang) || !self.placement.gang || self.shards * (has(self.verification) ? self.verification.replicas : 1) <= 500").message("a gang job has at most 500 slots (shards x verification replicas): its attempts are all issued at once").field_path(".placement.gang"))]
#[x_kube(validation = Rule::new("self.workload.kind != 'Federated' || !has(self.shards) || self.shards <= 500").message("a Federated job has at most 500 participants per round (a member's aggregation task carries a URL for each)").field_path(".shards"))]
#[x_kube(validation = Rule::new("self.workload.kind != 'Federated' || !has(self.verification)").message("a Federated job is checked by robust aggregation of its updates, not by replicated verification").field_path(".verification"))]
#[x_kube(validation = Rule::new("self.workload.kind != 'Federated' || !has(self.placement) || !has(self.placement.gang) || !self.placement.gang").message("a Federated job picks its participants round by round: gang placement does not apply").field_path(".placement.gang"))]
pub struct ComputeJobSpec {
    /// What to run.
    pub workload: Workload,
    /// Number of shards the data is split into; each shard is one task. For a Federated
    /// job: the most nodes taking part in a round.
    #[serde(default = "default_shards")]
    #[schemars(range(min = 1, max = 10_000))]
    pub shards: u32,
    /// What each shard needs from its node.
    #[serde(default)]
    pub resources: Resources,
    /// Where shards may go.
    #[serde(default)]
    pub placement: Placement,
    /// Higher runs first; ties go to the older job.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// How many times a failed shard is retried on another node.
    #[serde(default = "default_max_retries")]
    #[schemars(range(max = 100))]
    pub max_retries: u32,
    /// How many times one shard replica may be placed again after its node was lost, its
    /// task vanished or was cancelled (failures count against `maxRetries` instead). A
    /// slot is never placed more than 1 + maxRetries + maxReplacements times; past that
    /// the job fails with reason AttemptsExhausted.
    #[serde(default = "default_max_replacements")]
    #[schemars(range(max = 100))]
    pub max_replacements: u32,
    /// Seconds a task may go without progress before it is failed on its node and
    /// re-placed; default the pool's `progressTimeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86_400))]
    pub progress_timeout_seconds: Option<u32>,
    /// Seconds from the job's start after which unfinished shards fail the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub deadline_seconds: Option<u32>,
    /// Run each shard on several nodes and accept the result a quorum agrees on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// The most the job may cost; placement stops before it would be exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

fn default_shards() -> u32 {
    1
}
fn default_max_retries() -> u32 {
    3
}
fn default_max_replacements() -> u32 {
    10
}

/// How shards are spread over the pool.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum Spread {
    /// No spreading constraint.
    None,
    /// Prefer distinct nodes for the job's tasks.
    #[default]
    Node,
    /// Prefer distinct member clusters for the job's tasks.
    Cluster,
}

/// Where a job's shards may be placed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.pools) && size(self.pools) > 0 && has(self.poolSelector))").message("set pools or poolSelector, not both").field_path(".poolSelector"))]
#[x_kube(validation = Rule::new("!has(self.gangTimeoutSeconds) || (has(self.gang) && self.gang)").message("gangTimeoutSeconds requires gang: true").field_path(".gangTimeoutSeconds"))]
pub struct Placement {
    /// Names of EdgePools to use; empty with no poolSelector = every pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "dns_label_set")]
    pub pools: Vec<String>,
    /// Selects EdgePools by their labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_selector: Option<LabelSelector>,
    /// Allowed regions (of member clusters); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "short_string_set")]
    pub regions: Vec<String>,
    /// Allowed zones (of member clusters); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "short_string_set")]
    pub zones: Vec<String>,
    /// Labels a node (or its member cluster) must carry, e.g. data residency.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map")]
    pub required_labels: BTreeMap<String, String>,
    /// Spreading of the job's tasks: None, Node (default) or Cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<Spread>,
    /// Place all shards at once or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<bool>,
    /// With gang: seconds to wait for room for every shard before the job fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86_400))]
    pub gang_timeout_seconds: Option<u32>,
}

/// Result verification by replication (BOINC-style quorum).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.quorum) || self.quorum <= self.replicas").message("quorum must not exceed replicas").field_path(".quorum"))]
pub struct Verification {
    /// Nodes each shard runs on.
    #[schemars(range(min = 1, max = 9))]
    pub replicas: u32,
    /// Agreeing results needed; default a majority of replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 9))]
    pub quorum: Option<u32>,
    /// Relative tolerance when comparing floating-point result vectors; 0 = exact digests.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("must be at least 0 and less than 1"))]
    pub tolerance: f64,
    /// Adaptive trust: a shard first runs once; it is accepted alone when that node is
    /// trusted (a long run of verified results, see the pool's verification policy) and
    /// not picked for a random spot check; otherwise it gets all `replicas`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adaptive: bool,
}

/// A spending limit for a job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Budget {
    /// The most the job may pay, in the pool's reward unit.
    pub max_amount: Decimal,
}

/// Lifecycle phase of a job.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum JobPhase {
    /// Accepted, waiting for placement.
    Pending,
    /// Tasks are placed and running.
    Running,
    /// Every shard has a verified result.
    Succeeded,
    /// The job cannot complete; see conditions.
    Failed,
}

/// Observed state of a ComputeJob, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeJobStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// Conditions the operator sets: `Scheduled` (reasons Placed, Unschedulable, Waiting,
    /// Finished), `Complete` and `Failed` (the verdict), `Paid` (ReceiptsIssued,
    /// LedgerUnavailable, ReceiptRefused) and `BudgetExceeded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Shards done out of all, e.g. "3/4".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Where shards run, e.g. "edge-a:2,edge-b:2".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<String>,
    /// One entry per shard attempt currently relevant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Aggregated workload metrics (e.g. accuracy, samplesPerSecond, tflops).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
    /// Summary of the combined result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultSummary>,
    /// What the job has paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<RewardSummary>,
    /// When the first task was placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job reached Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Attempts the scheduler issued that `shards` may not show yet, by "shard/replica".
    /// The scheduler writes an attempt here (conditional on the job's resourceVersion)
    /// before it creates the task, so no attempt number is ever issued twice, across
    /// partitions, operator restarts and leader handovers; entries `shards` has caught up
    /// with are removed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub issued: BTreeMap<String, IssuedAttempt>,
    /// A big job (more slots than the operator's `--status-inline-slots`, default 500)
    /// keeps every slot's status in these pages, in order, and `shards` shows at most 100
    /// slots not finished: the job stays far below the API server's object size limit
    /// however many shards it has. The pages are ConfigMaps in the operator's namespace,
    /// written by the operator only, deleted with the job.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub shard_pages: Vec<ShardPage>,
    /// With `shardPages`: every slot's highest attempt, as runs of consecutive shards of
    /// one replica joined by commas, `<replica>:<first>-<last>=<attempt>` where they share
    /// an attempt, `<replica>:<first>=<attempt>.<attempt>...` otherwise (the scheduler
    /// fences attempts against them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2_000_000))]
    pub slot_attempts: Option<String>,
    /// A Federated job's rounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<crate::federated::FederatedStatus>,
}

/// One page of a big job's shard status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardPage {
    /// The ConfigMap (in the operator's namespace) holding the page as `shards.json`.
    #[schemars(length(max = 253))]
    pub name: String,
    /// SHA-256 of the page's JSON (16 hex digits): the operator reads a page again only
    /// when it changed.
    #[schemars(length(max = 64))]
    pub hash: String,
    /// Slots in the page.
    pub slots: u32,
}

/// One attempt the scheduler issued: the fencing token and where its task goes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuedAttempt {
    /// The attempt number.
    pub attempt: u32,
    /// EdgePool of the member cluster.
    pub pool: String,
    /// Member cluster.
    pub cluster: String,
    /// Node.
    pub node: String,
    /// When it was issued, by the operator's clock.
    pub at: Time,
}

/// The key of a slot in [`ComputeJobStatus::issued`].
pub fn slot_key(shard: u32, replica: u32) -> String {
    format!("{shard}/{replica}")
}

/// Phase of one shard attempt (mirrors the ComputeTask).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum TaskPhase {
    /// Created, not yet claimed by the node's agent.
    Pending,
    /// Claimed and running.
    Running,
    /// Finished; the result is sealed by a commitment until the operator asks for its
    /// reveal (verified jobs only: see `commitment`).
    Committed,
    /// Finished with a result.
    Succeeded,
    /// Finished without a result; see message.
    Failed,
    /// Stopped because its job or attempt was superseded.
    Cancelled,
}

/// The state of one shard (and one replica of it, with verification).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard index, from 0.
    pub index: u32,
    /// Replica index, from 0 (verification).
    #[serde(default)]
    pub replica: u32,
    /// Attempt number; the fencing token of the ComputeTask.
    pub attempt: u32,
    /// Member cluster the attempt runs in.
    pub cluster: String,
    /// Node the attempt runs on.
    pub node: String,
    /// Phase of the attempt.
    pub phase: TaskPhase,
    /// Percent done, 0-100.
    #[serde(default)]
    pub progress: u8,
    /// When the agent started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// When the operator first saw this attempt's task, by the operator's own clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<Time>,
    /// When the operator first saw this attempt's result (or commitment), by its own
    /// clock. Paid usage is at most (reportedAt - dispatchedAt) x the resources requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<Time>,
    /// When the operator last saw this attempt advance (claimed, its progress rose or its
    /// phase changed), by its own clock: the start of its progress timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progressed_at: Option<Time>,
    /// sha256 of the canonical result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_digest: Option<String>,
    /// Why it failed or was re-placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ShardStatus {
    /// A slot with no node yet (or no longer), `Pending`, at `attempt`.
    pub fn unplaced(index: u32, replica: u32, attempt: u32) -> ShardStatus {
        ShardStatus {
            index,
            replica,
            attempt,
            cluster: String::new(),
            node: String::new(),
            phase: TaskPhase::Pending,
            progress: 0,
            started_at: None,
            finished_at: None,
            dispatched_at: None,
            reported_at: None,
            progressed_at: None,
            result_digest: None,
            message: None,
        }
    }
}

/// The combined result of a job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResultSummary {
    /// sha256 over the shards' accepted result digests, in shard order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Human-readable summary values (e.g. accuracy "0.973").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub summary: BTreeMap<String, String>,
}

/// What a job has paid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RewardSummary {
    /// Total paid, with its unit, e.g. "0.42 credits".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<String>,
    /// Total as an exact decimal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Decimal>,
    /// Reward unit of the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Receipts issued for this job.
    #[serde(default)]
    pub receipts: u64,
    /// Amount per contributor account.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_account: BTreeMap<String, Decimal>,
}
