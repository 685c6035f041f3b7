//! Per-site scope: an edge with a scope receives only what is in it. Every
//! byte the broker sends to its connection is recorded (a tap between the
//! edge and the broker) and read with the keys it could hold: nothing of an
//! op outside its scope is there, in clear or sealed with its edge key, and
//! nothing is sealed with the sync key every other edge holds.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use serde_json::{json, Value};
use syncgate::keystone::scope::Scope;
use syncgate::protocol::control::Session;
use syncgate::protocol::crypto::Sealer;
use syncgate::protocol::messages::{
    Ack, Envelope, Grant, Hello, HelloReply, OpContent, Outcome, OutcomesReply, OutcomesRequest,
    ReplayBatch, ReplayRequest, OUTCOMES_REPLY, OUTCOMES_REQUEST, REPLAY,
};
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

pub fn edge_key(env: &SyncEnv, edge: &str) -> (SyncKey, Sealer) {
    let sync = env.key.sealer().unwrap();
    let text = sync.edge_key_text(edge).unwrap();
    (
        SyncKey::Key(Secret::new(text.clone())),
        Sealer::with_keys(&text).unwrap(),
    )
}

/// Central with `site1` (everything) and `site2` (domain `acme` only,
/// behind a tap), and `more` declared edges of site2's scope that no process
/// runs yet. Returns the env, site2's tap, its edge key and the sync key.
async fn acme_env(more: &[&str]) -> (SyncEnv, Tap, Sealer, Sealer) {
    let acme_only: Scope = "domains:acme".parse().unwrap();
    let more: Vec<String> = more.iter().map(|e| e.to_string()).collect();
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["site1".into(), "site2".into()];
        for edge in std::iter::once(&"site2".to_string()).chain(&more) {
            c.sync.scopes.insert(edge.clone(), acme_only.clone());
        }
        c.sync.edges.extend(more.iter().cloned());
    })
    .await;
    let sync_key = env.key.sealer().unwrap();
    env.add_edge("site1", None).await;
    let tap2 = tap(&env.broker_url).await;
    let (key2, sealer2) = edge_key(&env, "site2");
    env.add_edge_with_key("site2", Some(tap2.url.clone()), key2)
        .await;
    (env, tap2, sealer2, sync_key)
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
    let (mut env, tap2, sealer2, sync_key) = acme_env(&["site3"]).await;

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

/// Waits for a resync of `edge` other than the one that started at `before`
/// to end; returns the edge's row.
async fn next_resync(env: &SyncEnv, edge: &str, before: &Value) -> Value {
    env.until("a new resync of the edge done", || async {
        let row = env.audit(&format!("/v1/edges/{edge}")).await;
        assert_ne!(row["resync"]["phase"], "failed", "{row:#}");
        row["resync"]["started_at"] != before["resync"]["started_at"]
            && row["resync"]["phase"] == "done"
    })
    .await;
    env.audit(&format!("/v1/edges/{edge}")).await
}

/// Central's entities in `domain` and a user in it with a password.
async fn domain_with_user(env: &SyncEnv, domain: &str, user: &str) -> String {
    let d = env
        .create("/v3/domains", "domain", json!({"domain": {"name": domain}}))
        .await;
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": user, "domain_id": d, "password": format!("{user}-pw-77")}}),
    )
    .await;
    d
}

/// A drift audit of a scoped edge compares only its scope: central's
/// entities outside it, and a domain the site made itself, are not drift;
/// one the site changed inside it is. A scope widened while central was down
/// marks the edge for a resync at central's next start, which brings what
/// entered the scope; narrowed back, the automatic resync leaves what left
/// it, and a resync with prune deletes it (what came from central: what the
/// site made itself outside its scope stays).
#[tokio::test]
async fn a_changed_scope_resyncs_the_edge_and_prune_removes_what_left_it() {
    let scope = |spec: &str| -> Scope { spec.parse().unwrap() };
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["site2".into()];
        c.sync.scopes.insert("site2".into(), scope("domains:acme"));
    })
    .await;
    let (key2, _) = edge_key(&env, "site2");
    env.add_edge_with_key("site2", None, key2).await;
    domain_with_user(&env, "acme", "alice").await;
    domain_with_user(&env, "other-dom", "bob").await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    let holds =
        |env: &SyncEnv, what: &str| format!("{:?}", env.edges[0].site.snapshot()).contains(what);
    assert!(holds(&env, "alice@acme") && !holds(&env, "bob@other-dom"));

    // Drift: only what is in scope.
    let site = &env.edges[0].site;
    crate::resync::direct(
        &env,
        site,
        "POST",
        "/v3/domains",
        json!({"domain": {"name": "local-dom"}}),
    )
    .await;
    let d = crate::resync::drift(&env, "site2").await;
    assert_eq!(crate::resync::found(&d), vec![], "{d:#}");
    let alice = env.edges[0].site.id_of("user", "alice").unwrap();
    crate::resync::direct(
        &env,
        site,
        "PATCH",
        &format!("/v3/users/{alice}"),
        json!({"user": {"description": "changed at the site"}}),
    )
    .await;
    let d = crate::resync::drift(&env, "site2").await;
    let found = crate::resync::found(&d);
    assert_eq!(found.len(), 1, "{d:#}");
    assert_eq!(found[0].1, "user", "{found:?}");

    // Widened while central was down: a resync at its next start.
    let before = env.audit("/v1/edges/site2").await;
    env.restart_central(|c| {
        c.sync
            .scopes
            .insert("site2".into(), scope("domains:acme,other-dom"));
    })
    .await;
    let row = next_resync(&env, "site2", &before).await;
    assert_eq!(row["scope"], "domains:acme,other-dom", "{row:#}");
    assert_eq!(row["needs_resync"], Value::Null, "{row:#}");
    assert!(holds(&env, "bob@other-dom"), "what entered the scope came");
    // Ops from now on: other-dom is in scope.
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "bob2", "domain_id": env.central_site.id_of("domain", "other-dom").unwrap()}}),
    )
    .await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    assert!(holds(&env, "bob2@other-dom"));

    // Narrowed back: what left stays, until a resync with prune.
    let before = env.audit("/v1/edges/site2").await;
    env.restart_central(|c| {
        c.sync.scopes.insert("site2".into(), scope("domains:acme"));
    })
    .await;
    let row = next_resync(&env, "site2", &before).await;
    assert_eq!(row["scope"], "domains:acme");
    assert!(holds(&env, "bob@other-dom") && holds(&env, "local-dom"));
    // Not drift, unless asked: then what came from central and left the
    // scope is only at the edge (what the site made itself is not).
    let d = crate::resync::drift(&env, "site2").await;
    assert_eq!(crate::resync::found(&d), vec![], "{d:#}");
    let (status, body) =
        crate::resync::post(&env, "/v1/drift/run?edge=site2&outside_scope=true").await;
    assert_eq!(status, 202, "{body}");
    let d = crate::resync::drift_ended(&env, "site2").await;
    let outside: Vec<String> = crate::resync::found(&d)
        .into_iter()
        .map(|(category, kind, key, _)| format!("{category} {kind} {key}"))
        .collect();
    for left in [
        "only_at_edge user other-dom/bob",
        "only_at_edge domain other-dom",
    ] {
        assert!(
            outside.iter().any(|f| f.starts_with(left)),
            "{left}: {outside:#?}"
        );
    }
    assert!(
        !outside.iter().any(|f| f.contains("local-dom")),
        "{outside:#?}"
    );
    let (status, _) = crate::resync::post(&env, "/v1/drift/run?outside_scope=true").await;
    assert_eq!(status, 400, "outside_scope needs an edge");
    let (status, body) = crate::resync::post(&env, "/v1/edges/site2/resync?prune=true").await;
    assert_eq!(status, 202, "{body}");
    let row = next_resync(&env, "site2", &row).await;
    assert_eq!(row["resync"]["prune"], true, "{row:#}");
    for gone in ["bob@other-dom", "bob2@other-dom", "domain other-dom"] {
        assert!(!holds(&env, gone), "{gone} still at site2");
    }
    // What the site made itself outside its scope is its own.
    assert!(holds(&env, "alice@acme") && holds(&env, "local-dom"));
    let d = crate::resync::drift(&env, "site2").await;
    assert_eq!(crate::resync::found(&d), vec![], "{d:#}");
    env.shutdown().await;
}

