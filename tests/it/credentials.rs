//! Credentials and signing against real servers: a loopback OAuth2 token server that counts the
//! tokens it issues (each valid 2 s) and a protected upstream that answers 401 to stale ones;
//! static credentials and their fate on a cross-origin redirect; profiles; AWS SigV4 against
//! AWS's published vectors and a loopback verifier; Standard Webhooks; and trace-level logs of
//! the real binary grepped for every secret.
use crate::support::*;
use base64::Engine as _;
use callout::{
    action::{AuthInput, AuthProfile, AuthProfiles, OAuth2Input, SigV4Credential},
    exec::ExecSettings,
    pb,
};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

const CLIENT_ID: &str = "callout-it";
const CLIENT_SECRET: &str = "cl1ent-s3cret-9f8e";

/// The token server's and protected upstream's shared state: tokens issued, and which are
/// valid until when.
#[derive(Default)]
struct Issuer {
    issued: AtomicU64,
    valid: Mutex<HashMap<String, Instant>>,
    /// Token requests seen (including refused ones).
    requests: AtomicU64,
}

impl Issuer {
    fn issued(&self) -> u64 {
        self.issued.load(Ordering::SeqCst)
    }
    fn revoke_all(&self) {
        self.valid.lock().unwrap().clear();
    }
}

/// A token endpoint: client credentials in HTTP Basic, a form body with the grant type; each
/// token `tok-N` lives 2 s.
async fn token_server(issuer: Arc<Issuer>, bind: &str) -> Upstream {
    Upstream::start_on(bind, move |seen| {
        let issuer = issuer.clone();
        async move {
            issuer.requests.fetch_add(1, Ordering::SeqCst);
            let basic =
                base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
            let form = String::from_utf8_lossy(&seen.body).into_owned();
            if seen.method != "POST"
                || seen.header("authorization") != Some(format!("Basic {basic}"))
                || !form.starts_with("grant_type=client_credentials")
                || seen.header("content-type").as_deref() != Some("application/x-www-form-urlencoded")
            {
                return json(
                    401,
                    serde_json::json!({"error": "invalid_client", "error_description": CLIENT_SECRET}),
                );
            }
            let n = issuer.issued.fetch_add(1, Ordering::SeqCst) + 1;
            let token = format!("tok-{n}-a1b2c3");
            issuer.valid.lock().unwrap().insert(token.clone(), Instant::now() + Duration::from_secs(2));
            json(200, serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": 2}))
        }
    })
    .await
}

/// An upstream that answers 200 to a valid bearer token and 401 to anything else.
async fn protected(issuer: Arc<Issuer>) -> Upstream {
    Upstream::start(move |seen| {
        let issuer = issuer.clone();
        async move {
            let token =
                seen.header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
            let valid = token.is_some_and(|t| {
                issuer.valid.lock().unwrap().get(&t).is_some_and(|until| Instant::now() < *until)
            });
            if valid {
                text(200, "ok")
            } else {
                text(401, "stale")
            }
        }
    })
    .await
}

fn oauth2(token_url: &str) -> pb::Auth {
    pb::Auth {
        kind: Some(pb::auth::Kind::Oauth2ClientCredentials(pb::OAuth2ClientCredentials {
            token_url: token_url.into(),
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            scopes: vec!["read".into()],
            ..Default::default()
        })),
    }
}

fn with_auth(method: &str, url: &str, auth: pb::Auth) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { auth: Some(Box::new(auth)), ..request(method, url) }
}

#[tokio::test]
async fn fifty_concurrent_actions_share_one_token_and_an_expired_one_is_fetched_once_more() {
    let issuer = Arc::new(Issuer::default());
    let idp = token_server(issuer.clone(), "127.0.0.1:0").await;
    let api = protected(issuer.clone()).await;
    let sidecar = Arc::new(Sidecar::start().await);
    let token_url = idp.url("/token");
    let run = |n: usize| {
        let (sidecar, url, token_url) = (sidecar.clone(), api.url("/data"), token_url.clone());
        async move {
            let calls: Vec<_> = (0..n)
                .map(|_| {
                    let (sidecar, req) = (sidecar.clone(), with_auth("GET", &url, oauth2(&token_url)));
                    tokio::spawn(async move { sidecar.execute(req).await })
                })
                .collect();
            for call in calls {
                let resp = call.await.unwrap();
                assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
                assert_eq!(resp.attempts.len(), 1);
            }
        }
    };
    run(50).await;
    assert_eq!(issuer.issued(), 1, "one token request for 50 concurrent actions");
    // The token (2 s) is refreshed ahead of its expiry: after it, one more request.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    run(10).await;
    assert_eq!(issuer.issued(), 2);
}

