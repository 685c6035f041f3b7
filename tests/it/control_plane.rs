//! The sync control plane is authenticated: a broker client without the sync
//! key cannot mark a delivery applied or register an edge, a captured message
//! cannot be played again, and op IDs and Keystone's error texts never cross the
//! broker in clear.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use syncgate::protocol::control::Session;
use syncgate::protocol::messages::{Ack, Outcome, ReplayBatch, ReplayRequest};

use crate::sync::{sniffed_until_marker, sniffer, sync_env, SyncEnv};

/// The value of `syncgate_sync_rejected_total{reason="..."}`.
async fn rejected(env: &SyncEnv, reason: &str) -> u64 {
    let text = env.metrics().await;
    let prefix = format!("syncgate_sync_rejected_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in {text}"))
}

/// Makes op 1 fail at edge-a; returns its op ID.
async fn one_failed_op(env: &SyncEnv) -> String {
    env.edges[0].site.fail_next(&[400]);
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    env.until("the op failed at the edge", || async {
        env.delivery(1, "edge-a").await == "failed"
    })
    .await;
    env.audit("/v1/ops/1").await["op_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_broker_client_without_the_key_cannot_mark_a_delivery_applied() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    let op_id = one_failed_op(&env).await;
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let ack = Ack {
        seq: 1,
        op_id,
        outcome: Outcome::Applied,
        status: Some(201),
        detail: None,
        edge_id_created: vec![],
        operator_skipped: false,
    };
    // In clear, as acks used to travel.
    nats.publish(
        "syncgate.ack.edge-a",
        serde_json::to_vec(&ack).unwrap().into(),
    )
    .await
    .unwrap();
    // Sealed, with a key of its own.
    let wrong =
        syncgate::protocol::crypto::Sealer::with_key(&syncgate::protocol::crypto::generate_key())
            .unwrap();
    let forged = Session::new(1, false).seal(&wrong, "ack", "edge-a", 0, &ack);
    nats.publish("syncgate.ack.edge-a", forged.into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    env.until("both are dropped and counted", || async {
        rejected(&env, "malformed").await >= 1 && rejected(&env, "forged").await >= 1
    })
    .await;
    assert_eq!(env.delivery(1, "edge-a").await, "failed");
    env.shutdown().await;
}

#[tokio::test]
async fn a_captured_ack_played_again_is_dropped() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let mut acks = nats.subscribe("syncgate.ack.edge-a").await.unwrap();
    nats.flush().await.unwrap();
    one_failed_op(&env).await;
    let captured = tokio::time::timeout(Duration::from_secs(10), acks.next())
        .await
        .unwrap()
        .unwrap()
        .payload;
    // The cause is gone; a re-drive heals the op.
    let resp = env
        .http
        .post(format!("{}/v1/ops/1/retry?edge=edge-a", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    env.until("healed", || async {
        env.delivery(1, "edge-a").await == "applied"
    })
    .await;
    nats.publish("syncgate.ack.edge-a", captured).await.unwrap();
    nats.flush().await.unwrap();
    env.until("the replayed ack is counted", || async {
        rejected(&env, "replayed").await >= 1
    })
    .await;
    assert_eq!(env.delivery(1, "edge-a").await, "applied");
    env.shutdown().await;
}

#[tokio::test]
async fn an_undeclared_edge_is_not_registered_unless_new_edges_are_allowed() {
    for allow in [false, true] {
        let mut env = sync_env(&["edge-a"], None, |c| c.sync.allow_new_edges = allow).await;
        env.add_edge("rogue", None).await;
        env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
            .await;
        if allow {
            env.until("the new edge is registered and acks", || async {
                env.delivery(1, "rogue").await == "applied"
            })
            .await;
        } else {
            env.until("its hellos are dropped", || async {
                rejected(&env, "unknown_edge").await >= 1
            })
            .await;
            let edges = env.audit("/v1/edges").await;
            let ids: Vec<&str> = edges["edges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap())
                .collect();
            assert_eq!(ids, ["edge-a"], "{edges}");
        }
        env.shutdown().await;
    }
}

#[tokio::test]
async fn op_ids_and_keystone_error_texts_never_cross_the_broker_in_clear() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    let (nats, mut sniff) = sniffer(&env.broker_url).await;
    let op_id = one_failed_op(&env).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "h"}}))
        .await;
    env.until_delivered(&["edge-a"], &["applied", "failed"])
        .await;
    let mut subjects = std::collections::BTreeSet::new();
    for msg in sniffed_until_marker(&nats, &mut sniff).await {
        let text = String::from_utf8_lossy(&msg.payload);
        for secret in [op_id.as_str(), "injected failure"] {
            assert!(
                !text.contains(secret),
                "{} carries '{secret}' in clear: {text}",
                msg.subject
            );
        }
        if let Some(headers) = &msg.headers {
            assert!(!format!("{headers:?}").contains(&op_id));
        }
        subjects.insert(msg.subject.to_string());
    }
    assert!(subjects.contains("syncgate.ops") && subjects.contains("syncgate.ack.edge-a"));
    env.shutdown().await;
}

#[tokio::test]
async fn a_replay_request_with_hostile_numbers_is_answered_and_the_next_too() {
    // A declared edge of its own: another sender under edge-a's name would be
    // (rightly) taken for a replay of edge-a's messages.
    let env = sync_env(&["edge-a"], None, |c| c.sync.edges.push("probe".into())).await;
    env.create("/v3/groups", "group", json!({"group": {"name": "g"}}))
        .await;
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let sealer = env.key.sealer().unwrap();
    let sender = Session::new(syncgate::protocol::control::next_session(0), false);
    for (from_seq, limit) in [(i64::MIN, i64::MAX), (i64::MAX, i64::MIN), (1, 10)] {
        let req = sender.seal(
            &sealer,
            "replay",
            "probe",
            0,
            &ReplayRequest { from_seq, limit },
        );
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            nats.request("syncgate.replay", req.into()),
        )
        .await
        .expect("central answers")
        .unwrap();
        let batch: ReplayBatch = serde_json::from_slice(&answer.payload).unwrap_or_else(|e| {
            panic!(
                "from {from_seq}: {e}: {:?}",
                serde_json::from_slice::<Value>(&answer.payload)
            )
        });
        assert_eq!(batch.last_seq, 1);
        let expected = if from_seq == i64::MAX { 0 } else { 1 };
        assert_eq!(batch.ops.len(), expected, "from {from_seq}");
    }
    env.shutdown().await;
}
