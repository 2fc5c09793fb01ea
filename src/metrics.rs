//! Metrics: the names callout records (through the `metrics` facade, so recording is a no-op
//! until `install` sets the Prometheus recorder) and the `/metrics` endpoint that serves them.
//! Destination hosts become labels only within a bound: a configured allow-list, or the first
//! `max_hosts` hosts seen; the rest are `other`. Tenants likewise: configured tenants
//! (`[tenants.NAME]`) are labels, every other tenant is `other`, an action without one `none`.
//! Never a URL, path or header.
//!
//! Conventions: every series the README lists is there, at zero, from the first scrape (the
//! `other` host's, and each refusal reason's), so dashboards and `rate()` need no first event;
//! label values are lower case (`outcome="failed"`, `error_kind="timeout"`); durations are
//! seconds, with buckets up to 30 days for whole actions (a durable action may retry that
//! long); `callout_build_info{version}` is 1; the standard `process_*` series (CPU, memory,
//! open file descriptors) are read at each scrape.
use crate::accept::{accept_next, AcceptBackoff};
use crate::action::Outcome;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};
use tokio::net::TcpListener;

pub const ACTIONS: &str = "callout_actions_total";
pub const ATTEMPTS: &str = "callout_attempts_total";
pub const RETRIES: &str = "callout_retries_total";
pub const RESPONSES: &str = "callout_upstream_responses_total";
pub const ACTION_SECONDS: &str = "callout_action_duration_seconds";
pub const FIRST_BYTE_SECONDS: &str = "callout_first_byte_seconds";
pub const IN_FLIGHT: &str = "callout_actions_in_flight";
pub const QUEUED: &str = "callout_actions_queued";
pub const REFUSED: &str = "callout_actions_refused_total";
pub const RATE_LIMIT_WAIT_SECONDS: &str = "callout_rate_limit_wait_seconds";
pub const CIRCUIT_OPEN: &str = "callout_circuit_open";
pub const CONNECTIONS: &str = "callout_upstream_connections";
pub const CONNECTIONS_OPENED: &str = "callout_upstream_connections_opened_total";
pub const BUFFERED_BODY_BYTES: &str = "callout_buffered_body_bytes";
pub const BODY_BUDGET_REFUSED: &str = "callout_body_budget_refused_total";
pub const BUILD_INFO: &str = "callout_build_info";
pub const BATCH_STREAMS: &str = "callout_batch_streams_open";
pub const BATCH_ACTIONS: &str = "callout_batch_actions_total";
pub const CALLER_CONNECTIONS: &str = "callout_caller_connections_total";
/// The `profile` label of credentials written in the action, not named from the config.
pub const INLINE_PROFILE: &str = "inline";
pub const OAUTH2_TOKEN_FETCHES: &str = "callout_oauth2_token_fetches_total";
pub const OAUTH2_TOKEN_CACHE_HITS: &str = "callout_oauth2_token_cache_hits_total";
pub const OAUTH2_TOKEN_FAILURES: &str = "callout_oauth2_token_failures_total";
pub const FLEET_CHECK_SECONDS: &str = "callout_fleet_check_seconds";
pub const FLEET_REDIS_UP: &str = "callout_fleet_redis_up";
pub const FLEET_REDIS_UNAVAILABLE: &str = "callout_fleet_redis_unavailable_total";
pub const FLEET_FALLBACKS: &str = "callout_fleet_fallbacks_total";
pub const TENANT_ACTIONS: &str = "callout_tenant_actions_total";
pub const TENANT_IN_FLIGHT: &str = "callout_tenant_actions_in_flight";
pub const TENANT_QUEUED: &str = "callout_tenant_actions_queued";
pub const TENANT_QUOTA_REFUSED: &str = "callout_tenant_quota_refused_total";
pub const TENANT_QUOTA_WAITS: &str = "callout_tenant_quota_waits_total";

