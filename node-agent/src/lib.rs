//! The edgeloom node agent (docs/ARCHITECTURE.md, "The agent"): probes the node (NVML, /proc), publishes
//! its inventory, renews its heartbeat, runs its ComputeTasks with edgeloom-runner, and
//! serves metrics (GPU metrics under DCGM names).

pub mod agent;
pub mod config;
pub mod execution;
pub mod federated;
pub mod http;
pub mod metrics;
pub mod model_source;
pub mod outbox;
pub mod probe;
pub mod sealed;
pub mod serving;
