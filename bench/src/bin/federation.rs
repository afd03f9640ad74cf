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
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
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
    /// Operator CPU and dispatch latency under churn: heartbeat renewals at the API
    /// servers' ceiling, task status updates, and queued jobs that cannot be placed.
    Churn {
        /// Agent nodes in total, split over 2 members.
        #[arg(long, default_value_t = 10_000)]
        nodes: u32,
        /// Queued jobs that cannot be placed.
        #[arg(long, default_value_t = 1000)]
        queued: u32,
        /// Seconds of each measured phase.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// One job with many shards on simulated agents, run to the end: the job's status
    /// size, its pages and the operator's memory (issue #12, bounded status).
    BigJob {
        /// Shards of the job.
        #[arg(long, default_value_t = 10_000)]
        shards: u32,
        /// Simulated nodes per member (2 members), each running up to 64 tasks at once.
        #[arg(long, default_value_t = 80)]
        nodes: u32,
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

/// Starts the release operator; `interval_ms` is its longest pause between scheduling
/// cycles (None: its default, 1 s).
fn start_operator(plane: &ControlPlane, interval_ms: Option<u64>) -> Result<(Process, u16)> {
    let port = free_port()?;
    let mut args = vec![
        format!("--kubeconfig={}", plane.hub().kubeconfig.display()),
        format!("--namespace={SYSTEM_NAMESPACE}"),
        "--identity=bench".into(),
        format!("--metrics-addr=127.0.0.1:{port}"),
    ];
    if let Some(ms) = interval_ms {
        args.push(format!("--scheduler-interval-ms={ms}"));
    }
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
    let (_op, _) = start_operator(&plane, Some(200))?;
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
    let (plane, hub) = edgeloom_bench::two_members().await?;
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
    let (op, port) = start_operator(&plane, Some(200))?;
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

/// Renews the Leases of `nodes` round-robin, 32 requests in flight, until `stop` or
/// `max` renewals; returns how many it renewed.
async fn renew_leases(
    members: Vec<(kube::Client, Vec<String>)>,
    stop: Instant,
    max: Option<usize>,
) -> u64 {
    let targets: Vec<(kube::Client, String)> = members
        .iter()
        .flat_map(|(c, names)| names.iter().map(move |n| (c.clone(), n.clone())))
        .collect();
    let mut i = 0usize;
    let mut done = 0u64;
    let mut inflight = futures::stream::FuturesUnordered::new();
    while Instant::now() < stop && max.is_none_or(|m| i < m) {
        while inflight.len() < 32 && max.is_none_or(|m| i < m) {
            let (client, name) = targets[i % targets.len()].clone();
            i += 1;
            inflight.push(async move {
                let api: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
                let patch =
                    serde_json::json!({"spec": {"renewTime": MicroTime(jiff::Timestamp::now())}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .is_ok()
            });
        }
        if let Some(ok) = inflight.next().await
            && ok
        {
            done += 1;
        }
    }
    while let Some(ok) = inflight.next().await {
        done += u64::from(ok);
    }
    done
}

/// Reports progress on the running `tasks` at about `per_second`, until `stop`.
async fn update_tasks(tasks: Vec<(kube::Client, String)>, per_second: u32, stop: Instant) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second.max(1) as f64));
    let mut done = 0u64;
    let mut i = 0usize;
    while Instant::now() < stop {
        tick.tick().await;
        let (client, name) = tasks[i % tasks.len()].clone();
        i += 1;
        let api: Api<ComputeTask> = Api::namespaced(client, SYSTEM_NAMESPACE);
        let patch = serde_json::json!({"status": {"phase": "Running", "progress": (i % 99) as u8}});
        if api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .is_ok()
        {
            done += 1;
        }
    }
    done
}

/// Applies 10-shard jobs one after another (each once the last is placed) until
/// `stop`; returns each one's time from apply until all its ComputeTasks exist.
async fn probe_dispatch(
    hub: &kube::Client,
    members: &[kube::Client],
    stop: Instant,
    tag: &str,
) -> Result<Vec<f64>> {
    let mut latencies = Vec::new();
    let mut k = 0;
    while Instant::now() < stop {
        let name = format!("probe-{tag}-{k}");
        k += 1;
        let job = format!(
            "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n  workload:\n    kind: Benchmark\n  shards: 10\n  placement:\n    spread: Node\n"
        );
        let t = Instant::now();
        manifests::apply_all(hub, &job, "bench", false).await?;
        let uid = Api::<edgeloom_crds::ComputeJob>::namespaced(hub.clone(), "bench")
            .get(&name)
            .await?
            .metadata
            .uid
            .unwrap_or_default();
        loop {
            let mut n = 0;
            for c in members {
                let api: Api<ComputeTask> = Api::namespaced(c.clone(), SYSTEM_NAMESPACE);
                n += api
                    .list_metadata(&ListParams::default().labels(&format!(
                        "{}={uid}",
                        edgeloom_crds::compute_task::JOB_UID_LABEL
                    )))
                    .await?
                    .items
                    .len();
            }
            if n >= 10 {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("probe {name}: only {n}/10 tasks after 60s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(latencies)
}

async fn churn(nodes: u32, queued: u32, seconds: u64) -> Result<()> {
    let (plane, hub) = edgeloom_bench::two_members().await?;
    let t = Instant::now();
    let mut lease_targets = Vec::new();
    let mut running = Vec::new();
    let mut member_clients = Vec::new();
    for m in plane.members() {
        let names = seed_nodes(m, nodes / 2, 8).await?;
        let client = m.client().await?;
        // Two in five nodes run a task (of a job the hub does not know), reported Running.
        let busy: Vec<(kube::Client, String, String)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 5 < 2)
            .map(|(i, n)| (client.clone(), format!("{n}-t{i}"), n.clone()))
            .collect();
        create_tasks(busy.clone()).await?;
        running.extend(busy.into_iter().map(|(c, name, _)| (c, name)));
        member_clients.push(client.clone());
        lease_targets.push((client, names));
    }
    eprintln!(
        "seeded {nodes} nodes and leases, {} running tasks in {:.0}s",
        running.len(),
        t.elapsed().as_secs_f64()
    );
    apply_pool(&hub, &plane, 2).await?;
    // Heartbeats must matter: a 40 s timeout, kept fresh by the renewals below.
    let patch = serde_json::json!({"spec": {"heartbeatTimeoutSeconds": 40}});
    Api::<EdgePool>::all(hub.clone())
        .patch("bench", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let (op, port) = start_operator(&plane, None)?;
    let all = nodes as usize;
    let far = || Instant::now() + Duration::from_secs(3600);
    // Fresh leases for all before the operator judges them.
    renew_leases(lease_targets.clone(), far(), Some(all)).await;
    wait_ready_nodes(&hub, nodes).await?;
    ensure_namespace(&hub, "bench").await?;
    // Jobs that cannot be placed: half want a GPU (no node has one), half a label no node
    // has.
    let t = Instant::now();
    for j in 0..queued {
        let extra = if j % 2 == 0 {
            "  resources:\n    gpus: 1\n"
        } else {
            "  placement:\n    requiredLabels:\n      tier: gold\n"
        };
        let job = format!(
            "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: queued-{j}\nspec:\n  workload:\n    kind: Benchmark\n  shards: 2\n{extra}"
        );
        manifests::apply_all(&hub, &job, "bench", false).await?;
    }
    while edgeloom_bench::metric(port, "edgeloom_operator_queue_depth").await < queued as f64 {
        if t.elapsed() > Duration::from_secs(300) {
            bail!("the operator never queued {queued} jobs");
        }
        renew_leases(lease_targets.clone(), far(), Some(all)).await;
    }
    eprintln!("{queued} jobs queued in {:.0}s", t.elapsed().as_secs_f64());
    let pid = op.pid();
    let mut rows = Vec::new();
    for phase in ["quiet", "renewals", "renewals + task updates + probe jobs"] {
        if phase == "quiet" {
            renew_leases(lease_targets.clone(), far(), Some(all)).await;
        }
        let cycles0 =
            edgeloom_bench::metric(port, "edgeloom_operator_snapshot_duration_seconds_count").await;
        let snap0 =
            edgeloom_bench::metric(port, "edgeloom_operator_snapshot_duration_seconds_sum").await;
        let reused0 =
            edgeloom_bench::metric(port, "edgeloom_operator_unplaceable_verdicts_reused_total")
                .await;
        let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
        let t = Instant::now();
        let stop = t + Duration::from_secs(seconds);
        let (renewed, updated, probes) = match phase {
            // No renewals: every Lease was renewed just before, within the 40 s timeout.
            "quiet" => {
                tokio::time::sleep_until(stop.into()).await;
                (0, 0, vec![])
            }
            "renewals" => (
                renew_leases(lease_targets.clone(), stop, None).await,
                0,
                vec![],
            ),
            _ => {
                let (r, u, p) = tokio::join!(
                    renew_leases(lease_targets.clone(), stop, None),
                    update_tasks(running.clone(), 100, stop),
                    probe_dispatch(&hub, &member_clients, stop, "c"),
                );
                (r, u, p?)
            }
        };
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu0;
        let cycles =
            edgeloom_bench::metric(port, "edgeloom_operator_snapshot_duration_seconds_count").await
                - cycles0;
        let snap = edgeloom_bench::metric(port, "edgeloom_operator_snapshot_duration_seconds_sum")
            .await
            - snap0;
        let reused =
            edgeloom_bench::metric(port, "edgeloom_operator_unplaceable_verdicts_reused_total")
                .await
                - reused0;
        let mut p = probes.clone();
        rows.push(format!(
            "| {phase} | {secs:.0} | {:.0} | {:.0} | {:.1}% | {:.1} | {:.1} | {:.0} | {} |",
            renewed as f64 / secs,
            updated as f64 / secs,
            cpu / secs * 100.0,
            cycles / secs,
            if cycles > 0.0 {
                snap / cycles * 1e3
            } else {
                0.0
            },
            reused / secs,
            if p.is_empty() {
                "-".to_string()
            } else {
                format!(
                    "{:.0} / {:.0} ({} jobs)",
                    edgeloom_bench::percentile(&mut p, 50.0),
                    edgeloom_bench::percentile(&mut p, 99.0),
                    probes.len()
                )
            },
        ));
    }
    println!(
        "| phase ({nodes} nodes, {queued} queued unplaceable jobs) | seconds | Lease renewals/s | task status updates/s | operator CPU (% of a core) | scheduling cycles/s | snapshot ms per cycle | verdicts reused/s | 10-shard job applied -> all tasks created, p50 / p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
    eprintln!(
        "operator RSS at the end: {:.1} MiB",
        proc_status(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

/// VmRSS of `pid`, KiB.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

async fn big_job(shards: u32, nodes: u32) -> Result<()> {
    use edgeloom_crds::{ComputeJob, JobPhase};
    use edgeloom_e2e::federation::Federation;
    use k8s_openapi::api::core::v1::ConfigMap;
    eprintln!("[big-job] starting a hub and 2 members with {nodes} simulated nodes each");
    let fed = Federation::start(&["edge-a", "edge-b"], nodes, Duration::from_secs(1)).await?;
    // A long heartbeat timeout: the simulated agents renew once per pass over their tasks,
    // which takes seconds with thousands of them.
    fed.apply_pool("big", 600, 64).await?;
    let op = fed.operator_with_env(&operator_bin()?, "op-1", &[])?;
    let ns = fed.namespace("big").await?;
    let yaml = format!(
        "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: big\nspec:\n  workload:\n    kind: Benchmark\n  shards: {shards}\n  placement:\n    spread: None\n"
    );
    let started = Instant::now();
    manifests::apply_all(&fed.hub, &yaml, &ns, false).await?;
    let jobs: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    let (mut peak_rss, mut largest_status, mut last_print) = (0u64, 0usize, Instant::now());
    let done = loop {
        peak_rss = peak_rss.max(rss_of(op.process.pid()));
        let job = jobs.get("big").await?;
        let bytes = serde_json::to_vec(&job.status)
            .map(|v| v.len())
            .unwrap_or(0);
        largest_status = largest_status.max(bytes);
        let status = job.status.clone().unwrap_or_default();
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "[big-job] {:.0}s: {:?} shards done, status {bytes} bytes, {} pages, operator {} MiB",
                started.elapsed().as_secs_f64(),
                status.progress,
                status.shard_pages.len(),
                peak_rss / 1024
            );
            last_print = Instant::now();
        }
        if matches!(status.phase, Some(JobPhase::Succeeded | JobPhase::Failed)) {
            break job;
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!(
                "the job did not finish in 30 minutes: {:?}",
                status.progress
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let took = started.elapsed();
    let status = done.status.clone().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(fed.hub.clone(), SYSTEM_NAMESPACE);
    let mut largest_page = 0usize;
    for p in &status.shard_pages {
        let cm = cms.get(&p.name).await?;
        let len = cm
            .data
            .as_ref()
            .and_then(|d| d.get("shards.json"))
            .map_or(0, String::len);
        largest_page = largest_page.max(len);
    }
    println!(
        "big job: {shards} shards on {} simulated nodes: {:?} in {:.0} s; job status at most {largest_status} bytes (final {} bytes), {} pages of at most {largest_page} bytes, slot attempts {:?}; operator peak RSS {} MiB",
        2 * nodes,
        status.phase,
        took.as_secs_f64(),
        serde_json::to_vec(&done.status)
            .map(|v| v.len())
            .unwrap_or(0),
        status.shard_pages.len(),
        status
            .slot_attempts
            .as_deref()
            .map(|a| a.chars().take(60).collect::<String>()),
        peak_rss / 1024
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Throughput { jobs, shards } => throughput(jobs, shards).await,
        Cmd::Rss { objects } => rss(objects).await,
        Cmd::Churn {
            nodes,
            queued,
            seconds,
        } => churn(nodes, queued, seconds).await,
        Cmd::BigJob { shards, nodes } => big_job(shards, nodes).await,
    }
}
