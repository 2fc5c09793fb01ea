//! Server settings: `Config` is every section an operator can set, read in layers, each over
//! the one before: defaults, a TOML file given with `--config`, `CALLOUT_SECTION__KEY`
//! environment variables, then flags (`flags`). Each section is the settings struct the code it
//! configures runs on, declared beside that code with its one `Default`, and checked while it is
//! read, so a bad value fails at start naming its key and where it came from (file, variable or
//! flag). `callout.example.toml` documents every key.
//!
//! A new section is one line in `Config` (`pub name: NameSettings,`): a struct beside its
//! consumer deriving `Serialize`, `Deserialize`, with its `Default`, `#[serde(default,
//! deny_unknown_fields)]`, checked in its deserializers (`crate::settings`); keys documented in
//! callout.example.toml.
mod auth;
use crate::{
    action::ProxyUrl,
    client::{
        admission::LimitSettings,
        egress::{EgressRule, EgressSettings},
        rate_limit::{Rate, RateLimitRule},
        tenant::{TenantQuotaSettings, TenantSettings},
        ClientSettings,
    },
    durable::DurableSettings,
    exec::{ExecSettings, DEFAULT_TOTAL_TIMEOUT, STREAM_MAX_RESPONSE_BYTES},
    fleet::FleetSettings,
    metrics::MetricsSettings,
    runtime::Layout,
    secrets::SecretSettings,
    server::{ServerOptions, ServerTls},
    settings::{self, SettingError},
    telemetry::{LogSettings, TracingSettings},
};
pub use auth::{ApiKeyIn, AuthConfig, AuthProfileConfig};
use figment::{
    error::Kind,
    providers::{Env, Format, Serialized, Toml},
    value::{Dict, Map},
    Figment, Metadata, Profile, Provider,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

/// Environment variables `CALLOUT_SECTION__KEY` (two underscores between section and key)
/// override the file, e.g. `CALLOUT_LIMITS__MAX_IN_FLIGHT=100`.
pub const ENV_PREFIX: &str = "CALLOUT_";

/// Everything an operator can set: one field per section, its type the section's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub client: ClientSettings,
    pub limits: LimitSettings,
    pub egress: EgressSettings,
    pub secrets: SecretSettings,
    pub tracing: TracingSettings,
    pub store: StoreConfig,
    pub durable: DurableSettings,
    pub tenants: TenantsConfig,
    pub auth: AuthConfig,
    pub fleet: FleetSettings,
}

/// The `[server]` section: the gRPC listener and the actions' server-wide defaults. Read by
/// three: the listener (`ServerOptions::try_from`, which reads the files named here), the
/// executor (`Config::exec_settings`) and `main` (address, socket mode, workers).
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
    #[serde(with = "settings::header_names")]
    pub sensitive_headers: Vec<http::HeaderName>,
    /// Runtime workers: 0 is one per usable core, 1 the current-thread scheduler, at most
    /// 1024. Default 0.
    #[serde(deserialize_with = "worker_threads")]
    pub worker_threads: usize,
    /// How more than one worker shares the work: `per-core` (one current-thread runtime per
    /// worker, connections dealt out to them) or `work-stealing`. Default per-core.
    pub runtime: Layout,
    /// Largest request message a call may send, bytes, 4 KiB to 1 GiB; a larger one is
    /// INVALID_ARGUMENT. Default 4 MiB (gRPC's usual limit).
    #[serde(deserialize_with = "max_request_bytes")]
    pub max_request_bytes: u64,
    /// Actions one ExecuteBatch stream runs at once, 1 to 10,000; the stream reads the next
    /// action only when one of them has finished. Default 64.
    #[serde(deserialize_with = "batch_max_in_flight")]
    pub batch_max_in_flight: usize,
}

/// Bounds of server.max_request_bytes: below a few KiB no real action fits; past 1 GiB one
/// call could take the memory.
const MIN_REQUEST_BYTES: u64 = 4 * 1024;
const MAX_REQUEST_BYTES: u64 = 1024 * 1024 * 1024;

/// More runtime workers than this is a typo, not a plan: each is an OS thread made at start.
const MAX_WORKER_THREADS: usize = 1024;

