//! Proto ⇄ domain conversion. The only place that knows both shapes.
use crate::{
    action::{
        ActionError, ActionInput, AttemptRecord, AttemptTiming, AuthInput, BodyInput, ErrorKind,
        InvalidAction, OAuth2Input, OnFailure, Outcome, RedirectsInput, ResponseData, ResponseHead,
        RetryInput, SigV4Input, SigningInput, TimeoutsInput, TlsInput, MAX_RETRY_ON_ERRORS,
    },
    pb,
};
use std::time::{Duration, SystemTime};

/// The request as the domain's input. Proto-level problems (a negative duration, an unknown
/// enum value) are added to `bad` with their field path.
pub fn action_input(req: pb::ExecuteHttpActionRequest, bad: &mut InvalidAction) -> ActionInput {
    let timeouts = req.timeouts.unwrap_or_default();
    let retry = req.retry.unwrap_or_default();
    let redirects = req.redirects.unwrap_or_default();
    let tls = req.tls.unwrap_or_default();
    let on_failure = match pb::OnFailure::try_from(req.on_failure) {
        Ok(pb::OnFailure::Unspecified | pb::OnFailure::Abort) => OnFailure::Abort,
        Ok(pb::OnFailure::Continue) => OnFailure::Continue,
        Err(_) => {
            bad.push("on_failure", format!("unknown value {}", req.on_failure));
            OnFailure::Abort
        }
    };
    let mut retry_on_errors = Vec::new();
    if retry.retry_on_errors.len() > MAX_RETRY_ON_ERRORS {
        bad.push(
            "retry.retry_on_errors",
            format!("has {} entries; at most {MAX_RETRY_ON_ERRORS} are allowed", retry.retry_on_errors.len()),
        );
    }
    for (i, raw) in retry.retry_on_errors.iter().take(MAX_RETRY_ON_ERRORS).enumerate() {
        match pb::ErrorKind::try_from(*raw).ok().and_then(error_kind_from) {
            Some(kind) => retry_on_errors.push(kind),
            None => bad.push(format!("retry.retry_on_errors[{i}]"), format!("unknown error kind {raw}")),
        }
    }
    let mut error_messages: Vec<(String, String)> = req.error_messages.into_iter().collect();
    error_messages.sort();
    let body = match req.body {
        None => BodyInput::None,
        Some(pb::execute_http_action_request::Body::Json(json)) => BodyInput::Json(json),
        Some(pb::execute_http_action_request::Body::Form(form)) => BodyInput::Form(pairs(form.fields)),
        Some(pb::execute_http_action_request::Body::Text(text)) => BodyInput::Text(text),
        Some(pb::execute_http_action_request::Body::Raw(raw)) => BodyInput::Raw(raw),
    };
    ActionInput {
        action_id: req.action_id,
        method: req.method,
        url: req.url,
        query: pairs(req.query),
        headers: pairs(req.headers),
        body,
        content_type: req.content_type,
        timeouts: TimeoutsInput {
            connect: duration("timeouts.connect", timeouts.connect, bad),
            attempt: duration("timeouts.attempt", timeouts.attempt, bad),
            total: duration("timeouts.total", timeouts.total, bad),
        },
        success_codes: req.success_codes,
        on_failure,
        error_messages,
        retry: RetryInput {
            max_attempts: retry.max_attempts,
            initial_backoff: duration("retry.initial_backoff", retry.initial_backoff, bad),
            max_backoff: duration("retry.max_backoff", retry.max_backoff, bad),
            multiplier: retry.multiplier,
            jitter: retry.jitter,
            retry_on_status: retry.retry_on_status,
            retry_on_errors,
            honor_retry_after: retry.honor_retry_after,
            retry_non_idempotent: retry.retry_non_idempotent,
            unbounded_by_default: false,
        },
        redirects: RedirectsInput { follow: redirects.follow, max_hops: redirects.max_hops },
        tls: TlsInput {
            insecure_skip_verify: tls.insecure_skip_verify,
            ca_pem: tls.ca_pem,
            client_cert_pem: tls.client_cert_pem,
            client_key_pem: tls.client_key_pem,
        },
        proxy_url: req.proxy.map(|p| p.url).unwrap_or_default(),
        max_response_bytes: req.max_response_bytes,
        auth: auth_input(req.auth, bad),
        signing: signing_input(req.signing),
        trace: None,
        tenant: req.tenant,
    }
}

