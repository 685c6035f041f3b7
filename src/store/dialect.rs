//! The two engines central's op log runs on: SQLite (one process, the
//! default) and PostgreSQL (several central processes on one database).
//!
//! Every statement is written once, in SQLite's placeholders (`?`, `?N`) and
//! a few functions of our own that each engine spells its way:
//!
//! | written                 | meaning                                              |
//! |-------------------------|------------------------------------------------------|
//! | `SG_NOW()`              | now, as `2026-01-02T03:04:05.678Z` (text)            |
//! | `SG_NOW_MS()`           | now, in milliseconds since the epoch                 |
//! | `SG_ISO_MS(x)`          | milliseconds `x` as the text `SG_NOW()` writes       |
//! | `SG_OLDER(p)`           | the text time now moved by `p` (`-30.000 seconds`)   |
//! | `SG_SECONDS_SINCE(x)`   | seconds from the text time `x` to now (a float)      |
//! | `GREATEST(..)`/`LEAST(..)` | PostgreSQL's, SQLite's two-argument `MAX`/`MIN`   |
//!
//! Times are kept as text in one format on both engines (it sorts as the
//! time does), and are taken from the database's clock, not a process's:
//! several central processes agree on what is older than an ack timeout.

use std::borrow::Cow;

use sqlx::any::AnyArguments;
use sqlx::{Any, Arguments, Encode, Type};

/// The engine under an op log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

const ISO_SQLITE: &str = "'%Y-%m-%dT%H:%M:%fZ'";
const ISO_PG: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "SQLite",
            Dialect::Postgres => "PostgreSQL",
        }
    }

    /// A statement as this engine takes it.
    pub fn sql(self, text: &str) -> Cow<'_, str> {
        let plain =
            !text.contains("SG_") && !text.contains("GREATEST(") && !text.contains("LEAST(");
        if plain && (self == Dialect::Sqlite || !text.contains('?')) {
            return Cow::Borrowed(text);
        }
        let expanded = self.functions(text);
        Cow::Owned(match self {
            Dialect::Sqlite => expanded,
            Dialect::Postgres => numbered(&expanded),
        })
    }

    /// A statement answering `inner`'s rows as one row: a JSON array of
    /// objects keyed by `columns`, in `order` (over `t.<column>`). A page of
    /// a thousand rows then crosses from the database's thread to the
    /// runtime once, not once per row (each crossing waits for a core when
    /// the machine is busy). Run it through `sql` like any statement.
    pub fn json_rows(self, inner: &str, columns: &[&str], order: &str) -> String {
        let pairs = columns
            .iter()
            .map(|c| format!("'{c}', t.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        match self {
            Dialect::Sqlite => format!(
                "SELECT json_group_array(json_object({pairs}) ORDER BY {order}) FROM ({inner}) AS t"
            ),
            Dialect::Postgres => format!(
                "SELECT CAST(COALESCE(json_agg(json_build_object({pairs}) ORDER BY {order}), \
                 '[]') AS TEXT) FROM ({inner}) AS t"
            ),
        }
    }

    fn functions(self, text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 64);
        let mut rest = text;
        while let Some((at, name)) = next_function(rest) {
            out.push_str(&rest[..at]);
            let open = at + name.len();
            let Some(close) = closing(&rest[open..]).map(|c| open + c) else {
                // Unbalanced: left as written, for the engine to refuse.
                out.push_str(&rest[at..]);
                return out;
            };
            let arg = self.functions(&rest[open + 1..close]);
            out.push_str(&self.expand(name, &arg));
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }

    fn expand(self, name: &str, arg: &str) -> String {
        match (self, name) {
            (Dialect::Sqlite, "SG_NOW") => format!("strftime({ISO_SQLITE}, 'now')"),
            (Dialect::Postgres, "SG_NOW") => {
                format!("to_char(clock_timestamp() AT TIME ZONE 'UTC', {ISO_PG})")
            }
            (Dialect::Sqlite, "SG_NOW_MS") => {
                "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)".into()
            }
            (Dialect::Postgres, "SG_NOW_MS") => {
                "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)".into()
            }
            (Dialect::Sqlite, "SG_ISO_MS") => {
                format!("strftime({ISO_SQLITE}, ({arg}) / 1000.0, 'unixepoch')")
            }
            (Dialect::Postgres, "SG_ISO_MS") => {
                format!("to_char(to_timestamp(({arg}) / 1000.0) AT TIME ZONE 'UTC', {ISO_PG})")
            }
            (Dialect::Sqlite, "SG_OLDER") => format!("strftime({ISO_SQLITE}, 'now', {arg})"),
            (Dialect::Postgres, "SG_OLDER") => format!(
                "to_char((clock_timestamp() + CAST({arg} AS interval)) AT TIME ZONE 'UTC', {ISO_PG})"
            ),
            (Dialect::Sqlite, "SG_SECONDS_SINCE") => {
                format!("((julianday('now') - julianday({arg})) * 86400.0)")
            }
            (Dialect::Postgres, "SG_SECONDS_SINCE") => format!(
                "CAST(EXTRACT(EPOCH FROM clock_timestamp() - CAST({arg} AS timestamptz)) AS DOUBLE PRECISION)"
            ),
            (Dialect::Sqlite, "GREATEST") => format!("MAX({arg})"),
            (Dialect::Sqlite, "LEAST") => format!("MIN({arg})"),
            (_, other) => format!("{other}({arg})"),
        }
    }
}

