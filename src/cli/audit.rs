//! `syncgate audit`: the audit API from a terminal. Each verb asks central's
//! admin API and prints an aligned table (or the API's JSON with `--format
//! json`). Exit codes: 0 done, 1 something is out of sync (`out-of-sync`), 2 bad
//! usage, 3 the admin API could not be asked or refused.

use std::fmt::Write as _;

use reqwest::{Method, StatusCode, Url};
use serde_json::Value;

use crate::core::Secret;

/// What to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    Edges,
    Ops {
        after: Option<i64>,
        limit: Option<i64>,
        kind: Option<String>,
        state: Option<String>,
    },
    OutOfSync {
        edge: Option<String>,
    },
    Op {
        seq: i64,
    },
    Retry {
        seq: i64,
        edge: String,
    },
    Skip {
        seq: i64,
        edge: String,
        by: String,
    },
    Edge {
        edge: String,
    },
    Resync {
        edge: String,
        prune: bool,
    },
    Drift {
        edge: Option<String>,
        kind: Option<String>,
        category: Option<String>,
    },
    DriftRun {
        edge: Option<String>,
        outside_scope: bool,
    },
    Repair {
        edge: String,
        prune: bool,
    },
}

#[derive(Debug, Clone)]
pub struct AuditRequest {
    pub admin_url: Url,
    /// CA certificates trusted for an https admin URL instead of the system's.
    pub admin_ca: Option<std::path::PathBuf>,
    pub token: Option<Secret>,
    pub json: bool,
    pub verb: Verb,
}

/// Exit codes.
pub const OUT_OF_SYNC: u8 = 1;
pub const UNAVAILABLE: u8 = 3;

/// Runs one verb; returns the text to print and the exit code.
pub async fn run(req: &AuditRequest) -> (String, u8) {
    let (method, path, query) = match &req.verb {
        Verb::Edges => (Method::GET, "/v1/edges".to_string(), Vec::new()),
        Verb::Ops {
            after,
            limit,
            kind,
            state,
        } => {
            let mut q = Vec::new();
            if let Some(a) = after {
                q.push(("after", a.to_string()));
            }
            if let Some(l) = limit {
                q.push(("limit", l.to_string()));
            }
            if let Some(k) = kind {
                q.push(("kind", k.clone()));
            }
            if let Some(s) = state {
                q.push(("state", s.clone()));
            }
            (Method::GET, "/v1/ops".to_string(), q)
        }
        Verb::OutOfSync { edge } => (
            Method::GET,
            "/v1/out-of-sync".to_string(),
            edge.iter().map(|e| ("edge", e.clone())).collect(),
        ),
        Verb::Op { seq } => (Method::GET, format!("/v1/ops/{seq}"), Vec::new()),
        Verb::Retry { seq, edge } => (
            Method::POST,
            format!("/v1/ops/{seq}/retry"),
            vec![("edge", edge.clone())],
        ),
        Verb::Skip { seq, edge, by } => (
            Method::POST,
            format!("/v1/ops/{seq}/skip"),
            vec![("edge", edge.clone()), ("by", by.clone())],
        ),
        Verb::Edge { edge } => (Method::GET, format!("/v1/edges/{edge}"), Vec::new()),
        Verb::Resync { edge, prune } => (
            Method::POST,
            format!("/v1/edges/{edge}/resync"),
            prune_query(*prune),
        ),
        Verb::Drift {
            edge,
            kind,
            category,
        } => {
            let mut q = Vec::new();
            for (k, v) in [("edge", edge), ("kind", kind), ("category", category)] {
                if let Some(v) = v {
                    q.push((k, v.clone()));
                }
            }
            (Method::GET, "/v1/drift".to_string(), q)
        }
        Verb::DriftRun {
            edge,
            outside_scope,
        } => {
            let mut q: Vec<(&str, String)> = edge.iter().map(|e| ("edge", e.clone())).collect();
            if *outside_scope {
                q.push(("outside_scope", "true".into()));
            }
            (Method::POST, "/v1/drift/run".to_string(), q)
        }
        Verb::Repair { edge, prune } => {
            let mut q = prune_query(*prune);
            q.push(("edge", edge.clone()));
            (Method::POST, "/v1/drift/repair".to_string(), q)
        }
    };
    let body = match ask(req, method, &path, &query).await {
        Ok(body) => body,
        Err(e) => return (format!("error: {e}\n"), UNAVAILABLE),
    };
    if req.json {
        let text = serde_json::to_string_pretty(&body).unwrap_or_default();
        let code = out_of_sync_code(&req.verb, &body);
        return (format!("{text}\n"), code);
    }
    let text = match &req.verb {
        Verb::Edges => edges_table(&body) + &retention_lines(&body["retention"]),
        Verb::Ops { .. } => ops_table(&body),
        Verb::OutOfSync { .. } => out_of_sync_table(&body),
        Verb::Op { .. } => op_view(&body),
        Verb::Retry { .. } | Verb::Skip { .. } => format!(
            "{}: {}\n",
            body["action"].as_str().unwrap_or("sent"),
            body["message"].as_str().unwrap_or_default()
        ),
        Verb::Edge { .. } => edge_view(&body),
        Verb::Drift { .. } => drift_table(&body),
        Verb::Resync { .. } | Verb::DriftRun { .. } | Verb::Repair { .. } => {
            format!(
                "started: {}\n",
                body["message"].as_str().unwrap_or_default()
            )
        }
    };
    (text, out_of_sync_code(&req.verb, &body))
}

