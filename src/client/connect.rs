//! The connector: DNS, TCP and TLS with each phase timed, so attempts report measured timings.
//! The timings ride on the connection (`ConnInfo`) into every response sent over it.
//!
//! One connection is made in fixed steps: pick the route (direct or through a proxy) → check the
//! target with the egress policy (through a `socks5://` proxy callout resolves the target itself
//! and checks every address) → resolve the host dialled → connect to one of its allowed
//! addresses → TLS with an `https://` proxy → the proxy's handshake, hyper-util's (a CONNECT
//! `Tunnel` for https targets through an HTTP proxy, `SocksV5` through a SOCKS proxy) → for
//! https, the TLS handshake with the target.
use super::{
    egress::{Denied, EgressPolicy},
    host,
    proxy::Proxies,
};
use crate::action::{ErrorKind, ProxyScheme, ProxyUrl};
use http::{HeaderValue, Uri};
use hyper_util::{
    client::legacy::connect::{
        proxy::{SocksV5, Tunnel},
        Connected, Connection,
    },
    rt::TokioIo,
};
use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tower::ServiceExt as _;

tokio::task_local! {
    /// The connect timeout of the action whose request is being sent. The pooled client hands
    /// the connector only a URI, so the per-action timeout travels beside it, read when the
    /// connect starts (within the request's task).
    pub static CONNECT_TIMEOUT: Duration;
}

/// The stream hyper talks over: the connection, or the target's TLS over it. Each boxed: state
/// that hyper and hyper-util allocate per request has room for the connection's stream
/// (hyper-util's connect-or-reuse future holds a handshake; each HTTP/2 request's task is an enum
/// one of whose variants is the connection task), so an inline stream costs every request in
/// flight. Boxed apart, because TLS state is about a kilobyte and a plain connection's box would
/// be sized by it (1,250 bytes for every plain HTTP/1.1 connection; 10d, ninth round).
pub enum Stream {
    Plain(Box<TimedConn>),
    Tls(Box<TlsOverConn>),
}

/// The target's TLS over a connection.
type TlsOverConn = TokioIo<tokio_rustls::client::TlsStream<TokioIo<TimedConn>>>;

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Self::Plain(conn) => conn.connected(),
            Self::Tls(tls) => {
                let (conn, session) = tls.inner().get_ref();
                let connected = conn.inner().connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(conn) => Pin::new(&mut **conn).poll_read(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(conn) => Pin::new(&mut **conn).poll_write(cx, buf),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(conn) => Pin::new(&mut **conn).poll_flush(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(conn) => Pin::new(&mut **conn).poll_shutdown(cx),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(conn) => conn.is_write_vectored(),
            Self::Tls(tls) => tls.is_write_vectored(),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(conn) => Pin::new(&mut **conn).poll_write_vectored(cx, bufs),
            Self::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }
}

/// What a connection runs on: TCP, or TLS to an `https://` proxy over TCP.
#[derive(Debug)]
pub enum Transport {
    Tcp(TcpStream),
    ProxyTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_read(cx, buf),
            Self::ProxyTls(io) => Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_write(cx, buf),
            Self::ProxyTls(io) => Pin::new(io).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_flush(cx),
            Self::ProxyTls(io) => Pin::new(io).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_shutdown(cx),
            Self::ProxyTls(io) => Pin::new(io).poll_shutdown(cx),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(io) => io.is_write_vectored(),
            Self::ProxyTls(io) => io.is_write_vectored(),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            Self::ProxyTls(io) => Pin::new(io).poll_write_vectored(cx, bufs),
        }
    }
}

/// How a connection was made. Attached to every response sent over it.
#[derive(Debug)]
pub struct ConnMeta {
    /// When this connection's DNS lookup started.
    pub started: Instant,
    pub dns: Duration,
    pub connect: Duration,
    tls_nanos: AtomicU64,
    pub remote: SocketAddr,
    /// Set by the first attempt that reports this connection's set-up cost.
    claimed: AtomicBool,
}

impl ConnMeta {
    pub fn tls(&self) -> Duration {
        Duration::from_nanos(self.tls_nanos.load(Ordering::Relaxed))
    }

    /// True once: for the first response over this connection, when the connection was opened
    /// after `attempt_start` (so that attempt paid for it). Later responses reuse it.
    pub fn claim_for(&self, attempt_start: Instant) -> bool {
        self.started >= attempt_start && !self.claimed.swap(true, Ordering::Relaxed)
    }
}

