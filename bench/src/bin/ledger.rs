//! Rewards benchmarks (issue #5).
//!
//! `ledger chain [--receipts N]`: append N receipts to the hash chain (batches of 100, as
//! the operator writes them), encode them as JSON lines, parse them back and verify the
//! whole chain; rates per second for each step.
//!
//! `ledger store [--receipts N] [--single N]`: the operator's LedgerStore on a real S3
//! server (SeaweedFS, from install-tools): N receipts appended 100 per batch, then `single`
//! more one per batch (what a busy pool does); a duplicate batch; then, each in a fresh
//! process, a restart (load from the signed checkpoint's snapshot) and a full load that
//! reads and verifies every receipt, with the memory each keeps.
//!
//! `ledger verification [--nodes N] [--shards N] [--escrow N]`: a simulated fleet with 5%
//! cheaters of seven kinds (`edgeloom_bench::verification`), every shard driven through
//! the operator's own `lifecycle::decide` (commit-reveal, adaptive trust, spot checks,
//! quarantine) in fixed replicas=2 and adaptive mode, printing the share of compute spent
//! on verification, the wrong results accepted and paid after the escrow, and the honest
//! results wrongly rejected.

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use edgeloom_bench::verification::{Model, Policy, simulate};
use edgeloom_operator::decimal::Amount;
use edgeloom_operator::rewards::backend::StoreConfig;
use edgeloom_operator::rewards::ledger::{self, Ledger, Receipt};
use edgeloom_operator::rewards::merkle::{self, Checkpoint};
use edgeloom_operator::rewards::objects::{LedgerStore, SnapshotRef};
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
    /// The ledger on a real S3 server (SeaweedFS).
    Store {
        /// Receipts appended 100 per batch.
        #[arg(long, default_value_t = 1_000_000)]
        receipts: usize,
        /// Receipts appended after those, one per batch.
        #[arg(long, default_value_t = 2_000)]
        single: usize,
    },
    /// (Used by `store`.) Loads the bench ledger in this fresh process and prints the time
    /// and the memory it keeps.
    #[command(hide = true)]
    Load {
        /// The store's settings, as JSON (url, endpoint, keys).
        #[arg(long)]
        store: String,
        /// The signed checkpoint, as JSON.
        #[arg(long)]
        checkpoint: String,
        /// The snapshot to start from: size:sha256 (none: read every receipt).
        #[arg(long)]
        snapshot: Option<String>,
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
        // One receipt a second: the hour in escrow holds 3,600 of them.
        time: (jiff::Timestamp::from_second(1_795_000_000).expect("time")
            + jiff::SignedDuration::from_secs(i as i64))
        .to_string(),
        cluster: None,
        forfeits: None,
        round: None,
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
    let text: String = l
        .entries()
        .iter()
        .map(|e| serde_json::to_string(e).expect("json") + "\n")
        .collect();
    let encode = t.elapsed();
    let bytes = text.len();
    let t = Instant::now();
    let entries: Vec<ledger::Entry> = text
        .lines()
        .map(|line| serde_json::from_str(line).expect("entry"))
        .collect();
    ledger::verify(&entries).expect("verifies");
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
        "  encode (JSON lines)           {:>12.0} receipts/s  ({:.3} s)",
        rate(encode),
        encode.as_secs_f64()
    );
    println!(
        "  parse + verify                {:>12.0} receipts/s  ({:.3} s)",
        rate(load),
        load.as_secs_f64()
    );
    println!(
        "  verify (hashes only)          {:>12.0} receipts/s  ({:.3} s)",
        rate(verify),
        verify.as_secs_f64()
    );
    println!(
        "  {:.1} MiB of JSON lines ({:.0} bytes a receipt)",
        bytes as f64 / 1048576.0,
        bytes as f64 / n as f64
    );
}

