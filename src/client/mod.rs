//! The outbound HTTP stack. One attempt is one tower service, assembled in
//! `stack::attempt_stack`, one layer a line, outermost first:
//!
//! 1. `breaker::Breaker`: an open circuit refuses at once; the attempt's end feeds it.
//! 2. `cool_down::CoolDown`: waits out a destination's 429 Retry-After; a 429 starts one.
//! 3. `tenant::TenantQuota`: waits for the action's tenant's rate quota.
//! 4. `rate_limit::RateLimit`: global and per-destination limits (governor's GCRA).
//!
//! (1, 2 and 4 hold for a whole fleet with a `shared::SharedLimits` backend: the breaker layer
//! asks it once per attempt, and its verdict rides beside the request, `AttemptRequest::checked`,
//! to the two below.)
//! 5. `concurrency::DestinationSlot`: a slot to the destination, held by the response.
//! 6. `signing::Signer`: Standard Webhooks headers, signed anew on every attempt.
//! 7. `credentials::Credentials`: the action's auth (headers, an API key in the query, OAuth2
//!    tokens from the shared cache, AWS SigV4 over the request as it stands).
//! 8. `timeout::AttemptTimeout`: the attempt starts; its clock bounds every hop.
//! 9. `redirect::Redirect`: follows Location; each hop is its own dial (egress-checked by the
//!    connector), credentials and sensitive headers dropped across origins.
//! 10. `http_client::HttpClient`: tower-http's decompression over the pools (callout's own
//!     HTTP/1.1 connections to plain http origins, `h1_pool`, and h2 ones to https origins,
//!     `h2_pool`; hyper-util's pooled client for the rest), dialling through `connect`
//!     (DNS/TCP/proxy/TLS with timings and the egress check).
//!
//! Requests go down as `attempt::AttemptRequest`: the hop's HTTP request and the action's
//! `attempt::AttemptContext` (destination, deadline, timeouts, redirect policy, the start
//! signal, the tenant, the credentials and signing), built once per action and shared by an `Arc`. Errors travel boxed and are
//! classified once, in `stack::classify`.
//!
//! A new layer (credentials, request signing, tenant quotas, a shared limit in Redis) is, in
//! its own module: `Foo` implementing `attempt::Step`, `FooError` for its refusals (classified
//! in `stack::classify`), the layer `StepLayer(Foo(..))` on one line of `attempt_stack` with a
//! comment saying why it sits there, and tower-test unit tests over `attempt::tests::Harness`.
//! `Step::before` decides at once: `Before::Go(held)` (it may change the request, e.g. sign
//! it), `Before::Refuse(error)`, or `Before::Wait(future)` for a wait that is due (boxed, and
//! only then: the hot path allocates nothing for it; `Step::waited` then puts what the wait
//! got on the request, e.g. an OAuth2 token). `Step::after` gets `held` and the reply
//! (record a result, hand a permit to the response). No layer clones the rest of the stack per
//! call. A concern that wraps the rest of the attempt (a clock, a loop) is a service with a
//! named `pin-project-lite` future instead, as `timeout` and `redirect` are.
//!
//! Besides the layers: `clients` (one client per TLS/proxy setting), `proxy` (hyper-util's
//! matcher over the validated proxy URLs), `response` (reading heads and capped bodies; bodies are decoded
//! before anyone counts them, so caps apply to the decoded size), `body_budget` (the memory
//! budget buffered bodies grow under), `tls`, `host` (the one host normaliser and suffix
//! matcher every rule uses), `host_pattern`, `error` (classifying a failed send), and
//! `admission` (the server-wide limits the layers are built from: queue bound, running slot),
//! `fair` (the running slots, shared across tenants by fair share).
pub mod admission;
pub mod attempt;
pub mod body_budget;
pub mod breaker;
pub mod clients;
pub mod concurrency;
pub mod connect;
pub mod cool_down;
pub mod credentials;
pub mod egress;
pub mod error;
pub mod fair;
pub mod h1_pool;
pub mod h2_pool;
pub mod host;
pub mod host_pattern;
pub mod http_client;
pub mod proxy;
pub mod rate_limit;
pub mod redirect;
pub mod response;
pub mod shared;
pub mod signing;
pub mod stack;
pub mod tenant;
pub mod timeout;
pub mod tls;

pub use clients::Clients;
pub use connect::{ConnInfo, ConnMeta};
pub use error::SendFailure;
pub use http_client::{
    warn_if_insecure, ClientBuildError, ClientSettings, HttpClient, RequestBody, ResponseBody,
};
pub use proxy::{NoProxy, Proxies};
