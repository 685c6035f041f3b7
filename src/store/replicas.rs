//! Several central processes (replicas) on one PostgreSQL op log.
//!
//! - Every replica joins (`Store::join`): it gets a number, never reused,
//!   and holds for as long as it runs a session advisory lock named by it,
//!   on a connection of its own (`Presence`). Its intents carry its number.
//!   It also holds the lock an earlier version takes alone, shared: an
//!   earlier version (one process only) and replicas never run together.
//! - One replica leads (`Store::campaign`): it holds the leader's advisory
//!   lock on a connection of its own (`Lease`); each election moves the
//!   epoch on. The leader's duties write through a `Store` whose every
//!   connection says that epoch (`Store::fenced`): the database refuses its
//!   writes to the leader's tables once another is elected (migration
//!   0004's `sg_fence`).
//! - A replica whose presence lock the leader can take is gone: the intents
//!   it left open are logged as `unknown_outcome` (`Store::settle_gone`).
//! - Writes that touch one entity are serialised across replicas from intent
//!   to commit: an intent is opened with its keys, and refused while another
//!   replica's write of one is open or in doubt (`batch::refuse_conflicts`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::{AnyConnection, Connection};
use uuid::Uuid;

use super::engine::{self, SOLE_LOCK};
use super::{Dialect, Store, StoreError};
use crate::core::Secret;

/// Where a PostgreSQL op log is, to open more pools on it.
pub(super) struct Origin {
    pub url: String,
    pub password: Option<Secret>,
}

/// The advisory lock the leader holds (any constant: it names the duty).
const LEADER_LOCK: i64 = 0x5359_4e43_4741_5445;

/// Now, as the leader's and the replicas' rows show it.
fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// The advisory lock class of replicas' presence (two-key form).
const REPLICA_CLASS: i32 = 0x5347_5250;

/// A replica's presence on the op log: its number, and the connection
/// holding its lock. Dropped (or the process killed), the lock goes.
pub struct Presence {
    pub no: i32,
    conn: AnyConnection,
}

impl Presence {
    /// Lets the presence go (its session ends, and its locks with it).
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }

    /// Whether the lock's connection still answers (and so the lock is held).
    pub async fn alive(&mut self) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.conn.ping()).await,
            Ok(Ok(()))
        )
    }
}

/// Leadership won: the epoch its duties write at, held while its
/// connection (which holds the lock) lives.
pub struct Lease {
    pub epoch: i64,
    conn: AnyConnection,
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

/// Campaigns to lead, on a connection kept between tries.
pub struct Candidate {
    store: Store,
    conn: Option<AnyConnection>,
}

impl Candidate {
    /// Tries once to become the leader: the lease when elected (it takes
    /// the connection), `None` while another replica holds it.
    pub async fn campaign(&mut self, name: &str) -> Result<Option<Lease>, StoreError> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.store.own_connection().await?,
        };
        let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if !won {
            self.conn = Some(conn);
            return Ok(None);
        }
        let epoch: i64 = sqlx::query_scalar(
            "UPDATE leader SET epoch = epoch + 1, holder = $1, since = $2, replica = $3 \
             WHERE id = 1 RETURNING epoch",
        )
        .bind(name)
        .bind(now())
        .bind(self.store.replica())
        .fetch_one(&mut conn)
        .await?;
        Ok(Some(Lease { epoch, conn }))
    }
}

/// Who leads, as the database says.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct LeaderRow {
    pub epoch: i64,
    pub holder: Option<String>,
    pub since: Option<String>,
    pub replica: Option<i32>,
    pub admin_url: Option<String>,
}

/// A replica registered on the op log.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct ReplicaRow {
    pub no: i32,
    pub name: String,
    pub admin_url: Option<String>,
    pub started: String,
}

/// What a central of an earlier version, which runs alone, says when it
/// holds the op log.
fn earlier_alone(holder: Option<String>, since: Option<String>) -> StoreError {
    StoreError::Taken {
        holder: holder.unwrap_or_else(|| "unknown".into()),
        since: since.unwrap_or_else(|| "unknown".into()),
    }
}

impl Store {
    /// This replica's number, once joined (PostgreSQL).
    pub fn replica(&self) -> Option<i32> {
        Some(self.me.owner.load(Ordering::Relaxed)).filter(|n| *n != 0)
    }

    /// A connection of its own, out of the writer pool, that no server-side
    /// idle limit ends (it holds a lock for the process's life).
    async fn own_connection(&self) -> Result<AnyConnection, StoreError> {
        let mut conn = self.writer.acquire().await?.detach();
        let _ = sqlx::query("SET idle_session_timeout = 0")
            .execute(&mut conn)
            .await;
        Ok(conn)
    }

