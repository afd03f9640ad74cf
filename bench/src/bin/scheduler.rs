//! The scheduling cycle's own cost at 1,000 / 10,000 / 100,000 nodes, outside the API
//! servers: building the capacity snapshot from the operator's caches (from nothing, as
//! every cycle did before issue #11, against the incremental build after a second of
//! churn), and cycles with 1,000 queued jobs that cannot be placed (tried, then their
//! verdicts reused, then capacity grows where none fits, then where one does). Members are
//! detached (caches filled here, no watchers, no API server: creating a task fails fast).
//! Prints Markdown tables.
//!
//! ```sh
//! cargo build --release -p edgeloom-bench --bin scheduler && target/release/scheduler [nodes]
//! ```

use edgeloom_bench::{Rng, percentile};
use edgeloom_crds::TaskPhase;
use edgeloom_crds::compute_job::ComputeJobSpec;
use edgeloom_crds::compute_task::ComputeTaskStatus;
use edgeloom_crds::edge_pool::{EdgePoolSpec, MemberCluster};
use edgeloom_crds::inventory::NodeInventory;
use edgeloom_operator::cache::{NodeEntry, TaskEntry};
use edgeloom_operator::fleet::{Fleet, Member};
use edgeloom_operator::lifecycle::Need;
use edgeloom_operator::metrics::Metrics;
use edgeloom_operator::scheduler::{Scheduler, Work};
use jiff::{SignedDuration, Timestamp};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLUSTERS: usize = 100;

fn pool_spec() -> Arc<EdgePoolSpec> {
    let clusters: Vec<serde_json::Value> = (0..CLUSTERS)
        .map(|c| serde_json::json!({"name": format!("c{c}"), "local": true, "region": format!("region-{}", c % 4), "labels": {"site": format!("site-{c}")}}))
        .collect();
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "clusters": clusters, "maxTasksPerNode": 2, "heartbeatTimeoutSeconds": 3600,
            "rewards": {"perGpuSecond": "0.001", "perCpuCoreSecond": "0.0001", "unit": "credits"}
        }))
        .expect("pool spec"),
    )
}

fn task(name: &str, node: &str, phase: TaskPhase, progress: u8, gpus: u32) -> TaskEntry {
    TaskEntry {
        name: name.into(),
        job_namespace: "bench".into(),
        job_name: "running".into(),
        job_uid: "uid-running".into(),
        pool: "edge".into(),
        shard: 0,
        replica: 0,
        attempt: 1,
        node: node.into(),
        cpu_millis: 1000,
        memory_mib: 2048,
        gpus,
        status: Some(Box::new(ComputeTaskStatus {
            phase: Some(phase),
            progress,
            ..ComputeTaskStatus::default()
        })),
        nonce: None,
        reveal_requested_at: None,
        dispatched_at: None,
    }
}

struct Fixture {
    members: Vec<Arc<Member>>,
    fleet: Fleet,
    /// (member, node, gpus) of each node.
    nodes: Vec<(usize, String, u32)>,
    now: Timestamp,
}

