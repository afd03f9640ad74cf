//! The local federated control plane (docs/ARCHITECTURE.md, "The local control plane"): one etcd, a hub and N member
//! clusters, each its own kube-apiserver (own etcd prefix, service-account keys and issuer,
//! kubeconfig) and kube-controller-manager, all on 127.0.0.1.
//!
//! Dropping a [`ControlPlane`] stops every process and removes its directory (unless
//! `keep` is set); if the harness process dies, the kernel kills the children
//! (PR_SET_PDEATHSIG), so a panicking test leaves no strays.

use crate::kubeconfig::{self, User};
use crate::pki::{Pki, PkiError};
use crate::process::Process;
use crate::tools::{self, MissingTool};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A tool binary is missing.
    #[error(transparent)]
    MissingTool(#[from] MissingTool),
    /// Certificates could not be made.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// File or process I/O failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// A process exited or never became ready.
    #[error("{what} did not become ready: {reason}\n--- last lines of {log} ---\n{tail}")]
    NotReady {
        /// The process.
        what: String,
        /// Why.
        reason: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// The Kubernetes client failed.
    #[error("kubernetes client for {cluster}: {source}")]
    Client {
        /// The cluster.
        cluster: String,
        /// The error.
        source: kube::Error,
    },
    /// No such cluster.
    #[error("no cluster named {0}")]
    UnknownCluster(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let context = context.into();
    move |source| ControlPlaneError::Io { context, source }
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Config {
    /// Names of the member clusters (DNS labels), e.g. ["edge-a", "edge-b"].
    pub members: Vec<String>,
    /// Simulated Node objects registered in each member cluster.
    pub nodes_per_member: u32,
    /// Working directory; default a fresh directory under the system temp dir.
    pub dir: Option<PathBuf>,
    /// Keep the directory (logs, kubeconfigs) after teardown.
    pub keep: bool,
    /// Also start a kube-controller-manager per cluster (garbage collection, namespaces,
    /// service accounts). On by default; a real cluster has one.
    pub controller_manager: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            members: vec!["edge-a".into(), "edge-b".into()],
            nodes_per_member: 2,
            dir: None,
            keep: std::env::var_os("EDGELOOM_KEEP").is_some(),
            controller_manager: true,
        }
    }
}

/// The role of a cluster in the federation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Where users apply ComputeJobs and EdgePools.
    Hub,
    /// An edge cluster that runs ComputeTasks.
    Member,
}

/// One local cluster: a kube-apiserver and its controller manager.
#[derive(Debug)]
pub struct Cluster {
    /// Cluster name ("hub", "edge-a", ...).
    pub name: String,
    /// Hub or member.
    pub role: Role,
    /// HTTPS port on 127.0.0.1.
    pub port: u16,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Names of the simulated nodes registered in it.
    pub nodes: Vec<String>,
    dir: PathBuf,
    apiserver_args: Vec<String>,
    controller_manager_args: Option<Vec<String>>,
    apiserver: Option<Process>,
    controller_manager: Option<Process>,
}

impl Cluster {
    /// `https://127.0.0.1:PORT`.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The admin kubeconfig's text.
    pub fn kubeconfig_yaml(&self) -> Result<String, ControlPlaneError> {
        std::fs::read_to_string(&self.kubeconfig)
            .map_err(io(format!("reading {}", self.kubeconfig.display())))
    }

    /// A client with admin rights.
    pub async fn client(&self) -> Result<kube::Client, ControlPlaneError> {
        client_for(&self.name, &self.kubeconfig).await
    }

    /// Pids of its running processes.
    pub fn pids(&self) -> Vec<u32> {
        self.apiserver
            .iter()
            .chain(self.controller_manager.iter())
            .map(Process::pid)
            .collect()
    }

    /// Whether its kube-apiserver is running.
    pub fn apiserver_running(&self) -> bool {
        self.apiserver.is_some()
    }
}

