//! Resync and drift audit state at central: each edge's latest resync and
//! drift run, the differences found, and the users created without a password.

use serde::Serialize;
use sqlx::{FromRow, QueryBuilder, Sqlite};

use super::{Store, StoreError};

const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
fn iso(col: &str) -> String {
    format!("strftime('%Y-%m-%dT%H:%M:%fZ', {col} / 1000.0, 'unixepoch')")
}
/// Rows per multi-row statement (SQLite binds at most 32766 values).
const ROWS: usize = 500;

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ResyncRow {
    pub edge: String,
    pub kind: String,
    pub phase: String,
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
        sqlx::query(&format!(
            "INSERT INTO resyncs (edge, kind, phase, prune, started_ms, updated_ms)
             VALUES (?, ?, 'starting', ?, {NOW_MS}, {NOW_MS})
             ON CONFLICT (edge) DO UPDATE SET kind = excluded.kind, phase = 'starting',
               prune = excluded.prune, fence = NULL, done = 0, total = 0, result = NULL,
               error = NULL, started_ms = excluded.started_ms, updated_ms = excluded.updated_ms,
               finished_ms = NULL"
        ))
        .bind(edge)
        .bind(kind)
        .bind(prune)
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
        sqlx::query(&format!(
            "UPDATE resyncs SET phase = ?, fence = COALESCE(?, fence), done = ?, total = ?,
               updated_ms = {NOW_MS} WHERE edge = ?"
        ))
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
        sqlx::query(&format!(
            "UPDATE resyncs SET phase = ?, result = COALESCE(?, result), error = ?,
               updated_ms = {NOW_MS}, finished_ms = {NOW_MS} WHERE edge = ?"
        ))
        .bind(phase)
        .bind(result)
        .bind(error)
        .bind(edge)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn resync(&self, edge: &str) -> Result<Option<ResyncRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT edge, kind, phase, prune, fence, done, total, result, error,
                    {} AS started_at, {} AS updated_at,
                    CASE WHEN finished_ms IS NULL THEN NULL ELSE {} END AS finished_at
             FROM resyncs WHERE edge = ?",
            iso("started_ms"),
            iso("updated_ms"),
            iso("finished_ms")
        ))
        .bind(edge)
        .fetch_optional(&self.reader)
        .await?)
    }

    /// Resyncs a stop left unfinished: (edge, kind, prune).
    pub async fn unfinished_resyncs(&self) -> Result<Vec<(String, String, bool)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT edge, kind, prune FROM resyncs WHERE phase NOT IN ('done', 'failed')",
        )
        .fetch_all(&self.reader)
        .await?)
    }

    /// After a resync to `fence`: the edge has central's state up to there, so
    /// every op up to the fence is settled there (failures it had are healed).
    pub async fn settle_to_fence(&self, edge: &str, fence: i64) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "UPDATE edges SET acked_seq = MAX(acked_seq, ?), cursor = MAX(cursor, ?) WHERE id = ?",
        )
        .bind(fence)
        .bind(fence)
        .bind(edge)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM deliveries WHERE edge = ? AND seq <= ? AND state IN ('failed', 'timed_out', 'pending')")
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
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO needs_password (edge, user_id, user_key, since_seq) ",
            );
            q.push_values(chunk, |mut row, (id, key)| {
                row.push_bind(edge)
                    .push_bind(id)
                    .push_bind(key)
                    .push_bind(since_seq);
            });
            q.push(
                " ON CONFLICT (edge, user_id) DO UPDATE SET user_key = excluded.user_key,
                   since_seq = excluded.since_seq",
            );
            q.build().execute(&self.writer).await?;
        }
        Ok(())
    }

    pub async fn needs_password(
        &self,
        edge: &str,
        limit: i64,
    ) -> Result<(i64, Vec<NeedsPasswordRow>), StoreError> {
        let count = sqlx::query_scalar("SELECT COUNT(*) FROM needs_password WHERE edge = ?")
            .bind(edge)
            .fetch_one(&self.reader)
            .await?;
        let rows = sqlx::query_as(
            "SELECT user_id, user_key, since_seq FROM needs_password WHERE edge = ?
             ORDER BY user_key LIMIT ?",
        )
        .bind(edge)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?;
        Ok((count, rows))
    }

    /// The oldest `since_seq` of an edge's users needing a password.
    pub async fn needs_password_since(&self, edge: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT MIN(since_seq) FROM needs_password WHERE edge = ?")
                .bind(edge)
                .fetch_one(&self.reader)
                .await?,
        )
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
            "DELETE FROM needs_password WHERE edge = ? AND user_id = ? AND since_seq < ?",
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
        sqlx::query(&format!(
            "INSERT INTO drift_runs (edge, state, started_ms) VALUES (?, 'running', {NOW_MS})
             ON CONFLICT (edge) DO UPDATE SET state = 'running', error = NULL,
               started_ms = excluded.started_ms, finished_ms = NULL"
        ))
        .bind(edge)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn fail_drift(&self, edge: &str, error: &str) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "UPDATE drift_runs SET state = 'failed', error = ?, finished_ms = {NOW_MS} WHERE edge = ?"
        ))
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
        sqlx::query("DELETE FROM drift WHERE edge = ?")
            .bind(edge)
            .execute(&mut *tx)
            .await?;
        for chunk in found.chunks(ROWS) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT OR REPLACE INTO drift (edge, kind, key, category, fields, central_id, edge_id) ",
            );
            q.push_values(chunk, |mut row, d| {
                row.push_bind(edge)
                    .push_bind(d.kind)
                    .push_bind(d.key)
                    .push_bind(d.category)
                    .push_bind(serde_json::to_string(d.fields).expect("strings serialize"))
                    .push_bind(d.central_id)
                    .push_bind(d.edge_id);
            });
            q.build().execute(&mut *tx).await?;
        }
        sqlx::query(&format!(
            "UPDATE drift_runs SET state = 'done', fence = ?, excluded = ?, error = NULL,
               finished_ms = {NOW_MS} WHERE edge = ?"
        ))
        .bind(fence)
        .bind(excluded)
        .bind(edge)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn drift_run(&self, edge: &str) -> Result<Option<DriftRunRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT edge, state, fence, excluded, error, {} AS started_at,
                    CASE WHEN finished_ms IS NULL THEN NULL ELSE {} END AS finished_at
             FROM drift_runs WHERE edge = ?",
            iso("started_ms"),
            iso("finished_ms")
        ))
        .bind(edge)
        .fetch_optional(&self.reader)
        .await?)
    }

    pub async fn drift(
        &self,
        edge: Option<&str>,
        kind: Option<&str>,
        category: Option<&str>,
        limit: i64,
    ) -> Result<Vec<DriftRow>, StoreError> {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "SELECT edge, kind, key, category, fields, central_id, edge_id FROM drift WHERE 1 = 1",
        );
        if let Some(e) = edge {
            q.push(" AND edge = ").push_bind(e);
        }
        if let Some(k) = kind {
            q.push(" AND kind = ").push_bind(k);
        }
        if let Some(c) = category {
            q.push(" AND category = ").push_bind(c);
        }
        q.push(" ORDER BY edge, kind, key LIMIT ").push_bind(limit);
        Ok(q.build_query_as().fetch_all(&self.reader).await?)
    }

    /// Differences per (edge, kind, category), for metrics.
    pub async fn drift_counts(&self) -> Result<Vec<(String, String, String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT edge, kind, category, COUNT(*) FROM drift GROUP BY edge, kind, category",
        )
        .fetch_all(&self.reader)
        .await?)
    }
}
