//! Formatting shared by every layer's messages; it imports nothing of the crate, so any module
//! may use it.
use std::time::Duration;

/// A duration for messages: whole milliseconds, as humans write it ("10s", "1m 30s").
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis().min(u64::MAX as u128) as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_to_milliseconds() {
        assert_eq!(fmt_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(fmt_duration(Duration::from_nanos(1_500_000)), "1ms");
        assert_eq!(fmt_duration(Duration::MAX), fmt_duration(Duration::from_millis(u64::MAX)));
    }
}
