//! Durable actions: the runner that takes due actions from the store and runs each attempt
//! through the shared `Executor` (so queue, slots, rate limits, breaker, egress policy and
//! secrets apply as for Execute), records it, and decides the next step with the durable retry
//! policy, storing "what to do next" (`next_attempt_at`) in the store rather than in the
//! process. `service` is the gRPC edge of it (`callout.v1.DurableActionService`).
//!
//! The stored truth is the contract's own encoding: the submitted `ExecuteHttpActionRequest`,
//! and each attempt, error and result as their proto messages. That is why this module, unlike
//! the rest of the domain, uses `pb` and the edge's converters.
pub mod policy;
pub mod service;

use crate::{
    action::{poll::PollWait, ActionError, AttemptEnd, ErrorKind, Outcome, PollDue, RetryDecision},
    api::convert,
    client::concurrency::Admission,
    exec::{Buffered, Executor},
    pb,
    store::{from_millis, to_millis, ActionStore, ClaimRequest, Claimed, Finish, Next, State, StoreError},
};
use bytes::Bytes;
use http::HeaderName;
use policy::Plan;
use prost::Message as _;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime},
};
use tokio::sync::{oneshot, Notify};

/// The `[durable]` section: durable actions (DurableActionService).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DurableSettings {
    /// Unfinished actions stored at most; past this Submit is RESOURCE_EXHAUSTED. Default 100000.
    pub max_pending: u64,
    /// How long final actions are kept before they are purged. Default 7 days.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Header carrying the action id on POST and PATCH; `None` (written as the empty string)
    /// adds none. Default `Idempotency-Key`.
    #[serde(with = "crate::settings::optional_header")]
    pub idempotency_header: Option<HeaderName>,
    /// Attempts the runner has in flight at once. Default 256.
    #[serde(deserialize_with = "crate::settings::at_least_one")]
    pub max_concurrent: usize,
    /// Attempts the runner has in flight to one destination at once, so a slow host cannot
    /// take every place. Default 32.
    #[serde(deserialize_with = "crate::settings::at_least_one")]
    pub max_concurrent_per_destination: usize,
    /// How long a claimed attempt is ours without a renewal; renewed every third of it while
    /// the attempt runs (and while its end is being stored). Another replica of a shared store
    /// takes the action over only after it runs out. At least 1s. Default 30s.
    #[serde(serialize_with = "humantime_serde::serialize", deserialize_with = "lease")]
    pub lease: Duration,
}

fn lease<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match humantime_serde::deserialize::<Duration, D>(d)? {
        t if t < Duration::from_secs(1) => Err(serde::de::Error::custom(format!(
            "must be at least 1s (it is {})",
            humantime::format_duration(t)
        ))),
        t => Ok(t),
    }
}

impl Default for DurableSettings {
    fn default() -> Self {
        Self {
            max_pending: 100_000,
            retention: Duration::from_secs(7 * 24 * 3600),
            idempotency_header: Some(HeaderName::from_static("idempotency-key")),
            max_concurrent: 256,
            max_concurrent_per_destination: 32,
            lease: Duration::from_secs(30),
        }
    }
}

/// How often the runner looks at the store when nothing wakes it, and how often it refreshes
/// the gauges and looks for expired leases.
const TICK: Duration = Duration::from_secs(1);
/// How often final actions past their retention are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);
/// How long the end of an attempt is tried again while the store is unavailable (PostgreSQL
/// down): the attempt's result is written when the store comes back within it. Past it the
/// attempt is left to whoever takes its lease over.
const FINISH_PATIENCE: Duration = Duration::from_secs(3600);
/// The longest wait between two tries to store an attempt's end.
const FINISH_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub const GAUGE_ACTIONS: &str = "callout_durable_actions";
pub const GAUGE_OLDEST_DUE: &str = "callout_durable_oldest_due_seconds";
pub const SUBMITTED: &str = "callout_durable_submitted_total";

/// The durable runner and its store, shared by the gRPC service and the server's drain.
#[derive(Clone)]
pub struct Durable {
    inner: Arc<Inner>,
}

