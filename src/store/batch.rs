//! Group commit for the capture path: the intents, commits, dropped intents and
//! learned entities of concurrent requests (and the publisher's position) are
//! written by one task, many to a transaction, so that one fsync (`synchronous=FULL`) serves them all. Each is
//! answered only once its transaction is durable. A commit whose intent is gone
//! writes nothing and fails alone; any other error undoes the whole transaction
//! and fails every write in it (the op log is failing then). Seqs are assigned
//! in the order the requests arrive, inside the transaction.

use sqlx::{AnyConnection, AnyPool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::dialect::{Dialect, Sql};
use super::{OpState, Outcome, StoreError};
use crate::protocol::messages::EntityRef;

/// Most requests in one transaction.
const MAX_BATCH: usize = 512;

/// One write of the capture path, with what it needs (bodies already sealed).
pub(super) enum Work {
    Begin {
        op_id: Uuid,
        method: String,
        path: String,
        class: String,
        kind: String,
        body: Option<String>,
        refs: String,
        traceparent: Option<String>,
        touches: Vec<crate::keystone::touches::Touch>,
    },
    Commit {
        op_id: Uuid,
        state: OpState,
        outcome: Outcome,
        body: Option<String>,
    },
    Drop(Uuid),
    Learn(EntityRef),
    /// Every op up to this seq is published.
    Published(i64),
}

struct Job {
    work: Work,
    /// The seq for a commit, nothing for the others.
    reply: oneshot::Sender<Result<Option<i64>, StoreError>>,
}

/// The writer task's address; the task ends when every copy is dropped.
#[derive(Clone)]
pub(super) struct Batcher {
    jobs: mpsc::Sender<Job>,
}

/// Who writes, as the capture path's writes need it (shared with the store).
#[derive(Debug)]
pub(super) struct Identity {
    /// The replica whose intents these are (0 until it has joined, on
    /// PostgreSQL; always 0 on SQLite, where one process writes).
    pub owner: std::sync::atomic::AtomicI32,
    /// How long a write whose outcome is unknown may still land upstream,
    /// in milliseconds (`--upstream-settle`): on PostgreSQL, another
    /// replica's intent of one of its keys is refused meanwhile.
    pub settle_ms: std::sync::atomic::AtomicI64,
    /// Whether this process holds the op log alone (SQLite; PostgreSQL with
    /// the embedded broker): no other replica's writes to order against.
    pub alone: std::sync::atomic::AtomicBool,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            owner: 0.into(),
            settle_ms: 120_000.into(),
            alone: false.into(),
        }
    }
}

pub(super) type Shared = std::sync::Arc<Identity>;

