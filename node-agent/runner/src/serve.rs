//! `edgeloom-runner serve`: a long-lived libtorch process holding one TorchScript model and
//! answering requests over its stdin/stdout pipe, with dynamic batching
//! (docs/ARCHITECTURE.md, "Serving").
//!
//! Frames are [`edgeloom_crds::serving::Frame`]s with a length prefix. The runner first
//! loads the model and runs a warm-up pass (which also tells the output row shape), then
//! says `Status{ready}`. A reader thread checks each request against the input shape (a
//! request that does not fit is answered `BadRequest` at once and never reaches the
//! model); the batcher takes the first waiting request, waits at most `maxDelayMicros` for
//! others up to `maxBatch` rows, runs them as one forward pass and answers each. A batch
//! the model fails on fails its requests, not the runner.

use edgeloom_crds::serving::{self, FailCode, Frame, ReplicaStatus, ServeConfig};
use std::io::{BufWriter, Read, Write};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

struct Job {
    id: u64,
    rows: usize,
    data: Vec<f32>,
}

type Out<W> = Arc<Mutex<BufWriter<W>>>;

fn send<W: Write>(out: &Out<W>, frames: &[Frame]) -> bool {
    let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
    frames.iter().all(|f| f.write_to(&mut *w).is_ok()) && w.flush().is_ok()
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "libtorch panicked".into())
}

/// The loaded model and how to feed it.
struct Model {
    module: tch::CModule,
    device: Device,
    kind: Kind,
    input: Vec<i64>,
    /// One output row's shape, once the warm-up pass told it.
    output: Option<Vec<i64>>,
}

impl Model {
    fn load(cfg: &ServeConfig) -> Result<Model, String> {
        if cfg.input_shape.is_empty() || cfg.input_shape.contains(&0) {
            return Err(format!(
                "inputShape {:?} must name at least one dimension, none zero",
                cfg.input_shape
            ));
        }
        let device = match cfg.device.as_deref() {
            Some("cpu") => Device::Cpu,
            Some("cuda") => Device::Cuda(0),
            None => Device::cuda_if_available(),
            Some(d) => return Err(format!("device {d:?} is not cpu or cuda")),
        };
        let kind = match (cfg.precision.as_deref(), device) {
            (None | Some("fp32"), _) => Kind::Float,
            (Some("fp16"), Device::Cuda(_)) => Kind::Half,
            (Some("bf16"), Device::Cuda(_)) => Kind::BFloat16,
            (Some("fp16" | "bf16"), _) => Kind::Float,
            (Some(p), _) => return Err(format!("precision {p:?} is not fp32, fp16 or bf16")),
        };
        let mut module = tch::CModule::load_on_device(&cfg.model, device)
            .map_err(|e| serving::brief(&format!("loading TorchScript {}: {e}", cfg.model)))?;
        module.set_eval();
        if kind != Kind::Float {
            module.to(device, kind, false);
        }
        Ok(Model {
            module,
            device,
            kind,
            input: cfg.input_shape.iter().map(|d| *d as i64).collect(),
            output: None,
        })
    }

