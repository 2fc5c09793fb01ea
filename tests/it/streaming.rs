//! ExecuteStream: event order, body chunking and offsets, retries, failures, caps, cancellation.
use crate::support::*;
use bytes::Bytes;
use callout::pb::{self, action_event::Event};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Frame;
use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

/// ExecuteStream's largest BodyChunk.
const MAX_CHUNK: usize = 64 * 1024;

/// `n` bytes of a pattern whose period (251) does not divide any chunk size, so a chunk placed
/// at a wrong offset or repeated or dropped shows up.
fn pattern(n: usize) -> Bytes {
    (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
}

/// A 200 response whose body is `data`, sent in frames of `frame` bytes.
fn framed(data: Bytes, frame: usize) -> Response<UpBody> {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> =
        data.chunks(frame).map(|c| Ok(Frame::data(Bytes::copy_from_slice(c)))).collect();
    Response::builder()
        .status(200)
        .header("content-type", "application/octet-stream")
        .header("x-upstream", "yes")
        .body(http_body_util::StreamBody::new(tokio_stream::iter(frames)).boxed())
        .unwrap()
}

/// A short readable name per event, BodyChunk runs collapsed, for order assertions.
fn labels(events: &[Event]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for event in events {
        let label = match event {
            Event::Accepted(_) => "Accepted".to_string(),
            Event::AttemptStarted(e) => format!("AttemptStarted({})", e.attempt),
            Event::ResponseHead(e) => format!("ResponseHead({},{})", e.attempt, e.status),
            Event::BodyChunk(e) => format!("BodyChunk({})", e.attempt),
            Event::AttemptFailed(e) => format!(
                "AttemptFailed({},{:?},{})",
                e.attempt,
                e.error.as_ref().map(|e| e.kind()).unwrap_or(pb::ErrorKind::Unspecified),
                if e.will_retry { "retry" } else { "final" }
            ),
            Event::Completed(c) => {
                format!("Completed({:?})", c.result.as_ref().map(|r| r.outcome()).unwrap_or_default())
            }
            Event::PageCompleted(p) => format!("PageCompleted({})", p.page.as_ref().map_or(0, |p| p.number)),
        };
        if label.starts_with("BodyChunk") && out.last() == Some(&label) {
            continue;
        }
        out.push(label);
    }
    out
}

fn chunks(events: &[Event]) -> Vec<&pb::BodyChunk> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::BodyChunk(c) => Some(c),
            _ => None,
        })
        .collect()
}

/// Checks every chunk is at most 64 KiB and the offsets are contiguous from 0; returns the body.
fn reassemble(events: &[Event]) -> Vec<u8> {
    let mut body = Vec::new();
    for chunk in chunks(events) {
        assert!(chunk.data.len() <= MAX_CHUNK, "chunk of {} bytes at {}", chunk.data.len(), chunk.offset);
        assert!(!chunk.data.is_empty(), "empty chunk at {}", chunk.offset);
        assert_eq!(chunk.offset, body.len() as u64, "offsets must be contiguous");
        body.extend_from_slice(&chunk.data);
    }
    body
}

fn completed(events: &[Event]) -> &pb::ExecuteHttpActionResponse {
    match events.last() {
        Some(Event::Completed(c)) => c.result.as_ref().expect("Completed.result"),
        other => panic!("last event is not Completed: {other:?}"),
    }
}

fn to_std(d: &Option<prost_types::Duration>) -> Option<Duration> {
    d.map(|d| Duration::try_from(d).expect("non-negative duration"))
}

/// A port on 127.0.0.1 where nothing listens.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/")
}

