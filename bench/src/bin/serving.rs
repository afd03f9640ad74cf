//! Serving figures (issue #14), release build:
//!
//! - `overhead`: the latency a request gains by going through `edgeloom-gateway` and an
//!   agent's dial-out WebSocket, against the same request written straight to the serving
//!   runner's pipe. One process holds both arms and alternates them in rounds, so both see
//!   the same machine. The client of each arm is the thinnest there is: blocking writes
//!   and reads on the pipe, and a hand-written keep-alive HTTP/1.1 client on one TCP
//!   connection (so the figure is the gateway's, not a client library's). Requests are
//!   sent one at a time (no batching in either arm: `maxDelayMicros` 0), each one row of
//!   the 8x8 digits through the digits MLP (TorchScript made by Python torch), and every
//!   answer of the gateway arm is compared with the direct arm's.
//!
//! - `throughput`: what a user would write instead: a FastAPI app around `torch.jit.load`
//!   under uvicorn (bench/fastapi/server.py; scripts/install-fastapi.sh), against an
//!   edgeloom endpoint (the gateway and one replica), same model file, same JSON body
//!   (`{"instances": [row]}`), one libtorch thread per model process. A closed loop of
//!   `--clients` keep-alive connections sends one-row requests for `--seconds` per arm;
//!   it prints requests per second and p50/p99 latency, alternating the arms in rounds,
//!   and checks every answer against Python torch's outputs.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/serving overhead                       # 3 rounds x 2,000 requests per arm
//! target/release/serving throughput                     # 3 rounds x 10 s per arm, 16 clients
//! target/release/serving overhead --requests 40 --rounds 1 --warmup 10    # CI-sized (tests)
//! target/release/serving throughput --seconds 1 --rounds 1 --clients 4    # CI-sized (tests)
//! ```

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_bench::{percentile, sibling as bin};
use edgeloom_crds::serving::{Claims, Credential, Frame, ServeConfig};
use edgeloom_e2e::process::Process;
use edgeloom_e2e::torch_models;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Added latency of the gateway + dial-out path against the runner's pipe.
    Overhead {
        /// Requests per arm per round.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Rounds (each runs both arms).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Requests per arm before measuring (connections, caches, allocator).
        #[arg(long, default_value_t = 200)]
        warmup: usize,
    },
    /// Requests per second and latency under a closed loop, beside FastAPI + uvicorn.
    Throughput {
        /// Concurrent keep-alive connections.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Seconds measured per arm per round (after 1 s of warm-up).
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds (each runs every arm).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// uvicorn worker processes of the FastAPI arms (one arm each).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        fastapi_workers: Vec<u32>,
    },
}

const KEY: [u8; 32] = [11; 32];

/// The runner's pipe, driven directly.
struct Direct {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    next: u64,
}

impl Direct {
    fn start(cfg: &ServeConfig) -> Result<Direct> {
        let mut child = Command::new(bin("edgeloom-runner")?)
            .arg("serve")
            .arg(serde_json::to_string(cfg)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting edgeloom-runner serve")?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        match Frame::read_from(&mut stdout)? {
            Some(Ok(Frame::Status(s))) if s.ready => {}
            other => bail!("the runner did not become ready: {other:?}"),
        }
        Ok(Direct {
            child,
            stdin,
            stdout,
            next: 0,
        })
    }

    fn call(&mut self, row: &[f32]) -> Result<Vec<f32>> {
        self.next += 1;
        Frame::Request {
            id: self.next,
            shape: vec![1, row.len() as u32],
            data: row.to_vec(),
        }
        .write_to(&mut self.stdin)?;
        self.stdin.flush()?;
        match Frame::read_from(&mut self.stdout)? {
            Some(Ok(Frame::Reply { id, data, .. })) if id == self.next => Ok(data),
            other => bail!("unexpected answer {other:?}"),
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One keep-alive HTTP/1.1 connection to the gateway.
struct Http {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    host: String,
}

impl Http {
    fn connect(addr: &str) -> Result<Http> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Http {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            host: addr.to_string(),
        })
    }

    fn post(&mut self, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        );
        let mut req = head.into_bytes();
        req.extend_from_slice(body);
        self.writer.write_all(&req)?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {status_line:?}"))?;
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut out = vec![0u8; len];
        self.reader.read_exact(&mut out)?;
        Ok((status, out))
    }

