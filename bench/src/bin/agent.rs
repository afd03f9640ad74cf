//! Benchmarks of the node agent and the runner (issue #4):
//!
//! - `runner`: training throughput (samples/s) of edgeloom-runner beside PyTorch eager
//!   from Python on the same model, data shape, batch size and thread count, and matmul
//!   GFLOP/s of the runner's Benchmark beside `torch.matmul`, in one run.
//! - `idle`: the agent's own resident memory and CPU while idle (heartbeats only).
//! - `nvml`: latency of the agent's NVML scrape of every GPU beside
//!   `nvidia-smi --query-gpu` for the same fields (GPU machines only; says so elsewhere).
//!
//! ```sh
//! LIBTORCH=$(scripts/install-torch.sh | tail -1) cargo build --release --workspace --bins
//! target/release/agent runner
//! target/release/agent idle
//! ```

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_e2e::federation::{AgentSpec, Federation};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runner vs PyTorch eager.
    Runner,
    /// Agent idle footprint.
    Idle,
    /// NVML scrape latency vs nvidia-smi.
    Nvml,
}

fn python() -> Result<PathBuf> {
    let libtorch = PathBuf::from(
        std::env::var_os("LIBTORCH").context("set LIBTORCH (scripts/install-torch.sh)")?,
    );
    let py = libtorch
        .ancestors()
        .nth(4)
        .context("LIBTORCH is not inside a virtualenv")?
        .join("bin/python");
    if !py.is_file() {
        bail!("{} not found", py.display());
    }
    Ok(py)
}

fn runner(spec: serde_json::Value) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut child = Command::new(edgeloom_bench::sibling("edgeloom-runner")?)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(spec.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["type"] == "result" {
            return Ok(v["metrics"].as_object().cloned().unwrap_or_default());
        }
        if v["type"] == "error" {
            bail!("runner: {}", v["message"]);
        }
    }
    bail!("runner printed no result")
}

