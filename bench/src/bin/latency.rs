//! Latencies of the operator against real kube-apiservers (release build):
//!
//! - `dispatch`: from a 10-shard ComputeJob applied to the hub until all 10 of its tasks
//!   run on real edgeloom-agents (10 nodes in 2 member clusters, one task slot each), on
//!   an idle fleet and while 1,000 other jobs wait unplaceable in the queue.
//! - `member-lag`: how long a task's new status in a healthy member takes to show in its
//!   job's status in the hub, with every member up and while another member's API server
//!   is down (simulated agents; each task runs 1 s).
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo build --release -p edgeloom-bench
//! target/release/latency dispatch
//! target/release/latency member-lag
//! ```

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_bench::percentile;
use edgeloom_crds::compute_task::ComputeTask;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::{ComputeJob, JobPhase, TaskPhase};
use edgeloom_e2e::federation::Federation;
use edgeloom_e2e::manifests;
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Job applied -> all tasks Running on real agents, idle and with a queue.
    Dispatch {
        /// Probe jobs per phase.
        #[arg(long, default_value_t = 20)]
        jobs: usize,
        /// Unplaceable jobs queued in the second phase.
        #[arg(long, default_value_t = 1000)]
        queued: u32,
    },
    /// Task status in a healthy member -> job status in the hub, with another member down.
    MemberLag {
        /// Jobs per phase.
        #[arg(long, default_value_t = 20)]
        jobs: usize,
    },
}

/// When each task (by member/name) was first seen in `phases`, from a watch per member.
type Seen = Arc<Mutex<HashMap<String, (Instant, String)>>>;

fn watch_tasks(fed: &Federation, phases: &'static [TaskPhase]) -> Result<Seen> {
    let seen: Seen = Arc::default();
    for m in fed.plane.members() {
        let kubeconfig = m.kubeconfig.clone();
        let name = m.name.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            let Ok(text) = std::fs::read_to_string(&kubeconfig) else {
                return;
            };
            let Ok(client) = edgeloom_operator::fleet::client_from_kubeconfig(&text).await else {
                return;
            };
            let api: Api<ComputeTask> = Api::namespaced(client, SYSTEM_NAMESPACE);
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            while let Some(Ok(t)) = stream.next().await {
                let phase = t.status.as_ref().and_then(|s| s.phase);
                if phase.is_some_and(|p| phases.contains(&p))
                    && let Ok(mut s) = seen.lock()
                {
                    let key = format!("{name}/{}", t.metadata.name.clone().unwrap_or_default());
                    s.entry(key)
                        .or_insert((Instant::now(), t.spec.job.uid.clone()));
                }
            }
        });
    }
    Ok(seen)
}

async fn job_uid(fed: &Federation, ns: &str, name: &str) -> Result<String> {
    Ok(Api::<ComputeJob>::namespaced(fed.hub.clone(), ns)
        .get(name)
        .await?
        .metadata
        .uid
        .unwrap_or_default())
}

