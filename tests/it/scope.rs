//! Per-site scope: an edge with a scope receives only what is in it. Every
//! byte the broker sends to its connection is recorded (a tap between the
//! edge and the broker) and read with the keys it could hold: nothing of an
//! op outside its scope is there, in clear or sealed with its edge key, and
//! nothing is sealed with the sync key every other edge holds.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use syncgate::keystone::scope::Scope;
use syncgate::protocol::crypto::Sealer;
use syncgate::protocol::messages::{Envelope, OpContent, ReplayBatch};
use syncgate::settings::config::{Secret, SyncKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::resync::resync_ended;
use crate::sync::{sync_env, SyncEnv};

/// A TCP relay in front of the broker that records what the broker sends.
struct Tap {
    url: String,
    seen: Arc<Mutex<Vec<u8>>>,
}

async fn tap(broker_url: &str) -> Tap {
    let upstream = broker_url.trim_start_matches("nats://").to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("nats://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
            });
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_rx.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if client_tx.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Tap { url, seen }
}

/// The messages in what a broker sent: (subject, payload).
fn messages(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
        let line = String::from_utf8_lossy(&rest[..end]).to_string();
        rest = &rest[end + 2..];
        let words: Vec<&str> = line.split_whitespace().collect();
        let (subject, skip, total) = match words.first().copied() {
            Some("MSG") => {
                let n: usize = words.last().unwrap().parse().unwrap();
                (words[1].to_string(), 0, n)
            }
            Some("HMSG") => {
                let h: usize = words[words.len() - 2].parse().unwrap();
                let n: usize = words.last().unwrap().parse().unwrap();
                (words[1].to_string(), h, n)
            }
            _ => continue,
        };
        out.push((subject, rest[skip..total].to_vec()));
        rest = &rest[total + 2..];
    }
    out
}

/// Every message the broker sent to an edge's connection, checked: its
/// subject is that edge's; an op is sealed with the edge's key (never the
/// sync key) and is in scope, or a marker with nothing of the write; no
/// control message opens with the sync key; `secrets` show nowhere.
/// Returns (ops in scope, markers) seen.
fn check_delivered(
    tap: &Tap,
    edge: &str,
    edge_key: &Sealer,
    sync_key: &Sealer,
    secrets: &[&str],
) -> (usize, usize) {
    let bytes = tap.seen.lock().unwrap().clone();
    for secret in secrets {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} reached {edge}'s connection in clear"
        );
    }
    let (mut whole, mut markers) = (0, 0);
    let mut check_op = |env: &Envelope| {
        let aad = Envelope::aad(env.seq);
        assert!(
            sync_key.open(&aad, &env.enc, &env.data).is_err(),
            "op {} reached {edge} sealed with the sync key",
            env.seq
        );
        let plain = edge_key.open(&aad, &env.enc, &env.data).unwrap();
        let text = String::from_utf8(plain.clone()).unwrap();
        for secret in secrets {
            assert!(!text.contains(secret), "op {}: {text}", env.seq);
        }
        let op: OpContent = serde_json::from_slice(&plain).unwrap();
        if op.state == "out_of_scope" {
            assert!(
                op.method.is_empty() && op.path.is_empty() && op.body.is_none(),
                "{op:?}"
            );
            assert!(op.refs.is_empty() && op.created_ids.is_empty(), "{op:?}");
            markers += 1;
        } else {
            whole += 1;
        }
    };
    let own = [
        format!("syncgate.ops.{edge}"),
        format!("syncgate.redo.{edge}"),
        format!("syncgate.skip.{edge}"),
        format!("syncgate.outcomes.{edge}"),
        format!("syncgate.state.{edge}"),
        format!("syncgate.resync.{edge}"),
        format!("syncgate.inbox.edge.{edge}."),
    ];
    let msgs = messages(&bytes);
    assert!(!msgs.is_empty(), "the tap saw the broker's messages");
    for (subject, payload) in msgs {
        assert!(
            own.iter()
                .any(|o| subject == *o || subject.starts_with(o.as_str())),
            "{subject} delivered to {edge}"
        );
        if subject == own[0] {
            check_op(&serde_json::from_slice(&payload).unwrap());
            continue;
        }
        let v: Value = match serde_json::from_slice(&payload) {
            Ok(v) => v,
            Err(_) => continue,
        };
        if let Ok(batch) = serde_json::from_value::<ReplayBatch>(v.clone()) {
            batch.ops.iter().for_each(&mut check_op);
        } else if let (Some(enc), Some(data)) = (v["enc"].as_str(), v["data"].as_str()) {
            // A control message: bound to its kind, which the test need not
            // know; the sync key opens it under no kind.
            for kind in [
                "hello_reply",
                "redo",
                "skip",
                "outcomes_request",
                "state_request",
                "resync",
            ] {
                let aad = format!("syncgate-ctl:{kind}:{edge}");
                assert!(sync_key.open(&aad, enc, data).is_err(), "{subject}: {kind}");
            }
        }
    }
    (whole, markers)
}

fn edge_key(env: &SyncEnv, edge: &str) -> (SyncKey, Sealer) {
    let sync = env.key.sealer().unwrap();
    let text = sync.edge_key_text(edge).unwrap();
    (
        SyncKey::Key(Secret::new(text.clone())),
        Sealer::with_keys(&text).unwrap(),
    )
}

