//! The binary's command line: bad values exit 2 with one line naming the option.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .args(args)
        .env_remove("SYNCGATE_UPSTREAM")
        .env_remove("SYNCGATE_ADMIN_TOKEN")
        .env_remove("OS_USERNAME")
        .env_remove("OS_APPLICATION_CREDENTIAL_ID")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_values_exit_2_with_one_line_naming_the_option() {
    let cases: [(&[&str], &str); 7] = [
        (&["central"], "--upstream"),
        (
            &["central", "--upstream", "http://k", "--listen", "nowhere"],
            "--listen",
        ),
        (
            &[
                "central",
                "--upstream",
                "http://k",
                "--max-capture-body",
                "huge",
            ],
            "--max-capture-body",
        ),
        (
            &[
                "central",
                "--upstream",
                "http://k",
                "--replicate",
                "identity,bogus",
            ],
            "--replicate",
        ),
        (
            &[
                "central",
                "--upstream",
                "http://k",
                "--admin-listen",
                "0.0.0.0:0",
                "--insecure-plaintext-sync",
            ],
            "--admin-token",
        ),
        (&["central", "--upstream", "http://k"], "--sync-key"),
        (
            &[
                "edge",
                "--id",
                "e1",
                "--broker",
                "nats://127.0.0.1:1",
                "--upstream",
                "http://k",
                "--insecure-plaintext-sync",
            ],
            "OS_USERNAME",
        ),
    ];
    for (args, option) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(option), "{args:?}: {stderr}");
    }
}

/// An op log URL central cannot take is refused before anything starts,
/// with why, and a password in a PostgreSQL URL is never shown back.
#[test]
fn a_database_url_central_cannot_take_is_refused_and_its_password_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("db-password");
    std::fs::write(&pw, "s3cret-db-pw\n").unwrap();
    let pw = pw.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--db", "mysql://u@h/db"],
            "sqlite://FILE or a postgres://",
        ),
        (
            &["--db", "postgres://sync:hunter2@db.example:5432/oplog"],
            "--db-password-file",
        ),
        (
            &["--db", "sqlite:///x.db", "--db-password-file", pw],
            "is for a postgres://",
        ),
    ];
    for (extra, why) in cases {
        let mut args = vec![
            "central",
            "--upstream",
            "http://127.0.0.1:9",
            "--insecure-plaintext-sync",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ];
        args.extend_from_slice(extra);
        let (code, stderr) = run(&args);
        assert_ne!(code, 0, "{extra:?}: {stderr}");
        assert!(stderr.contains(why), "{extra:?}: {stderr}");
        assert!(
            !stderr.contains("hunter2") && !stderr.contains("s3cret"),
            "{stderr}"
        );
    }
    // The same URL from the environment (SYNCGATE_DB) is taken as --db.
    let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .args([
            "central",
            "--upstream",
            "http://127.0.0.1:9",
            "--insecure-plaintext-sync",
        ])
        .env(
            "SYNCGATE_DB",
            "postgres://sync:hunter2@db.example:5432/oplog",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--db-password-file") && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

#[test]
fn an_unwritable_op_log_fails_clearly() {
    let (code, stderr) = run(&[
        "central",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--db",
        "sqlite:///nonexistent-dir/x/central.db",
        "--insecure-plaintext-sync",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("op log"), "{stderr}");
}

#[test]
fn a_scope_limited_to_domains_needs_central_service_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/central.db", dir.path().display());
    let (code, stderr) = run(&[
        "central",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--db",
        &db,
        "--sync-key",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "--edge-scope",
        "site2=domains:acme",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "--edge-scope site2: a scope limited to some domains needs central's service credentials"
        ),
        "{stderr}"
    );
}

#[test]
fn keygen_prints_a_usable_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    assert!(
        syncgate::protocol::crypto::validate_key(key.trim()).is_ok(),
        "{key}"
    );
}

