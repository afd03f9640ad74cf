//! The chaos run (docs/ARCHITECTURE.md, "Failure model"): many jobs over three member
//! clusters on real kube-apiservers, two operator replicas racing for the lease, simulated
//! agents for volume and real ones running tiny libtorch tasks, while agents are killed
//! and come back, a member's API server goes away for a while and the leading operator is
//! killed with SIGKILL again and again. It then checks what must hold whatever happened:
//! every job reaches a final phase; no attempt number is ever issued twice; every accepted
//! result has exactly one receipt and nothing else has one; the ledger verifies; and once
//! every job is deleted, no task is left in any member.
//!
//! `target/release/chaos` runs it at full size (1,000 jobs); the test
//! `operator/tests/chaos.rs` runs a CI-sized one (100 jobs, the same faults).

use crate::federation::{AgentProcess, AgentSpec, Federation, Operator};
use crate::ledger;
use crate::manifests;
use crate::sim_agent::{SimAgents, SimNode};
use edgeloom_crds::compute_task::ComputeTask;
use edgeloom_crds::inventory::SYSTEM_NAMESPACE;
use edgeloom_crds::{ComputeJob, JobPhase, TaskPhase};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The size and faults of a run.
#[derive(Clone, Debug)]
pub struct Config {
    /// ComputeJobs applied.
    pub jobs: usize,
    /// Member clusters.
    pub members: usize,
    /// Simulated agent nodes per member.
    pub sim_nodes: u32,
    /// Real agents (in the first member), running tiny libtorch tasks.
    pub real_agents: usize,
    /// How long a simulated task runs.
    pub work: Duration,
    /// Share of the simulated agents killed (each once, for a while) during the run.
    pub agent_kill_share: f64,
    /// How long one member's API server is down.
    pub member_down: Duration,
    /// When it goes down, from the first job.
    pub member_down_at: Duration,
    /// How many times the leading operator is killed (SIGKILL).
    pub operator_kills: usize,
    /// Time between operator kills.
    pub operator_kill_every: Duration,
    /// Until when (from the first job) agents are killed.
    pub faults_until: Duration,
    /// Pool heartbeat timeout, seconds.
    pub heartbeat_timeout: u32,
    /// Seed of every random choice.
    pub seed: u64,
    /// Longest wait for all jobs to finish.
    pub timeout: Duration,
    /// edgeloom-operator.
    pub operator_bin: PathBuf,
    /// edgeloom-agent.
    pub agent_bin: PathBuf,
    /// edgeloom-runner.
    pub runner_bin: PathBuf,
    /// kubectl-edgeloom.
    pub plugin_bin: PathBuf,
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Jobs applied.
    pub jobs: usize,
    /// Succeeded.
    pub succeeded: usize,
    /// Failed, by reason.
    pub failed: BTreeMap<String, usize>,
    /// Not final when the run gave up waiting.
    pub not_final: usize,
    /// (job, shard, replica, attempt) seen in more than one member or on more than one node.
    pub duplicate_attempts: usize,
    /// Attempts seen in all (distinct tokens).
    pub attempts: usize,
    /// Listings of a member's tasks that failed (its tokens were missed that time).
    pub failed_listings: usize,
    /// Results accepted (succeeded slots of finished jobs, not outvoted).
    pub accepted: usize,
    /// Receipts in the ledger for the run's jobs once every job was deleted (a job's
    /// deletion settles what it earned first).
    pub receipts: usize,
    /// Of those, receipts already written when the last job went final (the rest were
    /// written later: the ledger was briefly unavailable or slow, or a leader was killed
    /// between a result and its receipt).
    pub receipts_at_end_of_run: usize,
    /// Accepted results without a receipt.
    pub missing_receipts: usize,
    /// Receipts for a slot paid more than once.
    pub duplicate_receipts: usize,
    /// Receipts for anything but an accepted result (e.g. a stale attempt).
    pub unexpected_receipts: usize,
    /// Forfeits written (nodes killed between their commitment and their reveal are
    /// caught by design).
    pub forfeits: usize,
    /// Forfeits of no receipt, or of one taken back twice.
    pub bad_forfeits: usize,
    /// Tasks left in members once every job was deleted.
    pub orphaned_tasks: usize,
    /// Jobs still there after the deletion wait.
    pub undeleted_jobs: usize,
    /// `kubectl edgeloom ledger verify` exited 0.
    pub ledger_verified: bool,
    /// Faults injected: agent kills, real agent kills, member outages, operator kills.
    pub faults: (usize, usize, usize, usize),
    /// From the first job applied to the last final phase.
    pub run_time: Duration,
    /// Including start-up, deletion and checks.
    pub wall: Duration,
    /// Examples of what went wrong (at most a few per kind).
    pub problems: Vec<String>,
}

