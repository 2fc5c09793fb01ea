//! Proto ⇄ domain conversion. The only place that knows both shapes.
use crate::{
    action::{
        ActionError, ActionInput, AttemptRecord, AttemptTiming, AuthInput, BodyInput, ErrorKind,
        InvalidAction, NextInput, OAuth2Input, OnFailure, Outcome, PageRecord, PaginateInput, PaginationEnd,
        RedirectsInput, ReplyBody, ResponseData, ResponseHead, RetryInput, SigV4Input, SigningInput,
        TimeoutsInput, TlsInput, MAX_RETRY_ON_ERRORS,
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
    let reply_body = match pb::ReplyBody::try_from(req.reply_body) {
        Ok(pb::ReplyBody::Unspecified | pb::ReplyBody::Auto) => ReplyBody::Auto,
        Ok(pb::ReplyBody::All) => ReplyBody::All,
        Ok(pb::ReplyBody::Raw) => ReplyBody::Raw,
        Ok(pb::ReplyBody::None) => ReplyBody::None,
        Err(_) => {
            bad.push("reply_body", format!("unknown value {}", req.reply_body));
            ReplyBody::Auto
        }
    };
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
        auth: auth_input(req.auth.map(|a| *a), bad),
        signing: signing_input(req.signing.map(|s| *s)),
        trace: None,
        tenant: req.tenant,
        reply_body,
        extract: req.extract.into_iter().collect(),
        success_condition: req.success_condition,
        retry_condition: req.retry_condition,
        vars: req.vars.into_iter().map(|(name, value)| (name, plain_json(value))).collect(),
        async_poll: req.async_poll.map_or_else(Default::default, |p| crate::action::poll::AsyncPollInput {
            enabled: p.enabled,
            interval: duration("async_poll.interval", p.interval, bad),
            max_wait: duration("async_poll.max_wait", p.max_wait, bad),
        }),
        paginate: req.paginate.map(|p| paginate_input(*p)),
    }
}

/// `paginate` as the domain's input; an unset `next` is the Link header.
fn paginate_input(p: pb::Paginate) -> PaginateInput {
    use pb::paginate::Next;
    let next = match p.next {
        None | Some(Next::LinkHeader(true)) => NextInput::LinkHeader,
        Some(Next::LinkHeader(false)) => NextInput::LinkHeaderFalse,
        Some(Next::NextUrlPath(path)) => NextInput::UrlPath(path),
        Some(Next::Cursor(c)) => NextInput::Cursor { path: c.path, param: c.param },
    };
    PaginateInput { next, items_path: p.items_path, max_pages: p.max_pages }
}

/// A page as the reply's (and PageCompleted's) `Page`.
pub fn page(p: &PageRecord) -> pb::Page {
    let end = match p.end {
        None => pb::PaginationEnd::Unspecified,
        Some(PaginationEnd::LastPage) => pb::PaginationEnd::LastPage,
        Some(PaginationEnd::MaxPages) => pb::PaginationEnd::MaxPages,
        Some(PaginationEnd::Loop) => pb::PaginationEnd::Loop,
        Some(PaginationEnd::ItemsCapped) => pb::PaginationEnd::ItemsCapped,
    };
    pb::Page {
        number: p.number,
        status: p.status.map(u32::from).unwrap_or_default(),
        url: p.url.clone(),
        total: Some(proto_duration(p.total)),
        items: p.items,
        attempts: p.attempts,
        end: end as i32,
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
        pb::ErrorKind::ConditionFailed => ErrorKind::ConditionFailed,
    })
}

