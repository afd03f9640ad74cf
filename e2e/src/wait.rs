//! Waiting on conditions with a timeout, never a fixed sleep.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `probe` every 200 ms until it returns `Some`, or panics after `timeout` saying
/// what it waited for and what `probe` last saw (via `describe`).
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
