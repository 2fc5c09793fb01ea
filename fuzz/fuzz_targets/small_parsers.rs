//! The small parsers of outside text: Retry-After (an upstream's header), traceparent (the
//! caller's metadata), proxy URLs (a caller's field or the environment), NO_PROXY lists, rate
//! specs (`10/s burst 20`) and rate-limit and host-pattern rules of the operator's config.
#![no_main]
use callout::{
    action::{parse_retry_after, ProxyUrl, TraceContext},
    client::{
        host_pattern::HostPattern,
        proxy::{NoProxy, Proxies},
        rate_limit::{Rate, RateLimitRule},
    },
};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, SystemTime};

fuzz_target!(|input: (u8, String, String, u16)| {
    let (which, a, b, port) = input;
    match which % 6 {
        0 => {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let wait = parse_retry_after(&a, now);
            if let Ok(secs) = a.trim().parse::<u64>() {
                assert_eq!(wait, Some(Duration::from_secs(secs)), "{a:?}");
            }
        }
        1 => {
            if let Some(trace) = TraceContext::parse(&a, Some(&b)) {
                assert_eq!(trace.trace_id.len(), 32);
                assert_eq!(trace.parent_id.len(), 16);
                let child = trace.child_traceparent(Some(&b));
                let again = TraceContext::parse(&child, None).expect("a child traceparent parses");
                assert_eq!(again.trace_id, trace.trace_id);
                assert!(trace.state.as_ref().is_none_or(|s| s.len() <= 512));
            }
        }
        2 => {
            if let Ok(proxy) = ProxyUrl::parse(&a) {
                assert!(!proxy.host().is_empty());
                let shown = proxy.to_string();
                if !a.contains('@') {
                    let again = ProxyUrl::parse(&shown).expect("a proxy's display parses");
                    assert_eq!(again, proxy, "{a:?} shown as {shown:?}");
                }
                assert!(proxy.authorization().is_none_or(|auth| !shown.contains(auth)));
            }
        }
        3 => {
            // NO_PROXY is read through the proxies it guards: a host bypasses or it does not,
            // whatever its case.
            let Ok(proxy) = ProxyUrl::parse("http://proxy.invalid:3128") else { return };
            let proxies = Proxies::new(Some(proxy.clone()), Some(proxy), NoProxy::parse(&a));
            let bypasses = |host: &str| proxies.for_target(true, host).is_none();
            let upper = b.to_ascii_uppercase();
            assert_eq!(bypasses(&upper), bypasses(&b), "{a:?} / {b:?}");
        }
        4 => {
            if let Ok(rate) = a.parse::<Rate>() {
                assert_eq!(rate.to_string().parse::<Rate>(), Ok(rate), "{a:?}");
            }
            if let Ok(rule) = a.parse::<RateLimitRule>() {
                let _ = rule.pattern.matches(&b, port);
            }
        }
        _ => {
            if let Ok(pattern) = a.parse::<HostPattern>() {
                let again: HostPattern = pattern.to_string().parse().expect("a pattern's own text parses");
                assert_eq!(again, pattern, "{a:?}");
                let host = b.trim_end_matches('.').to_ascii_lowercase();
                let _ = pattern.matches(&host, port);
            }
        }
    }
});
