//! Getting a task's TorchScript model onto the node (docs/ARCHITECTURE.md, "Who may write
//! what"). A URL is downloaded under the pool's policy, which the operator copies into the
//! task: HTTPS only (plain HTTP where the pool allows it), to public addresses only
//! (private, loopback and link-local ones only where the pool lists their network; the
//! addresses are checked as resolved, and the connection goes to exactly those), redirects
//! only to the same host, and the job's sha256 always required. The bytes are streamed to
//! disk while hashed, capped in size, and kept by their digest, so a model is downloaded
//! once per node even when several tasks ask for it at once. Errors name the URL and what
//! went wrong (an HTTP status, a refusal), never what a server answered: a job's owner
//! learns nothing about a contributor's network from them. A ConfigMap key is read from
//! this cluster's `edgeloom-system` namespace, where the operator mirrors the job's
//! ConfigMap. A model that cannot be had fails the task.

use edgeloom_crds::edge_pool::ModelDownloads;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::workload::ModelSource;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};

/// Largest model the agent downloads or reads.
pub const MAX_MODEL_BYTES: u64 = 1 << 30;

/// Redirects followed (each to the same host).
const MAX_REDIRECTS: usize = 3;

/// Why a model is unavailable (the task fails with this message).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The download failed.
    #[error("downloading {0}: {1}")]
    Download(String, String),
    /// The pool's policy does not allow this download.
    #[error("downloading {0} refused: {1}")]
    Refused(String, String),
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
        let tmp = temp_path(dir, digest);
        std::fs::write(&tmp, bytes).map_err(|e| ModelError::Io(tmp.display().to_string(), e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ModelError::Io(path.display().to_string(), e))?;
    }
    Ok(path)
}

/// A temporary file of its own for one write (concurrent writers never share one).
fn temp_path(dir: &Path, digest: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".{digest}.{}.{n}.tmp", std::process::id()))
}

/// A network in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;
    fn from_str(s: &str) -> Result<Network, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: not a CIDR"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s}: not a CIDR"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{s}: not a CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("{s}: prefix longer than {max}"));
        }
        Ok(Network { addr, prefix })
    }
}

impl Network {
    /// Whether `ip` is in this network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => (u32::from(n) as u128, u32::from(i) as u128, 32),
            (IpAddr::V6(n), IpAddr::V6(i)) => (u128::from(n), u128::from(i), 128),
            _ => return false,
        };
        let shift = bits - self.prefix as u32;
        if shift >= 128 {
            return true;
        }
        (a >> shift) == (b >> shift)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Addresses that are not on the public internet: a contributor's own machine, its LAN,
/// its provider's or cloud's internal ranges.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // carrier-grade NAT
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
        }
    }
}

/// The pool's download policy, parsed.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    allow_http: bool,
    networks: Vec<Network>,
}

impl Policy {
    /// From the task's copy of the pool's policy (entries that do not parse are ignored:
    /// the API server checked them).
    pub fn new(p: &ModelDownloads) -> Policy {
        Policy {
            allow_http: p.allow_http,
            networks: p
                .allowed_networks
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
        }
    }

    /// Whether the agent may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        !is_internal(ip) || self.networks.iter().any(|n| n.contains(ip))
    }

    /// Whether `url`'s scheme is allowed.
    fn scheme_ok(&self, url: &ureq::http::Uri) -> bool {
        match url.scheme_str() {
            Some("https") => true,
            Some("http") => self.allow_http,
            _ => false,
        }
    }
}

/// Resolves names as usual, then keeps only the addresses the policy allows: the
/// connection goes to exactly the addresses that were checked (no second lookup that a
/// DNS server could answer differently).
#[derive(Debug)]
struct CheckedResolver(Policy);

impl ureq::unversioned::resolver::Resolver for CheckedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        use ureq::unversioned::resolver::DefaultResolver;
        let all = DefaultResolver::default().resolve(uri, config, timeout)?;
        let mut allowed = self.empty();
        for a in all.iter().filter(|a| self.0.allows(a.ip())) {
            allowed.push(*a);
        }
        if allowed.is_empty() {
            return Err(ureq::Error::BadUri(
                "the host resolves to a private, loopback or link-local address the pool does not allow (modelDownloads.allowedNetworks)".into(),
            ));
        }
        Ok(allowed)
    }
}

/// What a failed request says: the kind of failure, never what a server sent.
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::StatusCode(code) => format!("HTTP {code}"),
        ureq::Error::BadUri(why) if why.starts_with("the host resolves") => why.clone(),
        ureq::Error::BadUri(_) => "not a usable URL".into(),
        ureq::Error::HostNotFound => "host not found".into(),
        ureq::Error::Timeout(_) => "timed out".into(),
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed => "connection failed".into(),
        ureq::Error::Tls(_) => "TLS handshake failed".into(),
        _ => "request failed".into(),
    }
}

