//! Resync and drift audit state at central: each edge's latest resync and
//! drift run, the differences found, and the users created without a password.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::{AnyConnection, FromRow};

use super::dialect::{Dialect, Sql};
use super::{Store, StoreError};

const NOW_MS: &str = "SG_NOW_MS()";
fn iso(col: &str) -> String {
    format!("SG_ISO_MS({col})")
}
/// Rows per multi-row statement (SQLite binds at most 32766 values).
const ROWS: usize = 500;

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ResyncRow {
    pub edge: String,
    pub kind: String,
    pub phase: String,
    #[sqlx(try_from = "super::dialect::Flag")]
    pub prune: bool,
    pub fence: Option<i64>,
    pub done: i64,
    pub total: i64,
    #[serde(skip)]
    pub result: Option<String>,
    pub error: Option<String>,
    pub started_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

/// An edge's latest drift audit (`state`, `started_at`, `finished_at`,
/// `error`) and the last one that completed (`found_at`, `fence`, `excluded`):
/// the differences recorded are that one's.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct DriftRunRow {
    pub edge: String,
    pub state: String,
    pub fence: Option<i64>,
    /// Entities not compared: an op in flight touched them.
    pub excluded: i64,
    pub error: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub found_at: Option<String>,
}

/// An edge's drift audit with what its differences add up to.
#[derive(Debug, Clone, Serialize)]
pub struct DriftSummary {
    #[serde(flatten)]
    pub run: DriftRunRow,
    /// Differences per category, then per kind.
    pub counts: BTreeMap<String, BTreeMap<String, i64>>,
    /// Users a resync created there without a password.
    pub needs_password: i64,
}

/// What `GET /v1/drift` shows: each edge's audit and the differences, read
/// in one transaction, so the differences are those of the audit shown.
#[derive(Debug, Clone)]
pub struct DriftReport {
    pub runs: Vec<(String, Option<DriftSummary>)>,
    pub rows: Vec<DriftRow>,
}

/// What `GET /v1/edges/{edge}` shows beside the edge's position, read in one
/// transaction.
#[derive(Debug, Clone)]
pub struct EdgeAudit {
    pub resync: Option<ResyncRow>,
    pub drift: Option<DriftSummary>,
    pub needs_password: (i64, Vec<NeedsPasswordRow>),
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct DriftRow {
    pub edge: String,
    pub kind: String,
    pub key: String,
    pub category: String,
    #[serde(skip)]
    pub fields: String,
    pub central_id: Option<String>,
    pub edge_id: Option<String>,
}

/// One difference to record.
pub struct NewDrift<'a> {
    pub kind: &'a str,
    pub key: &'a str,
    pub category: &'static str,
    pub fields: &'a [String],
    pub central_id: Option<&'a str>,
    pub edge_id: Option<&'a str>,
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct NeedsPasswordRow {
    pub user_id: String,
    pub user_key: String,
    pub since_seq: i64,
}

impl Store {
    /// Starts (or starts again) an edge's resync.
    pub async fn begin_resync(
        &self,
        edge: &str,
        kind: &str,
        prune: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql(&format!(
            "INSERT INTO resyncs (edge, kind, phase, prune, started_ms, updated_ms)
             VALUES (?, ?, 'starting', ?, {NOW_MS}, {NOW_MS})
             ON CONFLICT (edge) DO UPDATE SET kind = excluded.kind, phase = 'starting',
               prune = excluded.prune, fence = NULL, done = 0, total = 0, result = NULL,
               error = NULL, started_ms = excluded.started_ms, updated_ms = excluded.updated_ms,
               finished_ms = NULL"
        )))
        .bind(edge)
        .bind(kind)
        .bind(prune)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Notes users a resync is about to create at an edge (see migration 0009).
    pub async fn note_resync_users(
        &self,
        edge: &str,
        users: &[(String, String)],
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        for (id, key) in users {
            sqlx::query(&self.d.sql(
                "INSERT INTO resync_users (edge, user_id, user_key) VALUES (?, ?, ?)
                 ON CONFLICT (edge, user_id) DO NOTHING",
            ))
            .bind(edge)
            .bind(id)
            .bind(key)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Users resyncs of an edge noted and no completed resync settled.
    pub async fn resync_users(&self, edge: &str) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            &self
                .d
                .sql("SELECT user_id, user_key FROM resync_users WHERE edge = ?"),
        )
        .bind(edge)
        .fetch_all(&self.writer)
        .await?)
    }

