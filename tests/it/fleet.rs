//! Fleet-wide limits through a real Redis (`redis-server` started by each test): the check
//! script's GCRA math and marks through the backend itself, then two real `callout serve`
//! processes sharing one Redis — the fleet's rate, a 429 cool-down and an open circuit seen by
//! the other replica, Redis stopped (fallback `local`, refusal `deny`, a paused Redis) and back.
use crate::support::{dur, http_get, RedisServer, ServeProcess};
use crate::support::{error_kind, metric, request, text, Upstream};
use callout::{
    client::shared::{SharedBucket, SharedLimits, Verdict},
    fleet::{FleetSettings, RedisLimits, Unavailable},
    pb::{self, http_action_service_client::HttpActionServiceClient},
};
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

fn bucket(rule: &str, subject: &str, interval: Duration, burst: u32) -> SharedBucket {
    SharedBucket { rule: rule.into(), subject: subject.into(), interval, burst }
}

async fn backend(redis: &RedisServer, unavailable: Unavailable) -> RedisLimits {
    let settings = FleetSettings {
        redis_url: redis.url(),
        unavailable,
        // Generous: a loaded test machine must not turn a slow answer into a fallback.
        timeout: Duration::from_secs(5),
        ..FleetSettings::default()
    };
    let limits = RedisLimits::start(settings).await.unwrap();
    assert!(limits.is_connected());
    limits
}

fn far() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

#[tokio::test]
async fn the_check_script_is_gcra_all_or_nothing() {
    let redis = RedisServer::start().await;
    let limits = backend(&redis, Unavailable::Local).await;
    // 10/s with bursts of 2: two at once, then a wait of at most one interval.
    let b = [bucket("global", "", Duration::from_millis(100), 2)];
    assert_eq!(limits.check(None, &b, far()).await, Verdict::Allowed);
    assert_eq!(limits.check(None, &b, far()).await, Verdict::Allowed);
    let Verdict::Wait { bucket: 0, wait } = limits.check(None, &b, far()).await else {
        panic!("the third waits");
    };
    assert!(!wait.is_zero() && wait <= Duration::from_millis(100), "{wait:?}");
    // A refused check takes nothing: after the wait one more goes, then it waits again.
    tokio::time::sleep(wait).await;
    assert_eq!(limits.check(None, &b, far()).await, Verdict::Allowed);
    assert!(matches!(limits.check(None, &b, far()).await, Verdict::Wait { .. }));

    // Two buckets: the first one refusing takes nothing from the second.
    let slow = bucket("dest:h", "h:80", Duration::from_secs(60), 1);
    let fast = bucket("tenant", "acme", Duration::from_secs(60), 3);
    let both = [slow.clone(), fast.clone()];
    assert_eq!(limits.check(None, &both, far()).await, Verdict::Allowed);
    for _ in 0..3 {
        assert!(matches!(limits.check(None, &both, far()).await, Verdict::Wait { bucket: 0, .. }));
    }
    let fast_only = [fast];
    assert_eq!(limits.check(None, &fast_only, far()).await, Verdict::Allowed);
    assert_eq!(limits.check(None, &fast_only, far()).await, Verdict::Allowed);
    let Verdict::Wait { wait, .. } = limits.check(None, &fast_only, far()).await else {
        panic!("the fourth of a burst of 3 waits");
    };
    assert!(wait > Duration::from_secs(50) && wait <= Duration::from_secs(60), "{wait:?}");
    for key in ["callout:v1:rate:dest:h:h:80", "callout:v1:rate:tenant:acme"] {
        assert_eq!(redis.int(&["EXISTS", key]).await, 1, "{key}");
    }
    // A bucket's value is its theoretical arrival time, expiring once the bucket is full again:
    // one send taken at 1/m, so within the minute.
    let ttl = redis.int(&["PTTL", "callout:v1:rate:dest:h:h:80"]).await;
    assert!((1..=60_000).contains(&ttl), "{ttl}");

    // After SCRIPT FLUSH (or a restart) EVALSHA answers NOSCRIPT: the script is sent again.
    redis.try_command(&["SCRIPT", "FLUSH"]).await.unwrap();
    assert!(matches!(limits.check(None, &[slow], far()).await, Verdict::Wait { .. }));
    assert!(limits.is_connected());
}

