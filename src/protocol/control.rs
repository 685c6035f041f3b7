//! The sync control plane: acks, hellos, replay requests, outcome answers,
//! re-drives, resync steps and their answers travel sealed with the sync key
//! (AES-256-GCM), bound to their kind and to the edge they concern, and stamped
//! so that a message captured from the broker cannot be played again.
//!
//! Every process has a **session**: a number drawn at start, higher than any
//! it drew before (kept in its own database), so a restarted process is told
//! from an older one by its number, whatever its clock says. A stamp carries
//! the sender's session, a counter of its messages of that kind, and the
//! session of the receiver it is addressed to. A receiver takes a message only
//! when it is addressed to its own session (nothing sent before it restarted)
//! and its counter is past the last one taken from that sender's session
//! (nothing sent twice). Clocks play no part; the sender's clock travels only
//! so that the receiver can measure and name a skew.
//!
//! Protocol 1 (syncgate 0.1.0) stamped a random boot number, a counter and a
//! clock, and took a restarted sender's messages when they were stamped later
//! than the last one taken. Its messages are read with those rules while
//! `accept_protocol_1` holds, and never from a peer seen speaking protocol 2.
//! A protocol 2 stamp keeps protocol 1's fields, so a peer of 0.1.0 reads it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::crypto::{OpenError, Sealer};

/// The control protocol this version speaks. 3: protocol 2's stamps and
/// rules, and the edge takes operator skips (`messages::Skip`); central asks
/// no edge that said less for one.
pub const PROTOCOL: u8 = 3;

/// What travels: the edge in clear (to pick the binding), the rest sealed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Sealed {
    pub edge: String,
    pub enc: String,
    pub data: String,
}

/// The sealed content: the message and its stamp.
#[derive(Debug, Serialize, Deserialize)]
struct Stamped<T> {
    /// The sender's session (protocol 1: a random number per start).
    boot: u64,
    /// Counts the sender's messages of this kind in this session.
    n: u64,
    /// The sender's clock, in milliseconds since the epoch.
    sent_ms: i64,
    msg: T,
    /// The stamp's protocol (absent: 1).
    #[serde(default)]
    v: u8,
    /// The receiver's session this is addressed to (0: not known yet).
    #[serde(default)]
    to: u64,
}

/// Why a control message was dropped (the label of the rejection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("not a sealed control message")]
    Malformed,
    #[error("cannot be opened with the sync key (forged, altered, or another key)")]
    Forged,
    #[error("names another edge than its subject")]
    WrongEdge,
    #[error("a message taken before, played again")]
    Replayed,
    #[error(
        "addressed to another session of this process (sent before it restarted, or played again)"
    )]
    OtherSession,
    #[error("stamped too far from this clock (protocol 1)")]
    Stale,
    #[error("from an edge that is not declared")]
    UnknownEdge,
    #[error("in protocol 1, which this process no longer takes from that peer")]
    OldProtocol,
    #[error("from a process that no longer holds this edge's ID")]
    Fenced,
}

impl Rejected {
    pub const ALL: [Rejected; 9] = [
        Rejected::Malformed,
        Rejected::Forged,
        Rejected::WrongEdge,
        Rejected::Replayed,
        Rejected::OtherSession,
        Rejected::Stale,
        Rejected::UnknownEdge,
        Rejected::OldProtocol,
        Rejected::Fenced,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::Forged => "forged",
            Rejected::WrongEdge => "wrong_edge",
            Rejected::Replayed => "replayed",
            Rejected::OtherSession => "other_session",
            Rejected::Stale => "stale",
            Rejected::UnknownEdge => "unknown_edge",
            Rejected::OldProtocol => "old_protocol",
            Rejected::Fenced => "fenced",
        }
    }
}

/// How far a protocol 1 stamp may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(600);

/// Sessions of one sender remembered per kind: a message of an older one is
/// taken for a replay.
const SESSIONS_KEPT: usize = 8;

fn aad(kind: &str, edge: &str) -> String {
    format!("syncgate-ctl:{kind}:{edge}")
}

