//! callout's own HTTP/2 connections: one per https origin that negotiates h2, shared by every
//! request to it through hyper's `http2::SendRequest`.
//!
//! Why not hyper-util's pool for these: its per-request future reserves ~3 KB for the whole wait
//! (a copy of the client and its connect-or-reuse state machine), which at 10,000 requests in
//! flight is ~30 MB. A request here holds a clone of the sender and waits on hyper's oneshot.
//! The first request to an origin dials it through the same connector while the others wait for
//! that one dial, so a cold burst makes one connection rather than a race of them.
//!
//! An origin that picks HTTP/1.1 by ALPN is remembered as such and left to hyper-util's pool,
//! and the connection already made is not wasted: `Handover` gives it to the pool's next dial to
//! that origin.
use super::{
    connect::{ConnInfo, ConnectError, Connecting, Stream, TimedConnector},
    error::{self, SendError, SendFailure},
};
use crate::action::ErrorKind;
use http::{uri::Authority, uri::Scheme, Extensions, Method, Request, Response, Uri, Version};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::{
    client::legacy::connect::Connection as _,
    rt::{TokioExecutor, TokioTimer},
};
use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::sync::OnceCell;
use tower::ServiceExt as _;

/// Request bodies are built whole from the action, so a full buffer is enough.
pub type RequestBody = http_body_util::Full<bytes::Bytes>;

/// hyper-util's pooled client, dialling through a `Handover`.
pub type PoolClient = hyper_util::client::legacy::Client<Handover, RequestBody>;

/// Origins remembered at most. Past it, idle ones are forgotten first; when none is idle, new
/// origins go to hyper-util's pool.
const MAX_ORIGINS: usize = 1024;

/// A connection handed over to hyper-util's pool is taken within this, or closed.
const HANDOVER_WITHIN: Duration = Duration::from_secs(10);

/// One origin's h2 connection: the sender, and how the connection was made (every response
/// over it carries that, as hyper-util's pool attaches it).
#[derive(Clone)]
pub struct H2Conn {
    sender: http2::SendRequest<RequestBody>,
    info: ConnInfo,
}

/// What a dial to an origin found.
#[derive(Clone)]
pub enum Learned {
    H2(H2Conn),
    /// ALPN chose HTTP/1.1 (or no protocol): hyper-util's pool serves the origin.
    Http1,
    /// No connection: the dial's error, judged once and given to every request that waited on it.
    Failed(SendFailure),
}

enum Origin {
    H2 {
        conn: H2Conn,
        last_used: Instant,
    },
    Http1 {
        last_used: Instant,
    },
    /// Being dialled: requests wait on the cell. Whoever finishes first writes the verdict back.
    Dialling(Arc<OnceCell<Learned>>),
}

/// Where one request goes.
pub enum Route {
    /// hyper-util's pool: plain http, CONNECT, HTTP/1.0, origins that chose HTTP/1.1, or no room.
    Pool,
    H2(H2Conn),
    /// Nothing known yet: wait for (or make) the dial.
    Learn(Authority, Arc<OnceCell<Learned>>),
}

/// The h2 connections of one client, and the door through which an HTTP/1.1 connection passes
/// to the client's hyper-util pool.
pub struct H2Pool {
    connector: TimedConnector,
    handover: Handover,
    builder: http2::Builder<TokioExecutor>,
    idle_timeout: Duration,
    origins: Mutex<HashMap<Authority, Origin>>,
    sweeping: AtomicBool,
}

impl H2Pool {
    /// Connections dialled with `connector`; an idle one is closed after `idle_timeout`, and the
    /// HTTP/1.1 ones go through `handover`.
    pub fn new(
        connector: TimedConnector,
        handover: Handover,
        idle_timeout: Duration,
        keep_alive_interval: Option<Duration>,
    ) -> Self {
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.timer(TokioTimer::new());
        if let Some(interval) = keep_alive_interval {
            builder.keep_alive_interval(interval).keep_alive_while_idle(true);
        }
        Self {
            connector,
            handover,
            builder,
            idle_timeout,
            origins: Mutex::default(),
            sweeping: AtomicBool::new(false),
        }
    }

