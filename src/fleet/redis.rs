//! The Redis backend of the fleet's shared limits: one multiplexed connection per process, one
//! EVALSHA per check (EVAL when Redis answers NOSCRIPT, after a restart or SCRIPT FLUSH), marks
//! written fire-and-forget. Unreachable or slow: each check answers at once as the policy says
//! (`Unavailable`), the outage is logged once and counted, and a background task reconnects
//! with backoff; a check never waits past `fleet.timeout` nor the action's deadline.
use super::{endpoint, FleetError, FleetSettings, Keys, Unavailable};
use crate::client::shared::{CheckFuture, FleetSlot, Hold, HoldFuture, SharedBucket, SharedLimits, Verdict};
use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, FromRedisValue, IntoConnectionInfo, Script};
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock, Weak,
    },
    time::{Duration, Instant},
};
use tokio::sync::Notify;

const CHECK: &str = include_str!("check.lua");
const MARK: &str = include_str!("mark.lua");
const HOLD: &str = include_str!("hold.lua");
const RENEW: &str = include_str!("renew.lua");

/// Reconnect backoff: doubling from the first to the last, with up to half again of jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const LAST_BACKOFF: Duration = Duration::from_secs(2);

/// The fleet's limits in Redis. Cheap to share: every clone is the one connection.
#[derive(Clone)]
pub struct RedisLimits {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    settings: FleetSettings,
    keys: Keys,
    /// `host:port` (never the URL: it may carry a password).
    endpoint: String,
    /// `None` while unreachable: checks then answer without a round trip. Numbered, so a late
    /// failure on a connection already replaced does not drop its successor.
    connection: RwLock<Option<(u64, MultiplexedConnection)>>,
    /// The number of the last connection made.
    generation: AtomicU64,
    /// In an outage (logged and counted once, at its start).
    down: AtomicBool,
    /// Wakes the reconnect task when the connection is lost.
    wake: Arc<Notify>,
    check: Script,
    mark: Script,
    hold: Script,
    renew: Script,
}

impl RedisLimits {
    /// Connects to `settings.redis_url`, waiting at most `connect_timeout` for it. Unreachable,
    /// it starts all the same (the policy answers until Redis is back); a background task keeps
    /// reconnecting. Fails only on a bad URL.
    pub async fn start(settings: FleetSettings) -> Result<Self, FleetError> {
        super::check_url(&settings.redis_url).map_err(|e| FleetError(format!("fleet.redis_url {e}")))?;
        // No Nagle: the connection is multiplexed, and a check written while another's bytes
        // are unacknowledged must not wait for a delayed ACK.
        let info = settings
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(|e| FleetError(format!("fleet.redis_url: {e}")))?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(info).map_err(|e| FleetError(format!("fleet.redis_url: {e}")))?;
        let inner = Arc::new(Inner {
            client,
            keys: Keys::new(&settings.key_prefix),
            endpoint: endpoint(&settings.redis_url),
            connection: RwLock::new(None),
            generation: AtomicU64::new(0),
            down: AtomicBool::new(false),
            wake: Arc::new(Notify::new()),
            check: Script::new(CHECK),
            mark: Script::new(MARK),
            hold: Script::new(HOLD),
            renew: Script::new(RENEW),
            settings,
        });
        match inner.connect().await {
            Ok(connection) => inner.connected(connection),
            Err(e) => inner.outage(&e),
        }
        tokio::spawn(reconnect(Arc::downgrade(&inner), inner.wake.clone()));
        Ok(Self { inner })
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.inner.connection().is_some()
    }
}

