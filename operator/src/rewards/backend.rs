//! Which object store holds the ledgers (docs/ARCHITECTURE.md, "Where the ledger lives"):
//! named by the Secret [`STORE_SECRET`] in the operator's namespace of the hub, read by the
//! operator at start and by `kubectl edgeloom ledger` (platform admins only: it carries the
//! store's credentials). Without that Secret the operator keeps its ledgers in a local
//! directory.
//!
//! Keys of the Secret:
//! - `url` (required): `s3://<bucket>[/<prefix>]` or `file:///<directory>`;
//! - `endpoint`: the S3 endpoint (default: AWS for the bucket's region), e.g.
//!   `http://seaweedfs.storage:8333`;
//! - `region` (default `us-east-1`), `accessKeyId`, `secretAccessKey` (both or neither;
//!   without them the AWS environment and instance credentials are used);
//! - `allowHttp`: `"true"` to allow a plain-HTTP endpoint.

use k8s_openapi::api::core::v1::Secret;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The Secret naming the ledgers' object store.
pub const STORE_SECRET: &str = "edgeloom-ledger-store";

/// Where the ledgers live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreConfig {
    /// `s3://bucket/prefix` or `file:///dir`.
    pub url: String,
    /// S3 endpoint.
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: Option<String>,
    /// S3 access key id.
    pub access_key_id: Option<String>,
    /// S3 secret access key.
    pub secret_access_key: Option<String>,
    /// Allow plain HTTP.
    pub allow_http: bool,
}

/// An opened store and the prefix the ledgers live under.
#[derive(Clone, Debug)]
pub struct Backend {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Root of the ledgers in it.
    pub root: Path,
    /// The URL, for messages (no credentials).
    pub url: String,
    /// Presigns URLs for agents (an S3 store; a local directory cannot).
    pub signer: Option<Arc<dyn object_store::signer::Signer>>,
}

impl StoreConfig {
    /// From the Secret's data; an error names the key that is wrong.
    pub fn from_data(data: &BTreeMap<String, String>) -> Result<StoreConfig, String> {
        let get = |k: &str| {
            data.get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let url =
            get("url").ok_or("Secret key url is missing (s3://bucket/prefix or file:///dir)")?;
        let config = StoreConfig {
            url,
            endpoint: get("endpoint"),
            region: get("region"),
            access_key_id: get("accessKeyId"),
            secret_access_key: get("secretAccessKey"),
            allow_http: match get("allowHttp").as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    return Err(format!(
                        "Secret key allowHttp is {other:?}; it must be \"true\" or \"false\""
                    ));
                }
            },
        };
        if config.access_key_id.is_some() != config.secret_access_key.is_some() {
            return Err("Secret keys accessKeyId and secretAccessKey go together".into());
        }
        Ok(config)
    }

    /// From a Secret.
    pub fn from_secret(secret: &Secret) -> Result<StoreConfig, String> {
        let mut data: BTreeMap<String, String> = secret
            .string_data
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        for (k, v) in secret.data.clone().unwrap_or_default() {
            let v = String::from_utf8(v.0).map_err(|_| format!("Secret key {k} is not UTF-8"))?;
            data.insert(k, v);
        }
        StoreConfig::from_data(&data)
    }

    /// A local directory.
    pub fn local(dir: &std::path::Path) -> StoreConfig {
        StoreConfig {
            url: format!("file://{}", dir.display()),
            ..StoreConfig::default()
        }
    }

    /// Opens the store (a local directory is created).
    pub fn open(&self) -> Result<Backend, String> {
        if let Some(rest) = self.url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!("url {:?} names no bucket", self.url));
            }
            // HTTPS with rustls over ring (the provider kube's TLS uses too); a provider
            // installed already is kept.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let mut b = AmazonS3Builder::new()
                // A store that does not answer is an error within seconds (the client's
                // default retries for three minutes), so that a job reconcile waiting on
                // its ledger says so and carries on (docs/ARCHITECTURE.md, "Failure
                // model"). Client options first: they also carry allowHttp, set below.
                .with_client_options(
                    object_store::ClientOptions::new()
                        .with_timeout(std::time::Duration::from_secs(10))
                        .with_connect_timeout(std::time::Duration::from_secs(3)),
                )
                .with_retry(object_store::RetryConfig {
                    backoff: object_store::BackoffConfig::default(),
                    max_retries: 3,
                    retry_timeout: std::time::Duration::from_secs(15),
                })
                .with_bucket_name(bucket)
                .with_region(self.region.as_deref().unwrap_or("us-east-1"))
                .with_allow_http(self.allow_http)
                // Create-only puts as If-None-Match: * (S3, SeaweedFS, R2 support it).
                .with_conditional_put(S3ConditionalPut::ETagMatch);
            if let Some(e) = &self.endpoint {
                b = b.with_endpoint(e);
            }
            if let (Some(id), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
            }
            let store = Arc::new(b.build().map_err(|e| format!("url {:?}: {e}", self.url))?);
            return Ok(Backend {
                store: store.clone(),
                root: Path::from(prefix.trim_matches('/')),
                url: self.url.clone(),
                signer: Some(store),
            });
        }
        if let Some(dir) = self.url.strip_prefix("file://") {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("url {:?}: creating {dir}: {e}", self.url))?;
            let store = LocalFileSystem::new_with_prefix(dir)
                .map_err(|e| format!("url {:?}: {e}", self.url))?;
            return Ok(Backend {
                store: Arc::new(store),
                root: Path::default(),
                url: self.url.clone(),
                signer: None,
            });
        }
        Err(format!(
            "url {:?} is neither s3://bucket/prefix nor file:///dir",
            self.url
        ))
    }
}

/// Reads the store's Secret from the hub: `Ok(None)` when there is none.
pub async fn from_hub(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
) -> Result<Option<StoreConfig>, String> {
    let api: kube::Api<Secret> = kube::Api::namespaced(client.clone(), namespace);
    match api.get_opt(secret).await {
        Ok(None) => Ok(None),
        Ok(Some(s)) => StoreConfig::from_secret(&s)
            .map(Some)
            .map_err(|e| format!("Secret {namespace}/{secret}: {e}")),
        Err(e) => Err(format!("reading Secret {namespace}/{secret}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_store_secret_names_the_key() {
        let data = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        let e = StoreConfig::from_data(&data(&[])).expect_err("no url");
        assert!(e.contains("url"), "{e}");
        let e = StoreConfig::from_data(&data(&[("url", "s3://b"), ("allowHttp", "yes")]))
            .expect_err("allowHttp");
        assert!(e.contains("allowHttp"), "{e}");
        let e = StoreConfig::from_data(&data(&[("url", "s3://b"), ("accessKeyId", "a")]))
            .expect_err("half the credentials");
        assert!(e.contains("secretAccessKey"), "{e}");
        let e = StoreConfig::from_data(&data(&[("url", "ftp://x")]))
            .expect("parses")
            .open()
            .expect_err("scheme");
        assert!(e.contains("neither"), "{e}");
        let ok = StoreConfig::from_data(&data(&[
            ("url", "s3://bucket/some/prefix/"),
            ("endpoint", "http://127.0.0.1:8333"),
            ("allowHttp", "true"),
            ("accessKeyId", "a"),
            ("secretAccessKey", "b"),
        ]))
        .expect("parses")
        .open()
        .expect("opens");
        assert_eq!(ok.root.as_ref(), "some/prefix");
    }
}