/// `auth` as the domain's input; an unset oneof is no credentials.
fn auth_input(auth: Option<pb::Auth>, bad: &mut InvalidAction) -> AuthInput {
    use pb::auth::Kind;
    match auth.and_then(|a| a.kind) {
        None => AuthInput::None,
        Some(Kind::Profile(name)) => AuthInput::Profile(name),
        Some(Kind::Basic(b)) => AuthInput::Basic { username: b.username, password: b.password },
        Some(Kind::BearerToken(token)) => AuthInput::Bearer(token),
        Some(Kind::ApiKey(key)) => {
            let in_query = match pb::api_key_auth::Location::try_from(key.r#in) {
                Ok(pb::api_key_auth::Location::Unspecified | pb::api_key_auth::Location::Header) => false,
                Ok(pb::api_key_auth::Location::Query) => true,
                Err(_) => {
                    bad.push("auth.api_key.in", format!("unknown value {}", key.r#in));
                    false
                }
            };
            AuthInput::ApiKey { name: key.name, value: key.value, in_query }
        }
        Some(Kind::Oauth2ClientCredentials(o)) => AuthInput::OAuth2(OAuth2Input {
            token_url: o.token_url,
            client_id: o.client_id,
            client_secret: o.client_secret,
            scopes: o.scopes,
            audience: o.audience,
            extra_params: pairs(o.extra_params),
            credentials_in_body: o.credentials_in_body,
        }),
        Some(Kind::AwsSigv4(s)) => AuthInput::AwsSigV4(SigV4Input {
            region: s.region,
            service: s.service,
            access_key_id: s.access_key_id,
            secret_access_key: s.secret_access_key,
            session_token: s.session_token,
        }),
    }
}

fn signing_input(signing: Option<pb::Signing>) -> SigningInput {
    match signing.and_then(|s| s.scheme) {
        None => SigningInput::None,
        Some(pb::signing::Scheme::StandardWebhooks(w)) => SigningInput::StandardWebhooks { secret: w.secret },
    }
}

fn pairs(kvs: Vec<pb::KeyValue>) -> Vec<(String, String)> {
    kvs.into_iter().map(|kv| (kv.name, kv.value)).collect()
}

fn duration(field: &str, d: Option<prost_types::Duration>, bad: &mut InvalidAction) -> Option<Duration> {
    let d = d?;
    match Duration::try_from(d) {
        Ok(d) => Some(d),
        Err(_) => {
            bad.push(field, "must be positive");
            None
        }
    }
}

fn error_kind_from(kind: pb::ErrorKind) -> Option<ErrorKind> {
    Some(match kind {
        pb::ErrorKind::Unspecified => return None,
        pb::ErrorKind::InvalidRequest => ErrorKind::InvalidRequest,
        pb::ErrorKind::DeniedByPolicy => ErrorKind::DeniedByPolicy,
        pb::ErrorKind::Dns => ErrorKind::Dns,
        pb::ErrorKind::Connect => ErrorKind::Connect,
        pb::ErrorKind::Tls => ErrorKind::Tls,
        pb::ErrorKind::Timeout => ErrorKind::Timeout,
        pb::ErrorKind::Protocol => ErrorKind::Protocol,
        pb::ErrorKind::BodyTooLarge => ErrorKind::BodyTooLarge,
        pb::ErrorKind::UnexpectedStatus => ErrorKind::UnexpectedStatus,
        pb::ErrorKind::RateLimited => ErrorKind::RateLimited,
        pb::ErrorKind::CircuitOpen => ErrorKind::CircuitOpen,
        pb::ErrorKind::Cancelled => ErrorKind::Cancelled,
        pb::ErrorKind::Auth => ErrorKind::Auth,
    })
}

fn error_kind(kind: ErrorKind) -> pb::ErrorKind {
    match kind {
        ErrorKind::InvalidRequest => pb::ErrorKind::InvalidRequest,
        ErrorKind::DeniedByPolicy => pb::ErrorKind::DeniedByPolicy,
        ErrorKind::Dns => pb::ErrorKind::Dns,
        ErrorKind::Connect => pb::ErrorKind::Connect,
        ErrorKind::Tls => pb::ErrorKind::Tls,
        ErrorKind::Timeout => pb::ErrorKind::Timeout,
        ErrorKind::Protocol => pb::ErrorKind::Protocol,
        ErrorKind::BodyTooLarge => pb::ErrorKind::BodyTooLarge,
        ErrorKind::UnexpectedStatus => pb::ErrorKind::UnexpectedStatus,
        ErrorKind::RateLimited => pb::ErrorKind::RateLimited,
        ErrorKind::CircuitOpen => pb::ErrorKind::CircuitOpen,
        ErrorKind::Cancelled => pb::ErrorKind::Cancelled,
        ErrorKind::Auth => pb::ErrorKind::Auth,
    }
}

pub fn action_error(e: &ActionError) -> pb::ActionError {
    pb::ActionError { kind: error_kind(e.kind) as i32, message: e.message.clone() }
}

pub fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration { seconds: i64::MAX, nanos: 0 })
}

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn key_values(pairs: &[(String, String)]) -> Vec<pb::KeyValue> {
    pairs.iter().map(|(name, value)| pb::KeyValue { name: name.clone(), value: value.clone() }).collect()
}