impl Inner {
    fn connection(&self) -> Option<(u64, MultiplexedConnection)> {
        self.connection.read().ok()?.clone()
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let config = AsyncConnectionConfig::new().set_connection_timeout(Some(self.settings.connect_timeout));
        let connect = async {
            let mut connection = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| e.to_string())?;
            // An answer, not just a socket: a Redis still loading or wanting AUTH fails here.
            redis::cmd("PING").query_async::<String>(&mut connection).await.map_err(|e| e.to_string())?;
            Ok(connection)
        };
        tokio::time::timeout(self.settings.connect_timeout, connect)
            .await
            .unwrap_or_else(|_| Err(format!("no connection within {:?}", self.settings.connect_timeout)))
    }

    fn connected(&self, connection: MultiplexedConnection) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        if let Ok(mut slot) = self.connection.write() {
            *slot = Some((generation, connection));
        }
        crate::metrics::fleet_redis_up(true);
        if self.down.swap(false, Ordering::SeqCst) {
            tracing::info!(redis = %self.endpoint, "fleet: Redis reachable again; limits are the fleet's");
        }
    }

    /// Connection number `generation` failed (`why`): dropped, and the reconnect task woken.
    /// A failure on a connection already replaced changes nothing.
    fn lost(&self, generation: u64, why: &str) {
        if let Ok(mut slot) = self.connection.write() {
            if !matches!(&*slot, Some((current, _)) if *current == generation) {
                return;
            }
            *slot = None;
        }
        self.outage(why);
        self.wake.notify_one();
    }

    /// Logs and counts an outage once, at its start.
    fn outage(&self, why: &str) {
        crate::metrics::fleet_redis_up(false);
        if self.down.swap(true, Ordering::SeqCst) {
            return;
        }
        crate::metrics::fleet_redis_unavailable();
        let then = match self.settings.unavailable {
            Unavailable::Local => "each replica's own limits apply until it is back",
            Unavailable::Deny => "actions are refused (RATE_LIMITED) until it is back",
        };
        tracing::warn!(redis = %self.endpoint, error = %why, "fleet: Redis unreachable; {then}");
    }

    /// The answer without Redis, as the policy says.
    fn fallback(&self) -> Verdict {
        match self.settings.unavailable {
            Unavailable::Local => {
                crate::metrics::fleet_fallback("local");
                Verdict::Local
            }
            Unavailable::Deny => {
                crate::metrics::fleet_fallback("deny");
                Verdict::Denied
            }
        }
    }

    async fn check(&self, destination: Option<&str>, buckets: &[SharedBucket], deadline: Instant) -> Verdict {
        if destination.is_none() && buckets.is_empty() {
            return Verdict::Allowed;
        }
        let Some((generation, mut connection)) = self.connection() else {
            return self.fallback();
        };
        let mut keys = Vec::with_capacity(2 + buckets.len());
        if let Some(destination) = destination {
            keys.push(self.keys.circuit(destination));
            keys.push(self.keys.cool_down(destination));
        }
        let mut args = Vec::with_capacity(1 + 2 * buckets.len());
        args.push(keys.len() as u64);
        for bucket in buckets {
            keys.push(self.keys.bucket(bucket));
            let interval = u64::try_from(bucket.interval.as_micros()).unwrap_or(u64::MAX).max(1);
            args.push(interval);
            args.push(interval.saturating_mul(u64::from(bucket.burst.saturating_sub(1))));
        }
        // Never past the action's deadline; a timeout that is the deadline's says nothing of Redis.
        let budget = self.settings.timeout.min(deadline.saturating_duration_since(Instant::now()));
        let started = Instant::now();
        let reply = tokio::time::timeout(
            budget,
            self.eval::<Vec<i64>>(&self.check, CHECK, &keys, &args, &mut connection),
        );
        match reply.await {
            Ok(Ok(reply)) => {
                crate::metrics::fleet_check(started.elapsed());
                match verdict_of(&reply) {
                    Some(verdict) => verdict,
                    None => {
                        self.lost(generation, &format!("unexpected reply {reply:?} to the check script"));
                        self.fallback()
                    }
                }
            }
            Ok(Err(e)) => {
                self.lost(generation, &e.to_string());
                self.fallback()
            }
            Err(_) if budget < self.settings.timeout => self.fallback(),
            Err(_) => {
                self.lost(
                    generation,
                    &format!("no answer within fleet.timeout ({:?})", self.settings.timeout),
                );
                self.fallback()
            }
        }
    }

    /// One of `tenant`'s running places (see `hold.lua`), its lease renewed until the slot is
    /// dropped; one round trip, bounded like a check.
    async fn hold(self: &Arc<Self>, tenant: &str, quota: usize, deadline: Instant) -> Hold {
        let Some((generation, mut connection)) = self.connection() else {
            return self.hold_fallback();
        };
        let key = self.keys.running(tenant);
        let holder = fastrand::u64(..);
        let lease = millis(self.settings.concurrency_lease);
        let args = [holder, u64::try_from(quota).unwrap_or(u64::MAX), lease];
        let budget = self.settings.timeout.min(deadline.saturating_duration_since(Instant::now()));
        let keys = [key];
        let reply = tokio::time::timeout(
            budget,
            self.eval::<Vec<i64>>(&self.hold, HOLD, &keys, &args, &mut connection),
        )
        .await;
        let [key] = keys;
        let failed = match reply {
            Ok(Ok(reply)) => match reply[..] {
                [1, _] => {
                    let renewing = tokio::spawn(renew(self.clone(), key.clone(), holder));
                    return Hold::Held(FleetSlot(Box::new(Held {
                        inner: self.clone(),
                        key,
                        holder,
                        renewing,
                    })));
                }
                [0, _] => return Hold::Full,
                _ => format!("unexpected reply {reply:?} to the hold script"),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) if budget < self.settings.timeout => String::new(),
            Err(_) => format!("no answer within fleet.timeout ({:?})", self.settings.timeout),
        };
        // The script may have run all the same: the place is given back, should it be held.
        self.release(key, holder);
        if !failed.is_empty() {
            self.lost(generation, &failed);
        }
        self.hold_fallback()
    }

    fn hold_fallback(&self) -> Hold {
        match self.fallback() {
            Verdict::Denied => Hold::Denied,
            _ => Hold::Local,
        }
    }

    /// Gives back `holder`'s place in `key`, off the action's way.
    fn release(&self, key: String, holder: u64) {
        let (Some((_, mut connection)), Ok(runtime)) =
            (self.connection(), tokio::runtime::Handle::try_current())
        else {
            // Unreachable: the lease ends on its own.
            return;
        };
        let timeout = self.settings.timeout;
        runtime.spawn(async move {
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(&key).arg(holder);
            let _ = tokio::time::timeout(timeout, zrem.query_async::<i64>(&mut connection)).await;
        });
    }

    /// Runs `script` by its hash; sends its source when Redis does not know it (after a
    /// restart or SCRIPT FLUSH), which also caches it for the next EVALSHA.
    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        source: &str,
        keys: &[String],
        args: &[u64],
        connection: &mut MultiplexedConnection,
    ) -> redis::RedisResult<T> {
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(script.get_hash()).arg(keys.len()).arg(keys).arg(args);
        match evalsha.query_async(connection).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut eval = redis::cmd("EVAL");
                eval.arg(source).arg(keys.len()).arg(keys).arg(args);
                eval.query_async(connection).await
            }
            other => other,
        }
    }
}

