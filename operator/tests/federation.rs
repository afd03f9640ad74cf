//! The operator on real kube-apiservers: a hub and member clusters, simulated agents
//! (until the real agent is in e2e), the real edgeloom-operator binary. Tests run one at a
//! time: each starts its own federation.

use edgeloom_crds::compute_task::ComputeTask;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::{ComputeJob, JobPhase, TaskPhase};
use edgeloom_e2e::federation::Federation;
use edgeloom_e2e::{jobs, ledger, manifests, scrape, wait};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, DeleteParams, ListParams};
use std::path::Path;
use std::time::Duration;

/// Federations running at once in this file: each is a hub and its members (etcd, API
/// servers, an operator, agents), mostly waiting on timeouts, so two at a time halve the
/// file's wall time on 2 cores without starving either.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

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

#[tokio::test]
async fn a_job_spread_over_two_member_clusters_completes() {
    let _slot = SLOTS.acquire().await.expect("slot");
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
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "spread",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
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
    let events = jobs::events_of(&fed, &ns, "spread").await;
    assert!(
        events.iter().filter(|(r, _)| r == "Placed").count() >= 1,
        "{events:?}"
    );
    assert!(events.iter().any(|(r, _)| r == "Succeeded"), "{events:?}");

    // The kubectl plugin shows the same, from the real API.
    // What Prometheus would scrape.
    let (code, metrics) = scrape::get(_op.port, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    for wanted in [
        "edgeloom_operator_reconcile_total{controller=\"computejob\"}",
        "edgeloom_operator_reconcile_total{controller=\"edgepool\"}",
        "edgeloom_operator_tasks_created_total 4",
        "edgeloom_operator_placement_duration_seconds_count",
        "edgeloom_operator_queue_depth 0",
        "edgeloom_operator_member_cluster_reachable{cluster=\"edge-a\",pool=\"edge\"} 1",
        "edgeloom_operator_jobs_finished_total{phase=\"Succeeded\"} 1",
        "edgeloom_operator_leader 1",
    ] {
        assert!(metrics.contains(wanted), "missing {wanted} in\n{metrics}");
    }
    assert_eq!(
        scrape::get(_op.port, "/healthz").await.expect("healthz").0,
        200
    );

    let plugin = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kubectl-edgeloom"))
            .arg("--kubeconfig")
            .arg(&fed.plane.hub().kubeconfig)
            .args(args)
            .output()
            .expect("kubectl-edgeloom runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // The pool's status is refreshed every few seconds: on a loaded machine the first
    // refresh after the members connected can come after the job's end.
    let status = wait::until(
        "both members reachable in `kubectl edgeloom status`",
        Duration::from_secs(30),
        || {
            let status = plugin(&["status"]);
            async move {
                if status.contains("2/2") && status.contains("4/4") {
                    Ok(status)
                } else {
                    Err(status)
                }
            }
        },
    )
    .await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("spread") && l.contains("Succeeded")),
        "{status}"
    );
    let described = plugin(&["describe", "job", "spread", "-n", &ns]);
    assert!(
        described.contains("Phase:       Succeeded  (4/4)"),
        "{described}"
    );
    assert_eq!(
        described
            .lines()
            .filter(|l| l.contains("Succeeded") && l.contains("edge-"))
            .count(),
        4,
        "{described}"
    );
    assert!(described.contains("Placed"), "{described}");
    eprintln!("{status}\n{described}");

    // A finished job's verdict is frozen: deleting its tasks changes nothing in its status.
    let before = job(&fed, &ns, "spread").await.status;
    let reconciles = || async {
        let (_, m) = scrape::get(_op.port, "/metrics").await.expect("metrics");
        m.lines()
            .find(|l| l.starts_with("edgeloom_operator_reconcile_total{controller=\"computejob\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    for m in fed.plane.members() {
        Api::<ComputeTask>::namespaced(m.client().await.expect("client"), SYSTEM_NAMESPACE)
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&format!("edgeloom.io/job-uid={uid}")),
            )
            .await
            .expect("tasks deleted");
    }
    wait::until_true("the tasks gone", Duration::from_secs(30), || async {
        all_tasks(&fed, &uid).await.is_empty()
    })
    .await;
    // Poke the job so that it is reconciled once more with its tasks gone.
    let seen = reconciles().await;
    Api::<ComputeJob>::namespaced(fed.hub.clone(), &ns)
        .patch(
            "spread",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {"test.edgeloom.io/poke": "1"}}}),
            ),
        )
        .await
        .expect("poked");
    wait::until_true(
        "the job reconciled once more",
        Duration::from_secs(30),
        || async { reconciles().await > seen },
    )
    .await;
    assert_eq!(job(&fed, &ns, "spread").await.status, before);
}

async fn all_tasks(fed: &Federation, uid: &str) -> Vec<ComputeTask> {
    let mut all = Vec::new();
    for m in fed.plane.members() {
        all.extend(tasks_in(fed, &m.name, uid).await);
    }
    all
}

#[tokio::test]
async fn a_gang_job_that_cannot_fit_fails_after_its_timeout_with_the_reason() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("gang").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml(
            "gang",
            6,
            "  placement:\n    gang: true\n    gangTimeoutSeconds: 5\n",
        ),
    )
    .await;
    let failed =
        jobs::wait_phase(&fed, &ns, "gang", JobPhase::Failed, Duration::from_secs(60)).await;
    jobs::assert_truthful(&fed, &failed).await;
    let status = failed.status.expect("status");
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(cond.reason, "Unschedulable");
    assert!(
        cond.message.contains("within 5s") && cond.message.contains("0/4 nodes fit"),
        "{}",
        cond.message
    );
    assert!(
        all_tasks(&fed, &failed.metadata.uid.expect("uid"))
            .await
            .is_empty(),
        "a failed gang creates no task"
    );
    let events = jobs::events_of(&fed, &ns, "gang").await;
    assert!(
        events.iter().any(|(r, _)| r == "Unschedulable"),
        "{events:?}"
    );
    assert!(events.iter().any(|(r, _)| r == "Failed"), "{events:?}");
}

#[tokio::test]
async fn a_lost_heartbeat_mid_task_is_replaced_and_completes_exactly_once() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(8))
        .await
        .expect("federation");
    fed.apply_pool("edge", 5, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("heartbeat").await.expect("ns");
    apply(&fed, &ns, &job_yaml("hb", 1, "")).await;
    let running = jobs::wait_running(&fed, &ns, "hb", 1, Duration::from_secs(60)).await;
    let first = running.status.expect("status").shards[0].clone();
    assert_eq!(first.attempt, 1);
    fed.agents[&first.cluster].kill(&first.node);
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "hb",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shard = done.status.clone().expect("status").shards[0].clone();
    assert_eq!(shard.attempt, 2, "re-placed with attempt + 1");
    assert_ne!(
        (shard.cluster.clone(), shard.node.clone()),
        (first.cluster.clone(), first.node.clone())
    );
    let tasks = all_tasks(&fed, &done.metadata.uid.clone().expect("uid")).await;
    let summary: Vec<(u32, Option<TaskPhase>)> = tasks
        .iter()
        .map(|t| (t.spec.attempt, t.status.as_ref().and_then(|s| s.phase)))
        .collect();
    assert_eq!(
        summary,
        [(2, Some(TaskPhase::Succeeded))],
        "the lost attempt was cancelled; one completion"
    );
    let events = jobs::events_of(&fed, &ns, "hb").await;
    assert!(
        events.iter().any(|(r, m)| r == "Replaced"
            && m.contains("attempt 2")
            && m.contains("was lost while running")),
        "the event says why the attempt was replaced: {events:?}"
    );
    // Only the accepted attempt is paid: one receipt, attempt 2, the second node.
    let uid = done.metadata.uid.clone().expect("uid");
    let paid = wait_receipts(&fed, &uid, 1).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!((paid[0].2, paid[0].3.as_str()), (2, shard.node.as_str()));
    assert_eq!(
        paid[0].5, "0.0002",
        "2 core-seconds at 0.0001 per core-second"
    );
}

/// Pool `edge`'s ledger log in the object store the operator's Secret names (what someone
/// with write access to the bucket could change).
async fn ledger_log(
    fed: &Federation,
) -> (
    std::sync::Arc<dyn object_store::ObjectStore>,
    object_store::path::Path,
) {
    use edgeloom_operator::rewards::backend::{STORE_SECRET, StoreConfig};
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(fed.hub.clone(), SYSTEM_NAMESPACE);
    let secret = secrets.get(STORE_SECRET).await.expect("store Secret");
    let backend = StoreConfig::from_secret(&secret)
        .expect("store config")
        .open()
        .expect("store");
    let prefix = edgeloom_operator::rewards::objects::log_prefix(&backend.root, "edge");
    (backend.store, prefix)
}

/// Rewrites, in place, the object of pool `edge`'s log holding entry `seq`: `edit` gets its
/// lines and the index of that entry's line. Returns the object's name and the line (from 1).
async fn rewrite_object(
    fed: &Federation,
    seq: u64,
    edit: impl Fn(&mut Vec<String>, usize),
) -> (String, usize) {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let (store, prefix) = ledger_log(fed).await;
    let objects: Vec<object_store::ObjectMeta> =
        store.list(Some(&prefix)).try_collect().await.expect("list");
    for m in objects {
        let text = String::from_utf8(
            store
                .get(&m.location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes")
                .to_vec(),
        )
        .expect("utf8");
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let at = lines.iter().position(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["seq"] == seq)
        });
        if let Some(at) = at
            && m.location.as_ref().contains("/entries/")
        {
            edit(&mut lines, at);
            if lines.is_empty() {
                store.delete(&m.location).await.expect("deleted");
            } else {
                let body = lines.join("\n") + "\n";
                store
                    .put(&m.location, body.into())
                    .await
                    .expect("rewritten");
            }
            return (m.location.to_string(), at + 1);
        }
    }
    panic!("no object holds entry {seq}");
}

fn plugin_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kubectl-edgeloom"))
}

type Paid = (u64, u64, u64, String, String, String);

