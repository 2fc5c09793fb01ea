//! Runs one action through the client stack and builds its outcome: attempts, retries and
//! backoff under the total deadline, redirects within an attempt, the body read under its cap.
//! The gRPC service, the stream and `callout exec` all drive this one executor.
use crate::{
    action::{
        parse_retry_after, ActionError, ActionInput, AttemptEnd, AttemptRecord, AttemptTiming, ErrorKind,
        HttpAction, InvalidAction, OnFailure, Outcome, ResponseData, ResponseHead, RetryDecision,
        TraceContext, DEFAULT_MAX_RESPONSE_BYTES,
    },
    client::{
        admission::{Destination, LimitSettings, Limits},
        body_budget::{BodyBudget, BudgetError},
        breaker::Health,
        concurrency::{Admission, Overloaded},
        redirect::{next_hop, Hop},
        response::{head_of, pieces, views, BodyError, CappedBody},
        ClientBuildError, ClientSettings, Clients, ConnInfo, RequestBody, ResponseBody, SendFailure,
    },
    fmt::fmt_duration,
    metrics,
    secrets::{SecretSettings, SecretStore},
};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};
use tokio::{sync::watch, time::timeout_at};
use tracing::Instrument as _;

/// Settings of the executor.
#[derive(Debug, Clone)]
pub struct ExecSettings {
    /// Total time of an action that sets none, before the gRPC deadline. Default 5 min.
    pub default_total_timeout: Duration,
    /// Body cap of ExecuteStream. Default 1 GiB.
    pub stream_max_response_bytes: u64,
    pub client: ClientSettings,
    /// Queue bound, concurrency caps, rate limits and circuit breaking.
    pub limits: LimitSettings,
    /// Where `{{secret:NAME}}` references are read from.
    pub secrets: SecretSettings,
    /// Headers whose values are sensitive besides Authorization, Proxy-Authorization, Cookie,
    /// Set-Cookie and API-key headers: kept out of logs and HTTP/2 compression tables.
    pub sensitive_headers: Vec<http::HeaderName>,
    /// Which finished actions get an `action finished` log line. Default failed ones.
    pub action_log: ActionLog,
}

/// Which finished actions are logged (at info, one line each). Every action is counted in the
/// metrics either way; a line per success is an access log, worth its cost only when wanted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ActionLog {
    /// Every action.
    All,
    /// Failed actions (including refused and cancelled ones).
    #[default]
    Failed,
    /// None.
    Off,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            default_total_timeout: Duration::from_secs(300),
            stream_max_response_bytes: 1 << 30,
            client: ClientSettings::default(),
            limits: LimitSettings::default(),
            secrets: SecretSettings::default(),
            sensitive_headers: Vec::new(),
            action_log: ActionLog::default(),
        }
    }
}

/// The caller went away; the action stops.
#[derive(Debug, Clone, Copy)]
pub struct Gone;