/// Builds a client from a kubeconfig file.
pub async fn client_for(name: &str, kubeconfig: &Path) -> Result<kube::Client, ControlPlaneError> {
    let err = |source| ControlPlaneError::Client {
        cluster: name.to_string(),
        source,
    };
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| err(kube::Error::InferKubeconfig(e)))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .map_err(|e| err(kube::Error::InferKubeconfig(e)))?;
    kube::Client::try_from(config).map_err(err)
}

/// A running hub and member clusters sharing one etcd.
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: clusters stop before etcd.
    clusters: Vec<Cluster>,
    etcd: Process,
    etcd_port: u16,
    dir: PathBuf,
    keep: bool,
    pki: Pki,
}

static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free port on 127.0.0.1, never the same one twice in this process.
pub fn free_port() -> Result<u16, ControlPlaneError> {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
        let port = listener
            .local_addr()
            .map_err(io("finding a free port"))?
            .port();
        let mut used = PORTS.lock().unwrap_or_else(|p| p.into_inner());
        if used.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
}

fn fresh_dir() -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    std::env::temp_dir().join(format!("edgeloom-e2e-{}-{n}", std::process::id()))
}

fn say(msg: &str) {
    eprintln!("[control-plane] {msg}");
}

impl ControlPlane {
    /// Starts etcd, then the hub and every member cluster in parallel, and waits until each
    /// kube-apiserver reports /readyz and the simulated nodes are registered.
    pub async fn start(config: Config) -> Result<ControlPlane, ControlPlaneError> {
        let started = Instant::now();
        let etcd_bin = tools::tool("etcd")?;
        let apiserver_bin = tools::tool("kube-apiserver")?;
        let kcm_bin = if config.controller_manager {
            Some(tools::tool("kube-controller-manager")?)
        } else {
            None
        };
        let dir = config.dir.clone().unwrap_or_else(fresh_dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let pki = Pki::create(&dir)?;

        let client_port = free_port()?;
        let peer_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        say(&format!(
            "starting etcd on {etcd_url} (dir {})",
            dir.display()
        ));
        let etcd_args: Vec<String> = vec![
            "--name=edgeloom".into(),
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=edgeloom={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        let etcd = Process::spawn("etcd", &etcd_bin, &etcd_args, &dir.join("etcd.log"))
            .map_err(io("starting etcd"))?;

        let names = std::iter::once(("hub".to_string(), Role::Hub))
            .chain(config.members.iter().map(|m| (m.clone(), Role::Member)));
        let mut clusters = Vec::new();
        for (name, role) in names {
            clusters.push(Self::prepare_cluster(
                &dir,
                &pki,
                &etcd_url,
                &name,
                role,
                kcm_bin.is_some(),
            )?);
        }
        let mut plane = ControlPlane {
            clusters,
            etcd,
            etcd_port: client_port,
            dir,
            keep: config.keep,
            pki,
        };
        plane.wait_etcd().await?;
        for cluster in &mut plane.clusters {
            say(&format!(
                "starting kube-apiserver for {} on {}",
                cluster.name,
                cluster.server()
            ));
            cluster.apiserver = Some(
                Process::spawn(
                    &format!("kube-apiserver[{}]", cluster.name),
                    &apiserver_bin,
                    &cluster.apiserver_args,
                    &cluster.dir.join("kube-apiserver.log"),
                )
                .map_err(io("starting kube-apiserver"))?,
            );
        }
        let waits = plane.clusters.iter_mut().map(wait_ready);
        for result in futures::future::join_all(waits).await {
            result?;
        }
        if let Some(kcm) = &kcm_bin {
            for cluster in &mut plane.clusters {
                cluster.controller_manager = Some(start_controller_manager(cluster, kcm)?);
            }
        }
        for i in 0..plane.clusters.len() {
            if plane.clusters[i].role == Role::Member {
                let name = plane.clusters[i].name.clone();
                let nodes: Vec<String> = (0..config.nodes_per_member)
                    .map(|n| format!("{name}-node-{n}"))
                    .collect();
                plane.register_nodes(&name, &nodes).await?;
            }
        }
        say(&format!(
            "ready: hub + {} member cluster(s) in {:.1}s",
            plane.clusters.len() - 1,
            started.elapsed().as_secs_f64()
        ));
        Ok(plane)
    }

    fn prepare_cluster(
        dir: &Path,
        pki: &Pki,
        etcd_url: &str,
        name: &str,
        role: Role,
        with_kcm: bool,
    ) -> Result<Cluster, ControlPlaneError> {
        let cdir = dir.join(name);
        std::fs::create_dir_all(&cdir).map_err(io(format!("creating {}", cdir.display())))?;
        let (sa_key, sa_pub) = Pki::service_account_keys(&cdir)?;
        let port = free_port()?;
        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = cdir.join("kubeconfig");
        let yaml = kubeconfig::render(
            name,
            &server,
            &pki.ca_pem,
            &User::ClientCertificate {
                cert_pem: pki.admin_cert_pem.clone(),
                key_pem: pki.admin_key_pem.clone(),
            },
        );
        std::fs::write(&kubeconfig, yaml).map_err(io("writing kubeconfig"))?;
        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--etcd-prefix=/edgeloom/{name}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            format!("--service-account-issuer=https://{name}.edgeloom.local"),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=Node,RBAC".into(),
            "--endpoint-reconciler-type=none".into(),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            format!("--cert-dir={}", cdir.join("certs").display()),
        ];
        let controller_manager_args = with_kcm.then(|| {
            vec![
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--service-account-private-key-file={}", sa_key.display()),
                format!("--root-ca-file={}", pki.ca_cert.display()),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=false".into(),
                format!("--cluster-name={name}"),
                "--profiling=false".into(),
            ]
        });
        Ok(Cluster {
            name: name.to_string(),
            role,
            port,
            kubeconfig,
            nodes: Vec::new(),
            dir: cdir,
            apiserver_args,
            controller_manager_args,
            apiserver: None,
            controller_manager: None,
        })
    }

    async fn wait_etcd(&mut self) -> Result<(), ControlPlaneError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = self.etcd_port;
        loop {
            if let Some(status) = self.etcd.exited() {
                return Err(not_ready(&self.etcd, format!("exited with {status}")));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(not_ready(&self.etcd, "no answer in 30s".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The hub cluster.
    pub fn hub(&self) -> &Cluster {
        &self.clusters[0]
    }

    /// The member clusters.
    pub fn members(&self) -> impl Iterator<Item = &Cluster> {
        self.clusters.iter().filter(|c| c.role == Role::Member)
    }

    /// Every cluster, hub first.
    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    /// The cluster called `name`.
    pub fn cluster(&self, name: &str) -> Result<&Cluster, ControlPlaneError> {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| ControlPlaneError::UnknownCluster(name.to_string()))
    }

    fn cluster_mut(&mut self, name: &str) -> Result<&mut Cluster, ControlPlaneError> {
        self.clusters
            .iter_mut()
            .find(|c| c.name == name)
            .ok_or_else(|| ControlPlaneError::UnknownCluster(name.to_string()))
    }

    /// The working directory (logs, kubeconfigs, certificates).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificates of this control plane.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// Pids of every process of the control plane.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.clusters.iter().flat_map(Cluster::pids).collect();
        pids.push(self.etcd.pid());
        pids
    }

    /// Kills a cluster's kube-apiserver with SIGKILL, as a crash or network loss would.
    pub fn kill_apiserver(&mut self, name: &str) -> Result<(), ControlPlaneError> {
        let cluster = self.cluster_mut(name)?;
        if let Some(mut p) = cluster.apiserver.take() {
            say(&format!("killing kube-apiserver of {name}"));
            p.kill();
        }
        Ok(())
    }

    /// Starts a killed kube-apiserver again on the same port and waits for /readyz.
    pub async fn restart_apiserver(&mut self, name: &str) -> Result<(), ControlPlaneError> {
        let bin = tools::tool("kube-apiserver")?;
        let cluster = self.cluster_mut(name)?;
        if cluster.apiserver.is_none() {
            say(&format!("restarting kube-apiserver of {name}"));
            cluster.apiserver = Some(
                Process::spawn(
                    &format!("kube-apiserver[{name}]"),
                    &bin,
                    &cluster.apiserver_args,
                    &cluster.dir.join("kube-apiserver.log"),
                )
                .map_err(io("starting kube-apiserver"))?,
            );
        }
        wait_ready(cluster).await
    }

    /// Registers simulated Node objects (the kubelet's registration part only) with the
    /// labels a real node would have.
    pub async fn register_nodes(
        &mut self,
        cluster: &str,
        nodes: &[String],
    ) -> Result<(), ControlPlaneError> {
        let c = self.cluster_mut(cluster)?;
        let client = c.client().await?;
        let api: Api<Node> = Api::all(client);
        for name in nodes {
            let labels = BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), name.clone()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
                ("kubernetes.io/arch".to_string(), "amd64".to_string()),
                ("edgeloom.io/cluster".to_string(), cluster.to_string()),
            ]);
            let node = Node {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(labels),
                    ..Default::default()
                },
                ..Default::default()
            };
            match api.create(&PostParams::default(), &node).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(source) => {
                    return Err(ControlPlaneError::Client {
                        cluster: cluster.to_string(),
                        source,
                    });
                }
            }
            if !c.nodes.contains(name) {
                c.nodes.push(name.clone());
            }
        }
        Ok(())
    }

    /// Stops everything now (also done on drop).
    pub fn stop(&mut self) {
        for cluster in self.clusters.iter_mut().rev() {
            if let Some(mut p) = cluster.controller_manager.take() {
                p.stop(Duration::from_secs(5));
            }
            if let Some(mut p) = cluster.apiserver.take() {
                p.stop(Duration::from_secs(10));
            }
        }
        self.etcd.stop(Duration::from_secs(5));
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
        if self.keep {
            say(&format!("kept {}", self.dir.display()));
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn not_ready(p: &Process, reason: String) -> ControlPlaneError {
    ControlPlaneError::NotReady {
        what: p.name().to_string(),
        reason,
        log: p.log().display().to_string(),
        tail: p.log_tail(30),
    }
}

fn start_controller_manager(cluster: &Cluster, bin: &Path) -> Result<Process, ControlPlaneError> {
    let args = cluster.controller_manager_args.clone().unwrap_or_default();
    Process::spawn(
        &format!("kube-controller-manager[{}]", cluster.name),
        bin,
        &args,
        &cluster.dir.join("kube-controller-manager.log"),
    )
    .map_err(io("starting kube-controller-manager"))
}

/// Polls /readyz of a cluster's kube-apiserver until it answers `ok` (at most 120 s).
async fn wait_ready(cluster: &mut Cluster) -> Result<(), ControlPlaneError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let client = cluster.client().await?;
    let mut last = String::from("no answer yet");
    loop {
        if let Some(p) = cluster.apiserver.as_mut()
            && let Some(status) = p.exited()
        {
            return Err(not_ready(p, format!("exited with {status}")));
        }
        let req = http::Request::get("/readyz").body(Vec::new());
        if let Ok(req) = req {
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
        }
        if Instant::now() > deadline {
            let p = cluster.apiserver.as_ref();
            return Err(ControlPlaneError::NotReady {
                what: format!("kube-apiserver[{}]", cluster.name),
                reason: format!("/readyz not ok after 120s: {last}"),
                log: p.map(|p| p.log().display().to_string()).unwrap_or_default(),
                tail: p.map(|p| p.log_tail(30)).unwrap_or_default(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