#[cfg(test)]
impl ConnMeta {
    /// A connection's timings for tests that make no connection.
    pub(crate) fn for_tests() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            dns: Duration::ZERO,
            connect: Duration::ZERO,
            tls_nanos: AtomicU64::new(0),
            remote: SocketAddr::from(([127, 0, 0, 1], 9)),
            claimed: AtomicBool::new(false),
        })
    }
}

/// The `Connected::extra` value: found in each response's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo(pub Arc<ConnMeta>);

/// Why a connection could not be made; `kind` is DNS, CONNECT, TLS or TIMEOUT.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConnectError {
    pub kind: ErrorKind,
    pub message: String,
    #[source]
    source: Option<io::Error>,
}

impl ConnectError {
    fn new(kind: ErrorKind, message: String, source: Option<io::Error>) -> Self {
        Self { kind, message, source }
    }
}

/// A connection that knows how it was made.
#[derive(Debug)]
pub struct TimedConn {
    io: TokioIo<Transport>,
    meta: Arc<ConnMeta>,
    /// Plain HTTP to a forwarding proxy: requests go out in absolute form.
    forward_proxy: bool,
    /// Counts the connection as open until it is dropped.
    _open: crate::metrics::Raised,
}

impl Connection for TimedConn {
    fn connected(&self) -> Connected {
        Connected::new().extra(ConnInfo(self.meta.clone())).proxy(self.forward_proxy)
    }
}

impl hyper::rt::Read for TimedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TimedConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Resolves, connects, tunnels through a proxy when one applies and (for https) handshakes,
/// timing each phase. One pointer: hyper-util keeps copies of its connector in the state of
/// every request in flight.
#[derive(Clone)]
pub struct TimedConnector(Arc<ConnectorConfig>);

/// What a `TimedConnector` dials with.
#[derive(Clone)]
pub struct ConnectorConfig {
    tls: tokio_rustls::TlsConnector,
    /// TLS with `https://` proxies: the server's trust roots, HTTP/1.1 only (CONNECT and
    /// forwarded requests are HTTP/1.1).
    proxy_tls: Option<tokio_rustls::TlsConnector>,
    proxies: Arc<Proxies>,
    default_timeout: Duration,
    tcp_keepalive: Option<Duration>,
    egress: Arc<EgressPolicy>,
    /// Host names with fixed addresses, looked up before DNS.
    fixed: Arc<HashMap<String, Vec<IpAddr>>>,
}

impl std::ops::Deref for TimedConnector {
    type Target = ConnectorConfig;
    fn deref(&self) -> &ConnectorConfig {
        &self.0
    }
}

impl TimedConnector {
    pub fn new(tls: Arc<rustls::ClientConfig>, proxies: Arc<Proxies>, default_timeout: Duration) -> Self {
        Self(Arc::new(ConnectorConfig {
            tls: tokio_rustls::TlsConnector::from(tls),
            proxy_tls: None,
            proxies,
            default_timeout,
            tcp_keepalive: None,
            egress: Arc::default(),
            fixed: Arc::default(),
        }))
    }

    /// Checks every connection against `egress`; `fixed` names hosts whose addresses are set
    /// instead of looked up.
    pub fn with_egress(mut self, egress: Arc<EgressPolicy>, fixed: &BTreeMap<String, Vec<IpAddr>>) -> Self {
        let config = Arc::make_mut(&mut self.0);
        config.egress = egress;
        config.fixed =
            Arc::new(fixed.iter().map(|(name, ips)| (host::normalize(name), ips.clone())).collect());
        self
    }

    /// The addresses of `addrs` the policy allows; all refused is DENIED_BY_POLICY naming the
    /// rule, and nothing is dialled.
    fn allowed(&self, host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, ConnectError> {
        let mut first_denial = None;
        let allowed: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|addr| match self.egress.check_ip(host, addr.port(), addr.ip()) {
                Ok(()) => true,
                Err(denied) => {
                    first_denial.get_or_insert(denied);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), first_denial) {
            (true, Some(denied)) => Err(denied_by_policy(denied)),
            (_, Some(denied)) => {
                tracing::debug!("skipping a denied address: {denied}");
                Ok(allowed)
            }
            _ => Ok(allowed),
        }
    }

    /// Speaks TLS with `https://` proxies using `tls`.
    pub fn with_proxy_tls(mut self, tls: Arc<rustls::ClientConfig>) -> Self {
        Arc::make_mut(&mut self.0).proxy_tls = Some(tokio_rustls::TlsConnector::from(tls));
        self
    }

    /// Sends TCP keep-alive probes after `idle` without traffic (`None`: none).
    pub fn with_tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        Arc::make_mut(&mut self.0).tcp_keepalive = idle;
        self
    }
}

