//! Initial sync, repair and drift audit in process: central and edges with
//! fake sites, entities made directly on a site's identity API (before
//! syncgate, or bypassing it).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fake_site::FakeSite;
use crate::sync::{admin_token, sync_env, SyncEnv};

/// A write straight to a site, with that site's admin token.
pub async fn direct(
    env: &SyncEnv,
    site: &FakeSite,
    method: &str,
    path: &str,
    body: Value,
) -> Value {
    let token = admin_token(&env.http, &site.url(), &site.admin_password).await;
    let mut req = env
        .http
        .request(method.parse().unwrap(), format!("{}{path}", site.url()))
        .header("x-auth-token", token);
    if !body.is_null() {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{method} {path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

async fn made(env: &SyncEnv, site: &FakeSite, path: &str, kind: &str, body: Value) -> String {
    let v = direct(env, site, "POST", path, json!({ kind: body })).await;
    v[kind]["id"].as_str().unwrap().to_string()
}

/// A small cloud made on central's site directly: a domain with a project
/// tree, a group, users, global and domain roles, an implied role, grants
/// (project, inherited on a domain, system), a policy, a service and a
/// registered limit for it.
async fn seed(env: &SyncEnv, site: &FakeSite) {
    let acme = made(
        env,
        site,
        "/v3/domains",
        "domain",
        json!({"name": "acme", "description": "a"}),
    )
    .await;
    let web = made(
        env,
        site,
        "/v3/projects",
        "project",
        json!({"name": "web", "domain_id": acme, "tags": ["prod"]}),
    )
    .await;
    made(
        env,
        site,
        "/v3/projects",
        "project",
        json!({"name": "web-db", "domain_id": acme, "parent_id": web}),
    )
    .await;
    let ops = made(
        env,
        site,
        "/v3/groups",
        "group",
        json!({"name": "ops", "domain_id": acme}),
    )
    .await;
    let ann = made(
        env,
        site,
        "/v3/users",
        "user",
        json!({"name": "ann", "domain_id": acme, "email": "ann@acme", "default_project_id": web, "password": "ann-secret-1"}),
    )
    .await;
    let ben = made(
        env,
        site,
        "/v3/users",
        "user",
        json!({"name": "ben", "password": "ben-secret-1"}),
    )
    .await;
    let auditor = made(env, site, "/v3/roles", "role", json!({"name": "auditor"})).await;
    let operator = made(
        env,
        site,
        "/v3/roles",
        "role",
        json!({"name": "operator", "domain_id": acme}),
    )
    .await;
    let admin_role = site.id_of("role", "admin").unwrap();
    direct(
        env,
        site,
        "PUT",
        &format!("/v3/groups/{ops}/users/{ann}"),
        Value::Null,
    )
    .await;
    direct(
        env,
        site,
        "PUT",
        &format!("/v3/roles/{admin_role}/implies/{auditor}"),
        Value::Null,
    )
    .await;
    direct(
        env,
        site,
        "PUT",
        &format!("/v3/projects/{web}/users/{ann}/roles/{auditor}"),
        Value::Null,
    )
    .await;
    direct(
        env,
        site,
        "PUT",
        &format!(
            "/v3/OS-INHERIT/domains/{acme}/groups/{ops}/roles/{operator}/inherited_to_projects"
        ),
        Value::Null,
    )
    .await;
    direct(
        env,
        site,
        "PUT",
        &format!("/v3/system/users/{ben}/roles/{auditor}"),
        Value::Null,
    )
    .await;
    made(
        env,
        site,
        "/v3/policies",
        "policy",
        json!({"type": "application/json", "blob": "{\"a\": 1}"}),
    )
    .await;
    direct(
        env,
        site,
        "PUT",
        &format!("/v3/domains/{acme}/config"),
        json!({"config": {"identity": {"driver": "ldap"}, "ldap": {"url": "ldap://ldap.acme"}}}),
    )
    .await;
    made(
        env,
        site,
        "/v3/credentials",
        "credential",
        json!({"user_id": ann, "project_id": web, "type": "ec2",
               "blob": "{\"access\": \"ak\", \"secret\": \"credential-secret-8\"}"}),
    )
    .await;
    let nova = made(
        env,
        site,
        "/v3/services",
        "service",
        json!({"type": "compute", "name": "nova"}),
    )
    .await;
    direct(
        env,
        site,
        "POST",
        "/v3/registered_limits",
        json!({"registered_limits": [{"service_id": nova, "resource_name": "cores", "default_limit": 10}]}),
    )
    .await;
    direct(
        env,
        site,
        "POST",
        "/v3/limits",
        json!({"limits": [{"service_id": nova, "project_id": web, "resource_name": "cores", "resource_limit": 4}]}),
    )
    .await;
}

/// Each site's policies, registered limits and limits (by content and
/// service name), credentials (type, blob) and domain configurations.
fn unnamed_state(site: &FakeSite) -> (Vec<String>, Vec<String>) {
    let services = site.unnamed("service");
    let policies = site
        .unnamed("policy")
        .iter()
        .map(|p| p["blob"].as_str().unwrap().to_string())
        .collect();
    let limits = site
        .unnamed("registered_limit")
        .iter()
        .map(|l| {
            let svc = services
                .iter()
                .find(|s| s["id"] == l["service_id"])
                .map(|s| s["name"].as_str().unwrap().to_string())
                .unwrap_or_else(|| "?".into());
            format!("{svc} {} {}", l["resource_name"], l["default_limit"])
        })
        .chain(
            site.unnamed("limit")
                .iter()
                .map(|l| format!("limit {} {}", l["resource_name"], l["resource_limit"])),
        )
        .chain(
            site.unnamed("credential")
                .iter()
                .map(|c| format!("credential {} {}", c["type"], c["blob"])),
        )
        .chain(
            site.state
                .lock()
                .unwrap()
                .configs
                .values()
                .map(|c| format!("config {c}")),
        )
        .collect();
    (policies, limits)
}

async fn edge_row(env: &SyncEnv, edge: &str) -> Value {
    env.audit(&format!("/v1/edges/{edge}")).await
}

/// Waits for the edge's resync to end; returns its row (asserted done).
pub async fn resync_ended(env: &SyncEnv, edge: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let row = edge_row(env, edge).await;
        let phase = row["resync"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if phase == "done" {
            return row;
        }
        assert_ne!(phase, "failed", "resync failed: {row:#}");
        assert!(Instant::now() < deadline, "resync never ended: {row:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn post(env: &SyncEnv, path: &str) -> (u16, Value) {
    let resp = env
        .http
        .post(format!("{}{path}", env.admin))
        .send()
        .await
        .unwrap();
    (
        resp.status().as_u16(),
        resp.json().await.unwrap_or(Value::Null),
    )
}

/// Runs a drift audit of `edge` and waits for its findings.
pub async fn drift(env: &SyncEnv, edge: &str) -> Value {
    let (status, body) = post(env, &format!("/v1/drift/run?edge={edge}")).await;
    assert_eq!(status, 202, "{body}");
    drift_ended(env, edge).await
}

/// The drift audit of `edge` once it has ended (done; failed panics).
pub async fn drift_ended(env: &SyncEnv, edge: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = env.audit(&format!("/v1/drift?edge={edge}")).await;
        match d["runs"][0]["state"].as_str() {
            Some("done") => return d,
            Some("failed") => panic!("drift audit failed: {d:#}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "drift audit never ended: {d:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn found(d: &Value) -> Vec<(String, String, String, String)> {
    d["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["category"].as_str().unwrap().to_string(),
                x["kind"].as_str().unwrap().to_string(),
                x["key"].as_str().unwrap().to_string(),
                x.get("fields").map(Value::to_string).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_edge_that_joins_late_gets_centrals_state_then_follows_the_stream() {
    let mut env = sync_env(&[], None, |c| c.sync.edges = vec!["late".into()]).await;
    // Written through the gateway before the edge exists (with a password)...
    let early = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "early", "password": "early-secret-9"}}),
        )
        .await;
    // ... and made on central's Keystone directly.
    seed(&env, &env.central_site).await;
    let nova_at_edge = {
        env.initial_sync = true;
        env.add_edge("late", None).await;
        let site = &env.edges[0].site;
        made(
            &env,
            site,
            "/v3/services",
            "service",
            json!({"type": "compute", "name": "nova"}),
        )
        .await
    };
    let row = resync_ended(&env, "late").await;
    let result = &row["resync"]["result"];
    assert_eq!(result["failed"], 0, "{row:#}");
    env.assert_in_sync().await;
    assert_eq!(
        unnamed_state(&env.edges[0].site),
        unnamed_state(&env.central_site),
        "policies and registered limits"
    );
    // The registered limit names the edge's own nova service.
    assert_eq!(
        env.edges[0].site.unnamed("registered_limit")[0]["service_id"],
        json!(nova_at_edge)
    );
    // The password the op log carried reached the edge; the others cannot.
    let site = &env.edges[0].site;
    let early_at_edge = site.id_of("user", "early").unwrap();
    assert_eq!(
        site.state
            .lock()
            .unwrap()
            .passwords
            .get(&early_at_edge)
            .map(String::as_str),
        Some("early-secret-9")
    );
    let d = drift(&env, "late").await;
    assert_eq!(found(&d), vec![], "nothing differs after the resync: {d:#}");
    assert_eq!(d["runs"][0]["needs_password"], 2, "{d:#}");
    let users: Vec<&str> = row["needs_password"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_key"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["Default/ben", "acme/ann"], "{row:#}");
    assert!(
        !row.to_string().contains("secret"),
        "no password in the status: {row}"
    );

    // The stream continues after the fence: a later write is replayed.
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "after"}}),
    )
    .await;
    // A password set through the gateway clears the user's need.
    let ann = env.central_site.id_of("user", "ann").unwrap();
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{ann}"),
            Some(json!({"user": {"password": "ann-new-secret"}})),
        )
        .await;
    assert_eq!(status, 200);
    env.assert_in_sync().await;
    env.until("ann no longer needs a password", || async {
        edge_row(&env, "late").await["needs_password"]["count"] == 1
    })
    .await;
    let _ = early;
    env.until_metrics(
        "gauges of the resync",
        &[
            "syncgate_resync_running{edge=\"late\"} 0",
            "syncgate_resync_failed{edge=\"late\"} 0",
            "syncgate_users_needing_password{edge=\"late\"} 1",
        ],
    )
    .await;
    env.shutdown().await;
}

#[tokio::test]
async fn a_resync_adopts_what_matches_overwrites_what_conflicts_and_prunes_only_when_asked() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let central = &env.central_site;
    let edge = &env.edges[0].site;
    // Both sites have ann (the same) and web (another description); central
    // has bob, the edge zed.
    // Both have ann's credential, for another project at central only (a
    // credential cannot be updated in place: reported, not changed).
    for (site, description) in [(central, "central's"), (edge, "edge's")] {
        let ann = json!({"name": "ann", "email": "ann@x"});
        let ann = made(&env, site, "/v3/users", "user", ann).await;
        let web = json!({"name": "web", "description": description});
        let web = made(&env, site, "/v3/projects", "project", web).await;
        let mut credential = json!({"user_id": ann, "type": "totp", "blob": "seed-secret-4"});
        if site.url() == central.url() {
            credential["project_id"] = json!(web);
        }
        made(&env, site, "/v3/credentials", "credential", credential).await;
    }
    made(&env, central, "/v3/users", "user", json!({"name": "bob"})).await;
    made(&env, edge, "/v3/users", "user", json!({"name": "zed"})).await;
    let users_made_at_edge = edge.creates_of("user");

    let (status, body) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202, "{body}");
    let row = resync_ended(&env, "e1").await;
    let result = &row["resync"]["result"];
    assert_eq!(result["created"], 1, "bob only: {row:#}");
    assert_eq!(result["updated"], 1, "web's description: {row:#}");
    assert_eq!(result["only_at_edge"], 1);
    assert_eq!(result["not_updatable"][0]["kind"], "credential", "{row:#}");
    assert!(!row.to_string().contains("seed-secret"), "{row}");
    assert_eq!(
        result["only_at_edge_sample"],
        json!([{"kind": "user", "key": "Default/zed"}])
    );
    assert_eq!(
        edge.creates_of("user"),
        users_made_at_edge + 1,
        "ann adopted, not created again"
    );
    assert_eq!(
        edge.field_of("project", "web", "description"),
        json!("central's")
    );
    assert!(
        edge.id_of("user", "zed").is_some(),
        "not deleted without prune"
    );
    // Later ops on adopted entities reach the edge's own copy.
    let ann = central.id_of("user", "ann").unwrap();
    env.write(
        "PATCH",
        &format!("/v3/users/{ann}"),
        Some(json!({"user": {"email": "ann@y"}})),
    )
    .await;
    env.until("ann's new email at the edge", || async {
        edge.field_of("user", "ann", "email") == json!("ann@y")
    })
    .await;

    // A second resync while one runs is refused; then prune removes zed.
    let (status, body) = post(&env, "/v1/edges/e1/resync?prune=true").await;
    assert_eq!(status, 202, "{body}");
    let (again, body) = post(&env, "/v1/edges/e1/resync").await;
    assert!(again == 409 || again == 202, "{again} {body}");
    resync_ended(&env, "e1").await;
    env.until("zed pruned", || async {
        edge.id_of("user", "zed").is_none()
    })
    .await;
    env.assert_in_sync().await;
    let (status, body) = post(&env, "/v1/edges/nope/resync").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = post(&env, "/v1/edges/e1/resync?prune=maybe").await;
    assert_eq!(status, 400, "{body}");
    env.shutdown().await;
}

#[tokio::test]
async fn a_resync_interrupted_by_an_edge_crash_starts_again_and_creates_nothing_twice() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    let central = &env.central_site;
    for i in 0..300 {
        made(
            &env,
            central,
            "/v3/users",
            "user",
            json!({"name": format!("u{i:03}")}),
        )
        .await;
    }
    // The edge's Keystone answers slowly enough to be killed mid-way.
    env.edges[0].site.state.lock().unwrap().answer_jitter = Some(Duration::from_millis(20));
    let (status, _) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202);
    env.until("the resync applying", || async {
        let row = edge_row(&env, "e1").await;
        row["resync"]["phase"] == "applying" && row["resync"]["done"].as_i64().unwrap_or(0) > 20
    })
    .await;
    let status = crate::sync::edge_status(&env.edges[0].admin).await;
    assert_eq!(
        status["resync_hold"], true,
        "the op stream is held: {status}"
    );
    env.kill_edge(0).await;
    let made_before_restart = env.edges[0].site.creates_of("user");
    assert!(
        made_before_restart < 300,
        "killed mid-way: {made_before_restart}"
    );
    env.edges[0].site.state.lock().unwrap().answer_jitter = None;
    env.restart_edge(0).await;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
    env.assert_in_sync().await;
    assert_eq!(
        env.edges[0].site.creates_of("user"),
        300,
        "each user created once"
    );
    let status = crate::sync::edge_status(&env.edges[0].admin).await;
    assert_eq!(status["resync_hold"], false, "{status}");
    env.shutdown().await;
}

