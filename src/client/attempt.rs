//! What every layer of an attempt shares: the request as it goes down the stack
//! (`AttemptRequest`: the HTTP request and the action's `AttemptContext`), the signal that the
//! attempt started, and `Step`, which makes a before/after concern a tower layer without a boxed
//! future (`StepFuture`; only a wait is boxed, and only when it happens).
use super::host::Destination;
use crate::action::{Auth, RedirectPolicy, Signing};
use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::{Duration, Instant},
};
use tokio::sync::Notify;
use tower::{BoxError, Layer, Service};
use url::Url;

/// A wait of a layer: boxed, as an `async` block cannot be named; built only when a wait is due.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// What every layer of an attempt needs to know about its action: built once per action (one
/// allocation) and shared by its attempts and their hops.
#[derive(Debug)]
pub struct AttemptContext {
    /// Where the action goes, as the limits key it.
    pub destination: Destination,
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
    pub start: StartSignal,
    /// The action's tenant, whose rate quota the attempt waits for.
    pub tenant: Option<Arc<str>>,
    /// The action's credentials, applied to each attempt (`credentials::Credentials`).
    pub auth: Auth,
    /// How each attempt is signed, when it is (`signing::Signer`).
    pub signing: Option<SignRequest>,
}

/// One hop of an attempt on its way down the stack: the HTTP request and its action's context.
/// The context travels beside the request, not in its extensions (a map allocated per request).
#[derive(Debug)]
pub struct AttemptRequest {
    pub http: Request<Bytes>,
    pub context: Arc<AttemptContext>,
    /// The attempt's fleet check, from the breaker layer to the ones below it; `None` without
    /// shared limits (and on redirect hops, which pass no limit again).
    pub checked: Option<Arc<Checked>>,
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

/// What a layer returns: the response head (its body still to read), or why there is none.
pub type Reply<B> = Result<Response<B>, BoxError>;

/// The rest of the stack, as a layer sees it.
pub trait Next<B>:
    Service<AttemptRequest, Response = Response<B>, Error: Into<BoxError>, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S, B> Next<B> for S where
    S: Service<AttemptRequest, Response = Response<B>, Error: Into<BoxError>, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// What a `Step` decides before the rest of the attempt.
pub enum Before<H> {
    /// Go on now; `after` gets `H`.
    Go(H),
    /// Go on once this resolves (a rate limit, a cool-down, a slot coming free).
    Wait(BoxFuture<H>),
    /// Refuse: the rest of the stack is not called.
    Refuse(BoxError),
}

/// A concern of the attempt that acts before the rest of it (go, wait or refuse; it may change
/// the request) and after it (sees the reply; may change it). Each such concern implements this
/// once; `StepLayer`, `Layered` and `StepFuture` make it a tower layer, service and future.
/// Concerns that wrap the rest of the attempt instead (its clock, the redirect loop) are
/// services of their own.
pub trait Step: Clone + Send + Sync + 'static {
    /// What `after` needs from `before` (a held slot, the key to record against).
    type Held: Send + 'static;

    fn before(&self, request: &mut AttemptRequest) -> Before<Self::Held>;

    /// After a `Before::Wait` resolved, before the rest of the attempt: puts what the wait got
    /// on the request (an OAuth2 token). Most steps have nothing to put.
    fn waited(held: &mut Self::Held, request: &mut AttemptRequest) -> Result<(), BoxError> {
        let _ = (held, request);
        Ok(())
    }

    fn after<B>(held: Self::Held, reply: Reply<B>) -> Reply<B> {
        let _ = held;
        reply
    }
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

/// A `Step` around the rest of the stack. Ready when the rest is: every wait of a step is per
/// request (its destination, its deadline), so it happens in the response future.
#[derive(Debug, Clone)]
pub struct Layered<T, S> {
    step: T,
    inner: S,
}

impl<T: Step, S, B> Service<AttemptRequest> for Layered<T, S>
where
    S: Next<B> + Service<AttemptRequest, Response = Response<B>>,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = StepFuture<T, S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: AttemptRequest) -> Self::Future {
        match self.step.before(&mut request) {
            Before::Go(held) => StepFuture::Calling { call: self.inner.call(request), held: Some(held) },
            Before::Wait(wait) => {
                // The ready inner service goes with the wait; a clone stays for the next call.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                StepFuture::Waiting { wait, rest: Some(Box::new((inner, request))) }
            }
            Before::Refuse(error) => StepFuture::Refused { error: Some(error) },
        }
    }
}

