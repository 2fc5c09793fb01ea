//! Proxies: CONNECT tunnels for https targets (with Proxy-Authorization from the proxy URL's
//! credentials), a refused CONNECT, plain http forwarded in absolute form, the server's default
//! proxy and NO_PROXY (names and CIDR ranges), an https proxy (TLS to the proxy itself), and
//! SOCKS5 (callout resolves and egress-checks the target) and SOCKS5h (the proxy resolves).
//! The proxies are tiny loopback servers written here.
use crate::support::*;
use callout::{
    action::ProxyUrl,
    client::{NoProxy, Proxies},
    exec::ExecSettings,
    pb,
};
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A CONNECT proxy on loopback that records each request head. With `answer` 200 it opens the
/// tunnel to the requested address and copies bytes both ways; otherwise it answers `answer`
/// and closes.
struct ConnectProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    _task: AbortOnDrop,
}

impl ConnectProxy {
    async fn start(answer: u16) -> Self {
        Self::start_with_tls(answer, None).await
    }

    /// With `tls`, the proxy speaks TLS itself (an `https://` proxy) before reading CONNECT.
    async fn start_with_tls(answer: u16, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let recorded = heads.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let recorded = recorded.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = match tls {
                        Some(tls) => match tls.accept(client).await {
                            Ok(client) => tunnel(client, answer, recorded).await,
                            Err(_) => Ok(()),
                        },
                        None => tunnel(client, answer, recorded).await,
                    };
                });
            }
        });
        Self { addr, heads, _task: AbortOnDrop(task) }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn tunnel<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    answer: u16,
    recorded: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    // The client sends nothing past the head before the answer, so a plain read loop is enough.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") {
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    recorded.lock().unwrap().push(head.clone());
    if answer != 200 {
        let reply = format!(
            "HTTP/1.1 {answer} Nope\r\nProxy-Authenticate: Basic realm=\"p\"\r\nContent-Length: 0\r\n\r\n"
        );
        client.write_all(reply.as_bytes()).await?;
        return Ok(());
    }
    let target = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
    let mut upstream = TcpStream::connect(target).await?;
    client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

fn via(url: &str, proxy: &str) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        proxy: Some(Box::new(pb::ProxyOptions { url: proxy.into() })),
        ..request("GET", url)
    }
}

fn trusting(pki: &TestPki) -> ExecSettings {
    let mut settings = test_settings();
    settings.client.extra_ca_pem = Some(pki.ca_pem.clone());
    settings
}

