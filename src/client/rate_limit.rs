//! Rate limits on sending: a global limit and per-destination limits picked by host pattern
//! (GCRA from `governor`), and the `RateLimit` layer that waits for them before an attempt.
//! A wait counts against the action's deadline; a wait that cannot fit fails at once.
use super::{
    attempt::{AttemptContext, AttemptRequest, Before, Step, StepLayer},
    host::Destination,
    host_pattern::{HostPattern, HostPatternError},
    shared::{FleetBacked, SharedAdmission, SharedBucket, Verdict, TENANT_RULE},
};
use governor::{clock::Clock, DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::{
    fmt,
    num::NonZeroU32,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

/// A rate: `count` sends per `period`, with bursts of up to `burst` at once.
/// Written `10/s`, `600/m`, `5000/h`, optionally followed by ` burst 20` (default: the count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub period: Duration,
    pub burst: NonZeroU32,
}

/// Why a rate or a rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("rate {0:?}: write it as COUNT/UNIT with UNIT s, m or h, then optionally \"burst N\" (e.g. \"10/s burst 20\")")]
    Syntax(String),
    #[error("rate {0:?}: count and burst must be at least 1")]
    Zero(String),
    #[error("rate limit rule {0:?}: write it as PATTERN=RATE (e.g. \"*.example.com=10/s burst 20\")")]
    Rule(String),
    #[error(transparent)]
    Pattern(#[from] HostPatternError),
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let syntax = || RateError::Syntax(raw.to_owned());
        let zero = || RateError::Zero(raw.to_owned());
        let mut words = raw.split_whitespace();
        let (count, unit) = words.next().and_then(|w| w.split_once('/')).ok_or_else(syntax)?;
        let count: u32 = count.trim().parse().map_err(|_| syntax())?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(syntax()),
        };
        let count = NonZeroU32::new(count).ok_or_else(zero)?;
        let burst = match (words.next(), words.next(), words.next()) {
            (None, _, _) => count,
            (Some("burst"), Some(n), None) => {
                NonZeroU32::new(n.parse().map_err(|_| syntax())?).ok_or_else(zero)?
            }
            _ => return Err(syntax()),
        };
        Ok(Self { count, period, burst })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.period.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit} burst {}", self.count, self.burst)
    }
}

impl Rate {
    /// One send per this long (at least a nanosecond).
    pub fn interval(&self) -> Duration {
        // `count` >= 1 so the interval is never zero.
        (self.period / self.count.get()).max(Duration::from_nanos(1))
    }

    fn quota(&self) -> Quota {
        Quota::with_period(self.interval())
            .unwrap_or_else(|| Quota::per_second(self.count))
            .allow_burst(self.burst)
    }
}

/// A per-destination limit: every destination (host:port) that matches `pattern` gets its own
/// bucket of `rate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitRule {
    pub pattern: HostPattern,
    pub rate: Rate,
}

impl FromStr for RateLimitRule {
    type Err = RateError;

    /// `PATTERN=RATE`, e.g. `*.example.com=10/s burst 20`.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (pattern, rate) = raw.split_once('=').ok_or_else(|| RateError::Rule(raw.to_owned()))?;
        Ok(Self { pattern: pattern.parse()?, rate: rate.parse()? })
    }
}

/// Why a send may not go before the deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RateLimitError(pub String);

/// Keyed buckets are dropped once full again, when this many destinations are tracked.
const PRUNE_ABOVE: usize = 10_000;

/// One rate applied per key: every key (a destination, a tenant) gets its own GCRA bucket of
/// `rate`. Per-destination rules and tenant rate quotas both check through here, so this is the
/// one seam where a fleet-wide backend (Redis GCRA, keyed by `scope` and key) replaces the
/// local buckets.
pub struct KeyedRateLimit {
    /// What the limit is, for messages and as the key's namespace (a rule's pattern, a tenant
    /// quota's config key).
    scope: String,
    rate: Rate,
    local: DefaultKeyedRateLimiter<String>,
}

