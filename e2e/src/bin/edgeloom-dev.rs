//! `edgeloom-dev`: the local federated control plane from the command line.
//!
//! - `edgeloom-dev up` starts a hub and member clusters, installs the CRDs and waits for
//!   Ctrl-C, printing the kubeconfigs to use.
//! - `edgeloom-dev demo` starts a hub and two edge clusters with a real agent per node, runs the
//!   real edgeloom-operator, applies example jobs, shows them being placed across both
//!   clusters with the real kubectl and the kubectl-edgeloom plugin, and tears down.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_crds::{ComputeJob, JobPhase};
use edgeloom_e2e::federation::Federation;
use edgeloom_e2e::{Config, ControlPlane, manifests, prometheus, tools};
use kube::api::Api;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "edgeloom-dev",
    about = "edgeloom's local federated control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Member clusters to start.
    #[arg(long, global = true, default_value_t = 2)]
    members: u32,
    /// Nodes per member cluster (the demo runs one agent on each).
    #[arg(long, global = true, default_value_t = 2)]
    nodes: u32,
    /// Working directory (default: a fresh temp directory, removed at exit).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the clusters and keep them running until Ctrl-C.
    Up,
    /// The federated demo: clusters, operator, example jobs placed across members.
    Demo {
        /// Keep the clusters, agents, operator and Prometheus running after the demo until
        /// Ctrl-C (to look around with kubectl and the Prometheus UI).
        #[arg(long)]
        hold: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = Config {
        members: (0..cli.members).map(member_name).collect(),
        nodes_per_member: cli.nodes,
        keep: cli.dir.is_some(),
        dir: cli.dir,
        ..Config::default()
    };
    if let Cmd::Demo { hold } = cli.command {
        return demo(cli.nodes, hold).await;
    }
    let plane = ControlPlane::start(config)
        .await
        .context("starting the control plane")?;
    for cluster in plane.clusters() {
        let client = cluster.client().await?;
        manifests::install_crds(&client)
            .await
            .with_context(|| format!("installing CRDs in {}", cluster.name))?;
    }
    up(&plane).await
}

fn member_name(i: u32) -> String {
    let letter = (b'a' + (i % 26) as u8) as char;
    if i < 26 {
        format!("edge-{letter}")
    } else {
        format!("edge-{letter}{}", i / 26)
    }
}

async fn up(plane: &ControlPlane) -> Result<()> {
    println!("\nedgeloom control plane is up (Ctrl-C to stop):");
    for cluster in plane.clusters() {
        println!(
            "  {:<8} {}  KUBECONFIG={}",
            cluster.name,
            cluster.server(),
            cluster.kubeconfig.display()
        );
    }
    println!("  kubectl: {}", tools::bin_dir().join("kubectl").display());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("stopping");
    Ok(())
}

