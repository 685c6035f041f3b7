//! Sync state SQL at central: entities' natural keys, edges, deliveries.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::dialect::Dialect;
use super::{Store, StoreError};
use crate::protocol::messages::{Ack, EntityRef, Outcome};

/// The process holding an edge's ID as central last recorded it.
#[derive(Debug, Clone)]
pub struct EdgeSession {
    pub edge: String,
    /// 0: none (an edge of protocol 1, or none seen yet).
    pub session: u64,
    /// Why the edge must be resynced before it applies ops.
    pub needs_resync: Option<String>,
    /// The lease it asked for.
    pub lease_ms: Option<u64>,
}

/// Milliseconds since the epoch, in SQL.
const NOW_MS: &str = "SG_NOW_MS()";
/// Renders a millisecond column as ISO 8601.
fn iso(col: &str) -> String {
    format!("SG_ISO_MS({col})")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DeliveryRow {
    pub edge: String,
    pub state: String,
    pub status: Option<i64>,
    pub detail: Option<String>,
    pub since: Option<String>,
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct EdgeRow {
    pub id: String,
    #[serde(deserialize_with = "super::dialect::flag")]
    pub declared: bool,
    pub cursor: i64,
    /// Every op at or below this has a known outcome at the edge.
    pub acked_seq: i64,
    pub version: Option<String>,
    pub error: Option<String>,
    pub last_seen: Option<String>,
    /// Milliseconds since the edge was last heard from.
    pub silent_ms: Option<i64>,
    pub lag_ops: i64,
    pub lag_seconds: f64,
    /// The control protocol of the process holding the edge's ID.
    pub protocol: Option<i64>,
    /// Why the edge must be resynced before it applies ops again.
    pub needs_resync: Option<String>,
    /// The edge's clock less central's, as last measured.
    pub clock_skew_ms: Option<i64>,
    /// Its scope as central last served it (None: everything).
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    pub updated_at: Option<String>,
    /// The op's body, to scrub its secrets from `detail`; never shown (read
    /// apart from the page, for failed deliveries).
    #[serde(skip)]
    pub body: Option<String>,
}

impl Store {
    /// Remembers an entity's natural key.
    pub async fn learn_entity(&self, e: &EntityRef) -> Result<(), StoreError> {
        self.batcher
            .submit(super::batch::Work::Learn(e.clone()))
            .await?;
        Ok(())
    }

    pub async fn entity(&self, id: &str) -> Result<Option<EntityRef>, StoreError> {
        let row: Option<(String, String, String, Option<String>)> = sqlx::query_as(
            &self
                .d
                .sql("SELECT id, kind, name, domain_id FROM entities WHERE id = ?"),
        )
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

    /// Registers an edge (declared by configuration, or by its hello). Nothing
    /// is backfilled: an edge's deliveries follow from its watermark.
    pub async fn register_edge(&self, id: &str, declared: bool) -> Result<bool, StoreError> {
        Ok(sqlx::query(&self.d.sql(&format!(
            "INSERT INTO edges (id, declared, first_seen_ms) VALUES (?, ?, {NOW_MS})
             ON CONFLICT (id) DO UPDATE SET declared = GREATEST(edges.declared, excluded.declared)"
        )))
        .bind(id)
        .bind(declared)
        .execute(&self.writer)
        .await?
        .rows_affected()
            > 0)
    }

    /// The highest seq handed to the broker.
    pub async fn published_seq(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            &self
                .d
                .sql("SELECT COALESCE((SELECT value FROM meta WHERE key = 'published_seq'), 0)"),
        )
        .fetch_one(&self.writer)
        .await?)
    }

    /// Records that ops up to `seq` were published.
    pub async fn mark_published(&self, seq: i64) -> Result<(), StoreError> {
        // With the captures' writes: it never costs a transaction of its own.
        self.batcher
            .submit(super::batch::Work::Published(seq))
            .await?;
        Ok(())
    }

    /// Draws central's session number for this start (see
    /// `protocol::control`): higher than any drawn before, kept before use.
    pub async fn next_session(&self) -> Result<u64, StoreError> {
        let last: Option<i64> =
            sqlx::query_scalar(&self.d.sql("SELECT value FROM meta WHERE key = 'session'"))
                .fetch_optional(&self.writer)
                .await?;
        let next = crate::protocol::control::next_session(last.unwrap_or(0).max(0) as u64);
        let kept = sqlx::query(&self.d.sql(
            "INSERT INTO meta (key, value) VALUES ('session', ?)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        ))
        .bind(next as i64)
        .execute(&self.writer)
        .await;
        if let Err(e) = kept {
            // Still higher than any before (it is at least the clock); the
            // next start draws one higher again from its own clock.
            tracing::warn!(error = %e, "this start's session number could not be kept");
        }
        Ok(next)
    }

    /// The process holding each edge's ID when central last knew (its
    /// session, lease) and whether the edge needs a resync.
    pub async fn edge_sessions(&self) -> Result<Vec<EdgeSession>, StoreError> {
        let rows: Vec<(String, i64, Option<String>, Option<i64>)> = sqlx::query_as(
            &self
                .d
                .sql("SELECT id, session, needs_resync, lease_ms FROM edges"),
        )
        .fetch_all(&self.writer)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(edge, s, needs_resync, lease)| EdgeSession {
                edge,
                session: s.max(0) as u64,
                needs_resync,
                lease_ms: lease.and_then(|l| u64::try_from(l).ok()),
            })
            .collect())
    }

    /// Why one edge must be resynced before it applies more, if it must
    /// (read as `edge_sessions` reads it, by the writer: what it wrote last).
    pub async fn edge_needs_resync(&self, edge: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar::<_, Option<String>>(
            &self.d.sql("SELECT needs_resync FROM edges WHERE id = ?"),
        )
        .bind(edge)
        .fetch_optional(&self.writer)
        .await?
        .flatten())
    }

    /// Records the session that holds an edge's ID, its protocol and its
    /// database, and `other_database` as why it needs a resync when that
    /// database is not the previous holder's; returns the previous holder's
    /// database and session.
    pub async fn hold_edge(
        &self,
        edge: &str,
        session: u64,
        protocol: u8,
        database: Option<&str>,
        lease: Duration,
        other_database: &str,
    ) -> Result<(Option<String>, Option<u64>), StoreError> {
        let mut tx = self.writer.begin().await?;
        let before: Option<(Option<String>, Option<i64>)> = sqlx::query_as(
            &self
                .d
                .sql("SELECT database, session FROM edges WHERE id = ?"),
        )
        .bind(edge)
        .fetch_optional(&mut *tx)
        .await?;
        // A process on another database than the last holder's is resynced:
        // marked so with the database it replaces, in one transaction, or a
        // failure between the two would leave the new database recorded and
        // the mark lost, and the next hello could not tell any more.
        let before_db = before.as_ref().and_then(|(d, _)| d.as_deref());
        let replaced = matches!((before_db, database), (Some(b), Some(d)) if b != d);
        sqlx::query(&self.d.sql(
            "UPDATE edges SET session = ?, protocol = ?, database = COALESCE(?, database),
               lease_ms = ?, needs_resync = COALESCE(?, needs_resync)
             WHERE id = ?",
        ))
        .bind(session as i64)
        .bind(i64::from(protocol))
        .bind(database)
        .bind(lease.as_millis() as i64)
        .bind(replaced.then_some(other_database))
        .bind(edge)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let (database, session) = before.unwrap_or_default();
        Ok((database, session.and_then(|s| u64::try_from(s).ok())))
    }

    /// Marks an edge as needing a resync before it applies ops again (`None`
    /// clears it: a resync completed).
    pub async fn set_needs_resync(&self, edge: &str, why: Option<&str>) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql("UPDATE edges SET needs_resync = ? WHERE id = ?"))
            .bind(why)
            .bind(edge)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// The scope on record for `edge` (None: everything); None when the
    /// edge is not registered.
    pub async fn edge_scope(&self, edge: &str) -> Result<Option<Option<String>>, StoreError> {
        Ok(
            sqlx::query_scalar(&self.d.sql("SELECT scope FROM edges WHERE id = ?"))
                .bind(edge)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    /// Records the scope central serves `edge` (None: everything) and, when
    /// it is not the one on record for an edge that took ops before, that
    /// the edge needs a resync for it; says whether it changed.
    pub async fn set_edge_scope(
        &self,
        edge: &str,
        scope: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.writer.begin().await?;
        lock_edge(&mut tx, self.d, edge).await?;
        let row: Option<(Option<String>, i64)> =
            sqlx::query_as(&self.d.sql("SELECT scope, cursor FROM edges WHERE id = ?"))
                .bind(edge)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((before, cursor)) = row else {
            return Ok(false);
        };
        if before.as_deref() == scope {
            return Ok(false);
        }
        if cursor > 0 {
            let why = format!(
                "its scope changed from {} to {}: a resync brings what entered it (a resync \
                 with prune also deletes what left it)",
                before.as_deref().unwrap_or("all"),
                scope.unwrap_or("all")
            );
            // A reason on record already (retention's, a lost database's)
            // is kept: the resync it asks for brings the new scope too.
            sqlx::query(
                &self
                    .d
                    .sql("UPDATE edges SET needs_resync = COALESCE(needs_resync, ?) WHERE id = ?"),
            )
            .bind(why)
            .bind(edge)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(&self.d.sql("UPDATE edges SET scope = ? WHERE id = ?"))
            .bind(scope)
            .bind(edge)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(cursor > 0)
    }

    /// Updates an edge from its hello (and its clock's skew from central's,
    /// when known); returns its watermark.
    pub async fn edge_hello(
        &self,
        id: &str,
        cursor: i64,
        version: &str,
        error: Option<&str>,
        skew_ms: Option<i64>,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&self.d.sql(&format!(
            "UPDATE edges SET cursor = ?, version = ?, error = ?, last_seen_ms = {NOW_MS},
                              clock_skew_ms = COALESCE(?, clock_skew_ms)
             WHERE id = ? RETURNING acked_seq"
        )))
        .bind(cursor)
        .bind(version)
        .bind(error)
        .bind(skew_ms)
        .bind(id)
        .fetch_optional(&self.writer)
        .await?
        .unwrap_or(0))
    }

    /// Shows an error on an edge's row (central's own finding about it).
    pub async fn edge_error(&self, id: &str, error: &str) -> Result<(), StoreError> {
        sqlx::query(&self.d.sql("UPDATE edges SET error = ? WHERE id = ?"))
            .bind(error)
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Records an edge's ack (ignored when the op ID does not match the seq).
    /// Returns the edge's watermark after it: below the ack's seq when acks
    /// before it were lost.
    pub async fn record_ack(&self, edge: &str, ack: &Ack) -> Result<Option<i64>, StoreError> {
        let mut tx = self.writer.begin().await?;
        lock_edge(&mut tx, self.d, edge).await?;
        let known: Option<i64> = sqlx::query_scalar(
            &self
                .d
                .sql("SELECT seq FROM ops WHERE seq = ? AND op_id = ?"),
        )
        .bind(ack.seq)
        .bind(&ack.op_id)
        .fetch_optional(&mut *tx)
        .await?;
        if known.is_none() {
            return Ok(None);
        }
        set_exception(&mut tx, self.d, edge, ack).await?;
        let acked: i64 = sqlx::query_scalar(&self.d.sql(&format!(
            "UPDATE edges SET cursor = GREATEST(cursor, ?), last_seen_ms = {NOW_MS},
                 acked_seq = CASE WHEN acked_seq + 1 = ? THEN ? ELSE acked_seq END
             WHERE id = ? RETURNING acked_seq"
        )))
        .bind(ack.seq)
        .bind(ack.seq)
        .bind(ack.seq)
        .bind(edge)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(acked))
    }

    /// Takes an edge's own account of its outcomes in `(after, through]`: the
    /// listed exceptions replace those on record, every other op in the range was
    /// applied, and the watermark moves up to `through`.
    pub async fn record_outcomes(
        &self,
        edge: &str,
        after: i64,
        through: i64,
        exceptions: &[Ack],
        asked_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await?;
        lock_edge(&mut tx, self.d, edge).await?;
        let acked: Option<i64> =
            sqlx::query_scalar(&self.d.sql("SELECT acked_seq FROM edges WHERE id = ?"))
                .bind(edge)
                .fetch_optional(&mut *tx)
                .await?;
        // Only a range that starts at or below the watermark keeps it gap-free.
        if acked.is_none_or(|a| a < after) || through <= after {
            return Ok(());
        }
        // An ack heard after the question was asked is newer than the answer.
        sqlx::query(&self.d.sql(
            "DELETE FROM deliveries WHERE edge = ? AND seq > ? AND seq <= ? AND updated_ms < ?",
        ))
        .bind(edge)
        .bind(after)
        .bind(through)
        .bind(asked_ms)
        .execute(&mut *tx)
        .await?;
        for ack in exceptions
            .iter()
            .filter(|a| a.seq > after && a.seq <= through)
        {
            let matches: Option<i64> = sqlx::query_scalar(&self.d.sql(
                "SELECT seq FROM ops WHERE seq = ? AND op_id = ?
                 AND NOT EXISTS (SELECT 1 FROM deliveries
                                 WHERE seq = ops.seq AND edge = ? AND updated_ms >= ?)",
            ))
            .bind(ack.seq)
            .bind(&ack.op_id)
            .bind(edge)
            .bind(asked_ms)
            .fetch_optional(&mut *tx)
            .await?;
            if matches.is_some() {
                set_exception(&mut tx, self.d, edge, ack).await?;
            }
        }
        sqlx::query(&self.d.sql(
            "UPDATE edges SET acked_seq = GREATEST(acked_seq, ?), cursor = GREATEST(cursor, ?) WHERE id = ?",
        ))
        .bind(through)
        .bind(through)
        .bind(edge)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// One edge's watermark and last reported cursor.
    pub async fn edge_position(&self, edge: &str) -> Result<Option<(i64, i64)>, StoreError> {
        Ok(sqlx::query_as(
            &self
                .d
                .sql("SELECT acked_seq, cursor FROM edges WHERE id = ?"),
        )
        .bind(edge)
        .fetch_optional(&self.reader)
        .await?)
    }

    /// Each edge's delivery state for one op: its exception row, else applied at
    /// or below the edge's watermark, else pending or (after `ack_timeout`) timed out.
    pub async fn deliveries(
        &self,
        seq: i64,
        ack_timeout: Duration,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        let inner = format!(
            "SELECT e.id AS edge,
                    CASE WHEN {UNRESOLVED} THEN 'unresolved'
                         ELSE COALESCE(d.state, CASE WHEN o.seq <= e.acked_seq THEN 'applied'
                                                     WHEN o.logged_at < {OLDER} THEN 'timed_out'
                                                     ELSE 'pending' END) END AS state,
                    d.status,
                    CASE WHEN {UNRESOLVED} THEN o.detail
                         WHEN d.state IS NULL AND o.seq > e.acked_seq AND o.resolution = 'pending'
                         THEN '{RESOLVING}'
                         WHEN d.state IS NULL AND o.seq > e.acked_seq AND o.logged_at < {OLDER}
                         THEN ? ELSE d.detail END AS detail,
                    COALESCE({}, o.logged_at) AS since,
                    COALESCE({}, o.logged_at) AS updated_at
             FROM ops o CROSS JOIN edges e LEFT JOIN deliveries d ON d.seq = o.seq AND d.edge = e.id
             WHERE o.seq = ?",
            iso("d.since_ms"),
            iso("d.updated_ms")
        );
        let text = self.d.json_rows(
            &inner,
            &["edge", "state", "status", "detail", "since", "updated_at"],
            "t.edge",
        );
        let page = sqlx::query_scalar(&self.d.sql(&text))
            .bind(older(ack_timeout))
            .bind(older(ack_timeout))
            .bind(no_ack(ack_timeout))
            .bind(seq)
            .fetch_one(&self.reader)
            .await?;
        rows_of(page)
    }

    pub async fn edges(&self) -> Result<Vec<EdgeRow>, StoreError> {
        self.edge_rows(None).await
    }

    /// One edge's row, as `edges` shows it.
    pub async fn edge(&self, id: &str) -> Result<Option<EdgeRow>, StoreError> {
        Ok(self.edge_rows(Some(id)).await?.pop())
    }

    async fn edge_rows(&self, id: Option<&str>) -> Result<Vec<EdgeRow>, StoreError> {
        // One edge by its key, not a filter a generic plan scans with.
        let only = if id.is_some() { "WHERE e.id = ?" } else { "" };
        let inner = format!(
            "SELECT e.id, e.declared, e.cursor, e.acked_seq, e.version, e.error,
                    e.protocol, e.needs_resync, e.clock_skew_ms, e.scope,
                    CASE WHEN e.last_seen_ms IS NULL THEN NULL ELSE {} END AS last_seen,
                    CASE WHEN e.last_seen_ms IS NULL THEN NULL ELSE {NOW_MS} - e.last_seen_ms END AS silent_ms,
                    GREATEST(0, COALESCE((SELECT MAX(seq) FROM ops), 0) - e.cursor) AS lag_ops,
                    COALESCE((SELECT SG_SECONDS_SINCE(o.created_at)
                              FROM ops o WHERE o.seq = e.cursor + 1), 0.0) AS lag_seconds
             FROM edges e {only}",
            iso("e.last_seen_ms")
        );
        let text = self.d.json_rows(&inner, EDGE_COLUMNS, "t.id");
        let text = self.d.sql(&text);
        let mut query = sqlx::query_scalar(&text);
        if let Some(id) = id {
            query = query.bind(id);
        }
        rows_of(query.fetch_one(&self.reader).await?)
    }

    /// Deliveries pending, failed and timed out over all edges.
    pub async fn delivery_counts(
        &self,
        ack_timeout: Duration,
    ) -> Result<DeliveryCounts, StoreError> {
        let mut total = DeliveryCounts::default();
        for (_, c) in self.edge_delivery_counts(ack_timeout).await? {
            total.pending += c.pending;
            total.failed += c.failed;
            total.timed_out += c.timed_out;
        }
        Ok(total)
    }

    /// Deliveries pending, failed and timed out at each edge, from the
    /// watermarks and the exception rows (index look-ups, no scan of the op log).
    pub async fn edge_delivery_counts(
        &self,
        ack_timeout: Duration,
    ) -> Result<Vec<(String, DeliveryCounts)>, StoreError> {
        let last = self.last_seq().await?;
        let old = self.logged_before(ack_timeout).await?;
        let inner = format!(
            "SELECT e.id, e.acked_seq,
                    (SELECT COUNT(*) FROM deliveries d
                     WHERE d.edge = e.id AND d.seq > e.acked_seq AND d.seq <= ?1)
                    + (SELECT COUNT(*) FROM ops o
                       WHERE o.resolution = 'unresolvable' AND o.seq > e.acked_seq AND o.seq <= ?1
                         AND NOT EXISTS (SELECT 1 FROM deliveries d
                                         WHERE d.seq = o.seq AND d.edge = e.id)) AS early,
                    (SELECT COUNT(*) FROM deliveries d
                     WHERE d.state IN ('failed', 'operator_skipped') AND d.edge = e.id)
                    + (SELECT COUNT(*) FROM ops o
                       WHERE o.resolution = 'unresolvable' AND {UNRESOLVED}) AS failed
             FROM edges e",
        );
        let text = self
            .d
            .json_rows(&inner, &["id", "acked_seq", "early", "failed"], "t.id");
        let page = sqlx::query_scalar(&self.d.sql(&text))
            .bind(old)
            .fetch_one(&self.reader)
            .await?;
        #[derive(Deserialize)]
        struct Row {
            id: String,
            acked_seq: i64,
            early: i64,
            failed: i64,
        }
        let edges: Vec<Row> = rows_of(page)?;
        Ok(edges
            .into_iter()
            .map(|r| {
                let (edge, acked, answered_early, failed) = (r.id, r.acked_seq, r.early, r.failed);
                let counts = DeliveryCounts {
                    failed,
                    timed_out: (old - acked).max(0) - answered_early,
                    pending: last - old.max(acked).min(last),
                };
                (edge, counts)
            })
            .collect())
    }

    /// Every (op, edge) out of sync: `failed`, or `timed_out` (above the edge's
    /// watermark, unanswered for longer than `ack_timeout`), at most `limit`.
    pub async fn out_of_sync(
        &self,
        edge: Option<&str>,
        ack_timeout: Duration,
        limit: i64,
    ) -> Result<Vec<OutOfSyncRow>, StoreError> {
        // The work is bounded by `limit`, not by edges times ops behind: the
        // edges that can have anything out of sync are found from their
        // watermarks and the exception indexes, then read in order, each for
        // at most what is still wanted. Each edge's watermark, failed
        // deliveries and unresolvable ops are read in one statement (one
        // snapshot): an ack that records a failure moves the watermark in the
        // same transaction, and reads apart could see the watermark moved
        // and not the failure.
        let old = self.logged_before(ack_timeout).await?;
        let only = if edge.is_some() { "WHERE e.id = ?" } else { "" };
        let inner = format!(
            "SELECT e.id, e.acked_seq,
                    CASE WHEN EXISTS (SELECT 1 FROM deliveries d
                                      WHERE d.state IN ('failed', 'operator_skipped') AND d.edge = e.id)
                         THEN 1 ELSE 0 END AS failed,
                    CASE WHEN EXISTS (SELECT 1 FROM ops o WHERE {UNRESOLVED})
                         THEN 1 ELSE 0 END AS unresolvable
             FROM edges e {only}"
        );
        let text = self.d.json_rows(
            &inner,
            &["id", "acked_seq", "failed", "unresolvable"],
            "t.id",
        );
        let text = self.d.sql(&text);
        let mut query = sqlx::query_scalar(&text);
        if let Some(edge) = edge {
            query = query.bind(edge);
        }
        #[derive(Deserialize)]
        struct Candidate {
            id: String,
            acked_seq: i64,
            failed: i64,
            unresolvable: i64,
        }
        let candidates: Vec<Candidate> = rows_of(query.fetch_one(&self.reader).await?)?;
        let text = format!(
            "SELECT * FROM (
                 SELECT * FROM (
                     SELECT d.seq, o.op_id, d.edge, d.state, o.kind, o.method, o.path, d.status,
                            d.detail, {} AS updated_at
                     FROM deliveries d JOIN ops o ON o.seq = d.seq
                     WHERE d.state IN ('failed', 'operator_skipped') AND d.edge = ?1
                     ORDER BY d.seq LIMIT ?4) AS failed
                 UNION ALL
                 SELECT * FROM (
                     SELECT o.seq, o.op_id, e.id AS edge, 'timed_out' AS state, o.kind, o.method,
                            o.path, CAST(NULL AS BIGINT) AS status,
                            CASE WHEN o.resolution = 'pending' THEN '{RESOLVING}' ELSE ?2 END
                                AS detail,
                            o.logged_at AS updated_at
                     FROM edges e JOIN ops o ON o.seq > e.acked_seq AND o.seq <= ?5
                     WHERE e.id = ?1 AND o.logged_at < {OLDER_3}
                       AND o.resolution IS DISTINCT FROM 'unresolvable'
                       AND NOT EXISTS (SELECT 1 FROM deliveries d
                                       WHERE d.seq = o.seq AND d.edge = e.id)
                     ORDER BY o.seq LIMIT ?4) AS timed_out
                 UNION ALL
                 SELECT * FROM (
                     SELECT o.seq, o.op_id, e.id AS edge, 'unresolved' AS state, o.kind, o.method,
                            o.path, CAST(NULL AS BIGINT) AS status, o.detail,
                            o.logged_at AS updated_at
                     FROM ops o CROSS JOIN edges e
                     WHERE o.resolution = 'unresolvable' AND {UNRESOLVED} AND e.id = ?1
                     ORDER BY o.seq LIMIT ?4) AS unresolved
             ) AS found ORDER BY seq LIMIT ?4",
            iso("d.updated_ms")
        );
        let text = self.d.json_rows(&text, OUT_OF_SYNC_COLUMNS, "t.seq");
        let sql = self.d.sql(&text);
        let mut rows: Vec<OutOfSyncRow> = Vec::new();
        for c in candidates {
            let (id, acked, failed, unresolvable) = (c.id, c.acked_seq, c.failed, c.unresolvable);
            let wanted = limit - rows.len() as i64;
            if wanted <= 0 {
                break;
            }
            if acked >= old && failed == 0 && unresolvable == 0 {
                continue;
            }
            let found: Vec<OutOfSyncRow> = rows_of(
                sqlx::query_scalar(&sql)
                    .bind(&id)
                    .bind(no_ack(ack_timeout))
                    .bind(older(ack_timeout))
                    .bind(wanted)
                    .bind(old)
                    .fetch_one(&self.reader)
                    .await?,
            )?;
            rows.extend(found);
        }
        // The bodies of the failed ops, to scrub their secrets from what
        // their edges answered, are read apart: a page of a thousand
        // bodies of a megabyte each is no one value the database builds.
        let failed: std::collections::BTreeSet<i64> = rows
            .iter()
            .filter(|r| matches!(r.state.as_str(), "failed" | "operator_skipped"))
            .map(|r| r.seq)
            .collect();
        let mut bodies = std::collections::HashMap::new();
        let failed: Vec<i64> = failed.into_iter().collect();
        for chunk in failed.chunks(500) {
            let mut q = super::dialect::Sql::new("SELECT seq, op_id, body FROM ops WHERE seq IN ");
            q.list(chunk.iter().copied());
            let (text, args) = q.finish(self.d)?;
            let found: Vec<(i64, String, Option<String>)> = sqlx::query_as_with(&text, args)
                .fetch_all(&self.reader)
                .await?;
            for (seq, op_id, body) in found {
                if let Some(body) = body.and_then(|b| self.open_body(&op_id, b).ok()) {
                    bodies.insert(seq, body);
                }
            }
        }
        for r in &mut rows {
            if matches!(r.state.as_str(), "failed" | "operator_skipped") {
                r.body = bodies.get(&r.seq).cloned();
            }
        }
        Ok(rows)
    }

    /// The last op logged longer than `age` ago (0: none). Ops are logged in
    /// seq order (under the head row's lock on PostgreSQL, by the one writer
    /// on SQLite): it is found at one end of the index on `logged_at`, not
    /// by reading every op older than it.
    async fn logged_before(&self, age: Duration) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(&self.d.sql(&format!(
            "SELECT COALESCE((SELECT seq FROM ops WHERE logged_at < {OLDER}
                              ORDER BY logged_at DESC, seq DESC LIMIT 1), 0)"
        )))
        .bind(older(age))
        .fetch_one(&self.reader)
        .await?)
    }
}

