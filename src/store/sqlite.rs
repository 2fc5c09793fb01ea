//! The embedded store: one SQLite file (WAL, `synchronous = FULL`, so a commit survives power
//! loss as SQLite promises) owned by one dedicated thread. Calls queue up for that thread, which
//! runs every call waiting at that moment in one transaction and replies to each only after the
//! commit: many concurrent Submits share one fsync (group commit), and no blocking SQLite call
//! runs on a tokio thread. The file is opened in exclusive locking mode, so a second callout on
//! the same file fails at start instead of running the same actions twice; and because no other
//! process can hold a lease, the leases of a previous run are expired when the store opens.
//!
//! Tables: `actions` (one row per action: the request, scheduling columns (tenant, destination,
//! due time, lease) and the sequence of its latest change), `attempts` (one row per attempt; a row without a record is an attempt
//! that was started and may have been sent), `changes` (one row per state change, numbered
//! in commit order, holding the record as of that change: what WatchActions replays) and
//! `tenant_turns` (when each tenant was last served by a claim).
use super::{
    from_millis, to_millis, ActionStore, ClaimRequest, Claimed, Claims, Finish, NewAction, Next, Record,
    State, Stats, StoreError, StoreFuture, Stored, Submitted,
};
use bytes::Bytes;
use prost::Message as _;
use rusqlite::{params, Connection, OptionalExtension};
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};
use tokio::sync::{mpsc, oneshot, watch};

/// Calls queued for the store thread before callers wait to queue more.
const QUEUE: usize = 4096;
/// Most calls in one transaction.
const BATCH: usize = 512;

/// The schema, one migration per version (PRAGMA user_version counts how many were applied).
const MIGRATIONS: &[&str] = &[
    // 1: actions, attempts, changes.
    "CREATE TABLE actions (
        id INTEGER PRIMARY KEY,
        action_id TEXT NOT NULL UNIQUE,
        request BLOB NOT NULL,
        destination TEXT NOT NULL,
        state INTEGER NOT NULL,
        sequence INTEGER NOT NULL,
        next_attempt_at INTEGER,
        lease_until INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        run_base INTEGER NOT NULL DEFAULT 0,
        total_ms INTEGER NOT NULL,
        deadline_at INTEGER NOT NULL,
        final_at INTEGER,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX actions_due ON actions (state, next_attempt_at);
    CREATE INDEX actions_final ON actions (final_at) WHERE final_at IS NOT NULL;
    CREATE TABLE attempts (
        action_id TEXT NOT NULL,
        number INTEGER NOT NULL,
        started_at INTEGER NOT NULL,
        record BLOB,
        PRIMARY KEY (action_id, number)
    ) WITHOUT ROWID;
    CREATE TABLE changes (
        sequence INTEGER PRIMARY KEY AUTOINCREMENT,
        action_id TEXT NOT NULL,
        committed_at INTEGER NOT NULL,
        snapshot BLOB NOT NULL
    );
    CREATE INDEX changes_action ON changes (action_id);
    CREATE INDEX changes_time ON changes (committed_at);",
    // 2: the action's tenant, for fairness across tenants ('' for none, as every action stored
    // before tenants existed), and when each tenant was last served (the sequence of its last
    // claim), so tenants take turns across claims.
    "ALTER TABLE actions ADD COLUMN tenant TEXT NOT NULL DEFAULT '';
    CREATE TABLE tenant_turns (tenant TEXT PRIMARY KEY, served INTEGER NOT NULL) WITHOUT ROWID;",
];

/// A record as of one change, as the `changes` table keeps it (the PostgreSQL store keeps the
/// same encoding).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct Snapshot {
    #[prost(int32, tag = "1")]
    pub(super) state: i32,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub(super) attempts: Vec<Bytes>,
    #[prost(int64, optional, tag = "3")]
    pub(super) next_attempt_at: Option<i64>,
    #[prost(bytes = "bytes", optional, tag = "4")]
    pub(super) last_error: Option<Bytes>,
    #[prost(bytes = "bytes", optional, tag = "5")]
    pub(super) result: Option<Bytes>,
    #[prost(int64, tag = "6")]
    pub(super) created_at: i64,
    #[prost(int64, tag = "7")]
    pub(super) updated_at: i64,
    /// `Record::next_step`; absent in snapshots written before it existed.
    #[prost(bytes = "bytes", optional, tag = "8")]
    pub(super) next_step: Option<Bytes>,
}

impl Snapshot {
    pub(super) fn record(self, action_id: String, sequence: u64) -> Result<Record, StoreError> {
        let state = State::from_i64(i64::from(self.state))
            .ok_or_else(|| StoreError::Corrupt(format!("action {action_id}: state {}", self.state)))?;
        Ok(Record {
            action_id,
            state,
            sequence,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at.map(from_millis),
            last_error: self.last_error,
            result: self.result,
            next_step: self.next_step,
            created_at: from_millis(self.created_at),
            updated_at: from_millis(self.updated_at),
        })
    }
}

/// Settings of the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteSettings {
    pub path: PathBuf,
    /// Largest size of the database file in bytes; past it writes fail as a full disk would
    /// (UNAVAILABLE, nothing stored). `None`: as large as the disk allows.
    pub max_bytes: Option<u64>,
}

/// The embedded store. Cheap to clone; the store thread ends when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    calls: mpsc::Sender<Call>,
    sequence: watch::Receiver<u64>,
}

/// A call run on the store thread inside the batch's transaction; it returns what to send once
/// the commit's result is known.
/// `None`: the batch failed before this call ran; it only answers with the failure.
type Call = Box<dyn FnOnce(Option<&mut Db>) -> Reply + Send>;
type Reply = Box<dyn FnOnce(Option<StoreError>) + Send>;

