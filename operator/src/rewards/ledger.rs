//! The reward ledger as a hash chain (docs/ARCHITECTURE.md, "Rewards"). Pure: storage is elsewhere.
//!
//! Each entry holds a receipt, its sequence number, the previous entry's hash and its own
//! hash: sha256 over the sequence number, the previous hash and the receipt's canonical
//! JSON. Appending is idempotent by receipt key (job UID, shard, replica): a receipt that
//! is already in the chain is not added again, whatever attempt or amount it claims.
//! [`verify`] recomputes the chain and names the first entry that does not fit.

use crate::decimal::{Amount, DecimalError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// The hash before the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Payment for one accepted shard result of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    /// UID of the job.
    pub job_uid: String,
    /// "namespace/name" of the job.
    pub job: String,
    /// Shard index.
    pub shard: u32,
    /// Replica index.
    pub replica: u32,
    /// The accepted attempt.
    pub attempt: u32,
    /// Node that did the work.
    pub node: String,
    /// Contributor account paid.
    pub account: String,
    /// CPU core-milliseconds.
    pub cpu_core_millis: u64,
    /// GPU-milliseconds.
    pub gpu_millis: u64,
    /// Rate per CPU-core-second, exact decimal.
    pub per_cpu_core_second: String,
    /// Rate per GPU-second, exact decimal.
    pub per_gpu_second: String,
    /// Speed factor in thousandths (1000 = the pool median; 1000 when the pool does not
    /// normalise by speed).
    pub speed_factor_milli: u64,
    /// Amount paid, exact decimal.
    pub amount: String,
    /// The accepted result digest.
    pub result_digest: String,
    /// When it was issued (RFC 3339).
    pub time: String,
    /// Member cluster of the node (with `node`, who did the work).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Set on a forfeit: the key of the receipt it takes back (its node was caught
    /// cheating while the receipt was in escrow). Its amount is subtracted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forfeits: Option<String>,
    /// A Federated job's round (its update or aggregation of that round is paid; `shard`
    /// is the participant's index, `replica` 0 for an update, 1 for an aggregation, 2 for
    /// the initial model and 3 for an evaluation). Last, and absent otherwise, so that
    /// the entries of every other receipt hash as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
}

impl Receipt {
    /// The idempotency key: (job UID, shard, replica), with `r<round>/` before the shard
    /// for a Federated round; a forfeit's is "forfeit/" and the key of the receipt it
    /// takes back.
    pub fn key(&self) -> String {
        match (&self.forfeits, self.round) {
            (Some(k), _) => format!("forfeit/{k}"),
            (None, Some(r)) => format!("{}/r{r}/{}/{}", self.job_uid, self.shard, self.replica),
            (None, None) => format!("{}/{}/{}", self.job_uid, self.shard, self.replica),
        }
    }

    /// "cluster/node" of the node that did the work (as trust records name it).
    pub fn node_key(&self) -> String {
        format!(
            "{}/{}",
            self.cluster.as_deref().unwrap_or_default(),
            self.node
        )
    }

    /// The forfeit of this receipt, issued at `time`.
    pub fn forfeit(&self, time: &str) -> Receipt {
        Receipt {
            forfeits: Some(self.key()),
            time: time.to_string(),
            ..self.clone()
        }
    }
}

/// The reward formula: `(CPU-core-seconds x perCpuCoreSecond + GPU-seconds x
/// perGpuSecond) x speed factor`, rounded down to 10^-18. The factor is 1000/1000 unless
/// the pool normalises by speed (see [`speed_factor_milli`]).
pub fn reward(
    cpu_core_millis: u64,
    gpu_millis: u64,
    per_cpu_core_second: Amount,
    per_gpu_second: Amount,
    speed_factor_milli: u64,
) -> Result<Amount, DecimalError> {
    // Multiply before dividing so that rounding down happens once, at the end.
    let cpu = per_cpu_core_second
        .mul_div(cpu_core_millis, 1)?
        .mul_div(speed_factor_milli, 1)?;
    let gpu = per_gpu_second
        .mul_div(gpu_millis, 1)?
        .mul_div(speed_factor_milli, 1)?;
    cpu.checked_add(gpu)?.mul_div(1, 1_000_000)
}

