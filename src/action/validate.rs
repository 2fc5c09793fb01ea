//! Turns an `ActionInput` into an `HttpAction`, naming the field of every problem. Nothing is
//! sent for an action that does not pass.
use super::{
    auth::{self, Auth, AuthInput, Signing},
    excerpt::excerpt,
    retry, secret_ref, transport, ActionInput, BodyInput, ClientIdentity, ErrorMessages, HttpAction,
    ProxyUrl, RedirectPolicy, RetryPolicy, StatusSpec, Timeouts, TlsOptions, ValidationContext,
    DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_REDIRECTS,
};
use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::{fmt, time::Duration};

/// One problem with one field, as google.rpc.BadRequest reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. `headers[2].value` or `timeouts.connect`.
    pub field: String,
    pub description: String,
}

/// Every problem found in an action.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InvalidAction {
    pub violations: Vec<FieldViolation>,
}

impl InvalidAction {
    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push(FieldViolation { field: field.into(), description: description.into() });
    }

    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for InvalidAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid action: ")?;
        for (i, v) in self.violations.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidAction {}

/// Unreserved characters (RFC 3986) stay; everything else in a query name or value is encoded.
const QUERY_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');
const MAX_ACTION_ID_LEN: usize = 128;
const MAX_ATTEMPTS_LIMIT: u32 = 10_000;
const MAX_REDIRECTS_LIMIT: u32 = 50;
/// Headers whose framing callout owns: a caller's value would break or smuggle the request.
const MANAGED_HEADERS: [&str; 7] =
    ["content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "proxy-connection"];
const IDEMPOTENCY_HEADERS: [&str; 2] = ["idempotency-key", "x-idempotency-key"];
/// Most headers an action may set. Far above what any API needs, and far below the 24,576
/// entries at which `http::HeaderMap` refuses to grow (it would panic).
pub const MAX_HEADERS: usize = 1_000;
/// Most bytes of header names and values together: servers refuse far less (8 to 64 KiB).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most query parameters an action may add.
pub const MAX_QUERY_PARAMS: usize = 1_000;
/// Most form fields in a `form` body.
pub const MAX_FORM_FIELDS: usize = 10_000;
/// Most `error_messages` entries: every status (100-599) and class fits.
pub const MAX_ERROR_MESSAGES: usize = 1_000;
/// Most `retry.retry_on_errors` entries: there are a dozen kinds.
pub const MAX_RETRY_ON_ERRORS: usize = 64;
/// Longest status spec (`success_codes`, `retry.retry_on_status`), bytes.
pub const MAX_STATUS_SPEC_LEN: usize = 1_024;
/// Longest excerpt of a caller's value quoted in a violation, in bytes.
const EXCERPT: usize = 64;

pub(super) fn validate(
    mut input: ActionInput,
    context: &ValidationContext<'_>,
) -> Result<HttpAction, InvalidAction> {
    let mut bad = InvalidAction::default();
    // The profile in the action's place, so its secret references are filled with the rest.
    let profile = auth::use_profile(&mut input.auth, context.auth_profiles, &mut bad);
    // Secrets first, so every check below sees the values that will be sent.
    let before = bad.violations.len();
    let filled = secret_ref::resolve(&mut input, context.secrets, &mut bad);
    // Variables after secrets: a variable's value is never read as a secret reference.
    super::vars::render(&mut input, &mut bad);
    if let Some((name, _)) = &profile {
        // The caller wrote only the profile's name: a secret its profile lacks is named so.
        for v in bad.violations[before..].iter_mut().filter(|v| v.field.starts_with("auth.")) {
            v.description = format!("profile {name:?}: {}: {}", &v.field["auth.".len()..], v.description);
            v.field = "auth.profile".into();
        }
    }
    let header_names = headers_named(&input.headers);
    let (auth, signing) = credentials(&mut input, profile, &header_names, &mut bad);

    let id = action_id(&input.action_id, &mut bad);
    let method = method(&input.method, &mut bad);
    let url = url(&input.url, &input.query, &mut bad);
    let mut headers = headers(&input.headers, &filled.headers, &mut bad);
    mark_sensitive(&mut headers, context.sensitive_headers);
    let (tls, proxy) = transport_options(&input, &mut bad);
    let (body, default_type) = body(input.body, &mut bad);
    content_type(&input.content_type, default_type, &mut headers, &mut bad);
    let timeouts = timeouts(&input.timeouts, &mut bad);
    let success = status_spec("success_codes", &input.success_codes, "2xx", &mut bad);
    let error_messages = error_messages(input.error_messages, &mut bad);
    let redirects = redirects(&input.redirects, &mut bad);
    let retry = retry_policy(&input.retry, method.as_ref(), &headers, &mut bad);
    let extract = super::extract::parse(std::mem::take(&mut input.extract), &mut bad);
    let success_condition =
        super::condition::Condition::compile("success_condition", &input.success_condition, &mut bad);
    let retry_condition =
        super::condition::Condition::compile("retry_condition", &input.retry_condition, &mut bad);
    if input.max_response_bytes > u64::MAX / 2 {
        bad.push("max_response_bytes", "is too large");
    }
    let tenant = tenant(&input.tenant, &mut bad);
    let async_poll = super::poll::validate(&input.async_poll, timeouts.total, &mut bad);
    let paginate = super::paginate::parse(input.paginate.take(), &mut bad);

    // Credentials in the URL become Basic authorization, as curl and browsers do, and leave the
    // URL so it can be logged.
    let url = url.map(|mut url| {
        if !url.username().is_empty() || url.password().is_some() {
            if !headers.contains_key(header::AUTHORIZATION) && auth.is_none() {
                let user = percent_decode(url.username());
                let pass = url.password().map(percent_decode).unwrap_or_default();
                let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                if let Ok(mut value) = HeaderValue::from_str(&format!("Basic {token}")) {
                    value.set_sensitive(true);
                    headers.insert(header::AUTHORIZATION, value);
                }
            }
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        url
    });

    match (method, url, success, retry) {
        (Some(method), Some(url), Some(success), Some(retry)) if bad.is_empty() => Ok(HttpAction {
            id,
            method,
            url,
            headers,
            body,
            timeouts,
            success,
            on_failure: input.on_failure,
            retry,
            redirects,
            max_response_bytes: (input.max_response_bytes > 0).then_some(input.max_response_bytes),
            trace: input.trace,
            tenant,
            reply_body: input.reply_body,
            extract,
            signing,
            uncommon: super::Uncommon {
                error_messages,
                tls,
                proxy,
                auth,
                success_condition,
                retry_condition,
                async_poll,
                paginate,
            }
            .boxed(),
            polls_inline: true,
            is_poll: false,
            secret_values: super::redact::SecretValues::new(filled.values),
        }),
        _ => Err(bad),
    }
}

/// The action's credentials and signing. A violation inside a profile names `auth.profile`
/// (the caller wrote only its name), and a header the credentials set must not be set by the
/// action too.
fn credentials(
    input: &mut ActionInput,
    profile: Option<(String, Vec<u16>)>,
    header_names: &[Option<HeaderName>],
    bad: &mut InvalidAction,
) -> (Auth, Signing) {
    let auth_input = std::mem::take(&mut input.auth);
    let kind = auth_input.kind();
    // The header the credential will set, from what was written (so a conflict is reported
    // beside any problem with the credential itself).
    let conflict = match &auth_input {
        AuthInput::Basic { .. } | AuthInput::Bearer(_) | AuthInput::OAuth2(_) | AuthInput::AwsSigV4(_) => {
            Some(header::AUTHORIZATION)
        }
        AuthInput::ApiKey { name, in_query: false, .. } => HeaderName::from_bytes(name.as_bytes()).ok(),
        AuthInput::ApiKey { .. } | AuthInput::None | AuthInput::Profile(_) => None,
    };
    let (name, refresh) = profile.unzip();
    let mut found = InvalidAction::default();
    let auth = auth::validate(auth_input, name.clone(), refresh.as_deref().unwrap_or_default(), &mut found);
    for v in found.violations {
        match &name {
            Some(name) => {
                bad.push("auth.profile", format!("profile {name:?} ({kind}): {}: {}", v.field, v.description))
            }
            None => bad.violations.push(v),
        }
    }
    if let Some(conflict) = conflict {
        for (i, name) in header_names.iter().enumerate() {
            if name.as_ref() == Some(&conflict) {
                bad.push(
                    format!("headers[{i}].name"),
                    format!("{conflict} is set by auth; set one or the other"),
                );
            }
        }
    }
    let signing = auth::signing(std::mem::take(&mut input.signing), bad);
    (auth, signing)
}

fn headers_named(pairs: &[(String, String)]) -> Vec<Option<HeaderName>> {
    pairs.iter().map(|(name, _)| HeaderName::from_bytes(name.as_bytes()).ok()).collect()
}

/// Marks the values of headers named in `names` sensitive (kept out of logs and HTTP/2 header
/// compression tables), besides the built-in ones.
fn mark_sensitive(headers: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        if let header::Entry::Occupied(mut entry) = headers.entry(name) {
            for value in entry.iter_mut() {
                value.set_sensitive(true);
            }
        }
    }
}

/// Whether `id` is a caller's action_id validation keeps as it is (not empty, not too long, no
/// control characters); the batch stream answers an action under it even when the rest fails.
pub fn is_valid_action_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ACTION_ID_LEN && !id.chars().any(char::is_control)
}