fn worker_threads<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        n if n > MAX_WORKER_THREADS => Err(serde::de::Error::custom(format!(
            "must be at most {MAX_WORKER_THREADS} (0 is one per usable core)"
        ))),
        n => Ok(n),
    }
}

/// Most actions one batch stream may run at once: past this one caller's stream is the queue.
const MAX_BATCH_IN_FLIGHT: usize = 10_000;

fn batch_max_in_flight<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        n if !(1..=MAX_BATCH_IN_FLIGHT).contains(&n) => {
            Err(serde::de::Error::custom(format!("must be from 1 to {MAX_BATCH_IN_FLIGHT}")))
        }
        n => Ok(n),
    }
}

fn max_request_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match u64::deserialize(d)? {
        n if !(MIN_REQUEST_BYTES..=MAX_REQUEST_BYTES).contains(&n) => Err(serde::de::Error::custom(format!(
            "must be from {MIN_REQUEST_BYTES} to {MAX_REQUEST_BYTES} bytes"
        ))),
        n => Ok(n),
    }
}

impl Default for ServerConfig {
    // The listener's and the executor's own defaults, named once there.
    fn default() -> Self {
        let options = ServerOptions::default();
        Self {
            listen: ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 50051))),
            unix_socket_mode: FileMode(0o600),
            auth_token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            drain_timeout: options.drain_timeout,
            default_total_timeout: DEFAULT_TOTAL_TIMEOUT,
            stream_max_response_bytes: STREAM_MAX_RESPONSE_BYTES,
            sensitive_headers: Vec::new(),
            worker_threads: 0,
            runtime: Layout::default(),
            max_request_bytes: options.max_request_bytes as u64,
            batch_max_in_flight: options.batch_max_in_flight,
        }
    }
}

impl ServerConfig {
    /// Checks what one key's type cannot: keys that go together.
    fn check(&self) -> Result<(), SettingError> {
        if self.tls_key.is_some() != self.tls_cert.is_some() {
            let key = if self.tls_key.is_some() { "server.tls_key" } else { "server.tls_cert" };
            return Err(SettingError::new(key, "server.tls_cert and server.tls_key go together"));
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(SettingError::new(
                "server.tls_client_ca",
                "needs server.tls_cert and server.tls_key",
            ));
        }
        Ok(())
    }
}

impl TryFrom<&ServerConfig> for ServerOptions {
    type Error = SettingError;

    /// The listener's protection, with the token and TLS files read.
    fn try_from(s: &ServerConfig) -> Result<Self, SettingError> {
        let read = |key: &'static str, path: &PathBuf| {
            std::fs::read_to_string(path)
                .map_err(|e| SettingError::new(key, format!("cannot read {}: {e}", path.display())))
        };
        let auth_token = match &s.auth_token_file {
            Some(path) => {
                let token = read("server.auth_token_file", path)?.trim().to_owned();
                if token.is_empty() {
                    return Err(SettingError::new(
                        "server.auth_token_file",
                        format!("{} is empty", path.display()),
                    ));
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
        // Read within MIN_REQUEST_BYTES..=MAX_REQUEST_BYTES.
        let max_request_bytes = usize::try_from(s.max_request_bytes).unwrap_or(usize::MAX);
        Ok(ServerOptions {
            auth_token,
            tls,
            drain_timeout: s.drain_timeout,
            max_request_bytes,
            batch_max_in_flight: s.batch_max_in_flight,
            cores: crate::runtime::cores(s.worker_threads, s.runtime),
            durable: None,
        })
    }
}

/// The `[store]` section: where durable actions are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite:PATH` (relative to the working directory), `postgres://…` (or `postgresql://…`)
    /// for a store shared by a fleet, or `off` to serve no durable actions. Default
    /// `sqlite:callout-data/actions.db`.
    #[serde(deserialize_with = "store_url")]
    pub url: String,
    /// Largest size of the store file in bytes; past it Submit is UNAVAILABLE as with a full
    /// disk. Default none (the disk's size). SQLite only.
    pub max_bytes: Option<u64>,
    /// The PostgreSQL store's connection pool.
    pub postgres: PostgresConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite:callout-data/actions.db".into(),
            max_bytes: None,
            postgres: PostgresConfig::default(),
        }
    }
}