impl Summary {
    /// Every goal met: all jobs final, no duplicate attempt, no missing, duplicate or
    /// unexpected receipt, no orphaned task, the ledger verifies.
    pub fn ok(&self) -> bool {
        self.not_final == 0
            && self.duplicate_attempts == 0
            && self.missing_receipts == 0
            && self.duplicate_receipts == 0
            && self.unexpected_receipts == 0
            && self.bad_forfeits == 0
            && self.orphaned_tasks == 0
            && self.undeleted_jobs == 0
            && self.ledger_verified
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let failed: usize = self.failed.values().sum();
        let reasons: Vec<String> = self
            .failed
            .iter()
            .map(|(r, n)| format!("{r}:{n}"))
            .collect();
        write!(
            f,
            "chaos: {} jobs: {} succeeded, {} failed [{}], {} not final; attempts {} (duplicates {}, listings failed {}); accepted results {}, receipts {} ({} by the end of the run; missing {}, duplicate {}, unexpected {}); forfeits {} (wrong {}); orphaned tasks {}; jobs not deleted {}; ledger verify {}; faults: {} agent kills, {} real agent kills, {} member outages, {} operator kills; run {:.0}s, wall {:.0}s: {}",
            self.jobs,
            self.succeeded,
            failed,
            reasons.join(" "),
            self.not_final,
            self.attempts,
            self.duplicate_attempts,
            self.failed_listings,
            self.accepted,
            self.receipts,
            self.receipts_at_end_of_run,
            self.missing_receipts,
            self.duplicate_receipts,
            self.unexpected_receipts,
            self.forfeits,
            self.bad_forfeits,
            self.orphaned_tasks,
            self.undeleted_jobs,
            if self.ledger_verified { "ok" } else { "FAILED" },
            self.faults.0,
            self.faults.1,
            self.faults.2,
            self.faults.3,
            self.run_time.as_secs_f64(),
            self.wall.as_secs_f64(),
            if self.ok() { "PASS" } else { "FAIL" },
        )
    }
}

/// A small deterministic generator (xorshift*), so a run is repeatable by its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Node label the run uses to keep real and simulated agents' jobs apart (real agents'
/// results of a benchmark are not reproducible across nodes, so replicated jobs go to
/// simulated agents, whose digests are).
const KIND_LABEL: &str = "chaos.edgeloom.io/agent";

const NS: &str = "chaos";

/// An attempt's fencing token: (job UID, shard, replica, attempt). Where each was seen:
/// (member, node).
type Token = (String, u32, u32, u32);

/// The YAML of job `i` of the mix: plain, replicated (commit–reveal, quorum 2), gang,
/// budgeted (some budgets too small, so they fail with BudgetExceeded) and real libtorch
/// jobs on the real agents.
fn job_yaml(i: usize, rng: &mut Rng, real: bool) -> String {
    let name = format!("job-{i:04}");
    let head = format!(
        "apiVersion: edgeloom.io/v1alpha1\nkind: ComputeJob\nmetadata:\n  name: {name}\nspec:\n"
    );
    if real {
        return format!(
            "{head}  workload:\n    kind: Benchmark\n    parameters:\n      matrixSize: 64\n  shards: 1\n  placement:\n    requiredLabels:\n      {KIND_LABEL}: real\n"
        );
    }
    let sim = format!("  placement:\n    requiredLabels:\n      {KIND_LABEL}: sim\n");
    let shards = 1 + rng.below(3);
    match rng.below(100) {
        0..=49 => format!("{head}  workload:\n    kind: Benchmark\n  shards: {shards}\n{sim}"),
        50..=69 => format!(
            "{head}  workload:\n    kind: Benchmark\n  shards: {shards}\n  verification:\n    replicas: 2\n    quorum: 2\n{sim}"
        ),
        70..=79 => format!(
            "{head}  workload:\n    kind: Benchmark\n  shards: {}\n{sim}    gang: true\n    gangTimeoutSeconds: 1200\n",
            shards + 1
        ),
        _ => {
            // 0.0002 per simulated task: enough for every shard, or one short.
            let paid = if rng.below(2) == 0 {
                shards
            } else {
                shards - 1
            };
            format!(
                "{head}  workload:\n    kind: Benchmark\n  shards: {shards}\n  budget:\n    maxAmount: \"{}\"\n{sim}",
                format_args!("0.{:04}", paid * 2)
            )
        }
    }
}