/// SIGTERM ends the process within `--shutdown-grace`, exit code 0, even while
/// a client trickles its request and another holds a keep-alive connection.
#[test]
fn sigterm_ends_the_process_within_the_grace_period() {
    use std::io::{BufRead, BufReader, Write};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("c.db").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .args([
            "--log-format",
            "json",
            "central",
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--broker-listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--insecure-plaintext-sync",
            "--shutdown-grace",
            "1s",
        ])
        .env_remove("OS_USERNAME")
        .env_remove("OS_APPLICATION_CREDENTIAL_ID")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let proxy = loop {
        let line = lines.next().expect("central logs").unwrap();
        if line.contains("syncgate central serving") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            break v["fields"]["proxy_addr"].as_str().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let mut trickler = std::net::TcpStream::connect(&proxy).unwrap();
    trickler
        .write_all(b"POST /v3/projects HTTP/1.1\r\nHo")
        .unwrap();
    let mut idle = std::net::TcpStream::connect(&proxy).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();

    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stopped in {:?} with a 1s grace",
        started.elapsed()
    );
}

/// `syncgate audit` against a running central: tables, JSON, exit codes.
#[tokio::test]
async fn the_audit_verbs_answer_from_a_terminal() {
    let env = crate::sync::sync_env(&["edge-a"], None, |c| {
        c.admin_token = Some(syncgate::settings::config::Secret::new("audit-token-1"))
    })
    .await;
    env.edges[0].site.fail_next(&[400]);
    let resp = env
        .http
        .post(format!("{}/v3/groups", env.proxy))
        .header("x-auth-token", env.token())
        .json(&serde_json::json!({"group": {"name": "g"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let audit = |args: Vec<String>, token: Option<&str>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncgate"));
        // A test may name another admin URL; else central's.
        let url = args
            .iter()
            .position(|a| a == "--admin-url")
            .map_or(env.admin.clone(), |i| args[i + 1].clone());
        let args: Vec<String> = args
            .into_iter()
            .filter(|a| *a != "--admin-url" && *a != url)
            .collect();
        cmd.arg("audit")
            .args(["--admin-url", &url])
            .args(args)
            .env_remove("SYNCGATE_ADMIN_TOKEN")
            .env_remove("SYNCGATE_ADMIN_URL");
        if let Some(t) = token {
            cmd.env("SYNCGATE_ADMIN_TOKEN", t);
        }
        async move {
            let out = cmd.output().await.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let token = Some("audit-token-1");
    // Waits until the edge reported its failure.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (code, table, _) = loop {
        let r = audit(args(&["out-of-sync"]), token).await;
        if r.0 == 1 || std::time::Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(code, 1, "{table}");
    assert!(
        table.starts_with("EDGE") && table.contains("edge-a") && table.contains("failed"),
        "{table}"
    );

    let (code, json, _) = audit(args(&["out-of-sync", "--format", "json"]), token).await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["out_of_sync"][0]["seq"], 1);

    let (code, edges, _) = audit(args(&["edges"]), token).await;
    assert_eq!(code, 0);
    assert!(
        edges.lines().nth(1).unwrap().starts_with("edge-a"),
        "{edges}"
    );

    let (code, op, _) = audit(args(&["op", "1"]), token).await;
    assert_eq!(code, 0);
    assert!(op.contains("POST") && op.contains("failed"), "{op}");

    let (code, out, _) = audit(args(&["retry", "1", "--edge", "edge-a"]), token).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("reapply:"), "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (code, out, _) = loop {
        let r = audit(args(&["out-of-sync"]), token).await;
        if r.0 == 0 || std::time::Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!((code, out.as_str()), (0, "every edge is in sync\n"));

    // An op that failed there, passed over at an operator's request: shown
    // out of sync with who asked.
    env.edges[0].site.fail_next(&[400]);
    env.create(
        "/v3/groups",
        "group",
        serde_json::json!({"group": {"name": "g2"}}),
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, op, _) = audit(args(&["op", "2", "--format", "json"]), token).await;
        let failed = serde_json::from_str::<serde_json::Value>(&op)
            .is_ok_and(|v| v["deliveries"][0]["state"] == "failed");
        if failed || std::time::Instant::now() > deadline {
            break;
        }
    }
    let (code, out, _) = audit(
        args(&["skip", "2", "--edge", "edge-a", "--by", "carol"]),
        token,
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("skip:"), "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (code, out, _) = loop {
        let r = audit(args(&["out-of-sync"]), token).await;
        if r.1.contains("operator_skipped") || std::time::Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("operator_skipped") && out.contains("by carol"),
        "{out}"
    );
    let (code, out, _) = audit(args(&["skip", "2", "--edge", "edge-a"]), token).await;
    assert_eq!(code, 3, "nothing to skip: {out}");

    // A user made at the edge directly: the drift audit reports it (exit 1),
    // a resync with prune removes it.
    let site = &env.edges[0].site;
    let edge_token = crate::sync::admin_token(&env.http, &site.url(), &site.admin_password).await;
    let made = env
        .http
        .post(format!("{}/v3/users", site.url()))
        .header("x-auth-token", edge_token)
        .json(&serde_json::json!({"user": {"name": "stray"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status().as_u16(), 201);
    let (code, out, err) = audit(args(&["drift-run", "--edge", "edge-a"]), token).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("started:"), "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (code, out, _) = loop {
        let r = audit(args(&["drift", "--edge", "edge-a"]), token).await;
        if r.0 == 1 || std::time::Instant::now() > deadline {
            break r;
        }
    };
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("edge-a: audit done")
            && out
                .lines()
                .any(|l| l.contains("only_at_edge") && l.ends_with("Default/stray  -")),
        "{out}"
    );
    let (code, out, _) = audit(args(&["resync", "edge-a", "--prune"]), token).await;
    assert_eq!(code, 0, "{out}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let out = loop {
        let (_, out, _) = audit(args(&["edge", "edge-a"]), token).await;
        if out.contains("resync with prune: done") || std::time::Instant::now() > deadline {
            break out;
        }
    };
    assert!(
        out.contains("resync with prune: done") && out.contains("deleted 1"),
        "{out}"
    );
    assert!(out.contains("users needing a password: 0"), "{out}");

    // No token, or no admin API: exit 3 with a clear message.
    let (code, _, err) = audit(args(&["edges"]), None).await;
    assert_eq!(code, 3);
    assert!(err.contains("wants a token"), "{err}");
    let (code, _, err) = audit(args(&["--admin-url", "http://127.0.0.1:9", "edges"]), token).await;
    assert_eq!(code, 3);
    assert!(err.contains("cannot reach"), "{err}");
    env.shutdown().await;
}

#[test]
fn config_check_prints_the_layers_and_start_up_refuses_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[edge]\nid = \"edge1\"\nbroker = \"nats://central:4222\"\nupstream = \"http://keystone:5000\"\n\
         insecure_plaintext_sync = true\nbroker_token = \"broker-secret-31\"\nhello_interval = \"3s\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .args(["config", "check", "edge", "--hello-interval", "4s"])
        .env("SYNCGATE_CONFIG", &good)
        .env("SYNCGATE_UPSTREAM_TIMEOUT", "12s")
        .env("OS_USERNAME", "sync")
        .env("OS_PASSWORD", "os-secret-32")
        .env("OS_PROJECT_NAME", "service")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "id = \"edge1\"  # file",
        "hello_interval = \"4s\"  # --hello-interval",
        "upstream_timeout = \"12s\"  # SYNCGATE_UPSTREAM_TIMEOUT",
        "broker_token = \"***\"  # file",
        "db = \"sqlite://syncgate-edge.db\"  # default",
    ] {
        assert!(stdout.contains(line), "{line} missing from\n{stdout}");
    }
    assert!(!stdout.contains("secret-3"), "{stdout}");

    // Without the edge's service credentials the same check fails as start-up would.
    let (code, err) = run(&[
        "--config",
        good.to_str().unwrap(),
        "config",
        "check",
        "edge",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("OS_USERNAME"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // A bad file stops start-up with exit 2 and one line naming the key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[central]\nupstream = \"http://k\"\nack_timeout = \"soonish\"\n",
    )
    .unwrap();
    for args in [
        vec!["central", "--config", bad.to_str().unwrap()],
        vec![
            "config",
            "check",
            "--config",
            bad.to_str().unwrap(),
            "central",
        ],
    ] {
        let (code, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("[central] ack_timeout") && err.contains("bad.toml"),
            "{err}"
        );
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
}

/// `syncgate oplog copy` copies a SQLite op log into a new database (a
/// PostgreSQL one in the run on PostgreSQL), says what it copied, refuses a
/// target that holds an op log already and a source that is not there, and
/// never shows a password given in a URL.
#[tokio::test]
async fn oplog_copy_copies_into_a_new_database_and_refuses_a_filled_one() {
    use syncgate::store::{NewIntent, OpState, Outcome, Store};
    let dir = tempfile::tempdir().unwrap();
    let from = format!("sqlite://{}", dir.path().join("from.db").display());
    let source = Store::open(&from).await.unwrap();
    let mut op_ids = Vec::new();
    for i in 0..3 {
        let path = format!("/v3/projects/p{i}");
        let op = source
            .begin_intent(&NewIntent {
                method: "PATCH",
                path: &path,
                class: "resource",
                kind: "project",
                body: Some("{}"),
                refs: "[]",
                traceparent: None,
                touches: &[],
            })
            .await
            .unwrap();
        source
            .commit_intent(op, OpState::Committed, &Outcome::default())
            .await
            .unwrap();
        op_ids.push(op.to_string());
    }
    source.register_edge("site1", true).await.unwrap();
    // Its watermark and an exception travel with it: op 1 applied there,
    // op 2 failed.
    use syncgate::protocol::messages::{Ack, Outcome as Acked};
    for (seq, outcome) in [(1, Acked::Applied), (2, Acked::Failed)] {
        let ack = Ack {
            seq,
            op_id: op_ids[seq as usize - 1].clone(),
            outcome,
            status: Some(409),
            detail: Some(format!("op {seq} at site1")),
            edge_id_created: vec![],
            operator_skipped: false,
        };
        source.record_ack("site1", &ack).await.unwrap();
    }
    let timeout = std::time::Duration::from_secs(3600);
    let deliveries = |store: &Store| {
        let store = store.clone();
        async move {
            let mut all = Vec::new();
            for seq in 1..=3 {
                for d in store.deliveries(seq, timeout).await.unwrap() {
                    all.push((seq, d.edge, d.state, d.status, d.detail));
                }
            }
            (store.edge_position("site1").await.unwrap(), all)
        }
    };
    let before = deliveries(&source).await;
    assert_eq!(before.0, Some((2, 2)), "{before:?}");
    source.close().await;
    let target_dir = tempfile::tempdir().unwrap();
    let to = crate::helpers::central_db(target_dir.path()).await;

    let copy = |to: String| {
        let from = from.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
                .args(["oplog", "copy", "--from", &from, "--to", &to])
                .output()
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (code, stdout, stderr) = copy(to.clone()).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("last seq 3"), "{stdout}");
    assert!(
        stdout.contains("ops: 3 rows") && stdout.contains("edges: 1 rows"),
        "{stdout}"
    );
    let copied = Store::open(&to).await.unwrap();
    assert_eq!(copied.last_seq().await.unwrap(), 3);
    assert_eq!(copied.edges().await.unwrap()[0].id, "site1");
    assert_eq!(deliveries(&copied).await, before);
    copied.close().await;

    let (code, _, stderr) = copy(to.clone()).await.unwrap();
    assert_eq!(code, 1);
    assert!(stderr.contains("already holds an op log"), "{stderr}");

    let (code, _, stderr) = copy("postgres://sync:hunter2@127.0.0.1:1/x".into())
        .await
        .unwrap();
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--to") && !stderr.contains("hunter2"),
        "{stderr}"
    );

    let missing = format!("sqlite://{}", dir.path().join("none.db").display());
    let (code, _, stderr) = tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
            .args([
                "oplog",
                "copy",
                "--from",
                &missing,
                "--to",
                "sqlite:///tmp/never",
            ])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::new(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(stderr.contains("no op log there"), "{stderr}");
    assert!(!std::path::Path::new("/tmp/never").exists());
}
