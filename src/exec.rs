//! The action loop: one action's attempts (`attempt`) under its total budget, every retry
//! decision through its `RetryPolicy`, backoff, the drain's cut-off, and the outcome with its
//! log line and metrics. The gRPC service, the stream and `callout exec` all drive this one
//! executor.
use crate::{
    action::{
        ActionError, ActionInput, AttemptEnd, AttemptRecord, AuthProfiles, ErrorKind, HttpAction,
        InvalidAction, OnFailure, Outcome, ResponseData, RetryDecision, ValidationContext,
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
            action_id = %action.id(),
            method = %action.method(),
            destination = %action.destination(),
            tenant = action.tenant(),
            trace_id = action.trace().as_ref().map(|t| t.trace_id.as_str()),
        );
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
        let mut last_response: Option<ResponseData> = None;
        let mut error: Option<ActionError> = None;
        let mut last_end = None;
        // One allocation for the action: every attempt and hop shares it.
        let context = Arc::new(AttemptContext {
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
        });

        // Every wait below gives way to the drain's cut-off, which ends the action with a reply
        // saying how far it got.
        let mut cut_off = self.cut_off.subscribe();

        let tenant = metrics::tenant(action.tenant());
        let queued = (metrics::Raised::queued(), tenant.queued());
        // Boxed: the wait for a slot is this future's largest state (~0.7 KB), which would
        // otherwise stay reserved for the whole action (issue 17: memory in flight).
        let wait_for_slot = Box::pin(self.limits.run_slot(action.tenant(), deadline));
        let running = match unless_cut_off(&mut cut_off, wait_for_slot).await {
            Some(Ok(slot)) => Some((slot, metrics::Raised::in_flight(), tenant.in_flight())),
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
        let mut attempts_allowed = if running.is_some() { action.retry().max_attempts } else { 0 };
        // Whether an attempt was already retried with a new OAuth2 token (once per action).
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
            let attempt = Box::pin(self.attempts.run(
                AttemptOf { action, number, context: &context, refreshed },
                &mut started,
                observer,
            ))
            .instrument(span);
            let attempted = unless_cut_off(&mut cut_off, attempt).await;
            let mut result = match attempted {
                // Refusals (open circuit, a rate-limit wait past the deadline) send nothing and
                // end the action: no attempt is recorded for them.
                Some(Attempted::Refused(refused)) => {
                    tracing::debug!(action_id = %action.id(), attempt = number, error = %refused.message, "attempt refused");
                    error = Some(refused);
                    break;
                }
                Some(Attempted::Gone) => {
                    error = Some(cancelled());
                    break;
                }
                Some(Attempted::Ran(result)) => result,
                None => match started.or_else(|| context.start.take()) {
                    None => {
                        error = Some(shut_down(ShutDownAt::Before(number)));
                        break;
                    }
                    Some(started) => {
                        // The request may be on the wire or answered: the caller must know.
                        let why = shut_down(ShutDownAt::During(number));
                        let mut record =
                            AttemptRecord { error: Some(why.clone()), ..AttemptRecord::new(number) };
                        record.timing.total = started.elapsed();
                        // The stream still hears why its attempt ended (unless its reader is gone).
                        let _ = observer.attempt_failed(&record, false).await;
                        attempts.push(record);
                        error = Some(why);
                        break;
                    }
                },
            };
            if let Some(response) = result.response.take() {
                last_response = Some(response);
            }
            last_end = result.end;
            let Some(end) = result.end else {
                error = None;
                attempts.push(result.record);
                break;
            };
            // A failing status decided already, before its body (a body that will be retried is
            // not read).
            let decision = result.decision.take().unwrap_or_else(|| {
                let remaining = deadline.saturating_duration_since(Instant::now());
                action.retry().after_failure(number, end, result.streamed, remaining)
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
                    if unless_cut_off(&mut cut_off, tokio::time::sleep(wait)).await.is_none() {
                        error = Some(shut_down(ShutDownAt::Before(number + 1)));
                        break;
                    }
                }
                None => break,
            }
        }

        let mut outcome = self.finish(action, started_at, t0, attempts, last_response, error);
        outcome.condition_retry =
            matches!(last_end, Some(AttemptEnd::Condition { .. })) && !outcome.succeeded;
        self.log_outcome(action, &outcome);
        metrics::action_finished(&outcome, &context.destination.key);
        tenant.finished(outcome.succeeded);
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
            action_id = %action.id(),
            method = %action.method(),
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
        let total = action.timeouts().total.unwrap_or(self.settings.default_total_timeout);
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
        }
    }
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
    }

    /// A mock of the attempt: plays its script, one entry per attempt; no sockets.
    #[derive(Clone, Default)]
    struct Script(Arc<Mutex<VecDeque<Scripted>>>);

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
            let mut record = AttemptRecord::new(number);
            let (end, response, streamed) = match next {
                Scripted::Status(status) | Scripted::Streamed(status) => {
                    record.status = Some(status);
                    let head =
                        ResponseHead { status, reason: String::new(), version: "HTTP/1.1", headers: vec![] };
                    let response = ResponseData::head_only(head);
                    let end = (status >= 400).then_some(AttemptEnd::Status { status, retry_after: None });
                    (end, Some(response), matches!(next, Scripted::Streamed(_)))
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
                    return Attempted::Ran(AttemptResult {
                        record,
                        end: Some(end),
                        response: None,
                        streamed: false,
                        decision: Some(decision),
                        refreshes_credentials,
                    });
                }
                Scripted::Hangs | Scripted::Refused(_) => std::future::pending().await,
            };
            if let Some(end) = end {
                let kind = match end {
                    AttemptEnd::Status { .. } => ErrorKind::UnexpectedStatus,
                    AttemptEnd::Condition { .. } => ErrorKind::ConditionFailed,
                    AttemptEnd::Error { kind, .. } => kind,
                };
                record.error = Some(ActionError::new(kind, "failed"));
            }
            Attempted::Ran(AttemptResult {
                record,
                end,
                response,
                streamed,
                decision: None,
                refreshes_credentials: false,
            })
        }
    }

    fn executor(script: &[Scripted]) -> Executor<Script> {
        let settings = ExecSettings::default();
        Executor {
            attempts: Script(Arc::new(Mutex::new(script.iter().copied().collect()))),
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
    async fn a_failing_status_is_retried_after_a_backoff_until_it_succeeds() {
        let outcome = executor(&[Scripted::Status(503), Scripted::Status(200)]).execute(&get(), None).await;
        assert!(outcome.succeeded && outcome.error.is_none(), "{outcome:?}");
        assert_eq!(outcome.attempts.len(), 2);
        assert!(outcome.attempts[0].backoff.is_some() && outcome.attempts[1].backoff.is_none());
        assert_eq!(outcome.response.unwrap().head.status, 200);
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
        let executor = executor(&[Scripted::Hangs]);
        let running = tokio::spawn({
            let executor = executor.clone();
            async move { executor.execute(&get(), None).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        executor.cut_off();
        let outcome = running.await.unwrap();
        let error = outcome.error.unwrap();
        assert_eq!(error.kind, ErrorKind::Cancelled);
        assert_eq!(error.message, "the server shut down during attempt 1; the request may have been sent");
        assert_eq!(outcome.attempts.len(), 1);
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
