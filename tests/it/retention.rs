//! Op-log retention in process: ops every edge has passed are pruned once
//! older than the window; an edge not heard from for the edge expiry keeps
//! none, and is resynced from central's state when it comes back.

use std::time::Duration;

use serde_json::json;

use crate::sync::sync_env;

#[tokio::test]
async fn old_ops_every_live_edge_passed_are_pruned_and_an_expired_edge_is_resynced() {
    let mut env = sync_env(&["e1", "e2"], None, |c| {
        c.sync.retention = Some(Duration::from_millis(300));
        c.sync.edge_expiry = Some(Duration::from_secs(2));
    })
    .await;
    // e2 goes away before any op (heard from once): it acknowledged nothing.
    env.until("e2 heard from", || async {
        !env.audit("/v1/edges/e2").await["last_seen"].is_null()
    })
    .await;
    env.stop_edge(1).await;
    for i in 0..5 {
        env.create(
            "/v3/users",
            "user",
            json!({"user": {"name": format!("u{i}")}}),
        )
        .await;
    }
    env.until_delivered(&["e1"], &["applied"]).await;
    let last = env.last_seq().await;
    assert_eq!(last, 5);

    // Once e2 has expired, every op but the last goes (the next seq follows it).
    env.until("the op log pruned to its last op", || async {
        let r = &env.audit("/v1/edges").await["retention"];
        r["first_seq"] == last && r["expired_edges"] == json!(["e2"])
    })
    .await;
    let r = env.audit("/v1/edges").await["retention"].clone();
    assert_eq!(r["last_seq"], last, "{r:#}");
    assert_eq!(r["pinned_by"], json!([]), "{r:#}");
    let ops = env.audit("/v1/ops?after=0").await;
    let seqs: Vec<i64> = ops["ops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![last], "{ops:#}");
    env.until_metrics("pruned ops counted", &["syncgate_oplog_pruned_ops_total 4"])
        .await;

    // Back, e2's next op is gone: it is resynced, each user made once.
    env.restart_edge(1).await;
    env.until("e2 resynced to central's state", || async {
        let row = env.audit("/v1/edges/e2").await;
        row["resync"]["phase"] == "done" && row["acked_through"] == last
    })
    .await;
    for i in 0..5 {
        let name = format!("u{i}");
        assert!(
            env.edges[1].site.id_of("user", &name).is_some(),
            "{name} at e2"
        );
    }
    assert_eq!(env.edges[1].site.creates_of("user"), 5, "each user once");
    let r = env.audit("/v1/edges").await["retention"].clone();
    assert_eq!(r["expired_edges"], json!([]), "heard from again: {r:#}");
    env.shutdown().await;
}

#[tokio::test]
async fn an_edge_that_acknowledged_nothing_keeps_every_op_and_says_so() {
    let mut env = sync_env(&["e1", "e2"], None, |c| {
        c.sync.retention = Some(Duration::from_millis(300));
    })
    .await;
    env.until("e2 heard from", || async {
        !env.audit("/v1/edges/e2").await["last_seen"].is_null()
    })
    .await;
    env.stop_edge(1).await;
    for i in 0..3 {
        env.create(
            "/v3/groups",
            "group",
            json!({"group": {"name": format!("g{i}")}}),
        )
        .await;
    }
    env.until_delivered(&["e1"], &["applied"]).await;
    env.until("e2 shown holding the op log", || async {
        let r = &env.audit("/v1/edges").await["retention"];
        r["pinned_by"][0]["edge"] == "e2" && r["old_through"] == 3
    })
    .await;
    let r = env.audit("/v1/edges").await["retention"].clone();
    assert_eq!(r["first_seq"], 1, "nothing pruned: {r:#}");
    assert_eq!(r["prunable_through"], 0, "{r:#}");
    env.restart_edge(1).await;
    // (Read from the edge's row: once acknowledged, the ops may go at once.)
    env.until("e2 acknowledged every op", || async {
        env.audit("/v1/edges/e2").await["acked_through"] == 3
    })
    .await;
    env.until("pruned once e2 passed them", || async {
        env.audit("/v1/edges").await["retention"]["first_seq"] == 3
    })
    .await;
    env.shutdown().await;
}

/// A site whose edge lost its volume while it was away still holds what
/// central deleted meanwhile; the delete op is pruned, and the resync that
/// follows deletes it there all the same (nothing deleted comes back).
#[tokio::test]
async fn what_central_deleted_is_deleted_at_a_returning_edge_after_its_op_is_pruned() {
    let mut env = sync_env(&["e1"], None, |c| {
        c.sync.retention = Some(Duration::from_millis(300));
        c.sync.edge_expiry = Some(Duration::from_secs(1));
    })
    .await;
    let g = env
        .create("/v3/groups", "group", json!({"group": {"name": "gone"}}))
        .await;
    env.until_delivered(&["e1"], &["applied"]).await;
    assert!(env.edges[0].site.id_of("group", "gone").is_some());
    env.stop_edge(0).await;
    assert_eq!(
        env.write("DELETE", &format!("/v3/groups/{g}"), None)
            .await
            .0,
        204
    );
    env.create("/v3/groups", "group", json!({"group": {"name": "kept"}}))
        .await;
    env.until("the delete's op pruned", || async {
        env.audit("/v1/edges").await["retention"]["first_seq"] == 3
    })
    .await;
    env.restart_edge_with_its_database_lost(0).await;
    env.until("e1 resynced", || async {
        env.audit("/v1/edges/e1").await["resync"]["phase"] == "done"
    })
    .await;
    assert_eq!(
        env.edges[0].site.id_of("group", "gone"),
        None,
        "deleted at the edge"
    );
    assert!(env.edges[0].site.id_of("group", "kept").is_some());
    assert_eq!(env.central_site.snapshot(), env.edges[0].site.snapshot());
    env.shutdown().await;
}

/// A password changed at central while an edge was away for longer than the
/// edge expiry: the op is pruned, kept aside as the user's latest password,
/// and the resync that follows sets it at the edge (the old one stops
/// working there).
#[tokio::test]
async fn a_password_changed_while_an_expired_edge_was_away_is_set_there_after_pruning() {
    use crate::resync::can_log_in;
    let mut env = sync_env(&["e1"], None, |c| {
        c.sync.retention = Some(Duration::from_millis(300));
        c.sync.edge_expiry = Some(Duration::from_secs(1));
    })
    .await;
    let u = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "ann", "domain_id": "default", "password": "first-pw"}}),
        )
        .await;
    env.until_delivered(&["e1"], &["applied"]).await;
    assert!(can_log_in(&env.edges[0].site, "ann", "first-pw").await);
    env.stop_edge(0).await;
    let (status, body) = env
        .write(
            "PATCH",
            &format!("/v3/users/{u}"),
            Some(json!({"user": {"password": "second-pw"}})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    env.create("/v3/groups", "group", json!({"group": {"name": "later"}}))
        .await;
    env.until("the password's op pruned", || async {
        env.audit("/v1/edges").await["retention"]["first_seq"] == 3
    })
    .await;
    let row = env.audit("/v1/edges/e1").await;
    assert!(
        row["needs_resync"]
            .as_str()
            .is_some_and(|w| w.contains("pruned while this edge was expired")),
        "{row:#}"
    );
    env.restart_edge(0).await;
    env.until("e1 resynced", || async {
        env.audit("/v1/edges/e1").await["resync"]["phase"] == "done"
    })
    .await;
    assert!(
        can_log_in(&env.edges[0].site, "ann", "second-pw").await,
        "the password central holds"
    );
    assert!(!can_log_in(&env.edges[0].site, "ann", "first-pw").await);
    let resp = env
        .http
        .get(format!("{}/v1/ops/2", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let text = resp.text().await.unwrap();
    assert!(text.contains("pruned by op-log retention"), "{text}");
    env.shutdown().await;
}
