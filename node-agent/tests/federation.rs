//! Real agents on real member clusters: edgeloom-operator, edgeloom-agent and
//! edgeloom-runner binaries (build them first: `cargo build --workspace --bins`, which
//! scripts/test.sh does), libtorch on CPU, jobs applied as YAML to the hub.

use edgeloom_crds::compute_task::ComputeTask;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::{ComputeJob, JobPhase, TaskPhase};
use edgeloom_e2e::federation::{AgentProcess, AgentSpec, Federation};
use edgeloom_e2e::{jobs, ledger, manifests, scrape, wait};
use kube::api::{Api, ListParams};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Federations running at once in this file: each is a hub and its members with real
/// agents, mostly waiting on them, so two at a time shorten the file on 2 cores.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// A one-shard training job of about 16 s on this machine: long enough to outlive a
/// heartbeat timeout or a shutdown grace period.
const LONG_JOB: &str = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: long\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Mlp\n    dataset:\n      synthetic:\n        samples: 100000\n        features: 64\n        classes: 10\n    parameters:\n      epochs: 60\n  shards: 1\n";

fn bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_edgeloom-agent")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

async fn federation(heartbeat: u32) -> (Federation, Vec<AgentProcess>) {
    let fed = Federation::start_bare(&["edge-a", "edge-b"], 1)
        .await
        .expect("federation");
    fed.apply_pool("edge", heartbeat, 1).await.expect("pool");
    let agents = agents_with(&fed, &BTreeMap::new()).await;
    (fed, agents)
}

#[tokio::test]
async fn train_and_inference_jobs_run_on_real_agents_in_two_members() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let (fed, agents) = federation(10).await;
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("real").await.expect("ns");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let train =
        std::fs::read_to_string(repo.join("manifests/job-train-digits.yaml")).expect("example");
    manifests::apply_all(&fed.hub, &train, &ns, false)
        .await
        .expect("train job");
    let inference = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: infer\nspec:\n  workload:\n    kind: Inference\n    model:\n      builtin: Linear\n    dataset:\n      builtin: Digits\n    parameters:\n      epochs: 30\n      optimizer: Adam\n      learningRate: 0.01\n  shards: 2\n  resources:\n    memory: 2Gi\n";
    manifests::apply_all(&fed.hub, inference, &ns, false)
        .await
        .expect("inference job");

    let trained = jobs::wait_phase(
        &fed,
        &ns,
        "train-digits",
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    jobs::assert_truthful(&fed, &trained).await;
    let s = trained.status.expect("status");
    assert!(s.metrics["accuracy"] >= 0.9, "{:?}", s.metrics);
    assert_eq!(
        s.placement.as_deref(),
        Some("edge-a:2,edge-b:2"),
        "spread over both members"
    );
    assert!(
        s.shards
            .iter()
            .all(|x| x.result_digest.as_ref().is_some_and(|d| d.len() == 64))
    );
    let inferred = jobs::wait_phase(
        &fed,
        &ns,
        "infer",
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    jobs::assert_truthful(&fed, &inferred).await;
    let s = inferred.status.expect("status");
    assert!(s.metrics["accuracy"] >= 0.9, "{:?}", s.metrics);
    assert!(s.metrics["samplesPerSecond"] > 0.0);

    // Usage is reported in integer units; the agents count their work.
    for m in fed.plane.members() {
        let tasks: Api<ComputeTask> =
            Api::namespaced(m.client().await.expect("client"), SYSTEM_NAMESPACE);
        for t in tasks
            .list(&ListParams::default())
            .await
            .expect("tasks")
            .items
        {
            let status = t.status.expect("status");
            assert_eq!(status.phase, Some(TaskPhase::Succeeded));
            let usage = status.usage.expect("usage");
            assert!(
                usage.cpu_core_millis > 0 && usage.wall_millis > 0,
                "{usage:?}"
            );
        }
    }
    for a in &agents {
        let (code, body) = scrape::get(a.port, "/metrics")
            .await
            .expect("agent metrics");
        assert_eq!(code, 200);
        assert!(
            body.contains("edgeloom_agent_tasks_total{outcome=\"succeeded\"}"),
            "{}: {body}",
            a.node
        );
        assert!(body.contains("edgeloom_agent_heartbeats_total"), "{body}");
        assert_eq!(scrape::get(a.port, "/readyz").await.expect("readyz").0, 200);
    }
}

#[tokio::test]
async fn a_killed_agent_mid_task_is_replaced_and_the_job_completes() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let (fed, mut agents) = federation(5).await;
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("killed").await.expect("ns");
    let job = LONG_JOB;
    manifests::apply_all(&fed.hub, job, &ns, false)
        .await
        .expect("job");
    let first = jobs::first_running_shard(&fed, &ns, "long", Duration::from_secs(120)).await;
    let victim = agents
        .iter_mut()
        .find(|a| a.node == first.node)
        .expect("the agent running it");
    victim.process.kill();
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "long",
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shard = &done.status.expect("status").shards[0];
    assert_eq!(
        shard.attempt, 2,
        "re-placed after the agent's heartbeat stopped"
    );
    assert_ne!(shard.node, first.node);
}

