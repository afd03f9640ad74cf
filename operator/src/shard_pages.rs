//! A big job's shard status in pages (docs/ARCHITECTURE.md, "Bounded status").
//!
//! A job's status holds one entry per slot (shard x replica), a few hundred bytes each,
//! and the API server refuses objects above 1.5 MiB: a 10,000-shard job would not fit.
//! Past `--status-inline-slots` slots the operator writes every slot's status to
//! ConfigMaps in its own namespace (pages of at most [`PAGE_SLOTS`]), and the job's
//! status keeps the pages' names and hashes, every slot's highest attempt as runs (the
//! scheduler's fence needs them), and at most [`SHOWN_SLOTS`] slots not finished for
//! people to read. Nothing the lifecycle remembers is lost: it reads the pages back
//! (cached by hash) and decides on every slot as before.

use crate::lifecycle;
use edgeloom_crds::TaskPhase;
use edgeloom_crds::compute_job::{ComputeJobStatus, ShardPage, ShardStatus};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Slots per page: at most about 1 KiB each with every agent-written field at its
/// schema bound, so a page stays below the 1 MiB a ConfigMap may hold.
pub const PAGE_SLOTS: usize = 500;
/// Slots not finished that a paged job's status still shows.
pub const SHOWN_SLOTS: usize = 50;
/// Slots one shard may have (verification replicas are at most 9).
const SLOTS_PER_SHARD: usize = 9;
/// Pages one job may have (the schema's bound on `status.shardPages`).
const MAX_PAGES: usize = 1000;
/// Slots a job's status holds itself, by default.
pub const DEFAULT_INLINE_SLOTS: usize = 500;
/// The ConfigMap key of a page.
pub const PAGE_KEY: &str = "shards.json";
/// The most slots a job can have (10,000 shards x 9 replicas): a longer attempts text
/// is refused rather than expanded.
const MAX_SLOTS: u64 = 90_000;

/// The name of page `i` of job `uid`.
pub fn page_name(uid: &str, i: usize) -> String {
    format!("edgeloom-shards-{}-{i}", lifecycle::task_prefix(uid))
}

