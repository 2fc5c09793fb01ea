//! The accept loop shared by the example upstreams: parse `--listen` (and `--tls-dir`), bind,
//! print where, and serve every connection (HTTP/1.1 and h2c, or over TLS HTTP/1.1 and h2 by
//! ALPN) with one handler.
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Streams one h2 connection may carry at once.
const MAX_STREAMS: u32 = 20_000;

/// What the command line asks for.
struct Args {
    listen: SocketAddr,
    /// Serve TLS with a certificate made at start; its CA is written to `DIR/ca.pem`.
    tls_dir: Option<PathBuf>,
}

/// `--listen ADDR` (else `default`; loopback only) and `--tls-dir DIR` from the command line.
fn args(default: &str, usage: &str) -> Result<Args, String> {
    let mut addr = default.to_owned();
    let mut tls_dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" | "-l" => addr = args.next().ok_or("--listen needs an address")?,
            "--tls-dir" => tls_dir = Some(PathBuf::from(args.next().ok_or("--tls-dir needs a directory")?)),
            "--help" | "-h" => return Err(usage.to_owned()),
            other => match other.strip_prefix("--listen=") {
                Some(value) => addr = value.to_owned(),
                None => return Err(format!("unknown argument {other:?}\n{usage}")),
            },
        }
    }
    let listen: SocketAddr = addr.parse().map_err(|e| format!("--listen {addr:?}: {e}"))?;
    if !listen.ip().is_loopback() {
        return Err("example upstreams listen on loopback only".to_owned());
    }
    Ok(Args { listen, tls_dir })
}

/// A CA and a leaf for 127.0.0.1 and localhost made now; the CA goes to `dir/ca.pem` for the
/// client to trust (`callout serve --ca-file DIR/ca.pem`).
fn tls_acceptor(dir: &Path) -> Result<TlsAcceptor, String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let err = |e: &dyn std::fmt::Display| format!("making the test certificate: {e}");
    let ca_key = KeyPair::generate().map_err(|e| err(&e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(|e| err(&e))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().map_err(|e| err(&e))?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .and_then(|p| p.signed_by(&leaf_key, &issuer))
        .map_err(|e| err(&e))?;
    std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    std::fs::write(dir.join("ca.pem"), ca.pem()).map_err(|e| err(&e))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .map_err(|e| err(&e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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
    let args = match args(default, usage) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let tls = match args.tls_dir.as_deref().map(tls_acceptor).transpose() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = args.listen;
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    println!("{banner} {}://{local}", if tls.is_some() { "https" } else { "http" });
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
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(handler);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // Many streams on one h2 connection: a load test may hold thousands at once.
            builder.http2().max_concurrent_streams(MAX_STREAMS);
            let _ = match tls {
                Some(tls) => match tls.accept(tcp).await {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                    Err(_) => return,
                },
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
        });
    }
}
