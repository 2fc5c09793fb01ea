//! callout's own HTTP/1.1 connections to plain http origins reached directly (no proxy), sent
//! to through hyper's `http1::SendRequest` and kept per origin for the next request.
//!
//! Why not hyper-util's pool for these: holding 10,000 requests in flight it alone peaks at
//! 1.17-1.23x what the bare upstream does for the other ends, where a hyper connection per
//! request is 0.95-0.99x (RESULTS 10f): per request it keeps its connect-or-reuse future
//! (3.2 KB, a copy of the client in it), the connect glue's boxes (1.5 KB) and a task that
//! waits to give the connection back. Here a request holds hyper's response future, the
//! sender and two pointers.
//!
//! A connection goes back to its origin's idle list once it can take another request (its
//! response's body read: a small task waits for that, as hyper-util's pool does), unless the
//! list has its fill; a request waiting for a connection is handed it first. A request takes the
//! most recently idle one; one that finds none dials, and takes the first of its dial and a
//! connection another request is done with (as hyper-util's pool races its checkout and connect):
//! a dial that loses goes on in a task of its own, and the connection it makes is kept.
//!
//! A connection a server closed while idle is found closed and dropped; one that closes as a
//! request is handed to it gives the request back unsent, and it goes on another connection (as
//! hyper-util's pool retries a request a reused connection never took).
use super::{
    connect::{ConnInfo, ConnectError, TimedConnector, CONNECT_TIMEOUT},
    error::{self, SendError, SendFailure},
    h2_pool::{sweep_while_alive, RequestBody},
};
use crate::action::ErrorKind;
use http::{
    header, uri::Authority, uri::Scheme, Extensions, HeaderValue, Method, Request, Response, Uri, Version,
};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::client::legacy::connect::Connection as _;
use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{atomic::AtomicBool, Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};
use tokio::sync::oneshot;
use tower::ServiceExt as _;

/// One kept connection: its sender, how it was made (every response over it carries that),
/// and since when it is idle.
struct Kept {
    sender: http1::SendRequest<RequestBody>,
    info: ConnInfo,
    since: Instant,
}

/// One origin's connections: the idle ones (most recently idle last), and the requests that
/// found none, oldest first, each waiting for its own dial or one another request is done with.
#[derive(Default)]
struct Origin {
    idle: Vec<Kept>,
    waiting: VecDeque<Arc<Waiter>>,
}

impl Origin {
    /// Nothing kept and nobody waiting: the origin need not be remembered.
    fn is_empty(&self) -> bool {
        self.idle.is_empty() && self.waiting.is_empty()
    }
}

/// Where a waiting request is handed its connection (or its own dial's error): taken by
/// whichever comes first, the request's dial or a connection going idle.
type Waiter = Mutex<Option<oneshot::Sender<Result<Kept, SendError>>>>;

/// A new waiter, and where what it is handed arrives.
fn waiter() -> (Arc<Waiter>, oneshot::Receiver<Result<Kept, SendError>>) {
    let (handed, handed_here) = oneshot::channel();
    (Arc::new(Mutex::new(Some(handed))), handed_here)
}

