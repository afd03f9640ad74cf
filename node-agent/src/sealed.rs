//! Results sealed by a commitment (docs/ARCHITECTURE.md, "Verification"): kept in the
//! agent's work directory between the commitment and the operator's request to reveal, so
//! that an agent restarted in between can still reveal.

use std::path::{Path, PathBuf};

/// A finished task's result, not yet revealed.
pub type Sealed = edgeloom_crds::commitment::Reveal;

/// A new random salt: 32 bytes from the operating system, as hex.
pub fn salt() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn path(dir: &Path, task: &str) -> PathBuf {
    dir.join(format!("{task}.json"))
}

/// Stores `sealed` for task `task` (written to a temporary file, then renamed).
pub fn save(sealed: &Sealed, dir: &Path, task: &str) -> Result<(), std::io::Error> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{task}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(sealed).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, path(dir, task))
}

/// The stored result of `task`, if any.
pub fn load(dir: &Path, task: &str) -> Option<Sealed> {
    let bytes = std::fs::read(path(dir, task)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Forgets the stored result of `task` (after its reveal, or when the task is gone).
pub fn remove(dir: &Path, task: &str) {
    let _ = std::fs::remove_file(path(dir, task));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_sealed_result_survives_a_restart_until_removed() {
        let dir = std::env::temp_dir().join(format!("edgeloom-sealed-{}", std::process::id()));
        let s = Sealed {
            digest: "ab".repeat(32),
            vector: vec![0.25, 1e-9],
            metrics: BTreeMap::from([("accuracy".into(), 0.97)]),
            summary: BTreeMap::new(),
            salt: salt().expect("salt"),
        };
        assert_eq!(s.salt.len(), 64);
        assert_ne!(s.salt, salt().expect("salt"), "salts are random");
        save(&s, &dir, "t-0-0-1").expect("save");
        assert_eq!(load(&dir, "t-0-0-1"), Some(s));
        remove(&dir, "t-0-0-1");
        assert_eq!(load(&dir, "t-0-0-1"), None);
        let _ = std::fs::remove_dir_all(dir);
    }
}
