//! Commit–reveal for replicated results (docs/ARCHITECTURE.md, "Verification").
//!
//! Agents can read every ComputeTask of their cluster, so a replica that reported its
//! result in the open could be copied by the other replicas of its shard. With
//! commit–reveal each replica first publishes only `commitment(nonce, digest, vector,
//! salt)`: the task's own nonce (from its spec, so a commitment cannot be reused for
//! another task), the result, and a secret salt of the agent's (so a result drawn from a
//! small set cannot be guessed from the commitment). The operator asks for the reveals
//! (the [`REVEAL_ANNOTATION`] on each task) only once every replica of the shard has
//! committed, and rejects a reveal that does not open its commitment. A copier must commit
//! before it can see anything.
//!
//! Who writes what: the operator writes the nonce (spec, immutable) and the reveal
//! request (an annotation; agents can change only a task's status); the agent writes the
//! commitment, then the result and the salt (status).

use sha2::{Digest, Sha256};

/// Annotation the operator sets on a committed ComputeTask to ask for its reveal; its
/// value is when it asked (RFC 3339), the start of the reveal deadline.
pub const REVEAL_ANNOTATION: &str = "edgeloom.io/reveal";
/// Seconds a replica has to reveal once asked; past it, it is caught as withholding.
pub const REVEAL_DEADLINE_SECONDS: i64 = 60;

/// The nonce of a task: unique per (job, shard, replica, attempt), so that two tasks never
/// share one. It need not be secret: the agent's salt is what hides the result.
pub fn nonce(job_uid: &str, shard: u32, replica: u32, attempt: u32) -> String {
    let mut h = Sha256::new();
    h.update(b"edgeloom-nonce-v1\n");
    h.update(format!("{job_uid}/{shard}/{replica}/{attempt}").as_bytes());
    hex(&h.finalize())
}

/// The commitment to a result: sha256 over the nonce, the digest, the result vector (the
/// exact bits of each element) and the salt, each part delimited.
pub fn commitment(nonce: &str, digest: &str, vector: &[f64], salt: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"edgeloom-commit-v1\n");
    h.update(nonce.as_bytes());
    h.update(b"\n");
    h.update(digest.as_bytes());
    h.update(b"\n");
    h.update((vector.len() as u64).to_le_bytes());
    for x in vector {
        h.update(x.to_bits().to_le_bytes());
    }
    h.update(b"\n");
    h.update(salt.as_bytes());
    hex(&h.finalize())
}

/// Whether a revealed result (digest, vector, salt) opens `commitment` for `nonce`.
pub fn opens(commitment_hex: &str, nonce: &str, digest: &str, vector: &[f64], salt: &str) -> bool {
    // Comparing public values: no need for a constant-time comparison.
    commitment(nonce, digest, vector, salt) == commitment_hex
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commitment_opens_only_with_its_own_result_salt_and_nonce() {
        let n = nonce("uid", 0, 1, 1);
        assert_eq!(n.len(), 64);
        assert_ne!(n, nonce("uid", 0, 0, 1), "replicas get different nonces");
        assert_ne!(n, nonce("uid", 0, 1, 2), "attempts get different nonces");
        let c = commitment(&n, "aa", &[0.5, 1.0], "salt");
        assert!(opens(&c, &n, "aa", &[0.5, 1.0], "salt"));
        assert!(!opens(&c, &n, "ab", &[0.5, 1.0], "salt"), "other digest");
        assert!(
            !opens(&c, &n, "aa", &[0.5, 1.000_000_1], "salt"),
            "other vector"
        );
        assert!(!opens(&c, &n, "aa", &[0.5], "salt"), "shorter vector");
        assert!(!opens(&c, &n, "aa", &[0.5, 1.0], "other"), "other salt");
        let other_task = nonce("uid", 0, 0, 1);
        assert!(
            !opens(&c, &other_task, "aa", &[0.5, 1.0], "salt"),
            "a commitment copied from another replica does not open for this one"
        );
    }

    #[test]
    fn vector_bits_survive_json_as_the_api_server_stores_them() {
        let v = vec![0.1, 1.0, -0.0, 1e-300, 123_456_789.0, f64::MAX];
        let back: Vec<f64> =
            serde_json::from_str(&serde_json::to_string(&v).expect("json")).expect("parse");
        assert_eq!(
            commitment("n", "d", &v, "s"),
            commitment("n", "d", &back, "s")
        );
    }
}