    fn infer(&mut self, row: &[f32]) -> Result<Vec<f32>> {
        let body = serde_json::to_vec(&serde_json::json!({
            "inputs": [{"name": "input", "shape": [1, row.len()], "datatype": "FP32", "data": row}]
        }))?;
        let (status, out) = self.post("/v2/models/digits.bench/infer", &body)?;
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        if status != 200 {
            bail!("gateway answered {status}: {v}");
        }
        Ok(v["outputs"][0]["data"]
            .as_array()
            .context("outputs[0].data")?
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
            .collect())
    }
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<String>,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The gateway and one replica (agent + runner) on loopback.
struct Stack {
    addr: String,
    _gateway: Process,
    _agent: Process,
}

impl Stack {
    fn start(
        dir: &std::path::Path,
        model: &std::path::Path,
        max_delay_micros: u64,
    ) -> Result<Stack> {
        let key = ed25519_dalek::SigningKey::from_bytes(&KEY);
        let config = dir.join("gateway.yaml");
        std::fs::write(
            &config,
            format!(
                "verifyingKey: {}\nendpoints:\n- namespace: bench\n  name: digits\n  inputShape: [64]\n  outputShape: [10]\n",
                hex::encode(key.verifying_key().to_bytes())
            ),
        )?;
        let glog = dir.join("gateway.log");
        let _ = std::fs::remove_file(&glog);
        let gateway = Process::spawn_with_env(
            "gateway",
            &bin("edgeloom-gateway")?,
            &[
                "--config".into(),
                config.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
            ],
            &[("RUST_LOG", "warn")],
            &glog,
        )?;
        let addr = wait_for("the gateway", Duration::from_secs(30), || {
            std::fs::read_to_string(&glog).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("listening on ").map(str::to_string))
            })
        })?;
        let cred = dir.join("credential");
        let expires = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
            + 24 * 3600;
        std::fs::write(
            &cred,
            Credential::issue(
                &Claims {
                    namespace: "bench".into(),
                    endpoint: "digits".into(),
                    replica: "r0".into(),
                    node: "bench-node".into(),
                    cluster: "local".into(),
                    region: String::new(),
                    account: "bench".into(),
                    expires,
                },
                &key,
            ),
        )?;
        let agent = Process::spawn_with_env(
            "agent",
            &bin("edgeloom-agent")?,
            &[
                "--runner".into(),
                bin("edgeloom-runner")?.display().to_string(),
                "serve".into(),
                "--gateway".into(),
                format!("ws://{addr}/v2/connect"),
                "--credential-file".into(),
                cred.display().to_string(),
                "--model".into(),
                model.display().to_string(),
                "--input-shape".into(),
                "64".into(),
                "--device".into(),
                "cpu".into(),
                "--threads".into(),
                "1".into(),
                "--max-batch".into(),
                "32".into(),
                "--max-delay-micros".into(),
                max_delay_micros.to_string(),
            ],
            &[("RUST_LOG", "warn")],
            &dir.join("agent.log"),
        )?;
        Ok(Stack {
            addr,
            _gateway: gateway,
            _agent: agent,
        })
    }
}

struct Stats {
    p50: f64,
    p99: f64,
}

