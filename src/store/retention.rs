//! Op-log retention at central: which old ops every edge has passed, what
//! holds the others back, and their pruning in small batches.
//!
//! What is pruned is always the oldest part of the op log, so the ops kept
//! run without a hole from the first to the last: an edge whose next op is
//! gone is resynced (see `SyncCentral::initial_sync_wanted`), and one whose
//! next op is kept replays from it. The last op is never pruned: the next seq
//! follows it.

use std::time::Duration;

use serde::Serialize;

use super::dialect::Dialect;
use super::{Store, StoreError};

/// In the reason an edge is marked for a resync when ops it had not
/// acknowledged, or that failed there, were pruned while it was expired.
pub const PRUNED_WHILE_EXPIRED: &str = "pruned while this edge was expired";

/// Renders a window as `SG_OLDER`'s argument.
fn older(age: Duration) -> String {
    format!("-{:.3} seconds", age.as_secs_f64())
}

/// What retention may prune now, and why not more.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Retention {
    /// The oldest and newest ops kept (0 and 0: the op log is empty).
    pub first_seq: i64,
    pub last_seq: i64,
    /// The newest op logged before the window (0: none is that old).
    pub old_through: i64,
    /// Ops up to this one may be pruned now (below `first_seq`: none).
    pub prunable_through: i64,
    /// What keeps ops older than the window, lowest first.
    pub pinned_by: Vec<Pin>,
    /// Edges not heard from for longer than the edge expiry: they pin
    /// nothing, and are resynced when they come back.
    pub expired_edges: Vec<String>,
    /// Declared edges never heard from: they pin nothing either (one that
    /// joins after its first op is gone is resynced).
    pub unseen_edges: Vec<String>,
    /// How far each expired edge would have pinned: pruning past it marks
    /// the edge for a resync (what it missed, or failed, is gone).
    #[serde(skip)]
    expired_through: Vec<(String, i64)>,
}

/// One thing that keeps old ops in the op log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pin {
    /// The edge it concerns (none: every edge).
    pub edge: Option<String>,
    /// Ops up to this one may go as far as it is concerned.
    pub through: i64,
    pub why: String,
}

impl Retention {
    /// Pins that keep ops older than the window.
    fn holding(mut self) -> Retention {
        self.pinned_by.sort_by_key(|p| p.through);
        let old = self.old_through;
        self.pinned_by.retain(|p| p.through < old);
        self
    }
}