/// A node's speed relative to the pool median, in thousandths, clamped to [100, 10000]:
/// a node twice as fast as the median gets 2000, so it earns the same for the same work
/// although it is busy half as long. Measured speed is a float; only this integer factor
/// enters the money arithmetic. No measurement (0) counts as the median.
pub fn speed_factor_milli(node_tflops: f64, median_tflops: f64) -> u64 {
    if !(node_tflops > 0.0 && median_tflops > 0.0) {
        return 1000;
    }
    ((node_tflops / median_tflops * 1000.0).round() as u64).clamp(100, 10_000)
}

/// One link of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// Position, from 0.
    pub seq: u64,
    /// Hash of the previous entry ([`GENESIS`] for the first).
    pub prev: String,
    /// The receipt.
    pub receipt: Receipt,
    /// This entry's hash.
    pub hash: String,
}

/// The hash of an entry's contents.
pub fn entry_hash(seq: u64, prev: &str, receipt: &Receipt) -> String {
    let mut h = Sha256::new();
    h.update(seq.to_be_bytes());
    h.update(prev.as_bytes());
    // Field order is the struct's, so the JSON is canonical for a given receipt.
    h.update(serde_json::to_vec(receipt).unwrap_or_default());
    hex::encode(h.finalize())
}

/// Where and why the chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger entry {index} (seq {seq}) is broken: {reason}")]
pub struct Broken {
    /// Index of the first entry that does not fit.
    pub index: usize,
    /// Its sequence number as stored.
    pub seq: u64,
    /// What is wrong.
    pub reason: String,
}

/// Recomputes the whole chain; the first entry that does not fit is named.
pub fn verify(entries: &[Entry]) -> Result<(), Broken> {
    let mut prev = GENESIS.to_string();
    let mut keys = HashSet::new();
    for (index, e) in entries.iter().enumerate() {
        let broken = |reason: String| Broken {
            index,
            seq: e.seq,
            reason,
        };
        if e.seq != index as u64 {
            return Err(broken(format!(
                "sequence {} where {index} was expected",
                e.seq
            )));
        }
        if e.prev != prev {
            return Err(broken(
                "it does not link to the previous entry's hash".into(),
            ));
        }
        let hash = entry_hash(e.seq, &e.prev, &e.receipt);
        if e.hash != hash {
            return Err(broken(
                "its contents do not match its hash (the entry was altered)".into(),
            ));
        }
        if !keys.insert(e.receipt.key()) {
            return Err(broken(format!("receipt {} appears twice", e.receipt.key())));
        }
        prev = e.hash.clone();
    }
    Ok(())
}

/// An in-memory chain with an index of receipt keys. [`Ledger::index_only`] keeps only the
/// keys, the length and the head (what appending needs), not the receipts: the operator
/// holds its ledgers that way (about a tenth of the memory).
#[derive(Debug, Clone)]
pub struct Ledger {
    entries: Vec<Entry>,
    keys: HashSet<String>,
    len: u64,
    head: String,
    keep: bool,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger {
            entries: Vec::new(),
            keys: HashSet::new(),
            len: 0,
            head: GENESIS.to_string(),
            keep: true,
        }
    }
}

impl Ledger {
    /// A ledger over stored entries, verified first.
    pub fn from_entries(entries: Vec<Entry>) -> Result<Ledger, Broken> {
        verify(&entries)?;
        let keys = entries.iter().map(|e| e.receipt.key()).collect();
        Ok(Ledger {
            len: entries.len() as u64,
            head: entries
                .last()
                .map_or(GENESIS.to_string(), |e| e.hash.clone()),
            entries,
            keys,
            keep: true,
        })
    }

    /// This ledger without its receipts (and keeping none from now on).
    pub fn index_only(mut self) -> Ledger {
        self.entries = Vec::new();
        self.keep = false;
        self
    }

