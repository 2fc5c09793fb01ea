//! Timeouts: per-attempt (slow head, stalled body), total, the gRPC deadline, and connect.
use crate::support::*;
use bytes::Bytes;
use callout::pb;
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::net::{TcpSocket, TcpStream};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// An upstream that waits `delay` before answering 200 "late".
async fn slow_upstream(delay: Duration) -> Upstream {
    Upstream::start(move |_| async move {
        tokio::time::sleep(delay).await;
        text(200, "late")
    })
    .await
}

fn timeouts(connect: Option<Duration>, attempt: Option<Duration>, total: Option<Duration>) -> pb::Timeouts {
    pb::Timeouts { connect: connect.map(dur), attempt: attempt.map(dur), total: total.map(dur) }
}

fn message(resp: &pb::ExecuteHttpActionResponse) -> String {
    resp.error.as_ref().map(|e| e.message.clone()).unwrap_or_default()
}

#[tokio::test]
async fn slow_response_head_hits_the_attempt_timeout() {
    let upstream = slow_upstream(Duration::from_secs(5)).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/slow"));
    req.timeouts = Some(Box::new(timeouts(None, Some(ms(200)), None)));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    let elapsed = t0.elapsed();

    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Timeout, "{resp:?}");
    assert!(message(&resp).contains("attempt timeout"), "{resp:?}");
    assert!(!resp.proceed, "ABORT is the default");
    assert!(resp.response.is_none(), "no response head arrived: {resp:?}");
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    assert_eq!(resp.attempts[0].status, 0);
    assert_eq!(resp.attempts[0].error.as_ref().map(|e| e.kind()), Some(pb::ErrorKind::Timeout));
    assert!(elapsed >= ms(190), "returned before the timeout: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "the 5 s upstream was waited for: {elapsed:?}");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn body_that_stalls_midway_hits_the_attempt_timeout() {
    let upstream = Upstream::start(|_| async {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        tokio::spawn(async move {
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"first chunk;")))).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"too late")))).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Response::builder()
            .status(200)
            .header("content-type", "text/plain")
            .body(StreamBody::new(stream).boxed())
            .unwrap()
    })
    .await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/stall"));
    req.timeouts = Some(Box::new(timeouts(None, Some(ms(300)), None)));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    let elapsed = t0.elapsed();

    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Timeout, "{resp:?}");
    assert!(message(&resp).contains("attempt timeout"), "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    assert_eq!(resp.attempts[0].status, 200, "the head arrived before the stall: {resp:?}");
    assert!(elapsed >= ms(290), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "the stalled body was waited for: {elapsed:?}");
}

#[tokio::test]
async fn total_timeout_cuts_a_retried_action() {
    // The first request fails at once with 503 (retried); the second hangs. The attempt timeout
    // is long, so only the total deadline can end the second attempt.
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = Upstream::start(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                text(503, "busy")
            } else {
                tokio::time::sleep(Duration::from_secs(5)).await;
                text(200, "late")
            }
        }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(5)));
    req.timeouts = Some(Box::new(timeouts(None, Some(Duration::from_secs(10)), Some(ms(500)))));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    let elapsed = t0.elapsed();

    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Timeout, "{resp:?}");
    assert!(message(&resp).contains("total timeout"), "{resp:?}");
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    assert_eq!(resp.attempts[0].status, 503);
    assert!(resp.attempts[0].backoff.is_some(), "{resp:?}");
    assert!(resp.attempts[1].backoff.is_none(), "no wait after the last attempt: {resp:?}");
    assert!(elapsed >= ms(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn attempt_timeouts_retry_until_the_total_deadline() {
    // Each attempt times out after 200 ms and is retried; the total of 500 ms ends the run, and
    // the attempt that the total cut reports the total clock.
    let upstream = slow_upstream(Duration::from_secs(5)).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(10)));
    req.timeouts = Some(Box::new(timeouts(None, Some(ms(200)), Some(ms(500)))));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    let elapsed = t0.elapsed();

    assert_eq!(error_kind(&resp), pb::ErrorKind::Timeout, "{resp:?}");
    let n = resp.attempts.len();
    assert!((2..=3).contains(&n), "200 ms attempts within 500 ms: {resp:?}");
    for a in &resp.attempts[..n - 1] {
        let m = &a.error.as_ref().expect("attempt error").message;
        assert!(m.contains("attempt timeout"), "{resp:?}");
        assert!(a.backoff.is_some(), "{resp:?}");
    }
    let last = resp.attempts[n - 1].error.as_ref().expect("last attempt error");
    assert!(last.message.contains("total timeout"), "{resp:?}");
    assert!(message(&resp).contains("total timeout"), "{resp:?}");
    assert!(elapsed >= ms(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
}

#[tokio::test]
async fn grpc_deadline_bounds_the_total() {
    let upstream = slow_upstream(Duration::from_secs(5)).await;
    let sidecar = Sidecar::start().await;
    // No attempt or total timeout of its own, and retries on: only the deadline can stop it.
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(3)));
    let mut call = tonic::Request::new(req);
    call.set_timeout(ms(300));
    let t0 = Instant::now();
    let result = sidecar.client.clone().execute(call).await;
    let elapsed = t0.elapsed();

    let resp = result.expect("an OK reply before the deadline, not DEADLINE_EXCEEDED").into_inner();
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Timeout, "{resp:?}");
    assert!(message(&resp).contains("total timeout"), "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    assert!(elapsed < Duration::from_secs(2), "the 5 s upstream was waited for: {elapsed:?}");
}