impl Batcher {
    pub(super) fn spawn(writer: AnyPool, d: Dialect, who: Shared) -> Batcher {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(writer, d, who, rx));
        Batcher { jobs: tx }
    }

    /// Queues one write and waits until it is durable.
    pub(super) async fn submit(&self, work: Work) -> Result<Option<i64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { work, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run(writer: AnyPool, d: Dialect, who: Shared, mut rx: mpsc::Receiver<Job>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    // The connection kept between batches (PostgreSQL), let go of as soon
    // as the pool begins to close (which waits for every connection).
    let mut held = None;
    let closing = writer.close_event();
    tokio::pin!(closing);
    let mut closed = false;
    loop {
        tokio::select! {
            n = rx.recv_many(&mut jobs, MAX_BATCH) => if n == 0 {
                return;
            },
            () = &mut closing, if !closed => {
                closed = true;
                held = None;
                continue;
            }
        }
        let me = Replica {
            owner: who.owner.load(Relaxed),
            settle_ms: who.settle_ms.load(Relaxed),
            alone: who.alone.load(Relaxed),
        };
        let results = execute(&writer, &mut held, d, me, &jobs).await;
        if writer.is_closed() {
            held = None;
        }
        for (job, result) in jobs.drain(..).zip(results) {
            // A requester that went away loses only its answer.
            let _ = job.reply.send(result);
        }
    }
}

/// Who writes a batch: its replica (0: none), its settle period, and
/// whether it holds the op log alone.
#[derive(Clone, Copy)]
struct Replica {
    owner: i32,
    settle_ms: i64,
    alone: bool,
}

/// Runs the jobs in one transaction; the results of all, or the error of the
/// transaction for all.
async fn execute(
    writer: &AnyPool,
    held: &mut Option<Held>,
    d: Dialect,
    me: Replica,
    jobs: &[Job],
) -> Vec<Result<Option<i64>, StoreError>> {
    let failed = |e: &dyn std::fmt::Display| {
        jobs.iter()
            .map(|_| Err(StoreError::Batch(e.to_string())))
            .collect::<Vec<_>>()
    };
    if d == Dialect::Postgres {
        return execute_pg(writer, held, me, jobs).await;
    }
    let mut tx = match writer.begin().await {
        Ok(tx) => tx,
        Err(e) => return failed(&e),
    };
    let busy = vec![None; jobs.len()];
    match write_all(&mut tx, d, jobs).await {
        Ok(seqs) => match tx.commit().await {
            Ok(()) => answers(jobs, seqs, &busy),
            // The answer to the commit was lost (a connection to PostgreSQL
            // broken then): what the database holds says whether it was made.
            Err(e) => match committed(writer, d, jobs, &seqs, &busy).await {
                Some(true) => answers(jobs, seqs, &busy),
                _ => failed(&e),
            },
        },
        Err(e) => {
            // The transaction is in doubt: none of it is kept, and every
            // requester hears so.
            let _ = tx.rollback().await;
            failed(&e)
        }
    }
}

/// Each job's answer once its transaction is committed.
fn answers(
    jobs: &[Job],
    seqs: Vec<Option<i64>>,
    busy: &[Option<bool>],
) -> Vec<Result<Option<i64>, StoreError>> {
    jobs.iter()
        .zip(seqs)
        .zip(busy)
        .map(|((job, seq), busy)| match (&job.work, seq) {
            (Work::Begin { .. }, _) if busy.is_some() => Err(StoreError::Busy {
                in_doubt: busy.unwrap_or_default(),
            }),
            (Work::Commit { .. }, Some(seq)) => Ok(Some(seq)),
            // A commit whose intent is gone wrote nothing: it fails alone.
            (Work::Commit { op_id, .. }, None) => Err(StoreError::NoIntent(*op_id)),
            _ => Ok(None),
        })
        .collect()
}

/// Whether a transaction whose commit went unanswered was made, told by one
/// of its rows (a transaction is all or nothing): an op it logged with the
/// seq it was given, else an intent it opened. `None` when it cannot be
/// told. SQLite answers a commit on the spot: only PostgreSQL is asked.
async fn committed(
    writer: &AnyPool,
    d: Dialect,
    jobs: &[Job],
    seqs: &[Option<i64>],
    busy: &[Option<bool>],
) -> Option<bool> {
    if d != Dialect::Postgres {
        return None;
    }
    let logged = jobs
        .iter()
        .zip(seqs)
        .find_map(|(job, seq)| match (&job.work, seq) {
            (Work::Commit { op_id, .. }, Some(seq)) => Some((op_id.to_string(), *seq)),
            _ => None,
        });
    if let Some((op_id, seq)) = logged {
        let found: Option<i64> = sqlx::query_scalar("SELECT seq FROM ops WHERE op_id = $1")
            .bind(op_id)
            .fetch_optional(writer)
            .await
            .ok()?;
        return Some(found == Some(seq));
    }
    let opened = jobs
        .iter()
        .zip(busy)
        .find_map(|(job, busy)| match &job.work {
            Work::Begin { op_id, .. } if busy.is_none() => Some(op_id.to_string()),
            _ => None,
        })?;
    let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM intents WHERE op_id = $1")
        .bind(opened)
        .fetch_optional(writer)
        .await
        .ok()?;
    Some(found.is_some())
}

/// Rows per multi-row statement (SQLite allows 32766 bound values,
/// PostgreSQL 65535).
const ROWS: usize = 1000;

/// SQLite: writes every job with a handful of multi-row statements (calls in
/// process, one writer); the seq of each commit whose intent was found, in
/// job order.
async fn write_all(
    conn: &mut AnyConnection,
    d: Dialect,
    jobs: &[Job],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    let mut seqs: Vec<Option<i64>> = vec![None; jobs.len()];

    // 1. New intents.
    let begins: Vec<&Work> = jobs
        .iter()
        .filter(|j| matches!(j.work, Work::Begin { .. }))
        .map(|j| &j.work)
        .collect();
    for chunk in begins.chunks(ROWS) {
        let mut q = Sql::new(
            "INSERT INTO intents (op_id, method, path, class, kind, body, refs, traceparent, created_at) ",
        );
        q.values(chunk, |row, w| {
            if let Work::Begin {
                op_id,
                method,
                path,
                class,
                kind,
                body,
                refs,
                traceparent,
                ..
            } = w
            {
                row.bind(op_id.to_string())
                    .bind(method.as_str())
                    .bind(path.as_str())
                    .bind(class.as_str())
                    .bind(kind.as_str())
                    .bind(body.as_deref())
                    .bind(refs.as_str())
                    .bind(traceparent.as_deref())
                    .push("SG_NOW()");
            }
        });
        let (text, args) = q.finish(d)?;
        sqlx::query_with(&text, args).execute(&mut *conn).await?;
    }
    // 2. Intents become ops, seqs in job order, gap-free over the found ones.
    let commits: Vec<(usize, &Uuid, &OpState, &Outcome, &Option<String>)> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| match &j.work {
            Work::Commit {
                op_id,
                state,
                outcome,
                body,
            } => Some((i, op_id, state, outcome, body)),
            _ => None,
        })
        .collect();
    let mut by_op: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for chunk in commits.chunks(ROWS) {
        let mut q = Sql::new(
            "WITH v (ord, op_id, state, created_ids, body, status, request_id, detail) AS (",
        );
        q.values(chunk, |row, (i, op_id, state, outcome, body)| {
            row.bind(*i as i64)
                .bind(op_id.to_string())
                .bind(state.as_str())
                .bind(
                    serde_json::to_string(&outcome.created_ids)
                        .expect("a list of strings serializes"),
                )
                .bind(body.as_deref())
                .bind(outcome.upstream_status.map(i64::from))
                .bind(outcome.request_id.as_deref())
                .bind(outcome.detail.as_deref());
        });
        // One writer: the next seq follows the last op.
        q.push("), h (base) AS (SELECT COALESCE(MAX(seq), 0) FROM ops)");
        q.push(
            " INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_ids, body,
                                upstream_status, request_id, detail, refs, traceparent,
                                created_at, logged_at, resolution)
               SELECT h.base + ROW_NUMBER() OVER (ORDER BY v.ord), i.op_id, v.state, i.method,
                 i.path, i.class, i.kind, v.created_ids, COALESCE(v.body, i.body), v.status,
                 v.request_id, v.detail, i.refs, i.traceparent, i.created_at, SG_NOW(),
                 CASE WHEN v.state = 'unknown_outcome' THEN 'pending' END
               FROM v JOIN intents i ON i.op_id = v.op_id CROSS JOIN h
               ORDER BY v.ord
               RETURNING op_id, seq",
        );
        let (text, args) = q.finish(d)?;
        let rows: Vec<(String, i64)> = sqlx::query_as_with(&text, args)
            .fetch_all(&mut *conn)
            .await?;
        by_op.extend(rows);
    }
    for (i, op_id, ..) in &commits {
        seqs[*i] = by_op.get(&op_id.to_string()).copied();
    }

    // 3. The keys each op touched.
    let keys: Vec<(&str, i64, bool)> = commits
        .iter()
        .filter_map(|(i, _, _, outcome, _)| seqs[*i].map(|seq| (seq, outcome)))
        .flat_map(|(seq, outcome)| {
            outcome
                .touches
                .iter()
                .map(move |t| (t.key.as_str(), seq, t.exclusive))
        })
        .collect();
    for chunk in keys.chunks(ROWS) {
        let mut q = Sql::new("INSERT INTO op_keys (key, seq, exclusive) ");
        q.values(chunk, |row, (key, seq, exclusive)| {
            row.bind(*key).bind(*seq).bind(*exclusive);
        });
        q.push(" ON CONFLICT DO NOTHING");
        let (text, args) = q.finish(d)?;
        sqlx::query_with(&text, args).execute(&mut *conn).await?;
    }

    // 4. Intents done with: committed or dropped.
    let done: Vec<String> = jobs
        .iter()
        .filter_map(|j| match &j.work {
            Work::Commit { op_id, .. } => Some(op_id.to_string()),
            Work::Drop(op_id) => Some(op_id.to_string()),
            _ => None,
        })
        .collect();
    for chunk in done.chunks(ROWS) {
        let mut q = Sql::new("DELETE FROM intents WHERE op_id IN ");
        q.list(chunk.iter().map(String::as_str));
        let (text, args) = q.finish(d)?;
        sqlx::query_with(&text, args).execute(&mut *conn).await?;
    }

    // 5. Natural keys learned, in job order (a later one wins).
    let learned: Vec<&EntityRef> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| match &j.work {
            Work::Learn(e) => Some(e),
            Work::Commit { outcome, .. } if seqs[i].is_some() => outcome.learned.as_ref(),
            _ => None,
        })
        .collect();
    // One row per ID, a later one winning.
    let mut last: std::collections::HashMap<&str, &EntityRef> = std::collections::HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for e in learned {
        if last.insert(e.id.as_str(), e).is_none() {
            order.push(e.id.as_str());
        }
    }
    let learned: Vec<&EntityRef> = order.iter().map(|id| last[id]).collect();
    for chunk in learned.chunks(ROWS) {
        let mut q = Sql::new("INSERT INTO entities (id, kind, name, domain_id, updated_at) ");
        q.values(chunk, |row, e| {
            row.bind(e.id.as_str())
                .bind(e.kind.as_str())
                .bind(e.name.as_str())
                .bind(e.domain_id.as_deref())
                .push("SG_NOW()");
        });
        q.push(
            " ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, name = excluded.name,
                 domain_id = excluded.domain_id, updated_at = excluded.updated_at",
        );
        let (text, args) = q.finish(d)?;
        sqlx::query_with(&text, args).execute(&mut *conn).await?;
    }

    // 6. The publisher's position.
    publish(conn, d, jobs).await?;
    Ok(seqs)
}

