//! Federated learning beside Flower, in one run (BENCHMARKS.md, "Federated learning").
//!
//! One seeded partition of the 8x8 digits per (partition, seed): IID, and Dirichlet
//! alpha = 0.5 and 0.1 over the classes, across 12 nodes in 3 member clusters (4 each),
//! with one shared stratified test set (every fifth row of each class) that no node holds.
//! Every arm trains the same model (edgeloom's built-in Mlp, 64-128-64-10) from the same
//! initial weights with the same optimiser (SGD, momentum 0.9), learning rate, batch size
//! and local epochs:
//!
//! - `central`: all training rows on one machine, `rounds x localEpochs` epochs (the upper
//!   bound);
//! - `flower`: Flower 1.42 flat FedAvg in its deployment mode on 127.0.0.1 (one SuperLink,
//!   one SuperNode per node; bench/flower), on the first `--flower-seeds` seeds;
//! - `flat`, `tree-k1`, `tree-k5`, `tree-k5-m`: edgeloom Flat, Tree with the hub
//!   aggregating every round or every 5 rounds, and Tree k = 5 with server momentum at the
//!   hub (FedAvgM, `--server-momentum`), run by `edgeloom-runner simulate` (the runner's
//!   local training and edgeloom-fl's aggregation, without the control plane). The Tree
//!   arms count the expected bytes of the hub's audits (`--audit-rate`, the API's default
//!   0.1) in their bytes sent to the hub;
//! - `tree-k5-prox`: a research arm, not offered by the API: Tree k = 5 with FedProx
//!   (`--proximal-mu`, anchored on the latest global model) against member drift.
//!
//! It prints, for each partition and arm: final test accuracy (mean and sample sd over
//! the seeds), rounds to reach 90%, bytes sent to the hub, and the wall time of a round.
//! The wall time of edgeloom's rounds is measured on the real system in the same run
//! (`--wall-rounds`): a hub and 3 member clusters of real API servers, 12 real agents
//! running the runner, SeaweedFS, a Flat and a Tree job on the first alpha = 0.5 partition;
//! Flower's on the same partition, deployment mode, same machine.
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo build --release -p edgeloom-bench
//! target/release/federated                       # 5 seeds, 40 rounds, Flower on 1 seed
//! target/release/federated --seeds 2 --rounds 10 --flower-seeds 0 --wall-rounds 0   # quick
//! ```

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use edgeloom_crds::ComputeJob;
use edgeloom_e2e::federation::Federation;
use edgeloom_e2e::manifests;
use kube::api::Api;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Cli {
    /// Seeds per partition (each its own partition and initial model).
    #[arg(long, default_value_t = 5)]
    seeds: u64,
    /// Federated rounds.
    #[arg(long, default_value_t = 40)]
    rounds: u32,
    /// Nodes.
    #[arg(long, default_value_t = 12)]
    nodes: usize,
    /// Member clusters (nodes are split evenly).
    #[arg(long, default_value_t = 3)]
    clusters: usize,
    /// Local epochs per round.
    #[arg(long, default_value_t = 2)]
    local_epochs: u32,
    /// Learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: u32,
    /// Partitions: `iid` or a Dirichlet alpha.
    #[arg(long, value_delimiter = ',', default_value = "iid,0.5,0.1")]
    partitions: Vec<String>,
    /// Server momentum of the `tree-k5-m` arm.
    #[arg(long, default_value_t = 0.9)]
    server_momentum: f64,
    /// FedProx weights of the `tree-k5-prox` research arms (one arm per value; the nodes'
    /// proximal term anchors on the latest global model; empty: none).
    #[arg(long, value_delimiter = ',', default_value = "0.003")]
    proximal_mu: Vec<f64>,
    /// The share of member aggregations the hub recomputes (`federation.auditRate`) in the
    /// Tree arms; their inputs count in the bytes sent to the hub.
    #[arg(long, default_value_t = 0.1)]
    audit_rate: f64,
    /// Run only these of edgeloom's arms (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// The Flower arm runs on the seeds from `--flower-from-seed` up to (not including)
    /// this one (0: none).
    #[arg(long, default_value_t = 1)]
    flower_seeds: u64,
    /// The first seed on which the Flower arm runs (to add seeds to an earlier run).
    #[arg(long, default_value_t = 0)]
    flower_from_seed: u64,
    /// Partitions on which the Flower arm runs (default: all).
    #[arg(long, value_delimiter = ',')]
    flower_partitions: Vec<String>,
    /// Rounds of the real-system wall-time measurement (0: skip it).
    #[arg(long, default_value_t = 5)]
    wall_rounds: u32,
    /// Working directory (default: a fresh temp directory).
    #[arg(long)]
    work: Option<PathBuf>,
}