#[tokio::test]
async fn https_goes_through_a_connect_tunnel_with_proxy_credentials() {
    let pki = pki();
    let (upstream, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let proxy = ConnectProxy::start(200).await;
    let sidecar = Sidecar::start_with(trusting(&pki)).await;
    let proxy_url = proxy.url().replace("http://", "http://user:s3cret@");
    let resp = sidecar.execute(via(&format!("https://{upstream}/"), &proxy_url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.as_ref().unwrap().body_text.as_deref(), Some("secure"));
    // TLS ran end to end through the tunnel, with h2 negotiated with the target itself.
    assert_eq!(resp.response.unwrap().http_version, "HTTP/2.0");
    assert_eq!(resp.attempts[0].remote_address, proxy.addr.to_string());

    let heads = proxy.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = &heads[0];
    assert!(head.starts_with(&format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n", upstream.port())), "{head}");
    assert!(head.contains(&format!("Host: 127.0.0.1:{}\r\n", upstream.port())), "{head}");
    // base64("user:s3cret")
    assert!(head.contains("Proxy-Authorization: Basic dXNlcjpzM2NyZXQ=\r\n"), "{head}");
    task.abort();
}

#[tokio::test]
async fn refused_connect_fails_as_connect_naming_the_status() {
    let pki = pki();
    let (upstream, task) = tls_upstream(&pki, &[b"http/1.1"]).await;
    let proxy = ConnectProxy::start(407).await;
    let sidecar = Sidecar::start_with(trusting(&pki)).await;
    let proxy_url = proxy.url().replace("http://", "http://user:s3cret@");
    let resp = sidecar.execute(via(&format!("https://{upstream}/"), &proxy_url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Failed);
    assert_eq!(error_kind(&resp), pb::ErrorKind::Connect, "{resp:?}");
    let message = resp.error.unwrap().message;
    assert!(message.contains("407") && message.contains("proxy authentication required"), "{message}");
    assert!(message.contains(&proxy.url()), "{message}");
    assert!(!message.contains("s3cret") && !message.contains("user"), "{message}");
    task.abort();
}

#[tokio::test]
async fn http_is_forwarded_in_absolute_form_with_proxy_credentials() {
    // A forwarding proxy answers plain-http requests itself: it records what it was asked.
    let proxy = Upstream::fixed(200, "from the proxy").await;
    let sidecar = Sidecar::start().await;
    let proxy_url = proxy.url("").replace("http://", "http://user:s3cret@");
    let resp = sidecar.execute(via("http://orders.example.test:8080/a?b=1", &proxy_url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("from the proxy"));
    let seen = &proxy.seen()[0];
    assert_eq!(seen.uri, "http://orders.example.test:8080/a?b=1");
    assert_eq!(seen.header("host").as_deref(), Some("orders.example.test:8080"));
    assert_eq!(seen.header("proxy-authorization").as_deref(), Some("Basic dXNlcjpzM2NyZXQ="));
}

#[tokio::test]
async fn server_default_proxy_applies_unless_no_proxy_matches() {
    let proxy = Upstream::fixed(200, "from the proxy").await;
    let direct = Upstream::fixed(200, "direct").await;
    let mut settings = test_settings();
    let proxy_url = ProxyUrl::parse(&proxy.url("")).unwrap();
    settings.client.proxies =
        Proxies::new(Some(proxy_url.clone()), Some(proxy_url), NoProxy::parse("localhost"));
    let sidecar = Sidecar::start_with(settings).await;

    let resp = sidecar.execute(request("GET", "http://api.example.test/x")).await;
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("from the proxy"));
    assert_eq!(proxy.seen()[0].uri, "http://api.example.test/x");

    // localhost is in NO_PROXY: straight to the upstream.
    let resp = sidecar.execute(request("GET", &format!("http://localhost:{}/y", direct.addr.port()))).await;
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("direct"));
    assert_eq!(direct.seen()[0].uri, "/y");
    assert_eq!(proxy.hits(), 1);
}

#[tokio::test]
async fn action_proxy_replaces_the_servers() {
    let server_proxy = Upstream::fixed(200, "server proxy").await;
    let action_proxy = Upstream::fixed(200, "action proxy").await;
    let mut settings = test_settings();
    settings.client.proxies = Proxies::only(ProxyUrl::parse(&server_proxy.url("")).unwrap());
    let sidecar = Sidecar::start_with(settings).await;
    let resp = sidecar.execute(via("http://api.example.test/", &action_proxy.url(""))).await;
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("action proxy"));
    assert_eq!(server_proxy.hits(), 0);
}

#[tokio::test]
async fn no_proxy_cidr_ranges_bypass_the_proxy() {
    let proxy = Upstream::fixed(200, "from the proxy").await;
    let direct = Upstream::fixed(200, "direct").await;
    let mut settings = test_settings();
    let proxy_url = ProxyUrl::parse(&proxy.url("")).unwrap();
    settings.client.proxies =
        Proxies::new(Some(proxy_url.clone()), Some(proxy_url), NoProxy::parse("127.0.0.0/8"));
    let sidecar = Sidecar::start_with(settings).await;
    let resp = sidecar.execute(request("GET", &direct.url("/in-range"))).await;
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("direct"));
    let resp = sidecar.execute(request("GET", "http://api.example.test/x")).await;
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("from the proxy"));
    assert_eq!((direct.hits(), proxy.hits()), (1, 1));
}

#[tokio::test]
async fn a_callers_own_proxy_authorization_wins_over_the_urls() {
    let proxy = Upstream::fixed(200, "from the proxy").await;
    let sidecar = Sidecar::start().await;
    let proxy_url = proxy.url("").replace("http://", "http://user:s3cret@");
    let mut req = via("http://orders.example.test/", &proxy_url);
    req.headers.push(kv("Proxy-Authorization", "Bearer callers-own"));
    let resp = sidecar.execute(req).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(proxy.seen()[0].header_values("proxy-authorization"), vec!["Bearer callers-own".to_owned()]);
}

/// A TLS acceptor with the test PKI's leaf (for 127.0.0.1 and localhost), HTTP/1.1 only.
fn acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.leaf.clone()], pki.leaf_key.clone_key())
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn https_proxy_speaks_tls_itself_and_tunnels_https_inside() {
    let pki = pki();
    let (upstream, task) = tls_upstream(&pki, &[b"h2", b"http/1.1"]).await;
    let proxy = ConnectProxy::start_with_tls(200, Some(acceptor(&pki))).await;
    let sidecar = Sidecar::start_with(trusting(&pki)).await;
    let proxy_url = format!("https://user:s3cret@127.0.0.1:{}", proxy.addr.port());
    let resp = sidecar.execute(via(&format!("https://{upstream}/"), &proxy_url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    // The phases are still measured: connect (with the proxy's TLS and CONNECT) and the
    // target's TLS inside the tunnel.
    let t = resp.attempts[0].timing.unwrap();
    let measured = |d: &Option<prost_types::Duration>| d.is_some_and(|d| d.seconds > 0 || d.nanos > 0);
    assert!(measured(&t.connect) && measured(&t.tls), "{t:?}");
    let response = resp.response.unwrap();
    assert_eq!((response.body_text.as_deref(), response.http_version.as_str()), (Some("secure"), "HTTP/2.0"));
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with(&format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n", upstream.port())),
        "{heads:?}"
    );
    assert!(heads[0].contains("Proxy-Authorization: Basic dXNlcjpzM2NyZXQ=\r\n"), "{heads:?}");
    task.abort();
}

#[tokio::test]
async fn https_proxy_with_an_untrusted_certificate_fails_as_tls_naming_the_proxy() {
    let pki = pki();
    let proxy = ConnectProxy::start_with_tls(200, Some(acceptor(&pki))).await;
    // The proxy's CA is not trusted here.
    let sidecar = Sidecar::start().await;
    let proxy_url = format!("https://127.0.0.1:{}", proxy.addr.port());
    let resp = sidecar.execute(via("http://orders.example.test/", &proxy_url)).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Tls, "{resp:?}");
    let message = resp.error.unwrap().message;
    assert!(message.contains(&format!("proxy https://127.0.0.1:{}", proxy.addr.port())), "{message}");
    assert!(proxy.heads().is_empty());
}

/// What a SOCKS5 client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SocksAsked {
    Ip(SocketAddr),
    Domain(String, u16),
}

