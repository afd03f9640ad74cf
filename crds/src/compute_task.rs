//! ComputeTask: one shard attempt bound to one node (namespaced, in a member cluster).
//! The operator owns `spec`; the node's agent owns `status`.

use crate::compute_job::TaskPhase;
use crate::schema::Quantity;
use crate::workload::Workload;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Label on a ComputeTask naming its node, so an agent can watch only its own tasks.
pub const NODE_LABEL: &str = "edgeloom.io/node";
/// Label on a ComputeTask carrying its job's UID.
pub const JOB_UID_LABEL: &str = "edgeloom.io/job-uid";
/// Annotation: when the operator created the task, by its own clock (RFC 3339). Set at
/// creation by the operator (agents write only a task's status): the start of the window
/// a result's usage is paid for.
pub const DISPATCHED_AT_ANNOTATION: &str = "edgeloom.io/dispatched-at";

/// One attempt of one shard of a ComputeJob, bound to one node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgeloom.io",
    version = "v1alpha1",
    kind = "ComputeTask",
    namespaced,
    status = "ComputeTaskStatus",
    shortname = "ct",
    shortname = "ctask",
    category = "edgeloom",
    printcolumn = r#"{"name":"Job","type":"string","jsonPath":".spec.job.name"}"#,
    printcolumn = r#"{"name":"Shard","type":"integer","jsonPath":".spec.shard"}"#,
    printcolumn = r#"{"name":"Attempt","type":"integer","jsonPath":".spec.attempt"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    selectable = ".spec.nodeName"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("ComputeTask spec is immutable; the operator creates a new attempt instead"))]
#[x_kube(validation = Rule::new("self.shard < self.shards").message("shard must be less than shards").field_path(".shard"))]
pub struct ComputeTaskSpec {
    /// The job this task belongs to (in the hub cluster).
    pub job: JobReference,
    /// The EdgePool and member cluster the task was placed through.
    pub pool: String,
    /// Member cluster name within the pool.
    pub cluster: String,
    /// Shard index, from 0.
    #[schemars(range(max = 9_999))]
    pub shard: u32,
    /// Total shards of the job.
    #[schemars(range(min = 1, max = 10_000))]
    pub shards: u32,
    /// Replica index for verification, from 0.
    #[serde(default)]
    #[schemars(range(max = 8))]
    pub replica: u32,
    /// Attempt number, from 1: the fencing token. Results of older attempts are never paid.
    #[schemars(range(min = 1, max = 1_000))]
    pub attempt: u32,
    /// The node that must run it.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// What to run.
    pub workload: Workload,
    /// Limits the agent enforces.
    #[serde(default)]
    pub limits: TaskLimits,
    /// Where the agent may download the model from: the pool's policy, copied by the
    /// operator (the job's owner cannot widen it).
    #[serde(
        default,
        skip_serializing_if = "crate::edge_pool::ModelDownloads::is_default"
    )]
    pub model_downloads: crate::edge_pool::ModelDownloads,
    /// Set on tasks of verified jobs: the agent first reports only a commitment to its
    /// result bound to this nonce (phase Committed), and reveals the result when the
    /// operator asks (see `commitment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub nonce: Option<String>,
    /// Set on tasks of Federated jobs: the task's step in its round and the presigned
    /// URLs of what it reads and writes (docs/ARCHITECTURE.md, "Federated learning in a
    /// tree").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<crate::federated::FederatedTask>,
}

/// Identifies the ComputeJob of a task.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobReference {
    /// Namespace of the job in the hub.
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the job.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// UID of the job.
    #[schemars(length(min = 1, max = 64))]
    pub uid: String,
}

/// Limits the agent enforces on the runner.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskLimits {
    /// Wall-clock seconds before the task is killed and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub timeout_seconds: Option<u32>,
    /// Memory the runner may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// CPU cores (threads) the runner may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// GPUs the runner may use.
    #[serde(default)]
    #[schemars(range(max = 16))]
    pub gpus: u32,
}

/// Observed state of a task, written by the node's agent (and by the operator when it
/// fails a task that stopped making progress). A finished phase is final: no writer can
/// turn a failed or cancelled task into a succeeded one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(oldSelf.phase) || !(oldSelf.phase in ['Succeeded', 'Failed', 'Cancelled']) || (has(self.phase) && self.phase == oldSelf.phase)").message("a finished task's phase is final").field_path(".phase"))]
pub struct ComputeTaskStatus {
    /// Pending, Running, Committed, Succeeded, Failed or Cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TaskPhase>,
    /// Percent done.
    #[serde(default)]
    #[schemars(range(max = 100))]
    pub progress: u8,
    /// When the agent claimed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// Workload metrics (accuracy, loss, samplesPerSecond, tflops, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 63)").message("metric names are at most 63 characters"))]
    pub metrics: BTreeMap<String, f64>,
    /// Resources used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// With a nonce in the spec: sha256 commitment to the result, written before the
    /// result itself (phase Committed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub commitment: Option<String>,
    /// With a nonce in the spec: the reveal (result, metrics, salt) sealed for the operator
    /// alone (hex of a sealed box to its key), so other agents cannot copy it. At most
    /// 300,000 characters: an honest reveal (a 64-character digest, at most 4,096 vector
    /// elements, 64 metrics and 64 summary values, its salt) is about 130 kB of JSON, twice
    /// that in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 300_000))]
    pub sealed_reveal: Option<String>,
    /// With a nonce in the spec: the agent's secret salt of the commitment, revealed with
    /// the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub salt: Option<String>,
    /// sha256 (hex) of the canonical result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub result_digest: Option<String>,
    /// The result vector, for tolerance-based verification of floating-point results.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub result_vector: Vec<f64>,
    /// Human-readable result values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) <= 63 && size(self[k]) <= 256)").message("summary names are at most 63 characters and values at most 256"))]
    pub result_summary: BTreeMap<String, String>,
    /// Why it failed, or what it is doing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub message: Option<String>,
}

/// Most wall-clock milliseconds a usage report may claim: one year, the longest timeout.
pub const MAX_WALL_MILLIS: u64 = 31_536_000_000;
/// Most CPU core-milliseconds: 1,024 cores for a year.
pub const MAX_CPU_CORE_MILLIS: u64 = 1_024 * MAX_WALL_MILLIS;
/// Most GPU-milliseconds: 16 GPUs (the most a task may ask for) for a year.
pub const MAX_GPU_MILLIS: u64 = 16 * MAX_WALL_MILLIS;

/// Resources a task used, in integer units so that rewards are computed exactly. A claim
/// of the agent's: the operator pays at most what it observed itself (see `rewards`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// CPU time, in core-milliseconds.
    #[serde(default)]
    #[schemars(range(max = 32_292_864_000_000u64))]
    pub cpu_core_millis: u64,
    /// GPU busy time, in GPU-milliseconds.
    #[serde(default)]
    #[schemars(range(max = 504_576_000_000u64))]
    pub gpu_millis: u64,
    /// Energy in millijoules, where NVML reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1_000_000_000_000_000_000u64))]
    pub energy_millijoules: Option<u64>,
    /// Wall-clock milliseconds.
    #[serde(default)]
    #[schemars(range(max = 31_536_000_000u64))]
    pub wall_millis: u64,
}
