//! Exactly once, in order, under faults: each seam where a write could be lost,
//! logged out of Keystone's order, applied twice, or shown in sync when it is not.

use std::time::Duration;

use serde_json::{json, Value};
use syncgate::keystone::RouteClass;

use crate::faults::{Fault, FaultProxy};
use crate::sync::{edge_status, sync_env, SyncEnv};

pub async fn retry(env: &SyncEnv, seq: i64, edge: &str) -> (u16, Value) {
    let resp = env
        .http
        .post(format!("{}/v1/ops/{seq}/retry?edge={edge}", env.admin))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

/// Waits until an edge has handled one more re-drive than `before`.
pub async fn until_redriven(env: &SyncEnv, i: usize, before: u64) {
    let admin = env.edges[i].admin.clone();
    env.until("the edge handled the re-drive", || {
        let admin = admin.clone();
        async move { edge_status(&admin).await["redriven_total"].as_u64() > Some(before) }
    })
    .await;
}

/// Two updates of one project: description "old" (seq 2), then "new" (seq 3).
async fn describe_twice(env: &SyncEnv, project: &str) {
    for d in ["old", "new"] {
        env.write(
            "PATCH",
            &format!("/v3/projects/{project}"),
            Some(json!({"project": {"description": d}})),
        )
        .await;
    }
}

pub async fn redriven(env: &SyncEnv, i: usize) -> u64 {
    edge_status(&env.edges[i].admin).await["redriven_total"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn a_client_that_gives_up_mid_write_does_not_abandon_it() {
    // The write outlasts the stale-intent bound too: a capture still running is
    // never swept.
    let env = sync_env(&["edge-a"], None, |c| {
        c.stale_intent_after = Duration::from_millis(200);
    })
    .await;
    env.central_site.state.lock().unwrap().delay_next = Some(Duration::from_secs(1));
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let sent = impatient
        .post(format!("{}/v3/projects", env.proxy))
        .header("x-auth-token", env.token())
        .json(&json!({"project": {"name": "impatient"}}))
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up before the answer");
    env.until("the write is a committed op", || async {
        env.audit("/v1/ops").await["ops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["kind"] == "project" && o["state"] == "committed")
    })
    .await;
    env.assert_in_sync().await;
    assert!(env.edges[0].site.id_of("project", "impatient").is_some());
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_updates_of_one_entity_are_logged_in_keystones_order() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    env.central_site.state.lock().unwrap().answer_jitter = Some(Duration::from_millis(5));
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "contended"}}),
        )
        .await;
    let path = format!("/v3/projects/{p}");
    for round in 0..3 {
        let writes = (0..50).map(|i| {
            env.write(
                "PATCH",
                &path,
                Some(json!({"project": {"description": format!("round {round} write {i}")}})),
            )
        });
        for (status, body) in futures_util::future::join_all(writes).await {
            assert_eq!(status, 200, "{body}");
        }
        // The snapshots compare descriptions: the edge ends with central's value.
        env.assert_in_sync().await;
        assert_eq!(
            env.central_site
                .field_of("project", "contended", "description"),
            env.edges[0]
                .site
                .field_of("project", "contended", "description"),
            "round {round}"
        );
    }
    assert_eq!(env.last_seq().await, 151, "every write is one op");
    env.shutdown().await;
}

#[tokio::test]
async fn re_driving_an_applied_op_re_acknowledges_it_and_applies_nothing() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    let p = env
        .create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    describe_twice(&env, &p).await;
    env.assert_in_sync().await;
    let writes = env.edges[0].site.writes();
    let before = redriven(&env, 0).await;

    let (status, body) = retry(&env, 2, "edge-a").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["action"], "reacknowledge", "{body}");
    until_redriven(&env, 0, before).await;
    assert_eq!(
        env.edges[0].site.field_of("project", "p", "description"),
        "new",
        "an old update is not applied again"
    );
    assert_eq!(env.edges[0].site.writes(), writes, "nothing was sent");
    assert_eq!(env.delivery(2, "edge-a").await, "applied");
    env.shutdown().await;
}

