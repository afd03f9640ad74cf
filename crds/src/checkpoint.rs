//! The signed ledger checkpoint statement (docs/ARCHITECTURE.md, "Rewards"), shared by the
//! operator (which signs it) and the agent (which keeps it as the contributor's evidence
//! only when the signature holds, by the key it first saw).

use ed25519_dalek::{Signature, Verifier, VerifyingKey};

/// What the operator signs: pool `pool`'s ledger had `size` entries with RFC 6962 tree
/// head `root` (hex) at `time` (RFC 3339).
pub fn message(pool: &str, size: u64, root: &str, time: &str) -> String {
    format!("edgeloom ledger checkpoint v1\npool {pool}\nsize {size}\nroot {root}\ntime {time}\n")
}

/// Checks `signature` (hex) over [`message`] by `public_key` (hex); with `trusted_key`,
/// the key must also be that one.
pub fn verify(
    pool: &str,
    size: u64,
    root: &str,
    time: &str,
    public_key: &str,
    signature: &str,
    trusted_key: Option<&str>,
) -> Result<(), String> {
    if let Some(k) = trusted_key.filter(|k| *k != public_key) {
        return Err(format!(
            "signed by key {public_key}, not the trusted key {k}"
        ));
    }
    let key: [u8; 32] = decode(public_key)
        .ok_or_else(|| format!("public key {public_key:?} is not 32 bytes of hex"))?;
    let key = VerifyingKey::from_bytes(&key).map_err(|e| format!("public key: {e}"))?;
    let sig: [u8; 64] = decode(signature).ok_or("the signature is not 64 bytes of hex")?;
    key.verify(
        message(pool, size, root, time).as_bytes(),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| "the signature does not match the checkpoint (altered or forged)".to_string())
}

fn decode<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}
