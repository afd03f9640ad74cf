//! What runs: the workload of a ComputeJob, copied into each of its ComputeTasks.

use crate::schema::{Quantity, dns_label, short_string_set};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The kind of work edgeloom-runner performs (docs/ARCHITECTURE.md, "Workloads and the runner").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum WorkloadKind {
    /// Matrix-multiply throughput on CPU or GPU.
    Benchmark,
    /// A model applied to a dataset shard; result: predictions digest and accuracy.
    Inference,
    /// Data-parallel training of a model on shards.
    Train,
    /// Rounds of local training on node-local data, aggregated along a tree.
    Federated,
}

/// A workload: kind, model, dataset and parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind == 'Benchmark' || has(self.model)").message("a model is required for Inference, Train and Federated workloads").field_path(".model"))]
#[x_kube(validation = Rule::new("self.kind == 'Benchmark' || has(self.dataset)").message("a dataset is required for Inference, Train and Federated workloads").field_path(".dataset"))]
#[x_kube(validation = Rule::new("self.kind != 'Federated' || !has(self.dataset) || !has(self.dataset.builtin)").message("a Federated workload trains on node-local or synthetic data, never a shipped dataset").field_path(".dataset"))]
#[x_kube(validation = Rule::new("self.kind != 'Federated' || !has(self.dataset) || !has(self.dataset.nodeLocal) || (has(self.parameters) && has(self.parameters.classes))").message("a Federated workload on node-local data must set parameters.classes: each node sees only its own labels").field_path(".parameters.classes"))]
#[x_kube(validation = Rule::new("!has(self.federation) || self.kind == 'Federated'").message("federation is only for Federated workloads").field_path(".federation"))]
#[x_kube(validation = Rule::new("!has(self.federation) || !has(self.federation.hubEvery) || !has(self.parameters) || !has(self.parameters.rounds) || self.federation.hubEvery <= self.parameters.rounds").message("hubEvery must not exceed parameters.rounds: the hub aggregates at least once").field_path(".federation.hubEvery"))]
pub struct Workload {
    /// Benchmark, Inference, Train or Federated.
    pub kind: WorkloadKind,
    /// Where the model comes from; exactly one source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSource>,
    /// Where the data comes from; exactly one source. Data never leaves the node that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetSource>,
    /// Hyper-parameters; every field has a default.
    #[serde(default)]
    pub parameters: WorkloadParameters,
    /// How a Federated workload's rounds are aggregated; every field has a default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<Federation>,
}

/// Where node updates are aggregated.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum Topology {
    /// Node updates are aggregated inside their member cluster; only member models go up
    /// to the hub, every `hubEvery` rounds.
    #[default]
    Tree,
    /// Every node's update goes to the hub (plain FedAvg).
    Flat,
}

/// How a round's updates are combined, coordinate by coordinate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum AggregationRule {
    /// The mean weighted by each update's example count (FedAvg).
    #[default]
    Mean,
    /// The mean after dropping `trimFraction` of the values at each end; robust to a
    /// minority of poisoned updates.
    TrimmedMean,
    /// The median; robust to just under half of the updates poisoned.
    Median,
}

/// The federated learning settings of a Federated workload (docs/ARCHITECTURE.md,
/// "Federated learning in a tree"). Rounds and local epochs are in `parameters`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.hubEvery) || self.hubEvery == 1 || !has(self.topology) || self.topology == 'Tree'").message("hubEvery above 1 needs topology Tree: in Flat every round ends at the hub").field_path(".hubEvery"))]
pub struct Federation {
    /// Tree (default) or Flat.
    #[serde(default)]
    pub topology: Topology,
    /// With Tree: the hub aggregates the member models every `hubEvery` rounds; in between
    /// each member continues from its own model. 1 (default) is two-level FedAvg.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub hub_every: u32,
    /// Updates a round needs before it closes: a count (3) or a percentage of the round's
    /// participants ("80%"). Default "100%": a round waits for everyone until its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("type(self) == int ? self >= 1 : self.matches('^([1-9][0-9]?|100)%$')").message("must be a count of at least 1 or a percentage from 1% to 100%"))]
    pub min_participants: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// Seconds after a round starts at which it closes with the updates it has (those of
    /// stragglers are ignored from then on).
    #[serde(default = "default_round_timeout")]
    #[schemars(range(min = 10, max = 86_400))]
    pub round_timeout_seconds: u32,
    /// Mean (default), TrimmedMean or Median.
    #[serde(default)]
    pub aggregation: AggregationRule,
    /// With TrimmedMean: the fraction of values dropped at each end, at least 0 and below 0.5.
    #[serde(default = "default_trim")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 0.5").message("must be at least 0 and less than 0.5"))]
    pub trim_fraction: f64,
    /// Under TrimmedMean and Median: an update whose norm is more than this many times the
    /// round's median norm (or less than the median divided by it), or whose distance to
    /// the robust aggregate is more than this many times the median distance, is rejected
    /// and counted against its node. Greater than 1; default 3.
    #[serde(default = "default_outlier_cutoff")]
    #[x_kube(validation = Rule::new("self > 1.0 && self <= 1000.0").message("must be greater than 1 and at most 1000"))]
    pub outlier_cutoff: f64,
    /// The hub's server learning rate (FedAvgM); 1 (default) takes the aggregate as it is.
    #[serde(default = "default_server_lr")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0").message("must be greater than 0 and at most 10"))]
    pub server_learning_rate: f64,
    /// The hub's server momentum (FedAvgM), at least 0 and below 1; default 0.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0.0 && self < 1.0").message("must be at least 0 and less than 1"))]
    pub server_momentum: f64,
    /// With Tree: the share of member aggregations the hub checks by recomputing them from
    /// the member's updates (the aggregation is deterministic, so the check is exact), on
    /// top of every aggregation that rejects an update, which is always checked. An
    /// aggregator caught is not paid and counts against its node; the hub's recomputation
    /// replaces its model. Each check brings that member's updates up to the hub. From 0
    /// to 1 (every one); default 0.1. Ignored under Flat, where the hub aggregates.
    #[serde(default = "default_audit_rate")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("must be from 0 to 1"))]
    pub audit_rate: f64,
    /// Completed rounds kept in the job's status (the newest).
    #[serde(default = "default_history")]
    #[schemars(range(min = 1, max = 100))]
    pub history: u32,
}

