//! The PostgreSQL store: one database shared by a fleet of callout replicas, any of which may
//! run any due action. A pooled async client (tokio-postgres under deadpool), no TLS (the
//! database is reached over a loopback or a private network).
//!
//! Tables (prefixed `callout_`, so the store may share a database): `actions`, `attempts` and
//! `changes` as in the SQLite store, `sequence` (one row: the last change's sequence and the
//! count of unfinished actions) and `schema` (the migrations applied).
//!
//! - **Sequence.** A change's number comes from the one row of `callout_sequence`, updated in
//!   the change's own transaction (`UPDATE … SET last = last + n RETURNING last`). The row lock
//!   is held until commit, so writers take numbers one after another and commit in that order:
//!   a reader that sees change N sees every change before it. (A plain SEQUENCE is not: a
//!   transaction that took 5 may commit after one that took 6, and a watcher that read 6 would
//!   skip 5.) Writers serialise on that row only for the end of their transaction, after their
//!   action rows are locked (always in that order, so no deadlock); fine at a sidecar's rate.
//!   The same row counts unfinished actions for `durable.max_pending`.
//! - **Wake-ups.** A transaction that writes changes sends `NOTIFY callout_changes` (delivered
//!   at commit); every replica LISTENs on a connection of its own and also polls the sequence
//!   every POLL, since notifications sent while its listener reconnects are lost. The sequence
//!   is the truth, the notification only a wake-up.
//! - **Leases** are on the database's clock (`now()`), so replicas' clock skew cannot hand an
//!   attempt to a second replica early: `claim` leases until `now() + lease`, `renew` extends by
//!   what the caller asks from its own `now`, and an orphan is a RUNNING action whose lease is
//!   before the database's `now()`. Each store has an owner id: `renew` succeeds only for the
//!   owner, and taking an orphan over makes the taker its owner. Due times (`next_attempt_at`)
//!   stay on the callers' clocks, as given: skew only shifts when an attempt runs.
//! - **Claims** lock due rows with `FOR UPDATE SKIP LOCKED`, so replicas claiming at once take
//!   different actions; they are ordered round robin across tenants first, then across
//!   destinations within a tenant.
//! - **Migrations** run at open in one transaction under `pg_advisory_xact_lock`, so replicas
//!   starting at once apply each version once. PostgreSQL unreachable at start: the store
//!   answers UNAVAILABLE and migrates in the background as soon as it can.
//! - **Unreachable database.** A call that cannot get a connection is UNAVAILABLE with the
//!   cause; reconnecting backs off (calls in the back-off window fail at once rather than each
//!   waiting for a connect timeout).
use super::{
    from_millis, sqlite::Snapshot, to_millis, ActionStore, ClaimRequest, Claimed, Claims, Finish, NewAction,
    Next, Record, State, Stats, StoreError, StoreFuture, Stored, Submitted,
};
use bytes::Bytes;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use prost::Message as _;
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant, SystemTime},
};
use tokio::sync::watch;
use tokio_postgres::{types::ToSql, AsyncMessage, NoTls, Row};

/// The channel of change notifications.
const CHANNEL: &str = "callout_changes";
/// How often the sequence is read when no notification came (the fallback for notifications
/// lost while the listener reconnects).
const POLL: Duration = Duration::from_secs(1);
/// The advisory lock keys: migrations ("callout" + 1) and purges ("callout" + 2).
const MIGRATE_LOCK: i64 = 0x6361_6c6c_6f75_7401;
const PURGE_LOCK: i64 = 0x6361_6c6c_6f75_7402;
/// Reconnect back-off: from the first to the last, doubling.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// The change listener's reconnects back off up to this (polls go on meanwhile).
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Migration retries at start while the database is unreachable back off up to this.
const MIGRATE_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The schema, one migration per version (`callout_schema` lists those applied).
const MIGRATIONS: &[&str] = &[
    // 1: actions, attempts, changes, the sequence row.
    "CREATE TABLE callout_sequence (
        id BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (id),
        last BIGINT NOT NULL,
        unfinished BIGINT NOT NULL
    );
    INSERT INTO callout_sequence (id, last, unfinished) VALUES (TRUE, 0, 0);
    CREATE TABLE callout_actions (
        id BIGSERIAL PRIMARY KEY,
        action_id TEXT NOT NULL UNIQUE,
        request BYTEA NOT NULL,
        tenant TEXT NOT NULL DEFAULT '',
        destination TEXT NOT NULL,
        state INTEGER NOT NULL,
        sequence BIGINT NOT NULL,
        next_attempt_at BIGINT,
        lease_until TIMESTAMPTZ,
        owner TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        run_base INTEGER NOT NULL DEFAULT 0,
        total_ms BIGINT NOT NULL,
        deadline_at BIGINT NOT NULL,
        final_at BIGINT,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX callout_actions_due ON callout_actions (state, next_attempt_at);
    CREATE INDEX callout_actions_final ON callout_actions (final_at) WHERE final_at IS NOT NULL;
    CREATE INDEX callout_actions_sequence ON callout_actions (sequence);
    CREATE TABLE callout_attempts (
        action_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        started_at BIGINT NOT NULL,
        record BYTEA,
        PRIMARY KEY (action_id, number)
    );
    CREATE TABLE callout_changes (
        sequence BIGINT PRIMARY KEY,
        action_id TEXT NOT NULL,
        committed_at BIGINT NOT NULL,
        snapshot BYTEA NOT NULL
    );
    CREATE INDEX callout_changes_action ON callout_changes (action_id);
    CREATE INDEX callout_changes_time ON callout_changes (committed_at);",
];

