//! Seeded randomised fault injection. A stream of writes (creates, updates,
//! deletes, grants, memberships, bursts of concurrent updates to one entity)
//! goes through central while faults come and go on every link (central and its
//! Keystone, central and the broker, each edge and the broker, each edge and its
//! Keystone) and edges, central and the broker are killed or restarted. Then
//! everything heals and the invariants are checked: seq has no gap and no op is
//! duplicated; every write a client saw succeed is exactly one committed op;
//! every edge has an outcome for every op; each edge ends equal to central by
//! natural key, or lists what is not with a reason. The seed is printed first
//! (`SYNCGATE_FAULT_SEED=N` replays a run).

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use syncgate::broker::{Broker, BrokerConfig};
use syncgate::edge::Edge;
use syncgate::settings::config::{
    parse_base_url, parse_nats_url, BrokerMode, EdgeConfig, OnFailure, SyncKey,
};
use syncgate::{Central, CentralConfig};

use crate::fake_site::FakeSite;
use crate::faults::{Fault, FaultProxy};
use crate::sync::{admin_credentials, admin_token, nats_server_path, spawn_nats_server, Running};

/// xorshift64*: small, seeded, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

enum BrokerProc {
    Embedded(Running),
    NatsServer(tokio::process::Child),
}

/// Starts a broker on a fresh port: the embedded one, or a real nats-server.
async fn start_broker(nats_server: Option<&std::path::Path>) -> (BrokerProc, SocketAddr) {
    match nats_server {
        None => {
            let broker = Broker::bind(BrokerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..BrokerConfig::default()
            })
            .await
            .unwrap();
            let addr = broker.local_addr();
            let task = Running::spawn(|rx| {
                broker.run(async {
                    let _ = rx.await;
                })
            });
            (BrokerProc::Embedded(task), addr)
        }
        Some(path) => {
            let (child, addr) = spawn_nats_server(path).await;
            (BrokerProc::NatsServer(child), addr)
        }
    }
}

async fn stop_broker(b: BrokerProc) {
    match b {
        BrokerProc::Embedded(t) => t.kill().await,
        BrokerProc::NatsServer(mut c) => {
            let _ = c.kill().await;
        }
    }
}

struct EdgeW {
    id: String,
    site: FakeSite,
    keystone: FaultProxy,
    broker: FaultProxy,
    db: String,
    task: Option<Running>,
}

struct World {
    dir: tempfile::TempDir,
    central_site: FakeSite,
    central_keystone: FaultProxy,
    central_broker: FaultProxy,
    broker: Option<BrokerProc>,
    nats_server: Option<std::path::PathBuf>,
    central: Option<Running>,
    proxy: String,
    admin: String,
    key: SyncKey,
    edges: Vec<EdgeW>,
    http: reqwest::Client,
    token: String,
}

impl World {
    async fn new(edges: &[&str], nats_server: Option<std::path::PathBuf>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let central_site = FakeSite::start("central-pw").await;
        let central_keystone = FaultProxy::start(central_site.addr).await;
        let (broker, broker_addr) = start_broker(nats_server.as_deref()).await;
        let central_broker = FaultProxy::start(broker_addr).await;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        // The client's token comes from the central Keystone itself.
        let token = admin_token(&http, &central_site.url(), "central-pw").await;
        let mut world = World {
            dir,
            central_site,
            central_keystone,
            central_broker,
            broker: Some(broker),
            nats_server,
            central: None,
            proxy: String::new(),
            admin: String::new(),
            key: SyncKey::Key(syncgate::settings::config::Secret::new(
                syncgate::protocol::crypto::generate_key(),
            )),
            edges: Vec::new(),
            http,
            token,
        };
        for id in edges {
            let site = FakeSite::start(&format!("{id}-pw")).await;
            let keystone = FaultProxy::start(site.addr).await;
            let broker = FaultProxy::start(broker_addr).await;
            let db = format!(
                "sqlite://{}",
                world.dir.path().join(format!("{id}.db")).display()
            );
            world.edges.push(EdgeW {
                id: id.to_string(),
                site,
                keystone,
                broker,
                db,
                task: None,
            });
        }
        world.start_central().await;
        for i in 0..world.edges.len() {
            world.start_edge(i).await;
        }
        world
    }

