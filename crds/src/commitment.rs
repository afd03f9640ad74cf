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

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Annotation the operator sets on a committed ComputeTask to ask for its reveal; its
/// value is when it asked (RFC 3339), the start of the reveal deadline.
pub const REVEAL_ANNOTATION: &str = "edgeloom.io/reveal";
/// Seconds a replica has to reveal once asked; past it, it is caught as withholding.
pub const REVEAL_DEADLINE_SECONDS: i64 = 60;

/// A revealed result: what opens the commitment, and the metrics withheld with it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Reveal {
    /// Result digest.
    pub digest: String,
    /// Result vector.
    pub vector: Vec<f64>,
    /// Workload metrics (withheld too: a result vector may be made of them).
    pub metrics: BTreeMap<String, f64>,
    /// Summary values.
    pub summary: BTreeMap<String, String>,
    /// The secret salt of the commitment (64 hex).
    pub salt: String,
}

/// Key of the operator's reveal public key (hex) in the member ConfigMap
/// `edgeloom-ledger-checkpoints`.
pub const REVEAL_KEY_FIELD: &str = "reveal-public-key";

/// Seals a reveal for the operator (a libsodium sealed box to its X25519 public key, hex):
/// other agents, which can read every task of the cluster, cannot read it, so a replica
/// placed after the reveals (a tie-breaker, a retry) has nothing to copy.
pub fn seal(operator_public_key: &str, reveal: &Reveal) -> Result<String, String> {
    let key: [u8; 32] = unhex(operator_public_key)
        .and_then(|b| b.try_into().ok())
        .ok_or("the operator's reveal key is not 32 bytes of hex")?;
    let plain = serde_json::to_vec(reveal).map_err(|e| e.to_string())?;
    crypto_box::PublicKey::from_bytes(key)
        .seal(&mut crypto_box::aead::OsRng, &plain)
        .map(|c| hex(&c))
        .map_err(|_| "sealing the reveal failed".to_string())
}

/// Opens a sealed reveal with the operator's X25519 secret key.
pub fn open(secret: &crypto_box::SecretKey, sealed: &str) -> Result<Reveal, String> {
    let bytes = unhex(sealed).ok_or("the sealed reveal is not hex")?;
    let plain = secret
        .unseal(&bytes)
        .map_err(|_| "the sealed reveal does not open with the operator's key".to_string())?;
    serde_json::from_slice(&plain).map_err(|e| format!("the sealed reveal is malformed: {e}"))
}

/// Seals `plain` to an X25519 public key (hex): a libsodium sealed box, hex. Only the
/// holder of the secret key opens it.
pub fn seal_to(public_key: &str, plain: &[u8]) -> Result<String, String> {
    let key: [u8; 32] = unhex(public_key)
        .and_then(|b| b.try_into().ok())
        .ok_or("the public key is not 32 bytes of hex")?;
    crypto_box::PublicKey::from_bytes(key)
        .seal(&mut crypto_box::aead::OsRng, plain)
        .map(|c| hex(&c))
        .map_err(|_| "sealing failed".to_string())
}

/// Opens what [`seal_to`] sealed, with the secret key.
pub fn open_sealed(secret: &crypto_box::SecretKey, sealed: &str) -> Result<Vec<u8>, String> {
    let bytes = unhex(sealed).ok_or("the sealed box is not hex")?;
    secret
        .unseal(&bytes)
        .map_err(|_| "the sealed box does not open with this key".to_string())
}

/// The public key (hex) of a secret key.
pub fn public_hex(secret: &crypto_box::SecretKey) -> String {
    hex(secret.public_key().as_bytes())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

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
    fn what_is_sealed_to_a_node_opens_only_with_that_nodes_key() {
        let node = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        let other = crypto_box::SecretKey::generate(&mut crypto_box::aead::OsRng);
        let plain = br#"{"output":"http://store/bucket/update?X-Amz-Signature=abc"}"#;
        let sealed = seal_to(&public_hex(&node), plain).expect("sealed");
        assert!(!sealed.contains("http") && !sealed.contains(&hex(b"http")));
        assert_eq!(open_sealed(&node, &sealed).expect("opens"), plain.to_vec());
        assert!(
            open_sealed(&other, &sealed).is_err(),
            "another node's key does not open it"
        );
        assert!(seal_to("not hex", plain).is_err());
    }

    #[test]
    fn a_sealed_reveal_opens_only_with_the_operators_key() {
        let operator = crypto_box::SecretKey::from_bytes([5; 32]);
        let public = hex(operator.public_key().as_bytes());
        let r = Reveal {
            digest: "aa".into(),
            vector: vec![0.5],
            metrics: BTreeMap::from([("accuracy".into(), 0.9)]),
            summary: BTreeMap::new(),
            salt: "ss".into(),
        };
        let sealed = seal(&public, &r).expect("sealed");
        assert!(!sealed.contains(&hex(b"aa")), "nothing readable");
        assert_eq!(open(&operator, &sealed), Ok(r.clone()));
        let other = crypto_box::SecretKey::from_bytes([6; 32]);
        assert!(open(&other, &sealed).is_err());
        assert_ne!(
            seal(&public, &r).expect("sealed"),
            sealed,
            "a fresh box each time"
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
