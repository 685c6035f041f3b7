//! Initial sync, repair and drift audit, driven from central.
//!
//! A **resync** (or a repair: the same, on demand after a drift audit) brings
//! an edge to central's current identity state: it holds the edge's op stream,
//! notes the op log's last seq (the fence), reads central's state through
//! Keystone's API, asks the edge for its own (read by the edge from its
//! Keystone), and sends the difference as steps the edge applies with the
//! applier replayed ops go through (ID map, adoption by natural key): ID map
//! entries for what both sites have, creates for what the edge lacks, updates
//! for what differs, deletes for what only the edge has (with `prune`). Then
//! the edge continues the op stream after the fence; ops after it that the
//! state already held are applied idempotently. An interrupted resync is
//! started again from the beginning (reading both states again makes it
//! idempotent); one a stop of central left unfinished restarts at start-up.
//!
//! A **drift audit** compares the two states without changing anything. Ops
//! in flight are not drift: central notes the op log's seq before and after
//! reading its state, waits for the edge to have applied up to the second, and
//! leaves out every entity an op after the first touched.

use crate::keystone::kinds::{USER, USER_PASSWORD};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::central::sync::SyncCentral;
use crate::keystone::client::KeystoneClient;
use crate::keystone::state::{self, Category, Entity};
use crate::metrics::{DriftLabels, EdgeLabel, Metrics};
use crate::protocol::messages::{
    OpContent, Outcome, ResyncReply, ResyncStep, StatePage, StateRequest, RESYNC, RESYNC_REPLY,
    STATE_PAGE, STATE_REQUEST,
};
use crate::store::{NewDrift, OpFilter, Store};

use super::plan::{planned, Plan, Planned, Tally, SAMPLE};

/// How long the edge holds its op stream without hearing from the resync.
const HOLD: Duration = Duration::from_secs(300);
/// Ops per step (the edge applies a step's ops some at once).
const STEP_OPS: usize = 64;
/// ID map entries per step.
const STEP_MAPS: usize = 2000;
/// How long a step may take at the edge.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the edge may take to let its op stream go (it does nothing else).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of that: a release lost leaves the edge held, applying nothing,
/// until its hold lapses (`HOLD`).
const RELEASE_TRIES: u32 = 3;
/// How long the edge may take to read its state.
const READ_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a drift audit waits for the edge to apply ops up to its fence.
const CATCH_UP_WAIT: Duration = Duration::from_secs(120);
/// Tries of a resync or drift audit interrupted by a lost edge or broker
/// (a restarted edge answers once its predecessor's lease ends): about 30 s
/// of waits in all, the first ones short.
const ATTEMPTS: u32 = 8;
const RETRY_MAX: Duration = Duration::from_secs(16);

fn retry_delays() -> impl Iterator<Item = Duration> {
    crate::retry::delays(Duration::from_millis(250), RETRY_MAX)
}
/// Tries of one write the edge's Keystone could not take for now.
const OP_TRIES: u32 = 3;
/// Least time between two automatic resyncs of one edge (one that failed is
/// tried again after this).
const AUTO_RESYNC_EVERY: Duration = Duration::from_secs(10);

/// Edges a drift round audits at once.
const ROUND_PARALLEL: usize = 4;

/// Central's state as a drift round read it.
struct Snapshot {
    /// The op log's last seq before the read, and after it.
    before: i64,
    central: Vec<Entity>,
    fence: i64,
}

/// The edges a drift round audits, and those it skipped with why.
#[derive(Debug, Default)]
pub struct DriftRound {
    pub audited: Vec<String>,
    pub skipped: Vec<(String, String)>,
}

/// What failed, and whether trying again may help.
#[derive(Debug)]
enum Failure {
    /// The edge or the broker did not answer: try the whole resync again.
    Lost(String),
    Fatal(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Lost(s) | Failure::Fatal(s) => f.write_str(s),
        }
    }
}

/// Why a job was not started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no edge '{0}'")]
    NoEdge(String),
    #[error(
        "central has no OS_* service credentials: it cannot read its identity state; set \
         OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME (or an application credential) for central"
    )]
    NoCredentials,
    #[error("a {1} of edge '{0}' is running")]
    Busy(String, &'static str),
    #[error("{0}")]
    Internal(String),
}

pub struct Resyncer {
    pub sync: Arc<SyncCentral>,
    pub keystone: Option<Arc<KeystoneClient>>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Edges with a job running, and which.
    busy: Mutex<HashMap<String, &'static str>>,
    /// Held while a resync's start or end is recorded together with its
    /// slot: what the audit API says ran and what 409s are one state.
    turns: tokio::sync::Mutex<()>,
    /// When each edge's last automatic resync started (see `AUTO_RESYNC_EVERY`).
    auto: Mutex<HashMap<String, Instant>>,
    /// Spawns resyncs and audits (they end with central).
    spawner: crate::scope::Spawner,
    /// Names credentials in both sites' states (see `state::Digester`): this
    /// process's own random key, sent sealed to the edges it asks.
    digester: state::Digester,
    digest_key: String,
}

/// Frees an edge's job slot when the job ends, however it ends.
struct Slot(Arc<Resyncer>, String);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
        self.0
            .metrics
            .resync_running
            .get_or_create(&EdgeLabel {
                edge: self.1.clone(),
            })
            .set(0);
    }
}

