//! The edgeloom operator (DESIGN.md §1, §3, §4).

pub mod fleet;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod quantity;
pub mod queue;
pub mod scheduler;