/// A connection being made.
pub type Connecting = Pin<Box<dyn Future<Output = Result<Stream, ConnectError>> + Send>>;

impl tower::Service<Uri> for TimedConnector {
    type Response = Stream;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout_here();
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, this.connect(uri)).await {
                Ok(result) => result,
                Err(_) => Err(ConnectError::timed_out(timeout)),
            }
        })
    }
}

impl ConnectError {
    /// A connect that took longer than `timeout`.
    pub fn timed_out(timeout: Duration) -> Self {
        let message = format!("connect timeout of {} elapsed", humantime::format_duration(timeout));
        Self::new(ErrorKind::Timeout, message, None)
    }
}

impl TimedConnector {
    /// The connect timeout of the action whose request is being sent in this task, else the
    /// connector's default.
    pub fn timeout_here(&self) -> Duration {
        CONNECT_TIMEOUT.try_with(|t| *t).unwrap_or(self.default_timeout)
    }

    /// The route to `uri`: its target, and the proxy and host dialled when one applies.
    fn route(&self, uri: &Uri) -> Result<Route, ConnectError> {
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| ConnectError::new(ErrorKind::Connect, "URL has no host".into(), None))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let proxy = self.proxies.for_target(https, &host).cloned();
        let (dial_host, dial_port) = match &proxy {
            Some(p) => (p.host().to_owned(), p.port()),
            None => (host.clone(), port),
        };
        Ok(Route { https, host, port, proxy, dial_host, dial_port })
    }

    /// What `connect` would do for `uri`, nothing dialled: the same route, the same egress
    /// checks in the same order, the host dialled resolved the same way (fixed addresses, then
    /// the system resolver). Render shows it.
    pub async fn preview(&self, uri: &Uri) -> RoutePreview {
        let route = match self.route(uri) {
            Ok(route) => route,
            Err(e) => return RoutePreview { resolve_error: Some(e.message), ..RoutePreview::default() },
        };
        let Route { host, port, proxy, dial_host, dial_port, .. } = route;
        let caller_proxy = proxy.is_some() && self.proxies.chosen_by_caller();
        let mut preview = RoutePreview {
            target: authority(&host, port),
            dialled: authority(&dial_host, dial_port),
            caller_proxy,
            ..RoutePreview::default()
        };
        // The target's name and port, a caller's proxy, and the target's addresses where callout
        // (not the proxy) resolves it: as `connect` checks them before dialling.
        let mut denied = self.egress.check_host(&host, port).err().map(|d| d.to_string());
        if denied.is_none() && caller_proxy {
            denied = self.egress.check_host(&dial_host, dial_port).err().map(|d| d.to_string());
        }
        if denied.is_none() {
            denied = match proxy.as_ref().map(ProxyUrl::scheme) {
                Some(ProxyScheme::Socks5) => match resolve(&host, port, None, &self.fixed).await {
                    Ok((addrs, _)) => self.allowed(&host, addrs).err().map(|e| e.message),
                    Err(e) => {
                        preview.resolve_error = Some(e.message);
                        None
                    }
                },
                Some(_) => host
                    .parse::<IpAddr>()
                    .ok()
                    .and_then(|ip| self.egress.check_ip(&host, port, ip).err())
                    .map(|d| d.to_string()),
                None => None,
            };
        }
        preview.denied = denied;
        preview.proxy = proxy;
        if preview.denied.is_some() || preview.resolve_error.is_some() {
            return preview;
        }
        preview.resolved_by = resolved_by(&dial_host, &self.fixed);
        let checked = preview.proxy.is_none() || caller_proxy;
        match resolve(&dial_host, dial_port, preview.proxy.as_ref(), &self.fixed).await {
            Ok((addrs, _)) => {
                preview.addresses = addrs
                    .into_iter()
                    .map(|addr| {
                        let verdict = if checked {
                            match self.egress.check_ip(&dial_host, addr.port(), addr.ip()) {
                                Ok(()) => AddressVerdict::Allowed,
                                Err(denied) => AddressVerdict::Denied(denied.rule),
                            }
                        } else {
                            AddressVerdict::NotChecked("the operator's proxy is trusted wherever it lives")
                        };
                        (addr, verdict)
                    })
                    .collect();
            }
            Err(e) => preview.resolve_error = Some(e.message),
        }
        preview
    }

    async fn connect(self, uri: Uri) -> Result<Stream, ConnectError> {
        // Route: the host dialled is the proxy's when one applies to this target.
        let Route { https, host, port, proxy, dial_host, dial_port } = self.route(&uri)?;
        let scheme = proxy.as_ref().map(ProxyUrl::scheme);

        // Egress, before any lookup: the target's name and port, and a caller's proxy itself.
        self.egress.check_host(&host, port).map_err(denied_by_policy)?;
        let caller_proxy = proxy.is_some() && self.proxies.chosen_by_caller();
        if caller_proxy {
            self.egress.check_host(&dial_host, dial_port).map_err(denied_by_policy)?;
        }
        let started = Instant::now();
        let mut dns = Duration::ZERO;
        // Through socks5 callout names the address the proxy dials: the target is resolved here
        // and every address passes the policy. Through socks5h or an HTTP proxy the proxy
        // resolves the name, so only a target written as an address can be checked by address.
        let socks_target = match scheme {
            Some(ProxyScheme::Socks5) => {
                let (addrs, took) = resolve(&host, port, None, &self.fixed).await?;
                dns += took;
                self.allowed(&host, addrs)?.first().copied()
            }
            Some(_) => {
                if let Ok(ip) = host.parse::<IpAddr>() {
                    self.egress.check_ip(&host, port, ip).map_err(denied_by_policy)?;
                }
                None
            }
            None => None,
        };

        let (addrs, took) = resolve(&dial_host, dial_port, proxy.as_ref(), &self.fixed).await?;
        dns += took;
        // Every address dialled passes the policy here, after DNS, so the address checked is the
        // address used (no rebinding between check and connect). The operator's own proxy is
        // trusted wherever it lives; a caller's proxy is checked like any destination.
        let addrs = if proxy.is_none() || caller_proxy { self.allowed(&dial_host, addrs)? } else { addrs };
        let (tcp, remote) = dial(&addrs, proxy.as_ref()).await?;
        // Requests are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        if let Some(idle) = self.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new().with_time(idle);
            if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
                tracing::debug!("cannot set TCP keep-alive: {e}");
            }
        }
        let mut transport = Transport::Tcp(tcp);
        if let Some(proxy) = proxy.as_ref().filter(|p| p.scheme() == ProxyScheme::Https) {
            transport = self.proxy_handshake(transport, proxy).await?;
        }
        transport = match (&proxy, https) {
            (Some(proxy), true) if proxy.scheme().is_http() => tunnel(transport, proxy, &host, port).await?,
            (Some(proxy), _) if !proxy.scheme().is_http() => {
                let target = match socks_target {
                    Some(addr) => authority(&addr.ip().to_string(), addr.port()),
                    None => authority(&host, port),
                };
                socks(transport, proxy, &target).await?
            }
            _ => transport,
        };
        // Connect time includes the proxy's TLS and handshake: all come before the target's TLS.
        let connect = started.elapsed().saturating_sub(dns);

        let meta = Arc::new(ConnMeta {
            started,
            dns,
            connect,
            tls_nanos: AtomicU64::new(0),
            remote,
            claimed: AtomicBool::new(false),
        });
        let timed = TimedConn {
            io: TokioIo::new(transport),
            meta: meta.clone(),
            forward_proxy: proxy.as_ref().is_some_and(|p| p.scheme().is_http()) && !https,
            _open: crate::metrics::connection_opened(),
        };
        if !https {
            return Ok(Stream::Plain(Box::new(timed)));
        }

        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
            ConnectError::new(ErrorKind::Tls, format!("{host} is not a valid TLS server name: {e}"), None)
        })?;
        let handshake = Instant::now();
        let stream = self.tls.connect(name, TokioIo::new(timed)).await.map_err(|e| {
            ConnectError::new(ErrorKind::Tls, format!("TLS handshake with {host} failed: {e}"), Some(e))
        })?;
        meta.tls_nanos.store(handshake.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(Stream::Tls(Box::new(TokioIo::new(stream))))
    }

    /// TLS with an `https://` proxy, verified against the server's trust roots.
    async fn proxy_handshake(
        &self,
        transport: Transport,
        proxy: &ProxyUrl,
    ) -> Result<Transport, ConnectError> {
        let Transport::Tcp(tcp) = transport else { return Ok(transport) };
        let tls = self.proxy_tls.as_ref().ok_or_else(|| {
            ConnectError::new(ErrorKind::Tls, format!("no TLS configuration for proxy {proxy}"), None)
        })?;
        let name = rustls::pki_types::ServerName::try_from(proxy.host().to_owned()).map_err(|e| {
            ConnectError::new(
                ErrorKind::Tls,
                format!("proxy {proxy} is not a valid TLS server name: {e}"),
                None,
            )
        })?;
        let stream = tls.connect(name, tcp).await.map_err(|e| {
            ConnectError::new(
                ErrorKind::Tls,
                format!("TLS handshake with proxy {proxy} failed: {e}"),
                Some(e),
            )
        })?;
        Ok(Transport::ProxyTls(Box::new(stream)))
    }
}