pub fn error_kind(kind: ErrorKind) -> pb::ErrorKind {
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
        ErrorKind::ConditionFailed => pb::ErrorKind::ConditionFailed,
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
        poll: a.poll,
        page: a.page,
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

/// The outcome as Execute's reply, its body fields as the action's `reply_body` asks. A derived
/// body view that would push the reply past `REPLY_BUDGET` is dropped (JSON first, then text);
/// under AUTO the next field takes its place, and the body bytes always fit.
pub fn outcome(o: Outcome) -> pb::ExecuteHttpActionResponse {
    let mode = o.reply_body;
    let mut reply = outcome_unbounded(o);
    // Paginated items share the reply with the last page's body views.
    let budget = REPLY_BUDGET.saturating_sub(reply.items.iter().map(prost::Message::encoded_len).sum());
    let Some(response) = reply.response.as_mut() else {
        return reply;
    };
    let body = std::mem::take(&mut response.body);
    match mode {
        ReplyBody::None => {
            response.body_json = None;
            response.body_text = None;
            return reply;
        }
        ReplyBody::Raw => {
            response.body_json = None;
            response.body_text = None;
            response.body = body;
            return reply;
        }
        ReplyBody::Auto | ReplyBody::All => {}
    }
    // AUTO: the text view is the JSON view's stand-in, sized only if the JSON is dropped.
    let stand_in = if mode == ReplyBody::Auto && response.body_json.is_some() {
        response.body_text.take()
    } else {
        None
    };
    // Sizing walks the whole JSON tree: do it once in the common case (the reply fits), and
    // again only after dropping the JSON view.
    if response.body_json.is_some() || response.body_text.is_some() {
        let extra = if mode == ReplyBody::All { body.len() + 8 } else { 0 };
        let mut len = prost::Message::encoded_len(response) + extra;
        if len > budget && response.body_json.is_some() {
            response.body_json = None;
            if stand_in.is_some() {
                response.body_text = stand_in;
            }
            len = prost::Message::encoded_len(response) + extra;
        }
        if len > budget {
            response.body_text = None;
        }
    }
    // ALL keeps the bytes; AUTO only when no view is left.
    if mode == ReplyBody::All || (response.body_json.is_none() && response.body_text.is_none()) {
        response.body = body;
    }
    // Paginated, the items are what the caller came for: the last page's bytes give way.
    if budget < REPLY_BUDGET && prost::Message::encoded_len(response) > budget {
        response.body = bytes::Bytes::new();
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
        extracted: o.extracted.into_iter().map(|(name, value)| (name, json_value(value))).collect(),
        items: o.items.into_iter().map(json_value).collect(),
        pages: o.pages.iter().map(page).collect(),
    }
}

/// A google.protobuf.Value as JSON. A whole number (every number is a double here) becomes an
/// integer, so `{{vars.id}}` renders `7`, not `7.0`; NaN and infinities become null.
pub fn plain_json(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    match v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 => {
            serde_json::Value::from(n as i64)
        }
        Some(Kind::NumberValue(n)) => {
            serde_json::Number::from_f64(n).map_or(serde_json::Value::Null, Into::into)
        }
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.into_iter().map(plain_json).collect()),
        Some(Kind::StructValue(s)) => {
            serde_json::Value::Object(s.fields.into_iter().map(|(k, v)| (k, plain_json(v))).collect())
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn outcome_with(mode: ReplyBody, json: Option<serde_json::Value>, text: Option<&str>) -> Outcome {
        let head = ResponseHead { status: 200, reason: "OK".into(), version: "HTTP/1.1", headers: vec![] };
        let body = Bytes::from(text.unwrap_or("\u{1}").to_owned());
        Outcome {
            action_id: "a".into(),
            succeeded: true,
            proceed: true,
            error: None,
            response: Some(ResponseData {
                head,
                body,
                body_json: json,
                body_text: text.map(str::to_owned),
                truncated: false,
                extracted: Vec::new(),
            }),
            attempts: Vec::new(),
            started_at: SystemTime::UNIX_EPOCH,
            total: Duration::ZERO,
            reply_body: mode,
            extracted: vec![("id".into(), serde_json::json!(7))],
            condition_retry: false,
            poll_due: None,
            items: Vec::new(),
            pages: Vec::new(),
        }
    }

    #[test]
    fn an_items_reply_size_is_its_encoding() {
        use prost::Message as _;
        let values = [
            serde_json::json!(null),
            serde_json::json!(7),
            serde_json::json!("héllo"),
            serde_json::json!([1, "a", [true]]),
            serde_json::json!({"id": 1, "tags": {"a": "x".repeat(300)}}),
        ];
        for v in values {
            let reply =
                pb::ExecuteHttpActionResponse { items: vec![json_value(v.clone())], ..Default::default() };
            assert_eq!(crate::action::paginate::reply_size(&v), reply.encoded_len() as u64, "{v}");
        }
    }

    fn fields(r: &pb::HttpResponse) -> (bool, bool, bool) {
        (r.body_json.is_some(), r.body_text.is_some(), !r.body.is_empty())
    }

    #[test]
    fn each_mode_carries_its_fields() {
        let json = || Some(serde_json::json!({"id": 7}));
        let text = Some(r#"{"id":7}"#);
        let of = |mode, json, text| fields(&outcome(outcome_with(mode, json, text)).response.unwrap());
        assert_eq!(of(ReplyBody::Auto, json(), text), (true, false, false));
        assert_eq!(of(ReplyBody::Auto, None, Some("plain")), (false, true, false));
        assert_eq!(of(ReplyBody::Auto, None, None), (false, false, true));
        assert_eq!(of(ReplyBody::All, json(), text), (true, true, true));
        assert_eq!(of(ReplyBody::Raw, json(), text), (false, false, true));
        assert_eq!(of(ReplyBody::None, json(), text), (false, false, false));
        let reply = outcome(outcome_with(ReplyBody::None, json(), text));
        assert!(reply.extracted.contains_key("id"), "extracted does not depend on the mode");
    }

    #[test]
    fn auto_falls_back_to_text_when_the_json_view_is_too_large() {
        // Half a million numbers: ~1 MB of text, over 5 MB as google.protobuf.Values.
        let numbers: Vec<serde_json::Value> = (0..500_000).map(|_| serde_json::json!(1)).collect();
        let text = format!("[{}]", vec!["1"; 500_000].join(","));
        let reply =
            outcome(outcome_with(ReplyBody::Auto, Some(serde_json::Value::Array(numbers)), Some(&text)));
        assert_eq!(fields(&reply.response.unwrap()), (false, true, false));
    }
}
