//! Sessions of the control plane: a message captured from the broker is never
//! taken again, across restarts of either side and whatever the clocks say;
//! one process at a time applies ops under an edge ID; an edge whose database
//! was lost is resynced, never replayed blind; an edge's hellos and reasons
//! reach central while it retries an op.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use syncgate::protocol::control::{now_ms, Session};
use syncgate::protocol::messages::{Grant, Hello, HelloReply};

use crate::sync::{edge_status, sync_env, SyncEnv};

/// The value of `syncgate_sync_rejected_total{reason="..."}` at central.
async fn rejected(env: &SyncEnv, reason: &str) -> u64 {
    let text = env.metrics().await;
    let prefix = format!("syncgate_sync_rejected_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn edge_row(env: &SyncEnv, edge: &str) -> Value {
    env.audit(&format!("/v1/edges/{edge}")).await
}

async fn resync_done(env: &SyncEnv, edge: &str) {
    env.until("the resync is done", || async {
        edge_row(env, edge).await["resync"]["phase"] == "done"
    })
    .await;
}

/// Resync steps recorded from the broker and played after the edge restarted
/// bring nothing back: a user central deleted stays deleted.
#[tokio::test]
async fn resync_steps_played_again_after_the_edge_restarts_are_refused() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let mut steps = nats.subscribe("syncgate.resync.e1").await.unwrap();
    nats.flush().await.unwrap();
    // A user made at central only: the resync creates it at the edge.
    let token =
        crate::sync::admin_token(&env.http, &env.central_site.url(), "central-admin-pw").await;
    let made: Value = env
        .http
        .post(format!("{}/v3/users", env.central_site.url()))
        .header("x-auth-token", token)
        .json(&json!({"user": {"name": "ghost", "password": "ghost-pw-1"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ghost = made["user"]["id"].as_str().unwrap().to_string();
    let resp = env
        .http
        .post(format!("{}/v1/edges/e1/resync", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    resync_done(&env, "e1").await;
    assert!(env.edges[0].site.id_of("user", "ghost").is_some());
    let mut captured = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), steps.next()).await {
        captured.push(m.payload);
    }
    assert!(
        !captured.is_empty(),
        "the resync's steps crossed the broker"
    );
    // Central deletes the user; the edge follows.
    let (status, _) = env
        .write("DELETE", &format!("/v3/users/{ghost}"), None)
        .await;
    assert_eq!(status, 204);
    env.assert_in_sync().await;
    env.stop_edge(0).await;
    env.restart_edge(0).await;
    env.until("the restarted edge holds its ID", || async {
        edge_status(&env.edges[0].admin).await["error"].is_null()
    })
    .await;
    let before = env.edges[0].site.creates_of("user");
    for payload in &captured {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            nats.request("syncgate.resync.e1", payload.clone()),
        )
        .await;
    }
    // A marker write through the gateway: once applied, the edge has also
    // handled everything played before it.
    env.create("/v3/groups", "group", json!({"group": {"name": "marker"}}))
        .await;
    env.assert_in_sync().await;
    assert_eq!(
        env.edges[0].site.creates_of("user"),
        before,
        "nothing was created again"
    );
    assert!(
        env.edges[0].site.id_of("user", "ghost").is_none(),
        "the deleted user stays deleted"
    );
    let status = edge_status(&env.edges[0].admin).await;
    assert!(status["resync_hold"] == false, "{status}");
    env.shutdown().await;
}

/// An ack recorded from the broker and played after central restarted does
/// not change what central shows.
#[tokio::test]
async fn acks_played_again_after_central_restarts_are_refused() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let mut acks = nats.subscribe("syncgate.ack.e1").await.unwrap();
    nats.flush().await.unwrap();
    env.edges[0].site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until("op 1 failed at the edge", || async {
        env.delivery(1, "e1").await == "failed"
    })
    .await;
    let failed = tokio::time::timeout(Duration::from_secs(10), acks.next())
        .await
        .unwrap()
        .unwrap()
        .payload;
    let resp = env
        .http
        .post(format!("{}/v1/ops/1/retry?edge=e1", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    env.until("healed", || async {
        env.delivery(1, "e1").await == "applied"
    })
    .await;
    env.restart_central(|_| {}).await;
    // Only the restarted process counts this: once it has, it reads acks
    // (an edge's hello could still have been taken by the old one).
    env.until("the restarted central reads acks", || async {
        let _ = nats.publish("syncgate.ack.e1", "not sealed".into()).await;
        let _ = nats.flush().await;
        rejected(&env, "malformed").await >= 1
    })
    .await;
    nats.publish("syncgate.ack.e1", failed).await.unwrap();
    nats.flush().await.unwrap();
    env.until("the played ack is counted", || async {
        rejected(&env, "other_session").await >= 1
    })
    .await;
    assert_eq!(env.delivery(1, "e1").await, "applied");
    env.shutdown().await;
}

/// An edge started again with an empty database (a lost volume, an old
/// backup) is resynced from central's state: nothing it applied before is
/// applied again, and the audit says why it waits meanwhile.
#[tokio::test]
async fn an_edge_whose_database_was_lost_is_resynced_not_replayed() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    let user = env
        .create("/v3/users", "user", json!({"user": {"name": "ann"}}))
        .await;
    for i in 0..3 {
        env.create(
            "/v3/credentials",
            "credential",
            json!({"credential": {"type": "totp", "user_id": user, "blob": format!("secret-{i}")}}),
        )
        .await;
    }
    env.create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    env.assert_in_sync().await;
    let creates = env.edges[0].site.creates();
    env.restart_edge_with_its_database_lost(0).await;
    env.until("central sees the cursor went back", || async {
        let row = edge_row(&env, "e1").await;
        row["needs_resync"]
            .as_str()
            .is_some_and(|w| w.contains("went back"))
            || row["resync"]["phase"] == "done"
    })
    .await;
    resync_done(&env, "e1").await;
    // The stream goes on after the resync.
    env.create("/v3/groups", "group", json!({"group": {"name": "after"}}))
        .await;
    env.assert_in_sync().await;
    assert_eq!(
        env.edges[0].site.creates(),
        creates + 1,
        "only the new group was created at the edge"
    );
    assert_eq!(env.edges[0].site.unnamed("credential").len(), 3);
    assert!(edge_row(&env, "e1").await["needs_resync"].is_null());
    env.shutdown().await;
}

/// A second process started with an edge's ID waits while the first lives;
/// both say so; every op is applied once; when the first stops, the second
/// takes over.
#[tokio::test]
async fn two_processes_with_one_edge_id_never_both_apply() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "p0"}}),
    )
    .await;
    env.assert_in_sync().await;
    let (twin, twin_admin) = env.start_twin(0).await;
    env.until("the twin is told to wait", || async {
        edge_status(&twin_admin).await["error"]
            .as_str()
            .is_some_and(|e| e.contains("another process with --id e1"))
    })
    .await;
    for i in 0..5 {
        env.create(
            "/v3/projects",
            "project",
            json!({"project": {"name": format!("p{}", i + 1)}}),
        )
        .await;
    }
    env.assert_in_sync().await;
    assert_eq!(
        env.edges[0].site.creates_of("project"),
        6,
        "each applied once"
    );
    // The row says so, and the holder's hellos do not clear it while the
    // second process lives: looked at after one more of them.
    let seen = edge_row(&env, "e1").await["last_seen"].clone();
    env.until("the holder said hello again", || async {
        edge_row(&env, "e1").await["last_seen"] != seen
    })
    .await;
    let row = edge_row(&env, "e1").await;
    assert!(
        row["error"]
            .as_str()
            .is_some_and(|e| e.contains("two processes")),
        "{row}"
    );
    env.until("the first is warned", || async {
        edge_status(&env.edges[0].admin).await["warning"]
            .as_str()
            .is_some_and(|w| w.contains("another process"))
    })
    .await;
    // The first stops; the second takes the ID (and, its database being
    // another, is resynced rather than replaying what was applied).
    env.stop_edge(0).await;
    env.until("the twin holds the ID", || async {
        edge_status(&twin_admin).await["error"].is_null()
    })
    .await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "p6"}}),
    )
    .await;
    env.until("the twin applied it", || async {
        env.edges[0].site.id_of("project", "p6").is_some()
    })
    .await;
    assert_eq!(
        env.edges[0].site.creates_of("project"),
        7,
        "each applied once"
    );
    twin.stop().await;
    env.shutdown().await;
}

