//! The kit a catalogue entry reads and writes a site's state with: reading a
//! list whole (or failing), naming entities by natural key (`Names`, `Key`),
//! the entity an answer becomes, and the calls that create, update and delete
//! an entity at a site. Nothing here knows a kind; `kinds/` does.

use std::collections::{BTreeMap, HashMap, HashSet};

use reqwest::Method;
use serde_json::{Map, Value};

use super::client::{encode, ClientError, KeystoneClient};
use super::model::{Entity, FieldRefs, Part};

/// What every kind's reader shares while a site's state is read.
#[derive(Default)]
pub struct Sheet {
    pub names: Names,
    pub out: Vec<Entity>,
    /// The site's domain IDs (read first): a truncated list is read again
    /// per domain.
    pub domain_ids: Vec<String>,
    /// What a kind's reader listed, for the kinds read from it (roles for
    /// their implications and grants, groups for their members, identity
    /// providers for their protocols), by kind.
    pub listed: HashMap<&'static str, Vec<Value>>,
}

impl Sheet {
    /// What `kind`'s reader listed (empty when it listed nothing).
    pub fn listed(&self, kind: &str) -> &[Value] {
        self.listed.get(kind).map(Vec::as_slice).unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("reading {path}: HTTP {status}: {message}")]
    Http {
        path: String,
        status: u16,
        message: String,
    },
    #[error(
        "{path} is truncated by the identity service's list_limit (even per domain where it is \
         read per domain); raise [DEFAULT] list_limit (or the section's) in keystone.conf for the \
         sync account's reads"
    )]
    Truncated { path: String },
    #[error("{path} could not be read whole: {why}")]
    Unreadable { path: String, why: String },
}

impl StateError {
    /// Whether reading again may succeed: the service could not be reached,
    /// did not answer in time, or failed for now (5xx, 429). A list it
    /// answers truncated or in another shape, or refuses, is read the same
    /// way again.
    pub fn is_transient(&self) -> bool {
        match self {
            StateError::Client(e) => match e {
                ClientError::Unreachable(_) | ClientError::InDoubt(_) => true,
                ClientError::AuthRefused { status, .. } => *status >= 500 || *status == 429,
                ClientError::Unreadable(_) | ClientError::BadUrl(_) => false,
            },
            StateError::Http { status, .. } => *status >= 500 || *status == 429,
            StateError::Truncated { .. } | StateError::Unreadable { .. } => false,
        }
    }
}

/// Reads one list; `None` when the site does not serve it (404: an API
/// extension it lacks).
pub async fn list(
    ks: &KeystoneClient,
    path: &str,
    key: &str,
) -> Result<Option<(Vec<Value>, bool)>, StateError> {
    let reply = ks.send(Method::GET, path, None).await?;
    if reply.status == 404 {
        return Ok(None);
    }
    if !reply.is_success() {
        return Err(StateError::Http {
            path: path.split('?').next().unwrap_or(path).to_string(),
            status: reply.status,
            message: reply.message(),
        });
    }
    // A list that cannot be read whole is an error, never an empty list.
    let unreadable = |why: &str| StateError::Unreadable {
        path: path.split('?').next().unwrap_or(path).to_string(),
        why: why.to_string(),
    };
    let json = reply
        .json()
        .ok_or_else(|| unreadable("the answer is not JSON"))?;
    let truncated = match &json["truncated"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        _ => return Err(unreadable("'truncated' is not true or false")),
    };
    let items = json[key]
        .as_array()
        .cloned()
        .ok_or_else(|| unreadable(&format!("the answer has no '{key}' list")))?;
    Ok(Some((items, truncated)))
}

