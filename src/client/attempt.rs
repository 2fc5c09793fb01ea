//! One attempt as a tower stack: the context every attempt carries in its request's
//! extensions, the one function that assembles the layers, and the one place a failed
//! attempt's error is classified.
use super::{
    admission::{Destination, Limits},
    breaker::{BreakerError, BreakerLayer},
    concurrency::{DestinationSlotLayer, SlotError},
    cool_down::{CoolDownError, CoolDownLayer},
    error::SendFailure,
    rate_limit::{RateLimitError, RateLimitLayer},
    redirect::RedirectLayer,
    timeout::{AttemptTimeoutLayer, TimeoutError},
};
use crate::action::{ActionError, AttemptEnd, ErrorKind, RedirectPolicy};
use bytes::Bytes;
use http::{Request, Response};
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::sync::Notify;
use tower::{BoxError, Service, ServiceBuilder};
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

/// One attempt, outermost first. Refusals come before waits, waits before the clock starts,
/// and the clock bounds everything that may send.
pub fn attempt_stack<S, B>(
    limits: &Limits,
    client: S,
) -> impl Service<Request<Bytes>, Response = Response<B>, Error = BoxError, Future = BoxFuture<Response<B>>> + Send
where
    S: Service<Request<Bytes>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    ServiceBuilder::new()
        // An open circuit refuses at once, before any wait; the attempt's end feeds it.
        .layer(BreakerLayer::new(limits.breakers()))
        // A destination that answered 429 Retry-After holds back every action to it, and the
        // 429s seen here start such a cool-down.
        .layer(CoolDownLayer::new(limits.cool_downs()))
        // Global and per-destination rate limits: waits, bounded by the total deadline.
        .layer(RateLimitLayer::new(limits.rate()))
        // A slot to the destination, held until the response (body included) is dropped.
        .layer(DestinationSlotLayer::new(limits.concurrency()))
        // (Credentials and request signing go here: after every wait, so a signature is fresh.)
        // The attempt's clock starts once it may send, and bounds every hop (the body read
        // is bounded by the same instant).
        .layer(AttemptTimeoutLayer)
        // Each hop is its own send through the client, so the egress-checking connector
        // dials every one; credentials are dropped across origins.
        .layer(RedirectLayer)
        // The pooled client, decompression around it (`HttpClient`).
        .service(client)
}

/// How a failed attempt ended, classified once by the type of its error.
#[derive(Debug)]
pub enum Failed {
    /// A limit refused before anything was sent: no attempt is recorded, the action ends.
    Refused(ActionError),
    /// The attempt ran and failed.
    Attempt(ActionError, AttemptEnd),
}

/// Classifies the error of an attempt stack.
pub fn classify(error: &BoxError) -> Failed {
    let refused = |kind| Failed::Refused(ActionError::new(kind, error.to_string()));
    if error.is::<BreakerError>() {
        return refused(ErrorKind::CircuitOpen);
    }
    if error.is::<CoolDownError>() || error.is::<RateLimitError>() || error.is::<SlotError>() {
        return refused(ErrorKind::RateLimited);
    }
    if error.is::<TimeoutError>() {
        let end = AttemptEnd::Error { kind: ErrorKind::Timeout, sent: true };
        return Failed::Attempt(ActionError::new(ErrorKind::Timeout, error.to_string()), end);
    }
    if let Some(failure) = error.downcast_ref::<SendFailure>() {
        let end = AttemptEnd::Error { kind: failure.kind, sent: failure.sent };
        return Failed::Attempt(ActionError::new(failure.kind, failure.message.clone()), end);
    }
    let end = AttemptEnd::Error { kind: ErrorKind::Protocol, sent: true };
    Failed::Attempt(ActionError::new(ErrorKind::Protocol, error.to_string()), end)
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
        });
        request
    }

    #[test]
    fn errors_are_refusals_or_failed_attempts() {
        let refusal: BoxError = BreakerError("open".into()).into();
        assert!(matches!(classify(&refusal), Failed::Refused(e) if e.kind == ErrorKind::CircuitOpen));
        let slot: BoxError = SlotError("busy".into()).into();
        assert!(matches!(classify(&slot), Failed::Refused(e) if e.kind == ErrorKind::RateLimited));
        let sent: BoxError = SendFailure::new(ErrorKind::Dns, "no such host", false).into();
        assert!(matches!(
            classify(&sent),
            Failed::Attempt(e, AttemptEnd::Error { kind: ErrorKind::Dns, sent: false }) if e.message == "no such host"
        ));
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
