//! Adaptive trust, as BOINC's adaptive replication does it (docs/ARCHITECTURE.md, "Verification"). Pure.
//!
//! Every node has a record: verified results (its result agreed with a quorum of at least
//! two replicas), the current run of them, and how often it was caught (outvoted). A node
//! is trusted when its run reaches the pool's `trustThreshold`, doubled for every time it
//! was ever caught (capped at 2^10), so a cheater that is caught has to earn much more to
//! be trusted again. A trusted node's shards run once and are accepted alone unless a
//! spot check picks them: a hash of a secret salt (kept in the hub, never seen by
//! agents), the job UID and the shard, compared with the pool's `spotCheckRate`. The draw
//! is deterministic, so every reconcile and every operator restart agrees on it.

use crate::decimal::Amount;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Results remembered per node as already counted against it.
pub const CAUGHT_KEYS_KEPT: usize = 32;

/// One node's history.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Verified results ever.
    pub valid: u64,
    /// Verified results since it was last caught.
    pub streak: u64,
    /// Times its result was outvoted.
    pub caught: u64,
    /// The last result it was caught on (job UID/shard/replica/attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_caught: Option<String>,
    /// The results it was caught on recently (at most [`CAUGHT_KEYS_KEPT`]), so that a
    /// verdict seen again (every reconcile, after a restart) is never counted twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub caught_keys: Vec<String>,
    /// Its speed relative to the other replicas of the same shards, as the operator timed
    /// them itself (thousandths; a moving average over verified results). See
    /// [`verified_tflops`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_speed_milli: Option<u32>,
}

impl NodeRecord {
    /// The run of verified results this node needs to be trusted.
    pub fn needed(&self, threshold: u32) -> u64 {
        (threshold.max(1) as u64) << self.caught.min(10)
    }

    /// Whether its results may be accepted alone (subject to spot checks).
    pub fn trusted(&self, threshold: u32) -> bool {
        self.streak >= self.needed(threshold)
    }
}

/// The records of one pool's nodes, keyed "cluster/node", and the pool's spot-check salt.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reputation {
    /// Secret salt of the spot-check draw.
    pub salt: String,
    /// Records by "cluster/node".
    pub nodes: BTreeMap<String, NodeRecord>,
}

impl Reputation {
    /// Whether `node` is trusted.
    pub fn trusted(&self, node: &str, threshold: u32) -> bool {
        self.nodes.get(node).is_some_and(|r| r.trusted(threshold))
    }

    /// A verified result of `node`, with its speed relative to the replicas it agreed with
    /// where the operator timed them (a moving average: 3/4 old + 1/4 new).
    pub fn record_valid(&mut self, node: &str, relative_speed_milli: Option<u32>) {
        let r = self.nodes.entry(node.to_string()).or_default();
        r.valid += 1;
        r.streak += 1;
        if let Some(s) = relative_speed_milli {
            r.relative_speed_milli = Some(match r.relative_speed_milli {
                Some(old) => ((old as u64 * 3 + s as u64) / 4) as u32,
                None => s,
            });
        }
    }

    /// `node` was outvoted on `result` (job UID/shard/replica): it loses its trust.
    /// Returns false when this very result was already counted.
    pub fn record_caught(&mut self, node: &str, result: &str) -> bool {
        let r = self.nodes.entry(node.to_string()).or_default();
        if r.last_caught.as_deref() == Some(result) || r.caught_keys.iter().any(|k| k == result) {
            return false;
        }
        r.caught += 1;
        r.streak = 0;
        r.last_caught = Some(result.to_string());
        r.caught_keys.push(result.to_string());
        if r.caught_keys.len() > CAUGHT_KEYS_KEPT {
            r.caught_keys.remove(0);
        }
        true
    }
}

