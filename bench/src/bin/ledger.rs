//! Rewards benchmarks (issue #5).
//!
//! `ledger chain [--receipts N]`: append N receipts to the hash chain (batches of 100, as
//! the operator writes them), encode them as segments (JSON lines), read the segments back
//! and verify the whole chain; rates per second for each step.
//!
//! `ledger store [--receipts N]`: the same through a real kube-apiserver (the operator's
//! LedgerStore writing ConfigMap segments), then a cold load + verify as after a restart.
//!
//! `ledger verification [--nodes N] [--shards N] [--escrow N]`: a simulated fleet with 5%
//! cheaters of seven kinds (`edgeloom_bench::verification`), every shard driven through
//! the operator's own `lifecycle::decide` (commit-reveal, adaptive trust, spot checks,
//! quarantine) in fixed replicas=2 and adaptive mode, printing the share of compute spent
//! on verification, the wrong results accepted and paid after the escrow, and the honest
//! results wrongly rejected.

use anyhow::Result;
use clap::{Parser, Subcommand};
use edgeloom_bench::verification::{Model, Policy, simulate};
use edgeloom_operator::decimal::Amount;
use edgeloom_operator::rewards::ledger::{self, Ledger, Receipt};
use edgeloom_operator::rewards::store::{self as ledger_store, LedgerStore, RawSegment};
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
        shards: u64,
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
        /// Results a node reports after a receipt before it is paid out (0: no escrow).
        #[arg(long, default_value_t = 50)]
        escrow: u64,
        /// Seed of the simulated fleet and draws.
        #[arg(long, default_value_t = 42)]
        seed: u64,
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
        cluster: None,
        forfeits: None,
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

fn verification_bench(n: usize, shards: u64, cheaters_percent: u64, p: Policy, seed: u64) {
    println!(
        "verification: {n} nodes, {cheaters_percent}% cheaters, {shards} shards, replicas 2 (commit-reveal); \
         adaptive: trustThreshold {} (doubled per catch), spotCheckRate {} (decided after the commit), \
         quarantine after {} catch(es) in both modes, maxReplicas 3; escrow: {} results of the node",
        p.threshold, p.spot, p.quarantine_after, p.escrow
    );
    println!(
        "{:<24} {:<9} {:>10} {:>8} {:>8} {:>18} {:>18} {:>9} {:>9} {:>8}",
        "cheaters",
        "mode",
        "executions",
        "overhead",
        "wrong",
        "accepted (share)",
        "paid (share)",
        "pending",
        "honest x",
        "failed"
    );
    for model in Model::ALL {
        for (mode, adaptive) in [("fixed=2", false), ("adaptive", true)] {
            let t = Instant::now();
            let o = simulate(n, shards, cheaters_percent, model, adaptive, p, seed);
            let share = |x: u64| x as f64 / o.wrong.max(1) as f64 * 100.0;
            println!(
                "{:<24} {:<9} {:>10} {:>7.1}% {:>8} {:>8} ({:>6.3}%) {:>8} ({:>6.3}%) {:>9} {:>9} {:>8}   [{:.1} s]",
                model.label(),
                mode,
                o.executions,
                o.overhead() * 100.0,
                o.wrong,
                o.wrong_accepted,
                share(o.wrong_accepted),
                o.wrong_paid,
                share(o.wrong_paid),
                o.wrong_pending,
                o.honest_rejected,
                o.failed,
                t.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "overhead = executions beyond one per shard / all executions; accepted = wrong results a quorum \
         (or a trusted node alone) accepted, what would be paid without escrow; paid = wrong results paid out \
         after the escrow; pending = wrong results still in escrow at the end; honest x = honest results \
         outvoted or rejected"
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
            escrow,
            seed,
        } => verification_bench(
            nodes,
            shards,
            cheaters_percent,
            Policy {
                threshold: trust_threshold,
                spot: spot_check_rate.parse()?,
                quarantine_after,
                escrow,
            },
            seed,
        ),
    }
    Ok(())
}