/// A fleet of `n` agent nodes in 100 clusters: 20% with GPUs, 30% labelled residency=eu,
/// hostname and arch labels; every GPU node and half the others run a task; each node has
/// a few finished tasks of history; every heartbeat fresh.
fn fixture(n: usize) -> Fixture {
    let spec = pool_spec();
    let client = kube::Client::try_from(kube::Config::new(
        "http://127.0.0.1:9".parse().expect("url"),
    ))
    .expect("client");
    let members: Vec<Arc<Member>> = spec
        .clusters
        .iter()
        .map(|c: &MemberCluster| {
            Arc::new(Member::detached(
                "bench",
                spec.clone(),
                c.clone(),
                client.clone(),
                Duration::from_millis(5 + (c.name.len() as u64 % 7)),
            ))
        })
        .collect();
    let fleet = Fleet::new(futures::channel::mpsc::unbounded().0);
    let now = Timestamp::now();
    let mut rng = Rng(0x5eed ^ n as u64);
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let mi = i % CLUSTERS;
        let m = &members[mi];
        let name = format!("node-{i}");
        let gpu = rng.below(5) == 0;
        let mut labels: Vec<(Box<str>, Box<str>)> = vec![
            ("edgeloom.io/agent".into(), "true".into()),
            ("kubernetes.io/arch".into(), "amd64".into()),
            ("kubernetes.io/hostname".into(), name.clone().into()),
        ];
        if rng.below(10) < 3 {
            labels.push(("edgeloom.io/residency".into(), "eu".into()));
        }
        labels.sort();
        m.nodes.upsert(
            &name,
            NodeEntry {
                name: name.clone().into(),
                labels: labels.into(),
                inventory: NodeInventory {
                    agent: true,
                    cpu_cores: 8,
                    memory_mib: 32_768,
                    gpus: if gpu { 1 } else { 0 },
                    gpu_product: gpu.then(|| "NVIDIA L4".to_string()),
                    gpu_memory_mib: if gpu { 24_576 } else { 0 },
                    tflops: 0.5 + rng.unit(),
                    price_factor: 1.0,
                    task_slots: 2,
                    box_key: None,
                    ..NodeInventory::default()
                },
            },
        );
        m.leases.upsert(
            &name,
            edgeloom_operator::cache::Heartbeat::at(
                now - SignedDuration::from_secs(rng.below(10) as i64),
            ),
        );
        if gpu || rng.below(2) == 0 {
            let t = format!("run-{i}");
            m.tasks.upsert(
                &t,
                task(&t, &name, TaskPhase::Running, 10, if gpu { 1 } else { 0 }),
            );
        }
        for h in 0..2 {
            let t = format!("done-{i}-{h}");
            let phase = if rng.below(10) == 0 {
                TaskPhase::Failed
            } else {
                TaskPhase::Succeeded
            };
            m.tasks.upsert(&t, task(&t, &name, phase, 100, 0));
        }
        nodes.push((mi, name, if gpu { 1 } else { 0 }));
    }
    for m in &members {
        m.nodes.mark_ready();
        m.leases.mark_ready();
        m.tasks.mark_ready();
        fleet.insert_for_tests(m.clone());
    }
    Fixture {
        members,
        fleet,
        nodes,
        now,
    }
}

/// One second of churn at 100,000 nodes renewing every 10 s, scaled to this fleet: a tenth
/// of the heartbeats renewed, a hundredth of the running tasks report progress, and no task
/// finishes (so capacity does not grow).
fn churn(f: &Fixture, rng: &mut Rng, second: i64) {
    let n = f.nodes.len();
    for _ in 0..n / 10 {
        let (mi, name, _) = &f.nodes[rng.below(n as u64) as usize];
        f.members[*mi].leases.upsert(
            name,
            edgeloom_operator::cache::Heartbeat::at(f.now + SignedDuration::from_secs(second)),
        );
    }
    for _ in 0..(n / 100).max(1) {
        let i = rng.below(n as u64) as usize;
        let (mi, name, gpus) = &f.nodes[i];
        let t = format!("run-{i}");
        if f.members[*mi].tasks.get(&t).is_some() {
            f.members[*mi].tasks.upsert(
                &t,
                task(
                    &t,
                    name,
                    TaskPhase::Running,
                    10 + (second % 90) as u8,
                    *gpus,
                ),
            );
        }
    }
}