/// Downloads `url` into `dir` as `<sha256>.pt`, streaming and hashing; the digest must be
/// `expected`.
fn download(url: &str, expected: &str, policy: &Policy, dir: &Path) -> Result<PathBuf, ModelError> {
    let refused = |why: &str| ModelError::Refused(url.to_string(), why.to_string());
    let failed = |why: String| ModelError::Download(url.to_string(), why);
    let start: ureq::http::Uri = url.parse().map_err(|_| refused("not a URL"))?;
    let agent = ureq::Agent::with_parts(
        ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(120)))
            .max_redirects(0)
            .http_status_as_error(false)
            .build(),
        ureq::unversioned::transport::DefaultConnector::default(),
        CheckedResolver(policy.clone()),
    );
    let mut current = start.clone();
    let mut response = None;
    for _ in 0..=MAX_REDIRECTS {
        if !policy.scheme_ok(&current) {
            return Err(refused(if current.scheme_str() == Some("http") {
                "plain http is not allowed by the pool (modelDownloads.allowHttp)"
            } else {
                "only https (and http where the pool allows it)"
            }));
        }
        let r = agent
            .get(current.to_string())
            .call()
            .map_err(|e| failed(describe(&e)))?;
        let status = r.status().as_u16();
        if (300..400).contains(&status) {
            let next = r
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| failed(format!("HTTP {status} without a location")))?;
            let next: ureq::http::Uri = resolve_location(&current, next)
                .ok_or_else(|| failed(format!("HTTP {status} to a location that is not a URL")))?;
            if next.authority() != start.authority() || next.scheme() != start.scheme() {
                return Err(refused("redirected to another host"));
            }
            current = next;
            continue;
        }
        if !(200..300).contains(&status) {
            return Err(failed(format!("HTTP {status}")));
        }
        response = Some(r);
        break;
    }
    let response =
        response.ok_or_else(|| failed(format!("more than {MAX_REDIRECTS} redirects")))?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::Io(dir.display().to_string(), e))?;
    let tmp = temp_path(dir, expected);
    let io = |e: std::io::Error| ModelError::Io(tmp.display().to_string(), e);
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    let mut reader = response.into_body().into_reader().take(MAX_MODEL_BYTES + 1);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total: u64 = 0;
    let copied = loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(_) => break Err(failed("the connection broke off".into())),
        };
        total += n as u64;
        if total > MAX_MODEL_BYTES {
            break Err(failed(format!("larger than {MAX_MODEL_BYTES} bytes")));
        }
        hasher.update(&buf[..n]);
        if let Err(e) = file.write_all(&buf[..n]) {
            break Err(io(e));
        }
    };
    drop(file);
    let digest = hex::encode(hasher.finalize());
    let checked = copied.and_then(|()| {
        if digest.eq_ignore_ascii_case(expected) {
            Ok(())
        } else {
            Err(ModelError::Digest {
                expected: expected.to_string(),
                actual: digest.clone(),
            })
        }
    });
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let path = dir.join(format!("{}.pt", expected.to_ascii_lowercase()));
    std::fs::rename(&tmp, &path).map_err(|e| ModelError::Io(path.display().to_string(), e))?;
    Ok(path)
}

/// A redirect's target, relative to `base` when it is a path.
fn resolve_location(base: &ureq::http::Uri, location: &str) -> Option<ureq::http::Uri> {
    if let Ok(u) = location.parse::<ureq::http::Uri>()
        && u.scheme().is_some()
    {
        return Some(u);
    }
    if !location.starts_with('/') {
        return None;
    }
    format!(
        "{}://{}{location}",
        base.scheme_str()?,
        base.authority()?.as_str()
    )
    .parse()
    .ok()
}

/// One download at a time per model digest on this node.
static DOWNLOADS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Mutex::default);