fn stats(mut micros: Vec<f64>) -> Stats {
    Stats {
        p50: percentile(&mut micros, 50.0),
        p99: percentile(&mut micros, 99.0),
    }
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn overhead(requests: usize, rounds: usize, warmup: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgeloom-serving-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let model = dir.join("digits.pt");
    torch_models::digits_torchscript(&model).map_err(anyhow::Error::msg)?;
    let rows = torch_models::digits_rows(256);
    let cfg = ServeConfig {
        model: model.display().to_string(),
        input_shape: vec![64],
        max_batch: 16,
        max_delay_micros: 0,
        threads: 1,
        device: Some("cpu".into()),
        precision: None,
    };

    let stack = Stack::start(&dir, &model, 0)?;
    let addr = stack.addr.clone();
    let mut http = wait_for("the replica", Duration::from_secs(60), || {
        let mut h = Http::connect(&addr).ok()?;
        h.infer(&rows[0]).ok().map(|_| ())?;
        Some(String::new())
    })
    .and_then(|_| Http::connect(&addr))?;
    let mut direct = Direct::start(&cfg)?;

    for i in 0..warmup {
        let r = &rows[i % rows.len()];
        direct.call(r)?;
        http.infer(r)?;
    }
    println!(
        "serving overhead: {requests} sequential 1-row requests per arm per round, {rounds} rounds, {warmup} warm-up"
    );
    println!(
        "round | direct p50 / p99 (us) | gateway p50 / p99 (us) | added p50 / p99 (us) | answers differing"
    );
    let (mut added50, mut added99) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (mut d, mut g) = (Vec::with_capacity(requests), Vec::with_capacity(requests));
        let mut differing = 0;
        let mut want = Vec::with_capacity(requests);
        for i in 0..requests {
            let r = &rows[i % rows.len()];
            let t = Instant::now();
            want.push(direct.call(r)?);
            d.push(t.elapsed().as_secs_f64() * 1e6);
        }
        for (i, w) in want.iter().enumerate() {
            let r = &rows[i % rows.len()];
            let t = Instant::now();
            let got = http.infer(r)?;
            g.push(t.elapsed().as_secs_f64() * 1e6);
            if got != *w {
                differing += 1;
            }
        }
        let (sd, sg) = (stats(d), stats(g));
        println!(
            "{round} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {differing}",
            sd.p50,
            sd.p99,
            sg.p50,
            sg.p99,
            sg.p50 - sd.p50,
            sg.p99 - sd.p99
        );
        added50.push(sg.p50 - sd.p50);
        added99.push(sg.p99 - sd.p99);
    }
    let (m50, s50) = mean_sd(&added50);
    let (m99, s99) = mean_sd(&added99);
    println!(
        "added by the gateway and the dial-out connection: p50 {m50:.0} +- {s50:.0} us, p99 {m99:.0} +- {s99:.0} us (mean +- sd over {rounds} rounds)"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One keep-alive HTTP/1.1 connection, async (the throughput load generator).
struct AsyncHttp {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    host: String,
}

impl AsyncHttp {
    async fn connect(addr: &str) -> Result<AsyncHttp> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(AsyncHttp {
            reader: tokio::io::BufReader::new(r),
            writer: w,
            host: addr.to_string(),
        })
    }

    /// POSTs `{"instances": [row]}` to `path`; the first prediction.
    async fn predict(&mut self, path: &str, row: &[f32]) -> Result<Vec<f32>> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let body = serde_json::to_vec(&serde_json::json!({ "instances": [row] }))?;
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        self.writer.write_all(&req).await?;
        let mut line = String::new();
        self.reader.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {line:?}"))?;
        let (mut len, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.reader.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse()?;
                } else if k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
                    chunked = true;
                }
            }
        }
        if chunked {
            bail!("chunked responses are not expected from either server");
        }
        let mut out = vec![0u8; len];
        self.reader.read_exact(&mut out).await?;
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        if status != 200 {
            bail!("{status}: {v}");
        }
        Ok(v["predictions"][0]
            .as_array()
            .context("predictions[0]")?
            .iter()
            .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
            .collect())
    }
}

struct Load {
    requests: usize,
    per_second: f64,
    p50: f64,
    p99: f64,
    wrong: usize,
    errors: usize,
}

