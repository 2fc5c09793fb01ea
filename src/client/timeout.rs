//! The attempt's clock: an attempt that passed its limits starts here, and runs until its
//! attempt timeout or the action's total deadline, whichever comes first. The bound covers every
//! hop of the attempt; the caller bounds the body read by the same instant (`bounds`).
//! Hand-written rather than tower's `Timeout`: the bound is per request (from its context), and
//! its error says which clock ran out.
use super::attempt::{AttemptContext, Next, Reply, Step, StepLayer};
use crate::fmt::fmt_duration;
use bytes::Bytes;
use http::Request;
use std::time::{Duration, Instant};
use tower::ServiceExt as _;

/// An attempt ran out of time: its own timeout, or the action's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimeoutError {
    #[error("attempt timeout of {} elapsed", fmt_duration(*.0))]
    Attempt(Duration),
    #[error("total timeout of {} elapsed", fmt_duration(*.0))]
    Total(Duration),
}

/// When an attempt started at `start` must end, and the error it ends with then.
pub fn bounds(start: Instant, context: &AttemptContext) -> (Instant, TimeoutError) {
    let own = start + context.attempt_timeout;
    if own < context.deadline {
        (own, TimeoutError::Attempt(context.attempt_timeout))
    } else {
        (context.deadline, TimeoutError::Total(context.total))
    }
}

/// Starts the attempt (tells its action through the context's start signal) and bounds it.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttemptTimeout;

impl Step for AttemptTimeout {
    async fn around<S: Next<B>, B: Send + 'static>(self, request: Request<Bytes>, next: S) -> Reply<B> {
        let context = AttemptContext::of(&request)?;
        let start = Instant::now();
        let (until, error) = bounds(start, context);
        context.start.start(start);
        match tokio::time::timeout_at(until.into(), next.oneshot(request)).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(error.into()),
        }
    }
}

/// The attempt's clock as a layer of the attempt stack.
pub type AttemptTimeoutLayer = StepLayer<AttemptTimeout>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::request;
    use http::Response;
    use tower::{Layer as _, Service as _};

    #[tokio::test(start_paused = true)]
    async fn the_nearer_clock_ends_the_attempt_and_is_named() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Bytes>, Response<()>>();
        let mut service = StepLayer(AttemptTimeout).layer(mock);
        // The total (3 s) comes first.
        let call = tokio::spawn(service.call(request("http://h/", Duration::from_secs(3))));
        let _pending = handle.next_request().await.unwrap();
        let started = tokio::time::Instant::now();
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(started.elapsed().as_secs(), 3, "waited out (the paused clock rounds to the ms)");
        assert_eq!(*err.downcast_ref::<TimeoutError>().unwrap(), TimeoutError::Total(Duration::from_secs(3)));
        // (The code's std clock does not follow the paused one: the later deadline goes second.)
        // The attempt timeout (10 s) comes first; nobody answers.
        let call = tokio::spawn(service.call(request("http://h/", Duration::from_secs(60))));
        let (sent, _reply) = handle.next_request().await.unwrap();
        let started = sent.extensions().get::<AttemptContext>().unwrap().start.take();
        assert!(started.is_some(), "the action was told the attempt started");
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "attempt timeout of 10s elapsed");
    }
}