/// An edge given another edge's key does not start, and says which key
/// it holds and how to make its own.
#[tokio::test]
async fn an_edge_with_another_edges_key_does_not_start() {
    let env = sync_env(&[], None, |c| c.sync.edges = vec!["site2".into()]).await;
    let (key, _) = edge_key(&env, "site9");
    let (mut config, _site) = env.edge_config_for("site2").await;
    config.key = key;
    let err = syncgate::edge::Edge::build(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("edge key of edge 'site9'") && err.contains("keygen --edge site2"),
        "{err}"
    );
    assert!(!err.contains("edge:site9:"), "the key is not shown: {err}");
    // Nor does central with an edge key for its sync key.
    let dir = tempfile::tempdir().unwrap();
    let mut central = syncgate::CentralConfig::for_upstream(
        syncgate::settings::config::parse_base_url(&env.central_site.url()).unwrap(),
        format!("sqlite://{}", dir.path().join("c.db").display()),
    );
    central.sync.key = edge_key(&env, "site2").0;
    let err = syncgate::Central::build(central)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("the edge key of edge 'site2'"), "{err}");
    env.shutdown().await;
}

/// An edge holding the other kind of key than central expects of it is
/// shown so in its row: the sync key at an edge with a scope, an edge key at
/// one without; it applies nothing.
#[tokio::test]
async fn an_edge_holding_the_wrong_kind_of_key_is_told_which() {
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["site2".into(), "site3".into()];
        c.sync
            .scopes
            .insert("site2".into(), "domains:acme".parse().unwrap());
    })
    .await;
    env.add_edge("site2", None).await;
    let (key3, _) = edge_key(&env, "site3");
    env.add_edge_with_key("site3", None, key3).await;
    env.create("/v3/domains", "domain", json!({"domain": {"name": "acme"}}))
        .await;
    for (edge, says) in [
        ("site2", "it holds the sync key, but has a scope here"),
        ("site3", "it holds an edge key, but has no scope here"),
    ] {
        env.until(says, || async {
            let row = env.audit(&format!("/v1/edges/{edge}")).await;
            row["error"].as_str().is_some_and(|e| e.contains(says))
        })
        .await;
    }
    for e in &env.edges {
        assert_eq!(
            e.site.id_of("domain", "acme"),
            None,
            "{} applied an op",
            e.id
        );
    }
    env.shutdown().await;
}

/// What a seed of the chaos run made at central: (central ID, name, domain).
#[derive(Default)]
struct Made {
    users: Vec<(String, String, String)>,
    projects: Vec<(String, String, String)>,
    groups: Vec<(String, String, String)>,
    roles: Vec<String>,
    /// Every name and password made in a domain outside site2's scope.
    outside: Vec<String>,
    /// Users of acme whose default project is outside it (so are they).
    far: Vec<String>,
    /// Projects some user has for its default: never deleted.
    pinned: Vec<(String, String, String)>,
    n: usize,
}

/// The domains of the chaos run: `acme` is site2's scope.
const DOMAINS: [&str; 3] = ["acme", "other-dom", "Default"];

/// Whether a snapshot line of a chaos run concerns what it made.
fn made_by_run(line: &str) -> bool {
    line.contains("c-") || line.contains("acme") || line.contains("other-dom")
}

/// Whether a snapshot line is in `domains:acme`: every entity it names is
/// global or in acme.
fn in_acme(line: &str) -> bool {
    if line.starts_with("domain ") {
        return line.starts_with("domain acme");
    }
    line.split('@').skip(1).all(|rest| rest.starts_with("acme"))
}

