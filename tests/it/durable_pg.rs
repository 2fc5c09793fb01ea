//! The PostgreSQL store's own promises, against a real PostgreSQL (tests/it/pg.rs): two real
//! `callout` replicas on one database share its queue (both run attempts, none twice); a replica
//! killed mid-attempt keeps its action while its lease is renewed and loses it to the other
//! only after the lease runs out; a cancel on one replica aborts the attempt another runs; a
//! watcher on one replica sees every replica's changes in order with no gaps; stores opened at
//! once on an empty database migrate it once; PostgreSQL stopped: Submit is UNAVAILABLE saying
//! so, the attempt in flight gets its result written when it is back, and nothing crashes. Store-level: claims fair across tenants and destinations,
//! and an expired lease taken over by one store only.
use crate::{
    durable::{
        action, durable_client, get, hangs_first, pg_settings, submit, submit_request, until_final, Client,
        LEASE_ENV,
    },
    pg::{Postgres, DATABASE},
    support::{text, ServeProcess, Upstream},
};
use bytes::Bytes;
use callout::{
    pb::{self, ActionState},
    store::{postgres::PostgresStore, ActionStore, ClaimRequest, NewAction, State},
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};
use tokio::sync::Notify;
use tonic::Code;

/// Two replicas of `callout serve` on the database, with `env` and the tests' short lease.
async fn replicas(url: &str, env: &[(&str, &str)]) -> (ServeProcess, ServeProcess) {
    let mut env = env.to_vec();
    env.push(LEASE_ENV);
    let args = ["--store", url];
    let a = ServeProcess::spawn(&args, &env).await;
    let b = ServeProcess::spawn(&args, &env).await;
    (a, b)
}

