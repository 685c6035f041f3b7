//! Copying central's op log to another database (`syncgate oplog copy`): the
//! way from one central process on SQLite to PostgreSQL. Every table that
//! holds state is copied whole (ops and their keys, open intents, what central
//! knows of entities, edges with their watermarks, sessions and leases,
//! delivery exceptions, resyncs, drift audits and their findings, users
//! needing a password), in one transaction on the target, from one snapshot
//! of the source; a target that already holds an op log is refused, and the
//! rows on both sides are counted afterwards.
//!
//! Request bodies are copied as stored (sealed bodies stay sealed under the
//! same key: the central that opens the copy needs the source's keys).

use std::collections::BTreeMap;
#[cfg(test)]
use std::collections::BTreeSet;

use futures_util::TryStreamExt;
use serde::Serialize;
use sqlx::any::{AnyRow, AnyTypeInfoKind};
use sqlx::{AnyConnection, Row, ValueRef};

use super::dialect::{Dialect, Sql};
use super::{Store, StoreError};

/// The tables copied, parents before children, each with the order its rows
/// are read in.
const TABLES: [(&str, &str); 15] = [
    ("ops", "seq"),
    ("op_keys", "seq, key"),
    ("intents", "created_at, op_id"),
    ("entities", "id"),
    ("edges", "id"),
    ("deliveries", "seq, edge"),
    ("meta", "key"),
    ("resyncs", "edge"),
    ("drift_runs", "edge"),
    ("drift", "edge, kind, key"),
    ("needs_password", "edge, user_id"),
    ("resync_users", "edge, user_id"),
    ("tombstones", "seq"),
    ("kept_passwords", "user_id"),
    ("pruned_keys", "key"),
];

/// Tables whose rows mean the target holds an op log already.
const MUST_BE_EMPTY: [&str; 4] = ["ops", "intents", "edges", "entities"];

/// Rows per insert.
const ROWS: usize = 200;

/// What a copy did: rows per table, equal on both sides.
#[derive(Debug, Clone, Serialize)]
pub struct CopyReport {
    pub tables: BTreeMap<String, i64>,
    pub last_seq: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Bool,
    Float,
    Text,
}

