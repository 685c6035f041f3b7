//! An edge's SQLite state: cursor, ID map and per-op outcomes. The outcome of
//! an op, the ID map changes it caused and the cursor commit in one transaction.

use sqlx::sqlite::SqlitePoolOptions;
use sqlx::SqlitePool;

use super::StoreError;

/// One op's result at this edge, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutcome {
    pub seq: i64,
    pub op_id: String,
    pub outcome: String,
    pub status: Option<i64>,
    pub detail: Option<String>,
    pub edge_ids: Vec<String>,
}

/// What applying one op changes, committed together.
#[derive(Debug, Default)]
pub struct Commit {
    /// `(central_id, edge_id, kind)` learned.
    pub map_adds: Vec<(String, String, String)>,
    /// Central IDs whose entity was deleted.
    pub map_removes: Vec<String>,
    /// Move the cursor to this op (false when halting on a failure).
    pub advance: bool,
}

fn stored(
    (seq, op_id, outcome, status, detail, ids): (
        i64,
        String,
        String,
        Option<i64>,
        Option<String>,
        String,
    ),
) -> StoredOutcome {
    StoredOutcome {
        seq,
        op_id,
        outcome,
        status,
        detail,
        edge_ids: serde_json::from_str(&ids).unwrap_or_default(),
    }
}

#[derive(Clone)]
pub struct EdgeStore {
    pool: SqlitePool,
}

