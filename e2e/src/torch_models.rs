//! TorchScript models made by Python torch (the virtualenv of scripts/install-torch.sh,
//! found through LIBTORCH), for tests that need a real model file.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter of the torch virtualenv that LIBTORCH points into.
pub fn python() -> Option<PathBuf> {
    let libtorch = PathBuf::from(std::env::var_os("LIBTORCH")?);
    // <venv>/lib/python3.X/site-packages/torch -> <venv>/bin/python
    let python = libtorch.ancestors().nth(4)?.join("bin/python");
    python.is_file().then_some(python)
}

/// The shipped digits CSV.
pub fn digits_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../node-agent/runner/data/digits.csv.gz")
}

const TRAIN_AND_SCRIPT: &str = r#"
import csv, gzip, sys, torch
rows = [list(map(float, r)) for r in csv.reader(gzip.open(sys.argv[1], "rt"))]
x = torch.tensor([r[:64] for r in rows]) / 16.0
y = torch.tensor([int(r[64]) for r in rows])
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = torch.optim.Adam(net.parameters(), lr=0.01)
for _ in range(int(sys.argv[3])):
    opt.zero_grad(); loss = torch.nn.functional.cross_entropy(net(x), y); loss.backward(); opt.step()
torch.jit.script(net).save(sys.argv[2])
"#;

/// Trains a small MLP on the digits with Python torch and saves it as TorchScript at `out`.
pub fn digits_torchscript(out: &Path) -> Result<(), String> {
    script_mlp(out, 300)
}

/// The same MLP as TorchScript, untrained (for training by the runner).
pub fn untrained_torchscript(out: &Path) -> Result<(), String> {
    script_mlp(out, 0)
}

fn script_mlp(out: &Path, steps: u32) -> Result<(), String> {
    let python = python()
        .ok_or("LIBTORCH must point into the torch virtualenv (scripts/install-torch.sh)")?;
    let status = Command::new(python)
        .args(["-c", TRAIN_AND_SCRIPT])
        .arg(digits_csv())
        .arg(out)
        .arg(steps.to_string())
        .status()
        .map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("python exited with {status}"))
    }
}

const FORWARD: &str = r#"
import json, sys, torch
m = torch.jit.load(sys.argv[1]); m.eval()
rows = json.load(sys.stdin)
with torch.no_grad():
    print(json.dumps(m(torch.tensor(rows, dtype=torch.float32)).tolist()))
"#;

/// `model`'s outputs for `rows` as Python torch computes them (the reference a served
/// model is compared with).
pub fn python_forward(model: &Path, rows: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, String> {
    use std::io::Write;
    let python = python()
        .ok_or("LIBTORCH must point into the torch virtualenv (scripts/install-torch.sh)")?;
    let mut child = Command::new(python)
        .args(["-c", FORWARD])
        .arg(model)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let input = serde_json::to_vec(rows).map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(&input)
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("python exited with {}", out.status));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The first `n` rows of the digits' 64 features, scaled as the models above were trained.
pub fn digits_rows(n: usize) -> Vec<Vec<f32>> {
    use std::io::BufRead;
    let f = std::fs::File::open(digits_csv()).expect("digits CSV");
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .take(n)
        .map(|l| {
            l.expect("a line")
                .split(',')
                .take(64)
                .map(|v| v.parse::<f32>().expect("a number") / 16.0)
                .collect()
        })
        .collect()
}
