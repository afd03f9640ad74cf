//! Rewards in one place (docs/ARCHITECTURE.md, "Rewards"): what an accepted result earns
//! and how it is paid exactly once.
//!
//! - [`ledger`]: receipts and forfeits, the reward formula, the hash chain (pure).
//! - [`merkle`]: the ledger as an RFC 6962 Merkle log with signed checkpoints (pure).
//! - [`store`]: the ledger and the trust records in the hub: admission (budget cap,
//!   refusals), escrow and forfeits, the checkpoint anchor.
//! - [`trust`]: adaptive trust, spot checks, verified speed (pure).
//! - [`settle`]: paying a job's accepted results and recording who was caught.

pub mod ledger;
pub mod merkle;
pub mod settle;
pub mod store;
pub mod trust;
