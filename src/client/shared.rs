//! Limits shared with the other replicas of a fleet, as the admission layers see them: the
//! `SharedLimits` trait a backend implements (Redis, in `crate::fleet`), the buckets an attempt
//! must pass, and the `Verdict` of the one check an attempt makes. With no backend every limit
//! is this process's own (`rate_limit`, `cool_down`, `breaker`); with one, the breaker layer
//! asks it once per attempt (the destination's shared circuit and cool-down marks and every rate
//! bucket, in one round trip) and the verdict rides beside the request (`AttemptRequest::checked`)
//! to the cool-down and rate-limit layers below, so the layer order stays and no layer asks
//! again on the way.
use super::attempt::AttemptContext;
pub use super::attempt::{Checked, Verdict};
use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

/// The fleet's name of the tenants' rate quotas: `rate:tenant:NAME`.
pub const TENANT_RULE: &str = "tenant";

/// The future of a shared check (boxed: the trait is used as an object).
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;

/// The future of a hold on a tenant's fleet-wide running places.
pub type HoldFuture<'a> = Pin<Box<dyn Future<Output = Hold> + Send + 'a>>;

/// What the fleet says when an action asks for one of its tenant's running places.
#[derive(Debug)]
pub enum Hold {
    /// Held until the `FleetSlot` is dropped (or, should this process die, its lease ends).
    Held(FleetSlot),
    /// The tenant's quota is held across the fleet; ask again later.
    Full,
    /// The backend is unreachable and the policy falls back: this replica's own quota applies.
    Local,
    /// The backend is unreachable and the policy refuses.
    Denied,
}

/// One of a tenant's running places across the fleet, given back when dropped. The backend
/// keeps its lease renewed meanwhile.
pub struct FleetSlot(pub Box<dyn Send + Sync>);

impl std::fmt::Debug for FleetSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSlot")
    }
}

/// One rate bucket an attempt must pass: a rule, the subject it keys on (a destination, a
/// tenant, nothing for the global limit), and its GCRA terms. Every replica names a bucket the
/// same way, so they share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBucket {
    /// The rule, stable across replicas: `global`, `dest:*.example.com`, `tenant`.
    pub rule: Arc<str>,
    /// What the rule keys on: `api.example.com:443`, a tenant id; empty for one bucket.
    pub subject: String,
    /// One send per `interval` …
    pub interval: Duration,
    /// … with up to `burst` at once.
    pub burst: u32,
}

impl SharedBucket {
    /// The bucket as messages name it: `global`, `dest:h (h:80)`.
    pub fn describe(&self) -> String {
        if self.subject.is_empty() {
            self.rule.to_string()
        } else {
            format!("{} ({})", self.rule, self.subject)
        }
    }
}

/// A backend of shared limits. `check` is the one call on an attempt's way (it never fails:
/// an unreachable backend answers `Local` or `Denied`, and never waits past `deadline`);
/// the writes are fire-and-forget, off the attempt's way.
pub trait SharedLimits: Send + Sync + 'static {
    /// `destination`'s circuit and cool-down marks (when given), then every bucket of
    /// `buckets`: all are taken when all allow and no mark is set, none otherwise.
    fn check<'a>(
        &'a self,
        destination: Option<&'a str>,
        buckets: &'a [SharedBucket],
        deadline: Instant,
    ) -> CheckFuture<'a>;

    /// `destination` answered 429 with Retry-After `wait` (already capped): every replica waits.
    fn cool_down(&self, destination: &str, wait: Duration);

    /// This replica opened `destination`'s circuit for `open_for`: every replica refuses.
    fn circuit_opened(&self, destination: &str, open_for: Duration);

    /// This replica's probe succeeded: the shared mark goes.
    fn circuit_closed(&self, destination: &str);

    /// One of `tenant`'s running places, when fewer than `quota` of its actions run across the
    /// fleet: once per action, not per attempt. Never fails nor waits past `deadline`, like
    /// `check`.
    fn hold<'a>(&'a self, tenant: &'a str, quota: usize, deadline: Instant) -> HoldFuture<'a>;
}

/// Names the buckets an attempt must pass (the rate rules that apply to its destination, and
/// whatever else its context keys a rule on).
pub type BucketsOf = dyn Fn(&AttemptContext) -> Vec<SharedBucket> + Send + Sync;

/// An admission layer's state: this process's `local` limit, and the fleet's backend when
/// there is one. The breaker, the 429 cool-down and the rate limits are each one of these.
pub struct FleetBacked<T> {
    pub local: Arc<T>,
    pub shared: Option<Arc<SharedAdmission>>,
}

impl<T> FleetBacked<T> {
    /// This process's limit only.
    pub fn local(local: Arc<T>) -> Self {
        Self { local, shared: None }
    }
}

// Derived Clone would ask `T: Clone`; only the `Arc`s are cloned.
impl<T> Clone for FleetBacked<T> {
    fn clone(&self) -> Self {
        Self { local: self.local.clone(), shared: self.shared.clone() }
    }
}

/// A shared backend and the rate rules it is asked about: what the admission layers hold.
pub struct SharedAdmission {
    backend: Arc<dyn SharedLimits>,
    buckets: Arc<BucketsOf>,
}

impl SharedAdmission {
    pub fn new(backend: Arc<dyn SharedLimits>, buckets: Arc<BucketsOf>) -> Self {
        Self { backend, buckets }
    }

    /// The rate buckets the attempt of `context` must pass.
    pub fn buckets(&self, context: &AttemptContext) -> Vec<SharedBucket> {
        (self.buckets)(context)
    }

    /// The first check of an attempt to `destination` (`host:port`): its marks and every bucket
    /// of `buckets`.
    pub async fn check(&self, destination: &str, buckets: &[SharedBucket], deadline: Instant) -> Verdict {
        self.backend.check(Some(destination), buckets, deadline).await
    }

    /// A check of the buckets alone, after a wait (the marks were read before it, as the local
    /// layers read theirs once).
    pub async fn check_rate(&self, buckets: &[SharedBucket], deadline: Instant) -> Verdict {
        self.backend.check(None, buckets, deadline).await
    }

    /// One of `tenant`'s fleet-wide running places (its concurrency quota `quota`).
    pub async fn hold(&self, tenant: &str, quota: usize, deadline: Instant) -> Hold {
        self.backend.hold(tenant, quota, deadline).await
    }

    pub fn backend(&self) -> &dyn SharedLimits {
        &*self.backend
    }
}
