//! Where the ledger lives: ConfigMaps in the operator's namespace of the hub, one chain
//! per EdgePool, split into segments of at most [`SEGMENT_ENTRIES`] entries and
//! [`SEGMENT_BYTES`] bytes (far below etcd's 1.5 MiB object limit). Segment `i` is
//! `edgeloom-ledger-<pool>-<i:06>`, labelled `edgeloom.io/ledger=<pool>`, holding its
//! entries as JSON lines under `entries.jsonl`.
//!
//! Exactly once: receipts are prepared on the chain's head and written with the
//! segment's resourceVersion (optimistic concurrency), so a write lands whole or not at
//! all, and two writers cannot both extend the same head. The chain is the source of
//! truth: job and pool totals are computed from it, so a crash between a write and a
//! status update loses nothing, and a receipt key that is in the chain is never written
//! again. A chain that does not verify is never extended.
//!
//! The reputation store (adaptive trust) keeps [`crate::rewards::trust::Reputation`] in 16
//! ConfigMaps per pool (`edgeloom-reputation-<pool>-<k>`), by hash of the node.

use crate::decimal::{Amount, DecimalError};
use crate::rewards::ledger::{self, Broken, Entry, Ledger, Receipt};
use crate::rewards::merkle::{self, Checkpoint, Frontier};
use crate::rewards::trust::Reputation;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio::sync::Mutex;

/// Most entries per segment.
pub const SEGMENT_ENTRIES: usize = 1000;
/// Most bytes of entries per segment.
pub const SEGMENT_BYTES: usize = 768 * 1024;
/// Label naming the pool of a ledger segment.
pub const LEDGER_LABEL: &str = "edgeloom.io/ledger";
/// Label naming the pool of a reputation shard.
pub const REPUTATION_LABEL: &str = "edgeloom.io/reputation";
/// Annotation with the segment's index.
pub const SEGMENT_ANNOTATION: &str = "edgeloom.io/segment";
/// Data key of the entries.
pub const ENTRIES_KEY: &str = "entries.jsonl";
/// Data key of a reputation shard.
pub const REPUTATION_KEY: &str = "reputation.json";
const REPUTATION_SHARDS: usize = 16;

/// A pool name usable in object names and label values (long names are shortened and
/// made unique with a hash).
pub fn pool_token(pool: &str) -> String {
    if pool.len() <= 40 {
        return pool.to_string();
    }
    let hash = hex::encode(Sha256::digest(pool.as_bytes()));
    format!("{}-{}", pool[..31].trim_end_matches(['-', '.']), &hash[..8])
}

/// Name of segment `index` of `pool`'s ledger.
pub fn segment_name(pool: &str, index: usize) -> String {
    format!("edgeloom-ledger-{}-{index:06}", pool_token(pool))
}

/// Why the ledger cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The hub API failed.
    #[error("hub API: {0}")]
    Api(#[from] kube::Error),
    /// Someone else wrote the ledger since it was read (it is re-read next time).
    #[error("the ledger changed while writing (re-reading it)")]
    Conflict,
    /// The stored chain does not verify.
    #[error("{0}")]
    Broken(String),
    /// An amount is unusable.
    #[error("{0}")]
    Decimal(#[from] DecimalError),
}

/// A segment as read from the API.
#[derive(Clone, Debug)]
pub struct RawSegment {
    /// Object name.
    pub name: String,
    /// Index (annotation).
    pub index: usize,
    /// The JSON lines.
    pub data: String,
}

impl RawSegment {
    /// Reads a ConfigMap as a segment.
    pub fn from_config_map(cm: &ConfigMap) -> RawSegment {
        let name = cm.metadata.name.clone().unwrap_or_default();
        let index = cm
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SEGMENT_ANNOTATION))
            .and_then(|i| i.parse().ok())
            .or_else(|| name.rsplit('-').next().and_then(|i| i.parse().ok()))
            .unwrap_or(usize::MAX);
        let data = cm
            .data
            .as_ref()
            .and_then(|d| d.get(ENTRIES_KEY))
            .cloned()
            .unwrap_or_default();
        RawSegment { name, index, data }
    }
}

/// Where an entry is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    /// Segment object name.
    pub segment: String,
    /// Line in it, from 1.
    pub line: usize,
}

