//! One attempt as a tower stack: the one function that assembles the layers, and the one place
//! a failed attempt's error is classified.
use super::{
    admission::Limits,
    attempt::{AttemptRequest, StepLayer},
    breaker::BreakerError,
    concurrency::{DestinationSlot, SlotError},
    cool_down::CoolDownError,
    credentials::{Credentials, CredentialsError},
    error::SendFailure,
    rate_limit::RateLimitError,
    redirect::RedirectLayer,
    signing::{Signer, SigningError},
    tenant::{TenantQuota, TenantQuotaError},
    timeout::{AttemptTimeout, TimeoutError},
};
use crate::action::{ActionError, AttemptEnd, ErrorKind};
use http::Response;
use tower::{BoxError, Service, ServiceBuilder};

/// One attempt, outermost first. Refusals come before waits, waits before the clock starts,
/// and the clock bounds everything that may send. No layer boxes its future; a layer boxes a
/// wait only when one is due.
pub fn attempt_stack<S, B>(
    limits: &Limits,
    credentials: &Credentials,
    client: S,
) -> impl Service<AttemptRequest, Response = Response<B>, Error = BoxError, Future: Send> + Send
where
    S: Service<AttemptRequest, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    ServiceBuilder::new()
        // An open circuit refuses at once, before any wait; the attempt's end feeds it. In a
        // fleet it also makes the attempt's one shared check (marks and rate buckets), its
        // verdict left beside the request for the cool-down and rate-limit layers.
        .layer(StepLayer(limits.breaker()))
        // A destination that answered 429 Retry-After holds back every action to it (every
        // replica's, in a fleet), and the 429s seen here start such a cool-down.
        .layer(StepLayer(limits.cool_down()))
        // The tenant's own rate quota, before the shared limits: a tenant over its quota waits
        // in its own bucket without spending the global or a destination's tokens. In a fleet
        // its bucket is one of the breaker layer's one check instead (all buckets taken
        // together, so still one round trip per attempt), and this layer acts only when that
        // check fell back to local limits.
        .layer(StepLayer(TenantQuota(limits.tenants())))
        // Global and per-destination rate limits (the fleet's buckets, in a fleet): waits,
        // bounded by the total deadline.
        .layer(StepLayer(limits.rate_limit()))
        // A slot to the destination, held until the response (body included) is dropped.
        .layer(StepLayer(DestinationSlot(limits.concurrency())))
        // Signing, then credentials: after every wait, so a timestamp, token or signature is
        // fresh; signing first, so an AWS signature covers the webhook headers too. A token
        // fetch waits within the total deadline, before the attempt's clock starts.
        .layer(StepLayer(Signer))
        .layer(StepLayer(credentials.clone()))
        // The attempt's clock starts once it may send, and bounds every hop (the body read
        // is bounded by the same instant).
        .layer(AttemptTimeout::layer())
        // Each hop is its own send through the client, so the egress-checking connector
        // dials every one; credentials are dropped across origins.
        .layer(RedirectLayer)
        // The pooled client, decompression around it (`HttpClient`).
        .service(client)
}

/// How a failed attempt ended, classified once by the type of its error.
#[derive(Debug)]
pub enum Failed {
    /// A limit refused before anything was sent: no attempt is recorded, the action ends.
    Refused(ActionError),
    /// The attempt ran and failed.
    Attempt(ActionError, AttemptEnd),
}

/// Classifies the error of an attempt stack.
pub fn classify(error: &BoxError) -> Failed {
    let refused = |kind| Failed::Refused(ActionError::new(kind, error.to_string()));
    if error.is::<BreakerError>() {
        return refused(ErrorKind::CircuitOpen);
    }
    if error.is::<CoolDownError>()
        || error.is::<RateLimitError>()
        || error.is::<SlotError>()
        || error.is::<TenantQuotaError>()
    {
        return refused(ErrorKind::RateLimited);
    }
    // Credentials that could not be had (a failed token fetch) or applied: nothing was sent.
    if let Some(e) = error.downcast_ref::<CredentialsError>() {
        return Failed::Refused(ActionError::new(e.kind, e.message.clone()));
    }
    if let Some(e) = error.downcast_ref::<SigningError>() {
        return Failed::Refused(ActionError::new(e.kind(), e.to_string()));
    }
    if error.is::<TimeoutError>() {
        let end = AttemptEnd::Error { kind: ErrorKind::Timeout, sent: true };
        return Failed::Attempt(ActionError::new(ErrorKind::Timeout, error.to_string()), end);
    }
    if let Some(failure) = error.downcast_ref::<SendFailure>() {
        let end = AttemptEnd::Error { kind: failure.kind, sent: failure.sent };
        return Failed::Attempt(ActionError::new(failure.kind, failure.message.clone()), end);
    }
    let end = AttemptEnd::Error { kind: ErrorKind::Protocol, sent: true };
    Failed::Attempt(ActionError::new(ErrorKind::Protocol, error.to_string()), end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{
        attempt::AttemptRequest,
        credentials::oauth2::{HttpTokenFetcher, TokenCache},
        HttpClient,
    };

    #[test]
    fn the_stack_future_holds_no_copy_of_the_stack() {
        fn future_size<S: Service<AttemptRequest>>(_: &S) -> usize {
            std::mem::size_of::<S::Future>()
        }
        let egress = std::sync::Arc::new(crate::client::egress::EgressPolicy::new(Default::default()));
        let client = HttpClient::new(&Default::default(), egress).unwrap();
        let tokens =
            TokenCache::new(HttpTokenFetcher::new(client.clone(), Default::default()), Default::default());
        let limits = Limits::new(&Default::default(), &Default::default());
        let stack = attempt_stack(&limits, &Credentials::new(tokens), client);
        // Every layer's future holds the next one's: a layer that kept the rest of the stack (or
        // the redirect state) inline would make each future above it that much larger, and every
        // attempt would copy it. 256 bytes on x86_64 today.
        assert!(future_size(&stack) <= 512, "{}", future_size(&stack));
    }

    #[test]
    fn errors_are_refusals_or_failed_attempts() {
        let refusal: BoxError = BreakerError("open".into()).into();
        assert!(matches!(classify(&refusal), Failed::Refused(e) if e.kind == ErrorKind::CircuitOpen));
        let slot: BoxError = SlotError("busy".into()).into();
        assert!(matches!(classify(&slot), Failed::Refused(e) if e.kind == ErrorKind::RateLimited));
        // A token that could not be had ends the action before anything is sent.
        let auth: BoxError = CredentialsError::new(ErrorKind::Auth, "the token endpoint answered 500").into();
        assert!(matches!(classify(&auth), Failed::Refused(e) if e.kind == ErrorKind::Auth));
        let quota: BoxError = TenantQuotaError("tenant \"t\" is over its rate quota".into()).into();
        assert!(matches!(classify(&quota), Failed::Refused(e) if e.kind == ErrorKind::RateLimited));
        let sent: BoxError = SendFailure::new(ErrorKind::Dns, "no such host", false).into();
        assert!(matches!(
            classify(&sent),
            Failed::Attempt(e, AttemptEnd::Error { kind: ErrorKind::Dns, sent: false }) if e.message == "no such host"
        ));
    }
}
