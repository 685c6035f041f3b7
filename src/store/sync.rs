//! Sync state SQL at central: entities' natural keys, edges, deliveries.

use serde::Serialize;
use sqlx::FromRow;

use super::{Store, StoreError};
use crate::sync::protocol::{Ack, EntityRef};

/// Milliseconds since the epoch, in SQL.
const NOW_MS: &str = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
/// Renders a millisecond column as ISO 8601.
fn iso(col: &str) -> String {
    format!("strftime('%Y-%m-%dT%H:%M:%fZ', {col} / 1000.0, 'unixepoch')")
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct DeliveryRow {
    pub edge: String,
    pub state: String,
    pub status: Option<i64>,
    pub detail: Option<String>,
    pub since: String,
    pub updated_at: String,
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct EdgeRow {
    pub id: String,
    pub declared: bool,
    pub cursor: i64,
    pub version: Option<String>,
    pub error: Option<String>,
    pub last_seen: Option<String>,
    /// Milliseconds since the edge was last heard from.
    pub silent_ms: Option<i64>,
    pub lag_ops: i64,
    pub lag_seconds: f64,
}

#[derive(Debug, Clone, FromRow, Serialize)]
pub struct OutOfSyncRow {
    pub seq: i64,
    pub op_id: String,
    pub edge: String,
    pub state: String,
    pub kind: String,
    pub method: String,
    pub path: String,
    pub status: Option<i64>,
    pub detail: Option<String>,
    pub updated_at: String,
}

impl Store {
    /// Remembers an entity's natural key.
    pub async fn learn_entity(&self, e: &EntityRef) -> Result<(), StoreError> {
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
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn entity(&self, id: &str) -> Result<Option<EntityRef>, StoreError> {
        let row: Option<(String, String, String, Option<String>)> =
            sqlx::query_as("SELECT id, kind, name, domain_id FROM entities WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(|(id, kind, name, domain_id)| EntityRef {
            id,
            kind,
            name,
            domain_id,
        }))
    }

    /// Registers an edge (declared by configuration or by its hello) and makes
    /// every published op pending for it.
    pub async fn register_edge(&self, id: &str, declared: bool) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO edges (id, declared, first_seen_ms) VALUES (?, ?, {NOW_MS})
             ON CONFLICT (id) DO UPDATE SET declared = MAX(declared, excluded.declared)"
        ))
        .bind(id)
        .bind(declared)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        let published = self.published_seq_in(&mut tx).await?;
        sqlx::query(&format!(
            "INSERT OR IGNORE INTO deliveries (seq, edge, state, since_ms, updated_ms)
             SELECT seq, ?, 'pending', {NOW_MS}, {NOW_MS} FROM ops WHERE seq <= ?"
        ))
        .bind(id)
        .bind(published)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(inserted)
    }

    async fn published_seq_in(&self, tx: &mut sqlx::SqliteConnection) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE((SELECT value FROM meta WHERE key = 'published_seq'), 0)",
        )
        .fetch_one(tx)
        .await?)
    }

    /// The highest seq handed to the broker.
    pub async fn published_seq(&self) -> Result<i64, StoreError> {
        let mut conn = self.writer.acquire().await?;
        self.published_seq_in(&mut conn).await
    }

    /// Records that ops up to `seq` were published: they are pending at every edge.
    pub async fn mark_published(&self, seq: i64) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        let before = self.published_seq_in(&mut tx).await?;
        sqlx::query(&format!(
            "INSERT OR IGNORE INTO deliveries (seq, edge, state, since_ms, updated_ms)
             SELECT ops.seq, edges.id, 'pending', {NOW_MS}, {NOW_MS} FROM ops, edges
             WHERE ops.seq > ? AND ops.seq <= ?"
        ))
        .bind(before)
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('published_seq', ?)
             ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
        )
        .bind(seq)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Updates an edge from its hello.
    pub async fn edge_hello(
        &self,
        id: &str,
        cursor: i64,
        version: &str,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "UPDATE edges SET cursor = ?, version = ?, error = ?, last_seen_ms = {NOW_MS} WHERE id = ?"
        ))
        .bind(cursor)
        .bind(version)
        .bind(error)
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Records an edge's ack; an ack for an op ID that does not match the seq is
    /// ignored. Returns whether a delivery changed.
    pub async fn record_ack(&self, edge: &str, ack: &Ack) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        let changed = sqlx::query(&format!(
            "INSERT INTO deliveries (seq, edge, state, status, detail, since_ms, updated_ms)
             SELECT seq, ?, ?, ?, ?, {NOW_MS}, {NOW_MS} FROM ops WHERE seq = ? AND op_id = ?
             ON CONFLICT (seq, edge) DO UPDATE SET state = excluded.state, status = excluded.status,
                 detail = excluded.detail, updated_ms = excluded.updated_ms"
        ))
        .bind(edge)
        .bind(ack.outcome.as_str())
        .bind(ack.status.map(i64::from))
        .bind(&ack.detail)
        .bind(ack.seq)
        .bind(&ack.op_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if changed {
            sqlx::query(&format!(
                "UPDATE edges SET cursor = MAX(cursor, ?), last_seen_ms = {NOW_MS} WHERE id = ?"
            ))
            .bind(ack.seq)
            .bind(edge)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// Marks deliveries pending for longer than `timeout_ms` as timed out.
    pub async fn sweep_timeouts(&self, timeout_ms: i64) -> Result<u64, StoreError> {
        let detail = format!("no ack within {}s", (timeout_ms as f64 / 1000.0));
        Ok(sqlx::query(&format!(
            "UPDATE deliveries SET state = 'timed_out', detail = ?, updated_ms = {NOW_MS}
             WHERE state = 'pending' AND since_ms < {NOW_MS} - ?"
        ))
        .bind(detail)
        .bind(timeout_ms)
        .execute(&self.writer)
        .await?
        .rows_affected())
    }

    /// Makes one delivery pending again (before a directed redo).
    pub async fn reset_delivery(&self, seq: i64, edge: &str) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "UPDATE deliveries SET state = 'pending', since_ms = {NOW_MS}, updated_ms = {NOW_MS}
             WHERE seq = ? AND edge = ? AND state NOT IN ('applied', 'adopted')"
        ))
        .bind(seq)
        .bind(edge)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn deliveries(&self, seq: i64) -> Result<Vec<DeliveryRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT edge, state, status, detail, {} AS since, {} AS updated_at
             FROM deliveries WHERE seq = ? ORDER BY edge",
            iso("since_ms"),
            iso("updated_ms")
        ))
        .bind(seq)
        .fetch_all(&self.reader)
        .await?)
    }

    pub async fn edges(&self) -> Result<Vec<EdgeRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT e.id, e.declared, e.cursor, e.version, e.error,
                    CASE WHEN e.last_seen_ms IS NULL THEN NULL ELSE {} END AS last_seen,
                    CASE WHEN e.last_seen_ms IS NULL THEN NULL ELSE {NOW_MS} - e.last_seen_ms END AS silent_ms,
                    MAX(0, COALESCE((SELECT MAX(seq) FROM ops), 0) - e.cursor) AS lag_ops,
                    COALESCE((SELECT (julianday('now') - julianday(o.created_at)) * 86400.0
                              FROM ops o WHERE o.seq = e.cursor + 1), 0.0) AS lag_seconds
             FROM edges e ORDER BY e.id",
            iso("e.last_seen_ms")
        ))
        .fetch_all(&self.reader)
        .await?)
    }

    /// Number of deliveries in each state.
    pub async fn delivery_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
                .fetch_all(&self.reader)
                .await?,
        )
    }

    pub async fn out_of_sync(&self, edge: Option<&str>) -> Result<Vec<OutOfSyncRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT d.seq, o.op_id, d.edge, d.state, o.kind, o.method, o.path, d.status, d.detail,
                    {} AS updated_at
             FROM deliveries d JOIN ops o ON o.seq = d.seq
             WHERE d.state IN ('failed', 'timed_out') AND (? IS NULL OR d.edge = ?)
             ORDER BY d.edge, d.seq",
            iso("d.updated_ms")
        ))
        .bind(edge)
        .bind(edge)
        .fetch_all(&self.reader)
        .await?)
    }
}