fn action_id(id: &str, bad: &mut InvalidAction) -> String {
    if id.is_empty() {
        return uuid::Uuid::new_v4().to_string();
    }
    if id.len() > MAX_ACTION_ID_LEN {
        bad.push("action_id", format!("is longer than {MAX_ACTION_ID_LEN} bytes"));
    } else if id.chars().any(char::is_control) {
        bad.push("action_id", "contains control characters");
    }
    id.to_owned()
}

/// The tenant, when one is named; a bad name is reported without echoing more than an excerpt.
fn tenant(name: &str, bad: &mut InvalidAction) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    if let Some(problem) = super::tenant_name_problem(name) {
        bad.push("tenant", format!("{:?} {problem}", excerpt(name, EXCERPT)));
        return None;
    }
    Some(name.to_owned())
}

fn method(method: &str, bad: &mut InvalidAction) -> Option<Method> {
    let method = match method.to_ascii_uppercase().as_str() {
        "GET" => Method::GET,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        "HEAD" => Method::HEAD,
        "OPTIONS" => Method::OPTIONS,
        "" => {
            bad.push("method", "is required (GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS)");
            return None;
        }
        _ => {
            bad.push("method", "must be GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS");
            return None;
        }
    };
    Some(method)
}

fn url(raw: &str, query: &[(String, String)], bad: &mut InvalidAction) -> Option<url::Url> {
    if raw.trim().is_empty() {
        bad.push("url", "is required (an absolute http or https URL)");
        return None;
    }
    if !transport::authority_written(raw) {
        bad.push("url", "has no host: write it after \"//\", as in http://HOST/path");
        return None;
    }
    // The parse error names the problem; the URL itself is not echoed, it may hold credentials.
    let mut url = match url::Url::parse(raw) {
        Ok(url) => url,
        Err(e) => {
            bad.push("url", format!("is not an absolute URL: {e}"));
            return None;
        }
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        let scheme = excerpt(url.scheme(), EXCERPT);
        bad.push("url", format!("scheme {scheme:?} is not allowed; use http or https"));
        return None;
    }
    if url.host_str().is_none_or(str::is_empty) {
        bad.push("url", "has no host");
        return None;
    }
    url.set_fragment(None);
    if query.len() > MAX_QUERY_PARAMS {
        bad.push("query", format!("has {} entries; at most {MAX_QUERY_PARAMS} are allowed", query.len()));
        return None;
    }
    let mut ok = true;
    for (i, (name, _)) in query.iter().enumerate() {
        if name.is_empty() {
            bad.push(format!("query[{i}].name"), "is empty");
            ok = false;
        }
    }
    if !ok {
        return None;
    }
    if !query.is_empty() {
        let mut q = url.query().unwrap_or_default().to_owned();
        for (name, value) in query {
            if !q.is_empty() {
                q.push('&');
            }
            q.extend(utf8_percent_encode(name, QUERY_COMPONENT));
            q.push('=');
            q.extend(utf8_percent_encode(value, QUERY_COMPONENT));
        }
        url.set_query(Some(&q));
    }
    // hyper takes an http::Uri: make sure this URL converts before anything is sent.
    if url.as_str().parse::<http::Uri>().is_err() {
        bad.push("url", "cannot be sent as an HTTP request target");
        return None;
    }
    Some(url)
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn headers(pairs: &[(String, String)], secret_headers: &[usize], bad: &mut InvalidAction) -> HeaderMap {
    // Counted before anything is built: the map's capacity comes from the caller.
    if pairs.len() > MAX_HEADERS {
        bad.push("headers", format!("has {} entries; at most {MAX_HEADERS} are allowed", pairs.len()));
        return HeaderMap::new();
    }
    let bytes: usize = pairs.iter().map(|(name, value)| name.len() + value.len()).sum();
    if bytes > MAX_HEADER_BYTES {
        bad.push(
            "headers",
            format!("names and values take {bytes} bytes; at most {MAX_HEADER_BYTES} are allowed"),
        );
        return HeaderMap::new();
    }
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (i, (name, value)) in pairs.iter().enumerate() {
        let name = match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => name,
            Err(_) => {
                let why = if name.is_empty() { "is empty" } else { "is not a valid HTTP header name" };
                bad.push(format!("headers[{i}].name"), why);
                continue;
            }
        };
        if MANAGED_HEADERS.contains(&name.as_str()) {
            bad.push(format!("headers[{i}].name"), format!("{name} is managed by callout and cannot be set"));
            continue;
        }
        // The value is never echoed: it may be a token.
        let Ok(mut value) = HeaderValue::from_str(value) else {
            bad.push(
                format!("headers[{i}].value"),
                format!("value of {name} contains CR, LF or other bytes not allowed in a header"),
            );
            continue;
        };
        if is_sensitive(&name) || secret_headers.contains(&i) {
            value.set_sensitive(true);
        }
        map.append(name, value);
    }
    map
}

