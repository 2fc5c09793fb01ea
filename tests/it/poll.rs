//! `async_poll` against a loopback job: POST /jobs answers 202 with a relative Location, GET of
//! it answers 202 twice and then 200 {"state":"done"}. Through Execute, ExecuteStream, a durable
//! action whose `callout` is killed with SIGKILL between polls (on SQLite and PostgreSQL), and
//! `callout exec`; max_wait, a Location the egress policy denies, a 202 without Location, the
//! feature off, and bad settings named as INVALID_ARGUMENT with nothing sent.
use crate::{
    durable::{durable_client, submit, until, until_final, Kind, TestStore, LEASE_ENV},
    support::*,
};
use callout::{
    client::egress::EgressSettings,
    pb::{self, action_event::Event, ActionState},
};
use http::{Response, StatusCode};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

/// A job: POST /jobs → 202 Location: `location` (relative or not); GET /jobs/7 → 202 `pending`
/// times (no Location), then 200 {"state":"done","id":7}. Each 202 says Retry-After:
/// `retry_after` when given. Anything else is 404.
async fn job_after(pending: usize, location: &'static str, retry_after: Option<&'static str>) -> Upstream {
    let polls = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |seen| {
        let polls = polls.clone();
        async move {
            match (seen.method.as_str(), seen.target.as_str()) {
                ("POST", "/jobs") => accepted(Some(location), retry_after),
                ("GET", "/jobs/7") if polls.fetch_add(1, Ordering::SeqCst) < pending => {
                    accepted(None, retry_after)
                }
                ("GET", "/jobs/7") => json(200, serde_json::json!({"state": "done", "id": 7})),
                _ => text(404, "no such thing"),
            }
        }
    })
    .await
}

/// The job, its 202s saying Retry-After: 0.
async fn job(pending: usize, location: &'static str) -> Upstream {
    job_after(pending, location, Some("0")).await
}

fn accepted(location: Option<&str>, retry_after: Option<&str>) -> Response<UpBody> {
    let mut response = Response::builder().status(StatusCode::ACCEPTED);
    if let Some(location) = location {
        response = response.header("location", location);
    }
    if let Some(after) = retry_after {
        response = response.header("retry-after", after);
    }
    response.body(body(r#"{"state":"queued"}"#)).unwrap()
}

fn async_poll(interval: Duration, max_wait: Option<Duration>) -> pb::AsyncPoll {
    pb::AsyncPoll { enabled: true, interval: Some(dur(interval)), max_wait: max_wait.map(dur) }
}

/// POST /jobs with a bearer token, polling every 100 ms.
fn post_job(upstream: &Upstream) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        body: Some(pb::execute_http_action_request::Body::Json(r#"{"run":true}"#.into())),
        headers: vec![kv("authorization", "Bearer job-token")],
        async_poll: Some(Box::new(async_poll(Duration::from_millis(100), None))),
        extract: [("id".to_string(), "$.id".to_string())].into(),
        success_condition: r#"body.state == "done""#.into(),
        ..request("POST", &upstream.url("/jobs"))
    }
}

fn methods_and_paths(upstream: &Upstream) -> Vec<(String, String)> {
    upstream.seen().into_iter().map(|s| (s.method, s.target)).collect()
}

const POLLED: [(&str, &str); 4] =
    [("POST", "/jobs"), ("GET", "/jobs/7"), ("GET", "/jobs/7"), ("GET", "/jobs/7")];

#[tokio::test]
async fn a_202_is_polled_at_its_location_until_the_job_is_done() {
    let upstream = job(2, "jobs/7").await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(post_job(&upstream)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    let response = reply.response.as_ref().unwrap();
    assert_eq!(response.status, 200, "the final response is the action's");
    assert_eq!(reply.extracted["id"].kind, Some(prost_types::value::Kind::NumberValue(7.0)));
    let attempts: Vec<(u32, u32, bool)> =
        reply.attempts.iter().map(|a| (a.number, a.status, a.poll)).collect();
    assert_eq!(attempts, [(1, 202, false), (2, 202, true), (3, 202, true), (4, 200, true)]);
    assert!(reply.attempts[..3].iter().all(|a| a.error.is_none() && a.backoff.is_some()), "{reply:?}");
    assert!(reply.attempts[3].backoff.is_none());
    let paths: Vec<(String, String)> = methods_and_paths(&upstream);
    assert_eq!(paths, POLLED.map(|(m, p)| (m.to_owned(), p.to_owned())), "one POST, three GETs");
    let seen = upstream.seen();
    for request in &seen {
        assert_eq!(request.header("authorization").as_deref(), Some("Bearer job-token"), "same credentials");
    }
    for poll in &seen[1..] {
        assert!(poll.body.is_empty() && poll.header("content-type").is_none(), "{poll:?}");
    }
}

#[tokio::test]
async fn polls_are_streamed_as_attempts_marked_as_polls() {
    let upstream = job(2, "/jobs/7").await;
    let sidecar = Sidecar::start().await;
    let events = sidecar.stream(post_job(&upstream)).await.unwrap();
    let started: Vec<(u32, bool)> = events
        .iter()
        .filter_map(|e| match e {
            Event::AttemptStarted(s) => Some((s.attempt, s.poll)),
            _ => None,
        })
        .collect();
    assert_eq!(started, [(1, false), (2, true), (3, true), (4, true)]);
    let heads: Vec<(u32, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::ResponseHead(h) => Some((h.attempt, h.status)),
            _ => None,
        })
        .collect();
    assert_eq!(heads, [(1, 202), (2, 202), (3, 202), (4, 200)]);
    assert!(!events.iter().any(|e| matches!(e, Event::AttemptFailed(_))), "a 202 polled is no failure");
    let chunks: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::BodyChunk(c) => Some(c.attempt),
            _ => None,
        })
        .collect();
    assert!(!chunks.is_empty() && chunks.iter().all(|a| *a == 4), "only the final body: {chunks:?}");
    let Some(Event::Completed(done)) = events.last() else { panic!("{events:?}") };
    let result = done.result.as_ref().unwrap();
    assert_eq!(result.outcome(), pb::Outcome::Succeeded, "{result:?}");
    assert_eq!(result.attempts.iter().filter(|a| a.poll).count(), 3);
}