/// The store thread's state.
struct Db {
    conn: Connection,
    /// Unfinished (PENDING or RUNNING) actions, for the max_pending bound.
    unfinished: u64,
    /// The sequence of the last change written (committed or in the open transaction).
    last_sequence: u64,
    /// The error that rolled the open transaction back, if one did.
    rolled_back: Option<StoreError>,
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Opens (creating it and its directory when missing) and migrates the store at `path`,
    /// then expires the leases of any previous run. Blocking: call it off the runtime's threads.
    pub fn open(settings: &SqliteSettings) -> Result<Self, StoreError> {
        let db = Db::open(settings)?;
        let (sequence_tx, sequence) = watch::channel(db.last_sequence);
        let (calls, rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("callout-store".into())
            .spawn(move || db.run(rx, sequence_tx))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?;
        Ok(Self { calls, sequence })
    }

    /// Runs `f` on the store thread in the current batch's transaction (in a savepoint of its
    /// own, so a failing call undoes only itself) and answers after the commit.
    fn call<T, F>(&self, f: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Db) -> Result<T, StoreError> + Send + 'static,
    {
        let calls = self.calls.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let call: Call = Box::new(move |db: Option<&mut Db>| {
                let result = db.map(|db| db.savepoint(f));
                Box::new(move |commit: Option<StoreError>| {
                    let _ = tx.send(match (commit, result) {
                        (Some(e), _) => Err(e),
                        (None, Some(result)) => result,
                        (None, None) => Err(StoreError::Unavailable("the call was not run".into())),
                    });
                })
            });
            let closed = || StoreError::Unavailable("the store thread has stopped".into());
            calls.send(call).await.map_err(|_| closed())?;
            rx.await.map_err(|_| closed())?
        })
    }
}