/// Reads segments (any order) into the chain and verifies it; an error names the segment
/// and line of the first entry that is missing, unreadable or does not fit.
pub fn parse_segments(
    mut segments: Vec<RawSegment>,
) -> Result<(Vec<Entry>, Vec<Location>), String> {
    segments.sort_by_key(|s| s.index);
    let mut entries = Vec::new();
    let mut locations = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        if seg.index != i {
            return Err(format!(
                "ledger segment {i} is missing (found {} in its place)",
                seg.name
            ));
        }
        for (n, line) in seg.data.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let entry: Entry = serde_json::from_str(line).map_err(|e| {
                format!(
                    "ledger entry {} ({} line {}) is unreadable: {e}",
                    entries.len(),
                    seg.name,
                    n + 1
                )
            })?;
            entries.push(entry);
            locations.push(Location {
                segment: seg.name.clone(),
                line: n + 1,
            });
        }
    }
    if let Err(b) = ledger::verify(&entries) {
        return Err(describe(&b, &locations));
    }
    Ok((entries, locations))
}

/// A broken link with where it is stored.
pub fn describe(b: &Broken, locations: &[Location]) -> String {
    match locations.get(b.index) {
        Some(l) => format!("{b} ({} line {})", l.segment, l.line),
        None => b.to_string(),
    }
}

/// Totals of a set of receipts (less forfeits).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Receipts (forfeits not counted).
    pub receipts: u64,
    /// Forfeits: receipts taken back from nodes caught while they were in escrow.
    pub forfeits: u64,
    /// Sum of amounts.
    pub total: Amount,
    /// Sum per account.
    pub by_account: BTreeMap<String, Amount>,
}

impl Totals {
    fn add(&mut self, r: &Receipt) -> Result<(), DecimalError> {
        let amount: Amount = r.amount.parse()?;
        if r.forfeits.is_some() {
            self.forfeits += 1;
            self.total = self.total.saturating_sub(amount);
            let a = self.by_account.entry(r.account.clone()).or_default();
            *a = a.saturating_sub(amount);
            return Ok(());
        }
        self.receipts += 1;
        self.total = self.total.checked_add(amount)?;
        let a = self.by_account.entry(r.account.clone()).or_default();
        *a = a.checked_add(amount)?;
        Ok(())
    }
}

