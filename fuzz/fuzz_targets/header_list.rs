//! Header lists as a caller sends them (names and values in any bytes, repeated names). What
//! passes is every header, in order, with its value; what fails names the header's index.
#![no_main]
use callout::action::HttpAction;
use callout_fuzz::{assert_no_secret, minimal_input, FuzzSecrets};
use libfuzzer_sys::fuzz_target;

const MANAGED: [&str; 7] =
    ["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "proxy-connection"];
const SENSITIVE: [&str; 6] =
    ["authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key"];

fuzz_target!(|headers: Vec<(String, String)>| {
    let mut input = minimal_input();
    input.headers = headers.clone();
    let raw: Vec<u8> = headers.iter().flat_map(|(n, v)| n.bytes().chain(v.bytes())).collect();
    match HttpAction::from_input_with_secrets(input, &FuzzSecrets) {
        Ok(action) => {
            assert_eq!(action.headers.len(), headers.len(), "a header was dropped or added");
            for (name, value) in &headers {
                let lower = name.to_ascii_lowercase();
                assert!(!MANAGED.contains(&lower.as_str()), "managed header {name:?} passed");
                let values = action.headers.get_all(lower.as_str());
                let sent: Vec<&[u8]> = values.iter().map(|v| v.as_bytes()).collect();
                assert!(!sent.is_empty(), "{name:?} missing");
                if !value.contains("{{secret:") {
                    assert!(sent.contains(&value.as_bytes()), "{name:?} lost its value");
                }
                assert!(sent.iter().all(|v| !v.contains(&b'\r') && !v.contains(&b'\n')), "CR/LF in {name:?}");
                if SENSITIVE.contains(&lower.as_str()) || value.contains("{{secret:") {
                    assert!(values.iter().any(|v| v.is_sensitive()), "{name:?} not marked sensitive");
                }
            }
        }
        Err(bad) => {
            assert!(!bad.is_empty());
            for v in &bad.violations {
                let index = v
                    .field
                    .strip_prefix("headers[")
                    .and_then(|rest| rest.split_once(']'))
                    .and_then(|(i, _)| i.parse::<usize>().ok());
                // A header that breaks retry safety (an idempotency key) is reported on retry.
                assert!(
                    index.is_some_and(|i| i < headers.len()) || v.field.starts_with("retry."),
                    "field {:?}: {}",
                    v.field,
                    v.description
                );
            }
            assert_no_secret(&bad, &raw);
        }
    }
});
