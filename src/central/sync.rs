//! Central's side of sync: publishes ops in seq order on `<prefix>.ops`, serves
//! replays from the op log, records acks and hellos, marks deliveries that get no
//! ack in time as timed out, and sends directed redos. Each hello is answered
//! with a grant (see `edge::link`): one process at a time holds an edge's ID,
//! and only its acks and answers are taken; a process whose cursor went back
//! (a lost or restored database) is resynced before it applies ops again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::protocol::control::{now_ms, Opened, Rejected, Session};
use crate::protocol::crypto::Sealer;
use crate::protocol::messages::{
    Ack, Envelope, Grant, Hello, HelloReply, OutcomesReply, OutcomesRequest, Redo, ReplayBatch,
    ReplayRequest, Skip, Subjects,
};
use crate::protocol::messages::{
    ACK, HELLO, HELLO_REPLY, OUTCOMES_REPLY, OUTCOMES_REQUEST, REDO, REPLAY, SKIP,
};
use crate::store::{OpFilter, OpRow, Store, StoreError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

/// Most ops in one replay batch.
pub const MAX_REPLAY_BATCH: i64 = 500;

pub struct SyncCentral {
    pub store: Store,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub sealer: Arc<Sealer>,
    /// The edges with a scope: their scopes and edge keys.
    pub scoped: Arc<super::scoped::Scoped>,
    /// Woken by capture when an op is logged.
    pub wake: Arc<Notify>,
    pub ack_timeout: Duration,
    pub declared_edges: Vec<String>,
    /// Edges whose outcomes are being recovered right now.
    pub recovering: std::sync::Mutex<HashSet<String>>,
    /// Register an edge that says hello without being declared.
    pub allow_new_edges: bool,
    /// Edges declared or registered.
    pub known: std::sync::Mutex<HashSet<String>>,
    /// Central's end of the control plane (this start's session).
    pub session: Session,
    /// Held while a control message to an edge is sealed and sent.
    pub send_lock: tokio::sync::Mutex<()>,
    pub metrics: Arc<Metrics>,
    /// Told of an edge that needs an initial sync.
    pub wants_resync: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Spawns this central's tasks (they end with it).
    pub spawner: crate::scope::Spawner,
    /// The process holding each edge's ID, as far as central knows.
    pub holders: std::sync::Mutex<HashMap<String, Holder>>,
    /// When this process started (a holder from before has a lease's grace).
    pub started: Instant,
    /// How often the op log is looked at for ops with no wake-up: ops
    /// captured by other replicas (PostgreSQL) wake nobody here.
    pub poll: Duration,
    /// Whether `run` answers replays too; where several replicas run, each
    /// answers them (`serve_replays`) and the leader's sync does not.
    pub serves_replays: bool,
    /// The edges' answers to central's requests (`ask`): the leader's sync
    /// only (one that only answers replays asks nothing, and reads none).
    pub replies: Option<Replies>,
}

/// What an edge answered one of central's requests, or why it did not.
type Answer = Result<async_nats::Message, String>;

/// The edges' answers to central's requests, each awaited by the token its
/// inbox ends with. One subscription below central's inbox, made when this
/// central's sync is built (its interest reaches every broker of a cluster
/// and its leaf nodes before the first request) and read by `run`.
pub struct Replies {
    /// Set once `run` ended: nothing reads answers any more, so nothing is
    /// asked (a task of an ended leader's term fails at once, never holding
    /// an edge up until its timeout).
    closed: std::sync::atomic::AtomicBool,
    /// Each awaited answer's token: the edge asked, and who waits.
    waiting: std::sync::Mutex<HashMap<String, (String, tokio::sync::oneshot::Sender<Answer>)>>,
    /// The subscription, until `run` reads it.
    inbox: std::sync::Mutex<Option<async_nats::Subscriber>>,
    /// Central's inbox and a dot: what every answer's subject starts with.
    prefix: String,
}

impl Replies {
    pub async fn subscribe(
        client: &async_nats::Client,
        subjects: &Subjects,
    ) -> Result<Replies, async_nats::SubscribeError> {
        let prefix = format!("{}.", subjects.central_inbox());
        let inbox = client.subscribe(format!("{prefix}*.*")).await?;
        Ok(Replies {
            closed: Default::default(),
            waiting: Default::default(),
            inbox: std::sync::Mutex::new(Some(inbox)),
            prefix,
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, tokio::sync::oneshot::Sender<Answer>)>>
    {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Awaits the answer `edge` sends under `token`; None once closed.
    fn expect(&self, edge: &str, token: &str) -> Option<tokio::sync::oneshot::Receiver<Answer>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut waiting = self.lock();
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        waiting.insert(token.to_string(), (edge.to_string(), tx));
        Some(rx)
    }

    /// No answer is read any more: the subscription goes, and whoever waits
    /// hears so at once.
    fn close(&self) {
        let mut waiting = self.lock();
        self.closed.store(true, Ordering::Release);
        waiting.clear();
        drop(waiting);
        self.inbox.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Hands an answer to whoever awaits it. One under another edge's part
    /// of the inbox than the one asked, or that nobody awaits (late, or never
    /// asked), is dropped.
    fn deliver(&self, msg: async_nats::Message) {
        let Some((edge, token)) = msg
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.split_once('.'))
        else {
            return;
        };
        let mut waiting = self.lock();
        if waiting.get(token).is_none_or(|(asked, _)| asked != edge) {
            debug!(edge, "an answer nobody awaits; dropped");
            return;
        }
        let Some((_, tx)) = waiting.remove(token) else {
            return;
        };
        drop(waiting);
        let answer = if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            Err("no edge process listens".to_string())
        } else {
            Ok(msg)
        };
        let _ = tx.send(answer);
    }
}

/// Closes a sync's `Replies` however its `run` ends.
struct CloseReplies(Arc<SyncCentral>);

impl Drop for CloseReplies {
    fn drop(&mut self) {
        if let Some(replies) = &self.0.replies {
            replies.close();
        }
    }
}

/// Stops awaiting an answer however `ask` ends.
struct Forget<'a>(&'a Replies, &'a str);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(self.1);
    }
}

/// The queue group replay requests are answered in: one replica answers each.
const REPLAY_QUEUE: &str = "syncgate-central-replay";

/// The process that holds an edge's ID: only its acks and answers are taken.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Its session (0: an edge of protocol 1, which has none).
    pub session: u64,
    pub protocol: u8,
    /// When it was last heard from.
    pub heard: Instant,
    /// Its lease: another process may take the ID this long after it was heard.
    pub lease: Duration,
    /// Another live process that asked for the ID, and when.
    pub rival: Option<(u64, Instant)>,
    /// How many times it had connected to the broker when last heard (see
    /// `Hello::connects`; none from an edge that does not say).
    pub connects: Option<u64>,
    /// How many of central's requests it was handling when last heard.
    pub asks_in_hand: Option<u32>,
}

/// What the last hello of an edge's holder said of its link.
struct EdgeLink {
    session: u64,
    connects: Option<u64>,
    in_hand: Option<u32>,
    heard: Instant,
}

/// How long central waits for an answer after a broken broker connection,
/// once the edge says it has no request in hand, before it takes the request
/// or its answer as lost.
const LOST_AFTER: Duration = Duration::from_secs(1);

/// The lease assumed for a holder from before central started, until it says hello.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);
/// A skew of an edge's clock from central's worth a warning.
const SKEW_WARNING_MS: i64 = 60_000;

