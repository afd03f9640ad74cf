//! The edgeloom operator (DESIGN.md §1, §3, §4).

pub mod lifecycle;
pub mod placement;
pub mod queue;
