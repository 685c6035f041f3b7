//! A site's identity state, read through Keystone's API, kind by kind, with
//! every entity named by its natural key and every reference between entities
//! translated to the referenced entity's key (IDs differ per site). Two sites'
//! states are compared key by key (`diff`); central's state is also what a
//! resync or a repair applies (`Entity::create` and `Entity::update` are calls
//! at central's IDs, which the edge's applier maps like a replayed op's).
//!
//! Never compared, never shown: passwords (the API never returns them) and
//! credential blobs (a credential is named by a digest of its blob).

use std::collections::{BTreeMap, HashMap, HashSet};

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::client::{encode, ClientError, Identity, KeystoneClient};
use super::ids::is_mappable_id;

/// The kinds a state holds, in the order their creates must be applied (what
/// an entity references is created before it). `service` is read to name the
/// services limits refer to; it is never compared (catalogs are per site).
pub const KINDS: [&str; 18] = [
    "domain",
    "domain_config",
    "project",
    "role",
    "implied_role",
    "group",
    "user",
    "membership",
    "assignment",
    "policy",
    "credential",
    "service",
    "registered_limit",
    "limit",
    "identity_provider",
    "mapping",
    "protocol",
    "service_provider",
];

/// What the op stream replicates and a resync or drift audit cannot read,
/// with why: listed in every resync's result and drift report.
pub const NOT_COVERED: [(&str, &str); 2] = [
    (
        "domain configuration passwords (ldap.password)",
        "the identity service never returns them: a resync copies a domain's configuration \
         without them and a drift audit cannot compare them; write the configuration again \
         through the gateway (or set it at the edge) after a resync",
    ),
    (
        "endpoint policy associations (OS-ENDPOINT-POLICY)",
        "they name endpoints, services and regions, which are each site's own catalog: the \
         identity service lists no association to compare; a resync neither copies nor \
         checks them",
    ),
];

/// `NOT_COVERED` as JSON.
pub fn not_covered() -> Value {
    NOT_COVERED
        .iter()
        .map(|(what, why)| json!({"what": what, "reason": why}))
        .collect()
}

/// Kinds read only to name what others reference.
pub const REFERENCE_ONLY: [&str; 1] = ["service"];

/// One entity of a site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entity {
    pub kind: String,
    /// The natural key, unique within the kind.
    pub key: String,
    /// The site's ID (empty for a relation: a membership, an assignment...).
    #[serde(default)]
    pub id: String,
    /// What is compared: references as keys (`=kind:key`), no secrets.
    pub fields: BTreeMap<String, Value>,
    /// The IDs of this site the entity is or references.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Creates of a lower level come first (a parent project before its child).
    #[serde(default)]
    pub level: u32,
    /// The entity as Keystone shows it (what a create or an update sends);
    /// only central's is used, and it never leaves central unsealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<Value>,
    /// The key as text and references, so that central renders an edge's
    /// key with its own names for the same entities (a rename the edge has
    /// not applied yet does not make another key). Empty: the key is text.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
    /// The compared fields that reference an entity: field -> (kind, ID).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub field_refs: FieldRefs,
    /// The edge maps this entity's own ID from central's (`ids[0]` is then
    /// central's ID): it came from central.
    #[serde(default)]
    pub mapped: bool,
    /// The edge's own service identity depends on it (see `mark_own`): a
    /// resync never deletes it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own: bool,
}

/// The compared fields that reference an entity: field -> (kind, ID).
pub type FieldRefs = BTreeMap<String, (String, String)>;

/// One part of a natural key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Part {
    Text(String),
    /// The key of another entity, as the reading site named it (`shown`).
    Ref {
        kind: String,
        id: String,
        shown: String,
    },
}

/// A key being built: its text and its parts.
struct Key<'a> {
    names: &'a Names,
    text: String,
    parts: Vec<Part>,
}

