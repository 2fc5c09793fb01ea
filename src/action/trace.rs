//! W3C trace context: the caller's `traceparent` / `tracestate`, carried by an action so each
//! outbound attempt continues the caller's trace (same trace id, a new span id of its own).
use std::fmt::Write as _;

/// A parsed `traceparent` (version 00) and its `tracestate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lower-case hex digits, not all zero.
    pub trace_id: String,
    /// The caller's span: 16 lower-case hex digits, not all zero.
    pub parent_id: String,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// `tracestate`, passed on as is.
    pub state: Option<String>,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceContext {
    /// Parses a `traceparent` header; anything malformed is `None` (and then not propagated,
    /// as the W3C spec asks).
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace_id, parent_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may add more after them.
        if !is_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        if !is_hex(trace_id, 32) || trace_id.bytes().all(|b| b == b'0') {
            return None;
        }
        if !is_hex(parent_id, 16) || parent_id.bytes().all(|b| b == b'0') || !is_hex(flags, 2) {
            return None;
        }
        let state = tracestate.map(str::trim).filter(|s| !s.is_empty() && s.len() <= 512).map(str::to_owned);
        Some(Self {
            trace_id: trace_id.to_owned(),
            parent_id: parent_id.to_owned(),
            flags: u8::from_str_radix(flags, 16).ok()?,
            state,
        })
    }

    /// A `traceparent` for one outbound attempt: this trace, with `span_id` (the attempt's own
    /// exported span) or else a new random span id.
    pub fn child_traceparent(&self, span_id: Option<&str>) -> String {
        let mut out = String::with_capacity(55);
        match span_id.filter(|id| is_hex(id, 16)) {
            Some(id) => {
                let _ = write!(out, "00-{}-{id}-{:02x}", self.trace_id, self.flags);
            }
            None => {
                let _ = write!(
                    out,
                    "00-{}-{:016x}-{:02x}",
                    self.trace_id,
                    fastrand::u64(1..=u64::MAX),
                    self.flags
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_continues_a_trace() {
        let t = TraceContext::parse(PARENT, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
        assert_eq!(
            t.child_traceparent(Some("1111111111111111")),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"
        );
        let child = t.child_traceparent(None);
        let parsed = TraceContext::parse(&child, None).unwrap();
        assert_eq!(parsed.trace_id, t.trace_id);
        assert_ne!(parsed.parent_id, t.parent_id, "a new span id");
        assert!(child.ends_with("-01"));
    }

    #[test]
    fn malformed_parents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad}");
        }
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", None)
            .is_some());
    }
}
