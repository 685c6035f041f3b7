//! Opening central's op log on either engine: the pools, each connection's
//! settings, and the schema.
//!
//! SQLite: one writer connection (seqs are taken by one writer at a time)
//! and a few read-only ones; WAL with `synchronous=FULL`.
//!
//! PostgreSQL: every connection commits with `synchronous_commit = on` (an op
//! is durable before its client is answered), with TCP keepalives and a user
//! timeout (a vanished peer's locks are released within about 30 s) and an
//! idle-in-transaction timeout. The password comes from a file or
//! `PGPASSFILE`, never from the URL, which is shown in messages with no
//! password and no query. TLS is the URL's `sslmode` (and `sslrootcert`).

use std::time::Duration;

use sqlx::any::AnyConnectOptions;
use sqlx::{AnyPool, Executor};

use super::{pool_options, secure_file, Dialect, StoreError};
use crate::core::Secret;

pub(super) struct Pools {
    pub dialect: Dialect,
    pub writer: AnyPool,
    pub reader: AnyPool,
}

/// Which engine a database URL names (a plain file path is SQLite's, as
/// earlier versions took it).
pub fn dialect_of(url: &str) -> Option<Dialect> {
    let Some((scheme, _)) = url.split_once(':') else {
        // Not a path: a connection string of another kind (`host=.. password=..`).
        let path = !url.is_empty()
            && !url.contains(['=', '@', '?'])
            && !url.chars().any(char::is_whitespace);
        return path.then_some(Dialect::Sqlite);
    };
    match scheme {
        "sqlite" => Some(Dialect::Sqlite),
        "postgres" | "postgresql" => Some(Dialect::Postgres),
        _ => None,
    }
}

/// A SQLite URL as the driver takes it: a plain path gets the scheme.
fn sqlite_url(url: &str) -> String {
    if url.starts_with("sqlite:") {
        url.to_string()
    } else {
        format!("sqlite://{url}")
    }
}

/// A database URL as messages show it: never a password (the userinfo's is
/// masked, the query, which may carry one, left out).
pub fn shown(url: &str) -> String {
    match dialect_of(url) {
        Some(Dialect::Sqlite) => return url.split('?').next().unwrap_or(url).to_string(),
        Some(Dialect::Postgres) => {}
        // What it holds is not known: it is not shown.
        None => return "(not a sqlite:// or postgres:// URL)".into(),
    }
    match reqwest::Url::parse(url) {
        // `postgres:user:pw@db/x` (no `//`) parses with no host, its
        // password in the path: not shown.
        Ok(u) if !u.has_host() => "(a postgres: URL with no host)".into(),
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.set_query(None);
            u.to_string()
        }
        Err(_) => "(a URL that does not parse)".into(),
    }
}

/// Whether a URL carries a password (in its userinfo or its query).
pub fn has_password(url: &str) -> bool {
    reqwest::Url::parse(url)
        .is_ok_and(|u| u.password().is_some() || u.query_pairs().any(|(k, _)| k == "password"))
}