#[tokio::test]
async fn a_runner_over_its_memory_limit_fails_its_task_and_the_agents_keep_serving() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let (fed, _agents) = federation(10).await;
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("oom").await.expect("ns");
    let greedy = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: greedy\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Linear\n    dataset:\n      builtin: Digits\n  resources:\n    memory: 64Mi\n  maxRetries: 1\n";
    manifests::apply_all(&fed.hub, greedy, &ns, false)
        .await
        .expect("job");
    let failed = jobs::wait_phase(
        &fed,
        &ns,
        "greedy",
        JobPhase::Failed,
        Duration::from_secs(180),
    )
    .await;
    jobs::assert_truthful(&fed, &failed).await;
    let status = failed.status.expect("status");
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(cond.reason, "ShardFailed");
    assert!(
        cond.message.contains("out of memory") && cond.message.contains("64 MiB"),
        "{}",
        cond.message
    );
    assert_eq!(
        status.shards[0].attempt, 2,
        "retried once on the other node"
    );
    // Both agents are still serving.
    let fine = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: fine\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Linear\n    dataset:\n      builtin: Digits\n  shards: 2\n  placement:\n    spread: Cluster\n";
    manifests::apply_all(&fed.hub, fine, &ns, false)
        .await
        .expect("job");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "fine",
        JobPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    assert_eq!(
        done.status.expect("status").placement.as_deref(),
        Some("edge-a:1,edge-b:1")
    );
}

/// Serves `body` at `/digits.pt` on 127.0.0.1 until the test ends; returns the port.
/// `/elsewhere.pt` redirects to another host name (`localhost`), `/same.pt` to
/// `/digits.pt` on the same host, and `/broken.pt` answers 500 with a body that must never
/// reach a job's status.
async fn serve_model(body: Vec<u8>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = request.split(' ').nth(1).unwrap_or_default().to_string();
                let (head, payload): (String, Vec<u8>) = match path.as_str() {
                    "/digits.pt" => (
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        ),
                        body,
                    ),
                    "/same.pt" => (
                        "HTTP/1.1 302 Found\r\nLocation: /digits.pt\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                        vec![],
                    ),
                    "/elsewhere.pt" => (
                        format!("HTTP/1.1 302 Found\r\nLocation: http://localhost:{port}/digits.pt\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
                        vec![],
                    ),
                    "/broken.pt" => {
                        let secret = b"internal-secret-token".to_vec();
                        (
                            format!(
                                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                secret.len()
                            ),
                            secret,
                        )
                    }
                    _ => (
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .into(),
                        vec![],
                    ),
                };
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&payload).await;
            });
        }
    });
    port
}

/// Sets the pool's model download policy.
async fn model_downloads(fed: &Federation, policy: serde_json::Value) {
    Api::<edgeloom_crds::EdgePool>::all(fed.hub.clone())
        .patch(
            "edge",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"spec": {"modelDownloads": policy}})),
        )
        .await
        .expect("pool patched");
}

/// The Failed condition's message of job `ns/name` once it failed.
async fn failure_of(fed: &Federation, ns: &str, name: &str) -> String {
    let failed = jobs::wait_phase(fed, ns, name, JobPhase::Failed, Duration::from_secs(120)).await;
    jobs::assert_truthful(fed, &failed).await;
    failed
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed")
        .message
}

#[tokio::test]
async fn torchscript_models_from_a_url_and_from_a_configmap_run_on_real_agents() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let (fed, _agents) = federation(10).await;
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("models").await.expect("ns");
    let file = fed.plane.dir().join("digits.pt");
    edgeloom_e2e::torch_models::digits_torchscript(&file).expect("python made the model");
    let bytes = std::fs::read(&file).expect("model bytes");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    let port = serve_model(bytes.clone()).await;
    let job = |name: &str, model: &str| {
        format!(
            "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n  workload:\n    kind: Inference\n    model:\n{model}    dataset:\n      builtin: Digits\n  shards: 2\n  maxRetries: 0\n  resources:\n    memory: 2Gi\n"
        )
    };
    let url = |path: &str| {
        format!("      url: http://127.0.0.1:{port}/{path}\n      sha256: \"{sha}\"\n")
    };
    // The pool's default: https to public addresses only.
    manifests::apply_all(&fed.hub, &job("plain-http", &url("digits.pt")), &ns, false)
        .await
        .expect("job");
    let msg = failure_of(&fed, &ns, "plain-http").await;
    assert!(
        msg.contains("plain http is not allowed by the pool"),
        "{msg}"
    );
    // http allowed, but the host is this machine's loopback: a job owner may not make a
    // contributor's machine fetch from its own network.
    model_downloads(&fed, serde_json::json!({"allowHttp": true})).await;
    manifests::apply_all(&fed.hub, &job("loopback", &url("digits.pt")), &ns, false)
        .await
        .expect("job");
    let msg = failure_of(&fed, &ns, "loopback").await;
    assert!(
        msg.contains("resolves to a private, loopback or link-local address"),
        "{msg}"
    );
    // The pool lists the network: allowed; a redirect leaves for another host: refused; a
    // server error is reported by its status, never by what the server said.
    model_downloads(
        &fed,
        serde_json::json!({"allowHttp": true, "allowedNetworks": ["127.0.0.0/8", "::1/128"]}),
    )
    .await;
    for (name, path) in [("elsewhere", "elsewhere.pt"), ("broken", "broken.pt")] {
        manifests::apply_all(&fed.hub, &job(name, &url(path)), &ns, false)
            .await
            .expect("job");
    }
    let msg = failure_of(&fed, &ns, "elsewhere").await;
    assert!(msg.contains("redirected to another host"), "{msg}");
    let msg = failure_of(&fed, &ns, "broken").await;
    assert!(msg.contains("HTTP 500"), "{msg}");
    assert!(!msg.contains("internal-secret-token"), "{msg}");
    manifests::apply_all(&fed.hub, &job("by-url", &url("same.pt")), &ns, false)
        .await
        .expect("job");
    let wrong = format!(
        "      url: http://127.0.0.1:{port}/digits.pt\n      sha256: \"{}\"\n",
        "0".repeat(64)
    );
    manifests::apply_all(&fed.hub, &job("tampered", &wrong), &ns, false)
        .await
        .expect("job");
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(fed.hub.clone(), &ns);
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "digits-model"},
        "binaryData": {"model.pt": k8s_openapi::ByteString(bytes)}
    }))
    .expect("configmap");
    cms.create(&Default::default(), &cm)
        .await
        .expect("configmap created");
    manifests::apply_all(
        &fed.hub,
        &job(
            "by-configmap",
            "      configMap:\n        name: digits-model\n        key: model.pt\n",
        ),
        &ns,
        false,
    )
    .await
    .expect("job");
    manifests::apply_all(
        &fed.hub,
        &job(
            "no-configmap",
            "      configMap:\n        name: missing\n        key: model.pt\n",
        ),
        &ns,
        false,
    )
    .await
    .expect("job");

    for name in ["by-url", "by-configmap"] {
        let done = jobs::wait_phase(
            &fed,
            &ns,
            name,
            JobPhase::Succeeded,
            Duration::from_secs(240),
        )
        .await;
        jobs::assert_truthful(&fed, &done).await;
        let m = done.status.expect("status").metrics;
        assert!(m["accuracy"] >= 0.9, "{name}: {m:?}");
    }
    let tampered = jobs::wait_phase(
        &fed,
        &ns,
        "tampered",
        JobPhase::Failed,
        Duration::from_secs(120),
    )
    .await;
    jobs::assert_truthful(&fed, &tampered).await;
    let msg = tampered
        .status
        .expect("status")
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed")
        .message;
    assert!(msg.contains("model digest mismatch"), "{msg}");
    jobs::wait_job_condition(
        &fed,
        &ns,
        "no-configmap",
        "Scheduled",
        "False",
        &["ConfigMap models/missing (the job's model) not found"],
        Duration::from_secs(60),
    )
    .await;
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    // The mirrored ConfigMap is removed with its job.
    api.delete("by-configmap", &Default::default())
        .await
        .expect("delete");
    for m in fed.plane.members() {
        let mirrors: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(m.client().await.expect("client"), SYSTEM_NAMESPACE);
        wait::until(
            "the mirrored model ConfigMap to go",
            Duration::from_secs(60),
            || {
                let mirrors = mirrors.clone();
                async move {
                    let left: Vec<String> = mirrors
                        .list(&ListParams::default())
                        .await
                        .map_err(|e| e.to_string())?
                        .items
                        .into_iter()
                        .filter_map(|c| c.metadata.name)
                        .filter(|n| n.ends_with("-digits-model"))
                        .collect();
                    if left.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("{left:?}"))
                    }
                }
            },
        )
        .await;
    }
}