/// True once a waiter was handed something or its request is gone.
fn gone(waiter: &Waiter) -> bool {
    lock(waiter).as_ref().is_none_or(oneshot::Sender::is_closed)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The HTTP/1.1 connections of one client to plain http origins.
pub struct H1Pool {
    connector: TimedConnector,
    idle_timeout: Duration,
    max_per_origin: usize,
    origins: Mutex<HashMap<Authority, Origin>>,
    sweeping: AtomicBool,
}

impl H1Pool {
    /// Connections dialled with `connector`, at most `max_per_origin` kept per origin, one
    /// unused for `idle_timeout` closed.
    pub fn new(connector: TimedConnector, idle_timeout: Duration, max_per_origin: usize) -> Self {
        Self {
            connector,
            idle_timeout,
            max_per_origin,
            origins: Mutex::default(),
            sweeping: AtomicBool::new(false),
        }
    }

    fn origins(&self) -> MutexGuard<'_, HashMap<Authority, Origin>> {
        lock(&self.origins)
    }

    /// The origin `request` goes to when this pool carries it: plain http over HTTP/1.1 (not
    /// CONNECT, not HTTP/1.0). The caller checks that its client dials plain http directly.
    pub fn carries(request: &Request<RequestBody>) -> Option<Authority> {
        let uri = request.uri();
        let eligible = uri.scheme() == Some(&Scheme::HTTP)
            && request.method() != Method::CONNECT
            && request.version() == Version::HTTP_11;
        uri.authority().filter(|_| eligible).cloned()
    }

    /// Sends `request` to `authority` on a kept connection, else a new one. Not an async fn: the
    /// request is handed to hyper here, so the future that waits for the response does not
    /// also keep a copy's room (an async fn reserves its arguments for its whole life).
    pub fn send(self: Arc<Self>, authority: Authority, request: Request<RequestBody>) -> BoxedSend {
        let request = on_the_wire(request, &authority);
        let Some(mut kept) = self.take(&authority) else {
            return Box::pin(self.connect_and_send(authority, request));
        };
        let sending = kept.sender.try_send_request(request);
        Box::pin(async move {
            let again = match self.answered(&authority, kept, sending.await) {
                Sent::Response(response) => return Ok(response),
                Sent::Failed(e) => return Err(e),
                // It closed as it was handed the request: another connection takes it.
                Sent::Unsent(request) => Box::pin(self.connect_and_send(authority, request)),
            };
            again.await
        })
    }

    /// Sends `request` on the connection [`Self::connection`] gets; one that closes as it is
    /// handed the request gives it back, and it gets one more.
    async fn connect_and_send(
        self: Arc<Self>,
        authority: Authority,
        mut request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        for _ in 0..2 {
            // Boxed: the wait for a connection is reserved only until it has one.
            let mut kept = Box::pin(self.connection(&authority)).await?;
            let sending = kept.sender.try_send_request(request);
            match self.answered(&authority, kept, sending.await) {
                Sent::Response(response) => return Ok(response),
                Sent::Failed(e) => return Err(e),
                Sent::Unsent(unsent) => request = unsent,
            }
        }
        Err(SendError::Judged(SendFailure::new(
            ErrorKind::Connect,
            "the connection closed before the request was sent",
            false,
        )))
    }

    /// A connection to `authority`: an idle one, else the first of a new one and one another
    /// request is done with. A dial that loses goes on (within this request's connect timeout)
    /// and what it makes is kept.
    async fn connection(self: &Arc<Self>, authority: &Authority) -> Result<Kept, SendError> {
        // Dropped last: a request dropped while it waits leaves no place behind.
        let _forget = ForgetGone { pool: self, authority };
        let (waiter, mut handed_here) = waiter();
        {
            let mut origins = self.origins();
            let origin = origins.entry(authority.clone()).or_default();
            if let Some(idle) = take_ready(&mut origin.idle) {
                return Ok(idle);
            }
            origin.waiting.push_back(waiter.clone());
        }
        // The dial runs here while it leads, boxed as it is freed once done; a connection handed
        // first sends the rest of it to a task of its own.
        let timeout = self.connector.timeout_here();
        let mut dial =
            Box::pin(CONNECT_TIMEOUT.scope(timeout, self.clone().dial_for(authority.clone(), waiter)));
        let handed = tokio::select! {
            biased;
            () = &mut dial => handed_here.await,
            handed = &mut handed_here => {
                tokio::spawn(dial);
                handed
            }
        };
        handed.unwrap_or_else(|_| {
            Err(SendError::Judged(SendFailure::new(
                ErrorKind::Connect,
                "the dial ended without a connection",
                false,
            )))
        })
    }

    /// Dials for `waiter`: what it makes (or its error) goes to the waiter if nothing was handed
    /// to it first; else a connection is kept for the next request, and an error is dropped
    /// (its request went on another connection).
    async fn dial_for(self: Arc<Self>, authority: Authority, waiter: Arc<Waiter>) {
        let dialled = self.dial(&authority).await;
        let unserved = lock(&waiter).take();
        match (unserved, dialled) {
            (Some(handed), dialled) => {
                if let Err(Ok(kept)) = handed.send(dialled) {
                    self.keep(&authority, kept);
                }
            }
            (None, Ok(kept)) => self.keep(&authority, kept),
            (None, Err(_)) => {}
        }
        self.forget_gone(&authority);
    }

    /// Drops the waiters at the front of `authority`'s queue that were handed something or whose
    /// requests are gone (dials end roughly in the order they began), and the origin once it has
    /// neither idle connections nor waiting requests: one dialled only once is not remembered.
    fn forget_gone(&self, authority: &Authority) {
        let mut origins = self.origins();
        let Some(origin) = origins.get_mut(authority) else { return };
        while origin.waiting.front().is_some_and(|w| gone(w)) {
            origin.waiting.pop_front();
        }
        if origin.is_empty() {
            origins.remove(authority);
        }
    }

    /// The connection to `authority` most recently idle; closed ones met on the way are dropped.
    fn take(&self, authority: &Authority) -> Option<Kept> {
        let mut origins = self.origins();
        let origin = origins.get_mut(authority)?;
        let taken = take_ready(&mut origin.idle);
        if origin.is_empty() {
            origins.remove(authority);
        }
        taken
    }

    /// How the request `kept` was handed ended; a response carries the connection's timings,
    /// and the connection is kept once idle.
    fn answered(
        self: &Arc<Self>,
        authority: &Authority,
        kept: Kept,
        result: Result<Response<Incoming>, TrySendError>,
    ) -> Sent {
        match result {
            Ok(mut response) => {
                response.extensions_mut().insert(kept.info.clone());
                self.keep_when_idle(authority.clone(), kept);
                Sent::Response(response)
            }
            Err(mut e) => match e.take_message() {
                Some(request) => Sent::Unsent(request),
                None => Sent::Failed(SendError::Conn(e.into_error())),
            },
        }
    }

    /// Keeps a connection whose response head arrived once it can take another request. A
    /// body dropped unread closes the connection instead, and the wait ends.
    fn keep_when_idle(self: &Arc<Self>, authority: Authority, mut kept: Kept) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if kept.sender.ready().await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.keep(&authority, kept);
                }
            }
        });
    }

    /// Hands a connection that can take a request to the oldest request waiting for one, else
    /// keeps it idle, unless its origin has its fill of them.
    fn keep(self: &Arc<Self>, authority: &Authority, mut kept: Kept) {
        let mut origins = self.origins();
        let origin = origins.entry(authority.clone()).or_default();
        while let Some(waiter) = origin.waiting.pop_front() {
            let Some(handed) = lock(&waiter).take() else { continue };
            match handed.send(Ok(kept)) {
                Ok(()) => return,
                // That request is gone: the next one, or the idle list.
                Err(Ok(back)) => kept = back,
                Err(Err(_)) => return,
            }
        }
        kept.since = Instant::now();
        if origin.idle.len() < self.max_per_origin {
            origin.idle.push(kept);
        }
        drop(origins);
        self.start_sweeping();
    }

    async fn dial(&self, authority: &Authority) -> Result<Kept, SendError> {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| SendError::Judged(SendFailure::new(ErrorKind::Connect, e.to_string(), false)))?;
        let stream =
            self.connector.clone().oneshot(uri).await.map_err(|ConnectError { kind, message, .. }| {
                SendError::Judged(SendFailure::new(kind, message, false))
            })?;
        let mut extras = Extensions::new();
        stream.connected().get_extras(&mut extras);
        let info = extras.remove::<ConnInfo>().ok_or_else(|| {
            SendError::Judged(SendFailure::new(ErrorKind::Connect, "the connection has no timings", false))
        })?;
        let (sender, conn) = http1::handshake(stream).await.map_err(|e| {
            SendError::Judged(SendFailure::new(
                ErrorKind::Connect,
                format!("HTTP/1.1 handshake failed: {}", error::chain(&e)),
                false,
            ))
        })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("an upstream HTTP/1.1 connection ended: {e}");
            }
        });
        Ok(Kept { sender, info, since: Instant::now() })
    }

    /// Drops closed connections and those unused for the idle timeout, from now on, on the
    /// runtime of the first kept connection, until the pool is dropped.
    fn start_sweeping(self: &Arc<Self>) {
        sweep_while_alive(self, &self.sweeping, self.idle_timeout, Self::sweep);
    }

    /// Closes what has been idle for the idle timeout and forgets what is closed.
    fn sweep(&self, now: Instant) {
        let idle_timeout = self.idle_timeout;
        self.origins().retain(|_, origin| {
            origin
                .idle
                .retain(|k| !k.sender.is_closed() && now.saturating_duration_since(k.since) < idle_timeout);
            origin.waiting.retain(|w| !gone(w));
            !origin.is_empty()
        });
    }
}

