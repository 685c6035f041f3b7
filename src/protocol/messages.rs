//! The sync protocol's messages and subjects (DESIGN section 2). Everything on
//! the wire is JSON; an op's content travels sealed inside an `Envelope`.

pub use crate::keystone::EntityRef;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Control message kinds: each is sealed bound to its kind (see `control`).
pub const ACK: &str = "ack";
pub const HELLO: &str = "hello";
pub const HELLO_REPLY: &str = "hello_reply";
pub const REPLAY: &str = "replay";
pub const REDO: &str = "redo";
pub const SKIP: &str = "skip";
pub const OUTCOMES_REQUEST: &str = "outcomes_request";
pub const OUTCOMES_REPLY: &str = "outcomes_reply";
pub const STATE_REQUEST: &str = "state_request";
pub const STATE_PAGE: &str = "state_page";
pub const RESYNC: &str = "resync";
pub const RESYNC_REPLY: &str = "resync_reply";

/// Subjects under the configured prefix.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_string(),
        }
    }
    pub fn ops(&self) -> String {
        format!("{}.ops", self.prefix)
    }
    /// The ops of one edge with a scope: those in its scope, and a marker
    /// for each of the others, sealed with its edge key.
    pub fn ops_for(&self, edge: &str) -> String {
        format!("{}.ops.{edge}", self.prefix)
    }
    pub fn replay(&self) -> String {
        format!("{}.replay", self.prefix)
    }
    pub fn ack(&self, edge: &str) -> String {
        format!("{}.ack.{edge}", self.prefix)
    }
    pub fn hello(&self, edge: &str) -> String {
        format!("{}.hello.{edge}", self.prefix)
    }
    pub fn redo(&self, edge: &str) -> String {
        format!("{}.redo.{edge}", self.prefix)
    }
    /// Operator skips to one edge (protocol 3).
    pub fn skip(&self, edge: &str) -> String {
        format!("{}.skip.{edge}", self.prefix)
    }
    pub fn outcomes(&self, edge: &str) -> String {
        format!("{}.outcomes.{edge}", self.prefix)
    }
    pub fn state(&self, edge: &str) -> String {
        format!("{}.state.{edge}", self.prefix)
    }
    pub fn resync(&self, edge: &str) -> String {
        format!("{}.resync.{edge}", self.prefix)
    }
    /// Central's inbox prefix.
    pub fn central_inbox(&self) -> String {
        format!("{}.inbox.central", self.prefix)
    }
    /// Where `edge` answers the request of central's that `token` names:
    /// below `central_inbox().<edge>`. An edge's broker user may publish
    /// below its own such prefix only, so no site can answer central's
    /// requests to another.
    pub fn central_inbox_for(&self, edge: &str, token: &str) -> String {
        format!("{}.{edge}.{token}", self.central_inbox())
    }
    /// An edge's inbox prefix: central's replies to that edge's requests
    /// go below it (only that edge's broker user may subscribe there).
    pub fn edge_inbox(&self, edge: &str) -> String {
        format!("{}.inbox.edge.{edge}", self.prefix)
    }
    /// The edge named by the last token of an ack or hello subject.
    pub fn edge_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.rsplit('.').next().filter(|e| !e.is_empty())
    }
}

/// An edge ID: a single subject token of letters, digits, `-` and `_`.
pub fn valid_edge_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One op as it travels: its seq in clear (for ordering), the rest, op ID
/// included, sealed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Envelope {
    pub seq: i64,
    pub enc: String,
    pub data: String,
    /// The W3C trace context of the write the op came from (not secret; also
    /// in a published op's NATS headers, here for replayed ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Envelope {
    /// Associated data binding the sealed content to this seq.
    pub fn aad(seq: i64) -> String {
        format!("syncgate-op:{seq}")
    }
}

/// The state of an op's marker sent to an edge whose scope it is outside.
pub const OUT_OF_SCOPE: &str = "out_of_scope";

