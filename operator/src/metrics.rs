//! Prometheus metrics of the operator (docs/ARCHITECTURE.md, "Observability"). Labels are bounded: controller
//! names, error categories, task phases, and the configured pool/cluster names (a
//! deliberate exception to "no object names in labels": member clusters are operator
//! configuration, few and stable, and alerts must name the unreachable one).

use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles by controller.
    pub reconciles: IntCounterVec,
    /// Reconcile errors by controller and category.
    pub reconcile_errors: IntCounterVec,
    /// Reconcile duration by controller.
    pub reconcile_duration: HistogramVec,
    /// Jobs waiting for placement.
    pub queue_depth: IntGauge,
    /// Time to place one job's waiting slots.
    pub placement_duration: Histogram,
    /// Time to build a scheduling cycle's capacity snapshot.
    pub snapshot_duration: Histogram,
    /// Jobs not tried again in a cycle: unplaceable before, and neither they nor the
    /// fleet's capacity changed since.
    pub verdicts_reused: IntCounter,
    /// Tasks created.
    pub tasks_created: IntCounter,
    /// Current tasks by phase.
    pub tasks: IntGaugeVec,
    /// Re-placements by reason (failed, node_lost).
    pub retries: IntCounterVec,
    /// 1 if the member cluster answered its last probe.
    pub member_reachable: IntGaugeVec,
    /// Ready (fresh heartbeat) agent nodes per member cluster.
    pub member_ready_nodes: IntGaugeVec,
    /// 1 while this replica is the leader.
    pub leader: IntGauge,
    /// Jobs finished, by phase.
    pub jobs_finished: IntCounterVec,
    /// Receipts appended to ledgers, by pool.
    pub receipts: IntCounterVec,
    /// Rewards issued, by pool and unit (a float for dashboards; the ledger is exact).
    pub rewards: CounterVec,
    /// Verification verdicts on replica results: accepted, outvoted, rejected.
    pub verification: IntCounterVec,
    /// Receipts forfeited (escrow), by pool.
    pub forfeits: IntCounterVec,
    /// 1 while the pool's ledger verifies, 0 when a link is broken.
    pub ledger_intact: IntGaugeVec,
    /// Receipts in the pool's ledger.
    pub ledger_receipts: IntGaugeVec,
    /// Nodes of the pool that get no work (caught quarantineAfter times).
    pub quarantined_nodes: IntGaugeVec,
    /// Tasks the operator failed because they made no progress within their timeout.
    pub stalled: IntCounter,
    /// Tasks removed from member clusters because their job no longer exists in the hub.
    pub orphans_removed: IntCounter,
    /// Federated rounds completed, by topology (Tree, Flat).
    pub federated_rounds: IntCounterVec,
    /// Federated updates by verdict: accepted, rejected (by the aggregation), missing
    /// (lost, failed or late).
    pub federated_updates: IntCounterVec,
    /// Bytes of federated models moved, by level: member (node updates kept inside their
    /// member cluster) and hub (what went up to the hub).
    pub federated_bytes: IntCounterVec,
    /// The hub's audits of member aggregations, by result: matched, mismatched (the
    /// aggregator caught), inconclusive (an input changed after it was reported).
    pub federated_audits: IntCounterVec,
}

