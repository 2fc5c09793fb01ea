//! A loopback upstream for benchmarks (`examples/loadgen.rs` starts it as its own process).
//!
//! `cargo run --release --example bench_upstream -- [--listen 127.0.0.1:0] [--tls-dir DIR]`
//! prints `listening on http://ADDR` on its first line (`https://` with `--tls-dir`: TLS with a
//! certificate made at start for 127.0.0.1, HTTP/1.1 or h2 by ALPN, its CA written to
//! `DIR/ca.pem`).
//!
//! - `GET|POST /bytes/{n}`: 200 with a JSON body of exactly `n` bytes (`{"d":"xxx…"}`,
//!   or plain `x`s below 8 bytes). A POST body is read to its end first.
//! - `GET /stream/{n}`: 200 with `n` bytes of `application/octet-stream`, sent in 64 KiB chunks
//!   from one shared buffer as the reader takes them (nothing is buffered per response).
//! - `?hold_ms=M` on either: wait M milliseconds (at most 60 s) before answering.
#[path = "support/serve.rs"]
mod serve;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use std::{convert::Infallible, process::ExitCode, sync::OnceLock, time::Duration};

const USAGE: &str =
    "usage: bench_upstream [--listen ADDR] [--tls-dir DIR]   (default 127.0.0.1:0, plaintext)";
const CHUNK: usize = 64 * 1024;
/// Largest `/bytes/{n}` body: bodies are built whole.
const MAX_BYTES: usize = 64 << 20;

type Body = BoxBody<Bytes, Infallible>;

fn chunk() -> Bytes {
    static CHUNK_BYTES: OnceLock<Bytes> = OnceLock::new();
    CHUNK_BYTES.get_or_init(|| Bytes::from(vec![b'x'; CHUNK])).clone()
}

/// A JSON document of exactly `n` bytes (plain `x`s when too short for JSON).
fn json_of_len(n: usize) -> Bytes {
    const WRAP: usize = r#"{"d":""}"#.len();
    if n < WRAP {
        return Bytes::from(vec![b'x'; n]);
    }
    let mut body = Vec::with_capacity(n);
    body.extend_from_slice(br#"{"d":""#);
    body.resize(n - 2, b'x');
    body.extend_from_slice(br#""}"#);
    Bytes::from(body)
}

fn full(status: StatusCode, content_type: &str, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body).boxed())
        .expect("a valid response")
}

/// `n` bytes streamed in `CHUNK`s; the next chunk is made only when hyper asks for it.
fn stream_of_len(n: u64) -> Body {
    let chunks = futures_lite_stream(n);
    StreamBody::new(chunks).boxed()
}

fn futures_lite_stream(n: u64) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send {
    let mut left = n;
    tokio_stream::iter(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let mut data = chunk();
        let take = (left as usize).min(CHUNK);
        data.truncate(take);
        left -= take as u64;
        Some(Ok(Frame::data(data)))
    }))
}

fn hold_of(query: Option<&str>) -> Option<Duration> {
    let ms = query?.split('&').find_map(|kv| kv.strip_prefix("hold_ms="))?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ms.min(60_000)))
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    // Read whatever was sent (POST bodies), so the connection stays reusable.
    let _ = body.collect().await;
    if let Some(hold) = hold_of(parts.uri.query()) {
        tokio::time::sleep(hold).await;
    }
    let path = parts.uri.path();
    let response = if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<usize>() {
            Ok(n) if n <= MAX_BYTES => full(StatusCode::OK, "application/json", json_of_len(n)),
            _ => full(StatusCode::BAD_REQUEST, "text/plain", Bytes::from_static(b"bad length")),
        }
    } else if let Some(n) = path.strip_prefix("/stream/") {
        match n.parse::<u64>() {
            Ok(n) => Response::builder()
                .header("content-type", "application/octet-stream")
                .header("content-length", n)
                .body(stream_of_len(n))
                .expect("a valid response"),
            Err(_) => full(StatusCode::BAD_REQUEST, "text/plain", Bytes::from_static(b"bad length")),
        }
    } else {
        full(StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"try /bytes/{n} or /stream/{n}"))
    };
    Ok(response)
}

#[tokio::main]
async fn main() -> ExitCode {
    serve::serve("127.0.0.1:0", USAGE, "listening on", handle).await
}