#[tokio::test]
async fn re_driving_a_failed_op_that_a_later_op_would_undo_is_refused() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    let p = env
        .create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    env.assert_in_sync().await;
    env.edges[0].site.fail_next(&[400]);
    describe_twice(&env, &p).await;
    env.until_delivered(&["edge-a"], &["applied", "failed"])
        .await;
    assert_eq!(env.delivery(2, "edge-a").await, "failed");

    let (status, body) = retry(&env, 2, "edge-a").await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("op 3"), "{message}");
    assert_eq!(
        env.edges[0].site.field_of("project", "p", "description"),
        "new"
    );

    // A failed op that nothing later touches is re-applied, and heals.
    env.edges[0].site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until_delivered(&["edge-a"], &["applied", "failed"])
        .await;
    let (status, body) = retry(&env, 4, "edge-a").await;
    assert_eq!((status, body["action"].as_str()), (202, Some("reapply")));
    env.until("the re-applied op heals", || async {
        env.delivery(4, "edge-a").await == "applied"
    })
    .await;
    assert!(env.edges[0].site.id_of("group", "g").is_some());
    env.shutdown().await;
}

#[tokio::test]
async fn re_driving_a_failed_create_never_brings_back_a_deleted_entity() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    env.edges[0].site.fail_next(&[400]);
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "ghost"}}),
        )
        .await;
    let (status, _) = env
        .write("DELETE", &format!("/v3/projects/{p}"), None)
        .await;
    assert_eq!(status, 204);
    env.until_delivered(&["edge-a"], &["applied", "failed"])
        .await;
    let (status, body) = retry(&env, 1, "edge-a").await;
    assert_eq!(status, 409, "{body}");
    assert!(env.edges[0].site.id_of("project", "ghost").is_none());
    env.shutdown().await;
}

#[tokio::test]
async fn an_op_the_edge_has_not_reached_is_not_re_driven_out_of_order() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    env.stop_edge(0).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "a"}}))
        .await;
    env.create("/v3/groups", "group", json!({"group": {"name": "b"}}))
        .await;
    let (status, body) = retry(&env, 2, "edge-a").await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("has not reached op 2"));
    env.restart_edge(0).await;
    env.assert_in_sync().await;
    env.shutdown().await;
}

#[tokio::test]
async fn lost_acks_heal_by_themselves_within_a_hello_interval() {
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["edge-a".into()];
        c.sync.ack_timeout = Duration::from_millis(300);
    })
    .await;
    let broker: std::net::SocketAddr = env
        .broker_url
        .trim_start_matches("nats://")
        .parse()
        .unwrap();
    let faults = FaultProxy::start(broker).await;
    // Its grant (three hellos) outlasts the writes below on a loaded machine.
    env.hello_interval = Duration::from_secs(3);
    env.add_edge("edge-a", Some(format!("nats://{}", faults.addr)))
        .await;
    env.create("/v3/groups", "group", json!({"group": {"name": "before"}}))
        .await;
    env.assert_in_sync().await;

    // Everything the edge says is lost; it still receives and applies ops
    // while its grant lasts.
    faults.set(Fault::DropFromClient);
    env.edges[0].site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "fails"}}))
        .await;
    env.create("/v3/groups", "group", json!({"group": {"name": "works"}}))
        .await;
    env.until("the edge applied both", || async {
        env.edges[0].site.id_of("group", "works").is_some()
    })
    .await;
    env.until("central times the unacknowledged ops out", || async {
        env.delivery(3, "edge-a").await == "timed_out"
    })
    .await;

    // The link comes back; no operator acts.
    faults.set(Fault::Pass);
    faults.reset();
    env.until("lost acks recovered", || async {
        env.delivery(2, "edge-a").await == "failed" && env.delivery(3, "edge-a").await == "applied"
    })
    .await;
    let oos = env.audit("/v1/out-of-sync").await;
    let rows = oos["out_of_sync"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{oos}");
    assert_eq!(
        (rows[0]["seq"].as_i64(), rows[0]["state"].as_str()),
        (Some(2), Some("failed"))
    );
    env.shutdown().await;
}

