//! EdgePool: a named set of member clusters and the pool's policy (cluster-scoped, hub).

use crate::schema::{Decimal, dns_label, label_map};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A pool of edge compute: member clusters, which of their nodes count, and the policy.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "edgeloom.io",
    version = "v1alpha1",
    kind = "EdgePool",
    status = "EdgePoolStatus",
    shortname = "epool",
    category = "edgeloom",
    printcolumn = r#"{"name":"Clusters","type":"string","jsonPath":".status.reachable"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.capacity.readyNodes"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.capacity.nodes"}"#,
    printcolumn = r#"{"name":"GPUs","type":"integer","jsonPath":".status.capacity.gpus"}"#,
    printcolumn = r#"{"name":"Receipts","type":"integer","jsonPath":".status.rewards.receipts"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.clusters.filter(c, c.local).size() <= 1").message("at most one member cluster may be local").field_path(".clusters"))]
pub struct EdgePoolSpec {
    /// The member clusters; names are unique.
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[schemars(length(min = 1, max = 256))]
    pub clusters: Vec<MemberCluster>,
    /// Which nodes of the member clusters count; default every node running an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// A node whose heartbeat Lease is older than this is NotReady; a member cluster
    /// unreachable this long has its tasks re-placed.
    #[serde(default = "default_heartbeat_timeout")]
    #[schemars(range(min = 5, max = 3600))]
    pub heartbeat_timeout_seconds: u32,
    /// A task whose progress has not risen for this long (not claimed, or claimed and
    /// silent: a hung runner or a stalling node) is failed on its node and re-placed, as a
    /// failure of that node. A job may set its own (`progressTimeoutSeconds`).
    #[serde(default = "default_progress_timeout")]
    #[schemars(range(min = 10, max = 86_400))]
    pub progress_timeout_seconds: u32,
    /// Tasks one node runs at once.
    #[serde(default = "default_max_tasks_per_node")]
    #[schemars(range(min = 1, max = 64))]
    pub max_tasks_per_node: u32,
    /// How contributors are paid.
    pub rewards: RewardPolicy,
    /// How results are verified.
    #[serde(default)]
    pub verification: VerificationPolicy,
    /// Where agents may download jobs' models from (URL models).
    #[serde(default, skip_serializing_if = "ModelDownloads::is_default")]
    pub model_downloads: ModelDownloads,
}

/// Where agents may download a job's model from: a job owner must not be able to make a
/// contributor's machine fetch from its local network (docs/ARCHITECTURE.md, "Who may
/// write what"). By default only HTTPS to public addresses; redirects only to the same
/// host; a model's sha256 is always required.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDownloads {
    /// Allow plain http:// model URLs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
    /// Networks (CIDR) agents may download from even though they are private, loopback
    /// or link-local (e.g. a model server inside the edge cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 43)))]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("each entry must be a CIDR such as 10.0.0.0/8"))]
    pub allowed_networks: Vec<String>,
}

impl ModelDownloads {
    /// Nothing beyond the defaults is allowed.
    pub fn is_default(&self) -> bool {
        self == &ModelDownloads::default()
    }
}

fn default_heartbeat_timeout() -> u32 {
    40
}
/// Ten minutes without progress: a runner reports progress at least every epoch or
/// batch of rows, far more often than that.
pub fn default_progress_timeout() -> u32 {
    600
}
fn default_max_tasks_per_node() -> u32 {
    1
}

/// One member cluster of a pool.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.local != has(self.kubeconfigSecret)").message("each member cluster needs exactly one of kubeconfigSecret or local: true").field_path(".kubeconfigSecret"))]
pub struct MemberCluster {
    /// Name of the cluster within the pool (a DNS label).
    #[schemars(schema_with = "dns_label")]
    pub name: String,
    /// The hub cluster itself is this member.
    #[serde(default)]
    pub local: bool,
    /// A Secret in the operator's namespace holding a kubeconfig for the member cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret: Option<SecretKeyRef>,
    /// Region of the cluster (e.g. eu-west).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub region: Option<String>,
    /// Zone of the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub zone: Option<String>,
    /// Labels every node of this cluster is treated as having (e.g. residency).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "label_map")]
    pub labels: BTreeMap<String, String>,
}

/// A key of a Secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret's data.
    #[serde(default = "default_kubeconfig_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_kubeconfig_key() -> String {
    "kubeconfig".into()
}

/// Reward rates, as exact decimals.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RewardPolicy {
    /// Paid per GPU-second of accepted work.
    pub per_gpu_second: Decimal,
    /// Paid per CPU-core-second of accepted work.
    pub per_cpu_core_second: Decimal,
    /// Name of the unit (e.g. credits).
    #[schemars(
        length(min = 1, max = 32),
        regex(pattern = r"^[A-Za-z][A-Za-z0-9_-]*$")
    )]
    pub unit: String,
    /// Scale usage by the node's measured speed relative to the pool median.
    #[serde(default)]
    pub normalize_by_speed: bool,
}

