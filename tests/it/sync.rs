//! Central and edges in process, each site a stateful fake identity API with IDs
//! of its own: ops are replayed in order, IDs mapped, outcomes audited.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use syncgate::broker::BrokerAuth;
use syncgate::edge::Edge;
use syncgate::keystone::client::{Credentials, DomainSel};
use syncgate::protocol::BrokerClientTls;
use syncgate::settings::config::{
    parse_base_url, BrokerMode, EdgeConfig, OnFailure, Secret, SyncKey,
};
use syncgate::{Central, CentralConfig};
use tokio::sync::oneshot;

use crate::fake_site::FakeSite;

pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn spawn<F>(f: impl FnOnce(oneshot::Receiver<()>) -> F) -> Running
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        Running {
            stop: Some(tx),
            task: tokio::spawn(f(rx)),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }

    /// If it has ended on its own (a process that exited), how.
    pub async fn exited(&mut self) -> Option<String> {
        if !self.task.is_finished() {
            return None;
        }
        Some(match (&mut self.task).await {
            Ok(Ok(())) => "ended".into(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => e.to_string(),
        })
    }

    /// Stops it, whatever it ends with (a process that exits with an error,
    /// as one whose disk is full may), within a minute.
    pub async fn stop_whatever(mut self) {
        let _ = self.stop.take().unwrap().send(());
        if tokio::time::timeout(Duration::from_secs(60), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }

    /// As `kill -9`: the task is dropped wherever it is.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A token for the admin of a (fake) site, asked at `url`.
pub async fn admin_token(http: &reqwest::Client, url: &str, password: &str) -> String {
    http.post(format!("{url}/v3/auth/tokens"))
        .json(
            &json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": "admin", "domain": {"name": "Default"}, "password": password}}}}}),
        )
        .send()
        .await
        .unwrap()
        .headers()["x-subject-token"]
        .to_str()
        .unwrap()
        .to_string()
}

/// A broker client listening to everything under `syncgate.`.
pub async fn sniffer(broker_url: &str) -> (async_nats::Client, async_nats::Subscriber) {
    let nats = async_nats::connect(broker_url).await.unwrap();
    let sniff = nats.subscribe("syncgate.>").await.unwrap();
    nats.flush().await.unwrap();
    (nats, sniff)
}

/// What a subscriber to `syncgate.>` received until a marker it publishes.
pub async fn sniffed_until_marker(
    nats: &async_nats::Client,
    sniff: &mut async_nats::Subscriber,
) -> Vec<async_nats::Message> {
    nats.publish("syncgate.marker", "end".into()).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(sniff),
        )
        .await
        .unwrap()
        .unwrap();
        if msg.subject.as_str() == "syncgate.marker" {
            return seen;
        }
        seen.push(msg);
    }
}

pub fn admin_credentials(site: &FakeSite) -> Credentials {
    Credentials::Password {
        username: "admin".into(),
        password: Secret::new(site.admin_password.clone()),
        user_domain: DomainSel::Name("Default".into()),
        project: Some(("admin".into(), DomainSel::Id("default".into()))),
    }
}

pub struct EdgeSite {
    pub id: String,
    pub site: FakeSite,
    /// The broker URL this edge uses (central's, or a fault proxy in front of it).
    pub broker: String,
    db: String,
    key: SyncKey,
    pub admin: String,
    running: Option<Running>,
    /// How the edge trusts the broker and proves who it is.
    pub broker_tls: BrokerClientTls,
}

pub struct SyncEnv {
    pub central_site: FakeSite,
    pub proxy: String,
    pub admin: String,
    pub broker_url: String,
    pub key: SyncKey,
    pub edges: Vec<EdgeSite>,
    pub http: reqwest::Client,
    /// Edges started from now on ask for an initial sync (`--initial-sync`).
    pub initial_sync: bool,
    /// Edges started from now on wait this long for their site's Keystone,
    /// and this long for a write that got no answer to land.
    pub edge_timeouts: (Duration, Duration),
    /// Edges started from now on say hello this often (their grant lasts
    /// three of these, at least a second).
    pub hello_interval: Duration,
    /// Edges started from now on try an op their site answers 500 this many
    /// times (`--max-attempts`).
    pub max_attempts: u32,
    token: String,
    central: Option<Running>,
    /// Central's op log (kept across restarts).
    pub central_db: String,
    /// Edges added from now on trust the broker and prove who they are so.
    pub edge_broker_tls: BrokerClientTls,
    dir: tempfile::TempDir,
}