/// Waits until the job has `n` receipts in the ledgers (read with `kubectl edgeloom
/// ledger export`), then returns them.
async fn wait_receipts(fed: &Federation, uid: &str, n: usize) -> Vec<Paid> {
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    wait::until_true(
        &format!("{n} receipt(s) for job {uid}"),
        Duration::from_secs(30),
        || {
            let kubeconfig = kubeconfig.clone();
            async move {
                ledger::receipts_of(&ledger::export(plugin_bin(), &kubeconfig), uid).len() >= n
            }
        },
    )
    .await;
    ledger::receipts_of(&ledger::export(plugin_bin(), &kubeconfig), uid)
}

#[tokio::test]
async fn an_operator_killed_between_a_result_and_its_receipt_pays_exactly_once() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    // The first operator dies (abort, like kill -9) right after its first ledger write,
    // before the job's status says anything about it.
    let mut crashing = fed
        .operator_with_env(
            operator_bin(),
            "op-1",
            &[("EDGELOOM_FAILPOINT", "after-ledger-append")],
        )
        .expect("operator");
    let ns = fed.namespace("crash").await.expect("ns");
    apply(&fed, &ns, &job_yaml("crash", 3, "")).await;
    wait::until_true(
        "the operator hit its failpoint",
        Duration::from_secs(90),
        || std::future::ready(crashing.process.exited().is_some()),
    )
    .await;
    assert!(
        crashing
            .log_tail(5)
            .contains("failpoint after-ledger-append"),
        "{}",
        crashing.log_tail(20)
    );
    let before = job(&fed, &ns, "crash").await;
    let uid = before.metadata.uid.clone().expect("uid");
    let written = ledger::receipts_of(
        &ledger::export(plugin_bin(), &fed.plane.hub().kubeconfig),
        &uid,
    );
    assert!(
        !written.is_empty(),
        "the receipt was written before the crash"
    );
    assert!(
        before
            .status
            .as_ref()
            .and_then(|s| s.rewards.as_ref())
            .is_none(),
        "the status was not: {:?}",
        before.status
    );
    // A fresh operator finishes the job and pays every shard exactly once.
    let _op = fed.operator(operator_bin(), "op-2").expect("operator");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "crash",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful_after_restart(&fed, &done).await;
    let paid = wait_receipts(&fed, &uid, 3).await;
    let slots: Vec<(u64, u64)> = paid.iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(
        slots,
        [(0, 0), (1, 0), (2, 0)],
        "one receipt per shard: {paid:?}"
    );
    for p in &written {
        assert!(
            paid.contains(p),
            "the receipt written before the crash stands: {p:?}"
        );
    }
    let verify = ledger::plugin(
        plugin_bin(),
        &fed.plane.hub().kubeconfig,
        &["ledger", "verify"],
    );
    assert_eq!(verify.code, Some(0), "{verify:?}");
    assert!(verify.stdout.contains("3 entries"), "{}", verify.stdout);
    // Status comes from the ledger: wait for it to catch up.
    let rewards = wait::until_some("job rewards in status", Duration::from_secs(30), || {
        let fed = &fed;
        let ns = ns.clone();
        async move {
            job(fed, &ns, "crash")
                .await
                .status
                .and_then(|s| s.rewards)
                .filter(|r| r.receipts == 3)
        }
    })
    .await;
    assert_eq!(
        rewards.total.as_deref(),
        Some("0.0006 credits"),
        "{paid:?} {:?}",
        done.status
    );
    assert_eq!(
        done.status.as_ref().expect("status").progress.as_deref(),
        Some("3/3")
    );
    let pool = wait::until_some("pool rewards in status", Duration::from_secs(30), || {
        let hub = fed.hub.clone();
        async move {
            Api::<edgeloom_crds::EdgePool>::all(hub)
                .get("edge")
                .await
                .ok()
                .and_then(|p| p.status)
                .and_then(|s| s.rewards)
                .filter(|r| r.receipts == 3)
        }
    })
    .await;
    assert_eq!(pool.total.as_ref().map(|d| d.0.as_str()), Some("0.0006"));
    assert_eq!(pool.ledger_head.as_ref().map(String::len), Some(64));
    // The pool's totals per account are exactly the receipts' (where the shards ran is
    // the scheduler's business: a shard may run on a node another one finished on).
    let mut by_account: std::collections::BTreeMap<String, u64> = Default::default();
    for p in &paid {
        let amount: f64 = p.5.parse().expect("amount");
        *by_account.entry(p.4.clone()).or_default() += (amount * 1e4).round() as u64;
    }
    let pool_accounts: std::collections::BTreeMap<String, u64> = pool
        .by_account
        .iter()
        .map(|(a, d)| {
            let amount: f64 = d.0.parse().expect("amount");
            (a.clone(), (amount * 1e4).round() as u64)
        })
        .collect();
    assert_eq!(
        pool_accounts, by_account,
        "the pool's per-account totals match its receipts: {paid:?} {:?}",
        done.status
    );
}

#[tokio::test]
async fn an_altered_ledger_entry_is_named_by_ledger_verify() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("tamper").await.expect("ns");
    apply(&fed, &ns, &job_yaml("tamper", 4, "")).await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "tamper",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    wait_receipts(&fed, &done.metadata.uid.clone().expect("uid"), 4).await;
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    let balance = ledger::plugin(plugin_bin(), &kubeconfig, &["ledger", "balance"]);
    assert_eq!(balance.code, Some(0), "{balance:?}");
    let total = balance
        .stdout
        .lines()
        .find(|l| l.starts_with("TOTAL"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>());
    assert_eq!(
        total,
        Some(vec!["TOTAL", "0.0008", "credits", "4"]),
        "{}",
        balance.stdout
    );

    // Someone with write access to the bucket raises the amount of the third entry.
    let (name, line) = rewrite_object(&fed, 2, |lines, at| {
        lines[at] = lines[at].replace("\"amount\":\"0.0002\"", "\"amount\":\"20.0002\"");
    })
    .await;
    let verify = ledger::plugin(plugin_bin(), &kubeconfig, &["ledger", "verify"]);
    assert_eq!(verify.code, Some(1), "{verify:?}");
    assert!(
        verify.stdout.contains("ledger entry 2 (seq 2) is broken")
            && verify.stdout.contains("altered")
            && verify.stdout.contains(&format!("{name} line {line}")),
        "{}",
        verify.stdout
    );
    // The operator notices too, says so on the pool, and stops writing receipts.
    jobs::wait_pool_condition(
        &fed,
        "edge",
        "LedgerVerified",
        "False",
        &["ledger entry 2"],
        Duration::from_secs(30),
    )
    .await;
    let (_, metrics) = scrape::get(op.port, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains("edgeloom_operator_ledger_intact{pool=\"edge\"} 0"),
        "{metrics}"
    );
    apply(&fed, &ns, &job_yaml("after", 1, "")).await;
    jobs::wait_phase(
        &fed,
        &ns,
        "after",
        JobPhase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let paid = jobs::wait_job_condition(
        &fed,
        &ns,
        "after",
        "Paid",
        "False",
        &["ledger entry 2"],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(paid.reason, "LedgerUnavailable");
    let after = ledger::plugin(plugin_bin(), &kubeconfig, &["ledger", "export"]);
    assert_eq!(
        after.stdout.lines().count(),
        4,
        "nothing appended to a broken chain"
    );
}

#[tokio::test]
async fn a_job_stops_placing_when_its_budget_would_be_exceeded() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 1, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("budget").await.expect("ns");
    // One node, one slot: shards run one after another at 0.0002 credits each. After the
    // first is paid, a second would bring the total to 0.0004 > 0.0003.
    apply(
        &fed,
        &ns,
        &job_yaml("budget", 3, "  budget:\n    maxAmount: \"0.0003\"\n"),
    )
    .await;
    let failed = jobs::wait_phase(
        &fed,
        &ns,
        "budget",
        JobPhase::Failed,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful(&fed, &failed).await;
    let status = failed.status.expect("status");
    let cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "BudgetExceeded")
        .expect("BudgetExceeded condition");
    assert_eq!(cond.status, "True");
    assert!(
        cond.message.contains("budget 0.0003 reached: 0.0002 spent"),
        "{}",
        cond.message
    );
    let failed_cond = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed");
    assert_eq!(failed_cond.reason, "BudgetExceeded");
    assert_eq!(status.progress.as_deref(), Some("1/3"));
    let uid = failed.metadata.uid.expect("uid");
    assert_eq!(wait_receipts(&fed, &uid, 1).await.len(), 1);
    assert_eq!(
        all_tasks(&fed, &uid).await.len(),
        1,
        "nothing placed past the budget"
    );
}

#[tokio::test]
async fn a_killed_member_apiserver_fails_over_and_is_cleaned_when_it_returns() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(12))
        .await
        .expect("federation");
    fed.apply_pool("edge", 5, 2).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("failover").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml("fo", 2, "  placement:\n    spread: Cluster\n"),
    )
    .await;
    let running = jobs::wait_running(&fed, &ns, "fo", 2, Duration::from_secs(60)).await;
    let uid = running.metadata.uid.clone().expect("uid");
    assert_eq!(
        running.status.clone().expect("status").placement.as_deref(),
        Some("edge-a:1,edge-b:1")
    );
    fed.plane.kill_apiserver("edge-a").expect("kill");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "fo",
        JobPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let status = done.status.expect("status");
    assert_eq!(
        status.placement.as_deref(),
        Some("edge-b:2"),
        "{:?}",
        status.shards
    );
    let moved = status
        .shards
        .iter()
        .find(|s| s.attempt == 2)
        .expect("one shard re-placed");
    assert_eq!(moved.cluster, "edge-b");
    fed.plane
        .restart_apiserver("edge-a")
        .await
        .expect("restart");
    // When edge-a answers again, its stale attempt is cancelled (or finished late and is
    // ignored): nothing of the job keeps running there, and the result stands.
    wait::until(
        "edge-a holds no unfinished task of the job",
        Duration::from_secs(60),
        || {
            let fed = &fed;
            let uid = uid.clone();
            async move {
                let left: Vec<String> = tasks_in(fed, "edge-a", &uid)
                    .await
                    .into_iter()
                    .filter(|t| {
                        !matches!(
                            t.status.as_ref().and_then(|s| s.phase),
                            Some(TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::Cancelled)
                        )
                    })
                    .map(|t| t.metadata.name.unwrap_or_default())
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
    let after = job(&fed, &ns, "fo").await.status.expect("status");
    assert_eq!(
        after.placement.as_deref(),
        Some("edge-b:2"),
        "a late result never replaces the accepted attempt"
    );
    assert_eq!(after.phase, Some(JobPhase::Succeeded));
}

#[tokio::test]
async fn an_operator_killed_mid_job_restarts_without_duplicate_tasks() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(5))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let mut op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("restart").await.expect("ns");
    apply(&fed, &ns, &job_yaml("rs", 4, "")).await;
    let uid = wait::until("the job's uid", Duration::from_secs(10), || async {
        job(&fed, &ns, "rs")
            .await
            .metadata
            .uid
            .ok_or_else(|| "no uid".to_string())
    })
    .await;
    wait::until("a first task", Duration::from_secs(60), || {
        let (fed, uid) = (&fed, uid.clone());
        async move {
            let n = all_tasks(fed, &uid).await.len();
            if n > 0 { Ok(()) } else { Err("none".into()) }
        }
    })
    .await;
    op.kill();
    let _op2 = fed
        .operator(operator_bin(), "op-2")
        .expect("operator restarted");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "rs",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful_after_restart(&fed, &done).await;
    // One task per shard. A shard whose attempt 1 the first operator had issued (in the
    // job's status) but not created when it died gets attempt 2: an issued attempt number
    // is never used again, since its creation might still land.
    let mut names: Vec<(u32, u32)> = all_tasks(&fed, &uid)
        .await
        .iter()
        .map(|t| (t.spec.shard, t.spec.attempt))
        .collect();
    names.sort();
    assert_eq!(
        names.iter().map(|n| n.0).collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "exactly one task per shard: {names:?}"
    );
    assert!(names.iter().all(|n| n.1 <= 2), "{names:?}");
}