#[tokio::test]
async fn the_drift_audit_finds_each_kind_of_difference_and_repair_applies_centrals_state() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let dan = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "dan", "email": "dan@x", "password": "dan-secret-7"}}),
        )
        .await;
    let web = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "web"}}),
        )
        .await;
    env.assert_in_sync().await;
    let d = drift(&env, "e1").await;
    assert_eq!(found(&d), vec![], "in sync: {d:#}");

    // Writes that bypassed the gateway, at either site.
    let central = &env.central_site;
    let edge = &env.edges[0].site;
    made(&env, central, "/v3/users", "user", json!({"name": "carl"})).await;
    made(
        &env,
        edge,
        "/v3/users",
        "user",
        json!({"name": "eve", "password": "eve-secret-3"}),
    )
    .await;
    let dan_at_edge = edge.id_of("user", "dan").unwrap();
    direct(
        &env,
        edge,
        "PATCH",
        &format!("/v3/users/{dan_at_edge}"),
        json!({"user": {"email": "dan@evil", "password": "reset-secret-5"}}),
    )
    .await;
    let member = central.id_of("role", "member").unwrap();
    direct(
        &env,
        central,
        "PUT",
        &format!("/v3/projects/{web}/users/{dan}/roles/{member}"),
        Value::Null,
    )
    .await;
    // A domain configuration at both sites, changed at the edge.
    for site in [central, edge] {
        let config = json!({"config": {"ldap": {"url": "ldap://central", "page_size": 100}}});
        direct(&env, site, "PUT", "/v3/domains/default/config", config).await;
    }
    let config = json!({"config": {"ldap": {"url": "ldap://elsewhere"}}});
    direct(&env, edge, "PATCH", "/v3/domains/default/config", config).await;

    let d = drift(&env, "e1").await;
    let mut got = found(&d);
    got.sort();
    let mut want = vec![
        (
            "differs".to_string(),
            "domain_config".to_string(),
            "Default".to_string(),
            r#"["ldap"]"#.to_string(),
        ),
        (
            "differs".to_string(),
            "user".to_string(),
            "Default/dan".to_string(),
            r#"["email"]"#.to_string(),
        ),
        (
            "missing_at_edge".into(),
            "grant".into(),
            "member to user Default/dan on project Default/web".into(),
            String::new(),
        ),
        (
            "missing_at_edge".into(),
            "user".into(),
            "Default/carl".into(),
            String::new(),
        ),
        (
            "only_at_edge".into(),
            "user".into(),
            "Default/eve".into(),
            String::new(),
        ),
    ];
    want.sort();
    assert_eq!(got, want, "{d:#}");
    let text = d.to_string();
    assert!(
        !text.contains("secret") && !text.contains("dan@evil") && !text.contains("elsewhere"),
        "no values shown: {text}"
    );
    env.until_metrics(
        "drift gauges",
        &[
            "syncgate_drift_differences{edge=\"e1\",kind=\"user\",category=\"differs\"} 1",
            "syncgate_drift_differences{edge=\"e1\",kind=\"user\",category=\"only_at_edge\"} 1",
        ],
    )
    .await;
    // The audit changed nothing.
    assert!(edge.id_of("user", "carl").is_none());

    let (status, body) = post(&env, "/v1/drift/repair?edge=e1").await;
    assert_eq!(status, 202, "{body}");
    resync_ended(&env, "e1").await;
    assert_eq!(edge.field_of("user", "dan", "email"), json!("dan@x"));
    assert_eq!(
        edge.state.lock().unwrap().configs["default"]["ldap"]["url"],
        json!("ldap://central")
    );
    let d = drift(&env, "e1").await;
    assert_eq!(
        found(&d),
        vec![(
            "only_at_edge".into(),
            "user".into(),
            "Default/eve".into(),
            String::new()
        )],
        "only what the edge alone has is left (no prune): {d:#}"
    );
    let (status, _) = post(&env, "/v1/drift/repair?edge=e1&prune=true").await;
    assert_eq!(status, 202);
    resync_ended(&env, "e1").await;
    let d = drift(&env, "e1").await;
    assert_eq!(found(&d), vec![], "{d:#}");
    assert_eq!(
        env.audit("/v1/drift?edge=e1&category=bogus").await["error"]["code"],
        400
    );
    env.shutdown().await;
}

