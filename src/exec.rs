//! The action loop: one action's attempts (`attempt`) under its total budget, every retry
//! decision through its `RetryPolicy`, backoff, the drain's cut-off, and the outcome with its
//! log line and metrics. The gRPC service, the stream and `callout exec` all drive this one
//! executor.
use crate::{
    action::{
        paginate, poll::PollWait, ActionError, ActionInput, AttemptEnd, AttemptRecord, AuthProfiles,
        ErrorKind, HttpAction, InvalidAction, NextPage, OnFailure, Outcome, PageRecord, Paginate,
        PaginationEnd, PollDue, ResponseData, RetryDecision, ValidationContext, DEFAULT_MAX_RESPONSE_BYTES,
    },
    attempt::{cancelled, AttemptOf, Attempted, Attempts, RunAttempt},
    client::{
        admission::{LimitSettings, Limits},
        attempt::{AttemptContext, SignRequest, StartSignal},
        body_budget::BodyBudget,
        concurrency::{Admission, Overloaded},
        credentials::{
            oauth2::{HttpTokenFetcher, TokenCache, TokenSettings},
            Credentials,
        },
        egress::EgressSettings,
        host::Destination,
        shared::SharedLimits,
        tenant::TenantSettings,
        ClientBuildError, ClientSettings, Clients,
    },
    cut_off::{shut_down, unless_cut_off, ShutDownAt},
    metrics,
    render::{render, Rendered, Total},
    secrets::{SecretSettings, SecretStore},
};
use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};
use tokio::sync::watch;
use tracing::Instrument as _;

// The observer and the body-offload bound are the attempt's; named here too, where callers of
// the executor look for them.
pub use crate::attempt::{Buffered, Gone, Observer, OFFLOAD_BODY_BYTES};

pub use crate::telemetry::ActionLog;

/// Total time of an action that sets none (`server.default_total_timeout`'s default).
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(300);
/// Body cap of ExecuteStream (`server.stream_max_response_bytes`'s default): 1 GiB.
pub const STREAM_MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// Settings of the executor: the config sections it runs on, whole, and the action defaults
/// the `[server]` section holds (`config::Config::exec_settings` gathers them).
#[derive(Debug, Clone)]
pub struct ExecSettings {
    /// Total time of an action that sets none, before the gRPC deadline. Default 5 min.
    pub default_total_timeout: Duration,
    /// Body cap of ExecuteStream. Default 1 GiB.
    pub stream_max_response_bytes: u64,
    pub client: ClientSettings,
    /// Which destinations may be dialled. Default: public addresses only.
    pub egress: EgressSettings,
    /// Queue bound, concurrency caps, rate limits and circuit breaking.
    pub limits: LimitSettings,
    /// Where `{{secret:NAME}}` references are read from.
    pub secrets: SecretSettings,
    /// Headers whose values are sensitive besides Authorization, Proxy-Authorization, Cookie,
    /// Set-Cookie and API-key headers: kept out of logs and HTTP/2 compression tables.
    pub sensitive_headers: Vec<http::HeaderName>,
    /// Which finished actions get an `action finished` log line. Default failed ones.
    pub action_log: ActionLog,
    /// Per-tenant quotas and weights (`[tenants]`).
    pub tenants: TenantSettings,
    /// Named credentials (`[auth.profiles.NAME]`), checked at start. Default none.
    pub auth_profiles: AuthProfiles,
    /// How OAuth2 tokens are fetched and cached.
    pub tokens: TokenSettings,
}

impl Default for ExecSettings {
    fn default() -> Self {
        Self {
            default_total_timeout: DEFAULT_TOTAL_TIMEOUT,
            stream_max_response_bytes: STREAM_MAX_RESPONSE_BYTES,
            client: ClientSettings::default(),
            egress: EgressSettings::default(),
            limits: LimitSettings::default(),
            secrets: SecretSettings::default(),
            sensitive_headers: Vec::new(),
            action_log: ActionLog::default(),
            tenants: TenantSettings::default(),
            auth_profiles: AuthProfiles::default(),
            tokens: TokenSettings::default(),
        }
    }
}

/// Runs actions on the shared client (`A`: the attempts, scripted in this module's tests).
#[derive(Clone)]
pub struct Executor<A = Attempts> {
    attempts: A,
    limits: Arc<Limits>,
    secrets: SecretStore,
    settings: ExecSettings,
    /// Turns true when the server's drain runs out: every action still running ends at once
    /// with a CANCELLED outcome saying whether its request may have been sent.
    cut_off: Arc<watch::Sender<bool>>,
}

impl Executor {
    pub fn new(settings: ExecSettings) -> Result<Self, ClientBuildError> {
        Self::with_shared_limits(settings, None)
    }

