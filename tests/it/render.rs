//! Render (and `callout exec --dry-run`) against real things: the rendered request compared with
//! what a loopback upstream then receives for the same action (identical but for redacted
//! values), nothing sent and no token fetched on Render, the egress verdict per address, the
//! proxy, INVALID_ARGUMENT for a bad action, and the real binary's dry run.
use super::secrets::{secrets_dir, with_secrets};
use crate::support::*;
use base64::Engine as _;
use callout::{
    action::ProxyUrl,
    client::{NoProxy, Proxies},
    exec::ExecSettings,
    pb::{self, execute_http_action_request::Body},
};
use prost::Message as _;
use prost_types::{value::Kind, Value};
use std::{collections::BTreeMap, net::IpAddr, process::Output, time::Duration};

const TOKEN: &str = "tok-5ecret-r3nder";
const TENANT: &str = "acme corp";
const PASSWORD: &str = "pa55-w0rd-r3nder";
const WEBHOOK_KEY: &[u8] = b"webhook-key-bytes-r3nder";

fn string(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.into())) }
}

fn number(n: f64) -> Value {
    Value { kind: Some(Kind::NumberValue(n)) }
}

async fn render(sidecar: &Sidecar, req: pb::ExecuteHttpActionRequest) -> pb::RenderedRequest {
    sidecar.client.clone().render(req).await.unwrap().into_inner()
}

/// Every text of `reply`, for "no secret anywhere" checks: its Debug form and its encoding.
fn everything(reply: &pb::RenderedRequest) -> String {
    format!("{reply:?} {}", String::from_utf8_lossy(&reply.encode_to_vec()))
}

/// `text` with the secrets' values, in the forms they travel in, replaced by Render's markers.
fn redact(text: &str) -> String {
    let mut out = text.to_owned();
    for (name, forms) in [
        ("api-token", vec![TOKEN.to_owned()]),
        ("tenant", vec![TENANT.to_owned(), TENANT.replace(' ', "%20")]),
    ] {
        for form in forms {
            out = out.replace(&form, &format!("[REDACTED:secret {name}]"));
        }
    }
    out
}

/// Secrets and vars in the URL, query, headers and JSON body, Basic auth from a secret, signed.
fn templated(upstream: &Upstream) -> pb::ExecuteHttpActionRequest {
    let webhook_secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(WEBHOOK_KEY));
    pb::ExecuteHttpActionRequest {
        action_id: "order-17".into(),
        vars: [("order".to_string(), string("o 1/2")), ("n".to_string(), number(5.0))].into(),
        query: vec![kv("tenant", "{{secret:tenant}}"), kv("order", "{{vars.order}}")],
        headers: vec![
            kv("X-Order", "order-{{vars.n}}"),
            kv("X-Token", "pre-{{secret:api-token}}"),
            kv("Cookie", "session=abc"),
        ],
        body: Some(Body::Json(
            r#"{"key":"{{secret:api-token}}","n":"{{vars.n}}","who":"{{vars.order}}"}"#.into(),
        )),
        auth: Some(Box::new(pb::Auth {
            kind: Some(pb::auth::Kind::Basic(pb::BasicAuth {
                username: "u".into(),
                password: "{{secret:password}}".into(),
            })),
        })),
        signing: Some(Box::new(pb::Signing {
            scheme: Some(pb::signing::Scheme::StandardWebhooks(pb::StandardWebhooks {
                secret: webhook_secret,
            })),
        })),
        ..request("POST", &upstream.url("/t/{{secret:tenant}}/{{vars.order}}"))
    }
}

