//! Getting a task's TorchScript model onto the node: a URL is downloaded over HTTP(S) into
//! the agent's model cache (checked against `sha256` when the job gives one, capped in
//! size); a ConfigMap key is read from this cluster's `edgeloom-system` namespace, where
//! the operator mirrors the job's ConfigMap. A model that cannot be had fails the task.

use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::workload::ModelSource;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest model the agent downloads or reads.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

/// Why a model is unavailable (the task fails with this message).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The download failed.
    #[error("downloading {0}: {1}")]
    Download(String, String),
    /// The bytes are not the ones the job named.
    #[error("model digest mismatch: the job expects sha256 {expected}, the model has {actual}")]
    Digest {
        /// From the job.
        expected: String,
        /// Of the bytes.
        actual: String,
    },
    /// The ConfigMap or key is missing.
    #[error("{0}")]
    ConfigMap(String),
    /// Local I/O.
    #[error("model cache {0}: {1}")]
    Io(String, std::io::Error),
}

fn check(bytes: &[u8], expected: Option<&str>) -> Result<String, ModelError> {
    let actual = hex::encode(Sha256::digest(bytes));
    match expected {
        Some(e) if !e.eq_ignore_ascii_case(&actual) => Err(ModelError::Digest {
            expected: e.to_string(),
            actual,
        }),
        _ => Ok(actual),
    }
}

fn store(dir: &Path, bytes: &[u8], digest: &str) -> Result<PathBuf, ModelError> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io(dir.display().to_string(), e))?;
    let path = dir.join(format!("{digest}.pt"));
    if !path.exists() {
        let tmp = dir.join(format!("{digest}.tmp"));
        std::fs::write(&tmp, bytes).map_err(|e| ModelError::Io(tmp.display().to_string(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ModelError::Io(path.display().to_string(), e))?;
    }
    Ok(path)
}

fn download(url: &str) -> Result<Vec<u8>, ModelError> {
    let err = |e: String| ModelError::Download(url.to_string(), e);
    let response = ureq::get(url)
        .config()
        .timeout_global(Some(std::time::Duration::from_secs(120)))
        .build()
        .call()
        .map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    response
        .into_body()
        .into_reader()
        .take(MAX_MODEL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_MODEL_BYTES {
        return Err(err(format!("larger than {MAX_MODEL_BYTES} bytes")));
    }
    Ok(bytes)
}

/// The local path of the task's model file, or `None` for a built-in model.
pub async fn fetch(
    client: &kube::Client,
    source: &ModelSource,
    cache: &Path,
) -> Result<Option<PathBuf>, ModelError> {
    let expected = source.sha256.clone();
    if let Some(url) = &source.url {
        let url = url.clone();
        let bytes = tokio::task::spawn_blocking(move || download(&url))
            .await
            .map_err(|e| ModelError::Download(String::new(), e.to_string()))??;
        let digest = check(&bytes, expected.as_deref())?;
        return store(cache, &bytes, &digest).map(Some);
    }
    if let Some(cm) = &source.config_map {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        let map = api
            .get_opt(&cm.name)
            .await
            .map_err(|e| {
                ModelError::ConfigMap(format!(
                    "reading ConfigMap {SYSTEM_NAMESPACE}/{}: {e}",
                    cm.name
                ))
            })?
            .ok_or_else(|| {
                ModelError::ConfigMap(format!(
                    "ConfigMap {SYSTEM_NAMESPACE}/{} not found",
                    cm.name
                ))
            })?;
        let bytes = map
            .binary_data
            .as_ref()
            .and_then(|d| d.get(&cm.key))
            .map(|b| b.0.clone())
            .or_else(|| {
                map.data
                    .as_ref()
                    .and_then(|d| d.get(&cm.key))
                    .map(|s| s.clone().into_bytes())
            })
            .ok_or_else(|| {
                ModelError::ConfigMap(format!(
                    "ConfigMap {SYSTEM_NAMESPACE}/{} has no key {}",
                    cm.name, cm.key
                ))
            })?;
        let digest = check(&bytes, expected.as_deref())?;
        return store(cache, &bytes, &digest).map(Some);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_case_insensitively_and_mismatches_name_both() {
        let bytes = b"model";
        let good = hex::encode(Sha256::digest(bytes));
        assert_eq!(
            check(bytes, Some(&good.to_uppercase())).expect("matches"),
            good
        );
        let err = check(bytes, Some(&"0".repeat(64))).expect_err("mismatch");
        assert!(err.to_string().contains(&good) && err.to_string().contains(&"0".repeat(64)));
    }
}
