//! A demo upstream for trying callout by hand: echoes every request back as JSON.
//!
//! `cargo run --example echo_upstream -- [--listen 127.0.0.1:8080]`
//!
//! - any path: 200 with `{"method","path","query","headers":[[name,value],...],"body"}`
//! - `/status/{code}`: the same echo, with that status
//! - `/delay/{ms}`: waits that many milliseconds, then the echo with 200
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{convert::Infallible, net::SocketAddr, process::ExitCode, time::Duration};
use tokio::net::TcpListener;

const USAGE: &str = "usage: echo_upstream [--listen ADDR]   (default 127.0.0.1:8080)";

fn listen_addr() -> Result<SocketAddr, String> {
    let mut addr = "127.0.0.1:8080".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" | "-l" => addr = args.next().ok_or("--listen needs an address")?,
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => match other.strip_prefix("--listen=") {
                Some(value) => addr = value.to_owned(),
                None => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            },
        }
    }
    addr.parse().map_err(|e| format!("--listen {addr:?}: {e}"))
}

async fn echo(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path().to_owned();
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
        .map(|(n, v)| [n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()])
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
    println!("echo upstream listening on http://{local}");
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            // HTTP/1.1 and h2c both, so callout's pooled client can use either.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(echo))
                .await;
        });
    }
}