/// What a sealed envelope holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpContent {
    pub seq: i64,
    pub op_id: String,
    /// `committed`, `unknown_outcome` (not applied at edges: acked
    /// `skipped`), or `out_of_scope` (a marker of an op outside the edge's
    /// scope: nothing of it but its seq and ID; acked `out_of_scope`).
    pub state: String,
    pub method: String,
    pub path: String,
    pub kind: String,
    pub body: Option<Value>,
    #[serde(default)]
    pub created_ids: Vec<String>,
    /// The natural keys central knows for the IDs the op references.
    #[serde(default)]
    pub refs: Vec<EntityRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayRequest {
    pub from_seq: i64,
    pub limit: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayBatch {
    pub ops: Vec<Envelope>,
    /// The newest seq in the op log when the batch was read.
    pub last_seq: i64,
}

/// An edge's outcome for one op.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Applied,
    Adopted,
    Failed,
    /// Not applied on purpose: the op's outcome at central is unknown.
    Skipped,
    /// Not applied: an operator had the edge pass over it (`POST
    /// /v1/ops/{seq}/skip`, protocol 3). The site may differ from central
    /// (a drift audit shows how; a repair, a resync or a re-drive fixes it).
    /// Never on the wire: its ack says `failed` with `operator_skipped` set,
    /// which a central of an earlier release takes as a failure.
    #[serde(skip)]
    OperatorSkipped,
    /// Not applied: the op is outside the edge's scope (protocol 4; only an
    /// edge with a scope, whose central is of protocol 4, gets such an op).
    OutOfScope,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Adopted => "adopted",
            Outcome::Failed => "failed",
            Outcome::Skipped => "skipped",
            Outcome::OperatorSkipped => "operator_skipped",
            Outcome::OutOfScope => "out_of_scope",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ack {
    pub seq: i64,
    pub op_id: String,
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub detail: Option<String>,
    #[serde(default)]
    pub edge_id_created: Vec<String>,
    /// A `failed` outcome that is an operator's skip (protocol 3): recorded
    /// `operator_skipped`. Absent from other acks; earlier releases ignore it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub operator_skipped: bool,
}

impl Ack {
    /// The delivery state this ack records at central.
    pub fn state(&self) -> &'static str {
        if self.operator_skipped {
            Outcome::OperatorSkipped.as_str()
        } else {
            self.outcome.as_str()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub edge: String,
    pub cursor: i64,
    pub version: String,
    /// Set while the edge cannot apply ops (wrong sync key, halted on failure).
    #[serde(default)]
    pub error: Option<String>,
    /// The highest seq with an outcome at the edge: the cursor, or the op after
    /// it when the edge halted on that op's failure. Central asks for outcomes up
    /// to here that it has not heard (lost acks).
    #[serde(default)]
    pub outcomes_through: Option<i64>,
    /// The edge asks for an initial sync from central's state (`--initial-sync`
    /// and none completed there yet).
    #[serde(default)]
    pub initial_sync: bool,
    /// Per start of the edge (protocol 2: its session number): a new one tells
    /// central that whatever it asked the edge before is lost.
    #[serde(default)]
    pub boot: Option<String>,
    /// The edge's control protocol (absent: 1, which sends hellos without
    /// waiting for an answer).
    #[serde(default)]
    pub protocol: Option<u8>,
    /// How long the edge applies ops on one grant: central hands the edge's ID
    /// to another process only after this long without a hello from it.
    #[serde(default)]
    pub lease_ms: Option<u64>,
    /// The edge is stopping: its ID is free for another process at once.
    #[serde(default)]
    pub leaving: bool,
    /// The edge's database's own ID: a process on another database than the
    /// last holder's is resynced before it applies ops.
    #[serde(default)]
    pub database: Option<String>,
    /// How many times this process has connected to the broker (1 on its
    /// first connection): a new count tells central that what it asked this
    /// process meanwhile, or the answer, may be lost, so it asks again at
    /// once instead of waiting out its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connects: Option<u64>,
    /// How many of central's requests (resync steps, state reads, outcome
    /// requests) the edge is handling now: after a broken connection, one in
    /// hand is still answered; none in hand means the request or its answer
    /// was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asks_in_hand: Option<u32>,
}

/// Central's answer to a hello (protocol 2): may this process apply ops under
/// its edge ID, and if not, why not. Stamped with central's session, which
/// the edge addresses from then on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelloReply {
    pub grant: Grant,
    /// Central's clock when it answered (the edge measures the skew).
    pub now_ms: i64,
    /// Something the edge should show although it may go on (another process
    /// tried to take its ID).
    #[serde(default)]
    pub warning: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "grant", rename_all = "snake_case")]