/// A free loopback port outside the system's ephemeral range (32768 and
/// up), which only tests that pick one this way bind: different in each test
/// process, checked free when picked.
pub fn lasting_port() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Each test process starts at its own random place in the range.
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let _ = NEXT.compare_exchange(
        0,
        10_000 + (start % 22_000) as u16,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 10_000 + (port - 10_000) % 22_000;
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

/// Where central's broker is: its own (embedded) or this external URL.
pub async fn sync_env(
    edges: &[&str],
    external_broker: Option<String>,
    tweak: impl FnOnce(&mut CentralConfig),
) -> SyncEnv {
    let dir = tempfile::tempdir().unwrap();
    let central_site = FakeSite::start("central-admin-pw").await;
    let db = crate::helpers::central_db(dir.path()).await;
    let mut config =
        CentralConfig::for_upstream(parse_base_url(&central_site.url()).unwrap(), db.clone());
    config.service_credentials = Some(admin_credentials(&central_site));
    // Writes the tests leave in doubt are concluded quickly.
    config.upstream_settle = Duration::from_secs(1);
    config.sync.edges = edges.iter().map(|e| e.to_string()).collect();
    if let Some(url) = &external_broker {
        config.broker =
            BrokerMode::External(syncgate::settings::config::parse_nats_urls(url).unwrap());
    }
    // Central's ports lie below the ephemeral range: a restart finds them
    // free (a port picked by the system could be taken meanwhile by another
    // listener or an outgoing connection).
    tweak(&mut config);
    // The op log the test chose, if it chose one.
    let db = config.db.clone();
    let key = config.sync.key.clone();
    // Picked free, but another test process may bind one first: others then.
    let mut tries = 0;
    let central = loop {
        config.listen = lasting_port();
        config.admin_listen = lasting_port();
        if let BrokerMode::Embedded(b) = &mut config.broker {
            b.listen = lasting_port();
        }
        match Central::build(config.clone()).await {
            Ok(c) => break c,
            Err(e) if tries < 20 && format!("{e:#}").contains("in use") => tries += 1,
            Err(e) => panic!("central did not start: {e:#}"),
        }
    };
    let proxy = format!("http://{}", central.proxy_addr());
    let admin = format!("http://{}", central.admin_addr());
    let broker_url =
        external_broker.unwrap_or_else(|| format!("nats://{}", central.broker_addr().unwrap()));
    let running = Running::spawn(|rx| {
        central.run(async {
            let _ = rx.await;
        })
    });
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let token = admin_token(&http, &proxy, "central-admin-pw").await;
    let mut env = SyncEnv {
        central_site,
        proxy,
        admin,
        broker_url,
        key,
        edges: Vec::new(),
        http,
        initial_sync: false,
        edge_timeouts: (Duration::from_secs(10), Duration::from_secs(2)),
        hello_interval: Duration::from_millis(200),
        max_attempts: 10,
        token,
        central: Some(running),
        central_db: db,
        edge_broker_tls: Default::default(),
        dir,
    };
    for id in edges {
        env.add_edge(id, None).await;
    }
    env
}

impl SyncEnv {
    /// Starts one more edge with a fresh site; `broker` overrides central's URL.
    pub async fn add_edge(&mut self, id: &str, broker: Option<String>) {
        let key = self.key.clone();
        self.add_edge_with_key(id, broker, key).await;
    }

    /// `add_edge`, the edge holding `key` (an edge key, for one with a scope).
    pub async fn add_edge_with_key(&mut self, id: &str, broker: Option<String>, key: SyncKey) {
        let site = FakeSite::start(&format!("{id}-admin-pw")).await;
        let db = format!(
            "sqlite://{}",
            self.dir.path().join(format!("{id}.db")).display()
        );
        let mut edge = EdgeSite {
            id: id.to_string(),
            site,
            broker: broker.unwrap_or_else(|| self.broker_url.clone()),
            db,
            key,
            admin: String::new(),
            running: None,
            broker_tls: self.edge_broker_tls.clone(),
        };
        self.start_edge(&mut edge, OnFailure::Continue).await;
        self.edges.push(edge);
    }

    /// The configuration edge `id` would start with, on a fresh site (kept
    /// up while the returned site lives); the edge is not started.
    pub async fn edge_config_for(&self, id: &str) -> (EdgeConfig, FakeSite) {
        let site = FakeSite::start(&format!("{id}-admin-pw")).await;
        let edge = EdgeSite {
            id: id.to_string(),
            broker: self.broker_url.clone(),
            db: format!(
                "sqlite://{}",
                self.dir.path().join(format!("{id}.db")).display()
            ),
            key: self.key.clone(),
            admin: String::new(),
            running: None,
            broker_tls: self.edge_broker_tls.clone(),
            site,
        };
        let config = self.edge_config(&edge, OnFailure::Continue);
        (config, edge.site)
    }

    /// The client token writes through the gateway carry.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Kills an edge as `kill -9` would: its task is dropped wherever it is.
    pub async fn kill_edge(&mut self, i: usize) {
        self.edges[i].running.take().unwrap().kill().await;
    }

    /// The delivery state of one op at one edge, from the audit API.
    pub async fn delivery(&self, seq: i64, edge: &str) -> String {
        let op = self.audit(&format!("/v1/ops/{seq}")).await;
        op["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["edge"] == edge)
            .and_then(|d| d["state"].as_str())
            .unwrap_or("none")
            .to_string()
    }

    pub fn edge_config(&self, edge: &EdgeSite, on_failure: OnFailure) -> EdgeConfig {
        EdgeConfig {
            id: edge.id.clone(),
            broker: syncgate::settings::config::parse_nats_urls(&edge.broker).unwrap(),
            broker_auth: BrokerAuth::None,
            upstream: parse_base_url(&edge.site.url()).unwrap(),
            upstream_ca: None,
            tls: None,
            broker_tls: edge.broker_tls.clone(),
            credentials: admin_credentials(&edge.site),
            db: edge.db.clone(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            admin_token: None,
            sync_prefix: "syncgate".into(),
            key: edge.key.clone(),
            on_failure,
            max_attempts: self.max_attempts,
            hello_interval: self.hello_interval,
            initial_sync: self.initial_sync,
            upstream_timeout: self.edge_timeouts.0,
            upstream_settle: self.edge_timeouts.1,
            http: Default::default(),
        }
    }

    async fn start_edge(&self, edge: &mut EdgeSite, on_failure: OnFailure) {
        let built = Edge::build(self.edge_config(edge, on_failure))
            .await
            .unwrap();
        edge.admin = format!("http://{}", built.admin_addr());
        edge.running = Some(Running::spawn(|rx| {
            built.run(async {
                let _ = rx.await;
            })
        }));
    }

    pub async fn stop_edge(&mut self, i: usize) {
        let running = self.edges[i].running.take().unwrap();
        running.stop().await;
    }

    pub async fn restart_edge(&mut self, i: usize) {
        self.restart_edge_with(i, OnFailure::Continue).await;
    }

    pub async fn restart_edge_with(&mut self, i: usize, on_failure: OnFailure) {
        let mut edge = std::mem::replace(
            &mut self.edges[i],
            EdgeSite {
                id: String::new(),
                site: FakeSite::start("x").await,
                broker: String::new(),
                db: String::new(),
                key: SyncKey::Plaintext,
                admin: String::new(),
                running: None,
                broker_tls: Default::default(),
            },
        );
        self.start_edge(&mut edge, on_failure).await;
        self.edges[i] = edge;
    }

    /// Stops an edge (if it runs) and deletes its database (a lost volume),
    /// then starts it again with an empty one.
    pub async fn restart_edge_with_its_database_lost(&mut self, i: usize) {
        if self.edges[i].running.is_some() {
            self.stop_edge(i).await;
        }
        let path = self.edges[i].db.trim_start_matches("sqlite://").to_string();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
        self.restart_edge(i).await;
    }

    /// A second process with edge `i`'s ID, in front of the same site, with
    /// a database of its own (as a misconfigured deployment would run it).
    /// Returns it and its admin URL.
    pub async fn start_twin(&self, i: usize) -> (Running, String) {
        let edge = &self.edges[i];
        let mut config = self.edge_config(edge, OnFailure::Continue);
        config.db = format!(
            "sqlite://{}",
            self.dir
                .path()
                .join(format!("{}-twin.db", edge.id))
                .display()
        );
        let built = Edge::build(config).await.unwrap();
        let admin = format!("http://{}", built.admin_addr());
        let running = Running::spawn(|rx| {
            built.run(async {
                let _ = rx.await;
            })
        });
        (running, admin)
    }

    /// Kills central as `kill -9` would (its task dropped wherever it is) and
    /// starts it again on the same op log.
    pub async fn kill_central_and_restart(&mut self) {
        self.central.take().unwrap().kill().await;
        self.start_central_again(|_| {}).await;
    }

    /// Kills central as `kill -9` would, and leaves it dead (another replica
    /// on a PostgreSQL op log goes on).
    pub async fn kill_central(&mut self) {
        self.central.take().unwrap().kill().await;
    }

    /// Stops central and starts it again on the same op log.
    pub async fn restart_central(&mut self, tweak: impl FnOnce(&mut CentralConfig)) {
        self.central.take().unwrap().stop().await;
        self.start_central_again(tweak).await;
    }

    /// Starts central again on the same op log after `kill_central`.
    pub async fn start_central_again(&mut self, tweak: impl FnOnce(&mut CentralConfig)) {
        let db = self.central_db.clone();
        let mut config =
            CentralConfig::for_upstream(parse_base_url(&self.central_site.url()).unwrap(), db);
        config.service_credentials = Some(admin_credentials(&self.central_site));
        config.sync.edges = self.edges.iter().map(|e| e.id.clone()).collect();
        config.sync.key = self.key.clone();
        config.upstream_settle = Duration::from_secs(1);
        let addr: std::net::SocketAddr = self
            .broker_url
            .trim_start_matches("nats://")
            .parse()
            .unwrap();
        match &mut config.broker {
            BrokerMode::Embedded(b) => b.listen = addr,
            BrokerMode::External(_) => {}
        }
        let proxy: std::net::SocketAddr = self.proxy.trim_start_matches("http://").parse().unwrap();
        let admin: std::net::SocketAddr = self.admin.trim_start_matches("http://").parse().unwrap();
        config.listen = proxy;
        config.admin_listen = admin;
        tweak(&mut config);
        // The ports it had are free again unless something else took one
        // meanwhile (an outgoing connection's ephemeral port): until it is
        // given back.
        let mut tries = 0;
        let central = loop {
            match Central::build(config.clone()).await {
                Ok(c) => break c,
                Err(e) if tries < 100 && format!("{e:#}").contains("in use") => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("central did not start again: {e:#}"),
            }
        };
        // Connections kept alive to the process that ended are not reused.
        self.http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        self.central = Some(Running::spawn(|rx| {
            central.run(async {
                let _ = rx.await;
            })
        }));
    }

    pub async fn shutdown(mut self) {
        for e in &mut self.edges {
            if let Some(r) = e.running.take() {
                r.stop().await;
            }
        }
        if let Some(c) = self.central.take() {
            c.stop().await;
        }
    }

    /// A write through the gateway with the admin's token; returns status and body.
    pub async fn write(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.proxy))
            .header("x-auth-token", &self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A write through the gateway sent in the background, its answer
    /// ignored (one that may never come).
    pub fn in_flight(&self, method: &str, path: &str, body: Value) -> tokio::task::JoinHandle<()> {
        let req = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.proxy))
            .header("x-auth-token", &self.token)
            .json(&body);
        tokio::spawn(async move {
            let _ = req.send().await;
        })
    }

    pub async fn create(&self, path: &str, kind: &str, body: Value) -> String {
        let (status, resp) = self.write("POST", path, Some(body)).await;
        assert_eq!(status, 201, "{path}: {resp}");
        resp[kind]["id"].as_str().unwrap().to_string()
    }

    pub async fn audit(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn last_seq(&self) -> i64 {
        let ops = self.audit("/v1/ops?limit=1000").await;
        ops["ops"]
            .as_array()
            .unwrap()
            .last()
            .map_or(0, |o| o["seq"].as_i64().unwrap())
    }

    /// Waits until `check` holds (polling the audit API), or fails after 20 s.
    /// Central's `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until central's `/metrics` has every one of these texts (a
    /// scrape reads its sync gauges from the op log, at most once a second).
    pub async fn until_metrics(&self, what: &str, texts: &[&str]) {
        self.until(what, || async {
            let m = self.metrics().await;
            texts.iter().all(|t| m.contains(t))
        })
        .await;
    }

    pub async fn until<F, Fut>(&self, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check().await {
            if Instant::now() >= deadline {
                let ops = self.audit("/v1/ops").await;
                let edges = self.audit("/v1/edges").await;
                let first = self.audit("/v1/ops/1").await;
                let oos = self.audit("/v1/out-of-sync").await;
                panic!("timed out waiting for: {what}\nops: {ops}\nedges: {edges}\nop 1: {first}\nout of sync: {oos}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the given edges acknowledged every op with one of `states`.
    pub async fn until_delivered(&self, edges: &[&str], states: &[&str]) {
        let last = self.last_seq().await;
        self.until("every op delivered", || async {
            for seq in 1..=last {
                let op = self.audit(&format!("/v1/ops/{seq}")).await;
                for edge in edges {
                    let state = op["deliveries"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|d| d["edge"] == *edge)
                        .map(|d| d["state"].as_str().unwrap_or_default().to_string());
                    if !state.is_some_and(|s| states.contains(&s.as_str())) {
                        return false;
                    }
                }
            }
            true
        })
        .await;
    }

    /// Waits until every edge's hellos say its cursor is the last op (acks
    /// say what was applied at once; the cursor is what the edge's next
    /// hello says), then asserts each row of `/v1/edges` says so: every edge
    /// listed, acknowledged through the last op, no lag, online.
    pub async fn assert_every_edge_at_the_last_op(&self) {
        let last = self.last_seq().await;
        self.until("each edge says its cursor is the last op", || async {
            let edges = self.audit("/v1/edges").await;
            edges["edges"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["cursor"] == last)
        })
        .await;
        let edges = self.audit("/v1/edges").await;
        let rows = edges["edges"].as_array().unwrap();
        assert_eq!(rows.len(), self.edges.len(), "every edge listed");
        for e in rows {
            assert_eq!(e["acked_through"], last, "{e}");
            assert_eq!(e["lag_ops"], 0, "{e}");
            assert_eq!(e["online"], true, "{e}");
        }
    }

    pub async fn assert_in_sync(&self) {
        self.assert_in_sync_with(&["applied", "adopted"]).await;
    }

    /// `assert_in_sync`, every op delivered in one of `states` (`skipped`
    /// too where a write may have been cut before it reached Keystone: an
    /// unknown outcome found not applied).
    pub async fn assert_in_sync_with(&self, states: &[&str]) {
        let names: Vec<&str> = self.edges.iter().map(|e| e.id.as_str()).collect();
        self.until_delivered(&names, states).await;
        let central = self.central_site.snapshot();
        for e in &self.edges {
            let edge = e.site.snapshot();
            let missing: Vec<_> = central.difference(&edge).collect();
            let extra: Vec<_> = edge.difference(&central).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{}: missing {missing:#?}\nextra {extra:#?}",
                e.id
            );
        }
        let oos = self.audit("/v1/out-of-sync").await;
        assert_eq!(oos["out_of_sync"], json!([]), "nothing out of sync");
    }
}

/// An edge's `/v1/status`.
pub async fn edge_status(admin: &str) -> Value {
    reqwest::get(format!("{admin}/v1/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Whether a user can get a token at a site with a password.
async fn can_log_in(site: &FakeSite, user: &str, domain: &str, password: &str) -> bool {
    reqwest::Client::new()
        .post(format!("{}/v3/auth/tokens", site.url()))
        .json(
            &json!({"auth": {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": domain}, "password": password}}}}}),
        )
        .send()
        .await
        .unwrap()
        .status()
        == 201
}

/// The full scenario: every kind of write, then deletes in reverse.
pub async fn full_scenario(env: &SyncEnv) {
    let d = env
        .create(
            "/v3/domains",
            "domain",
            json!({"domain": {"name": "acme", "id": "ignored"}}),
        )
        .await;
    let p = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "web", "domain_id": d, "description": "site"}}),
        )
        .await;
    let u = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "alice", "domain_id": d, "password": "first-pw", "email": "a@acme", "default_project_id": p}}),
        )
        .await;
    let g = env
        .create(
            "/v3/groups",
            "group",
            json!({"group": {"name": "ops", "domain_id": d}}),
        )
        .await;
    assert_eq!(
        env.write("PUT", &format!("/v3/groups/{g}/users/{u}"), None)
            .await
            .0,
        204
    );
    let r = env
        .create("/v3/roles", "role", json!({"role": {"name": "operator"}}))
        .await;
    // Pre-existing roles and project: different IDs at each site, found by name.
    let member = env.central_site.id_of("role", "member").unwrap();
    let reader = env.central_site.id_of("role", "reader").unwrap();
    let admin_project = env.central_site.id_of("project", "admin").unwrap();
    assert_eq!(
        env.write("PUT", &format!("/v3/roles/{r}/implies/{reader}"), None)
            .await
            .0,
        201
    );
    for path in [
        format!("/v3/projects/{p}/users/{u}/roles/{r}"),
        format!("/v3/projects/{admin_project}/users/{u}/roles/{member}"),
        format!("/v3/domains/{d}/groups/{g}/roles/{member}"),
        format!("/v3/OS-INHERIT/domains/{d}/groups/{g}/roles/{r}/inherited_to_projects"),
    ] {
        assert_eq!(env.write("PUT", &path, None).await.0, 204, "{path}");
    }
    let (status, _) = env
        .write(
            "PATCH",
            &format!("/v3/users/{u}"),
            Some(json!({"user": {"description": "on call", "enabled": true}})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = env
        .write(
            "POST",
            &format!("/v3/users/{u}/password"),
            Some(json!({"user": {"password": "second-pw", "original_password": "first-pw"}})),
        )
        .await;
    assert_eq!(status, 204);
    env.assert_in_sync().await;
    for e in &env.edges {
        assert!(
            can_log_in(&e.site, "alice", "acme", "second-pw").await,
            "{}: new password works",
            e.id
        );
        assert!(
            !can_log_in(&e.site, "alice", "acme", "first-pw").await,
            "{}: old password does not",
            e.id
        );
        // Every site has its own IDs; only the domain keeps central's.
        assert_eq!(e.site.id_of("domain", "acme").unwrap(), d);
        assert_ne!(e.site.id_of("user", "alice").unwrap(), u);
        let status = edge_status(&e.admin).await;
        assert!(status["id_map_size"].as_i64().unwrap() >= 7, "{status}");
    }

    // Deletes, in reverse.
    for path in [
        format!("/v3/OS-INHERIT/domains/{d}/groups/{g}/roles/{r}/inherited_to_projects"),
        format!("/v3/domains/{d}/groups/{g}/roles/{member}"),
        format!("/v3/projects/{admin_project}/users/{u}/roles/{member}"),
        format!("/v3/projects/{p}/users/{u}/roles/{r}"),
        format!("/v3/roles/{r}/implies/{reader}"),
        format!("/v3/roles/{r}"),
        format!("/v3/groups/{g}/users/{u}"),
        format!("/v3/groups/{g}"),
        format!("/v3/users/{u}"),
        format!("/v3/projects/{p}"),
    ] {
        assert_eq!(env.write("DELETE", &path, None).await.0, 204, "{path}");
    }
    env.assert_in_sync().await;
}

#[tokio::test]
async fn two_edges_end_equivalent_to_central() {
    let env = sync_env(&["edge-a", "edge-b"], None, |_| {}).await;
    full_scenario(&env).await;
    env.assert_every_edge_at_the_last_op().await;
    env.shutdown().await;
}

#[tokio::test]
async fn a_restarted_edge_catches_up_and_duplicates_are_harmless() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "before"}}),
    )
    .await;
    env.assert_in_sync().await;
    env.stop_edge(0).await;
    for i in 0..5 {
        env.create(
            "/v3/projects",
            "project",
            json!({"project": {"name": format!("while-down-{i}")}}),
        )
        .await;
    }
    env.restart_edge(0).await;
    env.assert_in_sync().await;
    assert_eq!(env.edges[0].site.creates(), 6, "each create applied once");

    // The same op delivered again is acknowledged, not applied again.
    let nats = async_nats::connect(&env.broker_url).await.unwrap();
    let op = env.audit("/v1/ops/1").await;
    let sealer = env.key.sealer().unwrap();
    let row = syncgate::store::OpRow {
        seq: 1,
        op_id: op["op_id"].as_str().unwrap().into(),
        state: "committed".into(),
        method: "POST".into(),
        path: "/v3/projects".into(),
        class: "resource".into(),
        kind: "project".into(),
        created_ids: serde_json::to_string(&op["created_ids"]).unwrap(),
        body: Some(json!({"project": {"name": "before"}}).to_string()),
        upstream_status: Some(201),
        request_id: None,
        detail: None,
        refs: "[]".into(),
        created_at: String::new(),
        logged_at: String::new(),
        traceparent: None,
        resolution: None,
    };
    // Counted as requests: a second create would be answered 409 and adopted,
    // so counting what the site made could not tell.
    let requests = env.edges[0].site.create_requests("projects");
    let env_msg = syncgate::central::sync::envelope(&sealer, &row);
    nats.publish("syncgate.ops", serde_json::to_vec(&env_msg).unwrap().into())
        .await
        .unwrap();
    nats.flush().await.unwrap();
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "after"}}),
    )
    .await;
    env.assert_in_sync().await;
    assert_eq!(
        env.edges[0].site.create_requests("projects"),
        requests + 1,
        "only the new project was sent; op 1 was acknowledged again"
    );
    env.shutdown().await;
}

