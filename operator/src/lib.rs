//! The edgeloom operator (docs/ARCHITECTURE.md).

pub mod cache;
pub mod cli;
pub mod conditions;
pub mod context;
pub mod decimal;
pub mod events;
pub mod federated;
pub mod fleet;
pub mod http;
pub mod job_controller;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod pool_controller;
pub mod quantity;
pub mod queue;
pub mod rewards;
pub mod run;
pub mod scheduler;
pub mod shard_pages;
pub mod sweeper;
pub mod verification;
