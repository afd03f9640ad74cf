//! Final statuses not reported yet (docs/ARCHITECTURE.md, "Failure model"). A task's final
//! status is written here before it is sent, and removed once the API server took it, or
//! refused it for good, or the task is gone. An agent that could not reach its API server
//! when a task finished, or that restarted since, sends what is here once the server
//! answers; the operator decides by the attempt number (the fencing token) whether the
//! result still counts.

use edgeloom_crds::compute_task::ComputeTaskStatus;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A final status waiting to be reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The ComputeTask's name.
    pub task: String,
    /// Its UID: a task of the same name that is another object is not this one.
    pub uid: String,
    /// The status to report.
    pub status: ComputeTaskStatus,
}

fn path(dir: &Path, task: &str) -> PathBuf {
    dir.join(format!("{task}.json"))
}

/// Keeps `p` (written to a temporary file, then renamed, so a crash leaves the old file
/// or the new one, never half of one).
pub fn save(dir: &Path, p: &Pending) -> Result<(), std::io::Error> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", p.task));
    std::fs::write(&tmp, serde_json::to_vec(p).map_err(std::io::Error::other)?)?;
    std::fs::rename(tmp, path(dir, &p.task))
}

/// Forgets the pending status of `task`.
pub fn remove(dir: &Path, task: &str) {
    let _ = std::fs::remove_file(path(dir, task));
}

/// Whether a status of `task` is waiting.
pub fn holds(dir: &Path, task: &str) -> bool {
    path(dir, task).is_file()
}

/// Every pending status, oldest task name first; a file that does not parse is dropped.
pub fn all(dir: &Path) -> Vec<Pending> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Pending> = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&p)
            .ok()
            .and_then(|b| serde_json::from_slice::<Pending>(&b).ok())
        {
            Some(pending) => out.push(pending),
            None => {
                tracing::warn!(file = %p.display(), "dropping an unreadable pending status");
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    out.sort_by(|a, b| a.task.cmp(&b.task));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloom_crds::TaskPhase;

    #[test]
    fn a_pending_status_survives_a_restart_until_removed() {
        let dir = std::env::temp_dir().join(format!("edgeloom-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(all(&dir).is_empty(), "no directory yet: nothing pending");
        let p = Pending {
            task: "abc-0-0-1".into(),
            uid: "u-1".into(),
            status: ComputeTaskStatus {
                phase: Some(TaskPhase::Succeeded),
                result_digest: Some("ab".repeat(32)),
                progress: 100,
                ..Default::default()
            },
        };
        save(&dir, &p).expect("save");
        std::fs::write(dir.join("broken.json"), b"{not json").expect("write");
        assert!(holds(&dir, "abc-0-0-1"));
        assert_eq!(
            all(&dir),
            std::slice::from_ref(&p),
            "the broken file is dropped"
        );
        assert!(!dir.join("broken.json").exists());
        remove(&dir, "abc-0-0-1");
        assert!(!holds(&dir, "abc-0-0-1"));
        assert!(all(&dir).is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
