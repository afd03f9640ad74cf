//! edgeloom's local federated control plane and the helpers of its end-to-end tests
//! (docs/ARCHITECTURE.md, "The local control plane"): real etcd, kube-apiserver and kube-controller-manager processes built
//! from Go modules, on 127.0.0.1 only.

pub mod chaos;
pub mod control_plane;
pub mod digits;
pub mod federation;
pub mod helm;
pub mod jobs;
pub mod kubeconfig;
pub mod ledger;
pub mod manifests;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod s3;
pub mod scrape;
pub mod sim_agent;
pub mod tools;
pub mod torch_models;
pub mod wait;

pub use control_plane::{Cluster, Config, ControlPlane, ControlPlaneError, Role};
