//! Rewards benchmarks (issue #5).
//!
//! `ledger chain [--receipts N]`: append N receipts to the hash chain (batches of 100, as
//! the operator writes them), encode them as segments (JSON lines), read the segments back
//! and verify the whole chain; rates per second for each step.
//!
//! `ledger store [--receipts N]`: the same through a real kube-apiserver (the operator's
//! LedgerStore writing ConfigMap segments), then a cold load + verify as after a restart.
//!
//! `ledger verification [--nodes N] [--shards N]`: a simulated fleet with 5% cheaters;
//! fixed replicas=2 against adaptive trust (the operator's pure verification and trust
//! code), printing the share of all compute spent on verification and the share of
//! cheating results that got paid. Cheaters either always cheat or cheat on 20% of their
//! results (the harder case: they can build trust between cheats).

use anyhow::Result;
use clap::{Parser, Subcommand};
use edgeloom_bench::Rng;
use edgeloom_operator::decimal::Amount;
use edgeloom_operator::ledger::{self, Ledger, Receipt};
use edgeloom_operator::ledger_store::{self, LedgerStore, RawSegment};
use edgeloom_operator::trust::{self, Reputation};
use edgeloom_operator::verification::{self, ReplicaResult, Verdict};
use std::time::Instant;

#[derive(Parser)]
struct Flags {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The hash chain in memory and its segment encoding.
    Chain {
        #[arg(long, default_value_t = 100_000)]
        receipts: usize,
    },
    /// The ledger through a real kube-apiserver.
    Store {
        #[arg(long, default_value_t = 100_000)]
        receipts: usize,
    },
    /// (Used by `store`.) Loads the bench ledger and prints the memory it holds.
    #[command(hide = true)]
    Load {
        #[arg(long)]
        kubeconfig: std::path::PathBuf,
    },
    /// Verification overhead: fixed replicas=2 against adaptive trust.
    Verification {
        #[arg(long, default_value_t = 2000)]
        nodes: usize,
        #[arg(long, default_value_t = 500_000)]
        shards: usize,
        /// Share of cheating nodes, in percent.
        #[arg(long, default_value_t = 5)]
        cheaters_percent: u64,
        /// Verified results in a row before a node is trusted.
        #[arg(long, default_value_t = 10)]
        trust_threshold: u32,
        /// Spot-check rate of trusted nodes' shards.
        #[arg(long, default_value = "0.1")]
        spot_check_rate: String,
        /// Catches after which a node gets no more work (0: never; the pool default is 2).
        #[arg(long, default_value_t = 2)]
        quarantine_after: u64,
    },
}

fn receipt(i: usize) -> Receipt {
    Receipt {
        job_uid: format!("{:08x}-0000-4000-8000-{:012x}", i / 100, i / 100),
        job: format!("team-{}/job-{}", i % 7, i / 100),
        shard: (i % 100) as u32,
        replica: 0,
        attempt: 1,
        node: format!("edge-node-{}", i % 997),
        account: format!("acct-{}", i % 331),
        cpu_core_millis: 1000 + (i as u64 % 5000),
        gpu_millis: i as u64 % 3000,
        per_cpu_core_second: "0.0001".into(),
        per_gpu_second: "0.001".into(),
        speed_factor_milli: 1000,
        amount: Amount::from_atto(123_456_789_000_000 + i as u128).to_string(),
        result_digest: format!("{:064x}", i),
        time: "2026-11-25T00:00:00Z".into(),
    }
}