#[tokio::test]
async fn deleting_a_job_cleans_every_member_even_one_unreachable_since_an_operator_restart() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(300))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    let mut op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("delete").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml("del", 4, "  placement:\n    spread: Cluster\n"),
    )
    .await;
    let running = jobs::wait_running(&fed, &ns, "del", 4, Duration::from_secs(60)).await;
    let uid = running.metadata.uid.clone().expect("uid");
    assert_eq!(tasks_in(&fed, "edge-b", &uid).await.len(), 2);
    fed.plane.kill_apiserver("edge-b").expect("kill");
    // The operator restarts while edge-b is away: it never lists edge-b's tasks, and must
    // not take that for "none there".
    op.kill();
    let _op = fed.operator(operator_bin(), "op-2").expect("operator");
    let jobs: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    jobs.delete("del", &DeleteParams::default())
        .await
        .expect("delete");
    wait::until("edge-a cleaned", Duration::from_secs(60), || {
        let (fed, uid) = (&fed, uid.clone());
        async move {
            let n = tasks_in(fed, "edge-a", &uid).await.len();
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} left"))
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = jobs
        .get_opt("del")
        .await
        .expect("get")
        .expect("the finalizer holds the job while edge-b is unreachable");
    assert!(held.metadata.deletion_timestamp.is_some());
    fed.plane
        .restart_apiserver("edge-b")
        .await
        .expect("restart");
    wait::until("the job to be gone", Duration::from_secs(60), || {
        let jobs = jobs.clone();
        async move {
            match jobs.get_opt("del").await {
                Ok(None) => Ok(()),
                other => Err(format!(
                    "{:?}",
                    other.map(|j| j.map(|j| j.metadata.finalizers))
                )),
            }
        }
    })
    .await;
    assert!(
        tasks_in(&fed, "edge-b", &uid).await.is_empty(),
        "edge-b cleaned after it came back"
    );
    let events = jobs::events_of(&fed, &ns, "del").await;
    assert!(
        events.iter().any(|(r, _)| r == "CleanupPending"),
        "{events:?}"
    );
}

/// A log line without its terminal colour codes.
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// An operator that starts or takes over connects a pool's clusters one after another.
/// A job judged before all are connected would take the tasks of the others for vanished
/// ones: a finished, paid shard would run again (seen in the chaos run). Here edge-b is
/// connected 5 s after edge-a (a test failpoint), while the job's edge-b shard is done and
/// its edge-a shard still runs.
#[tokio::test]
async fn an_operator_taking_over_judges_a_job_only_once_every_member_is_connected() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(1))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    for n in ["edge-a-node-0", "edge-a-node-1"] {
        fed.agents["edge-a"].hang(n);
    }
    let mut op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("takeover").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml("takeover", 2, "  placement:\n    spread: Cluster\n"),
    )
    .await;
    let jobs_api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    let uid = wait::until("the edge-b shard done", Duration::from_secs(60), || {
        let jobs_api = jobs_api.clone();
        async move {
            let j = jobs_api.get("takeover").await.map_err(|e| e.to_string())?;
            let shards = j.status.clone().unwrap_or_default().shards;
            let done = shards
                .iter()
                .any(|s| s.cluster == "edge-b" && s.phase == TaskPhase::Succeeded);
            let running = shards
                .iter()
                .any(|s| s.cluster == "edge-a" && s.phase == TaskPhase::Running);
            if done && running {
                Ok(j.metadata.uid.clone().unwrap_or_default())
            } else {
                Err(format!("{shards:?}"))
            }
        }
    })
    .await;
    wait_receipts(&fed, &uid, 1).await;
    op.kill();
    let op2 = fed
        .operator_with_env(
            operator_bin(),
            "op-2",
            &[("EDGELOOM_FAILPOINT", "slow-connect-edge-b")],
        )
        .expect("operator");
    // op-2 leads once op-1's lease ran out, connects edge-a, and edge-b 5 s later.
    wait::until_true("op-2 to connect edge-b", Duration::from_secs(60), || {
        let tail = without_colours(&op2.log_tail(400));
        async move { tail.contains("member=edge/edge-b reachable=true") }
    })
    .await;
    for n in ["edge-a-node-0", "edge-a-node-1"] {
        fed.agents["edge-a"].resume(n);
    }
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "takeover",
        JobPhase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shards = done.status.clone().expect("status").shards;
    assert!(
        shards.iter().all(|s| s.attempt == 1),
        "a finished shard was placed again by the new leader: {shards:?}"
    );
    let paid = wait_receipts(&fed, &uid, 2).await;
    assert_eq!(paid.len(), 2, "{paid:?}");
    assert!(paid.iter().all(|p| p.2 == 1), "{paid:?}");
    assert!(
        op2.log_tail(2000).contains("failpoint slow-connect-edge-b"),
        "the failpoint slowed edge-b's connection"
    );
}

#[tokio::test]
async fn of_two_operator_replicas_only_the_leader_acts() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(1))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 2).await.expect("pool");
    let mut a = fed.operator(operator_bin(), "op-a").expect("operator a");
    let mut b = fed.operator(operator_bin(), "op-b").expect("operator b");
    let leases: Api<Lease> = Api::namespaced(fed.hub.clone(), SYSTEM_NAMESPACE);
    let leader = wait::until("a leader", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("edgeloom-operator")
                .await
                .map_err(|e| e.to_string())?
                .and_then(|l| l.spec.and_then(|s| s.holder_identity))
                .ok_or_else(|| "no holder".to_string())
        }
    })
    .await;
    let ns = fed.namespace("leader").await.expect("ns");
    apply(&fed, &ns, &job_yaml("one", 2, "")).await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "one",
        JobPhase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let creators: Vec<String> = all_tasks(&fed, &done.metadata.uid.expect("uid"))
        .await
        .iter()
        .filter_map(|t| {
            t.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("edgeloom.io/created-by"))
                .cloned()
        })
        .collect();
    assert_eq!(
        creators,
        vec![leader.clone(); 2],
        "every task was created by the leader"
    );
    let (leading, following) = if leader == "op-a" {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let gauge = |body: String| {
        body.lines()
            .find(|l| l.starts_with("edgeloom_operator_leader "))
            .map(str::to_string)
    };
    let follower_metrics = scrape::get(following.port, "/metrics")
        .await
        .expect("follower /metrics")
        .1;
    assert_eq!(
        gauge(follower_metrics).as_deref(),
        Some("edgeloom_operator_leader 0")
    );
    let leader_metrics = scrape::get(leading.port, "/metrics")
        .await
        .expect("leader /metrics")
        .1;
    assert_eq!(
        gauge(leader_metrics).as_deref(),
        Some("edgeloom_operator_leader 1")
    );
    assert_eq!(
        scrape::get(following.port, "/readyz")
            .await
            .expect("readyz")
            .0,
        200
    );
    let follower = following.identity.clone();
    leading.kill();
    apply(&fed, &ns, &job_yaml("two", 1, "")).await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "two",
        JobPhase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let creators: Vec<String> = all_tasks(&fed, &done.metadata.uid.expect("uid"))
        .await
        .iter()
        .filter_map(|t| {
            t.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("edgeloom.io/created-by"))
                .cloned()
        })
        .collect();
    assert_eq!(creators, vec![follower], "the follower took over");
}

