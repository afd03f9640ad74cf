//! edgeloom-operator: parses flags and runs the operator (see the library).

use anyhow::Result;
use clap::Parser;
use edgeloom_operator::run::{Settings, run};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "edgeloom-operator",
    version,
    about = "Places ComputeJobs on edge clusters"
)]
struct Flags {
    /// Kubeconfig of the hub cluster (default: in-cluster config or $KUBECONFIG).
    #[arg(long, env = "EDGELOOM_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the operator: member kubeconfig Secrets and the leader Lease live here.
    #[arg(long, env = "POD_NAMESPACE", default_value = "edgeloom-system")]
    namespace: String,
    /// Identity for leader election and events (default: hostname-pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "127.0.0.1:8080")]
    metrics_addr: SocketAddr,
    /// Disable leader election (single replica only).
    #[arg(long)]
    no_leader_elect: bool,
    /// Leader lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Longest pause between scheduling cycles, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    scheduler_interval_ms: u64,
    /// The Secret (in the operator's namespace) naming the reward ledgers' object store
    /// (keys url, endpoint, region, accessKeyId, secretAccessKey, allowHttp).
    #[arg(
        long,
        env = "EDGELOOM_LEDGER_STORE_SECRET",
        default_value = "edgeloom-ledger-store"
    )]
    ledger_store_secret: String,
    /// Where the ledgers live when that Secret does not exist.
    #[arg(
        long,
        env = "EDGELOOM_LEDGER_DIR",
        default_value = "/var/lib/edgeloom/ledger"
    )]
    ledger_dir: PathBuf,
    /// Seconds between sweeps for tasks whose job no longer exists in the hub.
    #[arg(long, env = "EDGELOOM_ORPHAN_SWEEP_SECONDS", default_value_t = 30)]
    orphan_sweep_seconds: u64,
    /// Slots (shards x replicas) a job's status holds itself; a bigger job's slots are
    /// kept in pages (ConfigMaps in --namespace) and its status shows 100 not finished.
    #[arg(long, env = "EDGELOOM_STATUS_INLINE_SLOTS", default_value_t = edgeloom_operator::shard_pages::DEFAULT_INLINE_SLOTS)]
    status_inline_slots: usize,
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
    let identity = flags.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    run(Settings {
        kubeconfig: flags.kubeconfig,
        namespace: flags.namespace,
        identity,
        metrics_addr: flags.metrics_addr,
        leader_elect: !flags.no_leader_elect,
        lease_duration: Duration::from_secs(flags.lease_duration_seconds.max(2)),
        scheduler_interval: Duration::from_millis(flags.scheduler_interval_ms.max(10)),
        ledger_store_secret: flags.ledger_store_secret,
        ledger_dir: flags.ledger_dir,
        orphan_sweep: Duration::from_secs(flags.orphan_sweep_seconds.max(1)),
        inline_slots: flags
            .status_inline_slots
            .clamp(1, 2 * edgeloom_operator::shard_pages::DEFAULT_INLINE_SLOTS),
    })
    .await
}
