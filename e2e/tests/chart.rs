//! The Helm chart on real parts: `helm lint --strict`, `helm template` accepted by a real
//! kube-apiserver (server-side dry run, the Prometheus Operator's real CRDs installed),
//! `helm install` into a hub and an edge cluster, RBAC and the node-identity admission
//! policy checked with real requests as the agent's ServiceAccount (impersonation, and a
//! pod-bound token from the TokenRequest API), and `promtool check rules`.

use edgeloom_crds::commitment::REVEAL_ANNOTATION;
use edgeloom_crds::compute_task::ComputeTask;
use edgeloom_crds::inventory::{ACCOUNT_LABEL, GPU_COUNT_LABEL, TFLOPS_ANNOTATION};
use edgeloom_e2e::control_plane::Cluster;
use edgeloom_e2e::federation::request_token;
use edgeloom_e2e::helm::{self, chart_dir};
use edgeloom_e2e::prometheus;
use edgeloom_e2e::{Config, ControlPlane, manifests, tools, wait};
use k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

const NS: &str = "edgeloom-system";
/// Values that turn on every optional part of the chart.
const EVERYTHING: &[&str] = &[
    "serviceMonitor.enabled=true",
    "podMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "memberAccess.create=true",
    "agent.runtimeClassName=nvidia",
    "agent.nvidiaLibraryPath=/usr/lib/x86_64-linux-gnu",
    "operator.ledgerStore.url=s3://edgeloom-ledgers/prod",
    "operator.ledgerStore.endpoint=http://seaweedfs-s3.storage:8333",
    "operator.ledgerStore.allowHttp=true",
    "operator.ledgerStore.accessKeyId=example-id",
    "operator.ledgerStore.secretAccessKey=example-secret",
];

fn helm(kubeconfig: Option<&Path>, args: &[&str]) -> (bool, String) {
    let out = edgeloom_e2e::helm::run(kubeconfig, args).expect("helm runs");
    (out.ok, out.text())
}

#[test]
fn helm_lint_strict_passes_with_defaults_and_with_everything_on() {
    let chart = chart_dir();
    let chart = chart.to_str().expect("path");
    let (ok, out) = helm(None, &["lint", "--strict", chart]);
    assert!(ok, "{out}");
    let mut args = vec!["lint", "--strict", chart];
    for s in EVERYTHING {
        args.extend(["--set", s]);
    }
    let (ok, out) = helm(None, &args);
    assert!(ok, "{out}");
    // values.schema.json rejects nonsense with a message naming the value.
    let (ok, out) = helm(
        None,
        &["lint", "--strict", chart, "--set", "operator.replicas=0"],
    );
    assert!(!ok && out.contains("/operator/replicas"), "{out}");
    let (ok, out) = helm(
        None,
        &["lint", "--strict", chart, "--set", "agent.maxTask=2"],
    );
    assert!(!ok && out.contains("maxTask"), "{out}");
    let (ok, out) = helm(
        None,
        &[
            "lint",
            "--strict",
            chart,
            "--set",
            "operator.ledgerStore.url=ftp://ledgers",
        ],
    );
    assert!(!ok && out.contains("/operator/ledgerStore/url"), "{out}");
}

#[test]
fn the_rendered_alerts_pass_promtool() {
    let dir = tempdir();
    let rules = dir.join("rules.yml");
    let spec = prometheus::write_chart_rules(&rules).expect("rules");
    let out = prometheus::promtool_check_rules(&rules).expect("promtool accepts the rules");
    let alerts = prometheus::alerts(&spec);
    assert!(
        out.contains(&format!("{} rules found", alerts.len())),
        "{out}"
    );
    let names: Vec<&str> = alerts.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "EdgeloomOperatorDown",
        "EdgeloomMemberClusterUnreachable",
        "EdgeloomTasksFailing",
        "EdgeloomNodeHeartbeatsLost",
        "EdgeloomVerificationMismatches",
        "EdgeloomGpuTooHot",
        "EdgeloomLedgerBroken",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "edgeloom-chart-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A client of `cluster` acting as `user` (with groups and extra user info), by
/// impersonation from the cluster's admin credentials.
async fn impersonating(
    cluster: &Cluster,
    user: &str,
    groups: &[&str],
    extra: &[(&str, &str)],
) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(user.to_string());
    config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    if !extra.is_empty() {
        config.auth_info.impersonate_user_extra = Some(
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
                .collect::<HashMap<_, _>>(),
        );
    }
    kube::Client::try_from(config).expect("client")
}

