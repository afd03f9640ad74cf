//! Federated jobs end to end (docs/ARCHITECTURE.md, "Federated learning in a tree"): real
//! API servers, real operator, agent and runner binaries (libtorch on CPU), a real S3
//! server (SeaweedFS). Each edge node holds its own non-IID slice of the digits as a
//! node-local dataset; the shared test rows are held by no node. Build the binaries first
//! (`cargo build --workspace --bins`; scripts/test.sh does).

use edgeloom_crds::ComputeJob;
use edgeloom_crds::JobPhase;
use edgeloom_crds::federated::{FederatedStatus, RoundStage};
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_e2e::federation::{AgentProcess, AgentSpec, Federation};
use edgeloom_e2e::{jobs, manifests, wait};
use futures::TryStreamExt as _;
use kube::api::Api;
use object_store::ObjectStoreExt as _;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_edgeloom-operator")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

fn slices(dir: &Path, nodes: &[String]) -> (edgeloom_e2e::digits::Datasets, PathBuf) {
    edgeloom_e2e::digits::label_skewed_slices(dir, nodes).expect("slices")
}

fn nodes(fed: &Federation) -> Vec<String> {
    fed.plane.members().flat_map(|m| m.nodes.clone()).collect()
}

fn agents(
    fed: &Federation,
    data: &BTreeMap<String, BTreeMap<String, PathBuf>>,
    poisoners: &[(&str, &str)],
) -> BTreeMap<String, AgentProcess> {
    let mut out = BTreeMap::new();
    for m in fed.plane.members() {
        for node in &m.nodes {
            let spec = AgentSpec {
                member: m.name.clone(),
                node: node.clone(),
                account: format!("acct-{node}"),
                datasets: data.get(node).cloned().unwrap_or_default(),
                cheat: false,
                copy_peers: false,
                inflate_usage: false,
                poison: poisoners
                    .iter()
                    .find(|(n, _)| n == node)
                    .map(|(_, how)| how.to_string()),
            };
            out.insert(
                node.clone(),
                fed.agent(&bin("edgeloom-agent"), &bin("edgeloom-runner"), &spec)
                    .expect("agent"),
            );
        }
    }
    out
}

/// The operator's object store and its root (what the platform team can read).
async fn store(fed: &Federation) -> (std::sync::Arc<dyn object_store::ObjectStore>, String) {
    use edgeloom_operator::rewards::backend::{STORE_SECRET, StoreConfig};
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(fed.hub.clone(), SYSTEM_NAMESPACE);
    let secret = secrets.get(STORE_SECRET).await.expect("store Secret");
    let backend = StoreConfig::from_secret(&secret)
        .expect("store config")
        .open()
        .expect("store");
    (backend.store, backend.root.as_ref().to_string())
}

/// Every object the job left in the store, by key.
async fn objects_of(fed: &Federation, uid: &str) -> Vec<(String, u64)> {
    let (s, _) = store(fed).await;
    let all: Vec<object_store::ObjectMeta> = s.list(None).try_collect().await.expect("list");
    all.into_iter()
        .filter(|m| m.location.as_ref().contains(&format!("/jobs/{uid}/")))
        .map(|m| (m.location.as_ref().to_string(), m.size))
        .collect()
}

