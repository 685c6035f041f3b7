//! A site's identity state, read through Keystone's API, kind by kind, with
//! every entity named by its natural key and every reference between entities
//! translated to the referenced entity's key (IDs differ per site). Two sites'
//! states are compared key by key (`diff`); central's state is also what a
//! resync or a repair applies (`Entity::create` and `Entity::update` are calls
//! at central's IDs, which the edge's applier maps like a replayed op's).
//!
//! Never compared, never shown: passwords (the API never returns them) and
//! credential blobs (a credential is named by a digest of its blob).

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::client::{Identity, KeystoneClient};
use super::kind::Coverage;
pub use super::kinds::credentials::rename_credentials;
use super::kinds::{
    self, CREDENTIAL, DOMAIN, GRANT, GROUP, GROUP_MEMBERSHIP, IMPLIED_ROLE, INHERITED_GRANT,
    PROJECT, ROLE, USER,
};
use super::model::is_mappable_id;
pub use super::model::{Entity, FieldRefs, Part, Write as Call};
pub use super::reader::{digest, Digester, StateError};
use super::reader::{Names, Sheet};

/// The kinds a state holds, in the order their creates must be applied (what
/// an entity references is created before it). Services are read to name the
/// services limits refer to; they are never compared (catalogs are per site).
pub fn kinds() -> impl Iterator<Item = &'static str> {
    kinds::ALL
        .iter()
        .filter(|k| k.reader().is_some() || matches!(k.state, Coverage::Read { .. }))
        .map(|k| k.name)
}

/// What the op stream replicates and a resync or drift audit cannot read,
/// with why, as JSON: listed in every resync's result and drift report.
pub fn not_covered() -> Value {
    kinds::ALL
        .iter()
        .filter_map(|k| match k.state {
            Coverage::Read {
                caveat: Some((what, why)),
                ..
            } => Some((what, why)),
            Coverage::NotRead {
                what,
                why,
                reported: true,
            } => Some((what, why)),
            _ => None,
        })
        .map(|(what, why)| json!({"what": what, "reason": why}))
        .collect()
}

/// Whether a kind is read only to name what others reference.
fn reference_only(kind: &str) -> bool {
    kinds::named(kind).is_some_and(|k| matches!(k.state, Coverage::ReferenceOnly(_)))
}

