//! `edgeloom-runner simulate`: the federated benchmark's edgeloom arms in one process
//! (BENCHMARKS.md, "Federated learning"). It runs the algorithm edgeloom runs, with the
//! code edgeloom runs: each node's local training is the runner's own (`fit_epochs`, the
//! Federated train step's optimiser and shuffling), every aggregation is `edgeloom-fl`
//! over safetensors files (members, then the hub, with the FedAvgM server step). What it
//! leaves out is the control plane (tasks, agents, the store): the benchmark measures
//! the time a round takes on the real system separately.

use crate::data::Dataset;
use crate::protocol::Spec;
use crate::workloads::{self, TaskError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn;

/// What to simulate (JSON on stdin).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// The workload (model, parameters: learning rate, batch size, local epochs, seed,
    /// classes).
    pub workload: edgeloom_crds::workload::Workload,
    /// Each node's training rows (CSV: features..., label).
    pub nodes: Vec<PathBuf>,
    /// The member cluster of each node.
    pub clusters: Vec<usize>,
    /// The shared test rows.
    pub test: PathBuf,
    /// Rounds.
    pub rounds: u32,
    /// The arms.
    pub arms: Vec<Arm>,
    /// Scratch directory for the models.
    pub dir: PathBuf,
}

/// One way to federate.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Arm {
    /// Its name in the output.
    pub name: String,
    /// `Flat`, `Tree` or `Central` (all rows on one node, `rounds x localEpochs` epochs).
    pub topology: String,
    /// Tree: the hub aggregates every `hubEvery` rounds.
    #[serde(default = "one")]
    pub hub_every: u32,
    /// FedAvgM at the hub.
    #[serde(default = "onef")]
    pub server_lr: f64,
    /// FedAvgM at the hub.
    #[serde(default)]
    pub server_momentum: f64,
    /// FedProx, a research arm the API does not offer: nodes train with
    /// `mu / 2 * |w - g|^2` added to their loss, `g` the latest global model (0: none).
    #[serde(default)]
    pub proximal_mu: f64,
    /// Tree: the share of member aggregations the hub recomputes (its audit), whose inputs
    /// go up to the hub; counted in the bytes as their expected value.
    #[serde(default)]
    pub audit_rate: f64,
}

fn one() -> u32 {
    1
}
fn onef() -> f64 {
    1.0
}

/// One arm's outcome.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ArmResult {
    /// The arm.
    pub name: String,
    /// Test accuracy of the hub's model after each round (for rounds between hub
    /// aggregations: of the example-weighted mean of the member models, which the hub
    /// would get).
    pub accuracy: Vec<f64>,
    /// Bytes sent up to the hub, all rounds.
    pub bytes_to_hub: u64,
    /// Seconds the arm took in this process.
    pub seconds: f64,
}

fn err(e: impl std::fmt::Display) -> TaskError {
    TaskError::Unsupported(e.to_string())
}

struct Sim<'a> {
    cfg: &'a Config,
    spec: Spec,
    data: Vec<Dataset>,
    test: Dataset,
    features: usize,
    classes: usize,
}

