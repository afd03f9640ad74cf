//! A real S3 server for the tests and the demo (docs/ARCHITECTURE.md, "Where the ledger
//! lives"): SeaweedFS's `weed mini` (built by e2e/scripts/install-tools.sh) on 127.0.0.1,
//! with an access key and secret of its own (no anonymous access) and one bucket,
//! `edgeloom`. Its S3 endpoint is port 8333 (SeaweedFS's fixed ports: one server per
//! machine at a time; the tests of one process share it, each federation under its own
//! prefix).

use crate::process::Process;
use crate::tools;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The bucket the ledgers live in.
pub const BUCKET: &str = "edgeloom";
/// SeaweedFS's S3 port.
pub const S3_PORT: u16 = 8333;

/// A running SeaweedFS.
#[derive(Debug)]
pub struct S3Server {
    /// `http://127.0.0.1:8333`.
    pub endpoint: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Data directory.
    pub dir: PathBuf,
    process: Process,
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    hex::encode(b)
}

impl S3Server {
    /// Starts `weed mini` with its data in `dir`; waits until S3 answers (seconds).
    pub fn start(dir: &Path) -> Result<S3Server, String> {
        let weed = tools::tool("weed").map_err(|e| e.to_string())?;
        // The server of a test process that just exited may take a moment to go.
        let free_by = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", S3_PORT)).is_ok()
            && Instant::now() < free_by
        {
            std::thread::sleep(Duration::from_millis(200));
        }
        if std::net::TcpStream::connect(("127.0.0.1", S3_PORT)).is_ok() {
            return Err(format!(
                "port {S3_PORT} on 127.0.0.1 is in use (another SeaweedFS, e.g. a running demo?): stop it first"
            ));
        }
        std::fs::create_dir_all(dir.join("data")).map_err(|e| e.to_string())?;
        let access_key_id = format!("edgeloom{}", random_hex(6));
        let secret_access_key = random_hex(20);
        let config = serde_json::json!({"identities": [{
            "name": "edgeloom",
            "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        let config_file = dir.join("s3.json");
        std::fs::write(&config_file, config.to_string()).map_err(|e| e.to_string())?;
        let log = dir.join("weed.log");
        let args = vec![
            "mini".into(),
            format!("-dir={}", dir.join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            format!("-s3.config={}", config_file.display()),
            format!("-bucket={BUCKET}"),
            "-master.telemetry=false".into(),
            "-admin.ui=false".into(),
        ];
        let mut process =
            Process::spawn("seaweedfs", &weed, &args, &log).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = std::fs::read_to_string(&log)
                .is_ok_and(|l| l.contains("All enabled components are running"));
            if ready && std::net::TcpStream::connect(("127.0.0.1", S3_PORT)).is_ok() {
                break;
            }
            if let Some(status) = process.exited() {
                return Err(format!(
                    "SeaweedFS exited ({status}):\n{}",
                    process.log_tail(20)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "SeaweedFS did not start in 60 s:\n{}",
                    process.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(S3Server {
            endpoint: format!("http://127.0.0.1:{S3_PORT}"),
            access_key_id,
            secret_access_key,
            dir: dir.to_path_buf(),
            process,
        })
    }

    /// The data of the operator's `edgeloom-ledger-store` Secret for ledgers under
    /// `prefix` in the bucket.
    pub fn secret_data(&self, prefix: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("url".into(), format!("s3://{BUCKET}/{prefix}")),
            ("endpoint".into(), self.endpoint.clone()),
            ("region".into(), "us-east-1".into()),
            ("accessKeyId".into(), self.access_key_id.clone()),
            ("secretAccessKey".into(), self.secret_access_key.clone()),
            ("allowHttp".into(), "true".into()),
        ])
    }

    /// The server's process.
    pub fn process(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Freezes the server (SIGSTOP) until the returned guard is dropped (SIGCONT): an
    /// object store that stops answering.
    pub fn freeze(&self) -> Frozen {
        let pid = self.process.pid() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Frozen(pid)
    }
}

/// A frozen [`S3Server`]; thawed (SIGCONT) when dropped.
pub struct Frozen(libc::pid_t);

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as in `freeze`.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The server every federation of this process shares, started on first use. It is
/// started from a thread that lives as long as the process, so the kernel kills it when
/// the process exits (PR_SET_PDEATHSIG follows the thread that spawned it).
pub fn shared() -> Result<&'static S3Server, String> {
    static SERVER: std::sync::OnceLock<Result<&'static S3Server, String>> =
        std::sync::OnceLock::new();
    SERVER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let dir = std::env::temp_dir().join(format!("edgeloom-s3-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                let started = S3Server::start(&dir).map(|s| &*Box::leak(Box::new(s)));
                let _ = tx.send(started);
                loop {
                    std::thread::park();
                }
            });
            rx.recv()
                .unwrap_or_else(|_| Err("the SeaweedFS thread died".into()))
        })
        .clone()
}
