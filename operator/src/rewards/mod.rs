//! Rewards in one place (docs/ARCHITECTURE.md, "Rewards"): what an accepted result earns
//! and how it is paid exactly once.
//!
//! - [`ledger`]: receipts and forfeits, the reward formula, the hash chain (pure).
//! - [`merkle`]: the ledger as an RFC 6962 Merkle log with signed checkpoints (pure).
//! - [`backend`]: which object store holds the ledgers (a Secret in the hub).
//! - [`objects`]: where the ledger lives: immutable objects in an S3-compatible store,
//!   snapshots, escrow and forfeits, the checkpoint anchor.
//! - [`store`]: admission (budget cap, refusals), totals, and the trust records in the hub.
//! - [`trust`]: adaptive trust, spot checks, verified speed (pure).
//! - [`settle`]: paying a job's accepted results and recording who was caught.

pub mod backend;
pub mod ledger;
pub mod merkle;
pub mod objects;
pub mod settle;
pub mod store;
pub mod trust;
