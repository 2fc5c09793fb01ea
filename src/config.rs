//! Server settings in two steps: `Config` is what an operator writes (a TOML file given with
//! `--config`, then `CALLOUT_SECTION__KEY` environment variables, then flags, each layer over
//! the one before; defaults run out of the box), and `Config::exec_settings` /
//! `Config::server_options` turn it into the validated settings the code runs on. A bad value
//! fails at start naming its key and where it came from. `callout.example.toml` documents every
//! key.
use crate::{
    action::ProxyUrl,
    client::{
        admission::LimitSettings,
        breaker::BreakerSettings,
        concurrency::ConcurrencySettings,
        egress::{EgressRule, EgressSettings},
        rate_limit::{Rate, RateLimitRule, RateLimitSettings},
        ClientSettings, Proxies,
    },
    durable::DurableSettings,
    exec::{ActionLog, ExecSettings},
    fleet::{FleetSettings, Unavailable},
    metrics::MetricsSettings,
    secrets::SecretSettings,
    server::{ServerOptions, ServerTls},
    telemetry::TelemetrySettings,
};
use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

/// Environment variables `CALLOUT_SECTION__KEY` (two underscores between section and key)
/// override the file, e.g. `CALLOUT_LIMITS__MAX_IN_FLIGHT=100`.
pub const ENV_PREFIX: &str = "CALLOUT_";

/// Everything an operator can set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub client: ClientConfig,
    pub limits: LimitsConfig,
    pub egress: EgressConfig,
    pub secrets: SecretsConfig,
    pub tracing: TracingConfig,
    pub store: StoreConfig,
    pub durable: DurableConfig,
    pub fleet: FleetConfig,
}

/// The gRPC listener and the actions' server-wide defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `IP:PORT`, or `unix:PATH` for a Unix domain socket. Default `127.0.0.1:50051`.
    pub listen: ListenAddr,
    /// File mode of the Unix socket, octal: `"600"` or `600`. Default `600`.
    pub unix_socket_mode: FileMode,
    /// File with the bearer token action calls must send. Default none.
    pub auth_token_file: Option<PathBuf>,
    /// PEM certificate chain and key: TLS on the listener. Default none.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CAs clients' certificates must chain to (mutual TLS). Default none.
    pub tls_client_ca: Option<PathBuf>,
    /// On SIGTERM, how long in-flight actions may run before exit. Default 25 s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Total time of an action that sets none. Default 5 min.
    #[serde(with = "humantime_serde")]
    pub default_total_timeout: Duration,
    /// Body cap of ExecuteStream, bytes. Default 1 GiB.
    pub stream_max_response_bytes: u64,
    /// Header names whose values are sensitive besides the built-in ones. Default none.
    pub sensitive_headers: Vec<String>,
    /// Runtime workers: 0 is one per usable core, 1 the current-thread scheduler. Default 0.
    pub worker_threads: usize,
    /// Largest request message a call may send, bytes; a larger one is INVALID_ARGUMENT.
    /// Default 4 MiB (gRPC's usual limit).
    pub max_request_bytes: u64,
}

/// Bounds of server.max_request_bytes.
const MIN_REQUEST_BYTES: u64 = 4 * 1024;
const MAX_REQUEST_BYTES: u64 = 1024 * 1024 * 1024;

/// More runtime workers than this is a typo, not a plan: each is an OS thread made at start.
const MAX_WORKER_THREADS: usize = 1024;

impl Default for ServerConfig {
    // The runtime settings' defaults are the one source; the config only names them.
    fn default() -> Self {
        let exec = ExecSettings::default();
        Self {
            listen: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 50051))),
            unix_socket_mode: FileMode(0o600),
            auth_token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            drain_timeout: ServerOptions::default().drain_timeout,
            default_total_timeout: exec.default_total_timeout,
            stream_max_response_bytes: exec.stream_max_response_bytes,
            sensitive_headers: Vec::new(),
            worker_threads: 0,
            max_request_bytes: ServerOptions::default().max_request_bytes as u64,
        }
    }
}

