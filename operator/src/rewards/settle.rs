//! Paying a job's accepted results (docs/ARCHITECTURE.md, "Rewards"): one receipt each in
//! the ledger of the pool where the work ran, capped by the job's budget; trust updated
//! (verified results gain, caught nodes lose and forfeit what is still in escrow); the
//! job's totals read back from the ledgers. The job controller calls it before it writes
//! the job's status, so nothing is paid twice after a crash.

use crate::context::{Context, failpoint};
use crate::decimal::Amount;
use crate::fleet::Member;
use crate::lifecycle::{self, Accepted, Decision, Outvoted, TaskView};
use crate::rewards::ledger::{self, Receipt};
use crate::rewards::store::{StoreError, Totals};
use crate::rewards::trust;
use edgeloom_crds::ComputeJob;
use edgeloom_crds::compute_job::RewardSummary;
use edgeloom_crds::schema::Decimal;
use jiff::Timestamp;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Errors of settling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ledger or reputation records could not be read or written.
    #[error("ledger of pool {0}: {1}")]
    Ledger(String, #[source] StoreError),
    /// A reward could not be computed (a rate that is not an exact decimal, or overflow).
    #[error("reward for {0}: {1}")]
    Reward(String, String),
}

/// The job's receipts in the ledgers of its pools.
pub async fn job_totals(
    uid: &str,
    members: &[Arc<Member>],
    ctx: &Context,
) -> Result<Totals, Error> {
    let pools: BTreeSet<&str> = members.iter().map(|m| m.pool.as_str()).collect();
    let mut all = Totals::default();
    for pool in pools {
        let t = ctx
            .books
            .ledger(pool)
            .job_totals(uid)
            .await
            .map_err(|e| Error::Ledger(pool.to_string(), e))?;
        all.receipts += t.receipts;
        all.total = all
            .total
            .checked_add(t.total)
            .map_err(|e| Error::Reward(uid.to_string(), e.to_string()))?;
        for (a, v) in t.by_account {
            let e = all.by_account.entry(a).or_default();
            *e = e
                .checked_add(v)
                .map_err(|e| Error::Reward(uid.to_string(), e.to_string()))?;
        }
    }
    Ok(all)
}

pub fn rewards_summary(paid: &Totals, members: &[Arc<Member>]) -> Option<RewardSummary> {
    if paid.receipts == 0 {
        return None;
    }
    let units: BTreeSet<String> = members
        .iter()
        .map(|m| m.pool_spec().rewards.unit.clone())
        .collect();
    let unit = units.into_iter().collect::<Vec<_>>().join("/");
    Some(RewardSummary {
        total: Some(format!("{} {unit}", paid.total)),
        amount: Some(Decimal(paid.total.to_string())),
        unit: Some(unit),
        receipts: paid.receipts,
        by_account: paid
            .by_account
            .iter()
            .map(|(a, v)| (a.clone(), Decimal(v.to_string())))
            .collect(),
    })
}

/// For adaptive verification: the trusted nodes among the job's tasks, and the shards a
/// spot check picked (by the salt of the pool where the shard's first replica runs).
pub async fn trust_view(
    job: &ComputeJob,
    views: &[TaskView],
    ctx: &Context,
) -> Result<(BTreeSet<(String, String)>, BTreeSet<u32>), Error> {
    let mut trusted = BTreeSet::new();
    let mut spot = BTreeSet::new();
    if !job.spec.verification.as_ref().is_some_and(|v| v.adaptive) {
        return Ok((trusted, spot));
    }
    let uid = job.uid().unwrap_or_default();
    let members = ctx.fleet.members();
    for v in views.iter().filter(|v| v.replica == 0) {
        let Some(m) = members.iter().find(|m| m.key == v.member) else {
            continue;
        };
        let policy = m.pool_spec().verification.clone();
        let node = format!("{}/{}", v.cluster, v.node);
        let (is_trusted, salt) = ctx
            .books
            .reputation(&m.pool)
            .view(std::slice::from_ref(&node), policy.trust_threshold)
            .await
            .map_err(|e| Error::Ledger(m.pool.clone(), e))?;
        if is_trusted[0] {
            trusted.insert((v.member.clone(), v.node.clone()));
        }
        let rate: Amount = policy.spot_check_rate.0.parse().unwrap_or(Amount::ZERO);
        if trust::spot_checked(&salt, &uid, v.shard, rate) {
            spot.insert(v.shard);
        }
    }
    Ok((trusted, spot))
}