#[tokio::test]
async fn marks_are_read_before_buckets_and_take_nothing() {
    let redis = RedisServer::start().await;
    let limits = backend(&redis, Unavailable::Local).await;
    let b = [bucket("dest:h", "h:80", Duration::from_secs(60), 1)];
    limits.cool_down("h:80", Duration::from_secs(30));
    redis.wait_for_key("callout:v1:cool:h:80").await;
    let Verdict::CoolingDown(left) = limits.check(Some("h:80"), &b, far()).await else {
        panic!("cooling down");
    };
    assert!(left > Duration::from_secs(20) && left <= Duration::from_secs(30), "{left:?}");
    // A shorter cool-down does not shorten a longer one.
    limits.cool_down("h:80", Duration::from_millis(1));
    limits.circuit_opened("h:80", Duration::from_secs(15));
    redis.wait_for_key("callout:v1:circuit:h:80").await;
    assert!(matches!(limits.check(Some("h:80"), &b, far()).await, Verdict::CircuitOpen(_)));
    assert!(redis.int(&["PTTL", "callout:v1:cool:h:80"]).await > 20_000);
    limits.circuit_closed("h:80");
    let started = Instant::now();
    while redis.int(&["EXISTS", "callout:v1:circuit:h:80"]).await == 1 {
        assert!(started.elapsed() < Duration::from_secs(10), "the circuit mark went");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(limits.check(Some("h:80"), &b, far()).await, Verdict::CoolingDown(_)));
    // Nothing was taken while marks were set; another destination has neither.
    assert_eq!(redis.int(&["EXISTS", "callout:v1:rate:dest:h:h:80"]).await, 0);
    assert_eq!(limits.check(Some("other:80"), &b, far()).await, Verdict::Allowed);
}

/// `callout serve` with the fleet's Redis at `redis`, and `args`.
async fn replica(redis: &RedisServer, args: &[&str], env: &[(&str, &str)]) -> ServeProcess {
    let url = redis.url();
    let mut all = vec!["--redis-url", url.as_str()];
    all.extend_from_slice(args);
    // A loaded test machine must not turn a slow answer into an outage, unless a test says so.
    let mut env = env.to_vec();
    if !env.iter().any(|(name, _)| *name == "CALLOUT_FLEET__TIMEOUT") {
        env.push(("CALLOUT_FLEET__TIMEOUT", "5s"));
    }
    ServeProcess::spawn(&all, &env).await
}

fn with_total(url: &str, total: Duration) -> pb::ExecuteHttpActionRequest {
    let mut req = request("GET", url);
    req.timeouts = Some(Box::new(pb::Timeouts { total: Some(dur(total)), ..Default::default() }));
    req
}

async fn metrics_of(serve: &ServeProcess) -> String {
    http_get(serve.metrics.as_deref().expect("metrics on"), "/metrics").await
}

