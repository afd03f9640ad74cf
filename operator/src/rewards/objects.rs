//! Where the ledger lives (docs/ARCHITECTURE.md, "Where the ledger lives"): an
//! S3-compatible object store (or a local directory), one log per EdgePool under
//! `<root>/ledger/<pool>/`:
//!
//! - `entries/<first:012>.jsonl`: the entries one append wrote, as JSON lines, created once
//!   with a create-only put (`If-None-Match: *` on S3). The object's name is the sequence
//!   number of its first entry, so two writers cannot both extend the same head: the second
//!   put is refused and the writer re-reads. No object spans a multiple of
//!   [`PACK_ENTRIES`].
//! - `entries/<first:012>.pack-<end:012>.jsonl`: entries `first..end` (a block of
//!   [`PACK_ENTRIES`]) packed into one object once the block is full, after which the small
//!   objects of the block are deleted. A busy pool appends one receipt at a time; packing
//!   keeps the log at about one object per thousand receipts.
//! - `snapshots/<size:012>.json`: the operator's state after `size` entries (head, Merkle
//!   frontier, totals, a 64-bit hash of every receipt key, escrow), every
//!   [`SNAPSHOT_EVERY`] entries. The pool's status records its SHA-256 beside the signed
//!   checkpoint, so a restarted operator loads the snapshot (checked against that digest)
//!   and reads only the entries after it, not every receipt. A snapshot that is missing or
//!   does not match is not trusted: the log is then read from its first entry.
//!
//! Every entry read is checked: its sequence number, its link to the previous entry's hash,
//! its own hash, a key never seen before, and at the size of the last signed checkpoint the
//! Merkle root it signed (so a truncated, rewritten or re-ordered history is named). The
//! operator keeps only what appending needs (head, frontier, key hashes, totals, escrow,
//! the entries of the open block), never the receipts. Each reconcile lists the objects
//! (metadata only, about one per thousand receipts); a listing that differs from what the
//! operator wrote means someone else changed the log, and it is then read and verified
//! again from its first entry.

use crate::decimal::Amount;
use crate::rewards::ledger::{self, Entry, Receipt};
use crate::rewards::merkle::{self, Checkpoint, Frontier};
use crate::rewards::store::{StoreError, Totals, admit, pool_token};
use base64::Engine as _;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::Mutex;

/// Entries per block: no object spans a multiple of this, and a full block is packed into
/// one object.
pub const PACK_ENTRIES: u64 = 1000;
/// A snapshot is written at the first block boundary this many entries after the last one.
pub const SNAPSHOT_EVERY: u64 = 10_000;
/// Objects read at once when loading.
const READ_AHEAD: usize = 8;

/// The object-store location of `pool`'s log under `root`.
pub fn log_prefix(root: &Path, pool: &str) -> Path {
    child(&child(root, "ledger"), &pool_token(pool))
}

fn child(p: &Path, part: &str) -> Path {
    if p.as_ref().is_empty() {
        Path::from(part)
    } else {
        Path::from(format!("{p}/{part}"))
    }
}

fn entries_object(prefix: &Path, first: u64) -> Path {
    Path::from(format!("{prefix}/entries/{first:012}.jsonl"))
}

fn pack_object(prefix: &Path, first: u64, end: u64) -> Path {
    Path::from(format!("{prefix}/entries/{first:012}.pack-{end:012}.jsonl"))
}

fn snapshot_object(prefix: &Path, size: u64) -> Path {
    Path::from(format!("{prefix}/snapshots/{size:012}.json"))
}

/// The first sequence number an object of the log holds, and the end of a pack.
pub fn parse_object_name(name: &str) -> Option<(u64, Option<u64>)> {
    let file = name.rsplit('/').next()?.strip_suffix(".jsonl")?;
    match file.split_once(".pack-") {
        Some((first, end)) => Some((first.parse().ok()?, Some(end.parse().ok()?))),
        None => Some((file.parse().ok()?, None)),
    }
}

/// A snapshot as the pool's status records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    /// Entries it covers.
    pub size: u64,
    /// SHA-256 of the object, hex.
    pub sha256: String,
}

/// Where an entry is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// Object name.
    pub object: String,
    /// Line in it, from 1.
    pub line: usize,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {}", self.object, self.line)
    }
}

/// What a listing of the log's objects shows: how many, and an order-independent digest of
/// (name, ETag, size) that any rewrite, removal or addition changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Listing {
    objects: u64,
    digest: u128,
}

impl Listing {
    fn term(name: &str, e_tag: Option<&str>, size: u64) -> u128 {
        let mut h = Sha256::new();
        h.update(name.as_bytes());
        h.update([0]);
        h.update(e_tag.unwrap_or_default().as_bytes());
        h.update(size.to_be_bytes());
        u128::from_be_bytes(h.finalize()[..16].try_into().expect("16 bytes"))
    }

    fn add(&mut self, name: &str, e_tag: Option<&str>, size: u64) {
        self.objects += 1;
        self.digest = self.digest.wrapping_add(Listing::term(name, e_tag, size));
    }

    fn remove(&mut self, name: &str, e_tag: Option<&str>, size: u64) {
        self.objects = self.objects.saturating_sub(1);
        self.digest = self.digest.wrapping_sub(Listing::term(name, e_tag, size));
    }
}

/// The receipt keys of the log, each as the first 64 bits of its SHA-256: 8 bytes a
/// receipt (a million receipts: 8 MiB). Two keys sharing 64 bits would make the second
/// receipt look paid; with a million keys the chance is about 3 in 10^8 for the whole log.
#[derive(Clone, Debug, Default)]
pub struct KeyIndex {
    sorted: Vec<u64>,
    recent: HashSet<u64>,
}

fn key_hash(key: &str) -> u64 {
    u64::from_be_bytes(Sha256::digest(key.as_bytes())[..8].try_into().expect("8"))
}

impl KeyIndex {
    /// Whether the key is in the log.
    pub fn contains(&self, key: &str) -> bool {
        let h = key_hash(key);
        self.recent.contains(&h) || self.sorted.binary_search(&h).is_ok()
    }

    fn insert(&mut self, key: &str) -> bool {
        if self.contains(key) {
            return false;
        }
        self.recent.insert(key_hash(key));
        if self.recent.len() >= 16_384 {
            self.compact();
        }
        true
    }

    fn compact(&mut self) {
        if self.recent.is_empty() {
            return;
        }
        self.sorted.extend(self.recent.drain());
        self.sorted.sort_unstable();
        self.recent.shrink_to_fit();
    }

    fn to_base64(&self) -> String {
        hashes_to_base64(self.sorted.iter().chain(&self.recent).copied())
    }

    fn from_base64(s: &str) -> Result<KeyIndex, String> {
        // In pieces (a multiple of both 4 base64 characters and 8 bytes), so that the
        // decoded bytes are never all in memory beside the hashes.
        let mut sorted = Vec::with_capacity(s.len() / 4 * 3 / 8);
        for piece in s.as_bytes().chunks(4 * 1024) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(piece)
                .map_err(|e| format!("keys: {e}"))?;
            if bytes.len() % 8 != 0 {
                return Err("keys: not a whole number of hashes".into());
            }
            sorted.extend(
                bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().expect("8"))),
            );
        }
        if !sorted.is_sorted() {
            return Err("keys: not sorted".into());
        }
        Ok(KeyIndex {
            sorted,
            recent: HashSet::new(),
        })
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct TotalsJson {
    receipts: u64,
    forfeits: u64,
    total: String,
    by_account: BTreeMap<String, String>,
}

