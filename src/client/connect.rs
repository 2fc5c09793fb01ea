//! The connector: DNS, TCP and TLS with each phase timed, so attempts report measured timings.
//! The timings ride on the connection (`ConnInfo`) into every response sent over it.
use crate::action::ErrorKind;
use http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::{
    client::legacy::connect::{Connected, Connection},
    rt::TokioIo,
};
use std::{
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
}

impl Connection for TimedTcp {
    fn connected(&self) -> Connected {
        Connected::new().extra(ConnInfo(self.meta.clone()))
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

/// Resolves, connects and (for https) handshakes, timing each phase.
#[derive(Clone)]
pub struct TimedConnector {
    tls: tokio_rustls::TlsConnector,
    default_timeout: Duration,
}

impl TimedConnector {
    pub fn new(tls: Arc<rustls::ClientConfig>, default_timeout: Duration) -> Self {
        Self { tls: tokio_rustls::TlsConnector::from(tls), default_timeout }
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
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, connect(uri, tls)).await {
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

async fn connect(uri: Uri, tls: tokio_rustls::TlsConnector) -> Result<Stream, ConnectError> {
    let https = uri.scheme_str() == Some("https");
    let host = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .ok_or_else(|| ConnectError::new(ErrorKind::Connect, "URL has no host".into(), None))?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });

    let started = Instant::now();
    let (addrs, dns): (Vec<SocketAddr>, Duration) = match host.parse::<IpAddr>() {
        Ok(ip) => (vec![SocketAddr::new(ip, port)], Duration::ZERO),
        Err(_) => {
            let addrs = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| {
                    ConnectError::new(ErrorKind::Dns, format!("could not resolve {host}: {e}"), Some(e))
                })?
                .collect();
            (addrs, started.elapsed())
        }
    };

    let mut last_err = None;
    let mut tcp = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Some((stream, *addr));
                break;
            }
            Err(e) => last_err = Some((e, *addr)),
        }
    }
    let (tcp, remote) = match (tcp, last_err) {
        (Some(found), _) => found,
        (None, Some((e, addr))) => {
            return Err(ConnectError::new(
                ErrorKind::Connect,
                format!("connect to {addr} failed: {e}"),
                Some(e),
            ))
        }
        (None, None) => {
            return Err(ConnectError::new(ErrorKind::Dns, format!("{host} resolved to no address"), None))
        }
    };
    let connect = started.elapsed() - dns;
    // Requests are small and latency matters more than packet count.
    let _ = tcp.set_nodelay(true);

    let meta = Arc::new(ConnMeta {
        started,
        dns,
        connect,
        tls_nanos: AtomicU64::new(0),
        remote,
        claimed: AtomicBool::new(false),
    });
    let timed = TimedTcp { io: TokioIo::new(tcp), meta: meta.clone() };
    if !https {
        return Ok(MaybeHttpsStream::Http(timed));
    }

    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
        ConnectError::new(ErrorKind::Tls, format!("{host} is not a valid TLS server name: {e}"), None)
    })?;
    let handshake = Instant::now();
    let stream = tls.connect(name, TokioIo::new(timed)).await.map_err(|e| {
        ConnectError::new(ErrorKind::Tls, format!("TLS handshake with {host} failed: {e}"), Some(e))
    })?;
    meta.tls_nanos.store(handshake.elapsed().as_nanos() as u64, Ordering::Relaxed);
    Ok(MaybeHttpsStream::Https(TokioIo::new(stream)))
}
