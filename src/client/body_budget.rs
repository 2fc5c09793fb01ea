//! The memory budget for buffered bodies: one server-wide count of the response bytes held for
//! replies (`limits.max_buffered_bytes`). A buffered body takes budget before it grows, and
//! gives it back when the last handle to its bytes is dropped: the gRPC edge keeps one until
//! the reply has been handed to the connection. So many large replies at once wait for room
//! instead of running the process out of memory. Streamed bodies take none.
//!
//! Waiting and giving up: a body waits for room (within its caller's deadline); bodies that
//! already hold budget and wait to grow go before bodies that have none yet. A body that
//! already holds budget and waits for more is a risk: when every held byte belongs to bodies
//! that wait to grow, none can ever finish. The body whose wait would close that circle gives
//! up at once (`BudgetError::Stalled`) and frees what it holds, so the others go on.
use bytes::Bytes;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Growth step of a body of unknown length: one read chunk (`response::MAX_CHUNK`, which is
/// checked against it there), so a step always covers the chunk being appended.
pub const MIN_STEP: u64 = 64 * 1024;

/// Why a body could not have the budget it needed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BudgetError {
    /// The body alone is larger than the whole budget: it can never fit (BODY_TOO_LARGE).
    #[error(
        "a response body of {wanted} bytes does not fit the memory budget for buffered bodies \
         ({total} bytes, limits.max_buffered_bytes)"
    )]
    TooLarge { wanted: u64, total: u64 },
    /// Every byte held belongs to bodies waiting to grow: this one gives up (RATE_LIMITED).
    #[error(
        "memory budget for buffered bodies exhausted: all {held} of {total} bytes are held by \
         bodies waiting for more; this body gave up its {holding} bytes so the others can finish"
    )]
    Stalled { held: u64, total: u64, holding: u64 },
    /// No room came free before the deadline (RATE_LIMITED).
    #[error(
        "memory budget for buffered bodies exhausted: no room for {wanted} more bytes before the \
         deadline ({held} of {total} bytes held by other replies; limits.max_buffered_bytes)"
    )]
    Exhausted { wanted: u64, held: u64, total: u64 },
}

impl BudgetError {
    /// The metrics' `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Stalled { .. } => "stalled",
            Self::Exhausted { .. } => "exhausted",
        }
    }
}

/// The server's budget, shared by every buffered body. Cheap to clone.
#[derive(Clone)]
pub struct BodyBudget {
    inner: Arc<Inner>,
}

struct Inner {
    total: u64,
    state: Mutex<State>,
    /// Woken whenever bytes are given back.
    freed: Notify,
}

#[derive(Default)]
struct State {
    /// Bytes taken by bodies and replies.
    held: u64,
    /// Of those, bytes held by bodies that wait for more.
    waiting_held: u64,
}

impl std::fmt::Debug for BodyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyBudget").field("total", &self.total()).field("held", &self.held()).finish()
    }
}

impl BodyBudget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Self {
        Self { inner: Arc::new(Inner { total, state: Mutex::default(), freed: Notify::new() }) }
    }

    /// Bytes in the budget.
    pub fn total(&self) -> u64 {
        self.inner.total
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.inner.lock().held
    }

    /// The error of a body that waited for `wanted` bytes until its deadline; counted.
    pub fn exhausted(&self, wanted: u64) -> BudgetError {
        refused(BudgetError::Exhausted { wanted, held: self.held(), total: self.total() })
    }

    /// A buffer for one body of at most `limit` bytes, taking budget as it grows.
    pub fn buffer(&self, limit: u64) -> BudgetedBuf {
        BudgetedBuf { budget: self.clone(), buf: Vec::new(), reserved: 0, limit }
    }

    /// Takes `bytes` more for a body that already holds `holding`, waiting while there is no
    /// room. Cancel-safe: dropped while waiting, it takes nothing.
    async fn acquire(&self, bytes: u64, holding: u64) -> Result<(), BudgetError> {
        let total = self.inner.total;
        let wanted = holding.saturating_add(bytes);
        if wanted > total {
            return Err(refused(BudgetError::TooLarge { wanted, total }));
        }
        let mut wait = Waiting { inner: &self.inner, holding, registered: false };
        loop {
            let freed = {
                let mut state = self.inner.lock();
                wait.unregister(&mut state);
                // Bodies already growing go first: finishing them frees their bytes, while
                // starting new ones would fill the budget with halves.
                let growers_first = holding == 0 && state.waiting_held > 0;
                if total - state.held >= bytes && !growers_first {
                    state.held += bytes;
                    crate::metrics::buffered_body_bytes(state.held);
                    return Ok(());
                }
                if holding > 0 {
                    state.waiting_held += holding;
                    wait.registered = true;
                    if state.waiting_held >= state.held {
                        wait.unregister(&mut state);
                        return Err(refused(BudgetError::Stalled { held: state.held, total, holding }));
                    }
                }
                // Made under the lock: a release after it is seen even before the first poll.
                self.inner.freed.notified()
            };
            freed.await;
        }
    }

    fn release(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        {
            let mut state = self.inner.lock();
            state.held = state.held.saturating_sub(bytes);
            crate::metrics::buffered_body_bytes(state.held);
        }
        self.inner.freed.notify_waiters();
    }
}

