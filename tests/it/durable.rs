//! Durable actions (DurableActionService) against each store — a real SQLite file in a temp dir
//! and a real PostgreSQL (tests/it/pg.rs) — and loopback upstreams; one suite, two stores (each
//! shared test runs as `durable::sqlite::NAME` and `durable::postgres::NAME`): Submit's idempotency, cancel, replay, list, watch, the pending bound, a full or
//! unwritable store; and with the real `callout` binary killed with SIGKILL mid-run and started
//! again on the same store: nothing accepted is lost, finals are seen once, and a POST that was
//! in flight is repeated with the same Idempotency-Key.
use crate::{
    pg::{Postgres, DATABASE},
    support::{body, dur, test_settings, text, AbortOnDrop, ServeProcess, TempDir, Upstream},
};
use callout::{
    durable::{Durable, DurableSettings},
    exec::Executor,
    pb::{self, durable_action_service_client::DurableActionServiceClient, ActionState},
    server::{Listener, ServerOptions},
    store::{
        postgres::{PostgresSettings, PostgresStore},
        sqlite::{SqliteSettings, SqliteStore},
        ActionStore, StoreError,
    },
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::net::TcpListener;
use tonic::{transport::Channel, Code};

pub type Client = DurableActionServiceClient<Channel>;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// Each test in the list runs once on each store: `sqlite::NAME` and `postgres::NAME`.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Sqlite).await
            })*
        }
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Kind::Postgres).await
            })*
        }
    };
}

on_both_stores!(
    submit_is_idempotent_by_action_id,
    an_invalid_action_names_its_fields_and_nothing_is_stored,
    cancel_stops_pending_and_in_flight_actions,
    failed_actions_are_listed_and_replayed_with_their_history,
    list_pages_through_every_action,
    pending_actions_are_bounded,
    health_serves_the_durable_service,
    a_killed_server_loses_nothing_and_a_watcher_sees_each_final_once,
    a_post_in_flight_at_a_kill_is_repeated_with_the_same_idempotency_key,
    a_post_without_a_key_in_flight_at_a_kill_fails_instead_of_repeating,
    a_drain_leaves_pending_actions_stored_for_the_next_start_and_the_gauges_count_them,
    watch_filters_by_id_and_resumes_after_a_sequence,
    a_durable_retry_condition_polls_until_the_job_is_done,
    a_backlog_to_a_stuck_host_does_not_hold_up_other_hosts,
    an_attempt_cut_off_by_the_drain_runs_again_at_the_next_start,
);

/// A store for one test: a SQLite file in a temp dir, or a PostgreSQL cluster of its own.
pub struct TestStore {
    pub dir: Arc<TempDir>,
    pub pg: Option<Postgres>,
}

/// Leases in tests: a replica that died is taken over within seconds.
pub const TEST_LEASE: Duration = Duration::from_secs(2);
/// The same for the `callout` binary.
pub const LEASE_ENV: (&str, &str) = ("CALLOUT_DURABLE__LEASE", "2s");

impl TestStore {
    pub fn new(kind: Kind) -> Self {
        let dir = Arc::new(TempDir::new("durable"));
        let pg = (kind == Kind::Postgres).then(Postgres::start);
        Self { dir, pg }
    }

    /// `--store` for the `callout` binary.
    pub fn url(&self) -> String {
        match &self.pg {
            Some(pg) => pg.url(DATABASE),
            None => self.dir.store_url(),
        }
    }

    pub async fn open(&self, max_bytes: Option<u64>) -> Result<Arc<dyn ActionStore>, StoreError> {
        match &self.pg {
            Some(pg) => Ok(Arc::new(PostgresStore::open(&pg_settings(&pg.url(DATABASE))).await?)),
            None => {
                let path = self.dir.0.join("actions.db");
                let store = tokio::task::spawn_blocking(move || {
                    SqliteStore::open(&SqliteSettings { path, max_bytes })
                })
                .await
                .unwrap()?;
                Ok(Arc::new(store))
            }
        }
    }
}

