//! What comes back: response fields and body views, success specs, the verdict (outcome,
//! proceed, error kind and mapped messages), the body cap and connection failures.
use crate::support::*;
use callout::pb::{self, execute_http_action_request::Body};
use http::Response;
use prost_types::value::Kind;
use std::collections::HashMap;

/// A response with `status`, one content type and `bytes`.
fn typed(status: u16, content_type: &str, bytes: impl Into<bytes::Bytes>) -> Response<UpBody> {
    Response::builder().status(status).header("content-type", content_type).body(body(bytes)).unwrap()
}

/// An upstream answering 200 with `bytes` of `content_type` to every request.
async fn serving(content_type: &'static str, bytes: Vec<u8>) -> Upstream {
    Upstream::start(move |_| {
        let bytes = bytes.clone();
        async move { typed(200, content_type, bytes) }
    })
    .await
}

/// An upstream answering `/<status>` with that status (no body for 204 and 304).
async fn status_from_path() -> Upstream {
    Upstream::start(|seen: Seen| async move {
        let status: u16 = seen.target.trim_start_matches('/').parse().expect("status in path");
        let payload: &'static [u8] = if matches!(status, 204 | 304) { b"" } else { b"status body" };
        typed(status, "text/plain", payload)
    })
    .await
}

/// google.protobuf.Value back to JSON (numbers as f64, as the proto carries them).
fn to_json(v: &prost_types::Value) -> serde_json::Value {
    match v.kind.as_ref().expect("kind set") {
        Kind::NullValue(_) => serde_json::Value::Null,
        Kind::BoolValue(b) => (*b).into(),
        Kind::NumberValue(n) => (*n).into(),
        Kind::StringValue(s) => s.clone().into(),
        Kind::ListValue(l) => l.values.iter().map(to_json).collect(),
        Kind::StructValue(s) => s.fields.iter().map(|(k, v)| (k.clone(), to_json(v))).collect(),
    }
}

fn headers_named(r: &pb::HttpResponse, name: &str) -> Vec<String> {
    r.headers.iter().filter(|h| h.name == name).map(|h| h.value.clone()).collect()
}

#[tokio::test]
async fn response_carries_status_reason_version_repeated_headers_and_body() {
    let upstream = Upstream::start(|_| async {
        Response::builder()
            .status(202)
            .header("content-type", "text/plain; charset=utf-8")
            .header("x-rep", "one=1")
            .header("x-single", "s")
            .header("x-rep", "two=2")
            .body(body("accepted, thanks"))
            .unwrap()
    })
    .await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert!(resp.proceed);
    assert!(resp.error.is_none(), "{resp:?}");
    let r = resp.response.expect("response");
    assert_eq!(r.status, 202);
    assert_eq!(r.reason, "Accepted");
    assert_eq!(r.http_version, "HTTP/1.1");
    assert_eq!(headers_named(&r, "x-rep"), ["one=1", "two=2"]);
    assert_eq!(headers_named(&r, "x-single"), ["s"]);
    assert_eq!(headers_named(&r, "content-type"), ["text/plain; charset=utf-8"]);
    assert_eq!(r.body_text.as_deref(), Some("accepted, thanks"));
    assert_eq!(r.body_text.as_deref(), Some("accepted, thanks"));
    assert!(r.body_json.is_none());
    assert!(!r.truncated);
}

