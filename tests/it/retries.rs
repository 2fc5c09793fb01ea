//! Retries: which statuses and errors retry, backoff and Retry-After, and the idempotency rule.
use crate::support::*;
use callout::pb;
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn backoff(a: &pb::Attempt) -> Option<Duration> {
    a.backoff.map(|d| Duration::try_from(d).unwrap())
}

/// `http://127.0.0.1:PORT/` where nothing listens.
async fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/")
}

fn post(url: &str) -> pb::ExecuteHttpActionRequest {
    let mut req = request("POST", url);
    req.body = Some(pb::execute_http_action_request::Body::Json(r#"{"order":1}"#.into()));
    req
}

#[tokio::test]
async fn two_503s_then_success() {
    let upstream = failing(2, 503, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/flaky"));
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;

    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert!(resp.error.is_none(), "{resp:?}");
    let r = resp.response.as_ref().unwrap();
    assert_eq!((r.status, r.body_text.as_deref()), (200, Some("ok")));
    assert_eq!(resp.attempts.len(), 3, "{resp:?}");
    let numbers: Vec<u32> = resp.attempts.iter().map(|a| a.number).collect();
    assert_eq!(numbers, [1, 2, 3]);
    for a in &resp.attempts[..2] {
        assert_eq!(a.status, 503, "{resp:?}");
        assert_eq!(a.error.as_ref().map(|e| e.kind()), Some(pb::ErrorKind::UnexpectedStatus), "{a:?}");
    }
    // No jitter: exactly the initial backoff, then doubled.
    assert_eq!(backoff(&resp.attempts[0]), Some(ms(10)), "{resp:?}");
    assert_eq!(backoff(&resp.attempts[1]), Some(ms(20)), "{resp:?}");
    assert_eq!(resp.attempts[2].status, 200);
    assert!(resp.attempts[2].error.is_none(), "{resp:?}");
    assert!(resp.attempts[2].backoff.is_none(), "no backoff after the last attempt: {resp:?}");
    assert_eq!(upstream.hits(), 3);
    assert!(upstream.seen().iter().all(|s| s.method == "GET" && s.target == "/flaky"));
}

#[tokio::test]
async fn default_policy_retries_a_503() {
    // The default policy (unset fields) retries 503 too; only the first backoff is shortened.
    let upstream = failing(1, 503, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(pb::RetryPolicy { initial_backoff: Some(dur(ms(10))), ..Default::default() }));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    let wait = backoff(&resp.attempts[0]).expect("a backoff");
    assert!(wait <= ms(10), "full jitter stays under the ceiling: {wait:?}");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn status_500_is_not_retried_by_default() {
    let upstream = failing(5, 500, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::UnexpectedStatus, "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    assert!(resp.attempts[0].backoff.is_none(), "{resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().status, 500);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn gives_up_after_max_attempts() {
    let upstream = failing(usize::MAX, 503, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(2)));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::UnexpectedStatus, "{resp:?}");
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    assert!(resp.attempts[0].backoff.is_some(), "{resp:?}");
    assert!(resp.attempts[1].backoff.is_none(), "{resp:?}");
    let r = resp.response.as_ref().unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(r.body_text.as_deref(), Some("failing"), "the last response's body is read: {r:?}");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn retry_after_is_waited_for() {
    let upstream = failing(1, 429, &[("retry-after", "1")]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(3)));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    let elapsed = t0.elapsed();
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    assert_eq!(resp.attempts[0].status, 429);
    assert_eq!(backoff(&resp.attempts[0]), Some(Duration::from_secs(1)), "Retry-After, not 10 ms: {resp:?}");
    assert!(elapsed >= ms(950), "the Retry-After wait was not observed: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn retry_after_past_the_deadline_fails_at_once() {
    let upstream = failing(usize::MAX, 429, &[("retry-after", "30")]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(fast_retry(3)));
    req.timeouts =
        Some(Box::new(pb::Timeouts { total: Some(dur(Duration::from_secs(2))), ..Default::default() }));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    let elapsed = t0.elapsed();
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert!(
        matches!(error_kind(&resp), pb::ErrorKind::UnexpectedStatus | pb::ErrorKind::RateLimited),
        "{resp:?}"
    );
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    assert!(resp.attempts[0].backoff.is_none(), "{resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().status, 429);
    assert!(elapsed < ms(900), "it waited instead of failing at once: {elapsed:?}");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn retry_after_is_ignored_when_not_honoured() {
    let upstream = failing(1, 503, &[("retry-after", "30")]).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = Some(Box::new(pb::RetryPolicy { honor_retry_after: Some(false), ..fast_retry(3) }));
    let t0 = Instant::now();
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(backoff(&resp.attempts[0]), Some(ms(10)), "{resp:?}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn post_without_key_is_not_retried_after_502() {
    let upstream = failing(1, 502, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = post(&upstream.url("/orders"));
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "a 502 POST may have been processed: {resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().status, 502);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn post_without_key_is_retried_after_503() {
    let upstream = failing(2, 503, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = post(&upstream.url("/orders"));
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.attempts.len(), 3, "{resp:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.method == "POST" && s.body == r#"{"order":1}"#), "{seen:?}");
}

#[tokio::test]
async fn post_without_key_is_retried_after_connection_refused() {
    let url = refused_url().await;
    let sidecar = Sidecar::start().await;
    let mut req = post(&url);
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Connect, "{resp:?}");
    assert!(resp.response.is_none(), "{resp:?}");
    assert_eq!(resp.attempts.len(), 3, "a refused connection surely sent nothing: {resp:?}");
    for a in &resp.attempts {
        assert_eq!(a.status, 0);
        assert_eq!(a.error.as_ref().map(|e| e.kind()), Some(pb::ErrorKind::Connect), "{a:?}");
    }
}

#[tokio::test]
async fn post_with_idempotency_key_is_retried_after_502() {
    let upstream = failing(1, 502, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = post(&upstream.url("/orders"));
    req.headers.push(kv("Idempotency-Key", "order-1"));
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.header("idempotency-key").as_deref(), Some("order-1"), "{s:?}");
    }
}

#[tokio::test]
async fn post_with_retry_non_idempotent_is_retried_after_502() {
    let upstream = failing(1, 502, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut req = post(&upstream.url("/orders"));
    req.retry = Some(Box::new(pb::RetryPolicy { retry_non_idempotent: true, ..fast_retry(3) }));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn patch_without_key_is_not_retried_after_504_but_put_is() {
    let patch_upstream = failing(1, 504, &[]).await;
    let put_upstream = failing(1, 504, &[]).await;
    let sidecar = Sidecar::start().await;
    let mut patch = request("PATCH", &patch_upstream.url("/"));
    patch.retry = Some(Box::new(fast_retry(3)));
    let mut put = request("PUT", &put_upstream.url("/"));
    put.retry = Some(Box::new(fast_retry(3)));
    let patch = sidecar.execute(patch).await;
    let put = sidecar.execute(put).await;
    assert_eq!(patch.attempts.len(), 1, "{patch:?}");
    assert_eq!(patch_upstream.hits(), 1);
    assert_eq!(put.outcome(), pb::Outcome::Succeeded, "PUT is idempotent: {put:?}");
    assert_eq!(put_upstream.hits(), 2);
}

/// A raw HTTP/1.1 server: the first `drops` connections are closed after reading the request
/// without an answer; later ones get `200 ok`. Counts connections.
async fn dropping_server(drops: usize) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                // Read until the end of the head (requests here have small or no bodies).
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                if n < drops {
                    drop(tcp);
                    return;
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    .await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/"), connections, task)
}

#[tokio::test]
async fn get_is_retried_after_the_connection_closes_without_an_answer() {
    let (url, connections, task) = dropping_server(1).await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &url);
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;
    task.abort();
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().body_text.as_deref(), Some("ok"));
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    assert_eq!(resp.attempts[0].status, 0);
    assert!(resp.attempts[0].error.is_some(), "{resp:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn post_is_not_retried_after_the_connection_closes_without_an_answer() {
    // The request was sent, so it may have been processed: no repeat without a key.
    let (url, connections, task) = dropping_server(1).await;
    let sidecar = Sidecar::start().await;
    let mut req = post(&url);
    req.retry = Some(Box::new(fast_retry(3)));
    let resp = sidecar.execute(req).await;
    task.abort();
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert!(resp.response.is_none(), "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn custom_retry_on_status_retries_500_and_not_503() {
    let retried = failing(1, 500, &[]).await;
    let not_retried = failing(1, 503, &[]).await;
    let sidecar = Sidecar::start().await;
    let policy = pb::RetryPolicy { retry_on_status: "500".into(), ..fast_retry(3) };
    let mut req = request("GET", &retried.url("/"));
    req.retry = Some(Box::new(policy.clone()));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    assert_eq!(resp.attempts[0].status, 500);
    assert_eq!(retried.hits(), 2);

    let mut req = request("GET", &not_retried.url("/"));
    req.retry = Some(Box::new(policy));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "503 is not in the custom list: {resp:?}");
    assert_eq!(not_retried.hits(), 1);
}

#[tokio::test]
async fn connect_errors_are_not_retried_when_left_out_of_retry_on_errors() {
    let url = refused_url().await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &url);
    req.retry = Some(Box::new(pb::RetryPolicy {
        retry_on_errors: vec![pb::ErrorKind::Timeout as i32],
        ..fast_retry(3)
    }));
    let resp = sidecar.execute(req).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Connect, "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
}