fn py(script: &str, args: &[String]) -> Result<f64> {
    let out = Command::new(python()?)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

const PY_TRAIN: &str = r#"
import sys, time, torch
samples, batch, epochs, threads = map(int, sys.argv[1:5])
torch.set_num_threads(threads)
torch.manual_seed(0)
x = torch.randn(samples, 64); y = torch.randint(0, 10, (samples,))
net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.Adam(net.parameters(), lr=0.001)
start = time.perf_counter(); seen = 0
for _ in range(epochs):
    perm = torch.randperm(samples)
    for b in range(0, samples, batch):
        idx = perm[b:b + batch]
        loss = torch.nn.functional.cross_entropy(net(x.index_select(0, idx)), y.index_select(0, idx))
        opt.zero_grad(); loss.backward(); opt.step()
        seen += idx.numel()
print(seen / (time.perf_counter() - start))
"#;

const PY_MATMUL: &str = r#"
import sys, time, torch
n, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
a = torch.randn(n, n); b = torch.randn(n, n)
for _ in range(2): a @ b
start = time.perf_counter(); reps = 0
while reps < 3 or (time.perf_counter() - start < 1.0 and reps < 200):
    a @ b; reps += 1
print(2 * n**3 * reps / (time.perf_counter() - start) / 1e9)
"#;

fn runner_vs_torch() -> Result<()> {
    let threads = 2;
    println!("| workload | edgeloom-runner | PyTorch eager (Python) | ratio |");
    println!("|---|---:|---:|---:|");
    for (samples, batch) in [(20_000u32, 64u32), (20_000, 256)] {
        let epochs = 3;
        let spec = serde_json::json!({
            "device": "cpu", "threads": threads,
            "workload": {"kind": "Train", "model": {"builtin": "Mlp"},
                         "dataset": {"synthetic": {"samples": samples * 5 / 4, "features": 64, "classes": 10}},
                         "parameters": {"epochs": epochs, "batchSize": batch, "optimizer": "Adam", "learningRate": 0.001, "deterministic": false}}
        });
        // The runner trains on the 80% split, so samples * 5/4 gives `samples` training rows.
        let ours = runner(spec)?
            .get("samplesPerSecond")
            .and_then(|v| v.as_f64())
            .context("samplesPerSecond")?;
        let theirs = py(
            PY_TRAIN,
            &[
                samples.to_string(),
                batch.to_string(),
                epochs.to_string(),
                threads.to_string(),
            ],
        )?;
        println!(
            "| MLP 64-128-64-10, Adam, {samples} samples, batch {batch}, {threads} threads, CPU: samples/s | {ours:.0} | {theirs:.0} | {:.2}x |",
            ours / theirs
        );
    }
    for n in [512u32, 1024, 2048] {
        let spec = serde_json::json!({"device": "cpu", "threads": threads, "workload": {"kind": "Benchmark", "parameters": {"matrixSize": n, "deterministic": false}}});
        let ours = runner(spec)?
            .get("gflops")
            .and_then(|v| v.as_f64())
            .context("gflops")?;
        let theirs = py(PY_MATMUL, &[n.to_string(), threads.to_string()])?;
        println!(
            "| matmul {n}x{n} fp32, {threads} threads, CPU: GFLOP/s | {ours:.1} | {theirs:.1} | {:.2}x |",
            ours / theirs
        );
    }
    Ok(())
}

fn proc_field(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

async fn idle() -> Result<()> {
    let fed = Federation::start_bare(&["edge-a"], 1).await?;
    let node = fed.plane.members().next().context("member")?.nodes[0].clone();
    let spec = AgentSpec {
        member: "edge-a".into(),
        node,
        account: "bench".into(),
        datasets: Default::default(),
        cheat: false,
        copy_peers: false,
        inflate_usage: false,
        poison: None,
    };
    let agent = fed.agent(
        &edgeloom_bench::sibling("edgeloom-agent")?,
        &edgeloom_bench::sibling("edgeloom-runner")?,
        &spec,
    )?;
    let pid = agent.process.pid();
    // Wait for readiness (start-up benchmark done, inventory published).
    for _ in 0..300 {
        if edgeloom_e2e::scrape::get(agent.port, "/readyz")
            .await
            .map(|r| r.0 == 200)
            .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t0 = cpu_ticks(pid).unwrap_or(0);
    let secs = 30;
    let mut rss = Vec::new();
    for _ in 0..secs {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(proc_field(pid, "VmRSS:").unwrap_or(0));
    }
    // SAFETY: sysconf(_SC_CLK_TCK) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (cpu_ticks(pid).unwrap_or(0) - t0) as f64 / hz / secs as f64;
    let max = rss.iter().copied().max().unwrap_or(0);
    println!(
        "| agent idle ({secs} s, heartbeat every 2 s, release build) | RSS max | RSS peak (VmHWM) | CPU |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| edgeloom-agent | {:.1} MiB | {:.1} MiB | {:.2}% of a core |",
        max as f64 / 1024.0,
        proc_field(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0,
        cpu * 100.0
    );
    Ok(())
}

fn nvml() -> Result<()> {
    let gpus = edgeloom_agent::probe::Gpus::init();
    if let Some(why) = &gpus.unavailable {
        println!("SKIPPED nvml: no NVIDIA GPU or library on this machine ({why})");
        return Ok(());
    }
    let n = gpus.read().len();
    let mut ours: Vec<f64> = (0..200)
        .map(|_| {
            let t = std::time::Instant::now();
            let read = gpus.read();
            assert_eq!(read.len(), n);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let query = "index,uuid,name,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw,total_energy_consumption";
    let mut smi: Vec<f64> = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let out = Command::new("nvidia-smi")
            .arg(format!("--query-gpu={query}"))
            .arg("--format=csv,noheader")
            .output()?;
        if !out.status.success() {
            bail!(
                "nvidia-smi failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        smi.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "| scrape of {n} GPU(s): product, UUID, memory, utilisation, temperature, power, energy | p50 (ms) | p99 (ms) |"
    );
    println!("|---|---:|---:|");
    let p = edgeloom_bench::percentile;
    println!(
        "| edgeloom-agent (NVML in process, 200 scrapes) | {:.3} | {:.3} |",
        p(&mut ours, 50.0),
        p(&mut ours, 99.0)
    );
    println!(
        "| nvidia-smi --query-gpu (a process per scrape, 20 scrapes) | {:.1} | {:.1} |",
        p(&mut smi, 50.0),
        p(&mut smi, 99.0)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Runner => runner_vs_torch(),
        Cmd::Idle => idle().await,
        Cmd::Nvml => nvml(),
    }
}
