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
    #[command(subcommand)]
    command: Option<Command>,
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

#[derive(clap::Subcommand)]
enum Command {
    /// Serves one replica of an inference endpoint: runs `edgeloom-runner serve` and dials
    /// out to the gateway (no listening socket on this node).
    Serve {
        /// The gateway's connect URL, e.g. ws://gateway.example:8080/v2/connect.
        #[arg(long)]
        gateway: String,
        /// File holding the replica credential the operator issued.
        #[arg(long)]
        credential_file: PathBuf,
        /// The TorchScript model file.
        #[arg(long)]
        model: PathBuf,
        /// Shape of one input row, comma-separated (e.g. 64 or 3,224,224).
        #[arg(long, value_delimiter = ',')]
        input_shape: Vec<u32>,
        /// Most rows in one forward pass.
        #[arg(long, default_value_t = 32)]
        max_batch: u32,
        /// Longest a request waits for a batch to fill, in microseconds.
        #[arg(long, default_value_t = 1000)]
        max_delay_micros: u64,
        /// libtorch threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: u32,
        /// cpu or cuda (default: CUDA when present).
        #[arg(long)]
        device: Option<String>,
        /// fp32, fp16 or bf16 (fp16/bf16 only on CUDA).
        #[arg(long)]
        precision: Option<String>,
        /// Seconds a drain waits for requests in flight.
        #[arg(long, default_value_t = 30)]
        drain_grace_secs: u64,
    },
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
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    if let Some(Command::Serve {
        gateway,
        credential_file,
        model,
        input_shape,
        max_batch,
        max_delay_micros,
        threads,
        device,
        precision,
        drain_grace_secs,
    }) = flags.command
    {
        let credential = std::fs::read_to_string(&credential_file)
            .with_context(|| format!("reading {}", credential_file.display()))?;
        let runner = flags.runner.unwrap_or_else(|| Config::default().runner);
        let opts = edgeloom_agent::serving::ServeOptions {
            gateway,
            credential: credential.trim().to_string(),
            runner,
            config: edgeloom_crds::serving::ServeConfig {
                model: model.display().to_string(),
                input_shape,
                max_batch,
                max_delay_micros,
                threads,
                device,
                precision,
            },
            drain_grace: std::time::Duration::from_secs(drain_grace_secs),
        };
        edgeloom_agent::serving::run(opts, async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        })
        .await;
        return Ok(());
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
    // `term` was registered at the start, so a SIGTERM during start-up is also a clean
    // shutdown.
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    agent.run(shutdown).await
}
