//! Request signing as a layer of the attempt: Standard Webhooks (standardwebhooks.com). Each
//! attempt gets `webhook-id` (the action id, the same on every attempt so the receiver can
//! de-duplicate), a fresh `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64
//! HMAC-SHA256 over "id.timestamp.body">`. It sits above the credentials layer, so an AWS
//! signature covers these headers too.
use super::attempt::{Next, Reply, Step, StepLayer};
use crate::action::{ErrorKind, Signing};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Request};
use std::{sync::Arc, time::SystemTime};
use tower::ServiceExt as _;

/// What an attempt is signed with, carried in the request's extensions.
#[derive(Clone)]
pub struct SignRequest {
    pub signing: Signing,
    /// The message id: the action's id.
    pub message_id: Arc<str>,
}

/// A request that cannot carry its signature (an id or a map that does not fit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signing: {0}")]
pub struct SigningError(pub String);

impl SigningError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::InvalidRequest
    }
}

/// Signs each attempt as its `SignRequest` says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signer;

/// Signing as a layer of the attempt stack.
pub type SigningLayer = StepLayer<Signer>;

impl Step for Signer {
    async fn around<S: Next<B>, B: Send + 'static>(self, mut request: Request<Bytes>, next: S) -> Reply<B> {
        if let Some(sign) = request.extensions_mut().remove::<SignRequest>() {
            match &sign.signing {
                Signing::None => {}
                Signing::StandardWebhooks { key } => {
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_secs();
                    standard_webhooks(&mut request, key, &sign.message_id, now)?;
                }
            }
        }
        next.oneshot(request).await.map_err(Into::into)
    }
}

/// The `v1,<base64>` signature of `body` as message `id` at `timestamp`.
pub fn webhook_signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(id.as_bytes());
    context.update(format!(".{timestamp}.").as_bytes());
    context.update(body);
    let tag = context.sign();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
}

/// Sets the three Standard Webhooks headers on `request`.
pub fn standard_webhooks(
    request: &mut Request<Bytes>,
    key: &[u8],
    id: &str,
    timestamp: u64,
) -> Result<(), SigningError> {
    let signature = webhook_signature(key, id, timestamp, request.body());
    let id = HeaderValue::from_str(id)
        .map_err(|_| SigningError("the action_id does not fit the webhook-id header".into()))?;
    let headers = request.headers_mut();
    for (name, value) in [
        ("webhook-id", id),
        ("webhook-timestamp", HeaderValue::from(timestamp)),
        // Only a signature: no secret, but no use to anyone else either.
        (
            "webhook-signature",
            HeaderValue::from_str(&signature).map_err(|_| SigningError("signature".into()))?,
        ),
    ] {
        headers
            .try_insert(name, value)
            .map_err(|_| SigningError("too many headers to add the webhook signature".into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::request;
    use std::time::Duration;
    use tower::{Layer as _, Service as _};

    /// The example of the Standard Webhooks reference libraries' tests.
    #[test]
    fn matches_the_reference_test_vector() {
        let key =
            base64::engine::general_purpose::STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            webhook_signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_attempt_is_signed_anew() {
        let (mock, mut handle) = tower_test::mock::pair::<Request<Bytes>, http::Response<()>>();
        let mut service = StepLayer(Signer).layer(mock);
        let mut req = request("http://h/", Duration::from_secs(30));
        *req.body_mut() = Bytes::from_static(b"{}");
        req.extensions_mut().insert(SignRequest {
            signing: Signing::StandardWebhooks { key: Arc::from(&b"k"[..]) },
            message_id: "act-1".into(),
        });
        let call = tokio::spawn(service.call(req));
        let (sent, reply) = handle.next_request().await.unwrap();
        let timestamp: u64 = sent.headers()["webhook-timestamp"].to_str().unwrap().parse().unwrap();
        assert_eq!(sent.headers()["webhook-id"], "act-1");
        assert_eq!(
            sent.headers()["webhook-signature"],
            webhook_signature(b"k", "act-1", timestamp, b"{}").as_str()
        );
        reply.send_response(http::Response::new(()));
        call.await.unwrap().unwrap();
    }
}
