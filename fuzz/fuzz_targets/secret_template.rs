//! `{{secret:NAME}}` templating in the URL, a query value, a header value and the JSON, text or
//! form body. Never a panic, never a secret value in an error; a URL secret cannot change the
//! host; a reference that passes is replaced by the value.
#![no_main]
use callout::action::{BodyInput, HttpAction};
use callout_fuzz::{assert_no_secret, minimal_input, FuzzSecrets, TOKEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (u8, String, String)| {
    let (place, text, prefix) = input;
    let mut action = minimal_input();
    match place % 6 {
        0 => action.url = format!("https://api.example.com/{prefix}{text}"),
        1 => action.query = vec![("q".into(), text.clone())],
        2 => action.headers = vec![("x-token".into(), text.clone())],
        3 => action.body = BodyInput::Json(text.clone()),
        4 => action.body = BodyInput::Text(text.clone()),
        _ => action.body = BodyInput::Form(vec![("f".into(), text.clone())]),
    }
    let raw = format!("{prefix}{text}");
    match HttpAction::from_input_with_secrets(action, &FuzzSecrets) {
        Ok(action) => {
            if place % 6 == 0 {
                assert_eq!(action.url.host_str(), Some("api.example.com"), "{raw:?}");
            }
            if text.contains("{{secret:TOKEN}}") && place % 6 >= 2 && !matches!(place % 6, 5) {
                // Header values and JSON and text bodies carry the value itself.
                let sent = action.headers.get("x-token").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
                let body = action.body.to_vec();
                let carried = |b: &[u8]| b.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes());
                assert!(carried(&sent) || carried(&body), "{raw:?}: the secret was not put in");
            }
        }
        Err(bad) => assert_no_secret(&bad, raw.as_bytes()),
    }
});