/// Errors registering metrics (a programming error: duplicate names).
pub type MetricsError = prometheus::Error;

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, MetricsError> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_reconcile_total",
                "Reconciles by controller",
            ),
            &["controller"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_reconcile_errors_total",
                "Reconcile errors by controller and category",
            ),
            &["controller", "category"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new(
                "edgeloom_operator_reconcile_duration_seconds",
                "Reconcile duration",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["controller"],
        )?;
        let queue_depth = IntGauge::new(
            "edgeloom_operator_queue_depth",
            "Jobs waiting for placement",
        )?;
        let placement_duration = Histogram::with_opts(
            HistogramOpts::new(
                "edgeloom_operator_placement_duration_seconds",
                "Time to place one job",
            )
            .buckets(vec![0.00001, 0.0001, 0.001, 0.01, 0.1, 1.0]),
        )?;
        let snapshot_duration = Histogram::with_opts(
            HistogramOpts::new(
                "edgeloom_operator_snapshot_duration_seconds",
                "Time to build a scheduling cycle's capacity snapshot (only what changed is rebuilt)",
            )
            .buckets(vec![0.0001, 0.001, 0.01, 0.1, 1.0]),
        )?;
        let verdicts_reused = IntCounter::new(
            "edgeloom_operator_unplaceable_verdicts_reused_total",
            "Jobs not tried again in a cycle: unplaceable before, and neither they nor capacity changed",
        )?;
        let tasks_created = IntCounter::new(
            "edgeloom_operator_tasks_created_total",
            "ComputeTasks created",
        )?;
        let tasks = IntGaugeVec::new(
            Opts::new("edgeloom_operator_tasks", "Current ComputeTasks by phase"),
            &["phase"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_task_retries_total",
                "Shard re-placements by reason",
            ),
            &["reason"],
        )?;
        let member_reachable = IntGaugeVec::new(
            Opts::new(
                "edgeloom_operator_member_cluster_reachable",
                "1 if the member cluster answers",
            ),
            &["pool", "cluster"],
        )?;
        let member_ready_nodes = IntGaugeVec::new(
            Opts::new(
                "edgeloom_operator_member_ready_nodes",
                "Agent nodes with a fresh heartbeat",
            ),
            &["pool", "cluster"],
        )?;
        let leader = IntGauge::new("edgeloom_operator_leader", "1 while this replica leads")?;
        let jobs_finished = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_jobs_finished_total",
                "Jobs that reached Succeeded or Failed",
            ),
            &["phase"],
        )?;
        let receipts = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_receipts_total",
                "Reward receipts appended to the ledger",
            ),
            &["pool"],
        )?;
        let rewards = CounterVec::new(
            Opts::new(
                "edgeloom_operator_rewards_total",
                "Rewards issued (approximate float; the ledger holds exact decimals)",
            ),
            &["pool", "unit"],
        )?;
        let verification = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_verification_results_total",
                "Replica results by verdict: accepted, outvoted (mismatch), rejected (no quorum)",
            ),
            &["verdict"],
        )?;
        let ledger_intact = IntGaugeVec::new(
            Opts::new(
                "edgeloom_operator_ledger_intact",
                "1 while the pool's ledger chain verifies",
            ),
            &["pool"],
        )?;
        let ledger_receipts = IntGaugeVec::new(
            Opts::new(
                "edgeloom_operator_ledger_receipts",
                "Receipts in the pool's ledger",
            ),
            &["pool"],
        )?;
        let quarantined_nodes = IntGaugeVec::new(
            Opts::new(
                "edgeloom_operator_quarantined_nodes",
                "Nodes that get no work because they were caught with wrong results",
            ),
            &["pool"],
        )?;
        registry.register(Box::new(quarantined_nodes.clone()))?;
        let stalled = IntCounter::new(
            "edgeloom_operator_tasks_stalled_total",
            "Tasks failed by the operator because they made no progress within their timeout",
        )?;
        registry.register(Box::new(stalled.clone()))?;
        let orphans_removed = IntCounter::new(
            "edgeloom_operator_orphaned_tasks_removed_total",
            "Tasks removed from member clusters because their job no longer exists in the hub",
        )?;
        registry.register(Box::new(orphans_removed.clone()))?;
        registry.register(Box::new(receipts.clone()))?;
        registry.register(Box::new(rewards.clone()))?;
        registry.register(Box::new(verification.clone()))?;
        let forfeits = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_forfeits_total",
                "Receipts taken back from nodes caught cheating while the receipts were in escrow",
            ),
            &["pool"],
        )?;
        registry.register(Box::new(forfeits.clone()))?;
        registry.register(Box::new(ledger_intact.clone()))?;
        registry.register(Box::new(ledger_receipts.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(placement_duration.clone()))?;
        registry.register(Box::new(snapshot_duration.clone()))?;
        registry.register(Box::new(verdicts_reused.clone()))?;
        registry.register(Box::new(tasks_created.clone()))?;
        registry.register(Box::new(tasks.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(member_reachable.clone()))?;
        registry.register(Box::new(member_ready_nodes.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(jobs_finished.clone()))?;
        // Counters that dashboards and alerts read with increase()/rate() start at 0, so
        // that their first event is an increase and not a new series.
        for phase in ["Succeeded", "Failed"] {
            jobs_finished.with_label_values(&[phase]).inc_by(0);
        }
        for verdict in ["accepted", "outvoted", "broken_reveal", "rejected"] {
            verification.with_label_values(&[verdict]).inc_by(0);
        }
        for reason in ["failed", "node_lost"] {
            retries.with_label_values(&[reason]).inc_by(0);
        }
        let federated_rounds = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_federated_rounds_total",
                "Federated rounds completed, by topology",
            ),
            &["topology"],
        )?;
        let federated_updates = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_federated_updates_total",
                "Federated updates by verdict: accepted, rejected (by the aggregation), missing (lost, failed, late)",
            ),
            &["verdict"],
        )?;
        let federated_bytes = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_federated_bytes_total",
                "Bytes of federated models moved, by level: member (node updates inside their member cluster), hub (up to the hub)",
            ),
            &["level"],
        )?;
        registry.register(Box::new(federated_rounds.clone()))?;
        registry.register(Box::new(federated_updates.clone()))?;
        let federated_audits = IntCounterVec::new(
            Opts::new(
                "edgeloom_operator_federated_audits_total",
                "The hub's audits of member aggregations, by result: matched, mismatched (the aggregator caught), corrected (updates it could not read restored), inconclusive",
            ),
            &["result"],
        )?;
        registry.register(Box::new(federated_bytes.clone()))?;
        registry.register(Box::new(federated_audits.clone()))?;
        for result in ["matched", "mismatched", "corrected", "inconclusive"] {
            federated_audits.with_label_values(&[result]).inc_by(0);
        }
        for topology in ["Tree", "Flat"] {
            federated_rounds.with_label_values(&[topology]).inc_by(0);
        }
        for verdict in ["accepted", "rejected", "missing"] {
            federated_updates.with_label_values(&[verdict]).inc_by(0);
        }
        for level in ["member", "hub"] {
            federated_bytes.with_label_values(&[level]).inc_by(0);
        }
        Ok(Metrics {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            queue_depth,
            placement_duration,
            snapshot_duration,
            verdicts_reused,
            tasks_created,
            tasks,
            retries,
            member_reachable,
            member_ready_nodes,
            leader,
            jobs_finished,
            receipts,
            rewards,
            verification,
            forfeits,
            ledger_intact,
            ledger_receipts,
            quarantined_nodes,
            stalled,
            orphans_removed,
            federated_rounds,
            federated_updates,
            federated_bytes,
            federated_audits,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
