//! `callout.v1.DurableActionService`: Submit stores the action (the reply waits for the
//! commit), the reads come from the same records, and WatchActions replays the stored changes
//! after a sequence and then follows new commits (the store's table is the truth; the wake-up
//! only says "look again").
use super::{policy, Durable};
use crate::{
    action::InvalidAction,
    api::invalid_argument,
    pb::{self, durable_action_service_server::DurableActionService as Rpc},
    store::{NewAction, Record, State, StoreError, Submitted},
};
use bytes::Bytes;
use prost::Message as _;
use std::{pin::Pin, time::SystemTime};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

/// Changes read from the store per round of a watch.
const WATCH_PAGE: usize = 256;
/// Records buffered between a watch and a slow reader.
const WATCH_BUFFER: usize = 64;
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

pub struct DurableService {
    durable: Durable,
}

impl DurableService {
    pub fn new(durable: Durable) -> Self {
        Self { durable }
    }
}

/// A store failure as the caller should see it.
fn status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(_) => {
            tracing::error!(error = %e, "durable actions: store unavailable");
            Status::unavailable(e.to_string())
        }
        StoreError::Full { .. } => {
            crate::metrics::refused("durable_max_pending");
            Status::resource_exhausted(e.to_string())
        }
        StoreError::WrongState { .. } => Status::failed_precondition(e.to_string()),
        StoreError::Corrupt(_) => Status::internal(e.to_string()),
    }
}

fn required_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        let mut bad = InvalidAction::default();
        bad.push("action_id", "is required");
        return Err(invalid_argument(&bad));
    }
    Ok(())
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("no durable action {id:?} (unknown, or purged after its retention)"))
}

/// The record in the contract's form.
pub fn record(r: Record) -> pb::ActionRecord {
    let decode_error = |b: &Bytes| pb::ActionError::decode(b.as_ref()).ok();
    pb::ActionRecord {
        action_id: r.action_id,
        state: r.state as i32,
        sequence: r.sequence,
        attempts: r.attempts.iter().filter_map(|a| pb::Attempt::decode(a.as_ref()).ok()).collect(),
        next_attempt_at: r.next_attempt_at.map(prost_types::Timestamp::from),
        last_error: r.last_error.as_ref().and_then(decode_error),
        result: r.result.as_ref().and_then(|b| pb::ExecuteHttpActionResponse::decode(b.as_ref()).ok()),
        created_at: Some(r.created_at.into()),
        updated_at: Some(r.updated_at.into()),
    }
}

/// The violations of an action inside SubmitActionRequest, named from the request's root.
fn under_action(mut bad: InvalidAction) -> InvalidAction {
    for v in &mut bad.violations {
        v.field = format!("action.{}", v.field);
    }
    bad
}

#[tonic::async_trait]
impl Rpc for DurableService {
    async fn submit(
        &self,
        request: Request<pb::SubmitActionRequest>,
    ) -> Result<Response<pb::SubmitActionResponse>, Status> {
        let store = self.durable.store().map_err(status)?;
        if self.durable.is_draining() {
            return Err(Status::unavailable("callout is shutting down; submit the action again shortly"));
        }
        let request = request.into_inner();
        let mut bad = InvalidAction::default();
        let Some(mut action) = request.action else {
            bad.push("action", "is required");
            return Err(invalid_argument(&bad));
        };
        if action.action_id.is_empty() {
            action.action_id = uuid::Uuid::new_v4().to_string();
        }
        let now = SystemTime::now();
        let due = match request.not_before.map(SystemTime::try_from) {
            None => now,
            Some(Ok(at)) => at.max(now),
            Some(Err(_)) => {
                bad.push("not_before", "is not a valid timestamp");
                now
            }
        };
        let settings = self.durable.settings();
        let plan =
            match policy::plan(action.clone(), self.durable.executor(), settings.idempotency_header.as_ref())
            {
                Ok(plan) if bad.is_empty() => plan,
                Ok(_) => return Err(invalid_argument(&bad)),
                Err(more) => {
                    bad.violations.extend(under_action(more).violations);
                    return Err(invalid_argument(&bad));
                }
            };
        let action_id = action.action_id.clone();
        let new = NewAction {
            action_id: action_id.clone(),
            request: Bytes::from(action.encode_to_vec()),
            tenant: plan.action.tenant().unwrap_or_default().to_owned(),
            destination: plan.action.destination(),
            due_at: due,
            total: plan.total,
            now,
            max_pending: settings.max_pending,
        };
        let (created, stored) = match store.submit(new).await.map_err(status)? {
            Submitted::Created(stored) => (true, stored),
            Submitted::Existing(stored) => {
                let same =
                    pb::ExecuteHttpActionRequest::decode(stored.request.as_ref()).is_ok_and(|s| s == action);
                if !same {
                    return Err(Status::already_exists(format!(
                        "a different action is stored under action_id {action_id:?}: use a new id for a new action"
                    )));
                }
                (false, stored)
            }
        };
        if created {
            metrics::counter!(super::SUBMITTED).increment(1);
            self.durable.wake();
        }
        Ok(Response::new(pb::SubmitActionResponse {
            action_id,
            created,
            record: Some(record(stored.record)),
        }))
    }

