//! The CI-sized chaos run (the full one is `target/release/chaos`, see BENCHMARKS.md):
//! 100 jobs over 3 member clusters with the same faults as the full run, on real
//! kube-apiservers with the real operator (two replicas), simulated agents and one real
//! agent. Every job must reach a final phase, no attempt be issued twice, every accepted
//! result be paid exactly once and nothing else, the ledger verify, and no task outlive
//! its job.

use std::path::Path;
use std::time::Duration;

fn bin(name: &str) -> std::path::PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_edgeloom-operator")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

#[tokio::test]
async fn a_hundred_jobs_through_agent_member_and_operator_failures_end_clean() {
    let cfg = edgeloom_e2e::chaos::Config {
        jobs: 100,
        members: 3,
        sim_nodes: 4,
        real_agents: 1,
        work: Duration::from_secs(1),
        agent_kill_share: 0.3,
        member_down: Duration::from_secs(20),
        member_down_at: Duration::from_secs(15),
        operator_kills: 5,
        operator_kill_every: Duration::from_secs(15),
        faults_until: Duration::from_secs(60),
        heartbeat_timeout: 10,
        seed: 7,
        timeout: Duration::from_secs(600),
        operator_bin: bin("edgeloom-operator"),
        agent_bin: bin("edgeloom-agent"),
        runner_bin: bin("edgeloom-runner"),
        plugin_bin: bin("kubectl-edgeloom"),
    };
    let summary = edgeloom_e2e::chaos::run(&cfg).await.expect("the run");
    for p in &summary.problems {
        eprintln!("problem: {p}");
    }
    println!("{summary}");
    assert!(summary.ok(), "{summary}");
    assert_eq!(
        summary.faults,
        (4, 1, 1, 5),
        "every fault was injected: {summary}"
    );
    assert!(summary.succeeded >= 50, "most jobs succeed: {summary}");
}
