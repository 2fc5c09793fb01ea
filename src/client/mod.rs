//! The outbound HTTP stack: one pooled hyper-util client over the timed connector, shared by
//! every action. Each concern sits in its own module: `connect` (DNS/TCP/TLS with timings),
//! `error` (classifying failures), `redirect` (following Location), `response` (reading heads
//! and capped bodies), `tls` (roots and ALPN). Response bodies are decoded (gzip, deflate, br,
//! zstd) by tower-http before anyone counts them, so body caps apply to the decoded size.
pub mod connect;
pub mod error;
pub mod redirect;
pub mod response;
pub mod tls;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use std::{sync::Arc, time::Duration};
use tower::ServiceExt as _;
use tower_http::decompression::{Decompression, DecompressionBody};

pub use connect::{ConnInfo, ConnMeta};
pub use error::SendFailure;

/// Request bodies are built whole from the action, so a full buffer is enough.
pub type RequestBody = Full<Bytes>;

/// A response body as the executor reads it: decoded per its Content-Encoding.
pub type ResponseBody = DecompressionBody<Incoming>;

/// Pool and protocol settings of the shared client.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// How long an idle pooled connection is kept. Default 90 s.
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host. Default 64.
    pub pool_max_idle_per_host: usize,
    /// Offer HTTP/2 by ALPN on https. Default true.
    pub http2: bool,
    /// Connect timeout when an action does not carry one. Default 10 s.
    pub connect_timeout: Duration,
    /// Extra CA certificates (PEM) trusted besides the webpki roots. Default none.
    pub extra_ca_pem: Option<String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 64,
            http2: true,
            connect_timeout: crate::action::DEFAULT_CONNECT_TIMEOUT,
            extra_ca_pem: None,
        }
    }
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("building the HTTP client: {0}")]
pub struct ClientBuildError(#[from] tls::TlsConfigError);

/// The shared, pooled HTTP client.
#[derive(Clone)]
pub struct HttpClient {
    inner: Decompression<Client<connect::TimedConnector, RequestBody>>,
}

impl HttpClient {
    pub fn new(settings: &ClientSettings) -> Result<Self, ClientBuildError> {
        let tls = tls::client_config(settings.extra_ca_pem.as_deref(), settings.http2)?;
        let connector = connect::TimedConnector::new(Arc::new(tls), settings.connect_timeout);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        // Decoding wraps the pooled client: it offers Accept-Encoding unless the action set
        // its own, and strips Content-Encoding/Content-Length from the responses it decodes.
        let inner = Decompression::new(inner);
        Ok(Self { inner })
    }

    /// Sends one request (no redirects followed), connecting within `connect_timeout` when no
    /// pooled connection is free.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
        connect_timeout: Duration,
    ) -> Result<Response<ResponseBody>, SendFailure> {
        connect::CONNECT_TIMEOUT
            .scope(connect_timeout, self.inner.clone().oneshot(request))
            .await
            .map_err(|e| error::classify(&e))
    }
}