/// Downloads made so far by this process (for tests of the one-download rule).
pub static DOWNLOADED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The model of `url` in `cache` (downloaded unless another task already did).
async fn by_url(
    url: &str,
    sha256: Option<&str>,
    policy: Policy,
    cache: &Path,
) -> Result<PathBuf, ModelError> {
    let expected = sha256.map(str::to_ascii_lowercase).ok_or_else(|| {
        ModelError::Refused(
            url.to_string(),
            "the job names no sha256 for it".to_string(),
        )
    })?;
    let lock = DOWNLOADS
        .lock()
        .map(|mut d| d.entry(expected.clone()).or_default().clone())
        .unwrap_or_default();
    let _one = lock.lock().await;
    let path = cache.join(format!("{expected}.pt"));
    if path.is_file() {
        return Ok(path);
    }
    let (url, dir) = (url.to_string(), cache.to_path_buf());
    let got = tokio::task::spawn_blocking(move || download(&url, &expected, &policy, &dir))
        .await
        .map_err(|e| ModelError::Download(String::new(), e.to_string()))?;
    if got.is_ok() {
        DOWNLOADED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    got
}

/// The local path of the task's model file, or `None` for a built-in model. URL models
/// are downloaded under `downloads`, the pool's policy the operator put into the task.
pub async fn fetch(
    client: &kube::Client,
    source: &ModelSource,
    downloads: &ModelDownloads,
    cache: &Path,
) -> Result<Option<PathBuf>, ModelError> {
    let expected = source.sha256.clone();
    if let Some(url) = &source.url {
        return by_url(url, expected.as_deref(), Policy::new(downloads), cache)
            .await
            .map(Some);
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
    fn internal_addresses_are_refused_unless_their_network_is_allowed() {
        let strict = Policy::default();
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!strict.allows(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1", "172.32.0.1"] {
            assert!(strict.allows(ip.parse().expect("ip")), "{ip}");
        }
        let lan = Policy::new(&ModelDownloads {
            allow_http: false,
            allowed_networks: vec!["10.0.0.0/8".into(), "fd00::/8".into(), "junk".into()],
        });
        assert!(lan.allows("10.200.0.7".parse().expect("ip")));
        assert!(lan.allows("::ffff:10.0.0.1".parse().expect("ip")));
        assert!(lan.allows("fd12::5".parse().expect("ip")));
        assert!(!lan.allows("192.168.1.1".parse().expect("ip")));
        assert!(!lan.allows("127.0.0.1".parse().expect("ip")));
        assert_eq!(
            "10.0.0.0/33".parse::<Network>(),
            Err("10.0.0.0/33: prefix longer than 32".to_string())
        );
        assert!(
            "0.0.0.0/0"
                .parse::<Network>()
                .expect("all")
                .contains("1.2.3.4".parse().expect("ip"))
        );
    }

    /// A model server on 127.0.0.1 that counts the requests it answered.
    fn serve(body: Vec<u8>) -> (u16, Arc<std::sync::atomic::AtomicU64>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = hits.clone();
        std::thread::spawn(move || {
            for mut sock in listener.incoming().flatten() {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf);
                // Slow enough that concurrent tasks overlap.
                std::thread::sleep(std::time::Duration::from_millis(300));
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes());
                let _ = sock.write_all(&body);
            }
        });
        (port, hits)
    }

    #[tokio::test]
    async fn a_model_is_downloaded_once_per_node_even_when_tasks_ask_at_once() {
        let body = vec![7u8; 300_000];
        let sha = hex::encode(Sha256::digest(&body));
        let (port, hits) = serve(body.clone());
        let dir = std::env::temp_dir().join(format!("edgeloom-models-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let policy = Policy::new(&ModelDownloads {
            allow_http: true,
            allowed_networks: vec!["127.0.0.0/8".into()],
        });
        let url = format!("http://127.0.0.1:{port}/m.pt");
        let asks = (0..4).map(|_| by_url(&url, Some(&sha), policy.clone(), &dir));
        let paths = futures::future::join_all(asks).await;
        for p in &paths {
            let p = p.as_ref().expect("model");
            assert_eq!(std::fs::read(p).expect("bytes"), body);
        }
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one download"
        );
        // Only the model is left in the cache (no temporary file of a download).
        let files: Vec<_> = std::fs::read_dir(&dir).expect("dir").flatten().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        // Without the network in the pool's list, loopback is refused before connecting.
        let other = vec![1u8; 10];
        let other_sha = hex::encode(Sha256::digest(&other));
        let err = by_url(
            &url,
            Some(&other_sha),
            Policy::new(&ModelDownloads {
                allow_http: true,
                allowed_networks: vec![],
            }),
            &dir,
        )
        .await
        .expect_err("refused");
        assert!(
            err.to_string().contains("private, loopback or link-local"),
            "{err}"
        );
        assert_eq!(
            hits.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "no connection made"
        );
        // A digest that does not match leaves nothing behind.
        let err = by_url(&url, Some(&other_sha), policy, &dir)
            .await
            .expect_err("mismatch");
        assert!(err.to_string().contains("model digest mismatch"), "{err}");
        let files: Vec<_> = std::fs::read_dir(&dir).expect("dir").flatten().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn redirect_locations_resolve_against_their_base() {
        let base: ureq::http::Uri = "https://models.example.org/a/m.pt".parse().expect("uri");
        assert_eq!(
            resolve_location(&base, "/b/m.pt").map(|u| u.to_string()),
            Some("https://models.example.org/b/m.pt".into())
        );
        assert_eq!(
            resolve_location(&base, "http://10.0.0.1/x").map(|u| u.to_string()),
            Some("http://10.0.0.1/x".into())
        );
        assert_eq!(resolve_location(&base, "m.pt"), None);
    }

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