#[tokio::test]
async fn an_edge_killed_between_its_call_and_its_commit_applies_each_create_once() {
    let mut env = sync_env(&["edge-a"], None, |c| {
        c.replicate = RouteClass::ALL.to_vec();
    })
    .await;
    env.create(
        "/v3/regions",
        "region",
        json!({"region": {"id": "RegionX"}}),
    )
    .await;
    let svc = env
        .create(
            "/v3/services",
            "service",
            json!({"service": {"type": "compute", "name": "nova"}}),
        )
        .await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "base"}}),
        )
        .await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "base"}}))
        .await;
    env.assert_in_sync().await;

    let cases = [
        (
            "/v3/projects",
            "project",
            json!({"project": {"name": "crash-p"}}),
        ),
        (
            "/v3/users",
            "user",
            json!({"user": {"name": "crash-u", "password": "pw-1"}}),
        ),
        ("/v3/groups", "group", json!({"group": {"name": "crash-g"}})),
        ("/v3/roles", "role", json!({"role": {"name": "crash-r"}})),
        (
            "/v3/domains",
            "domain",
            json!({"domain": {"name": "crash-d"}}),
        ),
        (
            "/v3/credentials",
            "credential",
            json!({"credential": {"user_id": u, "project_id": p, "type": "totp", "blob": "b-1"}}),
        ),
        (
            "/v3/policies",
            "policy",
            json!({"policy": {"type": "application/json", "blob": "{\"a\": 1}"}}),
        ),
        (
            "/v3/registered_limits",
            "registered_limit",
            json!({"registered_limits": [{"service_id": svc, "region_id": "RegionX",
                "resource_name": "cores", "default_limit": 10}]}),
        ),
        (
            "/v3/limits",
            "limit",
            json!({"limits": [{"project_id": p, "service_id": svc, "region_id": "RegionX",
                "resource_name": "cores", "resource_limit": 5}]}),
        ),
        (
            "/v3/endpoints",
            "endpoint",
            json!({"endpoint": {"service_id": svc, "interface": "public",
                "url": "http://nova.example/", "region_id": "RegionX"}}),
        ),
        (
            "/v3/services",
            "service",
            json!({"service": {"type": "image", "name": "glance"}}),
        ),
    ];
    for (path, kind, body) in cases {
        let site_creates = env.edges[0].site.creates_of(kind);
        // Requests, not entities: a second create of a named kind would be
        // answered 409 and adopted, leaving the count of entities unchanged.
        let collection = path.trim_start_matches("/v3/");
        let requests = env.edges[0].site.create_requests(collection);
        env.edges[0]
            .site
            .state
            .lock()
            .unwrap()
            .hang_after_next_write = true;
        let (status, resp) = env.write("POST", path, Some(body)).await;
        assert_eq!(status, 201, "{path}: {resp}");
        env.until("the edge's call reached its site", || async {
            env.edges[0].site.creates_of(kind) > site_creates
        })
        .await;
        // Killed after the site applied the create, before the edge committed.
        env.kill_edge(0).await;
        env.restart_edge(0).await;
        env.until_delivered(&["edge-a"], &["applied"]).await;
        assert_eq!(
            env.edges[0].site.creates_of(kind),
            site_creates + 1,
            "{kind}: created once"
        );
        assert_eq!(
            env.edges[0].site.create_requests(collection),
            requests + 1,
            "{kind}: sent once (looked for, not sent again, after the kill)"
        );
    }
    // The IDs were mapped: deleting each through the gateway deletes it at the edge.
    for (coll, kind) in [
        ("credentials", "credential"),
        ("policies", "policy"),
        ("endpoints", "endpoint"),
        ("limits", "limit"),
        ("registered_limits", "registered_limit"),
    ] {
        for e in env.central_site.unnamed(kind) {
            let id = e["id"].as_str().unwrap();
            let (status, _) = env.write("DELETE", &format!("/v3/{coll}/{id}"), None).await;
            assert_eq!(status, 204);
        }
    }
    env.until_delivered(&["edge-a"], &["applied"]).await;
    for kind in [
        "credential",
        "policy",
        "endpoint",
        "limit",
        "registered_limit",
    ] {
        assert!(
            env.edges[0].site.unnamed(kind).is_empty(),
            "{kind}: {:?}",
            env.edges[0].site.unnamed(kind)
        );
    }
    env.assert_in_sync().await;
    env.shutdown().await;
}

