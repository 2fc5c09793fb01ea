//! Metrics: the names callout records (through the `metrics` facade, so recording is a no-op
//! until `install` sets the Prometheus recorder) and the `/metrics` endpoint that serves them.
//! Destination hosts become labels only within a bound: a configured allow-list, or the first
//! `max_hosts` hosts seen; the rest are `other`. Never a URL, path or header.
use crate::{action::Outcome, config::MetricsConfig};
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{Mutex, OnceLock},
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

/// Which hosts get their own label.
struct HostLabels {
    allowed: HashSet<String>,
    max: usize,
    seen: Mutex<HashSet<String>>,
}

static HOSTS: OnceLock<HostLabels> = OnceLock::new();

/// The `host` label for `host`: itself when allowed (or while the first `max_hosts` are being
/// seen), else `other`. Before `install`, every host is `other`.
pub fn host_label(host: &str) -> String {
    let Some(labels) = HOSTS.get() else {
        return "other".into();
    };
    if !labels.allowed.is_empty() {
        return if labels.allowed.contains(host) { host.to_owned() } else { "other".into() };
    }
    let Ok(mut seen) = labels.seen.lock() else {
        return "other".into();
    };
    if seen.contains(host) {
        return host.to_owned();
    }
    if seen.len() < labels.max {
        seen.insert(host.to_owned());
        return host.to_owned();
    }
    "other".into()
}

/// Why metrics could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(String);

/// Sets the Prometheus recorder and serves `/metrics` on `listener`. Returns its address.
pub fn install(listener: TcpListener, config: &MetricsConfig) -> Result<SocketAddr, MetricsError> {
    let addr = listener.local_addr().map_err(|e| MetricsError(e.to_string()))?;
    let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let handle = PrometheusBuilder::new()
        .set_buckets(&buckets)
        .map_err(|e| MetricsError(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError(e.to_string()))?;
    let _ = HOSTS.set(HostLabels {
        allowed: config.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        max: config.max_hosts,
        seen: Mutex::default(),
    });
    describe();
    // The upkeep drains histograms' idle buckets; the recorder needs it every few seconds.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, handle));
    Ok(addr)
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
    describe_gauge!(CIRCUIT_OPEN, "1 while a destination's circuit is open or half-open.");
    describe_gauge!(CONNECTIONS, "Upstream connections open now (pooled or in use).");
    describe_counter!(CONNECTIONS_OPENED, "Upstream connections opened.");
}

async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                async move {
                    let response = if req.uri().path() == "/metrics" {
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
    let host = host_label(host);
    let result = if outcome.succeeded { "succeeded" } else { "failed" };
    let kind = outcome.error.as_ref().map_or("none", |e| e.kind.as_str());
    counter!(ACTIONS, "outcome" => result, "error_kind" => kind, "host" => host.clone()).increment(1);
    let attempts = outcome.attempts.len() as u64;
    counter!(ATTEMPTS, "host" => host.clone()).increment(attempts);
    counter!(RETRIES, "host" => host.clone()).increment(attempts.saturating_sub(1));
    for attempt in &outcome.attempts {
        if let Some(status) = attempt.status {
            let class = match status / 100 {
                1 => "1xx",
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                _ => "5xx",
            };
            counter!(RESPONSES, "class" => class, "host" => host.clone()).increment(1);
        }
        if let Some(first_byte) = attempt.timing.first_byte {
            histogram!(FIRST_BYTE_SECONDS, "host" => host.clone()).record(first_byte.as_secs_f64());
        }
    }
    histogram!(ACTION_SECONDS, "host" => host).record(outcome.total.as_secs_f64());
}

/// A call refused before it ran.
pub fn refused(reason: &'static str) {
    counter!(REFUSED, "reason" => reason).increment(1);
}

/// Time an attempt waited for rate limits.
pub fn rate_limit_waited(host: &str, waited: Duration) {
    histogram!(RATE_LIMIT_WAIT_SECONDS, "host" => host_label(host)).record(waited.as_secs_f64());
}

/// A destination's circuit opened (`true`) or closed.
pub fn circuit(host: &str, open: bool) {
    gauge!(CIRCUIT_OPEN, "host" => host_label(host)).set(if open { 1.0 } else { 0.0 });
}

/// Keeps a gauge raised while alive: an action running, queued, or a connection open.
#[derive(Debug)]
pub struct Raised(&'static str);

impl Raised {
    pub fn new(name: &'static str) -> Self {
        gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        gauge!(self.0).decrement(1.0);
    }
}

/// An upstream connection opened; the returned guard lowers the open-connections gauge.
pub fn connection_opened() -> Raised {
    counter!(CONNECTIONS_OPENED).increment(1);
    Raised::new(CONNECTIONS)
}
