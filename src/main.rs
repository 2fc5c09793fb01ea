//! `callout serve` runs the gRPC sidecar; `callout exec` runs one action by hand through the
//! same executor and prints its outcome as JSON.
#![forbid(unsafe_code)]
use callout::{
    action::{ActionInput, BodyInput, OnFailure, ProxyUrl, RedirectsInput, RetryInput, TimeoutsInput},
    client::{
        admission::LimitSettings,
        breaker::BreakerSettings,
        concurrency::ConcurrencySettings,
        egress::{EgressRule, EgressSettings},
        rate_limit::{Rate, RateLimitRule, RateLimitSettings},
        ClientSettings, Proxies,
    },
    exec::{ExecSettings, Executor},
    secrets::SecretSettings,
    server::{Listener, ServerOptions, ServerTls},
};
use clap::{Parser, Subcommand, ValueEnum};
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "callout",
    version,
    about = "A gRPC sidecar that executes HTTP actions for workflow engines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gRPC sidecar (HttpActionService, health, reflection).
    Serve(Box<ServeArgs>),
    /// Run one action and print its outcome as JSON. Exit 0 when it succeeded, 1 when it
    /// failed, 2 when it is invalid.
    Exec(Box<ExecArgs>),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on: HOST:PORT, or unix:PATH for a Unix domain socket.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: ListenAddr,
    /// File mode of the Unix domain socket, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    unix_socket_mode: u32,
    /// File holding a bearer token that action calls must send as "authorization: Bearer
    /// <token>" metadata (health and reflection stay open).
    #[arg(long, value_name = "PATH")]
    auth_token_file: Option<PathBuf>,
    /// PEM certificate chain for TLS on the gRPC listener (with --tls-key).
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC listener (with --tls-cert).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates that clients' certificates must chain to (mutual TLS).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Total time of an action that sets none (still bounded by each call's gRPC deadline).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    default_total_timeout: Duration,
    /// Body cap of ExecuteStream, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    stream_max_response_bytes: u64,
    /// How long idle pooled upstream connections are kept.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pool_idle_timeout: Duration,
    /// Idle pooled connections kept per upstream host.
    #[arg(long, default_value_t = 64)]
    pool_max_idle_per_host: usize,
    /// Do not offer HTTP/2 to https upstreams.
    #[arg(long)]
    no_http2: bool,
    /// TCP keep-alive probes on upstream connections after this idle time; "0s" turns them off.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    tcp_keepalive: Duration,
    /// HTTP/2 PING interval on upstream connections (also while idle); default none.
    #[arg(long, value_parser = humantime::parse_duration)]
    http2_keep_alive_interval: Option<Duration>,
    /// PEM file of extra CA certificates trusted for upstreams, besides the webpki roots.
    #[arg(long, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// http:// proxy for actions that set none (CONNECT for https targets). Without it,
    /// HTTPS_PROXY and HTTP_PROXY apply; NO_PROXY applies either way.
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Actions running at once.
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// Actions waiting for a running slot; past this, new calls get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 2048)]
    max_queued: usize,
    /// Attempts in flight to one destination (host:port) at once.
    #[arg(long, default_value_t = 64)]
    max_in_flight_per_host: usize,
    /// Limit on all sends together, e.g. "200/s" or "200/s burst 50".
    #[arg(long, value_name = "RATE")]
    global_rate_limit: Option<Rate>,
    /// Limit per destination host:port matching a pattern, e.g. "*.example.com=10/s burst 20";
    /// repeatable, the first matching rule applies.
    #[arg(long = "rate-limit", value_name = "PATTERN=RATE")]
    rate_limits: Vec<RateLimitRule>,
    /// Longest shared cool-down that a 429 Retry-After imposes on a destination.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    max_host_cool_down: Duration,
    /// Consecutive failures (connect errors, timeouts, 5xx) that open a destination's circuit;
    /// 0 turns circuit breaking off.
    #[arg(long, default_value_t = 10)]
    breaker_failures: u32,
    /// How long an open circuit refuses before one probe may go through.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    breaker_cool_down: Duration,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    egress: EgressArgs,
}