impl From<&Totals> for TotalsJson {
    fn from(t: &Totals) -> TotalsJson {
        TotalsJson {
            receipts: t.receipts,
            forfeits: t.forfeits,
            total: t.total.to_string(),
            by_account: t
                .by_account
                .iter()
                .map(|(a, v)| (a.clone(), v.to_string()))
                .collect(),
        }
    }
}

impl TryFrom<&TotalsJson> for Totals {
    type Error = String;
    fn try_from(t: &TotalsJson) -> Result<Totals, String> {
        let amount = |s: &str| s.parse::<Amount>().map_err(|e| format!("{s:?}: {e}"));
        Ok(Totals {
            receipts: t.receipts,
            forfeits: t.forfeits,
            total: amount(&t.total)?,
            by_account: t
                .by_account
                .iter()
                .map(|(a, v)| Ok((a.clone(), amount(v)?)))
                .collect::<Result<_, String>>()?,
        })
    }
}

/// Most (job, account) totals the operator keeps: jobs whose last receipt is oldest are
/// evicted beyond it (a finished job's status is frozen and never asks again); a job
/// evicted and then asked about is summed again from the log.
pub const JOB_CACHE_ENTRIES: usize = 100_000;

/// Totals by job: those of recent jobs, and the 64-bit hashes of the jobs evicted.
#[derive(Clone, Debug, Default)]
struct Jobs {
    cached: HashMap<String, (Totals, u64)>,
    /// Sum over cached jobs of 1 + accounts.
    entries: usize,
    evicted: HashSet<u64>,
    limit: usize,
}

impl Jobs {
    fn with_limit(limit: usize) -> Jobs {
        Jobs {
            limit,
            ..Jobs::default()
        }
    }

    /// Counts `r` (entry `seq`) unless its job was evicted (then it is summed from the
    /// log when asked).
    fn add(&mut self, r: &Receipt, seq: u64) -> Result<(), crate::decimal::DecimalError> {
        if !self.evicted.is_empty() && self.evicted.contains(&key_hash(&r.job_uid)) {
            return Ok(());
        }
        let (t, last) = self.cached.entry(r.job_uid.clone()).or_insert_with(|| {
            self.entries += 1;
            (Totals::default(), seq)
        });
        let accounts = t.by_account.len();
        t.add(r)?;
        *last = seq;
        self.entries += t.by_account.len() - accounts;
        if self.entries > self.limit {
            self.evict();
        }
        Ok(())
    }

    /// Evicts the jobs whose last receipt is oldest, down to 80% of the limit.
    fn evict(&mut self) {
        let mut by_age: Vec<(u64, String, usize)> = self
            .cached
            .iter()
            .map(|(j, (t, last))| (*last, j.clone(), 1 + t.by_account.len()))
            .collect();
        by_age.sort_unstable();
        for (_, job, n) in by_age {
            if self.entries <= self.limit * 4 / 5 {
                break;
            }
            self.cached.remove(&job);
            self.evicted.insert(key_hash(&job));
            self.entries -= n;
        }
        self.cached.shrink_to_fit();
    }

    fn get(&self, job: &str) -> Option<Totals> {
        if let Some((t, _)) = self.cached.get(job) {
            return Some(t.clone());
        }
        (!self.evicted.contains(&key_hash(job))).then(Totals::default)
    }

    /// Caches `t`, summed from the log, for an evicted job.
    fn restore(&mut self, job: &str, t: Totals, seq: u64) {
        self.evicted.remove(&key_hash(job));
        self.entries += 1 + t.by_account.len();
        self.cached.insert(job.to_string(), (t, seq));
        if self.entries > self.limit {
            self.evict();
        }
    }
}

