//! Poison ops: a write the edge's identity service answers with a server error
//! every time, while it answers everything else, is tried `--max-attempts`
//! times and recorded failed; an outage (every request refused) is retried for
//! as long as it lasts.

use serde_json::json;

use crate::sync::{edge_status, sync_env, SyncEnv};

/// Central and edge `e1`, which tries an op its site answers 500 this many
/// times (`--max-attempts`).
async fn env_trying(max_attempts: u32) -> SyncEnv {
    let mut env = sync_env(&[], None, |c| c.sync.edges = vec!["e1".into()]).await;
    env.max_attempts = max_attempts;
    env.add_edge("e1", None).await;
    env
}

/// The edge's site answers `status` to every `METHOD /path` write.
fn fail_writes(env: &SyncEnv, write: &str, status: u16) {
    env.edges[0]
        .site
        .state
        .lock()
        .unwrap()
        .fail_writes_to
        .insert(write.into(), status);
}

/// The edge's site answers `status` to every group create; a group and then
/// a user are made at central. Once both are delivered: the group failed
/// there, the user applied. Returns how many group creates reached the site.
async fn a_refused_group_then_a_user(env: &SyncEnv, status: u16) -> usize {
    fail_writes(env, "POST /v3/groups", status);
    env.create("/v3/groups", "group", json!({"group": {"name": "admins"}}))
        .await;
    env.create("/v3/users", "user", json!({"user": {"name": "after"}}))
        .await;
    env.until_delivered(&["e1"], &["applied", "failed"]).await;
    assert_eq!(env.delivery(1, "e1").await, "failed");
    assert_eq!(env.delivery(2, "e1").await, "applied");
    assert!(env.edges[0].site.id_of("user", "after").is_some());
    let state = env.edges[0].site.state.lock().unwrap();
    state.refused_writes["POST /v3/groups"]
}

/// A group create the edge's Keystone answers 500 ("database is locked")
/// every time while it answers everything else: tried three times
/// (`--max-attempts 3`), recorded failed with the site's answer, shown out of
/// sync at central and counted at the edge; the ops after it are applied
/// (`--on-failure continue`).
#[tokio::test]
async fn a_write_the_site_answers_500_every_time_is_failed_after_max_attempts() {
    let env = env_trying(3).await;
    assert_eq!(
        a_refused_group_then_a_user(&env, 500).await,
        3,
        "tried --max-attempts times"
    );
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    let rows = oos["out_of_sync"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{oos}");
    assert_eq!(
        (&rows[0]["seq"], &rows[0]["state"]),
        (&json!(1), &json!("failed"))
    );
    let detail = rows[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("HTTP 500")
            && detail.contains("3 times")
            && detail.contains("database is locked"),
        "{detail}"
    );
    let status = edge_status(&env.edges[0].admin).await;
    assert_eq!(status["given_up_total"], 1, "{status}");
    assert_eq!(status["error"], json!(null), "{status}");
    let metrics = reqwest::get(format!("{}/metrics", env.edges[0].admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("syncgate_edge_ops_given_up_total 1"),
        "{metrics}"
    );
    env.shutdown().await;
}

/// A write the edge's Keystone does not do at all (HTTP 501, Not
/// Implemented: a release or a driver without the feature) is failed at
/// once with that reason, not retried: exactly one write reaches the site,
/// the op after it is applied, and the audit shows why.
#[tokio::test]
async fn a_write_the_site_does_not_implement_is_failed_at_once_with_the_reason() {
    let env = env_trying(10).await;
    assert_eq!(
        a_refused_group_then_a_user(&env, 501).await,
        1,
        "sent once, not retried"
    );
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    let detail = oos["out_of_sync"][0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("501") && detail.contains("not done by this site's Keystone"),
        "{oos}"
    );
    let status = edge_status(&env.edges[0].admin).await;
    assert_eq!(
        (&status["retries_total"], &status["given_up_total"]),
        (&json!(0), &json!(0)),
        "{status}"
    );
    env.shutdown().await;
}

/// A site that cannot keep a domain's central ID (a release that refuses
/// `explicit_domain_id` with 400: at once; one that fails on it with 500
/// every try, while it answers the rest: after `--max-attempts`, here 2) gets
/// the domain under an ID of its own, mapped to central's: what names the
/// domain later (a project in it, an update) reaches that domain, and the
/// audit ends clean.
#[tokio::test]
async fn a_domain_whose_central_id_the_site_refuses_is_made_under_its_own_and_mapped() {
    for (status, requests) in [(400u16, 2), (500, 3)] {
        let env = env_trying(2).await;
        let site = &env.edges[0].site;
        site.state.lock().unwrap().refuse_explicit_domain_id = Some(status);
        let central_id = env
            .create("/v3/domains", "domain", json!({"domain": {"name": "acme"}}))
            .await;
        env.create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "p1", "domain_id": central_id}}),
        )
        .await;
        let (code, _) = env
            .write(
                "PATCH",
                &format!("/v3/domains/{central_id}"),
                Some(json!({"domain": {"description": "changed"}})),
            )
            .await;
        assert_eq!(code, 200);
        env.until_delivered(&["e1"], &["applied"]).await;
        let edge_id = site.id_of("domain", "acme").expect("made at the edge");
        assert_ne!(edge_id, central_id, "an ID of the site's own ({status})");
        assert_eq!(
            site.field_of("domain", "acme", "description"),
            json!("changed")
        );
        assert_eq!(site.field_of("project", "p1", "domain_id"), json!(edge_id));
        assert_eq!(
            site.create_requests("domains"),
            requests,
            "refused, then made ({status})"
        );
        env.assert_in_sync().await;
        let d = crate::resync::drift(&env, "e1").await;
        assert_eq!(crate::resync::found(&d), vec![], "{d:#}");
        env.shutdown().await;
    }
}

