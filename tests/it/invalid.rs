//! Malformed actions: INVALID_ARGUMENT with a google.rpc.BadRequest field violation per
//! problem, secrets never echoed, and nothing sent upstream.
use crate::support::*;
use callout::pb::{self, execute_http_action_request::Body};
use std::collections::HashMap;

/// A live upstream that must never be reached, and the sidecar.
async fn setup() -> (Upstream, Sidecar) {
    (Upstream::fixed(200, "must not be reached").await, Sidecar::start().await)
}

/// Executes `req`, expecting INVALID_ARGUMENT; returns the status after checking the upstream
/// saw nothing.
async fn rejected(
    upstream: &Upstream,
    sidecar: &Sidecar,
    req: pb::ExecuteHttpActionRequest,
) -> tonic::Status {
    let what = format!("{req:?}");
    let status = match sidecar.try_execute(req).await {
        Ok(resp) => panic!("accepted {what}: {resp:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{what}: {status:?}");
    assert_eq!(upstream.hits(), 0, "sent although invalid: {what}");
    status
}

/// Asserts `req` is rejected with a violation on exactly the field `field` (among maybe others).
async fn rejects_field(
    upstream: &Upstream,
    sidecar: &Sidecar,
    req: pb::ExecuteHttpActionRequest,
    field: &str,
) {
    let status = rejected(upstream, sidecar, req).await;
    let fields = violated_fields(&status);
    assert!(fields.iter().any(|f| f == field), "want {field:?}, got {fields:?} ({status:?})");
}

fn with_headers(url: &str, headers: &[(&str, &str)]) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        headers: headers.iter().map(|(n, v)| kv(n, v)).collect(),
        ..request("GET", url)
    }
}

fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

#[tokio::test]
async fn bad_urls_are_rejected() {
    let (upstream, sidecar) = setup().await;
    let port = upstream.addr.port();
    for url in [
        String::new(),
        "   ".into(),
        "not a url".into(),
        "/relative/path".into(),
        format!("http://exa mple.com:{port}/"),
        format!("ftp://127.0.0.1:{port}/file"),
        "file:///etc/passwd".into(),
        "http://".into(),
        format!("http://:{port}/x"),
    ] {
        rejects_field(&upstream, &sidecar, request("GET", &url), "url").await;
    }
}

#[tokio::test]
async fn a_bad_url_with_credentials_is_not_echoed() {
    let (upstream, sidecar) = setup().await;
    let status = rejected(&upstream, &sidecar, request("GET", "http://bob:s3cr3tpw@exa mple.com/")).await;
    assert_eq!(violated_fields(&status), ["url"]);
    let shown = format!("{status:?} {}", String::from_utf8_lossy(status.details()));
    assert!(!shown.contains("s3cr3tpw"), "{shown}");
}

#[tokio::test]
async fn missing_or_unknown_methods_are_rejected() {
    let (upstream, sidecar) = setup().await;
    for method in ["", "FETCH", "CONNECT", "TRACE", "G\nET"] {
        rejects_field(&upstream, &sidecar, request(method, &upstream.url("/")), "method").await;
    }
}

#[tokio::test]
async fn bad_header_names_and_values_are_rejected() {
    let (upstream, sidecar) = setup().await;
    let url = upstream.url("/");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("X-Ok", "1"), ("X Bad", "1")], "headers[1].name"),
        (&[("", "1")], "headers[0].name"),
        (&[("X-Note", "a\r\nX-Evil: 1")], "headers[0].value"),
        (&[("X-Note", "a\nb")], "headers[0].value"),
        (&[("X-Note", "a\rb")], "headers[0].value"),
        (&[("Content-Length", "5")], "headers[0].name"),
        (&[("X-Ok", "1"), ("transfer-encoding", "chunked")], "headers[1].name"),
        (&[("Connection", "close")], "headers[0].name"),
    ];
    for (headers, field) in cases {
        rejects_field(&upstream, &sidecar, with_headers(&url, headers), field).await;
    }
}

#[tokio::test]
async fn a_secret_header_value_is_not_echoed() {
    let (upstream, sidecar) = setup().await;
    let token = "sk_live_TOPSECRET_42";
    let req = with_headers(&upstream.url("/"), &[("Authorization", &format!("Bearer {token}\r\nX-Evil: 1"))]);
    let status = rejected(&upstream, &sidecar, req).await;
    assert_eq!(violated_fields(&status), ["headers[0].value"]);
    let shown = format!("{status:?} {}", String::from_utf8_lossy(status.details()));
    assert!(!shown.contains(token), "{shown}");
}

#[tokio::test]
async fn a_json_body_that_does_not_parse_is_rejected() {
    let (upstream, sidecar) = setup().await;
    for text in ["{\"a\": ", "not json", ""] {
        let req = pb::ExecuteHttpActionRequest {
            body: Some(Body::Json(text.into())),
            ..request("POST", &upstream.url("/"))
        };
        rejects_field(&upstream, &sidecar, req, "json").await;
    }
}

#[tokio::test]
async fn bad_success_specs_are_rejected() {
    let (upstream, sidecar) = setup().await;
    for spec in ["abc", "6xx", "299-200", "200,", "99", "600", "2xx;3xx"] {
        let req =
            pb::ExecuteHttpActionRequest { success_codes: spec.into(), ..request("GET", &upstream.url("/")) };
        rejects_field(&upstream, &sidecar, req, "success_codes").await;
    }
}