#[tokio::test]
async fn a_failing_poll_is_retried_by_the_retry_policy_without_spending_the_post_s_attempts() {
    let polls = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::start(move |seen| {
        let polls = polls.clone();
        async move {
            if seen.method == "POST" {
                return accepted(Some("/jobs/7"), Some("0"));
            }
            match polls.fetch_add(1, Ordering::SeqCst) {
                0 => text(503, "busy"),
                _ => json(200, serde_json::json!({"state": "done"})),
            }
        }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest { retry: Some(Box::new(fast_retry(2))), ..post_job(&upstream) };
    let reply = sidecar.execute(req).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    let attempts: Vec<(u32, bool)> = reply.attempts.iter().map(|a| (a.status, a.poll)).collect();
    assert_eq!(attempts, [(202, false), (503, true), (200, true)]);
}

#[tokio::test]
async fn a_job_still_accepted_when_max_wait_runs_out_is_a_timeout_naming_max_wait() {
    let upstream = job(usize::MAX, "/jobs/7").await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest {
        async_poll: Some(Box::new(async_poll(Duration::from_millis(100), Some(Duration::from_millis(700))))),
        ..post_job(&upstream)
    };
    let reply = sidecar.execute(req).await;
    assert_eq!(reply.outcome(), pb::Outcome::Failed, "{reply:?}");
    let error = reply.error.as_ref().unwrap();
    assert_eq!(error.kind(), pb::ErrorKind::Timeout);
    assert!(error.message.contains("async_poll.max_wait (700ms)"), "{error:?}");
    assert_eq!(reply.response.as_ref().unwrap().status, 202, "the last response stands");
    assert!(reply.attempts.len() >= 3 && reply.attempts.len() <= 9, "{}", reply.attempts.len());
}

#[tokio::test]
async fn a_location_the_egress_policy_denies_is_never_dialled() {
    let denied = Upstream::fixed(200, "secret").await;
    let location: &'static str = Box::leak(format!("http://127.0.0.2:{}/jobs/7", denied.addr.port()).into());
    let upstream = job(0, location).await;
    let mut settings = test_settings();
    settings.egress =
        EgressSettings { deny: vec!["127.0.0.2/32".parse().unwrap()], ..settings.egress.clone() };
    let sidecar = Sidecar::start_with(settings).await;
    let reply = sidecar.execute(post_job(&upstream)).await;
    assert_eq!(error_kind(&reply), pb::ErrorKind::DeniedByPolicy, "{reply:?}");
    assert_eq!(denied.hits(), 0, "nothing sent there");
    assert_eq!(upstream.hits(), 1);
    assert!(reply.attempts[1].poll);
}

#[tokio::test]
async fn a_cross_origin_location_gets_no_credentials() {
    let other = Upstream::start(|_| async { json(200, serde_json::json!({"state": "done"})) }).await;
    let location: &'static str = Box::leak(format!("http://127.0.0.1:{}/jobs/7", other.addr.port()).into());
    let upstream = job(0, location).await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(post_job(&upstream)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    let seen = other.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].header("authorization").is_none(), "credentials stay with their origin");
}

#[tokio::test]
async fn a_202_without_location_or_without_async_poll_is_the_response() {
    let plain = Upstream::start(|_| async { accepted(None, Some("0")) }).await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(post_job(&plain)).await;
    assert_eq!(reply.response.as_ref().unwrap().status, 202, "{reply:?}");
    assert_eq!((reply.attempts.len(), plain.hits()), (1, 1));

    let upstream = job(2, "/jobs/7").await;
    let off = pb::ExecuteHttpActionRequest {
        async_poll: None,
        success_condition: String::new(),
        ..post_job(&upstream)
    };
    let reply = sidecar.execute(off).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(reply.response.as_ref().unwrap().status, 202, "disabled by default: the 202 as is");
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn bad_poll_settings_are_invalid_argument_naming_the_field_and_nothing_is_sent() {
    let upstream = job(0, "/jobs/7").await;
    let sidecar = Sidecar::start().await;
    let zero = pb::ExecuteHttpActionRequest {
        async_poll: Some(Box::new(async_poll(Duration::ZERO, None))),
        ..post_job(&upstream)
    };
    let status = sidecar.try_execute(zero).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["async_poll.interval"]);
    let too_long = pb::ExecuteHttpActionRequest {
        timeouts: Some(Box::new(pb::Timeouts {
            total: Some(dur(Duration::from_secs(10))),
            ..Default::default()
        })),
        async_poll: Some(Box::new(async_poll(Duration::from_secs(1), Some(Duration::from_secs(60))))),
        ..post_job(&upstream)
    };
    let status = sidecar.try_execute(too_long).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["async_poll.max_wait"]);
    assert!(status.message().contains("timeouts.total"), "{}", status.message());
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn callout_exec_polls_with_its_flag() {
    let upstream = job(2, "jobs/7").await;
    let url = upstream.url("/jobs");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_callout"))
            .args(["exec", "--allow-private-networks", "POST", &url, "--json", "{}"])
            .args(["--async-poll", "--poll-interval", "100ms", "--poll-max-wait", "20s"])
            .env_remove("RUST_LOG")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{printed:#}");
    assert_eq!(printed["response"]["status"], 200);
    let polls: Vec<bool> = printed["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["poll"].as_bool().unwrap_or(false))
        .collect();
    assert_eq!(polls, [false, true, true, true]);
    assert_eq!(upstream.hits(), 4);
}

#[tokio::test]
async fn callout_exec_names_a_bad_poll_interval() {
    let out = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_callout"))
            .args(["exec", "--allow-private-networks", "http://127.0.0.1:9/", "--async-poll"])
            .args(["--poll-interval", "10ms"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("async_poll.interval"), "{out:?}");
}

/// Each durable test runs on SQLite and on PostgreSQL.
mod durable {
    use super::Kind;

    #[tokio::test]
    async fn sqlite_kill_between_polls() {
        super::a_durable_poll_survives_a_kill_between_polls(Kind::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_kill_between_polls() {
        super::a_durable_poll_survives_a_kill_between_polls(Kind::Postgres).await
    }
    #[tokio::test]
    async fn sqlite_kill_during_a_poll() {
        super::a_poll_in_flight_at_a_kill_is_polled_again_not_the_post(Kind::Sqlite).await
    }
    #[tokio::test]
    async fn postgres_kill_during_a_poll() {
        super::a_poll_in_flight_at_a_kill_is_polled_again_not_the_post(Kind::Postgres).await
    }
}

/// A POST without an idempotency key is never repeated after a crash, but its poll is a GET:
/// a poll cut off by SIGKILL is sent again by the restarted callout.
async fn a_poll_in_flight_at_a_kill_is_polled_again_not_the_post(kind: Kind) {
    let polls = Arc::new(AtomicUsize::new(0));
    let upstream = Upstream::start(move |seen| {
        let polls = polls.clone();
        async move {
            if seen.method == "POST" {
                return accepted(Some("jobs/7"), Some("0"));
            }
            if polls.fetch_add(1, Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            json(200, serde_json::json!({"state": "done", "id": 7}))
        }
    })
    .await;
    let dir = TestStore::new(kind);
    let store = dir.url();
    let args = ["--store", store.as_str()];
    let env = [("CALLOUT_DURABLE__IDEMPOTENCY_HEADER", ""), LEASE_ENV];
    let mut first = ServeProcess::spawn(&args, &env).await;
    let client = durable_client(&first).await;
    // Three tries per request: the cut-off poll is one of its own, not of the POST's.
    let a = pb::ExecuteHttpActionRequest {
        action_id: "job-8".into(),
        retry: Some(Box::new(fast_retry(3))),
        ..post_job(&upstream)
    };
    submit(&client, a).await;
    while upstream.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    let _ = first.exit_status(Duration::from_secs(10)).await;

    let second = ServeProcess::spawn(&args, &env).await;
    let done = until_final(&durable_client(&second).await, "job-8").await;
    assert_eq!(done.state(), ActionState::Succeeded, "{done:?}");
    let attempts: Vec<(u32, bool)> = done.attempts.iter().map(|a| (a.status, a.poll)).collect();
    assert_eq!(attempts, [(202, false), (0, true), (200, true)], "{done:?}");
    assert!(done.attempts[1].error.as_ref().unwrap().message.contains("may have been sent"));
    let paths = methods_and_paths(&upstream);
    let want = [("POST", "/jobs"), ("GET", "/jobs/7"), ("GET", "/jobs/7")];
    assert_eq!(paths, want.map(|(m, p)| (m.to_owned(), p.to_owned())), "the POST is not repeated");
}

/// The real binary polls durably; killed with SIGKILL after the first poll while the next is
/// stored, the restarted one polls the Location and never sends the POST again.
async fn a_durable_poll_survives_a_kill_between_polls(kind: Kind) {
    // No Retry-After: the 2 s interval sets the pace, and the kill lands while the second poll
    // is stored, not in flight.
    let upstream = job_after(2, "jobs/7", None).await;
    let dir = TestStore::new(kind);
    let store = dir.url();
    let args = ["--store", store.as_str()];
    let mut first = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&first).await;
    let a = pb::ExecuteHttpActionRequest {
        action_id: "job-7".into(),
        async_poll: Some(Box::new(async_poll(Duration::from_secs(2), None))),
        retry: Some(Box::new(fast_retry(3))),
        ..post_job(&upstream)
    };
    submit(&client, a).await;
    until(&client, "job-7", |r| r.attempts.len() >= 2).await;
    first.kill();
    let _ = first.exit_status(Duration::from_secs(10)).await;
    assert_eq!(upstream.hits(), 2, "the POST and one poll before the kill");

    let second = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&second).await;
    let done = until_final(&client, "job-7").await;
    assert_eq!(done.state(), ActionState::Succeeded, "{done:?}");
    let attempts: Vec<(u32, u32, bool)> =
        done.attempts.iter().map(|a| (a.number, a.status, a.poll)).collect();
    assert_eq!(attempts, [(1, 202, false), (2, 202, true), (3, 202, true), (4, 200, true)]);
    let result = done.result.unwrap();
    assert_eq!(result.response.unwrap().status, 200);
    assert_eq!(result.extracted["id"].kind, Some(prost_types::value::Kind::NumberValue(7.0)));
    let paths = methods_and_paths(&upstream);
    assert_eq!(paths, POLLED.map(|(m, p)| (m.to_owned(), p.to_owned())), "the POST is not repeated");
    let keys: Vec<_> = upstream.seen().iter().map(|s| s.header("authorization")).collect();
    assert!(keys.iter().all(|k| k.as_deref() == Some("Bearer job-token")), "{keys:?}");
}
