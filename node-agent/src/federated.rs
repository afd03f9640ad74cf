//! A Federated task's files (docs/ARCHITECTURE.md, "Federated learning in a tree"): the
//! agent downloads what the step reads from the presigned URLs the operator put in the
//! task, checks each against its sha256, hands local paths to the runner, and uploads what
//! the runner wrote to the presigned PUT URL. The agent never holds store credentials; the
//! runner never touches the network.
//!
//! For the attack tests only, `EDGELOOM_TEST_POISON` makes an agent a poisoner: `scale:<f>`
//! multiplies its update's change by `f`, `flip` reverses it; `aggregate:scale:<f>` and
//! `aggregate:flip` do the same to the member models it aggregates instead, and
//! `aggregate:hide` makes its aggregations claim they could not read their last update.
//! The poisoned bytes are what it uploads and reports, consistently, as a real attacker
//! would.

use edgeloom_crds::federated::{FederatedStepKind, FederatedTask, ModelObject};
use edgeloom_crds::runner_protocol::{FederatedStep, UpdateFile};
use edgeloom_crds::workload::Federation;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The node's X25519 secret key, kept in the work directory (`box.key`, hex, mode 0600)
/// across restarts; made on first start. A key that cannot be kept is made anew each
/// start (the node's sealed tasks then fail after a restart, and are retried elsewhere).
pub fn box_key(work_dir: &Path) -> crypto_box::SecretKey {
    let path = work_dir.join("box.key");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(bytes) = hex::decode(text.trim())
        && let Ok(b) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        return crypto_box::SecretKey::from_bytes(b);
    }
    let key = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
    let _ = std::fs::create_dir_all(work_dir);
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(hex::encode(key.to_bytes()).as_bytes())
    })();
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "the node's key cannot be kept; a new one is made at each start");
    }
    key
}

/// Largest model the agent moves.
const MAX_BYTES: u64 = 4 << 30;

/// A step made ready to run: its runner step and where its output goes.
#[derive(Debug)]
pub struct Prepared {
    /// The runner's step (local paths).
    pub step: FederatedStep,
    /// The file the runner writes and its PUT URL.
    pub output: Option<(PathBuf, String)>,
    /// The step's starting model, downloaded (for the test-only poisoning).
    pub model: Option<PathBuf>,
    /// The scratch directory (removed by [`cleanup`]).
    pub dir: PathBuf,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// A URL for messages: without its query (the signature).
fn bare(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// Downloads `object` to `path`; an error names what went wrong (never the signature).
fn download(object: &ModelObject, path: &Path) -> Result<(), String> {
    let r = agent()
        .get(&object.url)
        .call()
        .map_err(|e| format!("downloading {}: {e}", bare(&object.url)))?;
    let status = r.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(format!("downloading {}: HTTP {status}", bare(&object.url)));
    }
    let mut reader = r.into_body().into_reader().take(MAX_BYTES + 1);
    let mut file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("downloading {}: {e}", bare(&object.url)))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > MAX_BYTES {
            return Err(format!(
                "{} is larger than {MAX_BYTES} bytes",
                bare(&object.url)
            ));
        }
        h.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| e.to_string())?;
    }
    file.flush().map_err(|e| e.to_string())?;
    let actual = hex::encode(h.finalize());
    if actual != object.sha256 {
        return Err(format!(
            "{} has sha256 {actual}, not the expected {}",
            bare(&object.url),
            object.sha256
        ));
    }
    Ok(())
}

/// Uploads `path` to the presigned PUT `url`.
pub fn upload(path: &Path, url: &str) -> Result<u64, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = bytes.len() as u64;
    let r = agent()
        .put(url)
        .header("content-type", "application/octet-stream")
        .send(&bytes[..])
        .map_err(|e| format!("uploading to {}: {e}", bare(url)))?;
    let status = r.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(format!("uploading to {}: HTTP {status}", bare(url)));
    }
    Ok(size)
}

