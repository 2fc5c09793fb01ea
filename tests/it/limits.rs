//! Server limits: rate limits per destination, the shared 429 cool-down, the queue bound
//! (RESOURCE_EXHAUSTED), per-host concurrency, the circuit breaker, and cancellation.
use crate::support::*;
use callout::{client::admission::LimitSettings, exec::ExecSettings, pb};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn with_limits(limits: LimitSettings) -> ExecSettings {
    ExecSettings { limits, ..test_settings() }
}

fn rate_limited(rule: &str) -> ExecSettings {
    with_limits(LimitSettings { rate_limits: vec![rule.parse().unwrap()], ..LimitSettings::default() })
}

fn with_total(mut req: pb::ExecuteHttpActionRequest, total: Duration) -> pb::ExecuteHttpActionRequest {
    req.timeouts = Some(Box::new(pb::Timeouts { total: Some(dur(total)), ..Default::default() }));
    req
}

/// An upstream that answers 200 after `delay`, counting requests in flight at once.
async fn slow_upstream(delay: Duration) -> (Upstream, Arc<AtomicUsize>) {
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (now2, peak2) = (now.clone(), peak.clone());
    let upstream = Upstream::start(move |_| {
        let (now, peak) = (now2.clone(), peak2.clone());
        async move {
            let current = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(current, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            now.fetch_sub(1, Ordering::SeqCst);
            text(200, "ok")
        }
    })
    .await;
    (upstream, peak)
}

#[tokio::test]
async fn a_rate_limit_of_5_per_second_holds_over_two_seconds_of_load() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Arc::new(Sidecar::start_with(rate_limited("127.0.0.1=5/s burst 1")).await);
    let started = Instant::now();
    let calls: Vec<_> = (0..30)
        .map(|_| {
            let sidecar = sidecar.clone();
            let req = with_total(request("GET", &upstream.url("/")), Duration::from_secs(2));
            tokio::spawn(async move { sidecar.execute(req).await })
        })
        .collect();
    let (mut succeeded, mut late) = (0, 0);
    for call in calls {
        let resp = call.await.unwrap();
        match (resp.outcome(), error_kind(&resp)) {
            (pb::Outcome::Succeeded, _) => succeeded += 1,
            // A place granted at the deadline's edge leaves the send too little time (seen on
            // a loaded box): it was let through by the limit, so it counts as a send.
            (_, pb::ErrorKind::Timeout) if resp.attempts.len() == 1 => late += 1,
            _ => {
                assert_eq!(error_kind(&resp), pb::ErrorKind::RateLimited, "{resp:?}");
                assert!(resp.attempts.is_empty(), "a refused action records no attempt");
            }
        }
    }
    let elapsed = started.elapsed();
    // 5/s with no burst over a 2 s window: one at once, then one every 200 ms.
    let hits = upstream.hits();
    assert!(
        (succeeded..=succeeded + late).contains(&hits),
        "every send that got an answer succeeded ({succeeded}, {late} late); every refusal sent nothing: {hits}"
    );
    assert!((8..=11).contains(&(succeeded + late)), "{succeeded} + {late} let through in {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn a_rate_limit_wait_past_the_deadline_fails_at_once_without_sending() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start_with(rate_limited("127.0.0.1=1/m")).await;
    let first = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(first.outcome(), pb::Outcome::Succeeded);

    let started = Instant::now();
    let mut req = with_total(request("GET", &upstream.url("/")), Duration::from_secs(5));
    req.on_failure = pb::OnFailure::Continue.into();
    let second = sidecar.execute(req).await;
    assert!(started.elapsed() < Duration::from_secs(1), "no sleep when the wait cannot fit");
    assert_eq!(error_kind(&second), pb::ErrorKind::RateLimited);
    assert!(second.proceed, "a refused action still follows on_failure");
    let message = &second.error.as_ref().unwrap().message;
    assert!(message.contains("1/m burst 1") && message.contains("past the deadline"), "{message}");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn a_429_with_retry_after_slows_the_host_for_every_action() {
    let upstream = failing(1, 429, &[("retry-after", "1")]).await;
    let sidecar = Sidecar::start().await;
    let first = sidecar.execute(request("GET", &upstream.url("/a"))).await;
    assert_eq!(first.response.as_ref().unwrap().status, 429);

    // A short deadline cannot wait out the cool-down: refused, nothing sent.
    let hurried = sidecar.execute(with_total(request("GET", &upstream.url("/b")), ms(400))).await;
    assert_eq!(error_kind(&hurried), pb::ErrorKind::RateLimited);
    assert!(hurried.error.unwrap().message.contains("429"));
    assert_eq!(upstream.hits(), 1);

    // Another action waits for the host's cool-down before it sends.
    let started = Instant::now();
    let patient = sidecar.execute(request("GET", &upstream.url("/c"))).await;
    assert_eq!(patient.outcome(), pb::Outcome::Succeeded);
    assert!(started.elapsed() >= ms(500), "waited {:?}", started.elapsed());
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn a_full_queue_answers_resource_exhausted_at_once() {
    let (upstream, _) = slow_upstream(ms(600)).await;
    let sidecar = Arc::new(
        Sidecar::start_with(with_limits(LimitSettings {
            max_in_flight: 1,
            max_queued: 1,
            max_in_flight_per_host: 8,
            ..LimitSettings::default()
        }))
        .await,
    );
    let running = {
        let (sidecar, req) = (sidecar.clone(), request("GET", &upstream.url("/1")));
        tokio::spawn(async move { sidecar.execute(req).await })
    };
    while upstream.hits() == 0 {
        tokio::time::sleep(ms(5)).await;
    }
    let queued = {
        let (sidecar, req) = (sidecar.clone(), request("GET", &upstream.url("/2")));
        tokio::spawn(async move { sidecar.execute(req).await })
    };
    tokio::time::sleep(ms(100)).await;

    let started = Instant::now();
    let refused = sidecar.try_execute(request("GET", &upstream.url("/3"))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("at capacity"), "{}", refused.message());
    // When to call again, and why, for clients that read the details (grpcurl prints them).
    let details = tonic_types::StatusExt::get_error_details(&refused);
    assert_eq!(details.retry_info().and_then(|r| r.retry_delay), Some(Duration::from_secs(1)), "{details:?}");
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!((info.reason.as_str(), info.domain.as_str()), ("QUEUE_FULL", "callout"), "{info:?}");
    assert_eq!(info.metadata.get("queued").map(String::as_str), Some("1"), "{info:?}");
    let refused_stream = sidecar.stream(request("GET", &upstream.url("/4"))).await.unwrap_err();
    assert_eq!(refused_stream.code(), tonic::Code::ResourceExhausted);
    assert!(started.elapsed() < ms(300), "refused at once");

    assert_eq!(running.await.unwrap().outcome(), pb::Outcome::Succeeded);
    assert_eq!(queued.await.unwrap().outcome(), pb::Outcome::Succeeded);
    assert_eq!(upstream.hits(), 2, "refused calls sent nothing");
    // With the queue drained, new actions are admitted again.
    assert_eq!(sidecar.execute(request("GET", &upstream.url("/5"))).await.outcome(), pb::Outcome::Succeeded);
}

#[tokio::test]
async fn per_host_concurrency_is_capped() {
    let (upstream, peak) = slow_upstream(ms(150)).await;
    let sidecar = Arc::new(
        Sidecar::start_with(with_limits(LimitSettings {
            max_in_flight_per_host: 2,
            ..LimitSettings::default()
        }))
        .await,
    );
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let (sidecar, req) = (sidecar.clone(), request("GET", &upstream.url(&format!("/{i}"))));
            tokio::spawn(async move { sidecar.execute(req).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().outcome(), pb::Outcome::Succeeded);
    }
    assert_eq!(upstream.hits(), 6);
    assert_eq!(peak.load(Ordering::SeqCst), 2, "at most 2 in flight to the host");
}

#[tokio::test]
async fn the_breaker_opens_after_consecutive_failures_and_half_opens_after_its_cool_down() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let upstream = Upstream::start(move |_| {
        let ok = flag.load(Ordering::SeqCst);
        async move {
            if ok {
                text(200, "ok")
            } else {
                text(500, "down")
            }
        }
    })
    .await;
    let sidecar = Sidecar::start_with(with_limits(LimitSettings {
        breaker_failures: 3,
        breaker_cool_down: ms(300),
        ..LimitSettings::default()
    }))
    .await;
    for _ in 0..3 {
        let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
        assert_eq!(error_kind(&resp), pb::ErrorKind::UnexpectedStatus);
    }
    let open = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(error_kind(&open), pb::ErrorKind::CircuitOpen, "{open:?}");
    assert!(open.error.unwrap().message.contains("3 consecutive failures"));
    assert_eq!(upstream.hits(), 3, "an open circuit sends nothing");

    // After the cool-down one probe goes; it fails, so the circuit opens again.
    tokio::time::sleep(ms(350)).await;
    let probe = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(error_kind(&probe), pb::ErrorKind::UnexpectedStatus);
    assert_eq!(
        error_kind(&sidecar.execute(request("GET", &upstream.url("/"))).await),
        pb::ErrorKind::CircuitOpen
    );
    assert_eq!(upstream.hits(), 4);

    // The host recovers: the next probe closes the circuit.
    healthy.store(true, Ordering::SeqCst);
    tokio::time::sleep(ms(350)).await;
    for _ in 0..3 {
        assert_eq!(
            sidecar.execute(request("GET", &upstream.url("/"))).await.outcome(),
            pb::Outcome::Succeeded
        );
    }
    assert_eq!(upstream.hits(), 7);
}

#[tokio::test]
async fn connection_refusals_open_the_breaker_too() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    drop(listener);
    let sidecar = Sidecar::start_with(with_limits(LimitSettings {
        breaker_failures: 2,
        breaker_cool_down: Duration::from_secs(60),
        ..LimitSettings::default()
    }))
    .await;
    for _ in 0..2 {
        assert_eq!(error_kind(&sidecar.execute(request("GET", &url)).await), pb::ErrorKind::Connect);
    }
    assert_eq!(error_kind(&sidecar.execute(request("GET", &url)).await), pb::ErrorKind::CircuitOpen);
}

#[tokio::test]
async fn a_cancelled_call_stops_retrying_at_once() {
    let upstream = Upstream::fixed(503, "down").await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(pb::RetryPolicy {
        max_attempts: 10,
        initial_backoff: Some(dur(ms(300))),
        multiplier: 1.0,
        jitter: Some(false),
        ..Default::default()
    }));
    let mut client = sidecar.client.clone();
    let call = tokio::spawn(async move { client.execute(req).await });
    while upstream.hits() == 0 {
        tokio::time::sleep(ms(5)).await;
    }
    call.abort();
    let _ = call.await;
    tokio::time::sleep(ms(800)).await;
    assert_eq!(upstream.hits(), 1, "no retry after the caller went away");
}

