//! Fleet-wide limits: the settings of `[fleet]`, the layout of the keys every replica shares,
//! and (`redis`) the Redis backend of `client::shared::SharedLimits` — rate buckets (GCRA in one
//! Lua script per check), 429 cool-downs and open circuits seen by every replica.
//!
//! Keys, under `key_prefix` (default `callout:v1:`):
//! - `rate:global`, `rate:dest:PATTERN:HOST:PORT`, `rate:RULE:SUBJECT`: a GCRA bucket (its
//!   theoretical arrival time in microseconds of Redis's clock), expiring once full again;
//! - `cool:HOST:PORT`: a 429 Retry-After cool-down, expiring when it ends;
//! - `circuit:HOST:PORT`: an open circuit, expiring when the next probe may go;
//! - `running:tenant:NAME`: a tenant's running actions across the fleet (its concurrency
//!   quota), a sorted set of holder ids scored by when each one's lease ends.
use crate::client::shared::SharedBucket;
use serde::Deserialize;
use std::time::Duration;

pub mod redis;

pub use self::redis::RedisLimits;

/// What an attempt meets when Redis is unreachable (or slower than `fleet.timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unavailable {
    /// This replica's own limits, as without a fleet.
    #[default]
    Local,
    /// Refused: error kind RATE_LIMITED.
    Deny,
}

/// The `[fleet]` section: fleet-wide limits shared through Redis, checked as it is read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetSettings {
    /// `redis://[[user]:password@]host[:port][/db]`; empty (the default): no fleet, each
    /// replica's limits are its own.
    #[serde(deserialize_with = "redis_url")]
    pub redis_url: String,
    /// Every key starts with this. Default `callout:v1:`.
    pub key_prefix: String,
    /// Default `local`.
    #[serde(rename = "redis_unavailable")]
    pub unavailable: Unavailable,
    /// Longest wait for one answer of Redis on an attempt's way; past it Redis counts as
    /// unreachable. Default 100 ms.
    #[serde(serialize_with = "humantime_serde::serialize", deserialize_with = "more_than_zero")]
    pub timeout: Duration,
    /// Longest wait for a connection. Default 1 s.
    #[serde(serialize_with = "humantime_serde::serialize", deserialize_with = "more_than_zero")]
    pub connect_timeout: Duration,
    /// How long a replica's hold on one of a tenant's running places (its concurrency quota)
    /// lasts unless renewed; renewed every third of it while the action runs, so the places of
    /// a replica that dies come free within this. Default 10 s; at least 300 ms.
    #[serde(serialize_with = "humantime_serde::serialize", deserialize_with = "lease")]
    pub concurrency_lease: Duration,
}

impl FleetSettings {
    /// The settings when a fleet is configured (`redis_url` set).
    pub fn configured(&self) -> Option<&Self> {
        (!self.redis_url.is_empty()).then_some(self)
    }
}

fn redis_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = String::deserialize(d)?;
    let url = raw.trim();
    if !url.is_empty() {
        check_url(url).map_err(serde::de::Error::custom)?;
    }
    Ok(url.to_owned())
}

fn more_than_zero<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match humantime_serde::deserialize::<Duration, D>(d)? {
        t if t.is_zero() => Err(serde::de::Error::custom("must be more than 0")),
        t => Ok(t),
    }
}

/// Shortest `concurrency_lease`: renewed every third of it, a shorter one would be lost to a
/// round trip on a loaded machine.
const MIN_LEASE: Duration = Duration::from_millis(300);

fn lease<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match humantime_serde::deserialize::<Duration, D>(d)? {
        t if t < MIN_LEASE => Err(serde::de::Error::custom("must be at least 300ms")),
        t => Ok(t),
    }
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            key_prefix: "callout:v1:".into(),
            unavailable: Unavailable::Local,
            timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(1),
            concurrency_lease: Duration::from_secs(10),
        }
    }
}

/// Why the fleet's settings are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FleetError(pub String);

/// Checks a Redis URL: `redis://` with a host (no TLS or cluster in this build).
pub fn check_url(raw: &str) -> Result<(), FleetError> {
    let url = url::Url::parse(raw).map_err(|e| FleetError(format!("{:?}: {e}", redacted_url(raw))))?;
    match url.scheme() {
        "redis" => {}
        "rediss" => {
            return Err(FleetError(
                "rediss:// (TLS) is not built in: use redis:// to a Redis on a private network".into(),
            ))
        }
        other => return Err(FleetError(format!("scheme {other:?}: write redis://host:port"))),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(FleetError("needs a host, e.g. redis://127.0.0.1:6379".into()));
    }
    ::redis::Client::open(raw).map(drop).map_err(|e| FleetError(format!("{:?}: {e}", redacted_url(raw))))
}

/// The URL with its password hidden (for `config print` and messages).
pub fn redacted_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("redacted"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<not a URL>".into(),
    }
}

/// `host:port` of a Redis URL, for logs.
fn endpoint(raw: &str) -> String {
    url::Url::parse(raw)
        .ok()
        .map(|url| format!("{}:{}", url.host_str().unwrap_or_default(), url.port().unwrap_or(6379)))
        .unwrap_or_default()
}

/// The names of the shared keys.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned() }
    }

    pub fn bucket(&self, bucket: &SharedBucket) -> String {
        if bucket.subject.is_empty() {
            format!("{}rate:{}", self.prefix, bucket.rule)
        } else {
            format!("{}rate:{}:{}", self.prefix, bucket.rule, bucket.subject)
        }
    }

    pub fn cool_down(&self, destination: &str) -> String {
        format!("{}cool:{destination}", self.prefix)
    }

    pub fn circuit(&self, destination: &str) -> String {
        format!("{}circuit:{destination}", self.prefix)
    }

    pub fn running(&self, tenant: &str) -> String {
        format!("{}running:tenant:{tenant}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_by_prefix_rule_and_subject() {
        let keys = Keys::new("callout:v1:");
        let bucket = |rule: &str, subject: &str| SharedBucket {
            rule: rule.into(),
            subject: subject.into(),
            interval: Duration::from_millis(100),
            burst: 1,
        };
        assert_eq!(keys.bucket(&bucket("global", "")), "callout:v1:rate:global");
        assert_eq!(
            keys.bucket(&bucket("dest:*.example.com", "api.example.com:443")),
            "callout:v1:rate:dest:*.example.com:api.example.com:443"
        );
        assert_eq!(keys.bucket(&bucket("tenant", "acme")), "callout:v1:rate:tenant:acme");
        assert_eq!(keys.cool_down("h:80"), "callout:v1:cool:h:80");
        assert_eq!(Keys::new("x:").circuit("[::1]:80"), "x:circuit:[::1]:80");
        assert_eq!(keys.running("acme"), "callout:v1:running:tenant:acme");
    }

    #[test]
    fn urls_are_checked_and_passwords_hidden() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_url("redis://:pw@127.0.0.1/2").is_ok());
        for (bad, says) in [
            ("rediss://h:6380", "TLS"),
            ("http://h", "scheme"),
            ("redis://", "host"),
            ("not a url", "not a URL"),
        ] {
            let err = check_url(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let shown = redacted_url("redis://user:s3cret@h:6379/1");
        assert!(!shown.contains("s3cret") && shown.contains("user:redacted@h:6379"), "{shown}");
        assert_eq!(endpoint("redis://:s3cret@127.0.0.9/0"), "127.0.0.9:6379");
    }
}