async fn agents_with(
    fed: &Federation,
    datasets: &BTreeMap<String, BTreeMap<String, PathBuf>>,
) -> Vec<AgentProcess> {
    fed.start_agents(
        &bin("edgeloom-agent"),
        &bin("edgeloom-runner"),
        "acct",
        datasets,
    )
    .expect("agents")
}

#[tokio::test]
async fn node_local_data_stays_on_its_node_and_replicas_on_two_agents_agree() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start_bare(&["edge-a", "edge-b"], 1)
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 2).await.expect("pool");
    // Only edge-a-node-0 holds "clinic-records" (the digits, scaled, as a local CSV).
    let csv = fed.plane.dir().join("clinic.csv");
    let mut text = String::new();
    {
        use std::io::Read;
        let gz = std::fs::read(edgeloom_e2e::torch_models::digits_csv()).expect("digits");
        let mut raw = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut raw)
            .expect("gunzip");
        for line in raw.lines() {
            let v: Vec<&str> = line.split(',').collect();
            let (label, px) = v.split_last().expect("row");
            let scaled: Vec<String> = px
                .iter()
                .map(|p| format!("{}", p.parse::<f32>().unwrap_or(0.0) / 16.0))
                .collect();
            text.push_str(&format!("{},{label}\n", scaled.join(",")));
        }
    }
    std::fs::write(&csv, text).expect("csv");
    let datasets = BTreeMap::from([(
        "edge-a-node-0".to_string(),
        BTreeMap::from([("clinic-records".to_string(), csv.clone())]),
    )]);
    let _agents = agents_with(&fed, &datasets).await;
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("local").await.expect("ns");
    let local = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: local\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Mlp\n    dataset:\n      nodeLocal: clinic-records\n    parameters:\n      epochs: 15\n      optimizer: Adam\n      learningRate: 0.002\n  shards: 2\n";
    manifests::apply_all(&fed.hub, local, &ns, false)
        .await
        .expect("job");
    let replicated = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: replicated\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Mlp\n    dataset:\n      builtin: Digits\n    parameters:\n      epochs: 5\n  verification:\n    replicas: 2\n";
    manifests::apply_all(&fed.hub, replicated, &ns, false)
        .await
        .expect("job");

    let done = jobs::wait_phase(
        &fed,
        &ns,
        "local",
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let s = done.status.expect("status");
    assert!(
        s.shards.iter().all(|x| x.node == "edge-a-node-0"),
        "the data never leaves its node: {:?}",
        s.shards
    );
    assert!(s.metrics["accuracy"] >= 0.9, "{:?}", s.metrics);

    let done = jobs::wait_phase(
        &fed,
        &ns,
        "replicated",
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shards = done.status.expect("status").shards;
    assert_eq!(shards.len(), 2);
    assert_ne!(shards[0].node, shards[1].node, "replicas on distinct nodes");
    assert_eq!(
        shards[0].result_digest, shards[1].result_digest,
        "deterministic mode: two nodes, one digest"
    );
    // Both honest nodes are paid, each exactly once, for the CPU time their agent measured.
    let uid = done.metadata.uid.clone().expect("uid");
    let paid = receipts(&fed, &uid, 2).await;
    assert_eq!(paid.len(), 2, "{paid:?}");
    let mut nodes: Vec<&str> = paid.iter().map(|p| p.3.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 2, "one receipt per node: {paid:?}");
    for p in &paid {
        assert_eq!(p.4, format!("acct-{}", p.3), "paid to the node's account");
        assert!(p.5.parse::<f64>().expect("amount") > 0.0, "{p:?}");
    }
    let rewards = jobs::wait_phase(
        &fed,
        &ns,
        "replicated",
        JobPhase::Succeeded,
        Duration::from_secs(10),
    )
    .await
    .status
    .and_then(|s| s.rewards)
    .expect("job rewards in status");
    assert_eq!(rewards.by_account.len(), 2, "{rewards:?}");
}

fn plugin() -> PathBuf {
    bin("kubectl-edgeloom")
}

/// Waits for `n` receipts of the job in the ledgers (`kubectl edgeloom ledger export`).
async fn receipts(
    fed: &Federation,
    uid: &str,
    n: usize,
) -> Vec<(u64, u64, u64, String, String, String)> {
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    wait::until_true(&format!("{n} receipt(s)"), Duration::from_secs(30), || {
        let kubeconfig = kubeconfig.clone();
        async move { ledger::receipts_of(&ledger::export(&plugin(), &kubeconfig), uid).len() >= n }
    })
    .await;
    ledger::receipts_of(&ledger::export(&plugin(), &kubeconfig), uid)
}

#[tokio::test]
async fn sigterm_cancels_a_long_task_after_the_grace_period_and_it_is_replaced() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let (fed, mut agents) = federation(10).await;
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("sigterm").await.expect("ns");
    let job = LONG_JOB;
    manifests::apply_all(&fed.hub, job, &ns, false)
        .await
        .expect("job");
    let first = jobs::first_running_shard(&fed, &ns, "long", Duration::from_secs(120)).await;
    let agent = agents
        .iter_mut()
        .find(|a| a.node == first.node)
        .expect("the agent running it");
    let exit = agent
        .process
        .terminate(Duration::from_secs(30))
        .expect("the agent exits by itself after SIGTERM");
    assert!(exit.success(), "clean exit: {exit:?}");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "long",
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shard = &done.status.expect("status").shards[0];
    assert_eq!(shard.attempt, 2);
    assert_ne!(shard.node, first.node);
    // The first attempt was reported as cancelled by the shutting-down agent, not left running.
    let member = fed.plane.cluster(&first.cluster).expect("member");
    let tasks: Api<ComputeTask> =
        Api::namespaced(member.client().await.expect("client"), SYSTEM_NAMESPACE);
    let old = tasks
        .list(&ListParams::default())
        .await
        .expect("tasks")
        .items
        .into_iter()
        .find(|t| t.spec.attempt == 1)
        .expect("a finished attempt is kept as a record");
    let s = old.status.expect("status");
    assert_eq!(s.phase, Some(TaskPhase::Cancelled), "{s:?}");
    assert!(
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("shutting down")),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_cheating_agent_is_outvoted_by_an_extra_replica() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start_bare(&["edge-a", "edge-b"], 2)
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let start = |member: &str, node: &str, cheat: bool| {
        let spec = AgentSpec {
            member: member.into(),
            node: node.into(),
            account: format!("acct-{node}"),
            datasets: BTreeMap::new(),
            cheat,
            copy_peers: false,
            inflate_usage: false,
            poison: None,
        };
        fed.agent(&bin("edgeloom-agent"), &bin("edgeloom-runner"), &spec)
            .expect("agent")
    };
    let _honest = start("edge-a", "edge-a-node-0", false);
    let _cheat = start("edge-b", "edge-b-node-0", true);
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("cheat").await.expect("ns");
    let job = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: checked\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Linear\n    dataset:\n      builtin: Digits\n    parameters:\n      epochs: 5\n  verification:\n    replicas: 2\n";
    manifests::apply_all(&fed.hub, job, &ns, false)
        .await
        .expect("job");
    // The two results disagree; a third replica is wanted but no third node runs an agent.
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    wait::until(
        "a third replica to be asked for",
        Duration::from_secs(120),
        || {
            let api = api.clone();
            async move {
                let s = api
                    .get("checked")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                let finished = s
                    .shards
                    .iter()
                    .filter(|x| x.phase == TaskPhase::Succeeded)
                    .count();
                let wants = s
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Scheduled" && c.status == "False");
                if finished == 2 && wants && s.phase == Some(JobPhase::Running) {
                    Ok(())
                } else {
                    Err(format!("{:?}", s.shards))
                }
            }
        },
    )
    .await;
    let _third = start("edge-a", "edge-a-node-1", false);
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "checked",
        JobPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shards = done.status.expect("status").shards;
    assert_eq!(shards.len(), 3, "{shards:?}");
    let cheat = shards
        .iter()
        .find(|x| x.node == "edge-b-node-0")
        .expect("the cheater's replica");
    assert!(
        cheat
            .message
            .as_deref()
            .is_some_and(|m| m.contains("outvoted")),
        "{cheat:?}"
    );
    let honest: Vec<_> = shards
        .iter()
        .filter(|x| x.node != "edge-b-node-0")
        .collect();
    assert_eq!(honest.len(), 2);
    assert_eq!(honest[0].result_digest, honest[1].result_digest);
    assert_ne!(cheat.result_digest, honest[0].result_digest);
    // Each (shard, replica, attempt) exists once across all member clusters: a task name is
    // unique only within one cluster, so a re-placement must never create it in another.
    let mut seen = std::collections::HashSet::new();
    for m in fed.plane.members() {
        let tasks: Api<ComputeTask> =
            Api::namespaced(m.client().await.expect("client"), SYSTEM_NAMESPACE);
        for t in tasks
            .list(&ListParams::default())
            .await
            .expect("tasks")
            .items
        {
            assert!(
                seen.insert((t.spec.shard, t.spec.replica, t.spec.attempt)),
                "duplicate task {:?} in {}",
                t.metadata.name,
                m.name
            );
        }
    }
    assert_eq!(seen.len(), 3);
    // The two honest replicas are paid; the cheater is not, and loses its trust.
    let uid = done.metadata.uid.clone().expect("uid");
    let paid = receipts(&fed, &uid, 2).await;
    let nodes: Vec<&str> = paid.iter().map(|p| p.3.as_str()).collect();
    assert_eq!(nodes.len(), 2, "{paid:?}");
    assert!(
        !nodes.contains(&"edge-b-node-0"),
        "the cheater is not paid: {paid:?}"
    );
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    let trust = wait::until_some("the cheater's record", Duration::from_secs(30), || {
        let kubeconfig = kubeconfig.clone();
        async move {
            let out = ledger::plugin(&plugin(), &kubeconfig, &["ledger", "trust"]);
            out.stdout
                .lines()
                .find(|l| l.starts_with("edge-b/edge-b-node-0"))
                .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        }
    })
    .await;
    // NODE VERIFIED STREAK CAUGHT NEEDED TRUSTED QUARANTINED (after 2 catches)
    assert_eq!(trust[1..], ["0", "0", "1", "20", "no", "no"], "{trust:?}");
    let out = ledger::plugin(&plugin(), &kubeconfig, &["ledger", "trust"]);
    let honest_row = out
        .stdout
        .lines()
        .find(|l| l.starts_with("edge-a/edge-a-node-0"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .expect("the honest node's record");
    assert_eq!(honest_row[1..4], ["1", "1", "0"], "{}", out.stdout);
    let events: Vec<String> =
        Api::<k8s_openapi::api::core::v1::Event>::namespaced(fed.hub.clone(), &ns)
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("ResultOutvoted"))
            .filter_map(|e| e.message)
            .collect();
    assert!(
        events.iter().any(|m| m.contains("edge-b/edge-b-node-0")),
        "{events:?}"
    );
    let verify = ledger::plugin(&plugin(), &kubeconfig, &["ledger", "verify"]);
    assert_eq!(verify.code, Some(0), "{verify:?}");

    // Quarantine after one catch: the cheater gets no more work ...
    let pools: Api<edgeloom_crds::EdgePool> = Api::all(fed.hub.clone());
    pools
        .patch(
            "edge",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"spec": {"verification": {"quarantineAfter": 1}}}),
            ),
        )
        .await
        .expect("pool patched");
    let out = ledger::plugin(&plugin(), &kubeconfig, &["ledger", "trust"]);
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("edge-b/edge-b-node-0") && l.trim_end().ends_with("yes")),
        "quarantined: {}",
        out.stdout
    );
    // A 3-shard job on three free nodes (one slot each): without the quarantine one
    // shard goes to each node. Returns the nodes its shards ran on.
    let run_three = |name: &'static str| {
        let fed = &fed;
        let ns = ns.clone();
        async move {
            let yaml = format!(
                "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n  workload:\n    kind: Benchmark\n  shards: 3\n"
            );
            manifests::apply_all(&fed.hub, &yaml, &ns, false)
                .await
                .expect("job");
            let done = jobs::wait_phase(
                fed,
                &ns,
                name,
                JobPhase::Succeeded,
                Duration::from_secs(120),
            )
            .await;
            jobs::assert_truthful(fed, &done).await;
            done.status
                .expect("status")
                .shards
                .iter()
                .map(|s| s.node.clone())
                .collect::<Vec<String>>()
        }
    };
    let quarantined = |n: usize| {
        let port = _op.port;
        async move {
            wait::until_true(
                &format!("{n} quarantined node(s) in the operator"),
                Duration::from_secs(30),
                || async move {
                    scrape::get(port, "/metrics").await.is_ok_and(|(_, m)| {
                        m.contains(&format!(
                            "edgeloom_operator_quarantined_nodes{{pool=\"edge\"}} {n}"
                        ))
                    })
                },
            )
            .await
        }
    };
    quarantined(1).await;
    let nodes = run_three("quarantined").await;
    assert!(
        !nodes.contains(&"edge-b-node-0".to_string()),
        "no work for a quarantined node: {nodes:?}"
    );
    // ... until an admin forgives it.
    let out = ledger::plugin(
        &plugin(),
        &kubeconfig,
        &[
            "ledger",
            "forgive",
            "edge-b/edge-b-node-0",
            "--pool",
            "edge",
        ],
    );
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("caught 1 time(s)"), "{}", out.stdout);
    quarantined(0).await;
    let nodes = run_three("forgiven").await;
    assert!(
        nodes.contains(&"edge-b-node-0".to_string()),
        "back in the pool: {nodes:?}"
    );
}