    /// Forgets an edge's noted users (its resync completed).
    pub async fn clear_resync_users(&self, edge: &str) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql("DELETE FROM resync_users WHERE edge = ?"))
            .bind(edge)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    pub async fn resync_progress(
        &self,
        edge: &str,
        phase: &str,
        fence: Option<i64>,
        done: i64,
        total: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql(&format!(
            "UPDATE resyncs SET phase = ?, fence = COALESCE(?, fence), done = ?, total = ?,
               updated_ms = {NOW_MS} WHERE edge = ?"
        )))
        .bind(phase)
        .bind(fence)
        .bind(done)
        .bind(total)
        .bind(edge)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Ends a resync: `done` with its result, or `failed` with why.
    pub async fn end_resync(
        &self,
        edge: &str,
        result: Result<&serde_json::Value, &str>,
    ) -> Result<(), StoreError> {
        let (phase, result, error) = match result {
            Ok(r) => ("done", Some(r.to_string()), None),
            Err(e) => ("failed", None, Some(e.to_string())),
        };
        sqlx::query(&self.d.sql(&format!(
            "UPDATE resyncs SET phase = ?, result = COALESCE(?, result), error = ?,
               updated_ms = {NOW_MS}, finished_ms = {NOW_MS} WHERE edge = ?"
        )))
        .bind(phase)
        .bind(result)
        .bind(error)
        .bind(edge)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The edges whose last resync or repair failed.
    pub async fn failed_resyncs(&self) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT edge FROM resyncs WHERE phase = 'failed'")
                .fetch_all(&self.reader)
                .await?,
        )
    }

    pub async fn resync(&self, edge: &str) -> Result<Option<ResyncRow>, StoreError> {
        resync_of(&mut *self.reader.acquire().await?, self.d, edge).await
    }

    /// An edge's resync, drift audit and users needing a password (at most
    /// `limit` listed), as of one moment.
    pub async fn edge_audit(&self, edge: &str, limit: i64) -> Result<EdgeAudit, StoreError> {
        let mut tx = self.snapshot().await?;
        let audit = EdgeAudit {
            resync: resync_of(&mut tx, self.d, edge).await?,
            drift: drift_summary_of(&mut tx, self.d, edge).await?,
            needs_password: needs_password_of(&mut tx, self.d, edge, limit).await?,
        };
        tx.rollback().await?;
        Ok(audit)
    }

    /// The drift audits of `edges` and their differences (filtered by
    /// `kinds` unless empty, and category; at most `limit`), as of one moment.
    pub async fn drift_report(
        &self,
        edges: &[String],
        kinds: &[&str],
        category: Option<&str>,
        limit: i64,
    ) -> Result<DriftReport, StoreError> {
        let mut tx = self.snapshot().await?;
        let mut runs = Vec::with_capacity(edges.len());
        for e in edges {
            runs.push((e.clone(), drift_summary_of(&mut tx, self.d, e).await?));
        }
        let one = match edges {
            [e] => Some(e.as_str()),
            _ => None,
        };
        let rows = drift_rows(&mut tx, self.d, one, kinds, category, limit).await?;
        tx.rollback().await?;
        Ok(DriftReport { runs, rows })
    }

    /// Resyncs a stop left unfinished: (edge, kind, prune).
    pub async fn unfinished_resyncs(&self) -> Result<Vec<(String, String, bool)>, StoreError> {
        let rows: Vec<(String, String, super::dialect::Flag)> =
            sqlx::query_as(&self.d.sql(
                "SELECT edge, kind, prune FROM resyncs WHERE phase NOT IN ('done', 'failed')",
            ))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.into_iter().map(|(e, k, p)| (e, k, p.0)).collect())
    }

    /// After a resync to `fence`: the edge has central's state up to there, so
    /// every op up to the fence is settled there (failures it had are healed).
    pub async fn settle_to_fence(&self, edge: &str, fence: i64) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(&self.d.sql(
            "UPDATE edges SET acked_seq = GREATEST(acked_seq, ?), cursor = GREATEST(cursor, ?) WHERE id = ?",
        ))
        .bind(fence)
        .bind(fence)
        .bind(edge)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&self.d.sql("DELETE FROM deliveries WHERE edge = ? AND seq <= ? AND state IN ('failed', 'operator_skipped', 'timed_out', 'pending')"))
            .bind(edge)
            .bind(fence)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn add_needs_password(
        &self,
        edge: &str,
        users: &[(String, String)],
        since_seq: i64,
    ) -> Result<(), StoreError> {
        for chunk in users.chunks(ROWS) {
            let mut q =
                Sql::new("INSERT INTO needs_password (edge, user_id, user_key, since_seq) ");
            q.values(chunk, |row, (id, key)| {
                row.bind(edge)
                    .bind(id.as_str())
                    .bind(key.as_str())
                    .bind(since_seq);
            });
            q.push(
                " ON CONFLICT (edge, user_id) DO UPDATE SET user_key = excluded.user_key,
                   since_seq = excluded.since_seq",
            );
            let (text, args) = q.finish(self.d)?;
            sqlx::query_with(&text, args).execute(&self.writer).await?;
        }
        Ok(())
    }

    pub async fn needs_password(
        &self,
        edge: &str,
        limit: i64,
    ) -> Result<(i64, Vec<NeedsPasswordRow>), StoreError> {
        let mut tx = self.snapshot().await?;
        let found = needs_password_of(&mut tx, self.d, edge, limit).await?;
        tx.rollback().await?;
        Ok(found)
    }

    /// The oldest `since_seq` of an edge's users needing a password.
    pub async fn needs_password_since(&self, edge: &str) -> Result<Option<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            &self
                .d
                .sql("SELECT MIN(since_seq) FROM needs_password WHERE edge = ?"),
        )
        .bind(edge)
        .fetch_one(&self.reader)
        .await?)
    }

    /// Clears a user's row at an edge once a password set after `since_seq`
    /// was applied there (at or below `through`).
    pub async fn clear_needs_password(
        &self,
        edge: &str,
        user_id: &str,
        seq: i64,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            &self
                .d
                .sql("DELETE FROM needs_password WHERE edge = ? AND user_id = ? AND since_seq < ?"),
        )
        .bind(edge)
        .bind(user_id)
        .bind(seq)
        .execute(&self.writer)
        .await?
        .rows_affected()
            > 0)
    }

    pub async fn begin_drift(&self, edge: &str) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql(&format!(
            "INSERT INTO drift_runs (edge, state, started_ms) VALUES (?, 'running', {NOW_MS})
             ON CONFLICT (edge) DO UPDATE SET state = 'running', error = NULL,
               started_ms = excluded.started_ms, finished_ms = NULL"
        )))
        .bind(edge)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Ends the drift audits a stop of central left running (at start-up,
    /// before any is started); returns how many.
    pub async fn interrupt_drifts(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query(&self.d.sql(&format!(
            "UPDATE drift_runs SET state = 'failed', finished_ms = {NOW_MS},
               error = 'interrupted by a stop of central; run it again'
             WHERE state = 'running'"
        )))
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    pub async fn fail_drift(&self, edge: &str, error: &str) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql(&format!(
            "UPDATE drift_runs SET state = 'failed', error = ?, finished_ms = {NOW_MS} WHERE edge = ?"
        )))
        .bind(error)
        .bind(edge)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Replaces an edge's differences with a run's findings, in one transaction.
    pub async fn record_drift(
        &self,
        edge: &str,
        fence: i64,
        excluded: i64,
        found: &[NewDrift<'_>],
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(&self.d.sql("DELETE FROM drift WHERE edge = ?"))
            .bind(edge)
            .execute(&mut *tx)
            .await?;
        // One row per (kind, key), the last found winning: a statement may
        // not write one row twice (PostgreSQL).
        let mut last: std::collections::HashMap<(&str, &str), usize> =
            std::collections::HashMap::new();
        for (i, d) in found.iter().enumerate() {
            last.insert((d.kind, d.key), i);
        }
        let found: Vec<&NewDrift<'_>> = found
            .iter()
            .enumerate()
            .filter(|(i, d)| last.get(&(d.kind, d.key)) == Some(i))
            .map(|(_, d)| d)
            .collect();
        for chunk in found.chunks(ROWS) {
            let mut q = Sql::new(
                "INSERT INTO drift (edge, kind, key, category, fields, central_id, edge_id) ",
            );
            q.values(chunk, |row, d| {
                row.bind(edge)
                    .bind(d.kind)
                    .bind(d.key)
                    .bind(d.category)
                    .bind(serde_json::to_string(d.fields).expect("strings serialize"))
                    .bind(d.central_id)
                    .bind(d.edge_id);
            });
            q.push(
                " ON CONFLICT (edge, kind, key) DO UPDATE SET category = excluded.category,
                   fields = excluded.fields, central_id = excluded.central_id,
                   edge_id = excluded.edge_id",
            );
            let (text, args) = q.finish(self.d)?;
            sqlx::query_with(&text, args).execute(&mut *tx).await?;
        }
        sqlx::query(&self.d.sql(&format!(
            "UPDATE drift_runs SET state = 'done', fence = ?, excluded = ?, error = NULL,
               finished_ms = {NOW_MS}, found_ms = {NOW_MS} WHERE edge = ?"
        )))
        .bind(fence)
        .bind(excluded)
        .bind(edge)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn drift_run(&self, edge: &str) -> Result<Option<DriftRunRow>, StoreError> {
        drift_run_of(&mut *self.reader.acquire().await?, self.d, edge).await
    }
}

// Reads on one connection, so that a caller can make several of them in one
// transaction.

async fn resync_of(
    c: &mut AnyConnection,
    d: Dialect,
    edge: &str,
) -> Result<Option<ResyncRow>, StoreError> {
    Ok(sqlx::query_as(&d.sql(&format!(
        "SELECT edge, kind, phase, prune, fence, done, total, result, error,
                {} AS started_at, {} AS updated_at,
                CASE WHEN finished_ms IS NULL THEN NULL ELSE {} END AS finished_at
         FROM resyncs WHERE edge = ?",
        iso("started_ms"),
        iso("updated_ms"),
        iso("finished_ms")
    )))
    .bind(edge)
    .fetch_optional(c)
    .await?)
}

async fn drift_run_of(
    c: &mut AnyConnection,
    d: Dialect,
    edge: &str,
) -> Result<Option<DriftRunRow>, StoreError> {
    Ok(sqlx::query_as(&d.sql(&format!(
        "SELECT edge, state, fence, excluded, error, {} AS started_at,
                CASE WHEN finished_ms IS NULL THEN NULL ELSE {} END AS finished_at,
                CASE WHEN found_ms IS NULL THEN NULL ELSE {} END AS found_at
         FROM drift_runs WHERE edge = ?",
        iso("started_ms"),
        iso("finished_ms"),
        iso("found_ms")
    )))
    .bind(edge)
    .fetch_optional(c)
    .await?)
}

async fn drift_summary_of(
    c: &mut AnyConnection,
    d: Dialect,
    edge: &str,
) -> Result<Option<DriftSummary>, StoreError> {
    let Some(run) = drift_run_of(c, d, edge).await? else {
        return Ok(None);
    };
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        &d.sql("SELECT category, kind, COUNT(*) FROM drift WHERE edge = ? GROUP BY category, kind"),
    )
    .bind(edge)
    .fetch_all(&mut *c)
    .await?;
    let mut counts: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (category, kind, n) in rows {
        counts.entry(category).or_default().insert(kind, n);
    }
    let needs_password = needs_password_of(c, d, edge, 0).await?.0;
    Ok(Some(DriftSummary {
        run,
        counts,
        needs_password,
    }))
}

async fn needs_password_of(
    c: &mut AnyConnection,
    d: Dialect,
    edge: &str,
    limit: i64,
) -> Result<(i64, Vec<NeedsPasswordRow>), StoreError> {
    let count = sqlx::query_scalar(&d.sql("SELECT COUNT(*) FROM needs_password WHERE edge = ?"))
        .bind(edge)
        .fetch_one(&mut *c)
        .await?;
    let rows = sqlx::query_as(&d.sql(
        "SELECT user_id, user_key, since_seq FROM needs_password WHERE edge = ?
         ORDER BY user_key LIMIT ?",
    ))
    .bind(edge)
    .bind(limit)
    .fetch_all(c)
    .await?;
    Ok((count, rows))
}

async fn drift_rows(
    c: &mut AnyConnection,
    d: Dialect,
    edge: Option<&str>,
    kinds: &[&str],
    category: Option<&str>,
    limit: i64,
) -> Result<Vec<DriftRow>, StoreError> {
    let mut q = Sql::new(
        "SELECT edge, kind, key, category, fields, central_id, edge_id FROM drift WHERE 1 = 1",
    );
    if let Some(e) = edge {
        q.push(" AND edge = ").bind(e);
    }
    if !kinds.is_empty() {
        q.push(" AND kind IN ").list(kinds.iter().copied());
    }
    if let Some(c) = category {
        q.push(" AND category = ").bind(c);
    }
    q.push(" ORDER BY edge, kind, key LIMIT ").bind(limit);
    let (text, args) = q.finish(d)?;
    Ok(sqlx::query_as_with(&text, args).fetch_all(c).await?)
}
