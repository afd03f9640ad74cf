//! Result verification by replication, as BOINC does it (docs/ARCHITECTURE.md, "Verification"). Pure.
//!
//! The replicas of a shard that reported a result are grouped into agreement classes:
//! equal digests when the tolerance is 0 (deterministic workloads), otherwise result
//! vectors of equal length whose elements differ by at most `tolerance` relative to their
//! magnitude. A class of at least `quorum` replicas is accepted; the others dissent (not
//! paid, lose trust). Without a quorum, more replicas are asked for up to the bound; past
//! it the shard is rejected with the reason.

/// One replica's reported result.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaResult {
    /// Replica index.
    pub replica: u32,
    /// Result digest.
    pub digest: String,
    /// Result vector (for tolerance comparison).
    pub vector: Vec<f64>,
}

/// The verdict on a shard.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// A quorum agrees.
    Accepted {
        /// The accepted digest (of the class's lowest replica).
        digest: String,
        /// Replicas in the accepted class.
        agreeing: Vec<u32>,
        /// Replicas that reported something else.
        dissenting: Vec<u32>,
    },
    /// Not yet: `more` additional replicas are needed (results may also still be running).
    Pending {
        /// Replicas to add now.
        more: u32,
    },
    /// No quorum is possible within the bound.
    Rejected {
        /// Why.
        reason: String,
    },
}

/// The default quorum for `replicas`: a majority.
pub fn majority(replicas: u32) -> u32 {
    replicas / 2 + 1
}

fn agree(a: &ReplicaResult, b: &ReplicaResult, tolerance: f64) -> bool {
    if tolerance <= 0.0 {
        return a.digest == b.digest;
    }
    a.vector.len() == b.vector.len()
        && !a.vector.is_empty()
        && a.vector.iter().zip(&b.vector).all(|(x, y)| {
            x.is_finite()
                && y.is_finite()
                && (x - y).abs() <= tolerance * x.abs().max(y.abs()).max(1e-12)
        })
}

/// Decides a shard from its finished replicas. `running` replicas have not reported yet;
/// `placed` replicas exist in all (finished + running); at most `max_replicas` may exist.
pub fn decide(
    results: &[ReplicaResult],
    running: u32,
    placed: u32,
    quorum: u32,
    tolerance: f64,
    max_replicas: u32,
) -> Verdict {
    let mut sorted: Vec<&ReplicaResult> = results.iter().collect();
    sorted.sort_by_key(|r| r.replica);
    // Classes by agreement with each class's first member (lowest replica).
    let mut classes: Vec<Vec<&ReplicaResult>> = Vec::new();
    for r in sorted {
        match classes.iter_mut().find(|c| agree(c[0], r, tolerance)) {
            Some(c) => c.push(r),
            None => classes.push(vec![r]),
        }
    }
    classes.sort_by(|a, b| b.len().cmp(&a.len()).then(a[0].replica.cmp(&b[0].replica)));
    let best = classes.first().map(Vec::len).unwrap_or(0) as u32;
    if best >= quorum.max(1) {
        let winner = &classes[0];
        return Verdict::Accepted {
            digest: winner[0].digest.clone(),
            agreeing: winner.iter().map(|r| r.replica).collect(),
            dissenting: classes[1..].iter().flatten().map(|r| r.replica).collect(),
        };
    }
    // The best class could still reach the quorum with the running replicas plus new ones.
    let missing = quorum.saturating_sub(best + running);
    if missing == 0 {
        return Verdict::Pending { more: 0 };
    }
    let room = max_replicas.saturating_sub(placed);
    if room >= missing {
        Verdict::Pending { more: missing }
    } else {
        Verdict::Rejected {
            reason: format!(
                "no quorum: {} result(s) in {} disagreeing group(s), the largest of {best} is below the quorum of {quorum}, and at most {max_replicas} replicas may run",
                results.len(),
                classes.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(replica: u32, digest: &str, vector: &[f64]) -> ReplicaResult {
        ReplicaResult {
            replica,
            digest: digest.into(),
            vector: vector.to_vec(),
        }
    }

    #[test]
    fn two_equal_digests_are_accepted_and_a_cheater_dissents() {
        let v = decide(
            &[r(0, "a", &[]), r(1, "bad", &[]), r(2, "a", &[])],
            0,
            3,
            2,
            0.0,
            3,
        );
        assert_eq!(
            v,
            Verdict::Accepted {
                digest: "a".into(),
                agreeing: vec![0, 2],
                dissenting: vec![1]
            }
        );
    }

    #[test]
    fn disagreement_asks_for_more_replicas_then_rejects_at_the_bound() {
        let two = [r(0, "a", &[]), r(1, "b", &[])];
        assert_eq!(decide(&two, 0, 2, 2, 0.0, 3), Verdict::Pending { more: 1 });
        assert_eq!(
            decide(&two, 1, 3, 2, 0.0, 3),
            Verdict::Pending { more: 0 },
            "a third is still running"
        );
        let three = [r(0, "a", &[]), r(1, "b", &[]), r(2, "c", &[])];
        match decide(&three, 0, 3, 2, 0.0, 3) {
            Verdict::Rejected { reason } => assert!(reason.contains("no quorum"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn floating_point_results_agree_within_the_tolerance_not_by_bytes() {
        let v = decide(
            &[r(0, "x", &[0.9722, 0.05]), r(1, "y", &[0.97221, 0.050001])],
            0,
            2,
            2,
            1e-3,
            2,
        );
        assert!(matches!(v, Verdict::Accepted { .. }), "{v:?}");
        let v = decide(&[r(0, "x", &[0.97]), r(1, "y", &[0.80])], 0, 2, 2, 1e-3, 2);
        assert!(matches!(v, Verdict::Rejected { .. }), "{v:?}");
        assert_eq!(majority(2), 2);
        assert_eq!(majority(3), 2);
    }

    proptest! {
        #[test]
        fn an_accepted_result_has_a_quorum_and_every_replica_is_counted_once(
            digests in prop::collection::vec(0u8..3, 1..8), quorum in 1u32..5,
        ) {
            let results: Vec<ReplicaResult> = digests.iter().enumerate().map(|(i, d)| r(i as u32, &d.to_string(), &[])).collect();
            if let Verdict::Accepted { digest, agreeing, dissenting } = decide(&results, 0, results.len() as u32, quorum, 0.0, 9) {
                prop_assert!(agreeing.len() as u32 >= quorum);
                prop_assert!(agreeing.iter().all(|i| results[*i as usize].digest == digest));
                prop_assert!(dissenting.iter().all(|i| results[*i as usize].digest != digest));
                prop_assert_eq!(agreeing.len() + dissenting.len(), results.len());
            }
        }
    }
}
