//! Fair running slots: at most `total` actions run at once, and when actions wait for a slot the
//! waiting tenants are served by fair share, not first come first served: the next free slot
//! goes to the waiting tenant with the fewest running for its weight (ties in turn, round
//! robin), so one tenant's flood of waiting actions delays another tenant's by about one slot's
//! turn, not by the whole flood. A tenant at its own cap waits, however many slots are free,
//! while other tenants run. Within a tenant, first come first served.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};
use tokio::sync::oneshot;

/// A tenant's claim on the running slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Most of the tenant's actions running at once.
    pub cap: usize,
    /// Its share when tenants wait: a tenant of weight 2 runs twice as many as one of weight 1.
    /// At least 1.
    pub weight: u32,
    /// Most of the tenant's actions waiting at once: one more is refused at once.
    pub max_queued: usize,
}

impl Share {
    /// No cap of its own, weight 1 (an action without a tenant, a tenant without quotas).
    pub const FREE: Share = Share { cap: usize::MAX, weight: 1, max_queued: usize::MAX };
}

/// No slot came free before the deadline, or the tenant's queue was full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoSlot {
    /// The tenant's own cap held it back (it had `cap` running when the wait ended), rather
    /// than the total.
    pub at_cap: bool,
    /// Refused at once: `max_queued` of the tenant's actions were waiting already.
    pub queue_full: bool,
}

/// The slots, shared by every action.
pub struct FairSlots {
    shared: Arc<Shared>,
}

struct Shared {
    total: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    free: usize,
    /// Tenants with actions running or waiting (`""`: actions without a tenant); an entry goes
    /// when it has neither, so this is bounded by the admitted actions.
    tenants: HashMap<String, Tenant>,
    /// Tenants with waiters, in turn order: the one served last goes to the back.
    ring: VecDeque<String>,
    next_id: u64,
}