#[tokio::test]
async fn a_revoked_token_is_refreshed_once_and_the_attempt_retried_with_the_new_one() {
    let issuer = Arc::new(Issuer::default());
    let idp = token_server(issuer.clone(), "127.0.0.1:0").await;
    let api = protected(issuer.clone()).await;
    let sidecar = Sidecar::start().await;
    let mut req = with_auth("POST", &api.url("/orders"), oauth2(&idp.url("/token")));
    // No retries of its own, a POST: the refresh is its own attempt all the same.
    req.retry = Some(Box::new(pb::RetryPolicy { max_attempts: 1, ..Default::default() }));
    assert_eq!(sidecar.execute(req.clone()).await.outcome(), pb::Outcome::Succeeded);
    issuer.revoke_all();
    let resp = sidecar.execute(req.clone()).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let statuses: Vec<u32> = resp.attempts.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [401, 200], "the retry with the new token is recorded as its own attempt");
    assert_eq!(issuer.issued(), 2);
    let seen = api.seen();
    assert_ne!(seen[1].header("authorization"), seen[2].header("authorization"));

    // An upstream that rejects every token: refreshed once, then the 401 is the answer.
    let never = Upstream::fixed(401, "no").await;
    let resp = sidecar.execute(with_auth("GET", &never.url("/"), oauth2(&idp.url("/token")))).await;
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    assert_eq!(error_kind(&resp), pb::ErrorKind::UnexpectedStatus);
    assert_eq!(issuer.issued(), 3, "one refresh, no storm");
}

#[tokio::test]
async fn a_failing_token_endpoint_ends_the_action_as_auth_and_sends_nothing() {
    let idp = Upstream::start(|_| async {
        json(500, serde_json::json!({"error": "temporarily_unavailable", "error_description": CLIENT_SECRET}))
    })
    .await;
    let api = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let mut req = with_auth("GET", &api.url("/"), oauth2(&idp.url("/token")));
    req.timeouts =
        Some(Box::new(pb::Timeouts { total: Some(dur(Duration::from_secs(20))), ..Default::default() }));
    let resp = sidecar.execute(req).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Auth, "{resp:?}");
    let message = &resp.error.as_ref().unwrap().message;
    assert!(message.contains("500") && message.contains("temporarily_unavailable"), "{message}");
    assert!(!format!("{resp:?}").contains(CLIENT_SECRET), "the endpoint's body is never echoed");
    assert!(resp.attempts.is_empty() && api.hits() == 0, "nothing was sent upstream");
    assert_eq!(idp.hits(), 3, "the token request has its own retries");

    // A refused client (400/401) is not retried.
    let refusing =
        Upstream::start(|_| async { json(401, serde_json::json!({"error": "invalid_client"})) }).await;
    let resp = sidecar.execute(with_auth("GET", &api.url("/"), oauth2(&refusing.url("/token")))).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Auth);
    assert!(resp.error.unwrap().message.contains("invalid_client"));
    assert_eq!(refusing.hits(), 1);
}

#[tokio::test]
async fn a_token_endpoint_the_egress_policy_denies_is_denied_by_policy() {
    let issuer = Arc::new(Issuer::default());
    let idp = token_server(issuer.clone(), "127.0.0.2:0").await;
    let api = Upstream::fixed(200, "ok").await;
    let mut settings = test_settings();
    settings.egress.deny = vec!["127.0.0.2/32".parse().unwrap()];
    let sidecar = Sidecar::start_with(settings).await;
    let resp = sidecar.execute(with_auth("GET", &api.url("/"), oauth2(&idp.url("/token")))).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::DeniedByPolicy, "{resp:?}");
    assert_eq!((idp.hits(), api.hits()), (0, 0));
}