#[derive(Debug)]
struct Segment {
    name: String,
    resource_version: Option<String>,
    entries: usize,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Loaded {
    ledger: Ledger,
    segments: Vec<Segment>,
    /// The open (last) segment's text.
    open_text: String,
    by_job: HashMap<String, Totals>,
    totals: Totals,
    /// The ledger as a Merkle log: its frontier (O(log n) hashes).
    tree: Frontier,
    /// Receipts still in escrow (younger than the window), by "cluster/node".
    escrow: HashMap<String, Vec<Receipt>>,
    /// The escrow window in seconds.
    escrow_seconds: i64,
}

impl Loaded {
    fn commit(&mut self, entries: Vec<Entry>) -> Result<(), StoreError> {
        for e in &entries {
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
                    // Keep only what is still in escrow as of this receipt.
                    let window = self.escrow_seconds;
                    if let Ok(now) = e.receipt.time.parse::<jiff::Timestamp>() {
                        held.retain(|r| in_escrow(r, now, window));
                    }
                }
                None => {}
            }
            self.by_job
                .entry(e.receipt.job_uid.clone())
                .or_default()
                .add(&e.receipt)?;
            self.totals.add(&e.receipt)?;
        }
        self.ledger
            .commit(entries)
            .map_err(|b| StoreError::Broken(b.to_string()))
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

fn in_escrow(r: &Receipt, now: jiff::Timestamp, window: i64) -> bool {
    r.time
        .parse::<jiff::Timestamp>()
        .is_ok_and(|t| now.duration_since(t).as_secs() < window)
}

/// Which of one job's `receipts` (in order) may be appended: those with new keys, each
/// amount capped so that the job's total in this ledger (`job`) never passes `cap` (a
/// receipt never takes a job past its budget; what is left of the budget may be 0), and
/// none whose amount is malformed or would overflow the job's or the pool's (`pool`)
/// totals: such a receipt is refused with the reason, the others go on.
pub fn admit(
    ledger: &Ledger,
    receipts: Vec<Receipt>,
    job: &Totals,
    pool: &Totals,
    cap: Option<Amount>,
) -> (Vec<Receipt>, Vec<(String, String)>) {
    let mut left = cap.map(|c| c.saturating_sub(job.total));
    let (mut job_total, mut pool_total) = (job.total, pool.total);
    let mut admitted = Vec::new();
    let mut refused = Vec::new();
    let mut seen = HashSet::new();
    for mut r in receipts {
        let key = r.key();
        if ledger.contains(&key) || !seen.insert(key.clone()) {
            continue;
        }
        if r.forfeits.is_some() {
            // Takes back a receipt's amount: no budget, and it cannot overflow.
            admitted.push(r);
            continue;
        }
        let amount: Amount = match r.amount.parse() {
            Ok(a) => a,
            Err(e) => {
                refused.push((key, format!("amount {:?}: {e}", r.amount)));
                continue;
            }
        };
        let amount = match left.as_mut() {
            Some(l) => {
                let paid = amount.min(*l);
                *l = l.saturating_sub(paid);
                paid
            }
            None => amount,
        };
        match (
            job_total.checked_add(amount),
            pool_total.checked_add(amount),
        ) {
            (Ok(j), Ok(p)) => (job_total, pool_total) = (j, p),
            _ => {
                refused.push((key, format!("amount {amount} would overflow the totals")));
                continue;
            }
        }
        r.amount = amount.to_string();
        admitted.push(r);
    }
    (admitted, refused)
}

/// One pool's ledger in the hub.
pub struct LedgerStore {
    api: Api<ConfigMap>,
    pool: String,
    state: Mutex<Option<Loaded>>,
    /// The latest signed checkpoint: a loaded ledger must begin with the history it covers.
    anchor: std::sync::Mutex<Option<Checkpoint>>,
    /// The pool's escrow window, seconds.
    escrow_seconds: std::sync::atomic::AtomicI64,
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
}

impl LedgerStore {
    /// The store of `pool`'s ledger in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, pool: &str) -> LedgerStore {
        LedgerStore {
            api: Api::namespaced(client, namespace),
            pool: pool.to_string(),
            state: Mutex::new(None),
            anchor: std::sync::Mutex::new(None),
            escrow_seconds: std::sync::atomic::AtomicI64::new(3600),
        }
    }

    fn selector(&self) -> String {
        format!("{LEDGER_LABEL}={}", pool_token(&self.pool))
    }

    async fn load(&self) -> Result<Loaded, StoreError> {
        let list = self
            .api
            .list(&ListParams::default().labels(&self.selector()))
            .await?;
        let mut raw: Vec<(RawSegment, Option<String>)> = list
            .items
            .iter()
            .map(|cm| {
                (
                    RawSegment::from_config_map(cm),
                    cm.metadata.resource_version.clone(),
                )
            })
            .collect();
        raw.sort_by_key(|(s, _)| s.index);
        let segments = raw
            .iter()
            .map(|(s, rv)| Segment {
                name: s.name.clone(),
                resource_version: rv.clone(),
                entries: s.data.lines().filter(|l| !l.trim().is_empty()).count(),
                bytes: s.data.len(),
            })
            .collect();
        let open_text = raw.last().map(|(s, _)| s.data.clone()).unwrap_or_default();
        // The segments' text moves into parsing (it can be tens of MiB): no second copy.
        let (entries, _) = parse_segments(raw.into_iter().map(|(s, _)| s).collect())
            .map_err(StoreError::Broken)?;
        // Internally consistent is not enough: the ledger must still begin with the
        // history the last signed checkpoint covered (no truncation, no rewritten suffix).
        let anchor = self.anchor.lock().ok().and_then(|a| a.clone());
        if let Some(cp) = anchor {
            let mut prefix = Frontier::default();
            for e in entries.iter().take(cp.size as usize) {
                prefix.push(merkle::leaf_hash(&e.hash));
            }
            cp.check_prefix(entries.len() as u64, &prefix)
                .map_err(StoreError::Broken)?;
        }
        let mut loaded = Loaded {
            segments,
            open_text,
            escrow_seconds: self
                .escrow_seconds
                .load(std::sync::atomic::Ordering::Relaxed),
            // Appending needs keys, length and head only; receipts stay in the API.
            ledger: Ledger::default().index_only(),
            ..Loaded::default()
        };
        loaded.commit(entries)?;
        Ok(loaded)
    }

