//! Runs one task's edgeloom-runner: spec on stdin, JSON lines from stdout, a wall-clock
//! limit, a memory limit (resident set, polled), cancellation, and usage accounting. A
//! runner that crashes, is killed or prints garbage fails the task; the agent carries on.

use edgeloom_crds::compute_task::Usage;
use edgeloom_crds::runner_protocol::{Line, Spec};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

/// How a task ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A result.
    Succeeded {
        /// sha256 of the canonical result.
        digest: String,
        /// Metrics.
        metrics: BTreeMap<String, f64>,
        /// Summary values.
        summary: BTreeMap<String, String>,
        /// Result vector.
        vector: Vec<f64>,
    },
    /// No result, and why.
    Failed(String),
    /// Stopped on request (task deleted or superseded, or agent shutting down).
    Cancelled(String),
}

/// Limits the agent enforces.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Wall clock.
    pub timeout: Option<Duration>,
    /// Resident memory, MiB.
    pub memory_mib: Option<u64>,
}

/// The outcome and what it used.
#[derive(Debug, Clone)]
pub struct Execution {
    /// How it ended.
    pub outcome: Outcome,
    /// Resources used.
    pub usage: Usage,
    /// Whether it ran on a GPU.
    pub gpu: bool,
}

fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    // (cpu ticks, resident pages)
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let rss = fields.get(21)?.parse::<u64>().ok()?;
    Some((ticks, rss))
}

/// The CPU ticks of child `pid` once it has exited, read before it is reaped (waitid with
/// WNOWAIT leaves it a zombie, whose /proc stat still holds its times); waits at most 5 s.
async fn exit_ticks(pid: u32) -> Option<u64> {
    let waited = tokio::task::spawn_blocking(move || {
        // SAFETY: waitid on our own child with WNOWAIT only observes its exit; the
        // siginfo is a plain struct written by the kernel.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            ) == 0
        }
    });
    match tokio::time::timeout(Duration::from_secs(5), waited).await {
        Ok(Ok(true)) => proc_stat(pid).map(|(t, _)| t),
        _ => None,
    }
}

/// Runs `runner` with `spec`; `progress` is called with each progress line; a `true` on
/// `cancel` stops it.
pub async fn execute(
    runner: &Path,
    spec: &Spec,
    limits: &Limits,
    log: &Path,
    mut progress: impl FnMut(u8, Option<String>),
    mut cancel: watch::Receiver<Option<String>>,
) -> Execution {
    let started = Instant::now();
    let mut usage = Usage::default();
    let stderr = match std::fs::File::create(log) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    };
    let mut cmd = tokio::process::Command::new(runner);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; the runner dies with the agent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Execution {
                outcome: Outcome::Failed(format!("cannot start {}: {e}", runner.display())),
                usage,
                gpu: false,
            };
        }
    };
    let pid = child.id().unwrap_or_default();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin
            .write_all(&serde_json::to_vec(spec).unwrap_or_default())
            .await;
    }
    let Some(stdout) = child.stdout.take() else {
        return Execution {
            outcome: Outcome::Failed("runner has no stdout".into()),
            usage,
            gpu: false,
        };
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut result: Option<Outcome> = None;
    let mut error: Option<String> = None;
    let mut stop: Option<Outcome> = None;
    let mut gpu = false;
    let mut ticks = 0u64;
    let mut final_ticks: Option<u64> = None;
    let mut reported_cpu = 0u64;
    let page_mib = 4096.0 / (1024.0 * 1024.0);
    let deadline = limits.timeout.map(|t| started + t);
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut stdout_open = true;
    let mut cancel_open = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdout_open => match line {
                Ok(Some(text)) => match serde_json::from_str::<Line>(&text) {
                    Ok(Line::Info { device, .. }) => gpu = device.starts_with("Cuda"),
                    Ok(Line::Progress { progress: p, message }) => progress(p.min(100), message),
                    Ok(Line::Result { digest, metrics, summary, vector }) => result = Some(Outcome::Succeeded { digest, metrics, summary, vector }),
                    Ok(Line::Error { message }) => error = Some(message),
                    Ok(Line::Usage { cpu_millis }) => reported_cpu = cpu_millis,
                    Err(_) => tracing::debug!(line = %text, "ignoring a non-protocol line from the runner"),
                },
                Ok(None) | Err(_) => {
                    stdout_open = false;
                    // The runner's CPU time as it exits: sampled every 250 ms, a short
                    // run would otherwise report (and be paid for) none.
                    final_ticks = exit_ticks(pid).await;
                }
            },
            status = child.wait(), if !stdout_open => {
                usage.wall_millis = started.elapsed().as_millis() as u64;
                if let Some(t) = final_ticks.take() {
                    ticks = ticks.max(t);
                }
                // SAFETY: sysconf(_SC_CLK_TCK) has no preconditions.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
                // What the agent sampled, or what the runner says it used as it ended,
                // whichever is more (a run between two samples, or reaped before its
                // zombie was read, would otherwise claim none).
                usage.cpu_core_millis = (ticks * 1000 / hz).max(reported_cpu);
                if gpu {
                    usage.gpu_millis = usage.wall_millis;
                }
                let outcome = match (stop, status) {
                    (Some(s), _) => s,
                    (None, Ok(st)) if st.success() => result.unwrap_or_else(|| Outcome::Failed("runner exited without a result".into())),
                    (None, Ok(st)) => Outcome::Failed(match (error, st.code()) {
                        (Some(e), _) => e,
                        (None, Some(code)) => format!("runner exited with code {code}"),
                        (None, None) => {
                            use std::os::unix::process::ExitStatusExt;
                            format!("runner killed by signal {}", st.signal().unwrap_or(0))
                        }
                    }),
                    (None, Err(e)) => Outcome::Failed(format!("waiting for the runner: {e}")),
                };
                return Execution { outcome, usage, gpu };
            },
            _ = poll.tick() => {
                if let Some((t, rss)) = proc_stat(pid) {
                    ticks = t;
                    let used = (rss as f64 * page_mib) as u64;
                    if let Some(limit) = limits.memory_mib
                        && used > limit && stop.is_none()
                    {
                        stop = Some(Outcome::Failed(format!("out of memory: the runner used {used} MiB, the limit is {limit} MiB")));
                        let _ = child.start_kill();
                    }
                }
                if let Some(d) = deadline
                    && Instant::now() > d && stop.is_none()
                {
                    stop = Some(Outcome::Failed(format!("timed out after {}s", limits.timeout.map(|t| t.as_secs()).unwrap_or(0))));
                    let _ = child.start_kill();
                }
            },
            changed = cancel.changed(), if cancel_open => {
                cancel_open = changed.is_ok();
                if cancel_open
                    && let Some(why) = cancel.borrow().clone()
                    && stop.is_none()
                {
                    stop = Some(Outcome::Cancelled(why));
                    let _ = child.start_kill();
                }
            },
        }
    }
}