    /// Joins the replicas on this PostgreSQL op log, as `name` (shown in the
    /// status) reachable at `admin_url` (where other replicas send what only
    /// the leader does); `again` rejoins under the number held before (its
    /// lock lost with its connection). `alone` (a central with the embedded
    /// broker, which replicas cannot share) holds the op log alone. `None` on
    /// SQLite (one process). Refused while another central holds it alone (an
    /// earlier version, or one with the embedded broker), or, `alone`, while
    /// other replicas run.
    pub async fn join(
        &self,
        name: &str,
        admin_url: Option<&str>,
        again: Option<i32>,
        alone: bool,
    ) -> Result<Option<Presence>, StoreError> {
        if self.d != Dialect::Postgres {
            return Ok(None);
        }
        let mut conn = self.own_connection().await?;
        let held: bool = sqlx::query_scalar(if alone {
            "SELECT pg_try_advisory_lock($1)"
        } else {
            "SELECT pg_try_advisory_lock_shared($1)"
        })
        .bind(SOLE_LOCK)
        .fetch_one(&mut conn)
        .await?;
        if !held {
            let _ = conn.close().await;
            return Err(self.who_holds_it(alone).await);
        }
        let no: i32 = match again {
            Some(no) => no,
            None => {
                sqlx::query_scalar("SELECT nextval('replicas_no_seq')::INTEGER")
                    .fetch_one(&mut conn)
                    .await?
            }
        };
        // Its lock first, then its row: a number the leader is settling as
        // gone (a rejoin after the connection was cut) is waited for, and
        // its row, which the settling deletes, is written again after.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(REPLICA_CLASS)
                .bind(no)
                .fetch_one(&mut conn)
                .await?;
            if won {
                break;
            }
            if Instant::now() > deadline {
                let _ = conn.close().await;
                return Err(StoreError::Batch(format!(
                    "replica {no}'s lock is held by another process"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sqlx::query(
            "INSERT INTO replicas (no, name, admin_url, started) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (no) DO UPDATE SET name = excluded.name, admin_url = excluded.admin_url",
        )
        .bind(no)
        .bind(name)
        .bind(admin_url)
        .bind(now())
        .execute(&mut conn)
        .await?;
        self.me.owner.store(no, Ordering::Relaxed);
        self.me.alone.store(alone, Ordering::Relaxed);
        self.present.store(true, Ordering::SeqCst);
        Ok(Some(Presence { no, conn }))
    }

    /// Why the op log cannot be joined: who holds it alone, or (`alone`)
    /// that replicas run.
    async fn who_holds_it(&self, alone: bool) -> StoreError {
        if alone {
            // Free of an exclusive holder? Then replicas hold it shared.
            let shared = async {
                let mut c = self.own_connection().await?;
                let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock_shared($1)")
                    .bind(SOLE_LOCK)
                    .fetch_one(&mut c)
                    .await?;
                let _ = c.close().await;
                Ok::<bool, StoreError>(free)
            };
            if let Ok(true) = shared.await {
                return StoreError::Replicas;
            }
        }
        match sqlx::query_as::<_, (Option<String>, Option<String>)>(
            "SELECT holder, since FROM leader WHERE id = 1",
        )
        .fetch_one(&self.reader)
        .await
        {
            Ok((holder, since)) => earlier_alone(holder, since),
            Err(e) => e.into(),
        }
    }

    /// Whether this process may capture (see `present`).
    pub fn present(&self) -> bool {
        self.present.load(Ordering::SeqCst)
    }

    /// This replica's presence was lost: it captures nothing until it holds
    /// it again (`join`).
    pub fn lost_presence(&self) {
        self.present.store(false, Ordering::SeqCst);
    }

    /// Tries once to become the leader: the lease when elected, `None`
    /// while another replica holds it.
    pub async fn campaign(&self, name: &str) -> Result<Option<Lease>, StoreError> {
        self.candidate().campaign(name).await
    }

    /// A campaigner that keeps its connection between tries (a replica that
    /// does not lead tries every second).
    pub fn candidate(&self) -> Candidate {
        Candidate {
            store: self.clone(),
            conn: None,
        }
    }

    /// Who leads now (epoch 0: nobody has yet), and where its admin API is.
    pub async fn leader(&self) -> Result<LeaderRow, StoreError> {
        Ok(sqlx::query_as(
            "SELECT l.epoch, l.holder, l.since, l.replica, r.admin_url \
             FROM leader l LEFT JOIN replicas r ON r.no = l.replica WHERE l.id = 1",
        )
        .fetch_one(&self.reader)
        .await?)
    }

    /// The replicas registered (those gone are forgotten once settled).
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        if self.d != Dialect::Postgres {
            return Ok(Vec::new());
        }
        Ok(
            sqlx::query_as("SELECT no, name, admin_url, started FROM replicas ORDER BY no")
                .fetch_all(&self.reader)
                .await?,
        )
    }

    /// The op log as the leader elected at `epoch` writes it: its every
    /// connection says the epoch, and its writes to the leader's tables are
    /// refused by the database once another is elected.
    pub async fn fenced(&self, epoch: i64) -> Result<Store, StoreError> {
        let origin = self
            .origin
            .as_ref()
            .ok_or_else(|| StoreError::Batch("only an op log on PostgreSQL has a leader".into()))?;
        let pools = engine::open_fenced(&origin.url, origin.password.as_ref(), epoch).await?;
        Ok(Store {
            d: pools.dialect,
            batcher: super::batch::Batcher::spawn(
                pools.writer.clone(),
                pools.dialect,
                self.me.clone(),
            ),
            me: self.me.clone(),
            writer: pools.writer,
            reader: pools.reader,
            vault: self.vault.clone(),
            origin: self.origin.clone(),
            present: self.present.clone(),
        })
    }

    /// As the leader (on its lease's connection): logs the intents of every
    /// replica that is gone (its presence lock taken) as `unknown_outcome`
    /// ops, oldest first, and forgets the replica. Intents of no replica
    /// (opened by an earlier version, which ran alone and is not running:
    /// `join` holds it off) are settled too. Answers the seqs logged.
    pub async fn settle_gone(&self, lease: &mut Lease) -> Result<Vec<i64>, StoreError> {
        self.settle_gone_on(&mut lease.conn).await
    }

    /// `settle_gone` by a replica as it starts, on its presence's connection
    /// (the writes a stop left open are logged before it serves, as one
    /// process does on SQLite). Two replicas never settle one that is gone
    /// twice: its lock is taken by one; an intent already settled is passed
    /// over.
    pub async fn settle_gone_at_start(
        &self,
        presence: &mut Presence,
    ) -> Result<Vec<i64>, StoreError> {
        self.settle_gone_on(&mut presence.conn).await
    }

    async fn settle_gone_on(&self, conn: &mut AnyConnection) -> Result<Vec<i64>, StoreError> {
        let me = self.replica();
        let owners: Vec<Option<i32>> =
            sqlx::query_scalar("SELECT DISTINCT owner FROM intents UNION SELECT no FROM replicas")
                .fetch_all(&self.writer)
                .await?;
        let mut seqs = Vec::new();
        for owner in owners.into_iter().filter(|o| *o != me) {
            if let Some(no) = owner {
                let gone: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                    .bind(REPLICA_CLASS)
                    .bind(no)
                    .fetch_one(&mut *conn)
                    .await?;
                if !gone {
                    continue;
                }
            }
            let mut settled = self.settle_intents_of(owner).await;
            if let Some(no) = owner {
                if settled.is_ok() {
                    if let Err(e) = sqlx::query("DELETE FROM replicas WHERE no = $1")
                        .bind(no)
                        .execute(&self.writer)
                        .await
                    {
                        settled = Err(e.into());
                    }
                }
                // Given back whatever happened: held, the replica could
                // never rejoin, nor be settled by another.
                let unlocked = sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                    .bind(REPLICA_CLASS)
                    .bind(no)
                    .execute(&mut *conn)
                    .await;
                if let Err(e) = unlocked {
                    settled = settled.and(Err(e.into()));
                }
            }
            seqs.extend(settled?);
        }
        Ok(seqs)
    }

    async fn settle_intents_of(&self, owner: Option<i32>) -> Result<Vec<i64>, StoreError> {
        let ids: Vec<String> = match owner {
            Some(no) => {
                sqlx::query_scalar("SELECT op_id FROM intents WHERE owner = $1 ORDER BY opened")
                    .bind(no)
                    .fetch_all(&self.writer)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT op_id FROM intents WHERE owner IS NULL ORDER BY opened")
                    .fetch_all(&self.writer)
                    .await?
            }
        };
        let ids = parse_ids(ids)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let seqs = self
            .log_unknown(
                &ids,
                "the central replica that forwarded it stopped before the upstream's answer was logged",
            )
            .await?;
        tracing::warn!(
            replica = ?owner,
            seqs = ?seqs,
            "writes a stopped central replica left open are logged as unknown_outcome; check them in the audit API"
        );
        Ok(seqs)
    }
}

pub(super) fn parse_ids(ids: Vec<String>) -> Result<Vec<Uuid>, StoreError> {
    ids.iter()
        .map(|id| {
            Uuid::parse_str(id).map_err(|e| {
                StoreError::Query(sqlx::Error::Decode(format!("intent op_id: {e}").into()))
            })
        })
        .collect()
}
