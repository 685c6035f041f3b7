//! `syncgate central`: the assembly (this file) opens the op log (reporting
//! intents a crash left open), binds the proxy, admin and embedded broker
//! listeners, and serves them until shutdown, draining in-flight requests
//! first; `sync` publishes ops, serves replays and records acks; `admin` is the
//! audit API; `resync` runs resyncs and drift audits, `plan` says what a
//! resync sends. Its terminal client, `syncgate audit`, is `cli::audit`.

pub mod admin;
mod plan;
pub mod resolve;
pub mod resync;
pub mod retention;
pub mod scoped;
pub mod sync;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tracing::{error, info, warn};

use crate::broker::{Broker, BrokerAuth};
use crate::central::sync::SyncCentral;
use crate::keystone::client::KeystoneClient;
use crate::metrics::Metrics;
use crate::protocol::connect_broker;
use crate::protocol::crypto::Sealer;
use crate::protocol::messages::Subjects;
use crate::proxy::{self, Proxy};
use crate::serve;
use crate::settings::config::{BrokerMode, CentralConfig};
use crate::store::Store;
use admin::Admin;

/// A built central gateway: listeners bound, op log open, not yet serving.
pub struct Central {
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    /// HTTPS on both listeners (`--tls-cert`).
    tls: Option<crate::tls::ServerTls>,
    /// TLS of central's own broker client: to its embedded broker, trusting
    /// exactly that broker's certificate; to an external one, `--broker-ca`.
    broker_tls: Option<tokio_rustls::rustls::ClientConfig>,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    store: Store,
    broker: Option<Broker>,
    config: CentralConfig,
    sealer: Arc<Sealer>,
    /// Central's own client of its Keystone (service credentials), if any.
    keystone: Option<Arc<KeystoneClient>>,
    /// Every task of this central ends when `run` ends, or is dropped (a kill).
    scope: Option<crate::scope::Scope>,
    spawner: crate::scope::Spawner,
    /// On PostgreSQL: this replica's presence on the op log.
    presence: Option<crate::store::Presence>,
    /// How this process names itself (`host:pid`).
    me: String,
    /// Where other replicas reach this one's admin API.
    admin_url: String,
}