/// Session settings of every PostgreSQL connection (see the module's comment).
pub const PG_SESSION: [(&str, &str); 6] = [
    ("synchronous_commit", "on"),
    ("idle_in_transaction_session_timeout", "15s"),
    ("tcp_keepalives_idle", "10"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
];

pub(super) async fn open(url: &str, password: Option<&Secret>) -> Result<Pools, StoreError> {
    sqlx::any::install_default_drivers();
    let bad = |why: String| StoreError::Url {
        url: shown(url),
        source: sqlx::Error::Configuration(why.into()),
    };
    match dialect_of(url) {
        Some(Dialect::Sqlite) => {
            if password.is_some() {
                return Err(bad("a SQLite op log takes no password".into()));
            }
            open_sqlite(&sqlite_url(url)).await
        }
        Some(Dialect::Postgres) => open_postgres(url, password, None).await,
        None => Err(bad(
            "the op log's URL must start with sqlite:// (one central process) or postgres:// \
             (one or more central processes on a PostgreSQL database)"
                .into(),
        )),
    }
}

/// Whether the database at `url` holds an op log, looked at without
/// changing it (no file made, no schema created): for a command that reads
/// one (`syncgate oplog copy`).
pub async fn holds_op_log(url: &str, password: Option<&Secret>) -> Result<bool, StoreError> {
    use sqlx::Connection;
    let err = |source| StoreError::Open {
        url: shown(url),
        source,
    };
    match dialect_of(url) {
        Some(Dialect::Sqlite) => {
            let url = sqlite_url(url);
            let path = url
                .trim_start_matches("sqlite:")
                .trim_start_matches("//")
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string();
            if !std::path::Path::new(&path).is_file() {
                return Ok(false);
            }
            let options = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .read_only(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&options)
                .await
                .map_err(err)?;
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'ops'",
            )
            .fetch_one(&mut conn)
            .await?;
            let _ = conn.close().await;
            Ok(n > 0)
        }
        Some(Dialect::Postgres) => {
            let mut options: sqlx::postgres::PgConnectOptions = url.parse().map_err(err)?;
            if let Some(p) = password {
                options = options.password(p.expose());
            }
            let mut conn = sqlx::PgConnection::connect_with(&options)
                .await
                .map_err(err)?;
            let found: bool = sqlx::query_scalar("SELECT to_regclass('ops') IS NOT NULL")
                .fetch_one(&mut conn)
                .await?;
            let _ = conn.close().await;
            Ok(found)
        }
        None => Ok(false),
    }
}

/// `url` with one query parameter set (SQLite's open mode).
fn with_mode(url: &str, mode: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let kept: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("mode="))
        .collect();
    let mut out = format!("{base}?mode={mode}");
    for p in kept {
        out.push('&');
        out.push_str(p);
    }
    out
}

async fn open_sqlite(url: &str) -> Result<Pools, StoreError> {
    secure_file(url)?;
    let options = |mode: &str| {
        with_mode(url, mode)
            .parse::<AnyConnectOptions>()
            .map_err(|source| StoreError::Url {
                url: shown(url),
                source,
            })
    };
    let open_err = |source| StoreError::Open {
        url: shown(url),
        source,
    };
    let writer = pool_options()
        .max_connections(1)
        .min_connections(1)
        .after_connect(|conn: &mut sqlx::AnyConnection, _| {
            Box::pin(async move {
                // What is deleted or rewritten (a body sealed anew) is
                // overwritten, not left in free pages.
                for pragma in [
                    "PRAGMA journal_mode = WAL",
                    "PRAGMA synchronous = FULL",
                    "PRAGMA busy_timeout = 10000",
                    "PRAGMA secure_delete = ON",
                    "PRAGMA foreign_keys = ON",
                ] {
                    conn.execute(pragma).await?;
                }
                Ok(())
            })
        })
        .connect_with(options("rwc")?)
        .await
        .map_err(open_err)?;
    sqlx::migrate!("./migrations/central").run(&writer).await?;
    let reader = pool_options()
        .max_connections(4)
        .after_connect(|conn: &mut sqlx::AnyConnection, _| {
            Box::pin(async move {
                conn.execute("PRAGMA busy_timeout = 10000").await?;
                Ok(())
            })
        })
        .connect_with(options("ro")?)
        .await
        .map_err(open_err)?;
    Ok(Pools {
        dialect: Dialect::Sqlite,
        writer,
        reader,
    })
}

/// The lock a central of an earlier version held alone for its life, as
/// the one process on the op log; replicas hold it shared (`Store::join`),
/// so the two never run together, and a central with the embedded broker
/// holds it alone.
pub(super) const SOLE_LOCK: i64 = 0x5359_4e43_534f_4c45;