impl Key<'_> {
    fn t(mut self, text: &str) -> Self {
        self.text.push_str(text);
        match self.parts.last_mut() {
            Some(Part::Text(t)) => t.push_str(text),
            _ => self.parts.push(Part::Text(text.to_string())),
        }
        self
    }

    fn r(mut self, kind: &'static str, id: &str) -> Self {
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

/// A call at a site: method, path, body.
pub type Call = (Method, String, Option<Value>);

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

/// Reads one list; `None` when the site does not serve it (404: an API
/// extension it lacks).
async fn list(
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
async fn list_all(
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

/// Names the credentials of central's `entities` (read with another digester)
/// with `digester`, from their blobs: to compare with an edge that names them
/// so. What has no blob to read is left as it is.
pub fn rename_credentials(entities: &mut [Entity], digester: &Digester) {
    for e in entities.iter_mut().filter(|e| e.kind == "credential") {
        let Some(raw) = e.raw.as_ref() else { continue };
        let (Some(blob), Some(kind)) = (raw["blob"].as_str(), raw["type"].as_str()) else {
            continue;
        };
        let text = format!(" {kind}:{}", digester.digest(blob.as_bytes()));
        let Some(at) = e.key.rfind(&format!(" {kind}:")) else {
            continue;
        };
        e.key.truncate(at);
        e.key.push_str(&text);
        if let Some(Part::Text(last)) = e.parts.last_mut() {
            *last = text;
        }
    }
}

/// Keys of a site's entities by ID, per kind, as they are read.
#[derive(Default)]
struct Names(HashMap<(&'static str, String), String>);

impl Names {
    fn k(&self) -> Key<'_> {
        Key {
            names: self,
            text: String::new(),
            parts: Vec::new(),
        }
    }

    fn add(&mut self, kind: &'static str, id: &str, key: &str) {
        self.0.insert((kind, id.to_string()), key.to_string());
    }
    /// The reference to `kind` `id` as compared: `=kind:key`, or the raw
    /// ID when this site does not know it (a dangling reference).
    fn of(&self, kind: &'static str, id: &str) -> Value {
        match self.0.get(&(kind, id.to_string())) {
            Some(k) => Value::String(format!("={kind}:{k}")),
            None => Value::String(format!("=?{kind}:{id}")),
        }
    }
    fn key(&self, kind: &'static str, id: &str) -> String {
        match self.0.get(&(kind, id.to_string())) {
            Some(k) => k.clone(),
            None => format!("?{id}"),
        }
    }
}

/// Fields never compared: identity, links, and what Keystone computes. The
/// README ("What an edge holds") gives the reasons, and the end-to-end
/// suite's whole-entity comparison leaves out the same (a test checks both).
const NOT_COMPARED: [&str; 5] = [
    "id",
    "links",
    "password_expires_at",
    "is_domain",
    "federated",
];

/// The compared fields of `raw`, with `refs` (field -> referenced kind)
/// translated to keys.
fn fields_of(
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

fn entity(
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

fn relation(kind: &str, key: Key<'_>, ids: Vec<String>, raw: Value) -> Entity {
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

fn str_of<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_default()
}

/// Reads the state of the site `ks` talks to. `progress` is told each kind
/// as it is read.
pub async fn read(ks: &KeystoneClient, digester: &Digester) -> Result<Vec<Entity>, StateError> {
    let mut names = Names::default();
    let mut out: Vec<Entity> = Vec::new();

    // Domains, and their configurations.
    let domains = list_all(ks, "/v3/domains", "domains", &[]).await?;
    let domain_ids: Vec<String> = domains
        .iter()
        .map(|d| str_of(d, "id").to_string())
        .collect();
    for d in &domains {
        names.add("domain", str_of(d, "id"), str_of(d, "name"));
    }
    for d in &domains {
        let key = str_of(d, "name").to_string();
        out.push(entity("domain", names.k().t(&key), d, &[], &names, &[]));
        let id = str_of(d, "id");
        let path = format!("/v3/domains/{}/config", encode(id));
        let reply = ks.send(Method::GET, &path, None).await?;
        if reply.is_success() {
            let config = reply.json().map(|v| v["config"].clone());
            if let Some(config @ Value::Object(_)) = config {
                let fields = config
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let mut e = relation(
                    "domain_config",
                    names.k().r("domain", id),
                    vec![id.to_string()],
                    json!({"domain_id": id, "config": config}),
                );
                e.fields = fields;
                out.push(e);
            }
        } else if reply.status >= 500 || reply.status == 429 {
            return Err(StateError::Http {
                path: "/v3/domains/{id}/config".into(),
                status: reply.status,
                message: reply.message(),
            });
        }
    }

    // Projects: named within their domain; a child after its parent.
    let projects = list_all(ks, "/v3/projects", "projects", &domain_ids).await?;
    for p in &projects {
        let key = format!(
            "{}/{}",
            names.key("domain", str_of(p, "domain_id")),
            str_of(p, "name")
        );
        names.add("project", str_of(p, "id"), &key);
    }
    let parents: HashMap<&str, &str> = projects
        .iter()
        .map(|p| (str_of(p, "id"), str_of(p, "parent_id")))
        .collect();
    for p in &projects {
        let mut level = 0;
        let mut at = str_of(p, "parent_id");
        while let Some(up) = parents.get(at) {
            level += 1;
            at = up;
            if level > 64 {
                break;
            }
        }
        let key = names
            .k()
            .r("domain", str_of(p, "domain_id"))
            .t("/")
            .t(str_of(p, "name"));
        // A top-level project's parent is its domain: nothing to compare.
        let drop: &[&str] = if p["parent_id"] == p["domain_id"] {
            &["parent_id"]
        } else {
            &[]
        };
        let mut e = entity(
            "project",
            key,
            p,
            &[("domain_id", "domain"), ("parent_id", "project")],
            &names,
            drop,
        );
        if let Some(tags) = e.fields.get_mut("tags").and_then(Value::as_array_mut) {
            tags.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        }
        e.level = level;
        out.push(e);
    }

    // Roles: global ones, then each domain's.
    let mut roles = list_all(ks, "/v3/roles", "roles", &[]).await?;
    let mut seen: HashSet<String> = roles.iter().map(|r| str_of(r, "id").to_string()).collect();
    for d in &domain_ids {
        let path = format!("/v3/roles?domain_id={}", encode(d));
        for r in list_all(ks, &path, "roles", &[]).await? {
            if seen.insert(str_of(&r, "id").to_string()) {
                roles.push(r);
            }
        }
    }
    for r in &roles {
        let key = match r["domain_id"].as_str() {
            Some(d) => format!("{}@{}", str_of(r, "name"), names.key("domain", d)),
            None => str_of(r, "name").to_string(),
        };
        names.add("role", str_of(r, "id"), &key);
    }
    for r in &roles {
        let key = match r["domain_id"].as_str() {
            Some(d) => names.k().t(str_of(r, "name")).t("@").r("domain", d),
            None => names.k().t(str_of(r, "name")),
        };
        out.push(entity(
            "role",
            key,
            r,
            &[("domain_id", "domain")],
            &names,
            &[],
        ));
    }
    for r in &roles {
        let prior = str_of(r, "id");
        let path = format!("/v3/roles/{}/implies", encode(prior));
        let reply = ks.send(Method::GET, &path, None).await?;
        if reply.status >= 500 || reply.status == 429 {
            return Err(StateError::Http {
                path: "/v3/roles/{id}/implies".into(),
                status: reply.status,
                message: reply.message(),
            });
        }
        let json = reply.json().unwrap_or(Value::Null);
        for implied in json["role_inference"]["implies"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let i = str_of(implied, "id");
            out.push(relation(
                "implied_role",
                names.k().r("role", prior).t(" -> ").r("role", i),
                vec![prior.to_string(), i.to_string()],
                json!({"path": format!("/v3/roles/{prior}/implies/{i}")}),
            ));
        }
    }

    // Groups and users, named within their domain.
    let groups = list_all(ks, "/v3/groups", "groups", &domain_ids).await?;
    for g in &groups {
        let key = format!(
            "{}/{}",
            names.key("domain", str_of(g, "domain_id")),
            str_of(g, "name")
        );
        names.add("group", str_of(g, "id"), &key);
        let key = names
            .k()
            .r("domain", str_of(g, "domain_id"))
            .t("/")
            .t(str_of(g, "name"));
        out.push(entity(
            "group",
            key,
            g,
            &[("domain_id", "domain")],
            &names,
            &[],
        ));
    }
    let users = list_all(ks, "/v3/users", "users", &domain_ids).await?;
    for u in &users {
        let key = format!(
            "{}/{}",
            names.key("domain", str_of(u, "domain_id")),
            str_of(u, "name")
        );
        names.add("user", str_of(u, "id"), &key);
        let key = names
            .k()
            .r("domain", str_of(u, "domain_id"))
            .t("/")
            .t(str_of(u, "name"));
        out.push(entity(
            "user",
            key,
            u,
            &[("domain_id", "domain"), ("default_project_id", "project")],
            &names,
            &["password"],
        ));
    }
    for g in &groups {
        let gid = str_of(g, "id");
        let path = format!("/v3/groups/{}/users", encode(gid));
        let Some((members, truncated)) = list(ks, &path, "users").await? else {
            continue;
        };
        if truncated {
            return Err(StateError::Truncated { path });
        }
        for u in members {
            let uid = str_of(&u, "id");
            out.push(relation(
                "membership",
                names.k().r("user", uid).t(" in ").r("group", gid),
                vec![gid.to_string(), uid.to_string()],
                json!({"path": format!("/v3/groups/{gid}/users/{uid}")}),
            ));
        }
    }

    // Role assignments, direct ones (inherited included), on every target.
    let mut assignments = Vec::new();
    match list(ks, "/v3/role_assignments", "role_assignments").await? {
        Some((items, false)) => assignments = items,
        Some((_, true)) => {
            for r in &roles {
                let path = format!("/v3/role_assignments?role.id={}", encode(str_of(r, "id")));
                match list(ks, &path, "role_assignments").await? {
                    Some((_, true)) => return Err(StateError::Truncated { path }),
                    Some((items, false)) => assignments.extend(items),
                    None => {}
                }
            }
        }
        None => {}
    }
    for a in &assignments {
        if let Some(e) = assignment(a, &names) {
            out.push(e);
        }
    }

    // Policies, named by their content.
    for p in list_all(ks, "/v3/policies", "policies", &[]).await? {
        let key = format!(
            "{}:{}",
            str_of(&p, "type"),
            digest(str_of(&p, "blob").as_bytes())
        );
        out.push(entity(
            "policy",
            names.k().t(&key),
            &p,
            &[],
            &names,
            &["blob"],
        ));
    }

    // Credentials, named by owner, type and a digest of the blob (a secret).
    for c in list_all(ks, "/v3/credentials", "credentials", &[]).await? {
        let key = names.k().r("user", str_of(&c, "user_id")).t(&format!(
            " {}:{}",
            str_of(&c, "type"),
            digester.digest(str_of(&c, "blob").as_bytes())
        ));
        out.push(entity(
            "credential",
            key,
            &c,
            &[("user_id", "user"), ("project_id", "project")],
            &names,
            &["blob"],
        ));
    }

    // Services (to name what limits are for), registered limits, limits.
    for s in list_all(ks, "/v3/services", "services", &[]).await? {
        let key = format!("{}/{}", str_of(&s, "type"), str_of(&s, "name"));
        names.add("service", str_of(&s, "id"), &key);
        let mut e = entity("service", names.k().t(&key), &s, &[], &names, &[]);
        e.fields.clear();
        out.push(e);
    }
    for r in list_all(ks, "/v3/registered_limits", "registered_limits", &[]).await? {
        let key = names.k().r("service", str_of(&r, "service_id")).t(&format!(
            " {} {}",
            str_of(&r, "region_id"),
            str_of(&r, "resource_name")
        ));
        out.push(entity(
            "registered_limit",
            key,
            &r,
            &[("service_id", "service")],
            &names,
            &[],
        ));
    }
    for l in list_all(ks, "/v3/limits", "limits", &[]).await? {
        let key = names.k().r("service", str_of(&l, "service_id")).t(&format!(
            " {} {} ",
            str_of(&l, "region_id"),
            str_of(&l, "resource_name")
        ));
        let key = match l["project_id"].as_str() {
            Some(p) => key.t("project ").r("project", p),
            None => key.t("domain ").r("domain", str_of(&l, "domain_id")),
        };
        out.push(entity(
            "limit",
            key,
            &l,
            &[
                ("service_id", "service"),
                ("project_id", "project"),
                ("domain_id", "domain"),
            ],
            &names,
            &[],
        ));
    }

    // Federation: identity providers, mappings, protocols, service providers
    // (their IDs are their names, the same at every site).
    let idps = list_all(
        ks,
        "/v3/OS-FEDERATION/identity_providers",
        "identity_providers",
        &[],
    )
    .await?;
    for i in &idps {
        let mut e = entity(
            "identity_provider",
            names.k().t(str_of(i, "id")),
            i,
            &[("domain_id", "domain")],
            &names,
            &[],
        );
        if let Some(ids) = e.fields.get_mut("remote_ids").and_then(Value::as_array_mut) {
            ids.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        }
        out.push(e);
    }
    for m in list_all(ks, "/v3/OS-FEDERATION/mappings", "mappings", &[]).await? {
        out.push(entity(
            "mapping",
            names.k().t(str_of(&m, "id")),
            &m,
            &[],
            &names,
            &[],
        ));
    }
    for i in &idps {
        let idp = str_of(i, "id");
        let path = format!(
            "/v3/OS-FEDERATION/identity_providers/{}/protocols",
            encode(idp)
        );
        for p in list_all(ks, &path, "protocols", &[]).await? {
            let mut e = entity(
                "protocol",
                names.k().t(&format!("{idp}/{}", str_of(&p, "id"))),
                &p,
                &[],
                &names,
                &[],
            );
            e.raw = Some(json!({"idp": idp, "protocol": p}));
            out.push(e);
        }
    }
    for s in list_all(
        ks,
        "/v3/OS-FEDERATION/service_providers",
        "service_providers",
        &[],
    )
    .await?
    {
        out.push(entity(
            "service_provider",
            names.k().t(str_of(&s, "id")),
            &s,
            &[],
            &names,
            &[],
        ));
    }
    Ok(out)
}

/// One role assignment as a relation: role, actor, target, inheritance.
fn assignment(a: &Value, names: &Names) -> Option<Entity> {
    let role = a["role"]["id"].as_str()?;
    let (actor_kind, actor, actor_seg) = match (a["user"]["id"].as_str(), a["group"]["id"].as_str())
    {
        (Some(u), _) => ("user", u, "users"),
        (None, Some(g)) => ("group", g, "groups"),
        _ => return None,
    };
    let scope = &a["scope"];
    let inherited = scope["OS-INHERIT:inherited_to"].as_str() == Some("projects");
    let key = names.k().r("role", role).t(&format!(" to {actor_kind} "));
    let key = match actor_kind {
        "user" => key.r("user", actor),
        _ => key.r("group", actor),
    };
    let (key, target_path, target_id) = if let Some(p) = scope["project"]["id"].as_str() {
        (
            key.t(" on project ").r("project", p),
            format!("projects/{p}"),
            Some(p),
        )
    } else if let Some(d) = scope["domain"]["id"].as_str() {
        (
            key.t(" on domain ").r("domain", d),
            format!("domains/{d}"),
            Some(d),
        )
    } else if scope["system"].is_object() {
        (key.t(" on system"), "system".to_string(), None)
    } else {
        return None;
    };
    let key = if inherited {
        key.t(" (inherited)")
    } else {
        key
    };
    let path = if inherited {
        format!(
            "/v3/OS-INHERIT/{target_path}/{actor_seg}/{actor}/roles/{role}/inherited_to_projects"
        )
    } else {
        format!("/v3/{target_path}/{actor_seg}/{actor}/roles/{role}")
    };
    let mut ids = vec![role.to_string(), actor.to_string()];
    ids.extend(target_id.map(str::to_string));
    Some(relation("assignment", key, ids, json!({"path": path})))
}

/// How two sites differ on one entity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    MissingAtEdge,
    OnlyAtEdge,
    Differs,
}

impl Category {
    pub fn as_str(&self) -> &'static str {
        match self {
            Category::MissingAtEdge => "missing_at_edge",
            Category::OnlyAtEdge => "only_at_edge",
            Category::Differs => "differs",
        }
    }
}

/// One difference, with the entity's IDs at each site and, for `differs`, the
/// names of the fields that differ (never their values).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Difference {
    pub kind: String,
    pub key: String,
    pub category: Category,
    pub fields: Vec<String>,
    pub central: Option<usize>,
    pub edge: Option<usize>,
}

/// Compares central's and an edge's states by natural key; reference-only
/// kinds are not compared.
pub fn diff(central: &[Entity], edge: &[Entity]) -> Vec<Difference> {
    let index = |s: &[Entity]| -> HashMap<(String, String), usize> {
        s.iter()
            .enumerate()
            .map(|(i, e)| ((e.kind.clone(), e.key.clone()), i))
            .collect()
    };
    let at_edge = index(edge);
    let at_central = index(central);
    let mut out = Vec::new();
    for (i, c) in central.iter().enumerate() {
        if REFERENCE_ONLY.contains(&c.kind.as_str()) {
            continue;
        }
        match at_edge.get(&(c.kind.clone(), c.key.clone())) {
            None => out.push(Difference {
                kind: c.kind.clone(),
                key: c.key.clone(),
                category: Category::MissingAtEdge,
                fields: Vec::new(),
                central: Some(i),
                edge: None,
            }),
            Some(&j) => {
                let e = &edge[j];
                let mut fields: Vec<String> = c
                    .fields
                    .keys()
                    .chain(e.fields.keys())
                    .filter(|f| c.fields.get(*f) != e.fields.get(*f))
                    .cloned()
                    .collect();
                fields.dedup();
                fields.sort();
                fields.dedup();
                if !fields.is_empty() {
                    out.push(Difference {
                        kind: c.kind.clone(),
                        key: c.key.clone(),
                        category: Category::Differs,
                        fields,
                        central: Some(i),
                        edge: Some(j),
                    });
                }
            }
        }
    }
    for (j, e) in edge.iter().enumerate() {
        if REFERENCE_ONLY.contains(&e.kind.as_str()) {
            continue;
        }
        if !at_central.contains_key(&(e.kind.clone(), e.key.clone())) {
            out.push(Difference {
                kind: e.kind.clone(),
                key: e.key.clone(),
                category: Category::OnlyAtEdge,
                fields: Vec::new(),
                central: None,
                edge: Some(j),
            });
        }
    }
    out
}

/// Names an edge's entities as central names the same entities: an entity
/// the edge maps from central's ID takes central's key (a rename the edge has
/// not applied is then a difference of the entity, not another entity), and
/// every key and field that references a mapped entity is rendered with
/// central's key for it. What central does not know keeps the edge's name.
pub fn in_central_terms(edge: &mut [Entity], central: &[Entity]) {
    let names: HashMap<(&str, &str), &str> = central
        .iter()
        .filter(|c| !c.id.is_empty())
        .map(|c| ((c.kind.as_str(), c.id.as_str()), c.key.as_str()))
        .collect();
    for e in edge.iter_mut() {
        let own = (e.mapped && !e.id.is_empty())
            .then(|| e.ids.first())
            .flatten()
            .and_then(|id| names.get(&(e.kind.as_str(), id.as_str())));
        if let Some(key) = own {
            e.key = key.to_string();
        } else if !e.parts.is_empty() {
            e.key = e
                .parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => t.as_str(),
                    Part::Ref { kind, id, shown } => names
                        .get(&(kind.as_str(), id.as_str()))
                        .copied()
                        .unwrap_or(shown.as_str()),
                })
                .collect();
        }
        for (field, (kind, id)) in &e.field_refs {
            if let Some(key) = names.get(&(kind.as_str(), id.as_str())) {
                e.fields
                    .insert(field.clone(), Value::String(format!("={kind}:{key}")));
            }
        }
    }
}

/// Whether an entity (central's, or an edge's in central's terms) is one
/// that writes logged during an audit change: its ID or an ID it references,
/// or, for an association, the association itself (`changed`: the op log's
/// keys, see `touches`).
pub fn in_flight(e: &Entity, changed: &HashSet<String>) -> bool {
    if e.ids.iter().any(|id| changed.contains(id)) {
        return true;
    }
    let Some(raw) = e.raw.as_ref() else {
        return false;
    };
    // An edge's association carries its path in central's IDs.
    let path = raw["central_path"]
        .as_str()
        .or_else(|| raw["path"].as_str());
    let Some(path) = path else { return false };
    let kind = match e.kind.as_str() {
        "assignment" if path.starts_with("/v3/OS-INHERIT/") => "inherited_grant",
        "assignment" => "grant",
        "membership" => "group_membership",
        "implied_role" => "implied_role",
        _ => return false,
    };
    changed.contains(&format!("{kind}:{path}"))
}

/// The state kind and key of what a delete central logged removed, named
/// from the natural keys the op carries (read before it was forwarded), when
/// the state holds such things: an entity with a natural key, a membership,
/// an assignment, an implied role.
pub fn deleted_key(path: &str, refs: &[super::EntityRef]) -> Option<(String, String)> {
    let mut names = Names::default();
    let domain_key = |id: &str| -> Option<String> {
        if id == "default" {
            return Some("Default".into());
        }
        refs.iter()
            .find(|r| r.kind == "domain" && r.id == id)
            .map(|r| r.name.clone())
    };
    for r in refs {
        let key = match r.kind.as_str() {
            "domain" => Some(r.name.clone()),
            "project" | "user" | "group" => r
                .domain_id
                .as_deref()
                .and_then(domain_key)
                .map(|d| format!("{d}/{}", r.name)),
            "role" => match r.domain_id.as_deref() {
                Some(d) => domain_key(d).map(|d| format!("{}@{d}", r.name)),
                None => Some(r.name.clone()),
            },
            _ => None,
        };
        if let (Some(key), Some(kind)) = (key, NAMED.iter().find(|k| **k == r.kind)) {
            names.add(kind, &r.id, &key);
        }
    }
    let known = |kind: &'static str, id: &str| names.0.contains_key(&(kind, id.to_string()));
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (kind, key) = match segs.as_slice() {
        ["v3", coll @ ("domains" | "projects" | "users" | "groups" | "roles"), id] => {
            let kind = match *coll {
                "domains" => "domain",
                "projects" => "project",
                "users" => "user",
                "groups" => "group",
                _ => "role",
            };
            if !known(kind, id) {
                return None;
            }
            (kind, names.key(kind, id))
        }
        ["v3", "groups", g, "users", u] if known("group", g) && known("user", u) => (
            "membership",
            names.k().r("user", u).t(" in ").r("group", g).text,
        ),
        ["v3", "roles", p, "implies", i] if known("role", p) && known("role", i) => (
            "implied_role",
            names.k().r("role", p).t(" -> ").r("role", i).text,
        ),
        rest => {
            let (rest, inherited) = match rest {
                ["v3", "OS-INHERIT", inner @ .., "inherited_to_projects"] => (inner, true),
                ["v3", inner @ ..] => (inner, false),
                _ => return None,
            };
            let actor = |seg: &str| match seg {
                "users" => Some("user"),
                "groups" => Some("group"),
                _ => None,
            };
            let key = match rest {
                [t @ ("projects" | "domains"), tid, a, aid, "roles", rid] => {
                    let target = if *t == "projects" {
                        "project"
                    } else {
                        "domain"
                    };
                    let a = actor(a)?;
                    if !(known(target, tid) && known(a, aid) && known("role", rid)) {
                        return None;
                    }
                    names
                        .k()
                        .r("role", rid)
                        .t(&format!(" to {a} "))
                        .r(a, aid)
                        .t(&format!(" on {target} "))
                        .r(target, tid)
                }
                ["system", a, aid, "roles", rid] if !inherited => {
                    let a = actor(a)?;
                    if !(known(a, aid) && known("role", rid)) {
                        return None;
                    }
                    names
                        .k()
                        .r("role", rid)
                        .t(&format!(" to {a} "))
                        .r(a, aid)
                        .t(" on system")
                }
                _ => return None,
            };
            let key = if inherited {
                key.t(" (inherited)")
            } else {
                key
            };
            ("assignment", key.text)
        }
    };
    Some((kind.to_string(), key))
}

/// The kinds named by name (within a domain).
const NAMED: [&str; 5] = ["domain", "project", "user", "group", "role"];

/// The pairs (central ID, edge ID, kind) of entities both sites have under one
/// key whose IDs differ: the edge's ID map must say so.
pub fn matched_ids<'a>(
    central: &'a [Entity],
    edge: &'a [Entity],
) -> impl Iterator<Item = (&'a Entity, &'a Entity)> {
    let at_edge: HashMap<(&str, &str), &Entity> = edge
        .iter()
        .filter(|e| !e.id.is_empty())
        .map(|e| ((e.kind.as_str(), e.key.as_str()), e))
        .collect();
    central.iter().filter_map(move |c| {
        let e = at_edge.get(&(c.kind.as_str(), c.key.as_str()))?;
        (!c.id.is_empty() && c.id != e.id && is_mappable_id(&c.id)).then_some((c, *e))
    })
}