/// A site that answers 500 to everything (its token too) is down, not
/// refusing one op: the op is tried past `--max-attempts` for as long as the
/// outage lasts, then applied once; nothing is recorded failed.
#[tokio::test]
async fn an_outage_is_retried_past_max_attempts_and_applied_once_it_ends() {
    let env = env_trying(2).await;
    let site = &env.edges[0].site;
    // A token from before the outage is refused too (a 500, not a 401).
    site.state.lock().unwrap().fail_all = Some(500);
    env.create("/v3/users", "user", json!({"user": {"name": "late"}}))
        .await;
    let admin = env.edges[0].admin.clone();
    env.until("the edge tried more than --max-attempts times", || async {
        edge_status(&admin).await["retries_total"].as_u64() >= Some(4)
    })
    .await;
    assert_eq!(env.delivery(1, "e1").await, "pending");
    site.state.lock().unwrap().fail_all = None;
    env.until_delivered(&["e1"], &["applied"]).await;
    assert_eq!(site.create_requests("users"), 1, "applied once");
    let status = edge_status(&admin).await;
    assert_eq!(status["given_up_total"], 0, "{status}");
    assert_eq!(status["failed_total"], 0, "{status}");
    env.shutdown().await;
}

/// A site whose reads answer but whose writes all fail with 500 for a while
/// (its database read-only during a failover) is the case `--max-attempts`
/// is a bound for: each op is failed after that many tries, never applied
/// twice, and a re-drive once the site is back applies it.
#[tokio::test]
async fn an_op_failed_after_max_attempts_is_applied_by_a_re_drive() {
    let env = env_trying(2).await;
    let site = &env.edges[0].site;
    fail_writes(&env, "POST /v3/groups", 500);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until_delivered(&["e1"], &["failed"]).await;
    site.state.lock().unwrap().fail_writes_to.clear();
    let (status, body) = crate::exactly_once::retry(&env, 1, "e1").await;
    assert_eq!(status, 202, "{body}");
    env.until_delivered(&["e1"], &["applied"]).await;
    assert_eq!(
        site.create_requests("groups"),
        1,
        "made once, by the re-drive"
    );
    assert!(site.id_of("group", "g").is_some());
    env.shutdown().await;
}

