//! Capture: which writes become ops, what an op holds, and that seq stays
//! gap-free under concurrency and across a crash.

use std::collections::BTreeSet;

use serde_json::{json, Value};
use syncgate::keystone::RouteClass;
use syncgate::store::{NewIntent, Store};

use crate::fake_keystone::new_id;
use crate::helpers::{config_for, spawn_app, spawn_app_with, start};

/// One replicable write of each kind: method, path, body, class, kind, and
/// whether it creates (so the op must name the created ID).
/// Method, path, body, class, kind, and whether the write creates.
type KindWrite = (
    &'static str,
    String,
    Option<Value>,
    &'static str,
    &'static str,
    bool,
);

fn one_write_per_kind() -> Vec<KindWrite> {
    let id = new_id;
    let (u, g, p, d, r) = (id(), id(), id(), id(), id());
    vec![
        (
            "POST",
            "/v3/users".into(),
            Some(json!({"user": {"id": "mine", "name": "u", "password": "pw"}})),
            "identity",
            "user",
            true,
        ),
        (
            "PATCH",
            format!("/v3/users/{u}"),
            Some(json!({"user": {"email": "e@x"}})),
            "identity",
            "user",
            false,
        ),
        (
            "POST",
            format!("/v3/users/{u}/password"),
            Some(json!({"user": {"password": "n", "original_password": "o"}})),
            "identity",
            "user_password",
            false,
        ),
        (
            "POST",
            "/v3/groups".into(),
            Some(json!({"group": {"name": "g"}})),
            "identity",
            "group",
            true,
        ),
        (
            "PUT",
            format!("/v3/groups/{g}/users/{u}"),
            None,
            "identity",
            "group_membership",
            false,
        ),
        (
            "POST",
            "/v3/domains".into(),
            Some(json!({"domain": {"name": "d"}})),
            "resource",
            "domain",
            true,
        ),
        (
            "PUT",
            format!("/v3/domains/{d}/config"),
            Some(json!({"config": {"ldap": {"url": "ldap://x"}}})),
            "resource",
            "domain_config",
            false,
        ),
        (
            "POST",
            "/v3/projects".into(),
            Some(json!({"project": {"name": "p", "id": "mine"}})),
            "resource",
            "project",
            true,
        ),
        (
            "PUT",
            format!("/v3/projects/{p}/tags/blue"),
            None,
            "resource",
            "project_tag",
            false,
        ),
        (
            "POST",
            "/v3/roles".into(),
            Some(json!({"role": {"name": "r"}})),
            "assignment",
            "role",
            true,
        ),
        (
            "PUT",
            format!("/v3/roles/{r}/implies/{}", id()),
            None,
            "assignment",
            "implied_role",
            false,
        ),
        (
            "PUT",
            format!("/v3/projects/{p}/users/{u}/roles/{r}"),
            None,
            "assignment",
            "grant",
            false,
        ),
        (
            "PUT",
            format!("/v3/domains/{d}/groups/{g}/roles/{r}"),
            None,
            "assignment",
            "grant",
            false,
        ),
        (
            "PUT",
            format!("/v3/system/users/{u}/roles/{r}"),
            None,
            "assignment",
            "grant",
            false,
        ),
        (
            "PUT",
            format!("/v3/OS-INHERIT/domains/{d}/groups/{g}/roles/{r}/inherited_to_projects"),
            None,
            "assignment",
            "inherited_grant",
            false,
        ),
        (
            "POST",
            "/v3/credentials".into(),
            Some(json!({"credential": {"blob": "{}", "type": "ec2", "user_id": u}})),
            "credentials",
            "credential",
            true,
        ),
        (
            "POST",
            format!("/v3/users/{u}/credentials/OS-EC2"),
            Some(json!({"tenant_id": p})),
            "credentials",
            "ec2_credential",
            true,
        ),
        (
            "POST",
            "/v3/policies".into(),
            Some(json!({"policy": {"blob": "{}", "type": "application/json"}})),
            "policy",
            "policy",
            true,
        ),
        (
            "PUT",
            format!(
                "/v3/policies/{}/OS-ENDPOINT-POLICY/endpoints/{}",
                id(),
                id()
            ),
            None,
            "policy",
            "endpoint_policy",
            false,
        ),
        (
            "POST",
            "/v3/registered_limits".into(),
            Some(
                json!({"registered_limits": [{"service_id": id(), "resource_name": "cores", "default_limit": 10}]}),
            ),
            "limits",
            "registered_limit",
            true,
        ),
        (
            "POST",
            "/v3/limits".into(),
            Some(
                json!({"limits": [{"project_id": p, "service_id": id(), "resource_name": "cores", "resource_limit": 5}]}),
            ),
            "limits",
            "limit",
            true,
        ),
        (
            "PUT",
            "/v3/OS-FEDERATION/identity_providers/idp1".into(),
            Some(json!({"identity_provider": {"enabled": true}})),
            "federation",
            "identity_provider",
            true,
        ),
        (
            "PUT",
            "/v3/OS-FEDERATION/identity_providers/idp1/protocols/saml2".into(),
            Some(json!({"protocol": {"mapping_id": "m1"}})),
            "federation",
            "federation_protocol",
            true,
        ),
        (
            "PUT",
            "/v3/OS-FEDERATION/mappings/m1".into(),
            Some(json!({"mapping": {"rules": []}})),
            "federation",
            "mapping",
            true,
        ),
        (
            "PUT",
            "/v3/OS-FEDERATION/service_providers/sp1".into(),
            Some(json!({"service_provider": {"auth_url": "http://x", "sp_url": "http://y"}})),
            "federation",
            "service_provider",
            true,
        ),
        (
            "POST",
            "/v3/regions".into(),
            Some(json!({"region": {"description": "r"}})),
            "catalog",
            "region",
            true,
        ),
        (
            "POST",
            "/v3/services".into(),
            Some(json!({"service": {"type": "compute"}})),
            "catalog",
            "service",
            true,
        ),
        (
            "POST",
            "/v3/endpoints".into(),
            Some(json!({"endpoint": {"url": "http://x", "interface": "public"}})),
            "catalog",
            "endpoint",
            true,
        ),
        (
            "POST",
            "/v3/OS-EP-FILTER/endpoint_groups".into(),
            Some(json!({"endpoint_group": {"filters": {}}})),
            "catalog",
            "endpoint_group",
            true,
        ),
        (
            "DELETE",
            format!("/v3/projects/{p}"),
            None,
            "resource",
            "project",
            false,
        ),
    ]
}