/// Whether `sealer` opens a control message of `kind` at all (its stamp
/// unchecked): to tell an operator which key a sender holds.
pub fn opens_with(sealer: &Sealer, kind: &str, payload: &[u8]) -> bool {
    serde_json::from_slice::<Sealed>(payload).is_ok_and(|sealed| {
        sealer
            .open(&aad(kind, &sealed.edge), &sealed.enc, &sealed.data)
            .is_ok()
    })
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The next session number after `last`: higher than it, and than the clock in
/// milliseconds (so that a process whose database was lost still draws a
/// higher one than before, when its clock is right).
pub fn next_session(last: u64) -> u64 {
    last.saturating_add(1).max(now_ms().max(0) as u64)
}

/// A control message taken: the edge it concerns, and its sender's stamp.
#[derive(Debug)]
pub struct Opened<T> {
    pub edge: String,
    pub msg: T,
    /// The sender's session.
    pub from: u64,
    /// The stamp's protocol.
    pub protocol: u8,
    /// The sender's clock when it sent it.
    pub sent_ms: i64,
    /// Addressed to this process's session (always, unless asked otherwise).
    pub addressed: bool,
}

/// What one receiver took from one sender of one kind.
#[derive(Default)]
struct Taken {
    /// `(sender session, last counter)`, oldest first.
    sessions: Vec<(u64, u64)>,
    /// Protocol 1: the last stamp taken.
    v1: Option<(u64, u64, i64)>,
}

/// This process's end of the control plane: seals what it sends, opens what
/// it receives. One per process, shared by every part that sends or receives.
pub struct Session {
    id: u64,
    accept_protocol_1: bool,
    counters: Mutex<HashMap<&'static str, u64>>,
    taken: Mutex<HashMap<(String, &'static str), Taken>>,
    /// Peers seen speaking protocol 2: protocol 1 is never taken from them again.
    modern: Mutex<HashSet<String>>,
    /// How far this process's clock is moved (drills and tests of a site
    /// whose clock is off: stamps carry it; nothing decides by it).
    clock_offset_ms: std::sync::atomic::AtomicI64,
}

impl Session {
    /// A session numbered `id` (see `next_session`).
    pub fn new(id: u64, accept_protocol_1: bool) -> Session {
        Session {
            id,
            accept_protocol_1,
            counters: Mutex::default(),
            taken: Mutex::default(),
            modern: Mutex::default(),
            clock_offset_ms: Default::default(),
        }
    }

    /// Moves the clock this session stamps with (and judges protocol 1
    /// stamps by) by `ms`: a site whose clock is off, or jumped.
    pub fn set_clock_offset(&self, ms: i64) {
        self.clock_offset_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn now_ms(&self) -> i64 {
        now_ms()
            + self
                .clock_offset_ms
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This process's session number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The wire form of `msg`, a message of `kind` concerning `edge`, addressed
    /// to the receiver's session `to` (0 when it is not known yet).
    pub fn seal<T: Serialize>(
        &self,
        sealer: &Sealer,
        kind: &'static str,
        edge: &str,
        to: u64,
        msg: &T,
    ) -> Vec<u8> {
        let n = {
            let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            let c = counters.entry(kind).or_insert(0);
            *c += 1;
            *c
        };
        let stamped = Stamped {
            boot: self.id,
            n,
            sent_ms: self.now_ms(),
            msg,
            v: PROTOCOL,
            to,
        };
        let plain = serde_json::to_vec(&stamped).expect("a control message serializes");
        let (enc, data) = sealer.seal(&aad(kind, edge), &plain);
        serde_json::to_vec(&Sealed {
            edge: edge.to_string(),
            enc: enc.to_string(),
            data,
        })
        .expect("a sealed message serializes")
    }

    /// Opens a control message of `kind`. `edge` is the edge its subject
    /// names, when it names one. A message addressed to another session is
    /// refused, unless `unaddressed_ok` (a hello, answered with this session's
    /// number and otherwise ignored): it is then returned, `addressed: false`,
    /// without being counted as taken.
    pub fn open<T: DeserializeOwned>(
        &self,
        sealer: &Sealer,
        kind: &'static str,
        edge: Option<&str>,
        payload: &[u8],
        unaddressed_ok: bool,
    ) -> Result<Opened<T>, Rejected> {
        let sealed: Sealed = serde_json::from_slice(payload).map_err(|_| Rejected::Malformed)?;
        if edge.is_some_and(|e| e != sealed.edge) {
            return Err(Rejected::WrongEdge);
        }
        if !super::messages::valid_edge_id(&sealed.edge) {
            return Err(Rejected::Malformed);
        }
        let plain = sealer
            .open(&aad(kind, &sealed.edge), &sealed.enc, &sealed.data)
            .map_err(|e| match e {
                OpenError::Malformed | OpenError::UnknownEncoding(_) => Rejected::Malformed,
                _ => Rejected::Forged,
            })?;
        let stamped: Stamped<T> =
            serde_json::from_slice(&plain).map_err(|_| Rejected::Malformed)?;
        let protocol = stamped.v.max(1);
        let addressed = protocol < 2 || stamped.to == self.id;
        if protocol >= 2 {
            if !addressed {
                if !unaddressed_ok {
                    return Err(Rejected::OtherSession);
                }
            } else {
                self.take(&sealed.edge, kind, stamped.boot, stamped.n)?;
                self.modern
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sealed.edge.clone());
            }
        } else {
            self.take_v1(&sealed.edge, kind, &stamped)?;
        }
        Ok(Opened {
            edge: sealed.edge,
            msg: stamped.msg,
            from: stamped.boot,
            protocol,
            sent_ms: stamped.sent_ms,
            addressed,
        })
    }

    /// Protocol 2: a counter past the last one taken from that session; a
    /// session older than every one remembered is a replay.
    fn take(&self, edge: &str, kind: &'static str, from: u64, n: u64) -> Result<(), Rejected> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let t = taken.entry((edge.to_string(), kind)).or_default();
        match t.sessions.iter_mut().find(|(s, _)| *s == from) {
            Some((_, last)) if n <= *last => return Err(Rejected::Replayed),
            Some((_, last)) => *last = n,
            None => {
                let oldest = t.sessions.first().map(|(s, _)| *s);
                if t.sessions.len() >= SESSIONS_KEPT && oldest.is_some_and(|o| from < o) {
                    return Err(Rejected::Replayed);
                }
                t.sessions.push((from, n));
                t.sessions.sort_unstable();
                if t.sessions.len() > SESSIONS_KEPT {
                    t.sessions.remove(0);
                }
            }
        }
        Ok(())
    }

    /// Protocol 1: within the clock window, and later than the last one taken.
    fn take_v1<T>(
        &self,
        edge: &str,
        kind: &'static str,
        stamped: &Stamped<T>,
    ) -> Result<(), Rejected> {
        let modern = self
            .modern
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(edge);
        if !self.accept_protocol_1 || modern {
            return Err(Rejected::OldProtocol);
        }
        if stamped.sent_ms.abs_diff(self.now_ms()) > MAX_SKEW.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let t = taken.entry((edge.to_string(), kind)).or_default();
        if let Some((boot, n, sent_ms)) = t.v1 {
            let fresh = if boot == stamped.boot {
                stamped.n > n
            } else {
                stamped.sent_ms > sent_ms
            };
            if !fresh {
                return Err(Rejected::Replayed);
            }
        }
        t.v1 = Some((stamped.boot, stamped.n, stamped.sent_ms));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto::generate_key;

    fn sealer() -> Sealer {
        Sealer::with_key(&generate_key()).unwrap()
    }

    #[test]
    fn sealed_messages_open_once_in_order_and_only_with_the_key_and_binding() {
        let sealer = sealer();
        let edge = Session::new(10, false);
        let central = Session::new(20, false);
        let first = edge.seal(&sealer, "ack", "e1", 20, &"one");
        let second = edge.seal(&sealer, "ack", "e1", 20, &"two");
        assert!(!String::from_utf8_lossy(&first).contains("one"));
        let got = central
            .open::<String>(&sealer, "ack", Some("e1"), &second, false)
            .unwrap();
        assert_eq!(
            (got.edge.as_str(), got.msg.as_str(), got.from, got.protocol),
            ("e1", "two", 10, PROTOCOL)
        );
        // Older than the last one taken, or the same again: replayed.
        for again in [&first, &second] {
            assert_eq!(
                central
                    .open::<String>(&sealer, "ack", Some("e1"), again, false)
                    .unwrap_err(),
                Rejected::Replayed
            );
        }
        // Bound to its kind and edge.
        let third = edge.seal(&sealer, "ack", "e1", 20, &"three");
        assert_eq!(
            central
                .open::<String>(&sealer, "hello", Some("e1"), &third, false)
                .unwrap_err(),
            Rejected::Forged
        );
        assert_eq!(
            central
                .open::<String>(&sealer, "ack", Some("e2"), &third, false)
                .unwrap_err(),
            Rejected::WrongEdge
        );
        let mut relabelled: Sealed = serde_json::from_slice(&third).unwrap();
        relabelled.edge = "e2".into();
        assert_eq!(
            central
                .open::<String>(
                    &sealer,
                    "ack",
                    None,
                    &serde_json::to_vec(&relabelled).unwrap(),
                    false
                )
                .unwrap_err(),
            Rejected::Forged
        );
        // Another key, or none.
        assert_eq!(
            central
                .open::<String>(&self::sealer(), "ack", Some("e1"), &third, false)
                .unwrap_err(),
            Rejected::Forged
        );
        assert_eq!(
            central
                .open::<String>(&sealer, "ack", Some("e1"), br#"{"seq":1}"#, false)
                .unwrap_err(),
            Rejected::Malformed
        );
    }

    /// Replay protection rests on sessions, not clocks: a receiver that
    /// restarted takes nothing addressed to its earlier session, a restarted
    /// sender is taken at once whatever its clock, and an older sender
    /// session's messages are told apart.
    #[test]
    fn restarts_end_what_was_captured_and_clocks_play_no_part() {
        let sealer = sealer();
        let edge = Session::new(100, false);
        let central = Session::new(next_session(0), false);
        let before = edge.seal(&sealer, "resync", "e1", central.id(), &"step");
        central
            .open::<String>(&sealer, "resync", Some("e1"), &before, false)
            .unwrap();
        // The receiver restarts: what was addressed to its old session is refused.
        let restarted = Session::new(next_session(central.id()), false);
        assert!(restarted.id() > central.id());
        assert_eq!(
            restarted
                .open::<String>(&sealer, "resync", Some("e1"), &before, false)
                .unwrap_err(),
            Rejected::OtherSession
        );
        // Unless asked (a hello is answered with the session to address).
        let hello = restarted
            .open::<String>(&sealer, "resync", Some("e1"), &before, true)
            .unwrap();
        assert!(!hello.addressed);
        // The sender restarts with its clock far behind: it is still newer.
        let again = Session::new(next_session(edge.id()), false);
        assert_eq!(again.id(), next_session(100));
        let mut late = again.seal(&sealer, "resync", "e1", restarted.id(), &"new");
        let mut sealed: Sealed = serde_json::from_slice(&late).unwrap();
        let plain = sealer
            .open(&aad("resync", "e1"), &sealed.enc, &sealed.data)
            .unwrap();
        let mut stamp: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        stamp["sent_ms"] = serde_json::json!(now_ms() - 3_600_000);
        let (enc, data) = sealer.seal(&aad("resync", "e1"), &serde_json::to_vec(&stamp).unwrap());
        sealed.enc = enc.to_string();
        sealed.data = data;
        late = serde_json::to_vec(&sealed).unwrap();
        let got = restarted
            .open::<String>(&sealer, "resync", Some("e1"), &late, false)
            .unwrap();
        assert_eq!(got.from, again.id());
        // Sessions are told apart: each one's counter on its own.
        let older = edge.seal(&sealer, "resync", "e1", restarted.id(), &"older");
        assert!(restarted
            .open::<String>(&sealer, "resync", Some("e1"), &older, false)
            .is_ok());
        assert_eq!(
            restarted
                .open::<String>(&sealer, "resync", Some("e1"), &older, false)
                .unwrap_err(),
            Rejected::Replayed
        );
    }

    #[test]
    fn protocol_1_is_read_with_its_rules_until_the_peer_speaks_protocol_2() {
        let sealer = sealer();
        // As 0.1.0 sealed it: a random boot, a counter, a clock.
        let v1 = |boot: u64, n: u64, sent_ms: i64| {
            let plain = serde_json::to_vec(&serde_json::json!({
                "boot": boot, "n": n, "sent_ms": sent_ms, "msg": "old"
            }))
            .unwrap();
            let (enc, data) = sealer.seal(&aad("ack", "e1"), &plain);
            serde_json::to_vec(&Sealed {
                edge: "e1".into(),
                enc: enc.to_string(),
                data,
            })
            .unwrap()
        };
        let strict = Session::new(5, false);
        assert_eq!(
            strict
                .open::<String>(&sealer, "ack", Some("e1"), &v1(7, 1, now_ms()), false)
                .unwrap_err(),
            Rejected::OldProtocol
        );
        let central = Session::new(5, true);
        let got = central
            .open::<String>(&sealer, "ack", Some("e1"), &v1(7, 1, now_ms()), false)
            .unwrap();
        assert_eq!((got.protocol, got.msg.as_str()), (1, "old"));
        assert_eq!(
            central
                .open::<String>(&sealer, "ack", Some("e1"), &v1(7, 1, now_ms()), false)
                .unwrap_err(),
            Rejected::Replayed
        );
        assert_eq!(
            central
                .open::<String>(
                    &sealer,
                    "ack",
                    Some("e1"),
                    &v1(8, 1, now_ms() - 3_600_000),
                    false
                )
                .unwrap_err(),
            Rejected::Stale
        );
        // Once the peer speaks protocol 2, protocol 1 is a downgrade.
        let edge = Session::new(9, false);
        central
            .open::<String>(
                &sealer,
                "ack",
                Some("e1"),
                &edge.seal(&sealer, "ack", "e1", 5, &"new"),
                false,
            )
            .unwrap();
        assert_eq!(
            central
                .open::<String>(&sealer, "ack", Some("e1"), &v1(9, 2, now_ms()), false)
                .unwrap_err(),
            Rejected::OldProtocol
        );
        // A protocol 2 stamp keeps the fields protocol 1 reads.
        let sealed: Sealed =
            serde_json::from_slice(&edge.seal(&sealer, "ack", "e1", 5, &"x")).unwrap();
        let plain = sealer
            .open(&aad("ack", "e1"), &sealed.enc, &sealed.data)
            .unwrap();
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct V1 {
            boot: u64,
            n: u64,
            sent_ms: i64,
            msg: String,
        }
        let old: V1 = serde_json::from_slice(&plain).unwrap();
        assert_eq!((old.boot, old.n), (9, 2));
    }
}