#[tokio::test]
async fn transient_failures_are_retried_and_permanent_ones_can_be_re_driven() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    env.edges[0].site.fail_next(&[500, 503, 429]);
    env.create("/v3/groups", "group", json!({"group": {"name": "retried"}}))
        .await;
    env.assert_in_sync().await;

    // The edge's cached token stops working: it authenticates again, once.
    env.edges[0].site.revoke_tokens();
    env.create(
        "/v3/groups",
        "group",
        json!({"group": {"name": "after-revocation"}}),
    )
    .await;
    env.assert_in_sync().await;

    env.edges[0].site.fail_next(&[404]);
    env.create(
        "/v3/groups",
        "group",
        json!({"group": {"name": "lost-once"}}),
    )
    .await;
    let seq = env.last_seq().await;
    env.until_delivered(&["edge-a"], &["applied", "failed"])
        .await;
    let oos = env.audit("/v1/out-of-sync?edge=edge-a").await;
    let rows = oos["out_of_sync"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{oos}");
    assert_eq!(rows[0]["seq"], seq);
    assert_eq!(rows[0]["state"], "failed");
    assert_eq!(rows[0]["status"], 404);
    assert!(rows[0]["detail"]
        .as_str()
        .unwrap()
        .contains("injected failure"));

    // The cause is gone; re-drive the op at that edge.
    let resp = env
        .http
        .post(format!("{}/v1/ops/{seq}/retry?edge=edge-a", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    env.assert_in_sync().await;
    let bad = env
        .http
        .post(format!("{}/v1/ops/{seq}/retry", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let unknown = env
        .http
        .post(format!("{}/v1/ops/{seq}/retry?edge=nope", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    env.shutdown().await;
}

#[tokio::test]
async fn an_edge_that_never_acks_is_timed_out() {
    // "ghost" is declared but never runs.
    let env = sync_env(&["edge-a"], None, |c| {
        c.sync.ack_timeout = Duration::from_millis(300);
        c.sync.edges.push("ghost".into());
    })
    .await;
    env.create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    env.until_delivered(&["edge-a"], &["applied"]).await;
    env.until_delivered(&["ghost"], &["timed_out"]).await;
    let oos = env.audit("/v1/out-of-sync?edge=ghost").await;
    assert_eq!(oos["out_of_sync"][0]["state"], "timed_out");
    // The gauges are read from the op log by the scrape (at most once a second).
    env.until_metrics(
        "the metrics show the timed-out delivery",
        &[
            "syncgate_deliveries_timed_out 1",
            "syncgate_edge_out_of_sync{edge=\"ghost\"} 1",
            "syncgate_edge_out_of_sync{edge=\"edge-a\"} 0",
            "syncgate_edge_acked_seq{edge=\"edge-a\"} 1",
            "syncgate_acks_total{edge=\"edge-a\",outcome=\"applied\"} ",
            "syncgate_ops_published_total 1",
        ],
    )
    .await;
    assert!(oos["out_of_sync"][0]["detail"]
        .as_str()
        .unwrap()
        .contains("no ack"));
    let edges = env.audit("/v1/edges").await;
    let ghost = edges["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "ghost")
        .unwrap()
        .clone();
    assert_eq!(ghost["online"], false);
    assert_eq!(ghost["lag_ops"], 1);
    env.shutdown().await;
}

#[tokio::test]
async fn an_edge_with_the_wrong_key_applies_nothing_and_says_why() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    env.stop_edge(0).await;
    env.edges[0].key = SyncKey::Key(Secret::new(syncgate::protocol::crypto::generate_key()));
    env.restart_edge(0).await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "secret-project"}}),
    )
    .await;
    let admin = env.edges[0].admin.clone();
    env.until("the edge reports the key problem", || async {
        let s = edge_status(&admin).await;
        s["error"].as_str().is_some_and(|e| e.contains("sync key"))
    })
    .await;
    assert_eq!(env.edges[0].site.creates(), 0, "nothing applied");
    // The edge may report before central has recorded the op as published.
    env.until("the op is published", || async {
        env.audit("/v1/ops/1").await["deliveries"][0].is_object()
    })
    .await;
    let op = env.audit("/v1/ops/1").await;
    assert_eq!(
        op["deliveries"][0]["state"], "pending",
        "nothing acknowledged: {op}"
    );
    let ready = reqwest::get(format!("{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    env.until("central shows the edge's error", || async {
        let edges = env.audit("/v1/edges").await;
        edges["edges"][0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("sync key"))
    })
    .await;
    env.shutdown().await;
}

/// Starts a real nats-server on a free loopback port; returns it and its address.
pub async fn spawn_nats_server(
    path: &std::path::Path,
) -> (tokio::process::Child, std::net::SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(path)
        .args(["-a", "127.0.0.1", "-p", "-1"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut addr = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(a) = line.split("Listening for client connections on ").nth(1) {
            addr = Some(a.trim().parse().unwrap());
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr.expect("nats-server listening"))
}

/// A real nats-server from the test venv, when there is one.
pub fn nats_server_path() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("NATS_SERVER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server")
        });
    if path.exists() {
        return Some(path);
    }
    assert!(
        std::env::var_os("SYNCGATE_REQUIRE_NATS_SERVER").is_none(),
        "nats-server not found at {} (scripts/test.sh installs it into .venv)",
        path.display()
    );
    eprintln!(
        "skipping: no nats-server at {} (run scripts/test.sh)",
        path.display()
    );
    None
}

#[tokio::test]
async fn the_core_scenario_through_a_real_nats_server() {
    let Some(path) = nats_server_path() else {
        return;
    };
    let (mut child, addr) = spawn_nats_server(&path).await;
    let url = format!("nats://{addr}");
    let env = sync_env(&["edge-a", "edge-b"], Some(url), |_| {}).await;
    full_scenario(&env).await;
    env.shutdown().await;
    let _ = child.kill().await;
}

#[tokio::test]
async fn halt_mode_stops_at_a_failed_op_until_it_is_retried() {
    let mut env = sync_env(&["edge-a"], None, |_| {}).await;
    env.stop_edge(0).await;
    env.restart_edge_with(0, OnFailure::Halt).await;
    env.edges[0].site.fail_next(&[404]);
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "first"}}),
    )
    .await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "second"}}),
    )
    .await;
    let admin = env.edges[0].admin.clone();
    env.until("the edge halts", || async {
        let s = edge_status(&admin).await;
        s["halted"] == true
    })
    .await;
    let status = edge_status(&admin).await;
    assert_eq!(status["cursor"], 0, "{status}");
    assert_eq!(
        env.edges[0].site.creates(),
        0,
        "nothing after the failed op was applied"
    );
    let resp = env
        .http
        .post(format!("{}/v1/ops/1/retry?edge=edge-a", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    env.assert_in_sync().await;
    assert_eq!(env.edges[0].site.creates(), 2);
    env.shutdown().await;
}

#[tokio::test]
async fn passwords_never_cross_the_broker_in_clear() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    let (nats, mut sniff) = sniffer(&env.broker_url).await;
    let secret = "wire-secret-pw-8812";
    let u = env
        .create(
            "/v3/users",
            "user",
            json!({"user": {"name": "bob", "password": secret}}),
        )
        .await;
    env.write(
        "PATCH",
        &format!("/v3/users/{u}"),
        Some(json!({"user": {"password": format!("{secret}-2")}})),
    )
    .await;
    env.assert_in_sync().await;
    assert!(can_log_in(&env.edges[0].site, "bob", "Default", &format!("{secret}-2")).await);
    let seen = sniffed_until_marker(&nats, &mut sniff).await;
    assert!(
        seen.iter().any(|m| m.subject.as_str() == "syncgate.ops"),
        "ops were seen on the wire"
    );
    for m in &seen {
        let text = String::from_utf8_lossy(&m.payload);
        assert!(
            !text.contains(secret),
            "{} carries the password in clear",
            m.subject
        );
        assert!(
            !text.contains("password"),
            "{} names a password field in clear",
            m.subject
        );
    }
    env.shutdown().await;
}