/// The median claimed TFLOP/s of a pool's nodes (0 when none claims any).
fn median_tflops(ctx: &Context, pool: &str) -> f64 {
    let claims: Vec<f64> = ctx
        .fleet
        .pool_members(pool)
        .iter()
        .flat_map(|pm| pm.nodes.state())
        .map(|n| n.inventory.tflops)
        .collect();
    trust::median_claim(claims)
}

/// Pays accepted results: one receipt each, appended to the ledger of the pool where the
/// work ran (a receipt already there is not written again), then trust is updated: nodes
/// whose newly paid result was verified by another replica gain, outvoted nodes lose.
///
/// A receipt that cannot be computed or admitted (overflow, malformed) is left out with
/// the reason, returned for the job's `Paid` condition; the others are written. With a
/// `budget`, receipts are capped so that the job is never paid past it.
pub async fn settle(
    job: &ComputeJob,
    decision: &Decision,
    ctx: &Context,
    now: Timestamp,
    budget: Option<Amount>,
    paid_before: &Totals,
) -> Result<Vec<String>, Error> {
    pay(
        job,
        (&decision.accepted, &decision.outvoted, None),
        ctx,
        now,
        budget,
        paid_before,
    )
    .await
}

/// [`settle`] for results accepted and caught by any decision: a Federated job's round
/// (`round`) pays its accepted updates and aggregations here, and its rejected updates
/// count against their nodes.
pub async fn pay(
    job: &ComputeJob,
    (accepted, outvoted, round): (&[Accepted], &[Outvoted], Option<u32>),
    ctx: &Context,
    now: Timestamp,
    budget: Option<Amount>,
    paid_before: &Totals,
) -> Result<Vec<String>, Error> {
    let mut problems = Vec::new();
    if accepted.is_empty() && outvoted.is_empty() {
        return Ok(problems);
    }
    let uid = job.uid().unwrap_or_default();
    let job_key = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
    let members = ctx.fleet.members();
    // pool -> (receipts, verified (node key, relative speed) by receipt key)
    let mut by_pool: BTreeMap<String, (Vec<Receipt>, BTreeMap<String, Verified>)> = BTreeMap::new();
    let mut medians: BTreeMap<String, f64> = BTreeMap::new();
    for a in accepted {
        let Some(m) = members.iter().find(|m| m.key == a.member) else {
            tracing::warn!(member = %a.member, job = %job_key, "accepted result from a member that is gone; not paid");
            continue;
        };
        let spec = m.pool_spec();
        let rate = |d: &Decimal, what: &str| -> Result<Amount, Error> {
            d.0.parse().map_err(|e: crate::decimal::DecimalError| {
                Error::Reward(format!("pool {} {what}", m.pool), e.to_string())
            })
        };
        let per_cpu = rate(&spec.rewards.per_cpu_core_second, "perCpuCoreSecond")?;
        let per_gpu = rate(&spec.rewards.per_gpu_second, "perGpuSecond")?;
        let node = m.nodes.get(&a.node);
        let speed = if spec.rewards.normalize_by_speed {
            // Once per pool and call, not per result: it reads every node of the pool.
            let median = *medians
                .entry(m.pool.clone())
                .or_insert_with(|| median_tflops(ctx, &m.pool));
            // The claimed speed counts only as far as verified work shows.
            let claimed = node.as_ref().map_or(0.0, |n| n.inventory.tflops);
            trust::pay_speed_factor_milli(
                claimed,
                median,
                ctx.scheduler
                    .relative_speed(&m.pool, &format!("{}/{}", a.cluster, a.node)),
            )
        } else {
            1000
        };
        let amount = match ledger::reward(a.cpu_core_millis, a.gpu_millis, per_cpu, per_gpu, speed)
        {
            Ok(amount) => amount,
            Err(e) => {
                problems.push(format!(
                    "shard {} replica {}: reward not computable: {e}",
                    a.shard, a.replica
                ));
                continue;
            }
        };
        let receipt = Receipt {
            job_uid: uid.clone(),
            job: job_key.clone(),
            shard: a.shard,
            replica: a.replica,
            attempt: a.attempt,
            node: a.node.clone(),
            account: node
                .and_then(|n| n.inventory.account.clone())
                .unwrap_or_else(|| format!("node:{}/{}", a.cluster, a.node)),
            cpu_core_millis: a.cpu_core_millis,
            gpu_millis: a.gpu_millis,
            per_cpu_core_second: per_cpu.to_string(),
            per_gpu_second: per_gpu.to_string(),
            speed_factor_milli: speed,
            amount: amount.to_string(),
            result_digest: a.digest.clone(),
            time: now.to_string(),
            cluster: Some(a.cluster.clone()),
            forfeits: None,
            round,
        };
        let entry = by_pool.entry(m.pool.clone()).or_default();
        if a.verified {
            entry.1.insert(
                receipt.key(),
                (format!("{}/{}", a.cluster, a.node), a.relative_speed_milli),
            );
        }
        entry.0.push(receipt);
    }
    let mut caught: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let broken: BTreeSet<String> = outvoted
        .iter()
        .filter(|o| o.why == lifecycle::Caught::BrokenReveal)
        .map(|o| format!("{}/{}", o.cluster, o.node))
        .collect();
    for o in outvoted {
        if let Some(m) = members.iter().find(|m| m.key == o.member) {
            let round = round.map(|r| format!("r{r}/")).unwrap_or_default();
            caught.entry(m.pool.clone()).or_default().push((
                format!("{}/{}", o.cluster, o.node),
                format!("{uid}/{round}{}/{}/{}", o.shard, o.replica, o.attempt),
            ));
        }
    }
    // Nodes whose newly paid result was verified, by pool.
    let mut valid: BTreeMap<String, Vec<Verified>> = BTreeMap::new();
    // Paid in this call so far, in pools already settled (counts against the budget).
    let mut paid_now = Amount::ZERO;
    for (pool, (receipts, verified)) in by_pool {
        let ledger = ctx.books.ledger(&pool);
        // What the budget leaves for this pool's ledger: the budget less what the job was
        // paid in its other pools, before and during this call.
        let cap = match budget {
            Some(max) => {
                let here = ledger
                    .job_totals(&uid)
                    .await
                    .map_err(|e| Error::Ledger(pool.clone(), e))?;
                let elsewhere = paid_before
                    .total
                    .saturating_sub(here.total)
                    .checked_add(paid_now)
                    .unwrap_or(max);
                Some(max.saturating_sub(elsewhere))
            }
            None => None,
        };
        let appended = ledger
            .append(receipts, cap)
            .await
            .map_err(|e| Error::Ledger(pool.clone(), e))?;
        failpoint("after-ledger-append");
        for (key, why) in &appended.refused {
            tracing::warn!(pool = %pool, receipt = %key, %why, "receipt refused");
            problems.push(format!("receipt {key} refused: {why}"));
        }
        let written = appended.written;
        for e in &written {
            if let Ok(a) = e.receipt.amount.parse::<Amount>() {
                paid_now = paid_now.checked_add(a).unwrap_or(paid_now);
            }
        }
        if written.is_empty() {
            continue;
        }
        let unit = members
            .iter()
            .find(|m| m.pool == pool)
            .map(|m| m.pool_spec().rewards.unit.clone())
            .unwrap_or_default();
        let mut sum = 0.0;
        for e in &written {
            sum += e.receipt.amount.parse::<f64>().unwrap_or(0.0);
            tracing::info!(
                pool = %pool, seq = e.seq, job = %job_key, shard = e.receipt.shard,
                replica = e.receipt.replica, attempt = e.receipt.attempt, node = %e.receipt.node,
                account = %e.receipt.account, amount = %e.receipt.amount, "receipt issued"
            );
        }
        ctx.metrics
            .receipts
            .with_label_values(&[&pool])
            .inc_by(written.len() as u64);
        ctx.metrics
            .rewards
            .with_label_values(&[&pool, &unit])
            .inc_by(sum);
        ctx.metrics
            .verification
            .with_label_values(&["accepted"])
            .inc_by(written.len() as u64);
        valid.insert(
            pool,
            written
                .iter()
                .filter_map(|e| verified.get(&e.receipt.key()).cloned())
                .collect(),
        );
    }
    let pools: BTreeSet<String> = valid.keys().chain(caught.keys()).cloned().collect();
    for pool in pools {
        let valid = valid.remove(&pool).unwrap_or_default();
        let outvoted = caught.remove(&pool).unwrap_or_default();
        // Escrow first: a node caught forfeits what it was paid within the window, before
        // the catch is recorded, so that a failed or interrupted forfeit is retried (a
        // forfeit is idempotent; a catch recorded is not seen as new again).
        let unrecorded = ctx
            .books
            .reputation(&pool)
            .unrecorded(&outvoted)
            .await
            .map_err(|e| Error::Ledger(pool.clone(), e))?;
        let mut forfeited = Vec::new();
        let nodes: BTreeSet<&String> = unrecorded.iter().map(|(n, _)| n).collect();
        for node in nodes {
            let forfeits = ctx
                .books
                .ledger(&pool)
                .forfeit(node, now)
                .await
                .map_err(|e| Error::Ledger(pool.clone(), e))?;
            forfeited.push((node.clone(), forfeits));
        }
        let new_caught = ctx
            .books
            .reputation(&pool)
            .update(&valid, &outvoted)
            .await
            .map_err(|e| Error::Ledger(pool.clone(), e))?;
        record_caught(job, &broken, &new_caught, ctx).await;
        for (node, forfeits) in &forfeited {
            if forfeits.is_empty() {
                continue;
            }
            for e in forfeits {
                tracing::warn!(
                    pool = %pool, seq = e.seq, node = %node, receipt = ?e.receipt.forfeits,
                    amount = %e.receipt.amount, "receipt forfeited"
                );
            }
            ctx.metrics
                .forfeits
                .with_label_values(&[&pool])
                .inc_by(forfeits.len() as u64);
            crate::events::publish(
                &ctx.recorder,
                &job.object_ref(&()),
                EventType::Warning,
                "RewardsForfeited",
                "Pay",
                &format!(
                    "{node} was caught: {} receipt(s) still in escrow forfeited (forfeit entries in the ledger of pool {pool})",
                    forfeits.len()
                ),
            )
            .await;
        }
    }
    Ok(problems)
}

/// A node ("cluster/node") with a newly paid verified result, and its relative speed.
type Verified = (String, Option<u32>);

/// Counts and reports the nodes newly caught (`new`, as "cluster/node") for this job.
async fn record_caught(job: &ComputeJob, broken: &BTreeSet<String>, new: &[String], ctx: &Context) {
    let (revealed, outvoted): (Vec<&str>, Vec<&str>) = new
        .iter()
        .map(String::as_str)
        .partition(|n| broken.contains(*n));
    for (nodes, label, reason, what) in [
        (
            outvoted,
            "outvoted",
            "ResultOutvoted",
            "outvoted by a quorum",
        ),
        (
            revealed,
            "broken_reveal",
            "RevealRejected",
            "revealed a result that does not open their commitment (copied or changed after the fact)",
        ),
    ] {
        if nodes.is_empty() {
            continue;
        }
        ctx.metrics
            .verification
            .with_label_values(&[label])
            .inc_by(nodes.len() as u64);
        crate::events::publish(
            &ctx.recorder,
            &job.object_ref(&()),
            EventType::Warning,
            reason,
            "Verify",
            &format!(
                "result(s) of {} {what}: not paid, node trust reset",
                nodes.join(", ")
            ),
        )
        .await;
    }
}