/// A client of `cluster` authenticated by a bearer token.
async fn with_token(cluster: &Cluster, token: &str) -> kube::Client {
    let kc = kube::config::Kubeconfig::read_from(&cluster.kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    kube::Client::try_from(config).expect("client")
}

const AGENT: &str = "system:serviceaccount:edgeloom-system:edgeloom-agent";
const SA_GROUPS: &[&str] = &[
    "system:serviceaccounts",
    "system:serviceaccounts:edgeloom-system",
    "system:authenticated",
];
const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";

/// The status code and message of a failed request; panics on success.
fn denied<T: std::fmt::Debug>(result: Result<T, kube::Error>, what: &str) -> (u16, String) {
    match result {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("{what} should have been denied, got {other:?}"),
    }
}

fn label_patch(key: &str) -> Patch<serde_json::Value> {
    Patch::Merge(serde_json::json!({"metadata": {"labels": {key: "yes"}}}))
}

fn reveal_patch() -> Patch<serde_json::Value> {
    Patch::Merge(
        serde_json::json!({"metadata": {"annotations": {REVEAL_ANNOTATION: "2026-11-25T00:00:00Z"}}}),
    )
}

fn task(name: &str, node: &str) -> ComputeTask {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "job": {"namespace": "team", "name": "j", "uid": "0000-1111"},
            "pool": "edge", "cluster": "edge-a", "shard": 0, "shards": 1, "replica": 0,
            "attempt": 1, "nodeName": node,
            "workload": {"kind": "Benchmark"}, "limits": {}
        }
    }))
    .expect("task")
}