/// Reads the state of the site `ks` talks to, kind by kind (each kind's
/// reader in the catalogue, in order).
pub async fn read(ks: &KeystoneClient, digester: &Digester) -> Result<Vec<Entity>, StateError> {
    let mut sheet = Sheet::default();
    for kind in kinds::ALL {
        if let Some(read) = kind.reader() {
            read(ks, digester, &mut sheet).await?;
        }
    }
    Ok(sheet.out)
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
        if reference_only(&c.kind) {
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
        if reference_only(&e.kind) {
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
/// keys, see `touches`; a state's kinds are the op log's).
pub fn in_flight(e: &Entity, changed: &HashSet<String>) -> bool {
    if e.ids.iter().any(|id| changed.contains(id)) {
        return true;
    }
    let Some(raw) = e.raw.as_ref() else {
        return false;
    };
    if !kinds::named(&e.kind).is_some_and(|k| k.association) {
        return false;
    }
    // An edge's association carries its path in central's IDs.
    let path = raw["central_path"]
        .as_str()
        .or_else(|| raw["path"].as_str());
    let Some(path) = path else { return false };
    changed.contains(&format!("{}:{path}", e.kind))
}

/// The state kind and key of what a delete central logged removed, named
/// from the natural keys the op carries (read before it was forwarded), when
/// the state holds such things: an entity with a natural key, a membership,
/// a grant, an implied role (keyed as their readers key them).
pub fn deleted_key(path: &str, refs: &[super::EntityRef]) -> Option<(String, String)> {
    use super::model::NaturalKey;
    let mut names = Names::default();
    let domain_key = |id: &str| -> Option<String> {
        if id == "default" {
            return Some("Default".into());
        }
        refs.iter()
            .find(|r| r.kind == DOMAIN.name && r.id == id)
            .map(|r| r.name.clone())
    };
    for r in refs {
        let Some(kind) = kinds::named(&r.kind) else {
            continue;
        };
        let key = match kind.key {
            NaturalKey::Name => Some(r.name.clone()),
            NaturalKey::NameInDomain => r
                .domain_id
                .as_deref()
                .and_then(domain_key)
                .map(|d| format!("{d}/{}", r.name)),
            NaturalKey::NameGlobalOrInDomain => match r.domain_id.as_deref() {
                Some(d) => domain_key(d).map(|d| format!("{}@{d}", r.name)),
                None => Some(r.name.clone()),
            },
            NaturalKey::None | NaturalKey::TypeAndName => None,
        };
        if let Some(key) = key {
            names.add(kind.name, &r.id, &key);
        }
    }
    let known = |kind: &'static str, id: &str| names.knows(kind, id);
    // The kind whose IDs follow a path segment, among some.
    let after = |seg: &str, among: &[&'static super::kind::Kind]| {
        among
            .iter()
            .find(|k| k.id_segments.first() == Some(&seg))
            .map(|k| k.name)
    };
    let path = path.split('?').next().unwrap_or(path);
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (kind, key) = match segs.as_slice() {
        ["v3", coll, id] => {
            let kind = kinds::ALL
                .iter()
                .find(|k| k.key.by_name() && k.collection == Some(*coll))?
                .name;
            if !known(kind, id) {
                return None;
            }
            (kind, names.key(kind, id))
        }
        ["v3", "groups", g, "users", u] if known(GROUP.name, g) && known(USER.name, u) => (
            GROUP_MEMBERSHIP.name,
            names.k().r(USER.name, u).t(" in ").r(GROUP.name, g).text,
        ),
        ["v3", "roles", p, "implies", i] if known(ROLE.name, p) && known(ROLE.name, i) => (
            IMPLIED_ROLE.name,
            names.k().r(ROLE.name, p).t(" -> ").r(ROLE.name, i).text,
        ),
        rest => {
            let (rest, inherited) = match rest {
                ["v3", "OS-INHERIT", inner @ .., "inherited_to_projects"] => (inner, true),
                ["v3", inner @ ..] => (inner, false),
                _ => return None,
            };
            let key = match rest {
                [t, tid, a, aid, "roles", rid] => {
                    let target = after(t, &[&PROJECT, &DOMAIN])?;
                    let a = after(a, &[&USER, &GROUP])?;
                    if !(known(target, tid) && known(a, aid) && known(ROLE.name, rid)) {
                        return None;
                    }
                    names
                        .k()
                        .r(ROLE.name, rid)
                        .t(&format!(" to {a} "))
                        .r(a, aid)
                        .t(&format!(" on {target} "))
                        .r(target, tid)
                }
                ["system", a, aid, "roles", rid] if !inherited => {
                    let a = after(a, &[&USER, &GROUP])?;
                    if !(known(a, aid) && known(ROLE.name, rid)) {
                        return None;
                    }
                    names
                        .k()
                        .r(ROLE.name, rid)
                        .t(&format!(" to {a} "))
                        .r(a, aid)
                        .t(kinds::assignment::ON_SYSTEM)
                }
                _ => return None,
            };
            if inherited {
                (
                    INHERITED_GRANT.name,
                    key.t(kinds::assignment::INHERITED).text,
                )
            } else {
                (GRANT.name, key.text)
            }
        }
    };
    Some((kind.to_string(), key))
}

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

impl Entity {
    /// The call that creates this (central) entity at a site lacking it, at
    /// central's IDs, and the ID the site's answer gives it.
    pub fn create(&self) -> Option<(Call, Vec<String>)> {
        let raw = self.raw.as_ref()?;
        let kind = kinds::named(&self.kind)?;
        let call = (kind.writes()?.create)(kind, self, raw)?;
        let created = if is_mappable_id(&self.id) {
            vec![self.id.clone()]
        } else {
            Vec::new()
        };
        Some((call, created))
    }

    /// The call that gives an existing entity this (central) entity's `fields`,
    /// at central's IDs (the edge's ID map names the edge's entity).
    pub fn update(&self, fields: &[String]) -> Option<Call> {
        let raw = self.raw.as_ref()?;
        let kind = kinds::named(&self.kind)?;
        (kind.writes()?.update?)(kind, self, raw, fields)
    }

    /// The calls that delete this (edge) entity, at the edge's IDs.
    pub fn delete(&self) -> Vec<Call> {
        let (Some(raw), Some(kind)) = (self.raw.as_ref(), kinds::named(&self.kind)) else {
            return Vec::new();
        };
        match kind.writes() {
            Some(w) => (w.delete)(kind, self, raw),
            None => Vec::new(),
        }
    }
}

/// Where a kind's creates come in the order of application.
pub fn rank(kind: &str) -> usize {
    kinds::ALL
        .iter()
        .position(|k| k.name == kind)
        .unwrap_or(kinds::ALL.len())
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
        .filter(|e| {
            e.kind == GROUP_MEMBERSHIP.name && e.ids.get(1).map(String::as_str) == Some(user)
        })
        .filter_map(|e| e.ids.first().cloned())
        .collect();
    let parents: HashMap<&str, &str> = entities
        .iter()
        .filter(|e| e.kind == PROJECT.name)
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
        (e.kind == GRANT.name || e.kind == INHERITED_GRANT.name)
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
        let kind = e.kind.as_str();
        e.own = if kind == USER.name {
            id == user
        } else if kind == PROJECT.name {
            projects.contains(id)
        } else if kind == DOMAIN.name {
            me.domain_ids.iter().any(|d| d == id)
        } else if kind == ROLE.name {
            roles.contains(id)
        } else if kind == IMPLIED_ROLE.name {
            e.ids.get(1).is_some_and(|i| roles.contains(i.as_str()))
        } else if kind == GROUP.name {
            groups.contains(id)
        } else if kind == GROUP_MEMBERSHIP.name {
            actor == Some(user)
        } else if kind == GRANT.name || kind == INHERITED_GRANT.name {
            granted(e)
        } else if kind == CREDENTIAL.name {
            e.ids.iter().skip(1).any(|i| i == user)
        } else {
            false
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystone::reader::{relation, NOT_COMPARED};
    use reqwest::Method;
    use std::collections::BTreeMap;

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
            GRANT.name,
            names.k().t("k"),
            vec![],
            json!({"path": "/v3/projects/p/users/u/roles/r"}),
        );
        a.raw = Some(json!({"path": "/v3/projects/p/users/u/roles/r"}));
        assert_eq!(a.create().unwrap().0 .0, Method::PUT);
        assert_eq!(a.delete()[0].0, Method::DELETE);
    }
}