#[tokio::test]
async fn static_credentials_reach_their_origin_only() {
    let other = Upstream::fixed(200, "other origin").await;
    let target = other.url("/landing");
    let api = Upstream::start(move |seen| {
        let target = target.clone();
        async move {
            if seen.target.starts_with("/go") {
                let mut response = text(302, "");
                response.headers_mut().insert("location", target.parse().unwrap());
                response
            } else {
                text(200, "ok")
            }
        }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let kinds = [
        (
            pb::auth::Kind::Basic(pb::BasicAuth { username: "u".into(), password: "pa55".into() }),
            "authorization",
        ),
        (pb::auth::Kind::BearerToken("b3arer".into()), "authorization"),
        (
            pb::auth::Kind::ApiKey(pb::ApiKeyAuth {
                name: "X-Service-Key".into(),
                value: "k3y".into(),
                r#in: pb::api_key_auth::Location::Header as i32,
            }),
            "x-service-key",
        ),
    ];
    let expected = ["Basic dTpwYTU1", "Bearer b3arer", "k3y"];
    for ((kind, header), value) in kinds.into_iter().zip(expected) {
        let resp = sidecar.execute(with_auth("GET", &api.url("/go"), pb::Auth { kind: Some(kind) })).await;
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
        assert_eq!(api.seen().last().unwrap().header(header).as_deref(), Some(value));
        assert_eq!(other.seen().last().unwrap().header(header), None, "{header} crossed origins");
    }
    let query = pb::auth::Kind::ApiKey(pb::ApiKeyAuth {
        name: "api_key".into(),
        value: "q k".into(),
        r#in: pb::api_key_auth::Location::Query as i32,
    });
    let resp = sidecar.execute(with_auth("GET", &api.url("/go?x=1"), pb::Auth { kind: Some(query) })).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded);
    assert_eq!(api.seen().last().unwrap().target, "/go?x=1&api_key=q%20k");
    assert_eq!(other.seen().last().unwrap().target, "/landing");
}

#[tokio::test]
async fn profiles_carry_the_credential_and_unknown_or_malformed_ones_are_invalid_argument() {
    let api = Upstream::fixed(200, "ok").await;
    let profile = AuthProfile { auth: AuthInput::Bearer("pr0file-token".into()), refresh_on_status: vec![] };
    let broken = AuthProfile {
        auth: AuthInput::OAuth2(OAuth2Input {
            token_url: "http://127.0.0.1:1/token".into(),
            client_id: "c".into(),
            client_secret: "{{secret:missing}}".into(),
            ..Default::default()
        }),
        refresh_on_status: vec![],
    };
    let profiles =
        AuthProfiles::new(BTreeMap::from([("crm".to_owned(), profile), ("broken".to_owned(), broken)]))
            .unwrap();
    let sidecar = Sidecar::start_with(ExecSettings { auth_profiles: profiles, ..test_settings() }).await;
    let by_name = |name: &str| pb::Auth { kind: Some(pb::auth::Kind::Profile(name.into())) };
    let resp = sidecar.execute(with_auth("GET", &api.url("/"), by_name("crm"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded);
    assert_eq!(api.seen()[0].header("authorization").as_deref(), Some("Bearer pr0file-token"));

    let status = sidecar.try_execute(with_auth("GET", &api.url("/"), by_name("nope"))).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["auth.profile"]);
    let status = sidecar.try_execute(with_auth("GET", &api.url("/"), by_name("broken"))).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["auth.profile"]);
    assert!(status.message().contains("unknown secret \"missing\""), "{}", status.message());

    let mut req = with_auth("GET", &api.url("/"), oauth2("ftp://idp.test/token"));
    req.headers = vec![kv("Authorization", "Bearer mine")];
    let status = sidecar.try_execute(req).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["auth.oauth2_client_credentials.token_url", "headers[0].name"]);
    assert!(!status.message().contains(CLIENT_SECRET));
    let mut req = request("POST", &api.url("/"));
    req.signing = Some(Box::new(pb::Signing {
        scheme: Some(pb::signing::Scheme::StandardWebhooks(pb::StandardWebhooks {
            secret: "whsec_***".into(),
        })),
    }));
    assert_eq!(
        violated_fields(&sidecar.try_execute(req).await.unwrap_err()),
        ["signing.standard_webhooks.secret"]
    );
    assert_eq!(api.hits(), 1, "nothing sent for an invalid action");
}

