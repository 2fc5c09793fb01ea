//! `callout serve` runs the gRPC sidecar; `callout exec` runs one action by hand through the
//! same executor and prints its outcome as JSON; `callout config print` shows the effective
//! configuration. Settings come from a TOML file, then `CALLOUT_SECTION__KEY` environment
//! variables, then the flags below (see `callout::config`).
#![forbid(unsafe_code)]
use callout::{
    action::{ActionInput, BodyInput, OnFailure, RedirectsInput, RetryInput, TimeoutsInput, TlsInput},
    client::{
        egress::EgressRule,
        rate_limit::{Rate, RateLimitRule},
    },
    config::{Config, FileMode, ListenAddr, LogFormat, StoreUrl},
    durable::Durable,
    exec::{ActionLog, Executor},
    fleet::RedisLimits,
    server::Listener,
    store::sqlite::{SqliteSettings, SqliteStore},
    telemetry::{self, TelemetrySettings},
};
use clap::{Parser, Subcommand, ValueEnum};
use figment::Figment;
use serde::Serialize;
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

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
    /// Run the gRPC sidecar (HttpActionService, health, reflection) and the metrics endpoint.
    Serve(Box<ServeArgs>),
    /// Run one action and print the reply as grpcurl would (proto3 JSON). Exit 0 proceed, 1 stop
    /// (it failed), 2 invalid, 3 not run (README: "Exit status").
    Exec(Box<ExecArgs>),
    /// The configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults < file < environment < flags) as TOML, with
    /// credentials redacted. Takes the same options as `serve`.
    Print(Box<ServeArgs>),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file (every key is documented in callout.example.toml). Environment
    /// variables CALLOUT_SECTION__KEY override it, and flags override both.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: ServeFlags,
    #[command(flatten, next_help_heading = "Egress")]
    egress: EgressFlags,
    #[command(flatten, next_help_heading = "Secrets")]
    secrets: SecretFlags,
}