#[tokio::test]
async fn events_come_in_order_and_chunks_rebuild_the_body() {
    let data = pattern(300 * 1024);
    let served = data.clone();
    // Upstream frames larger than a chunk, so the sidecar has to split them.
    let upstream = Upstream::start(move |_| {
        let served = served.clone();
        async move { framed(served, 100_000) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/big"));
    req.action_id = "wf-42".into();
    let events = sidecar.stream(req).await.unwrap();

    assert_eq!(
        labels(&events),
        ["Accepted", "AttemptStarted(1)", "ResponseHead(1,200)", "BodyChunk(1)", "Completed(Succeeded)"]
    );
    let Event::Accepted(accepted) = &events[0] else { unreachable!() };
    assert_eq!(accepted.action_id, "wf-42");
    assert!(accepted.accepted_at.is_some());
    let Event::AttemptStarted(started) = &events[1] else { unreachable!() };
    assert!(started.started_at.is_some());

    let Event::ResponseHead(head) = &events[2] else { unreachable!() };
    assert_eq!(head.reason, "OK");
    assert_eq!(head.http_version, "HTTP/1.1");
    assert!(
        head.headers.iter().any(|h| h.name == "x-upstream" && h.value == "yes"),
        "headers: {:?}",
        head.headers
    );
    assert_eq!(head.remote_address, upstream.addr.to_string());
    let timing = head.timing.as_ref().expect("ResponseHead.timing");
    assert!(to_std(&timing.first_byte).is_some_and(|d| d > Duration::ZERO), "{timing:?}");
    assert!(to_std(&timing.connect).is_some_and(|d| d > Duration::ZERO), "{timing:?}");
    assert!(timing.total.is_none(), "total is not known at the head: {timing:?}");

    let body = reassemble(&events);
    assert!(chunks(&events).len() >= 5, "300 KiB needs at least 5 chunks of 64 KiB");
    assert!(chunks(&events).iter().all(|c| c.attempt == 1));
    assert_eq!(body.len(), data.len());
    assert!(body == data, "the chunks do not rebuild the upstream body");

    let result = completed(&events);
    assert_eq!(result.outcome(), pb::Outcome::Succeeded, "{:?}", result.error);
    assert!(result.proceed);
    assert_eq!(result.action_id, "wf-42");
    let response = result.response.as_ref().expect("Completed.result.response");
    assert_eq!(response.status, 200);
    assert!(response.body.is_empty(), "the body went as chunks, not again in Completed");
    assert!(!response.truncated);
    assert_eq!(result.attempts.len(), 1);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn empty_action_id_gets_a_generated_uuid() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let events = sidecar.stream(request("GET", &upstream.url("/"))).await.unwrap();
        let Some(Event::Accepted(accepted)) = events.first() else {
            panic!("first event is not Accepted: {events:?}")
        };
        let id = uuid::Uuid::parse_str(&accepted.action_id)
            .unwrap_or_else(|e| panic!("{:?} is not a UUID: {e}", accepted.action_id));
        assert_eq!(id.get_version_num(), 4, "{id}");
        assert_eq!(completed(&events).action_id, accepted.action_id, "Completed echoes the generated id");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1], "each action gets its own id");
}

#[tokio::test]
async fn retried_status_shows_both_attempts() {
    let upstream = failing(1, 503, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/flaky"));
    req.retry = Some(Box::new(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(Duration::from_millis(10))),
        jitter: Some(false),
        ..Default::default()
    }));
    let events = sidecar.stream(req).await.unwrap();

    assert_eq!(
        labels(&events),
        [
            "Accepted",
            "AttemptStarted(1)",
            "ResponseHead(1,503)",
            "AttemptFailed(1,UnexpectedStatus,retry)",
            "AttemptStarted(2)",
            "ResponseHead(2,200)",
            "BodyChunk(2)",
            "Completed(Succeeded)",
        ]
    );
    let failed = events
        .iter()
        .find_map(|e| match e {
            Event::AttemptFailed(f) => Some(f),
            _ => None,
        })
        .unwrap();
    assert_eq!(failed.status, 503);
    assert_eq!(to_std(&failed.backoff), Some(Duration::from_millis(10)), "no jitter: the initial backoff");
    // Only the successful attempt's body is streamed.
    assert_eq!(reassemble(&events), b"ok");
    let result = completed(&events);
    assert_eq!(result.attempts.len(), 2);
    assert_eq!(result.attempts[0].status, 503);
    assert_eq!(result.attempts[1].status, 200);
    assert_eq!(result.response.as_ref().unwrap().status, 200);
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn refused_connection_fails_without_a_head() {
    let url = closed_port_url().await;
    let sidecar = Sidecar::start().await;
    let events = sidecar.stream(request("GET", &url)).await.unwrap();

    assert_eq!(
        labels(&events),
        ["Accepted", "AttemptStarted(1)", "AttemptFailed(1,Connect,final)", "Completed(Failed)"]
    );
    let Event::AttemptFailed(failed) = &events[2] else { unreachable!() };
    assert_eq!(failed.status, 0);
    assert!(failed.backoff.is_none(), "no backoff without a retry: {:?}", failed.backoff);
    let result = completed(&events);
    assert_eq!(error_kind(result), pb::ErrorKind::Connect);
    assert!(!result.proceed);
    assert!(result.response.is_none(), "no response was received");
}

#[tokio::test]
async fn refused_connection_is_retried_when_the_policy_allows() {
    let url = closed_port_url().await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &url);
    req.retry = Some(Box::new(pb::RetryPolicy {
        max_attempts: 2,
        initial_backoff: Some(dur(Duration::from_millis(10))),
        jitter: Some(false),
        ..Default::default()
    }));
    let events = sidecar.stream(req).await.unwrap();
    assert_eq!(
        labels(&events),
        [
            "Accepted",
            "AttemptStarted(1)",
            "AttemptFailed(1,Connect,retry)",
            "AttemptStarted(2)",
            "AttemptFailed(2,Connect,final)",
            "Completed(Failed)",
        ]
    );
    assert_eq!(completed(&events).attempts.len(), 2);
}

