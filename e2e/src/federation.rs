//! A complete local federation for operator tests: the control plane, the CRDs in every
//! cluster, the member kubeconfigs as Secrets in the hub, an EdgePool over the members,
//! simulated agents on every member node, and operator processes.

use crate::control_plane::{Config, ControlPlane, ControlPlaneError, free_port};
use crate::manifests;
use crate::process::Process;
use crate::sim_agent::{SimAgents, SimNode};
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A running federation.
pub struct Federation {
    /// Simulated agents per member cluster name.
    pub agents: BTreeMap<String, SimAgents>,
    /// Per node: a kubeconfig with the agent's pod-bound service-account token (set up by
    /// [`Federation::start_bare`]; nodes without one use the member's admin kubeconfig).
    pub agent_kubeconfigs: BTreeMap<String, PathBuf>,
    /// The clusters (dropped last).
    pub plane: ControlPlane,
    /// Admin client of the hub.
    pub hub: kube::Client,
}

/// Errors setting up a federation.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The control plane failed.
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    /// Applying something failed.
    #[error(transparent)]
    Manifest(#[from] manifests::ManifestError),
    /// An API call failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// helm failed.
    #[error("helm {0}: {1}")]
    Helm(String, String),
    /// A process failed to start.
    #[error("starting {0}: {1}")]
    Spawn(String, std::io::Error),
    /// The S3 server failed to start.
    #[error("S3 server: {0}")]
    S3(String),
}

/// Creates namespace `name` unless it exists.
pub async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// The hub's Secret `<member>-kubeconfig` holding a kubeconfig for `member`, as an EdgePool
/// names it.
fn kubeconfig_secret(member: &str, kubeconfig: String) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(format!("{member}-kubeconfig")),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "kubeconfig".to_string(),
            ByteString(kubeconfig.into_bytes()),
        )])),
        ..Default::default()
    }
}

/// The operator's object store Secret (`edgeloom-ledger-store`) for ledgers under `prefix`
/// of `server`'s bucket.
pub fn ledger_store_secret(server: &crate::s3::S3Server, prefix: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(LEDGER_STORE_SECRET.into()),
            ..Default::default()
        },
        string_data: Some(server.secret_data(prefix)),
        ..Default::default()
    }
}

/// The Secret naming the operator's object store.
pub const LEDGER_STORE_SECRET: &str = "edgeloom-ledger-store";

/// Readies a control plane for edgeloom: the CRDs and the system namespace in every
/// cluster, each member's kubeconfig as a Secret `<member>-kubeconfig` in the hub's system
/// namespace (what an EdgePool names), and the operator's object store: the process's
/// shared SeaweedFS, under a prefix of this control plane's own. Returns the hub's client.
pub async fn link_members(plane: &ControlPlane) -> Result<kube::Client, FederationError> {
    for c in plane.clusters() {
        let client = c.client().await?;
        manifests::install_crds(&client).await?;
        ensure_namespace(&client, SYSTEM_NAMESPACE).await?;
    }
    let hub = plane.hub().client().await?;
    let secrets: Api<Secret> = Api::namespaced(hub.clone(), SYSTEM_NAMESPACE);
    for m in plane.members() {
        let secret = kubeconfig_secret(&m.name, m.kubeconfig_yaml()?);
        secrets.create(&PostParams::default(), &secret).await?;
    }
    let server = crate::s3::shared().map_err(FederationError::S3)?;
    let prefix = plane
        .dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "e2e".into());
    secrets
        .create(
            &PostParams::default(),
            &ledger_store_secret(server, &prefix),
        )
        .await?;
    Ok(hub)
}