    async fn start_central(&mut self) {
        let db = format!("sqlite://{}", self.dir.path().join("central.db").display());
        let mut config = CentralConfig::for_upstream(
            parse_base_url(&self.central_keystone.url("http")).unwrap(),
            db,
        );
        config.upstream_timeout = Duration::from_secs(1);
        config.broker =
            BrokerMode::External(parse_nats_url(&self.central_broker.url("nats")).unwrap());
        config.sync.key = self.key.clone();
        config.sync.edges = self.edges.iter().map(|e| e.id.clone()).collect();
        config.sync.ack_timeout = Duration::from_secs(2);
        config.service_credentials = Some(admin_credentials(&self.central_site));
        let central = Central::build(config).await.unwrap();
        self.proxy = format!("http://{}", central.proxy_addr());
        self.admin = format!("http://{}", central.admin_addr());
        self.central = Some(Running::spawn(|rx| {
            central.run(async {
                let _ = rx.await;
            })
        }));
    }

    async fn start_edge(&mut self, i: usize) {
        let e = &self.edges[i];
        let config = EdgeConfig {
            id: e.id.clone(),
            broker: parse_nats_url(&e.broker.url("nats")).unwrap(),
            broker_auth: Default::default(),
            upstream: parse_base_url(&e.keystone.url("http")).unwrap(),
            credentials: admin_credentials(&e.site),
            db: e.db.clone(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: None,
            sync_prefix: "syncgate".into(),
            key: self.key.clone(),
            on_failure: OnFailure::Continue,
            hello_interval: Duration::from_millis(200),
            initial_sync: false,
            upstream_timeout: Duration::from_secs(1),
            upstream_settle: Duration::from_secs(2),
            http: Default::default(),
        };
        let edge = Edge::build(config).await.unwrap();
        self.edges[i].task = Some(Running::spawn(|rx| {
            edge.run(async {
                let _ = rx.await;
            })
        }));
    }

    async fn restart_broker(&mut self) {
        stop_broker(self.broker.take().unwrap()).await;
        let (broker, addr) = start_broker(self.nats_server.as_deref()).await;
        self.broker = Some(broker);
        self.central_broker.retarget(addr);
        self.central_broker.reset();
        for e in &self.edges {
            e.broker.retarget(addr);
            e.broker.reset();
        }
    }

    fn links(&self) -> Vec<&FaultProxy> {
        let mut links = vec![&self.central_keystone, &self.central_broker];
        for e in &self.edges {
            links.push(&e.keystone);
            links.push(&e.broker);
        }
        links
    }

    async fn audit(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn write(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.proxy))
            .header("x-auth-token", &self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        }
    }
}

/// What the client knows of central's entities.
#[derive(Default)]
struct Model {
    next: usize,
    /// (collection, kind, name, central id)
    entities: Vec<(&'static str, &'static str, String, String)>,
    grants: Vec<String>,
    members: Vec<String>,
    /// Names whose state at central the client cannot know (a write to them got
    /// no answer, or an error that is not Keystone's).
    tainted: HashSet<String>,
    successes: usize,
    /// Writes the client got no answer to (it may have been applied and logged).
    unanswered: usize,
}

const KINDS: [(&str, &str); 4] = [
    ("groups", "group"),
    ("projects", "project"),
    ("users", "user"),
    ("roles", "role"),
];

impl Model {
    fn pick(&self, rng: &mut Rng, kind: &str) -> Option<(String, String)> {
        let of: Vec<_> = self.entities.iter().filter(|e| e.1 == kind).collect();
        (!of.is_empty()).then(|| {
            let e = of[rng.below(of.len())];
            (e.2.clone(), e.3.clone())
        })
    }

    /// Records an answer: a 2xx counts, an answer that is not Keystone's taints.
    fn answered(&mut self, status: u16, names: &[&str]) -> bool {
        if (200..300).contains(&status) {
            self.successes += 1;
            return true;
        }
        if status == 0 {
            self.unanswered += 1;
        }
        if status == 0 || status >= 500 {
            self.tainted.extend(names.iter().map(|n| n.to_string()));
        }
        false
    }
}