/// One random write through the gateway. Names and secrets end in `z`, so
/// that none is part of another (`c-u3z` is not in `c-u34z`).
async fn chaos_write(
    env: &SyncEnv,
    rng: &mut crate::fault_run::Rng,
    made: &mut Made,
    domain_ids: &[String],
) {
    made.n += 1;
    let n = made.n;
    let pick = |rng: &mut crate::fault_run::Rng, v: &Vec<(String, String, String)>| {
        (!v.is_empty()).then(|| v[rng.below(v.len())].clone())
    };
    match rng.below(10) {
        0 | 1 => {
            let d = rng.below(3);
            let name = format!("c-u{n}z");
            let password = format!("c-pw-{n}-{}", rng.next() % 10_000);
            let mut user = json!({"name": name, "password": password});
            if d < 2 {
                user["domain_id"] = json!(domain_ids[d]);
            }
            // Now and then a default project, of any domain (kept: a user
            // whose default project is deleted would enter a scope no op
            // brings it into).
            let default = (rng.chance(50) && !made.projects.is_empty())
                .then(|| made.projects.swap_remove(rng.below(made.projects.len())));
            if let Some(p) = &default {
                user["default_project_id"] = json!(p.0);
            }
            let id = env
                .create("/v3/users", "user", json!({ "user": user }))
                .await;
            // Of acme, but outside it by its default project.
            let far = d == 0 && default.as_ref().is_some_and(|p| p.2 != "acme");
            if d != 0 || far {
                made.outside.extend([name.clone(), password]);
            }
            if far {
                made.far.push(name.clone());
            }
            made.pinned.extend(default);
            let domain = if far { "far" } else { DOMAINS[d] };
            made.users.push((id, name, domain.into()));
        }
        2 | 3 => {
            // A project or a group, in acme or not.
            let (path, kind, letter) = match made.n % 2 {
                0 => ("/v3/projects", "project", 'p'),
                _ => ("/v3/groups", "group", 'g'),
            };
            let d = rng.below(2);
            let name = format!("c-{letter}{n}z");
            let id = env
                .create(
                    path,
                    kind,
                    json!({ kind: {"name": name, "domain_id": domain_ids[d]} }),
                )
                .await;
            if d != 0 {
                made.outside.push(name.clone());
            }
            let list = match kind {
                "project" => &mut made.projects,
                _ => &mut made.groups,
            };
            list.push((id, name, DOMAINS[d].into()));
        }
        4 if made.roles.len() < 3 => {
            let id = env
                .create(
                    "/v3/roles",
                    "role",
                    json!({"role": {"name": format!("c-r{n}z")}}),
                )
                .await;
            made.roles.push(id);
        }
        4 | 5 => {
            let (Some(u), Some(p)) = (pick(rng, &made.users), pick(rng, &made.projects)) else {
                return;
            };
            let Some(r) =
                (!made.roles.is_empty()).then(|| made.roles[rng.below(made.roles.len())].clone())
            else {
                return;
            };
            let method = if rng.chance(75) { "PUT" } else { "DELETE" };
            env.write(
                method,
                &format!("/v3/projects/{}/users/{}/roles/{r}", p.0, u.0),
                None,
            )
            .await;
        }
        6 => {
            let (Some(u), Some(g)) = (pick(rng, &made.users), pick(rng, &made.groups)) else {
                return;
            };
            env.write("PUT", &format!("/v3/groups/{}/users/{}", g.0, u.0), None)
                .await;
        }
        7 | 8 => {
            let Some(u) = pick(rng, &made.users) else {
                return;
            };
            let secret = format!("c-secret-{n}z");
            let (status, _) = env
                .write(
                    "PATCH",
                    &format!("/v3/users/{}", u.0),
                    Some(
                        json!({"user": {"description": secret, "password": format!("c-pw2-{n}z")}}),
                    ),
                )
                .await;
            assert_eq!(status, 200);
            if u.2 != "acme" {
                made.outside.extend([secret, format!("c-pw2-{n}z")]);
            }
        }
        _ => {
            // A delete: a user or a project, gone with what references it.
            if rng.chance(50) && !made.users.is_empty() {
                let u = made.users.swap_remove(rng.below(made.users.len()));
                env.write("DELETE", &format!("/v3/users/{}", u.0), None)
                    .await;
            } else if !made.projects.is_empty() {
                let p = made.projects.swap_remove(rng.below(made.projects.len()));
                env.write("DELETE", &format!("/v3/projects/{}", p.0), None)
                    .await;
            }
        }
    }
}

/// Seeded, model-based chaos of per-site scope: random writes across
/// three domains (users with passwords and now and then a default project
/// of any domain, projects, groups, memberships, global roles, grants within
/// and across domains, updates and deletes),
/// with faults at the edge carrying only `acme` (restarts, kills, resyncs
/// with and without prune while writes go on, drift audits). Then, against
/// both sites: site1 holds all of central; site2 holds exactly central's
/// `acme` part (every entity it names global or in acme); every delivery to
/// site2 is applied or out_of_scope, nothing out of sync; a drift audit
/// finds nothing; and nothing made outside acme (names, passwords,
/// descriptions) ever reached site2's broker connection.
/// `SYNCGATE_SCOPE_SEEDS=N` runs N seeds (default 6), `SYNCGATE_SCOPE_SEED=S` one.
#[tokio::test]
async fn scope_chaos_keeps_each_site_to_its_scope() {
    let seeds: Vec<u64> = match std::env::var("SYNCGATE_SCOPE_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => {
            let n: u64 = std::env::var("SYNCGATE_SCOPE_SEEDS")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(6);
            let base = crate::helpers::seed_from("SYNCGATE_SCOPE_SEED");
            (0..n).map(|i| base.wrapping_add(i)).collect()
        }
    };
    for seed in seeds {
        eprintln!("scope chaos: seed {seed} (SYNCGATE_SCOPE_SEED={seed} runs it alone)");
        scope_chaos_run(seed).await;
    }
}

