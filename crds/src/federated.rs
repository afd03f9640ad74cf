//! Federated rounds in the API (docs/ARCHITECTURE.md, "Federated learning in a tree"):
//! what a Federated job's task is asked to do ([`FederatedTask`], in the ComputeTask spec,
//! written by the operator) and where the job's rounds stand ([`FederatedStatus`], in the
//! ComputeJob status, written by the operator).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a Federated task does.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum FederatedStepKind {
    /// Build the job's initial model from its seed.
    Init,
    /// Train the round's model on the node's own data.
    Train,
    /// Aggregate a member cluster's updates of the round.
    Aggregate,
    /// Evaluate the final model on the node's own held-out data.
    Evaluate,
}

/// An object of the store the task reads: a presigned GET URL and the sha256 the bytes
/// must have (the agent refuses other bytes).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelObject {
    /// Presigned GET URL.
    #[schemars(length(max = 4096))]
    pub url: String,
    /// sha256 (hex) of the object.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// Aggregate: the update's weight under Mean (its examples, as bounded by the operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
}

/// The URLs of a Federated task. Presigned: whoever holds them may read or write these
/// objects until they expire, and nothing else.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedUrls {
    /// The model the step starts from (Train, Aggregate, Evaluate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelObject>,
    /// Presigned PUT URL for what the step writes (Init, Train, Aggregate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub output: Option<String>,
    /// Aggregate: the updates, in the order of the result's verdicts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub updates: Vec<ModelObject>,
}

/// A Federated task's step in its round, set by the operator on tasks of Federated jobs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedTask {
    /// The round, from 1 (0 for Init).
    #[schemars(range(max = 1000))]
    pub round: u32,
    /// Init, Train, Aggregate or Evaluate.
    pub step: FederatedStepKind,
    /// The URLs in the clear (none when sealed).
    #[serde(default)]
    pub urls: FederatedUrls,
    /// The URLs as JSON, sealed to the node's X25519 key (its `edgeloom.io/box-key`
    /// annotation, hex): every agent of the cluster can read the task, only its node can
    /// open these. At most 2,000,000 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2_000_000))]
    pub sealed_urls: Option<String>,
    /// When the URLs expire (the operator's clock); a task not finished by then fails.
    pub expires_at: Time,
}

/// Where a Federated job's current round stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RoundStage {
    /// The initial model is being built.
    Init,
    /// Participants train on their own data.
    Training,
    /// Member clusters aggregate their nodes' updates (Tree), or the hub aggregates them (Flat).
    Aggregating,
    /// The round's verdicts and models are recorded; its accepted updates are being paid.
    Settling,
    /// The last round's model is evaluated on the participants' held-out data.
    Evaluating,
    /// Every round is complete.
    Done,
}

/// A participant's state in the current round.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum ParticipantState {
    /// Its task runs.
    Running,
    /// Its update arrived before the round closed.
    Reported,
    /// Its update was aggregated.
    Accepted,
    /// Its update was rejected by the aggregation (outlier, broken file).
    Rejected,
    /// Its task failed or vanished, or its node was lost.
    Lost,
    /// The round closed without its update.
    Late,
}

/// One participant of the current round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    /// Its index in the round (the task's shard).
    pub index: u32,
    /// "pool/cluster" of its member.
    pub member: String,
    /// Node.
    pub node: String,
    /// State.
    pub state: ParticipantState,
    /// The examples it claims to have trained on (bounded before use as a weight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub examples: Option<u64>,
    /// sha256 of its update, as it reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The accuracy of the model it started from on its held-out rows, as it reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_accuracy: Option<f64>,
    /// Why it was rejected or lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its training loss, as it reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// CPU core-milliseconds paid for: its claim, bounded by what the operator observed.
    #[serde(default)]
    pub cpu_core_millis: u64,
    /// GPU-milliseconds paid for, bounded likewise.
    #[serde(default)]
    pub gpu_millis: u64,
    /// Attempt of its task (another node is tried for Init after a failure).
    #[serde(default = "one")]
    pub attempt: u32,
    /// Whether what it did counts against its node's trust (a rejected or missing update,
    /// a model whose bytes are not what it reported).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blamed: bool,
}

fn one() -> u32 {
    1
}

