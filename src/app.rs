//! Assembles `syncgate central`: opens the op log (reporting intents a crash left
//! open), binds the proxy, admin and embedded broker listeners, and serves them
//! until shutdown, draining in-flight requests first.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::audit::{self, Admin};
use crate::broker::{Broker, BrokerAuth};
use crate::config::{BrokerMode, CentralConfig};
use crate::keystone::client::KeystoneClient;
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy};
use crate::store::Store;
use crate::sync::central::SyncCentral;
use crate::sync::crypto::Sealer;
use crate::sync::protocol::Subjects;
use crate::sync::{connect_broker, redact_url};

/// A built central gateway: listeners bound, op log open, not yet serving.
pub struct Central {
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    store: Store,
    broker: Option<Broker>,
    config: CentralConfig,
    sealer: Arc<Sealer>,
}

impl Central {
    pub async fn build(config: CentralConfig) -> anyhow::Result<Central> {
        config.validate().map_err(anyhow::Error::msg)?;
        let store = Store::open(&config.db).await?;
        let recovered = store
            .recover_open_intents()
            .await
            .context("recovering open intents")?;
        if !recovered.is_empty() {
            warn!(
                count = recovered.len(),
                seqs = ?recovered,
                "writes left open by an earlier stop are logged as unknown_outcome; check them in the audit API"
            );
        }
        let sealer = Arc::new(
            config
                .sync
                .key
                .sealer()
                .map_err(|e| anyhow::anyhow!("--sync-key: {e}"))?,
        );
        if matches!(config.sync.key, crate::config::SyncKey::Plaintext) {
            warn!("--insecure-plaintext-sync: ops, with the passwords they carry, cross the broker unencrypted");
        }
        let keystone = match &config.service_credentials {
            Some(creds) => Some(Arc::new(KeystoneClient::new(
                &config.upstream,
                creds.clone(),
                config.upstream_timeout,
            )?)),
            None => {
                info!("no OS_* service credentials: natural keys are learned only from writes passing through");
                None
            }
        };
        let metrics = Arc::new(Metrics::default());
        let proxy = Arc::new(Proxy::new(
            &config,
            store.clone(),
            metrics.clone(),
            keystone,
        )?);
        let proxy_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!("cannot listen on {} (--admin-listen)", config.admin_listen)
            })?;
        let broker = match &config.broker {
            BrokerMode::Embedded(broker_config) => {
                if !broker_config.listen.ip().is_loopback()
                    && matches!(broker_config.auth, BrokerAuth::None)
                {
                    warn!(
                        listen = %broker_config.listen,
                        "the embedded broker accepts clients without credentials; set --broker-token"
                    );
                }
                Some(Broker::bind(broker_config.clone()).await?)
            }
            BrokerMode::External(url) => {
                info!(broker = %url, "using an external NATS server; no embedded broker");
                None
            }
        };
        let admin = Arc::new(Admin {
            store: store.clone(),
            proxy: proxy.clone(),
            metrics,
            token: config.admin_token.clone(),
            sync: std::sync::OnceLock::new(),
            edge_offline_after: config.sync.edge_offline_after,
            ack_timeout: config.sync.ack_timeout,
            broker_stats: broker.as_ref().map(Broker::stats),
        });
        Ok(Central {
            proxy_listener,
            admin_listener,
            proxy,
            admin,
            store,
            broker,
            config,
            sealer,
        })
    }

    /// The embedded broker's address, when one runs.
    pub fn broker_addr(&self) -> Option<SocketAddr> {
        self.broker.as_ref().map(Broker::local_addr)
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests finish and closes the op log.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let broker_addr = self.broker_addr();
        let proxy_addr = self.proxy_addr();
        let admin_addr = self.admin_addr();
        info!(%proxy_addr, %admin_addr, "syncgate central serving");

        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let proxy_app =
            proxy::router(self.proxy.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let proxy_server = axum::serve(self.proxy_listener, proxy_app)
            .with_graceful_shutdown(wait(stop_rx.clone()));
        let stop_rx_sync = stop_rx.clone();
        let admin_server = axum::serve(self.admin_listener, audit::router(self.admin.clone()))
            .with_graceful_shutdown(wait(stop_rx));
        let proxy_task = tokio::spawn(async move { proxy_server.await });
        let admin_task = tokio::spawn(async move { admin_server.await });
        // Central's own client: to the embedded broker on this host, or the external one.
        let (broker_url, broker_auth) = match (&self.config.broker, broker_addr) {
            (BrokerMode::Embedded(b), Some(addr)) => {
                let ip = if addr.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    addr.ip().to_string()
                };
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip
                };
                let scheme = if b.tls.is_some() { "tls" } else { "nats" };
                let url = reqwest::Url::parse(&format!("{scheme}://{host}:{}", addr.port()))?;
                (url, b.auth.clone())
            }
            (BrokerMode::External(url), _) => (url.clone(), self.config.broker_client_auth.clone()),
            (BrokerMode::Embedded(_), None) => unreachable!("an embedded broker is bound in build"),
        };
        // The broker stops after sync has flushed (its own signal, sent below).
        let (broker_stop_tx, broker_stop_rx) = tokio::sync::watch::channel(false);
        let broker_task = self
            .broker
            .map(|broker| tokio::spawn(broker.run(wait(broker_stop_rx))));
        let client = connect_broker(&broker_url, &broker_auth, "syncgate-central", None).await?;
        info!(broker = %redact_url(&broker_url), "sync client connecting");
        let sync = Arc::new(SyncCentral {
            store: self.store.clone(),
            client,
            subjects: Subjects::new(&self.config.sync.prefix),
            sealer: self.sealer.clone(),
            wake: self.proxy.wake.clone(),
            ack_timeout: self.config.sync.ack_timeout,
            declared_edges: self.config.sync.edges.clone(),
            recovering: Default::default(),
            allow_new_edges: self.config.sync.allow_new_edges,
            known: Default::default(),
            control_in: Default::default(),
            control_out: Default::default(),
            send_lock: Default::default(),
            metrics: self.admin.metrics.clone(),
        });
        let _ = self.admin.sync.set(sync.clone());
        let sync_task = tokio::spawn(sync.run(stop_rx_sync.clone()));
        let sweep_task = tokio::spawn(sweep_stale_intents(
            self.proxy.clone(),
            self.config.stale_intent_after,
            stop_rx_sync,
        ));

        shutdown.await;
        info!("shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
        proxy_task
            .await
            .context("proxy task")?
            .context("proxy server")?;
        admin_task
            .await
            .context("admin task")?
            .context("admin server")?;
        // Captures whose clients left are not awaited by the server: let them
        // log their ops before the op log closes.
        let limit = self.config.upstream_timeout * 2 + std::time::Duration::from_secs(5);
        if !self.proxy.drain_captures(limit).await {
            warn!("writes still in flight at shutdown; they show as unknown_outcome at the next start");
        }
        if let Err(e) = sync_task.await.context("sync task")? {
            warn!(error = %e, "sync stopped with an error");
        }
        let _ = sweep_task.await;
        let _ = broker_stop_tx.send(true);
        if let Some(task) = broker_task {
            task.await.context("broker task")??;
        }
        self.store.close().await;
        info!("stopped");
        Ok(())
    }
}

/// Logs intents left open while running (not only at start-up) as
/// `unknown_outcome` ops once they are older than any capture can take.
async fn sweep_stale_intents(
    proxy: Arc<Proxy>,
    after: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = (after / 4).clamp(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(15),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::sync::stopped(&mut stop) => return,
        }
        match proxy.sweep_stale_intents(after).await {
            Ok(seqs) if seqs.is_empty() => {}
            Ok(seqs) => warn!(
                count = seqs.len(),
                seqs = ?seqs,
                "writes whose outcome was never logged are now unknown_outcome ops; check them in the audit API"
            ),
            Err(e) => warn!(error = %e, "cannot sweep stale intents"),
        }
    }
}
