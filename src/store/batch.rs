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

/// A job's answer: the seq of a commit, nothing for the others.
type Answer = Result<Option<i64>, StoreError>;

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
    reply: oneshot::Sender<Answer>,
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
    pub(super) async fn submit(&self, work: Work) -> Answer {
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
    let mut held = Writer::new();
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
                held.conn = None;
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
            held.conn = None;
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
    held: &mut Writer,
    d: Dialect,
    me: Replica,
    jobs: &[Job],
) -> Vec<Answer> {
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
        // SQLite answers a commit on the spot, in process: never lost.
        Ok(seqs) => match tx.commit().await {
            Ok(()) => answers(&jobs.iter().collect::<Vec<_>>(), seqs, &busy),
            Err(e) => failed(&e),
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
fn answers(jobs: &[&Job], seqs: Vec<Option<i64>>, busy: &[Option<bool>]) -> Vec<Answer> {
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
        // One writer: the next seq follows the last op, and its time is
        // never before the last op's (see `LOGGED_AT`).
        q.push(&format!(
            "), h (base, at) AS (SELECT COALESCE(MAX(seq), 0), MAX(SG_NOW(), COALESCE(({LAST_LOGGED_AT}), '')) FROM ops)"
        ));
        q.push(
            " INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_ids, body,
                                upstream_status, request_id, detail, refs, traceparent,
                                created_at, logged_at, resolution)
               SELECT h.base + ROW_NUMBER() OVER (ORDER BY v.ord), i.op_id, v.state, i.method,
                 i.path, i.class, i.kind, v.created_ids, COALESCE(v.body, i.body), v.status,
                 v.request_id, v.detail, i.refs, i.traceparent, i.created_at, h.at,
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

/// PostgreSQL: a batch is one call, one round trip, of a function of the
/// writer's session (`session`, one per kind of batch: `Kind`) that takes
/// the batch's locks, then runs its statement, which sees what was
/// committed once the locks were granted; committed as the call ends (no
/// transaction spans round trips, none is left open between them). Rows
/// travel as JSON parameters: the data is never in a statement's text,
/// which the server may log. A call that fails is undone whole and fails
/// every job. A call whose answer was lost (the connection broken) is
/// settled from what the database holds (`settle`): answered as it was
/// made, or, not made, run again, once, on a new connection when the broken
/// one was kept from an earlier batch (the server may have ended that
/// session while it was idle), and failed otherwise.
async fn execute_pg(writer: &AnyPool, held: &mut Writer, me: Replica, jobs: &[Job]) -> Vec<Answer> {
    let mut results: Vec<Option<Answer>> = jobs.iter().map(|_| None).collect();
    let mut todo: Vec<usize> = (0..jobs.len()).collect();
    let mut retried = false;
    loop {
        let part: Vec<&Job> = todo.iter().map(|&i| &jobs[i]).collect();
        match call_pg(writer, held, me, &part).await {
            Ok(done) => {
                for (&i, r) in todo.iter().zip(done) {
                    results[i] = Some(r);
                }
                break;
            }
            Err(lost) => {
                let mut again = Vec::new();
                let told = lost.settled.is_some();
                let settled = lost
                    .settled
                    .unwrap_or_else(|| todo.iter().map(|_| None).collect());
                for (&i, r) in todo.iter().zip(settled) {
                    match r {
                        Some(r) => results[i] = Some(r),
                        None => again.push(i),
                    }
                }
                if !again.is_empty() && told && lost.kept && !retried {
                    tracing::warn!(error = %lost.error, "the op log's connection was broken; writing what the batch did not write on a new one");
                    retried = true;
                    todo = again;
                    continue;
                }
                for i in again {
                    // Refused, its intent perhaps opened: dropped later.
                    if let (false, Work::Begin { op_id, .. }) = (told, &jobs[i].work) {
                        if held.orphans.len() < MAX_ORPHANS {
                            held.orphans.push(op_id.to_string());
                        } else {
                            tracing::warn!(%op_id, "an opening whose outcome is unknown is left to the sweeper");
                        }
                    }
                    results[i] = Some(Err(StoreError::Batch(lost.error.clone())));
                }
                break;
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every job is answered"))
        .collect()
}

/// A batch call whose answer was lost: the error, whether the connection
/// was kept from an earlier batch, and each job's answer as the database
/// tells it (`None`: not done), if it can be told.
struct Lost {
    error: String,
    kept: bool,
    settled: Option<Vec<Option<Answer>>>,
}

/// Runs a batch as one call on the writer's connection: each job's answer,
/// or `Lost`.
async fn call_pg(
    writer: &AnyPool,
    held: &mut Writer,
    me: Replica,
    jobs: &[&Job],
) -> Result<Vec<Answer>, Lost> {
    let failed = |e: &dyn std::fmt::Display| {
        jobs.iter()
            .map(|_| Err(StoreError::Batch(e.to_string())))
            .collect::<Vec<_>>()
    };
    held.nonce += 1;
    let nonce = held.nonce;
    let batch = pg_batch(me, jobs, &held.id, nonce, &held.orphans);
    let mut conn = match Held::take(held, writer).await {
        Ok(taken) => taken,
        Err(e) => return Ok(failed(&e)),
    };
    let kept = conn.kept;
    let mut q = sqlx::query(batch.kind.call());
    for b in &batch.binds {
        q = q.bind(b.as_deref());
    }
    let id = held.id.clone();
    let lost = |error: String, kept: bool| async move {
        let settled = settle(writer, &id, nonce, jobs).await;
        Err(Lost {
            error,
            kept,
            settled,
        })
    };
    match q.fetch_all(conn.get()).await {
        Ok(rows) => {
            let read: Result<Vec<(String, String, i64)>, sqlx::Error> = rows
                .iter()
                .map(|row| {
                    use sqlx::Row;
                    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
                })
                .collect();
            match read {
                Ok(rows) => {
                    held.conn = Some(conn.finish());
                    held.orphans.clear();
                    Ok(answers_of(rows, jobs))
                }
                // Committed, but its answer cannot be read.
                Err(e) => {
                    drop(conn);
                    lost(e.to_string(), false).await
                }
            }
        }
        Err(e) => match undone(&e) {
            // The call failed and was undone. The session is kept when the
            // error was the statement's (its data, a conflict, a deadlock).
            Some(keep) => {
                if keep {
                    held.conn = Some(conn.finish());
                }
                Ok(failed(&e))
            }
            None => {
                drop(conn);
                lost(e.to_string(), kept).await
            }
        },
    }
}

/// Each job's answer from the rows a call answered (`sg_tag`, then two
/// values): the jobs refused, and the seq of each commit whose intent was
/// found.
fn answers_of(rows: Vec<(String, String, i64)>, jobs: &[&Job]) -> Vec<Answer> {
    let mut busy = vec![None; jobs.len()];
    let mut by_op = std::collections::HashMap::new();
    for (tag, a, b) in rows {
        if tag == "busy" {
            let job = a.parse::<usize>().ok();
            if let Some(slot) = job.and_then(|j| busy.get_mut(j)) {
                *slot = Some(b != 0);
            }
        } else {
            by_op.insert(a, b);
        }
    }
    let seqs = jobs
        .iter()
        .map(|j| match &j.work {
            Work::Commit { op_id, .. } => by_op.get(&op_id.to_string()).copied(),
            _ => None,
        })
        .collect();
    answers(jobs, seqs, &busy)
}

/// A batch whose call's answer was lost, as the database holds it, once
/// the call's session is ended (it may still be running the call, not
/// knowing its client gone: ended, the call is committed or undone for
/// good). The writer's sessions are known by their `application_name`
/// (one at a time). A call records its nonce and its answer with what it
/// writes (`calls`, one row per writer): found with this call's nonce, the
/// call was made and its jobs are answered as it answered them; else none
/// of it was, and no job is done (`None`). Nothing is told when the session
/// cannot be ended or the database read.
async fn settle(
    writer: &AnyPool,
    id: &str,
    nonce: i64,
    jobs: &[&Job],
) -> Option<Vec<Option<Answer>>> {
    use sqlx::Row;
    let mut conn = writer.acquire().await.ok()?;
    let name = Writer::name(id);
    sqlx::query(
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
         WHERE application_name = $1",
    )
    .bind(&name)
    .fetch_all(&mut *conn)
    .await
    .ok()?;
    let left: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM pg_stat_activity WHERE application_name = $1")
            .bind(&name)
            .fetch_optional(&mut *conn)
            .await
            .ok()?;
    if left.is_some() {
        return None;
    }
    // Read by a statement that writes (the row itself, unchanged), read
    // whole: its commit waits for synchronous standbys (if any) past the
    // call's commit, which an ended session may have left made here but
    // not yet confirmed there. No row: no call of this writer was made.
    let rows =
        sqlx::query("UPDATE calls SET at = at WHERE writer = $1 RETURNING nonce, answers::TEXT")
            .bind(id)
            .fetch_all(&mut *conn)
            .await
            .ok()?;
    let (found, answered): (Option<i64>, Option<String>) = match rows.first() {
        Some(row) => (row.try_get(0).ok()?, row.try_get(1).ok()?),
        None => (None, None),
    };
    if found != Some(nonce) {
        return Some(jobs.iter().map(|_| None).collect());
    }
    #[derive(serde::Deserialize)]
    struct Answered {
        sg_tag: String,
        sg_a: String,
        sg_b: i64,
    }
    let rows: Vec<Answered> = serde_json::from_str(answered.as_deref()?).ok()?;
    let rows = rows
        .into_iter()
        .map(|r| (r.sg_tag, r.sg_a, r.sg_b))
        .collect();
    Some(answers_of(rows, jobs).into_iter().map(Some).collect())
}

/// Whether a call that failed was undone by the server (an error of its
/// statement, the connection still up): then whether the session may be
/// kept (the error was of the data, a conflict, a deadlock, a cancel),
/// rather than closed (the writer's functions gone, say). `None` when the
/// call may have been made: the connection broken (the session ended by
/// the server, the socket closed) or the answer not read whole.
fn undone(e: &sqlx::Error) -> Option<bool> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    let code = db.code().unwrap_or_default();
    // Class 08: connection exception; 57P01-57P05: the server shutting
    // down, the session ended by an administrator or a timeout; 25P03: a
    // transaction left idle too long.
    if code.starts_with("08") || code.starts_with("57P") || code == "25P03" {
        return None;
    }
    Some(
        ["22", "23", "40"]
            .iter()
            .any(|class| code.starts_with(class))
            || matches!(&*code, "57014" | "55P03"),
    )
}

/// The writer's connection on PostgreSQL, kept from one batch to the next
/// (no pool hand-over, and a plan per statement once per connection), with
/// this task's session settings (`session`). It is never given back to the
/// pool, whose other users must not inherit them: dropped, it is closed.
/// One left unused a while is tried first (a ping); one broken meanwhile is
/// closed and another taken.
pub(super) struct Held {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    used: std::time::Instant,
}

/// The writer task's state on PostgreSQL: its connection kept between
/// batches, its name (a random ID: its row in `calls`, its sessions'
/// `application_name`), the nonce of its last call, and the intents of
/// openings whose outcome could not be told (`settle`): dropped by the next
/// call that is made (their writes were refused, never forwarded; a drop
/// of one that is not there changes nothing).
pub(super) struct Writer {
    conn: Option<Held>,
    id: String,
    nonce: i64,
    orphans: Vec<String>,
}

/// Most orphans kept (`Writer`); more are left to the sweeper, which logs
/// an intent left open as an op whose outcome is unknown.
const MAX_ORPHANS: usize = 8 * MAX_BATCH;

impl Writer {
    fn new() -> Writer {
        Writer {
            conn: None,
            id: Uuid::new_v4().simple().to_string(),
            nonce: 0,
            orphans: Vec::new(),
        }
    }

    /// The `application_name` of its sessions: a session a pooler handed
    /// to another client is never taken for one of them.
    fn name(id: &str) -> String {
        format!("syncgate writer {id}")
    }
}

/// How long the writer's connection may stay unused and still be trusted.
const HELD_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

impl Held {
    /// The writer's connection, and whether it is the one kept (else a new
    /// one from the pool with `session` set on it). None is kept once the
    /// pool is closing.
    async fn take(held: &mut Writer, writer: &AnyPool) -> Result<Unfinished, sqlx::Error> {
        if let Some(mut h) = held.conn.take() {
            use sqlx::Connection;
            let fresh = h.used.elapsed() < HELD_IDLE;
            if let Some(mut conn) = h.conn.take() {
                if !writer.is_closed() && (fresh || conn.ping().await.is_ok()) {
                    return Ok(Unfinished {
                        conn: Some(conn),
                        kept: true,
                    });
                }
                conn.close_on_drop();
            }
        }
        let mut conn = writer.acquire().await?;
        if let Err(e) = simple(&mut conn, &session(&held.id)).await {
            conn.close_on_drop();
            return Err(e);
        }
        Ok(Unfinished {
            conn: Some(conn),
            kept: false,
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            conn.close_on_drop();
        }
    }
}

/// The writer's session on PostgreSQL: its settings, and the functions a
/// batch calls (`Kind::function`), made for this session only (`pg_temp`:
/// the version of them a replica runs is its own, whatever the version of
/// the others). Each batch statement is planned once per session, while
/// the tables may still be nearly empty: a plan that scanned `intents` or
/// `intent_keys` whole (rows inserted and deleted by every write, dead ones
/// kept until a vacuum) would grow slower with every write. Every table a
/// batch reads is read by a key, so this session never scans one whole.
/// Its transactions are read committed whatever the database's default
/// (each statement of a batch sees what was committed once its locks were
/// granted), and so is this one. Writers' rows in `calls` not written for
/// an hour are forgotten (of writers that stopped).
fn session(id: &str) -> String {
    static FUNCTIONS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let mut text = String::new();
        for kind in Kind::ALL {
            text.push_str(";\n");
            text.push_str(&kind.function());
        }
        text
    });
    format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE;
         SET enable_seqscan = off; SET default_transaction_isolation = 'read committed';
         SET default_transaction_read_only = off; SET application_name = '{}'{};
         DELETE FROM calls WHERE at < {};
         COMMIT",
        Writer::name(id),
        *FUNCTIONS,
        Dialect::Postgres.sql("SG_OLDER('-1 hour')"),
    )
}

/// The writer's connection while a batch is called: closed, not kept,
/// unless the call was seen to end (`finish`). A batch abandoned half-way
/// (its task ended at a shutdown, a panic) would otherwise hand the next
/// batch a session in the middle of an exchange.
/// Also whether it was kept from an earlier batch.
struct Unfinished {
    conn: Option<sqlx::pool::PoolConnection<sqlx::Any>>,
    kept: bool,
}

impl Unfinished {
    fn get(&mut self) -> &mut AnyConnection {
        self.conn.as_mut().expect("held until finished or dropped")
    }

    /// The call ended: the connection is kept for the next batch.
    fn finish(mut self) -> Held {
        Held {
            conn: self.conn.take(),
            used: std::time::Instant::now(),
        }
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
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

/// A batch on PostgreSQL: the function it calls and its parameters.
struct PgBatch {
    kind: Kind,
    binds: Vec<Option<String>>,
}

/// What a batch writes on PostgreSQL (see `execute_pg`, `Kind::function`).
/// Intents are opened under a transaction lock every replica takes to open
/// its own (not needed by a process that holds the op log alone): what
/// another opened before is committed and seen, so two conflicting writes
/// are never both opened. Commits lock the head row first, so that the
/// statement that logs them reads the intents as they are once every
/// earlier commit of another process is done, and the head orders every
/// process's commits as their seqs (visible in seq order). Always in this
/// order (no deadlock).
fn pg_batch(me: Replica, jobs: &[&Job], writer: &str, nonce: i64, orphans: &[String]) -> PgBatch {
    use serde_json::{json, Value};
    let owner = (me.owner != 0).then(|| me.owner.to_string());
    let mut opened = Vec::new();
    let mut open_keys = Vec::new();
    let mut commits = Vec::new();
    let mut keys = Vec::new();
    let mut learned = Vec::new();
    let mut drops: Vec<Value> = orphans.iter().map(|o| Value::String(o.clone())).collect();
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
    // 1. New intents with their keys. Shared with other replicas, those whose
    // keys another replica's open write holds (or, `true`, an op of it
    // logged with an unknown outcome, forwarded less than the settle period
    // ago and not found applied or not), where one of the two changes the
    // key, are refused; the others are opened.
    // 2. Intents become ops, numbered from the head row (moved on by the
    // same statement), gap-free over the found ones and in job order; their
    // intents deleted, their keys and the entities they learned written.
    // Both in one statement (`statement`).
    // 3. The publisher's position.
    let mut binds = Vec::new();
    let open = if opened.is_empty() {
        Open::None
    } else if me.alone {
        binds.extend([rows(opened), owner]);
        Open::Alone
    } else {
        let settle = Some(me.settle_ms.to_string());
        binds.extend([rows(opened), rows(open_keys), owner, settle]);
        Open::Shared
    };
    let commit = !commits.is_empty() || !learned.is_empty() || !drops.is_empty();
    if commit {
        binds.extend([rows(commits), rows(keys), rows(learned), rows(drops)]);
    }
    let published = jobs
        .iter()
        .filter_map(|j| match j.work {
            Work::Published(seq) => Some(seq),
            _ => None,
        })
        .max();
    binds.push(published.map(|seq| seq.to_string()));
    // 4. The call, by its writer and nonce, with what it answers (`settle`).
    binds.extend([Some(writer.to_string()), Some(nonce.to_string())]);
    PgBatch {
        kind: Kind { open, commit },
        binds,
    }
}

/// The openings of a batch on PostgreSQL: none, of the process that holds
/// the op log alone (`OPEN_ALONE`), or beside other replicas
/// (`OPEN_SHARED`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Alone,
    Shared,
}

/// A kind of batch on PostgreSQL: its openings and whether it commits (or
/// learns entities, or drops intents). Each has its function in the
/// writer's session.
#[derive(Clone, Copy)]
struct Kind {
    open: Open,
    commit: bool,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::of(Open::None, false),
        Kind::of(Open::None, true),
        Kind::of(Open::Alone, false),
        Kind::of(Open::Alone, true),
        Kind::of(Open::Shared, false),
        Kind::of(Open::Shared, true),
    ];

    const fn of(open: Open, commit: bool) -> Kind {
        Kind { open, commit }
    }

    fn index(self) -> usize {
        self.open as usize * 2 + usize::from(self.commit)
    }

    /// The parameters of its statement (`statement`).
    fn params(self) -> usize {
        let open = match self.open {
            Open::None => 0,
            Open::Alone => 2,
            Open::Shared => 4,
        };
        open + if self.commit { 4 } else { 0 }
    }

    /// Its function: `pg_temp.sg_batch_N(..)`, of the statement's
    /// parameters and then the publisher's position (NULL: none), answering
    /// the statement's rows. In PL/pgSQL each statement sees what was
    /// committed when it began: the locks first, then the statement; the
    /// call commits it all, or nothing.
    fn function(self) -> String {
        let n = self.params();
        let args = vec!["TEXT"; n + 3].join(", ");
        let mut body = String::new();
        if self.open == Open::Shared {
            body.push_str(&format!("    PERFORM pg_advisory_xact_lock({OPENINGS});\n"));
        }
        if self.commit {
            // The commits are the first parameter after the openings'.
            let commits = n - 3;
            body.push_str(&format!(
                "    IF json_array_length(${commits}::json) > 0 THEN
        PERFORM seq FROM oplog_head WHERE id = 1 FOR UPDATE;
    END IF;\n"
            ));
        }
        if let Some((ctes, answers)) = parts(self) {
            let recorded = format!(
                "WITH {ctes},\n    sg_answers (sg_tag, sg_a, sg_b) AS ({answers})
    SELECT COALESCE(json_agg(sg_answers), '[]'::json) INTO answered FROM sg_answers"
            );
            body.push_str(&format!("    {};\n", Dialect::Postgres.sql(&recorded)));
        }
        let (p, w, nonce) = (n + 1, n + 2, n + 3);
        body.push_str(&format!(
            "    IF ${p} IS NOT NULL THEN\n        {};\n    END IF;\n",
            PUBLISHED.replace('?', &format!("${p}"))
        ));
        body.push_str(&format!(
            "    INSERT INTO calls (writer, nonce, answers, at)
        VALUES (${w}, ${nonce}::BIGINT, answered, {})
        ON CONFLICT (writer) DO UPDATE
        SET nonce = excluded.nonce, answers = excluded.answers, at = excluded.at;
    RETURN QUERY SELECT a.sg_tag, a.sg_a, a.sg_b
        FROM json_to_recordset(answered) AS a(sg_tag TEXT, sg_a TEXT, sg_b BIGINT);\n",
            Dialect::Postgres.sql("SG_NOW()")
        ));
        format!(
            "CREATE OR REPLACE FUNCTION pg_temp.sg_batch_{}({args})
    RETURNS TABLE (sg_tag TEXT, sg_a TEXT, sg_b BIGINT) LANGUAGE plpgsql AS $sg$
#variable_conflict use_column
DECLARE
    answered JSON := '[]';
BEGIN
{body}END
$sg$",
            self.index()
        )
    }

    /// The statement that calls its function.
    fn call(self) -> &'static str {
        use std::sync::LazyLock;
        static CALLS: LazyLock<[String; 6]> = LazyLock::new(|| {
            Kind::ALL.map(|k| {
                let args: Vec<String> = (1..=k.params() + 3).map(|i| format!("${i}")).collect();
                format!(
                    "SELECT sg_tag, sg_a, sg_b FROM pg_temp.sg_batch_{}({})",
                    k.index(),
                    args.join(", ")
                )
            })
        });
        &CALLS[self.index()]
    }
}

/// Records the publisher's position (PostgreSQL): `?` the seq.
const PUBLISHED: &str = "INSERT INTO meta (key, value) VALUES ('published_seq', ?::BIGINT)
        ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, excluded.value)";

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

/// The common table expressions of a kind's statement and the query that
/// answers its rows, if it has a statement.
fn parts(kind: Kind) -> Option<(String, String)> {
    let open = match kind.open {
        Open::None => None,
        Open::Alone => Some(OPEN_ALONE),
        Open::Shared => Some(OPEN_SHARED),
    };
    let parts: Vec<Part> = open
        .into_iter()
        .chain(kind.commit.then_some(COMMIT))
        .collect();
    if parts.is_empty() {
        return None;
    }
    let ctes: Vec<&str> = parts.iter().map(|p| p.ctes).collect();
    let answers: Vec<&str> = parts.iter().filter_map(|p| p.answers).collect();
    let answers = if answers.is_empty() {
        "SELECT 'none' AS sg_tag, NULL::TEXT, NULL::BIGINT WHERE FALSE".to_string()
    } else {
        answers.join(" UNION ALL ")
    };
    Some((ctes.join(",\n"), answers))
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

/// The last op's `logged_at`. An op is logged at the later of now and the
/// last op's time, so `logged_at` never goes down as `seq` goes up, even when
/// the clock is stepped back: "the last op logged before T" is found at one
/// end of the index on `logged_at` (the audit's timeouts, the delivery
/// counts, retention), and an op logged after a step back is never taken for
/// one older than those before it. (On PostgreSQL the op at the head's seq,
/// read once the head row is locked: the last op, which is never pruned.)
const LAST_LOGGED_AT: &str = "SELECT logged_at FROM ops ORDER BY seq DESC LIMIT 1";

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
          f.request_id, f.detail, f.refs, f.traceparent, f.created_at,
          GREATEST(SG_NOW(), COALESCE((SELECT o.logged_at FROM ops o WHERE o.seq = h.base), '')),
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

    /// The one statement that writes a batch's openings (`open`, if any) and its
    /// commits (`commit`): the parts joined, their parameters in that order. The
    /// two parts read the tables as the statement began (after the batch's
    /// locks), as when the openings ran first: a commit's intent was always
    /// opened by an earlier batch.
    fn statement(kind: Kind) -> &'static str {
        use std::sync::LazyLock;
        static ALL: LazyLock<[String; 6]> = LazyLock::new(|| {
            Kind::ALL.map(|k| match parts(k) {
                Some((ctes, answers)) => format!("WITH {ctes}\n    {answers}"),
                None => String::new(),
            })
        });
        &ALL[kind.index()]
    }

    /// The batch statements, prepared by name on a test's session (as the
    /// writer's session would plan them), to be explained.
    fn statements() -> [(&'static str, &'static str); 5] {
        [
            ("sg_open_alone", statement(Kind::of(Open::Alone, false))),
            ("sg_open_shared", statement(Kind::of(Open::Shared, false))),
            ("sg_commit", statement(Kind::of(Open::None, true))),
            ("sg_both", statement(Kind::of(Open::Shared, true))),
            ("sg_published", PUBLISHED),
        ]
    }

    /// A store on the test's PostgreSQL (`SYNCGATE_TEST_POSTGRES`), with
    /// its URL; none (the test skips) on SQLite.
    async fn postgres_store() -> Option<(tempfile::TempDir, String, super::super::Store)> {
        let dir = tempfile::tempdir().unwrap();
        let url = super::super::test_url(&dir).await;
        if !url.starts_with("postgres") {
            eprintln!("skipped: PostgreSQL only (SYNCGATE_TEST_POSTGRES)");
            return None;
        }
        let store = super::super::Store::open(&url).await.unwrap();
        Some((dir, url, store))
    }

    /// An opening whose call's outcome could not be told was refused, its
    /// intent perhaps opened: the next call made drops it, whatever that
    /// call's own jobs (here the publisher's position alone), and then
    /// forgets it.
    #[tokio::test]
    async fn an_opening_whose_outcome_was_not_told_is_dropped_by_the_next_call() {
        let Some((_dir, _, store)) = postgres_store().await else {
            return;
        };
        let pool = store.writer.clone();
        let open = "INSERT INTO intents (op_id, method, path, class, kind, created_at)
            VALUES ($1, 'POST', '/v3/projects', 'resource', 'project', '2026-01-01T00:00:00.000Z')";
        for id in ["orphan", "other"] {
            sqlx::query(open).bind(id).execute(&pool).await.unwrap();
        }
        let mut writer = Writer::new();
        writer.orphans.push("orphan".into());
        let (reply, answer) = oneshot::channel();
        let jobs = [Job {
            work: Work::Published(7),
            reply,
        }];
        let me = Replica {
            owner: 0,
            settle_ms: 1000,
            alone: true,
        };
        let results = execute(&pool, &mut writer, Dialect::Postgres, me, &jobs).await;
        assert!(matches!(results.as_slice(), [Ok(None)]), "{results:?}");
        drop((jobs, answer));
        let left: Vec<String> = sqlx::query_scalar("SELECT op_id FROM intents ORDER BY op_id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(left, ["other"], "the orphan is dropped, no other intent");
        assert!(writer.orphans.is_empty(), "forgotten once dropped");
        let published: i64 =
            sqlx::query_scalar("SELECT value FROM meta WHERE key = 'published_seq'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(published, 7);
        drop(writer);
        store.close().await;
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
        let Some((_dir, url, store)) = postgres_store().await else {
            return;
        };
        let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
        // Plans stay the ones made on the empty tables (no analyze of the
        // history while the test runs).
        let mut setup = format!(
            "SET plan_cache_mode = force_generic_plan; {}",
            session("test")
        );
        for table in ["ops", "op_keys", "intents", "intent_keys", "entities"] {
            setup.push_str(&format!(
                "; ALTER TABLE {table} SET (autovacuum_enabled = false)"
            ));
        }
        // Their parameters TEXT, as the functions that run them take them.
        for (name, sql) in statements() {
            let types = vec!["TEXT"; sql.matches('?').count()].join(", ");
            setup.push_str(&format!(
                "; PREPARE {name} ({types}) AS {}",
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