/// Where a connection goes: the target, and what is dialled (the target, or its proxy).
struct Route {
    https: bool,
    host: String,
    port: u16,
    proxy: Option<ProxyUrl>,
    dial_host: String,
    dial_port: u16,
}

/// What a connection to a URI would do, nothing dialled (`TimedConnector::preview`).
#[derive(Debug, Clone, Default)]
pub struct RoutePreview {
    /// The target, `host:port`.
    pub target: String,
    /// The proxy that applies to the target, if any.
    pub proxy: Option<ProxyUrl>,
    /// The proxy is the action's own (checked like any destination), not the operator's.
    pub caller_proxy: bool,
    /// Why the policy refuses the target (its name or port, a caller's proxy, or a target
    /// callout resolves for a proxy); nothing is resolved further then.
    pub denied: Option<String>,
    /// What is dialled, `host:port`.
    pub dialled: String,
    /// Where the addresses of the host dialled come from: "literal", "fixed" or "dns".
    pub resolved_by: &'static str,
    /// The addresses of the host dialled, in the order they are tried, each with its verdict.
    pub addresses: Vec<(SocketAddr, AddressVerdict)>,
    /// Why a name could not be resolved.
    pub resolve_error: Option<String>,
}

impl RoutePreview {
    /// The connection would be made: nothing refused, something to dial that may be dialled.
    pub fn allowed(&self) -> bool {
        self.denied.is_none()
            && self.resolve_error.is_none()
            && self.addresses.iter().any(|(_, v)| !matches!(v, AddressVerdict::Denied(_)))
    }
}

