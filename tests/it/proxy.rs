//! Proxies: CONNECT tunnels for https targets (with Proxy-Authorization from the proxy URL's
//! credentials), a refused CONNECT, plain http forwarded in absolute form, the server's default
//! proxy and NO_PROXY. The proxies are tiny loopback servers written here.
use crate::support::*;
use callout::{
    action::ProxyUrl,
    client::{NoProxy, Proxies},
    exec::ExecSettings,
    pb,
};
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let recorded = heads.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let _ = tunnel(client, answer, recorded).await;
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

async fn tunnel(
    mut client: TcpStream,
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
        proxy: Some(pb::ProxyOptions { url: proxy.into() }),
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
    assert_eq!(resp.response.as_ref().unwrap().body, &b"secure"[..]);
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
    assert_eq!(resp.response.unwrap().body, &b"from the proxy"[..]);
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
    settings.client.proxies = Proxies::only(ProxyUrl::parse(&proxy.url("")).unwrap());
    settings.client.proxies.no_proxy = NoProxy::parse("localhost");
    let sidecar = Sidecar::start_with(settings).await;

    let resp = sidecar.execute(request("GET", "http://api.example.test/x")).await;
    assert_eq!(resp.response.unwrap().body, &b"from the proxy"[..]);
    assert_eq!(proxy.seen()[0].uri, "http://api.example.test/x");

    // localhost is in NO_PROXY: straight to the upstream.
    let resp = sidecar.execute(request("GET", &format!("http://localhost:{}/y", direct.addr.port()))).await;
    assert_eq!(resp.response.unwrap().body, &b"direct"[..]);
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
    assert_eq!(resp.response.unwrap().body, &b"action proxy"[..]);
    assert_eq!(server_proxy.hits(), 0);
}