/// The PostgreSQL store's pool (`[store.postgres]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connections in the pool at most (the change listener has one more of its own). Default 8.
    #[serde(deserialize_with = "crate::settings::at_least_one")]
    pub pool_size: usize,
    /// How long connecting (or waiting for a pooled connection) may take before the call is
    /// UNAVAILABLE. Default 5s.
    #[serde(serialize_with = "humantime_serde::serialize", deserialize_with = "positive_duration")]
    pub connect_timeout: Duration,
}

fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match humantime_serde::deserialize::<Duration, D>(d)? {
        t if t.is_zero() => Err(serde::de::Error::custom("must be more than 0s")),
        t => Ok(t),
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self { pool_size: 8, connect_timeout: Duration::from_secs(5) }
    }
}

/// A `store.url` that names a store.
fn store_url<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let url = String::deserialize(d)?;
    url.parse::<StoreUrl>().map_err(serde::de::Error::custom)?;
    Ok(url)
}

/// Which store `store.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Off,
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

/// A PostgreSQL connection URL. It may hold a password: only `shown` (no password) is ever
/// printed.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresUrl {
    /// The URL as written (secret).
    pub url: String,
    /// `postgres://user@host:port/database`, for logs and errors.
    pub shown: String,
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PostgresUrl {
    /// The URL with its password (in the user part or a `password` parameter) replaced.
    pub fn redacted(&self) -> String {
        let Ok(mut url) = url::Url::parse(&self.url) else { return self.shown.clone() };
        if url.password().is_some() {
            let _ = url.set_password(Some("REDACTED"));
        }
        if url.query_pairs().any(|(k, _)| k == "password") {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let v = if k == "password" { "REDACTED".to_owned() } else { v.into_owned() };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
    }

    fn parse(raw: &str) -> Result<Self, String> {
        // The parser's own messages may quote the URL (and so a password): not repeated here.
        let config: tokio_postgres::Config = raw.parse().map_err(|_| {
            "is not a valid PostgreSQL URL: expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
                .to_owned()
        })?;
        if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            return Err("asks for sslmode=require: callout connects to PostgreSQL without TLS (use a \
                        loopback, a private network or a TLS-terminating proxy)"
                .into());
        }
        let host = config
            .get_hosts()
            .first()
            .map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("");
        let database = config.get_dbname().unwrap_or(user);
        let at = if user.is_empty() { String::new() } else { format!("{user}@") };
        Ok(Self { url: raw.to_owned(), shown: format!("postgres://{at}{host}:{port}/{database}") })
    }
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
            None if raw.starts_with("postgres://") || raw.starts_with("postgresql://") => {
                PostgresUrl::parse(raw).map(Self::Postgres)
            }
            None if raw.starts_with("postgres") => {
                Err("a PostgreSQL store is written postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE".into())
            }
            None => Err(format!("{raw:?} is not sqlite:PATH, postgres://… or off")),
        }
    }
}

/// The `[tenants]` section: quotas by the action's `tenant`, `[tenants.NAME]` for a named
/// tenant (its name is also its metrics label), `[tenants.default]` for every other tenant
/// (each on its own). Names are checked as they are read.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct TenantsConfig(pub BTreeMap<String, TenantConfig>);

/// The section of the tenants not named.
const DEFAULT_TENANT: &str = "default";
/// Most weight a tenant may have: a typo past this would starve everyone else.
const MAX_TENANT_WEIGHT: u32 = 1000;

impl Default for TenantsConfig {
    fn default() -> Self {
        Self([(DEFAULT_TENANT.to_owned(), TenantConfig::default())].into())
    }
}

impl<'de> Deserialize<'de> for TenantsConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut tenants = BTreeMap::<String, TenantConfig>::deserialize(d)?;
        for name in tenants.keys().filter(|name| *name != DEFAULT_TENANT) {
            if let Some(problem) = crate::action::tenant_name_problem(name) {
                return Err(D::Error::custom(format!("the tenant name {name:?} {problem}")));
            }
            if [crate::metrics::TENANT_OTHER, crate::metrics::TENANT_NONE].contains(&&**name) {
                return Err(D::Error::custom(format!(
                    "{name:?} is the metrics label of unnamed tenants; name the tenant otherwise"
                )));
            }
        }
        tenants.entry(DEFAULT_TENANT.to_owned()).or_default();
        Ok(Self(tenants))
    }
}

