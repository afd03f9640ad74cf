//! edgeloom-runner through its protocol: the real binary, real libtorch, on CPU (GPU
//! checks run only where CUDA is present, and say so otherwise).

use edgeloom_runner::protocol::Line;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

struct Run {
    code: i32,
    lines: Vec<Line>,
}

impl Run {
    fn result(&self) -> (String, std::collections::BTreeMap<String, f64>) {
        self.lines
            .iter()
            .find_map(|l| match l {
                Line::Result {
                    digest, metrics, ..
                } => Some((digest.clone(), metrics.clone())),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no result line in {:?}", self.lines))
    }

    fn error(&self) -> String {
        self.lines
            .iter()
            .find_map(|l| match l {
                Line::Error { message } => Some(message.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no error line in {:?}", self.lines))
    }
}

fn run(spec: serde_json::Value) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeloom-runner"))
        .env_remove("LD_LIBRARY_PATH")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runner starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(spec.to_string().as_bytes())
        .expect("spec written");
    let out = child.wait_with_output().expect("runner ends");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not a protocol line ({e}): {l}"))
        })
        .collect();
    Run {
        code: out.status.code().unwrap_or(-1),
        lines,
    }
}

fn train(model: &str, optimizer: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "device": "cpu",
        "workload": {"kind": "Train", "model": {"builtin": model}, "dataset": {"builtin": "Digits"},
                     "parameters": {"epochs": 15, "batchSize": 32, "learningRate": 0.001, "optimizer": optimizer, "seed": 3}}
    });
    if let (Some(obj), Some(add)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in add {
            obj.insert(k.clone(), v.clone());
        }
    }
    spec
}

/// Says why a check did not run, past libtest's output capture (which takes only the
/// print macros), so the reason shows in CI logs.
fn skipped(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "edgeloom-runner-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn training_a_cnn_on_the_digits_reaches_95_percent() {
    let r = run(train("Cnn", "Adam", serde_json::json!({})));
    assert_eq!(r.code, 0, "{:?}", r.lines);
    let (digest, metrics) = r.result();
    assert_eq!(digest.len(), 64);
    assert!(
        metrics["accuracy"] >= 0.95,
        "accuracy {}",
        metrics["accuracy"]
    );
    assert!(
        r.lines.iter().any(|l| matches!(l, Line::Progress { .. })),
        "reports progress"
    );
}

#[test]
fn an_mlp_with_sgd_also_learns_the_digits() {
    let mut spec = train("Mlp", "Sgd", serde_json::json!({}));
    spec["workload"]["parameters"]["learningRate"] = serde_json::json!(0.05);
    let r = run(spec);
    assert_eq!(r.code, 0, "{:?}", r.lines);
    assert!(r.result().1["accuracy"] >= 0.95, "{:?}", r.result().1);
}

#[test]
fn deterministic_mode_gives_equal_digests_and_another_seed_does_not_hide_behind_it() {
    let spec = train("Mlp", "Adam", serde_json::json!({}));
    let (a, b) = (run(spec.clone()), run(spec.clone()));
    assert_eq!(a.result().0, b.result().0, "same spec, same digest");
    let mut other = spec;
    other["shard"] = serde_json::json!(1);
    other["shards"] = serde_json::json!(2);
    assert_ne!(
        run(other).result().0,
        a.result().0,
        "different data, different digest"
    );
}