/// Attacks 1 and 2 of the trust model (README, "Threat model"). A replica that does no
/// work and copies what another replica of its shard reports (agents can read every task
/// of their cluster): with commit–reveal it can copy only a commitment, made for another
/// task's nonce, and then the honest reveal; neither opens its own commitment, so it is
/// caught, not paid, and a third replica decides. And a node that claims far more usage
/// than it used is paid only for what the operator observed.
#[tokio::test]
async fn a_copying_replica_is_caught_by_commit_reveal_and_inflated_usage_is_paid_as_observed() {
    let _slot = SLOTS.acquire().await.expect("slot");
    // One member: agents see the tasks of their own cluster, so a copier and its victim
    // share one.
    let fed = Federation::start_bare(&["edge-a"], 3)
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let start = |member: &str, node: &str, copy_peers: bool, inflate_usage: bool| {
        let spec = AgentSpec {
            member: member.into(),
            node: node.into(),
            account: format!("acct-{node}"),
            datasets: BTreeMap::new(),
            cheat: false,
            copy_peers,
            inflate_usage,
            poison: None,
        };
        fed.agent(&bin("edgeloom-agent"), &bin("edgeloom-runner"), &spec)
            .expect("agent")
    };
    // The first replica's result is honest but it claims 1000x its CPU time and an hour
    // of GPU time on a CPU job (attack: setting its own pay).
    let _honest = start("edge-a", "edge-a-node-0", false, true);
    let _copier = start("edge-a", "edge-a-node-1", true, false);
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("copier").await.expect("ns");
    let job = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: copied\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Linear\n    dataset:\n      builtin: Digits\n    parameters:\n      epochs: 5\n  verification:\n    replicas: 2\n";
    manifests::apply_all(&fed.hub, job, &ns, false)
        .await
        .expect("job");
    // The copier's reveal is rejected; a third replica is wanted (no third agent yet).
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    let seen = wait::until(
        "the copier's reveal to be rejected",
        Duration::from_secs(120),
        || {
            let api = api.clone();
            async move {
                let s = api
                    .get("copied")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                let rejected = s.shards.iter().any(|x| {
                    x.node == "edge-a-node-1"
                        && x.message
                            .as_deref()
                            .is_some_and(|m| m.contains("does not open the commitment"))
                });
                if rejected && s.phase == Some(JobPhase::Running) {
                    Ok(s)
                } else {
                    Err(format!("{:?}", s.shards))
                }
            }
        },
    )
    .await;
    // What the copier wrote: the honest replica's commitment and reveal, byte for byte.
    let statuses = |member: &'static str| {
        let fed = &fed;
        async move {
            let m = fed.plane.cluster(member).expect("member");
            Api::<ComputeTask>::namespaced(m.client().await.expect("client"), SYSTEM_NAMESPACE)
                .list(&ListParams::default())
                .await
                .expect("tasks")
                .items
        }
    };
    let tasks = statuses("edge-a").await;
    let on = |node: &str| {
        tasks
            .iter()
            .find(|t| t.spec.node_name == node)
            .cloned()
            .unwrap_or_else(|| panic!("a task on {node}"))
    };
    let (honest, copier) = (on("edge-a-node-0"), on("edge-a-node-1"));
    let (h, c) = (
        honest.status.clone().expect("status"),
        copier.status.clone().expect("status"),
    );
    // The honest reveal is sealed for the operator: nothing in the cluster to read or copy
    // but the opaque box, which the copier took as it was.
    assert!(h.commitment.is_some() && h.sealed_reveal.is_some(), "{h:?}");
    assert!(
        h.result_digest.is_none() && h.salt.is_none() && h.metrics.is_empty(),
        "the result is not readable by other agents: {h:?}"
    );
    assert_eq!(c.commitment, h.commitment, "copied the commitment");
    assert_eq!(c.sealed_reveal, h.sealed_reveal, "copied the sealed reveal");
    assert_ne!(
        copier.spec.nonce, honest.spec.nonce,
        "each task has its own nonce"
    );
    assert!(
        seen.shards.iter().all(|x| x.phase != TaskPhase::Committed),
        "both revealed: {:?}",
        seen.shards
    );
    // A third, honest replica completes the quorum with the first.
    let _third = start("edge-a", "edge-a-node-2", false, false);
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "copied",
        JobPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let uid = done.metadata.uid.clone().expect("uid");
    let paid = receipts(&fed, &uid, 2).await;
    let nodes: Vec<&str> = paid.iter().map(|p| p.3.as_str()).collect();
    assert_eq!(nodes.len(), 2, "{paid:?}");
    assert!(
        !nodes.contains(&"edge-a-node-1"),
        "the copier is not paid: {paid:?}"
    );
    // The inflating node is paid at most what the operator saw: the median of the agreeing
    // replicas' (reportedAt - dispatchedAt) x 1 core (the job named no CPU), and no GPU time
    // on a CPU job.
    let claimed = h.usage.clone().expect("usage");
    assert!(claimed.gpu_millis >= 3_600_000, "{claimed:?}");
    let observed = done
        .status
        .as_ref()
        .expect("status")
        .shards
        .iter()
        .filter(|x| x.node != "edge-a-node-1")
        .filter_map(|x| {
            Some(
                x.reported_at
                    .as_ref()?
                    .0
                    .duration_since(x.dispatched_at.as_ref()?.0)
                    .as_millis() as u64,
            )
        })
        .max()
        .expect("the agreeing replicas' windows");
    let receipt = ledger::receipts_json(&plugin(), &fed.plane.hub().kubeconfig, Some(&uid))
        .into_iter()
        .find(|r| r["node"] == "edge-a-node-0")
        .expect("the inflating node's receipt");
    let cpu = receipt["cpuCoreMillis"].as_u64().expect("cpuCoreMillis");
    assert!(
        cpu <= observed && cpu < claimed.cpu_core_millis,
        "paid {cpu} core-ms for {observed} ms observed, {} claimed",
        claimed.cpu_core_millis
    );
    assert_eq!(receipt["gpuMillis"].as_u64(), Some(0), "{receipt}");
    // Each agent keeps the latest signed ledger checkpoint it was shown, on its Lease: the
    // contributor's evidence of the history the hub showed it.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(
        fed.plane
            .cluster("edge-a")
            .expect("edge-a")
            .client()
            .await
            .expect("client"),
        SYSTEM_NAMESPACE,
    );
    let pools: Api<edgeloom_crds::EdgePool> = Api::all(fed.hub.clone());
    wait::until(
        "the honest agent to keep the pool's latest checkpoint",
        Duration::from_secs(60),
        || {
            let (leases, pools) = (leases.clone(), pools.clone());
            async move {
                let signed = pools
                    .get("edge")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .and_then(|s| s.rewards)
                    .and_then(|r| r.checkpoint)
                    .ok_or("no checkpoint in the pool's status")?;
                let kept: serde_json::Value = leases
                    .get("edge-a-node-0")
                    .await
                    .map_err(|e| e.to_string())?
                    .metadata
                    .annotations
                    .and_then(|a| a.get("edgeloom.io/ledger-checkpoints").cloned())
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .ok_or("no checkpoint on the Lease")?;
                let kept = &kept["edge"];
                if signed.size >= 2
                    && kept["size"] == signed.size
                    && kept["root"] == signed.root.as_str()
                    && kept["signature"] == signed.signature.as_str()
                {
                    Ok(())
                } else {
                    Err(format!("kept {kept}, signed {signed:?}"))
                }
            }
        },
    )
    .await;
    // Caught: its trust record shows it, with a RevealRejected event.
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    let trust = wait::until_some("the copier's record", Duration::from_secs(30), || {
        let kubeconfig = kubeconfig.clone();
        async move {
            let out = ledger::plugin(&plugin(), &kubeconfig, &["ledger", "trust"]);
            out.stdout
                .lines()
                .find(|l| l.starts_with("edge-a/edge-a-node-1"))
                .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        }
    })
    .await;
    // NODE VERIFIED STREAK CAUGHT ...
    assert_eq!(trust[1..4], ["0", "0", "1"], "{trust:?}");
    let events: Vec<String> =
        Api::<k8s_openapi::api::core::v1::Event>::namespaced(fed.hub.clone(), &ns)
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("RevealRejected"))
            .filter_map(|e| e.message)
            .collect();
    assert!(
        events.iter().any(|m| m.contains("edge-a/edge-a-node-1")),
        "{events:?}"
    );
}

