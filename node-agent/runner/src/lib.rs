//! edgeloom-runner: one task's libtorch workload (DESIGN.md §5). The agent spawns it per
//! task; it is the only edgeloom binary that links libtorch.

pub mod data;
pub mod model;
pub mod protocol;
pub mod workloads;