/// Attempts in flight: action id → (destination, what aborts it).
type Running = HashMap<String, (String, Option<oneshot::Sender<()>>)>;

struct Inner {
    /// `Err`: the store could not be opened; every call is UNAVAILABLE with this reason.
    store: Result<Arc<dyn ActionStore>, String>,
    executor: Executor,
    settings: DurableSettings,
    /// Wakes the scheduler: something became due or a place freed up.
    wake: Notify,
    running: Mutex<Running>,
    draining: AtomicBool,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable").field("available", &self.inner.store.is_ok()).finish_non_exhaustive()
    }
}

impl Durable {
    /// Starts the runner on `store`: first the attempts a previous run left in flight, then due
    /// actions as they come. Call inside the runtime.
    pub fn start(store: Arc<dyn ActionStore>, executor: Executor, settings: DurableSettings) -> Self {
        describe_metrics();
        let durable = Self::new(Ok(store), executor, settings);
        let runner = durable.clone();
        tokio::spawn(async move { runner.schedule().await });
        durable
    }

    /// A durable service whose store could not be opened: every call answers UNAVAILABLE with
    /// `reason`, and the rest of the server runs.
    pub fn unavailable(reason: String, executor: Executor, settings: DurableSettings) -> Self {
        Self::new(Err(reason), executor, settings)
    }