/// Log lines: format and level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` (human) or `json` (one object per line). Default `pretty`.
    pub format: LogFormat,
    /// A tracing filter: `info`, `debug`, `callout=debug,info`. `RUST_LOG`, when set, wins.
    /// Default `info`.
    pub level: String,
    /// Which finished actions get a line: `all`, `failed` or `off`. Default `failed`.
    pub actions: ActionLog,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: TelemetrySettings::default().level,
            actions: ExecSettings::default().action_log,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics`. Default true.
    pub enabled: bool,
    /// Where. Default `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// Destination hosts that get their own `host` label; others are counted as `other`.
    /// Empty (the default): the first `max_hosts` hosts seen get a label.
    pub hosts: Vec<String>,
    /// Most distinct `host` label values when `hosts` is empty. Default 50.
    pub max_hosts: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        let labels = MetricsSettings::default();
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            hosts: labels.hosts,
            max_hosts: labels.max_hosts,
        }
    }
}

impl MetricsConfig {
    /// The host labelling the metrics module runs on.
    pub fn settings(&self) -> MetricsSettings {
        MetricsSettings { hosts: self.hosts.clone(), max_hosts: self.max_hosts }
    }
}

/// The outbound HTTP client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Idle pooled connections are closed after this. Default 90 s.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// Idle connections kept per host; 0 turns reuse off. Default 64.
    pub pool_max_idle_per_host: usize,
    /// Offer HTTP/2 to https upstreams. Default true.
    pub http2: bool,
    /// TCP keep-alive after this idle time; `0s` turns it off. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// HTTP/2 PING interval; default none.
    #[serde(with = "humantime_serde::option")]
    pub http2_keep_alive_interval: Option<Duration>,
    /// PEM file of extra CAs trusted for upstreams. Default none.
    pub ca_file: Option<PathBuf>,
    /// `http://`, `https://`, `socks5://` or `socks5h://` `[user:pass@]host[:port]` proxy for
    /// actions that set none; replaces HTTPS_PROXY and HTTP_PROXY (NO_PROXY still applies).
    /// Default none.
    pub proxy: Option<String>,
    /// Fixed addresses per host name instead of DNS. Default none.
    pub resolve: BTreeMap<String, Vec<IpAddr>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let client = ClientSettings::default();
        Self {
            pool_idle_timeout: client.pool_idle_timeout,
            pool_max_idle_per_host: client.pool_max_idle_per_host,
            http2: client.http2,
            tcp_keepalive: client.tcp_keepalive.unwrap_or(Duration::ZERO),
            http2_keep_alive_interval: client.http2_keep_alive_interval,
            ca_file: None,
            proxy: None,
            resolve: BTreeMap::new(),
        }
    }
}

/// Queue bound, concurrency caps, rate limits, circuit breaking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Actions running at once. Default 512.
    pub max_in_flight: usize,
    /// Actions waiting for a slot; past this, RESOURCE_EXHAUSTED. Default 2048.
    pub max_queued: usize,
    /// Attempts in flight to one host:port. Default 64.
    pub max_in_flight_per_host: usize,
    /// Limit on all sends, `200/s` or `200/s burst 50`. Default none.
    pub global_rate_limit: Option<Rate>,
    /// `PATTERN=RATE` per destination, first match wins. Default none.
    pub rate_limits: Vec<RateLimitRule>,
    /// Longest shared cool-down a 429 Retry-After imposes. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub max_host_cool_down: Duration,
    /// Consecutive failures that open a destination's circuit; 0 is off. Default 10.
    pub breaker_failures: u32,
    /// How long an open circuit refuses before a probe. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub breaker_cool_down: Duration,
    /// Bytes of buffered response bodies held at once, server-wide. Default none: an eighth of
    /// the cgroup memory limit when there is one, else 512 MiB.
    pub max_buffered_bytes: Option<u64>,
}

/// A smaller memory budget than one body chunk could not buffer anything.
const MIN_BUFFERED_BYTES: u64 = crate::client::body_budget::MIN_STEP;