#[test]
fn a_retried_training_task_resumes_from_its_checkpoint() {
    let dir = temp("ckpt");
    let mut first = train("Linear", "Adam", serde_json::json!({"checkpointDir": dir}));
    first["workload"]["parameters"]["epochs"] = serde_json::json!(2);
    assert_eq!(run(first).code, 0);
    assert_eq!(
        std::fs::read_to_string(dir.join("epoch")).expect("epoch file"),
        "2"
    );
    let resumed = run(train(
        "Linear",
        "Adam",
        serde_json::json!({"checkpointDir": dir}),
    ));
    assert_eq!(resumed.code, 0);
    assert!(
        resumed.lines.iter().any(|l| matches!(l, Line::Progress { message: Some(m), .. } if m.contains("resumed from checkpoint after epoch 2"))),
        "{:?}",
        resumed.lines
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_torchscript_model_made_by_python_torch_is_loaded_and_run() {
    let dir = temp("ts");
    let model = dir.join("digits.pt");
    // Python torch trains a small model on the same digits and saves it as TorchScript.
    edgeloom_e2e::torch_models::digits_torchscript(&model).expect("python made the model");
    let r = run(serde_json::json!({
        "device": "cpu", "modelPath": model, "shard": 0, "shards": 2,
        "workload": {"kind": "Inference", "model": {"url": "https://example.org/digits.pt"}, "dataset": {"builtin": "Digits"}}
    }));
    assert_eq!(r.code, 0, "{:?}", r.lines);
    let (_, metrics) = r.result();
    assert!(metrics["accuracy"] >= 0.9, "{metrics:?}");
    assert_eq!(metrics["rows"], 180.0, "shard 0 of 2 of the 360 test rows");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_untrained_torchscript_model_is_trained_by_the_runner() {
    let dir = temp("ts-train");
    let model = dir.join("untrained.pt");
    edgeloom_e2e::torch_models::untrained_torchscript(&model).expect("python made the model");
    let r = run(serde_json::json!({
        "device": "cpu", "modelPath": model,
        "workload": {"kind": "Train", "model": {"url": "https://example.org/untrained.pt"}, "dataset": {"builtin": "Digits"},
                     "parameters": {"epochs": 15, "batchSize": 32, "learningRate": 0.002, "optimizer": "Adam"}}
    }));
    assert_eq!(r.code, 0, "{:?}", r.lines);
    assert!(r.result().1["accuracy"] >= 0.95, "{:?}", r.result().1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_corrupt_model_file_fails_the_task_cleanly() {
    let dir = temp("corrupt");
    let model = dir.join("broken.pt");
    std::fs::write(&model, b"this is not a TorchScript archive").expect("write");
    let r = run(serde_json::json!({
        "device": "cpu", "modelPath": model,
        "workload": {"kind": "Inference", "model": {"url": "https://example.org/m.pt"}, "dataset": {"builtin": "Digits"}}
    }));
    assert_eq!(r.code, 1, "a failed task, not a crash: {:?}", r.lines);
    assert!(r.error().contains("libtorch"), "{}", r.error());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unusable_spec_is_exit_code_2() {
    let r = run(serde_json::json!({"workload": {"kind": "Mining"}}));
    assert_eq!(r.code, 2);
    assert!(r.error().starts_with("invalid spec"), "{}", r.error());
}

#[test]
fn the_cpu_benchmark_measures_gflops() {
    let r = run(
        serde_json::json!({"device": "cpu", "workload": {"kind": "Benchmark", "parameters": {"matrixSize": 256}}}),
    );
    assert_eq!(r.code, 0, "{:?}", r.lines);
    assert!(r.result().1["gflops"] > 0.0);
}

#[test]
fn the_runner_starts_without_ld_library_path_and_keeps_libtorch_cuda() {
    // run() removes LD_LIBRARY_PATH: an Info line means libtorch was found through the rpath.
    let r = run(
        serde_json::json!({"device": "cpu", "workload": {"kind": "Benchmark", "parameters": {"matrixSize": 16}}}),
    );
    assert!(
        matches!(r.lines.first(), Some(Line::Info { .. })),
        "{:?}",
        r.lines
    );
    let libtorch = PathBuf::from(std::env::var_os("LIBTORCH").expect("LIBTORCH"));
    if libtorch.join("lib/libtorch_cuda.so").exists() {
        let out = Command::new("readelf")
            .args(["-d", env!("CARGO_BIN_EXE_edgeloom-runner")])
            .output();
        match out {
            Ok(out) => assert!(
                String::from_utf8_lossy(&out.stdout).contains("libtorch_cuda.so"),
                "libtorch_cuda.so was dropped at link time (tch-rs #980)"
            ),
            Err(e) => skipped(&format!("link check: readelf unavailable ({e})")),
        }
    }
}

#[test]
fn cuda_benchmark_on_a_gpu() {
    let probe = run(
        serde_json::json!({"workload": {"kind": "Benchmark", "parameters": {"matrixSize": 16}}}),
    );
    let cuda = matches!(probe.lines.first(), Some(Line::Info { cuda: true, .. }));
    if !cuda {
        skipped("cuda_benchmark_on_a_gpu: libtorch sees no CUDA device on this machine");
        return;
    }
    let r = run(
        serde_json::json!({"device": "cuda", "workload": {"kind": "Benchmark", "parameters": {"matrixSize": 4096}}}),
    );
    assert_eq!(r.code, 0, "{:?}", r.lines);
    assert!(
        matches!(r.lines.first(), Some(Line::Info { device, .. }) if device.starts_with("Cuda"))
    );
    eprintln!("CUDA matmul: {:.0} GFLOP/s", r.result().1["gflops"]);
}