/// Keeps this replica's presence on a PostgreSQL op log: checked every few
/// seconds; lost (the database restarted, the connection cut), it is taken
/// again under the same number. Writes this replica forwarded meanwhile may
/// be settled by the leader as `unknown_outcome` (never lost: their commits
/// then find no intent and their clients hear 503).
async fn keep_presence(
    store: Store,
    mut presence: crate::store::Presence,
    me: String,
    admin_url: String,
    alone: bool,
    admin: Arc<Admin>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
        }
        if presence.alive().await {
            continue;
        }
        // Captures stop at once: the leader may now settle this replica's
        // open intents as those of one that is gone.
        store.lost_presence();
        let no = presence.no;
        warn!(
            replica = no,
            "the connection holding this replica's presence was lost; writes are refused until it is held again"
        );
        admin.set_held(false, None);
        // Its session ended (a stalled one too: its locks go with it).
        presence.close().await;
        // Another central may hold the op log alone while the old session
        // lingers on the server: waited for, up to a limit.
        let give_up = tokio::time::Instant::now() + PRESENCE_WAIT;
        loop {
            match store.join(&me, Some(&admin_url), Some(no), alone).await {
                Ok(Some(again)) => {
                    info!(replica = again.no, "this replica's presence is held again");
                    admin.set_held(true, Some(again.no));
                    presence = again;
                    break;
                }
                Ok(None) => return Ok(()),
                Err(
                    e @ (crate::store::StoreError::Taken { .. }
                    | crate::store::StoreError::Replicas),
                ) if tokio::time::Instant::now() >= give_up => {
                    return Err(anyhow::anyhow!("{e}"));
                }
                Err(e) => {
                    warn!(error = %e, "cannot take this replica's presence yet; trying again");
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return Ok(()),
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}

/// How long a replica that lost its presence waits for the op log to let it
/// back in (a session of its own lingering on the server is ended by its
/// TCP user timeout, about 30 s).
const PRESENCE_WAIT: std::time::Duration = std::time::Duration::from_secs(90);

/// What the leader's duties are built from.
struct Kit {
    config: CentralConfig,
    client: async_nats::Client,
    sealer: Arc<Sealer>,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    keystone: Option<Arc<KeystoneClient>>,
    spawner: crate::scope::Spawner,
}

impl Kit {
    /// A sync on `store` (the leader's, or a replica's replay server).
    async fn sync(
        &self,
        store: &Store,
        wants_resync: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) -> anyhow::Result<Arc<SyncCentral>> {
        let postgres = store.dialect() == crate::store::Dialect::Postgres;
        let subjects = Subjects::new(&self.config.sync.prefix);
        // The leader's duties ask edges (and are the ones told of resyncs);
        // a sync that only answers replays reads no answers.
        let replies = match wants_resync {
            Some(_) => Some(sync::Replies::subscribe(&self.client, &subjects).await?),
            None => None,
        };
        Ok(Arc::new(SyncCentral {
            store: store.clone(),
            client: self.client.clone(),
            subjects,
            scoped: Arc::new(
                scoped::Scoped::new(&self.sealer, &self.config.sync.scopes)
                    .map_err(|e| anyhow::anyhow!("--edge-scope: {e}"))?,
            ),
            sealer: self.sealer.clone(),
            wake: self.proxy.wake.clone(),
            ack_timeout: self.config.sync.ack_timeout,
            declared_edges: self.config.sync.edges.clone(),
            recovering: Default::default(),
            allow_new_edges: self.config.sync.allow_new_edges,
            known: Default::default(),
            session: crate::protocol::control::Session::new(
                store.next_session().await?,
                self.config.sync.accept_protocol_1,
            ),
            send_lock: Default::default(),
            metrics: self.admin.metrics.clone(),
            wants_resync,
            spawner: self.spawner.clone(),
            holders: Default::default(),
            started: std::time::Instant::now(),
            // Ops captured by other replicas wake nobody here.
            poll: if postgres {
                std::time::Duration::from_millis(50)
            } else {
                std::time::Duration::from_secs(1)
            },
            // Where replicas run, each answers replays (`serve_replays`).
            serves_replays: !postgres,
            replies,
        }))
    }

    /// The leader's duties on `store` (publishing, acks and hellos, ack
    /// deadlines, resyncs and drift audits, resolving unknown outcomes),
    /// until `stop`; an error when one of them ends before.
    async fn duties(
        &self,
        store: &Store,
        epoch: Option<i64>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        // The duties' own stop: sent at `stop`, or when one of them dies (the
        // others then end too, and the error is the caller's).
        let (end, ended) = tokio::sync::watch::channel(false);
        let (wants_resync, resync_wanted) = tokio::sync::mpsc::unbounded_channel();
        let sync = self.sync(store, Some(wants_resync)).await?;
        let resyncer = Arc::new(resync::Resyncer::new(
            sync.clone(),
            self.keystone.clone(),
            store.clone(),
            self.admin.metrics.clone(),
            self.spawner.clone(),
        ));
        // Before the admin API can start an audit on it.
        resyncer.end_interrupted_drifts().await;
        self.admin
            .set_leader(Some((epoch, sync.clone(), resyncer.clone())));
        let sync_task = Watched::spawn("sync", sync.run(ended.clone()));
        let resync_task = Watched::spawn("resync and drift audit", {
            let stop = ended.clone();
            let interval = self.config.sync.drift_interval;
            async move {
                resyncer.run(resync_wanted, interval, stop).await;
                anyhow::Ok(())
            }
        });
        let resolve_task = Watched::spawn(
            "unknown outcome resolver",
            resolve::Resolver {
                store: store.clone(),
                keystone: self.keystone.clone(),
                published: self.proxy.wake.clone(),
                kick: self.proxy.unknown.clone(),
                settle: self.config.upstream_settle,
            }
            .run(ended.clone()),
        );
        let mut tasks = vec![sync_task, resync_task, resolve_task];
        if let Some(window) = self.config.sync.retention {
            let pruner = retention::Pruner {
                store: store.clone(),
                metrics: self.admin.metrics.clone(),
                window,
                edge_expiry: self.config.sync.edge_expiry,
            };
            tasks.push(Watched::spawn(
                "op log retention",
                pruner.run(ended.clone()),
            ));
        }
        let ran = together(tasks, end, &mut stop).await;
        self.admin.set_leader(None);
        ran
    }
}

/// Runs `tasks` until `stop`, or until one of them ends: then every other is
/// told to end (`end`, which each watches) and awaited. The one that ended
/// early is the error: duties run all together or not at all.
async fn together(
    mut tasks: Vec<Watched>,
    end: tokio::sync::watch::Sender<bool>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let died = {
        let ends = tasks.iter_mut().map(|t| Box::pin(t.ended()));
        tokio::select! {
            _ = crate::serve::stopped(stop) => None,
            (why, _, _) = futures_util::future::select_all(ends) => Some(why),
        }
    };
    let _ = end.send(true);
    for t in &mut tasks {
        t.join().await;
    }
    match died {
        Some(why) => Err(anyhow::anyhow!("{why}")),
        None => Ok(()),
    }
}

/// On a PostgreSQL op log: campaigns to lead, every second, and while this
/// replica leads, does the leader's duties through a store fenced by its
/// epoch, settles the intents of replicas that are gone, and watches its
/// lease: lost (its connection) or another elected, or a duty failing, the
/// duties stop and it campaigns again. Ends with `stop`.
async fn lead(
    kit: Arc<Kit>,
    store: Store,
    me: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let every = std::time::Duration::from_secs(1);
    let mut candidate = store.candidate();
    loop {
        let mut lease = loop {
            match candidate.campaign(&me).await {
                Ok(Some(lease)) => break lease,
                Ok(None) => {}
                Err(e) => warn!(error = %e, "cannot campaign to lead yet"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = crate::serve::stopped(&mut stop) => return Ok(()),
            }
        };
        let epoch = lease.epoch;
        let fenced = match store.fenced(epoch).await {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "elected, and the op log cannot be opened for the leader's duties; giving up the lead");
                lease.resign().await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => continue,
                    _ = crate::serve::stopped(&mut stop) => return Ok(()),
                }
            }
        };
        info!(epoch, replica = ?store.replica(), holder = %me, "this replica leads");
        let (duty_stop, duty_stopped) = tokio::sync::watch::channel(false);
        let mut duties = Box::pin(kit.duties(&fenced, Some(epoch), duty_stopped));
        let lost = tokio::select! {
            r = &mut duties => {
                // The duties ended before they were asked to (the op log
                // failing as they start, a duty that died): the lead is given
                // up, to this replica again or another, once it can be held
                // with them.
                let why = match r {
                    Ok(()) => "the leader's duties ended".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                error!(epoch, reason = %why, "the leader's duties stopped; giving up the lead");
                lease.resign().await;
                fenced.close().await;
                tokio::select! {
                    _ = tokio::time::sleep(every) => continue,
                    _ = crate::serve::stopped(&mut stop) => return Ok(()),
                }
            }
            lost = watch_lease(&kit, &store, &fenced, &mut lease, epoch, stop.clone()) => lost,
        };
        let _ = duty_stop.send(true);
        let ended = duties.await;
        lease.resign().await;
        fenced.close().await;
        match lost {
            None => return ended,
            Some(why) => {
                warn!(epoch, reason = %why, "this replica no longer leads; its duties stopped")
            }
        }
    }
}

/// While leading at `epoch`: settles the intents of gone replicas and checks
/// the lease every second. Answers why the lead was lost, or `None` at stop.
async fn watch_lease(
    kit: &Kit,
    store: &Store,
    fenced: &Store,
    lease: &mut crate::store::Lease,
    epoch: i64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Option<String> {
    loop {
        match fenced.settle_gone(lease).await {
            Ok(seqs) if !seqs.is_empty() => {
                if let Err(e) = kit.proxy.hold_in_doubt(Some(&seqs)).await {
                    warn!(error = %e, "cannot hold the keys of settled writes in doubt");
                }
                kit.proxy.unknown.notify_one();
                kit.proxy.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot settle the writes of replicas that are gone yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = crate::serve::stopped(&mut stop) => return None,
        }
        if !lease.alive().await {
            return Some("the connection holding the leader's lock was lost".into());
        }
        match store.leader().await {
            Ok(l) if l.epoch != epoch => {
                return Some(format!("another replica was elected at epoch {}", l.epoch))
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot read who leads"),
        }
    }
}

/// This host's name (a pod's name in Kubernetes), to say which process leads.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "central".into())
}

impl Central {
    pub async fn build(config: CentralConfig) -> anyhow::Result<Central> {
        config.validate().map_err(anyhow::Error::msg)?;
        let vault = Arc::new(config.oplog_sealer().map_err(anyhow::Error::msg)?);
        if !vault.encrypts() {
            warn!("request bodies (passwords) are kept in the op log in clear: set --oplog-key, or a sync key");
        }
        // A central of an earlier version still on the op log (a rolling
        // upgrade: the old pod draining) is waited for, as one of this
        // version holding it alone is below.
        let deadline = tokio::time::Instant::now() + config.oplog_lock_wait;
        let store = loop {
            match Store::connect(&config.db, config.db_password.as_ref(), Some(vault.clone())).await
            {
                Err(crate::store::StoreError::Taken { .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await
                }
                other => break other?,
            }
        };
        store.set_settle(config.upstream_settle);
        match store.clock_behind_op_log().await {
            Ok(Some((last, now))) => warn!(
                last_logged_at = %last, now = %now,
                "the op log's last op was logged after the op log's clock says it is now (the \
                 clock was ahead and was stepped back): ops logged until the clock passes it \
                 carry its time, so their ack timeouts and retention wait until then; check NTP"
            ),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "cannot compare the op log's last op with the clock"),
        }
        let me = format!("{}:{}", hostname(), std::process::id());
        // Read at start: a bad file stops it with the reason.
        let tls = match &config.tls {
            Some(files) => Some(crate::tls::ServerTls::new(files, None)?),
            None => None,
        };
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!("cannot listen on {} (--admin-listen)", config.admin_listen)
            })?;
        let admin_url = match &config.advertise_admin_url {
            Some(url) => url.as_str().trim_end_matches('/').to_string(),
            None => {
                let addr = admin_listener.local_addr()?;
                let host = match addr.ip() {
                    ip if ip.is_unspecified() => hostname(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                };
                let scheme = if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{host}:{}", addr.port())
            }
        };
        // On PostgreSQL, this process joins the replicas on the op log. A
        // central of an earlier version runs alone: one just stopped or
        // killed lets go as its connection closes, and is waited for a
        // little (a host that vanished, once its connection times out,
        // about 30 s: see `store::engine`).
        let deadline = tokio::time::Instant::now() + config.oplog_lock_wait;
        // With the embedded broker (which replicas cannot share) central
        // holds the op log alone.
        let alone = matches!(config.broker, BrokerMode::Embedded(_));
        let mut presence = loop {
            match store.join(&me, Some(&admin_url), None, alone).await {
                Err(
                    crate::store::StoreError::Taken { .. } | crate::store::StoreError::Replicas,
                ) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await
                }
                other => break other?,
            }
        };
        if let Some(p) = &presence {
            info!(replica = p.no, name = %me, admin = %admin_url, "central joined the replicas on the PostgreSQL op log");
        }
        // Declared edges are known before the admin API answers (the sync's
        // start-up registers them again, should this fail now).
        for edge in &config.sync.edges {
            if let Err(e) = store.register_edge(edge, true).await {
                warn!(edge = %edge, error = %e, "cannot register a declared edge yet");
            }
        }
        // An op log that refuses writes now (a full disk) keeps them open:
        // the intent sweeper logs them once it takes writes again. (On
        // PostgreSQL, those of replicas that are gone, settled now as the
        // leader settles them later.)
        let recovered = match presence.as_mut() {
            None => store.recover_open_intents().await,
            Some(p) => store.settle_gone_at_start(p).await,
        }
        .unwrap_or_else(|e| {
            error!(error = %e, "cannot log the writes an earlier stop left open yet; they are logged once the op log takes writes");
            Vec::new()
        });
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

        if matches!(config.sync.key, crate::settings::config::SyncKey::Plaintext) {
            warn!("--insecure-plaintext-sync: ops, with the passwords they carry, cross the broker unencrypted");
        }
        let keystone = match &config.service_credentials {
            Some(creds) => Some(Arc::new(KeystoneClient::new(
                &config.upstream,
                creds.clone(),
                config.upstream_timeout,
                config.upstream_ca.as_deref(),
            )?)),
            None => {
                if let Some(edge) = config.sync.scopes.iter().find(|(_, s)| s.domains.is_some()) {
                    anyhow::bail!(
                        "--edge-scope {}: a scope limited to some domains needs central's service \
                         credentials (OS_USERNAME, OS_PASSWORD, ... or an application credential): \
                         central reads what a write to an entity by its ID references (a user's \
                         default project) to tell which edges may receive it",
                        edge.0
                    );
                }
                info!("no OS_* service credentials: natural keys are learned only from writes passing through");
                None
            }
        };
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
                Some(Broker::bind((**broker_config).clone()).await?)
            }
            BrokerMode::External(url) => {
                info!(broker = %url.redacted(), "using an external NATS server; no embedded broker");
                None
            }
        };
        // Central's own client: of its embedded broker, it trusts exactly the
        // certificate that broker presents (whatever names it carries).
        let broker_tls = match broker.as_ref().and_then(Broker::tls) {
            Some(server) => Some(crate::tls::client_of(
                server,
                config.broker_tls.identity.as_ref(),
            )?),
            None => crate::tls::broker_client(
                config.broker_tls.ca.as_deref(),
                config.broker_tls.identity.as_ref(),
                "--broker-ca",
            )?,
        };
        let metrics = Arc::new(Metrics::central(broker.as_ref().map(Broker::stats)));
        let (scope, spawner) = crate::scope::Scope::new();
        let proxy = Arc::new(Proxy::new(
            &config,
            store.clone(),
            metrics.clone(),
            keystone.clone(),
            spawner.clone(),
        )?);
        // Writes that may still land upstream hold what they touch again
        // (those just logged from open intents, and those an earlier run
        // logged in doubt): a conflicting write is not let through meanwhile.
        // Unread, none could be let through safely: the start fails.
        proxy
            .hold_in_doubt(None)
            .await
            .context("holding the writes still in doubt")?;
        let proxy_listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--listen)", config.listen))?;
        let admin = Arc::new(Admin {
            store: store.clone(),
            proxy: proxy.clone(),
            metrics,
            token: config.admin_token.clone(),
            sync: Default::default(),
            edge_offline_after: config.sync.edge_offline_after,
            ack_timeout: config.sync.ack_timeout,
            retention: config.sync.retention,
            edge_expiry: config.sync.edge_expiry,
            failed: Default::default(),
            resyncer: Default::default(),
            forwarder: {
                let forwarder =
                    reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
                match &config.admin_ca {
                    Some(ca) => forwarder
                        .use_preconfigured_tls(crate::tls::client_trusting(ca, "--admin-ca")?),
                    None => forwarder,
                }
                .build()?
            },
            holder: std::sync::Mutex::new(admin::Holder {
                engine: match store.dialect() {
                    crate::store::Dialect::Sqlite => "sqlite",
                    crate::store::Dialect::Postgres => "postgresql",
                },
                database: crate::store::shown(&config.db),
                process: me.clone(),
                held: false,
                since: None,
                replica: None,
                leads: false,
                epoch: None,
                leads_since: None,
                leads_since_unix: 0,
            }),
            gauges_read_at: Default::default(),
        });
        admin.set_held(true, presence.as_ref().map(|p| p.no));
        Ok(Central {
            presence,
            me,
            admin_url,
            keystone,
            scope: Some(scope),
            spawner,
            proxy_listener,
            admin_listener,
            tls,
            broker_tls,
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
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        // Held to the end: dropping it (a return, or this future dropped as a
        // kill would) ends every task central spawned.
        let _scope = self.scope.take();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let broker_addr = self.broker_addr();
        let proxy_addr = self.proxy_addr();
        let admin_addr = self.admin_addr();
        info!(%proxy_addr, %admin_addr, "syncgate central serving");

        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let limits = self.config.http;
        let stop_rx_sync = stop_rx.clone();
        let mut proxy_task = Watched::spawn("proxy", {
            let proxy = self.proxy.clone();
            serve::serve_with(
                self.proxy_listener,
                limits,
                self.tls.clone(),
                wait(stop_rx.clone()),
                move |peer| proxy::service(proxy.clone(), peer),
            )
        });
        let mut admin_task = Watched::spawn(
            "admin API",
            serve::serve(
                self.admin_listener,
                admin::router(self.admin.clone()),
                limits,
                self.tls.clone(),
                wait(stop_rx),
            ),
        );
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
                (
                    crate::settings::config::BrokerUrls::one(url),
                    b.auth.clone(),
                )
            }
            (BrokerMode::External(url), _) => (url.clone(), self.config.broker_client_auth.clone()),
            (BrokerMode::Embedded(_), None) => unreachable!("an embedded broker is bound in build"),
        };
        // The broker stops after sync has flushed (its own signal, sent below).
        let (broker_stop_tx, broker_stop_rx) = tokio::sync::watch::channel(false);
        let mut broker_task = match self.broker {
            Some(broker) => Watched::spawn("broker", broker.run(wait(broker_stop_rx))),
            None => Watched::none("broker"),
        };
        let inbox = Subjects::new(&self.config.sync.prefix).central_inbox();
        let client = connect_broker(
            &broker_url,
            &broker_auth,
            self.broker_tls.clone(),
            "syncgate-central",
            inbox,
            None,
        )
        .await?;
        info!(broker = %broker_url.redacted(), "sync client connecting");
        let kit = Arc::new(Kit {
            config: self.config.clone(),
            client,
            sealer: self.sealer.clone(),
            proxy: self.proxy.clone(),
            admin: self.admin.clone(),
            keystone: self.keystone.clone(),
            spawner: self.spawner.clone(),
        });
        // One process on SQLite does the leader's duties for its life; on
        // PostgreSQL one replica at a time, elected, and every replica
        // answers replays.
        let (mut duty_task, mut replay_task) = match self.store.dialect() {
            crate::store::Dialect::Sqlite => {
                let (kit, store, stop) = (kit.clone(), self.store.clone(), stop_rx_sync.clone());
                (
                    Watched::spawn("sync", async move { kit.duties(&store, None, stop).await }),
                    Watched::none("replay server"),
                )
            }
            crate::store::Dialect::Postgres => {
                let replays = kit.sync(&self.store, None).await?;
                (
                    Watched::spawn(
                        "leader election",
                        lead(
                            kit.clone(),
                            self.store.clone(),
                            self.me.clone(),
                            stop_rx_sync.clone(),
                        ),
                    ),
                    Watched::spawn("replay server", replays.serve_replays(stop_rx_sync.clone())),
                )
            }
        };
        let mut sweep_task = Watched::spawn("intent sweeper", {
            let proxy = self.proxy.clone();
            let after = self.config.stale_intent_after;
            let stop = stop_rx_sync.clone();
            async move {
                sweep_stale_intents(proxy, after, stop).await;
                anyhow::Ok(())
            }
        });

        let mut lock_task = match self.presence.take() {
            Some(presence) => Watched::spawn(
                "replica presence",
                keep_presence(
                    self.store.clone(),
                    presence,
                    self.me.clone(),
                    self.admin_url.clone(),
                    matches!(self.config.broker, BrokerMode::Embedded(_)),
                    self.admin.clone(),
                    stop_rx_sync.clone(),
                ),
            ),
            None => Watched::none("replica presence"),
        };

        // Until shutdown, every task must keep running: one that ends makes the
        // process unready and stop with an error, instead of looking healthy.
        let died = tokio::select! {
            _ = shutdown => None,
            d = proxy_task.ended() => Some(d),
            d = admin_task.ended() => Some(d),
            d = duty_task.ended() => Some(d),
            d = replay_task.ended() => Some(d),
            d = sweep_task.ended() => Some(d),
            d = broker_task.ended() => Some(d),
            d = lock_task.ended() => Some(d),
        };
        if let Some(why) = &died {
            error!(reason = %why, "a task of the gateway stopped; shutting down");
            self.admin.set_failed(why);
        }
        let grace_ends = tokio::time::Instant::now() + limits.shutdown_grace;
        info!(grace = ?limits.shutdown_grace, "shutting down: draining in-flight requests");
        let _ = stop_tx.send(true);
        proxy_task.join().await;
        admin_task.join().await;
        // Captures whose clients left are not awaited by the servers: let them
        // log their ops before the op log closes, within the grace period; what
        // is still running then is logged as unknown_outcome, so no intent is
        // left open.
        let left = grace_ends.saturating_duration_since(tokio::time::Instant::now());
        if !self.proxy.drain_captures(left).await {
            match self.proxy.abandon_running_captures().await {
                Ok(seqs) => {
                    warn!(seqs = ?seqs, "writes still in flight when the grace period ended are logged as unknown_outcome")
                }
                Err(e) => {
                    error!(error = %e, "writes still in flight at shutdown could not be logged; they show as unknown_outcome at the next start")
                }
            }
        }
        duty_task.join().await;
        replay_task.join().await;
        sweep_task.join().await;
        lock_task.join().await;
        let _ = broker_stop_tx.send(true);
        broker_task.join().await;
        self.store.close().await;
        match died {
            Some(why) => Err(anyhow::anyhow!("{why}")),
            None => {
                info!("stopped");
                Ok(())
            }
        }
    }
}