#[tokio::test]
async fn render_is_what_the_upstream_then_receives_but_for_redacted_values() {
    let dir = secrets_dir("render-same", &[("api-token", TOKEN), ("tenant", TENANT), ("password", PASSWORD)]);
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start_with(with_secrets(&dir)).await;

    let rendered = render(&sidecar, templated(&upstream)).await;
    assert_eq!(upstream.hits(), 0, "Render sends nothing");
    let all = everything(&rendered);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("u:{PASSWORD}"));
    for secret in [TOKEN, TENANT, "acme%20corp", PASSWORD, &basic, "session=abc"] {
        assert!(!all.contains(secret), "{secret:?} is in the reply: {all}");
    }

    let resp = sidecar.execute(templated(&upstream)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let seen = &upstream.seen()[0];

    assert_eq!(rendered.action_id, "order-17");
    assert_eq!(rendered.method, seen.method);
    let target = rendered.url.strip_prefix(&format!("http://{}", upstream.addr)).unwrap();
    assert_eq!(target, redact(&seen.target));
    assert_eq!(
        target,
        "/t/[REDACTED:secret tenant]/o%201%2F2?tenant=[REDACTED:secret tenant]&order=o%201%2F2"
    );

    let names: Vec<&str> = rendered.headers.iter().map(|h| h.name.as_str()).collect();
    let seen_names: Vec<&str> = seen.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, seen_names, "the same headers in the same order");
    for (shown, (name, sent)) in rendered.headers.iter().zip(&seen.headers) {
        match name.as_str() {
            // Per attempt, to the second.
            "webhook-timestamp" => {
                let (a, b): (u64, u64) = (shown.value.parse().unwrap(), sent.parse().unwrap());
                assert!(a.abs_diff(b) <= 5, "{a} {b}");
            }
            "webhook-signature" => assert_eq!(shown.value, "[REDACTED:standard webhooks signature]"),
            "authorization" => assert_eq!(shown.value, "Basic [REDACTED]"),
            "cookie" => assert_eq!(shown.value, "[REDACTED]"),
            _ => assert_eq!(shown.value, redact(sent), "{name}"),
        }
    }
    let header = |name: &str| rendered.headers.iter().find(|h| h.name == name).map(|h| h.value.as_str());
    assert_eq!(header("x-token"), Some("pre-[REDACTED:secret api-token]"));
    assert_eq!(header("x-order"), Some("order-5"));
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(header("webhook-id"), Some("order-17"));
    assert!(header("user-agent").is_some_and(|ua| ua.starts_with("callout/")));

    assert_eq!(rendered.body_size, seen.body.len() as u64);
    assert!(rendered.body_redacted);
    assert_eq!(String::from_utf8_lossy(&rendered.body), redact(&String::from_utf8_lossy(&seen.body)));
    assert_eq!(
        String::from_utf8_lossy(&rendered.body),
        r#"{"key":"[REDACTED:secret api-token]","n":5,"who":"o 1/2"}"#
    );
    assert_eq!((rendered.auth.as_str(), rendered.signing.as_str()), ("header", "standard_webhooks"));
}

#[tokio::test]
async fn the_effective_policy_has_the_defaults_and_the_deadline_applied() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.retry = None;
    req.extract = [("id".to_string(), "$.items[0].id".to_string())].into();
    req.success_condition = "status == 200".into();
    let rendered = render(&sidecar, req.clone()).await;
    let policy = rendered.policy.unwrap();
    assert_eq!(policy.connect_timeout, Some(dur(Duration::from_secs(10))));
    assert_eq!(policy.attempt_timeout, Some(dur(Duration::from_secs(30))));
    assert_eq!(policy.total_timeout, Some(dur(Duration::from_secs(300))));
    assert_eq!(policy.total_timeout_source, "server default");
    assert_eq!((policy.max_attempts, policy.retry_on_status.as_str()), (3, "429,502,503,504"));
    assert_eq!(policy.retry_on_errors, [pb::ErrorKind::Connect as i32, pb::ErrorKind::Timeout as i32]);
    assert!(policy.may_repeat && policy.jitter && policy.follow_redirects);
    assert_eq!((policy.success_codes.as_str(), policy.max_redirects), ("2xx", 10));
    assert_eq!(policy.max_response_bytes, 2 * 1024 * 1024);
    assert_eq!(policy.success_condition, "status == 200");
    assert_eq!(policy.extract, [kv("id", "$.items[0].id")]);

    // A 2 s deadline bounds the total, less its margin.
    let mut call = tonic::Request::new(req);
    call.set_timeout(Duration::from_secs(2));
    let policy = sidecar.client.clone().render(call).await.unwrap().into_inner().policy.unwrap();
    assert_eq!(policy.total_timeout_source, "deadline");
    assert_eq!(policy.total_timeout, Some(dur(Duration::from_millis(1800))));
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn credentials_render_redacted_and_no_token_is_fetched() {
    let idp =
        Upstream::start(|_| async { json(200, serde_json::json!({"access_token": "t", "expires_in": 60})) })
            .await;
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/data"));
    req.auth = Some(Box::new(pb::Auth {
        kind: Some(pb::auth::Kind::Oauth2ClientCredentials(pb::OAuth2ClientCredentials {
            token_url: idp.url("/token"),
            client_id: "cid".into(),
            client_secret: "cl1ent-s3cret".into(),
            ..Default::default()
        })),
    }));
    let rendered = render(&sidecar, req).await;
    let auth = rendered.headers.iter().find(|h| h.name == "authorization").unwrap();
    assert_eq!(
        auth.value,
        format!("Bearer [REDACTED:oauth2 token from token endpoint {}]", idp.url("/token"))
    );
    assert_eq!(rendered.auth, "oauth2_client_credentials");
    assert!(!everything(&rendered).contains("cl1ent-s3cret"));
    assert_eq!((idp.hits(), upstream.hits()), (0, 0), "no token fetched, nothing sent");

    // An API key in the query, and a bearer token.
    let mut req = request("GET", &upstream.url("/data?a=1"));
    req.auth = Some(Box::new(pb::Auth {
        kind: Some(pb::auth::Kind::ApiKey(pb::ApiKeyAuth {
            name: "key".into(),
            value: "k3y-value".into(),
            r#in: 2,
        })),
    }));
    let rendered = render(&sidecar, req.clone()).await;
    assert_eq!(rendered.url, upstream.url("/data?a=1&key=[REDACTED:api key]"));
    assert!(!everything(&rendered).contains("k3y-value"));
    sidecar.execute(req).await;
    assert_eq!(upstream.seen()[0].target, "/data?a=1&key=k3y-value", "the key is sent where Render shows it");
    let mut req = request("GET", &upstream.url("/"));
    req.auth = Some(Box::new(pb::Auth { kind: Some(pb::auth::Kind::BearerToken("b3arer-tok".into())) }));
    let rendered = render(&sidecar, req).await;
    assert!(rendered.headers.iter().any(|h| h.name == "authorization" && h.value == "Bearer [REDACTED]"));
    assert!(!everything(&rendered).contains("b3arer-tok"));
}