#[tokio::test]
async fn a_bad_kubeconfig_is_a_pool_condition_and_fixing_the_secret_reconnects() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 1, Duration::from_secs(1))
        .await
        .expect("federation");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(fed.hub.clone(), SYSTEM_NAMESPACE);
    let good = secrets.get("edge-b-kubeconfig").await.expect("secret");
    let garbage = serde_json::json!({"data": {"kubeconfig": "bm90IGEga3ViZWNvbmZpZw=="}}); // "not a kubeconfig"
    secrets
        .patch(
            "edge-b-kubeconfig",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&garbage),
        )
        .await
        .expect("break the secret");
    let pool = serde_json::json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "EdgePool", "metadata": {"name": "edge"},
        "spec": {"clusters": [
            {"name": "edge-a", "kubeconfigSecret": {"name": "edge-a-kubeconfig"}},
            {"name": "edge-b", "kubeconfigSecret": {"name": "edge-b-kubeconfig"}},
            {"name": "edge-c", "kubeconfigSecret": {"name": "no-such-secret"}}],
            "rewards": {"perGpuSecond": "0", "perCpuCoreSecond": "0.0001", "unit": "credits"}}
    });
    manifests::apply_all(&fed.hub, &pool.to_string(), "default", false)
        .await
        .expect("pool");
    let op = fed.operator(operator_bin(), "op-1").expect("operator");
    let pools: Api<edgeloom_crds::EdgePool> = Api::all(fed.hub.clone());
    let status = wait::until(
        "pool status naming both problems",
        Duration::from_secs(60),
        || {
            let pools = pools.clone();
            async move {
                let s = pools
                    .get("edge")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                let cond = s
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "ClustersReachable")
                    .cloned();
                match cond {
                    Some(c)
                        if c.status == "False"
                            && c.message.contains("edge-b: kubeconfig is invalid")
                            && c.message.contains("no-such-secret not found")
                            && s.reachable.as_deref() == Some("1/3") =>
                    {
                        Ok(s)
                    }
                    other => Err(format!("{other:?} {:?}", s.reachable)),
                }
            }
        },
    )
    .await;
    let a = status
        .clusters
        .iter()
        .find(|c| c.name == "edge-a")
        .expect("edge-a");
    assert!(a.reachable && a.ready_nodes == 1, "{a:?}");
    // The operator kept running (no crash loop) and counts the problem.
    let (code, metrics) = scrape::get(op.port, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("edgeloom_operator_reconcile_errors_total{category=\"kubeconfig\",controller=\"edgepool\"}"), "{metrics}");
    // Fixing the Secret reconnects edge-b.
    let fixed = serde_json::json!({"data": good.data});
    secrets
        .patch(
            "edge-b-kubeconfig",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&fixed),
        )
        .await
        .expect("fix the secret");
    wait::until("edge-b reachable again", Duration::from_secs(60), || {
        let pools = pools.clone();
        async move {
            let s = pools
                .get("edge")
                .await
                .map_err(|e| e.to_string())?
                .status
                .unwrap_or_default();
            if s.reachable.as_deref() == Some("2/3") {
                Ok(())
            } else {
                Err(format!("{:?}", s.clusters))
            }
        }
    })
    .await;
}

/// Attack 6 of the trust model, as honest hardware would make it: CPU results of two
/// architectures differ (as CPU and CUDA results do). edge-b's nodes are arm64, and the
/// simulated agents report per-architecture digests. Replicas of every shard are placed
/// within one determinism class, so the quorum agrees and no honest node is caught.
#[tokio::test]
async fn replicas_stay_in_one_determinism_class_so_no_honest_node_is_outvoted() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start_bare(&["edge-a", "edge-b"], 2)
        .await
        .expect("federation");
    let edge_b = fed.plane.cluster("edge-b").expect("edge-b");
    let nodes: Api<k8s_openapi::api::core::v1::Node> =
        Api::all(edge_b.client().await.expect("client"));
    for n in ["edge-b-node-0", "edge-b-node-1"] {
        // The kubelet's label (the harness plays the kubelet's registration).
        nodes
            .patch(
                n,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(
                    serde_json::json!({"metadata": {"labels": {"kubernetes.io/arch": "arm64"}}}),
                ),
            )
            .await
            .expect("arch label");
    }
    fed.start_sims(Duration::from_secs(2))
        .await
        .expect("agents");
    fed.apply_pool("edge", 10, 2).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("classes").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml("classes", 4, "  verification:\n    replicas: 2\n"),
    )
    .await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "classes",
        JobPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shards = done.status.expect("status").shards;
    assert_eq!(shards.len(), 8, "no extra replica was needed: {shards:?}");
    for shard in 0..4 {
        let clusters: std::collections::BTreeSet<&str> = shards
            .iter()
            .filter(|s| s.index == shard)
            .map(|s| s.cluster.as_str())
            .collect();
        assert_eq!(clusters.len(), 1, "shard {shard} spans classes: {shards:?}");
    }
    assert!(
        shards.iter().all(|s| s
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("verified"))),
        "{shards:?}"
    );
    let used: std::collections::BTreeSet<&str> =
        shards.iter().map(|s| s.cluster.as_str()).collect();
    assert_eq!(used.len(), 2, "both classes did work: {shards:?}");
    let outvoted = jobs::events_of(&fed, &ns, "classes")
        .await
        .into_iter()
        .filter(|(reason, _)| reason == "ResultOutvoted")
        .count();
    assert_eq!(outvoted, 0);
}

/// Attack 3 of the trust model: a node that advertises 1000 times its real speed (the
/// `edgeloom.io/tflops` annotation is its agent's to write) is paid, with
/// `normalizeBySpeed`, at most what the operator's own timing of its verified work shows:
/// about the median, not ten times the base rate.
#[tokio::test]
async fn an_inflated_speed_claim_is_paid_only_as_far_as_verified_work_shows() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 3, Duration::from_secs(2))
        .await
        .expect("federation");
    let edge_a = fed.plane.cluster("edge-a").expect("edge-a");
    Api::<k8s_openapi::api::core::v1::Node>::all(edge_a.client().await.expect("client"))
        .patch(
            "edge-a-node-0",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {"edgeloom.io/tflops": "100"}}}),
            ),
        )
        .await
        .expect("inflated claim");
    fed.apply_pool("edge", 10, 2).await.expect("pool");
    Api::<edgeloom_crds::EdgePool>::all(fed.hub.clone())
        .patch(
            "edge",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"spec": {"rewards": {"normalizeBySpeed": true}}}),
            ),
        )
        .await
        .expect("pool patched");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("speed").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml("speed", 3, "  verification:\n    replicas: 2\n"),
    )
    .await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "speed",
        JobPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let uid = done.metadata.uid.clone().expect("uid");
    wait_receipts(&fed, &uid, 6).await;
    let receipts = ledger::receipts_json(plugin_bin(), &fed.plane.hub().kubeconfig, Some(&uid));
    let inflater: Vec<u64> = receipts
        .iter()
        .filter(|r| r["node"] == "edge-a-node-0")
        .filter_map(|r| r["speedFactorMilli"].as_u64())
        .collect();
    assert!(
        !inflater.is_empty(),
        "the inflating node did work: {receipts:?}"
    );
    assert!(
        inflater.iter().all(|f| *f <= 1500),
        "its claim of 1000x the median (factor 10000 before) paid as {inflater:?}"
    );
}

