//! `edgeloom-dev`: the local federated control plane from the command line.
//!
//! - `edgeloom-dev up` starts a hub and member clusters, installs the CRDs and waits for
//!   Ctrl-C, printing the kubeconfigs to use.
//! - `edgeloom-dev demo` starts them, applies the examples in manifests/, shows them with
//!   the real kubectl and tears everything down.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_e2e::{Config, ControlPlane, manifests, tools};
use std::path::{Path, PathBuf};
use std::process::Command;

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
    /// Simulated nodes per member cluster.
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
    /// Start the clusters, apply manifests/, show `kubectl get`, tear down.
    Demo,
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
    let plane = ControlPlane::start(config)
        .await
        .context("starting the control plane")?;
    for cluster in plane.clusters() {
        let client = cluster.client().await?;
        manifests::install_crds(&client)
            .await
            .with_context(|| format!("installing CRDs in {}", cluster.name))?;
    }
    match cli.command {
        Cmd::Up => up(&plane).await,
        Cmd::Demo => demo(&plane).await,
    }
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

async fn demo(plane: &ControlPlane) -> Result<()> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let hub = plane.hub();
    let client = hub.client().await?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo.join("manifests"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    println!("\n== applying the examples in manifests/ to the hub");
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let objs = manifests::apply_all(&client, &text, "default", false)
            .await
            .with_context(|| format!("applying {}", file.display()))?;
        for o in objs {
            println!(
                "  {} {}/{} applied",
                o.types.map(|t| t.kind).unwrap_or_default(),
                o.metadata.namespace.unwrap_or_default(),
                o.metadata.name.unwrap_or_default()
            );
        }
    }
    let kubectl = tools::tool("kubectl")?;
    for (cluster, args) in [
        (hub, vec!["get", "edgepools"]),
        (hub, vec!["get", "computejobs", "-A"]),
        (hub, vec!["get", "crds"]),
    ] {
        println!(
            "\n== kubectl get {}   (cluster {})",
            args[1..].join(" "),
            cluster.name
        );
        kubectl_run(&kubectl, &cluster.kubeconfig, &args)?;
    }
    for member in plane.members() {
        println!(
            "\n== kubectl --context {} get nodes -L edgeloom.io/cluster",
            member.name
        );
        kubectl_run(
            &kubectl,
            &member.kubeconfig,
            &["get", "nodes", "-L", "edgeloom.io/cluster"],
        )?;
    }
    println!("\n== rejected at admission: manifests/invalid/ (one example)");
    let bad = repo.join("manifests/invalid/job-negative-shards.yaml");
    let text = std::fs::read_to_string(&bad)?;
    match manifests::apply_all(&client, &text, "default", true).await {
        Ok(_) => bail!("{} was accepted", bad.display()),
        Err(e) => println!(
            "  {}: {e}",
            bad.file_name().unwrap_or_default().to_string_lossy()
        ),
    }
    println!("\ndemo done; tearing down");
    Ok(())
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