/// The PostgreSQL store's settings for `url` (no password in tests).
pub fn pg_settings(url: &str) -> PostgresSettings {
    PostgresSettings {
        url: url.into(),
        shown: url.into(),
        pool_size: 4,
        connect_timeout: Duration::from_secs(2),
        orphan_hold: TEST_LEASE,
    }
}

/// The real gRPC server in this process with durable actions on a store of its own.
pub struct Server {
    pub client: Client,
    pub channel: Channel,
    _task: AbortOnDrop,
    _store: Arc<TestStore>,
}

impl Server {
    pub async fn start(kind: Kind, settings: DurableSettings) -> Self {
        Self::start_on(Arc::new(TestStore::new(kind)), settings, None).await
    }

    pub async fn start_on(store: Arc<TestStore>, settings: DurableSettings, max_bytes: Option<u64>) -> Self {
        let executor = Executor::new(test_settings()).unwrap();
        let settings = DurableSettings { lease: TEST_LEASE, ..settings };
        let durable = match store.open(max_bytes).await {
            Ok(opened) => Durable::start(opened, executor.clone(), settings),
            Err(e) => Durable::unavailable(e.to_string(), executor.clone(), settings),
        };
        Self::serve(executor, durable, store).await
    }

    pub async fn serve(executor: Executor, durable: Durable, store: Arc<TestStore>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let options = ServerOptions { durable: Some(durable), ..ServerOptions::default() };
        let task = tokio::spawn(async move {
            callout::server::serve_with(Listener::Tcp(listener), executor, options, std::future::pending())
                .await
                .unwrap();
        });
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        Self { client: Client::new(channel.clone()), channel, _task: AbortOnDrop(task), _store: store }
    }
}

/// Backoff of 50 ms doubling, no jitter: retries finish in a test's time.
pub fn quick_retry() -> pb::RetryPolicy {
    pb::RetryPolicy {
        initial_backoff: Some(dur(Duration::from_millis(50))),
        jitter: Some(false),
        ..Default::default()
    }
}

pub fn action(id: &str, method: &str, url: &str) -> pb::ExecuteHttpActionRequest {
    pb::ExecuteHttpActionRequest {
        action_id: id.into(),
        method: method.into(),
        url: url.into(),
        retry: Some(Box::new(quick_retry())),
        ..Default::default()
    }
}

pub fn submit_request(action: pb::ExecuteHttpActionRequest) -> pb::SubmitActionRequest {
    pb::SubmitActionRequest { action: Some(action), not_before: None }
}

pub async fn submit(client: &Client, action: pb::ExecuteHttpActionRequest) -> pb::SubmitActionResponse {
    client.clone().submit(submit_request(action)).await.unwrap().into_inner()
}

pub async fn get(client: &Client, id: &str) -> Result<pb::ActionRecord, tonic::Status> {
    client.clone().get_action(pb::GetActionRequest { action_id: id.into() }).await.map(|r| r.into_inner())
}

/// Polls GetAction until the action is in a final state (at most 30 s).
pub async fn until_final(client: &Client, id: &str) -> pb::ActionRecord {
    until(client, id, |r| {
        matches!(r.state(), ActionState::Succeeded | ActionState::Failed | ActionState::Cancelled)
    })
    .await
}

