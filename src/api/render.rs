//! `Render`'s reply: the rendered request (`crate::render::Rendered`) as a `RenderedRequest`.
use super::convert::{error_kind, key_values, proto_duration};
use crate::{
    action::{OnFailure, ReplyBody},
    client::connect::AddressVerdict,
    pb,
    render::Rendered,
};

pub fn rendered(r: Rendered) -> pb::RenderedRequest {
    let route = &r.route;
    let egress = pb::EgressVerdict {
        allowed: route.allowed(),
        target: route.target.clone(),
        denied: route.denied.clone().unwrap_or_default(),
        dialled: route.dialled.clone(),
        addresses: route
            .addresses
            .iter()
            .map(|(addr, verdict)| {
                let (allowed, reason) = match verdict {
                    AddressVerdict::Allowed => (true, String::new()),
                    AddressVerdict::Denied(rule) => (false, rule.clone()),
                    AddressVerdict::NotChecked(why) => (true, format!("not checked: {why}")),
                };
                pb::ResolvedAddress { address: addr.to_string(), allowed, reason }
            })
            .collect(),
        resolve_error: route.resolve_error.clone().unwrap_or_default(),
        resolved_by: route.resolved_by.to_owned(),
    };
    let proxy = pb::ProxyRoute {
        used: r.proxy.url.is_some(),
        url: r.proxy.url.clone().unwrap_or_default(),
        source: r.proxy.source.to_owned(),
        reason: r.proxy.reason.clone(),
    };
    let p = &r.policy;
    let retry = &p.retry;
    let policy = pb::EffectivePolicy {
        connect_timeout: Some(proto_duration(p.connect_timeout)),
        attempt_timeout: Some(proto_duration(p.attempt_timeout)),
        total_timeout: Some(proto_duration(p.total_timeout)),
        total_timeout_source: p.total_source.to_owned(),
        max_attempts: retry.max_attempts,
        initial_backoff: Some(proto_duration(retry.initial_backoff)),
        max_backoff: Some(proto_duration(retry.max_backoff)),
        multiplier: retry.multiplier,
        jitter: retry.jitter,
        retry_on_status: retry.retry_on_status.as_str().to_owned(),
        retry_on_errors: retry.retry_on_errors.iter().map(|k| error_kind(*k) as i32).collect(),
        honor_retry_after: retry.honor_retry_after,
        may_repeat: retry.may_repeat,
        success_codes: p.success_codes.clone(),
        follow_redirects: p.follow_redirects,
        max_redirects: p.max_redirects,
        max_response_bytes: p.max_response_bytes,
        reply_body: match p.reply_body {
            ReplyBody::Auto => pb::ReplyBody::Auto,
            ReplyBody::All => pb::ReplyBody::All,
            ReplyBody::Raw => pb::ReplyBody::Raw,
            ReplyBody::None => pb::ReplyBody::None,
        } as i32,
        success_condition: p.success_condition.clone(),
        retry_condition: p.retry_condition.clone(),
        extract: key_values(&p.extract),
        on_failure: match p.on_failure {
            OnFailure::Abort => pb::OnFailure::Abort,
            OnFailure::Continue => pb::OnFailure::Continue,
        } as i32,
    };
    pb::RenderedRequest {
        action_id: r.action_id,
        method: r.method,
        url: r.url,
        headers: key_values(&r.headers),
        body: r.body,
        body_size: r.body_size,
        body_redacted: r.body_redacted,
        auth: r.auth.to_owned(),
        signing: r.signing.to_owned(),
        egress: Some(egress),
        proxy: Some(proxy),
        policy: Some(policy),
    }
}
