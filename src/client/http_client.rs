//! The pooled HTTP client: hyper-util's pool over the timed connector, decompression around
//! it, and the settings it is built from.
use super::{
    attempt::AttemptRequest,
    connect,
    connect::ConnInfo,
    egress::EgressPolicy,
    error::{self, SendError, SendFailure},
    h1_pool::{self, BoxedSend, H1Pool},
    h2_pool::{self, H2Pool, Handover, PoolClient, Route, Sent},
    proxy::Proxies,
    tls,
};
use crate::{
    action::{ProxyUrl, TlsOptions},
    settings::SettingError,
};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, ResponseFuture},
    rt::TokioExecutor,
};
use pin_project_lite::pin_project;
use serde::{Deserialize, Deserializer, Serialize};
use std::{
    collections::BTreeMap,
    future::Future,
    net::IpAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};
use tokio::task::futures::TaskLocalFuture;
use tower::{Service as _, ServiceExt as _};
use tower_http::decompression::{Decompression, DecompressionBody, ResponseFuture as DecompressionFuture};

pub use super::h2_pool::RequestBody;

/// A response body as the executor reads it: decoded per its Content-Encoding. Boxed: the
/// decoder states make it ~350 bytes, and every layer of the attempt stack hands the response
/// on by value.
pub type ResponseBody = Box<DecompressionBody<Incoming>>;

/// The `[client]` section: pool and protocol settings of the shared client. The two fields
/// that are not keys are what `load` reads at start from the files and environment the keys
/// name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSettings {
    /// How long an idle pooled connection is kept. Default 90 s.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host (per worker with the per-core runtime, whose workers each
    /// have their own pools); 0 turns reuse off. Default 64.
    pub pool_max_idle_per_host: usize,
    /// Offer HTTP/2 by ALPN on https. Default true.
    pub http2: bool,
    /// TCP keep-alive probes on upstream connections after this much idle time; zero turns
    /// them off. Default 60 s (so dead peers behind NAT or load balancers are noticed).
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// HTTP/2 PING interval on upstream connections; `None` (the default) sends none.
    #[serde(with = "humantime_serde::option")]
    pub http2_keep_alive_interval: Option<Duration>,
    /// PEM file of extra CAs trusted besides the webpki roots. Default none.
    pub ca_file: Option<PathBuf>,
    /// `http://`, `https://`, `socks5://` or `socks5h://` `[user:pass@]host[:port]` proxy for
    /// actions that set none; replaces HTTPS_PROXY and HTTP_PROXY (NO_PROXY still applies).
    /// Default none.
    #[serde(deserialize_with = "proxy_url")]
    pub proxy: Option<String>,
    /// Fixed addresses for host names, used instead of DNS (as curl's --resolve). Default none.
    pub resolve: BTreeMap<String, Vec<IpAddr>>,
    /// Extra CA certificates (PEM) trusted besides the webpki roots: `ca_file`'s, read by
    /// `load`. Default none.
    #[serde(skip)]
    pub extra_ca_pem: Option<String>,
    /// Proxies for actions that set none: `proxy`, else HTTP(S)_PROXY and NO_PROXY, read by
    /// `load`. Default none (direct connections).
    #[serde(skip)]
    pub proxies: Proxies,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
            http2: true,
            tcp_keepalive: Duration::from_secs(60),
            http2_keep_alive_interval: None,
            ca_file: None,
            proxy: None,
            resolve: BTreeMap::new(),
            extra_ca_pem: None,
            proxies: Proxies::default(),
        }
    }
}

fn proxy_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let raw = Option::<String>::deserialize(d)?;
    if let Some(raw) = &raw {
        ProxyUrl::parse(raw).map_err(serde::de::Error::custom)?;
    }
    Ok(raw)
}