/// xorshift64* with Box-Muller normals and Marsaglia-Tsang gammas.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
    fn gamma(&mut self, alpha: f64) -> f64 {
        if alpha < 1.0 {
            return self.gamma(alpha + 1.0) * self.unit().powf(1.0 / alpha);
        }
        let d = alpha - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v > 0.0 && self.unit().ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i + 1));
        }
    }
}

/// Train rows of each node: IID (shuffled, dealt in turn) or, per class, Dirichlet(alpha)
/// proportions over the nodes; redrawn until every node has at least 10 rows.
fn partition(labels: &[u32], nodes: usize, how: &str, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(seed ^ 0xD1C7);
    for _ in 0..1000 {
        let mut out = vec![Vec::new(); nodes];
        if how == "iid" {
            let mut idx: Vec<usize> = (0..labels.len()).collect();
            rng.shuffle(&mut idx);
            for (k, i) in idx.into_iter().enumerate() {
                out[k % nodes].push(i);
            }
        } else {
            let alpha: f64 = how.parse().unwrap_or(0.5);
            let classes = *labels.iter().max().unwrap_or(&0) as usize + 1;
            for c in 0..classes {
                let mut idx: Vec<usize> = (0..labels.len())
                    .filter(|i| labels[*i] as usize == c)
                    .collect();
                rng.shuffle(&mut idx);
                let g: Vec<f64> = (0..nodes).map(|_| rng.gamma(alpha)).collect();
                let sum: f64 = g.iter().sum();
                let mut at = 0usize;
                let mut acc = 0.0;
                for (n, p) in g.iter().enumerate() {
                    acc += p / sum;
                    let end = if n + 1 == nodes {
                        idx.len()
                    } else {
                        ((acc * idx.len() as f64).round() as usize).min(idx.len())
                    };
                    out[n].extend_from_slice(&idx[at..end.max(at)]);
                    at = end.max(at);
                }
            }
        }
        if out.iter().all(|o| o.len() >= 10) {
            return out;
        }
    }
    panic!("no partition with at least 10 rows per node");
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n.max(1.0);
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

/// What one arm did on one seed.
#[derive(Clone, Debug, Default)]
struct Run {
    accuracy: Vec<f64>,
    bytes_to_hub: u64,
    seconds_per_round: Vec<f64>,
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

fn workload(cli: &Cli, seed: u64) -> serde_json::Value {
    serde_json::json!({
        "kind": "Federated", "model": {"builtin": "Mlp"}, "dataset": {"nodeLocal": "bench-slice"},
        "parameters": {"localEpochs": cli.local_epochs, "learningRate": cli.lr, "batchSize": cli.batch_size,
                       "classes": 10, "seed": seed, "rounds": cli.rounds}
    })
}

/// edgeloom's arms through `edgeloom-runner simulate`.
fn simulate(cli: &Cli, dir: &Path, seed: u64) -> Result<BTreeMap<String, Run>> {
    let nodes: Vec<PathBuf> = (0..cli.nodes)
        .map(|i| dir.join(format!("node-{i}.csv")))
        .collect();
    let per = cli.nodes.div_ceil(cli.clusters);
    let audit = cli.audit_rate;
    let mut arms = vec![
        serde_json::json!({"name": "central", "topology": "Central"}),
        serde_json::json!({"name": "flat", "topology": "Flat"}),
        serde_json::json!({"name": "tree-k1", "topology": "Tree", "hubEvery": 1, "auditRate": audit}),
        serde_json::json!({"name": "tree-k5", "topology": "Tree", "hubEvery": 5, "auditRate": audit}),
        serde_json::json!({"name": "tree-k5-m", "topology": "Tree", "hubEvery": 5, "auditRate": audit,
                           "serverMomentum": cli.server_momentum}),
    ];
    for mu in &cli.proximal_mu {
        let name = if cli.proximal_mu.len() == 1 {
            "tree-k5-prox".to_string()
        } else {
            format!("tree-k5-prox{mu}")
        };
        arms.push(
            serde_json::json!({"name": name, "topology": "Tree", "hubEvery": 5,
                                     "auditRate": audit, "proximalMu": mu}),
        );
    }
    arms.retain(|a| {
        cli.only.is_empty()
            || cli
                .only
                .iter()
                .any(|o| a["name"].as_str() == Some(o.as_str()))
    });
    let cfg = serde_json::json!({
        "workload": workload(cli, seed),
        "nodes": nodes,
        "clusters": (0..cli.nodes).map(|i| i / per).collect::<Vec<_>>(),
        "test": dir.join("test.csv"),
        "rounds": cli.rounds,
        "dir": dir.join("sim"),
        "arms": arms,
    });
    let mut child = Command::new(bin("edgeloom-runner"))
        .arg("simulate")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("edgeloom-runner (cargo build --release --workspace --bins)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(cfg.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("edgeloom-runner simulate failed");
    }
    let mut runs = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let acc: Vec<f64> = v["accuracy"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        let secs = v["seconds"].as_f64().unwrap_or(0.0);
        runs.insert(
            v["name"].as_str().unwrap_or_default().to_string(),
            Run {
                bytes_to_hub: v["bytesToHub"].as_u64().unwrap_or(0),
                seconds_per_round: vec![secs / acc.len().max(1) as f64],
                accuracy: acc,
            },
        );
    }
    Ok(runs)
}

/// The Flower arm (bench/flower/driver.py in the Flower venv).
fn flower(cli: &Cli, dir: &Path, rounds: u32, seed: u64) -> Result<Run> {
    let python = Command::new("scripts/install-flower.sh")
        .stderr(Stdio::inherit())
        .output()
        .context("scripts/install-flower.sh")?;
    let python = String::from_utf8_lossy(&python.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let init = dir.join("sim/flat/init.safetensors");
    let out = Command::new(&python)
        .arg("bench/flower/driver.py")
        .args([
            "--data-dir",
            &dir.display().to_string(),
            "--nodes",
            &cli.nodes.to_string(),
        ])
        .args([
            "--rounds",
            &rounds.to_string(),
            "--init",
            &init.display().to_string(),
        ])
        .args([
            "--local-epochs",
            &cli.local_epochs.to_string(),
            "--lr",
            &cli.lr.to_string(),
        ])
        .args([
            "--batch-size",
            &cli.batch_size.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .args(["--work", &dir.join("flower").display().to_string()])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!(
            "the Flower arm failed; see {}",
            dir.join("flower/flower.log").display()
        );
    }
    let v: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    )?;
    let nums = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    // Flower's FedAvg sends every node's model up every round (float32 state dicts).
    let size = std::fs::metadata(&init).map(|m| m.len()).unwrap_or(0);
    Ok(Run {
        accuracy: nums("accuracy"),
        bytes_to_hub: size * cli.nodes as u64 * rounds as u64,
        seconds_per_round: nums("secondsPerRound"),
    })
}

/// edgeloom's rounds on the real system: seconds per round of a Flat and a Tree job.
async fn wall(cli: &Cli, dir: &Path) -> Result<BTreeMap<String, Vec<f64>>> {
    let members: Vec<String> = (0..cli.clusters)
        .map(|c| format!("edge-{}", (b'a' + c as u8) as char))
        .collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let per = cli.nodes.div_ceil(cli.clusters) as u32;
    eprintln!(
        "wall: starting a hub and {} member clusters with {per} nodes each",
        cli.clusters
    );
    let fed = Federation::start_bare(&refs, per).await?;
    fed.apply_pool("edge", 10, 2).await?;
    // Node i of the plane (members in order) holds the partition's node-i.csv.
    let datasets: BTreeMap<String, BTreeMap<String, PathBuf>> = fed
        .plane
        .members()
        .flat_map(|m| m.nodes.clone())
        .enumerate()
        .map(|(i, node)| {
            let csv = dir.join(format!("node-{i}.csv"));
            (node, BTreeMap::from([("bench-slice".to_string(), csv)]))
        })
        .collect();
    let agents = fed.start_agents(
        &bin("edgeloom-agent"),
        &bin("edgeloom-runner"),
        "acct",
        &datasets,
    )?;
    let _op = fed.operator(&bin("edgeloom-operator"), "bench")?;
    let ns = fed.namespace("bench").await?;
    let api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    let mut out = BTreeMap::new();
    for (name, topology) in [("flat", "Flat"), ("tree", "Tree")] {
        let mut w = workload(cli, 0);
        w["parameters"]["rounds"] = serde_json::json!(cli.wall_rounds);
        w["federation"] =
            serde_json::json!({"topology": topology, "hubEvery": 1, "roundTimeoutSeconds": 120});
        let job = serde_json::json!({"apiVersion": "edgeloom.io/v1alpha1", "kind": "ComputeJob",
            "metadata": {"name": name}, "spec": {"shards": cli.nodes, "workload": w}});
        manifests::apply_all(&fed.hub, &job.to_string(), &ns, false).await?;
        let started = Instant::now();
        let mut last: Option<(u32, Instant)> = None;
        let mut rounds = Vec::new();
        loop {
            let j = api.get(name).await?;
            let s = j.status.unwrap_or_default();
            let f = s.federated.unwrap_or_default();
            let now = Instant::now();
            match last {
                Some((done, at)) if f.completed_rounds > done => {
                    // Only a round that completed alone in this poll interval is timed.
                    if f.completed_rounds == done + 1 && done >= 1 {
                        rounds.push((now - at).as_secs_f64());
                    }
                    last = Some((f.completed_rounds, now));
                }
                None if f.completed_rounds >= 1 => last = Some((f.completed_rounds, now)),
                _ => {}
            }
            if matches!(
                s.phase,
                Some(edgeloom_crds::JobPhase::Succeeded | edgeloom_crds::JobPhase::Failed)
            ) {
                eprintln!(
                    "wall: {name} {:?} in {:.1}s; rounds {rounds:?}",
                    s.phase,
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the {name} job did not finish in 600 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        out.insert(name.to_string(), rounds);
    }
    drop(agents);
    Ok(out)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let work = match &cli.work {
        Some(w) => w.clone(),
        None => {
            std::env::temp_dir().join(format!("edgeloom-federated-bench-{}", std::process::id()))
        }
    };
    std::fs::create_dir_all(&work)?;
    let rows = edgeloom_e2e::digits::rows();
    if rows.is_empty() {
        bail!("the digits are missing");
    }
    // One shared stratified test set: every fifth row of each class.
    let mut seen = [0usize; 10];
    let mut test: Vec<&(String, u32)> = Vec::new();
    let mut train: Vec<&(String, u32)> = Vec::new();
    for r in &rows {
        let k = &mut seen[r.1 as usize % 10];
        if *k % 5 == 0 {
            test.push(r)
        } else {
            train.push(r)
        }
        *k += 1;
    }
    let labels: Vec<u32> = train.iter().map(|r| r.1).collect();
    println!(
        "federated benchmark: {} training rows over {} nodes in {} clusters, {} test rows; {} rounds of {} local epoch(s), lr {}, batch {}, {} seed(s)",
        train.len(),
        cli.nodes,
        cli.clusters,
        test.len(),
        cli.rounds,
        cli.local_epochs,
        cli.lr,
        cli.batch_size,
        cli.seeds
    );
    // arm -> partition -> runs
    let mut results: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
    let mut wall_dir = None;
    for how in &cli.partitions {
        for seed in 0..cli.seeds {
            let dir = work.join(format!("p{how}-s{seed}"));
            std::fs::create_dir_all(&dir)?;
            let parts = partition(&labels, cli.nodes, how, seed);
            for (n, idx) in parts.iter().enumerate() {
                let text: Vec<&str> = idx.iter().map(|i| train[*i].0.as_str()).collect();
                std::fs::write(dir.join(format!("node-{n}.csv")), text.join("\n"))?;
            }
            let t: Vec<&str> = test.iter().map(|r| r.0.as_str()).collect();
            std::fs::write(dir.join("test.csv"), t.join("\n"))?;
            let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
            let started = Instant::now();
            let sims = simulate(&cli, &dir, seed)?;
            eprintln!(
                "partition {how} seed {seed}: node rows {sizes:?}; edgeloom arms in {:.0}s",
                started.elapsed().as_secs_f64()
            );
            for (arm, run) in sims {
                results.entry((how.clone(), arm)).or_default().push(run);
            }
            if (cli.flower_from_seed..cli.flower_seeds).contains(&seed)
                && (cli.flower_partitions.is_empty() || cli.flower_partitions.contains(how))
            {
                let started = Instant::now();
                let f = flower(&cli, &dir, cli.rounds, seed)?;
                eprintln!(
                    "partition {how} seed {seed}: flower in {:.0}s, final accuracy {:.4}",
                    started.elapsed().as_secs_f64(),
                    f.accuracy.last().copied().unwrap_or(f64::NAN)
                );
                results
                    .entry((how.clone(), "flower".into()))
                    .or_default()
                    .push(f);
            }
            if how == "0.5" && seed == 0 {
                wall_dir = Some(dir.clone());
            }
        }
    }
    println!(
        "\n| partition | arm | seeds | final accuracy (mean ± sd) | rounds to 90% | bytes to hub | vs flat |"
    );
    println!("|---|---|---|---|---|---|---|");
    for how in &cli.partitions {
        let flat_bytes = results
            .get(&(how.clone(), "flat".into()))
            .and_then(|r| r.first())
            .map(|r| r.bytes_to_hub)
            .unwrap_or(0);
        let mut arms: Vec<&str> = vec![
            "central",
            "flower",
            "flat",
            "tree-k1",
            "tree-k5",
            "tree-k5-m",
        ];
        for (h, a) in results.keys() {
            if h == how && !arms.contains(&a.as_str()) {
                arms.push(a);
            }
        }
        for arm in arms {
            let Some(runs) = results.get(&(how.clone(), arm.to_string())) else {
                continue;
            };
            let finals: Vec<f64> = runs
                .iter()
                .filter_map(|r| r.accuracy.last().copied())
                .collect();
            let (m, sd) = mean_sd(&finals);
            let reached: Vec<f64> = runs
                .iter()
                .filter_map(|r| {
                    r.accuracy
                        .iter()
                        .position(|a| *a >= 0.9)
                        .map(|p| (p + 1) as f64)
                })
                .collect();
            let r90 = if reached.is_empty() {
                "never".to_string()
            } else {
                format!(
                    "{:.1} ({}/{} seeds)",
                    mean_sd(&reached).0,
                    reached.len(),
                    runs.len()
                )
            };
            let bytes = runs[0].bytes_to_hub;
            let ratio = if arm == "central" || bytes == 0 {
                "-".to_string()
            } else {
                format!("{:.1}x fewer", flat_bytes as f64 / bytes as f64)
            };
            println!(
                "| {how} | {arm} | {} | {:.4} ± {:.4} | {r90} | {bytes} | {ratio} |",
                runs.len(),
                m,
                sd
            );
        }
    }
    println!("\naccuracy by round (mean over seeds):");
    for ((how, arm), runs) in &results {
        let n = runs.iter().map(|r| r.accuracy.len()).min().unwrap_or(0);
        let curve: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "{:.3}",
                    runs.iter().map(|r| r.accuracy[i]).sum::<f64>() / runs.len() as f64
                )
            })
            .collect();
        println!("  {how:>4} {arm:<10} {}", curve.join(" "));
    }
    if cli.wall_rounds > 0
        && let Some(dir) = wall_dir
    {
        println!(
            "\nwall time per round, 12 nodes, partition alpha=0.5 seed 0, {} rounds, this machine:",
            cli.wall_rounds
        );
        let w = wall(&cli, &dir).await?;
        for (name, rounds) in &w {
            let (m, sd) = mean_sd(rounds);
            println!(
                "  edgeloom {name:<5} (real system: API servers, operator, 12 agents, S3): {m:.2} ± {sd:.2} s per round over {} rounds",
                rounds.len()
            );
        }
        let f = flower(&cli, &dir, cli.wall_rounds, 0)?;
        let (m, sd) = mean_sd(&f.seconds_per_round);
        println!(
            "  flower         (deployment mode: SuperLink, 12 SuperNodes):            {m:.2} ± {sd:.2} s per round over {} rounds",
            f.seconds_per_round.len()
        );
    }
    Ok(())
}