#[tokio::test]
async fn two_replicas_stay_within_the_fleet_rate() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::fixed(200, "ok").await;
    // 10/s with bursts of 2, on either replica; a fallback would refuse (deny), never add sends.
    let rule = "127.0.0.1=10/s burst 2";
    let env = [("CALLOUT_FLEET__REDIS_UNAVAILABLE", "deny")];
    let a = replica(&redis, &["--rate-limit", rule], &env).await;
    let b = replica(&redis, &["--rate-limit", rule], &env).await;
    let window = Duration::from_secs(2);
    let total = Duration::from_millis(300);
    let ok = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for serve in [&a, &b] {
        let ok_here = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let mut client = HttpActionServiceClient::new(serve.channel().await);
            let (url, ok, ok_here) = (upstream.url("/"), ok.clone(), ok_here.clone());
            workers.push(tokio::spawn(async move {
                // Bounded in time and count: each call waits at most `total`.
                for _ in 0..1000 {
                    if started.elapsed() >= window {
                        break;
                    }
                    let resp = client.execute(with_total(&url, total)).await.unwrap().into_inner();
                    match error_kind(&resp) {
                        pb::ErrorKind::Unspecified => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            ok_here.fetch_add(1, Ordering::SeqCst);
                        }
                        // A wait that just fits may leave the attempt too little time: it
                        // passed the limit all the same.
                        pb::ErrorKind::RateLimited | pb::ErrorKind::Timeout => {}
                        other => panic!("{other:?}: {resp:?}"),
                    }
                }
                ok_here.load(Ordering::SeqCst)
            }));
        }
    }
    let mut per_replica = [0; 2];
    for (i, worker) in workers.into_iter().enumerate() {
        per_replica[i / 4] = worker.await.unwrap();
    }
    // Every send began within window + total of the start: GCRA allows the burst plus one
    // send per interval in that time, whatever the replicas' number (alone each would allow
    // as many again).
    let hits = upstream.hits();
    // (+2: a re-check after a wait reaches Redis a little after its deadline.)
    let bound = 2 + (window + total).as_millis() as usize / 100 + 2;
    eprintln!("fleet rate: {hits} sends (bound {bound}), per replica {per_replica:?}");
    assert!(hits >= ok.load(Ordering::SeqCst));
    assert!(hits <= bound, "{hits} sends within {:?}, bound {bound}", window + total);
    assert!(per_replica.iter().all(|&n| n > 0), "both replicas sent: {per_replica:?}");
    for serve in [&a, &b] {
        let text = metrics_of(serve).await;
        assert_eq!(metric(&text, "callout_fleet_redis_up"), Some(1.0));
        assert_eq!(metric(&text, "callout_fleet_redis_unavailable_total"), Some(0.0));
        assert!(metric(&text, "callout_fleet_check_seconds_count").is_some_and(|n| n >= 1.0), "{text}");
    }
}

#[tokio::test]
async fn a_429_on_one_replica_holds_back_the_other() {
    let redis = RedisServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let upstream = Upstream::start(move |_| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut resp = text(if n == 0 { 429 } else { 200 }, "x");
            if n == 0 {
                resp.headers_mut().insert("retry-after", "30".parse().unwrap());
            }
            resp
        }
    })
    .await;
    let a = replica(&redis, &[], &[]).await;
    let b = replica(&redis, &[], &[]).await;
    let mut on_a = HttpActionServiceClient::new(a.channel().await);
    let mut on_b = HttpActionServiceClient::new(b.channel().await);
    let first = on_a.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
    assert_eq!(first.response.as_ref().map(|r| r.status), Some(429));
    redis.wait_for_key(&format!("callout:v1:cool:{}", upstream.addr)).await;
    // B never saw the 429: the fleet's cool-down (30 s) is past its deadline, so it refuses
    // at once without sending.
    let refused =
        on_b.execute(with_total(&upstream.url("/"), Duration::from_secs(5))).await.unwrap().into_inner();
    assert_eq!(error_kind(&refused), pb::ErrorKind::RateLimited, "{refused:?}");
    let message = refused.error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
    assert!(message.contains("another replica"), "{message}");
    assert_eq!(upstream.hits(), 1, "nothing sent by B");

    // A short cool-down is waited out (counted as a rate-limit wait), then B sends.
    redis.try_command(&["DEL", &format!("callout:v1:cool:{}", upstream.addr)]).await.unwrap();
    redis
        .try_command(&["SET", &format!("callout:v1:cool:{}", upstream.addr), "1", "PX", "300"])
        .await
        .unwrap();
    let waited =
        on_b.execute(with_total(&upstream.url("/"), Duration::from_secs(30))).await.unwrap().into_inner();
    assert_eq!(error_kind(&waited), pb::ErrorKind::Unspecified, "{waited:?}");
    assert_eq!(upstream.hits(), 2);
    let text = metrics_of(&b).await;
    let waits = text
        .lines()
        .filter(|l| l.starts_with("callout_rate_limit_wait_seconds_count"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(waits >= 1.0, "{text}");
}

#[tokio::test]
async fn a_circuit_opened_on_one_replica_refuses_on_the_other() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::fixed(503, "down").await;
    let args = ["--breaker-failures", "1", "--breaker-cool-down", "60s"];
    let a = replica(&redis, &args, &[]).await;
    let b = replica(&redis, &args, &[]).await;
    let mut on_a = HttpActionServiceClient::new(a.channel().await);
    let failed = on_a.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
    assert_eq!(failed.response.as_ref().map(|r| r.status), Some(503));
    redis.wait_for_key(&format!("callout:v1:circuit:{}", upstream.addr)).await;
    let mut on_b = HttpActionServiceClient::new(b.channel().await);
    let refused = on_b.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
    assert_eq!(error_kind(&refused), pb::ErrorKind::CircuitOpen, "{refused:?}");
    assert_eq!(upstream.hits(), 1, "B sent nothing");
    let ttl = redis.int(&["PTTL", &format!("callout:v1:circuit:{}", upstream.addr)]).await;
    assert!(ttl > 30_000 && ttl <= 60_000, "open for the breaker's cool-down: {ttl}");
}