/// Records the publisher's position, the highest a batch carries.
async fn publish(conn: &mut AnyConnection, d: Dialect, jobs: &[Job]) -> Result<(), sqlx::Error> {
    let published = jobs
        .iter()
        .filter_map(|j| match j.work {
            Work::Published(seq) => Some(seq),
            _ => None,
        })
        .max();
    if let Some(seq) = published {
        sqlx::query(&d.sql(
            "INSERT INTO meta (key, value) VALUES ('published_seq', ?)
             ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, excluded.value)",
        ))
        .bind(seq)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Orders the openings of every replica's intents (a transaction lock).
const OPENINGS: i64 = 0x5347_4f50_454e;

/// PostgreSQL: a batch runs on the writer's own connection (`Held`): one
/// text (the simple protocol, several statements) begins the transaction
/// and takes its locks, then each part is one statement whose rows travel as
/// one JSON parameter (its text never changes: prepared once per
/// connection; the data never in a statement's text, which the server may
/// log), each seeing what was committed once the locks were granted; then
/// COMMIT, once the answers are read. An error before the commit undoes it
/// all and fails every job; the answer to the commit lost is settled as on
/// any dialect (`committed`). A kept connection found broken before the
/// commit was sent (the server restarted, or ended the session) is replaced
/// and the batch run again on the new one, once: the server undid the
/// first run.
async fn execute_pg(
    writer: &AnyPool,
    held: &mut Option<Held>,
    me: Replica,
    jobs: &[Job],
) -> Vec<Result<Option<i64>, StoreError>> {
    let failed = |e: &dyn std::fmt::Display| {
        jobs.iter()
            .map(|_| Err(StoreError::Batch(e.to_string())))
            .collect::<Vec<_>>()
    };
    let batch = pg_batch(me, jobs);
    let mut busy = vec![None; jobs.len()];
    let mut retried = false;
    let (mut conn, seqs) = loop {
        let (conn, kept) = match Held::take(held, writer).await {
            Ok(taken) => taken,
            Err(e) => return failed(&e),
        };
        let mut conn = Unfinished(Some(conn));
        busy.fill(None);
        // The transaction is begun and ended by statements on this
        // connection (sqlx's own would not know of a session left in a
        // failed transaction by a statement after BEGIN). On any error the
        // connection is closed, never used again (a ROLLBACK first, so that
        // its locks go at once); so is one whose batch was abandoned
        // half-way (`Unfinished`).
        match run_pg(conn.get(), &batch).await {
            Ok(rows) => match pg_results(&rows, jobs, &mut busy) {
                Ok(seqs) => break (conn, seqs),
                Err(e) => {
                    let _ = simple(conn.get(), "ROLLBACK").await;
                    return failed(&e);
                }
            },
            Err(e) if kept && !retried && broken(&e) => {
                tracing::warn!(error = %e, "the op log's connection was broken; writing the batch on a new one");
                retried = true;
            }
            Err(e) => {
                let _ = simple(conn.get(), "ROLLBACK").await;
                return failed(&e);
            }
        }
    };
    match simple(conn.get(), "COMMIT").await {
        Ok(_) => {
            *held = Some(conn.finish());
            answers(jobs, seqs, &busy)
        }
        // The answer to the commit was lost (a connection to PostgreSQL
        // broken then): what the database holds says whether it was made.
        Err(e) => {
            drop(conn);
            match committed(writer, Dialect::Postgres, jobs, &seqs, &busy).await {
                Some(true) => answers(jobs, seqs, &busy),
                _ => failed(&e),
            }
        }
    }
}

/// Runs a batch's statements up to its commit: the rows they answered.
async fn run_pg(
    conn: &mut AnyConnection,
    batch: &PgBatch,
) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let mut rows = simple(conn, &batch.begin).await?;
    for (template, binds) in &batch.steps {
        let text = Dialect::Postgres.sql(template);
        let mut q = sqlx::query(&text);
        for b in binds {
            q = q.bind(b.as_deref());
        }
        rows.extend(q.fetch_all(&mut *conn).await?);
    }
    Ok(rows)
}