/// The operator replica holding the hub's leader Lease.
async fn leader(hub: &kube::Client) -> Option<String> {
    Api::<Lease>::namespaced(hub.clone(), SYSTEM_NAMESPACE)
        .get_opt("edgeloom-operator")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// Every task in every member that answers: (member, task), and how many members could
/// not be listed.
async fn all_tasks(fed: &Federation, down: Option<&str>) -> (Vec<(String, ComputeTask)>, usize) {
    let mut out = Vec::new();
    let mut failed = 0;
    for m in fed.plane.members() {
        if Some(m.name.as_str()) == down {
            continue;
        }
        let listed = match m.client().await {
            Ok(client) => Api::<ComputeTask>::namespaced(client, SYSTEM_NAMESPACE)
                .list(&ListParams::default())
                .await
                .ok(),
            Err(_) => None,
        };
        match listed {
            Some(list) => out.extend(list.items.into_iter().map(|t| (m.name.clone(), t))),
            None => failed += 1,
        }
    }
    (out, failed)
}

/// Adds the attempt tokens of `tasks` to `seen`.
fn record(
    seen: &mut BTreeMap<Token, BTreeSet<(String, String)>>,
    tasks: Vec<(String, ComputeTask)>,
) {
    for (member, task) in tasks {
        let s = &task.spec;
        seen.entry((s.job.uid.clone(), s.shard, s.replica, s.attempt))
            .or_default()
            .insert((member, s.node_name.clone()));
    }
}

fn start_operator(fed: &Federation, cfg: &Config, identity: &str) -> anyhow::Result<Operator> {
    Ok(fed.operator_with_env(
        &cfg.operator_bin,
        identity,
        &[("EDGELOOM_ORPHAN_SWEEP_SECONDS", "5")],
    )?)
}

/// Runs the chaos run and returns what it found (its own failures to set up are errors).
pub async fn run(cfg: &Config) -> anyhow::Result<Summary> {
    let wall = Instant::now();
    let mut rng = Rng(cfg.seed.max(1));
    let names: Vec<String> = (0..cfg.members)
        .map(|i| format!("edge-{}", (b'a' + i as u8) as char))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    eprintln!(
        "[chaos] starting a hub and {} member clusters with {} nodes each",
        cfg.members, cfg.sim_nodes
    );
    let mut fed = Federation::start_bare(&refs, cfg.sim_nodes).await?;
    let real_nodes: Vec<String> = fed
        .plane
        .members()
        .next()
        .map(|m| m.nodes.iter().take(cfg.real_agents).cloned().collect())
        .unwrap_or_default();
    // Label every node real or simulated (the platform team's label), start the agents.
    let mut sim_nodes: Vec<(String, String)> = Vec::new();
    let mut agent_specs: Vec<AgentSpec> = Vec::new();
    for m in fed.plane.members() {
        let client = m.client().await?;
        let nodes: Api<Node> = Api::all(client.clone());
        let mut sims = Vec::new();
        for n in &m.nodes {
            let real = real_nodes.contains(n);
            nodes
                .patch(
                    n,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"metadata": {"labels": {KIND_LABEL: if real { "real" } else { "sim" }}}})),
                )
                .await?;
            if real {
                agent_specs.push(AgentSpec {
                    member: m.name.clone(),
                    node: n.clone(),
                    account: format!("acct-{n}"),
                    datasets: BTreeMap::new(),
                    cheat: false,
                    copy_peers: false,
                    inflate_usage: false,
                    poison: None,
                });
            } else {
                sims.push(SimNode::cpu(n, &format!("acct-{n}")));
                sim_nodes.push((m.name.clone(), n.clone()));
            }
        }
        let agents = SimAgents::start(client, sims, cfg.work).await?;
        fed.agents.insert(m.name.clone(), agents);
    }
    let mut real: Vec<AgentProcess> = Vec::new();
    for spec in &agent_specs {
        real.push(fed.agent(&cfg.agent_bin, &cfg.runner_bin, spec)?);
    }
    fed.apply_pool("chaos", cfg.heartbeat_timeout, 1).await?;
    let mut generation = 0;
    let mut operators: BTreeMap<String, Operator> = BTreeMap::new();
    for id in ["op-a", "op-b"] {
        operators.insert(id.into(), start_operator(&fed, cfg, id)?);
    }
    crate::federation::ensure_namespace(&fed.hub, NS).await?;

    // The faults, as a schedule from the first job.
    let mut agent_faults: Vec<(Duration, Duration, String, String)> = Vec::new();
    let kills = ((sim_nodes.len() as f64) * cfg.agent_kill_share).ceil() as usize;
    let mut order = sim_nodes.clone();
    for i in (1..order.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let span = cfg.faults_until.as_millis().max(1) as u64;
    for (member, node) in order.into_iter().take(kills) {
        let at = Duration::from_millis(2_000 + rng.below(span));
        let down = Duration::from_millis(5_000 + rng.below(20_000));
        agent_faults.push((at, at + down, member, node));
    }
    let down_member = names.last().cloned().unwrap_or_default();
    let mut summary = Summary {
        jobs: cfg.jobs,
        ..Summary::default()
    };

    eprintln!("[chaos] applying {} jobs", cfg.jobs);
    let real_every = if cfg.real_agents > 0 { 20 } else { usize::MAX };
    let mut yaml = String::new();
    for i in 0..cfg.jobs {
        yaml.push_str(&job_yaml(i, &mut rng, i % real_every == real_every - 1));
        yaml.push_str("---\n");
    }
    let started = Instant::now();
    manifests::apply_all(&fed.hub, &yaml, NS, false).await?;
    eprintln!("[chaos] applied in {:.1}s", started.elapsed().as_secs_f64());

    let mut seen: BTreeMap<Token, BTreeSet<(String, String)>> = BTreeMap::new();
    let jobs_api: Api<ComputeJob> = Api::namespaced(fed.hub.clone(), NS);
    let mut member_is_down = false;
    let mut member_done = false;
    let mut real_killed: Option<Instant> = None;
    let mut real_done = cfg.real_agents == 0;
    let mut next_operator_kill = cfg.operator_kill_every;
    let mut last_report = Instant::now();
    let final_jobs = loop {
        let t = started.elapsed();
        // Agents.
        for (at, until, member, node) in &agent_faults {
            let agents = &fed.agents[member];
            if t >= *at && t < *until {
                agents.kill(node);
            } else if t >= *until {
                agents.revive(node);
            }
        }
        summary.faults.0 = agent_faults.iter().filter(|f| t >= f.0).count();
        // A real agent: kill -9, back 10 s later.
        if !real_done && t >= cfg.faults_until / 2 {
            match real_killed {
                None => {
                    real[0].process.kill();
                    real_killed = Some(Instant::now());
                    summary.faults.1 += 1;
                }
                Some(k) if k.elapsed() >= Duration::from_secs(10) => {
                    real[0] = fed.agent(&cfg.agent_bin, &cfg.runner_bin, &agent_specs[0])?;
                    real_done = true;
                }
                _ => {}
            }
        }
        // A member's API server goes away.
        if !member_done && !member_is_down && t >= cfg.member_down_at {
            eprintln!(
                "[chaos] {down_member}: API server down for {:?}",
                cfg.member_down
            );
            fed.plane.kill_apiserver(&down_member)?;
            member_is_down = true;
            summary.faults.2 += 1;
        }
        if member_is_down && t >= cfg.member_down_at + cfg.member_down {
            fed.plane.restart_apiserver(&down_member).await?;
            eprintln!("[chaos] {down_member}: API server back");
            member_is_down = false;
            member_done = true;
        }
        // The leading operator is killed, and a fresh replica joins the race.
        if summary.faults.3 < cfg.operator_kills && t >= next_operator_kill {
            if let Some(holder) = leader(&fed.hub).await
                && let Some(mut op) = operators.remove(&holder)
            {
                op.kill();
                summary.faults.3 += 1;
                generation += 1;
                let id = format!("op-{generation}");
                eprintln!("[chaos] killed the leader {holder} (SIGKILL); {id} joins");
                operators.insert(id.clone(), start_operator(&fed, cfg, &id)?);
            }
            next_operator_kill = t + cfg.operator_kill_every;
        }
        // Attempt tokens in the members that answer.
        let down = member_is_down.then_some(down_member.as_str());
        let (tasks, failed) = all_tasks(&fed, down).await;
        summary.failed_listings += failed;
        record(&mut seen, tasks);
        // Jobs.
        let jobs = jobs_api.list(&ListParams::default()).await?.items;
        let finals = jobs
            .iter()
            .filter(|j| {
                matches!(
                    j.status.as_ref().and_then(|s| s.phase),
                    Some(JobPhase::Succeeded | JobPhase::Failed)
                )
            })
            .count();
        if last_report.elapsed() >= Duration::from_secs(15) {
            eprintln!(
                "[chaos] {:.0}s: {finals}/{} jobs final, {} attempt tokens seen",
                t.as_secs_f64(),
                jobs.len(),
                seen.len()
            );
            last_report = Instant::now();
        }
        let faults_over = member_done
            && real_done
            && summary.faults.3 >= cfg.operator_kills
            && agent_faults.iter().all(|f| t >= f.1);
        if (finals == jobs.len() && faults_over) || t > cfg.timeout {
            break jobs;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    };
    summary.run_time = started.elapsed();
    for (member, node) in &sim_nodes {
        fed.agents[member].revive(node);
    }
    if member_is_down {
        fed.plane.restart_apiserver(&down_member).await?;
    }
    // Every task still there (finished ones stay until their job is deleted), with every
    // member up.
    let (tasks, failed) = all_tasks(&fed, None).await;
    summary.failed_listings += failed;
    record(&mut seen, tasks);

    // Verdicts.
    let mut expected: BTreeSet<Token> = BTreeSet::new();
    let mut recorded: BTreeMap<(String, u32, u32), (u32, TaskPhase)> = BTreeMap::new();
    for j in &final_jobs {
        let uid = j.metadata.uid.clone().unwrap_or_default();
        let status = j.status.clone().unwrap_or_default();
        match status.phase {
            Some(JobPhase::Succeeded) => summary.succeeded += 1,
            Some(JobPhase::Failed) => {
                let reason = status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Failed")
                    .map(|c| c.reason.clone())
                    .unwrap_or_default();
                *summary.failed.entry(reason).or_default() += 1;
            }
            _ => {
                summary.not_final += 1;
                if summary.problems.len() < 10 {
                    summary.problems.push(format!(
                        "{} not final: {:?} {:?}",
                        j.metadata.name.clone().unwrap_or_default(),
                        status.phase,
                        status.shards
                    ));
                }
            }
        }
        for s in &status.shards {
            recorded.insert((uid.clone(), s.index, s.replica), (s.attempt, s.phase));
            let rejected = s.message.as_deref().is_some_and(|m| {
                m.starts_with("result outvoted") || m.starts_with("reveal rejected")
            });
            if status.phase == Some(JobPhase::Succeeded)
                && s.phase == TaskPhase::Succeeded
                && !rejected
            {
                expected.insert((uid.clone(), s.index, s.replica, s.attempt));
            }
        }
    }
    summary.accepted = expected.len();
    summary.attempts = seen.len();
    for (token, places) in &seen {
        if places.len() > 1 {
            summary.duplicate_attempts += 1;
            if summary.problems.len() < 20 {
                summary
                    .problems
                    .push(format!("attempt {token:?} in {places:?}"));
            }
        }
    }
    // Receipts written by now (the rest must come by the time the jobs are deleted).
    let uids: BTreeSet<String> = final_jobs
        .iter()
        .filter_map(|j| j.metadata.uid.clone())
        .collect();
    let kubeconfig = fed.plane.hub().kubeconfig.clone();
    summary.receipts_at_end_of_run = ledger::receipts_json(&cfg.plugin_bin, &kubeconfig, None)
        .iter()
        .filter(|r| r["forfeits"].is_null())
        .filter(|r| r["jobUid"].as_str().is_some_and(|u| uids.contains(u)))
        .count();
    for j in &final_jobs {
        if let Some(c) = j.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Paid" && c.status == "False")
        }) {
            eprintln!(
                "[chaos] {} not paid yet at the end of the run: {} {}",
                j.metadata.name.clone().unwrap_or_default(),
                c.reason,
                c.message
            );
        }
    }

    // Every job deleted: nothing may stay behind in any member.
    eprintln!("[chaos] deleting every job");
    jobs_api
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let left = jobs_api.list(&ListParams::default()).await?.items.len();
        summary.undeleted_jobs = left;
        if left == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Tasks of the run's jobs left in the members, once the sweeper had its turn.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<(String, String)> = all_tasks(&fed, None)
            .await
            .0
            .into_iter()
            .filter(|(_, t)| uids.contains(&t.spec.job.uid))
            .map(|(m, t)| (m, t.metadata.name.unwrap_or_default()))
            .collect();
        summary.orphaned_tasks = left.len();
        if left.is_empty() || Instant::now() > deadline {
            if !left.is_empty() {
                summary.problems.push(format!(
                    "left behind: {:?}",
                    left.iter().take(10).collect::<Vec<_>>()
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Receipts: a job's deletion settles what it earned before its tasks go, so every
    // accepted result is paid by now, once.
    let mut paid: BTreeMap<(String, u32, u32), Vec<u32>> = BTreeMap::new();
    let mut forfeited: Vec<String> = Vec::new();
    for r in ledger::receipts_json(&cfg.plugin_bin, &kubeconfig, None) {
        let Some(uid) = r["jobUid"].as_str().filter(|u| uids.contains(*u)) else {
            continue;
        };
        if let Some(of) = r["forfeits"].as_str() {
            // Nobody cheats in this run, but a node killed between its commitment and its
            // reveal is caught by design (it cannot be told from one backing out), and
            // its receipts in escrow are taken back: once each, and only receipts.
            summary.forfeits += 1;
            forfeited.push(of.to_string());
            continue;
        }
        let key = (
            uid.to_string(),
            r["shard"].as_u64().unwrap_or(u64::MAX) as u32,
            r["replica"].as_u64().unwrap_or(u64::MAX) as u32,
        );
        paid.entry(key)
            .or_default()
            .push(r["attempt"].as_u64().unwrap_or(u64::MAX) as u32);
        summary.receipts += 1;
    }
    forfeited.sort();
    for (i, of) in forfeited.iter().enumerate() {
        let once = i == 0 || forfeited[i - 1] != *of;
        // A receipt's key: "<job uid>/<shard>/<replica>".
        let mut parts = of.splitn(3, '/');
        let key = (|| {
            let uid = parts.next()?.to_string();
            Some((
                uid,
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
            ))
        })();
        let known = key.is_some_and(|k: (String, u32, u32)| paid.contains_key(&k));
        if !once || !known {
            summary.bad_forfeits += 1;
            summary
                .problems
                .push(format!("forfeit of {of}: twice or of no receipt"));
        }
    }
    for ((uid, shard, replica), attempts) in &paid {
        if attempts.len() > 1 {
            summary.duplicate_receipts += attempts.len() - 1;
            summary
                .problems
                .push(format!("{uid} {shard}/{replica} paid {attempts:?}"));
        }
        for a in attempts {
            let matches = recorded
                .get(&(uid.clone(), *shard, *replica))
                .is_some_and(|(attempt, phase)| attempt == a && *phase == TaskPhase::Succeeded);
            if !matches {
                summary.unexpected_receipts += 1;
                if summary.problems.len() < 30 {
                    summary.problems.push(format!(
                        "{uid} {shard}/{replica} attempt {a} paid, status says {:?}",
                        recorded.get(&(uid.clone(), *shard, *replica))
                    ));
                }
            }
        }
    }
    for (uid, shard, replica, attempt) in &expected {
        let has = paid
            .get(&(uid.clone(), *shard, *replica))
            .is_some_and(|a| a.contains(attempt));
        if !has {
            summary.missing_receipts += 1;
            if summary.problems.len() < 40 {
                summary.problems.push(format!(
                    "{uid} {shard}/{replica} attempt {attempt} accepted, not paid"
                ));
            }
        }
    }
    let verify = ledger::plugin(&cfg.plugin_bin, &kubeconfig, &["ledger", "verify"]);
    summary.ledger_verified = verify.code == Some(0);
    if !summary.ledger_verified {
        summary.problems.push(format!("ledger verify: {verify:?}"));
    }

    summary.wall = wall.elapsed();
    drop(real);
    drop(operators);
    Ok(summary)
}
