//! What a durable action is and how it is retried: the submitted request validated with the
//! durable defaults (24 h total, backoff 1 s to 1 h, unlimited attempts, an idempotency key on
//! POST and PATCH), and the decision after each attempt, made with the executor's own
//! `RetryPolicy` but over hours and days.
use crate::{
    action::{retryable_kind, AttemptEnd, ErrorKind, HttpAction, InvalidAction, RetryDecision},
    api::convert,
    exec::Executor,
    pb,
};
use http::HeaderName;
use std::time::Duration;

/// Total time of a durable action that sets none.
pub const DEFAULT_TOTAL: Duration = Duration::from_secs(24 * 3600);
/// Longest total time of a durable action.
pub const MAX_TOTAL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backoff before the second attempt, unless the action sets one.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest backoff, unless the action sets one.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest action id: it is a header value and a key.
const MAX_ACTION_ID: usize = 256;

/// A stored request made runnable.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The validated action; `retry.max_attempts` is `u32::MAX` when the caller set none.
    pub action: HttpAction,
    /// The total time of a run.
    pub total: Duration,
}

/// Validates `request` as a durable action. `idempotency_header`, when set, is added with the
/// action id as its value to POST and PATCH that do not carry it; such an action may be repeated
/// after a crash. Violations name fields as the request does (the caller prefixes them).
pub fn plan(
    request: pb::ExecuteHttpActionRequest,
    executor: &Executor,
    idempotency_header: Option<&HeaderName>,
) -> Result<Plan, InvalidAction> {
    let mut bad = InvalidAction::default();
    if request.action_id.len() > MAX_ACTION_ID
        || request.action_id.bytes().any(|b| !(0x21..=0x7e).contains(&b))
    {
        bad.push(
            "action_id",
            format!("a durable action's id must be 1 to {MAX_ACTION_ID} visible ASCII characters"),
        );
    }
    let action_id = request.action_id.clone();
    let mut input = convert::action_input(request, &mut bad);
    let total = match input.timeouts.total {
        None => DEFAULT_TOTAL,
        Some(total) if total > MAX_TOTAL => {
            bad.push("timeouts.total", "must be at most 30 days (720h) for a durable action");
            MAX_TOTAL
        }
        Some(total) => total,
    };
    input.timeouts.total = Some(total);
    let initial = *input.retry.initial_backoff.get_or_insert(DEFAULT_INITIAL_BACKOFF);
    input.retry.max_backoff.get_or_insert(DEFAULT_MAX_BACKOFF.max(initial));
    let mut keyed = false;
    if let Some(name) = idempotency_header {
        let unsafe_method = ["POST", "PATCH"].iter().any(|m| input.method.trim().eq_ignore_ascii_case(m));
        let present = input.headers.iter().any(|(n, _)| n.trim().eq_ignore_ascii_case(name.as_str()));
        if unsafe_method && !present {
            input.headers.push((name.as_str().to_owned(), action_id));
        }
        keyed = present || unsafe_method;
    }
    // Retry until the total time unless the caller bounded the attempts; an action carrying an
    // idempotency key may be repeated after a crash whatever its method.
    input.retry.unbounded_by_default = true;
    input.retry.retry_non_idempotent |= keyed;
    match executor.action(input) {
        Ok(action) if bad.is_empty() => Ok(Plan { action, total }),
        Ok(_) => Err(bad),
        Err(more) => {
            bad.violations.extend(more.violations);
            Err(bad)
        }
    }
}

/// Whether attempt `number_in_run` (1-based within the current run), which ended as `end`, is
/// tried again, and after how long. `remaining` is the run's time left.
pub fn decide(plan: &Plan, number_in_run: u32, end: AttemptEnd, remaining: Duration) -> RetryDecision {
    if let AttemptEnd::Error { kind, .. } = end {
        if !retryable_kind(kind) {
            return RetryDecision::Stop { reason: format!("{kind} error is final") };
        }
    }
    plan.action.retry().decide(number_in_run, end, remaining)
}