/// A request of AWS's suite: `METHOD TARGET HTTP/1.1`, `Name:value` lines, a blank line, body.
fn suite_request(text: &str) -> http::Request<bytes::Bytes> {
    let (head, body) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let mut first = lines.next().unwrap().split(' ');
    let (method, target) = (first.next().unwrap(), first.next().unwrap());
    let mut builder = http::Request::builder().method(method);
    let mut host = String::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        if name.eq_ignore_ascii_case("host") {
            host = value.to_owned();
        }
        builder = builder.header(name, value);
    }
    builder.uri(format!("https://{host}{target}")).body(bytes::Bytes::from(body.to_owned())).unwrap()
}

#[test]
fn sigv4_signs_the_published_vectors() {
    use callout::client::credentials::sigv4::sign_with;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sigv4");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let case = entry.unwrap().path();
        if !case.is_dir() {
            continue;
        }
        let read = |name: &str| std::fs::read_to_string(case.join(name)).unwrap();
        let context: serde_json::Value = serde_json::from_str(&read("context.json")).unwrap();
        let creds = &context["credentials"];
        let credential = SigV4Credential {
            region: context["region"].as_str().unwrap().into(),
            service: context["service"].as_str().unwrap().into(),
            access_key_id: creds["access_key_id"].as_str().unwrap().into(),
            secret_access_key: creds["secret_access_key"].as_str().unwrap().into(),
            session_token: creds["token"].as_str().map(str::to_owned),
        };
        let mut settings = aws_sigv4::http_request::SigningSettings::default();
        if context["sign_body"].as_bool() == Some(true) {
            settings.payload_checksum_kind = aws_sigv4::http_request::PayloadChecksumKind::XAmzSha256;
        }
        let mut request = suite_request(&read("request.txt"));
        let time = httpdate::parse_http_date("Sun, 30 Aug 2015 12:36:00 GMT").unwrap();
        sign_with(&mut request, &credential, time, settings).unwrap();
        let expected = suite_request(&read("header-signed-request.txt"));
        assert_eq!(
            request.headers()["authorization"],
            expected.headers()["authorization"],
            "{}",
            case.display()
        );
        assert_eq!(request.headers()["x-amz-date"], "20150830T123600Z");
        checked += 1;
    }
    assert_eq!(checked, 5, "every vendored vector was checked");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), data.as_bytes()).as_ref().to_vec()
}

/// Verifies a SigV4 request as received, by the steps of AWS's documentation (written apart
/// from the signer): canonical request, string to sign, derived key, signature. Handles
/// paths and query values without characters to encode.
fn verify_sigv4(seen: &Seen, secret: &str) -> Result<(), String> {
    let auth = seen.header("authorization").ok_or("no authorization")?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 Credential=").ok_or("not SigV4")?;
    let mut parts = rest.split(", ");
    let scope = parts.next().ok_or("no credential")?;
    let signed = parts.next().and_then(|p| p.strip_prefix("SignedHeaders=")).ok_or("no signed headers")?;
    let signature = parts.next().and_then(|p| p.strip_prefix("Signature=")).ok_or("no signature")?;
    let (_, scope) = scope.split_once('/').ok_or("scope")?;
    let (path, query) = seen.target.split_once('?').unwrap_or((&seen.target, ""));
    let mut pairs: Vec<&str> = query.split('&').filter(|p| !p.is_empty()).collect();
    pairs.sort();
    let mut canonical_headers = String::new();
    for name in signed.split(';') {
        let value = seen.header(name).ok_or(format!("signed header {name} not received"))?;
        canonical_headers.push_str(&format!("{name}:{}\n", value.trim()));
    }
    let payload = hex(ring::digest::digest(&ring::digest::SHA256, &seen.body).as_ref());
    let canonical =
        format!("{}\n{path}\n{}\n{canonical_headers}\n{signed}\n{payload}", seen.method, pairs.join("&"));
    let date = seen.header("x-amz-date").ok_or("no x-amz-date")?;
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
        hex(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
    );
    let mut fields = scope.split('/');
    let mut key = format!("AWS4{secret}").into_bytes();
    for _ in 0..3 {
        key = hmac(&key, fields.next().ok_or("scope")?);
    }
    key = hmac(&key, "aws4_request");
    let expected = hex(&hmac(&key, &to_sign));
    if expected == signature {
        Ok(())
    } else {
        Err(format!("signature mismatch; canonical request:\n{canonical}"))
    }
}

