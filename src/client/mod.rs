//! The outbound HTTP stack: pooled hyper-util clients over the timed connector. This file only
//! names the modules and re-exports their main types (it imports nothing). Each concern sits in
//! its own module: `clients` (the shared client, and clients for actions with their own TLS or
//! proxy), `http_client` (the pooled client and the settings it is built from), `connect`
//! (DNS/TCP/proxy/TLS with timings; the proxy handshakes are hyper-util's CONNECT `Tunnel` and
//! `SocksV5`), `error` (classifying failures), `host` (the one host normaliser and suffix
//! matcher every rule uses), `proxy` (which proxy: hyper-util's matcher over the validated
//! proxy URLs), `redirect` (following Location), `response` (reading heads and capped bodies),
//! `body_budget` (the memory budget buffered bodies grow under), `tls` (roots, client certificates, ALPN). Response bodies are decoded (gzip, deflate, br,
//! zstd) by tower-http before anyone counts them, so body caps apply to the decoded size. What
//! an action passes before it sends sits in `admission`, built from `concurrency`, `rate_limit`
//! and `breaker` (keyed by `host_pattern`).
pub mod admission;
pub mod attempt;
pub mod body_budget;
pub mod breaker;
pub mod clients;
pub mod concurrency;
pub mod connect;
pub mod cool_down;
pub mod egress;
pub mod error;
pub mod host;
pub mod host_pattern;
pub mod http_client;
pub mod proxy;
pub mod rate_limit;
pub mod redirect;
pub mod response;
pub mod stack;
pub mod timeout;
pub mod tls;

pub use clients::Clients;
pub use connect::{ConnInfo, ConnMeta};
pub use error::SendFailure;
pub use http_client::{
    warn_if_insecure, ClientBuildError, ClientSettings, HttpClient, RequestBody, ResponseBody,
};
pub use proxy::{NoProxy, Proxies};