    fn origins(&self) -> MutexGuard<'_, HashMap<Authority, Origin>> {
        self.origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where `request` goes: decided without waiting, so requests to known origins cost a map
    /// lookup.
    pub fn route(&self, request: &Request<RequestBody>) -> Route {
        let uri = request.uri();
        let eligible = uri.scheme() == Some(&Scheme::HTTPS)
            && request.method() != Method::CONNECT
            && matches!(request.version(), Version::HTTP_11 | Version::HTTP_2);
        let Some(authority) = uri.authority().filter(|_| eligible) else {
            return Route::Pool;
        };
        let now = Instant::now();
        let mut origins = self.origins();
        let full = origins.len() >= MAX_ORIGINS;
        match origins.get_mut(authority) {
            Some(Origin::H2 { conn, last_used }) if !conn.sender.is_closed() => {
                *last_used = now;
                return Route::H2(conn.clone());
            }
            Some(Origin::Http1 { last_used }) => {
                *last_used = now;
                return Route::Pool;
            }
            Some(Origin::Dialling(cell)) => return Route::Learn(authority.clone(), cell.clone()),
            // A closed connection: dial again.
            Some(Origin::H2 { .. }) => {}
            None if full => {
                self.forget_idle(&mut origins, now);
                if origins.len() >= MAX_ORIGINS {
                    return Route::Pool;
                }
            }
            None => {}
        }
        let cell = Arc::new(OnceCell::new());
        origins.insert(authority.clone(), Origin::Dialling(cell.clone()));
        Route::Learn(authority.clone(), cell)
    }

    /// What `authority` speaks: the dial's verdict, made by the first request to get here (if it
    /// is dropped mid-dial, a waiting one dials instead). Each request waits for it within its own
    /// connect timeout, not the dialling request's: past it, this request fails as TIMEOUT and
    /// the dial goes on for the others.
    pub async fn learn(self: Arc<Self>, authority: Authority, cell: Arc<OnceCell<Learned>>) -> Learned {
        let timeout = self.connector.timeout_here();
        let verdict = tokio::time::timeout(timeout, cell.get_or_init(|| self.dial(authority.clone()))).await;
        let Ok(learned) = verdict.cloned() else {
            let ConnectError { kind, message, .. } = ConnectError::timed_out(timeout);
            return Learned::Failed(SendFailure::new(kind, message, false));
        };
        let mut origins = self.origins();
        if matches!(origins.get(&authority), Some(Origin::Dialling(c)) if Arc::ptr_eq(c, &cell)) {
            let last_used = Instant::now();
            match &learned {
                Learned::H2(conn) => {
                    origins.insert(authority, Origin::H2 { conn: conn.clone(), last_used });
                }
                Learned::Http1 => {
                    origins.insert(authority, Origin::Http1 { last_used });
                }
                Learned::Failed(_) => {
                    origins.remove(&authority);
                }
            }
        }
        drop(origins);
        if matches!(learned, Learned::H2(_)) {
            self.start_sweeping();
        }
        learned
    }