/// One tenant's quotas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's actions running at once. Default none (only `limits`).
    #[serde(deserialize_with = "some_at_least_one")]
    pub max_concurrent: Option<usize>,
    /// The tenant's sends (every attempt), `100/s` or `100/s burst 20`. Default none.
    pub rate: Option<Rate>,
    /// Share of the running slots while tenants wait for them, 1 to 1000. Default 1.
    #[serde(deserialize_with = "tenant_weight")]
    pub weight: u32,
    /// The tenant's actions waiting for a running slot at once (0: none wait); one more is
    /// refused at once (RESOURCE_EXHAUSTED, reason TENANT_QUEUE_FULL), so one tenant's flood
    /// cannot fill the server's queue. Default none: only `limits.max_queued`.
    pub max_queued: Option<usize>,
}

impl Default for TenantConfig {
    fn default() -> Self {
        let quota = TenantQuotaSettings::default();
        Self {
            max_concurrent: quota.max_concurrent,
            rate: quota.rate,
            weight: quota.weight,
            max_queued: quota.max_queued,
        }
    }
}

fn some_at_least_one<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    match Option::<usize>::deserialize(d)? {
        Some(0) => Err(serde::de::Error::custom("must be at least 1")),
        n => Ok(n),
    }
}

fn tenant_weight<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    match u32::deserialize(d)? {
        w if (1..=MAX_TENANT_WEIGHT).contains(&w) => Ok(w),
        _ => Err(serde::de::Error::custom(format!("must be from 1 to {MAX_TENANT_WEIGHT}"))),
    }
}

impl TenantsConfig {
    /// The configured tenants' names (`default` is not one).
    pub fn names(&self) -> Vec<String> {
        self.0.keys().filter(|name| *name != DEFAULT_TENANT).cloned().collect()
    }

    /// The quotas the limits run on.
    pub fn settings(&self) -> TenantSettings {
        let mut settings = TenantSettings::default();
        for (name, tenant) in &self.0 {
            let quota = TenantQuotaSettings {
                max_concurrent: tenant.max_concurrent,
                rate: tenant.rate,
                weight: tenant.weight,
                max_queued: tenant.max_queued,
            };
            if name == DEFAULT_TENANT {
                settings.default = quota;
            } else {
                settings.named.insert(name.clone(), quota);
            }
        }
        settings
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

/// A layer of the configuration under a name an operator knows it by.
struct Named<P> {
    provider: P,
    metadata: Metadata,
}

impl<P: Provider> Provider for Named<P> {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.provider.data()
    }
}

const ENV_SOURCE: &str = "environment variable";

/// The flags of a command as the top configuration layer: `flags` serializes as the sections
/// and keys it sets, leaving out each flag not given (`skip_serializing_if`), so each flag lands
/// on its key with no table of names.
pub fn flags<T: Serialize>(flags: T) -> impl Provider {
    Named { provider: Serialized::defaults(flags), metadata: Metadata::named("command-line flags") }
}

/// Why the configuration is not usable; each message names the key and where its value came
/// from.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// Where the value at `keys` came from, as the operator wrote it.
fn origin(metadata: &Metadata, keys: &[&str]) -> String {
    match &metadata.source {
        Some(source) => format!("{} {source}", metadata.name),
        None if metadata.name == ENV_SOURCE => {
            format!("{} {}", metadata.name, metadata.interpolate(&Profile::Default, keys))
        }
        None => metadata.name.to_string(),
    }
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // Every error of the chain (one per bad key), each with its key and source.
        let each = e.into_iter().map(|e| {
            let mut keys: Vec<&str> = e.path.iter().map(String::as_str).collect();
            // An unknown key is named in full, whether or not figment's path has it.
            if let Kind::UnknownField(field, _) = &e.kind {
                if keys.last() != Some(&field.as_str()) {
                    keys.push(field);
                }
            }
            let key = keys.join(".");
            let what = e.kind.to_string();
            let what = what.trim();
            let mut line = if key.is_empty() { what.to_owned() } else { format!("{key}: {what}") };
            if let Some(metadata) = &e.metadata {
                line.push_str(&format!(" (from {})", origin(metadata, &keys)));
            }
            line
        });
        Self(each.collect::<Vec<_>>().join("; "))
    }
}