/// Reasons of `callout_actions_refused_total` and `callout_body_budget_refused_total`, made at
/// zero when metrics start.
const REFUSED_REASONS: [&str; 2] = ["queue_full", "draining"];
const BODY_BUDGET_REASONS: [&str; 3] = ["exhausted", "stalled", "too_large"];

/// Buckets, in seconds, for times of one request (first byte) or a short wait: 1 ms to 5 min.
const SHORT_BUCKETS: [f64; 16] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// Buckets for one Redis round trip of the fleet check: 50 us to 1 s.
const FLEET_BUCKETS: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// Buckets for whole actions and rate-limit waits, which may last as long as their total
/// timeout (at most 30 days): 1 ms to 30 days.
const LONG_BUCKETS: [f64; 24] = [
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    3.0 * 3600.0,
    6.0 * 3600.0,
    12.0 * 3600.0,
    86400.0,
    3.0 * 86400.0,
    7.0 * 86400.0,
    30.0 * 86400.0,
];

/// Which hosts get their own label, and their series.
struct HostLabels {
    allowed: HashSet<String>,
    max: usize,
    series: Mutex<HashMap<String, Arc<HostSeries>>>,
    other: Arc<HostSeries>,
}

impl HostLabels {
    /// `host`'s series: its own when allowed (or while the first `max` hosts are being seen),
    /// else `other`'s.
    fn series(&self, host: &str) -> Arc<HostSeries> {
        let Ok(mut series) = self.series.lock() else {
            return self.other.clone();
        };
        if let Some(known) = series.get(host) {
            return known.clone();
        }
        let own = if self.allowed.is_empty() { series.len() < self.max } else { self.allowed.contains(host) };
        if !own {
            return self.other.clone();
        }
        let made = Arc::new(HostSeries::new(host));
        series.insert(host.to_owned(), made.clone());
        made
    }
}

/// One destination's series, registered once: recording an action then costs no label
/// building, hashing or registry lookup.
struct HostSeries {
    label: String,
    attempts: Counter,
    retries: Counter,
    /// Responses by status class, 1xx to 5xx.
    responses: [Counter; 5],
    first_byte: Histogram,
    duration: Histogram,
    /// Actions that succeeded with no error: the common case, made up front.
    succeeded: Counter,
    /// Other actions by (succeeded, error kind), made when first seen.
    others: Mutex<HashMap<(bool, &'static str), Counter>>,
}

impl HostSeries {
    fn new(label: &str) -> Self {
        let host = || label.to_owned();
        let class = |class: &'static str| counter!(RESPONSES, "class" => class, "host" => host());
        Self {
            label: label.to_owned(),
            attempts: counter!(ATTEMPTS, "host" => host()),
            retries: counter!(RETRIES, "host" => host()),
            responses: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            first_byte: histogram!(FIRST_BYTE_SECONDS, "host" => host()),
            duration: histogram!(ACTION_SECONDS, "host" => host()),
            succeeded: counter!(ACTIONS, "outcome" => "succeeded", "error_kind" => "none", "host" => host()),
            others: Mutex::default(),
        }
    }

