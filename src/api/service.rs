//! `callout.v1.HttpActionService`: turn the message into an action, run it on the executor,
//! map the result. ExecuteStream runs the action in a task feeding a channel, so a caller that
//! goes away is noticed and the action stops. ExecuteBatch (in `batch`) runs many on one stream.
use super::{
    batch,
    call::{
        action_of, grpc_deadline, overloaded, refused_draining, reply_of, trace_context, Draining,
        HttpActionService, RETRY_QUEUE_FULL,
    },
    convert, status,
};
use crate::{
    action::{AttemptRecord, AttemptTiming, HttpAction, PageRecord, ResponseHead},
    client::concurrency::Admission,
    exec::{Buffered, Executor, Gone, Observer},
    pb::{self, action_event::Event},
};
use bytes::Bytes;
use std::{future::Future, net::SocketAddr, pin::Pin, time::Duration};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

/// Events buffered between the action and a slow reader: bounded, so a slow caller slows the
/// upstream read instead of growing memory.
const STREAM_BUFFER: usize = 16;
impl HttpActionService {
    pub fn new(executor: Executor, draining: Draining, batch_max_in_flight: usize) -> Self {
        Self { executor, draining, batch_max_in_flight }
    }

    /// A place for a new action: refused while draining or when the queue is full.
    fn admit(&self) -> Result<Admission, Status> {
        if self.draining.is_on() {
            return Err(refused_draining());
        }
        self.executor.admit().map_err(overloaded)
    }
}

/// Execute's reply message, and the body bytes whose memory budget it keeps until it went out
/// (`reply_hold`).
pub(super) struct Reply {
    pub message: pb::ExecuteHttpActionResponse,
    pub held: Option<Bytes>,
}

impl HttpActionService {
    /// Execute up to its reply: refused at once when not admitted; else a future that validates
    /// the action (in a boxed future of its own: the request's message is freed before the
    /// wait), runs it and builds the reply.
    pub(super) fn start_execute(
        &self,
        request: Request<pb::ExecuteHttpActionRequest>,
    ) -> Result<impl Future<Output = Result<Reply, Status>> + Send + '_, Status> {
        let budget = grpc_deadline(request.metadata());
        let admission = self.admit()?;
        let trace = trace_context(request.metadata());
        let validation = Box::pin(action_of(request.into_inner(), trace, &self.executor));
        Ok(self.execute_admitted(admission, validation, budget))
    }

    /// Execute once admitted: the action validated (`validation`, boxed by the caller), run,
    /// and its reply.
    async fn execute_admitted(
        &self,
        admission: Admission,
        validation: impl Future<Output = Result<HttpAction, Status>>,
        budget: Option<Duration>,
    ) -> Result<Reply, Status> {
        // The action is dropped before the reply is built, so the reply's state shares its room.
        let outcome = {
            let action = validation.await?;
            self.tenant_queue(&action)?;
            self.executor.run_admitted(admission, &action, budget, &mut Buffered).await
        };
        // The body's bytes (and their memory budget) stay held until the reply went out.
        let held = outcome.response.as_ref().filter(|r| !r.body.is_empty()).map(|r| r.body.clone());
        // Boxed: the reply's state (the outcome again, the message) is another kilobyte, which
        // would otherwise stay reserved in this future through the wait.
        let message = Box::pin(reply_of(outcome)).await?;
        Ok(Reply { message, held })
    }

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

#[tonic::async_trait]
impl pb::http_action_service_server::HttpActionService for HttpActionService {
    // The server answers Execute in `route` (tonic's unary path reserves the request and its
    // decoding state through the action's wait); this is the generated trait's path, for callers
    // of the service in process. It holds no reply body until sent: nothing sends it here.
    fn execute<'life0, 'async_trait>(
        &'life0 self,
        request: Request<pb::ExecuteHttpActionRequest>,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<Response<pb::ExecuteHttpActionResponse>, Status>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        match self.start_execute(request) {
            Ok(execute) => Box::pin(async move { execute.await.map(|reply| Response::new(reply.message)) }),
            Err(refused) => Box::pin(std::future::ready(Err(refused))),
        }
    }