pub enum Grant {
    /// Apply ops for `lease_ms` from when the hello was sent.
    /// `earlier_holder`: another process held the ID before this one.
    Granted {
        lease_ms: u64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        earlier_holder: bool,
    },
    /// The hello was addressed to another session of central (or to none):
    /// say hello again, to the session this answer is stamped with.
    Introduce,
    /// Another process holds this edge's ID and is alive: apply nothing.
    Wait { reason: String },
    /// A newer process took this edge's ID: apply nothing, ever.
    Superseded { reason: String },
    /// This process holds the ID, but must apply no op from the stream until
    /// central's resync of it is done (initial sync; state lost).
    /// `earlier_holder`: the ID was held by a process on another database,
    /// whose writes may still be on their way to the site.
    Resync {
        lease_ms: u64,
        reason: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        earlier_holder: bool,
    },
    /// Central will not serve this edge until an operator acts.
    Refused { reason: String },
}

/// Central asks an edge (request/reply on `<prefix>.outcomes.<edge>`) for its
/// outcomes in `(after, through]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutcomesRequest {
    pub after: i64,
    pub through: i64,
}

/// An edge's account of `(after, through]`: every op in it that is not listed
/// was applied. `through` may stop short of what was asked (a bounded answer).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OutcomesReply {
    pub through: i64,
    pub exceptions: Vec<Ack>,
}

/// Central re-drives one op at one edge. The edge re-acknowledges an op it
/// applied (never applies it twice), applies the op after its cursor, and
/// re-applies a failed op only while no conflicting later op is applied there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Redo {
    pub op: Envelope,
    /// The first later op that touches what this one touches: when the edge's
    /// cursor has reached it, re-applying this op could undo it.
    #[serde(default)]
    pub unless_applied: Option<i64>,
}

/// Central has an edge pass over one op at an operator's request (protocol 3,
/// on `<prefix>.skip.<edge>`): the op the edge is stuck on (retried, or halted
/// on its failure), or one that failed there. The edge records it
/// `operator_skipped`, with who asked and when, applies nothing of it, and
/// goes on; an op it applied is re-acknowledged as it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Skip {
    pub op: Envelope,
    /// Who asked (as given to the audit API).
    pub by: String,
    /// When central was asked, in milliseconds since the epoch.
    pub at_ms: i64,
}

/// Central asks an edge (request/reply on `<prefix>.state.<edge>`) for one page
/// of its identity state. Page 0 reads the edge's Keystone afresh for `run`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateRequest {
    pub run: String,
    pub page: usize,
    /// The key credentials' blobs are named with (HMAC-SHA-256, base64): it
    /// is central's, random, never stored; an edge of 0.1.0 ignores it and
    /// names them by plain SHA-256 (its pages then say `keyed: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_key: Option<String>,
    /// Central reads kinds by the catalogue's names (and the older ones).
    /// Without it (an older central), an edge names them as older releases
    /// did, which that central compares with its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catalogue_kinds: bool,
}