impl ClientSettings {
    /// These settings with what their keys name read: the `ca_file` PEM, and the proxies
    /// (`proxy`, else HTTP(S)_PROXY) with NO_PROXY from the process environment.
    pub fn load(mut self) -> Result<Self, SettingError> {
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                SettingError::new("client.ca_file", format!("cannot read {}: {e}", path.display()))
            })?;
            self.extra_ca_pem = Some(pem);
        }
        // The error names the variable, not a key.
        let mut proxies = Proxies::from_env().map_err(|e| SettingError::new("", e))?;
        if let Some(raw) = &self.proxy {
            let proxy = ProxyUrl::parse(raw).map_err(|e| SettingError::new("client.proxy", e))?;
            proxies = proxies.with_proxy(proxy);
        }
        self.proxies = proxies;
        Ok(self)
    }
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the HTTP client: {0}")]
pub struct ClientBuildError(#[from] tls::TlsConfigError);

/// A pooled HTTP client with one TLS configuration and one set of proxies. A clone is a few
/// pointers: every attempt takes one, and a redirect's state keeps one for the next hop.
#[derive(Clone)]
pub struct HttpClient {
    inner: Decompression<Pooled>,
    proxies: Arc<Proxies>,
    /// The pool's connector, for previews of a connection (Render): one `Arc`.
    connector: connect::TimedConnector,
}

/// The client's pools behind an `Arc`: hyper-util's client is hundreds of bytes (its builders
/// and connector), and both send through `&self`.
#[derive(Clone)]
struct Pooled(Arc<Pools>);

struct Pools {
    /// hyper-util's pool: https origins that speak HTTP/1.1, plain http through a proxy,
    /// HTTP/1.0, and what the two below do not take when they are off.
    pool: PoolClient,
    /// callout's own HTTP/1.1 connections to plain http origins reached directly.
    h1: Option<Arc<H1Pool>>,
    /// callout's own h2 connections to https origins that negotiate h2.
    h2: Option<Arc<H2Pool>>,
}

impl tower::Service<Request<RequestBody>> for Pooled {
    type Response = Response<Incoming>;
    type Error = SendError;
    type Future = PooledFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // As hyper-util's own `Service` impl: the pool waits inside the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<RequestBody>) -> PooledFuture {
        if let Some(h1) = &self.0.h1 {
            if let Some(authority) = H1Pool::carries(&request) {
                return PooledFuture::Boxed(h1.clone().send(authority, request));
            }
        }
        let Some(h2) = &self.0.h2 else {
            return PooledFuture::Pool(self.0.pool.request(request));
        };
        match h2.route(&request) {
            Route::Pool => PooledFuture::Pool(self.0.pool.request(request)),
            // Nearly every request: what waits is hyper's future and two pointers.
            Route::H2(conn) => {
                let (sending, info) = conn.try_send(request);
                PooledFuture::H2 { sending, info, pools: self.0.clone() }
            }
            // The dial is a future of its own, so the requests that find a connection do not
            // reserve room for one.
            Route::Learn(authority, cell) => {
                let (h2, pools) = (h2.clone(), self.0.clone());
                PooledFuture::Boxed(Box::pin(async move {
                    let learned = h2.clone().learn(authority, cell).await;
                    h2.send_learned(learned, request, &pools.pool).await
                }))
            }
        }
    }
}

/// A response from either pool.
enum PooledFuture {
    Pool(ResponseFuture),
    H2 {
        sending: h2_pool::Sending,
        info: ConnInfo,
        pools: Arc<Pools>,
    },
    /// A first request to an origin, or one sent again.
    Boxed(BoxedSend),
}

impl Future for PooledFuture {
    type Output = Result<Response<Incoming>, SendError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            return match this {
                Self::Pool(call) => Pin::new(call).poll(cx).map_err(SendError::Pool),
                Self::Boxed(call) => call.as_mut().poll(cx),
                Self::H2 { sending, info, pools } => {
                    match h2_pool::sent(ready!(sending.as_mut().poll(cx)), info) {
                        Sent::Response(response) => Poll::Ready(Ok(response)),
                        Sent::Failed(e) => Poll::Ready(Err(e)),
                        Sent::Unsent(request) => {
                            let pools = pools.clone();
                            *this = Self::Boxed(Box::pin(async move {
                                match &pools.h2 {
                                    Some(h2) => h2.clone().resend(request, &pools.pool).await,
                                    None => pools.pool.request(request).await.map_err(SendError::Pool),
                                }
                            }));
                            continue;
                        }
                    }
                }
            };
        }
    }
}

