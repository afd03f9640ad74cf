//! Placement throughput of the pure placement function at 1,000 / 10,000 / 100,000
//! simulated nodes, side by side with a reference that filters every node and scores
//! every node for each slot (kube-scheduler style, no early exit), on the same snapshot and
//! the same job mix. Prints a Markdown table.
//!
//! ```sh
//! cargo run --release -p edgeloom-bench --bin placement
//! ```

use edgeloom_bench::{Rng, percentile};
use edgeloom_operator::placement::{self, Interner, Node, Request, Slot, Snapshot, Spread, check};
use std::time::Instant;

const PRODUCTS: [&str; 4] = [
    "NVIDIA H100 80GB HBM3",
    "NVIDIA A100-SXM4-40GB",
    "NVIDIA L4",
    "NVIDIA RTX 4090",
];

/// A heterogeneous fleet: 100 clusters in 4 regions; 20% GPU nodes (4 products); 30% of
/// nodes carry residency=eu; 5% hold one of 10 node-local datasets; 2 task slots each.
fn fleet(n: usize, interner: &mut Interner, rng: &mut Rng) -> Snapshot {
    let clusters = 100.min(n.max(1));
    let eu = interner.intern("edgeloom.io/residency=eu");
    let regions: Vec<u32> = (0..4)
        .map(|r| interner.intern(&format!("region-{r}")))
        .collect();
    let products: Vec<u32> = PRODUCTS.iter().map(|p| interner.intern(p)).collect();
    let datasets: Vec<u32> = (0..10)
        .map(|d| interner.intern(&format!("ds-{d}")))
        .collect();
    let accounts: Vec<u32> = (0..(n / 4).max(1))
        .map(|a| interner.intern(&format!("acct-{a}")))
        .collect();
    let nodes = (0..n)
        .map(|i| {
            let cluster = (i % clusters) as u32;
            let gpu = rng.below(5) == 0;
            let mut labels = Vec::new();
            if rng.below(10) < 3 {
                labels.push(eu);
            }
            Node {
                cluster,
                ready: rng.below(50) != 0,
                free_slots: 2,
                total_slots: 2,
                free_cpu_millis: 8000,
                free_memory_mib: 32_768,
                free_gpus: if gpu { 1 + rng.below(4) as u32 } else { 0 },
                gpu_memory_mib: if gpu { 24_576 * (1 + rng.below(3)) } else { 0 },
                gpu_product: gpu.then(|| products[rng.below(4) as usize]),
                labels,
                datasets: if rng.below(20) == 0 {
                    vec![datasets[rng.below(10) as usize]]
                } else {
                    vec![]
                },
                region: Some(regions[cluster as usize % 4]),
                zone: None,
                account: Some(accounts[rng.below(accounts.len() as u64) as usize]),
                owner: None,
                arch: None,
                score: rng.unit(),
            }
        })
        .collect();
    Snapshot::new(nodes, vec![true; clusters])
}

/// The job mix: 50% CPU (4 shards), 20% one GPU of a named product (2 shards), 20% data
/// residency in one region (4 shards), 10% a node-local dataset (1 shard).
fn job(interner: &Interner, rng: &mut Rng) -> Request {
    let slots = |n: u32| {
        (0..n)
            .map(|shard| Slot {
                shard,
                ..Slot::default()
            })
            .collect()
    };
    let kind = rng.below(10);
    let mut r = Request {
        cpu_millis: 1000,
        memory_mib: 2048,
        spread: Spread::Node,
        ..Request::default()
    };
    match kind {
        0..5 => r.slots = slots(4),
        5..7 => {
            r.slots = slots(2);
            r.gpus = 1;
            r.gpu_memory_mib = 20_000;
            r.gpu_products = vec![interner.get(PRODUCTS[rng.below(4) as usize])];
        }
        7..9 => {
            r.slots = slots(4);
            r.required_labels = vec![interner.get("edgeloom.io/residency=eu")];
            r.regions = vec![interner.get(&format!("region-{}", rng.below(4)))];
        }
        _ => {
            r.slots = slots(1);
            r.dataset = Some(interner.get(&format!("ds-{}", rng.below(10))));
        }
    }
    r
}

