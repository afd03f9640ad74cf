//! A simulated fleet under the operator's own verification: every shard is a one-shard
//! job driven through `lifecycle::decide` (commit–reveal, adaptive trust with spot checks
//! decided after the commit, extra replicas on disagreement, quarantine), nodes are
//! placed at random among those the operator would allow (not quarantined, not a node,
//! account or known owner of another replica of the shard), and payments go through an
//! escrow: a node's receipts are released only after it has reported `escrow` more
//! results, and a node caught forfeits everything still pending.

use crate::Rng;
use edgeloom_crds::TaskPhase;
use edgeloom_crds::commitment;
use edgeloom_crds::compute_job::ComputeJobSpec;
use edgeloom_operator::decimal::Amount;
use edgeloom_operator::lifecycle::{self, JobView, TaskView};
use edgeloom_operator::rewards::trust::{self, Reputation};
use jiff::Timestamp;
use std::collections::{BTreeSet, VecDeque};

/// How the cheating nodes behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// Every result wrong (each cheater's wrong result is its own).
    Always,
    /// 20% of results wrong, from the start.
    Sometimes,
    /// Honest until trusted, then always wrong.
    OnceTrusted,
    /// Wrong whenever it sees no other replica of its shard when it runs.
    WhenAlone,
    /// Every cheating node belongs to one owner (a Sybil: 5% of the fleet under as many
    /// accounts), every result wrong and the same (they collude); the platform team knows
    /// the owner (label `edgeloom.io/owner`).
    SybilKnownOwner,
    /// The same, the owner not known (unrelated-looking accounts).
    SybilUnknownOwner,
    /// No cheater: every honest result differs slightly (floating point), verified within
    /// a tolerance. Measures honest replicas wrongly rejected.
    HonestNoise,
}

impl Model {
    /// Every model, in table order.
    pub const ALL: [Model; 7] = [
        Model::Always,
        Model::Sometimes,
        Model::OnceTrusted,
        Model::WhenAlone,
        Model::SybilKnownOwner,
        Model::SybilUnknownOwner,
        Model::HonestNoise,
    ];

    /// A label for the table.
    pub fn label(self) -> &'static str {
        match self {
            Model::Always => "always cheat",
            Model::Sometimes => "cheat on 20% of results",
            Model::OnceTrusted => "honest until trusted",
            Model::WhenAlone => "cheat when alone",
            Model::SybilKnownOwner => "Sybil, owner known",
            Model::SybilUnknownOwner => "Sybil, owner unknown",
            Model::HonestNoise => "honest, float noise",
        }
    }
}

/// The pool's verification policy.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Verified results in a row before a node is trusted.
    pub threshold: u32,
    /// Spot-check rate.
    pub spot: Amount,
    /// Catches before quarantine (0: never).
    pub quarantine_after: u64,
    /// Results a node reports after a receipt before the receipt is paid out.
    pub escrow: u64,
}

/// What happened.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Shards.
    pub shards: u64,
    /// Tasks run.
    pub executions: u64,
    /// Wrong results produced.
    pub wrong: u64,
    /// Wrong results accepted (what would be paid without escrow).
    pub wrong_accepted: u64,
    /// Wrong results paid out after the escrow.
    pub wrong_paid: u64,
    /// Wrong results still in escrow at the end.
    pub wrong_pending: u64,
    /// Honest results outvoted or rejected.
    pub honest_rejected: u64,
    /// Honest receipts forfeited (their node was caught later).
    pub honest_forfeited: u64,
    /// Honest receipts paid out.
    pub honest_paid: u64,
    /// Shards that failed verification.
    pub failed: u64,
}

impl Outcome {
    /// Executions beyond one per shard, as a share of all executions.
    pub fn overhead(&self) -> f64 {
        (self.executions - self.shards) as f64 / self.executions.max(1) as f64
    }
}

struct Node {
    cheater: bool,
    /// Sybil group (shares one wrong answer).
    group: Option<u64>,
    /// Owner as the platform team knows it.
    owner: Option<u64>,
    /// Results reported (the escrow clock).
    reported: u64,
    /// Receipts in escrow: (reported count when accepted, wrong).
    pending: VecDeque<(u64, bool)>,
}