/// Why a message to an edge could not be asked or answered.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("edge '{0}' has not said hello since central started (is it running?)")]
    NotConnected(String),
    #[error("edge '{edge}' did not answer: {why}")]
    NoAnswer { edge: String, why: String },
    #[error("edge '{0}' restarted while asked")]
    Restarted(String),
    /// The request or its answer may be lost: asking again is safe.
    #[error("the broker connection to edge '{edge}' broke while it was asked: {why}")]
    Broken { edge: String, why: &'static str },
    #[error("the answer of edge '{edge}' was dropped: {why}")]
    Dropped { edge: String, why: Rejected },
}

/// What an edge's row says while two processes run with its ID.
fn two_processes(edge: &str) -> String {
    format!("two processes run with --id {edge}: the second one waits; stop one of them")
}

pub use super::scoped::envelope;

impl SyncCentral {
    /// Runs every sync task until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        // However this ends, no answer is read after it (see `Replies`).
        let _close = CloseReplies(self.clone());
        // The op log may refuse writes for now (a full disk): the proxy goes
        // on serving reads meanwhile, and this is tried again.
        let mut delays = crate::retry::delays(Duration::from_millis(200), Duration::from_secs(10));
        let sessions = loop {
            match self.start_up().await {
                Ok(sessions) => break sessions,
                Err(e) => {
                    let wait = delays.next().unwrap_or(Duration::from_secs(10));
                    error!(error = %e, retry_in_ms = wait.as_millis() as u64, "sync cannot start: the op log refuses its writes");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = crate::serve::stopped(&mut stop) => return Ok(()),
                    }
                }
            }
        };
        {
            let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
            for s in sessions.into_iter().filter(|s| s.session > 0) {
                // The lease it asked for, from when central started.
                let lease = s.lease_ms.map_or(DEFAULT_LEASE, Duration::from_millis);
                holders.insert(
                    s.edge,
                    Holder {
                        session: s.session,
                        protocol: 2,
                        heard: self.started,
                        lease,
                        rival: None,
                        connects: None,
                        asks_in_hand: None,
                    },
                );
            }
        }
        let acks = self.client.subscribe(self.subjects.ack("*")).await?;
        let hellos = self.client.subscribe(self.subjects.hello("*")).await?;
        let answers = self
            .replies
            .as_ref()
            .and_then(|r| r.inbox.lock().unwrap_or_else(|p| p.into_inner()).take())
            .ok_or_else(|| {
                anyhow::anyhow!("this central's sync runs once, and only where it leads")
            })?;
        let mut names = vec!["publisher", "ack receiver", "answer receiver"];
        let mut tasks = vec![
            self.spawner.spawn(self.clone().publish_loop(stop.clone())),
            self.spawner
                .spawn(self.clone().ack_loop(acks, hellos, stop.clone())),
            self.spawner
                .spawn(self.clone().answer_loop(answers, stop.clone())),
        ];
        if self.serves_replays {
            let replay = self
                .client
                .queue_subscribe(self.subjects.replay(), REPLAY_QUEUE.into())
                .await?;
            names.push("replay server");
            tasks.push(
                self.spawner
                    .spawn(self.clone().replay_loop(replay, stop.clone())),
            );
        }
        info!(prefix = %self.subjects.ops(), edges = ?self.declared_edges, "sync publishing");
        // Each loop runs until stop; one that ends before is a failure of sync.
        let (first, index, rest) = futures_util::future::select_all(tasks).await;
        let early = !*stop.borrow();
        for task in rest {
            if early {
                task.abort();
            }
            let _ = task.await;
        }
        // The broker may be stopping too: never wait long for it.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        if early {
            let how = if first.is_err() { "panicked" } else { "ended" };
            anyhow::bail!("the sync {} {how}", names[index]);
        }
        Ok(())
    }

    /// Hands the edges' answers to central's requests to those who asked,
    /// until `stop`.
    async fn answer_loop(
        self: Arc<Self>,
        mut answers: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                msg = answers.next() => match msg {
                    Some(msg) => {
                        if let Some(replies) = &self.replies {
                            replies.deliver(msg);
                        }
                    }
                    None => return,
                },
                _ = crate::serve::stopped(&mut stop) => return,
            }
        }
    }

    /// Answers replay requests only (a replica that does not lead, or the
    /// leader beside its duties), until `stop`: they only read the op log.
    pub async fn serve_replays(self: Arc<Self>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let registered = self.store.edges().await?;
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(registered.into_iter().map(|e| e.id));
        let replay = self
            .client
            .queue_subscribe(self.subjects.replay(), REPLAY_QUEUE.into())
            .await?;
        info!("answering replay requests");
        self.replay_loop(replay, stop).await;
        Ok(())
    }

    /// Registers the declared edges and learns the registered ones; returns
    /// each edge's holder session.
    async fn start_up(&self) -> Result<Vec<crate::store::EdgeSession>, StoreError> {
        for edge in &self.declared_edges {
            self.store.register_edge(edge, true).await?;
        }
        // Edges registered before (declared then, or allowed in) stay known.
        let registered = self.store.edges().await?;
        // A scope changed since central last served it: that edge is resynced.
        let scopes = self.scoped.texts();
        for e in &registered {
            let scope = scopes.get(&e.id).map(String::as_str);
            if self.store.set_edge_scope(&e.id, scope).await? {
                warn!(
                    edge = %e.id,
                    from = e.scope.as_deref().unwrap_or("all"),
                    to = scope.unwrap_or("all"),
                    "an edge's scope changed: it is resynced"
                );
            }
        }
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(registered.into_iter().map(|e| e.id));
        self.store.edge_sessions().await
    }

    async fn publish_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut published = match self.store.published_seq().await {
            Ok(seq) => seq,
            Err(e) => {
                error!(error = %e, "cannot read the published position; publishing from the start");
                0
            }
        };
        // The position is where a new leader (or this one, restarted)
        // publishes from: one recorded late only publishes again what edges
        // acknowledge again without applying it (at or below their cursor).
        // So it is recorded at most every `RECORD_PUBLISHED` while ops flow,
        // and whenever the loop has nothing to publish or stops, rather than
        // costing a transaction per round.
        let mut recorded = Recorded {
            seq: published,
            at: tokio::time::Instant::now(),
        };
        loop {
            // An op whose unknown outcome is being resolved waits, and every
            // op after it (edges apply in seq order).
            let through = match self.store.publishable_through().await {
                Ok(t) => t,
                Err(e) => {
                    error!(error = %e, "cannot read the op log for publishing");
                    published
                }
            };
            let filter = OpFilter {
                after: published,
                limit: 200,
                kind: None,
                state: None,
                through: Some(through),
            };
            let ops = match self.store.list_ops(&filter).await {
                Ok(ops) => ops,
                Err(e) => {
                    error!(error = %e, "cannot read the op log for publishing");
                    Vec::new()
                }
            };
            if ops.is_empty() {
                // Waits for ops, recording the position once it is due.
                let due = recorded.at + RECORD_PUBLISHED;
                let pending = recorded.seq < published;
                tokio::select! {
                    _ = self.wake.notified() => {}
                    // Ops of other replicas, and a safety net should a
                    // wake-up ever be missed.
                    _ = tokio::time::sleep(self.poll) => {}
                    _ = tokio::time::sleep_until(due), if pending => {
                        self.record_published(&mut recorded, published).await;
                    }
                    _ = crate::serve::stopped(&mut stop) => {
                        self.record_published(&mut recorded, published).await;
                        return;
                    }
                }
                continue;
            }
            let mut last = published;
            for op in &ops {
                if let Err(e) = self.publish(op).await {
                    warn!(seq = op.seq, error = %e, "publish failed; edges will replay it");
                    break;
                }
                last = op.seq;
            }
            if last == published {
                self.record_published(&mut recorded, published).await;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = crate::serve::stopped(&mut stop) => return,
                }
            }
            published = last;
            if recorded.at.elapsed() >= RECORD_PUBLISHED {
                self.record_published(&mut recorded, published).await;
            }
            if *stop.borrow() {
                self.record_published(&mut recorded, published).await;
                return;
            }
        }
    }

    /// Records the published position `seq` if it is past the one recorded.
    async fn record_published(&self, recorded: &mut Recorded, seq: i64) {
        if seq <= recorded.seq {
            return;
        }
        match self.store.mark_published(seq).await {
            Ok(()) => {
                *recorded = Recorded {
                    seq,
                    at: tokio::time::Instant::now(),
                }
            }
            Err(e) => {
                // Tried again once due again, not at once.
                recorded.at = tokio::time::Instant::now();
                error!(error = %e, "cannot record the published position");
            }
        }
    }

    async fn publish(&self, op: &OpRow) -> anyhow::Result<()> {
        // Read before anything is sent: an op log that cannot say what the
        // op touches sends it to no one yet (it is tried again).
        let domains = match self.scoped.is_empty() {
            true => None,
            false => Some(super::scoped::domains_of(&self.store, op).await?),
        };
        let span = tracing::info_span!("publish", seq = op.seq, op_id = %op.op_id);
        crate::telemetry::follow(&span, op.traceparent.as_deref());
        let mut env = envelope(&self.sealer, op);
        // The edge's spans follow this one, or the write's when not traced here.
        env.traceparent = crate::telemetry::traceparent(&span).or(env.traceparent);
        let headers = |traceparent: Option<&str>| {
            let mut headers = HeaderMap::new();
            // A digest of the op ID: unique per op, without showing the ID.
            headers.insert("Nats-Msg-Id", msg_id(&op.op_id).as_str());
            headers.insert("Syncgate-Seq", op.seq.to_string().as_str());
            if let Some(tp) = traceparent {
                headers.insert("traceparent", tp);
            }
            headers
        };
        let payload = Bytes::from(serde_json::to_vec(&env)?);
        self.client
            .publish_with_headers(
                self.subjects.ops(),
                headers(env.traceparent.as_deref()),
                payload,
            )
            .instrument(span.clone())
            .await?;
        if let Some(domains) = &domains {
            // Each edge with a scope: its own stream, sealed with its key (a
            // marker carries no trace: it is nothing of the write).
            for (edge, scoped) in self.scoped.sorted() {
                let mut own = super::scoped::envelope_for(scoped, op, domains);
                if own.traceparent.is_some() {
                    own.traceparent.clone_from(&env.traceparent);
                }
                let payload = Bytes::from(serde_json::to_vec(&own)?);
                self.client
                    .publish_with_headers(
                        self.subjects.ops_for(edge),
                        headers(own.traceparent.as_deref()),
                        payload,
                    )
                    .instrument(span.clone())
                    .await?;
            }
        }
        self.metrics.ops_published.inc();
        debug!(seq = op.seq, op_id = %op.op_id, "op published");
        Ok(())
    }

    async fn replay_loop(
        self: Arc<Self>,
        mut requests: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let msg = tokio::select! {
                m = requests.next() => match m { Some(m) => m, None => return },
                _ = crate::serve::stopped(&mut stop) => return,
            };
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            // A replay only reads the op log: any session of a known edge
            // may ask (a process waiting for the ID reads nothing it can apply).
            let req = match self.session.open::<ReplayRequest>(
                self.sealer_of(None, &msg.payload),
                REPLAY,
                None,
                &msg.payload,
                true,
            ) {
                Ok(o) => self.admit(&o.edge).await.map(|()| (o.edge, o.msg)),
                Err(r) => Err(r),
            };
            let answer = match req {
                Ok((edge, req)) => match self.replay_batch(&edge, &req).await {
                    Ok(batch) => serde_json::to_vec(&batch).expect("a batch serializes"),
                    Err(e) => {
                        error!(edge = %edge, error = %e, "replay failed");
                        // Refused for a reason the edge's operator should see;
                        // anything else is the op log's, said generically.
                        let said = match e.downcast_ref::<ScopeMismatch>() {
                            Some(m) => m.to_string(),
                            None => "the op log could not be read".into(),
                        };
                        serde_json::to_vec(&serde_json::json!({ "error": said })).unwrap()
                    }
                },
                Err(r) => {
                    // Said plainly, so a misconfigured edge does not wait for
                    // its timeout; nothing in it is a secret.
                    self.reject(REPLAY, None, r);
                    serde_json::to_vec(&serde_json::json!({
                        "error": format!("replay request refused: {}", r.label())
                    }))
                    .expect("an error serializes")
                }
            };
            if let Err(e) = self.client.publish(reply, answer.into()).await {
                warn!(error = %e, "cannot answer a replay request");
            }
        }
    }

    async fn replay_batch(&self, edge: &str, req: &ReplayRequest) -> anyhow::Result<ReplayBatch> {
        // Replicas that answer replays serve the scope the leader recorded
        // or none: one configured otherwise (a rolling change of a scope)
        // could send an edge what its scope no longer holds.
        let recorded = self.store.edge_scope(edge).await?.flatten();
        let mine = self.scoped.get(edge).map(|s| s.scope.to_string());
        if recorded != mine {
            return Err(ScopeMismatch {
                edge: edge.to_string(),
                here: mine.unwrap_or_else(|| "all".into()),
                recorded: recorded.unwrap_or_else(|| "all".into()),
            }
            .into());
        }
        let limit = req.limit.clamp(1, MAX_REPLAY_BATCH);
        let through = self.store.publishable_through().await?;
        let filter = OpFilter {
            after: req.from_seq.saturating_sub(1).max(0),
            limit,
            kind: None,
            state: None,
            through: Some(through),
        };
        let ops = self.store.list_ops(&filter).await?;
        // Stay well inside the broker's message limit; a batch has at least one op.
        let budget = (self.client.server_info().max_payload / 2).max(64 * 1024);
        let mut size = 0;
        let mut envelopes = Vec::with_capacity(ops.len());
        for op in &ops {
            let env = self.envelope_for(edge, op).await?;
            size += env.data.len() + 128;
            if size > budget && !envelopes.is_empty() {
                break;
            }
            envelopes.push(env);
        }
        self.metrics.ops_replayed.inc_by(envelopes.len() as u64);
        Ok(ReplayBatch {
            ops: envelopes,
            last_seq: through,
        })
    }

    async fn ack_loop(
        self: Arc<Self>,
        mut acks: async_nats::Subscriber,
        mut hellos: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                m = acks.next() => match m {
                    Some(m) => self.ack(m).await,
                    None => return,
                },
                m = hellos.next() => match m {
                    Some(m) => self.hello(m).await,
                    None => return,
                },
                _ = crate::serve::stopped(&mut stop) => return,
            }
        }
    }

    /// Takes a control message of `kind` from an edge: sealed, fresh, from a
    /// known edge, and (protocol 2) from the process holding its ID.
    fn check_holder<T>(&self, opened: &Opened<T>) -> Result<(), Rejected> {
        let holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        match holders.get(&opened.edge) {
            Some(h) if opened.protocol >= 2 && h.session == opened.from => Ok(()),
            Some(h) if opened.protocol < 2 && h.protocol < 2 => Ok(()),
            None if opened.protocol < 2 => Ok(()),
            _ => Err(Rejected::Fenced),
        }
    }

    async fn ack(self: &Arc<Self>, msg: async_nats::Message) {
        let subject_edge = self.subjects.edge_of(msg.subject.as_str());
        let opened = match self.session.open::<Ack>(
            self.sealer_of(subject_edge, &msg.payload),
            ACK,
            subject_edge,
            &msg.payload,
            false,
        ) {
            Ok(o) => o,
            Err(r) => return self.reject(ACK, subject_edge, r),
        };
        if let Err(r) = self.admit(&opened.edge).await {
            return self.reject(ACK, subject_edge, r);
        }
        if let Err(r) = self.check_holder(&opened) {
            return self.reject(ACK, subject_edge, r);
        }
        let (edge, mut ack) = (opened.edge, opened.msg);
        self.check_out_of_scope(&edge, &mut ack).await;
        debug!(edge = %edge, seq = ack.seq, outcome = ack.state(), "ack");
        self.metrics
            .acks
            .get_or_create(&crate::metrics::AckLabels {
                edge: edge.clone(),
                outcome: ack.state(),
            })
            .inc();
        let span = tracing::info_span!(
            "ack received",
            edge = %edge,
            seq = ack.seq,
            outcome = ack.state(),
        );
        let header = msg.headers.as_ref().and_then(|h| h.get("traceparent"));
        crate::telemetry::follow(&span, header.map(|v| v.as_str()));
        match self.store.record_ack(&edge, &ack).instrument(span).await {
            // Acks before this one were lost: ask the edge.
            Ok(Some(acked)) if acked < ack.seq => self.recover_outcomes(&edge, acked, ack.seq),
            Ok(_) => {}
            Err(e) => error!(edge = %edge, error = %e, "cannot record an ack"),
        }
    }

    async fn hello(self: &Arc<Self>, msg: async_nats::Message) {
        let subject_edge = self.subjects.edge_of(msg.subject.as_str());
        let reply_to = msg.reply.clone();
        let refuse = |why: Rejected| async move {
            // Said plainly, so a misconfigured edge need not guess; nothing
            // in it is a secret.
            if let Some(reply) = reply_to {
                let text = serde_json::json!({"error": format!("hello refused: {}", why.label())});
                let _ = self.client.publish(reply, text.to_string().into()).await;
            }
        };
        let opened = match self.session.open::<Hello>(
            self.sealer_of(subject_edge, &msg.payload),
            HELLO,
            subject_edge,
            &msg.payload,
            true,
        ) {
            Ok(o) if o.msg.edge != o.edge => Err(Rejected::WrongEdge),
            Ok(o) => match self.admit(&o.edge).await {
                Ok(()) => Ok(o),
                Err(r) => Err(r),
            },
            Err(r) => Err(r),
        };
        let opened = match opened {
            Ok(o) => o,
            Err(r) => {
                self.reject(HELLO, subject_edge, r);
                self.show_key_mismatch(subject_edge, r, &msg.payload).await;
                return refuse(r).await;
            }
        };
        if opened.protocol < 2 {
            return self.hello_v1(opened).await;
        }
        let Some(reply) = msg.reply.clone() else {
            return;
        };
        let grant = if opened.addressed {
            self.grant(&opened).await
        } else {
            Grant::Introduce
        };
        let warning = self.rival_warning(&opened.edge, opened.from);
        let answer = HelloReply {
            grant,
            now_ms: now_ms(),
            warning,
        };
        let payload = {
            let _order = self.send_lock.lock().await;
            self.session.seal(
                self.sealer_for(&opened.edge),
                HELLO_REPLY,
                &opened.edge,
                opened.from,
                &answer,
            )
        };
        if let Err(e) = self.client.publish(reply, payload.into()).await {
            debug!(edge = %opened.edge, error = %e, "hello not answered");
        }
    }

    /// A hello of protocol 1 (an edge of 0.1.0): no grant, no answer; its
    /// state is recorded as that version did.
    async fn hello_v1(self: &Arc<Self>, opened: Opened<Hello>) {
        let (edge, h) = (opened.edge, opened.msg);
        {
            let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
            let legacy = holders.get(&edge).is_none_or(|x| x.protocol < 2);
            if !legacy {
                drop(holders);
                return self.reject(HELLO, Some(&edge), Rejected::Fenced);
            }
            holders.insert(
                edge.clone(),
                Holder {
                    session: 0,
                    protocol: 1,
                    heard: Instant::now(),
                    lease: DEFAULT_LEASE,
                    rival: None,
                    connects: None,
                    asks_in_hand: None,
                },
            );
        }
        if let Err(e) = self.initial_sync_wanted(&edge, &h).await {
            error!(edge = %edge, error = %e, "cannot read where the op log starts");
        }
        match self
            .store
            .edge_hello(&edge, h.cursor, &h.version, h.error.as_deref(), None)
            .await
        {
            Ok(acked) => {
                let through = h.outcomes_through.unwrap_or(h.cursor);
                if through > acked {
                    self.recover_outcomes(&edge, acked, through);
                }
            }
            Err(e) => error!(edge = %edge, error = %e, "cannot record edge state"),
        }
    }

    /// Decides what the process behind an addressed hello may do, records
    /// what it says, and starts what it needs (a resync, lost acks).
    async fn grant(self: &Arc<Self>, opened: &Opened<Hello>) -> Grant {
        let (edge, h, from) = (&opened.edge, &opened.msg, opened.from);
        let lease = Duration::from_millis(h.lease_ms.unwrap_or(30_000))
            .clamp(Duration::from_secs(1), Duration::from_secs(600));
        let now = Instant::now();
        /// What the table of holders says, decided under its lock.
        enum Seen {
            Holder,
            Taken,
            Stopping,
            Older,
            Rival { first: bool, heard: f64 },
        }
        let seen = {
            let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
            match holders.get_mut(edge) {
                Some(holder) if holder.session == from => {
                    holder.heard = now;
                    holder.lease = lease;
                    holder.protocol = 2;
                    // Hellos may be handled out of order: the count only grows.
                    holder.connects = holder.connects.max(h.connects);
                    holder.asks_in_hand = h.asks_in_hand;
                    if h.leaving {
                        // Stopping: the ID is free at once.
                        holders.remove(edge);
                        Seen::Stopping
                    } else {
                        Seen::Holder
                    }
                }
                Some(holder)
                    if from < holder.session && now.duration_since(holder.heard) < holder.lease =>
                {
                    Seen::Older
                }
                Some(holder)
                    if holder.protocol >= 2 && now.duration_since(holder.heard) < holder.lease =>
                {
                    let first = holder.rival.is_none_or(|(s, _)| s != from);
                    holder.rival = Some((from, now));
                    Seen::Rival {
                        first,
                        heard: now.duration_since(holder.heard).as_secs_f64(),
                    }
                }
                _ if h.leaving => Seen::Stopping,
                _ => {
                    holders.insert(
                        edge.clone(),
                        Holder {
                            session: from,
                            protocol: 2,
                            heard: now,
                            lease,
                            rival: None,
                            connects: h.connects,
                            asks_in_hand: h.asks_in_hand,
                        },
                    );
                    Seen::Taken
                }
            }
        };
        let takeover = match seen {
            Seen::Holder => false,
            Seen::Taken => true,
            Seen::Stopping => {
                info!(edge = %edge, "edge process stopping; its ID is free");
                return Grant::Wait {
                    reason: "this process is stopping".into(),
                };
            }
            Seen::Older => {
                return Grant::Superseded {
                    reason: format!(
                        "a newer process with --id {edge} holds this edge's ID at central; this \
                         one applies nothing while that one lives: stop one of them"
                    ),
                };
            }
            Seen::Rival { first, heard } => {
                if first {
                    warn!(edge = %edge, "a second process with this edge's ID said hello; it waits");
                    let _ = self.store.edge_error(edge, &two_processes(edge)).await;
                }
                return Grant::Wait {
                    reason: format!(
                        "another process with --id {edge} is running (central heard from it \
                         {heard:.1}s ago): this one applies nothing while that one lives. Two \
                         processes must never share an edge ID"
                    ),
                };
            }
        };
        // Until it is granted, a store error makes this process a stranger
        // again: its next hello is a takeover, checked afresh (a holder's
        // hello skips the checks below).
        let unreadable = || {
            self.forget_holder(edge, from);
            Grant::Wait {
                reason: "central cannot read or write its op log right now".into(),
            }
        };
        let acked = match self.store.edge_position(edge).await {
            Ok(p) => p.map_or(0, |(acked, _)| acked),
            Err(e) => {
                error!(edge = %edge, error = %e, "cannot read an edge's position");
                return unreadable();
            }
        };
        // Another process, on another database, held the ID before this
        // one: what it sent may still reach the site.
        let mut earlier_holder = false;
        if takeover {
            info!(edge = %edge, session = from, cursor = h.cursor, "edge process holds its ID");
            let why = "a process on another database than the last holder's took this edge's \
                       ID (a second process, or a lost or replaced volume): it is resynced \
                       from central's state instead of replaying ops its site may hold";
            let (before, before_session) = match self
                .store
                .hold_edge(
                    edge,
                    from,
                    h.protocol.unwrap_or(2).max(2),
                    h.database.as_deref(),
                    lease,
                    why,
                )
                .await
            {
                Ok(before) => before,
                Err(e) => {
                    error!(edge = %edge, error = %e, "cannot record an edge's session");
                    return unreadable();
                }
            };
            let other_database = matches!((&before, &h.database), (Some(b), Some(d)) if b != d);
            // On this process's own database, its record of how the last
            // process stopped says whether to wait; on another, it cannot.
            earlier_holder = other_database && before_session.is_some_and(|s| s != 0 && s != from);
            if other_database {
                // Marked for a resync by `hold_edge`, with the database.
                warn!(edge = %edge, "edge process on another database; resyncing it");
            } else if h.cursor < acked {
                let why = format!(
                    "its cursor went back from {acked} to {}: its database was lost or restored \
                     from an older copy; it is resynced from central's state instead of \
                     replaying ops it applied already",
                    h.cursor
                );
                warn!(edge = %edge, acked, cursor = h.cursor, "edge state lost; resyncing it");
                if let Err(e) = self.store.set_needs_resync(edge, Some(&why)).await {
                    error!(edge = %edge, error = %e, "cannot record that an edge needs a resync");
                    return unreadable();
                }
            }
        }
        // What the op log cannot say is never taken for "nothing": an edge
        // granted on a guess could replay what it applied, or skip a resync.
        let last = match self.store.last_seq().await {
            Ok(last) => last,
            Err(e) => {
                error!(edge = %edge, error = %e, "cannot read the op log's last seq");
                return unreadable();
            }
        };
        if h.cursor > last {
            let reason = format!(
                "this edge's cursor ({}) is past central's op log (last op {last}): central's op \
                 log was lost or restored from an older copy. Nothing is applied here until an \
                 operator restores the op log or resets this edge",
                h.cursor
            );
            let _ = self.store.edge_error(edge, &reason).await;
            return Grant::Refused { reason };
        }
        let skew = opened.sent_ms - now_ms();
        if skew.abs() > SKEW_WARNING_MS && takeover {
            warn!(edge = %edge, skew_ms = skew, "an edge's clock is off central's: check NTP at that site");
        }
        // While a second process with this ID lives, the row says so (the
        // holder's hellos do not clear it).
        let error = h
            .error
            .clone()
            .or_else(|| self.rival_alive(edge, from).then(|| two_processes(edge)));
        match self
            .store
            .edge_hello(edge, h.cursor, &h.version, error.as_deref(), Some(skew))
            .await
        {
            Ok(acked) => {
                let through = h.outcomes_through.unwrap_or(h.cursor);
                if through > acked && h.cursor >= acked {
                    self.recover_outcomes(edge, acked, through);
                }
            }
            Err(e) => error!(edge = %edge, error = %e, "cannot record edge state"),
        }
        let lease_ms = lease.as_millis() as u64;
        let needs = match self.store.edge_needs_resync(edge).await {
            Ok(needs) => needs,
            Err(e) => {
                error!(edge = %edge, error = %e, "cannot read whether an edge needs a resync");
                return unreadable();
            }
        };
        if let Some(reason) = needs {
            self.want_resync(edge);
            return Grant::Resync {
                lease_ms,
                reason,
                earlier_holder: true,
            };
        }
        let initial = match self.initial_sync_wanted(edge, h).await {
            Ok(wanted) => wanted,
            Err(e) => {
                error!(edge = %edge, error = %e, "cannot read where the op log starts");
                return unreadable();
            }
        };
        if initial {
            return Grant::Resync {
                lease_ms,
                reason: "an initial sync from central's state comes first".into(),
                earlier_holder: false,
            };
        }
        Grant::Granted {
            lease_ms,
            earlier_holder,
        }
    }

    /// What the holder of an edge's ID should hear of a rival process.
    /// Whether a second process with this edge's ID, refused while `from`
    /// holds it, was heard within the holder's lease (it still runs).
    fn rival_alive(&self, edge: &str, from: u64) -> bool {
        let holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        holders.get(edge).is_some_and(|h| {
            h.session == from
                && h.rival
                    .is_some_and(|(s, at)| s != from && at.elapsed() < h.lease)
        })
    }

    fn rival_warning(&self, edge: &str, from: u64) -> Option<String> {
        let holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        let h = holders.get(edge)?;
        let (_, at) = h.rival.filter(|(s, _)| *s != from && h.session == from)?;
        (at.elapsed() < Duration::from_secs(3600)).then(|| {
            format!(
                "another process with --id {edge} asked central for this edge's ID {:.0}s ago \
                 and was refused: two processes must never share an edge ID",
                at.elapsed().as_secs_f64()
            )
        })
    }

    /// Whether a process holding the edge's ID was heard from within its
    /// lease (a drift round skips an edge that is not).
    pub fn connected(&self, edge: &str) -> bool {
        self.holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .is_some_and(|h| h.heard.elapsed() < h.lease)
    }

    /// The session of the process holding an edge's ID, to address it.
    pub fn edge_session(&self, edge: &str) -> Result<u64, AskError> {
        self.edge_link(edge).map(|l| l.session)
    }

    /// What the last hello of the process holding an edge's ID said of its
    /// link: its session, how many times it had connected to the broker, how
    /// many requests it had in hand, and when it was heard.
    fn edge_link(&self, edge: &str) -> Result<EdgeLink, AskError> {
        self.holders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(edge)
            .map(|h| EdgeLink {
                session: h.session,
                connects: h.connects,
                in_hand: h.asks_in_hand,
                heard: h.heard,
            })
            .ok_or_else(|| AskError::NotConnected(edge.to_string()))
    }

    /// How many times this process has connected to the broker.
    fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    /// Seals `msg` for the process holding `edge`'s ID and publishes it.
    pub async fn tell<T: Serialize>(
        &self,
        edge: &str,
        subject: String,
        kind: &'static str,
        msg: &T,
    ) -> Result<(), AskError> {
        let to = self.edge_session(edge)?;
        // Sealed and sent in one step, so the edge sees them in counter order.
        let _order = self.send_lock.lock().await;
        let payload = self
            .session
            .seal(self.sealer_for(edge), kind, edge, to, msg);
        self.client
            .publish(subject, payload.into())
            .await
            .map_err(|e| AskError::NoAnswer {
                edge: edge.to_string(),
                why: e.to_string(),
            })
    }

    /// Seals `msg` for the process holding `edge`'s ID, asks it on `subject`,
    /// and opens its answer (of `reply_kind`, from that process). An edge that
    /// restarts meanwhile never answers: that is said at once.
    pub async fn ask<T: Serialize, R: DeserializeOwned>(
        &self,
        edge: &str,
        subject: String,
        kind: &'static str,
        reply_kind: &'static str,
        msg: &T,
        timeout: Duration,
    ) -> Result<R, AskError> {
        let first = self.edge_link(edge)?;
        let to = first.session;
        let own_connects = self.connects();
        // Answered below this edge's own part of central's inbox, under a
        // token no one can guess (see `Replies`).
        let no_answer = |why: String| AskError::NoAnswer {
            edge: edge.to_string(),
            why,
        };
        let Some(replies) = &self.replies else {
            return Err(no_answer(
                "this central does not lead: it asks edges nothing".into(),
            ));
        };
        let token = uuid::Uuid::new_v4().simple().to_string();
        let answered = replies.expect(edge, &token).ok_or_else(|| {
            no_answer("this central's sync has stopped (its leader's term ended)".into())
        })?;
        let _forget = Forget(replies, &token);
        let inbox = self.subjects.central_inbox_for(edge, &token);
        {
            // Sealed and sent in one step, so the edge sees them in counter order.
            let _order = self.send_lock.lock().await;
            let payload = self
                .session
                .seal(self.sealer_for(edge), kind, edge, to, msg);
            self.client
                .publish_with_reply(subject, inbox, payload.into())
                .await
                .map_err(|e| no_answer(e.to_string()))?;
        }
        let asked = async {
            match tokio::time::timeout(timeout, answered).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err("central's reply receiver stopped".to_string()),
                Err(_) => Err("not in time".to_string()),
            }
        };
        // Core NATS keeps nothing across a broken connection: a request or
        // answer in flight then may be lost, and waiting out the timeout
        // would hold up whatever asked (a resync holds the edge's op stream).
        // Once either side reconnected, the edge's next hello says whether it
        // still has a request in hand (its answer will come); with none in
        // hand and no answer soon after, the request or the answer was lost.
        let broken = async {
            // What broke, and which hellos speak of the edge after it.
            let mut broke: Option<(&'static str, Option<Instant>)> = None;
            let mut idle_since: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Ok(now) = self.edge_link(edge) else {
                    return AskError::Restarted(edge.to_string());
                };
                if now.session != to {
                    return AskError::Restarted(edge.to_string());
                }
                if broke.is_none() {
                    broke = if self.connects() != own_connects {
                        // A hello heard before now may predate the reconnect.
                        Some(("central reconnected to the broker", Some(Instant::now())))
                    } else if matches!((first.connects, now.connects),
                                       (Some(a), Some(b)) if a != b)
                    {
                        // The hello that says so was sent after it.
                        Some(("the edge reconnected to the broker", None))
                    } else {
                        None
                    };
                }
                let Some((why, after)) = broke else { continue };
                let since_then = after.is_none_or(|at| now.heard >= at);
                let idle = match now.in_hand {
                    // An edge that does not say: taken as lost.
                    None => true,
                    Some(n) => since_then && n == 0,
                };
                if !idle {
                    idle_since = None;
                    continue;
                }
                // An answer sent just before that hello may still be on its way.
                if idle_since.get_or_insert_with(Instant::now).elapsed() >= LOST_AFTER {
                    return AskError::Broken {
                        edge: edge.to_string(),
                        why,
                    };
                }
            }
        };
        let answer = tokio::select! {
            a = asked => a.map_err(no_answer)?,
            e = broken => return Err(e),
        };
        let dropped = |why| AskError::Dropped {
            edge: edge.to_string(),
            why,
        };
        let opened = self
            .session
            .open::<R>(
                self.sealer_for(edge),
                reply_kind,
                Some(edge),
                &answer.payload,
                false,
            )
            .map_err(dropped)?;
        if opened.protocol >= 2 && opened.from != to {
            return Err(dropped(Rejected::Fenced));
        }
        Ok(opened.msg)
    }

    /// An edge that asks for an initial sync, or whose next op is no longer in
    /// the op log (it joins with nothing after ops were pruned, or fell behind
    /// retention), gets one.
    async fn initial_sync_wanted(
        &self,
        edge: &str,
        hello: &Hello,
    ) -> Result<bool, crate::store::StoreError> {
        let wanted = hello.initial_sync
            || matches!(self.store.first_seq().await?,
                        Some(first) if first > hello.cursor.saturating_add(1));
        if wanted {
            self.want_resync(edge);
        }
        Ok(wanted)
    }

    /// Forgets that `session` holds `edge` (a hello not granted after all).
    fn forget_holder(&self, edge: &str, session: u64) {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        if holders.get(edge).is_some_and(|h| h.session == session) {
            holders.remove(edge);
        }
    }

    /// Asks for an automatic resync of an edge (at most one a minute).
    fn want_resync(&self, edge: &str) {
        if let Some(tx) = &self.wants_resync {
            let _ = tx.send(edge.to_string());
        }
    }

    /// Lets an edge in: declared with `--edges`, registered before, or new and
    /// allowed by `--allow-new-edges`. Registration is one row; nothing waits on it.
    async fn admit(&self, edge: &str) -> Result<(), Rejected> {
        if self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(edge)
        {
            return Ok(());
        }
        if !self.allow_new_edges {
            // Registered since this process learned the edges (by another
            // replica, or a leader before it)?
            return match self.store.edge_position(edge).await {
                Ok(Some(_)) => {
                    self.known
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(edge.to_string());
                    Ok(())
                }
                Ok(None) => Err(Rejected::UnknownEdge),
                Err(e) => {
                    // Not known to be unknown: the op log could not say.
                    error!(edge, error = %e, "cannot read whether an edge is registered");
                    Err(Rejected::UnknownEdge)
                }
            };
        }
        match self.store.register_edge(edge, false).await {
            Ok(_) => {
                info!(edge, "edge registered");
                self.known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(edge.to_string());
                Ok(())
            }
            Err(e) => {
                error!(edge, error = %e, "cannot register an edge");
                Err(Rejected::UnknownEdge)
            }
        }
    }

    /// An `out_of_scope` ack not to be believed (see `not_out_of_scope`),
    /// live or recovered, is taken as failed, with the reason.
    async fn check_out_of_scope(&self, edge: &str, ack: &mut Ack) {
        if ack.outcome != crate::protocol::messages::Outcome::OutOfScope {
            return;
        }
        if let Some(why) = self.not_out_of_scope(edge, ack.seq).await {
            warn!(edge = %edge, seq = ack.seq, "{why}");
            ack.outcome = crate::protocol::messages::Outcome::Failed;
            ack.detail = Some(why);
        }
    }

    /// Why an edge's `out_of_scope` ack for `seq` is not to be believed (it
    /// would hide a failure): the edge has no scope, or the op is in it, or
    /// that cannot be told now (a re-drive settles it).
    async fn not_out_of_scope(&self, edge: &str, seq: i64) -> Option<String> {
        let Some(scoped) = self.scoped.get(edge) else {
            return Some(format!(
                "acknowledged op {seq} out_of_scope, but this edge has no scope here: \
                 recorded failed"
            ));
        };
        let unchecked = |e: &dyn std::fmt::Display| {
            Some(format!(
                "acknowledged op {seq} out_of_scope, which could not be checked against the \
                 op log ({e}): recorded failed, a re-drive settles it"
            ))
        };
        let op = match self.store.get_op(seq).await {
            Ok(Some(op)) => op,
            // Pruned by retention: nothing left to deliver.
            Ok(None) => return None,
            Err(e) => return unchecked(&e),
        };
        match super::scoped::domains_of(&self.store, &op).await {
            Ok(d) if super::scoped::carries(scoped, &op, &d) => Some(format!(
                "acknowledged op {seq} out_of_scope, but it is in this edge's scope \
                 ({}): recorded failed",
                scoped.scope
            )),
            Ok(_) => None,
            Err(e) => unchecked(&e),
        }
    }

    /// The keys `edge`'s messages are sealed with: its edge key when it has
    /// a scope, else the sync key.
    pub fn sealer_for(&self, edge: &str) -> &Sealer {
        self.scoped.get(edge).map_or(&*self.sealer, |s| &s.sealer)
    }

    /// The keys to open a control message with: those of the edge its
    /// subject names, else of the edge it says it is from (its binding to
    /// that edge is checked when it is opened).
    fn sealer_of(&self, subject_edge: Option<&str>, payload: &[u8]) -> &Sealer {
        #[derive(serde::Deserialize)]
        struct From {
            edge: String,
        }
        match subject_edge {
            Some(edge) => self.sealer_for(edge),
            None => match serde_json::from_slice::<From>(payload) {
                Ok(from) => self.sealer_for(&from.edge),
                Err(_) => &self.sealer,
            },
        }
    }

    /// What `edge` receives for `op`: the op sealed with the sync key, or,
    /// for an edge with a scope, with its edge key or as a marker.
    async fn envelope_for(&self, edge: &str, op: &OpRow) -> Result<Envelope, StoreError> {
        match self.scoped.get(edge) {
            None => Ok(envelope(&self.sealer, op)),
            Some(scoped) => {
                let domains = super::scoped::domains_of(&self.store, op).await?;
                Ok(super::scoped::envelope_for(scoped, op, &domains))
            }
        }
    }

    /// A declared edge whose hellos cannot be opened most likely has another
    /// sync key: say so on its row (nothing else about it changes).
    async fn show_key_mismatch(&self, edge: Option<&str>, why: Rejected, hello: &[u8]) {
        let Some(edge) = edge.filter(|_| why == Rejected::Forged) else {
            return;
        };
        if !self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(edge)
        {
            return;
        }
        // The other kind of key than central expects from it: said so.
        let scoped = self.scoped.get(edge).is_some();
        let derived = match scoped {
            true => None,
            false => self.sealer.for_edge(edge).ok(),
        };
        let other: Option<&Sealer> = match scoped {
            true => Some(&self.sealer),
            false => derived.as_ref(),
        };
        let holds_other =
            other.is_some_and(|k| crate::protocol::control::opens_with(k, HELLO, hello));
        let error = match (holds_other, scoped) {
            (true, true) => format!(
                "it holds the sync key, but has a scope here (--edge-scope): give it its edge \
                 key (`syncgate keygen --edge {edge}`)"
            ),
            (true, false) => "it holds an edge key, but has no scope here: give it the sync \
                              key, or give it a scope with --edge-scope"
                .to_string(),
            (false, _) => "its messages cannot be opened with the sync key: it has another key, \
                           or they are forged"
                .to_string(),
        };
        if let Err(e) = self.store.edge_error(edge, &error).await {
            error!(edge, error = %e, "cannot record an edge's error");
        }
    }

    /// Counts a dropped control message; logs the first of each reason and then
    /// every power of two, so a flood cannot flood the log.
    fn reject(&self, kind: &str, edge: Option<&str>, why: Rejected) {
        let n = self.metrics.control_rejected(why);
        if n.is_power_of_two() {
            warn!(kind, edge = edge.unwrap_or("-"), reason = %why, count = n, "control message dropped");
        }
    }

    /// Asks an edge for its outcomes in `(after, through]` (acks central never
    /// heard), on a task of its own, one request per edge at a time.
    fn recover_outcomes(self: &Arc<Self>, edge: &str, after: i64, through: i64) {
        {
            let mut busy = self.recovering.lock().unwrap_or_else(|p| p.into_inner());
            if !busy.insert(edge.to_string()) {
                return;
            }
        }
        let this = self.clone();
        let edge = edge.to_string();
        self.spawner.spawn(async move {
            // By the op log's clock, which dates the exceptions it compares with.
            let asked_ms = this.store.now_ms().await.unwrap_or_else(|_| now_ms());
            let req = OutcomesRequest { after, through };
            let answer = this
                .ask::<_, OutcomesReply>(
                    &edge,
                    this.subjects.outcomes(&edge),
                    OUTCOMES_REQUEST,
                    OUTCOMES_REPLY,
                    &req,
                    Duration::from_secs(5),
                )
                .await;
            match answer {
                Ok(mut reply) => {
                    let upto = reply.through.min(through);
                    for ack in reply.exceptions.iter_mut() {
                        this.check_out_of_scope(&edge, ack).await;
                    }
                    match this
                        .store
                        .record_outcomes(&edge, after, upto, &reply.exceptions, asked_ms)
                        .await
                    {
                        Ok(()) => info!(
                            edge = %edge,
                            after,
                            through = upto,
                            exceptions = reply.exceptions.len(),
                            "outcomes recovered from the edge"
                        ),
                        Err(e) => {
                            error!(edge = %edge, error = %e, "cannot record recovered outcomes")
                        }
                    }
                }
                Err(AskError::Dropped { why, .. }) => this.reject(OUTCOMES_REPLY, Some(&edge), why),
                Err(e) => {
                    debug!(edge = %edge, error = %e, "outcomes not recovered; will ask again")
                }
            }
            this.recovering
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&edge);
        });
    }

    /// Re-drives one op at one edge (`POST /v1/ops/{seq}/retry`). Never applies
    /// an op twice or out of order: an op the edge applied is re-acknowledged from
    /// its stored outcome; a failed op is re-applied only while no later op that
    /// touches the same entity is applied there; an op the edge has not reached
    /// is left to arrive in order.
    pub async fn redrive(&self, op: &OpRow, edge: &str) -> Result<Redriven, RedriveError> {
        let (_, cursor) = self
            .store
            .edge_position(edge)
            .await
            .map_err(|e| RedriveError::Internal(e.into()))?
            .ok_or_else(|| RedriveError::NoEdge(edge.to_string()))?;
        let state = self.delivery_state(op.seq, edge).await?;
        let mut unless_applied = None;
        let (action, message) = match state.as_str() {
            "applied" | "adopted" | "skipped" => (
                "reacknowledge",
                format!(
                    "op {} is already {state} at {edge}: the edge re-acknowledges its stored \
                     outcome and applies nothing again",
                    op.seq
                ),
            ),
            "failed" | "operator_skipped" => {
                let later = self
                    .store
                    .next_conflicting(op.seq)
                    .await
                    .map_err(|e| RedriveError::Internal(e.into()))?;
                if let Some((l, method, path)) = &later {
                    if *l <= cursor {
                        return Err(RedriveError::WouldUndo(format!(
                            "op {l} ({method} {path}) touches what op {} touches and is already \
                             applied at {edge}; re-applying op {} now could undo it. Make the \
                             intended change again through the gateway instead",
                            op.seq, op.seq
                        )));
                    }
                }
                unless_applied = later.map(|(l, _, _)| l);
                (
                    "reapply",
                    format!(
                        "op {} is {state} at {edge}; the edge applies it again",
                        op.seq
                    ),
                )
            }
            _ if op.seq > cursor.saturating_add(1) => {
                return Err(RedriveError::NotReached(format!(
                    "{edge} has not reached op {} yet (its cursor is {cursor}); it applies ops \
                     in seq order and will apply this one after the ones before it",
                    op.seq
                )))
            }
            _ => (
                "resend",
                format!(
                    "op {} is {state} at {edge}; the edge applies it if it has not, or \
                     re-acknowledges its stored outcome",
                    op.seq
                ),
            ),
        };
        let redo = Redo {
            op: self
                .envelope_for(edge, op)
                .await
                .map_err(|e| RedriveError::Internal(e.into()))?,
            unless_applied,
        };
        self.direct(edge, self.subjects.redo(edge), REDO, &redo)
            .await?;
        info!(seq = op.seq, edge, action, "re-drive sent");
        Ok(Redriven {
            action,
            state,
            message,
        })
    }
}