impl Store {
    /// The ops retention pruned that were each user's latest password
    /// (bodies opened), oldest first.
    pub async fn kept_passwords(&self) -> Result<Vec<super::OpRow>, StoreError> {
        let rows: Vec<super::OpRow> = sqlx::query_as(
            "SELECT seq, op_id, state, method, path, class, kind, created_ids, body,
                    upstream_status, request_id, detail, refs, created_at, logged_at
             FROM kept_passwords ORDER BY seq",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(|r| self.open_row(r)).collect()
    }

    /// What retention with `window` (and `edge_expiry`) may prune now.
    pub async fn retention(
        &self,
        window: Duration,
        edge_expiry: Option<Duration>,
    ) -> Result<Retention, StoreError> {
        let mut conn = self.reader.acquire().await?;
        retention_on(&mut conn, self.d, window, edge_expiry).await
    }

    /// Prunes at most `batch` of the oldest ops that retention with `window`
    /// lets go, with their entity keys and delivery records, in one
    /// transaction (a capture waits for one batch at most). `passwords` are
    /// the ops among them that gave a user a password, by user: each is kept
    /// aside as that user's latest (see `kept_passwords`). Answers how many
    /// ops went.
    pub async fn prune(
        &self,
        window: Duration,
        edge_expiry: Option<Duration>,
        batch: i64,
        passwords: &[(String, i64)],
    ) -> Result<i64, StoreError> {
        let mut tx = self.writer.begin().await?;
        let r = retention_on(&mut tx, self.d, window, edge_expiry).await?;
        let upto = r.prunable_through.min(r.first_seq + batch.max(1) - 1);
        if upto < r.first_seq {
            return Ok(0);
        }
        // An expired edge loses what it has not acknowledged, or what failed
        // there, with these ops: it is resynced when it comes back.
        for (edge, through) in r.expired_through.iter().filter(|(_, t)| *t < upto) {
            let why = format!(
                "ops up to {upto} were {PRUNED_WHILE_EXPIRED} (not heard from for \
                 --edge-expiry); it had acknowledged or applied only through {through}: it is \
                 resynced from central's state"
            );
            // Its watermark comes down to what is known to have landed there:
            // a resync then sets what it missed (a password among it).
            sqlx::query(&self.d.sql(
                "UPDATE edges SET needs_resync = COALESCE(needs_resync, ?),
                                  acked_seq = LEAST(acked_seq, ?)
                 WHERE id = ?",
            ))
            .bind(why)
            .bind(*through)
            .bind(edge)
            .execute(&mut *tx)
            .await?;
        }
        for (user, seq) in passwords
            .iter()
            .filter(|(_, s)| (r.first_seq..=upto).contains(s))
        {
            sqlx::query(&self.d.sql(
                "INSERT INTO kept_passwords (user_id, seq, op_id, state, method, path, class, kind,
                                             created_ids, body, upstream_status, request_id,
                                             detail, refs, created_at, logged_at)
                 SELECT ?, seq, op_id, state, method, path, class, kind, created_ids, body,
                        upstream_status, request_id, detail, refs, created_at, logged_at
                 FROM ops WHERE seq = ?
                 ON CONFLICT (user_id) DO UPDATE SET
                     seq = excluded.seq, op_id = excluded.op_id, state = excluded.state,
                     method = excluded.method, path = excluded.path, class = excluded.class,
                     kind = excluded.kind, created_ids = excluded.created_ids,
                     body = excluded.body, upstream_status = excluded.upstream_status,
                     request_id = excluded.request_id, detail = excluded.detail,
                     refs = excluded.refs, created_at = excluded.created_at,
                     logged_at = excluded.logged_at
                 WHERE excluded.seq > kept_passwords.seq",
            ))
            .bind(user)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        }
        // What the deletes removed outlives them (see `Store::deletes`).
        sqlx::query(&self.d.sql(
            "INSERT INTO tombstones (seq, path, refs)
             SELECT seq, path, refs FROM ops
             WHERE method = 'DELETE' AND state = 'committed' AND seq >= ? AND seq <= ?",
        ))
        .bind(r.first_seq)
        .bind(upto)
        .execute(&mut *tx)
        .await?;
        // Which entities other ops touched outlives them (see
        // `Store::touched_by_another_op`).
        sqlx::query(&self.d.sql(
            "INSERT INTO pruned_keys (key)
             SELECT DISTINCT key FROM op_keys WHERE seq >= ? AND seq <= ?
             ON CONFLICT (key) DO NOTHING",
        ))
        .bind(r.first_seq)
        .bind(upto)
        .execute(&mut *tx)
        .await?;
        for table in ["op_keys", "deliveries"] {
            sqlx::query(
                &self
                    .d
                    .sql(&format!("DELETE FROM {table} WHERE seq >= ? AND seq <= ?")),
            )
            .bind(r.first_seq)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        }
        let pruned = sqlx::query(&self.d.sql("DELETE FROM ops WHERE seq >= ? AND seq <= ?"))
            .bind(r.first_seq)
            .bind(upto)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(pruned as i64)
    }
}