/// A node's speed as placement and pay may use it: its own claim (the `edgeloom.io/tflops`
/// annotation its agent writes) bounded by what the operator verified. A node never timed
/// against peers counts as at most the pool's median claim; one that was counts as at most
/// the median times its measured relative speed. So inflating
/// the claim earns neither placement nor pay beyond what verified work showed.
pub fn verified_tflops(claimed: f64, pool_median: f64, relative_speed_milli: Option<u32>) -> f64 {
    let claimed = if claimed.is_finite() {
        claimed.max(0.0)
    } else {
        0.0
    };
    let bound = match relative_speed_milli {
        Some(s) => pool_median * s as f64 / 1000.0,
        None => pool_median,
    };
    claimed.min(bound)
}

/// The median of the positive claims (0 when there is none).
pub fn median_claim(mut claims: Vec<f64>) -> f64 {
    claims.retain(|t| t.is_finite() && *t > 0.0);
    if claims.is_empty() {
        return 0.0;
    }
    let mid = claims.len() / 2;
    // The element a full sort would put at `mid`, in linear time.
    *claims.select_nth_unstable_by(mid, f64::total_cmp).1
}

/// The speed factor a node is paid with under `normalizeBySpeed` (thousandths, within
/// [100, 10000]): its speed relative to its peers as the operator timed it, when it was
/// timed (its claim plays no part, so neither its own nor other nodes' inflated claims
/// move it); else its claim over the pool's median claim, at most 1.
pub fn pay_speed_factor_milli(
    claimed: f64,
    pool_median: f64,
    relative_speed_milli: Option<u32>,
) -> u64 {
    match relative_speed_milli {
        Some(s) => (s as u64).clamp(100, 10_000),
        None => crate::rewards::ledger::speed_factor_milli(
            verified_tflops(claimed, pool_median, None),
            pool_median,
        ),
    }
}

/// The speed of each replica relative to the others that agreed with it, from the
/// operator's own timing of each (milliseconds from dispatch to result): the median of
/// the others' times over its own, in thousandths, within [10, 100000]. None for a replica
/// without a time or without another timed replica.
pub fn relative_speeds(windows: &[Option<u64>]) -> Vec<Option<u32>> {
    windows
        .iter()
        .enumerate()
        .map(|(i, own)| {
            let own = (*own)?.max(1);
            let mut others: Vec<u64> = windows
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .filter_map(|(_, w)| *w)
                .collect();
            if others.is_empty() {
                return None;
            }
            others.sort_unstable();
            let k = others.len();
            let median = if k % 2 == 1 {
                others[k / 2]
            } else {
                (others[k / 2 - 1] + others[k / 2]) / 2
            }
            .max(1);
            Some((median as u128 * 1000 / own as u128).clamp(10, 100_000) as u32)
        })
        .collect()
}