    async fn dial(&self, authority: Authority) -> Learned {
        let uri = match Uri::builder()
            .scheme(Scheme::HTTPS)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
        {
            Ok(uri) => uri,
            Err(e) => return Learned::Failed(SendFailure::new(ErrorKind::Connect, e.to_string(), false)),
        };
        let stream = match self.connector.clone().oneshot(uri).await {
            Ok(stream) => stream,
            Err(ConnectError { kind, message, .. }) => {
                return Learned::Failed(SendFailure::new(kind, message, false))
            }
        };
        let connected = stream.connected();
        let mut extras = Extensions::new();
        connected.get_extras(&mut extras);
        let info = match extras.remove::<ConnInfo>() {
            Some(info) if connected.is_negotiated_h2() => info,
            _ => {
                self.handover.park(authority, stream);
                return Learned::Http1;
            }
        };
        match self.builder.handshake(stream).await {
            Ok((sender, conn)) => {
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("an upstream HTTP/2 connection ended: {e}");
                    }
                });
                Learned::H2(H2Conn { sender, info })
            }
            Err(e) => Learned::Failed(error::handshake_failure(&e)),
        }
    }

    /// Forgets `authority`'s connection if it is closed, so the next request dials again.
    fn forget_closed(&self, authority: &Authority) {
        let mut origins = self.origins();
        if matches!(origins.get(authority), Some(Origin::H2 { conn, .. }) if conn.sender.is_closed()) {
            origins.remove(authority);
        }
    }

    /// Drops what has been idle for the idle timeout: h2 connections (each closes once its last
    /// request is done) and HTTP/1.1 verdicts (hyper-util's pool has closed those connections
    /// by then too).
    fn forget_idle(&self, origins: &mut HashMap<Authority, Origin>, now: Instant) {
        let idle = |last_used: &Instant| now.saturating_duration_since(*last_used) >= self.idle_timeout;
        origins.retain(|_, origin| match origin {
            Origin::H2 { conn, last_used } => !conn.sender.is_closed() && !idle(last_used),
            Origin::Http1 { last_used } => !idle(last_used),
            Origin::Dialling(_) => true,
        });
    }

    /// Sweeps idle origins from now on, on the runtime of the first h2 connection (the one that
    /// drives the connections), until the pool is dropped.
    fn start_sweeping(self: &Arc<Self>) {
        sweep_while_alive(self, &self.sweeping, self.idle_timeout, |pool, now| {
            pool.forget_idle(&mut pool.origins(), now);
            pool.handover.drop_stale(now);
        });
    }

    /// Sends `request` where its origin's dial said: on the h2 connection, through the pool, or
    /// not at all.
    pub async fn send_learned(
        self: Arc<Self>,
        learned: Learned,
        request: Request<RequestBody>,
        pool: &PoolClient,
    ) -> Result<Response<Incoming>, SendError> {
        match learned {
            Learned::H2(conn) => {
                let (sending, info) = conn.try_send(request);
                match sent(sending.await, &info) {
                    Sent::Response(response) => Ok(response),
                    Sent::Failed(e) => Err(e),
                    Sent::Unsent(request) => Box::pin(self.resend(request, pool)).await,
                }
            }
            Learned::Http1 => self.handover.pool_send(pool, request).await,
            Learned::Failed(failure) => Err(SendError::Judged(failure)),
        }
    }

    /// Sends again a request an h2 connection gave back unsent (it was closing): where its
    /// origin routes now, once.
    pub async fn resend(
        self: Arc<Self>,
        request: Request<RequestBody>,
        pool: &PoolClient,
    ) -> Result<Response<Incoming>, SendError> {
        if let Some(authority) = request.uri().authority() {
            self.forget_closed(authority);
        }
        let conn = match self.route(&request) {
            Route::Pool => return pool.request(request).await.map_err(SendError::Pool),
            Route::H2(conn) => conn,
            Route::Learn(authority, cell) => match self.clone().learn(authority, cell).await {
                Learned::H2(conn) => conn,
                Learned::Http1 => return self.handover.pool_send(pool, request).await,
                Learned::Failed(failure) => return Err(SendError::Judged(failure)),
            },
        };
        let (sending, info) = conn.try_send(request);
        match sent(sending.await, &info) {
            Sent::Response(response) => Ok(response),
            Sent::Failed(e) => Err(e),
            Sent::Unsent(_) => Err(SendError::Judged(SendFailure::new(
                ErrorKind::Connect,
                "the HTTP/2 connection closed",
                false,
            ))),
        }
    }
}

/// Runs `sweep` on `pool` every quarter of `idle_timeout` (at least every second), on the
/// current runtime, until the pool is dropped; once per pool (`started`).
pub(super) fn sweep_while_alive<T: Send + Sync + 'static>(
    pool: &Arc<T>,
    started: &AtomicBool,
    idle_timeout: Duration,
    sweep: fn(&T, Instant),
) {
    if started.swap(true, Ordering::Relaxed) {
        return;
    }
    let pool: Weak<T> = Arc::downgrade(pool);
    let every = (idle_timeout / 4).max(Duration::from_secs(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(pool) = pool.upgrade() else { break };
            sweep(&pool, Instant::now());
        }
    });
}

/// A request on its way over an h2 connection: hyper's future, boxed because it has no name.
pub type Sending = Pin<Box<dyn Future<Output = Result<Response<Incoming>, TrySendError>> + Send>>;