impl Db {
    fn open(settings: &SqliteSettings) -> Result<Self, StoreError> {
        let path = &settings.path;
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", dir.display())))?;
        }
        let conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {shown}: {e}")))?;
        let setup = |conn: &Connection| -> rusqlite::Result<()> {
            conn.busy_timeout(Duration::from_millis(100))?;
            // Exclusive before the first access: the lock is then held for the process's life.
            conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
            let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "journal_mode is {mode}, not WAL"
                )));
            }
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.pragma_update(None, "foreign_keys", "OFF")?;
            if let Some(max) = settings.max_bytes {
                let page: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
                conn.pragma_update(None, "max_page_count", (max as i64 / page.max(512)).max(1))?;
            }
            Ok(())
        };
        setup(&conn).map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DatabaseBusy => {
                StoreError::Unavailable(format!("{shown} is in use by another process (another callout?)"))
            }
            e => StoreError::Unavailable(format!("cannot set up {shown}: {e}")),
        })?;
        let mut db = Self { conn, unfinished: 0, last_sequence: 0, rolled_back: None };
        db.migrate(path)?;
        db.recount().map_err(unavailable)?;
        // No other process can hold a lease on an exclusively locked file: whatever was RUNNING
        // belongs to a run that ended. Its attempts are taken over as orphans.
        db.conn
            .execute("UPDATE actions SET lease_until = 0 WHERE state = ?1", [State::Running as i64])
            .map_err(unavailable)?;
        Ok(db)
    }

    fn migrate(&mut self, path: &Path) -> Result<(), StoreError> {
        let version: i64 =
            self.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(unavailable)?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::Unavailable(format!(
                "{} has schema version {version}; this callout knows up to {known}: run a newer callout",
                path.display()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction().map_err(unavailable)?;
            tx.execute_batch(sql).map_err(unavailable)?;
            tx.pragma_update(None, "user_version", i as i64 + 1).map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            tracing::info!(store = %path.display(), version = i + 1, "action store migrated");
        }
        Ok(())
    }

    /// Reads the counters back from the file (at open and after a failed commit).
    fn recount(&mut self) -> rusqlite::Result<()> {
        let unfinished: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM actions WHERE state IN (?1, ?2)",
            [State::Pending as i64, State::Running as i64],
            |r| r.get(0),
        )?;
        self.unfinished = unfinished as u64;
        let last: i64 =
            self.conn.query_row("SELECT COALESCE(MAX(sequence), 0) FROM changes", [], |r| r.get(0))?;
        // AUTOINCREMENT never reuses a number, also after purges: sqlite_sequence keeps the last.
        let kept: Option<i64> = self
            .conn
            .query_row("SELECT seq FROM sqlite_sequence WHERE name = 'changes'", [], |r| r.get(0))
            .optional()?;
        self.last_sequence = last.max(kept.unwrap_or(0)) as u64;
        Ok(())
    }

    /// The store thread: each round takes every queued call (up to BATCH), runs them in one
    /// transaction, commits once, then replies to each.
    fn run(mut self, mut rx: mpsc::Receiver<Call>, sequence: watch::Sender<u64>) {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(call) => batch.push(call),
                    Err(_) => break,
                }
            }
            let mut replies = Vec::with_capacity(batch.len());
            let mut failed: Option<StoreError> =
                self.conn.execute_batch("BEGIN IMMEDIATE").err().map(unavailable);
            let mut calls = batch.into_iter();
            if failed.is_none() {
                for call in calls.by_ref() {
                    replies.push(call(Some(&mut self)));
                    // Some errors (a full disk, an I/O error) roll the whole transaction back:
                    // the calls before this one are undone too, so none of them may be acked.
                    if self.conn.is_autocommit() {
                        let cause = match self.rolled_back.take() {
                            Some(StoreError::Unavailable(cause)) => cause,
                            Some(other) => other.to_string(),
                            None => "no cause given".into(),
                        };
                        failed = Some(StoreError::Unavailable(format!(
                            "a write failed and its batch was rolled back ({cause})"
                        )));
                        break;
                    }
                }
            }
            if failed.is_none() {
                if let Err(e) = self.conn.execute_batch("COMMIT") {
                    failed = Some(unavailable(e));
                }
            }
            if let Some(error) = &failed {
                tracing::error!(%error, "action store commit failed; the batch is not stored");
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                if let Err(e) = self.recount() {
                    tracing::error!(error = %e, "action store: cannot read its counters back");
                }
            }
            // The calls not run get the failure too.
            let not_run: Vec<Reply> = calls.map(|call| call(None)).collect();
            for reply in replies.into_iter().chain(not_run) {
                reply(failed.clone());
            }
            if failed.is_none() {
                sequence.send_if_modified(|seen| {
                    let changed = *seen != self.last_sequence;
                    *seen = self.last_sequence;
                    changed
                });
            }
        }
    }

    /// Runs `f` in a savepoint: undone alone when it fails.
    fn savepoint<T>(&mut self, f: impl FnOnce(&mut Db) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.conn.execute_batch("SAVEPOINT call").map_err(unavailable)?;
        let (unfinished, last_sequence) = (self.unfinished, self.last_sequence);
        let result = f(self);
        if self.conn.is_autocommit() {
            if let Err(e) = &result {
                self.rolled_back = Some(e.clone());
            }
            return result;
        }
        match &result {
            Ok(_) => {
                if let Err(e) = self.conn.execute_batch("RELEASE call") {
                    return Err(unavailable(e));
                }
            }
            Err(_) => {
                let _ = self.conn.execute_batch("ROLLBACK TO call; RELEASE call");
                self.unfinished = unfinished;
                self.last_sequence = last_sequence;
            }
        }
        result
    }

    fn snapshot(&self, sequence: u64) -> Result<Snapshot, StoreError> {
        let blob: Vec<u8> = self
            .conn
            .prepare_cached("SELECT snapshot FROM changes WHERE sequence = ?1")
            .and_then(|mut s| s.query_row([sequence as i64], |r| r.get(0)))
            .map_err(unavailable)?;
        Snapshot::decode(blob.as_slice()).map_err(|e| StoreError::Corrupt(format!("change {sequence}: {e}")))
    }

    /// Writes `snapshot` as the action's next change; returns its sequence.
    fn change(&mut self, action_id: &str, snapshot: &Snapshot) -> Result<u64, StoreError> {
        self.conn
            .prepare_cached("INSERT INTO changes (action_id, committed_at, snapshot) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![action_id, snapshot.updated_at, snapshot.encode_to_vec()]))
            .map_err(unavailable)?;
        let sequence = self.conn.last_insert_rowid() as u64;
        self.conn
            .prepare_cached("UPDATE actions SET sequence = ?2 WHERE action_id = ?1")
            .and_then(|mut s| s.execute(params![action_id, sequence as i64]))
            .map_err(unavailable)?;
        self.last_sequence = sequence;
        Ok(sequence)
    }

    fn stored(&self, action_id: &str) -> Result<Option<(Stored, String)>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT request, sequence, attempts, run_base, deadline_at, destination
                 FROM actions WHERE action_id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([action_id], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })
                .optional()
            })
            .map_err(unavailable)?;
        let Some((request, sequence, attempts, run_base, deadline_at, destination)) = row else {
            return Ok(None);
        };
        let record = self.snapshot(sequence as u64)?.record(action_id.to_owned(), sequence as u64)?;
        Ok(Some((
            Stored {
                record,
                request: request.into(),
                attempts_started: attempts as u32,
                run_base: run_base as u32,
                deadline_at: from_millis(deadline_at),
            },
            destination,
        )))
    }

    fn submit(&mut self, new: NewAction) -> Result<Submitted, StoreError> {
        if let Some((stored, _)) = self.stored(&new.action_id)? {
            return Ok(Submitted::Existing(stored));
        }
        if self.unfinished >= new.max_pending {
            return Err(StoreError::Full { pending: self.unfinished, max: new.max_pending });
        }
        let now = to_millis(new.now);
        let due = to_millis(new.due_at);
        let total = new.total.as_millis().min(i64::MAX as u128) as i64;
        self.conn
            .prepare_cached(
                "INSERT INTO actions (action_id, request, destination, state, sequence, next_attempt_at,
                     total_ms, deadline_at, created_at, tenant)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    new.action_id,
                    new.request.as_ref(),
                    new.destination,
                    State::Pending as i64,
                    due,
                    total,
                    due.max(now).saturating_add(total),
                    now,
                    new.tenant,
                ])
            })
            .map_err(unavailable)?;
        let snapshot = Snapshot {
            state: State::Pending as i32,
            next_attempt_at: Some(due),
            created_at: now,
            updated_at: now,
            ..Snapshot::default()
        };
        self.change(&new.action_id, &snapshot)?;
        self.unfinished += 1;
        let (stored, _) = self
            .stored(&new.action_id)?
            .ok_or_else(|| StoreError::Corrupt(format!("action {} vanished", new.action_id)))?;
        Ok(Submitted::Created(stored))
    }

    fn list(&self, states: &[State], after: u64, limit: usize) -> Result<(Vec<Record>, u64), StoreError> {
        let filter = if states.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = states.iter().map(|s| (*s as i64).to_string()).collect();
            format!("AND state IN ({})", list.join(","))
        };
        let sql = format!(
            "SELECT id, action_id, sequence FROM actions WHERE id > ?1 {filter} ORDER BY id LIMIT ?2"
        );
        let rows: Vec<(i64, String, i64)> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(params![after as i64, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(unavailable)?;
        let last = rows.last().map(|r| r.0 as u64).unwrap_or(after);
        let records = rows
            .into_iter()
            .map(|(_, id, seq)| self.snapshot(seq as u64)?.record(id, seq as u64))
            .collect::<Result<_, _>>()?;
        Ok((records, last))
    }

    fn changes(&self, after: u64, limit: usize) -> Result<Vec<Record>, StoreError> {
        let rows: Vec<(i64, String, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT sequence, action_id, snapshot FROM changes WHERE sequence > ?1
                 ORDER BY sequence LIMIT ?2",
            )
            .and_then(|mut s| {
                s.query_map(params![after as i64, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .map_err(unavailable)?;
        rows.into_iter()
            .map(|(seq, id, blob)| {
                Snapshot::decode(blob.as_slice())
                    .map_err(|e| StoreError::Corrupt(format!("change {seq}: {e}")))?
                    .record(id, seq as u64)
            })
            .collect()
    }

    fn claim(&mut self, claim: ClaimRequest) -> Result<Claims, StoreError> {
        let now = to_millis(claim.now);
        // Fair across tenants first: each tenant's due rows are ranked (round robin across its
        // destinations, `drn`, then due time), and a row's turn is its rank plus its tenant's
        // RUNNING actions, so the tenant with the fewest running goes first; among equals the
        // tenant served longest ago goes first (`tenant_turns`), so tenants take turns also
        // when each claim takes one. A busy destination's rows beyond its room are passed
        // over, so the window is widened by what they may take.
        let window =
            claim.limit + claim.busy.iter().map(|(_, n)| (*n).min(claim.per_destination)).sum::<usize>();
        let due: Vec<(String, String, String)> = self
            .conn
            .prepare_cached(
                "WITH due AS (
                     SELECT action_id, tenant, destination, next_attempt_at, id,
                         ROW_NUMBER() OVER (PARTITION BY tenant, destination ORDER BY next_attempt_at, id)
                             AS drn
                     FROM actions WHERE state = ?1 AND next_attempt_at <= ?2
                 ), ranked AS (
                     SELECT action_id, tenant, destination, next_attempt_at, id,
                         ROW_NUMBER() OVER (PARTITION BY tenant ORDER BY drn, next_attempt_at, id) AS trn
                     FROM due WHERE drn <= ?3
                 ), running AS (
                     SELECT tenant, COUNT(*) AS n FROM actions WHERE state = ?5 GROUP BY tenant
                 )
                 SELECT action_id, tenant, destination FROM ranked
                     LEFT JOIN running USING (tenant) LEFT JOIN tenant_turns USING (tenant)
                 WHERE trn <= ?4 ORDER BY trn + COALESCE(n, 0), COALESCE(served, 0), next_attempt_at, id
                 LIMIT ?4",
            )
            .and_then(|mut s| {
                s.query_map(
                    params![
                        State::Pending as i64,
                        now,
                        claim.per_destination as i64,
                        window as i64,
                        State::Running as i64
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?
                .collect()
            })
            .map_err(unavailable)?;
        let lease_until = to_millis(claim.now + claim.lease);
        let mut claimed = Vec::new();
        let mut taken: std::collections::HashMap<String, usize> = claim.busy.into_iter().collect();
        for (action_id, tenant, destination) in due {
            if claimed.len() >= claim.limit {
                break;
            }
            let n = taken.entry(destination).or_default();
            if *n >= claim.per_destination {
                continue;
            }
            *n += 1;
            claimed.push(self.start_attempt(&action_id, now, lease_until)?);
            // The claim's change sequence orders the turns.
            self.conn
                .prepare_cached(
                    "INSERT INTO tenant_turns (tenant, served) VALUES (?1, ?2)
                     ON CONFLICT (tenant) DO UPDATE SET served = excluded.served",
                )
                .and_then(|mut s| s.execute(params![tenant, self.last_sequence as i64]))
                .map_err(unavailable)?;
        }
        let next_due: Option<i64> = self
            .conn
            .prepare_cached("SELECT MIN(next_attempt_at) FROM actions WHERE state = ?1")
            .and_then(|mut s| s.query_row([State::Pending as i64], |r| r.get(0)))
            .map_err(unavailable)?;
        Ok(Claims { claimed, next_due: next_due.map(from_millis) })
    }

    /// PENDING → RUNNING with attempt `attempts + 1` recorded as started.
    fn start_attempt(&mut self, action_id: &str, now: i64, lease_until: i64) -> Result<Claimed, StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE actions SET state = ?2, lease_until = ?3, attempts = attempts + 1,
                     next_attempt_at = NULL WHERE action_id = ?1",
            )
            .and_then(|mut s| s.execute(params![action_id, State::Running as i64, lease_until]))
            .map_err(unavailable)?;
        let (stored, destination) = self
            .stored(action_id)?
            .ok_or_else(|| StoreError::Corrupt(format!("action {action_id} vanished")))?;
        let attempt = stored.attempts_started;
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO attempts (action_id, number, started_at, record) VALUES (?1, ?2, ?3, NULL)",
            )
            .and_then(|mut s| s.execute(params![action_id, attempt, now]))
            .map_err(unavailable)?;
        let mut snapshot = self.snapshot(stored.record.sequence)?;
        snapshot.state = State::Running as i32;
        snapshot.next_attempt_at = None;
        snapshot.updated_at = now;
        let sequence = self.change(action_id, &snapshot)?;
        let record = snapshot.record(action_id.to_owned(), sequence)?;
        Ok(Claimed { stored: Stored { record, ..stored }, attempt, destination })
    }

    fn renew(&mut self, action_id: &str, attempt: u32, until: SystemTime) -> Result<bool, StoreError> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE actions SET lease_until = ?3 WHERE action_id = ?1 AND attempts = ?2 AND state = ?4",
            )
            .and_then(|mut s| s.execute(params![action_id, attempt, to_millis(until), State::Running as i64]))
            .map_err(unavailable)?;
        Ok(n == 1)
    }

    fn orphans(&mut self, now: SystemTime, limit: usize) -> Result<Vec<Claimed>, StoreError> {
        let ids: Vec<String> = self
            .conn
            .prepare_cached(
                "SELECT action_id FROM actions WHERE state = ?1 AND COALESCE(lease_until, 0) < ?2
                 ORDER BY id LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![State::Running as i64, to_millis(now), limit as i64], |r| r.get(0))?
                    .collect()
            })
            .map_err(unavailable)?;
        let mut orphans = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((stored, destination)) = self.stored(&id)? {
                let attempt = stored.attempts_started;
                orphans.push(Claimed { stored, attempt, destination });
            }
        }
        Ok(orphans)
    }

    fn finish_attempt(&mut self, finish: Finish) -> Result<Option<Record>, StoreError> {
        let now = to_millis(finish.now);
        let id = finish.action_id.as_str();
        match &finish.record {
            Some(record) => self
                .conn
                .prepare_cached(
                    "UPDATE attempts SET record = ?3 WHERE action_id = ?1 AND number = ?2 AND record IS NULL",
                )
                .and_then(|mut s| s.execute(params![id, finish.attempt, record.as_ref()])),
            None => self
                .conn
                .prepare_cached(
                    "DELETE FROM attempts WHERE action_id = ?1 AND number = ?2 AND record IS NULL",
                )
                .and_then(|mut s| s.execute(params![id, finish.attempt])),
        }
        .map_err(unavailable)?;
        let Some((stored, _)) = self.stored(id)? else {
            return Ok(None);
        };
        let ours = stored.record.state == State::Running && stored.attempts_started == finish.attempt;
        let mut snapshot = self.snapshot(stored.record.sequence)?;
        if let Some(record) = finish.record.clone() {
            snapshot.attempts.push(record);
        }
        if !ours {
            // Cancelled meanwhile: the attempt joins the history without a change of state.
            if finish.record.is_some() {
                self.conn
                    .prepare_cached("UPDATE changes SET snapshot = ?2 WHERE sequence = ?1")
                    .and_then(|mut s| {
                        s.execute(params![stored.record.sequence as i64, snapshot.encode_to_vec()])
                    })
                    .map_err(unavailable)?;
            }
            return Ok(None);
        }
        snapshot.updated_at = now;
        let attempts_delta = if finish.record.is_none() { 1 } else { 0 };
        match finish.next {
            Next::Retry { at, last_error, next_step } => {
                let at = to_millis(at);
                snapshot.state = State::Pending as i32;
                snapshot.next_attempt_at = Some(at);
                snapshot.next_step = next_step;
                if last_error.is_some() {
                    snapshot.last_error = last_error;
                }
                self.conn
                    .prepare_cached(
                        "UPDATE actions SET state = ?2, next_attempt_at = ?3, lease_until = NULL,
                             attempts = attempts - ?4 WHERE action_id = ?1",
                    )
                    .and_then(|mut s| s.execute(params![id, State::Pending as i64, at, attempts_delta]))
                    .map_err(unavailable)?;
            }
            Next::Final { state, last_error, result } => {
                snapshot.state = state as i32;
                snapshot.next_attempt_at = None;
                snapshot.last_error = last_error;
                snapshot.result = Some(result);
                snapshot.next_step = None;
                self.conn
                    .prepare_cached(
                        "UPDATE actions SET state = ?2, next_attempt_at = NULL, lease_until = NULL,
                             final_at = ?3, attempts = attempts - ?4 WHERE action_id = ?1",
                    )
                    .and_then(|mut s| s.execute(params![id, state as i64, now, attempts_delta]))
                    .map_err(unavailable)?;
                self.unfinished = self.unfinished.saturating_sub(1);
            }
        }
        let sequence = self.change(id, &snapshot)?;
        Ok(Some(snapshot.record(id.to_owned(), sequence)?))
    }

    fn cancel(&mut self, action_id: &str, now: SystemTime) -> Result<Option<Record>, StoreError> {
        let Some((stored, _)) = self.stored(action_id)? else {
            return Ok(None);
        };
        if !stored.record.state.check_cancel(action_id)? {
            return Ok(Some(stored.record));
        }
        let now = to_millis(now);
        self.conn
            .prepare_cached(
                "UPDATE actions SET state = ?2, next_attempt_at = NULL, lease_until = NULL, final_at = ?3
                 WHERE action_id = ?1",
            )
            .and_then(|mut s| s.execute(params![action_id, State::Cancelled as i64, now]))
            .map_err(unavailable)?;
        let mut snapshot = self.snapshot(stored.record.sequence)?;
        snapshot.state = State::Cancelled as i32;
        snapshot.next_attempt_at = None;
        snapshot.updated_at = now;
        let sequence = self.change(action_id, &snapshot)?;
        self.unfinished = self.unfinished.saturating_sub(1);
        Ok(Some(snapshot.record(action_id.to_owned(), sequence)?))
    }

    fn replay(
        &mut self,
        action_id: &str,
        now: SystemTime,
        max_pending: u64,
    ) -> Result<Option<Record>, StoreError> {
        let Some((stored, _)) = self.stored(action_id)? else {
            return Ok(None);
        };
        stored.record.state.check_replay(action_id)?;
        if self.unfinished >= max_pending {
            return Err(StoreError::Full { pending: self.unfinished, max: max_pending });
        }
        let now = to_millis(now);
        // An attempt cancelled in flight may still be open: it is closed by its own task, or
        // was cut off by a restart; either way the new run starts after it.
        self.conn
            .prepare_cached(
                "UPDATE actions SET state = ?2, next_attempt_at = ?3, lease_until = NULL, final_at = NULL,
                     run_base = attempts, deadline_at = ?3 + total_ms WHERE action_id = ?1",
            )
            .and_then(|mut s| s.execute(params![action_id, State::Pending as i64, now]))
            .map_err(unavailable)?;
        let mut snapshot = self.snapshot(stored.record.sequence)?;
        snapshot.state = State::Pending as i32;
        snapshot.next_attempt_at = Some(now);
        snapshot.result = None;
        snapshot.next_step = None;
        snapshot.updated_at = now;
        let sequence = self.change(action_id, &snapshot)?;
        self.unfinished += 1;
        Ok(Some(snapshot.record(action_id.to_owned(), sequence)?))
    }

    fn purge(&mut self, before: SystemTime) -> Result<u64, StoreError> {
        let before = to_millis(before);
        let run = |sql: &str| {
            self.conn.prepare_cached(sql).and_then(|mut s| s.execute([before])).map_err(unavailable)
        };
        // At most 1000 actions a call, so one purge does not hold the store for long.
        let picked = "SELECT action_id FROM actions WHERE final_at IS NOT NULL AND final_at < ?1 LIMIT 1000";
        run(&format!("DELETE FROM changes WHERE action_id IN ({picked})"))?;
        run(&format!("DELETE FROM attempts WHERE action_id IN ({picked})"))?;
        let n = run(&format!("DELETE FROM actions WHERE action_id IN ({picked})"))?;
        // Changes older than the retention that are no action's latest: a watcher resuming from
        // that far back misses them (as it misses purged actions).
        run("DELETE FROM changes WHERE sequence IN (SELECT sequence FROM changes WHERE committed_at < ?1
             AND sequence NOT IN (SELECT sequence FROM actions) LIMIT 10000)")?;
        // Turns of tenants with nothing left to run (a new action starts them at the front).
        self.conn
            .execute(
                "DELETE FROM tenant_turns WHERE tenant NOT IN
                     (SELECT tenant FROM actions WHERE state IN (?1, ?2))",
                [State::Pending as i64, State::Running as i64],
            )
            .map_err(unavailable)?;
        Ok(n as u64)
    }

    fn stats(&self, now: SystemTime) -> Result<Stats, StoreError> {
        let now = to_millis(now);
        let mut stats = Stats::default();
        let rows: Vec<(i64, bool, i64)> = self
            .conn
            .prepare_cached(
                "SELECT state, attempts > run_base, COUNT(*) FROM actions WHERE state IN (?1, ?2)
                 GROUP BY 1, 2",
            )
            .and_then(|mut s| {
                s.query_map([State::Pending as i64, State::Running as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect()
            })
            .map_err(unavailable)?;
        for (state, retried, n) in rows {
            match (State::from_i64(state), retried) {
                (Some(State::Running), _) => stats.running += n as u64,
                (Some(State::Pending), false) => stats.pending += n as u64,
                (Some(State::Pending), true) => stats.retry_waiting += n as u64,
                _ => {}
            }
        }
        let oldest: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT MIN(next_attempt_at) FROM actions WHERE state = ?1 AND next_attempt_at <= ?2",
            )
            .and_then(|mut s| s.query_row(params![State::Pending as i64, now], |r| r.get(0)))
            .map_err(unavailable)?;
        stats.oldest_due = oldest.map(|t| Duration::from_millis((now - t).max(0) as u64)).unwrap_or_default();
        Ok(stats)
    }
}

