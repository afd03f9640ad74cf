//! edgeloom-gateway: parses flags, loads the configuration and serves.

use anyhow::{Context, Result};
use clap::Parser;
use edgeloom_gateway::metrics::Metrics;
use edgeloom_gateway::{Gateway, GatewayConfig};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "edgeloom-gateway",
    version,
    about = "Serves edgeloom inference endpoints (KServe v2 REST) from replicas that dial out from edge nodes"
)]
struct Flags {
    /// Gateway configuration (YAML: verifyingKey, endpoints).
    #[arg(long)]
    config: PathBuf,
    /// Address to serve on (inference, /v2/connect, /metrics). Port 0 picks a free port;
    /// the chosen address is printed as `listening on <addr>`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if flags.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let text = std::fs::read_to_string(&flags.config)
        .with_context(|| format!("reading {}", flags.config.display()))?;
    let config = GatewayConfig::from_yaml(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", flags.config.display()))?;
    let gw = Gateway::new(config, Metrics::new()?).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(flags.listen)
        .await
        .with_context(|| format!("binding {}", flags.listen))?;
    let addr = listener.local_addr()?;
    // On stdout, for the tests and scripts that start the gateway on port 0.
    println!("listening on {addr}");
    tracing::info!(%addr, endpoints = gw.config.endpoints.len(), "serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    axum::serve(listener, edgeloom_gateway::v2::router(gw))
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        })
        .await
        .context("serving")
}
