//! Concurrency caps: at most `max_in_flight` actions run at once, at most `max_queued` more wait
//! for a slot (past that a new action is refused at once: backpressure, never unbounded
//! memory), and at most `max_in_flight_per_host` attempts go to one destination at once (the
//! `DestinationSlot` layer). Waiting actions get running slots by fair share across tenants
//! (`fair`).
use super::{
    attempt::{AttemptRequest, Before, Reply, Step, StepLayer},
    fair::{FairSlots, NoSlot, RunSlot, Share},
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The server is at its queue bound.
#[derive(Debug, Clone, thiserror::Error)]
#[error("callout is at capacity: {in_flight} actions in flight and {queued} queued; try again later")]
pub struct Overloaded {
    pub in_flight: usize,
    pub queued: usize,
}

/// A place in the server: held for the whole action, from admission to its outcome.
#[derive(Debug)]
pub struct Admission {
    _place: OwnedSemaphorePermit,
}

/// A running slot (global) or a destination slot (per attempt): released on drop.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// No slot came free before the deadline.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SlotError(pub String);

/// Per-destination semaphores are dropped once idle, when this many are tracked.
const PRUNE_ABOVE: usize = 1024;

/// The server's concurrency caps, shared by every action.
pub struct Concurrency {
    /// `limits.max_in_flight`, `limits.max_queued`, `limits.max_in_flight_per_host`.
    max_in_flight: usize,
    max_queued: usize,
    max_in_flight_per_host: usize,
    /// max_in_flight + max_queued places: an action that gets none is refused.
    places: Arc<Semaphore>,
    running: FairSlots,
    per_host: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Concurrency {
    pub fn new(max_in_flight: usize, max_queued: usize, max_in_flight_per_host: usize) -> Self {
        let max_in_flight = max_in_flight.max(1);
        let places = max_in_flight.saturating_add(max_queued).min(Semaphore::MAX_PERMITS);
        Self {
            max_in_flight,
            max_queued,
            max_in_flight_per_host: max_in_flight_per_host.max(1),
            places: Arc::new(Semaphore::new(places)),
            running: FairSlots::new(max_in_flight),
            per_host: Mutex::default(),
        }
    }

    /// A place for a new action, or `Overloaded` at once when running and queued are full.
    pub fn admit(&self) -> Result<Admission, Overloaded> {
        match self.places.clone().try_acquire_owned() {
            Ok(place) => Ok(Admission { _place: place }),
            Err(_) => Err(Overloaded { in_flight: self.in_flight(), queued: self.queued() }),
        }
    }

    /// Waits in the queue for a running slot for `tenant` (`""`: none) with its `share`, until
    /// `deadline`.
    pub async fn run_slot(&self, tenant: &str, share: Share, deadline: Instant) -> Result<RunSlot, NoSlot> {
        self.running.acquire(tenant, share, deadline).await
    }

    /// Actions of `tenant` waiting for a running slot now.
    pub fn waiting(&self, tenant: &str) -> usize {
        self.running.waiting(tenant)
    }

    /// Why no running slot came when the tenant's own cap was not what held it back.
    pub fn no_run_slot(&self) -> SlotError {
        SlotError(format!(
            "no running slot came free before the deadline ({} actions in flight)",
            self.max_in_flight
        ))
    }

    /// Waits for a slot to destination `key` until `deadline`.
    pub async fn host_slot(&self, key: &str, deadline: Instant) -> Result<Slot, SlotError> {
        let semaphore = self.host_semaphore(key)?;
        acquire(semaphore, deadline).await.ok_or_else(|| {
            SlotError(format!(
                "{key} already has {} attempts in flight and none ended before the deadline",
                self.max_in_flight_per_host
            ))
        })
    }

    /// A slot to destination `key` if one is free now.
    pub fn try_host_slot(&self, key: &str) -> Result<Option<Slot>, SlotError> {
        Ok(self.host_semaphore(key)?.try_acquire_owned().ok().map(|permit| Slot { _permit: permit }))
    }

    fn host_semaphore(&self, key: &str) -> Result<Arc<Semaphore>, SlotError> {
        let Ok(mut hosts) = self.per_host.lock() else {
            return Err(SlotError("per-host slots are unavailable".into()));
        };
        if hosts.len() > PRUNE_ABOVE {
            // Only this map holds an idle destination's semaphore.
            hosts.retain(|_, s| Arc::strong_count(s) > 1);
        }
        // Look up before inserting: the common case allocates no key.
        Ok(match hosts.get(key) {
            Some(semaphore) => semaphore.clone(),
            None => {
                let semaphore = Arc::new(Semaphore::new(self.max_in_flight_per_host));
                hosts.insert(key.to_owned(), semaphore.clone());
                semaphore
            }
        })
    }

    /// Actions running now.
    pub fn in_flight(&self) -> usize {
        self.running.in_use()
    }

    /// Actions admitted and waiting for a running slot.
    pub fn queued(&self) -> usize {
        self.admitted().saturating_sub(self.in_flight())
    }

    /// Actions admitted and not finished: running or queued.
    pub fn admitted(&self) -> usize {
        let total = self.max_in_flight.saturating_add(self.max_queued);
        total.min(Semaphore::MAX_PERMITS).saturating_sub(self.places.available_permits())
    }
}

async fn acquire(semaphore: Arc<Semaphore>, deadline: Instant) -> Option<Slot> {
    match tokio::time::timeout_at(deadline.into(), semaphore.acquire_owned()).await {
        Ok(Ok(permit)) => Some(Slot { _permit: permit }),
        _ => None,
    }
}

/// A destination slot held by a response: released when the response (its head, which the
/// caller keeps while it reads the body) is dropped.
#[derive(Debug, Clone)]
pub struct HeldSlot(pub Arc<Slot>);

/// Waits for a slot to the attempt's destination (bounded by the action's deadline) and keeps it
/// in the response's extensions, so it is held until the attempt is over, body read included.
#[derive(Clone)]
pub struct DestinationSlot(pub Arc<Concurrency>);

impl Step for DestinationSlot {
    /// The slot, handed to the response.
    type Held = Slot;

    fn before(&self, request: &mut AttemptRequest) -> Before<Slot> {
        let key = &request.context.destination.key;
        match self.0.try_host_slot(key) {
            Ok(Some(slot)) => Before::Go(slot),
            Ok(None) => {
                let (concurrency, context) = (self.0.clone(), request.context.clone());
                Before::Wait(Box::pin(async move {
                    Ok(concurrency.host_slot(&context.destination.key, context.deadline).await?)
                }))
            }
            Err(unavailable) => Before::Refuse(unavailable.into()),
        }
    }

    fn after<B>(slot: Slot, reply: Reply<B>) -> Reply<B> {
        let mut response = reply?;
        response.extensions_mut().insert(HeldSlot(Arc::new(slot)));
        Ok(response)
    }
}

/// The destination slot as a layer of the attempt stack.
pub type DestinationSlotLayer = StepLayer<DestinationSlot>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::Harness;
    use std::time::Duration;

    #[tokio::test]
    async fn refuses_past_the_queue_bound_and_frees_on_drop() {
        let c = Concurrency::new(1, 1, 1);
        let first = c.admit().unwrap();
        let second = c.admit().unwrap();
        let refused = c.admit().unwrap_err();
        assert_eq!(
            refused.to_string(),
            "callout is at capacity: 0 actions in flight and 2 queued; try again later"
        );
        let soon = Instant::now() + Duration::from_millis(50);
        let running = c.run_slot("", Share::FREE, soon).await.unwrap();
        assert_eq!((c.in_flight(), c.queued()), (1, 1));
        assert!(c.run_slot("", Share::FREE, soon).await.is_err(), "the second waits and times out");
        drop((running, first));
        assert!(c.admit().is_ok());
        drop(second);
    }

    #[tokio::test]
    async fn per_host_slots_are_per_destination() {
        let c = Concurrency::new(512, 2048, 1);
        let soon = Instant::now() + Duration::from_millis(30);
        let a = c.host_slot("a:80", soon).await.unwrap();
        let _b = c.host_slot("b:80", soon).await.unwrap();
        let err = c.host_slot("a:80", soon).await.unwrap_err();
        assert!(err.0.contains("a:80 already has 1 attempts in flight"), "{err}");
        drop(a);
        assert!(c.host_slot("a:80", Instant::now() + Duration::from_millis(30)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_holds_the_slot_until_the_response_is_dropped() {
        let c = Arc::new(Concurrency::new(512, 2048, 1));
        let mut layer = Harness::new(StepLayer(DestinationSlot(c)));
        let response = layer.exchange("http://a/", Duration::from_secs(5), 200).await.unwrap();
        // The response holds a's only slot: the next attempt to a waits until its deadline.
        let err = layer.refused("http://a/", Duration::from_secs(1)).await;
        assert!(err.is::<SlotError>(), "{err}");
        drop(response);
        assert!(layer.exchange("http://a/", Duration::from_secs(1), 200).await.is_ok());
    }
}
