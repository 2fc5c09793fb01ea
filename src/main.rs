//! `callout serve` runs the gRPC sidecar; `callout exec` runs one action by hand through the
//! same executor and prints its outcome as JSON; `callout config print` shows the effective
//! configuration. Settings come from a TOML file, then `CALLOUT_SECTION__KEY` environment
//! variables, then the flags below (see `callout::config`).
#![forbid(unsafe_code)]
use callout::{
    action::{
        ActionInput, BodyInput, NextInput, OnFailure, PaginateInput, RedirectsInput, ReplyBody, RetryInput,
        TimeoutsInput, TlsInput,
    },
    client::{
        egress::EgressRule,
        rate_limit::{Rate, RateLimitRule},
    },
    config::{self, Config, ConfigError, FileMode, ListenAddr, StoreUrl},
    durable::Durable,
    exec::{ActionLog, Executor},
    fleet::RedisLimits,
    metrics::MetricsSettings,
    server::{Listener, ServerOptions},
    settings::SettingError,
    store::{
        postgres::{PostgresSettings, PostgresStore},
        sqlite::{SqliteSettings, SqliteStore},
    },
    telemetry::{self, LogFormat, LogSettings},
};
use clap::{Parser, Subcommand, ValueEnum};
use figment::Figment;
use serde::Serialize;
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
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

// Flags of `serve`: each overrides the config key named in brackets (defaults in
// callout.example.toml). A list flag given at least once replaces the key's list. Each struct
// serializes as the part of `Config` its flags set (`config::flags`): one struct per section,
// each field named as its key or renamed to it, a flag not given left out.

/// Every section's flags.
#[derive(clap::Args, Serialize)]
struct ServeFlags {
    // First: the flags under no heading, beside --config.
    #[command(flatten)]
    store: StoreFlags,
    #[command(flatten)]
    durable: DurableFlags,
    #[command(flatten)]
    fleet: FleetFlags,
    #[command(flatten, next_help_heading = "Server")]
    server: ServerFlags,
    #[command(flatten, next_help_heading = "Logging")]
    log: LogFlags,
    #[command(flatten, next_help_heading = "Metrics")]
    metrics: MetricsFlags,
    #[command(flatten, next_help_heading = "Upstream client")]
    client: ClientFlags,
    #[command(flatten, next_help_heading = "Limits")]
    limits: LimitFlags,
}

#[derive(clap::Args, Serialize)]
struct ServerFlags {
    /// [server.listen] IP:PORT, or unix:PATH for a Unix domain socket [default: 127.0.0.1:50051]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<ListenAddr>,
    /// [server.unix_socket_mode] file mode of the Unix socket, octal [default: 600]
    #[arg(long, value_name = "OCTAL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    unix_socket_mode: Option<FileMode>,
    /// [server.auth_token_file] bearer token action calls must send.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_token_file: Option<PathBuf>,
    /// [server.tls_cert] PEM certificate chain: TLS on the gRPC listener.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// [server.tls_key] PEM private key for --tls-cert.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// [server.tls_client_ca] PEM CAs client certificates must chain to (mutual TLS).
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_client_ca: Option<PathBuf>,
    /// [server.drain_timeout] on SIGTERM, how long in-flight actions may finish before they are
    /// cut off, answered CANCELLED [default: 25s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    drain_timeout: Option<Duration>,
    /// [server.default_total_timeout] total time of an action that sets none [default: 5m]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    default_total_timeout: Option<Duration>,
    /// [server.stream_max_response_bytes] body cap of ExecuteStream [default: 1 GiB]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_max_response_bytes: Option<u64>,
    /// [server.max_request_bytes] largest request message; larger calls get INVALID_ARGUMENT [default: 4 MiB]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_request_bytes: Option<u64>,
    /// [server.batch_max_in_flight] actions one ExecuteBatch stream runs at once, 1 to 10000 [default: 64]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch_max_in_flight: Option<usize>,
    /// [server.worker_threads] runtime workers; 0 is one per usable core, 1 a single thread [default: 0]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_threads: Option<usize>,
    /// [server.runtime] how more than one worker shares the work: per-core runtimes, or one work-stealing scheduler [default: per-core]
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    runtime: Option<callout::runtime::Layout>,
    /// [server.sensitive_headers] a header whose values are secret; repeatable.
    #[arg(long = "sensitive-header", value_name = "NAME")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sensitive_headers: Vec<String>,
}

