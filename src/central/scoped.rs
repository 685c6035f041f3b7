//! Central's side of per-site scope (`keystone::scope`): each scoped edge's
//! scope and edge key, and what an op becomes for it. An edge with a scope
//! has its own stream (`<prefix>.ops.<edge>`), sealed with its edge key: an op
//! in its scope whole, any other as a marker holding its seq and ID only. It
//! holds no key to the stream every other edge reads.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::keystone::ids::referable;
use crate::keystone::scope::{
    named_ids, names_default, on_system, op_domains, reads_owners, Domains, Scope, OWNERS_READ,
};
use crate::keystone::EntityRef;
use crate::protocol::crypto::{KeyError, Sealer};
use crate::protocol::messages::{Envelope, OpContent, OUT_OF_SCOPE};
use crate::store::{OpRow, Store, StoreError};

/// One edge with a scope.
pub struct ScopedEdge {
    pub scope: Scope,
    /// Its edge keys, derived from the sync keys.
    pub sealer: Sealer,
}

/// The edges with a scope (every other edge gets everything).
#[derive(Default)]
pub struct Scoped(HashMap<String, ScopedEdge>);

impl Scoped {
    pub fn new(sync: &Sealer, scopes: &BTreeMap<String, Scope>) -> Result<Scoped, KeyError> {
        let mut edges = HashMap::new();
        for (edge, scope) in scopes.iter().filter(|(_, s)| !s.is_all()) {
            let sealer = sync.for_edge(edge)?;
            edges.insert(
                edge.clone(),
                ScopedEdge {
                    scope: scope.clone(),
                    sealer,
                },
            );
        }
        Ok(Scoped(edges))
    }

    pub fn get(&self, edge: &str) -> Option<&ScopedEdge> {
        self.0.get(edge)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The scoped edges, in a stable order.
    pub fn sorted(&self) -> Vec<(&str, &ScopedEdge)> {
        let mut all: Vec<_> = self.0.iter().map(|(e, s)| (e.as_str(), s)).collect();
        all.sort_unstable_by_key(|(e, _)| *e);
        all
    }

    /// Each edge's scope as text (what the op log records).
    pub fn texts(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(e, s)| (e.clone(), s.scope.to_string()))
            .collect()
    }
}

/// What an op touches, for per-site scope.
pub struct OpDomains {
    /// The domains it touches (see `domains_touched`).
    pub all: Domains,
}

/// What `op` touches (see `OpDomains`).
pub async fn domains_of(store: &Store, op: &OpRow) -> Result<OpDomains, StoreError> {
    Ok(OpDomains {
        all: domains_touched(store, op).await?,
    })
}

/// The domains `op` touches, from what the op log holds: the natural keys
/// recorded with it and those of the entities it created, domains named from
/// the natural keys central learned.
async fn domains_touched(store: &Store, op: &OpRow) -> Result<Domains, StoreError> {
    let Ok(mut entities) = serde_json::from_str::<Vec<EntityRef>>(&op.refs) else {
        return Ok(Domains {
            unknown: true,
            ..Domains::default()
        });
    };
    let body: Option<Value> = op
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok());
    let mut named = named_ids(&op.path, body.as_ref());
    let created: Vec<String> = serde_json::from_str(&op.created_ids).unwrap_or_default();
    // A project made to act as a domain is a domain, of its own name.
    let as_domain = body
        .as_ref()
        .filter(|b| b["project"]["is_domain"] == Value::Bool(true))
        .and_then(|b| b["project"]["name"].as_str());
    for id in created.iter().filter(|_| referable(&op.kind)) {
        let made = match as_domain {
            Some(name) => Some(EntityRef {
                id: id.clone(),
                kind: crate::keystone::kinds::DOMAIN.name.into(),
                name: name.into(),
                domain_id: None,
            }),
            None => store.entity(id).await?,
        };
        entities.extend(made);
        named.push(id.clone());
    }
    // IDs it names whose natural keys were not recorded with it (an ID the
    // answer gave, as a create's domain taken from the caller's token): as
    // central learned them.
    for id in named.clone() {
        if !entities.iter().any(|e| e.id == id) {
            entities.extend(store.entity(&id).await?);
        }
    }
    // Domains the op's entities live in that it does not name itself.
    let mut names = HashMap::new();
    for d in entities.iter().filter_map(|e| e.domain_id.as_deref()) {
        let in_op = entities.iter().any(|e| e.id == d);
        if !in_op && !names.contains_key(d) {
            let name = store
                .entity(d)
                .await?
                .filter(|e| e.kind == crate::keystone::kinds::DOMAIN.name)
                .map(|e| e.name);
            names.insert(d.to_string(), name);
        }
    }
    let default = names_default(&op.path, body.as_ref());
    let mut domains = op_domains(&op.kind, &named, &entities, default, &|d| {
        names.get(d).cloned().flatten()
    });
    domains.unknown |= on_system(&op.path);
    // What it belongs to, unread (an op logged while no scope limiting
    // domains carried its class, or by an earlier release): not known.
    if !domains.unknown && reads_owners(&op.kind, &op.path, body.as_ref()) {
        let read = store
            .op_touches(op.seq)
            .await?
            .iter()
            .any(|t| t.key == OWNERS_READ && !t.exclusive);
        domains.unknown = !read;
    }
    Ok(domains)
}

/// Whether `op`, touching `domains`, is in `edge`'s scope.
pub fn carries(edge: &ScopedEdge, op: &OpRow, domains: &OpDomains) -> bool {
    edge.scope.carries(&op.class, &domains.all)
}

/// What `edge` receives for `op`: the op sealed with its edge key, or, out
/// of its scope, a marker (seq and op ID, nothing of the write).
pub fn envelope_for(edge: &ScopedEdge, op: &OpRow, domains: &OpDomains) -> Envelope {
    if carries(edge, op, domains) {
        return envelope(&edge.sealer, op);
    }
    let marker = OpContent {
        seq: op.seq,
        op_id: op.op_id.clone(),
        state: OUT_OF_SCOPE.into(),
        method: String::new(),
        path: String::new(),
        kind: String::new(),
        body: None,
        created_ids: Vec::new(),
        refs: Vec::new(),
    };
    seal(&edge.sealer, op, &marker, None)
}

fn seal(sealer: &Sealer, op: &OpRow, content: &OpContent, traceparent: Option<String>) -> Envelope {
    let plain = serde_json::to_vec(content).expect("an op serializes");
    let (enc, data) = sealer.seal(&Envelope::aad(op.seq), &plain);
    Envelope {
        seq: op.seq,
        enc: enc.to_string(),
        data,
        traceparent,
    }
}

/// Seals one op for the wire.
pub fn envelope(sealer: &Sealer, op: &OpRow) -> Envelope {
    let content = OpContent {
        seq: op.seq,
        op_id: op.op_id.clone(),
        state: op.state.clone(),
        method: op.method.clone(),
        path: op.path.clone(),
        kind: op.kind.clone(),
        body: op
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok()),
        created_ids: serde_json::from_str(&op.created_ids).unwrap_or_default(),
        refs: serde_json::from_str::<Vec<EntityRef>>(&op.refs).unwrap_or_default(),
    };
    seal(sealer, op, &content, op.traceparent.clone())
}