impl ActionStore for SqliteStore {
    fn submit(&self, new: NewAction) -> StoreFuture<'_, Submitted> {
        self.call(move |db| db.submit(new))
    }

    fn get(&self, action_id: &str) -> StoreFuture<'_, Option<Stored>> {
        let id = action_id.to_owned();
        self.call(move |db| Ok(db.stored(&id)?.map(|(s, _)| s)))
    }

    fn list(&self, states: Vec<State>, after: u64, limit: usize) -> StoreFuture<'_, (Vec<Record>, u64)> {
        self.call(move |db| db.list(&states, after, limit))
    }

    fn changes(&self, after_sequence: u64, limit: usize) -> StoreFuture<'_, Vec<Record>> {
        self.call(move |db| db.changes(after_sequence, limit))
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.sequence.clone()
    }

    fn claim(&self, claim: ClaimRequest) -> StoreFuture<'_, Claims> {
        self.call(move |db| db.claim(claim))
    }

    fn renew(&self, action_id: &str, attempt: u32, until: SystemTime) -> StoreFuture<'_, bool> {
        let id = action_id.to_owned();
        self.call(move |db| db.renew(&id, attempt, until))
    }

    fn orphans(&self, now: SystemTime, limit: usize) -> StoreFuture<'_, Vec<Claimed>> {
        self.call(move |db| db.orphans(now, limit))
    }

    fn finish_attempt(&self, finish: Finish) -> StoreFuture<'_, Option<Record>> {
        self.call(move |db| db.finish_attempt(finish))
    }

    fn cancel(&self, action_id: &str, now: SystemTime) -> StoreFuture<'_, Option<Record>> {
        let id = action_id.to_owned();
        self.call(move |db| db.cancel(&id, now))
    }

    fn replay(&self, action_id: &str, now: SystemTime, max_pending: u64) -> StoreFuture<'_, Option<Record>> {
        let id = action_id.to_owned();
        self.call(move |db| db.replay(&id, now, max_pending))
    }

    fn purge(&self, before: SystemTime) -> StoreFuture<'_, u64> {
        self.call(move |db| db.purge(before))
    }

    fn stats(&self, now: SystemTime) -> StoreFuture<'_, Stats> {
        self.call(move |db| db.stats(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let path = std::env::temp_dir().join(format!("callout-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        Dir(path)
    }

    fn open(dir: &Dir) -> Result<SqliteStore, StoreError> {
        SqliteStore::open(&SqliteSettings { path: dir.0.join("actions.db"), max_bytes: None })
    }

    fn new(id: &str, destination: &str, now: SystemTime) -> NewAction {
        NewAction {
            action_id: id.into(),
            request: Bytes::from_static(b"request"),
            tenant: String::new(),
            destination: destination.into(),
            due_at: now,
            total: Duration::from_secs(3600),
            now,
            max_pending: 1000,
        }
    }

    fn claim(now: SystemTime, limit: usize, per_destination: usize) -> ClaimRequest {
        ClaimRequest { now, lease: Duration::from_secs(60), limit, per_destination, busy: vec![] }
    }

    #[tokio::test]
    async fn claims_are_fair_across_destinations() {
        let dir = dir("fair");
        let store = open(&dir).unwrap();
        let now = SystemTime::now();
        // A backlog of 50 to a slow host, submitted first, then one each to two other hosts.
        for i in 0..50 {
            store.submit(new(&format!("slow-{i}"), "slow:443", now)).await.unwrap();
        }
        store.submit(new("a", "a:443", now)).await.unwrap();
        store.submit(new("b", "b:443", now)).await.unwrap();
        let claims = store.claim(claim(now, 4, 2)).await.unwrap();
        let ids: Vec<_> = claims.claimed.iter().map(|c| c.stored.record.action_id.as_str()).collect();
        assert!(ids.contains(&"a") && ids.contains(&"b"), "{ids:?}");
        assert_eq!(ids.iter().filter(|id| id.starts_with("slow")).count(), 2, "{ids:?}");
        assert!(claims.claimed.iter().all(|c| c.stored.record.state == State::Running && c.attempt == 1));
        assert!(claims.next_due.is_some_and(|due| due <= now));
        // A destination's running attempts count against its share.
        let mut busy = claim(now, 10, 3);
        busy.busy = vec![("slow:443".into(), 2)];
        let more = store.claim(busy).await.unwrap().claimed;
        assert_eq!(more.len(), 1, "one more place for the slow host");
        let mut full = claim(now, 10, 3);
        full.busy = vec![("slow:443".into(), 3)];
        assert!(store.claim(full).await.unwrap().claimed.is_empty());
    }

    fn of(tenant: &str, id: &str, destination: &str, now: SystemTime) -> NewAction {
        NewAction { tenant: tenant.into(), max_pending: 100_000, ..new(id, destination, now) }
    }

    fn ids(claims: &Claims) -> Vec<String> {
        claims.claimed.iter().map(|c| c.stored.record.action_id.clone()).collect()
    }

    fn done(id: &str, now: SystemTime) -> Finish {
        Finish {
            action_id: id.into(),
            attempt: 1,
            record: Some(Bytes::from_static(b"attempt")),
            next: Next::Final { state: State::Succeeded, last_error: None, result: Bytes::new() },
            now,
        }
    }

    #[tokio::test]
    async fn a_tenant_with_thousands_due_cannot_starve_one_with_a_few() {
        let dir = dir("tenants");
        let store = open(&dir).unwrap();
        let now = SystemTime::now();
        // 10,000 of a's due first (submitted together: one commit per batch), then b's 10, all
        // to the same destination (round robin across destinations alone would not help b).
        let mut submits = tokio::task::JoinSet::new();
        for i in 0..10_000 {
            let store = store.clone();
            submits.spawn(async move { store.submit(of("a", &format!("a-{i}"), "api:443", now)).await });
        }
        while let Some(submitted) = submits.join_next().await {
            submitted.unwrap().unwrap();
        }
        for i in 0..10 {
            store.submit(of("b", &format!("b-{i}"), "api:443", now)).await.unwrap();
        }
        // Claims of 4, each finished before the next: b's 10 go in the first 20, in turn with a's.
        let mut claimed = Vec::new();
        for _ in 0..5 {
            let claims = store.claim(claim(now, 4, 1000)).await.unwrap();
            for id in ids(&claims) {
                store.finish_attempt(done(&id, now)).await.unwrap();
                claimed.push(id);
            }
        }
        let b = claimed.iter().filter(|id| id.starts_with("b-")).count();
        assert_eq!(b, 10, "{claimed:?}");
        assert_eq!(store.stats(now).await.unwrap().pending, 10_000 - 10);
    }

    #[tokio::test]
    async fn the_tenant_with_fewer_running_goes_first_and_equals_take_turns() {
        let dir = dir("turns");
        let store = open(&dir).unwrap();
        let now = SystemTime::now();
        for i in 0..6 {
            store.submit(of("a", &format!("a-{i}"), "h:443", now)).await.unwrap();
        }
        for i in 0..5 {
            store.submit(of("b", &format!("b-{i}"), "h:443", now)).await.unwrap();
        }
        store.submit(new("none-0", "h:443", now)).await.unwrap();
        // One at a time and none finished: each claim goes to a tenant with the fewest running.
        let mut order = Vec::new();
        for _ in 0..6 {
            order.extend(ids(&store.claim(claim(now, 1, 100)).await.unwrap()));
        }
        assert_eq!(order, ["a-0", "b-0", "none-0", "a-1", "b-1", "a-2"]);
        // Claims of one, each finished before the next (nothing running): tenants take turns.
        for id in &order {
            store.finish_attempt(done(id, now)).await.unwrap();
        }
        let mut turns = Vec::new();
        for _ in 0..4 {
            let claimed = ids(&store.claim(claim(now, 1, 100)).await.unwrap());
            store.finish_attempt(done(&claimed[0], now)).await.unwrap();
            turns.extend(claimed);
        }
        assert_eq!(turns, ["b-2", "a-3", "b-3", "a-4"]);
        // A destination's cap still holds within a tenant.
        store.submit(of("c", "c-0", "busy:443", now)).await.unwrap();
        store.submit(of("c", "c-1", "busy:443", now)).await.unwrap();
        let mut busy = claim(now, 10, 1);
        busy.busy = vec![("busy:443".into(), 1)];
        assert!(ids(&store.claim(busy).await.unwrap()).iter().all(|id| !id.starts_with("c-")));
    }

    #[tokio::test]
    async fn a_store_of_the_first_schema_is_migrated_and_its_actions_run() {
        let dir = dir("migrate");
        let now = SystemTime::now();
        let path = dir.0.join("actions.db");
        {
            std::fs::create_dir_all(&dir.0).unwrap();
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            let at = to_millis(now);
            let snapshot = Snapshot {
                state: State::Pending as i32,
                next_attempt_at: Some(at),
                created_at: at,
                updated_at: at,
                ..Snapshot::default()
            };
            conn.execute(
                "INSERT INTO changes (sequence, action_id, committed_at, snapshot) VALUES (1, 'old', ?1, ?2)",
                params![at, snapshot.encode_to_vec()],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO actions (action_id, request, destination, state, sequence, next_attempt_at,
                     total_ms, deadline_at, created_at) VALUES ('old', x'00', 'h:80', 1, 1, ?1, 3600000, ?2, ?1)",
                params![at, at + 3_600_000],
            )
            .unwrap();
        }
        let store = open(&dir).unwrap();
        store.submit(of("t", "new", "h:80", now)).await.unwrap();
        assert_eq!(ids(&store.claim(claim(now, 10, 10)).await.unwrap()), ["old", "new"]);
        drop(store);
        let conn = (0..100)
            .find_map(|_| {
                let conn = Connection::open(&path)
                    .ok()
                    .filter(|c| c.execute_batch("BEGIN IMMEDIATE; ROLLBACK").is_ok());
                if conn.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                conn
            })
            .unwrap();
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let tenants: Vec<String> = conn
            .prepare("SELECT tenant FROM actions ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(tenants, ["", "t"]);
    }

    #[tokio::test]
    async fn sequences_continue_after_a_reopen_and_running_attempts_become_orphans() {
        let dir = dir("reopen");
        let now = SystemTime::now();
        let last = {
            let store = open(&dir).unwrap();
            store.submit(new("x", "h:80", now)).await.unwrap();
            let claimed = store.claim(claim(now, 1, 1)).await.unwrap().claimed;
            assert_eq!(claimed.len(), 1);
            assert!(store.orphans(now, 10).await.unwrap().is_empty(), "the lease holds");
            assert!(open(&dir).is_err(), "a second open of the same file is refused");
            *store.subscribe().borrow()
        };
        // The store thread ends with its last handle; give it a moment to close the file.
        let store = (0..100)
            .find_map(|_| {
                let opened = open(&dir).ok();
                if opened.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                opened
            })
            .unwrap();
        assert_eq!(*store.subscribe().borrow(), last);
        let orphans = store.orphans(now, 10).await.unwrap();
        assert_eq!(orphans.len(), 1, "the previous run's attempt is taken over");
        let finish = Finish {
            action_id: "x".into(),
            attempt: 1,
            record: Some(Bytes::from_static(b"attempt 1")),
            next: Next::Retry { at: now, last_error: None, next_step: None },
            now,
        };
        let record = store.finish_attempt(finish).await.unwrap().unwrap();
        assert_eq!(record.state, State::Pending);
        assert!(record.sequence > last);
        assert_eq!(record.attempts, [Bytes::from_static(b"attempt 1")]);
        let changes = store.changes(0, 100).await.unwrap();
        let states: Vec<_> = changes.iter().map(|c| c.state).collect();
        assert_eq!(states, [State::Pending, State::Running, State::Pending]);
        assert!(changes.windows(2).all(|w| w[0].sequence < w[1].sequence));
    }

    #[tokio::test]
    async fn an_attempt_ending_after_a_cancel_is_recorded_but_does_not_revive_the_action() {
        let dir = dir("cancel");
        let store = open(&dir).unwrap();
        let now = SystemTime::now();
        store.submit(new("c", "h:80", now)).await.unwrap();
        store.claim(claim(now, 1, 1)).await.unwrap();
        let cancelled = store.cancel("c", now).await.unwrap().unwrap();
        assert_eq!(cancelled.state, State::Cancelled);
        let finish = Finish {
            action_id: "c".into(),
            attempt: 1,
            record: Some(Bytes::from_static(b"aborted")),
            next: Next::Retry { at: now, last_error: None, next_step: None },
            now,
        };
        assert!(store.finish_attempt(finish).await.unwrap().is_none());
        let stored = store.get("c").await.unwrap().unwrap();
        assert_eq!(stored.record.state, State::Cancelled);
        assert_eq!(stored.record.attempts.len(), 1);
        store.submit(new("other", "h:80", now)).await.unwrap();
        let full = store.replay("c", now, 1).await;
        assert!(matches!(full, Err(StoreError::Full { pending: 1, max: 1 })), "{full:?}");
        assert_eq!(store.get("c").await.unwrap().unwrap().record.state, State::Cancelled, "nothing changed");
        let replayed = store.replay("c", now, 2).await.unwrap().unwrap();
        assert_eq!(replayed.state, State::Pending);
        let full = store.submit(NewAction { max_pending: 2, ..new("third", "h:80", now) }).await;
        assert!(
            matches!(full, Err(StoreError::Full { pending: 2, max: 2 })),
            "the replay is counted: {full:?}"
        );
        assert!(matches!(store.replay("c", now, 100).await, Err(StoreError::WrongState { .. })));
        assert_eq!(store.stats(now).await.unwrap().retry_waiting, 0, "a replay starts a new run");
        assert!(store.get("unknown").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn purge_removes_final_actions_past_their_retention() {
        let dir = dir("purge");
        let store = open(&dir).unwrap();
        let now = SystemTime::now();
        store.submit(new("old", "h:80", now)).await.unwrap();
        store.submit(new("live", "h:80", now)).await.unwrap();
        store.cancel("old", now).await.unwrap();
        assert_eq!(store.purge(now - Duration::from_secs(60)).await.unwrap(), 0);
        assert_eq!(store.purge(now + Duration::from_secs(60)).await.unwrap(), 1);
        assert!(store.get("old").await.unwrap().is_none());
        assert!(store.get("live").await.unwrap().is_some());
        let full = store.submit(NewAction { max_pending: 1, ..new("more", "h:80", now) }).await;
        assert!(matches!(full, Err(StoreError::Full { pending: 1, max: 1 })), "{full:?}");
    }
}