impl KeyedRateLimit {
    pub fn new(scope: impl Into<String>, rate: Rate) -> Self {
        Self { scope: scope.into(), rate, local: RateLimiter::keyed(rate.quota()) }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// Takes a send for `key` now, or says how long until one is free.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let checked = self.local.check_key(&key.to_owned());
        if self.local.len() > PRUNE_ABOVE {
            self.local.retain_recent();
        }
        checked.map_err(|not_until| not_until.wait_time_from(self.local.clock().now()))
    }

    /// Waits until `key` may send; returns whether it slept, or fails at once with the wait it
    /// needs when that would pass `deadline`.
    pub async fn wait(&self, key: &str, deadline: Instant) -> Result<bool, Duration> {
        wait_for(deadline, || self.check(key)).await
    }
}

/// The server's rate limiters, shared by every action.
pub struct RateLimits {
    global: Option<(Rate, DefaultDirectRateLimiter)>,
    rules: Vec<(RateLimitRule, KeyedRateLimit)>,
    /// Each rule's name in the fleet (`dest:PATTERN`), beside `rules`.
    fleet_rules: Vec<Arc<str>>,
}

/// The global limit's name in the fleet.
const GLOBAL: &str = "global";

fn shared_bucket(rule: Arc<str>, subject: String, rate: Rate) -> SharedBucket {
    SharedBucket { rule, subject, interval: rate.interval(), burst: rate.burst.get() }
}

impl RateLimits {
    /// `global` limits all sends together; of `per_host`, the first rule whose pattern matches
    /// a destination applies.
    pub fn new(global: Option<Rate>, per_host: &[RateLimitRule]) -> Self {
        Self {
            global: global.map(|rate| (rate, RateLimiter::direct(rate.quota()))),
            rules: per_host
                .iter()
                .map(|rule| (rule.clone(), KeyedRateLimit::new(rule.pattern.to_string(), rule.rate)))
                .collect(),
            fleet_rules: per_host.iter().map(|rule| Arc::from(format!("dest:{}", rule.pattern))).collect(),
        }
    }

    /// The fleet's buckets an attempt to `to` must pass: its destination rule's, the global one.
    pub fn shared_buckets(&self, to: &Destination) -> Vec<SharedBucket> {
        let mut buckets = Vec::with_capacity(2);
        let matching = self
            .rules
            .iter()
            .zip(&self.fleet_rules)
            .find(|((rule, _), _)| rule.pattern.matches(to.host(), to.port()));
        if let Some(((rule, _), name)) = matching {
            buckets.push(shared_bucket(name.clone(), to.key.clone(), rule.rate));
        }
        if let Some((rate, _)) = &self.global {
            buckets.push(shared_bucket(GLOBAL.into(), String::new(), *rate));
        }
        buckets
    }

    /// No limit is configured: nothing to wait for.
    pub fn is_empty(&self) -> bool {
        self.global.is_none() && self.rules.is_empty()
    }

    /// Waits until `key` (host:port of `host` on `port`) may be sent to: its per-destination
    /// limit, then the global limit. Returns the time waited, or fails at once
    /// when a wait would pass `deadline`.
    pub async fn acquire(
        &self,
        key: &str,
        host: &str,
        port: u16,
        deadline: Instant,
    ) -> Result<Duration, RateLimitError> {
        let started = Instant::now();
        let mut slept = false;
        if let Some((rule, limiter)) = self.rules.iter().find(|(rule, _)| rule.pattern.matches(host, port)) {
            slept |= limiter.wait(key, deadline).await.map_err(|wait| {
                RateLimitError(format!(
                    "rate limit {} for {} ({key}) needs a wait of {}, past the deadline",
                    rule.rate,
                    rule.pattern,
                    crate::fmt::fmt_duration(wait)
                ))
            })?;
        }
        if let Some((rate, limiter)) = &self.global {
            slept |= wait_for(deadline, || {
                limiter.check().map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
            })
            .await
            .map_err(|wait| {
                RateLimitError(format!(
                    "global rate limit {rate} needs a wait of {}, past the deadline",
                    crate::fmt::fmt_duration(wait)
                ))
            })?;
        }
        // No wait is zero, not the few nanoseconds these checks took.
        Ok(if slept { started.elapsed() } else { Duration::ZERO })
    }