/// Whether an error says the connection itself is gone (the session ended
/// by the server, the socket closed), not that a statement failed.
fn broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        // Class 08: connection exception; 57P01-57P03: the server shutting
        // down or the session terminated by an administrator.
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// The writer's connection on PostgreSQL, kept from one batch to the next
/// (no pool hand-over, and a plan per statement once per connection), with
/// this task's session settings (`SESSION`). It is never given back to the
/// pool, whose other users must not inherit them: dropped, it is closed.
/// One left unused a while is tried first (a ping); one broken meanwhile is
/// closed and another taken.
pub(super) struct Held {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    used: std::time::Instant,
}

/// How long the writer's connection may stay unused and still be trusted.
const HELD_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

impl Held {
    /// The writer's connection, and whether it is the one kept (else a new
    /// one from the pool with `SESSION` set on it). None is kept once the
    /// pool is closing.
    async fn take(
        held: &mut Option<Held>,
        writer: &AnyPool,
    ) -> Result<(sqlx::pool::PoolConnection<sqlx::Any>, bool), sqlx::Error> {
        if let Some(mut h) = held.take() {
            use sqlx::Connection;
            let fresh = h.used.elapsed() < HELD_IDLE;
            if let Some(mut conn) = h.conn.take() {
                if !writer.is_closed() && (fresh || conn.ping().await.is_ok()) {
                    return Ok((conn, true));
                }
                conn.close_on_drop();
            }
        }
        let mut conn = writer.acquire().await?;
        if let Err(e) = simple(&mut conn, SESSION).await {
            conn.close_on_drop();
            return Err(e);
        }
        Ok((conn, false))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// The writer's session on PostgreSQL. Each batch statement is planned once
/// per connection, while the tables may still be nearly empty: a plan that
/// scanned `intents` or `intent_keys` whole (rows inserted and deleted by
/// every write, dead ones kept until a vacuum) would grow slower with every
/// write. Every table a batch reads is read by a key, so this session never
/// scans one whole.
const SESSION: &str = "SET enable_seqscan = off";

/// A pooled connection inside a transaction begun by a statement: closed,
/// not kept, unless the transaction was seen to end (`finish`). A batch
/// abandoned half-way (its task ended at a shutdown, a panic) would
/// otherwise hand the next batch a session holding its locks.
struct Unfinished(Option<sqlx::pool::PoolConnection<sqlx::Any>>);

impl Unfinished {
    fn get(&mut self) -> &mut AnyConnection {
        self.0.as_mut().expect("held until finished or dropped")
    }

    /// The transaction was committed: the connection is kept for the next
    /// batch.
    fn finish(mut self) -> Held {
        Held {
            conn: self.0.take(),
            used: std::time::Instant::now(),
        }
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(conn) = self.0.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// Runs `text` (statements separated by `;`) with the simple protocol; the
/// rows of all of them.
fn simple<'c>(
    conn: &'c mut AnyConnection,
    text: &'c str,
) -> futures_util::future::BoxFuture<'c, Result<Vec<sqlx::any::AnyRow>, sqlx::Error>> {
    sqlx::Executor::fetch_all(conn, sqlx::raw_sql(text))
}

/// A batch on PostgreSQL: the text that begins it and takes its locks, then
/// each statement with its parameters.
struct PgBatch {
    begin: String,
    steps: Vec<(&'static str, Vec<Option<String>>)>,
}

/// What a batch writes on PostgreSQL (see `execute_pg`). Intents are
/// opened under a transaction lock every replica takes to open its own (not
/// needed by a process that holds the op log alone): what another opened
/// before is committed and seen, so two conflicting writes are never both
/// opened. Commits lock the head row first, so that the statement that logs
/// them reads the intents as they are once every earlier commit of another
/// process is done, and the head orders every process's commits as their
/// seqs (visible in seq order). Always in this order (no deadlock).
fn pg_batch(me: Replica, jobs: &[Job]) -> PgBatch {
    use serde_json::{json, Value};
    let owner = (me.owner != 0).then(|| me.owner.to_string());
    let mut opened = Vec::new();
    let mut open_keys = Vec::new();
    let mut commits = Vec::new();
    let mut keys = Vec::new();
    let mut learned = Vec::new();
    let mut drops = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        match &j.work {
            Work::Begin {
                op_id,
                method,
                path,
                class,
                kind,
                body,
                refs,
                traceparent,
                touches,
            } => {
                let op_id = op_id.to_string();
                for t in touches {
                    open_keys.push(
                        json!({"job": i, "op_id": op_id, "key": t.key, "exclusive": t.exclusive}),
                    );
                }
                opened.push(json!({
                    "job": i, "op_id": op_id, "method": method, "path": path, "class": class,
                    "kind": kind, "body": body, "refs": refs, "traceparent": traceparent,
                }));
            }
            Work::Commit {
                op_id,
                state,
                outcome,
                body,
            } => {
                let op_id = op_id.to_string();
                for t in &outcome.touches {
                    keys.push(json!({"op_id": op_id, "key": t.key, "exclusive": t.exclusive}));
                }
                if let Some(e) = &outcome.learned {
                    learned.push(entity(i, Some(&op_id), e));
                }
                commits.push(json!({
                    "ord": i, "op_id": op_id, "state": state.as_str(),
                    "created_ids": serde_json::to_string(&outcome.created_ids)
                        .expect("a list of strings serializes"),
                    "body": body, "status": outcome.upstream_status,
                    "request_id": outcome.request_id, "detail": outcome.detail,
                }));
            }
            Work::Learn(e) => learned.push(entity(i, None, e)),
            Work::Drop(op_id) => drops.push(Value::String(op_id.to_string())),
            Work::Published(_) => {}
        }
    }
    let rows = |v: Vec<Value>| Some(Value::Array(v).to_string());
    let mut text = String::from("BEGIN");
    if !opened.is_empty() && !me.alone {
        text.push_str(&format!(
            "; SELECT 0 AS sg_lock FROM (SELECT pg_advisory_xact_lock({OPENINGS})) l"
        ));
    }
    if !commits.is_empty() {
        text.push_str("; SELECT seq FROM oplog_head WHERE id = 1 FOR UPDATE");
    }
    let mut steps = Vec::new();
    // 1. New intents with their keys. Shared with other replicas, those whose
    // keys another replica's open write holds (or, `true`, an op of it
    // logged with an unknown outcome, forwarded less than the settle period
    // ago and not found applied or not), where one of the two changes the
    // key, are refused; the others are opened.
    // 2. Intents become ops, numbered from the head row (moved on by the
    // same statement), gap-free over the found ones and in job order; their
    // intents deleted, their keys and the entities they learned written.
    // Both in one statement (`statement`).
    let mut binds = Vec::new();
    let open = (!opened.is_empty()).then(|| {
        if me.alone {
            binds.extend([rows(opened), owner]);
            OPEN_ALONE
        } else {
            let settle = Some(me.settle_ms.to_string());
            binds.extend([rows(opened), rows(open_keys), owner, settle]);
            OPEN_SHARED
        }
    });
    let commit = !commits.is_empty() || !learned.is_empty() || !drops.is_empty();
    if commit {
        binds.extend([rows(commits), rows(keys), rows(learned), rows(drops)]);
    }
    if open.is_some() || commit {
        steps.push((statement(open, commit), binds));
    }
    // 3. The publisher's position.
    if let Some(seq) = jobs
        .iter()
        .filter_map(|j| match j.work {
            Work::Published(seq) => Some(seq),
            _ => None,
        })
        .max()
    {
        steps.push((PUBLISHED, vec![Some(seq.to_string())]));
    }
    PgBatch { begin: text, steps }
}

/// Records the publisher's position (PostgreSQL): `?` the seq.
const PUBLISHED: &str = "INSERT INTO meta (key, value) VALUES ('published_seq', ?::BIGINT)
    ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, excluded.value)";

/// What the statements answered: the jobs refused (marked in `busy`) and the
/// seq of each commit whose intent was found, in job order.
fn pg_results(
    rows: &[sqlx::any::AnyRow],
    jobs: &[Job],
    busy: &mut [Option<bool>],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    use sqlx::Row;
    let mut by_op: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for row in rows {
        let Ok(tag) = row.try_get::<String, _>("sg_tag") else {
            continue;
        };
        let (a, b): (String, i64) = (row.try_get(1)?, row.try_get(2)?);
        match tag.as_str() {
            "busy" => {
                let job = a.parse::<usize>().ok();
                if let Some(slot) = job.and_then(|j| busy.get_mut(j)) {
                    *slot = Some(b != 0);
                }
            }
            _ => {
                by_op.insert(a, b);
            }
        }
    }
    Ok(jobs
        .iter()
        .map(|j| match &j.work {
            Work::Commit { op_id, .. } => by_op.get(&op_id.to_string()).copied(),
            _ => None,
        })
        .collect())
}

/// An entity learned, as a row of `COMMIT`'s JSON: by a commit (written only
/// if its op is logged) or alone.
fn entity(job: usize, op_id: Option<&str>, e: &EntityRef) -> serde_json::Value {
    serde_json::json!({
        "ord": job, "op_id": op_id, "id": e.id, "kind": e.kind, "name": e.name,
        "domain_id": e.domain_id,
    })
}

/// Part of a batch statement on PostgreSQL: its common table expressions,
/// and the query that answers its rows (`sg_tag` first), if any.
#[derive(Clone, Copy)]
struct Part {
    ctes: &'static str,
    answers: Option<&'static str>,
}

/// The one statement that writes a batch's openings (`open`, if any) and its
/// commits (`commit`): the parts joined, their parameters in that order. The
/// two parts read the tables as the statement began (after the batch's
/// locks), as when the openings ran first: a commit's intent was always
/// opened by an earlier batch.
fn statement(open: Option<Part>, commit: bool) -> &'static str {
    use std::sync::LazyLock;
    fn join(parts: &[Part]) -> String {
        let ctes: Vec<&str> = parts.iter().map(|p| p.ctes).collect();
        let answers: Vec<&str> = parts.iter().filter_map(|p| p.answers).collect();
        let answers = if answers.is_empty() {
            "SELECT 'none' AS sg_tag, NULL::TEXT, NULL::BIGINT WHERE FALSE".to_string()
        } else {
            answers.join(" UNION ALL ")
        };
        format!("WITH {}\n    {answers}", ctes.join(",\n"))
    }
    static ALL: LazyLock<[String; 5]> = LazyLock::new(|| {
        [
            join(&[OPEN_ALONE]),
            join(&[OPEN_SHARED]),
            join(&[COMMIT]),
            join(&[OPEN_ALONE, COMMIT]),
            join(&[OPEN_SHARED, COMMIT]),
        ]
    });
    let shared = |p: Part| p.ctes == OPEN_SHARED.ctes;
    let i = match (open, commit) {
        (Some(p), false) => usize::from(shared(p)),
        (None, _) => 2,
        (Some(p), true) => 3 + usize::from(shared(p)),
    };
    &ALL[i]
}