/// A site stuck on one op (its Keystone answers 503 to that write for ever
/// while it answers the rest: retried, not failed, and every later op waits)
/// is moved on by an operator: `POST /v1/ops/1/skip?edge=e1&by=alice` has the
/// edge record op 1 `operator_skipped` with who asked and its last error, and
/// apply the ops after it. Central shows the op out of sync (the site may
/// differ); the drift audit shows what the skip left behind, and a repair
/// makes it, after which nothing is out of sync.
#[tokio::test]
async fn an_operator_skip_moves_a_stuck_site_on_and_a_repair_fixes_what_it_left() {
    let env = sync_env(&["e1"], None, |_| {}).await;
    let site = &env.edges[0].site;
    fail_writes(&env, "POST /v3/domains", 503);
    env.create("/v3/domains", "domain", json!({"domain": {"name": "acme"}}))
        .await;
    env.create("/v3/users", "user", json!({"user": {"name": "after"}}))
        .await;
    let admin = env.edges[0].admin.clone();
    env.until("the edge retries op 1", || async {
        edge_status(&admin).await["retries_total"].as_u64() >= Some(3)
    })
    .await;
    assert!(
        site.id_of("user", "after").is_none(),
        "op 2 waits behind op 1"
    );
    // Refused: what the edge has not reached; an unknown edge; bad input.
    for (path, code) in [
        ("/v1/ops/2/skip?edge=e1", 409),
        ("/v1/ops/1/skip?edge=ghost", 404),
        ("/v1/ops/1/skip", 400),
        ("/v1/ops/1/skip?edge=e1&by=", 400),
        ("/v1/ops/1/skip?edge=e1&colour=red", 400),
        ("/v1/ops/99/skip?edge=e1", 404),
    ] {
        let (status, body) = crate::resync::post(&env, path).await;
        assert_eq!(status, code, "{path}: {body}");
    }
    let (status, body) = crate::resync::post(&env, "/v1/ops/1/skip?edge=e1&by=alice").await;
    assert_eq!(
        (status, body["action"].as_str()),
        (202, Some("skip")),
        "{body}"
    );
    env.until_delivered(&["e1"], &["applied", "operator_skipped"])
        .await;
    assert_eq!(env.delivery(1, "e1").await, "operator_skipped");
    assert!(
        site.id_of("user", "after").is_some(),
        "the ops after it are applied"
    );
    assert!(site.id_of("domain", "acme").is_none());
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    let rows = oos["out_of_sync"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "a skipped op is out of sync: {oos}");
    assert_eq!(rows[0]["state"], "operator_skipped");
    let detail = rows[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("by alice") && detail.contains("HTTP 503"),
        "{detail}"
    );
    let status = edge_status(&admin).await;
    assert_eq!(status["operator_skipped_total"], 1, "{status}");
    // Skipping it again: nothing to skip.
    let (status, body) = crate::resync::post(&env, "/v1/ops/1/skip?edge=e1").await;
    assert_eq!(status, 409, "{body}");

    // The site takes domains again: the drift audit names what the skip left,
    // and a repair makes it.
    site.state.lock().unwrap().fail_writes_to.clear();
    let d = crate::resync::drift(&env, "e1").await;
    let found = crate::resync::found(&d);
    assert!(
        found
            .iter()
            .any(|(c, k, key, _)| c == "missing_at_edge" && k == "domain" && key.ends_with("acme")),
        "{d:#}"
    );
    let (status, body) = crate::resync::post(&env, "/v1/drift/repair?edge=e1").await;
    assert_eq!(status, 202, "{body}");
    crate::resync::resync_ended(&env, "e1").await;
    assert!(site.id_of("domain", "acme").is_some());
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    assert_eq!(oos["out_of_sync"], json!([]), "{oos}");
    env.shutdown().await;
}

/// An edge halted on a failed op (`--on-failure halt`) is moved on by a skip:
/// the op is recorded `operator_skipped` in place of `failed`, the edge is no
/// longer halted, and the ops after it are applied, each once.
#[tokio::test]
async fn an_operator_skip_moves_on_an_edge_halted_on_a_failed_op() {
    let mut env = sync_env(&["e1"], None, |_| {}).await;
    env.stop_edge(0).await;
    env.restart_edge_with(0, syncgate::settings::config::OnFailure::Halt)
        .await;
    let site = &env.edges[0].site;
    site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.create("/v3/users", "user", json!({"user": {"name": "after"}}))
        .await;
    let admin = env.edges[0].admin.clone();
    env.until("the edge halts on op 1, and central hears so", || async {
        edge_status(&admin).await["halted"] == true && env.delivery(1, "e1").await == "failed"
    })
    .await;
    let (status, body) = crate::resync::post(&env, "/v1/ops/1/skip?edge=e1&by=bob").await;
    assert_eq!(status, 202, "{body}");
    env.until_delivered(&["e1"], &["applied", "operator_skipped"])
        .await;
    assert_eq!(env.delivery(1, "e1").await, "operator_skipped");
    let status = edge_status(&admin).await;
    assert_eq!(status["halted"], false, "{status}");
    assert_eq!(site.create_requests("users"), 1);
    assert!(site.id_of("group", "g").is_none());
    env.shutdown().await;
}

/// Central asks no edge that speaks an older control protocol (2: a release
/// without skips) to pass over an op: `409`, naming the protocol and what to
/// do instead; nothing is sent, and the op stays failed.
#[tokio::test]
async fn a_skip_is_refused_for_an_edge_of_an_older_protocol() {
    use sqlx::Connection;
    let env = sync_env(&["e1"], None, |_| {}).await;
    env.edges[0].site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until_delivered(&["e1"], &["failed"]).await;
    sqlx::any::install_default_drivers();
    let mut db = sqlx::AnyConnection::connect(&env.central_db).await.unwrap();
    sqlx::query("UPDATE edges SET protocol = 2 WHERE id = 'e1'")
        .execute(&mut db)
        .await
        .unwrap();
    let (status, body) = crate::resync::post(&env, "/v1/ops/1/skip?edge=e1").await;
    assert_eq!(status, 409, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("protocol 2") && message.contains("/v1/ops/1/retry"),
        "{body}"
    );
    assert_eq!(env.delivery(1, "e1").await, "failed");
    env.shutdown().await;
}