pin_project! {
    /// The response future of a `Step`'s layer: its wait (when it has one), the rest of the
    /// attempt, then `after`.
    #[project = StepProj]
    pub enum StepFuture<T: Step, S: Service<AttemptRequest>> {
        // The rest is boxed with the wait (the rare path): the future stays small, and each
        // layer's future holds the next one's.
        Waiting { wait: BoxFuture<T::Held>, rest: Option<Box<(S, AttemptRequest)>> },
        Ready { rest: Option<(Box<(S, AttemptRequest)>, T::Held)> },
        Calling { #[pin] call: S::Future, held: Option<T::Held> },
        Refused { error: Option<BoxError> },
    }
}

impl<T: Step, S, B> Future for StepFuture<T, S>
where
    S: Service<AttemptRequest, Response = Response<B>, Error: Into<BoxError>>,
{
    type Output = Reply<B>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply<B>> {
        let gone = || Poll::Ready(Err("the attempt was polled after it ended".into()));
        loop {
            let next = match self.as_mut().project() {
                StepProj::Waiting { wait, rest } => {
                    let held = ready!(wait.as_mut().poll(cx));
                    match (held, rest.take()) {
                        (Ok(held), Some(rest)) => StepFuture::Ready { rest: Some((rest, held)) },
                        (Err(error), _) => return Poll::Ready(Err(error)),
                        (_, None) => return gone(),
                    }
                }
                StepProj::Ready { rest } => {
                    let Some((waited, _)) = rest else { return gone() };
                    if let Err(error) = ready!(waited.0.poll_ready(cx)) {
                        return Poll::Ready(Err(error.into()));
                    }
                    let Some((waited, mut held)) = rest.take() else { return gone() };
                    let (mut inner, mut request) = *waited;
                    if let Err(error) = T::waited(&mut held, &mut request) {
                        return Poll::Ready(Err(error));
                    }
                    StepFuture::Calling { call: inner.call(request), held: Some(held) }
                }
                StepProj::Calling { call, held } => {
                    let reply = ready!(call.poll(cx)).map_err(Into::into);
                    return match held.take() {
                        Some(held) => Poll::Ready(T::after(held, reply)),
                        None => gone(),
                    };
                }
                StepProj::Refused { error } => {
                    return match error.take() {
                        Some(error) => Poll::Ready(Err(error)),
                        None => gone(),
                    }
                }
            };
            self.set(next);
        }
    }
}

/// What an action's attempts are signed with, in its `AttemptContext`.
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub signing: Signing,
    /// The message id: the action's id.
    pub message_id: Arc<str>,
}

impl SignRequest {
    /// The signing of action `id`; none (and nothing allocated) when it is not signed.
    pub fn of(signing: &Signing, id: &str) -> Option<Self> {
        match signing {
            Signing::None => None,
            signing => Some(Self { signing: signing.clone(), message_id: id.into() }),
        }
    }
}

/// What the shared state says of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every bucket allowed the attempt, and each was taken.
    Allowed,
    /// Another replica opened the destination's circuit; it stays open this much longer.
    CircuitOpen(Duration),
    /// The destination asked for a cool-down (429 Retry-After) this much longer. Nothing taken.
    CoolingDown(Duration),
    /// `buckets[bucket]` needs `wait` before the attempt may go. Nothing taken.
    Wait { bucket: usize, wait: Duration },
    /// The backend is unreachable and the policy falls back: this replica's own limits apply.
    Local,
    /// The backend is unreachable and the policy refuses.
    Denied,
}