    fn actions(&self, succeeded: bool, kind: &'static str) -> Option<Counter> {
        if succeeded && kind == "none" {
            return Some(self.succeeded.clone());
        }
        let mut others = self.others.lock().ok()?;
        let label = self.label.clone();
        let outcome = if succeeded { "succeeded" } else { "failed" };
        let made = || counter!(ACTIONS, "outcome" => outcome, "error_kind" => kind.to_ascii_lowercase(), "host" => label);
        Some(others.entry((succeeded, kind)).or_insert_with(made).clone())
    }
}

/// Gauges without labels, registered once.
struct Gauges {
    in_flight: Gauge,
    queued: Gauge,
    connections: Gauge,
    connections_opened: Counter,
    buffered_body_bytes: Gauge,
    batch_streams: Gauge,
    batch_actions: Counter,
}

/// The fleet's series (`fleet`), registered once: the check is on every attempt's way.
struct FleetSeries {
    check: Histogram,
    up: Gauge,
    unavailable: Counter,
    fallback_local: Counter,
    fallback_deny: Counter,
}

/// One tenant label's series, registered once (all of them at `install`).
struct TenantSeries {
    succeeded: Counter,
    failed: Counter,
    in_flight: Gauge,
    queued: Gauge,
    /// Refused by the tenant's concurrency quota, by its rate quota, by its queue bound.
    refused_concurrency: Counter,
    refused_rate: Counter,
    refused_queue: Counter,
    /// Waits for the tenant's concurrency quota (the fleet's), and for its rate quota.
    waited_concurrency: Counter,
    waited_rate: Counter,
}

impl TenantSeries {
    fn new(label: &str) -> Self {
        let tenant = || label.to_owned();
        Self {
            succeeded: counter!(TENANT_ACTIONS, "tenant" => tenant(), "outcome" => "succeeded"),
            failed: counter!(TENANT_ACTIONS, "tenant" => tenant(), "outcome" => "failed"),
            in_flight: gauge!(TENANT_IN_FLIGHT, "tenant" => tenant()),
            queued: gauge!(TENANT_QUEUED, "tenant" => tenant()),
            refused_concurrency: counter!(TENANT_QUOTA_REFUSED, "tenant" => tenant(), "quota" => "concurrency"),
            refused_rate: counter!(TENANT_QUOTA_REFUSED, "tenant" => tenant(), "quota" => "rate"),
            refused_queue: counter!(TENANT_QUOTA_REFUSED, "tenant" => tenant(), "quota" => "queue"),
            waited_concurrency: counter!(TENANT_QUOTA_WAITS, "tenant" => tenant(), "quota" => "concurrency"),
            waited_rate: counter!(TENANT_QUOTA_WAITS, "tenant" => tenant(), "quota" => "rate"),
        }
    }

    fn at_zero(&self) {
        for counter in [
            &self.succeeded,
            &self.failed,
            &self.refused_concurrency,
            &self.refused_rate,
            &self.refused_queue,
            &self.waited_concurrency,
            &self.waited_rate,
        ] {
            counter.absolute(0);
        }
        self.in_flight.set(0.0);
        self.queued.set(0.0);
    }
}

/// The tenant labels: fixed at `install`, so the label set is bounded by the configuration.
struct TenantLabels {
    named: HashMap<String, TenantSeries>,
    other: TenantSeries,
    none: TenantSeries,
}

static HOSTS: OnceLock<HostLabels> = OnceLock::new();
static GAUGES: OnceLock<Gauges> = OnceLock::new();
static FLEET: OnceLock<FleetSeries> = OnceLock::new();
static TENANTS: OnceLock<TenantLabels> = OnceLock::new();

/// The `tenant` label values besides the configured tenants' names.
pub const TENANT_OTHER: &str = "other";
pub const TENANT_NONE: &str = "none";

/// An action's tenant series (nothing before `install`).
#[derive(Clone, Copy)]
pub struct TenantMetrics(Option<&'static TenantSeries>);

/// The series of `tenant`: its own when configured, `other` for any other tenant, `none` for
/// an action without one.
pub fn tenant(tenant: Option<&str>) -> TenantMetrics {
    TenantMetrics(TENANTS.get().map(|labels| match tenant {
        None => &labels.none,
        Some(name) => labels.named.get(name).unwrap_or(&labels.other),
    }))
}

impl TenantMetrics {
    /// An action of the tenant waiting for a running slot.
    pub fn queued(self) -> Raised {
        Raised::up(self.0.map(|s| s.queued.clone()))
    }

    /// An action of the tenant running.
    pub fn in_flight(self) -> Raised {
        Raised::up(self.0.map(|s| s.in_flight.clone()))
    }

    /// An action of the tenant finished.
    pub fn finished(self, succeeded: bool) {
        if let Some(series) = self.0 {
            if succeeded { &series.succeeded } else { &series.failed }.increment(1);
        }
    }

    /// A tenant quota refused an action: `concurrency`, `rate` or `queue`.
    pub fn refused(self, quota: &'static str) {
        if let Some(series) = self.0 {
            match quota {
                "rate" => &series.refused_rate,
                "queue" => &series.refused_queue,
                _ => &series.refused_concurrency,
            }
            .increment(1);
        }
    }

    /// An action of the tenant waited for its quota: `concurrency` (the fleet's lease) or
    /// `rate`.
    pub fn waited(self, quota: &'static str) {
        if let Some(series) = self.0 {
            if quota == "rate" { &series.waited_rate } else { &series.waited_concurrency }.increment(1);
        }
    }
}

/// The `host` label for `host`: itself when allowed (or while the first `max_hosts` are being
/// seen), else `other`. Before `install`, every host is `other`.
pub fn host_label(host: &str) -> String {
    HOSTS.get().map_or_else(|| "other".to_owned(), |labels| labels.series(host).label.clone())
}

/// The `[metrics]` section: the Prometheus endpoint, and which destination hosts get their
/// own `host` label.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve `/metrics`. Default true.
    pub enabled: bool,
    /// Where. Default `127.0.0.1:9464`.
    pub listen: SocketAddr,
    /// Hosts labelled by name; the rest are `other`. Empty (the default): the first
    /// `max_hosts` seen.
    pub hosts: Vec<String>,
    /// Most distinct `host` label values when `hosts` is empty. Default 50.
    pub max_hosts: usize,
    /// Tenants labelled by name: the ones `[tenants.NAME]` configures (not a key of this
    /// section); the rest are `other`.
    #[serde(skip)]
    pub tenants: Vec<String>,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            hosts: Vec::new(),
            max_hosts: 50,
            tenants: Vec::new(),
        }
    }
}

