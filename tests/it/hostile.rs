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
