//! What every call of `callout.v1.HttpActionService` does at the edge, Execute's, the stream's
//! and each action of a batch alike: the service's state, validation into an action, the
//! call's deadline and trace context, refusals (full queue, drain) and the reply.
/// RetryInfo of a refusal: a full queue usually has room again within a second (actions take
/// milliseconds to seconds); a draining server is gone for good, but its replacement (or another
/// replica behind the same address) takes calls about as soon.
pub(super) const RETRY_QUEUE_FULL: Duration = Duration::from_secs(1);
const RETRY_DRAINING: Duration = Duration::from_secs(1);

use super::{
    convert,
    status::{self, invalid_argument},
};
use crate::{
    action::{HttpAction, InvalidAction, Outcome, TraceContext},
    client::concurrency::Overloaded,
    exec::{Executor, OFFLOAD_BODY_BYTES},
    pb,
};
use std::{sync::Arc, time::Duration};
use tokio::sync::watch;
use tonic::{metadata::MetadataMap, Status};

/// Paginated items from this many on are converted off the runtime's threads, as a large body.
pub(super) const OFFLOAD_ITEMS: usize = 1_000;

#[derive(Clone)]
pub struct HttpActionService {
    pub(super) executor: Executor,
    /// Set when the server drains: new actions are refused with UNAVAILABLE.
    pub(super) draining: Draining,
    /// Actions one ExecuteBatch stream runs at once (`server.batch_max_in_flight`).
    pub(super) batch_max_in_flight: usize,
}

/// Whether the server drains, and a way to wait for it (a batch stream stops reading then).
#[derive(Clone)]
pub struct Draining(Arc<watch::Sender<bool>>);

impl Default for Draining {
    fn default() -> Self {
        Self(Arc::new(watch::channel(false).0))
    }
}

impl Draining {
    /// The drain begins: new actions are refused from now on.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    pub fn is_on(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the drain has begun.
    pub async fn begun(&self) {
        let _ = self.0.subscribe().wait_for(|on| *on).await;
    }
}

/// UNAVAILABLE: the server drains and takes no more actions.
pub(super) fn refused_draining() -> Status {
    crate::metrics::refused("draining");
    status::unavailable(
        "DRAINING",
        "callout is shutting down; send the action to another instance",
        RETRY_DRAINING,
    )
}

/// Validates the request; proto-level and domain problems are reported together. Called once
/// the action is admitted, so a draining or full server refuses before doing this work. An
/// action whose validation may block (secret files read, TLS PEM parsed) is validated on the
/// blocking pool; any other is validated in place, cheaper than the hop. `trace` is the
/// caller's trace context, from the call's metadata.
pub(super) async fn action_of(
    request: pb::ExecuteHttpActionRequest,
    trace: Option<TraceContext>,
    executor: &Executor,
) -> Result<HttpAction, Status> {
    let mut bad = InvalidAction::default();
    let mut input = convert::action_input(request, &mut bad);
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
pub(super) fn overloaded(e: Overloaded) -> Status {
    log_overloaded(&e);
    let limits = [("in_flight", e.in_flight), ("queued", e.queued)];
    let metadata = limits.into_iter().map(|(k, v)| (k.to_owned(), v.to_string())).collect();
    status::resource_exhausted("QUEUE_FULL", e.to_string(), RETRY_QUEUE_FULL, metadata)
}

/// A full queue refused an action: logged and counted.
pub(super) fn log_overloaded(e: &Overloaded) {
    tracing::warn!(in_flight = e.in_flight, queued = e.queued, "action refused: queue full");
    crate::metrics::refused("queue_full");
}

/// The reply of a finished action. A large JSON body is a large tree to convert and size: off
/// the runtime's threads.
pub(super) async fn reply_of(outcome: Outcome) -> Result<pb::ExecuteHttpActionResponse, Status> {
    // A large JSON body (or many items) is a large tree to convert and size: off the runtime's
    // threads.
    let large = outcome.response.as_ref().is_some_and(|r| r.body.len() >= OFFLOAD_BODY_BYTES)
        || outcome.items.len() >= OFFLOAD_ITEMS;
    if large {
        tokio::task::spawn_blocking(move || convert::outcome(outcome))
            .await
            .map_err(|e| Status::internal(format!("building the reply failed: {e}")))
    } else {
        Ok(convert::outcome(outcome))
    }
}

/// The caller's W3C trace context (`traceparent`, `tracestate` metadata), when well-formed.
pub(super) fn trace_context(metadata: &MetadataMap) -> Option<TraceContext> {
    let parent = metadata.get("traceparent")?.to_str().ok()?;
    TraceContext::parse(parent, metadata.get("tracestate").and_then(|s| s.to_str().ok()))
}

/// The caller's deadline, from the `grpc-timeout` header ("<digits><H|M|S|m|u|n>").
pub(super) fn grpc_deadline(metadata: &MetadataMap) -> Option<Duration> {
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