/// Why metrics could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(String);

/// Sets the Prometheus recorder and serves `/metrics` on `listener`. Returns its address.
pub fn install(listener: TcpListener, settings: &MetricsSettings) -> Result<SocketAddr, MetricsError> {
    let addr = listener.local_addr().map_err(|e| MetricsError(e.to_string()))?;
    let long = |name: &str| metrics_exporter_prometheus::Matcher::Full(name.to_owned());
    let handle = PrometheusBuilder::new()
        .set_buckets(&SHORT_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(long(ACTION_SECONDS), &LONG_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(long(RATE_LIMIT_WAIT_SECONDS), &LONG_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(long(FLEET_CHECK_SECONDS), &FLEET_BUCKETS))
        .map_err(|e| MetricsError(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError(e.to_string()))?;
    let _ = HOSTS.set(HostLabels {
        allowed: settings.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        max: settings.max_hosts,
        series: Mutex::default(),
        other: Arc::new(HostSeries::new("other")),
    });
    let _ = GAUGES.set(Gauges {
        in_flight: gauge!(IN_FLIGHT),
        queued: gauge!(QUEUED),
        connections: gauge!(CONNECTIONS),
        connections_opened: counter!(CONNECTIONS_OPENED),
        buffered_body_bytes: gauge!(BUFFERED_BODY_BYTES),
        batch_streams: gauge!(BATCH_STREAMS),
        batch_actions: counter!(BATCH_ACTIONS),
    });
    let _ = FLEET.set(FleetSeries {
        check: histogram!(FLEET_CHECK_SECONDS),
        up: gauge!(FLEET_REDIS_UP),
        unavailable: counter!(FLEET_REDIS_UNAVAILABLE),
        fallback_local: counter!(FLEET_FALLBACKS, "policy" => "local"),
        fallback_deny: counter!(FLEET_FALLBACKS, "policy" => "deny"),
    });
    let _ = TENANTS.set(TenantLabels {
        named: settings.tenants.iter().map(|name| (name.clone(), TenantSeries::new(name))).collect(),
        other: TenantSeries::new(TENANT_OTHER),
        none: TenantSeries::new(TENANT_NONE),
    });
    describe();
    at_zero();
    let process = metrics_process::Collector::default();
    process.describe();
    // The upkeep drains histograms' idle buckets; the recorder needs it every few seconds.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle, Arc::new(process)));
    Ok(addr)
}

/// The series that would otherwise appear only with their first event, made at zero (the
/// `other` host's per-host series are made with `HOSTS`).
fn at_zero() {
    for reason in REFUSED_REASONS {
        counter!(REFUSED, "reason" => reason).absolute(0);
    }
    for reason in BODY_BUDGET_REASONS {
        counter!(BODY_BUDGET_REFUSED, "reason" => reason).absolute(0);
    }
    let _ = histogram!(RATE_LIMIT_WAIT_SECONDS, "host" => "other");
    gauge!(CIRCUIT_OPEN, "host" => "other").set(0.0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    if let Some(g) = GAUGES.get() {
        g.batch_streams.set(0.0);
        g.batch_actions.absolute(0);
    }
    if let Some(fleet) = FLEET.get() {
        fleet.up.set(0.0);
        fleet.unavailable.absolute(0);
        fleet.fallback_local.absolute(0);
        fleet.fallback_deny.absolute(0);
    }
    if let Some(tenants) = TENANTS.get() {
        tenants.named.values().chain([&tenants.other, &tenants.none]).for_each(TenantSeries::at_zero);
    }
    oauth2_profiles(&[]);
}

/// The OAuth2 series of `profiles` (and of inline credentials), made at zero. Profile names
/// come from the server's config, so the label is bounded.
pub fn oauth2_profiles(profiles: &[&str]) {
    for profile in profiles.iter().copied().chain([INLINE_PROFILE]) {
        let profile = profile.to_owned();
        counter!(OAUTH2_TOKEN_FETCHES, "profile" => profile.clone()).absolute(0);
        counter!(OAUTH2_TOKEN_CACHE_HITS, "profile" => profile.clone()).absolute(0);
        counter!(OAUTH2_TOKEN_FAILURES, "profile" => profile).absolute(0);
    }
}

/// A token was fetched from the token endpoint (once however many actions waited for it).
pub fn oauth2_token_fetched(profile: &str) {
    counter!(OAUTH2_TOKEN_FETCHES, "profile" => profile.to_owned()).increment(1);
}

/// An action found its token in the cache.
pub fn oauth2_token_cache_hit(profile: &str) {
    counter!(OAUTH2_TOKEN_CACHE_HITS, "profile" => profile.to_owned()).increment(1);
}

/// An action ended because no token could be had (the fetch failed, or its deadline came).
pub fn oauth2_token_failed(profile: &str) {
    counter!(OAUTH2_TOKEN_FAILURES, "profile" => profile.to_owned()).increment(1);
}

fn describe() {
    describe_counter!(ACTIONS, "Actions finished, by outcome, error kind and destination host.");
    describe_counter!(ATTEMPTS, "Attempts sent, by destination host.");
    describe_counter!(RETRIES, "Attempts that were retries, by destination host.");
    describe_counter!(RESPONSES, "Upstream responses by status class (2xx...) and destination host.");
    describe_histogram!(ACTION_SECONDS, Unit::Seconds, "Whole action time, all attempts and backoff.");
    describe_histogram!(FIRST_BYTE_SECONDS, Unit::Seconds, "Time to the response head, per attempt.");
    describe_gauge!(IN_FLIGHT, "Actions running now.");
    describe_gauge!(QUEUED, "Actions admitted and waiting for a running slot.");
    describe_counter!(REFUSED, "Calls refused before running: queue full (reason=queue_full) or draining.");
    describe_histogram!(
        RATE_LIMIT_WAIT_SECONDS,
        Unit::Seconds,
        "Time waited for rate limits and cool-downs."
    );
    describe_histogram!(
        FLEET_CHECK_SECONDS,
        Unit::Seconds,
        "Round trip of the fleet check to Redis (one per attempt, when fleet.redis_url is set)."
    );
    describe_gauge!(FLEET_REDIS_UP, "1 while the fleet's Redis is connected; 0 when unreachable or not set.");
    describe_counter!(
        FLEET_REDIS_UNAVAILABLE,
        "Outages of the fleet's Redis (each counted once, at its start)."
    );
    describe_counter!(
        FLEET_FALLBACKS,
        "Fleet checks answered without Redis, by policy: local (this replica's limits) or deny."
    );
    describe_gauge!(BATCH_STREAMS, "ExecuteBatch streams open now.");
    describe_counter!(BATCH_ACTIONS, "Actions read from ExecuteBatch streams (each answered once).");
    describe_counter!(
        CALLER_CONNECTIONS,
        "Callers' connections accepted, by the core (runtime) they were dealt to; with server.runtime = per-core a connection's calls all run on its core."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which callout runs.");
    describe_counter!(
        OAUTH2_TOKEN_FETCHES,
        "OAuth2 tokens fetched from token endpoints, by profile (inline: none)."
    );
    describe_counter!(OAUTH2_TOKEN_CACHE_HITS, "Attempts that found their OAuth2 token cached, by profile.");
    describe_counter!(
        OAUTH2_TOKEN_FAILURES,
        "Actions that ended ERROR_KIND_AUTH (or DENIED_BY_POLICY) for want of an OAuth2 token, by profile."
    );
    describe_gauge!(CIRCUIT_OPEN, "1 while a destination's circuit is open or half-open.");
    describe_gauge!(CONNECTIONS, "Upstream connections open now (pooled or in use).");
    describe_counter!(CONNECTIONS_OPENED, "Upstream connections opened.");
    describe_gauge!(
        BUFFERED_BODY_BYTES,
        Unit::Bytes,
        "Response body bytes held for replies now, against limits.max_buffered_bytes."
    );
    describe_counter!(
        BODY_BUDGET_REFUSED,
        "Buffered bodies refused by the memory budget: reason=exhausted (no room before the \
         deadline), stalled (every holder was waiting) or too_large (larger than the budget)."
    );
    describe_counter!(
        TENANT_ACTIONS,
        "Actions finished, by tenant (configured names, other, none) and outcome."
    );
    describe_gauge!(TENANT_IN_FLIGHT, "Actions running now, by tenant.");
    describe_gauge!(TENANT_QUEUED, "Actions waiting for a running slot, by tenant.");
    describe_counter!(
        TENANT_QUOTA_REFUSED,
        "Actions refused by their tenant's quota (quota=concurrency, rate or queue), by tenant."
    );
    describe_counter!(
        TENANT_QUOTA_WAITS,
        "Waits for a tenant's quota before an attempt or action (quota=rate, or concurrency: \
         the fleet's count of the tenant's running actions), by tenant."
    );
}

async fn serve(listener: TcpListener, handle: PrometheusHandle, process: Arc<metrics_process::Collector>) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, _) = accept_next("metrics listener", || listener.accept(), &mut backoff).await;
        let (handle, process) = (handle.clone(), process.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let (handle, process) = (handle.clone(), process.clone());
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        // The process series as of this scrape (a few small /proc reads).
                        process.collect();
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(handle.render())))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"try /metrics\n")))
                    };
                    response.map_err(|e| std::io::Error::other(e.to_string()))
                }
            });
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