async fn scope_chaos_run(seed: u64) {
    let mut rng = crate::fault_run::Rng(seed | 1);
    let (mut env, tap2, sealer2, sync_key) = acme_env(&[]).await;
    let mut domain_ids = Vec::new();
    for d in &DOMAINS[..2] {
        domain_ids.push(
            env.create("/v3/domains", "domain", json!({"domain": {"name": d}}))
                .await,
        );
    }
    let mut made = Made::default();
    let mut resync_row: Option<Value> = None;
    for _ in 0..40 {
        chaos_write(&env, &mut rng, &mut made, &domain_ids).await;
        match rng.below(40) {
            0 => {
                env.stop_edge(1).await;
                env.restart_edge(1).await;
            }
            1 => {
                env.kill_edge(1).await;
                env.restart_edge(1).await;
            }
            2 | 3 => {
                // A resync racing the writes that follow.
                let prune = rng.chance(50);
                let before = env.audit("/v1/edges/site2").await;
                let (status, body) =
                    crate::resync::post(&env, &format!("/v1/edges/site2/resync?prune={prune}"))
                        .await;
                if status == 202 {
                    resync_row = Some(before);
                } else {
                    assert_eq!(status, 409, "{body}");
                }
            }
            _ => {}
        }
    }
    eprintln!(
        "scope chaos: seed {seed}: {} users of acme outside it by their default project",
        made.far.len()
    );
    if let Some(before) = resync_row {
        next_resync(&env, "site2", &before).await;
    }
    env.until_delivered(&["site1"], &["applied", "adopted"])
        .await;
    env.until_delivered(&["site2"], &["applied", "adopted", "out_of_scope"])
        .await;
    let oos = env.audit("/v1/out-of-sync").await;
    assert_eq!(oos["out_of_sync"], json!([]), "seed {seed}: {oos}");
    let central = env.central_site.snapshot();
    assert_eq!(env.edges[0].site.snapshot(), central, "seed {seed}: site1");
    let want: std::collections::BTreeSet<&String> = central
        .iter()
        .filter(|l| made_by_run(l) && in_acme(l))
        .filter(|l| !made.far.iter().any(|name| l.contains(&format!(" {name}@"))))
        .collect();
    let at2 = env.edges[1].site.snapshot();
    let got: std::collections::BTreeSet<&String> = at2.iter().filter(|l| made_by_run(l)).collect();
    assert_eq!(got, want, "seed {seed}: site2 holds central's acme part");
    let d = crate::resync::drift(&env, "site2").await;
    assert_eq!(crate::resync::found(&d), vec![], "seed {seed}: {d:#}");
    let outside: Vec<&str> = made.outside.iter().map(String::as_str).collect();
    check_delivered(&tap2, "site2", &sealer2, &sync_key, &outside);
    env.shutdown().await;
}

