//! Benchmarks of the operator against real kube-apiservers (release build):
//!
//! - `throughput`: ComputeTasks created per second by the operator across 3 member
//!   kube-apiservers, beside a reference: a plain client creating the same number of
//!   ComputeTasks directly with 32 requests in flight (the API servers' own ceiling here).
//! - `rss`: the operator's resident memory and CPU while it watches 10,000 agent nodes,
//!   10,000 heartbeat Leases and 10,000 ComputeTasks in 2 member clusters.
//!
//! ```sh
//! cargo build --release -p edgeloom-operator -p edgeloom-bench
//! target/release/federation throughput
//! target/release/federation rss
//! ```

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_crds::EdgePool;
use edgeloom_crds::compute_task::{ComputeTask, NODE_LABEL};
use edgeloom_crds::inventory::{NodeInventory, SYSTEM_NAMESPACE};
use edgeloom_e2e::control_plane::{Cluster, free_port};
use edgeloom_e2e::federation::{ensure_namespace, link_members};
use edgeloom_e2e::process::Process;
use edgeloom_e2e::{Config, ControlPlane, manifests};
use futures::{StreamExt, stream};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tasks created per second, operator vs a plain client.
    Throughput {
        /// Jobs to apply.
        #[arg(long, default_value_t = 100)]
        jobs: u32,
        /// Shards per job.
        #[arg(long, default_value_t = 20)]
        shards: u32,
    },
    /// Operator memory while watching many nodes and tasks.
    Rss {
        /// Nodes (and Leases, and tasks) in total, split over 2 members.
        #[arg(long, default_value_t = 10_000)]
        objects: u32,
    },
}

fn operator_bin() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.with_file_name("edgeloom-operator");
    if !bin.is_file() {
        bail!(
            "{} not found: cargo build --release -p edgeloom-operator",
            bin.display()
        );
    }
    Ok(bin)
}

/// CRDs everywhere, the system namespace everywhere, member kubeconfig Secrets in the hub.
async fn prepare(plane: &ControlPlane) -> Result<kube::Client> {
    Ok(link_members(plane).await?)
}

/// Agent nodes with inventory and a heartbeat Lease, created 32 at a time.
async fn seed_nodes(member: &Cluster, count: u32, cores: u32) -> Result<Vec<String>> {
    let client = member.client().await?;
    let names: Vec<String> = (0..count)
        .map(|i| format!("{}-n{i}", member.name))
        .collect();
    let inv = NodeInventory {
        agent: true,
        cpu_cores: cores,
        memory_mib: 262_144,
        tflops: 1.0,
        account: Some("bench".into()),
        ..Default::default()
    };
    let (labels, annotations) = inv.to_metadata();
    let now = jiff::Timestamp::now();
    let results: Vec<Result<()>> = stream::iter(names.clone())
        .map(|name| {
            let (nodes, leases) = (
                Api::<Node>::all(client.clone()),
                Api::<Lease>::namespaced(client.clone(), SYSTEM_NAMESPACE),
            );
            let (labels, annotations) = (labels.clone(), annotations.clone());
            async move {
                let node = Node {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(labels),
                        annotations: Some(annotations),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                nodes.create(&PostParams::default(), &node).await?;
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name),
                        renew_time: Some(MicroTime(now)),
                        ..Default::default()
                    }),
                };
                leases.create(&PostParams::default(), &lease).await?;
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(names)
}

fn task(name: &str, node: &str, shard: u32) -> Result<ComputeTask> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask",
        "metadata": {"name": name, "labels": {NODE_LABEL: node}},
        "spec": {"job": {"namespace": "bench", "name": "raw", "uid": "raw-client"}, "pool": "bench", "cluster": "x",
                 "shard": shard, "shards": 10000, "attempt": 1, "nodeName": node, "workload": {"kind": "Benchmark"}}
    }))?)
}

