//! ExecuteBatch: many actions on one stream, each admitted, validated, run and answered exactly
//! as Execute does it, each reply sent as soon as its action finishes. The stream reads its next
//! action only when it has a free running place (`server.batch_max_in_flight`) and room for a
//! reply, so a caller that stops reading stops callout reading, and memory stays bounded.
//!
//! Decisions: a malformed action, or one whose action_id is already running in this stream, is
//! answered INVALID_REQUEST and nothing is sent; a full queue answers RATE_LIMITED (what
//! `Executor::run` answers), not a status that would end the other actions' stream. When the
//! server drains the stream stops reading, sends its running actions' replies, and ends
//! UNAVAILABLE: every action without a reply was not run. A message that does not decode ends
//! the stream the same way, with INVALID_ARGUMENT. The caller going away cancels the running
//! actions (their upstream requests are dropped).
//!
//! Memory: a reply's body keeps its share of the buffered-body budget while the reply waits in
//! the channel; once tonic has encoded it the budget is free, and the encoded copy waits in the
//! HTTP/2 send buffer, which hyper fills only as the caller's window opens (about one encode
//! buffer, 32 KiB or one reply, past the window).
use super::call::{
    action_of, grpc_deadline, log_overloaded, refused_draining, reply_of, trace_context, HttpActionService,
};
use crate::{
    action::{is_valid_action_id, InvalidAction, TraceContext},
    api::status::invalid_argument,
    exec::Buffered,
    pb,
};
use std::{
    collections::HashSet,
    pin::Pin,
    sync::{Arc, Mutex},
};
use tokio::{
    sync::{mpsc, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Code, Request, Status, Streaming};

pub type Replies = Pin<Box<dyn Stream<Item = Result<pb::ExecuteHttpActionResponse, Status>> + Send>>;

/// Replies buffered between the actions and a slow reader. With the running places this bounds
/// what one stream holds: a caller that stops reading leaves at most this many replies waiting
/// and `batch_max_in_flight` actions (finished ones waiting to send).
const REPLY_BUFFER: usize = 16;

type Reply = Result<pb::ExecuteHttpActionResponse, Status>;

/// Starts reading the stream's actions; the replies come out of the returned stream.
pub fn start(
    service: &HttpActionService,
    request: Request<Streaming<pb::ExecuteHttpActionRequest>>,
) -> Replies {
    let batch = Arc::new(Batch {
        service: service.clone(),
        // The stream's deadline bounds every action in it.
        deadline: grpc_deadline(request.metadata()).map(|d| Instant::now() + d),
        trace: trace_context(request.metadata()),
        running: Mutex::default(),
    });
    let (tx, rx) = mpsc::channel(REPLY_BUFFER);
    tokio::spawn(batch.read(request.into_inner(), tx));
    Box::pin(ReceiverStream::new(rx))
}

/// One stream's shared state.
struct Batch {
    service: HttpActionService,
    deadline: Option<Instant>,
    trace: Option<TraceContext>,
    /// The caller's (valid) action_ids of the actions running now: at most batch_max_in_flight.
    running: Mutex<HashSet<String>>,
}

/// Why the stream stopped reading.
enum End {
    /// The caller closed its side: the stream ends OK after the last reply.
    Closed,
    /// The last reply is followed by this status.
    Status(Status),
}

impl Batch {
    /// Reads actions while there is room, each run in its own task; at the end waits for the
    /// running ones to send their replies, then ends the stream (with a status, unless the
    /// caller closed its side).
    async fn read(
        self: Arc<Self>,
        mut incoming: Streaming<pb::ExecuteHttpActionRequest>,
        tx: mpsc::Sender<Reply>,
    ) {
        let _open = crate::metrics::batch_stream_opened();
        let bound = self.service.batch_max_in_flight;
        let places = Arc::new(Semaphore::new(bound));
        let end = loop {
            let next = async {
                let place = places.clone().acquire_owned().await;
                // Room for a reply now: the caller is reading (or has not fallen far behind).
                let room = tx.reserve().await.map(drop);
                (place, room, incoming.message().await)
            };
            let (place, room, message) = tokio::select! {
                biased;
                _ = self.service.draining.begun() => break End::Status(refused_draining()),
                read = next => read,
            };
            let (Ok(place), Ok(())) = (place, room) else {
                // The caller went away; the running actions see it too and stop.
                return;
            };
            match message {
                Ok(Some(request)) => self.clone().spawn(request, place, &tx).await,
                Ok(None) => break End::Closed,
                Err(status) => break End::Status(stream_failed(status)),
            }
        };
        // Every place back: every running action has sent its reply.
        let all = u32::try_from(bound).unwrap_or(u32::MAX);
        tokio::select! {
            _ = places.acquire_many(all) => {}
            _ = tx.closed() => return,
        }
        if let End::Status(status) = end {
            let _ = tx.send(Err(status)).await;
        }
    }

    /// Runs `request` in its own task holding `place`; a duplicate of a running action_id is
    /// answered at once instead.
    async fn spawn(
        self: Arc<Self>,
        request: pb::ExecuteHttpActionRequest,
        place: OwnedSemaphorePermit,
        tx: &mpsc::Sender<Reply>,
    ) {
        crate::metrics::batch_action();
        // Only an id validation keeps is tracked (at most 128 bytes): any other is refused by
        // validation and answered under a generated id.
        let id = is_valid_action_id(&request.action_id).then(|| request.action_id.clone());
        if let Some(id) = &id {
            if !self.lock_running().insert(id.clone()) {
                let mut bad = InvalidAction::default();
                bad.push("action_id", "is the action_id of an action still running in this batch");
                let _ = tx
                    .send(Ok(failed(reply_id(id), pb::ErrorKind::InvalidRequest, invalid_argument(&bad))))
                    .await;
                return;
            }
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let running = Running { batch: self, id, _place: place };
            tokio::select! {
                reply = running.batch.answer(request) => {
                    let _ = tx.send(reply).await;
                }
                _ = tx.closed() => {
                    tracing::info!(action_id = running.id.as_deref().unwrap_or(""), "batch caller went away; action cancelled");
                }
            }
        });
    }

    /// What Execute answers for `request`, with every call-level refusal (a full queue, an
    /// invalid action) as a FAILED reply so the stream goes on.
    async fn answer(&self, request: pb::ExecuteHttpActionRequest) -> Reply {
        let service = &self.service;
        let admission = match service.executor.admit() {
            Ok(admission) => admission,
            Err(overloaded) => {
                log_overloaded(&overloaded);
                let message = overloaded.to_string();
                return Ok(failed_with(reply_id(&request.action_id), pb::ErrorKind::RateLimited, message));
            }
        };
        let requested_id = reply_id(&request.action_id);
        let action = match action_of(request, self.trace.clone(), &service.executor).await {
            Ok(action) => action,
            Err(status) => {
                return Ok(failed_with(
                    requested_id,
                    pb::ErrorKind::InvalidRequest,
                    status.message().to_owned(),
                ))
            }
        };
        let budget = self.deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let outcome = service.executor.run_admitted(admission, &action, budget, &mut Buffered).await;
        reply_of(outcome).await
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running action's place in its stream: dropped when its reply is sent (or the caller went
/// away), which frees its action_id and then its place.
struct Running {
    batch: Arc<Batch>,
    id: Option<String>,
    _place: OwnedSemaphorePermit,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(id) = &self.id {
            self.batch.lock_running().remove(id);
        }
    }
}

/// The id a refusal is answered under: the caller's when validation would keep it, else a new
/// one (an id too long or with control characters cannot be echoed; the message names it).
fn reply_id(requested: &str) -> String {
    if is_valid_action_id(requested) {
        requested.to_owned()
    } else {
        uuid::Uuid::new_v4().to_string()
    }
}

/// A FAILED reply carrying a refusal's status text (for INVALID_REQUEST the violations, bounded
/// under 8 KiB as in Execute's INVALID_ARGUMENT).
fn failed(action_id: String, kind: pb::ErrorKind, status: Status) -> pb::ExecuteHttpActionResponse {
    failed_with(action_id, kind, status.message().to_owned())
}

fn failed_with(action_id: String, kind: pb::ErrorKind, message: String) -> pb::ExecuteHttpActionResponse {
    pb::ExecuteHttpActionResponse {
        action_id,
        outcome: pb::Outcome::Failed.into(),
        error: Some(pb::ActionError { kind: kind.into(), message }),
        ..Default::default()
    }
}

/// The status a stream ends with when its next message cannot be read. tonic reports a message
/// over the decode limit as OUT_OF_RANGE; it is the caller's INVALID_ARGUMENT, as for Execute.
fn stream_failed(status: Status) -> Status {
    if status.code() == Code::OutOfRange {
        return Status::invalid_argument(format!(
            "an action message is too large (server.max_request_bytes): {}",
            status.message()
        ));
    }
    status
}