impl Default for Federation {
    fn default() -> Self {
        Federation {
            topology: Topology::Tree,
            hub_every: 1,
            min_participants: None,
            round_timeout_seconds: default_round_timeout(),
            aggregation: AggregationRule::Mean,
            trim_fraction: default_trim(),
            outlier_cutoff: default_outlier_cutoff(),
            server_learning_rate: default_server_lr(),
            server_momentum: 0.0,
            audit_rate: default_audit_rate(),
            history: default_history(),
        }
    }
}

impl Federation {
    /// Updates needed to close a round of `participants`: the count, or the percentage
    /// rounded up, at least 1 and at most `participants`.
    pub fn min_participants_of(&self, participants: u32) -> u32 {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let want = match &self.min_participants {
            None => participants,
            Some(IntOrString::Int(n)) => (*n).max(1) as u32,
            Some(IntOrString::String(s)) => {
                let pct: u64 = s.trim_end_matches('%').parse().unwrap_or(100);
                (participants as u64 * pct).div_ceil(100) as u32
            }
        };
        want.clamp(1, participants.max(1))
    }
}

fn one() -> u32 {
    1
}
fn default_round_timeout() -> u32 {
    300
}
fn default_trim() -> f64 {
    0.2
}
fn default_outlier_cutoff() -> f64 {
    3.0
}
fn default_server_lr() -> f64 {
    1.0
}
fn default_audit_rate() -> f64 {
    0.1
}
fn default_history() -> u32 {
    20
}

/// A model source: exactly one of `builtin`, `configMap` or `url`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.builtin) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.url) ? 1 : 0) == 1").message("exactly one of builtin, configMap or url must be set"))]
#[x_kube(validation = Rule::new("!has(self.url) || has(self.sha256)").message("a model fetched from a URL needs its sha256: agents run only bytes they can check").field_path(".sha256"))]
pub struct ModelSource {
    /// A model built into edgeloom-runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinModel>,
    /// A TorchScript model stored under a key of a ConfigMap (binaryData) in the job's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKey>,
    /// A TorchScript model fetched over HTTP(S) by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''").message("must be an absolute http:// or https:// URL"))]
    #[schemars(length(max = 2048))]
    pub url: Option<String>,
    /// sha256 (hex) the model must match; required with `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: Option<String>,
}

/// The models built into edgeloom-runner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BuiltinModel {
    /// Logistic regression.
    Linear,
    /// A multi-layer perceptron.
    Mlp,
    /// A small convolutional network.
    Cnn,
}

/// A key of a ConfigMap.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKey {
    /// ConfigMap name, in the job's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the ConfigMap.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A dataset source: exactly one of `builtin`, `nodeLocal` or `synthetic`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.builtin) ? 1 : 0) + (has(self.nodeLocal) ? 1 : 0) + (has(self.synthetic) ? 1 : 0) == 1").message("exactly one of builtin, nodeLocal or synthetic must be set"))]
pub struct DatasetSource {
    /// A small real dataset shipped with edgeloom-runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<BuiltinDataset>,
    /// The name of a dataset declared in the agents' configuration; only nodes holding it
    /// are candidates, and the data never leaves them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "dns_label")]
    pub node_local: Option<String>,
    /// Generated data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticDataset>,
}

/// Datasets shipped with edgeloom-runner.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum BuiltinDataset {
    /// The UCI 8x8 handwritten digits (1,797 images, 10 classes).
    Digits,
}