fn out_of_sync_code(verb: &Verb, body: &Value) -> u8 {
    let rows = match verb {
        Verb::OutOfSync { .. } => {
            body["out_of_sync"].as_array().map_or(0, Vec::len)
                + body["unlogged_writes"].as_u64().unwrap_or(0) as usize
        }
        Verb::Drift { .. } => body["differences"].as_array().map_or(0, Vec::len),
        _ => 0,
    };
    if rows > 0 {
        OUT_OF_SYNC
    } else {
        0
    }
}

fn prune_query(prune: bool) -> Vec<(&'static str, String)> {
    if prune {
        vec![("prune", "true".to_string())]
    } else {
        Vec::new()
    }
}

fn drift_table(body: &Value) -> String {
    let mut out = String::new();
    for run in body["runs"].as_array().into_iter().flatten() {
        if run["state"] == "never_run" {
            let _ = writeln!(out, "{}: never audited", cell(&run["edge"]));
            continue;
        }
        let _ = writeln!(
            out,
            "{}: audit {} (started {}, finished {}){}",
            cell(&run["edge"]),
            cell(&run["state"]),
            cell(&run["started_at"]),
            cell(&run["finished_at"]),
            run["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        // The differences listed are the last completed audit's.
        if run["found_at"].is_null() {
            let _ = writeln!(out, "  no audit of this edge has completed yet");
        } else {
            let _ = writeln!(
                out,
                "  differences as found by the audit completed {} (fence {}; {} entities touched by ops in flight not compared)",
                cell(&run["found_at"]),
                cell(&run["fence"]),
                cell(&run["excluded"]),
            );
        }
    }
    let rows: Vec<Vec<String>> = body["differences"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            let fields = d["fields"]
                .as_array()
                .map(|f| f.iter().map(cell).collect::<Vec<_>>().join(","))
                .unwrap_or_else(|| "-".into());
            vec![
                cell(&d["edge"]),
                cell(&d["category"]),
                cell(&d["kind"]),
                cell(&d["key"]),
                fields,
            ]
        })
        .collect();
    if rows.is_empty() {
        out.push_str("no differences\n");
    } else {
        out.push_str(&table(
            &["EDGE", "CATEGORY", "KIND", "KEY", "FIELDS"],
            &rows,
        ));
    }
    out
}

fn edge_view(body: &Value) -> String {
    let mut out = edges_table(&serde_json::json!({ "edges": [body] }));
    let r = &body["resync"];
    if !r.is_null() {
        let _ = writeln!(
            out,
            "\n{} {}: {} ({}/{}), fence {}, started {}{}",
            cell(&r["kind"]),
            if r["prune"] == true { "with prune" } else { "" },
            cell(&r["phase"]),
            cell(&r["done"]),
            cell(&r["total"]),
            cell(&r["fence"]),
            cell(&r["started_at"]),
            r["error"]
                .as_str()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        let res = &r["result"];
        if !res.is_null() {
            let _ = writeln!(
                out,
                "  created {}, updated {}, adopted {}, mapped {}, deleted {}, failed {}, only at the edge {}",
                cell(&res["created"]),
                cell(&res["updated"]),
                cell(&res["adopted"]),
                cell(&res["mapped"]),
                cell(&res["deleted"]),
                cell(&res["failed"]),
                cell(&res["only_at_edge"])
            );
        }
    }
    let d = &body["drift"];
    if !d.is_null() {
        let _ = writeln!(
            out,
            "\ndrift audit {} (finished {}); differences found by the audit completed {}: {}",
            cell(&d["state"]),
            cell(&d["finished_at"]),
            cell(&d["found_at"]),
            cell(&d["counts"])
        );
    }
    let n = &body["needs_password"];
    let _ = writeln!(out, "\nusers needing a password: {}", cell(&n["count"]));
    for u in n["users"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "  {}", cell(&u["user_key"]));
    }
    out
}

async fn ask(
    req: &AuditRequest,
    method: Method,
    path: &str,
    query: &[(&str, String)],
) -> Result<Value, String> {
    let mut url = req
        .admin_url
        .join(path)
        .map_err(|e| format!("bad --admin-url: {e}"))?;
    if !query.is_empty() {
        url.query_pairs_mut().extend_pairs(query);
    }
    let mut client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(30));
    if let Some(ca) = &req.admin_ca {
        if req.admin_url.scheme() != "https" {
            return Err(format!(
                "--admin-ca is for an https --admin-url; {} is plain HTTP",
                req.admin_url
            ));
        }
        client = client.use_preconfigured_tls(
            crate::tls::client_trusting(ca, "--admin-ca").map_err(|e| format!("{e:#}"))?,
        );
    }
    let client = client.build().map_err(|e| e.to_string())?;
    let mut r = client.request(method, url);
    if let Some(t) = &req.token {
        r = r.bearer_auth(t.expose());
    }
    let resp = r.send().await.map_err(|e| {
        format!(
            "cannot reach the admin API at {}: {}",
            req.admin_url,
            e.without_url()
        )
    })?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or("no message")
        .to_string();
    Err(match status {
        StatusCode::UNAUTHORIZED => format!(
            "the admin API wants a token (SYNCGATE_ADMIN_TOKEN or --admin-token-file): {message}"
        ),
        s => format!("the admin API answered {}: {message}", s.as_u16()),
    })
}