async fn one_step(world: &World, model: &mut Model, rng: &mut Rng) {
    match rng.below(10) {
        0..=2 => {
            let (coll, kind) = KINDS[rng.below(KINDS.len())];
            model.next += 1;
            let name = format!("n{:04}x", model.next);
            let (status, body) = world
                .write(
                    "POST",
                    &format!("/v3/{coll}"),
                    Some(json!({ kind: {"name": name} })),
                )
                .await;
            if model.answered(status, &[&name]) {
                let id = body[kind]["id"].as_str().unwrap().to_string();
                model.entities.push((coll, kind, name, id));
            }
        }
        3 | 4 => {
            // A burst of concurrent updates to one entity.
            let (coll, kind) = KINDS[rng.below(KINDS.len())];
            let Some((name, id)) = model.pick(rng, kind) else {
                return;
            };
            let n = 1 + rng.below(8);
            let base = rng.next() % 1000;
            let path = format!("/v3/{coll}/{id}");
            let writes = (0..n).map(|i| {
                world.write(
                    "PATCH",
                    &path,
                    Some(json!({ kind: {"description": format!("d{base}-{i}")} })),
                )
            });
            for (status, _) in futures_util::future::join_all(writes).await {
                model.answered(status, &[&name]);
            }
        }
        5 | 6 => {
            let (Some((p, pid)), Some((u, uid)), Some((r, rid))) = (
                model.pick(rng, "project"),
                model.pick(rng, "user"),
                model.pick(rng, "role"),
            ) else {
                return;
            };
            let path = format!("/v3/projects/{pid}/users/{uid}/roles/{rid}");
            let delete = model.grants.contains(&path) && rng.chance(50);
            let (status, _) = world
                .write(if delete { "DELETE" } else { "PUT" }, &path, None)
                .await;
            if model.answered(status, &[&p, &u, &r]) {
                model.grants.retain(|g| *g != path);
                if !delete {
                    model.grants.push(path);
                }
            }
        }
        7 => {
            let (Some((g, gid)), Some((u, uid))) =
                (model.pick(rng, "group"), model.pick(rng, "user"))
            else {
                return;
            };
            let path = format!("/v3/groups/{gid}/users/{uid}");
            let delete = model.members.contains(&path) && rng.chance(50);
            let (status, _) = world
                .write(if delete { "DELETE" } else { "PUT" }, &path, None)
                .await;
            if model.answered(status, &[&g, &u]) {
                model.members.retain(|m| *m != path);
                if !delete {
                    model.members.push(path);
                }
            }
        }
        _ => {
            if model.entities.is_empty() {
                return;
            }
            let i = rng.below(model.entities.len());
            let (coll, _, name, id) = model.entities[i].clone();
            let (status, _) = world
                .write("DELETE", &format!("/v3/{coll}/{id}"), None)
                .await;
            model.answered(status, &[&name]);
            if status != 0 && status < 500 {
                model.entities.remove(i);
                model.grants.retain(|g| !g.contains(&id));
                model.members.retain(|m| !m.contains(&id));
            }
        }
    }
}

/// Brings one fault, or ends the ones in force.
async fn one_fault(world: &mut World, rng: &mut Rng) {
    let n_links = world.links().len();
    match rng.below(9) {
        0 | 1 => {
            let link = world.links()[rng.below(n_links)];
            link.set(match rng.below(4) {
                0 => Fault::Stall,
                1 => Fault::Slow(Duration::from_millis(20)),
                2 => Fault::DropFromClient,
                _ => Fault::Refuse,
            });
        }
        2 | 3 => world.links()[rng.below(n_links)].reset(),
        4 => {
            for link in world.links() {
                link.set(Fault::Pass);
            }
        }
        5 => {
            let i = rng.below(world.edges.len());
            if let Some(t) = world.edges[i].task.take() {
                t.kill().await;
            } else {
                world.start_edge(i).await;
            }
        }
        6 => {
            world.central.take().unwrap().stop().await;
            world.start_central().await;
        }
        7 => world.restart_broker().await,
        _ => {}
    }
}