/// The created IDs an upstream response names.
fn ids_in(resp: &Value) -> Vec<String> {
    let (_, entity) = resp.as_object().unwrap().iter().next().unwrap();
    let id_of = |e: &Value| {
        e.get("id")
            .or_else(|| e.get("access"))
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    };
    match entity {
        Value::Array(items) => items.iter().map(id_of).collect(),
        e => vec![id_of(e)],
    }
}

#[tokio::test]
async fn each_replicable_route_kind_yields_exactly_one_op() {
    let app = spawn_app_with(|c| c.replicate = RouteClass::ALL.to_vec()).await;
    let writes = one_write_per_kind();
    let kinds: BTreeSet<_> = writes.iter().map(|w| w.4).collect();
    assert!(kinds.len() >= 25, "the table covers every kind");

    for (n, (method, path, body, class, kind, creates)) in writes.into_iter().enumerate() {
        let resp = app.write(method, &path, body.clone()).await;
        assert!(
            resp.status().is_success(),
            "{method} {path}: {}",
            resp.status()
        );
        let request_id = resp.headers()["x-openstack-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let text = resp.text().await.unwrap();
        let ops = app.all_ops().await;
        assert_eq!(ops.len(), n + 1, "{method} {path} must add exactly one op");
        let op = ops.last().unwrap();
        assert_eq!(op["seq"], n as i64 + 1);
        assert_eq!(op["state"], "committed");
        assert_eq!(op["method"], method);
        assert_eq!(op["path"], path.as_str());
        assert_eq!(op["class"], class, "{path}");
        assert_eq!(op["kind"], kind, "{path}");
        assert_eq!(op["request_id"], request_id.as_str());
        assert!(op["upstream_status"].as_i64().unwrap() / 100 == 2);
        assert!(uuid::Uuid::parse_str(op["op_id"].as_str().unwrap()).is_ok());
        let created: Vec<String> = serde_json::from_value(op["created_ids"].clone()).unwrap();
        if creates {
            let upstream: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(created, ids_in(&upstream), "{path}");
            assert!(
                !created.contains(&"mine".to_string()),
                "the client's id is not the created id"
            );
        } else {
            assert!(created.is_empty(), "{path}: {created:?}");
        }
    }
}

#[tokio::test]
async fn domain_and_region_creates_carry_the_generated_id_and_others_do_not() {
    let app = spawn_app_with(|c| c.replicate = RouteClass::ALL.to_vec()).await;
    let domain: Value = app
        .write(
            "POST",
            "/v3/domains",
            Some(json!({"domain": {"name": "edge-d"}})),
        )
        .await
        .json()
        .await
        .unwrap();
    let region: Value = app
        .write(
            "POST",
            "/v3/regions",
            Some(json!({"region": {"description": "r"}})),
        )
        .await
        .json()
        .await
        .unwrap();
    app.write(
        "POST",
        "/v3/limits",
        Some(json!({"limits": [{"resource_name": "x", "resource_limit": 1}]})),
    )
    .await;
    let ops = app.all_ops().await;
    assert_eq!(
        ops[0]["body"]["domain"]["explicit_domain_id"],
        domain["domain"]["id"]
    );
    assert_eq!(ops[0]["body"]["domain"]["name"], "edge-d");
    assert_eq!(ops[1]["body"]["region"]["id"], region["region"]["id"]);
    assert!(
        ops[2]["body"]["limits"][0].get("id").is_none(),
        "no id added to a limit"
    );
}

#[tokio::test]
async fn token_requests_excluded_classes_and_failed_writes_are_not_ops() {
    let app = spawn_app().await;
    let u = new_id();
    let not_ops: Vec<(&str, String, Option<&str>)> = vec![
        ("POST", "/v3/auth/tokens".into(), None),
        ("DELETE", "/v3/auth/tokens".into(), None),
        ("POST", "/v3/ec2tokens".into(), None),
        ("POST", "/v3/s3tokens".into(), None),
        ("POST", "/v3/OS-OAUTH1/consumers".into(), None),
        (
            "POST",
            format!("/v3/users/{u}/application_credentials"),
            None,
        ),
        ("POST", "/v3/OS-TRUST/trusts".into(), None),
        // Catalog is off by default: each site has its own endpoints.
        ("POST", "/v3/services".into(), None),
        ("POST", "/v3/regions".into(), None),
        ("GET", "/v3/users".into(), None),
        ("POST", "/v3/projects".into(), Some("409")),
        ("PATCH", format!("/v3/users/{u}"), Some("404")),
        ("POST", "/v3/users".into(), Some("500")),
        ("DELETE", format!("/v3/users/{u}"), Some("403")),
    ];
    for (method, path, fail) in &not_ops {
        let mut req = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .json(&json!({"project": {"name": "x"}}));
        if let Some(code) = fail {
            req = req.header("x-fake-status", *code);
        }
        let resp = req.send().await.unwrap();
        if let Some(code) = fail {
            assert_eq!(resp.status().as_str(), *code, "{method} {path}");
        }
    }
    assert_eq!(
        app.fake.count(),
        not_ops.len(),
        "every request reached the upstream"
    );
    assert!(app.all_ops().await.is_empty());
    // Failed writes leave no intent.
    app.until_metric("syncgate_oplog_open_intents 0").await;
}

#[tokio::test]
async fn oversized_write_is_413_and_never_reaches_the_upstream() {
    let app = spawn_app_with(|c| c.max_capture_body = 1024).await;
    let big = "x".repeat(2048);
    let resp = app
        .write(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": big}})),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 413);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], 413);

    // The same without a declared length (chunked): still refused before forwarding.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 512]))),
    );
    let resp = app
        .client
        .post(app.url("/v3/projects"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(app.fake.count(), 0, "nothing reached the upstream");
    assert!(app.all_ops().await.is_empty());

    // Reads and non-replicated writes are streamed, whatever their size.
    let resp = app
        .client
        .post(app.url("/v3/auth/tokens"))
        .body(big.repeat(100))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
}

#[tokio::test]
async fn concurrent_writes_get_gap_free_seqs() {
    let app = spawn_app().await;
    let writes = (0..200).map(|i| {
        let app = &app;
        async move {
            let resp = app
                .write(
                    "POST",
                    "/v3/projects",
                    Some(json!({"project": {"name": format!("p{i}")}})),
                )
                .await;
            assert_eq!(resp.status().as_u16(), 201);
        }
    });
    futures_util::future::join_all(writes).await;
    let ops = app.all_ops().await;
    let seqs: Vec<i64> = ops.iter().map(|o| o["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    let names: BTreeSet<_> = ops
        .iter()
        .map(|o| o["body"]["project"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 200, "every write is logged once");
}

#[tokio::test]
async fn an_intent_left_open_by_a_crash_is_unknown_outcome_after_restart() {
    let app = spawn_app().await;
    app.write(
        "POST",
        "/v3/projects",
        Some(json!({"project": {"name": "before"}})),
    )
    .await;
    let db_url = app.db_url.clone();
    let key = app.key.clone();
    let (fake, dir) = app.stop().await;

    // A crash between forwarding and logging leaves the intent open.
    let store = Store::open(&db_url).await.unwrap();
    store
        .begin_intent(&NewIntent {
            method: "PATCH",
            path: "/v3/users/abc",
            class: "identity",
            kind: "user",
            body: Some(r#"{"user": {"password": "crash-time-pw"}}"#),
            refs: "[]",
            traceparent: None,
            touches: &[],
        })
        .await
        .unwrap();
    store.close().await;

    let mut config = config_for(&fake, &db_url);
    config.sync.key = key;
    let app = start(fake, config).await;
    let ops = app.all_ops().await;
    assert_eq!(ops.len(), 2);
    assert_eq!(ops[0]["state"], "committed");
    assert_eq!(ops[1]["seq"], 2);
    assert_eq!(ops[1]["state"], "unknown_outcome");
    assert_eq!(ops[1]["path"], "/v3/users/abc");
    assert_eq!(ops[1]["body"]["user"]["password"], "***");
    let unknown: Value = app
        .admin_get("/v1/ops?state=unknown_outcome")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(unknown["ops"].as_array().unwrap().len(), 1);

    // New writes continue the sequence.
    app.write(
        "POST",
        "/v3/projects",
        Some(json!({"project": {"name": "after"}})),
    )
    .await;
    assert_eq!(app.all_ops().await.last().unwrap()["seq"], 3);
    drop(dir);
}
