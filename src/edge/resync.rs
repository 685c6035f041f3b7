//! The edge's part in an initial sync, a repair and a drift audit: it answers
//! central's requests for this site's identity state (read from its own
//! Keystone, references named by natural key, mapped IDs given as central's),
//! and applies the steps of a resync: hold the op stream, record ID map
//! entries, apply central's creates, updates and deletes through the same
//! applier as replayed ops, then continue the stream after central's fence.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tracing::{debug, error, info, warn};

use super::apply::Applier;
use super::{Pending, Runner, Status, Stuck};
use crate::keystone::client::KeystoneClient;
use crate::keystone::state::{self, Entity};
use crate::protocol::messages::{
    Ack, OpContent, Outcome, ResyncReply, ResyncStep, StatePage, StateRequest, RESYNC,
    RESYNC_REPLY, STATE_PAGE, STATE_REQUEST,
};
use crate::store::edge::{Batch, EdgeStore};

/// Ops of one resync step applied at once against the site's Keystone.
const CONCURRENCY: usize = 8;

/// What answers central's state requests (a task of its own: reading a large
/// site takes a while and must not hold up the op stream).
pub struct StateServer {
    pub client: async_nats::Client,
    pub keystone: Arc<KeystoneClient>,
    pub store: EdgeStore,
    pub link: Arc<super::link::Link>,
    pub status: Arc<Status>,
}

/// Why this site's state was not read for central, and whether reading
/// again may succeed (central then asks again).
struct Unread {
    why: String,
    retry: bool,
}

impl Unread {
    fn for_now(why: impl Into<String>) -> Unread {
        Unread {
            why: why.into(),
            retry: true,
        }
    }

    fn lasting(why: impl Into<String>) -> Unread {
        Unread {
            why: why.into(),
            retry: false,
        }
    }
}

/// The pages of the last state read, for the run that asked.
struct Read {
    run: String,
    pages: Vec<Vec<Entity>>,
    cursor_before: i64,
    cursor_after: i64,
}

impl StateServer {
    pub async fn serve(self, mut requests: async_nats::Subscriber) {
        let mut last: Option<Read> = None;
        while let Some(msg) = requests.next().await {
            let Some(reply) = msg.reply.clone() else {
                continue;
            };
            let _hand = self.status.in_hand();
            let req = match self.link.open::<StateRequest>(STATE_REQUEST, &msg.payload) {
                Ok(r) => r,
                Err(why) => {
                    self.status.rejected.fetch_add(1, Ordering::Relaxed);
                    debug!(reason = %why, "state request dropped");
                    continue;
                }
            };
            // Only page 0 reads afresh: every page of one run is of one read
            // (a later page read again would be of another state).
            let mut error = None;
            if req.page == 0 {
                let digester = match req.digest_key.as_deref() {
                    Some(key) => state::Digester::from_base64(key),
                    None => Ok(state::Digester::Plain),
                };
                let read = match digester {
                    Ok(d) => self.read(&req.run, &d).await,
                    Err(e) => Err(Unread::lasting(format!("central's state request: {e}"))),
                };
                match read {
                    Ok(r) => last = Some(r),
                    Err(e) => {
                        warn!(error = %e.why, retry = e.retry,
                              "cannot read this site's identity state for central");
                        error = Some(e);
                        last = None;
                    }
                }
            }
            let answer = match (&last, error) {
                (Some(r), None) if r.run == req.run => StatePage {
                    run: req.run.clone(),
                    page: req.page,
                    pages: r.pages.len(),
                    entities: in_centrals_words(
                        r.pages.get(req.page).cloned().unwrap_or_default(),
                        req.catalogue_kinds,
                    ),
                    cursor_before: r.cursor_before,
                    cursor_after: r.cursor_after,
                    error: None,
                    retry: false,
                    keyed: req.digest_key.is_some(),
                },
                (held, e) => {
                    // A later page of a read this process does not hold: it
                    // started after page 0 was read, or another run asked
                    // since. Central reads again either way.
                    let e = e.unwrap_or_else(|| {
                        Unread::for_now(match held {
                            None => "this edge restarted during the state read",
                            Some(_) => "another state read of this site was asked for since",
                        })
                    });
                    StatePage {
                        run: req.run.clone(),
                        page: req.page,
                        pages: 0,
                        entities: Vec::new(),
                        cursor_before: 0,
                        cursor_after: 0,
                        error: Some(e.why),
                        retry: e.retry,
                        keyed: false,
                    }
                }
            };
            let payload = self.link.seal(STATE_PAGE, &answer);
            if let Err(e) = self.client.publish(reply, payload.into()).await {
                debug!(error = %e, "state page not sent");
            }
        }
    }

