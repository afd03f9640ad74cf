//! The edgeloom operator (docs/ARCHITECTURE.md).

pub mod cache;
pub mod cli;
pub mod conditions;
pub mod context;
pub mod decimal;
pub mod fleet;
pub mod http;
pub mod job_controller;
pub mod leader;
pub mod ledger;
pub mod ledger_store;
pub mod lifecycle;
pub mod merkle;
pub mod metrics;
pub mod placement;
pub mod pool_controller;
pub mod quantity;
pub mod queue;
pub mod run;
pub mod scheduler;
pub mod trust;
pub mod verification;
