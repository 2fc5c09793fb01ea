//! URL hosts and addresses as the egress policy sees them. A URL host is normalised by the URL
//! parser (decimal, octal and hex IPv4 spellings become dotted quads) before the connector reads
//! it back from the request target; these checks hold the two readings together, and hold the
//! policy's own normalisation (case, trailing dot, IPv4 in IPv6) stable.
#![no_main]
use callout::client::egress::{normalize_ip, EgressPolicy, EgressRule, EgressSettings};
use callout_fuzz::inet_aton;
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fuzz_target!(|input: (String, [u8; 16], u16, String)| {
    let (raw, bytes, port, rule) = input;
    let default = EgressPolicy::default();
    let private = EgressPolicy::new(EgressSettings { allow_private_networks: true, ..Default::default() });

    // Any address: normalising is idempotent, and an IPv4 address is judged the same however it
    // is carried in IPv6.
    for ip in
        [IpAddr::V6(Ipv6Addr::from(bytes)), IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))]
    {
        let once = normalize_ip(ip);
        assert_eq!(normalize_ip(once), once, "{ip} normalises unstably");
        if let IpAddr::V4(v4) = once {
            for carried in [IpAddr::V6(v4.to_ipv6_mapped()), IpAddr::V4(v4)] {
                assert_eq!(default.check_ip("h", port, carried), default.check_ip("h", port, once), "{ip}");
            }
            if v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() {
                assert!(default.check_ip("h", port, once).is_err(), "{ip} reaches {v4}, allowed by default");
            }
        }
        if let IpAddr::V6(v6) = once {
            if v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xfe00) == 0xfc00 {
                assert!(default.check_ip("h", port, once).is_err(), "{ip} allowed by default");
            }
        }
        let _ = private.check_ip("h", port, ip);
    }

    // A host name: case and a trailing dot do not change the verdict.
    let host = raw.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase();
    let verdict = default.check_host(&host, port);
    for spelling in [raw.clone(), host.to_ascii_uppercase(), format!("{host}."), format!("[{host}]")] {
        assert_eq!(default.check_host(&spelling, port).is_ok(), verdict.is_ok(), "{raw:?} vs {spelling:?}");
    }

    // The same text as a URL authority, the way an action's URL reaches the connector.
    if let Ok(url) = url::Url::parse(&format!("http://{raw}/")) {
        if let Ok(uri) = url.as_str().parse::<http::Uri>() {
            let seen = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
            let read_back = seen.parse::<IpAddr>().ok();
            match url.host() {
                Some(url::Host::Ipv4(v4)) => assert_eq!(read_back, Some(IpAddr::V4(v4)), "{raw:?}"),
                Some(url::Host::Ipv6(v6)) => assert_eq!(read_back, Some(IpAddr::V6(v6)), "{raw:?}"),
                Some(url::Host::Domain(name)) => {
                    // A name a resolver would read as an address would skip the host check.
                    assert_eq!(read_back, None, "{raw:?}: domain {name:?} reads as an address");
                    assert_eq!(inet_aton(name), None, "{raw:?}: domain {name:?} is an IPv4 spelling");
                }
                None => {}
            }
            assert_eq!(uri.port_u16().or(Some(80)), url.port_or_known_default(), "{raw:?}");
            let _ = default.check_host(seen, port);
            if let Some(ip) = read_back {
                let _ = default.check_ip(seen, port, ip);
            }
        }
    }

    // Operator rules: what parses displays as text that parses back to the same rule.
    if let Ok(parsed) = rule.parse::<EgressRule>() {
        let again: EgressRule = parsed.to_string().parse().expect("a rule's own text parses");
        assert_eq!(again, parsed, "{rule:?}");
        let policy = EgressPolicy::new(EgressSettings { deny: vec![parsed.clone()], ..Default::default() });
        let _ = policy.check_host(&host, port);
        let _ = policy.check_ip(&host, port, IpAddr::V6(Ipv6Addr::from(bytes)));
        if let EgressRule::Net(net) = &parsed {
            // A denied network is denied whatever else is allowed.
            let open = EgressPolicy::new(EgressSettings {
                allow_private_networks: true,
                allow: vec![
                    EgressRule::Net("0.0.0.0/0".parse().expect("cidr")),
                    EgressRule::Net("::/0".parse().expect("cidr")),
                ],
                deny: vec![parsed.clone()],
                ..Default::default()
            });
            assert!(open.check_ip("h", port, net.network()).is_err(), "{rule:?}");
        }
    }
});