/// The collection path of a kind created by POST, and the JSON key of its body.
fn posted(kind: &str) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        "domain" => ("/v3/domains", "domain"),
        "project" => ("/v3/projects", "project"),
        "role" => ("/v3/roles", "role"),
        "group" => ("/v3/groups", "group"),
        "user" => ("/v3/users", "user"),
        "policy" => ("/v3/policies", "policy"),
        "credential" => ("/v3/credentials", "credential"),
        "registered_limit" => ("/v3/registered_limits", "registered_limit"),
        "limit" => ("/v3/limits", "limit"),
        _ => return None,
    })
}

/// Federation kinds: created by PUT to their URL, updated by PATCH to it.
fn federation_path(e: &Entity) -> Option<String> {
    let id = encode(&e.id);
    Some(match e.kind.as_str() {
        "identity_provider" => format!("/v3/OS-FEDERATION/identity_providers/{id}"),
        "mapping" => format!("/v3/OS-FEDERATION/mappings/{id}"),
        "service_provider" => format!("/v3/OS-FEDERATION/service_providers/{id}"),
        "protocol" => {
            let raw = e.raw.as_ref()?;
            format!(
                "/v3/OS-FEDERATION/identity_providers/{}/protocols/{id}",
                encode(str_of(raw, "idp"))
            )
        }
        _ => return None,
    })
}