/// Downloads the step's inputs into `dir` (blocking: call from a blocking thread).
pub fn prepare(
    task: &FederatedTask,
    federation: &Federation,
    dir: &Path,
) -> Result<Prepared, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let model = match &task.urls.model {
        Some(m) => {
            let p = dir.join("model.safetensors");
            download(m, &p).map_err(|e| format!("the round's model: {e}"))?;
            Some(p)
        }
        None => None,
    };
    let output = task
        .urls
        .output
        .as_ref()
        .map(|u| (dir.join("output.safetensors"), u.clone()));
    let out_path = || {
        output
            .as_ref()
            .map(|(p, _)| p.display().to_string())
            .ok_or_else(|| "the task names no output URL".to_string())
    };
    let model_path = || {
        model
            .as_ref()
            .map(|p| p.display().to_string())
            .ok_or_else(|| "the task names no model".to_string())
    };
    let step = match task.step {
        FederatedStepKind::Init => FederatedStep::Init {
            output: out_path()?,
        },
        FederatedStepKind::Train => FederatedStep::Train {
            round: task.round,
            model: Some(model_path()?),
            output: out_path()?,
        },
        FederatedStepKind::Evaluate => FederatedStep::Evaluate {
            model: model_path()?,
        },
        FederatedStepKind::Aggregate => {
            // An update that cannot be had, or whose bytes are not what its node
            // reported, is handed over as a missing file: the aggregation rejects it as
            // unreadable (not its node's fault as far as this node can tell).
            let mut updates = Vec::new();
            let hide = hides_an_update();
            let n = task.urls.updates.len();
            for (i, u) in task.urls.updates.iter().enumerate() {
                let p = dir.join(format!("update-{i}.safetensors"));
                if hide && i + 1 == n {
                    tracing::warn!(
                        update = i,
                        "TEST ONLY: this agent claims it could not read an update"
                    );
                } else if let Err(e) = download(u, &p) {
                    tracing::warn!(update = i, error = %e, "update left out of the aggregation");
                    let _ = std::fs::remove_file(&p);
                }
                updates.push(UpdateFile {
                    path: p.display().to_string(),
                    weight: u.weight.unwrap_or(1.0),
                });
            }
            FederatedStep::Aggregate {
                model: model_path()?,
                updates,
                output: out_path()?,
                rule: federation.aggregation,
                trim: federation.trim_fraction,
                outlier_cutoff: federation.outlier_cutoff,
            }
        }
    };
    Ok(Prepared {
        step,
        output,
        model,
        dir: dir.to_path_buf(),
    })
}

/// Test-only: whether `EDGELOOM_TEST_POISON=aggregate:hide` makes this agent's member
/// aggregations leave out their last update as if it could not be read.
fn hides_an_update() -> bool {
    std::env::var("EDGELOOM_TEST_POISON").is_ok_and(|v| v == "aggregate:hide")
}

/// Test-only: poisons the update at `output` relative to `model` as
/// `EDGELOOM_TEST_POISON` says, returning its new digest.
pub fn poison(
    step: FederatedStepKind,
    model: &Path,
    output: &Path,
) -> Result<Option<String>, String> {
    let Ok(how) = std::env::var("EDGELOOM_TEST_POISON") else {
        return Ok(None);
    };
    // `aggregate:<how>` poisons this node's member aggregations instead of its updates.
    let (target, how) = match how.strip_prefix("aggregate:") {
        Some(rest) => (FederatedStepKind::Aggregate, rest.to_string()),
        None => (FederatedStepKind::Train, how),
    };
    if step != target || how == "hide" {
        return Ok(None);
    }
    let factor: f32 = match how.as_str() {
        "flip" => -1.0,
        s => match s.strip_prefix("scale:").and_then(|f| f.parse().ok()) {
            Some(f) => f,
            None => {
                return Err(format!(
                    "EDGELOOM_TEST_POISON={how} is neither flip nor scale:<factor>"
                ));
            }
        },
    };
    let (layout, base) = edgeloom_fl::model::read_flat(model).map_err(|e| e.to_string())?;
    let (_, mut v) = edgeloom_fl::model::read_flat(output).map_err(|e| e.to_string())?;
    for (x, b) in v.iter_mut().zip(&base) {
        *x = b + factor * (*x - b);
    }
    edgeloom_fl::model::write_flat(output, &layout, &v, Default::default())
        .map_err(|e| e.to_string())?;
    tracing::warn!(%how, ?step, "TEST ONLY: this agent poisoned what it wrote");
    edgeloom_fl::model::file_sha256(output)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Removes the step's scratch directory.
pub fn cleanup(p: &Prepared) {
    let _ = std::fs::remove_dir_all(&p.dir);
}

/// Uploads what a Federated step wrote (after the test-only poisoning of a training
/// update), or fails the task saying why; removes the step's scratch files.
pub async fn finish(
    prepared: Prepared,
    outcome: crate::execution::Outcome,
    step: Option<edgeloom_crds::federated::FederatedStepKind>,
) -> crate::execution::Outcome {
    let done = tokio::task::spawn_blocking(move || {
        let outcome = match outcome {
            crate::execution::Outcome::Succeeded {
                mut digest,
                metrics,
                summary,
                vector,
            } => {
                let result = (|| {
                    if let Some((path, url)) = &prepared.output {
                        if let Some(step) = step
                            && let Some(model) = &prepared.model
                            && let Some(d) = poison(step, model, path)?
                        {
                            digest = d;
                        }
                        upload(path, url)?;
                    }
                    Ok::<(), String>(())
                })();
                match result {
                    Ok(()) => crate::execution::Outcome::Succeeded {
                        digest,
                        metrics,
                        summary,
                        vector,
                    },
                    Err(e) => crate::execution::Outcome::Failed(e),
                }
            }
            other => other,
        };
        cleanup(&prepared);
        outcome
    })
    .await;
    done.unwrap_or_else(|e| crate::execution::Outcome::Failed(format!("uploading the result: {e}")))
}