/// Central with `site1` (everything) and `site2` (domain `acme` only,
/// behind a tap); domains, users and grants on both sides of the line.
/// Every op reaches site1; site2 gets what is in `acme` (and global roles),
/// a marker for the rest, acknowledged `out_of_scope` and never out of sync;
/// a grant of an `acme` project to a user of another domain is out of scope.
/// Then `site3`, scoped the same, joins with an initial sync: central's
/// state reaches it kept to its scope, behind a tap too.
#[tokio::test]
async fn an_edge_receives_nothing_of_what_is_outside_its_scope() {
    let acme_only: Scope = "domains:acme".parse().unwrap();
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["site1".into(), "site2".into(), "site3".into()];
        c.sync.scopes.insert("site2".into(), acme_only.clone());
        c.sync.scopes.insert("site3".into(), acme_only.clone());
    })
    .await;
    let sync_key = env.key.sealer().unwrap();
    env.add_edge("site1", None).await;
    let tap2 = tap(&env.broker_url).await;
    let (key2, sealer2) = edge_key(&env, "site2");
    env.add_edge_with_key("site2", Some(tap2.url.clone()), key2)
        .await;

    let acme = env
        .create("/v3/domains", "domain", json!({"domain": {"name": "acme"}}))
        .await;
    let other = env
        .create(
            "/v3/domains",
            "domain",
            json!({"domain": {"name": "other-dom"}}),
        )
        .await;
    let alice = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "alice", "domain_id": acme, "password": "alice-pw-0001"}}),
        )
        .await;
    let bob = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "bob-elsewhere", "domain_id": other, "password": "bob-pw-0002"}}),
        )
        .await;
    // In the default domain: outside acme too.
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "carol-default", "password": "carol-pw-0003"}}),
    )
    .await;
    let web = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "web", "domain_id": acme}}),
        )
        .await;
    let member = env
        .create(
            "/v3/roles",
            "role",
            json!({"role": {"name": "site-reader"}}),
        )
        .await;
    for user in [&alice, &bob] {
        let (status, _) = env
            .write(
                "PUT",
                &format!("/v3/projects/{web}/users/{user}/roles/{member}"),
                None,
            )
            .await;
        assert_eq!(status, 204);
    }
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{bob}"),
            Some(json!({"user": {"description": "bob-was-here", "password": "bob-pw-0004"}})),
        )
        .await;
    assert_eq!(status, 200);
    let last = env.last_seq().await;
    assert_eq!(last, 10);

    env.until_delivered(&["site1"], &["applied"]).await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    // Each op's delivery at site2: in scope applied, the rest out_of_scope.
    let mut states = Vec::new();
    for seq in 1..=last {
        states.push(env.delivery(seq, "site2").await);
    }
    let out = "out_of_scope";
    assert_eq!(
        states,
        [
            "applied", out, "applied", out, out, "applied", "applied", "applied", out, out
        ],
        "domains acme, other-dom; users alice, bob, carol; project; role; grants to alice, bob; bob's update"
    );
    let oos = env.audit("/v1/out-of-sync").await;
    assert_eq!(oos["out_of_sync"], json!([]), "{oos}");
    let edges = env.audit("/v1/edges").await;
    let row = |id: &str| {
        edges["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(row("site2")["scope"], "domains:acme");
    assert_eq!(row("site1")["scope"], "all");
    assert_eq!(row("site2")["acked_through"], last);

    // What each site holds.
    let everything = env.central_site.snapshot();
    assert_eq!(
        env.edges[0].site.snapshot(),
        everything,
        "site1: everything"
    );
    let at2 = env.edges[1].site.snapshot();
    let text = format!("{at2:?}");
    for absent in ["other-dom", "bob-elsewhere", "carol-default"] {
        assert!(!text.contains(absent), "{absent} at site2: {at2:#?}");
    }
    for present in ["acme", "alice@acme", "web@acme", "site-reader"] {
        assert!(text.contains(present), "{present} not at site2: {at2:#?}");
    }
    let secrets = [
        "other-dom",
        "bob-elsewhere",
        "bob-pw-0002",
        "bob-pw-0004",
        "bob-was-here",
        "carol-default",
        "carol-pw-0003",
    ];
    let (whole, markers) = check_delivered(&tap2, "site2", &sealer2, &sync_key, &secrets);
    assert!(whole >= 5 && markers >= 5, "{whole} ops, {markers} markers");

    // A new edge of the same scope, synced from central's state.
    env.initial_sync = true;
    let tap3 = tap(&env.broker_url).await;
    let (key3, sealer3) = edge_key(&env, "site3");
    env.add_edge_with_key("site3", Some(tap3.url.clone()), key3)
        .await;
    let row3 = resync_ended(&env, "site3").await;
    assert_eq!(row3["resync"]["result"]["failed"], 0, "{row3:#}");
    let at3 = format!("{:?}", env.edges[2].site.snapshot());
    for absent in ["other-dom", "bob-elsewhere", "carol-default"] {
        assert!(!at3.contains(absent), "{absent} at site3: {at3}");
    }
    for present in ["alice@acme", "web@acme", "site-reader"] {
        assert!(at3.contains(present), "{present} not at site3: {at3}");
    }
    check_delivered(&tap3, "site3", &sealer3, &sync_key, &secrets);
    env.shutdown().await;
}