    async fn read(&self, run: &str, digester: &state::Digester) -> Result<Read, Unread> {
        // Writes an earlier process left on their way would land after the
        // read: it waits for them (a resync would otherwise miss them, and a
        // drift audit call them missing).
        if let Some(until) = self.link.late_writes_until() {
            let wait = until.saturating_duration_since(Instant::now());
            if wait > LATE_WRITES_WAIT_MAX {
                return Err(Unread::for_now(format!(
                    "the last process of this edge may have left writes on their way to the \
                     identity service for {}s more (--upstream-settle): asked again later",
                    wait.as_secs()
                )));
            }
            info!(
                wait_ms = wait.as_millis() as u64,
                "state read waits for writes an earlier process may have left"
            );
            tokio::time::sleep(wait).await;
        }
        let started = Instant::now();
        let cursor_before = self.status.cursor.load(Ordering::Relaxed);
        let mut entities = state::read(&self.keystone, digester)
            .await
            .map_err(|e| Unread {
                retry: e.is_transient(),
                why: e.to_string(),
            })?;
        let cursor_after = self.status.cursor.load(Ordering::Relaxed);
        // What this edge's own service identity needs is marked (before IDs
        // are translated): a resync never deletes it.
        let me = self.keystone.identity().await.map_err(|e| Unread {
            retry: e.is_transient(),
            why: e.to_string(),
        })?;
        if me.user_id.is_empty() {
            return Err(Unread::lasting(
                "the identity service's token names no user: cannot tell which \
                        identity this edge authenticates as, so nothing is read for a resync",
            ));
        }
        state::mark_own(&mut entities, &me);
        let central_of = self.store.reverse_map().await.map_err(|e| Unread {
            retry: e.is_transient(),
            why: format!("edge database: {e}"),
        })?;
        let central = |id: &str| central_of.get(id).cloned();
        for e in &mut entities {
            // Central needs no edge's raw entity but to delete it (prune).
            if let Some(raw) = e.raw.as_mut().and_then(|r| r.as_object_mut()) {
                raw.remove("blob");
            }
            // IDs this edge maps are given as central's, wherever they are.
            e.mapped = !e.id.is_empty() && central_of.contains_key(e.id.as_str());
            for id in &mut e.ids {
                if let Some(c) = central(id) {
                    *id = c;
                }
            }
            for part in &mut e.parts {
                if let crate::keystone::state::Part::Ref { id, .. } = part {
                    if let Some(c) = central(id) {
                        *id = c;
                    }
                }
            }
            for (_, id) in e.field_refs.values_mut() {
                if let Some(c) = central(id) {
                    *id = c;
                }
            }
            if let Some(path) = e.raw.as_ref().and_then(|r| r["path"].as_str()) {
                let translated = crate::keystone::ids::rewrite_path(path, &central);
                if let Some(raw) = e.raw.as_mut().and_then(|r| r.as_object_mut()) {
                    raw.insert("central_path".into(), serde_json::Value::String(translated));
                }
            }
        }
        // Pages stay well under the broker's largest message once sealed.
        let budget = (self.client.server_info().max_payload / 3).max(32 * 1024);
        let mut pages: Vec<Vec<Entity>> = vec![Vec::new()];
        let mut size = 0;
        for e in entities {
            let n = serde_json::to_vec(&e).map(|v| v.len()).unwrap_or(0) + 1;
            if size + n > budget && !pages.last().is_some_and(Vec::is_empty) {
                pages.push(Vec::new());
                size = 0;
            }
            size += n;
            pages.last_mut().expect("one page at least").push(e);
        }
        info!(
            run,
            pages = pages.len(),
            entities = pages.iter().map(Vec::len).sum::<usize>(),
            ms = started.elapsed().as_millis() as u64,
            "identity state read for central"
        );
        Ok(Read {
            run: run.to_string(),
            pages,
            cursor_before,
            cursor_after,
        })
    }
}

