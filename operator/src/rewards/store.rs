//! The ledger's admission rules and totals, and the trust records in the hub.
//!
//! The ledger itself lives in an object store ([`crate::rewards::objects`]). Admission
//! ([`admit`]) decides which receipts of a job may be appended: new keys only, never past
//! the job's budget, and a receipt whose amount is malformed or would overflow is refused
//! alone. Totals are computed from the ledger, so a crash between a write and a status
//! update loses nothing.
//!
//! The reputation store (adaptive trust) keeps [`crate::rewards::trust::Reputation`] in 16
//! ConfigMaps per pool (`edgeloom-reputation-<pool>-<k>`), by hash of the node.

use crate::decimal::{Amount, DecimalError};
use crate::rewards::ledger::Receipt;
use crate::rewards::trust::Reputation;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio::sync::Mutex;

/// Label naming the pool of a reputation shard.
pub const REPUTATION_LABEL: &str = "edgeloom.io/reputation";
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
    /// The object store failed.
    #[error("object store: {0}")]
    Objects(#[from] object_store::Error),
    /// An amount is unusable.
    #[error("{0}")]
    Decimal(#[from] DecimalError),
    /// The ledger is not checked against the pool's signed checkpoint yet (right after a
    /// start, until the pool's first reconcile).
    #[error("the ledger is not checked against the pool's signed checkpoint yet")]
    NotReady,
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
    pub(crate) fn add(&mut self, r: &Receipt) -> Result<(), DecimalError> {
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

/// Which of one job's `receipts` (in order) may be appended: those with new keys, each
/// amount capped so that the job's total in this ledger (`job`) never passes `cap` (a
/// receipt never takes a job past its budget; what is left of the budget may be 0), and
/// none whose amount is malformed or would overflow the job's or the pool's (`pool`)
/// totals: such a receipt is refused with the reason, the others go on.
pub fn admit(
    paid: &dyn Fn(&str) -> bool,
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
        if paid(&key) || !seen.insert(key.clone()) {
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

    /// Of `caught` (node, result key), those not recorded yet (read only).
    pub async fn unrecorded(
        &self,
        caught: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let guard = self.ensure().await?;
        let rep = &guard.as_ref().expect("loaded").0;
        Ok(caught
            .iter()
            .filter(|(n, key)| {
                rep.nodes.get(n).is_none_or(|r| {
                    r.last_caught.as_deref() != Some(key.as_str())
                        && !r.caught_keys.iter().any(|k| k == key)
                })
            })
            .cloned()
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
    use crate::rewards::ledger::{Entry, Ledger};

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
                round: None,
            });
        }
        l.entries().to_vec()
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
        let (ok, refused) = admit(
            &|k| ledger.contains(k),
            rs,
            &job,
            &Totals::default(),
            Some(amount("1")),
        );
        assert!(refused.is_empty());
        let paid: Vec<&str> = ok.iter().map(|r| r.amount.as_str()).collect();
        assert_eq!(paid, ["0.3", "0.1", "0"], "capped at the budget, in order");
        // Without a budget, amounts are as computed; a key already in the chain is skipped.
        let chain = entries(1);
        let ledger = Ledger::from_entries(chain.clone()).expect("chain");
        let again = chain[0].receipt.clone();
        let (ok, _) = admit(
            &|k| ledger.contains(k),
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
            &|_| false,
            vec![forfeit.clone()],
            &job,
            &job,
            Some(amount("1")),
        );
        assert_eq!((ok.len(), refused.len()), (1, 0));
        assert_eq!(ok[0].amount, "0.3");
        let mut l = Ledger::default();
        l.append(forfeit.clone());
        let (ok, _) = admit(&|k| l.contains(k), vec![forfeit], &job, &job, None);
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
        let (ok, refused) = admit(&|k| ledger.contains(k), rs, &Totals::default(), &near, None);
        assert_eq!(ok.len(), 1, "the one that fits is written");
        assert_eq!(ok[0].shard, 3);
        assert_eq!(refused.len(), 2);
        assert!(refused[0].1.contains("overflow"), "{refused:?}");
        assert!(refused[1].1.contains("bogus"), "{refused:?}");
    }

    #[test]
    fn long_pool_names_make_valid_object_names() {
        let long = "p".repeat(200);
        assert!(pool_token(&long).len() <= 63);
        assert_ne!(pool_token(&long), pool_token(&"p".repeat(201)));
    }
}