#[tokio::test]
async fn two_replicas_share_one_queue_and_run_each_action_once() {
    const N: usize = 24;
    let pg = Postgres::start();
    // Each replica has at most two attempts in flight: four at once means both are running
    // attempts. The upstream holds every request until four are in.
    let in_flight = Arc::new(Mutex::new((0usize, 0usize)));
    let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let upstream = {
        let (in_flight, hits) = (in_flight.clone(), hits.clone());
        Upstream::start(move |req| {
            *hits.lock().unwrap().entry(req.target.clone()).or_default() += 1;
            let in_flight = in_flight.clone();
            async move {
                {
                    let mut f = in_flight.lock().unwrap();
                    f.0 += 1;
                    f.1 = f.1.max(f.0);
                }
                // Held until four were in at once (at most 20 s).
                for _ in 0..2000 {
                    if in_flight.lock().unwrap().1 >= 4 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                in_flight.lock().unwrap().0 -= 1;
                text(200, "ok")
            }
        })
        .await
    };
    let env = [("CALLOUT_DURABLE__MAX_CONCURRENT", "2")];
    let (a, b) = replicas(&pg.url(DATABASE), &env).await;
    let (ca, cb) = (durable_client(&a).await, durable_client(&b).await);
    for i in 0..N {
        let client = if i % 2 == 0 { &ca } else { &cb };
        submit(client, action(&format!("q-{i}"), "GET", &upstream.url(&format!("/q/{i}")))).await;
    }
    for i in 0..N {
        let client = if i % 3 == 0 { &ca } else { &cb };
        let done = until_final(client, &format!("q-{i}")).await;
        assert_eq!(done.state(), ActionState::Succeeded, "{done:?}");
        assert_eq!(done.attempts.len(), 1, "{done:?}");
    }
    assert_eq!(in_flight.lock().unwrap().1, 4, "both replicas ran attempts at once, two each at most");
    let hits = hits.lock().unwrap();
    assert_eq!(hits.len(), N);
    assert!(hits.values().all(|n| *n == 1), "no action was sent twice: {hits:?}");
}

#[tokio::test]
async fn a_replica_killed_mid_attempt_keeps_its_lease_while_alive_and_loses_it_after() {
    let pg = Postgres::start();
    let upstream = hangs_first().await;
    let url = pg.url(DATABASE);
    let args = ["--store", url.as_str()];
    // Only A runs when the action is due, so A holds the attempt.
    let mut a = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let ca = durable_client(&a).await;
    let mut post = action("lease-1", "POST", &upstream.url("/pay"));
    post.body = Some(pb::execute_http_action_request::Body::Json(r#"{"amount":1}"#.into()));
    submit(&ca, post).await;
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let cb = durable_client(&b).await;
    // Three leases long: A renews, so B must not take the action over.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(upstream.hits(), 1, "no second replica runs an action whose lease holds");
    assert_eq!(get(&cb, "lease-1").await.unwrap().state(), ActionState::Running);
    a.kill();
    let _ = a.exit_status(Duration::from_secs(10)).await;
    let done = until_final(&cb, "lease-1").await;
    assert_eq!(done.state(), ActionState::Succeeded, "{done:?}");
    let interrupted = done.attempts[0].error.as_ref().unwrap();
    assert!(interrupted.message.contains("may have been sent"), "{interrupted:?}");
    let keys: Vec<_> = upstream.seen().iter().map(|s| s.header("idempotency-key")).collect();
    assert_eq!(keys, [Some("lease-1".to_owned()), Some("lease-1".to_owned())]);
    assert!(b.logs().contains("interrupted attempt taken over"), "{}", b.logs());
}

#[tokio::test]
async fn a_cancel_on_one_replica_aborts_the_attempt_running_on_another() {
    let pg = Postgres::start();
    let upstream = hangs_first().await;
    let url = pg.url(DATABASE);
    let args = ["--store", url.as_str()];
    let a = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    submit(&durable_client(&a).await, action("x-1", "GET", &upstream.url("/slow"))).await;
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let b = ServeProcess::spawn(&args, &[LEASE_ENV]).await;
    let cb = durable_client(&b).await;
    let cancelled = cb.clone().cancel_action(pb::CancelActionRequest { action_id: "x-1".into() }).await;
    assert_eq!(cancelled.unwrap().into_inner().state(), ActionState::Cancelled);
    // A learns it at its next renewal (a third of the lease) and aborts the attempt.
    let record = crate::durable::until(&cb, "x-1", |r| !r.attempts.is_empty()).await;
    assert_eq!(record.state(), ActionState::Cancelled);
    assert!(record.attempts[0].error.as_ref().unwrap().message.contains("CancelAction"), "{record:?}");
    assert!(a.logs().contains("no longer ours"), "{}", a.logs());
    assert_eq!(upstream.hits(), 1, "nothing more was sent");
}

/// Every change from `after` on until `want` have come (at most a minute).
async fn watch_all(client: &Client, after: u64, want: usize) -> Vec<pb::ActionRecord> {
    let request = pb::WatchActionsRequest { after_sequence: after, action_ids: vec![], final_only: false };
    let mut stream = client.clone().watch_actions(request).await.unwrap().into_inner();
    let mut seen = Vec::new();
    while seen.len() < want {
        match tokio::time::timeout(Duration::from_secs(60), stream.message()).await {
            Ok(Ok(Some(record))) => seen.push(record),
            other => panic!("the watch ended after {} of {want}: {other:?}", seen.len()),
        }
    }
    seen
}

#[tokio::test]
async fn a_watcher_on_one_replica_sees_every_replicas_changes_in_order_without_gaps() {
    const N: usize = 30;
    let pg = Postgres::start();
    let upstream = Upstream::fixed(200, "ok").await;
    let (a, b) = replicas(&pg.url(DATABASE), &[]).await;
    let (ca, cb) = (durable_client(&a).await, durable_client(&b).await);
    // Each action: PENDING, RUNNING, SUCCEEDED.
    let watcher = {
        let ca = ca.clone();
        tokio::spawn(async move { watch_all(&ca, 0, 3 * N).await })
    };
    // Submitted mostly through B, concurrently, so both replicas write at once.
    let mut submits = Vec::new();
    for i in 0..N {
        let client = if i % 4 == 0 { ca.clone() } else { cb.clone() };
        let a = action(&format!("w-{i}"), "GET", &upstream.url("/w"));
        submits.push(tokio::spawn(async move { submit(&client, a).await }));
    }
    for s in submits {
        assert!(s.await.unwrap().created);
    }
    let on_a = watcher.await.unwrap();
    let sequences: Vec<u64> = on_a.iter().map(|r| r.sequence).collect();
    assert_eq!(sequences, (1..=3 * N as u64).collect::<Vec<_>>(), "every change, in order, no gap");
    for i in 0..N {
        let id = format!("w-{i}");
        let states: Vec<_> = on_a.iter().filter(|r| r.action_id == id).map(|r| r.state()).collect();
        assert_eq!(states, [ActionState::Pending, ActionState::Running, ActionState::Succeeded], "{id}");
    }
    // B's watch from any point agrees with A's.
    let on_b = watch_all(&cb, 10, 3 * N - 10).await;
    assert_eq!(on_b, on_a[10..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_opened_at_once_on_an_empty_database_migrate_it_once() {
    let pg = Postgres::start();
    let url = pg.create_database("fresh");
    let opens = (0..4).map(|_| {
        let settings = pg_settings(&url);
        tokio::spawn(async move { PostgresStore::open(&settings).await })
    });
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.unwrap().expect("every store comes up"));
    }
    let now = SystemTime::now();
    let submitted = stores[0].submit(new_action("m-1", "", "h:80", now)).await.unwrap();
    assert!(matches!(submitted, callout::store::Submitted::Created(_)));
    for store in &stores {
        assert!(store.get("m-1").await.unwrap().is_some(), "one schema, seen by every store");
    }
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let versions = client.query("SELECT version FROM callout_schema", &[]).await.unwrap();
    assert_eq!(versions.len(), 1, "each migration applied once");
}

#[tokio::test]
async fn postgres_down_submit_is_unavailable_and_the_attempt_in_flight_is_recorded_when_it_is_back() {
    let mut pg = Postgres::start();
    let release = Arc::new(Notify::new());
    let upstream = {
        let release = release.clone();
        Upstream::start(move |_| {
            let release = release.clone();
            async move {
                let _ = tokio::time::timeout(Duration::from_secs(30), release.notified()).await;
                text(200, "late but fine")
            }
        })
        .await
    };
    let url = pg.url(DATABASE);
    let mut serve = ServeProcess::spawn(&["--store", url.as_str()], &[LEASE_ENV]).await;
    let client = durable_client(&serve).await;
    submit(&client, action("down-1", "GET", &upstream.url("/slow"))).await;
    while upstream.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pg.stop();
    let refused = client.clone().submit(submit_request(action("down-2", "GET", &upstream.url("/x")))).await;
    let err = refused.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("PostgreSQL at postgres://callout@127.0.0.1")
            && err.message().contains("unreachable"),
        "{}",
        err.message()
    );
    // The attempt ends while the database is down; its end waits for it.
    release.notify_waiters();
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.resume();
    let done = until_final(&client, "down-1").await;
    assert_eq!(done.state(), ActionState::Succeeded, "{done:?}");
    assert_eq!(done.attempts.len(), 1, "the attempt in flight is the one recorded: {done:?}");
    assert_eq!(upstream.hits(), 1, "nothing sent again");
    // Submit works again once the pool has reconnected.
    let mut accepted = None;
    for _ in 0..100 {
        let again = client.clone().submit(submit_request(action("down-3", "GET", &upstream.url("/y")))).await;
        if let Ok(reply) = again {
            accepted = Some(reply.into_inner());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(accepted.is_some_and(|r| r.created), "Submit is served again");
    assert!(serve.exit_status(Duration::ZERO).await.is_none(), "callout did not crash");
}

#[tokio::test]
async fn a_replica_started_before_postgres_serves_once_it_is_up() {
    let mut pg = Postgres::start();
    let url = pg.url(DATABASE);
    pg.stop();
    let serve = ServeProcess::spawn(&["--store", url.as_str()], &[LEASE_ENV]).await;
    let client = durable_client(&serve).await;
    let upstream = Upstream::fixed(200, "ok").await;
    let err = client.clone().submit(submit_request(action("early-1", "GET", &upstream.url("/")))).await;
    let err = err.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("not ready yet"), "{}", err.message());
    pg.resume();
    let mut created = false;
    for _ in 0..300 {
        if let Ok(reply) =
            client.clone().submit(submit_request(action("early-1", "GET", &upstream.url("/")))).await
        {
            created = reply.into_inner().created;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(created, "migrated and serving once PostgreSQL is up");
    assert_eq!(until_final(&client, "early-1").await.state(), ActionState::Succeeded);
}

fn new_action(id: &str, tenant: &str, destination: &str, now: SystemTime) -> NewAction {
    NewAction {
        action_id: id.into(),
        request: Bytes::from_static(b"request"),
        tenant: tenant.into(),
        destination: destination.into(),
        due_at: now,
        total: Duration::from_secs(3600),
        now,
        max_pending: 1000,
    }
}

fn claim(now: SystemTime, limit: usize, per_destination: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest { now, lease, limit, per_destination, busy: vec![] }
}

#[tokio::test]
async fn claims_are_fair_across_tenants_then_destinations() {
    let pg = Postgres::start();
    let store = PostgresStore::open(&pg_settings(&pg.url(DATABASE))).await.unwrap();
    let now = SystemTime::now();
    // Tenant "big" floods one host, then has one action to another; "small" has one.
    for i in 0..40 {
        store.submit(new_action(&format!("big-{i}"), "big", "slow:443", now)).await.unwrap();
    }
    store.submit(new_action("big-other", "big", "other:443", now)).await.unwrap();
    store.submit(new_action("small-1", "small", "slow:443", now)).await.unwrap();
    let claims = store.claim(claim(now, 3, 10, Duration::from_secs(60))).await.unwrap();
    let ids: Vec<_> = claims.claimed.iter().map(|c| c.stored.record.action_id.as_str()).collect();
    assert!(ids.contains(&"small-1"), "the small tenant is not starved: {ids:?}");
    assert!(ids.contains(&"big-other"), "within a tenant, round robin across hosts: {ids:?}");
    assert!(claims.claimed.iter().all(|c| c.stored.record.state == State::Running && c.attempt == 1));
    // A destination's running attempts count against its share.
    let mut busy = claim(now, 10, 3, Duration::from_secs(60));
    busy.busy = vec![("slow:443".into(), 2)];
    assert_eq!(store.claim(busy).await.unwrap().claimed.len(), 1, "one more place for the slow host");
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_by_one_store_and_the_first_owner_loses_it() {
    let pg = Postgres::start();
    let url = pg.url(DATABASE);
    let first = PostgresStore::open(&pg_settings(&url)).await.unwrap();
    let second = PostgresStore::open(&pg_settings(&url)).await.unwrap();
    let third = PostgresStore::open(&pg_settings(&url)).await.unwrap();
    let now = SystemTime::now();
    first.submit(new_action("l-1", "", "h:80", now)).await.unwrap();
    // Generous margins: each check is at least a second away from a lease's end.
    let claimed = first.claim(claim(now, 1, 1, Duration::from_secs(2))).await.unwrap().claimed;
    assert_eq!(claimed.len(), 1);
    assert!(second.claim(claim(now, 1, 1, Duration::from_secs(2))).await.unwrap().claimed.is_empty());
    assert!(second.orphans(now, 10).await.unwrap().is_empty(), "the lease holds");
    // Renewed before it runs out, it holds past its first end.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(first.renew("l-1", 1, SystemTime::now() + Duration::from_secs(3)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(second.orphans(SystemTime::now(), 10).await.unwrap().is_empty(), "the renewal holds");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let taken = second.orphans(SystemTime::now(), 10).await.unwrap();
    assert_eq!(taken.len(), 1, "expired: taken over");
    assert_eq!(taken[0].attempt, 1);
    assert!(third.orphans(SystemTime::now(), 10).await.unwrap().is_empty(), "by one store only");
    assert!(
        !first.renew("l-1", 1, SystemTime::now() + Duration::from_secs(1)).await.unwrap(),
        "the first owner's renewal fails once another took the lease"
    );
}
