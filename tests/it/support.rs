//! Test harness: a scripted loopback HTTP upstream (hyper, HTTP/1.1 and h2c) that records what
//! it saw, a test PKI and HTTPS upstream (optionally demanding client certificates), and the
//! real callout gRPC server on a loopback port with a generated tonic client.
#![allow(dead_code)]
use bytes::Bytes;
use callout::{
    exec::{ExecSettings, Executor},
    pb::{self, http_action_service_client::HttpActionServiceClient},
};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    sync::{Arc, Mutex},
};
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::Channel;

/// The body type upstream handlers answer with: may stream, may fail mid-way.
pub type UpBody = BoxBody<Bytes, std::io::Error>;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, as sent on the wire.
    pub target: String,
    /// The request target as received: absolute form (`http://host/path`) through a proxy.
    pub uri: String,
    pub version: http::Version,
    /// In received order, repeats kept.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Seen {
    /// All values of header `name` (lower case).
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| v.clone()).collect()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_values(name).into_iter().next()
    }
}

/// Aborts the task when dropped, so servers stop with their test.
pub struct AbortOnDrop(pub JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A loopback HTTP upstream answering every request with `handler`.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    _task: AbortOnDrop,
}

impl Upstream {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<UpBody>> + Send + 'static,
    {
        Self::start_on("127.0.0.1:0", handler).await
    }

    /// The same on a given loopback address (e.g. "127.0.0.2:0").
    pub async fn start_on<F, Fut>(bind: &str, handler: F) -> Self
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<UpBody>> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let handler = Arc::new(handler);
        let recorded = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let handler = handler.clone();
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let recorded = recorded.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let seen = Seen {
                                method: parts.method.to_string(),
                                target: parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                                uri: parts.uri.to_string(),
                                version: parts.version,
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(n, v)| {
                                        (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned())
                                    })
                                    .collect(),
                                body,
                            };
                            recorded.lock().unwrap().push(seen.clone());
                            Ok::<_, Infallible>(handler(seen).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { addr, seen, _task: AbortOnDrop(task) }
    }

    /// An upstream that answers every request with `status` and `body`.
    pub async fn fixed(status: u16, body: &'static str) -> Self {
        Self::start(move |_| async move { text(status, body) }).await
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A full body.
pub fn body(bytes: impl Into<Bytes>) -> UpBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A response with `status` and a text/plain body.
pub fn text(status: u16, text: &'static str) -> Response<UpBody> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "text/plain; charset=utf-8")
        .body(body(text))
        .unwrap()
}

/// A response with `status` and a JSON body.
pub fn json(status: u16, value: serde_json::Value) -> Response<UpBody> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("content-type", "application/json")
        .body(body(value.to_string()))
        .unwrap()
}

/// Default settings with the egress policy's dev mode on: every test upstream is on loopback,
/// which the default policy denies.
pub fn test_settings() -> ExecSettings {
    let mut settings = ExecSettings::default();
    settings.egress.allow_private_networks = true;
    settings
}

/// The real callout gRPC server on a loopback port, and a client connected to it.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub client: HttpActionServiceClient<Channel>,
    _task: AbortOnDrop,
}

impl Sidecar {
    pub async fn start() -> Self {
        Self::start_with(test_settings()).await
    }

    pub async fn start_with(settings: ExecSettings) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let executor = Executor::new(settings).unwrap();
        let task = tokio::spawn(async move {
            callout::server::serve(listener, executor, std::future::pending()).await.unwrap();
        });
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        Self { addr, client: HttpActionServiceClient::new(channel), _task: AbortOnDrop(task) }
    }

    /// A new channel to the same server (for health, reflection, or separate calls).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    /// Execute, panicking on a gRPC error.
    pub async fn execute(&self, req: pb::ExecuteHttpActionRequest) -> pb::ExecuteHttpActionResponse {
        self.client.clone().execute(req).await.unwrap().into_inner()
    }

    /// Execute, returning the gRPC status on error.
    pub async fn try_execute(
        &self,
        req: pb::ExecuteHttpActionRequest,
    ) -> Result<pb::ExecuteHttpActionResponse, tonic::Status> {
        self.client.clone().execute(req).await.map(|r| r.into_inner())
    }

    /// ExecuteStream, collecting every event until the stream ends.
    pub async fn stream(
        &self,
        req: pb::ExecuteHttpActionRequest,
    ) -> Result<Vec<pb::action_event::Event>, tonic::Status> {
        let mut stream = self.client.clone().execute_stream(req).await?.into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await? {
            events.push(event.event.expect("event set"));
        }
        Ok(events)
    }
}