/// Headers whose values are secrets: kept out of logs and HTTP/2 header compression tables.
pub fn is_sensitive(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie" | "x-api-key" | "api-key"
    )
}

fn body(body: BodyInput, bad: &mut InvalidAction) -> (Bytes, Option<&'static str>) {
    match body {
        BodyInput::None => (Bytes::new(), None),
        BodyInput::Json(text) => {
            if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
                bad.push("json", format!("is not valid JSON: {e}"));
            }
            (Bytes::from(text), Some("application/json"))
        }
        BodyInput::Form(fields) if fields.len() > MAX_FORM_FIELDS => {
            bad.push(
                "form.fields",
                format!("has {} entries; at most {MAX_FORM_FIELDS} are allowed", fields.len()),
            );
            (Bytes::new(), None)
        }
        BodyInput::Form(fields) => {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (i, (name, value)) in fields.iter().enumerate() {
                if name.is_empty() {
                    bad.push(format!("form.fields[{i}].name"), "is empty");
                }
                form.append_pair(name, value);
            }
            (Bytes::from(form.finish()), Some("application/x-www-form-urlencoded"))
        }
        BodyInput::Text(text) => (Bytes::from(text), None),
        BodyInput::Raw(bytes) => (bytes, None),
    }
}

fn content_type(
    explicit: &str,
    default: Option<&'static str>,
    headers: &mut HeaderMap,
    bad: &mut InvalidAction,
) {
    if headers.contains_key(header::CONTENT_TYPE) {
        return; // an explicit header always wins
    }
    let value = if explicit.is_empty() {
        default.map(HeaderValue::from_static)
    } else {
        match HeaderValue::from_str(explicit) {
            Ok(v) => Some(v),
            Err(_) => {
                bad.push("content_type", "contains CR, LF or other bytes not allowed in a header");
                None
            }
        }
    };
    if let Some(value) = value {
        headers.insert(header::CONTENT_TYPE, value);
    }
}

