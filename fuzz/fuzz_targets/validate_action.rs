//! Raw bytes as the gRPC edge receives them: protobuf-decoded `ExecuteHttpActionRequest`, the
//! edge's conversion, then validation with a secret store. Never a panic; what passes is safe to
//! send; what fails names fields and never a secret value.
#![no_main]
use callout::{
    action::{HttpAction, InvalidAction},
    api::{convert, invalid_argument},
    pb,
};
use callout_fuzz::{assert_no_secret, FuzzSecrets};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Headers whose framing callout owns (validate.rs refuses them from callers).
const MANAGED: [&str; 7] =
    ["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "proxy-connection"];

fuzz_target!(|data: &[u8]| {
    let Ok(request) = pb::ExecuteHttpActionRequest::decode(data) else { return };
    let mut bad = InvalidAction::default();
    let input = convert::action_input(request, &mut bad);
    match HttpAction::from_input_with_secrets(input, &FuzzSecrets) {
        Ok(action) if bad.is_empty() => {
            assert!(matches!(action.url.scheme(), "http" | "https"), "scheme {}", action.url.scheme());
            assert!(action.url.host_str().is_some_and(|h| !h.is_empty()), "no host");
            assert!(
                action.url.username().is_empty() && action.url.password().is_none(),
                "credentials left in the URL"
            );
            assert!(action.url.as_str().parse::<http::Uri>().is_ok(), "URL the client cannot send");
            for name in MANAGED {
                assert!(!action.headers.contains_key(name), "managed header {name} passed");
            }
            assert!(!action.success.as_str().is_empty());
            assert!(action.retry.max_attempts >= 1);
            assert!(action.retry.multiplier.is_finite() && action.retry.multiplier >= 1.0);
            assert!(action.retry.initial_backoff <= action.retry.max_backoff);
            let _ = (action.destination(), format!("{action:?}"));
        }
        Ok(_) => {
            assert_no_secret(&bad, data);
            let _ = invalid_argument(&bad);
        }
        Err(more) => {
            assert!(!more.is_empty(), "refused with no violation");
            bad.violations.extend(more.violations);
            assert!(bad.violations.iter().all(|v| !v.field.is_empty() && !v.description.is_empty()));
            assert_no_secret(&bad, data);
            let _ = invalid_argument(&bad);
        }
    }
});