/// A create without `domain_id` lands in the domain of the caller's token:
/// the edge carrying that domain gets it (its domain named from what
/// central learned), not a marker.
#[tokio::test]
async fn a_create_in_the_callers_token_domain_reaches_the_edge_carrying_it() {
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["site2".into()];
        c.sync
            .scopes
            .insert("site2".into(), "domains:acme".parse().unwrap());
    })
    .await;
    let (key2, _) = edge_key(&env, "site2");
    env.add_edge_with_key("site2", None, key2).await;
    let acme = env
        .create("/v3/domains", "domain", json!({"domain": {"name": "acme"}}))
        .await;
    let web = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "web", "domain_id": acme}}),
        )
        .await;
    let alice = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "alice", "domain_id": acme, "password": "alice-pw-1"}}),
        )
        .await;
    let admin_role = env.central_site.id_of("role", "admin").unwrap();
    let (status, _) = env
        .write(
            "PUT",
            &format!("/v3/projects/{web}/users/{alice}/roles/{admin_role}"),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let resp = env
        .http
        .post(format!("{}/v3/auth/tokens", env.central_site.url()))
        .json(&json!({"auth": {
            "identity": {"methods": ["password"], "password": {"user": {
                "id": alice, "password": "alice-pw-1"}}},
            "scope": {"project": {"id": web}}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let token = resp.headers()["x-subject-token"]
        .to_str()
        .unwrap()
        .to_string();
    let resp = env
        .http
        .post(format!("{}/v3/users", env.proxy))
        .header("x-auth-token", &token)
        .json(&json!({"user": {"name": "by-token", "password": "by-token-pw-2"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let seq = env.last_seq().await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    assert_eq!(env.delivery(seq, "site2").await, "applied");
    let at2 = format!("{:?}", env.edges[0].site.snapshot());
    assert!(at2.contains("by-token@acme"), "{at2}");
    env.shutdown().await;
}

/// A write to an entity by its own ID counts what that entity references
/// though the write does not name it: a user whose default project lies in
/// another domain is outside `acme`, and so is every later update naming only
/// the user (its password never reaches the acme edge); a credential or a
/// limit updated or deleted by its ID touches its owner's domain, and so
/// reaches the edge carrying it (applied there) or not at all.
#[tokio::test]
async fn a_write_by_id_counts_what_its_entity_references() {
    let (env, tap2, sealer2, sync_key) = acme_env(&[]).await;
    let (acme, other, far, web) = acme_and_far(&env).await;
    let dave = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "dave-far-default", "domain_id": acme,
                "default_project_id": far, "password": "dave-pw-0001"}}),
        )
        .await;
    let erin = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "erin", "domain_id": acme, "password": "erin-pw-0001"}}),
        )
        .await;
    let mut expected = vec![
        ("acme", "applied"),
        ("far-dom", "out_of_scope"),
        ("far-proj", "out_of_scope"),
        ("web", "applied"),
        ("dave", "out_of_scope"),
        ("erin", "applied"),
    ];
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{dave}"),
            Some(json!({"user": {"description": "dave-desc-0002", "password": "dave-pw-0002"}})),
        )
        .await;
    assert_eq!(status, 200);
    expected.push(("dave's update", "out_of_scope"));
    // What names dave is outside too: a grant on an acme project, a
    // membership of an acme group, a credential.
    let role = env
        .create("/v3/roles", "role", json!({"role": {"name": "by-id-role"}}))
        .await;
    let group = env
        .create(
            "/v3/groups",
            "group",
            json!({"group": {"name": "acme-group", "domain_id": acme}}),
        )
        .await;
    expected.extend([("role", "applied"), ("group", "applied")]);
    for path in [
        format!("/v3/projects/{web}/users/{dave}/roles/{role}"),
        format!("/v3/groups/{group}/users/{dave}"),
    ] {
        let (status, _) = env.write("PUT", &path, None).await;
        assert_eq!(status, 204, "{path}");
        expected.push(("naming dave", "out_of_scope"));
    }
    let credential = |user: &str, project: Option<&str>, blob: &str| {
        let mut c = json!({"credential": {"user_id": user, "type": "totp", "blob": blob}});
        if let Some(p) = project {
            c["credential"]["project_id"] = json!(p);
        }
        c
    };
    let mine = env
        .create(
            "/v3/credentials",
            "credential",
            credential(&erin, Some(&web), "erin-blob-0001"),
        )
        .await;
    expected.push(("erin's credential", "applied"));
    let elsewhere = env
        .create(
            "/v3/credentials",
            "credential",
            credential(&erin, Some(&far), "far-blob-0001"),
        )
        .await;
    expected.push(("erin's credential on far-proj", "out_of_scope"));
    env.create(
        "/v3/credentials",
        "credential",
        credential(&dave, None, "dave-blob-0001"),
    )
    .await;
    expected.push(("dave's credential", "out_of_scope"));
    for (id, blob, state) in [
        (&mine, "erin-blob-0002", "applied"),
        (&elsewhere, "far-blob-0002", "out_of_scope"),
    ] {
        let (status, _) = env
            .write(
                "PATCH",
                &format!("/v3/credentials/{id}"),
                Some(json!({"credential": {"blob": blob}})),
            )
            .await;
        assert_eq!(status, 200);
        expected.push(("a credential's update", state));
    }
    // A limit on an acme project, and on far-proj.
    let svc = env
        .create(
            "/v3/services",
            "service",
            json!({"service": {"type": "compute", "name": "nova"}}),
        )
        .await;
    env.create(
        "/v3/regions",
        "region",
        json!({"region": {"id": "RegionX"}}),
    )
    .await;
    let (status, _) = env
        .write(
            "POST",
            "/v3/registered_limits",
            Some(
                json!({"registered_limits": [{"service_id": svc, "region_id": "RegionX",
                "resource_name": "cores", "default_limit": 10}]}),
            ),
        )
        .await;
    assert_eq!(status, 201);
    // (The catalog is not replicated here: only the registered limit is an op.)
    expected.push(("registered limit", "applied"));
    let mut limits = Vec::new();
    for (project, state) in [(&web, "applied"), (&far, "out_of_scope")] {
        let (status, resp) = env
            .write(
                "POST",
                "/v3/limits",
                Some(json!({"limits": [{"project_id": project, "service_id": svc,
                    "region_id": "RegionX", "resource_name": "cores", "resource_limit": 5}]})),
            )
            .await;
        assert_eq!(status, 201, "{resp}");
        limits.push(resp["limits"][0]["id"].as_str().unwrap().to_string());
        expected.push(("a limit", state));
    }
    for (id, state, description) in [
        (&limits[0], "applied", "web-limit-desc"),
        (&limits[1], "out_of_scope", "far-limit-desc"),
    ] {
        let (status, resp) = env
            .write(
                "PATCH",
                &format!("/v3/limits/{id}"),
                Some(json!({"limit": {"resource_limit": 7, "description": description}})),
            )
            .await;
        assert_eq!(status, 200, "{resp}");
        expected.push(("a limit's update", state));
    }
    // site2 holds erin's credential and the acme limit, as updated.
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    let site2 = &env.edges[1].site;
    let blobs: Vec<Value> = site2
        .unnamed("credential")
        .into_iter()
        .map(|c| c["blob"].clone())
        .collect();
    assert_eq!(blobs, [json!("erin-blob-0002")]);
    let held: Vec<Value> = site2
        .unnamed("limit")
        .into_iter()
        .map(|l| l["resource_limit"].clone())
        .collect();
    assert_eq!(held, [json!(7)]);
    // A drift audit agrees: what is outside by what it references is not
    // drift at site2.
    let d = crate::resync::drift(&env, "site2").await;
    assert_eq!(crate::resync::found(&d), vec![], "{d:#}");
    for (path, state) in [
        (format!("/v3/credentials/{mine}"), "applied"),
        (format!("/v3/credentials/{elsewhere}"), "out_of_scope"),
        (format!("/v3/limits/{}", limits[0]), "applied"),
        (format!("/v3/limits/{}", limits[1]), "out_of_scope"),
        (format!("/v3/users/{dave}"), "out_of_scope"),
    ] {
        let (status, _) = env.write("DELETE", &path, None).await;
        assert_eq!(status, 204, "{path}");
        expected.push(("a delete", state));
    }
    // A grant on the system, to an acme user: authority over the whole
    // site, in no domain.
    let path = format!("/v3/system/users/{erin}/roles/{role}");
    let (status, _) = env.write("PUT", &path, None).await;
    assert_eq!(status, 204);
    expected.push(("a grant on the system", "out_of_scope"));
    // EC2 keys of erin's, on an acme project and on far-proj: made, then
    // deleted by their access key (the path names erin, not the project).
    let mut far_key = Vec::new();
    let mut keys = Vec::new();
    for (project, state) in [(&web, "applied"), (&far, "out_of_scope")] {
        let (status, resp) = env
            .write(
                "POST",
                &format!("/v3/users/{erin}/credentials/OS-EC2"),
                Some(json!({"tenant_id": project})),
            )
            .await;
        assert_eq!(status, 201, "{resp}");
        let access = resp["credential"]["access"].as_str().unwrap().to_string();
        if state == "out_of_scope" {
            far_key.push(access.clone());
            far_key.push(resp["credential"]["secret"].as_str().unwrap().to_string());
        }
        keys.push((access, state));
        expected.push(("an EC2 key", state));
    }
    for (access, state) in &keys {
        let path = format!("/v3/users/{erin}/credentials/OS-EC2/{access}");
        let (status, _) = env.write("DELETE", &path, None).await;
        assert_eq!(status, 204, "{path}");
        expected.push(("an EC2 key's delete", state));
    }

    env.until_delivered(&["site1"], &["applied"]).await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    let last = env.last_seq().await;
    let ops = env.audit("/v1/ops?limit=100").await;
    assert_eq!(last as usize, expected.len(), "{ops:#}");
    for (seq, (what, state)) in (1..=last).zip(&expected) {
        assert_eq!(env.delivery(seq, "site2").await, *state, "op {seq}: {what}");
    }
    let oos = env.audit("/v1/out-of-sync").await;
    assert_eq!(oos["out_of_sync"], json!([]), "{oos}");
    assert_eq!(env.edges[0].site.snapshot(), env.central_site.snapshot());
    let site2 = &env.edges[1].site;
    assert!(site2.unnamed("credential").is_empty() && site2.unnamed("limit").is_empty());
    check_delivered(
        &tap2,
        "site2",
        &sealer2,
        &sync_key,
        &[
            "far-dom",
            "far-proj",
            "dave-far-default",
            "dave-pw-0001",
            "dave-pw-0002",
            "dave-desc-0002",
            "far-blob-0001",
            "far-blob-0002",
            "dave-blob-0001",
            "far-limit-desc",
            &far_key[0],
            &far_key[1],
        ],
    );

    // What a credential references cannot be read: its update is refused,
    // nothing forwarded, and goes through once it can.
    let cred = env
        .create(
            "/v3/credentials",
            "credential",
            credential(&erin, None, "erin-blob-0003"),
        )
        .await;
    let last = env.last_seq().await;
    env.central_site
        .state
        .lock()
        .unwrap()
        .garbled
        .insert("credentials".into());
    let patch = json!({"credential": {"blob": "erin-blob-0004"}});
    let path = format!("/v3/credentials/{cred}");
    let (status, resp) = env.write("PATCH", &path, Some(patch.clone())).await;
    assert_eq!(status, 503, "{resp}");
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(message.contains("which sites may receive"), "{message}");
    assert_eq!(env.last_seq().await, last);
    let blobs: Vec<Value> = env
        .central_site
        .unnamed("credential")
        .into_iter()
        .map(|c| c["blob"].clone())
        .collect();
    assert_eq!(blobs, [json!("erin-blob-0003")], "nothing forwarded");
    env.central_site.state.lock().unwrap().garbled.clear();
    // ... and so is a write naming a user whose default project central may
    // not read (a 403 is not an absent project): one made, and set as
    // dora's default, at central's Keystone directly.
    let dora = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "dora", "domain_id": acme}}),
        )
        .await;
    let site = &env.central_site;
    let hidden = crate::resync::direct(
        &env,
        site,
        "POST",
        "/v3/projects",
        json!({"project": {"name": "hidden-proj", "domain_id": other}}),
    )
    .await["project"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    crate::resync::direct(
        &env,
        site,
        "PATCH",
        &format!("/v3/users/{dora}"),
        json!({"user": {"default_project_id": hidden}}),
    )
    .await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    let last = env.last_seq().await;
    site.state
        .lock()
        .unwrap()
        .refused_reads
        .push(format!("/v3/projects/{hidden}"));
    let (status, resp) = env
        .write(
            "PATCH",
            &format!("/v3/users/{dora}"),
            Some(json!({"user": {"description": "dora-desc-0001"}})),
        )
        .await;
    assert_eq!(status, 503, "{resp}");
    assert_eq!(env.last_seq().await, last, "nothing forwarded");
    site.state.lock().unwrap().refused_reads.clear();
    // Read, it is counted: dora is outside acme now.
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{dora}"),
            Some(json!({"user": {"description": "dora-desc-0002"}})),
        )
        .await;
    assert_eq!(status, 200);
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    assert_eq!(env.delivery(last + 1, "site2").await, "out_of_scope");
    let last = last + 1;
    let (status, _) = env.write("PATCH", &path, Some(patch)).await;
    assert_eq!(status, 200);
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    assert_eq!(env.delivery(last + 1, "site2").await, "applied");
    check_delivered(
        &tap2,
        "site2",
        &sealer2,
        &sync_key,
        &["hidden-proj", "dora-desc-0001", "dora-desc-0002"],
    );
    env.shutdown().await;
}