/// Forgets what is gone from an origin's queue when a request's wait for a connection ends,
/// however it ends.
struct ForgetGone<'a> {
    pool: &'a H1Pool,
    authority: &'a Authority,
}

impl Drop for ForgetGone<'_> {
    fn drop(&mut self) {
        self.pool.forget_gone(self.authority);
    }
}

/// The most recently idle connection of `idle` that can take a request; closed ones met on the
/// way are dropped.
fn take_ready(idle: &mut Vec<Kept>) -> Option<Kept> {
    while let Some(kept) = idle.pop() {
        if kept.sender.is_ready() {
            return Some(kept);
        }
    }
    None
}

/// A request on its way: boxed, as hyper-util's pool's is.
pub type BoxedSend = Pin<Box<dyn Future<Output = Result<Response<Incoming>, SendError>> + Send>>;

type TrySendError = hyper::client::conn::TrySendError<Request<RequestBody>>;

/// How a request on a connection ended.
enum Sent {
    Response(Response<Incoming>),
    /// Given back before anything was written: the connection was closing.
    Unsent(Request<RequestBody>),
    Failed(SendError),
}

/// `request` as it goes on an HTTP/1.1 connection to its origin: its target in origin form
/// (`/path?query`), and a Host header unless it set one (the authority, its port only when not
/// 80), as hyper-util's pool writes them.
fn on_the_wire(mut request: Request<RequestBody>, authority: &Authority) -> Request<RequestBody> {
    if !request.headers().contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_str(&host_header(authority, false)) {
            request.headers_mut().insert(header::HOST, host);
        }
    }
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(target) = target.parse::<Uri>() {
        *request.uri_mut() = target;
    }
    request
}