/// The demo: the federation, the operator, example jobs placed across both edge clusters.
async fn demo(nodes: u32, hold: bool) -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let exe = |name: &str| std::env::current_exe().map(|p| p.with_file_name(name));
    let (operator, plugin, agent, runner) = (
        exe("edgeloom-operator")?,
        exe("kubectl-edgeloom")?,
        exe("edgeloom-agent")?,
        exe("edgeloom-runner")?,
    );
    for bin in [&operator, &plugin, &agent, &runner] {
        if !bin.is_file() {
            bail!(
                "{} not found: cargo build --workspace --bins (scripts/demo.sh does)",
                bin.display()
            );
        }
    }
    println!("== starting a hub and 2 edge clusters with {nodes} node(s) each");
    let fed = Federation::start_bare(&["edge-a", "edge-b"], nodes).await?;
    if let Ok(s3) = edgeloom_e2e::s3::shared() {
        println!(
            "== the reward ledgers live in SeaweedFS (S3 at {}, bucket {}, its own access key; Secret edgeloom-ledger-store in the hub)",
            s3.endpoint,
            edgeloom_e2e::s3::BUCKET
        );
    }
    println!(
        "== starting one edgeloom-agent per node (each measures its node with libtorch first)"
    );
    let nodes: Vec<String> = fed.plane.members().flat_map(|m| m.nodes.clone()).collect();
    let (datasets, _test) = edgeloom_e2e::digits::label_skewed_slices(fed.plane.dir(), &nodes)?;
    println!(
        "== each node holds its own label-skewed slice of the digits as the node-local dataset {:?} (it never leaves the node)",
        edgeloom_e2e::digits::DATASET
    );
    let agents = fed.start_agents(&agent, &runner, "contributor", &datasets)?;
    let hub = fed.plane.hub();
    let kubectl = tools::tool("kubectl")?;
    println!(
        "\n== applying manifests/edgepool-edge.yaml (kubeconfig Secrets for both members are in edgeloom-system)"
    );
    let pool = std::fs::read_to_string(repo.join("manifests/edgepool-edge.yaml"))?;
    manifests::apply_all(&fed.hub, &pool, "default", false).await?;
    println!("== starting edgeloom-operator");
    let operator_process = fed.operator(&operator, "demo")?;
    let prom = start_prometheus(&fed, operator_process.port, &agents).await;
    let ns = fed.namespace("demo").await?;
    for example in [
        "job-train-digits.yaml",
        "job-benchmark.yaml",
        "job-inference-digits.yaml",
        "job-federated-digits.yaml",
    ] {
        println!("== kubectl apply -n {ns} -f manifests/{example}");
        let text = std::fs::read_to_string(repo.join("manifests").join(example))?;
        manifests::apply_all(&fed.hub, &text, &ns, false).await?;
    }
    let jobs: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), &ns);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        println!("\n== kubectl get cjob -n {ns}");
        kubectl_run(&kubectl, &hub.kubeconfig, &["get", "cjob", "-n", &ns])?;
        let list = jobs.list(&Default::default()).await?;
        let done = list.items.iter().all(|j| {
            matches!(
                j.status.as_ref().and_then(|s| s.phase),
                Some(JobPhase::Succeeded | JobPhase::Failed)
            )
        });
        if done {
            break;
        }
        if std::time::Instant::now() > deadline {
            bail!("the demo jobs did not finish within 300s");
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    println!("\n== kubectl get epool");
    kubectl_run(&kubectl, &hub.kubeconfig, &["get", "epool"])?;
    println!("\n== kubectl edgeloom status");
    kubectl_run(&plugin, &hub.kubeconfig, &["status"])?;
    println!("\n== kubectl edgeloom describe job train-digits -n {ns}");
    kubectl_run(
        &plugin,
        &hub.kubeconfig,
        &["describe", "job", "train-digits", "-n", &ns],
    )?;
    println!("\n== results (from ComputeJob status)");
    for j in jobs.list(&Default::default()).await?.items {
        let s = j.status.unwrap_or_default();
        let metrics: Vec<String> = s
            .metrics
            .iter()
            .map(|(k, v)| format!("{k}={v:.4}"))
            .collect();
        let digest = s.result.and_then(|r| r.digest).unwrap_or_default();
        let paid = s
            .rewards
            .map(|r| {
                format!(
                    "paid {} in {} receipt(s)",
                    r.total.unwrap_or_default(),
                    r.receipts
                )
            })
            .unwrap_or_else(|| "not paid yet".into());
        println!(
            "  {:<17} {:<9} result {}  {}  {paid}",
            j.metadata.name.unwrap_or_default(),
            format!("{:?}", s.phase.unwrap_or(JobPhase::Pending)),
            digest.get(..16).unwrap_or("-"),
            metrics.join(" ")
        );
    }
    println!("\n== federated learning across both edge clusters: accuracy per round");
    if let Ok(j) = jobs.get("federated-digits").await
        && let Some(f) = j.status.and_then(|s| s.federated)
    {
        for r in &f.rounds {
            println!(
                "  round {:>2}: {} of {} updates accepted, accuracy {}, loss {}, bytes kept in members {}, sent to the hub {}",
                r.round,
                r.accepted,
                r.participants,
                r.accuracy
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "-".into()),
                r.loss
                    .map(|a| format!("{a:.4}"))
                    .unwrap_or_else(|| "-".into()),
                r.bytes_in_members,
                r.bytes_to_hub
            );
        }
        if let Some(a) = f.final_accuracy {
            println!("  final model: accuracy {a:.4} on the participants' own held-out rows");
        }
    }
    println!("\n== kubectl edgeloom describe job federated-digits -n {ns}");
    kubectl_run(
        &plugin,
        &hub.kubeconfig,
        &["describe", "job", "federated-digits", "-n", &ns],
    )?;
    println!("\n== kubectl edgeloom ledger balance   (rewards per contributor account)");
    kubectl_run(&plugin, &hub.kubeconfig, &["ledger", "balance"])?;
    println!("\n== kubectl edgeloom ledger verify    (recomputes every hash of the chain)");
    kubectl_run(&plugin, &hub.kubeconfig, &["ledger", "verify"])?;
    println!(
        "\n== kubectl edgeloom ledger checkpoint (the signed Merkle-log checkpoint contributors keep)"
    );
    kubectl_run(&plugin, &hub.kubeconfig, &["ledger", "checkpoint"])?;
    println!("\n== kubectl edgeloom ledger trust     (verified results per node)");
    kubectl_run(&plugin, &hub.kubeconfig, &["ledger", "trust"])?;
    for member in fed.plane.members() {
        println!(
            "\n== kubectl get ct -n edgeloom-system   (cluster {})",
            member.name
        );
        kubectl_run(
            &kubectl,
            &member.kubeconfig,
            &["get", "ct", "-n", "edgeloom-system"],
        )?;
    }
    if let Some(prom) = &prom {
        show_prometheus(prom).await;
    }
    println!("\n== rejected at admission: manifests/invalid/job-negative-shards.yaml");
    let bad = std::fs::read_to_string(repo.join("manifests/invalid/job-negative-shards.yaml"))?;
    match manifests::apply_all(&fed.hub, &bad, &ns, true).await {
        Ok(_) => bail!("an invalid manifest was accepted"),
        Err(e) => println!("  {e}"),
    }
    if hold {
        println!("\n== holding (Ctrl-C to tear down)");
        println!("  hub kubeconfig:  {}", hub.kubeconfig.display());
        for m in fed.plane.members() {
            println!("  {} kubeconfig: {}", m.name, m.kubeconfig.display());
        }
        if let Some(prom) = &prom {
            println!(
                "  Prometheus:      {}/alerts  {}/graph",
                prom.url(),
                prom.url()
            );
        }
        println!(
            "  operator:        http://127.0.0.1:{}/metrics",
            operator_process.port
        );
        tokio::signal::ctrl_c().await?;
    }
    println!("\ndemo done; tearing down");
    Ok(())
}

