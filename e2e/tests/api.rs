//! The edgeloom API on a real kube-apiserver: the CRDs install and are Established, every
//! example is admitted, every invalid manifest is rejected with a message naming its field,
//! transition rules hold, and `kubectl get` columns are served.

use edgeloom_crds::{ComputeJob, ComputeTask};
use edgeloom_e2e::manifests::{self, ManifestError, server_message};
use edgeloom_e2e::{Config, ControlPlane};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A hub-only control plane with the CRDs installed.
async fn hub() -> (ControlPlane, kube::Client) {
    let plane = ControlPlane::start(Config {
        members: vec![],
        controller_manager: false,
        ..Config::default()
    })
    .await
    .expect("control plane starts");
    let client = plane.hub().client().await.expect("client");
    manifests::install_crds(&client)
        .await
        .expect("CRDs install");
    (plane, client)
}

async fn namespace(client: &kube::Client, name: &str) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    api.create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
    name.to_string()
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn crds_are_established_with_names_and_categories() {
    let (_plane, client) = hub().await;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (plural, short) in [
        ("computejobs", vec!["cjob"]),
        ("edgepools", vec!["epool"]),
        ("computetasks", vec!["ct", "ctask"]),
    ] {
        let crd = api
            .get(&format!("{plural}.edgeloom.io"))
            .await
            .expect("CRD exists");
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        for wanted in ["Established", "NamesAccepted"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == wanted && c.status == "True"),
                "{plural}: {wanted} not True in {conditions:?}"
            );
        }
        assert_eq!(
            crd.spec.names.short_names,
            Some(short.iter().map(|s| s.to_string()).collect())
        );
    }
    // Discovery serves the category, so `kubectl get edgeloom` lists all three kinds.
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let group = discovery
        .get("edgeloom.io")
        .expect("group edgeloom.io is served");
    let mut kinds: Vec<String> = group
        .recommended_resources()
        .into_iter()
        .map(|(r, _)| r.kind)
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["ComputeJob", "ComputeTask", "EdgePool"]);

    // No short name of ours may shadow (or be shadowed by) one the API server already
    // serves: kubectl resolves `cj` to CronJobs and `ep` to Endpoints, for instance.
    let req = http::Request::get("/api/v1")
        .body(Vec::new())
        .expect("request");
    let core: serde_json::Value = client.request(req).await.expect("core resources");
    let mut builtin: Vec<(String, String)> = Vec::new();
    let collect = |list: &serde_json::Value, group: &str, out: &mut Vec<(String, String)>| {
        for r in list["resources"].as_array().into_iter().flatten() {
            for s in r["shortNames"].as_array().into_iter().flatten() {
                out.push((
                    s.as_str().unwrap_or_default().to_string(),
                    format!("{group}/{}", r["name"].as_str().unwrap_or_default()),
                ));
            }
        }
    };
    collect(&core, "core", &mut builtin);
    for g in discovery
        .groups()
        .filter(|g| !g.name().is_empty() && g.name() != "edgeloom.io")
    {
        for v in g.versions() {
            let req = http::Request::get(format!("/apis/{}/{v}", g.name()))
                .body(Vec::new())
                .expect("request");
            let list: serde_json::Value = client.request(req).await.expect("group resources");
            collect(&list, g.name(), &mut builtin);
        }
    }
    assert!(
        builtin.iter().any(|(s, _)| s == "cj"),
        "discovery sees built-in short names: {builtin:?}"
    );
    for crd in edgeloom_crds::crds() {
        for ours in crd.spec.names.short_names.unwrap_or_default() {
            let clash: Vec<&(String, String)> =
                builtin.iter().filter(|(s, _)| *s == ours).collect();
            assert!(
                clash.is_empty(),
                "short name {ours} is already taken by {clash:?}"
            );
        }
    }
}

#[tokio::test]
async fn every_example_is_admitted_and_reads_back_into_the_api_types() {
    let (_plane, client) = hub().await;
    let ns = namespace(&client, "examples").await;
    let files = yaml_files(&repo().join("manifests"));
    assert!(files.len() >= 6, "examples present");
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        manifests::apply_all(&client, &text, &ns, true)
            .await
            .unwrap_or_else(|e| panic!("dry run of {} refused: {e}", file.display()));
        let applied = manifests::apply_all(&client, &text, &ns, false)
            .await
            .unwrap_or_else(|e| panic!("{} refused: {e}", file.display()));
        assert!(!applied.is_empty());
    }
    // What the server stored (with its defaults) deserialises into the Rust types.
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    let stored = jobs
        .list(&Default::default())
        .await
        .expect("typed list of jobs");
    assert!(stored.items.len() >= 5);
    let train = jobs.get("train-digits").await.expect("train-digits");
    assert_eq!(train.spec.shards, 4);
    assert_eq!(train.spec.workload.parameters.epochs, 20);
    let bench = jobs.get("benchmark").await.expect("benchmark");
    assert_eq!(
        bench.spec.max_retries, 3,
        "server applied the schema default"
    );
    let pools: Api<edgeloom_crds::EdgePool> = Api::all(client.clone());
    let edge = pools.get("edge").await.expect("pool edge");
    assert_eq!(edge.spec.clusters.len(), 2);
    assert_eq!(
        pools
            .get("local")
            .await
            .expect("pool local")
            .spec
            .heartbeat_timeout_seconds,
        40
    );
}