/// One member cluster's model of the current round (Tree).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberModel {
    /// "pool/cluster".
    pub member: String,
    /// The node aggregating it.
    pub node: String,
    /// Attempt of its aggregation task (another node is tried after a failure).
    pub attempt: u32,
    /// sha256 of the member's model, once aggregated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Sum of the weights of the updates it aggregated.
    #[serde(default)]
    pub weight: f64,
    /// CPU core-milliseconds paid for the aggregation (bounded like a participant's).
    #[serde(default)]
    pub cpu_core_millis: u64,
    /// Whether the member was left out of the round (its aggregation failed on every
    /// node tried, or its model could not be used).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dropped: bool,
    /// The aggregation's verdict on each of the member's updates, in participant order:
    /// 1 accepted, 0 rejected as misbehaviour, -1 not readable, -2 far smaller than the
    /// round's (neither of the last two held against the node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub verdicts: Vec<i8>,
    /// Whether its aggregator is to blame (a model not in the store or not what it
    /// reported, or one the hub's audit did not reproduce).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blamed: bool,
    /// The hub's audit of this aggregation (`auditRate`), once drawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditResult>,
    /// Bytes the audit brought up to the hub.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audit_bytes: u64,
    /// Indices of the member's participants whose update the audit found changed after
    /// they reported it (they are not paid and count against their nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub tampered: Vec<u32>,
    /// Where the member's model is when it is not its aggregator's: the hub's
    /// recomputation, after an audit that did not reproduce the aggregator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub model_key: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero32(n: &u32) -> bool {
    *n == 0
}

/// The hub's audit of one member aggregation: it recomputes the aggregation from the same
/// inputs and compares the model's digest and the verdicts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum AuditResult {
    /// Drawn for an audit, not done yet.
    Pending,
    /// Not drawn.
    Skipped,
    /// The hub's recomputation gave the same model and verdicts.
    Matched,
    /// It did not: the aggregator is caught, and the hub's model is used.
    Mismatched,
    /// The aggregator computed honestly from what it had, but left out updates it could
    /// not read that the hub could: the hub's model with them is used, nobody is blamed.
    Corrected,
    /// The inputs were no longer what their writers reported; nothing is concluded of the
    /// aggregator.
    Inconclusive,
}

/// A model kept in the store.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredModel {
    /// Round it completes (0: the initial model).
    pub round: u32,
    /// Object key (in the operator's store).
    pub key: String,
    /// sha256.
    pub sha256: String,
}

/// A completed round.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoundSummary {
    /// The round.
    pub round: u32,
    /// Participants asked.
    pub participants: u32,
    /// Updates aggregated.
    pub accepted: u32,
    /// Updates rejected by the aggregation.
    pub rejected: u32,
    /// Participants whose update did not arrive (lost, failed, late).
    pub missing: u32,
    /// Whether the hub aggregated at the end of this round.
    pub hub: bool,
    /// Closed by `Quorum` (enough updates) or `Timeout`.
    pub closed_by: String,
    /// Accuracy of this round's model on the held-out rows of the next round's
    /// participants (example-weighted; claims of theirs), once reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    /// Mean training loss the participants reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Bytes of node updates that stayed inside member clusters.
    #[serde(default)]
    pub bytes_in_members: u64,
    /// Bytes that went up to the hub (node updates in Flat, member models in Tree, and in
    /// Tree the updates of the member aggregations the hub audited).
    #[serde(default)]
    pub bytes_to_hub: u64,
    /// The part of `bytesToHub` that the hub's audits brought up (Tree).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_audited: u64,
    /// Member aggregations the hub audited.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub audited: u32,
    /// Audited aggregations the hub's recomputation did not reproduce.
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub audits_failed: u32,
    /// When it closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<Time>,
}

/// Where a Federated job's rounds stand, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FederatedStatus {
    /// The round in progress, from 1 (0 while the initial model is built).
    pub round: u32,
    /// The stage of the round in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<RoundStage>,
    /// When the stage began, by the operator's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage_started_at: Option<Time>,
    /// Rounds completed.
    #[serde(default)]
    pub completed_rounds: u32,
    /// The latest global model (the hub's), kept in the store for every completed hub round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_model: Option<StoredModel>,
    /// Tree, between hub rounds: the model each member's next round starts from, by
    /// "pool/cluster" (the latest global model where a member has none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bases: BTreeMap<String, StoredModel>,
    /// The current round's participants.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub participants: Vec<Participant>,
    /// The current round's member models (Tree).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberModel>,
    /// The newest completed rounds (at most the job's `federation.history`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub rounds: Vec<RoundSummary>,
    /// Bytes of node updates that stayed inside member clusters, all rounds.
    #[serde(default)]
    pub bytes_in_members: u64,
    /// Bytes that went up to the hub, all rounds.
    #[serde(default)]
    pub bytes_to_hub: u64,
    /// The hub's server-momentum buffer (FedAvgM), when the job uses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<StoredModel>,
    /// Accuracy of the final model on the last participants' held-out rows (their claims,
    /// example-weighted), once evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_accuracy: Option<f64>,
    /// Updates rejected and counted against their node, by "cluster/node" (at most 1,000
    /// nodes are listed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 1000))]
    pub rejected_updates: BTreeMap<String, u32>,
}