#[tokio::test]
async fn metrics_follow_a_write_from_the_proxy_to_the_edges_ack() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    env.create(
        "/v3/users",
        "user",
        json!({"user": {"name": "u", "password": "metric-secret-41"}}),
    )
    .await;
    env.until_delivered(&["edge-a"], &["applied"]).await;
    let edge_metrics = env
        .http
        .get(format!("{}/metrics", env.edges[0].admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "syncgate_edge_apply_duration_seconds_count{outcome=\"applied\"} 1",
        "syncgate_edge_cursor 1",
        "syncgate_edge_id_map_size 1",
        "syncgate_edge_retries_total 0",
        "syncgate_edge_broker_connected 1",
    ] {
        assert!(
            edge_metrics.contains(line),
            "{line} missing from\n{edge_metrics}"
        );
    }
    env.until_metrics(
        "central's metrics show the write and its ack",
        &[
            "syncgate_proxy_requests_total{method=\"POST\",route=\"identity\",status=\"201\"} 1",
            "syncgate_proxy_request_duration_seconds_count{method=\"POST\",route=\"identity\"} 1",
            "syncgate_ops_captured_total 1",
            "syncgate_capture_duration_seconds_count 1",
            "syncgate_oplog_last_seq 1",
            "syncgate_edge_cursor{edge=\"edge-a\"} 1",
            "syncgate_edge_lag_ops{edge=\"edge-a\"} 0",
            // An ack may come again (a hello's outcomes): counted as received.
            "syncgate_acks_total{edge=\"edge-a\",outcome=\"applied\"} ",
        ],
    )
    .await;
    let m = env.metrics().await;
    let bytes_in: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("syncgate_broker_bytes_in_total "))
        .and_then(|v| v.parse().ok())
        .expect("broker bytes in");
    assert!(bytes_in > 0, "{m}");
    assert!(m.contains("syncgate_broker_open_connections 2"), "{m}");
    for text in [&m, &edge_metrics] {
        assert!(!text.contains("metric-secret-41"));
        assert!(!text.contains("/v3/users"), "no paths in labels");
    }
    env.shutdown().await;
}

#[tokio::test]
async fn an_id_central_does_not_know_is_looked_up_once_not_by_every_write() {
    let env = sync_env(&["edge-a"], None, |_| {}).await;
    let project = env
        .create("/v3/projects", "project", json!({"project": {"name": "p"}}))
        .await;
    let role = env.central_site.id_of("role", "member").unwrap();
    let unknown = crate::fake_keystone::new_id();
    for _ in 0..3 {
        let (status, _) = env
            .write(
                "PUT",
                &format!("/v3/projects/{project}/users/{unknown}/roles/{role}"),
                None,
            )
            .await;
        assert_eq!(status, 404, "the identity service does not know the user");
    }
    assert_eq!(
        env.central_site.reads_of(&format!("/v3/users/{unknown}")),
        1,
        "a miss is remembered"
    );
    env.shutdown().await;
}