/// Opens intents (PostgreSQL, the op log held alone): `?` their rows, the
/// owner. Nothing is refused.
const OPEN_ALONE: Part = Part {
    ctes: "
    b AS (SELECT * FROM json_to_recordset(?::json) AS b(job BIGINT, op_id TEXT, method TEXT,
                 path TEXT, class TEXT, kind TEXT, body TEXT, refs TEXT, traceparent TEXT)),
    opened AS (INSERT INTO intents (op_id, method, path, class, kind, body, refs, traceparent,
                                    created_at, owner)
               SELECT op_id, method, path, class, kind, body, refs, traceparent, SG_NOW(),
                      ?::INTEGER
               FROM b ORDER BY job RETURNING op_id)",
    answers: None,
};

/// Opens intents with their keys (PostgreSQL, replicas): `?` their rows,
/// their keys, the owner, the settle period in ms. Answers the jobs refused,
/// `true` where a write in doubt holds a key. The ops in doubt are found
/// first (few: exceptions), then their keys: never every op that ever
/// touched a key (a domain's key is touched by each write in it).
const OPEN_SHARED: Part = Part {
    ctes: "
    b AS (SELECT * FROM json_to_recordset(?::json) AS b(job BIGINT, op_id TEXT, method TEXT,
                 path TEXT, class TEXT, kind TEXT, body TEXT, refs TEXT, traceparent TEXT)),
    k AS (SELECT * FROM json_to_recordset(?::json) AS k(job BIGINT, op_id TEXT, key TEXT,
                 exclusive BOOLEAN)),
    me (owner, settle_ms) AS (SELECT ?::INTEGER, ?::BIGINT),
    doubt AS MATERIALIZED (
        SELECT o.seq FROM ops o
        WHERE o.state = 'unknown_outcome'
          AND o.resolution IS DISTINCT FROM 'applied'
          AND o.resolution IS DISTINCT FROM 'not_applied'
          AND o.created_at > (SELECT SG_ISO_MS(SG_NOW_MS() - me.settle_ms) FROM me)),
    held (job, in_doubt) AS (
        SELECT k.job, FALSE FROM k CROSS JOIN me
        CROSS JOIN LATERAL (SELECT 1 FROM intent_keys ik JOIN intents i ON i.op_id = ik.op_id
                            WHERE ik.key = k.key AND (ik.exclusive OR k.exclusive)
                              AND i.owner IS DISTINCT FROM me.owner LIMIT 1) other
        UNION ALL
        SELECT k.job, TRUE FROM doubt
        JOIN op_keys ok ON ok.seq = doubt.seq
        JOIN k ON k.key = ok.key AND (ok.exclusive OR k.exclusive)),
    opened AS (INSERT INTO intents (op_id, method, path, class, kind, body, refs, traceparent,
                                    created_at, owner)
               SELECT b.op_id, b.method, b.path, b.class, b.kind, b.body, b.refs, b.traceparent,
                      SG_NOW(), me.owner
               FROM b CROSS JOIN me WHERE b.job NOT IN (SELECT job FROM held) ORDER BY b.job
               RETURNING op_id),
    keyed AS (INSERT INTO intent_keys (op_id, key, exclusive)
              SELECT k.op_id, k.key, k.exclusive FROM k JOIN opened ON opened.op_id = k.op_id)",
    answers: Some(
        "SELECT 'busy' AS sg_tag, job::TEXT, MAX(in_doubt::INTEGER)::BIGINT FROM held GROUP BY job",
    ),
};