/// Default verification for the pool's jobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.defaultReplicas <= self.maxReplicas").message("defaultReplicas must not exceed maxReplicas").field_path(".defaultReplicas"))]
pub struct VerificationPolicy {
    /// Replicas for jobs that do not ask for verification.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 9))]
    pub default_replicas: u32,
    /// Bound on replicas when results disagree.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 9))]
    pub max_replicas: u32,
    /// Share of trusted nodes' results that are still spot-checked, an exact decimal in [0, 1].
    #[serde(default = "default_spot_check_rate")]
    #[x_kube(validation = Rule::new("double(self) <= 1.0").message("must be between 0 and 1"))]
    pub spot_check_rate: Decimal,
    /// Consecutive valid results after which a node is trusted.
    #[serde(default = "default_trust_threshold")]
    #[schemars(range(min = 1, max = 100_000))]
    pub trust_threshold: u32,
    /// Times a node may be caught with a wrong result before it gets no more work
    /// (quarantine, until its record is cleared); 0 = never.
    #[serde(default = "default_quarantine_after")]
    #[schemars(range(min = 0, max = 1000))]
    pub quarantine_after: u32,
    /// Seconds a receipt stays in escrow: a node caught cheating within this time of a
    /// receipt forfeits it (a forfeit entry in the ledger). 0 = no escrow.
    #[serde(default = "default_escrow_seconds")]
    #[schemars(range(min = 0, max = 604_800))]
    pub escrow_seconds: u32,
}

impl Default for VerificationPolicy {
    fn default() -> Self {
        VerificationPolicy {
            default_replicas: one(),
            max_replicas: default_max_replicas(),
            spot_check_rate: default_spot_check_rate(),
            trust_threshold: default_trust_threshold(),
            quarantine_after: default_quarantine_after(),
            escrow_seconds: default_escrow_seconds(),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_max_replicas() -> u32 {
    3
}
fn default_spot_check_rate() -> Decimal {
    Decimal("0.1".into())
}
fn default_quarantine_after() -> u32 {
    2
}
fn default_trust_threshold() -> u32 {
    10
}
fn default_escrow_seconds() -> u32 {
    3600
}

/// Observed state of an EdgePool, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgePoolStatus {
    /// Conditions: Ready, ClustersReachable, ClustersSynced, LedgerVerified.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Reachable member clusters out of all, e.g. "2/2".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<String>,
    /// Per member cluster.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<ClusterStatus>,
    /// Aggregate capacity of ready nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// The pool's ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<PoolRewards>,
}

/// Reachability and size of one member cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// Member cluster name.
    pub name: String,
    /// Whether its API server answered the last probe.
    pub reachable: bool,
    /// Why it is unreachable, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why it answers but cannot be watched (e.g. the CRDs or the operator's RBAC are
    /// missing there), if so: no work is placed there meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_problem: Option<String>,
    /// Nodes that count.
    #[serde(default)]
    pub nodes: u32,
    /// Nodes with a fresh heartbeat.
    #[serde(default)]
    pub ready_nodes: u32,
    /// When it last answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
}

/// What the pool's ready nodes offer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Nodes that count.
    #[serde(default)]
    pub nodes: u32,
    /// Nodes with a fresh heartbeat.
    #[serde(default)]
    pub ready_nodes: u32,
    /// GPUs on ready nodes.
    #[serde(default)]
    pub gpus: u32,
    /// GPUs by product name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub gpus_by_product: BTreeMap<String, u32>,
    /// Total GPU memory of ready nodes, in MiB.
    #[serde(default)]
    pub gpu_memory_mib: u64,
    /// CPU cores of ready nodes.
    #[serde(default)]
    pub cpu_cores: u32,
    /// Sum of measured TFLOP/s of ready nodes.
    #[serde(default)]
    pub tflops: f64,
}

/// Head and totals of the pool's hash-chained ledger.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolRewards {
    /// sha256 of the last ledger entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_head: Option<String>,
    /// Receipts in the ledger.
    #[serde(default)]
    pub receipts: u64,
    /// Total paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Decimal>,
    /// Total per contributor account.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_account: BTreeMap<String, Decimal>,
    /// The latest signed checkpoint of the ledger as a Merkle log (`kubectl edgeloom
    /// ledger checkpoint` prints it for keeping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<LedgerCheckpoint>,
    /// The latest snapshot of the operator's ledger state in the object store: a restarted
    /// operator loads it (if its SHA-256 matches) and reads only the entries after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<LedgerSnapshot>,
    /// Objects holding the ledger's entries (about one per thousand receipts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<u64>,
}

/// A snapshot of the ledger state, written by the operator to the object store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerSnapshot {
    /// Entries it covers.
    pub size: u64,
    /// SHA-256 of the snapshot object (hex).
    pub sha256: String,
}

/// A signed statement of the operator: the pool's ledger had `size` entries with RFC 6962
/// tree head `root` at `time`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LedgerCheckpoint {
    /// Entries covered.
    pub size: u64,
    /// Tree head (sha256, hex).
    pub root: String,
    /// When it was signed (RFC 3339).
    pub time: String,
    /// The operator's ed25519 public key (hex).
    pub public_key: String,
    /// ed25519 signature (hex).
    pub signature: String,
}
