//! What every controller shares.

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::scheduler::Scheduler;
use edgeloom_crds::EdgePool;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use std::sync::Arc;

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
}