/// A request for `method` and `url` with retries off (one attempt), so tests see exactly one
/// try unless they opt in.
pub fn request(method: &str, url: &str) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        method: method.into(),
        url: url.into(),
        retry: Some(Box::new(pb::RetryPolicy { max_attempts: 1, ..Default::default() })),
        ..Default::default()
    }
}

/// An Execute call of `req` as a caller speaking HTTP/2 itself sends it to `grpc` (HOST:PORT):
/// one uncompressed gRPC message (flag, length, bytes).
pub fn raw_execute(grpc: &str, req: &pb::ExecuteHttpActionRequest) -> Request<Full<Bytes>> {
    use prost::Message;
    let message = req.encode_to_vec();
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    Request::post(format!("http://{grpc}/callout.v1.HttpActionService/Execute"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(framed)))
        .unwrap()
}

pub fn kv(name: &str, value: &str) -> pb::KeyValue {
    pb::KeyValue { name: name.into(), value: value.into() }
}

pub fn dur(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap()
}

/// The field paths of an INVALID_ARGUMENT status's google.rpc.BadRequest.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("BadRequest details")
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect()
}

/// The response's error kind.
pub fn error_kind(resp: &pb::ExecuteHttpActionResponse) -> pb::ErrorKind {
    resp.error.as_ref().map(|e| e.kind()).unwrap_or(pb::ErrorKind::Unspecified)
}

/// Retries on: `max_attempts` tries, a 10 ms first backoff doubling each time, no jitter.
pub fn fast_retry(max_attempts: u32) -> pb::RetryPolicy {
    pb::RetryPolicy {
        max_attempts,
        initial_backoff: Some(dur(std::time::Duration::from_millis(10))),
        jitter: Some(false),
        ..Default::default()
    }
}

/// An upstream that answers the first `failures` requests with `status` (and `headers`), then
/// 200 "ok".
pub async fn failing(
    failures: usize,
    status: u16,
    headers: &'static [(&'static str, &'static str)],
) -> Upstream {
    let calls = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |_| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < failures {
                let mut resp = text(status, "failing");
                for (name, value) in headers {
                    resp.headers_mut().insert(*name, value.parse().unwrap());
                }
                resp
            } else {
                text(200, "ok")
            }
        }
    })
    .await
}

