//! HTTPS upstreams: rustls with ALPN (h2 and http/1.1), the TLS handshake timed, a server-level
//! extra CA trusted, and an untrusted certificate failing as TLS.
use crate::support::*;
use callout::{exec::ExecSettings, pb};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::{net::SocketAddr, sync::Arc};
use tokio::net::TcpListener;

/// A CA made at test time and a leaf for 127.0.0.1 and localhost signed by it.
struct TestPki {
    ca_pem: String,
    leaf: CertificateDer<'static>,
    leaf_key: PrivateKeyDer<'static>,
}

fn pki() -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        leaf: leaf.der().clone(),
        leaf_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    }
}

/// An HTTPS upstream offering `alpn`, answering "secure" to every request.
async fn tls_upstream(pki: &TestPki, alpn: &[&[u8]]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.leaf.clone()], pki.leaf_key.clone_key())
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service =
                    hyper::service::service_fn(|_req| async { Ok::<_, std::io::Error>(text(200, "secure")) });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, task)
}

fn trusting(ca_pem: &str, http2: bool) -> ExecSettings {
    let mut settings = ExecSettings::default();
    settings.client.extra_ca_pem = Some(ca_pem.to_owned());
    settings.client.http2 = http2;
    settings
}

#[tokio::test]
async fn https_negotiates_h2_by_alpn_and_times_the_handshake() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start_with(trusting(&pki.ca_pem, true)).await;
    let resp = sidecar.execute(request("GET", &format!("https://{addr}/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    let response = resp.response.as_ref().unwrap();
    assert_eq!(response.http_version, "HTTP/2.0");
    assert_eq!(response.body, b"secure");
    let timing = resp.attempts[0].timing.as_ref().unwrap();
    let tls = timing.tls.as_ref().unwrap();
    assert!(tls.seconds > 0 || tls.nanos > 0, "TLS handshake measured: {timing:?}");

    // The second action rides the pooled h2 connection: no new handshake.
    let again = sidecar.execute(request("GET", &format!("https://{addr}/"))).await;
    let timing = again.attempts[0].timing.as_ref().unwrap();
    assert!(timing.reused_connection, "{timing:?}");
    assert_eq!(timing.tls.as_ref().unwrap().nanos, 0);
    task.abort();
}

#[tokio::test]
async fn https_falls_back_to_http1_when_h2_is_off() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start_with(trusting(&pki.ca_pem, false)).await;
    let resp = sidecar.execute(request("GET", &format!("https://localhost:{}/", addr.port()))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().http_version, "HTTP/1.1");
    task.abort();
}

#[tokio::test]
async fn untrusted_certificate_fails_as_tls() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"http/1.1"]).await;
    let sidecar = Sidecar::start().await;
    let resp = sidecar.execute(request("GET", &format!("https://{addr}/"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls);
    let message = &resp.error.unwrap().message;
    assert!(message.contains("certificate"), "{message}");
    task.abort();
}
