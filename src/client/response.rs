//! Reading a response: its head as the domain sees it, its body in chunks under a byte cap
//! (never a buffer past the cap), and the body's JSON / text views.
use super::http_client::ResponseBody;
use crate::action::ResponseHead;
use bytes::Bytes;
use http::{header, Response, Version};
use http_body_util::BodyExt;

/// Largest chunk handed on at once (ExecuteStream's BodyChunk limit).
pub const MAX_CHUNK: usize = 64 * 1024;
// A buffered body grows its memory budget in steps of at least one chunk.
const _: () = assert!(MAX_CHUNK as u64 == super::body_budget::MIN_STEP);

/// The head of `response`: status, reason, version and headers in order.
pub fn head_of<B>(response: &Response<B>) -> ResponseHead {
    let status = response.status();
    let reason = response
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(str::to_owned))
        .unwrap_or_default();
    let headers = response
        .headers()
        .iter()
        .map(|(name, value)| {
            (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned())
        })
        .collect();
    ResponseHead { status: status.as_u16(), reason, version: version_str(response.version()), headers }
}

fn version_str(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

/// Why a body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("response body is larger than the {0} byte limit")]
    TooLarge(u64),
    #[error("reading the response body failed: {0}")]
    Read(String),
    /// The memory budget for buffered bodies had no room for it.
    #[error(transparent)]
    Budget(#[from] super::body_budget::BudgetError),
}

/// A response body read chunk by chunk, stopping at `cap` bytes. It counts the decoded bytes
/// it hands out, so a compressed body cannot grow past the cap (a gzip bomb stops at it).
pub struct CappedBody {
    body: ResponseBody,
    cap: u64,
    read: u64,
    over: bool,
}

impl CappedBody {
    pub fn new(body: ResponseBody, cap: u64) -> Self {
        Self { body, cap, read: 0, over: false }
    }

    /// Bytes handed out so far.
    pub fn read(&self) -> u64 {
        self.read
    }

    /// The next data, at most `MAX_CHUNK` bytes; `None` at the end. When the body crosses the
    /// cap, the bytes up to the cap come first, then `TooLarge`.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        if self.over {
            return Err(BodyError::TooLarge(self.cap));
        }
        loop {
            let Some(frame) = self.body.frame().await else {
                return Ok(None);
            };
            let frame = frame.map_err(|e| BodyError::Read(super::error::chain(&*e)))?;
            let Ok(mut data) = frame.into_data() else {
                continue;
            }; // trailers
            if data.is_empty() {
                continue;
            }
            let room = self.cap - self.read;
            if data.len() as u64 > room {
                self.over = true;
                data.truncate(room as usize);
                if data.is_empty() {
                    return Err(BodyError::TooLarge(self.cap));
                }
            }
            self.read += data.len() as u64;
            return Ok(Some(data));
        }
    }
}

/// Splits `data` into pieces of at most `MAX_CHUNK` bytes without copying.
pub fn pieces(mut data: Bytes) -> impl Iterator<Item = Bytes> {
    std::iter::from_fn(
        move || {
            if data.is_empty() {
                None
            } else {
                Some(data.split_to(data.len().min(MAX_CHUNK)))
            }
        },
    )
}

/// The media type of a head, lower-cased, parameters dropped.
fn media_type(head: &ResponseHead) -> Option<String> {
    head.headers
        .iter()
        .find(|(name, _)| name == header::CONTENT_TYPE.as_str())
        .map(|(_, value)| value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

/// Deepest JSON nesting given as `body_json`. Each level is two or three messages deep in
/// google.protobuf.Value, and protobuf decoders stop at 100 (Python, C++, Java by default):
/// past this a reply would not decode in the caller. The body bytes and text still carry it.
pub const MAX_JSON_DEPTH: usize = 32;

/// Whether the arrays and objects in `json` nest at most `limit` deep. A scan of the bytes
/// (strings skipped), so a deep document is never parsed into a deep tree.
pub fn json_depth_within(json: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// The body as JSON (when the content type is JSON, it parses, and it nests at most
/// `MAX_JSON_DEPTH` deep) and as text (when the content type is textual or absent, and it is
/// UTF-8).
pub fn views(head: &ResponseHead, body: &Bytes) -> (Option<serde_json::Value>, Option<String>) {
    let media = media_type(head);
    let is_json = media.as_deref().is_some_and(|m| m == "application/json" || m.ends_with("+json"));
    let json = if is_json && !body.is_empty() && json_depth_within(body, MAX_JSON_DEPTH) {
        serde_json::from_slice(body).ok()
    } else {
        None
    };
    let textual = match media.as_deref() {
        None => true,
        Some(m) => {
            is_json
                || m.starts_with("text/")
                || m.ends_with("+xml")
                || matches!(
                    m,
                    "application/xml"
                        | "application/javascript"
                        | "application/x-www-form-urlencoded"
                        | "application/x-ndjson"
                        | "application/graphql"
                )
        }
    };
    let text = if textual { std::str::from_utf8(body).ok().map(str::to_owned) } else { None };
    (json, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(content_type: Option<&str>) -> ResponseHead {
        ResponseHead {
            status: 200,
            reason: "OK".into(),
            version: "HTTP/1.1",
            headers: content_type.map(|c| vec![("content-type".into(), c.into())]).unwrap_or_default(),
        }
    }

    #[test]
    fn json_and_text_views() {
        let body = Bytes::from_static(br#"{"a":[1,2]}"#);
        let (json, text) = views(&head(Some("application/problem+json; charset=utf-8")), &body);
        assert_eq!(json, Some(serde_json::json!({"a": [1, 2]})));
        assert_eq!(text.as_deref(), Some(r#"{"a":[1,2]}"#));
        let (json, text) = views(&head(Some("text/plain")), &body);
        assert!(json.is_none() && text.is_some());
        let (json, text) = views(&head(Some("application/octet-stream")), &body);
        assert!(json.is_none() && text.is_none());
        let (json, text) = views(&head(Some("application/json")), &Bytes::from_static(b"{bad"));
        assert!(json.is_none() && text.is_some());
        let (_, text) = views(&head(None), &Bytes::from_static(b"\xff\xfe"));
        assert!(text.is_none());
    }

    #[test]
    fn deep_json_has_no_json_view() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let json = head(Some("application/json"));
        for depth in [0, 1, 31, 32] {
            let (parsed, _) =
                views(&json, &Bytes::from(format!(r#"{{"a":"[[{{\"","b":{}}}"#, nested(depth))));
            // The object itself is one level; brackets inside strings do not count.
            assert_eq!(parsed.is_some(), depth < 32, "depth {}", depth + 1);
        }
        for depth in [33, 50, 128, 10_000] {
            let (parsed, text) = views(&json, &Bytes::from(nested(depth)));
            assert!(parsed.is_none(), "{depth}");
            assert!(text.is_some(), "{depth}");
        }
        assert!(json_depth_within(nested(32).as_bytes(), 32));
        assert!(!json_depth_within(nested(33).as_bytes(), 32));
    }

    #[test]
    fn pieces_are_bounded() {
        let data = Bytes::from(vec![7u8; MAX_CHUNK * 2 + 5]);
        let sizes: Vec<usize> = pieces(data).map(|p| p.len()).collect();
        assert_eq!(sizes, [MAX_CHUNK, MAX_CHUNK, 5]);
    }
}