struct Tenant {
    running: usize,
    share: Share,
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl FairSlots {
    pub fn new(total: usize) -> Self {
        let total = total.max(1);
        let state = State { free: total, ..State::default() };
        Self { shared: Arc::new(Shared { total, state: Mutex::new(state) }) }
    }

    /// Waits for a slot for `tenant` (`""` for none) until `deadline`.
    pub async fn acquire(&self, tenant: &str, share: Share, deadline: Instant) -> Result<RunSlot, NoSlot> {
        let (id, rx) = {
            let mut state = self.shared.lock();
            let State { free, tenants, ring, next_id } = &mut *state;
            let entry = match tenants.get_mut(tenant) {
                Some(entry) => entry,
                None => tenants.entry(tenant.to_owned()).or_insert(Tenant {
                    running: 0,
                    share,
                    waiters: VecDeque::new(),
                }),
            };
            entry.share = share;
            // Every free slot goes to an eligible waiter at once (`dispatch`), so a free slot
            // here means no one who may run is waiting: take it.
            if *free > 0 && entry.running < share.cap {
                entry.running += 1;
                *free -= 1;
                return Ok(RunSlot { shared: self.shared.clone(), tenant: tenant.to_owned() });
            }
            if entry.waiters.len() >= share.max_queued {
                if entry.running == 0 && entry.waiters.is_empty() {
                    tenants.remove(tenant);
                }
                return Err(NoSlot { at_cap: false, queue_full: true });
            }
            let id = *next_id;
            *next_id += 1;
            let (tx, rx) = oneshot::channel();
            entry.waiters.push_back((id, tx));
            if entry.waiters.len() == 1 {
                ring.push_back(tenant.to_owned());
            }
            (id, rx)
        };
        let mut waiting =
            Waiting { shared: self.shared.clone(), tenant: tenant.to_owned(), id, rx, done: false };
        match tokio::time::timeout_at(deadline.into(), &mut waiting.rx).await {
            Ok(Ok(())) => {
                waiting.done = true;
                Ok(RunSlot { shared: self.shared.clone(), tenant: tenant.to_owned() })
            }
            _ => Err(NoSlot { at_cap: waiting.give_up(), queue_full: false }),
        }
    }

    /// Actions of `tenant` waiting for a slot now.
    pub fn waiting(&self, tenant: &str) -> usize {
        self.shared.lock().tenants.get(tenant).map_or(0, |t| t.waiters.len())
    }

    /// Slots taken now.
    pub fn in_use(&self) -> usize {
        self.shared.total - self.shared.lock().free
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned lock's state is still consistent.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// A slot of `tenant` ends: it goes to the next waiter by fair share.
    fn release(&mut self, tenant: &str) {
        self.free += 1;
        if let Some(entry) = self.tenants.get_mut(tenant) {
            entry.running = entry.running.saturating_sub(1);
            if entry.running == 0 && entry.waiters.is_empty() {
                self.tenants.remove(tenant);
            }
        }
        self.dispatch();
    }

    /// Gives free slots to waiters: each to the waiting tenant below its cap with the fewest
    /// running for its weight, the earliest in turn among equals.
    fn dispatch(&mut self) {
        while self.free > 0 {
            let mut best: Option<(usize, usize, u32)> = None;
            for (i, name) in self.ring.iter().enumerate() {
                let Some(t) = self.tenants.get(name) else { continue };
                if t.waiters.is_empty() || t.running >= t.share.cap {
                    continue;
                }
                // running / weight smaller than the best's, without division.
                let fewer = best.is_none_or(|(_, running, weight)| {
                    (t.running as u128) * u128::from(weight) < (running as u128) * u128::from(t.share.weight)
                });
                if fewer {
                    best = Some((i, t.running, t.share.weight));
                }
            }
            let Some(name) = best.and_then(|(i, ..)| self.ring.remove(i)) else { return };
            let Some(entry) = self.tenants.get_mut(&name) else { continue };
            if let Some((_, tx)) = entry.waiters.pop_front() {
                entry.running += 1;
                self.free -= 1;
                // A waiter that gave up takes itself out under this lock, so its receiver is
                // there; should it not be, the slot is simply not taken.
                if tx.send(()).is_err() {
                    entry.running -= 1;
                    self.free += 1;
                }
            }
            if entry.waiters.is_empty() {
                if entry.running == 0 {
                    self.tenants.remove(&name);
                }
            } else {
                // Served: its turn goes to the back.
                self.ring.push_back(name);
            }
        }
    }
}

/// A wait in a tenant's queue; taken out of it when the wait ends without a slot (the deadline,
/// or the waiting future dropped).
struct Waiting {
    shared: Arc<Shared>,
    tenant: String,
    id: u64,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl Waiting {
    /// Leaves the queue (a slot granted meanwhile is given back); returns whether the tenant
    /// was at its cap.
    fn give_up(&mut self) -> bool {
        if self.done {
            return false;
        }
        self.done = true;
        let mut state = self.shared.lock();
        // Grants are sent under this lock: this sees one sent before, or none will come.
        if self.rx.try_recv().is_ok() {
            state.release(&self.tenant);
            return false;
        }
        let State { tenants, ring, .. } = &mut *state;
        let Some(entry) = tenants.get_mut(&self.tenant) else { return false };
        entry.waiters.retain(|(id, _)| *id != self.id);
        let at_cap = entry.running >= entry.share.cap;
        if entry.waiters.is_empty() {
            ring.retain(|name| *name != self.tenant);
            if entry.running == 0 {
                tenants.remove(&self.tenant);
            }
        }
        at_cap
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.give_up();
    }
}

/// A running slot, released on drop.
pub struct RunSlot {
    shared: Arc<Shared>,
    tenant: String,
}

impl std::fmt::Debug for RunSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunSlot").field("tenant", &self.tenant).finish()
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.shared.lock().release(&self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn later(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    /// Starts `n` waits for `tenant`, each sending its tag to `order` when it gets a slot and
    /// holding it until the returned sender of its own is dropped.
    fn waiters(
        slots: &Arc<FairSlots>,
        tenant: &'static str,
        share: Share,
        n: usize,
        order: &tokio::sync::mpsc::UnboundedSender<(&'static str, oneshot::Sender<()>)>,
    ) {
        for _ in 0..n {
            let (slots, order) = (slots.clone(), order.clone());
            tokio::spawn(async move {
                let slot = slots.acquire(tenant, share, later(3600)).await.unwrap();
                let (done_tx, done_rx) = oneshot::channel();
                let _ = order.send((tenant, done_tx));
                let _ = done_rx.await;
                drop(slot);
            });
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_one_tenant_does_not_delay_another_behind_it() {
        let slots = Arc::new(FairSlots::new(2));
        let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        waiters(&slots, "a", Share::FREE, 50, &tx);
        tokio::time::sleep(Duration::from_millis(1)).await;
        waiters(&slots, "b", Share::FREE, 1, &tx);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let (tenant, done) = order.recv().await.unwrap();
            seen.push(tenant);
            drop(done);
        }
        // Two of a's ran first (b was not waiting yet); the first slot to free went to b.
        assert_eq!(seen[..3], ["a", "a", "b"], "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_the_slots_and_a_capped_tenant_waits_while_others_run() {
        let slots = Arc::new(FairSlots::new(4));
        let (tx, mut order) = tokio::sync::mpsc::unbounded_channel();
        let heavy = Share { weight: 3, ..Share::FREE };
        waiters(&slots, "heavy", heavy, 40, &tx);
        waiters(&slots, "light", Share::FREE, 40, &tx);
        waiters(&slots, "capped", Share { cap: 1, weight: 10, ..Share::FREE }, 40, &tx);
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Hold every slot granted; count who runs.
        let mut held = Vec::new();
        while let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(10), order.recv()).await {
            held.push(got);
        }
        assert_eq!(held.len(), 4);
        assert_eq!(slots.in_use(), 4);
        // Now run 60 more, one slot freed at a time (the oldest first).
        let mut ran: HashMap<&str, usize> = HashMap::new();
        for _ in 0..60 {
            let (tenant, done) = held.remove(0);
            *ran.entry(tenant).or_default() += 1;
            drop(done);
            let next = order.recv().await.unwrap();
            held.push(next);
            assert!(held.iter().filter(|(t, _)| *t == "capped").count() <= 1, "capped runs one at a time");
        }
        // capped runs one at a time; heavy gets about three times light's share of the rest.
        let (heavy, light) = (ran["heavy"], ran["light"]);
        assert!(heavy >= 2 * light && light >= 5, "{ran:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ends_leaves_no_trace_and_says_whether_the_cap_held_it() {
        let slots = FairSlots::new(1);
        let capped = Share { cap: 1, ..Share::FREE };
        let first = slots.acquire("t", capped, later(1)).await.unwrap();
        let err = slots.acquire("t", capped, later(1)).await.unwrap_err();
        assert!(err.at_cap);
        let err = slots.acquire("u", Share::FREE, later(1)).await.unwrap_err();
        assert!(!err.at_cap, "the total held u back");
        // A dropped wait leaves the queue: the freed slot is not lost to it.
        let dropped = slots.acquire("u", Share::FREE, later(60));
        tokio::select! {
            _ = dropped => unreachable!("no slot is free"),
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
        }
        drop(first);
        assert_eq!(slots.in_use(), 0);
        let again = slots.acquire("u", Share::FREE, later(1)).await.unwrap();
        assert_eq!(slots.in_use(), 1);
        drop(again);
        assert!(slots.shared.lock().tenants.is_empty() && slots.shared.lock().ring.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_tenant_past_its_queue_bound_is_refused_at_once_and_others_still_queue() {
        let slots = Arc::new(FairSlots::new(1));
        let bounded = Share { max_queued: 2, ..Share::FREE };
        let running = slots.acquire("t", bounded, later(60)).await.unwrap();
        let mut queued = Vec::new();
        for _ in 0..2 {
            let slots = slots.clone();
            queued.push(tokio::spawn(async move { slots.acquire("t", bounded, later(60)).await.map(drop) }));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(slots.waiting("t"), 2);
        let refused = slots.acquire("t", bounded, later(60)).await.unwrap_err();
        assert_eq!(refused, NoSlot { at_cap: false, queue_full: true });
        // Another tenant still queues, and a bound of 0 refuses any wait without a trace.
        let other = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("u", bounded, later(60)).await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(slots.waiting("u"), 1);
        let none = Share { max_queued: 0, ..Share::FREE };
        assert!(slots.acquire("v", none, later(60)).await.unwrap_err().queue_full);
        assert!(!slots.shared.lock().tenants.contains_key("v"));
        drop(running);
        for wait in queued.into_iter().chain([other]) {
            wait.await.unwrap().unwrap();
        }
    }
}