async fn retention_on(
    conn: &mut sqlx::AnyConnection,
    d: Dialect,
    window: Duration,
    edge_expiry: Option<Duration>,
) -> Result<Retention, StoreError> {
    let (first_seq, last_seq): (i64, i64) =
        sqlx::query_as("SELECT COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM ops")
            .fetch_one(&mut *conn)
            .await?;
    // Ops are logged in seq order: the newest one older than the window is
    // at one end of the index on `logged_at`.
    let old_through: i64 = sqlx::query_scalar(&d.sql(
        "SELECT COALESCE((SELECT seq FROM ops WHERE logged_at < SG_OLDER(?)
                          ORDER BY logged_at DESC, seq DESC LIMIT 1), 0)",
    ))
    .bind(older(window))
    .fetch_one(&mut *conn)
    .await?;
    let now_ms: i64 = sqlx::query_scalar(&d.sql("SELECT SG_NOW_MS()"))
        .fetch_one(&mut *conn)
        .await?;
    #[derive(serde::Deserialize)]
    struct EdgeSeen {
        id: String,
        acked_seq: i64,
        last_seen_ms: Option<i64>,
    }
    let page = sqlx::query_scalar(&d.sql(&d.json_rows(
        "SELECT id, acked_seq, last_seen_ms FROM edges",
        &["id", "acked_seq", "last_seen_ms"],
        "t.id",
    )))
    .fetch_one(&mut *conn)
    .await?;
    let edges: Vec<EdgeSeen> = super::sync::rows_of(page)?;
    let mut r = Retention {
        first_seq,
        last_seq,
        old_through,
        ..Retention::default()
    };
    let mut pinning = Vec::new();
    let mut expired = Vec::new();
    for EdgeSeen {
        id: edge,
        acked_seq: acked,
        last_seen_ms: seen_ms,
    } in edges
    {
        let Some(seen_ms) = seen_ms else {
            r.unseen_edges.push(edge);
            continue;
        };
        if edge_expiry.is_some_and(|e| now_ms - seen_ms > e.as_millis() as i64) {
            r.expired_through.push((edge.clone(), acked));
            r.expired_edges.push(edge.clone());
            expired.push(edge);
            continue;
        }
        r.pinned_by.push(Pin {
            edge: Some(edge.clone()),
            through: acked,
            why: format!("acknowledged ops through {acked} only"),
        });
        pinning.push(edge);
    }
    // What an edge shows out of sync stays until it is repaired or re-driven.
    let failed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT edge, MIN(seq) FROM deliveries WHERE state IN ('failed', 'operator_skipped') GROUP BY edge ORDER BY edge",
    )
    .fetch_all(&mut *conn)
    .await?;
    let unresolved: Vec<(String, i64)> = sqlx::query_as(
        "SELECT e.id, MIN(o.seq) FROM ops o CROSS JOIN edges e
         WHERE o.resolution = 'unresolvable'
           AND NOT EXISTS (SELECT 1 FROM resyncs r
                           WHERE r.edge = e.id AND r.phase = 'done' AND r.fence >= o.seq)
         GROUP BY e.id ORDER BY e.id",
    )
    .fetch_all(&mut *conn)
    .await?;
    // An expired edge's records bound how far it can be pruned without a
    // resync (see `Store::prune`).
    let mut expired_at = |edge: &str, through: i64| {
        if let Some(e) = r.expired_through.iter_mut().find(|(e, _)| e == edge) {
            e.1 = e.1.min(through);
        }
    };
    for (edge, seq) in failed.iter().chain(&unresolved) {
        if expired.contains(edge) {
            expired_at(edge, seq - 1);
        }
    }
    for (edge, seq) in failed {
        if pinning.contains(&edge) {
            r.pinned_by.push(Pin {
                edge: Some(edge),
                through: seq - 1,
                why: format!("op {seq} failed there (re-drive it, or repair the edge)"),
            });
        }
    }
    for (edge, seq) in unresolved {
        if pinning.contains(&edge) {
            r.pinned_by.push(Pin {
                edge: Some(edge),
                through: seq - 1,
                why: format!(
                    "op {seq}'s outcome at central is unresolvable and no resync of the edge \
                     has passed it"
                ),
            });
        }
    }
    let resolving: Option<i64> =
        sqlx::query_scalar("SELECT MIN(seq) FROM ops WHERE resolution = 'pending'")
            .fetch_one(&mut *conn)
            .await?;
    if let Some(seq) = resolving {
        r.pinned_by.push(Pin {
            edge: None,
            through: seq - 1,
            why: format!("op {seq}'s outcome at central is still being resolved"),
        });
    }
    r.prunable_through = r
        .pinned_by
        .iter()
        .map(|p| p.through)
        .fold(old_through.min(last_seq - 1), i64::min);
    Ok(r.holding())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "2020-01-01T00:00:00.000Z";

    /// Ops 1 to 10 (3 a delete), 1 to 8 logged long ago, each with an entity
    /// key; edges e1 (acknowledged through 6) and e2 (through 8), both just
    /// heard from.
    async fn op_log() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&super::super::test_url(&dir).await)
            .await
            .unwrap();
        let d = store.d;
        for seq in 1..=10i64 {
            let logged = if seq <= 8 {
                OLD.to_string()
            } else {
                "2999-01-01T00:00:00.000Z".into()
            };
            let (method, path) = match seq {
                3 => ("DELETE", "/v3/groups/g2"),
                _ => ("POST", "/v3/groups"),
            };
            sqlx::query(&d.sql(
                "INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_ids,
                                  created_at, logged_at)
                 VALUES (?, ?, 'committed', ?, ?, 'identity', 'group', '[]', ?, ?)",
            ))
            .bind(seq)
            .bind(format!("op-{seq}"))
            .bind(method)
            .bind(path)
            .bind(&logged)
            .bind(&logged)
            .execute(&store.writer)
            .await
            .unwrap();
            sqlx::query(&d.sql("INSERT INTO op_keys (key, seq, exclusive) VALUES (?, ?, TRUE)"))
                .bind(format!("group:g{seq}"))
                .bind(seq)
                .execute(&store.writer)
                .await
                .unwrap();
        }
        sqlx::query(&d.sql(
            "INSERT INTO edges (id, cursor, acked_seq, first_seen_ms, last_seen_ms)
             VALUES ('e1', 6, 6, SG_NOW_MS(), SG_NOW_MS()), ('e2', 8, 8, SG_NOW_MS(), SG_NOW_MS())",
        ))
        .execute(&store.writer)
        .await
        .unwrap();
        (dir, store)
    }

    async fn run(store: &Store, sql: &str) {
        sqlx::query(&store.d.sql(sql))
            .execute(&store.writer)
            .await
            .unwrap();
    }

    async fn count(store: &Store, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&store.reader)
            .await
            .unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn ops_every_edge_passed_are_pruned_oldest_first_and_what_is_out_of_sync_stays() {
        let (_dir, store) = op_log().await;
        // e1 adopted op 2 (a record that goes with the op); e2's op 4 failed.
        run(
            &store,
            "INSERT INTO deliveries (seq, edge, state, since_ms, updated_ms)
             VALUES (2, 'e1', 'adopted', 0, 0), (4, 'e2', 'failed', 0, 0)",
        )
        .await;
        let r = store.retention(HOUR, None).await.unwrap();
        assert_eq!((r.first_seq, r.last_seq, r.old_through), (1, 10, 8));
        assert_eq!(r.prunable_through, 3, "{r:#?}");
        let shown: Vec<(Option<&str>, i64)> = r
            .pinned_by
            .iter()
            .map(|p| (p.edge.as_deref(), p.through))
            .collect();
        assert_eq!(shown, vec![(Some("e2"), 3), (Some("e1"), 6)], "{r:#?}");
        assert!(r.pinned_by[0].why.contains("op 4 failed"), "{r:#?}");

        // In batches, oldest first, never past what is out of sync.
        assert_eq!(store.prune(HOUR, None, 2, &[]).await.unwrap(), 2);
        assert_eq!(store.prune(HOUR, None, 2, &[]).await.unwrap(), 1);
        assert_eq!(store.prune(HOUR, None, 2, &[]).await.unwrap(), 0);
        assert_eq!(store.first_seq().await.unwrap(), Some(4));
        assert_eq!(count(&store, "op_keys").await, 7, "keys go with their ops");
        // What they touched is still known to be another op's.
        assert!(store.touched_by_another_op("group:g1", 10).await.unwrap());
        assert!(!store.touched_by_another_op("group:g9", 9).await.unwrap());
        assert_eq!(
            count(&store, "deliveries").await,
            1,
            "op 2's record went with it"
        );
        // What the delete removed is still known to a resync.
        let deletes = store.deletes(0, 10, 10).await.unwrap();
        assert_eq!(
            deletes,
            vec![(3, "/v3/groups/g2".to_string(), "[]".to_string())]
        );

        // Repaired: ops up to e1's watermark go; e2's are within the window.
        run(&store, "DELETE FROM deliveries WHERE seq = 4").await;
        assert_eq!(store.prune(HOUR, None, 100, &[]).await.unwrap(), 3);
        assert_eq!(store.first_seq().await.unwrap(), Some(7));

        // An op whose outcome is being resolved holds every op from it.
        run(&store, "UPDATE edges SET acked_seq = 10").await;
        run(
            &store,
            "UPDATE ops SET logged_at = '2020-01-01T00:00:00.000Z', resolution = 'pending',
                            state = 'unknown_outcome' WHERE seq = 9",
        )
        .await;
        run(
            &store,
            "UPDATE ops SET logged_at = '2020-01-01T00:00:00.000Z' WHERE seq = 10",
        )
        .await;
        assert_eq!(store.prune(HOUR, None, 100, &[]).await.unwrap(), 2);
        let r = store.retention(HOUR, None).await.unwrap();
        assert_eq!((r.first_seq, r.prunable_through), (9, 8), "{r:#?}");
        assert_eq!(r.pinned_by.len(), 1, "{r:#?}");
        assert_eq!(r.pinned_by[0].edge, None);

        // Resolved: everything old goes but the last op (the next seq follows it).
        run(
            &store,
            "UPDATE ops SET resolution = 'not_applied' WHERE seq = 9",
        )
        .await;
        assert_eq!(store.prune(HOUR, None, 100, &[]).await.unwrap(), 1);
        assert_eq!(store.prune(HOUR, None, 100, &[]).await.unwrap(), 0);
        assert_eq!(store.first_seq().await.unwrap(), Some(10));
        assert_eq!(store.last_seq().await.unwrap(), 10);
        assert_eq!(count(&store, "op_keys").await, 1);
    }

    async fn needs_resync(store: &Store, edge: &str) -> Option<String> {
        sqlx::query_scalar(&store.d.sql("SELECT needs_resync FROM edges WHERE id = ?"))
            .bind(edge)
            .fetch_one(&store.reader)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn each_users_latest_password_outlives_its_op() {
        let (_dir, store) = op_log().await;
        // Ops 2 and 5 gave ann a password, op 4 gave bob one; op 9 (kept in
        // the op log) is not pruned, so not kept aside.
        let given =
            [("ann", 2), ("bob", 4), ("ann", 5), ("ann", 9)].map(|(u, s)| (u.to_string(), s));
        assert_eq!(store.prune(HOUR, None, 3, &given).await.unwrap(), 3);
        let kept =
            |rows: Vec<crate::store::OpRow>| -> Vec<i64> { rows.iter().map(|r| r.seq).collect() };
        assert_eq!(kept(store.kept_passwords().await.unwrap()), vec![2]);
        assert_eq!(store.prune(HOUR, None, 100, &given).await.unwrap(), 3);
        // ann's latest (5) replaced her earlier one; bob's is his.
        assert_eq!(kept(store.kept_passwords().await.unwrap()), vec![4, 5]);
        // Given again (an older one), it does not replace the latest.
        run(&store, "UPDATE edges SET acked_seq = 10").await;
        run(
            &store,
            "UPDATE ops SET logged_at = '2020-01-01T00:00:00.000Z'",
        )
        .await;
        assert_eq!(
            store
                .prune(HOUR, None, 100, &[("bob".into(), 7)])
                .await
                .unwrap(),
            3
        );
        assert_eq!(kept(store.kept_passwords().await.unwrap()), vec![5, 7]);
    }

    #[tokio::test]
    async fn a_delete_before_an_op_on_its_path_is_found_while_kept() {
        let (_dir, store) = op_log().await;
        assert_eq!(
            store.deleted_before("/v3/groups/g2", 5).await.unwrap(),
            Some(3)
        );
        // Made again since (a create naming its ID), it may have been deleted.
        run(
            &store,
            "UPDATE ops SET created_ids = '[\"g2\"]' WHERE seq = 4",
        )
        .await;
        assert_eq!(
            store.deleted_before("/v3/groups/g2", 5).await.unwrap(),
            None
        );
        run(&store, "UPDATE ops SET created_ids = '[]' WHERE seq = 4").await;
        // A write of unknown outcome since: it may have made it again.
        run(
            &store,
            "UPDATE ops SET state = 'unknown_outcome', resolution = 'unresolvable' WHERE seq = 4",
        )
        .await;
        assert_eq!(
            store.deleted_before("/v3/groups/g2", 5).await.unwrap(),
            None
        );
        run(
            &store,
            "UPDATE ops SET state = 'committed', resolution = NULL WHERE seq = 4",
        )
        .await;
        // Not an entity's own path (a tag, a configuration): never taken.
        assert_eq!(
            store.deleted_before("/v3/groups/g2/x", 5).await.unwrap(),
            None
        );
        assert_eq!(
            store.deleted_before("/v3/groups/g2", 3).await.unwrap(),
            None
        );
        // The last op on a path being a create, nothing was deleted.
        assert_eq!(store.deleted_before("/v3/groups", 9).await.unwrap(), None);
        // Pruned, it is not looked at.
        assert_eq!(store.prune(HOUR, None, 3, &[]).await.unwrap(), 3);
        assert_eq!(
            store.deleted_before("/v3/groups/g2", 5).await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn an_edge_never_heard_from_keeps_no_op() {
        let (_dir, store) = op_log().await;
        run(
            &store,
            "UPDATE edges SET last_seen_ms = NULL WHERE id = 'e1'",
        )
        .await;
        let r = store.retention(HOUR, None).await.unwrap();
        assert_eq!(r.unseen_edges, vec!["e1".to_string()]);
        assert_eq!(r.prunable_through, 8, "{r:#?}");
        assert_eq!(store.prune(HOUR, None, 100, &[]).await.unwrap(), 8);
        // It joins with nothing: its next op is gone, which resyncs it.
        assert_eq!(needs_resync(&store, "e1").await, None);
    }

    /// An op an operator had an edge pass over is out of sync (the site may
    /// differ): kept, as a failed one is, until a repair or a re-drive.
    #[tokio::test]
    async fn an_op_an_operator_skipped_at_an_edge_is_kept() {
        let (_dir, store) = op_log().await;
        run(
            &store,
            "INSERT INTO deliveries (seq, edge, state, since_ms, updated_ms)
             VALUES (3, 'e2', 'operator_skipped', 0, 0)",
        )
        .await;
        let r = store.retention(HOUR, None).await.unwrap();
        assert_eq!(r.prunable_through, 2, "{r:#?}");
        assert_eq!(r.pinned_by[0].edge.as_deref(), Some("e2"), "{r:#?}");
        assert_eq!(store.prune(HOUR, None, 100, &[]).await.unwrap(), 2);
        assert_eq!(store.first_seq().await.unwrap(), Some(3));
        let rows = store
            .out_of_sync(Some("e2"), Duration::from_secs(3600 * 24 * 365), 10)
            .await
            .unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.seq, r.state.as_str()))
                .collect::<Vec<_>>(),
            vec![(3, "operator_skipped")]
        );
    }

    #[tokio::test]
    async fn an_expired_edge_whose_failure_or_unacknowledged_ops_are_pruned_is_resynced() {
        // Acknowledged through 10, but op 4 failed there.
        let (_dir, store) = op_log().await;
        run(
            &store,
            "UPDATE edges SET last_seen_ms = 0, acked_seq = 10 WHERE id = 'e1'",
        )
        .await;
        run(
            &store,
            "INSERT INTO deliveries (seq, edge, state, since_ms, updated_ms)
             VALUES (4, 'e1', 'failed', 0, 0)",
        )
        .await;
        assert_eq!(store.prune(HOUR, Some(HOUR), 100, &[]).await.unwrap(), 8);
        let why = needs_resync(&store, "e1")
            .await
            .expect("marked for a resync");
        assert!(why.contains("pruned while this edge was expired"), "{why}");
        assert_eq!(needs_resync(&store, "e2").await, None, "e2 passed them all");

        // Acknowledged through 10, nothing failed: nothing of it is lost.
        let (_dir, store) = op_log().await;
        run(
            &store,
            "UPDATE edges SET last_seen_ms = 0, acked_seq = 10 WHERE id = 'e1'",
        )
        .await;
        assert_eq!(store.prune(HOUR, Some(HOUR), 100, &[]).await.unwrap(), 8);
        assert_eq!(needs_resync(&store, "e1").await, None);
    }

    #[tokio::test]
    async fn an_edge_not_heard_from_for_the_expiry_keeps_no_op() {
        let (_dir, store) = op_log().await;
        run(&store, "UPDATE edges SET last_seen_ms = 0 WHERE id = 'e1'").await;
        // Without an expiry e1 keeps ops 7 and 8.
        assert_eq!(
            store.retention(HOUR, None).await.unwrap().prunable_through,
            6
        );
        let r = store.retention(HOUR, Some(HOUR)).await.unwrap();
        assert_eq!(r.expired_edges, vec!["e1".to_string()]);
        assert_eq!(r.prunable_through, 8, "{r:#?}");
        assert!(r.pinned_by.is_empty(), "{r:#?}");
        assert_eq!(store.prune(HOUR, Some(HOUR), 100, &[]).await.unwrap(), 8);
        assert_eq!(store.first_seq().await.unwrap(), Some(9));
        // Ops 7 and 8 it had not acknowledged are gone: it is resynced.
        assert!(needs_resync(&store, "e1").await.is_some());
        // Nothing is older than a window of 30 days but the ops gone.
        let r = store.retention(30 * 24 * HOUR, Some(HOUR)).await.unwrap();
        assert_eq!((r.old_through, r.prunable_through), (0, 0));
    }

    #[test]
    fn only_pins_below_the_window_are_shown_lowest_first() {
        let pin = |through| Pin {
            edge: None,
            through,
            why: String::new(),
        };
        let r = Retention {
            old_through: 10,
            pinned_by: vec![pin(12), pin(7), pin(3), pin(10)],
            ..Retention::default()
        }
        .holding();
        let shown: Vec<i64> = r.pinned_by.iter().map(|p| p.through).collect();
        assert_eq!(shown, vec![3, 7]);
    }
}