#[tokio::test]
async fn redis_down_falls_back_to_local_limits_and_comes_back() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::fixed(200, "ok").await;
    // Bursts of 100 at 1/m: the bucket's key lives (a minute per send) for the test to see.
    let serve = replica(&redis, &["--rate-limit", "127.0.0.1=1/m burst 100"], &[]).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    let key = format!("callout:v1:rate:dest:127.0.0.1:{}", upstream.addr);
    let ok = client.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
    assert_eq!(error_kind(&ok), pb::ErrorKind::Unspecified, "{ok:?}");
    assert_eq!(redis.int(&["EXISTS", &key]).await, 1, "the bucket is the fleet's");

    redis.stop();
    for _ in 0..3 {
        let resp = client.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
        assert_eq!(error_kind(&resp), pb::ErrorKind::Unspecified, "local limits: {resp:?}");
    }
    let text = metrics_of(&serve).await;
    assert_eq!(metric(&text, "callout_fleet_redis_unavailable_total"), Some(1.0), "one outage");
    assert!(
        metric(&text, "callout_fleet_fallbacks_total{policy=\"local\"}").is_some_and(|n| n >= 3.0),
        "{text}"
    );
    assert_eq!(metric(&text, "callout_fleet_redis_up"), Some(0.0));
    assert_eq!(serve.logs().matches("fleet: Redis unreachable").count(), 1, "{}", serve.logs());

    // Back: the reconnect (with backoff) finds it, and the buckets are the fleet's again.
    redis.restart().await;
    let started = Instant::now();
    while metric(&metrics_of(&serve).await, "callout_fleet_redis_up") != Some(1.0) {
        assert!(started.elapsed() < Duration::from_secs(20), "reconnected:\n{}", serve.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = client.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
    assert_eq!(error_kind(&ok), pb::ErrorKind::Unspecified, "{ok:?}");
    assert_eq!(redis.int(&["EXISTS", &key]).await, 1, "shared again");
    assert!(serve.logs().contains("fleet: Redis reachable again"), "{}", serve.logs());
}

#[tokio::test]
async fn redis_down_with_deny_refuses_within_the_deadline() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::fixed(200, "ok").await;
    let env = [("CALLOUT_FLEET__REDIS_UNAVAILABLE", "deny"), ("CALLOUT_FLEET__TIMEOUT", "200ms")];
    let serve = replica(&redis, &["--rate-limit", "127.0.0.1=100/s"], &env).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    let ok = client.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
    assert_eq!(error_kind(&ok), pb::ErrorKind::Unspecified, "{ok:?}");

    // A paused Redis holds the connection and answers nothing: the check gives up after
    // fleet.timeout and refuses; the call never hangs (the guard is far above that).
    redis.signal("-STOP");
    let guard = Duration::from_secs(20);
    let call = client.execute(with_total(&upstream.url("/"), Duration::from_secs(3)));
    let resp = tokio::time::timeout(guard, call).await.expect("no hang").unwrap().into_inner();
    assert_eq!(error_kind(&resp), pb::ErrorKind::RateLimited, "{resp:?}");
    let message = resp.error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
    assert!(message.contains("deny"), "{message}");
    redis.signal("-CONT");

    // A stopped one refuses too, the outage logged once.
    redis.stop();
    for _ in 0..2 {
        let call = client.execute(with_total(&upstream.url("/"), Duration::from_secs(3)));
        let resp = tokio::time::timeout(guard, call).await.expect("no hang").unwrap().into_inner();
        assert_eq!(error_kind(&resp), pb::ErrorKind::RateLimited, "{resp:?}");
    }
    assert_eq!(upstream.hits(), 1, "nothing sent while refused");
    let text = metrics_of(&serve).await;
    assert!(
        metric(&text, "callout_fleet_fallbacks_total{policy=\"deny\"}").is_some_and(|n| n >= 3.0),
        "{text}"
    );
    assert!(serve.logs().matches("fleet: Redis unreachable").count() >= 1, "{}", serve.logs());
}

