//! The retry policy: whether a failed attempt may be tried again (and why), kept apart from how
//! long to wait before it.
use super::{status::StatusSpec, ErrorKind};
use std::time::Duration;

/// A validated retry policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (>= 1).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub jitter: bool,
    pub retry_on_status: StatusSpec,
    pub retry_on_errors: Vec<ErrorKind>,
    pub honor_retry_after: bool,
    /// The action may be retried even when it may have been processed (explicit opt-in, an
    /// idempotency key header, or an idempotent method).
    pub may_repeat: bool,
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(500);
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);
pub const DEFAULT_MULTIPLIER: f64 = 2.0;
pub const DEFAULT_RETRY_ON_STATUS: &str = "429,502,503,504";
pub const DEFAULT_RETRY_ON_ERRORS: [ErrorKind; 2] = [ErrorKind::Connect, ErrorKind::Timeout];

/// How an attempt ended, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// A response with a status that did not count as success.
    Status { status: u16, retry_after: Option<Duration> },
    /// A response the action's retry_condition asked to try again: the caller's explicit
    /// consent to repeat the request, whatever the method.
    Condition { status: u16, retry_after: Option<Duration> },
    /// A transport failure. `sent` is false when the request surely never left (DNS, refused
    /// connection, TLS handshake, connect timeout).
    Error { kind: ErrorKind, sent: bool },
}

/// Whether to try again, with the reason either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryDecision {
    Retry { backoff: Duration, reason: String },
    Stop { reason: String },
}

impl RetryPolicy {
    /// Decides after attempt number `attempt` failed as `end`, the rules that come before the
    /// policy first: a body already handed to a stream cannot be taken back, and some errors no
    /// retry can mend. `remaining` is the time left before the total deadline.
    pub fn after_failure(
        &self,
        attempt: u32,
        end: AttemptEnd,
        streamed: bool,
        remaining: Duration,
    ) -> RetryDecision {
        if streamed {
            return stop("the body was already streamed".into());
        }
        if matches!(end, AttemptEnd::Error { kind, .. } if !retryable_kind(kind)) {
            return stop("this error is final".into());
        }
        self.decide(attempt, end, remaining)
    }

    /// Decides whether attempt number `attempt` (1-based), which ended as `end`, is tried again.
    /// `remaining` is the time left before the total deadline; a wait that cannot fit stops.
    pub fn decide(&self, attempt: u32, end: AttemptEnd, remaining: Duration) -> RetryDecision {
        if attempt >= self.max_attempts {
            return stop(format!("attempt {attempt} of {} was the last", self.max_attempts));
        }
        // `repeat_anyway`: repeating is safe, or the caller asked for it (retry_condition).
        let (retryable, repeat_anyway, what) = match end {
            AttemptEnd::Status { status, .. } => (
                self.retry_on_status.contains(status),
                status == 429 || status == 503,
                format!("status {status}"),
            ),
            AttemptEnd::Condition { status, .. } => {
                (true, true, format!("retry_condition on status {status}"))
            }
            AttemptEnd::Error { kind, sent } => {
                (self.retry_on_errors.contains(&kind), !sent, format!("{kind} error"))
            }
        };
        if !retryable {
            return stop(format!("{what} is not retried by the policy"));
        }
        if !self.may_repeat && !repeat_anyway {
            return stop(format!(
                "{what} may have been processed and the method is not idempotent \
                 (set an Idempotency-Key header or retry_non_idempotent)"
            ));
        }
        let retry_after = match end {
            AttemptEnd::Status { retry_after: Some(wait), .. }
            | AttemptEnd::Condition { retry_after: Some(wait), .. }
                if self.honor_retry_after =>
            {
                Some(wait)
            }
            _ => None,
        };
        let (backoff, why) = match retry_after {
            Some(wait) => (wait, "Retry-After"),
            None => (self.backoff(attempt), "backoff"),
        };
        if backoff >= remaining {
            return stop(format!(
                "{what}: {why} of {} would pass the total deadline ({} left)",
                humantime::format_duration(round_ms(backoff)),
                humantime::format_duration(round_ms(remaining)),
            ));
        }
        RetryDecision::Retry { backoff, reason: format!("{what} is retried after {why}") }
    }

    /// The wait after attempt number `attempt` (1-based): exponential, capped, and with full
    /// jitter a uniformly random share of that.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let ceiling = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent);
        let ceiling = Duration::try_from_secs_f64(ceiling).unwrap_or(self.max_backoff).min(self.max_backoff);
        if self.jitter {
            ceiling.mul_f64(fastrand::f64())
        } else {
            ceiling
        }
    }
}

/// Errors that no retry can mend: the request itself or its response was wrong, or the caller
/// is gone. Execute's loop and the durable runner both ask this.
pub fn retryable_kind(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::BodyTooLarge
            | ErrorKind::InvalidRequest
            | ErrorKind::DeniedByPolicy
            | ErrorKind::Cancelled
    )
}