    /// An executor whose limits `shared` (the fleet's Redis) holds for the fleet too.
    pub fn with_shared_limits(
        settings: ExecSettings,
        shared: Option<Arc<dyn SharedLimits>>,
    ) -> Result<Self, ClientBuildError> {
        let limits = Arc::new(Limits::with_shared(&settings.limits, &settings.tenants, shared));
        let clients = Clients::new(&settings.client, &settings.egress)?;
        // Token requests go out on the server's own client: its egress policy, proxies, roots.
        let fetcher = HttpTokenFetcher::new(clients.default_client(), settings.tokens.clone());
        let credentials = Credentials::new(TokenCache::new(fetcher, settings.tokens.clone()));
        let attempts = Attempts::new(
            clients,
            limits.clone(),
            BodyBudget::new(settings.limits.buffered_bytes()),
            settings.stream_max_response_bytes,
            credentials,
        );
        Ok(Self {
            attempts,
            limits,
            secrets: SecretStore::new(settings.secrets.clone()),
            settings,
            cut_off: Arc::new(watch::channel(false).0),
        })
    }

    /// This executor for another core: the same limits, secrets, token cache and cut-off, on
    /// upstream pools of its own, so the connections it opens are driven by the runtime that
    /// uses it and an action never waits on another thread's connection task.
    pub fn for_another_core(&self) -> Result<Self, ClientBuildError> {
        Ok(Self { attempts: self.attempts.with_own_pools()?, ..self.clone() })
    }
}

impl Executor {
    /// The request `action`'s first attempt would send, redacted, with the egress verdict,
    /// proxy and policy around it (Render, `callout exec --dry-run`). Nothing is sent and no
    /// token fetched; `budget` is the caller's deadline, as for `execute`.
    pub async fn render(
        &self,
        action: &HttpAction,
        budget: Option<Duration>,
    ) -> Result<Rendered, ActionError> {
        let total = self.total_of(action, budget);
        render(action, self.attempts.clients(), &self.settings.sensitive_headers, total).await
    }
}

