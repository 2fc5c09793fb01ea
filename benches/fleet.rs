//! What the fleet's Redis check adds to an attempt: the local rate check against the Redis
//! check alone (one EVALSHA: two marks read, two buckets taken), and a whole action (GET to a
//! loopback upstream through the executor) with local limits against the same with the
//! fleet's. Then what tenant quotas add in a fleet: one of a tenant's running places taken and
//! given back (EVALSHA, then ZREM off the way), and a whole action of a tenant with a rate and
//! a concurrency quota (the rate one more bucket of the attempt's check; the place two more
//! round trips per action). A real `redis-server` is started on a free loopback port (without one on the PATH
//! the benchmark says so and measures nothing).
//!
//! `cargo bench --bench fleet`; `cargo test --benches` runs each once as a smoke test.
use bytes::Bytes;
use callout::{
    action::ActionInput,
    client::{
        rate_limit::{Rate, RateLimitRule, RateLimits},
        shared::{SharedBucket, SharedLimits},
        tenant::TenantQuotaSettings,
    },
    exec::{ExecSettings, Executor},
    fleet::{FleetSettings, RedisLimits},
};
use criterion::Criterion;
use http_body_util::Full;
use std::{
    hint::black_box,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

/// A `redis-server` on a loopback port of its own, killed when dropped.
struct RedisProcess {
    child: Child,
    url: String,
    dir: std::path::PathBuf,
}

impl RedisProcess {
    fn start(runtime: &tokio::runtime::Runtime) -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let dir = std::env::temp_dir().join(format!("callout-bench-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let redis = Self { child, url: format!("redis://127.0.0.1:{port}"), dir };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            let answered = runtime.block_on(async {
                let client = redis::Client::open(redis.url.as_str()).ok()?;
                let mut connection = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING").query_async::<String>(&mut connection).await.ok()
            });
            if answered.is_some() {
                return Some(redis);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback upstream answering every request 200 "ok", on `runtime`.
fn upstream(runtime: &tokio::runtime::Runtime) -> String {
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("loopback bind");
        let addr = listener.local_addr().expect("bound");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        format!("http://{addr}/")
    })
}

/// Limits no action here ever waits for: a destination rule and a global limit.
fn rate_settings() -> (Option<Rate>, Vec<RateLimitRule>) {
    (Some("1000000/s".parse().expect("a rate")), vec!["127.0.0.1=1000000/s".parse().expect("a rule")])
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let Some(redis) = RedisProcess::start(&runtime) else {
        eprintln!("fleet bench: no redis-server answered (apt-get install redis-server): nothing measured");
        return;
    };
    let mut c = Criterion::default().configure_from_args();
    let settings = FleetSettings { redis_url: redis.url.clone(), ..FleetSettings::default() };
    let fleet = runtime.block_on(RedisLimits::start(settings)).expect("the fleet backend");
    let far = || Instant::now() + Duration::from_secs(60);

    let (global, per_host) = rate_settings();
    let local = RateLimits::new(global, &per_host);
    c.bench_function("fleet/rate_check_local", |b| {
        b.iter(|| runtime.block_on(local.acquire("127.0.0.1:80", "127.0.0.1", 80, far())).expect("no wait"))
    });
    let buckets = [
        SharedBucket {
            rule: "dest:127.0.0.1".into(),
            subject: "127.0.0.1:80".into(),
            interval: Duration::from_micros(1),
            burst: 1_000_000,
        },
        SharedBucket {
            rule: "global".into(),
            subject: String::new(),
            interval: Duration::from_micros(1),
            burst: 1_000_000,
        },
    ];
    c.bench_function("fleet/rate_check_redis", |b| {
        b.iter(|| black_box(runtime.block_on(fleet.check(Some("127.0.0.1:80"), &buckets, far()))))
    });

    c.bench_function("fleet/tenant_place_redis", |b| {
        b.iter(|| {
            let held = runtime.block_on(fleet.hold("acme", 1_000_000, far()));
            assert!(matches!(held, callout::client::shared::Hold::Held(_)), "{held:?}");
        })
    });

    let url = upstream(&runtime);
    let mut exec = ExecSettings::default();
    exec.egress.allow_private_networks = true;
    (exec.limits.global_rate_limit, exec.limits.rate_limits) = rate_settings();
    let shared: Arc<dyn SharedLimits> = Arc::new(fleet);
    let mut tenants = exec.clone();
    tenants.tenants.named.insert(
        "acme".into(),
        TenantQuotaSettings {
            max_concurrent: Some(1_000_000),
            rate: Some("1000000/s".parse().expect("a rate")),
            ..Default::default()
        },
    );
    for (name, exec, shared, tenant) in [
        ("fleet/action_local_limits", &exec, None, None),
        ("fleet/action_fleet_limits", &exec, Some(shared.clone()), None),
        ("fleet/action_local_tenant_quotas", &tenants, None, Some("acme")),
        ("fleet/action_fleet_tenant_quotas", &tenants, Some(shared), Some("acme")),
    ] {
        let executor = Executor::with_shared_limits(exec.clone(), shared).expect("an executor");
        let input = ActionInput {
            method: "GET".into(),
            url: url.clone(),
            tenant: tenant.unwrap_or_default().to_owned(),
            ..ActionInput::default()
        };
        let action = executor.action(input).expect("a valid action");
        c.bench_function(name, |b| {
            b.iter(|| {
                let outcome = runtime.block_on(executor.execute(&action, None));
                assert!(outcome.succeeded, "{:?}", outcome.error);
            })
        });
    }
    c.final_summary();
}
