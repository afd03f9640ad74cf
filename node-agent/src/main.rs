//! edgeloom-agent: parses flags and runs the agent of one node.

use anyhow::{Context, Result};
use clap::Parser;
use edgeloom_agent::agent::Agent;
use edgeloom_agent::config::Config;
use edgeloom_agent::metrics::Metrics;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "edgeloom-agent",
    version,
    about = "Runs edgeloom ComputeTasks on this node"
)]
struct Flags {
    /// Kubeconfig of this node's cluster (default: in-cluster, or $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Agent configuration (YAML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node name (overrides the config; default $NODE_NAME).
    #[arg(long)]
    node: Option<String>,
    /// Path of edgeloom-runner (overrides the config).
    #[arg(long)]
    runner: Option<PathBuf>,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, default_value = "127.0.0.1:9400")]
    metrics_addr: SocketAddr,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    if flags.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let mut config = match &flags.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(node) = flags.node {
        config.node = node;
    }
    if let Some(runner) = flags.runner {
        config.runner = runner;
    }
    config.validate()?;
    let client = match &flags.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Client::try_from(
                kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?,
            )?
        }
        None => kube::Client::try_default()
            .await
            .context("no kubeconfig and not in a cluster")?,
    };
    let metrics = Metrics::new().context("registering metrics")?;
    let agent = Arc::new(Agent::new(client, config, metrics.clone()));
    let listener = tokio::net::TcpListener::bind(flags.metrics_addr)
        .await
        .with_context(|| format!("binding {}", flags.metrics_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    tokio::spawn(edgeloom_agent::http::serve(
        listener,
        metrics,
        agent.ready.clone(),
    ));
    // Registered now, so a SIGTERM during start-up is also a clean shutdown.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    agent.run(shutdown).await
}