/// A closed loop of `clients` connections for `warmup` then `seconds`.
async fn load(
    addr: &str,
    path: &str,
    clients: usize,
    seconds: u64,
    rows: &std::sync::Arc<Vec<Vec<f32>>>,
    want: &std::sync::Arc<Vec<Vec<f32>>>,
) -> Result<Load> {
    let start = Instant::now() + Duration::from_secs(1);
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (addr, path, rows, want) = (
            addr.to_string(),
            path.to_string(),
            rows.clone(),
            want.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = AsyncHttp::connect(&addr).await?;
            let (mut lat, mut wrong, mut errors) = (Vec::new(), 0usize, 0usize);
            let mut i = c * 7;
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let k = i % rows.len();
                i += 1;
                match conn.predict(&path, &rows[k]).await {
                    Ok(out) => {
                        if t >= start {
                            lat.push(t.elapsed().as_secs_f64() * 1e6);
                            if out.len() != want[k].len()
                                || out.iter().zip(&want[k]).any(|(a, b)| (a - b).abs() > 1e-4)
                            {
                                wrong += 1;
                            }
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("request failed: {e}");
                        }
                        conn = AsyncHttp::connect(&addr).await?;
                    }
                }
            }
            anyhow::Ok((lat, wrong, errors))
        }));
    }
    let (mut all, mut wrong, mut errors) = (Vec::new(), 0, 0);
    for t in tasks {
        let (l, w, e) = t.await??;
        all.extend(l);
        wrong += w;
        errors += e;
    }
    let requests = all.len();
    Ok(Load {
        requests,
        per_second: requests as f64 / seconds as f64,
        p50: percentile(&mut all, 50.0),
        p99: percentile(&mut all, 99.0),
        wrong,
        errors,
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn throughput(clients: usize, seconds: u64, rounds: usize, workers: Vec<u32>) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("edgeloom-serving-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let model = dir.join("digits.pt");
    torch_models::digits_torchscript(&model).map_err(anyhow::Error::msg)?;
    let rows = torch_models::digits_rows(256);
    let want = torch_models::python_forward(&model, &rows).map_err(anyhow::Error::msg)?;
    let (rows, want) = (std::sync::Arc::new(rows), std::sync::Arc::new(want));
    let python = Command::new("scripts/install-fastapi.sh")
        .stderr(Stdio::inherit())
        .output()
        .context("scripts/install-fastapi.sh (run from the repository root)")?;
    if !python.status.success() {
        bail!("scripts/install-fastapi.sh failed");
    }
    let python = String::from_utf8(python.stdout)?
        .lines()
        .last()
        .context("install-fastapi.sh printed no python")?
        .to_string();
    let server = std::path::Path::new("bench/fastapi/server.py").canonicalize()?;

    let stack = Stack::start(&dir, &model, 0)?;
    let mut fastapi = Vec::new();
    for w in &workers {
        let port = free_port()?;
        let p = Process::spawn(
            &format!("fastapi-{w}"),
            std::path::Path::new(&python),
            &[
                server.display().to_string(),
                model.display().to_string(),
                port.to_string(),
                "1".into(),
                w.to_string(),
            ],
            &dir.join(format!("fastapi-{w}.log")),
        )?;
        fastapi.push((
            format!("FastAPI + uvicorn, {w} worker(s)"),
            format!("127.0.0.1:{port}"),
            "/predict".to_string(),
            p,
        ));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut arms: Vec<(String, String, String)> = vec![(
        "edgeloom (gateway + 1 replica)".into(),
        stack.addr.clone(),
        "/v1/endpoints/bench/digits/predict".into(),
    )];
    arms.extend(
        fastapi
            .iter()
            .map(|(n, a, p, _)| (n.clone(), a.clone(), p.clone())),
    );
    for (name, addr, path) in &arms {
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let ok = match AsyncHttp::connect(addr).await {
                    Ok(mut c) => c.predict(path, &rows[0]).await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("{name} did not answer within 90 s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })?;
    }
    println!(
        "serving throughput: closed loop of {clients} keep-alive connections, 1-row requests, {seconds} s per arm per round, {rounds} rounds; one libtorch thread per model process"
    );
    println!("round | arm | requests/s | p50 (ms) | p99 (ms) | wrong answers | errors");
    let mut summary: Vec<(String, Vec<f64>, Vec<f64>)> = arms
        .iter()
        .map(|(n, _, _)| (n.clone(), Vec::new(), Vec::new()))
        .collect();
    for round in 0..rounds {
        for (k, (name, addr, path)) in arms.iter().enumerate() {
            let l = rt.block_on(load(addr, path, clients, seconds, &rows, &want))?;
            println!(
                "{round} | {name} | {:.0} | {:.2} | {:.2} | {} | {}",
                l.per_second,
                l.p50 / 1e3,
                l.p99 / 1e3,
                l.wrong,
                l.errors
            );
            let _ = l.requests;
            summary[k].1.push(l.per_second);
            summary[k].2.push(l.p99 / 1e3);
        }
    }
    println!("arm | requests/s (mean +- sd) | p99 ms (mean +- sd)");
    for (name, rps, p99) in &summary {
        let (m, s) = mean_sd(rps);
        let (pm, ps) = mean_sd(p99);
        println!("{name} | {m:.0} +- {s:.0} | {pm:.2} +- {ps:.2}");
    }
    drop(fastapi);
    drop(stack);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Overhead {
            requests,
            rounds,
            warmup,
        } => overhead(requests, rounds, warmup),
        Cmd::Throughput {
            clients,
            seconds,
            rounds,
            fastapi_workers,
        } => throughput(clients, seconds, rounds, fastapi_workers),
    }
}