/// The egress policy's word on one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressVerdict {
    Allowed,
    /// The rule that refuses it.
    Denied(String),
    /// The policy does not look at it, and why.
    NotChecked(&'static str),
}

/// Where `resolve` gets the addresses of `host`.
fn resolved_by(host: &str, fixed: &HashMap<String, Vec<IpAddr>>) -> &'static str {
    if fixed.contains_key(host::normalize(host).as_str()) {
        "fixed"
    } else if host.parse::<IpAddr>().is_ok() {
        "literal"
    } else {
        "dns"
    }
}

/// `host:port` as a URI authority (IPv6 in brackets).
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The target of a proxy handshake as hyper-util reads it, always with its port (hyper-util
/// would take 443 for a URI without one).
fn handshake_target(authority: &str, proxy: &ProxyUrl) -> Result<Uri, ConnectError> {
    format!("http://{authority}/").parse().map_err(|_| {
        ConnectError::new(ErrorKind::Connect, format!("cannot ask proxy {proxy} for {authority}"), None)
    })
}

/// Hands hyper-util's proxy handshakes the connection already made here (resolved, checked
/// against the egress policy and timed), so they never dial anything themselves.
struct Handover(Option<TokioIo<Transport>>);

impl tower::Service<Uri> for Handover {
    type Response = TokioIo<Transport>;
    type Error = io::Error;
    type Future = std::future::Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        std::future::ready(
            self.0.take().ok_or_else(|| io::Error::other("the proxy connection was handed over")),
        )
    }
}

