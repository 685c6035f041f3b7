//! Test harness: a central gateway on random loopback ports, in front of a fake
//! identity API, with a fresh op log in a temporary directory.

use std::time::Duration;

use serde_json::Value;
use syncgate::settings::config::parse_base_url;
use syncgate::{Central, CentralConfig};
use tokio::sync::oneshot;

use crate::fake_keystone::FakeKeystone;

pub struct TestApp {
    pub proxy: String,
    pub admin: String,
    pub fake: FakeKeystone,
    pub db_url: String,
    pub client: reqwest::Client,
    pub admin_token: Option<String>,
    /// The sync key (it also seals the op log's bodies): a restart on the same
    /// op log needs it.
    pub key: syncgate::settings::config::SyncKey,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

/// Central's op log for a test: a new database on the PostgreSQL server that
/// `SYNCGATE_TEST_POSTGRES` names (`postgres://user@host:port`, as
/// `scripts/test.sh` starts one for its run on PostgreSQL), else a SQLite
/// file in `dir`.
pub async fn central_db(dir: &std::path::Path) -> String {
    let Ok(server) = std::env::var("SYNCGATE_TEST_POSTGRES") else {
        return format!("sqlite://{}", dir.join("central.db").display());
    };
    use sqlx::Connection;
    let server = server.trim_end_matches('/');
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("SYNCGATE_TEST_POSTGRES={server}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    format!("{server}/{name}")
}

pub fn config_for(fake: &FakeKeystone, db_url: &str) -> CentralConfig {
    let mut config = CentralConfig::for_upstream(parse_base_url(&fake.url()).unwrap(), db_url);
    // Writes the tests leave in doubt are concluded quickly.
    config.upstream_settle = Duration::from_secs(1);
    config
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut CentralConfig)) -> TestApp {
    let fake = FakeKeystone::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db_url = central_db(dir.path()).await;
    let mut config = config_for(&fake, &db_url);
    tweak(&mut config);
    let mut app = start(fake, config).await;
    app._dir = Some(dir);
    app
}

/// Starts a gateway with a given config in front of a given fake.
pub async fn start(fake: FakeKeystone, config: CentralConfig) -> TestApp {
    let admin_token = config.admin_token.as_ref().map(|t| t.expose().to_string());
    let db_url = config.db.clone();
    let key = config.sync.key.clone();
    let central = Central::build(config).await.expect("gateway builds");
    let proxy = format!("http://{}", central.proxy_addr());
    let admin = format!("http://{}", central.admin_addr());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(central.run(async {
        let _ = rx.await;
    }));
    TestApp {
        proxy,
        admin,
        fake,
        db_url,
        client: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        admin_token,
        key,
        stop: Some(tx),
        task: Some(task),
        _dir: None,
    }
}

impl TestApp {
    /// Stops the gateway, waiting for it to drain; returns the fake and the temp dir.
    pub async fn stop(mut self) -> (FakeKeystone, Option<tempfile::TempDir>) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
        (self.fake, self._dir.take())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.proxy)
    }

    /// Sends a JSON write through the gateway with a client token.
    pub async fn write(&self, method: &str, path: &str, body: Option<Value>) -> reqwest::Response {
        let mut req = self
            .client
            .request(method.parse().unwrap(), self.url(path))
            .header("x-auth-token", "client-token-abc");
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send().await.unwrap()
    }

    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        let mut req = self.client.get(format!("{}{path}", self.admin));
        if let Some(t) = &self.admin_token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap()
    }

    /// Waits until `/metrics` has this line (a scrape reads central's sync
    /// gauges from the op log, at most once a second).
    pub async fn until_metric(&self, line: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = self.admin_get("/metrics").await.text().await.unwrap();
            if text.lines().any(|l| l == line) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no '{line}' in\n{text}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Every op in the log, oldest first, following `next` cursors.
    pub async fn all_ops(&self) -> Vec<Value> {
        let mut ops = Vec::new();
        let mut after = 0;
        loop {
            let page: Value = self
                .admin_get(&format!("/v1/ops?after={after}&limit=1000"))
                .await
                .json()
                .await
                .unwrap();
            ops.extend(page["ops"].as_array().unwrap().iter().cloned());
            match page["next"].as_i64() {
                Some(next) => after = next,
                None => return ops,
            }
        }
    }
}

/// A chaos run's seed: from the variable `name` (to replay one), else new.
pub fn seed_from(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}