    fn new(
        store: Result<Arc<dyn ActionStore>, String>,
        executor: Executor,
        settings: DurableSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                executor,
                settings,
                wake: Notify::new(),
                running: Mutex::default(),
                draining: AtomicBool::new(false),
            }),
        }
    }

    pub fn is_available(&self) -> bool {
        self.inner.store.is_ok()
    }

    pub fn settings(&self) -> &DurableSettings {
        &self.inner.settings
    }

    pub fn executor(&self) -> &Executor {
        &self.inner.executor
    }

    /// The store, or why there is none.
    pub fn store(&self) -> Result<&Arc<dyn ActionStore>, StoreError> {
        self.inner.store.as_ref().map_err(|reason| StoreError::Unavailable(reason.clone()))
    }

    /// Stops claiming attempts (the drain): pending actions stay stored for the next start, and
    /// attempts in flight finish (they hold the executor's admissions the drain waits for).
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Tells the scheduler to look at the store again.
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    /// Aborts the attempt of `action_id` in flight, if any (after CancelAction).
    pub fn abort(&self, action_id: &str) {
        let cancel = self.running().get_mut(action_id).and_then(|(_, cancel)| cancel.take());
        if let Some(cancel) = cancel {
            let _ = cancel.send(());
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        // A panic while holding the map leaves it usable: entries are plain data.
        self.inner.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The scheduler: claims due actions while there is room, and sleeps until the next one is
    /// due or something wakes it.
    async fn schedule(self) {
        let Ok(store) = self.store().cloned() else { return };
        let mut housekeeping = Instant::now();
        let mut purged = Instant::now() - PURGE_EVERY;
        loop {
            if self.is_draining() {
                tracing::info!("durable actions: draining, no new attempts are started");
                return;
            }
            if housekeeping <= Instant::now() {
                self.housekeeping(store.as_ref(), &mut purged).await;
                housekeeping = Instant::now() + TICK;
            }
            let mut wait = TICK;
            match self.claim(store.as_ref()).await {
                Ok((claimed, full, next_due)) => {
                    if full {
                        // There may be more due right now.
                        continue;
                    }
                    if let Some(due) = next_due {
                        let until = due.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                        // Due but not claimable now (its destination is busy, or no room):
                        // a finishing attempt wakes the scheduler.
                        wait = if until.is_zero() && claimed == 0 { TICK } else { until.min(TICK) };
                    }
                }
                Err(e) => tracing::warn!(error = %e, "durable actions: cannot claim due actions"),
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Claims as many due actions as there is room for and starts their attempts. Returns how
    /// many were claimed, whether every place offered was taken, and when the next is due.
    async fn claim(&self, store: &dyn ActionStore) -> Result<(usize, bool, Option<SystemTime>), StoreError> {
        let settings = &self.inner.settings;
        let (free, busy) = {
            let running = self.running();
            let mut per: HashMap<&str, usize> = HashMap::new();
            for (dest, _) in running.values() {
                *per.entry(dest.as_str()).or_default() += 1;
            }
            let busy: Vec<(String, usize)> = per.into_iter().map(|(d, n)| (d.to_owned(), n)).collect();
            (settings.max_concurrent.saturating_sub(running.len()), busy)
        };
        if free == 0 {
            return Ok((0, false, None));
        }
        // The executor's queue is shared with Execute: take places before claiming, so a claimed
        // attempt never waits for one (and a full queue leaves the actions PENDING).
        let mut admissions: Vec<Admission> = Vec::new();
        while admissions.len() < free.min(64) {
            match self.inner.executor.admit() {
                Ok(admission) => admissions.push(admission),
                Err(_) => break,
            }
        }
        if admissions.is_empty() {
            return Ok((0, false, Some(SystemTime::now() + TICK)));
        }
        let offered = admissions.len();
        let claims = store
            .claim(ClaimRequest {
                now: SystemTime::now(),
                lease: settings.lease,
                limit: offered,
                per_destination: settings.max_concurrent_per_destination,
                busy,
            })
            .await?;
        let claimed = claims.claimed.len();
        for claim in claims.claimed {
            let Some(admission) = admissions.pop() else { break };
            self.spawn_attempt(claim, admission);
        }
        Ok((claimed, claimed == offered, claims.next_due))
    }

    fn spawn_attempt(&self, claim: Claimed, admission: Admission) {
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let id = claim.stored.record.action_id.clone();
        self.running().insert(id.clone(), (claim.destination.clone(), Some(cancel_tx)));
        let durable = self.clone();
        tokio::spawn(async move {
            let attempt = claim.attempt;
            let work = async {
                let finish = durable.attempt(&claim, admission, cancel_rx).await;
                durable.finish(finish).await;
            };
            // The lease is renewed while the attempt runs and while its end is being stored.
            tokio::select! {
                _ = work => {}
                _ = durable.keep_lease(&id, attempt) => {}
            }
            durable.running().remove(&id);
            durable.wake();
        });
    }

    /// Renews the lease of attempt `attempt` every third of the lease; never returns while the
    /// lease is ours. When the store says it no longer is (cancelled on another replica, or
    /// taken over after the lease ran out while the store was unreachable) the attempt is
    /// aborted, and this waits for it to end.
    async fn keep_lease(&self, action_id: &str, attempt: u32) {
        let lease = self.inner.settings.lease;
        let every = lease / 3;
        let Ok(store) = self.store() else { return std::future::pending().await };
        loop {
            tokio::time::sleep(every).await;
            match store.renew(action_id, attempt, SystemTime::now() + lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(%action_id, attempt, "durable actions: the attempt's lease is no longer ours; aborting it");
                    self.abort(action_id);
                    return std::future::pending().await;
                }
                Err(e) => tracing::warn!(%action_id, error = %e, "durable actions: cannot renew a lease"),
            }
        }
    }

    /// Runs one attempt of a claimed action and says what comes next.
    async fn attempt(&self, claim: &Claimed, admission: Admission, cancel: oneshot::Receiver<()>) -> Finish {
        let stored = &claim.stored;
        let id = stored.record.action_id.clone();
        let now = SystemTime::now();
        let finish = |record: Option<pb::Attempt>, next: Next| Finish {
            action_id: id.clone(),
            attempt: claim.attempt,
            record: record.map(|r| Bytes::from(r.encode_to_vec())),
            next,
            now: SystemTime::now(),
        };
        let step = PollStep::of(claim);
        let planned = self.plan(&stored.request).and_then(|plan| Ok((plan, step?)));
        let (plan, step) = match planned {
            // A 202's Location is due: this attempt polls it, not the submitted request again.
            Ok((plan, Some(step))) => {
                (Plan { action: plan.action.poll_of(step.location.clone()), ..plan }, Some(step))
            }
            Ok((plan, None)) => (plan, None),
            Err(error) => {
                let result = self.result(claim, None, Some(&error), None);
                return finish(None, final_failed(&error, result));
            }
        };
        let remaining = stored.deadline_at.duration_since(now).unwrap_or(Duration::ZERO);
        if remaining.is_zero() {
            let error = ActionError::new(ErrorKind::Timeout, "the durable action's total time ran out");
            let result = self.result(claim, None, Some(&error), None);
            return finish(None, final_failed(&error, result));
        }
        // One attempt through the executor, within min(attempt timeout, time left).
        let one = plan.action.one_attempt(remaining);
        let mut buffered = Buffered;
        let run = self.inner.executor.run_admitted(admission, &one, None, &mut buffered);
        let outcome = tokio::select! {
            outcome = run => outcome,
            _ = cancel => {
                let error = ActionError::new(ErrorKind::Cancelled, "cancelled by CancelAction while in flight");
                let record = pb::Attempt {
                    number: claim.attempt,
                    error: Some(convert::action_error(&error)),
                    poll: step.is_some(),
                    ..Default::default()
                };
                // The action is already CANCELLED: only the attempt is recorded.
                let next = Next::Retry { at: SystemTime::now(), last_error: None, next_step: None };
                return finish(Some(record), next);
            }
        };
        self.after_attempt(claim, &plan, step.as_ref(), outcome, finish)
    }

    /// The retry decision after an attempt's outcome. `step`: the attempt polled a 202's
    /// Location (`plan` is then that poll's).
    fn after_attempt(
        &self,
        claim: &Claimed,
        plan: &Plan,
        step: Option<&PollStep>,
        outcome: Outcome,
        finish: impl Fn(Option<pb::Attempt>, Next) -> Finish,
    ) -> Finish {
        let stored = &claim.stored;
        let number_in_run = claim.attempt.saturating_sub(tries_base(claim, step)).max(1);
        // A retry tries the same request again: the poll of the same Location, if it was one.
        let same_step = stored.record.next_step.clone();
        let remaining = stored.deadline_at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        let error = outcome.error.clone();
        // The last attempt: one, or two when a rejected OAuth2 token was replaced and the
        // attempt tried again with the new one.
        let Some(attempt) = outcome.attempts.last() else {
            // Refused before sending (open circuit, rate limit, no slot in time): nothing was
            // sent, so no attempt is recorded; wait and try again.
            let error =
                error.unwrap_or_else(|| ActionError::new(ErrorKind::Cancelled, "no attempt was made"));
            // At least a second: a refusal (an open circuit, say) lasts a while, and each retry
            // is two commits.
            let backoff = plan.action.retry().backoff(number_in_run).max(Duration::from_secs(1));
            if backoff >= remaining {
                let result = self.result(claim, None, Some(&error), None);
                return finish(None, final_failed(&error, result));
            }
            let last_error = Some(encode(&convert::action_error(&error)));
            let next = Next::Retry { at: SystemTime::now() + backoff, last_error, next_step: same_step };
            return finish(None, next);
        };
        // The attempt in the contract's form (no body views are copied for it).
        let only_attempts = Outcome {
            action_id: String::new(),
            succeeded: outcome.succeeded,
            proceed: outcome.proceed,
            error: None,
            response: None,
            attempts: outcome.attempts.clone(),
            started_at: outcome.started_at,
            total: outcome.total,
            reply_body: outcome.reply_body,
            extracted: Vec::new(),
            condition_retry: false,
            poll_due: None,
            items: Vec::new(),
            pages: Vec::new(),
        };
        let mut record = convert::outcome(only_attempts).attempts.into_iter().last().unwrap_or_default();
        record.number = claim.attempt;
        record.poll = step.is_some();
        if let Some(due) = outcome.poll_due.clone() {
            return self.after_accepted(claim, plan, step, &due, record, outcome, finish);
        }
        if outcome.succeeded {
            let result = self.result(claim, Some(&record), None, Some(outcome));
            return finish(Some(record), Next::Final { state: State::Succeeded, last_error: None, result });
        }
        let error = error.unwrap_or_else(|| ActionError::new(ErrorKind::Cancelled, "the attempt failed"));
        if error.kind == ErrorKind::Cancelled && self.is_draining() {
            // Cut off by the drain: like an attempt cut off by a crash, it may have been sent.
            return finish(Some(record), self.after_interruption(claim, plan, &error));
        }
        let retry_after = outcome.response.as_ref().and_then(|r| {
            let value = r.head.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case("retry-after"))?;
            crate::action::parse_retry_after(&value.1, SystemTime::now())
        });
        let end = match attempt.status {
            // The retry_condition asked for another attempt: polling, durably.
            Some(status) if outcome.condition_retry => AttemptEnd::Condition { status, retry_after },
            status => policy::attempt_end(status, error.kind, retry_after),
        };
        match policy::decide(plan, number_in_run, end, remaining) {
            RetryDecision::Retry { backoff, reason } => {
                tracing::debug!(action_id = %stored.record.action_id, attempt = claim.attempt, %reason, ?backoff, "durable retry");
                record.backoff = Some(convert::proto_duration(backoff));
                let last_error = Some(encode(&convert::action_error(&error)));
                let next = Next::Retry { at: SystemTime::now() + backoff, last_error, next_step: same_step };
                finish(Some(record), next)
            }
            RetryDecision::Stop { reason } => {
                tracing::debug!(action_id = %stored.record.action_id, attempt = claim.attempt, %reason, "durable action failed");
                let result = self.result(claim, Some(&record), Some(&error), Some(outcome));
                finish(Some(record), final_failed(&error, result))
            }
        }
    }

    /// After a 202 with a Location: the poll stored as the next step, due after the Retry-After
    /// or the interval; or, when it would start past max_wait, the action failed as TIMEOUT.
    #[allow(clippy::too_many_arguments)]
    fn after_accepted(
        &self,
        claim: &Claimed,
        plan: &Plan,
        step: Option<&PollStep>,
        due: &PollDue,
        mut record: pb::Attempt,
        outcome: Outcome,
        finish: impl Fn(Option<pb::Attempt>, Next) -> Finish,
    ) -> Finish {
        let now = SystemTime::now();
        let deadline = claim.stored.deadline_at;
        let wait = plan.action.async_poll().map(|settings| {
            // max_wait runs from the first 202, and is kept with the step.
            let until = step.map_or_else(
                || settings.max_wait.map_or(deadline, |w| (now + w).min(deadline)),
                |s| from_millis(s.until_ms),
            );
            let left = until.duration_since(now).unwrap_or_default();
            (settings.next(due.retry_after, left), until, settings.expired_message())
        });
        match wait {
            Some((PollWait::After(wait), until, _)) => {
                tracing::debug!(action_id = %claim.stored.record.action_id, attempt = claim.attempt, ?wait, "durable poll of a 202's Location stored");
                record.backoff = Some(convert::proto_duration(wait));
                let step = PollStep {
                    location: due.location.clone(),
                    until_ms: to_millis(until),
                    base: claim.attempt,
                };
                let next = Next::Retry { at: now + wait, last_error: None, next_step: Some(step.encode()) };
                finish(Some(record), next)
            }
            Some((PollWait::Expired, _, message)) => {
                let error = ActionError::new(ErrorKind::Timeout, message);
                let result = self.result(claim, Some(&record), Some(&error), Some(outcome));
                finish(Some(record), final_failed(&error, result))
            }
            // Not an action that polls (the executor reports none then): its 202 is the result.
            None => {
                let result = self.result(claim, Some(&record), None, Some(outcome));
                finish(Some(record), Next::Final { state: State::Succeeded, last_error: None, result })
            }
        }
    }

    /// The final outcome: the last attempt's, with every attempt of the action's history.
    fn result(
        &self,
        claim: &Claimed,
        last: Option<&pb::Attempt>,
        error: Option<&ActionError>,
        outcome: Option<Outcome>,
    ) -> Bytes {
        let stored = &claim.stored;
        let mut result = match outcome {
            Some(outcome) => convert::outcome(outcome),
            None => pb::ExecuteHttpActionResponse {
                action_id: stored.record.action_id.clone(),
                outcome: pb::Outcome::Failed as i32,
                ..Default::default()
            },
        };
        if let Some(error) = error {
            result.outcome = pb::Outcome::Failed as i32;
            result.error = Some(convert::action_error(error));
            result.proceed = self
                .plan(&stored.request)
                .is_ok_and(|p| p.action.on_failure() == crate::action::OnFailure::Continue);
        }
        result.attempts =
            stored.record.attempts.iter().filter_map(|a| pb::Attempt::decode(a.as_ref()).ok()).collect();
        result.attempts.extend(last.cloned());
        let created = stored.record.created_at;
        result.timing = Some(pb::ActionTiming {
            started_at: Some(convert::timestamp(created)),
            total: Some(convert::proto_duration(
                SystemTime::now().duration_since(created).unwrap_or_default(),
            )),
        });
        encode(&result)
    }

    /// Stores the end of an attempt; a store that is unavailable (PostgreSQL down) is tried
    /// again with backoff for up to FINISH_PATIENCE, then the attempt is left to whoever takes
    /// its lease over (it is RUNNING under a lease in the store).
    async fn finish(&self, finish: Finish) {
        let Ok(store) = self.store() else { return };
        let started = Instant::now();
        let mut wait = Duration::from_millis(100);
        loop {
            match store.finish_attempt(finish.clone()).await {
                Ok(_) => return,
                Err(e @ StoreError::Unavailable(_)) => {
                    tracing::warn!(action_id = %finish.action_id, error = %e, "durable actions: cannot record an attempt; trying again")
                }
                Err(e) => {
                    // Not a matter of time (a damaged record): left to the lease's takeover.
                    tracing::error!(action_id = %finish.action_id, error = %e, "durable actions: cannot record an attempt");
                    return;
                }
            }
            if started.elapsed() >= FINISH_PATIENCE {
                tracing::error!(action_id = %finish.action_id, "durable actions: gave up recording an attempt; it is left to the lease's takeover");
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(FINISH_BACKOFF_MAX);
        }
    }

    /// The request, decoded and validated again (secrets and the egress policy may have changed
    /// since it was stored).
    pub(crate) fn plan(&self, request: &[u8]) -> Result<Plan, ActionError> {
        let request = pb::ExecuteHttpActionRequest::decode(request).map_err(|e| {
            ActionError::new(ErrorKind::InvalidRequest, format!("the stored request does not decode: {e}"))
        })?;
        policy::plan(request, &self.inner.executor, self.inner.settings.idempotency_header.as_ref()).map_err(
            |bad| {
                ActionError::new(
                    ErrorKind::InvalidRequest,
                    format!("the stored action is no longer valid: {bad}"),
                )
            },
        )
    }

    /// Gauges, purges and the attempts left in flight by a previous run (or an expired lease).
    async fn housekeeping(&self, store: &dyn ActionStore, purged: &mut Instant) {
        self.recover(store).await;
        let now = SystemTime::now();
        match store.stats(now).await {
            Ok(stats) => {
                metrics::gauge!(GAUGE_ACTIONS, "state" => "pending").set(stats.pending as f64);
                metrics::gauge!(GAUGE_ACTIONS, "state" => "running").set(stats.running as f64);
                metrics::gauge!(GAUGE_ACTIONS, "state" => "retry_waiting").set(stats.retry_waiting as f64);
                metrics::gauge!(GAUGE_OLDEST_DUE).set(stats.oldest_due.as_secs_f64());
            }
            Err(e) => tracing::warn!(error = %e, "durable actions: cannot read the store's counts"),
        }
        if purged.elapsed() >= PURGE_EVERY {
            *purged = Instant::now();
            let before = now.checked_sub(self.inner.settings.retention).unwrap_or(SystemTime::UNIX_EPOCH);
            match store.purge(before).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(purged = n, "durable actions: final actions past their retention purged")
                }
                Err(e) => tracing::warn!(error = %e, "durable actions: cannot purge"),
            }
        }
    }

    /// Attempts whose lease ran out (at start: every attempt the previous run had in flight).
    /// Such an attempt may have been sent: it is tried again only when that is safe (an
    /// idempotent method or an idempotency key), else the action fails saying so.
    async fn recover(&self, store: &dyn ActionStore) {
        let orphans = match store.orphans(SystemTime::now(), 1000).await {
            Ok(orphans) => orphans,
            Err(e) => {
                tracing::warn!(error = %e, "durable actions: cannot look for interrupted attempts");
                return;
            }
        };
        for claim in orphans {
            let id = claim.stored.record.action_id.clone();
            if self.running().contains_key(&id) {
                continue;
            }
            let interrupted = ActionError::new(
                ErrorKind::Cancelled,
                format!(
                    "attempt {} was in flight when callout stopped: it may have been sent",
                    claim.attempt
                ),
            );
            let record = pb::Attempt {
                number: claim.attempt,
                error: Some(convert::action_error(&interrupted)),
                poll: claim.stored.record.next_step.is_some(),
                ..Default::default()
            };
            let next = match self.plan(&claim.stored.request) {
                Err(error) => final_failed(&error, self.result(&claim, Some(&record), Some(&error), None)),
                Ok(plan) => self.after_interruption(&claim, &plan, &interrupted),
            };
            tracing::info!(action_id = %id, attempt = claim.attempt, "durable actions: interrupted attempt taken over");
            let finish = Finish {
                action_id: id,
                attempt: claim.attempt,
                record: Some(encode(&record)),
                next,
                now: SystemTime::now(),
            };
            self.finish(finish).await;
        }
    }
}

impl Durable {
    /// What follows an attempt that was cut off (a crash, a restart, the drain timeout) and may
    /// have been sent: another attempt only when that is safe (an idempotent method or an
    /// idempotency key) and the run has attempts and time left; else FAILED, saying why.
    fn after_interruption(&self, claim: &Claimed, plan: &Plan, interrupted: &ActionError) -> Next {
        let record = pb::Attempt {
            number: claim.attempt,
            error: Some(convert::action_error(interrupted)),
            poll: claim.stored.record.next_step.is_some(),
            ..Default::default()
        };
        // A poll is a GET: it may always be sent again.
        let polling = claim.stored.record.next_step.is_some();
        if !polling && !plan.action.retry().may_repeat {
            let error = ActionError::new(
                ErrorKind::Cancelled,
                format!(
                    "attempt {} was cut off and may have been sent; a {} without an idempotency key \
                     is not repeated",
                    claim.attempt,
                    plan.action.method()
                ),
            );
            return final_failed(&error, self.result(claim, Some(&record), Some(&error), None));
        }
        let step = PollStep::of(claim).ok().flatten();
        let in_run = claim.attempt.saturating_sub(tries_base(claim, step.as_ref()));
        let left = claim.stored.deadline_at.duration_since(SystemTime::now()).unwrap_or_default();
        if in_run >= plan.action.retry().max_attempts || left.is_zero() {
            return final_failed(interrupted, self.result(claim, Some(&record), Some(interrupted), None));
        }
        Next::Retry {
            at: SystemTime::now(),
            last_error: Some(encode(&convert::action_error(interrupted))),
            next_step: claim.stored.record.next_step.clone(),
        }
    }
}

/// The next step of a durable action that polls: the 202's Location, due at `next_attempt_at`
/// (stored as `Record::next_step`, JSON), so a restarted callout polls it rather than sending
/// the submitted request again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PollStep {
    /// Resolved against the URL that answered the 202.
    location: url::Url,
    /// No poll starts after this (ms since the Unix epoch): the first 202 plus max_wait.
    until_ms: i64,
    /// Attempts before this poll's first try: the retry policy counts the poll's tries from it.
    base: u32,
}