    /// Runs `f` on the loaded ledger, reading it first if needed.
    async fn with<T>(
        &self,
        f: impl AsyncFnOnce(&mut Loaded) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.state.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        let loaded = guard.as_mut().expect("loaded above");
        let result = f(loaded).await;
        if matches!(
            result,
            Err(StoreError::Api(_) | StoreError::Conflict | StoreError::Broken(_))
        ) {
            // Re-read everything next time rather than trust a state the API disagrees with.
            *guard = None;
        }
        result
    }

    /// Appends one job's receipts whose keys are not in the chain yet, as [`admit`] allows
    /// them (`cap`: what the job may still be paid in this ledger, from its budget);
    /// returns the new entries and the receipts refused, with why.
    pub async fn append(
        &self,
        receipts: Vec<Receipt>,
        cap: Option<Amount>,
    ) -> Result<Appended, StoreError> {
        let pool = self.pool.clone();
        let api = self.api.clone();
        let label = pool_token(&self.pool);
        self.with(async move |l: &mut Loaded| {
            let job = receipts
                .first()
                .and_then(|r| l.by_job.get(&r.job_uid))
                .cloned()
                .unwrap_or_default();
            let (admitted, refused) = admit(&l.ledger, receipts, &job, &l.totals, cap);
            let prepared = l.ledger.prepare(admitted);
            let mut written = Vec::new();
            let mut rest = prepared.into_iter().peekable();
            while rest.peek().is_some() {
                let (room, space, open) = match l.segments.last() {
                    Some(s) => (
                        SEGMENT_ENTRIES.saturating_sub(s.entries),
                        SEGMENT_BYTES.saturating_sub(s.bytes),
                        true,
                    ),
                    None => (0, 0, false),
                };
                let (room, space, open) = if room == 0 || space < 4096 {
                    (SEGMENT_ENTRIES, SEGMENT_BYTES, false)
                } else {
                    (room, space, open)
                };
                let mut chunk = Vec::new();
                let mut text = String::new();
                while let Some(e) = rest.peek() {
                    let line = serde_json::to_string(e).unwrap_or_default() + "\n";
                    if chunk.len() == room || (text.len() + line.len() > space && !chunk.is_empty())
                    {
                        break;
                    }
                    text.push_str(&line);
                    chunk.push(rest.next().expect("peeked"));
                }
                let index = if open {
                    l.segments.len() - 1
                } else {
                    l.segments.len()
                };
                let name = segment_name(&pool, index);
                let full = if open {
                    format!("{}{text}", l.open_text)
                } else {
                    text
                };
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some(BTreeMap::from([(LEDGER_LABEL.into(), label.clone())])),
                        annotations: Some(BTreeMap::from([
                            (SEGMENT_ANNOTATION.into(), index.to_string()),
                            ("edgeloom.io/pool".into(), pool.clone()),
                        ])),
                        resource_version: if open {
                            l.segments.last().and_then(|s| s.resource_version.clone())
                        } else {
                            None
                        },
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(ENTRIES_KEY.into(), full.clone())])),
                    ..ConfigMap::default()
                };
                let stored = if open {
                    api.replace(&name, &PostParams::default(), &cm).await
                } else {
                    api.create(&PostParams::default(), &cm).await
                };
                let stored = match stored {
                    Ok(s) => s,
                    Err(kube::Error::Api(s)) if s.code == 409 => return Err(StoreError::Conflict),
                    Err(e) => return Err(e.into()),
                };
                let segment = Segment {
                    name,
                    resource_version: stored.metadata.resource_version,
                    entries: full.lines().count(),
                    bytes: full.len(),
                };
                if open {
                    *l.segments.last_mut().expect("open segment") = segment;
                } else {
                    l.segments.push(segment);
                }
                l.open_text = full;
                written.extend(chunk.iter().cloned());
                l.commit(chunk)?;
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