impl EdgeStore {
    pub async fn open(url: &str) -> Result<EdgeStore, StoreError> {
        let options = super::sqlite_options(url)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                url: url.to_string(),
                source,
            })?;
        sqlx::migrate!("./migrations/edge").run(&pool).await?;
        Ok(EdgeStore { pool })
    }

    pub async fn cursor(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT seq FROM cursor WHERE id = 1")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn mapping(&self, central_id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT edge_id FROM id_map WHERE central_id = ?")
                .bind(central_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// How many central IDs are mapped (kept by triggers: no count of the map).
    pub async fn map_size(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT n FROM counters WHERE name = 'id_map'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    pub async fn outcome(&self, seq: i64) -> Result<Option<StoredOutcome>, StoreError> {
        type Row = (i64, String, String, Option<i64>, Option<String>, String);
        let row: Option<Row> = sqlx::query_as(
            "SELECT seq, op_id, outcome, status, detail, edge_ids FROM outcomes WHERE seq = ?",
        )
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(stored))
    }

    /// Marks an op as being applied, durably, before its write is sent.
    pub async fn mark_inflight(&self, seq: i64, op_id: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO inflight (seq, op_id, started_at)
             VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             ON CONFLICT (seq) DO UPDATE SET op_id = excluded.op_id",
        )
        .bind(seq)
        .bind(op_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The op ID marked in flight at `seq`, if an earlier attempt left one.
    pub async fn inflight(&self, seq: i64) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT op_id FROM inflight WHERE seq = ?")
                .bind(seq)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    /// The highest seq with a recorded outcome (at least the cursor).
    pub async fn outcomes_through(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT MAX((SELECT seq FROM cursor WHERE id = 1),
                        COALESCE((SELECT MAX(seq) FROM outcomes), 0))",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Outcomes other than `applied` in `(after, through]`, oldest first, at most
    /// `limit`.
    pub async fn exceptions(
        &self,
        after: i64,
        through: i64,
        limit: i64,
    ) -> Result<Vec<StoredOutcome>, StoreError> {
        type Row = (i64, String, String, Option<i64>, Option<String>, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, op_id, outcome, status, detail, edge_ids FROM outcomes
             WHERE outcome != 'applied' AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(through)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(stored).collect())
    }

    /// Records an op's outcome with its ID map changes and cursor, atomically.
    pub async fn commit(
        &self,
        outcome: &StoredOutcome,
        changes: &Commit,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO outcomes (seq, op_id, outcome, status, detail, edge_ids, applied_at)
             VALUES (?, ?, ?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
             ON CONFLICT (seq) DO UPDATE SET op_id = excluded.op_id, outcome = excluded.outcome,
                 status = excluded.status, detail = excluded.detail, edge_ids = excluded.edge_ids,
                 applied_at = excluded.applied_at",
        )
        .bind(outcome.seq)
        .bind(&outcome.op_id)
        .bind(&outcome.outcome)
        .bind(outcome.status)
        .bind(&outcome.detail)
        .bind(serde_json::to_string(&outcome.edge_ids).expect("strings serialize"))
        .execute(&mut *tx)
        .await?;
        for (central, edge, kind) in &changes.map_adds {
            sqlx::query(
                "INSERT INTO id_map (central_id, edge_id, kind, updated_at)
                 VALUES (?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
                 ON CONFLICT (central_id) DO UPDATE SET edge_id = excluded.edge_id, kind = excluded.kind,
                     updated_at = excluded.updated_at",
            )
            .bind(central)
            .bind(edge)
            .bind(kind)
            .execute(&mut *tx)
            .await?;
        }
        for central in &changes.map_removes {
            sqlx::query("DELETE FROM id_map WHERE central_id = ?")
                .bind(central)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM inflight WHERE seq = ?")
            .bind(outcome.seq)
            .execute(&mut *tx)
            .await?;
        if changes.advance {
            sqlx::query("UPDATE cursor SET seq = MAX(seq, ?) WHERE id = 1")
                .bind(outcome.seq)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn check(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edge database of the previous version (migration 0001 only) opens
    /// with its cursor, ID map and outcomes, and answers for its exceptions.
    #[tokio::test]
    async fn an_edge_database_of_the_previous_version_keeps_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("e.db").display());
        let pool = super::super::database_at_version(&dir, &url, "edge", &["0001_edge.sql"]).await;
        sqlx::query(
            "UPDATE cursor SET seq = 2;
             INSERT INTO id_map VALUES ('c1', 'e1', 'user', 'now');
             INSERT INTO outcomes VALUES (1, 'o1', 'applied', 201, NULL, '[]', 'now'),
                                         (2, 'o2', 'failed', 400, 'bad', '[]', 'now');",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let store = EdgeStore::open(&url).await.unwrap();
        assert_eq!(store.cursor().await.unwrap(), 2);
        assert_eq!(store.mapping("c1").await.unwrap().as_deref(), Some("e1"));
        assert_eq!(
            store.map_size().await.unwrap(),
            1,
            "the count starts from the map"
        );
        assert_eq!(store.outcomes_through().await.unwrap(), 2);
        let exceptions = store.exceptions(0, 2, 10).await.unwrap();
        assert_eq!(exceptions.len(), 1);
        assert_eq!(
            (exceptions[0].seq, exceptions[0].outcome.as_str()),
            (2, "failed")
        );
        assert_eq!(store.inflight(3).await.unwrap(), None);
    }

    #[tokio::test]
    async fn outcome_map_and_cursor_commit_together() {
        let dir = tempfile::tempdir().unwrap();
        let store = EdgeStore::open(&format!("sqlite://{}", dir.path().join("e.db").display()))
            .await
            .unwrap();
        assert_eq!(store.cursor().await.unwrap(), 0);
        let outcome = StoredOutcome {
            seq: 1,
            op_id: "o1".into(),
            outcome: "applied".into(),
            status: Some(201),
            detail: None,
            edge_ids: vec!["e1".into()],
        };
        let changes = Commit {
            map_adds: vec![("c1".into(), "e1".into(), "user".into())],
            map_removes: vec![],
            advance: true,
        };
        store.commit(&outcome, &changes).await.unwrap();
        // Mapping the same central ID again changes the mapping, not the size.
        store.commit(&outcome, &changes).await.unwrap();
        assert_eq!(store.map_size().await.unwrap(), 1);
        assert_eq!(store.cursor().await.unwrap(), 1);
        assert_eq!(store.mapping("c1").await.unwrap().as_deref(), Some("e1"));
        assert_eq!(store.outcome(1).await.unwrap(), Some(outcome.clone()));
        let delete = StoredOutcome {
            seq: 2,
            op_id: "o2".into(),
            edge_ids: vec![],
            ..outcome
        };
        let changes = Commit {
            map_adds: vec![],
            map_removes: vec!["c1".into()],
            advance: false,
        };
        store.commit(&delete, &changes).await.unwrap();
        assert_eq!(store.cursor().await.unwrap(), 1, "not advanced");
        assert_eq!(store.map_size().await.unwrap(), 0);
    }
}