/// How an attempt that got `status` (if any) and `error` ended, for the retry decision.
pub fn attempt_end(status: Option<u16>, error: ErrorKind, retry_after: Option<Duration>) -> AttemptEnd {
    match (status, error) {
        (Some(status), ErrorKind::UnexpectedStatus) => AttemptEnd::Status { status, retry_after },
        // Whether the request left is not known from the outcome; a name or TLS failure never
        // sent anything.
        (_, kind) => AttemptEnd::Error { kind, sent: !matches!(kind, ErrorKind::Dns | ErrorKind::Tls) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::ExecSettings;

    fn executor() -> Executor {
        Executor::new(ExecSettings::default()).unwrap()
    }

    fn request(method: &str) -> pb::ExecuteHttpActionRequest {
        pb::ExecuteHttpActionRequest {
            action_id: "order-17".into(),
            method: method.into(),
            url: "https://shop.test/orders".into(),
            ..Default::default()
        }
    }

    fn key() -> HeaderName {
        HeaderName::from_static("idempotency-key")
    }

    #[test]
    fn durable_defaults_are_long() {
        let plan = plan(request("GET"), &executor(), Some(&key())).unwrap();
        assert_eq!(plan.total, DEFAULT_TOTAL);
        assert_eq!(plan.action.retry().max_attempts, u32::MAX);
        assert_eq!(plan.action.retry().initial_backoff, DEFAULT_INITIAL_BACKOFF);
        assert_eq!(plan.action.retry().max_backoff, DEFAULT_MAX_BACKOFF);
        assert!(!plan.action.headers().contains_key("idempotency-key"), "GET gets no key");
    }

    #[test]
    fn post_gets_the_action_id_as_idempotency_key_unless_it_sets_one() {
        let plan = plan(request("post"), &executor(), Some(&key())).unwrap();
        assert_eq!(plan.action.headers()["idempotency-key"], "order-17");
        assert!(plan.action.retry().may_repeat);
        let mut own = request("PATCH");
        own.headers.push(pb::KeyValue { name: "Idempotency-Key".into(), value: "mine".into() });
        let plan = super::plan(own, &executor(), Some(&key())).unwrap();
        assert_eq!(plan.action.headers().get_all("idempotency-key").iter().collect::<Vec<_>>(), ["mine"]);
        let plan = super::plan(request("POST"), &executor(), None).unwrap();
        assert!(!plan.action.retry().may_repeat, "no key, no repeat");
    }

    #[test]
    fn totals_past_thirty_days_are_refused() {
        let mut r = request("GET");
        r.timeouts = Some(Box::new(pb::Timeouts {
            total: Some(prost_types::Duration { seconds: 31 * 24 * 3600, nanos: 0 }),
            ..Default::default()
        }));
        r.action_id = "bad id".into();
        let err = plan(r, &executor(), Some(&key())).unwrap_err();
        let fields: Vec<_> = err.violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["action_id", "timeouts.total"]);
    }

    #[test]
    fn retry_after_of_hours_is_honoured_within_the_total() {
        let plan = plan(request("GET"), &executor(), Some(&key())).unwrap();
        let hours = Duration::from_secs(3 * 3600);
        let end = attempt_end(Some(503), ErrorKind::UnexpectedStatus, Some(hours));
        assert_eq!(
            decide(&plan, 40, end, DEFAULT_TOTAL),
            RetryDecision::Retry { backoff: hours, reason: "status 503 is retried after Retry-After".into() }
        );
        assert!(matches!(decide(&plan, 1, end, Duration::from_secs(3600)), RetryDecision::Stop { .. }));
        let policy = attempt_end(None, ErrorKind::DeniedByPolicy, None);
        assert!(matches!(decide(&plan, 1, policy, DEFAULT_TOTAL), RetryDecision::Stop { .. }));
    }

    #[test]
    fn backoff_grows_to_an_hour() {
        let mut request = request("GET");
        request.retry.get_or_insert_default().jitter = Some(false);
        let plan = plan(request, &executor(), Some(&key())).unwrap();
        assert_eq!(plan.action.retry().backoff(1), Duration::from_secs(1));
        assert_eq!(plan.action.retry().backoff(30), DEFAULT_MAX_BACKOFF);
    }
}