#[tokio::test]
async fn sigv4_signs_the_request_as_sent_and_a_verifier_accepts_it() {
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    let verdicts: Arc<Mutex<Vec<Result<(), String>>>> = Arc::default();
    let recorded = verdicts.clone();
    let api = Upstream::start(move |seen| {
        let recorded = recorded.clone();
        async move {
            let verdict = verify_sigv4(&seen, SECRET);
            let ok = verdict.is_ok();
            recorded.lock().unwrap().push(verdict);
            if ok {
                text(200, "verified")
            } else {
                text(403, "bad signature")
            }
        }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let auth = pb::Auth {
        kind: Some(pb::auth::Kind::AwsSigv4(pb::AwsSigV4 {
            region: "eu-west-1".into(),
            service: "execute-api".into(),
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: SECRET.into(),
            session_token: "sess10n-t0ken".into(),
        })),
    };
    let mut req = with_auth("POST", &api.url("/v1/items"), auth);
    req.query = vec![kv("z", "1"), kv("a", "2")];
    req.headers = vec![kv("X-Tenant", "acme")];
    req.body = Some(pb::execute_http_action_request::Body::Json(r#"{"name":"box"}"#.into()));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?} {:?}", verdicts.lock().unwrap());
    let seen = &api.seen()[0];
    let auth = seen.header("authorization").unwrap();
    for signed in ["content-type", "host", "x-amz-date", "x-amz-security-token", "x-tenant"] {
        assert!(auth.contains(signed), "{signed} not signed: {auth}");
    }
    assert_eq!(seen.header("x-amz-security-token").as_deref(), Some("sess10n-t0ken"));
    assert!(!auth.contains("UNSIGNED-PAYLOAD"));
    // A request altered after signing fails the verifier: it checks what arrived.
    let mut altered = seen.clone();
    altered.body = bytes::Bytes::from_static(b"{}");
    assert!(verify_sigv4(&altered, SECRET).is_err());
}

#[tokio::test]
async fn standard_webhooks_sign_every_attempt() {
    let calls = Arc::new(AtomicU64::new(0));
    let api = Upstream::start(move |_| {
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                text(503, "again")
            } else {
                text(200, "ok")
            }
        }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let key = b"0123456789abcdef0123456789abcdef";
    let secret = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(key));
    let mut req = request("POST", &api.url("/hook"));
    req.action_id = "evt_2Nx1".into();
    req.body = Some(pb::execute_http_action_request::Body::Json(r#"{"type":"invoice.paid"}"#.into()));
    req.signing = Some(Box::new(pb::Signing {
        scheme: Some(pb::signing::Scheme::StandardWebhooks(pb::StandardWebhooks { secret: secret.clone() })),
    }));
    req.retry = Some(Box::new(fast_retry(2)));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.attempts.len(), 2, "{resp:?}");
    for seen in api.seen() {
        assert_eq!(seen.header("webhook-id").as_deref(), Some("evt_2Nx1"));
        let timestamp: u64 = seen.header("webhook-timestamp").unwrap().parse().unwrap();
        let expected = callout::client::signing::webhook_signature(key, "evt_2Nx1", timestamp, &seen.body);
        assert_eq!(seen.header("webhook-signature"), Some(expected));
    }
    assert!(!format!("{resp:?}").contains(&secret));
}

/// The real binary at trace level: every secret reaches its server and none reaches the logs.
#[tokio::test]
async fn trace_logs_hold_no_secret_or_token() {
    let issuer = Arc::new(Issuer::default());
    let idp = token_server(issuer.clone(), "127.0.0.1:0").await;
    let api = protected(issuer.clone()).await;
    let echo = Upstream::fixed(200, "ok").await;
    let serve = ServeProcess::spawn(&[], &[("RUST_LOG", "trace")]).await;
    let mut client = pb::http_action_service_client::HttpActionServiceClient::new(serve.channel().await);
    let oauth = with_auth("GET", &api.url("/"), oauth2(&idp.url("/token")));
    assert_eq!(client.execute(oauth.clone()).await.unwrap().into_inner().outcome(), pb::Outcome::Succeeded);
    issuer.revoke_all();
    assert_eq!(client.execute(oauth).await.unwrap().into_inner().attempts.len(), 2, "a refresh, logged");
    let secrets = ["pa55w0rd-x", "b3arer-x", "ap1key-x", "aws-s3cret-x", "sess-x", "whsec-key-x"];
    let kinds = [
        pb::auth::Kind::Basic(pb::BasicAuth { username: "u".into(), password: secrets[0].into() }),
        pb::auth::Kind::BearerToken(secrets[1].into()),
        pb::auth::Kind::ApiKey(pb::ApiKeyAuth { name: "k".into(), value: secrets[2].into(), r#in: 2 }),
        pb::auth::Kind::AwsSigv4(pb::AwsSigV4 {
            region: "us-east-1".into(),
            service: "s3".into(),
            access_key_id: "AKID".into(),
            secret_access_key: secrets[3].into(),
            session_token: secrets[4].into(),
        }),
    ];
    for kind in kinds {
        let mut req = with_auth("POST", &echo.url("/x"), pb::Auth { kind: Some(kind) });
        req.signing = Some(Box::new(pb::Signing {
            scheme: Some(pb::signing::Scheme::StandardWebhooks(pb::StandardWebhooks {
                secret: base64::engine::general_purpose::STANDARD.encode(secrets[5]),
            })),
        }));
        let resp = client.execute(req).await.unwrap().into_inner();
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let logs = serve.logs();
    assert!(logs.contains("TRACE"), "trace logs were captured:\n{logs}");
    let tokens: Vec<String> = (1..=issuer.issued()).map(|n| format!("tok-{n}-a1b2c3")).collect();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"));
    let whsec = base64::engine::general_purpose::STANDARD.encode(secrets[5]);
    let everything =
        secrets.iter().map(|s| s.to_string()).chain(tokens).chain([CLIENT_SECRET.into(), basic, whsec]);
    for secret in everything {
        assert!(!logs.contains(&secret), "{secret} in the trace logs");
    }
}

/// Profiles from the environment (`CALLOUT_AUTH__PROFILES__NAME__KEY`), and the OAuth2 series
/// by profile: at zero from the first scrape, then one fetch and a cache hit for two actions.
#[tokio::test]
async fn token_metrics_count_fetches_and_hits_by_profile() {
    let issuer = Arc::new(Issuer::default());
    let idp = token_server(issuer.clone(), "127.0.0.1:0").await;
    let api = protected(issuer.clone()).await;
    let token_url = idp.url("/token");
    let env = [
        ("CALLOUT_AUTH__PROFILES__BILLING__KIND", "oauth2_client_credentials"),
        ("CALLOUT_AUTH__PROFILES__BILLING__TOKEN_URL", token_url.as_str()),
        ("CALLOUT_AUTH__PROFILES__BILLING__CLIENT_ID", CLIENT_ID),
        ("CALLOUT_AUTH__PROFILES__BILLING__CLIENT_SECRET", CLIENT_SECRET),
    ];
    let serve = ServeProcess::spawn(&[], &env).await;
    let metrics = serve.metrics.clone().expect("metrics on");
    let before = http_get(&metrics, "/metrics").await;
    for series in [
        r#"callout_oauth2_token_fetches_total{profile="billing"} 0"#,
        r#"callout_oauth2_token_failures_total{profile="inline"} 0"#,
    ] {
        assert!(before.contains(series), "{series} missing:\n{before}");
    }
    let mut client = pb::http_action_service_client::HttpActionServiceClient::new(serve.channel().await);
    let by_profile = pb::Auth { kind: Some(pb::auth::Kind::Profile("billing".into())) };
    for _ in 0..2 {
        let resp =
            client.execute(with_auth("GET", &api.url("/"), by_profile.clone())).await.unwrap().into_inner();
        assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}\n{}", serve.logs());
    }
    let after = http_get(&metrics, "/metrics").await;
    for series in [
        r#"callout_oauth2_token_fetches_total{profile="billing"} 1"#,
        r#"callout_oauth2_token_cache_hits_total{profile="billing"} 1"#,
        r#"callout_oauth2_token_failures_total{profile="billing"} 0"#,
    ] {
        assert!(after.contains(series), "{series} missing:\n{after}");
    }
    assert!(!after.contains(CLIENT_SECRET) && !serve.logs().contains(CLIENT_SECRET));
}
