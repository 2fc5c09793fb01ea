//! The outcome as plain JSON, for `callout exec` and anyone reading it by eye.
use crate::action::{ActionError, AttemptRecord, Outcome};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use std::time::{Duration, UNIX_EPOCH};

fn ms(d: Duration) -> Value {
    json!((d.as_secs_f64() * 1e6).round() / 1e3)
}

fn error(e: &ActionError) -> Value {
    json!({ "kind": e.kind.as_str(), "message": e.message })
}

fn attempt(a: &AttemptRecord) -> Value {
    let t = &a.timing;
    json!({
        "number": a.number,
        "status": a.status,
        "error": a.error.as_ref().map(error),
        "remote_address": a.remote_addr.map(|r| r.to_string()),
        "backoff_ms": a.backoff.map(ms),
        "timing_ms": {
            "dns": ms(t.dns), "connect": ms(t.connect), "tls": ms(t.tls),
            "first_byte": t.first_byte.map(ms), "total": ms(t.total),
            "reused_connection": t.reused_connection,
        },
    })
}

/// The outcome as a JSON object: the body as `body_json`, else `body_text`, else base64.
pub fn outcome_json(o: &Outcome) -> Value {
    let response = o.response.as_ref().map(|r| {
        let mut m = Map::new();
        m.insert("status".into(), json!(r.head.status));
        m.insert("reason".into(), json!(r.head.reason));
        m.insert("http_version".into(), json!(r.head.version));
        m.insert("headers".into(), Value::Array(r.head.headers.iter().map(|(n, v)| json!([n, v])).collect()));
        if let Some(body) = &r.body_json {
            m.insert("body_json".into(), body.clone());
        } else if let Some(text) = &r.body_text {
            m.insert("body_text".into(), json!(text));
        } else if !r.body.is_empty() {
            m.insert("body_base64".into(), json!(base64::engine::general_purpose::STANDARD.encode(&r.body)));
        }
        m.insert("body_bytes".into(), json!(r.body.len()));
        m.insert("truncated".into(), json!(r.truncated));
        Value::Object(m)
    });
    json!({
        "action_id": o.action_id,
        "outcome": if o.succeeded { "SUCCEEDED" } else { "FAILED" },
        "proceed": o.proceed,
        "error": o.error.as_ref().map(error),
        "response": response,
        "attempts": o.attempts.iter().map(attempt).collect::<Vec<_>>(),
        "started_at_unix_ms": o.started_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
        "total_ms": ms(o.total),
    })
}