/// Reads a list whole: a list Keystone truncates is read again per domain.
pub async fn list_all(
    ks: &KeystoneClient,
    path: &str,
    key: &str,
    domains: &[String],
) -> Result<Vec<Value>, StateError> {
    let Some((items, truncated)) = list(ks, path, key).await? else {
        return Ok(Vec::new());
    };
    if !truncated {
        return Ok(items);
    }
    if domains.is_empty() {
        // Nothing to read it by part: what it lacks cannot be known.
        return Err(StateError::Truncated {
            path: path.split('?').next().unwrap_or(path).to_string(),
        });
    }
    let sep = if path.contains('?') { '&' } else { '?' };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for d in domains {
        let p = format!("{path}{sep}domain_id={}", encode(d));
        let Some((part, truncated)) = list(ks, &p, key).await? else {
            continue;
        };
        if truncated {
            return Err(StateError::Truncated { path: p });
        }
        for item in part {
            if seen.insert(item["id"].as_str().unwrap_or_default().to_string()) {
                out.push(item);
            }
        }
    }
    Ok(out)
}

/// A short, stable digest (hex) of some bytes: names unnamed content.
pub fn digest(bytes: &[u8]) -> String {
    hex8(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex8(bytes: &[u8]) -> String {
    bytes[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// How a credential's blob (a secret) is named in its key: by HMAC-SHA-256
/// under a key central draws at random and never stores, so a key shown in
/// an audit cannot be tried against guesses offline; by plain SHA-256 only to
/// compare with an edge of 0.1.0.
#[derive(Clone)]
pub enum Digester {
    Keyed(ring::hmac::Key),
    Plain,
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Digester::Keyed(_) => "Digester(hmac-sha256)",
            Digester::Plain => "Digester(sha256)",
        })
    }
}

impl Digester {
    /// A new random key, and the key as base64 (to send, sealed, to an edge).
    pub fn random() -> (Digester, String) {
        use base64::Engine;
        use ring::rand::SecureRandom;
        let mut raw = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut raw)
            .expect("the system RNG works");
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        (Digester::from_raw(&raw), b64)
    }

    /// The digester of a base64 key from central.
    pub fn from_base64(b64: &str) -> Result<Digester, String> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "the digest key is not base64".to_string())?;
        if raw.len() < 16 {
            return Err("the digest key is too short".into());
        }
        Ok(Digester::from_raw(&raw))
    }

    fn from_raw(raw: &[u8]) -> Digester {
        Digester::Keyed(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, raw))
    }

    pub fn keyed(&self) -> bool {
        matches!(self, Digester::Keyed(_))
    }

    pub fn digest(&self, bytes: &[u8]) -> String {
        match self {
            Digester::Keyed(key) => hex8(ring::hmac::sign(key, bytes).as_ref()),
            Digester::Plain => digest(bytes),
        }
    }
}

/// A key being built: its text and its parts.
pub struct Key<'a> {
    names: &'a Names,
    pub text: String,
    pub parts: Vec<Part>,
}

impl Key<'_> {
    pub fn t(mut self, text: &str) -> Self {
        self.text.push_str(text);
        match self.parts.last_mut() {
            Some(Part::Text(t)) => t.push_str(text),
            _ => self.parts.push(Part::Text(text.to_string())),
        }
        self
    }

    pub fn r(mut self, kind: &'static str, id: &str) -> Self {
        let shown = self.names.key(kind, id);
        self.text.push_str(&shown);
        self.parts.push(Part::Ref {
            kind: kind.to_string(),
            id: id.to_string(),
            shown,
        });
        self
    }
}