/// 64-bit hashes, sorted, as base64 of their big-endian bytes.
fn hashes_to_base64(h: impl Iterator<Item = u64>) -> String {
    let mut all: Vec<u64> = h.collect();
    all.sort_unstable();
    let bytes: Vec<u8> = all.iter().flat_map(|h| h.to_be_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The operator's state after `size` entries, as written to `snapshots/`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    pool: String,
    size: u64,
    head: String,
    /// The Merkle frontier's peaks, hex, largest subtree first.
    peaks: Vec<String>,
    totals: TotalsJson,
    /// Cached jobs: totals and the sequence number of their last entry.
    by_job: BTreeMap<String, (TotalsJson, u64)>,
    /// Base64 of the sorted 64-bit hashes of the evicted jobs.
    evicted_jobs: String,
    /// Base64 of the sorted 64-bit key hashes, big-endian.
    keys: String,
    /// Receipts still in escrow, under this window (seconds).
    escrow: Vec<Receipt>,
    escrow_seconds: i64,
    /// The objects holding the entries it covers (count, and the listing digest, hex): a
    /// restart that finds them changed reads the whole log instead.
    sealed_objects: u64,
    sealed_digest: String,
}

/// The operator's view of one log.
#[derive(Debug, Default)]
struct Loaded {
    size: u64,
    head: String,
    keys: KeyIndex,
    by_job: Jobs,
    totals: Totals,
    tree: Frontier,
    /// Receipts still in escrow (younger than the window), by "cluster/node".
    escrow: HashMap<String, Vec<Receipt>>,
    escrow_seconds: i64,
    /// Entries of the open block (since the last multiple of PACK_ENTRIES), and the
    /// objects holding them (name, ETag, size).
    block: Vec<Entry>,
    block_objects: Vec<(Path, Option<String>, u64)>,
    /// The latest snapshot written or loaded.
    snapshot: Option<SnapshotRef>,
    /// The listing as the operator left it.
    listing: Listing,
    /// The signed checkpoint the log must agree with, checked once it is reached.
    anchor: Option<Checkpoint>,
    /// Tree heads this state went through that may have been signed (most recent last).
    seen: std::collections::VecDeque<(u64, merkle::Hash)>,
}

fn in_escrow(r: &Receipt, now: jiff::Timestamp, window: i64) -> bool {
    r.time
        .parse::<jiff::Timestamp>()
        .is_ok_and(|t| now.duration_since(t).as_secs() < window)
}

impl Loaded {
    fn genesis(escrow_seconds: i64, anchor: Option<Checkpoint>, job_cache: usize) -> Loaded {
        Loaded {
            head: ledger::GENESIS.to_string(),
            by_job: Jobs::with_limit(job_cache),
            escrow_seconds,
            anchor,
            ..Loaded::default()
        }
    }

    /// Checks one entry against the log so far and takes it in.
    fn apply(&mut self, e: &Entry) -> Result<(), String> {
        if e.seq != self.size {
            return Err(format!(
                "ledger entry {} has sequence {} where {} was expected",
                self.size, e.seq, self.size
            ));
        }
        if e.prev != self.head {
            return Err(format!(
                "ledger entry {} (seq {}) is broken: it does not link to the previous entry's hash",
                self.size, e.seq
            ));
        }
        if e.hash != ledger::entry_hash(e.seq, &e.prev, &e.receipt) {
            return Err(format!(
                "ledger entry {} (seq {}) is broken: its contents do not match its hash (the entry was altered)",
                self.size, e.seq
            ));
        }
        if !self.keys.insert(&e.receipt.key()) {
            return Err(format!(
                "ledger entry {} (seq {}) is broken: receipt {} appears twice",
                self.size,
                e.seq,
                e.receipt.key()
            ));
        }
        self.tree.push(merkle::leaf_hash(&e.hash));
        match &e.receipt.forfeits {
            Some(k) => {
                if let Some(held) = self.escrow.get_mut(&e.receipt.node_key()) {
                    held.retain(|r| &r.key() != k);
                }
            }
            None if self.escrow_seconds > 0 => {
                let held = self.escrow.entry(e.receipt.node_key()).or_default();
                held.push(e.receipt.clone());
                let window = self.escrow_seconds;
                if let Ok(now) = e.receipt.time.parse::<jiff::Timestamp>() {
                    held.retain(|r| in_escrow(r, now, window));
                }
            }
            None => {}
        }
        self.by_job
            .add(&e.receipt, e.seq)
            .map_err(|x| format!("ledger entry {}: {x}", e.seq))?;
        self.totals
            .add(&e.receipt)
            .map_err(|x| format!("ledger entry {}: {x}", e.seq))?;
        self.head = e.hash.clone();
        self.size += 1;
        self.check_anchor()
    }

    /// At the checkpoint's size, the tree must have the root it signed.
    fn check_anchor(&self) -> Result<(), String> {
        match &self.anchor {
            Some(cp) if cp.size == self.size => cp.check_prefix(self.size, &self.tree),
            _ => Ok(()),
        }
    }

    /// After the whole log was read: it must reach the checkpoint.
    fn check_complete(&self) -> Result<(), String> {
        match &self.anchor {
            Some(cp) if cp.size > self.size => cp.check_prefix(self.size, &self.tree),
            _ => Ok(()),
        }
    }

    /// Remembers the current tree head (a checkpoint may be signed over it).
    fn remember(&mut self) {
        let head = (self.size, self.tree.root());
        if self.seen.back() != Some(&head) {
            self.seen.push_back(head);
            if self.seen.len() > 64 {
                self.seen.pop_front();
            }
        }
    }

    fn to_snapshot(&self, pool: &str) -> Snapshot {
        Snapshot {
            pool: pool.to_string(),
            size: self.size,
            head: self.head.clone(),
            peaks: self.tree.peaks().iter().map(hex::encode).collect(),
            totals: (&self.totals).into(),
            by_job: self
                .by_job
                .cached
                .iter()
                .map(|(j, (t, last))| (j.clone(), (t.into(), *last)))
                .collect(),
            evicted_jobs: hashes_to_base64(self.by_job.evicted.iter().copied()),
            keys: self.keys.to_base64(),
            escrow: self.escrow.values().flatten().cloned().collect(),
            escrow_seconds: self.escrow_seconds,
            sealed_objects: self.listing.objects,
            sealed_digest: format!("{:032x}", self.listing.digest),
        }
    }

    fn from_snapshot(
        s: Snapshot,
        escrow_seconds: i64,
        anchor: Option<Checkpoint>,
        job_cache: usize,
    ) -> Result<Loaded, String> {
        if s.escrow_seconds != escrow_seconds {
            return Err(format!(
                "it holds the escrow of a {} s window, the pool's is {escrow_seconds} s",
                s.escrow_seconds
            ));
        }
        let peaks = s
            .peaks
            .iter()
            .map(|p| {
                hex::decode(p)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| format!("peak {p:?} is not a hash"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tree = Frontier::from_parts(s.size, peaks)?;
        let sealed = Listing {
            objects: s.sealed_objects,
            digest: u128::from_str_radix(&s.sealed_digest, 16)
                .map_err(|e| format!("sealedDigest: {e}"))?,
        };
        let mut escrow: HashMap<String, Vec<Receipt>> = HashMap::new();
        for r in s.escrow {
            escrow.entry(r.node_key()).or_default().push(r);
        }
        let loaded = Loaded {
            size: s.size,
            head: s.head,
            keys: KeyIndex::from_base64(&s.keys)?,
            by_job: {
                let mut jobs = Jobs::with_limit(job_cache);
                for (j, (t, last)) in &s.by_job {
                    let t = Totals::try_from(t)?;
                    jobs.entries += 1 + t.by_account.len();
                    jobs.cached.insert(j.clone(), (t, *last));
                }
                jobs.evicted = KeyIndex::from_base64(&s.evicted_jobs)?
                    .sorted
                    .into_iter()
                    .collect();
                jobs
            },
            totals: Totals::try_from(&s.totals)?,
            tree,
            escrow,
            escrow_seconds,
            anchor,
            // Until the listing is read: what the snapshot's entries are held in.
            listing: sealed,
            ..Loaded::default()
        };
        loaded.check_anchor()?;
        Ok(loaded)
    }
}

/// The objects of a log holding entries from `from` on, in order; the listing of all of its
/// objects, and of those that begin before `from`.
async fn list_objects(
    store: &dyn ObjectStore,
    prefix: &Path,
    from: u64,
) -> Result<(Vec<object_store::ObjectMeta>, Listing, Listing), StoreError> {
    let dir = child(prefix, "entries");
    let all: Vec<object_store::ObjectMeta> = store.list(Some(&dir)).try_collect().await?;
    let (mut listing, mut before) = (Listing::default(), Listing::default());
    let mut objects = Vec::new();
    for m in all {
        let name = m.location.to_string();
        listing.add(&name, m.e_tag.as_deref(), m.size);
        if parse_object_name(&name).is_some_and(|(first, _)| first < from) {
            before.add(&name, m.e_tag.as_deref(), m.size);
        }
        match parse_object_name(&name) {
            // A pack that ends after `from`; a small object of `from`'s block or later.
            Some((first, end))
                if end.map_or(first.saturating_add(PACK_ENTRIES) > from, |e| e > from) =>
            {
                objects.push((first, end.is_none(), m))
            }
            Some(_) => {}
            None => {
                return Err(StoreError::Broken(format!(
                    "{name} is not a ledger object (names are <first entry>.jsonl)"
                )));
            }
        }
    }
    // By first entry; a pack before the small objects it replaced.
    objects.sort_by_key(|a| (a.0, a.1));
    Ok((
        objects.into_iter().map(|(_, _, m)| m).collect(),
        listing,
        before,
    ))
}

/// Reads the log's entries from `from` on, in order, calling `f` with each and where it is
/// stored. Entries before `from`, and entries read already from another object (a pack and
/// the small objects it replaced), are skipped. A gap, an object whose entries are not
/// consecutive, or a line that is not an entry is an error naming the object and line.
pub async fn read_entries(
    store: &dyn ObjectStore,
    prefix: &Path,
    from: u64,
    mut f: impl FnMut(Entry, Location) -> Result<(), String>,
) -> Result<u64, StoreError> {
    let (objects, _, _) = list_objects(store, prefix, from).await?;
    read_listed(store, objects, from, &mut f).await
}

async fn read_listed(
    store: &dyn ObjectStore,
    objects: Vec<object_store::ObjectMeta>,
    from: u64,
    f: &mut impl FnMut(Entry, Location) -> Result<(), String>,
) -> Result<u64, StoreError> {
    let mut next = from;
    // The entries read in the last two blocks, as stored: a second copy of an entry (a
    // small object next to its pack) must be the same.
    let mut read: HashMap<u64, (String, String)> = HashMap::new();
    let mut bodies = futures::stream::iter(objects.into_iter().map(|m| async move {
        let bytes = store.get(&m.location).await?.bytes().await?;
        Ok::<_, object_store::Error>((m.location, bytes))
    }))
    .buffered(READ_AHEAD);
    while let Some(got) = bodies.next().await {
        let (location, bytes) = got?;
        let name = location.to_string();
        let (first, end) = parse_object_name(&name).unwrap_or((u64::MAX, None));
        let block_end = (first / PACK_ENTRIES + 1).saturating_mul(PACK_ENTRIES);
        if let Some(end) = end
            && (!first.is_multiple_of(PACK_ENTRIES) || end != first + PACK_ENTRIES)
        {
            return Err(StoreError::Broken(format!(
                "{name} is not a pack of one block of {PACK_ENTRIES} entries (the operator writes no such object)"
            )));
        }
        if end.is_some_and(|e| e <= next) && first < from {
            continue;
        }
        if first > next {
            return Err(StoreError::Broken(format!(
                "ledger entries {next}..{first} are missing (no object holds them; {name} follows)"
            )));
        }
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| StoreError::Broken(format!("{name} is not UTF-8 text")))?;
        let mut expected = first;
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = Location {
                object: name.clone(),
                line: n + 1,
            };
            let entry: Entry = serde_json::from_str(line).map_err(|e| {
                StoreError::Broken(format!("ledger entry {expected} ({at}) is unreadable: {e}"))
            })?;
            if entry.seq != expected {
                return Err(StoreError::Broken(format!(
                    "{at} holds entry seq {} where {expected} was expected (entries were removed, added or moved)",
                    entry.seq
                )));
            }
            if entry.seq >= block_end {
                return Err(StoreError::Broken(format!(
                    "{at} holds entry {} past the end of its block (the operator writes no such object)",
                    entry.seq
                )));
            }
            expected += 1;
            if entry.seq < next {
                match read.get(&entry.seq) {
                    Some((copy, other)) if copy.as_str() != line => {
                        return Err(StoreError::Broken(format!(
                            "{at} holds a different entry {} than {other}: one of them was altered",
                            entry.seq
                        )));
                    }
                    _ => continue,
                }
            }
            read.insert(entry.seq, (line.to_string(), at.to_string()));
            f(entry, at.clone()).map_err(|e| StoreError::Broken(format!("{e} ({at})")))?;
            next += 1;
        }
        if end.is_some_and(|e| e != expected) {
            return Err(StoreError::Broken(format!(
                "{name} ends at entry {expected}, not where its name says"
            )));
        }
        if read.len() > 2 * PACK_ENTRIES as usize {
            let keep = next.saturating_sub(next % PACK_ENTRIES + PACK_ENTRIES);
            read.retain(|seq, _| *seq >= keep);
        }
    }
    Ok(next)
}

fn object_error(e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::AlreadyExists { .. } => StoreError::Conflict,
        e => StoreError::Objects(e),
    }
}

/// What an append did.
#[derive(Debug, Default)]
pub struct Appended {
    /// The new entries.
    pub written: Vec<Entry>,
    /// Receipts refused (key, why): never written, so they neither pay nor break the chain.
    pub refused: Vec<(String, String)>,
}

/// The pool's ledger at a glance.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Head hash.
    pub head: String,
    /// Totals.
    pub totals: Totals,
    /// Entries.
    pub size: u64,
    /// RFC 6962 tree head of all entries.
    pub root: merkle::Hash,
    /// The latest snapshot (what a restart loads).
    pub snapshot: Option<SnapshotRef>,
    /// Objects in the log.
    pub objects: u64,
}

