//! The server's limits: a place in the server (queue bound) and a running slot per action, and
//! the parts the per-attempt layers of `stack::attempt_stack` are built from (the circuit
//! breakers, the shared cool-downs, the rate limits, the destination slots). Checks that refuse
//! at once come before waits, and every wait counts against the action's deadline. With a
//! shared backend (`shared::SharedLimits`, e.g. the fleet's Redis) the breaker, cool-down and
//! rate-limit layers consult it too.
use super::{
    breaker::{Breaker, BreakerSettings, CircuitBreakers},
    concurrency::{Admission, Concurrency, ConcurrencySettings, Overloaded, Slot},
    cool_down::{CoolDown, CoolDowns},
    rate_limit::{RateLimit, RateLimitSettings, RateLimits},
    shared::{SharedAdmission, SharedLimits},
};
use crate::action::{ActionError, ErrorKind};
use std::{sync::Arc, time::Instant};

/// The server's limits on sending, and on the response bytes held for replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    pub concurrency: ConcurrencySettings,
    pub rate: RateLimitSettings,
    pub breaker: BreakerSettings,
    /// Bytes of buffered response bodies held at once, server-wide (see `body_budget`).
    /// Default an eighth of the cgroup memory limit, else 512 MiB.
    pub max_buffered_bytes: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            concurrency: ConcurrencySettings::default(),
            rate: RateLimitSettings::default(),
            breaker: BreakerSettings::default(),
            max_buffered_bytes: super::body_budget::default_total(),
        }
    }
}

/// The limits, shared by every action of the server. The per-attempt ones are layers of the
/// attempt stack (`attempt::attempt_stack`), each built from its part here.
pub struct Limits {
    concurrency: Arc<Concurrency>,
    rate: Arc<RateLimits>,
    cool_downs: Arc<CoolDowns>,
    breakers: Arc<CircuitBreakers>,
    shared: Option<Arc<SharedAdmission>>,
}

impl Limits {
    /// Limits of this process alone.
    pub fn new(settings: &LimitSettings) -> Self {
        Self::with_shared(settings, None)
    }

    /// Limits that `shared`, when given, holds for the fleet too (this process's own stand in
    /// when it is unreachable).
    pub fn with_shared(settings: &LimitSettings, shared: Option<Arc<dyn SharedLimits>>) -> Self {
        let rate = Arc::new(RateLimits::new(&settings.rate));
        let shared = shared.map(|backend| {
            let rules = rate.clone();
            Arc::new(SharedAdmission::new(
                backend,
                Arc::new(move |context| rules.shared_buckets(&context.destination)),
            ))
        });
        Self {
            concurrency: Arc::new(Concurrency::new(settings.concurrency)),
            rate,
            cool_downs: Arc::new(CoolDowns::new(settings.rate.max_cool_down)),
            breakers: Arc::new(CircuitBreakers::new(settings.breaker)),
            shared,
        }
    }

    /// The breaker layer's step (it makes the attempt's fleet check, when there is a fleet).
    pub fn breaker(&self) -> Breaker {
        Breaker { breakers: self.breakers.clone(), shared: self.shared.clone() }
    }

    /// The cool-down layer's step.
    pub fn cool_down(&self) -> CoolDown {
        CoolDown { cool_downs: self.cool_downs.clone(), shared: self.shared.clone() }
    }

    /// The rate-limit layer's step.
    pub fn rate_limit(&self) -> RateLimit {
        RateLimit { rate: self.rate.clone(), shared: self.shared.clone() }
    }

    /// A place for a new action; refused at once when the server's queue is full.
    pub fn admit(&self) -> Result<Admission, Overloaded> {
        self.concurrency.admit()
    }

    /// Waits for a running slot, until `deadline`.
    pub async fn run_slot(&self, deadline: Instant) -> Result<Slot, ActionError> {
        self.concurrency.run_slot(deadline).await.map_err(|e| ActionError::new(ErrorKind::RateLimited, e.0))
    }

    pub fn concurrency(&self) -> Arc<Concurrency> {
        self.concurrency.clone()
    }

    pub fn rate(&self) -> Arc<RateLimits> {
        self.rate.clone()
    }

    pub fn cool_downs(&self) -> Arc<CoolDowns> {
        self.cool_downs.clone()
    }

    pub fn breakers(&self) -> Arc<CircuitBreakers> {
        self.breakers.clone()
    }

    /// Actions admitted and not yet finished (running or queued).
    pub fn admitted(&self) -> usize {
        self.concurrency.admitted()
    }
}