    async fn render(
        &self,
        request: Request<pb::ExecuteHttpActionRequest>,
    ) -> Result<Response<pb::RenderedRequest>, Status> {
        // Nothing runs: no place in the queue is taken (a draining server still answers).
        let budget = grpc_deadline(request.metadata());
        let trace = trace_context(request.metadata());
        let action = action_of(request.into_inner(), trace, &self.executor).await?;
        match self.executor.render(&action, budget).await {
            Ok(rendered) => Ok(Response::new(super::render::rendered(rendered))),
            // A request the attempt could not build (validation let it through): as Execute's
            // attempt would fail, but there is no attempt to report it in.
            Err(e) => Err(Status::failed_precondition(format!("{}: {}", e.kind.as_str(), e.message))),
        }
    }

    type ExecuteStreamStream = Pin<Box<dyn Stream<Item = Result<pb::ActionEvent, Status>> + Send>>;

    async fn execute_stream(
        &self,
        request: Request<pb::ExecuteHttpActionRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let budget = grpc_deadline(request.metadata());
        let admission = self.admit()?;
        let trace = trace_context(request.metadata());
        let action = action_of(request.into_inner(), trace, &self.executor).await?;
        self.tenant_queue(&action)?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let executor = self.executor.clone();
        tokio::spawn(async move {
            let mut events = EventSink { tx: tx.clone(), page: u32::from(action.paginate().is_some()) };
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
                    // And the items as PageCompleted events (the executor kept none).
                    result.items.clear();
                    let _ = events.send(Event::Completed(pb::Completed { result: Some(result) })).await;
                }
                _ = tx.closed() => {
                    tracing::info!(action_id = %action.id(), "stream caller went away; action cancelled");
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ExecuteBatchStream = batch::Replies;

    async fn execute_batch(
        &self,
        request: Request<Streaming<pb::ExecuteHttpActionRequest>>,
    ) -> Result<Response<Self::ExecuteBatchStream>, Status> {
        if self.draining.is_on() {
            return Err(refused_draining());
        }
        Ok(Response::new(batch::start(self, request)))
    }
}

/// Feeds executor observations into the stream as `ActionEvent`s.
struct EventSink {
    tx: mpsc::Sender<Result<pb::ActionEvent, Status>>,
    /// The page the events belong to with pagination (1 from the start), else 0.
    page: u32,
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

    async fn attempt_started(&mut self, attempt: u32, poll: bool) -> Result<(), Gone> {
        let started_at = Some(convert::timestamp(std::time::SystemTime::now()));
        self.send(Event::AttemptStarted(pb::AttemptStarted { attempt, started_at, poll, page: self.page }))
            .await
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
            poll: record.poll,
        }))
        .await
    }

    fn page_started(&mut self, page: u32) {
        self.page = page;
    }

    async fn page_completed(&mut self, page: &PageRecord, items: &[serde_json::Value]) -> Result<(), Gone> {
        let items = items.iter().cloned().map(convert::json_value).collect();
        self.send(Event::PageCompleted(pb::PageCompleted { page: Some(convert::page(page)), items })).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::ExecSettings;

    #[tokio::test]
    async fn an_execute_waiting_for_its_action_reserves_little() {
        fn future_size<F: Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let executor = Executor::new(ExecSettings::default()).unwrap();
        let service = HttpActionService::new(executor, Draining::default(), 1);
        let admission = service.admit().unwrap();
        let request = pb::ExecuteHttpActionRequest {
            method: "GET".into(),
            url: "http://h.test/".into(),
            ..Default::default()
        };
        let validation = Box::pin(action_of(request, None, &service.executor));
        let execute = service.execute_admitted(admission, validation, None);
        // Every Execute in flight holds this future: the request (a kilobyte) and validation's
        // state are not reserved in it, nor the reply's: 1,400 bytes on x86_64 today (the
        // action is 680 of them); 5,056 with all of them inline.
        assert!(future_size(&execute) <= 1536, "{}", future_size(&execute));
    }

    #[test]
    fn a_request_keeps_its_optional_sections_boxed() {
        // tonic's unary future and its generated `ExecuteSvc` future each hold the decoded
        // request by value while the action runs; build.rs boxes its optional sections (most
        // actions set few): 512 bytes on x86_64 today, 1,048 with them inline.
        let size = std::mem::size_of::<pb::ExecuteHttpActionRequest>();
        eprintln!("ExecuteHttpActionRequest: {size} bytes");
        assert!(size <= 512, "{size}");
    }
}
