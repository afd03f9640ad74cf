//! The orphan sweeper (docs/ARCHITECTURE.md, "Failure model"): ComputeTasks whose job no
//! longer exists in the hub are deleted from every member cluster, with a metric and an
//! event on their pool. A job's finalizer removes its tasks; the sweeper catches what a
//! race or an outage left behind (a task created while its job was being deleted, a job
//! removed while a member was away, a hub restored from a backup).

use crate::context::Context;
use crate::fleet::Member;
use edgeloom_crds::ComputeJob;
use edgeloom_crds::compute_task::JOB_UID_LABEL;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Sweeps every `every`, forever.
pub async fn run(ctx: Arc<Context>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let removed = sweep(&ctx).await;
        if removed > 0 {
            tracing::warn!(removed, "removed tasks whose job no longer exists");
        }
        let pages = sweep_pages(&ctx).await;
        if pages > 0 {
            tracing::warn!(
                pages,
                "removed shard status pages whose job no longer exists"
            );
        }
    }
}

/// One sweep; returns how many tasks it deleted.
pub async fn sweep(ctx: &Context) -> usize {
    // The members' tasks first, the hub's jobs second: a task is created only for a job
    // that exists, so a task seen before the list whose job the list lacks belongs to a
    // job that is gone (never to one created in between).
    let members: Vec<Arc<Member>> = ctx
        .fleet
        .members()
        .into_iter()
        .filter(|m| m.synced() && m.health().reachable)
        .collect();
    let seen: Vec<(Arc<Member>, Vec<Arc<crate::cache::TaskEntry>>)> = members
        .into_iter()
        .map(|m| {
            let tasks = m.tasks.state();
            (m, tasks)
        })
        .filter(|(_, t)| !t.is_empty())
        .collect();
    if seen.is_empty() {
        return 0;
    }
    let jobs: Api<ComputeJob> = Api::all(ctx.client.clone());
    let uids: HashSet<String> = match jobs.list_metadata(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter_map(|j| j.metadata.uid)
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "listing jobs for the orphan sweep failed");
            return 0;
        }
    };
    let mut removed = 0;
    for (m, tasks) in seen {
        let mut orphans: BTreeMap<&str, Vec<&crate::cache::TaskEntry>> = BTreeMap::new();
        for t in &tasks {
            if !uids.contains(&*t.job_uid) {
                orphans.entry(&t.job_uid).or_default().push(t);
            }
        }
        for (uid, ts) in orphans {
            let api = m.tasks_api();
            let mut gone = 0;
            for t in &ts {
                match api.delete(&t.name, &DeleteParams::default()).await {
                    Ok(_) => gone += 1,
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        tracing::debug!(task = %t.name, member = %m.key, error = %e, "deleting an orphaned task failed")
                    }
                }
            }
            let cms: Api<ConfigMap> = Api::namespaced(m.client.clone(), SYSTEM_NAMESPACE);
            let _ = cms
                .delete_collection(
                    &DeleteParams::default(),
                    &ListParams::default().labels(&format!("{JOB_UID_LABEL}={uid}")),
                )
                .await;
            if gone == 0 {
                continue;
            }
            removed += gone;
            ctx.metrics.orphans_removed.inc_by(gone as u64);
            let job = ts
                .first()
                .map(|t| format!("{}/{}", t.job_namespace, t.job_name))
                .unwrap_or_default();
            let note = format!(
                "{}: removed {gone} task(s) of job {job} (uid {uid}), which no longer exists in the hub",
                m.spec.name
            );
            tracing::warn!(member = %m.key, %job, %uid, gone, "removed orphaned tasks");
            if let Some(pool) = ctx
                .pools
                .state()
                .into_iter()
                .find(|p| p.name_any() == m.pool)
            {
                crate::events::publish(
                    &ctx.recorder,
                    &pool.object_ref(&()),
                    EventType::Warning,
                    "OrphanedTasksRemoved",
                    "Sweep",
                    &note,
                )
                .await;
            }
        }
    }
    removed
}

/// Deletes shard status pages (docs/ARCHITECTURE.md, "Bounded status") whose job no
/// longer exists (its finalizer removed by hand, say); returns how many. Pages are
/// listed before jobs: a page is written only for a job that exists.
pub async fn sweep_pages(ctx: &Context) -> usize {
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let Ok(pages) = cms
        .list_metadata(&ListParams::default().labels(JOB_UID_LABEL))
        .await
    else {
        return 0;
    };
    if pages.items.is_empty() {
        return 0;
    }
    let jobs: Api<ComputeJob> = Api::all(ctx.client.clone());
    let Ok(list) = jobs.list_metadata(&ListParams::default()).await else {
        return 0;
    };
    let uids: HashSet<String> = list
        .items
        .into_iter()
        .filter_map(|j| j.metadata.uid)
        .collect();
    let mut removed = 0;
    for page in pages.items {
        let owner = page
            .labels()
            .get(JOB_UID_LABEL)
            .cloned()
            .unwrap_or_default();
        if uids.contains(&owner) {
            continue;
        }
        let name = page.name_any();
        match cms.delete(&name, &DeleteParams::default()).await {
            Ok(_) => removed += 1,
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::debug!(page = %name, error = %e, "deleting an orphaned page failed"),
        }
    }
    removed
}
