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
//! list has its fill; a request takes the most recently idle one, and dials when there is none.
//! One a server closed while idle is found closed and dropped; one that closes as a request is
//! handed to it gives the request back unsent, and it goes on a new connection (as hyper-util's
//! pool retries a request a reused connection never took).
use super::{
    connect::{ConnInfo, ConnectError, TimedConnector},
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
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{atomic::AtomicBool, Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};
use tower::ServiceExt as _;

/// One kept connection: its sender, how it was made (every response over it carries that),
/// and since when it is idle.
struct Kept {
    sender: http1::SendRequest<RequestBody>,
    info: ConnInfo,
    since: Instant,
}

/// The HTTP/1.1 connections of one client to plain http origins.
pub struct H1Pool {
    connector: TimedConnector,
    idle_timeout: Duration,
    max_per_origin: usize,
    kept: Mutex<HashMap<Authority, Vec<Kept>>>,
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
            kept: Mutex::default(),
            sweeping: AtomicBool::new(false),
        }
    }

    fn kept(&self) -> MutexGuard<'_, HashMap<Authority, Vec<Kept>>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
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
            return Box::pin(self.dial_and_send(authority, request));
        };
        let sending = kept.sender.try_send_request(request);
        Box::pin(async move {
            let again = match self.answered(&authority, kept, sending.await) {
                Sent::Response(response) => return Ok(response),
                Sent::Failed(e) => return Err(e),
                // It closed as it was handed the request: a new connection takes it.
                Sent::Unsent(request) => Box::pin(self.dial_and_send(authority, request)),
            };
            again.await
        })
    }

    async fn dial_and_send(
        self: Arc<Self>,
        authority: Authority,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, SendError> {
        // Boxed: the dial's state is reserved only until the connection is made.
        let mut kept = Box::pin(self.dial(&authority)).await?;
        let sending = kept.sender.try_send_request(request);
        match self.answered(&authority, kept, sending.await) {
            Sent::Response(response) => Ok(response),
            Sent::Failed(e) => Err(e),
            Sent::Unsent(_) => Err(SendError::Judged(SendFailure::new(
                ErrorKind::Connect,
                "the connection closed before the request was sent",
                false,
            ))),
        }
    }

    /// The connection to `authority` most recently idle; closed ones met on the way are dropped.
    fn take(&self, authority: &Authority) -> Option<Kept> {
        let mut kept = self.kept();
        let list = kept.get_mut(authority)?;
        let mut taken = None;
        while let Some(idle) = list.pop() {
            if idle.sender.is_ready() {
                taken = Some(idle);
                break;
            }
        }
        if list.is_empty() {
            kept.remove(authority);
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

    /// Keeps an idle connection, unless its origin has its fill of them.
    fn keep(self: &Arc<Self>, authority: &Authority, mut kept: Kept) {
        kept.since = Instant::now();
        let mut all = self.kept();
        let list = all.entry(authority.clone()).or_default();
        if list.len() < self.max_per_origin {
            list.push(kept);
        }
        drop(all);
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
        self.kept().retain(|_, list| {
            list.retain(|k| !k.sender.is_closed() && now.saturating_duration_since(k.since) < idle_timeout);
            !list.is_empty()
        });
    }
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
        assert_eq!(pool.kept()[&authority].len(), 2, "the third had no room");
        let newest = pool.kept()[&authority][1].since;
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
        assert!(pool.kept().is_empty(), "and is forgotten");

        let (fresh, _peer) = kept(true).await;
        pool.keep(&authority, fresh);
        let now = Instant::now();
        pool.sweep(now);
        assert_eq!(pool.kept()[&authority].len(), 1, "not idle long enough");
        pool.sweep(now + Duration::from_secs(90));
        assert!(pool.kept().is_empty(), "idle for the idle timeout: closed");
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
