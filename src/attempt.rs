//! One attempt of an action: through the attempt stack (`client::stack`), the observer told
//! as it goes, then the body read under its cap and the memory budget. What comes of it is an
//! `AttemptResult`; the action loop (`exec`) decides what happens next.
use crate::{
    action::{
        parse_retry_after, resolve_location, ActionError, AttemptEnd, AttemptRecord, AttemptTiming,
        ErrorKind, HttpAction, PageRecord, PollDue, ReplyBody, ResponseData, ResponseHead, RetryDecision,
        TraceContext, DEFAULT_MAX_RESPONSE_BYTES,
    },
    client::{
        admission::Limits,
        attempt::{AttemptContext, AttemptRequest},
        body_budget::{BodyBudget, BudgetError},
        credentials::{Credentials, CredentialsRejected},
        redirect::{AnsweredBy, Hop},
        response::{head_of, json_depth_within, pieces, views, BodyError, CappedBody, MAX_JSON_DEPTH},
        stack::{attempt_stack, classify, Failed},
        timeout::bounds,
        ClientBuildError, Clients, ConnInfo, ResponseBody, SendFailure,
    },
};
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use std::{
    future::Future,
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};
use tokio::time::timeout_at;
use tower::{util::Either, BoxError, ServiceExt as _};

/// The caller went away; the action stops.
#[derive(Debug, Clone, Copy)]
pub struct Gone;

/// Watches an action as it runs. `ExecuteStream` turns these calls into events; a body is
/// streamed through `body_chunk` instead of being buffered when `streams_body` is true.
pub trait Observer: Send {
    fn streams_body(&self) -> bool;
    /// `poll`: the attempt polls a 202's Location (`async_poll`).
    fn attempt_started(&mut self, attempt: u32, poll: bool) -> impl Future<Output = Result<(), Gone>> + Send;
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
    /// A paginated action's next page is about to be requested (page 1 is not announced):
    /// the attempts and events that follow belong to it.
    fn page_started(&mut self, _page: u32) {}
    /// A paginated action's page succeeded with these items (kept by the executor only when
    /// the body is not streamed).
    fn page_completed(
        &mut self,
        _page: &PageRecord,
        _items: &[serde_json::Value],
    ) -> impl Future<Output = Result<(), Gone>> + Send {
        async { Ok(()) }
    }
}

/// Observes nothing and buffers the body: the unary `Execute` and `callout exec`.
pub struct Buffered;

impl Observer for Buffered {
    fn streams_body(&self) -> bool {
        false
    }
    async fn attempt_started(&mut self, _: u32, _: bool) -> Result<(), Gone> {
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

/// Bodies this large or larger are parsed (and their replies built) on tokio's blocking pool: a
/// megabyte of JSON costs milliseconds of CPU, which would stall every other action on a
/// single-thread runtime (`server.worker_threads = 1`, or a one-CPU container).
pub const OFFLOAD_BODY_BYTES: usize = 64 * 1024;

/// How one attempt ended.
pub struct AttemptResult {
    pub record: AttemptRecord,
    pub end: Option<AttemptEnd>,
    pub response: Option<ResponseData>,
    /// Body bytes were already handed to the observer: the attempt cannot be repeated.
    pub streamed: bool,
    /// The retry decision, when the attempt already had to make it (a failing status decides
    /// before its body is read, so a body that will be retried is not read).
    pub decision: Option<RetryDecision>,
    /// The upstream rejected the attempt's OAuth2 token, and the decision is the one retry
    /// with a new token (which may go past `max_attempts`).
    pub refreshes_credentials: bool,
    /// The response was a 202 with a Location to poll (the action has `async_poll`): its body
    /// was not read, and no condition looked at it.
    pub poll: Option<PollDue>,
}

impl AttemptResult {
    /// An attempt that ended as `end` with no decision made yet, no credentials to refresh and
    /// nothing to poll.
    pub fn ended(
        record: AttemptRecord,
        end: Option<AttemptEnd>,
        response: Option<ResponseData>,
        streamed: bool,
    ) -> Self {
        Self { record, end, response, streamed, decision: None, refreshes_credentials: false, poll: None }
    }
}

/// What became of an attempt the action tried to make.
// Returned once per attempt and unpacked at once: boxing `Ran` would allocate for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Attempted {
    /// A limit refused it before it started: nothing was sent.
    Refused(ActionError),
    /// The observer went away as it started.
    Gone,
    Ran(AttemptResult),
}

/// Runs one attempt of an action: `Attempts` for real; the action loop's tests script one.
/// `started` is set once the attempt passed its limits (and the observer heard of it).
pub trait RunAttempt: Clone + Send + Sync + 'static {
    fn run<O: Observer>(
        &self,
        of: AttemptOf<'_>,
        started: &mut Option<Instant>,
        observer: &mut O,
    ) -> impl Future<Output = Attempted> + Send;
}

