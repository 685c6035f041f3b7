//! `syncgate edge`: replays central's ops against this site's Keystone strictly in
//! seq order, keeps its cursor and ID map in its own SQLite, acknowledges every
//! op, and catches up by replay after a start, a gap or a reconnect.

mod admin;
mod apply;
mod link;
mod resync;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures_util::{FutureExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::keystone::client::KeystoneClient;
use crate::metrics::Metrics;
use crate::protocol::control::{Rejected, Session};
use crate::protocol::messages::{
    Ack, Envelope, OpContent, Outcome, OutcomesReply, OutcomesRequest, Redo, ReplayBatch,
    ReplayRequest, Subjects, ACK, OUTCOMES_REPLY, OUTCOMES_REQUEST, REDO, REPLAY,
};
use crate::protocol::{connect_broker, redact_url};
use crate::settings::config::{EdgeConfig, OnFailure};
use crate::store::edge::{Batch, EdgeStore, StoredOutcome};
use apply::Applier;
use link::Link;
use tracing::Instrument;

/// Ops asked for per replay request.
const REPLAY_LIMIT: i64 = 256;
/// Most ops applied before their outcomes are committed together (and
/// acknowledged). After a start, this many ops past the cursor may have
/// reached the site without a record: their creates are looked for first.
const MAX_BATCH: usize = 256;
/// How long a replay request may take. The run loop waits for it, so it is
/// short: a request lost with a broken connection must not hold up acks,
/// answers to central or live ops for long.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(3);
/// The flag an edge keeps once it marks creates in flight with their look-alikes.
const INFLIGHT_MARKS: &str = "inflight_marks";
/// Set while a process runs on this database, cleared when it stops with
/// nothing in doubt: found set at start, the process before may have left
/// writes on their way to the site.
const RUNNING: &str = "running";
/// Longest wait between retries of an op that failed transiently.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the edge shows on its admin listener.
#[derive(Debug, Default)]
pub struct Status {
    pub cursor: AtomicI64,
    pub id_map_size: AtomicI64,
    pub connected: AtomicBool,
    pub halted: AtomicBool,
    /// A resync from central holds the op stream.
    pub resync_hold: AtomicBool,
    pub applied: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    /// Re-drives from central handled (re-acknowledged, re-applied or refused).
    pub redriven: AtomicU64,
    /// Control messages dropped (forged, replayed, malformed).
    pub rejected: AtomicU64,
    /// Why the edge cannot make progress applying ops, if it cannot.
    pub error: Mutex<Option<String>>,
    /// Why central does not let this process apply ops now, if it does not.
    grant_error: Mutex<Option<String>>,
    /// What central warns of (another process tried to take this edge's ID).
    warning: Mutex<Option<String>>,
    /// What the edge waits for on purpose (writes that may still land): not
    /// an error, and no reason to be unready.
    waiting: Mutex<Option<String>>,
}

impl Status {
    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn set_grant_error(&self, e: Option<String>) {
        *self.grant_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    fn grant_error(&self) -> Option<String> {
        self.grant_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_warning(&self, w: Option<String>) {
        *self.warning.lock().unwrap_or_else(|p| p.into_inner()) = w;
    }

    fn set_waiting(&self, w: Option<String>) {
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = w;
    }

    pub fn waiting(&self) -> Option<String> {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn warning(&self) -> Option<String> {
        self.warning
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Why the edge cannot make progress: central's word first, else the op's.
    pub fn error(&self) -> Option<String> {
        self.grant_error()
            .or_else(|| self.error.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A built edge: database open, admin listener bound, not yet running.
pub struct Edge {
    config: EdgeConfig,
    store: EdgeStore,
    keystone: Arc<KeystoneClient>,
    link: Arc<Link>,
    admin_listener: TcpListener,
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
        let store = EdgeStore::open(&config.db).await?;
        let session = Session::new(store.next_session().await?, false);
        let link = Arc::new(Link::new(&config.id, session, sealer));
        let keystone = Arc::new(KeystoneClient::new(
            &config.upstream,
            config.credentials.clone(),
            config.upstream_timeout,
        )?);
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
            &format!("syncgate-edge-{}", self.config.id),
            Some(events_tx),
        )
        .await?;
        let mut ops = client.subscribe(subjects.ops()).await?;
        let mut redos = client.subscribe(subjects.redo(&self.config.id)).await?;
        let outcome_requests = client.subscribe(subjects.outcomes(&self.config.id)).await?;
        let mut resyncs = client.subscribe(subjects.resync(&self.config.id)).await?;
        let state_requests = client.subscribe(subjects.state(&self.config.id)).await?;
        // Each ends with this future, however it ends (its broker client with it).
        let _state_task = AbortOnDrop(tokio::spawn(
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
        let _outcomes_task = AbortOnDrop(tokio::spawn(answer_outcomes(
            outcome_requests,
            self.link.clone(),
            self.store.clone(),
            client.clone(),
            self.status.clone(),
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
            async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            },
        )));
        info!(
            edge = %self.config.id,
            broker = %redact_url(&self.config.broker),
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
        // Polling for ops missed while disconnected costs one request.
        let mut poll = tokio::time::interval(self.config.hello_interval);
        let mut hello_ended = false;
        'run: loop {
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
            tokio::select! {
                msg = ops.next() => {
                    let Some(msg) = msg else { break };
                    if let Some(env) = op_envelope(&msg) {
                        match runner.live(env).await {
                            Ok(gap) => need_replay |= gap,
                            Err(Stuck::Stopping) => break,
                            Err(Stuck::Blocked) => {}
                        }
                    }
                    // Ops already waiting join this one's commit.
                    let mut more = 0;
                    while more < MAX_BATCH {
                        let Some(Some(msg)) = ops.next().now_or_never() else { break };
                        more += 1;
                        if let Some(env) = op_envelope(&msg) {
                            match runner.live(env).await {
                                Ok(gap) => need_replay |= gap,
                                Err(Stuck::Stopping) => break 'run,
                                Err(Stuck::Blocked) => {}
                            }
                        }
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
                msg = resyncs.next() => {
                    let Some(msg) = msg else { break };
                    match runner.resync_step(msg).await {
                        Ok(resume) => need_replay |= resume,
                        Err(Stuck::Stopping) => break,
                        Err(Stuck::Blocked) => {}
                    }
                }
                event = events.recv() => match event {
                    Some(async_nats::Event::Connected) => {
                        info!("connected to the broker; catching up");
                        runner.status.connected.store(true, Ordering::Relaxed);
                        need_replay = true;
                        poke_hello.notify_one();
                    }
                    Some(async_nats::Event::Disconnected) => {
                        warn!("disconnected from the broker");
                        runner.status.connected.store(false, Ordering::Relaxed);
                    }
                    Some(other) => debug!(event = %other, "broker event"),
                    None => {}
                },
                _ = poll.tick() => need_replay = true,
                () = runner.link.changed.notified() => need_replay = true,
                r = &mut hello_task.0, if !hello_ended => {
                    hello_ended = true;
                    if !*stop_rx.borrow() {
                        anyhow::bail!("the hello task ended: {r:?}");
                    }
                    break;
                }
                _ = crate::serve::stopped(&mut stop_rx) => break,
            }
            // What was applied is recorded and acknowledged before anything else.
            let _ = runner.flush().await;
        }
        // Ops applied before the stop are recorded and acknowledged; the
        // hello task says goodbye (central frees this edge's ID at once).
        let _ = runner.flush().await;
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
        self.store.close().await;
        Ok(())
    }
}

struct Runner {
    /// Resync ops whose last try may still reach the site (no answer in
    /// time), with when that can no longer happen: tried again, they are
    /// looked for first, and not before then.
    resync_doubt: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The op being applied had a try whose answer never came.
    in_doubt: AtomicBool,
    /// This process's start is recorded (`RUNNING`): ops may be applied.
    running_recorded: AtomicBool,
    id: String,
    client: async_nats::Client,
    subjects: Subjects,
    store: EdgeStore,
    keystone: Arc<KeystoneClient>,
    /// The session with central: sealing, opening, the grant to apply.
    link: Arc<Link>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    on_failure: OnFailure,
    stop: watch::Receiver<bool>,
    /// Ops applied at the site and not yet committed here, with what the
    /// commit will record.
    pending: std::sync::Mutex<Pending>,
    /// The last op applied in order, committed or pending (the cursor is the
    /// last committed one).
    applied_to: AtomicI64,
    /// Ops up to here may have reached the site without a record here (those
    /// after the cursor at start, or in a batch whose commit failed).
    uncertain_through: AtomicI64,
    /// While a resync applies central's state, no op from the stream is
    /// applied (until this time, renewed by each of its steps).
    hold_until: Mutex<Option<std::time::Instant>>,
    /// Ops up to here may have been attempted by a version that did not mark
    /// creates in flight with their look-alikes.
    unmarked_through: i64,
    /// How long an attempt whose answer never came may still reach the site.
    settle: Duration,
    /// Ops up to here come after the last resync's fence, whose state was read
    /// after them (see `apply::Attempt::after_resync`).
    resynced_through: AtomicI64,
}

/// The ops of the batch being built, and what their acks need.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) batch: Batch,
    /// Per op (in `batch.outcomes` order): its kind and its `apply` span.
    ops: Vec<(String, tracing::Span)>,
    /// The central IDs ops of the batch created.
    created: std::collections::HashSet<String>,
}

impl Runner {
    /// Whether no write this process sent may still be on its way.
    fn nothing_in_doubt(&self) -> bool {
        !self.in_doubt.load(Ordering::Relaxed)
            && self.link.late_writes_until().is_none()
            && !self.link.earlier_writes_pending()
            && self
                .resync_doubt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }
}

impl Runner {
    /// Where the next op in order follows: the last op applied (in memory:
    /// committed or in the batch being built).
    async fn cursor(&self) -> i64 {
        self.applied_to.load(Ordering::Relaxed)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits the ops applied since the last commit in one transaction, then
    /// acknowledges them. An ack never leaves before its outcome is durable.
    async fn flush(&self) -> Result<(), Stuck> {
        let Pending { batch, ops, .. } = std::mem::take(&mut *self.pending());
        if batch.outcomes.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.commit_batch(&batch).await {
            error!(ops = batch.outcomes.len(), error = %e, "cannot record applied ops; they will be replayed");
            self.status.set_error(Some(format!("edge database: {e}")));
            // Applied at the site, not recorded: replayed in order, creates
            // looked for first.
            if let Some(last) = batch.outcomes.iter().map(|o| o.seq).max() {
                self.uncertain_through.fetch_max(last, Ordering::Relaxed);
            }
            self.applied_to.store(
                self.status.cursor.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
            return Err(Stuck::Blocked);
        }
        if let Some(seq) = batch.cursor {
            self.status.cursor.fetch_max(seq, Ordering::Relaxed);
        }
        if let Ok(n) = self.store.map_size().await {
            self.status.id_map_size.store(n, Ordering::Relaxed);
        }
        for (stored, (kind, span)) in batch.outcomes.iter().zip(ops) {
            if stored.outcome == Outcome::Failed.as_str() {
                self.status.failed.fetch_add(1, Ordering::Relaxed);
                warn!(parent: &span, seq = stored.seq, %kind, status = ?stored.status, detail = ?stored.detail, "op failed at this edge");
            } else {
                self.status.applied.fetch_add(1, Ordering::Relaxed);
                info!(parent: &span, seq = stored.seq, op_id = %stored.op_id, %kind, outcome = %stored.outcome, "op applied");
            }
            self.ack_stored(stored).instrument(span).await;
        }
        Ok(())
    }

    /// Asks central for every op after the cursor and applies them in order.
    async fn catch_up(&self) -> Result<(), Stuck> {
        loop {
            let from = self.cursor().await + 1;
            let req = ReplayRequest {
                from_seq: from,
                limit: REPLAY_LIMIT,
            };
            let payload = self.link.seal(REPLAY, &req);
            let answer = tokio::time::timeout(
                REPLAY_TIMEOUT,
                self.client.request(self.subjects.replay(), payload.into()),
            )
            .await;
            let msg = match answer {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    debug!(error = %e, "replay request failed; will retry");
                    return Ok(());
                }
                Err(_) => {
                    debug!("replay request timed out; will retry");
                    return Ok(());
                }
            };
            let batch: ReplayBatch = match serde_json::from_slice(&msg.payload) {
                Ok(b) => b,
                Err(_) => {
                    let answer: String = String::from_utf8_lossy(&msg.payload)
                        .chars()
                        .take(200)
                        .collect();
                    warn!(answer = %answer, "central refused a replay request");
                    if self.status.error().is_none() {
                        self.status.set_error(Some(format!(
                            "central refuses this edge's replay requests ({answer}): is the sync key \
                             the same, and this edge declared at central?"
                        )));
                    }
                    return Ok(());
                }
            };
            if batch.ops.is_empty() {
                return Ok(());
            }
            if batch.ops.iter().all(|e| e.seq > from) {
                // The ops after the cursor are no longer in central's op log:
                // only a resync from central's state brings this site up to
                // date (central starts one when it hears this cursor).
                let first = batch.ops.iter().map(|e| e.seq).min().unwrap_or(from);
                let msg = format!(
                    "ops {from} to {} are no longer in central's op log; waiting for a resync                      from central's state",
                    first - 1
                );
                if self.status.error().as_deref() != Some(msg.as_str()) {
                    warn!(from, first, "{msg}");
                    self.status.set_error(Some(msg));
                }
                return Ok(());
            }
            let count = batch.ops.len();
            for env in batch.ops {
                if let Err(stuck) = self.process(env, false).await {
                    let _ = self.flush().await;
                    return Err(stuck);
                }
            }
            self.flush().await?;
            if (count as i64) < REPLAY_LIMIT && self.cursor().await >= batch.last_seq {
                return Ok(());
            }
        }
    }

    /// A live op: applies it if next, acks it again if old; reports a gap.
    async fn live(&self, env: Envelope) -> Result<bool, Stuck> {
        let cursor = self.cursor().await;
        if env.seq > cursor + 1 {
            debug!(seq = env.seq, cursor, "gap: catching up by replay");
            return Ok(true);
        }
        self.process(env, false).await?;
        Ok(false)
    }

    /// A re-drive from central. Never applies an op twice or out of order: an
    /// op with a stored outcome other than `failed` is re-acknowledged; a failed
    /// op is re-applied unless a later op that touches the same entity is applied
    /// here already; an op after the next one is left to arrive in order.
    async fn redo(&self, redo: Redo) -> Result<(), Stuck> {
        let env = redo.op;
        let seq = env.seq;
        let _counted = Counted(&self.status.redriven);
        let op_id = self.open_op(&env)?.op_id;
        let cursor = self.cursor().await;
        let stored = match self.store.outcome(seq).await {
            Ok(o) => o.filter(|o| o.op_id == op_id),
            Err(e) => {
                error!(seq, error = %e, "cannot read a stored outcome; re-drive ignored");
                return Ok(());
            }
        };
        match stored {
            Some(done) if done.outcome != Outcome::Failed.as_str() => {
                info!(seq, outcome = %done.outcome, "re-drive of an op already done here: re-acknowledged, not applied again");
                self.ack_stored(&done).await;
                return Ok(());
            }
            Some(done) => {
                if let Some(later) = redo
                    .unless_applied
                    .filter(|l| seq <= cursor && *l <= cursor)
                {
                    warn!(seq, later, "re-drive refused: a later op touching the same entity is applied here; re-applying could undo it");
                    self.ack_stored(&done).await;
                    return Ok(());
                }
            }
            None if seq == cursor + 1 => {}
            None if seq > cursor + 1 => {
                info!(
                    seq,
                    cursor, "re-drive of an op not reached yet: it is applied in order"
                );
                return Ok(());
            }
            None => {
                warn!(
                    seq,
                    cursor,
                    "re-drive of an op below the cursor with no stored outcome; nothing to do"
                );
                return Ok(());
            }
        }
        info!(seq, "re-drive: applying again");
        self.status.halted.store(false, Ordering::Relaxed);
        match self.process(env, true).await {
            Err(Stuck::Stopping) => Err(Stuck::Stopping),
            _ => Ok(()),
        }
    }

    /// Opens an op envelope; an op that cannot be read blocks the edge (wrong
    /// key, altered data) until it is fixed.
    fn open_op(&self, env: &Envelope) -> Result<OpContent, Stuck> {
        let plain = match self
            .link
            .sealer
            .open(&Envelope::aad(env.seq), &env.enc, &env.data)
        {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("cannot read op {}: {e}", env.seq);
                error!(seq = env.seq, error = %e, "cannot read an op from central; nothing is applied until this is fixed");
                self.status.set_error(Some(msg));
                return Err(Stuck::Blocked);
            }
        };
        match serde_json::from_slice::<OpContent>(&plain) {
            Ok(op) if op.seq == env.seq => Ok(op),
            _ => {
                let msg = format!("op {} is malformed", env.seq);
                error!(seq = env.seq, "malformed op content");
                self.status.set_error(Some(msg));
                Err(Stuck::Blocked)
            }
        }
    }

    async fn process(&self, env: Envelope, directed: bool) -> Result<(), Stuck> {
        if directed {
            // A re-drive is recorded on its own, after what came before it.
            self.flush().await?;
        }
        let cursor = self.cursor().await;
        if env.seq <= cursor && !directed {
            // Already done: acknowledge again, never replay. (Central checks
            // the op ID an ack carries against its own.)
            if let Ok(Some(done)) = self.store.outcome(env.seq).await {
                self.ack_stored(&done).await;
            }
            return Ok(());
        }
        if env.seq > cursor + 1 && !directed {
            return Ok(());
        }
        if self.status.halted.load(Ordering::Relaxed) && !directed {
            return Err(Stuck::Blocked);
        }
        if !self.link.may_apply() {
            // Not this process's turn (see `link`): applied once it is.
            return Err(Stuck::Blocked);
        }
        if self.held() {
            // Applied after the resync, from its fence; a re-drive too.
            return Err(Stuck::Blocked);
        }
        let span = tracing::info_span!(
            "apply",
            seq = env.seq,
            edge = %self.id,
            op_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        crate::telemetry::follow(&span, env.traceparent.as_deref());
        self.apply_in_order(env, cursor, directed)
            .instrument(span)
            .await
    }

    /// Applies the next op (or a directed one), records and acknowledges it.
    async fn apply_in_order(
        &self,
        env: Envelope,
        cursor: i64,
        directed: bool,
    ) -> Result<(), Stuck> {
        let op = self.open_op(&env)?;
        let applier = Applier {
            keystone: &self.keystone,
            store: &self.store,
            pending: &self.pending,
        };
        // Keystone may echo a refused value (a password) in its error text:
        // scrub the op's secrets from every text that leaves this function.
        let secrets = op
            .body
            .as_ref()
            .map(crate::redact::secret_values)
            .unwrap_or_default();
        let scrub = |t: &str| crate::redact::scrub(t, &secrets);
        // An earlier attempt may have reached the site without a record here:
        // the write is then looked for before it is sent again. In order, that
        // is any op in the window after a start or a failed commit; a re-drive
        // (rare, out of order) marks itself in flight, durably, instead.
        let mut attempt = apply::Attempt {
            maybe_sent: if directed {
                matches!(self.store.inflight(op.seq).await, Ok(Some(i)) if i.op_id == op.op_id)
            } else {
                op.seq <= self.uncertain_through.load(Ordering::Relaxed)
            },
            marks: true,
            unmarked: op.seq <= self.unmarked_through,
            after_resync: op.seq <= self.resynced_through.load(Ordering::Relaxed),
        };
        if directed && op.state == "committed" {
            if let Err(e) = self.store.mark_inflight(op.seq, &op.op_id, None).await {
                error!(seq = op.seq, error = %e, "cannot mark an op in flight; not applying it");
                self.status.set_error(Some(format!("edge database: {e}")));
                return Err(Stuck::Blocked);
            }
        }
        // An op that names what an earlier op of the uncommitted batch created
        // waits for that create to be recorded: after a crash, a create is then
        // looked for by what it was sent with, never renamed or changed since.
        let touches_batch = {
            let pending = self.pending();
            !pending.created.is_empty()
                && apply::ids_named(&op)
                    .iter()
                    .any(|id| pending.created.contains(id))
        };
        if touches_batch {
            self.flush().await?;
        }
        // No op is applied (and none looked for) while a write an earlier
        // process, or a resync of this one, sent may still land: it could
        // meet it (a delete answered 404 before the create lands).
        if !self.running_recorded.load(Ordering::Relaxed) {
            if let Err(e) = self.store.set_flag(RUNNING).await {
                self.status.set_error(Some(format!(
                    "edge database: cannot record this process's start: {e}"
                )));
                return Err(Stuck::Blocked);
            }
            self.running_recorded.store(true, Ordering::Relaxed);
        }
        {
            if let Some(until) = self.link.late_writes_until() {
                let wait = until.saturating_duration_since(std::time::Instant::now());
                self.status.set_waiting(Some(format!(
                    "op {}: writes sent without an answer (by an earlier process of this edge, \
                     or by a resync) may still reach the identity service: waiting {}s \
                     (--upstream-settle) before applying more",
                    op.seq,
                    wait.as_secs().max(1)
                )));
                info!(
                    seq = op.seq,
                    wait_ms = wait.as_millis() as u64,
                    "waiting for writes an earlier process may have left"
                );
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::serve::stopped(&mut stop) => {
                        self.status.set_waiting(None);
                        return Err(Stuck::Stopping);
                    }
                }
                self.status.set_waiting(None);
            }
        }
        let started = std::time::Instant::now();
        let mut delays = crate::retry::delays(Duration::from_millis(100), MAX_BACKOFF);
        // Until then, an attempt whose answer never came may still reach the
        // site: nothing is sent again (and nothing after it) before.
        let mut settled_at: Option<std::time::Instant> = None;
        let applied = loop {
            // The ID may have passed to another process meanwhile: nothing
            // is sent after this process's lease ended.
            if !self.link.holds() {
                self.uncertain_through.fetch_max(op.seq, Ordering::Relaxed);
                return Err(Stuck::Blocked);
            }
            let sent = std::time::Instant::now();
            match applier.apply(&op, attempt).await {
                Ok(a) => {
                    self.in_doubt.store(false, Ordering::Relaxed);
                    break a;
                }
                Err(e) => {
                    attempt.maybe_sent = true;
                    if e.in_doubt {
                        settled_at = Some(sent + self.settle);
                        self.in_doubt.store(true, Ordering::Relaxed);
                        self.link.own_write_in_doubt(sent + self.settle);
                    }
                    let backoff = delays.next().unwrap_or(MAX_BACKOFF);
                    let settling = settled_at
                        .map(|at| at.saturating_duration_since(std::time::Instant::now()))
                        .filter(|d| *d > backoff);
                    let wait = settling.unwrap_or(backoff);
                    self.status.retries.fetch_add(1, Ordering::Relaxed);
                    let e = scrub(&e.to_string());
                    let shown = match settling {
                        Some(d) => format!(
                            "op {}: {e}; it may still reach the identity service: waiting {}s \
                             (--upstream-settle) before looking for it and trying again",
                            op.seq,
                            d.as_secs().max(1)
                        ),
                        None => format!("op {}: {e}; retrying", op.seq),
                    };
                    self.status.set_error(Some(shown));
                    warn!(seq = op.seq, error = %e, retry_in_ms = wait.as_millis() as u64, settling = settling.is_some(), "op not applied yet; will retry");
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = crate::serve::stopped(&mut stop) => return Err(Stuck::Stopping),
                    }
                }
            }
        };
        self.status.set_error(None);
        self.metrics
            .apply_duration
            .get_or_create(&crate::metrics::OutcomeLabel {
                outcome: applied.outcome.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        let span = tracing::Span::current();
        span.record("op_id", op.op_id.as_str());
        span.record("outcome", applied.outcome.as_str());
        let applied = apply::Applied {
            detail: applied.detail.as_deref().map(scrub),
            ..applied
        };
        let mut changes = applied.changes;
        let halt = applied.outcome == Outcome::Failed && self.on_failure == OnFailure::Halt;
        changes.advance = !halt && (env.seq == cursor + 1 || env.seq <= cursor);
        let stored = StoredOutcome {
            seq: op.seq,
            op_id: op.op_id.clone(),
            outcome: applied.outcome.as_str().to_string(),
            status: applied.status.map(i64::from),
            detail: applied.detail.clone(),
            edge_ids: applied.edge_ids.clone(),
        };
        let advance = changes.advance;
        let full = {
            let mut pending = self.pending();
            if applied.outcome != Outcome::Failed {
                pending.created.extend(op.created_ids.iter().cloned());
            }
            pending.batch.push(stored, changes);
            pending
                .ops
                .push((op.kind.clone(), tracing::Span::current()));
            pending.batch.len() >= MAX_BATCH
        };
        if advance {
            self.applied_to.fetch_max(op.seq, Ordering::Relaxed);
        }
        if full || directed || halt {
            self.flush().await?;
        }
        if halt {
            let msg = format!(
                "halted after op {} failed (--on-failure halt); retry it from central",
                op.seq
            );
            self.status.set_error(Some(msg));
            self.status.halted.store(true, Ordering::Relaxed);
            return Err(Stuck::Blocked);
        }
        Ok(())
    }

    /// Counts a dropped control message from the broker; logs the first of them
    /// and then every power of two.
    fn rejected(&self, kind: &str, why: Rejected) {
        let n = self.status.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(kind, reason = %why, count = n, "control message dropped");
        }
    }

    async fn ack_stored(&self, done: &StoredOutcome) {
        let span = tracing::info_span!("ack", seq = done.seq, outcome = %done.outcome);
        let payload = self.link.seal(ACK, &ack_of(done));
        let mut headers = async_nats::HeaderMap::new();
        if let Some(tp) = crate::telemetry::traceparent(&span) {
            headers.insert("traceparent", tp.as_str());
        }
        if let Err(e) = self
            .client
            .publish_with_headers(self.subjects.ack(&self.id), headers, payload.into())
            .instrument(span)
            .await
        {
            warn!(seq = done.seq, error = %e, "ack not sent");
        }
    }
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

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts one event when dropped (whichever way the handler returns).
struct Counted<'a>(&'a AtomicU64);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
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

/// The ack that reports a stored outcome.
fn ack_of(done: &StoredOutcome) -> Ack {
    let outcome = match done.outcome.as_str() {
        "applied" => Outcome::Applied,
        "adopted" => Outcome::Adopted,
        "skipped" => Outcome::Skipped,
        _ => Outcome::Failed,
    };
    Ack {
        seq: done.seq,
        op_id: done.op_id.clone(),
        outcome,
        status: done.status.and_then(|s| u16::try_from(s).ok()),
        detail: done.detail.clone(),
        edge_id_created: done.edge_ids.clone(),
    }
}
