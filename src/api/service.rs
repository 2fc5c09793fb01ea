//! `callout.v1.HttpActionService`: turn the message into an action, run it on the executor,
//! map the result. ExecuteStream runs the action in a task feeding a channel, so a caller that
//! goes away is noticed and the action stops.
use super::{
    convert,
    reply_hold::HeldUntilSent,
    status::{self, invalid_argument},
};
use crate::{
    action::{AttemptRecord, AttemptTiming, HttpAction, InvalidAction, ResponseHead, TraceContext},
    client::concurrency::{Admission, Overloaded},
    exec::{Buffered, Executor, Gone, Observer, OFFLOAD_BODY_BYTES},
    pb::{self, action_event::Event},
};
use bytes::Bytes;
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{metadata::MetadataMap, Request, Response, Status};

/// Events buffered between the action and a slow reader: bounded, so a slow caller slows the
/// upstream read instead of growing memory.
const STREAM_BUFFER: usize = 16;
/// RetryInfo of a refusal: a full queue usually has room again within a second (actions take
/// milliseconds to seconds); a draining server is gone for good, but its replacement (or another
/// replica behind the same address) takes calls about as soon.
const RETRY_QUEUE_FULL: Duration = Duration::from_secs(1);
const RETRY_DRAINING: Duration = Duration::from_secs(1);

pub struct HttpActionService {
    executor: Executor,
    /// Set when the server drains: new actions are refused with UNAVAILABLE.
    draining: Arc<AtomicBool>,
}

impl HttpActionService {
    pub fn new(executor: Executor, draining: Arc<AtomicBool>) -> Self {
        Self { executor, draining }
    }

    /// A place for a new action: refused while draining or when the queue is full.
    fn admit(&self) -> Result<Admission, Status> {
        if self.draining.load(Ordering::SeqCst) {
            crate::metrics::refused("draining");
            return Err(status::unavailable(
                "DRAINING",
                "callout is shutting down; send the action to another instance",
                RETRY_DRAINING,
            ));
        }
        self.executor.admit().map_err(overloaded)
    }
}

impl HttpActionService {
    /// Refuses at once an action whose tenant has its `max_queued` actions waiting already.
    fn tenant_queue(&self, action: &HttpAction) -> Result<(), Status> {
        let Some(message) = self.executor.limits().tenant_queue_full_now(action.tenant()) else {
            return Ok(());
        };
        crate::metrics::tenant(action.tenant()).refused("queue");
        let metadata = action.tenant().map(|t| ("tenant".to_owned(), t.to_owned())).into_iter().collect();
        Err(status::resource_exhausted("TENANT_QUEUE_FULL", message, RETRY_QUEUE_FULL, metadata))
    }
}

/// Validates the request; proto-level and domain problems are reported together. Called once
/// the action is admitted, so a draining or full server refuses before doing this work. An
/// action whose validation may block (secret files read, TLS PEM parsed) is validated on the
/// blocking pool; any other is validated in place, cheaper than the hop.
async fn action_of(
    request: Request<pb::ExecuteHttpActionRequest>,
    executor: &Executor,
) -> Result<HttpAction, Status> {
    let trace = trace_context(request.metadata());
    let mut bad = InvalidAction::default();
    let mut input = convert::action_input(request.into_inner(), &mut bad);
    input.trace = trace;
    let validated = if input.blocks_to_validate() {
        let executor = executor.clone();
        tokio::task::spawn_blocking(move || executor.action(input))
            .await
            .map_err(|e| Status::internal(format!("validating the action failed: {e}")))?
    } else {
        executor.action(input)
    };
    match validated {
        Ok(action) if bad.is_empty() => Ok(action),
        Ok(_) => Err(invalid_argument(&bad)),
        Err(more) => {
            bad.violations.extend(more.violations);
            Err(invalid_argument(&bad))
        }
    }
}

/// A full queue: the caller should back off and try again.
fn overloaded(e: Overloaded) -> Status {
    tracing::warn!(in_flight = e.in_flight, queued = e.queued, "action refused: queue full");
    crate::metrics::refused("queue_full");
    let limits = [("in_flight", e.in_flight), ("queued", e.queued)];
    let metadata = limits.into_iter().map(|(k, v)| (k.to_owned(), v.to_string())).collect();
    status::resource_exhausted("QUEUE_FULL", e.to_string(), RETRY_QUEUE_FULL, metadata)
}

/// The caller's W3C trace context (`traceparent`, `tracestate` metadata), when well-formed.
fn trace_context(metadata: &MetadataMap) -> Option<TraceContext> {
    let parent = metadata.get("traceparent")?.to_str().ok()?;
    TraceContext::parse(parent, metadata.get("tracestate").and_then(|s| s.to_str().ok()))
}

