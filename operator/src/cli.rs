//! What `kubectl edgeloom` prints: pools and jobs at a glance, and one job in detail.
//! Pure formatting of objects already fetched.

use edgeloom_crds::compute_job::JobPhase;
use edgeloom_crds::{ComputeJob, EdgePool};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Event;
use kube::ResourceExt;
use std::fmt::Write;

fn age(t: Option<Timestamp>, now: Timestamp) -> String {
    let Some(t) = t else { return "-".into() };
    let s = (now.as_second() - t.as_second()).max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.first().map(Vec::len).unwrap_or(0))
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map(|s| s.chars().count()).unwrap_or(0))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn phase(p: Option<JobPhase>) -> String {
    p.map(|p| format!("{p:?}")).unwrap_or_else(|| "-".into())
}

/// `kubectl edgeloom status`.
pub fn status(pools: &[EdgePool], jobs: &[ComputeJob], now: Timestamp) -> String {
    let mut out = String::from("POOLS\n");
    let mut rows = vec![
        [
            "NAME", "CLUSTERS", "READY", "GPUS", "TFLOPS", "RECEIPTS", "AGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for p in pools {
        let s = p.status.clone().unwrap_or_default();
        let cap = s.capacity.clone().unwrap_or_default();
        rows.push(vec![
            p.name_any(),
            s.reachable.clone().unwrap_or_else(|| "-".into()),
            format!("{}/{}", cap.ready_nodes, cap.nodes),
            cap.gpus.to_string(),
            format!("{:.3}", cap.tflops),
            s.rewards.map(|r| r.receipts).unwrap_or(0).to_string(),
            age(p.metadata.creation_timestamp.as_ref().map(|t| t.0), now),
        ]);
    }
    out.push_str(&table(&rows));
    for p in pools {
        for c in p.status.clone().unwrap_or_default().clusters {
            let state = if c.reachable {
                "reachable".to_string()
            } else {
                format!("UNREACHABLE: {}", c.message.unwrap_or_default())
            };
            let _ = writeln!(
                out,
                "  {}/{}: {}, {}/{} nodes ready",
                p.name_any(),
                c.name,
                state,
                c.ready_nodes,
                c.nodes
            );
        }
    }
    out.push_str("\nJOBS\n");
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "PHASE",
            "PROGRESS",
            "PLACEMENT",
            "REWARDS",
            "AGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for j in jobs {
        let s = j.status.clone().unwrap_or_default();
        rows.push(vec![
            j.namespace().unwrap_or_default(),
            j.name_any(),
            phase(s.phase),
            s.progress.unwrap_or_else(|| "-".into()),
            s.placement.unwrap_or_else(|| "-".into()),
            s.rewards
                .and_then(|r| r.total)
                .unwrap_or_else(|| "-".into()),
            age(j.metadata.creation_timestamp.as_ref().map(|t| t.0), now),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

/// `kubectl edgeloom describe job NAME`.
pub fn describe_job(job: &ComputeJob, events: &[Event], now: Timestamp) -> String {
    let s = job.status.clone().unwrap_or_default();
    let spec = &job.spec;
    let mut out = String::new();
    let _ = writeln!(out, "Name:        {}", job.name_any());
    let _ = writeln!(out, "Namespace:   {}", job.namespace().unwrap_or_default());
    let _ = writeln!(
        out,
        "Workload:    {:?}, {} shard(s), priority {}, maxRetries {}",
        spec.workload.kind, spec.shards, spec.priority, spec.max_retries
    );
    let _ = writeln!(
        out,
        "Phase:       {}  ({})",
        phase(s.phase),
        s.progress.clone().unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "Placement:   {}",
        s.placement.clone().unwrap_or_else(|| "-".into())
    );
    if let Some(r) = &s.result {
        let _ = writeln!(out, "Result:      {}", r.digest.clone().unwrap_or_default());
        for (k, v) in &r.summary {
            let _ = writeln!(out, "  {k}: {v}");
        }
    }
    out.push_str("Conditions:\n");
    for c in &s.conditions {
        let _ = writeln!(
            out,
            "  {:<10} {:<6} {:<16} {}",
            c.type_, c.status, c.reason, c.message
        );
    }
    if let Some(f) = &s.federated {
        out.push_str(&federated_section(job, f));
        return out + &events_section(events, now);
    }
    out.push_str("Shards:\n");
    if !s.shard_pages.is_empty() {
        let slots: u32 = s.shard_pages.iter().map(|p| p.slots).sum();
        out.push_str(&format!(
            "  {slots} slots, kept in {} pages (ConfigMaps labelled edgeloom.io/job-uid in the operator's namespace); shown: {} not finished\n",
            s.shard_pages.len(),
            s.shards.len()
        ));
    }
    let mut rows = vec![
        [
            "SHARD", "REPLICA", "ATTEMPT", "CLUSTER", "NODE", "PHASE", "PROGRESS", "DIGEST",
            "MESSAGE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for sh in &s.shards {
        rows.push(vec![
            sh.index.to_string(),
            sh.replica.to_string(),
            sh.attempt.to_string(),
            if sh.cluster.is_empty() {
                "-".into()
            } else {
                sh.cluster.clone()
            },
            if sh.node.is_empty() {
                "-".into()
            } else {
                sh.node.clone()
            },
            format!("{:?}", sh.phase),
            format!("{}%", sh.progress),
            sh.result_digest
                .as_deref()
                .map(|d| d.chars().take(12).collect())
                .unwrap_or_else(|| "-".into()),
            sh.message.clone().unwrap_or_default(),
        ]);
    }
    for line in table(&rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    out + &events_section(events, now)
}

/// The rounds of a Federated job: where the current one stands, each kept round's
/// updates, accuracy and bytes moved, and the nodes whose updates were rejected.
fn federated_section(job: &ComputeJob, f: &edgeloom_crds::federated::FederatedStatus) -> String {
    let mut out = String::new();
    let fed = job.spec.workload.federation.clone().unwrap_or_default();
    let _ = writeln!(
        out,
        "Federation:  {:?}, hub every {} round(s), {:?}, {} round(s) of {} local epoch(s), audit rate {}",
        fed.topology,
        fed.hub_every,
        fed.aggregation,
        job.spec.workload.parameters.rounds,
        job.spec.workload.parameters.local_epochs,
        fed.audit_rate
    );
    let _ = writeln!(
        out,
        "Round:       {} ({}), {} completed; bytes kept in members {}, sent to the hub {}",
        f.round,
        f.stage
            .map(|s| format!("{s:?}"))
            .unwrap_or_else(|| "-".into()),
        f.completed_rounds,
        f.bytes_in_members,
        f.bytes_to_hub
    );
    if let Some(g) = &f.global_model {
        let _ = writeln!(
            out,
            "Model:       round {} {} (sha256 {})",
            g.round,
            g.key,
            g.sha256.chars().take(12).collect::<String>()
        );
    }
    if let Some(a) = f.final_accuracy {
        let _ = writeln!(
            out,
            "Accuracy:    {a:.4} (final model, participants' held-out rows)"
        );
    }
    out.push_str("Rounds:\n");
    let mut rows = vec![
        [
            "ROUND",
            "PARTICIPANTS",
            "ACCEPTED",
            "REJECTED",
            "MISSING",
            "HUB",
            "CLOSED",
            "ACCURACY",
            "LOSS",
            "IN-MEMBERS",
            "TO-HUB",
            "AUDITS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let num = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
    for r in &f.rounds {
        rows.push(vec![
            r.round.to_string(),
            r.participants.to_string(),
            r.accepted.to_string(),
            r.rejected.to_string(),
            r.missing.to_string(),
            if r.hub { "yes" } else { "no" }.into(),
            r.closed_by.clone(),
            num(r.accuracy),
            num(r.loss),
            r.bytes_in_members.to_string(),
            r.bytes_to_hub.to_string(),
            // Audited member aggregations, and how many of them failed.
            if r.audited == 0 {
                "-".into()
            } else {
                format!("{} ({} failed)", r.audited, r.audits_failed)
            },
        ]);
    }
    for line in table(&rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    if !f.participants.is_empty() {
        out.push_str("Participants (current round):\n");
        let mut rows = vec![
            ["INDEX", "MEMBER", "NODE", "STATE", "EXAMPLES", "REASON"]
                .map(String::from)
                .to_vec(),
        ];
        for p in &f.participants {
            rows.push(vec![
                p.index.to_string(),
                p.member.clone(),
                p.node.clone(),
                format!("{:?}", p.state),
                p.examples
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.reason.clone().unwrap_or_default(),
            ]);
        }
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    if !f.rejected_updates.is_empty() {
        out.push_str("Rejected updates by node:\n");
        for (node, n) in &f.rejected_updates {
            let _ = writeln!(out, "  {node}: {n}");
        }
    }
    out
}

fn events_section(events: &[Event], now: Timestamp) -> String {
    let mut out = String::new();
    out.push_str("Events:\n");
    let mut evs: Vec<&Event> = events.iter().collect();
    evs.sort_by_key(|e| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.last_timestamp.as_ref().map(|t| t.0))
    });
    for e in evs {
        let when = e
            .event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.last_timestamp.as_ref().map(|t| t.0));
        let _ = writeln!(
            out,
            "  {:<5} {:<8} {:<14} {}",
            age(when, now),
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            e.message.clone().unwrap_or_default()
        );
    }
    out
}

/// `kubectl edgeloom ledger balance` for one pool: totals per account, largest first.
pub fn ledger_balance(pool: &str, unit: &str, entries: &[crate::rewards::ledger::Entry]) -> String {
    use crate::decimal::Amount;
    let mut by: std::collections::BTreeMap<&str, (Amount, u64)> = Default::default();
    let mut total = Amount::ZERO;
    let mut receipts = 0;
    for e in entries {
        let amount: Amount = e.receipt.amount.parse().unwrap_or_default();
        let a = by.entry(e.receipt.account.as_str()).or_default();
        if e.receipt.forfeits.is_some() {
            // Taken back: its node was caught while the receipt was in escrow.
            a.0 = a.0.saturating_sub(amount);
            total = total.saturating_sub(amount);
            continue;
        }
        a.0 = a.0.checked_add(amount).unwrap_or(a.0);
        a.1 += 1;
        receipts += 1;
        total = total.checked_add(amount).unwrap_or(total);
    }
    let mut accounts: Vec<_> = by.into_iter().collect();
    accounts.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
    let mut rows = vec![["ACCOUNT", "AMOUNT", "RECEIPTS"].map(String::from).to_vec()];
    for (account, (amount, n)) in accounts {
        rows.push(vec![
            account.to_string(),
            format!("{amount} {unit}").trim_end().to_string(),
            n.to_string(),
        ]);
    }
    rows.push(vec![
        "TOTAL".into(),
        format!("{total} {unit}").trim_end().to_string(),
        receipts.to_string(),
    ]);
    format!("pool {pool}\n{}", table(&rows))
}

/// `kubectl edgeloom ledger trust` for one pool.
pub fn trust_table(
    pool: &str,
    threshold: u32,
    quarantine_after: u32,
    rep: &crate::rewards::trust::Reputation,
) -> String {
    let mut rows = vec![
        [
            "NODE",
            "VERIFIED",
            "STREAK",
            "CAUGHT",
            "NEEDED",
            "TRUSTED",
            "QUARANTINED",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (node, r) in &rep.nodes {
        rows.push(vec![
            node.clone(),
            r.valid.to_string(),
            r.streak.to_string(),
            r.caught.to_string(),
            r.needed(threshold).to_string(),
            if r.trusted(threshold) { "yes" } else { "no" }.into(),
            if quarantine_after > 0 && r.caught >= quarantine_after as u64 {
                "yes"
            } else {
                "no"
            }
            .into(),
        ]);
    }
    format!(
        "pool {pool} (trustThreshold {threshold}, quarantineAfter {quarantine_after})\n{}",
        table(&rows)
    )
}

/// A receipt's inclusion proof, as `kubectl edgeloom ledger prove` prints it: everything a
/// contributor needs to check it offline (`ledger check-proof`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptProof {
    /// The ledger entry (sequence number, previous hash, receipt, hash).
    pub entry: crate::rewards::ledger::Entry,
    /// Sibling hashes from the leaf up (hex).
    pub proof: Vec<String>,
    /// The signed checkpoint the proof leads to.
    pub checkpoint: crate::rewards::merkle::Checkpoint,
}

/// The proof of the receipt with key `key` ("JOB_UID/SHARD/REPLICA") against `cp`.
pub fn prove(
    entries: &[crate::rewards::ledger::Entry],
    cp: &crate::rewards::merkle::Checkpoint,
    key: &str,
) -> Result<ReceiptProof, String> {
    let index = entries
        .iter()
        .position(|e| e.receipt.key() == key)
        .ok_or_else(|| format!("pool {}: no receipt {key}", cp.pool))?;
    if index as u64 >= cp.size {
        return Err(format!(
            "receipt {key} (entry {index}) is newer than the pool's checkpoint of {} entries; ask again in a few seconds",
            cp.size
        ));
    }
    let hashes: Vec<String> = entries
        .iter()
        .take(cp.size as usize)
        .map(|e| e.hash.clone())
        .collect();
    Ok(ReceiptProof {
        entry: entries[index].clone(),
        proof: crate::rewards::merkle::inclusion_proof(&hashes, index),
        checkpoint: cp.clone(),
    })
}

/// Checks a proof offline: the entry's hash from its contents, its inclusion in the
/// checkpoint's tree, and the checkpoint's signature (by `trusted_key` when given).
pub fn check_proof(p: &ReceiptProof, trusted_key: Option<&str>) -> Result<String, String> {
    let e = &p.entry;
    let hash = crate::rewards::ledger::entry_hash(e.seq, &e.prev, &e.receipt);
    if hash != e.hash {
        return Err(format!(
            "entry {} does not hash to {} (its contents were altered)",
            e.seq, e.hash
        ));
    }
    let cp = &p.checkpoint;
    crate::rewards::merkle::verify_inclusion(&e.hash, e.seq, cp.size, &cp.root_hash()?, &p.proof)?;
    cp.verify(trusted_key)?;
    Ok(format!(
        "valid: receipt {} ({} {} to {}) is entry {} of pool {}'s ledger, covered by the checkpoint of {} entries signed {} by key {}{}",
        e.receipt.key(),
        e.receipt.amount,
        "paid",
        e.receipt.account,
        e.seq,
        cp.pool,
        cp.size,
        cp.time,
        cp.public_key,
        if trusted_key.is_some() {
            " (the trusted key)"
        } else {
            " (pass --public-key to pin the operator's key)"
        }
    ))
}
