//! What every controller shares.

use crate::fleet::Fleet;
use crate::ledger_store::{LedgerStore, ReputationStore};
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use edgeloom_crds::EdgePool;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "edgeloom-operator";
/// Finalizer on ComputeJobs: their tasks are removed from every member first.
pub const JOB_FINALIZER: &str = "edgeloom.io/tasks";
/// Finalizer on EdgePools: their member connections are closed first.
pub const POOL_FINALIZER: &str = "edgeloom.io/members";

/// Shared state of the controllers.
pub struct Context {
    /// Client of the hub cluster.
    pub client: kube::Client,
    /// Namespace of the operator (kubeconfig Secrets, leader Lease).
    pub namespace: String,
    /// Member cluster connections.
    pub fleet: Arc<Fleet>,
    /// The scheduling cycle's shared state.
    pub scheduler: Arc<Scheduler>,
    /// Metrics.
    pub metrics: Metrics,
    /// Kubernetes Events.
    pub recorder: Recorder,
    /// The hub's EdgePools.
    pub pools: Store<EdgePool>,
    /// This replica's identity.
    pub identity: String,
    /// The pools' ledgers and reputation records.
    pub books: Books,
}

/// The ledger and reputation store of every pool, made on first use.
pub struct Books {
    client: kube::Client,
    namespace: String,
    ledgers: Mutex<HashMap<String, Arc<LedgerStore>>>,
    reputations: Mutex<HashMap<String, Arc<ReputationStore>>>,
}

impl Books {
    /// Stores in `namespace` of the hub.
    pub fn new(client: kube::Client, namespace: &str) -> Books {
        Books {
            client,
            namespace: namespace.to_string(),
            ledgers: Mutex::default(),
            reputations: Mutex::default(),
        }
    }

    /// The ledger of `pool`.
    pub fn ledger(&self, pool: &str) -> Arc<LedgerStore> {
        let mut m = self.ledgers.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(pool.to_string())
            .or_insert_with(|| {
                Arc::new(LedgerStore::new(self.client.clone(), &self.namespace, pool))
            })
            .clone()
    }

    /// The reputation records of `pool`.
    pub fn reputation(&self, pool: &str) -> Arc<ReputationStore> {
        let mut m = self.reputations.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(pool.to_string())
            .or_insert_with(|| {
                Arc::new(ReputationStore::new(
                    self.client.clone(),
                    &self.namespace,
                    pool,
                ))
            })
            .clone()
    }
}

/// Test-only crash injection: when `EDGELOOM_FAILPOINT` names this point the process
/// aborts on the spot, as if killed with SIGKILL (no destructors, no flushing). Used by
/// the e2e tests to stop the operator exactly between a durable write and the next one.
pub fn failpoint(name: &str) {
    if std::env::var("EDGELOOM_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
