//! HTTPS upstreams: rustls with ALPN (h2 and http/1.1), the TLS handshake timed, a server-level
//! extra CA trusted, an untrusted certificate failing as TLS, and the per-action TLS options:
//! `ca_pem`, `insecure_skip_verify`, client certificates against an mTLS upstream.
use crate::support::*;
use callout::{exec::ExecSettings, pb};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    sync::Arc,
};
use tokio::net::TcpListener;

/// A CA made at test time and a leaf for 127.0.0.1 and localhost signed by it.
struct TestPki {
    ca_pem: String,
    ca: CertificateDer<'static>,
    leaf: CertificateDer<'static>,
    leaf_key: PrivateKeyDer<'static>,
    /// A client certificate (clientAuth) signed by the same CA, and its key, PEM.
    client_cert_pem: String,
    client_key_pem: String,
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
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["workflow-engine".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &issuer).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        ca: ca_cert.der().clone(),
        leaf: leaf.der().clone(),
        leaf_key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        client_cert_pem: client.pem(),
        client_key_pem: client_key.serialize_pem(),
    }
}

/// An HTTPS upstream offering `alpn`, answering "secure" to every request.
async fn tls_upstream(pki: &TestPki, alpn: &[&[u8]]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (addr, task, _) = tls_upstream_with(pki, alpn, false).await;
    (addr, task)
}

/// An HTTPS upstream; with `require_client_cert` it demands a client certificate signed by the
/// test CA (mutual TLS). The counter says how many TCP connections it accepted.
async fn tls_upstream_with(
    pki: &TestPki,
    alpn: &[&[u8]],
    require_client_cert: bool,
) -> (SocketAddr, tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(vec![pki.leaf.clone()], pki.leaf_key.clone_key()).unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            counter.fetch_add(1, Ordering::SeqCst);
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
    (addr, task, accepted)
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

fn with_tls(url: &str, tls: pb::TlsOptions) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { tls: Some(tls), ..request("GET", url) }
}

#[tokio::test]
async fn action_ca_pem_trusts_an_upstream_the_server_does_not() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");
    let tls = pb::TlsOptions { ca_pem: pki.ca_pem.clone(), ..Default::default() };
    let resp = sidecar.execute(with_tls(&url, tls)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body, b"secure");

    // The trust was the action's alone: the next action without it does not ride its pool.
    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls, "{resp:?}");
    task.abort();
}

#[tokio::test]
async fn insecure_skip_verify_accepts_an_unknown_ca_for_that_action_only() {
    let pki = pki();
    let (addr, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");
    let tls = pb::TlsOptions { insecure_skip_verify: true, ..Default::default() };
    let resp = sidecar.execute(with_tls(&url, tls)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body, b"secure");

    let resp = sidecar.execute(request("GET", &url)).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls, "verification is back on: {resp:?}");
    task.abort();
}

#[tokio::test]
async fn mtls_upstream_needs_the_client_certificate() {
    let pki = pki();
    let (addr, task, _) = tls_upstream_with(&pki, &[b"http/1.1"], true).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");

    let without = pb::TlsOptions { ca_pem: pki.ca_pem.clone(), ..Default::default() };
    let resp = sidecar.execute(with_tls(&url, without)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls, "{resp:?}");
    let message = resp.error.unwrap().message;
    assert!(message.to_lowercase().contains("certificate"), "{message}");

    let with = pb::TlsOptions {
        ca_pem: pki.ca_pem.clone(),
        client_cert_pem: pki.client_cert_pem.clone(),
        client_key_pem: pki.client_key_pem.clone(),
        ..Default::default()
    };
    let resp = sidecar.execute(with_tls(&url, with)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body, b"secure");
    task.abort();
}

#[tokio::test]
async fn bad_client_pem_is_invalid_and_nothing_connects() {
    let other = pki();
    let pki = pki();
    let (addr, task, accepted) = tls_upstream_with(&pki, &[b"http/1.1"], true).await;
    let sidecar = Sidecar::start().await;
    let url = format!("https://{addr}/");
    let cases = [
        ("not a key".to_owned(), "tls.client_key_pem"),
        // A real key, but not the certificate's.
        (other.client_key_pem.clone(), "tls.client_key_pem"),
    ];
    for (key, field) in cases {
        let tls = pb::TlsOptions {
            ca_pem: pki.ca_pem.clone(),
            client_cert_pem: pki.client_cert_pem.clone(),
            client_key_pem: key.clone(),
            ..Default::default()
        };
        let status = sidecar.try_execute(with_tls(&url, tls)).await.unwrap_err();
        assert_eq!(violated_fields(&status), [field]);
        assert!(!status.message().contains("PRIVATE KEY-----"), "{status:?}");
    }
    let tls = pb::TlsOptions { client_cert_pem: pki.client_cert_pem.clone(), ..Default::default() };
    let status = sidecar.try_execute(with_tls(&url, tls)).await.unwrap_err();
    assert_eq!(violated_fields(&status), ["tls.client_key_pem"]);
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "nothing may connect for an invalid action");
    task.abort();
}