/// Which attempt of which action.
#[derive(Clone, Copy)]
pub struct AttemptOf<'a> {
    pub action: &'a HttpAction,
    /// 1-based, counting every request of the action (polls included).
    pub number: u32,
    /// 1-based, among the tries of this request (the action's own, or one poll): what the
    /// retry policy counts.
    pub tries: u32,
    pub context: &'a Arc<AttemptContext>,
    /// An earlier attempt was already retried with refreshed credentials.
    pub refreshed: bool,
}

impl RunAttempt for Attempts {
    async fn run<O: Observer>(
        &self,
        of: AttemptOf<'_>,
        started: &mut Option<Instant>,
        observer: &mut O,
    ) -> Attempted {
        let AttemptOf { action, number, context, .. } = of;
        let poll = action.is_poll();
        let call = self.call_of(action, context);
        let mut call = std::pin::pin!(call);
        let sent = loop {
            tokio::select! {
                biased;
                at = context.start.started(), if started.is_none() => {
                    *started = Some(at);
                    if observer.attempt_started(number, poll).await.is_err() {
                        return Attempted::Gone;
                    }
                }
                sent = &mut call => break sent,
            }
        };
        // Boxed: what follows the response (its head, the body read, conditions) is kilobytes
        // of state, which an attempt waiting for its response would otherwise reserve.
        Box::pin(self.answered(of, sent, started, observer)).await
    }
}

impl Attempts {
    /// The rest of an attempt once its stack answered (`sent`): the observer told, the body
    /// read, the conditions looked at.
    async fn answered<O: Observer>(
        &self,
        of: AttemptOf<'_>,
        sent: Result<Response<ResponseBody>, BoxError>,
        started: &mut Option<Instant>,
        observer: &mut O,
    ) -> Attempted {
        let AttemptOf { action, number, tries, context, refreshed } = of;
        let poll = action.is_poll();
        let deadline = context.deadline;
        if started.is_none() {
            if let Some(at) = context.start.take() {
                *started = Some(at);
                if observer.attempt_started(number, poll).await.is_err() {
                    return Attempted::Gone;
                }
            }
        }
        let start = match (*started, &sent) {
            (Some(start), _) => start,
            (None, Err(e)) => match classify(e) {
                Failed::Refused(refused) => return Attempted::Refused(refused),
                Failed::Attempt(..) => Instant::now(),
            },
            (None, Ok(_)) => Instant::now(),
        };
        let (until, timeout) = bounds(start, context);
        let mut record = AttemptRecord { poll, ..AttemptRecord::new(number) };
        let fail =
            |mut record: AttemptRecord, error: ActionError, end: Option<AttemptEnd>, response, streamed| {
                record.timing.total = start.elapsed();
                record.error = Some(error);
                AttemptResult::ended(record, end, response, streamed)
            };
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                let (error, end) = match classify(&e) {
                    Failed::Attempt(error, end) => (error, end),
                    // A limit above the clock cannot refuse once the attempt started.
                    Failed::Refused(error) => {
                        (error.clone(), AttemptEnd::Error { kind: error.kind, sent: false })
                    }
                };
                return Attempted::Ran(fail(record, error, Some(end), None, false));
            }
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
        let retry_after = retry_after(&response);
        let rejected = response.extensions().get::<CredentialsRejected>().is_some();
        let poll_due = match polled(action, context, &response) {
            Ok(due) => due,
            Err(error) => {
                let end = AttemptEnd::Error { kind: error.kind, sent: true };
                record.status = Some(status);
                return Attempted::Ran(fail(
                    record,
                    error,
                    Some(end),
                    Some(ResponseData::head_only(head)),
                    false,
                ));
            }
        };
        // The head's extensions hold the destination slot until the attempt is over.
        let (_parts, body) = response.into_parts();
        record.status = Some(status);
        if observer.response_head(number, &head, &record.timing, record.remote_addr).await.is_err() {
            return Attempted::Ran(fail(record, cancelled(), Some(CANCELLED_END), None, false));
        }
        if let Some(due) = poll_due {
            // The job is not done: its 202 is no result, so neither its body nor a condition
            // counts. The body is left unread (its connection is not reused).
            record.timing.total = start.elapsed();
            let polled = AttemptResult::ended(record, None, Some(ResponseData::head_only(head)), false);
            return Attempted::Ran(AttemptResult { poll: Some(due), ..polled });
        }

