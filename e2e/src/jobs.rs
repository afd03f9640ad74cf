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

/// The events of object `name` in `ns` as (reason, message), oldest first.
pub async fn events_of(fed: &Federation, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(fed.hub.clone(), ns);
    let mut list: Vec<_> = api
        .list(&kube::api::ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .collect();
    list.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    list.into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Asserts that a finished job's status and events tell the truth (issue #11):
/// - its conditions agree with its phase (`Scheduled=True Finished`, `Complete` or `Failed`
///   true as the phase says, the other false);
/// - no slot still reads Pending, Running or Committed, and every slot that ran names its
///   node and a real attempt;
/// - its progress counts the shards that succeeded;
/// - an event names its end, and a Succeeded job has a `Placed` event that counts every
///   slot placed (`k/k`), not only the first ones.
///
/// Returns the events, for more checks by the caller. Waits (bounded) for the events,
/// which the operator publishes just after the status.
pub async fn assert_truthful(fed: &Federation, job: &ComputeJob) -> Vec<(String, String)> {
    truthful(fed, job, true).await
}

/// [`assert_truthful`] for a job whose operator was killed and replaced while it ran:
/// events are best effort (one published by the killed operator may be lost), so the
/// `k/k` Placed event is not required; the status and the end event are.
pub async fn assert_truthful_after_restart(
    fed: &Federation,
    job: &ComputeJob,
) -> Vec<(String, String)> {
    truthful(fed, job, false).await
}

async fn truthful(fed: &Federation, job: &ComputeJob, placed_event: bool) -> Vec<(String, String)> {
    let name = job.metadata.name.clone().unwrap_or_default();
    let ns = job.metadata.namespace.clone().unwrap_or_default();
    let s = job.status.clone().unwrap_or_default();
    let phase = s.phase.unwrap_or_else(|| panic!("job {name} has no phase"));
    assert!(
        matches!(phase, JobPhase::Succeeded | JobPhase::Failed),
        "job {name} is not finished: {phase:?}"
    );
    let cond = |t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    assert_eq!(
        cond("Scheduled"),
        Some(("True".into(), "Finished".into())),
        "job {name}: {:?}",
        s.conditions
    );
    let ok = phase == JobPhase::Succeeded;
    let truth = |b: bool| if b { "True" } else { "False" }.to_string();
    assert_eq!(
        cond("Complete").map(|c| c.0),
        Some(truth(ok)),
        "job {name}: {:?}",
        s.conditions
    );
    assert_eq!(
        cond("Failed").map(|c| c.0),
        Some(truth(!ok)),
        "job {name}: {:?}",
        s.conditions
    );
    for sh in &s.shards {
        assert!(
            !matches!(
                sh.phase,
                TaskPhase::Pending | TaskPhase::Running | TaskPhase::Committed
            ),
            "job {name} ended with a slot that still reads {:?}: {sh:?}",
            sh.phase
        );
        if matches!(sh.phase, TaskPhase::Succeeded | TaskPhase::Failed) {
            assert!(
                !sh.node.is_empty() && sh.attempt >= 1,
                "job {name}: a slot that ran names no node or attempt: {sh:?}"
            );
        }
        if sh.phase == TaskPhase::Cancelled {
            assert!(
                sh.message.is_some(),
                "job {name}: a cancelled slot says why: {sh:?}"
            );
        }
    }
    let shards = job.spec.shards as usize;
    let succeeded: std::collections::BTreeSet<u32> = s
        .shards
        .iter()
        .filter(|x| x.phase == TaskPhase::Succeeded)
        .map(|x| x.index)
        .collect();
    if ok {
        assert_eq!(
            s.progress.as_deref(),
            Some(format!("{shards}/{shards}").as_str()),
            "job {name}"
        );
        assert_eq!(
            succeeded.len(),
            shards,
            "job {name}: every shard has a succeeded slot: {:?}",
            s.shards
        );
    }
    let end = if ok { "Succeeded" } else { "Failed" };
    wait::until(
        &format!("the events of job {name}"),
        Duration::from_secs(20),
        || async {
            let events = events_of(fed, &ns, &name).await;
            let ended = events.iter().any(|(r, _)| r == end);
            let full = !ok
                || !placed_event
                || events.iter().any(|(r, m)| {
                    r == "Placed"
                        && m.split_whitespace()
                            .next()
                            .and_then(|c| c.split_once('/'))
                            .is_some_and(|(a, b)| a == b)
                });
            if ended && full {
                Ok(events)
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await
}