/// The Host header for `authority`: its port only when not the scheme's default, as
/// hyper-util's pool writes it too.
pub fn host_header(authority: &Authority, https: bool) -> String {
    let default = if https { 443 } else { 80 };
    match authority.port_u16() {
        Some(port) if port != default => format!("{}:{port}", authority.host()),
        _ => authority.host().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::TlsOptions;
    use http_body_util::Full;

    fn pool(idle_timeout: Duration, max_per_origin: usize) -> Arc<H1Pool> {
        let tls = super::super::tls::client_config(None, false, &TlsOptions::default()).unwrap();
        let connector = TimedConnector::new(Arc::new(tls), Arc::default(), Duration::from_secs(1));
        Arc::new(H1Pool::new(connector, idle_timeout, max_per_origin))
    }

    fn request(method: Method, url: &str, version: Version) -> Request<RequestBody> {
        let mut request = Request::new(Full::default());
        *request.method_mut() = method;
        *request.uri_mut() = url.parse().unwrap();
        *request.version_mut() = version;
        request
    }

    /// A connection over an in-memory pipe whose far end `peer` holds: hyper's client task
    /// driven when `drive`, else dropped (the connection then counts as closed).
    async fn kept(drive: bool) -> (Kept, tokio::io::DuplexStream) {
        let (near, peer) = tokio::io::duplex(4096);
        let (sender, conn) = http1::handshake(hyper_util::rt::TokioIo::new(near)).await.unwrap();
        if drive {
            tokio::spawn(conn);
            tokio::task::yield_now().await;
        }
        let info = ConnInfo(crate::client::ConnMeta::for_tests());
        (Kept { sender, info, since: Instant::now() }, peer)
    }

    #[test]
    fn only_plain_http_11_requests_are_carried() {
        for (method, url, version) in [
            (Method::GET, "https://api.example.test/", Version::HTTP_11),
            (Method::CONNECT, "http://api.example.test/", Version::HTTP_11),
            (Method::GET, "http://api.example.test/", Version::HTTP_10),
            (Method::GET, "/relative", Version::HTTP_11),
        ] {
            assert_eq!(
                H1Pool::carries(&request(method.clone(), url, version)),
                None,
                "{method} {url} {version:?}"
            );
        }
        let carried =
            H1Pool::carries(&request(Method::POST, "http://API.example.test:8080/x", Version::HTTP_11));
        assert_eq!(carried.map(|a| a.to_string()), Some("API.example.test:8080".to_owned()));
    }

    #[test]
    fn requests_go_out_in_origin_form_with_the_pools_host() {
        let authority: Authority = "api.example.test:8080".parse().unwrap();
        let sent = on_the_wire(
            request(Method::GET, "http://api.example.test:8080/a/b?c=d", Version::HTTP_11),
            &authority,
        );
        assert_eq!(sent.uri().to_string(), "/a/b?c=d");
        assert_eq!(sent.headers()[header::HOST], "api.example.test:8080");
        let authority: Authority = "api.example.test".parse().unwrap();
        let sent = on_the_wire(request(Method::GET, "http://api.example.test", Version::HTTP_11), &authority);
        assert_eq!(sent.uri().to_string(), "/");
        assert_eq!(sent.headers()[header::HOST], "api.example.test");
        // The action's own Host is left as it is.
        let mut own = request(Method::GET, "http://api.example.test/", Version::HTTP_11);
        own.headers_mut().insert(header::HOST, HeaderValue::from_static("virtual.example.test"));
        assert_eq!(on_the_wire(own, &authority).headers()[header::HOST], "virtual.example.test");
        assert_eq!(host_header(&"[::1]:80".parse().unwrap(), false), "[::1]");
        assert_eq!(host_header(&"h.test:80".parse().unwrap(), true), "h.test:80");
        assert_eq!(host_header(&"h.test:443".parse().unwrap(), true), "h.test");
    }

    #[tokio::test]
    async fn kept_connections_are_taken_newest_first_and_bounded_per_origin() {
        let pool = pool(Duration::from_secs(90), 2);
        let authority: Authority = "a.test".parse().unwrap();
        let mut peers = Vec::new();
        for _ in 0..3 {
            let (kept, peer) = kept(true).await;
            peers.push(peer);
            pool.keep(&authority, kept);
        }
        assert_eq!(pool.origins()[&authority].idle.len(), 2, "the third had no room");
        let newest = pool.origins()[&authority].idle[1].since;
        let taken = pool.take(&authority).expect("an idle one");
        assert_eq!(taken.since, newest, "the most recently idle first");
        assert!(pool.take(&"b.test".parse().unwrap()).is_none(), "other origins keep their own");
    }

    #[tokio::test]
    async fn closed_and_idle_connections_are_dropped() {
        let pool = pool(Duration::from_secs(90), 8);
        let authority: Authority = "a.test".parse().unwrap();
        let (closed, _peer) = kept(false).await;
        pool.keep(&authority, closed);
        assert!(pool.take(&authority).is_none(), "a closed connection is not taken");
        assert!(pool.origins().is_empty(), "and is forgotten");

        let (fresh, _peer) = kept(true).await;
        pool.keep(&authority, fresh);
        let now = Instant::now();
        pool.sweep(now);
        assert_eq!(pool.origins()[&authority].idle.len(), 1, "not idle long enough");
        pool.sweep(now + Duration::from_secs(90));
        assert!(pool.origins().is_empty(), "idle for the idle timeout: closed");
    }

    #[tokio::test]
    async fn a_request_waiting_for_its_response_reserves_little() {
        // 10,000 in flight over HTTP/1.1 (RESULTS 10f): what each keeps through the wait. An
        // async `send` taking the request was 1,056 bytes (704-728 now, in a test build).
        let pool = pool(Duration::from_secs(90), 8);
        let authority: Authority = "a.test".parse().unwrap();
        let dialling =
            pool.clone().send(authority.clone(), request(Method::GET, "http://a.test/", Version::HTTP_11));
        let (idle, _peer) = kept(true).await;
        pool.keep(&authority, idle);
        let reusing = pool.clone().send(authority, request(Method::GET, "http://a.test/", Version::HTTP_11));
        let (dialling, reusing) = (std::mem::size_of_val(&*dialling), std::mem::size_of_val(&*reusing));
        assert!(dialling <= 768, "dialling: {dialling} bytes");
        assert!(reusing <= 768, "on a kept connection: {reusing} bytes");
    }

    /// A waiter for a connection to `authority`, as `connection` leaves one.
    fn waiting(
        pool: &H1Pool,
        authority: &Authority,
    ) -> (Arc<Waiter>, oneshot::Receiver<Result<Kept, SendError>>) {
        let (waiter, handed_here) = waiter();
        pool.origins().entry(authority.clone()).or_default().waiting.push_back(waiter.clone());
        (waiter, handed_here)
    }

    #[tokio::test]
    async fn a_connection_going_idle_goes_to_the_oldest_waiting_request_first() {
        let pool = pool(Duration::from_secs(90), 8);
        let authority: Authority = "a.test".parse().unwrap();
        let (_, gone_request) = waiting(&pool, &authority);
        drop(gone_request);
        let (_, mut oldest) = waiting(&pool, &authority);
        let (_, mut newer) = waiting(&pool, &authority);
        let (idle, _peer) = kept(true).await;
        pool.keep(&authority, idle);
        assert!(matches!(oldest.try_recv(), Ok(Ok(_))), "the oldest request still waiting has it");
        assert!(newer.try_recv().is_err(), "the newer one waits on");
        assert!(pool.origins()[&authority].idle.is_empty(), "handed, not kept idle");
        let (idle, _peer2) = kept(true).await;
        pool.keep(&authority, idle);
        assert!(matches!(newer.try_recv(), Ok(Ok(_))));
        let (idle, _peer3) = kept(true).await;
        pool.keep(&authority, idle);
        assert_eq!(pool.origins()[&authority].idle.len(), 1, "nobody waiting: kept idle");
        assert!(pool.origins()[&authority].waiting.is_empty());
    }

    /// A pool whose connector may dial loopback.
    fn loopback_pool() -> Arc<H1Pool> {
        let loopback =
            crate::client::egress::EgressSettings { allow_private_networks: true, ..Default::default() };
        let tls = super::super::tls::client_config(None, false, &TlsOptions::default()).unwrap();
        let connector = TimedConnector::new(Arc::new(tls), Arc::default(), Duration::from_secs(5))
            .with_egress(Arc::new(crate::client::egress::EgressPolicy::new(loopback)), &Default::default());
        Arc::new(H1Pool::new(connector, Duration::from_secs(90), 8))
    }

    #[tokio::test]
    async fn a_request_dropped_while_it_dials_leaves_nothing_behind() {
        // A listener with a backlog of zero whose one place is taken: a dial to it never ends.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let address = listener.local_addr().unwrap();
        let _queued = std::net::TcpStream::connect(address).unwrap();
        let authority: Authority = address.to_string().parse().unwrap();
        let pool = loopback_pool();
        let url = format!("http://{address}/");
        let sending = pool.clone().send(authority.clone(), request(Method::GET, &url, Version::HTTP_11));
        let waited = tokio::time::timeout(Duration::from_millis(50), sending).await;
        assert!(waited.is_err(), "the dial should still be hanging");
        assert!(!pool.origins().contains_key(&authority), "its waiting place is gone with it");
    }

    #[tokio::test]
    async fn a_dial_whose_request_went_on_another_connection_is_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let accepting = tokio::spawn(async move { listener.accept().await.map(|(tcp, _)| tcp) });
        let pool = loopback_pool();
        // Its request was handed another connection: the waiter is empty.
        let (waiter, _handed_here) = waiting(&pool, &authority);
        drop(lock(&waiter).take());
        pool.clone().dial_for(authority.clone(), waiter).await;
        let _upstream_end = accepting.await.unwrap().unwrap();
        assert_eq!(pool.origins()[&authority].idle.len(), 1, "the new connection waits for the next request");

        // A dial that fails hands its error to its own request.
        let closed: Authority = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string().parse().unwrap()
        };
        let (waiter, handed_here) = waiting(&pool, &closed);
        pool.clone().dial_for(closed.clone(), waiter).await;
        assert!(matches!(handed_here.await, Ok(Err(SendError::Judged(_)))), "its own dial's error");
        assert!(!pool.origins().contains_key(&closed), "an origin with nothing kept is forgotten");
    }

    #[tokio::test]
    async fn a_connection_closed_before_it_took_the_request_gives_it_back() {
        let pool = pool(Duration::from_secs(90), 8);
        let (mut closed, _peer) = kept(false).await;
        let authority: Authority = "a.test".parse().unwrap();
        let result = closed.sender.try_send_request(request(Method::POST, "/x", Version::HTTP_11)).await;
        match pool.answered(&authority, closed, result) {
            Sent::Unsent(request) => assert_eq!(request.method(), Method::POST),
            Sent::Response(_) | Sent::Failed(_) => panic!("the request should come back unsent"),
        }
    }
}
