//! The inference network end to end: the real `edgeloom-gateway`, real `edgeloom-agent
//! serve` processes dialling out to it, real `edgeloom-runner serve` processes holding a
//! TorchScript model made by Python torch, and HTTP clients speaking KServe v2. The only
//! stand-ins are the attackers (a WebSocket client holding a valid credential that lies).

use ed25519_dalek::SigningKey;
use edgeloom_crds::serving::{Claims, Credential, Frame, ReplicaStatus};
use edgeloom_e2e::process::Process;
use edgeloom_e2e::torch_models;
use edgeloom_e2e::wait;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_edgeloom-gateway")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "edgeloom-gateway-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

const OPERATOR_KEY: [u8; 32] = [42; 32];

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(replica: &str, cluster: &str, region: &str) -> Claims {
    Claims {
        namespace: "ml".into(),
        endpoint: "digits".into(),
        replica: replica.into(),
        node: format!("{cluster}-node-{replica}"),
        cluster: cluster.into(),
        region: region.into(),
        account: format!("acct-{replica}"),
        expires: now() + 3600,
    }
}

fn credential(c: &Claims) -> String {
    Credential::issue(c, &SigningKey::from_bytes(&OPERATOR_KEY))
}

/// One test's world: a model, its Python outputs, and a gateway.
struct World {
    dir: PathBuf,
    model: PathBuf,
    rows: Vec<Vec<f32>>,
    want: Vec<Vec<f32>>,
    gateway: Process,
    addr: String,
    http: reqwest::Client,
}

impl World {
    async fn new(name: &str, extra_endpoints: &str) -> World {
        // reqwest shares the operator's `rustls-no-provider` in a workspace build.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = temp(name);
        let model = dir.join("digits.pt");
        torch_models::digits_torchscript(&model).expect("the digits model is made");
        let rows = torch_models::digits_rows(24);
        let want = torch_models::python_forward(&model, &rows).expect("python's outputs");
        let key = hex::encode(
            SigningKey::from_bytes(&OPERATOR_KEY)
                .verifying_key()
                .to_bytes(),
        );
        let config = dir.join("gateway.yaml");
        std::fs::write(
            &config,
            format!(
                "verifyingKey: {key}\nheartbeatMillis: 1000\nendpoints:\n\
                 - namespace: ml\n  name: digits\n  inputShape: [64]\n  outputShape: [10]\n  timeoutMillis: 20000\n{extra_endpoints}"
            ),
        )
        .unwrap();
        let log = dir.join("gateway.log");
        let gateway = Process::spawn(
            "gateway",
            &bin("edgeloom-gateway"),
            &[
                "--config".into(),
                config.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            &log,
        )
        .expect("the gateway starts");
        let addr = wait::until_some("the gateway's address", Duration::from_secs(30), || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log).ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("listening on ").map(str::to_string))
                })
            }
        })
        .await;
        World {
            dir,
            model,
            rows,
            want,
            gateway,
            addr,
            http: reqwest::Client::new(),
        }
    }

    fn agent(&self, c: &Claims) -> Process {
        self.agent_with_token(c, &credential(c))
    }

    fn agent_with_token(&self, c: &Claims, token: &str) -> Process {
        let cred = self.dir.join(format!("{}.credential", c.replica));
        std::fs::write(&cred, token).unwrap();
        Process::spawn(
            &format!("agent-{}", c.replica),
            &bin("edgeloom-agent"),
            &[
                "--runner".into(),
                bin("edgeloom-runner").display().to_string(),
                "serve".into(),
                "--gateway".into(),
                format!("ws://{}/v2/connect", self.addr),
                "--credential-file".into(),
                cred.display().to_string(),
                "--model".into(),
                self.model.display().to_string(),
                "--input-shape".into(),
                "64".into(),
                "--device".into(),
                "cpu".into(),
                "--threads".into(),
                "1".into(),
                "--max-batch".into(),
                "16".into(),
                "--drain-grace-secs".into(),
                "10".into(),
            ],
            &self.dir.join(format!("agent-{}.log", c.replica)),
        )
        .expect("the agent starts")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("the gateway answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("the gateway answers");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// v2 infer of one row; the outputs and the replica that answered.
    async fn infer(&self, row: &[f32]) -> Result<(Vec<f32>, String), (u16, Value)> {
        let (status, body) = self
            .post(
                "/v2/models/digits.ml/infer",
                json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": row}]}),
            )
            .await;
        if status != 200 {
            return Err((status, body));
        }
        let out = &body["outputs"][0];
        assert_eq!(out["shape"], json!([1, 10]), "{body}");
        let data = out["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        Ok((
            data,
            body["parameters"]["replica"].as_str().unwrap().to_string(),
        ))
    }

    async fn ready_replicas(&self) -> Vec<String> {
        let (_, meta) = self.get("/v2/models/digits.ml").await;
        meta["replicas"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter(|r| r["ready"] == json!(true) && r["draining"] == json!(false))
                    .map(|r| r["replica"].as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_ready(&self, n: usize) {
        wait::until(
            &format!("{n} ready replicas"),
            Duration::from_secs(60),
            || async {
                let r = self.ready_replicas().await;
                if r.len() == n {
                    Ok(())
                } else {
                    Err(format!("{r:?}"))
                }
            },
        )
        .await;
    }

    async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn assert_matches_python(&self, i: usize, got: &[f32]) {
        let want = &self.want[i];
        assert!(
            got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() <= 1e-5),
            "row {i}: gateway {got:?} != python {want:?}"
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("gateway log:\n{}", self.gateway.log_tail(60));
        }
    }
}

/// The socket inodes of `pid` that are listening TCP sockets (from /proc).
fn listening_sockets(pid: u32) -> Vec<String> {
    let mut listening = std::collections::HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A is LISTEN; field 9 is the inode.
            if f.get(3) == Some(&"0A")
                && let Some(inode) = f.get(9)
            {
                listening.insert(inode.to_string());
            }
        }
    }
    let mut found = Vec::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.display().to_string();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']'))
                    && listening.contains(inode)
                {
                    found.push(inode.to_string());
                }
            }
        }
    }
    found
}