/// Downloads the job's final global model and evaluates it with the runner on `test`.
async fn final_accuracy(fed: &Federation, st: &FederatedStatus, dir: &Path, test: &Path) -> f64 {
    let global = st.global_model.as_ref().expect("a global model");
    let (s, _) = store(fed).await;
    let bytes = s
        .get(&object_store::path::Path::from(global.key.as_str()))
        .await
        .expect("get")
        .bytes()
        .await
        .expect("bytes");
    let model = dir.join("final.safetensors");
    std::fs::write(&model, &bytes).expect("model");
    assert_eq!(
        edgeloom_fl::model::file_sha256(&model).expect("sha"),
        global.sha256,
        "the stored global model is the one the status names"
    );
    let spec = serde_json::json!({
        "device": "cpu",
        "dataPath": test,
        "workload": {"kind": "Federated", "model": {"builtin": "Mlp"}, "dataset": {"nodeLocal": "digits-slice"},
                     "parameters": {"classes": 10, "seed": 7}},
        "federated": {"step": "evaluate", "model": model},
    });
    let mut child = Command::new(bin("edgeloom-runner"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runner");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(spec.to_string().as_bytes())
        .expect("spec");
    let out = child.wait_with_output().expect("runner ends");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["type"] == "result")
        .and_then(|v| v["metrics"]["accuracy"].as_f64())
        .unwrap_or_else(|| panic!("no accuracy from the runner: {text}"))
}

fn job(name: &str, topology: &str, rule: &str, rounds: u32, extra: &str) -> String {
    format!(
        "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n  shards: 6\n  workload:\n    kind: Federated\n    model:\n      builtin: Mlp\n    dataset:\n      nodeLocal: digits-slice\n    parameters:\n      rounds: {rounds}\n      localEpochs: 2\n      batchSize: 32\n      learningRate: 0.05\n      classes: 10\n      seed: 7\n    federation:\n      topology: {topology}\n      aggregation: {rule}\n      roundTimeoutSeconds: 60\n{extra}"
    )
}

async fn federated_status(fed: &Federation, ns: &str, name: &str) -> FederatedStatus {
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), ns);
    api.get(name)
        .await
        .ok()
        .and_then(|j| j.status)
        .and_then(|s| s.federated)
        .unwrap_or_default()
}

