//! Property tests (proptest) for the input-facing parsers: action validation, success-code
//! specs, secret templating and IP normalisation for the egress policy. Each runs the default
//! 256 cases; `PROPTEST_CASES=20000 cargo test --test it properties` runs a longer search.
use callout::{
    action::{
        secret_ref::{self, SecretSource},
        ActionInput, BodyInput, HttpAction, InvalidAction, StatusSpec,
    },
    client::egress::{normalize_ip, EgressPolicy},
};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

struct OneSecret(String);
impl SecretSource for OneSecret {
    fn secret(&self, name: &str) -> Option<String> {
        (name == "S").then(|| self.0.clone())
    }
}

proptest! {
    /// Any input validates or is refused with named fields; never a panic. What passes has an
    /// http(s) URL and header values free of CR and LF.
    #[test]
    fn validation_never_panics_and_accepts_only_safe_actions(
        method in prop_oneof![Just("GET".to_owned()), Just("post".to_owned()), ".{0,8}"],
        url in prop_oneof![
            "https?://[a-z0-9.]{1,20}(:[0-9]{1,5})?/[ -~]{0,30}",
            "[ -~]{0,40}",
            ".{0,40}",
        ],
        header_name in "[ -~]{0,12}",
        header_value in ".{0,24}",
        query_value in ".{0,24}",
        json in ".{0,24}",
        success in "[0-9x,\\- ]{0,12}",
    ) {
        let input = ActionInput {
            method,
            url,
            headers: vec![(header_name, header_value)],
            query: vec![("q".into(), query_value)],
            body: BodyInput::Json(json),
            success_codes: success,
            ..ActionInput::default()
        };
        match HttpAction::from_input(input) {
            Ok(action) => {
                prop_assert!(matches!(action.url().scheme(), "http" | "https"));
                for value in action.headers().values() {
                    prop_assert!(!value.as_bytes().iter().any(|b| *b == b'\r' || *b == b'\n'));
                }
                prop_assert!(action.url().as_str().parse::<http::Uri>().is_ok());
            }
            Err(invalid) => {
                prop_assert!(!invalid.violations.is_empty());
                prop_assert!(invalid.violations.iter().all(|v| !v.field.is_empty()));
            }
        }
    }

    /// A spec that parses means what it says: its text parses again to the same set, and
    /// listed statuses are members.
    #[test]
    fn status_specs_parse_consistently(text in "[0-9x,\\- ]{0,16}", status in 100u16..600) {
        if let Ok(spec) = StatusSpec::parse(&text) {
            let again = StatusSpec::parse(spec.as_str()).unwrap();
            prop_assert_eq!(spec.contains(status), again.contains(status));
        }
        let single = StatusSpec::parse(&status.to_string()).unwrap();
        prop_assert!(single.contains(status));
        let other = if status == 599 { 100 } else { status + 1 };
        prop_assert!(!single.contains(other));
        let class = StatusSpec::parse(&format!("{}xx", status / 100)).unwrap();
        prop_assert!(class.contains(status));
    }

    /// Whatever the secret holds, a JSON body stays JSON and carries the value exactly, a URL
    /// gains no new host, and templating never panics on arbitrary text.
    #[test]
    fn secret_templating_escapes_values(secret in ".{0,20}", text in ".{0,40}") {
        let mut input = ActionInput {
            url: "https://h.test/a/{{secret:S}}".into(),
            body: BodyInput::Json(r#"{"k":"{{secret:S}}"}"#.into()),
            headers: vec![("X".into(), text)],
            ..ActionInput::default()
        };
        let mut bad = InvalidAction::default();
        secret_ref::resolve(&mut input, &OneSecret(secret.clone()), &mut bad);
        let BodyInput::Json(json) = &input.body else { unreachable!() };
        let parsed: serde_json::Value = serde_json::from_str(json).unwrap();
        prop_assert_eq!(parsed["k"].as_str(), Some(secret.as_str()));
        let url = url::Url::parse(&input.url).unwrap();
        prop_assert_eq!(url.host_str(), Some("h.test"));
        prop_assert!(url.query().is_none() && url.fragment().is_none());
    }

    /// IPv4 carried in IPv6 (mapped, compatible, NAT64) is judged as the IPv4 address itself.
    #[test]
    fn ipv4_in_ipv6_is_checked_as_ipv4(octets in any::<[u8; 4]>()) {
        let v4 = Ipv4Addr::from(octets);
        let policy = EgressPolicy::default();
        let [a, b, c, d] = octets;
        let low = (u16::from(c) << 8) | u16::from(d);
        let high = (u16::from(a) << 8) | u16::from(b);
        for v6 in [v4.to_ipv6_mapped(), Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, high, low)] {
            prop_assert_eq!(normalize_ip(IpAddr::V6(v6)), IpAddr::V4(v4));
            prop_assert_eq!(
                policy.check_ip("h", 80, IpAddr::V6(v6)).is_ok(),
                policy.check_ip("h", 80, IpAddr::V4(v4)).is_ok()
            );
        }
    }
}