#[tokio::test]
async fn a_call_that_times_out_and_continues() {
    // The seed scenario ("times out after 10 s and continues"), with a shorter attempt timeout.
    let upstream = slow_upstream(Duration::from_secs(5)).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("POST", &upstream.url("/hook"));
    req.body = Some(pb::execute_http_action_request::Body::Json(r#"{"a":1}"#.into()));
    req.timeouts = Some(Box::new(timeouts(None, Some(ms(300)), None)));
    req.on_failure = pb::OnFailure::Continue as i32;
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;

    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Timeout, "{resp:?}");
    assert!(message(&resp).contains("attempt timeout"), "{resp:?}");
    assert!(resp.proceed, "CONTINUE: the engine goes on after a failure: {resp:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert_eq!(upstream.hits(), 1);
}

/// A loopback listener that never accepts, its accept queue filled by our own connections, so
/// a further connect gets no SYN-ACK. `None` when the kernel still completes every handshake
/// (then a connect timeout cannot be provoked on loopback).
async fn full_backlog() -> Option<(tokio::net::TcpListener, Vec<TcpStream>)> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind("127.0.0.1:0".parse().unwrap()).ok()?;
    let listener = socket.listen(0).ok()?;
    let addr = listener.local_addr().ok()?;
    let mut fillers = Vec::new();
    for _ in 0..64 {
        match tokio::time::timeout(ms(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(_)) => return None,
            // This one hung: the queue is full.
            Err(_) => return Some((listener, fillers)),
        }
    }
    None
}

#[tokio::test]
async fn connect_timeout_on_a_full_backlog() {
    let Some((listener, _fillers)) = full_backlog().await else {
        eprintln!("loopback completes every handshake here; connect timeout not provoked");
        return;
    };
    let addr = listener.local_addr().unwrap();
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &format!("http://{addr}/"));
    req.timeouts = Some(Box::new(timeouts(Some(ms(200)), Some(Duration::from_secs(5)), None)));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    let elapsed = t0.elapsed();

    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Timeout, "{resp:?}");
    assert!(message(&resp).contains("connect timeout"), "{resp:?}");
    assert!(elapsed >= ms(190), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "the attempt timeout, not the connect one, fired: {elapsed:?}");
}

#[tokio::test]
async fn connect_timeout_is_accepted_on_a_normal_call() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.timeouts =
        Some(Box::new(timeouts(Some(ms(500)), Some(Duration::from_secs(2)), Some(Duration::from_secs(3)))));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("ok"));
}

#[tokio::test]
async fn zero_timeouts_are_invalid() {
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", "http://127.0.0.1:9/");
    req.timeouts = Some(Box::new(timeouts(Some(Duration::ZERO), Some(Duration::ZERO), Some(Duration::ZERO))));
    let status = sidecar.try_execute(req).await.expect_err("zero timeouts are refused");
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(fields, ["timeouts.attempt", "timeouts.connect", "timeouts.total"]);
}