impl<A: RunAttempt> Executor<A> {
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
        let context = ValidationContext {
            secrets: &self.secrets,
            sensitive_headers: &self.settings.sensitive_headers,
            auth_profiles: &self.settings.auth_profiles,
        };
        HttpAction::from_input_with(input, &context)
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
    /// Everything it logs at debug sits in an `action` span (with the caller's trace id, when it
    /// sent one), each attempt in an `attempt` span inside it.
    pub async fn run_admitted<O: Observer>(
        &self,
        admission: Admission,
        action: &HttpAction,
        budget: Option<Duration>,
        observer: &mut O,
    ) -> Outcome {
        // At info only the `action finished` line and per-host events log inside an action, and
        // that line carries the span's fields itself: the span is for exported traces and debug
        // lines, and formatting its fields for every action cost ~5% of its CPU (10e, 10f).
        macro_rules! action_span {
            ($level:ident) => {
                tracing::span!(
                    tracing::Level::$level,
                    "action",
                    action_id = %action.id(),
                    method = %action.method(),
                    destination = %action.destination(),
                    tenant = action.tenant(),
                    trace_id = action.trace().as_ref().map(|t| t.trace_id.as_str()),
                )
            };
        }
        let span = if crate::telemetry::spans_exported() { action_span!(INFO) } else { action_span!(DEBUG) };
        if let Some(trace) = &action.trace() {
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
        // One allocation per request: every attempt and hop shares it.
        let context = attempt_context(action, deadline, total);

        // Every wait below gives way to the drain's cut-off, which ends the action with a reply
        // saying how far it got.
        let mut cut_off = self.cut_off.subscribe();

        let tenant = metrics::tenant(action.tenant());
        let queued = (metrics::Raised::queued(), tenant.queued());
        // Boxed: the wait for a slot is this future's largest state (~0.7 KB), which would
        // otherwise stay reserved for the whole action (issue 17: memory in flight).
        let wait_for_slot = Box::pin(self.limits.run_slot(action.tenant(), deadline));
        let running = match unless_cut_off(&mut cut_off, wait_for_slot).await {
            Some(Ok(slot)) => Ok((slot, metrics::Raised::in_flight(), tenant.in_flight())),
            Some(Err(refused)) => Err(refused),
            None => Err(shut_down(ShutDownAt::Before(1))),
        };
        drop(queued);
        // `run` and `pages` are made only once the request has run: kept through the wait, they
        // would be 400 bytes reserved for nothing (issue 17: memory in flight).
        // The running slot and gauges (`_running`) are held to the end, as the outcome is logged.
        let (run, pages, _running) = match running {
            Err(not_run) => {
                (RequestRun { error: Some(not_run), ..RequestRun::default() }, Pages::default(), None)
            }
            Ok(running) => {
                let page = u32::from(action.paginate().is_some());
                let page_started = Instant::now();
                let mut run =
                    self.run_request(action, &context, &mut cut_off, observer, &mut attempts, page).await;
                let mut pages = Pages::default();
                if let Some(paginate) = action.paginate() {
                    let walk = Walk { first: action, paginate, deadline, total };
                    // Boxed: the walk holds the page's action and the next page's request future
                    // (kilobytes); unboxed, every action would reserve them for its whole wait
                    // (issue 17: memory in flight).
                    run = Box::pin(self.walk_pages(
                        walk,
                        run,
                        page_started,
                        &mut cut_off,
                        observer,
                        &mut attempts,
                        &mut pages,
                    ))
                    .await;
                }
                (run, pages, Some(running))
            }
        };
        let RequestRun { response, error, last_end, poll_due } = run;

        let mut outcome = self.finish(action, started_at, t0, attempts, response, error);
        outcome.condition_retry =
            matches!(last_end, Some(AttemptEnd::Condition { .. })) && !outcome.succeeded;
        outcome.poll_due = poll_due;
        outcome.items = pages.items;
        outcome.pages = pages.records;
        self.log_outcome(action, &outcome);
        metrics::action_finished(&outcome, &context.destination.key);
        tenant.finished(outcome.succeeded);
        outcome
    }

    /// One request's attempts under the action's retry policy (`page`: its page with
    /// pagination, else 0), each recorded in `attempts`.
    async fn run_request<O: Observer>(
        &self,
        action: &HttpAction,
        context: &Arc<AttemptContext>,
        cut_off: &mut watch::Receiver<bool>,
        observer: &mut O,
        attempts: &mut Vec<AttemptRecord>,
        page: u32,
    ) -> RequestRun {
        let deadline = context.deadline;
        let mut last_response: Option<ResponseData> = None;
        let mut error: Option<ActionError> = None;
        let mut last_end = None;
        // The request now tried: the action's own, or a poll of a 202's Location, which has a
        // context of its own (it goes to another URL).
        let mut context = context.clone();
        let total = context.total;
        let mut polling: Option<Polling> = None;
        let mut poll_due: Option<PollDue> = None;
        // Attempts before the current request's first try: polls do not spend max_attempts.
        let mut base = 0;
        let mut attempts_allowed = action.retry().max_attempts;
        // Whether an attempt was already retried with a new OAuth2 token (once per request).
        let mut refreshed = false;
        let mut number = 0;
        while number < attempts_allowed {
            number += 1;
            // Nothing logs at info inside an attempt: its span is for exported traces and for
            // debug lines, and costs a microsecond per action where neither is wanted.
            let span = if crate::telemetry::spans_exported() {
                tracing::info_span!("attempt", number)
            } else {
                tracing::debug_span!("attempt", number)
            };
            let mut started = None;
            let current = polling.as_ref().map_or(action, |p| &p.action);
            let of =
                AttemptOf { action: current, number, tries: number - base, context: &context, refreshed };
            let attempt = Box::pin(self.attempts.run(of, &mut started, observer)).instrument(span);
            // Matched as it comes, in a statement of its own: a named `attempted` (half a
            // kilobyte) would stay reserved across every wait below (issue 17: memory in flight).
            let ran = match unless_cut_off(cut_off, attempt).await {
                // Boxed: the result is live across the waits that follow (the observer, the
                // backoff), and inline it would be reserved during the attempt's wait too.
                Some(Attempted::Ran(result)) => Ok(Box::new(result)),
                Some(Attempted::Refused(refused)) => Err(NoResult::Refused(refused)),
                Some(Attempted::Gone) => Err(NoResult::Gone),
                None => Err(NoResult::CutOff),
            };
            let mut result = match ran {
                Ok(result) => result,
                // Refusals (open circuit, a rate-limit wait past the deadline) send nothing and
                // end the action: no attempt is recorded for them.
                Err(NoResult::Refused(refused)) => {
                    tracing::debug!(action_id = %action.id(), attempt = number, error = %refused.message, "attempt refused");
                    error = Some(refused);
                    break;
                }
                Err(NoResult::Gone) => {
                    error = Some(cancelled());
                    break;
                }
                Err(NoResult::CutOff) => match started.or_else(|| context.start.take()) {
                    None => {
                        error = Some(shut_down(ShutDownAt::Before(number)));
                        break;
                    }
                    Some(started) => {
                        // The request may be on the wire or answered: the caller must know.
                        let why = shut_down(ShutDownAt::During(number));
                        let mut record = AttemptRecord {
                            error: Some(why.clone()),
                            poll: current.is_poll(),
                            page,
                            ..AttemptRecord::new(number)
                        };
                        record.timing.total = started.elapsed();
                        // The stream still hears why its attempt ended (unless its reader is gone).
                        let _ = observer.attempt_failed(&record, false).await;
                        attempts.push(record);
                        error = Some(why);
                        break;
                    }
                },
            };
            result.record.page = page;
            if let Some(response) = result.response.take() {
                last_response = Some(response);
            }
            last_end = result.end;
            if let Some(due) = result.poll.take() {
                error = None;
                let (Some(settings), true) = (action.async_poll(), action.polls_inline()) else {
                    // The durable runner stores the poll as its next step.
                    attempts.push(result.record);
                    poll_due = Some(due);
                    break;
                };
                let now = Instant::now();
                let until = match &polling {
                    Some(p) => p.until,
                    None => settings.max_wait.map_or(deadline, |w| (now + w).min(deadline)),
                };
                let wait = match settings.next(due.retry_after, until.saturating_duration_since(now)) {
                    PollWait::After(wait) => wait,
                    PollWait::Expired => {
                        attempts.push(result.record);
                        error = Some(ActionError::new(ErrorKind::Timeout, settings.expired_message()));
                        break;
                    }
                };
                tracing::debug!(action_id = %action.id(), attempt = number, ?wait, "polling the 202's Location");
                result.record.backoff = Some(wait);
                attempts.push(result.record);
                if unless_cut_off(cut_off, Box::pin(tokio::time::sleep(wait))).await.is_none() {
                    error = Some(shut_down(ShutDownAt::Before(number + 1)));
                    break;
                }
                let poll = action.poll_of(due.location);
                context = attempt_context(&poll, deadline, total);
                polling = Some(Polling { action: Box::new(poll), until });
                base = number;
                attempts_allowed = number.saturating_add(action.retry().max_attempts);
                continue;
            }
            let Some(end) = result.end else {
                error = None;
                attempts.push(result.record);
                break;
            };
            // A failing status decided already, before its body (a body that will be retried is
            // not read).
            let decision = result.decision.take().unwrap_or_else(|| {
                let remaining = deadline.saturating_duration_since(Instant::now());
                current.retry().after_failure(number - base, end, result.streamed, remaining)
            });
            if result.refreshes_credentials {
                // The retry with a new token is an attempt of its own, past max_attempts if need be.
                refreshed = true;
                attempts_allowed = attempts_allowed.max(number + 1);
            }
            let attempt_error = result.record.error.clone();
            let (will_retry, backoff) = match &decision {
                RetryDecision::Retry { backoff, reason } => {
                    tracing::debug!(action_id = %action.id(), attempt = number, %reason, ?backoff, "retrying");
                    (true, Some(*backoff))
                }
                RetryDecision::Stop { reason } => {
                    tracing::debug!(action_id = %action.id(), attempt = number, %reason, "not retrying");
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
                    // Boxed (as the poll's wait above): a timer that only a retry needs would
                    // otherwise be reserved in every action's future.
                    if unless_cut_off(cut_off, Box::pin(tokio::time::sleep(wait))).await.is_none() {
                        error = Some(shut_down(ShutDownAt::Before(number + 1)));
                        break;
                    }
                }
                None => break,
            }
        }
        RequestRun { response: last_response, error, last_end, poll_due }
    }

    /// Pagination: after page 1 (`run`, begun at `page_started`), each next page the last one
    /// names, as a request of its own, until a page names none, `max_pages`, a loop, the items'
    /// cap or a failure. Returns the last page's run.
    #[allow(clippy::too_many_arguments)]
    async fn walk_pages<O: Observer>(
        &self,
        walk: Walk<'_>,
        mut run: RequestRun,
        mut page_started: Instant,
        cut_off: &mut watch::Receiver<bool>,
        observer: &mut O,
        attempts: &mut Vec<AttemptRecord>,
        pages: &mut Pages,
    ) -> RequestRun {
        let Walk { first, paginate, deadline, total } = walk;
        let mut visited = paginate.visited(first);
        // A stream sends each page's items as it comes; a buffered reply keeps them, capped.
        let streams = observer.streams_body();
        let cap = first.max_response_bytes().unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        let mut current = first.clone();
        let mut number = 1;
        // Where the page's attempts begin in `attempts` (page 1's are all there are so far).
        let mut first_attempt = 0;
        loop {
            let mut record = PageRecord {
                number,
                status: run.response.as_ref().map(|r| r.head.status),
                url: paginate::shown_url(current.url()),
                total: page_started.elapsed(),
                items: 0,
                attempts: u32::try_from(attempts.len() - first_attempt).unwrap_or(u32::MAX),
                end: None,
            };
            let response = match (&run.error, &run.response) {
                (None, Some(response)) => response,
                _ => {
                    pages.records.push(record);
                    return run;
                }
            };
            let json = page_json(response).await;
            let next = paginate.next_page(current.url(), &response.head.headers, json.as_ref());
            let mut items = paginate.items(json.as_ref());
            drop(json);
            let mut capped = false;
            if !streams {
                let kept = pages.fit(&items, cap);
                capped = kept < items.len();
                items.truncate(kept);
            }
            record.items = u32::try_from(items.len()).unwrap_or(u32::MAX);
            let end = if capped {
                Some(PaginationEnd::ItemsCapped)
            } else {
                match &next {
                    NextPage::None => Some(PaginationEnd::LastPage),
                    NextPage::Invalid(why) => {
                        run.error = Some(ActionError::new(
                            ErrorKind::Protocol,
                            format!(
                                "paginate: page {number} named a next page that cannot be requested: {why}"
                            ),
                        ));
                        pages.records.push(record);
                        return run;
                    }
                    _ if number >= paginate.max_pages() => Some(PaginationEnd::MaxPages),
                    next if !visited.first_time(next) => Some(PaginationEnd::Loop),
                    _ => None,
                }
            };
            record.end = end;
            if observer.page_completed(&record, &items).await.is_err() {
                run.error = Some(cancelled());
            }
            pages.records.push(record);
            if !streams {
                pages.items.append(&mut items);
            }
            if let Some(end) = end {
                tracing::debug!(action_id = %first.id(), page = number, end = end.as_str(), "pagination ended");
                return run;
            }
            if run.error.is_some() {
                return run;
            }
            current = current.next_page(first, &next);
            number += 1;
            tracing::debug!(action_id = %first.id(), page = number, "next page");
            observer.page_started(number);
            let context = attempt_context(&current, deadline, total);
            page_started = Instant::now();
            first_attempt = attempts.len();
            run = self.run_request(&current, &context, cut_off, observer, attempts, number).await;
            // "Before any request was sent" holds for this page only: say which.
            if let Some(error) = run.error.as_mut().filter(|e| e.kind == ErrorKind::Cancelled) {
                error.message = format!("page {number}: {}", error.message);
            }
        }
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
            action_id = %action.id(),
            method = %action.method(),
            destination = %action.destination(),
            tenant = action.tenant(),
            trace_id = action.trace().as_ref().map(|t| t.trace_id.as_str()),
            status,
            outcome = if outcome.succeeded { "SUCCEEDED" } else { "FAILED" },
            error = kind,
            attempts = outcome.attempts.len(),
            duration_ms = outcome.total.as_millis() as u64,
            "action finished"
        );
    }

