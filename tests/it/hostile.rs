//! Hostile and careless input at the proxy: no replicable write escapes capture.
//! A write's target is normalised once and the upstream gets exactly what was
//! classified; what cannot be normalised safely is refused before the upstream
//! sees it.

use reqwest::Method;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test]
async fn disguised_writes_are_captured_as_what_the_upstream_applies() {
    let app = spawn_app().await;
    for (i, path) in [
        "/v3/%70rojects",
        "/%76%33/projects",
        "/v3//projects",
        "/v3/x/%2e%2e/projects",
    ]
    .into_iter()
    .enumerate()
    {
        let resp = app
            .write(
                "POST",
                path,
                Some(json!({"project": {"name": format!("p{i}")}})),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 201, "{path}");
        let (_, seen, _, _) = app.fake.last_request();
        assert_eq!(
            seen, "/v3/projects",
            "{path}: the upstream got the normalised target"
        );
    }
    let ops = app.all_ops().await;
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert!(ops
        .iter()
        .all(|o| o["path"] == "/v3/projects" && o["kind"] == "project"));
    app.stop().await;
}

#[tokio::test]
async fn targets_that_cannot_be_normalised_safely_are_refused_before_the_upstream() {
    let app = spawn_app().await;
    let id = "0123456789abcdef0123456789abcdef";
    let cases = [
        ("DELETE", format!("/v3/projects%2F{id}")),
        ("DELETE", format!("/v3/projects%2f{id}")),
        ("DELETE", format!("/v3/projects%5C{id}")),
        ("PATCH", format!("/v3/projects/{id}%00")),
        ("PATCH", format!("/v3/projects/{id}%FF")),
        ("POST", "/v3/projects%zz".to_string()),
        ("post", "/v3/projects".to_string()),
        ("Delete", format!("/v3/projects/{id}")),
    ];
    for (method, path) in cases {
        let resp = app
            .client
            .request(
                Method::from_bytes(method.as_bytes()).unwrap(),
                app.url(&path),
            )
            .header("x-auth-token", "t")
            .json(&json!({"project": {"name": "x"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{method} {path}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], 400);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("refused"),
            "{body}"
        );
    }
    assert_eq!(app.fake.count(), 0, "nothing reached the upstream");
    assert!(app.all_ops().await.is_empty());
    app.stop().await;
}

/// Headers an upstream server or WSGI stack may use to route or re-read a
/// request (gunicorn takes `SCRIPT_NAME` from a trusted peer and strips it from
/// the path; frameworks honour method overrides and original-URL headers) are
/// refused on every request: what the gateway classifies is what Keystone routes.
#[tokio::test]
async fn headers_that_could_route_a_request_differently_upstream_are_refused() {
    let app = spawn_app().await;
    let headers = [
        ("SCRIPT_NAME", "/x"),
        ("Script-Name", "/x"),
        ("PATH_INFO", "/v3/users"),
        ("X-Original-URL", "/v3/users"),
        ("X-Original-URI", "/v3/users"),
        ("X-Rewrite-URL", "/v3/users"),
        ("X-Forwarded-Prefix", "/x"),
        ("X-Forwarded-Path", "/v3/users"),
        ("X-Envoy-Original-Path", "/v3/users"),
        ("X-HTTP-Method-Override", "POST"),
        ("X-HTTP-Method", "DELETE"),
        ("X-Method-Override", "PATCH"),
        ("X_Auth_Token", "t"),
    ];
    for (name, value) in headers {
        for (method, path) in [("POST", "/x/v3/users"), ("GET", "/v3/users")] {
            let resp = app
                .client
                .request(
                    Method::from_bytes(method.as_bytes()).unwrap(),
                    app.url(path),
                )
                .header("x-auth-token", "t")
                .header(name, value)
                .json(&json!({"user": {"name": "sneaky"}}))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 400, "{method} {path} with {name}");
            let body: serde_json::Value = resp.json().await.unwrap();
            let message = body["error"]["message"].as_str().unwrap();
            assert!(
                message.contains("refused") && message.contains(&name.to_ascii_lowercase()),
                "{message}"
            );
        }
    }
    assert_eq!(app.fake.count(), 0, "nothing reached the upstream");
    assert!(app.all_ops().await.is_empty());
    // Ordinary forwarding headers still pass.
    let resp = app
        .client
        .get(app.url("/v3/users"))
        .header("x-auth-token", "t")
        .header("x-forwarded-for", "10.0.0.1")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    app.stop().await;
}

