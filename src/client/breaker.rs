//! Circuit breaking per destination: after `failure_threshold` consecutive failures (connect
//! errors, timeouts, 5xx) the circuit opens and actions to that host fail CIRCUIT_OPEN without
//! sending; after `cool_down` one probe goes through (half-open), and its result closes the
//! circuit again or re-opens it. With a shared backend (`shared`) the layer also makes the
//! attempt's one fleet check: another replica's open circuit refuses here too, and this
//! replica's opens and closes are told to the fleet.
use super::{
    attempt::{AttemptContext, AttemptRequest, Before, Reply, Step, StepLayer},
    error::SendFailure,
    shared::{Checked, FleetBacked, SharedAdmission, Verdict},
    timeout::TimeoutError,
};
use crate::action::ErrorKind;
use http::Response;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tower::BoxError;

/// How an attempt went, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// The host answered below 500.
    Healthy,
    /// Connect error, timeout, or a 5xx answer.
    Failing,
    /// Says nothing about the host (e.g. the caller went away, a bad certificate).
    Unknown,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe was let through at `since`; another goes only after a further cool-down.
    HalfOpen {
        since: Instant,
    },
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BreakerError(pub String);

/// What a recorded attempt did to its destination's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// It opened (or re-opened) for this long.
    Opened(Duration),
    /// The probe succeeded: it closed.
    Closed,
}

/// Closed circuits with no recent failure are forgotten past this many tracked destinations.
const PRUNE_ABOVE: usize = 10_000;

/// The breakers of every destination.
pub struct CircuitBreakers {
    /// Consecutive failures that open a circuit (`limits.breaker_failures`); 0 is off.
    failure_threshold: u32,
    /// How long an open circuit refuses before a probe (`limits.breaker_cool_down`).
    cool_down: Duration,
    hosts: Mutex<HashMap<String, State>>,
}

impl CircuitBreakers {
    pub fn new(failure_threshold: u32, cool_down: Duration) -> Self {
        Self { failure_threshold, cool_down, hosts: Mutex::default() }
    }

    /// Whether an action may go to `key` now. An open circuit whose cool-down is over lets
    /// this one through as the probe.
    pub fn check(&self, key: &str) -> Result<(), BreakerError> {
        if self.failure_threshold == 0 {
            return Ok(());
        }
        let Ok(mut hosts) = self.hosts.lock() else {
            return Ok(());
        };
        let Some(state) = hosts.get_mut(key) else {
            return Ok(());
        };
        let now = Instant::now();
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now >= until => {
                *state = State::HalfOpen { since: now };
                tracing::info!(destination = %key, "circuit half-open: letting one probe through");
                Ok(())
            }
            State::Open { until } => Err(BreakerError(format!(
                "circuit for {key} is open after {} consecutive failures; next probe in {}",
                self.failure_threshold,
                crate::fmt::fmt_duration(until - now)
            ))),
            // The probe never reported (its caller went away): let another one go.
            State::HalfOpen { since } if now >= since + self.cool_down => {
                *state = State::HalfOpen { since: now };
                Ok(())
            }
            State::HalfOpen { .. } => {
                Err(BreakerError(format!("circuit for {key} is half-open and a probe is in flight")))
            }
        }
    }

    /// Records how an attempt to `key` went; says when that opened or closed its circuit.
    pub fn record(&self, key: &str, health: Health) -> Option<Transition> {
        if self.failure_threshold == 0 || health == Health::Unknown {
            return None;
        }
        let Ok(mut hosts) = self.hosts.lock() else {
            return None;
        };
        if health == Health::Healthy {
            if let Some(State::HalfOpen { .. } | State::Open { .. }) = hosts.remove(key) {
                tracing::info!(destination = %key, "circuit closed: the probe succeeded");
                crate::metrics::circuit(key, false);
                return Some(Transition::Closed);
            }
            return None;
        }
        if hosts.len() > PRUNE_ABOVE {
            hosts.retain(|_, state| !matches!(state, State::Closed { .. }));
        }
        let now = Instant::now();
        let open = State::Open { until: now + self.cool_down };
        let state = hosts.entry(key.to_owned()).or_insert(State::Closed { failures: 0 });
        let opened = Some(Transition::Opened(self.cool_down));
        match *state {
            State::Closed { failures } if failures + 1 >= self.failure_threshold => {
                *state = open;
                tracing::warn!(destination = %key, failures = failures + 1, "circuit opened");
                crate::metrics::circuit(key, true);
                opened
            }
            State::Closed { failures } => {
                *state = State::Closed { failures: failures + 1 };
                None
            }
            State::HalfOpen { .. } => {
                *state = open;
                tracing::warn!(destination = %key, "circuit re-opened: the probe failed");
                opened
            }
            State::Open { .. } => None,
        }
    }
}

/// Refuses attempts to a destination whose circuit is open; records how each attempt that ran
/// went (by its status when it got one, else by its error) when its response head arrives.
/// With a shared backend it makes the attempt's fleet check (after its own, so a circuit open
/// here costs no round trip) and leaves the verdict beside the request for the layers below.
pub type Breaker = FleetBacked<CircuitBreakers>;

