//! Compressed response bodies: decoded before parsing and before the body cap counts them, so
//! a small compressed body that decodes past `max_response_bytes` ends BODY_TOO_LARGE.
use crate::support::*;
use bytes::Bytes;
use callout::pb;
use flate2::{
    write::{GzEncoder, ZlibEncoder},
    Compression,
};
use http::Response;
use std::io::Write;

fn gzip(data: &[u8]) -> Bytes {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap().into()
}

/// HTTP's "deflate" is the zlib format (RFC 9110 8.4.1.2).
fn deflate(data: &[u8]) -> Bytes {
    let mut enc = ZlibEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap().into()
}

fn encoded(encoding: &'static str, content_type: &'static str, data: Bytes) -> Response<UpBody> {
    Response::builder()
        .header("content-type", content_type)
        .header("content-encoding", encoding)
        .body(body(data))
        .unwrap()
}

#[tokio::test]
async fn gzip_body_is_decoded_and_parsed() {
    let payload = gzip(br#"{"order":42,"items":["a","b"]}"#);
    let upstream = Upstream::start(move |_| {
        let p = payload.clone();
        async move { encoded("gzip", "application/json", p) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let response = resp.response.unwrap();
    // REPLY_BODY_AUTO: the parsed JSON stands for the decoded bytes.
    assert!(response.body.is_empty() && response.body_text.is_none(), "{response:?}");
    let json = response.body_json.expect("body_json");
    let Some(prost_types::value::Kind::StructValue(s)) = json.kind else { panic!("{json:?}") };
    assert!(matches!(s.fields["order"].kind, Some(prost_types::value::Kind::NumberValue(n)) if n == 42.0));
    // The decoded body's framing headers are gone: they described the compressed bytes.
    assert!(!response.headers.iter().any(|h| h.name == "content-encoding"), "{:?}", response.headers);

    let accept = upstream.seen()[0].header("accept-encoding").expect("Accept-Encoding sent by default");
    for coding in ["gzip", "deflate", "br", "zstd"] {
        assert!(accept.contains(coding), "{accept}");
    }
}

#[tokio::test]
async fn deflate_body_is_decoded() {
    let payload = deflate(b"plain words, deflated");
    let upstream = Upstream::start(move |_| {
        let p = payload.clone();
        async move { encoded("deflate", "text/plain", p) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &upstream.url("/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("plain words, deflated"));
}

#[tokio::test]
async fn callers_accept_encoding_is_kept() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.headers = vec![kv("Accept-Encoding", "identity")];
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(upstream.seen()[0].header_values("accept-encoding"), ["identity"]);
}

#[tokio::test]
async fn gzip_bomb_stops_at_the_decoded_cap() {
    // 50 MiB of zeros compress to about 50 KiB: the cap must count what comes out.
    let bomb = gzip(&vec![0u8; 50 << 20]);
    assert!(bomb.len() < 1 << 20);
    let upstream = Upstream::start(move |_| {
        let b = bomb.clone();
        async move { encoded("gzip", "application/octet-stream", b) }
    })
    .await;
    let sidecar = Sidecar::start().await;
    let mut req = request("GET", &upstream.url("/"));
    req.max_response_bytes = 1 << 20;
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::BodyTooLarge, "{resp:?}");
    let response = resp.response.unwrap();
    assert!(response.truncated);
    assert_eq!(response.body.len(), 1 << 20);
    // The connection's timings still reach the attempt through the decoding layer.
    assert!(resp.attempts[0].remote_address.starts_with("127.0.0.1:"), "{:?}", resp.attempts[0]);
}