/// Opens a CONNECT tunnel to `host:port` through an HTTP proxy, with the proxy URL's
/// credentials as Proxy-Authorization.
async fn tunnel(
    transport: Transport,
    proxy: &ProxyUrl,
    host: &str,
    port: u16,
) -> Result<Transport, ConnectError> {
    let target = authority(host, port);
    let dst = handshake_target(&target, proxy)?;
    // The proxy's own URI only tells `Handover` what to dial, which it ignores.
    let mut tunnel = Tunnel::new(Uri::default(), Handover(Some(TokioIo::new(transport))));
    if let Some(auth) = proxy.authorization().and_then(|a| HeaderValue::from_str(a).ok()) {
        tunnel = tunnel.with_auth(auth);
    }
    let e = match tunnel.oneshot(dst).await {
        Ok(io) => return Ok(io.into_inner()),
        Err(e) => e,
    };
    // hyper-util does not export its tunnel error type: its kinds are told by their text.
    let what = e.to_string();
    let message = if let Some(io) = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<io::Error>())
    {
        format!("CONNECT through proxy {proxy} failed: {io}")
    } else if what.contains("authorization required") {
        format!("proxy {proxy} answered CONNECT with 407 (proxy authentication required)")
    } else if what.contains("unsuccessful") {
        format!("proxy {proxy} refused to CONNECT to {target} (it answered other than 200)")
    } else if what.contains("end of file") {
        format!("proxy {proxy} closed the connection during CONNECT")
    } else if what.contains("too long") {
        format!("proxy {proxy} sent an invalid answer to CONNECT (its head is too long)")
    } else {
        format!("CONNECT through proxy {proxy} failed: {what}")
    };
    Err(ConnectError::new(ErrorKind::Connect, message, None))
}

/// The SOCKS5 handshake for `target` (an address through socks5, the name through socks5h),
/// with user/password authentication when the proxy URL carried credentials.
async fn socks(transport: Transport, proxy: &ProxyUrl, target: &str) -> Result<Transport, ConnectError> {
    let dst = handshake_target(target, proxy)?;
    let mut socks = SocksV5::new(Uri::default(), Handover(Some(TokioIo::new(transport))));
    if let Some((user, pass)) = proxy.credentials() {
        socks = socks.with_auth(user.to_owned(), pass.to_owned());
    }
    socks.oneshot(dst).await.map(TokioIo::into_inner).map_err(|e| {
        ConnectError::new(
            ErrorKind::Connect,
            format!("SOCKS5 proxy {proxy} could not connect to {target}: {e}"),
            None,
        )
    })
}

fn denied_by_policy(denied: Denied) -> ConnectError {
    ConnectError::new(ErrorKind::DeniedByPolicy, denied.to_string(), None)
}

/// "proxy scheme://host:port " when dialling a proxy, for messages.
fn via(proxy: Option<&ProxyUrl>) -> String {
    proxy.map(|p| format!("proxy {p} ")).unwrap_or_default()
}

/// The addresses of `host` (an IP literal needs no lookup) and how long the lookup took.
async fn resolve(
    host: &str,
    port: u16,
    proxy: Option<&ProxyUrl>,
    fixed: &HashMap<String, Vec<IpAddr>>,
) -> Result<(Vec<SocketAddr>, Duration), ConnectError> {
    if let Some(ips) = fixed.get(host::normalize(host).as_str()) {
        return Ok((ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(), Duration::ZERO));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((vec![SocketAddr::new(ip, port)], Duration::ZERO));
    }
    let started = Instant::now();
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            ConnectError::new(ErrorKind::Dns, format!("could not resolve {}{host}: {e}", via(proxy)), Some(e))
        })?
        .collect();
    if addrs.is_empty() {
        return Err(ConnectError::new(
            ErrorKind::Dns,
            format!("{}{host} resolved to no address", via(proxy)),
            None,
        ));
    }
    Ok((addrs, started.elapsed()))
}