/// Settings of the PostgreSQL store.
#[derive(Clone)]
pub struct PostgresSettings {
    /// The connection URL (it may hold a password: never printed).
    pub url: String,
    /// The URL without its password, for logs and errors.
    pub shown: String,
    /// Pooled connections at most.
    pub pool_size: usize,
    /// Connecting, or waiting for a pooled connection, at most this long.
    pub connect_timeout: Duration,
    /// How long a store that takes an orphan over holds it before another may (it stores the
    /// interrupted attempt's end right away): the durable lease.
    pub orphan_hold: Duration,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &self.shown)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("orphan_hold", &self.orphan_hold)
            .finish()
    }
}

/// The PostgreSQL store. Cheap to clone; its listener ends with the last clone.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    config: tokio_postgres::Config,
    connect_timeout: Duration,
    orphan_hold: Duration,
    shown: String,
    /// This store's id as a lease owner.
    owner: String,
    /// The schema is migrated: calls may run.
    ready: AtomicBool,
    /// Why the store is not ready yet.
    not_ready: Mutex<String>,
    /// The last committed sequence seen (our commits, notifications, polls).
    sequence: watch::Sender<u64>,
    backoff: Mutex<Backoff>,
}

/// Reconnect back-off: calls fail at once until `until`.
#[derive(Default)]
struct Backoff {
    until: Option<Instant>,
    next: Duration,
    cause: String,
}

/// Why opening failed: worth retrying (the database is unreachable) or not (a newer schema).
enum OpenError {
    Retry(StoreError),
    Fatal(StoreError),
}

impl PostgresStore {
    /// Connects and migrates the store. An unreachable database does not fail the open: the
    /// store answers UNAVAILABLE and keeps trying in the background. A schema newer than this
    /// callout knows does fail it. Call inside the runtime.
    pub async fn open(settings: &PostgresSettings) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = settings.url.parse().map_err(|_| {
            StoreError::Unavailable(format!("{} is not a valid PostgreSQL URL", settings.shown))
        })?;
        config.connect_timeout(settings.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("callout");
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.connect_timeout))
            .create_timeout(Some(settings.connect_timeout))
            .recycle_timeout(Some(settings.connect_timeout))
            .build()
            .map_err(|e| StoreError::Unavailable(format!("cannot build the PostgreSQL pool: {e}")))?;
        let (sequence, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            pool,
            config,
            connect_timeout: settings.connect_timeout,
            orphan_hold: settings.orphan_hold,
            shown: settings.shown.clone(),
            owner: uuid::Uuid::new_v4().to_string(),
            ready: AtomicBool::new(false),
            not_ready: Mutex::new("migrating".into()),
            sequence,
            backoff: Mutex::default(),
        });
        match inner.migrate().await {
            Ok(()) => Inner::ready(&inner).await,
            Err(OpenError::Fatal(e)) => return Err(e),
            Err(OpenError::Retry(e)) => {
                tracing::error!(error = %e, store = %inner.shown, "action store: cannot migrate yet; trying again in the background");
                *lock(&inner.not_ready) = e.to_string();
                tokio::spawn(Inner::migrate_later(Arc::downgrade(&inner)));
            }
        }
        Ok(Self { inner })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `Result<_, tokio_postgres::Error>` → `StoreError::Unavailable` naming the database.
trait Pg<T> {
    fn pg(self, inner: &Inner) -> Result<T, StoreError>;
}

impl<T> Pg<T> for Result<T, tokio_postgres::Error> {
    fn pg(self, inner: &Inner) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Unavailable(format!("PostgreSQL at {}: {}", inner.shown, describe(&e))))
    }
}