/// Longest timeout or backoff an action may ask for: long horizons (a day of retrying 429s)
/// fit, while deadlines stay far from the clock's overflow.
const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

fn positive(field: &str, value: Option<Duration>, default: Duration, bad: &mut InvalidAction) -> Duration {
    match value {
        Some(d) if d.is_zero() => {
            bad.push(field, "must be positive");
            default
        }
        Some(d) if d > MAX_DURATION => {
            bad.push(field, "must be at most 30 days");
            default
        }
        Some(d) => d,
        None => default,
    }
}

fn timeouts(t: &super::TimeoutsInput, bad: &mut InvalidAction) -> Timeouts {
    let connect = positive("timeouts.connect", t.connect, DEFAULT_CONNECT_TIMEOUT, bad);
    let attempt = positive("timeouts.attempt", t.attempt, DEFAULT_ATTEMPT_TIMEOUT, bad);
    let total = t.total.map(|d| positive("timeouts.total", Some(d), d, bad));
    Timeouts { connect, attempt, total }
}

fn status_spec(field: &str, text: &str, default: &str, bad: &mut InvalidAction) -> Option<StatusSpec> {
    if text.len() > MAX_STATUS_SPEC_LEN {
        bad.push(field, format!("is {} bytes long; at most {MAX_STATUS_SPEC_LEN} are allowed", text.len()));
        return None;
    }
    let text = if text.trim().is_empty() { default } else { text };
    match StatusSpec::parse(text) {
        Ok(spec) => Some(spec),
        Err(e) => {
            bad.push(field, format!("{e}; write codes, classes and ranges like \"200-299,304\""));
            None
        }
    }
}