#[tokio::test]
async fn json_body_becomes_a_protobuf_value() {
    let doc = serde_json::json!({
        "name": "ada",
        "n": 1.5,
        "count": 42,
        "ok": true,
        "no": false,
        "nothing": null,
        "list": [1, "two", false, null, {"k": "v"}, []],
        "nested": {"inner": {"deep": [3.25]}, "empty": {}},
    });
    let upstream = Upstream::start(move |_| {
        let doc = doc.clone();
        async move { json(200, doc) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
    let r = resp.response.expect("response");
    let value = r.body_json.as_ref().expect("body_json");
    let Some(Kind::StructValue(root)) = &value.kind else { panic!("not a struct: {value:?}") };
    assert_eq!(root.fields["count"].kind, Some(Kind::NumberValue(42.0)));
    assert_eq!(root.fields["ok"].kind, Some(Kind::BoolValue(true)));
    assert!(matches!(root.fields["nothing"].kind, Some(Kind::NullValue(_))));
    assert_eq!(root.fields["name"].kind, Some(Kind::StringValue("ada".into())));
    let expected = serde_json::json!({
        "name": "ada",
        "n": 1.5,
        "count": 42.0,
        "ok": true,
        "no": false,
        "nothing": null,
        "list": [1.0, "two", false, null, {"k": "v"}, []],
        "nested": {"inner": {"deep": [3.25]}, "empty": {}},
    });
    assert_eq!(to_json(value), expected);
    // REPLY_BODY_AUTO (the default) gives the JSON alone; ALL gives the text and bytes too.
    assert!(r.body_text.is_none() && r.body.is_empty(), "{r:?}");
    let all = pb::ExecuteHttpActionRequest {
        reply_body: pb::ReplyBody::All as i32,
        ..request("GET", &upstream.url("/"))
    };
    let r = sidecar.execute(all).await.response.expect("response");
    assert!(r.body_json.is_some() && !r.body.is_empty(), "{r:?}");
    let text: serde_json::Value = serde_json::from_str(r.body_text.as_deref().expect("body_text")).unwrap();
    assert_eq!(text["count"], 42);
}

/// A body past `OFFLOAD_BODY_BYTES` is parsed and converted on the blocking pool: the views
/// and the reply come out the same.
#[tokio::test]
async fn a_large_json_body_gets_the_same_views() {
    let items: Vec<serde_json::Value> = (0..3000)
        .map(|i| serde_json::json!({"id": i, "name": format!("item-{i}"), "tags": ["a", "b"]}))
        .collect();
    let doc = serde_json::json!({ "items": items });
    let bytes = serde_json::to_vec(&doc).unwrap();
    assert!(bytes.len() > callout::exec::OFFLOAD_BODY_BYTES, "{} bytes", bytes.len());
    let upstream = serving("application/json", bytes.clone()).await;
    let sidecar = Sidecar::start().await;
    let all = pb::ExecuteHttpActionRequest {
        reply_body: pb::ReplyBody::All as i32,
        ..request("GET", &upstream.url("/"))
    };
    let resp = sidecar.execute(all).await;
    let r = resp.response.expect("response");
    assert_eq!(&r.body[..], &bytes[..]);
    let json = to_json(r.body_json.as_ref().expect("body_json"));
    assert_eq!(json["items"].as_array().map(Vec::len), Some(3000));
    assert_eq!(json["items"][2999]["name"], "item-2999");
    assert_eq!(r.body_text.as_deref().map(str::len), Some(bytes.len()));
}

#[tokio::test]
async fn problem_json_is_parsed_as_json() {
    let upstream = Upstream::start(|_| async {
        typed(404, "application/problem+json; charset=utf-8", r#"{"title":"Not Found","status":404}"#)
    })
    .await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    let r = resp.response.expect("response");
    let value = r.body_json.as_ref().expect("body_json for problem+json");
    assert_eq!(to_json(value), serde_json::json!({"title": "Not Found", "status": 404.0}));
}

#[tokio::test]
async fn no_body_json_for_invalid_json_or_plain_text() {
    let upstream = Upstream::start(|seen: Seen| async move {
        match seen.target.as_str() {
            "/bad" => typed(200, "application/json", "{\"a\": [1, 2"),
            _ => typed(200, "text/plain", r#"{"a":1}"#),
        }
    })
    .await;
    let sidecar = Sidecar::start().await;

    let r = sidecar.execute(request("GET", &upstream.url("/bad"))).await.response.unwrap();
    assert!(r.body_json.is_none(), "{r:?}");
    assert_eq!(r.body_text.as_deref(), Some("{\"a\": [1, 2"));

    let r = sidecar.execute(request("GET", &upstream.url("/text"))).await.response.unwrap();
    assert!(r.body_json.is_none(), "{r:?}");
    assert_eq!(r.body_text.as_deref(), Some(r#"{"a":1}"#));
}

#[tokio::test]
async fn binary_body_has_bytes_but_no_text() {
    let bytes: &'static [u8] = &[0xff, 0xfe, 0x00, 0x80, b'a', 0xc3];
    let upstream =
        Upstream::start(move |_| async move { typed(200, "application/octet-stream", bytes) }).await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded);
    let r = resp.response.unwrap();
    assert_eq!(r.body, bytes);
    assert_eq!(r.body_text, None);
    assert!(r.body_json.is_none());
}

#[tokio::test]
async fn head_gives_an_empty_body() {
    let upstream = Upstream::fixed(200, "a body HEAD must not carry").await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("HEAD", &upstream.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let r = resp.response.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "{r:?}");
    assert!(!r.truncated);
    assert_eq!(upstream.seen()[0].method, "HEAD");
}

#[tokio::test]
async fn success_codes_decide_the_outcome() {
    let upstream = status_from_path().await;
    let sidecar = Sidecar::start().await;
    let cases: &[(&str, u16, bool)] = &[
        ("200,201", 201, true),
        ("200,201", 200, true),
        ("200,201", 202, false),
        ("2xx", 204, true),
        ("2xx", 299, true),
        ("2xx", 400, false),
        ("200-299,304", 304, true),
        ("200-299,304", 250, true),
        ("200-299,304", 305, false),
        ("200-299,304", 404, false),
        ("404", 404, true),
        ("4xx", 409, true),
        ("", 200, true),
        ("", 404, false),
        ("", 500, false),
    ];
    for &(spec, status, succeeds) in cases {
        let req = pb::ExecuteHttpActionRequest {
            success_codes: spec.into(),
            ..request("GET", &upstream.url(&format!("/{status}")))
        };
        let resp = sidecar.execute(req).await;
        let what = format!("spec {spec:?}, status {status}: {resp:?}");
        assert_eq!(resp.response.as_ref().map(|r| r.status), Some(u32::from(status)), "{what}");
        if succeeds {
            assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{what}");
            assert!(resp.proceed, "{what}");
            assert!(resp.error.is_none(), "{what}");
        } else {
            assert_eq!(resp.outcome(), pb::Outcome::Failed, "{what}");
            assert!(!resp.proceed, "{what}");
            assert_eq!(error_kind(&resp), pb::ErrorKind::UnexpectedStatus, "{what}");
        }
    }
}

#[tokio::test]
async fn on_failure_decides_proceed() {
    let upstream = status_from_path().await;
    let sidecar = Sidecar::start().await;
    let cases = [
        (pb::OnFailure::Continue, 500, true),
        (pb::OnFailure::Abort, 500, false),
        (pb::OnFailure::Unspecified, 500, false),
        (pb::OnFailure::Abort, 200, true),
        (pb::OnFailure::Continue, 200, true),
    ];
    for (on_failure, status, proceed) in cases {
        let req = pb::ExecuteHttpActionRequest {
            on_failure: on_failure as i32,
            ..request("POST", &upstream.url(&format!("/{status}")))
        };
        let resp = sidecar.execute(req).await;
        let what = format!("{on_failure:?} on {status}: {resp:?}");
        assert_eq!(resp.proceed, proceed, "{what}");
        let failed = status >= 300;
        assert_eq!(resp.outcome() == pb::Outcome::Failed, failed, "{what}");
        assert_eq!(resp.error.is_some(), failed, "{what}");
    }
}

#[tokio::test]
async fn error_messages_map_exact_status_before_class() {
    let upstream = status_from_path().await;
    let sidecar = Sidecar::start().await;
    let mapped: HashMap<String, String> = [
        ("404", "no such customer"),
        ("4xx", "the request was refused"),
        ("5xx", "the shop is down, try later"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (status, message) in [
        (404, "no such customer"),
        (409, "the request was refused"),
        (400, "the request was refused"),
        (503, "the shop is down, try later"),
        (500, "the shop is down, try later"),
    ] {
        let req = pb::ExecuteHttpActionRequest {
            error_messages: mapped.clone(),
            ..request("GET", &upstream.url(&format!("/{status}")))
        };
        let resp = sidecar.execute(req).await;
        assert_eq!(resp.outcome(), pb::Outcome::Failed, "{status}: {resp:?}");
        let error = resp.error.as_ref().expect("error");
        assert_eq!(error.kind(), pb::ErrorKind::UnexpectedStatus, "{status}");
        assert_eq!(error.message, message, "{status}");
    }
}

#[tokio::test]
async fn unmapped_status_gets_callouts_own_message_naming_it() {
    let upstream = status_from_path().await;
    let sidecar = Sidecar::start().await;
    let req = pb::ExecuteHttpActionRequest {
        error_messages: HashMap::from([("404".to_string(), "no such customer".to_string())]),
        ..request("GET", &upstream.url("/502"))
    };
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    let error = resp.error.expect("error");
    assert_eq!(error.kind(), pb::ErrorKind::UnexpectedStatus);
    assert!(error.message.contains("502"), "{error:?}");
    assert_ne!(error.message, "no such customer");
}

#[tokio::test]
async fn body_over_max_response_bytes_is_cut_at_the_cap() {
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let upstream = serving("application/octet-stream", payload.clone()).await;
    let sidecar = Sidecar::start().await;

    let req = pb::ExecuteHttpActionRequest { max_response_bytes: 1000, ..request("GET", &upstream.url("/")) };
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{:?}", resp.error);
    assert!(!resp.proceed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::BodyTooLarge, "{:?}", resp.error);
    let r = resp.response.expect("response kept");
    assert_eq!(r.status, 200);
    assert!(r.truncated);
    assert_eq!(r.body.len(), 1000);
    assert_eq!(r.body, payload[..1000]);

    // Exactly at the cap is fine.
    let req = pb::ExecuteHttpActionRequest { max_response_bytes: 5000, ..request("GET", &upstream.url("/")) };
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{:?}", resp.error);
    let r = resp.response.unwrap();
    assert!(!r.truncated);
    assert_eq!(r.body, payload);
}

#[tokio::test]
async fn default_cap_is_two_mib() {
    const MIB: usize = 1024 * 1024;
    let upstream =
        Upstream::start(|_| async { typed(200, "application/octet-stream", vec![b'x'; 3 * MIB]) }).await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/big"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{:?}", resp.error);
    assert_eq!(error_kind(&resp), pb::ErrorKind::BodyTooLarge, "{:?}", resp.error);
    let r = resp.response.expect("response kept");
    assert!(r.truncated);
    assert_eq!(r.body.len(), 2 * MIB);
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &format!("http://127.0.0.1:{port}/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert!(!resp.proceed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::Connect, "{resp:?}");
    assert!(resp.response.is_none(), "{resp:?}");
    assert_eq!(resp.attempts.len(), 1, "{resp:?}");
    assert_eq!(resp.attempts[0].status, 0);
}

/// Seed scenario: a POST with an auth header that continues only on 201.
#[tokio::test]
async fn post_with_an_auth_header_continues_only_on_201() {
    const TOKEN: &str = "tok_9f8e7d6c5b4a_SECRET";
    let upstream = Upstream::start(|seen: Seen| async move {
        match seen.target.as_str() {
            "/created" => json(201, serde_json::json!({"id": 7})),
            _ => json(200, serde_json::json!({"id": 7, "note": "already there"})),
        }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let action = |path: &str| pb::ExecuteHttpActionRequest {
        headers: vec![kv("Authorization", &format!("Bearer {TOKEN}"))],
        body: Some(Body::Json(r#"{"name":"ada"}"#.into())),
        success_codes: "201".into(),
        on_failure: pb::OnFailure::Continue as i32,
        ..request("POST", &upstream.url(path))
    };

    let resp = sidecar.execute(action("/created")).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert!(resp.proceed);
    assert!(resp.error.is_none());
    let seen = &upstream.seen()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.header_values("authorization"), [format!("Bearer {TOKEN}")]);
    assert_eq!(seen.body, br#"{"name":"ada"}"#.as_slice());

    let resp = sidecar.execute(action("/ok")).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert!(resp.proceed, "CONTINUE: the workflow goes on");
    assert_eq!(resp.response.as_ref().unwrap().status, 200);
    let error = resp.error.as_ref().expect("error");
    assert_eq!(error.kind(), pb::ErrorKind::UnexpectedStatus);
    assert!(error.message.contains("200"), "{error:?}");
    assert!(!error.message.contains(TOKEN), "{error:?}");
    assert!(!format!("{resp:?}").contains(TOKEN), "{resp:?}");
    assert_eq!(upstream.hits(), 2);
}
