//! Waiting for what a real server does asynchronously, without sleeping a
//! fixed time: poll a condition until it holds or a generous limit passes.
//! The limit is only a guard against a hung test, never a speed assertion.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often [`eventually`] polls.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some`, and returns that value; fails the
/// test naming `what` if `within` passes first.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_every(what, within, POLL, check).await
}

/// [`eventually`], polling every `poll`: for checks that cost more than a
/// look at memory, such as running a binary.
pub async fn eventually_every<T, F, Fut>(what: &str, within: Duration, poll: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(poll).await;
    }
}