/// The columns of `EdgeRow`, as its statement names them.
pub(super) const EDGE_COLUMNS: &[&str] = &[
    "id",
    "declared",
    "cursor",
    "acked_seq",
    "version",
    "error",
    "protocol",
    "needs_resync",
    "clock_skew_ms",
    "last_seen",
    "silent_ms",
    "lag_ops",
    "lag_seconds",
    "scope",
];

/// The columns of `OutOfSyncRow`, as its statement names them.
pub(super) const OUT_OF_SYNC_COLUMNS: &[&str] = &[
    "seq",
    "op_id",
    "edge",
    "state",
    "kind",
    "method",
    "path",
    "status",
    "detail",
    "updated_at",
];

/// The rows of a `Dialect::json_rows` statement's one row. A page that
/// cannot be read whole is an error, never fewer rows.
/// (Neither engine answers NULL for one: an empty page is `[]`.)
pub(super) fn rows_of<T: DeserializeOwned>(page: Option<String>) -> Result<Vec<T>, StoreError> {
    let Some(text) = page else {
        return Err(StoreError::Query(sqlx::Error::Decode(
            "a page of rows read as NULL, not a JSON array".into(),
        )));
    };
    serde_json::from_str(&text).map_err(|e| StoreError::Query(sqlx::Error::Decode(Box::new(e))))
}