/// A SOCKS5 server on loopback (RFC 1928 CONNECT, no-auth or RFC 1929 user/password). It
/// records each request; a domain is never resolved, only mapped to 127.0.0.1.
struct SocksProxy {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<SocksAsked>>>,
    logins: Arc<Mutex<Vec<(String, String)>>>,
    _task: AbortOnDrop,
}

impl SocksProxy {
    /// With `login`, only that user and password are accepted.
    async fn start(login: Option<(&'static str, &'static str)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked: Arc<Mutex<Vec<SocksAsked>>> = Arc::default();
        let logins: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (a, l) = (asked.clone(), logins.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let (a, l) = (a.clone(), l.clone());
                tokio::spawn(async move {
                    let _ = socks_session(client, login, a, l).await;
                });
            }
        });
        Self { addr, asked, logins, _task: AbortOnDrop(task) }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    fn asked(&self) -> Vec<SocksAsked> {
        self.asked.lock().unwrap().clone()
    }
}

async fn socks_session(
    mut client: TcpStream,
    login: Option<(&'static str, &'static str)>,
    asked: Arc<Mutex<Vec<SocksAsked>>>,
    logins: Arc<Mutex<Vec<(String, String)>>>,
) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    let mut methods = vec![0u8; head[1] as usize];
    client.read_exact(&mut methods).await?;
    let wanted = if login.is_some() { 2 } else { 0 };
    if head[0] != 5 || !methods.contains(&wanted) {
        client.write_all(&[5, 0xff]).await?;
        return Ok(());
    }
    client.write_all(&[5, wanted]).await?;
    if let Some((user, pass)) = login {
        let mut ver_len = [0u8; 2];
        client.read_exact(&mut ver_len).await?;
        let mut got_user = vec![0u8; ver_len[1] as usize];
        client.read_exact(&mut got_user).await?;
        let mut pass_len = [0u8; 1];
        client.read_exact(&mut pass_len).await?;
        let mut got_pass = vec![0u8; pass_len[0] as usize];
        client.read_exact(&mut got_pass).await?;
        let (got_user, got_pass) = (
            String::from_utf8_lossy(&got_user).into_owned(),
            String::from_utf8_lossy(&got_pass).into_owned(),
        );
        logins.lock().unwrap().push((got_user.clone(), got_pass.clone()));
        let ok = got_user == user && got_pass == pass;
        client.write_all(&[1, if ok { 0 } else { 1 }]).await?;
        if !ok {
            return Ok(());
        }
    }
    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    assert_eq!(&req[..3], &[5, 1, 0], "only CONNECT is asked for");
    let request = match req[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            SocksAsked::Ip(SocketAddr::new(IpAddr::from(ip), client.read_u16().await?))
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await?;
            SocksAsked::Ip(SocketAddr::new(IpAddr::from(ip), client.read_u16().await?))
        }
        3 => {
            let len = client.read_u8().await?;
            let mut name = vec![0u8; len as usize];
            client.read_exact(&mut name).await?;
            SocksAsked::Domain(String::from_utf8_lossy(&name).into_owned(), client.read_u16().await?)
        }
        other => panic!("address type {other}"),
    };
    asked.lock().unwrap().push(request.clone());
    let target = match request {
        SocksAsked::Ip(addr) => addr,
        // Names are never resolved here: every test name lives on loopback.
        SocksAsked::Domain(_, port) => SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let mut upstream = TcpStream::connect(target).await?;
    client.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Test settings where `name` is fixed at `ip` (as `--resolve`), so nothing is looked up.
fn resolving(name: &str, ip: [u8; 4]) -> ExecSettings {
    let mut settings = test_settings();
    settings.client.resolve = [(name.to_owned(), vec![IpAddr::from(ip)])].into();
    settings
}

#[tokio::test]
async fn socks5_gets_the_address_callout_resolved() {
    let upstream = Upstream::fixed(200, "via socks").await;
    let socks = SocksProxy::start(None).await;
    let sidecar = Sidecar::start_with(resolving("orders.example.test", [127, 0, 0, 1])).await;
    let url = format!("http://orders.example.test:{}/a", upstream.addr.port());
    let resp = sidecar.execute(via(&url, &socks.url("socks5"))).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("via socks"));
    assert_eq!(socks.asked(), vec![SocksAsked::Ip(upstream.addr)]);
    // Through SOCKS the request goes in origin form, with no proxy header.
    let seen = &upstream.seen()[0];
    assert_eq!((seen.uri.as_str(), seen.header("proxy-authorization")), ("/a", None));
    assert_eq!(resp.attempts[0].remote_address, socks.addr.to_string());
}

