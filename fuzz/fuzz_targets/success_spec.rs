//! Success-code specs (`"2xx,304"`, also retry_on_status) and error_messages keys (`"404"`,
//! `"5xx"`). A spec that parses re-parses from its own text to the same set, and holds only
//! statuses 100-599; a key that passes is found by `lookup`.
#![no_main]
use callout::action::{HttpAction, StatusSpec};
use callout_fuzz::minimal_input;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, Vec<(String, String)>)| {
    let (spec, messages) = input;
    if let Ok(parsed) = StatusSpec::parse(&spec) {
        assert_eq!(parsed.as_str(), spec.trim());
        let again = StatusSpec::parse(parsed.as_str()).expect("a spec's own text parses");
        assert_eq!(again, parsed);
        for status in 0..=1000u16 {
            if parsed.contains(status) {
                assert!((100..=599).contains(&status), "{spec:?} holds {status}");
            }
        }
        assert!(!parsed.contains(u16::MAX));
    }

    // The same spec and keys through validation, as a caller sends them.
    let messages: Vec<(String, String)> = messages.into_iter().take(64).collect();
    let mut action = minimal_input();
    action.success_codes = spec.clone();
    action.retry.retry_on_status = spec.clone();
    action.error_messages = messages.clone();
    match HttpAction::from_input(action) {
        Ok(action) => {
            if !spec.trim().is_empty() {
                assert_eq!(action.success.as_str(), spec.trim());
            }
            // Later entries for the same status win, as in a map.
            let mut exact = std::collections::HashMap::new();
            for (key, message) in &messages {
                let key = key.trim();
                if key.len() == 3 && key.bytes().all(|b| b.is_ascii_digit()) {
                    exact.insert(key.parse::<u16>().expect("three digits"), message.as_str());
                }
            }
            for (status, message) in exact {
                assert_eq!(action.error_messages.lookup(status), Some(message), "status {status}");
            }
        }
        Err(bad) => {
            assert!(!bad.is_empty());
            for v in &bad.violations {
                assert!(
                    v.field == "success_codes"
                        || v.field == "retry.retry_on_status"
                        || v.field.starts_with("error_messages["),
                    "unexpected field {}: {}",
                    v.field,
                    v.description
                );
            }
        }
    }
});