/// Central takes an edge whose clock is far off (no clock decides freshness)
/// and names the skew.
#[tokio::test]
async fn an_edge_clock_far_off_is_taken_and_the_skew_is_named() {
    // A declared edge no process runs: this test speaks for it.
    let env = sync_env(&["e1"], None, |c| c.sync.edges.push("probe".into())).await;
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let sealer = env.key.sealer().unwrap();
    let me = Session::new(syncgate::protocol::control::next_session(0), false);
    let hello = |cursor| Hello {
        edge: "probe".into(),
        cursor,
        version: "test".into(),
        error: None,
        outcomes_through: None,
        initial_sync: false,
        boot: Some(me.id().to_string()),
        protocol: Some(2),
        lease_ms: Some(1000),
        leaving: false,
        database: None,
        connects: None,
        asks_in_hand: None,
    };
    // Unaddressed: central says which session to address (once its sync
    // listens: a central just started may not yet).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let first = loop {
        match nats
            .request(
                "syncgate.hello.probe",
                me.seal(&sealer, "hello", "probe", 0, &hello(0)).into(),
            )
            .await
        {
            Ok(reply) => break reply,
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("hello: {e}"),
        }
    };
    let opened = me
        .open::<HelloReply>(&sealer, "hello_reply", Some("probe"), &first.payload, false)
        .unwrap();
    assert_eq!(opened.msg.grant, Grant::Introduce);
    let central = opened.from;
    // Stamped 15 minutes behind central's clock.
    let skewed = crate::sessions::reseal_with_clock(
        &sealer,
        "hello",
        "probe",
        &me.seal(&sealer, "hello", "probe", central, &hello(0)),
        now_ms() - 15 * 60 * 1000,
    );
    let reply = nats
        .request("syncgate.hello.probe", skewed.into())
        .await
        .unwrap();
    let opened = me
        .open::<HelloReply>(&sealer, "hello_reply", Some("probe"), &reply.payload, false)
        .unwrap();
    assert!(
        matches!(opened.msg.grant, Grant::Granted { .. }),
        "{:?}",
        opened.msg
    );
    let row = edge_row(&env, "probe").await;
    let skew = row["clock_skew_ms"].as_i64().unwrap();
    assert!((-905_000..=-895_000).contains(&skew), "{row}");
    assert_eq!(row["online"], true, "{row}");
    env.shutdown().await;
}