/// The children of `pid` (the agent's runner).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .flat_map(|t| {
                    std::fs::read_to_string(t.path().join("children"))
                        .unwrap_or_default()
                        .split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect::<Vec<u32>>()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endpoint_over_two_clusters_answers_like_python_and_survives_a_killed_agent() {
    let w = World::new("two-replicas", "").await;
    let mut a = w.agent(&claims("r0", "edge-a", "eu"));
    let b = w.agent(&claims("r1", "edge-b", "us"));
    w.wait_ready(2).await;
    let (status, ready) = w.get("/v2/models/digits.ml/ready").await;
    assert_eq!((status, &ready["ready"]), (200, &json!(true)));

    // Every row answers as Python torch computes it, and both replicas serve.
    let mut served_by = std::collections::BTreeSet::new();
    for (i, row) in w.rows.iter().enumerate() {
        let (out, replica) = w.infer(row).await.expect("an answer");
        w.assert_matches_python(i, &out);
        served_by.insert(replica);
    }
    assert_eq!(served_by.len(), 2, "both replicas served: {served_by:?}");

    // The plain JSON form, three rows at once.
    let (status, body) = w
        .post(
            "/v1/endpoints/ml/digits/predict",
            json!({"instances": &w.rows[..3]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for i in 0..3 {
        let got: Vec<f32> = body["predictions"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        w.assert_matches_python(i, &got);
    }

    // Concurrent requests are batched by the runners and still answer row by row.
    let answers = futures::future::join_all(w.rows.iter().map(|r| w.infer(r))).await;
    for (i, a) in answers.into_iter().enumerate() {
        w.assert_matches_python(i, &a.expect("an answer").0);
    }

    // No agent or runner listens on any TCP socket: the replicas dialled out.
    for agent in [&a, &b] {
        assert_eq!(listening_sockets(agent.pid()), Vec::<String>::new());
        let runners = children(agent.pid());
        assert_eq!(runners.len(), 1, "one runner per agent");
        assert_eq!(listening_sockets(runners[0]), Vec::<String>::new());
    }

    // Malformed requests get a 400 naming what is wrong; nothing crashes.
    let bad = [
        (
            json!({"inputs": [{"name": "input", "shape": [1, 65], "datatype": "FP32", "data": vec![0.0; 65]}]}),
            "inputs[0].shape",
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "INT64", "data": vec![0; 64]}]}),
            "inputs[0].datatype",
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 63]}]}),
            "data holds 63 values",
        ),
        (
            json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1, 2, "three"]}]}),
            "data[2]",
        ),
        (json!({"inputs": []}), "exactly one tensor"),
        (json!({"input": []}), "inputs"),
    ];
    for (body, want) in bad {
        let (status, answer) = w.post("/v2/models/digits.ml/infer", body).await;
        assert_eq!(status, 400, "{answer}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{msg:?} does not name {want:?}");
    }
    for (body, want) in [
        (
            json!({"instances": [[1.0, 2.0]]}),
            "instances[0] holds 2 numbers",
        ),
        // 63 + 65 numbers are two rows' worth, but not two rows.
        (
            json!({"instances": [vec![0.0; 63], vec![0.0; 65]]}),
            "instances[0] holds 63",
        ),
        (json!({"instances": []}), "at least one row"),
    ] {
        let (status, answer) = w.post("/v1/endpoints/ml/digits/predict", body).await;
        assert_eq!(status, 400, "{answer}");
        let msg = answer["error"].as_str().unwrap_or_default();
        assert!(msg.contains(want), "{msg:?} does not name {want:?}");
    }
    let (status, _) = w.post("/v2/models/nope.ml/infer", json!({})).await;
    assert_eq!(status, 404);

    // Kill one agent (and so its runner's pipe): every request still succeeds.
    a.kill();
    for round in 0..3 {
        for (i, row) in w.rows.iter().enumerate() {
            let (out, _) = w
                .infer(row)
                .await
                .unwrap_or_else(|e| panic!("round {round} row {i} failed after the kill: {e:?}"));
            w.assert_matches_python(i, &out);
        }
    }
    w.wait_ready(1).await;
    assert_eq!(w.ready_replicas().await, vec!["r1".to_string()]);

    let metrics = w.metrics().await;
    assert!(
        metrics.contains(r#"edgeloom_gateway_requests_total{code="400",endpoint="ml/digits"} 9"#),
        "{metrics}"
    );
    assert!(metrics.contains("edgeloom_gateway_request_duration_seconds_bucket"));
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_runner_is_restarted_and_a_draining_agent_loses_no_request() {
    let w = World::new("restart-drain", "").await;
    let mut a = w.agent(&claims("r0", "edge-a", "eu"));
    w.wait_ready(1).await;
    let runner = children(a.pid())[0];
    // SAFETY: kill(2) on a process this test started (the agent's child).
    unsafe {
        libc::kill(runner as libc::pid_t, libc::SIGKILL);
    }
    // With the only runner down, requests are held until the restarted runner is ready.
    for (i, row) in w.rows.iter().enumerate().take(8) {
        let (out, _) = w.infer(row).await.expect("held, then answered");
        w.assert_matches_python(i, &out);
    }
    let restarted = children(a.pid());
    assert_eq!(restarted.len(), 1);
    assert_ne!(restarted[0], runner, "the agent started a new runner");

    // SIGTERM while 48 requests are in flight: the agent drains (answers what it holds;
    // the gateway sends it nothing new) and every request is answered, by it or by r1.
    let _b = w.agent(&claims("r1", "edge-b", "us"));
    w.wait_ready(2).await;
    let in_flight =
        futures::future::join_all(w.rows.iter().chain(w.rows.iter()).map(|r| w.infer(r)));
    let (answers, status) = tokio::join!(in_flight, async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        tokio::task::block_in_place(|| a.terminate(Duration::from_secs(30)))
    });
    for (i, ans) in answers.into_iter().enumerate() {
        let (out, _) = ans.unwrap_or_else(|e| panic!("request {i} was lost in the drain: {e:?}"));
        w.assert_matches_python(i % w.rows.len(), &out);
    }
    assert!(status.expect("the agent exits").success());
    w.wait_ready(1).await;
    assert_eq!(w.ready_replicas().await, vec!["r1".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_are_held_while_cold_and_refused_clearly_when_the_queue_is_full() {
    let w = World::new(
        "cold",
        "- namespace: ml\n  name: never\n  inputShape: [64]\n  outputShape: [10]\n  timeoutMillis: 300\n\
         - namespace: ml\n  name: full\n  inputShape: [64]\n  outputShape: [10]\n  queueLimit: 0\n",
    )
    .await;
    let (status, _) = w.get("/v2/models/digits.ml/ready").await;
    assert_eq!(status, 503);
    // A request sent before any replica exists is held, then answered once one is ready.
    let held = w.infer(&w.rows[5]);
    let start = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.agent(&claims("r0", "edge-a", "eu"))
    };
    let (answer, _agent) = tokio::join!(held, start);
    w.assert_matches_python(5, &answer.expect("held until a replica was ready").0);

    let one = json!({"instances": [vec![0.0; 64]]});
    let (status, body) = w.post("/v1/endpoints/ml/never/predict", one.clone()).await;
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("became ready within its 300 ms"),
        "{body}"
    );
    let (status, body) = w.post("/v1/endpoints/ml/full/predict", one).await;
    assert_eq!(status, 503);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("hold queue is full"),
        "{body}"
    );
}