        let success = action.success().contains(status);
        let status_end = (!success).then_some(AttemptEnd::Status { status, retry_after });
        // A status that will be retried is not worth its body: decide now, skip reading it.
        let mut refreshes_credentials = false;
        let status_decision = status_end.map(|end| {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if rejected {
                let (decision, refreshes) =
                    action.retry().after_rejected_credentials(tries, end, refreshed, remaining);
                refreshes_credentials = refreshes;
                decision
            } else {
                action.retry().decide(tries, end, remaining)
            }
        });
        if let (Some(end), Some(retry @ RetryDecision::Retry { .. })) = (status_end, &status_decision) {
            let error = status_error(action, &head);
            let response = ResponseData::head_only(head);
            let mut result = fail(record, error, Some(end), Some(response), false);
            result.decision = Some(retry.clone());
            result.refreshes_credentials = refreshes_credentials;
            return Attempted::Ran(result);
        }

        let streams = observer.streams_body();
        // A body a condition or an extract path looks into is read whole first, even on a
        // stream (its chunks follow, unless the attempt is retried), under Execute's cap.
        let holds = streams && action.evaluates_body();
        let cap = if holds {
            self.body_cap(action, false).min(self.body_cap(action, true))
        } else {
            self.body_cap(action, streams)
        };
        // Set while the read waits for the memory budget: a deadline then is the budget's.
        let mut budget_wait = None;
        // REPLY_BODY_NONE: a stream gets no chunks, the body is still read to its end.
        let forward = action.reply_body() != ReplyBody::None;
        let read_mode = ReadMode { attempt: number, streams: streams && !holds, forward };
        let read = Box::pin(read_body(body, cap, &self.budget, &mut budget_wait, read_mode, observer));
        let read = timeout_at(until.into(), read).await;
        let (body, body_failure): (BodyRead, Option<ActionError>) = match read {
            Err(_) => {
                let error = match budget_wait {
                    Some(wanted) => budget_error(&self.budget.exhausted(wanted)),
                    None => ActionError::new(ErrorKind::Timeout, timeout.to_string()),
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
        let mut streamed = streams && !holds && forward && body.len > 0;
        // Conditions and extract paths parse the body themselves when there is no JSON view.
        let (body_json, body_text) = if truncated || streams || !action.reply_body().wants_views() {
            (None, None)
        } else {
            body_views(&head, &body.bytes).await
        };
        let mut response =
            ResponseData { head, body: body.bytes, body_json, body_text, truncated, extracted: Vec::new() };
        record.timing.total = start.elapsed();

        if let Some(error) = body_failure {
            // BODY_TOO_LARGE and CANCELLED are final (see RetryPolicy::after_failure); a broken or slow
            // body may retry by the policy.
            let end = AttemptEnd::Error { kind: error.kind, sent: true };
            return Attempted::Ran(fail(record, error, Some(end), Some(response), streamed));
        }

        // Conditions and extract paths, on the body as read.
        let verdict = if action.evaluates_body() {
            let looked = look_into(action, &mut response, status_end.is_none(), start.elapsed()).await;
            response.extracted = looked.extracted;
            looked.verdict
        } else {
            Verdict::Passed
        };
        let (end, error, decision) = match verdict {
            Verdict::Retry(error) => {
                let end = AttemptEnd::Condition { status, retry_after };
                let remaining = deadline.saturating_duration_since(Instant::now());
                (Some(end), Some(error), Some(action.retry().decide(tries, end, remaining)))
            }
            Verdict::Failed(error) => {
                (Some(AttemptEnd::Error { kind: error.kind, sent: true }), Some(error), None)
            }
            Verdict::Passed => match status_end {
                Some(end) => (Some(end), Some(status_error(action, &response.head)), status_decision),
                None => (None, None, None),
            },
        };
        if holds {
            // A retried attempt's body is not handed on: the retry's body stands for it.
            let retried = matches!(decision, Some(RetryDecision::Retry { .. }));
            if forward && !retried && !response.body.is_empty() {
                if send_held(&response.body, number, observer).await.is_err() {
                    return Attempted::Ran(fail(record, cancelled(), Some(CANCELLED_END), None, false));
                }
                streamed = true;
            }
            // The stream's reply carries no body fields: the chunks were the body. Pagination
            // still reads the held bytes for the next page and the items (the executor drops
            // them, and the stream's reply never carries them).
            if action.paginate().is_none() {
                response.body = Bytes::new();
            }
            response.body_json = None;
            response.body_text = None;
        }
        Attempted::Ran(match (end, error) {
            (Some(end), Some(error)) => {
                let mut result = fail(record, error, Some(end), Some(response), streamed);
                result.decision = decision;
                result
            }
            _ => AttemptResult::ended(record, None, Some(response), streamed),
        })
    }

    /// The attempt stack called with the attempt's request. `oneshot`, built outside the
    /// attempt's future: the stack and the request are the call's state only until it is
    /// made, and then its future takes their room, so an attempt waiting for its response
    /// reserves neither (issue 17: memory in flight).
    fn call_of(
        &self,
        action: &HttpAction,
        context: &Arc<AttemptContext>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, BoxError>> + Send + 'static {
        // A request or client that cannot be built fails the attempt once it passed its limits,
        // as a send would.
        let built = first_request(action).and_then(|request| Ok((request, self.clients.for_action(action)?)));
        let (request, client) = match built {
            Ok((request, client)) => (request, Either::Left(client)),
            Err(failure) => (Request::new(Bytes::new()), Either::Right(FailWith(failure))),
        };
        let request = AttemptRequest { http: request, context: context.clone(), checked: None };
        attempt_stack(&self.limits, &self.credentials, client).oneshot(request)
    }
}

/// The Location to poll, when the action polls and `response` is a 202 that has one (or is
/// itself a poll: a 202 without Location polls the same URL again). A relative Location
/// resolves against the URL that answered (after redirects).
fn polled<B>(
    action: &HttpAction,
    context: &AttemptContext,
    response: &Response<B>,
) -> Result<Option<PollDue>, ActionError> {
    if action.async_poll().is_none() || response.status() != http::StatusCode::ACCEPTED {
        return Ok(None);
    }
    let answered = response.extensions().get::<AnsweredBy>().map_or(&context.url, |a| &a.0);
    let Some(location) = response.headers().get(header::LOCATION) else {
        let again = action
            .is_poll()
            .then(|| PollDue { location: answered.clone(), retry_after: retry_after(response) });
        return Ok(again);
    };
    let location = location
        .to_str()
        .map_err(|_| "it is not visible ASCII".to_owned())
        .and_then(|l| resolve_location(answered, l).map_err(|e| e.to_string()))
        .map_err(|e| ActionError::new(ErrorKind::Protocol, format!("async_poll: the 202's Location: {e}")))?;
    Ok(Some(PollDue { location, retry_after: retry_after(response) }))
}

/// What the action's conditions made of an attempt's response.
enum Verdict {
    Passed,
    /// retry_condition was true: the error stands if no attempt follows.
    Retry(ActionError),
    Failed(ActionError),
}

struct Looked {
    verdict: Verdict,
    extracted: Vec<(String, serde_json::Value)>,
}

/// Evaluates the action's conditions and extract paths on `response` (read whole). The JSON is
/// the body's JSON view, else the body parsed when it parses whatever its Content-Type; parsed
/// and evaluated off the runtime's threads when the body is large. `status_ok`: the status
/// is in success_codes (success_condition is evaluated only then).
async fn look_into(
    action: &HttpAction,
    response: &mut ResponseData,
    status_ok: bool,
    elapsed: Duration,
) -> Looked {
    if response.body.len() < OFFLOAD_BODY_BYTES {
        return looked(action, response, status_ok, elapsed);
    }
    let (action2, moved) = (action.clone(), std::mem::replace(response, empty_response()));
    let done = tokio::task::spawn_blocking(move || {
        let looked = looked(&action2, &moved, status_ok, elapsed);
        (looked, moved)
    })
    .await;
    match done {
        Ok((looked, moved)) => {
            *response = moved;
            looked
        }
        // A panic in the evaluator fails the attempt; the body is gone with the task.
        Err(_) => Looked {
            verdict: Verdict::Failed(ActionError::new(
                ErrorKind::ConditionFailed,
                "the response could not be evaluated",
            )),
            extracted: Vec::new(),
        },
    }
}

fn empty_response() -> ResponseData {
    ResponseData {
        head: ResponseHead { status: 0, reason: String::new(), version: "HTTP/1.1", headers: Vec::new() },
        body: Bytes::new(),
        body_json: None,
        body_text: None,
        truncated: false,
        extracted: Vec::new(),
    }
}

fn looked(action: &HttpAction, response: &ResponseData, status_ok: bool, elapsed: Duration) -> Looked {
    use crate::action::condition::{Facts, FactsBody};
    let parsed;
    let json = match &response.body_json {
        Some(json) => Some(json),
        None => {
            parsed = parse_any_json(&response.body);
            parsed.as_ref()
        }
    };
    let extracted = action.extract().apply(json);
    let conditions = (action.retry_condition(), action.success_condition().filter(|_| status_ok));
    if conditions == (None, None) {
        return Looked { verdict: Verdict::Passed, extracted };
    }
    let body = match (json, std::str::from_utf8(&response.body)) {
        (Some(json), _) => FactsBody::Json(json),
        (None, Ok(text)) => FactsBody::Text(text),
        (None, Err(_)) => FactsBody::Bytes(&response.body),
    };
    let facts = Facts { status: response.head.status, headers: &response.head.headers, body, elapsed };
    let failed = |message: String| Verdict::Failed(ActionError::new(ErrorKind::ConditionFailed, message));
    let variables = match facts.variables() {
        Ok(v) => v,
        Err(e) => {
            return Looked { verdict: failed(format!("the response could not be evaluated: {e}")), extracted }
        }
    };
    let verdict = (|| {
        if let Some(retry) = conditions.0 {
            match retry.evaluate(&variables) {
                Ok(true) => {
                    return Verdict::Retry(ActionError::new(
                        ErrorKind::ConditionFailed,
                        format!("retry_condition {} was still true", retry.quoted()),
                    ))
                }
                Ok(false) => {}
                Err(e) => return failed(format!("retry_condition {} failed: {e}", retry.quoted())),
            }
        }
        if let Some(success) = conditions.1 {
            match success.evaluate(&variables) {
                Ok(true) => {}
                Ok(false) => return failed(format!("success_condition {} was false", success.quoted())),
                Err(e) => return failed(format!("success_condition {} failed: {e}", success.quoted())),
            }
        }
        Verdict::Passed
    })();
    Looked { verdict, extracted }
}

/// The body as JSON when it parses (whatever its Content-Type), within the JSON view's depth.
fn parse_any_json(body: &Bytes) -> Option<serde_json::Value> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if !json_depth_within(&body[start..], MAX_JSON_DEPTH) {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// Hands a held body to the observer in chunks.
async fn send_held<O: Observer>(body: &Bytes, attempt: u32, observer: &mut O) -> Result<(), Gone> {
    let mut offset = 0u64;
    for piece in pieces(body.clone()) {
        let len = piece.len() as u64;
        observer.body_chunk(attempt, offset, piece).await?;
        offset += len;
    }
    Ok(())
}

/// What attempts run on: the server's clients, limits and memory budget for bodies.
#[derive(Clone)]
pub struct Attempts {
    clients: Clients,
    limits: Arc<Limits>,
    /// The memory budget for buffered bodies (`limits.max_buffered_bytes`).
    budget: BodyBudget,
    /// Body cap of ExecuteStream.
    stream_max_response_bytes: u64,
    /// Applies each action's credentials; holds the shared OAuth2 token cache.
    credentials: Credentials,
}

impl Attempts {
    pub fn new(
        clients: Clients,
        limits: Arc<Limits>,
        budget: BodyBudget,
        stream_max_response_bytes: u64,
        credentials: Credentials,
    ) -> Self {
        Self { clients, limits, budget, stream_max_response_bytes, credentials }
    }

    /// The same attempts on clients with pools of their own (see [`Clients::with_own_pools`]);
    /// limits, the body budget and the token cache stay shared.
    pub fn with_own_pools(&self) -> Result<Self, ClientBuildError> {
        Ok(Self { clients: self.clients.with_own_pools()?, ..self.clone() })
    }

    /// The clients attempts are sent with (Render previews a connection on them).
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    fn body_cap(&self, action: &HttpAction, streams: bool) -> u64 {
        if streams {
            let server = self.stream_max_response_bytes;
            action.max_response_bytes().map_or(server, |own| own.min(server))
        } else {
            action.max_response_bytes().unwrap_or(DEFAULT_MAX_RESPONSE_BYTES)
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

const CANCELLED_END: AttemptEnd = AttemptEnd::Error { kind: ErrorKind::Cancelled, sent: true };

pub fn cancelled() -> ActionError {
    ActionError::new(ErrorKind::Cancelled, "the caller went away")
}

fn status_error(action: &HttpAction, head: &ResponseHead) -> ActionError {
    let message = match action.error_messages().lookup(head.status) {
        Some(mapped) => mapped.to_owned(),
        None => format!(
            "status {} {} is not in success_codes \"{}\"",
            head.status,
            head.reason,
            action.success().as_str()
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

/// The first hop's request: the action's method, URL, headers (plus a default User-Agent) and
/// body, continuing the caller's trace.
pub(crate) fn first_request(action: &HttpAction) -> Result<Request<Bytes>, SendFailure> {
    let hop = Hop {
        method: action.method().clone(),
        url: action.url().clone(),
        headers: action.headers().clone(),
        body: action.body().clone(),
    };
    let mut request = hop.into_request()?;
    if let Some(trace) = &action.trace() {
        continue_trace(request.headers_mut(), trace);
    }
    Ok(request)
}

/// The client of an attempt whose request or client could not be built: fails as a send would.
#[derive(Clone)]
struct FailWith(SendFailure);

impl tower::Service<AttemptRequest> for FailWith {
    type Response = Response<ResponseBody>;
    type Error = SendFailure;
    type Future = std::future::Ready<Result<Response<ResponseBody>, SendFailure>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), SendFailure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: AttemptRequest) -> Self::Future {
        std::future::ready(Err(self.0.clone()))
    }
}

/// How a body is read: handed on in chunks (`streams`; to no one unless `forward`) or buffered.
#[derive(Clone, Copy)]
struct ReadMode {
    attempt: u32,
    streams: bool,
    forward: bool,
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
    mode: ReadMode,
    observer: &mut O,
) -> BodyRead {
    let ReadMode { attempt, streams, forward } = mode;
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
                if streams && !forward {
                    // Counted against the cap, handed to no one.
                } else if streams {
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
    use crate::client::credentials::oauth2::{HttpTokenFetcher, TokenCache};

    #[tokio::test]
    async fn an_attempt_waiting_for_its_response_reserves_little() {
        fn future_size<F: Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let settings = crate::exec::ExecSettings::default();
        let clients = Clients::new(&settings.client, &settings.egress).unwrap();
        let limits = Arc::new(Limits::new(&settings.limits, &settings.tenants));
        let fetcher = HttpTokenFetcher::new(clients.default_client(), Default::default());
        let credentials = Credentials::new(TokenCache::new(fetcher, Default::default()));
        let attempts = Attempts::new(clients, limits, BodyBudget::new(1 << 20), 1 << 20, credentials);
        let input = crate::action::ActionInput {
            method: "GET".into(),
            url: "http://h.test/".into(),
            ..Default::default()
        };
        let action = HttpAction::from_input(input).unwrap();
        let context =
            crate::client::attempt::tests::request("http://h.test/", Duration::from_secs(1)).context;
        let (mut started, mut observer) = (None, Buffered);
        let of = AttemptOf { action: &action, number: 1, tries: 1, context: &context, refreshed: false };
        let attempt = attempts.run(of, &mut started, &mut observer);
        // Every action in flight holds its attempt's future: neither the stack nor the request
        // (once called) nor what follows the response (boxed) may be reserved in it. 1,168
        // bytes on x86_64 today; 3,816 with all of them inline.
        assert!(future_size(&attempt) <= 1536, "{}", future_size(&attempt));
    }
}