/// The goal of the capability: one model learnt from data that never leaves its node, in
/// a tree. Two member clusters of three nodes, label-skewed slices; the final global
/// model, read from the store and evaluated on rows no node holds, reaches 90%. The store
/// holds only models (every object of the job parses as a safetensors model), node
/// updates stay under their member's prefix, and accepted updates are paid.
///
/// The attacks: edge-a-node-0, the first node of edge-a and so its aggregator, writes
/// and reports a poisoned member model (scaled change) while training honestly. The hub
/// audits every aggregation (`auditRate: 1`): each of its aggregations is caught, the
/// hub's recomputation is used instead, and the job still learns. edge-b-node-0, edge-b's
/// aggregator, claims every round that it could not read its member's last update: the
/// hub reads it and restores it, so every honest update is still accepted.
#[tokio::test]
async fn a_tree_federated_job_learns_one_model_from_node_local_non_iid_data_past_a_lying_aggregator()
 {
    let _serial = SERIAL.lock().await;
    let fed = Federation::start_bare(&["edge-a", "edge-b"], 3)
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 2).await.expect("pool");
    let (data, test) = slices(fed.plane.dir(), &nodes(&fed));
    let liar = "edge-a-node-0";
    let hider = "edge-b-node-0";
    let _agents = agents(
        &fed,
        &data,
        &[(liar, "aggregate:scale:-4"), (hider, "aggregate:hide")],
    );
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("fl-tree").await.expect("ns");
    let audit_all = "      auditRate: 1\n";
    manifests::apply_all(
        &fed.hub,
        &job("tree", "Tree", "Mean", 6, audit_all),
        &ns,
        false,
    )
    .await
    .expect("job");
    // What any agent of the cluster can read of a task: its URLs are sealed to its node.
    let member = fed
        .plane
        .members()
        .next()
        .expect("member")
        .client()
        .await
        .expect("client");
    let tasks: Api<edgeloom_crds::ComputeTask> = Api::namespaced(member, SYSTEM_NAMESPACE);
    let seen = wait::until(
        "a federated task in edge-a",
        Duration::from_secs(120),
        || async {
            let list = tasks
                .list(&Default::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .into_iter()
                .find_map(|t| t.spec.federated)
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await;
    assert!(
        seen.urls.output.is_none() && seen.urls.model.is_none() && seen.urls.updates.is_empty(),
        "{seen:?}"
    );
    let sealed = seen.sealed_urls.expect("sealed URLs");
    assert!(
        !sealed.contains("http") && !sealed.contains("Signature"),
        "nothing readable"
    );
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "tree",
        JobPhase::Succeeded,
        Duration::from_secs(420),
    )
    .await;
    let uid = done.metadata.uid.clone().expect("uid");
    let s = done.status.expect("status");
    let st = s.federated.clone().expect("federated status");
    assert_eq!(st.completed_rounds, 6, "{st:?}");
    assert_eq!(st.stage, Some(RoundStage::Done));
    assert_eq!(
        st.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>(),
        "every round once, in order"
    );
    // The liar is caught on its first aggregation (quarantined after quarantineAfter
    // catches, it then takes no part); every honest node's update is accepted.
    assert!(
        st.rounds.iter().all(|r| r.hub && r.accepted >= 5),
        "{:?}",
        st.rounds
    );
    assert!(
        st.rounds.iter().all(|r| r.audited == 2),
        "both members' aggregations audited every round: {:?}",
        st.rounds
    );
    let caught: u32 = st.rounds.iter().map(|r| r.audits_failed).sum();
    assert!(
        caught >= 1 && st.rounds[0].audits_failed == 1,
        "the lying aggregator is caught from round 1: {:?}",
        st.rounds
    );
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(fed.hub.clone(), &ns);
    let events = events
        .list(&Default::default())
        .await
        .expect("events")
        .items;
    let messages = |reason: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.message.clone())
            .collect()
    };
    let failed = messages("AggregationAuditFailed");
    assert!(
        !failed.is_empty() && failed.iter().all(|m| m.contains(liar)),
        "each failed audit names the liar: {failed:?}"
    );
    // The hider's claim that it could not read an update is always checked (a member
    // aggregation that rejects anything is audited whatever the draw): the hub reads the
    // update, uses its own aggregation with it, and blames nobody.
    let corrected = messages("AggregationAuditCorrected");
    assert!(
        !corrected.is_empty() && corrected.iter().all(|m| m.contains(hider)),
        "the hidden update is restored: {corrected:?}"
    );
    assert!(st.bytes_in_members > 0 && st.bytes_to_hub > 0, "{st:?}");
    // Per round the hub receives two member models where flat would receive six updates
    // (besides what its audits bring up: here every update, as every aggregation is
    // audited).
    let r = &st.rounds[2];
    assert!(
        r.bytes_audited > 0 && (r.bytes_to_hub - r.bytes_audited) * 2 <= r.bytes_in_members,
        "the tree sends less to the hub: {r:?}"
    );
    assert!(
        st.rounds.iter().rev().skip(1).all(|r| r.accuracy.is_some()),
        "each round's accuracy is reported by the next round's participants: {:?}",
        st.rounds
    );
    let acc = final_accuracy(&fed, &st, fed.plane.dir(), &test).await;
    eprintln!(
        "tree federated accuracy on held-out digits: {acc:.4}; reported {:?}",
        st.final_accuracy
    );
    assert!(acc >= 0.90, "test accuracy {acc}");
    assert!(s.rewards.is_some(), "accepted updates are paid: {s:?}");
    // Only models in the store; no node update under the hub's prefix.
    let objects = objects_of(&fed, &uid).await;
    assert!(objects.len() >= 6 * 6, "{objects:?}");
    let (st_store, _) = store(&fed).await;
    for (key, _) in &objects {
        if key.contains("/members/") {
            continue;
        }
        assert!(
            !key.contains("/updates/"),
            "a node update reached the hub: {key}"
        );
    }
    for (key, _) in &objects {
        let bytes = st_store
            .get(&object_store::path::Path::from(key.as_str()))
            .await
            .expect("get")
            .bytes()
            .await
            .expect("bytes");
        let path = fed.plane.dir().join("object.safetensors");
        std::fs::write(&path, &bytes).expect("write");
        let m = edgeloom_fl::ModelReader::open(&path)
            .unwrap_or_else(|e| panic!("{key} is not a model ({e}): the store holds only models"));
        assert!(
            m.layout.0.iter().all(|t| t.name.starts_with("fc")),
            "{key}: {:?}",
            m.layout
        );
    }
    finished_cleanly(&fed, &ns, "tree").await;
    // `kubectl edgeloom describe job` shows the rounds.
    let described = edgeloom_e2e::ledger::plugin(
        &bin("kubectl-edgeloom"),
        &fed.plane.hub().kubeconfig,
        &["describe", "job", "tree", "-n", &ns],
    );
    assert_eq!(described.code, Some(0), "{}", described.stderr);
    let out = described.stdout;
    eprintln!("{out}");
    assert!(
        out.contains("Federation:  Tree, hub every 1 round(s), Mean"),
        "{out}"
    );
    assert!(out.contains("ROUND") && out.contains("TO-HUB"), "{out}");
    assert_eq!(
        out.lines()
            .filter(
                |l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains(" yes ")
            )
            .count(),
        6,
        "a row per round: {out}"
    );
}

