//! Redirects: method and body rewriting, Location forms, credentials across origins, loops,
//! the hop limit, and not following.
use crate::support::*;
use callout::pb;
use http::Response;
use std::sync::{Arc, OnceLock};

/// A redirect with `status` to `location`.
fn redirect(status: u16, location: &str) -> Response<UpBody> {
    Response::builder().status(status).header("location", location).body(body("moved")).unwrap()
}

/// An upstream that routes on the target:
/// - `/r/{status}/{rest}` redirects with `status` to `/{rest}`;
/// - `/abs/{rest}` redirects with 302 to `http://{own address}/{rest}`;
/// - `/dir/rel` redirects with 302 to the relative `next` (so `/dir/next`);
/// - `/loop/a` and `/loop/b` redirect to each other;
/// - `/chain/{n}` redirects to `/chain/{n-1}` while n > 0;
/// - anything else answers 200 with `final {method} {target}`.
async fn routing_upstream() -> Upstream {
    let own: Arc<OnceLock<String>> = Arc::default();
    let base = own.clone();
    let upstream = Upstream::start(move |seen: Seen| {
        let base = base.clone();
        async move {
            let t = seen.target.as_str();
            if let Some(rest) = t.strip_prefix("/r/") {
                let (status, to) = rest.split_once('/').unwrap();
                return redirect(status.parse().unwrap(), &format!("/{to}"));
            }
            if let Some(rest) = t.strip_prefix("/abs/") {
                return redirect(302, &format!("{}/{rest}", base.get().unwrap()));
            }
            match t {
                "/dir/rel" => return redirect(302, "next"),
                "/loop/a" => return redirect(302, "/loop/b"),
                "/loop/b" => return redirect(302, "/loop/a"),
                _ => {}
            }
            if let Some(n) = t.strip_prefix("/chain/") {
                let n: u32 = n.parse().unwrap();
                if n > 0 {
                    return redirect(302, &format!("/chain/{}", n - 1));
                }
            }
            let text = format!("final {} {}", seen.method, seen.target);
            Response::builder().status(200).header("content-type", "text/plain").body(body(text)).unwrap()
        }
    })
    .await;
    own.set(format!("http://{}", upstream.addr)).unwrap();
    upstream
}