#[derive(clap::Args, Serialize)]
struct LogFlags {
    /// [log.format] pretty or json [default: pretty]
    #[arg(long, value_enum)]
    #[serde(rename = "format", skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    /// [log.level] tracing filter, e.g. info or callout=debug (RUST_LOG wins when set).
    #[arg(long, value_name = "FILTER")]
    #[serde(rename = "level", skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    /// [log.actions] which finished actions get a log line [default: failed]
    #[arg(long, value_enum)]
    #[serde(rename = "actions", skip_serializing_if = "Option::is_none")]
    log_actions: Option<ActionLog>,
}

#[derive(clap::Args, Serialize)]
struct MetricsFlags {
    /// [metrics.listen] address of the Prometheus /metrics endpoint [default: 127.0.0.1:9464]
    #[arg(long, value_name = "ADDR")]
    #[serde(rename = "listen", skip_serializing_if = "Option::is_none")]
    metrics_listen: Option<SocketAddr>,
    /// [metrics.enabled = false] serve no metrics endpoint.
    #[arg(long)]
    #[serde(rename = "enabled", serialize_with = "negated", skip_serializing_if = "is_false")]
    no_metrics: bool,
}

#[derive(clap::Args, Serialize)]
struct ClientFlags {
    /// [client.pool_idle_timeout] idle pooled upstream connections are closed after this [default: 90s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pool_idle_timeout: Option<Duration>,
    /// [client.pool_max_idle_per_host] idle connections kept per host (per worker with the per-core
    /// runtime); 0 turns reuse off [default: 64]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pool_max_idle_per_host: Option<usize>,
    /// [client.http2 = false] do not offer HTTP/2 to https upstreams.
    #[arg(long)]
    #[serde(rename = "http2", serialize_with = "negated", skip_serializing_if = "is_false")]
    no_http2: bool,
    /// [client.tcp_keepalive] TCP keep-alive after this idle time; 0s turns it off [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    tcp_keepalive: Option<Duration>,
    /// [client.http2_keep_alive_interval] HTTP/2 PING interval [default: none]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    http2_keep_alive_interval: Option<Duration>,
    /// [client.ca_file] PEM file of extra CAs trusted for upstreams.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<PathBuf>,
    /// [client.proxy] http(s):// or socks5(h):// proxy for actions that set none (replaces HTTP(S)_PROXY).
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy: Option<String>,
}

#[derive(clap::Args, Serialize)]
struct LimitFlags {
    /// [limits.max_in_flight] actions running at once [default: 512]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight: Option<usize>,
    /// [limits.max_queued] actions waiting for a slot; past this, RESOURCE_EXHAUSTED [default: 2048]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_queued: Option<usize>,
    /// [limits.max_in_flight_per_host] attempts in flight to one host:port [default: 64]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_in_flight_per_host: Option<usize>,
    /// [limits.global_rate_limit] limit on all sends, e.g. "200/s burst 50".
    #[arg(long, value_name = "RATE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    global_rate_limit: Option<Rate>,
    /// [limits.rate_limits] "PATTERN=RATE" per destination, e.g. "*.example.com=10/s burst 20";
    /// repeatable, first match wins.
    #[arg(long = "rate-limit", value_name = "PATTERN=RATE")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rate_limits: Vec<RateLimitRule>,
    /// [limits.max_host_cool_down] longest shared cool-down from a 429 Retry-After [default: 10m]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    max_host_cool_down: Option<Duration>,
    /// [limits.breaker_failures] consecutive failures that open a circuit; 0 is off [default: 10]
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    breaker_failures: Option<u32>,
    /// [limits.breaker_cool_down] how long an open circuit refuses before a probe [default: 15s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    breaker_cool_down: Option<Duration>,
    /// [limits.max_buffered_bytes] bytes of buffered response bodies held at once (an eighth
    /// of the cgroup memory limit, else 512 MiB).
    #[arg(long, value_name = "BYTES")]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_buffered_bytes: Option<u64>,
}