#[tokio::test]
async fn bodies_keystone_could_read_differently_are_refused() {
    let app = spawn_app().await;
    let cases: [&[u8]; 4] = [
        br#"{"user": {"name": "a", "password": "p1", "name": "b"}}"#,
        br#"{"user": {"name": "a", "enabled": NaN}}"#,
        b"{\"user\": {\"name\": \"\xff\"}}",
        br#"{"user": {"name": "a"}} {"user": {}}"#,
    ];
    for body in cases {
        let resp = app
            .client
            .post(app.url("/v3/users"))
            .header("x-auth-token", "t")
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            400,
            "{}",
            String::from_utf8_lossy(body)
        );
        let text = resp.text().await.unwrap();
        assert!(text.contains("refused"), "{text}");
        assert!(!text.contains("p1"), "no value is echoed: {text}");
    }
    assert_eq!(app.fake.count(), 0, "nothing reached the upstream");
    app.stop().await;
}

#[tokio::test]
async fn a_keystone_error_that_echoes_a_password_is_scrubbed_everywhere() {
    let env = crate::sync::sync_env(&["edge-a"], None, |_| {}).await;
    let secret = "pw-echo-4431";
    env.edges[0].site.state.lock().unwrap().echo_next = true;
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "bob", "password": secret}}),
    )
    .await;
    env.until_delivered(&["edge-a"], &["failed"]).await;
    for path in ["/v1/out-of-sync", "/v1/ops/1", "/v1/ops"] {
        let text = env.audit(path).await.to_string();
        assert!(!text.contains(secret), "{path}: {text}");
    }
    let oos = env.audit("/v1/out-of-sync").await;
    let detail = oos["out_of_sync"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("'***' is too short"), "{detail}");
    env.shutdown().await;
}

mod bounded {
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use crate::helpers::spawn_app_with;

    fn addr(url: &str) -> String {
        url.trim_start_matches("http://").to_string()
    }