/// Aligned columns, a header first.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn edges_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            [
                "id",
                "online",
                "cursor",
                "acked_through",
                "lag_ops",
                "lag_seconds",
                "last_seen",
                "error",
            ]
            .iter()
            .map(|k| cell(&e[*k]))
            .collect()
        })
        .collect();
    table(
        &[
            "EDGE",
            "ONLINE",
            "CURSOR",
            "ACKED",
            "LAG",
            "LAG_S",
            "LAST_SEEN",
            "ERROR",
        ],
        &rows,
    )
}

/// What the op log keeps, and what keeps ops older than the retention window.
fn retention_lines(r: &Value) -> String {
    if r.is_null() {
        // A central of an earlier version says nothing of retention.
        return String::new();
    }
    let (first, last) = (cell(&r["first_seq"]), cell(&r["last_seq"]));
    let mut out = String::new();
    let Some(window) = r["window_seconds"].as_u64() else {
        let _ = writeln!(
            out,
            "\nop log: ops {first}..{last} kept; retention is off (--retention 0)"
        );
        return out;
    };
    let window = humantime::format_duration(std::time::Duration::from_secs(window));
    let _ = writeln!(
        out,
        "\nop log: ops {first}..{last} kept; retention {window} prunes ops through {} now",
        cell(&r["prunable_through"])
    );
    let pins = r["pinned_by"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if !pins.is_empty() {
        let _ = writeln!(out, "kept longer than {window} because:");
        for p in pins {
            let who = p["edge"].as_str().unwrap_or("every edge");
            let _ = writeln!(out, "  {who}: {}", cell(&p["why"]));
        }
    }
    let expired: Vec<String> = r["expired_edges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(cell)
        .collect();
    if !expired.is_empty() {
        let _ = writeln!(
            out,
            "expired (not heard from for --edge-expiry; they keep no op and are resynced when \
             they return): {}",
            expired.join(", ")
        );
    }
    let unseen: Vec<String> = r["unseen_edges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(cell)
        .collect();
    if !unseen.is_empty() {
        let _ = writeln!(
            out,
            "never heard from (they keep no op; one that joins after its first op is gone is \
             resynced): {}",
            unseen.join(", ")
        );
    }
    out
}

fn ops_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["ops"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            ["seq", "state", "method", "kind", "logged_at", "path"]
                .iter()
                .map(|k| cell(&o[*k]))
                .collect()
        })
        .collect();
    let mut out = table(&["SEQ", "STATE", "METHOD", "KIND", "LOGGED", "PATH"], &rows);
    if let Some(next) = body["next"].as_i64() {
        let _ = writeln!(out, "(more: --after {next})");
    }
    out
}

fn out_of_sync_table(body: &Value) -> String {
    let rows: Vec<Vec<String>> = body["out_of_sync"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            [
                "edge", "seq", "state", "kind", "method", "status", "path", "detail",
            ]
            .iter()
            .map(|k| cell(&r[*k]))
            .collect()
        })
        .collect();
    let unlogged = body["unlogged_writes"].as_u64().unwrap_or(0);
    if rows.is_empty() && unlogged == 0 {
        return "every edge is in sync\n".into();
    }
    let mut out = String::new();
    if !rows.is_empty() {
        out = table(
            &[
                "EDGE", "SEQ", "STATE", "KIND", "METHOD", "STATUS", "PATH", "DETAIL",
            ],
            &rows,
        );
    }
    if body["truncated"] == true {
        out.push_str("(more rows than shown)\n");
    }
    if unlogged > 0 {
        out.push_str(&format!(
            "{unlogged} write(s) forwarded to the identity service are not in the op log yet \
             (it failed); every edge may lack them until they are logged\n"
        ));
    }
    out
}