/// A finished Federated job says so in its conditions and events, and leaves no task in
/// any member.
async fn finished_cleanly(fed: &Federation, ns: &str, name: &str) {
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), ns);
    let job = api.get(name).await.expect("job");
    let s = job.status.clone().expect("status");
    let ok = s.phase == Some(JobPhase::Succeeded);
    let cond = |t: &str| {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    assert_eq!(
        cond("Scheduled").map(|c| c.1),
        Some("Finished".into()),
        "{:?}",
        s.conditions
    );
    let truth = |b: bool| if b { "True" } else { "False" }.to_string();
    assert_eq!(cond("Complete").map(|c| c.0), Some(truth(ok)));
    assert_eq!(cond("Failed").map(|c| c.0), Some(truth(!ok)));
    let end = if ok { "Succeeded" } else { "Failed" };
    wait::until(
        "the end event and no task left",
        Duration::from_secs(30),
        || async {
            let events = jobs::events_of(fed, ns, name).await;
            let mut left = 0;
            for m in fed.plane.members() {
                let tasks: Api<edgeloom_crds::ComputeTask> = Api::namespaced(
                    m.client().await.map_err(|e| e.to_string())?,
                    SYSTEM_NAMESPACE,
                );
                left += tasks
                    .list(&Default::default())
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .len();
            }
            if events.iter().any(|(r, _)| r == end) && left == 0 {
                Ok(())
            } else {
                Err(format!("{left} tasks left; events {events:?}"))
            }
        },
    )
    .await;
}