/// Admission comes before validation: a full server refuses an action without validating it
/// (an invalid one gets RESOURCE_EXHAUSTED, not INVALID_ARGUMENT), so overload costs no secret
/// reads or PEM parsing.
#[tokio::test]
async fn a_full_queue_refuses_before_validating() {
    let (upstream, _) = slow_upstream(ms(600)).await;
    let sidecar = Arc::new(
        Sidecar::start_with(with_limits(LimitSettings {
            max_in_flight: 1,
            max_queued: 0,
            max_in_flight_per_host: 8,
            ..LimitSettings::default()
        }))
        .await,
    );
    let running = {
        let (sidecar, req) = (sidecar.clone(), request("GET", &upstream.url("/1")));
        tokio::spawn(async move { sidecar.execute(req).await })
    };
    while upstream.hits() == 0 {
        tokio::time::sleep(ms(5)).await;
    }
    let mut invalid = request("GET", "not a url");
    invalid.headers.push(kv("X-Token", "{{secret:unknown}}"));
    let refused = sidecar.try_execute(invalid.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    let refused_stream = sidecar.stream(invalid.clone()).await.unwrap_err();
    assert_eq!(refused_stream.code(), tonic::Code::ResourceExhausted, "{refused_stream:?}");

    assert_eq!(running.await.unwrap().outcome(), pb::Outcome::Succeeded);
    // Admitted, the same action is validated and refused for what it is.
    let invalid_now = sidecar.try_execute(invalid).await.unwrap_err();
    assert_eq!(invalid_now.code(), tonic::Code::InvalidArgument, "{invalid_now:?}");
}