const FUNCTIONS: [&str; 7] = [
    "SG_NOW_MS",
    "SG_NOW",
    "SG_ISO_MS",
    "SG_OLDER",
    "SG_SECONDS_SINCE",
    "GREATEST",
    "LEAST",
];

/// Where the next of our functions is called (outside quotes), and which.
fn next_function(text: &str) -> Option<(usize, &'static str)> {
    let bytes = text.as_bytes();
    let mut quote = Quote::default();
    for (i, b) in bytes.iter().enumerate() {
        if quote.inside(*b) {
            continue;
        }
        for name in FUNCTIONS {
            if bytes[i..].starts_with(name.as_bytes())
                && bytes.get(i + name.len()) == Some(&b'(')
                && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
            {
                return Some((i, name));
            }
        }
    }
    None
}

/// The offset of the `)` closing the `(` that `text` starts with.
fn closing(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    let mut quote = Quote::default();
    for (i, b) in text.bytes().enumerate() {
        if quote.inside(b) {
            continue;
        }
        match b {
            b'(' => depth += 1,
            b')' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// SQLite's placeholders as PostgreSQL's: `?N` is `$N`, and a bare `?` the
/// next after the highest so far (as SQLite numbers them).
fn numbered(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let mut highest = 0u32;
    let mut quote = Quote::default();
    let mut chars = text.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        // A character beyond ASCII is neither a quote nor a placeholder.
        let inside = c.is_ascii() && quote.inside(c as u8);
        match c {
            '?' if !inside => {
                let mut digits = String::new();
                while let Some((_, d)) = chars.peek().filter(|(_, d)| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let n = match digits.parse::<u32>() {
                    Ok(n) => n,
                    Err(_) => highest + 1,
                };
                highest = highest.max(n);
                out.push('$');
                out.push_str(&n.to_string());
            }
            _ => out.push(c),
        }
    }
    out
}

/// Where a scan of a statement is: inside a string (`'..'`) or a quoted
/// name (`".."`), or neither. (Our statements carry no comments.)
#[derive(Default)]
struct Quote(Option<u8>);

impl Quote {
    /// Takes the next byte; whether it is inside quotes (a quote
    /// character itself counts as inside).
    fn inside(&mut self, b: u8) -> bool {
        match self.0 {
            Some(q) => {
                if b == q {
                    self.0 = None;
                }
                true
            }
            None if b == b'\'' || b == b'"' => {
                self.0 = Some(b);
                true
            }
            None => false,
        }
    }
}

/// A statement put together at run time (multi-row inserts, `IN` lists),
/// with its values: what `QueryBuilder` does, for either engine.
pub struct Sql<'q> {
    text: String,
    args: AnyArguments<'q>,
    error: Option<sqlx::error::BoxDynError>,
}

impl<'q> Sql<'q> {
    pub fn new(text: impl Into<String>) -> Sql<'q> {
        Sql {
            text: text.into(),
            args: AnyArguments::default(),
            error: None,
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    /// A value, where its placeholder goes.
    pub fn bind<T: 'q + Encode<'q, Any> + Type<Any>>(&mut self, value: T) -> &mut Self {
        self.text.push('?');
        if let Err(e) = self.args.add(value) {
            self.error.get_or_insert(e);
        }
        self
    }

    /// `VALUES (..), (..)`: one row per item, its values bound by `row`
    /// (through `Row::bind`, or written with `Row::push`).
    pub fn values<I>(
        &mut self,
        items: I,
        mut row: impl FnMut(&mut Row<'_, 'q>, I::Item),
    ) -> &mut Self
    where
        I: IntoIterator,
    {
        self.text.push_str("VALUES ");
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.text.push('(');
            row(
                &mut Row {
                    sql: self,
                    first: true,
                },
                item,
            );
            self.text.push(')');
        }
        self
    }

    /// `(?, ?, ..)`: an `IN` list of the values.
    pub fn list<T, I>(&mut self, items: I) -> &mut Self
    where
        T: 'q + Encode<'q, Any> + Type<Any>,
        I: IntoIterator<Item = T>,
    {
        self.text.push('(');
        let mut empty = true;
        for (i, item) in items.into_iter().enumerate() {
            if i > 0 {
                self.text.push_str(", ");
            }
            self.bind(item);
            empty = false;
        }
        // An empty list matches nothing (PostgreSQL refuses `IN ()`).
        self.text.push_str(if empty { "NULL)" } else { ")" });
        self
    }

    /// The statement in the engine's words, and its values.
    pub fn finish(self, dialect: Dialect) -> Result<(String, AnyArguments<'q>), sqlx::Error> {
        if let Some(e) = self.error {
            return Err(sqlx::Error::Encode(e));
        }
        Ok((dialect.sql(&self.text).into_owned(), self.args))
    }
}

/// One row of `Sql::values`.
pub struct Row<'s, 'q> {
    sql: &'s mut Sql<'q>,
    first: bool,
}

impl<'q> Row<'_, 'q> {
    fn comma(&mut self) {
        if !std::mem::take(&mut self.first) {
            self.sql.text.push_str(", ");
        }
    }

    pub fn bind<T: 'q + Encode<'q, Any> + Type<Any>>(&mut self, value: T) -> &mut Self {
        self.comma();
        self.sql.bind(value);
        self
    }

    /// A value written as SQL (one of our functions, a constant).
    pub fn push(&mut self, text: &str) -> &mut Self {
        self.comma();
        self.sql.text.push_str(text);
        self
    }
}

/// A flag as either engine keeps it: PostgreSQL's `BOOLEAN`, SQLite's
/// integer 0 or 1. Read through it (`#[sqlx(try_from = "Flag")]`), a
/// `bool` field reads from both.
#[derive(Debug, Clone, Copy)]
pub struct Flag(pub bool);

impl From<Flag> for bool {
    fn from(f: Flag) -> bool {
        f.0
    }
}

impl Type<Any> for Flag {
    fn type_info() -> sqlx::any::AnyTypeInfo {
        <bool as Type<Any>>::type_info()
    }

    fn compatible(ty: &sqlx::any::AnyTypeInfo) -> bool {
        <bool as Type<Any>>::compatible(ty) || <i64 as Type<Any>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Any> for Flag {
    fn decode(value: sqlx::any::AnyValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match <bool as sqlx::Decode<'r, Any>>::decode(value.clone()) {
            Ok(b) => Ok(Flag(b)),
            Err(_) => Ok(Flag(<i64 as sqlx::Decode<'r, Any>>::decode(value)? != 0)),
        }
    }
}

/// A flag in a `Dialect::json_rows` page: PostgreSQL's `true`/`false`,
/// SQLite's 0 or 1.
pub fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either {
        Bool(bool),
        Int(i64),
    }
    Ok(match <Either as serde::Deserialize>::deserialize(d)? {
        Either::Bool(b) => b,
        Either::Int(n) => n != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_as_sqlite_numbers_them() {
        assert_eq!(
            Dialect::Postgres.sql("SELECT ?, '?', ?3, ? WHERE a = ?1"),
            "SELECT $1, '?', $3, $4 WHERE a = $1"
        );
        assert_eq!(Dialect::Sqlite.sql("SELECT ?, ?3"), "SELECT ?, ?3");
    }

    #[test]
    fn functions_are_spelt_per_engine_and_nest() {
        let text = "UPDATE t SET a = GREATEST(a, ?), at = SG_ISO_MS(GREATEST(b, SG_NOW_MS()))";
        assert_eq!(
            Dialect::Sqlite.sql(text),
            "UPDATE t SET a = MAX(a, ?), at = strftime('%Y-%m-%dT%H:%M:%fZ', (MAX(b, \
             CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))) / 1000.0, 'unixepoch')"
        );
        let pg = Dialect::Postgres.sql(text);
        assert!(pg.starts_with("UPDATE t SET a = GREATEST(a, $1), at = to_char(to_timestamp((GREATEST(b, CAST(EXTRACT"), "{pg}");
        // A name inside quotes or another word is not a call.
        assert_eq!(
            Dialect::Sqlite.sql("SELECT 'GREATEST(1)', MY_GREATEST(1)"),
            "SELECT 'GREATEST(1)', MY_GREATEST(1)"
        );
    }

    #[test]
    fn quotes_of_both_kinds_and_other_alphabets_are_passed_over() {
        assert_eq!(
            Dialect::Postgres.sql("SELECT \"a?\", 'é?', ? FROM t WHERE n = 'ü' AND m = ?"),
            "SELECT \"a?\", 'é?', $1 FROM t WHERE n = 'ü' AND m = $2"
        );
        assert_eq!(
            Dialect::Sqlite.sql("SELECT 'ü', GREATEST(a, 'ö') FROM \"GREATEST(\""),
            "SELECT 'ü', MAX(a, 'ö') FROM \"GREATEST(\""
        );
        let mut q = Sql::new("SELECT 1 WHERE a IN ");
        q.list(Vec::<i64>::new());
        assert_eq!(
            q.finish(Dialect::Postgres).unwrap().0,
            "SELECT 1 WHERE a IN (NULL)"
        );
    }

    #[test]
    fn a_statement_put_together_binds_in_order() {
        let mut q = Sql::new("INSERT INTO t (a, b, at) ");
        q.values([(1i64, "x"), (2, "y")], |row, (a, b)| {
            row.bind(a).bind(b).push("SG_NOW_MS()");
        });
        q.push(" WHERE id IN ").list(["p", "q"]);
        let (text, _) = q.finish(Dialect::Postgres).unwrap();
        assert!(
            text.starts_with("INSERT INTO t (a, b, at) VALUES ($1, $2, CAST(")
                && text.ends_with("WHERE id IN ($5, $6)"),
            "{text}"
        );
    }
}