/// Which destinations may be dialled (checked on every resolved address and redirect hop).
#[derive(clap::Args, Clone)]
struct EgressArgs {
    /// Dev mode: allow loopback and private ranges (127/8, ::1, 10/8, 172.16/12, 192.168/16,
    /// 100.64/10, fc00::/7), denied by default. Cloud metadata and link-local stay denied.
    #[arg(long)]
    allow_private_networks: bool,
    /// Allow only destinations matching one of these (repeatable): a host pattern
    /// ("*.example.com", "api.example.com:443") or a CIDR ("203.0.113.0/24"). A CIDR also
    /// opens built-in denied ranges it covers.
    #[arg(long = "egress-allow", value_name = "RULE")]
    allow: Vec<EgressRule>,
    /// Never dial destinations matching one of these (repeatable): host pattern or CIDR.
    #[arg(long = "egress-deny", value_name = "RULE")]
    deny: Vec<EgressRule>,
    /// Only these ports may be dialled, e.g. "443,8443" (default: any).
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    allowed_ports: Vec<u16>,
    /// Use these addresses for HOST instead of DNS, "HOST=IP[,IP...]" (repeatable); the
    /// egress policy still checks them.
    #[arg(long = "resolve", value_name = "HOST=IPS", value_parser = parse_resolve)]
    resolve: Vec<(String, Vec<IpAddr>)>,
}

impl EgressArgs {
    fn apply(self, client: &mut ClientSettings) {
        client.egress = EgressSettings {
            allow_private_networks: self.allow_private_networks,
            allow: self.allow,
            deny: self.deny,
            allowed_ports: self.allowed_ports,
        };
        client.resolve = self.resolve;
    }
}