    /// Makes `cp` (a checkpoint whose signature was checked) the history a loaded ledger
    /// must begin with. A ledger loaded already that it does not describe is read again
    /// (and checked) on next use.
    pub async fn set_anchor(&self, cp: Checkpoint) {
        let mut guard = self.state.lock().await;
        let describes = guard
            .as_ref()
            .is_some_and(|l| l.tree.size() == cp.size && Ok(l.tree.root()) == cp.root_hash());
        if !describes {
            *guard = None;
        }
        if let Ok(mut a) = self.anchor.lock() {
            *a = Some(cp);
        }
    }

    /// Head and totals.
    pub async fn summary(&self) -> Result<Summary, StoreError> {
        self.with(async |l: &mut Loaded| {
            Ok(Summary {
                head: l.ledger.head().to_string(),
                totals: l.totals.clone(),
                size: l.tree.size(),
                root: l.tree.root(),
            })
        })
        .await
    }

    /// Totals of one job's receipts.
    pub async fn job_totals(&self, job_uid: &str) -> Result<Totals, StoreError> {
        self.with(async |l: &mut Loaded| Ok(l.by_job.get(job_uid).cloned().unwrap_or_default()))
            .await
    }

    /// Re-reads the chain when any segment changed (or appeared or vanished) in the API
    /// since it was read, so that an alteration behind the operator's back is found.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let metas = self
            .api
            .list_metadata(&ListParams::default().labels(&self.selector()))
            .await?;
        let mut guard = self.state.lock().await;
        let current: BTreeMap<String, Option<String>> = metas
            .items
            .iter()
            .map(|m| {
                (
                    m.metadata.name.clone().unwrap_or_default(),
                    m.metadata.resource_version.clone(),
                )
            })
            .collect();
        let known: Option<BTreeMap<String, Option<String>>> = guard.as_ref().map(|l| {
            l.segments
                .iter()
                .map(|s| (s.name.clone(), s.resource_version.clone()))
                .collect()
        });
        if known.as_ref() != Some(&current) {
            *guard = None;
            *guard = Some(self.load().await?);
        }
        Ok(())
    }
}

/// Name of reputation shard `shard` of `pool`.
pub fn reputation_name(pool: &str, shard: usize) -> String {
    format!("edgeloom-reputation-{}-{shard:02}", pool_token(pool))
}

/// The shard holding `node`'s record ("cluster/node").
pub fn reputation_shard_of(node: &str) -> usize {
    shard_of(node)
}

/// The records in one reputation ConfigMap.
pub fn reputation_shard(cm: &ConfigMap) -> Result<Reputation, String> {
    let name = cm.metadata.name.clone().unwrap_or_default();
    Ok(cm
        .data
        .as_ref()
        .and_then(|d| d.get(REPUTATION_KEY))
        .map(|j| serde_json::from_str(j))
        .transpose()
        .map_err(|e| format!("{name}: {e}"))?
        .unwrap_or_default())
}

/// One pool's reputation records in the hub.
pub struct ReputationStore {
    api: Api<ConfigMap>,
    pool: String,
    state: Mutex<Option<(Reputation, Vec<Option<String>>)>>,
}

fn shard_of(node: &str) -> usize {
    Sha256::digest(node.as_bytes())[0] as usize % REPUTATION_SHARDS
}

fn random_salt() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    let mut h = Sha256::new();
    h.update(bytes);
    h.update(format!(
        "{:?}{}",
        std::time::SystemTime::now(),
        std::process::id()
    ));
    hex::encode(h.finalize())
}

impl ReputationStore {
    /// The store of `pool`'s reputation in `namespace`.
    pub fn new(client: kube::Client, namespace: &str, pool: &str) -> ReputationStore {
        ReputationStore {
            api: Api::namespaced(client, namespace),
            pool: pool.to_string(),
            state: Mutex::new(None),
        }
    }

    fn name(&self, shard: usize) -> String {
        reputation_name(&self.pool, shard)
    }

