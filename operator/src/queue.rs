//! The order in which waiting jobs are offered capacity: higher priority first; within a
//! priority, namespaces take turns (a namespace with many jobs cannot starve one with a
//! single job), and within a namespace the older job goes first. Pure.

/// A job waiting for placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting<K> {
    /// Caller's key for the job.
    pub key: K,
    /// Namespace (the fairness domain).
    pub namespace: String,
    /// Priority, higher first.
    pub priority: i32,
    /// Creation time (any monotonic unit, e.g. seconds since the epoch).
    pub created: i64,
    /// Name, the final tie-break so the order is total.
    pub name: String,
}

/// Orders waiting jobs: priority descending, then round-robin over namespaces (the
/// n-th job of every namespace before the (n+1)-th of any), then age, then name.
pub fn order<K>(mut jobs: Vec<Waiting<K>>) -> Vec<Waiting<K>> {
    jobs.sort_by(|a, b| {
        (b.priority, &a.namespace, a.created, &a.name).cmp(&(
            a.priority,
            &b.namespace,
            b.created,
            &b.name,
        ))
    });
    // Rank of each job within its (priority, namespace) group, by age.
    let mut ranked: Vec<(usize, Waiting<K>)> = Vec::with_capacity(jobs.len());
    let mut rank = 0;
    for (i, job) in jobs.into_iter().enumerate() {
        let same_group = i > 0
            && ranked
                .last()
                .is_some_and(|(_, prev): &(usize, Waiting<K>)| {
                    prev.priority == job.priority && prev.namespace == job.namespace
                });
        rank = if same_group { rank + 1 } else { 0 };
        ranked.push((rank, job));
    }
    ranked.sort_by(|(ra, a), (rb, b)| {
        (b.priority, *ra, a.created, &a.namespace, &a.name).cmp(&(
            a.priority,
            *rb,
            b.created,
            &b.namespace,
            &b.name,
        ))
    });
    ranked.into_iter().map(|(_, j)| j).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(ns: &str, name: &str, priority: i32, created: i64) -> Waiting<String> {
        Waiting {
            key: format!("{ns}/{name}"),
            namespace: ns.into(),
            priority,
            created,
            name: name.into(),
        }
    }

    #[test]
    fn priority_then_fair_turns_then_age() {
        let jobs = vec![
            w("big", "b1", 0, 1),
            w("big", "b2", 0, 2),
            w("big", "b3", 0, 3),
            w("small", "s1", 0, 10),
            w("urgent", "u1", 5, 20),
        ];
        let keys: Vec<String> = order(jobs).into_iter().map(|j| j.key).collect();
        assert_eq!(
            keys,
            ["urgent/u1", "big/b1", "small/s1", "big/b2", "big/b3"]
        );
    }

    proptest! {
        #[test]
        fn order_is_a_permutation_respecting_priority_and_age(
            raw in prop::collection::vec((0u8..3, -2i32..3, 0i64..50), 0..40)
        ) {
            let jobs: Vec<Waiting<String>> = raw.iter().enumerate()
                .map(|(i, (ns, p, c))| w(&format!("ns{ns}"), &format!("j{i}"), *p, *c)).collect();
            let out = order(jobs.clone());
            prop_assert_eq!(out.len(), jobs.len());
            for pair in out.windows(2) {
                prop_assert!(pair[0].priority >= pair[1].priority);
            }
            // Within one namespace and priority, older jobs come first.
            for a in 0..out.len() {
                for b in a + 1..out.len() {
                    if out[a].namespace == out[b].namespace && out[a].priority == out[b].priority {
                        prop_assert!((out[a].created, &out[a].name) <= (out[b].created, &out[b].name));
                    }
                }
            }
        }
    }
}