impl Runner {
    /// Whether a resync holds the op stream.
    pub(crate) fn held(&self) -> bool {
        let mut hold = self.hold_until.lock().unwrap_or_else(|p| p.into_inner());
        match *hold {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                warn!("a resync stopped sending steps: applying ops from the cursor again");
                *hold = None;
                self.status.resync_hold.store(false, Ordering::Relaxed);
                false
            }
            None => false,
        }
    }

    fn hold(&self, ms: u64) {
        *self.hold_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + Duration::from_millis(ms.clamp(1_000, 600_000)));
        self.status.resync_hold.store(true, Ordering::Relaxed);
    }

    fn release(&self) {
        *self.hold_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.status.resync_hold.store(false, Ordering::Relaxed);
    }

    /// Handles one resync step; true when the op stream should be caught up.
    pub(crate) async fn resync_step(&self, msg: async_nats::Message) -> Result<bool, Stuck> {
        let Some(reply) = msg.reply.clone() else {
            return Ok(false);
        };
        let step = match self.link.open::<ResyncStep>(RESYNC, &msg.payload) {
            Ok(s) => s,
            Err(r) => {
                self.rejected(RESYNC, r);
                return Ok(false);
            }
        };
        // What was applied before is recorded first: the cursor is exact.
        let flushed = self.flush().await;
        let mut answer = ResyncReply {
            cursor: 0,
            outcomes: Vec::new(),
            error: flushed
                .is_err()
                .then(|| "the edge database cannot record applied ops".to_string()),
        };
        if !self.link.holds() {
            // Central's grant has not reached this process yet (or lapsed).
            answer.error = Some("this process does not hold the edge's ID right now".into());
        }
        let mut resume = false;
        if matches!(step, ResyncStep::Release) {
            // Letting the op stream go is safe whatever else holds: a release
            // refused would leave the edge held, applying nothing, until its
            // hold lapses.
            answer.error = None;
        }
        if answer.error.is_none() {
            match step {
                ResyncStep::Hold { hold_ms } => {
                    self.hold(hold_ms);
                    info!("resync: the op stream is held while central's state is applied");
                }
                ResyncStep::Apply { hold_ms, maps, ops } => {
                    self.hold(hold_ms);
                    match self.apply_step(maps, ops).await {
                        Ok(outcomes) => answer.outcomes = outcomes,
                        Err(Stuck::Stopping) => return Err(Stuck::Stopping),
                        Err(Stuck::Blocked) => {
                            answer.error = Some("the edge database cannot record the ID map".into())
                        }
                    }
                }
                ResyncStep::Done {
                    fence,
                    uncertain_through,
                } => {
                    let batch = Batch {
                        cursor: Some(fence),
                        ..Batch::default()
                    };
                    match self.store.commit_batch(&batch).await {
                        Ok(()) => {
                            self.status.cursor.fetch_max(fence, Ordering::Relaxed);
                            self.applied_to.fetch_max(fence, Ordering::Relaxed);
                            self.uncertain_through
                                .fetch_max(uncertain_through, Ordering::Relaxed);
                            self.resynced_through
                                .fetch_max(uncertain_through, Ordering::Relaxed);
                            if let Err(e) =
                                self.store.set_flag(super::link::INITIAL_SYNC_DONE).await
                            {
                                error!(error = %e, "cannot record that the initial sync is done");
                            }
                            match self.store.supersede_failures(fence).await {
                                Ok(0) => {}
                                Ok(n) => info!(
                                    ops = n,
                                    fence,
                                    "failed ops below the fence are superseded by the resync"
                                ),
                                Err(e) => {
                                    error!(error = %e, "cannot record that failed ops are superseded")
                                }
                            }
                            // An op this edge halted on is below the fence:
                            // the state applied supersedes it.
                            self.status.halted.store(false, Ordering::Relaxed);
                            self.status.set_error(None);
                            self.release();
                            self.link.resync_done();
                            resume = true;
                            info!(
                                fence,
                                "resync done: ops after the fence are applied from the stream"
                            );
                        }
                        Err(e) => answer.error = Some(format!("edge database: {e}")),
                    }
                }
                ResyncStep::Release => {
                    self.release();
                    resume = true;
                }
            }
        }
        if let Ok(n) = self.store.map_size().await {
            self.status.id_map_size.store(n, Ordering::Relaxed);
        }
        answer.cursor = self.status.cursor.load(Ordering::Relaxed);
        let payload = self.link.seal(RESYNC_REPLY, &answer);
        if let Err(e) = self.client.publish(reply, payload.into()).await {
            debug!(error = %e, "resync answer not sent");
        }
        Ok(resume)
    }

    /// Records ID map entries, then applies independent ops, some at once.
    async fn apply_step(
        &self,
        maps: Vec<(String, String, String)>,
        ops: Vec<OpContent>,
    ) -> Result<Vec<Ack>, Stuck> {
        let mut batch = Batch::default();
        for (central, edge, kind) in maps {
            batch.map_to(central, edge, kind);
        }
        if let Err(e) = self.store.commit_batch(&batch).await {
            error!(error = %e, "cannot record ID map entries of a resync");
            return Err(Stuck::Blocked);
        }
        let none = std::sync::Mutex::new(Pending::default());
        let applier = Applier {
            keystone: &self.keystone,
            store: &self.store,
            pending: &none,
        };
        let mut results = Vec::with_capacity(ops.len());
        let mut running = futures_util::stream::FuturesUnordered::new();
        let mut next = 0;
        loop {
            while running.len() < CONCURRENCY && next < ops.len() {
                running.push(self.apply_in_doubt_aware(&applier, next, &ops[next]));
                next += 1;
            }
            match running.next().await {
                Some(r) => results.push(r),
                None => break,
            }
        }
        let mut changes = Batch::default();
        let mut acks = Vec::with_capacity(results.len());
        for (i, r) in results {
            let op = &ops[i];
            let ack = match r {
                Ok(a) => {
                    for (c, e, k) in &a.changes.map_adds {
                        changes.map_to(c.clone(), e.clone(), k.clone());
                    }
                    // A resync deletes by the edge's own ID (what only the
                    // edge has): central's IDs mapped to it go with it.
                    for id in &a.changes.map_removes {
                        changes.map.insert(id.clone(), None);
                        changes.deleted_at_edge.push(id.clone());
                    }
                    Ack {
                        seq: i as i64,
                        op_id: op.op_id.clone(),
                        outcome: a.outcome,
                        status: a.status,
                        detail: a.detail,
                        edge_id_created: a.edge_ids,
                        operator_skipped: false,
                    }
                }
                Err(e) => Ack {
                    seq: i as i64,
                    op_id: op.op_id.clone(),
                    outcome: Outcome::Failed,
                    status: None,
                    detail: Some(format!("not applied now: {e}")),
                    edge_id_created: Vec::new(),
                    operator_skipped: false,
                },
            };
            acks.push(ack);
        }
        if let Err(e) = self.store.commit_batch(&changes).await {
            error!(error = %e, "cannot record the ID map changes of a resync step");
            return Err(Stuck::Blocked);
        }
        acks.sort_by_key(|a| a.seq);
        Ok(acks)
    }
}