type TrySendError = hyper::client::conn::TrySendError<Request<RequestBody>>;

impl H2Conn {
    /// Starts `request` on this connection: what is in flight is hyper's future and the
    /// connection's timings, to be attached to the response.
    pub fn try_send(mut self, request: Request<RequestBody>) -> (Sending, ConnInfo) {
        (Box::pin(self.sender.try_send_request(request)), self.info)
    }
}

/// How a request on an h2 connection ended.
pub enum Sent {
    Response(Response<Incoming>),
    /// Given back before anything was written: the connection was closing.
    Unsent(Request<RequestBody>),
    Failed(SendError),
}

/// `result` of a request on the connection `info` describes; the response carries `info`, as
/// hyper-util's pool attaches it.
pub fn sent(result: Result<Response<Incoming>, TrySendError>, info: &ConnInfo) -> Sent {
    match result {
        Ok(mut response) => {
            response.extensions_mut().insert(info.clone());
            Sent::Response(response)
        }
        Err(mut e) => match e.take_message() {
            Some(request) => Sent::Unsent(request),
            None => Sent::Failed(SendError::Conn(e.into_error())),
        },
    }
}

/// The connector of a client's hyper-util pool: a connection an h2 dial found speaking
/// HTTP/1.1 waits here for the pool's next dial to its origin; otherwise it dials. One pointer,
/// as hyper-util keeps copies of its connector in every request's state.
#[derive(Clone)]
pub struct Handover(Arc<HandoverInner>);

struct HandoverInner {
    connector: TimedConnector,
    parked: Mutex<HashMap<Authority, (Instant, Stream)>>,
}

impl Handover {
    pub fn new(connector: TimedConnector) -> Self {
        Self(Arc::new(HandoverInner { connector, parked: Mutex::default() }))
    }

    fn parked(&self) -> MutexGuard<'_, HashMap<Authority, (Instant, Stream)>> {
        self.0.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn park(&self, authority: Authority, stream: Stream) {
        self.parked().insert(authority, (Instant::now(), stream));
    }

    /// The connection parked for `uri`'s origin, if one waits and is fresh. Only https ones
    /// are parked (`http://host` has the same authority as `https://host`).
    fn take(&self, uri: &Uri) -> Option<Stream> {
        if uri.scheme() != Some(&Scheme::HTTPS) {
            return None;
        }
        let mut parked = self.parked();
        if parked.is_empty() {
            return None;
        }
        let (at, stream) = parked.remove(uri.authority()?)?;
        (at.elapsed() < HANDOVER_WITHIN).then_some(stream)
    }

    /// Closes the connection parked for `authority`, if the pool did not take it (it had an
    /// idle one of its own).
    pub fn unpark(&self, authority: &Authority) {
        self.parked().remove(authority);
    }

    /// Closes connections the pool did not take in time (it found an idle one of its own, or
    /// the request was dropped).
    fn drop_stale(&self, now: Instant) {
        self.parked().retain(|_, (at, _)| now.saturating_duration_since(*at) < HANDOVER_WITHIN);
    }
}

impl Handover {
    /// `request` through the pool, the connection parked for its origin closed if the pool did
    /// not take it.
    pub async fn pool_send(
        &self,
        pool: &PoolClient,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let authority = request.uri().authority().cloned();
        let sent = pool.request(request).await.map_err(SendError::Pool);
        if let Some(authority) = &authority {
            self.unpark(authority);
        }
        sent
    }
}