#[derive(clap::Args, Serialize)]
struct StoreFlags {
    /// [store.url] where durable actions are stored: sqlite:PATH, postgres://USER@HOST/DB (a
    /// fleet's shared store), or off (sqlite:callout-data/actions.db).
    #[arg(long, value_name = "URL")]
    #[serde(rename = "url", skip_serializing_if = "Option::is_none")]
    store: Option<String>,
}

#[derive(clap::Args, Serialize)]
struct DurableFlags {
    /// [durable.max_pending] unfinished durable actions stored at most (100000).
    #[arg(long, value_name = "N")]
    #[serde(rename = "max_pending", skip_serializing_if = "Option::is_none")]
    durable_max_pending: Option<u64>,
}

#[derive(clap::Args, Serialize)]
struct FleetFlags {
    /// [fleet.redis_url] redis://host:port shared by a fleet: rate limits, 429 cool-downs and
    /// open circuits hold for every replica using it (none: each replica's own).
    #[arg(help_heading = "Limits", long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    redis_url: Option<String>,
}

/// Which destinations may be dialled (checked on every resolved address and redirect hop).
#[derive(clap::Args, Serialize)]
struct EgressFlags {
    #[command(flatten)]
    egress: EgressKeyFlags,
    #[command(flatten)]
    client: ResolveFlags,
}

#[derive(clap::Args, Serialize)]
struct EgressKeyFlags {
    /// [egress.allow_private_networks = true] dev mode: loopback and private ranges may be
    /// dialled. Cloud metadata and link-local stay denied.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    allow_private_networks: bool,
    /// [egress.allow] only destinations matching a rule are dialled: host pattern
    /// ("*.example.com", "api.example.com:443") or CIDR ("203.0.113.0/24"); repeatable.
    #[arg(long = "egress-allow", value_name = "RULE")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allow: Vec<EgressRule>,
    /// [egress.deny] never dial destinations matching a rule; repeatable.
    #[arg(long = "egress-deny", value_name = "RULE")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deny: Vec<EgressRule>,
    /// [egress.allowed_ports] ports that may be dialled, e.g. "443,8443".
    #[arg(long, value_name = "PORTS", value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_ports: Vec<u16>,
}

#[derive(clap::Args, Serialize)]
struct ResolveFlags {
    /// [client.resolve] addresses for HOST instead of DNS, "HOST=IP[,IP...]"; repeatable.
    #[arg(long = "resolve", value_name = "HOST=IPS", value_parser = parse_resolve)]
    #[serde(serialize_with = "as_map", skip_serializing_if = "Vec::is_empty")]
    resolve: Vec<(String, Vec<IpAddr>)>,
}

/// Where `{{secret:NAME}}` references in actions are read from.
#[derive(clap::Args, Serialize)]
struct SecretFlags {
    #[command(flatten)]
    secrets: SecretKeyFlags,
}

#[derive(clap::Args, Serialize)]
struct SecretKeyFlags {
    /// [secrets.dir] one file per secret (e.g. a mounted Kubernetes Secret); read at each use.
    #[arg(long, value_name = "DIR")]
    #[serde(rename = "dir", skip_serializing_if = "Option::is_none")]
    secrets_dir: Option<PathBuf>,
    /// [secrets.env_prefix] read secret NAME from the environment variable PREFIX+NAME.
    #[arg(long, value_name = "PREFIX")]
    #[serde(rename = "env_prefix", skip_serializing_if = "Option::is_none")]
    secrets_env_prefix: Option<String>,
}

fn is_false(flag: &bool) -> bool {
    !flag
}

/// A `--no-KEY` flag given sets KEY to false.
fn negated<S: serde::Serializer>(flag: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bool(!flag)
}