/// Ops logged after the audit's snapshot of central and applied at the edge
/// while its state is read are in flight, not drift: a create, an update and
/// a delete made through the gateway while the edge's reads are held, each a
/// difference between the two states, all left out and counted.
#[tokio::test]
async fn ops_in_flight_during_a_drift_audit_are_not_reported() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let first = env
        .create("/v3/users", "user", json!({"user": {"name": "first"}}))
        .await;
    let gone = env
        .create("/v3/users", "user", json!({"user": {"name": "gone"}}))
        .await;
    env.assert_in_sync().await;
    // The edge's state read waits at its first list (domains); applying a
    // user's ops reads users only.
    let site = &env.edges[0].site;
    let (open, wait) = tokio::sync::watch::channel(false);
    let reads = {
        let mut st = site.state.lock().unwrap();
        st.reads_wait = Some(wait);
        st.reads_wait_path = Some("/v3/domains".into());
        st.reads.len()
    };
    let (status, body) = post(&env, "/v1/drift/run?edge=e1").await;
    assert_eq!(status, 202, "{body}");
    env.until("the audit reads the edge's state", || async {
        site.state.lock().unwrap().reads.len() > reads
    })
    .await;
    // Written through the gateway after central's state was read, applied
    // at the edge before its state is.
    env.create("/v3/users", "user", json!({"user": {"name": "busy"}}))
        .await;
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{first}"),
            Some(json!({"user": {"description": "changed meanwhile"}})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = env
        .write("DELETE", &format!("/v3/users/{gone}"), None)
        .await;
    assert_eq!(status, 204);
    env.until_delivered(&["e1"], &["applied"]).await;
    assert!(site.id_of("user", "gone").is_none());
    open.send(true).unwrap();
    site.state.lock().unwrap().reads_wait = None;
    let d = drift_ended(&env, "e1").await;
    assert_eq!(found(&d), vec![], "nothing in flight is drift: {d:#}");
    assert_eq!(
        d["runs"][0]["excluded"], 3,
        "the three ops were in flight, and left out: {d:#}"
    );
    env.assert_in_sync().await;
    env.shutdown().await;
}