/// Every command Redis ran since its stats were reset, by name (`INFO commandstats`), leaving
/// out the test's own INFO and CONFIG.
async fn commands_run(redis: &RedisServer) -> Vec<(String, u64)> {
    let info = match redis.try_command(&["INFO", "commandstats"]).await.unwrap() {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("INFO: {other:?}"),
    };
    info.lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|s| s.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .filter(|(name, _)| !matches!(name.as_str(), "info" | "config" | "config|resetstat"))
        .collect()
}

#[tokio::test]
async fn an_attempt_makes_one_round_trip() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::fixed(200, "ok").await;
    let args = ["--rate-limit", "127.0.0.1=1000/s", "--global-rate-limit", "1000/s"];
    let serve = replica(&redis, &args, &[]).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    // The first check loads the script (EVALSHA answered NOSCRIPT, then EVAL).
    client.execute(request("GET", &upstream.url("/"))).await.unwrap();
    redis.try_command(&["CONFIG", "RESETSTAT"]).await.unwrap();
    for _ in 0..20 {
        let resp = client.execute(request("GET", &upstream.url("/"))).await.unwrap().into_inner();
        assert_eq!(error_kind(&resp), pb::ErrorKind::Unspecified, "{resp:?}");
    }
    // One EVALSHA per attempt, and nothing else from outside: the rest is the script's own
    // work (Redis counts those too): two marks read (PTTL), Redis's clock, two buckets read
    // and taken.
    let mut run = commands_run(&redis).await;
    run.sort();
    let expected = [("evalsha", 20), ("get", 40), ("pttl", 40), ("set", 40), ("time", 20)];
    assert_eq!(run, expected.map(|(name, n)| (name.to_owned(), n)));
    assert_eq!(upstream.hits(), 21);
}

fn of_tenant(tenant: &str, url: &str, total: Duration) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { tenant: tenant.into(), ..with_total(url, total) }
}

fn message_of(resp: &pb::ExecuteHttpActionResponse) -> String {
    resp.error.as_ref().map(|e| e.message.clone()).unwrap_or_default()
}