impl Sim<'_> {
    fn net(&self) -> Result<(nn::VarStore, crate::model::Net), TaskError> {
        workloads::federated_network(&self.spec, self.features, self.classes, None)
    }

    /// Trains from `base` on `data` for the job's local epochs; writes the update.
    #[allow(clippy::too_many_arguments)]
    fn train(
        &self,
        base: &Path,
        anchor: (&Path, f64),
        data: &Dataset,
        round: u32,
        node: usize,
        out: &Path,
    ) -> Result<(), TaskError> {
        let (mut vs, net) = self.net()?;
        vs.load(base)?;
        let prox = if anchor.1 > 0.0 {
            let (mut a, _) = self.net()?;
            a.load(anchor.0)?;
            Some(workloads::Prox {
                anchor: a.trainable_variables(),
                mu: anchor.1,
            })
        } else {
            None
        };
        let p = &self.spec.workload.parameters;
        let shuffle = p.seed ^ 0xFEDA ^ ((round as u64) << 32) ^ node as u64;
        workloads::fit_for_simulation(
            &self.spec,
            &mut vs,
            &net,
            data,
            (p.local_epochs, shuffle),
            prox.as_ref(),
        )?;
        vs.save(out)?;
        Ok(())
    }

    fn accuracy(&self, model: &Path) -> Result<f64, TaskError> {
        let (mut vs, mut net) = self.net()?;
        vs.load(model)?;
        Ok(workloads::evaluate_for_simulation(&mut net, &self.test, vs.device())?.0)
    }

    fn aggregate(
        &self,
        base: &Path,
        ups: Vec<edgeloom_fl::Update>,
        out: &Path,
    ) -> Result<f64, TaskError> {
        let o = edgeloom_fl::aggregate(
            base,
            &ups,
            &edgeloom_fl::Options::default(),
            out,
            HashMap::new(),
        )
        .map_err(err)?;
        Ok(o.weight)
    }

    fn run(&self, arm: &Arm) -> Result<ArmResult, TaskError> {
        let started = std::time::Instant::now();
        let dir = self.cfg.dir.join(&arm.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(err)?;
        let init = dir.join("init.safetensors");
        let (vs, _) = self.net()?;
        vs.save(&init)?;
        let size = std::fs::metadata(&init).map_err(err)?.len();
        let mut accuracy = Vec::new();
        let mut bytes_to_hub = 0u64;
        if arm.topology == "Central" {
            let all: Vec<usize> = (0..self.data.len()).collect();
            let mut union = self.data[0].clone();
            for d in &self.data[1..] {
                union.x.extend_from_slice(&d.x);
                union.y.extend_from_slice(&d.y);
            }
            let _ = all;
            let (mut vs, net) = self.net()?;
            vs.load(&init)?;
            let p = &self.spec.workload.parameters;
            for r in 1..=self.cfg.rounds {
                let shuffle = p.seed ^ 0xCE ^ ((r as u64) << 32);
                workloads::fit_for_simulation(
                    &self.spec,
                    &mut vs,
                    &net,
                    &union,
                    (p.local_epochs, shuffle),
                    None,
                )?;
                let m = dir.join("central.safetensors");
                vs.save(&m)?;
                accuracy.push(self.accuracy(&m)?);
            }
            return Ok(ArmResult {
                name: arm.name.clone(),
                accuracy,
                bytes_to_hub,
                seconds: started.elapsed().as_secs_f64(),
            });
        }
        let clusters = *self.cfg.clusters.iter().max().unwrap_or(&0) + 1;
        let mut global = init.clone();
        let mut momentum: Option<PathBuf> = None;
        let mut bases: Vec<PathBuf> = vec![global.clone(); clusters];
        for r in 1..=self.cfg.rounds {
            let rd = dir.join(format!("r{r}"));
            std::fs::create_dir_all(&rd).map_err(err)?;
            let mut ups: Vec<Vec<edgeloom_fl::Update>> = vec![Vec::new(); clusters];
            for (i, d) in self.data.iter().enumerate() {
                let c = self.cfg.clusters[i];
                let out = rd.join(format!("u{i}.safetensors"));
                self.train(&bases[c], (&global, arm.proximal_mu), d, r, i, &out)?;
                ups[c].push(edgeloom_fl::Update {
                    path: out,
                    weight: d.rows() as f64,
                });
            }
            let hub =
                arm.topology == "Flat" || r % arm.hub_every.max(1) == 0 || r == self.cfg.rounds;
            let agg = rd.join("aggregate.safetensors");
            if arm.topology == "Flat" {
                bytes_to_hub += size * self.data.len() as u64;
                self.aggregate(&global, ups.into_iter().flatten().collect(), &agg)?;
            } else {
                let mut members = Vec::new();
                for (c, u) in ups.into_iter().enumerate() {
                    if u.is_empty() {
                        continue;
                    }
                    let m = rd.join(format!("member{c}.safetensors"));
                    // The audit's expected bytes: the member's updates and its base.
                    bytes_to_hub +=
                        (arm.audit_rate * (size * (u.len() as u64 + 1)) as f64).round() as u64;
                    let w = self.aggregate(&bases[c], u, &m)?;
                    members.push((c, edgeloom_fl::Update { path: m, weight: w }));
                }
                if hub {
                    bytes_to_hub += size * members.len() as u64;
                } else {
                    for (c, m) in &members {
                        bases[*c] = m.path.clone();
                    }
                }
                self.aggregate(&global, members.into_iter().map(|(_, m)| m).collect(), &agg)?;
            }
            if hub {
                let step = edgeloom_fl::ServerStep {
                    lr: arm.server_lr,
                    beta: arm.server_momentum,
                };
                let next = if step.is_plain() {
                    agg.clone()
                } else {
                    let (m, v) = (
                        rd.join("global.safetensors"),
                        rd.join("momentum.safetensors"),
                    );
                    step.apply(&global, &agg, momentum.as_deref(), &m, &v, 1 << 16)
                        .map_err(err)?;
                    momentum = Some(v);
                    m
                };
                global = next;
                bases = vec![global.clone(); clusters];
                accuracy.push(self.accuracy(&global)?);
            } else {
                accuracy.push(self.accuracy(&agg)?);
            }
            // Keep the disk small: this round's updates are done with.
            if r > 2 {
                let old = dir.join(format!("r{}", r - 2));
                if !bases
                    .iter()
                    .chain([&global])
                    .chain(momentum.iter())
                    .any(|b| b.starts_with(&old))
                {
                    let _ = std::fs::remove_dir_all(old);
                }
            }
        }
        Ok(ArmResult {
            name: arm.name.clone(),
            accuracy,
            bytes_to_hub,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Runs every arm; prints one JSON line per arm on stdout.
pub fn simulate(cfg: &Config) -> Result<Vec<ArmResult>, TaskError> {
    if cfg.nodes.len() != cfg.clusters.len() {
        return Err(err("nodes and clusters differ in length"));
    }
    let mut data = Vec::new();
    for n in &cfg.nodes {
        data.push(Dataset::file(&n.display().to_string())?);
    }
    let test = Dataset::file(&cfg.test.display().to_string())?;
    let features = test.features;
    let classes = cfg
        .workload
        .parameters
        .classes
        .map(|c| c as usize)
        .unwrap_or(test.classes);
    let spec = Spec {
        workload: cfg.workload.clone(),
        shard: 0,
        shards: 1,
        model_path: None,
        data_path: None,
        device: Some("cpu".into()),
        threads: Some(1),
        checkpoint_dir: None,
        federated: None,
    };
    tch::set_num_threads(1);
    let sim = Sim {
        cfg,
        spec,
        data,
        test,
        features,
        classes,
    };
    cfg.arms.iter().map(|a| sim.run(a)).collect()
}
