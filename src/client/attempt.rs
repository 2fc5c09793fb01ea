//! What every layer of an attempt shares: the context the attempt carries in its request's
//! extensions, the signal that it started, and `Step`, which makes a concern a tower layer.
use super::host::Destination;
use crate::action::RedirectPolicy;
use bytes::Bytes;
use http::{Request, Response};
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::sync::Notify;
use tower::{BoxError, Layer, Service};
use url::Url;

/// The future of each layer: boxed, as an `async` block cannot be named.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// What every layer of an attempt needs to know about its action, carried in the request's
/// extensions (one insert per attempt).
#[derive(Debug, Clone)]
pub struct AttemptContext {
    /// Where the action goes, as the limits key it.
    pub destination: Arc<Destination>,
    /// The action's total deadline: every wait before sending counts against it.
    pub deadline: Instant,
    /// The total timeout behind `deadline` (for the message when it runs out).
    pub total: Duration,
    /// Bounds one attempt (head and body) from the moment it may send.
    pub attempt_timeout: Duration,
    /// Bounds each dial the attempt makes.
    pub connect_timeout: Duration,
    pub redirects: RedirectPolicy,
    /// The URL of the first hop (redirects resolve Location against it).
    pub url: Url,
    /// A 429 cools its destination down only when it is a failure for this action.
    pub cool_down_on_429: bool,
    /// Told when the attempt has passed every limit and starts.
    pub start: Arc<StartSignal>,
    /// The action's tenant, whose rate quota the attempt waits for.
    pub tenant: Option<Arc<str>>,
}

impl AttemptContext {
    /// The context of `request`; an error (never a panic) when it was built without one.
    pub fn of<B>(request: &Request<B>) -> Result<&Self, BoxError> {
        request.extensions().get::<Self>().ok_or_else(|| "the attempt has no context".into())
    }
}

/// Where an attempt tells its action that it passed admission and starts (the action then tells
/// its observer, and times the attempt from this instant). One per action, reused by each attempt.
#[derive(Debug, Default)]
pub struct StartSignal {
    at: Mutex<Option<Instant>>,
    notify: Notify,
}

impl StartSignal {
    /// The attempt starts at `at`.
    pub fn start(&self, at: Instant) {
        if let Ok(mut slot) = self.at.lock() {
            *slot = Some(at);
        }
        self.notify.notify_one();
    }

    /// The start of the attempt, once told; taken, so the next attempt waits anew.
    pub fn take(&self) -> Option<Instant> {
        self.at.lock().ok().and_then(|mut slot| slot.take())
    }

    /// Waits until an attempt starts; returns its start.
    pub async fn started(&self) -> Instant {
        loop {
            if let Some(at) = self.take() {
                return at;
            }
            self.notify.notified().await;
        }
    }
}

/// What a `Step` returns: the response head (its body still to read), or why there is none.
pub type Reply<B> = Result<Response<B>, BoxError>;

/// The rest of the stack, as a `Step` sees it.
pub trait Next<B>:
    Service<Request<Bytes>, Response = Response<B>, Error: Into<BoxError>, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S, B> Next<B> for S where
    S: Service<Request<Bytes>, Response = Response<B>, Error: Into<BoxError>, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// What one layer of the attempt does around the rest of it (`next`). Each concern implements
/// this once; `StepLayer` and `Layered` make it a tower layer and service.
pub trait Step: Clone + Send + Sync + 'static {
    fn around<S: Next<B>, B: Send + 'static>(
        self,
        request: Request<Bytes>,
        next: S,
    ) -> impl Future<Output = Reply<B>> + Send;
}

/// The layer of a `Step`.
#[derive(Debug, Clone)]
pub struct StepLayer<T>(pub T);

impl<T: Clone, S> Layer<S> for StepLayer<T> {
    type Service = Layered<T, S>;
    fn layer(&self, inner: S) -> Layered<T, S> {
        Layered { step: self.0.clone(), inner }
    }
}

/// A `Step` around the rest of the stack. Always ready: every wait of a step is per request
/// (its destination, its deadline), so it happens in the response future.
#[derive(Debug, Clone)]
pub struct Layered<T, S> {
    step: T,
    inner: S,
}

impl<T: Step, S, B: Send + 'static> Service<Request<Bytes>> for Layered<T, S>
where
    S: Next<B> + Service<Request<Bytes>, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<Response<B>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        Box::pin(self.step.clone().around(request, self.inner.clone()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request to `url` with its attempt context: a total of `total` from now, an attempt
    /// timeout of 10 s, no redirects followed.
    pub(crate) fn request(url: &str, total: Duration) -> Request<Bytes> {
        let url = Url::parse(url).unwrap();
        let mut request = Request::new(Bytes::new());
        *request.uri_mut() = url.as_str().parse().unwrap();
        request.extensions_mut().insert(AttemptContext {
            destination: Arc::new(Destination::of(&url)),
            deadline: Instant::now() + total,
            total,
            attempt_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            redirects: RedirectPolicy { follow: false, max_hops: 10 },
            url,
            cool_down_on_429: true,
            start: Arc::default(),
            tenant: None,
        });
        request
    }

    #[tokio::test(start_paused = true)]
    async fn a_start_is_told_once_per_attempt() {
        let signal = StartSignal::default();
        assert!(signal.take().is_none());
        let at = Instant::now();
        signal.start(at);
        assert_eq!(signal.started().await, at);
        assert!(signal.take().is_none(), "taken");
    }
}