    fn total_budget(&self, action: &HttpAction, budget: Option<Duration>) -> Duration {
        self.total_of(action, budget).budget
    }

    /// The action's total budget and where it comes from.
    fn total_of(&self, action: &HttpAction, budget: Option<Duration>) -> Total {
        let (total, source) = match action.timeouts().total {
            Some(own) => (own, "action"),
            None => (self.settings.default_total_timeout, "server default"),
        };
        match budget {
            // Finish a little before the caller's deadline so the reply still reaches it: a
            // tenth of the budget, between 10 ms and 250 ms.
            Some(budget) => {
                let margin = (budget / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
                let by_deadline = budget.saturating_sub(margin);
                if by_deadline < total {
                    Total { budget: by_deadline, source: "deadline" }
                } else {
                    Total { budget: total, source }
                }
            }
            None => Total { budget: total, source },
        }
    }

    fn finish(
        &self,
        action: &HttpAction,
        started_at: SystemTime,
        t0: Instant,
        attempts: Vec<AttemptRecord>,
        mut response: Option<ResponseData>,
        error: Option<ActionError>,
    ) -> Outcome {
        let extracted = response.as_mut().map(|r| std::mem::take(&mut r.extracted)).unwrap_or_default();
        let succeeded = error.is_none() && response.is_some();
        let error = match (succeeded, error) {
            (false, None) => {
                Some(ActionError::new(ErrorKind::Cancelled, "the action ended before any attempt"))
            }
            (_, e) => e,
        };
        Outcome {
            action_id: action.id().to_owned(),
            succeeded,
            proceed: succeeded || action.on_failure() == OnFailure::Continue,
            error,
            response,
            attempts,
            started_at,
            total: t0.elapsed(),
            reply_body: action.reply_body(),
            extracted,
            condition_retry: false,
            poll_due: None,
            items: Vec::new(),
            pages: Vec::new(),
        }
    }
}

/// A poll of a 202's Location in progress.
struct Polling {
    /// The GET of the latest Location (`HttpAction::follow_up`). Boxed: an action is a
    /// kilobyte, which every request's future would otherwise reserve for its whole wait.
    action: Box<HttpAction>,
    /// No poll starts after this: the first 202 plus max_wait, within the total deadline.
    until: Instant,
}

/// How an attempt ended without a result (`run_request`).
enum NoResult {
    Refused(ActionError),
    Gone,
    /// By the drain's cut-off.
    CutOff,
}

/// How one request's attempts ended: its last response, the error that stands, and how its
/// last attempt ended.
#[derive(Default)]
struct RequestRun {
    response: Option<ResponseData>,
    error: Option<ActionError>,
    last_end: Option<AttemptEnd>,
    /// A 202 to poll later (the durable runner stores it as the next step).
    poll_due: Option<PollDue>,
}

/// What pagination walks: the action as written, its pagination, the one total deadline.
#[derive(Clone, Copy)]
struct Walk<'a> {
    first: &'a HttpAction,
    paginate: &'a Paginate,
    deadline: Instant,
    total: Duration,
}

