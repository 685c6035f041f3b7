//! The op log on PostgreSQL, the engine several central processes share.
//!
//! What SQLite gets from its one writer, PostgreSQL gets from one counter row
//! (`oplog_head`): a commit takes its seqs by updating that row inside the
//! transaction that inserts its ops, so the row's lock is held from taking a
//! seq to the commit. Seqs are then gap-free (a transaction that fails gives
//! its seqs back with its update) and become visible in seq order: a reader
//! that has seen seq N never later finds a new op below N (a plain sequence
//! hands out values before commit and breaks this). Every connection commits
//! with `synchronous_commit = on`: an op is durable before its client is
//! answered.
//!
//! One process at a time leads (`campaign`): it holds a session advisory
//! lock on a connection of its own, and each election moves an epoch on that
//! fences the leader's writes (`set_published`): the epoch is compared under
//! the row lock an election must take, so a deposed leader's late write is
//! refused once another is elected (a leader that lost its lock may still
//! write until then: nobody else leads meanwhile).
//!
//! Every connection is set so that a stalled or vanished peer cannot hold a
//! lock for long: TCP keepalives and a user timeout (a lease whose process
//! is cut off without a reset is released within about 30 s; a killed
//! process's at once), and a transaction left idle is ended by the server.
//!
//! Central's op log runs on PostgreSQL through `Store` (`--db postgres://`),
//! which takes its seqs from the same head row; the election and the fenced
//! writes here are what several central processes will share duties by.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool, Postgres, QueryBuilder};

use super::engine::{has_password, shown, PG_SESSION};
use super::StoreError;
use crate::core::Secret;

/// An op to log, as capture commits it.
#[derive(Debug, Clone)]
pub struct NewOp<'a> {
    pub op_id: &'a str,
    pub state: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub class: &'a str,
    pub kind: &'a str,
    pub created_ids: &'a str,
    pub body: Option<&'a str>,
}

/// One logged op, as a reader of the log sees it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LoggedOp {
    pub seq: i64,
    pub op_id: String,
    pub kind: String,
}

/// The op log in a PostgreSQL database.
#[derive(Clone)]
pub struct PgOpLog {
    pool: PgPool,
    options: PgConnectOptions,
}

/// The advisory lock the leader holds (any constant: it names the duty).
pub(super) const LEADER_LOCK: i64 = 0x5359_4e43_4741_5445;
/// The lock a central process holds for life while several on one op log
/// are not supported (`Store::hold_sole_central`): another than the
/// leader's, so that elections stay apart from it.
pub(super) const SOLE_LOCK: i64 = 0x5359_4e43_534f_4c45;
/// Takes an advisory lock, if free (its ID bound).
pub(super) const TRY_LEAD: &str = "SELECT pg_try_advisory_lock($1)";
/// Records an election (`me` and the time bound): the epoch moves on.
pub(super) const ELECTED: &str =
    "UPDATE leader SET epoch = epoch + 1, holder = $1, since = $2 WHERE id = 1 RETURNING epoch";

/// Now, as the leader's row shows it.
pub(super) fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Leadership won: the epoch its duties write at, held while its own
/// connection (which holds the lock) lives. Dropped, or its connection
/// lost, another process may be elected.
pub struct Lease {
    pub epoch: i64,
    conn: PgConnection,
}

impl Lease {
    /// Whether the lock is still held (the connection answers in time).
    pub async fn alive(&mut self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.conn.ping()).await,
            Ok(Ok(()))
        )
    }

    /// Gives leadership up now.
    pub async fn resign(self) {
        let _ = self.conn.close().await;
    }
}

/// Who leads, as the database says.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Leader {
    pub epoch: i64,
    pub holder: Option<String>,
    pub since: Option<String>,
}

impl PgOpLog {
    /// Connects to the database at a `postgres://` URL (the password, when
    /// one is needed, from `password` or the environment's `PGPASSFILE`,
    /// never in the URL, whose messages would show it) and brings its schema
    /// up to date.
    pub async fn open(url: &str, password: Option<&Secret>) -> Result<PgOpLog, StoreError> {
        let err = |source| StoreError::Url {
            url: shown(url),
            source,
        };
        if has_password(url) {
            return Err(err(sqlx::Error::Configuration(
                "a password in the database URL would show wherever the URL does (process \
                 lists, logs): give it in a password file (PGPASSFILE)"
                    .into(),
            )));
        }
        let mut options = PgConnectOptions::from_str(url)
            .map_err(err)?
            .options(PG_SESSION)
            .application_name("syncgate");
        if let Some(p) = password {
            options = options.password(p.expose());
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // A write waits this long for a connection, then fails (the
            // database down or every connection busy).
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(|source| StoreError::Open {
                url: shown(url),
                source,
            })?;
        sqlx::migrate!("./migrations/central-postgres")
            .run(&pool)
            .await?;
        Ok(PgOpLog { pool, options })
    }

    /// Tries once to become the leader, as `me` (shown in the status): the
    /// lease when elected, `None` while another process holds it.
    pub async fn campaign(&self, me: &str) -> Result<Option<Lease>, StoreError> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        let won: bool = sqlx::query_scalar(TRY_LEAD)
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if !won {
            let _ = conn.close().await;
            return Ok(None);
        }
        let epoch: i64 = sqlx::query_scalar(ELECTED)
            .bind(me)
            .bind(now())
            .fetch_one(&mut conn)
            .await?;
        Ok(Some(Lease { epoch, conn }))
    }

