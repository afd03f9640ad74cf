//! `kubectl edgeloom`: a kubectl plugin (put it on PATH) for pools and jobs.
//!
//! - `kubectl edgeloom status`: pools and jobs at a glance.
//! - `kubectl edgeloom describe job NAME [-n NS]`: shards, placements, reasons, events.
//! - `kubectl edgeloom ledger verify|export|balance|trust|forgive [--pool P]`: the reward
//!   ledgers; `checkpoint`, `prove` and `check-proof` for the ledger as a Merkle log
//!   (`check-proof` needs no cluster: it reads only the exported proof).

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use edgeloom_crds::edge_pool::VerificationPolicy;
use edgeloom_crds::{ComputeJob, EdgePool};
use edgeloom_operator::cli;
use edgeloom_operator::rewards::backend::{self, STORE_SECRET, StoreConfig};
use edgeloom_operator::rewards::ledger::Entry;
use edgeloom_operator::rewards::merkle::Checkpoint;
use edgeloom_operator::rewards::objects;
use edgeloom_operator::rewards::store::{
    REPUTATION_KEY, REPUTATION_LABEL, pool_token, reputation_name, reputation_shard,
    reputation_shard_of,
};
use edgeloom_operator::rewards::trust::Reputation;
use k8s_openapi::api::core::v1::{ConfigMap, Event};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use std::collections::BTreeMap;
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
    /// The pools' reward ledgers (read from the operator's namespace).
    Ledger {
        #[command(subcommand)]
        action: LedgerCmd,
        /// Only this pool's ledger (default: every ledger found).
        #[arg(long, global = true)]
        pool: Option<String>,
        /// Namespace of the operator (its object store Secret, reputation records).
        #[arg(long, global = true, default_value = "edgeloom-system")]
        operator_namespace: String,
        /// Read the ledgers from this store instead of the one the operator's Secret
        /// names (file:///dir for an operator without an object store).
        #[arg(long, global = true)]
        store_url: Option<String>,
    },
}

