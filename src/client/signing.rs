//! Request signing as a layer of the attempt: Standard Webhooks (standardwebhooks.com). Each
//! attempt gets `webhook-id` (the action id, the same on every attempt so the receiver can
//! de-duplicate), a fresh `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64
//! HMAC-SHA256 over "id.timestamp.body">`. It sits above the credentials layer, so an AWS
//! signature covers these headers too.
use super::attempt::{AttemptRequest, Before, Step, StepLayer};
use crate::action::{ErrorKind, Signing};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Request};
use std::time::SystemTime;

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
    type Held = ();

    fn before(&self, request: &mut AttemptRequest) -> Before<()> {
        // Unsigned actions (the common path) pass at once.
        let Some(sign) = &request.context.signing else { return Before::Go(()) };
        let signed = match &sign.signing {
            Signing::None => Ok(()),
            Signing::StandardWebhooks { key } => {
                let now =
                    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
                standard_webhooks(&mut request.http, key, &sign.message_id, now)
            }
        };
        match signed {
            Ok(()) => Before::Go(()),
            Err(e) => Before::Refuse(e.into()),
        }
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
    use crate::client::attempt::{
        tests::{request, Harness},
        SignRequest,
    };
    use std::sync::Arc;
    use std::time::Duration;

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
        let mut harness = Harness::new(StepLayer(Signer));
        let signing = Signing::StandardWebhooks { key: Arc::from(&b"k"[..]) };
        for _ in 0..2 {
            let mut req = request("http://h/", Duration::from_secs(30));
            *req.http.body_mut() = Bytes::from_static(b"{}");
            Arc::get_mut(&mut req.context).unwrap().signing = SignRequest::of(&signing, "act-1");
            let call = harness.send(req).await;
            let sent = harness.answer(200).await.http;
            let timestamp: u64 = sent.headers()["webhook-timestamp"].to_str().unwrap().parse().unwrap();
            assert_eq!(sent.headers()["webhook-id"], "act-1");
            assert_eq!(
                sent.headers()["webhook-signature"],
                webhook_signature(b"k", "act-1", timestamp, b"{}").as_str()
            );
            call.await.unwrap().unwrap();
        }
        // An unsigned action passes untouched.
        let call = harness.start("http://h/", Duration::from_secs(30)).await;
        assert!(harness.answer(200).await.http.headers().get("webhook-signature").is_none());
        call.await.unwrap().unwrap();
        assert!(SignRequest::of(&Signing::None, "act-1").is_none());
    }
}
