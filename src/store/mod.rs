//! The central op log, in SQLite or PostgreSQL: every statement syncgate
//! runs lives here (`replicas` holds what several central processes on one
//! PostgreSQL database share: presence, election, fencing, entity keys).
//!
//! Writes go through a pool of exactly one connection, so `seq` is assigned by one
//! writer at a time (gap-free, no duplicates) and SQLite never answers "busy";
//! reads use their own pool and never wait behind a write. The journal is WAL with
//! `synchronous=FULL`: a committed op survives a power cut.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{AnyPool, FromRow};
use uuid::Uuid;

use crate::keystone::touches::Touch;
use crate::protocol::crypto::Sealer;

mod batch;
mod copy;
mod dialect;
pub mod edge;
mod engine;
mod replicas;
mod resync;
mod retention;
mod sync;
pub use copy::CopyReport;
pub use dialect::Dialect;
pub use engine::{dialect_of, has_password, holds_op_log, shown};
pub use replicas::{Candidate, LeaderRow, Lease, Presence, ReplicaRow};
pub use resync::{
    DriftReport, DriftRow, DriftRunRow, DriftSummary, EdgeAudit, NeedsPasswordRow, NewDrift,
    ResyncRow,
};
pub use retention::{Pin, Retention, PRUNED_WHILE_EXPIRED};
pub use sync::{DeliveryCounts, DeliveryRow, EdgeRow, EdgeSession, OutOfSyncRow};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL '{url}': {source}")]
    Url { url: String, source: sqlx::Error },
    #[error("cannot open the op log at '{url}': {source}")]
    Open { url: String, source: sqlx::Error },
    #[error("cannot migrate the op log: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("op log query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("no open intent {0}")]
    NoIntent(Uuid),
    #[error("a request body in the op log cannot be opened: {0}")]
    Sealed(String),
    #[error("op log transaction failed: {0}")]
    Batch(String),
    #[error("the op log is closed")]
    Closed,
    #[error("cannot keep the op log on this PostgreSQL: {0}")]
    Unfit(String),
    #[error(
        "no longer the leader: elected at epoch {epoch}, another process leads at epoch {current}"
    )]
    Deposed { epoch: i64, current: i64 },
    #[error(
        "another central holds this op log alone ({holder} since {since}): one with the \
         embedded broker, or of an earlier version; stop it first (several central replicas \
         share one op log with an external NATS: --broker)"
    )]
    Taken { holder: String, since: String },
    #[error(
        "other central replicas run on this op log: with the embedded broker central runs \
         alone; give every replica the same external NATS (--broker)"
    )]
    Replicas,
    /// An intent refused: another replica's write of one of its keys is
    /// open, or (`in_doubt`) logged with an outcome not yet resolved.
    #[error("a write to the same entity is in flight on another central replica")]
    Busy { in_doubt: bool },
}

impl StoreError {
    /// Whether the same query may succeed later: the database could not be
    /// reached or was busy (SQLite's busy and locked codes, PostgreSQL's
    /// connection, resource and serialization classes), or is closing. A
    /// corrupt or refused database, or a row that cannot be read, is not.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Query(e) | StoreError::Open { source: e, .. } => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|c| transient_code(&c)),
                _ => false,
            },
            StoreError::Closed | StoreError::Busy { .. } => true,
            _ => false,
        }
    }
}

/// A database error code that says "later": SQLite's primary codes 5
/// (busy) and 6 (locked), whatever their extended code; PostgreSQL's class
/// 08 (connection), out of resources (53000-53300, not 53400: a limit set),
/// shutting down or not yet up (57P01-57P03), and 40001/40P01
/// (serialization, deadlock).
fn transient_code(code: &str) -> bool {
    // SQLite's codes are numbers below 10000, PostgreSQL's five characters.
    if code.len() < 5 {
        return code.parse::<i64>().is_ok_and(|n| matches!(n & 0xff, 5 | 6));
    }
    code.starts_with("08")
        || matches!(
            code,
            "53000" | "53100" | "53200" | "53300" | "57P01" | "57P02" | "57P03" | "40001" | "40P01"
        )
}

/// The state of an op in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpState {
    /// The upstream answered 2xx and the op is logged.
    Committed,
    /// The write was forwarded but its outcome is not known (crash, timeout,
    /// broken connection): it may or may not have changed the upstream.
    UnknownOutcome,
}

impl OpState {
    pub const ALL: [OpState; 2] = [OpState::Committed, OpState::UnknownOutcome];

    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Committed => "committed",
            OpState::UnknownOutcome => "unknown_outcome",
        }
    }

    pub fn parse(s: &str) -> Option<OpState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A write about to be forwarded.
#[derive(Debug, Clone)]
pub struct NewIntent<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub class: &'a str,
    pub kind: &'a str,
    pub body: Option<&'a str>,
    /// JSON list of the natural keys of the IDs the write references.
    pub refs: &'a str,
    /// The write's W3C trace context, carried with the op to the edges.
    pub traceparent: Option<&'a str>,
    /// The keys it touches: on PostgreSQL, an intent is refused while
    /// another replica's write of one of them is open or in doubt.
    pub touches: &'a [Touch],
}

/// What the upstream said about a forwarded write that succeeded.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The keys the write touched (see `keystone::touches`), kept per op so that
    /// a re-drive can tell whether a later op would be undone.
    pub touches: Vec<Touch>,
    pub created_ids: Vec<String>,
    /// The request body to replay, with generated values injected; `None` keeps
    /// the body recorded with the intent.
    pub body: Option<String>,
    pub upstream_status: Option<u16>,
    pub request_id: Option<String>,
    pub detail: Option<String>,
    /// The natural key of the entity the write created or changed, remembered
    /// in the op's own transaction.
    pub learned: Option<crate::protocol::messages::EntityRef>,
}

/// One op as stored.
#[derive(Debug, Clone, FromRow)]
pub struct OpRow {
    pub seq: i64,
    pub op_id: String,
    pub state: String,
    pub method: String,
    pub path: String,
    pub class: String,
    pub kind: String,
    pub created_ids: String,
    pub body: Option<String>,
    pub upstream_status: Option<i64>,
    pub request_id: Option<String>,
    pub detail: Option<String>,
    pub refs: String,
    pub created_at: String,
    pub logged_at: String,
    /// The write's W3C trace context, when it had one.
    #[sqlx(default)]
    pub traceparent: Option<String>,
    /// For a write whose outcome was unknown: `pending`, `applied`,
    /// `not_applied` or `unresolvable` (see migration 0008).
    #[sqlx(default)]
    pub resolution: Option<String>,
}

/// Filter for listing ops, oldest first.
#[derive(Debug, Clone, Default)]
pub struct OpFilter {
    pub after: i64,
    pub limit: i64,
    pub kind: Option<String>,
    pub state: Option<OpState>,
    /// Only ops up to this seq.
    pub through: Option<i64>,
}

/// How a sealed body starts in the op log (no JSON body starts so).
const SEALED: &str = "sealed:";

/// Associated data binding a sealed body to its op.
fn body_aad(op_id: &str) -> String {
    format!("syncgate-oplog:{op_id}")
}

/// Makes a database file readable by its owner only: created 0600 when
/// missing (SQLite gives its `-wal` and `-shm` files the same mode), tightened
/// when an older file is open to others. The op log holds what edges need to
/// replay writes: it is protected like Keystone's own database.
fn secure_file(url: &str) -> Result<(), StoreError> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path.starts_with(':') {
        return Ok(());
    }
    let io = |source: std::io::Error| StoreError::Open {
        url: url.to_string(),
        source: sqlx::Error::Io(source),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let main = std::path::Path::new(path);
        if !main.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(main)
                .map_err(io)?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{path}{suffix}"));
            let Ok(meta) = std::fs::metadata(&file) else {
                continue;
            };
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %file.display(), "database file was open to other users; now 0600");
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
        }
    }
    Ok(())
}

/// Connection options for every syncgate database: created if missing (owner
/// only), WAL, and `synchronous=FULL` so that a committed row survives a power cut.
fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    secure_file(url)?;
    Ok(SqliteConnectOptions::from_str(url)
        .map_err(|source| StoreError::Url {
            url: url.to_string(),
            source,
        })?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        // What is deleted or rewritten (a body sealed anew) is overwritten, not
        // left in free pages.
        .pragma("secure_delete", "ON")
        .foreign_keys(true))
}

/// Pool options for every syncgate database. A connection is given back to its
/// pool only when no transaction is open on it: a transaction that failed half
/// way (SQLite rolls it back itself on `SQLITE_FULL`, and the rollback asked for
/// then fails) would otherwise leave the connection believing one is open, and
/// every later "commit" would only release a savepoint inside a transaction
/// that never commits. Such a connection is closed; the pool opens a clean one.
pub(crate) fn pool_options<DB: sqlx::Database>() -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new().after_release(|conn: &mut DB::Connection, _| {
        Box::pin(async move {
            use sqlx::Connection;
            // Lets a rollback queued by a dropped transaction run first.
            conn.ping().await?;
            let clean = !conn.is_in_transaction();
            if !clean {
                tracing::warn!(
                    "a database connection was left inside a failed transaction; it is closed and a new one opened"
                );
            }
            Ok(clean)
        })
    })
}