/// Writes during an audit leave out only what they change: creates in the
/// Default domain do not hide a real difference of another user there.
#[tokio::test]
async fn writes_during_a_drift_audit_hide_only_what_they_change() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "victim", "domain_id": "default"}}),
    )
    .await;
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    let victim = site.id_of("user", "victim").unwrap();
    direct(
        &env,
        site,
        "PATCH",
        &format!("/v3/users/{victim}"),
        json!({"user": {"description": "changed at the edge"}}),
    )
    .await;
    // Writes all along the audit, naming the Default domain.
    site.state.lock().unwrap().answer_jitter = Some(Duration::from_millis(20));
    let writer = {
        let http = env.http.clone();
        let proxy = env.proxy.clone();
        let token = env.token().to_string();
        tokio::spawn(async move {
            for i in 0..30 {
                let resp = http
                    .post(format!("{proxy}/v3/users"))
                    .header("x-auth-token", &token)
                    .json(&json!({"user": {"name": format!("other{i}"), "domain_id": "default"}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 201);
            }
        })
    };
    let d = drift(&env, "e1").await;
    writer.await.unwrap();
    assert!(
        found(&d)
            .iter()
            .any(|(c, k, key, _)| c == "differs" && k == "user" && key.ends_with("/victim")),
        "the edge's own change is drift: {d:#}"
    );
    env.shutdown().await;
}

/// The scale figure in BENCHMARKS.md (not a test: run it with
/// `cargo nextest run --run-ignored only resync_at_scale --no-capture`):
/// 10,000 users, 2,000 projects and 50,000 assignments made on central's site
/// directly, resynced to an empty edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn resync_at_scale() {
    let users = std::env::var("RESYNC_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000usize);
    let projects = std::env::var("RESYNC_PROJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000usize);
    let per_user = std::env::var("RESYNC_GRANTS_PER_USER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize);
    let env = sync_env(&["e1"], None, |_| {}).await;
    {
        let mut st = env.central_site.state.lock().unwrap();
        let member = st.entities["role"]
            .values()
            .find(|r| r["name"] == "member")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let mut pids = Vec::new();
        for i in 0..projects {
            let id = crate::fake_keystone::new_id();
            st.entities.get_mut("project").unwrap().insert(
                id.clone(),
                json!({"id": id, "name": format!("p{i:05}"), "domain_id": "default", "enabled": true}),
            );
            pids.push(id);
        }
        for i in 0..users {
            let id = crate::fake_keystone::new_id();
            st.entities.get_mut("user").unwrap().insert(
                id.clone(),
                json!({"id": id, "name": format!("u{i:06}"), "domain_id": "default", "enabled": true,
                       "email": format!("u{i}@example.org")}),
            );
            for k in 0..per_user {
                let p = &pids[(i * per_user + k) % pids.len()];
                st.grants
                    .insert(format!("projects/{p}/users/{id}/roles/{member}"));
            }
        }
    }
    let started = Instant::now();
    let (status, _) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(3600);
    let row = loop {
        let row = edge_row(&env, "e1").await;
        match row["resync"]["phase"].as_str() {
            Some("done") => break row,
            Some("failed") => panic!("{row:#}"),
            _ => {}
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let result = &row["resync"]["result"];
    assert_eq!(result["failed"], 0, "{result:#}");
    let changes = row["resync"]["total"].as_i64().unwrap();
    println!(
        "resync at scale: {users} users, {projects} projects, {} assignments: {changes} changes in {secs:.1} s ({:.0}/s)",
        users * per_user,
        changes as f64 / secs
    );
    assert_eq!(env.central_site.snapshot(), env.edges[0].site.snapshot());
    env.shutdown().await;
}

#[tokio::test]
async fn lists_the_identity_service_truncates_are_read_again_per_domain() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let central = &env.central_site;
    let acme = made(
        &env,
        central,
        "/v3/domains",
        "domain",
        json!({"name": "acme"}),
    )
    .await;
    for name in ["a1", "a2"] {
        made(
            &env,
            central,
            "/v3/users",
            "user",
            json!({"name": name, "domain_id": acme}),
        )
        .await;
    }
    made(&env, central, "/v3/users", "user", json!({"name": "d1"})).await;
    // Central's Keystone answers at most 2 users per list (`list_limit`).
    central
        .state
        .lock()
        .unwrap()
        .list_limits
        .insert("users".into(), 2);
    let (status, _) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202);
    let row = resync_ended(&env, "e1").await;
    let result = &row["resync"]["result"];
    assert_eq!(result["created"], 4, "acme, a1, a2, d1: {row:#}");
    assert_eq!(
        result["only_at_edge"], 0,
        "nothing read as missing: {row:#}"
    );
    assert!(
        result["mapped"].as_i64().unwrap() >= 5,
        "the bootstrap admin, project and roles matched: {row:#}"
    );
    central.state.lock().unwrap().list_limits.clear();
    env.assert_in_sync().await;
    // Still truncated per domain: the resync stops and says why.
    for i in 0..3 {
        made(
            &env,
            central,
            "/v3/users",
            "user",
            json!({"name": format!("x{i}")}),
        )
        .await;
    }
    central
        .state
        .lock()
        .unwrap()
        .list_limits
        .insert("users".into(), 2);
    let (status, _) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202);
    env.until("the resync to fail", || async {
        edge_row(&env, "e1").await["resync"]["phase"] == "failed"
    })
    .await;
    let row = edge_row(&env, "e1").await;
    let error = row["resync"]["error"].as_str().unwrap();
    assert!(error.contains("list_limit"), "{error}");
    // The alerts' gauges: the last resync of e1 failed; e1 is heard from.
    env.until_metrics(
        "the failed resync's gauge",
        &[
            "syncgate_resync_failed{edge=\"e1\"} 1",
            "syncgate_edge_online{edge=\"e1\"} 1",
        ],
    )
    .await;
    env.shutdown().await;
}

#[tokio::test]
async fn a_resync_or_audit_left_unfinished_by_a_stop_of_central_is_not_shown_running() {
    // The op log of a central that stopped mid-resync of e1.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("stopped.db").display());
    {
        let store = syncgate::store::Store::open(&db).await.unwrap();
        store.register_edge("e1", true).await.unwrap();
        store.begin_resync("e1", "resync", false).await.unwrap();
        store
            .resync_progress("e1", "applying", Some(0), 10, 100)
            .await
            .unwrap();
        // And a drift audit it was running.
        store.begin_drift("e1").await.unwrap();
        store.close().await;
    }
    let env = sync_env(&["e1"], None, |c| c.db = db.clone()).await;
    let row = resync_ended(&env, "e1").await;
    // The audit no longer runs: it says so, rather than running forever.
    assert_eq!(row["drift"]["state"], "failed", "{row:#}");
    let error = row["drift"]["error"].as_str().unwrap();
    assert!(error.contains("stop of central"), "{error}");
    let result = &row["resync"]["result"];
    assert_eq!(result["failed"], 0, "{row:#}");
    // The bootstrap entities both sites have were adopted (ID map entries).
    assert!(result["mapped"].as_i64().unwrap() >= 5, "{row:#}");
    env.assert_in_sync().await;
    env.shutdown().await;
}

#[tokio::test]
async fn an_edge_that_joins_with_nothing_when_the_op_log_no_longer_starts_at_1_is_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("central.db").display());
    let mut env = sync_env(&[], None, |c| {
        c.db = db.clone();
        c.sync.edges = vec!["late".into()];
    })
    .await;
    env.create("/v3/users", "user", json!({"user": {"name": "pruned-op"}}))
        .await;
    env.create("/v3/users", "user", json!({"user": {"name": "kept-op"}}))
        .await;
    // The first op is gone from the op log (as retention would prune it).
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    for table in ["op_keys", "deliveries", "ops"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE seq = 1"))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    env.add_edge("late", None).await;
    let row = resync_ended(&env, "late").await;
    assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
    env.until("the user of the pruned op at the edge", || async {
        env.edges[0].site.id_of("user", "pruned-op").is_some()
    })
    .await;
    assert_eq!(env.edges[0].site.creates_of("user"), 2, "each user once");
    env.shutdown().await;
}

#[tokio::test]
async fn a_resync_releases_an_edge_halted_on_an_op_below_its_fence() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    env.stop_edge(0).await;
    env.restart_edge_with(0, syncgate::settings::config::OnFailure::Halt)
        .await;
    env.edges[0].site.fail_next(&[400]);
    env.create("/v3/users", "user", json!({"user": {"name": "refused"}}))
        .await;
    env.until("the edge halted", || async {
        crate::sync::edge_status(&env.edges[0].admin).await["halted"] == true
    })
    .await;
    let (status, _) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202);
    resync_ended(&env, "e1").await;
    env.create("/v3/users", "user", json!({"user": {"name": "after"}}))
        .await;
    env.assert_in_sync().await;
    let status = crate::sync::edge_status(&env.edges[0].admin).await;
    assert_eq!(status["halted"], false, "{status}");
    env.shutdown().await;
}

#[tokio::test]
async fn a_drift_report_read_while_audits_finish_shows_one_runs_findings() {
    // Audits of e1 finish one after another (written straight to central's
    // database): audit n finds n % 3 + 1 users named "n-<i>", at fence n.
    // Every report read meanwhile shows the differences of the audit whose
    // fence it names, counted as it lists them, whatever the run's state.
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("central.db").display());
    let env = sync_env(&["e1"], None, |c| c.db = db.clone()).await;
    let store = syncgate::store::Store::open(&db).await.unwrap();
    let writer = tokio::spawn(async move {
        for n in 1..=400i64 {
            store.begin_drift("e1").await.unwrap();
            let keys: Vec<String> = (0..n % 3 + 1).map(|i| format!("{n}-{i}")).collect();
            let found: Vec<syncgate::store::NewDrift<'_>> = keys
                .iter()
                .map(|k| syncgate::store::NewDrift {
                    kind: "user",
                    key: k,
                    category: "only_at_edge",
                    fields: &[],
                    central_id: None,
                    edge_id: Some("x"),
                })
                .collect();
            store.record_drift("e1", n, 0, &found).await.unwrap();
            tokio::task::yield_now().await;
        }
        store.close().await;
    });
    let mut reads = 0;
    let mut with_findings = 0;
    while !writer.is_finished() || reads == 0 {
        reads += 1;
        let report = env.audit("/v1/drift?edge=e1").await;
        let run = &report["runs"][0];
        let keys: Vec<&str> = report["differences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["key"].as_str().unwrap())
            .collect();
        match run["fence"].as_i64() {
            None => assert!(keys.is_empty(), "{report:#}"),
            Some(n) => {
                with_findings += 1;
                assert_eq!(keys.len() as i64, n % 3 + 1, "{report:#}");
                assert!(
                    keys.iter().all(|k| k.starts_with(&format!("{n}-"))),
                    "{report:#}"
                );
            }
        }
        let row = edge_row(&env, "e1").await;
        if let Some(n) = row["drift"]["fence"].as_i64() {
            let counted = row["drift"]["counts"]["only_at_edge"]["user"].as_i64();
            assert_eq!(counted, Some(n % 3 + 1), "{row:#}");
        }
    }
    writer.await.unwrap();
    assert!(with_findings > 0, "{reads} reads");
    env.shutdown().await;
}

/// Makes edge `e1` halt on a failed op so that what central does next is not
/// applied there; returns once it has halted.
async fn halt_edge(env: &mut SyncEnv) {
    env.stop_edge(0).await;
    env.restart_edge_with(0, syncgate::settings::config::OnFailure::Halt)
        .await;
    env.edges[0].site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "trigger"}}))
        .await;
    env.until("the edge halts", || async {
        crate::sync::edge_status(&env.edges[0].admin).await["halted"] == true
    })
    .await;
}

/// A resync without prune still applies what central deleted and the edge
/// had not: a user deleted, a membership removed, a grant revoked.
#[tokio::test]
async fn a_resync_applies_the_deletes_the_edge_missed_without_prune() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    let u1 = env
        .create("/v3/users", "user", json!({"user": {"name": "u1"}}))
        .await;
    let u2 = env
        .create("/v3/users", "user", json!({"user": {"name": "u2"}}))
        .await;
    let g = env
        .create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    let p = env
        .create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    let member = env.central_site.id_of("role", "member").unwrap();
    let grant = format!("/v3/projects/{p}/users/{u1}/roles/{member}");
    let membership = format!("/v3/groups/{g}/users/{u1}");
    for path in [&grant, &membership] {
        assert_eq!(env.write("PUT", path, None).await.0, 204);
    }
    env.assert_in_sync().await;
    halt_edge(&mut env).await;
    for path in [format!("/v3/users/{u2}"), grant.clone(), membership.clone()] {
        assert_eq!(env.write("DELETE", &path, None).await.0, 204, "{path}");
    }
    let (status, _) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202);
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["deleted"], 3, "{row:#}");
    assert_eq!(env.central_site.snapshot(), env.edges[0].site.snapshot());
    let oos = env.audit("/v1/out-of-sync").await;
    assert_eq!(oos["out_of_sync"], json!([]), "{oos}");
    env.shutdown().await;
}