/// What a create sends: the entity's raw fields but its ID and computed ones.
fn body_fields(raw: &Value) -> Map<String, Value> {
    let mut m = raw.as_object().cloned().unwrap_or_default();
    for f in NOT_COMPARED {
        m.remove(f);
    }
    m.retain(|_, v| !v.is_null());
    m
}

impl Entity {
    /// The call that creates this (central) entity at a site lacking it, at
    /// central's IDs, and the ID the site's answer gives it.
    pub fn create(&self) -> Option<(Call, Vec<String>)> {
        let raw = self.raw.as_ref()?;
        let created = if is_mappable_id(&self.id) {
            vec![self.id.clone()]
        } else {
            Vec::new()
        };
        match self.kind.as_str() {
            "implied_role" | "membership" | "assignment" => Some((
                (Method::PUT, str_of(raw, "path").to_string(), None),
                created,
            )),
            "domain_config" => Some((
                (
                    Method::PUT,
                    format!("/v3/domains/{}/config", encode(str_of(raw, "domain_id"))),
                    Some(json!({"config": raw["config"]})),
                ),
                created,
            )),
            "identity_provider" | "mapping" | "service_provider" | "protocol" => {
                let path = federation_path(self)?;
                let inner = if self.kind == "protocol" {
                    &raw["protocol"]
                } else {
                    raw
                };
                let mut body = body_fields(inner);
                // Named by the URL: not in a body.
                body.remove("idp_id");
                Some((
                    (Method::PUT, path, Some(json!({ self.kind.clone(): body }))),
                    created,
                ))
            }
            kind => {
                let (path, key) = posted(kind)?;
                let mut body = body_fields(raw);
                if kind == "domain" && is_mappable_id(&self.id) {
                    body.insert("explicit_domain_id".into(), json!(self.id));
                }
                if kind == "project" && raw["parent_id"] == raw["domain_id"] {
                    body.remove("parent_id");
                }
                let body = match kind {
                    // Limits are created in lists.
                    "registered_limit" => json!({"registered_limits": [body]}),
                    "limit" => json!({"limits": [body]}),
                    _ => json!({ key: body }),
                };
                Some(((Method::POST, path.to_string(), Some(body)), created))
            }
        }
    }