#[tokio::test]
async fn two_replicas_share_a_tenants_rate_quota() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::fixed(200, "ok").await;
    // acme: 10/s with bursts of 2 for the fleet; a fallback would refuse, never add sends.
    let env = [("CALLOUT_FLEET__REDIS_UNAVAILABLE", "deny"), ("CALLOUT_TENANTS__ACME__RATE", "10/s burst 2")];
    let a = replica(&redis, &[], &env).await;
    let b = replica(&redis, &[], &env).await;
    let window = Duration::from_secs(3);
    let total = Duration::from_millis(300);
    let started = Instant::now();
    let mut workers = Vec::new();
    for serve in [&a, &b] {
        for _ in 0..4 {
            let mut client = HttpActionServiceClient::new(serve.channel().await);
            let url = upstream.url("/");
            workers.push(tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..1000 {
                    if started.elapsed() >= window {
                        break;
                    }
                    let resp = client.execute(of_tenant("acme", &url, total)).await.unwrap().into_inner();
                    match error_kind(&resp) {
                        pb::ErrorKind::Unspecified => ok += 1,
                        pb::ErrorKind::RateLimited | pb::ErrorKind::Timeout => {}
                        other => panic!("{other:?}: {resp:?}"),
                    }
                }
                ok
            }));
        }
    }
    let mut per_replica = [0; 2];
    for (i, worker) in workers.into_iter().enumerate() {
        per_replica[i / 4] += worker.await.unwrap();
    }
    // As for the destination rules: the burst plus one send per 100 ms within window + total,
    // +2 for a re-check that reaches Redis a little after its deadline.
    let hits = upstream.hits();
    let bound = 2 + (window + total).as_millis() as usize / 100 + 2;
    let floor = (10 * window.as_secs() as usize + 2) * 8 / 10;
    eprintln!("tenant fleet rate: {hits} sends (bound {bound}, floor {floor}), per replica {per_replica:?}");
    assert!(hits <= bound, "{hits} acme sends within {:?}, bound {bound}", window + total);
    assert!(hits >= floor, "{hits} acme sends: the quota was used, at least {floor}");
    assert!(per_replica.iter().all(|&n| n > 0), "both replicas sent: {per_replica:?}");
    assert!(redis.int(&["EXISTS", "callout:v1:rate:tenant:acme"]).await == 1, "the bucket is the fleet's");
    for serve in [&a, &b] {
        let text = metrics_of(serve).await;
        // (A re-check whose deadline leaves no time for Redis is answered by the policy: that
        // is no outage.)
        assert_eq!(metric(&text, "callout_fleet_redis_unavailable_total"), Some(0.0), "{text}");
        let waits = "callout_tenant_quota_waits_total{tenant=\"acme\",quota=\"rate\"}";
        assert!(metric(&text, waits).is_some_and(|n| n >= 1.0), "{text}");
    }
}

/// An upstream that holds each request `hold` (paths under `/long` for a minute) and records
/// the most it saw at once.
async fn holding(hold: Duration) -> (Upstream, Arc<AtomicUsize>) {
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let seen_most = most.clone();
    let upstream = Upstream::start(move |seen| {
        let (now, most) = (now.clone(), most.clone());
        async move {
            let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(at_once, Ordering::SeqCst);
            let hold = if seen.target.starts_with("/long") { Duration::from_secs(60) } else { hold };
            tokio::time::sleep(hold).await;
            now.fetch_sub(1, Ordering::SeqCst);
            text(200, "ok")
        }
    })
    .await;
    (upstream, seen_most)
}

