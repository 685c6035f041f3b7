//! Central's side of sync: publishes ops in seq order on `<prefix>.ops`, serves
//! replays from the op log, records acks and hellos, marks deliveries that get no
//! ack in time as timed out, and sends directed redos.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tracing::{debug, error, info, warn};

use crate::metrics::Metrics;
use crate::protocol::control::{Receiver, Rejected, Sender};
use crate::protocol::crypto::Sealer;
use crate::protocol::messages::{
    Ack, EntityRef, Envelope, Hello, OpContent, OutcomesReply, OutcomesRequest, Redo, ReplayBatch,
    ReplayRequest, Subjects,
};
use crate::protocol::messages::{ACK, HELLO, OUTCOMES_REPLY, OUTCOMES_REQUEST, REDO, REPLAY};
use crate::store::{OpFilter, OpRow, Store};
use tracing::Instrument;

/// Most ops in one replay batch.
pub const MAX_REPLAY_BATCH: i64 = 500;

pub struct SyncCentral {
    pub store: Store,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub sealer: Arc<Sealer>,
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
    pub control_in: Receiver,
    pub control_out: Sender,
    /// Held while a control message to an edge is sealed and sent.
    pub send_lock: tokio::sync::Mutex<()>,
    pub metrics: Arc<Metrics>,
    /// Told of an edge that needs an initial sync.
    pub wants_resync: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Each edge's boot ID, from its last hello: a new one means it restarted.
    pub boots: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

/// Seals one op for the wire.
pub fn envelope(sealer: &Sealer, op: &OpRow) -> Envelope {
    let content = OpContent {
        seq: op.seq,
        op_id: op.op_id.clone(),
        state: op.state.clone(),
        method: op.method.clone(),
        path: op.path.clone(),
        kind: op.kind.clone(),
        body: op
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok()),
        created_ids: serde_json::from_str(&op.created_ids).unwrap_or_default(),
        refs: serde_json::from_str::<Vec<EntityRef>>(&op.refs).unwrap_or_default(),
    };
    let plain = serde_json::to_vec(&content).expect("an op serializes");
    let (enc, data) = sealer.seal(&Envelope::aad(op.seq), &plain);
    Envelope {
        seq: op.seq,
        enc: enc.to_string(),
        data,
        traceparent: op.traceparent.clone(),
    }
}

impl SyncCentral {
    /// Runs every sync task until `stop` turns true.
    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        for edge in &self.declared_edges {
            self.store.register_edge(edge, true).await?;
        }
        // Edges registered before (declared then, or allowed in) stay known.
        let registered = self.store.edges().await?;
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(registered.into_iter().map(|e| e.id));
        let replay = self.client.subscribe(self.subjects.replay()).await?;
        let acks = self.client.subscribe(self.subjects.ack("*")).await?;
        let hellos = self.client.subscribe(self.subjects.hello("*")).await?;
        let names = ["publisher", "replay server", "ack receiver"];
        let tasks = vec![
            tokio::spawn(self.clone().publish_loop(stop.clone())),
            tokio::spawn(self.clone().replay_loop(replay, stop.clone())),
            tokio::spawn(self.clone().ack_loop(acks, hellos, stop.clone())),
        ];
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