/// An edge catching up applies several ops before it commits them together:
/// killed in the middle, it applies none of them twice when it comes back.
#[tokio::test]
async fn an_edge_killed_in_the_middle_of_a_batch_applies_each_create_once() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "base"}}),
    )
    .await;
    env.assert_in_sync().await;
    let before = env.edges[0].site.creates_of("project");
    let requests = env.edges[0].site.create_requests("projects");
    env.kill_edge(0).await;
    for i in 0..6 {
        let (status, resp) = env
            .write(
                "POST",
                "/v3/projects",
                Some(json!({"project": {"name": format!("batch-{i}")}})),
            )
            .await;
        assert_eq!(status, 201, "{resp}");
    }
    // Three creates answered, the fourth applied and never answered.
    env.edges[0].site.state.lock().unwrap().hang_after_writes = Some(3);
    env.restart_edge(0).await;
    env.until("four creates reached the edge's site", || async {
        env.edges[0].site.creates_of("project") == before + 4
    })
    .await;
    env.kill_edge(0).await;
    env.restart_edge(0).await;
    env.until_delivered(&["edge-a"], &["applied"]).await;
    assert_eq!(
        env.edges[0].site.creates_of("project"),
        before + 6,
        "each create applied once"
    );
    assert_eq!(
        env.edges[0].site.create_requests("projects"),
        requests + 6,
        "each create sent once: the one never answered is looked for, not sent again"
    );
    env.assert_in_sync().await;
    env.shutdown().await;
}

#[tokio::test]
async fn an_intent_left_open_while_running_becomes_unknown_outcome() {
    let app = crate::helpers::spawn_app_with(|c| {
        c.stale_intent_after = Duration::from_millis(200);
    })
    .await;
    // An intent whose close failed (the op log refused the commit): nothing will
    // come back for it. A second connection to the op log leaves it there.
    let store = syncgate::store::Store::open(&app.db_url).await.unwrap();
    store
        .begin_intent(&syncgate::store::NewIntent {
            method: "POST",
            path: "/v3/projects",
            class: "resource",
            kind: "project",
            body: Some("{}"),
            refs: "[]",
            traceparent: None,
            touches: &[],
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ops = app.all_ops().await;
        if ops.iter().any(|o| o["state"] == "unknown_outcome") {
            assert_eq!(ops.len(), 1);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never swept: {ops:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.open_intents().await.unwrap(), 0);
    store.close().await;
    app.stop().await;
}

#[tokio::test]
async fn a_write_whose_client_left_is_logged_before_shutdown_completes() {
    let app = crate::helpers::spawn_app().await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let sent = impatient
        .post(app.url("/v3/projects"))
        .header("x-fake-delay-ms", "700")
        .json(&json!({"project": {"name": "late"}}))
        .send()
        .await;
    assert!(sent.is_err(), "the client gave up");
    let db = app.db_url.clone();
    // Shut down at once: the capture still running is let finish first.
    let (_fake, dir) = app.stop().await;
    let store = syncgate::store::Store::open(&db).await.unwrap();
    let op = store
        .get_op(1)
        .await
        .unwrap()
        .expect("the write was logged");
    assert_eq!(op.state, "committed");
    assert_eq!(store.open_intents().await.unwrap(), 0);
    store.close().await;
    drop(dir);
}

/// A write whose answer never came may still land at central's Keystone
/// until the settle period after it was forwarded: a write that conflicts
/// with it (here, deleting the user a credential is being made for) is
/// refused meanwhile, and still after central restarts (were it let through,
/// the credential landing late would outlive its user at central alone:
/// edges apply the two in the op log's order, which deletes it).
#[tokio::test]
async fn a_write_in_doubt_still_holds_what_it_touches_after_central_restarts() {
    let mut env = sync_env(&["edge-a"], None, |c| {
        c.upstream_timeout = Duration::from_millis(500);
    })
    .await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "holder"}}))
        .await;
    env.assert_in_sync().await;
    let settle = Duration::from_secs(120);
    env.restart_central(|c| {
        c.upstream_timeout = Duration::from_millis(500);
        c.upstream_settle = settle;
    })
    .await;
    // Held far past the timeout: it has not landed when the test ends.
    env.central_site.state.lock().unwrap().hold_next = Some(settle);
    let (status, body) = env
        .write(
            "POST",
            "/v3/credentials",
            Some(json!({"credential": {"type": "totp", "user_id": u, "blob": "late"}})),
        )
        .await;
    assert_eq!(status, 504, "{body}");
    let delete = format!("/v3/users/{u}");
    let in_doubt = |body: &Value| {
        body.to_string()
            .contains("got no answer from the upstream identity service and may still be applied")
    };
    let (status, body) = env.write("DELETE", &delete, None).await;
    assert!(
        status == 503 && in_doubt(&body),
        "refused while in doubt: {status} {body}"
    );
    env.restart_central(|c| {
        c.upstream_timeout = Duration::from_millis(500);
        c.upstream_settle = settle;
    })
    .await;
    let (status, body) = env.write("DELETE", &delete, None).await;
    assert!(
        status == 503 && in_doubt(&body),
        "still refused after a restart: {status} {body}"
    );
    assert!(
        env.central_site.id_of("user", "holder").is_some(),
        "the user is still there"
    );
    env.shutdown().await;
}