/// Connects to the first of `addrs` that accepts.
async fn dial(
    addrs: &[SocketAddr],
    proxy: Option<&ProxyUrl>,
) -> Result<(TcpStream, SocketAddr), ConnectError> {
    let mut last_err = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok((stream, *addr)),
            Err(e) => last_err = Some((e, *addr)),
        }
    }
    Err(match last_err {
        Some((e, addr)) => ConnectError::new(
            ErrorKind::Connect,
            format!("connect to {}{addr} failed: {e}", via(proxy)),
            Some(e),
        ),
        None => ConnectError::new(ErrorKind::Dns, "no address to connect to".into(), None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::NoProxy;

    #[test]
    fn the_stream_and_the_connector_are_pointers_and_a_plain_connection_is_not_sized_by_tls() {
        // hyper-util keeps copies of the connector, and hyper the connection's stream, in state
        // sized per request in flight (10d, fifth round): inline, the TLS stream alone is about
        // a kilobyte there. A plain connection's box holds the connection only (10d, ninth
        // round: it was 1,250 bytes, a TLS stream's size, for every plain HTTP/1.1 connection).
        assert_eq!(std::mem::size_of::<Stream>(), 2 * std::mem::size_of::<usize>());
        assert_eq!(std::mem::size_of::<TimedConnector>(), std::mem::size_of::<usize>());
        let plain = std::mem::size_of::<TimedConn>();
        assert!(plain <= 96, "a plain connection is {plain} bytes");
        assert!(std::mem::size_of::<TlsOverConn>() > 8 * plain, "the TLS stream is the large one");
    }

    #[tokio::test]
    async fn fixed_addresses_match_names_however_written() {
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let tls = no_roots();
        let connector = TimedConnector::new(tls, Arc::default(), Duration::from_secs(1))
            .with_egress(Arc::default(), &BTreeMap::from([("API.Example.test.".into(), vec![ip])]));
        for name in ["api.example.test", "API.example.test.", "api.example.test."] {
            let (addrs, dns) = resolve(name, 80, None, &connector.fixed).await.unwrap();
            assert_eq!(addrs, vec![SocketAddr::new(ip, 80)], "{name}");
            assert_eq!(dns, Duration::ZERO);
        }
    }

    /// A TLS config that trusts nothing: these tests never get to a handshake.
    fn no_roots() -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        )
    }

    fn through(proxies: Proxies) -> TimedConnector {
        let tls = no_roots();
        let fixed = BTreeMap::from([("api.example.test".into(), vec!["10.0.0.5".parse().unwrap()])]);
        TimedConnector::new(tls, Arc::new(proxies), Duration::from_secs(1))
            .with_egress(Arc::default(), &fixed)
    }

    #[tokio::test]
    async fn a_preview_checks_what_connect_checks_through_each_kind_of_proxy() {
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let proxy = |s: &str| ProxyUrl::parse(s).unwrap();
        // Through socks5 callout resolves the target: its private address is refused.
        let caller = through(Proxies::only(proxy("socks5://203.0.113.7:1080")));
        let preview = caller.preview(&uri("http://api.example.test/")).await;
        assert!(!preview.allowed() && preview.caller_proxy);
        assert!(preview.denied.as_deref().unwrap().contains("private range"), "{preview:?}");
        // Through socks5h the proxy resolves it: only the caller's proxy address is checked.
        let caller = through(Proxies::only(proxy("socks5h://203.0.113.7:1080")));
        let preview = caller.preview(&uri("http://api.example.test/")).await;
        assert!(preview.allowed(), "{preview:?}");
        assert_eq!((preview.dialled.as_str(), preview.resolved_by), ("203.0.113.7:1080", "literal"));
        assert_eq!(preview.addresses, [("203.0.113.7:1080".parse().unwrap(), AddressVerdict::Allowed)]);
        // The operator's proxy is trusted wherever it lives; a target written as an address is
        // still checked.
        let operator = through(Proxies::new(Some(proxy("http://10.9.9.9:3128")), None, NoProxy::default()));
        let preview = operator.preview(&uri("http://api.example.test/")).await;
        assert!(preview.allowed(), "{preview:?}");
        assert!(matches!(preview.addresses[0].1, AddressVerdict::NotChecked(_)));
        let preview = operator.preview(&uri("http://169.254.169.254/latest")).await;
        assert!(preview.denied.as_deref().unwrap().contains("cloud metadata"), "{preview:?}");
        // Direct: every address checked.
        let direct = through(Proxies::default());
        let preview = direct.preview(&uri("http://api.example.test:8080/")).await;
        assert_eq!(preview.resolved_by, "fixed");
        assert!(!preview.allowed() && matches!(preview.addresses[0].1, AddressVerdict::Denied(_)));
    }
}