/// One pool's ledger in the object store.
pub struct LedgerStore {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    pool: String,
    state: Mutex<Option<Loaded>>,
    /// The latest signed checkpoint (a loaded ledger must agree with it) and the snapshot
    /// the pool's status records.
    anchor: std::sync::Mutex<(Option<Checkpoint>, Option<SnapshotRef>)>,
    /// The pool's escrow window, seconds.
    escrow_seconds: std::sync::atomic::AtomicI64,
    /// Entries between snapshots (a multiple of PACK_ENTRIES).
    snapshot_every: u64,
    /// Most (job, account) totals kept.
    job_cache: usize,
    /// Whether the pool's checkpoint is known (see [`LedgerStore::require_anchor`]).
    ready: std::sync::atomic::AtomicBool,
}

impl LedgerStore {
    /// Snapshots every `n` blocks of entries instead of every [`SNAPSHOT_EVERY`] entries.
    pub fn with_snapshot_blocks(mut self, n: u64) -> LedgerStore {
        self.snapshot_every = n.max(1) * PACK_ENTRIES;
        self
    }

    /// The store of `pool`'s ledger in `store` under `root`.
    pub fn new(store: Arc<dyn ObjectStore>, root: &Path, pool: &str) -> LedgerStore {
        LedgerStore {
            store,
            prefix: log_prefix(root, pool),
            pool: pool.to_string(),
            state: Mutex::new(None),
            anchor: std::sync::Mutex::new((None, None)),
            escrow_seconds: std::sync::atomic::AtomicI64::new(3600),
            snapshot_every: SNAPSHOT_EVERY,
            job_cache: JOB_CACHE_ENTRIES,
            ready: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Refuses to read or write the log ([`StoreError::NotReady`]) until
    /// [`LedgerStore::set_anchor`] has said which signed checkpoint it must agree with (or
    /// that there is none yet): the operator's stores, so that nothing is paid on top of a
    /// history nobody checked.
    pub fn require_anchor(self) -> LedgerStore {
        self.ready
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self
    }

    /// Keeps at most `n` (job, account) totals instead of [`JOB_CACHE_ENTRIES`].
    pub fn with_job_cache(mut self, n: usize) -> LedgerStore {
        self.job_cache = n.max(2);
        self
    }

    fn anchor(&self) -> (Option<Checkpoint>, Option<SnapshotRef>) {
        self.anchor.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// Reads the snapshot the status records, if it is there and matches its digest.
    async fn snapshot(
        &self,
        r: &SnapshotRef,
        escrow_seconds: i64,
        cp: Option<Checkpoint>,
    ) -> Result<Loaded, String> {
        let bytes = self
            .store
            .get(&snapshot_object(&self.prefix, r.size))
            .await
            .map_err(|e| e.to_string())?
            .bytes()
            .await
            .map_err(|e| e.to_string())?;
        let digest = hex::encode(Sha256::digest(&bytes));
        if digest != r.sha256 {
            return Err(format!(
                "its SHA-256 is {digest}, the pool's status records {}",
                r.sha256
            ));
        }
        let s: Snapshot = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        drop(bytes);
        if s.size != r.size {
            return Err(format!("it covers {} entries, not {}", s.size, r.size));
        }
        let mut loaded = Loaded::from_snapshot(s, escrow_seconds, cp, self.job_cache)?;
        loaded.snapshot = Some(r.clone());
        Ok(loaded)
    }

    /// Reads the log: from the recorded snapshot when `fast` and it is usable (its digest
    /// matches and the objects holding its entries are as it saw them), else from the
    /// first entry; then every entry after it, checked.
    async fn load(&self, fast: bool) -> Result<Loaded, StoreError> {
        let escrow_seconds = self
            .escrow_seconds
            .load(std::sync::atomic::Ordering::Relaxed);
        let (cp, snap) = self.anchor();
        let mut from_snapshot = None;
        if let (true, Some(r)) = (fast, &snap)
            && cp.as_ref().is_none_or(|c| r.size <= c.size)
        {
            match self.snapshot(r, escrow_seconds, cp.clone()).await {
                Ok(l) => from_snapshot = Some(l),
                Err(e) => tracing::warn!(
                    pool = %self.pool, size = r.size, error = %e,
                    "the ledger snapshot is not usable; reading the whole log instead"
                ),
            }
        }
        let from = from_snapshot.as_ref().map_or(0, |l| l.size);
        let (mut objects, mut listing, before) =
            list_objects(self.store.as_ref(), &self.prefix, from).await?;
        let mut l = match from_snapshot {
            Some(l) if l.listing == before => l,
            other => {
                if other.is_some() {
                    tracing::warn!(
                        pool = %self.pool,
                        "the objects holding the snapshot's entries changed; reading the whole log instead"
                    );
                    (objects, listing, _) =
                        list_objects(self.store.as_ref(), &self.prefix, 0).await?;
                }
                let mut l = Loaded::genesis(escrow_seconds, cp, self.job_cache);
                // Keep the recorded snapshot as the latest: the next is written after it.
                l.snapshot = snap;
                l
            }
        };
        let from = l.size;
        let smalls: Vec<(Path, Option<String>, u64)> = objects
            .iter()
            .filter(|m| {
                parse_object_name(m.location.as_ref()).is_some_and(|(_, end)| end.is_none())
            })
            .map(|m| (m.location.clone(), m.e_tag.clone(), m.size))
            .collect();
        read_listed(self.store.as_ref(), objects, from, &mut |e, _| {
            l.apply(&e)?;
            if l.size.is_multiple_of(PACK_ENTRIES) {
                l.block.clear();
            } else {
                l.block.push(e);
            }
            Ok(())
        })
        .await?;
        l.check_complete().map_err(StoreError::Broken)?;
        // The small objects of the open block: packed with it once it is full.
        let open = l.size - l.size % PACK_ENTRIES;
        l.block_objects = smalls
            .into_iter()
            .filter(|(p, _, _)| {
                parse_object_name(p.as_ref()).is_some_and(|(first, _)| first >= open)
            })
            .collect();
        l.listing = listing;
        l.keys.compact();
        l.remember();
        Ok(l)
    }

    /// Runs `f` on the loaded ledger, reading it first if needed.
    async fn with<T>(
        &self,
        f: impl AsyncFnOnce(&mut Loaded) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::NotReady);
        }
        let mut guard = self.state.lock().await;
        if guard.is_none() {
            *guard = Some(self.load(true).await?);
        }
        let loaded = guard.as_mut().expect("loaded above");
        let result = f(loaded).await;
        if matches!(
            result,
            Err(StoreError::Api(_)
                | StoreError::Objects(_)
                | StoreError::Conflict
                | StoreError::Broken(_))
        ) {
            // Re-read rather than trust a state the store disagrees with.
            *guard = None;
        }
        result
    }

    /// Whether each receipt key is in the log.
    pub async fn has_keys(&self, keys: &[String]) -> Result<Vec<bool>, StoreError> {
        let keys = keys.to_vec();
        self.with(async move |l: &mut Loaded| Ok(keys.iter().map(|k| l.keys.contains(k)).collect()))
            .await
    }

    /// Appends one job's receipts whose keys are not in the log yet, as [`admit`] allows
    /// them (`cap`: what the job may still be paid in this ledger, from its budget);
    /// returns the new entries and the receipts refused, with why.
    pub async fn append(
        &self,
        receipts: Vec<Receipt>,
        cap: Option<Amount>,
    ) -> Result<Appended, StoreError> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let pool = self.pool.clone();
        let snapshot_every = self.snapshot_every;
        self.with(async move |l: &mut Loaded| {
            let job = match receipts.first() {
                Some(r) => job_totals_of(store.as_ref(), &prefix, l, &r.job_uid).await?,
                None => Totals::default(),
            };
            let (admitted, refused) = admit(
                &|k: &str| l.keys.contains(k),
                receipts,
                &job,
                &l.totals,
                cap,
            );
            let mut written = Vec::new();
            let mut rest = admitted.into_iter().peekable();
            while rest.peek().is_some() {
                // One object per block at most.
                let first = l.size;
                let room = PACK_ENTRIES - first % PACK_ENTRIES;
                let mut chunk = Vec::new();
                let (mut prev, mut text) = (l.head.clone(), String::new());
                while (chunk.len() as u64) < room
                    && let Some(r) = rest.next()
                {
                    let seq = first + chunk.len() as u64;
                    let hash = ledger::entry_hash(seq, &prev, &r);
                    let e = Entry {
                        seq,
                        prev: std::mem::replace(&mut prev, hash.clone()),
                        receipt: r,
                        hash,
                    };
                    text.push_str(&serde_json::to_string(&e).unwrap_or_default());
                    text.push('\n');
                    chunk.push(e);
                }
                let object = entries_object(&prefix, first);
                let size = text.len() as u64;
                let put = store
                    .put_opts(
                        &object,
                        PutPayload::from(text),
                        PutOptions::from(PutMode::Create),
                    )
                    .await
                    .map_err(object_error)?;
                // A name can be free again because its block was packed (a writer with a
                // stale head): then these entries are not in the log.
                let block = first - first % PACK_ENTRIES;
                match store
                    .head(&pack_object(&prefix, block, block + PACK_ENTRIES))
                    .await
                {
                    Err(object_store::Error::NotFound { .. }) => {}
                    Ok(_) => {
                        let _ = store.delete(&object).await;
                        return Err(StoreError::Conflict);
                    }
                    Err(e) => return Err(e.into()),
                }
                l.listing.add(object.as_ref(), put.e_tag.as_deref(), size);
                for e in &chunk {
                    l.apply(e).map_err(StoreError::Broken)?;
                }
                l.block.extend(chunk.iter().cloned());
                l.block_objects.push((object, put.e_tag, size));
                written.extend(chunk);
                if l.size.is_multiple_of(PACK_ENTRIES) {
                    pack(store.as_ref(), &prefix, l).await;
                    if l.size - l.snapshot.as_ref().map_or(0, |s| s.size) >= snapshot_every {
                        write_snapshot(store.as_ref(), &prefix, &pool, l).await;
                    }
                }
            }
            Ok(Appended { written, refused })
        })
        .await
    }

