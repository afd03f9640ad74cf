//! The ledger as a Merkle log in the shape of Certificate Transparency (RFC 6962/9162) with
//! ed25519-signed checkpoints (docs/ARCHITECTURE.md, "Rewards"). Pure.
//!
//! The leaves are the hash-chain entries of a pool's ledger, in order; a leaf's data is the
//! entry's chain hash (which commits to its sequence number, the previous entry and the
//! receipt). The operator keeps only the tree's frontier (one hash per perfect subtree, so
//! O(log n) memory) to compute the root, and signs checkpoints (pool, size, root, time)
//! with its ed25519 key. Anyone holding a checkpoint can later check that the ledger still
//! starts with exactly the entries it covered: a truncated or rewritten history no longer
//! hashes to the signed root. Inclusion proofs (built with `ct-merkle` from the exported
//! entries) let a contributor check one receipt against a checkpoint, offline.

use ct_merkle::RootHash;
use ct_merkle::mem_backed_tree::MemoryBackedTree;
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A hash of the tree.
pub type Hash = [u8; 32];

/// RFC 6962 leaf hash of a chain entry's hash (hex).
pub fn leaf_hash(entry_hash: &str) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(entry_hash.as_bytes());
    h.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The right edge of a Merkle tree: the roots of its perfect subtrees, largest first.
/// Enough to append leaves and compute the root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    peaks: Vec<Hash>,
}

impl Frontier {
    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The roots of the perfect subtrees, largest first.
    pub fn peaks(&self) -> &[Hash] {
        &self.peaks
    }

    /// A frontier from its size and peaks (as [`Frontier::peaks`] gave them).
    pub fn from_parts(size: u64, peaks: Vec<Hash>) -> Result<Frontier, String> {
        if peaks.len() != size.count_ones() as usize {
            return Err(format!(
                "a tree of {size} leaves has {} peaks, not {}",
                size.count_ones(),
                peaks.len()
            ));
        }
        Ok(Frontier { size, peaks })
    }

    /// Appends a leaf (its RFC 6962 leaf hash).
    pub fn push(&mut self, leaf: Hash) {
        let mut carry = leaf;
        let mut n = self.size;
        // Merge equal-sized perfect subtrees, as binary addition carries.
        while n & 1 == 1 {
            let left = self.peaks.pop().unwrap_or([0; 32]);
            carry = node_hash(&left, &carry);
            n >>= 1;
        }
        self.peaks.push(carry);
        self.size += 1;
    }

    /// The RFC 6962 tree head: sha256 of nothing for an empty tree.
    pub fn root(&self) -> Hash {
        let mut it = self.peaks.iter().rev();
        match it.next() {
            None => Sha256::digest([]).into(),
            Some(last) => it.fold(*last, |acc, left| node_hash(left, &acc)),
        }
    }
}

/// The root of the first `size` of `entry_hashes`.
pub fn root_of(entry_hashes: &[String], size: usize) -> Hash {
    let mut f = Frontier::default();
    for h in entry_hashes.iter().take(size) {
        f.push(leaf_hash(h));
    }
    f.root()
}

/// An inclusion proof for leaf `index` of the tree of all `entry_hashes` (hex hashes).
pub fn inclusion_proof(entry_hashes: &[String], index: usize) -> Vec<String> {
    let mut tree: MemoryBackedTree<Sha256, Vec<u8>> = MemoryBackedTree::new();
    for h in entry_hashes {
        tree.push(h.as_bytes().to_vec());
    }
    tree.prove_inclusion(index)
        .as_bytes()
        .chunks(32)
        .map(hex::encode)
        .collect()
}

/// Checks an inclusion proof of `entry_hash` at `index` against a tree of `size` leaves
/// with root `root`.
pub fn verify_inclusion(
    entry_hash: &str,
    index: u64,
    size: u64,
    root: &Hash,
    proof: &[String],
) -> Result<(), String> {
    let mut bytes = Vec::new();
    for p in proof {
        bytes.extend(hex::decode(p).map_err(|e| format!("proof hash {p:?}: {e}"))?);
    }
    let proof = ct_merkle::InclusionProof::<Sha256>::try_from_bytes(bytes)
        .map_err(|e| format!("malformed proof: {e}"))?;
    RootHash::<Sha256>::new((*root).into(), size)
        .verify_inclusion(&entry_hash.as_bytes().to_vec(), index, &proof)
        .map_err(|e| format!("the proof does not lead to the checkpoint's root: {e}"))
}

/// A signed statement of the operator: pool `pool`'s ledger had `size` entries with tree
/// head `root` at `time`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// The pool.
    pub pool: String,
    /// Entries covered.
    pub size: u64,
    /// RFC 6962 tree head (hex).
    pub root: String,
    /// When it was signed (RFC 3339).
    pub time: String,
    /// The operator's ed25519 public key (hex).
    pub public_key: String,
    /// ed25519 signature (hex) over [`Checkpoint::message`].
    pub signature: String,
}

impl Checkpoint {
    /// What is signed.
    pub fn message(pool: &str, size: u64, root: &str, time: &str) -> String {
        edgeloom_crds::checkpoint::message(pool, size, root, time)
    }

    /// Signs a checkpoint.
    pub fn sign(key: &SigningKey, pool: &str, size: u64, root: &Hash, time: &str) -> Checkpoint {
        let root = hex::encode(root);
        let signature = key.sign(Self::message(pool, size, &root, time).as_bytes());
        Checkpoint {
            pool: pool.to_string(),
            size,
            root,
            time: time.to_string(),
            public_key: hex::encode(key.verifying_key().to_bytes()),
            signature: hex::encode(signature.to_bytes()),
        }
    }