    /// The limits through the fleet's buckets: `first` is the verdict the breaker layer got
    /// (else this asks itself); waits as long as a verdict says and asks again, until
    /// `deadline`. With the backend unreachable: this process's own limits, or a refusal.
    async fn acquire_shared(
        &self,
        shared: &SharedAdmission,
        context: &AttemptContext,
        first: Option<Verdict>,
    ) -> Result<Duration, RateLimitError> {
        let (to, deadline) = (&context.destination, context.deadline);
        let denied = || {
            RateLimitError(
                "the fleet's shared limits are unreachable (Redis) and fleet.redis_unavailable is \"deny\""
                    .into(),
            )
        };
        match first {
            Some(Verdict::Allowed) => return Ok(Duration::ZERO),
            Some(Verdict::Denied) => return Err(denied()),
            _ => {}
        }
        let buckets = shared.buckets(context);
        if buckets.is_empty() {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let mut slept = false;
        let mut verdict = match first {
            Some(verdict) => verdict,
            None => shared.check_rate(&buckets, deadline).await,
        };
        loop {
            let wait = match verdict {
                Verdict::Allowed => break,
                Verdict::Local => {
                    let waited = self.acquire(&to.key, to.host(), to.port(), deadline).await?;
                    return Ok(if slept { started.elapsed() } else { waited });
                }
                Verdict::Denied => return Err(denied()),
                Verdict::Wait { bucket, wait } => {
                    let tenant = buckets.get(bucket).filter(|b| &*b.rule == TENANT_RULE).map(|b| &*b.subject);
                    if Instant::now() + wait > deadline {
                        if let Some(tenant) = tenant {
                            crate::metrics::tenant(Some(tenant)).refused("rate");
                        }
                        let name = buckets.get(bucket).map(SharedBucket::describe).unwrap_or_default();
                        return Err(RateLimitError(format!(
                            "fleet rate limit {name} needs a wait of {}, past the deadline",
                            crate::fmt::fmt_duration(wait)
                        )));
                    }
                    if let Some(tenant) = tenant {
                        crate::metrics::tenant(Some(tenant)).waited("rate");
                    }
                    wait
                }
                // Marks are the layers above's (read with the first check): a re-check reads
                // buckets only, so these come only as a first verdict the layers above let by.
                Verdict::CircuitOpen(_) | Verdict::CoolingDown(_) => Duration::ZERO,
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
                slept = true;
            }
            verdict = shared.check_rate(&buckets, deadline).await;
        }
        Ok(if slept { started.elapsed() } else { Duration::ZERO })
    }
}

/// Waits for the rate limits before an attempt (bounded by the action's deadline); refuses
/// with `RateLimitError` when a wait cannot fit. With a shared backend the buckets are the
/// fleet's: the verdict the breaker layer got (`AttemptRequest::checked`) says whether they
/// were taken.
pub type RateLimit = FleetBacked<RateLimits>;

impl Step for FleetBacked<RateLimits> {
    type Held = ();