    /// Sets the pool's escrow window (seconds). A change re-reads the ledger on next use,
    /// so that what is in escrow is known again.
    pub async fn set_escrow(&self, seconds: u32) {
        let mut guard = self.state.lock().await;
        if guard
            .as_ref()
            .is_some_and(|l| l.escrow_seconds != seconds as i64)
        {
            *guard = None;
        }
        self.escrow_seconds
            .store(seconds as i64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes back every receipt of node `node` ("cluster/node") still in escrow at `now`:
    /// one forfeit entry each (idempotent). Returns the forfeits written.
    pub async fn forfeit(
        &self,
        node: &str,
        now: jiff::Timestamp,
    ) -> Result<Vec<Entry>, StoreError> {
        let held: Vec<Receipt> = self
            .with(async |l: &mut Loaded| {
                let window = l.escrow_seconds;
                Ok(l.escrow
                    .get(node)
                    .map(|v| {
                        v.iter()
                            .filter(|r| in_escrow(r, now, window))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default())
            })
            .await?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let time = now.to_string();
        let forfeits = held.iter().map(|r| r.forfeit(&time)).collect();
        Ok(self.append(forfeits, None).await?.written)
    }

    /// Makes `cp` (a checkpoint whose signature was checked; `None` for a pool that never
    /// signed one) the history the ledger must agree with, and `snapshot` (recorded beside
    /// it in the pool's status) where a restart starts reading. A loaded ledger that did not
    /// go through `cp`'s tree head is read again (and checked) on next use.
    pub async fn set_anchor(&self, cp: Option<Checkpoint>, snapshot: Option<SnapshotRef>) {
        let mut guard = self.state.lock().await;
        let went_through = |l: &Loaded| match &cp {
            None => true,
            Some(cp) => cp
                .root_hash()
                .is_ok_and(|root| l.seen.iter().any(|s| *s == (cp.size, root))),
        };
        match guard.as_mut() {
            Some(l) if went_through(l) => l.anchor = cp.clone(),
            _ => *guard = None,
        }
        if let Ok(mut a) = self.anchor.lock() {
            *a = (cp, snapshot);
        }
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Head and totals.
    pub async fn summary(&self) -> Result<Summary, StoreError> {
        self.with(async |l: &mut Loaded| {
            l.remember();
            Ok(Summary {
                head: l.head.clone(),
                totals: l.totals.clone(),
                size: l.size,
                root: l.tree.root(),
                snapshot: l.snapshot.clone(),
                objects: l.listing.objects,
            })
        })
        .await
    }

    /// Totals of one job's receipts.
    pub async fn job_totals(&self, job_uid: &str) -> Result<Totals, StoreError> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        self.with(async move |l: &mut Loaded| {
            job_totals_of(store.as_ref(), &prefix, l, job_uid).await
        })
        .await
    }

    /// Lists the log's objects; when the listing is not what the operator left (an object
    /// was rewritten, removed or added behind its back), reads and verifies the whole log
    /// again from its first entry, so that an alteration anywhere is found. The log must
    /// then still be exactly what the operator wrote: as many entries, the same tree head.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::NotReady);
        }
        let mut guard = self.state.lock().await;
        let Some(l) = guard.as_ref() else {
            *guard = Some(self.load(true).await?);
            return Ok(());
        };
        let (_, listing, _) = list_objects(self.store.as_ref(), &self.prefix, u64::MAX).await?;
        if listing == l.listing {
            return Ok(());
        }
        tracing::warn!(
            pool = %self.pool,
            "the ledger's objects changed behind the operator's back; verifying the whole log again"
        );
        let (size, root) = (l.size, l.tree.root());
        *guard = None;
        let again = self.load(false).await?;
        if again.size != size || again.tree.root() != root {
            return Err(StoreError::Broken(format!(
                "the log has {} entries with tree head {} where the operator wrote {size} with {}: entries were {} behind its back",
                again.size,
                hex::encode(again.tree.root()),
                hex::encode(root),
                if again.size > size {
                    "added"
                } else if again.size < size {
                    "removed"
                } else {
                    "rewritten"
                }
            )));
        }
        *guard = Some(again);
        Ok(())
    }
}

/// A job's totals: kept, or summed again from the log for a job evicted earlier.
async fn job_totals_of(
    store: &dyn ObjectStore,
    prefix: &Path,
    l: &mut Loaded,
    job: &str,
) -> Result<Totals, StoreError> {
    if let Some(t) = l.by_job.get(job) {
        return Ok(t);
    }
    tracing::info!(job, "summing an evicted job's receipts from the ledger");
    let mut t = Totals::default();
    let mut last = 0;
    let end = l.size;
    read_entries(store, prefix, 0, |e, _| {
        if e.seq < end && e.receipt.job_uid == job {
            t.add(&e.receipt).map_err(|x| x.to_string())?;
            last = e.seq;
        }
        Ok(())
    })
    .await?;
    l.by_job.restore(job, t.clone(), last);
    Ok(t)
}

/// Packs a full block into one object and deletes the small objects it replaces (best
/// effort: a leftover small object is skipped by readers, and packed again next time).
async fn pack(store: &dyn ObjectStore, prefix: &Path, l: &mut Loaded) {
    let objects = std::mem::take(&mut l.block_objects);
    let block = std::mem::take(&mut l.block);
    if objects.len() <= 1 || block.len() as u64 != PACK_ENTRIES {
        return;
    }
    let first = block[0].seq;
    let text: String = block
        .iter()
        .map(|e| serde_json::to_string(e).unwrap_or_default() + "\n")
        .collect();
    let object = pack_object(prefix, first, first + PACK_ENTRIES);
    let size = text.len() as u64;
    match store
        .put_opts(
            &object,
            PutPayload::from(text),
            PutOptions::from(PutMode::Create),
        )
        .await
    {
        Ok(put) => l.listing.add(object.as_ref(), put.e_tag.as_deref(), size),
        Err(e) => {
            tracing::warn!(object = %object, error = %e, "packing ledger entries failed");
            return;
        }
    }
    for (p, e_tag, size) in objects {
        match store.delete(&p).await {
            Ok(()) => l.listing.remove(p.as_ref(), e_tag.as_deref(), size),
            Err(e) => {
                tracing::warn!(object = %p, error = %e, "deleting a packed ledger object failed")
            }
        }
    }
}

/// Writes a snapshot of the state (best effort: without it a restart reads more).
async fn write_snapshot(store: &dyn ObjectStore, prefix: &Path, pool: &str, l: &mut Loaded) {
    l.keys.compact();
    let body = match serde_json::to_vec(&l.to_snapshot(pool)) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(pool, error = %e, "encoding a ledger snapshot failed");
            return;
        }
    };
    let sha256 = hex::encode(Sha256::digest(&body));
    let object = snapshot_object(prefix, l.size);
    match store
        .put_opts(
            &object,
            PutPayload::from(body),
            PutOptions::from(PutMode::Create),
        )
        .await
    {
        Ok(_) => {
            l.snapshot = Some(SnapshotRef {
                size: l.size,
                sha256,
            });
            // Keep this one and the one before (the pool's status may still name it).
            let dir = child(prefix, "snapshots");
            if let Ok(mut old) = store
                .list(Some(&dir))
                .map_ok(|m| m.location)
                .try_collect::<Vec<Path>>()
                .await
            {
                old.sort_by(|a, b| b.as_ref().cmp(a.as_ref()));
                for p in old.into_iter().skip(2) {
                    let _ = store.delete(&p).await;
                }
            }
        }
        Err(e) => tracing::warn!(object = %object, error = %e, "writing a ledger snapshot failed"),
    }
}