/// Watches an action as it runs. `ExecuteStream` turns these calls into events; a body is
/// streamed through `body_chunk` instead of being buffered when `streams_body` is true.
pub trait Observer: Send {
    fn streams_body(&self) -> bool;
    fn attempt_started(&mut self, attempt: u32) -> impl Future<Output = Result<(), Gone>> + Send;
    fn response_head(
        &mut self,
        attempt: u32,
        head: &ResponseHead,
        timing: &AttemptTiming,
        remote: Option<SocketAddr>,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
    fn body_chunk(
        &mut self,
        attempt: u32,
        offset: u64,
        data: Bytes,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
    fn attempt_failed(
        &mut self,
        record: &AttemptRecord,
        will_retry: bool,
    ) -> impl Future<Output = Result<(), Gone>> + Send;
}

/// Observes nothing and buffers the body: the unary `Execute` and `callout exec`.
pub struct Buffered;

impl Observer for Buffered {
    fn streams_body(&self) -> bool {
        false
    }
    async fn attempt_started(&mut self, _: u32) -> Result<(), Gone> {
        Ok(())
    }
    async fn response_head(
        &mut self,
        _: u32,
        _: &ResponseHead,
        _: &AttemptTiming,
        _: Option<SocketAddr>,
    ) -> Result<(), Gone> {
        Ok(())
    }
    async fn body_chunk(&mut self, _: u32, _: u64, _: Bytes) -> Result<(), Gone> {
        Ok(())
    }
    async fn attempt_failed(&mut self, _: &AttemptRecord, _: bool) -> Result<(), Gone> {
        Ok(())
    }
}

/// Runs actions on the shared client.
#[derive(Clone)]
pub struct Executor {
    clients: Clients,
    limits: Arc<Limits>,
    /// The memory budget for buffered bodies (`limits.max_buffered_bytes`).
    budget: BodyBudget,
    secrets: SecretStore,
    settings: ExecSettings,
    /// Turns true when the server's drain runs out: every action still running ends at once
    /// with a CANCELLED outcome saying whether its request may have been sent.
    cut_off: Arc<watch::Sender<bool>>,
}

const USER_AGENT: &str = concat!("callout/", env!("CARGO_PKG_VERSION"));

/// Bodies this large or larger are parsed (and their replies built) on tokio's blocking pool: a
/// megabyte of JSON costs milliseconds of CPU, which would stall every other action on a
/// single-thread runtime (`server.worker_threads = 1`, or a one-CPU container).
pub const OFFLOAD_BODY_BYTES: usize = 64 * 1024;

/// Which clock ended an attempt.
#[derive(Debug, Clone, Copy)]
enum Clock {
    Attempt(Duration),
    Total(Duration),
}

impl Clock {
    fn error(self) -> ActionError {
        let (which, d) = match self {
            Clock::Attempt(d) => ("attempt", d),
            Clock::Total(d) => ("total", d),
        };
        ActionError::new(ErrorKind::Timeout, format!("{which} timeout of {} elapsed", fmt_duration(d)))
    }
}

/// How one attempt ended.
struct AttemptResult {
    record: AttemptRecord,
    end: Option<AttemptEnd>,
    response: Option<ResponseData>,
    /// Body bytes were already handed to the observer: the attempt cannot be repeated.
    streamed: bool,
    /// The retry decision, when the attempt already had to make it (a failing status decides
    /// before its body is read, so a body that will be retried is not read).
    decision: Option<RetryDecision>,
}

impl Executor {
    pub fn new(settings: ExecSettings) -> Result<Self, ClientBuildError> {
        Ok(Self {
            clients: Clients::new(&settings.client)?,
            limits: Arc::new(Limits::new(&settings.limits)),
            budget: BodyBudget::new(settings.limits.max_buffered_bytes),
            secrets: SecretStore::new(settings.secrets.clone()),
            settings,
            cut_off: Arc::new(watch::channel(false).0),
        })
    }

    /// Ends every running action now, each with a reply (outcome FAILED, error CANCELLED, a
    /// message saying whether its request may have been sent), and every action started later
    /// before it sends anything. The drain calls this when its time runs out, a little before
    /// the server stops, so the replies still reach their callers.
    pub fn cut_off(&self) {
        self.cut_off.send_replace(true);
    }

    /// Runs `action` with its body buffered (Execute, `callout exec`). `budget` is the time the
    /// caller allows (the gRPC deadline), which bounds the total.
    pub async fn execute(&self, action: &HttpAction, budget: Option<Duration>) -> Outcome {
        self.run(action, budget, &mut Buffered).await
    }

    /// A place in the server for a new action, or `Overloaded` at once when its queue is full
    /// (the gRPC edge answers RESOURCE_EXHAUSTED).
    pub fn admit(&self) -> Result<Admission, Overloaded> {
        self.limits.admit()
    }

    /// Validates `input` into an action: its `{{secret:NAME}}` references filled from the
    /// server's secrets, its sensitive headers marked. The server and `callout exec` both call
    /// this, so an action means the same wherever it comes from.
    pub fn action(&self, input: ActionInput) -> Result<HttpAction, InvalidAction> {
        let mut action = HttpAction::from_input_with_secrets(input, &self.secrets)?;
        action.mark_sensitive(&self.settings.sensitive_headers);
        Ok(action)
    }

    /// The server's limits (the drain waits for their admitted actions).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits and runs `action`, reporting to `observer` as it goes. A full queue ends the
    /// action as RATE_LIMITED; the gRPC edge calls `admit` first to answer RESOURCE_EXHAUSTED.
    pub async fn run<O: Observer>(
        &self,
        action: &HttpAction,
        budget: Option<Duration>,
        observer: &mut O,
    ) -> Outcome {
        match self.admit() {
            Ok(admission) => self.run_admitted(admission, action, budget, observer).await,
            Err(overloaded) => {
                let error = ActionError::new(ErrorKind::RateLimited, overloaded.to_string());
                self.finish(action, SystemTime::now(), Instant::now(), Vec::new(), None, Some(error))
            }
        }
    }

    /// Runs an admitted `action`: waits for a running slot, then tries it by its retry policy.
    /// Everything it logs sits in an `action` span (with the caller's trace id, when it sent
    /// one), each attempt in an `attempt` span inside it.
    pub async fn run_admitted<O: Observer>(
        &self,
        admission: Admission,
        action: &HttpAction,
        budget: Option<Duration>,
        observer: &mut O,
    ) -> Outcome {
        let span = tracing::info_span!(
            "action",
            action_id = %action.id,
            method = %action.method,
            destination = %action.destination(),
            trace_id = action.trace.as_ref().map(|t| t.trace_id.as_str()),
        );
        if let Some(trace) = &action.trace {
            crate::telemetry::join_trace(&span, trace);
        }
        // Boxed here and below: these futures are kilobytes. Unboxed, every move (into
        // `instrument`, into the caller's state) copies all of it, and the largest state (the
        // body read) would be reserved for the whole wait for the response head.
        Box::pin(self.run_in_span(admission, action, budget, observer)).instrument(span).await
    }

    async fn run_in_span<O: Observer>(
        &self,
        _admission: Admission,
        action: &HttpAction,
        budget: Option<Duration>,
        observer: &mut O,
    ) -> Outcome {
        crate::client::warn_if_insecure(action);
        let started_at = SystemTime::now();
        let t0 = Instant::now();
        let total = self.total_budget(action, budget);
        let deadline = t0 + total;
        let mut attempts: Vec<AttemptRecord> = Vec::new();
        let mut last_response: Option<ResponseData> = None;
        let mut error: Option<ActionError> = None;
        let destination = Destination::of(&action.url);

        // Every wait below gives way to the drain's cut-off, which ends the action with a reply
        // saying how far it got.
        let mut cut_off = self.cut_off.subscribe();

        let queued = metrics::Raised::queued();
        let running = match unless_cut_off(&mut cut_off, self.limits.run_slot(deadline)).await {
            Some(Ok(slot)) => Some((slot, metrics::Raised::in_flight())),
            Some(Err(refused)) => {
                error = Some(refused);
                None
            }
            None => {
                error = Some(shut_down(ShutDownAt::Before(1)));
                None
            }
        };
        drop(queued);
        let attempts_allowed = if running.is_some() { action.retry.max_attempts } else { 0 };
        for number in 1..=attempts_allowed {
            // Refusals (open circuit, a rate-limit wait past the deadline) send nothing and
            // end the action: no attempt is recorded for them.
            let entered = unless_cut_off(&mut cut_off, self.limits.enter(&destination, deadline)).await;
            let slot = match entered {
                None => {
                    error = Some(shut_down(ShutDownAt::Before(number)));
                    break;
                }
                Some(Ok(slot)) => slot,
                Some(Err(refused)) => {
                    tracing::debug!(action_id = %action.id, attempt = number, error = %refused.message, "attempt refused");
                    error = Some(refused);
                    break;
                }
            };
            if observer.attempt_started(number).await.is_err() {
                error = Some(cancelled());
                break;
            }
            // Nothing logs at info inside an attempt: its span is for exported traces and for
            // debug lines, and costs a microsecond per action where neither is wanted.
            let span = if crate::telemetry::spans_exported() {
                tracing::info_span!("attempt", number)
            } else {
                tracing::debug_span!("attempt", number)
            };
            let started = Instant::now();
            let attempt = Box::pin(self.attempt(action, number, deadline, total, observer)).instrument(span);
            let Some(mut result) = unless_cut_off(&mut cut_off, attempt).await else {
                // The request may be on the wire or answered: the caller must know.
                drop(slot);
                let why = shut_down(ShutDownAt::During(number));
                let mut record = AttemptRecord {
                    number,
                    status: None,
                    error: Some(why.clone()),
                    timing: AttemptTiming::default(),
                    remote_addr: None,
                    backoff: None,
                };
                record.timing.total = started.elapsed();
                // The stream still hears why its attempt ended (unless its reader is gone).
                let _ = observer.attempt_failed(&record, false).await;
                attempts.push(record);
                error = Some(why);
                break;
            };
            self.limits.report(&destination, health_of(&result), too_many_requests_wait(&result));
            drop(slot);
            if let Some(response) = result.response.take() {
                last_response = Some(response);
            }
            let Some(end) = result.end else {
                error = None;
                attempts.push(result.record);
                break;
            };
            let decision = if let Some(decided) = result.decision.take() {
                decided
            } else if result.streamed {
                RetryDecision::Stop { reason: "the body was already streamed".into() }
            } else if matches!(end, AttemptEnd::Error { kind, .. } if !retryable_kind(kind)) {
                RetryDecision::Stop { reason: "this error is final".into() }
            } else {
                action.retry.decide(number, end, deadline.saturating_duration_since(Instant::now()))
            };
            let attempt_error = result.record.error.clone();
            let (will_retry, backoff) = match &decision {
                RetryDecision::Retry { backoff, reason } => {
                    tracing::debug!(action_id = %action.id, attempt = number, %reason, ?backoff, "retrying");
                    (true, Some(*backoff))
                }
                RetryDecision::Stop { reason } => {
                    tracing::debug!(action_id = %action.id, attempt = number, %reason, "not retrying");
                    (false, None)
                }
            };
            result.record.backoff = backoff;
            let gone = observer.attempt_failed(&result.record, will_retry).await.is_err();
            attempts.push(result.record);
            error = attempt_error;
            if gone {
                error = Some(cancelled());
                break;
            }
            match backoff {
                Some(wait) => {
                    if unless_cut_off(&mut cut_off, tokio::time::sleep(wait)).await.is_none() {
                        error = Some(shut_down(ShutDownAt::Before(number + 1)));
                        break;
                    }
                }
                None => break,
            }
        }

        let outcome = self.finish(action, started_at, t0, attempts, last_response, error);
        self.log_outcome(action, &outcome);
        metrics::action_finished(&outcome, &destination.key);
        outcome
    }

    fn log_outcome(&self, action: &HttpAction, outcome: &Outcome) {
        match self.settings.action_log {
            ActionLog::All => {}
            ActionLog::Failed if !outcome.succeeded => {}
            ActionLog::Failed | ActionLog::Off => return,
        }
        let status = outcome.response.as_ref().map(|r| r.head.status);
        let kind = outcome.error.as_ref().map(|e| e.kind.as_str());
        tracing::info!(
            action_id = %action.id,
            method = %action.method,
            destination = %action.destination(),
            status,
            outcome = if outcome.succeeded { "SUCCEEDED" } else { "FAILED" },
            error = kind,
            attempts = outcome.attempts.len(),
            duration_ms = outcome.total.as_millis() as u64,
            "action finished"
        );
    }

    fn total_budget(&self, action: &HttpAction, budget: Option<Duration>) -> Duration {
        let total = action.timeouts.total.unwrap_or(self.settings.default_total_timeout);
        match budget {
            // Finish a little before the caller's deadline so the reply still reaches it: a
            // tenth of the budget, between 10 ms and 250 ms.
            Some(budget) => {
                let margin = (budget / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
                total.min(budget.saturating_sub(margin))
            }
            None => total,
        }
    }

    async fn attempt<O: Observer>(
        &self,
        action: &HttpAction,
        number: u32,
        deadline: Instant,
        total: Duration,
        observer: &mut O,
    ) -> AttemptResult {
        let start = Instant::now();
        let attempt_deadline = start + action.timeouts.attempt;
        let (until, clock) = if attempt_deadline < deadline {
            (attempt_deadline, Clock::Attempt(action.timeouts.attempt))
        } else {
            (deadline, Clock::Total(total))
        };
        let mut record = AttemptRecord {
            number,
            status: None,
            error: None,
            timing: AttemptTiming::default(),
            remote_addr: None,
            backoff: None,
        };
        let fail =
            |mut record: AttemptRecord, error: ActionError, end: Option<AttemptEnd>, response, streamed| {
                record.timing.total = start.elapsed();
                record.error = Some(error);
                AttemptResult { record, end, response, streamed, decision: None }
            };

        let sent = timeout_at(until.into(), Box::pin(self.send_following_redirects(action))).await;
        let response = match sent {
            Err(_) => {
                let end = AttemptEnd::Error { kind: ErrorKind::Timeout, sent: true };
                return fail(record, clock.error(), Some(end), None, false);
            }
            Ok(Err(failure)) => {
                let end = AttemptEnd::Error { kind: failure.kind, sent: failure.sent };
                return fail(record, ActionError::new(failure.kind, failure.message), Some(end), None, false);
            }
            Ok(Ok(response)) => response,
        };

        record.timing.first_byte = Some(start.elapsed());
        if let Some(ConnInfo(meta)) = response.extensions().get::<ConnInfo>() {
            record.remote_addr = Some(meta.remote);
            if meta.claim_for(start) {
                record.timing.dns = meta.dns;
                record.timing.connect = meta.connect;
                record.timing.tls = meta.tls();
            } else {
                record.timing.reused_connection = true;
            }
        }
        let head = head_of(&response);
        let status = head.status;
        record.status = Some(status);
        if observer.response_head(number, &head, &record.timing, record.remote_addr).await.is_err() {
            return fail(record, cancelled(), Some(CANCELLED_END), None, false);
        }

        let success = action.success.contains(status);
        let status_end =
            (!success).then(|| AttemptEnd::Status { status, retry_after: retry_after(&response) });
        // A status that will be retried is not worth its body: decide now, skip reading it.
        let status_decision = status_end.map(|end| {
            let remaining = deadline.saturating_duration_since(Instant::now());
            action.retry.decide(number, end, remaining)
        });
        if let (Some(end), Some(retry @ RetryDecision::Retry { .. })) = (status_end, &status_decision) {
            let response =
                ResponseData { head, body: Bytes::new(), body_json: None, body_text: None, truncated: false };
            let mut result =
                fail(record, status_error(action, &response.head), Some(end), Some(response), false);
            result.decision = Some(retry.clone());
            return result;
        }

        let streams = observer.streams_body();
        let cap = self.body_cap(action, streams);
        // Set while the read waits for the memory budget: a deadline then is the budget's.
        let mut budget_wait = None;
        let body = response.into_body();
        let read = Box::pin(read_body(body, cap, &self.budget, &mut budget_wait, number, observer));
        let read = timeout_at(until.into(), read).await;
        let (body, body_failure): (BodyRead, Option<ActionError>) = match read {
            Err(_) => {
                let error = match budget_wait {
                    Some(wanted) => budget_error(&self.budget.exhausted(wanted)),
                    None => clock.error(),
                };
                (BodyRead::default(), Some(error))
            }
            Ok(read) if read.gone => (read, Some(cancelled())),
            Ok(read) => {
                let failure = read.error.as_ref().map(|e| match e {
                    BodyError::TooLarge(_) => ActionError::new(ErrorKind::BodyTooLarge, e.to_string()),
                    BodyError::Read(_) => ActionError::new(ErrorKind::Protocol, e.to_string()),
                    BodyError::Budget(e) => budget_error(e),
                });
                (read, failure)
            }
        };
        let truncated = matches!(body.error, Some(BodyError::TooLarge(_)));
        let streamed = streams && body.len > 0;
        let (body_json, body_text) =
            if truncated || streams { (None, None) } else { body_views(&head, &body.bytes).await };
        let response = ResponseData { head, body: body.bytes, body_json, body_text, truncated };
        record.timing.total = start.elapsed();

        if let Some(error) = body_failure {
            // BODY_TOO_LARGE and CANCELLED are final (see retryable_kind); a broken or slow
            // body may retry by the policy.
            let end = AttemptEnd::Error { kind: error.kind, sent: true };
            return fail(record, error, Some(end), Some(response), streamed);
        }
        match status_end {
            Some(end) => {
                let error = status_error(action, &response.head);
                let mut result = fail(record, error, Some(end), Some(response), streamed);
                result.decision = status_decision;
                result
            }
            None => AttemptResult { record, end: None, response: Some(response), streamed, decision: None },
        }
    }

    fn body_cap(&self, action: &HttpAction, streams: bool) -> u64 {
        if streams {
            let server = self.settings.stream_max_response_bytes;
            action.max_response_bytes.map_or(server, |own| own.min(server))
        } else {
            action.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES)
        }
    }

    /// Sends the action, following redirects by its policy; returns the final response.
    async fn send_following_redirects(
        &self,
        action: &HttpAction,
    ) -> Result<Response<ResponseBody>, SendFailure> {
        let mut hop = Hop {
            method: action.method.clone(),
            url: action.url.clone(),
            headers: action.headers.clone(),
            body: action.body.clone(),
        };
        let mut visited = vec![hop.url.clone()];
        let client = self.clients.for_action(action)?;
        loop {
            let mut request = build_request(&hop)?;
            if let Some(trace) = &action.trace {
                continue_trace(request.headers_mut(), trace);
            }
            let response = client.send(request, action.timeouts.connect).await?;
            if !action.redirects.follow {
                return Ok(response);
            }
            let location = response.headers().get(header::LOCATION);
            let next = next_hop(&hop, response.status(), location, &visited, action.redirects.max_hops)
                .map_err(|e| SendFailure::new(ErrorKind::Protocol, e.to_string(), true))?;
            match next {
                None => return Ok(response),
                Some(next) => {
                    tracing::debug!(action_id = %action.id, status = response.status().as_u16(), to = %next.url.origin().ascii_serialization(), "following redirect");
                    visited.push(next.url.clone());
                    hop = next;
                }
            }
        }
    }

    fn finish(
        &self,
        action: &HttpAction,
        started_at: SystemTime,
        t0: Instant,
        attempts: Vec<AttemptRecord>,
        response: Option<ResponseData>,
        error: Option<ActionError>,
    ) -> Outcome {
        let succeeded = error.is_none() && response.is_some();
        let error = match (succeeded, error) {
            (false, None) => {
                Some(ActionError::new(ErrorKind::Cancelled, "the action ended before any attempt"))
            }
            (_, e) => e,
        };
        Outcome {
            action_id: action.id.clone(),
            succeeded,
            proceed: succeeded || action.on_failure == OnFailure::Continue,
            error,
            response,
            attempts,
            started_at,
            total: t0.elapsed(),
        }
    }
}

/// A body the memory budget refused: one larger than the whole budget can never fit
/// (BODY_TOO_LARGE, final); no room in time is callout's own limit (RATE_LIMITED).
fn budget_error(e: &BudgetError) -> ActionError {
    let kind = match e {
        BudgetError::TooLarge { .. } => ErrorKind::BodyTooLarge,
        BudgetError::Stalled { .. } | BudgetError::Exhausted { .. } => ErrorKind::RateLimited,
    };
    ActionError::new(kind, e.to_string())
}

/// How an attempt speaks of its destination's health (for the circuit breaker).
fn health_of(result: &AttemptResult) -> Health {
    match (result.record.status, result.record.error.as_ref().map(|e| e.kind)) {
        (Some(status), _) if status >= 500 => Health::Failing,
        (Some(_), _) => Health::Healthy,
        (None, Some(ErrorKind::Connect | ErrorKind::Timeout)) => Health::Failing,
        _ => Health::Unknown,
    }
}

/// The Retry-After of a 429, which cools the destination down for every action.
fn too_many_requests_wait(result: &AttemptResult) -> Option<Duration> {
    match result.end {
        Some(AttemptEnd::Status { status: 429, retry_after }) => retry_after,
        _ => None,
    }
}

/// Errors that no retry can mend: the request itself or its response was wrong.
fn retryable_kind(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::BodyTooLarge
            | ErrorKind::InvalidRequest
            | ErrorKind::DeniedByPolicy
            | ErrorKind::Cancelled
    )
}

const CANCELLED_END: AttemptEnd = AttemptEnd::Error { kind: ErrorKind::Cancelled, sent: true };

fn cancelled() -> ActionError {
    ActionError::new(ErrorKind::Cancelled, "the caller went away")
}

/// Where in its run the drain's cut-off found an action.
#[derive(Debug, Clone, Copy)]
enum ShutDownAt {
    /// Waiting to start this attempt (queued, rate-limited, or in backoff after the one before).
    Before(u32),
    /// This attempt was running: its request may have been sent.
    During(u32),
}

/// The error of an action the drain cut off. The message says whether the request may have
/// reached the upstream: a caller that sends it elsewhere must know whether it could be twice.
fn shut_down(at: ShutDownAt) -> ActionError {
    let message = match at {
        ShutDownAt::Before(1) => "the server shut down before any request was sent".to_owned(),
        ShutDownAt::Before(n) => format!(
            "the server shut down before attempt {n}; the request may have been sent (by attempt{} {})",
            if n > 2 { "s" } else { "" },
            if n > 2 { format!("1 to {}", n - 1) } else { "1".to_owned() }
        ),
        ShutDownAt::During(n) => {
            format!("the server shut down during attempt {n}; the request may have been sent")
        }
    };
    ActionError::new(ErrorKind::Cancelled, message)
}

/// `fut`'s output, or `None` when the drain's cut-off comes first (or came already).
async fn unless_cut_off<F: Future>(cut_off: &mut watch::Receiver<bool>, fut: F) -> Option<F::Output> {
    let cut = async {
        // The sender lives in the executor, which outlives every run; were it gone, no cut-off
        // could come.
        if cut_off.wait_for(|cut| *cut).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    // The cut-off first: an action it finds before an attempt must not start one.
    tokio::select! {
        biased;
        () = cut => None,
        out = fut => Some(out),
    }
}

fn status_error(action: &HttpAction, head: &ResponseHead) -> ActionError {
    let message = match action.error_messages.lookup(head.status) {
        Some(mapped) => mapped.to_owned(),
        None => format!(
            "status {} {} is not in success_codes \"{}\"",
            head.status,
            head.reason,
            action.success.as_str()
        ),
    };
    ActionError::new(ErrorKind::UnexpectedStatus, message)
}

fn retry_after<B>(response: &Response<B>) -> Option<Duration> {
    let value = response.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

/// Continues the caller's trace on an outbound request, unless the action set its own
/// `traceparent` header: each request is a new span of the caller's trace.
fn continue_trace(headers: &mut http::HeaderMap, trace: &TraceContext) {
    if headers.contains_key("traceparent") {
        return;
    }
    let span_id = crate::telemetry::current_span_id();
    if let Ok(parent) = HeaderValue::from_str(&trace.child_traceparent(span_id.as_deref())) {
        headers.insert("traceparent", parent);
    }
    if let Some(state) = trace.state.as_deref().and_then(|s| HeaderValue::from_str(s).ok()) {
        headers.entry("tracestate").or_insert(state);
    }
}

/// The hyper request for one hop: the action's headers plus a default User-Agent.
pub fn build_request(hop: &Hop) -> Result<Request<RequestBody>, SendFailure> {
    let uri: http::Uri = hop.url.as_str().parse().map_err(|_| {
        SendFailure::new(ErrorKind::InvalidRequest, "URL cannot be sent as an HTTP request target", false)
    })?;
    let mut request = Request::new(RequestBody::new(hop.body.clone()));
    *request.method_mut() = hop.method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = hop.headers.clone();
    // `try_`: a map at http's size limit is an error here, never a panic (validation caps the
    // count far below it).
    let full = |_| SendFailure::new(ErrorKind::InvalidRequest, "too many headers to add User-Agent", false);
    if !request.headers().contains_key(header::USER_AGENT) {
        request
            .headers_mut()
            .try_insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT))
            .map_err(full)?;
    }
    Ok(request)
}

#[derive(Default)]
struct BodyRead {
    bytes: Bytes,
    len: u64,
    error: Option<BodyError>,
    /// The observer went away mid-body.
    gone: bool,
}

/// The body's JSON and text views; parsed off the runtime's threads when it is large.
async fn body_views(head: &ResponseHead, body: &Bytes) -> (Option<serde_json::Value>, Option<String>) {
    if body.len() < OFFLOAD_BODY_BYTES {
        return views(head, body);
    }
    let (head, body) = (head.clone(), body.clone());
    // A panic in the parser leaves the views out; the body bytes are still returned.
    tokio::task::spawn_blocking(move || views(&head, &body)).await.unwrap_or((None, None))
}

/// Reads the body: buffered up to `cap` under the memory budget, or handed to the observer
/// chunk by chunk (streamed bodies take no budget). `budget_wait` holds the bytes wanted while
/// the read waits for budget. A body the budget refuses keeps no bytes.
async fn read_body<O: Observer>(
    body: ResponseBody,
    cap: u64,
    budget: &BodyBudget,
    budget_wait: &mut Option<u64>,
    attempt: u32,
    observer: &mut O,
) -> BodyRead {
    let streams = observer.streams_body();
    let hint = hyper::body::Body::size_hint(&body).lower().min(cap);
    let mut body = CappedBody::new(body, cap);
    let mut buf = budget.buffer(cap);
    if !streams && hint > 0 {
        // A known length is taken whole before the first byte, so no body waits half-grown.
        *budget_wait = Some(hint);
        let reserved = buf.reserve(hint).await;
        *budget_wait = None;
        if let Err(e) = reserved {
            return BodyRead { bytes: Bytes::new(), len: 0, error: Some(e.into()), gone: false };
        }
    }
    let mut error = None;
    let mut gone = false;
    loop {
        match body.next_chunk().await {
            Ok(Some(data)) => {
                if streams {
                    let mut offset = body.read() - data.len() as u64;
                    for piece in pieces(data) {
                        let len = piece.len() as u64;
                        if observer.body_chunk(attempt, offset, piece).await.is_err() {
                            gone = true;
                            break;
                        }
                        offset += len;
                    }
                    if gone {
                        break;
                    }
                } else {
                    *budget_wait = Some(data.len() as u64);
                    let pushed = buf.push(&data).await;
                    *budget_wait = None;
                    if let Err(e) = pushed {
                        buf = budget.buffer(cap);
                        error = Some(e.into());
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    BodyRead { bytes: buf.freeze(), len: body.read(), error, gone }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_says_whether_the_request_may_have_been_sent() {
        let message = |at| shut_down(at).message;
        assert_eq!(message(ShutDownAt::Before(1)), "the server shut down before any request was sent");
        assert_eq!(
            message(ShutDownAt::Before(2)),
            "the server shut down before attempt 2; the request may have been sent (by attempt 1)"
        );
        assert!(message(ShutDownAt::Before(4)).ends_with("(by attempts 1 to 3)"));
        assert_eq!(
            message(ShutDownAt::During(2)),
            "the server shut down during attempt 2; the request may have been sent"
        );
        assert_eq!(shut_down(ShutDownAt::During(1)).kind, ErrorKind::Cancelled);
    }

    #[tokio::test]
    async fn a_cut_off_ends_waits_and_comes_first_once_given() {
        let (tx, mut rx) = watch::channel(false);
        assert_eq!(unless_cut_off(&mut rx, async { 7 }).await, Some(7));
        let waiting = tokio::spawn(async move {
            let out = unless_cut_off(&mut rx, std::future::pending::<()>()).await;
            (out, unless_cut_off(&mut rx, async { 7 }).await)
        });
        tx.send_replace(true);
        assert_eq!(waiting.await.unwrap(), (None, None), "a ready future loses to a cut-off already given");
    }
}