impl HttpClient {
    /// True when both are the same client (clones of one pool).
    #[cfg(test)]
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.proxies, &other.proxies)
    }
}

impl HttpClient {
    /// The server's client: its trust roots and proxies, dialling what `egress` allows.
    pub fn new(settings: &ClientSettings, egress: Arc<EgressPolicy>) -> Result<Self, ClientBuildError> {
        Self::with_options(settings, egress, &TlsOptions::default(), settings.proxies.clone())
    }

    /// A client with the server's settings, the action's TLS options added and `proxies`.
    pub fn with_options(
        settings: &ClientSettings,
        egress: Arc<EgressPolicy>,
        tls: &TlsOptions,
        proxies: Proxies,
    ) -> Result<Self, ClientBuildError> {
        let tls = tls::client_config(settings.extra_ca_pem.as_deref(), settings.http2, tls)?;
        let proxies = Arc::new(proxies);
        let mut connector = connect::TimedConnector::new(
            Arc::new(tls),
            proxies.clone(),
            // Every send scopes the action's own connect timeout; the default only covers a
            // dial made outside `send`.
            crate::action::DEFAULT_CONNECT_TIMEOUT,
        )
        .with_tcp_keepalive((!settings.tcp_keepalive.is_zero()).then_some(settings.tcp_keepalive))
        .with_egress(egress, &settings.resolve);
        if proxies.uses_tls() {
            // The proxy is verified with the server's roots only: an action's TLS options are
            // for its upstream, and its client certificate is not shown to a proxy.
            let proxy_tls =
                tls::client_config(settings.extra_ca_pem.as_deref(), false, &TlsOptions::default())?;
            connector = connector.with_proxy_tls(Arc::new(proxy_tls));
        }
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new());
        if let Some(interval) = settings.http2_keep_alive_interval {
            // PINGs also while idle, so a pooled h2 connection that died is found before use.
            builder.http2_keep_alive_interval(interval).http2_keep_alive_while_idle(true);
        }
        let handover = Handover::new(connector.clone());
        let pool = builder.build(handover.clone());
        // With reuse off, hyper-util's pool makes every connection. Plain http through a proxy
        // (a forwarding one wants absolute-form targets and its own credentials) stays there.
        let reuse = settings.pool_max_idle_per_host > 0;
        let h1 = (reuse && proxies.configured_for(false).is_none()).then(|| {
            Arc::new(H1Pool::new(
                connector.clone(),
                settings.pool_idle_timeout,
                settings.pool_max_idle_per_host,
            ))
        });
        let h2 = (settings.http2 && reuse).then(|| {
            Arc::new(H2Pool::new(
                connector.clone(),
                handover,
                settings.pool_idle_timeout,
                settings.http2_keep_alive_interval,
            ))
        });
        // Decoding wraps the pooled client: it offers Accept-Encoding unless the action set
        // its own, and strips Content-Encoding/Content-Length from the responses it decodes.
        let inner = Decompression::new(Pooled(Arc::new(Pools { pool, h1, h2 })));
        Ok(Self { inner, proxies, connector })
    }

    /// The proxies this client connects through.
    pub fn proxies(&self) -> &Proxies {
        &self.proxies
    }

    /// What a connection to `uri` would do (route, proxy, egress verdicts), nothing dialled.
    pub async fn preview(&self, uri: &http::Uri) -> connect::RoutePreview {
        self.connector.preview(uri).await
    }

    /// `request` with the headers this client adds on the way out, in the order they are
    /// written on an HTTP/1.1 connection: Proxy-Authorization (below), Accept-Encoding
    /// (tower-http's decompression, unless set), Host (the pool, unless set) and
    /// Content-Length (hyper, for a body that is not empty). Render shows them; `send` and the
    /// attempt add the same ones on their own way down.
    pub fn wire_headers(&self, request: Request<Bytes>) -> Request<Bytes> {
        let mut request = self.with_proxy_authorization(request);
        if !request.headers().contains_key(header::ACCEPT_ENCODING) {
            // The decompression layer itself says what it offers, so the value shown is the one
            // sent: it hands its inner service the request synchronously, which keeps it.
            let kept = std::sync::Mutex::new(None);
            let keep = tower::service_fn(|probe: Request<()>| {
                *kept.lock().unwrap_or_else(|e| e.into_inner()) =
                    probe.headers().get(header::ACCEPT_ENCODING).cloned();
                std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new()))))
            });
            drop(Decompression::new(keep).call(Request::new(())));
            if let Some(offered) = kept.into_inner().unwrap_or_else(|e| e.into_inner()) {
                add(&mut request, header::ACCEPT_ENCODING, offered);
            }
        }
        if let Some(authority) = request.uri().authority() {
            // The pools' Host: the authority, its port only when not the scheme's default.
            let https = request.uri().scheme() == Some(&http::uri::Scheme::HTTPS);
            if let Ok(value) = HeaderValue::from_str(&h1_pool::host_header(authority, https)) {
                add(&mut request, header::HOST, value);
            }
        }
        let len = request.body().len();
        if len > 0 {
            add(&mut request, header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        request
    }

    /// Sends one request (no redirects followed), connecting within `connect_timeout` when no
    /// pooled connection is free.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
        connect_timeout: Duration,
    ) -> Result<Response<ResponseBody>, SendFailure> {
        let mut inner = self.inner.clone();
        let request = self.with_proxy_authorization(request);
        connect::CONNECT_TIMEOUT
            .scope(connect_timeout, inner.ready().await.map_err(|e| error::classify(&e))?.call(request))
            .await
            .map(|response| response.map(Box::new))
            .map_err(|e| error::classify(&e))
    }

    /// Plain http through a forwarding proxy: the proxy reads its credentials from the request
    /// itself (https targets send them in CONNECT instead). A Proxy-Authorization the caller set
    /// itself wins.
    fn with_proxy_authorization<B>(&self, mut request: Request<B>) -> Request<B> {
        let uri = request.uri();
        if uri.scheme_str() == Some("http") {
            let auth = uri.host().and_then(|host| self.proxies.forward_authorization(host));
            if let Some(mut value) = auth.and_then(|auth| HeaderValue::from_str(auth).ok()) {
                value.set_sensitive(true);
                request.headers_mut().entry(header::PROXY_AUTHORIZATION).or_insert(value);
            }
        }
        request
    }
}

