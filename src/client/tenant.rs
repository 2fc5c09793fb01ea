//! Tenant quotas: each tenant's concurrency quota, rate quota and weight (`[tenants.NAME]`, and
//! `[tenants.default]` for every tenant not named, each with its own buckets), and the
//! `TenantQuota` layer that waits for the tenant's rate quota before an attempt. The
//! concurrency quota and the weight are the tenant's `Share` of the fair running slots
//! (`fair`), where an action waits before it runs. Actions without a tenant have no quota.
use super::{
    attempt::{AttemptRequest, Before, Step, StepLayer},
    fair::Share,
    rate_limit::{KeyedRateLimit, Rate},
    shared::{SharedBucket, Verdict, TENANT_RULE},
};
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

/// One tenant's quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantQuotaSettings {
    /// Actions of the tenant running at once (an Execute, a durable attempt). Default none:
    /// only the server's limits.
    pub max_concurrent: Option<usize>,
    /// Sends of the tenant, every attempt counted. Default none.
    pub rate: Option<Rate>,
    /// Share of the running slots while tenants wait for them. Default 1.
    pub weight: u32,
    /// Actions of the tenant waiting for a running slot at once; one more is refused at once.
    /// Default none: only the server's `limits.max_queued`.
    pub max_queued: Option<usize>,
}

impl Default for TenantQuotaSettings {
    fn default() -> Self {
        Self { max_concurrent: None, rate: None, weight: 1, max_queued: None }
    }
}

/// The tenants' quotas of the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantSettings {
    /// Quotas of each tenant not in `named` (each its own concurrency and rate). Default none.
    pub default: TenantQuotaSettings,
    /// Quotas by tenant name; these names are also the tenants' metric labels. Default none.
    pub named: BTreeMap<String, TenantQuotaSettings>,
}

/// A tenant's rate quota needs a wait past the action's deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TenantQuotaError(pub String);

/// The quotas, shared by every action.
pub struct TenantQuotas {
    settings: TenantSettings,
    /// Each named tenant's rate quota, and the default's (keyed by tenant name: every tenant not
    /// named has its own bucket).
    rates: HashMap<String, KeyedRateLimit>,
    default_rate: Option<KeyedRateLimit>,
}

impl TenantQuotas {
    pub fn new(settings: &TenantSettings) -> Self {
        let rates = settings
            .named
            .iter()
            .filter_map(|(name, q)| {
                Some((name.clone(), KeyedRateLimit::new(format!("tenants.{name}"), q.rate?)))
            })
            .collect();
        let default_rate = settings.default.rate.map(|rate| KeyedRateLimit::new("tenants.default", rate));
        Self { settings: settings.clone(), rates, default_rate }
    }

    /// The quotas that hold for `tenant`, and the config section they come from.
    fn quota(&self, tenant: &str) -> (&TenantQuotaSettings, bool) {
        match self.settings.named.get(tenant) {
            Some(quota) => (quota, true),
            None => (&self.settings.default, false),
        }
    }

    /// The config section of `tenant`'s quotas: `tenants.NAME` or `tenants.default`.
    pub fn section(&self, tenant: &str) -> String {
        match self.quota(tenant) {
            (_, true) => format!("tenants.{tenant}"),
            (_, false) => "tenants.default".to_owned(),
        }
    }

    /// `tenant`'s share of the running slots; an action without a tenant has no cap.
    pub fn share(&self, tenant: Option<&str>) -> Share {
        let Some(tenant) = tenant else { return Share::FREE };
        let (quota, _) = self.quota(tenant);
        Share {
            cap: quota.max_concurrent.unwrap_or(usize::MAX).max(1),
            weight: quota.weight.max(1),
            max_queued: quota.max_queued.unwrap_or(usize::MAX),
        }
    }

    /// The rate quota that holds for `tenant`, if any.
    fn rate_of(&self, tenant: &str) -> Option<&KeyedRateLimit> {
        match self.rates.get(tenant) {
            Some(limit) => Some(limit),
            None if self.settings.named.contains_key(tenant) => None,
            None => self.default_rate.as_ref(),
        }
    }

    /// `tenant`'s rate quota as the fleet's bucket (`rate:tenant:NAME`): every replica takes
    /// from the one bucket, an unnamed tenant's default quota too (each tenant its own).
    pub fn shared_bucket(&self, tenant: &str) -> Option<SharedBucket> {
        let rate = self.rate_of(tenant)?.rate();
        Some(SharedBucket {
            rule: TENANT_RULE.into(),
            subject: tenant.to_owned(),
            interval: rate.interval(),
            burst: rate.burst.get(),
        })
    }

    /// Waits until `tenant` may send under its rate quota; returns the time waited, or fails at
    /// once when the wait would pass `deadline`.
    pub async fn acquire(&self, tenant: &str, deadline: Instant) -> Result<Duration, TenantQuotaError> {
        let Some(limit) = self.rate_of(tenant) else {
            return Ok(Duration::ZERO);
        };
        let started = Instant::now();
        match limit.wait(tenant, deadline).await {
            Ok(false) => Ok(Duration::ZERO),
            Ok(true) => Ok(started.elapsed()),
            Err(wait) => Err(TenantQuotaError(format!(
                "tenant {tenant:?} is over its rate quota {} ({}.rate): it needs a wait of {}, past the deadline",
                limit.rate(),
                limit.scope(),
                crate::fmt::fmt_duration(wait)
            ))),
        }
    }
}