#[tokio::test]
async fn socks5h_gets_the_name_and_tls_runs_end_to_end() {
    let pki = pki();
    let (upstream, task) = tls_upstream(&pki, &[b"http/1.1"]).await;
    let socks = SocksProxy::start(Some(("user", "s3cret"))).await;
    let sidecar = Sidecar::start_with(trusting(&pki)).await;
    let proxy_url = socks.url("socks5h").replace("://", "://user:s3cret@");
    let resp = sidecar.execute(via(&format!("https://localhost:{}/", upstream.port()), &proxy_url)).await;
    assert_eq!(resp.outcome(), pb::Outcome::Succeeded, "{resp:?}");
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("secure"));
    assert_eq!(socks.asked(), vec![SocksAsked::Domain("localhost".into(), upstream.port())]);
    assert_eq!(socks.logins.lock().unwrap().clone(), vec![("user".to_owned(), "s3cret".to_owned())]);
    task.abort();
}

#[tokio::test]
async fn socks5_refused_credentials_fail_as_connect_without_the_password() {
    let socks = SocksProxy::start(Some(("user", "right"))).await;
    let sidecar = Sidecar::start().await;
    let proxy_url = socks.url("socks5h").replace("://", "://user:wr0ng@");
    let resp = sidecar.execute(via("http://orders.example.test/", &proxy_url)).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Connect, "{resp:?}");
    let message = resp.error.unwrap().message;
    assert!(message.contains(&socks.url("socks5h")) && !message.contains("wr0ng"), "{message}");
    assert!(socks.asked().is_empty());
}

