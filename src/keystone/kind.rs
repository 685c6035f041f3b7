//! The shape of one catalogue entry (`kinds/`): everything syncgate knows of
//! one Keystone resource kind, as data and small functions that the engines
//! (route classification, ID rewriting, probes, touches, outcome checks, the
//! state reader, resync and drift) iterate. Also the generic reads and writes
//! entries are made of.

use futures_util::future::BoxFuture;
use reqwest::Method;
use serde_json::{json, Map, Value};

use super::client::{encode, ClientError, KeystoneClient};
use super::model::{Creates, Entity, NaturalKey, Route, RouteClass, Transform, Write};
use super::reader::{body_fields, str_of, Digester, Sheet, StateError};

/// One Keystone resource kind.
pub struct Kind {
    /// Its name everywhere: the op log, the audit API, resync, drift, metrics.
    pub name: &'static str,
    /// Names older releases wrote for it (still read from their databases
    /// and from older edges).
    pub was: &'static [&'static str],
    pub class: RouteClass,
    /// Its write routes (empty: only read, to name what others reference).
    pub routes: &'static [Route],
    /// Its collection after `/v3/` (`users`, `OS-EP-FILTER/endpoint_groups`):
    /// one is read at `/v3/<collection>/<id>`; `None` for an association.
    pub collection: Option<&'static str>,
    /// The JSON key of one in a request or an answer (`{"user": {...}}`).
    pub member: &'static str,
    /// Path segments after which a segment is an ID of this kind.
    pub id_segments: &'static [&'static str],
    /// Body fields that name one by ID (`user_id`).
    pub ref_fields: &'static [&'static str],
    /// Body keys whose object names one by its `id` (a federation mapping's
    /// `{"group": {"id": ..}}`).
    pub ref_objects: &'static [&'static str],
    /// The field of Keystone's answer to a create that holds the ID.
    pub id_field: &'static str,
    /// The field of a create's entity through which Keystone takes a
    /// client-given ID (checked on keystone 30.0.0): a replayed create keeps
    /// central's. Most kinds have none (Keystone ignores or refuses `id`).
    pub keeps_id: Option<&'static str>,
    pub key: NaturalKey,
    /// Its write routes name an association of other entities (a grant, a
    /// membership): the association changes, what it joins is referenced.
    pub association: bool,
    /// How a create whose answer was lost is found again.
    pub probe: Probe,
    /// Values Keystone derived at central for a create, put into its replay
    /// from central's answer (see `keystone::inject_derived`).
    pub derive: Option<DeriveFn>,
    /// How central reads again what a create made when its answer was lost.
    pub answer: Answer,
    /// How central tells whether a write it lost the answer to is there.
    pub held: Held,
    /// Calls replayed in another form, by method.
    pub transforms: &'static [Transform],
    /// What a resync and a drift audit make of it.
    pub state: Coverage,
}

/// Puts into a create's replay what Keystone derived at central, from
/// central's answer (`None` when lost); true when the replay changed.
pub type DeriveFn = fn(&Kind, Creates, &mut Value, Option<&Value>) -> bool;

/// Makes the calls that update an entity (central's) at a site: the fields named.
pub type UpdateFn = fn(&Kind, &Entity, &Value, &[String]) -> Option<Write>;

/// How a create is found again at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Not a create, or created by `PUT` at its URL (found at that URL).
    None,
    /// By the ID the create keeps (`keeps_id`), else by natural key.
    KeptIdOrKey,
    /// By the ID the create keeps, only.
    KeptId,
    /// By natural key (an entity acting as a domain, as a domain).
    Key,
    /// By what Keystone keeps unique among its items (`(service, region,
    /// resource)`), each item of a create made in a list.
    Unique(&'static [&'static str]),
    /// Keystone lets two look alike: listed with `query` fields, matched on
    /// `fields`; only one the op could have made may be claimed.
    LookAlike {
        query: &'static [&'static str],
        fields: &'static [&'static str],
    },
    /// An EC2 key: by the credential ID its access key gives it when the
    /// replay carries central's, else any key of the user for the project.
    Ec2Key,
}

/// How central reads again what a create it lost the answer to made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Nothing to read: the request's body is what edges replay.
    None,
    /// The entity at its member URL.
    Entity,
    /// The item at the create's path and its ID.
    AtPath,
}

/// What a write that replaces something holds when it is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// The entity under its member key; a `PUT` is there when its URL answers.
    Member,
    /// A set (`tags`): there only with the same items.
    Set(&'static str),
    /// A configuration under `config`: there when it holds what was sent;
    /// a password in it cannot be checked.
    Config,
}