/// Records a finished action: its outcome, attempts, statuses and times.
pub fn action_finished(outcome: &Outcome, host: &str) {
    let Some(labels) = HOSTS.get() else {
        return;
    };
    let series = labels.series(host);
    let kind = outcome.error.as_ref().map_or("none", |e| e.kind.as_str());
    if let Some(actions) = series.actions(outcome.succeeded, kind) {
        actions.increment(1);
    }
    let attempts = outcome.attempts.len() as u64;
    series.attempts.increment(attempts);
    series.retries.increment(attempts.saturating_sub(1));
    for attempt in &outcome.attempts {
        if let Some(status) = attempt.status {
            let class = usize::from(status / 100).clamp(1, 5) - 1;
            series.responses[class].increment(1);
        }
        if let Some(first_byte) = attempt.timing.first_byte {
            series.first_byte.record(first_byte.as_secs_f64());
        }
    }
    series.duration.record(outcome.total.as_secs_f64());
}

/// A call refused before it ran.
pub fn refused(reason: &'static str) {
    counter!(REFUSED, "reason" => reason).increment(1);
}

/// Time an attempt waited for rate limits.
pub fn rate_limit_waited(host: &str, waited: Duration) {
    histogram!(RATE_LIMIT_WAIT_SECONDS, "host" => host_label(host)).record(waited.as_secs_f64());
}