/// Whether the shard is spot-checked: sha256(salt, job UID, shard) read as a number in
/// [0, 1) is below `rate`. Exact (integer) comparison, no floating point.
pub fn spot_checked(salt: &str, job_uid: &str, shard: u32, rate: Amount) -> bool {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(job_uid.as_bytes());
    h.update(shard.to_be_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let draw = u64::from_be_bytes(first) as u128;
    // draw / 2^64 < atto / 10^18  <=>  draw * 10^18 < atto * 2^64 (both fit in u128).
    draw * 1_000_000_000_000_000_000 < rate.atto().min(1_000_000_000_000_000_000) << 64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_seen_again_is_never_counted_twice() {
        let mut rep = Reputation::default();
        assert!(rep.record_caught("n", "job/0/0/1"));
        assert!(rep.record_caught("n", "job/1/0/1"));
        // Both verdicts are seen again on every reconcile, alternating.
        for _ in 0..5 {
            assert!(!rep.record_caught("n", "job/0/0/1"));
            assert!(!rep.record_caught("n", "job/1/0/1"));
        }
        assert_eq!(rep.nodes["n"].caught, 2);
    }

    #[test]
    fn a_claimed_speed_counts_only_as_far_as_verified_work_shows() {
        // Never timed against peers: at most the pool's median claim.
        assert_eq!(verified_tflops(100.0, 2.0, None), 2.0);
        assert_eq!(
            verified_tflops(1.0, 2.0, None),
            1.0,
            "a modest claim stands"
        );
        // Timed as fast as its peers: the median, not its claim of 50x.
        assert_eq!(verified_tflops(100.0, 2.0, Some(1000)), 2.0);
        // Really twice as fast: up to twice the median.
        assert_eq!(verified_tflops(5.0, 2.0, Some(2000)), 4.0);
        assert_eq!(verified_tflops(3.0, 2.0, Some(2000)), 3.0);
        assert_eq!(verified_tflops(f64::INFINITY, 2.0, None), 0.0);
        assert_eq!(verified_tflops(f64::NAN, 2.0, None), 0.0);
    }

    #[test]
    fn pay_follows_timed_speed_not_claims() {
        // Timed: its relative speed, whatever it or others claim.
        assert_eq!(pay_speed_factor_milli(1e6, 2.0, Some(1200)), 1200);
        assert_eq!(pay_speed_factor_milli(0.1, 1e9, Some(1200)), 1200);
        // Never timed: at most the median.
        assert_eq!(pay_speed_factor_milli(100.0, 2.0, None), 1000);
        assert_eq!(pay_speed_factor_milli(1.0, 2.0, None), 500);
        assert_eq!(median_claim(vec![3.0, f64::NAN, 0.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn relative_speeds_come_from_the_operators_own_timing() {
        assert_eq!(
            relative_speeds(&[Some(1000), Some(2000), Some(1000)]),
            [Some(1500), Some(500), Some(1500)]
        );
        assert_eq!(relative_speeds(&[Some(1000), None]), [None, None]);
        assert_eq!(
            relative_speeds(&[Some(0), Some(100_000_000)]),
            [Some(100_000), Some(10)]
        );
        let mut rep = Reputation::default();
        rep.record_valid("n", Some(1000));
        rep.record_valid("n", Some(2000));
        assert_eq!(rep.nodes["n"].relative_speed_milli, Some(1250));
        rep.record_valid("n", None);
        assert_eq!(rep.nodes["n"].relative_speed_milli, Some(1250));
    }
    use proptest::prelude::*;

    #[test]
    fn trust_is_earned_by_a_run_and_lost_when_caught() {
        let mut rep = Reputation::default();
        for _ in 0..9 {
            rep.record_valid("edge-a/n1", None);
        }
        assert!(!rep.trusted("edge-a/n1", 10));
        rep.record_valid("edge-a/n1", None);
        assert!(rep.trusted("edge-a/n1", 10));
        assert!(rep.record_caught("edge-a/n1", "uid/0/1"));
        assert!(
            !rep.record_caught("edge-a/n1", "uid/0/1"),
            "same verdict twice"
        );
        assert!(!rep.trusted("edge-a/n1", 10));
        for _ in 0..19 {
            rep.record_valid("edge-a/n1", None);
        }
        assert!(
            !rep.trusted("edge-a/n1", 10),
            "a caught node needs twice the run"
        );
        rep.record_valid("edge-a/n1", None);
        assert!(rep.trusted("edge-a/n1", 10));
        assert!(!rep.trusted("edge-b/unknown", 10));
    }

    #[test]
    fn spot_check_rate_zero_and_one_are_exact() {
        let zero = Amount::ZERO;
        let one: Amount = "1".parse().expect("one");
        for shard in 0..200 {
            assert!(!spot_checked("s", "uid", shard, zero));
            assert!(spot_checked("s", "uid", shard, one));
        }
    }

    proptest! {
        #[test]
        fn spot_checks_hit_about_the_rate(salt in "[a-z0-9]{8}", permille in 0u64..=1000) {
            let rate = Amount::from_atto(permille as u128 * 1_000_000_000_000_000);
            let hits = (0..4000).filter(|s| spot_checked(&salt, "job", *s, rate)).count();
            let expected = 4000.0 * permille as f64 / 1000.0;
            // Binomial(4000, p): 6 standard deviations (at most ~190) plus slack.
            prop_assert!((hits as f64 - expected).abs() <= 200.0, "{} hits, expected {}", hits, expected);
        }
    }
}
