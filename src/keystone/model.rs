//! The small model every part of `keystone/` shares: route classes and what a
//! route creates, an ID and the kind it names, an entity as a state holds it,
//! and the form an edge replays an op in. It imports nothing else of the crate.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A family of routes the operator turns replication on or off for (`--replicate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteClass {
    Identity,
    Resource,
    Assignment,
    Credentials,
    Policy,
    Limits,
    Federation,
    Catalog,
}

impl RouteClass {
    pub const ALL: [RouteClass; 8] = [
        RouteClass::Identity,
        RouteClass::Resource,
        RouteClass::Assignment,
        RouteClass::Credentials,
        RouteClass::Policy,
        RouteClass::Limits,
        RouteClass::Federation,
        RouteClass::Catalog,
    ];

    /// Every class but catalog: each site has its own endpoint URLs.
    pub fn default_set() -> Vec<RouteClass> {
        Self::ALL
            .into_iter()
            .filter(|c| *c != RouteClass::Catalog)
            .collect()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Identity => "identity",
            RouteClass::Resource => "resource",
            RouteClass::Assignment => "assignment",
            RouteClass::Credentials => "credentials",
            RouteClass::Policy => "policy",
            RouteClass::Limits => "limits",
            RouteClass::Federation => "federation",
            RouteClass::Catalog => "catalog",
        }
    }
}

impl fmt::Display for RouteClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RouteClass {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|c| c.as_str()).collect();
                format!(
                    "unknown route class '{s}' (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// How a write on a route creates its resource, which tells capture where the
/// central ID of the new resource is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creates {
    /// Nothing is created (update, delete, association).
    No,
    /// POST to a collection: Keystone generates the ID and returns it in the body.
    InBody,
    /// PUT to a member URL: the ID is the last path segment.
    FromUrl,
}

/// One write route of a kind.
#[derive(Debug)]
pub struct Route {
    /// Path segments after `/v3`; `*` matches any one segment.
    pub pattern: &'static [&'static str],
    /// Methods that are replicable writes on this route.
    pub methods: &'static [&'static str],
    pub creates: Creates,
}

pub const POST: &[&str] = &["POST"];
pub const PUT: &[&str] = &["PUT"];
pub const DELETE: &[&str] = &["DELETE"];
pub const MEMBER: &[&str] = &["PATCH", "DELETE"];
pub const PUT_DELETE: &[&str] = &["PUT", "DELETE"];
pub const CONFIG: &[&str] = &["PUT", "PATCH", "DELETE"];

/// A route of the catalogue: `route!(InBody, POST, ["users"])`.
macro_rules! route {
    ($creates:ident, $methods:expr, [$($seg:literal),*]) => {
        $crate::keystone::model::Route {
            pattern: &[$($seg),*],
            methods: $methods,
            creates: $crate::keystone::model::Creates::$creates,
        }
    };
}
pub(crate) use route;

/// The outcome of classifying a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// A write that changes identity data of a replicable class.
    Replicable(RouteMatch),
    /// A request that is never an op: reads, token flows, site-local resources,
    /// routes the table does not know.
    NotReplicated(Reason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteMatch {
    pub class: RouteClass,
    pub kind: &'static str,
    pub creates: Creates,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Read,
    /// Token issue, revocation, federation logins, OAuth flows, EC2/S3 token checks.
    TokenFlow,
    /// Application credentials, access rules and trusts: only their owner may create them.
    SiteLocal,
    /// A write on a path the table does not know.
    UnknownRoute,
}

/// How a kind's entities are named apart from their IDs (which differ per site).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NaturalKey {
    /// None: found only by ID or by content.
    None,
    /// A name unique in the site (a domain).
    Name,
    /// A name unique within a domain (`default` when none is given).
    NameInDomain,
    /// A name global, or unique within a domain when it has one (a role).
    NameGlobalOrInDomain,
    /// `<type>/<name>` (a service: the catalog is each site's own, so what
    /// names one names the site's service of that type and name).
    TypeAndName,
}

impl NaturalKey {
    /// Named by name (within a domain).
    pub fn by_name(self) -> bool {
        matches!(
            self,
            NaturalKey::Name | NaturalKey::NameInDomain | NaturalKey::NameGlobalOrInDomain
        )
    }
}

/// Whether a string is a Keystone-generated ID (32 hex digits).
pub fn is_mappable_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// An ID named by a request, with the kind of entity it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRef {
    pub id: String,
    pub kind: &'static str,
}

/// An entity named by its natural key: name within a domain (a global role has
/// no domain). `domain_id` is central's domain ID; the domain has its own ref.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntityRef {
    pub id: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub domain_id: Option<String>,
}

/// A request to send: method, path, body.
pub type Call = (String, String, Option<Value>);

/// What an edge sends for an op.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    pub method: String,
    pub path: String,
    pub body: Option<Value>,
    /// The kind the call makes, as a look for it or an adoption names it
    /// (a project acting as a domain is made, found and adopted as a domain).
    pub kind: String,
    /// A write made first, when it is missing here: what Keystone made at
    /// central on its own for this write (the domain of an identity provider
    /// created without one). Answered 409, it exists already.
    pub first: Option<Call>,
}

impl Replay {
    pub fn as_sent(kind: &str, method: &str, path: &str, body: Option<Value>) -> Replay {
        Replay {
            method: method.to_string(),
            path: path.to_string(),
            body,
            kind: kind.to_string(),
            first: None,
        }
    }
}

/// A call replayed in another form because an admin cannot make it as sent,
/// or because only another form keeps what central made.
pub struct Transform {
    pub method: &'static str,
    pub why: &'static str,
    /// The form to send, from the op's path and body (IDs rewritten) and the
    /// IDs central made; `None`: sent as it is.
    pub apply: fn(&str, Option<&Value>, &[String]) -> Option<Replay>,
}

/// One entity of a site.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entity {
    pub kind: String,
    /// The natural key, unique within the kind.
    pub key: String,
    /// The site's ID (empty for a relation: a membership, a grant...).
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
    /// The edge's own service identity depends on it (see `state::mark_own`):
    /// a resync never deletes it.
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

/// A call at a site that a resync or a repair makes: method, path, body.
pub type Write = (Method, String, Option<Value>);