#[tokio::test]
async fn prometheus_scrapes_operator_and_agents_and_every_dashboard_query_and_alert_evaluates() {
    use edgeloom_e2e::prometheus::{self, Prometheus};
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start_bare(&["edge-a", "edge-b"], 2)
        .await
        .expect("federation");
    fed.apply_pool("edge", 6, 1).await.expect("pool");
    let start = |member: &str, node: &str, cheat: bool| {
        let spec = AgentSpec {
            member: member.into(),
            node: node.into(),
            account: format!("acct-{node}"),
            datasets: BTreeMap::new(),
            cheat,
            copy_peers: false,
            inflate_usage: false,
            poison: None,
        };
        fed.agent(&bin("edgeloom-agent"), &bin("edgeloom-runner"), &spec)
            .expect("agent")
    };
    let agents = vec![
        start("edge-a", "edge-a-node-0", false),
        start("edge-a", "edge-a-node-1", false),
        start("edge-b", "edge-b-node-0", false),
        start("edge-b", "edge-b-node-1", true),
    ];
    let op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    // The chart's alert rules, checked by promtool, loaded into a real Prometheus that
    // scrapes the operator and every agent each second.
    let rules = fed.plane.dir().join("edgeloom-rules.yml");
    let spec = prometheus::write_chart_rules(&rules).expect("rules");
    prometheus::promtool_check_rules(&rules).expect("promtool");
    let prom = Prometheus::start(
        fed.plane.dir(),
        &[
            ("edgeloom-operator", vec![op.port]),
            ("edgeloom-agent", agents.iter().map(|a| a.port).collect()),
        ],
        Some(&rules),
    )
    .await
    .expect("prometheus");
    eprintln!("prometheus at {}", prom.url());
    prom.wait_targets_up(5, Duration::from_secs(30))
        .await
        .expect("every target scraped");

    // Work that exercises every part: 2 shards x 2 replicas on the 4 nodes, one of them a
    // cheater that a third replica outvotes.
    let ns = fed.namespace("observed").await.expect("ns");
    let job = "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: observed\nspec:\n  workload:\n    kind: Train\n    model:\n      builtin: Linear\n    dataset:\n      builtin: Digits\n    parameters:\n      epochs: 5\n  shards: 2\n  verification:\n    replicas: 2\n";
    manifests::apply_all(&fed.hub, job, &ns, false)
        .await
        .expect("job");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "observed",
        JobPhase::Succeeded,
        Duration::from_secs(240),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    receipts(&fed, &done.metadata.uid.clone().expect("uid"), 4).await;
    // Let Prometheus scrape the final state.
    wait::until_true(
        "Prometheus to see the finished job and its rewards",
        Duration::from_secs(30),
        || {
            let prom = &prom;
            async move {
                // (The counters start at 0, so "> 0" means the event was scraped.)
                let finished = prom
                    .query("edgeloom_operator_jobs_finished_total{phase=\"Succeeded\"} > 0")
                    .await
                    .unwrap_or_default();
                let receipts = prom
                    .query("edgeloom_operator_ledger_receipts >= 4")
                    .await
                    .unwrap_or_default();
                let outvoted = prom
                    .query("edgeloom_operator_verification_results_total{verdict=\"outvoted\"} > 0")
                    .await
                    .unwrap_or_default();
                !finished.is_empty() && !outvoted.is_empty() && !receipts.is_empty()
            }
        },
    )
    .await;
    // Rate and increase windows need a few more samples after the last change.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Every target is up.
    let targets = prom.api("/api/v1/targets").await.expect("targets");
    let active = targets["data"]["activeTargets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(active.len(), 5, "{targets}");
    for t in &active {
        assert_eq!(t["health"], "up", "{t}");
    }
    // Every rule loaded and evaluates without error.
    let loaded = prom.api("/api/v1/rules").await.expect("rules");
    let mut rule_count = 0;
    for g in loaded["data"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            rule_count += 1;
            assert_eq!(r["health"], "ok", "{r}");
        }
    }
    let alerts = prometheus::alerts(&spec);
    assert_eq!(rule_count, alerts.len(), "{loaded}");

    // Every dashboard panel's query evaluates, and returns data unless its description
    // says when it is empty (GPU panels on this GPU-less machine, error panels).
    let mut report = Vec::new();
    for q in prometheus::dashboard_queries().expect("dashboard") {
        let result = prom
            .query(&q.expr)
            .await
            .unwrap_or_else(|e| panic!("panel {:?}: {e}", q.title));
        report.push(format!("{:<32} {} series", q.title, result.len()));
        assert!(
            !result.is_empty() || q.may_be_empty(),
            "panel {:?} returned no data: {}",
            q.title,
            q.expr
        );
    }
    eprintln!("{}", report.join("\n"));

    // Every alert expression evaluates; in this healthy federation only the verification
    // alert has data (the cheater was outvoted).
    let mut firing = Vec::new();
    for (name, expr) in &alerts {
        let result = prom
            .query(expr)
            .await
            .unwrap_or_else(|e| panic!("alert {name}: {e}"));
        if !result.is_empty() {
            firing.push(name.clone());
        }
    }
    let debug = prom
        .api(&format!(
            "/api/v1/query?query={}",
            edgeloom_e2e::scrape::encode("edgeloom_operator_verification_results_total[1h]")
        ))
        .await;
    assert_eq!(
        firing,
        ["EdgeloomVerificationMismatches"],
        "alerts with data; verification samples: {debug:?}"
    );

    // A member cluster goes away: its unreachable and lost-heartbeat alerts have data.
    fed.plane.kill_apiserver("edge-b").expect("kill");
    for name in [
        "EdgeloomMemberClusterUnreachable",
        "EdgeloomNodeHeartbeatsLost",
    ] {
        let expr = alerts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| e.clone())
            .expect("alert");
        wait::until_some(
            &format!("{name} to have data"),
            Duration::from_secs(60),
            || {
                let prom = &prom;
                let expr = expr.clone();
                async move {
                    let r = prom.query(&expr).await.ok()?;
                    r.iter()
                        .any(|s| s["metric"]["cluster"] == "edge-b")
                        .then_some(())
                }
            },
        )
        .await;
    }
    drop(agents);
}