/// The check script's reply `{code, microseconds, bucket}` as a verdict.
fn verdict_of(reply: &[i64]) -> Option<Verdict> {
    let micros = |n: i64| Duration::from_micros(u64::try_from(n).unwrap_or(0));
    match *reply {
        [0, _, _] => Some(Verdict::Allowed),
        [1, left, _] => Some(Verdict::CircuitOpen(micros(left))),
        [2, left, _] => Some(Verdict::CoolingDown(micros(left))),
        [3, wait, bucket] if bucket >= 1 => {
            Some(Verdict::Wait { bucket: usize::try_from(bucket - 1).ok()?, wait: micros(wait) })
        }
        _ => None,
    }
}

fn millis(t: Duration) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A held place of a tenant's (`FleetSlot`): its renewal stops and the place is given back when
/// it is dropped.
struct Held {
    inner: Arc<Inner>,
    key: String,
    holder: u64,
    renewing: tokio::task::JoinHandle<()>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewing.abort();
        self.inner.release(std::mem::take(&mut self.key), self.holder);
    }
}

/// Renews `holder`'s lease in `key` every third of the lease, until aborted. A renewal that
/// fails leaves the action running: the place is at worst free for another replica early.
async fn renew(inner: Arc<Inner>, key: String, holder: u64) {
    let lease = inner.settings.concurrency_lease;
    let keys = [key];
    loop {
        tokio::time::sleep(lease / 3).await;
        let Some((generation, mut connection)) = inner.connection() else { continue };
        let args = [holder, millis(lease)];
        let renewal = inner.eval::<i64>(&inner.renew, RENEW, &keys, &args, &mut connection);
        match tokio::time::timeout(inner.settings.timeout, renewal).await {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => {
                tracing::warn!(key = %keys[0], "fleet: a running action's lease on its tenant's place was lost (Redis lost it, or it was not renewed in time)");
                return;
            }
            Ok(Err(e)) => inner.lost(generation, &e.to_string()),
            Err(_) => inner
                .lost(generation, &format!("no answer within fleet.timeout ({:?})", inner.settings.timeout)),
        }
    }
}