/// The pool's connector: a parked connection, or a dial.
impl tower::Service<Uri> for Handover {
    type Response = Stream;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Connecting {
        match self.take(&uri) {
            Some(stream) => Box::pin(std::future::ready(Ok(stream))),
            None => self.0.connector.clone().call(uri),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::TlsOptions;
    use http_body_util::Full;

    fn pool() -> H2Pool {
        let tls = super::super::tls::client_config(None, true, &TlsOptions::default()).unwrap();
        let connector = TimedConnector::new(Arc::new(tls), Arc::default(), Duration::from_secs(1));
        H2Pool::new(connector.clone(), Handover::new(connector), Duration::from_secs(90), None)
    }

    fn request(method: Method, url: &str, version: Version) -> Request<RequestBody> {
        let mut request = Request::new(Full::default());
        *request.method_mut() = method;
        *request.uri_mut() = url.parse().unwrap();
        *request.version_mut() = version;
        request
    }

    #[test]
    fn only_https_requests_that_h2_can_carry_are_routed_to_it() {
        let pool = pool();
        for (method, url, version) in [
            (Method::GET, "http://api.example.test/", Version::HTTP_11),
            (Method::CONNECT, "https://api.example.test/", Version::HTTP_11),
            (Method::GET, "https://api.example.test/", Version::HTTP_10),
        ] {
            let route = pool.route(&request(method.clone(), url, version));
            assert!(matches!(route, Route::Pool), "{method} {url} {version:?}");
        }
        assert!(pool.origins().is_empty(), "nothing remembered for them");
        let route = pool.route(&request(Method::POST, "https://api.example.test/", Version::HTTP_11));
        assert!(matches!(route, Route::Learn(..)));
    }

    #[test]
    fn requests_to_an_origin_being_dialled_wait_on_the_one_dial() {
        let pool = pool();
        let Route::Learn(first, cell) =
            pool.route(&request(Method::GET, "https://API.example.test/a", Version::HTTP_11))
        else {
            panic!("the first request dials");
        };
        // The same origin however its host is written, the same cell to wait on.
        let Route::Learn(_, again) =
            pool.route(&request(Method::GET, "https://api.EXAMPLE.test/b", Version::HTTP_2))
        else {
            panic!("the second request waits");
        };
        assert!(Arc::ptr_eq(&cell, &again));
        let Route::Learn(other, elsewhere) =
            pool.route(&request(Method::GET, "https://api.example.test:8443/", Version::HTTP_11))
        else {
            panic!("another port is another origin");
        };
        assert!(!Arc::ptr_eq(&cell, &elsewhere));
        assert_ne!(first, other);
    }

    #[tokio::test]
    async fn an_http1_verdict_sends_through_the_pool_and_a_failed_dial_is_forgotten() {
        let pool = Arc::new(pool());
        let https = |host: &str| request(Method::GET, &format!("https://{host}/"), Version::HTTP_11);
        let Route::Learn(authority, cell) = pool.route(&https("h1.example.test")) else { panic!() };
        assert!(cell.set(Learned::Http1).is_ok());
        assert!(matches!(pool.clone().learn(authority, cell).await, Learned::Http1));
        assert!(matches!(pool.route(&https("h1.example.test")), Route::Pool));

        let Route::Learn(authority, cell) = pool.route(&https("down.example.test")) else { panic!() };
        let failure = SendFailure::new(ErrorKind::Dns, "no such host", false);
        assert!(cell.set(Learned::Failed(failure)).is_ok());
        assert!(
            matches!(pool.clone().learn(authority, cell).await, Learned::Failed(f) if f.kind == ErrorKind::Dns)
        );
        assert!(
            matches!(pool.route(&https("down.example.test")), Route::Learn(..)),
            "the next request dials again"
        );
    }

    #[test]
    fn past_the_origin_limit_idle_origins_go_and_busy_ones_send_through_the_pool() {
        let pool = pool();
        for n in 0..MAX_ORIGINS {
            let route =
                pool.route(&request(Method::GET, &format!("https://o{n}.example.test/"), Version::HTTP_11));
            assert!(matches!(route, Route::Learn(..)));
        }
        // Every origin is being dialled, so none can be forgotten.
        let route = pool.route(&request(Method::GET, "https://one-more.example.test/", Version::HTTP_11));
        assert!(matches!(route, Route::Pool));
        assert_eq!(pool.origins().len(), MAX_ORIGINS);

        // An idle HTTP/1.1 verdict makes room.
        let long_ago = Instant::now() - Duration::from_secs(91);
        pool.origins().insert("o0.example.test".parse().unwrap(), Origin::Http1 { last_used: long_ago });
        let route = pool.route(&request(Method::GET, "https://one-more.example.test/", Version::HTTP_11));
        assert!(matches!(route, Route::Learn(..)));
    }
}
