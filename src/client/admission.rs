//! The server's limits: a place in the server (queue bound) and a running slot per action, and
//! the parts the per-attempt layers of `stack::attempt_stack` are built from (the circuit
//! breakers, the shared cool-downs, the tenant quotas, the rate limits, the destination slots).
//! Checks that refuse at once come before waits, and every wait counts against the action's
//! deadline. A tenant's concurrency quota holds here, at the running slot: a tenant at its quota
//! waits without taking a slot another tenant could run in.
use super::{
    breaker::{BreakerSettings, CircuitBreakers},
    concurrency::{Admission, Concurrency, ConcurrencySettings, Overloaded},
    cool_down::CoolDowns,
    fair::RunSlot,
    rate_limit::{RateLimitSettings, RateLimits},
    tenant::{TenantQuotas, TenantSettings},
};
use crate::action::{ActionError, ErrorKind};
use std::{sync::Arc, time::Instant};

/// The server's limits on sending, and on the response bytes held for replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitSettings {
    pub concurrency: ConcurrencySettings,
    pub rate: RateLimitSettings,
    pub breaker: BreakerSettings,
    /// Per-tenant quotas and weights.
    pub tenants: TenantSettings,
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
            tenants: TenantSettings::default(),
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
    tenants: Arc<TenantQuotas>,
}

impl Limits {
    pub fn new(settings: &LimitSettings) -> Self {
        Self {
            concurrency: Arc::new(Concurrency::new(settings.concurrency)),
            rate: Arc::new(RateLimits::new(&settings.rate)),
            cool_downs: Arc::new(CoolDowns::new(settings.rate.max_cool_down)),
            breakers: Arc::new(CircuitBreakers::new(settings.breaker)),
            tenants: Arc::new(TenantQuotas::new(&settings.tenants)),
        }
    }

    /// A place for a new action; refused at once when the server's queue is full.
    pub fn admit(&self) -> Result<Admission, Overloaded> {
        self.concurrency.admit()
    }

    /// Waits for a running slot for an action of `tenant`, until `deadline`: served by fair
    /// share across tenants, and never past the tenant's concurrency quota.
    pub async fn run_slot(&self, tenant: Option<&str>, deadline: Instant) -> Result<RunSlot, ActionError> {
        let share = self.tenants.share(tenant);
        let refused = match self.concurrency.run_slot(tenant.unwrap_or(""), share, deadline).await {
            Ok(slot) => return Ok(slot),
            Err(refused) => refused,
        };
        let message = match tenant {
            Some(tenant) if refused.at_cap => {
                crate::metrics::tenant(Some(tenant)).refused("concurrency");
                format!(
                    "tenant {tenant:?} is at its concurrency quota of {} running actions ({}.max_concurrent) \
                     and none ended before the deadline",
                    share.cap,
                    self.tenants.section(tenant)
                )
            }
            _ => self.concurrency.no_run_slot().0,
        };
        Err(ActionError::new(ErrorKind::RateLimited, message))
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