/// Rounds are robust: in a Flat job under TrimmedMean one node poisons its updates
/// (scaled by 50); a node's agent is killed in the middle of a round; the operator is
/// killed with -9 in the middle of another and a new one takes over. The job finishes
/// every round once, the poisoner is caught in every round it reported, the lost node is
/// left out, and the model still learns.
#[tokio::test]
async fn rounds_survive_a_poisoner_a_lost_node_and_a_killed_operator() {
    let _serial = SERIAL.lock().await;
    let fed = Federation::start_bare(&["edge-a", "edge-b"], 3)
        .await
        .expect("federation");
    fed.apply_pool("edge", 6, 2).await.expect("pool");
    let (data, test) = slices(fed.plane.dir(), &nodes(&fed));
    let poisoner = "edge-b-node-2";
    let mut agents = agents(&fed, &data, &[(poisoner, "scale:50")]);
    let mut op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("fl-robust").await.expect("ns");
    let spec = job(
        "robust",
        "Flat",
        "TrimmedMean",
        6,
        "      trimFraction: 0.2\n      minParticipants: \"80%\"\n",
    );
    manifests::apply_all(&fed.hub, &spec, &ns, false)
        .await
        .expect("job");
    // Mid round 2: kill a participant's agent (not the poisoner).
    let victim = "edge-a-node-1";
    wait::until(
        "round 2 to train with the victim",
        Duration::from_secs(240),
        || async {
            let st = federated_status(&fed, &ns, "robust").await;
            if st.round == 2
                && st.stage == Some(RoundStage::Training)
                && st.participants.iter().any(|p| p.node == victim)
            {
                Ok(())
            } else {
                Err(format!("round {} {:?}", st.round, st.stage))
            }
        },
    )
    .await;
    agents.get_mut(victim).expect("victim").process.kill();
    // Mid round 4: kill the operator, start another.
    wait::until("round 4 to start", Duration::from_secs(240), || async {
        let st = federated_status(&fed, &ns, "robust").await;
        if st.round >= 4 && st.stage == Some(RoundStage::Training) {
            Ok(())
        } else {
            Err(format!("round {} {:?}", st.round, st.stage))
        }
    })
    .await;
    op.kill();
    let _op2 = fed
        .operator(&bin("edgeloom-operator"), "op-2")
        .expect("operator");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "robust",
        JobPhase::Succeeded,
        Duration::from_secs(420),
    )
    .await;
    let s = done.status.expect("status");
    let st = s.federated.clone().expect("federated");
    assert_eq!(st.completed_rounds, 6);
    assert_eq!(
        st.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>(),
        "no round counted twice: {:?}",
        st.rounds
    );
    let caught = st
        .rejected_updates
        .iter()
        .find(|(k, _)| k.ends_with(poisoner))
        .map(|(_, n)| *n)
        .unwrap_or(0);
    assert!(
        caught >= 3,
        "the poisoner is caught: {:?}",
        st.rejected_updates
    );
    assert!(
        st.rejected_updates.keys().all(|k| k.ends_with(poisoner)),
        "only the poisoner is rejected: {:?}; {:?}",
        st.rejected_updates,
        jobs::events_of(&fed, &ns, "robust").await
    );
    // The ledger: one receipt per accepted update (round, participant), none for the
    // poisoner's updates, none twice.
    let uid = done.metadata.uid.clone().expect("uid");
    let receipts = edgeloom_e2e::ledger::receipts_json(
        &bin("kubectl-edgeloom"),
        &fed.plane.hub().kubeconfig,
        Some(&uid),
    );
    let train: Vec<&serde_json::Value> = receipts
        .iter()
        .filter(|r| r["replica"] == 0 && r["forfeits"].is_null())
        .collect();
    let keys: std::collections::BTreeSet<(u64, u64)> = train
        .iter()
        .map(|r| {
            (
                r["round"].as_u64().expect("round"),
                r["shard"].as_u64().expect("shard"),
            )
        })
        .collect();
    assert_eq!(keys.len(), train.len(), "no update paid twice: {train:?}");
    let accepted: u32 = st.rounds.iter().map(|r| r.accepted).sum();
    assert_eq!(
        train.len() as u32,
        accepted,
        "every accepted update paid once: {train:?}"
    );
    assert!(
        train.iter().all(|r| r["node"] != poisoner),
        "no poisoned update is paid: {train:?}"
    );
    assert!(
        train
            .iter()
            .all(|r| r["node"] != victim || r["round"].as_u64() < Some(3)),
        "the killed node is paid for nothing after it was killed: {train:?}"
    );
    // The round the victim was killed in closed without it (quorum 80%); from the next
    // round on its update never counts (it is lost, then no longer picked).
    assert!(st.rounds[1].missing >= 1, "{:?}", st.rounds);
    let acc = final_accuracy(&fed, &st, fed.plane.dir(), &test).await;
    eprintln!("robust federated accuracy: {acc:.4}");
    assert!(acc >= 0.85, "a poisoner does not stop convergence: {acc}");
    finished_cleanly(&fed, &ns, "robust").await;
}