/// A task that must run until shutdown, by name.
pub(crate) struct Watched {
    name: &'static str,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Watched {
    pub(crate) fn spawn<T, E>(
        name: &'static str,
        task: impl Future<Output = Result<T, E>> + Send + 'static,
    ) -> Watched
    where
        E: Into<anyhow::Error> + 'static,
        T: Send + 'static,
    {
        Watched {
            name,
            handle: Some(tokio::spawn(async move {
                task.await.map(|_| ()).map_err(Into::into)
            })),
        }
    }

    pub(crate) fn none(name: &'static str) -> Watched {
        Watched { name, handle: None }
    }

    /// Resolves when the task ends (never, for none), saying how it ended.
    pub(crate) async fn ended(&mut self) -> String {
        let Some(handle) = self.handle.as_mut() else {
            return std::future::pending().await;
        };
        let result = handle.await;
        self.handle = None;
        describe(self.name, result)
    }

    /// Waits for the task to end after stop was signalled; logs a failure.
    pub(crate) async fn join(&mut self) {
        if let Some(handle) = self.handle.take() {
            let result = handle.await;
            if !matches!(result, Ok(Ok(()))) {
                warn!(reason = %describe(self.name, result), "task stopped with an error");
            }
        }
    }
}

impl Drop for Watched {
    /// A task not joined (its owner was dropped, as a kill would) ends too.
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

fn describe(name: &str, result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> String {
    match result {
        Ok(Ok(())) => format!("the {name} task ended"),
        Ok(Err(e)) => format!("the {name} task failed: {e:#}"),
        Err(e) if e.is_panic() => format!("the {name} task panicked"),
        Err(_) => format!("the {name} task was cancelled"),
    }
}

/// Logs intents left open while running (not only at start-up) as
/// `unknown_outcome` ops once they are older than any capture can take.
async fn sweep_stale_intents(
    proxy: Arc<Proxy>,
    after: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // An abandoned intent is a write that may be applied upstream and is not
    // yet an op: every edge may lack it, so it is logged as soon as it can be.
    let every = (after / 4).clamp(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(1),
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::serve::stopped(&mut stop) => return,
        }
        match proxy.sweep_abandoned_intents(every * 4).await {
            Ok(seqs) if seqs.is_empty() => {}
            Ok(seqs) => warn!(
                count = seqs.len(),
                seqs = ?seqs,
                "writes whose outcome was never logged are now unknown_outcome ops; check them in the audit API"
            ),
            Err(e) => warn!(error = %e, "cannot log abandoned intents yet; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One duty that dies ends the others (they are told to, and awaited)
    /// and is the error; at stop, all end and none is an error.
    #[tokio::test]
    async fn duties_run_all_together_or_not_at_all() {
        let (end, ended) = tokio::sync::watch::channel(false);
        let (_stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waits = |name: &'static str| {
            let (mut ended, finished) = (ended.clone(), finished.clone());
            Watched::spawn(name, async move {
                crate::serve::stopped(&mut ended).await;
                finished.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                anyhow::Ok(())
            })
        };
        let dies = Watched::spawn("publisher", async { Err::<(), _>(anyhow::anyhow!("gone")) });
        let ran = together(
            vec![waits("resolver"), dies, waits("resyncer")],
            end,
            &mut stop,
        )
        .await;
        assert_eq!(
            ran.unwrap_err().to_string(),
            "the publisher task failed: gone"
        );
        assert_eq!(
            finished.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "the others ended"
        );

        let (end, ended) = tokio::sync::watch::channel(false);
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let mut e = ended.clone();
        let task = Watched::spawn("sync", async move {
            crate::serve::stopped(&mut e).await;
            anyhow::Ok(())
        });
        stop_tx.send(true).unwrap();
        together(vec![task], end, &mut stop).await.unwrap();
        drop(ended);
    }

    #[tokio::test]
    async fn a_task_that_dies_is_reported_by_name_and_how() {
        let mut panics = Watched::spawn("publisher", async {
            if true {
                panic!("boom");
            }
            anyhow::Ok(())
        });
        assert_eq!(panics.ended().await, "the publisher task panicked");
        let mut fails = Watched::spawn("broker", async {
            Err::<(), _>(anyhow::anyhow!("port gone"))
        });
        assert_eq!(fails.ended().await, "the broker task failed: port gone");
        let mut none = Watched::none("broker");
        let never = tokio::time::timeout(std::time::Duration::from_millis(20), none.ended()).await;
        assert!(never.is_err(), "an absent task never ends");
    }
}
