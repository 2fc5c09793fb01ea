//! The connector: DNS, TCP and TLS with each phase timed, so attempts report measured timings.
//! The timings ride on the connection (`ConnInfo`) into every response sent over it.
//!
//! One connection is made in fixed steps: pick the route (direct or through a proxy) → resolve
//! the host dialled → connect to one of the resolved addresses → for an https target through a
//! proxy, open a CONNECT tunnel → for https, the TLS handshake with the target.
use super::{
    egress::{Denied, EgressPolicy},
    host,
    proxy::{self, Proxies},
};
use crate::action::{ErrorKind, ProxyUrl};
use http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use std::{
    collections::HashMap,
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
use tokio::net::TcpStream;

tokio::task_local! {
    /// The connect timeout of the action whose request is being sent. The pooled client hands
    /// the connector only a URI, so the per-action timeout travels beside it, read when the
    /// connect starts (within the request's task).
    pub static CONNECT_TIMEOUT: Duration;
}

/// The stream hyper talks over: TCP, or TLS over TCP.
pub type Stream = MaybeHttpsStream<TimedTcp>;

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

/// A TCP stream that knows how it was made.
#[derive(Debug)]
pub struct TimedTcp {
    io: TokioIo<TcpStream>,
    meta: Arc<ConnMeta>,
    /// Plain HTTP to a forwarding proxy: requests go out in absolute form.
    forward_proxy: bool,
    /// Counts the connection as open until it is dropped.
    _open: crate::metrics::Raised,
}

impl Connection for TimedTcp {
    fn connected(&self) -> Connected {
        Connected::new().extra(ConnInfo(self.meta.clone())).proxy(self.forward_proxy)
    }
}

impl hyper::rt::Read for TimedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TimedTcp {
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
/// timing each phase.
#[derive(Clone)]
pub struct TimedConnector {
    tls: tokio_rustls::TlsConnector,
    proxies: Arc<Proxies>,
    default_timeout: Duration,
    tcp_keepalive: Option<Duration>,
    egress: Arc<EgressPolicy>,
    /// Host names with fixed addresses, looked up before DNS.
    fixed: Arc<HashMap<String, Vec<IpAddr>>>,
}

impl TimedConnector {
    pub fn new(tls: Arc<rustls::ClientConfig>, proxies: Arc<Proxies>, default_timeout: Duration) -> Self {
        Self {
            tls: tokio_rustls::TlsConnector::from(tls),
            proxies,
            default_timeout,
            tcp_keepalive: None,
            egress: Arc::default(),
            fixed: Arc::default(),
        }
    }

    /// Checks every connection against `egress`; `fixed` names hosts whose addresses are set
    /// instead of looked up.
    pub fn with_egress(mut self, egress: Arc<EgressPolicy>, fixed: &[(String, Vec<IpAddr>)]) -> Self {
        self.egress = egress;
        self.fixed = Arc::new(fixed.iter().map(|(name, ips)| (host::normalize(name), ips.clone())).collect());
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

    /// Sends TCP keep-alive probes after `idle` without traffic (`None`: none).
    pub fn with_tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.tcp_keepalive = idle;
        self
    }
}

impl tower::Service<Uri> for TimedConnector {
    type Response = Stream;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = CONNECT_TIMEOUT.try_with(|t| *t).unwrap_or(self.default_timeout);
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, this.connect(uri)).await {
                Ok(result) => result,
                Err(_) => Err(ConnectError::new(
                    ErrorKind::Timeout,
                    format!("connect timeout of {} elapsed", humantime::format_duration(timeout)),
                    None,
                )),
            }
        })
    }
}

