//! What reaches the upstream: methods, query encoding, repeated headers, bodies and their
//! Content-Type rules, URL credentials and the default User-Agent.
use crate::support::*;
use callout::pb::{self, execute_http_action_request::Body};

fn with_body(mut req: pb::ExecuteHttpActionRequest, body: Body) -> pb::ExecuteHttpActionRequest {
    req.body = Some(body);
    req
}

fn form(fields: &[(&str, &str)]) -> Body {
    Body::Form(pb::FormBody { fields: fields.iter().map(|(n, v)| kv(n, v)).collect() })
}

/// Runs `req` against a fresh upstream and sidecar and returns the one request the upstream saw.
async fn sent(req: impl FnOnce(String) -> pb::ExecuteHttpActionRequest) -> Seen {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(req(upstream.url("/r"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    seen.into_iter().next().unwrap()
}

#[tokio::test]
async fn every_method_reaches_the_upstream_as_that_method() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
    for given in methods.iter().map(|m| m.to_string()).chain(methods.iter().map(|m| m.to_lowercase())) {
        let before = upstream.hits();
        let resp = sidecar.execute(request(&given, &upstream.url("/m"))).await;
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{given}: {resp:?}");
        let seen = upstream.seen();
        assert_eq!(seen.len(), before + 1, "{given}");
        assert_eq!(seen.last().unwrap().method, given.to_uppercase(), "{given}");
        assert_eq!(seen.last().unwrap().target, "/m");
    }
}

#[tokio::test]
async fn query_pairs_are_percent_encoded_in_order_after_the_urls_own_query() {
    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        query: vec![
            kv("a b", "c&d"),
            kv("e=f", "ü"),
            kv("safe", "-._~"),
            kv("z", "1"),
            kv("a b", "2"),
            kv("plus", "1+1"),
        ],
        ..request("GET", &format!("{url}?own=1&x=y"))
    })
    .await;
    assert_eq!(seen.target, "/r?own=1&x=y&a%20b=c%26d&e%3Df=%C3%BC&safe=-._~&z=1&a%20b=2&plus=1%2B1");
}

#[tokio::test]
async fn query_pairs_start_the_query_when_the_url_has_none() {
    let seen =
        sent(|url| pb::ExecuteHttpActionRequest { query: vec![kv("q", "x y")], ..request("GET", &url) })
            .await;
    assert_eq!(seen.target, "/r?q=x%20y");
}

#[tokio::test]
async fn repeated_headers_all_arrive_in_order() {
    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        headers: vec![kv("X-Multi", "first"), kv("X-Other", "o"), kv("X-Multi", "second")],
        ..request("GET", &url)
    })
    .await;
    assert_eq!(seen.header_values("x-multi"), ["first", "second"]);
    assert_eq!(seen.header_values("x-other"), ["o"]);
}

#[tokio::test]
async fn json_body_is_sent_as_given_with_application_json() {
    let text = r#"{"order": 7, "items": ["a", "b"]}"#;
    let seen = sent(|url| with_body(request("POST", &url), Body::Json(text.into()))).await;
    assert_eq!(seen.header_values("content-type"), ["application/json"]);
    assert_eq!(seen.body, text.as_bytes());
}

/// Seed scenario: a form body sent with the urlencoded header unless the header is set
/// explicitly.
#[tokio::test]
async fn form_body_is_urlencoded_with_the_form_content_type_unless_the_header_is_set() {
    let fields = [("name", "Ada Lovelace"), ("q", "a&b=c"), ("city", "Zürich"), ("name", "again")];

    let seen = sent(|url| with_body(request("POST", &url), form(&fields))).await;
    assert_eq!(seen.header_values("content-type"), ["application/x-www-form-urlencoded"]);
    let body = std::str::from_utf8(&seen.body).unwrap();
    assert!(!body.contains(' ') && !body.contains('ü'), "not encoded: {body}");
    assert_eq!(body.matches('&').count(), 3, "only the separators stay raw: {body}");
    let decoded: Vec<(String, String)> = form_urlencoded::parse(&seen.body).into_owned().collect();
    let expected: Vec<(String, String)> =
        fields.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    assert_eq!(decoded, expected);

    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        headers: vec![kv("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")],
        ..with_body(request("POST", &url), form(&fields))
    })
    .await;
    assert_eq!(seen.header_values("content-type"), ["application/x-www-form-urlencoded; charset=utf-8"]);
    let decoded: Vec<(String, String)> = form_urlencoded::parse(&seen.body).into_owned().collect();
    assert_eq!(decoded, expected);

    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        headers: vec![kv("content-type", "text/plain")],
        ..with_body(request("PUT", &url), form(&fields))
    })
    .await;
    assert_eq!(seen.header_values("content-type"), ["text/plain"]);
}

