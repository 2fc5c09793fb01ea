//! The server's limits: a place in the server (queue bound) and a running slot per action, and
//! the parts the per-attempt layers of `stack::attempt_stack` are built from (the circuit
//! breakers, the shared cool-downs, the tenant quotas, the rate limits, the destination slots).
//! Checks that refuse at once come before waits, and every wait counts against the action's
//! deadline. A tenant's concurrency quota holds here, at the running slot: a tenant at its quota
//! waits without taking a slot another tenant could run in. With a shared backend
//! (`shared::SharedLimits`, e.g. the fleet's Redis) the breaker, cool-down and rate-limit layers
//! consult it too.
use super::{
    attempt::AttemptContext,
    breaker::{Breaker, CircuitBreakers},
    concurrency::{Admission, Concurrency, Overloaded},
    cool_down::{CoolDown, CoolDowns},
    fair::{NoSlot, RunSlot, Share},
    rate_limit::{Rate, RateLimit, RateLimitRule, RateLimits},
    shared::{FleetSlot, Hold, SharedAdmission, SharedLimits},
    tenant::{TenantQuotas, TenantSettings},
};
use crate::{
    action::{ActionError, ErrorKind},
    settings::at_least_one,
};
use serde::{Deserialize, Deserializer, Serialize};
use std::{sync::Arc, time::Duration, time::Instant};

/// The `[limits]` section: the server's limits on sending, and on the response bytes held for
/// replies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Actions running at once. Default 512.
    #[serde(deserialize_with = "at_least_one")]
    pub max_in_flight: usize,
    /// Actions waiting for a slot; past this, RESOURCE_EXHAUSTED. Default 2048.
    pub max_queued: usize,
    /// Attempts in flight to one destination (host:port) at once. Default 64.
    #[serde(deserialize_with = "at_least_one")]
    pub max_in_flight_per_host: usize,
    /// Limit on all sends together, `200/s` or `200/s burst 50`. Default none.
    pub global_rate_limit: Option<Rate>,
    /// `PATTERN=RATE` per destination; the first rule whose pattern matches applies. Default
    /// none.
    pub rate_limits: Vec<RateLimitRule>,
    /// Longest shared cool-down a 429's Retry-After may impose on a host. Default 10 min.
    #[serde(with = "humantime_serde")]
    pub max_host_cool_down: Duration,
    /// Consecutive failures that open a destination's circuit; 0 turns breaking off. Default 10.
    pub breaker_failures: u32,
    /// How long an open circuit refuses before it lets a probe through. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub breaker_cool_down: Duration,
    /// Bytes of buffered response bodies held at once, server-wide (see `body_budget`), at
    /// least one body chunk. Default none: an eighth of the cgroup memory limit, else 512 MiB.
    #[serde(deserialize_with = "buffered_bytes")]
    pub max_buffered_bytes: Option<u64>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_in_flight: 512,
            max_queued: 2048,
            max_in_flight_per_host: 64,
            global_rate_limit: None,
            rate_limits: Vec::new(),
            max_host_cool_down: Duration::from_secs(600),
            breaker_failures: 10,
            breaker_cool_down: Duration::from_secs(15),
            max_buffered_bytes: None,
        }
    }
}

impl LimitSettings {
    /// The memory budget for buffered bodies: `max_buffered_bytes`, else derived from the
    /// cgroup limit.
    pub fn buffered_bytes(&self) -> u64 {
        self.max_buffered_bytes.unwrap_or_else(super::body_budget::default_total)
    }
}

/// A smaller memory budget than one body chunk could not buffer anything.
fn buffered_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let min = super::body_budget::MIN_STEP;
    match Option::<u64>::deserialize(d)? {
        Some(n) if n < min => Err(serde::de::Error::custom(format!("must be at least {min} (bytes)"))),
        n => Ok(n),
    }
}

/// A tenant's full fleet-wide quota is asked again after this long, and up to as long again.
const FLEET_PLACE_POLL: Duration = Duration::from_millis(20);

/// What a running action holds: its running slot here and, for a tenant with a concurrency
/// quota in a fleet, one of the tenant's places across the fleet. Released on drop.
#[derive(Debug)]
pub struct Running {
    _slot: RunSlot,
    _fleet: Option<FleetSlot>,
}

/// The limits, shared by every action of the server. The per-attempt ones are layers of the
/// attempt stack (`attempt::attempt_stack`), each built from its part here.
pub struct Limits {
    concurrency: Arc<Concurrency>,
    rate: Arc<RateLimits>,
    cool_downs: Arc<CoolDowns>,
    breakers: Arc<CircuitBreakers>,
    tenants: Arc<TenantQuotas>,
    shared: Option<Arc<SharedAdmission>>,
}

impl Limits {
    /// Limits of this process alone.
    pub fn new(settings: &LimitSettings, tenants: &TenantSettings) -> Self {
        Self::with_shared(settings, tenants, None)
    }

    /// Limits that `shared`, when given, holds for the fleet too (this process's own stand in
    /// when it is unreachable).
    pub fn with_shared(
        settings: &LimitSettings,
        tenants: &TenantSettings,
        shared: Option<Arc<dyn SharedLimits>>,
    ) -> Self {
        let rate = Arc::new(RateLimits::new(settings.global_rate_limit, &settings.rate_limits));
        let tenants = Arc::new(TenantQuotas::new(tenants));
        let shared = shared.map(|backend| {
            let (rules, quotas) = (rate.clone(), tenants.clone());
            // The tenant's rate quota is one more bucket of the attempt's one check.
            let buckets = move |context: &AttemptContext| {
                let mut buckets = rules.shared_buckets(&context.destination);
                buckets.extend(context.tenant.as_deref().and_then(|tenant| quotas.shared_bucket(tenant)));
                buckets
            };
            Arc::new(SharedAdmission::new(backend, Arc::new(buckets)))
        });
        Self {
            concurrency: Arc::new(Concurrency::new(
                settings.max_in_flight,
                settings.max_queued,
                settings.max_in_flight_per_host,
            )),
            rate,
            cool_downs: Arc::new(CoolDowns::new(settings.max_host_cool_down)),
            breakers: Arc::new(CircuitBreakers::new(settings.breaker_failures, settings.breaker_cool_down)),
            tenants,
            shared,
        }
    }

