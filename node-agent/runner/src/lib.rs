//! edgeloom-runner: one task's libtorch workload (docs/ARCHITECTURE.md, "Workloads and the runner"). The agent spawns it per
//! task; it is the only edgeloom binary that links libtorch.

pub mod data;
pub mod model;
pub mod serve;
pub mod simulate;
/// The protocol, defined in the API crate so the agent reads what the runner writes.
pub use edgeloom_crds::runner_protocol as protocol;
pub mod workloads;
