//! Call-level failures as gRPC statuses: an invalid action is INVALID_ARGUMENT carrying
//! google.rpc.BadRequest with one field violation per problem, kept small enough for every
//! gRPC client's metadata limit.
use crate::action::{excerpt, InvalidAction};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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
    fn a_short_list_is_shown_whole() {
        let mut bad = InvalidAction::default();
        bad.push("url", "is required");
        bad.push("method", "is required");
        let status = invalid_argument(&bad);
        assert_eq!(status.message(), "invalid action: url: is required; method: is required");
        assert_eq!(status.get_details_bad_request().unwrap().field_violations.len(), 2);
    }
}