/// The oldest PostgreSQL the op log runs on: 14 (a batch whose answer was
/// lost ends its session with `pg_terminate_backend(pid, timeout)` before
/// the op log is read).
const OLDEST_SERVER: i32 = 140_000;

/// Refuses a server central cannot run on, with the reason: older than
/// `OLDEST_SERVER`, or where this role cannot make the writer's session
/// functions (`TEMPORARY` on the database).
async fn refuse_an_unfit_server(writer: &AnyPool) -> Result<(), StoreError> {
    let (version, temporary): (String, bool) = sqlx::query_as(
        "SELECT current_setting('server_version_num'),
                has_database_privilege(current_database(), 'TEMPORARY')",
    )
    .fetch_one(writer)
    .await?;
    fit(&version, temporary).map_err(StoreError::Unfit)
}

/// Whether a server of `version` (`server_version_num`) where this role
/// has `TEMPORARY` or not can hold the op log; else why not.
fn fit(version: &str, temporary: bool) -> Result<(), String> {
    match version.trim().parse::<i32>() {
        Ok(v) if v >= OLDEST_SERVER => {}
        _ => {
            return Err(format!(
                "the op log needs PostgreSQL 14 or later; this server's version number is \
                 {version} (server_version_num)"
            ))
        }
    }
    if !temporary {
        return Err(
            "this role lacks the TEMPORARY privilege on the database, which central's writer \
             needs for the functions of its session (GRANT TEMPORARY ON DATABASE ... TO ...)"
                .into(),
        );
    }
    Ok(())
}

/// An earlier version runs alone on its op log, holding `SOLE_LOCK` for its
/// life, and knows no replicas: while it runs, this
/// version's migrations are not applied under it (it could not start again
/// on a schema it does not know).
async fn refuse_beside_an_earlier_version(writer: &AnyPool) -> Result<(), StoreError> {
    let mut conn = writer.acquire().await?;
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock_shared($1)")
        .bind(SOLE_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if free {
        sqlx::query("SELECT pg_advisory_unlock_shared($1)")
            .bind(SOLE_LOCK)
            .execute(&mut *conn)
            .await?;
        return Ok(());
    }
    let replicas_known: bool = sqlx::query_scalar("SELECT to_regclass('replicas') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if replicas_known {
        // Held alone by a central of this version (the embedded broker's):
        // `join` says so, or waits for it to go.
        return Ok(());
    }
    let (holder, since): (Option<String>, Option<String>) =
        sqlx::query_as("SELECT holder, since FROM leader WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    Err(StoreError::Taken {
        holder: holder.unwrap_or_else(|| "unknown".into()),
        since: since.unwrap_or_else(|| "unknown".into()),
    })
}

/// Opens a PostgreSQL op log whose every connection says it does the
/// duties of the leader elected at `epoch` (`SET syncgate.epoch`): the
/// database refuses its writes to the leader's tables once another is
/// elected (migration 0004's `sg_fence`).
pub(super) async fn open_fenced(
    url: &str,
    password: Option<&Secret>,
    epoch: i64,
) -> Result<Pools, StoreError> {
    open_postgres(url, password, Some(epoch)).await
}

