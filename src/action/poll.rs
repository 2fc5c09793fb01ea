//! `async_poll`: following a 202 Accepted's Location until the job it names is done. The
//! settings as written and validated, and the one decision of when the next poll goes out.
use super::{HttpAction, InvalidAction};
use std::time::Duration;
use url::Url;

/// Wait before a poll when the 202 carries no Retry-After.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest wait between polls (an `interval`, or a Retry-After of 0): no hot loop on a job.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Longest `interval`.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest `max_wait` (the longest total time of any action).
const MAX_POLL_WAIT: Duration = Duration::from_secs(30 * 24 * 3600);

/// `async_poll` as written; `None` takes the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct AsyncPollInput {
    pub enabled: bool,
    pub interval: Option<Duration>,
    pub max_wait: Option<Duration>,
}

/// Validated `async_poll` of an action that polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncPoll {
    /// Wait before a poll when the 202 has no Retry-After.
    pub interval: Duration,
    /// How long polls go on from the first 202; `None`: as long as the total deadline allows.
    pub max_wait: Option<Duration>,
}

/// When the next poll goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollWait {
    /// After this wait.
    After(Duration),
    /// Not at all: it would start past max_wait (or the total deadline).
    Expired,
}

impl AsyncPoll {
    /// The wait before the next poll after a 202 with `retry_after`, when `left` remains of
    /// max_wait (bounded by the total deadline): the Retry-After, else the interval, never less
    /// than `MIN_POLL_INTERVAL`.
    pub fn next(&self, retry_after: Option<Duration>, left: Duration) -> PollWait {
        let wait = retry_after.unwrap_or(self.interval).max(MIN_POLL_INTERVAL);
        if wait >= left {
            PollWait::Expired
        } else {
            PollWait::After(wait)
        }
    }

    /// The message of an action whose job was still 202 when polling had to stop.
    pub fn expired_message(&self) -> String {
        match self.max_wait {
            Some(max) => format!(
                "async_poll.max_wait ({}) ran out while the polled resource still answered 202 Accepted",
                humantime::format_duration(max)
            ),
            None => "async_poll.max_wait (the total time) ran out while the polled resource still answered \
                     202 Accepted"
                .to_owned(),
        }
    }
}

impl HttpAction {
    /// The poll of a 202's `location`: the action's follow-up GET, marked as a poll (its
    /// attempts are recorded as polls, and a 202 without a Location polls the same URL again).
    pub fn poll_of(&self, location: Url) -> HttpAction {
        let mut poll = self.follow_up(location);
        poll.is_poll = true;
        poll
    }

    /// Whether this is the poll of a 202's Location (`poll_of`).
    pub fn is_poll(&self) -> bool {
        self.is_poll
    }
}

/// Validates `async_poll`: `None` when disabled. `total` is the action's own total timeout, if
/// it set one (max_wait may not exceed it).
pub(super) fn validate(
    input: &AsyncPollInput,
    total: Option<Duration>,
    bad: &mut InvalidAction,
) -> Option<AsyncPoll> {
    let interval = match input.interval {
        None => DEFAULT_POLL_INTERVAL,
        Some(d) if d < MIN_POLL_INTERVAL => {
            bad.push("async_poll.interval", "must be at least 100ms");
            DEFAULT_POLL_INTERVAL
        }
        Some(d) if d > MAX_POLL_INTERVAL => {
            bad.push("async_poll.interval", "must be at most 1h");
            DEFAULT_POLL_INTERVAL
        }
        Some(d) => d,
    };
    let max_wait = match (input.max_wait, total) {
        (Some(d), _) if d.is_zero() => {
            bad.push("async_poll.max_wait", "must be positive");
            None
        }
        (Some(d), Some(total)) if d > total => {
            bad.push(
                "async_poll.max_wait",
                format!("must be at most timeouts.total ({})", humantime::format_duration(total)),
            );
            None
        }
        (Some(d), _) if d > MAX_POLL_WAIT => {
            bad.push("async_poll.max_wait", "must be at most 30 days");
            None
        }
        (d, _) => d,
    };
    input.enabled.then_some(AsyncPoll { interval, max_wait })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(interval_ms: u64) -> AsyncPoll {
        AsyncPoll { interval: Duration::from_millis(interval_ms), max_wait: None }
    }

    #[test]
    fn retry_after_wins_over_the_interval_and_nothing_goes_below_the_floor() {
        let left = Duration::from_secs(60);
        assert_eq!(poll(2000).next(None, left), PollWait::After(Duration::from_secs(2)));
        assert_eq!(
            poll(2000).next(Some(Duration::from_secs(5)), left),
            PollWait::After(Duration::from_secs(5))
        );
        assert_eq!(poll(2000).next(Some(Duration::ZERO), left), PollWait::After(MIN_POLL_INTERVAL));
    }

    #[test]
    fn no_poll_starts_past_max_wait() {
        assert_eq!(poll(2000).next(None, Duration::from_secs(2)), PollWait::Expired);
        assert_eq!(
            poll(2000).next(Some(Duration::from_secs(1)), Duration::from_secs(2)),
            PollWait::After(Duration::from_secs(1))
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let mut bad = InvalidAction::default();
        let input = AsyncPollInput {
            enabled: true,
            interval: Some(Duration::ZERO),
            max_wait: Some(Duration::from_secs(20)),
        };
        assert!(validate(&input, Some(Duration::from_secs(10)), &mut bad).is_some());
        let fields: Vec<_> = bad.violations.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["async_poll.interval", "async_poll.max_wait"]);
        let mut fine = InvalidAction::default();
        let off = validate(&AsyncPollInput::default(), None, &mut fine);
        assert!(off.is_none() && fine.is_empty(), "disabled by default");
    }
}