#[tokio::test]
async fn stream_cap_cuts_the_body_at_exactly_the_cap() {
    let data = pattern(300 * 1024);
    let served = data.clone();
    let upstream = Upstream::start(move |_| {
        let served = served.clone();
        async move { framed(served, 48 * 1024) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/big"));
    req.max_response_bytes = 100_000;
    let events = sidecar.stream(req).await.unwrap();

    assert_eq!(
        labels(&events),
        [
            "Accepted",
            "AttemptStarted(1)",
            "ResponseHead(1,200)",
            "BodyChunk(1)",
            "AttemptFailed(1,BodyTooLarge,final)",
            "Completed(Failed)",
        ]
    );
    let body = reassemble(&events);
    assert_eq!(body.len(), 100_000, "chunks stop exactly at the cap");
    assert!(body[..] == data[..100_000], "the bytes before the cap are the upstream's");
    let result = completed(&events);
    assert_eq!(error_kind(result), pb::ErrorKind::BodyTooLarge);
    let response = result.response.as_ref().expect("the head was received");
    assert!(response.truncated);
    assert!(response.body.is_empty());
}

#[tokio::test]
async fn body_larger_than_a_grpc_message_streams_whole() {
    // 8 MiB: twice gRPC's default 4 MiB message limit, so it could never fit one Execute reply.
    let data = pattern(8 << 20);
    let served = data.clone();
    let upstream = Upstream::start(move |_| {
        let served = served.clone();
        async move { Response::builder().status(200).body(body(served)).unwrap() }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let events = sidecar.stream(request("GET", &upstream.url("/huge"))).await.unwrap();
    let body = reassemble(&events);
    assert_eq!(body.len(), data.len());
    assert!(body == data, "the 8 MiB body arrived altered");
    let result = completed(&events);
    assert_eq!(result.outcome(), pb::Outcome::Succeeded, "{:?}", result.error);
    assert!(result.response.as_ref().unwrap().body.is_empty());
}

/// An endless upstream body that counts the bytes it hands out and notes when it is dropped.
struct Endless {
    sent: Arc<AtomicU64>,
    dropped: Arc<AtomicBool>,
    piece: Bytes,
}

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.sent.fetch_add(self.piece.len() as u64, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(self.piece.clone()))))
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn caller_dropping_the_stream_stops_the_upstream_read() {
    let sent = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let (s, d) = (sent.clone(), dropped.clone());
    let upstream = Upstream::start(move |_| {
        let endless = Endless { sent: s.clone(), dropped: d.clone(), piece: pattern(16 * 1024) };
        async move { Response::builder().status(200).body(endless.boxed()).unwrap() }
    })
    .await;
    let sidecar = Sidecar::start().await;

    let mut stream = sidecar
        .client
        .clone()
        .execute_stream(request("GET", &upstream.url("/endless")))
        .await
        .unwrap()
        .into_inner();
    let mut seen_accepted = false;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(2), stream.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("stream open")
            .event
            .unwrap();
        match event {
            Event::Accepted(_) => seen_accepted = true,
            Event::BodyChunk(chunk) => {
                assert_eq!(chunk.offset, 0);
                break;
            }
            Event::Completed(c) => panic!("an endless body cannot complete: {c:?}"),
            _ => {}
        }
    }
    assert!(seen_accepted);
    drop(stream);

    // The sidecar drops its upstream request, so the upstream's body is dropped, not polled on.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "upstream body still alive 2 s after the caller left ({} bytes sent)",
            sent.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after_drop = sent.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sent.load(Ordering::SeqCst), after_drop, "the upstream body is still being read");
    // Flow control held the read back: the sidecar did not slurp the endless body meanwhile.
    assert!(after_drop < 64 << 20, "{after_drop} bytes read for a caller that took one chunk");

    // The sidecar is still healthy and serves the next call.
    let next = Upstream::fixed(200, "still here").await;
    let events = sidecar.stream(request("GET", &next.url("/"))).await.unwrap();
    assert_eq!(completed(&events).outcome(), pb::Outcome::Succeeded);
    assert_eq!(reassemble(&events), b"still here");
    let resp = sidecar.execute(request("GET", &next.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
}