/// Keys of a site's entities by ID, per kind, as they are read.
#[derive(Default)]
pub struct Names(HashMap<(&'static str, String), String>);

impl Names {
    pub fn k(&self) -> Key<'_> {
        Key {
            names: self,
            text: String::new(),
            parts: Vec::new(),
        }
    }

    /// Whether this site's entity of `kind` `id` is known.
    pub fn knows(&self, kind: &'static str, id: &str) -> bool {
        self.0.contains_key(&(kind, id.to_string()))
    }

    pub fn add(&mut self, kind: &'static str, id: &str, key: &str) {
        self.0.insert((kind, id.to_string()), key.to_string());
    }
    /// The reference to `kind` `id` as compared: `=kind:key`, or the raw
    /// ID when this site does not know it (a dangling reference).
    pub fn of(&self, kind: &'static str, id: &str) -> Value {
        match self.0.get(&(kind, id.to_string())) {
            Some(k) => Value::String(format!("={kind}:{k}")),
            None => Value::String(format!("=?{kind}:{id}")),
        }
    }
    pub fn key(&self, kind: &'static str, id: &str) -> String {
        match self.0.get(&(kind, id.to_string())) {
            Some(k) => k.clone(),
            None => format!("?{id}"),
        }
    }
}

/// Fields never compared: identity, links, and what Keystone computes. The
/// README ("What an edge holds") gives the reasons, and the end-to-end
/// suite's whole-entity comparison leaves out the same (a test checks both).
pub const NOT_COMPARED: [&str; 5] = [
    "id",
    "links",
    "password_expires_at",
    "is_domain",
    "federated",
];

/// The compared fields of `raw`, with `refs` (field -> referenced kind)
/// translated to keys.
pub fn fields_of(
    raw: &Value,
    refs: &[(&str, &'static str)],
    names: &Names,
    drop: &[&str],
) -> (BTreeMap<String, Value>, Vec<String>, FieldRefs) {
    let mut fields = BTreeMap::new();
    let mut ids = Vec::new();
    let mut field_refs = BTreeMap::new();
    if let Some(id) = raw["id"].as_str() {
        ids.push(id.to_string());
    }
    for (k, v) in raw.as_object().into_iter().flatten() {
        // A field set to null is a field not set.
        if NOT_COMPARED.contains(&k.as_str()) || drop.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        let value = match refs.iter().find(|(f, _)| f == k) {
            Some((_, kind)) => match v.as_str() {
                Some(id) => {
                    ids.push(id.to_string());
                    field_refs.insert(k.clone(), (kind.to_string(), id.to_string()));
                    names.of(kind, id)
                }
                None => v.clone(),
            },
            None => v.clone(),
        };
        fields.insert(k.clone(), value);
    }
    (fields, ids, field_refs)
}

pub fn entity(
    kind: &str,
    key: Key<'_>,
    raw: &Value,
    refs: &[(&str, &'static str)],
    names: &Names,
    drop: &[&str],
) -> Entity {
    let (fields, ids, field_refs) = fields_of(raw, refs, names, drop);
    Entity {
        kind: kind.to_string(),
        key: key.text,
        id: raw["id"].as_str().unwrap_or_default().to_string(),
        fields,
        ids,
        level: 0,
        raw: Some(raw.clone()),
        parts: key.parts,
        field_refs,
        mapped: false,
        own: false,
    }
}

pub fn relation(kind: &str, key: Key<'_>, ids: Vec<String>, raw: Value) -> Entity {
    Entity {
        kind: kind.to_string(),
        key: key.text,
        id: String::new(),
        fields: BTreeMap::new(),
        ids,
        level: 0,
        raw: Some(raw),
        parts: key.parts,
        field_refs: BTreeMap::new(),
        mapped: false,
        own: false,
    }
}

pub fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_default()
}

/// What a create sends: the entity's raw fields but its ID and computed ones.
pub fn body_fields(raw: &Value) -> Map<String, Value> {
    let mut m = raw.as_object().cloned().unwrap_or_default();
    for f in NOT_COMPARED {
        m.remove(f);
    }
    m.retain(|_, v| !v.is_null());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_read_is_tried_again_only_where_the_service_failed_for_now() {
        let http = |status| StateError::Http {
            path: "/v3/users".into(),
            status,
            message: String::new(),
        };
        for status in [500, 502, 503, 429] {
            assert!(http(status).is_transient(), "{status}");
        }
        for status in [400, 401, 403] {
            assert!(!http(status).is_transient(), "{status}");
        }
        let client = |e| StateError::Client(e).is_transient();
        assert!(client(ClientError::Unreachable("refused".into())));
        assert!(client(ClientError::InDoubt("timed out".into())));
        let auth = |status| ClientError::AuthRefused {
            status,
            message: String::new(),
        };
        assert!(client(auth(503)));
        assert!(!client(auth(401)));
        assert!(!client(ClientError::Unreadable("another shape".into())));
        let path = "/v3/users".to_string();
        assert!(!StateError::Truncated { path: path.clone() }.is_transient());
        let why = "not JSON".to_string();
        assert!(!StateError::Unreadable { path, why }.is_transient());
    }
}