/// What an agent identity (a client) may and may not do on edge-a.
async fn check_agent_identity(agent: kube::Client, admin: &kube::Client, how: &str) {
    let nodes: Api<Node> = Api::all(agent.clone());
    // Its own inventory: allowed.
    nodes
        .patch(
            "edge-a-node-0",
            &PatchParams::default(),
            &label_patch(GPU_COUNT_LABEL),
        )
        .await
        .unwrap_or_else(|e| panic!("{how}: its own Node's inventory label: {e}"));
    nodes
        .patch(
            "edge-a-node-0",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {TFLOPS_ANNOTATION: "1.5"}}}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{how}: its own Node's inventory annotation: {e}"));
    // Relabelling itself: the account (who gets paid), a region or residency label a job
    // may require, a node-restriction label, removing a label the platform team set, or
    // any annotation outside its inventory: denied, naming the key.
    let platform_label = "edgeloom.io/cluster";
    for (patch, key) in [
        (label_patch(ACCOUNT_LABEL), ACCOUNT_LABEL),
        (
            label_patch("topology.kubernetes.io/region"),
            "topology.kubernetes.io/region",
        ),
        (
            label_patch("example.org/residency"),
            "example.org/residency",
        ),
        (
            label_patch("node-restriction.kubernetes.io/trusted"),
            "node-restriction.kubernetes.io/trusted",
        ),
        (
            Patch::Merge(serde_json::json!({"metadata": {"labels": {platform_label: null}}})),
            platform_label,
        ),
    ] {
        let (code, msg) = denied(
            nodes
                .patch("edge-a-node-0", &PatchParams::default(), &patch)
                .await,
            &format!("label {key} on its own Node"),
        );
        assert_eq!(code, 403, "{how}: {msg}");
        assert!(
            msg.contains("only its inventory labels") && msg.contains(key),
            "{how}: {msg}"
        );
    }
    let (code, msg) = denied(
        nodes
            .patch(
                "edge-a-node-0",
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"metadata": {"annotations": {"edgeloom.io/verified-tflops": "999"}}}),
                ),
            )
            .await,
        "a foreign annotation on its own Node",
    );
    assert_eq!(code, 403, "{how}: {msg}");
    assert!(
        msg.contains("only its inventory annotations") && msg.contains("verified-tflops"),
        "{how}: {msg}"
    );
    let own = nodes.get("edge-a-node-0").await.expect("own node");
    let labels = own.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get(GPU_COUNT_LABEL).map(String::as_str), Some("yes"));
    assert!(!labels.contains_key(ACCOUNT_LABEL), "{how}: {labels:?}");
    assert!(labels.contains_key(platform_label), "{how}: {labels:?}");
    let (code, msg) = denied(
        nodes
            .patch(
                "edge-a-node-1",
                &PatchParams::default(),
                &label_patch(GPU_COUNT_LABEL),
            )
            .await,
        "another node's Node",
    );
    assert_eq!(code, 403, "{how}: {msg}");
    assert!(
        msg.contains("may only change its own Node, not edge-a-node-1"),
        "{how}: {msg}"
    );
    let (code, msg) = denied(
        nodes
            .patch(
                "edge-a-node-0",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
            )
            .await,
        "its own Node's spec",
    );
    assert_eq!(code, 403, "{how}: {msg}");
    assert!(msg.contains("labels and annotations"), "{how}: {msg}");

    let leases: Api<Lease> = Api::namespaced(agent.clone(), NS);
    let lease = |name: &str| -> Lease {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 20}
        }))
        .expect("lease")
    };
    let ssa = PatchParams::apply("edgeloom-agent").force();
    leases
        .patch("edge-a-node-0", &ssa, &Patch::Apply(lease("edge-a-node-0")))
        .await
        .unwrap_or_else(|e| panic!("{how}: its own Lease: {e}"));
    let (code, msg) = denied(
        leases
            .patch("edge-a-node-1", &ssa, &Patch::Apply(lease("edge-a-node-1")))
            .await,
        "another node's Lease",
    );
    assert_eq!(code, 403, "{how}: {msg}");
    assert!(msg.contains("its own heartbeat Lease"), "{how}: {msg}");

    let tasks: Api<ComputeTask> = Api::namespaced(agent.clone(), NS);
    let status = Patch::Merge(serde_json::json!({"status": {"phase": "Running", "progress": 5}}));
    tasks
        .patch_status("mine", &PatchParams::default(), &status)
        .await
        .unwrap_or_else(|e| panic!("{how}: its own task's status: {e}"));
    let (code, msg) = denied(
        tasks
            .patch_status("theirs", &PatchParams::default(), &status)
            .await,
        "another node's task status",
    );
    assert_eq!(code, 403, "{how}: {msg}");
    assert!(
        msg.contains("ComputeTasks of its own node, not edge-a-node-1"),
        "{how}: {msg}"
    );
    // Usage beyond the schema's maxima is refused by the API server, naming the field.
    let (code, msg) = denied(
        tasks
            .patch_status(
                "mine",
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"status": {"usage": {"cpuCoreMillis": 100_000_000_000_000_000u64}}}),
                ),
            )
            .await,
        "an absurd usage claim",
    );
    assert_eq!(code, 422, "{how}: {msg}");
    assert!(msg.contains("cpuCoreMillis"), "{how}: {msg}");
    // Only the operator asks for a reveal (commit–reveal): the agent cannot set the
    // annotation on its own task, so it cannot reveal before the other replicas commit.
    let (code, _) = denied(
        tasks
            .patch("mine", &PatchParams::default(), &reveal_patch())
            .await,
        "asking for its own reveal",
    );
    assert_eq!(code, 403, "{how}");
    // RBAC: reading tasks is allowed (the agent watches its own with a field selector),
    // creating or deleting them is not, nor reading Secrets.
    assert!(
        tasks.list(&ListParams::default()).await.is_ok(),
        "{how}: list tasks"
    );
    let (code, _) = denied(
        tasks
            .create(&PostParams::default(), &task("forged", "edge-a-node-0"))
            .await,
        "creating a task",
    );
    assert_eq!(code, 403, "{how}");
    let (code, _) = denied(
        Api::<Secret>::namespaced(agent.clone(), NS)
            .list(&ListParams::default())
            .await,
        "reading Secrets",
    );
    assert_eq!(code, 403, "{how}");
    // The allowed writes happened (as seen by the admin).
    let t = Api::<ComputeTask>::namespaced(admin.clone(), NS)
        .get("mine")
        .await
        .expect("task");
    assert_eq!(t.status.expect("status").progress, 5, "{how}");
}