/// One round trip of the fleet check took `took`.
pub fn fleet_check(took: Duration) {
    if let Some(fleet) = FLEET.get() {
        fleet.check.record(took.as_secs_f64());
    }
}

/// The fleet's Redis is connected (`true`) or not.
pub fn fleet_redis_up(up: bool) {
    if let Some(fleet) = FLEET.get() {
        fleet.up.set(if up { 1.0 } else { 0.0 });
    }
}

/// An outage of the fleet's Redis began.
pub fn fleet_redis_unavailable() {
    if let Some(fleet) = FLEET.get() {
        fleet.unavailable.increment(1);
    }
}

/// A fleet check was answered without Redis, by `policy` (`local` or `deny`).
pub fn fleet_fallback(policy: &'static str) {
    if let Some(fleet) = FLEET.get() {
        match policy {
            "deny" => fleet.fallback_deny.increment(1),
            _ => fleet.fallback_local.increment(1),
        }
    }
}

/// A destination's circuit opened (`true`) or closed.
pub fn circuit(host: &str, open: bool) {
    gauge!(CIRCUIT_OPEN, "host" => host_label(host)).set(if open { 1.0 } else { 0.0 });
}

/// Response body bytes held for replies now (the memory budget's use).
pub fn buffered_body_bytes(bytes: u64) {
    if let Some(g) = GAUGES.get() {
        g.buffered_body_bytes.set(bytes as f64);
    }
}