    async fn get_action(
        &self,
        request: Request<pb::GetActionRequest>,
    ) -> Result<Response<pb::ActionRecord>, Status> {
        let store = self.durable.store().map_err(status)?;
        let id = request.into_inner().action_id;
        required_id(&id)?;
        match store.get(&id).await.map_err(status)? {
            Some(stored) => Ok(Response::new(record(stored.record))),
            None => Err(not_found(&id)),
        }
    }

    type WatchActionsStream = Pin<Box<dyn Stream<Item = Result<pb::ActionRecord, Status>> + Send>>;

    async fn watch_actions(
        &self,
        request: Request<pb::WatchActionsRequest>,
    ) -> Result<Response<Self::WatchActionsStream>, Status> {
        let store = self.durable.store().map_err(status)?.clone();
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let mut committed = store.subscribe();
        tokio::spawn(async move {
            let mut after = request.after_sequence;
            loop {
                // Marks the current commit as seen before reading, so a commit during the read
                // wakes the next round.
                committed.borrow_and_update();
                let changes = match store.changes(after, WATCH_PAGE).await {
                    Ok(changes) => changes,
                    Err(e) => {
                        let _ = tx.send(Err(status(e))).await;
                        return;
                    }
                };
                let full = changes.len() == WATCH_PAGE;
                for change in changes {
                    after = change.sequence;
                    let wanted = (!request.final_only || change.state.is_final())
                        && (request.action_ids.is_empty() || request.action_ids.contains(&change.action_id));
                    if wanted && tx.send(Ok(record(change))).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    changed = committed.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_action(
        &self,
        request: Request<pb::CancelActionRequest>,
    ) -> Result<Response<pb::ActionRecord>, Status> {
        let store = self.durable.store().map_err(status)?;
        let id = request.into_inner().action_id;
        required_id(&id)?;
        match store.cancel(&id, SystemTime::now()).await.map_err(status)? {
            Some(cancelled) => {
                self.durable.abort(&id);
                Ok(Response::new(record(cancelled)))
            }
            None => Err(not_found(&id)),
        }
    }

    async fn list_actions(
        &self,
        request: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        let store = self.durable.store().map_err(status)?;
        let request = request.into_inner();
        let mut bad = InvalidAction::default();
        let mut states = Vec::with_capacity(request.states.len());
        for (i, raw) in request.states.iter().enumerate() {
            match State::from_i64(i64::from(*raw)) {
                Some(state) => states.push(state),
                None => bad.push(format!("states[{i}]"), format!("unknown or unspecified state {raw}")),
            }
        }
        let size = match request.page_size {
            0 => DEFAULT_PAGE,
            n if n > MAX_PAGE => {
                bad.push("page_size", format!("must be at most {MAX_PAGE}"));
                MAX_PAGE
            }
            n => n,
        };
        let after = match request.page_token.as_str() {
            "" => 0,
            token => token.parse::<u64>().unwrap_or_else(|_| {
                bad.push("page_token", "is not a token from ListActions");
                0
            }),
        };
        if !bad.is_empty() {
            return Err(invalid_argument(&bad));
        }
        let (records, last) = store.list(states, after, size as usize).await.map_err(status)?;
        let next_page_token = if records.len() == size as usize { last.to_string() } else { String::new() };
        Ok(Response::new(pb::ListActionsResponse {
            actions: records.into_iter().map(record).collect(),
            next_page_token,
        }))
    }

    async fn replay_action(
        &self,
        request: Request<pb::ReplayActionRequest>,
    ) -> Result<Response<pb::ActionRecord>, Status> {
        let store = self.durable.store().map_err(status)?;
        let id = request.into_inner().action_id;
        required_id(&id)?;
        let max_pending = self.durable.settings().max_pending;
        match store.replay(&id, SystemTime::now(), max_pending).await.map_err(status)? {
            Some(replayed) => {
                self.durable.wake();
                Ok(Response::new(record(replayed)))
            }
            None => Err(not_found(&id)),
        }
    }
}
