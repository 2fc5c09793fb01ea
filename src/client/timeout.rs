//! The attempt's clock: an attempt that passed its limits starts here, and runs until its
//! attempt timeout or the action's total deadline, whichever comes first. The bound covers every
//! hop of the attempt; the caller bounds the body read by the same instant (`bounds`).
//! Hand-written rather than tower's `Timeout`: the bound is per request (from its context), and
//! its error says which clock ran out. It wraps the rest of the attempt, so it is a service of
//! its own rather than a `Step`; its future is tokio's `Timeout`, named.
use super::attempt::{AttemptContext, AttemptRequest};
use crate::fmt::fmt_duration;
use pin_project_lite::pin_project;
use std::{
    future::Future,
    pin::Pin,
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};
use tower::{
    layer::{layer_fn, LayerFn},
    BoxError, Service,
};

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
pub struct AttemptTimeout<S> {
    inner: S,
}

impl<S> Service<AttemptRequest> for AttemptTimeout<S>
where
    S: Service<AttemptRequest, Error: Into<BoxError>>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: AttemptRequest) -> Self::Future {
        let start = Instant::now();
        let (until, error) = bounds(start, &request.context);
        request.context.start.start(start);
        TimeoutFuture { call: tokio::time::timeout_at(until.into(), self.inner.call(request)), error }
    }
}

pin_project! {
    /// The rest of the attempt under its clock.
    pub struct TimeoutFuture<F> {
        #[pin]
        call: tokio::time::Timeout<F>,
        error: TimeoutError,
    }
}

impl<F, T, E: Into<BoxError>> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match ready!(this.call.poll(cx)) {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err((*this.error).into()),
        })
    }
}

/// The attempt's clock as a layer of the attempt stack (`AttemptTimeout::layer()`).
pub type AttemptTimeoutLayer<S> = LayerFn<fn(S) -> AttemptTimeout<S>>;

impl<S> AttemptTimeout<S> {
    pub fn layer() -> AttemptTimeoutLayer<S> {
        layer_fn(|inner| Self { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::request;
    use http::Response;
    use tower::ServiceExt as _;

    #[tokio::test(start_paused = true)]
    async fn the_nearer_clock_ends_the_attempt_and_is_named() {
        let (mock, mut handle) = tower_test::mock::pair::<AttemptRequest, Response<()>>();
        let mut service = tower::Layer::layer(&AttemptTimeout::layer(), mock);
        // The total (3 s) comes first.
        let call =
            tokio::spawn(service.ready().await.unwrap().call(request("http://h/", Duration::from_secs(3))));
        let _pending = handle.next_request().await.unwrap();
        let started = tokio::time::Instant::now();
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(started.elapsed().as_secs(), 3, "waited out (the paused clock rounds to the ms)");
        assert_eq!(*err.downcast_ref::<TimeoutError>().unwrap(), TimeoutError::Total(Duration::from_secs(3)));
        // (The code's std clock does not follow the paused one: the later deadline goes second.)
        // The attempt timeout (10 s) comes first; nobody answers.
        let call =
            tokio::spawn(service.ready().await.unwrap().call(request("http://h/", Duration::from_secs(60))));
        let (sent, _reply) = handle.next_request().await.unwrap();
        let started = sent.context.start.take();
        assert!(started.is_some(), "the action was told the attempt started");
        let err = call.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "attempt timeout of 10s elapsed");
    }
}
