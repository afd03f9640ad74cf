//! edgeloom-gateway: one HTTP endpoint in front of model replicas that run on edge nodes
//! behind NAT (docs/ARCHITECTURE.md, "Serving").
//!
//! Clients speak the KServe Open Inference Protocol (v2 REST) or a plain JSON form. Edge
//! agents never accept connections: each replica's agent dials *out* to `/v2/connect` with
//! an operator-signed credential, and requests are multiplexed down that WebSocket as
//! [`Frame`]s. The gateway keeps no state that another gateway needs: a replica connects
//! to every gateway, so gateways scale horizontally.
//!
//! Trust: everything a replica sends is a claim. Its identity, endpoint and region come
//! from the signed credential, never from what it says; its latency is what the gateway
//! measures; a reply counts only for a request this gateway sent to that very replica, and
//! only when its shape matches the request.

pub mod config;
pub mod metrics;
pub mod registry;
pub mod v2;

pub use config::{EndpointConfig, GatewayConfig, Routing};
pub use registry::Gateway;