/// One page of an edge's state; references are named by natural key, IDs the
/// edge maps are given as central's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatePage {
    pub run: String,
    pub page: usize,
    pub pages: usize,
    pub entities: Vec<crate::keystone::state::Entity>,
    /// The edge's cursor before and after it read its Keystone.
    pub cursor_before: i64,
    pub cursor_after: i64,
    /// Why the state could not be read.
    #[serde(default)]
    pub error: Option<String>,
    /// With `error`: reading again may succeed (the edge's identity service
    /// or database failed for now, or it restarted between pages); central asks
    /// again. An edge of 0.1.0 never says so, and its errors end the job.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry: bool,
    /// Credentials are named with the request's digest key.
    #[serde(default)]
    pub keyed: bool,
}

/// One step of a resync or repair, sent by central on `<prefix>.resync.<edge>`
/// (request/reply). While held, the edge applies no op from the stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum ResyncStep {
    /// Stop applying ops (for `hold_ms`, renewed by every step); answers the cursor.
    Hold { hold_ms: u64 },
    /// Record these ID map entries, then apply these ops (independent of each
    /// other: any order, some at once).
    Apply {
        hold_ms: u64,
        #[serde(default)]
        maps: Vec<(String, String, String)>,
        #[serde(default)]
        ops: Vec<OpContent>,
    },
    /// Central's state up to `fence` is applied: the op stream continues after
    /// it; ops up to `uncertain_through` may be applied already.
    Done { fence: i64, uncertain_through: i64 },
    /// Given up: apply ops again from the cursor.
    Release,
}

/// The edge's answer to a step: its cursor, and each op's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResyncReply {
    pub cursor: i64,
    #[serde(default)]
    pub outcomes: Vec<Ack>,
    #[serde(default)]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_of_the_previous_version_is_read_and_a_new_one_adds_only_optional_fields() {
        let old = r#"{"edge":"e1","cursor":7,"version":"0.1.0","error":null,"outcomes_through":7}"#;
        let h: Hello = serde_json::from_str(old).unwrap();
        assert_eq!((h.cursor, h.initial_sync, h.connects), (7, false, None));
        assert_eq!(h.boot, None);
        // Unsaid, the broker connection count is not written either.
        assert!(serde_json::to_value(&h).unwrap().get("connects").is_none());
        let new = serde_json::to_value(Hello {
            initial_sync: true,
            boot: Some("b".into()),
            ..h
        })
        .unwrap();
        // A reader without the new fields ignores them.
        #[derive(Deserialize)]
        struct Previous {
            edge: String,
            cursor: i64,
        }
        let p: Previous = serde_json::from_value(new).unwrap();
        assert_eq!((p.edge.as_str(), p.cursor), ("e1", 7));
    }
}