impl ConfigError {
    /// A setting that cannot be used, with where `figment` took its value from.
    pub fn setting(figment: &Figment, e: SettingError) -> Self {
        let keys: Vec<&str> = e.key.split('.').collect();
        match (!e.key.is_empty()).then(|| figment.find_metadata(e.key)).flatten() {
            Some(metadata) => Self(format!("{e} (from {})", origin(metadata, &keys))),
            None => Self(e.to_string()),
        }
    }
}

impl Config {
    /// The layers under the flags: defaults, then `file` (which must exist when given), then
    /// `CALLOUT_SECTION__KEY` environment variables. Flags are merged on top by the caller
    /// with `Figment::merge(config::flags(…))`, then `Config::extract`.
    pub fn layers(file: Option<&Path>) -> Figment {
        let defaults = Named {
            provider: Serialized::defaults(Config::default()),
            metadata: Metadata::named("defaults"),
        };
        let mut figment = Figment::from(defaults);
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment.merge(env(ENV_PREFIX))
    }

    /// The configuration the layers make, checked.
    pub fn extract(figment: &Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract()?;
        config.server.check().map_err(|e| ConfigError::setting(figment, e))?;
        Ok(config)
    }

    /// The store `store.url` names.
    pub fn store_url(&self) -> Result<StoreUrl, SettingError> {
        self.store.url.parse().map_err(|e| SettingError::new("store.url", e))
    }

    /// The fleet's settings, when `fleet.redis_url` is set.
    pub fn fleet_settings(&self) -> Option<FleetSettings> {
        self.fleet.configured().cloned()
    }

    /// The executor's settings: its sections whole, and the action defaults of `[server]` and
    /// `[log]`. Reads `client.ca_file` and the proxy environment variables.
    pub fn exec_settings(&self) -> Result<ExecSettings, SettingError> {
        Ok(ExecSettings {
            default_total_timeout: self.server.default_total_timeout,
            stream_max_response_bytes: self.server.stream_max_response_bytes,
            client: self.client.clone().load()?,
            egress: self.egress.clone(),
            limits: self.limits.clone(),
            secrets: self.secrets.clone(),
            sensitive_headers: self.server.sensitive_headers.clone(),
            action_log: self.log.actions,
            tenants: self.tenants.settings(),
            auth_profiles: self.auth.profiles()?,
            tokens: Default::default(),
        })
    }

    /// The configuration as TOML, with credentials in the proxy URL hidden.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        for profile in shown.auth.profiles.values_mut() {
            profile.redact();
        }
        if let Some(proxy) = shown.client.proxy.as_mut() {
            if let Ok(parsed) = ProxyUrl::parse(proxy) {
                *proxy = parsed.redacted();
            }
        }
        if let Ok(StoreUrl::Postgres(url)) = shown.store.url.parse::<StoreUrl>() {
            shown.store.url = url.redacted();
        }
        if !shown.fleet.redis_url.is_empty() {
            shown.fleet.redis_url = crate::fleet::redacted_url(&shown.fleet.redis_url);
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot show the configuration: {e}\n"))
    }
}