/// A real Prometheus (from install-tools) scraping the operator and every agent each
/// second, with the Helm chart's alert rules; None, saying why, when it cannot start.
async fn start_prometheus(
    fed: &Federation,
    operator_port: u16,
    agents: &[edgeloom_e2e::federation::AgentProcess],
) -> Option<prometheus::Prometheus> {
    let rules = fed.plane.dir().join("edgeloom-rules.yml");
    let started = async {
        prometheus::write_chart_rules(&rules)?;
        let prom = prometheus::Prometheus::start(
            fed.plane.dir(),
            &[
                ("edgeloom-operator", vec![operator_port]),
                ("edgeloom-agent", agents.iter().map(|a| a.port).collect()),
            ],
            Some(&rules),
        )
        .await?;
        prom.wait_targets_up(1 + agents.len(), Duration::from_secs(30))
            .await?;
        Ok::<_, prometheus::PrometheusError>(prom)
    };
    match started.await {
        Ok(prom) => {
            println!(
                "== Prometheus scraping the operator and {} agents: {} (the chart's alert rules loaded)",
                agents.len(),
                prom.url()
            );
            Some(prom)
        }
        Err(e) => {
            println!("== (no Prometheus: {e}; run e2e/scripts/install-tools.sh)");
            None
        }
    }
}

/// What Prometheus saw of the demo: a few dashboard queries and the alerts.
async fn show_prometheus(prom: &prometheus::Prometheus) {
    // One more scrape after the last status change.
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "\n== Prometheus {} (dashboard queries of charts/edgeloom/files/dashboard.json)",
        prom.url()
    );
    for (what, expr) in [
        (
            "jobs finished",
            "sum by (phase) (edgeloom_operator_jobs_finished_total)",
        ),
        (
            "rewards issued",
            "sum by (pool, unit) (edgeloom_operator_rewards_total)",
        ),
        ("ledger receipts", "edgeloom_operator_ledger_receipts"),
        (
            "verification verdicts",
            "sum by (verdict) (edgeloom_operator_verification_results_total)",
        ),
        ("ready agent nodes", "edgeloom_operator_member_ready_nodes"),
        ("node TFLOP/s", "edgeloom_agent_node_tflops"),
    ] {
        match prom.query(expr).await {
            Ok(series) => {
                let values: Vec<String> = series
                    .iter()
                    .map(|s| {
                        let labels: Vec<String> = s["metric"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(k, _)| !matches!(k.as_str(), "__name__" | "job"))
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect();
                        format!(
                            "{{{}}} {}",
                            labels.join(","),
                            s["value"][1].as_str().unwrap_or_default()
                        )
                    })
                    .collect();
                println!("  {what:<22} {expr}\n  {:<22} {}", "", values.join("  "));
            }
            Err(e) => println!("  {what:<22} {e}"),
        }
    }
    if let Ok(rules) = prom.api("/api/v1/rules").await {
        let all: Vec<&serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let healthy = all.iter().filter(|r| r["health"] == "ok").count();
        let firing: Vec<&str> = all
            .iter()
            .filter(|r| r["state"] == "firing" || r["state"] == "pending")
            .filter_map(|r| r["name"].as_str())
            .collect();
        println!(
            "  alert rules: {}/{} evaluate without error; pending or firing: {}",
            healthy,
            all.len(),
            if firing.is_empty() {
                "none".to_string()
            } else {
                firing.join(", ")
            }
        );
    }
}

fn kubectl_run(kubectl: &Path, kubeconfig: &Path, args: &[&str]) -> Result<()> {
    let status = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .status()
        .context("running kubectl")?;
    if !status.success() {
        bail!("kubectl {} failed: {status}", args.join(" "));
    }
    Ok(())
}