/// `PollStep` as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredStep {
    location: String,
    /// No poll starts after this (ms since the Unix epoch): the first 202 plus max_wait.
    until_ms: i64,
    /// Attempts before this poll's first try: the retry policy counts the poll's tries from it.
    base: u32,
}

impl PollStep {
    /// The step stored with a claimed action, if any; a damaged one fails the action.
    fn of(claim: &Claimed) -> Result<Option<Self>, ActionError> {
        let Some(bytes) = &claim.stored.record.next_step else { return Ok(None) };
        let damaged = |e: String| {
            ActionError::new(ErrorKind::InvalidRequest, format!("the stored next step does not decode: {e}"))
        };
        let stored: StoredStep = serde_json::from_slice(bytes).map_err(|e| damaged(e.to_string()))?;
        let location = url::Url::parse(&stored.location).map_err(|e| damaged(e.to_string()))?;
        Ok(Some(Self { location, until_ms: stored.until_ms, base: stored.base }))
    }

    fn encode(&self) -> Bytes {
        let stored =
            StoredStep { location: self.location.to_string(), until_ms: self.until_ms, base: self.base };
        // A string and two numbers: serializing cannot fail.
        Bytes::from(serde_json::to_vec(&stored).unwrap_or_default())
    }
}

/// Attempts of the run before the current request's first try (a poll's own, when polling).
fn tries_base(claim: &Claimed, step: Option<&PollStep>) -> u32 {
    step.map_or(claim.stored.run_base, |s| s.base.max(claim.stored.run_base))
}