fn post(url: &str) -> pb::ExecuteHttpActionRequest {
    let mut req = request("POST", url);
    req.body = Some(pb::execute_http_action_request::Body::Json(r#"{"id":7}"#.into()));
    req
}

fn final_text(resp: &pb::ExecuteHttpActionResponse) -> String {
    resp.response.as_ref().and_then(|r| r.body_text.clone()).unwrap_or_default()
}

fn message(resp: &pb::ExecuteHttpActionResponse) -> String {
    resp.error.as_ref().map(|e| e.message.clone()).unwrap_or_default()
}

#[tokio::test]
async fn post_becomes_get_without_body_on_301_302_303() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    for status in [301, 302, 303] {
        let resp = sidecar.execute(post(&upstream.url(&format!("/r/{status}/done-{status}")))).await;
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{status}: {resp:?}");
        let r = resp.response.as_ref().unwrap();
        assert_eq!(r.status, 200, "the final response is the one after the redirect");
        assert_eq!(final_text(&resp), format!("final GET /done-{status}"));
        assert_eq!(resp.attempts.len(), 1, "a redirect is part of one attempt: {resp:?}");
        assert_eq!(resp.attempts[0].status, 200, "{resp:?}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6, "{seen:?}");
    for pair in seen.chunks(2) {
        let (first, second) = (&pair[0], &pair[1]);
        assert_eq!(first.method, "POST");
        assert_eq!(first.body, r#"{"id":7}"#);
        assert_eq!(second.method, "GET", "{second:?}");
        assert!(second.body.is_empty(), "{second:?}");
        assert_eq!(second.header("content-type"), None, "no body, no Content-Type: {second:?}");
    }
}

#[tokio::test]
async fn post_keeps_method_and_body_on_307_308() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    for status in [307, 308] {
        let resp = sidecar.execute(post(&upstream.url(&format!("/r/{status}/kept-{status}")))).await;
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{status}: {resp:?}");
        assert_eq!(final_text(&resp), format!("final POST /kept-{status}"));
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for s in &seen {
        assert_eq!(s.method, "POST", "{s:?}");
        assert_eq!(s.body, r#"{"id":7}"#, "{s:?}");
        assert_eq!(s.header("content-type").as_deref(), Some("application/json"), "{s:?}");
    }
}

#[tokio::test]
async fn put_stays_put_on_302() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    let mut req = request("PUT", &upstream.url("/r/302/put-target"));
    req.body = Some(pb::execute_http_action_request::Body::Text("payload".into()));
    let resp = sidecar.execute(req).await;
    assert_eq!(final_text(&resp), "final PUT /put-target", "{resp:?}");
    assert_eq!(upstream.seen()[1].body, "payload");
}

#[tokio::test]
async fn relative_and_absolute_locations() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;

    let resp = sidecar.execute(request("GET", &upstream.url("/dir/rel"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(final_text(&resp), "final GET /dir/next", "a relative Location resolves against the URL");

    let resp = sidecar.execute(request("GET", &upstream.url("/abs/there?x=1&y=two"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(final_text(&resp), "final GET /there?x=1&y=two");

    let resp = sidecar.execute(request("GET", &upstream.url("/r/302/with?q=a%20b"))).await;
    assert_eq!(final_text(&resp), "final GET /with?q=a%20b", "the Location's query is kept");
}

#[tokio::test]
async fn credentials_stay_on_same_origin_redirects() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/abs/same"));
    req.headers.push(kv("Authorization", "Bearer secret"));
    req.headers.push(kv("Cookie", "session=1"));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].target, "/same");
    assert_eq!(seen[1].header("authorization").as_deref(), Some("Bearer secret"), "{:?}", seen[1]);
    assert_eq!(seen[1].header("cookie").as_deref(), Some("session=1"), "{:?}", seen[1]);
}

#[tokio::test]
async fn credentials_are_dropped_on_cross_origin_redirects() {
    // Another port is another origin.
    let other = Upstream::fixed(200, "elsewhere").await;
    let to = other.url("/landing");
    let first = Upstream::start(move |_| {
        let to = to.clone();
        async move { redirect(302, &to) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &first.url("/start"));
    req.headers.push(kv("Authorization", "Bearer secret"));
    req.headers.push(kv("Cookie", "session=1"));
    req.headers.push(kv("X-Trace", "t-1"));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().body_text.as_deref(), Some("elsewhere"));

    let before = &first.seen()[0];
    assert_eq!(before.header("authorization").as_deref(), Some("Bearer secret"));
    assert_eq!(before.header("cookie").as_deref(), Some("session=1"));
    let after = other.seen();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].target, "/landing");
    assert_eq!(after[0].header("authorization"), None, "Authorization crossed origins: {:?}", after[0]);
    assert_eq!(after[0].header("cookie"), None, "Cookie crossed origins: {:?}", after[0]);
    assert_eq!(after[0].header("x-trace").as_deref(), Some("t-1"), "other headers follow: {:?}", after[0]);
    assert_eq!(resp.attempts[0].remote_address, other.addr.to_string(), "{resp:?}");
}

/// Secret-filled headers, API-key names, configured sensitive headers and proxy credentials
/// are dropped with Authorization when a redirect crosses origins (two upstreams on two ports
/// are two origins); on the first origin every one of them arrives.
#[tokio::test]
async fn every_sensitive_header_is_dropped_on_cross_origin_redirects() {
    let dir = std::env::temp_dir().join(format!("callout-it-redirect-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), "tok-5ecret").unwrap();
    let other = Upstream::fixed(200, "elsewhere").await;
    let to = other.url("/landing");
    let first = Upstream::start(move |_| {
        let to = to.clone();
        async move { redirect(307, &to) }
    })
    .await;
    let mut settings = test_settings();
    settings.secrets.dir = Some(dir.clone());
    settings.sensitive_headers = vec![http::HeaderName::from_static("x-configured")];
    let sidecar = Sidecar::start_with(settings).await;
    let mut req = request("GET", &first.url("/start"));
    let sensitive = [
        ("x-token", "{{secret:token}}"),
        ("x-api-key", "literal-key"),
        ("x-configured", "configured"),
        ("proxy-authorization", "Basic cHc="),
        ("cookie", "session=1"),
    ];
    for (name, value) in sensitive {
        req.headers.push(kv(name, value));
    }
    req.headers.push(kv("X-Plain", "stays"));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");

    let before = &first.seen()[0];
    for (name, _) in sensitive {
        assert!(before.header(name).is_some(), "{name} reaches the first origin: {before:?}");
    }
    assert_eq!(before.header("x-token").as_deref(), Some("tok-5ecret"));
    let after = other.seen();
    assert_eq!(after.len(), 1);
    for (name, _) in sensitive {
        assert_eq!(after[0].header(name), None, "{name} crossed origins: {:?}", after[0]);
    }
    assert_eq!(after[0].header("x-plain").as_deref(), Some("stays"), "{:?}", after[0]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn basic_auth_from_the_url_does_not_cross_origins() {
    let other = Upstream::fixed(200, "elsewhere").await;
    let to = other.url("/landing");
    let first = Upstream::start(move |_| {
        let to = to.clone();
        async move { redirect(307, &to) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let url = format!("http://user:pw@{}/start", first.addr);
    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert!(first.seen()[0].header("authorization").is_some_and(|v| v.starts_with("Basic ")));
    assert_eq!(other.seen()[0].header("authorization"), None, "{:?}", other.seen()[0]);
}

#[tokio::test]
async fn redirect_loop_fails_as_protocol_error() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/loop/a"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Protocol, "{resp:?}");
    assert!(message(&resp).contains("loop"), "{resp:?}");
    let targets: Vec<String> = upstream.seen().into_iter().map(|s| s.target).collect();
    assert_eq!(targets, ["/loop/a", "/loop/b"]);
}

#[tokio::test]
async fn more_redirects_than_max_hops_fail() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/chain/5"));
    req.redirects = Some(Box::new(pb::Redirects { follow: None, max_hops: 3 }));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::Protocol, "{resp:?}");
    assert!(message(&resp).contains("redirects"), "{resp:?}");
    assert_eq!(upstream.hits(), 4, "the first request and 3 followed redirects: {:?}", upstream.seen());
}

#[tokio::test]
async fn exactly_max_hops_redirects_succeed() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/chain/3"));
    req.redirects = Some(Box::new(pb::Redirects { follow: None, max_hops: 3 }));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(final_text(&resp), "final GET /chain/0");
    assert_eq!(upstream.hits(), 4);
}

#[tokio::test]
async fn not_following_returns_the_redirect_itself() {
    let upstream = routing_upstream().await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/r/302/elsewhere"));
    req.redirects = Some(Box::new(pb::Redirects { follow: Some(false), max_hops: 0 }));
    let resp = sidecar.execute(req.clone()).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed, "a 302 is not 2xx: {resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::UnexpectedStatus, "{resp:?}");
    let r = resp.response.as_ref().unwrap();
    assert_eq!(r.status, 302);
    assert!(r.headers.iter().any(|h| h.name == "location" && h.value == "/elsewhere"), "{r:?}");
    assert_eq!(upstream.hits(), 1);

    req.success_codes = "3xx".into();
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().status, 302);
    assert_eq!(resp.response.as_ref().unwrap().body_text.as_deref(), Some("moved"));
    assert_eq!(upstream.hits(), 2, "still not followed");
}