    /// Who leads now (epoch 0: nobody has yet).
    pub async fn leader(&self) -> Result<Leader, StoreError> {
        Ok(
            sqlx::query_as("SELECT epoch, holder, since FROM leader WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Records the last seq published, as the leader of `epoch`: refused by
    /// the database when another process has been elected since. The
    /// epoch's row is read `FOR SHARE`, so an election waits for this write
    /// and a write at an old epoch never commits after a new one is current.
    pub async fn set_published(&self, epoch: i64, seq: i64) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let current: i64 = sqlx::query_scalar("SELECT epoch FROM leader WHERE id = 1 FOR SHARE")
            .fetch_one(&mut *tx)
            .await?;
        if current != epoch {
            return Err(StoreError::Deposed { epoch, current });
        }
        // Never backwards (two writes of one leader may race).
        sqlx::query(
            "INSERT INTO oplog_meta (key, value) VALUES ('published_seq', $1) \
             ON CONFLICT (key) DO UPDATE SET value = GREATEST(oplog_meta.value, excluded.value)",
        )
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The last seq a leader published.
    pub async fn published(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM oplog_meta WHERE key = 'published_seq'")
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0),
        )
    }

    /// Logs `ops`, in order, and answers their seqs once they are durable.
    /// One statement takes the seqs from the head row and inserts the ops,
    /// so the row's lock is held only while the server commits: concurrent
    /// appends, from this process or another, commit one after the other in
    /// seq order. Appending ops already logged (a retry after an answer was
    /// lost) answers the seqs they have, and logs nothing twice.
    pub async fn append(&self, ops: &[NewOp<'_>]) -> Result<Vec<i64>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let n = i64::try_from(ops.len()).map_err(|_| StoreError::Batch("too many ops".into()))?;
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("WITH head AS (UPDATE oplog_head SET seq = seq + ");
        q.push_bind(n);
        q.push(
            " WHERE id = 1 RETURNING seq) INSERT INTO ops (seq, op_id, state, method, path, \
             class, kind, created_ids, body, created_at, logged_at) SELECT head.seq - ",
        );
        q.push_bind(n);
        q.push(
            " + v.ord, v.op_id, v.state, v.method, v.path, v.class, v.kind, v.created_ids, \
             v.body, v.at, v.at FROM head, (",
        );
        // As SQLite writes it (`strftime('%Y-%m-%dT%H:%M:%fZ')`).
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        q.push_values(ops.iter().zip(1i64..), |mut b, (op, ord)| {
            b.push_bind(ord)
                .push_bind(op.op_id)
                .push_bind(op.state)
                .push_bind(op.method)
                .push_bind(op.path)
                .push_bind(op.class)
                .push_bind(op.kind)
                .push_bind(op.created_ids)
                .push_bind(op.body)
                .push_bind(now.clone());
        });
        q.push(
            ") AS v (ord, op_id, state, method, path, class, kind, created_ids, body, at) \
             ORDER BY v.ord RETURNING seq",
        );
        match q.build_query_scalar::<i64>().fetch_all(&self.pool).await {
            Ok(mut seqs) => {
                seqs.sort_unstable();
                Ok(seqs)
            }
            // Logged already (a retry), or the answer lost with the
            // connection after the server committed: what is there says.
            Err(e) => match self.seqs_of(ops).await {
                Ok(Some(seqs)) => Ok(seqs),
                Ok(None) => Err(e.into()),
                Err(_) => Err(StoreError::Batch(format!(
                    "the op log's answer was lost and what it holds cannot be read: {e}"
                ))),
            },
        }
    }

    /// The seqs of `ops` when every one is logged, in their order; `None`
    /// when none is; an error when only some are (an append is all or none).
    async fn seqs_of(&self, ops: &[NewOp<'_>]) -> Result<Option<Vec<i64>>, StoreError> {
        let ids: Vec<&str> = ops.iter().map(|o| o.op_id).collect();
        let found: Vec<(String, i64)> =
            sqlx::query_as("SELECT op_id, seq FROM ops WHERE op_id = ANY($1)")
                .bind(&ids)
                .fetch_all(&self.pool)
                .await?;
        if found.is_empty() {
            return Ok(None);
        }
        let seqs: Option<Vec<i64>> = ids
            .iter()
            .map(|id| found.iter().find(|(f, _)| f == id).map(|(_, s)| *s))
            .collect();
        seqs.map(Some).ok_or_else(|| {
            StoreError::Batch("some of the ops of one append are logged and some are not".into())
        })
    }

    /// The ops after `seq`, oldest first, at most `limit`.
    pub async fn after(&self, seq: i64, limit: i64) -> Result<Vec<LoggedOp>, StoreError> {
        Ok(
            sqlx::query_as("SELECT seq, op_id, kind FROM ops WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// The last seq handed out (committed: the head moves only with its ops).
    pub async fn head(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT seq FROM oplog_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
