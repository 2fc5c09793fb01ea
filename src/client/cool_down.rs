//! The shared cool-down a destination asks for with 429 + Retry-After: every action to it waits
//! that long (capped by `limits.max_host_cool_down`) before its next attempt. The `CoolDown`
//! layer waits out a running cool-down before an attempt and starts one from the 429s it sees.
//! With a shared backend the fleet's cool-down (in the attempt's fleet check) is waited out too,
//! and a 429 here cools the destination down for every replica.
use super::{
    attempt::{AttemptContext, Next, Reply, Step, StepLayer},
    shared::{Checked, SharedAdmission, Verdict},
};
use crate::action::parse_retry_after;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use tower::ServiceExt as _;

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

    /// Waits out `key`'s cool-down, or refuses at once when it ends after `deadline`. Returns
    /// the time waited.
    pub async fn wait(&self, key: &str, deadline: Instant) -> Result<Duration, CoolDownError> {
        let Some(until) = self.until(key) else {
            return Ok(Duration::ZERO);
        };
        let now = Instant::now();
        if until > deadline {
            return Err(CoolDownError(format!(
                "{key} asked callers to back off (429 Retry-After) for {} more, past the deadline",
                crate::fmt::fmt_duration(until.saturating_duration_since(now))
            )));
        }
        tokio::time::sleep_until(until.into()).await;
        Ok(now.elapsed())
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
#[derive(Clone)]
pub struct CoolDown {
    pub cool_downs: Arc<CoolDowns>,
    pub shared: Option<Arc<SharedAdmission>>,
}

impl CoolDown {
    /// This process's cool-downs only.
    pub fn local(cool_downs: Arc<CoolDowns>) -> Self {
        Self { cool_downs, shared: None }
    }
}

impl Step for CoolDown {
    async fn around<S: Next<B>, B: Send + 'static>(self, mut request: Request<Bytes>, next: S) -> Reply<B> {
        let context = AttemptContext::of(&request)?;
        let (to, deadline, watch_429) =
            (context.destination.clone(), context.deadline, context.cool_down_on_429);
        // The fleet's cool-down (read by the breaker layer just now) refuses before any wait.
        let shared_until = match request.extensions().get::<Checked>() {
            Some(Checked(Verdict::CoolingDown(left))) => Some(Instant::now() + *left),
            _ => None,
        };
        if let Some(until) = shared_until {
            fits_shared(&to.key, until, deadline)?;
        }
        let mut waited = self.cool_downs.wait(&to.key, deadline).await?;
        if let Some(until) = shared_until {
            let now = Instant::now();
            tokio::time::sleep_until(until.into()).await;
            waited += now.elapsed();
            // Nothing was taken while the mark was set: the rate-limit layer asks again.
            request.extensions_mut().remove::<Checked>();
        }
        if !waited.is_zero() {
            // A cool-down is a rate limit the host set: counted with them.
            crate::metrics::rate_limit_waited(&to.key, waited);
        }
        let response = next.oneshot(request).await.map_err(Into::into)?;
        if watch_429 && response.status() == StatusCode::TOO_MANY_REQUESTS {
            if let Some(wait) = retry_after(&response) {
                self.cool_downs.cool_down(&to.key, wait);
                if let Some(shared) = &self.shared {
                    shared.backend().cool_down(&to.key, wait.min(self.cool_downs.max()));
                }
            }
        }
        Ok(response)
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
    use crate::client::attempt::tests::request;
    use tower::{Layer as _, Service as _};

    #[tokio::test(start_paused = true)]
    async fn a_429_cools_the_destination_down_for_every_action() {
        let cool_downs = Arc::new(CoolDowns::new(Duration::from_secs(600)));
        let (mock, mut handle) = tower_test::mock::pair::<Request<Bytes>, Response<()>>();
        let mut service = StepLayer(CoolDown::local(cool_downs.clone())).layer(mock);
        let first = tokio::spawn(service.call(request("http://h/", Duration::from_secs(60))));
        let (_, reply) = handle.next_request().await.unwrap();
        let too_many = Response::builder().status(429).header("retry-after", "5").body(()).unwrap();
        reply.send_response(too_many);
        assert_eq!(first.await.unwrap().unwrap().status(), 429);

        // The next action to h waits the 5 s out before it is sent; another host does not.
        let started = tokio::time::Instant::now();
        let second = tokio::spawn(service.call(request("http://h/", Duration::from_secs(60))));
        let (_, reply) = handle.next_request().await.unwrap();
        assert_eq!(started.elapsed().as_secs(), 5, "waited out (the paused clock rounds to the ms)");
        reply.send_response(Response::new(()));
        second.await.unwrap().unwrap();
        let started = tokio::time::Instant::now();
        let other = tokio::spawn(service.call(request("http://other/", Duration::from_secs(60))));
        let (_, reply) = handle.next_request().await.unwrap();
        assert_eq!(started.elapsed(), Duration::ZERO);
        reply.send_response(Response::new(()));
        other.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cool_down_past_the_deadline_refuses_at_once_and_is_capped() {
        let cool_downs = Arc::new(CoolDowns::new(Duration::from_secs(30)));
        cool_downs.cool_down("h:80", Duration::from_secs(3600));
        let (mock, mut handle) = tower_test::mock::pair::<Request<Bytes>, Response<()>>();
        let mut service = StepLayer(CoolDown::local(cool_downs.clone())).layer(mock);
        let err = service.call(request("http://h/", Duration::from_secs(10))).await.unwrap_err();
        assert!(err.is::<CoolDownError>() && err.to_string().contains("429"), "{err}");
        // Capped at 30 s: a deadline past it waits.
        let started = tokio::time::Instant::now();
        let waits = tokio::spawn(service.call(request("http://h/", Duration::from_secs(40))));
        let (_, reply) = handle.next_request().await.unwrap();
        assert_eq!(started.elapsed().as_secs(), 30, "waited out (the paused clock rounds to the ms)");
        reply.send_response(Response::new(()));
        waits.await.unwrap().unwrap();
    }
}