/// Attack 7 of the trust model: rewriting history. A rewritten suffix whose hashes were
/// recomputed passes the chain's own check, and a truncated ledger is a valid shorter
/// chain; both are named against a checkpoint the operator signed earlier, and the
/// operator stops writing. A contributor's inclusion proof checks offline.
#[tokio::test]
async fn a_rewritten_or_truncated_ledger_is_named_against_a_signed_checkpoint() {
    use edgeloom_operator::rewards::ledger::{Entry, entry_hash};
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 2).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("history").await.expect("ns");
    apply(&fed, &ns, &job_yaml("history", 3, "")).await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "history",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let uid = done.metadata.uid.clone().expect("uid");
    wait_receipts(&fed, &uid, 3).await;
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    let plugin = |args: &[&str]| ledger::plugin(plugin_bin(), &kubeconfig, args);
    // A contributor keeps the signed checkpoint once it covers the three receipts.
    let kept = wait::until_some("a checkpoint of 3 entries", Duration::from_secs(30), || {
        let out = plugin(&["ledger", "checkpoint", "--pool", "edge"]);
        let cp: Option<serde_json::Value> = serde_json::from_str(out.stdout.trim()).ok();
        std::future::ready(cp.filter(|c| c["size"] == 3))
    })
    .await;
    let dir = std::env::temp_dir().join(format!("edgeloom-history-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kept_file = dir.join("checkpoint.json");
    std::fs::write(&kept_file, kept.to_string()).expect("kept");
    let key = kept["publicKey"].as_str().expect("public key").to_string();
    // Its receipt's inclusion proof checks offline, with the operator's key pinned.
    let out = plugin(&["ledger", "prove", &format!("{uid}/1/0"), "--pool", "edge"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    let proof_file = dir.join("proof.json");
    std::fs::write(&proof_file, &out.stdout).expect("proof");
    let check = |file: &std::path::Path| {
        let out = std::process::Command::new(plugin_bin())
            .args(["ledger", "check-proof"])
            .arg(file)
            .args(["--public-key", &key])
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .expect("check-proof runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, msg) = check(&proof_file);
    assert_eq!(code, Some(0), "{msg}");
    assert!(
        msg.starts_with("valid: receipt") && msg.contains("(the trusted key)"),
        "{msg}"
    );
    let forged = out
        .stdout
        .replacen("\"amount\": \"0.0002\"", "\"amount\": \"9.0002\"", 1);
    assert_ne!(forged, out.stdout, "the proof names the amount");
    std::fs::write(dir.join("forged.json"), forged).expect("forged");
    let (code, msg) = check(&dir.join("forged.json"));
    assert_eq!(code, Some(1), "{msg}");
    assert!(msg.contains("altered"), "{msg}");

    // Someone with write access to the bucket rewrites the last receipt and recomputes its
    // hash: the chain is internally consistent again ...
    rewrite_object(&fed, 2, |lines, at| {
        let mut last: Entry = serde_json::from_str(&lines[at]).expect("entry");
        last.receipt.amount = "20".into();
        last.hash = entry_hash(last.seq, &last.prev, &last.receipt);
        lines[at] = serde_json::to_string(&last).expect("json");
    })
    .await;
    let verify = |with_kept: bool| {
        let mut args = vec!["ledger", "verify", "--pool", "edge", "--public-key", &key];
        if with_kept {
            args.extend(["--checkpoint", kept_file.to_str().expect("path")]);
        }
        plugin(&args)
    };
    let out = verify(true);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains("every link verified"), "{}", out.stdout);
    assert!(
        out.stdout.contains("BROKEN against the kept checkpoint")
            && out.stdout.contains("history was rewritten"),
        "{}",
        out.stdout
    );
    // ... and the operator names it on the pool and writes no more receipts.
    jobs::wait_pool_condition(
        &fed,
        "edge",
        "LedgerVerified",
        "False",
        &["history was rewritten"],
        Duration::from_secs(30),
    )
    .await;
    // Dropping the last entry instead (a valid, shorter chain) is named as a truncation.
    rewrite_object(&fed, 2, |lines, at| {
        lines.truncate(at);
    })
    .await;
    let out = verify(true);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stdout.contains("history was truncated"),
        "{}",
        out.stdout
    );
    jobs::wait_pool_condition(
        &fed,
        "edge",
        "LedgerVerified",
        "False",
        &["history was truncated"],
        Duration::from_secs(30),
    )
    .await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Attack 5 of the trust model, honest until trusted and then cheating: a node caught
/// forfeits the receipts it was paid within the pool's escrow window; each forfeit is its
/// own ledger entry, the account's balance drops, and the job's total with it.
#[tokio::test]
async fn a_node_caught_cheating_forfeits_its_receipts_still_in_escrow() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 3, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    // Honest for its first result, then wrong.
    fed.agents["edge-a"].cheat_after("edge-a-node-0", 1);
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("escrow").await.expect("ns");
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    let forfeits = || {
        ledger::receipts_json(plugin_bin(), &kubeconfig, None)
            .into_iter()
            .filter(|r| r["forfeits"].is_string())
            .collect::<Vec<serde_json::Value>>()
    };
    // Replicated jobs until the node has been paid once and then caught.
    let mut paid_first = None;
    for round in 0..4 {
        let name = format!("escrow-{round}");
        apply(
            &fed,
            &ns,
            &job_yaml(&name, 3, "  verification:\n    replicas: 2\n"),
        )
        .await;
        let done = jobs::wait_phase(
            &fed,
            &ns,
            &name,
            JobPhase::Succeeded,
            Duration::from_secs(180),
        )
        .await;
        jobs::assert_truthful(&fed, &done).await;
        let uid = done.metadata.uid.clone().expect("uid");
        let receipts: Vec<serde_json::Value> =
            ledger::receipts_json(plugin_bin(), &kubeconfig, Some(&uid))
                .into_iter()
                .filter(|r| r["forfeits"].is_null())
                .collect();
        if paid_first.is_none() {
            paid_first = receipts
                .iter()
                .find(|r| r["node"] == "edge-a-node-0")
                .map(|r| {
                    format!(
                        "{}/{}/{}",
                        r["jobUid"].as_str().unwrap_or_default(),
                        r["shard"],
                        r["replica"]
                    )
                });
        }
        if !forfeits().is_empty() {
            break;
        }
    }
    let paid_first = paid_first.expect("the node was paid for its honest first result");
    let taken = wait::until_some("a forfeit entry", Duration::from_secs(30), || {
        let f = forfeits();
        std::future::ready((!f.is_empty()).then_some(f))
    })
    .await;
    assert!(
        taken.iter().all(|f| f["node"] == "edge-a-node-0"),
        "only the caught node forfeits: {taken:?}"
    );
    assert!(
        taken.iter().any(|f| f["forfeits"] == paid_first.as_str()),
        "its honest first receipt, still in escrow, is taken back: {taken:?} (paid {paid_first})"
    );
    let balance = ledger::plugin(plugin_bin(), &kubeconfig, &["ledger", "balance"]);
    let row = balance
        .stdout
        .lines()
        .find(|l| l.starts_with("acct-edge-a-node-0"))
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .expect("the caught node's account");
    assert_eq!(row[1], "0", "{}", balance.stdout);
    let verify = ledger::plugin(plugin_bin(), &kubeconfig, &["ledger", "verify"]);
    assert_eq!(verify.code, Some(0), "{verify:?}");
    let events: Vec<String> = events_of_namespace(&fed, &ns)
        .await
        .into_iter()
        .filter(|(r, _)| r == "RewardsForfeited")
        .map(|(_, m)| m)
        .collect();
    assert!(
        events.iter().any(|m| m.contains("edge-a/edge-a-node-0")),
        "{events:?}"
    );
}

async fn events_of_namespace(fed: &Federation, ns: &str) -> Vec<(String, String)> {
    Api::<Event>::namespaced(fed.hub.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// Issue #11, "uses the whole fleet": two clusters of two idle nodes whose agents run one
/// task at a time (advertised as `edgeloom.io/task-slots`) in a pool that allows two per
/// node. A 4-shard job spread by cluster runs one shard on every node at once (not two on
/// each cluster's best node), and a second job applied with it waits for free slots: no
/// node ever holds more tasks than its agent runs.
#[tokio::test]
async fn shards_use_every_idle_node_and_never_exceed_what_an_agent_runs() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start_bare(&["edge-a", "edge-b"], 2)
        .await
        .expect("federation");
    fed.start_sims_with_slots(Duration::from_secs(4), 1)
        .await
        .expect("sims");
    fed.apply_pool("edge", 10, 2).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("fleet").await.expect("ns");
    let spread = "  placement:\n    spread: Cluster\n";
    apply(&fed, &ns, &job_yaml("wide", 4, spread)).await;
    let wide = wait::until_some("job wide has a uid", Duration::from_secs(10), || {
        let fed = &fed;
        let ns = ns.clone();
        async move {
            Api::<ComputeJob>::namespaced(fed.hub.clone(), &ns)
                .get_opt("wide")
                .await
                .ok()
                .flatten()
                .and_then(|j| j.metadata.uid)
        }
    })
    .await;
    apply(&fed, &ns, &job_yaml("more", 4, spread)).await;
    let mut most_per_node = 0usize;
    let mut wide_nodes: std::collections::BTreeSet<String> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut running: std::collections::BTreeMap<String, usize> = Default::default();
        for member in ["edge-a", "edge-b"] {
            let client = fed
                .plane
                .cluster(member)
                .expect("member")
                .client()
                .await
                .expect("client");
            let all = Api::<ComputeTask>::namespaced(client, SYSTEM_NAMESPACE)
                .list(&ListParams::default())
                .await
                .expect("tasks")
                .items;
            for t in all {
                let phase = t.status.as_ref().and_then(|s| s.phase);
                let node = format!("{member}/{}", t.spec.node_name);
                if t.spec.job.uid == wide {
                    wide_nodes.insert(node.clone());
                }
                if !matches!(phase, Some(TaskPhase::Succeeded | TaskPhase::Failed)) {
                    *running.entry(node).or_default() += 1;
                }
            }
        }
        most_per_node = most_per_node.max(running.values().copied().max().unwrap_or(0));
        let done = |name: &str| {
            let fed = &fed;
            let ns = ns.clone();
            let name = name.to_string();
            async move {
                job(fed, &ns, &name)
                    .await
                    .status
                    .and_then(|s| s.phase)
                    .is_some_and(|p| p == JobPhase::Succeeded)
            }
        };
        if done("wide").await && done("more").await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs did not finish; tasks per node now {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        most_per_node, 1,
        "no node ever held more tasks than its agent runs"
    );
    assert_eq!(
        wide_nodes.len(),
        4,
        "the 4-shard job ran one shard on every node: {wide_nodes:?}"
    );
    // A finished job's conditions agree with its phase: nothing is left to place.
    for name in ["wide", "more"] {
        let status = job(&fed, &ns, name).await.status.expect("status");
        let scheduled = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Scheduled")
            .expect("Scheduled condition");
        assert_eq!(
            (scheduled.status.as_str(), scheduled.reason.as_str()),
            ("True", "Finished"),
            "{name}: {scheduled:?}"
        );
        assert!(
            status
                .shards
                .iter()
                .all(|s| !s.node.is_empty() && s.attempt >= 1),
            "{name}: every slot shows its real attempt and node: {:?}",
            status.shards
        );
    }
}

/// Members are independent (issue #11): with edge-a's API server killed, a job placed in
/// edge-b runs and its status reaches the hub, and the pool's event names edge-a as
/// unreachable (not another cluster's state). The lag from the task's finish in edge-b to
/// the job's status in the hub is printed; `target/release/latency member-lag` measures
/// it repeatedly for BENCHMARKS.md. The test asserts only that it arrives.
#[tokio::test]
async fn a_healthy_members_status_reaches_the_hub_while_another_member_is_down() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start(&["edge-a", "edge-b"], 1, Duration::from_secs(1))
        .await
        .expect("federation");
    fed.apply_pool("edge", 20, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("lag").await.expect("ns");
    jobs::wait_pool_condition(&fed, "edge", "Ready", "True", &[], Duration::from_secs(60)).await;
    fed.plane.kill_apiserver("edge-a").expect("kill");
    wait::until(
        "the pool's event naming edge-a unreachable",
        Duration::from_secs(60),
        || async {
            let events = jobs::events_of(&fed, "default", "edge").await;
            if events
                .iter()
                .any(|(r, m)| r == "ClusterUnreachable" && m.starts_with("edge-a: unreachable"))
            {
                Ok(())
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await;
    apply(
        &fed,
        &ns,
        &job_yaml("b-only", 1, "  placement:\n    regions: [region-edge-b]\n"),
    )
    .await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "b-only",
        JobPhase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    let seen_in_hub = jiff::Timestamp::now();
    jobs::assert_truthful(&fed, &done).await;
    let uid = done.metadata.uid.clone().expect("uid");
    let task = tasks_in(&fed, "edge-b", &uid)
        .await
        .into_iter()
        .next()
        .expect("the task in edge-b");
    let finished = task
        .status
        .and_then(|s| s.finished_at)
        .expect("finished in edge-b")
        .0;
    eprintln!(
        "lag from the task's finish in edge-b to the job's status in the hub, edge-a down: {} ms (polled every 0.2 s)",
        seen_in_hub.duration_since(finished).as_millis()
    );
    fed.plane
        .restart_apiserver("edge-a")
        .await
        .expect("restart");
}

#[tokio::test]
async fn a_task_without_progress_is_failed_on_its_node_and_completes_elsewhere() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    let agents = &fed.agents["edge-a"];
    // Both nodes heartbeat, claim their tasks, and never progress: a hung runner, or a
    // node keeping a slot without working.
    for n in ["edge-a-node-0", "edge-a-node-1"] {
        agents.hang(n);
    }
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("stall").await.expect("ns");
    apply(
        &fed,
        &ns,
        &job_yaml(
            "stall",
            1,
            "  maxRetries: 1\n  progressTimeoutSeconds: 10\n",
        ),
    )
    .await;
    let first = jobs::first_running_shard(&fed, &ns, "stall", Duration::from_secs(60)).await;
    let other = if first.node == "edge-a-node-0" {
        "edge-a-node-1"
    } else {
        "edge-a-node-0"
    };
    agents.resume(other);
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "stall",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shard = done.status.clone().expect("status").shards[0].clone();
    assert_eq!((shard.attempt, shard.node.as_str()), (2, other));
    let uid = done.metadata.uid.clone().expect("uid");
    let tasks = all_tasks(&fed, &uid).await;
    let stalled = tasks
        .iter()
        .find(|t| t.spec.attempt == 1)
        .expect("the stalled attempt is kept, failed");
    let status = stalled.status.clone().expect("status");
    assert_eq!(status.phase, Some(TaskPhase::Failed), "{status:?}");
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.starts_with("no progress for 10s on node")),
        "{status:?}"
    );
    let events = jobs::events_of(&fed, &ns, "stall").await;
    assert!(
        events.iter().any(|(r, m)| r == "Replaced"
            && m.contains("attempt 2")
            && m.contains("failed: no progress for 10s")),
        "{events:?}"
    );
    // Only the attempt that finished is paid, on the node that finished it.
    let paid = wait_receipts(&fed, &uid, 1).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!((paid[0].2, paid[0].3.as_str()), (2, other));
    let (_, text) = scrape::get(_op.port, "/metrics").await.expect("metrics");
    assert!(
        text.contains("edgeloom_operator_tasks_stalled_total 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_node_whose_clock_runs_ahead_is_lost_once_it_stops_renewing() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(20))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    let agents = &fed.agents["edge-a"];
    // Both nodes' clocks run an hour ahead: their Leases claim renewals in the future.
    for n in ["edge-a-node-0", "edge-a-node-1"] {
        agents.skew_clock(n, 3600);
    }
    // Work starts only once both Leases claim the future (the simulated agents write
    // every half second; an operator placing within that time would race the skew).
    let member = fed
        .plane
        .cluster("edge-a")
        .expect("edge-a")
        .client()
        .await
        .expect("client");
    let leases: Api<Lease> = Api::namespaced(member.clone(), SYSTEM_NAMESPACE);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut ahead = 0;
        for n in ["edge-a-node-0", "edge-a-node-1"] {
            let renewed = leases
                .get_opt(n)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec)
                .and_then(|s| s.renew_time);
            if renewed.is_some_and(|t| {
                t.0 > jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3000)
            }) {
                ahead += 1;
            }
        }
        if ahead == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the simulated nodes never wrote a skewed renewal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("skew").await.expect("ns");
    apply(&fed, &ns, &job_yaml("skew", 1, "")).await;
    let first = jobs::first_running_shard(&fed, &ns, "skew", Duration::from_secs(60)).await;
    // The node stops renewing (and working). Judged by the time it wrote, it would stay
    // ready for an hour; judged by when the operator saw it renew, it is lost after 10 s.
    agents.kill(&first.node);
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "skew",
        JobPhase::Succeeded,
        Duration::from_secs(90),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shard = done.status.clone().expect("status").shards[0].clone();
    assert_eq!(shard.attempt, 2, "re-placed after the node was lost");
    assert_ne!(shard.node, first.node);
    let lease: Lease = leases.get(&first.node).await.expect("lease");
    let claimed = lease.spec.and_then(|s| s.renew_time).expect("renew time").0;
    assert!(
        claimed > jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3000),
        "the lost node's Lease still claims a renewal in the future: {claimed} (now {})",
        jiff::Timestamp::now()
    );
}

#[tokio::test]
async fn a_slot_that_keeps_losing_its_node_fails_the_job_when_its_attempts_run_out() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(30))
        .await
        .expect("federation");
    fed.apply_pool("edge", 5, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("attempts").await.expect("ns");
    // One placement and one re-placement at most.
    apply(
        &fed,
        &ns,
        &job_yaml("lossy", 1, "  maxRetries: 0\n  maxReplacements: 1\n"),
    )
    .await;
    let agents = &fed.agents["edge-a"];
    let first = jobs::first_running_shard(&fed, &ns, "lossy", Duration::from_secs(60)).await;
    agents.kill(&first.node);
    let second = wait::until("attempt 2 running", Duration::from_secs(60), || async {
        let s = job(&fed, &ns, "lossy")
            .await
            .status
            .unwrap_or_default()
            .shards;
        match s.first() {
            Some(s) if s.attempt == 2 && s.phase == TaskPhase::Running => Ok(s.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_ne!(second.node, first.node);
    agents.kill(&second.node);
    let failed = jobs::wait_phase(
        &fed,
        &ns,
        "lossy",
        JobPhase::Failed,
        Duration::from_secs(60),
    )
    .await;
    jobs::assert_truthful(&fed, &failed).await;
    let failed_cond = failed
        .status
        .clone()
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .expect("Failed condition");
    assert_eq!(failed_cond.reason, "AttemptsExhausted");
    assert!(
        failed_cond.message.starts_with(
            "shard 0 replica 0 was placed 2 time(s) without a result (at most 1 + maxRetries 0 + maxReplacements 1)"
        ),
        "{failed_cond:?}"
    );
    // Nothing is left running and no third attempt was made.
    let uid = failed.metadata.uid.clone().expect("uid");
    for t in all_tasks(&fed, &uid).await {
        assert!(t.spec.attempt <= 2, "{t:?}");
    }
    let events = jobs::events_of(&fed, &ns, "lossy").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Failed" && m.contains("maxReplacements 1")),
        "{events:?}"
    );
}

#[tokio::test]
async fn an_attempt_cut_off_between_its_creation_and_its_watch_event_is_never_issued_twice() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start(&["edge-a", "edge-b"], 1, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 10, 1).await.expect("pool");
    // The first operator dies right after its first task creation returns, before any
    // watch event of it (kill -9).
    let mut crashing = fed
        .operator_with_env(
            operator_bin(),
            "op-1",
            &[("EDGELOOM_FAILPOINT", "after-task-create")],
        )
        .expect("operator");
    let ns = fed.namespace("fence").await.expect("ns");
    apply(&fed, &ns, &job_yaml("fence", 1, "")).await;
    wait::until_true(
        "the operator hit its failpoint",
        Duration::from_secs(90),
        || std::future::ready(crashing.process.exited().is_some()),
    )
    .await;
    let uid = job(&fed, &ns, "fence").await.metadata.uid.expect("uid");
    let mut holder = None;
    for m in ["edge-a", "edge-b"] {
        if !tasks_in(&fed, m, &uid).await.is_empty() {
            holder = Some(m);
        }
    }
    let holder = holder.expect("the task was created");
    let other = if holder == "edge-a" {
        "edge-b"
    } else {
        "edge-a"
    };
    // Its member is cut off before the next operator could see the task.
    fed.plane.kill_apiserver(holder).expect("kill");
    let _op = fed.operator(operator_bin(), "op-2").expect("operator");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "fence",
        JobPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    jobs::assert_truthful_after_restart(&fed, &done).await;
    let shard = done.status.clone().expect("status").shards[0].clone();
    assert_eq!(
        (shard.attempt, shard.cluster.as_str()),
        (2, other),
        "the cut-off attempt 1 counts as issued: the slot went on with attempt 2"
    );
    // The cut-off member returns with its attempt 1: every attempt number exists once.
    fed.plane.restart_apiserver(holder).await.expect("restart");
    let attempts = wait::until(
        "the old attempt is cancelled or finished in the returned member",
        Duration::from_secs(60),
        || async {
            let tasks = all_tasks(&fed, &uid).await;
            let stale_running = tasks.iter().any(|t| {
                t.spec.attempt == 1
                    && !matches!(
                        t.status.as_ref().and_then(|s| s.phase),
                        Some(TaskPhase::Succeeded | TaskPhase::Failed | TaskPhase::Cancelled)
                    )
            });
            if stale_running {
                Err(format!("{tasks:?}"))
            } else {
                Ok(tasks
                    .iter()
                    .map(|t| {
                        (
                            t.spec.shard,
                            t.spec.replica,
                            t.spec.attempt,
                            t.spec.cluster.clone(),
                        )
                    })
                    .collect::<Vec<_>>())
            }
        },
    )
    .await;
    let mut unique = attempts.clone();
    unique.sort();
    unique.dedup_by(|a, b| (a.0, a.1, a.2) == (b.0, b.1, b.2));
    assert_eq!(
        unique.len(),
        attempts.len(),
        "an attempt issued twice: {attempts:?}"
    );
    // Only attempt 2 is paid, whatever attempt 1 reported after its member returned.
    let paid = wait_receipts(&fed, &uid, 1).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!(paid[0].2, 2, "{paid:?}");
}

#[tokio::test]
async fn a_member_that_answers_but_cannot_be_watched_is_a_pool_condition_and_work_goes_elsewhere() {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    // edge-b answers (its /version works) but the operator's identity there lost its
    // RBAC: it can list neither tasks nor Leases.
    let edge_b = fed
        .plane
        .cluster("edge-b")
        .expect("edge-b")
        .client()
        .await
        .expect("client");
    let bindings: Api<RoleBinding> = Api::namespaced(edge_b, SYSTEM_NAMESPACE);
    let mut binding = bindings.get("edgeloom-hub").await.expect("binding");
    bindings
        .delete("edgeloom-hub", &DeleteParams::default())
        .await
        .expect("delete binding");
    fed.apply_pool("edge", 20, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("nosync").await.expect("ns");
    apply(&fed, &ns, &job_yaml("nosync", 2, "")).await;
    let cond = jobs::wait_pool_condition(
        &fed,
        "edge",
        "ClustersSynced",
        "False",
        &["edge-b", "forbidden"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(cond.reason, "NotSyncing", "{cond:?}");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "nosync",
        JobPhase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    assert_eq!(
        done.status.clone().expect("status").placement.as_deref(),
        Some("edge-a:2"),
        "the job did not wait for edge-b"
    );
    let events = jobs::events_of(&fed, "default", "edge").await;
    assert!(
        events.iter().any(|(r, m)| r == "ClusterNotSyncing"
            && m.starts_with("edge-b: answers but cannot be watched")),
        "{events:?}"
    );
    // The RBAC comes back: the member is watched again.
    binding.metadata.resource_version = None;
    binding.metadata.uid = None;
    bindings
        .create(&Default::default(), &binding)
        .await
        .expect("restore binding");
    jobs::wait_pool_condition(
        &fed,
        "edge",
        "ClustersSynced",
        "True",
        &[],
        Duration::from_secs(90),
    )
    .await;
}

/// A scheduling cycle that fenced an attempt just before the job was deleted creates its
/// task after that (here 5 s later, a test failpoint). The job's cleanup must wait for
/// that create: listed before it, the task would outlive its job (the orphan sweeper,
/// set to an hour here, would be its only rescue).
#[tokio::test]
async fn a_task_created_while_its_job_is_being_deleted_is_cleaned_with_the_job() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(30))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    let op = fed
        .operator_with_env(
            operator_bin(),
            "op-1",
            &[
                ("EDGELOOM_FAILPOINT", "before-task-create"),
                ("EDGELOOM_ORPHAN_SWEEP_SECONDS", "3600"),
            ],
        )
        .expect("operator");
    let ns = fed.namespace("racedelete").await.expect("ns");
    apply(&fed, &ns, &job_yaml("race", 1, "")).await;
    let jobs_api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    // The attempt is fenced (recorded in the job); its task is created 5 s later.
    let uid = wait::until("the attempt fenced", Duration::from_secs(60), || {
        let jobs_api = jobs_api.clone();
        async move {
            let j = jobs_api.get("race").await.map_err(|e| e.to_string())?;
            if j.status.as_ref().is_some_and(|s| !s.issued.is_empty()) {
                Ok(j.metadata.uid.clone().unwrap_or_default())
            } else {
                Err("not fenced yet".into())
            }
        }
    })
    .await;
    let fenced = std::time::Instant::now();
    assert!(
        tasks_in(&fed, "edge-a", &uid).await.is_empty(),
        "the task is not created yet"
    );
    jobs_api
        .delete("race", &DeleteParams::default())
        .await
        .expect("delete");
    wait::until_true("the job to be gone", Duration::from_secs(60), || {
        let jobs_api = jobs_api.clone();
        async move { matches!(jobs_api.get_opt("race").await, Ok(None)) }
    })
    .await;
    // The delayed create has happened by now, whichever way it went.
    tokio::time::sleep(Duration::from_secs(8).saturating_sub(fenced.elapsed())).await;
    let left = tasks_in(&fed, "edge-a", &uid).await;
    assert!(
        left.is_empty(),
        "a task outlived its deleted job: {:?}",
        left.iter()
            .map(|t| t.metadata.name.clone())
            .collect::<Vec<_>>()
    );
    assert!(
        op.log_tail(2000).contains("failpoint before-task-create"),
        "the failpoint delayed the create"
    );
}

/// A job with more slots than the status holds itself (here 18, `--status-inline-slots`;
/// 500 by default) keeps every slot in pages, and the operator decides from them as from
/// an inline status: a new operator reads them back, places nothing twice and pays every
/// slot once. The pages go with the job.
#[tokio::test]
async fn a_big_jobs_shard_status_is_paged_and_survives_an_operator_restart() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 6, Duration::from_secs(1))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 2).await.expect("pool");
    let env = [("EDGELOOM_STATUS_INLINE_SLOTS", "18")];
    let mut op = fed
        .operator_with_env(operator_bin(), "op-1", &env)
        .expect("operator");
    let ns = fed.namespace("paged").await.expect("ns");
    apply(&fed, &ns, &job_yaml("big", 40, "")).await;
    let jobs_api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    let uid = wait::until(
        "a quarter of the shards done",
        Duration::from_secs(120),
        || {
            let jobs_api = jobs_api.clone();
            async move {
                let j = jobs_api.get("big").await.map_err(|e| e.to_string())?;
                let status = j.status.clone().unwrap_or_default();
                let done: u32 = status
                    .progress
                    .as_deref()
                    .and_then(|p| p.split_once('/'))
                    .and_then(|(d, _)| d.parse().ok())
                    .unwrap_or(0);
                if done >= 10 && !status.shard_pages.is_empty() {
                    Ok(j.metadata.uid.clone().unwrap_or_default())
                } else {
                    Err(format!(
                        "{:?} {} pages",
                        status.progress,
                        status.shard_pages.len()
                    ))
                }
            }
        },
    )
    .await;
    // What op-1 recorded of the slots finished so far (its own observation times).
    let cms: Api<ConfigMap> = Api::namespaced(fed.hub.clone(), SYSTEM_NAMESPACE);
    let read_pages = |status: edgeloom_crds::ComputeJobStatus| {
        let cms = cms.clone();
        async move {
            let mut slots = Vec::new();
            for p in &status.shard_pages {
                let cm = cms.get(&p.name).await.expect("page");
                let text = cm.data.expect("data")["shards.json"].clone();
                let page: Vec<edgeloom_crds::compute_job::ShardStatus> =
                    serde_json::from_str(&text).expect("page json");
                assert_eq!(page.len() as u32, p.slots);
                slots.extend(page);
            }
            slots
        }
    };
    op.kill();
    let before = read_pages(job(&fed, &ns, "big").await.status.expect("status")).await;
    let finished_before: Vec<_> = before
        .iter()
        .filter(|s| s.phase == TaskPhase::Succeeded)
        .map(|s| (s.index, s.reported_at.clone()))
        .collect();
    assert!(finished_before.len() >= 10, "{before:?}");
    let _op2 = fed
        .operator_with_env(operator_bin(), "op-2", &env)
        .expect("operator");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "big",
        JobPhase::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    let status = done.status.clone().expect("status");
    assert!(
        status.shards.is_empty(),
        "a finished paged job shows no slot: {:?}",
        status.shards
    );
    assert_eq!(
        status.shard_pages.len(),
        20,
        "pages of 2 shards (18 slots / 9 replicas at most): {:?}",
        status.shard_pages
    );
    assert_eq!(status.shard_pages.iter().map(|p| p.slots).sum::<u32>(), 40);
    assert_eq!(
        status.slot_attempts.as_deref(),
        Some("0:0-39=1"),
        "no slot was placed twice"
    );
    let slots = read_pages(status.clone()).await;
    assert_eq!(slots.len(), 40);
    // op-2 read op-1's observations back from the pages rather than make new ones.
    for (index, reported) in &finished_before {
        assert_eq!(
            &slots[*index as usize].reported_at, reported,
            "shard {index}: what op-1 observed was kept"
        );
    }
    for (i, s) in slots.iter().enumerate() {
        assert_eq!(s.index as usize, i);
        assert_eq!(s.phase, TaskPhase::Succeeded, "{s:?}");
        assert!(
            s.dispatched_at.is_some() && s.reported_at.is_some(),
            "{s:?}"
        );
    }
    let paid = wait_receipts(&fed, &uid, 40).await;
    assert_eq!(paid.len(), 40, "one receipt per shard");
    assert!(paid.iter().all(|p| p.2 == 1), "{paid:?}");
    jobs_api
        .delete("big", &DeleteParams::default())
        .await
        .expect("delete");
    wait::until_true(
        "the pages to go with the job",
        Duration::from_secs(60),
        || {
            let (cms, uid) = (cms.clone(), uid.clone());
            async move {
                cms.list(&ListParams::default().labels(&format!("edgeloom.io/job-uid={uid}")))
                    .await
                    .is_ok_and(|l| l.items.is_empty())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn orphaned_tasks_are_swept_and_a_deleted_pool_cancels_its_tasks() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(300))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    let op = fed
        .operator_with_env(
            operator_bin(),
            "op-1",
            &[("EDGELOOM_ORPHAN_SWEEP_SECONDS", "2")],
        )
        .expect("operator");
    jobs::wait_pool_condition(&fed, "edge", "Ready", "True", &[], Duration::from_secs(60)).await;
    // A task whose job does not exist in the hub (left by a race with a deletion, or by a
    // job removed while its member was away).
    let edge_a = fed
        .plane
        .cluster("edge-a")
        .expect("edge-a")
        .client()
        .await
        .expect("client");
    let tasks: Api<ComputeTask> = Api::namespaced(edge_a, SYSTEM_NAMESPACE);
    let orphan: ComputeTask = serde_json::from_value(serde_json::json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask",
        "metadata": {"name": "deadbeef-0-0-1", "labels": {
            "edgeloom.io/job-uid": "00000000-dead-beef-0000-000000000000",
            "edgeloom.io/node": "edge-a-node-1"}},
        "spec": {
            "job": {"namespace": "gone", "name": "gone", "uid": "00000000-dead-beef-0000-000000000000"},
            "pool": "edge", "cluster": "edge-a", "shard": 0, "shards": 1, "replica": 0,
            "attempt": 1, "nodeName": "edge-a-node-1", "workload": {"kind": "Benchmark"}
        }
    }))
    .expect("task");
    tasks
        .create(&Default::default(), &orphan)
        .await
        .expect("orphan");
    // And a shard status page of that job (its finalizer removed by hand), beside a
    // ConfigMap of the operator's namespace that is not a page.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(fed.hub.clone(), SYSTEM_NAMESPACE);
    for (name, labels) in [
        (
            "edgeloom-shards-00000000deadbeef-0",
            serde_json::json!({"edgeloom.io/job-uid": "00000000-dead-beef-0000-000000000000"}),
        ),
        ("not-a-page", serde_json::json!({})),
    ] {
        let cm = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": labels},
            "data": {"shards.json": "[]"},
        }))
        .expect("configmap");
        cms.create(&Default::default(), &cm).await.expect("create");
    }
    wait::until("the orphan swept", Duration::from_secs(60), || async {
        match tasks.get_opt("deadbeef-0-0-1").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    wait::until(
        "the orphaned page swept",
        Duration::from_secs(60),
        || async {
            match cms.get_opt("edgeloom-shards-00000000deadbeef-0").await {
                Ok(None) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(
        cms.get_opt("not-a-page").await.expect("get").is_some(),
        "a ConfigMap that is not a page stays"
    );
    let (_, text) = scrape::get(op.port, "/metrics").await.expect("metrics");
    assert!(
        text.contains("edgeloom_operator_orphaned_tasks_removed_total 1"),
        "{text}"
    );
    let events = jobs::events_of(&fed, "default", "edge").await;
    assert!(
        events.iter().any(|(r, m)| r == "OrphanedTasksRemoved"
            && m.contains("job gone/gone")
            && m.contains("no longer exists in the hub")),
        "{events:?}"
    );
    // A job runs through the pool; the pool is deleted: its task is cancelled (no one
    // would pay for it), and the job waits for a pool.
    let ns = fed.namespace("pooldel").await.expect("ns");
    apply(&fed, &ns, &job_yaml("orphaned", 1, "")).await;
    let running = jobs::wait_running(&fed, &ns, "orphaned", 1, Duration::from_secs(60)).await;
    let uid = running.metadata.uid.clone().expect("uid");
    assert_eq!(tasks_in(&fed, "edge-a", &uid).await.len(), 1);
    Api::<edgeloom_crds::EdgePool>::all(fed.hub.clone())
        .delete("edge", &DeleteParams::default())
        .await
        .expect("delete pool");
    wait::until(
        "the pool gone and its task cancelled",
        Duration::from_secs(60),
        || {
            let (fed, uid) = (&fed, uid.clone());
            async move {
                let pool = Api::<edgeloom_crds::EdgePool>::all(fed.hub.clone())
                    .get_opt("edge")
                    .await
                    .map_err(|e| e.to_string())?;
                let left = tasks_in(fed, "edge-a", &uid).await;
                if pool.is_none() && left.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "pool {:?}, tasks {left:?}",
                        pool.map(|p| p.metadata.finalizers)
                    ))
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_task_of_another_job_under_the_same_name_is_never_taken_for_ones_own() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("squat").await.expect("ns");
    // The job cannot be placed yet; its first task name is known from its UID.
    apply(
        &fed,
        &ns,
        &job_yaml(
            "squat",
            1,
            "  placement:\n    requiredLabels:\n      residency: nowhere\n",
        ),
    )
    .await;
    let uid = job(&fed, &ns, "squat").await.metadata.uid.expect("uid");
    let prefix: String = uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase();
    let name = format!("{prefix}-0-0-1");
    let other = "11111111-2222-3333-4444-555555555555";
    let squatter: ComputeTask = serde_json::from_value(serde_json::json!({
        "apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeTask",
        "metadata": {"name": name, "labels": {
            "edgeloom.io/job-uid": other, "edgeloom.io/node": "edge-a-node-0"}},
        "spec": {
            "job": {"namespace": "elsewhere", "name": "other", "uid": other},
            "pool": "edge", "cluster": "edge-a", "shard": 0, "shards": 1, "replica": 0,
            "attempt": 1, "nodeName": "edge-a-node-0", "workload": {"kind": "Benchmark"}
        }
    }))
    .expect("task");
    let edge_a = fed
        .plane
        .cluster("edge-a")
        .expect("edge-a")
        .client()
        .await
        .expect("client");
    let tasks: Api<ComputeTask> = Api::namespaced(edge_a, SYSTEM_NAMESPACE);
    tasks
        .create(&Default::default(), &squatter)
        .await
        .expect("squatter");
    // Now it can be placed: its attempt 1 name is taken by another job's task.
    Api::<ComputeJob>::namespaced(fed.hub.clone(), &ns)
        .patch(
            "squat",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"spec": {"placement": {"requiredLabels": null}}}),
            ),
        )
        .await
        .expect("patched");
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "squat",
        JobPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    let shard = done.status.clone().expect("status").shards[0].clone();
    assert_eq!(shard.attempt, 2, "attempt 1's name belonged to another job");
    // The other task was never changed into this job's (the orphan sweeper may have
    // removed it by now: its job does not exist).
    if let Some(kept) = tasks.get_opt(&name).await.expect("get") {
        assert_eq!(kept.spec.job.uid, other);
    }
    let paid = wait_receipts(&fed, &uid, 1).await;
    assert_eq!(paid.len(), 1, "{paid:?}");
    assert_eq!(paid[0].2, 2, "{paid:?}");
}

#[tokio::test]
async fn a_configmap_model_job_runs_in_the_members_that_answer_while_another_is_down() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let mut fed = Federation::start(&["edge-a", "edge-b"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 60, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("cm-model").await.expect("ns");
    jobs::wait_pool_condition(&fed, "edge", "Ready", "True", &[], Duration::from_secs(60)).await;
    fed.plane.kill_apiserver("edge-b").expect("kill");
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(fed.hub.clone(), &ns);
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "model"},
        "binaryData": {"model.pt": k8s_openapi::ByteString(b"not really torchscript".to_vec())}
    }))
    .expect("configmap");
    cms.create(&Default::default(), &cm)
        .await
        .expect("configmap");
    apply(
        &fed,
        &ns,
        "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: cm\nspec:\n  workload:\n    kind: Inference\n    model:\n      configMap:\n        name: model\n        key: model.pt\n    dataset:\n      builtin: Digits\n  shards: 2\n",
    )
    .await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "cm",
        JobPhase::Succeeded,
        Duration::from_secs(60),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    assert_eq!(
        done.status.clone().expect("status").placement.as_deref(),
        Some("edge-a:2"),
        "placed where the model could be copied"
    );
    let uid = done.metadata.uid.clone().expect("uid");
    let mirrors: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(
        fed.plane
            .cluster("edge-a")
            .expect("edge-a")
            .client()
            .await
            .expect("client"),
        SYSTEM_NAMESPACE,
    );
    let copied = mirrors
        .list(&ListParams::default().labels(&format!("edgeloom.io/job-uid={uid}")))
        .await
        .expect("list");
    assert_eq!(copied.items.len(), 1, "the model was mirrored into edge-a");
    fed.plane
        .restart_apiserver("edge-b")
        .await
        .expect("restart");
}