async fn open_postgres(
    url: &str,
    password: Option<&Secret>,
    epoch: Option<i64>,
) -> Result<Pools, StoreError> {
    let bad = |why: &str| StoreError::Url {
        url: shown(url),
        source: sqlx::Error::Configuration(why.to_string().into()),
    };
    if has_password(url) {
        return Err(bad(
            "a password in the database URL would show wherever the URL does (process lists, \
             logs): give it in a password file (--db-password-file, or PGPASSFILE)",
        ));
    }
    let mut full = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if let Some(p) = password {
        full.set_password(Some(p.expose()))
            .map_err(|()| bad("this URL cannot carry a password (it names no host)"))?;
    }
    if !full.query_pairs().any(|(k, _)| k == "application_name") {
        full.query_pairs_mut()
            .append_pair("application_name", "syncgate");
    }
    let options: AnyConnectOptions = full.as_str().parse().map_err(|source| StoreError::Url {
        url: shown(url),
        source,
    })?;
    let open_err = |source| StoreError::Open {
        url: shown(url),
        source,
    };
    let pool = |max: u32| {
        pool_options()
            .max_connections(max)
            // A write waits this long for a connection, then fails (the
            // database down or every connection busy).
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn: &mut sqlx::AnyConnection, _| {
                Box::pin(async move {
                    for (name, value) in PG_SESSION {
                        conn.execute(format!("SET {name} = '{value}'").as_str())
                            .await?;
                    }
                    if let Some(epoch) = epoch {
                        conn.execute(format!("SET syncgate.epoch = '{epoch}'").as_str())
                            .await?;
                    }
                    Ok(())
                })
            })
    };
    let writer = pool(4)
        .connect_with(options.clone())
        .await
        .map_err(open_err)?;
    refuse_an_unfit_server(&writer).await?;
    refuse_beside_an_earlier_version(&writer).await?;
    sqlx::migrate!("./migrations/central-postgres")
        .run(&writer)
        .await?;
    // The head never below the last op (ops restored from a dump, say):
    // the next seq taken is always free.
    sqlx::query(
        "UPDATE oplog_head SET seq = GREATEST(seq, (SELECT COALESCE(MAX(seq), 0) FROM ops)) \
         WHERE id = 1",
    )
    .execute(&writer)
    .await?;
    let reader = pool(4).connect_with(options).await.map_err(open_err)?;
    Ok(Pools {
        dialect: Dialect::Postgres,
        writer,
        reader,
    })
}

#[cfg(test)]
mod tests {
    /// PostgreSQL 14 or later, with `TEMPORARY`, and nothing else.
    #[test]
    fn a_server_too_old_or_without_temporary_is_refused_with_the_reason() {
        assert_eq!(super::fit("140000", true), Ok(()));
        assert_eq!(super::fit("170002", true), Ok(()));
        let old = super::fit("130016", true).unwrap_err();
        assert!(
            old.contains("PostgreSQL 14 or later") && old.contains("130016"),
            "{old}"
        );
        assert!(super::fit("", true).is_err());
        let temp = super::fit("150010", false).unwrap_err();
        assert!(temp.contains("TEMPORARY"), "{temp}");
    }

    use super::*;

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            shown("postgres://sync:hunter2@db:5432/oplog?password=x"),
            "postgres://sync:***@db:5432/oplog"
        );
        assert_eq!(
            shown("postgres://sync@db/oplog"),
            "postgres://sync@db/oplog"
        );
        assert!(!shown("postgres://a:b c@").contains("b c"));
        assert_eq!(
            shown("sqlite:///var/lib/x.db?mode=rwc"),
            "sqlite:///var/lib/x.db"
        );
        for other in [
            "host=db user=sync password=hunter2 dbname=oplog",
            "sync:hunter2@db:5432/oplog",
            "mysql://sync:hunter2@db/oplog",
        ] {
            assert!(!shown(other).contains("hunter2"), "{other}");
            assert_eq!(dialect_of(other), None, "{other}");
        }
        for hostless in ["postgres:sync:hunter2@db/x", "postgres:/sync:hunter2@db/x"] {
            assert!(!shown(hostless).contains("hunter2"), "{hostless}");
        }
        assert_eq!(dialect_of("central.db"), Some(Dialect::Sqlite));
    }

    #[test]
    fn the_open_mode_replaces_any_other() {
        assert_eq!(with_mode("sqlite:///x.db", "ro"), "sqlite:///x.db?mode=ro");
        assert_eq!(
            with_mode("sqlite:///x.db?mode=rwc&cache=private", "ro"),
            "sqlite:///x.db?mode=ro&cache=private"
        );
    }
}