/// `{prefix}SECTION__KEY` environment variables, each named as itself in errors.
fn env(prefix: &'static str) -> impl Provider {
    // Only double-underscore names are config keys, so prefixed variables of other uses
    // (a secrets env prefix such as CALLOUT_SECRET_) are not mistaken for keys.
    let provider = Env::prefixed(prefix).filter(|key| key.as_str().contains("__")).split("__");
    let metadata = Metadata::named(ENV_SOURCE).interpolater(move |_: &Profile, keys: &[&str]| {
        let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
        format!("{prefix}{}", keys.join("__"))
    });
    Named { provider, metadata }
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
            ("[server]\nbatch_max_in_flight = 0", "server.batch_max_in_flight"),
            ("[server]\nbatch_max_in_flight = 10001", "server.batch_max_in_flight"),
            ("[server]\nworker_threads = -1", "worker_threads"),
            ("[server]\nruntime = \"bogus\"", "server.runtime"),
            ("[limits]\nmax_buffered_bytes = 1000", "limits.max_buffered_bytes"),
            ("[limits]\nmax_buffered_bytes = \"64MiB\"", "max_buffered_bytes"),
        ] {
            let bad = Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml));
            let err = Config::extract(&bad).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn tenants_have_a_default_and_named_sections_and_bad_ones_name_their_key() {
        let extract = |toml: &str| {
            Config::extract(&Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)))
        };
        let config =
            extract("[tenants.default]\nmax_concurrent = 2\nmax_queued = 0\n[tenants.acme]\nrate = \"10/s\"\nweight = 3\n")
                .unwrap();
        let settings = config.exec_settings().unwrap().tenants;
        assert_eq!(settings.default.max_concurrent, Some(2));
        assert_eq!((settings.default.max_queued, settings.named["acme"].max_queued), (Some(0), None));
        assert_eq!(settings.named["acme"].weight, 3);
        assert_eq!(settings.named["acme"].rate.unwrap().to_string(), "10/s burst 10");
        assert_eq!(config.tenants.names(), ["acme"]);
        for (toml, key) in [
            ("[tenants.\"a b\"]\nweight = 1", "tenants: the tenant name \"a b\""),
            ("[tenants.other]\nweight = 1", "tenants: \"other\" is the metrics label"),
            ("[tenants.acme]\nmax_concurrent = 0", "tenants.acme.max_concurrent"),
            ("[tenants.default]\nweight = 0", "tenants.default.weight"),
            ("[tenants.acme]\nrate = \"1/d\"", "tenants.acme.rate"),
            ("[tenants.acme]\nmax_queued = -1", "tenants.acme.max_queued"),
            ("[tenants.acme]\nmax_concurent = 1", "max_concurent"),
        ] {
            let err = extract(toml).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn postgres_urls_parse_without_showing_their_password_and_bad_store_settings_name_their_key() {
        let url: StoreUrl = "postgres://app:s3cret@db.internal:6432/actions".parse().unwrap();
        let StoreUrl::Postgres(pg) = url else { panic!("a PostgreSQL URL") };
        assert_eq!(pg.shown, "postgres://app@db.internal:6432/actions");
        assert_eq!(format!("{pg:?}"), pg.shown);
        assert_eq!(pg.redacted(), "postgres://app:REDACTED@db.internal:6432/actions");
        let with_param: StoreUrl = "postgresql://app@db/actions?password=s3cret".parse().unwrap();
        let StoreUrl::Postgres(pg) = with_param else { panic!("a PostgreSQL URL") };
        assert!(!pg.redacted().contains("s3cret") && !pg.shown.contains("s3cret"), "{}", pg.redacted());
        let config = Config {
            store: StoreConfig { url: "postgres://app:s3cret@db/actions".into(), ..StoreConfig::default() },
            ..Config::default()
        };
        assert!(!config.to_redacted_toml().contains("s3cret"));
        let from = |toml: &str| {
            Config::extract(&Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)))
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        for (toml, want) in [
            (
                "[store]\nurl = \"postgres://a:s3cret@db/x?sslmode=require\"",
                "store.url: asks for sslmode=require",
            ),
            (
                "[store]\nurl = \"postgres://a:s3cret@db:notaport/x\"",
                "store.url: is not a valid PostgreSQL URL",
            ),
            ("[store]\nurl = \"postgres:x\"", "store.url: a PostgreSQL store is written"),
            ("[store.postgres]\npool_size = 0", "store.postgres.pool_size"),
            ("[store.postgres]\nconnect_timeout = \"0s\"", "store.postgres.connect_timeout"),
            ("[durable]\nlease = \"500ms\"", "durable.lease: must be at least 1s"),
        ] {
            let err = from(toml);
            assert!(err.contains(want), "{toml}: {err}");
            assert!(!err.contains("s3cret"), "{toml}: {err}");
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
                .map(|c| c.fleet_settings())
        };
        assert_eq!(from("").unwrap(), None);
        let f = from("[fleet]\nredis_url = \"redis://127.0.0.1:6379\"\nredis_unavailable = \"deny\"")
            .unwrap()
            .unwrap();
        assert_eq!((f.unavailable, f.key_prefix.as_str()), (crate::fleet::Unavailable::Deny, "callout:v1:"));
        for (toml, key) in [
            ("[fleet]\nredis_url = \"http://h\"", "fleet.redis_url"),
            ("[fleet]\nredis_url = \"redis://h\"\ntimeout = \"0s\"", "fleet.timeout"),
            ("[fleet]\nredis_unavailable = \"maybe\"", "redis_unavailable"),
            ("[fleet]\nconcurrency_lease = \"100ms\"", "fleet.concurrency_lease"),
        ] {
            let err = from(toml).unwrap_err();
            assert!(err.contains(key), "{toml}: {err}");
        }
        let mut config = Config::default();
        config.fleet.redis_url = "redis://:s3cret@127.0.0.1:6379".into();
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

    /// A temporary file removed on drop.
    struct TempToml(PathBuf);

    impl TempToml {
        fn new(name: &str, text: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("callout-config-{name}-{}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn a_bad_value_from_a_file_names_the_key_and_the_file() {
        let file = TempToml::new("bad-file", "[limits]\nmax_in_flight = 0\n");
        let err = Config::extract(&Config::layers(Some(&file.0))).unwrap_err().to_string();
        assert!(err.contains("limits.max_in_flight: must be at least 1"), "{err}");
        // figment may show the path relative to the working directory: look for the file's name.
        let name = |file: &TempToml| file.0.file_name().unwrap().to_string_lossy().into_owned();
        assert!(err.contains("TOML file") && err.contains(&name(&file)), "{err}");
        // A check across keys names the key and its file too.
        let file = TempToml::new("bad-tls", "[server]\ntls_key = \"key.pem\"\n");
        let err = Config::extract(&Config::layers(Some(&file.0))).unwrap_err().to_string();
        assert!(err.contains("server.tls_key: ") && err.contains(&name(&file)), "{err}");
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_key_and_the_variable() {
        // A prefix of this test's own (not CALLOUT_), so no other test's layers read it.
        let read = |name: &str, value: &str| {
            std::env::set_var(format!("CALLOUTUNIT_{name}"), value);
            let figment = Figment::from(Serialized::defaults(Config::default())).merge(env("CALLOUTUNIT_"));
            let err = Config::extract(&figment).unwrap_err().to_string();
            std::env::remove_var(format!("CALLOUTUNIT_{name}"));
            err
        };
        let err = read("DURABLE__MAX_CONCURRENT", "0");
        assert!(
            err.contains(
                "durable.max_concurrent: must be at least 1 \
                 (from environment variable CALLOUTUNIT_DURABLE__MAX_CONCURRENT)"
            ),
            "{err}"
        );
        let err = read("DURABLE__IDEMPOTENCY_HEADER", "a b");
        assert!(
            err.contains("durable.idempotency_header: \"a b\" is not a header name")
                && err.contains("CALLOUTUNIT_DURABLE__IDEMPOTENCY_HEADER"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_from_a_flag_names_the_key_and_the_flags() {
        #[derive(Serialize)]
        struct Server {
            worker_threads: usize,
        }
        #[derive(Serialize)]
        struct Flags {
            server: Server,
        }
        let figment = Config::layers(None).merge(flags(Flags { server: Server { worker_threads: 5000 } }));
        let err = Config::extract(&figment).unwrap_err().to_string();
        assert!(
            err.contains("server.worker_threads: must be at most 1024")
                && err.contains("(from command-line flags)"),
            "{err}"
        );
        // A flag that lands well is taken over the file and defaults.
        let figment = Config::layers(None).merge(flags(Flags { server: Server { worker_threads: 3 } }));
        assert_eq!(Config::extract(&figment).unwrap().server.worker_threads, 3);
    }

    #[test]
    fn an_unknown_key_names_itself_and_its_source() {
        let file = TempToml::new("unknown", "[limits]\nmax_in_flihgt = 3\n");
        let err = Config::extract(&Config::layers(Some(&file.0))).unwrap_err().to_string();
        assert!(err.contains("limits.max_in_flihgt: unknown field") && err.contains("TOML file"), "{err}");
    }
}