impl Inner {
    /// The state; a panic elsewhere while it was locked leaves plain counters, still usable.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn refused(error: BudgetError) -> BudgetError {
    crate::metrics::body_budget_refused(error.reason());
    error
}

/// A body's place among the waiters; leaves it when the wait ends or is dropped.
struct Waiting<'a> {
    inner: &'a Inner,
    holding: u64,
    registered: bool,
}

impl Waiting<'_> {
    fn unregister(&mut self, state: &mut State) {
        if self.registered {
            state.waiting_held = state.waiting_held.saturating_sub(self.holding);
            self.registered = false;
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.registered {
            let mut state = self.inner.lock();
            self.unregister(&mut state);
        }
    }
}

/// A body being buffered. The budget it holds covers the buffer's capacity (what is
/// allocated, not only what was read); dropped, it gives the budget back.
pub struct BudgetedBuf {
    budget: BodyBudget,
    buf: Vec<u8>,
    reserved: u64,
    limit: u64,
}

impl BudgetedBuf {
    /// Bytes buffered.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes budget and room for `len` bytes at once (a known Content-Length), so a body
    /// cannot be left half-grown waiting for the rest. At most the body's limit is taken.
    pub async fn reserve(&mut self, len: u64) -> Result<(), BudgetError> {
        let target = len.min(self.limit);
        if target > self.reserved {
            self.grow_to(target).await?;
        }
        Ok(())
    }