impl SyncCentral {
    /// The state of op `seq`'s delivery to `edge` (`pending` with no record).
    async fn delivery_state(&self, seq: i64, edge: &str) -> Result<String, RedriveError> {
        Ok(self
            .store
            .deliveries(seq, self.ack_timeout)
            .await
            .map_err(|e| RedriveError::Internal(e.into()))?
            .into_iter()
            .find(|d| d.edge == edge)
            .map_or_else(|| "pending".into(), |d| d.state))
    }

    /// Sends one directed message (a re-drive, a skip) to `edge` and sees it
    /// leave for the broker.
    async fn direct<T: Serialize>(
        &self,
        edge: &str,
        subject: String,
        kind: &'static str,
        msg: &T,
    ) -> Result<(), RedriveError> {
        self.tell(edge, subject, kind, msg)
            .await
            .map_err(|e| match e {
                AskError::NotConnected(_) => RedriveError::NotConnected(e.to_string()),
                e => RedriveError::Broker(e.to_string()),
            })?;
        tokio::time::timeout(Duration::from_secs(5), self.client.flush())
            .await
            .map_err(|_| RedriveError::Broker("flush timed out".into()))?
            .map_err(|e| RedriveError::Broker(e.to_string()))
    }

    /// Has `edge` pass over one op at an operator's request (`POST
    /// /v1/ops/{seq}/skip`): the op it is stuck on (the one after its cursor:
    /// retried, or halted on its failure), or one that failed there. Only an
    /// edge of protocol 3 takes it; the edge records the op
    /// `operator_skipped` with `by` and the time, and acknowledges it so.
    pub async fn skip(&self, op: &OpRow, edge: &str, by: &str) -> Result<Redriven, RedriveError> {
        let row = self
            .store
            .edge(edge)
            .await
            .map_err(|e| RedriveError::Internal(e.into()))?
            .ok_or_else(|| RedriveError::NoEdge(edge.to_string()))?;
        let protocol = row.protocol.unwrap_or(1);
        if protocol < 3 {
            return Err(RedriveError::Refused(format!(
                "{edge} speaks protocol {protocol} (syncgate {}), which cannot skip an op: \
                 upgrade it, or fix what fails and re-drive the op (POST /v1/ops/{}/retry)",
                row.version.as_deref().unwrap_or("of an older release"),
                op.seq
            )));
        }
        let state = self.delivery_state(op.seq, edge).await?;
        let cursor = row.cursor;
        match state.as_str() {
            "applied" | "adopted" | "skipped" | "operator_skipped" => {
                return Err(RedriveError::Refused(format!(
                    "op {} is already {state} at {edge}: nothing to skip",
                    op.seq
                )))
            }
            "failed" => {}
            _ if op.seq > cursor.saturating_add(1) => {
                return Err(RedriveError::NotReached(format!(
                    "{edge} has not reached op {} yet (its cursor is {cursor}): only the op it \
                     is on (op {}) or one that failed there can be skipped",
                    op.seq,
                    cursor.saturating_add(1)
                )))
            }
            _ => {}
        }
        let skip = Skip {
            op: self
                .envelope_for(edge, op)
                .await
                .map_err(|e| RedriveError::Internal(e.into()))?,
            by: by.to_string(),
            at_ms: now_ms(),
        };
        self.direct(edge, self.subjects.skip(edge), SKIP, &skip)
            .await?;
        info!(seq = op.seq, edge, by, "skip sent");
        Ok(Redriven {
            action: "skip",
            state,
            message: format!(
                "{edge} passes over op {} and records it operator_skipped (by {by}); the \
                 site may now differ from central: run a drift audit, then a repair",
                op.seq
            ),
        })
    }
}

