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
            let id = env
                .create("/v3/users", "user", json!({ "user": user }))
                .await;
            if d != 0 {
                made.outside.extend([name.clone(), password]);
            }
            made.users.push((id, name, DOMAINS[d].into()));
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
/// three domains (users with passwords, projects, groups, memberships,
/// global roles, grants within and across domains, updates and deletes),
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
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["site1".into(), "site2".into()];
        c.sync
            .scopes
            .insert("site2".into(), "domains:acme".parse().unwrap());
    })
    .await;
    let sync_key = env.key.sealer().unwrap();
    env.add_edge("site1", None).await;
    let tap2 = tap(&env.broker_url).await;
    let (key2, sealer2) = edge_key(&env, "site2");
    env.add_edge_with_key("site2", Some(tap2.url.clone()), key2)
        .await;
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