impl Runner {
    /// Applies one op of a resync step. A try whose answer never came may
    /// still reach the site until `--upstream-settle` after it was sent:
    /// nothing is sent again before then, and then the op's entity is looked
    /// for first. A settle period short enough is waited out within the step;
    /// a longer one fails the op for now (central tries it again later).
    async fn apply_in_doubt_aware(
        &self,
        applier: &Applier<'_>,
        i: usize,
        op: &OpContent,
    ) -> (usize, Result<super::apply::Applied, String>) {
        let mut maybe_sent = false;
        for _ in 0..2 {
            let doubt = self
                .resync_doubt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&op.op_id)
                .copied();
            if let Some(settled) = doubt {
                let wait = settled.saturating_duration_since(Instant::now());
                if wait > STEP_SETTLE_MAX {
                    let e = format!(
                        "an earlier try may still reach the identity service: not sent again \
                         for {}s (--upstream-settle)",
                        wait.as_secs().max(1)
                    );
                    return (i, Err(e));
                }
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = crate::serve::stopped(&mut stop) => {
                        return (i, Err("the edge is stopping".to_string()));
                    }
                }
                maybe_sent = true;
            }
            if !self.link.holds() {
                return (
                    i,
                    Err("this process no longer holds the edge's ID".to_string()),
                );
            }
            let sent = Instant::now();
            let (i, r, in_doubt) = apply_one(applier, i, op, maybe_sent).await;
            let mut doubts = self.resync_doubt.lock().unwrap_or_else(|p| p.into_inner());
            if !in_doubt {
                doubts.remove(&op.op_id);
                return (i, r);
            }
            doubts.insert(op.op_id.clone(), sent + self.settle);
            // Nothing meets it: the stream after the resync, and state reads,
            // wait for it too.
            self.link.own_write_in_doubt(sent + self.settle);
            if self.settle > STEP_SETTLE_MAX {
                return (i, r);
            }
        }
        (
            i,
            Err("no answer from the identity service in time, twice".to_string()),
        )
    }
}

