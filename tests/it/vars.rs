//! `vars` templating through the real gRPC server to a loopback upstream: each value rendered
//! for where it stands (URL component, typed JSON, header text); unknown variables and header
//! breaks are INVALID_ARGUMENT naming the field, nothing sent.
use crate::support::{kv, request, violated_fields, Sidecar, Upstream};
use callout::pb::{self, execute_http_action_request::Body};
use prost_types::{value::Kind, Value};

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

fn number(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}

#[tokio::test]
async fn values_are_rendered_for_where_they_stand() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest {
        vars: [("who".to_string(), string("a b/c?d&e")), ("id".to_string(), number(7.0))].into(),
        headers: vec![kv("X-Order", "order-{{vars.id}}")],
        query: vec![kv("q", "{{vars.who}}")],
        body: Some(Body::Json(r#"{"id":"{{vars.id}}","note":"for {{vars.who}}"}"#.into())),
        ..request("POST", &upstream.url("/orders/{{vars.who}}"))
    };
    let reply = sidecar.execute(req).await;
    assert_eq!(reply.outcome(), pb::Outcome::Succeeded, "{reply:?}");
    let seen = &upstream.seen()[0];
    assert_eq!(seen.target, "/orders/a%20b%2Fc%3Fd%26e?q=a%20b%2Fc%3Fd%26e");
    assert_eq!(seen.header("x-order").as_deref(), Some("order-7"));
    let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(body, serde_json::json!({"id": 7, "note": "for a b/c?d&e"}));
}

#[tokio::test]
async fn unknown_variables_and_header_breaks_are_invalid_and_nothing_is_sent() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest {
        vars: [("nl".to_string(), string("x\r\nX-Evil: 1"))].into(),
        headers: vec![kv("X-A", "{{vars.nl}}")],
        query: vec![kv("q", "{{vars.nope}}")],
        ..request("GET", &upstream.url("/"))
    };
    let status = sidecar.try_execute(req).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["query[0].value", "headers[0].value"]);
    assert!(status.message().contains("nope"), "{status:?}");
    assert_eq!(upstream.hits(), 0);
}