fn error_messages(pairs: Vec<(String, String)>, bad: &mut InvalidAction) -> ErrorMessages {
    let mut messages = ErrorMessages::default();
    if pairs.len() > MAX_ERROR_MESSAGES {
        bad.push(
            "error_messages",
            format!("has {} entries; at most {MAX_ERROR_MESSAGES} are allowed", pairs.len()),
        );
        return messages;
    }
    for (key, message) in pairs {
        let trimmed = key.trim();
        if let Some(class) = super::status::parse_class(trimmed) {
            messages.by_class.insert(class, message);
        } else if let Some(status) = super::status::parse_status(trimmed) {
            messages.by_status.insert(status, message);
        } else {
            let key = excerpt(&key, EXCERPT);
            bad.push(format!("error_messages[{key:?}]"), "key must be a status (404) or a class (4xx, 5xx)");
        }
    }
    messages
}

fn redirects(r: &super::RedirectsInput, bad: &mut InvalidAction) -> RedirectPolicy {
    if r.max_hops > MAX_REDIRECTS_LIMIT {
        bad.push("redirects.max_hops", format!("must be at most {MAX_REDIRECTS_LIMIT}"));
    }
    let max_hops = if r.max_hops == 0 { DEFAULT_MAX_REDIRECTS } else { r.max_hops };
    RedirectPolicy { follow: r.follow.unwrap_or(true), max_hops }
}

fn retry_policy(
    r: &super::RetryInput,
    method: Option<&Method>,
    headers: &HeaderMap,
    bad: &mut InvalidAction,
) -> Option<RetryPolicy> {
    if r.max_attempts > MAX_ATTEMPTS_LIMIT {
        bad.push("retry.max_attempts", format!("must be at most {MAX_ATTEMPTS_LIMIT}"));
    }
    let initial = positive("retry.initial_backoff", r.initial_backoff, retry::DEFAULT_INITIAL_BACKOFF, bad);
    let max = positive("retry.max_backoff", r.max_backoff, retry::DEFAULT_MAX_BACKOFF.max(initial), bad);
    if max < initial {
        bad.push("retry.max_backoff", "must not be shorter than retry.initial_backoff");
    }
    let multiplier = if r.multiplier == 0.0 { retry::DEFAULT_MULTIPLIER } else { r.multiplier };
    if !multiplier.is_finite() || multiplier < 1.0 {
        bad.push("retry.multiplier", "must be at least 1");
    }
    let mut retry_on_errors = if r.retry_on_errors.is_empty() {
        retry::DEFAULT_RETRY_ON_ERRORS.to_vec()
    } else {
        r.retry_on_errors.clone()
    };
    retry_on_errors.dedup();
    let retry_on_status =
        status_spec("retry.retry_on_status", &r.retry_on_status, retry::DEFAULT_RETRY_ON_STATUS, bad)?;
    let idempotent = method.is_some_and(|m| !matches!(*m, Method::POST | Method::PATCH));
    let keyed = IDEMPOTENCY_HEADERS.iter().any(|h| headers.contains_key(*h));
    Some(RetryPolicy {
        max_attempts: match r.max_attempts {
            0 if r.unbounded_by_default => u32::MAX,
            0 => retry::DEFAULT_MAX_ATTEMPTS,
            n => n,
        },
        initial_backoff: initial,
        max_backoff: max,
        multiplier,
        jitter: r.jitter.unwrap_or(true),
        retry_on_status,
        retry_on_errors,
        honor_retry_after: r.honor_retry_after.unwrap_or(true),
        may_repeat: idempotent || keyed || r.retry_non_idempotent,
    })
}