#[tokio::test]
async fn socks5_targets_pass_the_egress_policy_by_their_resolved_address() {
    let socks = SocksProxy::start(None).await;
    // The operator's proxy on loopback is trusted; the target resolves to the metadata address.
    let mut settings = resolving("meta.example.test", [169, 254, 169, 254]);
    settings.egress.allow_private_networks = false;
    let proxy_url = ProxyUrl::parse(&socks.url("socks5")).unwrap();
    settings.client.proxies = Proxies::new(Some(proxy_url.clone()), Some(proxy_url), NoProxy::default());
    let sidecar = Sidecar::start_with(settings).await;
    let resp = sidecar.execute(request("GET", "http://meta.example.test/latest")).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::DeniedByPolicy, "{resp:?}");
    assert!(resp.error.unwrap().message.contains("169.254.169.254"));
    assert!(socks.asked().is_empty(), "nothing was asked of the proxy");
}

#[tokio::test]
async fn an_actions_socks_proxy_must_pass_the_egress_policy_itself() {
    let socks = SocksProxy::start(None).await;
    let mut settings = test_settings();
    settings.egress.allow_private_networks = false;
    let sidecar = Sidecar::start_with(settings).await;
    let resp = sidecar.execute(via("http://api.example.test/", &socks.url("socks5h"))).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::DeniedByPolicy, "{resp:?}");
    assert!(socks.asked().is_empty());
}

#[tokio::test]
async fn other_proxy_schemes_are_invalid_arguments_naming_the_field() {
    let sidecar = Sidecar::start().await;
    let status = sidecar
        .try_execute(via("http://api.example.test/", "socks4://u:s3cret@127.0.0.1:1080"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(violated_fields(&status), vec!["proxy.url".to_owned()]);
    assert!(!status.message().contains("s3cret"), "{}", status.message());
}

#[tokio::test]
async fn the_real_server_reads_proxies_and_no_proxy_ranges_from_the_environment() {
    let proxy = Upstream::fixed(200, "from the proxy").await;
    let direct = Upstream::fixed(200, "direct").await;
    let proxy_url = proxy.url("");
    let serve = ServeProcess::spawn(
        &[],
        &[("HTTP_PROXY", proxy_url.as_str()), ("NO_PROXY", "example.test, 127.0.0.0/8")],
    )
    .await;
    let client = pb::http_action_service_client::HttpActionServiceClient::new(serve.channel().await);
    let execute = |url: String| {
        let req = request("GET", &url);
        let mut client = client.clone();
        async move { client.execute(req).await.unwrap().into_inner() }
    };
    let resp = execute(direct.url("/in-range")).await;
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("direct"));
    let resp = execute("http://orders.elsewhere.test/x".into()).await;
    assert_eq!(resp.response.unwrap().body_text.as_deref(), Some("from the proxy"), "{}", serve.logs());
    assert_eq!(proxy.seen()[0].uri, "http://orders.elsewhere.test/x");
    assert_eq!((direct.hits(), proxy.hits()), (1, 1));
}

#[tokio::test]
async fn a_connect_refused_otherwise_fails_as_connect_naming_the_proxy_and_target() {
    let pki = pki();
    let (upstream, task) = tls_upstream(&pki, &[b"http/1.1"]).await;
    let proxy = ConnectProxy::start(403).await;
    let sidecar = Sidecar::start_with(trusting(&pki)).await;
    let resp = sidecar.execute(via(&format!("https://{upstream}/"), &proxy.url())).await;
    assert_eq!(error_kind(&resp), pb::ErrorKind::Connect, "{resp:?}");
    let message = resp.error.unwrap().message;
    assert!(message.contains(&proxy.url()) && message.contains(&upstream.to_string()), "{message}");
    assert!(message.contains("refused"), "{message}");
    task.abort();
}