/// Logs commits as ops (PostgreSQL): `?` the commits, their keys, the
/// entities learned, the intents dropped. Each part of one statement reads
/// the rows as they were before it: the intents made ops are read (once,
/// each by its key: the table churns, and a scan of it would read every
/// row deleted since the last vacuum), then deleted with their keys. Entities are upserted once per ID (a later job
/// wins), in ID order (another replica's batch locks them in the same
/// order: no deadlock). Answers each op logged with its seq.
const COMMIT: Part = Part {
    ctes: "
    v AS (SELECT * FROM json_to_recordset(?::json) AS v(ord BIGINT, op_id TEXT, state TEXT,
                 created_ids TEXT, body TEXT, status BIGINT, request_id TEXT, detail TEXT)),
    ks AS (SELECT * FROM json_to_recordset(?::json) AS ks(op_id TEXT, key TEXT, exclusive BOOLEAN)),
    es AS (SELECT * FROM json_to_recordset(?::json) AS es(ord BIGINT, op_id TEXT, id TEXT, kind TEXT,
                 name TEXT, domain_id TEXT)),
    drops AS (SELECT value AS op_id FROM json_array_elements_text(?::json)),
    found AS MATERIALIZED (
        SELECT v.ord, v.state, v.created_ids, v.body AS v_body, v.status, v.request_id, v.detail,
               i.op_id, i.method, i.path, i.class, i.kind, i.body, i.refs, i.traceparent,
               i.created_at
        FROM v CROSS JOIN LATERAL (SELECT * FROM intents i WHERE i.op_id = v.op_id LIMIT 1) i),
    n (n) AS (SELECT COUNT(*) FROM found),
    h (base) AS (UPDATE oplog_head SET seq = seq + (SELECT n FROM n)
                 WHERE id = 1 AND EXISTS (SELECT 1 FROM v) RETURNING seq - (SELECT n FROM n)),
    logged AS (
        INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_ids, body,
                         upstream_status, request_id, detail, refs, traceparent,
                         created_at, logged_at, resolution)
        SELECT h.base + ROW_NUMBER() OVER (ORDER BY f.ord), f.op_id, f.state, f.method,
          f.path, f.class, f.kind, f.created_ids, COALESCE(f.v_body, f.body), f.status,
          f.request_id, f.detail, f.refs, f.traceparent, f.created_at, SG_NOW(),
          CASE WHEN f.state = 'unknown_outcome' THEN 'pending' END
        FROM found f CROSS JOIN h
        ORDER BY f.ord
        RETURNING op_id, seq),
    gone AS (DELETE FROM intents
             WHERE op_id = ANY (ARRAY(SELECT op_id FROM logged
                                      UNION ALL SELECT op_id FROM drops))),
    op_keyed AS (INSERT INTO op_keys (key, seq, exclusive)
              SELECT ks.key, logged.seq, ks.exclusive FROM ks JOIN logged ON logged.op_id = ks.op_id
              ON CONFLICT DO NOTHING),
    learned AS (
        INSERT INTO entities (id, kind, name, domain_id, updated_at)
        SELECT id, kind, name, domain_id, SG_NOW() FROM (
            SELECT DISTINCT ON (es.id) es.id, es.kind, es.name, es.domain_id FROM es
            WHERE es.op_id IS NULL OR es.op_id IN (SELECT op_id FROM logged)
            ORDER BY es.id, es.ord DESC) AS last
        ORDER BY id COLLATE \"C\"
        ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, name = excluded.name,
            domain_id = excluded.domain_id, updated_at = excluded.updated_at)",
    answers: Some("SELECT 'seq' AS sg_tag, op_id, seq FROM logged"),
};

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// The batch statements, prepared by name on a test's session (as the
    /// writer's session would plan them), to be explained.
    fn statements() -> [(&'static str, &'static str); 5] {
        [
            ("sg_open_alone", statement(Some(OPEN_ALONE), false)),
            ("sg_open_shared", statement(Some(OPEN_SHARED), false)),
            ("sg_commit", statement(None, true)),
            ("sg_both", statement(Some(OPEN_SHARED), true)),
            ("sg_published", PUBLISHED),
        ]
    }

    /// A plan (`EXPLAIN ANALYZE`, text) as its nodes: each scan of a table
    /// with the lines that detail it.
    struct Scan {
        node: String,
        table: String,
        rows_read: f64,
        keyed: bool,
    }

    fn scans(plan: &[String]) -> Vec<Scan> {
        let number = |line: &str, after: &str| -> f64 {
            line.split(after)
                .nth(1)
                .and_then(|r| r.split(|c: char| !(c.is_ascii_digit() || c == '.')).next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0.0)
        };
        let kinds = [
            "Seq Scan",
            "Index Scan",
            "Index Only Scan",
            "Bitmap Heap Scan",
            "Bitmap Index Scan",
            "Tid Scan",
        ];
        let mut out: Vec<Scan> = Vec::new();
        let mut loops = 1.0;
        let mut inside = false;
        for line in plan {
            let is_node = line.contains("(actual") || line.contains("(never executed)");
            if is_node {
                inside = false;
                if kinds.iter().any(|k| line.contains(&format!("{k} "))) {
                    let table = line
                        .split(" on ")
                        .nth(1)
                        .and_then(|t| t.split_whitespace().next())
                        .unwrap_or("")
                        .to_string();
                    let actual = line.split("(actual").nth(1).unwrap_or("");
                    loops = number(actual, "loops=").max(1.0);
                    out.push(Scan {
                        node: line.trim().to_string(),
                        table,
                        rows_read: number(actual, "rows=") * loops,
                        keyed: false,
                    });
                    inside = true;
                }
            } else if inside {
                let scan = out.last_mut().expect("inside a scan");
                if line.contains("Rows Removed by") {
                    scan.rows_read += number(line, ": ") * loops;
                }
                if line.contains("Index Cond:") || line.contains("Recheck Cond:") {
                    scan.keyed = true;
                }
            }
        }
        out
    }

    /// `EXECUTE name(args)` explained, each argument a literal (test data).
    async fn explain(conn: &mut sqlx::PgConnection, name: &str, args: &[&str]) -> Vec<String> {
        let args: Vec<String> = args
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "''")))
            .collect();
        let text = format!(
            "EXPLAIN (ANALYZE, COSTS OFF) EXECUTE {name}({})",
            args.join(", ")
        );
        sqlx::query_scalar(&text).fetch_all(conn).await.unwrap()
    }

    /// PostgreSQL: the batch statements, planned once while the tables are
    /// empty (as on a new op log, and as the writer's session plans them)
    /// and used after a long history, read every table by a key: no scan of
    /// a table or an index whole (intents churn: a scan reads every row
    /// deleted since the last vacuum), and a write's check of the writes in
    /// doubt does not read the ops that ever touched its keys (a domain's
    /// key is touched by every write in it).
    #[tokio::test]
    async fn a_batch_reads_by_key_whatever_the_op_log_has_seen() {
        let dir = tempfile::tempdir().unwrap();
        let url = super::super::test_url(&dir).await;
        if !url.starts_with("postgres") {
            eprintln!("skipped: PostgreSQL only (SYNCGATE_TEST_POSTGRES)");
            return;
        }
        let store = super::super::Store::open(&url).await.unwrap();
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        // Plans stay the ones made on the empty tables (no analyze of the
        // history while the test runs).
        let mut setup = format!("SET plan_cache_mode = force_generic_plan; {SESSION}");
        for table in ["ops", "op_keys", "intents", "intent_keys", "entities"] {
            setup.push_str(&format!(
                "; ALTER TABLE {table} SET (autovacuum_enabled = false)"
            ));
        }
        for (name, sql) in statements() {
            setup.push_str(&format!(
                "; PREPARE {name} AS {}",
                Dialect::Postgres.sql(sql)
            ));
        }
        sqlx::raw_sql(&setup).execute(&mut conn).await.unwrap();
        let open_rows = |id: &str| {
            format!(
                r#"[{{"job":0,"op_id":"{id}","method":"POST","path":"/v3/projects","class":"resource","kind":"project","body":"{{}}","refs":"[]","traceparent":null}}]"#
            )
        };
        let open_keys = |id: &str| {
            format!(
                r#"[{{"job":0,"op_id":"{id}","key":"domain:d1","exclusive":false}},{{"job":0,"op_id":"{id}","key":"project:{id}","exclusive":true}}]"#
            )
        };
        let commit_rows = |id: &str| {
            format!(
                r#"[{{"ord":0,"op_id":"{id}","state":"committed","created_ids":"[]","body":null,"status":201,"request_id":null,"detail":null}}]"#
            )
        };
        let commit_keys =
            |id: &str| format!(r#"[{{"op_id":"{id}","key":"domain:d1","exclusive":false}}]"#);
        let learned = |id: &str| {
            format!(
                r#"[{{"ord":0,"op_id":"{id}","id":"id-{id}","kind":"project","name":"{id}","domain_id":"d1"}}]"#
            )
        };
        // Each statement run (and planned) once on the empty tables.
        let (rows, keys) = (open_rows("first"), open_keys("first"));
        explain(&mut conn, "sg_open_shared", &[&rows, &keys, "1", "120000"]).await;
        explain(
            &mut conn,
            "sg_open_alone",
            &[&open_rows("first-alone"), "1"],
        )
        .await;
        for id in ["first", "first-alone"] {
            let (rows, keys, learned) = (commit_rows(id), commit_keys(id), learned(id));
            explain(&mut conn, "sg_commit", &[&rows, &keys, &learned, "[]"]).await;
        }
        let (o_rows, o_keys) = (open_rows("first-both"), open_keys("first-both"));
        let args = [&o_rows, &o_keys, "1", "120000", "[]", "[]", "[]", "[]"];
        explain(&mut conn, "sg_both", &args).await;
        explain(&mut conn, "sg_published", &["2"]).await;
        // A history: 3,000 ops in the domain, as many intents opened and
        // closed (rows deleted, not yet vacuumed).
        sqlx::raw_sql(
            "INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_at, logged_at)
                 SELECT g + 2, 'op-' || g, 'committed', 'POST', '/v3/projects', 'resource',
                        'project', '2026-01-01T00:00:00.000Z', '2026-01-01T00:00:00.000Z'
                 FROM generate_series(1, 3000) g;
             INSERT INTO op_keys (key, seq, exclusive)
                 SELECT 'domain:d1', g + 2, FALSE FROM generate_series(1, 3000) g;
             UPDATE oplog_head SET seq = 3002 WHERE id = 1;
             INSERT INTO intents (op_id, method, path, class, kind, created_at)
                 SELECT 'gone-' || g, 'POST', '/v3/projects', 'resource', 'project',
                        '2026-01-01T00:00:00.000Z' FROM generate_series(1, 3000) g;
             INSERT INTO intent_keys (key, op_id, exclusive)
                 SELECT 'domain:d1', 'gone-' || g, FALSE FROM generate_series(1, 3000) g;
             DELETE FROM intents WHERE op_id LIKE 'gone-%';",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let mut plans = Vec::new();
        let (rows, keys) = (open_rows("next"), open_keys("next"));
        plans.push(explain(&mut conn, "sg_open_shared", &[&rows, &keys, "1", "120000"]).await);
        plans.push(explain(&mut conn, "sg_open_alone", &[&open_rows("next-alone"), "1"]).await);
        let id = "next";
        let (rows, keys, learned_rows) = (commit_rows(id), commit_keys(id), learned(id));
        plans.push(explain(&mut conn, "sg_commit", &[&rows, &keys, &learned_rows, "[]"]).await);
        // Openings and commits in one statement.
        let (o_rows, o_keys) = (open_rows("both"), open_keys("both"));
        let id = "next-alone";
        let (rows, keys, learned_rows) = (commit_rows(id), commit_keys(id), learned(id));
        let args = [
            &o_rows,
            &o_keys,
            "1",
            "120000",
            &rows,
            &keys,
            &learned_rows,
            "[]",
        ];
        plans.push(explain(&mut conn, "sg_both", &args).await);
        plans.push(explain(&mut conn, "sg_published", &["3004"]).await);
        // The openings beside other replicas and the commits read tables
        // (the plan is read right); those held alone and the position not.
        for plan in [&plans[0], &plans[2], &plans[3]] {
            assert!(
                !scans(plan).is_empty(),
                "no scan found in:\n{}",
                plan.join("\n")
            );
        }
        for plan in &plans {
            for scan in scans(plan) {
                assert!(
                    scan.keyed && !scan.node.starts_with("Seq Scan"),
                    "a batch statement reads {} whole ({}):\n{}",
                    scan.table,
                    scan.node,
                    plan.join("\n")
                );
                assert!(
                    scan.rows_read < 100.0,
                    "a batch statement read {} rows of {} ({}):\n{}",
                    scan.rows_read,
                    scan.table,
                    scan.node,
                    plan.join("\n")
                );
            }
        }
        let logged: Vec<String> =
            sqlx::query_scalar("SELECT op_id FROM ops WHERE seq > 3002 ORDER BY seq")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        assert_eq!(logged, ["next", "next-alone"]);
        store.close().await;
    }
}
