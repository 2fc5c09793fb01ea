//! Render: the request an action's first attempt would send, built by the attempt's own code
//! (`attempt::first_request`, the signing and credentials steps, the client's own headers),
//! shown redacted, with the egress verdict of a connection to it, the proxy it would go
//! through and the policy in effect. Nothing is sent, nothing dialled, no token fetched.
//!
//! Redaction: a sensitive header's whole value reads `[REDACTED]` (its auth scheme kept:
//! `Bearer [REDACTED]`); a `{{secret:NAME}}` value reads `[REDACTED:secret NAME]` wherever it
//! stands (URL, query, header, body); what auth and signing add reads `[REDACTED:WHAT]`.
use crate::{
    action::{
        is_sensitive_header, ActionError, Auth, ErrorKind, HttpAction, OnFailure, ProxyUrl, ReplyBody,
        RetryPolicy, Signing, DEFAULT_MAX_RESPONSE_BYTES,
    },
    attempt::first_request,
    client::{
        connect::{AddressVerdict, RoutePreview},
        credentials::apply_now,
        signing::standard_webhooks,
        Clients,
    },
};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue};
use std::time::{Duration, SystemTime};

/// The request, redacted, and what callout would do around it.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub action_id: String,
    pub method: String,
    /// The final URL, query and an API key in it included (redacted).
    pub url: String,
    /// In the order written on an HTTP/1.1 connection, repeats kept, values redacted.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Length of the body sent (before redaction).
    pub body_size: u64,
    pub body_redacted: bool,
    /// How credentials are applied (`Auth::kind`).
    pub auth: &'static str,
    pub signing: &'static str,
    pub route: RoutePreview,
    pub proxy: ProxyChoice,
    pub policy: Policy,
}

/// The proxy a connection would go through, and why.
#[derive(Debug, Clone, Default)]
pub struct ProxyChoice {
    /// `scheme://host:port`, never credentials; `None` for a direct connection.
    pub url: Option<String>,
    /// "action" or "server"; empty when none applies.
    pub source: &'static str,
    pub reason: String,
}

/// The policy in effect, defaults applied.
#[derive(Debug, Clone)]
pub struct Policy {
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
    pub total_timeout: Duration,
    /// "action", "server default" or "deadline".
    pub total_source: &'static str,
    pub retry: RetryPolicy,
    pub success_codes: String,
    pub follow_redirects: bool,
    pub max_redirects: u32,
    pub max_response_bytes: u64,
    pub reply_body: ReplyBody,
    pub success_condition: String,
    pub retry_condition: String,
    pub extract: Vec<(String, String)>,
    pub on_failure: OnFailure,
}

/// The total budget of an action and where it comes from (`Executor::total_budget`).
#[derive(Debug, Clone, Copy)]
pub struct Total {
    pub budget: Duration,
    pub source: &'static str,
}

/// Renders `action` as its first attempt would send it, through `clients` (the attempt's).
/// `sensitive` are the server's sensitive header names besides the built-in ones. A request
/// the attempt could not build is the error it would fail with.
pub async fn render(
    action: &HttpAction,
    clients: &Clients,
    sensitive: &[HeaderName],
    total: Total,
) -> Result<Rendered, ActionError> {
    let failed = |kind, message: String| ActionError::new(kind, message);
    let mut request = first_request(action).map_err(|e| failed(e.kind, e.message))?;
    let now = SystemTime::now();
    // Above the credentials, as in the attempt stack: signing, then credentials.
    // Header → what stands for its value; set by signing and auth.
    let mut markers: Vec<(HeaderName, String)> = Vec::new();
    if let Signing::StandardWebhooks { key } = action.signing() {
        let secs = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
        standard_webhooks(&mut request, key, action.id(), secs)
            .map_err(|e| failed(ErrorKind::InvalidRequest, e.to_string()))?;
        markers.push((HeaderName::from_static("webhook-signature"), redacted("standard webhooks signature")));
    }
    apply_now(action.auth(), &mut request, now).map_err(|e| failed(e.kind, e.message))?;
    let mut api_key_pair = None;
    match action.auth() {
        Auth::OAuth2(credential) => {
            // The token is not fetched: the header says where it would come from.
            let from = match &credential.profile {
                Some(profile) => format!("profile {profile}, "),
                None => String::new(),
            };
            let endpoint = credential.token_url.as_str().split('?').next().unwrap_or_default();
            let what = redacted(&format!("oauth2 token from {from}token endpoint {endpoint}"));
            let value = HeaderValue::from_str(&format!("Bearer {what}"))
                .unwrap_or(HeaderValue::from_static("Bearer [REDACTED:oauth2 token]"));
            if let Ok(entry) = request.headers_mut().try_entry(header::AUTHORIZATION) {
                entry.or_insert(value.clone());
            }
            markers.push((header::AUTHORIZATION, format!("Bearer {what}")));
        }
        Auth::Header { name, .. } => markers.push((name.clone(), String::new())),
        Auth::AwsSigV4(_) => {
            markers.push((header::AUTHORIZATION, String::new()));
            markers.push((HeaderName::from_static("x-amz-security-token"), String::new()));
        }
        Auth::Query { pair } => api_key_pair = Some(pair.clone()),
        Auth::None => {}
    }
    let client = clients.for_action(action).map_err(|e| failed(e.kind, e.message))?;
    let request = client.wire_headers(request);

    let secrets = action.secret_values();
    let mut url = request.uri().to_string();
    if let Some(pair) = &api_key_pair {
        if let Some((name, _)) = pair.split_once('=') {
            url = url.replace(pair.as_str(), &format!("{name}={}", redacted("api key")));
        }
    }
    let url = secrets.redact_str(&url).into_owned();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            let shown = match markers.iter().find(|(n, _)| n == name) {
                Some((_, marker)) if !marker.is_empty() => secrets.redact_str(marker).into_owned(),
                Some(_) => whole_value_redacted(value),
                None if is_sensitive_header(name) || sensitive.contains(name) => whole_value_redacted(value),
                // Sensitive only because a secret filled it: the secret's span is redacted.
                None if value.is_sensitive() => {
                    let text = String::from_utf8_lossy(value.as_bytes());
                    match secrets.redact_str(&text) {
                        std::borrow::Cow::Owned(shown) => shown,
                        std::borrow::Cow::Borrowed(_) => whole_value_redacted(value),
                    }
                }
                None => secrets.redact_str(&String::from_utf8_lossy(value.as_bytes())).into_owned(),
            };
            (name.as_str().to_owned(), shown)
        })
        .collect();
    let body_size = request.body().len() as u64;
    let (body, body_redacted) = match secrets.redact_bytes(request.body()) {
        std::borrow::Cow::Borrowed(_) => (request.body().clone(), false),
        std::borrow::Cow::Owned(shown) => (Bytes::from(shown), true),
    };

    // The connection: resolved within the connect timeout, as a dial would be.
    let connect_timeout = action.timeouts().connect;
    let mut route = match tokio::time::timeout(connect_timeout, client.preview(request.uri())).await {
        Ok(route) => route,
        Err(_) => RoutePreview {
            resolve_error: Some(format!(
                "resolving took longer than the connect timeout of {}",
                humantime::format_duration(connect_timeout)
            )),
            ..RoutePreview::default()
        },
    };
    redact_route(&mut route, secrets);
    let https = request.uri().scheme_str() == Some("https");
    let proxy = proxy_choice(&route, client.proxies().configured_for(https), https);

    Ok(Rendered {
        action_id: action.id().to_owned(),
        method: action.method().to_string(),
        url,
        headers,
        body,
        body_size,
        body_redacted,
        auth: action.auth().kind(),
        signing: action.signing().kind(),
        route,
        proxy,
        policy: policy(action, total),
    })
}