/// A rename the edge has not applied is applied by a resync to the entity the
/// edge maps: no second entity, and what referenced it stays.
#[tokio::test]
async fn a_resync_renames_what_the_edge_maps_instead_of_creating_another() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "u"}}))
        .await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "old-name"}}),
        )
        .await;
    let member = env.central_site.id_of("role", "member").unwrap();
    let grant = format!("/v3/projects/{p}/users/{u}/roles/{member}");
    assert_eq!(env.write("PUT", &grant, None).await.0, 204);
    env.assert_in_sync().await;
    let edge_project = env.edges[0].site.id_of("project", "old-name").unwrap();
    halt_edge(&mut env).await;
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/projects/{p}"),
            Some(json!({"project": {"name": "new-name"}})),
        )
        .await;
    assert_eq!(status, 200);
    let requests = env.edges[0].site.create_requests("projects");
    for prune in [false, true] {
        let path = format!("/v1/edges/e1/resync?prune={prune}");
        let (status, _) = post(&env, &path).await;
        assert_eq!(status, 202);
        let row = resync_ended(&env, "e1").await;
        assert_eq!(row["resync"]["result"]["deleted"], 0, "{row:#}");
        assert_eq!(
            env.edges[0].site.id_of("project", "new-name").as_deref(),
            Some(edge_project.as_str()),
            "the edge's project was renamed"
        );
        assert!(env.edges[0].site.id_of("project", "old-name").is_none());
        assert_eq!(env.edges[0].site.create_requests("projects"), requests);
        assert_eq!(env.central_site.snapshot(), env.edges[0].site.snapshot());
    }
    env.shutdown().await;
}

/// The edge killed between a resync's user creates and their passwords: the
/// resync, run again, sets every password it planned (the users exist by
/// then), so each logs in at the edge, and none is left unlisted.
#[tokio::test]
async fn a_resync_killed_between_creates_and_passwords_sets_them_when_it_runs_again() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "base"}}))
        .await;
    env.assert_in_sync().await;
    halt_edge(&mut env).await;
    let n = 12;
    for i in 0..n {
        env.create(
            "/v3/users",
            "user",
            json!({"user": {"name": format!("pw{i}"), "password": format!("secret-{i}")}}),
        )
        .await;
    }
    // The resync's last create (the trigger group first, then the users) is
    // applied and never answered: its step never ends, no password is sent.
    env.edges[0].site.state.lock().unwrap().hang_after_writes = Some(n);
    let (status, _) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202);
    env.until("the users are created at the edge", || async {
        (0..n).all(|i| env.edges[0].site.id_of("user", &format!("pw{i}")).is_some())
    })
    .await;
    env.kill_edge(0).await;
    env.restart_edge(0).await;
    let row = resync_ended(&env, "e1").await;
    for i in 0..n {
        assert!(
            can_log_in(
                &env.edges[0].site,
                &format!("pw{i}"),
                &format!("secret-{i}")
            )
            .await,
            "pw{i} has its password at the edge: {row:#}"
        );
    }
    assert_eq!(row["needs_password"]["count"], 0, "{row:#}");
    env.shutdown().await;
}

pub async fn can_log_in(site: &FakeSite, user: &str, password: &str) -> bool {
    reqwest::Client::new()
        .post(format!("{}/v3/auth/tokens", site.url()))
        .json(
            &json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": "Default"}, "password": password}}}}}),
        )
        .send()
        .await
        .unwrap()
        .status()
        == 201
}

/// A state read the edge could not make for now (its identity service failed
/// for a moment) is asked again: it
/// fails neither a resync nor a drift audit. What cannot be read whole still
/// fails them at once (below).
#[tokio::test]
async fn a_state_read_the_edge_could_not_make_for_now_is_asked_again() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let central = &env.central_site;
    made(
        &env,
        central,
        "/v3/groups",
        "group",
        json!({"name": "g-resync"}),
    )
    .await;
    let site = &env.edges[0].site;
    site.state.lock().unwrap().fail_next_reads = vec![503, 502];
    let (status, body) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202, "{body}");
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["created"], 1, "{row:#}");
    {
        // The failures met the state read's lists, not something else.
        let st = site.state.lock().unwrap();
        assert!(st.fail_next_reads.is_empty());
        assert_eq!(st.failed_reads.len(), 2, "{:?}", st.failed_reads);
        for p in &st.failed_reads {
            assert!(st.reads.contains(p), "{p} not read again: {:?}", st.reads);
        }
    }
    assert!(site.id_of("group", "g-resync").is_some());
    env.assert_in_sync().await;
    // A drift audit the same way.
    made(&env, site, "/v3/groups", "group", json!({"name": "g-edge"})).await;
    site.state.lock().unwrap().fail_next_reads = vec![500];
    let d = drift(&env, "e1").await;
    assert!(site.state.lock().unwrap().fail_next_reads.is_empty());
    assert_eq!(site.state.lock().unwrap().failed_reads.len(), 3);
    let found = found(&d);
    assert_eq!(found.len(), 1, "{d:#}");
    assert!(format!("{found:?}").contains("g-edge"), "{d:#}");
    env.shutdown().await;
}

/// An edge stopped while it reads its state for a resync: central asks
/// again once the edge is back, and the resync ends done.
#[tokio::test]
async fn an_edge_stopped_while_it_reads_its_state_is_asked_again_once_back() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    made(
        &env,
        &env.central_site,
        "/v3/groups",
        "group",
        json!({"name": "g1"}),
    )
    .await;
    let (open, wait) = tokio::sync::watch::channel(false);
    {
        let mut st = env.edges[0].site.state.lock().unwrap();
        st.reads_wait = Some(wait);
        st.reads_wait_path = Some("/v3/groups".into());
    }
    let (status, body) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202, "{body}");
    env.until("the edge reads its groups for central", || async {
        env.edges[0].site.reads_of("/v3/groups") > 0
    })
    .await;
    env.stop_edge(0).await;
    open.send(true).unwrap();
    env.restart_edge(0).await;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["created"], 1, "{row:#}");
    env.assert_in_sync().await;
    env.shutdown().await;
}

/// A list that cannot be read whole (truncated with no finer way to read it,
/// or an answer of another shape) fails a resync with the reason: nothing is
/// taken for missing, and prune deletes nothing.
#[tokio::test]
async fn a_list_not_read_whole_fails_the_resync_and_prunes_nothing() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let central = &env.central_site;
    for i in 0..3 {
        made(
            &env,
            central,
            "/v3/policies",
            "policy",
            json!({"type": "application/json", "blob": format!("{{\"p\": {i}}}")}),
        )
        .await;
    }
    let site = &env.edges[0].site;
    made(
        &env,
        site,
        "/v3/policies",
        "policy",
        json!({"type": "application/json", "blob": "{\"edge\": 1}"}),
    )
    .await;
    // How many times the edge's policies were read: a failure that reading
    // again would not change is not read again.
    let tries = || {
        let st = site.state.lock().unwrap();
        let failed = st.failed_reads.iter().filter(|p| *p == "/v3/policies");
        failed.count() + st.reads.iter().filter(|p| *p == "/v3/policies").count()
    };
    for (at, what, expected) in [
        (central, "truncated", "list_limit"),
        (site, "garbled", "could not be read whole"),
        (site, "refused", "HTTP 403"),
    ] {
        {
            let mut st = at.state.lock().unwrap();
            match what {
                "truncated" => drop(st.list_limits.insert("policies".into(), 2)),
                "garbled" => drop(st.garbled.insert("policies".into())),
                _ => st.refused_reads.push("/v3/policies".into()),
            }
        }
        let before = tries();
        let (status, _) = post(&env, "/v1/edges/e1/resync?prune=true").await;
        assert_eq!(status, 202);
        env.until("the resync to fail", || async {
            edge_row(&env, "e1").await["resync"]["phase"] == "failed"
        })
        .await;
        let row = edge_row(&env, "e1").await;
        let error = row["resync"]["error"].as_str().unwrap();
        assert!(error.contains(expected), "{what}: {error}");
        assert!(!error.contains("attempts"), "{what}: {error}");
        assert_eq!(site.unnamed("policy").len(), 1, "{what}: nothing pruned");
        if what != "truncated" {
            assert_eq!(tries(), before + 1, "{what}: read once");
        }
        let mut st = at.state.lock().unwrap();
        st.list_limits.clear();
        st.garbled.clear();
        st.refused_reads.clear();
    }
    env.shutdown().await;
}