/// A CA made at test time and a leaf for 127.0.0.1 and localhost signed by it.
pub struct TestPki {
    pub ca_pem: String,
    pub ca: CertificateDer<'static>,
    pub leaf: CertificateDer<'static>,
    pub leaf_key: PrivateKeyDer<'static>,
    /// A client certificate (clientAuth) signed by the same CA, and its key, PEM.
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

pub fn pki() -> TestPki {
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
pub async fn tls_upstream(pki: &TestPki, alpn: &[&[u8]]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let (addr, task, _) = tls_upstream_with(pki, alpn, false).await;
    (addr, task)
}

/// An HTTPS upstream; with `require_client_cert` it demands a client certificate signed by the
/// test CA (mutual TLS). The counter says how many TCP connections it accepted.
pub async fn tls_upstream_with(
    pki: &TestPki,
    alpn: &[&[u8]],
    require_client_cert: bool,
) -> (SocketAddr, tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let acceptor = tls_acceptor(pki, alpn, require_client_cert);
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

/// TLS as the test CA's leaf, offering `alpn`; with `require_client_cert`, mutual TLS.
pub fn tls_acceptor(pki: &TestPki, alpn: &[&[u8]], require_client_cert: bool) -> tokio_rustls::TlsAcceptor {
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
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A directory under the system's temp dir, removed with everything in it when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("callout-it-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// `sqlite:DIR/actions.db`: a durable store inside this directory.
    pub fn store_url(&self) -> String {
        format!("sqlite:{}", self.0.join("actions.db").display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The real `callout serve` binary with gRPC and metrics on loopback port 0 and loopback
/// upstreams allowed; its stderr (the logs) collected. Killed when dropped. Unless `args` name a
/// `--store`, its durable store is in a temp dir of its own, removed when dropped.
pub struct ServeProcess {
    child: std::process::Child,
    _store_dir: Option<TempDir>,
    /// `127.0.0.1:PORT` of the gRPC listener.
    pub grpc: String,
    /// `127.0.0.1:PORT` of `/metrics`, when metrics are on.
    pub metrics: Option<String>,
    logs: Arc<Mutex<String>>,
}

impl ServeProcess {
    /// Starts `callout serve` with `args` after the loopback defaults, and `env`.
    pub async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::{BufRead, BufReader};
        let store_dir = (!args.contains(&"--store")).then(|| TempDir::new("store"));
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_callout"));
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--allow-private-networks",
            ])
            .args(args)
            .args(store_dir.iter().flat_map(|dir| ["--store".to_owned(), dir.store_url()]))
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("callout serve starts");
        let stderr = child.stderr.take().expect("stderr piped");
        let logs: Arc<Mutex<String>> = Arc::default();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let collected = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("callout serving") {
                    let _ = started_tx.send(line.clone());
                }
                let mut logs = collected.lock().unwrap();
                logs.push_str(&line);
                logs.push('\n');
            }
        });
        let line =
            tokio::task::spawn_blocking(move || started_rx.recv_timeout(std::time::Duration::from_secs(30)))
                .await
                .unwrap()
                .unwrap_or_else(|_| panic!("callout serve did not start:\n{}", logs.lock().unwrap()));
        // The start line in either log format: `name=value` (pretty) or a JSON object.
        let json: Option<serde_json::Value> = serde_json::from_str(&line).ok();
        let field = |name: &str| {
            if let Some(json) = &json {
                return json[name].as_str().map(str::to_owned);
            }
            let at = line.find(&format!("{name}="))? + name.len() + 1;
            Some(line[at..].chars().take_while(|c| !c.is_whitespace()).collect::<String>())
        };
        let grpc = field("listen").expect("listen address logged");
        let metrics = field("metrics").filter(|m| m != "off");
        Self { child, _store_dir: store_dir, grpc, metrics, logs }
    }

    /// A client channel to the gRPC listener.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc)).unwrap().connect().await.unwrap()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Sends SIGTERM, as Kubernetes does.
    pub fn terminate(&self) {
        let status =
            std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM");
    }

    /// SIGKILL (`kill -9`): the process stops at once, wherever it is.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn exit_status(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        None
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` from `addr` over plain HTTP/1.1 (a sidecar's `/metrics`); the body of a 200.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// A real `redis-server` on a loopback port of its own (no persistence; its files in a temp
/// dir), killed when dropped. `stop` and `start` again keep the port, so sidecars pointed at it
/// see an outage and a recovery. Needs `redis-server` on the PATH (.ci/run installs it).
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    child: Option<std::process::Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        // Redis takes no port 0: a free loopback port, bound, read and closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Self { port, dir: TempDir::new("redis"), child: None };
        redis.restart().await;
        redis
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it answers PING.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port = self.port.to_string();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port, "--save", "", "--appendonly", "no", "--dir"])
            .arg(&self.dir.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        let started = std::time::Instant::now();
        loop {
            if self.try_command(&["PING"]).await.is_ok() {
                return;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "redis-server answers PING");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: its clients see the connection drop).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`pause`) and SIGCONT: a server that holds its connections and answers nothing.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = std::process::Command::new("kill").args([signal, &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal}");
    }

    /// One command on a fresh connection.
    pub async fn try_command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut connection).await
    }

    /// One command's integer reply (EXISTS, PTTL, DBSIZE).
    pub async fn int(&self, args: &[&str]) -> i64 {
        match self.try_command(args).await.unwrap() {
            redis::Value::Int(n) => n,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    /// Waits (up to 10 s) until `key` exists: the sidecars write marks off the attempt's way.
    pub async fn wait_for_key(&self, key: &str) {
        let started = std::time::Instant::now();
        while self.int(&["EXISTS", key]).await == 0 {
            assert!(started.elapsed() < std::time::Duration::from_secs(10), "{key} was written");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused server dies of SIGKILL all the same.
            self.stop();
        }
    }
}

/// The value of the series `series` (name and labels as printed) in a Prometheus text page.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The value of the sample of `name` whose labels include every one of `labels`.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .find(|line| labels.iter().all(|l| line.contains(l)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