#[tokio::test]
async fn zero_timeouts_are_rejected_each_by_name() {
    let (upstream, sidecar) = setup().await;
    let req = pb::ExecuteHttpActionRequest {
        timeouts: Some(Box::new(pb::Timeouts {
            connect: seconds(0),
            attempt: seconds(0),
            total: seconds(0),
        })),
        ..request("GET", &upstream.url("/"))
    };
    let status = rejected(&upstream, &sidecar, req).await;
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(fields, ["timeouts.attempt", "timeouts.connect", "timeouts.total"], "{status:?}");
}

#[tokio::test]
async fn negative_timeouts_are_rejected() {
    let (upstream, sidecar) = setup().await;
    for (timeouts, field) in [
        (pb::Timeouts { connect: seconds(-1), ..Default::default() }, "timeouts.connect"),
        (pb::Timeouts { attempt: seconds(-1), ..Default::default() }, "timeouts.attempt"),
        (
            pb::Timeouts {
                total: Some(prost_types::Duration { seconds: 0, nanos: -5 }),
                ..Default::default()
            },
            "timeouts.total",
        ),
    ] {
        let req = pb::ExecuteHttpActionRequest {
            timeouts: Some(Box::new(timeouts)),
            ..request("GET", &upstream.url("/"))
        };
        rejects_field(&upstream, &sidecar, req, field).await;
    }
}

#[tokio::test]
async fn bad_error_message_keys_are_rejected() {
    let (upstream, sidecar) = setup().await;
    for key in ["abc", "6xx", "4x", "99"] {
        let req = pb::ExecuteHttpActionRequest {
            error_messages: HashMap::from([
                ("404".to_string(), "fine".to_string()),
                (key.to_string(), "broken".to_string()),
            ]),
            ..request("GET", &upstream.url("/"))
        };
        let status = rejected(&upstream, &sidecar, req).await;
        let fields = violated_fields(&status);
        assert_eq!(fields.len(), 1, "{key}: {fields:?}");
        assert!(fields[0].starts_with("error_messages"), "{key}: {fields:?}");
        assert!(fields[0].contains(key), "the field names the key {key}: {fields:?}");
    }
}

#[tokio::test]
async fn a_retry_multiplier_below_one_is_rejected() {
    let (upstream, sidecar) = setup().await;
    let req = pb::ExecuteHttpActionRequest {
        retry: Some(Box::new(pb::RetryPolicy { max_attempts: 1, multiplier: 0.5, ..Default::default() })),
        ..request("GET", &upstream.url("/"))
    };
    rejects_field(&upstream, &sidecar, req, "retry.multiplier").await;
}

#[tokio::test]
async fn an_unknown_on_failure_value_is_rejected() {
    let (upstream, sidecar) = setup().await;
    let req = pb::ExecuteHttpActionRequest { on_failure: 99, ..request("GET", &upstream.url("/")) };
    rejects_field(&upstream, &sidecar, req, "on_failure").await;
}

#[tokio::test]
async fn every_problem_is_reported_in_one_status() {
    let (upstream, sidecar) = setup().await;
    let req = pb::ExecuteHttpActionRequest {
        method: "FETCH".into(),
        headers: vec![kv("X Bad", "1"), kv("X-Ok", "line\nbreak")],
        success_codes: "abc".into(),
        on_failure: 99,
        timeouts: Some(Box::new(pb::Timeouts {
            connect: seconds(0),
            attempt: seconds(-1),
            ..Default::default()
        })),
        retry: Some(Box::new(pb::RetryPolicy { multiplier: 0.5, ..Default::default() })),
        body: Some(Body::Json("{".into())),
        ..request("GET", &upstream.url("/"))
    };
    let status = rejected(&upstream, &sidecar, req).await;
    let fields = violated_fields(&status);
    for field in [
        "method",
        "headers[0].name",
        "headers[1].value",
        "success_codes",
        "on_failure",
        "timeouts.connect",
        "timeouts.attempt",
        "retry.multiplier",
        "json",
    ] {
        assert!(fields.iter().any(|f| f == field), "{field} missing from {fields:?}");
    }
}

#[tokio::test]
async fn bad_tls_and_proxy_options_are_refused() {
    let (upstream, sidecar) = setup().await;
    let req = pb::ExecuteHttpActionRequest {
        tls: Some(Box::new(pb::TlsOptions {
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            client_cert_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            ..Default::default()
        })),
        ..request("GET", &upstream.url("/"))
    };
    let status = rejected(&upstream, &sidecar, req).await;
    assert_eq!(violated_fields(&status), ["tls.ca_pem", "tls.client_key_pem"]);

    // The proxy is the live upstream itself: had it been used, the upstream would have seen it.
    let req = pb::ExecuteHttpActionRequest {
        proxy: Some(Box::new(pb::ProxyOptions {
            url: upstream.url("").replace("http://", "socks4://user:s3cret@"),
        })),
        ..request("GET", "http://example.invalid/")
    };
    let status = rejected(&upstream, &sidecar, req).await;
    assert_eq!(violated_fields(&status), ["proxy.url"]);
    assert!(!format!("{status:?}").contains("s3cret"), "{status:?}");
}

#[tokio::test]
async fn execute_stream_rejects_an_invalid_action_before_any_event() {
    let (upstream, sidecar) = setup().await;
    let req = pb::ExecuteHttpActionRequest {
        headers: vec![kv("Content-Length", "3")],
        ..request("POST", &upstream.url("/"))
    };
    let status = match sidecar.client.clone().execute_stream(req).await {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            let first = stream.message().await;
            panic!("the stream opened; first item: {first:?}");
        }
        Err(status) => status,
    };
    assert_eq!(violated_fields(&status), ["headers[0].name"]);
    assert_eq!(upstream.hits(), 0);
}
