//! What an action passes before it may send, in order: a place in the server (queue bound),
//! a running slot, then per attempt the destination's circuit breaker, its shared cool-down,
//! the rate limits and a destination slot. Checks that refuse at once come before waits, and
//! every wait counts against the action's deadline.
use super::{
    breaker::{BreakerSettings, CircuitBreakers, Health},
    concurrency::{Admission, Concurrency, ConcurrencySettings, Overloaded, Slot},
    rate_limit::{RateLimitSettings, RateLimits},
};
use crate::action::{ActionError, ErrorKind};
use std::time::{Duration, Instant};
use url::Url;

/// The server's limits on sending, and on the response bytes held for replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    pub concurrency: ConcurrencySettings,
    pub rate: RateLimitSettings,
    pub breaker: BreakerSettings,
    /// Bytes of buffered response bodies held at once, server-wide (see `body_budget`).
    /// Default an eighth of the cgroup memory limit, else 512 MiB.
    pub max_buffered_bytes: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            concurrency: ConcurrencySettings::default(),
            rate: RateLimitSettings::default(),
            breaker: BreakerSettings::default(),
            max_buffered_bytes: super::body_budget::default_total(),
        }
    }
}

/// Where an action goes, as the limits key it: `host:port`, host lower-case without brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub key: String,
    host: String,
    port: u16,
}

impl Destination {
    pub fn of(url: &Url) -> Self {
        let host = super::host::normalize(url.host_str().unwrap_or_default());
        let port = url.port_or_known_default().unwrap_or(0);
        let key = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Self { key, host, port }
    }
}

/// The limits, shared by every action of the server.
pub struct Limits {
    concurrency: Concurrency,
    rate: RateLimits,
    breakers: CircuitBreakers,
}

impl Limits {
    pub fn new(settings: &LimitSettings) -> Self {
        Self {
            concurrency: Concurrency::new(settings.concurrency),
            rate: RateLimits::new(&settings.rate),
            breakers: CircuitBreakers::new(settings.breaker),
        }
    }

    /// A place for a new action; refused at once when the server's queue is full.
    pub fn admit(&self) -> Result<Admission, Overloaded> {
        self.concurrency.admit()
    }

    /// Waits for a running slot, until `deadline`.
    pub async fn run_slot(&self, deadline: Instant) -> Result<Slot, ActionError> {
        self.concurrency.run_slot(deadline).await.map_err(|e| ActionError::new(ErrorKind::RateLimited, e.0))
    }

    /// Lets one attempt go to `to`, or says why not: CIRCUIT_OPEN at once, RATE_LIMITED when
    /// a wait would pass `deadline`. The slot is held until the attempt ends.
    pub async fn enter(&self, to: &Destination, deadline: Instant) -> Result<Slot, ActionError> {
        self.breakers.check(&to.key).map_err(|e| ActionError::new(ErrorKind::CircuitOpen, e.0))?;
        let waited = self
            .rate
            .acquire(&to.key, &to.host, to.port, deadline)
            .await
            .map_err(|e| ActionError::new(ErrorKind::RateLimited, e.0))?;
        if !waited.is_zero() {
            tracing::debug!(destination = %to.key, waited = ?waited, "waited for the rate limit");
            crate::metrics::rate_limit_waited(&to.key, waited);
        }
        self.concurrency
            .host_slot(&to.key, deadline)
            .await
            .map_err(|e| ActionError::new(ErrorKind::RateLimited, e.0))
    }

    /// Reports how an attempt to `to` went: feeds its breaker, and a 429's Retry-After becomes
    /// a cool-down for every action to that destination.
    pub fn report(&self, to: &Destination, health: Health, too_many_requests_wait: Option<Duration>) {
        self.breakers.record(&to.key, health);
        if let Some(wait) = too_many_requests_wait {
            self.rate.cool_down(&to.key, wait);
        }
    }

    /// Actions admitted and not yet finished (running or queued).
    pub fn admitted(&self) -> usize {
        self.concurrency.admitted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_key_host_and_port() {
        let d = |u: &str| Destination::of(&Url::parse(u).unwrap()).key;
        assert_eq!(d("https://API.example.com/x"), "api.example.com:443");
        assert_eq!(d("http://example.com.:8080/"), "example.com:8080");
        assert_eq!(d("http://[::1]/"), "[::1]:80");
    }

    #[tokio::test]
    async fn an_open_circuit_refuses_before_any_wait() {
        let limits = Limits::new(&LimitSettings {
            breaker: BreakerSettings { failure_threshold: 1, cool_down: Duration::from_secs(60) },
            ..LimitSettings::default()
        });
        let to = Destination::of(&Url::parse("http://h/").unwrap());
        limits.report(&to, Health::Failing, None);
        let err = limits.enter(&to, Instant::now() + Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::CircuitOpen);
    }
}
