//! An edge's SQLite state: cursor, ID map and per-op outcomes. The outcome of
//! an op, the ID map changes it caused and the cursor commit in one transaction.

use std::collections::HashMap;

use sqlx::{QueryBuilder, Sqlite, SqlitePool};

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

/// An op marked in flight (see `EdgeStore::mark_inflight`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inflight {
    pub op_id: String,
    /// The look-alikes the site held before the op's write was sent.
    pub before: Option<Vec<String>>,
    /// What the write made, once its answer came.
    pub made: Option<Vec<String>>,
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

/// What applying a run of ops changes, committed in one transaction.
#[derive(Debug, Default)]
pub struct Batch {
    pub outcomes: Vec<StoredOutcome>,
    /// The ID map's changes folded in op order: central ID -> `(edge ID, kind)`,
    /// or `None` when its entity was deleted.
    pub map: HashMap<String, Option<(String, String)>>,
    /// Where the cursor moves (when some op in the batch moves it).
    pub cursor: Option<i64>,
    /// Edge IDs whose entity a resync deleted (by the edge's own ID): every
    /// central ID mapped to one goes, so that no later op is sent to it.
    pub deleted_at_edge: Vec<String>,
}

impl Batch {
    /// Adds one op's outcome and changes, after those already in the batch.
    pub fn push(&mut self, outcome: StoredOutcome, changes: Commit) {
        for (central, edge, kind) in changes.map_adds {
            self.map_to(central, edge, kind);
        }
        for central in changes.map_removes {
            self.map.insert(central, None);
        }
        if changes.advance {
            self.cursor = Some(self.cursor.map_or(outcome.seq, |c| c.max(outcome.seq)));
        }
        self.outcomes.retain(|o| o.seq != outcome.seq);
        self.outcomes.push(outcome);
    }

    /// Maps `central` to the edge's entity `edge`. An entity stands for one
    /// of central's (but of a kind that lets look-alikes be, see
    /// `stands_for_one`): another central ID mapped to it (in the batch, or
    /// stored, see `EdgeStore::commit_batch`) no longer is.
    pub fn map_to(&mut self, central: String, edge: String, kind: String) {
        if stands_for_one(&kind) {
            for (other, m) in self.map.iter_mut() {
                if *other != central && m.as_ref().is_some_and(|(e, _)| *e == edge) {
                    *m = None;
                }
            }
        }
        self.map.insert(central, Some((edge, kind)));
    }

    /// The batch's word on a central ID: `Some(None)` when its entity was
    /// deleted by an op of the batch, `None` when the batch does not know it.
    pub fn mapping(&self, central_id: &str) -> Option<Option<String>> {
        self.map
            .get(central_id)
            .map(|m| m.as_ref().map(|(edge, _)| edge.clone()))
    }

    /// The batch's word on an edge ID: `Some(Some(central))` when an op of
    /// the batch mapped it, `None` when the batch does not know it.
    pub fn central_of(&self, edge_id: &str) -> Option<Option<String>> {
        self.map
            .iter()
            .find(|(_, m)| m.as_ref().is_some_and(|(e, _)| e == edge_id))
            .map(|(c, _)| Some(c.clone()))
    }

    pub fn len(&self) -> usize {
        self.outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty() && self.map.is_empty() && self.deleted_at_edge.is_empty()
    }
}

/// Whether an entity of `kind` at the edge stands for one central ID only.
/// Kinds Keystone lets look alike (no unique key) may stand for several: two
/// services of one type and name at central both name the site's one. The
/// index of migration 0006 holds the same list.
pub fn stands_for_one(kind: &str) -> bool {
    !crate::keystone::probe::lets_look_alikes(kind)
}

