//! The edge's session with central: what it seals and opens on the control
//! plane (addressed to central's current session), and the grant to apply ops
//! under its edge ID. A hello goes to central every `hello_interval` on a task
//! of its own (an op being retried never delays it) and central answers it:
//! granted for a lease, wait (another process holds this ID), superseded (a
//! newer process took it), resync first (state lost, or an initial sync), or
//! refused. Ops are applied only while a grant holds, so two processes started
//! with one `--id` never both apply, and one whose database was lost or
//! restored never replays what central knows it applied.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use super::Status;
use crate::protocol::control::{now_ms, Rejected, Session, PROTOCOL};
use crate::protocol::crypto::Sealer;
use crate::protocol::messages::{Grant, Hello, HelloReply, Subjects, HELLO, HELLO_REPLY};
use crate::store::edge::EdgeStore;

/// The flag an edge keeps once a resync completed here (its hellos ask for
/// an initial sync until then, when told to).
pub const INITIAL_SYNC_DONE: &str = "initial_sync_done";

/// Hellos unanswered in a row before the edge says central does not answer.
const UNANSWERED: u32 = 3;
/// A skew of the edge's clock from central's worth a warning.
const SKEW_WARNING: Duration = Duration::from_secs(60);

/// What this process may do under its edge ID.
#[derive(Debug, Default)]
struct GrantState {
    /// Applying ops is allowed until then.
    until: Option<Instant>,
    /// Granted, but the op stream waits for central's resync.
    resync: bool,
}

pub struct Link {
    pub id: String,
    pub session: Session,
    pub sealer: Sealer,
    /// Central's session, as last heard (0: not yet).
    central: AtomicU64,
    grant: Mutex<GrantState>,
    /// Woken when the grant changes (the runner catches up).
    pub changed: Notify,
    /// Woken when a lapsed lease is granted again (the runner takes the ops
    /// its subscription held meanwhile).
    pub resumed: Notify,
    /// Measured skew of this edge's clock from central's, in ms.
    pub skew_ms: std::sync::atomic::AtomicI64,
    pub skew_known: AtomicBool,
    unanswered: AtomicU32,
    late: Mutex<LateWrites>,
}

/// Writes an earlier process under this edge ID may have left on their way
/// to the site: that process applied nothing after its lease ended, which
/// was before central granted this one the ID, so they land within the
/// settle period after that grant, or never.
#[derive(Debug, Default)]
struct LateWrites {
    expected: bool,
    settle: Duration,
    granted_at: Option<Instant>,
    /// A write of this process's own that got no answer may land until then.
    own_until: Option<Instant>,
}

impl Link {
    pub fn new(id: &str, session: Session, sealer: Sealer) -> Link {
        Link {
            id: id.to_string(),
            session,
            sealer,
            central: AtomicU64::new(0),
            grant: Mutex::default(),
            resumed: Notify::new(),
            changed: Notify::new(),
            skew_ms: Default::default(),
            skew_known: AtomicBool::new(false),
            unanswered: AtomicU32::new(0),
            late: Mutex::default(),
        }
    }

    fn late(&self) -> std::sync::MutexGuard<'_, LateWrites> {
        self.late.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This site's settle period (`--upstream-settle`).
    pub fn set_settle(&self, settle: Duration) {
        self.late().settle = settle;
    }

    /// An earlier process may have left writes on their way to the site.
    pub fn expect_late_writes(&self) {
        self.late().expected = true;
    }

    /// Until when writes an earlier process left may still land: nothing
    /// that could meet them (a look for what an op made, a state read) is
    /// done before. `None` when none are expected, or once past.
    pub fn late_writes_until(&self) -> Option<Instant> {
        let late = self.late();
        // Not granted yet: nothing is applied anyway; count from now.
        let earlier = late
            .expected
            .then(|| late.granted_at.unwrap_or_else(Instant::now) + late.settle);
        let until = earlier.max(late.own_until)?;
        (until > Instant::now()).then_some(until)
    }

    /// A write this process sent got no answer: it may land until `until`.
    pub fn own_write_in_doubt(&self, until: Instant) {
        let mut late = self.late();
        late.own_until = late.own_until.max(Some(until));
    }

    /// Whether writes an earlier process left are waited for, and were not
    /// yet waited out (a grant came, and the settle period after it passed).
    pub fn earlier_writes_pending(&self) -> bool {
        let late = self.late();
        late.expected
            && late
                .granted_at
                .is_none_or(|at| Instant::now() < at + late.settle)
    }

    fn grant(&self) -> std::sync::MutexGuard<'_, GrantState> {
        self.grant.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Central's session, as last heard.
    pub fn central(&self) -> u64 {
        self.central.load(Ordering::Relaxed)
    }

    /// A control message for central, addressed to its current session.
    pub fn seal<T: Serialize>(&self, kind: &'static str, msg: &T) -> Vec<u8> {
        self.session
            .seal(&self.sealer, kind, &self.id, self.central(), msg)
    }