    /// The call that gives an existing entity this (central) entity's `fields`,
    /// at central's IDs (the edge's ID map names the edge's entity).
    pub fn update(&self, fields: &[String]) -> Option<Call> {
        let raw = self.raw.as_ref()?;
        let pick = |inner: &Value| -> Map<String, Value> {
            fields
                .iter()
                .map(|f| (f.clone(), inner.get(f).cloned().unwrap_or(Value::Null)))
                .collect()
        };
        match self.kind.as_str() {
            "implied_role" | "membership" | "assignment" | "policy" | "credential" | "service" => {
                None
            }
            "domain_config" => {
                let config = &raw["config"];
                Some((
                    Method::PATCH,
                    format!("/v3/domains/{}/config", encode(str_of(raw, "domain_id"))),
                    Some(json!({"config": pick(config)})),
                ))
            }
            "identity_provider" | "mapping" | "service_provider" | "protocol" => {
                let inner = if self.kind == "protocol" {
                    &raw["protocol"]
                } else {
                    raw
                };
                let mut body = pick(inner);
                body.remove("idp_id");
                Some((
                    Method::PATCH,
                    federation_path(self)?,
                    Some(json!({ self.kind.clone(): body })),
                ))
            }
            kind => {
                let (path, key) = posted(kind)?;
                Some((
                    Method::PATCH,
                    format!("{path}/{}", encode(&self.id)),
                    Some(json!({ key: pick(raw) })),
                ))
            }
        }
    }