/// A synthetic classification dataset (Gaussian blobs), reproducible from its seed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticDataset {
    /// Number of samples.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub samples: u32,
    /// Number of features per sample.
    #[serde(default = "default_features")]
    #[schemars(range(min = 1, max = 65_536))]
    pub features: u32,
    /// Number of classes.
    #[serde(default = "default_classes")]
    #[schemars(range(min = 2, max = 1_000))]
    pub classes: u32,
    /// Seed of the generator.
    #[serde(default)]
    pub seed: u64,
}

fn default_features() -> u32 {
    64
}
fn default_classes() -> u32 {
    10
}

/// Optimisers for Train and Federated workloads.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
pub enum Optimizer {
    /// Stochastic gradient descent with momentum.
    #[default]
    Sgd,
    /// Adam.
    Adam,
}

/// Hyper-parameters of a workload. Each has a default, so `parameters: {}` is valid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadParameters {
    /// Passes over the shard's data (Train).
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 10_000))]
    pub epochs: u32,
    /// Samples per step.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 65_536))]
    pub batch_size: u32,
    /// Learning rate, greater than 0 and at most 10.
    #[serde(default = "default_learning_rate")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 10.0").message("must be greater than 0 and at most 10"))]
    pub learning_rate: f64,
    /// Optimiser (Sgd or Adam).
    #[serde(default)]
    pub optimizer: Optimizer,
    /// Federated rounds.
    #[serde(default = "default_rounds")]
    #[schemars(range(min = 1, max = 1_000))]
    pub rounds: u32,
    /// Local epochs per federated round.
    #[serde(default = "default_local_epochs")]
    #[schemars(range(min = 1, max = 100))]
    pub local_epochs: u32,
    /// Classes the model predicts; default the highest label in the data plus one. A
    /// Federated job over node-local data must set it: each node sees only its own labels,
    /// and every node's model must have the same shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 100_000))]
    pub classes: Option<u32>,
    /// Side of the square matrices of the Benchmark workload.
    #[serde(default = "default_matrix_size")]
    #[schemars(range(min = 16, max = 32_768))]
    pub matrix_size: u32,
    /// Seed for weights and shuffling.
    #[serde(default)]
    pub seed: u64,
    /// Fixed seeds and deterministic algorithms, so equal inputs give equal result digests.
    #[serde(default = "default_true")]
    pub deterministic: bool,
}

impl Default for WorkloadParameters {
    fn default() -> Self {
        WorkloadParameters {
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            learning_rate: default_learning_rate(),
            optimizer: Optimizer::default(),
            rounds: default_rounds(),
            local_epochs: default_local_epochs(),
            classes: None,
            matrix_size: default_matrix_size(),
            seed: 0,
            deterministic: true,
        }
    }
}

fn default_epochs() -> u32 {
    10
}
fn default_batch_size() -> u32 {
    64
}
fn default_learning_rate() -> f64 {
    0.05
}
fn default_rounds() -> u32 {
    5
}
fn default_local_epochs() -> u32 {
    1
}
fn default_matrix_size() -> u32 {
    512
}
fn default_true() -> bool {
    true
}

/// What one shard needs from a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.gpuMemory) || self.gpus > 0").message("gpuMemory requires gpus of at least 1").field_path(".gpuMemory"))]
#[x_kube(validation = Rule::new("!has(self.gpuProducts) || size(self.gpuProducts) == 0 || self.gpus > 0").message("gpuProducts requires gpus of at least 1").field_path(".gpuProducts"))]
pub struct Resources {
    /// CPU cores (a quantity: 1, 500m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory (a quantity: 512Mi, 4Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Number of GPUs.
    #[serde(default)]
    #[schemars(range(max = 16))]
    pub gpus: u32,
    /// Minimum memory of each GPU (a quantity: 16Gi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory: Option<Quantity>,
    /// Allowed GPU products as NVML names them (e.g. "NVIDIA H100 80GB HBM3"); empty = any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "short_string_set")]
    pub gpu_products: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    #[test]
    fn min_participants_is_a_count_or_a_rounded_up_percentage_within_the_round() {
        let f = |m: Option<IntOrString>| Federation {
            min_participants: m,
            ..Federation::default()
        };
        assert_eq!(f(None).min_participants_of(6), 6);
        assert_eq!(f(Some(IntOrString::Int(3))).min_participants_of(6), 3);
        assert_eq!(f(Some(IntOrString::Int(9))).min_participants_of(6), 6);
        assert_eq!(
            f(Some(IntOrString::String("80%".into()))).min_participants_of(6),
            5
        );
        assert_eq!(
            f(Some(IntOrString::String("1%".into()))).min_participants_of(6),
            1
        );
        assert_eq!(
            f(Some(IntOrString::String("100%".into()))).min_participants_of(0),
            1
        );
    }
}