    async fn load(&self) -> Result<(Reputation, Vec<Option<String>>), StoreError> {
        let list = self
            .api
            .list(
                &ListParams::default()
                    .labels(&format!("{REPUTATION_LABEL}={}", pool_token(&self.pool))),
            )
            .await?;
        let mut rep = Reputation::default();
        let mut versions = vec![None; REPUTATION_SHARDS];
        for cm in &list.items {
            let name = cm.metadata.name.clone().unwrap_or_default();
            let Some(shard) = (0..REPUTATION_SHARDS).find(|s| self.name(*s) == name) else {
                continue;
            };
            versions[shard] = cm.metadata.resource_version.clone();
            let part = reputation_shard(cm).map_err(StoreError::Broken)?;
            if shard == 0 {
                rep.salt = part.salt;
            }
            rep.nodes.extend(part.nodes);
        }
        Ok((rep, versions))
    }

    /// Reads the records (and creates the salt once).
    async fn ensure(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<(Reputation, Vec<Option<String>>)>>, StoreError>
    {
        let mut guard = self.state.lock().await;
        if guard.is_none() {
            let (mut rep, versions) = self.load().await?;
            *guard = Some((rep.clone(), versions));
            if rep.salt.is_empty() {
                rep.salt = random_salt();
                let mut shards = vec![false; REPUTATION_SHARDS];
                shards[0] = true;
                if let Err(e) = self
                    .write(guard.as_mut().expect("set"), &rep, &shards)
                    .await
                {
                    *guard = None;
                    return Err(e);
                }
            }
        }
        Ok(guard)
    }

    async fn write(
        &self,
        state: &mut (Reputation, Vec<Option<String>>),
        rep: &Reputation,
        shards: &[bool],
    ) -> Result<(), StoreError> {
        for (shard, _) in shards.iter().enumerate().filter(|(_, w)| **w) {
            let part = Reputation {
                salt: if shard == 0 {
                    rep.salt.clone()
                } else {
                    String::new()
                },
                nodes: rep
                    .nodes
                    .iter()
                    .filter(|(n, _)| shard_of(n) == shard)
                    .map(|(n, r)| (n.clone(), r.clone()))
                    .collect(),
            };
            let name = self.name(shard);
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([(
                        REPUTATION_LABEL.into(),
                        pool_token(&self.pool),
                    )])),
                    annotations: Some(BTreeMap::from([(
                        "edgeloom.io/pool".into(),
                        self.pool.clone(),
                    )])),
                    resource_version: state.1[shard].clone(),
                    ..ObjectMeta::default()
                },
                data: Some(BTreeMap::from([(
                    REPUTATION_KEY.into(),
                    serde_json::to_string(&part).unwrap_or_default(),
                )])),
                ..ConfigMap::default()
            };
            let stored = match &state.1[shard] {
                Some(_) => self.api.replace(&name, &PostParams::default(), &cm).await,
                None => self.api.create(&PostParams::default(), &cm).await,
            };
            match stored {
                Ok(s) => state.1[shard] = s.metadata.resource_version,
                Err(kube::Error::Api(s)) if s.code == 409 => return Err(StoreError::Conflict),
                Err(e) => return Err(e.into()),
            }
        }
        state.0 = rep.clone();
        Ok(())
    }

    /// Re-reads the records when any of the pool's reputation ConfigMaps changed behind the
    /// operator's back (e.g. `kubectl edgeloom ledger forgive` cleared a node's record).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let metas = self
            .api
            .list_metadata(
                &ListParams::default()
                    .labels(&format!("{REPUTATION_LABEL}={}", pool_token(&self.pool))),
            )
            .await?;
        let mut current = vec![None; REPUTATION_SHARDS];
        for m in &metas.items {
            let name = m.metadata.name.clone().unwrap_or_default();
            if let Some(shard) = (0..REPUTATION_SHARDS).find(|s| self.name(*s) == name) {
                current[shard] = m.metadata.resource_version.clone();
            }
        }
        let mut guard = self.state.lock().await;
        if guard
            .as_ref()
            .is_some_and(|(_, versions)| *versions != current)
        {
            *guard = None;
        }
        drop(guard);
        self.ensure().await.map(|_| ())
    }

    /// Whether `node` is trusted, the spot-check salt.
    pub async fn view(
        &self,
        nodes: &[String],
        threshold: u32,
    ) -> Result<(Vec<bool>, String), StoreError> {
        let guard = self.ensure().await?;
        let rep = &guard.as_ref().expect("loaded").0;
        Ok((
            nodes.iter().map(|n| rep.trusted(n, threshold)).collect(),
            rep.salt.clone(),
        ))
    }

    /// Each timed node's speed relative to its peers (thousandths), by "cluster/node".
    pub async fn relative_speeds(&self) -> Result<HashMap<String, u32>, StoreError> {
        let guard = self.ensure().await?;
        Ok(guard
            .as_ref()
            .expect("loaded")
            .0
            .nodes
            .iter()
            .filter_map(|(n, r)| Some((n.clone(), r.relative_speed_milli?)))
            .collect())
    }

    /// Nodes caught at least `after` times (none when `after` is 0).
    pub async fn quarantined(&self, after: u32) -> Result<HashSet<String>, StoreError> {
        let guard = self.ensure().await?;
        if after == 0 {
            return Ok(HashSet::new());
        }
        Ok(guard
            .as_ref()
            .expect("loaded")
            .0
            .nodes
            .iter()
            .filter(|(_, r)| r.caught >= after as u64)
            .map(|(n, _)| n.clone())
            .collect())
    }

    /// Applies verdicts: verified results of `valid` nodes (with their relative speed where
    /// timed), and `caught` (node, result key).
    /// Retried on a conflicting write after re-reading. Returns how many caught results
    /// were new.
    pub async fn update(
        &self,
        valid: &[(String, Option<u32>)],
        caught: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        if valid.is_empty() && caught.is_empty() {
            return Ok(Vec::new());
        }
        for _ in 0..3 {
            let mut guard = self.ensure().await?;
            let state = guard.as_mut().expect("loaded");
            let mut rep = state.0.clone();
            let mut shards = vec![false; REPUTATION_SHARDS];
            let mut new_caught = Vec::new();
            for (n, speed) in valid {
                rep.record_valid(n, *speed);
                shards[shard_of(n)] = true;
            }
            for (n, key) in caught {
                if rep.record_caught(n, key) {
                    shards[shard_of(n)] = true;
                    new_caught.push(n.clone());
                }
            }
            match self.write(state, &rep, &shards).await {
                Ok(()) => return Ok(new_caught),
                Err(StoreError::Conflict) => *guard = None,
                Err(e) => {
                    *guard = None;
                    return Err(e);
                }
            }
        }
        Err(StoreError::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<Entry> {
        let mut l = Ledger::default();
        for i in 0..n {
            l.append(Receipt {
                job_uid: format!("uid-{i}"),
                job: "ns/j".into(),
                shard: 0,
                replica: 0,
                attempt: 1,
                node: "n".into(),
                account: "alice".into(),
                cpu_core_millis: 1,
                gpu_millis: 0,
                per_cpu_core_second: "1".into(),
                per_gpu_second: "0".into(),
                speed_factor_milli: 1000,
                amount: "0.001".into(),
                result_digest: "d".into(),
                time: "t".into(),
                cluster: None,
                forfeits: None,
            });
        }
        l.entries().to_vec()
    }

    fn segments(e: &[Entry], per: usize) -> Vec<RawSegment> {
        e.chunks(per)
            .enumerate()
            .map(|(i, c)| RawSegment {
                name: segment_name("pool", i),
                index: i,
                data: c
                    .iter()
                    .map(|e| serde_json::to_string(e).expect("json") + "\n")
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn segments_read_in_index_order_and_breaks_are_located() {
        let e = entries(10);
        let mut segs = segments(&e, 4);
        segs.reverse();
        let (read, locations) = parse_segments(segs.clone()).expect("reads");
        assert_eq!(read, e);
        assert_eq!(locations[5].segment, "edgeloom-ledger-pool-000001");
        assert_eq!(locations[5].line, 2);

        let mut altered = segs.clone();
        // segs reversed: index 1 is segment 1 (entries 4..8); its first line is entry 4.
        altered[1].data = altered[1].data.replacen("0.001", "9.001", 3);
        let why = parse_segments(altered).expect_err("altered");
        assert!(why.contains("entry 4") && why.contains("altered"), "{why}");
        assert!(why.contains("edgeloom-ledger-pool-000001 line 1"), "{why}");

        let missing: Vec<RawSegment> = segs.into_iter().filter(|s| s.index != 1).collect();
        let why = parse_segments(missing).expect_err("missing");
        assert!(why.contains("segment 1 is missing"), "{why}");
    }

    fn receipt(shard: u32, amount: &str) -> Receipt {
        let mut r = entries(1).remove(0).receipt;
        r.shard = shard;
        r.amount = amount.into();
        r
    }

    fn amount(s: &str) -> Amount {
        s.parse().expect("amount")
    }

    #[test]
    fn a_receipt_never_takes_a_job_past_its_budget() {
        let ledger = Ledger::default();
        let job = Totals {
            receipts: 1,
            forfeits: 0,
            total: amount("0.6"),
            by_account: BTreeMap::new(),
        };
        let rs = vec![receipt(1, "0.3"), receipt(2, "0.3"), receipt(3, "0.3")];
        let (ok, refused) = admit(&ledger, rs, &job, &Totals::default(), Some(amount("1")));
        assert!(refused.is_empty());
        let paid: Vec<&str> = ok.iter().map(|r| r.amount.as_str()).collect();
        assert_eq!(paid, ["0.3", "0.1", "0"], "capped at the budget, in order");
        // Without a budget, amounts are as computed; a key already in the chain is skipped.
        let chain = entries(1);
        let ledger = Ledger::from_entries(chain.clone()).expect("chain");
        let again = chain[0].receipt.clone();
        let (ok, _) = admit(
            &ledger,
            vec![again, receipt(5, "0.3")],
            &job,
            &Totals::default(),
            None,
        );
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].amount, "0.3");
    }

    #[test]
    fn a_forfeit_takes_a_receipt_back_once_and_ignores_the_budget() {
        let mut paid = receipt(1, "0.3");
        paid.cluster = Some("edge-a".into());
        let forfeit = paid.forfeit("2026-11-25T01:00:00Z");
        assert_eq!(forfeit.key(), format!("forfeit/{}", paid.key()));
        assert_eq!(forfeit.node_key(), format!("edge-a/{}", paid.node));
        let mut t = Totals::default();
        t.add(&paid).expect("paid");
        t.add(&forfeit).expect("forfeited");
        assert_eq!((t.receipts, t.forfeits, t.total), (1, 1, Amount::ZERO));
        assert_eq!(t.by_account[&paid.account], Amount::ZERO);
        // A budget spent in full does not stop a forfeit; a forfeit written is not again.
        let job = Totals {
            receipts: 1,
            forfeits: 0,
            total: amount("1"),
            by_account: BTreeMap::new(),
        };
        let (ok, refused) = admit(
            &Ledger::default(),
            vec![forfeit.clone()],
            &job,
            &job,
            Some(amount("1")),
        );
        assert_eq!((ok.len(), refused.len()), (1, 0));
        assert_eq!(ok[0].amount, "0.3");
        let mut l = Ledger::default();
        l.append(forfeit.clone());
        let (ok, _) = admit(&l, vec![forfeit], &job, &job, None);
        assert!(ok.is_empty());
    }

    #[test]
    fn a_receipt_that_would_overflow_is_refused_alone() {
        let ledger = Ledger::default();
        let near = Totals {
            receipts: 1,
            forfeits: 0,
            total: Amount::from_atto(u128::MAX - 10),
            by_account: BTreeMap::new(),
        };
        let huge = Amount::from_atto(u128::MAX / 2).to_string();
        let rs = vec![
            receipt(1, &huge),
            receipt(2, "bogus"),
            receipt(3, "0.000000000000000005"),
        ];
        let (ok, refused) = admit(&ledger, rs, &Totals::default(), &near, None);
        assert_eq!(ok.len(), 1, "the one that fits is written");
        assert_eq!(ok[0].shard, 3);
        assert_eq!(refused.len(), 2);
        assert!(refused[0].1.contains("overflow"), "{refused:?}");
        assert!(refused[1].1.contains("bogus"), "{refused:?}");
    }

    #[test]
    fn long_pool_names_make_valid_object_names() {
        let long = "p".repeat(200);
        let name = segment_name(&long, 3);
        assert!(name.len() < 80, "{name}");
        assert!(pool_token(&long).len() <= 63);
        assert_ne!(pool_token(&long), pool_token(&"p".repeat(201)));
    }
}
