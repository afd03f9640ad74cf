//! `kubectl edgeloom`: a kubectl plugin (put it on PATH) for pools and jobs.
//!
//! - `kubectl edgeloom status`: pools and jobs at a glance.
//! - `kubectl edgeloom describe job NAME [-n NS]`: shards, placements, reasons, events.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_crds::{ComputeJob, EdgePool};
use edgeloom_operator::cli;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kubectl-edgeloom", version, about = "edgeloom pools and jobs")]
struct Flags {
    /// Kubeconfig of the hub (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Namespace.
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pools and jobs at a glance.
    Status,
    /// One object in detail.
    Describe {
        /// Only "job" is supported.
        kind: String,
        /// Job name.
        name: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse();
    let config = match &flags.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await.context("no kubeconfig found")?,
    };
    let default_ns = config.default_namespace.clone();
    let client = kube::Client::try_from(config)?;
    let now = jiff::Timestamp::now();
    match flags.command {
        Cmd::Status => {
            let pools = Api::<EdgePool>::all(client.clone())
                .list(&ListParams::default())
                .await?
                .items;
            let jobs = match &flags.namespace {
                Some(ns) => Api::<ComputeJob>::namespaced(client.clone(), ns),
                None => Api::<ComputeJob>::all(client.clone()),
            }
            .list(&ListParams::default())
            .await?
            .items;
            print!("{}", cli::status(&pools, &jobs, now));
        }
        Cmd::Describe { kind, name } => {
            if !matches!(kind.as_str(), "job" | "jobs" | "computejob" | "cjob") {
                bail!("describe supports: job");
            }
            let ns = flags.namespace.unwrap_or(default_ns);
            let job = Api::<ComputeJob>::namespaced(client.clone(), &ns)
                .get_opt(&name)
                .await?
                .with_context(|| format!("ComputeJob {ns}/{name} not found"))?;
            let events = Api::<Event>::namespaced(client, &ns)
                .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
                .await?
                .items;
            print!("{}", cli::describe_job(&job, &events, now));
        }
    }
    Ok(())
}
