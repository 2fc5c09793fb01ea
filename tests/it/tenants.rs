//! Tenants, against the real gRPC server and loopback upstreams: a bad `tenant` is
//! INVALID_ARGUMENT naming it with nothing sent; a tenant at its concurrency or rate quota waits
//! or is refused (RATE_LIMITED naming the quota) while another tenant proceeds; one tenant's
//! flood of concurrent Executes or durable actions does not delay another's behind it (the
//! upstream's arrival order shows who was served when); and with the real binary, tenant
//! metric labels stay bounded by the configuration.
use crate::support::*;
use callout::{
    client::{
        admission::LimitSettings,
        tenant::{TenantQuotaSettings, TenantSettings},
    },
    durable::{Durable, DurableSettings},
    exec::{ExecSettings, Executor},
    pb::{
        self, durable_action_service_client::DurableActionServiceClient,
        http_action_service_client::HttpActionServiceClient,
    },
    server::{Listener, ServerOptions},
    store::sqlite::{SqliteSettings, SqliteStore},
};
use std::{sync::Arc, time::Duration};
use tokio::{net::TcpListener, sync::Semaphore};
use tonic::transport::Channel;

/// The real gRPC server in this process (durable actions on a temp store when `durable` is
/// given), its executor (to see how many actions it holds) and a channel to it.
struct Server {
    executor: Executor,
    channel: Channel,
    _task: AbortOnDrop,
    _dir: TempDir,
}

