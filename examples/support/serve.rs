//! The accept loop shared by the example upstreams: parse `--listen`, bind, print where, and
//! serve every connection (HTTP/1.1 and h2c) with one handler.
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::{convert::Infallible, future::Future, net::SocketAddr, process::ExitCode, time::Duration};
use tokio::net::TcpListener;

/// `--listen ADDR` from the command line, else `default`; loopback only.
fn listen_addr(default: &str, usage: &str) -> Result<SocketAddr, String> {
    let mut addr = default.to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" | "-l" => addr = args.next().ok_or("--listen needs an address")?,
            "--help" | "-h" => return Err(usage.to_owned()),
            other => match other.strip_prefix("--listen=") {
                Some(value) => addr = value.to_owned(),
                None => return Err(format!("unknown argument {other:?}\n{usage}")),
            },
        }
    }
    let addr: SocketAddr = addr.parse().map_err(|e| format!("--listen {addr:?}: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err("example upstreams listen on loopback only".to_owned());
    }
    Ok(addr)
}

/// Serves `handler` on the `--listen` address until killed; prints `{banner} http://ADDR`
/// first, so a parent process can read the port it got.
pub async fn serve<H, F, B>(default: &str, usage: &str, banner: &str, handler: H) -> ExitCode
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let addr = match listen_addr(default, usage) {
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
    println!("{banner} http://{local}");
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
        let _ = tcp.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handler))
                .await;
        });
    }
}