/// What a re-drive did.
#[derive(Debug)]
pub struct Redriven {
    /// `reacknowledge`, `reapply` or `resend`.
    pub action: &'static str,
    /// The delivery's state when it was re-driven.
    pub state: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("no edge '{0}'")]
    NoEdge(String),
    #[error("{0}")]
    NotConnected(String),
    #[error("{0}")]
    WouldUndo(String),
    #[error("{0}")]
    NotReached(String),
    /// A skip the edge cannot take, or one with nothing to skip.
    #[error("{0}")]
    Refused(String),
    #[error("the re-drive could not be sent to the broker: {0}")]
    Broker(String),
    #[error("{0}")]
    Internal(anyhow::Error),
}

/// A replica whose `--edge-scope` for an edge is not the one the leader
/// recorded: it answers that edge's replays with this, not with ops.
#[derive(Debug, thiserror::Error)]
#[error(
    "edge {edge}'s scope on this central replica ({here}) is not the one on record \
     ({recorded}): every central replica needs the same --edge-scope"
)]
pub struct ScopeMismatch {
    edge: String,
    here: String,
    recorded: String,
}

/// The `Nats-Msg-Id` of an op: the first 16 bytes of SHA-256 of its ID, in hex.
pub fn msg_id(op_id: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, op_id.as_bytes()).as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How often, at most, the publisher records its position while ops flow.
const RECORD_PUBLISHED: Duration = Duration::from_millis(250);

