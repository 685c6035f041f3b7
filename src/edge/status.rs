//! What the edge shows of itself: on its admin listener, in its metrics, and
//! in the hellos it sends central.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

/// What the edge shows on its admin listener.
#[derive(Debug, Default)]
pub struct Status {
    pub cursor: AtomicI64,
    pub id_map_size: AtomicI64,
    pub connected: AtomicBool,
    /// Connected to the broker at least once.
    pub connected_once: AtomicBool,
    pub halted: AtomicBool,
    /// A resync from central holds the op stream.
    pub resync_hold: AtomicBool,
    /// Requests of central (resync steps, state reads, outcome requests)
    /// being handled now: said in hellos, so that central, after a broken
    /// broker connection, can tell a lost request from one still in hand.
    pub asks_in_hand: AtomicU32,
    pub applied: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    /// Ops recorded failed after `--max-attempts` server errors of their own.
    pub given_up: AtomicU64,
    /// Ops passed over at an operator's request.
    pub skipped: AtomicU64,
    /// Grants regained after the lease had lapsed (hellos answered late).
    pub lease_lapses: AtomicU64,
    /// Live ops that showed ops missed before them (each asks for a replay).
    pub stream_gaps: AtomicU64,
    /// Connections to the broker after the first (each is followed by a replay).
    pub broker_reconnects: AtomicU64,
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

/// Counts a request of central as in hand while it lives.
pub struct InHand<'a>(&'a Status);

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.0.asks_in_hand.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Status {
    /// A request of central is in hand until the guard drops.
    pub(super) fn in_hand(&self) -> InHand<'_> {
        self.asks_in_hand.fetch_add(1, Ordering::Relaxed);
        InHand(self)
    }

    pub(super) fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub(super) fn set_grant_error(&self, e: Option<String>) {
        *self.grant_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    pub(super) fn grant_error(&self) -> Option<String> {
        self.grant_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn set_warning(&self, w: Option<String>) {
        *self.warning.lock().unwrap_or_else(|p| p.into_inner()) = w;
    }

    pub(super) fn set_waiting(&self, w: Option<String>) {
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