fn final_failed(error: &ActionError, result: Bytes) -> Next {
    Next::Final { state: State::Failed, last_error: Some(encode(&convert::action_error(error))), result }
}

fn encode(message: &impl prost::Message) -> Bytes {
    Bytes::from(message.encode_to_vec())
}

fn describe_metrics() {
    metrics::describe_gauge!(
        GAUGE_ACTIONS,
        "Unfinished durable actions by state: pending (waiting for a first attempt), running, retry_waiting"
    );
    metrics::describe_gauge!(
        GAUGE_OLDEST_DUE,
        metrics::Unit::Seconds,
        "How long the longest-due pending durable action has been waiting past its due time"
    );
    metrics::describe_counter!(SUBMITTED, "Durable actions stored by Submit");
    // At zero from the start, as every documented series is, so alerts need no first event.
    for state in ["pending", "running", "retry_waiting"] {
        metrics::gauge!(GAUGE_ACTIONS, "state" => state).set(0.0);
    }
    metrics::gauge!(GAUGE_OLDEST_DUE).set(0.0);
    metrics::counter!(SUBMITTED).absolute(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poll_step_reads_back_as_stored_and_a_damaged_one_is_an_error() {
        let step = PollStep {
            location: "http://h.test/jobs/7".parse().unwrap(),
            until_ms: 1_700_000_000_000,
            base: 3,
        };
        let stored = step.encode();
        let decoded: StoredStep = serde_json::from_slice(&stored).unwrap();
        assert_eq!(decoded.location, "http://h.test/jobs/7");
        let claim = |next_step: Option<Bytes>| Claimed {
            stored: crate::store::Stored {
                record: crate::store::Record {
                    action_id: "a".into(),
                    state: State::Running,
                    sequence: 1,
                    attempts: Vec::new(),
                    next_attempt_at: None,
                    last_error: None,
                    result: None,
                    next_step,
                    created_at: SystemTime::UNIX_EPOCH,
                    updated_at: SystemTime::UNIX_EPOCH,
                },
                request: Bytes::new(),
                attempts_started: 4,
                run_base: 1,
                deadline_at: SystemTime::UNIX_EPOCH,
            },
            attempt: 4,
            destination: "h.test:80".into(),
        };
        let read = PollStep::of(&claim(Some(stored))).unwrap().unwrap();
        assert_eq!(read, step);
        assert_eq!(tries_base(&claim(None), Some(&read)), 3, "a poll's tries count from its base");
        assert_eq!(tries_base(&claim(None), None), 1, "else from the run's");
        assert!(PollStep::of(&claim(None)).unwrap().is_none());
        let damaged = PollStep::of(&claim(Some(Bytes::from_static(b"{")))).unwrap_err();
        assert_eq!(damaged.kind, ErrorKind::InvalidRequest);
    }
}
