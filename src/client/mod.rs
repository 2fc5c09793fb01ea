//! The outbound HTTP stack. One attempt is one tower service, assembled in
//! `stack::attempt_stack`, one layer a line, outermost first:
//!
//! 1. `breaker::Breaker`: an open circuit refuses at once; the attempt's end feeds it.
//! 2. `cool_down::CoolDown`: waits out a destination's 429 Retry-After; a 429 starts one.
//! 3. `rate_limit::RateLimit`: global and per-destination limits (governor's GCRA).
//!
//! (1–3 hold for a whole fleet with a `shared::SharedLimits` backend: the breaker layer asks it
//! once per attempt, and its verdict rides on the request to the two below.)
//! 4. `concurrency::DestinationSlot`: a slot to the destination, held by the response.
//! 5. (room for credentials and request signing)
//! 6. `timeout::AttemptTimeout`: the attempt starts; its clock bounds every hop.
//! 7. `redirect::Redirect`: follows Location; each hop is its own dial (egress-checked by the
//!    connector), credentials and sensitive headers dropped across origins.
//! 8. `http_client::HttpClient`: tower-http's decompression over hyper-util's pooled client,
//!    dialling through `connect` (DNS/TCP/proxy/TLS with timings and the egress check).
//!
//! Every layer is an `attempt::Step`; the attempt carries its `attempt::AttemptContext` in the
//! request's extensions (destination, deadline, timeouts, redirect policy, the start signal).
//! Errors travel boxed and are classified once, in `stack::classify`. Besides the layers:
//! `clients` (one client per TLS/proxy setting), `proxy` (hyper-util's matcher over the
//! validated proxy URLs), `response` (reading heads and capped bodies; bodies are decoded
//! before anyone counts them, so caps apply to the decoded size), `body_budget` (the memory
//! budget buffered bodies grow under), `tls`, `host` (the one host normaliser and suffix
//! matcher every rule uses), `host_pattern`, `error` (classifying a failed send), and
//! `admission` (the server-wide limits the layers are built from: queue bound, running slot).
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
pub mod shared;
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