fn chain(n: usize) {
    let receipts: Vec<Receipt> = (0..n).map(receipt).collect();
    let mut l = Ledger::default();
    let t = Instant::now();
    for batch in receipts.chunks(100) {
        let prepared = l.prepare(batch.to_vec());
        l.commit(prepared).expect("commit");
    }
    let append = t.elapsed();
    let t = Instant::now();
    let segments: Vec<RawSegment> = l
        .entries()
        .chunks(ledger_store::SEGMENT_ENTRIES)
        .enumerate()
        .map(|(i, c)| RawSegment {
            name: ledger_store::segment_name("bench", i),
            index: i,
            data: c
                .iter()
                .map(|e| serde_json::to_string(e).expect("json") + "\n")
                .collect(),
        })
        .collect();
    let encode = t.elapsed();
    let bytes: usize = segments.iter().map(|s| s.data.len()).sum();
    let largest = segments.iter().map(|s| s.data.len()).max().unwrap_or(0);
    let t = Instant::now();
    let (entries, _) = ledger_store::parse_segments(segments).expect("verifies");
    let load = t.elapsed();
    let t = Instant::now();
    ledger::verify(&entries).expect("verifies");
    let verify = t.elapsed();
    // Reference: only the work every hash chain must do, sha256 over each receipt's JSON.
    let t = Instant::now();
    let mut acc = 0u8;
    for r in &receipts {
        acc ^= ledger::entry_hash(0, ledger::GENESIS, r).as_bytes()[0];
    }
    let floor = t.elapsed();
    std::hint::black_box(acc);
    let rate = |d: std::time::Duration| n as f64 / d.as_secs_f64();
    println!("ledger chain: {n} receipts, batches of 100");
    println!(
        "  reference: sha256 of each receipt's JSON only  {:>12.0} receipts/s  ({:.3} s)",
        rate(floor),
        floor.as_secs_f64()
    );
    println!(
        "  append (prepare + commit)     {:>12.0} receipts/s  ({:.3} s)",
        rate(append),
        append.as_secs_f64()
    );
    println!(
        "  encode segments (JSON lines)  {:>12.0} receipts/s  ({:.3} s)",
        rate(encode),
        encode.as_secs_f64()
    );
    println!(
        "  parse segments + verify       {:>12.0} receipts/s  ({:.3} s)",
        rate(load),
        load.as_secs_f64()
    );
    println!(
        "  verify (hashes only)          {:>12.0} receipts/s  ({:.3} s)",
        rate(verify),
        verify.as_secs_f64()
    );
    println!(
        "  {} segments, {:.1} MiB in all, largest {:.0} KiB (etcd object limit 1.5 MiB)",
        n.div_ceil(ledger_store::SEGMENT_ENTRIES),
        bytes as f64 / 1048576.0,
        largest as f64 / 1024.0
    );
}

async fn store(n: usize) -> Result<()> {
    eprintln!("starting a hub kube-apiserver ...");
    let plane = edgeloom_e2e::ControlPlane::start(edgeloom_e2e::Config {
        members: vec![],
        nodes_per_member: 0,
        controller_manager: false,
        ..edgeloom_e2e::Config::default()
    })
    .await?;
    let client = plane.hub().client().await?;
    edgeloom_e2e::federation::ensure_namespace(&client, "edgeloom-system").await?;
    let store = LedgerStore::new(client.clone(), "edgeloom-system", "bench");
    let receipts: Vec<Receipt> = (0..n).map(receipt).collect();
    let t = Instant::now();
    for (i, batch) in receipts.chunks(100).enumerate() {
        store.append(batch.to_vec(), None).await?;
        if i % 200 == 199 {
            eprintln!("  {} receipts written", (i + 1) * 100);
        }
    }
    let append = t.elapsed();
    // Idempotence costs: the same receipts again write nothing.
    let t = Instant::now();
    let again = store.append(receipts[..100].to_vec(), None).await?;
    let dup = t.elapsed();
    assert!(again.written.is_empty() && again.refused.is_empty());
    let t = Instant::now();
    let cold = LedgerStore::new(client, "edgeloom-system", "bench");
    let summary = cold.summary().await?;
    let load = t.elapsed();
    drop(cold);
    // The memory a loaded store holds, measured in a fresh process (this one's allocator
    // still holds what the writes used).
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("load")
        .arg("--kubeconfig")
        .arg(&plane.hub().kubeconfig)
        .output()?;
    let memory = String::from_utf8_lossy(&out.stdout).trim().to_string();
    println!(
        "ledger store: {n} receipts through kube-apiserver (ConfigMap segments), batches of 100"
    );
    println!(
        "  append            {:>10.0} receipts/s  ({:.1} s, {:.1} ms per batch write)",
        n as f64 / append.as_secs_f64(),
        append.as_secs_f64(),
        append.as_secs_f64() * 1000.0 / n.div_ceil(100) as f64
    );
    println!(
        "  duplicate batch   {:>10.1} ms (nothing written)",
        dup.as_secs_f64() * 1000.0
    );
    println!(
        "  cold load+verify  {:>10.0} receipts/s  ({:.2} s; {} receipts, head {}...)",
        n as f64 / load.as_secs_f64(),
        load.as_secs_f64(),
        summary.totals.receipts,
        &summary.head[..12]
    );
    println!("  {memory}");
    drop(plane);
    Ok(())
}