    async fn publish_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut published = match self.store.published_seq().await {
            Ok(seq) => seq,
            Err(e) => {
                error!(error = %e, "cannot read the published position; publishing from the start");
                0
            }
        };
        loop {
            let filter = OpFilter {
                after: published,
                limit: 200,
                kind: None,
                state: None,
            };
            let ops = match self.store.list_ops(&filter).await {
                Ok(ops) => ops,
                Err(e) => {
                    error!(error = %e, "cannot read the op log for publishing");
                    Vec::new()
                }
            };
            if ops.is_empty() {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    // A safety net should a wake-up ever be missed.
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = crate::serve::stopped(&mut stop) => return,
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
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = crate::serve::stopped(&mut stop) => return,
                }
            }
            match self.store.mark_published(last).await {
                Ok(()) => published = last,
                Err(e) => error!(error = %e, "cannot record the published position"),
            }
        }
    }

    async fn publish(&self, op: &OpRow) -> anyhow::Result<()> {
        let span = tracing::info_span!("publish", seq = op.seq, op_id = %op.op_id);
        crate::telemetry::follow(&span, op.traceparent.as_deref());
        let mut env = envelope(&self.sealer, op);
        // The edge's spans follow this one, or the write's when not traced here.
        env.traceparent = crate::telemetry::traceparent(&span).or(env.traceparent);
        let mut headers = HeaderMap::new();
        // A digest of the op ID: unique per op, without showing the ID.
        headers.insert("Nats-Msg-Id", msg_id(&op.op_id).as_str());
        headers.insert("Syncgate-Seq", op.seq.to_string().as_str());
        if let Some(tp) = &env.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        let payload = Bytes::from(serde_json::to_vec(&env)?);
        self.client
            .publish_with_headers(self.subjects.ops(), headers, payload)
            .instrument(span)
            .await?;
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
            let req = match self.control_in.open::<ReplayRequest>(
                &self.sealer,
                REPLAY,
                None,
                &msg.payload,
            ) {
                Ok((edge, req)) => self.admit(&edge).await.map(|()| req),
                Err(r) => Err(r),
            };
            let answer = match req {
                Ok(req) => match self.replay_batch(&req).await {
                    Ok(batch) => serde_json::to_vec(&batch).expect("a batch serializes"),
                    Err(e) => {
                        error!(error = %e, "replay failed");
                        serde_json::to_vec(
                            &serde_json::json!({"error": "the op log could not be read"}),
                        )
                        .unwrap()
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

    async fn replay_batch(&self, req: &ReplayRequest) -> anyhow::Result<ReplayBatch> {
        let limit = req.limit.clamp(1, MAX_REPLAY_BATCH);
        let filter = OpFilter {
            after: req.from_seq.saturating_sub(1).max(0),
            limit,
            kind: None,
            state: None,
        };
        let ops = self.store.list_ops(&filter).await?;
        // Stay well inside the broker's message limit; a batch has at least one op.
        let budget = (self.client.server_info().max_payload / 2).max(64 * 1024);
        let mut size = 0;
        let mut envelopes = Vec::with_capacity(ops.len());
        for op in &ops {
            let env = envelope(&self.sealer, op);
            size += env.data.len() + 128;
            if size > budget && !envelopes.is_empty() {
                break;
            }
            envelopes.push(env);
        }
        self.metrics.ops_replayed.inc_by(envelopes.len() as u64);
        Ok(ReplayBatch {
            ops: envelopes,
            last_seq: self.store.last_seq().await?,
        })
    }

    async fn ack_loop(
        self: Arc<Self>,
        mut acks: async_nats::Subscriber,
        mut hellos: async_nats::Subscriber,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let (msg, is_ack) = tokio::select! {
                m = acks.next() => match m { Some(m) => (m, true), None => return },
                m = hellos.next() => match m { Some(m) => (m, false), None => return },
                _ = crate::serve::stopped(&mut stop) => return,
            };
            let subject_edge = self.subjects.edge_of(msg.subject.as_str());
            let result = if is_ack {
                let ack =
                    self.control_in
                        .open::<Ack>(&self.sealer, ACK, subject_edge, &msg.payload);
                let ack = match ack {
                    Ok((edge, ack)) => self.admit(&edge).await.map(|()| (edge, ack)),
                    Err(r) => Err(r),
                };
                match ack {
                    Ok((edge, ack)) => {
                        debug!(edge = %edge, seq = ack.seq, outcome = ack.outcome.as_str(), "ack");
                        self.metrics
                            .acks
                            .get_or_create(&crate::metrics::AckLabels {
                                edge: edge.clone(),
                                outcome: ack.outcome.as_str(),
                            })
                            .inc();
                        let span = tracing::info_span!(
                            "ack received",
                            edge = %edge,
                            seq = ack.seq,
                            outcome = ack.outcome.as_str(),
                        );
                        let header = msg.headers.as_ref().and_then(|h| h.get("traceparent"));
                        crate::telemetry::follow(&span, header.map(|v| v.as_str()));
                        self.store
                            .record_ack(&edge, &ack)
                            .instrument(span)
                            .await
                            .map(|acked| {
                                // Acks before this one were lost: ask the edge.
                                if let Some(acked) = acked.filter(|a| *a < ack.seq) {
                                    self.recover_outcomes(&edge, acked, ack.seq);
                                }
                            })
                            .map_err(|e| (edge, e))
                    }
                    Err(r) => {
                        self.reject(ACK, subject_edge, r);
                        Ok(())
                    }
                }
            } else {
                let hello =
                    self.control_in
                        .open::<Hello>(&self.sealer, HELLO, subject_edge, &msg.payload);
                let hello = match hello {
                    Ok((edge, h)) if h.edge != edge => Err(Rejected::WrongEdge),
                    Ok((edge, h)) => self.admit(&edge).await.map(|()| (edge, h)),
                    Err(r) => Err(r),
                };
                match hello {
                    Ok((edge, h)) => {
                        self.initial_sync_wanted(&edge, &h).await;
                        if let Some(boot) = &h.boot {
                            self.boots
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(edge.clone(), boot.clone());
                        }
                        self.store
                            .edge_hello(&edge, h.cursor, &h.version, h.error.as_deref())
                            .await
                            .map(|acked| {
                                let through = h.outcomes_through.unwrap_or(h.cursor);
                                if through > acked {
                                    self.recover_outcomes(&edge, acked, through);
                                }
                            })
                            .map_err(|e| (edge, e))
                    }
                    Err(r) => {
                        self.reject(HELLO, subject_edge, r);
                        self.show_key_mismatch(subject_edge, r).await;
                        Ok(())
                    }
                }
            };
            if let Err((edge, e)) = result {
                error!(edge = %edge, error = %e, "cannot record edge state");
            }
        }
    }

    /// An edge that asks for an initial sync, or whose next op is no longer in
    /// the op log (it joins with nothing after ops were pruned, or fell behind
    /// retention), gets one.
    async fn initial_sync_wanted(&self, edge: &str, hello: &Hello) {
        let Some(tx) = &self.wants_resync else { return };
        let wanted = hello.initial_sync
            || matches!(self.store.first_seq().await,
                        Ok(Some(first)) if first > hello.cursor.saturating_add(1));
        if wanted {
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
            return Err(Rejected::UnknownEdge);
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

    /// A declared edge whose hellos cannot be opened most likely has another
    /// sync key: say so on its row (nothing else about it changes).
    async fn show_key_mismatch(&self, edge: Option<&str>, why: Rejected) {
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
        let error = "its messages cannot be opened with the sync key: it has another key, \
                     or they are forged";
        if let Err(e) = self.store.edge_error(edge, error).await {
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
        tokio::spawn(async move {
            let asked_ms = now_ms();
            let req = OutcomesRequest { after, through };
            let answer = {
                let _order = this.send_lock.lock().await;
                let payload = this
                    .control_out
                    .seal(&this.sealer, OUTCOMES_REQUEST, &edge, &req);
                tokio::time::timeout(
                    Duration::from_secs(5),
                    this.client
                        .request(this.subjects.outcomes(&edge), payload.into()),
                )
                .await
            };
            match answer {
                Ok(Ok(msg)) => match this.control_in.open::<OutcomesReply>(
                    &this.sealer,
                    OUTCOMES_REPLY,
                    Some(&edge),
                    &msg.payload,
                ) {
                    Ok((_, reply)) => {
                        let upto = reply.through.min(through);
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
                    Err(r) => this.reject(OUTCOMES_REPLY, Some(&edge), r),
                },
                Ok(Err(e)) => {
                    debug!(edge = %edge, error = %e, "outcomes request failed; will ask again")
                }
                Err(_) => debug!(edge = %edge, "outcomes request timed out; will ask again"),
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
        let state = self
            .store
            .deliveries(op.seq, self.ack_timeout)
            .await
            .map_err(|e| RedriveError::Internal(e.into()))?
            .into_iter()
            .find(|d| d.edge == edge)
            .map(|d| d.state)
            .unwrap_or_else(|| "pending".into());
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
            "failed" => {
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
                    format!("op {} failed at {edge}; the edge applies it again", op.seq),
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
            op: envelope(&self.sealer, op),
            unless_applied,
        };
        {
            // Sealed and sent in one step, so the edge sees them in stamp order.
            let _order = self.send_lock.lock().await;
            let payload = self.control_out.seal(&self.sealer, REDO, edge, &redo);
            self.client
                .publish(self.subjects.redo(edge), payload.into())
                .await
                .map_err(|e| RedriveError::Broker(e.to_string()))?;
        }
        tokio::time::timeout(Duration::from_secs(5), self.client.flush())
            .await
            .map_err(|_| RedriveError::Broker("flush timed out".into()))?
            .map_err(|e| RedriveError::Broker(e.to_string()))?;
        info!(seq = op.seq, edge, action, "re-drive sent");
        Ok(Redriven {
            action,
            state,
            message,
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
    WouldUndo(String),
    #[error("{0}")]
    NotReached(String),
    #[error("the re-drive could not be sent to the broker: {0}")]
    Broker(String),
    #[error("{0}")]
    Internal(anyhow::Error),
}

/// The `Nats-Msg-Id` of an op: the first 16 bytes of SHA-256 of its ID, in hex.
pub fn msg_id(op_id: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, op_id.as_bytes()).as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