async fn store(n: usize, single: usize) -> Result<()> {
    eprintln!("starting SeaweedFS (S3 on 127.0.0.1:8333) ...");
    let dir = std::env::temp_dir().join(format!("edgeloom-bench-s3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = edgeloom_e2e::s3::S3Server::start(&dir).map_err(anyhow::Error::msg)?;
    let data = server.secret_data("bench");
    let config = StoreConfig::from_data(&data).map_err(anyhow::Error::msg)?;
    let backend = config.open().map_err(anyhow::Error::msg)?;
    let store = LedgerStore::new(backend.store.clone(), &backend.root, "bench");
    let total = n + single;
    let receipts: Vec<Receipt> = (0..total).map(receipt).collect();
    let t = Instant::now();
    for (i, batch) in receipts[..n].chunks(100).enumerate() {
        store.append(batch.to_vec(), None).await?;
        if i % 1000 == 999 {
            eprintln!(
                "  {} receipts written ({:.0}/s)",
                (i + 1) * 100,
                ((i + 1) * 100) as f64 / t.elapsed().as_secs_f64()
            );
        }
    }
    let append100 = t.elapsed();
    let t = Instant::now();
    for r in &receipts[n..] {
        store.append(vec![r.clone()], None).await?;
    }
    let append1 = t.elapsed();
    // Idempotence costs: the same receipts again write nothing. A recent job's totals are
    // in memory; the first job's were evicted long ago and are summed again from the log.
    let t = Instant::now();
    let again = store.append(receipts[n - 100..n].to_vec(), None).await?;
    let dup = t.elapsed();
    assert!(again.written.is_empty() && again.refused.is_empty());
    let t = Instant::now();
    let again = store.append(receipts[..100].to_vec(), None).await?;
    let dup_old = t.elapsed();
    assert!(again.written.is_empty() && again.refused.is_empty());
    let summary = store.summary().await?;
    assert_eq!(summary.size, total as u64);
    let key = merkle::new_key().map_err(anyhow::Error::msg)?;
    let cp = Checkpoint::sign(
        &key,
        "bench",
        summary.size,
        &summary.root,
        &jiff::Timestamp::now().to_string(),
    );
    drop(store);
    let load = |snapshot: Option<&SnapshotRef>| -> Result<String> {
        let mut cmd = std::process::Command::new(std::env::current_exe()?);
        cmd.arg("load")
            .arg("--store")
            .arg(serde_json::to_string(&data)?)
            .arg("--checkpoint")
            .arg(serde_json::to_string(&cp)?);
        if let Some(s) = snapshot {
            cmd.arg("--snapshot")
                .arg(format!("{}:{}", s.size, s.sha256));
        }
        let out = cmd.output()?;
        anyhow::ensure!(
            out.status.success(),
            "load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let restart = load(summary.snapshot.as_ref())?;
    let full = load(None)?;
    // References, same server: what any S3-backed log must do at least. A plain put of one
    // receipt's JSON line per request (no checks, no conditional put); and reading back
    // every object of the log without parsing or verifying it.
    let line = serde_json::to_string(&receipts[0])? + "\n";
    let t = Instant::now();
    for i in 0..single {
        let p = object_store::path::Path::from(format!("reference/{i:012}.jsonl"));
        backend
            .store
            .put_opts(&p, line.clone().into(), Default::default())
            .await?;
    }
    let ref_put = t.elapsed();
    let t = Instant::now();
    let mut ref_bytes = 0u64;
    {
        use futures::{StreamExt, TryStreamExt};
        let prefix = object_store::path::Path::from("bench/ledger/bench/entries");
        let metas: Vec<_> = backend.store.list(Some(&prefix)).try_collect().await?;
        let store = backend.store.clone();
        let mut gets = futures::stream::iter(metas.into_iter().map(|m| {
            let store = store.clone();
            async move {
                store
                    .get_opts(&m.location, Default::default())
                    .await?
                    .bytes()
                    .await
            }
        }))
        .buffered(8);
        while let Some(b) = gets.next().await {
            ref_bytes += b?.len() as u64;
        }
    }
    let ref_get = t.elapsed();
    let mut objects = 0usize;
    let mut bytes = 0u64;
    {
        use futures::TryStreamExt;
        let all: Vec<_> = backend.store.list(None).try_collect().await?;
        for m in all {
            objects += 1;
            bytes += m.size;
        }
    }
    println!(
        "ledger store: {total} receipts in SeaweedFS (S3, create-only puts, packs of 1,000, a snapshot every 10,000)"
    );
    println!(
        "  append, 100 per batch  {:>10.0} receipts/s  ({:.1} s, {:.2} ms per batch)",
        n as f64 / append100.as_secs_f64(),
        append100.as_secs_f64(),
        append100.as_secs_f64() * 1000.0 / n.div_ceil(100) as f64
    );
    println!(
        "  append, 1 per batch    {:>10.0} receipts/s  ({:.1} s for {single}, {:.2} ms each)",
        single as f64 / append1.as_secs_f64(),
        append1.as_secs_f64(),
        append1.as_secs_f64() * 1000.0 / single.max(1) as f64
    );
    println!(
        "  duplicate batch        {:>10.1} ms (nothing written; {:.0} ms for a job evicted from memory, summed again from the log)",
        dup.as_secs_f64() * 1000.0,
        dup_old.as_secs_f64() * 1000.0
    );
    println!(
        "  {objects} objects, {:.1} MiB in the bucket; snapshot at {} entries",
        bytes as f64 / 1048576.0,
        summary.snapshot.as_ref().map_or(0, |s| s.size)
    );
    println!("  restart (from the snapshot): {restart}");
    println!("  full load + verify:          {full}");
    println!(
        "  reference: plain put of one receipt per request  {:>8.0} receipts/s ({:.2} ms each)",
        single as f64 / ref_put.as_secs_f64(),
        ref_put.as_secs_f64() * 1000.0 / single.max(1) as f64
    );
    println!(
        "  reference: read every entry object, no parsing    {:>8.0} receipts/s ({:.2} s, {:.1} MiB)",
        total as f64 / ref_get.as_secs_f64(),
        ref_get.as_secs_f64(),
        ref_bytes as f64 / 1048576.0
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `load`: one cold load in this process; prints its time and the memory it keeps.
async fn load(store: &str, checkpoint: &str, snapshot: Option<String>) -> Result<()> {
    let data: std::collections::BTreeMap<String, String> = serde_json::from_str(store)?;
    let backend = StoreConfig::from_data(&data)
        .map_err(anyhow::Error::msg)?
        .open()
        .map_err(anyhow::Error::msg)?;
    let cp: Checkpoint = serde_json::from_str(checkpoint)?;
    let snapshot = snapshot
        .map(|s| -> Result<SnapshotRef> {
            let (size, sha256) = s.split_once(':').context("size:sha256")?;
            Ok(SnapshotRef {
                size: size.parse()?,
                sha256: sha256.to_string(),
            })
        })
        .transpose()?;
    let from = snapshot.as_ref().map_or(0, |s| s.size);
    let before = rss_kib();
    let t = Instant::now();
    let store = LedgerStore::new(backend.store.clone(), &backend.root, "bench");
    store.set_anchor(Some(cp.clone()), snapshot).await;
    let summary = store.summary().await?;
    let took = t.elapsed();
    anyhow::ensure!(
        summary.size == cp.size && summary.root == cp.root_hash().map_err(anyhow::Error::msg)?
    );
    let peak = peak_rss_kib();
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
    let after = rss_kib();
    let read = cp.size - from;
    println!(
        "{:.2} s, {} receipts read and verified ({:.0}/s), checkpoint root matches; RSS {:.1} MiB with the ledger loaded ({:.1} MiB for the ledger, peak {:.1} MiB)",
        took.as_secs_f64(),
        read,
        read as f64 / took.as_secs_f64(),
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    drop(store);
    Ok(())
}

/// Peak resident memory of this process in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
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
        Cmd::Store { receipts, single } => store(receipts, single).await?,
        Cmd::Load {
            store,
            checkpoint,
            snapshot,
        } => load(&store, &checkpoint, snapshot).await?,
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