/// Keeps a connection up: waits until one is lost, then reconnects with backoff. Ends with
/// the backend.
async fn reconnect(inner: Weak<Inner>, wake: Arc<Notify>) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        if strong.connection().is_some() {
            drop(strong);
            wake.notified().await;
            backoff = FIRST_BACKOFF;
            continue;
        }
        match strong.connect().await {
            Ok(connection) => strong.connected(connection),
            Err(e) => {
                strong.outage(&e);
                drop(strong);
                tokio::time::sleep(backoff + backoff.mul_f64(fastrand::f64() / 2.0)).await;
                backoff = (backoff * 2).min(LAST_BACKOFF);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reconnect task waits on this; woken, it finds the backend gone and ends.
        self.wake.notify_one();
    }
}

impl RedisLimits {
    /// Writes `key` off the attempt's way: a mark lasting `ttl`, or (`None`) its removal. With
    /// Redis unreachable the write is dropped (the outage is logged already).
    fn write(&self, key: String, ttl: Option<Duration>) {
        let Some((generation, mut connection)) = self.inner.connection() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let inner = self.inner.clone();
        runtime.spawn(async move {
            let write = async {
                match ttl {
                    Some(ttl) => {
                        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
                        inner.eval::<i64>(&inner.mark, MARK, &[key], &[ms], &mut connection).await
                    }
                    None => redis::cmd("DEL").arg(&key).query_async::<i64>(&mut connection).await,
                }
            };
            match tokio::time::timeout(inner.settings.timeout, write).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => inner.lost(generation, &e.to_string()),
                Err(_) => inner.lost(
                    generation,
                    &format!("no answer within fleet.timeout ({:?})", inner.settings.timeout),
                ),
            }
        });
    }
}

impl SharedLimits for RedisLimits {
    fn check<'a>(
        &'a self,
        destination: Option<&'a str>,
        buckets: &'a [SharedBucket],
        deadline: Instant,
    ) -> CheckFuture<'a> {
        Box::pin(self.inner.check(destination, buckets, deadline))
    }

    fn cool_down(&self, destination: &str, wait: Duration) {
        self.write(self.inner.keys.cool_down(destination), Some(wait));
    }

    fn circuit_opened(&self, destination: &str, open_for: Duration) {
        self.write(self.inner.keys.circuit(destination), Some(open_for));
    }

    fn circuit_closed(&self, destination: &str) {
        self.write(self.inner.keys.circuit(destination), None);
    }

    fn hold<'a>(&'a self, tenant: &'a str, quota: usize, deadline: Instant) -> HoldFuture<'a> {
        Box::pin(self.inner.hold(tenant, quota, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_become_verdicts() {
        assert_eq!(verdict_of(&[0, 0, 0]), Some(Verdict::Allowed));
        assert_eq!(verdict_of(&[1, 1_500_000, 0]), Some(Verdict::CircuitOpen(Duration::from_millis(1500))));
        assert_eq!(verdict_of(&[2, 1000, 0]), Some(Verdict::CoolingDown(Duration::from_millis(1))));
        assert_eq!(
            verdict_of(&[3, 250, 2]),
            Some(Verdict::Wait { bucket: 1, wait: Duration::from_micros(250) })
        );
        for bad in [&[][..], &[3, 1, 0], &[9, 0, 0], &[0, 0]] {
            assert_eq!(verdict_of(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_redis_answers_by_the_policy_at_once() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for (policy, expected) in [(Unavailable::Local, Verdict::Local), (Unavailable::Deny, Verdict::Denied)]
        {
            let settings = FleetSettings {
                redis_url: format!("redis://127.0.0.1:{port}"),
                unavailable: policy,
                ..FleetSettings::default()
            };
            let limits = RedisLimits::start(settings).await.unwrap();
            assert!(!limits.is_connected());
            let bucket = SharedBucket {
                rule: "global".into(),
                subject: String::new(),
                interval: Duration::from_millis(100),
                burst: 1,
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            assert_eq!(limits.check(Some("h:80"), &[bucket], deadline).await, expected);
            // Writes are dropped, not queued or panicking.
            limits.cool_down("h:80", Duration::from_secs(1));
        }
    }
}
