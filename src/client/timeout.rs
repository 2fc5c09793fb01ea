//! The attempt's clock: an attempt that passed its limits starts here, and runs until its
//! attempt timeout or the action's total deadline, whichever comes first. The bound covers every
//! hop of the attempt; the caller bounds the body read by the same instant (`bounds`).
//! Hand-written rather than tower's `Timeout`: the bound is per request (from its context), and
//! its error says which clock ran out.
use super::attempt::{AttemptContext, BoxFuture};
use crate::fmt::fmt_duration;
use bytes::Bytes;
use http::Request;
use std::{
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tower::{BoxError, Layer, Service, ServiceExt as _};

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
#[derive(Clone)]
pub struct AttemptTimeout<S> {
    inner: S,
}

#[derive(Clone, Copy, Default)]
pub struct AttemptTimeoutLayer;

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;
    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        AttemptTimeout { inner }
    }
}

impl<S, R> Service<Request<Bytes>> for AttemptTimeout<S>
where
    S: Service<Request<Bytes>, Response = R> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = R;
    type Error = BoxError;
    type Future = BoxFuture<R>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let context = AttemptContext::of(&request)?;
            let start = Instant::now();
            let (until, error) = bounds(start, context);
            context.start.start(start);
            match tokio::time::timeout_at(until.into(), inner.oneshot(request)).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(error.into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::request;

    #[tokio::test(start_paused = true)]
    async fn the_nearer_clock_ends_the_attempt_and_is_named() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Bytes>, ()>();
        let mut service = AttemptTimeoutLayer.layer(mock);
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
