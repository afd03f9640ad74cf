//! The real helm (built by e2e/scripts/install-tools.sh) on the repository's chart.

use crate::tools::{self, MissingTool};
use std::path::{Path, PathBuf};

/// The chart's directory in this repository.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/edgeloom")
}

/// What a helm run did: whether it succeeded, and its stdout followed by its stderr.
#[derive(Debug)]
pub struct HelmOutput {
    /// Exit status 0.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl HelmOutput {
    /// Everything it printed.
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Why helm could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    /// Not installed.
    #[error(transparent)]
    Missing(#[from] MissingTool),
    /// The process could not be started.
    #[error("running helm: {0}")]
    Io(#[from] std::io::Error),
    /// It ran and failed.
    #[error("helm {0} failed: {1}")]
    Failed(String, String),
}

/// Runs `helm [--kubeconfig K] ARGS`.
pub fn run(kubeconfig: Option<&Path>, args: &[&str]) -> Result<HelmOutput, HelmError> {
    let mut cmd = std::process::Command::new(tools::tool("helm")?);
    if let Some(k) = kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    let out = cmd.args(args).output()?;
    Ok(HelmOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `helm template edgeloom CHART -n edgeloom-system --set ...`: the rendered YAML.
pub fn template(sets: &[&str]) -> Result<String, HelmError> {
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let mut args = vec![
        "template",
        "edgeloom",
        &chart,
        "--namespace",
        "edgeloom-system",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = run(None, &args)?;
    if !out.ok {
        return Err(HelmError::Failed("template".into(), out.stderr));
    }
    Ok(out.stdout)
}

/// `helm install edgeloom CHART -n edgeloom-system --create-namespace --wait=false --set ...`
/// into the cluster of `kubeconfig`; the output (with NOTES).
pub fn install(kubeconfig: &Path, sets: &[&str]) -> Result<String, HelmError> {
    let chart = chart_dir();
    let chart = chart.to_string_lossy();
    let mut args = vec![
        "install",
        "edgeloom",
        &chart,
        "-n",
        "edgeloom-system",
        "--create-namespace",
        "--wait=false",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = run(Some(kubeconfig), &args)?;
    if !out.ok {
        return Err(HelmError::Failed("install".into(), out.text()));
    }
    Ok(out.text())
}