/// Real identities, as on a real cluster (docs/ARCHITECTURE.md, "Who may write what"): the Helm chart's edge-cluster
/// part is installed with real helm into every member (the agent's ServiceAccount, RBAC
/// and node-identity admission policy, and the hub operator's ServiceAccount); the hub's
/// Secret for each member then holds a kubeconfig with the `edgeloom-hub` token instead of
/// the admin's; and each node gets a Pod object bound to it (nothing runs it) and a token
/// from the TokenRequest API bound to that Pod, so the agent on that node authenticates
/// exactly as a DaemonSet pod would. Returns the agents' kubeconfigs by node.
pub async fn member_identities(
    plane: &ControlPlane,
    hub: &kube::Client,
) -> Result<BTreeMap<String, PathBuf>, FederationError> {
    let mut kubeconfigs = BTreeMap::new();
    for m in plane.members() {
        crate::helm::install(
            &m.kubeconfig,
            &["operator.enabled=false", "memberAccess.create=true"],
        )
        .map_err(|e| FederationError::Helm(format!("install into {}", m.name), e.to_string()))?;
        let client = m.client().await?;
        let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        // The hub operator's identity in this member.
        let token = request_token(&sas, "edgeloom-hub", None).await?;
        let text = token_kubeconfig(&m.kubeconfig, &m.name, &token)?;
        let secrets: Api<Secret> = Api::namespaced(hub.clone(), SYSTEM_NAMESPACE);
        let secret = kubeconfig_secret(&m.name, text);
        secrets
            .replace(
                &format!("{}-kubeconfig", m.name),
                &PostParams::default(),
                &secret,
            )
            .await?;
        // Each node's agent identity.
        let pods: Api<Pod> = Api::namespaced(client.clone(), SYSTEM_NAMESPACE);
        for node in &m.nodes {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("edgeloom-agent-{node}"),
                             "labels": {"app.kubernetes.io/name": "edgeloom-agent-e2e"}},
                "spec": {"nodeName": node, "serviceAccountName": "edgeloom-agent",
                         // The simulated nodes have no kubelet: never evict the Pod, or
                         // its token would stop working.
                         "tolerations": [{"operator": "Exists"}],
                         "containers": [{"name": "agent", "image": "edgeloom:e2e"}]}
            }))
            .map_err(|e| FederationError::Helm("pod".into(), e.to_string()))?;
            let pod = pods.create(&PostParams::default(), &pod).await?;
            let token = request_token(&sas, "edgeloom-agent", Some(&pod)).await?;
            let path = plane.dir().join(format!("agent-{node}.kubeconfig"));
            let text = token_kubeconfig(&m.kubeconfig, &m.name, &token)?;
            std::fs::write(&path, text)
                .map_err(|e| FederationError::Spawn(path.display().to_string(), e))?;
            kubeconfigs.insert(node.clone(), path);
        }
    }
    Ok(kubeconfigs)
}

/// A token of ServiceAccount `sa` (valid 24 h), bound to `pod` if given.
pub async fn request_token(
    sas: &Api<ServiceAccount>,
    sa: &str,
    pod: Option<&Pod>,
) -> Result<String, FederationError> {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            bound_object_ref: pod.map(|p| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: p.metadata.name.clone(),
                uid: p.metadata.uid.clone(),
            }),
            expiration_seconds: Some(86_400),
            ..Default::default()
        }),
        ..Default::default()
    };
    sas.create_token_request(sa, &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| FederationError::Helm("token request".into(), "no token returned".into()))
}

/// A kubeconfig for the cluster of `admin_kubeconfig` that authenticates with `token`.
fn token_kubeconfig(
    admin_kubeconfig: &Path,
    cluster: &str,
    token: &str,
) -> Result<String, FederationError> {
    let kc = kube::config::Kubeconfig::read_from(admin_kubeconfig)
        .map_err(|e| FederationError::Helm("kubeconfig".into(), e.to_string()))?;
    let server = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .ok_or_else(|| FederationError::Helm("kubeconfig".into(), "no cluster".into()))?;
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": cluster, "cluster": {
            "server": server.server,
            "certificate-authority-data": server.certificate_authority_data,
            "certificate-authority": server.certificate_authority,
        }}],
        "users": [{"name": "token", "user": {"token": token}}],
        "contexts": [{"name": cluster, "context": {"cluster": cluster, "user": "token"}}],
        "current-context": cluster,
    });
    Ok(doc.to_string())
}

impl Federation {
    /// Starts `members` with `nodes` simulated nodes each, whose tasks take `work`.
    pub async fn start(
        members: &[&str],
        nodes: u32,
        work: Duration,
    ) -> Result<Federation, FederationError> {
        let mut fed = Federation::start_bare(members, nodes).await?;
        fed.start_sims(work).await?;
        Ok(fed)
    }

    /// Starts simulated agents (paid to `acct-<node>`) for every member node; each task
    /// takes `work`.
    pub async fn start_sims(&mut self, work: Duration) -> Result<(), FederationError> {
        self.start_sims_with_slots(work, 0).await
    }

    /// [`Federation::start_sims`] with agents that advertise `slots` task slots (0: none
    /// advertised, the pool's cap applies).
    pub async fn start_sims_with_slots(
        &mut self,
        work: Duration,
        slots: u32,
    ) -> Result<(), FederationError> {
        for m in self.plane.members() {
            let sims = m
                .nodes
                .iter()
                .map(|n| SimNode::cpu(n, &format!("acct-{n}")).with_slots(slots))
                .collect();
            let agents = SimAgents::start(m.client().await?, sims, work).await?;
            self.agents.insert(m.name.clone(), agents);
        }
        Ok(())
    }

