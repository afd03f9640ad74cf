//! Waiting on ComputeJobs and EdgePools in the hub, for e2e tests.

use crate::federation::Federation;
use crate::wait;
use edgeloom_crds::compute_job::ShardStatus;
use edgeloom_crds::{ComputeJob, EdgePool, JobPhase, TaskPhase};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use std::future::Future;
use std::time::Duration;

/// Waits until job `ns/name` is in `phase`; panics after `timeout` with what it last saw.
pub async fn wait_phase(
    fed: &Federation,
    ns: &str,
    name: &str,
    phase: JobPhase,
    timeout: Duration,
) -> ComputeJob {
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), ns);
    wait::until(&format!("job {name} to be {phase:?}"), timeout, || {
        let api = api.clone();
        async move {
            let j = api.get(name).await.map_err(|e| e.to_string())?;
            let s = j.status.clone().unwrap_or_default();
            if s.phase == Some(phase) {
                Ok(j)
            } else {
                let shards: Vec<_> = s
                    .shards
                    .iter()
                    .map(|x| (x.node.clone(), x.phase, x.message.clone()))
                    .collect();
                let conditions: Vec<_> = s
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}", c.type_, c.status, c.message))
                    .collect();
                Err(format!(
                    "{:?} {:?} {shards:?} {conditions:?}",
                    s.phase, s.progress
                ))
            }
        }
    })
    .await
}

/// Waits until at least `n` shard replicas of job `ns/name` run; returns the job.
pub async fn wait_running(
    fed: &Federation,
    ns: &str,
    name: &str,
    n: usize,
    timeout: Duration,
) -> ComputeJob {
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), ns);
    wait::until(&format!("{n} running shard(s) of {name}"), timeout, || {
        let api = api.clone();
        async move {
            let j = api.get(name).await.map_err(|e| e.to_string())?;
            let shards = j.status.clone().unwrap_or_default().shards;
            let running = shards
                .iter()
                .filter(|s| s.phase == TaskPhase::Running)
                .count();
            if running >= n {
                Ok(j)
            } else {
                Err(format!("{running} running: {shards:?}"))
            }
        }
    })
    .await
}

/// The first shard of a job once it runs.
pub async fn first_running_shard(
    fed: &Federation,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> ShardStatus {
    let job = wait_running(fed, ns, name, 1, timeout).await;
    job.status
        .unwrap_or_default()
        .shards
        .into_iter()
        .find(|s| s.phase == TaskPhase::Running)
        .unwrap_or_else(|| panic!("job {name} has no running shard"))
}

/// Waits until `fetch` (an object's status conditions) holds a condition of `type_` with
/// `status` whose message contains each of `contains`; returns that condition.
async fn wait_condition<F, Fut>(
    what: &str,
    type_: &str,
    status: &str,
    contains: &[&str],
    timeout: Duration,
    mut fetch: F,
) -> Condition
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Vec<Condition>, String>>,
{
    wait::until(
        &format!("{what}: {type_}={status} naming {contains:?}"),
        timeout,
        || {
            let conditions = fetch();
            async move {
                let found = conditions.await?.into_iter().find(|c| c.type_ == type_);
                match found {
                    Some(c)
                        if c.status == status && contains.iter().all(|m| c.message.contains(m)) =>
                    {
                        Ok(c)
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
}

/// Waits until job `ns/name` has condition `type_`=`status` with a message containing each
/// of `contains`.
pub async fn wait_job_condition(
    fed: &Federation,
    ns: &str,
    name: &str,
    type_: &str,
    status: &str,
    contains: &[&str],
    timeout: Duration,
) -> Condition {
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), ns);
    wait_condition(
        &format!("job {name}"),
        type_,
        status,
        contains,
        timeout,
        || {
            let api = api.clone();
            async move {
                let j = api.get(name).await.map_err(|e| e.to_string())?;
                Ok(j.status.unwrap_or_default().conditions)
            }
        },
    )
    .await
}

/// Waits until EdgePool `name` has condition `type_`=`status` with a message containing
/// each of `contains`.
pub async fn wait_pool_condition(
    fed: &Federation,
    name: &str,
    type_: &str,
    status: &str,
    contains: &[&str],
    timeout: Duration,
) -> Condition {
    let api: Api<EdgePool> = Api::all(fed.hub.clone());
    wait_condition(
        &format!("pool {name}"),
        type_,
        status,
        contains,
        timeout,
        || {
            let api = api.clone();
            async move {
                let p = api.get(name).await.map_err(|e| e.to_string())?;
                Ok(p.status.unwrap_or_default().conditions)
            }
        },
    )
    .await
}