/// Counts of deliveries by state, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryCounts {
    pub pending: i64,
    pub failed: i64,
    pub timed_out: i64,
}

/// SQL: the op `o` is unresolvable and no completed resync of edge `e` has
/// brought that edge to central's state past it.
const UNRESOLVED: &str = "o.resolution = 'unresolvable' AND NOT EXISTS (SELECT 1 FROM resyncs r
     WHERE r.edge = e.id AND r.phase = 'done' AND r.fence >= o.seq)";
/// What an op waiting for its outcome to be resolved shows.
/// (Set in SQL between single quotes: no quote in it.)
const RESOLVING: &str = "its outcome at central is being resolved (the central identity \
     service is asked); it and the ops after it wait to be published";

/// SQL for "before now less the bound parameter" on an ISO timestamp column.
const OLDER: &str = "SG_OLDER(?)";
const OLDER_3: &str = "SG_OLDER(?3)";

fn older(age: Duration) -> String {
    format!("-{:.3} seconds", age.as_secs_f64())
}

fn no_ack(ack_timeout: Duration) -> String {
    format!("no ack within {}s", ack_timeout.as_secs_f64())
}

/// Serialises the writes of one edge's outcomes (acks, an edge's own
/// account): SQLite has one writer; on PostgreSQL the edge's row is locked
/// until the transaction ends, so that one never undoes a later other.
async fn lock_edge(tx: &mut sqlx::AnyConnection, d: Dialect, edge: &str) -> Result<(), StoreError> {
    if d == Dialect::Postgres {
        sqlx::query("SELECT 1 FROM edges WHERE id = $1 FOR NO KEY UPDATE")
            .bind(edge)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// Records one ack as the delivery's state: `applied` needs no row.
async fn set_exception(
    tx: &mut sqlx::AnyConnection,
    d: Dialect,
    edge: &str,
    ack: &Ack,
) -> Result<(), StoreError> {
    if ack.outcome == Outcome::Applied {
        sqlx::query(&d.sql("DELETE FROM deliveries WHERE seq = ? AND edge = ?"))
            .bind(ack.seq)
            .bind(edge)
            .execute(&mut *tx)
            .await?;
        return Ok(());
    }
    sqlx::query(&d.sql(&format!(
        "INSERT INTO deliveries (seq, edge, state, status, detail, since_ms, updated_ms)
         VALUES (?, ?, ?, ?, ?, {NOW_MS}, {NOW_MS})
         ON CONFLICT (seq, edge) DO UPDATE SET state = excluded.state, status = excluded.status,
             detail = excluded.detail, updated_ms = excluded.updated_ms"
    )))
    .bind(ack.seq)
    .bind(edge)
    .bind(ack.state())
    .bind(ack.status.map(i64::from))
    .bind(&ack.detail)
    .execute(&mut *tx)
    .await?;
    Ok(())
}