impl TimedConnector {
    async fn connect(self, uri: Uri) -> Result<Stream, ConnectError> {
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .ok_or_else(|| ConnectError::new(ErrorKind::Connect, "URL has no host".into(), None))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });

        // Route: the host dialled is the proxy's when one applies to this target.
        let proxy = self.proxies.for_target(https, &host).cloned();
        let (dial_host, dial_port) = match &proxy {
            Some(p) => (p.host(), p.port()),
            None => (host.as_str(), port),
        };

        // Egress, before any lookup: the target's name and port. Through a proxy the proxy
        // resolves the name, so only a target written as an address can be checked by address.
        self.egress.check_host(&host, port).map_err(denied_by_policy)?;
        let caller_proxy = proxy.is_some() && self.proxies.chosen_by_caller;
        if caller_proxy {
            self.egress.check_host(dial_host, dial_port).map_err(denied_by_policy)?;
        }
        if let (Some(_), Ok(ip)) = (&proxy, host.parse::<IpAddr>()) {
            self.egress.check_ip(&host, port, ip).map_err(denied_by_policy)?;
        }

        let started = Instant::now();
        let (addrs, dns) = resolve(dial_host, dial_port, proxy.as_ref(), &self.fixed).await?;
        // Every address dialled passes the policy here, after DNS, so the address checked is the
        // address used (no rebinding between check and connect). The operator's own proxy is
        // trusted wherever it lives; a caller's proxy is checked like any destination.
        let addrs = if proxy.is_none() || caller_proxy { self.allowed(dial_host, addrs)? } else { addrs };
        let (mut tcp, remote) = dial(&addrs, proxy.as_ref()).await?;
        // Requests are small and latency matters more than packet count.
        let _ = tcp.set_nodelay(true);
        if let Some(idle) = self.tcp_keepalive {
            let keepalive = socket2::TcpKeepalive::new().with_time(idle);
            if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive) {
                tracing::debug!("cannot set TCP keep-alive: {e}");
            }
        }
        if let (Some(proxy), true) = (&proxy, https) {
            proxy::tunnel(&mut tcp, proxy, &host, port)
                .await
                .map_err(|e| ConnectError::new(ErrorKind::Connect, e.to_string(), None))?;
        }
        // Connect time includes the CONNECT exchange: both come before the target's TLS.
        let connect = started.elapsed() - dns;

        let meta = Arc::new(ConnMeta {
            started,
            dns,
            connect,
            tls_nanos: AtomicU64::new(0),
            remote,
            claimed: AtomicBool::new(false),
        });
        let timed = TimedTcp {
            io: TokioIo::new(tcp),
            meta: meta.clone(),
            forward_proxy: proxy.is_some() && !https,
            _open: crate::metrics::connection_opened(),
        };
        if !https {
            return Ok(MaybeHttpsStream::Http(timed));
        }

        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
            ConnectError::new(ErrorKind::Tls, format!("{host} is not a valid TLS server name: {e}"), None)
        })?;
        let handshake = Instant::now();
        let stream = self.tls.connect(name, TokioIo::new(timed)).await.map_err(|e| {
            ConnectError::new(ErrorKind::Tls, format!("TLS handshake with {host} failed: {e}"), Some(e))
        })?;
        meta.tls_nanos.store(handshake.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(MaybeHttpsStream::Https(TokioIo::new(stream)))
    }
}

fn denied_by_policy(denied: Denied) -> ConnectError {
    ConnectError::new(ErrorKind::DeniedByPolicy, denied.to_string(), None)
}

/// "proxy http://host:port " when dialling a proxy, for messages.
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

    #[tokio::test]
    async fn fixed_addresses_match_names_however_written() {
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let tls = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let connector = TimedConnector::new(tls, Arc::default(), Duration::from_secs(1))
            .with_egress(Arc::default(), &[("API.Example.test.".into(), vec![ip])]);
        for name in ["api.example.test", "API.example.test.", "api.example.test."] {
            let (addrs, dns) = resolve(name, 80, None, &connector.fixed).await.unwrap();
            assert_eq!(addrs, vec![SocketAddr::new(ip, 80)], "{name}");
            assert_eq!(dns, Duration::ZERO);
        }
    }
}