#[tokio::test]
async fn text_body_is_sent_as_is_without_a_content_type() {
    let text = "héllo\r\n  world {\"not\": parsed} & a=b ";
    let seen = sent(|url| with_body(request("POST", &url), Body::Text(text.into()))).await;
    assert_eq!(seen.header("content-type"), None, "{seen:?}");
    assert_eq!(seen.body, text.as_bytes());
}

#[tokio::test]
async fn raw_body_is_sent_as_is_without_a_content_type() {
    let bytes = vec![0u8, 0x9f, 0x92, 0x96, 0xff, b'\n', 0x00, b'x'];
    let seen = sent(|url| with_body(request("PUT", &url), Body::Raw(bytes.clone().into()))).await;
    assert_eq!(seen.header("content-type"), None, "{seen:?}");
    assert_eq!(seen.body, bytes);
}

#[tokio::test]
async fn content_type_field_overrides_the_bodys_default() {
    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        content_type: "application/vnd.api+json".into(),
        ..with_body(request("POST", &url), Body::Json("{}".into()))
    })
    .await;
    assert_eq!(seen.header_values("content-type"), ["application/vnd.api+json"]);

    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        content_type: "text/csv".into(),
        ..with_body(request("POST", &url), Body::Text("a,b\n1,2\n".into()))
    })
    .await;
    assert_eq!(seen.header_values("content-type"), ["text/csv"]);

    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        content_type: "application/octet-stream".into(),
        ..with_body(request("POST", &url), Body::Raw(vec![1, 2, 3].into()))
    })
    .await;
    assert_eq!(seen.header_values("content-type"), ["application/octet-stream"]);
}

#[tokio::test]
async fn explicit_content_type_header_wins_over_field_and_default() {
    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        content_type: "application/x-ignored".into(),
        headers: vec![kv("Content-Type", "application/merge-patch+json")],
        ..with_body(request("PATCH", &url), Body::Json(r#"{"a":null}"#.into()))
    })
    .await;
    assert_eq!(seen.header_values("content-type"), ["application/merge-patch+json"]);
    assert_eq!(seen.body, br#"{"a":null}"#.as_slice());
}

#[tokio::test]
async fn url_credentials_arrive_as_basic_authorization_and_are_not_echoed() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let url = format!("http://user:p%40ss%20w@{}/x?y=1", upstream.addr);
    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let seen = &upstream.seen()[0];
    // base64("user:p@ss w")
    assert_eq!(seen.header_values("authorization"), ["Basic dXNlcjpwQHNzIHc="]);
    assert_eq!(seen.target, "/x?y=1");
    let reply = format!("{resp:?}");
    for secret in ["p%40ss", "p@ss", "dXNlcjpwQHNzIHc="] {
        assert!(!reply.contains(secret), "reply shows {secret}: {reply}");
    }
}

#[tokio::test]
async fn an_authorization_header_wins_over_url_credentials() {
    let seen = sent(|url| {
        let url = url.replacen("http://", "http://user:pw@", 1);
        pb::ExecuteHttpActionRequest {
            headers: vec![kv("Authorization", "Bearer abc")],
            ..request("GET", &url)
        }
    })
    .await;
    assert_eq!(seen.header_values("authorization"), ["Bearer abc"]);
}

#[tokio::test]
async fn url_credentials_are_absent_from_error_text() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sidecar = Sidecar::start().await;
    let url = format!("http://alice:hunter2@127.0.0.1:{port}/private");
    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Connect, "{resp:?}");
    let reply = format!("{resp:?}");
    for secret in ["hunter2", "YWxpY2U6aHVudGVyMg=="] {
        assert!(!reply.contains(secret), "reply shows {secret}: {reply}");
    }
}

#[tokio::test]
async fn default_user_agent_is_callout_unless_the_caller_sets_one() {
    let seen = sent(|url| request("GET", &url)).await;
    let agents = seen.header_values("user-agent");
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert!(agents[0].starts_with("callout/"), "{agents:?}");
    assert!(agents[0].len() > "callout/".len(), "version missing: {agents:?}");

    let seen = sent(|url| pb::ExecuteHttpActionRequest {
        headers: vec![kv("User-Agent", "my-engine/2.1")],
        ..request("GET", &url)
    })
    .await;
    assert_eq!(seen.header_values("user-agent"), ["my-engine/2.1"]);
}