/// After a resync, central and the edge agree on the ops below its fence: a
/// re-drive re-acknowledges them and never applies a stale one again. While a
/// resync holds the edge nothing is applied there, a re-drive included.
#[tokio::test]
async fn re_drives_after_or_during_a_resync_apply_nothing_stale() {
    use crate::exactly_once::{redriven, retry, until_redriven};
    let env = sync_env(&["e1"], None, |_| {}).await;
    let p = env
        .create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    // Op 2 fails at the edge, op 3 (the same project) is applied there.
    site.fail_next(&[400]);
    for d in ["old", "new"] {
        env.write(
            "PATCH",
            &format!("/v3/projects/{p}"),
            Some(json!({"project": {"description": d}})),
        )
        .await;
    }
    // Op 4 fails at the edge too.
    env.until_delivered(&["e1"], &["applied", "failed"]).await;
    site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until_delivered(&["e1"], &["applied", "failed"]).await;
    assert_eq!(env.delivery(2, "e1").await, "failed");
    assert_eq!(env.delivery(4, "e1").await, "failed");

    // A resync holds the edge while it reads central's state (kept waiting).
    let open = resync_reading_central(&env).await;
    let groups = site.create_requests("groups");
    let before = redriven(&env, 0).await;
    let (status, body) = retry(&env, 4, "e1").await;
    assert_eq!(
        (status, body["action"].as_str()),
        (202, Some("reapply")),
        "{body}"
    );
    until_redriven(&env, 0, before).await;
    assert_eq!(
        site.create_requests("groups"),
        groups,
        "nothing is applied while a resync holds the edge"
    );
    open.send(true).unwrap();
    env.central_site.state.lock().unwrap().reads_wait = None;
    resync_ended(&env, "e1").await;
    assert_eq!(
        site.create_requests("groups"),
        groups + 1,
        "the resync made g"
    );
    assert_eq!(env.delivery(2, "e1").await, "applied");
    assert_eq!(env.delivery(4, "e1").await, "applied");

    // Central and the edge agree: re-drives re-acknowledge, send nothing.
    let writes = site.writes();
    for seq in [2, 4] {
        let before = redriven(&env, 0).await;
        let (status, body) = retry(&env, seq, "e1").await;
        assert_eq!(
            (status, body["action"].as_str()),
            (202, Some("reacknowledge")),
            "op {seq}: {body}"
        );
        until_redriven(&env, 0, before).await;
    }
    assert_eq!(site.writes(), writes, "nothing was sent again");
    assert_eq!(site.field_of("project", "p", "description"), "new");
    env.assert_in_sync().await;
    env.shutdown().await;
}

/// A pruning resync never deletes what the edge's own service identity needs
/// to act at its site (its grants, its groups and their grants, its roles),
/// though central has none of it: it is kept, and listed with the reason.
#[tokio::test]
async fn prune_never_deletes_what_the_edges_own_service_identity_needs() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let site = &env.edges[0].site;
    let me = site.id_of("user", "admin").unwrap();
    let project = site.id_of("project", "admin").unwrap();
    // The edge's service user has roles at the edge only: one granted to it,
    // one through a group; both roles exist at the edge only too.
    let own_role = made(
        &env,
        site,
        "/v3/roles",
        "role",
        json!({"name": "edge-sync"}),
    )
    .await;
    let via_group = made(&env, site, "/v3/roles", "role", json!({"name": "edge-ops"})).await;
    let ops = made(
        &env,
        site,
        "/v3/groups",
        "group",
        json!({"name": "edge-ops"}),
    )
    .await;
    for path in [
        format!("/v3/projects/{project}/users/{me}/roles/{own_role}"),
        format!("/v3/groups/{ops}/users/{me}"),
        format!("/v3/projects/{project}/groups/{ops}/roles/{via_group}"),
    ] {
        direct(&env, site, "PUT", &path, Value::Null).await;
    }
    // What nothing of the edge's needs is pruned as before.
    made(&env, site, "/v3/groups", "group", json!({"name": "stray"})).await;

    let (status, body) = post(&env, "/v1/edges/e1/resync?prune=true").await;
    assert_eq!(status, 202, "{body}");
    let row = resync_ended(&env, "e1").await;
    let result = &row["resync"]["result"];
    assert!(site.id_of("group", "stray").is_none(), "pruned: {row:#}");
    assert_eq!(result["deleted"], 1, "the stray group only: {row:#}");
    for (what, kept) in [
        (
            "the grant",
            site.has_grant(&format!("projects/{project}/users/{me}/roles/{own_role}")),
        ),
        ("the membership", site.has_member(&ops, &me)),
        (
            "the group's grant",
            site.has_grant(&format!(
                "projects/{project}/groups/{ops}/roles/{via_group}"
            )),
        ),
        ("the group", site.id_of("group", "edge-ops").is_some()),
        (
            "the roles",
            site.id_of("role", "edge-sync").is_some() && site.id_of("role", "edge-ops").is_some(),
        ),
    ] {
        assert!(kept, "{what} is kept: {row:#}");
    }
    let kept: Vec<&str> = result["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kind"].as_str().unwrap())
        .collect();
    for kind in ["grant", "group_membership", "group", "role"] {
        assert!(kept.contains(&kind), "{kind} listed as kept: {row:#}");
    }
    assert!(
        result["kept"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("own service identity"),
        "{row:#}"
    );
    assert_eq!(
        result["not_covered"].as_array().unwrap().len(),
        2,
        "{row:#}"
    );
    // The edge still acts at its site.
    env.create("/v3/groups", "group", json!({"group": {"name": "after"}}))
        .await;
    env.until_delivered(&["e1"], &["applied"]).await;
    assert!(site.id_of("group", "after").is_some());
    env.shutdown().await;
}

/// A drift round reads central's state once for every edge it audits, and
/// skips the edges that are not connected (12 declared, 2 running).
#[tokio::test]
async fn a_drift_round_reads_central_once_and_skips_edges_not_connected() {
    let env = sync_env(&["e1", "e2"], None, |c| {
        c.sync.edges = (1..=12).map(|i| format!("e{i}")).collect();
    })
    .await;
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until_delivered(&["e1", "e2"], &["applied"]).await;
    let central_reads = || {
        env.central_site
            .state
            .lock()
            .unwrap()
            .reads
            .iter()
            .filter(|p| *p == "/v3/domains")
            .count()
    };
    let before = central_reads();
    let (status, body) = post(&env, "/v1/drift/run").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["edges"], json!(["e1", "e2"]), "{body}");
    let skipped = body["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 10, "{body}");
    assert!(
        skipped
            .iter()
            .all(|s| s["reason"].as_str().unwrap().contains("not connected")),
        "{body}"
    );
    for edge in ["e1", "e2"] {
        env.until("the edge's audit is done", || async {
            let d = env.audit(&format!("/v1/drift?edge={edge}")).await;
            d["runs"][0]["state"] == "done"
        })
        .await;
    }
    assert_eq!(central_reads(), before + 1, "central's state read once");
    let d = env.audit("/v1/drift").await;
    assert_eq!(found(&d), vec![], "{d:#}");
    env.shutdown().await;
}

/// A credential's blob is a secret: the drift listing names it by a digest
/// keyed with a key central never stores, not by a plain hash that a short
/// blob could be recovered from; a credential both sites hold still matches.
#[tokio::test]
async fn credentials_are_named_by_a_keyed_digest_in_audits() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "ann"}}))
        .await;
    env.create(
        "/v3/credentials",
        "credential",
        json!({"credential": {"user_id": u, "type": "totp", "blob": "both"}}),
    )
    .await;
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    let edge_u = site.id_of("user", "ann").unwrap();
    made(
        &env,
        site,
        "/v3/credentials",
        "credential",
        json!({"user_id": edge_u, "type": "totp", "blob": "pin"}),
    )
    .await;
    let d = drift(&env, "e1").await;
    let found = found(&d);
    assert_eq!(found.len(), 1, "the edge's own credential only: {d:#}");
    let (category, kind, key, _) = &found[0];
    assert_eq!(
        (category.as_str(), kind.as_str()),
        ("only_at_edge", "credential")
    );
    assert!(key.starts_with("Default/ann totp:"), "{key}");
    // What neither a resync nor an audit can read is said, with why.
    let not_covered = d["not_covered"].to_string();
    assert!(not_covered.contains("ldap.password"), "{d:#}");
    assert!(not_covered.contains("OS-ENDPOINT-POLICY"), "{d:#}");
    let plain = syncgate::keystone::state::digest(b"pin");
    assert!(!d.to_string().contains(&plain), "no plain digest: {d:#}");
    env.shutdown().await;
}

