//! `edgeloom-runner serve` through its pipe: the real binary and real libtorch on a real
//! TorchScript model, compared with Python torch running the same file.

use edgeloom_crds::serving::{FailCode, Frame, ReplicaStatus, ServeConfig};
use edgeloom_e2e::torch_models;
use std::io::Write;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

fn start(cfg: &ServeConfig) -> (Child, ChildStdin, ChildStdout) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edgeloom-runner"))
        .env_remove("LD_LIBRARY_PATH")
        .arg("serve")
        .arg(serde_json::to_string(cfg).unwrap())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("runner starts");
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    (child, stdin, stdout)
}

fn next(out: &mut ChildStdout) -> Frame {
    Frame::read_from(out)
        .expect("the pipe reads")
        .expect("a frame, not the end")
        .expect("a frame that decodes")
}

fn config(model: &std::path::Path, max_batch: u32) -> ServeConfig {
    ServeConfig {
        model: model.display().to_string(),
        input_shape: vec![64],
        max_batch,
        max_delay_micros: 2_000,
        threads: 1,
        device: Some("cpu".into()),
        precision: None,
    }
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("edgeloom-serve-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)
}

#[test]
fn serves_the_models_outputs_batched_and_survives_bad_requests() {
    let dir = temp("outputs");
    let model = dir.join("digits.pt");
    torch_models::digits_torchscript(&model).expect("the digits model is made");
    let rows = torch_models::digits_rows(40);
    let want = torch_models::python_forward(&model, &rows).expect("python's outputs");

    let (mut child, mut stdin, mut stdout) = start(&config(&model, 16));
    assert_eq!(
        next(&mut stdout),
        Frame::Status(ReplicaStatus {
            ready: true,
            output_shape: vec![10],
            ..Default::default()
        })
    );

    // 40 requests of one row at once (batched up to 16 rows), then one of 3 rows.
    let mut frames = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        Frame::Request {
            id: i as u64,
            shape: vec![1, 64],
            data: r.clone(),
        }
        .write_to(&mut frames)
        .unwrap();
    }
    Frame::Request {
        id: 100,
        shape: vec![3, 64],
        data: rows[..3].concat(),
    }
    .write_to(&mut frames)
    .unwrap();
    // A request of the wrong shape, and one whose bytes do not match its shape.
    Frame::Request {
        id: 101,
        shape: vec![1, 65],
        data: vec![0.0; 65],
    }
    .write_to(&mut frames)
    .unwrap();
    let mut broken = Frame::Request {
        id: 102,
        shape: vec![1, 64],
        data: vec![0.0; 64],
    }
    .encode();
    broken.truncate(broken.len() - 8);
    frames.extend_from_slice(&(broken.len() as u32).to_le_bytes());
    frames.extend_from_slice(&broken);
    // And a good one after them: the runner is still in step.
    Frame::Request {
        id: 103,
        shape: vec![1, 64],
        data: rows[7].clone(),
    }
    .write_to(&mut frames)
    .unwrap();
    stdin.write_all(&frames).unwrap();
    stdin.flush().unwrap();

    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 44 {
        let f = next(&mut stdout);
        seen.insert(f.id().expect("an answer"), f);
    }
    for (i, r) in want.iter().enumerate() {
        match &seen[&(i as u64)] {
            Frame::Reply { shape, data, .. } => {
                assert_eq!(shape, &vec![1, 10]);
                assert!(close(data, r), "row {i}: {data:?} != {r:?}");
            }
            other => panic!("row {i}: {other:?}"),
        }
    }
    match &seen[&100] {
        Frame::Reply { shape, data, .. } => {
            assert_eq!(shape, &vec![3, 10]);
            assert!(close(data, &want[..3].concat()));
        }
        other => panic!("{other:?}"),
    }
    match &seen[&101] {
        Frame::Failed { code, message, .. } => {
            assert_eq!(*code, FailCode::BadRequest);
            assert!(
                message.contains("[1, 65]") && message.contains("[N, 64]"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    match &seen[&102] {
        Frame::Failed { code, message, .. } => {
            assert_eq!(*code, FailCode::BadRequest);
            assert!(message.contains("needs 64 float32"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&seen[&103], Frame::Reply { data, .. } if close(data, &want[7])));

    // Closing the pipe ends the runner cleanly.
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_broken_model_file_is_a_not_ready_status_and_exit_1() {
    let dir = temp("broken");
    let model = dir.join("broken.pt");
    std::fs::write(&model, b"this is not TorchScript").unwrap();
    let (mut child, _stdin, mut stdout) = start(&config(&model, 8));
    match next(&mut stdout) {
        Frame::Status(s) => {
            assert!(!s.ready);
            let reason = s.reason.unwrap_or_default();
            assert!(reason.contains("loading TorchScript"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(child.wait().unwrap().code(), Some(1));
}

#[test]
fn a_model_of_another_input_size_is_caught_by_the_warm_up() {
    let dir = temp("warm-up");
    let model = dir.join("digits.pt");
    torch_models::digits_torchscript(&model).expect("the digits model is made");
    let mut cfg = config(&model, 8);
    cfg.input_shape = vec![63];
    let (mut child, _stdin, mut stdout) = start(&cfg);
    match next(&mut stdout) {
        Frame::Status(s) => assert!(!s.ready && s.reason.is_some(), "{s:?}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(child.wait().unwrap().code(), Some(1));
}
