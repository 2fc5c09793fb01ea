//! Accepting connections on a listener that may fail: a failure (EMFILE: out of file
//! descriptors) is logged once per streak and waited out with a growing pause, so it neither
//! floods the log nor spins a core. The metrics listener and the gRPC listener's dealer use it.
use std::time::Duration;

/// Waits between failed `accept`s: a persistent failure (EMFILE: out of file descriptors)
/// would otherwise spin a core retrying. 10 ms doubling to 1 s; reset by a success.
#[derive(Debug, Default)]
pub(crate) struct AcceptBackoff {
    /// Failures in the current streak.
    failures: u32,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// The wait after one more failure.
    fn failed(&mut self) -> Duration {
        let wait = Self::FIRST.saturating_mul(1 << self.failures.min(16)).min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        wait
    }

    fn succeeded(&mut self) {
        self.failures = 0;
    }
}

/// The next accepted connection: failures are logged once per streak and waited out.
pub(crate) async fn accept_next<T, E, F, Fut>(listener: &str, mut accept: F, backoff: &mut AcceptBackoff) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match accept().await {
            Ok(accepted) => {
                if backoff.failures > 0 {
                    tracing::info!(failures = backoff.failures, "{listener} accepts again");
                }
                backoff.succeeded();
                return accepted;
            }
            Err(e) => {
                if backoff.failures == 0 {
                    tracing::warn!("{listener} cannot accept: {e}; backing off until it can");
                }
                tokio::time::sleep(backoff.failed()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets() {
        let mut backoff = AcceptBackoff::default();
        let waits: Vec<u64> = (0..9).map(|_| backoff.failed().as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        for _ in 0..100 {
            assert_eq!(backoff.failed(), AcceptBackoff::MAX);
        }
        backoff.succeeded();
        assert_eq!(backoff.failed(), AcceptBackoff::FIRST);
    }

    // (tokio's paused clock needs its test-util feature, not worth a second build of tokio and
    // everything above it: the schedule is checked above, this checks the loop uses it.)
    #[tokio::test]
    async fn failing_accepts_back_off_and_a_success_resets_the_streak() {
        let mut backoff = AcceptBackoff::default();
        let mut calls = 0;
        let accepted = accept_next(
            "test listener",
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n <= 4 {
                        Err("too many open files")
                    } else {
                        Ok(n)
                    }
                }
            },
            &mut backoff,
        )
        .await;
        assert_eq!(accepted, 5);
        assert_eq!(backoff.failures, 0, "a success resets the streak");
    }
}