impl Default for LimitsConfig {
    fn default() -> Self {
        let concurrency = ConcurrencySettings::default();
        let rate = RateLimitSettings::default();
        let breaker = BreakerSettings::default();
        Self {
            max_in_flight: concurrency.max_in_flight,
            max_queued: concurrency.max_queued,
            max_in_flight_per_host: concurrency.max_in_flight_per_host,
            global_rate_limit: rate.global,
            rate_limits: rate.per_host,
            max_host_cool_down: rate.max_cool_down,
            breaker_failures: breaker.failure_threshold,
            breaker_cool_down: breaker.cool_down,
            max_buffered_bytes: None,
        }
    }
}

/// Which destinations may be dialled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// Dev mode: loopback and private ranges may be dialled. Default false.
    pub allow_private_networks: bool,
    /// Host patterns or CIDRs; when any, only matches are dialled. Default none.
    pub allow: Vec<EgressRule>,
    /// Host patterns or CIDRs never dialled. Default none.
    pub deny: Vec<EgressRule>,
    /// Ports that may be dialled; empty is any. Default any.
    pub allowed_ports: Vec<u16>,
}

/// Span export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/gRPC collector to export spans to, e.g. `http://127.0.0.1:4317`. Needs a build
    /// with `--features otlp`. Default none (spans are only logged).
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans. Default `callout`.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        let defaults = TelemetrySettings::default();
        Self { otlp_endpoint: defaults.otlp_endpoint, service_name: defaults.service_name }
    }
}

/// Where `{{secret:NAME}}` values come from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// One file per secret. Default none.
    pub dir: Option<PathBuf>,
    /// Read secret NAME from `{env_prefix}NAME`. Default none.
    pub env_prefix: Option<String>,
}

/// Where durable actions are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite:PATH` (relative to the working directory), or `off` to serve no durable
    /// actions. Default `sqlite:callout-data/actions.db`.
    pub url: String,
    /// Largest size of the store file in bytes; past it Submit is UNAVAILABLE as with a full
    /// disk. Default none (the disk's size).
    pub max_bytes: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self { url: "sqlite:callout-data/actions.db".into(), max_bytes: None }
    }
}

/// Which store `store.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Off,
    Sqlite(PathBuf),
}

impl FromStr for StoreUrl {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("off") || raw.eq_ignore_ascii_case("none") {
            return Ok(Self::Off);
        }
        match raw.strip_prefix("sqlite:") {
            Some(path) if !path.is_empty() => Ok(Self::Sqlite(PathBuf::from(path.trim_start_matches("//")))),
            Some(_) => Err("sqlite: needs a file path, e.g. sqlite:callout-data/actions.db".into()),
            None if raw.starts_with("postgres") => {
                Err(format!("{raw:?}: PostgreSQL stores are not supported yet; use sqlite:PATH"))
            }
            None => Err(format!("{raw:?} is not sqlite:PATH or off")),
        }
    }
}

/// Durable actions (DurableActionService).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DurableConfig {
    /// Unfinished actions stored at most; past this Submit is RESOURCE_EXHAUSTED. Default 100000.
    pub max_pending: u64,
    /// How long final actions are kept. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Header carrying the action id on durable POST and PATCH; empty adds none. Default
    /// `Idempotency-Key`.
    pub idempotency_header: String,
    /// Durable attempts in flight at once. Default 256.
    pub max_concurrent: usize,
    /// Durable attempts in flight to one destination at once. Default 32.
    pub max_concurrent_per_destination: usize,
}

impl Default for DurableConfig {
    fn default() -> Self {
        let d = DurableSettings::default();
        Self {
            max_pending: d.max_pending,
            retention: d.retention,
            idempotency_header: "Idempotency-Key".into(),
            max_concurrent: d.max_concurrent,
            max_concurrent_per_destination: d.max_concurrent_per_destination,
        }
    }
}