/// An error with its cause (tokio-postgres' own text is often just "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn row_u64(row: &Row, i: usize) -> u64 {
    row.get::<_, i64>(i).max(0) as u64
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Inner {
    async fn migrate(&self) -> Result<(), OpenError> {
        let retry = |e: StoreError| OpenError::Retry(e);
        let mut client = self.connect().await.map_err(retry)?;
        let tx = client.transaction().await.pg(self).map_err(retry)?;
        // Replicas starting at once wait here for each other: each version is applied once.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK]).await.pg(self).map_err(retry)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS callout_schema (
                 version INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .pg(self)
        .map_err(retry)?;
        let version: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM callout_schema", &[])
            .await
            .pg(self)
            .map_err(retry)?
            .get(0);
        let known = MIGRATIONS.len() as i32;
        if version > known {
            return Err(OpenError::Fatal(StoreError::Unavailable(format!(
                "PostgreSQL at {} has schema version {version}; this callout knows up to {known}: run a newer callout",
                self.shown
            ))));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let v = i as i32 + 1;
            tx.batch_execute(sql).await.pg(self).map_err(retry)?;
            tx.execute("INSERT INTO callout_schema (version) VALUES ($1)", &[&v])
                .await
                .pg(self)
                .map_err(retry)?;
            tracing::info!(store = %self.shown, version = v, "action store migrated");
        }
        tx.commit().await.pg(self).map_err(retry)?;
        Ok(())
    }

    /// Retries the migrations with back-off until they pass (or the store is dropped).
    async fn migrate_later(weak: Weak<Inner>) {
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::time::sleep(wait).await;
            let Some(inner) = weak.upgrade() else { return };
            match inner.migrate().await {
                Ok(()) => {
                    tracing::info!(store = %inner.shown, "action store: PostgreSQL reached and migrated");
                    Inner::ready(&inner).await;
                    return;
                }
                Err(OpenError::Retry(e)) | Err(OpenError::Fatal(e)) => {
                    tracing::warn!(error = %e, "action store: cannot migrate yet");
                    *lock(&inner.not_ready) = e.to_string();
                }
            }
            wait = (wait * 2).min(MIGRATE_BACKOFF_MAX);
        }
    }

    /// Migrated: reads the sequence, opens the calls and starts the listener.
    async fn ready(inner: &Arc<Inner>) {
        if let Ok(last) = inner.read_sequence().await {
            inner.seen(last);
        }
        inner.ready.store(true, Ordering::SeqCst);
        tokio::spawn(Inner::listen(Arc::downgrade(inner)));
    }

    /// A pooled connection, or why there is none.
    async fn connect(&self) -> Result<Object, StoreError> {
        {
            let backoff = lock(&self.backoff);
            if let Some(until) = backoff.until.filter(|u| *u > Instant::now()) {
                let left = until.saturating_duration_since(Instant::now());
                return Err(StoreError::Unavailable(format!(
                    "PostgreSQL at {} is unreachable ({}); reconnecting in {} ms",
                    self.shown,
                    backoff.cause,
                    left.as_millis()
                )));
            }
        }
        match self.pool.get().await {
            Ok(client) => {
                *lock(&self.backoff) = Backoff::default();
                Ok(client)
            }
            Err(e) => {
                let cause = match e {
                    deadpool_postgres::PoolError::Backend(e) => describe(&e),
                    deadpool_postgres::PoolError::Timeout(_) => format!(
                        "no connection within store.postgres.connect_timeout ({})",
                        humantime::format_duration(self.connect_timeout)
                    ),
                    other => other.to_string(),
                };
                let mut backoff = lock(&self.backoff);
                backoff.next = (backoff.next * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
                backoff.until = Some(Instant::now() + backoff.next);
                backoff.cause = cause.clone();
                Err(StoreError::Unavailable(format!("PostgreSQL at {} is unreachable: {cause}", self.shown)))
            }
        }
    }

    /// A connection for a call: UNAVAILABLE until the store is migrated.
    async fn client(&self) -> Result<Object, StoreError> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(format!(
                "PostgreSQL at {} is not ready yet: {}",
                self.shown,
                lock(&self.not_ready)
            )));
        }
        self.connect().await
    }

    fn seen(&self, sequence: u64) {
        self.sequence.send_if_modified(|last| {
            let newer = sequence > *last;
            if newer {
                *last = sequence;
            }
            newer
        });
    }

    async fn read_sequence(&self) -> Result<u64, StoreError> {
        let client = self.connect().await?;
        let row = client.query_one("SELECT last FROM callout_sequence", &[]).await.pg(self)?;
        Ok(row_u64(&row, 0))
    }

    /// LISTENs on a connection of its own and polls the sequence every POLL; reconnects with
    /// back-off. Ends when the store is dropped.
    async fn listen(weak: Weak<Inner>) {
        let mut wait = BACKOFF_FIRST;
        loop {
            let Some(inner) = weak.upgrade() else { return };
            let (config, timeout) = (inner.config.clone(), inner.connect_timeout);
            drop(inner);
            let connected = match tokio::time::timeout(timeout, config.connect(NoTls)).await {
                Ok(Ok(pair)) => Some(pair),
                Ok(Err(e)) => {
                    tracing::debug!(error = %describe(&e), "action store: the change listener cannot connect");
                    None
                }
                Err(_) => None,
            };
            let mut notes: Option<watch::Receiver<u64>> = None;
            let mut _client = None;
            if let Some((client, mut connection)) = connected {
                // The highest sequence notified (a notification that does not parse wakes a
                // poll); it ends with the connection.
                let (tx, rx) = watch::channel(0u64);
                tokio::spawn(async move {
                    while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => {
                                let n: u64 = n.payload().parse().unwrap_or(0);
                                tx.send_modify(|last| *last = (*last).max(n));
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                });
                if client.batch_execute(&format!("LISTEN {CHANNEL}")).await.is_ok() {
                    wait = BACKOFF_FIRST;
                    notes = Some(rx);
                    _client = Some(client);
                }
            }
            // Listening (or not): poll once now for what came while the listener was away,
            // then on every notification and every POLL. Not listening: the listener is tried
            // again after the back-off.
            let retry_at = notes.is_none().then(|| {
                let at = Instant::now() + wait;
                wait = (wait * 2).min(LISTEN_BACKOFF_MAX);
                at
            });
            let mut tick = tokio::time::interval(POLL);
            loop {
                let note = match notes.as_mut() {
                    Some(rx) => tokio::select! {
                        changed = rx.changed() => match changed {
                            Ok(()) => Some(*rx.borrow_and_update()),
                            // The listener's connection ended.
                            Err(_) => break,
                        },
                        _ = tick.tick() => None,
                    },
                    None => {
                        tick.tick().await;
                        None
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                match note {
                    Some(n) if n > 0 => inner.seen(n),
                    _ => {
                        if let Ok(last) = inner.read_sequence().await {
                            inner.seen(last);
                        }
                    }
                }
                if retry_at.is_some_and(|at| at <= Instant::now()) {
                    break;
                }
            }
            tracing::debug!("action store: change listener reconnecting");
        }
    }

    /// The action's stored row and latest snapshot; `lock` takes the row for this transaction.
    async fn stored<C: GenericClient>(
        &self,
        c: &C,
        action_id: &str,
        lock: bool,
    ) -> Result<Option<(Stored, String)>, StoreError> {
        let sql = if lock {
            "SELECT a.request, a.sequence, a.attempts, a.run_base, a.deadline_at, a.destination, c.snapshot
             FROM callout_actions a JOIN callout_changes c ON c.sequence = a.sequence
             WHERE a.action_id = $1 FOR UPDATE OF a"
        } else {
            "SELECT a.request, a.sequence, a.attempts, a.run_base, a.deadline_at, a.destination, c.snapshot
             FROM callout_actions a JOIN callout_changes c ON c.sequence = a.sequence
             WHERE a.action_id = $1"
        };
        let stmt = c.prepare_cached(sql).await.pg(self)?;
        let Some(row) = c.query_opt(&stmt, &[&action_id]).await.pg(self)? else {
            return Ok(None);
        };
        let sequence = row_u64(&row, 1);
        let snapshot = decode(sequence, row.get(6))?;
        let record = snapshot.record(action_id.to_owned(), sequence)?;
        Ok(Some((
            Stored {
                record,
                request: Bytes::from(row.get::<_, Vec<u8>>(0)),
                attempts_started: row.get::<_, i32>(2).max(0) as u32,
                run_base: row.get::<_, i32>(3).max(0) as u32,
                deadline_at: from_millis(row.get(4)),
            },
            row.get(5),
        )))
    }

    async fn rows<C: GenericClient>(
        &self,
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let stmt = c.prepare_cached(sql).await.pg(self)?;
        c.query(&stmt, params).await.pg(self)
    }

    async fn exec<C: GenericClient>(
        &self,
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let stmt = c.prepare_cached(sql).await.pg(self)?;
        c.execute(&stmt, params).await.pg(self)
    }

    /// Takes `n` sequence numbers (the row lock serialises writers until commit; see the module
    /// doc) and moves the unfinished count by `unfinished`; returns the first number.
    async fn reserve<C: GenericClient>(&self, c: &C, n: usize, unfinished: i64) -> Result<u64, StoreError> {
        let rows = self
            .rows(
                c,
                "UPDATE callout_sequence SET last = last + $1, unfinished = unfinished + $2 RETURNING last",
                &[&(n as i64), &unfinished],
            )
            .await?;
        let last = rows.first().map(|r| row_u64(r, 0)).ok_or_else(|| {
            StoreError::Corrupt(format!("PostgreSQL at {}: the callout_sequence row is missing", self.shown))
        })?;
        Ok(last + 1 - n as u64)
    }

    /// The next sequence, for a change that makes one more action unfinished; `Full` when
    /// `max_pending` are (the row is locked by the update, so replicas cannot both take the last
    /// place).
    async fn reserve_unfinished<C: GenericClient>(&self, c: &C, max_pending: u64) -> Result<u64, StoreError> {
        let max = max_pending.min(i64::MAX as u64) as i64;
        let taken = self
            .rows(
                c,
                "UPDATE callout_sequence SET last = last + 1, unfinished = unfinished + 1
                 WHERE unfinished < $1 RETURNING last",
                &[&max],
            )
            .await?;
        if let Some(sequence) = taken.first().map(|r| row_u64(r, 0)) {
            return Ok(sequence);
        }
        let pending = self.rows(c, "SELECT unfinished FROM callout_sequence", &[]).await?;
        let pending = pending.first().map(|r| row_u64(r, 0)).unwrap_or(0);
        Err(StoreError::Full { pending, max: max_pending })
    }

    /// Writes `snapshot` as change `sequence` of the action.
    async fn change<C: GenericClient>(
        &self,
        c: &C,
        action_id: &str,
        sequence: u64,
        snapshot: &Snapshot,
    ) -> Result<(), StoreError> {
        self.exec(
            c,
            "INSERT INTO callout_changes (sequence, action_id, committed_at, snapshot) VALUES ($1, $2, $3, $4)",
            &[&(sequence as i64), &action_id, &snapshot.updated_at, &snapshot.encode_to_vec()],
        )
        .await?;
        self.exec(
            c,
            "UPDATE callout_actions SET sequence = $2 WHERE action_id = $1",
            &[&action_id, &(sequence as i64)],
        )
        .await?;
        Ok(())
    }

    /// The wake-up for every replica, delivered when the transaction commits.
    async fn notify<C: GenericClient>(&self, c: &C, last: u64) -> Result<(), StoreError> {
        self.exec(c, "SELECT pg_notify($1, $2)", &[&CHANNEL, &last.to_string()]).await?;
        Ok(())
    }

    async fn submit(&self, new: NewAction) -> Result<Submitted, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.pg(self)?;
        let now = to_millis(new.now);
        let due = to_millis(new.due_at);
        let total = new.total.as_millis().min(i64::MAX as u128) as i64;
        let state = State::Pending as i32;
        let deadline = due.max(now).saturating_add(total);
        // The row first, the sequence last (the lock order of every writer).
        let inserted = self
            .rows(
                &tx,
                "INSERT INTO callout_actions (action_id, request, tenant, destination, state, sequence,
                     next_attempt_at, total_ms, deadline_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8, $9)
                 ON CONFLICT (action_id) DO NOTHING RETURNING id",
                &[
                    &new.action_id,
                    &new.request.as_ref(),
                    &new.tenant,
                    &new.destination,
                    &state,
                    &due,
                    &total,
                    &deadline,
                    &now,
                ],
            )
            .await?;
        if inserted.is_empty() {
            let stored = self.stored(&tx, &new.action_id, false).await?;
            tx.commit().await.pg(self)?;
            let (stored, _) = stored
                .ok_or_else(|| StoreError::Corrupt(format!("action {} has no change", new.action_id)))?;
            return Ok(Submitted::Existing(stored));
        }
        let sequence = match self.reserve_unfinished(&tx, new.max_pending).await {
            Ok(sequence) => sequence,
            Err(e) => {
                tx.rollback().await.pg(self)?;
                return Err(e);
            }
        };
        let snapshot = Snapshot {
            state,
            next_attempt_at: Some(due),
            created_at: now,
            updated_at: now,
            ..Snapshot::default()
        };
        self.change(&tx, &new.action_id, sequence, &snapshot).await?;
        self.notify(&tx, sequence).await?;
        tx.commit().await.pg(self)?;
        self.seen(sequence);
        let record = snapshot.record(new.action_id.clone(), sequence)?;
        Ok(Submitted::Created(Stored {
            record,
            request: new.request,
            attempts_started: 0,
            run_base: 0,
            deadline_at: from_millis(deadline),
        }))
    }

    async fn get(&self, action_id: &str) -> Result<Option<Stored>, StoreError> {
        let client = self.client().await?;
        Ok(self.stored(&client, action_id, false).await?.map(|(s, _)| s))
    }

    async fn list(
        &self,
        states: Vec<State>,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Record>, u64), StoreError> {
        let client = self.client().await?;
        let states: Vec<i32> = states.iter().map(|s| *s as i32).collect();
        let rows = self
            .rows(
                &client,
                "SELECT a.id, a.action_id, a.sequence, c.snapshot
                 FROM callout_actions a JOIN callout_changes c ON c.sequence = a.sequence
                 WHERE a.id > $1 AND (cardinality($2::int4[]) = 0 OR a.state = ANY($2))
                 ORDER BY a.id LIMIT $3",
                &[&(after.min(i64::MAX as u64) as i64), &states, &(limit as i64)],
            )
            .await?;
        let last = rows.last().map(|r| row_u64(r, 0)).unwrap_or(after);
        let records = rows
            .iter()
            .map(|r| {
                let sequence = row_u64(r, 2);
                decode(sequence, r.get(3))?.record(r.get(1), sequence)
            })
            .collect::<Result<_, _>>()?;
        Ok((records, last))
    }

    async fn changes(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let client = self.client().await?;
        let rows = self
            .rows(
                &client,
                "SELECT sequence, action_id, snapshot FROM callout_changes WHERE sequence > $1
                 ORDER BY sequence LIMIT $2",
                &[&(after.min(i64::MAX as u64) as i64), &(limit as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let sequence = row_u64(r, 0);
                decode(sequence, r.get(2))?.record(r.get(1), sequence)
            })
            .collect()
    }

    async fn claim(&self, claim: ClaimRequest) -> Result<Claims, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.pg(self)?;
        let now = to_millis(claim.now);
        // As in the SQLite store, a busy destination's rows beyond its room are passed over, so
        // the window is widened by what they may take.
        let window =
            claim.limit + claim.busy.iter().map(|(_, n)| (*n).min(claim.per_destination)).sum::<usize>();
        // Round robin across tenants (tn: a row's place in its tenant's queue, which is itself
        // round robin across the tenant's destinations: dn), each destination at most
        // per_destination rows deep. Rows another replica holds are skipped.
        let due = self
            .rows(
                &tx,
                "SELECT a.id, a.action_id, a.destination
                 FROM callout_actions a JOIN (
                     SELECT id, next_attempt_at,
                         ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY dn, next_attempt_at, id) AS tn
                     FROM (
                         SELECT id, tenant, next_attempt_at,
                             ROW_NUMBER() OVER (PARTITION BY tenant, destination
                                                ORDER BY next_attempt_at, id) AS dn
                         FROM callout_actions WHERE state = $1 AND next_attempt_at <= $2
                     ) d WHERE dn <= $3
                 ) r ON r.id = a.id
                 WHERE a.state = $1 AND a.next_attempt_at <= $2
                 ORDER BY r.tn, r.next_attempt_at, r.id
                 LIMIT $4
                 FOR UPDATE OF a SKIP LOCKED",
                &[&(State::Pending as i32), &now, &(claim.per_destination as i64), &(window as i64)],
            )
            .await?;
        let mut taken: std::collections::HashMap<String, usize> = claim.busy.into_iter().collect();
        let mut ids: Vec<i64> = Vec::new();
        for row in &due {
            if ids.len() >= claim.limit {
                break;
            }
            let n = taken.entry(row.get(2)).or_default();
            if *n >= claim.per_destination {
                continue;
            }
            *n += 1;
            ids.push(row.get(0));
        }
        let mut claimed = Vec::with_capacity(ids.len());
        if !ids.is_empty() {
            let started = self
                .rows(
                    &tx,
                    "UPDATE callout_actions SET state = $2, attempts = attempts + 1, next_attempt_at = NULL,
                         lease_until = now() + ($3::float8 * interval '1 millisecond'), owner = $4
                     WHERE id = ANY($1)
                     RETURNING id, action_id, request, attempts, run_base, deadline_at, destination, sequence",
                    &[&ids, &(State::Running as i32), &millis(claim.lease), &self.owner],
                )
                .await?;
            let sequences: Vec<i64> = started.iter().map(|r| r.get(7)).collect();
            let snapshots = self
                .rows(
                    &tx,
                    "SELECT sequence, snapshot FROM callout_changes WHERE sequence = ANY($1)",
                    &[&sequences],
                )
                .await?;
            let snapshots: std::collections::HashMap<i64, Vec<u8>> =
                snapshots.iter().map(|r| (r.get(0), r.get(1))).collect();
            // In the ranked order.
            let mut started: Vec<&Row> = started.iter().collect();
            started.sort_by_key(|r| ids.iter().position(|id| *id == r.get::<_, i64>(0)));
            let first = self.reserve(&tx, started.len(), 0).await?;
            let (mut action_ids, mut numbers, mut seqs, mut blobs) = (vec![], vec![], vec![], vec![]);
            for (i, row) in started.iter().enumerate() {
                let action_id: String = row.get(1);
                let old: i64 = row.get(7);
                let blob = snapshots
                    .get(&old)
                    .ok_or_else(|| StoreError::Corrupt(format!("action {action_id} has no change {old}")))?;
                let mut snapshot = decode(old as u64, blob.clone())?;
                snapshot.state = State::Running as i32;
                snapshot.next_attempt_at = None;
                snapshot.updated_at = now;
                let sequence = first + i as u64;
                let attempt = row.get::<_, i32>(3).max(0) as u32;
                blobs.push(snapshot.encode_to_vec());
                seqs.push(sequence as i64);
                numbers.push(attempt as i32);
                action_ids.push(action_id.clone());
                let record = snapshot.record(action_id, sequence)?;
                claimed.push(Claimed {
                    stored: Stored {
                        record,
                        request: Bytes::from(row.get::<_, Vec<u8>>(2)),
                        attempts_started: attempt,
                        run_base: row.get::<_, i32>(4).max(0) as u32,
                        deadline_at: from_millis(row.get(5)),
                    },
                    attempt,
                    destination: row.get(6),
                });
            }
            self.exec(
                &tx,
                "INSERT INTO callout_attempts (action_id, number, started_at, record)
                 SELECT u.action_id, u.number, $3, NULL FROM unnest($1::text[], $2::int4[]) AS u(action_id, number)
                 ON CONFLICT (action_id, number) DO UPDATE SET started_at = EXCLUDED.started_at, record = NULL",
                &[&action_ids, &numbers, &now],
            )
            .await?;
            self.exec(
                &tx,
                "INSERT INTO callout_changes (sequence, action_id, committed_at, snapshot)
                 SELECT u.sequence, u.action_id, $3, u.snapshot
                 FROM unnest($1::int8[], $2::text[], $4::bytea[]) AS u(sequence, action_id, snapshot)",
                &[&seqs, &action_ids, &now, &blobs],
            )
            .await?;
            self.exec(
                &tx,
                "UPDATE callout_actions a SET sequence = u.sequence
                 FROM unnest($1::text[], $2::int8[]) AS u(action_id, sequence) WHERE a.action_id = u.action_id",
                &[&action_ids, &seqs],
            )
            .await?;
            self.notify(&tx, first + started.len() as u64 - 1).await?;
        }
        let next_due = self
            .rows(
                &tx,
                "SELECT MIN(next_attempt_at) FROM callout_actions WHERE state = $1",
                &[&(State::Pending as i32)],
            )
            .await?;
        let next_due: Option<i64> = next_due.first().and_then(|r| r.get(0));
        tx.commit().await.pg(self)?;
        if let Some(last) = claimed.last() {
            self.seen(last.stored.record.sequence);
        }
        Ok(Claims { claimed, next_due: next_due.map(from_millis) })
    }

    async fn renew(&self, action_id: &str, attempt: u32, until: SystemTime) -> Result<bool, StoreError> {
        let client = self.client().await?;
        // The caller's lease, as a length from its own clock, starts at the database's now().
        let lease = until.duration_since(SystemTime::now()).unwrap_or_default();
        let n = self
            .exec(
                &client,
                "UPDATE callout_actions SET lease_until = now() + ($3::float8 * interval '1 millisecond')
                 WHERE action_id = $1 AND attempts = $2 AND state = $4 AND owner = $5",
                &[&action_id, &(attempt as i32), &millis(lease), &(State::Running as i32), &self.owner],
            )
            .await?;
        Ok(n == 1)
    }

    async fn orphans(&self, limit: usize) -> Result<Vec<Claimed>, StoreError> {
        let client = self.client().await?;
        // Taken over: this store becomes the owner for `orphan_hold`, so no other replica takes
        // the same orphan while this one stores its end. (An expired lease of this store's own
        // attempt still running here is so renewed: the runner skips the attempts it runs.)
        let ids = self
            .rows(
                &client,
                "UPDATE callout_actions SET lease_until = now() + ($3::float8 * interval '1 millisecond'),
                     owner = $4
                 WHERE id IN (
                     SELECT id FROM callout_actions
                     WHERE state = $1 AND (lease_until IS NULL OR lease_until < now())
                     ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED
                 ) RETURNING action_id",
                &[&(State::Running as i32), &(limit as i64), &millis(self.orphan_hold), &self.owner],
            )
            .await?;
        let mut orphans = Vec::with_capacity(ids.len());
        for row in ids {
            let id: String = row.get(0);
            if let Some((stored, destination)) = self.stored(&client, &id, false).await? {
                let attempt = stored.attempts_started;
                orphans.push(Claimed { stored, attempt, destination });
            }
        }
        Ok(orphans)
    }

    async fn finish_attempt(&self, finish: Finish) -> Result<Option<Record>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.pg(self)?;
        let now = to_millis(finish.now);
        let id = finish.action_id.as_str();
        let number = finish.attempt as i32;
        let found = self.stored(&tx, id, true).await?;
        let written = match &finish.record {
            Some(record) => {
                self.exec(
                    &tx,
                    "UPDATE callout_attempts SET record = $3
                     WHERE action_id = $1 AND number = $2 AND record IS NULL",
                    &[&id, &number, &record.as_ref()],
                )
                .await?
            }
            None => {
                self.exec(
                    &tx,
                    "DELETE FROM callout_attempts WHERE action_id = $1 AND number = $2 AND record IS NULL",
                    &[&id, &number],
                )
                .await?
            }
        };
        let Some((stored, _)) = found else {
            tx.commit().await.pg(self)?;
            return Ok(None);
        };
        let ours = stored.record.state == State::Running && stored.attempts_started == finish.attempt;
        let mut snapshot = Snapshot {
            state: stored.record.state as i32,
            attempts: stored.record.attempts.clone(),
            next_attempt_at: stored.record.next_attempt_at.map(to_millis),
            last_error: stored.record.last_error.clone(),
            result: stored.record.result.clone(),
            next_step: stored.record.next_step.clone(),
            created_at: to_millis(stored.record.created_at),
            updated_at: to_millis(stored.record.updated_at),
        };
        // Only when this call wrote it: a replica that took the attempt over may have first.
        let pushed = match (&finish.record, written) {
            (Some(record), 1) => {
                snapshot.attempts.push(record.clone());
                true
            }
            _ => false,
        };
        if !ours {
            // Cancelled (or taken over) meanwhile: the attempt joins the history without a
            // change of state.
            if pushed {
                self.exec(
                    &tx,
                    "UPDATE callout_changes SET snapshot = $2 WHERE sequence = $1",
                    &[&(stored.record.sequence as i64), &snapshot.encode_to_vec()],
                )
                .await?;
            }
            tx.commit().await.pg(self)?;
            return Ok(None);
        }
        snapshot.updated_at = now;
        let attempts_delta: i32 = if finish.record.is_none() { 1 } else { 0 };
        let unfinished = match finish.next {
            Next::Retry { at, last_error, next_step } => {
                let at = to_millis(at);
                snapshot.state = State::Pending as i32;
                snapshot.next_attempt_at = Some(at);
                snapshot.next_step = next_step;
                if last_error.is_some() {
                    snapshot.last_error = last_error;
                }
                self.exec(
                    &tx,
                    "UPDATE callout_actions SET state = $2, next_attempt_at = $3, lease_until = NULL,
                         owner = NULL, attempts = attempts - $4 WHERE action_id = $1",
                    &[&id, &(State::Pending as i32), &at, &attempts_delta],
                )
                .await?;
                0
            }
            Next::Final { state, last_error, result } => {
                snapshot.state = state as i32;
                snapshot.next_attempt_at = None;
                snapshot.last_error = last_error;
                snapshot.result = Some(result);
                snapshot.next_step = None;
                self.exec(
                    &tx,
                    "UPDATE callout_actions SET state = $2, next_attempt_at = NULL, lease_until = NULL,
                         owner = NULL, final_at = $3, attempts = attempts - $4 WHERE action_id = $1",
                    &[&id, &(state as i32), &now, &attempts_delta],
                )
                .await?;
                -1
            }
        };
        let sequence = self.reserve(&tx, 1, unfinished).await?;
        self.change(&tx, id, sequence, &snapshot).await?;
        self.notify(&tx, sequence).await?;
        tx.commit().await.pg(self)?;
        self.seen(sequence);
        Ok(Some(snapshot.record(id.to_owned(), sequence)?))
    }

    async fn cancel(&self, action_id: &str, now: SystemTime) -> Result<Option<Record>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.pg(self)?;
        let Some((stored, _)) = self.stored(&tx, action_id, true).await? else {
            return Ok(None);
        };
        if !stored.record.state.check_cancel(action_id)? {
            return Ok(Some(stored.record));
        }
        let now = to_millis(now);
        self.exec(
            &tx,
            "UPDATE callout_actions SET state = $2, next_attempt_at = NULL, lease_until = NULL, owner = NULL,
                 final_at = $3 WHERE action_id = $1",
            &[&action_id, &(State::Cancelled as i32), &now],
        )
        .await?;
        let mut snapshot = snapshot_of(&stored.record);
        snapshot.state = State::Cancelled as i32;
        snapshot.next_attempt_at = None;
        snapshot.updated_at = now;
        let sequence = self.reserve(&tx, 1, -1).await?;
        self.change(&tx, action_id, sequence, &snapshot).await?;
        self.notify(&tx, sequence).await?;
        tx.commit().await.pg(self)?;
        self.seen(sequence);
        Ok(Some(snapshot.record(action_id.to_owned(), sequence)?))
    }

    async fn replay(
        &self,
        action_id: &str,
        now: SystemTime,
        max_pending: u64,
    ) -> Result<Option<Record>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.pg(self)?;
        let Some((stored, _)) = self.stored(&tx, action_id, true).await? else {
            return Ok(None);
        };
        stored.record.state.check_replay(action_id)?;
        let now = to_millis(now);
        self.exec(
            &tx,
            "UPDATE callout_actions SET state = $2, next_attempt_at = $3, lease_until = NULL, owner = NULL,
                 final_at = NULL, run_base = attempts, deadline_at = $3 + total_ms WHERE action_id = $1",
            &[&action_id, &(State::Pending as i32), &now],
        )
        .await?;
        let mut snapshot = snapshot_of(&stored.record);
        snapshot.state = State::Pending as i32;
        snapshot.next_attempt_at = Some(now);
        snapshot.result = None;
        snapshot.next_step = None;
        snapshot.updated_at = now;
        let sequence = match self.reserve_unfinished(&tx, max_pending).await {
            Ok(sequence) => sequence,
            Err(e) => {
                tx.rollback().await.pg(self)?;
                return Err(e);
            }
        };
        self.change(&tx, action_id, sequence, &snapshot).await?;
        self.notify(&tx, sequence).await?;
        tx.commit().await.pg(self)?;
        self.seen(sequence);
        Ok(Some(snapshot.record(action_id.to_owned(), sequence)?))
    }

    async fn purge(&self, before: SystemTime) -> Result<u64, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.pg(self)?;
        // One replica purges at a time; the others skip this round.
        let locked = self.rows(&tx, "SELECT pg_try_advisory_xact_lock($1)", &[&PURGE_LOCK]).await?;
        if !locked.first().is_some_and(|r| r.get::<_, bool>(0)) {
            return Ok(0);
        }
        let before = to_millis(before);
        // At most 1000 actions a call, as in the SQLite store.
        let picked: Vec<String> = self
            .rows(
                &tx,
                "SELECT action_id FROM callout_actions WHERE final_at IS NOT NULL AND final_at < $1
                 ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED",
                &[&before],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut n = 0;
        if !picked.is_empty() {
            self.exec(&tx, "DELETE FROM callout_changes WHERE action_id = ANY($1)", &[&picked]).await?;
            self.exec(&tx, "DELETE FROM callout_attempts WHERE action_id = ANY($1)", &[&picked]).await?;
            n = self.exec(&tx, "DELETE FROM callout_actions WHERE action_id = ANY($1)", &[&picked]).await?;
        }
        // Changes older than the retention that are no action's latest.
        self.exec(
            &tx,
            "DELETE FROM callout_changes WHERE sequence IN (
                 SELECT c.sequence FROM callout_changes c WHERE c.committed_at < $1
                 AND NOT EXISTS (SELECT 1 FROM callout_actions a WHERE a.sequence = c.sequence) LIMIT 10000)",
            &[&before],
        )
        .await?;
        tx.commit().await.pg(self)?;
        Ok(n)
    }

    async fn stats(&self, now: SystemTime) -> Result<Stats, StoreError> {
        let client = self.client().await?;
        let now = to_millis(now);
        let mut stats = Stats::default();
        let rows = self
            .rows(
                &client,
                "SELECT state, attempts > run_base, COUNT(*) FROM callout_actions WHERE state IN ($1, $2)
                 GROUP BY 1, 2",
                &[&(State::Pending as i32), &(State::Running as i32)],
            )
            .await?;
        for row in rows {
            let n = row_u64(&row, 2);
            match (State::from_i64(i64::from(row.get::<_, i32>(0))), row.get::<_, bool>(1)) {
                (Some(State::Running), _) => stats.running += n,
                (Some(State::Pending), false) => stats.pending += n,
                (Some(State::Pending), true) => stats.retry_waiting += n,
                _ => {}
            }
        }
        let oldest = self
            .rows(
                &client,
                "SELECT MIN(next_attempt_at) FROM callout_actions WHERE state = $1 AND next_attempt_at <= $2",
                &[&(State::Pending as i32), &now],
            )
            .await?;
        let oldest: Option<i64> = oldest.first().and_then(|r| r.get(0));
        stats.oldest_due = oldest.map(|t| Duration::from_millis((now - t).max(0) as u64)).unwrap_or_default();
        Ok(stats)
    }
}