pub fn attempt_timing(t: &AttemptTiming) -> pb::AttemptTiming {
    pb::AttemptTiming {
        dns: Some(proto_duration(t.dns)),
        connect: Some(proto_duration(t.connect)),
        tls: Some(proto_duration(t.tls)),
        first_byte: t.first_byte.map(proto_duration),
        total: Some(proto_duration(t.total)),
        reused_connection: t.reused_connection,
    }
}

fn attempt(a: &AttemptRecord) -> pb::Attempt {
    pb::Attempt {
        number: a.number,
        status: a.status.map(u32::from).unwrap_or_default(),
        error: a.error.as_ref().map(action_error),
        timing: Some(attempt_timing(&a.timing)),
        remote_address: a.remote_addr.map(|r| r.to_string()).unwrap_or_default(),
        backoff: a.backoff.map(proto_duration),
    }
}

/// The reply's response, taking the head's strings rather than copying them.
fn response(r: ResponseData) -> pb::HttpResponse {
    let ResponseHead { status, reason, version, headers } = r.head;
    pb::HttpResponse {
        status: u32::from(status),
        reason,
        http_version: version.to_owned(),
        headers: headers.into_iter().map(|(name, value)| pb::KeyValue { name, value }).collect(),
        body: r.body,
        body_json: r.body_json.map(json_value),
        body_text: r.body_text,
        truncated: r.truncated,
    }
}

/// Largest Execute reply callout sends: gRPC clients refuse messages over 4 MiB by default.
pub const REPLY_BUDGET: usize = 4 * 1024 * 1024 - 64 * 1024;

/// The outcome as Execute's reply. When the derived body views would push the reply past
/// `REPLY_BUDGET`, they are dropped (JSON first, then text); the body bytes always stay.
pub fn outcome(o: Outcome) -> pb::ExecuteHttpActionResponse {
    let mut reply = outcome_unbounded(o);
    if let Some(response) = reply.response.as_mut() {
        // Sizing walks the whole JSON tree: do it once in the common case (the reply fits),
        // and again only after dropping the JSON view.
        if response.body_json.is_none() && response.body_text.is_none() {
            return reply;
        }
        let mut len = prost::Message::encoded_len(response);
        if len > REPLY_BUDGET && response.body_json.is_some() {
            response.body_json = None;
            len = prost::Message::encoded_len(response);
        }
        if len > REPLY_BUDGET {
            response.body_text = None;
        }
    }
    reply
}

fn outcome_unbounded(o: Outcome) -> pb::ExecuteHttpActionResponse {
    pb::ExecuteHttpActionResponse {
        action_id: o.action_id,
        outcome: if o.succeeded { pb::Outcome::Succeeded } else { pb::Outcome::Failed } as i32,
        proceed: o.proceed,
        error: o.error.as_ref().map(action_error),
        response: o.response.map(response),
        attempts: o.attempts.iter().map(attempt).collect(),
        timing: Some(pb::ActionTiming {
            started_at: Some(timestamp(o.started_at)),
            total: Some(proto_duration(o.total)),
        }),
    }
}

/// JSON as google.protobuf.Value.
pub fn json_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => {
            Kind::ListValue(prost_types::ListValue { values: items.into_iter().map(json_value).collect() })
        }
        serde_json::Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map.into_iter().map(|(k, v)| (k, json_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}