    /// Entries in the chain.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the chain is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries that appending `receipts` would add (new keys only, each key once), not
    /// yet added: write them durably, then [`Ledger::commit`] them.
    pub fn prepare(&self, receipts: Vec<Receipt>) -> Vec<Entry> {
        let mut seen = HashSet::new();
        let mut prev = self.head.clone();
        let mut seq = self.len;
        let mut out = Vec::new();
        for receipt in receipts {
            let key = receipt.key();
            if self.keys.contains(&key) || !seen.insert(key) {
                continue;
            }
            let hash = entry_hash(seq, &prev, &receipt);
            let next = hash.clone();
            out.push(Entry {
                seq,
                prev: std::mem::replace(&mut prev, next),
                receipt,
                hash,
            });
            seq += 1;
        }
        out
    }

    /// Adds entries made by [`Ledger::prepare`] on this very state (checked: they must
    /// link to the head in order).
    pub fn commit(&mut self, entries: Vec<Entry>) -> Result<(), Broken> {
        for e in entries {
            let index = self.len as usize;
            if e.seq != self.len
                || e.prev != self.head
                || e.hash != entry_hash(e.seq, &e.prev, &e.receipt)
                || self.keys.contains(&e.receipt.key())
            {
                return Err(Broken {
                    index,
                    seq: e.seq,
                    reason: "it was not prepared on the current head".into(),
                });
            }
            self.keys.insert(e.receipt.key());
            self.len += 1;
            self.head = e.hash.clone();
            if self.keep {
                self.entries.push(e);
            }
        }
        Ok(())
    }

    /// Appends `receipt` unless its key is already in the chain; returns the new entry.
    pub fn append(&mut self, receipt: Receipt) -> Option<Entry> {
        let entry = self.prepare(vec![receipt]).pop()?;
        self.commit(vec![entry.clone()]).ok()?;
        Some(entry)
    }

