//! A full disk under the op log or under an edge's database: a write that
//! cannot be made durable fails (and says so), every write that was answered is
//! durable, and durability resumes by itself once there is room again. The
//! databases live on a small tmpfs (mounting one needs root, as CI runs; set
//! `SYNCGATE_REQUIRE_TMPFS=1` to fail instead of skipping without it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use sqlx::sqlite::SqlitePoolOptions;
use syncgate::store::edge::{Batch, EdgeStore, StoredOutcome};
use syncgate::store::{NewIntent, OpState, Outcome, Store};

use crate::helpers::spawn_app_with;

/// A tmpfs of a few MiB, unmounted when dropped.
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts one, or says why it cannot (not root, no mount).
    pub fn mount(kib: usize) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            return Some(SmallFs { dir });
        }
        assert!(
            std::env::var_os("SYNCGATE_REQUIRE_TMPFS").is_none(),
            "SYNCGATE_REQUIRE_TMPFS is set but a tmpfs cannot be mounted (run as root)"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self, name: &str) -> String {
        format!("sqlite://{}", self.path().join(name).display())
    }

    /// Fills what is left with a file; returns it (remove it to make room).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Rows in a table, read by a connection of its own (what is on disk).
async fn count_on_disk(url: &str, sql: &str) -> i64 {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

fn intent(body: &str) -> NewIntent<'_> {
    NewIntent {
        method: "POST",
        path: "/v3/projects",
        class: "resource",
        kind: "project",
        body: Some(body),
        refs: "[]",
        traceparent: None,
        touches: &[],
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_op_logs_writes_and_durability_resumes_after() {
    let Some(fs) = SmallFs::mount(8192) else {
        return;
    };
    let url = fs.url("central.db");
    let store = Store::open(&url).await.unwrap();
    let body = json!({"project": {"name": "p", "description": "x".repeat(6000)}}).to_string();
    let capture = |store: Store, body: String| async move {
        let op = store.begin_intent(&intent(&body)).await?;
        store
            .commit_intent(op, OpState::Committed, &Outcome::default())
            .await
    };
    let mut answered = 0;
    for _ in 0..3 {
        capture(store.clone(), body.clone()).await.unwrap();
        answered += 1;
    }
    let filler = fs.fill();
    let mut refused = 0;
    for _ in 0..40 {
        match capture(store.clone(), body.clone()).await {
            Ok(_) => answered += 1,
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0, "the disk was full: some writes must fail");
    std::fs::remove_file(filler).unwrap();
    for i in 0..20 {
        capture(store.clone(), body.clone())
            .await
            .unwrap_or_else(|e| panic!("write {i} after the disk has room again: {e}"));
        answered += 1;
    }
    store.close().await;
    assert_eq!(
        count_on_disk(&url, "SELECT COUNT(*) FROM ops").await,
        answered,
        "every write answered is on disk, and only those ({refused} refused)"
    );
}

#[tokio::test]
async fn a_full_disk_fails_the_edges_commits_and_durability_resumes_after() {
    let Some(fs) = SmallFs::mount(8192) else {
        return;
    };
    let url = fs.url("edge.db");
    let store = EdgeStore::open(&url).await.unwrap();
    let detail = "d".repeat(6000);
    let mut seq = 0;
    let mut commit = |store: EdgeStore| {
        seq += 1;
        let mut batch = Batch::default();
        batch.push(
            StoredOutcome {
                seq,
                op_id: format!("op-{seq}"),
                outcome: "failed".into(),
                status: Some(400),
                detail: Some(detail.clone()),
                edge_ids: vec![],
            },
            syncgate::store::edge::Commit {
                advance: true,
                ..Default::default()
            },
        );
        let at = seq;
        async move { store.commit_batch(&batch).await.map(|()| at) }
    };
    let mut durable_cursor = 0;
    for _ in 0..3 {
        durable_cursor = commit(store.clone()).await.unwrap();
    }
    let filler = fs.fill();
    let mut refused = 0;
    for _ in 0..40 {
        match commit(store.clone()).await {
            Ok(at) => durable_cursor = at,
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0, "the disk was full: some commits must fail");
    std::fs::remove_file(filler).unwrap();
    for _ in 0..20 {
        durable_cursor = commit(store.clone()).await.unwrap();
    }
    assert_eq!(store.cursor().await.unwrap(), durable_cursor);
    store.close().await;
    assert_eq!(
        count_on_disk(&url, "SELECT seq FROM cursor").await,
        durable_cursor,
        "the cursor on disk is the last commit answered"
    );
}

/// Through the gateway: a write is refused (503, nothing forwarded) while the op
/// log cannot take its intent; every 2xx is an op on disk; captures resume.
#[tokio::test]
async fn writes_through_the_gateway_are_refused_while_the_disk_is_full_and_resume_after() {
    let Some(fs) = SmallFs::mount(8192) else {
        return;
    };
    let url = fs.url("central.db");
    let db = url.clone();
    let app = spawn_app_with(move |c| {
        c.db = db;
        c.stale_intent_after = Duration::from_millis(300);
    })
    .await;
    let big = "x".repeat(6000);
    let mut created = 0;
    let post = |i: usize| {
        app.write(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": format!("p{i}"), "description": big}})),
        )
    };
    for i in 0..3 {
        assert_eq!(post(i).await.status(), 201);
        created += 1;
    }
    let filler = fs.fill();
    let before = app.fake.count();
    let (mut refused, mut unrecorded) = (0, 0);
    for i in 3..20 {
        let resp = post(i).await;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        match status {
            201 => created += 1,
            503 if text.contains("nothing was forwarded") => refused += 1,
            503 if text.contains("could not record it") => unrecorded += 1,
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert!(refused > 0, "the disk was full: some writes are refused");
    assert_eq!(
        app.fake.count() - before,
        17 - refused,
        "a refused write is never forwarded"
    );
    std::fs::remove_file(filler).unwrap();
    for i in 20..30 {
        assert_eq!(post(i).await.status(), 201, "write {i} after room is back");
        created += 1;
    }
    // A write forwarded but not recorded is logged once there is room.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ops = loop {
        let ops = app.all_ops().await;
        if ops.len() >= created + unrecorded {
            break ops;
        }
        assert!(std::time::Instant::now() < deadline, "ops: {ops:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        ops.len(),
        created + unrecorded,
        "one op per forwarded write"
    );
    let committed = ops.iter().filter(|o| o["state"] == "committed").count();
    assert!(committed >= created, "every 2xx is a committed op");
    app.stop().await;
    assert_eq!(
        count_on_disk(&url, "SELECT COUNT(*) FROM ops").await as usize,
        created + unrecorded
    );
}

/// A write forwarded and applied upstream whose op the op log could not record
/// is listed by the audit (`unlogged_writes`, and the CLI's exit code) until it
/// is an op, and is logged, as the committed op it is (with the ID Keystone
/// made), as soon as there is room: not after a grace period bounding a
/// captured section's life, nor as a write of unknown outcome.
#[tokio::test]
async fn a_write_the_op_log_could_not_record_is_reported_and_logged_once_there_is_room() {
    let Some(fs) = SmallFs::mount(8192) else {
        return;
    };
    let url = fs.url("central.db");
    let db = url.clone();
    let app = spawn_app_with(move |c| {
        c.db = db;
        c.upstream_timeout = Duration::from_secs(30);
        c.stale_intent_after = Duration::from_secs(90);
    })
    .await;
    let created = app
        .write(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": "before"}})),
        )
        .await;
    assert_eq!(created.status(), 201);
    // Its intent is durable, its answer late: the disk fills meanwhile, so the
    // op (a copy of the large body) cannot be written.
    let big = "x".repeat(400_000);
    let held = app
        .client
        .post(app.url("/v3/projects"))
        .header("x-auth-token", "client-token-abc")
        .header("x-fake-delay-ms", "1500")
        .json(&json!({"project": {"name": "held", "description": big}}));
    let before = app.fake.count();
    let answer = tokio::spawn(held.send());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.fake.count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never reached upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let filler = fs.fill();
    let resp = answer.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    let text = resp.text().await.unwrap();
    assert!(text.contains("could not record it"), "{text}");

    let oos: serde_json::Value = app.admin_get("/v1/out-of-sync").await.json().await.unwrap();
    assert_eq!(oos["unlogged_writes"], 1, "{oos}");
    assert_eq!(
        app.all_ops().await.len(),
        1,
        "not an op while the disk is full"
    );

    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let ops = loop {
        let ops = app.all_ops().await;
        if ops.len() == 2 {
            break ops;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the unrecorded write was not logged once there was room: {ops:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Keystone's answer was read: it is the op it is, with the ID made.
    assert_eq!(ops[1]["state"], "committed", "{ops:?}");
    assert_eq!(ops[1]["method"], "POST");
    assert_eq!(
        ops[1]["created_ids"].as_array().map(Vec::len),
        Some(1),
        "{ops:?}"
    );
    let oos: serde_json::Value = app.admin_get("/v1/out-of-sync").await.json().await.unwrap();
    assert_eq!(oos["unlogged_writes"], 0, "{oos}");
    app.stop().await;
}

/// A write Keystone refused while the op log had no room to drop its intent
/// never becomes an op: the intent is dropped once there is room (its outcome
/// is known), never logged with an unknown outcome that the resolver could
/// then find "applied".
#[tokio::test]
async fn a_write_refused_upstream_while_the_disk_is_full_never_becomes_an_op() {
    let Some(fs) = SmallFs::mount(8192) else {
        return;
    };
    let url = fs.url("central.db");
    let db = url.clone();
    let app = spawn_app_with(move |c| {
        c.db = db;
        c.upstream_timeout = Duration::from_secs(30);
        // An intent left open is logged within a second.
        c.stale_intent_after = Duration::from_secs(4);
    })
    .await;
    // Its intent is durable, its answer late: the disk fills meanwhile, so the
    // intent (a large body, overwritten when deleted) cannot be dropped.
    let big = "x".repeat(400_000);
    let refused = app
        .client
        .post(app.url("/v3/projects"))
        .header("x-auth-token", "client-token-abc")
        .header("x-fake-delay-ms", "1500")
        .header("x-fake-status", "409")
        .json(&json!({"project": {"name": "refused", "description": big}}));
    let before = app.fake.count();
    let answer = tokio::spawn(refused.send());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.fake.count() == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never reached upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let filler = fs.fill();
    let resp = answer.await.unwrap().unwrap();
    assert_eq!(resp.status(), 409, "Keystone's answer");
    assert_eq!(
        count_on_disk(&url, "SELECT COUNT(*) FROM intents").await,
        1,
        "the intent could not be dropped while the disk is full"
    );

    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while count_on_disk(&url, "SELECT COUNT(*) FROM intents").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the intent was not dropped once there was room"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ops = app.all_ops().await;
    let shown: Vec<_> = ops
        .iter()
        .map(|o| (&o["seq"], &o["state"], &o["detail"]))
        .collect();
    assert!(ops.is_empty(), "no op: {shown:?}");
    let oos: serde_json::Value = app.admin_get("/v1/out-of-sync").await.json().await.unwrap();
    assert_eq!(oos["unlogged_writes"], 0, "{oos}");
    app.stop().await;
}