fn stop(reason: String) -> RetryDecision {
    RetryDecision::Stop { reason }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().min(u64::MAX as u128) as u64)
}

/// Parses a Retry-After value: delay seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(may_repeat: bool) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: false,
            retry_on_status: StatusSpec::parse(DEFAULT_RETRY_ON_STATUS).unwrap(),
            retry_on_errors: DEFAULT_RETRY_ON_ERRORS.to_vec(),
            honor_retry_after: true,
            may_repeat,
        }
    }
    const HOUR: Duration = Duration::from_secs(3600);

    fn status(status: u16) -> AttemptEnd {
        AttemptEnd::Status { status, retry_after: None }
    }

    #[test]
    fn exponential_backoff_is_capped() {
        let p = policy(true);
        assert_eq!(p.backoff(1), Duration::from_millis(500));
        assert_eq!(p.backoff(2), Duration::from_secs(1));
        assert_eq!(p.backoff(10), Duration::from_secs(30));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling() {
        let p = RetryPolicy { jitter: true, ..policy(true) };
        for _ in 0..200 {
            assert!(p.backoff(3) <= Duration::from_secs(2));
        }
    }

    #[test]
    fn retries_listed_statuses_until_the_last_attempt() {
        let p = policy(true);
        assert!(matches!(p.decide(1, status(503), HOUR), RetryDecision::Retry { .. }));
        assert!(matches!(p.decide(2, status(502), HOUR), RetryDecision::Retry { .. }));
        assert!(matches!(p.decide(3, status(503), HOUR), RetryDecision::Stop { .. }));
        assert!(matches!(p.decide(1, status(500), HOUR), RetryDecision::Stop { .. }));
    }

    #[test]
    fn non_idempotent_retries_only_when_surely_unprocessed() {
        let p = policy(false);
        assert!(matches!(p.decide(1, status(502), HOUR), RetryDecision::Stop { .. }));
        assert!(matches!(p.decide(1, status(503), HOUR), RetryDecision::Retry { .. }));
        assert!(matches!(p.decide(1, status(429), HOUR), RetryDecision::Retry { .. }));
        let refused = AttemptEnd::Error { kind: ErrorKind::Connect, sent: false };
        let reset = AttemptEnd::Error { kind: ErrorKind::Connect, sent: true };
        assert!(matches!(p.decide(1, refused, HOUR), RetryDecision::Retry { .. }));
        assert!(matches!(p.decide(1, reset, HOUR), RetryDecision::Stop { .. }));
    }

    #[test]
    fn retry_after_is_honoured_but_never_past_the_deadline() {
        let p = policy(true);
        let end = AttemptEnd::Status { status: 429, retry_after: Some(Duration::from_secs(1)) };
        assert_eq!(
            p.decide(1, end, HOUR),
            RetryDecision::Retry {
                backoff: Duration::from_secs(1),
                reason: "status 429 is retried after Retry-After".into()
            }
        );
        assert!(matches!(p.decide(1, end, Duration::from_millis(900)), RetryDecision::Stop { .. }));
    }

    #[test]
    fn a_retry_condition_repeats_any_method_within_attempts_and_deadline() {
        let p = policy(false);
        let end = AttemptEnd::Condition { status: 200, retry_after: None };
        assert!(matches!(p.decide(1, end, HOUR), RetryDecision::Retry { .. }));
        assert!(matches!(p.decide(3, end, HOUR), RetryDecision::Stop { .. }));
        assert!(matches!(p.decide(1, end, Duration::from_millis(100)), RetryDecision::Stop { .. }));
        let waits = AttemptEnd::Condition { status: 200, retry_after: Some(Duration::from_secs(5)) };
        assert!(
            matches!(p.decide(1, waits, HOUR), RetryDecision::Retry { backoff, .. } if backoff == Duration::from_secs(5))
        );
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(784111777);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn a_streamed_body_and_final_errors_are_never_retried() {
        let p = policy(true);
        let long = Duration::from_secs(60);
        assert!(matches!(p.after_failure(1, status(503), false, long), RetryDecision::Retry { .. }));
        assert_eq!(
            p.after_failure(1, status(503), true, long),
            RetryDecision::Stop { reason: "the body was already streamed".into() }
        );
        let final_error = AttemptEnd::Error { kind: ErrorKind::BodyTooLarge, sent: true };
        assert_eq!(
            p.after_failure(1, final_error, false, long),
            RetryDecision::Stop { reason: "this error is final".into() }
        );
        let connect = AttemptEnd::Error { kind: ErrorKind::Connect, sent: false };
        assert!(matches!(p.after_failure(1, connect, false, long), RetryDecision::Retry { .. }));
    }
}