    /// Reads until the server closes the connection; returns what it sent.
    async fn until_closed(stream: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the server closed the connection");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_trickles_its_headers_is_dropped() {
        let app = spawn_app_with(|c| c.http.header_timeout = Duration::from_millis(300)).await;
        for listener in [app.proxy.clone(), app.admin.clone()] {
            let mut s = TcpStream::connect(addr(&listener)).await.unwrap();
            s.write_all(b"POST /v3/projects HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            let started = Instant::now();
            until_closed(&mut s).await;
            assert!(started.elapsed() < Duration::from_secs(5), "{listener}");
        }
        assert_eq!(app.fake.count(), 0);
        app.stop().await;
    }

    #[tokio::test]
    async fn a_client_that_pauses_in_its_body_gets_408_and_nothing_is_forwarded() {
        let app = spawn_app_with(|c| c.http.body_timeout = Duration::from_millis(300)).await;
        let mut s = TcpStream::connect(addr(&app.proxy)).await.unwrap();
        s.write_all(
            b"POST /v3/projects HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"project\":",
        )
        .await
        .unwrap();
        let answer = until_closed(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("paused"), "{answer}");
        assert_eq!(app.fake.count(), 0);
        assert!(app.all_ops().await.is_empty());
        app.stop().await;
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_one() {
        let app = spawn_app_with(|c| c.http.max_connections = 1).await;
        let mut first = TcpStream::connect(addr(&app.proxy)).await.unwrap();
        first
            .write_all(b"GET /v3 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        first.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        // The first connection stays open (keep-alive): the second waits.
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        assert!(client.get(app.url("/v3")).send().await.is_err());
        drop(first);
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), client.get(app.url("/v3")).send())
            .await
            .expect("served once the first connection closed")
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        app.stop().await;
    }

    #[tokio::test]
    async fn shutdown_ends_within_the_grace_period_and_leaves_no_open_intent() {
        let app = spawn_app_with(|c| c.http.shutdown_grace = Duration::from_millis(500)).await;
        // A write whose upstream never answers (within the 30 s upstream timeout).
        let url = app.url("/v3/projects");
        let client = app.client.clone();
        let stuck = tokio::spawn(async move {
            client
                .post(url)
                .header("x-fake-hang", "1")
                .json(&serde_json::json!({"project": {"name": "stuck"}}))
                .send()
                .await
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while app.fake.count() == 0 {
            assert!(Instant::now() < deadline, "the write reached the upstream");
            tokio::task::yield_now().await;
        }
        let db = app.db_url.clone();
        let started = Instant::now();
        let (_fake, dir) = app.stop().await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "stopped in {:?}",
            started.elapsed()
        );
        let _ = stuck.await;
        let store = syncgate::store::Store::open(&db).await.unwrap();
        assert_eq!(
            store.open_intents().await.unwrap(),
            0,
            "no intent left open"
        );
        let op = store.get_op(1).await.unwrap().expect("the write is an op");
        assert_eq!(op.state, "unknown_outcome");
        store.close().await;
        drop(dir);
    }
}

mod at_rest {
    use serde_json::json;
    use syncgate::protocol::crypto::generate_key;
    use syncgate::settings::config::{Secret, SyncKey};

    use crate::fake_keystone::FakeKeystone;
    use crate::helpers::{config_for, spawn_app_with, start};

    /// Every byte of the op log's files, as text.
    fn raw_files(db_url: &str) -> String {
        let path = db_url.trim_start_matches("sqlite://");
        let mut all = String::new();
        for suffix in ["", "-wal"] {
            if let Ok(bytes) = std::fs::read(format!("{path}{suffix}")) {
                all.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        all
    }

    /// Starts central on an existing op log with the given keys; shows op `seq`.
    async fn with_keys(
        fake: FakeKeystone,
        db: &str,
        keys: &str,
        seq: i64,
    ) -> (FakeKeystone, serde_json::Value) {
        let mut config = config_for(&fake, db);
        config.sync.key = SyncKey::Key(Secret::new(keys));
        let app = start(fake, config).await;
        let op: serde_json::Value = app
            .admin_get(&format!("/v1/ops/{seq}"))
            .await
            .json()
            .await
            .unwrap();
        let (fake, _) = app.stop().await;
        (fake, op)
    }

    #[tokio::test]
    async fn passwords_are_sealed_at_rest_and_the_key_rotates() {
        let (old, new) = (generate_key(), generate_key());
        let secret = "at-rest-secret-5521";
        let app = spawn_app_with(|c| c.sync.key = SyncKey::Key(Secret::new(old.clone()))).await;
        let resp = app
            .write(
                "POST",
                "/v3/users",
                Some(json!({"user": {"name": "u1", "password": secret}})),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 201);
        let db = app.db_url.clone();
        let (mut fake, dir) = app.stop().await;
        assert!(
            !raw_files(&db).contains(secret),
            "no password in the op log's files"
        );

        // Rotation: the new key beside the old, then first, then alone.
        for keys in [format!("{old},{new}"), format!("{new},{old}"), new.clone()] {
            let (f, op) = with_keys(fake, &db, &keys, 1).await;
            fake = f;
            assert_eq!(op["body"]["user"]["name"], "u1", "{op}");
            assert_eq!(op["body"]["user"]["password"], "***");
        }
        // The old key alone cannot read what the new one sealed: a clear error.
        let mut config = config_for(&fake, &db);
        config.sync.key = SyncKey::Key(Secret::new(old));
        let err = syncgate::Central::build(config)
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains("does not have"), "{err}");
        assert!(!err.to_string().contains(secret));
        drop(dir);
    }

    #[tokio::test]
    async fn an_op_log_with_bodies_in_clear_is_sealed_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", dir.path().join("old.db").display());
        let secret = "clear-from-before-7731";
        // As the previous version wrote it: the body in clear.
        let store = syncgate::store::Store::open(&db).await.unwrap();
        let id = store
            .begin_intent(&syncgate::store::NewIntent {
                method: "POST",
                path: "/v3/users",
                class: "identity",
                kind: "user",
                body: Some(&format!(
                    r#"{{"user": {{"name": "u", "password": "{secret}"}}}}"#
                )),
                refs: "[]",
                traceparent: None,
                touches: &[],
            })
            .await
            .unwrap();
        store
            .commit_intent(id, syncgate::store::OpState::Committed, &Default::default())
            .await
            .unwrap();
        store.close().await;
        assert!(raw_files(&db).contains(secret));
        let fake = FakeKeystone::start().await;
        let (_, op) = with_keys(fake, &db, &generate_key(), 1).await;
        assert_eq!(op["body"]["user"]["name"], "u");
        assert!(!raw_files(&db).contains(secret), "sealed on disk");
    }
}

#[tokio::test]
async fn an_oversized_answer_to_a_captured_write_is_not_read_whole() {
    let app = spawn_app().await;
    let big = syncgate::proxy::capture::MAX_CAPTURED_RESPONSE + 1;
    let resp = app
        .client
        .post(app.url("/v3/projects"))
        .header("x-auth-token", "t")
        .header("x-fake-big", big.to_string())
        .json(&json!({"project": {"name": "big"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 502);
    let ops = app.all_ops().await;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["state"], "unknown_outcome");
    assert!(ops[0]["detail"].as_str().unwrap().contains("larger"));
    app.stop().await;
}