fn decode(sequence: u64, blob: Vec<u8>) -> Result<Snapshot, StoreError> {
    Snapshot::decode(blob.as_slice()).map_err(|e| StoreError::Corrupt(format!("change {sequence}: {e}")))
}

/// The snapshot a record was read from.
fn snapshot_of(record: &Record) -> Snapshot {
    Snapshot {
        state: record.state as i32,
        attempts: record.attempts.clone(),
        next_attempt_at: record.next_attempt_at.map(to_millis),
        last_error: record.last_error.clone(),
        result: record.result.clone(),
        next_step: record.next_step.clone(),
        created_at: to_millis(record.created_at),
        updated_at: to_millis(record.updated_at),
    }
}

impl ActionStore for PostgresStore {
    fn submit(&self, new: NewAction) -> StoreFuture<'_, Submitted> {
        Box::pin(self.inner.submit(new))
    }

    fn get(&self, action_id: &str) -> StoreFuture<'_, Option<Stored>> {
        let id = action_id.to_owned();
        Box::pin(async move { self.inner.get(&id).await })
    }

    fn list(&self, states: Vec<State>, after: u64, limit: usize) -> StoreFuture<'_, (Vec<Record>, u64)> {
        Box::pin(self.inner.list(states, after, limit))
    }

    fn changes(&self, after_sequence: u64, limit: usize) -> StoreFuture<'_, Vec<Record>> {
        Box::pin(self.inner.changes(after_sequence, limit))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.sequence.subscribe()
    }

    fn claim(&self, claim: ClaimRequest) -> StoreFuture<'_, Claims> {
        Box::pin(self.inner.claim(claim))
    }

    fn renew(&self, action_id: &str, attempt: u32, until: SystemTime) -> StoreFuture<'_, bool> {
        let id = action_id.to_owned();
        Box::pin(async move { self.inner.renew(&id, attempt, until).await })
    }

    /// `now` is not used: leases are on the database's clock (see the module doc).
    fn orphans(&self, _now: SystemTime, limit: usize) -> StoreFuture<'_, Vec<Claimed>> {
        Box::pin(self.inner.orphans(limit))
    }

    fn finish_attempt(&self, finish: Finish) -> StoreFuture<'_, Option<Record>> {
        Box::pin(self.inner.finish_attempt(finish))
    }

    fn cancel(&self, action_id: &str, now: SystemTime) -> StoreFuture<'_, Option<Record>> {
        let id = action_id.to_owned();
        Box::pin(async move { self.inner.cancel(&id, now).await })
    }

    fn replay(&self, action_id: &str, now: SystemTime, max_pending: u64) -> StoreFuture<'_, Option<Record>> {
        let id = action_id.to_owned();
        Box::pin(async move { self.inner.replay(&id, now, max_pending).await })
    }

    fn purge(&self, before: SystemTime) -> StoreFuture<'_, u64> {
        Box::pin(self.inner.purge(before))
    }

    fn stats(&self, now: SystemTime) -> StoreFuture<'_, Stats> {
        Box::pin(self.inner.stats(now))
    }
}