#[tokio::test]
async fn every_invalid_manifest_is_rejected_naming_its_field() {
    let (_plane, client) = hub().await;
    let ns = namespace(&client, "invalid").await;
    let files = yaml_files(&repo().join("manifests/invalid"));
    assert!(
        files.len() >= 15,
        "at least 15 invalid examples, found {}",
        files.len()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect: FIELD' line", file.display()))
            .trim()
            .to_string();
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let objects = manifests::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(objects.len(), 1, "{name}: one object per invalid example");
        match manifests::create(&client, &objects[0], &ns, true).await {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(ManifestError::Api { source, .. }) => {
                let code = match &source {
                    kube::Error::Api(s) => s.code,
                    _ => 0,
                };
                let message = server_message(&source);
                if code != 422 || !message.contains(&expect) {
                    failures.push(format!(
                        "{name}: want 422 naming {expect}, got {code}: {message}"
                    ));
                } else {
                    eprintln!("{name}: {message}");
                }
            }
            Err(other) => failures.push(format!("{name}: not an API rejection: {other}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid manifests misbehaved:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[tokio::test]
async fn a_started_jobs_workload_is_immutable_and_task_specs_never_change() {
    let (_plane, client) = hub().await;
    let ns = namespace(&client, "immutable").await;
    let text =
        std::fs::read_to_string(repo().join("manifests/job-train-digits.yaml")).expect("example");
    manifests::apply_all(&client, &text, &ns, false)
        .await
        .expect("job applied");
    let jobs: Api<ComputeJob> = Api::namespaced(client.clone(), &ns);
    let merge = PatchParams::default();
    let change_epochs =
        |n: u32| Patch::Merge(json!({"spec": {"workload": {"parameters": {"epochs": n}}}}));

    // Pending: the workload may still change.
    jobs.patch("train-digits", &merge, &change_epochs(21))
        .await
        .expect("pending job editable");
    jobs.patch_status(
        "train-digits",
        &merge,
        &Patch::Merge(json!({"status": {"phase": "Pending"}})),
    )
    .await
    .expect("status Pending");
    jobs.patch("train-digits", &merge, &change_epochs(22))
        .await
        .expect("still editable when Pending");

    // Running: workload and shards are frozen, other fields are not.
    jobs.patch_status(
        "train-digits",
        &merge,
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .expect("status Running");
    let err = jobs
        .patch("train-digits", &merge, &change_epochs(23))
        .await
        .expect_err("workload change of a started job refused");
    let msg = server_message(&err);
    assert!(
        msg.contains("spec.workload") && msg.contains("immutable"),
        "{msg}"
    );
    let err = jobs
        .patch(
            "train-digits",
            &merge,
            &Patch::Merge(json!({"spec": {"shards": 8}})),
        )
        .await
        .expect_err("shard change of a started job refused");
    assert!(
        server_message(&err).contains("spec.shards"),
        "{}",
        server_message(&err)
    );
    jobs.patch(
        "train-digits",
        &merge,
        &Patch::Merge(json!({"spec": {"priority": 50}})),
    )
    .await
    .expect("priority of a running job may change");

    // ComputeTask spec never changes once created.
    let tasks: Api<ComputeTask> = Api::namespaced(client.clone(), &ns);
    let task: ComputeTask = serde_json::from_value(json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask",
        "metadata": {"name": "t-0-1"},
        "spec": {"job": {"namespace": ns, "name": "train-digits", "uid": "u"}, "pool": "edge",
                 "cluster": "edge-a", "shard": 0, "shards": 4, "attempt": 1,
                 "nodeName": "edge-a-node-0", "workload": {"kind": "Benchmark"}}
    }))
    .expect("task");
    tasks
        .create(&PostParams::default(), &task)
        .await
        .expect("task created");
    let err = tasks
        .patch(
            "t-0-1",
            &merge,
            &Patch::Merge(json!({"spec": {"nodeName": "edge-b-node-0"}})),
        )
        .await
        .expect_err("task spec change refused");
    assert!(
        server_message(&err).contains("immutable"),
        "{}",
        server_message(&err)
    );
    // The agent's part, status, is writable.
    tasks
        .patch_status(
            "t-0-1",
            &merge,
            &Patch::Merge(json!({"status": {"phase": "Running", "progress": 10}})),
        )
        .await
        .expect("status writable");
}

#[tokio::test]
async fn kubectl_columns_are_served() {
    let (_plane, client) = hub().await;
    let ns = namespace(&client, "columns").await;
    let text =
        std::fs::read_to_string(repo().join("manifests/job-benchmark.yaml")).expect("example");
    manifests::apply_all(&client, &text, &ns, false)
        .await
        .expect("applied");
    let req = http::Request::get(format!(
        "/apis/edgeloom.io/v1alpha1/namespaces/{ns}/computejobs"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .expect("request");
    let table: serde_json::Value = client.request(req).await.expect("table");
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        [
            "Name",
            "Phase",
            "Progress",
            "Shards",
            "Placement",
            "Rewards",
            "Age"
        ]
    );
    assert_eq!(
        table["rows"][0]["cells"][3],
        json!(4),
        "Shards column shows spec.shards"
    );
}