/// A kind's reader: adds what it reads to the sheet.
pub type ReadFn = for<'a> fn(&'a KeystoneClient, &'a Digester, &'a mut Sheet) -> Reading<'a>;

/// What a reader returns.
pub type Reading<'a> = BoxFuture<'a, Result<(), StateError>>;

/// What a resync and a drift audit make of a kind.
pub enum Coverage {
    /// Read, compared, and written by a resync or a repair. `read` is `None`
    /// when another kind's reader reads it too (grants of both kinds).
    Read {
        read: Option<ReadFn>,
        writes: Writes,
        /// Something of it no read shows (listed in every resync's result
        /// and drift report): what, and why.
        caveat: Option<(&'static str, &'static str)>,
    },
    /// Read only to name what others reference; never compared nor written.
    ReferenceOnly(ReadFn),
    /// Compared as part of another kind (its name), as the reason says.
    PartOf(&'static str, &'static str),
    /// Not read: why. `reported`: listed in every resync's result and drift
    /// report as `what` (the op stream replicates it and nothing repairs it).
    NotRead {
        what: &'static str,
        why: &'static str,
        reported: bool,
    },
}

/// The calls that give a site one of a kind's entities (central's, at
/// central's IDs, which the edge maps), change it, or remove it (the edge's).
#[derive(Clone, Copy)]
pub struct Writes {
    pub create: fn(&Kind, &Entity, &Value) -> Option<Write>,
    pub update: Option<UpdateFn>,
    pub delete: fn(&Kind, &Entity, &Value) -> Vec<Write>,
}

impl Writes {
    /// Created by POST to its collection, changed by PATCH and removed by
    /// DELETE at its member URL.
    pub const POSTED: Writes = Writes {
        create: posted_create,
        update: Some(posted_update),
        delete: posted_delete,
    };
    /// Named by its content (a changed blob is another entity): created and
    /// deleted as `POSTED`, never updated.
    pub const CONTENT: Writes = Writes {
        create: posted_create,
        update: None,
        delete: posted_delete,
    };
    /// An association: put and deleted at the path its reader keeps.
    pub const RELATION: Writes = Writes {
        create: relation_create,
        update: None,
        delete: relation_delete,
    };
}

impl Kind {
    /// Created through its routes (not only read).
    pub fn replicated(&self) -> bool {
        !self.routes.is_empty()
    }

    /// Keystone lets two of it look alike (no unique key).
    pub fn lets_look_alikes(&self) -> bool {
        matches!(self.probe, Probe::LookAlike { .. } | Probe::Ec2Key)
    }

    /// Its member URL for an ID.
    pub fn member_path(&self, id: &str) -> Option<String> {
        Some(format!("/v3/{}/{}", self.collection?, encode(id)))
    }

    /// Its collection's JSON key (the last segment of its collection path).
    pub fn plural(&self) -> Option<&'static str> {
        self.collection.map(|c| c.rsplit('/').next().unwrap_or(c))
    }

    pub fn writes(&self) -> Option<&Writes> {
        match &self.state {
            Coverage::Read { writes, .. } => Some(writes),
            _ => None,
        }
    }

    pub fn reader(&self) -> Option<ReadFn> {
        match self.state {
            Coverage::Read { read, .. } => read,
            Coverage::ReferenceOnly(read) => Some(read),
            _ => None,
        }
    }

    /// The ID of the entity of this kind named `name` at a site (in
    /// `domain_id`; for a role `None` means a global one).
    pub async fn find_by_key(
        &self,
        ks: &KeystoneClient,
        name: &str,
        domain_id: Option<&str>,
    ) -> Result<Option<String>, ClientError> {
        let Some(collection) = self.plural().filter(|_| self.key != NaturalKey::None) else {
            return Ok(None);
        };
        ks.find_by_key(collection, self.key, self.name, name, domain_id)
            .await
    }

    /// The entity of this kind with this ID at a site, `None` when it does
    /// not exist (or the kind is not read by ID).
    pub async fn get(&self, ks: &KeystoneClient, id: &str) -> Result<Option<Value>, ClientError> {
        match self.member_path(id) {
            Some(path) => ks.get_member(&path, self.member, self.name).await,
            None => Ok(None),
        }
    }

    /// `get`, absent only when Keystone says so (see `get_member_strict`).
    pub async fn get_strict(
        &self,
        ks: &KeystoneClient,
        id: &str,
    ) -> Result<Option<Value>, ClientError> {
        match self.member_path(id) {
            Some(path) => ks.get_member_strict(&path, self.member, self.name).await,
            None => Ok(None),
        }
    }

    /// The natural key an entity's JSON carries: (name, domain ID). A domain
    /// has no domain; a role without `domain_id` is global; other named kinds
    /// default to `default`; a service is named `<type>/<name>`.
    pub fn natural_key(&self, entity: &Value) -> Option<(String, Option<String>)> {
        let domain = || {
            entity
                .get("domain_id")
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        match self.key {
            NaturalKey::None => None,
            NaturalKey::TypeAndName => service_key(entity).map(|k| (k, None)),
            NaturalKey::Name => Some((entity.get("name")?.as_str()?.to_string(), None)),
            NaturalKey::NameGlobalOrInDomain => {
                Some((entity.get("name")?.as_str()?.to_string(), domain()))
            }
            NaturalKey::NameInDomain => Some((
                entity.get("name")?.as_str()?.to_string(),
                Some(domain().unwrap_or_else(|| "default".into())),
            )),
        }
    }
}