    /// Checks the signature, with `trusted_key` (hex) when given, else the key the
    /// checkpoint names (which proves only that it was not altered since it was signed).
    pub fn verify(&self, trusted_key: Option<&str>) -> Result<(), String> {
        edgeloom_crds::checkpoint::verify(
            &self.pool,
            self.size,
            &self.root,
            &self.time,
            &self.public_key,
            &self.signature,
            trusted_key,
        )
    }

    /// The root as bytes.
    pub fn root_hash(&self) -> Result<Hash, String> {
        hex::decode(&self.root)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("root {:?} is not 32 bytes of hex", self.root))
    }

    /// Whether a ledger whose entries have these chain hashes still begins with exactly the
    /// history this checkpoint covered; the error names a truncation or a rewrite.
    pub fn check_history(&self, entry_hashes: &[String]) -> Result<(), String> {
        let mut prefix = Frontier::default();
        for h in entry_hashes.iter().take(self.size as usize) {
            prefix.push(leaf_hash(h));
        }
        self.check_prefix(entry_hashes.len() as u64, &prefix)
    }

    /// The same, from the ledger's length `n` and the tree of its first `size` entries.
    pub fn check_prefix(&self, n: u64, prefix: &Frontier) -> Result<(), String> {
        if n < self.size {
            return Err(format!(
                "pool {}: the ledger has {n} entries, fewer than the {} of the checkpoint signed at {}: history was truncated",
                self.pool, self.size, self.time
            ));
        }
        if prefix.size() != self.size || prefix.root() != self.root_hash()? {
            return Err(format!(
                "pool {}: the first {} entries no longer hash to the root of the checkpoint signed at {}: history was rewritten",
                self.pool, self.size, self.time
            ));
        }
        Ok(())
    }

    /// As kept in the pool's status.
    pub fn to_status(&self) -> edgeloom_crds::edge_pool::LedgerCheckpoint {
        edgeloom_crds::edge_pool::LedgerCheckpoint {
            size: self.size,
            root: self.root.clone(),
            time: self.time.clone(),
            public_key: self.public_key.clone(),
            signature: self.signature.clone(),
        }
    }

    /// From the pool's status.
    pub fn from_status(pool: &str, c: &edgeloom_crds::edge_pool::LedgerCheckpoint) -> Checkpoint {
        Checkpoint {
            pool: pool.to_string(),
            size: c.size,
            root: c.root.clone(),
            time: c.time.clone(),
            public_key: c.public_key.clone(),
            signature: c.signature.clone(),
        }
    }
}

/// A new signing key from the operating system's randomness.
pub fn new_key() -> Result<SigningKey, String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
    Ok(SigningKey::from_bytes(&seed))
}

/// A signing key from its 32-byte seed in hex.
pub fn key_from_hex(seed: &str) -> Result<SigningKey, String> {
    let seed: [u8; 32] = hex::decode(seed.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or("the signing key is not 32 bytes of hex")?;
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hashes(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| hex::encode(Sha256::digest(i.to_be_bytes())))
            .collect()
    }

    #[test]
    fn the_frontier_root_is_the_rfc_6962_tree_head() {
        for n in 0..70 {
            let hs = hashes(n);
            let mut tree: MemoryBackedTree<Sha256, Vec<u8>> = MemoryBackedTree::new();
            for h in &hs {
                tree.push(h.as_bytes().to_vec());
            }
            let expected: Hash = (*tree.root().as_bytes()).into();
            assert_eq!(root_of(&hs, n), expected, "size {n}");
        }
    }

    #[test]
    fn a_checkpoint_detects_truncation_and_a_rewritten_suffix() {
        let key = new_key().expect("key");
        let hs = hashes(10);
        let cp = Checkpoint::sign(&key, "edge", 8, &root_of(&hs, 8), "2026-11-25T00:00:00Z");
        cp.verify(None).expect("signed");
        cp.verify(Some(&cp.public_key)).expect("by the trusted key");
        cp.check_history(&hs)
            .expect("later entries were only appended");
        cp.check_history(&hs[..8])
            .expect("exactly the covered history");
        let err = cp.check_history(&hs[..7]).expect_err("truncated");
        assert!(
            err.contains("truncated") && err.contains("7 entries"),
            "{err}"
        );
        let mut rewritten = hs.clone();
        rewritten[5] = hex::encode(Sha256::digest(b"another receipt"));
        let err = cp.check_history(&rewritten).expect_err("rewritten");
        assert!(err.contains("rewritten"), "{err}");
        // An altered checkpoint, or one by another key, does not verify.
        let mut bigger = cp.clone();
        bigger.size = 7;
        assert!(bigger.verify(None).is_err());
        let other = new_key().expect("key");
        let forged = Checkpoint::sign(&other, "edge", 8, &root_of(&rewritten, 8), "t");
        assert!(forged.verify(Some(&cp.public_key)).is_err());
    }

    proptest! {
        #[test]
        fn inclusion_proofs_verify_and_only_for_their_entry(n in 1usize..80, pick in 0usize..80) {
            let hs = hashes(n);
            let i = pick % n;
            let root = root_of(&hs, n);
            let proof = inclusion_proof(&hs, i);
            prop_assert!(verify_inclusion(&hs[i], i as u64, n as u64, &root, &proof).is_ok());
            let other = (i + 1) % n;
            if other != i {
                prop_assert!(verify_inclusion(&hs[other], i as u64, n as u64, &root, &proof).is_err());
            }
            prop_assert!(verify_inclusion("00", i as u64, n as u64, &root, &proof).is_err());
        }
    }
}
