//! The reward ledgers as a user sees them: through `kubectl edgeloom ledger` (the real
//! plugin binary) against the hub.

use std::path::Path;
use std::process::Command;

/// What a plugin run printed.
#[derive(Debug)]
pub struct PluginOutput {
    /// Exit code.
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs `kubectl-edgeloom --kubeconfig <hub> <args>`.
pub fn plugin(bin: &Path, kubeconfig: &Path, args: &[&str]) -> PluginOutput {
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} does not run: {e}", bin.display()));
    PluginOutput {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Every ledger entry (`ledger export`), as JSON.
pub fn export(bin: &Path, kubeconfig: &Path) -> Vec<serde_json::Value> {
    let out = plugin(bin, kubeconfig, &["ledger", "export"]);
    assert_eq!(out.code, Some(0), "ledger export failed: {out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Every receipt and forfeit in the ledgers, as JSON (`ledger export`, without the chain
/// fields), optionally only those of job `uid`.
pub fn receipts_json(bin: &Path, kubeconfig: &Path, uid: Option<&str>) -> Vec<serde_json::Value> {
    export(bin, kubeconfig)
        .into_iter()
        .map(|e| e["receipt"].clone())
        .filter(|r| uid.is_none_or(|u| r["jobUid"] == u))
        .collect()
}

/// The receipts of one job: (shard, replica, attempt, node, account, amount).
pub fn receipts_of(
    entries: &[serde_json::Value],
    job_uid: &str,
) -> Vec<(u64, u64, u64, String, String, String)> {
    let mut out: Vec<_> = entries
        .iter()
        .map(|e| &e["receipt"])
        .filter(|r| r["jobUid"] == job_uid)
        .map(|r| {
            (
                r["shard"].as_u64().unwrap_or(u64::MAX),
                r["replica"].as_u64().unwrap_or(u64::MAX),
                r["attempt"].as_u64().unwrap_or(u64::MAX),
                r["node"].as_str().unwrap_or_default().to_string(),
                r["account"].as_str().unwrap_or_default().to_string(),
                r["amount"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}
