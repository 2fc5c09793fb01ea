//! Call-level failures as gRPC statuses: an invalid action is INVALID_ARGUMENT carrying
//! google.rpc.BadRequest with one field violation per problem, kept small enough for every
//! gRPC client's metadata limit; a refusal to try later (RESOURCE_EXHAUSTED, UNAVAILABLE)
//! carries google.rpc.RetryInfo and ErrorInfo. Reflection serves google/rpc's descriptors, so
//! grpcurl and other reflection clients print the details.
use crate::action::{excerpt, InvalidAction};
use std::{collections::HashMap, time::Duration};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every google.rpc.ErrorInfo callout sends.
pub const ERROR_DOMAIN: &str = "callout";

/// Most violations a status carries; the message counts the rest ("and K more").
pub const MAX_VIOLATIONS: usize = 20;
/// The message and the details together, as sent (the message percent-encoded, the details in
/// base64), stay under this. gRPC core (Python, C++, Ruby, PHP …) refuses response metadata
/// past 8 KiB by default and reports RESOURCE_EXHAUSTED, which callout documents as "queue
/// full": a big violation list must not look like that.
pub const STATUS_BUDGET: usize = 7 * 1024;
/// Longest field path and description shown, in bytes (a key or value quoted in either is
/// already an excerpt; this is the backstop).
const MAX_FIELD: usize = 128;
const MAX_DESCRIPTION: usize = 256;
/// Room kept for the "and K more" tail, the code and the details' type URL.
const TAIL: usize = 160;

pub fn invalid_argument(invalid: &InvalidAction) -> Status {
    let mut details = ErrorDetails::new();
    let mut message = String::from("invalid action: ");
    let mut used = message.len() * 7 / 3;
    let mut shown = 0;
    for v in invalid.violations.iter().take(MAX_VIOLATIONS) {
        let field = excerpt(&v.field, MAX_FIELD);
        let description = excerpt(&v.description, MAX_DESCRIPTION);
        let line = format!("{}{field}: {description}", if shown > 0 { "; " } else { "" });
        // The details are a google.rpc.Status in base64: the message again, and a
        // BadRequest.FieldViolation of two length-prefixed strings inside a length-prefixed
        // message (at most 3 bytes of tag and length each).
        let detail = (line.len() + field.len() + description.len() + 9) * 4 / 3 + 1;
        let cost = wire_len(&line) + detail;
        if used + cost + TAIL > STATUS_BUDGET {
            break;
        }
        used += cost;
        message.push_str(&line);
        details.add_bad_request_violation(field.into_owned(), description.into_owned());
        shown += 1;
    }
    let more = invalid.violations.len() - shown;
    if more > 0 {
        message.push_str(&format!("; and {more} more"));
    }
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// RESOURCE_EXHAUSTED: no room for the call now; nothing was done. Carries RetryInfo
/// (`retry_after`: when calling again is worth it) and ErrorInfo (`reason`, an UPPER_SNAKE
/// constant such as `QUEUE_FULL`, domain `callout`, and `metadata`, e.g. the limits hit).
pub fn resource_exhausted(
    reason: &str,
    message: impl Into<String>,
    retry_after: Duration,
    metadata: HashMap<String, String>,
) -> Status {
    retry_later(Code::ResourceExhausted, reason, message, retry_after, metadata)
}

/// UNAVAILABLE: this server cannot take the call (e.g. it is draining); nothing was done.
/// Carries RetryInfo (`retry_after`) and ErrorInfo (`reason`, domain `callout`).
pub fn unavailable(reason: &str, message: impl Into<String>, retry_after: Duration) -> Status {
    retry_later(Code::Unavailable, reason, message, retry_after, HashMap::new())
}

fn retry_later(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    retry_after: Duration,
    metadata: HashMap<String, String>,
) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(retry_after));
    details.set_error_info(reason, ERROR_DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// tonic's answer to a request over the decode limit (OUT_OF_RANGE, before the service runs)
/// as INVALID_ARGUMENT: the caller sent too much. Only that answer, recognised by its code and
/// text in a trailers-only response, is rewritten.
pub fn oversized_request<B>(mut response: http::Response<B>) -> http::Response<B> {
    const TONIC: &str = "Error, decoded message length too large: ";
    let headers = response.headers_mut();
    let Some(status) = Status::from_header_map(headers) else {
        return response;
    };
    let Some(detail) = status.message().strip_prefix(TONIC).filter(|_| status.code() == Code::OutOfRange)
    else {
        return response;
    };
    let status = Status::invalid_argument(format!(
        "the request message is too large (server.max_request_bytes): {detail}"
    ));
    // Writing a short ASCII message cannot fail; if it did, tonic's answer stands.
    let mut rewritten = headers.clone();
    if status.add_header(&mut rewritten).is_ok() {
        *headers = rewritten;
    }
    response
}

/// Bytes of `text` as tonic writes grpc-message: printable ASCII as is, but for space and
/// `"#%<>?`{}`, which like every other byte become `%XX`.
fn wire_len(text: &str) -> usize {
    text.bytes().map(|b| if (0x21..0x7f).contains(&b) && !b"\"#%<>?`{}".contains(&b) { 1 } else { 3 }).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_long_violations_stay_in_budget() {
        let mut bad = InvalidAction::default();
        for i in 0..300 {
            bad.push(format!("headers[{i}].name{}", "é".repeat(500)), "ü".repeat(5000));
        }
        let status = invalid_argument(&bad);
        let base64 = status.details().len().div_ceil(3) * 4;
        assert!(wire_len(status.message()) + base64 <= STATUS_BUDGET, "{}", status.message().len());
        assert!(status.message().ends_with("more"), "{}", status.message());
        let shown = status.get_details_bad_request().unwrap().field_violations.len();
        assert!((1..=MAX_VIOLATIONS).contains(&shown), "{shown}");
        assert!(status.message().ends_with(&format!("and {} more", 300 - shown)), "{}", status.message());
    }

    #[test]
    fn refusals_say_when_to_retry_and_why() {
        let metadata = HashMap::from([("max_queued".to_owned(), "8".to_owned())]);
        let full = resource_exhausted("QUEUE_FULL", "queue full", Duration::from_millis(1500), metadata);
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(full.message(), "queue full");
        let details = full.get_error_details();
        assert_eq!(details.retry_info().unwrap().retry_delay, Some(Duration::from_millis(1500)));
        let info = details.error_info().unwrap();
        assert_eq!((info.reason.as_str(), info.domain.as_str()), ("QUEUE_FULL", ERROR_DOMAIN));
        assert_eq!(info.metadata["max_queued"], "8");

        let draining = unavailable("DRAINING", "shutting down", Duration::from_secs(1));
        assert_eq!(draining.code(), Code::Unavailable);
        let details = draining.get_error_details();
        assert_eq!(details.retry_info().unwrap().retry_delay, Some(Duration::from_secs(1)));
        assert_eq!(details.error_info().unwrap().reason, "DRAINING");
    }

    #[test]
    fn a_short_list_is_shown_whole() {
        let mut bad = InvalidAction::default();
        bad.push("url", "is required");
        bad.push("method", "is required");
        let status = invalid_argument(&bad);
        assert_eq!(status.message(), "invalid action: url: is required; method: is required");
        assert_eq!(status.get_details_bad_request().unwrap().field_violations.len(), 2);
    }
}