async fn create_tasks(targets: Vec<(kube::Client, String, String)>) -> Result<()> {
    let results: Vec<Result<()>> = stream::iter(targets.into_iter().enumerate())
        .map(|(i, (client, name, node))| async move {
            let api: Api<ComputeTask> = Api::namespaced(client, SYSTEM_NAMESPACE);
            api.create(
                &PostParams::default(),
                &task(&name, &node, i as u32 % 10_000)?,
            )
            .await?;
            Ok(())
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn apply_pool(hub: &kube::Client, plane: &ControlPlane, slots: u32) -> Result<()> {
    let clusters: Vec<serde_json::Value> = plane
        .members()
        .map(|m| serde_json::json!({"name": m.name, "kubeconfigSecret": {"name": format!("{}-kubeconfig", m.name)}}))
        .collect();
    let pool = serde_json::json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "EdgePool", "metadata": {"name": "bench"},
        "spec": {"clusters": clusters, "heartbeatTimeoutSeconds": 3600, "maxTasksPerNode": slots,
                 "rewards": {"perGpuSecond": "0", "perCpuCoreSecond": "0.0001", "unit": "credits"}}
    });
    manifests::apply_all(hub, &pool.to_string(), "default", false).await?;
    Ok(())
}

fn start_operator(plane: &ControlPlane) -> Result<(Process, u16)> {
    let port = free_port()?;
    let args = vec![
        format!("--kubeconfig={}", plane.hub().kubeconfig.display()),
        format!("--namespace={SYSTEM_NAMESPACE}"),
        "--identity=bench".into(),
        format!("--metrics-addr=127.0.0.1:{port}"),
        "--scheduler-interval-ms=200".into(),
    ];
    let p = Process::spawn(
        "operator",
        &operator_bin()?,
        &args,
        &plane.dir().join("operator.log"),
    )?;
    Ok((p, port))
}

async fn wait_ready_nodes(hub: &kube::Client, want: u32) -> Result<()> {
    let pools: Api<EdgePool> = Api::all(hub.clone());
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let ready = pools
            .get("bench")
            .await?
            .status
            .and_then(|s| s.capacity)
            .map(|c| c.ready_nodes)
            .unwrap_or(0);
        if ready >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready}/{want} ready nodes after 300s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn count_tasks(plane: &ControlPlane) -> Result<usize> {
    let mut n = 0;
    for m in plane.members() {
        let api: Api<ComputeTask> = Api::namespaced(m.client().await?, SYSTEM_NAMESPACE);
        n += api.list_metadata(&ListParams::default()).await?.items.len();
    }
    Ok(n)
}

async fn throughput(jobs: u32, shards: u32) -> Result<()> {
    let total = (jobs * shards) as usize;
    let plane = ControlPlane::start(Config {
        members: vec!["m1".into(), "m2".into(), "m3".into()],
        nodes_per_member: 0,
        controller_manager: false,
        ..Config::default()
    })
    .await?;
    let hub = prepare(&plane).await?;
    let mut nodes = Vec::new();
    for m in plane.members() {
        for n in seed_nodes(m, 100, 64).await? {
            nodes.push((m.client().await?, n));
        }
    }
    // Reference: a plain client, 32 creates in flight, round-robin over the members' nodes.
    let targets: Vec<(kube::Client, String, String)> = (0..total)
        .map(|i| {
            let (c, n) = &nodes[i % nodes.len()];
            (c.clone(), format!("raw-{i}"), n.clone())
        })
        .collect();
    let t = Instant::now();
    create_tasks(targets).await?;
    let raw = t.elapsed().as_secs_f64();
    for m in plane.members() {
        let api: Api<ComputeTask> = Api::namespaced(m.client().await?, SYSTEM_NAMESPACE);
        api.delete_collection(&DeleteParams::default(), &ListParams::default())
            .await?;
    }
    while count_tasks(&plane).await? > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    apply_pool(&hub, &plane, 10).await?;
    let (_op, _) = start_operator(&plane)?;
    wait_ready_nodes(&hub, 300).await?;
    ensure_namespace(&hub, "bench").await?;
    let t = Instant::now();
    for j in 0..jobs {
        let job = format!(
            "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: j{j}\nspec:\n  workload:\n    kind: Benchmark\n  shards: {shards}\n  placement:\n    spread: None\n"
        );
        manifests::apply_all(&hub, &job, "bench", false).await?;
    }
    let applied = t.elapsed().as_secs_f64();
    loop {
        let n = count_tasks(&plane).await?;
        if n >= total {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!("only {n}/{total} tasks after 600s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let op = t.elapsed().as_secs_f64();
    println!("| path | tasks | seconds | tasks/s |");
    println!("|---|---:|---:|---:|");
    println!(
        "| reference: plain client, 32 in flight, direct to 3 member API servers | {total} | {raw:.2} | {:.0} |",
        total as f64 / raw
    );
    println!(
        "| edgeloom-operator: {jobs} ComputeJobs x {shards} shards applied to the hub -> tasks in 3 members | {total} | {op:.2} | {:.0} |",
        total as f64 / op
    );
    println!("<!-- applying the {jobs} jobs to the hub took {applied:.2}s of that -->");
    Ok(())
}

fn proc_status(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf(_SC_CLK_TCK) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / if hz > 0 { hz as f64 } else { 100.0 })
}

async fn rss(objects: u32) -> Result<()> {
    let plane = ControlPlane::start(Config {
        members: vec!["m1".into(), "m2".into()],
        nodes_per_member: 0,
        controller_manager: false,
        ..Config::default()
    })
    .await?;
    let hub = prepare(&plane).await?;
    let per_member = objects / 2;
    let t = Instant::now();
    let mut targets = Vec::new();
    for m in plane.members() {
        let names = seed_nodes(m, per_member, 8).await?;
        let client = m.client().await?;
        targets.extend(
            names
                .into_iter()
                .enumerate()
                .map(|(i, n)| (client.clone(), format!("{n}-t{i}"), n)),
        );
    }
    create_tasks(targets).await?;
    eprintln!(
        "seeded {objects} nodes, {objects} leases, {objects} tasks in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    apply_pool(&hub, &plane, 2).await?;
    let (op, port) = start_operator(&plane)?;
    let started = Instant::now();
    wait_ready_nodes(&hub, objects).await?;
    let synced = started.elapsed().as_secs_f64();
    let pid = op.pid();
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let mut samples = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push(proc_status(pid, "VmRSS:").unwrap_or(0));
    }
    let cpu = (cpu_seconds(pid).unwrap_or(0.0) - cpu0) / 10.0;
    let peak = proc_status(pid, "VmHWM:").unwrap_or(0);
    let steady = samples.iter().copied().max().unwrap_or(0);
    let tasks_gauge = edgeloom_e2e::scrape::get(port, "/metrics")
        .await
        .map(|(_, body)| {
            body.lines()
                .filter(|l| l.starts_with("edgeloom_operator_tasks{"))
                .map(str::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    println!(
        "| watched | caches synced after | RSS steady (max of 20 samples) | RSS peak (VmHWM) | CPU while idle |"
    );
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| {objects} agent nodes + {objects} Leases + {objects} ComputeTasks in 2 members | {synced:.1}s | {:.1} MiB | {:.1} MiB | {:.1}% of a core |",
        steady as f64 / 1024.0,
        peak as f64 / 1024.0,
        cpu * 100.0
    );
    eprintln!("operator saw: {tasks_gauge}");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Throughput { jobs, shards } => throughput(jobs, shards).await,
        Cmd::Rss { objects } => rss(objects).await,
    }
}