#[derive(Subcommand, Clone, PartialEq, Eq)]
enum LedgerCmd {
    /// Recompute every hash; name the first broken link (exit 1) if any entry was altered;
    /// check the ledger against the pool's signed checkpoint and, with --checkpoint, against
    /// one kept from earlier (a truncated or rewritten history is named).
    Verify {
        /// A checkpoint saved earlier with `ledger checkpoint` (JSON).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The operator's public key (hex) that checkpoints must be signed with (default:
        /// the key each checkpoint names, which shows only that it was not altered).
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Print each pool's latest signed checkpoint as JSON (keep it to check later).
    Checkpoint,
    /// An inclusion proof of one receipt ("JOB_UID/SHARD/REPLICA", with --pool) against
    /// the pool's signed checkpoint, as JSON for `check-proof`.
    Prove {
        /// The receipt's key.
        receipt: String,
    },
    /// Check a proof from `prove` offline: the entry's hash, its inclusion in the
    /// checkpoint's tree, and the checkpoint's signature.
    CheckProof {
        /// The proof (JSON).
        file: PathBuf,
        /// The operator's public key (hex) to trust; default: the one in the proof.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Write every entry as JSON lines to stdout.
    Export,
    /// Totals per contributor account.
    Balance,
    /// Nodes' verification record (adaptive trust): verified results, current run,
    /// times caught, and whether they are trusted.
    Trust,
    /// Clear a node's record ("cluster/node", with --pool): it is no longer quarantined
    /// and earns trust from zero.
    Forgive {
        /// The node, as "cluster/node".
        node: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let flags = Flags::parse();
    // Offline: reads only the exported proof, no cluster.
    if let Cmd::Ledger {
        action: LedgerCmd::CheckProof { file, public_key },
        ..
    } = &flags.command
    {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let proof: cli::ReceiptProof = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a proof from `ledger prove`", file.display()))?;
        match cli::check_proof(&proof, public_key.as_deref()) {
            Ok(msg) => println!("{msg}"),
            Err(why) => {
                println!("INVALID: {why}");
                std::process::exit(1);
            }
        }
        return Ok(());
    }
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
        Cmd::Ledger {
            action,
            pool,
            operator_namespace,
            store_url,
        } => {
            let broken = ledger(&client, action, pool, &operator_namespace, store_url).await?;
            if broken {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

/// Runs a ledger command; true when a ledger is broken (verify) or unreadable.
async fn ledger(
    client: &kube::Client,
    action: LedgerCmd,
    pool: Option<String>,
    namespace: &str,
    store_url: Option<String>,
) -> Result<bool> {
    match &action {
        LedgerCmd::Trust => return trust(client, pool, namespace).await,
        LedgerCmd::Forgive { node } => {
            let pool = pool.context("forgive needs --pool")?;
            return forgive(client, &pool, node, namespace).await;
        }
        LedgerCmd::Prove { .. } if pool.is_none() => bail!("prove needs --pool"),
        _ => {}
    }
    let pool_objects = Api::<EdgePool>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let config = match store_url {
        Some(url) => StoreConfig {
            url,
            ..StoreConfig::default()
        },
        None => backend::from_hub(client, namespace, STORE_SECRET)
            .await
            .map_err(anyhow::Error::msg)?
            .with_context(|| {
                format!(
                    "no Secret {namespace}/{STORE_SECRET}: the operator keeps its ledgers in its local directory; \
                     read them there with --store-url file:///<dir>"
                )
            })?,
    };
    let store = config.open().map_err(anyhow::Error::msg)?;
    // Pools with a log, by their full name where an EdgePool has it.
    let names: BTreeMap<String, String> = pool_objects
        .iter()
        .map(|p| (pool_token(&p.name_any()), p.name_any()))
        .collect();
    let mut pools: Vec<String> = objects::pools(store.store.as_ref(), &store.root)
        .await
        .with_context(|| format!("listing the ledgers in {}", store.url))?
        .into_iter()
        .map(|t| names.get(&t).cloned().unwrap_or(t))
        .collect();
    if let Some(p) = &pool {
        pools.retain(|name| name == p);
        if pools.is_empty() {
            bail!("no ledger for pool {p} in {} (no receipts yet?)", store.url);
        }
    }
    if pools.is_empty() {
        eprintln!("no ledgers in {} (no receipts issued yet)", store.url);
        return Ok(false);
    }
    let units: BTreeMap<String, String> = pool_objects
        .iter()
        .map(|p| (p.name_any(), p.spec.rewards.unit.clone()))
        .collect();
    let checkpoints: BTreeMap<String, Checkpoint> = pool_objects
        .iter()
        .filter_map(|p| {
            let c = p.status.as_ref()?.rewards.as_ref()?.checkpoint.as_ref()?;
            Some((p.name_any(), Checkpoint::from_status(&p.name_any(), c)))
        })
        .collect();
    let kept: Option<Checkpoint> = match &action {
        LedgerCmd::Verify {
            checkpoint: Some(path),
            ..
        } => Some(
            serde_json::from_str(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("{} is not a checkpoint", path.display()))?,
        ),
        _ => None,
    };
    let mut broken = false;
    for name in pools {
        let prefix = objects::log_prefix(&store.root, &name);
        let unit = units.get(&name).cloned().unwrap_or_default();
        let read = objects::read_all(store.store.as_ref(), &prefix)
            .await
            .map_err(|e| e.to_string());
        match (action.clone(), read) {
            (LedgerCmd::Verify { .. }, Ok((entries, locations))) => {
                let count = locations
                    .iter()
                    .map(|l| &l.object)
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                println!(
                    "pool {name}: {} entries in {count} object(s), head {}: every link verified",
                    entries.len(),
                    entries
                        .last()
                        .map_or(edgeloom_operator::rewards::ledger::GENESIS, |e| e
                            .hash
                            .as_str())
                );
                let hashes: Vec<String> = entries.iter().map(|e| e.hash.clone()).collect();
                let mut against: Vec<(&str, &Checkpoint)> = Vec::new();
                if let Some(cp) = checkpoints.get(&name) {
                    against.push(("the pool's checkpoint", cp));
                }
                if let Some(cp) = kept.as_ref().filter(|c| c.pool == name) {
                    against.push(("the kept checkpoint", cp));
                }
                for (which, cp) in against {
                    let key = match &action {
                        LedgerCmd::Verify { public_key, .. } => public_key.as_deref(),
                        _ => None,
                    };
                    match cp.verify(key).and_then(|()| cp.check_history(&hashes)) {
                        Ok(()) => println!(
                            "pool {name}: {which} (size {}, signed {}) is consistent: the ledger begins with the history it covers",
                            cp.size, cp.time
                        ),
                        Err(why) => {
                            println!("pool {name}: BROKEN against {which}: {why}");
                            broken = true;
                        }
                    }
                }
            }
            (LedgerCmd::Checkpoint, _) => match checkpoints.get(&name) {
                Some(cp) => println!("{}", serde_json::to_string(cp)?),
                None => eprintln!("pool {name}: no signed checkpoint yet"),
            },
            (LedgerCmd::Prove { receipt }, Ok((entries, _))) => {
                let cp = checkpoints
                    .get(&name)
                    .with_context(|| format!("pool {name} has no signed checkpoint yet"))?;
                let proof = cli::prove(&entries, cp, &receipt).map_err(anyhow::Error::msg)?;
                println!("{}", serde_json::to_string_pretty(&proof)?);
            }
            (LedgerCmd::Prove { .. }, Err(why)) => {
                eprintln!("pool {name}: BROKEN, no proof: {why}");
                broken = true;
            }
            (LedgerCmd::Verify { .. }, Err(why)) => {
                println!("pool {name}: BROKEN: {why}");
                broken = true;
            }
            (LedgerCmd::Balance, Ok((entries, _))) => {
                print!("{}", cli::ledger_balance(&name, &unit, &entries))
            }
            (LedgerCmd::Export, result) => {
                // Export even a broken ledger (that is when it is needed), but say so.
                if let Err(why) = &result {
                    eprintln!("warning: pool {name}: {why}");
                    broken = true;
                }
                let entries: Vec<Entry> = match result {
                    Ok((entries, _)) => entries,
                    Err(_) => objects::read_unchecked(store.store.as_ref(), &prefix).await?,
                };
                for e in entries {
                    let mut v = serde_json::to_value(&e)?;
                    v["pool"] = serde_json::Value::String(name.clone());
                    println!("{v}");
                }
            }
            (LedgerCmd::Balance, Err(why)) => {
                eprintln!("pool {name}: BROKEN, no balance: {why}");
                broken = true;
            }
            (LedgerCmd::Trust | LedgerCmd::Forgive { .. } | LedgerCmd::CheckProof { .. }, _) => {
                bail!("handled above")
            }
        }
    }
    Ok(broken)
}

/// The pool a reputation ConfigMap belongs to: its annotation holds the full name, its
/// label a token (the name, shortened when long).
fn pool_of(cm: &ConfigMap, label: &str) -> String {
    cm.annotations()
        .get("edgeloom.io/pool")
        .or_else(|| cm.labels().get(label))
        .cloned()
        .unwrap_or_default()
}

async fn forgive(client: &kube::Client, pool: &str, node: &str, namespace: &str) -> Result<bool> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), namespace);
    let name = reputation_name(pool, reputation_shard_of(node));
    let mut cm = api
        .get_opt(&name)
        .await?
        .with_context(|| format!("no reputation records for pool {pool} ({namespace}/{name})"))?;
    let mut part = reputation_shard(&cm).map_err(anyhow::Error::msg)?;
    let Some(old) = part.nodes.remove(node) else {
        bail!("pool {pool} has no record of node {node} (give it as cluster/node)");
    };
    cm.data
        .get_or_insert_with(Default::default)
        .insert(REPUTATION_KEY.into(), serde_json::to_string(&part)?);
    // resourceVersion from the read: a concurrent write by the operator makes this fail
    // rather than be lost.
    api.replace(&name, &Default::default(), &cm).await?;
    println!(
        "pool {pool}: cleared the record of {node} (was: {} verified, caught {} time(s)); it is no longer quarantined",
        old.valid, old.caught
    );
    Ok(false)
}

async fn trust(client: &kube::Client, pool: Option<String>, namespace: &str) -> Result<bool> {
    let cms = Api::<ConfigMap>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(REPUTATION_LABEL))
        .await
        .with_context(|| format!("listing reputation ConfigMaps in {namespace}"))?
        .items;
    let mut pools: BTreeMap<String, Reputation> = BTreeMap::new();
    for cm in &cms {
        let name = pool_of(cm, REPUTATION_LABEL);
        if pool.as_ref().is_some_and(|p| *p != name) {
            continue;
        }
        let part = reputation_shard(cm).map_err(anyhow::Error::msg)?;
        pools.entry(name).or_default().nodes.extend(part.nodes);
    }
    let policies: BTreeMap<String, VerificationPolicy> = Api::<EdgePool>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .map(|p| (p.name_any(), p.spec.verification.clone()))
                .collect()
        })
        .unwrap_or_default();
    for (name, rep) in pools {
        let policy = policies.get(&name).cloned().unwrap_or_default();
        print!(
            "{}",
            cli::trust_table(&name, policy.trust_threshold, policy.quarantine_after, &rep)
        );
    }
    Ok(false)
}