/// Sets `name` unless the request has it (a map at http's size limit is left as it is).
fn add(request: &mut Request<Bytes>, name: header::HeaderName, value: HeaderValue) {
    if let Ok(entry) = request.headers_mut().try_entry(name) {
        entry.or_insert(value);
    }
}

/// The innermost service of an attempt: one request, no redirects, connecting within the
/// attempt context's connect timeout.
impl tower::Service<AttemptRequest> for HttpClient {
    type Response = Response<ResponseBody>;
    type Error = SendFailure;
    type Future = SendFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), SendFailure>> {
        self.inner.poll_ready(cx).map_err(|e| error::classify(&e))
    }

    fn call(&mut self, request: AttemptRequest) -> SendFuture {
        let connect_timeout = request.context.connect_timeout;
        let request = self.with_proxy_authorization(request.http.map(Full::new));
        SendFuture { call: connect::CONNECT_TIMEOUT.scope(connect_timeout, self.inner.call(request)) }
    }
}

/// What the pooled client's response future is, under the connect timeout's scope.
type PooledCall = TaskLocalFuture<Duration, DecompressionFuture<PooledFuture>>;

pin_project! {
    /// The response future of `HttpClient`: the pooled client's, its error classified.
    pub struct SendFuture {
        #[pin]
        call: PooledCall,
    }
}

impl Future for SendFuture {
    type Output = Result<Response<ResponseBody>, SendFailure>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let sent = ready!(self.project().call.poll(cx));
        Poll::Ready(sent.map(|response| response.map(Box::new)).map_err(|e| error::classify(&e)))
    }
}

/// Logs, once per action, that it skips certificate verification: the operator should see every
/// action that opts out. Nothing of the TLS options themselves is logged.
pub fn warn_if_insecure(action: &crate::action::HttpAction) {
    if action.tls().insecure_skip_verify {
        tracing::warn!(
            action_id = %action.id(),
            destination = %action.destination(),
            "tls.insecure_skip_verify is set: the upstream's certificate is NOT verified for this action"
        );
    }
}
