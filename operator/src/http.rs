//! `/metrics`, `/healthz` and `/readyz`.

use crate::metrics::Metrics;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared with the handlers.
#[derive(Clone)]
pub struct Health {
    /// Metrics to render.
    pub metrics: Metrics,
    /// Set once the process can do its job (leading or ready to take over).
    pub ready: Arc<AtomicBool>,
}

/// Serves until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, health: Health) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(h): State<Health>| async move { h.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if h.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(health);
    axum::serve(listener, app).await
}