    /// Runs `rows` rows; the outputs as float32 with their shape.
    fn forward(&self, rows: usize, data: &[f32]) -> Result<(Vec<i64>, Vec<f32>), String> {
        let mut shape = vec![rows as i64];
        shape.extend_from_slice(&self.input);
        let run = || -> Result<(Vec<i64>, Vec<f32>), String> {
            let x = Tensor::from_slice(data)
                .view(shape.as_slice())
                .to_device(self.device)
                .to_kind(self.kind);
            let y = tch::no_grad(|| self.module.forward_ts(&[x]))
                .map_err(|e| serving::brief(&e.to_string()))?;
            let y = y.to_kind(Kind::Float).to_device(Device::Cpu).contiguous();
            let size = y.size();
            if size.first() != Some(&(rows as i64)) {
                return Err(format!(
                    "the model returned shape {size:?} for {rows} input rows"
                ));
            }
            if size.len() > serving::MAX_DIMS {
                return Err(format!(
                    "the model returned {} dimensions; at most {} travel",
                    size.len(),
                    serving::MAX_DIMS
                ));
            }
            // Every batch's rows must have the warm-up's shape (the answers are cut by it).
            if let Some(out) = &self.output
                && size[1..] != out[..]
            {
                return Err(format!(
                    "the model returned rows of shape {:?}, its warm-up rows were {out:?}",
                    &size[1..]
                ));
            }
            let flat = Vec::<f32>::try_from(y.flatten(0, -1)).map_err(|e| e.to_string())?;
            Ok((size, flat))
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
            .unwrap_or_else(|p| Err(panic_text(p)))
    }
}

/// Serves until `input` ends. Errors only when the model cannot be loaded or warmed up
/// (after saying so in a not-ready status).
pub fn serve<R, W>(cfg: &ServeConfig, mut input: R, output: W) -> Result<(), String>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
{
    let out: Out<W> = Arc::new(Mutex::new(BufWriter::new(output)));
    if cfg.threads > 0 {
        tch::set_num_threads(cfg.threads as i32);
    }
    let model = Model::load(cfg).and_then(|mut m| {
        let row: usize = m.input.iter().product::<i64>() as usize;
        let (shape, _) = m.forward(1, &vec![0.0; row])?;
        m.output = Some(shape[1..].to_vec());
        Ok((
            m,
            shape[1..].iter().map(|d| *d as u32).collect::<Vec<u32>>(),
        ))
    });
    let (model, output_shape) = match model {
        Ok(m) => m,
        Err(e) => {
            send(
                &out,
                &[Frame::Status(ReplicaStatus {
                    ready: false,
                    reason: Some(e.clone()),
                    ..Default::default()
                })],
            );
            return Err(e);
        }
    };
    let row_len: usize = cfg.input_shape.iter().map(|d| *d as usize).product();
    let out_row: usize = output_shape.iter().map(|d| *d as usize).product();
    send(
        &out,
        &[Frame::Status(ReplicaStatus {
            ready: true,
            output_shape: output_shape.clone(),
            ..Default::default()
        })],
    );

    let (tx, rx) = mpsc::channel::<Job>();
    let reader_out = out.clone();
    let input_shape = cfg.input_shape.clone();
    std::thread::spawn(move || {
        loop {
            let body = match serving::read_body(&mut input) {
                Ok(Some(b)) => b,
                // The agent closed the pipe (or broke it): stop after the queue drains.
                Ok(None) | Err(_) => return,
            };
            let reject = |id: u64, message: String| {
                send(
                    &reader_out,
                    &[Frame::Failed {
                        id,
                        code: FailCode::BadRequest,
                        message,
                    }],
                )
            };
            match Frame::decode(&body) {
                Ok(Frame::Request { id, shape, data }) => {
                    if shape.len() != input_shape.len() + 1
                        || shape[1..] != input_shape[..]
                        || shape[0] == 0
                    {
                        reject(
                            id,
                            format!(
                                "input shape {shape:?} does not fit the model's input [N, {}] (N >= 1)",
                                input_shape
                                    .iter()
                                    .map(|d| d.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        );
                        continue;
                    }
                    let rows = shape[0] as usize;
                    if tx.send(Job { id, rows, data }).is_err() {
                        return;
                    }
                }
                Ok(other) => {
                    reject(
                        other.id().unwrap_or(0),
                        "the runner takes only request frames".into(),
                    );
                }
                Err(e) => {
                    reject(Frame::peek_id(&body).unwrap_or(0), e.0);
                }
            }
        }
    });

    let max_batch = cfg.max_batch.max(1) as usize;
    let max_delay = Duration::from_micros(cfg.max_delay_micros);
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return Ok(()),
            },
        };
        let deadline = Instant::now() + max_delay;
        let mut rows = first.rows;
        let mut batch = vec![first];
        while rows < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) if rows + j.rows <= max_batch => {
                    rows += j.rows;
                    batch.push(j);
                }
                Ok(j) => {
                    held = Some(j);
                    break;
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        let mut data = Vec::with_capacity(rows * row_len);
        for j in &batch {
            data.extend_from_slice(&j.data);
        }
        let reply = |j: &Job, y: &[f32]| {
            let mut shape = vec![j.rows as u32];
            shape.extend_from_slice(&output_shape);
            Frame::Reply {
                id: j.id,
                shape,
                data: y.to_vec(),
            }
        };
        let frames: Vec<Frame> = match model.forward(rows, &data) {
            Ok((_, y)) => {
                let mut at = 0;
                batch
                    .iter()
                    .map(|j| {
                        let n = j.rows * out_row;
                        let f = reply(j, &y[at..at + n]);
                        at += n;
                        f
                    })
                    .collect()
            }
            // One request the model fails on must not fail the others batched with it:
            // run each alone, so only the culprit fails.
            Err(_) if batch.len() > 1 => batch
                .iter()
                .map(|j| match model.forward(j.rows, &j.data) {
                    Ok((_, y)) => reply(j, &y),
                    Err(e) => Frame::Failed {
                        id: j.id,
                        code: FailCode::Model,
                        message: e,
                    },
                })
                .collect(),
            Err(e) => vec![Frame::Failed {
                id: batch[0].id,
                code: FailCode::Model,
                message: e,
            }],
        };
        if !send(&out, &frames) {
            // Nobody reads the answers any more.
            return Ok(());
        }
    }
}