#[tokio::test]
async fn the_egress_verdict_is_given_per_address_and_nothing_is_dialled() {
    let upstream = Upstream::fixed(200, "ok").await;
    // The default policy: loopback is denied.
    let strict = Sidecar::start_with(ExecSettings::default()).await;
    let egress = render(&strict, request("GET", &upstream.url("/"))).await.egress.unwrap();
    assert!(!egress.allowed, "{egress:?}");
    assert_eq!(egress.target, upstream.addr.to_string());
    assert_eq!(egress.resolved_by, "literal");
    assert_eq!(egress.addresses.len(), 1);
    assert_eq!(egress.addresses[0].address, upstream.addr.to_string());
    assert!(!egress.addresses[0].allowed);
    assert!(egress.addresses[0].reason.contains("loopback range 127.0.0.0/8"), "{egress:?}");
    // A metadata host is refused by name, before any lookup.
    let egress = render(&strict, request("GET", "http://metadata.google.internal/")).await.egress.unwrap();
    assert!(!egress.allowed && egress.addresses.is_empty());
    assert!(egress.denied.contains("cloud metadata host"), "{egress:?}");

    // An allow rule for one address; a name with fixed addresses (--resolve), one of them denied.
    let mut settings = ExecSettings::default();
    settings.egress.allow = vec!["127.0.0.1".parse().unwrap()];
    let fixed: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap()];
    settings.client.resolve = BTreeMap::from([("api.example.test".to_owned(), fixed)]);
    let allowing = Sidecar::start_with(settings).await;
    let egress = render(&allowing, request("GET", &upstream.url("/"))).await.egress.unwrap();
    assert!(egress.allowed && egress.addresses[0].allowed, "{egress:?}");
    let port = upstream.addr.port();
    let egress =
        render(&allowing, request("GET", &format!("http://api.example.test:{port}/"))).await.egress.unwrap();
    assert!(egress.allowed, "one address may be dialled: {egress:?}");
    assert_eq!(egress.resolved_by, "fixed");
    let verdicts: Vec<(&str, bool)> =
        egress.addresses.iter().map(|a| (a.address.as_str(), a.allowed)).collect();
    assert_eq!(
        verdicts,
        [(format!("127.0.0.1:{port}").as_str(), true), (format!("10.1.2.3:{port}").as_str(), false)]
    );
    assert!(egress.addresses[1].reason.contains("private range"), "{egress:?}");
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn the_proxy_is_named_without_its_credentials() {
    let proxy = Upstream::fixed(200, "from the proxy").await;
    let mut settings = test_settings();
    let proxy_url = ProxyUrl::parse(&proxy.url("").replace("http://", "http://user:s3cret@")).unwrap();
    settings.client.proxies =
        Proxies::new(Some(proxy_url.clone()), Some(proxy_url), NoProxy::parse("localhost"));
    let sidecar = Sidecar::start_with(settings).await;

    let rendered = render(&sidecar, request("GET", "http://api.example.test/x")).await;
    let route = rendered.proxy.clone().unwrap();
    assert!(route.used);
    assert_eq!((route.url.as_str(), route.source.as_str()), (proxy.url("").as_str(), "server"));
    let egress = rendered.egress.clone().unwrap();
    assert!(egress.allowed, "{egress:?}");
    assert_eq!(
        (egress.target.as_str(), egress.dialled.as_str()),
        ("api.example.test:80", &*proxy.addr.to_string())
    );
    assert!(egress.addresses[0].reason.starts_with("not checked"), "{egress:?}");
    let auth = rendered.headers.iter().find(|h| h.name == "proxy-authorization").unwrap();
    assert_eq!(auth.value, "Basic [REDACTED]");
    assert!(!everything(&rendered).contains("s3cret"));
    // What the proxy then gets: the same headers.
    sidecar.execute(request("GET", "http://api.example.test/x")).await;
    let seen: Vec<String> = proxy.seen()[0].headers.iter().map(|(n, _)| n.clone()).collect();
    let shown: Vec<String> = rendered.headers.iter().map(|h| h.name.clone()).collect();
    assert_eq!(shown, seen);

    // NO_PROXY: direct.
    let route = render(&sidecar, request("GET", "http://localhost:1/")).await.proxy.unwrap();
    assert!(!route.used && route.url.is_empty());
    assert!(route.reason.contains("NO_PROXY"), "{route:?}");
    // The action's own proxy.
    let mut req = request("GET", "http://api.example.test/x");
    req.proxy = Some(Box::new(pb::ProxyOptions { url: "http://127.0.0.1:9/".into() }));
    let rendered = render(&sidecar, req).await;
    assert_eq!(rendered.proxy.unwrap().source, "action");
    assert_eq!(rendered.egress.unwrap().dialled, "127.0.0.1:9");
    assert_eq!(proxy.hits(), 1);
}