#[tokio::test]
async fn two_replicas_share_a_tenants_concurrency_quota() {
    let redis = RedisServer::start().await;
    let (upstream, most) = holding(Duration::from_millis(200)).await;
    let env = [("CALLOUT_FLEET__REDIS_UNAVAILABLE", "deny"), ("CALLOUT_TENANTS__ACME__MAX_CONCURRENT", "2")];
    let a = replica(&redis, &[], &env).await;
    let b = replica(&redis, &[], &env).await;
    let window = Duration::from_secs(2);
    let started = Instant::now();
    let mut workers = Vec::new();
    for serve in [&a, &b] {
        for _ in 0..4 {
            let mut client = HttpActionServiceClient::new(serve.channel().await);
            let url = upstream.url("/");
            workers.push(tokio::spawn(async move {
                let mut ok = 0;
                while started.elapsed() < window {
                    let req = of_tenant("acme", &url, Duration::from_secs(10));
                    let resp = client.execute(req).await.unwrap().into_inner();
                    assert_eq!(error_kind(&resp), pb::ErrorKind::Unspecified, "{resp:?}");
                    ok += 1;
                }
                ok
            }));
        }
    }
    let mut per_replica = [0; 2];
    for (i, worker) in workers.into_iter().enumerate() {
        per_replica[i / 4] += worker.await.unwrap();
    }
    let done = per_replica[0] + per_replica[1];
    eprintln!(
        "tenant fleet concurrency: most at once {}, {done} done, per replica {per_replica:?}",
        most.load(Ordering::SeqCst)
    );
    // Alone each replica would run 2 at once: 4 across both.
    assert_eq!(most.load(Ordering::SeqCst), 2, "at most 2 acme requests at once across the fleet");
    // 2 at a time for 200 ms each: about 10 per second; at least half of that ran.
    assert!(done >= 10, "{done} done: {per_replica:?}");
    assert!(per_replica.iter().all(|&n| n > 0), "both replicas ran: {per_replica:?}");
    // A place is given back off the action's way (a spawned ZREM), so the last ones may land
    // just after their replies. ZCARD counts ended leases too: only the ZREMs empty the set.
    let given_back = Instant::now();
    loop {
        let held = redis.int(&["ZCARD", "callout:v1:running:tenant:acme"]).await;
        if held == 0 {
            break;
        }
        assert!(given_back.elapsed() < Duration::from_secs(2), "{held} places not given back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 4 actions hold a local slot for 2 fleet places, so someone waited for the fleet. Which
    // replica is a race (a place given back is often taken at once by the same replica's next
    // action), so the waits are counted across both.
    let waits = "callout_tenant_quota_waits_total{tenant=\"acme\",quota=\"concurrency\"}";
    let mut waited = [0.0; 2];
    for (n, serve) in waited.iter_mut().zip([&a, &b]) {
        *n = metric(&metrics_of(serve).await, waits).unwrap_or(0.0);
    }
    assert!(waited[0] + waited[1] >= 1.0, "fleet waits per replica {waited:?}");
}

#[tokio::test]
async fn a_killed_replicas_tenant_places_come_free_within_the_lease() {
    let redis = RedisServer::start().await;
    let (upstream, _) = holding(Duration::ZERO).await;
    let lease = Duration::from_secs(1);
    let env = [("CALLOUT_TENANTS__ACME__MAX_CONCURRENT", "2"), ("CALLOUT_FLEET__CONCURRENCY_LEASE", "1s")];
    let mut a = replica(&redis, &[], &env).await;
    let b = replica(&redis, &[], &env).await;
    // a holds both of acme's places with actions the upstream holds for a minute.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = HttpActionServiceClient::new(a.channel().await);
        let req = of_tenant("acme", &upstream.url("/long"), Duration::from_secs(60));
        held.push(tokio::spawn(async move { client.execute(req).await }));
    }
    while upstream.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Renewed past the lease: b still finds acme full, and gives up by its deadline.
    tokio::time::sleep(lease * 2).await;
    let mut client = HttpActionServiceClient::new(b.channel().await);
    let url = upstream.url("/");
    let refused =
        client.execute(of_tenant("acme", &url, Duration::from_millis(500))).await.unwrap().into_inner();
    assert_eq!(error_kind(&refused), pb::ErrorKind::RateLimited, "{refused:?}");
    let message = message_of(&refused);
    assert!(message.contains("tenants.acme.max_concurrent, fleet-wide"), "{message}");
    // kill -9: a gives nothing back; its leases end within `lease`, and b's action runs.
    a.kill();
    let killed = Instant::now();
    let resp = client.execute(of_tenant("acme", &url, Duration::from_secs(10))).await.unwrap().into_inner();
    assert_eq!(error_kind(&resp), pb::ErrorKind::Unspecified, "{resp:?}");
    let took = killed.elapsed();
    eprintln!("a killed replica's places came free after {took:?} (lease {lease:?})");
    assert!(took <= lease + Duration::from_millis(500), "{took:?}");
    for call in held {
        assert!(call.await.unwrap().is_err(), "the killed replica's calls end with it");
    }
}

#[tokio::test]
async fn redis_down_tenant_quotas_fall_back_by_the_policy() {
    let mut redis = RedisServer::start().await;
    let upstream = Upstream::fixed(200, "ok").await;
    let tenant_env =
        [("CALLOUT_TENANTS__ACME__RATE", "1/m burst 2"), ("CALLOUT_TENANTS__ACME__MAX_CONCURRENT", "1")];
    let local = replica(&redis, &[], &tenant_env).await;
    let mut deny_env = tenant_env.to_vec();
    deny_env.push(("CALLOUT_FLEET__REDIS_UNAVAILABLE", "deny"));
    let deny = replica(&redis, &[], &deny_env).await;
    let url = upstream.url("/");
    let total = Duration::from_secs(2);
    redis.stop();
    // local: this replica's own quota, the burst of 2 and then a refusal naming the quota.
    let mut client = HttpActionServiceClient::new(local.channel().await);
    for _ in 0..2 {
        let resp = client.execute(of_tenant("acme", &url, total)).await.unwrap().into_inner();
        assert_eq!(error_kind(&resp), pb::ErrorKind::Unspecified, "{resp:?}");
    }
    let refused = client.execute(of_tenant("acme", &url, total)).await.unwrap().into_inner();
    assert_eq!(error_kind(&refused), pb::ErrorKind::RateLimited, "{refused:?}");
    assert!(message_of(&refused).contains("tenants.acme.rate"), "{}", message_of(&refused));
    // deny: refused, nothing sent, no crash.
    let mut client = HttpActionServiceClient::new(deny.channel().await);
    for _ in 0..2 {
        let resp = client.execute(of_tenant("acme", &url, total)).await.unwrap().into_inner();
        assert_eq!(error_kind(&resp), pb::ErrorKind::RateLimited, "{resp:?}");
        assert!(message_of(&resp).contains("deny"), "{}", message_of(&resp));
    }
    assert_eq!(upstream.hits(), 2);
    for serve in [&local, &deny] {
        assert_eq!(metric(&metrics_of(serve).await, "callout_fleet_redis_up"), Some(0.0));
    }
}

#[tokio::test]
async fn a_tenants_action_makes_one_round_trip_per_attempt_and_two_for_its_place() {
    let redis = RedisServer::start().await;
    let upstream = Upstream::fixed(200, "ok").await;
    let env = [("CALLOUT_TENANTS__ACME__RATE", "1000/s"), ("CALLOUT_TENANTS__ACME__MAX_CONCURRENT", "10")];
    let serve = replica(&redis, &["--rate-limit", "127.0.0.1=1000/s"], &env).await;
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    let url = upstream.url("/");
    // The first loads the scripts.
    client.execute(of_tenant("acme", &url, Duration::from_secs(5))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.try_command(&["CONFIG", "RESETSTAT"]).await.unwrap();
    for _ in 0..20 {
        let resp =
            client.execute(of_tenant("acme", &url, Duration::from_secs(5))).await.unwrap().into_inner();
        assert_eq!(error_kind(&resp), pb::ErrorKind::Unspecified, "{resp:?}");
    }
    // The place is given back off the action's way: wait (bounded) for the last ZREM.
    let count_in =
        |run: &[(String, u64)], name: &str| run.iter().find(|(n, _)| n == name).map_or(0, |(_, n)| *n);
    let given_back = Instant::now();
    let mut run = commands_run(&redis).await;
    while count_in(&run, "zrem") < 20 && given_back.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        run = commands_run(&redis).await;
    }
    let calls = |name: &str| count_in(&run, name);
    // Per action: its place taken (EVALSHA) and given back (ZREM); its one attempt's check
    // (EVALSHA) with the destination's and the tenant's buckets, read and taken in it.
    assert_eq!((calls("evalsha"), calls("zrem")), (40, 20), "{run:?}");
    assert_eq!(calls("set"), 40, "two buckets taken per attempt: {run:?}");
    assert_eq!(upstream.hits(), 21);
}