/// Speaks for `edge` (a declared edge no process runs) on the broker: the
/// hellos that make this session its holder. Returns the client, the
/// session and central's session.
async fn speak_as(
    env: &SyncEnv,
    edge: &str,
    sealer: &Sealer,
) -> (async_nats::Client, Session, u64) {
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let me = Session::new(syncgate::protocol::control::next_session(0), false);
    let hello = Hello {
        edge: edge.into(),
        cursor: 0,
        version: "test".into(),
        error: None,
        outcomes_through: None,
        initial_sync: false,
        boot: Some(me.id().to_string()),
        protocol: Some(2),
        lease_ms: Some(30_000),
        leaving: false,
        database: None,
        connects: None,
        asks_in_hand: None,
    };
    let subject = format!("syncgate.hello.{edge}");
    let mut to = 0;
    loop {
        let reply = match nats
            .request(
                subject.clone(),
                me.seal(sealer, "hello", edge, to, &hello).into(),
            )
            .await
        {
            Ok(reply) => reply,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => panic!("hello: {e}"),
        };
        let opened = me
            .open::<HelloReply>(sealer, "hello_reply", Some(edge), &reply.payload, false)
            .unwrap();
        to = opened.from;
        if matches!(opened.msg.grant, Grant::Granted { .. }) {
            return (nats, me, to);
        }
    }
}