    fn before(&self, request: &mut AttemptRequest) -> Before<()> {
        let Some(shared) = &self.shared else {
            if self.local.is_empty() {
                return Before::Go(());
            }
            let (limits, context) = (self.local.clone(), request.context.clone());
            return Before::Wait(Box::pin(async move {
                let to = &context.destination;
                let waited = limits.acquire(&to.key, to.host(), to.port(), context.deadline).await?;
                waited_for(&to.key, waited);
                Ok(())
            }));
        };
        let first = request.checked.as_ref().and_then(|checked| checked.take());
        if first == Some(Verdict::Allowed) {
            // The breaker layer's check took every bucket.
            return Before::Go(());
        }
        let (limits, shared, context) = (self.local.clone(), shared.clone(), request.context.clone());
        Before::Wait(Box::pin(async move {
            let waited = limits.acquire_shared(&shared, &context, first).await?;
            waited_for(&context.destination.key, waited);
            Ok(())
        }))
    }
}

fn waited_for(key: &str, waited: Duration) {
    if !waited.is_zero() {
        tracing::debug!(destination = %key, waited = ?waited, "waited for the rate limit");
        crate::metrics::rate_limit_waited(key, waited);
    }
}

/// The rate limits as a layer of the attempt stack.
pub type RateLimitLayer = StepLayer<RateLimit>;

/// Calls `check` until it allows, sleeping as long as it says; returns whether it slept, or
/// fails with the wait it asked for when that wait would pass `deadline`.
async fn wait_for(deadline: Instant, check: impl Fn() -> Result<(), Duration>) -> Result<bool, Duration> {
    let mut slept = false;
    loop {
        match check() {
            Ok(()) => return Ok(slept),
            Err(wait) if Instant::now() + wait > deadline => return Err(wait),
            Err(wait) => {
                tokio::time::sleep(wait).await;
                slept = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::Harness;

    #[test]
    fn parses_rates_and_rules() {
        let rate = |s: &str| s.parse::<Rate>().unwrap();
        let r = rate("10/s burst 20");
        assert_eq!((r.count.get(), r.period, r.burst.get()), (10, Duration::from_secs(1), 20));
        assert_eq!(rate("600/m").burst.get(), 600);
        assert_eq!(rate("5/h").period, Duration::from_secs(3600));
        assert_eq!(rate("10/s burst 20").to_string(), "10/s burst 20");
        for bad in ["", "10", "10/d", "0/s", "10/s burst 0", "10/s burst", "10/s bust 2", "x/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        let rule: RateLimitRule = "*.example.com=10/s burst 20".parse().unwrap();
        assert!(rule.pattern.matches("api.example.com", 443));
        assert!("*.example.com".parse::<RateLimitRule>().is_err());
        assert!("a.*=1/s".parse::<RateLimitRule>().is_err());
    }

    #[tokio::test]
    async fn a_wait_that_cannot_fit_fails_at_once() {
        let limits = RateLimits::new(None, &["h=1/m".parse().unwrap()]);
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(limits.acquire("h:80", "h", 80, deadline).await.is_ok());
        let started = Instant::now();
        let err = limits.acquire("h:80", "h", 80, deadline).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1), "failed without sleeping");
        assert!(err.0.contains("1/m burst 1"), "{err}");
        // Other destinations matching the pattern have their own bucket; others have none.
        assert_eq!(
            limits.acquire("h:81", "h", 81, deadline).await.unwrap(),
            Duration::ZERO,
            "no wait is zero"
        );
        assert!(limits.acquire("other:80", "other", 80, deadline).await.is_ok());
        assert!(limits.acquire("other:80", "other", 80, deadline).await.is_ok());
    }

    #[tokio::test]
    async fn global_limit_spaces_sends() {
        let limits = RateLimits::new(Some("20/s burst 1".parse().unwrap()), &[]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let started = Instant::now();
        for i in 0..4 {
            limits.acquire(&format!("h{i}:80"), "h", 80, deadline).await.unwrap();
        }
        // 4 sends at 20/s with no burst: at least 3 intervals of 50 ms.
        assert!(started.elapsed() >= Duration::from_millis(140), "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_refuses_a_wait_past_the_deadline_without_calling_inner() {
        let rate = Arc::new(RateLimits::new(None, &["h=1/m".parse().unwrap()]));
        let mut layer = Harness::new(StepLayer(RateLimit::local(rate)));
        assert!(layer.exchange("http://h/", Duration::from_secs(5), 200).await.is_ok());
        let err = layer.refused("http://h/", Duration::from_secs(5)).await;
        assert!(err.is::<RateLimitError>(), "{err}");
        assert!(err.to_string().contains("1/m burst 1"), "{err}");
        assert!(layer.nothing_more_sent().await, "nothing was sent");
    }
}
