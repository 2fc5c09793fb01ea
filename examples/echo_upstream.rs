//! A demo upstream for trying callout by hand: echoes every request back as JSON.
//!
//! `cargo run --example echo_upstream -- [--listen 127.0.0.1:8080] [--tls-dir DIR]`
//! (`--tls-dir`: HTTPS with a certificate made at start, its CA written to `DIR/ca.pem` for
//! `callout serve --ca-file DIR/ca.pem`)
//!
//! - any path: 200 with `{"method","path","query","headers":[[name,value],...],"body"}`
//! - `/status/{code}`: the same echo, with that status
//! - `/delay/{ms}`: waits that many milliseconds, then the echo with 200
//! - `/raw`: 200 with the request body as is, under the request's Content-Type
//!
//! Credential headers (`authorization`, `proxy-authorization`, `cookie`, `x-api-key`,
//! `api-key`) are echoed as `[redacted, N bytes]`: that they arrived shows, their value is not
//! printed back (the README's secrets example must not print the secret).
#[path = "support/serve.rs"]
mod serve;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use std::{convert::Infallible, process::ExitCode, time::Duration};

const USAGE: &str =
    "usage: echo_upstream [--listen ADDR] [--tls-dir DIR]   (default 127.0.0.1:8080, plaintext)";

/// Headers whose values are not echoed (names as hyper gives them, lower case).
const CREDENTIALS: [&str; 5] = ["authorization", "proxy-authorization", "cookie", "x-api-key", "api-key"];

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_owned();
    if path == "/raw" {
        let content_type = parts.headers.get(http::header::CONTENT_TYPE).cloned();
        let content_type = content_type.unwrap_or(http::HeaderValue::from_static("application/octet-stream"));
        let response = Response::builder()
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(body))
            .expect("a valid response");
        return Ok(response);
    }
    let mut status = StatusCode::OK;
    if let Some(code) = path.strip_prefix("/status/") {
        match code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(code) => status = code,
            None => status = StatusCode::BAD_REQUEST,
        }
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Err(_) => status = StatusCode::BAD_REQUEST,
        }
    }
    let headers: Vec<[String; 2]> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            let value = if CREDENTIALS.contains(&n.as_str()) {
                format!("[redacted, {} bytes]", v.len())
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            };
            [n.to_string(), value]
        })
        .collect();
    let reply = serde_json::json!({
        "method": parts.method.as_str(),
        "path": path,
        "query": parts.uri.query().unwrap_or_default(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(reply.to_string())))
        .expect("a valid response");
    Ok(response)
}

#[tokio::main]
async fn main() -> ExitCode {
    serve::serve("127.0.0.1:8080", USAGE, "echo upstream listening on", echo).await
}