/// A user created with a password while a resync runs (after its fence, in
/// the state it reads) is made by the resync without one (Keystone never
/// shows it); the create's op, applied after, gives it the password.
#[tokio::test]
async fn a_password_set_while_a_resync_reads_centrals_state_works_at_the_edge() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "base"}}))
        .await;
    env.assert_in_sync().await;
    let open = resync_reading_central(&env).await;
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "late", "password": "late-secret-1"}}),
    )
    .await;
    open.send(true).unwrap();
    env.central_site.state.lock().unwrap().reads_wait = None;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["created"], 1, "{row:#}");
    env.assert_in_sync().await;
    assert!(
        can_log_in(&env.edges[0].site, "late", "late-secret-1").await,
        "the password reached the edge: {row:#}"
    );
    let row = edge_row(&env, "e1").await;
    assert_eq!(row["needs_password"]["count"], 0, "{row:#}");
    env.shutdown().await;
}

/// A password change the edge failed to apply is not lost when a resync
/// supersedes the failed op: the resync sets the op log's latest password.
#[tokio::test]
async fn a_resync_sets_a_password_whose_change_failed_at_the_edge() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let u = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "ann", "password": "first-secret-1"}}),
        )
        .await;
    env.assert_in_sync().await;
    env.edges[0].site.fail_next(&[400]);
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{u}"),
            Some(json!({"user": {"password": "second-secret-2"}})),
        )
        .await;
    assert_eq!(status, 200);
    env.until_delivered(&["e1"], &["applied", "failed"]).await;
    assert_eq!(env.delivery(2, "e1").await, "failed");
    let (status, body) = post(&env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202, "{body}");
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["passwords_set"], 1, "{row:#}");
    assert!(
        can_log_in(&env.edges[0].site, "ann", "second-secret-2").await,
        "{row:#}"
    );
    assert_eq!(env.delivery(2, "e1").await, "applied");
    env.assert_in_sync().await;
    env.shutdown().await;
}

/// A resync's create answered too late (Keystone carries on) is not sent
/// again before the edge's settle period has passed, and is then found, not
/// made twice: one POST per entity reaches the edge's site, no 409, for a
/// named kind and for a credential alike.
#[tokio::test]
async fn a_resync_create_answered_late_is_found_not_sent_twice() {
    for (kind, path, body) in [
        (
            "project",
            "/v3/projects",
            json!({"project": {"name": "late"}}),
        ),
        (
            "credential",
            "/v3/credentials",
            json!({"credential": {"type": "totp", "user_id": "{admin}", "blob": "late-blob-1"}}),
        ),
    ] {
        let mut env = sync_env(&["e1"], None, |_| {}).await;
        env.edge_timeouts = (Duration::from_millis(300), Duration::from_millis(1500));
        env.stop_edge(0).await;
        env.restart_edge(0).await;
        let central = &env.central_site;
        let mut body = body;
        if kind == "credential" {
            let admin = central.id_of("user", "admin").unwrap();
            body["credential"]["user_id"] = json!(admin);
        }
        direct(&env, central, "POST", path, body).await;
        let site = &env.edges[0].site;
        site.state.lock().unwrap().hold_next = Some(Duration::from_millis(900));
        let (status, reply) = post(&env, "/v1/edges/e1/resync").await;
        assert_eq!(status, 202, "{reply}");
        let row = resync_ended(&env, "e1").await;
        assert_eq!(row["resync"]["phase"], "done", "{kind}: {row:#}");
        assert_eq!(row["resync"]["result"]["failed"], 0, "{kind}: {row:#}");
        {
            let st = site.state.lock().unwrap();
            assert_eq!(st.held_done, 1, "{kind}: the create was held");
            let posts = st
                .journal
                .iter()
                .filter(|l| l.starts_with(&format!("POST {path} ")))
                .count();
            assert_eq!(posts, 1, "{kind}: sent once: {:#?}", st.journal);
            assert_eq!(st.conflicts, 0, "{kind}: {:#?}", st.journal);
        }
        env.assert_in_sync().await;
        env.shutdown().await;
    }
}

/// A create and a rename of what it made, both logged while a resync reads
/// central's state: the resync makes the entity under its new name, and the
/// create, applied from the stream after the fence, finds it by the ID map
/// (not by its old name, which nothing at the edge has): no second entity.
#[tokio::test]
async fn a_create_renamed_while_a_resync_reads_central_is_found_by_the_id_map() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "base"}}))
        .await;
    env.assert_in_sync().await;
    let open = resync_reading_central(&env).await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "first-name"}}),
        )
        .await;
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/projects/{p}"),
            Some(json!({"project": {"name": "second-name"}})),
        )
        .await;
    assert_eq!(status, 200);
    let requests = env.edges[0].site.create_requests("projects");
    open.send(true).unwrap();
    env.central_site.state.lock().unwrap().reads_wait = None;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    assert!(
        site.id_of("project", "first-name").is_none(),
        "no copy under the old name"
    );
    assert!(site.id_of("project", "second-name").is_some());
    assert_eq!(
        site.create_requests("projects"),
        requests + 1,
        "made once, by the resync"
    );
    env.shutdown().await;
}

/// A project deleted and made again under its name at central while the edge
/// still holds the old one (its delete failed there, below the fence): the
/// resync maps the new project to the edge's entity of that name, which then
/// stands for the new one only. Its create, applied from the stream after the
/// fence, finds it by the ID map and claims it (it was refused as "claimed
/// twice" while the old ID still mapped there); nothing is deleted or made.
#[tokio::test]
async fn an_entity_a_resync_maps_to_a_new_id_stands_for_that_id_only() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let old = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "p2"}}),
        )
        .await;
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    let at_edge = site.id_of("project", "p2").expect("p2 at the edge");
    // The edge refuses the delete: it still holds p2, mapped to the old ID.
    site.fail_next(&[400]);
    let (status, _) = env
        .write("DELETE", &format!("/v3/projects/{old}"), None)
        .await;
    assert_eq!(status, 204);
    env.until_delivered(&["e1"], &["applied", "failed"]).await;
    let open = resync_reading_central(&env).await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "p2"}}),
    )
    .await;
    let (creates, writes) = (site.create_requests("projects"), site.writes());
    open.send(true).unwrap();
    env.central_site.state.lock().unwrap().reads_wait = None;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
    env.assert_in_sync().await;
    assert_eq!(
        site.id_of("project", "p2").as_deref(),
        Some(at_edge.as_str()),
        "the edge's p2 is kept"
    );
    assert_eq!(site.create_requests("projects"), creates, "nothing made");
    assert_eq!(site.writes(), writes, "nothing sent: it is equal already");
    env.shutdown().await;
}

/// The same, with the delete of the old project and the create of the new one
/// both written while the resync reads central's state (after its fence): the
/// delete of the old ID, applied after the resync, must not delete the entity
/// that now stands for the new one.
#[tokio::test]
async fn a_delete_after_the_fence_of_an_id_the_resync_mapped_anew_deletes_nothing() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let old = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "p2"}}),
        )
        .await;
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    let at_edge = site.id_of("project", "p2").expect("p2 at the edge");
    let open = resync_reading_central(&env).await;
    let (status, _) = env
        .write("DELETE", &format!("/v3/projects/{old}"), None)
        .await;
    assert_eq!(status, 204);
    let new = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "p2"}}),
        )
        .await;
    let creates = site.create_requests("projects");
    open.send(true).unwrap();
    env.central_site.state.lock().unwrap().reads_wait = None;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
    env.assert_in_sync().await;
    assert_eq!(
        site.id_of("project", "p2").as_deref(),
        Some(at_edge.as_str()),
        "the edge's p2 is kept: the delete of the old ID did not reach it"
    );
    assert_eq!(site.create_requests("projects"), creates, "nothing made");
    // A write to the new ID reaches the same entity.
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/projects/{new}"),
            Some(json!({"project": {"description": "after"}})),
        )
        .await;
    assert_eq!(status, 200);
    env.assert_in_sync().await;
    assert_eq!(site.field_of("project", "p2", "description"), "after");
    env.shutdown().await;
}

