//! The runner protocol (docs/ARCHITECTURE.md, "Workloads and the runner"), shared by edgeloom-runner (which writes it) and the
//! agent (which reads it): a [`Spec`] as JSON on stdin; [`Line`]s as JSON on stdout
//! (progress, then one result or one error); exit code 0 on success, 1 when the task
//! failed (bad model, bad data, out of memory), 2 when the spec itself is unusable.

use crate::workload::{AggregationRule, Workload};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the agent asks the runner to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The workload, as in the ComputeTask.
    pub workload: Workload,
    /// This task's shard.
    #[serde(default)]
    pub shard: u32,
    /// All shards of the job.
    #[serde(default = "one")]
    pub shards: u32,
    /// A local file holding the TorchScript model (the agent fetched it from the ConfigMap
    /// or URL).
    #[serde(default)]
    pub model_path: Option<String>,
    /// A local CSV for a node-local dataset (features..., label).
    #[serde(default)]
    pub data_path: Option<String>,
    /// "cpu", "cuda" or "auto" (default: CUDA when available).
    #[serde(default)]
    pub device: Option<String>,
    /// Intra-op threads (deterministic mode forces 1).
    #[serde(default)]
    pub threads: Option<u32>,
    /// Where to keep checkpoints, so a retried Train task resumes.
    #[serde(default)]
    pub checkpoint_dir: Option<String>,
    /// A Federated task's step in its round (docs/ARCHITECTURE.md, "Federated learning in
    /// a tree"). The agent moves the files to and from the object store; the runner only
    /// reads and writes local files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedStep>,
}

/// What a Federated task does in its round.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "step", rename_all = "camelCase")]
pub enum FederatedStep {
    /// Local training: start from `model` (none: the job's seeded initial weights), train
    /// `localEpochs` on this node's data and write the model to `output` (safetensors).
    /// The result's digest is the sha256 of `output`; its metrics hold `examples` (the
    /// training rows), `loss`, and `valAccuracy` / `valExamples` on the node's own
    /// held-out rows.
    #[serde(rename_all = "camelCase")]
    Train {
        /// The round, from 1 (it varies the shuffling).
        round: u32,
        /// The round's starting model.
        #[serde(default)]
        model: Option<String>,
        /// Where to write the trained model.
        output: String,
    },
    /// Aggregation of a round's updates that started from `model`, into `output`. The
    /// result's digest is the sha256 of `output`; its metrics hold `accepted`, `rejected`
    /// and `weight`, its summary `rejected` as `index:reason` lines.
    #[serde(rename_all = "camelCase")]
    Aggregate {
        /// The round's starting model.
        model: String,
        /// The updates.
        updates: Vec<UpdateFile>,
        /// Where to write the aggregate.
        output: String,
        /// The rule.
        rule: AggregationRule,
        /// TrimmedMean's fraction dropped at each end.
        #[serde(default)]
        trim: f64,
        /// Robust deviations that make an update an outlier.
        #[serde(default = "three")]
        outlier_cutoff: f64,
    },
    /// The job's initial model: the network built from the job's seed, written to `output`
    /// untrained. Deterministic, so two nodes writing it must agree on its digest.
    #[serde(rename_all = "camelCase")]
    Init {
        /// Where to write it.
        output: String,
    },
    /// Evaluation of `model` on the workload's data (the node's held-out rows, or a
    /// synthetic set): metrics `accuracy`, `loss` and `examples`.
    #[serde(rename_all = "camelCase")]
    Evaluate {
        /// The model.
        model: String,
    },
}

/// An update to aggregate: a local file and its weight (examples, bounded by the operator).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UpdateFile {
    /// Local path.
    pub path: String,
    /// Weight under Mean.
    pub weight: f64,
}

fn three() -> f64 {
    3.0
}

fn one() -> u32 {
    1
}

/// One line of output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Line {
    /// Startup facts (device, threads, libtorch's CUDA).
    Info {
        /// Device used.
        device: String,
        /// Whether libtorch sees CUDA.
        cuda: bool,
        /// Intra-op threads.
        threads: i32,
    },
    /// Progress in percent, with an optional note.
    Progress {
        /// 0-100.
        progress: u8,
        /// What it is doing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// The result.
    Result {
        /// sha256 (hex) of the canonical result.
        digest: String,
        /// Numeric metrics.
        metrics: BTreeMap<String, f64>,
        /// Human-readable values.
        summary: BTreeMap<String, String>,
        /// A short vector for tolerance-based verification.
        vector: Vec<f64>,
    },
    /// The CPU time the runner used (all its threads, user and system), sent as it
    /// ends: the agent's own sampling of a short run can miss it.
    Usage {
        /// CPU milliseconds.
        #[serde(rename = "cpuMillis")]
        cpu_millis: u64,
    },
    /// Why the task failed.
    Error {
        /// The reason.
        message: String,
    },
}