fn redacted(what: &str) -> String {
    format!("[REDACTED:{what}]")
}

/// `[REDACTED]`, after the value's auth scheme when it starts with one (`Bearer [REDACTED]`).
fn whole_value_redacted(value: &HeaderValue) -> String {
    let text = String::from_utf8_lossy(value.as_bytes());
    match text.split_once(' ') {
        Some((scheme, _))
            if ["basic", "bearer", "aws4-hmac-sha256", "digest", "token"]
                .contains(&scheme.to_ascii_lowercase().as_str()) =>
        {
            format!("{scheme} [REDACTED]")
        }
        _ => "[REDACTED]".to_owned(),
    }
}

/// A secret may stand in the host (and so in every message naming it).
fn redact_route(route: &mut RoutePreview, secrets: &crate::action::redact::SecretValues) {
    if secrets.is_empty() {
        return;
    }
    let redact = |text: &mut String| *text = secrets.redact_str(text).into_owned();
    redact(&mut route.target);
    redact(&mut route.dialled);
    for text in [&mut route.denied, &mut route.resolve_error].into_iter().flatten() {
        redact(text);
    }
    for (_, verdict) in &mut route.addresses {
        if let AddressVerdict::Denied(rule) = verdict {
            redact(rule);
        }
    }
}

fn proxy_choice(route: &RoutePreview, configured: Option<&ProxyUrl>, https: bool) -> ProxyChoice {
    let targets = if https { "https" } else { "http" };
    match (&route.proxy, configured) {
        (Some(proxy), _) if route.caller_proxy => ProxyChoice {
            url: Some(proxy.to_string()),
            source: "action",
            reason: "the action's proxy.url (replaces the server's proxies and NO_PROXY)".into(),
        },
        (Some(proxy), _) => ProxyChoice {
            url: Some(proxy.to_string()),
            source: "server",
            reason: format!("the server's proxy for {targets} targets"),
        },
        (None, Some(_)) => ProxyChoice {
            url: None,
            source: "",
            reason: format!("NO_PROXY exempts the host from the server's proxy for {targets} targets"),
        },
        (None, None) => {
            ProxyChoice { url: None, source: "", reason: format!("no proxy is set for {targets} targets") }
        }
    }
}

fn policy(action: &HttpAction, total: Total) -> Policy {
    let timeouts = action.timeouts();
    let redirects = action.redirects();
    Policy {
        connect_timeout: timeouts.connect,
        attempt_timeout: timeouts.attempt,
        total_timeout: total.budget,
        total_source: total.source,
        retry: action.retry().clone(),
        success_codes: action.success().as_str().to_owned(),
        follow_redirects: redirects.follow,
        max_redirects: redirects.max_hops,
        max_response_bytes: action.max_response_bytes().unwrap_or(DEFAULT_MAX_RESPONSE_BYTES),
        reply_body: action.reply_body(),
        success_condition: action.success_condition().map(|c| c.source().to_owned()).unwrap_or_default(),
        retry_condition: action.retry_condition().map(|c| c.source().to_owned()).unwrap_or_default(),
        extract: action.extract().paths().map(|(name, path)| (name.to_owned(), path)).collect(),
        on_failure: action.on_failure(),
    }
}