/// The pages so far and their items (with the items' size against the cap).
#[derive(Default)]
struct Pages {
    records: Vec<PageRecord>,
    items: Vec<serde_json::Value>,
    items_bytes: u64,
}

impl Pages {
    /// How many of `items` fit under `cap` bytes of the reply with those kept before.
    fn fit(&mut self, items: &[serde_json::Value], cap: u64) -> usize {
        for (i, item) in items.iter().enumerate() {
            let size = paginate::reply_size(item);
            if self.items_bytes.saturating_add(size) > cap {
                return i;
            }
            self.items_bytes += size;
        }
        items.len()
    }
}

/// A page's body as JSON: its JSON view, else its bytes parsed (off the runtime's threads when
/// large); `None` when it is not JSON.
async fn page_json(response: &ResponseData) -> Option<serde_json::Value> {
    if let Some(json) = &response.body_json {
        return Some(json.clone());
    }
    let body = response.body.clone();
    if body.is_empty() {
        return None;
    }
    if body.len() < OFFLOAD_BODY_BYTES {
        return serde_json::from_slice(&body).ok();
    }
    tokio::task::spawn_blocking(move || serde_json::from_slice(&body).ok()).await.ok().flatten()
}

/// What every attempt and hop of one request shares.
fn attempt_context(action: &HttpAction, deadline: Instant, total: Duration) -> Arc<AttemptContext> {
    Arc::new(AttemptContext {
        destination: Destination::of(action.url()),
        deadline,
        total,
        attempt_timeout: action.timeouts().attempt,
        connect_timeout: action.timeouts().connect,
        redirects: action.redirects(),
        url: action.url().clone(),
        cool_down_on_429: !action.success().contains(429),
        start: StartSignal::default(),
        tenant: action.tenant().map(Arc::from),
        // No auth, no signing: nothing allocated for them.
        auth: action.auth().clone(),
        signing: SignRequest::of(action.signing(), action.id()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{action::ResponseHead, attempt::AttemptResult};
    use std::{collections::VecDeque, sync::Mutex};

    /// How a scripted attempt ends.
    #[derive(Debug, Clone, Copy)]
    enum Scripted {
        Refused(ErrorKind),
        Status(u16),
        /// A failing status whose body was already streamed.
        Streamed(u16),
        Error(ErrorKind, bool),
        /// Started, and never ends.
        Hangs,
        /// A 401 whose OAuth2 token the credentials layer dropped.
        Rejected,
        /// A 202 whose Location is to be polled, with this Retry-After (seconds).
        Accepted(Option<u64>),
        /// A 200 page of a paginated action, with a Link to a next page when true.
        Page(bool),
    }

    /// A mock of the attempt: plays its script, one entry per attempt; no sockets. Keeps when
    /// each attempt started, whether it was a poll, and its URL and method.
    #[derive(Clone, Default)]
    struct Script(Arc<Mutex<VecDeque<Scripted>>>, Arc<Mutex<Vec<Seen>>>);

    type Seen = (tokio::time::Instant, bool, String, http::Method);

    /// When the scripted attempt started (`RunAttempt::run`'s `started`).
    type Started = Option<Instant>;

    impl RunAttempt for Script {
        async fn run<O: Observer>(&self, of: AttemptOf<'_>, at: &mut Started, _: &mut O) -> Attempted {
            let number = of.number;
            let next = self.0.lock().unwrap().pop_front().expect("the script has an attempt left");
            if let Scripted::Refused(kind) = next {
                return Attempted::Refused(ActionError::new(kind, "refused"));
            }
            *at = Some(Instant::now());
            let mut record = AttemptRecord { poll: of.action.is_poll(), ..AttemptRecord::new(number) };
            let polls = Arc::clone(&self.1);
            polls.lock().unwrap().push((
                tokio::time::Instant::now(),
                of.action.is_poll(),
                of.action.url().to_string(),
                of.action.method().clone(),
            ));
            if let Scripted::Accepted(retry_after) = next {
                record.status = Some(202);
                let head =
                    ResponseHead { status: 202, reason: String::new(), version: "HTTP/1.1", headers: vec![] };
                let accepted = AttemptResult::ended(record, None, Some(ResponseData::head_only(head)), false);
                let location = "http://h.test/jobs/7".parse().unwrap();
                let poll = PollDue { location, retry_after: retry_after.map(Duration::from_secs) };
                return Attempted::Ran(AttemptResult { poll: Some(poll), ..accepted });
            }
            let (end, response, streamed) = match next {
                Scripted::Status(status) | Scripted::Streamed(status) => {
                    record.status = Some(status);
                    let head =
                        ResponseHead { status, reason: String::new(), version: "HTTP/1.1", headers: vec![] };
                    let response = ResponseData::head_only(head);
                    let end = (status >= 400).then_some(AttemptEnd::Status { status, retry_after: None });
                    (end, Some(response), matches!(next, Scripted::Streamed(_)))
                }
                Scripted::Page(next) => {
                    record.status = Some(200);
                    let n = of.action.url().path().len();
                    let headers = if next {
                        vec![("link".to_owned(), format!("</{}>; rel=\"next\"", "p".repeat(n)))]
                    } else {
                        Vec::new()
                    };
                    let head =
                        ResponseHead { status: 200, reason: String::new(), version: "HTTP/1.1", headers };
                    (None, Some(ResponseData::head_only(head)), false)
                }
                Scripted::Error(kind, sent) => (Some(AttemptEnd::Error { kind, sent }), None, false),
                Scripted::Rejected => {
                    record.status = Some(401);
                    record.error = Some(ActionError::new(ErrorKind::UnexpectedStatus, "401"));
                    let end = AttemptEnd::Status { status: 401, retry_after: None };
                    let (decision, refreshes_credentials) = of.action.retry().after_rejected_credentials(
                        number,
                        end,
                        of.refreshed,
                        Duration::from_secs(60),
                    );
                    let ended = AttemptResult::ended(record, Some(end), None, false);
                    return Attempted::Ran(AttemptResult {
                        decision: Some(decision),
                        refreshes_credentials,
                        ..ended
                    });
                }
                Scripted::Hangs | Scripted::Refused(_) | Scripted::Accepted(_) => {
                    std::future::pending().await
                }
            };
            if let Some(end) = end {
                let kind = match end {
                    AttemptEnd::Status { .. } => ErrorKind::UnexpectedStatus,
                    AttemptEnd::Condition { .. } => ErrorKind::ConditionFailed,
                    AttemptEnd::Error { kind, .. } => kind,
                };
                record.error = Some(ActionError::new(kind, "failed"));
            }
            Attempted::Ran(AttemptResult::ended(record, end, response, streamed))
        }
    }

    /// Runs `action`, and cuts the executor off a second (of the paused clock) later.
    async fn cut_off_after_a_second(executor: Executor<Script>, action: HttpAction) -> Outcome {
        let running = tokio::spawn({
            let executor = executor.clone();
            async move { executor.execute(&action, None).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        executor.cut_off();
        running.await.unwrap()
    }

    fn executor(script: &[Scripted]) -> Executor<Script> {
        let settings = ExecSettings::default();
        Executor {
            attempts: Script(Arc::new(Mutex::new(script.iter().copied().collect())), Arc::default()),
            limits: Arc::new(Limits::new(&settings.limits, &settings.tenants)),
            secrets: SecretStore::new(settings.secrets.clone()),
            settings,
            cut_off: Arc::new(watch::channel(false).0),
        }
    }

    fn get() -> HttpAction {
        let input = ActionInput { method: "GET".into(), url: "http://h.test/".into(), ..Default::default() };
        HttpAction::from_input(input).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn an_action_waiting_for_its_attempt_reserves_little() {
        fn future_size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let executor = executor(&[]);
        let action = get();
        let mut observer = Buffered;
        let admission = executor.admit().unwrap();
        let run = executor.run_in_span(admission, &action, None, &mut observer);
        // Every action in flight holds this future: the next pages' walk, a poll's action, an
        // attempt's result and backoff timers are boxed, not reserved in it, and what the
        // request's run returns is not reserved during it. 1,488 bytes on x86_64 today; 2,408
        // with the returned state reserved, 6,768 with all of it inline.
        assert!(future_size(&run) <= 1792, "{}", future_size(&run));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_status_is_retried_after_a_backoff_until_it_succeeds() {
        let outcome = executor(&[Scripted::Status(503), Scripted::Status(200)]).execute(&get(), None).await;
        assert!(outcome.succeeded && outcome.error.is_none(), "{outcome:?}");
        assert_eq!(outcome.attempts.len(), 2);
        assert!(outcome.attempts[0].backoff.is_some() && outcome.attempts[1].backoff.is_none());
        assert_eq!(outcome.response.unwrap().head.status, 200);
    }

    fn polling_post(max_attempts: u32) -> HttpAction {
        HttpAction::from_input(ActionInput {
            method: "POST".into(),
            url: "http://h.test/jobs".into(),
            body: crate::action::BodyInput::Json("{}".into()),
            retry: crate::action::RetryInput { max_attempts, ..Default::default() },
            async_poll: crate::action::poll::AsyncPollInput {
                enabled: true,
                interval: Some(Duration::from_secs(2)),
                max_wait: None,
            },
            ..Default::default()
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_202_is_polled_after_retry_after_or_the_interval_without_spending_max_attempts() {
        let executor = executor(&[
            Scripted::Accepted(Some(5)),
            Scripted::Accepted(None),
            Scripted::Status(503),
            Scripted::Accepted(None),
            Scripted::Status(200),
        ]);
        // One attempt per request: the polls and the retry of the failed poll are beyond it.
        let outcome = executor.execute(&polling_post(2), None).await;
        assert!(outcome.succeeded, "{outcome:?}");
        assert_eq!(outcome.response.unwrap().head.status, 200);
        let polls: Vec<bool> = outcome.attempts.iter().map(|a| a.poll).collect();
        assert_eq!(polls, [false, true, true, true, true]);
        let numbers: Vec<u32> = outcome.attempts.iter().map(|a| a.number).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5], "polls are numbered on");
        assert_eq!(outcome.attempts[0].backoff, Some(Duration::from_secs(5)), "Retry-After wins");
        assert_eq!(outcome.attempts[1].backoff, Some(Duration::from_secs(2)), "else the interval");
        let seen = executor.attempts.1.lock().unwrap().clone();
        assert_eq!(seen[1].0 - seen[0].0, Duration::from_secs(5));
        assert_eq!(seen[2].0 - seen[1].0, Duration::from_secs(2));
        assert_eq!(seen[0].3, http::Method::POST);
        for (_, poll, url, method) in &seen[1..] {
            assert!(*poll);
            assert_eq!((url.as_str(), method), ("http://h.test/jobs/7", &http::Method::GET));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_attempt_reports_its_poll_due_for_the_durable_runner() {
        let executor = executor(&[Scripted::Accepted(Some(3))]);
        let outcome = executor.execute(&polling_post(3).one_attempt(Duration::from_secs(30)), None).await;
        let due = outcome.poll_due.expect("the poll is the runner's next step");
        assert_eq!(due.location.as_str(), "http://h.test/jobs/7");
        assert_eq!(due.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(outcome.attempts.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_is_retried_once_as_an_attempt_of_its_own() {
        let once = HttpAction::from_input(ActionInput {
            method: "POST".into(),
            url: "http://h.test/".into(),
            retry: crate::action::RetryInput { max_attempts: 1, ..Default::default() },
            ..Default::default()
        })
        .unwrap();
        let outcome = executor(&[Scripted::Rejected, Scripted::Status(200)]).execute(&once, None).await;
        assert!(outcome.succeeded, "{outcome:?}");
        assert_eq!(outcome.attempts.len(), 2, "the retry with the new token is its own attempt");
        assert_eq!(outcome.attempts[0].status, Some(401));
        assert_eq!(outcome.attempts[0].backoff, Some(Duration::ZERO));
        let outcome = executor(&[Scripted::Rejected, Scripted::Rejected]).execute(&once, None).await;
        assert_eq!(outcome.attempts.len(), 2, "refreshed once per action, never a storm");
        assert!(!outcome.succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_ends_the_action_without_an_attempt() {
        let outcome = executor(&[
            Scripted::Error(ErrorKind::Connect, false),
            Scripted::Refused(ErrorKind::CircuitOpen),
        ])
        .execute(&get(), None)
        .await;
        assert_eq!(outcome.error.unwrap().kind, ErrorKind::CircuitOpen);
        assert_eq!(outcome.attempts.len(), 1, "the refused second attempt is not recorded");
    }

    #[tokio::test(start_paused = true)]
    async fn final_errors_and_streamed_bodies_are_not_retried() {
        let connect_then_final =
            [Scripted::Error(ErrorKind::Connect, false), Scripted::Error(ErrorKind::BodyTooLarge, true)];
        let outcome = executor(&connect_then_final).execute(&get(), None).await;
        assert_eq!(outcome.attempts.len(), 2);
        assert_eq!(outcome.error.unwrap().kind, ErrorKind::BodyTooLarge);
        let outcome = executor(&[Scripted::Streamed(503)]).execute(&get(), None).await;
        assert_eq!(outcome.attempts.len(), 1, "a streamed body cannot be taken back");
        assert!(!outcome.succeeded && outcome.attempts[0].backoff.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_off_ends_a_running_attempt_saying_the_request_may_have_been_sent() {
        let outcome = cut_off_after_a_second(executor(&[Scripted::Hangs]), get()).await;
        let error = outcome.error.unwrap();
        assert_eq!(error.kind, ErrorKind::Cancelled);
        assert_eq!(error.message, "the server shut down during attempt 1; the request may have been sent");
        assert_eq!(outcome.attempts.len(), 1);
    }

    fn paginated() -> HttpAction {
        let input = ActionInput {
            method: "GET".into(),
            url: "http://h.test/".into(),
            paginate: Some(crate::action::PaginateInput::default()),
            ..Default::default()
        };
        HttpAction::from_input(input).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn pages_are_requested_until_one_names_no_next_each_with_its_retries() {
        let script =
            [Scripted::Page(true), Scripted::Status(503), Scripted::Page(true), Scripted::Page(false)];
        let outcome = executor(&script).execute(&paginated(), None).await;
        assert!(outcome.succeeded, "{outcome:?}");
        let attempts: Vec<(u32, u32)> = outcome.attempts.iter().map(|a| (a.page, a.number)).collect();
        assert_eq!(attempts, [(1, 1), (2, 1), (2, 2), (3, 1)]);
        let pages: Vec<(u32, u32, Option<PaginationEnd>)> =
            outcome.pages.iter().map(|p| (p.number, p.attempts, p.end)).collect();
        assert_eq!(pages, [(1, 1, None), (2, 2, None), (3, 1, Some(PaginationEnd::LastPage))]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_off_during_a_later_page_names_the_page() {
        let executor = executor(&[Scripted::Page(true), Scripted::Hangs]);
        let outcome = cut_off_after_a_second(executor, paginated()).await;
        assert_eq!(
            outcome.error.unwrap().message,
            "page 2: the server shut down during attempt 1; the request may have been sent"
        );
        assert_eq!(outcome.pages.len(), 2);
        assert_eq!(outcome.attempts.iter().map(|a| a.page).collect::<Vec<_>>(), [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_off_before_the_first_attempt_sends_nothing() {
        let executor = executor(&[Scripted::Status(503), Scripted::Status(200)]);
        executor.cut_off();
        let outcome = executor.execute(&get(), None).await;
        assert_eq!(outcome.error.unwrap().message, "the server shut down before any request was sent");
        assert!(outcome.attempts.is_empty());
    }
}
