//! `/metrics`, `/healthz` and `/readyz` of the agent.

use crate::metrics::Metrics;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Serves until the process ends; ready once the inventory is published.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((m, _)): State<(Metrics, Arc<AtomicBool>)>| async move { m.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(
                |State((_, r)): State<(Metrics, Arc<AtomicBool>)>| async move {
                    if r.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ok")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                },
            ),
        )
        .with_state((metrics, ready));
    axum::serve(listener, app).await
}
