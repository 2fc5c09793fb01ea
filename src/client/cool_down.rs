//! The shared cool-down a destination asks for with 429 + Retry-After: every action to it waits
//! that long (capped by `limits.max_host_cool_down`) before its next attempt. The `CoolDown`
//! layer waits out a running cool-down before an attempt and starts one from the 429s it sees.
//! With a shared backend the fleet's cool-down (in the attempt's fleet check) is waited out too,
//! and a 429 here cools the destination down for every replica.
use super::{
    attempt::{AttemptContext, AttemptRequest, Before, Reply, Step, StepLayer},
    shared::{FleetBacked, SharedAdmission},
};
use crate::action::parse_retry_after;
use http::{header, Response, StatusCode};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

/// A cool-down runs past the action's deadline: the attempt is refused without a wait.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CoolDownError(pub String);

/// Cooled-down destinations are pruned past this many.
const PRUNE_ABOVE: usize = 10_000;

/// The running cool-downs of every destination, shared by every action.
#[derive(Debug)]
pub struct CoolDowns {
    until: Mutex<HashMap<String, Instant>>,
    max: Duration,
}

impl CoolDowns {
    /// Cool-downs capped at `max`.
    pub fn new(max: Duration) -> Self {
        Self { until: Mutex::default(), max }
    }

    /// The longest cool-down a 429 may impose.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// `key` answered 429 with Retry-After `wait`: every action to it waits that long (capped).
    pub fn cool_down(&self, key: &str, wait: Duration) {
        let wait = wait.min(self.max);
        let now = Instant::now();
        let Ok(mut cool_downs) = self.until.lock() else {
            return;
        };
        if cool_downs.len() > PRUNE_ABOVE {
            cool_downs.retain(|_, until| *until > now);
        }
        let entry = cool_downs.entry(key.to_owned()).or_insert(now + wait);
        *entry = (*entry).max(now + wait);
        tracing::info!(destination = %key, wait = %crate::fmt::fmt_duration(wait), "host asked to back off; cooling down for every action");
    }

    /// When `key`'s cool-down ends, if it has one still running.
    fn until(&self, key: &str) -> Option<Instant> {
        let mut cool_downs = self.until.lock().ok()?;
        let until = *cool_downs.get(key)?;
        if until <= Instant::now() {
            cool_downs.remove(key);
            return None;
        }
        Some(until)
    }

    /// When an attempt to `key` may go: now (`None`), at the end of its running cool-down, or
    /// never before `deadline` (refused at once).
    pub fn check(&self, key: &str, deadline: Instant) -> Result<Option<Instant>, CoolDownError> {
        let Some(until) = self.until(key) else {
            return Ok(None);
        };
        if until > deadline {
            return Err(CoolDownError(format!(
                "{key} asked callers to back off (429 Retry-After) for {} more, past the deadline",
                crate::fmt::fmt_duration(until.saturating_duration_since(Instant::now()))
            )));
        }
        Ok(Some(until))
    }
}

/// The fleet's cool-down of `key` runs until `until`: refused when that is past `deadline`.
fn fits_shared(key: &str, until: Instant, deadline: Instant) -> Result<(), CoolDownError> {
    if until <= deadline {
        return Ok(());
    }
    Err(CoolDownError(format!(
        "{key} asked callers to back off (429 Retry-After, seen by another replica of the fleet) for {} more, past the deadline",
        crate::fmt::fmt_duration(until.saturating_duration_since(Instant::now()))
    )))
}

/// Waits out the destination's cool-down before the attempt; a 429 (that fails the action) with
/// a Retry-After starts one for every action (every replica's, with a shared backend).
pub type CoolDown = FleetBacked<CoolDowns>;

impl Step for FleetBacked<CoolDowns> {
    /// Where to start a cool-down when the reply is a 429: only for actions that fail on one.
    type Held = Option<(Arc<CoolDowns>, Arc<AttemptContext>, Option<Arc<SharedAdmission>>)>;