    /// Appends `data`, first taking budget for the room it needs: the buffer doubles (at least
    /// one step, at most the limit or the whole budget), as a `Vec` would.
    pub async fn push(&mut self, data: &[u8]) -> Result<(), BudgetError> {
        let need = (self.buf.len() as u64).saturating_add(data.len() as u64);
        if need > self.reserved {
            let doubled = self.reserved.saturating_mul(2).max(MIN_STEP);
            let target = doubled.min(self.limit).min(self.budget.total()).max(need);
            self.grow_to(target).await?;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    async fn grow_to(&mut self, target: u64) -> Result<(), BudgetError> {
        let more = target - self.reserved;
        self.budget.acquire(more, self.reserved).await?;
        self.reserved = target;
        let room = usize::try_from(target).unwrap_or(usize::MAX).saturating_sub(self.buf.len());
        self.buf.reserve_exact(room);
        Ok(())
    }

    /// The body's bytes. They keep the budget for their length until the last handle to them
    /// is dropped; room taken but not filled is given back now.
    pub fn freeze(mut self) -> Bytes {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.is_empty() {
            return Bytes::new(); // dropping self gives all back
        }
        buf.shrink_to_fit();
        let kept = (buf.len() as u64).min(self.reserved);
        self.budget.release(self.reserved - kept);
        self.reserved = 0;
        Bytes::from_owner(Held { buf, _hold: Hold { budget: self.budget.clone(), bytes: kept } })
    }
}

impl Drop for BudgetedBuf {
    fn drop(&mut self) {
        self.budget.release(self.reserved);
    }
}

/// Budget held for bytes that left the buffer.
struct Hold {
    budget: BodyBudget,
    bytes: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// A frozen body and the budget it holds: the owner behind its `Bytes`.
struct Held {
    buf: Vec<u8>,
    _hold: Hold,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// The default budget: an eighth of the cgroup memory limit when there is one, else 512 MiB.
/// An eighth, because a budgeted byte costs more than a byte: its reply's encoded copy lives
/// beside it until sent, and the allocator keeps slack (measured: 64 concurrent 2 MiB replies
/// under a 32 MiB budget peaked about 110 MiB above the idle process, 3.5 bytes a budgeted
/// byte). That leaves half the limit for text and JSON views (a JSON tree is several times
/// its text), connections and the process itself.
pub fn default_total() -> u64 {
    cgroup_memory_limit().map_or(DEFAULT_TOTAL, |limit| (limit / 8).max(MIN_STEP))
}

/// The budget without a cgroup memory limit.
pub const DEFAULT_TOTAL: u64 = 512 * 1024 * 1024;

/// The memory limit of this process's cgroup: v2 `memory.max` (the smallest along its path,
/// so a limit on a parent counts), else v1 `memory.limit_in_bytes`. None when unlimited.
pub fn cgroup_memory_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup_limit_from(&own, |path| std::fs::read_to_string(path).ok())
}

/// Values at or above this are "no limit" (cgroup v1 writes a page-rounded i64::MAX).
const UNLIMITED: u64 = 1 << 60;

fn cgroup_limit_from(proc_self_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let parse = |text: Option<String>| {
        text.and_then(|t| t.trim().parse::<u64>().ok()).filter(|&n| n > 0 && n < UNLIMITED)
    };
    // v2: "0::/path". The mount shows this cgroup at /sys/fs/cgroup/path, or at the root
    // inside a cgroup namespace (a container).
    if let Some(path) = proc_self_cgroup.lines().find_map(|l| l.strip_prefix("0::")) {
        let mut limits = Vec::new();
        let mut dir = path.trim().trim_end_matches('/').to_owned();
        loop {
            limits.extend(parse(read(&format!("/sys/fs/cgroup{dir}/memory.max"))));
            match dir.rfind('/') {
                Some(at) if !dir.is_empty() => dir.truncate(at),
                _ => break,
            }
        }
        if let Some(min) = limits.into_iter().min() {
            return Some(min);
        }
    }
    // v1: "N:memory:/path" (or "N:cpu,memory:/path").
    let v1 = proc_self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| path.trim().trim_end_matches('/').to_owned())
    });
    let v1 = v1?;
    parse(read(&format!("/sys/fs/cgroup/memory{v1}/memory.limit_in_bytes")))
        .or_else(|| parse(read("/sys/fs/cgroup/memory/memory.limit_in_bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const KIB: u64 = 1024;

    #[tokio::test(start_paused = true)]
    async fn a_known_length_waits_for_room_and_takes_it_whole() {
        let budget = BodyBudget::new(256 * KIB);
        let mut first = budget.buffer(u64::MAX);
        first.reserve(200 * KIB).await.unwrap();
        assert_eq!(budget.held(), 200 * KIB);

        let waiter = budget.clone();
        let second = tokio::spawn(async move {
            let mut second = waiter.buffer(u64::MAX);
            second.reserve(100 * KIB).await.map(|()| second)
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!second.is_finished(), "no room: it waits, holding nothing");
        assert_eq!(budget.held(), 200 * KIB);

        first.push(&[1; 1000]).await.unwrap();
        let body = first.freeze();
        assert_eq!((body.len(), budget.held()), (1000, 1000), "unfilled room is given back at once");
        let second = second.await.unwrap().unwrap();
        assert_eq!(budget.held(), 1000 + 100 * KIB);
        drop(body);
        assert_eq!(budget.held(), 100 * KIB, "the bytes hold the budget until their last handle goes");
        drop(second);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_deadline_takes_nothing() {
        let budget = BodyBudget::new(128 * KIB);
        let mut full = budget.buffer(u64::MAX);
        full.reserve(128 * KIB).await.unwrap();
        let mut late = budget.buffer(u64::MAX);
        let waited = tokio::time::timeout(Duration::from_secs(1), late.push(&[0; 10])).await;
        assert!(waited.is_err(), "waits for room until the deadline");
        assert_eq!((late.len(), budget.held()), (0, 128 * KIB), "the buffer did not grow");
        let message = budget.exhausted(MIN_STEP).to_string();
        assert!(message.starts_with("memory budget for buffered bodies exhausted"), "{message}");
        drop((late, full));
        assert_eq!(budget.held(), 0, "both given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_larger_than_the_whole_budget_fails_at_once() {
        let budget = BodyBudget::new(128 * KIB);
        let mut known = budget.buffer(u64::MAX);
        let err = known.reserve(129 * KIB).await.unwrap_err();
        assert!(matches!(err, BudgetError::TooLarge { wanted, .. } if wanted == 129 * KIB), "{err}");
        let mut chunked = budget.buffer(u64::MAX);
        for _ in 0..2 {
            chunked.push(&[0; 64 * 1024]).await.unwrap();
        }
        assert_eq!(budget.held(), 128 * KIB, "growth stops at the whole budget");
        let err = chunked.push(&[0]).await.unwrap_err();
        assert!(matches!(err, BudgetError::TooLarge { .. }), "{err}");
        drop(chunked);
        assert_eq!(budget.held(), 0);
    }

    /// A buffer of `budget` holding `len` bytes.
    async fn holding(budget: &BodyBudget, len: usize) -> BudgetedBuf {
        let mut buf = budget.buffer(u64::MAX);
        buf.push(&vec![0; len]).await.unwrap();
        buf
    }

    /// `buf` asking for 10 bytes more, on a task of its own: the grown buffer once it has room.
    type Grown = Result<BudgetedBuf, BudgetError>;

    fn grow(mut buf: BudgetedBuf) -> tokio::task::JoinHandle<Grown> {
        tokio::spawn(async move { buf.push(&[0; 10]).await.map(|()| buf) })
    }

    #[tokio::test(start_paused = true)]
    async fn growing_bodies_that_wait_on_each_other_do_not_wait_forever() {
        let budget = BodyBudget::new(256 * KIB);
        let a = holding(&budget, 128 * 1024).await;
        let mut b = holding(&budget, 128 * 1024).await;
        assert_eq!(budget.held(), 256 * KIB);

        // a waits to grow; b's wait would leave every held byte waiting: b gives up.
        let grow_a = grow(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!grow_a.is_finished());
        let err = b.push(&[0; 10]).await.unwrap_err();
        assert!(matches!(err, BudgetError::Stalled { holding, .. } if holding == 128 * KIB), "{err}");
        drop(b);
        let a = grow_a.await.unwrap().unwrap();
        assert_eq!(a.len(), 128 * 1024 + 10, "the other body went on");
        let body = a.freeze();
        assert_eq!(budget.held(), body.len() as u64);
    }

    /// A budget of twice `each` bytes, full: a finished reply of `each` bytes, and a body of
    /// `each` bytes asking for 10 more (on a task of its own).
    async fn reply_and_grower(each: usize) -> (BodyBudget, Bytes, tokio::task::JoinHandle<Grown>) {
        let budget = BodyBudget::new(2 * each as u64);
        let reply = holding(&budget, each).await.freeze();
        let grower = grow(holding(&budget, each).await);
        (budget, reply, grower)
    }

    #[tokio::test(start_paused = true)]
    async fn a_growing_body_goes_before_a_new_one() {
        let (budget, reply, grower) = reply_and_grower(128 * 1024).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        let fresh = grow(budget.buffer(u64::MAX));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(reply);
        let growing = grower.await.unwrap().unwrap();
        assert_eq!(budget.held(), 256 * KIB, "the grower took the freed room");
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!fresh.is_finished(), "the new body still waits");
        drop(growing);
        assert_eq!(fresh.await.unwrap().unwrap().len(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_behind_a_reply_being_sent_keeps_waiting() {
        // Bytes held by a finished body (a reply on its way) will come back: no giving up.
        let (_budget, reply, grower) = reply_and_grower(64 * 1024).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!grower.is_finished(), "it waits for the reply's bytes");
        drop(reply);
        assert_eq!(grower.await.unwrap().unwrap().len(), 64 * 1024 + 10);
    }

    #[test]
    fn the_cgroup_limit_is_read_from_v2_or_v1() {
        let files = |entries: &'static [(&'static str, &'static str)]| {
            move |path: &str| entries.iter().find(|(p, _)| *p == path).map(|(_, v)| (*v).to_owned())
        };
        let v2 = files(&[
            ("/sys/fs/cgroup/memory.max", "max\n"),
            ("/sys/fs/cgroup/kubepods/memory.max", "1073741824\n"),
            ("/sys/fs/cgroup/kubepods/pod1/memory.max", "268435456\n"),
        ]);
        assert_eq!(cgroup_limit_from("0::/kubepods/pod1\n", v2), Some(256 << 20));
        assert_eq!(cgroup_limit_from("0::/\n", files(&[("/sys/fs/cgroup/memory.max", "max\n")])), None);
        // In a cgroup namespace the path is "/", the limit at the mount's root.
        assert_eq!(
            cgroup_limit_from("0::/\n", files(&[("/sys/fs/cgroup/memory.max", "536870912")])),
            Some(512 << 20)
        );
        let v1 = files(&[("/sys/fs/cgroup/memory/memory.limit_in_bytes", "268435456\n")]);
        assert_eq!(
            cgroup_limit_from("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n", v1),
            Some(256 << 20)
        );
        let unlimited = files(&[("/sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712")]);
        assert_eq!(cgroup_limit_from("4:memory:/\n", unlimited), None);
    }
}
