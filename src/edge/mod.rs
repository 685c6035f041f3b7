//! `syncgate edge`: replays central's ops against this site's Keystone strictly in
//! seq order, keeps its cursor and ID map in its own SQLite, acknowledges every
//! op, and catches up by replay after a start, a gap or a reconnect. This file
//! assembles it and runs its tasks; `runner` applies ops, `status` is what it
//! shows of itself.

mod admin;
mod apply;
mod link;
mod resync;
mod runner;
mod status;

pub use status::Status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::keystone::client::KeystoneClient;
use crate::metrics::Metrics;
use crate::protocol::connect_broker;
use crate::protocol::control::Session;
use crate::protocol::messages::{
    Envelope, OutcomesReply, OutcomesRequest, Redo, Skip, Subjects, OUTCOMES_REPLY,
    OUTCOMES_REQUEST, REDO, SKIP,
};
use crate::settings::config::EdgeConfig;
use crate::store::edge::EdgeStore;
use crate::tls::ServerTls;
use link::Link;
use runner::{ack_of, Pending, Runner};

/// Most ops applied before their outcomes are committed together (and
/// acknowledged). After a start, this many ops past the cursor may have
/// reached the site without a record: their creates are looked for first.
const MAX_BATCH: usize = 256;
/// The flag an edge keeps once it marks creates in flight with their look-alikes.
const INFLIGHT_MARKS: &str = "inflight_marks";
/// Set while a process runs on this database, cleared when it stops with
/// nothing in doubt: found set at start, the process before may have left
/// writes on their way to the site.
const RUNNING: &str = "running";
/// Live ops kept in memory, at most, when one arrives just as the lease
/// lapses (more come again by replay).
const MAX_HELD: usize = 4096;