/// Repeated `KEY=VALUES` flags as the map key they set (a later flag for a key wins).
fn as_map<S: serde::Serializer>(pairs: &[(String, Vec<IpAddr>)], s: S) -> Result<S::Ok, S::Error> {
    let map: std::collections::BTreeMap<&String, &Vec<IpAddr>> = pairs.iter().map(|(k, v)| (k, v)).collect();
    s.collect_map(map)
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

/// The effective configuration and the layers it came from (for naming where a value that
/// cannot be used came from).
struct Loaded {
    config: Config,
    layers: Figment,
}

impl Loaded {
    /// Defaults < `file` < environment < the flags `merge_flags` adds (each group of flags its
    /// own layer: two groups may set keys of one section).
    fn new(file: Option<&Path>, merge_flags: impl FnOnce(Figment) -> Figment) -> Result<Self, String> {
        let layers = merge_flags(Config::layers(file));
        let config = Config::extract(&layers).map_err(|e| e.to_string())?;
        Ok(Self { config, layers })
    }

    /// A setting that cannot be used, said with where its value came from.
    fn error(&self, e: SettingError) -> String {
        ConfigError::setting(&self.layers, e).to_string()
    }
}

impl ServeArgs {
    /// The effective configuration: defaults < file < environment < these flags.
    fn load(&self) -> Result<Loaded, String> {
        Loaded::new(self.config.as_deref(), |layers| {
            layers
                .merge(config::flags(&self.flags))
                .merge(config::flags(&self.egress))
                .merge(config::flags(&self.secrets))
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ReplyBodyMode {
    Auto,
    All,
    Raw,
    None,
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
    /// Write the output to FILE instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// Print the response as curl -i does (status line, headers, a blank line, the body as
    /// received) instead of the outcome JSON; a failure's kind and message go to stderr.
    #[arg(short = 'i', long = "include")]
    include: bool,
    /// Send nothing: print the request callout would send (as the Render RPC answers it: its
    /// JSON, or with -i as HTTP/1.1 text), the egress verdict, proxy and policy. No token is
    /// fetched. Exit 0 when the egress policy would let it out, 1 when not (or the host does
    /// not resolve), 2 for an invalid action.
    #[arg(long)]
    dry_run: bool,
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
    /// Which body fields the outcome carries: auto (one: JSON, else text, else bytes), all, raw
    /// or none.
    #[arg(long, value_enum, default_value = "auto")]
    reply_body: ReplyBodyMode,
    /// A value to pick out of the JSON body, "name=$.json.path" (RFC 9535); repeatable.
    #[arg(long = "extract", value_name = "NAME=JSONPATH")]
    extract: Vec<String>,
    /// CEL over status, headers, body and elapsed_ms that must also hold for success.
    #[arg(long, value_name = "CEL")]
    success_condition: Option<String>,
    /// CEL over the same variables; true tries the attempt again (polling).
    #[arg(long, value_name = "CEL")]
    retry_condition: Option<String>,
    /// A string for `{{vars.NAME}}`, "NAME=VALUE"; repeatable.
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// A JSON value for `{{vars.NAME}}` (a number, object, ...), "NAME=JSON"; repeatable.
    #[arg(long = "var-json", value_name = "NAME=JSON")]
    vars_json: Vec<String>,
    /// On 202 Accepted with a Location, poll it (GET) until it answers something else
    /// (async_poll.enabled).
    #[arg(long)]
    async_poll: bool,
    /// Wait between polls when the 202 has no Retry-After (async_poll.interval; default 1s, at
    /// least 100ms): seconds (`2.5`) or with a unit (`500ms`, `2m`).
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    poll_interval: Option<Duration>,
    /// How long to keep polling from the first 202 (async_poll.max_wait; default the total
    /// timeout): seconds or with a unit.
    #[arg(long, value_name = "DURATION", value_parser = duration_arg)]
    poll_max_wait: Option<Duration>,
    /// Paginate by the Link header's rel="next" (the default when another --paginate-* or
    /// --items-path / --max-pages flag is given).
    #[arg(long, group = "paginate_next")]
    paginate_link: bool,
    /// Paginate by the next page's URL at this JSONPath in each page's body, e.g. "$.next".
    #[arg(long, value_name = "JSONPATH", group = "paginate_next")]
    paginate_next_url: Option<String>,
    /// Paginate by a cursor at JSONPATH in each page's body, written into the query parameter
    /// PARAM, e.g. "$.meta.next_cursor=cursor".
    #[arg(long, value_name = "JSONPATH=PARAM", group = "paginate_next")]
    paginate_cursor: Option<String>,
    /// With pagination: the JSONPath of each page's items (the outcome's "items"), e.g.
    /// "$.data[*]"; unset, a page that is a JSON array is its items.
    #[arg(long, value_name = "JSONPATH")]
    items_path: Option<String>,
    /// With pagination: the most pages fetched (1 to 1000; default 10).
    #[arg(long, value_name = "N")]
    max_pages: Option<u32>,
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
        Command::Exec(args) => match callout::runtime::core(0) {
            Ok(runtime) => runtime.block_on(exec(*args)),
            Err(e) => {
                eprintln!("callout: cannot start the runtime: {e}");
                ExitCode::from(3)
            }
        },
        Command::Config(ConfigCommand::Print(args)) => match args.load() {
            Ok(loaded) => {
                print!("{}", loaded.config.to_redacted_toml());
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
    let loaded = match args.load() {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("callout: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime =
        match callout::runtime::build(loaded.config.server.worker_threads, loaded.config.server.runtime) {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("callout: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
    runtime.block_on(async {
        let telemetry = match telemetry::init(&loaded.config.log, &loaded.config.tracing) {
            Ok(telemetry) => telemetry,
            Err(e) => {
                eprintln!("callout: {e}");
                return ExitCode::from(2);
            }
        };
        let code = match run_server(&loaded).await {
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
async fn run_server(loaded: &Loaded) -> Result<(), String> {
    let config = &loaded.config;
    let settings = config.exec_settings().map_err(|e| loaded.error(e))?;
    let buffered_bytes = settings.limits.buffered_bytes();
    let mut options = ServerOptions::try_from(&config.server).map_err(|e| loaded.error(e))?;
    let fleet = config.fleet_settings();
    let listener = match &config.server.listen {
        ListenAddr::Tcp(addr) => tokio::net::TcpListener::bind(addr).await.map(Listener::Tcp),
        ListenAddr::Unix(path) => Listener::bind_unix(path.clone(), config.server.unix_socket_mode.0),
    }
    .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let metrics = if config.metrics.enabled {
        let bound = tokio::net::TcpListener::bind(config.metrics.listen)
            .await
            .map_err(|e| format!("cannot listen for metrics on {}: {e}", config.metrics.listen))?;
        // Configured tenants are labels; any other tenant is `other`.
        let labels = MetricsSettings { tenants: config.tenants.names(), ..config.metrics.clone() };
        let bound = callout::metrics::install(bound, &labels).map_err(|e| e.to_string())?;
        // Each profile's OAuth2 series at zero from the first scrape.
        callout::metrics::oauth2_profiles(
            &config.auth.profiles.keys().map(String::as_str).collect::<Vec<_>>(),
        );
        Some(bound)
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
    let store = config.store_url().map_err(|e| loaded.error(e))?;
    options.durable = durable(config, &store, &executor).await?;
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
        workers = callout::runtime::workers(config.server.worker_threads),
        runtime = ?config.server.runtime,
        // The memory budget for buffered bodies, derived from the cgroup limit unless set.
        max_buffered_bytes = buffered_bytes,
        fleet = %fleet_shown,
        store = %match &store {
            StoreUrl::Off => "off".to_owned(),
            StoreUrl::Sqlite(path) => format!("sqlite:{}", path.display()),
            StoreUrl::Postgres(url) => url.shown.clone(),
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
    let settings = config.durable.clone();
    let path = match store {
        StoreUrl::Off => return Ok(None),
        StoreUrl::Sqlite(path) => path.clone(),
        StoreUrl::Postgres(url) => {
            let pg = &config.store.postgres;
            let postgres = PostgresSettings {
                url: url.url.clone(),
                shown: url.shown.clone(),
                pool_size: pg.pool_size,
                connect_timeout: pg.connect_timeout,
                orphan_hold: settings.lease,
            };
            // An unreachable database does not fail the open (the store answers UNAVAILABLE
            // and migrates once it can); a schema newer than this callout knows does.
            return Ok(Some(match PostgresStore::open(&postgres).await {
                Ok(store) => {
                    tracing::info!(store = %url.shown, "durable actions stored in PostgreSQL");
                    Durable::start(Arc::new(store), executor.clone(), settings)
                }
                Err(e) => {
                    tracing::error!(error = %e, store = %url.shown, "durable actions are unavailable");
                    Durable::unavailable(e.to_string(), executor.clone(), settings)
                }
            }));
        }
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

/// Writes what `callout exec` prints to `path`, or stdout.
fn write_output(path: Option<&Path>, bytes: &[u8]) -> Result<(), String> {
    match path {
        Some(path) => std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display())),
        None => {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(bytes).and_then(|()| stdout.flush()).map_err(|e| format!("writing stdout: {e}"))
        }
    }
}

/// `callout exec --dry-run`'s output and exit status: Render's reply as JSON, or (`-i`) the
/// request as HTTP/1.1 text with the verdict on stderr.
fn dry_run_output(
    rendered: Result<callout::render::Rendered, callout::action::ActionError>,
    include: bool,
    output: Option<&Path>,
) -> ExitCode {
    let rendered = match rendered {
        Ok(rendered) => rendered,
        Err(e) => {
            eprintln!("callout: {}: {}", e.kind.as_str(), e.message);
            return ExitCode::from(2);
        }
    };
    let allowed = rendered.route.allowed();
    let bytes = if include {
        let route = &rendered.route;
        if let Some(why) = route.denied.as_ref().or(route.resolve_error.as_ref()) {
            eprintln!("callout: would not be sent: {why}");
        } else if !allowed {
            let why = route.addresses.iter().find_map(|(_, verdict)| match verdict {
                callout::client::connect::AddressVerdict::Denied(rule) => Some(rule.as_str()),
                _ => None,
            });
            eprintln!(
                "callout: would not be sent: the egress policy denies every address of {} ({})",
                route.dialled,
                why.unwrap_or("no address")
            );
        }
        request_text(&rendered)
    } else {
        match callout::api::json::rendered_json(&callout::api::render::rendered(rendered)) {
            Ok(text) => (text + "\n").into_bytes(),
            Err(e) => {
                eprintln!("callout: {e}");
                return ExitCode::from(3);
            }
        }
    };
    if let Err(e) = write_output(output, &bytes) {
        eprintln!("callout: {e}");
        return ExitCode::from(3);
    }
    if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A rendered request as HTTP/1.1 text: request line (origin form), headers, a blank line, the
/// body (redacted).
fn request_text(rendered: &callout::render::Rendered) -> Vec<u8> {
    let target = rendered
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or("/");
    let mut out = format!("{} {target} HTTP/1.1\r\n", rendered.method).into_bytes();
    for (name, value) in &rendered.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&rendered.body);
    out
}

/// The response as `curl -i` prints it: status line, headers as received, a blank line, the
/// body bytes (empty when no response came back).
fn included(outcome: &callout::action::Outcome) -> Vec<u8> {
    let Some(response) = &outcome.response else {
        return Vec::new();
    };
    let head = &response.head;
    let status_line = format!("{} {} {}", head.version, head.status, head.reason);
    let mut out = format!("{}\r\n", status_line.trim_end()).into_bytes();
    for (name, value) in &head.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&response.body);
    out
}

fn split_pair(raw: &str, sep: char, what: &str) -> Result<(String, String), String> {
    raw.split_once(sep)
        .map(|(k, v)| (k.trim().to_owned(), v.trim_start().to_owned()))
        .ok_or_else(|| format!("{what} {raw:?} must look like NAME{sep}VALUE"))
}

fn exec_input(args: ExecArgs) -> Result<ActionInput, String> {
    let paginate = paginate_input(&args)?;
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
    let extract = args.extract.iter().map(|e| split_pair(e, '=', "extract")).collect::<Result<_, _>>()?;
    let mut vars = Vec::with_capacity(args.vars.len() + args.vars_json.len());
    for raw in &args.vars {
        let (name, value) = split_pair(raw, '=', "var")?;
        vars.push((name, serde_json::Value::String(value)));
    }
    for raw in &args.vars_json {
        let (name, value) = split_pair(raw, '=', "var-json")?;
        let value = serde_json::from_str(&value).map_err(|e| format!("--var-json {name}: not JSON: {e}"))?;
        vars.push((name, value));
    }
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
        reply_body: match args.reply_body {
            ReplyBodyMode::Auto => ReplyBody::Auto,
            ReplyBodyMode::All => ReplyBody::All,
            ReplyBodyMode::Raw => ReplyBody::Raw,
            ReplyBodyMode::None => ReplyBody::None,
        },
        extract,
        success_condition: args.success_condition.unwrap_or_default(),
        retry_condition: args.retry_condition.unwrap_or_default(),
        vars,
        async_poll: callout::action::poll::AsyncPollInput {
            enabled: args.async_poll,
            interval: args.poll_interval,
            max_wait: args.poll_max_wait,
        },
        paginate,
        ..ActionInput::default()
    })
}

/// `--paginate-*`, `--items-path` and `--max-pages` as the action's `paginate`; none given: none.
fn paginate_input(args: &ExecArgs) -> Result<Option<PaginateInput>, String> {
    let next = if let Some(path) = &args.paginate_next_url {
        NextInput::UrlPath(path.clone())
    } else if let Some(cursor) = &args.paginate_cursor {
        // The JSONPath may hold '=' (a filter): the parameter is after the last one.
        let (path, param) = cursor
            .rsplit_once('=')
            .ok_or_else(|| format!("--paginate-cursor {cursor:?}: expected JSONPATH=PARAM"))?;
        NextInput::Cursor { path: path.to_owned(), param: param.to_owned() }
    } else if args.paginate_link || args.items_path.is_some() || args.max_pages.is_some() {
        NextInput::LinkHeader
    } else {
        return Ok(None);
    };
    Ok(Some(PaginateInput {
        next,
        items_path: args.items_path.clone().unwrap_or_default(),
        max_pages: args.max_pages,
    }))
}

async fn exec(mut args: ExecArgs) -> ExitCode {
    let fail = |e: String| {
        eprintln!("callout: {e}");
        ExitCode::from(2)
    };
    let loaded = Loaded::new(args.config.as_deref(), |layers| {
        layers.merge(config::flags(&args.secrets)).merge(config::flags(&args.egress))
    });
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(e) => return fail(e),
    };
    let config = &loaded.config;
    // By hand, only warnings and errors go to stderr (-v: each attempt too): stdout is the outcome.
    let level = if args.verbose { "warn,callout=debug" } else { "warn" };
    let log = LogSettings { level: level.into(), ..config.log.clone() };
    if args.insecure {
        eprintln!("callout: warning: -k/--insecure: the server's certificate and name are not verified");
    }
    let output = args.output.take();
    let include = args.include;
    let dry_run = args.dry_run;
    let telemetry = match telemetry::init(&log, &config.tracing) {
        Ok(telemetry) => telemetry,
        Err(e) => return fail(e),
    };
    let executor = match config
        .exec_settings()
        .map_err(|e| loaded.error(e))
        .and_then(|s| Executor::new(s).map_err(|e| e.to_string()))
    {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let action = match exec_input(args).and_then(|input| executor.action(input).map_err(|e| e.to_string())) {
        Ok(action) => action,
        Err(e) => return fail(e),
    };
    if dry_run {
        let rendered = executor.render(&action, None).await;
        telemetry.shutdown();
        return dry_run_output(rendered, include, output.as_deref());
    }
    let outcome = executor.execute(&action, None).await;
    telemetry.shutdown();
    let proceed = outcome.proceed;
    let bytes = if include {
        if let Some(error) = &outcome.error {
            eprintln!("callout: {}: {}", error.kind.as_str(), error.message);
        }
        included(&outcome)
    } else {
        // The reply a gRPC call would get, in the proto3 JSON grpcurl prints.
        match callout::api::json::reply_json(&callout::api::convert::outcome(outcome)) {
            Ok(text) => (text + "\n").into_bytes(),
            Err(e) => {
                eprintln!("callout: {e}");
                return ExitCode::from(3);
            }
        }
    };
    if let Err(e) = write_output(output.as_deref(), &bytes) {
        eprintln!("callout: {e}");
        return ExitCode::from(3);
    }
    // README "Exit status": 0 proceed, 1 stop (2 invalid, 3 not run, above).
    if proceed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(args: &[&str]) -> Config {
        let cli = Cli::try_parse_from([&["callout", "config", "print"][..], args].concat()).unwrap();
        let Command::Config(ConfigCommand::Print(args)) = cli.command else { unreachable!() };
        args.load().unwrap().config
    }

    #[test]
    fn every_flag_lands_on_the_key_its_help_names() {
        let c = loaded(&[
            "--store=off",
            "--durable-max-pending=7",
            "--listen=unix:/tmp/c.sock",
            "--unix-socket-mode=640",
            "--auth-token-file=/t",
            "--tls-cert=/c",
            "--tls-key=/k",
            "--tls-client-ca=/ca",
            "--drain-timeout=3s",
            "--default-total-timeout=4s",
            "--stream-max-response-bytes=5",
            "--max-request-bytes=8192",
            "--batch-max-in-flight=7",
            "--worker-threads=2",
            "--sensitive-header=X-A",
            "--sensitive-header=X-B",
            "--log-format=json",
            "--log-level=debug",
            "--log-actions=all",
            "--metrics-listen=127.0.0.1:1",
            "--no-metrics",
            "--pool-idle-timeout=6s",
            "--pool-max-idle-per-host=0",
            "--no-http2",
            "--tcp-keepalive=0s",
            "--http2-keep-alive-interval=9s",
            "--ca-file=/ca.pem",
            "--proxy=http://p.test:3128",
            "--max-in-flight=10",
            "--max-queued=11",
            "--max-in-flight-per-host=12",
            "--global-rate-limit=5/s",
            "--rate-limit=a.test=1/s",
            "--max-host-cool-down=13s",
            "--breaker-failures=14",
            "--breaker-cool-down=15s",
            "--max-buffered-bytes=1048576",
            "--allow-private-networks",
            "--egress-allow=*.a.test",
            "--egress-deny=10.0.0.0/8",
            "--allowed-ports=443,8443",
            "--resolve=H.test=127.0.0.2",
            "--secrets-dir=/s",
            "--secrets-env-prefix=S_",
        ]);
        let s = &c.server;
        assert_eq!(s.listen, "unix:/tmp/c.sock".parse().unwrap());
        assert_eq!(s.unix_socket_mode.0, 0o640);
        assert_eq!(
            (
                s.auth_token_file.as_deref(),
                s.tls_cert.as_deref(),
                s.tls_key.as_deref(),
                s.tls_client_ca.as_deref()
            ),
            (Some(Path::new("/t")), Some(Path::new("/c")), Some(Path::new("/k")), Some(Path::new("/ca")))
        );
        assert_eq!(
            (s.drain_timeout, s.default_total_timeout),
            (Duration::from_secs(3), Duration::from_secs(4))
        );
        assert_eq!((s.stream_max_response_bytes, s.max_request_bytes, s.worker_threads), (5, 8192, 2));
        assert_eq!(s.batch_max_in_flight, 7);
        assert_eq!(s.sensitive_headers, ["x-a", "x-b"]);
        assert_eq!(
            (c.log.format, c.log.level.as_str(), c.log.actions),
            (LogFormat::Json, "debug", ActionLog::All)
        );
        assert_eq!((c.metrics.enabled, c.metrics.listen.port()), (false, 1));
        let cl = &c.client;
        assert_eq!(
            (cl.pool_idle_timeout, cl.pool_max_idle_per_host, cl.http2),
            (Duration::from_secs(6), 0, false)
        );
        assert_eq!(
            (cl.tcp_keepalive, cl.http2_keep_alive_interval),
            (Duration::ZERO, Some(Duration::from_secs(9)))
        );
        assert_eq!(
            (cl.ca_file.as_deref(), cl.proxy.as_deref()),
            (Some(Path::new("/ca.pem")), Some("http://p.test:3128"))
        );
        assert_eq!(cl.resolve.get("h.test"), Some(&vec![IpAddr::from([127, 0, 0, 2])]));
        let l = &c.limits;
        assert_eq!((l.max_in_flight, l.max_queued, l.max_in_flight_per_host), (10, 11, 12));
        assert_eq!(l.global_rate_limit, Some("5/s".parse().unwrap()));
        assert_eq!(l.rate_limits, vec!["a.test=1/s".parse().unwrap()]);
        assert_eq!((l.max_host_cool_down, l.breaker_failures), (Duration::from_secs(13), 14));
        assert_eq!((l.breaker_cool_down, l.max_buffered_bytes), (Duration::from_secs(15), Some(1 << 20)));
        let e = &c.egress;
        assert!(e.allow_private_networks);
        assert_eq!((e.allow.len(), e.deny.len(), &e.allowed_ports[..]), (1, 1, &[443, 8443][..]));
        assert_eq!(
            (c.secrets.dir.as_deref(), c.secrets.env_prefix.as_deref()),
            (Some(Path::new("/s")), Some("S_"))
        );
        assert_eq!((c.store.url.as_str(), c.durable.max_pending), ("off", 7));
    }

    #[test]
    fn flags_not_given_leave_the_lower_layers_alone() {
        assert_eq!(loaded(&[]), Config::default());
    }
}
