//! Per-site scope: the domains and route classes an edge carries, and whether
//! an op, or an entity of a site's state, falls in it.
//!
//! The rule, one for every kind: an op or an entity is in an edge's scope when
//! its route class is one the edge carries and **every** domain it touches is
//! one the edge carries. What it touches: a domain itself, the domain of every
//! entity it names or creates (a user's, a project's, a grant's actor's and
//! target's, a project's parent's). What touches no domain (a global role, a
//! region, a service) is in every scope of its class. So a grant of an
//! in-scope project to a user of another domain is out of scope (the user is
//! not at that site), as is anything whose domain central cannot tell: an edge
//! never receives what it may not hold.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use super::model::{Entity, EntityRef, Part, RouteClass};

/// Keystone's default domain: its fixed ID and the name it is made with.
const DEFAULT_DOMAIN: (&str, &str) = ("default", "Default");

/// What an edge carries: some domains (by name) or all, some route classes or
/// all that central replicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub domains: Option<BTreeSet<String>>,
    pub classes: Option<BTreeSet<RouteClass>>,
}

impl Scope {
    /// Carries everything central replicates.
    pub fn is_all(&self) -> bool {
        self.domains.is_none() && self.classes.is_none()
    }

    pub fn carries_class(&self, class: &str) -> bool {
        match &self.classes {
            None => true,
            Some(classes) => classes.iter().any(|c| c.as_str() == class),
        }
    }

    /// Whether an op (or entity) of `class` touching `domains` is in scope.
    pub fn carries(&self, class: &str, domains: &Domains) -> bool {
        if !self.carries_class(class) {
            return false;
        }
        match &self.domains {
            None => true,
            Some(carried) => !domains.unknown && domains.names.is_subset(carried),
        }
    }
}

/// `domains:Default,acme;replicate:identity,resource`, either part alone, or `all`.
impl FromStr for Scope {
    type Err = String;

    fn from_str(spec: &str) -> Result<Scope, String> {
        let spec = spec.trim();
        if spec == "all" {
            return Ok(Scope::default());
        }
        let mut scope = Scope::default();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (what, list) = part.split_once(':').ok_or_else(|| {
                format!("'{part}': expected domains:<name>,... or replicate:<class>,...")
            })?;
            let items: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .collect();
            if items.is_empty() {
                return Err(format!("'{part}' names nothing"));
            }
            match what.trim() {
                "domains" if scope.domains.is_none() => {
                    scope.domains = Some(items.iter().map(|d| d.to_string()).collect());
                }
                "replicate" if scope.classes.is_none() => {
                    scope.classes = Some(
                        items
                            .iter()
                            .map(|c| c.parse::<RouteClass>())
                            .collect::<Result<_, _>>()?,
                    );
                }
                "domains" | "replicate" => return Err(format!("'{what}' is given twice")),
                other => {
                    return Err(format!(
                        "unknown scope part '{other}' (expected domains or replicate)"
                    ))
                }
            }
        }
        if scope.is_all() {
            return Err("an empty scope: write `all`, or domains:... and/or replicate:...".into());
        }
        Ok(scope)
    }
}

/// The canonical text (what `FromStr` reads, sorted): recorded per edge, so a
/// change is seen at the next start.
impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(d) = &self.domains {
            parts.push(format!(
                "domains:{}",
                d.iter().cloned().collect::<Vec<_>>().join(",")
            ));
        }
        if let Some(c) = &self.classes {
            parts.push(format!(
                "replicate:{}",
                c.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(",")
            ));
        }
        if parts.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&parts.join(";"))
        }
    }
}

/// The domains something touches, by name; `unknown` when one of them could
/// not be told.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Domains {
    pub names: BTreeSet<String>,
    pub unknown: bool,
}

/// The domains an op touches: those of the entities it names (`refs`, the
/// natural keys central recorded for the IDs in its path and body, domains
/// included) and of those it created (`created`). `named` is every
/// referable ID found in its path and body: one without a natural key makes
/// the domains unknown.
pub fn op_domains(named: &[String], refs: &[EntityRef], created: &[EntityRef]) -> Domains {
    let all: Vec<&EntityRef> = refs.iter().chain(created).collect();
    let domain_names: HashMap<&str, &str> = all
        .iter()
        .filter(|e| e.kind == super::kinds::DOMAIN.name)
        .map(|e| (e.id.as_str(), e.name.as_str()))
        .collect();
    let mut out = Domains {
        unknown: named.iter().any(|id| !all.iter().any(|e| &e.id == id)),
        ..Domains::default()
    };
    for e in all {
        if e.kind == super::kinds::DOMAIN.name {
            out.names.insert(e.name.clone());
            continue;
        }
        let Some(d) = e.domain_id.as_deref() else {
            continue;
        };
        match domain_names.get(d) {
            Some(name) => {
                out.names.insert(name.to_string());
            }
            None if d == DEFAULT_DOMAIN.0 => {
                out.names.insert(DEFAULT_DOMAIN.1.to_string());
            }
            None => out.unknown = true,
        }
    }
    out
}

/// The referable IDs in an op's path and body (see `op_domains`).
pub fn named_ids(path: &str, body: Option<&Value>) -> Vec<String> {
    super::ids::all_refs(path, body)
        .into_iter()
        .filter(|r| super::ids::referable(r.kind))
        .map(|r| r.id)
        .collect()
}

