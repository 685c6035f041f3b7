//! `syncgate oplog`: central's op log, worked on while central is stopped.

use std::path::Path;

use crate::core::{read_secret, Secret};
use crate::store::{dialect_of, has_password, holds_op_log, shown, Dialect, Store};

/// One side of a copy, checked before anything is opened.
fn side(flag: &str, url: &str, password_file: Option<&Path>) -> Result<Option<Secret>, String> {
    let Some(dialect) = dialect_of(url) else {
        return Err(format!(
            "{flag} {}: an op log is a sqlite://FILE or a postgres://USER@HOST:PORT/DB URL",
            shown(url)
        ));
    };
    if dialect == Dialect::Postgres && has_password(url) {
        return Err(format!(
            "{flag} {}: a password in the URL would show wherever the URL does; give it in \
             {flag}-password-file or PGPASSFILE",
            shown(url)
        ));
    }
    let password = read_secret(None, password_file, &format!("{flag}-password-file"))?;
    if dialect == Dialect::Sqlite && password.is_some() {
        return Err(format!("{flag}-password-file is for a postgres:// op log"));
    }
    Ok(password.map(Secret::new))
}

/// Copies the op log at `from` into the database at `to`; the report, or
/// what went wrong (nothing is left half-copied in the target).
pub async fn copy(
    from: &str,
    to: &str,
    from_password_file: Option<&Path>,
    to_password_file: Option<&Path>,
) -> Result<String, String> {
    let from_password = side("--from", from, from_password_file)?;
    let to_password = side("--to", to, to_password_file)?;
    // Nothing is opened for writing (made, migrated) that holds no op log.
    match holds_op_log(from, from_password.as_ref()).await {
        Ok(true) => {}
        Ok(false) => return Err(format!("--from {}: no op log there", shown(from))),
        Err(e) => return Err(format!("--from: {e}")),
    }
    let source = Store::connect(from, from_password.as_ref(), None)
        .await
        .map_err(|e| format!("--from: {e}"))?;
    let target = Store::connect(to, to_password.as_ref(), None)
        .await
        .map_err(|e| format!("--to: {e}"))?;
    let result = source.copy_to(&target).await;
    source.close().await;
    target.close().await;
    let report = result.map_err(|e| format!("the op log was not copied: {e}"))?;
    let mut text = format!(
        "copied the op log of {} into {} (last seq {}):\n",
        shown(from),
        shown(to),
        report.last_seq
    );
    for (table, rows) in &report.tables {
        text.push_str(&format!("  {table}: {rows} rows, the same on both sides\n"));
    }
    text.push_str("start central on the copy (--db) with the same sync and op log keys\n");
    Ok(text)
}
