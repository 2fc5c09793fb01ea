//! A loopback upstream for benchmarks (`examples/loadgen.rs` starts it as its own process).
//!
//! `cargo run --release --example bench_upstream -- [--listen 127.0.0.1:0]`
//! prints `listening on http://ADDR` on its first line.
//!
//! - `GET|POST /bytes/{n}`: 200 with a JSON body of exactly `n` bytes (`{"d":"xxx…"}`,
//!   or plain `x`s below 8 bytes). A POST body is read to its end first.
//! - `GET /stream/{n}`: 200 with `n` bytes of `application/octet-stream`, sent in 64 KiB chunks
//!   from one shared buffer as the reader takes them (nothing is buffered per response).
//! - `?hold_ms=M` on either: wait M milliseconds (at most 60 s) before answering.
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{convert::Infallible, net::SocketAddr, process::ExitCode, sync::OnceLock, time::Duration};
use tokio::net::TcpListener;

const USAGE: &str = "usage: bench_upstream [--listen ADDR]   (default 127.0.0.1:0)";
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

fn listen_addr() -> Result<SocketAddr, String> {
    let mut addr = "127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" | "-l" => addr = args.next().ok_or("--listen needs an address")?,
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let addr: SocketAddr = addr.parse().map_err(|e| format!("--listen {addr:?}: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err("bench_upstream listens on loopback only".to_owned());
    }
    Ok(addr)
}

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match listen_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!("listening on http://{local}");
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handle))
                .await;
        });
    }
}
