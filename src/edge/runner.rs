//! The edge's runner: applies ops strictly in seq order (live, caught up by
//! replay, re-driven), batches their commits, and acknowledges each one.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::apply::Applier;
use super::link::Link;
use crate::keystone::client::KeystoneClient;
use crate::metrics::Metrics;
use crate::protocol::control::Rejected;
use crate::protocol::messages::{
    Ack, Envelope, OpContent, Outcome, Redo, ReplayBatch, ReplayRequest, Skip, Subjects, ACK,
    REPLAY,
};
use crate::settings::config::OnFailure;
use crate::store::edge::{Batch, EdgeStore, StoredOutcome};
use tracing::Instrument;

use super::{Status, Stuck, MAX_BATCH, RUNNING};

/// Ops asked for per replay request.
const REPLAY_LIMIT: i64 = 256;
/// How long a replay request may take. The run loop waits for it, so it is
/// short: a request lost with a broken connection must not hold up acks,
/// answers to central or live ops for long.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait between retries of an op that failed transiently.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What applies ops, shared by the edge's tasks (live ops, catch-up,
/// re-drives, resync steps).
pub(super) struct Runner {
    /// Resync ops whose last try may still reach the site (no answer in
    /// time), with when that can no longer happen: tried again, they are
    /// looked for first, and not before then.
    pub(super) resync_doubt: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The op being applied had a try whose answer never came.
    pub(super) in_doubt: AtomicBool,
    /// This process's start is recorded (`RUNNING`): ops may be applied.
    pub(super) running_recorded: AtomicBool,
    pub(super) id: String,
    pub(super) client: async_nats::Client,
    pub(super) subjects: Subjects,
    pub(super) store: EdgeStore,
    pub(super) keystone: Arc<KeystoneClient>,
    /// The session with central: sealing, opening, the grant to apply.
    pub(super) link: Arc<Link>,
    pub(super) status: Arc<Status>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) on_failure: OnFailure,
    /// Tries of an op the site answers with a server error of its own while
    /// it answers other requests, before it is recorded failed.
    pub(super) max_attempts: u32,
    pub(super) skips: Arc<Skips>,
    pub(super) stop: watch::Receiver<bool>,
    /// Ops applied at the site and not yet committed here, with what the
    /// commit will record.
    pub(super) pending: std::sync::Mutex<Pending>,
    /// The last op applied in order, committed or pending (the cursor is the
    /// last committed one).
    pub(super) applied_to: AtomicI64,
    /// Ops up to here may have reached the site without a record here (those
    /// after the cursor at start, or in a batch whose commit failed).
    pub(super) uncertain_through: AtomicI64,
    /// While a resync applies central's state, no op from the stream is
    /// applied (until this time, renewed by each of its steps).
    pub(super) hold_until: Mutex<Option<std::time::Instant>>,
    /// Ops up to here may have been attempted by a version that did not mark
    /// creates in flight with their look-alikes.
    pub(super) unmarked_through: i64,
    /// How long an attempt whose answer never came may still reach the site.
    pub(super) settle: Duration,
    /// Ops up to here come after the last resync's fence, whose state was read
    /// after them (see `super::apply::Attempt::after_resync`).
    pub(super) resynced_through: AtomicI64,
}

/// Operator skips from central (`messages::Skip`), by seq: queued by a task
/// of their own, so that one reaches the op being retried, and taken by the
/// op's apply (or by the run loop, for an op halted on or failed before).
#[derive(Default)]
pub(super) struct Skips {
    queued: Mutex<std::collections::BTreeMap<i64, Skip>>,
    /// A skip was queued.
    pub(super) arrived: tokio::sync::Notify,
}

impl Skips {
    /// Skips kept at most (only central sends them, sealed; one per op).
    const MAX: usize = 1024;

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<i64, Skip>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn queue(&self, skip: Skip) {
        self.put_back(skip);
        self.arrived.notify_one();
    }

    /// Keeps a skip for the op's apply, waking no one.
    fn put_back(&self, skip: Skip) {
        let mut q = self.lock();
        if q.len() >= Self::MAX {
            q.pop_first();
        }
        q.insert(skip.op.seq, skip);
    }

    fn has(&self, seq: i64) -> bool {
        self.lock().contains_key(&seq)
    }

    fn take(&self, seq: i64) -> Option<Skip> {
        self.lock().remove(&seq)
    }