/// One value read from the source.
enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Store {
    /// Copies this op log into `target` (see the module's comment).
    pub async fn copy_to(&self, target: &Store) -> Result<CopyReport, StoreError> {
        let refuse = |why: String| StoreError::Batch(why);
        let mut filled = Vec::new();
        for table in MUST_BE_EMPTY {
            let n = count(&target.reader, table).await?;
            if n > 0 {
                filled.push(format!("{n} rows in {table}"));
            }
        }
        if !filled.is_empty() {
            return Err(refuse(format!(
                "the target already holds an op log ({}): copy only into a new, empty database",
                filled.join(", ")
            )));
        }
        let mut source = self.snapshot().await?;
        let mut into = target.writer.begin().await?;
        // Either side may wait long on the other (a big table): no idle
        // limit ends its transaction meanwhile.
        for (d, conn) in [(self.d, &mut *source), (target.d, &mut *into)] {
            if d == Dialect::Postgres {
                sqlx::query("SET LOCAL idle_in_transaction_session_timeout = 0")
                    .execute(conn)
                    .await?;
            }
        }
        for (table, order) in TABLES {
            let theirs = columns(&mut into, target.d, table).await?;
            let ours = columns(&mut source, self.d, table).await?;
            // Every column copied, but the order of open intents, which the
            // target gives anew in the order read.
            let lost: Vec<&String> = ours
                .keys()
                .filter(|c| !(theirs.contains_key(*c) || table == "intents" && *c == "opened"))
                .collect();
            if !lost.is_empty() {
                return Err(refuse(format!(
                    "table {table}: the target has no column {lost:?}: is it of an older version?"
                )));
            }
            let shared: Vec<(&String, Kind)> = ours
                .keys()
                .filter_map(|c| theirs.get(c).map(|k| (c, *k)))
                .filter(|(c, _)| !(table == "intents" && *c == "opened"))
                .collect();
            let names: Vec<&str> = shared.iter().map(|(c, _)| c.as_str()).collect();
            let list = names.join(", ");
            let order = match (table, self.d) {
                ("intents", Dialect::Sqlite) => "rowid",
                ("intents", Dialect::Postgres) => "opened",
                _ => order,
            };
            let select = format!("SELECT {list} FROM {table} ORDER BY {order}");
            let mut rows = sqlx::query(&select).fetch(&mut *source);
            let mut batch: Vec<Vec<Value>> = Vec::with_capacity(ROWS);
            while let Some(row) = rows.try_next().await? {
                batch.push(values(&row, shared.len())?);
                if batch.len() == ROWS {
                    insert(
                        &mut into,
                        target.d,
                        table,
                        &shared,
                        std::mem::take(&mut batch),
                    )
                    .await?;
                }
            }
            if !batch.is_empty() {
                insert(&mut into, target.d, table, &shared, batch).await?;
            }
        }
        if target.d == Dialect::Postgres {
            sqlx::query("UPDATE oplog_head SET seq = (SELECT COALESCE(MAX(seq), 0) FROM ops)")
                .execute(&mut *into)
                .await?;
        }

        // Counted on both sides before the copy is kept: one that differs
        // leaves nothing behind.
        let mut report = CopyReport {
            tables: BTreeMap::new(),
            last_seq: 0,
        };
        let mut differ = Vec::new();
        for (table, _) in TABLES {
            let ours = count(&mut *source, table).await?;
            let theirs = count(&mut *into, table).await?;
            // The target's own bookkeeping rows in meta are kept beside the copied ones.
            if ours != theirs && !(table == "meta" && theirs >= ours) {
                differ.push(format!("{table}: {ours} here, {theirs} there"));
            }
            report.tables.insert(table.to_string(), theirs);
        }
        let last = |d: Dialect| d.sql("SELECT COALESCE(MAX(seq), 0) FROM ops").into_owned();
        let ours: i64 = sqlx::query_scalar(&last(self.d))
            .fetch_one(&mut *source)
            .await?;
        report.last_seq = sqlx::query_scalar(&last(target.d))
            .fetch_one(&mut *into)
            .await?;
        if ours != report.last_seq {
            differ.push(format!("last seq: {ours} here, {} there", report.last_seq));
        }
        if !differ.is_empty() {
            into.rollback().await?;
            return Err(refuse(format!(
                "the copy would differ from its source ({}); nothing was copied",
                differ.join("; ")
            )));
        }
        into.commit().await?;
        // A read-only snapshot: how it ends changes nothing.
        let _ = source.rollback().await;
        Ok(report)
    }
}

async fn count<'c, E>(conn: E, table: &str) -> Result<i64, StoreError>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    Ok(sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
        .fetch_one(conn)
        .await?)
}

/// A table's columns and what each holds.
async fn columns(
    conn: &mut AnyConnection,
    d: Dialect,
    table: &str,
) -> Result<BTreeMap<String, Kind>, StoreError> {
    let rows: Vec<(String, String)> = match d {
        Dialect::Sqlite => {
            sqlx::query_as("SELECT name, type FROM pragma_table_info(?)")
                .bind(table)
                .fetch_all(&mut *conn)
                .await?
        }
        Dialect::Postgres => {
            sqlx::query_as(
                "SELECT CAST(column_name AS TEXT), CAST(data_type AS TEXT)
                 FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = $1",
            )
            .bind(table)
            .fetch_all(&mut *conn)
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|(name, ty)| {
            let ty = ty.to_ascii_uppercase();
            let kind = if ty.contains("BOOL") {
                Kind::Bool
            } else if ty.contains("INT") {
                Kind::Int
            } else if ty.contains("REAL") || ty.contains("DOUBLE") || ty.contains("FLOAT") {
                Kind::Float
            } else {
                Kind::Text
            };
            (name, kind)
        })
        .collect())
}