/// Resident memory of this process in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Node {
    cheater: bool,
    /// Chance of a wrong result, for cheaters.
    cheat_rate: f64,
}

#[derive(Default)]
struct Outcome {
    executions: u64,
    cheats: u64,
    cheats_paid: u64,
    honest_unpaid: u64,
    failed: u64,
}

/// One shard: runs `replicas` distinct nodes (more on disagreement, up to 3), returns
/// which results were paid.
fn run_shard(
    nodes: &[Node],
    rng: &mut Rng,
    first: usize,
    replicas: u32,
    rep: &mut Reputation,
    out: &mut Outcome,
    shard_id: u64,
) {
    let mut picked = vec![first];
    let mut results: Vec<ReplicaResult> = Vec::new();
    let mut wrong: Vec<bool> = Vec::new();
    let run = |node: usize, rng: &mut Rng, replica: u32| {
        let n = &nodes[node];
        let cheat = n.cheater && rng.unit() < n.cheat_rate;
        // Cheaters do not collude: each wrong result is different.
        let digest = if cheat {
            format!("bad-{shard_id}-{node}")
        } else {
            format!("ok-{shard_id}")
        };
        (
            ReplicaResult {
                replica,
                digest,
                vector: vec![],
            },
            cheat,
        )
    };
    while picked.len() < replicas as usize {
        let n = loop {
            let n = rng.below(nodes.len() as u64) as usize;
            if !picked.contains(&n) {
                break n;
            }
        };
        picked.push(n);
    }
    for (i, n) in picked.iter().enumerate() {
        let (r, c) = run(*n, rng, i as u32);
        results.push(r);
        wrong.push(c);
    }
    let quorum = if replicas == 1 {
        1
    } else {
        verification::majority(replicas)
    };
    loop {
        let slots = results.len() as u32;
        match verification::decide(&results, 0, slots, quorum, 0.0, 3.max(replicas)) {
            Verdict::Accepted {
                agreeing,
                dissenting,
                ..
            } => {
                for r in &agreeing {
                    let i = *r as usize;
                    if wrong[i] {
                        out.cheats_paid += 1;
                    }
                    if agreeing.len() >= 2 {
                        rep.record_valid(&picked[i].to_string(), None);
                    }
                }
                for r in &dissenting {
                    let i = *r as usize;
                    if !wrong[i] {
                        out.honest_unpaid += 1;
                    }
                    rep.record_caught(&picked[i].to_string(), &format!("{shard_id}/{r}"));
                }
                break;
            }
            Verdict::Pending { more } => {
                for _ in 0..more {
                    let n = loop {
                        let n = rng.below(nodes.len() as u64) as usize;
                        if !picked.contains(&n) {
                            break n;
                        }
                    };
                    picked.push(n);
                    let (r, c) = run(n, rng, results.len() as u32);
                    results.push(r);
                    wrong.push(c);
                }
            }
            Verdict::Rejected { .. } => {
                out.failed += 1;
                break;
            }
        }
    }
    out.executions += picked.len() as u64;
    out.cheats += wrong.iter().filter(|w| **w).count() as u64;
}

#[derive(Clone, Copy)]
struct Policy {
    threshold: u32,
    spot: Amount,
    quarantine_after: u64,
}