/// Rows per multi-row statement (well under SQLite's bound-parameter limit).
const ROWS_PER_STATEMENT: usize = 500;

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
        let pool = super::pool_options()
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

    /// Marks an op as being applied, durably, before its write is sent, with
    /// the look-alikes the site held then (see migration 0005), when taken.
    pub async fn mark_inflight(
        &self,
        seq: i64,
        op_id: &str,
        before: Option<&[String]>,
    ) -> Result<(), StoreError> {
        let before = before.map(|b| serde_json::to_string(b).expect("strings serialize"));
        sqlx::query(
            "INSERT INTO inflight (seq, op_id, started_at, before)
             VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?)
             ON CONFLICT (seq) DO UPDATE SET op_id = excluded.op_id,
                 before = COALESCE(excluded.before, inflight.before)",
        )
        .bind(seq)
        .bind(op_id)
        .bind(before)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Notes, durably, what a create marked in flight made at the site.
    pub async fn inflight_made(&self, seq: i64, made: &[String]) -> Result<(), StoreError> {
        sqlx::query("UPDATE inflight SET made = ? WHERE seq = ?")
            .bind(serde_json::to_string(made).expect("strings serialize"))
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// What an earlier attempt at `seq` left marked in flight: its op ID, the
    /// look-alikes the site held before it (when taken), and what it made
    /// (when its answer came).
    pub async fn inflight(&self, seq: i64) -> Result<Option<Inflight>, StoreError> {
        let row: Option<(String, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT op_id, before, made FROM inflight WHERE seq = ?")
                .bind(seq)
                .fetch_optional(&self.pool)
                .await?;
        let list = |v: Option<String>| v.and_then(|b| serde_json::from_str::<Vec<String>>(&b).ok());
        Ok(row.map(|(op_id, before, made)| Inflight {
            op_id,
            before: list(before),
            made: list(made),
        }))
    }

    /// The central ID an edge entity is mapped from, if any.
    pub async fn central_of(&self, edge_id: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT central_id FROM id_map WHERE edge_id = ? LIMIT 1")
                .bind(edge_id)
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
        let mut batch = Batch::default();
        batch.push(
            outcome.clone(),
            Commit {
                map_adds: changes.map_adds.clone(),
                map_removes: changes.map_removes.clone(),
                advance: changes.advance,
            },
        );
        self.commit_batch(&batch).await
    }

    /// Records the outcomes of a run of ops with their ID map changes and the
    /// cursor in one transaction (one sync to disk for all of them).
    pub async fn commit_batch(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() && batch.cursor.is_none() && batch.map.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // First: what the batch maps anew to an ID (none, for a deleted
        // entity) comes after.
        for chunk in batch.deleted_at_edge.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("DELETE FROM id_map WHERE edge_id IN (");
            let mut ids = q.separated(", ");
            for edge in chunk {
                ids.push_bind(edge);
            }
            q.push(")");
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.outcomes.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO outcomes (seq, op_id, outcome, status, detail, edge_ids, applied_at) ",
            );
            q.push_values(chunk, |mut row, o| {
                row.push_bind(o.seq)
                    .push_bind(&o.op_id)
                    .push_bind(&o.outcome)
                    .push_bind(o.status)
                    .push_bind(&o.detail)
                    .push_bind(serde_json::to_string(&o.edge_ids).expect("strings serialize"))
                    .push("strftime('%Y-%m-%dT%H:%M:%fZ', 'now')");
            });
            q.push(
                " ON CONFLICT (seq) DO UPDATE SET op_id = excluded.op_id, outcome = excluded.outcome,
                   status = excluded.status, detail = excluded.detail, edge_ids = excluded.edge_ids,
                   applied_at = excluded.applied_at",
            );
            q.build().execute(&mut *tx).await?;
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("DELETE FROM inflight WHERE seq IN (");
            let mut seqs = q.separated(", ");
            for o in chunk {
                seqs.push_bind(o.seq);
            }
            q.push(")");
            q.build().execute(&mut *tx).await?;
        }
        let adds: Vec<(&String, &String, &String)> = batch
            .map
            .iter()
            .filter_map(|(c, m)| m.as_ref().map(|(e, k)| (c, e, k)))
            .collect();
        for chunk in adds.chunks(ROWS_PER_STATEMENT) {
            // Another central ID mapped to an entity mapped here no longer is
            // (see `Batch::map_to`): every other row naming it goes first.
            let one: Vec<_> = chunk.iter().filter(|(_, _, k)| stands_for_one(k)).collect();
            if !one.is_empty() {
                let mut q: QueryBuilder<Sqlite> =
                    QueryBuilder::new("DELETE FROM id_map WHERE edge_id IN (");
                let mut ids = q.separated(", ");
                for (_, edge, _) in &one {
                    ids.push_bind(*edge);
                }
                q.push(") AND (central_id, edge_id) NOT IN (VALUES ");
                let mut pairs = q.separated(", ");
                for (central, edge, _) in &one {
                    pairs
                        .push("(")
                        .push_bind_unseparated(*central)
                        .push_unseparated(", ")
                        .push_bind_unseparated(*edge)
                        .push_unseparated(")");
                }
                q.push(")");
                q.build().execute(&mut *tx).await?;
            }
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO id_map (central_id, edge_id, kind, updated_at) ");
            q.push_values(chunk, |mut row, (central, edge, kind)| {
                row.push_bind(*central)
                    .push_bind(*edge)
                    .push_bind(*kind)
                    .push("strftime('%Y-%m-%dT%H:%M:%fZ', 'now')");
            });
            q.push(
                " ON CONFLICT (central_id) DO UPDATE SET edge_id = excluded.edge_id,
                   kind = excluded.kind, updated_at = excluded.updated_at",
            );
            q.build().execute(&mut *tx).await?;
        }
        let removes: Vec<&String> = batch
            .map
            .iter()
            .filter(|(_, m)| m.is_none())
            .map(|(c, _)| c)
            .collect();
        for chunk in removes.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("DELETE FROM id_map WHERE central_id IN (");
            let mut ids = q.separated(", ");
            for central in chunk {
                ids.push_bind(*central);
            }
            q.push(")");
            q.build().execute(&mut *tx).await?;
        }
        if let Some(seq) = batch.cursor {
            sqlx::query("UPDATE cursor SET seq = MAX(seq, ?) WHERE id = 1")
                .bind(seq)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// After a resync to central's state at `fence`: the ops at or below it
    /// that failed here are superseded by that state (central shows them
    /// applied; a re-drive re-acknowledges them, never applies them again).
    pub async fn supersede_failures(&self, fence: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE outcomes SET outcome = 'applied', status = NULL,
                 detail = 'superseded by a resync to central''s state at op ' || ?
             WHERE outcome IN ('failed', 'operator_skipped') AND seq <= ?",
        )
        .bind(fence)
        .bind(fence)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The central ID of each mapped edge ID.
    pub async fn reverse_map(&self) -> Result<HashMap<String, String>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT edge_id, central_id FROM id_map")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// This database's own random ID, made when it is first opened: central
    /// tells a process on another database (a lost volume, a second process)
    /// from a restart.
    pub async fn database_id(&self) -> Result<String, StoreError> {
        // Kept as text in a table of integers: one row per 8 hex digits.
        let parts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT key, value FROM meta WHERE key LIKE 'database_id_%' ORDER BY key",
        )
        .fetch_all(&self.pool)
        .await?;
        if parts.len() == 4 {
            return Ok(parts
                .iter()
                .map(|(_, v)| format!("{:08x}", *v as u32))
                .collect());
        }
        let id = uuid::Uuid::new_v4();
        let bytes = id.as_bytes();
        let mut tx = self.pool.begin().await?;
        for i in 0..4 {
            let word = u32::from_be_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("four bytes"));
            sqlx::query(
                "INSERT INTO meta (key, value) VALUES (?, ?)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(format!("database_id_{i}"))
            .bind(i64::from(word))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(id.simple().to_string())
    }

    /// Draws this start's session number (see `protocol::control`): higher
    /// than any drawn before in this database, and kept before it is used.
    pub async fn next_session(&self) -> Result<u64, StoreError> {
        let last: Option<i64> = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'session'")
            .fetch_optional(&self.pool)
            .await?;
        let next = crate::protocol::control::next_session(last.unwrap_or(0).max(0) as u64);
        let kept = sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('session', ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(next as i64)
        .execute(&self.pool)
        .await;
        if let Err(e) = kept {
            // Still higher than any before (it is at least the clock); the
            // next start draws one higher again from its own clock.
            tracing::warn!(error = %e, "this start's session number could not be kept");
        }
        Ok(next)
    }

    pub async fn flag(&self, key: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT value FROM meta WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?
                .unwrap_or(0)
                != 0,
        )
    }

    pub async fn set_flag(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES (?, 1) ON CONFLICT (key) DO UPDATE SET value = 1",
        )
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn clear_flag(&self, key: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM meta WHERE key = ?")
            .bind(key)
            .execute(&self.pool)
            .await?;
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
        assert!(
            !store.flag("initial_sync_done").await.unwrap(),
            "no resync yet"
        );
        let exceptions = store.exceptions(0, 2, 10).await.unwrap();
        assert_eq!(exceptions.len(), 1);
        assert_eq!(
            (exceptions[0].seq, exceptions[0].outcome.as_str()),
            (2, "failed")
        );
        assert_eq!(store.inflight(3).await.unwrap(), None);
    }

    /// An entity at the edge stands for one central ID: a database that maps
    /// two to one entity keeps the newest; mapping another ID to a mapped
    /// entity (stored, or in the same batch) ends the earlier one's claim.
    #[tokio::test]
    async fn an_edge_entity_stands_for_one_central_id() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("e.db").display());
        let done = [
            "0001_edge.sql",
            "0002_exactly_once.sql",
            "0003_counters.sql",
            "0004_resync.sql",
            "0005_inflight_before.sql",
        ];
        let pool = super::super::database_at_version(&dir, &url, "edge", &done).await;
        sqlx::query(
            "INSERT INTO id_map VALUES ('old', 'x', 'project', '2026-01-01T00:00:00.000Z'),
                                       ('new', 'x', 'project', '2026-02-01T00:00:00.000Z'),
                                       ('u1', 'y', 'user', '2026-01-01T00:00:00.000Z');",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let store = EdgeStore::open(&url).await.unwrap();
        assert_eq!(
            store.mapping("old").await.unwrap(),
            None,
            "the older claim ends"
        );
        assert_eq!(store.central_of("x").await.unwrap().as_deref(), Some("new"));
        assert_eq!(store.map_size().await.unwrap(), 2);

        let mut batch = Batch::default();
        batch.map_to("u2".into(), "y".into(), "user".into());
        store.commit_batch(&batch).await.unwrap();
        assert_eq!(store.mapping("u1").await.unwrap(), None);
        assert_eq!(store.central_of("y").await.unwrap().as_deref(), Some("u2"));

        let mut batch = Batch::default();
        batch.map_to("a".into(), "z".into(), "group".into());
        batch.map_to("b".into(), "z".into(), "group".into());
        assert_eq!(batch.central_of("z"), Some(Some("b".to_string())));
        assert_eq!(batch.mapping("a"), Some(None));
        store.commit_batch(&batch).await.unwrap();
        assert_eq!(store.mapping("a").await.unwrap(), None);
        assert_eq!(store.central_of("z").await.unwrap().as_deref(), Some("b"));
        assert_eq!(store.map_size().await.unwrap(), 3);

        // Two entities trading central IDs in one batch, in either order.
        for (first, second) in [(("b", "w"), ("u2", "z")), (("u2", "w"), ("b", "y"))] {
            let mut batch = Batch::default();
            batch.map_to(first.0.into(), first.1.into(), "group".into());
            batch.map_to(second.0.into(), second.1.into(), "group".into());
            store.commit_batch(&batch).await.unwrap();
            assert_eq!(
                store.central_of(first.1).await.unwrap().as_deref(),
                Some(first.0)
            );
            assert_eq!(
                store.central_of(second.1).await.unwrap().as_deref(),
                Some(second.0)
            );
        }

        // A kind that lets look-alikes be: two central services of one type
        // and name both name the site's one.
        let mut batch = Batch::default();
        batch.map_to("s1".into(), "svc".into(), "service".into());
        batch.map_to("s2".into(), "svc".into(), "service".into());
        store.commit_batch(&batch).await.unwrap();
        assert_eq!(store.mapping("s1").await.unwrap().as_deref(), Some("svc"));
        assert_eq!(store.mapping("s2").await.unwrap().as_deref(), Some("svc"));
    }

    /// Migration 0006's index leaves out exactly the kinds that let
    /// look-alikes be (`stands_for_one`).
    #[test]
    fn the_one_per_entity_index_leaves_out_the_kinds_that_let_look_alikes_be() {
        let sql = include_str!("../../migrations/edge/0006_one_central_id_per_entity.sql");
        let index = &sql[sql.find("CREATE UNIQUE INDEX").unwrap()..];
        let listed: std::collections::BTreeSet<&str> = index[index.find('(').unwrap()..]
            .split('\'')
            .skip(1)
            .step_by(2)
            .collect();
        let expected: std::collections::BTreeSet<&str> = crate::keystone::kinds::ALL
            .iter()
            .map(|k| k.name)
            .filter(|k| !stands_for_one(k))
            .collect();
        assert_eq!(listed, expected);
        let delete = &sql[sql.find("DELETE FROM").unwrap()..sql.find("CREATE UNIQUE").unwrap()];
        for kind in &expected {
            assert!(delete.contains(&format!("'{kind}'")), "{kind}");
        }
    }

    /// A batch records each op's outcome once, its ID map changes in op order
    /// (a removal after an add removes; an add after a removal maps again),
    /// and the cursor at the last op that moves it.
    #[tokio::test]
    async fn a_batch_commits_its_ops_in_order_in_one_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = EdgeStore::open(&format!("sqlite://{}", dir.path().join("e.db").display()))
            .await
            .unwrap();
        let outcome = |seq: i64| StoredOutcome {
            seq,
            op_id: format!("o{seq}"),
            outcome: "applied".into(),
            status: Some(201),
            detail: None,
            edge_ids: vec![],
        };
        let add = |c: &str, e: &str| Commit {
            map_adds: vec![(c.into(), e.into(), "user".into())],
            map_removes: vec![],
            advance: true,
        };
        let remove = |c: &str| Commit {
            map_adds: vec![],
            map_removes: vec![c.into()],
            advance: true,
        };
        store.commit(&outcome(1), &add("kept", "e0")).await.unwrap();
        let mut batch = Batch::default();
        batch.push(outcome(2), add("gone", "e1"));
        batch.push(outcome(3), remove("gone"));
        batch.push(outcome(4), remove("kept"));
        batch.push(outcome(5), add("kept", "e2"));
        assert_eq!(batch.mapping("gone"), Some(None));
        assert_eq!(batch.mapping("kept"), Some(Some("e2".into())));
        assert_eq!(batch.mapping("other"), None);
        let mut failed = outcome(6);
        failed.outcome = "failed".into();
        batch.push(
            failed.clone(),
            Commit {
                advance: false,
                ..Commit::default()
            },
        );
        assert_eq!(batch.len(), 5);
        store.commit_batch(&batch).await.unwrap();
        assert_eq!(
            store.cursor().await.unwrap(),
            5,
            "the failed op did not move it"
        );
        assert_eq!(store.mapping("gone").await.unwrap(), None);
        assert_eq!(store.mapping("kept").await.unwrap().as_deref(), Some("e2"));
        assert_eq!(store.map_size().await.unwrap(), 1);
        for seq in 2..=5 {
            assert_eq!(store.outcome(seq).await.unwrap(), Some(outcome(seq)));
        }
        assert_eq!(store.outcome(6).await.unwrap(), Some(failed));
        assert_eq!(store.outcomes_through().await.unwrap(), 6);
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

    /// A resync deletes what only the edge has by the edge's own ID: the
    /// central IDs mapped to it go, the rest stays.
    #[tokio::test]
    async fn an_entity_deleted_by_its_edge_id_takes_its_mappings_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = EdgeStore::open(&format!("sqlite://{}", dir.path().join("e.db").display()))
            .await
            .unwrap();
        let mut batch = Batch::default();
        batch.map_to("c1".into(), "e1".into(), "user".into());
        batch.map_to("c2".into(), "e2".into(), "user".into());
        store.commit_batch(&batch).await.unwrap();
        let deleted = Batch {
            deleted_at_edge: vec!["e1".into()],
            ..Batch::default()
        };
        store.commit_batch(&deleted).await.unwrap();
        assert_eq!(store.mapping("c1").await.unwrap(), None);
        assert_eq!(store.mapping("c2").await.unwrap().as_deref(), Some("e2"));
        assert_eq!(store.map_size().await.unwrap(), 1);
    }
}
