//! The local federated control plane itself: a hub and two members come up as separate
//! kube-apiservers with their own identities, controller managers do their work, an API
//! server can be killed and restarted, and teardown leaves no process behind, also when a
//! test panics.

use edgeloom_e2e::process::alive;
use edgeloom_e2e::{Config, ControlPlane};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenReview};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;
use std::time::{Duration, Instant};

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn hub_and_two_members_are_separate_clusters_and_tear_down_cleanly() {
    let plane = ControlPlane::start(Config::default())
        .await
        .expect("starts");
    let names: Vec<&str> = plane.clusters().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["hub", "edge-a", "edge-b"]);
    let ports: std::collections::HashSet<u16> = plane.clusters().iter().map(|c| c.port).collect();
    assert_eq!(ports.len(), 3, "each cluster has its own kube-apiserver");

    // Simulated nodes exist in members only.
    for member in plane.members() {
        let nodes: Api<Node> = Api::all(member.client().await.expect("client"));
        let mut listed: Vec<String> = nodes
            .list(&Default::default())
            .await
            .expect("nodes")
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        listed.sort();
        assert_eq!(listed, member.nodes);
        assert_eq!(listed.len(), 2);
    }
    let hub_nodes: Api<Node> = Api::all(plane.hub().client().await.expect("client"));
    assert!(
        hub_nodes
            .list(&Default::default())
            .await
            .expect("nodes")
            .items
            .is_empty()
    );

    // The controller manager runs: it creates the default ServiceAccount in each cluster.
    for cluster in plane.clusters() {
        let sas: Api<ServiceAccount> =
            Api::namespaced(cluster.client().await.expect("client"), "default");
        wait_for("default ServiceAccount", Duration::from_secs(60), || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten() }
        })
        .await;
    }

    // Each cluster has its own service-account issuer: a token from edge-a is accepted by
    // edge-a and rejected by edge-b.
    let a = plane
        .cluster("edge-a")
        .expect("edge-a")
        .client()
        .await
        .expect("client");
    let b = plane
        .cluster("edge-b")
        .expect("edge-b")
        .client()
        .await
        .expect("client");
    let sa: Api<ServiceAccount> = Api::namespaced(a.clone(), "default");
    let req: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 600}}))
            .expect("req");
    let token = sa
        .create_token_request("default", &PostParams::default(), &req)
        .await
        .expect("token")
        .status
        .expect("status")
        .token
        .expect("token issued");
    let review = |client: kube::Client, token: String| async move {
        let api: Api<TokenReview> = Api::all(client);
        let tr: TokenReview =
            serde_json::from_value(json!({"spec": {"token": token}})).expect("review");
        api.create(&PostParams::default(), &tr)
            .await
            .expect("review")
            .status
            .and_then(|s| s.authenticated)
            .unwrap_or(false)
    };
    assert!(
        review(a, token.clone()).await,
        "edge-a accepts its own token"
    );
    assert!(!review(b, token).await, "edge-b rejects edge-a's token");

    let pids = plane.pids();
    assert_eq!(pids.len(), 7, "etcd + 3 apiservers + 3 controller managers");
    assert!(pids.iter().all(|p| alive(*p)));
    let dir = plane.dir().to_path_buf();
    drop(plane);
    let still: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(still.is_empty(), "processes left after teardown: {still:?}");
    assert!(!dir.exists(), "working directory removed");
}

#[tokio::test]
async fn a_killed_apiserver_restarts_with_its_data() {
    let mut plane = ControlPlane::start(Config {
        members: vec!["edge-a".into()],
        nodes_per_member: 1,
        controller_manager: false,
        ..Config::default()
    })
    .await
    .expect("starts");
    let member = plane.cluster("edge-a").expect("edge-a");
    let nodes: Api<Node> = Api::all(member.client().await.expect("client"));
    nodes.get("edge-a-node-0").await.expect("node registered");
    plane.kill_apiserver("edge-a").expect("kill");
    assert!(!plane.cluster("edge-a").expect("edge-a").apiserver_running());
    assert!(
        nodes.get("edge-a-node-0").await.is_err(),
        "unreachable while killed"
    );
    plane.restart_apiserver("edge-a").await.expect("restarts");
    let nodes: Api<Node> = Api::all(
        plane
            .cluster("edge-a")
            .expect("edge-a")
            .client()
            .await
            .expect("client"),
    );
    nodes
        .get("edge-a-node-0")
        .await
        .expect("data survives in etcd");
}

#[test]
fn a_panicking_test_leaves_no_processes() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let plane = ControlPlane::start(Config {
                members: vec!["edge-a".into()],
                controller_manager: false,
                ..Config::default()
            })
            .await
            .expect("starts");
            tx.send((plane.pids(), plane.dir().to_path_buf()))
                .expect("send");
            panic!("deliberate panic with the control plane running");
        })
    })
    .join();
    assert!(outcome.is_err(), "the thread panicked");
    let (pids, dir) = rx.recv().expect("pids were sent before the panic");
    assert_eq!(pids.len(), 3);
    let still: Vec<u32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(still.is_empty(), "processes left after a panic: {still:?}");
    assert!(!dir.exists());
}