fn simulate(nodes: &[Node], shards: usize, adaptive: bool, seed: u64, p: Policy) -> Outcome {
    let mut rng = Rng(seed);
    let mut rep = Reputation {
        salt: "bench-salt".into(),
        ..Reputation::default()
    };
    let threshold = p.threshold;
    let spot = p.spot;
    let mut out = Outcome::default();
    for s in 0..shards as u64 {
        let first = loop {
            let n = rng.below(nodes.len() as u64) as usize;
            if !(adaptive
                && p.quarantine_after > 0
                && rep
                    .nodes
                    .get(&n.to_string())
                    .is_some_and(|r| r.caught >= p.quarantine_after))
            {
                break n;
            }
        };
        let replicas = if adaptive
            && rep.trusted(&first.to_string(), threshold)
            && !trust::spot_checked(&rep.salt, "job", s as u32, spot)
        {
            1
        } else {
            2
        };
        run_shard(nodes, &mut rng, first, replicas, &mut rep, &mut out, s);
    }
    out
}

fn verification_bench(n: usize, shards: usize, cheaters_percent: u64, p: Policy) {
    println!(
        "verification overhead: {n} nodes, {cheaters_percent}% cheaters (non-colluding), {shards} shards; \
         adaptive: trustThreshold {} (doubled per catch), spotCheckRate {}, quarantine after {} catch(es) (0 = never), maxReplicas 3",
        p.threshold, p.spot, p.quarantine_after
    );
    println!(
        "{:<26} {:<9} {:>11} {:>16} {:>12} {:>14} {:>8}",
        "cheaters", "mode", "executions", "verif. share", "cheats", "cheats paid", "failed"
    );
    for (label, rate) in [("always cheat", 1.0), ("cheat on 20% of results", 0.2)] {
        let mut rng = Rng(7);
        let nodes: Vec<Node> = (0..n)
            .map(|_| Node {
                cheater: rng.below(100) < cheaters_percent,
                cheat_rate: rate,
            })
            .collect();
        for (mode, adaptive) in [("fixed=2", false), ("adaptive", true)] {
            let t = Instant::now();
            let o = simulate(&nodes, shards, adaptive, 42, p);
            let share = (o.executions - shards as u64) as f64 / o.executions as f64;
            println!(
                "{:<26} {:<9} {:>11} {:>15.1}% {:>12} {:>8} ({:.5}) {:>8}   [{:.1} s]",
                label,
                mode,
                o.executions,
                share * 100.0,
                o.cheats,
                o.cheats_paid,
                o.cheats_paid as f64 / o.cheats.max(1) as f64,
                o.failed,
                t.elapsed().as_secs_f64()
            );
            let _ = o.honest_unpaid;
        }
    }
    println!(
        "verif. share = executions beyond one per shard / all executions; cheats paid = wrong results accepted and paid (share of all wrong results)"
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    match Flags::parse().cmd {
        Cmd::Chain { receipts } => chain(receipts),
        Cmd::Store { receipts } => store(receipts).await?,
        Cmd::Load { kubeconfig } => {
            let client = edgeloom_e2e::control_plane::client_for("hub", &kubeconfig).await?;
            client.apiserver_version().await?;
            // Load once to warm the allocator up (the listed JSON is large and transient),
            // then a second store: the RSS it adds is what a loaded store keeps.
            let warm = LedgerStore::new(client.clone(), "edgeloom-system", "bench");
            warm.summary().await?;
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe { libc::malloc_trim(0) };
            let before = rss_kib();
            let store = LedgerStore::new(client, "edgeloom-system", "bench");
            let summary = store.summary().await?;
            // SAFETY: as above.
            unsafe { libc::malloc_trim(0) };
            let after = rss_kib();
            println!(
                "memory a loaded store keeps: {:.1} MiB RSS for {} receipts (receipts stay in the API; the operator keeps keys, head, totals and the open segment)",
                after.saturating_sub(before) as f64 / 1024.0,
                summary.totals.receipts
            );
            drop(warm);
        }
        Cmd::Verification {
            nodes,
            shards,
            cheaters_percent,
            trust_threshold,
            spot_check_rate,
            quarantine_after,
        } => verification_bench(
            nodes,
            shards,
            cheaters_percent,
            Policy {
                threshold: trust_threshold,
                spot: spot_check_rate.parse()?,
                quarantine_after,
            },
        ),
    }
    Ok(())
}