async fn wait_job(fed: &Federation, ns: &str, name: &str, phase: JobPhase) -> Result<()> {
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), ns);
    let t = Instant::now();
    loop {
        if api.get(name).await?.status.and_then(|s| s.phase) == Some(phase) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("job {name} not {phase:?} after 180s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn row(what: &str, samples: &mut [f64]) -> String {
    format!(
        "| {what} | {} | {:.0} | {:.0} | {:.0} | {:.0} |",
        samples.len(),
        percentile(samples, 50.0),
        percentile(samples, 99.0),
        samples.iter().copied().fold(f64::INFINITY, f64::min),
        samples.iter().copied().fold(0.0, f64::max)
    )
}

async fn dispatch(jobs: usize, queued: u32) -> Result<()> {
    let fed = Federation::start_bare(&["edge-a", "edge-b"], 5).await?;
    fed.apply_pool("edge", 20, 1).await?;
    let _agents = fed.start_agents(
        &edgeloom_bench::sibling("edgeloom-agent")?,
        &edgeloom_bench::sibling("edgeloom-runner")?,
        "acct",
        &Default::default(),
    )?;
    let op = fed.operator(&edgeloom_bench::sibling("edgeloom-operator")?, "op-1")?;
    let ns = fed.namespace("dispatch").await?;
    let seen = watch_tasks(
        &fed,
        &[
            TaskPhase::Running,
            TaskPhase::Committed,
            TaskPhase::Succeeded,
            TaskPhase::Failed,
        ],
    )?;
    // The agents publish their inventory and heartbeat; wait until all 10 are ready.
    let pools: Api<edgeloom_crds::EdgePool> = Api::all(fed.hub.clone());
    let t = Instant::now();
    while pools
        .get("edge")
        .await?
        .status
        .and_then(|s| s.capacity)
        .map(|c| c.ready_nodes)
        .unwrap_or(0)
        < 10
    {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("agents not ready after 120s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rows = Vec::new();
    for phase in ["idle fleet", "1,000 unplaceable jobs queued"] {
        if phase != "idle fleet" {
            let t = Instant::now();
            for j in 0..queued {
                let job = format!(
                    "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: queued-{j}\nspec:\n  workload:\n    kind: Benchmark\n  shards: 2\n  resources:\n    gpus: 1\n"
                );
                manifests::apply_all(&fed.hub, &job, &ns, false).await?;
            }
            while edgeloom_bench::metric(op.port, "edgeloom_operator_queue_depth").await
                < queued as f64
            {
                if t.elapsed() > Duration::from_secs(300) {
                    bail!("{queued} jobs not queued after 300s");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            eprintln!("{queued} jobs queued in {:.0}s", t.elapsed().as_secs_f64());
        }
        let mut running_ms = Vec::new();
        for k in 0..jobs {
            let name = format!("probe-{}-{k}", rows.len());
            let job = format!(
                "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n  workload:\n    kind: Benchmark\n  shards: 10\n  placement:\n    spread: Node\n"
            );
            let t = Instant::now();
            manifests::apply_all(&fed.hub, &job, &ns, false).await?;
            let uid = job_uid(&fed, &ns, &name).await?;
            // All 10 tasks Running (or past it) on the agents.
            loop {
                let times: Vec<Instant> = seen
                    .lock()
                    .map(|s| s.values().filter(|v| v.1 == uid).map(|v| v.0).collect())
                    .unwrap_or_default();
                if times.len() >= 10 {
                    let last = times.iter().max().copied().unwrap_or(t);
                    running_ms.push(last.duration_since(t).as_secs_f64() * 1e3);
                    break;
                }
                if t.elapsed() > Duration::from_secs(60) {
                    bail!("probe {name}: {}/10 tasks running after 60s", times.len());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            wait_job(&fed, &ns, &name, JobPhase::Succeeded).await?;
        }
        rows.push(row(
            &format!("{phase}: 10-shard job applied -> 10 tasks Running on real agents"),
            &mut running_ms,
        ));
    }
    println!("| fleet (2 clusters x 5 real agents) | jobs | p50 ms | p99 ms | min ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

async fn member_lag(jobs: usize) -> Result<()> {
    let mut fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(1)).await?;
    fed.apply_pool("edge", 20, 1).await?;
    let _op = fed.operator(&edgeloom_bench::sibling("edgeloom-operator")?, "op-1")?;
    let ns = fed.namespace("lag").await?;
    let done = watch_tasks(&fed, &[TaskPhase::Succeeded])?;
    let mut rows = Vec::new();
    for phase in ["both members up", "edge-a's API server down"] {
        if phase != "both members up" {
            fed.plane.kill_apiserver("edge-a")?;
            // Let the operator notice (its probe) before measuring.
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let mut lag = Vec::new();
        for k in 0..jobs {
            let name = format!("lag-{}-{k}", rows.len());
            let job = format!(
                "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n  workload:\n    kind: Benchmark\n  shards: 1\n  placement:\n    regions: [region-edge-b]\n"
            );
            manifests::apply_all(&fed.hub, &job, &ns, false).await?;
            let uid = job_uid(&fed, &ns, &name).await?;
            wait_job(&fed, &ns, &name, JobPhase::Succeeded).await?;
            let in_hub = Instant::now();
            let in_member = done
                .lock()
                .ok()
                .and_then(|s| s.values().find(|v| v.1 == uid).map(|v| v.0));
            match in_member {
                Some(t) => lag.push(in_hub.saturating_duration_since(t).as_secs_f64() * 1e3),
                None => bail!("job {name} succeeded in the hub before its task did"),
            }
        }
        rows.push(row(
            &format!("{phase}: task Succeeded in edge-b -> job Succeeded in the hub"),
            &mut lag,
        ));
    }
    println!("| members (2 sim agents each) | jobs | p50 ms | p99 ms | min ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Dispatch { jobs, queued } => dispatch(jobs, queued).await,
        Cmd::MemberLag { jobs } => member_lag(jobs).await,
    }
}
