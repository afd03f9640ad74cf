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

/// Writes node `i` of `n` a non-IID slice of the digits (most rows of its own labels, a
/// few of the others) as a node-local CSV, and the shared held-out rows as another.
fn digits_slices(dir: &std::path::Path, n: usize) -> (Vec<PathBuf>, PathBuf) {
    let d = edgeloom_runner::data::Dataset::digits().expect("digits");
    let (train, test) = d.split(0, 0, 1);
    let row = |ds: &edgeloom_runner::data::Dataset, r: usize| {
        let x = &ds.x[r * ds.features..(r + 1) * ds.features];
        let mut s: Vec<String> = x.iter().map(|v| format!("{v}")).collect();
        s.push(ds.y[r].to_string());
        s.join(",")
    };
    let mut files = Vec::new();
    for i in 0..n {
        let rows: Vec<String> = (0..train.rows())
            .filter(|r| train.y[*r] as usize % n == i || r % 10 == i)
            .map(|r| row(&train, r))
            .collect();
        let p = dir.join(format!("node-{i}.csv"));
        std::fs::write(&p, rows.join("\n")).expect("slice");
        files.push(p);
    }
    let p = dir.join("test.csv");
    let rows: Vec<String> = (0..test.rows()).map(|r| row(&test, r)).collect();
    std::fs::write(&p, rows.join("\n")).expect("test");
    (files, p)
}

fn federated(data: &std::path::Path, step: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "device": "cpu",
        "dataPath": data,
        "workload": {"kind": "Federated", "model": {"builtin": "Mlp"}, "dataset": {"nodeLocal": "digits"},
                     "parameters": {"localEpochs": 2, "batchSize": 32, "learningRate": 0.05, "classes": 10, "seed": 5}},
        "federated": step,
    })
}

/// Rounds as the operator drives them, here by hand: three nodes with non-IID slices
/// train from the round's model, an aggregation step averages their updates by examples,
/// and the aggregate starts the next round. Four rounds reach 90% on held-out digits
/// none of the nodes saw, where a node's own model, trained alone, does not.
#[test]
fn federated_rounds_over_non_iid_nodes_learn_the_digits() {
    let dir = temp("federated");
    let (nodes, test) = digits_slices(&dir, 3);
    // Round 0: the job's initial model, the same wherever it is built.
    let init: Vec<String> = (0..2)
        .map(|i| {
            let output = dir.join(format!("init-{i}.safetensors"));
            let r = run(federated(
                &nodes[i],
                serde_json::json!({"step": "init", "output": output}),
            ));
            assert_eq!(r.code, 0, "{:?}", r.lines);
            r.result().0
        })
        .collect();
    assert_eq!(init[0], init[1], "two nodes build the same initial model");
    let mut model: Option<PathBuf> = Some(dir.join("init-0.safetensors"));
    let mut alone = 0.0;
    for round in 1..=4u32 {
        let mut updates = Vec::new();
        for (i, data) in nodes.iter().enumerate() {
            let output = dir.join(format!("r{round}-n{i}.safetensors"));
            let r = run(federated(
                data,
                serde_json::json!({"step": "train", "round": round, "model": model, "output": output}),
            ));
            assert_eq!(r.code, 0, "{:?}", r.lines);
            let (digest, metrics) = r.result();
            assert_eq!(
                digest,
                edgeloom_fl::model::file_sha256(&output).expect("digest")
            );
            assert!(
                metrics["examples"] > 100.0 && metrics["valExamples"] > 10.0,
                "{metrics:?}"
            );
            updates.push(serde_json::json!({"path": output, "weight": metrics["examples"]}));
            if round == 1 && i == 0 {
                let e = run(federated(
                    &test,
                    serde_json::json!({"step": "evaluate", "model": output}),
                ));
                alone = e.result().1["accuracy"];
            }
        }
        let base = model.clone().expect("the round's model");
        let output = dir.join(format!("r{round}-global.safetensors"));
        let a = run(federated(
            &nodes[0],
            serde_json::json!({"step": "aggregate", "model": base, "updates": updates, "output": output, "rule": "Mean"}),
        ));
        assert_eq!(a.code, 0, "{:?}", a.lines);
        assert_eq!(a.result().1["accepted"], 3.0);
        model = Some(output);
    }
    let e = run(federated(
        &test,
        serde_json::json!({"step": "evaluate", "model": model}),
    ));
    assert_eq!(e.code, 0, "{:?}", e.lines);
    let acc = e.result().1["accuracy"];
    eprintln!("federated accuracy {acc}, node 0 alone {alone}");
    assert!(acc >= 0.90, "federated accuracy {acc}");
    assert!(
        alone < acc - 0.1,
        "one node's slice alone reaches {alone}, federated {acc}"
    );
}

