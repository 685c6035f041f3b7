//! Group commit for the capture path: the intents, commits, dropped intents and
//! learned entities of concurrent requests (and the publisher's position) are
//! written by one task, many to a transaction, so that one fsync (`synchronous=FULL`) serves them all. Each is
//! answered only once its transaction is durable. A commit whose intent is gone
//! writes nothing and fails alone; any other error undoes the whole transaction
//! and fails every write in it (the op log is failing then). Seqs are assigned
//! in the order the requests arrive, inside the transaction.

use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{OpState, Outcome, StoreError, NOW};
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

impl Batcher {
    pub(super) fn spawn(writer: SqlitePool) -> Batcher {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(writer, rx));
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

async fn run(writer: SqlitePool, mut rx: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let results = execute(&writer, &jobs).await;
        for (job, result) in jobs.drain(..).zip(results) {
            // A requester that went away loses only its answer.
            let _ = job.reply.send(result);
        }
    }
}

/// Runs the jobs in one transaction; the results of all, or the error of the
/// commit for all.
async fn execute(writer: &SqlitePool, jobs: &[Job]) -> Vec<Result<Option<i64>, StoreError>> {
    let failed = |e: &dyn std::fmt::Display| {
        jobs.iter()
            .map(|_| Err(StoreError::Batch(e.to_string())))
            .collect::<Vec<_>>()
    };
    let mut tx = match writer.begin().await {
        Ok(tx) => tx,
        Err(e) => return failed(&e),
    };
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        match work(&mut tx, &job.work).await {
            // A commit whose intent is gone wrote nothing: it fails alone.
            Err(StoreError::NoIntent(id)) => results.push(Err(StoreError::NoIntent(id))),
            Err(e) => {
                // Anything else leaves the transaction in doubt: none of it is
                // kept, and every requester hears so.
                let _ = tx.rollback().await;
                return failed(&e);
            }
            Ok(v) => results.push(Ok(v)),
        }
    }
    match tx.commit().await {
        Ok(()) => results,
        Err(e) => failed(&e),
    }
}

async fn work(conn: &mut SqliteConnection, w: &Work) -> Result<Option<i64>, StoreError> {
    match w {
        Work::Begin {
            op_id,
            method,
            path,
            class,
            kind,
            body,
            refs,
            traceparent,
        } => {
            sqlx::query(&format!(
                "INSERT INTO intents (op_id, method, path, class, kind, body, refs, traceparent,
                                      created_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, {NOW})"
            ))
            .bind(op_id.to_string())
            .bind(method)
            .bind(path)
            .bind(class)
            .bind(kind)
            .bind(body)
            .bind(refs)
            .bind(traceparent)
            .execute(&mut *conn)
            .await?;
            Ok(None)
        }
        Work::Commit {
            op_id,
            state,
            outcome,
            body,
        } => {
            let created_ids =
                serde_json::to_string(&outcome.created_ids).expect("a list of strings serializes");
            let seq: Option<i64> = sqlx::query_scalar(&format!(
                "INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_ids, body,
                                  upstream_status, request_id, detail, refs, traceparent,
                                  created_at, logged_at)
                 SELECT (SELECT COALESCE(MAX(seq), 0) + 1 FROM ops), op_id, ?, method, path, class,
                        kind, ?, COALESCE(?, body), ?, ?, ?, refs, traceparent, created_at, {NOW}
                 FROM intents WHERE op_id = ?
                 RETURNING seq"
            ))
            .bind(state.as_str())
            .bind(created_ids)
            .bind(body)
            .bind(outcome.upstream_status.map(i64::from))
            .bind(outcome.request_id.as_deref())
            .bind(outcome.detail.as_deref())
            .bind(op_id.to_string())
            .fetch_optional(&mut *conn)
            .await?;
            let seq = seq.ok_or(StoreError::NoIntent(*op_id))?;
            for t in &outcome.touches {
                sqlx::query("INSERT OR IGNORE INTO op_keys (key, seq, exclusive) VALUES (?, ?, ?)")
                    .bind(&t.key)
                    .bind(seq)
                    .bind(t.exclusive)
                    .execute(&mut *conn)
                    .await?;
            }
            sqlx::query("DELETE FROM intents WHERE op_id = ?")
                .bind(op_id.to_string())
                .execute(&mut *conn)
                .await?;
            if let Some(e) = &outcome.learned {
                learn(conn, e).await?;
            }
            Ok(Some(seq))
        }
        Work::Drop(op_id) => {
            sqlx::query("DELETE FROM intents WHERE op_id = ?")
                .bind(op_id.to_string())
                .execute(&mut *conn)
                .await?;
            Ok(None)
        }
        Work::Learn(e) => {
            learn(conn, e).await?;
            Ok(None)
        }
        Work::Published(seq) => {
            sqlx::query(
                "INSERT INTO meta (key, value) VALUES ('published_seq', ?)
                 ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
            )
            .bind(seq)
            .execute(&mut *conn)
            .await?;
            Ok(None)
        }
    }
}

/// Remembers an entity's natural key.
async fn learn(conn: &mut SqliteConnection, e: &EntityRef) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO entities (id, kind, name, domain_id, updated_at)
         VALUES (?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
         ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, name = excluded.name,
             domain_id = excluded.domain_id, updated_at = excluded.updated_at",
    )
    .bind(&e.id)
    .bind(&e.kind)
    .bind(&e.name)
    .bind(&e.domain_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