/// Fleet-wide limits shared through Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// `redis://[[user]:password@]host[:port][/db]`: the rate limits, 429 cool-downs and open
    /// circuits hold for every replica sharing it. Default none (each replica's own).
    pub redis_url: Option<String>,
    /// Prefix of every key in Redis. Default `callout:v1:`.
    pub key_prefix: String,
    /// Redis unreachable: `local` (each replica's own limits) or `deny` (refused,
    /// RATE_LIMITED). Default `local`.
    pub redis_unavailable: Unavailable,
    /// Longest wait for Redis on an attempt's way; slower counts as unreachable. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest wait for a connection to Redis. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        let f = FleetSettings::default();
        Self {
            redis_url: None,
            key_prefix: f.key_prefix,
            redis_unavailable: f.unavailable,
            timeout: f.timeout,
            connect_timeout: f.connect_timeout,
        }
    }
}

/// A file mode written in octal digits, as `chmod` takes it: `600` or `"600"` or `"0o600"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl FromStr for FileMode {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        u32::from_str_radix(raw.trim().trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(Self)
            .ok_or_else(|| format!("{raw:?} is not an octal file mode such as 600"))
    }
}

impl fmt::Display for FileMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:o}", self.0)
    }
}

impl Serialize for FileMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FileMode {
    /// A TOML integer or an environment value such as 660 is read as its octal digits.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Digits(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Digits(n) => n.to_string(),
            Raw::Text(s) => s,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A listen address: TCP, or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, String> {
        match raw.strip_prefix("unix:") {
            Some("") => Err("unix: needs a socket path, e.g. unix:/run/callout/callout.sock".into()),
            Some(path) => Ok(Self::Unix(PathBuf::from(path))),
            None => {
                raw.parse().map(Self::Tcp).map_err(|e| format!("{raw:?} is not IP:PORT or unix:PATH: {e}"))
            }
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl fmt::Display for RateLimitRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.pattern, self.rate)
    }
}

/// Types written as one string in the config: parsed with `FromStr`, printed with `Display`,
/// so a bad value's error is the parser's own, with figment adding the key.
macro_rules! serde_as_string {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_string!(ListenAddr, Rate, RateLimitRule, EgressRule);

/// Why the configuration is not usable; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // Every error of the chain (one per bad key), each with its key and source.
        Self(e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))
    }
}

impl Config {
    /// The layers under the flags: defaults, then `file` (which must exist when given), then
    /// `CALLOUT_SECTION__KEY` environment variables. Flags are merged on top by the caller
    /// with `Figment::merge(("section.key", value))`, then `Config::extract`.
    pub fn layers(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only double-underscore names are config keys, so prefixed variables of other uses
        // (a secrets env prefix such as CALLOUT_SECRET_) are not mistaken for keys.
        figment.merge(Env::prefixed(ENV_PREFIX).filter(|key| key.as_str().contains("__")).split("__"))
    }