/// The reference: every slot filters and scores every node and takes the best.
fn place_full_scan(snapshot: &mut Snapshot, req: &Request) -> usize {
    let mut used: Vec<u32> = Vec::new();
    let mut placed = 0;
    for _slot in &req.slots {
        let mut best: Option<(f64, u32)> = None;
        for id in 0..snapshot.nodes.len() as u32 {
            if check(snapshot, id, req).is_err() || used.contains(&id) {
                continue;
            }
            let n = &snapshot.nodes[id as usize];
            let s = n.score
                - if used
                    .iter()
                    .any(|u| snapshot.nodes[*u as usize].cluster == n.cluster)
                {
                    0.01
                } else {
                    0.0
                };
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, id));
            }
        }
        if let Some((_, id)) = best {
            let n = &mut snapshot.nodes[id as usize];
            n.free_slots -= 1;
            n.free_cpu_millis -= req.cpu_millis;
            n.free_memory_mib -= req.memory_mib;
            n.free_gpus -= req.gpus;
            used.push(id);
            placed += 1;
        }
    }
    placed
}

struct Run {
    slots: usize,
    seconds: f64,
    per_job_us: Vec<f64>,
    /// Tasks on the busiest node, and the mean over nodes with any.
    max_per_node: u32,
    mean_per_busy_node: f64,
    /// Ready nodes left with nothing to run.
    idle_nodes: usize,
}

fn run(nodes: usize, jobs: usize, reference: bool) -> Run {
    let mut interner = Interner::default();
    let mut rng = Rng(0x5eed ^ nodes as u64);
    let mut snapshot = fleet(nodes, &mut interner, &mut rng);
    let mut rng = Rng(42);
    let requests: Vec<Request> = (0..jobs).map(|_| job(&interner, &mut rng)).collect();
    let mut per_job_us = Vec::with_capacity(jobs);
    let mut slots = 0;
    let start = Instant::now();
    for r in &requests {
        let t = Instant::now();
        slots += if reference {
            place_full_scan(&mut snapshot, r)
        } else {
            placement::place(&mut snapshot, r).assigned.len()
        };
        per_job_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let seconds = start.elapsed().as_secs_f64();
    let busy: Vec<u32> = snapshot
        .nodes
        .iter()
        .map(|n| n.total_slots - n.free_slots)
        .collect();
    let used: Vec<u32> = busy.iter().copied().filter(|b| *b > 0).collect();
    Run {
        slots,
        seconds,
        per_job_us,
        max_per_node: busy.iter().copied().max().unwrap_or(0),
        mean_per_busy_node: used.iter().sum::<u32>() as f64 / used.len().max(1) as f64,
        idle_nodes: snapshot
            .nodes
            .iter()
            .zip(&busy)
            .filter(|(n, b)| n.ready && **b == 0)
            .count(),
    }
}

fn main() {
    println!(
        "| nodes | implementation | jobs | slots placed | placements/s | job p50 (µs) | job p99 (µs) | tasks per node: max / mean of busy | ready nodes idle |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for nodes in [1_000usize, 10_000, 100_000] {
        // Jobs enough to fill about a third of the fleet's slots.
        let jobs = nodes * 2 / 3 / 3;
        for reference in [false, true] {
            // The full scan is quadratic; at 100k nodes it gets a tenth of the jobs.
            let jobs = if reference && nodes == 100_000 {
                jobs / 10
            } else {
                jobs
            };
            let mut r = run(nodes, jobs, reference);
            println!(
                "| {nodes} | {} | {jobs} | {} | {:.0} | {:.1} | {:.1} | {} / {:.2} | {} |",
                if reference {
                    "reference: filter + score every node"
                } else {
                    "edgeloom placement"
                },
                r.slots,
                r.slots as f64 / r.seconds,
                percentile(&mut r.per_job_us, 50.0),
                percentile(&mut r.per_job_us, 99.0),
                r.max_per_node,
                r.mean_per_busy_node,
                r.idle_nodes,
            );
        }
        // Worst case: a slot nothing fits scans every node twice and once more to explain.
        let mut interner = Interner::default();
        let t = Instant::now();
        let mut snap = fleet(nodes, &mut interner, &mut Rng(7));
        let built_ms = t.elapsed().as_secs_f64() * 1e3;
        let impossible = Request {
            slots: vec![Slot::default()],
            gpus: 1,
            gpu_memory_mib: 1 << 30,
            ..Request::default()
        };
        let mut fails: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                let out = placement::place(&mut snap, &impossible);
                assert!(out.assigned.is_empty());
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        println!(
            "| {nodes} | edgeloom, unplaceable job (reason computed) | 20 | 0 | - | {:.1} | {:.1} | - | - |",
            percentile(&mut fails, 50.0),
            percentile(&mut fails, 99.0)
        );
        eprintln!("snapshot of {nodes} nodes built and sorted in {built_ms:.1} ms");
    }
}
