//! Listener protection: the bearer token on action calls (health stays open), a Unix domain
//! socket listener with its file mode, and TLS / mutual TLS on the gRPC listener.
use crate::support::*;
use callout::{
    exec::Executor,
    pb::{self, http_action_service_client::HttpActionServiceClient},
    server::{serve_with, Listener, ServerOptions, ServerTls},
};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};
use tokio::net::{TcpListener, UnixStream};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

const TOKEN: &str = "listener-t0ken";

/// Starts the real server on `listener` with `options`; it stops when the test ends.
fn spawn_server(listener: Listener, options: ServerOptions) -> tokio::task::JoinHandle<()> {
    let executor = Executor::new(test_settings()).unwrap();
    tokio::spawn(async move {
        serve_with(listener, executor, options, std::future::pending()).await.unwrap();
    })
}

async fn tcp_server(options: ServerOptions) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (format!("{addr}"), spawn_server(Listener::Tcp(listener), options))
}

fn with_token<T>(mut request: tonic::Request<T>, header: &str) -> tonic::Request<T> {
    request.metadata_mut().insert("authorization", header.parse().unwrap());
    request
}

/// A gRPC channel over the Unix socket at `path`.
async fn uds_channel(path: PathBuf) -> Channel {
    // The URI is required by the API but unused: the connector dials the socket.
    Endpoint::from_static("http://callout.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { UnixStream::connect(path).await.map(TokioIo::new) }
        }))
        .await
        .unwrap()
}

async fn health_of(channel: Channel) -> ServingStatus {
    let check = HealthCheckRequest { service: String::new() };
    HealthClient::new(channel).check(check).await.unwrap().into_inner().status()
}

#[tokio::test]
async fn action_calls_need_the_bearer_token_and_health_stays_open() {
    let upstream = Upstream::fixed(200, "ok").await;
    let (addr, _server) =
        tcp_server(ServerOptions { auth_token: Some(TOKEN.into()), ..ServerOptions::default() }).await;
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = HttpActionServiceClient::new(channel.clone());

    let missing = client.execute(request("GET", &upstream.url("/"))).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(missing.message().contains("bearer token"), "{}", missing.message());
    let wrong = client
        .execute(with_token(tonic::Request::new(request("GET", &upstream.url("/"))), "Bearer nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(!wrong.message().contains("nope"), "the presented token is not echoed");
    let stream = client.execute_stream(request("GET", &upstream.url("/"))).await.unwrap_err();
    assert_eq!(stream.code(), Code::Unauthenticated);
    assert_eq!(upstream.hits(), 0, "unauthenticated calls run nothing");

    let ok = client
        .execute(with_token(
            tonic::Request::new(request("GET", &upstream.url("/"))),
            &format!("Bearer {TOKEN}"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.outcome(), pb::Outcome::Succeeded);
    assert_eq!(upstream.hits(), 1);
    assert_eq!(health_of(channel).await, ServingStatus::Serving, "health needs no token");
}

#[tokio::test]
async fn a_unix_socket_listener_serves_grpc_clients_with_its_file_mode() {
    let dir = std::env::temp_dir().join(format!("callout-uds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("callout.sock");
    std::fs::write(&path, "not a socket").unwrap();
    assert!(Listener::bind_unix(path.clone(), 0o600).is_err(), "a regular file is not replaced");
    std::fs::remove_file(&path).unwrap();

    let listener = Listener::bind_unix(path.clone(), 0o600).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let _server = spawn_server(listener, ServerOptions::default());

    let channel = uds_channel(path.clone()).await;
    let upstream = Upstream::fixed(200, "over uds").await;
    let resp = HttpActionServiceClient::new(channel.clone())
        .execute(request("GET", &upstream.url("/")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("over uds"));
    assert_eq!(health_of(channel).await, ServingStatus::Serving);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A CA, a server leaf for 127.0.0.1 / localhost, and a client leaf, all PEM.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(vec!["127.0.0.1".into(), "localhost".into()]),
        client: leaf(vec!["engine.test".into()]),
    }
}

async fn tls_channel(
    addr: &str,
    pki: &Pki,
    client_identity: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca)).domain_name("localhost");
    if client_identity {
        tls = tls.identity(Identity::from_pem(&pki.client.0, &pki.client.1));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test]
async fn tls_and_mutual_tls_on_the_grpc_listener() {
    let pki = pki();
    let upstream = Upstream::fixed(200, "ok").await;
    let tls =
        ServerTls { cert_pem: pki.server.0.clone(), key_pem: pki.server.1.clone(), client_ca_pem: None };
    let (addr, _server) =
        tcp_server(ServerOptions { tls: Some(tls.clone()), ..ServerOptions::default() }).await;
    let channel = tls_channel(&addr, &pki, false).await.unwrap();
    let resp =
        HttpActionServiceClient::new(channel).execute(request("GET", &upstream.url("/"))).await.unwrap();
    assert_eq!(resp.into_inner().outcome(), pb::Outcome::Succeeded);
    let plaintext = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    assert!(HttpActionServiceClient::new(plaintext)
        .execute(request("GET", &upstream.url("/")))
        .await
        .is_err());

    // Mutual TLS: a client without a certificate is turned away at the handshake.
    let mutual = ServerTls { client_ca_pem: Some(pki.ca.clone()), ..tls };
    let (addr, _server) = tcp_server(ServerOptions { tls: Some(mutual), ..ServerOptions::default() }).await;
    let anonymous = match tls_channel(&addr, &pki, false).await {
        Ok(channel) => {
            HttpActionServiceClient::new(channel).execute(request("GET", &upstream.url("/"))).await.err()
        }
        Err(_) => None,
    };
    if let Some(status) = anonymous {
        assert_ne!(status.code(), Code::Ok);
    }
    let channel = tls_channel(&addr, &pki, true).await.unwrap();
    let resp =
        HttpActionServiceClient::new(channel).execute(request("GET", &upstream.url("/"))).await.unwrap();
    assert_eq!(resp.into_inner().outcome(), pb::Outcome::Succeeded);
    assert_eq!(upstream.hits(), 2, "only the authenticated calls ran");
}

/// The `callout serve` binary with `--listen unix:PATH`, `--unix-socket-mode` and
/// `--auth-token-file`: the flags reach the server.
#[tokio::test]
async fn serve_flags_for_a_protected_unix_socket() {
    let dir = std::env::temp_dir().join(format!("callout-serve-uds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (socket, token_file) = (dir.join("c.sock"), dir.join("token"));
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_callout"))
        .args(["serve", "--allow-private-networks", "--no-metrics", "--store", "off"])
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(["--unix-socket-mode", "660", "--auth-token-file"])
        .arg(&token_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    // The mode is set right after bind: wait for both.
    let mode = |p: &PathBuf| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).ok();
    while mode(&socket) != Some(0o660) && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(mode(&socket), Some(0o660));
    let channel = uds_channel(socket.clone()).await;
    let upstream = Upstream::fixed(200, "ok").await;
    let mut client = HttpActionServiceClient::new(channel);
    let refused = client.execute(request("GET", &upstream.url("/"))).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let req = with_token(tonic::Request::new(request("GET", &upstream.url("/"))), &format!("Bearer {TOKEN}"));
    assert_eq!(client.execute(req).await.unwrap().into_inner().outcome(), pb::Outcome::Succeeded);
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}