/// A credential created while a resync reads central's state: the resync
/// copies it, and its create, applied from the stream after the fence, finds
/// the copy by the ID map (a credential has no name to look for): one
/// credential at the edge, one create sent.
#[tokio::test]
async fn a_credential_created_while_a_resync_reads_central_is_made_once() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "cred-owner"}}))
        .await;
    env.assert_in_sync().await;
    let open = resync_reading_central(&env).await;
    env.create(
        "/v3/credentials",
        "credential",
        json!({"credential": {"type": "totp", "user_id": u, "blob": "during-resync-1"}}),
    )
    .await;
    let requests = env.edges[0].site.create_requests("credentials");
    open.send(true).unwrap();
    env.central_site.state.lock().unwrap().reads_wait = None;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    assert_eq!(
        site.unnamed("credential").len(),
        1,
        "one credential at the edge"
    );
    assert_eq!(
        site.create_requests("credentials"),
        requests + 1,
        "made once, by the resync"
    );
    env.shutdown().await;
}

/// A user the edge has is deleted at central, with a credential made for it
/// just before, while a resync reads central's state. The resync deletes the
/// user at the edge (central no longer has it); the credential's create,
/// replayed from the stream after the fence, must not make a credential for
/// a user the edge no longer has (Keystone takes a credential for any user
/// ID), which the user's delete, already absent, would never remove.
#[tokio::test]
async fn a_credential_of_a_user_a_resync_deleted_is_not_made_after_the_fence() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "gone-owner"}}))
        .await;
    env.assert_in_sync().await;
    let site = &env.edges[0].site;
    assert!(site.id_of("user", "gone-owner").is_some(), "at the edge");
    let open = resync_reading_central(&env).await;
    env.create(
        "/v3/credentials",
        "credential",
        json!({"credential": {"type": "totp", "user_id": u, "blob": "orphan-1"}}),
    )
    .await;
    let (status, _) = env.write("DELETE", &format!("/v3/users/{u}"), None).await;
    assert_eq!(status, 204);
    open.send(true).unwrap();
    env.central_site.state.lock().unwrap().reads_wait = None;
    let row = resync_ended(&env, "e1").await;
    assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
    env.assert_in_sync().await;
    assert_eq!(
        site.id_of("user", "gone-owner"),
        None,
        "deleted at the edge"
    );
    assert_eq!(
        site.unnamed("credential"),
        Vec::<Value>::new(),
        "no credential left at the edge for a user it no longer has"
    );
    env.shutdown().await;
}

/// Keystone takes a credential for any user ID: one central wrote for a
/// user it had deleted already is central's, and the edge holds it too (the
/// ID is not mapped here, so it is sent as central's, as central's Keystone
/// took it). Found by the fault chaos test, seed 1796311388185532327.
#[tokio::test]
async fn a_credential_central_wrote_for_a_user_it_had_deleted_is_made_at_the_edge_too() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "gone-owner"}}))
        .await;
    let (status, _) = env.write("DELETE", &format!("/v3/users/{u}"), None).await;
    assert_eq!(status, 204);
    env.create(
        "/v3/credentials",
        "credential",
        json!({"credential": {"type": "totp", "blob": "orphan-1", "user_id": u}}),
    )
    .await;
    env.assert_in_sync().await;
    assert_eq!(env.edges[0].site.creates_of("credential"), 1);
    env.shutdown().await;
}

/// A credential, or an EC2 key (replayed as a credential), for a user the
/// edge does not have (gone there, its ID still mapped) is not made: Keystone
/// would take it for any user ID, and it would belong to no one. The op
/// fails with the reason and is listed out of sync.
#[tokio::test]
async fn a_credential_for_a_user_the_edge_lacks_is_not_made_and_fails() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "keys"}}),
        )
        .await;
    let site = &env.edges[0].site;
    let writes = [
        (
            "/v3/credentials".to_string(),
            json!({"credential": {"type": "totp", "blob": "lost-1"}}),
        ),
        (String::new(), json!({"tenant_id": p})),
    ];
    for (n, (path, mut body)) in writes.into_iter().enumerate() {
        let name = format!("lost-owner-{n}");
        let u = env
            .create("/v3/users", "user", json!({"user": {"name": name}}))
            .await;
        env.until_delivered(&["e1"], &["applied", "failed"]).await;
        let at_edge = site.id_of("user", &name).expect("at the edge");
        site.state
            .lock()
            .unwrap()
            .entities
            .get_mut("user")
            .unwrap()
            .remove(&at_edge);
        let path = if path.is_empty() {
            format!("/v3/users/{u}/credentials/OS-EC2")
        } else {
            body["credential"]["user_id"] = json!(u);
            path
        };
        let sent = site.writes();
        let (status, _) = env.write("POST", &path, Some(body)).await;
        assert_eq!(status, 201);
        env.until_delivered(&["e1"], &["applied", "failed"]).await;
        assert_eq!(site.writes(), sent, "{path}: nothing sent");
        assert_eq!(site.unnamed("credential"), Vec::<Value>::new(), "{path}");
        let oos = env.audit("/v1/out-of-sync").await;
        let rows = oos["out_of_sync"].as_array().unwrap();
        assert_eq!(rows.len(), n + 1, "{oos:#}");
        let expected =
            format!("user '{name}' is mapped here to {at_edge}, which this site no longer has");
        assert!(
            rows.iter()
                .any(|r| r["detail"].as_str().is_some_and(|d| d.contains(&expected))),
            "{path}: {oos:#}"
        );
    }
    env.shutdown().await;
}

/// Starts a resync of e1 and returns once it holds the edge while it reads
/// central's state, kept waiting until the returned sender says `true`.
async fn resync_reading_central(env: &SyncEnv) -> tokio::sync::watch::Sender<bool> {
    let (open, wait) = tokio::sync::watch::channel(false);
    env.central_site.state.lock().unwrap().reads_wait = Some(wait);
    let (status, body) = post(env, "/v1/edges/e1/resync").await;
    assert_eq!(status, 202, "{body}");
    env.until("the resync holds the edge", || async {
        crate::sync::edge_status(&env.edges[0].admin).await["resync_hold"] == true
    })
    .await;
    open
}

/// A step central asks an edge during a resync, or the edge's answer, lost to
/// a broken broker connection (the edge's or central's own) is asked again
/// once the connection is back, not waited out for the step's timeout (two
/// minutes) while the edge, held, applies nothing.
#[tokio::test]
async fn a_resync_step_lost_to_a_broken_broker_connection_is_asked_again_at_once() {
    use crate::faults::{Fault, FaultProxy};
    use syncgate::broker::{Broker, BrokerConfig};
    let broker = Broker::bind(BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    })
    .await
    .unwrap();
    let at = broker.local_addr();
    let broker = crate::sync::Running::spawn(|rx| {
        broker.run(async {
            let _ = rx.await;
        })
    });
    let to_central = FaultProxy::start(at).await;
    let to_edge = FaultProxy::start(at).await;
    let mut env = sync_env(&[], Some(to_central.url("nats")), |c| {
        c.sync.edges = vec!["e1".to_string()];
    })
    .await;
    env.add_edge("e1", Some(to_edge.url("nats"))).await;
    // The edge holds its ID and applies ops before anything is lost.
    env.create("/v3/groups", "group", json!({"group": {"name": "g0"}}))
        .await;
    env.until_delivered(&["e1"], &["applied"]).await;
    let central = &env.central_site;
    made(&env, central, "/v3/groups", "group", json!({"name": "g1"})).await;

    for (link, name) in [(&to_edge, "g2"), (&to_central, "g3")] {
        // What reaches the process behind `link` is lost from now on.
        link.set(Fault::DropToClient);
        let (status, body) = post(&env, "/v1/edges/e1/resync").await;
        assert_eq!(status, 202, "{body}");
        env.until("the resync asks the edge to hold its op stream", || async {
            edge_row(&env, "e1").await["resync"]["phase"] == "holding the edge's op stream"
        })
        .await;
        // Messages published after central's request (hellos and their
        // answers, every 200 ms) are lost too: so was the request or its answer.
        for _ in 0..2 {
            let seen = link.dropped();
            env.until("more of what the link carries is lost", || async {
                link.dropped() > seen
            })
            .await;
        }
        made(&env, central, "/v3/groups", "group", json!({"name": name})).await;
        link.set(Fault::Pass);
        link.reset();
        let row = resync_ended(&env, "e1").await;
        assert_eq!(row["resync"]["result"]["failed"], 0, "{row:#}");
        assert!(
            env.edges[0].site.id_of("group", name).is_some(),
            "the resync asked again made what central holds: {row:#}"
        );
        let status = crate::sync::edge_status(&env.edges[0].admin).await;
        assert_eq!(status["resync_hold"], false, "{status}");
    }
    env.assert_in_sync().await;
    env.shutdown().await;
    broker.kill().await;
}
