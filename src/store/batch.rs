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
pub(super) struct Batcher(mpsc::Sender<Job>);

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
        Batcher(tx)
    }

    /// Queues one write and waits until it is durable.
    pub(super) async fn submit(&self, work: Work) -> Result<Option<i64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.0
            .send(Job { work, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn run(writer: AnyPool, d: Dialect, who: Shared, mut rx: mpsc::Receiver<Job>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let me = Replica {
            owner: who.owner.load(Relaxed),
            settle_ms: who.settle_ms.load(Relaxed),
            alone: who.alone.load(Relaxed),
        };
        let results = execute(&writer, d, me, &jobs).await;
        for (job, result) in jobs.drain(..).zip(results) {
            // A requester that went away loses only its answer.
            let _ = job.reply.send(result);
        }
    }
}

/// Runs the jobs in one transaction; the results of all, or the error of the
/// transaction for all.
/// Who writes a batch: its replica (0: none), its settle period, and
/// whether it holds the op log alone.
#[derive(Clone, Copy)]
struct Replica {
    owner: i32,
    settle_ms: i64,
    alone: bool,
}

async fn execute(
    writer: &AnyPool,
    d: Dialect,
    me: Replica,
    jobs: &[Job],
) -> Vec<Result<Option<i64>, StoreError>> {
    let failed = |e: &dyn std::fmt::Display| {
        jobs.iter()
            .map(|_| Err(StoreError::Batch(e.to_string())))
            .collect::<Vec<_>>()
    };
    let mut tx = match writer.begin().await {
        Ok(tx) => tx,
        Err(e) => return failed(&e),
    };
    let mut busy = vec![None; jobs.len()];
    match write_all(&mut tx, d, me, jobs, &mut busy).await {
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

/// Orders the openings of every replica's intents (a transaction lock).
const OPENINGS: i64 = 0x5347_4f50_454e;

/// Marks the intents of `jobs` that another replica's write holds a key of
/// (an open intent of its own; or, `Some(true)`, an op logged with an
/// unknown outcome, forwarded less than the settle period ago and not found
/// applied or not), where one of the two changes the key. Under a
/// transaction lock every replica takes to open intents: what was opened
/// before is committed and seen, so two conflicting writes are never both
/// opened.
async fn refuse_conflicts(
    conn: &mut AnyConnection,
    me: Replica,
    jobs: &[Job],
    busy: &mut [Option<bool>],
) -> Result<(), sqlx::Error> {
    let owner = me.owner;
    let wanted: Vec<(i64, &str, bool)> = jobs
        .iter()
        .enumerate()
        .filter_map(|(i, j)| match &j.work {
            Work::Begin { touches, .. } => Some((i as i64, touches)),
            _ => None,
        })
        .flat_map(|(i, touches)| {
            touches
                .iter()
                .map(move |t| (i, t.key.as_str(), t.exclusive))
        })
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(OPENINGS)
        .execute(&mut *conn)
        .await?;
    for chunk in wanted.chunks(ROWS) {
        let mut q = Sql::new("WITH v (job, key, exclusive) AS (");
        q.values(chunk, |row, (job, key, exclusive)| {
            row.bind(*job).bind(*key).bind(*exclusive);
        });
        q.push(
            ") SELECT v.job, FALSE FROM v \
             JOIN intent_keys k ON k.key = v.key AND (k.exclusive OR v.exclusive) \
             JOIN intents i ON i.op_id = k.op_id WHERE i.owner IS DISTINCT FROM ",
        );
        q.bind((owner != 0).then_some(owner));
        q.push(
            " UNION SELECT v.job, TRUE FROM v \
             JOIN op_keys ok ON ok.key = v.key AND (ok.exclusive OR v.exclusive) \
             JOIN ops o ON o.seq = ok.seq \
             WHERE o.state = 'unknown_outcome' \
             AND o.resolution IS DISTINCT FROM 'applied' \
             AND o.resolution IS DISTINCT FROM 'not_applied' \
             AND o.created_at > SG_ISO_MS(SG_NOW_MS() - ",
        );
        q.bind(me.settle_ms);
        q.push(")");
        let (text, args) = q.finish(Dialect::Postgres)?;
        let found: Vec<(i64, bool)> = sqlx::query_as_with(&text, args)
            .fetch_all(&mut *conn)
            .await?;
        for (job, in_doubt) in found {
            if let Some(b) = usize::try_from(job).ok().and_then(|j| busy.get_mut(j)) {
                *b = Some(b.unwrap_or_default() || in_doubt);
            }
        }
    }
    Ok(())
}

/// Rows per multi-row statement (SQLite allows 32766 bound values,
/// PostgreSQL 65535).
const ROWS: usize = 1000;

/// Writes every job with a handful of multi-row statements; the seq of each
/// commit whose intent was found, in job order.
async fn write_all(
    conn: &mut AnyConnection,
    d: Dialect,
    me: Replica,
    jobs: &[Job],
    busy: &mut [Option<bool>],
) -> Result<Vec<Option<i64>>, sqlx::Error> {
    let owner = me.owner;
    let mut seqs: Vec<Option<i64>> = vec![None; jobs.len()];

    // 1. New intents; on PostgreSQL, those whose keys another replica's
    // open write or unresolved outcome holds are refused (`busy`).
    // Ordered against other replicas' writes (not needed alone).
    let shared = d == Dialect::Postgres && !me.alone;
    if shared {
        refuse_conflicts(conn, me, jobs, busy).await?;
    }
    let begins: Vec<&Work> = jobs
        .iter()
        .zip(busy.iter())
        .filter(|(j, b)| matches!(j.work, Work::Begin { .. }) && b.is_none())
        .map(|(j, _)| &j.work)
        .collect();
    for chunk in begins.chunks(ROWS) {
        // On PostgreSQL, the replica that opened it (its intents are settled
        // by another should it die).
        let mut q = Sql::new(match d {
            Dialect::Sqlite => "INSERT INTO intents (op_id, method, path, class, kind, body, refs, traceparent, created_at) ",
            Dialect::Postgres => "INSERT INTO intents (op_id, method, path, class, kind, body, refs, traceparent, created_at, owner) ",
        });
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
                if d == Dialect::Postgres {
                    row.bind((owner != 0).then_some(owner));
                }
            }
        });
        let (text, args) = q.finish(d)?;
        sqlx::query_with(&text, args).execute(&mut *conn).await?;
    }
    if shared {
        let keys: Vec<(String, &str, bool)> = begins
            .iter()
            .filter_map(|w| match w {
                Work::Begin { op_id, touches, .. } => Some((op_id.to_string(), touches)),
                _ => None,
            })
            .flat_map(|(op_id, touches)| {
                touches
                    .iter()
                    .map(move |t| (op_id.clone(), t.key.as_str(), t.exclusive))
            })
            .collect();
        for chunk in keys.chunks(ROWS) {
            let mut q = Sql::new("INSERT INTO intent_keys (op_id, key, exclusive) ");
            q.values(chunk, |row, (op_id, key, exclusive)| {
                row.bind(op_id.as_str()).bind(*key).bind(*exclusive);
            });
            // A key touched twice (shared and changed) is held changed.
            q.push(
                " ON CONFLICT (key, op_id) DO UPDATE \
                 SET exclusive = intent_keys.exclusive OR excluded.exclusive",
            );
            let (text, args) = q.finish(d)?;
            sqlx::query_with(&text, args).execute(&mut *conn).await?;
        }
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
        if d == Dialect::Postgres {
            // The head row is locked first (a missing one fails the batch),
            // so that the statement below reads the intents as they are once
            // every earlier commit of another process is done.
            sqlx::query("SELECT seq FROM oplog_head WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *conn)
                .await?;
        }
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
        q.push(")");
        // SQLite has one writer: the next seq follows the last op. On
        // PostgreSQL the head row, locked from above to the commit and
        // moved on by this statement, orders the commits of every central
        // process as their seqs (visible in seq order); the intents made ops
        // are deleted by the same statement (each of its parts reads the
        // rows as they were before it).
        match d {
            Dialect::Sqlite => {
                q.push(", h (base) AS (SELECT COALESCE(MAX(seq), 0) FROM ops)");
            }
            Dialect::Postgres => {
                q.push(
                    ", n (n) AS (SELECT COUNT(*) FROM v JOIN intents i ON i.op_id = v.op_id),
                     h (base) AS (UPDATE oplog_head SET seq = seq + (SELECT n FROM n)
                                  WHERE id = 1 RETURNING seq - (SELECT n FROM n)),
                     gone AS (DELETE FROM intents WHERE op_id IN (SELECT op_id FROM v))",
                );
            }
        }
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

    // 4. Intents done with: committed (on PostgreSQL, deleted with their ops
    // already) or dropped.
    let done: Vec<String> = jobs
        .iter()
        .filter_map(|j| match &j.work {
            Work::Commit { op_id, .. } if d == Dialect::Sqlite => Some(op_id.to_string()),
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
    // One row per ID: a statement may not update a row twice (PostgreSQL).
    let mut last: std::collections::HashMap<&str, &EntityRef> = std::collections::HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for e in learned {
        if last.insert(e.id.as_str(), e).is_none() {
            order.push(e.id.as_str());
        }
    }
    // Rows locked in ID order: another replica's batch locks them in the
    // same order (no deadlock between two upserts).
    order.sort_unstable();
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
    Ok(seqs)
}