/// Every message kind as release 0.1.0 (commit 658124e) wrote it
/// (`tests/fixtures/0.1.0`, made by that release's own code): read by this
/// release, and written back with every field that release reads.
#[cfg(test)]
mod release_0_1_0 {
    use super::*;
    use crate::protocol::crypto::Sealer;
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    macro_rules! fixture {
        ($name:literal) => {
            (
                $name,
                include_str!(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/0.1.0/",
                    $name,
                    ".json"
                )),
            )
        };
    }

    /// Every field 0.1.0 wrote is written back with its value (a null may be
    /// left out: that release reads a missing optional field as null).
    fn written_back(old: &Value, new: &Value, at: &str) {
        match (old, new) {
            (Value::Object(o), Value::Object(n)) => {
                for (k, v) in o {
                    match n.get(k) {
                        Some(nv) => written_back(v, nv, &format!("{at}.{k}")),
                        None => assert!(v.is_null(), "{at}.{k} is not written back"),
                    }
                }
            }
            (Value::Array(o), Value::Array(n)) => {
                assert_eq!(o.len(), n.len(), "{at}");
                for (i, (a, b)) in o.iter().zip(n).enumerate() {
                    written_back(a, b, &format!("{at}[{i}]"));
                }
            }
            _ => assert_eq!(old, new, "{at}"),
        }
    }

    fn read<T: DeserializeOwned + Serialize>((name, text): (&str, &str)) -> T {
        let old: Value = serde_json::from_str(text).unwrap();
        let msg: T = serde_json::from_value(old.clone())
            .unwrap_or_else(|e| panic!("{name} of 0.1.0 is not read: {e}"));
        written_back(&old, &serde_json::to_value(&msg).unwrap(), name);
        msg
    }

    #[test]
    fn every_message_kind_of_0_1_0_is_read_and_written_back() {
        let content: OpContent = read(fixture!("op_content"));
        assert_eq!((content.seq, content.kind.as_str()), (42, "user"));
        let envelope: Envelope = read(fixture!("envelope"));
        let batch: ReplayBatch = read(fixture!("replay_batch"));
        assert_eq!(batch.ops, vec![envelope.clone()]);
        let _: ReplayRequest = read(fixture!("replay_request"));
        for (fixture, outcome) in [
            (fixture!("ack_applied"), Outcome::Applied),
            (fixture!("ack_adopted"), Outcome::Adopted),
            (fixture!("ack_failed"), Outcome::Failed),
            (fixture!("ack_skipped"), Outcome::Skipped),
        ] {
            let ack: Ack = read(fixture);
            assert_eq!(ack.outcome, outcome);
        }
        let hello: Hello = read(fixture!("hello"));
        // Protocol 1: no session, lease, database or link of its own.
        assert_eq!(
            (hello.protocol, hello.lease_ms, hello.connects),
            (None, None, None)
        );
        assert!(hello.initial_sync);
        let _: OutcomesRequest = read(fixture!("outcomes_request"));
        let reply: OutcomesReply = read(fixture!("outcomes_reply"));
        assert_eq!(reply.exceptions.len(), 1);
        let redo: Redo = read(fixture!("redo"));
        assert_eq!(redo.op, envelope);
        let request: StateRequest = read(fixture!("state_request"));
        assert_eq!((request.digest_key, request.catalogue_kinds), (None, false));
        let page: StatePage = read(fixture!("state_page"));
        assert_eq!(page.entities.len(), 1);
        assert!(!page.keyed, "0.1.0 names credentials by plain digest");
        assert!(!page.retry, "0.1.0 never says a read may succeed again");
        let json = serde_json::to_value(&page).unwrap();
        assert!(json.get("retry").is_none(), "what 0.1.0 reads: {json}");
        for (fixture, step) in [
            (fixture!("resync_hold"), "hold"),
            (fixture!("resync_apply"), "apply"),
            (fixture!("resync_done"), "done"),
            (fixture!("resync_release"), "release"),
        ] {
            let s: ResyncStep = read(fixture);
            let tag = serde_json::to_value(&s).unwrap()["step"].clone();
            assert_eq!(tag, step);
        }
        let _: ResyncReply = read(fixture!("resync_reply"));
    }

    #[test]
    fn an_op_sealed_by_0_1_0_is_opened_here() {
        let key: Value = serde_json::from_str(fixture!("key").1).unwrap();
        let sealer = Sealer::with_key(key["key"].as_str().unwrap()).unwrap();
        let envelope: Envelope = serde_json::from_str(fixture!("envelope").1).unwrap();
        let plain = sealer
            .open(&Envelope::aad(envelope.seq), &envelope.enc, &envelope.data)
            .expect("an op sealed by 0.1.0 opens");
        let opened: OpContent = serde_json::from_slice(&plain).unwrap();
        let content: OpContent = serde_json::from_str(fixture!("op_content").1).unwrap();
        assert_eq!(opened, content);
        // Bound to its seq as before: another seq does not open it.
        assert!(sealer
            .open(&Envelope::aad(43), &envelope.enc, &envelope.data)
            .is_err());
    }
}