#[tokio::test]
async fn an_invalid_action_is_invalid_argument_naming_the_field() {
    let sidecar = Sidecar::start().await;
    let status = sidecar.client.clone().render(request("GET", "")).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["url"]);
    let mut req = request("GET", "http://h.test/");
    req.headers = vec![kv("X-A", "{{secret:missing}}")];
    let status = sidecar.client.clone().render(req).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["headers[0].value"]);
}

/// `callout exec --dry-run ARGS...`, the real binary.
async fn dry_run(args: &[&str]) -> Output {
    super::cli::callout_exec(&["--dry-run"], args).await
}

#[tokio::test]
async fn exec_dry_run_prints_the_request_and_sends_nothing() {
    let upstream = Upstream::fixed(200, "ok").await;
    let url = upstream.url("/orders?a=1");
    let out = dry_run(&[
        "--allow-private-networks",
        "-H",
        "Authorization: Bearer s3cret-tok",
        "--json",
        r#"{"n":1}"#,
        &url,
    ])
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["method"], "POST");
    assert_eq!(printed["url"], url);
    assert_eq!(printed["egress"]["allowed"], true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Bearer [REDACTED]") && !stdout.contains("s3cret-tok"), "{stdout}");

    // -i: as HTTP/1.1 text.
    let out = dry_run(&["--allow-private-networks", "-i", "-H", "X-A: b", &url]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("GET /orders?a=1 HTTP/1.1\r\nx-a: b\r\n"), "{text}");
    assert!(text.contains(&format!("\r\nhost: {}\r\n", upstream.addr)), "{text}");

    // Denied by the default egress policy: exit 1, the reason on stderr.
    let out = dry_run(&["-i", &url]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"), "{:?}", out);
    // Invalid: exit 2.
    let out = dry_run(&["-H", "bad header", &url]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(upstream.hits(), 0, "a dry run sends nothing");
}