#[derive(Clone)]
pub struct Store {
    d: Dialect,
    writer: AnyPool,
    reader: AnyPool,
    /// The capture path's writes, group-committed.
    batcher: batch::Batcher,
    /// Seals request bodies at rest (they carry passwords); `None` keeps them
    /// as they are (tests, `--insecure-plaintext-sync` without `--oplog-key`).
    vault: Option<Arc<Sealer>>,
    /// Who writes: on PostgreSQL this replica's number once it has joined
    /// (`join`), so that its intents name it (0 before, and on SQLite);
    /// how long a write in doubt may still land (`set_settle`); and whether
    /// it holds the op log alone.
    me: batch::Shared,
    /// On PostgreSQL: where the op log is, to open the leader's fenced
    /// pools (`fenced`).
    origin: Option<Arc<replicas::Origin>>,
    /// Whether this process may capture: on PostgreSQL, while it holds its
    /// presence (lost, the leader may settle its intents as another's that
    /// is gone); always on SQLite.
    present: Arc<std::sync::atomic::AtomicBool>,
}

impl Store {
    /// Opens (creating if missing) and migrates the op log at a `sqlite://`
    /// or `postgres://` URL; bodies are read and written as they are.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_sealed(url, None).await
    }

    /// Opens the op log with request bodies sealed at rest by `vault`: bodies
    /// written in clear by an earlier version, or under a key that is no longer
    /// the first, are sealed anew with the current key.
    pub async fn open_sealed(url: &str, vault: Option<Arc<Sealer>>) -> Result<Store, StoreError> {
        Store::connect(url, None, vault).await
    }

    /// Opens the op log at `url`: a `sqlite://` file (created if missing), or
    /// a `postgres://` database, whose password comes from `password` (or
    /// the environment's `PGPASSFILE`), never from the URL.
    pub async fn connect(
        url: &str,
        password: Option<&crate::core::Secret>,
        vault: Option<Arc<Sealer>>,
    ) -> Result<Store, StoreError> {
        let pools = engine::open(url, password).await?;
        let vault = vault.filter(|v| v.encrypts());
        let me = batch::Shared::default();
        let store = Store {
            d: pools.dialect,
            batcher: batch::Batcher::spawn(pools.writer.clone(), pools.dialect, me.clone()),
            me,
            writer: pools.writer,
            reader: pools.reader,
            vault,
            present: Arc::new(std::sync::atomic::AtomicBool::new(
                pools.dialect == Dialect::Sqlite,
            )),
            origin: (pools.dialect == Dialect::Postgres).then(|| {
                Arc::new(replicas::Origin {
                    url: url.to_string(),
                    password: password.cloned(),
                })
            }),
        };
        store.backfill_op_keys().await?;
        store.reseal_bodies().await?;
        Ok(store)
    }

    /// How long a write whose outcome is unknown may still land upstream
    /// (`--upstream-settle`): on PostgreSQL, other replicas' writes of its
    /// keys are refused meanwhile, as this process refuses its own.
    pub fn set_settle(&self, settle: Duration) {
        let ms = i64::try_from(settle.as_millis()).unwrap_or(i64::MAX);
        self.me
            .settle_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// The engine the op log is on.
    pub fn dialect(&self) -> Dialect {
        self.d
    }

    /// A read-only transaction whose reads all see one moment (SQLite's read
    /// transactions do; PostgreSQL's are made so).
    pub(crate) async fn snapshot(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        let mut tx = self.reader.begin().await?;
        if self.d == Dialect::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }

    /// Now by the op log's clock (the database's: every central process on
    /// one database compares times by it), in milliseconds since the epoch.
    pub async fn now_ms(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&self.d.sql("SELECT SG_NOW_MS()"))
            .fetch_one(&self.reader)
            .await?)
    }

    /// How long ago, by the op log's clock, an op was forwarded.
    pub async fn op_age(&self, seq: i64) -> Result<Option<std::time::Duration>, StoreError> {
        let secs: Option<f64> = sqlx::query_scalar(
            &self
                .d
                .sql("SELECT SG_SECONDS_SINCE(created_at) FROM ops WHERE seq = ?"),
        )
        .bind(seq)
        .fetch_optional(&self.reader)
        .await?;
        Ok(secs.map(|s| std::time::Duration::from_secs_f64(s.max(0.0))))
    }

    /// A body as stored: sealed to its op when there is a vault.
    fn seal_body(&self, op_id: &str, body: &str) -> String {
        match &self.vault {
            Some(v) => {
                let (enc, data) = v.seal(&body_aad(op_id), body.as_bytes());
                format!("{SEALED}{enc}:{data}")
            }
            None => body.to_string(),
        }
    }

    /// A stored body, opened. Without a vault a sealed body stays as stored.
    pub(crate) fn open_body(&self, op_id: &str, stored: String) -> Result<String, StoreError> {
        let (Some(vault), Some(rest)) = (&self.vault, stored.strip_prefix(SEALED)) else {
            return Ok(stored);
        };
        let (enc, data) = rest.split_once(':').unwrap_or((rest, ""));
        let plain = vault
            .open(&body_aad(op_id), enc, data)
            .map_err(|e| StoreError::Sealed(format!("op {op_id}: {e}")))?;
        String::from_utf8(plain).map_err(|_| StoreError::Sealed(format!("op {op_id}: not UTF-8")))
    }

    fn open_row(&self, mut row: OpRow) -> Result<OpRow, StoreError> {
        if let Some(body) = row.body.take() {
            row.body = Some(self.open_body(&row.op_id, body)?);
        }
        Ok(row)
    }

    /// Seals every body stored in clear or under a key other than the current
    /// one (after an upgrade, or a key rotation), in batches.
    async fn reseal_bodies(&self) -> Result<(), StoreError> {
        let Some(kid) = self.vault.as_ref().and_then(|v| v.sealing_key_id()) else {
            return Ok(());
        };
        let current = format!("{SEALED}{}/{kid}:%", crate::protocol::crypto::ENC_AES);
        let mut total = 0usize;
        for table in ["ops", "intents", "kept_passwords"] {
            loop {
                let rows: Vec<(String, String)> = sqlx::query_as(&self.d.sql(&format!(
                    "SELECT op_id, body FROM {table} WHERE body IS NOT NULL AND body NOT LIKE ? LIMIT 500"
                )))
                .bind(&current)
                .fetch_all(&self.writer)
                .await?;
                if rows.is_empty() {
                    break;
                }
                let mut tx = self.writer.begin().await?;
                for (op_id, body) in rows {
                    let plain = self.open_body(&op_id, body)?;
                    sqlx::query(
                        &self
                            .d
                            .sql(&format!("UPDATE {table} SET body = ? WHERE op_id = ?")),
                    )
                    .bind(self.seal_body(&op_id, &plain))
                    .bind(&op_id)
                    .execute(&mut *tx)
                    .await?;
                    total += 1;
                }
                tx.commit().await?;
            }
        }
        if total > 0 {
            // Old page images in the write-ahead log go too.
            if self.d == Dialect::Sqlite {
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&self.writer)
                    .await?;
            }
            tracing::info!(
                bodies = total,
                key = kid,
                "request bodies in the op log sealed with the current key"
            );
        }
        Ok(())
    }

    /// Ops logged before keys were kept get theirs once, so that a re-drive of
    /// an old op can still tell whether it would undo a later one.
    async fn backfill_op_keys(&self) -> Result<(), StoreError> {
        const DONE: &str = "op_keys_backfilled";
        let done: Option<i64> =
            sqlx::query_scalar(&self.d.sql("SELECT value FROM meta WHERE key = ?"))
                .bind(DONE)
                .fetch_optional(&self.writer)
                .await?;
        if done.is_some() {
            return Ok(());
        }
        let mut after = 0;
        loop {
            let ops: Vec<(i64, String, String, String, Option<String>, String)> =
                sqlx::query_as(&self.d.sql(
                    "SELECT seq, method, path, created_ids, body, op_id FROM ops
                 WHERE seq > ? AND NOT EXISTS (SELECT 1 FROM op_keys k WHERE k.seq = ops.seq)
                 ORDER BY seq LIMIT 1000",
                ))
                .bind(after)
                .fetch_all(&self.writer)
                .await?;
            let Some(last) = ops.last().map(|o| o.0) else {
                break;
            };
            let mut tx = self.writer.begin().await?;
            for (seq, method, path, created, body, op_id) in &ops {
                let route_path = path.split('?').next().unwrap_or(path);
                let crate::keystone::Classification::Replicable(route) =
                    crate::keystone::classify(method, route_path)
                else {
                    continue;
                };
                let body = body
                    .clone()
                    .and_then(|b| self.open_body(op_id, b).ok())
                    .and_then(|b| serde_json::from_str(&b).ok());
                let mut touched =
                    crate::keystone::touches::touches(&route, method, path, body.as_ref());
                let created: Vec<String> = serde_json::from_str(created).unwrap_or_default();
                touched.extend(crate::keystone::touches::created(&created));
                for t in crate::keystone::touches::normalise(touched) {
                    sqlx::query(&self.d.sql(
                        "INSERT INTO op_keys (key, seq, exclusive) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    ))
                    .bind(&t.key)
                    .bind(seq)
                    .bind(t.exclusive)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            after = last;
        }
        sqlx::query(
            &self
                .d
                .sql("INSERT INTO meta (key, value) VALUES (?, 1) ON CONFLICT (key) DO NOTHING"),
        )
        .bind(DONE)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Records a write before it is forwarded; returns the op ID it will carry.
    pub async fn begin_intent(&self, intent: &NewIntent<'_>) -> Result<Uuid, StoreError> {
        self.begin_intent_as(Uuid::new_v4(), intent).await
    }

    /// `begin_intent` under an op ID the caller chose (and registered as
    /// running before the intent became durable).
    pub async fn begin_intent_as(
        &self,
        op_id: Uuid,
        intent: &NewIntent<'_>,
    ) -> Result<Uuid, StoreError> {
        self.batcher
            .submit(batch::Work::Begin {
                op_id,
                method: intent.method.to_string(),
                path: intent.path.to_string(),
                class: intent.class.to_string(),
                kind: intent.kind.to_string(),
                body: intent.body.map(|b| self.seal_body(&op_id.to_string(), b)),
                refs: intent.refs.to_string(),
                traceparent: intent.traceparent.map(str::to_string),
                touches: intent.touches.to_vec(),
            })
            .await?;
        Ok(op_id)
    }

    /// Turns an intent into an op with the next seq, in one transaction (shared
    /// with the capture path's other writes of the moment).
    pub async fn commit_intent(
        &self,
        op_id: Uuid,
        state: OpState,
        outcome: &Outcome,
    ) -> Result<i64, StoreError> {
        let body = outcome
            .body
            .as_deref()
            .map(|b| self.seal_body(&op_id.to_string(), b));
        let seq = self
            .batcher
            .submit(batch::Work::Commit {
                op_id,
                state,
                outcome: outcome.clone(),
                body,
            })
            .await?;
        seq.ok_or(StoreError::NoIntent(op_id))
    }

    /// Forgets an intent whose write the upstream refused or never received.
    pub async fn drop_intent(&self, op_id: Uuid) -> Result<(), StoreError> {
        self.batcher.submit(batch::Work::Drop(op_id)).await?;
        Ok(())
    }

    /// Turns every intent left open by a crash into an `unknown_outcome` op, oldest
    /// first. Returns their seqs.
    pub async fn recover_open_intents(&self) -> Result<Vec<i64>, StoreError> {
        let open = self.open_intent_ids().await?;
        self.log_unknown(
            &open,
            "the gateway stopped before the upstream's answer was logged",
        )
        .await
    }

    /// Logs these intents as `unknown_outcome` ops, in order; an intent already
    /// closed meanwhile is passed over. Returns the seqs given.
    pub async fn log_unknown(&self, op_ids: &[Uuid], detail: &str) -> Result<Vec<i64>, StoreError> {
        let mut seqs = Vec::with_capacity(op_ids.len());
        for op_id in op_ids {
            // The keys it touches, so that a re-drive, and writes after it,
            // are ordered against it.
            let touches = self.intent_touches(*op_id).await?;
            let outcome = Outcome {
                detail: Some(detail.to_string()),
                touches,
                ..Outcome::default()
            };
            match self
                .commit_intent(*op_id, OpState::UnknownOutcome, &outcome)
                .await
            {
                Ok(seq) => seqs.push(seq),
                Err(StoreError::NoIntent(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(seqs)
    }

    /// The keys an open intent's write touches (none when it is closed): on
    /// PostgreSQL those it was opened with, else as its request says.
    pub async fn intent_touches(&self, op_id: Uuid) -> Result<Vec<Touch>, StoreError> {
        if self.d == Dialect::Postgres {
            let held: Vec<(String, bool)> = sqlx::query_as(
                "SELECT key, exclusive FROM intent_keys WHERE op_id = $1 ORDER BY key",
            )
            .bind(op_id.to_string())
            .fetch_all(&self.writer)
            .await?;
            if !held.is_empty() {
                return Ok(held
                    .into_iter()
                    .map(|(key, exclusive)| Touch { key, exclusive })
                    .collect());
            }
        }
        let intent: Option<(String, String, Option<String>)> = sqlx::query_as(
            &self
                .d
                .sql("SELECT method, path, body FROM intents WHERE op_id = ?"),
        )
        .bind(op_id.to_string())
        .fetch_optional(&self.writer)
        .await?;
        Ok(intent
            .map(|(method, path, body)| {
                let route_path = path.split('?').next().unwrap_or(&path);
                let crate::keystone::Classification::Replicable(route) =
                    crate::keystone::classify(&method, route_path)
                else {
                    return Vec::new();
                };
                let body = body
                    .and_then(|b| self.open_body(&op_id.to_string(), b).ok())
                    .and_then(|b| serde_json::from_str(&b).ok());
                crate::keystone::touches::normalise(crate::keystone::touches::touches(
                    &route,
                    &method,
                    &path,
                    body.as_ref(),
                ))
            })
            .unwrap_or_default())
    }

    /// Every open intent of this process, oldest first (by when it was
    /// opened, whatever the clock said then: no clock decides whether one is
    /// listed). On PostgreSQL, once joined, only this replica's: another's
    /// are settled by the leader when that replica is gone.
    pub async fn open_intent_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<String> = match (self.d, self.replica()) {
            (Dialect::Sqlite, _) => {
                sqlx::query_scalar("SELECT op_id FROM intents ORDER BY rowid")
                    .fetch_all(&self.writer)
                    .await?
            }
            (Dialect::Postgres, None) => {
                sqlx::query_scalar("SELECT op_id FROM intents ORDER BY opened")
                    .fetch_all(&self.writer)
                    .await?
            }
            (Dialect::Postgres, Some(me)) => {
                sqlx::query_scalar("SELECT op_id FROM intents WHERE owner = $1 ORDER BY opened")
                    .bind(me)
                    .fetch_all(&self.writer)
                    .await?
            }
        };
        replicas::parse_ids(ids)
    }

    /// The keys an op touched.
    pub async fn op_touches(&self, seq: i64) -> Result<Vec<Touch>, StoreError> {
        let rows: Vec<(String, dialect::Flag)> = sqlx::query_as(
            &self
                .d
                .sql("SELECT key, exclusive FROM op_keys WHERE seq = ? ORDER BY key"),
        )
        .bind(seq)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(key, exclusive)| Touch {
                key,
                exclusive: exclusive.0,
            })
            .collect())
    }

    /// The keys the ops in `(after, through]` changed (not those they only
    /// referenced): the entities, associations and names in flight.
    pub async fn changed_keys(
        &self,
        after: i64,
        through: i64,
    ) -> Result<std::collections::HashSet<String>, StoreError> {
        let keys: Vec<String> = sqlx::query_scalar(
            &self
                .d
                .sql("SELECT DISTINCT key FROM op_keys WHERE seq > ? AND seq <= ? AND exclusive"),
        )
        .bind(after)
        .bind(through)
        .fetch_all(&self.reader)
        .await?;
        Ok(keys.into_iter().collect())
    }

    /// The first op after `seq` that conflicts with it (shares a key that one of
    /// the two changes), with its method and path.
    pub async fn next_conflicting(
        &self,
        seq: i64,
    ) -> Result<Option<(i64, String, String)>, StoreError> {
        Ok(sqlx::query_as(&self.d.sql(
            "SELECT o.seq, o.method, o.path FROM op_keys mine
             JOIN op_keys later ON later.key = mine.key AND later.seq > mine.seq
                 AND (mine.exclusive OR later.exclusive)
             JOIN ops o ON o.seq = later.seq
             WHERE mine.seq = ?
             ORDER BY later.seq LIMIT 1",
        ))
        .bind(seq)
        .fetch_optional(&self.reader)
        .await?)
    }

    pub async fn get_op(&self, seq: i64) -> Result<Option<OpRow>, StoreError> {
        let row: Option<OpRow> = sqlx::query_as(&self.d.sql("SELECT * FROM ops WHERE seq = ?"))
            .bind(seq)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| self.open_row(r)).transpose()
    }

    pub async fn list_ops(&self, filter: &OpFilter) -> Result<Vec<OpRow>, StoreError> {
        let mut q = dialect::Sql::new("SELECT * FROM ops WHERE seq > ");
        q.bind(filter.after);
        if let Some(kind) = &filter.kind {
            q.push(" AND kind = ").bind(kind.as_str());
        }
        if let Some(state) = filter.state {
            q.push(" AND state = ").bind(state.as_str());
        }
        if let Some(through) = filter.through {
            q.push(" AND seq <= ").bind(through);
        }
        q.push(" ORDER BY seq LIMIT ").bind(filter.limit);
        let (text, args) = q.finish(self.d)?;
        let rows: Vec<OpRow> = sqlx::query_as_with(&text, args)
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(|r| self.open_row(r)).collect()
    }

    /// The last op edges may have: every op before the first whose unknown
    /// outcome is still being resolved (it, and all after it, wait).
    pub async fn publishable_through(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&self.d.sql(
            "SELECT COALESCE((SELECT MIN(seq) - 1 FROM ops WHERE resolution = 'pending'),
                             (SELECT MAX(seq) FROM ops), 0)",
        ))
        .fetch_one(&self.reader)
        .await?)
    }

    /// The ops whose outcome is unknown, not yet found applied or not, and
    /// forwarded less than `settle` ago: writes that may still land upstream,
    /// each with how long it still may (in ms, by the database's clock, as it
    /// wrote the time it was forwarded). A start holds their keys again
    /// (conflicting writes are refused until then), as the process that
    /// logged them did.
    pub async fn in_doubt(
        &self,
        settle: std::time::Duration,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        let settle = i64::try_from(settle.as_millis()).unwrap_or(i64::MAX);
        Ok(sqlx::query_as(&self.d.sql(
            "SELECT seq, CAST(?1 - SG_SECONDS_SINCE(created_at) * 1000 AS BIGINT) FROM ops
             WHERE state = 'unknown_outcome'
               AND COALESCE(resolution, '') NOT IN ('applied', 'not_applied')
               AND created_at > SG_ISO_MS(SG_NOW_MS() - ?1)
             ORDER BY seq",
        ))
        .bind(settle)
        .fetch_all(&self.reader)
        .await?)
    }

    /// Ops whose unknown outcome is to be resolved, oldest first.
    pub async fn pending_resolutions(&self, limit: i64) -> Result<Vec<OpRow>, StoreError> {
        let rows: Vec<OpRow> = sqlx::query_as(
            &self
                .d
                .sql("SELECT * FROM ops WHERE resolution = 'pending' ORDER BY seq LIMIT ?"),
        )
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(|r| self.open_row(r)).collect()
    }

    /// Records what became of a write whose outcome was unknown: applied (the
    /// op becomes committed, with the IDs found and the body to replay), not
    /// applied, or unresolvable.
    pub async fn resolve_op(
        &self,
        seq: i64,
        op_id: &str,
        resolution: &crate::keystone::resolve::Resolution,
    ) -> Result<(), StoreError> {
        use crate::keystone::resolve::Resolution;
        let mut tx = self.writer.begin().await?;
        match resolution {
            Resolution::Applied {
                created_ids,
                body,
                detail,
            } => {
                let body = body.as_ref().map(|b| self.seal_body(op_id, &b.to_string()));
                sqlx::query(&self.d.sql(
                    "UPDATE ops SET state = 'committed', resolution = 'applied',
                         detail = COALESCE(detail || '; ', '') || ?,
                         created_ids = ?, body = COALESCE(?, body)
                     WHERE seq = ? AND resolution = 'pending'",
                ))
                .bind(detail)
                .bind(serde_json::to_string(created_ids).expect("strings serialize"))
                .bind(body)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
                for t in crate::keystone::touches::created(created_ids) {
                    sqlx::query(&self.d.sql(
                        "INSERT INTO op_keys (key, seq, exclusive) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                    ))
                    .bind(&t.key)
                    .bind(seq)
                    .bind(t.exclusive)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Resolution::NotApplied { detail } | Resolution::Unresolvable { detail } => {
                let label = if matches!(resolution, Resolution::NotApplied { .. }) {
                    "not_applied"
                } else {
                    "unresolvable"
                };
                sqlx::query(&self.d.sql(
                    "UPDATE ops SET resolution = ?, detail = COALESCE(detail || '; ', '') || ?
                     WHERE seq = ? AND resolution = 'pending'",
                ))
                .bind(label)
                .bind(detail)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Whether an op of the log other than `seq` created or changed the entity
    /// with this ID (the op's keys, indexed), or one retention pruned did.
    pub async fn touched_by_another_op(&self, id: &str, seq: i64) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar::<_, i64>(&self.d.sql(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM op_keys WHERE key = ?1 AND seq != ?2)
                           OR EXISTS (SELECT 1 FROM pruned_keys WHERE key = ?1)
                         THEN 1 ELSE 0 END",
        ))
        .bind(id)
        .bind(seq)
        .fetch_one(&self.reader)
        .await?
            != 0)
    }

    /// The op before `seq` that deleted the entity `path` names
    /// (`/v3/<collection>/<id>`), when the last committed op on that path
    /// before `seq` is a delete and nothing may have made it again since: no
    /// op between names its ID among what it made, and none between has an
    /// outcome that may have made something unseen. Ops retention pruned are
    /// not looked at: what they did may have been undone by another.
    pub async fn deleted_before(&self, path: &str, seq: i64) -> Result<Option<i64>, StoreError> {
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let id = match segs.as_slice() {
            ["v3", _, id] if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) => *id,
            _ => return Ok(None),
        };
        let last: Option<(i64, String)> = sqlx::query_as(&self.d.sql(
            "SELECT seq, method FROM ops
             WHERE path = ? AND seq < ? AND state = 'committed'
             ORDER BY seq DESC LIMIT 1",
        ))
        .bind(path)
        .bind(seq)
        .fetch_optional(&self.reader)
        .await?;
        let Some((before, method)) = last else {
            return Ok(None);
        };
        if method != "DELETE" {
            return Ok(None);
        }
        let since: i64 = sqlx::query_scalar(&self.d.sql(
            "SELECT COUNT(*) FROM ops
             WHERE seq > ? AND seq < ?
               AND (created_ids LIKE ?
                    OR (state = 'unknown_outcome'
                        AND (resolution IS NULL OR resolution <> 'not_applied')))",
        ))
        .bind(before)
        .bind(seq)
        .bind(format!("%\"{id}\"%"))
        .fetch_one(&self.reader)
        .await?;
        Ok((since == 0).then_some(before))
    }

    /// The deletes central logged up to `through` (committed), with the
    /// natural keys they carry, oldest first, `limit` after `after`.
    pub async fn deletes(
        &self,
        after: i64,
        through: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String, String)>, StoreError> {
        // Deletes retention pruned left their tombstones.
        Ok(sqlx::query_as(&self.d.sql(
            "SELECT * FROM (
                 SELECT seq, path, refs FROM tombstones WHERE seq > ?1 AND seq <= ?2
                 UNION ALL
                 SELECT seq, path, refs FROM ops
                 WHERE method = 'DELETE' AND state = 'committed' AND seq > ?1 AND seq <= ?2
             ) AS deletes ORDER BY seq LIMIT ?3",
        ))
        .bind(after)
        .bind(through)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    /// The oldest seq the op log still holds.
    pub async fn first_seq(&self) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(&self.d.sql("SELECT MIN(seq) FROM ops"))
            .fetch_one(&self.reader)
            .await?)
    }

    /// Whether an op logged after `after` changed one of `keys` (see
    /// `keystone::touches`).
    pub async fn changed_since(&self, keys: &[String], after: i64) -> Result<bool, StoreError> {
        for key in keys {
            let found: Option<i64> =
                sqlx::query_scalar(&self.d.sql(
                    "SELECT seq FROM op_keys WHERE key = ? AND seq > ? AND exclusive LIMIT 1",
                ))
                .bind(key)
                .bind(after)
                .fetch_optional(&self.writer)
                .await?;
            if found.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub async fn last_seq(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar(&self.d.sql("SELECT COALESCE(MAX(seq), 0) FROM ops"))
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// The last op's logged time and now, when the last op was logged after
    /// now by this op log's clock (it was ahead, and was stepped back): the
    /// ops logged until the clock passes it carry its time (see
    /// `batch::LAST_LOGGED_AT`), and their ack timeouts and retention wait.
    pub async fn clock_behind_op_log(&self) -> Result<Option<(String, String)>, StoreError> {
        let last: Option<(String, String)> = sqlx::query_as(
            &self
                .d
                .sql("SELECT logged_at, SG_NOW() FROM ops WHERE seq = (SELECT MAX(seq) FROM ops)"),
        )
        .fetch_optional(&self.reader)
        .await?;
        Ok(last.filter(|(logged, now)| logged > now))
    }

    pub async fn open_intents(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar(&self.d.sql("SELECT COUNT(*) FROM intents"))
                .fetch_one(&self.reader)
                .await?,
        )
    }

    /// Proves the op log takes writes (readiness).
    pub async fn check_writable(&self) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql(
            "INSERT INTO health (id, checked_at) VALUES (1, SG_NOW())
             ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
        ))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// A database at `url` migrated only as far as the given files of
/// `migrations/<side>`: what an earlier version left.
#[cfg(test)]
pub(crate) async fn database_at_version(
    dir: &tempfile::TempDir,
    url: &str,
    side: &str,
    files: &[&str],
) -> sqlx::SqlitePool {
    let old = dir.path().join(format!("{side}-migrations"));
    std::fs::create_dir(&old).unwrap();
    for f in files {
        let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(side)
            .join(f);
        std::fs::copy(from, old.join(f)).unwrap();
    }
    let pool = sqlx::SqlitePool::connect_with(sqlite_options(url).unwrap())
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    pool
}

/// A database for a test: a new one on the PostgreSQL server that
/// `SYNCGATE_TEST_POSTGRES` names (`postgres://user@host:port`, as
/// `scripts/test.sh` starts it), else a SQLite file in `dir`.
#[cfg(test)]
pub(crate) async fn test_url(dir: &tempfile::TempDir) -> String {
    let Ok(server) = std::env::var("SYNCGATE_TEST_POSTGRES") else {
        return format!("sqlite://{}", dir.path().join("ops.db").display());
    };
    use sqlx::Connection;
    let server = server.trim_end_matches('/');
    let name = format!("t_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("SYNCGATE_TEST_POSTGRES={server}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    format!("{server}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::SqlitePoolOptions;

    #[test]
    fn a_query_is_tried_again_only_where_the_database_was_busy_or_away() {
        for code in [
            "5", "6", "261", "517", "773", "262", "08006", "53300", "57P01", "40001", "40P01",
        ] {
            assert!(transient_code(code), "{code}");
        }
        for code in [
            "11", "26", "14", "19", "2067", "23505", "42P01", "XX001", "53400", "57P04",
        ] {
            assert!(!transient_code(code), "{code}");
        }
        assert!(StoreError::Query(sqlx::Error::PoolClosed).is_transient());
        assert!(StoreError::Query(sqlx::Error::PoolTimedOut).is_transient());
        assert!(!StoreError::Query(sqlx::Error::RowNotFound).is_transient());
        assert!(!StoreError::Sealed("bad".into()).is_transient());
    }

    /// An op log on the engine the run is for: PostgreSQL when
    /// `SYNCGATE_TEST_POSTGRES` names a server (a new database on it),
    /// else a SQLite file.
    async fn temp_store() -> (tempfile::TempDir, Store, String) {
        let dir = tempfile::tempdir().unwrap();
        let url = test_url(&dir).await;
        let store = Store::open(&url).await.unwrap();
        (dir, store, url)
    }

    /// An op log on SQLite, for what only SQLite has (files, pages).
    async fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ops.db").display());
        let store = Store::open(&url).await.unwrap();
        (dir, store)
    }

    fn intent(path: &str) -> NewIntent<'_> {
        NewIntent {
            method: "POST",
            path,
            class: "resource",
            kind: "project",
            body: Some("{}"),
            refs: "[]",
            traceparent: None,
            touches: &[],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_captures_are_gap_free_and_durable_when_answered() {
        let (_dir, store, url) = temp_store().await;
        // A second, independent op log on the same database: what it sees is
        // committed.
        let other = Store::open(&url).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..300 {
            let store = store.clone();
            let other = other.clone();
            tasks.push(tokio::spawn(async move {
                let path = format!("/v3/projects/p{i}");
                let op = store.begin_intent(&intent(&path)).await.unwrap();
                let seq = store
                    .commit_intent(op, OpState::Committed, &Outcome::default())
                    .await
                    .unwrap();
                // Answered only once durable: the op is there for anyone.
                let found = other.get_op(seq).await.unwrap().map(|op| op.path);
                assert_eq!(found.as_deref(), Some(path.as_str()));
                seq
            }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(
            seqs,
            (1..=300).collect::<Vec<i64>>(),
            "no gap, no duplicate"
        );
        assert_eq!(store.open_intents().await.unwrap(), 0);
    }

    /// Fills an op log with each kind of row: 4 ops committed and 1 whose
    /// outcome was unknown (seq 5), edges heard from (e1, declared) and not
    /// (e2), exceptions of each state at e1 (seq 1 applied, 2 failed, 3
    /// adopted), a finished resync of e2, a drift audit of e1, a user needing
    /// a password at e2. Returns the unknown op's seq.
    async fn populate(store: &Store) -> i64 {
        use crate::protocol::messages::{Ack, Outcome as AckOutcome};
        let mut ops = Vec::new();
        for i in 0..4 {
            let op = store.begin_intent(&intent("/v3/projects")).await.unwrap();
            let outcome = Outcome {
                touches: vec![Touch {
                    key: format!("project:p{i}"),
                    exclusive: true,
                }],
                upstream_status: Some(201),
                ..Outcome::default()
            };
            let seq = store
                .commit_intent(op, OpState::Committed, &outcome)
                .await
                .unwrap();
            ops.push((seq, op.to_string()));
        }
        store.begin_intent(&intent("/v3/projects")).await.unwrap();
        let unknown = store.recover_open_intents().await.unwrap();
        assert_eq!(unknown.len(), 1);
        store.register_edge("e1", true).await.unwrap();
        store.register_edge("e2", false).await.unwrap();
        store
            .edge_hello("e1", 0, "test", None, Some(-25))
            .await
            .unwrap();
        store
            .hold_edge(
                "e1",
                7,
                2,
                Some("db-1"),
                Duration::from_secs(30),
                "another database",
            )
            .await
            .unwrap();
        let ack = |(seq, op_id): &(i64, String), outcome, detail: Option<&str>| Ack {
            seq: *seq,
            op_id: op_id.clone(),
            outcome,
            status: Some(500),
            detail: detail.map(str::to_string),
            edge_id_created: Vec::new(),
            operator_skipped: false,
        };
        assert_eq!(
            store
                .record_ack("e1", &ack(&ops[0], AckOutcome::Applied, None))
                .await
                .unwrap(),
            Some(1)
        );
        store
            .record_ack("e1", &ack(&ops[1], AckOutcome::Failed, Some("refused")))
            .await
            .unwrap();
        store
            .record_ack("e1", &ack(&ops[2], AckOutcome::Adopted, None))
            .await
            .unwrap();
        store.mark_published(5).await.unwrap();
        store.begin_resync("e2", "resync", true).await.unwrap();
        store
            .resync_progress("e2", "creating", Some(5), 1, 2)
            .await
            .unwrap();
        store
            .end_resync("e2", Ok(&serde_json::json!({"created": 1})))
            .await
            .unwrap();
        store.begin_drift("e1").await.unwrap();
        let found = [NewDrift {
            kind: "project",
            key: "Default/p9",
            category: "missing_at_edge",
            fields: &[],
            central_id: Some("c9"),
            edge_id: None,
        }];
        store.record_drift("e1", 5, 0, &found).await.unwrap();
        store
            .add_needs_password("e2", &[("u1".into(), "Default/alice".into())], 3)
            .await
            .unwrap();
        unknown[0]
    }

    /// The audit's pages come from the database as one JSON row each: every
    /// field reads back as written, text of any kind (quotes, a newline,
    /// other alphabets, a backslash) and NULLs included, on the engine of
    /// the run; a page that cannot be read whole is an error, not fewer rows.
    #[tokio::test]
    async fn a_page_read_as_one_row_gives_back_every_field_as_written() {
        let (_dir, store, _) = temp_store().await;
        populate(&store).await;
        // Registered last, read first: the page keeps the edges' order.
        store.register_edge("e0", false).await.unwrap();
        let awkward = "it said \"no\"\n\tü ñ 日本 \\ 'quoted' {\"json\": [1]}";
        store.edge_error("e1", awkward).await.unwrap();
        store.set_needs_resync("e2", Some(awkward)).await.unwrap();
        let edges = store.edges().await.unwrap();
        let ids: Vec<&str> = edges.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["e0", "e1", "e2"]);
        let edges = &edges[1..];
        assert_eq!(edges[0].error.as_deref(), Some(awkward));
        assert_eq!(edges[1].needs_resync.as_deref(), Some(awkward));
        assert_eq!((edges[1].error.as_deref(), edges[1].protocol), (None, None));
        // Each statement names every field of its rows, and no other.
        let keys = |v: serde_json::Value| -> std::collections::BTreeSet<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        let named = |c: &[&str]| c.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            keys(serde_json::to_value(&edges[0]).unwrap()),
            named(sync::EDGE_COLUMNS)
        );
        let late = store.out_of_sync(None, Duration::ZERO, 100).await.unwrap();
        assert_eq!(
            keys(serde_json::to_value(&late[0]).unwrap()),
            named(sync::OUT_OF_SYNC_COLUMNS)
        );
        let one = store.edge("e1").await.unwrap().unwrap();
        let stable = |e: &EdgeRow| {
            // Not the two figures the clock moves between the reads.
            let mut v = serde_json::to_value(e).unwrap();
            v["silent_ms"] = serde_json::Value::Null;
            v["lag_seconds"] = serde_json::Value::Null;
            v
        };
        assert_eq!(stable(&one), stable(&edges[0]));
        assert!(store.edge("nobody").await.unwrap().is_none());
        for broken in ["[{\"id\": \"e1\"", "{}", "[{\"id\": 1}]"] {
            let e = sync::rows_of::<EdgeRow>(Some(broken.into())).unwrap_err();
            assert!(e.to_string().contains("op log query failed"), "{e}");
        }
        assert!(sync::rows_of::<EdgeRow>(None).is_err());
        assert!(sync::rows_of::<EdgeRow>(Some("[]".into()))
            .unwrap()
            .is_empty());
    }

    /// Every read behind the audit API, over an op log holding each kind
    /// of row (see `populate`), on the engine of the run: each answers,
    /// with what was put in.
    #[tokio::test]
    async fn the_audit_reads_answer_over_every_kind_of_row() {
        let (_dir, store, _) = temp_store().await;
        let unknown = populate(&store).await;
        assert_eq!(store.published_seq().await.unwrap(), 5);

        let edges = store.edges().await.unwrap();
        assert_eq!(edges.len(), 2);
        let e1 = &edges[0];
        assert!(e1.declared && e1.last_seen.is_some() && e1.silent_ms.is_some());
        assert_eq!((e1.acked_seq, e1.clock_skew_ms), (3, Some(-25)));
        assert!(e1.lag_ops > 0 && e1.lag_seconds >= 0.0, "{e1:?}");
        assert!(!edges[1].declared && edges[1].last_seen.is_none());

        let by_edge: Vec<(String, String)> = store
            .deliveries(2, Duration::from_secs(3600))
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.edge, d.state))
            .collect();
        assert_eq!(
            by_edge,
            [
                ("e1".into(), "failed".into()),
                ("e2".into(), "pending".into())
            ]
        );
        // Everything not acked is timed out after no time at all.
        let late = store.out_of_sync(None, Duration::ZERO, 100).await.unwrap();
        let states: Vec<(i64, &str, &str)> = late
            .iter()
            .map(|r| (r.seq, r.edge.as_str(), r.state.as_str()))
            .collect();
        assert!(states.contains(&(2, "e1", "failed")), "{states:?}");
        assert!(states.contains(&(1, "e2", "timed_out")), "{states:?}");
        assert_eq!(
            store
                .out_of_sync(Some("e1"), Duration::ZERO, 100)
                .await
                .unwrap()
                .len(),
            states.iter().filter(|s| s.1 == "e1").count()
        );
        let counts = store.delivery_counts(Duration::ZERO).await.unwrap();
        assert_eq!(counts.failed, 1);
        let counts = store
            .edge_delivery_counts(Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(counts.len(), 2);
        let resync = store.resync("e2").await.unwrap().unwrap();
        assert!(resync.prune && resync.finished_at.is_some(), "{resync:?}");
        let report = store
            .drift_report(&["e1".to_string()], &["project"], None, 10)
            .await
            .unwrap();
        assert_eq!(report.rows.len(), 1);
        let summary = report.runs[0].1.as_ref().unwrap();
        assert_eq!(summary.counts["missing_at_edge"]["project"], 1);
        assert!(summary.run.found_at.is_some());
        let audit = store.edge_audit("e2", 10).await.unwrap();
        assert_eq!(audit.needs_password.0, 1);
        assert!(store.get_op(unknown).await.unwrap().is_some());
        assert_eq!(store.publishable_through().await.unwrap(), unknown - 1);
        assert!(store.touched_by_another_op("project:p1", 1).await.unwrap());
        store.check_writable().await.unwrap();
    }

    /// `out_of_sync` over several edges, with failed, timed-out and
    /// unresolved rows (and one edge with none): exactly the rows a plain
    /// model of the watermarks and exceptions says, in edge then seq order,
    /// and with any limit a prefix of them; one edge's alone when asked.
    #[tokio::test]
    async fn out_of_sync_is_every_row_in_edge_then_seq_order_and_a_limit_takes_a_prefix() {
        out_of_sync_as_modelled(
            Some(11),
            &[
                ("a", 12, &[3, 7]),
                ("b", 5, &[2]),
                ("c", 12, &[]),
                ("d", 0, &[]),
                ("e", 8, &[4, 10]),
                ("f", 12, &[]),
                ("g", 12, &[]),
            ],
            // f was resynced past the unresolvable op (it has nothing out
            // of sync); g's resync stopped before it.
            &[("f", 12), ("g", 10)],
        )
        .await;
    }

    /// Without an unresolvable op (which makes every edge worth reading),
    /// an edge whose watermark is current is still read when it has a
    /// failed op: one below its watermark, and one its last ack recorded
    /// as it moved the watermark to the end. An edge registered after the
    /// ops has them all timed out.
    #[tokio::test]
    async fn out_of_sync_reads_an_edge_with_a_current_watermark_that_has_a_failed_op() {
        out_of_sync_as_modelled(
            None,
            &[
                ("a", 12, &[3]),
                ("b", 11, &[12]),
                ("c", 12, &[]),
                ("d", 0, &[]),
                ("e", 12, &[]),
            ],
            &[],
        )
        .await;
    }

    /// Twelve ops (`unresolvable` the seq of one whose outcome could not be
    /// told), the edges' watermarks and failed ops (an ack for each failed
    /// op above the watermark, the rest with the watermark's outcomes) and
    /// finished resyncs (edge, fence), then `out_of_sync` against the model,
    /// with every limit and for one edge.
    async fn out_of_sync_as_modelled(
        unresolvable: Option<i64>,
        edges: &[(&str, i64, &[i64])],
        resynced: &[(&str, i64)],
    ) {
        use crate::keystone::resolve::Resolution;
        use crate::protocol::messages::{Ack, Outcome as AckOutcome};
        let (_dir, store, _) = temp_store().await;
        let mut ids = Vec::new();
        for i in 1..=12 {
            let op = store.begin_intent(&intent("/v3/projects")).await.unwrap();
            let state = if Some(i) == unresolvable {
                OpState::UnknownOutcome
            } else {
                OpState::Committed
            };
            let seq = store
                .commit_intent(op, state, &Outcome::default())
                .await
                .unwrap();
            assert_eq!(seq, i);
            ids.push(op.to_string());
        }
        if let Some(seq) = unresolvable {
            let unresolvable = Resolution::Unresolvable {
                detail: "not found either way".into(),
            };
            store
                .resolve_op(seq, &ids[seq as usize - 1], &unresolvable)
                .await
                .unwrap();
        }
        let failed = |seq: i64| Ack {
            seq,
            op_id: ids[seq as usize - 1].clone(),
            outcome: AckOutcome::Failed,
            status: Some(500),
            detail: Some(format!("op {seq} refused")),
            edge_id_created: vec![],
            operator_skipped: false,
        };
        for &(edge, through, fails) in edges {
            store.register_edge(edge, true).await.unwrap();
            let (below, above): (Vec<i64>, Vec<i64>) = fails.iter().partition(|&&s| s <= through);
            let exceptions: Vec<Ack> = below.iter().map(|&s| failed(s)).collect();
            store
                .record_outcomes(edge, 0, through, &exceptions, 0)
                .await
                .unwrap();
            for seq in above {
                store.record_ack(edge, &failed(seq)).await.unwrap();
            }
        }
        for &(edge, fence) in resynced {
            store.begin_resync(edge, "resync", false).await.unwrap();
            store
                .resync_progress(edge, "creating", Some(fence), 1, 1)
                .await
                .unwrap();
            store
                .end_resync(edge, Ok(&serde_json::json!({})))
                .await
                .unwrap();
        }
        let mut model = Vec::new();
        for &(edge, through, fails) in edges {
            let fence = resynced.iter().find(|r| r.0 == edge).map_or(0, |r| r.1);
            for seq in 1..=12i64 {
                let state = if fails.contains(&seq) {
                    "failed"
                } else if Some(seq) == unresolvable && seq > fence {
                    "unresolved"
                } else if seq > through {
                    "timed_out"
                } else {
                    continue;
                };
                model.push((edge.to_string(), seq, state.to_string()));
            }
        }
        let rows = |limit: i64, edge: Option<String>| {
            let store = store.clone();
            async move {
                store
                    .out_of_sync(edge.as_deref(), Duration::ZERO, limit)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.edge, r.seq, r.state))
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(rows(1000, None).await, model);
        for limit in 1..=model.len() as i64 + 1 {
            let want = &model[..(limit as usize).min(model.len())];
            assert_eq!(rows(limit, None).await, want, "limit {limit}");
        }
        for &(edge, ..) in edges {
            let only: Vec<_> = model.iter().filter(|r| r.0 == edge).cloned().collect();
            assert_eq!(rows(1000, Some(edge.into())).await, only, "edge {edge}");
            let two = &only[..only.len().min(2)];
            assert_eq!(
                rows(2, Some(edge.into())).await,
                two,
                "edge {edge}, limit 2"
            );
        }
    }

    /// A process on another database than the last holder's is marked for
    /// a resync by the same write that records its database (apart, a
    /// failure between them would leave the new database and no mark, and
    /// no later hello could tell); the same database, or a first one, is not.
    #[tokio::test]
    async fn holding_an_edge_from_another_database_marks_it_for_a_resync_in_the_same_write() {
        let (_dir, store, _) = temp_store().await;
        store.register_edge("e1", true).await.unwrap();
        let lease = Duration::from_secs(30);
        let hold = |session: u64, db: Option<&'static str>| {
            let store = store.clone();
            async move {
                store
                    .hold_edge("e1", session, 2, db, lease, "another database")
                    .await
                    .unwrap()
            }
        };
        assert_eq!(hold(1, Some("db-1")).await, (None, Some(0)));
        assert_eq!(hold(2, Some("db-1")).await, (Some("db-1".into()), Some(1)));
        assert_eq!(hold(3, None).await, (Some("db-1".into()), Some(2)));
        assert_eq!(store.edge_needs_resync("e1").await.unwrap(), None);
        assert_eq!(hold(4, Some("db-2")).await, (Some("db-1".into()), Some(3)));
        assert_eq!(
            store.edge_needs_resync("e1").await.unwrap().as_deref(),
            Some("another database")
        );
        // The mark stays until a resync clears it, whoever holds the ID.
        assert_eq!(hold(5, Some("db-2")).await, (Some("db-2".into()), Some(4)));
        assert!(store.edge_needs_resync("e1").await.unwrap().is_some());
        store.set_needs_resync("e1", None).await.unwrap();
        assert_eq!(store.edge_needs_resync("e1").await.unwrap(), None);
    }

    /// An op is logged at the later of now and the last op's time: stepped
    /// back, the clock never makes a new op look older than those before it
    /// (the audit finds "the last op logged before T" at one end of the
    /// index on `logged_at`; an op that looked older would hide the ops
    /// after it from the timeouts).
    #[tokio::test]
    async fn an_op_is_never_logged_before_the_op_it_follows() {
        let (_dir, store, _) = temp_store().await;
        let commit = |store: Store| async move {
            let op = store.begin_intent(&intent("/v3/projects")).await.unwrap();
            store
                .commit_intent(op, OpState::Committed, &Outcome::default())
                .await
                .unwrap()
        };
        assert_eq!(commit(store.clone()).await, 1);
        let set_logged = |seq: i64, at: &'static str| {
            let store = store.clone();
            async move {
                sqlx::query(&store.d.sql("UPDATE ops SET logged_at = ? WHERE seq = ?"))
                    .bind(at)
                    .bind(seq)
                    .execute(&store.writer)
                    .await
                    .unwrap();
            }
        };
        // After an op logged long ago, an op is logged now.
        let long_ago = "2020-01-01T00:00:00.000Z";
        set_logged(1, long_ago).await;
        assert_eq!(commit(store.clone()).await, 2);
        let (second, now): (String, String) = sqlx::query_as(
            &store
                .d
                .sql("SELECT logged_at, SG_NOW() FROM ops WHERE seq = 2"),
        )
        .fetch_one(&store.writer)
        .await
        .unwrap();
        assert!(
            second.as_str() > long_ago && second <= now,
            "{second} (now {now})"
        );
        assert_eq!(store.clock_behind_op_log().await.unwrap(), None);
        // As if the clock had been ahead when op 2 was logged: the ops after
        // it carry its time, and central says so when it starts.
        let ahead = "2999-01-01T00:00:00.000Z";
        set_logged(2, ahead).await;
        assert_eq!(commit(store.clone()).await, 3);
        assert_eq!(commit(store.clone()).await, 4);
        let logged: Vec<String> =
            sqlx::query_scalar("SELECT logged_at FROM ops WHERE seq > 1 ORDER BY seq")
                .fetch_all(&store.writer)
                .await
                .unwrap();
        assert_eq!(logged, [ahead, ahead, ahead]);
        let (last, now) = store.clock_behind_op_log().await.unwrap().expect("behind");
        assert_eq!(last, ahead);
        assert!(now.as_str() < ahead, "{now}");
    }

    /// What the audit API shows of an op log, without what moves with the
    /// clock (silences, lags).
    async fn shown(store: &Store) -> String {
        let all = OpFilter {
            limit: 100,
            ..OpFilter::default()
        };
        let mut out = format!("{:?}\n", store.list_ops(&all).await.unwrap());
        for e in store.edges().await.unwrap() {
            out += &format!(
                "{} {} {} {} {:?} {:?} {:?} {:?} {:?}\n",
                e.id,
                e.declared,
                e.cursor,
                e.acked_seq,
                e.version,
                e.error,
                e.protocol,
                e.needs_resync,
                e.clock_skew_ms
            );
        }
        for seq in 1..=5 {
            out += &format!(
                "{:?}\n",
                store
                    .deliveries(seq, Duration::from_secs(3600))
                    .await
                    .unwrap()
            );
            out += &format!("{:?}\n", store.op_touches(seq).await.unwrap());
        }
        out += &format!(
            "{:?}\n",
            store.out_of_sync(None, Duration::ZERO, 100).await.unwrap()
        );
        let report = store
            .drift_report(&["e1".into(), "e2".into()], &[], None, 100)
            .await
            .unwrap();
        out += &format!("{:?} {:?}\n", report.runs, report.rows);
        for e in ["e1", "e2"] {
            out += &format!("{:?}\n", store.edge_audit(e, 10).await.unwrap());
        }
        let sessions: Vec<_> = store
            .edge_sessions()
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.edge, s.session, s.needs_resync, s.lease_ms))
            .collect();
        out += &format!(
            "{sessions:?} {} {}\n",
            store.published_seq().await.unwrap(),
            store.publishable_through().await.unwrap()
        );
        out
    }

    /// An op log copied from SQLite to another database (PostgreSQL in the
    /// run on it) answers every audit read as its source does, takes writes
    /// after with the next seq, and a second copy into it is refused.
    #[tokio::test]
    async fn an_op_log_copied_answers_as_its_source_and_goes_on_from_its_last_seq() {
        let (_a, source) = sqlite_store().await;
        populate(&source).await;
        // An intent still open in the source goes along.
        source
            .begin_intent(&intent("/v3/projects/open"))
            .await
            .unwrap();
        let (_b, target, _) = temp_store().await;
        let report = source.copy_to(&target).await.unwrap();
        assert_eq!(report.last_seq, 5);
        assert_eq!(report.tables["ops"], 5);
        assert_eq!(report.tables["intents"], 1);
        assert_eq!(shown(&target).await, shown(&source).await);
        assert_eq!(target.open_intents().await.unwrap(), 1);

        let refused = source.copy_to(&target).await.unwrap_err().to_string();
        assert!(refused.contains("already holds an op log"), "{refused}");
        let op = target.begin_intent(&intent("/v3/projects")).await.unwrap();
        let seq = target
            .commit_intent(op, OpState::Committed, &Outcome::default())
            .await
            .unwrap();
        assert_eq!(seq, 6, "the copy goes on from its last seq");
    }

    #[tokio::test]
    async fn a_write_that_fails_in_a_shared_transaction_fails_alone() {
        let (_dir, store, _) = temp_store().await;
        let a = store.begin_intent(&intent("/v3/projects")).await.unwrap();
        let b = store.begin_intent(&intent("/v3/projects")).await.unwrap();
        let gone = Uuid::new_v4();
        // Submitted together: they share a transaction.
        let done = Outcome::default();
        let (ra, rgone, rb) = tokio::join!(
            store.commit_intent(a, OpState::Committed, &done),
            store.commit_intent(gone, OpState::Committed, &done),
            store.commit_intent(b, OpState::Committed, &done),
        );
        assert!(matches!(rgone, Err(StoreError::NoIntent(id)) if id == gone));
        let mut seqs = vec![ra.unwrap(), rb.unwrap()];
        seqs.sort_unstable();
        assert_eq!(seqs, [1, 2]);
        assert!(
            store.get_op(1).await.unwrap().is_some() && store.get_op(2).await.unwrap().is_some()
        );
    }

    /// A write that finds the database full (SQLite's page limit here; a full
    /// filesystem in `tests/it/disk_full.rs`) fails alone and says so; what
    /// was answered is on disk, and writes succeed again once there is room.
    #[tokio::test]
    async fn a_full_database_fails_its_writes_and_takes_writes_again_after() {
        let (dir, store) = sqlite_store().await;
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 4))
            .execute(&store.writer)
            .await
            .unwrap();
        let big = "x".repeat(3000);
        let write = |store: Store, body: String| async move {
            let mut i = intent("/v3/projects");
            i.body = Some(&body);
            let op = store.begin_intent(&i).await?;
            store
                .commit_intent(op, OpState::Committed, &Outcome::default())
                .await
        };
        let (mut answered, mut refused) = (0, 0);
        for _ in 0..20 {
            match write(store.clone(), big.clone()).await {
                Ok(_) => answered += 1,
                Err(StoreError::Batch(e)) => {
                    assert!(e.contains("full"), "{e}");
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0 && answered > 0, "{answered} {refused}");
        sqlx::query("PRAGMA max_page_count = 1000000")
            .execute(&store.writer)
            .await
            .unwrap();
        for _ in 0..5 {
            write(store.clone(), big.clone()).await.unwrap();
            answered += 1;
        }
        store.close().await;
        let url = format!("sqlite://{}", dir.path().join("ops.db").display());
        let other = SqlitePoolOptions::new().connect(&url).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM ops")
            .fetch_one(&other)
            .await
            .unwrap();
        assert_eq!(n, answered);
    }

    #[tokio::test]
    async fn intents_become_ops_in_seq_order_and_dropped_ones_leave_no_gap() {
        let (_dir, store, _) = temp_store().await;
        let a = store.begin_intent(&intent("/v3/projects")).await.unwrap();
        let b = store.begin_intent(&intent("/v3/projects")).await.unwrap();
        let c = store.begin_intent(&intent("/v3/projects")).await.unwrap();
        store.drop_intent(b).await.unwrap();
        let body = Outcome {
            body: Some("{\"x\":1}".into()),
            ..Outcome::default()
        };
        assert_eq!(
            store
                .commit_intent(c, OpState::Committed, &body)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .commit_intent(a, OpState::Committed, &Outcome::default())
                .await
                .unwrap(),
            2
        );
        let first = store.get_op(1).await.unwrap().unwrap();
        assert_eq!(first.body.as_deref(), Some("{\"x\":1}"));
        assert_eq!(
            store.get_op(2).await.unwrap().unwrap().body.as_deref(),
            Some("{}")
        );
        assert_eq!(store.open_intents().await.unwrap(), 0);
        assert!(matches!(
            store
                .commit_intent(b, OpState::Committed, &Outcome::default())
                .await,
            Err(StoreError::NoIntent(_))
        ));
    }

    /// An op log written by the previous version (migrations 0001 and 0002, a
    /// delivery row per op and edge) opens with watermarks and exception rows.
    #[tokio::test]
    async fn an_op_log_of_the_previous_version_keeps_its_delivery_states() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ops.db").display());
        let pool =
            database_at_version(&dir, &url, "central", &["0001_oplog.sql", "0002_sync.sql"]).await;
        const G: &str = "0123456789abcdef0123456789abcdef";
        for seq in 1..=4 {
            let (method, path, created) = match seq {
                1 => ("POST", "/v3/groups".to_string(), format!("[\"{G}\"]")),
                _ => ("PATCH", format!("/v3/groups/{G}"), "[]".to_string()),
            };
            sqlx::query(
                "INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_ids,
                                  created_at, logged_at)
                 VALUES (?, ?, 'committed', ?, ?, 'identity', 'group', ?,
                         '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z')",
            )
            .bind(seq)
            .bind(format!("op-{seq}"))
            .bind(method)
            .bind(path)
            .bind(created)
            .execute(&pool)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO edges (id, declared, cursor, first_seen_ms) VALUES ('e1', 1, 2, 0), ('e2', 1, 4, 0);
             INSERT INTO deliveries (seq, edge, state, since_ms, updated_ms) VALUES
                 (1, 'e1', 'applied', 0, 0), (2, 'e1', 'failed', 0, 0),
                 (3, 'e1', 'timed_out', 0, 0), (4, 'e1', 'applied', 0, 0),
                 (1, 'e2', 'applied', 0, 0), (2, 'e2', 'adopted', 0, 0),
                 (3, 'e2', 'applied', 0, 0), (4, 'e2', 'applied', 0, 0);
             INSERT INTO meta (key, value) VALUES ('published_seq', 4);",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = Store::open(&url).await.unwrap();
        // Old ops got the keys a re-drive needs: the create conflicts with the
        // updates of what it created.
        assert_eq!(
            store.next_conflicting(1).await.unwrap().map(|c| c.0),
            Some(2)
        );
        assert_eq!(store.edge_position("e1").await.unwrap(), Some((2, 2)));
        assert_eq!(store.edge_position("e2").await.unwrap(), Some((4, 4)));
        // No resync, drift run or user needing a password before this version.
        assert!(store.resync("e1").await.unwrap().is_none());
        assert!(store.drift_run("e1").await.unwrap().is_none());
        assert_eq!(store.needs_password("e1", 10).await.unwrap().0, 0);
        let states = |rows: Vec<DeliveryRow>| -> Vec<(String, String)> {
            rows.into_iter().map(|d| (d.edge, d.state)).collect()
        };
        let t = Duration::from_secs(30);
        let pairs = |a: &str, b: &str| vec![("e1".into(), a.into()), ("e2".into(), b.into())];
        assert_eq!(
            states(store.deliveries(1, t).await.unwrap()),
            pairs("applied", "applied")
        );
        assert_eq!(
            states(store.deliveries(2, t).await.unwrap()),
            pairs("failed", "adopted")
        );
        assert_eq!(
            states(store.deliveries(3, t).await.unwrap()),
            pairs("timed_out", "applied")
        );
        // Acknowledged out of order before the upgrade: waits for the edge to
        // confirm it again (its next hello), shown as not yet acknowledged.
        assert_eq!(
            states(store.deliveries(4, t).await.unwrap()),
            pairs("timed_out", "applied")
        );
        let counts = store.delivery_counts(t).await.unwrap();
        assert_eq!(
            counts,
            DeliveryCounts {
                pending: 0,
                failed: 1,
                timed_out: 2
            }
        );
        let oos: Vec<(i64, String)> = store
            .out_of_sync(None, t, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.seq, r.state))
            .collect();
        assert_eq!(
            oos,
            vec![
                (2, "failed".into()),
                (3, "timed_out".into()),
                (4, "timed_out".into())
            ]
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn database_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = sqlite_store().await;
        let id = store.begin_intent(&intent("/v3/projects")).await.unwrap();
        store
            .commit_intent(id, OpState::Committed, &Outcome::default())
            .await
            .unwrap();
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        for f in ["ops.db", "ops.db-wal", "ops.db-shm"] {
            assert_eq!(mode(f), 0o600, "{f}");
        }
        store.close().await;
        // A file an older version left open to others is tightened.
        std::fs::set_permissions(
            dir.path().join("ops.db"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let url = format!("sqlite://{}", dir.path().join("ops.db").display());
        Store::open(&url).await.unwrap().close().await;
        assert_eq!(mode("ops.db"), 0o600);
    }

    #[tokio::test]
    async fn list_filters_by_kind_and_state() {
        let (_dir, store, _) = temp_store().await;
        for state in [
            OpState::Committed,
            OpState::UnknownOutcome,
            OpState::Committed,
        ] {
            let id = store.begin_intent(&intent("/v3/projects")).await.unwrap();
            store
                .commit_intent(id, state, &Outcome::default())
                .await
                .unwrap();
        }
        let filter = OpFilter {
            after: 0,
            limit: 10,
            kind: None,
            state: Some(OpState::Committed),
            through: None,
        };
        let seqs: Vec<_> = store
            .list_ops(&filter)
            .await
            .unwrap()
            .iter()
            .map(|o| o.seq)
            .collect();
        assert_eq!(seqs, vec![1, 3]);
        let filter = OpFilter {
            after: 1,
            limit: 1,
            kind: Some("project".into()),
            state: None,
            through: None,
        };
        let seqs: Vec<_> = store
            .list_ops(&filter)
            .await
            .unwrap()
            .iter()
            .map(|o| o.seq)
            .collect();
        assert_eq!(seqs, vec![2]);
        let filter = OpFilter {
            after: 0,
            limit: 10,
            kind: Some("user".into()),
            state: None,
            through: None,
        };
        assert!(store.list_ops(&filter).await.unwrap().is_empty());
        store.check_writable().await.unwrap();
    }

    #[tokio::test]
    async fn a_drift_audit_of_the_previous_version_keeps_its_findings_dated() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ops.db").display());
        let files = [
            "0001_oplog.sql",
            "0002_sync.sql",
            "0003_exactly_once.sql",
            "0004_trace.sql",
            "0005_resync.sql",
        ];
        let pool = database_at_version(&dir, &url, "central", &files).await;
        sqlx::query(
            "INSERT INTO edges (id, declared, cursor, first_seen_ms) VALUES ('e1', 1, 0, 0), ('e2', 1, 0, 0);
             INSERT INTO drift_runs (edge, state, fence, started_ms, finished_ms) VALUES
                 ('e1', 'done', 7, 1000, 2000), ('e2', 'failed', NULL, 1000, 2000);
             INSERT INTO drift (edge, kind, key, category) VALUES ('e1', 'user', 'Default/x', 'only_at_edge');",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = Store::open(&url).await.unwrap();
        let report = store
            .drift_report(&["e1".into(), "e2".into()], &[], None, 10)
            .await
            .unwrap();
        let e1 = report.runs[0].1.as_ref().unwrap();
        assert_eq!(e1.run.found_at.as_deref(), Some("1970-01-01T00:00:02.000Z"));
        assert_eq!(
            (e1.run.fence, e1.counts["only_at_edge"]["user"]),
            (Some(7), 1)
        );
        // A failed audit found nothing to date.
        assert_eq!(report.runs[1].1.as_ref().unwrap().run.found_at, None);
        assert_eq!(report.rows.len(), 1);
        // A new audit keeps showing what the last completed one found.
        store.begin_drift("e1").await.unwrap();
        let run = store.drift_run("e1").await.unwrap().unwrap();
        assert_eq!(
            (run.state.as_str(), run.finished_at, run.found_at.as_deref()),
            ("running", None, Some("1970-01-01T00:00:02.000Z"))
        );
    }

    #[tokio::test]
    async fn drift_found_by_a_release_with_other_kind_names_is_read_in_todays() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("ops.db").display());
        let files: Vec<String> = std::fs::read_dir(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/central"),
        )
        .unwrap()
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.as_str() < "0012")
        .collect();
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        let pool = database_at_version(&dir, &url, "central", &files).await;
        sqlx::query(
            "INSERT INTO edges (id, declared, cursor, first_seen_ms) VALUES ('e1', 1, 0, 0);
             INSERT INTO drift_runs (edge, state, fence, started_ms, finished_ms) VALUES
                 ('e1', 'done', 7, 1000, 2000);
             INSERT INTO drift (edge, kind, key, category) VALUES
                 ('e1', 'membership', 'Default/a in Default/g', 'missing_at_edge'),
                 ('e1', 'assignment', 'r to user Default/a on project Default/p', 'missing_at_edge'),
                 ('e1', 'assignment', 'r to user Default/a on domain Default (inherited)', 'only_at_edge'),
                 ('e1', 'protocol', 'idp/saml2', 'differs'),
                 ('e1', 'user', 'Default/x', 'only_at_edge');",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = Store::open(&url).await.unwrap();
        let report = store
            .drift_report(&["e1".into()], &[], None, 10)
            .await
            .unwrap();
        let kinds: Vec<(&str, &str)> = report
            .rows
            .iter()
            .map(|r| (r.kind.as_str(), r.key.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("federation_protocol", "idp/saml2"),
                ("grant", "r to user Default/a on project Default/p"),
                ("group_membership", "Default/a in Default/g"),
                (
                    "inherited_grant",
                    "r to user Default/a on domain Default (inherited)"
                ),
                ("user", "Default/x"),
            ]
        );
        for (kind, _) in kinds {
            assert!(
                crate::keystone::kinds::named(kind).is_some(),
                "{kind} is a kind of the catalogue"
            );
        }
        let grants = store
            .drift_report(&["e1".into()], &["grant"], None, 10)
            .await
            .unwrap();
        assert_eq!(grants.rows.len(), 1);
        // Grants of both kinds, as one older name stood for.
        let both = store
            .drift_report(
                &["e1".into()],
                &crate::keystone::kinds::filter("assignment"),
                None,
                10,
            )
            .await
            .unwrap();
        assert_eq!(both.rows.len(), 2);
    }
}