impl Server {
    async fn start(settings: ExecSettings, durable: Option<DurableSettings>) -> Self {
        let executor = Executor::new(settings).unwrap();
        let dir = TempDir::new("tenants");
        let durable = match durable {
            Some(settings) => {
                let path = dir.0.join("actions.db");
                let store = tokio::task::spawn_blocking(move || {
                    SqliteStore::open(&SqliteSettings { path, max_bytes: None })
                })
                .await
                .unwrap()
                .unwrap();
                Some(Durable::start(Arc::new(store), executor.clone(), settings))
            }
            None => None,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServerOptions { durable, ..ServerOptions::default() };
        let served = executor.clone();
        let task = tokio::spawn(async move {
            callout::server::serve_with(Listener::Tcp(listener), served, options, std::future::pending())
                .await
                .unwrap();
        });
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        Self { executor, channel, _task: AbortOnDrop(task), _dir: dir }
    }

    fn client(&self) -> HttpActionServiceClient<Channel> {
        HttpActionServiceClient::new(self.channel.clone())
    }

    /// Starts an Execute in the background.
    fn spawn(
        &self,
        req: pb::ExecuteHttpActionRequest,
    ) -> tokio::task::JoinHandle<pb::ExecuteHttpActionResponse> {
        let mut client = self.client();
        tokio::spawn(async move { client.execute(req).await.unwrap().into_inner() })
    }

    /// Waits (bounded) until the server holds `n` actions, running or queued.
    async fn until_admitted(&self, n: usize) {
        for _ in 0..1000 {
            if self.executor.limits().admitted() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the server holds {} actions, not {n}", self.executor.limits().admitted());
    }
}

fn of(tenant: &str, url: String) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest { tenant: tenant.into(), ..request("GET", &url) }
}

fn quota(max_concurrent: Option<usize>, rate: Option<&str>) -> TenantQuotaSettings {
    TenantQuotaSettings { max_concurrent, rate: rate.map(|r| r.parse().unwrap()), ..Default::default() }
}

fn with_tenants(tenants: TenantSettings, max_in_flight: usize) -> ExecSettings {
    ExecSettings {
        limits: LimitSettings { max_in_flight, ..LimitSettings::default() },
        tenants,
        ..test_settings()
    }
}

/// An upstream whose answers to paths under `/hold` wait for a permit of the returned
/// semaphore; other paths answer at once. It records arrivals in order (`seen`).
async fn gated() -> (Upstream, Arc<Semaphore>) {
    let gate = Arc::new(Semaphore::new(0));
    let held = gate.clone();
    let upstream = Upstream::start(move |seen| {
        let gate = held.clone();
        async move {
            if seen.target.starts_with("/hold") {
                gate.acquire().await.unwrap().forget();
            }
            text(200, "ok")
        }
    })
    .await;
    (upstream, gate)
}

async fn until_hits(upstream: &Upstream, n: usize) {
    for _ in 0..1000 {
        if upstream.hits() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the upstream saw {} requests, not {n}", upstream.hits());
}

fn paths(upstream: &Upstream) -> Vec<String> {
    upstream.seen().into_iter().map(|s| s.target).collect()
}

#[tokio::test]
async fn a_bad_tenant_is_invalid_argument_naming_it_and_nothing_is_sent() {
    let upstream = Upstream::fixed(200, "ok").await;
    let sidecar = Sidecar::start().await;
    for bad in ["two words", "a/b", &"t".repeat(65)] {
        let status = sidecar.try_execute(of(bad, upstream.url("/"))).await.unwrap_err();
        assert_eq!(violated_fields(&status), ["tenant"], "{bad:?}");
    }
    assert_eq!(upstream.hits(), 0, "nothing was sent");
    let ok = sidecar.execute(of("acme.eu-1_x", upstream.url("/"))).await;
    assert_eq!(ok.outcome(), pb::Outcome::Succeeded);
}

#[tokio::test]
async fn a_tenant_at_its_concurrency_quota_waits_or_is_refused_while_another_proceeds() {
    let (upstream, gate) = gated().await;
    let tenants = TenantSettings {
        default: quota(Some(5), None),
        named: [("a".to_owned(), quota(Some(1), None))].into(),
    };
    let server = Server::start(with_tenants(tenants, 16), None).await;
    // a's one place is taken by an action the upstream holds.
    let first = server.spawn(of("a", upstream.url("/hold/a-1")));
    until_hits(&upstream, 1).await;
    // a's next waits, and with a short total is refused naming the quota; nothing is sent.
    let waiting = server.spawn(of("a", upstream.url("/a-2")));
    let mut short = of("a", upstream.url("/a-3"));
    short.timeouts =
        Some(Box::new(pb::Timeouts { total: Some(dur(Duration::from_millis(300))), ..Default::default() }));
    let refused = server.client().execute(short).await.unwrap().into_inner();
    assert_eq!(error_kind(&refused), pb::ErrorKind::RateLimited, "{refused:?}");
    let message = refused.error.map(|e| e.message).unwrap_or_default();
    assert!(message.contains("tenant \"a\"") && message.contains("tenants.a.max_concurrent"), "{message}");
    assert!(refused.attempts.is_empty());
    // b (a default tenant) runs meanwhile, twice.
    for path in ["/b-1", "/b-2"] {
        let b = server.client().execute(of("b", upstream.url(path))).await.unwrap().into_inner();
        assert_eq!(b.outcome(), pb::Outcome::Succeeded, "{b:?}");
    }
    assert_eq!(paths(&upstream), ["/hold/a-1", "/b-1", "/b-2"], "a's second still waits");
    // a's place frees: its waiting action runs.
    gate.add_permits(1);
    assert_eq!(first.await.unwrap().outcome(), pb::Outcome::Succeeded);
    assert_eq!(waiting.await.unwrap().outcome(), pb::Outcome::Succeeded);
    assert_eq!(paths(&upstream), ["/hold/a-1", "/b-1", "/b-2", "/a-2"]);
}

#[tokio::test]
async fn rate_quotas_are_per_tenant() {
    let upstream = Upstream::fixed(200, "ok").await;
    let tenants = TenantSettings {
        default: quota(None, Some("1/m")),
        named: [("a".to_owned(), quota(None, Some("2/m"))), ("free".to_owned(), quota(None, None))].into(),
    };
    let server = Server::start(with_tenants(tenants, 16), None).await;
    let mut client = server.client();
    let run = |tenant: &str| {
        let mut req = of(tenant, upstream.url(&format!("/{tenant}")));
        req.timeouts =
            Some(Box::new(pb::Timeouts { total: Some(dur(Duration::from_secs(2))), ..Default::default() }));
        let mut client = client.clone();
        async move { client.execute(req).await.unwrap().into_inner() }
    };
    // a: a burst of 2, then a minute's wait, which the 2 s total cannot fit.
    assert_eq!(run("a").await.outcome(), pb::Outcome::Succeeded);
    assert_eq!(run("a").await.outcome(), pb::Outcome::Succeeded);
    let refused = run("a").await;
    assert_eq!(error_kind(&refused), pb::ErrorKind::RateLimited);
    let message = refused.error.map(|e| e.message).unwrap_or_default();
    assert!(
        message.contains("tenant \"a\" is over its rate quota 2/m burst 2 (tenants.a.rate)"),
        "{message}"
    );
    // Tenants not named have the default's rate, each its own bucket; "free" has none.
    assert_eq!(run("x").await.outcome(), pb::Outcome::Succeeded);
    assert_eq!(run("y").await.outcome(), pb::Outcome::Succeeded);
    assert_eq!(error_kind(&run("x").await), pb::ErrorKind::RateLimited);
    for _ in 0..5 {
        assert_eq!(run("free").await.outcome(), pb::Outcome::Succeeded);
    }
    // No tenant: no tenant quota.
    for _ in 0..3 {
        let none = client.execute(request("GET", &upstream.url("/none"))).await.unwrap().into_inner();
        assert_eq!(none.outcome(), pb::Outcome::Succeeded);
    }
    assert_eq!(upstream.hits(), 2 + 2 + 5 + 3, "refused actions sent nothing");
}

#[tokio::test]
async fn a_flood_of_one_tenant_does_not_queue_another_behind_it() {
    let (upstream, gate) = gated().await;
    let server = Server::start(with_tenants(TenantSettings::default(), 2), None).await;
    // a floods 30 Executes; 2 run (held by the upstream), 28 wait for a running slot.
    let flood: Vec<_> =
        (0..30).map(|i| server.spawn(of("a", upstream.url(&format!("/hold/a-{i}"))))).collect();
    until_hits(&upstream, 2).await;
    server.until_admitted(30).await;
    // b's one Execute comes after all of them.
    let b = server.spawn(of("b", upstream.url("/hold/b")));
    server.until_admitted(31).await;
    gate.add_permits(1000);
    assert_eq!(b.await.unwrap().outcome(), pb::Outcome::Succeeded);
    for a in flood {
        assert_eq!(a.await.unwrap().outcome(), pb::Outcome::Succeeded);
    }
    // The first slot to free went to b: the third request sent, not the 31st.
    let order = paths(&upstream);
    assert_eq!(order.len(), 31);
    let at = order.iter().position(|p| p == "/hold/b").unwrap();
    assert_eq!(at, 2, "{order:?}");
}

#[tokio::test]
async fn a_tenant_past_its_queue_bound_is_refused_at_once_and_another_is_not() {
    let (upstream, gate) = gated().await;
    let bounded = TenantQuotaSettings { max_queued: Some(3), ..Default::default() };
    let tenants = TenantSettings { named: [("a".to_owned(), bounded)].into(), ..TenantSettings::default() };
    let server = Server::start(with_tenants(tenants, 2), None).await;
    // a: 2 running (held by the upstream), 3 waiting: its bound.
    let flood: Vec<_> =
        (0..5).map(|i| server.spawn(of("a", upstream.url(&format!("/hold/a-{i}"))))).collect();
    until_hits(&upstream, 2).await;
    server.until_admitted(5).await;
    // a's next is refused at once, RESOURCE_EXHAUSTED naming its quota; nothing sent.
    let refused = server.client().execute(of("a", upstream.url("/a-over"))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("tenant \"a\"") && refused.message().contains("tenants.a.max_queued"),
        "{}",
        refused.message()
    );
    let details = tonic_types::StatusExt::get_error_details(&refused);
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "TENANT_QUEUE_FULL", "{info:?}");
    assert_eq!(info.metadata.get("tenant").map(String::as_str), Some("a"), "{info:?}");
    // b (no bound) still queues behind the same two running slots, and runs.
    let b: Vec<_> = (0..4).map(|i| server.spawn(of("b", upstream.url(&format!("/b-{i}"))))).collect();
    server.until_admitted(9).await;
    gate.add_permits(1000);
    for action in flood.into_iter().chain(b) {
        assert_eq!(action.await.unwrap().outcome(), pb::Outcome::Succeeded);
    }
    assert!(!paths(&upstream).iter().any(|p| p == "/a-over"), "nothing of the refused one sent");
    assert_eq!(upstream.hits(), 9);
}

#[tokio::test]
async fn durable_actions_of_a_small_tenant_run_early_despite_a_large_backlog() {
    let (upstream, gate) = gated().await;
    let durable = DurableSettings { max_concurrent: 1, ..DurableSettings::default() };
    let server = Server::start(test_settings(), Some(durable)).await;
    let mut client = DurableActionServiceClient::new(server.channel.clone());
    let submit = |tenant: &str, i: usize| pb::SubmitActionRequest {
        action: Some(pb::ExecuteHttpActionRequest {
            action_id: format!("{tenant}-{i}"),
            ..of(tenant, upstream.url(&format!("/hold/{tenant}-{i}")))
        }),
        not_before: None,
    };
    // A bad tenant is refused at Submit, naming the field; nothing is stored.
    let mut bad = submit("a", 0);
    if let Some(action) = bad.action.as_mut() {
        action.tenant = "no good".into();
    }
    let bad = client.submit(bad).await.unwrap_err();
    assert_eq!(violated_fields(&bad), ["action.tenant"]);
    // a's backlog of 30; its first attempt is held by the upstream while the rest wait, then
    // b's 3 come.
    for i in 0..30 {
        client.submit(submit("a", i)).await.unwrap();
    }
    until_hits(&upstream, 1).await;
    for i in 0..3 {
        client.submit(submit("b", i)).await.unwrap();
    }
    gate.add_permits(1000);
    for i in 0..3 {
        let id = format!("b-{i}");
        let mut state = pb::ActionState::Pending;
        for _ in 0..1000 {
            let record = client.get_action(pb::GetActionRequest { action_id: id.clone() }).await.unwrap();
            state = record.into_inner().state();
            if state == pb::ActionState::Succeeded {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(state, pb::ActionState::Succeeded, "{id}");
    }
    // Served in turn: a's first, then b and a alternating, so b's last is the 6th sent (and
    // not after a's 30).
    let order = paths(&upstream);
    let last_b = order.iter().rposition(|p| p.starts_with("/hold/b-")).unwrap();
    assert_eq!(
        order[..6],
        ["/hold/a-0", "/hold/b-0", "/hold/a-1", "/hold/b-1", "/hold/a-2", "/hold/b-2"],
        "{order:?}"
    );
    assert_eq!(last_b, 5);
}

#[tokio::test]
async fn tenant_metric_labels_are_the_configured_tenants_other_and_none() {
    let upstream = Upstream::fixed(200, "ok").await;
    let serve = ServeProcess::spawn(
        &[],
        &[("CALLOUT_TENANTS__ACME__WEIGHT", "2"), ("CALLOUT_TENANTS__DEFAULT__MAX_CONCURRENT", "4")],
    )
    .await;
    let metrics = serve.metrics.clone().expect("metrics on");
    let before = http_get(&metrics, "/metrics").await;
    for tenant in ["acme", "other", "none"] {
        let label = format!("tenant=\"{tenant}\"");
        for outcome in ["outcome=\"succeeded\"", "outcome=\"failed\""] {
            assert_eq!(
                sample(&before, "callout_tenant_actions_total", &[&label, outcome]),
                Some(0.0),
                "{before}"
            );
        }
        for quota in ["quota=\"concurrency\"", "quota=\"rate\""] {
            assert_eq!(sample(&before, "callout_tenant_quota_refused_total", &[&label, quota]), Some(0.0));
        }
        assert_eq!(sample(&before, "callout_tenant_actions_in_flight", &[&label]), Some(0.0));
        assert_eq!(sample(&before, "callout_tenant_actions_queued", &[&label]), Some(0.0));
    }
    let mut client = HttpActionServiceClient::new(serve.channel().await);
    client.execute(of("acme", upstream.url("/"))).await.unwrap();
    // A flood of tenants nobody configured: all counted as `other`.
    for i in 0..25 {
        client.execute(of(&format!("unknown-{i}"), upstream.url("/"))).await.unwrap();
    }
    client.execute(request("GET", &upstream.url("/"))).await.unwrap();
    let after = http_get(&metrics, "/metrics").await;
    let ok = "outcome=\"succeeded\"";
    assert_eq!(sample(&after, "callout_tenant_actions_total", &["tenant=\"acme\"", ok]), Some(1.0));
    assert_eq!(sample(&after, "callout_tenant_actions_total", &["tenant=\"other\"", ok]), Some(25.0));
    assert_eq!(sample(&after, "callout_tenant_actions_total", &["tenant=\"none\"", ok]), Some(1.0));
    let mut labels: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("callout_tenant_"))
        .filter_map(|l| l.split("tenant=\"").nth(1)?.split('"').next())
        .collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels, ["acme", "none", "other"], "{after}");
    assert!(!after.contains("unknown-"));
}