/// The edge's write of op 2 is held past its timeout while the site carries
/// on with it (a database lock wait, a load balancer's 504): the edge waits it
/// out before it tries again or applies op 3, so the held write never lands
/// after the newer one; a held create is then found, not made twice.
#[tokio::test]
async fn a_write_answered_late_never_lands_after_the_ops_behind_it() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    let p = env
        .create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "u"}}))
        .await;
    env.assert_in_sync().await;
    env.edge_timeouts = (Duration::from_millis(300), Duration::from_millis(1500));
    env.stop_edge(0).await;
    env.restart_edge(0).await;
    let site = &env.edges[0].site;
    site.state.lock().unwrap().hold_next = Some(Duration::from_secs(1));
    for d in ["desc-v1", "desc-v2"] {
        let (status, _) = env
            .write(
                "PATCH",
                &format!("/v3/projects/{p}"),
                Some(json!({"project": {"description": d}})),
            )
            .await;
        assert_eq!(status, 200);
    }
    env.assert_in_sync().await;
    env.until("the held write landed", || async {
        site.state.lock().unwrap().held_done == 1
    })
    .await;
    assert_eq!(site.field_of("project", "p", "description"), "desc-v2");
    // A held create: found once it lands, not made a second time.
    site.state.lock().unwrap().hold_next = Some(Duration::from_secs(1));
    env.create(
        "/v3/credentials",
        "credential",
        json!({"credential": {"type": "totp", "user_id": u, "blob": "held-1"}}),
    )
    .await;
    env.assert_in_sync().await;
    env.until("the held create landed", || async {
        site.state.lock().unwrap().held_done == 2
    })
    .await;
    assert_eq!(site.unnamed("credential").len(), 1, "created once");
    env.shutdown().await;
}

/// Killed after it renamed, in one uncommitted batch, an entity that batch
/// created: the edge creates it once, not again under its first name.
#[tokio::test]
async fn an_edge_killed_after_renaming_what_its_batch_created_creates_it_once() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "base"}}))
        .await;
    env.assert_in_sync().await;
    env.kill_edge(0).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "first-name"}}))
        .await;
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{u}"),
            Some(json!({"user": {"name": "second-name"}})),
        )
        .await;
    assert_eq!(status, 200);
    let requests = env.edges[0].site.create_requests("users");
    // The create is answered; the rename is applied and never answered.
    env.edges[0].site.state.lock().unwrap().hang_after_writes = Some(1);
    env.restart_edge(0).await;
    env.until("the rename reached the edge's site", || async {
        env.edges[0].site.id_of("user", "second-name").is_some()
    })
    .await;
    env.kill_edge(0).await;
    env.restart_edge(0).await;
    env.assert_in_sync().await;
    assert_eq!(
        env.edges[0].site.create_requests("users"),
        requests + 1,
        "one create request, not a second under the first name"
    );
    env.shutdown().await;
}

/// Two identical policies created in one uncommitted batch, the edge killed:
/// each central policy maps to its own policy at the edge, so deleting one at
/// central deletes exactly one there.
#[tokio::test]
async fn look_alike_creates_in_a_crashed_batch_each_keep_their_own_entity() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "base"}}))
        .await;
    env.assert_in_sync().await;
    env.kill_edge(0).await;
    let policy = json!({"policy": {"type": "application/json", "blob": "{\"same\": 1}"}});
    let a = env.create("/v3/policies", "policy", policy.clone()).await;
    env.create("/v3/policies", "policy", policy).await;
    // The first is answered; the second applied and never answered.
    env.edges[0].site.state.lock().unwrap().hang_after_writes = Some(1);
    env.restart_edge(0).await;
    env.until("the second was sent (or taken for the first)", || async {
        env.edges[0].site.create_requests("policies") >= 2
            || env.delivery(3, "edge-a").await == "applied"
    })
    .await;
    env.kill_edge(0).await;
    env.restart_edge(0).await;
    env.until_delivered(&["edge-a"], &["applied"]).await;
    let (status, _) = env
        .write("DELETE", &format!("/v3/policies/{a}"), None)
        .await;
    assert_eq!(status, 204);
    env.until_delivered(&["edge-a"], &["applied"]).await;
    assert_eq!(env.central_site.unnamed("policy").len(), 1);
    assert_eq!(
        env.edges[0].site.unnamed("policy").len(),
        1,
        "one policy left at the edge, as at central"
    );
    env.shutdown().await;
}