#[tokio::test]
async fn an_agent_filling_every_status_field_to_the_limit_leaves_the_hub_status_bounded() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(1))
        .await
        .expect("federation");
    for n in ["edge-a-node-0", "edge-a-node-1"] {
        fed.agents["edge-a"].fill(n);
    }
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    let op = fed.operator(operator_bin(), "op-1").expect("operator");
    let ns = fed.namespace("fill").await.expect("ns");
    apply(&fed, &ns, &job_yaml("fill", 8, "")).await;
    let done = jobs::wait_phase(
        &fed,
        &ns,
        "fill",
        JobPhase::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    jobs::assert_truthful(&fed, &done).await;
    // The agents wrote 4,096-character messages, 64 metrics and 64 summary values of 256
    // characters, and 4,096-element vectors in every task: the job's status keeps a
    // bounded part of it.
    let uid = done.metadata.uid.clone().expect("uid");
    let task = all_tasks(&fed, &uid)
        .await
        .into_iter()
        .next()
        .expect("a task");
    let written = task.status.clone().expect("status");
    assert_eq!(written.message.as_ref().map(String::len), Some(4096));
    assert_eq!(written.metrics.len(), 64);
    let status = done.status.clone().expect("status");
    for s in &status.shards {
        let chars = s.message.as_deref().map(|m| m.chars().count()).unwrap_or(0);
        assert!(
            chars <= 256,
            "shard {} message of {chars} characters",
            s.index
        );
    }
    assert!(
        status.metrics.len() <= 32,
        "{} metric names in the job's status",
        status.metrics.len()
    );
    let bytes = serde_json::to_vec(&status).expect("json").len();
    assert!(bytes < 32_000, "the job's status is {bytes} bytes");
    let rss = std::fs::read_to_string(format!("/proc/{}/status", op.process.pid()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(str::to_string)
        .unwrap_or_default();
    eprintln!("job status {bytes} bytes for 8 filled tasks; operator {rss}");
    // Far below the chart's memory limit (512 MiB): what agents write does not grow it.
    let kib: u64 = rss
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse().ok())
        .expect("VmRSS in kB");
    assert!(kib < 256 * 1024, "operator RSS {kib} KiB");
}

#[tokio::test]
async fn a_job_deleted_while_its_ledger_is_unavailable_is_paid_when_the_ledger_returns() {
    let _slot = SLOTS.acquire().await.expect("slot");
    let fed = Federation::start(&["edge-a"], 2, Duration::from_secs(2))
        .await
        .expect("federation");
    fed.apply_pool("edge", 30, 1).await.expect("pool");
    let _op = fed.operator(operator_bin(), "op-1").expect("operator");
    jobs::wait_pool_condition(
        &fed,
        "edge",
        "LedgerVerified",
        "True",
        &[],
        Duration::from_secs(60),
    )
    .await;
    let ns = fed.namespace("unpaid").await.expect("ns");
    // The object store holding the ledger stops answering; the job's two shards finish.
    let frozen = edgeloom_e2e::s3::shared().expect("s3").freeze();
    apply(&fed, &ns, &job_yaml("unpaid", 2, "")).await;
    let uid = wait::until("both tasks finished", Duration::from_secs(90), || async {
        let j = job(&fed, &ns, "unpaid").await;
        let uid = j.metadata.uid.clone().unwrap_or_default();
        let done = all_tasks(&fed, &uid)
            .await
            .iter()
            .filter(|t| t.status.as_ref().and_then(|s| s.phase) == Some(TaskPhase::Succeeded))
            .count();
        if done == 2 {
            Ok(uid)
        } else {
            Err(format!("{done} finished"))
        }
    })
    .await;
    // Deleted before anything could be paid: the job waits for its ledger (the store's
    // calls time out after 30 s, so the deletion meets a ledger that fails).
    Api::<ComputeJob>::namespaced(fed.hub.clone(), &ns)
        .delete("unpaid", &DeleteParams::default())
        .await
        .expect("delete");
    wait::until(
        "the deletion waits for the ledger (event SettlementPending)",
        Duration::from_secs(180),
        || async {
            let events = jobs::events_of(&fed, &ns, "unpaid").await;
            if events.iter().any(|(r, _)| r == "SettlementPending") {
                Ok(())
            } else {
                Err(format!("{events:?}"))
            }
        },
    )
    .await;
    let held = Api::<ComputeJob>::namespaced(fed.hub.clone(), &ns)
        .get_opt("unpaid")
        .await
        .expect("get");
    assert!(
        held.is_some_and(|j| j.metadata.deletion_timestamp.is_some()),
        "the job is held until its results are paid"
    );
    assert_eq!(
        all_tasks(&fed, &uid).await.len(),
        2,
        "its tasks are kept meanwhile"
    );
    drop(frozen);
    wait::until("the job gone", Duration::from_secs(120), || async {
        match Api::<ComputeJob>::namespaced(fed.hub.clone(), &ns)
            .get_opt("unpaid")
            .await
        {
            Ok(None) => Ok(()),
            other => Err(format!(
                "{:?}",
                other.map(|j| j.map(|j| j.metadata.finalizers))
            )),
        }
    })
    .await;
    let paid = wait_receipts(&fed, &uid, 2).await;
    assert_eq!(paid.len(), 2, "both results paid once: {paid:?}");
    assert!(
        all_tasks(&fed, &uid).await.is_empty(),
        "then its tasks went"
    );
}
