//! `success_condition` and `retry_condition` (CEL) against a loopback job that answers
//! {"state":"pending"} twice, then {"state":"done","id":7}: polling through the retry policy on
//! Execute and ExecuteStream, CONDITION_FAILED when a condition fails, and compile errors as
//! INVALID_ARGUMENT naming the field with the position, nothing sent.
use crate::support::{fast_retry, json, request, violated_fields, Sidecar, Upstream};
use callout::pb::{self, action_event::Event};
use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};
use tonic_types::StatusExt as _;

/// A job that is pending for the first two requests, then done.
pub async fn job() -> Upstream {
    let calls = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |_| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < 2 {
                json(200, serde_json::json!({"state": "pending"}))
            } else {
                json(200, serde_json::json!({"state": "done", "id": 7}))
            }
        }
    })
    .await
}

fn polling(method: &str, url: &str, attempts: u32) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        retry_condition: r#"body.state != "done""#.into(),
        success_condition: "body.id == 7 && status == 200".into(),
        extract: [("id".to_string(), "$.id".to_string())].into(),
        retry: Some(Box::new(fast_retry(attempts))),
        ..request(method, url)
    }
}

#[tokio::test]
async fn retry_condition_polls_until_the_job_is_done() {
    let upstream = job().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(polling("GET", &upstream.url("/job"), 5)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(reply.attempts.len(), 3, "{reply:?}");
    assert!(reply.attempts[..2]
        .iter()
        .all(|a| a.error.as_ref().unwrap().kind() == pb::ErrorKind::ConditionFailed));
    assert!(reply.attempts[0].backoff.is_some() && reply.attempts[2].backoff.is_none());
    assert_eq!(reply.extracted["id"].kind, Some(prost_types::value::Kind::NumberValue(7.0)));
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn retry_condition_is_consent_to_repeat_a_post() {
    let upstream = job().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(polling("POST", &upstream.url("/job"), 5)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn a_condition_still_true_when_the_attempts_run_out_is_condition_failed() {
    let upstream = job().await;
    let sidecar = Sidecar::start().await;
    let reply = sidecar.execute(polling("GET", &upstream.url("/job"), 2)).await;
    assert_eq!(reply.outcome(), pb::Outcome::Failed, "{reply:?}");
    let error = reply.error.unwrap();
    assert_eq!(error.kind(), pb::ErrorKind::ConditionFailed);
    assert_eq!(error.message, r#"retry_condition "body.state != "done"" was still true"#);
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn success_condition_false_or_failing_is_condition_failed() {
    let upstream = job().await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest {
        success_condition: r#"body.state == "done""#.into(),
        ..request("GET", &upstream.url("/job"))
    };
    let reply = sidecar.execute(req).await;
    assert_eq!(reply.outcome(), pb::Outcome::Failed, "{reply:?}");
    let error = reply.error.unwrap();
    assert_eq!(error.kind(), pb::ErrorKind::ConditionFailed);
    assert_eq!(error.message, r#"success_condition "body.state == "done"" was false"#);
    assert_eq!(reply.response.unwrap().status, 200, "the response is still reported");

    let req = pb::ExecuteHttpActionRequest {
        success_condition: "body.missing.deeper == 1".into(),
        ..request("GET", &upstream.url("/job"))
    };
    let error = sidecar.execute(req).await.error.unwrap();
    assert_eq!(error.kind(), pb::ErrorKind::ConditionFailed);
    assert!(
        error.message.starts_with(r#"success_condition "body.missing.deeper == 1" failed: "#),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_stream_polls_too_and_sends_only_the_final_attempts_body() {
    let upstream = job().await;
    let sidecar = Sidecar::start().await;
    let events = sidecar.stream(polling("GET", &upstream.url("/job"), 5)).await.unwrap();
    let chunk_attempts: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::BodyChunk(c) => Some(c.attempt),
            _ => None,
        })
        .collect();
    assert_eq!(chunk_attempts, [3], "{events:?}");
    let retried = events.iter().filter(|e| matches!(e, Event::AttemptFailed(f) if f.will_retry)).count();
    assert_eq!(retried, 2, "{events:?}");
    let Some(Event::Completed(done)) = events.last() else { panic!("{events:?}") };
    assert_eq!(done.result.as_ref().unwrap().outcome(), pb::Outcome::Succeeded);
}

#[tokio::test]
async fn compile_errors_name_the_field_and_position_and_nothing_is_sent() {
    let upstream = job().await;
    let sidecar = Sidecar::start().await;
    for field in ["success_condition", "retry_condition"] {
        let mut req = request("GET", &upstream.url("/job"));
        match field {
            "success_condition" => req.success_condition = "status ==".into(),
            _ => req.retry_condition = "body.state == ".into(),
        }
        let status = sidecar.try_execute(req).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
        let violation = &status.get_details_bad_request().unwrap().field_violations[0];
        assert!(violation.description.contains("line 1, column "), "{violation:?}");
    }
    let req = pb::ExecuteHttpActionRequest {
        success_condition: format!("status == 200 || {}", "status == 1 || ".repeat(300)),
        ..request("GET", &upstream.url("/job"))
    };
    assert_eq!(violated_fields(&sidecar.try_execute(req).await.unwrap_err()), ["success_condition"]);
    assert_eq!(upstream.hits(), 0, "nothing was sent");
}