fn values(row: &AnyRow, n: usize) -> Result<Vec<Value>, sqlx::Error> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let raw = row.try_get_raw(i)?;
        if raw.is_null() {
            out.push(Value::Null);
            continue;
        }
        let kind = raw.type_info().kind();
        out.push(match kind {
            AnyTypeInfoKind::Bool => Value::Bool(row.try_get(i)?),
            AnyTypeInfoKind::SmallInt | AnyTypeInfoKind::Integer | AnyTypeInfoKind::BigInt => {
                Value::Int(row.try_get(i)?)
            }
            AnyTypeInfoKind::Real | AnyTypeInfoKind::Double => Value::Float(row.try_get(i)?),
            AnyTypeInfoKind::Text => Value::Text(row.try_get(i)?),
            other => {
                return Err(sqlx::Error::Decode(
                    format!(
                        "column {i} holds a {} value, which no table here keeps",
                        other_name(other)
                    )
                    .into(),
                ))
            }
        });
    }
    Ok(out)
}

fn other_name(kind: AnyTypeInfoKind) -> &'static str {
    match kind {
        AnyTypeInfoKind::Blob => "binary",
        AnyTypeInfoKind::Null => "null",
        _ => "other",
    }
}

async fn insert(
    conn: &mut AnyConnection,
    d: Dialect,
    table: &str,
    columns: &[(&String, Kind)],
    rows: Vec<Vec<Value>>,
) -> Result<(), StoreError> {
    let names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
    let mut q = Sql::new(format!("INSERT INTO {table} ({}) ", names.join(", ")));
    q.values(rows, |row, values| {
        for (value, (_, kind)) in values.into_iter().zip(columns) {
            match (value, kind) {
                (Value::Null, Kind::Int) => row.bind(None::<i64>),
                (Value::Null, Kind::Bool) => row.bind(None::<bool>),
                (Value::Null, Kind::Float) => row.bind(None::<f64>),
                (Value::Null, Kind::Text) => row.bind(None::<String>),
                (Value::Int(i), Kind::Bool) => row.bind(i != 0),
                (Value::Bool(b), Kind::Int) => row.bind(i64::from(b)),
                (Value::Bool(b), _) => row.bind(b),
                (Value::Int(i), Kind::Float) => row.bind(i as f64),
                (Value::Int(i), _) => row.bind(i),
                (Value::Float(f), _) => row.bind(f),
                (Value::Text(t), _) => row.bind(t),
            };
        }
    });
    if table == "meta" {
        // The target's own bookkeeping (made when it was opened) gives way.
        q.push(" ON CONFLICT (key) DO UPDATE SET value = excluded.value");
    }
    let (text, args) = q.finish(d)?;
    sqlx::query_with(&text, args).execute(&mut *conn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table of either schema is copied, or is one the target makes
    /// for itself: a table a later migration adds must be named here.
    #[tokio::test]
    async fn every_table_is_copied_or_made_by_the_target() {
        const OWN: [&str; 8] = [
            "health",
            "_sqlx_migrations",
            "oplog_head",
            "leader",
            "replicas",
            // Open intents' keys, on PostgreSQL: a copy's intents have none.
            "intent_keys",
            // The writers' last calls, on PostgreSQL: none runs on a copy.
            "calls",
            "sqlite_sequence",
        ];
        let dir = tempfile::tempdir().unwrap();
        let url = super::super::test_url(&dir).await;
        let store = Store::open(&url).await.unwrap();
        let query = match store.d {
            Dialect::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table'",
            Dialect::Postgres => {
                "SELECT CAST(table_name AS TEXT) FROM information_schema.tables
                 WHERE table_schema = current_schema()"
            }
        };
        let found: BTreeSet<String> = sqlx::query_scalar(query)
            .fetch_all(&store.reader)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let copied: BTreeSet<String> = TABLES.iter().map(|(t, _)| t.to_string()).collect();
        for table in &found {
            assert!(
                copied.contains(table) || OWN.contains(&table.as_str()),
                "table {table} is neither copied nor the target's own"
            );
        }
        for table in &copied {
            assert!(found.contains(table), "{table} is not in the schema");
        }
    }
}