/// A node's update is a claim: garbage, a wrong-shaped model and a scaled (poisoned)
/// one are rejected by the aggregation step under TrimmedMean, which still succeeds, and
/// says which update it rejected and whether the node is to blame.
#[test]
fn an_aggregation_step_rejects_broken_and_poisoned_updates_and_carries_on() {
    let dir = temp("federated-attack");
    let (nodes, _) = digits_slices(&dir, 5);
    // Every update starts from the job's initial model, the base of the aggregation.
    let init = dir.join("init.safetensors");
    let r = run(federated(
        &nodes[0],
        serde_json::json!({"step": "init", "output": init}),
    ));
    assert_eq!(r.code, 0, "{:?}", r.lines);
    let mut updates = Vec::new();
    for (i, data) in nodes.iter().enumerate() {
        let output = dir.join(format!("n{i}.safetensors"));
        let r = run(federated(
            data,
            serde_json::json!({"step": "train", "round": 1, "model": init, "output": output}),
        ));
        assert_eq!(r.code, 0, "{:?}", r.lines);
        updates.push(serde_json::json!({"path": output, "weight": r.result().1["examples"]}));
    }
    // Node 3 scales its update by 100; node 4's file is garbage; a missing one is the store's fault.
    let (layout, mut v) = edgeloom_fl::model::read_flat(&dir.join("n3.safetensors")).expect("n3");
    let (_, base) = edgeloom_fl::model::read_flat(&init).expect("init");
    for (x, b) in v.iter_mut().zip(&base) {
        *x = b + 100.0 * (*x - b);
    }
    edgeloom_fl::model::write_flat(&dir.join("n3.safetensors"), &layout, &v, Default::default())
        .expect("poisoned");
    std::fs::write(dir.join("n4.safetensors"), b"garbage").expect("garbage");
    updates.push(serde_json::json!({"path": dir.join("missing.safetensors"), "weight": 10.0}));
    let output = dir.join("global.safetensors");
    let a = run(federated(
        &nodes[0],
        serde_json::json!({"step": "aggregate", "model": init, "updates": updates,
                           "output": output, "rule": "TrimmedMean", "trim": 0.2}),
    ));
    assert_eq!(a.code, 0, "{:?}", a.lines);
    let verdicts = a
        .lines
        .iter()
        .find_map(|l| match l {
            Line::Result { vector, .. } => Some(vector.clone()),
            _ => None,
        })
        .expect("result");
    assert_eq!(verdicts, vec![1.0, 1.0, 1.0, 0.0, 0.0, -1.0]);
    assert_eq!(a.result().1["accepted"], 3.0);
    // With nothing usable the step fails, naming why.
    let none = run(federated(
        &nodes[0],
        serde_json::json!({"step": "aggregate", "model": dir.join("n0.safetensors"),
                           "updates": [{"path": dir.join("n4.safetensors"), "weight": 1.0}], "output": output, "rule": "Mean"}),
    ));
    assert_eq!(none.code, 1);
    assert!(
        none.error().contains("no update could be accepted"),
        "{}",
        none.error()
    );
}

#[test]
fn a_federated_task_without_its_step_or_with_a_wrong_model_fails_cleanly() {
    let dir = temp("federated-bad");
    let (nodes, _) = digits_slices(&dir, 2);
    let mut spec = federated(&nodes[0], serde_json::json!(null));
    spec.as_object_mut().expect("obj").remove("federated");
    let r = run(spec);
    assert_eq!(r.code, 1);
    assert!(r.error().contains("round's step"), "{}", r.error());
    let bad = dir.join("bad.safetensors");
    std::fs::write(&bad, b"\x08\0\0\0\0\0\0\0{}      ").expect("bad");
    let r = run(federated(
        &nodes[0],
        serde_json::json!({"step": "train", "round": 2, "model": bad, "output": dir.join("o.safetensors")}),
    ));
    assert_eq!(r.code, 1, "{:?}", r.lines);
    assert!(
        r.error().contains("fc1.weight") || r.error().contains("bad.safetensors"),
        "{}",
        r.error()
    );
}