/// Runs `shards` shards over `n` nodes of which `cheaters_percent` cheat as `model`.
pub fn simulate(
    n: usize,
    shards: u64,
    cheaters_percent: u64,
    model: Model,
    adaptive: bool,
    p: Policy,
    seed: u64,
) -> Outcome {
    let mut rng = Rng(seed);
    let mut nodes: Vec<Node> = (0..n as u64)
        .map(|i| {
            let sybil = matches!(model, Model::SybilKnownOwner | Model::SybilUnknownOwner);
            let cheater = model != Model::HonestNoise && rng.below(100) < cheaters_percent;
            Node {
                cheater,
                group: None,
                owner: (sybil && model == Model::SybilKnownOwner).then_some(i),
                reported: 0,
                pending: VecDeque::new(),
            }
        })
        .collect();
    // Sybil: every cheater has one owner and gives one answer.
    if matches!(model, Model::SybilKnownOwner | Model::SybilUnknownOwner) {
        for node in nodes.iter_mut().filter(|n| n.cheater) {
            node.group = Some(0);
            if model == Model::SybilKnownOwner {
                node.owner = Some(u64::MAX);
            }
        }
    }
    let tolerance = if model == Model::HonestNoise {
        1e-6
    } else {
        0.0
    };
    let spec: ComputeJobSpec = serde_json::from_value(serde_json::json!({
        "workload": {"kind": "Benchmark"}, "shards": 1, "maxRetries": 3,
        "verification": {"replicas": 2, "adaptive": adaptive, "tolerance": tolerance}
    }))
    .expect("a valid spec");
    let mut rep = Reputation {
        salt: "bench-salt".into(),
        ..Reputation::default()
    };
    let mut out = Outcome {
        shards,
        ..Outcome::default()
    };
    let now: Timestamp = "2026-11-25T00:00:00Z".parse().expect("time");
    let member = "pool/c".to_string();
    let quarantined = |rep: &Reputation, i: usize| {
        p.quarantine_after > 0
            && rep
                .nodes
                .get(&format!("c/{i}"))
                .is_some_and(|r| r.caught >= p.quarantine_after)
    };
    for s in 0..shards {
        let uid = format!("job-{s}");
        let spot = adaptive && trust::spot_checked(&rep.salt, &uid, 0, p.spot);
        let mut tasks: Vec<TaskView> = Vec::new();
        let mut wrong: Vec<bool> = Vec::new();
        let mut settled = false;
        for _round in 0..12 {
            let trusted: BTreeSet<(String, String)> = tasks
                .iter()
                .filter(|t| t.replica == 0 && rep.trusted(&format!("c/{}", t.node), p.threshold))
                .map(|t| (member.clone(), t.node.clone()))
                .collect();
            let d = lifecycle::decide(
                &JobView {
                    spec: &spec,
                    created: now,
                    start_time: Some(now),
                    phase: None,
                    recorded: &[],
                    unschedulable: None,
                    max_replicas: 3,
                    trusted,
                    spot_checked: if spot {
                        BTreeSet::from([0])
                    } else {
                        BTreeSet::new()
                    },
                    budget: None,
                    progress_timeout: jiff::SignedDuration::from_secs(600),
                    settled: BTreeSet::new(),
                },
                &tasks,
                now,
            );
            // Caught (outvoted or a broken reveal): trust reset, escrow forfeited.
            for o in &d.outvoted {
                let i: usize = o.node.parse().expect("index");
                if !wrong[o.replica as usize] {
                    out.honest_rejected += 1;
                }
                if rep.record_caught(&format!("c/{i}"), &format!("{uid}/{}", o.replica)) {
                    for (_, w) in nodes[i].pending.drain(..) {
                        if !w {
                            out.honest_forfeited += 1;
                        }
                    }
                }
            }
            if matches!(
                d.phase,
                edgeloom_crds::JobPhase::Succeeded | edgeloom_crds::JobPhase::Failed
            ) {
                if d.phase == edgeloom_crds::JobPhase::Failed {
                    out.failed += 1;
                }
                for a in &d.accepted {
                    let i: usize = a.node.parse().expect("index");
                    let w = wrong[a.replica as usize];
                    if w {
                        out.wrong_accepted += 1;
                    }
                    if a.verified {
                        rep.record_valid(&format!("c/{i}"), None);
                    }
                    let at = nodes[i].reported;
                    nodes[i].pending.push_back((at, w));
                }
                settled = true;
                break;
            }
            // Place what is needed: all of this round's replicas exist before any of them
            // runs (they are created in one scheduling cycle).
            let mut placed = Vec::new();
            for need in &d.needs {
                let used: Vec<usize> = tasks
                    .iter()
                    .map(|t| t.node.parse().expect("index"))
                    .chain(placed.iter().copied())
                    .collect();
                let owners: Vec<u64> = used.iter().filter_map(|u| nodes[*u].owner).collect();
                let pick = (0..200).find_map(|_| {
                    let c = rng.below(n as u64) as usize;
                    let ok = !used.contains(&c)
                        && !quarantined(&rep, c)
                        && nodes[c].owner.is_none_or(|o| !owners.contains(&o));
                    ok.then_some(c)
                });
                let Some(i) = pick else { continue };
                placed.push(i);
                tasks.push(TaskView {
                    member: member.clone(),
                    cluster: "c".into(),
                    name: format!("{uid}-{}-{}", need.replica, need.attempt),
                    shard: 0,
                    replica: need.replica,
                    attempt: need.attempt,
                    node: i.to_string(),
                    phase: Some(TaskPhase::Running),
                    nonce: Some(commitment::nonce(&uid, 0, need.replica, need.attempt)),
                    ..TaskView::default()
                });
                if wrong.len() <= need.replica as usize {
                    wrong.resize(need.replica as usize + 1, false);
                }
            }
            // Each new replica runs and commits; what it sees decides a strategic cheater. A
            // first replica is alone only on a trusted node: on an untrusted one the
            // operator adds the second replica at once (next cycle), long before a real
            // task commits, so its agent sees it.
            let first_trusted =
                tasks.len() == 1 && rep.trusted(&format!("c/{}", tasks[0].node), p.threshold);
            for t in tasks
                .iter_mut()
                .filter(|t| t.phase == Some(TaskPhase::Running))
            {
                let i: usize = t.node.parse().expect("index");
                let node = &nodes[i];
                let cheat = node.cheater
                    && match model {
                        Model::Always | Model::SybilKnownOwner | Model::SybilUnknownOwner => true,
                        Model::Sometimes => rng.unit() < 0.2,
                        Model::OnceTrusted => rep.trusted(&format!("c/{i}"), p.threshold),
                        Model::WhenAlone => first_trusted,
                        Model::HonestNoise => false,
                    };
                let (digest, vector) = if cheat {
                    match node.group {
                        Some(g) => (format!("sybil-{s}-{g}"), vec![2.0]),
                        None => (format!("bad-{s}-{i}"), vec![2.0]),
                    }
                } else if model == Model::HonestNoise {
                    let noise = 1.0 + (rng.unit() - 0.5) * 1e-9;
                    (format!("ok-{s}-{noise}"), vec![noise])
                } else {
                    (format!("ok-{s}"), vec![1.0])
                };
                wrong[t.replica as usize] = cheat;
                if cheat {
                    out.wrong += 1;
                }
                out.executions += 1;
                nodes[i].reported += 1;
                let salt = format!("salt-{i}");
                t.commitment = Some(commitment::commitment(
                    t.nonce.as_deref().unwrap_or_default(),
                    &digest,
                    &vector,
                    &salt,
                ));
                t.phase = Some(TaskPhase::Committed);
                t.digest = Some(digest);
                t.vector = vector;
                t.salt = Some(salt);
            }
            // Reveals the operator asked for.
            for (_, name) in &d.reveal {
                if let Some(t) = tasks.iter_mut().find(|t| &t.name == name) {
                    t.phase = Some(TaskPhase::Succeeded);
                }
            }
            // The digest stays hidden from the verdict until revealed.
            if d.needs.is_empty() && d.reveal.is_empty() && placed.is_empty() {
                break;
            }
        }
        if !settled {
            out.failed += 1;
        }
        // Escrow: pay out what has waited `escrow` of its node's results (only nodes that
        // reported in this shard can have anything newly due).
        let touched: BTreeSet<usize> = tasks
            .iter()
            .map(|t| t.node.parse().expect("index"))
            .collect();
        for i in touched {
            let node = &mut nodes[i];
            while node
                .pending
                .front()
                .is_some_and(|(at, _)| node.reported >= at + p.escrow)
            {
                let (_, w) = node.pending.pop_front().expect("front");
                if w {
                    out.wrong_paid += 1;
                } else {
                    out.honest_paid += 1;
                }
            }
        }
    }
    out.wrong_pending = nodes
        .iter()
        .flat_map(|n| n.pending.iter())
        .filter(|(_, w)| *w)
        .count() as u64;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(escrow: u64) -> Policy {
        Policy {
            threshold: 10,
            spot: "0.1".parse().expect("rate"),
            quarantine_after: 2,
            escrow,
        }
    }

    /// The CI-sized run of `ledger verification`: the same code on a small fleet.
    #[test]
    fn a_small_fleet_shows_what_each_defence_stops() {
        let run =
            |model, adaptive, escrow| simulate(200, 4000, 10, model, adaptive, policy(escrow), 7);
        // Always-cheaters are outvoted: nothing wrong accepted, in either mode.
        for adaptive in [false, true] {
            let o = run(Model::Always, adaptive, 0);
            assert!(o.wrong > 0);
            assert_eq!(o.wrong_accepted, 0, "{o:?}");
        }
        // Adaptive verification costs less than fixed replication.
        assert!(run(Model::Always, true, 0).overhead() < run(Model::Always, false, 0).overhead());
        // Honest until trusted: accepted alone once trusted, so only the escrow stops pay.
        let o = run(Model::OnceTrusted, true, 0);
        assert!(
            o.wrong_accepted > 0 && o.wrong_paid == o.wrong_accepted,
            "{o:?}"
        );
        let o = run(Model::OnceTrusted, true, 50);
        assert!(
            o.wrong_paid * 20 <= o.wrong_accepted,
            "escrow forfeits most: {o:?}"
        );
        // Colluding nodes of one owner: kept apart when the owner is known.
        let known = run(Model::SybilKnownOwner, false, 0);
        assert_eq!(known.wrong_accepted, 0, "{known:?}");
        let unknown = run(Model::SybilUnknownOwner, false, 0);
        assert!(
            unknown.wrong_accepted > 0,
            "two of one owner agreed: {unknown:?}"
        );
        // Honest floating-point noise within the tolerance is never outvoted.
        let o = run(Model::HonestNoise, true, 0);
        assert_eq!((o.wrong, o.honest_rejected, o.failed), (0, 0, 0), "{o:?}");
    }
}