    /// The breaker layer's step (it makes the attempt's fleet check, when there is a fleet).
    pub fn breaker(&self) -> Breaker {
        Breaker { local: self.breakers.clone(), shared: self.shared.clone() }
    }

    /// The cool-down layer's step.
    pub fn cool_down(&self) -> CoolDown {
        CoolDown { local: self.cool_downs.clone(), shared: self.shared.clone() }
    }

    /// The rate-limit layer's step.
    pub fn rate_limit(&self) -> RateLimit {
        RateLimit { local: self.rate.clone(), shared: self.shared.clone() }
    }

    /// A place for a new action; refused at once when the server's queue is full.
    pub fn admit(&self) -> Result<Admission, Overloaded> {
        self.concurrency.admit()
    }

    /// Waits for a running slot for an action of `tenant`, until `deadline`: served by fair
    /// share across tenants, and never past the tenant's concurrency quota (the fleet's, in a
    /// fleet). A tenant with `max_queued` of its actions waiting already is refused at once.
    pub async fn run_slot(&self, tenant: Option<&str>, deadline: Instant) -> Result<Running, ActionError> {
        let share = self.tenants.share(tenant);
        let slot = match self.concurrency.run_slot(tenant.unwrap_or(""), share, deadline).await {
            Ok(slot) => slot,
            Err(refused) => return Err(self.no_run_slot(tenant, share, refused)),
        };
        let fleet = match (tenant, &self.shared) {
            (Some(tenant), Some(shared)) if share.cap != usize::MAX => {
                self.fleet_place(shared, tenant, share, deadline).await?
            }
            _ => None,
        };
        Ok(Running { _slot: slot, _fleet: fleet })
    }

    /// One of `tenant`'s running places across the fleet (this process's own slot is held
    /// already, so at most the quota's number of its actions wait here). A full quota is asked
    /// again every few tens of milliseconds (a round trip each) until the deadline.
    async fn fleet_place(
        &self,
        shared: &SharedAdmission,
        tenant: &str,
        share: Share,
        deadline: Instant,
    ) -> Result<Option<FleetSlot>, ActionError> {
        let mut waited = false;
        loop {
            match shared.hold(tenant, share.cap, deadline).await {
                Hold::Held(place) => return Ok(Some(place)),
                Hold::Local => return Ok(None),
                Hold::Denied => {
                    return Err(ActionError::new(
                        ErrorKind::RateLimited,
                        format!(
                            "tenant {tenant:?}'s fleet-wide concurrency quota cannot be checked: the fleet's \
                             shared limits are unreachable (Redis) and fleet.redis_unavailable is \"deny\""
                        ),
                    ))
                }
                Hold::Full => {}
            }
            let pause = FLEET_PLACE_POLL + FLEET_PLACE_POLL.mul_f64(fastrand::f64());
            if Instant::now() + pause > deadline {
                let refused = NoSlot { at_cap: true, queue_full: false };
                return Err(self.no_run_slot(Some(tenant), share, refused));
            }
            if !waited {
                crate::metrics::tenant(Some(tenant)).waited("concurrency");
                waited = true;
            }
            tokio::time::sleep(pause).await;
        }
    }

    fn no_run_slot(&self, tenant: Option<&str>, share: Share, refused: NoSlot) -> ActionError {
        let message = match tenant {
            Some(tenant) if refused.queue_full => {
                crate::metrics::tenant(Some(tenant)).refused("queue");
                self.tenant_queue_full(tenant, share)
            }
            Some(tenant) if refused.at_cap => {
                crate::metrics::tenant(Some(tenant)).refused("concurrency");
                format!(
                    "tenant {tenant:?} is at its concurrency quota of {} running actions ({}.max_concurrent{}) \
                     and none ended before the deadline",
                    share.cap,
                    self.tenants.section(tenant),
                    if self.shared.is_some() { ", fleet-wide" } else { "" }
                )
            }
            _ => self.concurrency.no_run_slot().0,
        };
        ActionError::new(ErrorKind::RateLimited, message)
    }

    fn tenant_queue_full(&self, tenant: &str, share: Share) -> String {
        format!(
            "tenant {tenant:?} has {} actions waiting for a running slot, its bound ({}.max_queued); \
             try again later",
            share.max_queued,
            self.tenants.section(tenant)
        )
    }

    /// Why a new action of `tenant` would be refused at once: its queue bound is reached (the
    /// gRPC edge answers RESOURCE_EXHAUSTED before running it; `run_slot` holds it too).
    pub fn tenant_queue_full_now(&self, tenant: Option<&str>) -> Option<String> {
        let tenant = tenant?;
        let share = self.tenants.share(Some(tenant));
        (share.max_queued != usize::MAX && self.concurrency.waiting(tenant) >= share.max_queued)
            .then(|| self.tenant_queue_full(tenant, share))
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

    pub fn tenants(&self) -> Arc<TenantQuotas> {
        self.tenants.clone()
    }

    /// Actions admitted and not yet finished (running or queued).
    pub fn admitted(&self) -> usize {
        self.concurrency.admitted()
    }
}
