//! The 1,000-job chaos run (issue #12; see `edgeloom_e2e::chaos`): real kube-apiservers,
//! the release operator in two replicas racing for the lease, simulated agents for volume
//! and real ones running tiny libtorch tasks; 30% of the agents killed and restarted, one
//! member's API server down for 60 s, the leader killed with SIGKILL five times. Prints
//! one summary line; exits 1 if a goal is missed.
//!
//! ```sh
//! LIBTORCH=$(scripts/install-torch.sh | tail -1) cargo build --release --workspace --bins
//! cargo build --release -p edgeloom-bench && target/release/chaos
//! ```

use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
struct Cli {
    /// ComputeJobs.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Simulated agent nodes per member cluster (3 members).
    #[arg(long, default_value_t = 20)]
    nodes: u32,
    /// Real agents (in the first member).
    #[arg(long, default_value_t = 2)]
    real_agents: usize,
    /// Seconds one member's API server is down.
    #[arg(long, default_value_t = 60)]
    member_down: u64,
    /// Seed of the job mix and the faults.
    #[arg(long, default_value_t = 12)]
    seed: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let cfg = edgeloom_e2e::chaos::Config {
        jobs: cli.jobs,
        members: 3,
        sim_nodes: cli.nodes,
        real_agents: cli.real_agents,
        work: Duration::from_secs(1),
        agent_kill_share: 0.3,
        member_down: Duration::from_secs(cli.member_down),
        member_down_at: Duration::from_secs(30),
        operator_kills: 5,
        operator_kill_every: Duration::from_secs(30),
        faults_until: Duration::from_secs(150),
        heartbeat_timeout: 10,
        seed: cli.seed,
        timeout: Duration::from_secs(1800),
        operator_bin: dir.join("edgeloom-operator"),
        agent_bin: dir.join("edgeloom-agent"),
        runner_bin: dir.join("edgeloom-runner"),
        plugin_bin: dir.join("kubectl-edgeloom"),
    };
    let summary = edgeloom_e2e::chaos::run(&cfg).await?;
    for p in &summary.problems {
        eprintln!("[chaos] problem: {p}");
    }
    println!("{summary}");
    if !summary.ok() {
        std::process::exit(1);
    }
    Ok(())
}