async fn op_id_of(env: &SyncEnv, seq: i64) -> String {
    env.audit(&format!("/v1/ops/{seq}")).await["op_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The detail of `edge`'s delivery of op `seq`.
async fn delivery_detail(env: &SyncEnv, seq: i64, edge: &str) -> String {
    let op = env.audit(&format!("/v1/ops/{seq}")).await;
    op["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["edge"] == edge)
        .map(|d| d["detail"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

fn ack(seq: i64, op_id: &str, outcome: Outcome) -> Ack {
    Ack {
        seq,
        op_id: op_id.into(),
        outcome,
        status: None,
        detail: None,
        edge_id_created: vec![],
        operator_skipped: false,
    }
}

/// An `out_of_scope` ack is believed only where it can be: from an edge with
/// a scope, for an op outside it. Otherwise it is recorded failed with the
/// reason (it would hide an op never applied), whether it came live or in
/// the account of outcomes central asks for after acks were lost.
#[tokio::test]
async fn an_out_of_scope_ack_that_cannot_be_is_recorded_failed_live_or_recovered() {
    let env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["plain".into(), "scoped".into()];
        c.sync
            .scopes
            .insert("scoped".into(), "domains:acme".parse().unwrap());
    })
    .await;
    let acme = env
        .create("/v3/domains", "domain", json!({"domain": {"name": "acme"}}))
        .await;
    let other = env
        .create(
            "/v3/domains",
            "domain",
            json!({"domain": {"name": "other"}}),
        )
        .await;
    for (name, domain) in [("in-acme", &acme), ("in-other", &other)] {
        env.create(
            "/v3/projects",
            "project",
            json!({"project": {"name": name, "domain_id": domain}}),
        )
        .await;
    }
    // An edge without a scope.
    let sync = env.key.sealer().unwrap();
    let (nats, me, central) = speak_as(&env, "plain", &sync).await;
    let sealed = me.seal(
        &sync,
        "ack",
        "plain",
        central,
        &ack(1, &op_id_of(&env, 1).await, Outcome::OutOfScope),
    );
    nats.publish("syncgate.ack.plain", sealed.into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    env.until("the ack is recorded", || async {
        env.delivery(1, "plain").await == "failed"
    })
    .await;
    assert!(delivery_detail(&env, 1, "plain")
        .await
        .contains("has no scope here"));

    // The scoped edge, live: op 1 (acme) is in its scope, op 2 (other) not.
    let (_, edge_sealer) = edge_key(&env, "scoped");
    let (nats, me, central) = speak_as(&env, "scoped", &edge_sealer).await;
    for seq in [1, 2] {
        let sealed = me.seal(
            &edge_sealer,
            "ack",
            "scoped",
            central,
            &ack(seq, &op_id_of(&env, seq).await, Outcome::OutOfScope),
        );
        nats.publish("syncgate.ack.scoped", sealed.into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    env.until("both acks are recorded", || async {
        env.delivery(2, "scoped").await == "out_of_scope"
    })
    .await;
    assert_eq!(env.delivery(1, "scoped").await, "failed");
    assert!(delivery_detail(&env, 1, "scoped")
        .await
        .contains("in this edge's scope"));

    // Recovered: op 4 acked first, central asks for (2, 4] and is told op 3
    // (acme's project) was out of scope.
    let mut asked = nats.subscribe("syncgate.outcomes.scoped").await.unwrap();
    nats.flush().await.unwrap();
    let sealed = me.seal(
        &edge_sealer,
        "ack",
        "scoped",
        central,
        &ack(4, &op_id_of(&env, 4).await, Outcome::OutOfScope),
    );
    nats.publish("syncgate.ack.scoped", sealed.into())
        .await
        .unwrap();
    let request = tokio::time::timeout(std::time::Duration::from_secs(30), asked.next())
        .await
        .expect("central asks for the outcomes it missed")
        .unwrap();
    let opened = me
        .open::<OutcomesRequest>(
            &edge_sealer,
            OUTCOMES_REQUEST,
            Some("scoped"),
            &request.payload,
            false,
        )
        .unwrap();
    assert_eq!((opened.msg.after, opened.msg.through), (2, 4));
    let reply = OutcomesReply {
        through: 4,
        exceptions: vec![
            ack(3, &op_id_of(&env, 3).await, Outcome::OutOfScope),
            ack(4, &op_id_of(&env, 4).await, Outcome::OutOfScope),
        ],
    };
    let sealed = me.seal(&edge_sealer, OUTCOMES_REPLY, "scoped", opened.from, &reply);
    nats.publish(request.reply.unwrap(), sealed.into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    env.until("the recovered outcomes are recorded", || async {
        matches!(
            env.delivery(3, "scoped").await.as_str(),
            "failed" | "out_of_scope" | "applied"
        )
    })
    .await;
    assert_eq!(env.delivery(3, "scoped").await, "failed");
    assert!(delivery_detail(&env, 3, "scoped")
        .await
        .contains("in this edge's scope"));
    assert_eq!(env.delivery(4, "scoped").await, "out_of_scope");
    env.shutdown().await;
}

/// Ops logged while no scope limited domains carry nothing of what the users
/// they name belong to (central read no default projects then): once a scope
/// limits an edge's domains, they reach it as markers, whatever they name,
/// replayed or re-driven. Ops logged since are counted as they are.
#[tokio::test]
async fn ops_logged_before_owners_were_read_reach_a_limited_edge_as_markers() {
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["site2".into()];
    })
    .await;
    let (acme, _, far, web) = acme_and_far(&env).await;
    let role = env
        .create("/v3/roles", "role", json!({"role": {"name": "early-role"}}))
        .await;
    let mut users = Vec::new();
    for (name, default) in [("dave-far", Some(&far)), ("erin-acme", None)] {
        let mut user = json!({"user": {"name": name, "domain_id": acme}});
        if let Some(p) = default {
            user["user"]["default_project_id"] = json!(p);
        }
        users.push(env.create("/v3/users", "user", user).await);
    }
    let grant = |user: &str| format!("/v3/projects/{web}/users/{user}/roles/{role}");
    // Logged before: dave's grant names an acme project and an acme user,
    // and nothing else said where dave belongs.
    let (status, _) = env.write("PUT", &grant(&users[0]), None).await;
    assert_eq!(status, 204);
    let early = env.last_seq().await;

    // site2 limited to acme from now on.
    env.restart_central(|c| {
        c.sync
            .scopes
            .insert("site2".into(), "domains:acme".parse().unwrap());
    })
    .await;
    for user in &users {
        let (status, _) = env.write("DELETE", &grant(user), None).await;
        assert!(status == 204 || status == 404, "{status}");
    }
    let (status, _) = env.write("PUT", &grant(&users[1]), None).await;
    assert_eq!(status, 204);
    let last = env.last_seq().await;

    // What site2 receives, replayed from the start.
    let (_, edge_sealer) = edge_key(&env, "site2");
    let (nats, me, central) = speak_as(&env, "site2", &edge_sealer).await;
    let request = ReplayRequest {
        from_seq: 1,
        limit: 100,
    };
    let sealed = me.seal(&edge_sealer, REPLAY, "site2", central, &request);
    let reply = nats
        .request("syncgate.replay", sealed.into())
        .await
        .unwrap();
    let batch: ReplayBatch = serde_json::from_slice(&reply.payload)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&reply.payload)));
    let states: Vec<(i64, String, String)> = batch
        .ops
        .iter()
        .map(|env| {
            let plain = edge_sealer
                .open(&Envelope::aad(env.seq), &env.enc, &env.data)
                .unwrap();
            let op: OpContent = serde_json::from_slice(&plain).unwrap();
            (op.seq, op.state, op.path)
        })
        .collect();
    assert_eq!(states.len() as i64, last, "{states:#?}");
    let state_of = |seq: i64| states[(seq - 1) as usize].1.clone();
    // Logged before: acme's project whole, dave's and erin's users as they
    // name their domain and default project in their bodies, dave's grant
    // a marker.
    assert_eq!(state_of(4), "committed", "web: {states:#?}");
    assert_eq!(state_of(6), "out_of_scope", "dave: {states:#?}");
    assert_eq!(state_of(7), "committed", "erin: {states:#?}");
    assert_eq!(state_of(early), "out_of_scope", "{states:#?}");
    // Logged since: dave's grant's delete out (his default project read),
    // erin's grant whole.
    assert_eq!(state_of(early + 1), "out_of_scope", "{states:#?}");
    assert_eq!(state_of(last), "committed", "{states:#?}");
    assert!(states[(last - 1) as usize].2.contains(&users[1]));
    env.shutdown().await;
}

/// Domains `acme` and `far-dom`, and projects `far-proj` in the latter and
/// `web` in acme: their IDs (acme, far-dom, far-proj, web).
async fn acme_and_far(env: &SyncEnv) -> (String, String, String, String) {
    let acme = env
        .create("/v3/domains", "domain", json!({"domain": {"name": "acme"}}))
        .await;
    let other = env
        .create(
            "/v3/domains",
            "domain",
            json!({"domain": {"name": "far-dom"}}),
        )
        .await;
    let far = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "far-proj", "domain_id": other}}),
        )
        .await;
    let web = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "web", "domain_id": acme}}),
        )
        .await;
    (acme, other, far, web)
}