/// The TLS options and proxy of the action. PEM is parsed here so a bad field is refused
/// before anything is sent; problems are described without quoting PEM or the proxy URL.
fn transport_options(input: &ActionInput, bad: &mut InvalidAction) -> (TlsOptions, Option<ProxyUrl>) {
    let tls = &input.tls;
    let ca_pem = (!tls.ca_pem.trim().is_empty()).then(|| tls.ca_pem.clone());
    if let Some(Err(e)) = ca_pem.as_deref().map(transport::check_ca_certificates) {
        bad.push("tls.ca_pem", e);
    }
    let (cert, key) = (tls.client_cert_pem.trim(), tls.client_key_pem.trim());
    let client_identity = match (cert.is_empty(), key.is_empty()) {
        (true, true) => None,
        (false, true) => {
            bad.push("tls.client_key_pem", "is required with tls.client_cert_pem");
            None
        }
        (true, false) => {
            bad.push("tls.client_cert_pem", "is required with tls.client_key_pem");
            None
        }
        (false, false) => {
            if let Err((field, e)) = transport::check_client_identity(cert, key) {
                bad.push(field, e);
            }
            Some(ClientIdentity {
                cert_pem: tls.client_cert_pem.clone(),
                key_pem: tls.client_key_pem.clone(),
            })
        }
    };
    let proxy = if input.proxy_url.trim().is_empty() {
        None
    } else {
        ProxyUrl::parse(&input.proxy_url).map_err(|e| bad.push("proxy.url", e)).ok()
    };
    let options = TlsOptions { insecure_skip_verify: tls.insecure_skip_verify, ca_pem, client_identity };
    (options, proxy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::{ActionInput, BodyInput, TimeoutsInput};

    fn input(method: &str, url: &str) -> ActionInput {
        ActionInput { method: method.into(), url: url.into(), ..Default::default() }
    }

    fn fields(err: InvalidAction) -> Vec<String> {
        err.violations.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn minimal_action_takes_defaults() {
        let a = HttpAction::from_input(input("get", "http://example.test/a#frag")).unwrap();
        assert_eq!(a.method, Method::GET);
        assert_eq!(a.url.as_str(), "http://example.test/a");
        assert_eq!(a.timeouts.connect, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(a.timeouts.attempt, DEFAULT_ATTEMPT_TIMEOUT);
        assert!(a.success.contains(204) && !a.success.contains(301));
        assert_eq!(a.retry.max_attempts, 3);
        assert!(a.retry.may_repeat);
        assert!(a.redirects.follow);
        assert_eq!(a.id.len(), 36);
        assert_eq!(a.destination(), "example.test:80");
    }

    #[test]
    fn a_tenant_is_a_short_plain_name_or_none() {
        assert_eq!(HttpAction::from_input(input("GET", "http://h.test/")).unwrap().tenant(), None);
        let mut i = input("GET", "http://h.test/");
        i.tenant = "acme-eu.2".into();
        assert_eq!(HttpAction::from_input(i).unwrap().tenant(), Some("acme-eu.2"));
        for bad in ["a b", "a/b", &"t".repeat(65)] {
            let mut i = input("GET", "http://h.test/");
            i.tenant = bad.into();
            assert_eq!(fields(HttpAction::from_input(i).unwrap_err()), ["tenant"], "{bad:?}");
        }
    }

    #[test]
    fn query_is_appended_encoded_in_order() {
        let mut i = input("GET", "http://h.test/p?a=1");
        i.query = vec![("q".into(), "a b&c".into()), ("ü".into(), "~x/y".into()), ("q".into(), "2".into())];
        let a = HttpAction::from_input(i).unwrap();
        assert_eq!(a.url.query(), Some("a=1&q=a%20b%26c&%C3%BC=~x%2Fy&q=2"));
    }

    #[test]
    fn url_credentials_become_basic_auth_and_leave_the_url() {
        let a = HttpAction::from_input(input("GET", "https://us%20er:p%40ss@h.test/")).unwrap();
        assert_eq!(a.url.as_str(), "https://h.test/");
        assert_eq!(a.headers[header::AUTHORIZATION], "Basic dXMgZXI6cEBzcw==");
        assert!(a.headers[header::AUTHORIZATION].is_sensitive());
    }

    #[test]
    fn content_type_rules() {
        let mut i = input("POST", "http://h.test/");
        i.body = BodyInput::Json("{\"a\":1}".into());
        let a = HttpAction::from_input(i.clone()).unwrap();
        assert_eq!(a.headers[header::CONTENT_TYPE], "application/json");
        i.content_type = "application/vnd.api+json".into();
        assert_eq!(
            HttpAction::from_input(i.clone()).unwrap().headers[header::CONTENT_TYPE],
            "application/vnd.api+json"
        );
        i.headers = vec![("Content-Type".into(), "text/x-explicit".into())];
        assert_eq!(HttpAction::from_input(i).unwrap().headers[header::CONTENT_TYPE], "text/x-explicit");

        let mut i = input("POST", "http://h.test/");
        i.body = BodyInput::Form(vec![("a b".into(), "1&2".into()), ("c".into(), "é".into())]);
        let a = HttpAction::from_input(i).unwrap();
        assert_eq!(a.body, "a+b=1%262&c=%C3%A9");
        assert_eq!(a.headers[header::CONTENT_TYPE], "application/x-www-form-urlencoded");

        let mut i = input("POST", "http://h.test/");
        i.body = BodyInput::Text("hi".into());
        assert!(!HttpAction::from_input(i).unwrap().headers.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn post_without_key_may_not_repeat() {
        let a = HttpAction::from_input(input("POST", "http://h.test/")).unwrap();
        assert!(!a.retry.may_repeat);
        let mut i = input("POST", "http://h.test/");
        i.headers = vec![("Idempotency-Key".into(), "k1".into())];
        assert!(HttpAction::from_input(i).unwrap().retry.may_repeat);
    }

    #[test]
    fn every_bad_field_is_named() {
        let mut i = input("FETCH", "ftp://h.test/");
        i.headers = vec![
            ("X-Ok".into(), "fine".into()),
            ("Bad Name".into(), "v".into()),
            ("X-Inject".into(), "a\r\nEvil: 1".into()),
            ("Content-Length".into(), "3".into()),
        ];
        i.body = BodyInput::Json("{nope".into());
        i.success_codes = "2xx,abc".into();
        i.timeouts =
            TimeoutsInput { connect: Some(Duration::ZERO), attempt: None, total: Some(Duration::ZERO) };
        i.error_messages = vec![("teapot".into(), "x".into())];
        i.retry.multiplier = 0.5;
        let err = HttpAction::from_input(i).unwrap_err();
        assert_eq!(
            fields(err),
            [
                "method",
                "url",
                "headers[1].name",
                "headers[2].value",
                "headers[3].name",
                "json",
                "timeouts.connect",
                "timeouts.total",
                "success_codes",
                "error_messages[\"teapot\"]",
                "retry.multiplier",
            ]
        );
    }

    #[test]
    fn secrets_in_bad_input_are_not_echoed() {
        let mut i = input("GET", "not a url with secret-token");
        i.headers = vec![("Authorization".into(), "Bearer secret-token\n".into())];
        let err = HttpAction::from_input(i).unwrap_err();
        assert!(!err.to_string().contains("secret-token"), "{err}");
    }

    #[test]
    fn durations_allow_long_horizons_but_not_overflow() {
        let mut i = input("GET", "http://h.test/");
        i.timeouts.total = Some(Duration::from_secs(24 * 3600));
        i.retry.max_backoff = Some(Duration::from_secs(3600));
        assert!(HttpAction::from_input(i.clone()).is_ok());
        i.timeouts.attempt = Some(Duration::from_secs(u64::MAX));
        i.retry.initial_backoff = Some(Duration::from_secs(u64::MAX / 2));
        let err = HttpAction::from_input(i).unwrap_err();
        assert_eq!(fields(err), ["timeouts.attempt", "retry.initial_backoff"]);
    }

    #[test]
    fn the_trace_and_the_attempt_bound_are_set_at_construction() {
        let mut i = input("GET", "http://h.test/");
        i.trace = crate::action::TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            None,
        );
        assert!(i.trace.is_some());
        let a = HttpAction::from_input(i.clone()).unwrap();
        assert_eq!(a.trace().map(|t| t.trace_id.as_str()), Some("0af7651916cd43dd8448eb211c80319c"));
        assert_eq!(a.retry().max_attempts, retry::DEFAULT_MAX_ATTEMPTS);
        i.retry.unbounded_by_default = true;
        assert_eq!(HttpAction::from_input(i.clone()).unwrap().retry().max_attempts, u32::MAX);
        i.retry.max_attempts = 4;
        assert_eq!(HttpAction::from_input(i).unwrap().retry().max_attempts, 4);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut i = input("POST", "https://h.test/p/secret-path?token=secret-query");
        i.headers = vec![
            ("Authorization".into(), "Bearer secret-auth".into()),
            ("X-Custom".into(), "secret-custom".into()),
            ("Accept".into(), "text/plain".into()),
        ];
        i.body = BodyInput::Text("secret-body".into());
        let sensitive = [HeaderName::from_static("x-custom")];
        let context = ValidationContext { sensitive_headers: &sensitive, ..ValidationContext::default() };
        let a = HttpAction::from_input_with(i, &context).unwrap();
        assert!(a.headers()["x-custom"].is_sensitive());
        let shown = format!("{a:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("h.test:443") && shown.contains("text/plain"), "{shown}");
    }

    #[test]
    fn a_deep_json_body_is_checked_without_deep_recursion() {
        // serde_json skips an IgnoredAny without recursing: no depth limit, no stack overflow.
        for depth in [128, 129, 100_000] {
            let mut i = input("POST", "http://h.test/");
            i.body = BodyInput::Json(format!("{}{}", "[".repeat(depth), "]".repeat(depth)));
            assert!(HttpAction::from_input(i).is_ok(), "{depth}");
        }
    }

    #[test]
    fn hostless_http_urls_are_refused() {
        for url in [
            "http:///h.test/",
            "https:///h.test",
            "http:/h.test/",
            "http:h.test",
            "http:\\\\h.test/",
            "http://?x",
        ] {
            let err = HttpAction::from_input(input("GET", url)).unwrap_err();
            assert_eq!(fields(err), ["url"], "{url}");
        }
        for url in ["http://h.test", " HTTPS://h.test/x ", "http://u@h.test/"] {
            assert!(HttpAction::from_input(input("GET", url)).is_ok(), "{url}");
        }
    }

    #[test]
    fn empty_method_and_url_are_required() {
        let err = HttpAction::from_input(ActionInput::default()).unwrap_err();
        assert_eq!(fields(err), ["method", "url"]);
    }

    #[test]
    fn error_message_lookup_prefers_exact_status() {
        let mut i = input("GET", "http://h.test/");
        i.error_messages = vec![("4xx".into(), "client".into()), ("404".into(), "missing".into())];
        let a = HttpAction::from_input(i).unwrap();
        assert_eq!(a.error_messages().lookup(404), Some("missing"));
        assert_eq!(a.error_messages().lookup(400), Some("client"));
        assert_eq!(a.error_messages().lookup(500), None);
    }
}