    /// The calls that delete this (edge) entity, at the edge's IDs.
    pub fn delete(&self) -> Vec<Call> {
        let Some(raw) = self.raw.as_ref() else {
            return Vec::new();
        };
        match self.kind.as_str() {
            "implied_role" | "membership" | "assignment" => {
                vec![(Method::DELETE, str_of(raw, "path").to_string(), None)]
            }
            "domain_config" => vec![(
                Method::DELETE,
                format!("/v3/domains/{}/config", encode(str_of(raw, "domain_id"))),
                None,
            )],
            "identity_provider" | "mapping" | "service_provider" | "protocol" => {
                federation_path(self)
                    .map(|p| vec![(Method::DELETE, p, None)])
                    .unwrap_or_default()
            }
            "service" => Vec::new(),
            kind => {
                let Some((path, _)) = posted(kind) else {
                    return Vec::new();
                };
                let at = format!("{path}/{}", encode(&self.id));
                let mut calls = Vec::new();
                if kind == "domain" {
                    // Keystone deletes only a disabled domain.
                    calls.push((
                        Method::PATCH,
                        at.clone(),
                        Some(json!({"domain": {"enabled": false}})),
                    ));
                }
                calls.push((Method::DELETE, at, None));
                calls
            }
        }
    }
}

/// Where a kind's creates come in the order of application.
pub fn rank(kind: &str) -> usize {
    KINDS.iter().position(|k| *k == kind).unwrap_or(KINDS.len())
}