/// `acme_and_far`, and `erin` of acme with a credential: their IDs (acme,
/// far-proj, erin, the credential).
pub async fn erin_and_far(env: &SyncEnv) -> (String, String, String, String) {
    let (acme, _, far, _) = acme_and_far(env).await;
    let erin = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "erin", "domain_id": acme}}),
        )
        .await;
    let cred = env
        .create(
            "/v3/credentials",
            "credential",
            json!({"credential": {"user_id": erin, "type": "totp", "blob": "erin-blob-0001"}}),
        )
        .await;
    (acme, far, erin, cred)
}

/// erin's move to `far` (through `env`'s central) racing `update` of her
/// credential: the move waits at central's Keystone until `update` has read
/// the credential and erin there, then goes on. Returns the move's status
/// and what `update` gave.
pub async fn move_racing<T>(
    env: &SyncEnv,
    erin: &str,
    cred: &str,
    far: &str,
    update: impl std::future::Future<Output = T>,
) -> (u16, T) {
    let (open, gate) = tokio::sync::watch::channel(false);
    env.central_site.state.lock().unwrap().writes_wait = Some(gate);
    let site = &env.central_site;
    let reads_of = |path: &str| {
        site.state
            .lock()
            .unwrap()
            .reads
            .iter()
            .filter(|r| *r == path)
            .count()
    };
    let user_path = format!("/v3/users/{erin}");
    let cred_path = format!("/v3/credentials/{cred}");
    let moved = env.write(
        "PATCH",
        &user_path,
        Some(json!({"user": {"default_project_id": far}})),
    );
    let racing = async {
        env.until("erin's move waits at Keystone", || async {
            site.state.lock().unwrap().writes_waiting == 1
        })
        .await;
        let user_reads = reads_of(&user_path);
        let opener = async {
            env.until("the credential's owner is read", || async {
                reads_of(&cred_path) > 0 && reads_of(&user_path) > user_reads
            })
            .await;
            open.send(true).unwrap();
        };
        tokio::join!(update, opener).0
    };
    let ((moved, _), updated) = tokio::join!(moved, racing);
    (moved, updated)
}

/// A credential written by its ID while its user is being moved out of a
/// scope: the credential's write waits for the move (it holds the user too,
/// and reads what the user belongs to under it), so it is counted by where
/// the user is once moved, never by where it was.
#[tokio::test]
async fn a_credential_written_while_its_user_moves_is_counted_after_the_move() {
    let (env, tap2, sealer2, sync_key) = acme_env(&[]).await;
    let (_, far, erin, cred) = erin_and_far(&env).await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    let before = env.last_seq().await;
    // erin's move waits at central's Keystone; the credential's update
    // starts meanwhile.
    let cred_path = format!("/v3/credentials/{cred}");
    let update = env.write(
        "PATCH",
        &cred_path,
        Some(json!({"credential": {"blob": "race-blob-0002"}})),
    );
    let (moved, (updated, resp)) = move_racing(&env, &erin, &cred, &far, update).await;
    assert_eq!((moved, updated), (200, 200), "{resp}");
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    assert_eq!(env.last_seq().await, before + 2);
    let update = before + 2;
    let op = env.audit(&format!("/v1/ops/{update}")).await;
    assert_eq!(
        op["path"],
        json!(cred_path),
        "the update waited for the move: {op:#}"
    );
    assert_eq!(env.delivery(update, "site2").await, "out_of_scope");
    check_delivered(&tap2, "site2", &sealer2, &sync_key, &["race-blob-0002"]);
    env.shutdown().await;
}
