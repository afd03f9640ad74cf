//! What every controller shares.

use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::rewards::backend::Backend;
use crate::rewards::objects::LedgerStore;
use crate::rewards::store::ReputationStore;
use crate::scheduler::Scheduler;
use edgeloom_crds::EdgePool;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "edgeloom-operator";
/// Finalizer on ComputeJobs: their tasks are removed from every member first.
pub const JOB_FINALIZER: &str = "edgeloom.io/tasks";
/// Finalizer on EdgePools: their member connections are closed first.
pub const POOL_FINALIZER: &str = "edgeloom.io/members";

/// Shared state of the controllers.
pub struct Context {
    /// Client of the hub cluster.
    pub client: kube::Client,
    /// Namespace of the operator (kubeconfig Secrets, leader Lease).
    pub namespace: String,
    /// Member cluster connections.
    pub fleet: Arc<Fleet>,
    /// The scheduling cycle's shared state.
    pub scheduler: Arc<Scheduler>,
    /// Metrics.
    pub metrics: Metrics,
    /// Kubernetes Events.
    pub recorder: Recorder,
    /// The hub's EdgePools.
    pub pools: Store<EdgePool>,
    /// This replica's identity.
    pub identity: String,
    /// The pools' ledgers and reputation records.
    pub books: Books,
    /// Slots a job's status holds itself; a bigger job's are paged
    /// (docs/ARCHITECTURE.md, "Bounded status").
    pub inline_slots: usize,
    /// Shard status pages read or written by this process.
    pub pages: crate::shard_pages::PageCache,
}

/// The ledger and reputation store of every pool, made on first use.
pub struct Books {
    client: kube::Client,
    backend: Backend,
    namespace: String,
    ledgers: Mutex<HashMap<String, Arc<LedgerStore>>>,
    reputations: Mutex<HashMap<String, Arc<ReputationStore>>>,
    signing_key: tokio::sync::Mutex<Option<ed25519_dalek::SigningKey>>,
    reveal_secret: std::sync::Mutex<Option<crypto_box::SecretKey>>,
}

/// The Secret (in the operator's namespace) holding the ledger's ed25519 signing key.
pub const SIGNING_KEY_SECRET: &str = "edgeloom-ledger-signing-key";
/// Its key: the 32-byte seed, hex.
pub const SIGNING_KEY_FIELD: &str = "ed25519-seed";

impl Books {
    /// Ledgers in `backend`, the rest in `namespace` of the hub.
    pub fn new(client: kube::Client, namespace: &str, backend: Backend) -> Books {
        Books {
            client,
            backend,
            namespace: namespace.to_string(),
            ledgers: Mutex::default(),
            reputations: Mutex::default(),
            signing_key: tokio::sync::Mutex::default(),
            reveal_secret: std::sync::Mutex::default(),
        }
    }

    /// The X25519 key that opens sealed reveals (derived from the signing key's seed, so
    /// it lives in the same Secret), once the signing key is loaded.
    pub fn reveal_secret(&self) -> Option<crypto_box::SecretKey> {
        self.reveal_secret.lock().ok().and_then(|k| k.clone())
    }

    /// The key that signs ledger checkpoints: read from its Secret, made (once, by
    /// whichever replica gets there first) when there is none and `may_create` (no
    /// checkpoint was signed before: a new key would make every old one fail).
    pub async fn signing_key(&self, may_create: bool) -> Result<ed25519_dalek::SigningKey, String> {
        let mut guard = self.signing_key.lock().await;
        if let Some(k) = guard.as_ref() {
            return Ok(k.clone());
        }
        let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let read = |s: &k8s_openapi::api::core::v1::Secret| {
            let seed = s
                .data
                .as_ref()
                .and_then(|d| d.get(SIGNING_KEY_FIELD))
                .map(|b| String::from_utf8_lossy(&b.0).to_string())
                .ok_or_else(|| format!("Secret {SIGNING_KEY_SECRET} has no {SIGNING_KEY_FIELD}"))?;
            crate::rewards::merkle::key_from_hex(&seed)
        };
        let key = match api.get_opt(SIGNING_KEY_SECRET).await {
            Ok(Some(s)) => read(&s)?,
            Ok(None) if !may_create => {
                return Err(format!(
                    "Secret {}/{SIGNING_KEY_SECRET} (the ledger's signing key) is missing although checkpoints were signed with it: restore it; a new key would not verify them",
                    self.namespace
                ));
            }
            Ok(None) => {
                let key = crate::rewards::merkle::new_key()?;
                let secret: k8s_openapi::api::core::v1::Secret =
                    serde_json::from_value(serde_json::json!({
                        "metadata": {"name": SIGNING_KEY_SECRET,
                                     "labels": {"app.kubernetes.io/part-of": "edgeloom"}},
                        "stringData": {SIGNING_KEY_FIELD: hex::encode(key.to_bytes())}
                    }))
                    .map_err(|e| e.to_string())?;
                match api.create(&Default::default(), &secret).await {
                    Ok(_) => key,
                    Err(kube::Error::Api(s)) if s.code == 409 => read(
                        &api.get(SIGNING_KEY_SECRET)
                            .await
                            .map_err(|e| e.to_string())?,
                    )?,
                    Err(e) => return Err(format!("creating Secret {SIGNING_KEY_SECRET}: {e}")),
                }
            }
            Err(e) => return Err(format!("reading Secret {SIGNING_KEY_SECRET}: {e}")),
        };
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, b"edgeloom reveal key v1\n");
        sha2::Digest::update(&mut h, key.to_bytes());
        let seed: [u8; 32] = sha2::Digest::finalize(h).into();
        if let Ok(mut r) = self.reveal_secret.lock() {
            *r = Some(crypto_box::SecretKey::from_bytes(seed));
        }
        *guard = Some(key.clone());
        Ok(key)
    }

    /// The ledger of `pool`.
    pub fn ledger(&self, pool: &str) -> Arc<LedgerStore> {
        let mut m = self.ledgers.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(pool.to_string())
            .or_insert_with(|| {
                Arc::new(
                    LedgerStore::new(self.backend.store.clone(), &self.backend.root, pool)
                        .require_anchor(),
                )
            })
            .clone()
    }

    /// The store, its root and its URL signer: where Federated jobs keep their models
    /// (docs/ARCHITECTURE.md, "Federated learning in a tree").
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The reputation records of `pool`.
    pub fn reputation(&self, pool: &str) -> Arc<ReputationStore> {
        let mut m = self.reputations.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(pool.to_string())
            .or_insert_with(|| {
                Arc::new(ReputationStore::new(
                    self.client.clone(),
                    &self.namespace,
                    pool,
                ))
            })
            .clone()
    }
}

/// Test-only crash injection: when `EDGELOOM_FAILPOINT` names this point the process
/// aborts on the spot, as if killed with SIGKILL (no destructors, no flushing). Used by
/// the e2e tests to stop the operator exactly between a durable write and the next one.
pub fn failpoint(name: &str) {
    if std::env::var("EDGELOOM_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Test-only delay: when `EDGELOOM_FAILPOINT` names this point the step waits 5 s, so an
/// e2e test can act inside a window that is otherwise milliseconds wide.
pub async fn failpoint_delay(name: &str) {
    if std::env::var("EDGELOOM_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: waiting 5 s");
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
}
