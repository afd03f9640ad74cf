//! The EdgePool controller: connect every member cluster (kubeconfig Secret or the hub
//! itself), and write reachability, node readiness and capacity to status. A bad or
//! missing kubeconfig is a condition on the pool, not a crash loop; a changed Secret
//! reconnects the member.

use crate::conditions;
use crate::context::{Context, FIELD_MANAGER, POOL_FINALIZER};
use crate::decimal::Amount;
use crate::rewards::merkle;
use crate::rewards::objects::{SnapshotRef, Summary};
use crate::rewards::store::StoreError;
use crate::scheduler::selector_matches;
use edgeloom_crds::EdgePool;
use edgeloom_crds::edge_pool::{Capacity, ClusterStatus, EdgePoolStatus, PoolRewards};
use edgeloom_crds::inventory::{CHECKPOINTS_CONFIGMAP, SYSTEM_NAMESPACE};
use edgeloom_crds::schema::Decimal;
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors of the pool controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing to the hub failed.
    #[error("hub API: {0}")]
    Hub(#[source] kube::Error),
    /// Tasks of a deleted pool remain in member clusters that cannot be reached yet.
    #[error("tasks of the deleted pool remain in: {0}")]
    CleanupPending(String),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    fn category(&self) -> &'static str {
        match self {
            Error::Hub(_) => "hub_api",
            Error::CleanupPending(_) => "cleanup_pending",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

/// Runs the controller; pools are reconciled when they or a Secret in the operator's
/// namespace change, and every 5 s to refresh reachability and capacity.
pub async fn run(ctx: Arc<Context>, pools: Controller<EdgePool>) {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let store = ctx.pools.clone();
    pools
        .watches(
            secrets,
            kube::runtime::watcher::Config::default(),
            move |secret: Secret| {
                let name = secret.name_any();
                store
                    .state()
                    .iter()
                    .filter(|p| {
                        p.spec
                            .clusters
                            .iter()
                            .any(|c| c.kubeconfig_secret.as_ref().is_some_and(|s| s.name == name))
                    })
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

fn error_policy(pool: Arc<EdgePool>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&["edgepool", error.category()])
        .inc();
    tracing::warn!(pool = %pool.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

#[tracing::instrument(skip_all, fields(pool = %pool.name_any()))]
async fn reconcile(pool: Arc<EdgePool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    ctx.metrics
        .reconciles
        .with_label_values(&["edgepool"])
        .inc();
    let api: Api<EdgePool> = Api::all(ctx.client.clone());
    let result = finalizer(&api, POOL_FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(pool) => apply(pool, &ctx).await,
            Finalizer::Cleanup(pool) => cleanup(pool, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    ctx.metrics
        .reconcile_duration
        .with_label_values(&["edgepool"])
        .observe(start.elapsed().as_secs_f64());
    result
}

/// A deleted pool's tasks are cancelled in its member clusters: nothing placed through it
/// would be paid from its ledger any more, so contributors stop working for it (its jobs
/// place their slots through their other pools, or wait). A member that cannot be reached
/// holds the finalizer until it answers, or until it has been unreachable for the pool's
/// heartbeat timeout: then its tasks are left (an event says so), as the pool's deletion
/// must not wait forever on a cluster that may never return.
async fn cleanup(pool: Arc<EdgePool>, ctx: &Context) -> Result<Action, Error> {
    let name = pool.name_any();
    let now = Timestamp::now();
    let mut pending = Vec::new();
    let mut abandoned = Vec::new();
    let mut cancelled = 0;
    for m in ctx.fleet.pool_members(&name) {
        if !m.tasks.ready() || !m.health().reachable {
            if m.lost(now) {
                abandoned.push(m.spec.name.clone());
            } else {
                pending.push(m.spec.name.clone());
            }
            continue;
        }
        let api = m.tasks_api();
        for t in m
            .tasks
            .state()
            .iter()
            .filter(|t| *t.pool == *name && !t.terminal())
        {
            match api
                .delete(&t.name, &kube::api::DeleteParams::default())
                .await
            {
                Ok(_) => cancelled += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(_) => pending.push(format!("{}/{}", m.spec.name, t.name)),
            }
        }
    }
    let reference = pool.object_ref(&());
    if !pending.is_empty() {
        let why = pending.join(", ");
        crate::events::publish(
            &ctx.recorder,
            &reference,
            EventType::Warning,
            "CleanupPending",
            "Cleanup",
            &format!("waiting to cancel the deleted pool's tasks in: {why}"),
        )
        .await;
        return Err(Error::CleanupPending(why));
    }
    if !abandoned.is_empty() {
        crate::events::publish(
            &ctx.recorder,
            &reference,
            EventType::Warning,
            "TasksLeftBehind",
            "Cleanup",
            &format!(
                "unreachable past the heartbeat timeout, their tasks of this pool are left: {}",
                abandoned.join(", ")
            ),
        )
        .await;
    }
    tracing::info!(pool = %name, cancelled, "pool deleted: its tasks were cancelled");
    ctx.fleet.remove_pool(&name);
    Ok(Action::await_change())
}

/// The kubeconfig text of a remote member, or why it cannot be had.
async fn kubeconfig(ctx: &Context, name: &str, key: &str) -> Result<String, String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let secret = match secrets.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(format!("Secret {}/{name} not found", ctx.namespace)),
        Err(e) => return Err(format!("reading Secret {}/{name}: {e}", ctx.namespace)),
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| format!("Secret {}/{name} has no key {key}", ctx.namespace))?;
    String::from_utf8(bytes)
        .map_err(|_| format!("Secret {}/{name} key {key} is not UTF-8", ctx.namespace))
}

/// Publishes the pool's latest signed checkpoint in each of its member clusters, where
/// agents read it and keep it on their Lease (the contributors' evidence of the history
/// they were shown). Best effort: a member that is unreachable gets it next time.
async fn publish_checkpoint(ctx: &Context, pool: &str, cp: &merkle::Checkpoint) {
    let Ok(json) = serde_json::to_string(cp) else {
        return;
    };
    // Agents seal their reveals to this key (the operator alone reads them).
    let reveal_key = ctx
        .books
        .reveal_secret()
        .map(|k| hex::encode(k.public_key().as_bytes()));
    for m in ctx.fleet.pool_members(pool) {
        let api: Api<ConfigMap> = Api::namespaced(m.client.clone(), SYSTEM_NAMESPACE);
        let patch = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CHECKPOINTS_CONFIGMAP},
            "data": {pool: json}
        });
        let mut patch = patch;
        if let Some(k) = &reveal_key {
            patch["data"][edgeloom_crds::commitment::REVEAL_KEY_FIELD] = k.clone().into();
        }
        // A field manager per pool, so that pools sharing a member keep each other's keys.
        if let Err(e) = api
            .patch(
                CHECKPOINTS_CONFIGMAP,
                &PatchParams::apply(&format!(
                    "{FIELD_MANAGER}-{}",
                    crate::rewards::store::pool_token(pool)
                ))
                .force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            tracing::debug!(member = %m.key, error = %e, "publishing the ledger checkpoint failed");
        }
    }
}

/// The checkpoint in the pool's status, checked against the operator's key (an error
/// when it does not verify: someone altered or forged it).
fn old_checkpoint(
    pool: &EdgePool,
    key: Option<&ed25519_dalek::SigningKey>,
) -> Option<Result<merkle::Checkpoint, String>> {
    let c = pool
        .status
        .as_ref()?
        .rewards
        .as_ref()?
        .checkpoint
        .as_ref()?;
    let cp = merkle::Checkpoint::from_status(&pool.name_any(), c);
    let trusted = key.map(|k| hex::encode(k.verifying_key().to_bytes()));
    Some(
        cp.verify(trusted.as_deref())
            .map(|()| cp)
            .map_err(|e| format!("the pool's ledger checkpoint does not verify: {e}")),
    )
}

/// Most accounts listed in the pool's status (the largest); `kubectl edgeloom ledger
/// balance` lists them all.
pub const STATUS_ACCOUNTS: usize = 100;

fn pool_rewards(summary: &Summary) -> PoolRewards {
    let mut accounts: Vec<(&String, &Amount)> = summary.totals.by_account.iter().collect();
    accounts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    PoolRewards {
        ledger_head: Some(summary.head.clone()),
        receipts: summary.totals.receipts,
        total: Some(Decimal(summary.totals.total.to_string())),
        by_account: accounts
            .into_iter()
            .take(STATUS_ACCOUNTS)
            .map(|(a, v)| (a.clone(), Decimal(v.to_string())))
            .collect(),
        checkpoint: None,
        snapshot: summary
            .snapshot
            .as_ref()
            .map(|s| edgeloom_crds::edge_pool::LedgerSnapshot {
                size: s.size,
                sha256: s.sha256.clone(),
            }),
        objects: Some(summary.objects),
    }
}

fn ledger_problem(
    conds: &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
    pool: &str,
    e: &StoreError,
    generation: Option<i64>,
    now: Timestamp,
    ctx: &Context,
) -> Option<PoolRewards> {
    match e {
        StoreError::Broken(why) => {
            ctx.metrics.ledger_intact.with_label_values(&[pool]).set(0);
            conditions::set(
                conds,
                "LedgerVerified",
                false,
                "ChainBroken",
                &format!("no receipts are written until it is repaired: {why}"),
                generation,
                now,
            );
        }
        other => tracing::warn!(pool, error = %other, "reading the ledger failed"),
    }
    None
}

async fn apply(pool: Arc<EdgePool>, ctx: &Context) -> Result<Action, Error> {
    let now = Timestamp::now();
    let name = pool.name_any();
    let pool_spec = Arc::new(pool.spec.clone());
    let old = pool.status.clone().unwrap_or_default();
    let mut clusters = Vec::new();
    let mut capacity = Capacity::default();
    let mut problems = Vec::new();
    let mut not_syncing = Vec::new();
    for spec in &pool.spec.clusters {
        let text = match &spec.kubeconfig_secret {
            Some(s) if !spec.local => match kubeconfig(ctx, &s.name, &s.key).await {
                Ok(t) => Some(t),
                Err(msg) => {
                    problems.push(format!("{}: {msg}", spec.name));
                    clusters.push(ClusterStatus {
                        name: spec.name.clone(),
                        reachable: false,
                        message: Some(msg),
                        ..Default::default()
                    });
                    continue;
                }
            },
            _ => None,
        };
        if !ctx
            .fleet
            .pool_members(&name)
            .iter()
            .any(|m| m.spec.name == spec.name)
        {
            crate::context::failpoint_delay(&format!("slow-connect-{}", spec.name)).await;
        }
        let member = match ctx
            .fleet
            .ensure(&name, pool_spec.clone(), spec, &ctx.client, text.as_deref())
            .await
        {
            Ok(m) => m,
            Err(e) => {
                let msg = e.to_string();
                problems.push(format!("{}: {msg}", spec.name));
                ctx.metrics
                    .reconcile_errors
                    .with_label_values(&["edgepool", e.category()])
                    .inc();
                clusters.push(ClusterStatus {
                    name: spec.name.clone(),
                    reachable: false,
                    message: Some(msg),
                    ..Default::default()
                });
                continue;
            }
        };
        let health = member.health();
        let sync_problem = member.sync_problem(now);
        if let Some(p) = &sync_problem {
            not_syncing.push(format!("{}: {p}", spec.name));
        }
        let mut status = ClusterStatus {
            name: spec.name.clone(),
            reachable: health.reachable,
            message: health.error.clone(),
            sync_problem,
            last_seen: health.last_seen.map(Time),
            ..Default::default()
        };
        for entry in member.nodes.state() {
            if let Some(sel) = &pool.spec.node_selector
                && !selector_matches(sel, &entry.label_map())
            {
                continue;
            }
            status.nodes += 1;
            capacity.nodes += 1;
            if health.reachable && member.node_ready(&entry.name, now) {
                status.ready_nodes += 1;
                capacity.ready_nodes += 1;
                let inv = &entry.inventory;
                capacity.gpus += inv.gpus;
                if let Some(p) = &inv.gpu_product {
                    *capacity.gpus_by_product.entry(p.clone()).or_default() += inv.gpus;
                }
                capacity.gpu_memory_mib += inv.gpu_memory_mib * inv.gpus as u64;
                capacity.cpu_cores += inv.cpu_cores;
                capacity.tflops += inv.tflops;
            }
        }
        if !health.reachable && (health.last_seen.is_some() || health.unreachable_since.is_some()) {
            problems.push(format!(
                "{}: unreachable: {}",
                spec.name,
                health.error.clone().unwrap_or_default()
            ));
        }
        ctx.metrics
            .member_reachable
            .with_label_values(&[&name, &spec.name])
            .set(health.reachable as i64);
        ctx.metrics
            .member_ready_nodes
            .with_label_values(&[&name, &spec.name])
            .set(status.ready_nodes as i64);
        clusters.push(status);
    }
    let names: Vec<String> = pool.spec.clusters.iter().map(|c| c.name.clone()).collect();
    ctx.fleet.retain(&name, &names);
    ctx.fleet.pool_connected(&name, now);
    capacity.tflops = (capacity.tflops * 1000.0).round() / 1000.0;

    let reachable = clusters.iter().filter(|c| c.reachable).count();
    let mut conds = old.conditions.clone();
    let generation = pool.metadata.generation;
    let all = reachable == clusters.len();
    conditions::set(
        &mut conds,
        "ClustersReachable",
        all,
        if all { "AllReachable" } else { "Unreachable" },
        &if all {
            format!("{reachable}/{} member clusters reachable", clusters.len())
        } else {
            problems.join("; ")
        },
        generation,
        now,
    );
    conditions::set(
        &mut conds,
        "ClustersSynced",
        not_syncing.is_empty(),
        if not_syncing.is_empty() {
            "Watching"
        } else {
            "NotSyncing"
        },
        &if not_syncing.is_empty() {
            "every reachable member cluster is watched".to_string()
        } else {
            format!(
                "answering but not watchable, so no work goes there: {}",
                not_syncing.join("; ")
            )
        },
        generation,
        now,
    );
    conditions::set(
        &mut conds,
        "Ready",
        capacity.ready_nodes > 0,
        if capacity.ready_nodes > 0 {
            "NodesReady"
        } else {
            "NoReadyNodes"
        },
        &format!(
            "{} of {} agent nodes have a fresh heartbeat",
            capacity.ready_nodes, capacity.nodes
        ),
        generation,
        now,
    );
    // Reward counters of this pool start at 0 (dashboards use increase()).
    ctx.metrics
        .rewards
        .with_label_values(&[&name, &pool.spec.rewards.unit])
        .inc_by(0.0);
    ctx.metrics.receipts.with_label_values(&[&name]).inc_by(0);
    ctx.metrics.forfeits.with_label_values(&[&name]).inc_by(0);
    // The ledger: re-read when a segment changed behind the operator's back, verified, and
    // checked against the last signed checkpoint (it must still begin with that history).
    let ledger = ctx.books.ledger(&name);
    ledger
        .set_escrow(pool.spec.verification.escrow_seconds)
        .await;
    let signed_before = pool
        .status
        .as_ref()
        .and_then(|s| s.rewards.as_ref())
        .is_some_and(|r| r.checkpoint.is_some());
    let key = ctx.books.signing_key(!signed_before).await;
    let previous = old_checkpoint(&pool, key.as_ref().ok());
    let snapshot = old
        .rewards
        .as_ref()
        .and_then(|r| r.snapshot.as_ref())
        .map(|s| SnapshotRef {
            size: s.size,
            sha256: s.sha256.clone(),
        });
    match &previous {
        // A pool that never signed one: its ledger may be used as it is.
        None => ledger.set_anchor(None, snapshot.clone()).await,
        Some(Ok(cp)) => ledger.set_anchor(Some(cp.clone()), snapshot.clone()).await,
        // A checkpoint that does not verify: the ledger stays unusable.
        Some(Err(_)) => {}
    }
    let checked = match (&key, &previous) {
        (Err(e), _) => Err(StoreError::Broken(format!("no signing key: {e}"))),
        (_, Some(Err(e))) => Err(StoreError::Broken(e.clone())),
        _ => ledger.refresh().await,
    };
    let rewards = match checked {
        Ok(()) => match ledger.summary().await {
            Ok(summary) => {
                // A new checkpoint when the ledger grew; the same one while it did not.
                let checkpoint = key.as_ref().ok().map(|k| match &previous {
                    Some(Ok(cp)) if cp.size == summary.size => cp.clone(),
                    _ => merkle::Checkpoint::sign(
                        k,
                        &name,
                        summary.size,
                        &summary.root,
                        &now.to_string(),
                    ),
                });
                if let Some(cp) = &checkpoint {
                    ledger
                        .set_anchor(Some(cp.clone()), summary.snapshot.clone().or(snapshot))
                        .await;
                    publish_checkpoint(ctx, &name, cp).await;
                }
                ctx.metrics.ledger_intact.with_label_values(&[&name]).set(1);
                ctx.metrics
                    .ledger_receipts
                    .with_label_values(&[&name])
                    .set(summary.totals.receipts as i64);
                conditions::set(
                    &mut conds,
                    "LedgerVerified",
                    true,
                    "ChainIntact",
                    &format!(
                        "{} receipt(s), every link verified",
                        summary.totals.receipts
                    ),
                    generation,
                    now,
                );
                let mut rewards = pool_rewards(&summary);
                rewards.checkpoint = checkpoint.map(|c| c.to_status());
                Some(rewards)
            }
            Err(e) => ledger_problem(&mut conds, &name, &e, generation, now, ctx),
        },
        Err(e) => ledger_problem(&mut conds, &name, &e, generation, now, ctx),
    }
    .or(old.rewards.clone());
    let reputation = ctx.books.reputation(&name);
    if let Err(e) = reputation.refresh().await {
        tracing::warn!(pool = %name, error = %e, "re-reading reputation failed");
    }
    match reputation
        .quarantined(pool.spec.verification.quarantine_after)
        .await
    {
        Ok(q) => {
            if !q.is_empty() {
                tracing::debug!(pool = %name, nodes = ?q, "quarantined nodes get no work");
            }
            ctx.metrics
                .quarantined_nodes
                .with_label_values(&[&name])
                .set(q.len() as i64);
            ctx.scheduler.set_quarantined(&name, q);
        }
        Err(e) => tracing::warn!(pool = %name, error = %e, "reading reputation failed"),
    }
    match reputation.relative_speeds().await {
        Ok(speeds) => ctx.scheduler.set_relative_speeds(&name, speeds),
        Err(e) => tracing::warn!(pool = %name, error = %e, "reading verified speeds failed"),
    }
    let status = EdgePoolStatus {
        conditions: conds,
        observed_generation: generation,
        reachable: Some(format!("{reachable}/{}", clusters.len())),
        clusters,
        capacity: Some(capacity),
        rewards,
    };
    // last_seen moves every probe; write only when something else changed or every ~30 s.
    let changed = {
        let strip = |s: &EdgePoolStatus| {
            let mut s = s.clone();
            for c in &mut s.clusters {
                c.last_seen = None;
            }
            s
        };
        strip(&status) != strip(&old)
            || old
                .clusters
                .iter()
                .filter_map(|c| c.last_seen.as_ref())
                .all(|t| now.as_second() - t.0.as_second() > 30)
    };
    if changed {
        for (new, was) in status
            .clusters
            .iter()
            .map(|c| (c, old.clusters.iter().find(|o| o.name == c.name)))
        {
            if was.and_then(|w| w.sync_problem.as_ref()) != new.sync_problem.as_ref() {
                let (type_, reason, note) = match &new.sync_problem {
                    Some(p) => (
                        EventType::Warning,
                        "ClusterNotSyncing",
                        format!(
                            "{}: answers but cannot be watched, no work goes there: {p}",
                            new.name
                        ),
                    ),
                    None => (
                        EventType::Normal,
                        "ClusterSynced",
                        format!("{}: watched again", new.name),
                    ),
                };
                crate::events::publish(
                    &ctx.recorder,
                    &pool.object_ref(&()),
                    type_,
                    reason,
                    "Sync",
                    &note,
                )
                .await;
            }
            let flipped = was.is_some_and(|w| w.reachable != new.reachable)
                || (was.is_none() && !new.reachable);
            if flipped {
                let (type_, reason) = if new.reachable {
                    (EventType::Normal, "ClusterReachable")
                } else {
                    (EventType::Warning, "ClusterUnreachable")
                };
                let note = if new.reachable {
                    format!("{}: reachable again", new.name)
                } else {
                    format!(
                        "{}: unreachable: {}",
                        new.name,
                        new.message.as_deref().unwrap_or("no answer")
                    )
                };
                crate::events::publish(
                    &ctx.recorder,
                    &pool.object_ref(&()),
                    type_,
                    reason,
                    "Probe",
                    &note,
                )
                .await;
            }
        }
        let api: Api<EdgePool> = Api::all(ctx.client.clone());
        let patch = serde_json::json!({"apiVersion": "edgeloom.io/v1alpha1", "kind": "EdgePool", "status": status});
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::Hub)?;
    }
    Ok(Action::requeue(Duration::from_secs(3)))
}