/// Waits for the tenant's rate quota before an attempt (bounded by the action's deadline);
/// refuses with `TenantQuotaError` when the wait cannot fit. In a fleet the quota is a bucket
/// of the attempt's one shared check (`TenantQuotas::shared_bucket`, asked for by the breaker
/// layer, waited for by the rate-limit layer with the others), so this layer acts only when
/// that check fell back to this process's own limits.
#[derive(Clone)]
pub struct TenantQuota(pub Arc<TenantQuotas>);

impl Step for TenantQuota {
    type Held = ();

    fn before(&self, request: &mut AttemptRequest) -> Before<()> {
        // No tenant, no quota: the common path allocates nothing.
        let Some(tenant) = request.context.tenant.clone() else {
            return Before::Go(());
        };
        if let Some(checked) = &request.checked {
            if !checked.is(&Verdict::Local) {
                return Before::Go(());
            }
        }
        let (quotas, deadline) = (self.0.clone(), request.context.deadline);
        Before::Wait(Box::pin(async move {
            match quotas.acquire(&tenant, deadline).await {
                Ok(waited) if !waited.is_zero() => {
                    tracing::debug!(tenant = %tenant, waited = ?waited, "waited for the tenant's rate quota");
                    crate::metrics::tenant(Some(&tenant)).waited("rate");
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(refused) => {
                    crate::metrics::tenant(Some(&tenant)).refused("rate");
                    Err(refused.into())
                }
            }
        }))
    }
}

/// The tenant quotas as a layer of the attempt stack.
pub type TenantQuotaLayer = StepLayer<TenantQuota>;

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TenantSettings {
        let quota = |max: Option<usize>, rate: Option<&str>, weight| TenantQuotaSettings {
            max_concurrent: max,
            rate: rate.map(|r| r.parse().unwrap()),
            weight,
            max_queued: None,
        };
        TenantSettings {
            default: quota(Some(2), Some("1/m"), 1),
            named: [
                ("big".to_owned(), quota(None, Some("1/m burst 2"), 5)),
                ("free".to_owned(), quota(None, None, 1)),
            ]
            .into(),
        }
    }

    #[test]
    fn named_tenants_have_their_quotas_and_the_rest_the_default() {
        let quotas = TenantQuotas::new(&settings());
        assert_eq!(quotas.share(Some("big")), Share { weight: 5, ..Share::FREE });
        assert_eq!(quotas.share(Some("someone")), Share { cap: 2, ..Share::FREE });
        assert_eq!(quotas.share(None), Share::FREE);
        assert_eq!(quotas.section("big"), "tenants.big");
        assert_eq!(quotas.section("someone"), "tenants.default");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_quotas_are_per_tenant_and_a_wait_past_the_deadline_fails_at_once() {
        let quotas = TenantQuotas::new(&settings());
        let soon = Instant::now() + Duration::from_secs(5);
        // big: a burst of 2, then a minute's wait.
        assert!(quotas.acquire("big", soon).await.is_ok());
        assert!(quotas.acquire("big", soon).await.is_ok());
        let err = quotas.acquire("big", soon).await.unwrap_err();
        assert!(
            err.0.contains("tenant \"big\"") && err.0.contains("1/m burst 2 (tenants.big.rate)"),
            "{err}"
        );
        // Unknown tenants each have their own default bucket; "free" has no rate quota.
        assert!(quotas.acquire("x", soon).await.is_ok());
        assert!(quotas.acquire("y", soon).await.is_ok());
        let err = quotas.acquire("x", soon).await.unwrap_err();
        assert!(err.0.contains("(tenants.default.rate)"), "{err}");
        for _ in 0..10 {
            assert_eq!(quotas.acquire("free", soon).await.unwrap(), Duration::ZERO);
        }
        // A wait that fits is slept.
        let later = Instant::now() + Duration::from_secs(120);
        assert!(quotas.acquire("x", later).await.unwrap() >= Duration::from_secs(50));
    }

    #[tokio::test(start_paused = true)]
    async fn the_layer_refuses_without_calling_inner_and_passes_actions_without_a_tenant() {
        use crate::client::attempt::tests::{request, Harness};
        let quotas = Arc::new(TenantQuotas::new(&settings()));
        let mut layer = Harness::new(StepLayer(TenantQuota(quotas)));
        let of = |tenant: Option<&str>| {
            let mut request = request("http://h/", Duration::from_secs(5));
            if let Some(context) = Arc::get_mut(&mut request.context) {
                context.tenant = tenant.map(Arc::from);
            }
            request
        };
        for tenant in [Some("t"), None, None] {
            let call = layer.send(of(tenant)).await;
            layer.answer(200).await;
            assert!(call.await.unwrap().is_ok());
        }
        let err = layer.send(of(Some("t"))).await.await.unwrap().unwrap_err();
        assert!(err.is::<TenantQuotaError>(), "{err}");
        assert!(err.to_string().contains("tenant \"t\" is over its rate quota"), "{err}");
        assert!(layer.nothing_more_sent().await, "nothing was sent");
    }
}