#[tokio::test]
async fn the_chart_installs_on_a_hub_and_an_edge_cluster_and_enforces_node_identity() {
    let plane = ControlPlane::start(Config {
        members: vec!["edge-a".into()],
        nodes_per_member: 2,
        ..Config::default()
    })
    .await
    .expect("control plane");
    let hub = plane.hub();
    let edge = plane.cluster("edge-a").expect("edge-a");
    let hub_client = hub.client().await.expect("hub");
    let edge_client = edge.client().await.expect("edge");

    // The Prometheus Operator's real CRDs, so its kinds are validated too.
    let crd_dir = tools::cache_dir().join("crds/prometheus-operator");
    for kind in ["servicemonitors", "podmonitors", "prometheusrules"] {
        let text =
            std::fs::read_to_string(crd_dir.join(format!("monitoring.coreos.com_{kind}.yaml")))
                .expect("Prometheus Operator CRDs: run e2e/scripts/install-tools.sh");
        manifests::apply_all(&hub_client, &text, "default", false)
            .await
            .expect("CRD");
        let name = format!("{kind}.monitoring.coreos.com");
        let crds: Api<CustomResourceDefinition> = Api::all(hub_client.clone());
        wait::until_true(
            &format!("{name} established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    crds.get(&name)
                        .await
                        .ok()
                        .and_then(|c| c.status)
                        .is_some_and(|s| {
                            s.conditions
                                .unwrap_or_default()
                                .iter()
                                .any(|c| c.type_ == "Established" && c.status == "True")
                        })
                }
            },
        )
        .await;
    }

    // Everything the chart renders is accepted by the API server (server-side dry run).
    let rendered = helm::template(EVERYTHING).expect("helm template");
    let objects = manifests::parse(&rendered).expect("rendered YAML");
    assert!(objects.len() >= 25, "{} objects", objects.len());
    // The operator's object store Secret, from the values.
    let store = objects
        .iter()
        .find(|o| o.metadata.name.as_deref() == Some("edgeloom-ledger-store"))
        .expect("the ledger store Secret");
    assert_eq!(
        store.data["stringData"]["url"], "s3://edgeloom-ledgers/prod",
        "{store:?}"
    );
    assert_eq!(store.data["stringData"]["accessKeyId"], "example-id");
    // The CRDs of the chart first (helm installs crds/ before templates).
    manifests::install_crds(&hub_client).await.expect("CRDs");
    edgeloom_e2e::federation::ensure_namespace(&hub_client, NS)
        .await
        .expect("ns");
    for obj in &objects {
        manifests::apply(&hub_client, obj, NS, true)
            .await
            .unwrap_or_else(|e| panic!("dry run of {:?}: {e}", obj.metadata.name));
    }

    // helm install on the hub (operator, agent, monitoring) ...
    let out = helm::install(&hub.kubeconfig, EVERYTHING).expect("helm install on the hub");
    assert!(out.contains("Operator: 2 replica(s)"), "NOTES: {out}");
    let deploy = Api::<Deployment>::namespaced(hub_client.clone(), NS)
        .get("edgeloom-operator")
        .await
        .expect("operator Deployment");
    assert_eq!(deploy.spec.replicas, Some(2));
    let ds = Api::<DaemonSet>::namespaced(hub_client.clone(), NS)
        .get("edgeloom-agent")
        .await
        .expect("agent DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
    let env = pod.containers[0].env.clone().unwrap_or_default();
    let node_env = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_env
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName"),
        "node name from the downward API"
    );
    assert!(
        pod.volumes.unwrap_or_default().iter().any(|v| v
            .host_path
            .as_ref()
            .is_some_and(|h| h.path == "/usr/lib/x86_64-linux-gnu")),
        "the NVIDIA library host path is mounted"
    );
    let dash = Api::<ConfigMap>::namespaced(hub_client.clone(), NS)
        .get("edgeloom-dashboard")
        .await
        .expect("dashboard ConfigMap");
    assert_eq!(
        dash.metadata
            .labels
            .unwrap_or_default()
            .get("grafana_dashboard")
            .map(String::as_str),
        Some("1")
    );
    let dash_json: serde_json::Value =
        serde_json::from_str(&dash.data.expect("data")["edgeloom.json"]).expect("dashboard JSON");
    assert!(dash_json["panels"].as_array().is_some_and(|p| p.len() > 20));
    for (kind, plural) in [
        ("PrometheusRule", "prometheusrules"),
        ("ServiceMonitor", "servicemonitors"),
        ("PodMonitor", "podmonitors"),
    ] {
        let ar = kube::api::ApiResource {
            group: "monitoring.coreos.com".into(),
            version: "v1".into(),
            api_version: "monitoring.coreos.com/v1".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(hub_client.clone(), NS, &ar);
        assert_eq!(
            api.list(&ListParams::default())
                .await
                .expect(kind)
                .items
                .len(),
            1,
            "{kind}"
        );
    }
    assert!(
        Api::<ValidatingAdmissionPolicy>::all(hub_client.clone())
            .get("edgeloom-agent-node-identity")
            .await
            .is_ok()
    );
    // The operator's ServiceAccount: its own namespace's Secrets, not other namespaces'.
    let operator = impersonating(
        hub,
        "system:serviceaccount:edgeloom-system:edgeloom-operator",
        SA_GROUPS,
        &[],
    )
    .await;
    assert!(
        Api::<Secret>::namespaced(operator.clone(), NS)
            .list(&ListParams::default())
            .await
            .is_ok()
    );
    let (code, _) = denied(
        Api::<Secret>::namespaced(operator.clone(), "default")
            .list(&ListParams::default())
            .await,
        "the operator reading Secrets elsewhere",
    );
    assert_eq!(code, 403);
    assert!(
        Api::<edgeloom_crds::ComputeJob>::all(operator.clone())
            .list(&ListParams::default())
            .await
            .is_ok()
    );

    // ... and on an edge cluster: the agent and the hub operator's identity, no operator.
    helm::install(
        &edge.kubeconfig,
        &["operator.enabled=false", "memberAccess.create=true"],
    )
    .expect("helm install on edge-a");
    assert!(
        Api::<Deployment>::namespaced(edge_client.clone(), NS)
            .get_opt("edgeloom-operator")
            .await
            .expect("get")
            .is_none(),
        "no operator on an edge cluster"
    );
    let tasks: Api<ComputeTask> = Api::namespaced(edge_client.clone(), NS);
    tasks
        .create(&PostParams::default(), &task("mine", "edge-a-node-0"))
        .await
        .expect("task");
    tasks
        .create(&PostParams::default(), &task("theirs", "edge-a-node-1"))
        .await
        .expect("task");

    // The hub operator's identity on the edge: tasks yes, Nodes read-only.
    let hub_identity = impersonating(
        edge,
        "system:serviceaccount:edgeloom-system:edgeloom-hub",
        SA_GROUPS,
        &[],
    )
    .await;
    assert!(
        Api::<ComputeTask>::namespaced(hub_identity.clone(), NS)
            .create(&PostParams::default(), &task("from-hub", "edge-a-node-1"))
            .await
            .is_ok()
    );
    Api::<ComputeTask>::namespaced(hub_identity.clone(), NS)
        .patch("from-hub", &PatchParams::default(), &reveal_patch())
        .await
        .expect("the hub identity asks a task for its reveal");
    // It fails a task that made no progress; nobody turns a finished task back.
    let failed = serde_json::json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask",
        "status": {"phase": "Failed", "message": "no progress for 600s"},
    });
    Api::<ComputeTask>::namespaced(hub_identity.clone(), NS)
        .patch_status(
            "from-hub",
            &PatchParams::apply("edgeloom-operator").force(),
            &Patch::Apply(&failed),
        )
        .await
        .expect("the hub identity fails a stalled task");
    let (code, msg) = denied(
        Api::<ComputeTask>::namespaced(edge_client.clone(), NS)
            .patch_status(
                "from-hub",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"phase": "Succeeded"}})),
            )
            .await,
        "turning a failed task into a succeeded one",
    );
    assert_eq!(code, 422, "{msg}");
    assert!(msg.contains("a finished task's phase is final"), "{msg}");
    let (code, _) = denied(
        Api::<Node>::all(hub_identity.clone())
            .patch("edge-a-node-0", &PatchParams::default(), &label_patch("x"))
            .await,
        "the hub identity patching a Node",
    );
    assert_eq!(code, 403);

    // Root on the machine holds its kubelet's credentials too: a kubelet may label its own
    // Node, but not with edgeloom.io/ keys (the account above all).
    let kubelet = impersonating(
        edge,
        "system:node:edge-a-node-0",
        &["system:nodes", "system:authenticated"],
        &[],
    )
    .await;
    let kubelet_nodes: Api<Node> = Api::all(kubelet);
    let (code, msg) = denied(
        kubelet_nodes
            .patch(
                "edge-a-node-0",
                &PatchParams::default(),
                &label_patch(ACCOUNT_LABEL),
            )
            .await,
        "a kubelet setting the account",
    );
    assert_eq!(code, 403, "{msg}");
    assert!(
        msg.contains("a kubelet may not change edgeloom.io/") && msg.contains(ACCOUNT_LABEL),
        "{msg}"
    );
    kubelet_nodes
        .patch(
            "edge-a-node-0",
            &PatchParams::default(),
            &label_patch("example.org/kubelet-managed"),
        )
        .await
        .expect("a kubelet still manages its other labels");

    // The agent's identity, by impersonation: allowed on its own node's objects only.
    let as_agent = impersonating(edge, AGENT, SA_GROUPS, &[(NODE_NAME_KEY, "edge-a-node-0")]).await;
    check_agent_identity(
        as_agent,
        &edge_client,
        "impersonated agent of edge-a-node-0",
    )
    .await;
    // Agent credentials not bound to a node are refused outright.
    let unbound = impersonating(edge, AGENT, SA_GROUPS, &[]).await;
    let (code, msg) = denied(
        Api::<Node>::all(unbound)
            .patch(
                "edge-a-node-0",
                &PatchParams::default(),
                &label_patch("edgeloom.io/probe"),
            )
            .await,
        "an agent token bound to no node",
    );
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains("bound to a pod on a node"), "{msg}");

    // The same through the path a real agent uses: a token from the TokenRequest API bound
    // to a Pod on edge-a-node-0 (nothing runs the Pod); the API server itself puts the
    // node's name into the token's user info.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "edgeloom-agent-edge-a-node-0"},
        "spec": {"nodeName": "edge-a-node-0", "serviceAccountName": "edgeloom-agent",
                 "containers": [{"name": "agent", "image": "edgeloom:test"}]}
    }))
    .expect("pod");
    let pod = Api::<Pod>::namespaced(edge_client.clone(), NS)
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let sas = Api::<ServiceAccount>::namespaced(edge_client.clone(), NS);
    let token = request_token(&sas, "edgeloom-agent", Some(&pod))
        .await
        .expect("token");
    let bound = with_token(edge, &token).await;
    check_agent_identity(bound, &edge_client, "pod-bound token on edge-a-node-0").await;

    // helm uninstall removes what it installed.
    let (ok, out) = helm(Some(&edge.kubeconfig), &["uninstall", "edgeloom", "-n", NS]);
    assert!(ok, "{out}");
    assert!(
        Api::<DaemonSet>::namespaced(edge_client.clone(), NS)
            .get_opt("edgeloom-agent")
            .await
            .expect("get")
            .is_none()
    );
}