/// Central killed while writes were in flight: at start-up each is resolved
/// against central's Keystone within seconds and what happened is published
/// (a create found reaches the edge; one never applied is skipped); what
/// cannot be checked (a password change) is out of sync at every edge with
/// the reason, until a resync of that edge.
#[tokio::test]
async fn writes_a_killed_central_left_in_doubt_are_resolved_and_published() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    let u = env
        .create("/v3/users", "user", json!({"user": {"name": "known"}}))
        .await;
    env.assert_in_sync().await;
    // Applied at central's Keystone, never answered.
    env.central_site.state.lock().unwrap().hang_after_next_write = true;
    let created = env.in_flight(
        "POST",
        "/v3/users",
        json!({"user": {"name": "in-doubt", "password": "pw-doubt-1"}}),
    );
    env.until("central's Keystone applied it", || async {
        env.central_site.id_of("user", "in-doubt").is_some()
    })
    .await;
    // A password change applied and never answered.
    env.central_site.state.lock().unwrap().hang_after_next_write = true;
    let changed = env.in_flight(
        "PATCH",
        &format!("/v3/users/{u}"),
        json!({"user": {"password": "pw-changed-2"}}),
    );
    env.until("central's Keystone applied it", || async {
        env.central_site.writes() >= 3
    })
    .await;
    // Held before central's Keystone applies it: the gateway's death ends it.
    env.central_site.state.lock().unwrap().delay_next = Some(Duration::from_secs(30));
    let never = env.in_flight(
        "POST",
        "/v3/projects",
        json!({"project": {"name": "never"}}),
    );
    env.until("it reached central's Keystone", || async {
        env.central_site.state.lock().unwrap().delay_next.is_none()
    })
    .await;
    env.kill_central_and_restart().await;
    for t in [created, changed, never] {
        let _ = t.await;
    }
    env.until("the three are resolved and published", || async {
        let ops = env.audit("/v1/ops").await;
        let ops = ops["ops"].as_array().unwrap().clone();
        ops.len() == 4
            && ops
                .iter()
                .skip(1)
                .all(|o| o["resolution"].as_str().is_some_and(|r| r != "pending"))
    })
    .await;
    let ops = env.audit("/v1/ops").await["ops"]
        .as_array()
        .unwrap()
        .clone();
    let by_path = |m: &str, p: &str| {
        ops.iter()
            .skip(1)
            .find(|o| o["method"] == m && o["path"].as_str().unwrap().starts_with(p))
            .unwrap()
            .clone()
    };
    let create = by_path("POST", "/v3/users");
    assert_eq!(
        (create["state"].as_str(), create["resolution"].as_str()),
        (Some("committed"), Some("applied")),
        "{create}"
    );
    assert_eq!(
        create["created_ids"][0],
        env.central_site.id_of("user", "in-doubt").unwrap()
    );
    let never = by_path("POST", "/v3/projects");
    assert_eq!(never["resolution"], "not_applied", "{never}");
    let change = by_path("PATCH", "/v3/users/");
    assert_eq!(change["resolution"], "unresolvable", "{change}");
    env.until("the created user reached the edge", || async {
        env.edges[0].site.id_of("user", "in-doubt").is_some()
    })
    .await;
    assert!(env.edges[0].site.id_of("project", "never").is_none());
    let oos = env.audit("/v1/out-of-sync").await;
    let rows = oos["out_of_sync"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{oos}");
    assert_eq!(rows[0]["state"], "unresolved");
    assert!(
        rows[0]["detail"].as_str().unwrap().contains("password"),
        "{oos}"
    );
    assert!(!oos.to_string().contains("pw-changed-2"));
    // A resync of the edge brings it to central's state: in sync again.
    let resp = env
        .http
        .post(format!("{}/v1/edges/edge-a/resync", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    env.until("nothing out of sync", || async {
        env.audit("/v1/out-of-sync").await["out_of_sync"]
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    env.shutdown().await;
}

/// An edge working through a backlog of live ops asks central for none of
/// them again: its poll for missed ops (each hello interval) is for a quiet
/// stream. 300 ops wait in its subscription while its identity service holds
/// the first write, more than one batch takes; each reaches the site once, and
/// central sends none by replay.
#[tokio::test]
async fn an_edge_working_through_a_backlog_asks_central_for_none_of_it_again() {
    let mut env = sync_env(&[], None, |c| c.sync.edges = vec!["e1".into()]).await;
    // The held write is waited for however long the 299 captures take.
    env.edge_timeouts.0 = Duration::from_secs(60);
    env.add_edge("e1", None).await;
    let site = &env.edges[0].site;
    let (open, wait) = tokio::sync::watch::channel(false);
    site.state.lock().unwrap().writes_wait = Some(wait);
    env.create("/v3/users", "user", json!({"user": {"name": "u0"}}))
        .await;
    env.until(
        "the edge's identity service holds its first write",
        || async { site.state.lock().unwrap().writes_waiting == 1 },
    )
    .await;
    // The edge applies nothing, and asks nothing, while its write waits.
    let replayed = replayed_total(&env).await;
    for i in 1..300 {
        env.create(
            "/v3/users",
            "user",
            json!({"user": {"name": format!("u{i}")}}),
        )
        .await;
    }
    site.state.lock().unwrap().answer_jitter = Some(Duration::from_millis(2));
    open.send(true).unwrap();
    env.assert_in_sync().await;
    assert_eq!(
        site.create_requests("users"),
        300,
        "each op reached the site once"
    );
    assert_eq!(
        replayed_total(&env).await - replayed,
        0,
        "ops waiting at the edge were asked for again"
    );
    env.shutdown().await;
}

/// An edge whose lease lapses while ops wait in its subscription (central
/// gone, so its hellos go unanswered; on a crowded host, hellos answered
/// late) holds them there: central has given the ID to no other process.
/// Once central answers again it applies them from the subscription: each
/// reaches the site once and central sends none by replay. (Dropping them
/// made a fleet of 1,000 starved edges ask central again for 128,432 ops.)
#[tokio::test]
async fn an_edge_whose_lease_lapsed_applies_what_its_subscription_held_without_a_replay() {
    let Some(bin) = crate::sync::nats_server_path() else {
        return;
    };
    let (_nats, addr) = crate::sync::spawn_nats_server(&bin).await;
    let mut env = sync_env(&[], Some(format!("nats://{addr}")), |c| {
        c.sync.edges = vec!["e1".into()]
    })
    .await;
    env.edge_timeouts.0 = Duration::from_secs(60);
    env.add_edge("e1", None).await;
    let state = env.edges[0].site.state.clone();
    let admin = env.edges[0].admin.clone();
    let (open, wait) = tokio::sync::watch::channel(false);
    state.lock().unwrap().writes_wait = Some(wait);
    env.create("/v3/users", "user", json!({"user": {"name": "u0"}}))
        .await;
    env.until(
        "the edge's identity service holds its first write",
        || async { state.lock().unwrap().writes_waiting == 1 },
    )
    .await;
    for i in 1..50 {
        env.create(
            "/v3/users",
            "user",
            json!({"user": {"name": format!("u{i}")}}),
        )
        .await;
    }
    env.kill_central().await;
    env.until("the edge's lease lapsed", || async {
        edge_status(&admin).await["lease_lapsed"] == true
    })
    .await;
    // The write sent under the grant lands; the ops after it wait.
    open.send(true).unwrap();
    env.until("the held write applied", || async {
        edge_status(&admin).await["cursor"] == 1
    })
    .await;
    let broker = syncgate::settings::config::parse_nats_urls(&format!("nats://{addr}")).unwrap();
    env.start_central_again(|c| {
        c.broker = syncgate::settings::config::BrokerMode::External(broker)
    })
    .await;
    env.assert_in_sync().await;
    assert_eq!(
        env.edges[0].site.create_requests("users"),
        50,
        "each op reached the site once"
    );
    assert_eq!(
        replayed_total(&env).await,
        0,
        "ops held in the subscription were asked for again"
    );
    let status = edge_status(&admin).await;
    assert!(status["lease_lapses_total"].as_u64() >= Some(1), "{status}");
    assert_eq!(status["lease_lapsed"], false, "{status}");
    env.shutdown().await;
}

async fn replayed_total(env: &SyncEnv) -> u64 {
    env.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("syncgate_ops_replayed_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}