    /// Opens a control message from central: addressed to this process's
    /// session, from central's current session or a newer one.
    pub fn open<T: DeserializeOwned>(
        &self,
        kind: &'static str,
        payload: &[u8],
    ) -> Result<T, Rejected> {
        let opened = self
            .session
            .open::<T>(&self.sealer, kind, Some(&self.id), payload, false)?;
        if opened.protocol >= 2 {
            let known = self.central.fetch_max(opened.from, Ordering::Relaxed);
            if opened.from < known {
                // A central process that has since been replaced.
                return Err(Rejected::Fenced);
            }
        }
        Ok(opened.msg)
    }

    /// Whether ops from the stream may be applied now.
    pub fn may_apply(&self) -> bool {
        let g = self.grant();
        !g.resync && g.until.is_some_and(|u| Instant::now() < u)
    }

    /// Whether this process's lease ran out without central saying anything
    /// else (its hellos answered late, or not at all): central has not given
    /// the ID to another process, so the op stream is held, not dropped, and
    /// taken again once granted (each op would otherwise come again by replay).
    pub fn lapsed(&self) -> bool {
        let g = self.grant();
        g.until.is_some_and(|u| Instant::now() >= u)
    }

    /// When the lease held now runs out (None: none held now).
    pub fn lease_end(&self) -> Option<Instant> {
        self.grant().until.filter(|u| Instant::now() < *u)
    }

    /// Whether this process holds the edge's ID now (a resync may apply).
    pub fn holds(&self) -> bool {
        let g = self.grant();
        g.until.is_some_and(|u| Instant::now() < u)
    }

    /// The op stream may go on: central's resync of this edge is done.
    pub fn resync_done(&self) {
        self.grant().resync = false;
        self.changed.notify_one();
    }

    /// Takes central's answer to a hello sent at `sent`; returns whether the
    /// hello should be sent again at once (central asked to be addressed).
    fn answered(&self, reply: HelloReply, sent: Instant, sent_ms: i64, status: &Status) -> bool {
        self.unanswered.store(0, Ordering::Relaxed);
        // The edge's clock less central's, central's taken at the midpoint.
        let skew = (sent_ms + now_ms()) / 2 - reply.now_ms;
        self.skew_ms.store(skew, Ordering::Relaxed);
        if !self.skew_known.swap(true, Ordering::Relaxed)
            && skew.unsigned_abs() > SKEW_WARNING.as_millis() as u64
        {
            warn!(
                skew_ms = skew,
                "this host's clock is off central's; replay protection does not depend on it, \
                 but timestamps in logs and lag figures do: check NTP"
            );
        }
        if let Some(w) = &reply.warning {
            warn!(warning = %w, "central");
        }
        status.set_warning(reply.warning.clone());
        let mut lapsed = false;
        let (why_not, again) = {
            let mut g = self.grant();
            let before = (g.until.is_some(), g.resync);
            let out = match &reply.grant {
                Grant::Granted {
                    lease_ms,
                    earlier_holder,
                } => {
                    let held = g.until.is_some_and(|u| Instant::now() < u);
                    if !held && g.until.is_some() {
                        lapsed = true;
                    }
                    g.until = Some(sent + Duration::from_millis(*lease_ms));
                    g.resync = false;
                    // Got the ID from another process: what that one sent
                    // lands within the settle period after this grant.
                    let mut late = self.late();
                    if *earlier_holder && !held {
                        late.expected = true;
                        late.granted_at = Some(Instant::now());
                    } else if late.granted_at.is_none() {
                        late.granted_at = Some(Instant::now());
                    }
                    (None, false)
                }
                Grant::Resync {
                    lease_ms,
                    reason,
                    earlier_holder,
                } => {
                    let held = g.until.is_some_and(|u| Instant::now() < u);
                    if !held && g.until.is_some() {
                        lapsed = true;
                    }
                    g.until = Some(sent + Duration::from_millis(*lease_ms));
                    g.resync = true;
                    // The ID's last holder ran on another database: what it
                    // sent is unknown here.
                    let mut late = self.late();
                    late.expected |= *earlier_holder;
                    if !held || late.granted_at.is_none() {
                        late.granted_at = Some(Instant::now());
                    }
                    drop(late);
                    (
                        Some(format!(
                            "waiting for central's resync of this edge before applying ops: {reason}"
                        )),
                        false,
                    )
                }
                Grant::Introduce => (None, true),
                Grant::Wait { reason } => {
                    g.until = None;
                    (Some(reason.clone()), false)
                }
                Grant::Superseded { reason } => {
                    // Not for ever: once the newer process is gone, central
                    // may grant this one the ID again (resyncing it if need be).
                    g.until = None;
                    (Some(reason.clone()), false)
                }
                Grant::Refused { reason } => {
                    g.until = None;
                    (Some(reason.clone()), false)
                }
            };
            // An answer that came after its own lease ran out grants nothing.
            lapsed &= g.until.is_some_and(|u| Instant::now() < u);
            if (g.until.is_some(), g.resync) != before {
                self.changed.notify_one();
            }
            out
        };
        if lapsed {
            // Ops that came while it had lapsed waited in the subscription.
            // Hellos answered later than the lease (a host short of CPU, a
            // slow broker path, central restarting) cause it.
            self.resumed.notify_one();
            let n = status.lease_lapses.fetch_add(1, Ordering::Relaxed) + 1;
            info!(
                lapses = n,
                "central granted this edge its ID again after its lease lapsed (a hello answered late)"
            );
        }
        if !again {
            if let Some(w) = &why_not {
                if status.grant_error().as_deref() != Some(w.as_str()) {
                    warn!(reason = %w, "this edge applies no op for now");
                }
            } else if status.grant_error().is_some() {
                info!("central granted this edge its ID: applying ops");
            }
            status.set_grant_error(why_not);
        }
        again
    }