    /// Whether a receipt with this key is in the chain.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains(key)
    }

    /// The last entry's hash.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// The entries kept (all of them unless [`Ledger::index_only`]).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn receipt(job: u32, shard: u32, replica: u32, account: &str, atto: u128) -> Receipt {
        Receipt {
            job_uid: format!("uid-{job}"),
            job: format!("ns/job-{job}"),
            shard,
            replica,
            attempt: 1,
            node: format!("node-{shard}"),
            account: account.into(),
            cpu_core_millis: 1500,
            gpu_millis: 0,
            per_cpu_core_second: "0.0001".into(),
            per_gpu_second: "0".into(),
            speed_factor_milli: 1000,
            amount: Amount::from_atto(atto).to_string(),
            result_digest: "ab".repeat(32),
            time: "2026-11-25T00:00:00Z".into(),
            cluster: None,
            forfeits: None,
            round: None,
        }
    }

    #[test]
    fn reward_is_usage_times_rate_rounded_down() {
        let cpu: Amount = "0.0001".parse().expect("rate");
        let gpu: Amount = "0.0005".parse().expect("rate");
        assert_eq!(
            reward(1500, 2000, cpu, gpu, 1000)
                .expect("reward")
                .to_string(),
            "0.00115"
        );
        assert_eq!(
            reward(1500, 2000, cpu, gpu, 2000)
                .expect("reward")
                .to_string(),
            "0.0023"
        );
        // 1 core-ms at 0.000000000000000001 per core-second is below the smallest unit.
        let tiny: Amount = "0.000000000000000001".parse().expect("rate");
        assert_eq!(
            reward(1, 0, tiny, Amount::ZERO, 1000).expect("reward"),
            Amount::ZERO
        );
    }

    #[test]
    fn speed_factor_is_relative_to_the_median_and_clamped() {
        assert_eq!(speed_factor_milli(2.0, 1.0), 2000);
        assert_eq!(speed_factor_milli(0.5, 1.0), 500);
        assert_eq!(speed_factor_milli(0.0, 1.0), 1000);
        assert_eq!(speed_factor_milli(1000.0, 1.0), 10_000);
        assert_eq!(speed_factor_milli(f64::NAN, 1.0), 1000);
    }

    #[test]
    fn an_index_only_ledger_appends_the_same_chain_without_keeping_receipts() {
        let mut full = Ledger::default();
        let mut index = Ledger::default().index_only();
        for i in 0..10 {
            let a = full.append(receipt(i, 0, 0, "alice", 10));
            let b = index.append(receipt(i, 0, 0, "alice", 10));
            assert_eq!(a, b);
        }
        assert!(
            index.append(receipt(3, 0, 0, "alice", 99)).is_none(),
            "idempotent"
        );
        assert_eq!((index.len(), index.head()), (full.len(), full.head()));
        assert!(index.entries().is_empty());
        assert_eq!(full.entries().len(), 10);
    }

    #[test]
    fn prepared_entries_commit_and_match_appending_one_by_one() {
        let mut a = Ledger::default();
        let mut b = Ledger::default();
        let batch: Vec<Receipt> = (0..5)
            .map(|i| receipt(i, 0, 0, "alice", 10))
            .chain([receipt(0, 0, 0, "alice", 99)])
            .collect();
        for r in batch.clone() {
            a.append(r);
        }
        let prepared = b.prepare(batch);
        assert_eq!(prepared.len(), 5, "the duplicate key is left out");
        let stale = b.prepare(vec![receipt(9, 0, 0, "bob", 1)]);
        b.commit(prepared).expect("commit");
        assert_eq!(a.entries(), b.entries());
        assert!(b.commit(stale).is_err(), "prepared on an older head");
    }

    #[test]
    fn a_receipt_is_appended_once_whatever_attempt_it_claims() {
        let mut l = Ledger::default();
        assert!(l.append(receipt(1, 0, 0, "alice", 10)).is_some());
        let mut again = receipt(1, 0, 0, "alice", 99);
        again.attempt = 2;
        assert!(
            l.append(again).is_none(),
            "same job, shard and replica: not paid twice"
        );
        assert!(
            l.append(receipt(1, 0, 1, "bob", 10)).is_some(),
            "another replica is another receipt"
        );
        assert_eq!(l.entries().len(), 2);
        let alice: u128 = l
            .entries()
            .iter()
            .filter(|e| e.receipt.account == "alice")
            .map(|e| e.receipt.amount.parse::<Amount>().expect("amount").atto())
            .sum();
        assert_eq!(Amount::from_atto(alice), Amount::from_atto(10));
    }

    #[test]
    fn verify_names_the_altered_entry_even_when_its_hash_is_recomputed() {
        let mut l = Ledger::default();
        for i in 0..5 {
            l.append(receipt(i, 0, 0, "alice", 10));
        }
        let mut tampered = l.entries().to_vec();
        tampered[2].receipt.amount = "1000".into();
        let err = verify(&tampered).expect_err("altered");
        assert_eq!(err.index, 2);
        assert!(err.reason.contains("altered"), "{err}");
        // A forger who also recomputes the entry's hash breaks the next link instead.
        tampered[2].hash = entry_hash(2, &tampered[2].prev, &tampered[2].receipt);
        assert_eq!(verify(&tampered).expect_err("relinked").index, 3);
        assert!(Ledger::from_entries(l.entries().to_vec()).is_ok());
    }

    proptest! {
        #[test]
        fn any_appended_chain_verifies_and_any_single_change_is_caught(
            items in prop::collection::vec((0u32..20, 0u32..4, 0u32..2, 0usize..3, 0u128..1_000_000), 1..40),
            victim in any::<prop::sample::Index>(),
            field in 0usize..4,
        ) {
            let accounts = ["alice", "bob", "carol"];
            let mut l = Ledger::default();
            let mut keys = HashSet::new();
            for (job, shard, replica, acct, atto) in &items {
                let r = receipt(*job, *shard, *replica, accounts[*acct], *atto);
                let fresh = keys.insert(r.key());
                prop_assert_eq!(l.append(r).is_some(), fresh);
            }
            prop_assert!(verify(l.entries()).is_ok());
            let mut entries = l.entries().to_vec();
            let i = victim.index(entries.len());
            match field {
                0 => entries[i].receipt.amount.push('1'),
                1 => entries[i].receipt.account.push('x'),
                2 => entries[i].seq += 1,
                _ => entries[i].prev = "f".repeat(64),
            }
            let err = verify(&entries).expect_err("a change is caught");
            prop_assert_eq!(err.index, i);
        }
    }
}