    fn seqs(&self) -> Vec<i64> {
        self.lock().keys().copied().collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// The ops of the batch being built, and what their acks need.
#[derive(Default)]
pub(crate) struct Pending {
    pub(crate) batch: Batch,
    /// Per op (in `batch.outcomes` order): its kind and its `apply` span.
    pub(super) ops: Vec<(String, tracing::Span)>,
    /// The central IDs ops of the batch created.
    pub(super) created: std::collections::HashSet<String>,
}

impl Runner {
    /// Whether no write this process sent may still be on its way.
    pub(super) fn nothing_in_doubt(&self) -> bool {
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
    pub(super) async fn cursor(&self) -> i64 {
        self.applied_to.load(Ordering::Relaxed)
    }

    pub(super) fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits the ops applied since the last commit in one transaction, then
    /// acknowledges them. An ack never leaves before its outcome is durable.
    pub(super) async fn flush(&self) -> Result<(), Stuck> {
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
            } else if stored.outcome == Outcome::OperatorSkipped.as_str() {
                // Counted, and logged, when it was passed over.
            } else {
                self.status.applied.fetch_add(1, Ordering::Relaxed);
                info!(parent: &span, seq = stored.seq, op_id = %stored.op_id, %kind, outcome = %stored.outcome, "op applied");
            }
            self.ack_stored(stored).instrument(span).await;
        }
        Ok(())
    }

    /// Asks central for every op after the cursor and applies them in order.
    pub(super) async fn catch_up(&self) -> Result<(), Stuck> {
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
                    "ops {from} to {} are no longer in central's op log; waiting for a resync from central's state",
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
    pub(super) async fn live(&self, env: Envelope) -> Result<bool, Stuck> {
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
    pub(super) async fn redo(&self, redo: Redo) -> Result<(), Stuck> {
        let env = redo.op;
        let seq = env.seq;
        let _counted = Counted(&self.status.redriven);
        // The operator's later word: a skip of this op not taken yet goes.
        if self.skips.take(seq).is_some() {
            info!(
                seq,
                "a re-drive replaces a skip of the same op not taken yet"
            );
        }
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
            Some(done)
                if done.outcome != Outcome::Failed.as_str()
                    && done.outcome != Outcome::OperatorSkipped.as_str() =>
            {
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

    /// The operator's skip of `op`, if one is queued (one for another op
    /// under this seq, from before a resync, is dropped).
    fn skip_for(&self, op: &OpContent) -> Option<Skip> {
        let skip = self.skips.take(op.seq)?;
        match self.open_op(&skip.op) {
            Ok(named) if named.op_id == op.op_id => Some(skip),
            _ => {
                warn!(
                    seq = op.seq,
                    "a skip names another op under this seq; dropped"
                );
                None
            }
        }
    }

    /// Takes the queued skips the run loop can act on: of the op after the
    /// cursor (halted on, or not received yet: passed over when it is), or
    /// of one that failed here. An op done here is re-acknowledged as it is.
    pub(super) async fn skips_queued(&self) -> Result<(), Stuck> {
        for seq in self.skips.seqs() {
            let cursor = self.cursor().await;
            if seq > cursor + 1 {
                // Not reached (central asks only for the op an edge is on, as
                // far as it knows): dropped, never applied to an op untried.
                self.skips.take(seq);
                warn!(
                    seq,
                    cursor,
                    "a skip of an op this edge has not reached: dropped (skip the op it is on)"
                );
                continue;
            }
            let Some(skip) = self.skips.take(seq) else {
                continue;
            };
            let op_id = self.open_op(&skip.op)?.op_id;
            let stored = match self.store.outcome(seq).await {
                Ok(o) => o.filter(|o| o.op_id == op_id),
                Err(e) => {
                    error!(seq, error = %e, "cannot read a stored outcome; skip ignored");
                    continue;
                }
            };
            match stored {
                Some(done) if done.outcome != Outcome::Failed.as_str() => {
                    info!(seq, outcome = %done.outcome, "skip of an op done here: re-acknowledged as it is");
                    self.ack_stored(&done).await;
                    continue;
                }
                // Failed here: halted on it, or passed it (--on-failure continue).
                Some(_) => {}
                None if seq == cursor + 1 => {
                    if !self.status.halted.load(Ordering::Relaxed) {
                        // Not received yet, or between tries: taken when applied.
                        self.skips.put_back(skip);
                        continue;
                    }
                }
                None => {
                    warn!(
                        seq,
                        cursor,
                        "skip of an op below the cursor with no stored outcome; nothing to do"
                    );
                    continue;
                }
            }
            let env = skip.op.clone();
            self.skips.put_back(skip);
            info!(seq, "operator skip: recording the op passed over");
            self.status.halted.store(false, Ordering::Relaxed);
            if let Err(Stuck::Stopping) = self.process(env, true).await {
                return Err(Stuck::Stopping);
            }
        }
        Ok(())
    }

    /// Opens an op envelope; an op that cannot be read blocks the edge (wrong
    /// key, altered data) until it is fixed.
    pub(super) fn open_op(&self, env: &Envelope) -> Result<OpContent, Stuck> {
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

    pub(super) async fn process(&self, env: Envelope, directed: bool) -> Result<(), Stuck> {
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
    pub(super) async fn apply_in_order(
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
        let mut attempt = super::apply::Attempt {
            maybe_sent: if directed {
                matches!(self.store.inflight(op.seq).await, Ok(Some(i)) if i.op_id == op.op_id)
            } else {
                op.seq <= self.uncertain_through.load(Ordering::Relaxed)
            },
            marks: true,
            unmarked: op.seq <= self.unmarked_through,
            after_resync: op.seq <= self.resynced_through.load(Ordering::Relaxed),
            without_kept_id: false,
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
                && super::apply::ids_named(&op)
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
        // Server errors to this op while the site answered other requests.
        let mut refused: u32 = 0;
        // The last error of this op, for a skip's record.
        let mut last_error: Option<String> = None;
        let mut others_skipped = false;
        let applied = loop {
            // The ID may have passed to another process meanwhile: nothing
            // is sent after this process's lease ended.
            if !self.link.holds() {
                self.uncertain_through.fetch_max(op.seq, Ordering::Relaxed);
                return Err(Stuck::Blocked);
            }
            if let Some(skip) = self.skip_for(&op) {
                break passed_over(&skip, last_error.as_deref());
            }
            let sent = std::time::Instant::now();
            match applier.apply(&op, attempt).await {
                Ok(a) => {
                    self.in_doubt.store(false, Ordering::Relaxed);
                    break a;
                }
                Err(e) => {
                    attempt.maybe_sent = true;
                    if let Some(status) = e.server_error {
                        if self.keystone.answers().await {
                            refused += 1;
                            if refused >= self.max_attempts
                                && !attempt.without_kept_id
                                && super::apply::keeps_a_domain_id(&op)
                            {
                                // A domain create the site fails on with its
                                // central ID: once more, under an ID of its own.
                                warn!(seq = op.seq, status, attempts = refused, "this site fails on the domain's central ID: it is made under an ID of its own, mapped to central's");
                                attempt.without_kept_id = true;
                            } else if refused >= self.max_attempts {
                                self.status.given_up.fetch_add(1, Ordering::Relaxed);
                                let e = scrub(&e.reason);
                                warn!(seq = op.seq, status, attempts = refused, error = %e, "this site answers other requests but not this op: recorded failed");
                                break super::apply::failed(
                                    Some(status),
                                    format!(
                                        "the identity service answered HTTP {status} to this op \
                                         {refused} times while it answered other requests \
                                         (--max-attempts {}): {e}",
                                        self.max_attempts
                                    ),
                                );
                            }
                        }
                    }
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
                    last_error = Some(e.clone());
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
                    let until = tokio::time::Instant::now() + wait;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => break,
                            // A skip of this op is taken at once; one of
                            // another is the run loop's, after this op.
                            () = self.skips.arrived.notified() => {
                                if self.skips.has(op.seq) {
                                    break;
                                }
                                others_skipped = true;
                            }
                            _ = crate::serve::stopped(&mut stop) => return Err(Stuck::Stopping),
                        }
                    }
                }
            }
        };
        if others_skipped {
            self.skips.arrived.notify_one();
        }
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
        let applied = super::apply::Applied {
            detail: applied.detail.as_deref().map(scrub),
            ..applied
        };
        let mut changes = applied.changes;
        if applied.outcome == Outcome::OperatorSkipped {
            self.status.skipped.fetch_add(1, Ordering::Relaxed);
            warn!(seq = op.seq, detail = ?applied.detail, "op passed over at an operator's request: this site may differ from central");
        }
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
    pub(super) fn rejected(&self, kind: &str, why: Rejected) {
        let n = self.status.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(kind, reason = %why, count = n, "control message dropped");
        }
    }

    pub(super) async fn ack_stored(&self, done: &StoredOutcome) {
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

/// Counts one event when dropped (whichever way the handler returns).
pub(super) struct Counted<'a>(&'a AtomicU64);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// An op passed over at an operator's request: recorded with who asked,
/// when, and the op's last error here.
fn passed_over(skip: &Skip, last_error: Option<&str>) -> super::apply::Applied {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(skip.at_ms.max(0) as u64);
    let mut detail = format!(
        "passed over at an operator's request (by {}, at {})",
        skip.by,
        humantime::format_rfc3339_millis(at)
    );
    if let Some(e) = last_error {
        detail.push_str(&format!("; its last error here: {e}"));
    }
    super::apply::Applied {
        outcome: Outcome::OperatorSkipped,
        status: None,
        detail: Some(detail),
        edge_ids: Vec::new(),
        changes: Default::default(),
    }
}

/// The ack that reports a stored outcome.
pub(super) fn ack_of(done: &StoredOutcome) -> Ack {
    let outcome = match done.outcome.as_str() {
        "applied" => Outcome::Applied,
        "adopted" => Outcome::Adopted,
        "skipped" => Outcome::Skipped,
        "out_of_scope" => Outcome::OutOfScope,
        _ => Outcome::Failed,
    };
    Ack {
        seq: done.seq,
        op_id: done.op_id.clone(),
        outcome,
        status: done.status.and_then(|s| u16::try_from(s).ok()),
        detail: done.detail.clone(),
        edge_id_created: done.edge_ids.clone(),
        operator_skipped: done.outcome == Outcome::OperatorSkipped.as_str(),
    }
}