/// Marks what the site's service identity `me` needs to act there: its user,
/// the project its token is scoped to and that project's parents, its domains,
/// its roles and what implies them, the groups it is a member of, and the
/// memberships, grants and credentials of its user (and the grants of those
/// groups). Deleting any of them could lock the edge out of its own Keystone.
pub fn mark_own(entities: &mut [Entity], me: &Identity) {
    if me.user_id.is_empty() {
        return;
    }
    let user = me.user_id.as_str();
    let groups: HashSet<String> = entities
        .iter()
        .filter(|e| e.kind == "membership" && e.ids.get(1).map(String::as_str) == Some(user))
        .filter_map(|e| e.ids.first().cloned())
        .collect();
    let parents: HashMap<&str, &str> = entities
        .iter()
        .filter(|e| e.kind == "project")
        .filter_map(|e| {
            let (_, parent) = e.field_refs.get("parent_id")?;
            Some((e.id.as_str(), parent.as_str()))
        })
        .collect();
    let mut projects: HashSet<String> = HashSet::new();
    let mut next = me.project_id.as_deref();
    while let Some(p) = next {
        if !projects.insert(p.to_string()) {
            break;
        }
        next = parents.get(p).copied();
    }
    // The roles of its token, and those its grants (or its groups') give.
    let granted = |e: &Entity| {
        e.kind == "assignment"
            && e.ids
                .get(1)
                .is_some_and(|a| a == user || groups.contains(a))
    };
    let roles: HashSet<String> = me
        .role_ids
        .iter()
        .cloned()
        .chain(
            entities
                .iter()
                .filter(|e| granted(e))
                .filter_map(|e| e.ids.first().cloned()),
        )
        .collect();
    for e in entities.iter_mut() {
        let id = e.id.as_str();
        let actor = e.ids.get(1).map(String::as_str);
        e.own = match e.kind.as_str() {
            "user" => id == user,
            "project" => projects.contains(id),
            "domain" => me.domain_ids.iter().any(|d| d == id),
            "role" => roles.contains(id),
            "implied_role" => e.ids.get(1).is_some_and(|i| roles.contains(i.as_str())),
            "group" => groups.contains(id),
            "membership" => actor == Some(user),
            "assignment" => granted(e),
            "credential" => e.ids.iter().skip(1).any(|i| i == user),
            _ => false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: &str, key: &str, id: &str, fields: Value) -> Entity {
        Entity {
            kind: kind.into(),
            key: key.into(),
            id: id.into(),
            fields: serde_json::from_value(fields).unwrap(),
            ids: vec![id.into()],
            level: 0,
            raw: None,
            parts: Vec::new(),
            field_refs: BTreeMap::new(),
            mapped: false,
            own: false,
        }
    }

    #[test]
    fn the_fields_left_out_are_those_the_readme_and_the_end_to_end_comparison_name() {
        let readme = include_str!("../../README.md");
        let harness = include_str!("../../tests/e2e/harness.py");
        let start = harness.find("MAY_DIFFER = {").expect("the harness's list");
        let end = start + harness[start..].find("\n}\n").unwrap();
        let listed: Vec<&str> = harness[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("    \""))
            .filter_map(|l| l.split('"').next())
            .collect();
        assert_eq!(listed, NOT_COMPARED, "the end-to-end comparison's list");
        for f in NOT_COMPARED {
            assert!(
                readme.contains(&format!("| `{f}` |")),
                "the README lists {f}"
            );
        }
    }

    #[test]
    fn credentials_named_with_a_key_are_renamed_as_an_old_edge_names_them() {
        let (keyed, _) = Digester::random();
        let mut c = e("credential", "", "c1", json!({}));
        c.key = format!("Default/ann totp:{}", keyed.digest(b"pin"));
        c.parts = vec![
            Part::Ref {
                kind: "user".into(),
                id: "u1".into(),
                shown: "Default/ann".into(),
            },
            Part::Text(format!(" totp:{}", keyed.digest(b"pin"))),
        ];
        c.raw = Some(json!({"id": "c1", "type": "totp", "blob": "pin"}));
        assert_ne!(keyed.digest(b"pin"), digest(b"pin"));
        let mut v = vec![c];
        rename_credentials(&mut v, &Digester::Plain);
        assert_eq!(v[0].key, format!("Default/ann totp:{}", digest(b"pin")));
        assert_eq!(
            v[0].parts[1],
            Part::Text(format!(" totp:{}", digest(b"pin")))
        );
        // Keyed digests depend on the key.
        let (other, _) = Digester::random();
        assert_ne!(keyed.digest(b"pin"), other.digest(b"pin"));
        assert!(Digester::from_base64("c2hvcnQ=").is_err());
    }

    #[test]
    fn sites_are_compared_by_natural_key_and_name_only_the_fields_that_differ() {
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let central = vec![
            e(
                "user",
                "Default/alice",
                &a,
                json!({"name": "alice", "email": "a@x"}),
            ),
            e("user", "Default/bob", &b, json!({"name": "bob"})),
            e("service", "identity/keystone", &a, json!({})),
        ];
        let edge = vec![
            e(
                "user",
                "Default/alice",
                &b,
                json!({"name": "alice", "email": "z@x"}),
            ),
            e("user", "Default/carol", &a, json!({"name": "carol"})),
        ];
        let d = diff(&central, &edge);
        let by: Vec<(&str, &str, Vec<String>)> = d
            .iter()
            .map(|x| (x.key.as_str(), x.category.as_str(), x.fields.clone()))
            .collect();
        assert_eq!(
            by,
            vec![
                ("Default/alice", "differs", vec!["email".to_string()]),
                ("Default/bob", "missing_at_edge", vec![]),
                ("Default/carol", "only_at_edge", vec![]),
            ]
        );
        let pairs: Vec<_> = matched_ids(&central, &edge)
            .map(|(c, e)| (c.id.clone(), e.id.clone()))
            .collect();
        assert_eq!(pairs, vec![(a.clone(), b.clone())]);
    }

    #[test]
    fn creates_updates_and_deletes_are_calls_keystone_takes() {
        let id = "c".repeat(32);
        let mut d = e("domain", "acme", &id, json!({}));
        d.raw = Some(json!({"id": id, "name": "acme", "enabled": true, "links": {}}));
        let ((m, p, body), created) = d.create().unwrap();
        assert_eq!((m, p.as_str()), (Method::POST, "/v3/domains"));
        assert_eq!(body.unwrap()["domain"]["explicit_domain_id"], json!(id));
        assert_eq!(created, vec![id.clone()]);
        let (m, p, body) = d.update(&["enabled".into()]).unwrap();
        assert_eq!((m, p), (Method::PATCH, format!("/v3/domains/{id}")));
        assert_eq!(body.unwrap(), json!({"domain": {"enabled": true}}));
        let calls = d.delete();
        assert_eq!(calls.len(), 2, "a domain is disabled, then deleted");

        let mut l = e("limit", "k", &id, json!({}));
        l.raw = Some(
            json!({"id": id, "service_id": "s", "resource_name": "cores", "resource_limit": 5}),
        );
        let ((_, p, body), _) = l.create().unwrap();
        assert_eq!(p, "/v3/limits");
        assert!(
            body.unwrap()["limits"][0].get("id").is_none(),
            "limits refuse an id"
        );

        let names = Names::default();
        let mut a = relation(
            "assignment",
            names.k().t("k"),
            vec![],
            json!({"path": "/v3/projects/p/users/u/roles/r"}),
        );
        a.raw = Some(json!({"path": "/v3/projects/p/users/u/roles/r"}));
        assert_eq!(a.create().unwrap().0 .0, Method::PUT);
        assert_eq!(a.delete()[0].0, Method::DELETE);
    }

    #[test]
    fn an_assignment_is_named_by_role_actor_target_and_inheritance() {
        let mut names = Names::default();
        names.add("role", "r1", "member");
        names.add("user", "u1", "Default/alice");
        names.add("project", "p1", "Default/demo");
        let a = json!({"role": {"id": "r1"}, "user": {"id": "u1"},
                       "scope": {"project": {"id": "p1"}, "OS-INHERIT:inherited_to": "projects"}});
        let e = assignment(&a, &names).unwrap();
        assert_eq!(
            e.key,
            "member to user Default/alice on project Default/demo (inherited)"
        );
        assert_eq!(
            e.raw.unwrap()["path"],
            "/v3/OS-INHERIT/projects/p1/users/u1/roles/r1/inherited_to_projects"
        );
        let s =
            json!({"role": {"id": "r1"}, "group": {"id": "g"}, "scope": {"system": {"all": true}}});
        assert_eq!(
            assignment(&s, &names).unwrap().raw.unwrap()["path"],
            "/v3/system/groups/g/roles/r1"
        );
    }
}