impl Step for FleetBacked<CircuitBreakers> {
    /// The breakers, the context (its destination) to record the attempt against, and the
    /// fleet to tell of a circuit this attempt opens or closes.
    type Held = (Arc<CircuitBreakers>, Arc<AttemptContext>, Option<Arc<SharedAdmission>>);

    fn before(&self, request: &mut AttemptRequest) -> Before<Self::Held> {
        if let Err(refused) = self.local.check(&request.context.destination.key) {
            return Before::Refuse(refused.into());
        }
        let held = (self.local.clone(), request.context.clone(), self.shared.clone());
        let Some(shared) = &self.shared else {
            return Before::Go(held);
        };
        let checked = Arc::new(Checked::default());
        request.checked = Some(checked.clone());
        let (shared, context) = (shared.clone(), request.context.clone());
        Before::Wait(Box::pin(async move {
            let buckets = shared.buckets(&context);
            let key = &context.destination.key;
            let verdict = shared.check(key, &buckets, context.deadline).await;
            if let Verdict::CircuitOpen(left) = verdict {
                return Err(BreakerError(format!(
                    "circuit for {key} was opened by another replica of the fleet; next probe in {}",
                    crate::fmt::fmt_duration(left)
                ))
                .into());
            }
            checked.set(verdict);
            Ok(held)
        }))
    }

    fn after<B>((breakers, context, shared): Self::Held, reply: Reply<B>) -> Reply<B> {
        let key = &context.destination.key;
        let transition = breakers.record(key, health_of(&reply));
        if let (Some(shared), Some(transition)) = (shared, transition) {
            match transition {
                Transition::Opened(open_for) => shared.backend().circuit_opened(key, open_for),
                Transition::Closed => shared.backend().circuit_closed(key),
            }
        }
        reply
    }
}

/// The breaker as a layer of the attempt stack.
pub type BreakerLayer = StepLayer<Breaker>;

/// How an attempt speaks of its destination's health: a status below 500 is healthy, 5xx,
/// connect errors and timeouts are failing; anything else (a refusal by a later limit, a bad
/// certificate) says nothing.
fn health_of<B>(result: &Result<Response<B>, BoxError>) -> Health {
    match result {
        Ok(response) if response.status().is_server_error() => Health::Failing,
        Ok(_) => Health::Healthy,
        Err(e) if e.is::<TimeoutError>() => Health::Failing,
        Err(e) => match e.downcast_ref::<SendFailure>() {
            Some(f) if matches!(f.kind, ErrorKind::Connect | ErrorKind::Timeout) => Health::Failing,
            _ => Health::Unknown,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::attempt::tests::Harness;

    fn breakers(threshold: u32, cool_down_ms: u64) -> CircuitBreakers {
        CircuitBreakers::new(threshold, Duration::from_millis(cool_down_ms))
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = breakers(3, 60_000);
        b.record("h:80", Health::Failing);
        b.record("h:80", Health::Failing);
        b.record("h:80", Health::Healthy); // resets the count
        b.record("h:80", Health::Failing);
        b.record("h:80", Health::Failing);
        b.record("h:80", Health::Unknown);
        assert!(b.check("h:80").is_ok());
        b.record("h:80", Health::Failing);
        let err = b.check("h:80").unwrap_err();
        assert!(err.0.contains("3 consecutive failures"), "{err}");
        assert!(b.check("other:80").is_ok(), "per destination");
    }

    #[test]
    fn half_open_lets_one_probe_then_closes_or_reopens() {
        let b = breakers(1, 30);
        b.record("h:80", Health::Failing);
        assert!(b.check("h:80").is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.check("h:80").is_ok(), "the probe");
        assert!(b.check("h:80").is_err(), "only one probe");
        b.record("h:80", Health::Failing);
        assert!(b.check("h:80").is_err(), "re-opened");
        std::thread::sleep(Duration::from_millis(40));
        assert!(b.check("h:80").is_ok());
        b.record("h:80", Health::Healthy);
        assert!(b.check("h:80").is_ok() && b.check("h:80").is_ok(), "closed");
    }

    #[test]
    fn zero_threshold_turns_it_off() {
        let b = breakers(0, 60_000);
        for _ in 0..100 {
            b.record("h:80", Health::Failing);
        }
        assert!(b.check("h:80").is_ok());
    }

    #[tokio::test]
    async fn the_layer_records_the_outcome_and_refuses_an_open_circuit_at_once() {
        let total = Duration::from_secs(5);
        let mut layer = Harness::new(StepLayer(Breaker::local(Arc::new(breakers(2, 60_000)))));
        // A 5xx is a response, and a failure for the breaker.
        assert_eq!(layer.exchange("http://h/", total, 503).await.unwrap().status(), 503);
        let call = layer.start("http://h/", total).await;
        let (_, reply) = layer.handle.next_request().await.unwrap();
        reply.send_error(SendFailure::new(ErrorKind::Connect, "refused", false));
        assert!(call.await.unwrap().is_err());
        let err = layer.refused("http://h/", total).await;
        assert!(err.is::<BreakerError>(), "{err}");
        assert!(err.to_string().contains("open after 2 consecutive failures"), "{err}");
        assert!(layer.nothing_more_sent().await, "the refused attempt sent nothing");
    }
}