fn parse_resolve(raw: &str) -> Result<(String, Vec<IpAddr>), String> {
    let (host, ips) = raw.split_once('=').ok_or_else(|| format!("{raw:?} must look like HOST=IP[,IP...]"))?;
    let ips = ips
        .split(',')
        .map(|ip| ip.trim().trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{raw:?}: {e}"))?;
    Ok((host.trim().to_ascii_lowercase(), ips))
}

/// Where `{{secret:NAME}}` references in actions are read from.
#[derive(clap::Args, Clone)]
struct SecretArgs {
    /// Directory with one file per secret (e.g. a mounted Kubernetes Secret); read at each use.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// Read secret NAME from the environment variable PREFIX+NAME (when no file has it).
    #[arg(long, value_name = "PREFIX")]
    secrets_env_prefix: Option<String>,
}

impl SecretArgs {
    fn settings(self) -> SecretSettings {
        SecretSettings { dir: self.secrets_dir, env_prefix: self.secrets_env_prefix }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FailureMode {
    Abort,
    Continue,
}

#[derive(clap::Args)]
struct ExecArgs {
    /// GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS.
    method: String,
    /// Absolute http or https URL.
    url: String,
    /// A header, "Name: value"; repeatable.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// A query parameter, "name=value", appended to the URL's query; repeatable.
    #[arg(short = 'q', long = "query", value_name = "NAME=VALUE")]
    query: Vec<String>,
    /// JSON body (must parse); Content-Type application/json unless set.
    #[arg(long, group = "body")]
    json: Option<String>,
    /// Form field "name=value", urlencoded; repeatable.
    #[arg(long = "form", value_name = "NAME=VALUE", group = "body")]
    form: Vec<String>,
    /// Text body, sent as-is.
    #[arg(short = 'd', long = "data", group = "body")]
    data: Option<String>,
    /// Raw body read from a file.
    #[arg(long = "data-file", group = "body")]
    data_file: Option<PathBuf>,
    /// Content-Type for the body (an explicit -H Content-Type wins).
    #[arg(long)]
    content_type: Option<String>,
    /// Statuses that count as success, e.g. "201" or "200-299,304".
    #[arg(long, default_value = "2xx")]
    expect: String,
    /// Message for a failing status or class, "404=not found"; repeatable.
    #[arg(long = "error-message", value_name = "STATUS=MESSAGE")]
    error_messages: Vec<String>,
    /// Connect timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    connect_timeout: Option<Duration>,
    /// Timeout of one attempt.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Timeout of all attempts and backoff.
    #[arg(long, value_parser = humantime::parse_duration)]
    total_timeout: Option<Duration>,
    /// Attempts in all (1 disables retries).
    #[arg(long)]
    attempts: Option<u32>,
    /// Do not follow redirects.
    #[arg(long)]
    no_follow: bool,
    /// What the engine should do on failure (reported as "proceed").
    #[arg(long, value_enum, default_value = "abort")]
    on_failure: FailureMode,
    /// Body cap in bytes.
    #[arg(long)]
    max_response_bytes: Option<u64>,
    #[command(flatten)]
    secrets: SecretArgs,
    #[command(flatten)]
    egress: EgressArgs,
    /// http:// proxy for this action (otherwise HTTPS_PROXY / HTTP_PROXY / NO_PROXY apply).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

fn init_logs(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Exec(args) => exec(*args).await,
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    init_logs("info");
    let mut settings = ExecSettings {
        default_total_timeout: args.default_total_timeout,
        stream_max_response_bytes: args.stream_max_response_bytes,
        ..ExecSettings::default()
    };
    settings.client.pool_idle_timeout = args.pool_idle_timeout;
    settings.client.pool_max_idle_per_host = args.pool_max_idle_per_host;
    settings.client.http2 = !args.no_http2;
    settings.client.tcp_keepalive = (!args.tcp_keepalive.is_zero()).then_some(args.tcp_keepalive);
    settings.client.http2_keep_alive_interval = args.http2_keep_alive_interval;
    settings.secrets = args.secrets.clone().settings();
    args.egress.clone().apply(&mut settings.client);
    settings.limits = LimitSettings {
        concurrency: ConcurrencySettings {
            max_in_flight: args.max_in_flight,
            max_queued: args.max_queued,
            max_in_flight_per_host: args.max_in_flight_per_host,
        },
        rate: RateLimitSettings {
            global: args.global_rate_limit,
            per_host: args.rate_limits.clone(),
            max_cool_down: args.max_host_cool_down,
        },
        breaker: BreakerSettings {
            failure_threshold: args.breaker_failures,
            cool_down: args.breaker_cool_down,
        },
    };
    if let Some(path) = &args.ca_file {
        match std::fs::read_to_string(path) {
            Ok(pem) => settings.client.extra_ca_pem = Some(pem),
            Err(e) => {
                tracing::error!("cannot read --ca-file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    settings.client.proxies = match server_proxies(args.proxy.as_deref()) {
        Ok(proxies) => proxies,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let executor = match Executor::new(settings) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let options = match server_options(&args) {
        Ok(options) => options,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let bound = match &args.listen {
        ListenAddr::Tcp(addr) => tokio::net::TcpListener::bind(addr).await.map(Listener::Tcp),
        ListenAddr::Unix(path) => Listener::bind_unix(path.clone(), args.unix_socket_mode),
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let local = match &listener {
        Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        Listener::Unix { path, .. } => format!("unix:{}", path.display()),
    };
    tracing::info!(
        listen = %local,
        tls = options.tls.is_some(),
        mutual_tls = options.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()),
        bearer_token = options.auth_token.is_some(),
        "callout serving"
    );
    match callout::server::serve_with(listener, executor, options, shutdown_signal()).await {
        Ok(()) => {
            tracing::info!("callout stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// A listen address: TCP or a Unix domain socket path.
#[derive(Clone)]
enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        match raw.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path, e.g. unix:/run/callout/callout.sock".into()),
            Some(path) => Ok(Self::Unix(PathBuf::from(path))),
            None => {
                raw.parse().map(Self::Tcp).map_err(|e| format!("{raw:?} is not HOST:PORT or unix:PATH: {e}"))
            }
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

fn parse_mode(raw: &str) -> Result<u32, String> {
    u32::from_str_radix(raw.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{raw:?} is not an octal file mode such as 600"))
}

/// Reads the listener's token and TLS files; names the flag and file of any problem.
fn server_options(args: &ServeArgs) -> Result<ServerOptions, String> {
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read --{flag} {}: {e}", path.display()))
    };
    let auth_token = match &args.auth_token_file {
        Some(path) => {
            let token = read("auth-token-file", path)?.trim().to_owned();
            if token.is_empty() {
                return Err(format!("--auth-token-file {} is empty", path.display()));
            }
            Some(token)
        }
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls {
            cert_pem: read("tls-cert", cert)?,
            key_pem: read("tls-key", key)?,
            client_ca_pem: args.tls_client_ca.as_ref().map(|ca| read("tls-client-ca", ca)).transpose()?,
        }),
        _ => None,
    };
    Ok(ServerOptions { auth_token, tls })
}

/// The server's proxies: the environment's, read once here, with `--proxy` (when given)
/// replacing HTTP(S)_PROXY. Errors name the flag or variable, never the URL (it may hold a
/// password).
fn server_proxies(flag: Option<&str>) -> Result<Proxies, String> {
    let mut proxies = Proxies::from_env()?;
    if let Some(raw) = flag {
        let proxy = ProxyUrl::parse(raw).map_err(|e| format!("--proxy {e}"))?;
        proxies.http = Some(proxy.clone());
        proxies.https = Some(proxy);
    }
    Ok(proxies)
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}

fn split_pair(raw: &str, sep: char, what: &str) -> Result<(String, String), String> {
    raw.split_once(sep)
        .map(|(k, v)| (k.trim().to_owned(), v.trim_start().to_owned()))
        .ok_or_else(|| format!("{what} {raw:?} must look like NAME{sep}VALUE"))
}

fn exec_input(args: ExecArgs) -> Result<ActionInput, String> {
    let headers = args.headers.iter().map(|h| split_pair(h, ':', "header")).collect::<Result<_, _>>()?;
    let query = args.query.iter().map(|q| split_pair(q, '=', "query")).collect::<Result<_, _>>()?;
    let error_messages =
        args.error_messages.iter().map(|m| split_pair(m, '=', "error message")).collect::<Result<_, _>>()?;
    let body = if let Some(json) = args.json {
        BodyInput::Json(json)
    } else if !args.form.is_empty() {
        BodyInput::Form(args.form.iter().map(|f| split_pair(f, '=', "form field")).collect::<Result<_, _>>()?)
    } else if let Some(text) = args.data {
        BodyInput::Text(text)
    } else if let Some(path) = args.data_file {
        BodyInput::Raw(std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?.into())
    } else {
        BodyInput::None
    };
    Ok(ActionInput {
        method: args.method,
        url: args.url,
        query,
        headers,
        body,
        content_type: args.content_type.unwrap_or_default(),
        timeouts: TimeoutsInput {
            connect: args.connect_timeout,
            attempt: args.timeout,
            total: args.total_timeout,
        },
        success_codes: args.expect,
        on_failure: match args.on_failure {
            FailureMode::Abort => OnFailure::Abort,
            FailureMode::Continue => OnFailure::Continue,
        },
        error_messages,
        retry: RetryInput { max_attempts: args.attempts.unwrap_or(0), ..RetryInput::default() },
        redirects: RedirectsInput { follow: Some(!args.no_follow), max_hops: 0 },
        max_response_bytes: args.max_response_bytes.unwrap_or(0),
        proxy_url: args.proxy.unwrap_or_default(),
        ..ActionInput::default()
    })
}

async fn exec(args: ExecArgs) -> ExitCode {
    init_logs("warn");
    let mut settings = ExecSettings { secrets: args.secrets.clone().settings(), ..ExecSettings::default() };
    args.egress.clone().apply(&mut settings.client);
    settings.client.proxies = match Proxies::from_env() {
        Ok(proxies) => proxies,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::from(2);
        }
    };
    let executor = match Executor::new(settings) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::FAILURE;
        }
    };
    let action = match exec_input(args).and_then(|input| executor.action(input).map_err(|e| e.to_string())) {
        Ok(action) => action,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = executor.execute(&action, None).await;
    let json = callout::report::outcome_json(&outcome);
    println!("{}", serde_json::to_string_pretty(&json).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
    if outcome.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
