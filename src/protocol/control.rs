//! The sync control plane: acks, hellos, replay requests, outcome answers,
//! re-drives and outcome requests travel sealed with the sync key (AES-256-GCM),
//! bound to their kind and to the edge they concern, and stamped so that a
//! message captured from the broker cannot be played again. A broker client
//! without the key can neither mark a delivery applied nor register an edge; an
//! op ID or a Keystone error text never crosses the broker in clear.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::crypto::{OpenError, Sealer};

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
    /// A random number drawn when the sender started.
    boot: u64,
    /// Counts the sender's messages of this kind since it started.
    n: u64,
    /// The sender's clock, in milliseconds since the epoch.
    sent_ms: i64,
    msg: T,
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
    #[error("a message seen before, or older than the last one")]
    Replayed,
    #[error("stamped too far from this clock")]
    Stale,
    #[error("from an edge that is not declared")]
    UnknownEdge,
}

impl Rejected {
    pub const ALL: [Rejected; 6] = [
        Rejected::Malformed,
        Rejected::Forged,
        Rejected::WrongEdge,
        Rejected::Replayed,
        Rejected::Stale,
        Rejected::UnknownEdge,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::Forged => "forged",
            Rejected::WrongEdge => "wrong_edge",
            Rejected::Replayed => "replayed",
            Rejected::Stale => "stale",
            Rejected::UnknownEdge => "unknown_edge",
        }
    }
}

/// How far a stamp may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(600);

fn aad(kind: &str, edge: &str) -> String {
    format!("syncgate-ctl:{kind}:{edge}")
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Seals control messages for one sender: its boot number and counters.
pub struct Sender {
    boot: u64,
    counters: Mutex<HashMap<&'static str, u64>>,
}

impl Default for Sender {
    fn default() -> Self {
        Sender {
            boot: u64::from_le_bytes(
                uuid::Uuid::new_v4().as_bytes()[..8]
                    .try_into()
                    .expect("eight bytes"),
            ),
            counters: Mutex::default(),
        }
    }
}

impl Sender {
    /// The wire form of `msg`, a message of `kind` concerning `edge`.
    pub fn seal<T: Serialize>(
        &self,
        sealer: &Sealer,
        kind: &'static str,
        edge: &str,
        msg: &T,
    ) -> Vec<u8> {
        let n = {
            let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
            let c = counters.entry(kind).or_insert(0);
            *c += 1;
            *c
        };
        let stamped = Stamped {
            boot: self.boot,
            n,
            sent_ms: now_ms(),
            msg,
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
}

/// A stamp: the sender's boot number, its count, its clock.
type Stamp = (u64, u64, i64);

/// The last accepted stamp per (edge, kind): a message is taken once, in order.
#[derive(Default)]
pub struct Receiver {
    last: Mutex<HashMap<(String, &'static str), Stamp>>,
}

impl Receiver {
    /// Opens a control message of `kind`. `edge` is the edge its subject names,
    /// when the subject names one. Returns the edge and the message.
    pub fn open<T: DeserializeOwned>(
        &self,
        sealer: &Sealer,
        kind: &'static str,
        edge: Option<&str>,
        payload: &[u8],
    ) -> Result<(String, T), Rejected> {
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
        let now = now_ms();
        if stamped.sent_ms.abs_diff(now) > MAX_SKEW.as_millis() as u64 {
            return Err(Rejected::Stale);
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let key = (sealed.edge.clone(), kind);
        if let Some(&(boot, n, sent_ms)) = last.get(&key) {
            let fresh = if boot == stamped.boot {
                stamped.n > n
            } else {
                // A restarted sender: newer than anything taken from it before.
                stamped.sent_ms > sent_ms
            };
            if !fresh {
                return Err(Rejected::Replayed);
            }
        }
        last.insert(key, (stamped.boot, stamped.n, stamped.sent_ms));
        Ok((sealed.edge, stamped.msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::crypto::generate_key;

    #[test]
    fn sealed_messages_open_once_in_order_and_only_with_the_key_and_binding() {
        let sealer = Sealer::with_key(&generate_key()).unwrap();
        let sender = Sender::default();
        let receiver = Receiver::default();
        let first = sender.seal(&sealer, "ack", "e1", &"one");
        let second = sender.seal(&sealer, "ack", "e1", &"two");
        assert!(!String::from_utf8_lossy(&first).contains("one"));
        let (edge, msg): (String, String) =
            receiver.open(&sealer, "ack", Some("e1"), &second).unwrap();
        assert_eq!((edge.as_str(), msg.as_str()), ("e1", "two"));
        // Older than the last one taken, or the same again: replayed.
        assert_eq!(
            receiver
                .open::<String>(&sealer, "ack", Some("e1"), &first)
                .unwrap_err(),
            Rejected::Replayed
        );
        assert_eq!(
            receiver
                .open::<String>(&sealer, "ack", Some("e1"), &second)
                .unwrap_err(),
            Rejected::Replayed
        );
        // Bound to its kind and edge.
        let third = sender.seal(&sealer, "ack", "e1", &"three");
        assert_eq!(
            receiver
                .open::<String>(&sealer, "hello", Some("e1"), &third)
                .unwrap_err(),
            Rejected::Forged
        );
        assert_eq!(
            receiver
                .open::<String>(&sealer, "ack", Some("e2"), &third)
                .unwrap_err(),
            Rejected::WrongEdge
        );
        let mut relabelled: Sealed = serde_json::from_slice(&third).unwrap();
        relabelled.edge = "e2".into();
        assert_eq!(
            receiver
                .open::<String>(
                    &sealer,
                    "ack",
                    None,
                    &serde_json::to_vec(&relabelled).unwrap()
                )
                .unwrap_err(),
            Rejected::Forged
        );
        // Another key, or none.
        let other = Sealer::with_key(&generate_key()).unwrap();
        assert_eq!(
            receiver
                .open::<String>(&other, "ack", Some("e1"), &third)
                .unwrap_err(),
            Rejected::Forged
        );
        assert_eq!(
            receiver
                .open::<String>(
                    &sealer,
                    "ack",
                    Some("e1"),
                    br#"{"seq":1,"outcome":"applied"}"#
                )
                .unwrap_err(),
            Rejected::Malformed
        );
        // A restarted sender is taken when it is newer (a later millisecond).
        let started = now_ms();
        while now_ms() == started {
            std::hint::spin_loop();
        }
        let restarted = Sender::default();
        let after = restarted.seal(&sealer, "ack", "e1", &"after restart");
        assert!(receiver
            .open::<String>(&sealer, "ack", Some("e1"), &after)
            .is_ok());
        assert!(receiver
            .open::<String>(&sealer, "ack", Some("e1"), &third)
            .is_err());
    }
}