    /// Starts `members` with `nodes` registered nodes each and no agents (start real ones
    /// with [`Federation::agent`]).
    pub async fn start_bare(members: &[&str], nodes: u32) -> Result<Federation, FederationError> {
        let plane = ControlPlane::start(Config {
            members: members.iter().map(|m| m.to_string()).collect(),
            nodes_per_member: nodes,
            ..Config::default()
        })
        .await?;
        let hub = link_members(&plane).await?;
        let agent_kubeconfigs = member_identities(&plane, &hub).await?;
        Ok(Federation {
            agents: BTreeMap::new(),
            agent_kubeconfigs,
            plane,
            hub,
        })
    }

    /// Applies an EdgePool `name` over every member with the given heartbeat timeout and
    /// task slots per node.
    pub async fn apply_pool(
        &self,
        name: &str,
        heartbeat_timeout: u32,
        slots: u32,
    ) -> Result<(), FederationError> {
        let clusters: Vec<serde_json::Value> = self
            .plane
            .members()
            .map(|m| serde_json::json!({"name": m.name, "kubeconfigSecret": {"name": format!("{}-kubeconfig", m.name)}, "region": format!("region-{}", m.name)}))
            .collect();
        let pool = serde_json::json!({
            "apiVersion": "edgeloom.io/v1alpha1", "kind": "EdgePool",
            "metadata": {"name": name},
            "spec": {"clusters": clusters, "heartbeatTimeoutSeconds": heartbeat_timeout, "maxTasksPerNode": slots,
                     "rewards": {"perGpuSecond": "0.001", "perCpuCoreSecond": "0.0001", "unit": "credits"}}
        });
        let text = serde_json::to_string(&pool).unwrap_or_default();
        manifests::apply_all(&self.hub, &text, "default", false).await?;
        Ok(())
    }

    /// A fresh namespace in the hub for a test's jobs.
    pub async fn namespace(&self, name: &str) -> Result<String, FederationError> {
        ensure_namespace(&self.hub, name).await?;
        Ok(name.to_string())
    }

    /// Starts an edgeloom-operator process (binary `bin`) against the hub.
    pub fn operator(&self, bin: &Path, identity: &str) -> Result<Operator, FederationError> {
        self.operator_with_env(bin, identity, &[])
    }

    /// [`Federation::operator`] with extra environment variables (e.g. a failpoint).
    pub fn operator_with_env(
        &self,
        bin: &Path,
        identity: &str,
        env: &[(&str, &str)],
    ) -> Result<Operator, FederationError> {
        let port = free_port()?;
        let log = self.plane.dir().join(format!("operator-{identity}.log"));
        let args = vec![
            format!("--kubeconfig={}", self.plane.hub().kubeconfig.display()),
            format!("--namespace={SYSTEM_NAMESPACE}"),
            format!("--identity={identity}"),
            format!("--metrics-addr=127.0.0.1:{port}"),
            // Short for quick failovers in tests, long enough that a leader on a loaded
            // 2-core machine renews within its deadline (2/3 of it).
            "--lease-duration-seconds=8".into(),
            "--scheduler-interval-ms=200".into(),
        ];
        let process =
            Process::spawn_with_env(&format!("operator[{identity}]"), bin, &args, env, &log)
                .map_err(|e| FederationError::Spawn(bin.display().to_string(), e))?;
        Ok(Operator {
            process,
            port,
            identity: identity.into(),
        })
    }
}

/// Settings of a real agent process.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Member cluster.
    pub member: String,
    /// Node.
    pub node: String,
    /// Contributor account (labelled on the Node by the harness, as the platform team would).
    pub account: String,
    /// Node-local datasets: name -> CSV path.
    pub datasets: BTreeMap<String, std::path::PathBuf>,
    /// Test only: the agent alters its result digests (a cheating node).
    pub cheat: bool,
    /// Test only: the agent does no work and copies another replica's report (a copier).
    pub copy_peers: bool,
    /// Test only: the agent claims far more CPU and GPU time than it used.
    pub inflate_usage: bool,
    /// Test only: the agent poisons its federated updates (`EDGELOOM_TEST_POISON`:
    /// `flip` or `scale:<factor>`).
    pub poison: Option<String>,
}

/// A running edgeloom-agent process.
pub struct AgentProcess {
    /// The process.
    pub process: Process,
    /// Port of /metrics.
    pub port: u16,
    /// Its node.
    pub node: String,
}