    /// A hello got no answer (or one that could not be read).
    fn unanswered(&self, why: String, status: &Status) {
        let n = self.unanswered.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= UNANSWERED {
            status.set_grant_error(Some(why));
        }
    }
}

/// What a hello is made of, read when it is sent.
pub struct Hellos {
    pub link: Arc<Link>,
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub status: Arc<Status>,
    pub store: EdgeStore,
    pub interval: Duration,
    /// Asks central for an initial sync until one completed here.
    pub initial_sync: bool,
    /// This edge's database's own ID.
    pub database: String,
}

impl Hellos {
    /// How long a grant lasts: three hellos, so one lost does not stop the edge.
    pub fn lease(&self) -> Duration {
        (self.interval * 3).max(Duration::from_secs(1))
    }

    async fn hello(&self, leaving: bool) -> Hello {
        let initial_sync =
            self.initial_sync && !self.store.flag(INITIAL_SYNC_DONE).await.unwrap_or(false);
        Hello {
            edge: self.link.id.clone(),
            cursor: self.status.cursor.load(Ordering::Relaxed),
            version: env!("CARGO_PKG_VERSION").to_string(),
            error: self.status.error(),
            outcomes_through: self.store.outcomes_through().await.ok(),
            initial_sync,
            boot: Some(self.link.session.id().to_string()),
            protocol: Some(PROTOCOL),
            lease_ms: Some(self.lease().as_millis() as u64),
            leaving,
            database: Some(self.database.clone()),
            connects: Some(self.client.statistics().connects.load(Ordering::Relaxed)),
            asks_in_hand: Some(self.status.asks_in_hand.load(Ordering::Relaxed)),
        }
    }

    /// Says hello and takes the answer; true when it should be said again now.
    async fn once(&self, leaving: bool) -> bool {
        let hello = self.hello(leaving).await;
        let sent = Instant::now();
        let sent_ms = now_ms();
        let payload = self.link.seal(HELLO, &hello);
        let timeout = self
            .interval
            .clamp(Duration::from_secs(1), Duration::from_secs(5));
        let answer = tokio::time::timeout(
            timeout,
            self.client
                .request(self.subjects.hello(&self.link.id), payload.into()),
        )
        .await;
        let msg = match answer {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                debug!(error = %e, "hello not answered");
                self.link.unanswered(
                    "central does not answer this edge's hellos: is it running, reachable \
                     through the broker, and of this version or newer (upgrade central first)?"
                        .into(),
                    &self.status,
                );
                return false;
            }
            Err(_) => {
                self.link.unanswered(
                    "central does not answer this edge's hellos in time: is it running, and of \
                     this version or newer (upgrade central first)?"
                        .into(),
                    &self.status,
                );
                return false;
            }
        };
        match self.link.open::<HelloReply>(HELLO_REPLY, &msg.payload) {
            Ok(reply) => self.link.answered(reply, sent, sent_ms, &self.status),
            Err(why) => {
                // Central says why it refused, in clear and without secrets.
                let refusal = serde_json::from_slice::<serde_json::Value>(&msg.payload)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string));
                let text = match refusal {
                    Some(r) => format!(
                        "central refuses this edge's hellos ({r}): is the sync key the same, \
                         and this edge declared at central (--edges)?"
                    ),
                    None => format!("central's answer to a hello was dropped: {why}"),
                };
                self.status.rejected.fetch_add(1, Ordering::Relaxed);
                self.link.unanswered(text, &self.status);
                false
            }
        }
    }

    /// Says hello every interval until `stop`, then once more to leave.
    pub async fn run(self, mut stop: watch::Receiver<bool>, poke: Arc<Notify>) {
        loop {
            // Addressed anew at most once in a row (central restarted).
            if self.once(false).await {
                self.once(false).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = poke.notified() => {}
                _ = crate::serve::stopped(&mut stop) => break,
            }
        }
        if self.link.holds() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.once(true)).await;
        }
    }
}