/// The caller's deadline, from the `grpc-timeout` header ("<digits><H|M|S|m|u|n>").
fn grpc_deadline(metadata: &MetadataMap) -> Option<Duration> {
    let raw = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl pb::http_action_service_server::HttpActionService for HttpActionService {
    async fn execute(
        &self,
        request: Request<pb::ExecuteHttpActionRequest>,
    ) -> Result<Response<pb::ExecuteHttpActionResponse>, Status> {
        let budget = grpc_deadline(request.metadata());
        let admission = self.admit()?;
        let action = action_of(request, &self.executor).await?;
        self.tenant_queue(&action)?;
        let outcome = self.executor.run_admitted(admission, &action, budget, &mut Buffered).await;
        // The body's bytes (and their memory budget) stay held until the reply went out.
        let hold =
            outcome.response.as_ref().filter(|r| !r.body.is_empty()).map(|r| HeldUntilSent(r.body.clone()));
        // A large JSON body is a large tree to convert and size: off the runtime's threads.
        let large = outcome.response.as_ref().is_some_and(|r| r.body.len() >= OFFLOAD_BODY_BYTES);
        let reply = if large {
            tokio::task::spawn_blocking(move || convert::outcome(outcome))
                .await
                .map_err(|e| Status::internal(format!("building the reply failed: {e}")))?
        } else {
            convert::outcome(outcome)
        };
        let mut reply = Response::new(reply);
        if let Some(hold) = hold {
            reply.extensions_mut().insert(hold);
        }
        Ok(reply)
    }

    type ExecuteStreamStream = Pin<Box<dyn Stream<Item = Result<pb::ActionEvent, Status>> + Send>>;

    async fn execute_stream(
        &self,
        request: Request<pb::ExecuteHttpActionRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let budget = grpc_deadline(request.metadata());
        let admission = self.admit()?;
        let action = action_of(request, &self.executor).await?;
        self.tenant_queue(&action)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let executor = self.executor.clone();
        tokio::spawn(async move {
            let mut events = EventSink { tx: tx.clone() };
            let accepted = Event::Accepted(pb::Accepted {
                action_id: action.id().to_owned(),
                accepted_at: Some(convert::timestamp(std::time::SystemTime::now())),
            });
            if events.send(accepted).await.is_err() {
                return;
            }
            // The caller going away drops the action (and its upstream request) at once.
            tokio::select! {
                outcome = executor.run_admitted(admission, &action, budget, &mut events) => {
                    let mut result = convert::outcome(outcome);
                    if let Some(response) = result.response.as_mut() {
                        // The body went out as BodyChunk events.
                        response.body.clear();
                    }
                    let _ = events.send(Event::Completed(pb::Completed { result: Some(result) })).await;
                }
                _ = tx.closed() => {
                    tracing::info!(action_id = %action.id(), "stream caller went away; action cancelled");
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Feeds executor observations into the stream as `ActionEvent`s.
struct EventSink {
    tx: mpsc::Sender<Result<pb::ActionEvent, Status>>,
}

impl EventSink {
    async fn send(&mut self, event: Event) -> Result<(), Gone> {
        self.tx.send(Ok(pb::ActionEvent { event: Some(event) })).await.map_err(|_| Gone)
    }
}

impl Observer for EventSink {
    fn streams_body(&self) -> bool {
        true
    }

    async fn attempt_started(&mut self, attempt: u32) -> Result<(), Gone> {
        let started_at = Some(convert::timestamp(std::time::SystemTime::now()));
        self.send(Event::AttemptStarted(pb::AttemptStarted { attempt, started_at })).await
    }

    async fn response_head(
        &mut self,
        attempt: u32,
        head: &ResponseHead,
        timing: &AttemptTiming,
        remote: Option<SocketAddr>,
    ) -> Result<(), Gone> {
        let mut timing = convert::attempt_timing(timing);
        timing.total = None;
        self.send(Event::ResponseHead(pb::ResponseHead {
            attempt,
            status: u32::from(head.status),
            reason: head.reason.clone(),
            http_version: head.version.to_owned(),
            headers: convert::key_values(&head.headers),
            timing: Some(timing),
            remote_address: remote.map(|r| r.to_string()).unwrap_or_default(),
        }))
        .await
    }

    async fn body_chunk(&mut self, attempt: u32, offset: u64, data: Bytes) -> Result<(), Gone> {
        self.send(Event::BodyChunk(pb::BodyChunk { attempt, offset, data })).await
    }

    async fn attempt_failed(&mut self, record: &AttemptRecord, will_retry: bool) -> Result<(), Gone> {
        self.send(Event::AttemptFailed(pb::AttemptFailed {
            attempt: record.number,
            error: record.error.as_ref().map(convert::action_error),
            status: record.status.map(u32::from).unwrap_or_default(),
            will_retry,
            backoff: record.backoff.map(convert::proto_duration),
        }))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeout() {
        let mut md = MetadataMap::new();
        for (raw, want) in [
            ("10S", Some(Duration::from_secs(10))),
            ("250m", Some(Duration::from_millis(250))),
            ("2H", Some(Duration::from_secs(7200))),
            ("5x", None),
            ("S", None),
        ] {
            md.insert("grpc-timeout", raw.parse().unwrap());
            assert_eq!(grpc_deadline(&md), want, "{raw}");
        }
    }
}