/// Lines of a site's snapshot that name no tainted entity.
fn comparable(snapshot: BTreeSet<String>, tainted: &HashSet<String>) -> BTreeSet<String> {
    snapshot
        .into_iter()
        .filter(|line| !tainted.iter().any(|t| line.contains(t.as_str())))
        .collect()
}

async fn run(nats_server: Option<std::path::PathBuf>) {
    let seed: u64 = std::env::var("SYNCGATE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fault run seed: {seed} (replay with SYNCGATE_FAULT_SEED={seed})");
    let mut rng = Rng(seed);
    let mut world = World::new(&["edge-a", "edge-b"], nats_server).await;
    let mut model = Model::default();

    // The stream, bounded in steps and in time.
    let until = Instant::now() + Duration::from_secs(25);
    for step in 0..150 {
        if Instant::now() > until {
            eprintln!("stream ended by time after {step} steps");
            break;
        }
        if rng.chance(25) {
            one_fault(&mut world, &mut rng).await;
        }
        if step == 40 {
            world.restart_broker().await;
        }
        one_step(&world, &mut model, &mut rng).await;
    }

    // Heal everything.
    for link in world.links() {
        link.set(Fault::Pass);
    }
    for i in 0..world.edges.len() {
        if world.edges[i].task.is_none() {
            world.start_edge(i).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let last = loop {
        let ops = all_ops(&world).await;
        let last = ops.last().map_or(0, |o| o["seq"].as_i64().unwrap());
        let edges = world.audit("/v1/edges").await;
        let done = edges["edges"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["acked_through"].as_i64() == Some(last));
        if done && edges["edges"].as_array().unwrap().len() == world.edges.len() {
            break last;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: edges did not account for every op: {edges}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Seq has no gap and no op is duplicated; every 2xx is exactly one op.
    let ops = all_ops(&world).await;
    let seqs: Vec<i64> = ops.iter().map(|o| o["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "seed {seed}: seq gap");
    let ids: HashSet<&str> = ops.iter().map(|o| o["op_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), ops.len(), "seed {seed}: duplicated op");
    let committed = ops.iter().filter(|o| o["state"] == "committed").count();
    assert!(
        committed >= model.successes && committed <= model.successes + model.unanswered,
        "seed {seed}: {committed} committed ops for {} writes that got a 2xx ({} unanswered)",
        model.successes,
        model.unanswered
    );

    // Each edge ends equal to central by natural key, or says why not.
    let oos = world.audit("/v1/out-of-sync").await;
    let rows = oos["out_of_sync"].as_array().unwrap();
    for row in rows {
        assert!(
            row["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "seed {seed}: out of sync without a reason: {row}"
        );
    }
    let central = comparable(world.central_site.snapshot(), &model.tainted);
    for e in &world.edges {
        let edge = comparable(e.site.snapshot(), &model.tainted);
        if edge != central {
            let listed = rows.iter().any(|r| r["edge"] == e.id.as_str());
            let missing: Vec<_> = central.difference(&edge).collect();
            let extra: Vec<_> = edge.difference(&central).collect();
            assert!(
                listed,
                "seed {seed}: {} differs from central and nothing is listed out of sync\n\
                 missing {missing:#?}\nextra {extra:#?}",
                e.id
            );
        }
    }
    eprintln!(
        "fault run seed {seed}: {} ops, {} successes, {} tainted names, {} out of sync",
        last,
        model.successes,
        model.tainted.len(),
        rows.len()
    );

    for e in &mut world.edges {
        if let Some(t) = e.task.take() {
            t.stop().await;
        }
    }
    world.central.take().unwrap().stop().await;
    stop_broker(world.broker.take().unwrap()).await;
}

async fn all_ops(world: &World) -> Vec<Value> {
    let mut ops = Vec::new();
    let mut after = 0;
    loop {
        let page = world
            .audit(&format!("/v1/ops?after={after}&limit=1000"))
            .await;
        ops.extend(page["ops"].as_array().unwrap().iter().cloned());
        match page["next"].as_i64() {
            Some(next) => after = next,
            None => return ops,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomised_faults_every_acknowledged_write_reaches_every_edge_once() {
    run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomised_faults_through_a_real_nats_server_restarted_mid_stream() {
    let Some(path) = nats_server_path() else {
        return;
    };
    run(Some(path)).await;
}