#[test]
fn the_charts_agent_configuration_is_one_the_agent_accepts() {
    let rendered = edgeloom_e2e::helm::template(&[
        "agent.maxTasks=3",
        "agent.datasets.clinic-records=/data/clinic.csv",
    ])
    .expect("helm template");
    let cm = manifests::parse(&rendered)
        .expect("yaml")
        .into_iter()
        .find(|o| {
            o.types.as_ref().is_some_and(|t| t.kind == "ConfigMap")
                && o.metadata.name.as_deref() == Some("edgeloom-agent")
        })
        .expect("the agent's ConfigMap");
    let text = cm.data["data"]["agent.yaml"].as_str().expect("agent.yaml");
    let path = std::env::temp_dir().join(format!("edgeloom-agent-{}.yaml", std::process::id()));
    std::fs::write(&path, text).expect("write");
    let mut config = edgeloom_agent::config::Config::from_file(&path).expect("the agent parses it");
    std::fs::remove_file(&path).ok();
    config.node = "from-the-downward-api".into();
    config.validate().expect("valid");
    assert_eq!(
        config.account, None,
        "the account is the platform team's label"
    );
    assert_eq!(config.max_tasks, 3);
    assert_eq!(
        config
            .datasets
            .get("clinic-records")
            .map(|p| p.display().to_string()),
        Some("/data/clinic.csv".into())
    );
    assert_eq!(config.runner, Path::new("/usr/local/bin/edgeloom-runner"));
}