/// A built edge: database open, admin listener bound, not yet running.
pub struct Edge {
    config: EdgeConfig,
    store: EdgeStore,
    keystone: Arc<KeystoneClient>,
    link: Arc<Link>,
    admin_listener: TcpListener,
    /// HTTPS on the admin listener (`--tls-cert`).
    tls: Option<ServerTls>,
    /// TLS to the broker, as `--broker-ca` and `--broker-tls-cert` say.
    broker_tls: Option<tokio_rustls::rustls::ClientConfig>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

impl Edge {
    /// Moves the clock this process stamps its control messages with (a
    /// drill: a site whose clock is off or jumped; replay protection and
    /// grants do not depend on it, only the skew central shows).
    pub fn set_clock_offset(&self, ms: i64) {
        self.link.session.set_clock_offset(ms);
    }
}

/// Why one envelope could not be processed now.
enum Stuck {
    /// Stop processing until something changes (wrong key, halted).
    Blocked,
    /// Shutting down.
    Stopping,
}

impl Edge {
    pub async fn build(config: EdgeConfig) -> anyhow::Result<Edge> {
        if !config.admin_listen.ip().is_loopback() && config.admin_token.is_none() {
            anyhow::bail!(
                "--admin-token is required when --admin-listen is not a loopback address"
            );
        }
        let sealer = config
            .key
            .sealer()
            .map_err(|e| anyhow::anyhow!("--sync-key: {e}"))?;
        if let Some(other) = sealer.edge().filter(|e| *e != config.id) {
            anyhow::bail!(
                "--sync-key is the edge key of edge '{other}', not of --id {}: make this edge's \
                 with `syncgate keygen --edge {}`",
                config.id,
                config.id
            );
        }
        let store = EdgeStore::open(&config.db).await?;
        let session = Session::new(store.next_session().await?, false);
        let link = Arc::new(Link::new(&config.id, session, sealer));
        let keystone = Arc::new(KeystoneClient::new(
            &config.upstream,
            config.credentials.clone(),
            config.upstream_timeout,
            config.upstream_ca.as_deref(),
        )?);
        // Read at start: a bad file stops it with the reason.
        let tls = match &config.tls {
            Some(files) => Some(ServerTls::new(files, None)?),
            None => None,
        };
        let broker_tls = crate::tls::broker_client(
            config.broker_tls.ca.as_deref(),
            config.broker_tls.identity.as_ref(),
            "--broker-ca",
        )?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!("cannot listen on {} (--admin-listen)", config.admin_listen)
            })?;
        let status = Arc::new(Status::default());
        status
            .cursor
            .store(store.cursor().await?, Ordering::Relaxed);
        status
            .id_map_size
            .store(store.map_size().await?, Ordering::Relaxed);
        Ok(Edge {
            config,
            store,
            keystone,
            link,
            admin_listener,
            tls,
            broker_tls,
            metrics: Arc::new(Metrics::edge(admin::EdgeCollector(status.clone()))),
            status,
        })
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Runs until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        // A process before this one that did not stop cleanly (killed, or
        // stopped with a write in doubt) may have left writes on their way to
        // the site: nothing that could meet them is done before they can no
        // longer land (`--upstream-settle` after this process got the ID).
        if self.store.flag(RUNNING).await.unwrap_or(true) {
            warn!(
                settle_s = self.config.upstream_settle.as_secs(),
                "the last process on this database did not stop cleanly: writes it sent may \
                 still reach the site; the first ops it may have sent wait --upstream-settle"
            );
            self.link.expect_late_writes();
        }
        self.link.set_settle(self.config.upstream_settle);
        let running_recorded = match self.store.flag(RUNNING).await {
            Ok(true) => true,
            _ => match self.store.set_flag(RUNNING).await {
                Ok(()) => true,
                Err(e) => {
                    warn!(error = %e, "cannot record this process's start yet; no op is applied until it is");
                    false
                }
            },
        };
        let subjects = Subjects::new(&self.config.sync_prefix);
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let client = connect_broker(
            &self.config.broker,
            &self.config.broker_auth,
            self.broker_tls.clone(),
            &format!("syncgate-edge-{}", self.config.id),
            subjects.edge_inbox(&self.config.id),
            Some(events_tx),
        )
        .await?;
        // An edge with a scope (it holds its edge key) has its own stream:
        // central sends it only what is in its scope.
        let ops_subject = match self.link.sealer.edge() {
            Some(edge) => subjects.ops_for(edge),
            None => subjects.ops(),
        };
        let mut ops = client.subscribe(ops_subject).await?;
        let mut redos = client.subscribe(subjects.redo(&self.config.id)).await?;
        let skip_msgs = client.subscribe(subjects.skip(&self.config.id)).await?;
        let outcome_requests = client.subscribe(subjects.outcomes(&self.config.id)).await?;
        let mut resyncs = client.subscribe(subjects.resync(&self.config.id)).await?;
        let state_requests = client.subscribe(subjects.state(&self.config.id)).await?;
        // Each ends with this future, however it ends (its broker client with it).
        let mut state_task = AbortOnDrop(tokio::spawn(
            resync::StateServer {
                client: client.clone(),
                keystone: self.keystone.clone(),
                store: self.store.clone(),
                link: self.link.clone(),
                status: self.status.clone(),
            }
            .serve(state_requests),
        ));
        // Central's questions about outcomes are answered from the database,
        // never behind an op being retried.
        let mut outcomes_task = AbortOnDrop(tokio::spawn(answer_outcomes(
            outcome_requests,
            self.link.clone(),
            self.store.clone(),
            client.clone(),
            self.status.clone(),
        )));
        // Operator skips are queued at once, even while an op is retried.
        let skips = Arc::new(runner::Skips::default());
        let mut skips_task = AbortOnDrop(tokio::spawn(take_skips(
            skip_msgs,
            self.link.clone(),
            self.status.clone(),
            skips.clone(),
        )));
        let poke_hello = Arc::new(tokio::sync::Notify::new());
        let hellos = link::Hellos {
            link: self.link.clone(),
            client: client.clone(),
            subjects: subjects.clone(),
            status: self.status.clone(),
            store: self.store.clone(),
            interval: self.config.hello_interval,
            initial_sync: self.config.initial_sync,
            database: self.store.database_id().await?,
        };
        let mut hello_task =
            AbortOnDrop(tokio::spawn(hellos.run(stop.clone(), poke_hello.clone())));
        self.status.set_grant_error(Some(
            "waiting for central to answer this edge's first hello".into(),
        ));