/// The published position last recorded, and when.
struct Recorded {
    seq: i64,
    at: tokio::time::Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies() -> Replies {
        Replies {
            closed: Default::default(),
            waiting: Default::default(),
            inbox: std::sync::Mutex::new(None),
            prefix: "syncgate.inbox.central.".into(),
        }
    }

    fn answer(subject: &str) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: bytes::Bytes::from_static(b"answer"),
            headers: None,
            status: None,
            description: None,
            length: 6,
        }
    }

    #[tokio::test]
    async fn an_answer_reaches_only_who_asked_that_edge_under_that_token() {
        let replies = replies();
        let mut asked = replies.expect("e1", "t1").expect("open");
        // Another edge's part of the inbox, an unknown token, a foreign subject.
        replies.deliver(answer("syncgate.inbox.central.e2.t1"));
        replies.deliver(answer("syncgate.inbox.central.e1.t2"));
        replies.deliver(answer("other.inbox.central.e1.t1"));
        assert!(
            asked.try_recv().is_err(),
            "nothing for the one who asked yet"
        );
        replies.deliver(answer("syncgate.inbox.central.e1.t1"));
        let got = asked.await.expect("answered").expect("an answer");
        assert_eq!(&got.payload[..], b"answer");
        assert!(replies.lock().is_empty(), "an answered token is forgotten");
    }

    #[tokio::test]
    async fn once_closed_whoever_waits_hears_at_once_and_nothing_more_is_asked() {
        let replies = replies();
        let waiting = replies.expect("e1", "t1").expect("open");
        replies.close();
        // The one waiting is told now, not at its timeout.
        assert!(
            waiting.await.is_err(),
            "a closed sync's waiters are dropped"
        );
        assert!(
            replies.expect("e1", "t2").is_none(),
            "nothing is asked once closed"
        );
        // A late answer finds nobody and is dropped.
        replies.deliver(answer("syncgate.inbox.central.e1.t1"));
        assert!(replies.lock().is_empty());
    }
}
