//! Resource quantities for placement arithmetic (parsing lives in the API crate).

use edgeloom_crds::schema::Quantity;

/// CPU in millicores (rounded up); 0 when absent or malformed.
pub fn millicores(q: Option<&Quantity>) -> u64 {
    q.and_then(Quantity::millicores).unwrap_or(0)
}

/// Bytes as MiB (rounded up); 0 when absent or malformed.
pub fn mebibytes(q: Option<&Quantity>) -> u64 {
    q.and_then(Quantity::mebibytes).unwrap_or(0)
}
