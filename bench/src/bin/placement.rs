//! Placement throughput and quality of the pure placement function at 1,000 / 10,000 /
//! 100,000 simulated nodes, on an idle and a 90%-busy fleet, side by side with two
//! references on the same snapshot and job mix: a kube-scheduler-like one (adaptive
//! percentageOfNodesToScore, parallel filtering and scoring on every core, a load-aware
//! score) and an exhaustive one (every node filtered and scored, load-aware), which is also
//! the yardstick of the regret column. Prints a Markdown table.
//!
//! ```sh
//! cargo run --release -p edgeloom-bench --bin placement [nodes]
//! ```

use edgeloom_bench::{Rng, percentile};
use edgeloom_operator::placement::{self, Interner, Node, Request, Slot, Snapshot, Spread, check};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};
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
                labels: labels.into(),
                datasets: if rng.below(20) == 0 {
                    vec![datasets[rng.below(10) as usize]].into()
                } else {
                    Default::default()
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

/// The references' score of a node for a slot, kube-scheduler style: each part 0-100,
/// summed with weights as its score plugins are. The node's job-independent score (the
/// same speed, reliability, price and locality edgeloom ranks by), LeastAllocated on task
/// slots (load), and a spread part (a node the job does not use yet).
fn load_aware_score(n: &Node, used_by_job: bool) -> f64 {
    let load = if n.total_slots > 0 {
        n.free_slots as f64 / n.total_slots as f64
    } else {
        0.0
    };
    100.0 * n.score + 100.0 * load + if used_by_job { 0.0 } else { 100.0 }
}

/// kube-scheduler's numFeasibleNodesToFind with the adaptive percentageOfNodesToScore
/// (50% minus 1% per 125 nodes, at least 5%, and at least 100 nodes).
fn feasible_to_find(nodes: usize) -> usize {
    if nodes < 100 {
        return nodes;
    }
    let percentage = (50 - nodes as i64 / 125).max(5) as usize;
    (nodes * percentage / 100).max(100)
}

fn take_slot(snapshot: &mut Snapshot, id: u32, req: &Request) {
    let n = &mut snapshot.nodes[id as usize];
    n.free_slots -= 1;
    n.free_cpu_millis -= req.cpu_millis;
    n.free_memory_mib -= req.memory_mib;
    n.free_gpus -= req.gpus;
}

/// The exhaustive reference: every slot filters and scores every node (load-aware), and
/// takes the best. Also the yardstick of the regret column.
fn place_exhaustive(snapshot: &mut Snapshot, req: &Request) -> Vec<u32> {
    let mut used: Vec<u32> = req.used_nodes.clone();
    let mut chosen = Vec::new();
    for _slot in &req.slots {
        let best = best_fit(snapshot, req, &used);
        if let Some((_, id)) = best {
            take_slot(snapshot, id, req);
            used.push(id);
            chosen.push(id);
        }
    }
    chosen
}

/// The node of the highest load-aware score that passes the hard filters, if any.
fn best_fit(snapshot: &Snapshot, req: &Request, used: &[u32]) -> Option<(f64, u32)> {
    let mut best: Option<(f64, u32)> = None;
    for id in 0..snapshot.nodes.len() as u32 {
        if check(snapshot, id, req).is_err() {
            continue;
        }
        let s = load_aware_score(&snapshot.nodes[id as usize], used.contains(&id));
        if best.is_none_or(|(b, _)| s > b) {
            best = Some((s, id));
        }
    }
    best
}

/// The kube-scheduler-like reference: per slot, filter in parallel (on every core, in
/// chunks, from where the last slot stopped) until numFeasibleNodesToFind nodes fit,
/// score those in parallel with the load-aware score, take the best.
struct KubeLike {
    next_start: usize,
    /// Filter and score on every core (rayon); else on one (kube-scheduler's
    /// `parallelism: 1`), which is faster here: 2 cores, and filters of nanoseconds.
    parallel: bool,
}

impl KubeLike {
    fn place(&mut self, snapshot: &mut Snapshot, req: &Request) -> Vec<u32> {
        let n = snapshot.nodes.len();
        let want = feasible_to_find(n);
        let mut used: Vec<u32> = req.used_nodes.clone();
        let mut chosen = Vec::new();
        for _slot in &req.slots {
            let found = AtomicUsize::new(0);
            let examined = AtomicUsize::new(0);
            let start = self.next_start;
            let snap = &*snapshot;
            const CHUNK: usize = 256;
            let mut feasible: Vec<u32> = if !self.parallel {
                let mut fit = Vec::new();
                let mut k = 0;
                while k < n && fit.len() < want {
                    let id = ((start + k) % n) as u32;
                    if check(snap, id, req).is_ok() {
                        fit.push(id);
                    }
                    k += 1;
                }
                examined.store(k, Ordering::Relaxed);
                fit
            } else {
                (0..n.div_ceil(CHUNK))
                    .into_par_iter()
                    .flat_map_iter(|c| {
                        let mut fit = Vec::new();
                        if found.load(Ordering::Relaxed) < want {
                            let end = ((c + 1) * CHUNK).min(n);
                            examined.fetch_add(end - c * CHUNK, Ordering::Relaxed);
                            for k in c * CHUNK..end {
                                let id = ((start + k) % n) as u32;
                                if check(snap, id, req).is_ok() {
                                    fit.push(id);
                                }
                            }
                            found.fetch_add(fit.len(), Ordering::Relaxed);
                        }
                        fit
                    })
                    .collect()
            };
            feasible.truncate(want);
            self.next_start = (start + examined.load(Ordering::Relaxed)) % n.max(1);
            let score = |&id: &u32| {
                (
                    load_aware_score(&snapshot.nodes[id as usize], used.contains(&id)),
                    id,
                )
            };
            let better = |a: (f64, u32), b: (f64, u32)| if b.0 > a.0 { b } else { a };
            let best = if self.parallel {
                feasible.par_iter().map(score).reduce_with(better)
            } else {
                feasible.iter().map(score).reduce(better)
            };
            if let Some((_, id)) = best {
                take_slot(snapshot, id, req);
                used.push(id);
                chosen.push(id);
            }
        }
        chosen
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Implementation {
    Edgeloom,
    KubeLike,
    KubeLikeParallel,
    Exhaustive,
}

impl Implementation {
    fn name(self) -> &'static str {
        match self {
            Implementation::Edgeloom => "edgeloom placement",
            Implementation::KubeLike => {
                "reference: kube-scheduler-like, parallelism 1 (adaptive percentageOfNodesToScore, load-aware score)"
            }
            Implementation::KubeLikeParallel => {
                "reference: the same, parallelism 2 (filter and score on both cores)"
            }
            Implementation::Exhaustive => "reference: filter + score every node (load-aware)",
        }
    }
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
    /// Sampled first slots: load-aware score below the exhaustive best (mean).
    regret: Vec<f64>,
    /// Sampled first slots placed on a busy node while an idle node fit.
    stacked: usize,
    /// Mean job-independent score of the nodes chosen.
    mean_score: f64,
}

/// Every `SAMPLE`-th job's first slot is compared with the exhaustive best (outside the
/// timing).
const SAMPLE: usize = 25;

fn run(nodes: usize, jobs: usize, fill: f64, imp: Implementation) -> Run {
    let mut interner = Interner::default();
    let mut rng = Rng(0x5eed ^ nodes as u64);
    let mut snapshot = fleet(nodes, &mut interner, &mut rng);
    // A fleet already busy: each slot taken with probability `fill`.
    let mut fill_rng = Rng(0xf111 ^ nodes as u64);
    for n in &mut snapshot.nodes {
        let taken = (0..n.total_slots)
            .filter(|_| fill_rng.unit() < fill)
            .count() as u32;
        n.free_slots -= taken;
        n.free_cpu_millis -= 1000 * taken as u64;
        n.free_memory_mib -= 2048 * taken as u64;
    }
    let busy_before: Vec<u32> = snapshot
        .nodes
        .iter()
        .map(|n| n.total_slots - n.free_slots)
        .collect();
    let mut rng = Rng(42);
    let requests: Vec<Request> = (0..jobs).map(|_| job(&interner, &mut rng)).collect();
    let mut per_job_us = Vec::with_capacity(jobs);
    let mut slots = 0;
    let mut seconds = 0.0;
    let mut kube = KubeLike {
        next_start: 0,
        parallel: imp == Implementation::KubeLikeParallel,
    };
    let mut regret = Vec::new();
    let mut stacked = 0;
    let mut score_sum = 0.0;
    for (j, r) in requests.iter().enumerate() {
        let sampled = j % SAMPLE == 0;
        let yardstick = sampled.then(|| {
            let best = best_fit(&snapshot, r, &r.used_nodes).map(|b| b.0);
            let idle_fits = (0..snapshot.nodes.len() as u32).any(|id| {
                let n = &snapshot.nodes[id as usize];
                n.free_slots == n.total_slots && check(&snapshot, id, r).is_ok()
            });
            (best, idle_fits)
        });
        let before: Vec<(f64, bool)> = snapshot
            .nodes
            .iter()
            .map(|n| (load_aware_score(n, false), n.free_slots < n.total_slots))
            .take(if sampled { usize::MAX } else { 0 })
            .collect();
        let t = Instant::now();
        let chosen: Vec<u32> = match imp {
            Implementation::Edgeloom => placement::place(&mut snapshot, r)
                .assigned
                .iter()
                .map(|(_, n)| *n)
                .collect(),
            Implementation::KubeLike | Implementation::KubeLikeParallel => {
                kube.place(&mut snapshot, r)
            }
            Implementation::Exhaustive => place_exhaustive(&mut snapshot, r),
        };
        let dt = t.elapsed().as_secs_f64();
        seconds += dt;
        per_job_us.push(dt * 1e6);
        slots += chosen.len();
        score_sum += chosen
            .iter()
            .map(|id| snapshot.nodes[*id as usize].score)
            .sum::<f64>();
        if let (Some((Some(best), idle_fits)), Some(first)) = (yardstick, chosen.first()) {
            let (got, was_busy) = before[*first as usize];
            regret.push((best - got).max(0.0));
            if was_busy && idle_fits {
                stacked += 1;
            }
        }
    }
    let busy: Vec<u32> = snapshot
        .nodes
        .iter()
        .map(|n| n.total_slots - n.free_slots)
        .collect();
    let used: Vec<u32> = busy.iter().copied().filter(|b| *b > 0).collect();
    let _ = busy_before;
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
        regret,
        stacked,
        mean_score: score_sum / slots.max(1) as f64,
    }
}

fn main() {
    let only: Option<usize> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    println!(
        "| nodes | fleet | implementation | jobs | slots placed | placements/s | job p50 (µs) | job p99 (µs) | regret: mean / p99 | first slots stacked while an idle node fit | mean node score | tasks per node: max / mean of busy | ready nodes idle |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for nodes in [1_000usize, 10_000, 100_000] {
        if only.is_some_and(|o| o != nodes) {
            continue;
        }
        for (fill, fleet_name) in [(0.0, "idle"), (0.9, "90% busy")] {
            // Idle: jobs enough to fill about a third of the slots; near full: about
            // what is left.
            let jobs = if fill == 0.0 {
                nodes * 2 / 3 / 3
            } else {
                nodes * 2 / 10 / 3
            };
            for imp in [
                Implementation::Edgeloom,
                Implementation::KubeLike,
                Implementation::KubeLikeParallel,
                Implementation::Exhaustive,
            ] {
                // The references scan many nodes per slot; at 100k nodes they get a tenth
                // of the jobs.
                let jobs = if imp != Implementation::Edgeloom && nodes == 100_000 {
                    jobs / 10
                } else {
                    jobs
                };
                let mut r = run(nodes, jobs, fill, imp);
                println!(
                    "| {nodes} | {fleet_name} | {} | {jobs} | {} | {:.0} | {:.1} | {:.1} | {:.1} / {:.1} | {} of {} | {:.3} | {} / {:.2} | {} |",
                    imp.name(),
                    r.slots,
                    r.slots as f64 / r.seconds,
                    percentile(&mut r.per_job_us, 50.0),
                    percentile(&mut r.per_job_us, 99.0),
                    r.regret.iter().sum::<f64>() / r.regret.len().max(1) as f64,
                    percentile(&mut r.regret, 99.0),
                    r.stacked,
                    r.regret.len(),
                    r.mean_score,
                    r.max_per_node,
                    r.mean_per_busy_node,
                    r.idle_nodes,
                );
            }
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
            "| {nodes} | idle | edgeloom, unplaceable job (reason computed) | 20 | 0 | - | {:.1} | {:.1} | - | - | - | - | - |",
            percentile(&mut fails, 50.0),
            percentile(&mut fails, 99.0)
        );
        eprintln!("snapshot of {nodes} nodes built and sorted in {built_ms:.1} ms");
    }
}