/// Keeps the entities of one site's state that are in `scope` (their IDs
/// and references are that site's); returns how many were left out.
pub fn retain_in_scope(entities: &mut Vec<Entity>, scope: &Scope) -> usize {
    if scope.is_all() {
        return 0;
    }
    let in_scope: Vec<bool> = {
        let by_id: HashMap<(&str, &str), &Entity> = entities
            .iter()
            .filter(|e| !e.id.is_empty())
            .map(|e| ((e.kind.as_str(), e.id.as_str()), e))
            .collect();
        entities
            .iter()
            .map(|e| {
                let class = super::kinds::canonical_of(e)
                    .and_then(super::kinds::named)
                    .map(|k| k.class.as_str());
                let mut domains = Domains::default();
                entity_domains(e, &by_id, &mut domains, 0);
                class.is_some_and(|c| scope.carries(c, &domains))
            })
            .collect()
    };
    let before = entities.len();
    let mut keep = in_scope.into_iter();
    entities.retain(|_| keep.next().unwrap_or(false));
    before - entities.len()
}

/// How deep references are followed (a project's parent's parent...).
const MAX_DEPTH: usize = 16;

fn entity_domains(
    e: &Entity,
    by_id: &HashMap<(&str, &str), &Entity>,
    out: &mut Domains,
    depth: usize,
) {
    if e.kind == super::kinds::DOMAIN.name {
        out.names.insert(e.key.clone());
        return;
    }
    if depth >= MAX_DEPTH {
        out.unknown = true;
        return;
    }
    let parts = e.parts.iter().filter_map(|p| match p {
        Part::Ref { kind, id, .. } => Some((kind.as_str(), id.as_str())),
        Part::Text(_) => None,
    });
    let fields = e
        .field_refs
        .values()
        .map(|(k, id)| (k.as_str(), id.as_str()));
    for (kind, id) in parts.chain(fields) {
        match by_id.get(&(kind, id)) {
            Some(r) => entity_domains(r, by_id, out, depth + 1),
            None if kind == super::kinds::DOMAIN.name && id == DEFAULT_DOMAIN.0 => {
                out.names.insert(DEFAULT_DOMAIN.1.to_string());
            }
            None => out.unknown = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(id: &str, kind: &str, name: &str, domain: Option<&str>) -> EntityRef {
        EntityRef {
            id: id.into(),
            kind: kind.into(),
            name: name.into(),
            domain_id: domain.map(str::to_string),
        }
    }

    fn scope(spec: &str) -> Scope {
        spec.parse().unwrap()
    }

    #[test]
    fn a_scope_is_read_written_back_the_same_and_refused_with_the_reason() {
        let s = scope(" replicate:resource,identity ; domains:acme,Default");
        assert_eq!(
            s.to_string(),
            "domains:Default,acme;replicate:identity,resource"
        );
        assert_eq!(scope(&s.to_string()), s);
        assert!(scope("all").is_all());
        assert_eq!(scope("domains:acme").classes, None);
        for (bad, why) in [
            ("", "empty scope"),
            ("domains:", "names nothing"),
            ("domains:a;domains:b", "given twice"),
            ("projects:a", "unknown scope part"),
            ("replicate:widgets", "unknown route class"),
            ("acme", "expected domains"),
        ] {
            let e = bad.parse::<Scope>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// Every domain an op touches must be carried: a grant across two
    /// domains is out of scope for an edge carrying one; what touches no
    /// domain is in every scope of its class; an ID without a natural key,
    /// or a domain not named, is unknown and so out of a limited scope.
    #[test]
    fn an_op_is_in_scope_when_every_domain_it_touches_is() {
        let acme = r("d1", "domain", "acme", None);
        let other = r("d2", "domain", "other", None);
        let project = r("p1", "project", "web", Some("d1"));
        let user_acme = r("u1", "user", "alice", Some("d1"));
        let user_other = r("u2", "user", "bob", Some("d2"));
        let global_role = r("r1", "role", "member", None);
        let edge = scope("domains:acme");
        let ids = |refs: &[&EntityRef]| refs.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        let case = |refs: Vec<&EntityRef>| {
            let owned: Vec<EntityRef> = refs.iter().map(|e| (*e).clone()).collect();
            op_domains(&ids(&refs), &owned, &[])
        };
        let same = case(vec![&project, &user_acme, &global_role, &acme]);
        assert!(edge.carries("assignment", &same), "{same:?}");
        let across = case(vec![&project, &user_other, &global_role, &acme, &other]);
        assert_eq!(across.names, ["acme", "other"].map(String::from).into());
        assert!(!edge.carries("assignment", &across));
        assert!(scope("domains:acme,other").carries("assignment", &across));
        let global = case(vec![&global_role]);
        assert!(global.names.is_empty() && !global.unknown);
        assert!(edge.carries("assignment", &global));
        assert!(!scope("domains:acme;replicate:identity").carries("assignment", &global));
        // The default domain has no ref of its own.
        let default_user = op_domains(&[], &[], &[r("u3", "user", "carol", Some("default"))]);
        assert_eq!(default_user.names, ["Default".to_string()].into());
        assert!(!edge.carries("identity", &default_user));
        // Unknown: an ID with no natural key, a domain not named.
        let missing = op_domains(&["u9".into()], &[], &[]);
        assert!(missing.unknown && !edge.carries("identity", &missing));
        assert!(Scope::default().carries("identity", &missing));
        let unnamed = op_domains(&[], &[r("u4", "user", "dan", Some("d7"))], &[]);
        assert!(unnamed.unknown);
        // A create: the entity it made names its domain.
        let made = op_domains(&[], &[], &[r("d3", "domain", "acme", None)]);
        assert!(edge.carries("resource", &made));
    }
}