        let admin = Arc::new(admin::AdminState {
            link: self.link.clone(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            token: self.config.admin_token.clone(),
            edge: self.config.id.clone(),
        });
        let admin_app = admin::router(admin);
        let mut admin_stop = stop.clone();
        let mut admin_task = AbortOnDrop(tokio::spawn(crate::serve::serve(
            self.admin_listener,
            admin_app,
            self.config.http,
            self.tls.clone(),
            async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            },
        )));
        info!(
            edge = %self.config.id,
            broker = %self.config.broker.redacted(),
            upstream = %self.config.upstream,
            cursor = self.status.cursor.load(Ordering::Relaxed),
            "syncgate edge running"
        );

        // Creates are marked in flight with their look-alikes from this
        // version on; a window left by an earlier one is looked at without.
        let unmarked_through = match self.store.flag(INFLIGHT_MARKS).await {
            Ok(true) => 0,
            _ => {
                self.store.set_flag(INFLIGHT_MARKS).await?;
                self.status.cursor.load(Ordering::Relaxed) + MAX_BATCH as i64
            }
        };
        let runner = Runner {
            id: self.config.id.clone(),
            client: client.clone(),
            subjects,
            store: self.store.clone(),
            keystone: self.keystone.clone(),
            link: self.link.clone(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            on_failure: self.config.on_failure,
            max_attempts: self.config.max_attempts,
            skips,
            stop: stop.clone(),
            pending: Default::default(),
            applied_to: AtomicI64::new(self.status.cursor.load(Ordering::Relaxed)),
            uncertain_through: AtomicI64::new(
                self.status.cursor.load(Ordering::Relaxed) + MAX_BATCH as i64,
            ),
            hold_until: Mutex::new(None),
            unmarked_through,
            settle: self.config.upstream_settle,
            resynced_through: AtomicI64::new(0),
            resync_doubt: Default::default(),
            in_doubt: AtomicBool::new(false),
            running_recorded: AtomicBool::new(running_recorded),
        };
        let mut stop_rx = stop.clone();
        let mut need_replay = true;
        // Polling for ops missed while disconnected costs one request. It is
        // for a quiet stream: while ops arrive, one lost among them shows as
        // a gap at the next, and a poll would ask central again for the ops
        // a slow edge holds in its subscription. A late tick is one tick.
        let mut poll = tokio::time::interval(self.config.hello_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = false;
        let mut hello_ended = false;
        // Ops taken off the stream as the lease lapsed, applied once granted.
        let mut held: Vec<Envelope> = Vec::new();
        'run: loop {
            if !held.is_empty() && runner.link.may_apply() {
                for env in std::mem::take(&mut held) {
                    if let Err(Stuck::Stopping) =
                        take_op(&runner, env, &mut held, &mut need_replay).await
                    {
                        break 'run;
                    }
                }
            }
            // When the lease runs out: the stream is held from then on.
            let lease_end = runner.link.lease_end();
            if need_replay
                && !runner.status.halted.load(Ordering::Relaxed)
                && runner.link.may_apply()
            {
                match runner.catch_up().await {
                    Ok(()) => need_replay = false,
                    Err(Stuck::Stopping) => break,
                    Err(Stuck::Blocked) => need_replay = false,
                }
            }
            // In this order when several are ready: the op stream before
            // the poll, so that a poll finds it quiet only when it is.
            tokio::select! {
                biased;
                _ = crate::serve::stopped(&mut stop_rx) => break,
                r = &mut hello_task.0, if !hello_ended => {
                    hello_ended = true;
                    if !*stop_rx.borrow() {
                        anyhow::bail!("the hello task ended: {r:?}");
                    }
                    break;
                }
                event = events.recv() => match event {
                    Some(async_nats::Event::Connected) => {
                        info!("connected to the broker; catching up");
                        if runner.status.connected_once.swap(true, Ordering::Relaxed) {
                            runner.status.broker_reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        runner.status.connected.store(true, Ordering::Relaxed);
                        need_replay = true;
                        poke_hello.notify_one();
                    }
                    Some(async_nats::Event::Disconnected) => {
                        warn!("disconnected from the broker");
                        runner.status.connected.store(false, Ordering::Relaxed);
                    }
                    Some(async_nats::Event::SlowConsumer(sid)) => {
                        // The client's buffer for a subscription was full:
                        // what it dropped comes again by replay.
                        warn!(subscription = sid, "messages dropped by the broker client (its buffer was full); catching up by replay");
                        need_replay = true;
                    }
                    Some(other) => debug!(event = %other, "broker event"),
                    None => {}
                },
                msg = resyncs.next() => {
                    let Some(msg) = msg else { break };
                    let _hand = runner.status.in_hand();
                    match runner.resync_step(msg).await {
                        Ok(resume) => need_replay |= resume,
                        Err(Stuck::Stopping) => break,
                        Err(Stuck::Blocked) => {}
                    }
                }
                msg = redos.next() => {
                    let Some(msg) = msg else { break };
                    match runner.link.open::<Redo>(REDO, &msg.payload) {
                        Ok(redo) => {
                            if let Err(Stuck::Stopping) = runner.redo(redo).await {
                                break;
                            }
                            // A re-applied op may unblock the ones after it.
                            need_replay = true;
                        }
                        Err(r) => runner.rejected(REDO, r),
                    }
                }
                () = runner.skips.arrived.notified() => {
                    match runner.skips_queued().await {
                        Err(Stuck::Stopping) => break,
                        // An op passed over may unblock the ones after it.
                        _ => need_replay = true,
                    }
                }
                () = runner.link.changed.notified() => {
                    need_replay = true;
                    // A skip held up (no grant, a resync's hold) is tried again.
                    if !runner.skips.is_empty() {
                        runner.skips.arrived.notify_one();
                    }
                }
                () = runner.link.resumed.notified() => {
                    // A skip held up while the lease had lapsed is tried again.
                    if !runner.skips.is_empty() {
                        runner.skips.arrived.notify_one();
                    }
                }
                // Wakes the loop as the lease runs out, so the stream is held.
                () = tokio::time::sleep_until(lease_end.unwrap_or_else(std::time::Instant::now).into()),
                    if lease_end.is_some() => {}
                // Held while the lease has lapsed: taken once granted again.
                msg = ops.next(), if !runner.link.lapsed() => {
                    let Some(msg) = msg else { break };
                    heard = true;
                    if let Some(env) = op_envelope(&msg) {
                        if let Err(Stuck::Stopping) = take_op(&runner, env, &mut held, &mut need_replay).await {
                            break;
                        }
                    }
                    // Ops already waiting join this one's commit.
                    let mut more = 0;
                    while more < MAX_BATCH && !runner.link.lapsed() {
                        let Some(Some(msg)) = ops.next().now_or_never() else { break };
                        more += 1;
                        if let Some(env) = op_envelope(&msg) {
                            if let Err(Stuck::Stopping) = take_op(&runner, env, &mut held, &mut need_replay).await {
                                break 'run;
                            }
                        }
                    }
                }
                // Quiet because held is not quiet: no poll then.
                _ = poll.tick() => {
                    need_replay |= !std::mem::take(&mut heard) && !runner.link.lapsed();
                }
            }
            // What was applied is recorded and acknowledged before anything else.
            let _ = runner.flush().await;
        }
        // Ops applied before the stop are recorded and acknowledged; the
        // hello task says goodbye (central frees this edge's ID at once).
        let _ = runner.flush().await;
        // A stopping edge answers central nothing more, and none of its
        // tasks outlives the database: an answer read from a database closing
        // under it would be taken for the site's. A question cut short is
        // asked again (the goodbye, sent as the stop began, or the next
        // session tells central).
        state_task.stop().await;
        outcomes_task.stop().await;
        skips_task.stop().await;
        if !hello_ended {
            let _ = tokio::time::timeout(Duration::from_secs(3), &mut hello_task.0).await;
        }
        info!("edge stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
        let _ = (&mut admin_task.0).await;
        if runner.nothing_in_doubt() {
            if let Err(e) = self.store.clear_flag(RUNNING).await {
                warn!(error = %e, "cannot record a clean stop; the next start waits --upstream-settle");
            }
        }
        // Nothing of this run uses the database once it is closed.
        hello_task.stop().await;
        self.store.close().await;
        Ok(())
    }
}

/// A live op: applied in order (a gap asks for a replay), or, when the
/// lease has just lapsed, kept to apply once granted again.
async fn take_op(
    runner: &Runner,
    env: Envelope,
    held: &mut Vec<Envelope>,
    need_replay: &mut bool,
) -> Result<(), Stuck> {
    if runner.link.lapsed() && held.len() < MAX_HELD {
        held.push(env);
        return Ok(());
    }
    match runner.live(env).await {
        Ok(gap) => gap_seen(&runner.status, need_replay, gap),
        Err(Stuck::Stopping) => return Err(Stuck::Stopping),
        Err(Stuck::Blocked) => {}
    }
    Ok(())
}

/// A live op beyond the next one: the ops between were missed (a reconnect,
/// a lapsed lease) and come by replay. Counted once per replay it causes.
fn gap_seen(status: &Status, need_replay: &mut bool, gap: bool) {
    if gap && !*need_replay {
        let n = status.stream_gaps.fetch_add(1, Ordering::Relaxed) + 1;
        info!(gaps = n, "ops missed on the stream: catching up by replay");
    }
    *need_replay |= gap;
}

/// An op message from the broker, with the trace context its NATS headers
/// carry; `None` (logged) when it cannot be read.
fn op_envelope(msg: &async_nats::Message) -> Option<Envelope> {
    match serde_json::from_slice::<Envelope>(&msg.payload) {
        Ok(mut env) => {
            if let Some(tp) = msg.headers.as_ref().and_then(|h| h.get("traceparent")) {
                env.traceparent = Some(tp.as_str().to_string());
            }
            Some(env)
        }
        Err(e) => {
            warn!(error = %e, "malformed op message ignored");
            None
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Stops the task, if it runs, and waits until it has: what it used is
    /// then free. (A task already ended is not waited for again.)
    async fn stop(&mut self) {
        if !self.0.is_finished() {
            self.0.abort();
            let _ = (&mut self.0).await;
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Queues central's operator skips (`POST /v1/ops/{seq}/skip`) for the
/// runner: taken here, they reach an op being retried.
async fn take_skips(
    mut msgs: async_nats::Subscriber,
    link: Arc<Link>,
    status: Arc<Status>,
    skips: Arc<runner::Skips>,
) {
    while let Some(msg) = msgs.next().await {
        match link.open::<Skip>(SKIP, &msg.payload) {
            Ok(skip) => {
                info!(seq = skip.op.seq, by = %skip.by, "central asks this edge to pass over an op");
                skips.queue(skip);
            }
            Err(why) => {
                let n = status.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    warn!(kind = SKIP, reason = %why, count = n, "control message dropped");
                }
            }
        }
    }
}

/// Answers central's questions for the outcomes in a range (acks it lost).
async fn answer_outcomes(
    mut requests: async_nats::Subscriber,
    link: Arc<Link>,
    store: EdgeStore,
    client: async_nats::Client,
    status: Arc<Status>,
) {
    while let Some(msg) = requests.next().await {
        let Some(reply) = msg.reply else { continue };
        let _hand = status.in_hand();
        let req = match link.open::<OutcomesRequest>(OUTCOMES_REQUEST, &msg.payload) {
            Ok(req) => req,
            Err(why) => {
                status.rejected.fetch_add(1, Ordering::Relaxed);
                debug!(reason = %why, "outcomes request dropped");
                continue;
            }
        };
        let known = match store.outcomes_through().await {
            Ok(k) => k,
            Err(e) => {
                error!(error = %e, "cannot read outcomes");
                continue;
            }
        };
        let through = req.through.min(known);
        let rows = match store
            .exceptions(req.after, through, MAX_EXCEPTIONS_PER_ANSWER)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                error!(error = %e, "cannot read outcomes");
                continue;
            }
        };
        // A full page covers the range only up to its last row.
        let through = if rows.len() as i64 == MAX_EXCEPTIONS_PER_ANSWER {
            rows.last().map_or(through, |r| r.seq)
        } else {
            through
        };
        let answer = OutcomesReply {
            through,
            exceptions: rows.iter().map(ack_of).collect(),
        };
        let payload = link.seal(OUTCOMES_REPLY, &answer);
        if let Err(e) = client.publish(reply, payload.into()).await {
            debug!(error = %e, "outcomes answer not sent");
        }
    }
}

/// Most exceptions in one answer to central's outcomes request.
const MAX_EXCEPTIONS_PER_ANSWER: i64 = 5000;