/// Flags of `serve`: each overrides the config key named in brackets (defaults in
/// callout.example.toml). A list flag given at least once replaces the key's list.
#[derive(clap::Args)]
struct ServeFlags {
    /// [server.listen] IP:PORT, or unix:PATH for a Unix domain socket [default: 127.0.0.1:50051]
    #[arg(help_heading = "Server", long)]
    listen: Option<ListenAddr>,
    /// [server.unix_socket_mode] file mode of the Unix socket, octal [default: 600]
    #[arg(help_heading = "Server", long, value_name = "OCTAL")]
    unix_socket_mode: Option<FileMode>,
    /// [server.auth_token_file] bearer token action calls must send.
    #[arg(help_heading = "Server", long, value_name = "PATH")]
    auth_token_file: Option<PathBuf>,
    /// [server.tls_cert] PEM certificate chain: TLS on the gRPC listener.
    #[arg(help_heading = "Server", long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// [server.tls_key] PEM private key for --tls-cert.
    #[arg(help_heading = "Server", long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// [server.tls_client_ca] PEM CAs client certificates must chain to (mutual TLS).
    #[arg(help_heading = "Server", long, value_name = "PATH")]
    tls_client_ca: Option<PathBuf>,
    /// [server.drain_timeout] on SIGTERM, how long in-flight actions may finish before they are
    /// cut off, answered CANCELLED [default: 25s]
    #[arg(help_heading = "Server", long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// [server.default_total_timeout] total time of an action that sets none [default: 5m]
    #[arg(help_heading = "Server", long, value_parser = humantime::parse_duration)]
    default_total_timeout: Option<Duration>,
    /// [server.stream_max_response_bytes] body cap of ExecuteStream [default: 1 GiB]
    #[arg(help_heading = "Server", long)]
    stream_max_response_bytes: Option<u64>,
    /// [server.max_request_bytes] largest request message; larger calls get INVALID_ARGUMENT [default: 4 MiB]
    #[arg(help_heading = "Server", long, value_name = "N")]
    max_request_bytes: Option<u64>,
    /// [server.worker_threads] runtime workers; 0 is one per usable core, 1 a single thread [default: 0]
    #[arg(help_heading = "Server", long, value_name = "N")]
    worker_threads: Option<usize>,
    /// [server.sensitive_headers] a header whose values are secret; repeatable.
    #[arg(help_heading = "Server", long = "sensitive-header", value_name = "NAME")]
    sensitive_headers: Vec<String>,
    /// [log.format] pretty or json [default: pretty]
    #[arg(help_heading = "Logging", long, value_enum)]
    log_format: Option<LogFormat>,
    /// [log.level] tracing filter, e.g. info or callout=debug (RUST_LOG wins when set).
    #[arg(help_heading = "Logging", long, value_name = "FILTER")]
    log_level: Option<String>,
    /// [log.actions] which finished actions get a log line [default: failed]
    #[arg(help_heading = "Logging", long, value_enum)]
    log_actions: Option<ActionLog>,
    /// [metrics.listen] address of the Prometheus /metrics endpoint [default: 127.0.0.1:9464]
    #[arg(help_heading = "Metrics", long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// [metrics.enabled = false] serve no metrics endpoint.
    #[arg(help_heading = "Metrics", long)]
    no_metrics: bool,
    /// [client.pool_idle_timeout] idle pooled upstream connections are closed after this [default: 90s]
    #[arg(help_heading = "Upstream client", long, value_parser = humantime::parse_duration)]
    pool_idle_timeout: Option<Duration>,
    /// [client.pool_max_idle_per_host] idle connections kept per host; 0 turns reuse off [default: 64]
    #[arg(help_heading = "Upstream client", long)]
    pool_max_idle_per_host: Option<usize>,
    /// [client.http2 = false] do not offer HTTP/2 to https upstreams.
    #[arg(help_heading = "Upstream client", long)]
    no_http2: bool,
    /// [client.tcp_keepalive] TCP keep-alive after this idle time; 0s turns it off [default: 60s]
    #[arg(help_heading = "Upstream client", long, value_parser = humantime::parse_duration)]
    tcp_keepalive: Option<Duration>,
    /// [client.http2_keep_alive_interval] HTTP/2 PING interval [default: none]
    #[arg(help_heading = "Upstream client", long, value_parser = humantime::parse_duration)]
    http2_keep_alive_interval: Option<Duration>,
    /// [client.ca_file] PEM file of extra CAs trusted for upstreams.
    #[arg(help_heading = "Upstream client", long, value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// [client.proxy] http(s):// or socks5(h):// proxy for actions that set none (replaces HTTP(S)_PROXY).
    #[arg(help_heading = "Upstream client", long, value_name = "URL")]
    proxy: Option<String>,
    /// [limits.max_in_flight] actions running at once [default: 512]
    #[arg(help_heading = "Limits", long)]
    max_in_flight: Option<usize>,
    /// [limits.max_queued] actions waiting for a slot; past this, RESOURCE_EXHAUSTED [default: 2048]
    #[arg(help_heading = "Limits", long)]
    max_queued: Option<usize>,
    /// [limits.max_in_flight_per_host] attempts in flight to one host:port [default: 64]
    #[arg(help_heading = "Limits", long)]
    max_in_flight_per_host: Option<usize>,
    /// [limits.global_rate_limit] limit on all sends, e.g. "200/s burst 50".
    #[arg(help_heading = "Limits", long, value_name = "RATE")]
    global_rate_limit: Option<Rate>,
    /// [limits.rate_limits] "PATTERN=RATE" per destination, e.g. "*.example.com=10/s burst 20";
    /// repeatable, first match wins.
    #[arg(help_heading = "Limits", long = "rate-limit", value_name = "PATTERN=RATE")]
    rate_limits: Vec<RateLimitRule>,
    /// [limits.max_host_cool_down] longest shared cool-down from a 429 Retry-After [default: 10m]
    #[arg(help_heading = "Limits", long, value_parser = humantime::parse_duration)]
    max_host_cool_down: Option<Duration>,
    /// [limits.breaker_failures] consecutive failures that open a circuit; 0 is off [default: 10]
    #[arg(help_heading = "Limits", long)]
    breaker_failures: Option<u32>,
    /// [limits.breaker_cool_down] how long an open circuit refuses before a probe [default: 15s]
    #[arg(help_heading = "Limits", long, value_parser = humantime::parse_duration)]
    breaker_cool_down: Option<Duration>,
    /// [limits.max_buffered_bytes] bytes of buffered response bodies held at once (an eighth
    /// of the cgroup memory limit, else 512 MiB).
    #[arg(help_heading = "Limits", long, value_name = "BYTES")]
    max_buffered_bytes: Option<u64>,
    /// [store.url] where durable actions are stored: sqlite:PATH, or off
    /// (sqlite:callout-data/actions.db).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// [durable.max_pending] unfinished durable actions stored at most (100000).
    #[arg(long, value_name = "N")]
    durable_max_pending: Option<u64>,
    /// [fleet.redis_url] redis://host:port shared by a fleet: rate limits, 429 cool-downs and
    /// open circuits hold for every replica using it (none: each replica's own).
    #[arg(help_heading = "Limits", long, value_name = "URL")]
    redis_url: Option<String>,
}