/// Every entry of a log, checked, with where each is stored (for `kubectl edgeloom`).
pub async fn read_all(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<(Vec<Entry>, Vec<Location>), StoreError> {
    let mut check = Loaded::genesis(0, None, 2);
    let (mut entries, mut locations) = (Vec::new(), Vec::new());
    read_entries(store, prefix, 0, |e, at| {
        check.apply(&e)?;
        entries.push(e);
        locations.push(at);
        Ok(())
    })
    .await?;
    Ok((entries, locations))
}

/// The pools with a log under `root` (their object-name tokens).
pub async fn pools(store: &dyn ObjectStore, root: &Path) -> Result<Vec<String>, StoreError> {
    let listed = store
        .list_with_delimiter(Some(&child(root, "ledger")))
        .await?;
    let mut pools: Vec<String> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename().map(String::from))
        .collect();
    pools.sort();
    Ok(pools)
}

/// Every line of a log's objects that reads as an entry, unchecked and in object order (to
/// export a broken ledger, which is when it is needed).
pub async fn read_unchecked(
    store: &dyn ObjectStore,
    prefix: &Path,
) -> Result<Vec<Entry>, StoreError> {
    let (objects, _, _) = list_objects(store, prefix, 0).await?;
    let mut entries: Vec<Entry> = Vec::new();
    for m in objects {
        let bytes = store.get(&m.location).await?.bytes().await?;
        for line in String::from_utf8_lossy(&bytes).lines() {
            if let Ok(e) = serde_json::from_str::<Entry>(line)
                && entries.last().is_none_or(|l| l.seq < e.seq)
            {
                entries.push(e);
            }
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    /// Snapshots every two blocks in these tests.
    const SNAP: u64 = 2 * PACK_ENTRIES;

    fn store(mem: &Arc<InMemory>, root: &Path) -> LedgerStore {
        LedgerStore::new(mem.clone(), root, "p").with_snapshot_blocks(2)
    }

    fn receipt(i: u64) -> Receipt {
        Receipt {
            job_uid: format!("uid-{}", i / 100),
            job: "ns/j".into(),
            shard: (i % 100) as u32,
            replica: 0,
            attempt: 1,
            node: format!("n{}", i % 7),
            account: format!("acct-{}", i % 3),
            cpu_core_millis: 1000,
            gpu_millis: 0,
            per_cpu_core_second: "0.001".into(),
            per_gpu_second: "0".into(),
            speed_factor_milli: 1000,
            amount: "0.001".into(),
            result_digest: "d".into(),
            time: "2026-11-25T00:00:00Z".into(),
            cluster: Some("edge".into()),
            forfeits: None,
            round: None,
        }
    }

    async fn names(store: &InMemory) -> Vec<String> {
        let mut v: Vec<String> = store
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .expect("list");
        v.sort();
        v
    }

    /// Appends receipts `from..to` in batches of `batch`, one job per batch.
    async fn append(l: &LedgerStore, from: u64, to: u64, batch: u64) {
        let mut i = from;
        while i < to {
            let end = (i + batch).min(to);
            let a = l
                .append((i..end).map(receipt).collect(), None)
                .await
                .expect("append");
            assert_eq!(a.written.len() as u64, end - i);
            i = end;
        }
    }

    fn signed(l: &Summary) -> Checkpoint {
        let key = merkle::key_from_hex(&"07".repeat(32)).expect("key");
        Checkpoint::sign(&key, "p", l.size, &l.root, "2026-11-25T00:00:00Z")
    }

    #[tokio::test]
    async fn appends_of_any_size_become_immutable_objects_packed_per_thousand() {
        let mem = Arc::new(InMemory::new());
        let root = Path::from("edgeloom");
        let l = store(&mem, &root);
        append(&l, 0, 150, 1).await;
        append(&l, 150, 1150, 100).await;
        append(&l, 1150, 2500, 700).await;
        let s = l.summary().await.expect("summary");
        assert_eq!((s.size, s.totals.receipts), (2500, 2500));
        let objects = names(&mem).await;
        // Two full blocks, one pack each; the open block (2000..2500) as appended.
        assert!(
            objects
                .contains(&"edgeloom/ledger/p/entries/000000000000.pack-000000001000.jsonl".into()),
            "{objects:?}"
        );
        assert!(
            objects
                .contains(&"edgeloom/ledger/p/entries/000000001000.pack-000000002000.jsonl".into()),
            "{objects:?}"
        );
        assert!(
            objects.contains(&"edgeloom/ledger/p/entries/000000002000.jsonl".into()),
            "{objects:?}"
        );
        assert!(
            objects.contains(&"edgeloom/ledger/p/snapshots/000000002000.json".into()),
            "{objects:?}"
        );
        assert_eq!(objects.len(), 4, "{objects:?}");
        assert_eq!(s.objects, 3);
        // What is stored reads back, checked, and the same receipt is never written twice.
        let (entries, at) = read_all(mem.as_ref(), &log_prefix(&root, "p"))
            .await
            .expect("reads");
        assert_eq!(entries.len(), 2500);
        assert_eq!(
            at[2001].to_string(),
            "edgeloom/ledger/p/entries/000000002000.jsonl line 2"
        );
        let again = l
            .append(vec![receipt(7), receipt(2499)], None)
            .await
            .expect("again");
        assert!(again.written.is_empty());
        // The listing is what the operator wrote: a refresh reads nothing again.
        l.refresh().await.expect("refresh");
        assert_eq!(l.summary().await.expect("s").root, s.root);
    }

    #[tokio::test]
    async fn a_restart_loads_the_snapshot_and_reads_only_what_follows() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        let l = store(&mem, &root);
        append(&l, 0, SNAP + 1500, 1000).await;
        let s = l.summary().await.expect("summary");
        let snap = s.snapshot.clone().expect("a snapshot at 2,000");
        assert_eq!(snap.size, SNAP);
        let cp = signed(&s);
        drop(l);
        let restarted = store(&mem, &root);
        restarted
            .set_anchor(Some(cp.clone()), Some(snap.clone()))
            .await;
        let r = restarted.summary().await.expect("loads from the snapshot");
        assert_eq!(
            (r.size, r.root, r.totals.clone()),
            (s.size, s.root, s.totals.clone())
        );
        assert!(restarted.job_totals("uid-3").await.expect("job").receipts == 100);
        // Keys of the snapshot are known: no receipt is paid twice.
        let again = restarted
            .append(vec![receipt(5), receipt(SNAP + 1200)], None)
            .await
            .expect("again");
        assert!(again.written.is_empty());
        append(&restarted, SNAP + 1500, SNAP + 1600, 10).await;
        // History before the snapshot is removed behind the operator's back: the running
        // operator's listing no longer matches, and a restart finds the objects changed;
        // both read the whole log, and the missing history is named.
        for i in 0..SNAP / PACK_ENTRIES {
            let p = Path::from(format!("ledger/p/entries/{:012}.jsonl", i * PACK_ENTRIES));
            mem.delete(&p).await.expect("delete");
        }
        let why = restarted.refresh().await.expect_err("gone");
        assert!(
            why.to_string()
                .contains("ledger entries 0..2000 are missing"),
            "{why}"
        );
        let again = store(&mem, &root);
        again.set_anchor(Some(cp.clone()), Some(snap.clone())).await;
        let why = again.summary().await.expect_err("gone");
        assert!(
            why.to_string()
                .contains("ledger entries 0..2000 are missing"),
            "{why}"
        );

        // A snapshot that does not match its recorded digest is not trusted.
        let mem = Arc::new(InMemory::new());
        let l = store(&mem, &root);
        append(&l, 0, SNAP, 1000).await;
        let s = l.summary().await.expect("summary");
        let snap = s.snapshot.clone().expect("snapshot");
        let object = snapshot_object(&log_prefix(&root, "p"), snap.size);
        let mut forged: serde_json::Value = serde_json::from_slice(
            &mem.get(&object)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("b"),
        )
        .expect("json");
        forged["totals"]["total"] = "1000000".into();
        mem.put(&object, serde_json::to_vec(&forged).expect("json").into())
            .await
            .expect("put");
        let restarted = store(&mem, &root);
        restarted.set_anchor(Some(signed(&s)), Some(snap)).await;
        let r = restarted
            .summary()
            .await
            .expect("reads the whole log instead");
        assert_eq!(r.totals.total, s.totals.total);
    }

    #[tokio::test]
    async fn a_rewritten_or_truncated_log_is_named_against_the_checkpoint() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        let l = store(&mem, &root);
        append(&l, 0, 30, 10).await;
        let s = l.summary().await.expect("summary");
        l.set_anchor(Some(signed(&s)), None).await;
        let last = Path::from("ledger/p/entries/000000000020.jsonl");
        let text = String::from_utf8(
            mem.get(&last)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("b")
                .to_vec(),
        )
        .expect("utf8");
        // Altered in place: the hash no longer matches.
        mem.put(&last, text.replacen("0.001", "9.001", 1).into())
            .await
            .expect("put");
        let why = l.refresh().await.expect_err("altered");
        assert!(
            why.to_string()
                .contains("ledger entry 20 (seq 20) is broken")
                && why.to_string().contains("altered"),
            "{why}"
        );
        assert!(
            why.to_string()
                .contains("entries/000000000020.jsonl line 1"),
            "{why}"
        );
        // Rewritten with recomputed hashes: consistent, but not the signed history.
        let mut lines: Vec<Entry> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("entry"))
            .collect();
        let mut prev = lines[0].prev.clone();
        for e in &mut lines {
            e.receipt.amount = "20".into();
            e.prev = prev;
            e.hash = ledger::entry_hash(e.seq, &e.prev, &e.receipt);
            prev = e.hash.clone();
        }
        let body: String = lines
            .iter()
            .map(|e| serde_json::to_string(e).expect("json") + "\n")
            .collect();
        mem.put(&last, body.into()).await.expect("put");
        let why = l.summary().await.expect_err("rewritten");
        assert!(why.to_string().contains("history was rewritten"), "{why}");
        // Removed: a valid but shorter log.
        mem.delete(&last).await.expect("delete");
        let why = l.summary().await.expect_err("truncated");
        assert!(why.to_string().contains("history was truncated"), "{why}");
    }

    #[tokio::test]
    async fn totals_of_jobs_evicted_from_memory_are_summed_again_from_the_log() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        // 100 receipts a job, 3 accounts each: 4 entries a job; room for 10 jobs.
        let l = store(&mem, &root).with_job_cache(40);
        append(&l, 0, 3000, 100).await;
        let first = l.job_totals("uid-0").await.expect("job 0");
        assert_eq!((first.receipts, first.by_account.len()), (100, 3));
        assert_eq!(first.total, "0.1".parse().expect("amount"));
        // After a restart from the snapshot too.
        let s = l.summary().await.expect("summary");
        let restarted = store(&mem, &root).with_job_cache(40);
        restarted
            .set_anchor(Some(signed(&s)), s.snapshot.clone())
            .await;
        let again = restarted.job_totals("uid-1").await.expect("job 1");
        assert_eq!(again.receipts, 100);
        assert_eq!(
            restarted.job_totals("uid-29").await.expect("last").receipts,
            100
        );
        assert_eq!(
            restarted
                .job_totals("never-paid")
                .await
                .expect("none")
                .receipts,
            0
        );
        // A job evicted and paid again: its budget counts what it was paid before.
        let mut more = receipt(0);
        more.shard = 500;
        let cap = "0.1005".parse().expect("cap");
        let a = restarted
            .append(vec![more], Some(cap))
            .await
            .expect("append");
        assert_eq!(
            a.written[0].receipt.amount, "0.0005",
            "capped by what job 0 was paid"
        );
    }

    #[tokio::test]
    async fn entries_added_behind_the_operators_back_after_its_checkpoint_are_named() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        let l = store(&mem, &root).require_anchor();
        let e = l.summary().await.expect_err("not checked yet");
        assert!(matches!(e, StoreError::NotReady), "{e}");
        l.set_anchor(None, None).await;
        append(&l, 0, 20, 10).await;
        let s = l.summary().await.expect("summary");
        l.set_anchor(Some(signed(&s)), None).await;
        append(&l, 20, 25, 5).await;
        // A correctly chained entry 25, written by someone else: the chain alone cannot
        // tell, the operator's own head can.
        let other = store(&mem, &root);
        append(&other, 25, 26, 1).await;
        let why = l.refresh().await.expect_err("added");
        assert!(
            why.to_string()
                .contains("entries were added behind its back"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn a_stale_writer_cannot_reuse_a_name_freed_by_packing() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        let a = store(&mem, &root);
        let stale = store(&mem, &root);
        append(&a, 0, 990, 990).await;
        assert_eq!(stale.summary().await.expect("stale").size, 990);
        // a completes the block in two appends and packs it, deleting 990.jsonl.
        append(&a, 990, 995, 5).await;
        append(&a, 995, 1000, 5).await;
        assert!(
            names(&mem)
                .await
                .iter()
                .any(|n| n.ends_with(".pack-000000001000.jsonl"))
        );
        let e = stale
            .append(vec![receipt(5000)], None)
            .await
            .expect_err("stale");
        assert!(matches!(e, StoreError::Conflict), "{e}");
        let (entries, _) = read_all(mem.as_ref(), &Path::from("ledger/p"))
            .await
            .expect("reads");
        assert_eq!(entries.len(), 1000, "the stale write left nothing behind");
    }

    #[tokio::test]
    async fn objects_the_operator_never_writes_are_refused() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        let l = store(&mem, &root);
        append(&l, 0, 1000, 500).await;
        let pack = Path::from("ledger/p/entries/000000000000.pack-000000001000.jsonl");
        let text = String::from_utf8(
            mem.get(&pack)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("b")
                .to_vec(),
        )
        .expect("utf8");
        // A leftover small object that differs from the pack's copy.
        let first: Vec<&str> = text.lines().take(3).collect();
        let altered = first.join("\n").replacen("0.001", "0.002", 1) + "\n";
        mem.put(
            &Path::from("ledger/p/entries/000000000000.jsonl"),
            altered.into(),
        )
        .await
        .expect("put");
        let why = read_all(mem.as_ref(), &Path::from("ledger/p"))
            .await
            .expect_err("differs");
        assert!(
            why.to_string().contains("holds a different entry 0"),
            "{why}"
        );
        mem.delete(&Path::from("ledger/p/entries/000000000000.jsonl"))
            .await
            .expect("delete");
        // A pack of a range that is not a block.
        mem.put(
            &Path::from("ledger/p/entries/000000000500.pack-000000000900.jsonl"),
            text.clone().into(),
        )
        .await
        .expect("put");
        let why = read_all(mem.as_ref(), &Path::from("ledger/p"))
            .await
            .expect_err("pack");
        assert!(
            why.to_string().contains("is not a pack of one block"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn two_writers_cannot_both_extend_the_head() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        let a = store(&mem, &root);
        let b = store(&mem, &root);
        append(&a, 0, 5, 5).await;
        assert_eq!(b.summary().await.expect("b").size, 5);
        append(&a, 5, 6, 1).await;
        // b's head is stale: its create-only put of entry 5 is refused, nothing is lost.
        let e = b
            .append(vec![receipt(100)], None)
            .await
            .expect_err("conflict");
        assert!(matches!(e, StoreError::Conflict), "{e}");
        let ok = b
            .append(vec![receipt(100)], None)
            .await
            .expect("re-read and appended");
        assert_eq!(ok.written[0].seq, 6);
        let (entries, _) = read_all(mem.as_ref(), &Path::from("ledger/p"))
            .await
            .expect("reads");
        assert_eq!(entries.len(), 7);
    }

    #[tokio::test]
    async fn escrow_survives_a_restart_from_the_snapshot() {
        let mem = Arc::new(InMemory::new());
        let root = Path::default();
        let l = store(&mem, &root);
        append(&l, 0, SNAP, 1000).await;
        let s = l.summary().await.expect("summary");
        let restarted = store(&mem, &root);
        restarted
            .set_anchor(Some(signed(&s)), s.snapshot.clone())
            .await;
        let now: jiff::Timestamp = "2026-11-25T00:10:00Z".parse().expect("time");
        let taken = restarted.forfeit("edge/n3", now).await.expect("forfeit");
        assert_eq!(taken.len(), (0..SNAP).filter(|i| i % 7 == 3).count());
        assert!(
            restarted
                .forfeit("edge/n3", now)
                .await
                .expect("again")
                .is_empty()
        );
    }
}