impl Resyncer {
    /// Marks the drift audits a stop of central left running as failed. Run
    /// before this resyncer is offered to the admin API (`duties`): an audit
    /// asked for once it is must never be taken for one a stop interrupted.
    pub async fn end_interrupted_drifts(&self) {
        match self.store.interrupt_drifts().await {
            Ok(0) => {}
            Ok(n) => warn!(
                audits = n,
                "drift audits a stop left running are marked failed"
            ),
            Err(e) => error!(error = %e, "cannot end the drift audits a stop left running"),
        }
    }

    pub fn new(
        sync: Arc<SyncCentral>,
        keystone: Option<Arc<KeystoneClient>>,
        store: Store,
        metrics: Arc<Metrics>,
        spawner: crate::scope::Spawner,
    ) -> Resyncer {
        let (digester, digest_key) = state::Digester::random();
        Resyncer {
            sync,
            keystone,
            store,
            metrics,
            spawner,
            busy: Mutex::default(),
            turns: tokio::sync::Mutex::new(()),
            auto: Mutex::default(),
            digester,
            digest_key,
        }
    }

    fn keystone(&self) -> Result<&KeystoneClient, StartError> {
        self.keystone.as_deref().ok_or(StartError::NoCredentials)
    }

    fn take(self: &Arc<Self>, edge: &str, what: &'static str) -> Result<Slot, StartError> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = busy.get(edge) {
            return Err(StartError::Busy(edge.to_string(), running));
        }
        busy.insert(edge.to_string(), what);
        Ok(Slot(self.clone(), edge.to_string()))
    }

    async fn known(&self, edge: &str) -> Result<(), StartError> {
        match self.store.edge_position(edge).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(StartError::NoEdge(edge.to_string())),
            Err(e) => Err(StartError::Internal(e.to_string())),
        }
    }

    /// Starts a resync (`repair`: after a drift audit) of `edge` on a task.
    pub async fn start(
        self: &Arc<Self>,
        edge: &str,
        kind: &'static str,
        prune: bool,
    ) -> Result<(), StartError> {
        self.keystone()?;
        self.known(edge).await?;
        let turn = self.turns.lock().await;
        let slot = self.take(edge, kind)?;
        self.store
            .begin_resync(edge, kind, prune)
            .await
            .map_err(|e| StartError::Internal(e.to_string()))?;
        drop(turn);
        let this = self.clone();
        let edge = edge.to_string();
        self.spawner.spawn(async move {
            this.run_resync(&edge, prune, slot).await;
        });
        Ok(())
    }

    /// Runs every background duty until `stop`: resyncs a stop left
    /// unfinished, automatic resyncs edges ask for, periodic drift audits.
    pub async fn run(
        self: Arc<Self>,
        mut wanted: mpsc::UnboundedReceiver<String>,
        interval: Option<Duration>,
        mut stop: watch::Receiver<bool>,
    ) {
        match self.store.unfinished_resyncs().await {
            Ok(rows) => {
                for (edge, kind, prune) in rows {
                    let kind = if kind == "repair" { "repair" } else { "resync" };
                    info!(edge = %edge, kind, "a resync left unfinished by a stop starts again");
                    if let Err(e) = self.start(&edge, kind, prune).await {
                        warn!(edge = %edge, error = %e, "cannot start the unfinished resync again");
                        let _ = self.store.end_resync(&edge, Err(&e.to_string())).await;
                    }
                }
            }
            Err(e) => error!(error = %e, "cannot read unfinished resyncs"),
        }
        let mut tick = interval.map(|i| {
            // The first round comes after a random part of the interval on
            // top of it: centrals started together do not audit together.
            let first = i + i.mul_f64(spread());
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + first, i);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            tokio::select! {
                edge = wanted.recv() => {
                    let Some(edge) = edge else { break };
                    self.auto_resync(&edge).await;
                }
                _ = async { tick.as_mut().expect("ticks").tick().await }, if tick.is_some() => {
                    if self.keystone.is_none() {
                        continue;
                    }
                    match self.drift_round().await {
                        Ok(round) => info!(
                            audited = round.audited.len(),
                            skipped = round.skipped.len(),
                            "drift round started"
                        ),
                        Err(e) => warn!(error = %e, "drift round not run"),
                    }
                }
                _ = crate::serve::stopped(&mut stop) => break,
            }
        }
    }

    /// An edge asked for an initial sync (or joined with nothing while the op
    /// log no longer starts at its first op).
    async fn auto_resync(self: &Arc<Self>, edge: &str) {
        {
            let mut auto = self.auto.lock().unwrap_or_else(|p| p.into_inner());
            if auto
                .get(edge)
                .is_some_and(|t| t.elapsed() < AUTO_RESYNC_EVERY)
            {
                return;
            }
            if self
                .busy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(edge)
            {
                return;
            }
            auto.insert(edge.to_string(), Instant::now());
        }
        info!(
            edge,
            "initial sync of an edge that joins with nothing applied"
        );
        if let Err(e) = self.start(edge, "resync", false).await {
            warn!(edge, error = %e, "initial sync not started");
        }
    }

    /// Asks the edge (see `SyncCentral::ask`); a lost edge or broker may be
    /// tried again, a dropped answer may not.
    async fn ask<T: Serialize, R: DeserializeOwned>(
        &self,
        edge: &str,
        subject: String,
        kind: &'static str,
        reply_kind: &'static str,
        msg: &T,
        timeout: Duration,
    ) -> Result<R, Failure> {
        use crate::central::sync::AskError;
        self.sync
            .ask(edge, subject, kind, reply_kind, msg, timeout)
            .await
            .map_err(|e| match e {
                AskError::Dropped { .. } => Failure::Fatal(e.to_string()),
                e => Failure::Lost(e.to_string()),
            })
    }

    async fn step(&self, edge: &str, step: &ResyncStep) -> Result<ResyncReply, Failure> {
        self.step_within(edge, step, STEP_TIMEOUT).await
    }

    async fn step_within(
        &self,
        edge: &str,
        step: &ResyncStep,
        timeout: Duration,
    ) -> Result<ResyncReply, Failure> {
        let reply: ResyncReply = self
            .ask(
                edge,
                self.sync.subjects.resync(edge),
                RESYNC,
                RESYNC_REPLY,
                step,
                timeout,
            )
            .await?;
        match reply.error {
            Some(e) => Err(Failure::Lost(format!("edge '{edge}': {e}"))),
            None => Ok(reply),
        }
    }

    /// The edge's state, in terms `central` (central's state) is renamed to
    /// if need be (credentials named as an edge of 0.1.0 names them), and its
    /// cursor before and after it read it.
    ///
    /// For an edge with a scope, both states keep only what is in it (see
    /// `keystone::scope`): what is outside is neither sent nor drift. With
    /// `whole_edge` (a resync with prune, a drift audit asked to look
    /// outside the scope) the edge's state keeps too what it holds outside
    /// its scope that came from central (what left the scope): a prune
    /// deletes it. What the site made itself outside its scope is its own.
    async fn edge_state_against(
        &self,
        edge: &str,
        central: &mut std::borrow::Cow<'_, [Entity]>,
        whole_edge: bool,
    ) -> Result<(Vec<Entity>, i64, i64), Failure> {
        let (mut at_edge, keyed, before, after) = self.edge_state(edge).await?;
        if !keyed {
            state::rename_credentials(central.to_mut(), &state::Digester::Plain);
        }
        if let Some(scoped) = self.sync.scoped.get(edge) {
            let left_out = crate::keystone::scope::retain_in_scope(central.to_mut(), &scoped.scope);
            let at_edge_outside =
                crate::keystone::scope::retain_in_scope_or(&mut at_edge, &scoped.scope, |e| {
                    whole_edge && e.mapped
                });
            debug!(
                edge,
                scope = %scoped.scope,
                left_out,
                at_edge_outside,
                "states kept to the edge's scope"
            );
        }
        state::in_central_terms(&mut at_edge, central);
        Ok((at_edge, before, after))
    }

    /// The edge's state, whether its credentials are named with this
    /// process's digest key, and its cursor before and after it read it.
    async fn edge_state(&self, edge: &str) -> Result<(Vec<Entity>, bool, i64, i64), Failure> {
        let run = uuid::Uuid::new_v4().simple().to_string();
        let mut entities = Vec::new();
        let mut page = 0;
        let mut first = None;
        loop {
            let answer: StatePage = self
                .ask(
                    edge,
                    self.sync.subjects.state(edge),
                    STATE_REQUEST,
                    STATE_PAGE,
                    &StateRequest {
                        run: run.clone(),
                        page,
                        digest_key: Some(self.digest_key.clone()),
                        catalogue_kinds: true,
                    },
                    if page == 0 {
                        READ_TIMEOUT
                    } else {
                        STEP_TIMEOUT
                    },
                )
                .await?;
            if let Some(e) = answer.error {
                let why = format!("edge '{edge}' cannot read its identity state: {e}");
                return Err(if answer.retry {
                    Failure::Lost(why)
                } else {
                    Failure::Fatal(why)
                });
            }
            if answer.run != run || answer.page != page {
                return Err(Failure::Lost("the edge answered another request".into()));
            }
            // Every page is of one read (an edge of 0.1.0 restarted between
            // pages reads again for the next one).
            let read = (answer.pages, answer.cursor_before, answer.cursor_after);
            match first {
                None => first = Some(read),
                Some(f) if f != read => {
                    return Err(Failure::Lost(
                        "the edge's state pages are not of one read (it restarted between \
                         them)"
                            .into(),
                    ))
                }
                Some(_) => {}
            }
            // An older edge names some kinds as its release did.
            entities.extend(answer.entities.into_iter().map(|mut e| {
                if let Some(k) = crate::keystone::kinds::canonical_of(&e) {
                    if k != e.kind {
                        e.kind = k.to_string();
                    }
                }
                e
            }));
            page += 1;
            if page >= answer.pages {
                return Ok((
                    entities,
                    answer.keyed,
                    answer.cursor_before,
                    answer.cursor_after,
                ));
            }
        }
    }

    /// The kinds and keys of what the deletes logged up to `through` removed.
    async fn deleted_keys(&self, through: i64) -> Result<HashSet<(String, String)>, Failure> {
        let mut out = HashSet::new();
        let mut after = 0;
        loop {
            let rows = self
                .store
                .deletes(after, through, 1000)
                .await
                .map_err(|e| Failure::Fatal(format!("op log: {e}")))?;
            let Some(last) = rows.last().map(|r| r.0) else {
                return Ok(out);
            };
            for (_, path, refs) in &rows {
                let refs: Vec<crate::protocol::messages::EntityRef> =
                    serde_json::from_str(refs).unwrap_or_default();
                out.extend(state::deleted_key(path, &refs));
            }
            after = last;
        }
    }

    async fn read_central(&self) -> Result<Vec<Entity>, Failure> {
        let ks = self.keystone().map_err(|e| Failure::Fatal(e.to_string()))?;
        state::read(ks, &self.digester)
            .await
            .map_err(|e| Failure::Fatal(format!("reading central's identity state: {e}")))
    }

    /// The last op edges may have: an op whose outcome is still being
    /// resolved is never below a fence (it is applied after the fence, once
    /// resolved, whatever the state read shows).
    async fn last_seq(&self) -> Result<i64, Failure> {
        self.store
            .publishable_through()
            .await
            .map_err(|e| Failure::Fatal(format!("op log: {e}")))
    }

    async fn progress(&self, edge: &str, phase: &str, fence: Option<i64>, done: i64, total: i64) {
        let label = EdgeLabel {
            edge: edge.to_string(),
        };
        self.metrics.resync_done.get_or_create(&label).set(done);
        self.metrics.resync_total.get_or_create(&label).set(total);
        self.metrics.resync_running.get_or_create(&label).set(1);
        if let Err(e) = self
            .store
            .resync_progress(edge, phase, fence, done, total)
            .await
        {
            warn!(edge, error = %e, "cannot record a resync's progress");
        }
    }

    async fn run_resync(&self, edge: &str, prune: bool, slot: Slot) {
        let started = Instant::now();
        let mut attempt = 0;
        let mut delays = retry_delays();
        let result = loop {
            attempt += 1;
            match self.resync_once(edge, prune).await {
                Ok(result) => break Ok(result),
                Err(Failure::Lost(why)) if attempt < ATTEMPTS => {
                    warn!(edge, attempt, error = %why, "resync interrupted; starting it again");
                    let _ = self.release(edge).await;
                    tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX)).await;
                }
                Err(Failure::Lost(why)) => break Err(format!("{why} (after {ATTEMPTS} attempts)")),
                Err(f) => break Err(f.to_string()),
            }
        };
        if result.is_ok() {
            if let Err(e) = self.store.set_needs_resync(edge, None).await {
                error!(edge, error = %e, "cannot record that an edge no longer needs a resync");
            }
        }
        match &result {
            Ok(r) => info!(
                edge,
                secs = started.elapsed().as_secs_f64(),
                created = %r["created"],
                updated = %r["updated"],
                failed = %r["failed"],
                needs_password = %r["needs_password"],
                "resync done"
            ),
            Err(e) => {
                error!(edge, error = %e, "resync failed");
                let _ = self.release(edge).await;
            }
        }
        self.refresh_needs_password(edge).await;
        // The end is recorded and the slot freed as one turn: once the audit
        // API says it ended, a repair asked for then starts (not 409), and
        // none starts before the end is recorded (its start is not
        // overwritten by this end).
        let turn = self.turns.lock().await;
        if let Err(e) = self
            .store
            .end_resync(edge, result.as_ref().map_err(String::as_str))
            .await
        {
            error!(edge, error = %e, "cannot record a resync's end");
        }
        drop(slot);
        drop(turn);
    }

    /// Runs `work` while renewing the edge's hold (a large site takes a while
    /// to read; the hold must not lapse meanwhile).
    async fn holding<T>(
        &self,
        edge: &str,
        work: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let hold_ms = HOLD.as_millis() as u64;
        let renew = async {
            loop {
                tokio::time::sleep(HOLD / 5).await;
                self.step(edge, &ResyncStep::Hold { hold_ms }).await?;
            }
        };
        tokio::select! {
            r = work => r,
            e = renew => e,
        }
    }

    /// Lets the edge's op stream go, asked again while the request or its
    /// answer is lost (the edge lets go once whatever it is told).
    async fn release(&self, edge: &str) -> Result<ResyncReply, Failure> {
        let mut delays = retry_delays();
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .step_within(edge, &ResyncStep::Release, RELEASE_TIMEOUT)
                .await
            {
                Err(Failure::Lost(why)) if tries < RELEASE_TRIES => {
                    debug!(edge, error = %why, "the edge's release not answered; asking again");
                    tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX)).await;
                }
                done => return done,
            }
        }
    }

    async fn resync_once(&self, edge: &str, prune: bool) -> Result<Value, Failure> {
        let hold_ms = HOLD.as_millis() as u64;
        self.progress(edge, "holding the edge's op stream", None, 0, 0)
            .await;
        self.step(edge, &ResyncStep::Hold { hold_ms }).await?;
        // Everything up to here is in the state read next.
        let fence = self.last_seq().await?;
        self.progress(edge, "reading central's state", Some(fence), 0, 0)
            .await;
        let mut central = std::borrow::Cow::Owned(self.holding(edge, self.read_central()).await?);
        self.progress(edge, "reading the edge's state", Some(fence), 0, 0)
            .await;
        let (at_edge, _, _) = self
            .holding(edge, self.edge_state_against(edge, &mut central, prune))
            .await?;
        // What central deleted and the edge still holds is deleted there,
        // prune or not: it is central's delete the edge has not applied.
        let deleted = self.deleted_keys(fence).await?;
        let mut plan = Plan::new(&central, &at_edge, prune, &deleted);
        if let Some((kind, key)) = plan.kept.first() {
            warn!(
                edge,
                kept = plan.kept.len(),
                kind = %kind,
                key = %key,
                "not deleted at the edge: its own service identity needs it (see the resync's result)"
            );
        }
        // The users this resync creates, and those an interrupted earlier one
        // created: noted first, so that a kill between a create and its
        // password leaves nothing unset and unlisted.
        let op_log = |e: crate::store::StoreError| Failure::Fatal(format!("op log: {e}"));
        let planned_users: Vec<(String, String)> = plan
            .groups
            .iter()
            .flatten()
            .filter(|p| p.kind == USER.name && p.what == "create")
            .filter_map(|p| {
                p.op.created_ids
                    .first()
                    .map(|id| (id.clone(), p.key.clone()))
            })
            .collect();
        self.store
            .note_resync_users(edge, &planned_users)
            .await
            .map_err(op_log)?;
        let pending = self.store.resync_users(edge).await.map_err(op_log)?;
        let central_users: HashSet<&str> = central
            .iter()
            .filter(|e| e.kind == USER.name)
            .map(|e| e.id.as_str())
            .collect();
        let created: HashSet<&str> = pending
            .iter()
            .map(|(id, _)| id.as_str())
            .filter(|id| central_users.contains(id))
            .collect();
        // A user the op log saw get a password gets it again at the edge:
        // one this resync creates, and one whose last password op did not
        // land there (failed, or never applied: the resync supersedes it).
        let passwords = self
            .passwords(edge, &created, &central_users, fence)
            .await?;
        if !passwords.is_empty() {
            let keys: HashMap<&str, &str> = central
                .iter()
                .filter(|e| e.kind == USER.name)
                .map(|e| (e.id.as_str(), e.key.as_str()))
                .collect();
            let group = passwords
                .into_iter()
                .map(|(id, password)| {
                    let call = (
                        reqwest::Method::PATCH,
                        format!("/v3/users/{id}"),
                        Some(json!({ USER.member: {"password": password} })),
                    );
                    let key = keys.get(id.as_str()).copied().unwrap_or_default();
                    let mut p = planned(USER.name, key, "password", call, Vec::new());
                    p.user = Some(id);
                    p
                })
                .collect();
            plan.groups.push(group);
        }
        let total = (plan.maps.len() + plan.ops()) as i64;
        let mut done = 0i64;
        self.progress(edge, "applying", Some(fence), done, total)
            .await;

        for maps in plan.maps.chunks(STEP_MAPS) {
            self.step(
                edge,
                &ResyncStep::Apply {
                    hold_ms,
                    maps: maps.to_vec(),
                    ops: Vec::new(),
                },
            )
            .await?;
            done += maps.len() as i64;
            self.progress(edge, "applying", Some(fence), done, total)
                .await;
        }
        let mut tally = Tally::default();
        for group in &plan.groups {
            for chunk in group.chunks(STEP_OPS) {
                let mut todo: Vec<&Planned> = chunk.iter().collect();
                for tries in 1..=OP_TRIES {
                    let ops: Vec<OpContent> = todo.iter().map(|p| p.op.clone()).collect();
                    let reply = self
                        .step(
                            edge,
                            &ResyncStep::Apply {
                                hold_ms,
                                maps: Vec::new(),
                                ops,
                            },
                        )
                        .await?;
                    let mut again = Vec::new();
                    for (planned, ack) in todo.iter().zip(&reply.outcomes) {
                        let transient = ack.outcome == Outcome::Failed && ack.status.is_none();
                        if transient && tries < OP_TRIES {
                            again.push(*planned);
                        } else {
                            tally.count(planned, ack);
                        }
                    }
                    if again.is_empty() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(tries))).await;
                    todo = again;
                }
                done += chunk.len() as i64;
                self.progress(edge, "applying", Some(fence), done, total)
                    .await;
            }
        }
        // Ops logged after the fence may be in the state applied: the edge
        // looks for their creates before sending them.
        let uncertain_through = self
            .store
            .last_seq()
            .await
            .map_err(|e| Failure::Fatal(format!("op log: {e}")))?;
        self.step(
            edge,
            &ResyncStep::Done {
                fence,
                uncertain_through,
            },
        )
        .await?;
        self.store
            .settle_to_fence(edge, fence)
            .await
            .map_err(|e| Failure::Fatal(format!("op log: {e}")))?;
        // Every user this resync or an interrupted earlier one created, whose
        // password could not be set from the op log, needs one.
        let needs: Vec<(String, String)> = pending
            .iter()
            .filter(|(id, _)| !tally.passwords.contains(id))
            .filter(|(id, _)| central_users.contains(id.as_str()))
            .cloned()
            .collect();
        if !needs.is_empty() {
            self.store
                .add_needs_password(edge, &needs, fence)
                .await
                .map_err(|e| Failure::Fatal(format!("op log: {e}")))?;
        }
        self.store.clear_resync_users(edge).await.map_err(op_log)?;
        self.progress(edge, "finishing", Some(fence), done, total)
            .await;
        let only: Vec<Value> = plan
            .only_at_edge
            .iter()
            .take(SAMPLE)
            .map(|(k, key)| json!({"kind": k, "key": key}))
            .collect();
        Ok(json!({
            "fence": fence,
            "mapped": plan.maps.len(),
            "created": tally.created,
            "updated": tally.updated,
            "adopted": tally.adopted,
            "deleted": tally.deleted,
            "failed": tally.failed,
            "failures": tally.failures,
            "only_at_edge": plan.only_at_edge.len(),
            "only_at_edge_sample": only,
            "not_updatable": plan
                .not_updatable
                .iter()
                .take(SAMPLE)
                .map(|(k, key)| json!({"kind": k, "key": key}))
                .collect::<Vec<_>>(),
            "pruned": prune,
            "kept": plan
                .kept
                .iter()
                .take(SAMPLE)
                .map(|(k, key)| json!({
                    "kind": k,
                    "key": key,
                    "reason": "the edge's own service identity needs it: a resync never deletes it",
                }))
                .collect::<Vec<_>>(),
            "not_covered": state::not_covered(),
            "passwords_set": tally.passwords.len(),
            "needs_password": needs.len(),
        }))
    }

    /// The latest password the op log up to `fence` set (a create with one,
    /// an admin update, a self-service change) for each of `created`, and for
    /// each user of `central` whose latest password op did not land at
    /// `edge` (its delivery is not applied or adopted).
    async fn passwords(
        &self,
        edge: &str,
        created: &HashSet<&str>,
        central: &HashSet<&str>,
        fence: i64,
    ) -> Result<HashMap<String, String>, Failure> {
        let op_log = |e: crate::store::StoreError| Failure::Fatal(format!("op log: {e}"));
        // Those retention pruned first (each user's latest), then the op log's.
        let mut ops = self.store.kept_passwords().await.map_err(op_log)?;
        for kind in password_kinds() {
            ops.extend(
                self.ops_between(0, fence, Some(kind))
                    .await
                    .map_err(op_log)?,
            );
        }
        ops.sort_by_key(|o| o.seq);
        // Each user's latest password op.
        let mut latest: HashMap<String, (i64, String)> = HashMap::new();
        for op in ops
            .iter()
            .filter(|o| o.state == "committed" && o.seq <= fence)
        {
            if let Some((user, password)) = password_of(op) {
                latest.insert(user, (op.seq, password));
            }
        }
        // A pruned op landed where the edge acknowledged past it (what failed
        // is never pruned, and an edge that lost what it had not acknowledged
        // to pruning acknowledged no further).
        let first = self.store.first_seq().await.map_err(op_log)?.unwrap_or(0);
        let acked = self
            .store
            .edge_position(edge)
            .await
            .map_err(op_log)?
            .map_or(0, |(acked, _)| acked);
        // An edge marked because what it had not acknowledged, or what failed
        // there, was pruned: its watermark says nothing of the pruned ops.
        let pruned_unknown = self
            .store
            .edge_needs_resync(edge)
            .await
            .map_err(op_log)?
            .is_some_and(|why| why.contains(crate::store::PRUNED_WHILE_EXPIRED));
        let mut found = HashMap::new();
        for (user, (seq, password)) in latest {
            if created.contains(user.as_str()) {
                found.insert(user, password);
                continue;
            }
            if !central.contains(user.as_str()) {
                continue;
            }
            let landed = if seq < first {
                seq <= acked && !pruned_unknown
            } else {
                self.store
                    .deliveries(seq, Duration::from_secs(3600))
                    .await
                    .map_err(op_log)?
                    .iter()
                    .any(|d| d.edge == edge && matches!(d.state.as_str(), "applied" | "adopted"))
            };
            if !landed {
                found.insert(user, password);
            }
        }
        Ok(found)
    }

    /// Runs a drift audit of `edge` now (nothing is changed).
    pub async fn drift(self: &Arc<Self>, edge: &str) -> Result<(), StartError> {
        let slot = self.begin_drift(edge).await?;
        let ran = self.drift_once(edge, false).await;
        self.end_drift(edge, slot, ran).await;
        Ok(())
    }

    /// Starts a drift audit of `edge` on a task. `outside_scope`: an edge
    /// with a scope is compared whole, what it holds outside its scope
    /// found as only at the edge.
    pub async fn start_drift(
        self: &Arc<Self>,
        edge: &str,
        outside_scope: bool,
    ) -> Result<(), StartError> {
        let slot = self.begin_drift(edge).await?;
        let this = self.clone();
        let edge = edge.to_string();
        self.spawner.spawn(async move {
            let ran = this.drift_once(&edge, outside_scope).await;
            this.end_drift(&edge, slot, ran).await;
        });
        Ok(())
    }

    /// Takes the edge's slot for a drift audit and records that it runs.
    async fn begin_drift(self: &Arc<Self>, edge: &str) -> Result<Slot, StartError> {
        self.keystone()?;
        self.known(edge).await?;
        let turn = self.turns.lock().await;
        let slot = self.take(edge, "drift audit")?;
        self.store
            .begin_drift(edge)
            .await
            .map_err(|e| StartError::Internal(e.to_string()))?;
        drop(turn);
        Ok(slot)
    }

    /// Frees the edge's slot as the audit's end is recorded (done, recorded
    /// by the audit under the turn it hands back; or failed, recorded here):
    /// once the audit API says it ended, a resync asked for then starts.
    async fn end_drift(
        &self,
        edge: &str,
        slot: Slot,
        ran: Result<tokio::sync::MutexGuard<'_, ()>, Failure>,
    ) {
        let turn = match ran {
            Ok(turn) => turn,
            Err(f) => {
                let why = f.to_string();
                warn!(edge, error = %why, "drift audit failed");
                let turn = self.turns.lock().await;
                let _ = self.store.fail_drift(edge, &why).await;
                turn
            }
        };
        drop(slot);
        drop(turn);
    }

    /// Central's state for drift audits, read once for all the edges a
    /// round audits: with the op log's seq before and after the read.
    async fn snapshot(&self) -> Result<Snapshot, Failure> {
        let before = self.last_seq().await?;
        let central = self.read_central().await?;
        let fence = self.last_seq().await?;
        Ok(Snapshot {
            before,
            central,
            fence,
        })
    }

    async fn drift_once(
        &self,
        edge: &str,
        outside_scope: bool,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, Failure> {
        let snapshot = self.snapshot().await?;
        self.drift_against(edge, &snapshot, outside_scope).await
    }

    /// Audits every edge connected now against one read of central's state,
    /// a few edges at a time; an edge that is not connected, or has a job
    /// running, is skipped (and said so). Returns the edges audited and those
    /// skipped, with why; the audits run on a task.
    pub async fn drift_round(self: &Arc<Self>) -> Result<DriftRound, StartError> {
        self.keystone()?;
        let edges = self
            .store
            .edges()
            .await
            .map_err(|e| StartError::Internal(e.to_string()))?;
        let mut round = DriftRound::default();
        let mut slots = Vec::new();
        for e in edges {
            if !self.sync.connected(&e.id) {
                round
                    .skipped
                    .push((e.id, "not connected to central".into()));
                continue;
            }
            // Taken and recorded as one turn (as a resync's start is).
            let turn = self.turns.lock().await;
            match self.take(&e.id, "drift audit") {
                Ok(slot) => match self.store.begin_drift(&e.id).await {
                    Ok(()) => {
                        round.audited.push(e.id.clone());
                        slots.push((e.id, slot));
                    }
                    Err(err) => {
                        drop((slot, turn));
                        // Those begun already are ended, then the round fails.
                        for (edge, slot) in slots {
                            let why = format!("the drift round could not start: {err}");
                            self.end_drift(&edge, slot, Err(Failure::Fatal(why))).await;
                        }
                        return Err(StartError::Internal(err.to_string()));
                    }
                },
                Err(err) => round.skipped.push((e.id, err.to_string())),
            }
        }
        if slots.is_empty() {
            return Ok(round);
        }
        let this = self.clone();
        self.spawner.spawn(async move {
            use futures_util::StreamExt;
            let snapshot = match this.snapshot().await {
                Ok(s) => Arc::new(s),
                Err(f) => {
                    let why = f.to_string();
                    warn!(error = %why, edges = slots.len(), "drift round failed");
                    for (edge, slot) in slots {
                        let failed = Err(Failure::Fatal(why.clone()));
                        this.end_drift(&edge, slot, failed).await;
                    }
                    return;
                }
            };
            futures_util::stream::iter(slots)
                .for_each_concurrent(ROUND_PARALLEL, |(edge, slot)| {
                    let this = this.clone();
                    let snapshot = snapshot.clone();
                    // The slot is held by the audit until its end is recorded.
                    async move {
                        let ran = this.drift_against(&edge, &snapshot, false).await;
                        this.end_drift(&edge, slot, ran).await;
                    }
                })
                .await;
        });
        Ok(round)
    }

    /// Audits `edge` against `snapshot`; an edge or broker lost meanwhile (a
    /// restart of the edge) is asked again, as a resync is.
    async fn drift_against(
        &self,
        edge: &str,
        snapshot: &Snapshot,
        outside_scope: bool,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, Failure> {
        let mut attempt = 0;
        let mut delays = retry_delays();
        loop {
            attempt += 1;
            match self.drift_against_once(edge, snapshot, outside_scope).await {
                Err(Failure::Lost(why)) if attempt < ATTEMPTS => {
                    warn!(edge, attempt, error = %why, "drift audit interrupted; asking again");
                    tokio::time::sleep(delays.next().unwrap_or(RETRY_MAX)).await;
                }
                Err(Failure::Lost(why)) => {
                    return Err(Failure::Lost(format!("{why} (after {ATTEMPTS} attempts)")))
                }
                r => return r,
            }
        }
    }

    /// One audit; its result recorded under the turn it hands back (the
    /// caller frees the edge's slot, then the turn).
    async fn drift_against_once(
        &self,
        edge: &str,
        snapshot: &Snapshot,
        outside_scope: bool,
    ) -> Result<tokio::sync::MutexGuard<'_, ()>, Failure> {
        let started = Instant::now();
        let Snapshot {
            before,
            central,
            fence,
        } = snapshot;
        let (before, fence) = (*before, *fence);
        let mut central = std::borrow::Cow::Borrowed(central.as_slice());
        // Compared once the edge has applied every op up to the fence.
        // Its acks say when (the state, a large read, is asked for then).
        let deadline = Instant::now() + CATCH_UP_WAIT;
        let (at_edge, after) = loop {
            let acked = match self.store.edge_position(edge).await {
                Ok(p) => p.map_or(0, |(_, cursor)| cursor),
                Err(e) => return Err(Failure::Fatal(format!("op log: {e}"))),
            };
            let mut behind = acked;
            if acked >= fence {
                let (at_edge, cursor_before, cursor_after) = self
                    .edge_state_against(edge, &mut central, outside_scope)
                    .await?;
                if cursor_before >= fence {
                    break (at_edge, cursor_after);
                }
                behind = cursor_before;
            }
            if Instant::now() >= deadline {
                return Err(Failure::Fatal(format!(
                    "edge '{edge}' has applied ops up to {behind} only, not up to the audit's \
                     fence {fence}: its op stream is behind or stopped; see its deliveries"
                )));
            }
            debug!(
                edge,
                behind, fence, "the edge has not applied up to the audit's fence yet"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let through = self.last_seq().await?.max(after);
        let touched = self.touched(before, through).await?;
        let differences = state::diff(&central, &at_edge);
        let mut excluded = 0;
        let mut found = Vec::new();
        for d in &differences {
            let c = d.central.map(|i| &central[i]);
            let e = d.edge.map(|i| &at_edge[i]);
            let in_flight = c
                .into_iter()
                .chain(e)
                .any(|x| state::in_flight(x, &touched));
            if in_flight {
                excluded += 1;
                continue;
            }
            found.push(NewDrift {
                kind: &d.kind,
                key: &d.key,
                category: d.category.as_str(),
                fields: &d.fields,
                central_id: c.map(|x| x.id.as_str()).filter(|s| !s.is_empty()),
                edge_id: e.map(|x| x.id.as_str()).filter(|s| !s.is_empty()),
            });
        }
        self.refresh_needs_password(edge).await;
        let turn = self.turns.lock().await;
        self.store
            .record_drift(edge, fence, excluded, &found)
            .await
            .map_err(|e| Failure::Fatal(format!("op log: {e}")))?;
        self.publish_drift(edge, &found);
        info!(
            edge,
            differences = found.len(),
            excluded,
            secs = started.elapsed().as_secs_f64(),
            "drift audit done"
        );
        Ok(turn)
    }

    fn publish_drift(&self, edge: &str, found: &[NewDrift<'_>]) {
        let mut counts: HashMap<(String, &str), i64> = HashMap::new();
        for d in found {
            *counts.entry((d.kind.to_string(), d.category)).or_default() += 1;
        }
        for kind in state::kinds() {
            for category in [
                Category::MissingAtEdge,
                Category::OnlyAtEdge,
                Category::Differs,
            ] {
                let n = counts
                    .get(&(kind.to_string(), category.as_str()))
                    .copied()
                    .unwrap_or(0);
                self.metrics
                    .drift
                    .get_or_create(&DriftLabels {
                        edge: edge.to_string(),
                        kind: kind.to_string(),
                        category: category.as_str().to_string(),
                    })
                    .set(n);
            }
        }
    }

    /// What the ops in `(after, through]` changed: what is in flight (the
    /// entities, associations and names they change; not what they only
    /// reference, such as the domain a create is in).
    async fn touched(&self, after: i64, through: i64) -> Result<HashSet<String>, Failure> {
        self.store
            .changed_keys(after, through)
            .await
            .map_err(|e| Failure::Fatal(format!("op log: {e}")))
    }

    /// Clears the users of `edge` whose password was set through the gateway
    /// after their resync and applied there; updates the gauge.
    pub async fn refresh_needs_password(&self, edge: &str) {
        if let Err(e) = self.clear_passwords_set(edge).await {
            warn!(edge, error = %e, "cannot check which users got a password");
        }
        if let Ok((n, _)) = self.store.needs_password(edge, 0).await {
            self.metrics
                .needs_password
                .get_or_create(&EdgeLabel {
                    edge: edge.to_string(),
                })
                .set(n);
        }
    }

    async fn clear_passwords_set(&self, edge: &str) -> Result<(), crate::store::StoreError> {
        let Some(since) = self.store.needs_password_since(edge).await? else {
            return Ok(());
        };
        let Some((acked, _)) = self.store.edge_position(edge).await? else {
            return Ok(());
        };
        let ops = self.ops_between(since, acked, Some(USER.name)).await?;
        for op in ops.iter().filter(|o| o.state == "committed") {
            let Some(user) = password_set_for(op) else {
                continue;
            };
            // Only where it set the password: applied (or adopted, which
            // sets the create's values), not failed.
            let landed = self
                .store
                .deliveries(op.seq, Duration::from_secs(3600))
                .await?
                .iter()
                .any(|d| d.edge == edge && matches!(d.state.as_str(), "applied" | "adopted"));
            if landed {
                self.store.clear_needs_password(edge, &user, op.seq).await?;
            }
        }
        Ok(())
    }

    /// The ops in `(after, through]` (of one kind), oldest first.
    async fn ops_between(
        &self,
        after: i64,
        through: i64,
        kind: Option<&str>,
    ) -> Result<Vec<crate::store::OpRow>, crate::store::StoreError> {
        let mut out = Vec::new();
        let mut from = after;
        while from < through {
            let ops = self
                .store
                .list_ops(&OpFilter {
                    after: from,
                    limit: 1000,
                    kind: kind.map(str::to_string),
                    state: None,
                    through: Some(through),
                })
                .await?;
            let Some(last) = ops.last().map(|o| o.seq) else {
                break;
            };
            out.extend(ops.into_iter().filter(|o| o.seq <= through));
            from = last;
        }
        Ok(out)
    }
}

/// The user whose password an op sets, if it sets one.
fn password_set_for(op: &crate::store::OpRow) -> Option<String> {
    password_of(op).map(|(user, _)| user)
}

/// The user an op gives a password, and the password.
/// The kinds of ops that give a user a password: a create or an admin
/// update (`user`), a self-service change (`user_password`).
pub(super) fn password_kinds() -> [&'static str; 2] {
    [USER.name, USER_PASSWORD.name]
}

pub(super) fn password_of(op: &crate::store::OpRow) -> Option<(String, String)> {
    let path = op.path.split('?').next().unwrap_or("");
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body: Value = op
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok())?;
    let password = body[USER.member]["password"].as_str()?.to_string();
    let user = match (op.method.as_str(), segs.as_slice()) {
        ("POST", ["v3", "users"]) => serde_json::from_str::<Vec<String>>(&op.created_ids)
            .ok()?
            .into_iter()
            .next()?,
        ("POST", ["v3", "users", id, "password"]) | ("PATCH", ["v3", "users", id]) => {
            id.to_string()
        }
        _ => return None,
    };
    Some((user, password))
}

/// A random fraction in [0, 1).
fn spread() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
