//! Durable actions' store: the `ActionStore` trait the durable runner is written against, its
//! records and errors, and the embedded SQLite implementation (`sqlite`). A fleet store
//! (PostgreSQL) fits the same trait: work is taken with `claim` under a lease (`FOR UPDATE SKIP
//! LOCKED` there), kept with `renew`, and ended with `finish_attempt`.
//!
//! The store knows states, times and sequence numbers; the request, the attempts and the result
//! are opaque bytes to it (the durable layer keeps them as the contract's own encoding).
pub mod postgres;
pub mod sqlite;

use bytes::Bytes;
use std::{
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime, UNIX_EPOCH},
};
use tokio::sync::watch;

/// A store call's future.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Where an action is in its life. The numbers are the contract's `ActionState` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Pending = 1,
    Running = 2,
    Succeeded = 3,
    Failed = 4,
    Cancelled = 5,
}

impl State {
    pub fn from_i64(n: i64) -> Option<Self> {
        Some(match n {
            1 => Self::Pending,
            2 => Self::Running,
            3 => Self::Succeeded,
            4 => Self::Failed,
            5 => Self::Cancelled,
            _ => return None,
        })
    }

    /// Succeeded, failed or cancelled: nothing more happens unless it is replayed.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// Whether `cancel` changes an action in this state: PENDING and RUNNING are cancelled, a
    /// cancelled one is returned as it is (`false`), any other final state is `WrongState`.
    pub fn check_cancel(self, action_id: &str) -> Result<bool, StoreError> {
        match self {
            Self::Cancelled => Ok(false),
            state if state.is_final() => Err(StoreError::wrong_state(action_id, state)),
            _ => Ok(true),
        }
    }

    /// `replay` takes FAILED or CANCELLED actions only.
    pub fn check_replay(self, action_id: &str) -> Result<(), StoreError> {
        match self {
            Self::Failed | Self::Cancelled => Ok(()),
            state => Err(StoreError::wrong_state(action_id, state)),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

/// An action's record as of one change (`sequence`).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub action_id: String,
    pub state: State,
    pub sequence: u64,
    /// Every finished attempt in order, each as the durable layer encoded it. An attempt in
    /// flight has no entry yet.
    pub attempts: Vec<Bytes>,
    pub next_attempt_at: Option<SystemTime>,
    /// The last attempt's error, encoded by the durable layer.
    pub last_error: Option<Bytes>,
    /// The final outcome, encoded by the durable layer.
    pub result: Option<Bytes>,
    /// What the next attempt does when it is not the submitted request again (a 202's
    /// Location to poll), encoded by the durable layer; cleared by a final state and a replay.
    pub next_step: Option<Bytes>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

/// An action as stored: its record, the submitted request and what scheduling needs.
#[derive(Debug, Clone)]
pub struct Stored {
    pub record: Record,
    /// The submitted request, as the durable layer encoded it: the durable truth.
    pub request: Bytes,
    /// Attempts started in all (history included).
    pub attempts_started: u32,
    /// Attempts started before the current run (the last replay): the run's budget counts
    /// from here.
    pub run_base: u32,
    /// When the current run's total time ends.
    pub deadline_at: SystemTime,
}

/// A new action for `submit`.
#[derive(Debug, Clone)]
pub struct NewAction {
    pub action_id: String,
    pub request: Bytes,
    /// The tenant the action belongs to (empty: none), for fairness across tenants.
    pub tenant: String,
    /// host:port, for fairness across destinations.
    pub destination: String,
    /// When the first attempt is due.
    pub due_at: SystemTime,
    /// The total time of each run (from submission or replay).
    pub total: Duration,
    pub now: SystemTime,
    /// Refuse with `StoreError::Full` when this many actions are unfinished.
    pub max_pending: u64,
}

/// What `submit` did.
#[derive(Debug, Clone)]
pub enum Submitted {
    Created(Stored),
    /// An action with this id was already stored (the caller compares the requests).
    Existing(Stored),
}

/// What `claim` takes.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub now: SystemTime,
    /// The claim holds until `now + lease` unless renewed or finished; after that another
    /// owner may take the action over as an orphan.
    pub lease: Duration,
    /// Most actions to claim.
    pub limit: usize,
    /// Most actions running per destination, those in `busy` included: fairness across
    /// destinations (due actions are taken round robin across them, within each tenant).
    pub per_destination: usize,
    /// Destinations with attempts in flight, and how many.
    pub busy: Vec<(String, usize)>,
}

/// A claimed action: its state is RUNNING and attempt `attempt` is recorded as started.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub stored: Stored,
    /// The number of the attempt now started (1-based, history included).
    pub attempt: u32,
    pub destination: String,
}

/// What `claim` found.
#[derive(Debug, Clone, Default)]
pub struct Claims {
    pub claimed: Vec<Claimed>,
    /// When the earliest pending action not claimed now is due, if any.
    pub next_due: Option<SystemTime>,
}

/// What happens after an attempt.
#[derive(Debug, Clone)]
pub enum Next {
    /// PENDING again, due at `at`, its next attempt `next_step` (`None`: the submitted request).
    Retry { at: SystemTime, last_error: Option<Bytes>, next_step: Option<Bytes> },
    /// SUCCEEDED or FAILED, with the outcome.
    Final { state: State, last_error: Option<Bytes>, result: Bytes },
}

/// The end of attempt `attempt` of a claimed action.
#[derive(Debug, Clone)]
pub struct Finish {
    pub action_id: String,
    pub attempt: u32,
    /// The attempt as it went, encoded; `None` when nothing was sent (a limit refused it):
    /// the attempt is then forgotten.
    pub record: Option<Bytes>,
    pub next: Next,
    pub now: SystemTime,
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// PENDING actions waiting for their first attempt of the run.
    pub pending: u64,
    /// RUNNING actions.
    pub running: u64,
    /// PENDING actions waiting for a retry.
    pub retry_waiting: u64,
    /// How long the longest-due PENDING action has been due (zero when none is).
    pub oldest_due: Duration,
}

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be read or written (full disk, unwritable file, closed): nothing of
    /// the call was stored.
    #[error("the action store is unavailable: {0}")]
    Unavailable(String),
    /// Too many unfinished actions.
    #[error(
        "{pending} unfinished durable actions: the bound durable.max_pending ({max}) is reached; retry later"
    )]
    Full { pending: u64, max: u64 },
    /// The action is not in a state that allows the call.
    #[error("action {action_id} is {state}")]
    WrongState { action_id: String, state: &'static str },
    /// Stored data that does not read back (a bug or a damaged file).
    #[error("the action store holds a damaged record: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn wrong_state(action_id: &str, state: State) -> Self {
        Self::WrongState { action_id: action_id.to_owned(), state: state.as_str() }
    }
}

