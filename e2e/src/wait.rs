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

/// [`until`] for a probe that answers `Some` when done.
pub async fn until_some<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    until(what, timeout, || {
        let fut = probe();
        async move { fut.await.ok_or_else(|| "not yet".to_string()) }
    })
    .await
}

/// [`until`] for a probe that answers `true` when done.
pub async fn until_true<F, Fut>(what: &str, timeout: Duration, mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    until_some(what, timeout, || {
        let fut = probe();
        async move { fut.await.then_some(()) }
    })
    .await
}