/// The longest a state read waits for writes an earlier process left (central
/// waits ten minutes for the read).
const LATE_WRITES_WAIT_MAX: Duration = Duration::from_secs(480);

/// The longest settle period a resync step waits out for one of its ops.
const STEP_SETTLE_MAX: Duration = Duration::from_secs(30);

/// Applies one op of a resync step; its texts scrubbed of the op's secrets.
/// Also says whether a failed try may still reach the site.
async fn apply_one(
    applier: &Applier<'_>,
    i: usize,
    op: &OpContent,
    maybe_sent: bool,
) -> (usize, Result<super::apply::Applied, String>, bool) {
    let secrets = op
        .body
        .as_ref()
        .map(crate::redact::secret_values)
        .unwrap_or_default();
    // A create an earlier try of this step may have sent is looked for first
    // when nothing else finds it (a named entity's 409 is adopted).
    let attempt = super::apply::Attempt {
        maybe_sent: maybe_sent || !crate::keystone::ids::named(&op.kind),
        ..Default::default()
    };
    let mut in_doubt = false;
    let r = applier
        .apply(op, attempt)
        .await
        .map_err(|e| {
            in_doubt = e.in_doubt;
            crate::redact::scrub(&e.to_string(), &secrets)
        })
        .map(|a| super::apply::Applied {
            detail: a
                .detail
                .as_deref()
                .map(|d| crate::redact::scrub(d, &secrets)),
            ..a
        });
    (i, r, in_doubt)
}
/// A page of this site's state in the names central reads: the catalogue's,
/// or those of an older central's release when it does not ask for them.
fn in_centrals_words(mut page: Vec<state::Entity>, catalogue_kinds: bool) -> Vec<state::Entity> {
    if !catalogue_kinds {
        for e in &mut page {
            e.kind = crate::keystone::kinds::as_formerly(&e.kind).to_string();
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_central_reads_kinds_in_its_own_names_and_a_newer_one_in_the_catalogues() {
        let entity = |kind: &str| state::Entity {
            kind: kind.into(),
            key: "k".into(),
            id: String::new(),
            fields: Default::default(),
            ids: Vec::new(),
            level: 0,
            raw: None,
            parts: Vec::new(),
            field_refs: Default::default(),
            mapped: false,
            own: false,
        };
        let page = || {
            [
                "user",
                "group_membership",
                "grant",
                "inherited_grant",
                "federation_protocol",
            ]
            .map(entity)
            .to_vec()
        };
        let kinds = |p: Vec<state::Entity>| p.into_iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(in_centrals_words(page(), false)),
            ["user", "membership", "assignment", "assignment", "protocol"]
        );
        assert_eq!(
            kinds(in_centrals_words(page(), true)),
            [
                "user",
                "group_membership",
                "grant",
                "inherited_grant",
                "federation_protocol"
            ]
        );
    }
}