/// A durable store of actions. Every method that changes an action commits before it returns
/// (so a reply sent after it survives a crash) and gives the change the next `sequence`.
pub trait ActionStore: Send + Sync + 'static {
    /// Stores a new PENDING action, or finds the one stored under its id. Refuses with `Full`
    /// when `max_pending` unfinished actions are stored.
    fn submit(&self, new: NewAction) -> StoreFuture<'_, Submitted>;

    /// The action, if stored.
    fn get(&self, action_id: &str) -> StoreFuture<'_, Option<Stored>>;

    /// Actions in `states` (all when empty), in submission order, after position `after`
    /// (0 for the first page); returns the page and the position of its last entry.
    fn list(&self, states: Vec<State>, after: u64, limit: usize) -> StoreFuture<'_, (Vec<Record>, u64)>;

    /// Records as of each change after `after_sequence`, in commit order, at most `limit`.
    fn changes(&self, after_sequence: u64, limit: usize) -> StoreFuture<'_, Vec<Record>>;

    /// The sequence of the last committed change; it changes after every commit.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Takes due PENDING actions, makes them RUNNING under a lease and records their next attempt
    /// as started. Fair across tenants first (the tenant with the fewest RUNNING goes first, in
    /// turn among equals, so a tenant with thousands due cannot starve one with a few), then
    /// round robin across destinations within a tenant.
    fn claim(&self, claim: ClaimRequest) -> StoreFuture<'_, Claims>;

    /// Extends the lease of a RUNNING action's attempt; false when it is no longer ours.
    fn renew(&self, action_id: &str, attempt: u32, until: SystemTime) -> StoreFuture<'_, bool>;

    /// RUNNING actions whose lease ran out: their attempt was interrupted and may have been sent.
    fn orphans(&self, now: SystemTime, limit: usize) -> StoreFuture<'_, Vec<Claimed>>;

    /// Records the end of an attempt and moves the action on. The attempt is recorded even when
    /// the action was cancelled meanwhile; the state changes only while the action is still
    /// RUNNING with this attempt. Returns the new record when the state changed.
    fn finish_attempt(&self, finish: Finish) -> StoreFuture<'_, Option<Record>>;

    /// PENDING or RUNNING → CANCELLED. A cancelled action is returned as it is; any other final
    /// state is `WrongState`. `None` when unknown.
    fn cancel(&self, action_id: &str, now: SystemTime) -> StoreFuture<'_, Option<Record>>;

    /// FAILED or CANCELLED → PENDING, due now, with a new run (its own total time and attempt
    /// budget), history kept. Other states are `WrongState`; `Full`, nothing changed, when
    /// `max_pending` unfinished actions are stored (a replayed action is unfinished again, as a
    /// submitted one is). `None` when unknown.
    fn replay(&self, action_id: &str, now: SystemTime, max_pending: u64) -> StoreFuture<'_, Option<Record>>;

    /// Deletes final actions that ended before `before`; returns how many.
    fn purge(&self, before: SystemTime) -> StoreFuture<'_, u64>;

    /// Counts for metrics.
    fn stats(&self, now: SystemTime) -> StoreFuture<'_, Stats>;
}

/// Milliseconds since the Unix epoch, as stored.
pub fn to_millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis().min(i64::MAX as u128) as i64).unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}
