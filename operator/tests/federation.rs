//! The operator on real kube-apiservers: a hub and member clusters, simulated agents
//! (until the real agent is in e2e), the real edgeloom-operator binary. Tests run one at a
//! time: each starts its own federation.

use edgeloom_crds::compute_task::ComputeTask;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::{ComputeJob, JobPhase, TaskPhase};
use edgeloom_e2e::federation::Federation;
use edgeloom_e2e::{manifests, wait};
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, DeleteParams, ListParams};
use std::path::Path;
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn operator_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgeloom-operator"))
}

fn job_yaml(name: &str, shards: u32, extra: &str) -> String {
    format!(
        "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n  workload:\n    kind: Benchmark\n  shards: {shards}\n{extra}"
    )
}

async fn apply(fed: &Federation, ns: &str, yaml: &str) {
    manifests::apply_all(&fed.hub, yaml, ns, false)
        .await
        .expect("job applied");
}

async fn job(fed: &Federation, ns: &str, name: &str) -> ComputeJob {
    Api::<ComputeJob>::namespaced(fed.hub.clone(), ns)
        .get(name)
        .await
        .expect("job")
}

async fn wait_phase(
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
            let status = j.status.clone().unwrap_or_default();
            if status.phase == Some(phase) {
                Ok(j)
            } else {
                Err(format!(
                    "{:?} {:?} {:?}",
                    status.phase,
                    status.progress,
                    status
                        .conditions
                        .iter()
                        .map(|c| format!("{}={} {}", c.type_, c.status, c.message))
                        .collect::<Vec<_>>()
                ))
            }
        }
    })
    .await
}

/// Every ComputeTask of a job in one member cluster.
async fn tasks_in(fed: &Federation, member: &str, uid: &str) -> Vec<ComputeTask> {
    let client = fed
        .plane
        .cluster(member)
        .expect("member")
        .client()
        .await
        .expect("client");
    let api: Api<ComputeTask> = Api::namespaced(client, SYSTEM_NAMESPACE);
    api.list(&ListParams::default())
        .await
        .expect("tasks")
        .items
        .into_iter()
        .filter(|t| t.spec.job.uid == uid)
        .collect()
}

async fn events_of(fed: &Federation, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(fed.hub.clone(), ns);
    let list = api.list(&ListParams::default()).await.expect("events");
    list.items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn a_job_spread_over_two_member_clusters_completes() {
    let _serial = SERIAL.lock().await;
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("spread").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml("spread", 4, "  placement:\n    spread: Cluster\n"),
    )
    .await;
    let done = wait_phase(
        &fed,
        &ns,
        "spread",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    let status = done.status.expect("status");
    assert_eq!(status.progress.as_deref(), Some("4/4"));
    let placement = status.placement.expect("placement");
    assert!(
        placement.contains("edge-a:") && placement.contains("edge-b:"),
        "{placement}"
    );
    assert_eq!(status.shards.len(), 4);
    assert!(status.result.and_then(|r| r.digest).is_some());
    assert!(status.metrics.contains_key("accuracy"));
    let uid = done.metadata.uid.expect("uid");
    let total =
        tasks_in(&fed, "edge-a", &uid).await.len() + tasks_in(&fed, "edge-b", &uid).await.len();
    assert_eq!(total, 4, "one task per shard");
    let events = events_of(&fed, &ns, "spread").await;
    assert!(
        events.iter().filter(|(r, _)| r == "Placed").count() >= 1,
        "{events:?}"
    );
    assert!(events.iter().any(|(r, _)| r == "Succeeded"), "{events:?}");
}