#[tokio::test]
async fn a_result_finished_while_its_api_server_was_down_is_reported_after_an_agent_restart_and_paid_once()
 {
    let _slot = SLOTS.acquire().await.expect("slot");
    // A heartbeat timeout longer than the outage: the attempt stays current throughout.
    let (mut fed, mut agents) = federation(120).await;
    let _op = fed
        .operator(&bin("edgeloom-operator"), "op-1")
        .expect("operator");
    let ns = fed.namespace("outage").await.expect("ns");
    manifests::apply_all(&fed.hub, LONG_JOB, &ns, false)
        .await
        .expect("job");
    let first = jobs::first_running_shard(&fed, &ns, "long", Duration::from_secs(120)).await;
    // The member's API server goes away while the task runs.
    fed.plane.kill_apiserver(&first.cluster).expect("kill");
    let i = agents
        .iter()
        .position(|a| a.node == first.node)
        .expect("the agent running it");
    wait::until_true(
        "the agent finished the task and kept its result",
        Duration::from_secs(120),
        || {
            let tail = agents[i].process.log_tail(50);
            std::future::ready(tail.contains("it is kept to report when the API server answers"))
        },
    )
    .await;
    // The agent dies too, with the result only on its disk; then both come back.
    agents[i].process.kill();
    fed.plane
        .restart_apiserver(&first.cluster)
        .await
        .expect("restart");
    let spec = AgentSpec {
        member: first.cluster.clone(),
        node: first.node.clone(),
        account: format!("acct-{}", first.node),
        datasets: BTreeMap::new(),
        cheat: false,
        copy_peers: false,
        inflate_usage: false,
        poison: None,
    };
    agents[i] = fed
        .agent(&bin("edgeloom-agent"), &bin("edgeloom-runner"), &spec)
        .expect("agent restarted");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "long",
        JobPhase::Succeeded,
        // The job trains 60 epochs: on a loaded 2-core machine that alone can take
        // over 2 minutes (a fresh-clone CI run saw epoch 55 at 120 s).
        Duration::from_secs(300),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shard = done.status.clone().expect("status").shards[0].clone();
    assert_eq!(
        (shard.attempt, shard.node.as_str()),
        (1, first.node.as_str()),
        "the result of the attempt that ran through the outage counts"
    );
    assert!(
        agents[i]
            .process
            .log_tail(200)
            .contains("reported a result kept while the API server did not answer"),
        "{}",
        agents[i].process.log_tail(40)
    );
    let uid = done.metadata.uid.clone().expect("uid");
    let paid = receipts(&fed, &uid, 1).await;
    assert_eq!(paid.len(), 1, "paid exactly once: {paid:?}");
    assert_eq!((paid[0].2, paid[0].3.as_str()), (1, first.node.as_str()));
}