pub async fn until(client: &Client, id: &str, done: impl Fn(&pb::ActionRecord) -> bool) -> pb::ActionRecord {
    for _ in 0..1500 {
        if let Ok(record) = get(client, id).await {
            if done(&record) {
                return record;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("action {id} did not get there: {:?}", get(client, id).await);
}

/// An upstream that answers the first `failures` requests to each path with 503, then 200,
/// and records every request per path.
pub async fn flaky_per_path(failures: usize) -> (Upstream, Arc<Mutex<HashMap<String, usize>>>) {
    let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let seen = counts.clone();
    let upstream = Upstream::start(move |req| {
        let n = {
            let mut counts = seen.lock().unwrap();
            let n = counts.entry(req.target.clone()).or_default();
            *n += 1;
            *n
        };
        async move {
            if n <= failures {
                text(503, "busy")
            } else {
                text(200, "done")
            }
        }
    })
    .await;
    (upstream, counts)
}

/// An upstream that never answers the first request and answers 200 to the others.
pub async fn hangs_first() -> Upstream {
    let calls = Arc::new(Mutex::new(0usize));
    Upstream::start(move |_| {
        let n = {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            *calls
        };
        async move {
            if n == 1 {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            http::Response::builder().status(200).body(body("done")).unwrap()
        }
    })
    .await
}

async fn submit_is_idempotent_by_action_id(kind: Kind) {
    let upstream = Upstream::fixed(200, "ok").await;
    let server = Server::start(kind, DurableSettings::default()).await;
    let a = action("order-1", "POST", &upstream.url("/orders"));
    let first = submit(&server.client, a.clone()).await;
    assert!(first.created);
    assert_eq!(first.action_id, "order-1");
    let record = first.record.unwrap();
    assert_eq!(record.state(), ActionState::Pending);
    assert!(record.sequence > 0);

    let again = submit(&server.client, a.clone()).await;
    assert!(!again.created, "the same action under a known id is the stored one");
    assert_eq!(again.action_id, "order-1");

    let mut different = a.clone();
    different.url = upstream.url("/other");
    let err = server.client.clone().submit(submit_request(different)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");

    let done = until_final(&server.client, "order-1").await;
    assert_eq!(done.state(), ActionState::Succeeded);
    let result = done.result.unwrap();
    assert_eq!(result.outcome(), pb::Outcome::Succeeded);
    assert_eq!(result.response.unwrap().body_text.as_deref(), Some("ok"));
    assert_eq!(done.attempts.len(), 1);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "a repeated Submit sends nothing more");
    assert_eq!(seen[0].header("idempotency-key").as_deref(), Some("order-1"));
    assert_eq!(submit(&server.client, a).await.record.unwrap().state(), ActionState::Succeeded);
}

async fn an_invalid_action_names_its_fields_and_nothing_is_stored(kind: Kind) {
    let server = Server::start(kind, DurableSettings::default()).await;
    let mut bad = action("bad-1", "FETCH", "ftp://h.test/");
    bad.timeouts = Some(Box::new(pb::Timeouts {
        total: Some(dur(Duration::from_secs(40 * 24 * 3600))),
        ..Default::default()
    }));
    let err = server.client.clone().submit(submit_request(bad)).await.unwrap_err();
    let fields = crate::support::violated_fields(&err);
    for want in ["action.method", "action.url", "action.timeouts.total"] {
        assert!(fields.iter().any(|f| f == want), "{want} in {fields:?}");
    }
    assert_eq!(get(&server.client, "bad-1").await.unwrap_err().code(), Code::NotFound);
    let err = server.client.clone().submit(pb::SubmitActionRequest::default()).await.unwrap_err();
    assert_eq!(crate::support::violated_fields(&err), ["action"]);
}

async fn cancel_stops_pending_and_in_flight_actions(kind: Kind) {
    let upstream = hangs_first().await;
    let server = Server::start(kind, DurableSettings::default()).await;
    // In flight: the upstream holds the first request.
    submit(&server.client, action("c-1", "GET", &upstream.url("/slow"))).await;
    until(&server.client, "c-1", |r| r.state() == ActionState::Running).await;
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled =
        server.client.clone().cancel_action(pb::CancelActionRequest { action_id: "c-1".into() }).await;
    assert_eq!(cancelled.unwrap().into_inner().state(), ActionState::Cancelled);
    let record = until(&server.client, "c-1", |r| !r.attempts.is_empty()).await;
    assert_eq!(record.state(), ActionState::Cancelled);
    assert!(record.attempts[0].error.as_ref().unwrap().message.contains("CancelAction"), "{record:?}");
    // Pending: due in an hour.
    let mut later = submit_request(action("c-2", "GET", &upstream.url("/later")));
    later.not_before = Some((std::time::SystemTime::now() + Duration::from_secs(3600)).into());
    let pending = server.client.clone().submit(later).await.unwrap().into_inner().record.unwrap();
    assert_eq!(pending.state(), ActionState::Pending);
    assert!(pending.next_attempt_at.is_some());
    let cancelled =
        server.client.clone().cancel_action(pb::CancelActionRequest { action_id: "c-2".into() }).await;
    assert_eq!(cancelled.unwrap().into_inner().state(), ActionState::Cancelled);
    assert_eq!(upstream.hits(), 1, "nothing more was sent");
    let unknown =
        server.client.clone().cancel_action(pb::CancelActionRequest { action_id: "nope".into() }).await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
}

async fn failed_actions_are_listed_and_replayed_with_their_history(kind: Kind) {
    let calls = Arc::new(Mutex::new(0usize));
    let upstream = Upstream::start(move |_| {
        let n = {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            *calls
        };
        async move {
            if n == 1 {
                text(500, "broken")
            } else {
                text(200, "fixed")
            }
        }
    })
    .await;
    let server = Server::start(kind, DurableSettings::default()).await;
    // 500 is not retried by default: FAILED after one attempt, the dead-letter list.
    submit(&server.client, action("r-1", "GET", &upstream.url("/job"))).await;
    let failed = until_final(&server.client, "r-1").await;
    assert_eq!(failed.state(), ActionState::Failed);
    assert_eq!(failed.last_error.unwrap().kind(), pb::ErrorKind::UnexpectedStatus);
    let listed = server
        .client
        .clone()
        .list_actions(pb::ListActionsRequest {
            states: vec![ActionState::Failed as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.actions.iter().map(|a| a.action_id.as_str()).collect::<Vec<_>>(), ["r-1"]);

    let replayed =
        server.client.clone().replay_action(pb::ReplayActionRequest { action_id: "r-1".into() }).await;
    assert_eq!(replayed.unwrap().into_inner().state(), ActionState::Pending);
    let done = until_final(&server.client, "r-1").await;
    assert_eq!(done.state(), ActionState::Succeeded);
    let numbers: Vec<u32> = done.attempts.iter().map(|a| a.number).collect();
    assert_eq!(numbers, [1, 2], "history kept");
    assert_eq!(done.result.unwrap().attempts.len(), 2);
    let again =
        server.client.clone().replay_action(pb::ReplayActionRequest { action_id: "r-1".into() }).await;
    assert_eq!(again.unwrap_err().code(), Code::FailedPrecondition);
    let bad = server
        .client
        .clone()
        .list_actions(pb::ListActionsRequest { states: vec![0], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(crate::support::violated_fields(&bad), ["states[0]"]);
}

async fn list_pages_through_every_action(kind: Kind) {
    let server = Server::start(kind, DurableSettings::default()).await;
    let later = (std::time::SystemTime::now() + Duration::from_secs(3600)).into();
    for i in 0..5 {
        let mut request = submit_request(action(&format!("p-{i}"), "GET", "http://127.0.0.1:9/"));
        request.not_before = Some(later);
        server.client.clone().submit(request).await.unwrap();
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = server
            .client
            .clone()
            .list_actions(pb::ListActionsRequest {
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.actions.into_iter().map(|a| a.action_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(ids, ["p-0", "p-1", "p-2", "p-3", "p-4"]);
}

async fn pending_actions_are_bounded(kind: Kind) {
    let server = Server::start(kind, DurableSettings { max_pending: 2, ..DurableSettings::default() }).await;
    let later = (std::time::SystemTime::now() + Duration::from_secs(3600)).into();
    for i in 0..3 {
        let mut request = submit_request(action(&format!("b-{i}"), "GET", "http://127.0.0.1:9/"));
        request.not_before = Some(later);
        let result = server.client.clone().submit(request).await;
        if i < 2 {
            assert!(result.unwrap().into_inner().created);
        } else {
            let err = result.unwrap_err();
            assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
            assert!(err.message().contains("durable.max_pending"), "{}", err.message());
        }
    }
    assert_eq!(get(&server.client, "b-2").await.unwrap_err().code(), Code::NotFound);
    // A finished one frees its place.
    server.client.clone().cancel_action(pb::CancelActionRequest { action_id: "b-0".into() }).await.unwrap();
    let mut request = submit_request(action("b-3", "GET", "http://127.0.0.1:9/"));
    request.not_before = Some(later);
    assert!(server.client.clone().submit(request).await.unwrap().into_inner().created);
    // A replay makes an action unfinished again: it takes a place, or is refused as Submit is.
    let replay = |id: &str| {
        let mut client = server.client.clone();
        let request = pb::ReplayActionRequest { action_id: id.into() };
        async move { client.replay_action(request).await }
    };
    let err = replay("b-0").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("durable.max_pending"), "{}", err.message());
    assert_eq!(get(&server.client, "b-0").await.unwrap().state(), ActionState::Cancelled, "nothing changed");
    server.client.clone().cancel_action(pb::CancelActionRequest { action_id: "b-1".into() }).await.unwrap();
    assert_eq!(replay("b-0").await.unwrap().into_inner().state(), ActionState::Pending);
}

#[tokio::test]
async fn an_unwritable_store_is_unavailable_and_the_rest_serves() {
    let store = Arc::new(TestStore::new(Kind::Sqlite));
    let dir = &store.dir;
    // A regular file where the store's directory should be: not even root can create it.
    std::fs::write(dir.0.join("file"), b"x").unwrap();
    let path = dir.0.join("file").join("actions.db");
    let executor = Executor::new(test_settings()).unwrap();
    let reason = SqliteStore::open(&SqliteSettings { path, max_bytes: None }).err().unwrap().to_string();
    let durable = Durable::unavailable(reason, executor.clone(), DurableSettings::default());
    let server = Server::serve(executor, durable, store.clone()).await;
    let err = server.client.clone().submit(submit_request(action("u-1", "GET", "http://127.0.0.1:9/"))).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("cannot create") && err.message().contains("file"), "{}", err.message());
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "callout.v1.DurableActionService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), tonic_health::pb::health_check_response::ServingStatus::NotServing);
}

#[tokio::test]
async fn a_full_store_refuses_without_a_half_written_record() {
    let store = Arc::new(TestStore::new(Kind::Sqlite));
    let server = Server::start_on(store, DurableSettings::default(), Some(96 * 1024)).await;
    let later: prost_types::Timestamp = (std::time::SystemTime::now() + Duration::from_secs(3600)).into();
    let mut refused = None;
    for i in 0..200 {
        let mut a = action(&format!("f-{i}"), "POST", "http://127.0.0.1:9/");
        a.body = Some(pb::execute_http_action_request::Body::Raw(vec![b'x'; 8192].into()));
        let mut request = submit_request(a);
        request.not_before = Some(later);
        if let Err(e) = server.client.clone().submit(request).await {
            refused = Some((i, e));
            break;
        }
    }
    let (i, err) = refused.expect("the store fills up");
    assert!(i > 0, "some fit before it was full");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("full"), "{}", err.message());
    assert_eq!(get(&server.client, &format!("f-{i}")).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(get(&server.client, "f-0").await.unwrap().state(), ActionState::Pending);
}

async fn health_serves_the_durable_service(kind: Kind) {
    let server = Server::start(kind, DurableSettings::default()).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "callout.v1.DurableActionService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status(), tonic_health::pb::health_check_response::ServingStatus::Serving);
}

/// Collects final records from a watch until `want` distinct actions are final or the stream
/// breaks; returns the last sequence seen.
pub async fn watch_finals(
    client: &Client,
    after: u64,
    finals: &mut Vec<pb::ActionRecord>,
    want: usize,
) -> u64 {
    let mut last = after;
    let request = pb::WatchActionsRequest { after_sequence: after, action_ids: vec![], final_only: true };
    let Ok(stream) = client.clone().watch_actions(request).await else { return last };
    let mut stream = stream.into_inner();
    loop {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(record))) => {
                assert!(record.sequence > last, "sequences increase: {} after {last}", record.sequence);
                last = record.sequence;
                finals.push(record);
                if finals.len() >= want {
                    return last;
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => return last,
            Err(_) => panic!("watch stalled with {} finals", finals.len()),
        }
    }
}

pub async fn durable_client(serve: &ServeProcess) -> Client {
    Client::new(serve.channel().await)
}

async fn a_killed_server_loses_nothing_and_a_watcher_sees_each_final_once(kind: Kind) {
    const N: usize = 100;
    let (upstream, counts) = flaky_per_path(3).await;
    let dir = TestStore::new(kind);
    let store = dir.url();
    // The breaker would open after ten 503s in a row and hold every action for its cool-down.
    let args = ["--store", store.as_str(), "--breaker-failures", "0"];
    let mut first = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&first).await;
    let mut finals = Vec::new();
    let watcher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut finals = Vec::new();
            let last = watch_finals(&client, 0, &mut finals, N).await;
            (finals, last)
        })
    };
    for i in 0..N {
        let reply =
            submit(&client, action(&format!("k-{i}"), "POST", &upstream.url(&format!("/k/{i}")))).await;
        assert!(reply.created);
    }
    // Mid-run: some attempts made, not all actions done.
    while counts.lock().unwrap().values().sum::<usize>() < N {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.kill();
    let _ = first.exit_status(Duration::from_secs(10)).await;
    let (before, last) = watcher.await.unwrap();
    assert!(before.len() < N, "killed mid-run: {} already final", before.len());
    finals.extend(before);

    let second = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&second).await;
    let want = N - finals.len();
    let mut after = Vec::new();
    watch_finals(&client, last, &mut after, want).await;
    finals.extend(after);

    let mut by_id: HashMap<String, usize> = HashMap::new();
    for record in &finals {
        assert_eq!(record.state(), ActionState::Succeeded, "{record:?}");
        *by_id.entry(record.action_id.clone()).or_default() += 1;
    }
    assert_eq!(by_id.len(), N, "every action reached its final state");
    assert!(by_id.values().all(|n| *n == 1), "each final seen once: {by_id:?}");
    for i in 0..N {
        let record = get(&client, &format!("k-{i}")).await.unwrap();
        assert_eq!(record.state(), ActionState::Succeeded);
        assert!(record.attempts.len() >= 4, "3 failures then success: {record:?}");
        assert_eq!(record.result.unwrap().attempts.len(), record.attempts.len());
    }
    assert!(counts.lock().unwrap().values().all(|n| *n >= 4));
}

async fn a_post_in_flight_at_a_kill_is_repeated_with_the_same_idempotency_key(kind: Kind) {
    let upstream = hangs_first().await;
    let dir = TestStore::new(kind);
    let store = dir.url();
    let args = ["--store", store.as_str()];
    let mut first = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&first).await;
    let mut post = action("pay-7", "POST", &upstream.url("/payments"));
    post.body = Some(pb::execute_http_action_request::Body::Json(r#"{"amount":7}"#.into()));
    submit(&client, post).await;
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    let _ = first.exit_status(Duration::from_secs(10)).await;

    let second = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&second).await;
    let done = until_final(&client, "pay-7").await;
    assert_eq!(done.state(), ActionState::Succeeded, "{done:?}");
    let interrupted = done.attempts[0].error.as_ref().unwrap();
    assert!(interrupted.message.contains("may have been sent"), "{interrupted:?}");
    let keys: Vec<_> = upstream.seen().iter().map(|s| s.header("idempotency-key")).collect();
    assert_eq!(keys, [Some("pay-7".to_owned()), Some("pay-7".to_owned())]);
}

async fn a_post_without_a_key_in_flight_at_a_kill_fails_instead_of_repeating(kind: Kind) {
    let upstream = hangs_first().await;
    let dir = TestStore::new(kind);
    let store = dir.url();
    let args = ["--store", store.as_str()];
    let env = [("CALLOUT_DURABLE__IDEMPOTENCY_HEADER", ""), LEASE_ENV];
    let mut first = ServeProcess::spawn(&args, &env).await;
    let client = durable_client(&first).await;
    submit(&client, action("pay-8", "POST", &upstream.url("/payments"))).await;
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    let _ = first.exit_status(Duration::from_secs(10)).await;
    let second = ServeProcess::spawn(&args, &env).await;
    let done = until_final(&durable_client(&second).await, "pay-8").await;
    assert_eq!(done.state(), ActionState::Failed);
    assert!(done.last_error.unwrap().message.contains("not repeated"));
    assert_eq!(upstream.hits(), 1, "not sent again");
    assert!(upstream.seen()[0].header("idempotency-key").is_none());
}

async fn a_drain_leaves_pending_actions_stored_for_the_next_start_and_the_gauges_count_them(kind: Kind) {
    // A SIGTERM drain stops claiming; what is pending stays stored for the next start.
    let dir = TestStore::new(kind);
    let store = dir.url();
    let args = ["--store", store.as_str()];
    let mut first = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&first).await;
    let mut later = submit_request(action("d-1", "GET", "http://127.0.0.1:9/"));
    later.not_before = Some((std::time::SystemTime::now() + Duration::from_secs(3600)).into());
    client.clone().submit(later).await.unwrap();
    first.terminate();
    assert!(first.exit_status(Duration::from_secs(20)).await.is_some_and(|s| s.success()));
    if kind == Kind::Sqlite {
        assert!(dir.dir.0.join("actions.db").exists());
    }
    let second = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let record = get(&durable_client(&second).await, "d-1").await.unwrap();
    assert_eq!(record.state(), ActionState::Pending);
    // The gauges count it (they refresh every second).
    let metrics = second.metrics.clone().expect("metrics on");
    let mut pending = None;
    for _ in 0..100 {
        let text = metrics_text(&metrics).await;
        pending = text
            .lines()
            .find(|l| l.starts_with("callout_durable_actions{") && l.contains("state=\"pending\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if pending == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending, Some(1.0));
}

/// `/metrics` of a sidecar, over plain HTTP/1.1.
pub async fn metrics_text(addr: &str) -> String {
    crate::support::http_get(addr, "/metrics").await
}

async fn watch_filters_by_id_and_resumes_after_a_sequence(kind: Kind) {
    let upstream = Upstream::fixed(200, "ok").await;
    let server = Server::start(kind, DurableSettings::default()).await;
    for id in ["w-1", "w-2"] {
        submit(&server.client, action(id, "GET", &upstream.url("/w"))).await;
        until_final(&server.client, id).await;
    }
    let watch = |after: u64, ids: Vec<String>, final_only: bool| {
        let mut client = server.client.clone();
        async move {
            let request = pb::WatchActionsRequest { after_sequence: after, action_ids: ids, final_only };
            let mut stream = client.watch_actions(request).await.unwrap().into_inner();
            let mut seen = Vec::new();
            // The stream stays open for new changes: read what is stored, then stop.
            while let Ok(Ok(Some(record))) =
                tokio::time::timeout(Duration::from_millis(500), stream.message()).await
            {
                seen.push(record);
            }
            seen
        }
    };
    let one = watch(0, vec!["w-2".into()], false).await;
    let states: Vec<_> = one.iter().map(|r| r.state()).collect();
    assert_eq!(states, [ActionState::Pending, ActionState::Running, ActionState::Succeeded]);
    assert!(one.iter().all(|r| r.action_id == "w-2"));
    assert!(one.windows(2).all(|w| w[0].sequence < w[1].sequence));
    let rest = watch(one[0].sequence, vec!["w-2".into()], false).await;
    assert_eq!(rest, one[1..].to_vec(), "resuming after a sequence gives what followed it, once");
    let finals = watch(0, vec![], true).await;
    let ids: Vec<_> = finals.iter().map(|r| r.action_id.as_str()).collect();
    assert_eq!(ids, ["w-1", "w-2"]);
    assert!(finals[1].result.is_some());
}

async fn a_backlog_to_a_stuck_host_does_not_hold_up_other_hosts(kind: Kind) {
    // The stuck host never answers; each destination may have two attempts in flight, the
    // runner four in all.
    let stuck = Upstream::start(|_| async {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        text(200, "late")
    })
    .await;
    let fast = Upstream::fixed(200, "ok").await;
    let settings = DurableSettings {
        max_concurrent: 4,
        max_concurrent_per_destination: 2,
        ..DurableSettings::default()
    };
    let server = Server::start(kind, settings).await;
    for i in 0..20 {
        submit(&server.client, action(&format!("stuck-{i}"), "GET", &stuck.url("/"))).await;
    }
    submit(&server.client, action("fast-1", "GET", &fast.url("/"))).await;
    assert_eq!(until_final(&server.client, "fast-1").await.state(), ActionState::Succeeded);
    assert!(stuck.hits() <= 2, "the stuck host holds at most its share: {}", stuck.hits());
    let pending = server
        .client
        .clone()
        .list_actions(pb::ListActionsRequest {
            states: vec![ActionState::Pending as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pending.actions.len() >= 18, "the backlog waits its turn: {}", pending.actions.len());
}

async fn an_attempt_cut_off_by_the_drain_runs_again_at_the_next_start(kind: Kind) {
    let upstream = hangs_first().await;
    let dir = TestStore::new(kind);
    let store = dir.url();
    let args = ["--store", store.as_str(), "--drain-timeout", "1s"];
    let mut first = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let client = durable_client(&first).await;
    submit(&client, action("cut-1", "POST", &upstream.url("/cut"))).await;
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.terminate();
    assert!(first.exit_status(Duration::from_secs(20)).await.is_some(), "the drain ends");
    let second = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let done = until_final(&durable_client(&second).await, "cut-1").await;
    assert_eq!(done.state(), ActionState::Succeeded, "{done:?}");
    assert_eq!(done.attempts[0].error.as_ref().unwrap().kind(), pb::ErrorKind::Cancelled);
    let keys: Vec<_> = upstream.seen().iter().map(|s| s.header("idempotency-key")).collect();
    assert_eq!(keys, [Some("cut-1".to_owned()), Some("cut-1".to_owned())]);
}

/// A durable action polls through its retry_condition as Execute does: every attempt
/// recorded, the result the done job's, with what it extracted.
async fn a_durable_retry_condition_polls_until_the_job_is_done(kind: Kind) {
    let upstream = crate::conditions::job().await;
    let server = Server::start(kind, DurableSettings::default()).await;
    let a = pb::ExecuteHttpActionRequest {
        retry_condition: r#"body.state != "done""#.into(),
        extract: [("id".to_string(), "$.id".to_string())].into(),
        ..action("job-1", "GET", &upstream.url("/job"))
    };
    submit(&server.client, a).await;
    let record = until_final(&server.client, "job-1").await;
    assert_eq!(record.state(), ActionState::Succeeded, "{record:?}");
    assert_eq!(record.attempts.len(), 3, "{record:?}");
    let result = record.result.unwrap();
    assert_eq!(result.extracted["id"].kind, Some(prost_types::value::Kind::NumberValue(7.0)));
    assert_eq!(upstream.hits(), 3);
}