/// The verdict of this attempt's shared check, beside the request (`AttemptRequest::checked`):
/// set by the breaker layer once its check's wait resolves (the wait runs apart from the
/// request, hence the shared slot), read by the cool-down and rate-limit layers. Made only when
/// a backend is configured: without one the attempt allocates nothing for it.
#[derive(Debug, Default)]
pub struct Checked(Mutex<Option<Verdict>>);
impl Checked {
    pub fn set(&self, verdict: Verdict) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(verdict);
        }
    }

    /// Whether the verdict (not yet taken) is `verdict`.
    pub fn is(&self, verdict: &Verdict) -> bool {
        self.0.lock().ok().is_some_and(|slot| slot.as_ref() == Some(verdict))
    }

    /// The verdict, taken (the layer that acts on it consumes it).
    pub fn take(&self) -> Option<Verdict> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }

    /// How much longer the fleet's cool-down of the destination runs, when the check saw one.
    pub fn cooling_down(&self) -> Option<Duration> {
        match self.0.lock().ok()?.as_ref()? {
            Verdict::CoolingDown(left) => Some(*left),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request to `url` with its attempt context: a total of `total` from now, an attempt
    /// timeout of 10 s, no redirects followed.
    pub(crate) fn request(url: &str, total: Duration) -> AttemptRequest {
        let url = Url::parse(url).unwrap();
        let mut http = Request::new(Bytes::new());
        *http.uri_mut() = url.as_str().parse().unwrap();
        let context = AttemptContext {
            destination: Destination::of(&url),
            deadline: Instant::now() + total,
            total,
            attempt_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            redirects: RedirectPolicy { follow: false, max_hops: 10 },
            url,
            cool_down_on_429: true,
            start: StartSignal::default(),
            tenant: None,
            auth: Auth::None,
            signing: None,
        };
        AttemptRequest { http, context: Arc::new(context), checked: None }
    }

    /// A layer of the stack over tower-test's mock, which stands for the rest of the stack.
    pub(crate) struct Harness<S> {
        pub service: S,
        pub handle: tower_test::mock::Handle<AttemptRequest, Response<()>>,
    }

    impl<S> Harness<S>
    where
        S: Service<AttemptRequest, Response = Response<()>, Error = BoxError>,
        S::Future: Send + 'static,
    {
        pub(crate) fn new(
            layer: impl Layer<tower_test::mock::Mock<AttemptRequest, Response<()>>, Service = S>,
        ) -> Self {
            let (mock, handle) = tower_test::mock::pair();
            Self { service: layer.layer(mock), handle }
        }

        /// Starts `request` through the layer, on a task of its own.
        pub(crate) async fn send(&mut self, request: AttemptRequest) -> tokio::task::JoinHandle<Reply<()>> {
            let call = tower::ServiceExt::ready(&mut self.service).await.unwrap().call(request);
            tokio::spawn(call)
        }

        /// Starts an attempt to `url` with a total of `total`.
        pub(crate) async fn start(
            &mut self,
            url: &str,
            total: Duration,
        ) -> tokio::task::JoinHandle<Reply<()>> {
            self.send(request(url, total)).await
        }

        /// Answers the next request that reached the rest of the stack with `status`; returns it.
        pub(crate) async fn answer(&mut self, status: u16) -> AttemptRequest {
            let (request, reply) = self.handle.next_request().await.unwrap();
            reply.send_response(Response::builder().status(status).body(()).unwrap());
            request
        }

        /// An attempt to `url` answered with `status` once it gets through: its reply.
        pub(crate) async fn exchange(&mut self, url: &str, total: Duration, status: u16) -> Reply<()> {
            let call = self.start(url, total).await;
            self.answer(status).await;
            call.await.unwrap()
        }

        /// The error of an attempt to `url` that the layer ends without the rest of the stack.
        pub(crate) async fn refused(&mut self, url: &str, total: Duration) -> BoxError {
            let call = tower::ServiceExt::ready(&mut self.service).await.unwrap().call(request(url, total));
            call.await.unwrap_err()
        }

        /// Drops the layer; true when nothing more reached the rest of the stack.
        pub(crate) async fn nothing_more_sent(self) -> bool {
            let Self { service, mut handle } = self;
            drop(service);
            handle.next_request().await.is_none()
        }
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
