//! The audit API: authentication, parameters, pagination, and that secrets never
//! show, in its answers or in the logs.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{json, Value};
use syncgate::settings::config::Secret;

use crate::helpers::spawn_app_with;

#[tokio::test]
async fn audit_needs_the_admin_token_when_one_is_set() {
    let app = spawn_app_with(|c| c.admin_token = Some(Secret::new("admin-secret"))).await;
    let url = format!("{}/v1/ops", app.admin);
    let none = app.client.get(&url).send().await.unwrap();
    assert_eq!(none.status().as_u16(), 401);
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    let wrong = app
        .client
        .get(&url)
        .bearer_auth("admin-secreT")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["code"], 401);
    let one = app
        .client
        .get(format!("{}/v1/ops/1", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status().as_u16(), 401);
    assert_eq!(app.admin_get("/v1/ops").await.status().as_u16(), 200);
    // Probes stay open.
    assert_eq!(
        app.client
            .get(format!("{}/healthz", app.admin))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// `/v1/status` says what this central is and that it holds its op log
/// (engine, database as shown, this process, since when) and leads (on
/// PostgreSQL: its replica number, its epoch, and the database's view of the
/// leader and the replicas), as `syncgate_oplog_held` and `syncgate_leader`
/// do.
#[tokio::test]
async fn the_status_says_which_process_holds_the_op_log_and_since_when() {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let app = spawn_app_with(|_| {}).await;
    // On PostgreSQL the one replica leads once elected, a moment after it
    // serves.
    app.until_metric("syncgate_leader 1").await;
    let status: Value = app.admin_get("/v1/status").await.json().await.unwrap();
    assert_eq!(status["role"], "central");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    let op_log = &status["op_log"];
    let postgres = app.db_url.starts_with("postgres");
    assert_eq!(
        op_log["engine"],
        if postgres { "postgresql" } else { "sqlite" },
        "{status}"
    );
    assert_eq!(op_log["held"], true, "{status}");
    assert!(
        op_log["process"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", std::process::id())),
        "{status}"
    );
    assert!(op_log["since"].as_str().unwrap().ends_with('Z'), "{status}");
    assert_eq!(op_log["epoch"].is_i64(), postgres, "{status}");
    assert_eq!(op_log["leads"], true, "{status}");
    assert_eq!(op_log["replica"].is_i64(), postgres, "{status}");
    if postgres {
        assert_eq!(status["leader"]["epoch"], op_log["epoch"], "{status}");
        assert_eq!(status["leader"]["holder"], op_log["process"], "{status}");
        assert_eq!(
            status["replicas"].as_array().map(Vec::len),
            Some(1),
            "{status}"
        );
    }
    assert!(
        app.db_url.contains(op_log["database"].as_str().unwrap()),
        "{status}"
    );
    app.until_metric("syncgate_oplog_held 1").await;
    // Since when it leads, and at which epoch: in the status and the metrics.
    let leads_since = humantime::parse_rfc3339(op_log["leads_since"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {status}"));
    assert!(
        leads_since >= humantime::parse_rfc3339(op_log["since"].as_str().unwrap()).unwrap(),
        "it leads once it holds the op log: {status}"
    );
    let metrics = app.admin_get("/metrics").await.text().await.unwrap();
    let gauge = |name: &str| -> i64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(
        gauge("syncgate_leader_epoch"),
        op_log["epoch"].as_i64().unwrap_or(0),
        "{status}"
    );
    let since = gauge("syncgate_leader_start_time_seconds");
    let unix = leads_since
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(since >= started && since == unix, "{since} {status}");
    app.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_400_with_a_message() {
    let app = spawn_app_with(|_| {}).await;
    for (query, needle) in [
        ("after=abc", "'after'"),
        ("after=-1", "'after'"),
        ("limit=0", "'limit'"),
        ("limit=5000", "'limit'"),
        ("kind=unicorn", "unknown kind 'unicorn'"),
        ("state=lost", "unknown state 'lost'"),
        ("colour=red", "unknown parameter 'colour'"),
    ] {
        let resp = app.admin_get(&format!("/v1/ops?{query}")).await;
        assert_eq!(resp.status().as_u16(), 400, "{query}");
        let body: Value = resp.json().await.unwrap();
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{query}: {msg}");
    }
    assert_eq!(app.admin_get("/v1/ops/xyz").await.status().as_u16(), 400);
    assert_eq!(app.admin_get("/v1/ops/99").await.status().as_u16(), 404);
}

#[tokio::test]
async fn ops_page_oldest_first_with_a_next_cursor_and_filter_by_kind() {
    let app = spawn_app_with(|_| {}).await;
    for i in 0..5 {
        app.write(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": format!("p{i}")}})),
        )
        .await;
        app.write(
            "POST",
            "/v3/groups",
            Some(json!({"group": {"name": format!("g{i}")}})),
        )
        .await;
    }
    let page: Value = app.admin_get("/v1/ops?limit=4").await.json().await.unwrap();
    let seqs: Vec<i64> = page["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(page["next"], 4);
    let page: Value = app
        .admin_get("/v1/ops?after=8&limit=4")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["ops"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], Value::Null);

    let groups: Value = app
        .admin_get("/v1/ops?kind=group")
        .await
        .json()
        .await
        .unwrap();
    let seqs: Vec<i64> = groups["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 4, 6, 8, 10]);
    let one: Value = app.admin_get("/v1/ops/3").await.json().await.unwrap();
    assert_eq!(one["body"]["project"]["name"], "p1");
}

/// Everything any thread logs, at every level, for the secrets test.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer_buf = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || LogWriter(writer_buf.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        buf
    })
    .clone()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn passwords_and_tokens_appear_in_no_audit_answer_and_no_log() {
    let logs = captured_logs();
    let app = spawn_app_with(|c| c.admin_token = Some(Secret::new("admin-bearer-zz9"))).await;
    let password = "Pa55-w0rd-never-shown-7731";
    let token = "client-token-never-shown-4410";
    let secret = "ec2-secret-never-shown-5521";

    let user: Value = app
        .client
        .post(app.url("/v3/users"))
        .header("x-auth-token", token)
        .json(&json!({"user": {"name": "alice", "password": password}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uid = user["user"]["id"].as_str().unwrap();
    for (method, path, body) in [
        (
            "POST",
            format!("/v3/users/{uid}/password"),
            json!({"user": {"password": password, "original_password": password}}),
        ),
        (
            "PATCH",
            format!("/v3/users/{uid}"),
            json!({"user": {"password": password}}),
        ),
        (
            "POST",
            "/v3/credentials".to_string(),
            json!({"credential": {"blob": format!("{{\"secret\": \"{secret}\"}}"), "type": "ec2", "user_id": uid}}),
        ),
    ] {
        let resp = app
            .client
            .request(method.parse().unwrap(), app.url(&path))
            .header("x-auth-token", token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
    // A failed and an unknown-outcome write carry secrets too.
    app.client
        .post(app.url("/v3/users"))
        .header("x-auth-token", token)
        .header("x-fake-status", "400")
        .json(&json!({"user": {"name": "bob", "password": password}}))
        .send()
        .await
        .unwrap();

    let mut answers = String::new();
    for path in [
        "/v1/ops",
        "/v1/ops/1",
        "/v1/ops/2",
        "/v1/ops/3",
        "/v1/ops/4",
        "/metrics",
    ] {
        let resp = app.admin_get(path).await;
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        answers.push_str(&resp.text().await.unwrap());
    }
    let ops: Value = app.admin_get("/v1/ops").await.json().await.unwrap();
    assert_eq!(ops["ops"].as_array().unwrap().len(), 4);
    assert_eq!(ops["ops"][0]["body"]["user"]["password"], "***");
    assert_eq!(ops["ops"][1]["body"]["user"]["original_password"], "***");
    assert_eq!(ops["ops"][3]["body"]["credential"]["blob"], "***");
    assert_eq!(ops["ops"][0]["body"]["user"]["name"], "alice");

    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("op logged"), "the capture was logged at all");
    for needle in [password, token, secret, "admin-bearer-zz9"] {
        assert!(!answers.contains(needle), "{needle} in an audit answer");
        assert!(!logs.contains(needle), "{needle} in the logs");
    }
}