    /// The configuration the layers make, checked.
    pub fn extract(figment: &Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract()?;
        config.check()?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    fn check(&self) -> Result<(), ConfigError> {
        self.sensitive_headers()?;
        for (key, value) in [
            ("limits.max_in_flight", self.limits.max_in_flight),
            ("limits.max_in_flight_per_host", self.limits.max_in_flight_per_host),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{key} must be at least 1")));
            }
        }
        // Below a few KiB no real action fits; past 1 GiB one call could take the memory.
        if !(MIN_REQUEST_BYTES..=MAX_REQUEST_BYTES).contains(&self.server.max_request_bytes) {
            return Err(ConfigError(format!(
                "server.max_request_bytes must be from {MIN_REQUEST_BYTES} to {MAX_REQUEST_BYTES} bytes"
            )));
        }
        if self.limits.max_buffered_bytes.is_some_and(|n| n < MIN_BUFFERED_BYTES) {
            return Err(ConfigError(format!(
                "limits.max_buffered_bytes must be at least {MIN_BUFFERED_BYTES} (bytes)"
            )));
        }
        if self.server.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError(format!(
                "server.worker_threads must be at most {MAX_WORKER_THREADS} (0 is one per usable core)"
            )));
        }
        if let Some(proxy) = &self.client.proxy {
            ProxyUrl::parse(proxy).map_err(|e| ConfigError(format!("client.proxy {e}")))?;
        }
        if self.server.tls_key.is_some() != self.server.tls_cert.is_some() {
            return Err(ConfigError("server.tls_cert and server.tls_key go together".into()));
        }
        if self.server.tls_client_ca.is_some() && self.server.tls_cert.is_none() {
            return Err(ConfigError("server.tls_client_ca needs server.tls_cert and server.tls_key".into()));
        }
        self.store_url()?;
        self.durable_settings()?;
        self.fleet_settings()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError(format!("log.level {:?}: {e}", self.log.level)))?;
        Ok(())
    }

    fn sensitive_headers(&self) -> Result<Vec<http::HeaderName>, ConfigError> {
        self.server
            .sensitive_headers
            .iter()
            .enumerate()
            .map(|(i, name)| {
                http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    ConfigError(format!("server.sensitive_headers[{i}] {name:?} is not a header name"))
                })
            })
            .collect()
    }

    /// The store `store.url` names.
    pub fn store_url(&self) -> Result<StoreUrl, ConfigError> {
        self.store.url.parse().map_err(|e| ConfigError(format!("store.url {e}")))
    }

    /// The fleet's settings, when `fleet.redis_url` is set.
    pub fn fleet_settings(&self) -> Result<Option<FleetSettings>, ConfigError> {
        let f = &self.fleet;
        let Some(url) = f.redis_url.as_deref().map(str::trim).filter(|url| !url.is_empty()) else {
            return Ok(None);
        };
        crate::fleet::check_url(url).map_err(|e| ConfigError(format!("fleet.redis_url {e}")))?;
        for (key, value) in [("fleet.timeout", f.timeout), ("fleet.connect_timeout", f.connect_timeout)] {
            if value.is_zero() {
                return Err(ConfigError(format!("{key} must be more than 0")));
            }
        }
        Ok(Some(FleetSettings {
            redis_url: url.to_owned(),
            key_prefix: f.key_prefix.clone(),
            unavailable: f.redis_unavailable,
            timeout: f.timeout,
            connect_timeout: f.connect_timeout,
        }))
    }

    /// The durable runner's settings.
    pub fn durable_settings(&self) -> Result<DurableSettings, ConfigError> {
        let d = &self.durable;
        for (key, value) in [
            ("durable.max_concurrent", d.max_concurrent),
            ("durable.max_concurrent_per_destination", d.max_concurrent_per_destination),
        ] {
            if value == 0 {
                return Err(ConfigError(format!("{key} must be at least 1")));
            }
        }
        let name = d.idempotency_header.trim();
        let idempotency_header = if name.is_empty() {
            None
        } else {
            Some(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError(format!("durable.idempotency_header {name:?} is not a header name"))
            })?)
        };
        Ok(DurableSettings {
            max_pending: d.max_pending,
            retention: d.retention,
            idempotency_header,
            max_concurrent: d.max_concurrent,
            max_concurrent_per_destination: d.max_concurrent_per_destination,
        })
    }

    /// The executor's settings. Reads `client.ca_file` and the proxy environment variables.
    pub fn exec_settings(&self) -> Result<ExecSettings, ConfigError> {
        let mut settings = ExecSettings {
            default_total_timeout: self.server.default_total_timeout,
            stream_max_response_bytes: self.server.stream_max_response_bytes,
            ..ExecSettings::default()
        };
        let c = &self.client;
        settings.client.pool_idle_timeout = c.pool_idle_timeout;
        settings.client.pool_max_idle_per_host = c.pool_max_idle_per_host;
        settings.client.http2 = c.http2;
        settings.client.tcp_keepalive = (!c.tcp_keepalive.is_zero()).then_some(c.tcp_keepalive);
        settings.client.http2_keep_alive_interval = c.http2_keep_alive_interval;
        if let Some(path) = &c.ca_file {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("client.ca_file: cannot read {}: {e}", path.display())))?;
            settings.client.extra_ca_pem = Some(pem);
        }
        let mut proxies = Proxies::from_env().map_err(ConfigError)?;
        if let Some(raw) = &c.proxy {
            let proxy = ProxyUrl::parse(raw).map_err(|e| ConfigError(format!("client.proxy {e}")))?;
            proxies = proxies.with_proxy(proxy);
        }
        settings.client.proxies = proxies;
        settings.client.resolve =
            c.resolve.iter().map(|(host, ips)| (host.to_ascii_lowercase(), ips.clone())).collect();
        settings.client.egress = EgressSettings {
            allow_private_networks: self.egress.allow_private_networks,
            allow: self.egress.allow.clone(),
            deny: self.egress.deny.clone(),
            allowed_ports: self.egress.allowed_ports.clone(),
        };
        let l = &self.limits;
        settings.limits = LimitSettings {
            concurrency: ConcurrencySettings {
                max_in_flight: l.max_in_flight,
                max_queued: l.max_queued,
                max_in_flight_per_host: l.max_in_flight_per_host,
            },
            rate: RateLimitSettings {
                global: l.global_rate_limit,
                per_host: l.rate_limits.clone(),
                max_cool_down: l.max_host_cool_down,
            },
            breaker: BreakerSettings {
                failure_threshold: l.breaker_failures,
                cool_down: l.breaker_cool_down,
            },
            max_buffered_bytes: l
                .max_buffered_bytes
                .unwrap_or_else(crate::client::body_budget::default_total),
        };
        settings.secrets =
            SecretSettings { dir: self.secrets.dir.clone(), env_prefix: self.secrets.env_prefix.clone() };
        settings.sensitive_headers = self.sensitive_headers()?;
        settings.action_log = self.log.actions;
        Ok(settings)
    }

    /// What the logs and span export are built from.
    pub fn telemetry_settings(&self) -> TelemetrySettings {
        TelemetrySettings {
            format: match self.log.format {
                LogFormat::Pretty => crate::telemetry::LogFormat::Pretty,
                LogFormat::Json => crate::telemetry::LogFormat::Json,
            },
            level: self.log.level.clone(),
            otlp_endpoint: self.tracing.otlp_endpoint.clone(),
            service_name: self.tracing.service_name.clone(),
        }
    }

    /// The listener's protection. Reads the token and TLS files.
    pub fn server_options(&self) -> Result<ServerOptions, ConfigError> {
        let read = |key: &str, path: &PathBuf| {
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("{key}: cannot read {}: {e}", path.display())))
        };
        let s = &self.server;
        let auth_token = match &s.auth_token_file {
            Some(path) => {
                let token = read("server.auth_token_file", path)?.trim().to_owned();
                if token.is_empty() {
                    return Err(ConfigError(format!("server.auth_token_file: {} is empty", path.display())));
                }
                Some(token)
            }
            None => None,
        };
        let tls = match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls {
                cert_pem: read("server.tls_cert", cert)?,
                key_pem: read("server.tls_key", key)?,
                client_ca_pem: s
                    .tls_client_ca
                    .as_ref()
                    .map(|ca| read("server.tls_client_ca", ca))
                    .transpose()?,
            }),
            _ => None,
        };
        // Checked in `extract` to lie within MIN_REQUEST_BYTES..=MAX_REQUEST_BYTES.
        let max_request_bytes = usize::try_from(s.max_request_bytes).unwrap_or(usize::MAX);
        Ok(ServerOptions {
            auth_token,
            tls,
            drain_timeout: s.drain_timeout,
            max_request_bytes,
            durable: None,
        })
    }

    /// The configuration as TOML, with credentials in the proxy URL hidden.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if let Some(proxy) = shown.client.proxy.as_mut() {
            if let Ok(parsed) = ProxyUrl::parse(proxy) {
                *proxy = parsed.redacted();
            }
        }
        if let Some(url) = shown.fleet.redis_url.as_mut() {
            *url = crate::fleet::redacted_url(url);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot show the configuration: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let text = Config::default().to_redacted_toml();
        let back: Config = Figment::from(Toml::string(&text)).extract().unwrap();
        assert_eq!(back, Config::default());
    }

    #[test]
    fn typed_strings_parse_and_bad_ones_name_their_key() {
        let toml = r#"
            [limits]
            global_rate_limit = "100/s burst 10"
            rate_limits = ["*.example.com=10/s"]
            [egress]
            allow = ["10.0.0.0/8", "*.corp.test"]
        "#;
        let config = Config::extract(
            &Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)),
        )
        .unwrap();
        assert_eq!(config.limits.rate_limits[0].to_string(), "*.example.com=10/s burst 10");
        let bad = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[limits]\nmax_in_flihgt = 3"));
        let err = Config::extract(&bad).unwrap_err().to_string();
        assert!(err.contains("max_in_flihgt"), "{err}");
        let bad = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string("[limits]\nglobal_rate_limit = \"1/d\""));
        let err = Config::extract(&bad).unwrap_err().to_string();
        assert!(err.contains("global_rate_limit") && err.contains("COUNT/UNIT"), "{err}");
        for (toml, key) in [
            ("[log]\nactions = \"some\"", "actions"),
            ("[server]\nworker_threads = 5000", "server.worker_threads"),
            ("[server]\nmax_request_bytes = 100", "server.max_request_bytes"),
            ("[server]\nmax_request_bytes = 2147483648", "server.max_request_bytes"),
            ("[server]\nworker_threads = -1", "worker_threads"),
            ("[limits]\nmax_buffered_bytes = 1000", "limits.max_buffered_bytes"),
            ("[limits]\nmax_buffered_bytes = \"64MiB\"", "max_buffered_bytes"),
        ] {
            let bad = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml));
            let err = Config::extract(&bad).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn file_modes_read_as_octal_digits_from_integers_and_strings() {
        let from = |toml: &str| {
            Config::extract(&Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)))
                .map(|c| c.server.unix_socket_mode.0)
        };
        assert_eq!(from("[server]\nunix_socket_mode = 660").unwrap(), 0o660);
        assert_eq!(from("[server]\nunix_socket_mode = \"0o640\"").unwrap(), 0o640);
        assert!(from("[server]\nunix_socket_mode = 999").is_err());
        assert!(from("[limits]\nmax_in_flight = 0")
            .unwrap_err()
            .to_string()
            .contains("limits.max_in_flight"));
    }

    #[test]
    fn fleet_settings_need_a_redis_url_and_name_their_keys() {
        let from = |toml: &str| {
            Config::extract(&Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)))
                .map_err(|e| e.to_string())
                .map(|c| c.fleet_settings().unwrap())
        };
        assert_eq!(from("").unwrap(), None);
        let f = from("[fleet]\nredis_url = \"redis://127.0.0.1:6379\"\nredis_unavailable = \"deny\"")
            .unwrap()
            .unwrap();
        assert_eq!((f.unavailable, f.key_prefix.as_str()), (Unavailable::Deny, "callout:v1:"));
        for (toml, key) in [
            ("[fleet]\nredis_url = \"http://h\"", "fleet.redis_url"),
            ("[fleet]\nredis_url = \"redis://h\"\ntimeout = \"0s\"", "fleet.timeout"),
            ("[fleet]\nredis_unavailable = \"maybe\"", "redis_unavailable"),
        ] {
            let err = from(toml).unwrap_err();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let mut config = Config::default();
        config.fleet.redis_url = Some("redis://:s3cret@127.0.0.1:6379".into());
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("s3cret") && shown.contains("redacted@127.0.0.1"), "{shown}");
    }

    #[test]
    fn proxy_credentials_are_redacted_when_printed() {
        let mut config = Config::default();
        config.client.proxy = Some("http://user:s3cret@proxy.test:3128".into());
        let shown = config.to_redacted_toml();
        assert!(!shown.contains("s3cret") && shown.contains("<redacted>@proxy.test:3128"), "{shown}");
    }
}