fn op_view(op: &Value) -> String {
    let mut out = String::new();
    for key in [
        "seq",
        "op_id",
        "state",
        "method",
        "path",
        "kind",
        "created_ids",
        "upstream_status",
        "request_id",
        "detail",
        "logged_at",
    ] {
        let _ = writeln!(out, "{key:<16}{}", cell(&op[key]));
    }
    let _ = writeln!(out, "{:<16}{}", "body", cell(&op["body"]));
    let rows: Vec<Vec<String>> = op["deliveries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            ["edge", "state", "status", "updated_at", "detail"]
                .iter()
                .map(|k| cell(&d[*k]))
                .collect()
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["EDGE", "STATE", "STATUS", "UPDATED", "DETAIL"],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_edges_view_says_what_keeps_old_ops_and_which_edges_expired() {
        let r = json!({
            "window_seconds": 2_592_000, "first_seq": 40, "last_seq": 900,
            "old_through": 700, "prunable_through": 56,
            "pinned_by": [
                {"edge": "site3", "through": 56, "why": "acknowledged ops through 56 only"},
                {"edge": null, "through": 80, "why": "op 81's outcome at central is still being resolved"}
            ],
            "expired_edges": ["site9"],
            "unseen_edges": ["site10"]
        });
        let text = retention_lines(&r);
        assert!(
            text.contains("ops 40..900 kept; retention 30days prunes ops through 56 now"),
            "{text}"
        );
        assert!(
            text.contains("  site3: acknowledged ops through 56 only"),
            "{text}"
        );
        assert!(text.contains("  every edge: op 81's outcome"), "{text}");
        assert!(text.contains("resynced when they return): site9"), "{text}");
        assert!(text.contains("is resynced): site10"), "{text}");
        let off = retention_lines(&json!({"window_seconds": null, "first_seq": 1, "last_seq": 9}));
        assert!(off.contains("ops 1..9 kept; retention is off"), "{off}");
        // A central of an earlier version says nothing of retention.
        assert_eq!(retention_lines(&Value::Null), "");
    }

    #[test]
    fn tables_align_and_out_of_sync_sets_the_exit_code() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
        let none = json!({"out_of_sync": [], "truncated": false});
        let some = json!({"out_of_sync": [{"edge": "e", "seq": 2, "state": "failed"}]});
        let verb = Verb::OutOfSync { edge: None };
        assert_eq!(out_of_sync_code(&verb, &none), 0);
        assert_eq!(out_of_sync_code(&verb, &some), OUT_OF_SYNC);
        assert_eq!(out_of_sync_code(&Verb::Edges, &some), 0);
        assert!(out_of_sync_table(&none).contains("in sync"));
        assert!(out_of_sync_table(&some).starts_with("EDGE"));
        let unlogged = json!({"out_of_sync": [], "truncated": false, "unlogged_writes": 2});
        assert_eq!(out_of_sync_code(&verb, &unlogged), OUT_OF_SYNC);
        assert!(out_of_sync_table(&unlogged).contains("2 write(s)"));
        assert!(!out_of_sync_table(&unlogged).contains("in sync"));
    }
}