impl Federation {
    /// Starts a real edgeloom-agent (`bin`, running `runner`) for one node, with the node's
    /// pod-bound token (see [`member_identities`]; else the member's admin kubeconfig), a
    /// 2 s heartbeat and a quick start-up benchmark.
    pub fn agent(
        &self,
        bin: &Path,
        runner: &Path,
        spec: &AgentSpec,
    ) -> Result<AgentProcess, FederationError> {
        let member = self.plane.cluster(&spec.member)?;
        let port = free_port()?;
        let dir = self.plane.dir().join(format!("agent-{}", spec.node));
        std::fs::create_dir_all(&dir)
            .map_err(|e| FederationError::Spawn(dir.display().to_string(), e))?;
        let datasets: String = spec
            .datasets
            .iter()
            .map(|(k, v)| format!("  {k}: {}\n", v.display()))
            .collect();
        // The account is the platform team's label on the Node (the agent may not write
        // it), set the way an admin would.
        label_account(&member.kubeconfig, &spec.node, &spec.account)?;
        let config = format!(
            "node: {}\nrunner: {}\nworkDir: {}\nheartbeatSeconds: 2\nbenchmarkMatrixSize: 128\nshutdownGraceSeconds: 5\ncorruptResults: {}\ncopyPeers: {}\ninflateUsage: {}\ndatasets:\n{}",
            spec.node,
            runner.display(),
            dir.join("work").display(),
            spec.cheat,
            spec.copy_peers,
            spec.inflate_usage,
            if datasets.is_empty() {
                "  {}\n".to_string()
            } else {
                datasets
            }
        );
        let config_path = dir.join("agent.yaml");
        std::fs::write(&config_path, config)
            .map_err(|e| FederationError::Spawn(config_path.display().to_string(), e))?;
        let kubeconfig = self
            .agent_kubeconfigs
            .get(&spec.node)
            .cloned()
            .unwrap_or_else(|| member.kubeconfig.clone());
        let args = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--config={}", config_path.display()),
            format!("--metrics-addr=127.0.0.1:{port}"),
        ];
        let env: Vec<(&str, &str)> = spec
            .poison
            .as_deref()
            .map(|p| vec![("EDGELOOM_TEST_POISON", p)])
            .unwrap_or_default();
        let process = Process::spawn_with_env(
            &format!("agent[{}]", spec.node),
            bin,
            &args,
            &env,
            &dir.join("agent.log"),
        )
        .map_err(|e| FederationError::Spawn(bin.display().to_string(), e))?;
        Ok(AgentProcess {
            process,
            port,
            node: spec.node.clone(),
        })
    }
}

/// `kubectl label node NODE edgeloom.io/account=ACCOUNT --overwrite`, with the member's
/// admin kubeconfig: what the platform team does when a contributor's machine joins.
pub fn label_account(kubeconfig: &Path, node: &str, account: &str) -> Result<(), FederationError> {
    let kubectl = crate::tools::tool("kubectl")
        .map_err(|e| FederationError::Spawn("kubectl".into(), std::io::Error::other(e)))?;
    let out = std::process::Command::new(&kubectl)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["label", "node", node, "--overwrite"])
        .arg(format!(
            "{}={account}",
            edgeloom_crds::inventory::ACCOUNT_LABEL
        ))
        .output()
        .map_err(|e| FederationError::Spawn(kubectl.display().to_string(), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(FederationError::Spawn(
            format!("kubectl label node {node}"),
            std::io::Error::other(String::from_utf8_lossy(&out.stderr).to_string()),
        ))
    }
}

impl Federation {
    /// Starts a real agent on every member node, paid to `<account_prefix>-<node>`, with the
    /// node-local datasets `datasets` names for it.
    pub fn start_agents(
        &self,
        bin: &Path,
        runner: &Path,
        account_prefix: &str,
        datasets: &BTreeMap<String, BTreeMap<String, std::path::PathBuf>>,
    ) -> Result<Vec<AgentProcess>, FederationError> {
        let mut agents = Vec::new();
        for m in self.plane.members() {
            for node in &m.nodes {
                let spec = AgentSpec {
                    member: m.name.clone(),
                    node: node.clone(),
                    account: format!("{account_prefix}-{node}"),
                    datasets: datasets.get(node).cloned().unwrap_or_default(),
                    cheat: false,
                    copy_peers: false,
                    inflate_usage: false,
                    poison: None,
                };
                agents.push(self.agent(bin, runner, &spec)?);
            }
        }
        Ok(agents)
    }
}

/// A running operator process.
pub struct Operator {
    /// The process.
    pub process: Process,
    /// Port of /metrics.
    pub port: u16,
    /// Its identity.
    pub identity: String,
}

impl Operator {
    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// The end of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}