/// A buffered body the memory budget refused, by `reason`.
pub fn body_budget_refused(reason: &'static str) {
    counter!(BODY_BUDGET_REFUSED, "reason" => reason).increment(1);
}

/// Keeps a gauge raised while alive: an action running, queued, or a connection open.
#[derive(Debug)]
pub struct Raised(Option<Gauge>);

impl Raised {
    fn raise(gauge: impl Fn(&Gauges) -> &Gauge) -> Self {
        Self::up(GAUGES.get().map(|g| gauge(g).clone()))
    }

    fn up(gauge: Option<Gauge>) -> Self {
        if let Some(gauge) = &gauge {
            gauge.increment(1.0);
        }
        Self(gauge)
    }

    /// An action waiting for a running slot.
    pub fn queued() -> Self {
        Self::raise(|g| &g.queued)
    }

    /// An action running.
    pub fn in_flight() -> Self {
        Self::raise(|g| &g.in_flight)
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.decrement(1.0);
        }
    }
}

/// An ExecuteBatch stream opened; the returned guard lowers the open-streams gauge.
pub fn batch_stream_opened() -> Raised {
    Raised::raise(|g| &g.batch_streams)
}

/// An action read from an ExecuteBatch stream.
pub fn batch_action() {
    if let Some(g) = GAUGES.get() {
        g.batch_actions.increment(1);
    }
}

/// Each core's series of accepted connections, at zero from the first scrape.
pub fn caller_cores(cores: usize) {
    for core in 0..cores {
        counter!(CALLER_CONNECTIONS, "core" => core.to_string()).increment(0);
    }
}

/// A caller's connection accepted and dealt to core `core` (counted per connection, not per call).
pub fn caller_connection(core: usize) {
    counter!(CALLER_CONNECTIONS, "core" => core.to_string()).increment(1);
}

/// An upstream connection opened; the returned guard lowers the open-connections gauge.
pub fn connection_opened() -> Raised {
    if let Some(g) = GAUGES.get() {
        g.connections_opened.increment(1);
    }
    Raised::raise(|g| &g.connections)
}