/// Which destinations may be dialled (checked on every resolved address and redirect hop).
#[derive(clap::Args, Default)]
struct EgressFlags {
    /// [egress.allow_private_networks = true] dev mode: loopback and private ranges may be
    /// dialled. Cloud metadata and link-local stay denied.
    #[arg(long)]
    allow_private_networks: bool,
    /// [egress.allow] only destinations matching a rule are dialled: host pattern
    /// ("*.example.com", "api.example.com:443") or CIDR ("203.0.113.0/24"); repeatable.
    #[arg(long = "egress-allow", value_name = "RULE")]
    allow: Vec<EgressRule>,
    /// [egress.deny] never dial destinations matching a rule; repeatable.
    #[arg(long = "egress-deny", value_name = "RULE")]
    deny: Vec<EgressRule>,
    /// [egress.allowed_ports] ports that may be dialled, e.g. "443,8443".
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    allowed_ports: Vec<u16>,
    /// [client.resolve] addresses for HOST instead of DNS, "HOST=IP[,IP...]"; repeatable.
    #[arg(long = "resolve", value_name = "HOST=IPS", value_parser = parse_resolve)]
    resolve: Vec<(String, Vec<IpAddr>)>,
}

/// Where `{{secret:NAME}}` references in actions are read from.
#[derive(clap::Args, Default)]
struct SecretFlags {
    /// [secrets.dir] one file per secret (e.g. a mounted Kubernetes Secret); read at each use.
    #[arg(long, value_name = "DIR")]
    secrets_dir: Option<PathBuf>,
    /// [secrets.env_prefix] read secret NAME from the environment variable PREFIX+NAME.
    #[arg(long, value_name = "PREFIX")]
    secrets_env_prefix: Option<String>,
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

/// Flags as a config layer: each flag given becomes one key.
struct Layer(Figment);

impl Layer {
    fn set<T: Serialize>(self, key: &str, value: Option<T>) -> Self {
        match value {
            Some(value) => Self(self.0.merge((key, value))),
            None => self,
        }
    }
    fn list<T: Serialize>(self, key: &str, values: Vec<T>) -> Self {
        let value = (!values.is_empty()).then_some(values);
        self.set(key, value)
    }
    fn flag(self, key: &str, given: bool, value: bool) -> Self {
        self.set(key, given.then_some(value))
    }
    fn duration(self, key: &str, value: Option<Duration>) -> Self {
        self.set(key, value.map(|d| humantime::format_duration(d).to_string()))
    }
}

impl EgressFlags {
    fn layer(self, layer: Layer) -> Layer {
        let resolve: Option<std::collections::BTreeMap<String, Vec<IpAddr>>> =
            (!self.resolve.is_empty()).then(|| self.resolve.into_iter().collect());
        layer
            .flag("egress.allow_private_networks", self.allow_private_networks, true)
            .list("egress.allow", self.allow)
            .list("egress.deny", self.deny)
            .list("egress.allowed_ports", self.allowed_ports)
            .set("client.resolve", resolve)
    }
}

impl SecretFlags {
    fn layer(self, layer: Layer) -> Layer {
        layer.set("secrets.dir", self.secrets_dir).set("secrets.env_prefix", self.secrets_env_prefix)
    }
}

impl ServeArgs {
    /// The effective configuration: defaults < file < environment < these flags.
    fn config(self) -> Result<Config, String> {
        let f = self.flags;
        let layer = Layer(Config::layers(self.config.as_deref()))
            .set("server.listen", f.listen)
            .set("server.unix_socket_mode", f.unix_socket_mode)
            .set("server.auth_token_file", f.auth_token_file)
            .set("server.tls_cert", f.tls_cert)
            .set("server.tls_key", f.tls_key)
            .set("server.tls_client_ca", f.tls_client_ca)
            .duration("server.drain_timeout", f.drain_timeout)
            .duration("server.default_total_timeout", f.default_total_timeout)
            .set("server.stream_max_response_bytes", f.stream_max_response_bytes)
            .list("server.sensitive_headers", f.sensitive_headers)
            .set("server.worker_threads", f.worker_threads)
            .set("server.max_request_bytes", f.max_request_bytes)
            .set("log.format", f.log_format)
            .set("log.level", f.log_level)
            .set("log.actions", f.log_actions)
            .set("metrics.listen", f.metrics_listen)
            .flag("metrics.enabled", f.no_metrics, false)
            .duration("client.pool_idle_timeout", f.pool_idle_timeout)
            .set("client.pool_max_idle_per_host", f.pool_max_idle_per_host)
            .flag("client.http2", f.no_http2, false)
            .duration("client.tcp_keepalive", f.tcp_keepalive)
            .duration("client.http2_keep_alive_interval", f.http2_keep_alive_interval)
            .set("client.ca_file", f.ca_file)
            .set("client.proxy", f.proxy)
            .set("limits.max_in_flight", f.max_in_flight)
            .set("limits.max_queued", f.max_queued)
            .set("limits.max_in_flight_per_host", f.max_in_flight_per_host)
            .set("limits.global_rate_limit", f.global_rate_limit)
            .list("limits.rate_limits", f.rate_limits)
            .duration("limits.max_host_cool_down", f.max_host_cool_down)
            .set("limits.breaker_failures", f.breaker_failures)
            .duration("limits.breaker_cool_down", f.breaker_cool_down)
            .set("limits.max_buffered_bytes", f.max_buffered_bytes)
            .set("store.url", f.store)
            .set("durable.max_pending", f.durable_max_pending)
            .set("fleet.redis_url", f.redis_url);
        let layer = self.secrets.layer(self.egress.layer(layer));
        Config::extract(&layer.0).map_err(|e| e.to_string())
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum FailureMode {
    Abort,
    Continue,
}

/// A duration flag: plain seconds (`2`, `0.5`), or a number with a unit (`500ms`, `2m`, `1h`).
fn duration_arg(raw: &str) -> Result<Duration, String> {
    match raw.trim().parse::<f64>() {
        Ok(secs) => Duration::try_from_secs_f64(secs).map_err(|e| format!("{raw:?}: {e}")),
        Err(_) => humantime::parse_duration(raw)
            .map_err(|e| format!("{raw:?}: {e} (use seconds, or e.g. 500ms, 2m)")),
    }
}

#[derive(clap::Args)]
struct ExecArgs {
    /// `[METHOD] URL`: the method (GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS) and the absolute
    /// http or https URL. Without a method (here or -X): GET, or POST when a body is given.
    #[arg(value_name = "[METHOD] URL", num_args = 1..=2, required = true)]
    target: Vec<String>,
    /// The method, as curl's -X (instead of the METHOD argument).
    #[arg(short = 'X', long = "request", value_name = "METHOD")]
    request: Option<String>,
    /// Accept any server certificate and name (tls.insecure_skip_verify): for testing only,
    /// warned about on stderr.
    #[arg(short = 'k', long = "insecure")]
    insecure: bool,
    /// Write the outcome JSON to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Log each attempt on stderr (callout's debug logs); by default only warnings.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
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
    /// Connect timeout: seconds (`2.5`) or with a unit (`500ms`, `2m`).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    connect_timeout: Option<Duration>,
    /// Timeout of one attempt: seconds (`2.5`) or with a unit (`500ms`, `2m`).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    timeout: Option<Duration>,
    /// Timeout of all attempts and backoff: seconds (`2.5`) or with a unit (`500ms`, `2m`).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
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
    /// TOML config file; its egress, secrets and client settings apply.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    secrets: SecretFlags,
    #[command(flatten)]
    egress: EgressFlags,
    /// http(s):// or socks5(h):// proxy for this action (otherwise HTTPS_PROXY / HTTP_PROXY / NO_PROXY apply).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        // One action needs no more than one thread.
        Command::Exec(args) => match callout::runtime::build(1) {
            Ok(runtime) => runtime.block_on(exec(*args)),
            Err(e) => {
                eprintln!("callout: cannot start the runtime: {e}");
                ExitCode::from(3)
            }
        },
        Command::Config(ConfigCommand::Print(args)) => match args.config() {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("callout: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match callout::runtime::build(config.server.worker_threads) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("callout: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let telemetry = match telemetry::init(&config.telemetry_settings()) {
            Ok(telemetry) => telemetry,
            Err(e) => {
                eprintln!("callout: {e}");
                return ExitCode::from(2);
            }
        };
        let code = match run_server(config).await {
            Ok(()) => {
                tracing::info!("callout stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown();
        code
    })
}

/// Builds everything the configuration names, binds the listeners, serves until SIGTERM or
/// SIGINT and a drain.
async fn run_server(config: Config) -> Result<(), String> {
    let settings = config.exec_settings().map_err(|e| e.to_string())?;
    let buffered_bytes = settings.limits.max_buffered_bytes;
    let mut options = config.server_options().map_err(|e| e.to_string())?;
    let fleet = config.fleet_settings().map_err(|e| e.to_string())?;
    let listener = match &config.server.listen {
        ListenAddr::Tcp(addr) => tokio::net::TcpListener::bind(addr).await.map(Listener::Tcp),
        ListenAddr::Unix(path) => Listener::bind_unix(path.clone(), config.server.unix_socket_mode.0),
    }
    .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let metrics = if config.metrics.enabled {
        let bound = tokio::net::TcpListener::bind(config.metrics.listen)
            .await
            .map_err(|e| format!("cannot listen for metrics on {}: {e}", config.metrics.listen))?;
        Some(callout::metrics::install(bound, &config.metrics.settings()).map_err(|e| e.to_string())?)
    } else {
        None
    };
    // After the metrics recorder, so the fleet's first connection is counted.
    let fleet_shown =
        fleet.as_ref().map_or_else(|| "off".to_owned(), |f| callout::fleet::redacted_url(&f.redis_url));
    let shared: Option<Arc<dyn callout::client::shared::SharedLimits>> = match fleet {
        Some(fleet) => Some(Arc::new(RedisLimits::start(fleet).await.map_err(|e| e.to_string())?)),
        None => None,
    };
    let executor = Executor::with_shared_limits(settings, shared).map_err(|e| e.to_string())?;
    // After the metrics recorder, so the durable gauges are described to it.
    let store = config.store_url().map_err(|e| e.to_string())?;
    options.durable = durable(&config, &store, &executor).await?;
    let local = match &listener {
        Listener::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        Listener::Unix { path, .. } => format!("unix:{}", path.display()),
    };
    tracing::info!(
        listen = %local,
        metrics = %metrics.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        tls = options.tls.is_some(),
        mutual_tls = options.tls.as_ref().is_some_and(|t| t.client_ca_pem.is_some()),
        bearer_token = options.auth_token.is_some(),
        private_networks = config.egress.allow_private_networks,
        workers = tokio::runtime::Handle::current().metrics().num_workers(),
        // The memory budget for buffered bodies, derived from the cgroup limit unless set.
        max_buffered_bytes = buffered_bytes,
        fleet = %fleet_shown,
        store = %match &store {
            StoreUrl::Off => "off".to_owned(),
            StoreUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
        },
        "callout serving"
    );
    callout::server::serve_with(listener, executor, options, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

/// Durable actions on the configured store. A store that cannot be opened does not stop the
/// server: DurableActionService then answers UNAVAILABLE with the reason, and health says
/// NOT_SERVING for it.
async fn durable(config: &Config, store: &StoreUrl, executor: &Executor) -> Result<Option<Durable>, String> {
    let settings = config.durable_settings().map_err(|e| e.to_string())?;
    let path = match store {
        StoreUrl::Off => return Ok(None),
        StoreUrl::Sqlite(path) => path.clone(),
    };
    let sqlite = SqliteSettings { path: path.clone(), max_bytes: config.store.max_bytes };
    // Opening and migrating block on the file: off the runtime's threads.
    let opened = tokio::task::spawn_blocking(move || SqliteStore::open(&sqlite))
        .await
        .map_err(|e| format!("opening the store: {e}"))?;
    Ok(Some(match opened {
        Ok(store) => {
            tracing::info!(store = %path.display(), "durable actions stored in SQLite");
            Durable::start(Arc::new(store), executor.clone(), settings)
        }
        Err(e) => {
            tracing::error!(error = %e, store = %path.display(), "durable actions are unavailable");
            Durable::unavailable(e.to_string(), executor.clone(), settings)
        }
    }))
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received");
}

fn split_pair(raw: &str, sep: char, what: &str) -> Result<(String, String), String> {
    raw.split_once(sep)
        .map(|(k, v)| (k.trim().to_owned(), v.trim_start().to_owned()))
        .ok_or_else(|| format!("{what} {raw:?} must look like NAME{sep}VALUE"))
}

fn exec_input(args: ExecArgs) -> Result<ActionInput, String> {
    let (method, url) = match (&args.target[..], args.request) {
        ([method, url], None) => (method.clone(), url.clone()),
        ([_, _], Some(_)) => return Err("give the method once: as -X METHOD or as the first argument".into()),
        ([url], Some(method)) => (method, url.clone()),
        ([url], None) => {
            let body = args.json.is_some()
                || !args.form.is_empty()
                || args.data.is_some()
                || args.data_file.is_some();
            (if body { "POST" } else { "GET" }.to_owned(), url.clone())
        }
        _ => return Err("expected [METHOD] URL".into()),
    };
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
        method,
        url,
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
        tls: TlsInput { insecure_skip_verify: args.insecure, ..TlsInput::default() },
        ..ActionInput::default()
    })
}

async fn exec(mut args: ExecArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("callout: {e}");
        ExitCode::from(2)
    };
    let layer = Layer(Config::layers(args.config.as_deref()));
    let layer = std::mem::take(&mut args.secrets).layer(std::mem::take(&mut args.egress).layer(layer));
    let config = match Config::extract(&layer.0) {
        Ok(config) => config,
        Err(e) => return fail(e.to_string()),
    };
    // By hand, only warnings and errors go to stderr (-v: each attempt too): stdout is the outcome.
    let level = if args.verbose { "warn,callout=debug" } else { "warn" };
    let settings = TelemetrySettings { level: level.into(), ..config.telemetry_settings() };
    if args.insecure {
        eprintln!("callout: warning: -k/--insecure: the server's certificate and name are not verified");
    }
    let output = args.output.take();
    let telemetry = match telemetry::init(&settings) {
        Ok(telemetry) => telemetry,
        Err(e) => return fail(e),
    };
    let executor = match config
        .exec_settings()
        .map_err(|e| e.to_string())
        .and_then(|s| Executor::new(s).map_err(|e| e.to_string()))
    {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let action = match exec_input(args).and_then(|input| executor.action(input).map_err(|e| e.to_string())) {
        Ok(action) => action,
        Err(e) => return fail(e),
    };
    let outcome = executor.execute(&action, None).await;
    telemetry.shutdown();
    let proceed = outcome.proceed;
    // The reply a gRPC call would get, in the proto3 JSON grpcurl prints.
    let text = match callout::api::json::reply_json(&callout::api::convert::outcome(outcome)) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::from(3);
        }
    };
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(&path, text + "\n") {
                eprintln!("callout: writing {}: {e}", path.display());
                return ExitCode::from(3);
            }
        }
        None => println!("{text}"),
    }
    // README "Exit status": 0 proceed, 1 stop (2 invalid, 3 not run, above).
    if proceed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