    fn before(&self, request: &mut AttemptRequest) -> Before<Self::Held> {
        let context = &request.context;
        let key = &context.destination.key;
        let held =
            context.cool_down_on_429.then(|| (self.local.clone(), context.clone(), self.shared.clone()));
        // The fleet's cool-down (read by the breaker layer just now) refuses before any wait.
        let checked = request.checked.as_ref();
        let shared_until = checked.and_then(|c| c.cooling_down()).map(|left| Instant::now() + left);
        if let Some(until) = shared_until {
            if let Err(refused) = fits_shared(key, until, context.deadline) {
                return Before::Refuse(refused.into());
            }
            // Nothing was taken while the mark was set: the rate-limit layer asks again.
            let _ = checked.and_then(|c| c.take());
        }
        match self.local.check(key, context.deadline) {
            Ok(local) => {
                let Some(until) = local.max(shared_until) else {
                    return Before::Go(held);
                };
                let context = context.clone();
                Before::Wait(Box::pin(async move {
                    let waited = Instant::now();
                    tokio::time::sleep_until(until.into()).await;
                    // A cool-down is a rate limit the host set: counted with them.
                    crate::metrics::rate_limit_waited(&context.destination.key, waited.elapsed());
                    Ok(held)
                }))
            }
            Err(refused) => Before::Refuse(refused.into()),
        }
    }

    fn after<B>(held: Self::Held, reply: Reply<B>) -> Reply<B> {
        if let (Some((cool_downs, context, shared)), Ok(response)) = (held, &reply) {
            if response.status() == StatusCode::TOO_MANY_REQUESTS {
                if let Some(wait) = retry_after(response) {
                    cool_downs.cool_down(&context.destination.key, wait);
                    if let Some(shared) = shared {
                        shared.backend().cool_down(&context.destination.key, wait.min(cool_downs.max()));
                    }
                }
            }
        }
        reply
    }
}

/// The cool-down as a layer of the attempt stack.
pub type CoolDownLayer = StepLayer<CoolDown>;

fn retry_after<B>(response: &Response<B>) -> Option<Duration> {
    let value = response.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::Harness;

    /// How long an attempt to `url` waited before it was sent (answered 200).
    async fn waited_before_sending<S>(layer: &mut Harness<S>, url: &str, total: Duration) -> Duration
    where
        S: tower::Service<AttemptRequest, Response = Response<()>, Error = tower::BoxError>,
        S::Future: Send + 'static,
    {
        let started = tokio::time::Instant::now();
        let call = layer.start(url, total).await;
        let (_, reply) = layer.handle.next_request().await.unwrap();
        let waited = started.elapsed();
        reply.send_response(Response::new(()));
        call.await.unwrap().unwrap();
        waited
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_cools_the_destination_down_for_every_action() {
        let minute = Duration::from_secs(60);
        let mut layer =
            Harness::new(StepLayer(CoolDown::local(Arc::new(CoolDowns::new(Duration::from_secs(600))))));
        let first = layer.start("http://h/", minute).await;
        let (_, reply) = layer.handle.next_request().await.unwrap();
        reply.send_response(Response::builder().status(429).header("retry-after", "5").body(()).unwrap());
        assert_eq!(first.await.unwrap().unwrap().status(), 429);
        // The next action to h waits the 5 s out before it is sent (the paused clock rounds to
        // the ms); another host does not.
        assert_eq!(waited_before_sending(&mut layer, "http://h/", minute).await.as_secs(), 5);
        assert_eq!(waited_before_sending(&mut layer, "http://other/", minute).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cool_down_past_the_deadline_refuses_at_once_and_is_capped() {
        let cool_downs = Arc::new(CoolDowns::new(Duration::from_secs(30)));
        cool_downs.cool_down("h:80", Duration::from_secs(3600));
        let mut layer = Harness::new(StepLayer(CoolDown::local(cool_downs)));
        let err = layer.refused("http://h/", Duration::from_secs(10)).await;
        assert!(err.is::<CoolDownError>() && err.to_string().contains("429"), "{err}");
        // Capped at 30 s: a deadline past it waits.
        assert_eq!(
            waited_before_sending(&mut layer, "http://h/", Duration::from_secs(40)).await.as_secs(),
            30
        );
    }
}