fn hash16(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Every slot's attempt (those above 0) as runs of consecutive shards of one replica,
/// joined by commas: `<replica>:<first>-<last>=<attempt>` where they share an attempt,
/// `<replica>:<first>=<attempt>.<attempt>...` listing one attempt per shard otherwise.
pub fn encode_attempts(shards: &[ShardStatus]) -> String {
    let mut by_replica: BTreeMap<u32, BTreeMap<u32, u32>> = BTreeMap::new();
    for s in shards.iter().filter(|s| s.attempt > 0) {
        let e = by_replica
            .entry(s.replica)
            .or_default()
            .entry(s.index)
            .or_default();
        *e = (*e).max(s.attempt);
    }
    let mut runs: Vec<String> = Vec::new();
    for (replica, shards) in by_replica {
        // Consecutive shards, then within them stretches of one attempt.
        let mut block: Vec<(u32, u32)> = Vec::new();
        let mut blocks: Vec<Vec<(u32, u32)>> = Vec::new();
        for (index, attempt) in shards {
            if block.last().is_some_and(|(i, _)| i + 1 != index) {
                blocks.push(std::mem::take(&mut block));
            }
            block.push((index, attempt));
        }
        blocks.push(block);
        for block in blocks.into_iter().filter(|b| !b.is_empty()) {
            let mut listed: Vec<(u32, u32)> = Vec::new();
            let flush_listed = |listed: &mut Vec<(u32, u32)>, runs: &mut Vec<String>| {
                if let Some((first, _)) = listed.first() {
                    let attempts: Vec<String> = listed.iter().map(|(_, a)| a.to_string()).collect();
                    runs.push(format!("{replica}:{first}={}", attempts.join(".")));
                    listed.clear();
                }
            };
            let mut i = 0;
            while i < block.len() {
                let mut j = i;
                while j + 1 < block.len() && block[j + 1].1 == block[i].1 {
                    j += 1;
                }
                if j - i >= 2 {
                    flush_listed(&mut listed, &mut runs);
                    runs.push(format!(
                        "{replica}:{}-{}={}",
                        block[i].0, block[j].0, block[i].1
                    ));
                } else {
                    listed.extend_from_slice(&block[i..=j]);
                }
                i = j + 1;
            }
            flush_listed(&mut listed, &mut runs);
        }
    }
    runs.join(",")
}

/// Calls `each(shard, replica, attempt)` for every slot in an attempts text.
pub fn decode_attempts(text: &str, mut each: impl FnMut(u32, u32, u32)) -> Result<(), String> {
    let mut total: u64 = 0;
    for run in text.split(',').filter(|r| !r.is_empty()) {
        let bad = || format!("slot attempts: bad run {run:?}");
        let (replica, rest) = run.split_once(':').ok_or_else(bad)?;
        let (range, attempts) = rest.split_once('=').ok_or_else(bad)?;
        let parse = |s: &str| s.parse::<u32>().map_err(|_| bad());
        let replica = parse(replica)?;
        match range.split_once('-') {
            Some((first, last)) => {
                let (first, last, attempt) = (parse(first)?, parse(last)?, parse(attempts)?);
                if last < first {
                    return Err(bad());
                }
                total += u64::from(last - first) + 1;
                if total > MAX_SLOTS {
                    return Err(format!("slot attempts: more than {MAX_SLOTS} slots"));
                }
                for shard in first..=last {
                    each(shard, replica, attempt);
                }
            }
            None => {
                let first = parse(range)?;
                for (k, a) in attempts.split('.').enumerate() {
                    total += 1;
                    if total > MAX_SLOTS {
                        return Err(format!("slot attempts: more than {MAX_SLOTS} slots"));
                    }
                    let shard = first.checked_add(k as u32).ok_or_else(bad)?;
                    each(shard, replica, parse(a)?);
                }
            }
        }
    }
    Ok(())
}

/// A page to write: its reference, its slots and their JSON.
pub struct Page {
    /// As the job's status names it.
    pub reference: ShardPage,
    /// Its slots.
    pub slots: Arc<Vec<ShardStatus>>,
    /// Their JSON (the ConfigMap's [`PAGE_KEY`]).
    pub json: String,
}

/// Shards per page: a page holds a fixed range of shards, all their slots (so a slot
/// never moves to another page when a shard gains replicas), at most [`PAGE_SLOTS`]
/// slots with every shard at its most replicas, and a job has at most [`MAX_PAGES`].
pub fn shards_per_page(inline: usize, shards: usize) -> usize {
    (PAGE_SLOTS.min(inline) / SLOTS_PER_SHARD)
        .max(shards.div_ceil(MAX_PAGES))
        .max(1)
}

/// The status to write for `full` (every slot): itself when it has at most `inline`
/// slots, else the paged form and its pages (see [`shards_per_page`]).
pub fn page_out(
    full: &ComputeJobStatus,
    uid: &str,
    inline: usize,
) -> (ComputeJobStatus, Vec<Page>) {
    let mut written = full.clone();
    written.shard_pages.clear();
    written.slot_attempts = None;
    if full.shards.len() <= inline {
        return (written, Vec::new());
    }
    let mut sorted = full.shards.clone();
    sorted.sort_by_key(|s| (s.index, s.replica));
    let shards = sorted.last().map_or(0, |s| s.index as usize + 1);
    let per_page = shards_per_page(inline, shards);
    let mut ranges: BTreeMap<usize, Vec<ShardStatus>> = BTreeMap::new();
    for s in &sorted {
        ranges
            .entry(s.index as usize / per_page)
            .or_default()
            .push(s.clone());
    }
    let pages: Vec<Page> = ranges
        .into_iter()
        .map(|(i, chunk)| {
            let json = serde_json::to_string(&chunk).unwrap_or_default();
            Page {
                reference: ShardPage {
                    name: page_name(uid, i),
                    hash: hash16(&json),
                    slots: chunk.len() as u32,
                },
                slots: Arc::new(chunk),
                json,
            }
        })
        .collect();
    written.shards = sorted
        .iter()
        .filter(|s| {
            !matches!(
                s.phase,
                TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::Cancelled
            )
        })
        .take(SHOWN_SLOTS)
        .cloned()
        .collect();
    written.shard_pages = pages.iter().map(|p| p.reference.clone()).collect();
    written.slot_attempts = Some(encode_attempts(&sorted));
    (written, pages)
}

/// The full status from a written one and its pages, in order (None: a page that is
/// missing or unreadable). Pages win over the shown slots (after a crash between
/// writing the pages and the status they are the newer). Every slot keeps at least the
/// attempt `slotAttempts` records for it, whatever the pages say (a page missing, or
/// older or newer than the status after a crash): no attempt is ever issued twice. A
/// slot in no page keeps only that attempt of what the operator remembered of it.
pub fn page_in(
    written: &ComputeJobStatus,
    pages: &[Option<Arc<Vec<ShardStatus>>>],
) -> ComputeJobStatus {
    let mut full = written.clone();
    if written.shard_pages.is_empty() {
        return full;
    }
    let mut slots: BTreeMap<(u32, u32), ShardStatus> = BTreeMap::new();
    for page in pages.iter().flatten() {
        for s in page.iter() {
            slots.insert((s.index, s.replica), s.clone());
        }
    }
    for s in &written.shards {
        slots
            .entry((s.index, s.replica))
            .or_insert_with(|| s.clone());
    }
    if let Some(text) = &written.slot_attempts {
        let _ = decode_attempts(text, |shard, replica, attempt| {
            let e = slots
                .entry((shard, replica))
                .or_insert_with(|| ShardStatus::unplaced(shard, replica, attempt));
            e.attempt = e.attempt.max(attempt);
        });
    }
    full.shards = slots.into_values().collect();
    full
}

/// A page's slots, shared between the cache and a reconcile.
pub type Slots = Arc<Vec<ShardStatus>>;

/// Pages read or written by this process, by name: (hash, slots).
#[derive(Default)]
pub struct PageCache(Mutex<HashMap<String, (String, Slots)>>);

impl PageCache {
    /// The page `name` if it is cached with `hash`.
    pub fn get(&self, name: &str, hash: &str) -> Option<Arc<Vec<ShardStatus>>> {
        let c = self.0.lock().ok()?;
        c.get(name)
            .filter(|(h, _)| h == hash)
            .map(|(_, s)| s.clone())
    }

    /// Remembers page `name`.
    pub fn put(&self, name: &str, hash: &str, slots: Arc<Vec<ShardStatus>>) {
        if let Ok(mut c) = self.0.lock() {
            c.insert(name.to_string(), (hash.to_string(), slots));
        }
    }

    /// Forgets page `name`.
    pub fn forget_page(&self, name: &str) {
        if let Ok(mut c) = self.0.lock() {
            c.remove(name);
        }
    }

    /// Forgets the pages of job `uid`.
    pub fn forget(&self, uid: &str) {
        let prefix = format!("edgeloom-shards-{}-", lifecycle::task_prefix(uid));
        if let Ok(mut c) = self.0.lock() {
            c.retain(|name, _| !name.starts_with(&prefix));
        }
    }

    /// The hash of a page's JSON, as [`page_out`] computes it.
    pub fn hash_of(json: &str) -> String {
        hash16(json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(index: u32, replica: u32, attempt: u32, phase: TaskPhase) -> ShardStatus {
        ShardStatus {
            cluster: "edge-a".into(),
            node: if attempt > 0 {
                "n0".into()
            } else {
                String::new()
            },
            phase,
            ..ShardStatus::unplaced(index, replica, attempt)
        }
    }

    #[test]
    fn attempts_round_trip_as_runs() {
        let mut shards = Vec::new();
        for i in 0..10_000 {
            shards.push(slot(i, 0, 1, TaskPhase::Succeeded));
        }
        shards[17].attempt = 3;
        shards.push(slot(5, 1, 2, TaskPhase::Running));
        shards.push(slot(6, 1, 2, TaskPhase::Running));
        shards.push(slot(8, 1, 0, TaskPhase::Pending));
        let text = encode_attempts(&shards);
        assert_eq!(text, "0:0-16=1,0:17=3,0:18-9999=1,1:5=2.2");
        // Alternating attempts are listed, not ranged.
        let alternating: Vec<ShardStatus> = (0..6)
            .map(|i| slot(i, 2, 1 + i % 2, TaskPhase::Running))
            .collect();
        assert_eq!(encode_attempts(&alternating), "2:0=1.2.1.2.1.2");
        let mut back = Vec::new();
        decode_attempts("2:0=1.2.1.2.1.2,3:7-9=4", |s, r, a| back.push((s, r, a)))
            .expect("decodes");
        assert_eq!(
            back,
            [
                (0, 2, 1),
                (1, 2, 2),
                (2, 2, 1),
                (3, 2, 2),
                (4, 2, 1),
                (5, 2, 2),
                (7, 3, 4),
                (8, 3, 4),
                (9, 3, 4)
            ]
        );
        let mut back: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        decode_attempts(&text, |s, r, a| {
            back.insert((s, r), a);
        })
        .expect("decodes");
        let expected: BTreeMap<(u32, u32), u32> = shards
            .iter()
            .filter(|s| s.attempt > 0)
            .map(|s| ((s.index, s.replica), s.attempt))
            .collect();
        assert_eq!(back, expected);
        for bad in [
            "x",
            "0:5-3=1",
            "0:1=a",
            "0:0-4294967295=1",
            "0:4294967295=1.1",
            "0:1=1..2",
        ] {
            assert!(decode_attempts(bad, |_, _, _| {}).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_big_status_is_paged_and_read_back_whole() {
        let mut full = ComputeJobStatus::default();
        for i in 0..1_234 {
            let phase = if i % 100 == 7 {
                TaskPhase::Running
            } else {
                TaskPhase::Succeeded
            };
            full.shards.push(slot(i, 0, 1, phase));
        }
        let (small, none) = page_out(&full, "u-1", 5_000);
        assert!(none.is_empty() && small.shard_pages.is_empty() && small.shards.len() == 1_234);
        let (written, pages) = page_out(&full, "u-1", 1_000);
        assert_eq!(pages.len(), 23, "pages of 55 shards");
        assert_eq!(written.shard_pages[22].slots, 1_234 - 22 * 55);
        assert_eq!(written.shards.len(), 13, "the running slots only");
        let read: Vec<Option<Arc<Vec<ShardStatus>>>> =
            pages.iter().map(|p| Some(p.slots.clone())).collect();
        assert_eq!(page_in(&written, &read).shards, full.shards);
        // A page lost: its slots keep their attempts.
        let mut lost = read.clone();
        lost[1] = None;
        let back = page_in(&written, &lost);
        assert_eq!(back.shards.len(), 1_234);
        assert!(back.shards.iter().all(|s| s.attempt == 1));
        // A page older than the status (a crash while the pages were written): the
        // attempts recorded in the status stand.
        let mut newer = full.clone();
        newer.shards[60].attempt = 2;
        let (written2, _) = page_out(&newer, "u-1", 1_000);
        let back = page_in(&written2, &read);
        assert_eq!(back.shards[60].attempt, 2);
        // A shard gaining replicas moves no slot to another page.
        let mut more = full.clone();
        more.shards.push(slot(3, 1, 1, TaskPhase::Running));
        let (_, pages2) = page_out(&more, "u-1", 1_000);
        let names = |p: &[Page]| {
            p.iter()
                .map(|p| p.reference.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&pages2), names(&pages));
        assert_eq!(
            pages2[1].json, pages[1].json,
            "only the page of shard 3 changed"
        );
    }

    #[test]
    fn a_ten_thousand_shard_job_with_every_field_at_its_bound_stays_small() {
        // Every agent-written field at its schema bound, the longest names, 3 replicas.
        let mut full = ComputeJobStatus::default();
        let t = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
        for i in 0..10_000 {
            for r in 0..3 {
                let mut s = slot(i, r, 1000, TaskPhase::Running);
                s.cluster = "c".repeat(63);
                s.node = "n".repeat(253);
                s.progress = 99;
                s.started_at = Some(t.clone());
                s.finished_at = Some(t.clone());
                s.dispatched_at = Some(t.clone());
                s.reported_at = Some(t.clone());
                s.progressed_at = Some(t.clone());
                s.result_digest = Some(format!("sha256:{}", "f".repeat(64)));
                s.message = Some("m".repeat(256));
                full.shards.push(s);
            }
        }
        let whole = serde_json::to_string(&full).expect("json").len();
        let (written, pages) = page_out(&full, "u-1", DEFAULT_INLINE_SLOTS);
        let status = serde_json::to_string(&written).expect("json").len();
        let largest = pages.iter().map(|p| p.json.len()).max().unwrap_or(0);
        eprintln!(
            "30,000 slots at their bounds: {whole} bytes whole; paged: status {status} bytes, {} pages of at most {largest} bytes",
            pages.len()
        );
        assert!(whole > 3 << 20, "whole, it would not fit: {whole}");
        assert!(
            status < 1 << 20,
            "the job's status stays under 1 MiB: {status}"
        );
        assert!(
            largest < 1 << 20,
            "a page stays under a ConfigMap's 1 MiB: {largest}"
        );
        // The most a status may hold itself (the flag's upper bound), with every attempt
        // the scheduler may have outstanding, still fits the API server's 1.5 MiB.
        let mut inline = full.clone();
        inline.shards.truncate(2 * DEFAULT_INLINE_SLOTS);
        for i in 0..crate::scheduler::ISSUED_MAX as u32 {
            inline.issued.insert(
                edgeloom_crds::compute_job::slot_key(i, 0),
                edgeloom_crds::compute_job::IssuedAttempt {
                    attempt: 1000,
                    pool: "p".repeat(253),
                    cluster: "c".repeat(63),
                    node: "n".repeat(253),
                    at: t.clone(),
                },
            );
        }
        let (kept, none) = page_out(&inline, "u-1", 2 * DEFAULT_INLINE_SLOTS);
        assert!(none.is_empty());
        let size = serde_json::to_string(&kept).expect("json").len();
        eprintln!(
            "{} slots inline at their bounds, {} issued: {size} bytes",
            kept.shards.len(),
            kept.issued.len()
        );
        assert!(
            size < 3 << 19,
            "an inline status stays under 1.5 MiB: {size}"
        );
        // The worst paged status: 10,000 shards x 9 replicas whose attempts alternate (no
        // run longer than one slot), every shown slot at its bounds, 500 issued.
        let mut worst = ComputeJobStatus {
            issued: inline.issued.clone(),
            ..Default::default()
        };
        for i in 0..10_000u32 {
            for r in 0..9u32 {
                let mut s = full.shards[0].clone();
                (s.index, s.replica, s.attempt) = (i, r, 999 + (i + r) % 2);
                worst.shards.push(s);
            }
        }
        let (written, pages) = page_out(&worst, "u-1", DEFAULT_INLINE_SLOTS);
        let size = serde_json::to_string(&written).expect("json").len();
        let largest = pages.iter().map(|p| p.json.len()).max().unwrap_or(0);
        eprintln!(
            "90,000 slots, alternating attempts, at their bounds, 500 issued: status {size} bytes (attempt runs {} bytes), {} pages of at most {largest} bytes",
            written.slot_attempts.as_ref().map_or(0, String::len),
            pages.len()
        );
        assert!(
            size < 3 << 19,
            "the worst paged status stays under 1.5 MiB: {size}"
        );
        assert!(largest < 1 << 20, "a page stays under 1 MiB: {largest}");
    }
}