/// A stamp's clock set to `sent_ms` (the rest kept), sealed again.
pub fn reseal_with_clock(
    sealer: &syncgate::protocol::crypto::Sealer,
    kind: &str,
    edge: &str,
    payload: &[u8],
    sent_ms: i64,
) -> Vec<u8> {
    let aad = format!("syncgate-ctl:{kind}:{edge}");
    let mut sealed: Value = serde_json::from_slice(payload).unwrap();
    let plain = sealer
        .open(
            &aad,
            sealed["enc"].as_str().unwrap(),
            sealed["data"].as_str().unwrap(),
        )
        .unwrap();
    let mut stamp: Value = serde_json::from_slice(&plain).unwrap();
    stamp["sent_ms"] = json!(sent_ms);
    let (enc, data) = sealer.seal(&aad, &serde_json::to_vec(&stamp).unwrap());
    sealed["enc"] = json!(enc);
    sealed["data"] = json!(data);
    serde_json::to_vec(&sealed).unwrap()
}

/// While the edge's Keystone fails an op, its hellos go on: central shows it
/// online, with the reason.
#[tokio::test]
async fn an_edge_retrying_an_op_is_online_at_central_with_the_reason() {
    let env = sync_env(&["e1"], None, |c| {
        c.sync.edge_offline_after = Duration::from_secs(1)
    })
    .await;
    env.edges[0].site.fail_next(&[503; 60]);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until("central shows the edge's reason", || async {
        let row = edge_row(&env, "e1").await;
        row["online"] == true
            && row["error"]
                .as_str()
                .is_some_and(|e| e.contains("op 1") && e.contains("503"))
    })
    .await;
    env.edges[0].site.state.lock().unwrap().fail_next.clear();
    env.assert_in_sync().await;
    env.until("the reason is gone", || async {
        edge_row(&env, "e1").await["error"].is_null()
    })
    .await;
    env.shutdown().await;
}