/// A `<type>/<name>` natural key as an op carries it (in `EntityRef::name`)
/// (a type has no `/`).
pub fn service_key(entity: &Value) -> Option<String> {
    let kind = entity.get("type")?.as_str()?;
    let name = entity.get("name").and_then(Value::as_str).unwrap_or("");
    (!kind.contains('/')).then(|| format!("{kind}/{name}"))
}

/// `POST /v3/<collection>` with `{member: fields}`.
pub fn posted_create(k: &Kind, _e: &Entity, raw: &Value) -> Option<Write> {
    Some((
        Method::POST,
        format!("/v3/{}", k.collection?),
        Some(json!({ k.member: body_fields(raw) })),
    ))
}

/// `PATCH` at its member URL with the fields named.
pub fn posted_update(k: &Kind, e: &Entity, raw: &Value, fields: &[String]) -> Option<Write> {
    Some((
        Method::PATCH,
        k.member_path(&e.id)?,
        Some(json!({ k.member: pick(raw, fields) })),
    ))
}

/// `DELETE` at its member URL.
pub fn posted_delete(k: &Kind, e: &Entity, _raw: &Value) -> Vec<Write> {
    k.member_path(&e.id)
        .map(|at| vec![(Method::DELETE, at, None)])
        .unwrap_or_default()
}

/// `PUT` at the path its reader keeps.
pub fn relation_create(_k: &Kind, _e: &Entity, raw: &Value) -> Option<Write> {
    Some((Method::PUT, str_of(raw, "path").to_string(), None))
}

/// `DELETE` at the path its reader keeps.
pub fn relation_delete(_k: &Kind, _e: &Entity, raw: &Value) -> Vec<Write> {
    vec![(Method::DELETE, str_of(raw, "path").to_string(), None)]
}

/// The named fields of an entity (a field it lacks as null: unset).
pub fn pick(inner: &Value, fields: &[String]) -> Map<String, Value> {
    fields
        .iter()
        .map(|f| (f.clone(), inner.get(f).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// What every entry starts from: a kind with no routes, no key, no probe,
/// not read. An entry names what differs.
pub const BASE: Kind = Kind {
    name: "",
    was: &[],
    class: RouteClass::Identity,
    routes: &[],
    collection: None,
    member: "",
    id_segments: &[],
    ref_fields: &[],
    ref_objects: &[],
    id_field: "id",
    keeps_id: None,
    key: NaturalKey::None,
    association: false,
    probe: Probe::None,
    derive: None,
    answer: Answer::None,
    held: Held::Member,
    transforms: &[],
    state: Coverage::NotRead {
        what: "",
        why: "",
        reported: false,
    },
};

/// A create's answer says which domain Keystone put it in (the token's scope
/// domain at central when the request names none; the edge's own service
/// token would put it elsewhere): the replay names it.
pub fn token_domain(
    k: &Kind,
    creates: Creates,
    request: &mut Value,
    answer: Option<&Value>,
) -> bool {
    if creates != Creates::InBody {
        return false;
    }
    let Some(domain) = answer
        .and_then(|r| r.get(k.member))
        .and_then(|e| e.get("domain_id"))
        .and_then(Value::as_str)
    else {
        return false;
    };
    match request.get_mut(k.member).and_then(Value::as_object_mut) {
        Some(entity) if entity.get("domain_id").is_none_or(Value::is_null) => {
            entity.insert("domain_id".into(), Value::String(domain.to_string()));
            true
        }
        _ => false,
    }
}
