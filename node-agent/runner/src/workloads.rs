//! Benchmark, Train, Inference and the steps of a Federated round.

use crate::data::{Dataset, Rng};
use crate::model::{self, Net};
use crate::protocol::{FederatedStep, Line, Spec, UpdateFile};
use edgeloom_crds::workload::AggregationRule;
use edgeloom_crds::workload::{Optimizer, WorkloadKind};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Why a task failed (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// libtorch refused (bad model file, shapes, out of memory).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The model does not fit the data.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// Checkpoint I/O.
    #[error("checkpoint {0}: {1}")]
    Checkpoint(String, std::io::Error),
    /// The spec asks for something this runner cannot do.
    #[error("{0}")]
    Unsupported(String),
}

/// Where the runner writes lines.
pub trait Sink {
    /// Emits one line.
    fn emit(&mut self, line: Line);
}

/// The device for `spec`.
pub fn device(spec: &Spec) -> Device {
    match spec.device.as_deref() {
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        _ => Device::cuda_if_available(),
    }
}

fn digest(tag: &str, preds: &[i64]) -> String {
    let mut h = Sha256::new();
    h.update(tag.as_bytes());
    for p in preds {
        h.update(p.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn load_data(spec: &Spec) -> Result<Dataset, TaskError> {
    let ds = spec
        .workload
        .dataset
        .as_ref()
        .ok_or_else(|| TaskError::Unsupported("the workload names no dataset".into()))?;
    if ds.builtin.is_some() {
        Ok(Dataset::digits()?)
    } else if let Some(s) = &ds.synthetic {
        Ok(Dataset::synthetic(
            s.samples as usize,
            s.features as usize,
            s.classes as usize,
            s.seed,
        ))
    } else if let Some(name) = &ds.node_local {
        let path = spec
            .data_path
            .as_deref()
            .ok_or_else(|| TaskError::Unsupported(format!("this node holds no dataset {name}")))?;
        Ok(Dataset::file(path)?)
    } else {
        Err(TaskError::Unsupported("the dataset names no source".into()))
    }
}

fn tensors(d: &Dataset, device: Device) -> (Tensor, Tensor) {
    let x = Tensor::from_slice(&d.x)
        .view([d.rows() as i64, d.features as i64])
        .to(device);
    let y = Tensor::from_slice(&d.y).to(device);
    (x, y)
}

/// Runs the matrix-multiply benchmark.
pub fn benchmark(spec: &Spec, out: &mut dyn Sink) -> Result<(), TaskError> {
    let device = device(spec);
    let n = spec.workload.parameters.matrix_size as i64;
    tch::manual_seed(spec.workload.parameters.seed as i64);
    let a = Tensor::randn([n, n], (Kind::Float, device));
    let b = Tensor::randn([n, n], (Kind::Float, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    for _ in 0..2 {
        let _ = a.matmul(&b);
    }
    sync();
    let start = Instant::now();
    let mut reps = 0u32;
    let mut checksum = 0.0;
    while reps < 3 || (start.elapsed().as_secs_f64() < 1.0 && reps < 200) {
        let c = a.matmul(&b);
        if reps == 0 {
            checksum = c.sum(Kind::Double).double_value(&[]);
        }
        reps += 1;
        if reps.is_multiple_of(5) {
            out.emit(Line::Progress {
                progress: (start.elapsed().as_secs_f64() * 100.0).min(99.0) as u8,
                message: None,
            });
        }
    }
    sync();
    let secs = start.elapsed().as_secs_f64();
    let flops = 2.0 * (n as f64).powi(3) * reps as f64 / secs;
    let metrics = BTreeMap::from([
        ("gflops".to_string(), flops / 1e9),
        ("tflops".to_string(), flops / 1e12),
        ("seconds".to_string(), secs),
        ("reps".to_string(), reps as f64),
    ]);
    let tag = format!("benchmark|{n}|{:.0}", checksum / (n * n) as f64 * 1e3);
    out.emit(Line::Result {
        digest: digest(&tag, &[]),
        summary: BTreeMap::from([
            ("gflops".to_string(), format!("{:.1}", flops / 1e9)),
            ("device".to_string(), format!("{device:?}")),
        ]),
        vector: vec![flops / 1e12],
        metrics,
    });
    Ok(())
}

/// Trains a built-in model (or, for Inference with a built-in model, the reference weights)
/// on `train` and returns the network and the last epoch's mean loss.
fn fit(
    spec: &Spec,
    vs: &mut nn::VarStore,
    net: &Net,
    train: &Dataset,
    out: &mut dyn Sink,
    progress_span: (u8, u8),
) -> Result<(f64, f64), TaskError> {
    let p = &spec.workload.parameters;
    let checkpoint = spec.checkpoint_dir.as_deref().map(Path::new);
    fit_epochs(
        spec,
        vs,
        net,
        train,
        out,
        progress_span,
        (p.epochs, p.seed ^ 0xC0FFEE, checkpoint, None),
    )
}

/// A proximal term (FedProx): training minimises its loss plus `mu / 2 * |w - anchor|^2`,
/// which keeps a member's model near the last global one between hub rounds. Used by
/// `edgeloom-runner simulate`'s research arm only (BENCHMARKS.md, "Federated learning
/// beside Flower": it did not close the alpha = 0.1 gap, so the API does not offer it).
pub(crate) struct Prox {
    /// The anchor's trainable tensors, in the order of `VarStore::trainable_variables`.
    pub anchor: Vec<Tensor>,
    /// Its weight.
    pub mu: f64,
}

/// [`fit`] for `epochs` epochs shuffled from `shuffle_seed`, with an optional checkpoint
/// directory.
fn fit_epochs(
    spec: &Spec,
    vs: &mut nn::VarStore,
    net: &Net,
    train: &Dataset,
    out: &mut dyn Sink,
    progress_span: (u8, u8),
    (epochs, shuffle_seed, checkpoint, prox): (u32, u64, Option<&Path>, Option<&Prox>),
) -> Result<(f64, f64), TaskError> {
    let p = &spec.workload.parameters;
    let device = vs.device();
    let mut opt = match p.optimizer {
        Optimizer::Sgd => nn::Sgd {
            momentum: 0.9,
            ..Default::default()
        }
        .build(vs, p.learning_rate)?,
        Optimizer::Adam => nn::Adam::default().build(vs, p.learning_rate)?,
    };
    let (xs, ys) = tensors(train, device);
    let n = train.rows();
    let bs = (p.batch_size as usize).clamp(1, n.max(1));
    let mut start_epoch = 0;
    if let Some(dir) = checkpoint {
        let weights = dir.join("weights.ot");
        if let (Ok(epoch), true) = (std::fs::read_to_string(dir.join("epoch")), weights.exists()) {
            vs.load(&weights)?;
            start_epoch = epoch.trim().parse().unwrap_or(0);
            out.emit(Line::Progress {
                progress: progress_span.0,
                message: Some(format!("resumed from checkpoint after epoch {start_epoch}")),
            });
        }
    }
    let mut rng = Rng::new(shuffle_seed);
    let weights = vs.trainable_variables();
    let mut last_loss = f64::NAN;
    let started = Instant::now();
    let mut samples = 0usize;
    for epoch in start_epoch..epochs as usize {
        let mut order: Vec<i64> = (0..n as i64).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let perm = Tensor::from_slice(&order).to(device);
        let mut sum = 0.0;
        let mut batches = 0;
        for b in (0..n).step_by(bs) {
            let len = bs.min(n - b) as i64;
            let idx = perm.narrow(0, b as i64, len);
            let loss = net
                .forward(&xs.index_select(0, &idx))?
                .cross_entropy_for_logits(&ys.index_select(0, &idx));
            match prox {
                Some(px) if px.mu > 0.0 => {
                    let mut reg = Tensor::zeros([], (Kind::Float, device));
                    for (w, a) in weights.iter().zip(&px.anchor) {
                        reg += (w - a).square().sum(Kind::Float);
                    }
                    opt.backward_step(&(&loss + reg * (px.mu / 2.0)));
                }
                _ => opt.backward_step(&loss),
            }
            sum += loss.double_value(&[]);
            batches += 1;
            samples += len as usize;
        }
        last_loss = sum / batches.max(1) as f64;
        if let Some(dir) = checkpoint {
            std::fs::create_dir_all(dir)
                .map_err(|e| TaskError::Checkpoint(dir.display().to_string(), e))?;
            vs.save(dir.join("weights.ot"))?;
            std::fs::write(dir.join("epoch"), (epoch + 1).to_string())
                .map_err(|e| TaskError::Checkpoint(dir.display().to_string(), e))?;
        }
        let (lo, hi) = progress_span;
        out.emit(Line::Progress {
            progress: lo + ((hi - lo) as f64 * (epoch + 1) as f64 / epochs as f64) as u8,
            message: Some(format!("epoch {}/{epochs} loss {last_loss:.4}", epoch + 1)),
        });
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok((last_loss, samples as f64 / secs))
}

/// The network a Train (or built-in Inference) task trains: built in, or the TorchScript
/// model at `model_path`.
fn network(
    spec: &Spec,
    vs: &nn::VarStore,
    features: usize,
    classes: usize,
) -> Result<(Net, String), TaskError> {
    match (
        spec.workload.model.as_ref().and_then(|m| m.builtin),
        spec.model_path.as_deref(),
    ) {
        (Some(kind), _) => Ok((
            Net::Builtin(model::builtin(
                &vs.root(),
                kind,
                features as i64,
                classes as i64,
            )?),
            format!("{kind:?}"),
        )),
        (None, Some(path)) => Ok((Net::script(path, vs.root())?, "TorchScript".to_string())),
        (None, None) => Err(TaskError::Unsupported(
            "the workload needs a built-in model or a model file".into(),
        )),
    }
}

/// The classes the model predicts: the job's `classes`, else the data's.
fn classes(spec: &Spec, data: &Dataset) -> Result<usize, TaskError> {
    match spec.workload.parameters.classes {
        None => Ok(data.classes),
        Some(c) if c as usize >= data.classes => Ok(c as usize),
        Some(c) => Err(TaskError::Unsupported(format!(
            "the data has label {} but the job declares {c} classes",
            data.classes - 1
        ))),
    }
}

fn accuracy(preds: &[i64], labels: &[i64]) -> f64 {
    let hits = preds.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len().max(1) as f64
}

/// Trains a built-in or TorchScript model on this shard's rows and evaluates it on the
/// shared test rows.
pub fn train(spec: &Spec, out: &mut dyn Sink) -> Result<(), TaskError> {
    let data = load_data(spec)?;
    let p = &spec.workload.parameters;
    let (train, test) = data.split(p.seed, spec.shard, spec.shards);
    if train.rows() == 0 {
        return Err(TaskError::Unsupported(format!(
            "shard {} of {} has no training rows",
            spec.shard, spec.shards
        )));
    }
    tch::manual_seed(p.seed as i64);
    let mut vs = nn::VarStore::new(device(spec));
    let (mut net, name) = network(spec, &vs, data.features, classes(spec, &data)?)?;
    let (loss, throughput) = fit(spec, &mut vs, &net, &train, out, (0, 95))?;
    let (tx, _) = tensors(&test, vs.device());
    let preds: Vec<i64> = Vec::try_from(&net.logits(&tx)?.argmax(-1, false).to(Device::Cpu))?;
    let acc = accuracy(&preds, &test.y);
    out.emit(Line::Result {
        digest: digest(&format!("train|{name}"), &preds),
        metrics: BTreeMap::from([
            ("accuracy".to_string(), acc),
            ("loss".to_string(), loss),
            ("samplesPerSecond".to_string(), throughput),
            ("trainRows".to_string(), train.rows() as f64),
        ]),
        summary: BTreeMap::from([
            ("accuracy".to_string(), format!("{acc:.4}")),
            ("model".to_string(), name),
        ]),
        vector: vec![acc, loss],
    });
    Ok(())
}

/// Applies a model to this shard's test rows: a TorchScript file, or a built-in model
/// trained deterministically on the training rows first.
pub fn inference(spec: &Spec, out: &mut dyn Sink) -> Result<(), TaskError> {
    let data = load_data(spec)?;
    let p = &spec.workload.parameters;
    let (train, test) = data.split(p.seed, 0, 1);
    let rows: Vec<usize> = (0..test.rows())
        .filter(|i| *i as u32 % spec.shards.max(1) == spec.shard)
        .collect();
    let shard = test.select(&rows);
    let device = device(spec);
    tch::manual_seed(p.seed as i64);
    let (tx, _) = tensors(&shard, device);
    let model = spec.workload.model.as_ref();
    let started;
    let (logits, name) = match (model.and_then(|m| m.builtin), spec.model_path.as_deref()) {
        (Some(_), _) => {
            let mut vs = nn::VarStore::new(device);
            let (mut net, name) = network(spec, &vs, data.features, data.classes)?;
            fit(spec, &mut vs, &net, &train, out, (0, 80))?;
            started = Instant::now();
            (net.logits(&tx)?, name)
        }
        (None, Some(path)) => {
            let mut module = tch::CModule::load_on_device(path, device)?;
            module.set_eval();
            out.emit(Line::Progress {
                progress: 50,
                message: Some("TorchScript model loaded".into()),
            });
            started = Instant::now();
            (
                tch::no_grad(|| module.forward_ts(&[&tx]))?,
                "TorchScript".to_string(),
            )
        }
        (None, None) => {
            return Err(TaskError::Unsupported(
                "Inference needs a built-in model or a model file".into(),
            ));
        }
    };
    let dims = logits.size();
    if dims.len() != 2 || dims[0] != shard.rows() as i64 {
        return Err(TaskError::Unsupported(format!(
            "the model returned shape {dims:?}; expected [{}, classes]",
            shard.rows()
        )));
    }
    let preds: Vec<i64> = Vec::try_from(&logits.argmax(-1, false).to(Device::Cpu))?;
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let acc = accuracy(&preds, &shard.y);
    out.emit(Line::Result {
        digest: digest("inference", &preds),
        metrics: BTreeMap::from([
            ("accuracy".to_string(), acc),
            ("rows".to_string(), shard.rows() as f64),
            ("samplesPerSecond".to_string(), shard.rows() as f64 / secs),
        ]),
        summary: BTreeMap::from([
            ("accuracy".to_string(), format!("{acc:.4}")),
            ("model".to_string(), name),
        ]),
        vector: vec![acc],
    });
    Ok(())
}

/// Runs the spec's workload.
pub fn run(spec: &Spec, out: &mut dyn Sink) -> Result<(), TaskError> {
    match spec.workload.kind {
        WorkloadKind::Benchmark => benchmark(spec, out),
        WorkloadKind::Train => train(spec, out),
        WorkloadKind::Inference => inference(spec, out),
        WorkloadKind::Federated => federated(spec, out),
    }
}

/// A Federated task's data: a node-local file is the node's whole data (80% trained on,
/// 20% held out for its own validation); a synthetic set is split into the job's shards.
fn federated_data(spec: &Spec) -> Result<(Dataset, Dataset, usize, usize), TaskError> {
    let data = load_data(spec)?;
    let p = &spec.workload.parameters;
    let node_local = spec
        .workload
        .dataset
        .as_ref()
        .is_some_and(|d| d.node_local.is_some());
    let (train, held_out) = if node_local {
        data.split(p.seed, 0, 1)
    } else {
        data.split(p.seed, spec.shard, spec.shards)
    };
    Ok((train, held_out, data.features, classes(spec, &data)?))
}

/// The job's network, with the round's model loaded when there is one (else the job's
/// seeded initial weights: every node starts the first round from the same model).
pub(crate) fn federated_network(
    spec: &Spec,
    features: usize,
    classes: usize,
    model: Option<&str>,
) -> Result<(nn::VarStore, Net), TaskError> {
    tch::manual_seed(spec.workload.parameters.seed as i64);
    let mut vs = nn::VarStore::new(device(spec));
    let (net, _) = network(spec, &vs, features, classes)?;
    if let Some(path) = model {
        if !path.ends_with(".safetensors") {
            return Err(TaskError::Unsupported(format!(
                "the round's model {path} must be a .safetensors file"
            )));
        }
        vs.load(path)?;
    }
    Ok((vs, net))
}

/// Accuracy and mean loss of `net` on `d`.
fn evaluate(net: &mut Net, d: &Dataset, device: Device) -> Result<(f64, f64), TaskError> {
    if d.rows() == 0 {
        return Ok((f64::NAN, f64::NAN));
    }
    let (x, y) = tensors(d, device);
    let logits = net.logits(&x)?;
    let loss = logits.cross_entropy_for_logits(&y).double_value(&[]);
    let preds: Vec<i64> = Vec::try_from(&logits.argmax(-1, false).to(Device::Cpu))?;
    Ok((accuracy(&preds, &d.y), loss))
}

fn sha256_file(path: &str) -> Result<String, TaskError> {
    edgeloom_fl::model::file_sha256(Path::new(path))
        .map_err(|e| TaskError::Unsupported(format!("reading back {path}: {e}")))
}

/// A Federated task: one step of its round.
pub fn federated(spec: &Spec, out: &mut dyn Sink) -> Result<(), TaskError> {
    match spec.federated.as_ref() {
        None => Err(TaskError::Unsupported(
            "a Federated task needs its round's step, which the agent sends".into(),
        )),
        Some(FederatedStep::Train {
            round,
            model,
            output,
        }) => federated_train(spec, *round, model.as_deref(), output, out),
        Some(FederatedStep::Evaluate { model }) => federated_evaluate(spec, model, out),
        Some(FederatedStep::Init { output }) => federated_init(spec, output, out),
        Some(FederatedStep::Aggregate {
            model,
            updates,
            output,
            rule,
            trim,
            outlier_cutoff,
        }) => {
            let rule = match rule {
                AggregationRule::Mean => edgeloom_fl::Rule::Mean,
                AggregationRule::TrimmedMean => edgeloom_fl::Rule::TrimmedMean { trim: *trim },
                AggregationRule::Median => edgeloom_fl::Rule::Median,
            };
            federated_aggregate(spec, model, updates, output, rule, *outlier_cutoff, out)
        }
    }
}

fn federated_train(
    spec: &Spec,
    round: u32,
    model: Option<&str>,
    output: &str,
    out: &mut dyn Sink,
) -> Result<(), TaskError> {
    let (train, held_out, features, classes) = federated_data(spec)?;
    if train.rows() == 0 {
        return Err(TaskError::Unsupported(
            "this node has no training rows".into(),
        ));
    }
    if !output.ends_with(".safetensors") {
        return Err(TaskError::Unsupported(format!(
            "the update {output} must be a .safetensors file"
        )));
    }
    let (mut vs, mut net) = federated_network(spec, features, classes, model)?;
    // How the model this round starts from does on the node's own held-out rows: the
    // previous round's accuracy, as this node sees it.
    let (start_acc, start_loss) = evaluate(&mut net, &held_out, vs.device())?;
    if let Net::Script(m) = &mut net {
        m.set_train();
    }
    let p = &spec.workload.parameters;
    let shuffle = p.seed ^ 0xFEDA ^ ((round as u64) << 32) ^ spec.shard as u64;
    let (loss, throughput) = fit_epochs(
        spec,
        &mut vs,
        &net,
        &train,
        out,
        (0, 95),
        (p.local_epochs, shuffle, None, None),
    )?;
    vs.save(output)?;
    let (val_acc, val_loss) = evaluate(&mut net, &held_out, vs.device())?;
    let digest = sha256_file(output)?;
    out.emit(Line::Result {
        digest,
        metrics: BTreeMap::from([
            ("examples".to_string(), train.rows() as f64),
            ("loss".to_string(), loss),
            ("valAccuracy".to_string(), val_acc),
            ("valLoss".to_string(), val_loss),
            ("valExamples".to_string(), held_out.rows() as f64),
            ("startAccuracy".to_string(), start_acc),
            ("startLoss".to_string(), start_loss),
            ("samplesPerSecond".to_string(), throughput),
        ]),
        summary: BTreeMap::from([
            ("round".to_string(), round.to_string()),
            ("valAccuracy".to_string(), format!("{val_acc:.4}")),
        ]),
        vector: vec![val_acc, loss],
    });
    Ok(())
}

fn federated_init(spec: &Spec, output: &str, out: &mut dyn Sink) -> Result<(), TaskError> {
    let (_, _, features, classes) = federated_data(spec)?;
    if !output.ends_with(".safetensors") {
        return Err(TaskError::Unsupported(format!(
            "the model {output} must be a .safetensors file"
        )));
    }
    let (vs, _) = federated_network(spec, features, classes, None)?;
    vs.save(output)?;
    let digest = sha256_file(output)?;
    let elements: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    out.emit(Line::Result {
        digest,
        metrics: BTreeMap::from([("elements".to_string(), elements as f64)]),
        summary: BTreeMap::new(),
        vector: vec![],
    });
    Ok(())
}

fn federated_evaluate(spec: &Spec, model: &str, out: &mut dyn Sink) -> Result<(), TaskError> {
    let (_, held_out, features, classes) = federated_data(spec)?;
    let (vs, mut net) = federated_network(spec, features, classes, Some(model))?;
    let (acc, loss) = evaluate(&mut net, &held_out, vs.device())?;
    let digest = sha256_file(model)?;
    out.emit(Line::Result {
        digest,
        metrics: BTreeMap::from([
            ("accuracy".to_string(), acc),
            ("loss".to_string(), loss),
            ("examples".to_string(), held_out.rows() as f64),
        ]),
        summary: BTreeMap::from([("accuracy".to_string(), format!("{acc:.4}"))]),
        vector: vec![acc, loss],
    });
    Ok(())
}

fn federated_aggregate(
    _spec: &Spec,
    model: &str,
    updates: &[UpdateFile],
    output: &str,
    rule: edgeloom_fl::Rule,
    outlier_cutoff: f64,
    out: &mut dyn Sink,
) -> Result<(), TaskError> {
    let ups: Vec<edgeloom_fl::Update> = updates
        .iter()
        .map(|u| edgeloom_fl::Update {
            path: u.path.clone().into(),
            weight: u.weight,
        })
        .collect();
    let opts = edgeloom_fl::Options {
        rule,
        outlier_cutoff,
        ..edgeloom_fl::Options::default()
    };
    let o = edgeloom_fl::aggregate(
        Path::new(model),
        &ups,
        &opts,
        Path::new(output),
        Default::default(),
    )
    .map_err(|e| TaskError::Unsupported(e.to_string()))?;
    // One verdict per update, in order: 1 accepted, 0 rejected as misbehaviour, -1
    // rejected as unreadable, -2 far smaller than the round's (the last two not held
    // against the node).
    let verdicts: Vec<f64> = (0..updates.len())
        .map(|i| match o.rejected.iter().find(|(j, _)| *j == i) {
            None => 1.0,
            Some((_, edgeloom_fl::Rejection::Small { .. })) => -2.0,
            Some((_, r)) if r.is_misbehaviour() => 0.0,
            Some(_) => -1.0,
        })
        .collect();
    let reasons: Vec<String> = o.rejected.iter().map(|(i, r)| format!("{i}:{r}")).collect();
    out.emit(Line::Result {
        digest: o.sha256,
        metrics: BTreeMap::from([
            ("accepted".to_string(), o.accepted.len() as f64),
            ("rejected".to_string(), o.rejected.len() as f64),
            ("weight".to_string(), o.weight),
            ("elements".to_string(), o.elements as f64),
        ]),
        summary: BTreeMap::from([("rejected".to_string(), reasons.join("; "))]),
        vector: verdicts,
    });
    Ok(())
}

struct Quiet;

impl Sink for Quiet {
    fn emit(&mut self, _line: Line) {}
}

/// The Federated train step's local training, for `edgeloom-runner simulate`.
pub(crate) fn fit_for_simulation(
    spec: &Spec,
    vs: &mut nn::VarStore,
    net: &Net,
    data: &Dataset,
    (epochs, shuffle): (u32, u64),
    prox: Option<&Prox>,
) -> Result<(), TaskError> {
    fit_epochs(
        spec,
        vs,
        net,
        data,
        &mut Quiet,
        (0, 100),
        (epochs, shuffle, None, prox),
    )?;
    Ok(())
}

/// Accuracy and loss on `d`, for `edgeloom-runner simulate`.
pub(crate) fn evaluate_for_simulation(
    net: &mut Net,
    d: &Dataset,
    device: Device,
) -> Result<(f64, f64), TaskError> {
    evaluate(net, d, device)
}
