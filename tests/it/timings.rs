//! Attempt and action timings: connector phases, pooled-connection reuse, DNS, remote address.
use crate::support::*;
use callout::pb;
use std::time::{Duration, SystemTime};

/// A proto duration as std; an absent one counts as zero.
fn std_dur(d: &Option<prost_types::Duration>) -> Duration {
    d.map(|d| Duration::try_from(d).expect("non-negative duration")).unwrap_or_default()
}

fn only_timing(resp: &pb::ExecuteHttpActionResponse) -> (&pb::Attempt, &pb::AttemptTiming) {
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    let attempt = &resp.attempts[0];
    (attempt, attempt.timing.as_ref().expect("attempt timing"))
}

#[tokio::test]
async fn first_attempt_reports_measured_phases() {
    let upstream = Upstream::fixed(200, "hello").await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let (attempt, t) = only_timing(&resp);

    assert!(t.connect.is_some() && std_dur(&t.connect) > Duration::ZERO, "connect measured: {t:?}");
    assert_eq!(std_dur(&t.dns), Duration::ZERO, "no DNS for an IP literal: {t:?}");
    assert_eq!(std_dur(&t.tls), Duration::ZERO, "no TLS for http: {t:?}");
    assert!(!t.reused_connection, "a fresh sidecar has no pooled connection");
    let first_byte = std_dur(&t.first_byte);
    let total = std_dur(&t.total);
    assert!(t.first_byte.is_some() && first_byte > Duration::ZERO, "{t:?}");
    assert!(first_byte <= total, "first byte {first_byte:?} after total {total:?}");
    assert!(std_dur(&t.connect) <= first_byte, "connecting is part of the wait for the first byte: {t:?}");
    assert!(total < Duration::from_secs(2), "{t:?}");
    assert_eq!(attempt.remote_address, upstream.addr.to_string());
}

#[tokio::test]
async fn second_call_reuses_the_pooled_connection() {
    let upstream = Upstream::fixed(200, "hello").await;
    let sidecar = Sidecar::start().await;
    let first = sidecar.execute(request("GET", &upstream.url("/one"))).await;
    let second = sidecar.execute(request("GET", &upstream.url("/two"))).await;
    assert_eq!(second.outcome(), pb::Outcome::Succeeded, "{second:?}");

    let (_, t1) = only_timing(&first);
    assert!(!t1.reused_connection);
    assert!(std_dur(&t1.connect) > Duration::ZERO, "{t1:?}");

    let (attempt, t2) = only_timing(&second);
    assert!(t2.reused_connection, "the second call should go over the pooled connection: {t2:?}");
    assert_eq!(std_dur(&t2.connect), Duration::ZERO, "a reused connection costs no connect: {t2:?}");
    assert_eq!(std_dur(&t2.dns), Duration::ZERO, "{t2:?}");
    assert_eq!(std_dur(&t2.tls), Duration::ZERO, "{t2:?}");
    assert!(std_dur(&t2.first_byte) > Duration::ZERO, "{t2:?}");
    assert!(std_dur(&t2.first_byte) <= std_dur(&t2.total), "{t2:?}");
    assert_eq!(attempt.remote_address, upstream.addr.to_string(), "reused connections still name the peer");
}

#[tokio::test]
async fn localhost_is_resolved_and_timed() {
    // The upstream listens on 127.0.0.1 only; if `localhost` resolves to ::1 first, the connector
    // must move on to the next address.
    let upstream = Upstream::fixed(200, "via name").await;
    let sidecar = Sidecar::start().await;
    let url = format!("http://localhost:{}/", upstream.addr.port());
    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().body_text.as_deref(), Some("via name"));
    let (attempt, t) = only_timing(&resp);
    assert!(t.dns.is_some() && std_dur(&t.dns) > Duration::ZERO, "a host name is resolved: {t:?}");
    assert!(std_dur(&t.connect) > Duration::ZERO, "{t:?}");
    assert!(
        attempt.remote_address.starts_with("127.0.0.1:") || attempt.remote_address.starts_with("[::1]:"),
        "remote address {:?}",
        attempt.remote_address
    );
    assert!(attempt.remote_address.ends_with(&format!(":{}", upstream.addr.port())));
}

#[tokio::test]
async fn action_timing_covers_every_attempt_and_backoff() {
    let upstream = failing(1, 503, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    let backoff = Duration::from_millis(30);
    req.retry = Some(Box::new(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(backoff)),
        jitter: Some(false),
        ..Default::default()
    }));
    let before = SystemTime::now();
    let resp = sidecar.execute(req).await;
    let after = SystemTime::now();
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.attempts.len(), 2);

    let timing = resp.timing.as_ref().expect("action timing");
    let started_at: SystemTime = timing.started_at.expect("started_at set").try_into().unwrap();
    // Allow a little clock granularity either side.
    let slack = Duration::from_millis(5);
    assert!(started_at + slack >= before && started_at <= after, "started_at {started_at:?} not in the call");
    let total = std_dur(&timing.total);
    let attempts: Duration = resp.attempts.iter().map(|a| std_dur(&a.timing.as_ref().unwrap().total)).sum();
    assert!(attempts > Duration::ZERO);
    assert!(
        total >= attempts + backoff,
        "action total {total:?} < attempts {attempts:?} + backoff {backoff:?}"
    );
    assert!(total <= after.duration_since(before).unwrap(), "action total {total:?} longer than the call");
    assert_eq!(std_dur(&resp.attempts[0].backoff), backoff);
    assert!(resp.attempts[1].backoff.is_none(), "the last attempt has no backoff");
}