/// Dials the gateway as a replica (an attacker's own client).
async fn dial(
    addr: &str,
    token: Option<&str>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    u16,
> {
    let mut req = format!("ws://{addr}/v2/connect")
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{e}"),
    }
}

type WsSink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

/// A replica of the test's own making: it says it is ready with `output_shape`, and a
/// background reader answers the gateway's pings (tungstenite does while reading) and
/// drops every request. Aborting the reader makes it go silent.
async fn fake_replica(
    addr: &str,
    c: &Claims,
    output_shape: Vec<u32>,
) -> (WsSink, tokio::task::JoinHandle<()>) {
    let ws = dial(addr, Some(&credential(c))).await.expect("accepted");
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::Binary(
        Frame::Status(ReplicaStatus {
            ready: true,
            output_shape,
            ..Default::default()
        })
        .encode()
        .into(),
    ))
    .await
    .unwrap();
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    (sink, reader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_altered_expired_or_missing_credentials_are_refused() {
    let w = World::new("auth", "").await;
    let good = claims("r0", "edge-a", "eu");
    let stranger = SigningKey::from_bytes(&[7; 32]);
    let altered = {
        let token = credential(&good);
        let (_, sig) = token.split_once('.').unwrap();
        let forged = Claims {
            account: "mallory".into(),
            ..good.clone()
        };
        format!(
            "{}.{sig}",
            hex::encode(serde_json::to_vec(&forged).unwrap())
        )
    };
    let cases = [
        (Some(Credential::issue(&good, &stranger)), "forged"),
        (Some(altered), "altered"),
        (
            Some(credential(&Claims {
                expires: now() - 1,
                ..good.clone()
            })),
            "expired",
        ),
        (
            Some(credential(&Claims {
                endpoint: "other".into(),
                ..good.clone()
            })),
            "another endpoint",
        ),
        (None, "missing"),
    ];
    for (token, what) in cases {
        assert_eq!(
            dial(&w.addr, token.as_deref()).await.err(),
            Some(401),
            "a {what} credential must be refused"
        );
    }
    // A real agent with a forged credential says why in its log, and keeps trying.
    let forger = w.agent_with_token(
        &Claims {
            replica: "forger".into(),
            ..good.clone()
        },
        &Credential::issue(&good, &stranger),
    );
    wait::until_true(
        "the agent's refusal in its log",
        Duration::from_secs(30),
        || async {
            forger
                .log_tail(50)
                .contains("the gateway refused the replica (401 Unauthorized)")
        },
    )
    .await;
    assert!(
        forger.log_tail(50).contains("does not hold"),
        "{}",
        forger.log_tail(50)
    );
    assert!(w.ready_replicas().await.is_empty());
    drop(forger);

    // The operator's own credential is accepted (so the refusals above are the checks).
    let (_sink, _reader) = fake_replica(&w.addr, &good, vec![10]).await;
    w.wait_ready(1).await;
    // The same replica name signed for another node cannot take over its connection.
    let elsewhere = Claims {
        node: "another-node".into(),
        ..good.clone()
    };
    assert_eq!(
        dial(&w.addr, Some(&credential(&elsewhere))).await.err(),
        Some(409)
    );
    // A replica whose model answers rows of another shape is never ready.
    let (_s2, _r2) = fake_replica(&w.addr, &claims("r9", "edge-b", "us"), vec![11]).await;
    wait::until_true("r9 connected", Duration::from_secs(10), || async {
        let (_, meta) = w.get("/v2/models/digits.ml").await;
        meta["replicas"].as_array().is_some_and(|rs| {
            rs.iter()
                .any(|r| r["replica"] == json!("r9") && r["ready"] == json!(false))
        })
    })
    .await;
    assert_eq!(w.ready_replicas().await, vec!["r0".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lying_replica_is_ejected_and_cannot_answer_for_another() {
    let w = World::new("liar", "").await;
    let _honest = w.agent(&claims("honest", "edge-a", "eu"));
    w.wait_ready(1).await;
    // The liar holds a valid credential. It answers each request it gets with the wrong
    // shape, and also "answers" an id it was never sent. (Answering another replica's
    // pending request is the registry's unit test: a real race cannot aim at one.)
    let mut liar = dial(&w.addr, Some(&credential(&claims("liar", "edge-b", "us"))))
        .await
        .expect("accepted");
    liar.send(Message::Binary(
        Frame::Status(ReplicaStatus {
            ready: true,
            output_shape: vec![10],
            ..Default::default()
        })
        .encode()
        .into(),
    ))
    .await
    .unwrap();
    let liar_task = tokio::spawn(async move {
        let mut lies = 0u32;
        while let Some(Ok(msg)) = liar.next().await {
            if let Message::Binary(b) = msg
                && let Ok(Frame::Request { id, .. }) = Frame::decode(&b)
            {
                for (lie_id, rows) in [(id + 1_000_000, 1), (id, 2)] {
                    let lie = Frame::Reply {
                        id: lie_id,
                        shape: vec![rows, 10],
                        data: vec![9.0; 10 * rows as usize],
                    };
                    if liar
                        .send(Message::Binary(lie.encode().into()))
                        .await
                        .is_err()
                    {
                        return lies;
                    }
                    lies += 1;
                }
            }
        }
        lies
    });
    w.wait_ready(2).await;
    let answers = futures::future::join_all(w.rows.iter().map(|r| w.infer(r))).await;
    for (i, a) in answers.into_iter().enumerate() {
        let (out, replica) = a.unwrap_or_else(|e| panic!("row {i}: {e:?}"));
        assert_eq!(replica, "honest");
        w.assert_matches_python(i, &out);
    }
    for (i, row) in w.rows.iter().enumerate() {
        w.assert_matches_python(i, &w.infer(row).await.expect("an answer").0);
    }
    // The liar was ejected after 3 failures in a row, and its lies were counted.
    let lies = liar_task.await.unwrap();
    assert!(
        lies >= 3,
        "the liar got requests before its ejection ({lies} lies)"
    );
    // Reconnecting does not wipe its record: it is barred for the cool-down.
    assert_eq!(
        dial(&w.addr, Some(&credential(&claims("liar", "edge-b", "us"))))
            .await
            .err(),
        Some(403)
    );
    assert_eq!(w.ready_replicas().await, vec!["honest".to_string()]);
    let metrics = w.metrics().await;
    assert!(
        metrics.contains(
            r#"edgeloom_gateway_ejections_total{endpoint="ml/digits",reason="failures"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"edgeloom_gateway_unsolicited_frames_total{endpoint="ml/digits"} 0"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_replica_is_ejected_within_three_heartbeats_and_its_requests_retried() {
    let w = World::new("silent", "").await;
    let _honest = w.agent(&claims("honest", "edge-a", "eu"));
    w.wait_ready(1).await;
    // The silent replica says it is ready and answers pings; then it stops reading (so
    // answers no ping and no request), like a node whose network vanished.
    let (silent, reader) = fake_replica(&w.addr, &claims("silent", "edge-b", "us"), vec![10]).await;
    w.wait_ready(2).await;
    reader.abort();
    let answers = futures::future::join_all(w.rows.iter().map(|r| w.infer(r))).await;
    for (i, a) in answers.into_iter().enumerate() {
        w.assert_matches_python(i, &a.unwrap_or_else(|e| panic!("row {i}: {e:?}")).0);
    }
    w.wait_ready(1).await;
    let metrics = w.metrics().await;
    assert!(
        metrics.contains(
            r#"edgeloom_gateway_ejections_total{endpoint="ml/digits",reason="heartbeat"} 1"#
        ),
        "{metrics}"
    );
    drop(silent);
}

#[test]
fn the_overhead_benchmark_runs_ci_sized() {
    let out = std::process::Command::new(bin("serving"))
        .args([
            "overhead",
            "--requests",
            "40",
            "--rounds",
            "1",
            "--warmup",
            "10",
        ])
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let round = stdout
        .lines()
        .find(|l| l.starts_with("0 | "))
        .unwrap_or_else(|| panic!("no round line in {stdout}"));
    // Every answer through the gateway equals the runner's own.
    assert!(round.ends_with("| 0"), "{round}");
    assert!(stdout.contains("added by the gateway and the dial-out connection: p50"));
}

#[test]
fn the_throughput_benchmark_runs_ci_sized() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(bin("serving"))
        .current_dir(&root)
        .args([
            "throughput",
            "--seconds",
            "1",
            "--rounds",
            "1",
            "--clients",
            "4",
            "--fastapi-workers",
            "1",
        ])
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rounds: Vec<&str> = stdout.lines().filter(|l| l.starts_with("0 | ")).collect();
    assert_eq!(rounds.len(), 2, "one line per arm: {stdout}");
    for line in rounds {
        // requests/s > 0, and no wrong answer or error in either arm.
        let cols: Vec<&str> = line.split(" | ").collect();
        assert!(cols[2].parse::<f64>().unwrap() > 0.0, "{line}");
        assert_eq!(&cols[5..], ["0", "0"], "{line}");
    }
}