fn queued(i: usize, members: &[Arc<Member>]) -> Work {
    // Half want 8 GPUs (no node has them), half one GPU (every GPU node is busy).
    let gpus = if i.is_multiple_of(2) { 8 } else { 1 };
    let spec: ComputeJobSpec = serde_json::from_value(serde_json::json!({
        "workload": {"kind": "Benchmark"}, "shards": 2, "resources": {"gpus": gpus}
    }))
    .expect("spec");
    Work {
        namespace: "bench".into(),
        name: format!("queued-{i}"),
        uid: format!("uid-queued-{i}"),
        priority: 0,
        created: i as i64,
        spec: Arc::new(spec),
        needs: (0..2)
            .map(|shard| Need {
                shard,
                replica: 0,
                attempt: 1,
                avoid: vec![],
            })
            .collect(),
        used: vec![],
        replicas: BTreeMap::new(),
        members: members
            .iter()
            .map(|m| m.key.clone())
            .collect::<Vec<_>>()
            .into(),
        gang: false,
        finished_seen: None,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let only: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let mut snapshot_rows = Vec::new();
    let mut cycle_rows = Vec::new();
    for n in [1_000usize, 10_000, 100_000] {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let t = Instant::now();
        let f = fixture(n);
        eprintln!(
            "{n} nodes: caches filled in {:.1}s",
            t.elapsed().as_secs_f64()
        );
        let mut rng = Rng(7);

        // From nothing, as every cycle did before: a fresh scheduler each time.
        let mut scratch: Vec<f64> = (0..5)
            .map(|_| {
                let s = Scheduler::default();
                let t = Instant::now();
                let w = s.snapshot_now(&f.members, f.now);
                assert_eq!(w.snapshot.nodes.len(), n);
                ms(t.elapsed())
            })
            .collect();
        let kept = Scheduler::default();
        kept.snapshot_now(&f.members, f.now);
        let mut unchanged: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                kept.snapshot_now(&f.members, f.now);
                ms(t.elapsed())
            })
            .collect();
        let rebuilds = kept.base_rebuilds();
        let mut churned: Vec<f64> = (1..=5)
            .map(|second| {
                churn(&f, &mut rng, second);
                let t = Instant::now();
                kept.snapshot_now(&f.members, f.now + SignedDuration::from_secs(second));
                ms(t.elapsed())
            })
            .collect();
        assert_eq!(kept.base_rebuilds(), rebuilds, "churn rebuilds no base");
        let spread = |v: &mut Vec<f64>| {
            format!(
                "{:.2} ({:.2}-{:.2})",
                percentile(v, 50.0),
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max)
            )
        };
        snapshot_rows.push(format!(
            "| {n} | {} | {} | {} |",
            spread(&mut scratch),
            spread(&mut unchanged),
            spread(&mut churned)
        ));

        // 1,000 queued jobs that cannot be placed.
        let metrics = Metrics::new().expect("metrics");
        let s = Scheduler::default();
        for i in 0..1000 {
            s.submit(queued(i, &f.members));
        }
        let mut row = vec![n.to_string()];
        let mut second = 10;
        for what in ["first", "reused", "cpu freed", "gpu freed", "node joined"] {
            second += 1;
            churn(&f, &mut rng, second);
            if what == "node joined" {
                // A GPU-less node joins cluster c0: its whole member is re-derived.
                let m = &f.members[0];
                let name = "joined-0";
                let mut entry = m.nodes.get("node-0").map(|e| (*e).clone()).expect("node-0");
                entry.name = name.into();
                entry.inventory.gpus = 0;
                entry.inventory.gpu_product = None;
                m.nodes.upsert(name, entry);
                m.leases.upsert(
                    name,
                    edgeloom_operator::cache::Heartbeat::at(
                        f.now + SignedDuration::from_secs(second),
                    ),
                );
            }
            // A task finishes on a GPU-less node (capacity grew where no queued job fits),
            // or on a GPU node (one queued job fits there now).
            let want_gpu = match what {
                "cpu freed" => Some(0),
                "gpu freed" => Some(1),
                _ => None,
            };
            if let Some(g) = want_gpu {
                let (i, (mi, name, _)) = f
                    .nodes
                    .iter()
                    .enumerate()
                    .find(|(i, x)| {
                        x.2 == g && f.members[x.0].tasks.get(&format!("run-{i}")).is_some()
                    })
                    .expect("a busy node");
                let t = format!("run-{i}");
                f.members[*mi]
                    .tasks
                    .upsert(&t, task(&t, name, TaskPhase::Succeeded, 100, g));
            }
            let reused = metrics.verdicts_reused.get();
            let t = Instant::now();
            s.cycle(&f.fleet, None, &metrics, "bench").await;
            let took = t.elapsed();
            row.push(format!(
                "{:.1} ({} reused)",
                ms(took),
                metrics.verdicts_reused.get() - reused
            ));
        }
        cycle_rows.push(format!("| {} |", row.join(" | ")));
    }
    println!(
        "| nodes | snapshot from nothing, ms (every cycle before) | incremental, nothing changed | incremental, after 1 s of churn |"
    );
    println!("|---:|---:|---:|---:|");
    for r in snapshot_rows {
        println!("{r}");
    }
    println!();
    println!(
        "| nodes | cycle 1: 1,000 unplaceable jobs tried, ms | cycle 2: churn, no capacity freed | cycle 3: a task ends on a GPU-less node | cycle 4: a task ends on a GPU node | cycle 5: a GPU-less node joins |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in cycle_rows {
        println!("{r}");
    }
}
