//! Per-site scope: the domains and route classes an edge carries, and whether
//! an op, or an entity of a site's state, falls in it.
//!
//! The rule, one for every kind: an op or an entity is in an edge's scope when
//! its route class is one the edge carries and **every** domain it touches is
//! one the edge carries. What it touches: a domain itself, the domain of
//! every entity it names or creates (a user's own domain, a grant's actor's
//! and target's, a project's parent's, a user's default project's), and
//! what those entities touch in turn: a grant to a user whose default project
//! lies outside the scope is outside it, as that user is. (Central reads a
//! named user's default project, and what a credential or limit written by
//! its ID belongs to, before forwarding the write.) What may touch no domain (a global
//! role, a region, a service, a policy, a registered limit) is in every scope
//! of its class; any other kind that names no domain central can tell is
//! unknown, and so out of a limited scope, as is anything whose domain central
//! cannot tell (an ID Keystone did not make, an LDAP or federated user's, of
//! which central records no natural key): an edge never receives what it may
//! not hold. Federation
//! (identity providers, their protocols, and mappings, whose rules name groups
//! and domains by any means) reaches only edges whose scope limits no domain.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

use super::model::{Entity, EntityRef, IdRef, Part, RouteClass};

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

    /// Whether `domains` are all carried (whatever the class).
    pub fn carries_domains(&self, domains: &Domains) -> bool {
        match &self.domains {
            None => true,
            Some(carried) => !domains.unknown && domains.names.is_subset(carried),
        }
    }

    /// Whether an op (or entity) of `class` touching `domains` is in scope.
    pub fn carries(&self, class: &str, domains: &Domains) -> bool {
        if !self.carries_class(class) {
            return false;
        }
        match &self.domains {
            None => true,
            Some(_) if class == RouteClass::Federation.as_str() => false,
            Some(_) => self.carries_domains(domains),
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

/// Kinds that may touch no domain: global roles (or a domain's), implied
/// roles between them, the catalog's regions, services, endpoints and
/// endpoint groups, policies and their associations, registered limits,
/// service providers. Any other kind lives in a domain.
const MAY_BE_GLOBAL: [&str; 10] = [
    "role",
    "implied_role",
    "region",
    "service",
    "endpoint",
    "endpoint_group",
    "policy",
    "endpoint_policy",
    "registered_limit",
    "service_provider",
];

fn may_be_global(kind: &str) -> bool {
    MAY_BE_GLOBAL.contains(&kind)
}

/// The domains an op of `kind` touches: those of the entities it names
/// (`entities`: the natural keys central recorded for the IDs in its path and
/// body, domains included, and those of the entities it created), each
/// entity's domain named by `domain_name` when it is not among them. `named`
/// is every referable ID found in its path and body and every ID it created:
/// one without a natural key makes the domains unknown. `default`: the op
/// names Keystone's default domain by its fixed ID.
pub fn op_domains(
    kind: &str,
    named: &[String],
    entities: &[EntityRef],
    default: bool,
    domain_name: &dyn Fn(&str) -> Option<String>,
) -> Domains {
    let mut out = Domains {
        unknown: named.iter().any(|id| !entities.iter().any(|e| &e.id == id)),
        ..Domains::default()
    };
    if default {
        out.names.insert(DEFAULT_DOMAIN.1.to_string());
    }
    let in_op: HashMap<&str, &str> = entities
        .iter()
        .filter(|e| e.kind == super::kinds::DOMAIN.name)
        .map(|e| (e.id.as_str(), e.name.as_str()))
        .collect();
    for e in entities {
        if e.kind == super::kinds::DOMAIN.name {
            out.names.insert(e.name.clone());
            continue;
        }
        let Some(d) = e.domain_id.as_deref() else {
            continue;
        };
        match in_op
            .get(d)
            .map(|n| n.to_string())
            .or_else(|| domain_name(d))
        {
            Some(name) => {
                out.names.insert(name);
            }
            None if d == DEFAULT_DOMAIN.0 => {
                out.names.insert(DEFAULT_DOMAIN.1.to_string());
            }
            None => out.unknown = true,
        }
    }
    if out.names.is_empty() && !may_be_global(kind) {
        out.unknown = true;
    }
    out
}

/// Kinds written by their own ID whose path does not name whom they belong
/// to: a credential's user and project, a limit's project or domain, an EC2
/// key's project (its user is in its path).
const OWNED: [&str; 3] = ["credential", "limit", "ec2_credential"];

/// The entity a write of `kind` to `path` names by its own ID and whose
/// owners central reads (see `reads_owners`), as central's Keystone keeps it:
/// an EC2 key is the credential made of it (its ID the SHA-256 of the
/// access key).
pub fn owned_target(kind: &str, path: &str) -> Option<IdRef> {
    if !OWNED.contains(&kind) {
        return None;
    }
    let path = path.split('?').next().unwrap_or(path);
    if kind == super::kinds::EC2_CREDENTIAL.name {
        let (_, access) = path.rsplit_once("/OS-EC2/")?;
        // As Keystone reads it: decoded.
        let access = percent_encoding::percent_decode_str(access).decode_utf8_lossy();
        return Some(IdRef {
            id: super::kinds::credentials::ec2_access_credential_id(&access),
            kind: super::kinds::CREDENTIAL.name,
        });
    }
    super::ids::every_ref(path, None)
        .into_iter()
        .find(|r| r.kind == kind)
}

/// The key (see `keystone::touches`) an op is logged with when central read
/// what it belongs to before forwarding it (`reads_owners`): referenced by
/// every such op, changed by none, so it orders nothing. Without it, an op
/// `reads_owners` says needs them (one logged while no scope limiting domains
/// carried its class, or by an earlier release) touches domains that are not
/// known. No request can make it: a key taken from a path is one segment (no
/// `/`), a referenced one from a body 32 hex digits, and an ID a write
/// created is never it (`touches::created`); only a referenced one counts.
pub const OWNERS_READ: &str = "/scope/owners-read";

/// Whether central reads, before forwarding a write of `kind` to `path`
/// with `body`, what it belongs to (where some scope limits domains and
/// carries its class): the owners of what it names by its own ID
/// (`owned_target`), the default project of every user it names. Without
/// what was read, the domains such an op touches are not known.
pub fn reads_owners(kind: &str, path: &str, body: Option<&Value>) -> bool {
    owned_target(kind, path).is_some()
        || super::ids::every_ref(path, body)
            .iter()
            .any(|r| r.kind == super::kinds::USER.name)
}

/// Whether a path is a grant on the system (`/v3/system/...`): in no
/// domain, and so out of every scope that limits domains.
pub fn on_system(path: &str) -> bool {
    path.trim_start_matches('/')
        .split('/')
        .nth(1)
        .is_some_and(|s| s == "system")
}

/// Whether a path or body names Keystone's default domain by its fixed ID
/// (`/v3/domains/default/...`, `"domain_id": "default"`), which is no ID
/// central keeps a natural key for.
pub fn names_default(path: &str, body: Option<&Value>) -> bool {
    let segments: Vec<&str> = path.split(['/', '?']).collect();
    let in_path = segments
        .windows(2)
        .any(|w| w[0] == "domains" && w[1] == DEFAULT_DOMAIN.0);
    fn in_body(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.iter().any(|(k, v)| {
                (k == "domain_id" && v.as_str() == Some(DEFAULT_DOMAIN.0)) || in_body(v)
            }),
            Value::Array(items) => items.iter().any(in_body),
            _ => false,
        }
    }
    in_path || body.is_some_and(in_body)
}

/// The IDs of referable kinds in an op's path and body, whatever their form
/// (see `op_domains`): one Keystone did not make (an LDAP or federated
/// user's, a domain made with a chosen ID) has no natural key central
/// records, and so makes the op's domains unknown. The default domain's
/// fixed ID is `names_default`'s.
pub fn named_ids(path: &str, body: Option<&Value>) -> Vec<String> {
    super::ids::every_ref(path, body)
        .into_iter()
        .filter(|r| super::ids::referable(r.kind))
        .filter(|r| !(r.kind == super::kinds::DOMAIN.name && r.id == DEFAULT_DOMAIN.0))
        .map(|r| r.id)
        .collect()
}

/// Keeps the entities of one site's state that are in `scope` (their IDs
/// and references are that site's); returns how many were left out.
pub fn retain_in_scope(entities: &mut Vec<Entity>, scope: &Scope) -> usize {
    retain_in_scope_or(entities, scope, |_| false)
}

/// `retain_in_scope`, keeping too what `also` keeps.
pub fn retain_in_scope_or(
    entities: &mut Vec<Entity>,
    scope: &Scope,
    also: impl Fn(&Entity) -> bool,
) -> usize {
    if scope.is_all() {
        return 0;
    }
    let in_scope: Vec<bool> = {
        // By the site's own ID, and by central's where an edge gives its
        // references as central's IDs (`ids[0]` of an entity it maps).
        let mut by_id: HashMap<(&str, &str), &Entity> = HashMap::new();
        let mut at: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, e) in entities
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.id.is_empty())
        {
            by_id.insert((e.kind.as_str(), e.id.as_str()), e);
            at.insert((e.kind.as_str(), e.id.as_str()), i);
            if let Some(central) = e.ids.first().filter(|_| e.mapped) {
                by_id.insert((e.kind.as_str(), central.as_str()), e);
                at.insert((e.kind.as_str(), central.as_str()), i);
            }
        }
        let domains: Vec<Domains> = entities
            .iter()
            .map(|e| {
                let mut d = Domains::default();
                entity_domains(e, &by_id, &mut d);
                d
            })
            .collect();
        // In the scope's domains: its own, and those of everything it
        // references, to the end (a grant to a user whose default project
        // is outside is outside too).
        let mut carried: Vec<bool> = domains.iter().map(|d| scope.carries_domains(d)).collect();
        loop {
            let mut changed = false;
            for (i, e) in entities.iter().enumerate() {
                if carried[i]
                    && refs_of(e).any(|(k, id, _)| at.get(&(k, id)).is_some_and(|&j| !carried[j]))
                {
                    carried[i] = false;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        entities
            .iter()
            .zip(domains.iter().zip(carried))
            .map(|(e, (d, carried))| {
                let class = super::kinds::canonical_of(e)
                    .and_then(super::kinds::named)
                    .map(|k| k.class.as_str());
                (carried && class.is_some_and(|c| scope.carries(c, d))) || also(e)
            })
            .collect()
    };
    let before = entities.len();
    let mut keep = in_scope.into_iter();
    entities.retain(|_| keep.next().unwrap_or(false));
    before - entities.len()
}

/// The domains an entity of a state touches (see the module's rule): its
/// own, and the own domain of each entity it references. A field's
/// reference to what the state does not hold (a project deleted after it
/// was a user's default) adds nothing; a relation's end the state does not
/// hold makes it unknown.
fn entity_domains(e: &Entity, by_id: &HashMap<(&str, &str), &Entity>, out: &mut Domains) {
    // Its key's last part, as text (not a name that ends so).
    let on_system =
        matches!(e.parts.last(), Some(Part::Text(t)) if t == super::kinds::assignment::ON_SYSTEM);
    if e.kind == super::kinds::GRANT.name && on_system {
        out.unknown = true;
    }
    own_domains(e, by_id, out);
    for (kind, id, in_key) in refs_of(e).filter(|(k, _, _)| *k != super::kinds::DOMAIN.name) {
        match by_id.get(&(kind, id)) {
            Some(r) => own_domains(r, by_id, out),
            // What a relation is made of (a grant's user) that the state
            // does not hold, and that lives in a domain (an LDAP user the
            // state was not read with): its domain is not known.
            None if in_key && !may_be_global(kind) => out.unknown = true,
            None => {}
        }
    }
    if out.names.is_empty() && !may_be_global(&e.kind) {
        out.unknown = true;
    }
}

/// An entity's own domain: itself for a domain, else the domain it names.
fn own_domains(e: &Entity, by_id: &HashMap<(&str, &str), &Entity>, out: &mut Domains) {
    if e.kind == super::kinds::DOMAIN.name {
        out.names.insert(e.key.clone());
        return;
    }
    for (kind, id, _) in refs_of(e).filter(|(k, _, _)| *k == super::kinds::DOMAIN.name) {
        match by_id.get(&(kind, id)) {
            Some(d) => {
                out.names.insert(d.key.clone());
            }
            None if id == DEFAULT_DOMAIN.0 => {
                out.names.insert(DEFAULT_DOMAIN.1.to_string());
            }
            None => out.unknown = true,
        }
    }
}

/// What an entity references: (kind, ID, whether in its key) in its key and
/// its fields.
fn refs_of(e: &Entity) -> impl Iterator<Item = (&str, &str, bool)> {
    let parts = e.parts.iter().filter_map(|p| match p {
        Part::Ref { kind, id, .. } => Some((kind.as_str(), id.as_str(), true)),
        Part::Text(_) => None,
    });
    let fields = e
        .field_refs
        .values()
        .map(|(k, id)| (k.as_str(), id.as_str(), false));
    parts.chain(fields)
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
    /// domains is out of scope for an edge carrying one; what may touch no
    /// domain is in every scope of its class, any other kind naming none is
    /// unknown; an ID without a natural key, or a domain no one can name, is
    /// unknown and so out of a limited scope; federation reaches no limited
    /// scope.
    #[test]
    fn an_op_is_in_scope_when_every_domain_it_touches_is() {
        let acme = r("d1", "domain", "acme", None);
        let other = r("d2", "domain", "other", None);
        let project = r("p1", "project", "web", Some("d1"));
        let user_acme = r("u1", "user", "alice", Some("d1"));
        let user_other = r("u2", "user", "bob", Some("d2"));
        let global_role = r("r1", "role", "member", None);
        let edge = scope("domains:acme");
        let none = |_: &str| None;
        let case = |kind: &str, refs: Vec<&EntityRef>| {
            let owned: Vec<EntityRef> = refs.iter().map(|e| (*e).clone()).collect();
            let ids: Vec<String> = owned.iter().map(|e| e.id.clone()).collect();
            op_domains(kind, &ids, &owned, false, &none)
        };
        let same = case("grant", vec![&project, &user_acme, &global_role, &acme]);
        assert!(edge.carries("assignment", &same), "{same:?}");
        // What central reads the owners of: an EC2 key as Keystone reads
        // its access key (decoded); a credential or a limit by its ID, not
        // one being made.
        let ec2 = |access: &str| {
            owned_target(
                "ec2_credential",
                &format!("/v3/users/u1/credentials/OS-EC2/{access}"),
            )
        };
        let plain = ec2("abc1").unwrap();
        assert_eq!((plain.kind, plain.id.len()), ("credential", 64));
        assert_eq!(ec2("%61bc%31").unwrap().id, plain.id);
        assert!(owned_target("ec2_credential", "/v3/users/u1/credentials/OS-EC2").is_none());
        let id = "0123456789abcdef0123456789abcdef";
        let by_id = owned_target("credential", &format!("/v3/credentials/{id}")).unwrap();
        assert_eq!((by_id.kind, by_id.id.as_str()), ("credential", id));
        assert!(owned_target("credential", "/v3/credentials").is_none());
        assert!(owned_target("user", &format!("/v3/users/{id}")).is_none());
        assert!(reads_owners("user", &format!("/v3/users/{id}"), None));
        assert!(!reads_owners(
            "project",
            &format!("/v3/projects/{id}"),
            None
        ));
        // A grant on the system is in no domain (the caller marks it).
        assert!(on_system("/v3/system/users/u1/roles/r1"));
        assert!(on_system("/v3/system/groups/g1/roles/r1"));
        assert!(!on_system("/v3/projects/system/users/u1/roles/r1"));
        assert!(!on_system("/v3/users/system"));
        let across = case(
            "grant",
            vec![&project, &user_other, &global_role, &acme, &other],
        );
        assert_eq!(across.names, ["acme", "other"].map(String::from).into());
        assert!(!edge.carries("assignment", &across));
        assert!(scope("domains:acme,other").carries("assignment", &across));
        let global = case("role", vec![&global_role]);
        assert!(global.names.is_empty() && !global.unknown);
        assert!(edge.carries("assignment", &global));
        assert!(!scope("domains:acme;replicate:identity").carries("assignment", &global));
        // A kind that lives in a domain but names none: unknown.
        let credential = case("credential", vec![]);
        assert!(credential.unknown && !edge.carries("credentials", &credential));
        // The default domain: by its fixed ID, and named in a path or body.
        let default_user = op_domains(
            "user",
            &[],
            &[r("u3", "user", "carol", Some("default"))],
            false,
            &none,
        );
        assert_eq!(default_user.names, ["Default".to_string()].into());
        assert!(!edge.carries("identity", &default_user));
        let config = op_domains(
            "domain_config",
            &[],
            &[],
            names_default("/v3/domains/default/config", None),
            &none,
        );
        assert!(!config.unknown && !edge.carries("resource", &config));
        assert!(names_default(
            "/v3/users",
            Some(&serde_json::json!({"user": {"domain_id": "default"}}))
        ));
        assert!(!names_default("/v3/domains/defaults", None));
        // IDs Keystone did not make are read too: a grant of an acme
        // project to an LDAP user (64 hex digits) or to a user of a domain
        // made with a dashed ID names them; the default domain's fixed ID
        // is not among them.
        let ldap = "e".repeat(64);
        let path = format!("/v3/projects/p1/users/{ldap}/roles/r1");
        assert_eq!(named_ids(&path, None), ["p1", ldap.as_str(), "r1"]);
        let grant = op_domains(
            "grant",
            &named_ids(&path, None),
            &[project.clone(), global_role.clone(), acme.clone()],
            false,
            &none,
        );
        assert!(grant.unknown && !edge.carries("assignment", &grant));
        let body = serde_json::json!({"user": {"name": "x", "domain_id": "1-2-3",
            "default_project_id": "p1"}});
        let mut ids = named_ids("/v3/users", Some(&body));
        ids.sort();
        assert_eq!(ids, ["1-2-3", "p1"]);
        let body =
            serde_json::json!({"user": {"domain_id": "default", "default_project_id": null}});
        assert!(named_ids("/v3/users", Some(&body)).is_empty());
        assert_eq!(
            named_ids("/v3/domains/default/config?x=1", None),
            Vec::<String>::new()
        );
        // Unknown: an ID with no natural key, a domain no one names.
        let missing = op_domains("user", &["u9".into()], &[], false, &none);
        assert!(missing.unknown && !edge.carries("identity", &missing));
        assert!(Scope::default().carries("identity", &missing));
        let unnamed = op_domains(
            "user",
            &[],
            &[r("u4", "user", "dan", Some("d7"))],
            false,
            &none,
        );
        assert!(unnamed.unknown);
        // ... unless central learned its name.
        let learned = op_domains(
            "user",
            &[],
            &[r("u4", "user", "dan", Some("d7"))],
            false,
            &|d| (d == "d7").then(|| "acme".to_string()),
        );
        assert!(edge.carries("identity", &learned), "{learned:?}");
        // A create: the entity it made names its domain.
        let made = op_domains(
            "domain",
            &[],
            &[r("d3", "domain", "acme", None)],
            false,
            &none,
        );
        assert!(edge.carries("resource", &made));
        // Federation: only where no domain is limited.
        assert!(!edge.carries("federation", &global));
        assert!(scope("replicate:federation").carries("federation", &global));
    }

    fn entity(
        kind: &str,
        id: &str,
        key: &str,
        refs: &[(&str, &str)],
        mapped_from: Option<&str>,
    ) -> Entity {
        Entity {
            kind: kind.into(),
            key: key.into(),
            id: id.into(),
            fields: Default::default(),
            ids: mapped_from.map(|c| vec![c.to_string()]).unwrap_or_default(),
            level: 0,
            raw: None,
            parts: refs
                .iter()
                .map(|(k, i)| Part::Ref {
                    kind: k.to_string(),
                    id: i.to_string(),
                    shown: String::new(),
                })
                .collect(),
            field_refs: Default::default(),
            mapped: mapped_from.is_some(),
            own: false,
        }
    }

    /// A state kept to a scope: entities in a carried domain, global ones,
    /// and relations all of whose ends are in scope; references given as
    /// central's IDs (an edge's state) are followed to the entity it maps.
    #[test]
    fn a_state_keeps_what_is_in_scope_following_references_by_either_id() {
        let mut state = vec![
            entity("domain", "dA", "acme", &[], Some("cA")),
            entity("domain", "dB", "other", &[], None),
            entity("user", "uA", "alice", &[("domain", "cA")], Some("cuA")),
            entity("user", "uB", "bob", &[("domain", "dB")], None),
            entity("user", "uD", "dan", &[("domain", "default")], None),
            entity("group", "gA", "g", &[("domain", "dA")], Some("cgA")),
            entity("role", "r1", "member", &[], None),
            entity(
                "group_membership",
                "",
                "",
                &[("user", "cuA"), ("group", "cgA")],
                None,
            ),
            entity(
                "group_membership",
                "",
                "",
                &[("user", "uB"), ("group", "cgA")],
                None,
            ),
            entity("user", "uX", "x", &[("domain", "nowhere")], None),
            // A default project deleted since: adds nothing.
            {
                let mut carl = entity("user", "uC", "carl", &[("domain", "dA")], None);
                carl.field_refs.insert(
                    "default_project_id".into(),
                    ("project".into(), "gone".into()),
                );
                carl
            },
            // A grant to a user the state does not hold (an LDAP user's
            // ID): unknown, though its project is acme's.
            entity("project", "pA", "web", &[("domain", "dA")], None),
            entity(
                "grant",
                "",
                "",
                &[("user", &"e".repeat(64)), ("project", "pA"), ("role", "r1")],
                None,
            ),
            // ... and one to a role it does not hold adds nothing: a role
            // may be global.
            entity(
                "grant",
                "",
                "",
                &[("user", "uA"), ("project", "pA"), ("role", "r9")],
                None,
            ),
            // A credential naming no domain of its own: its user's.
            entity("credential", "cr1", "c", &[("user", "uA")], None),
            // A user of acme whose default project is other's: outside, and
            // so is what references it, to the end.
            entity("project", "pB", "far", &[("domain", "dB")], None),
            {
                let mut eve = entity("user", "uE", "eve", &[("domain", "dA")], None);
                eve.field_refs
                    .insert("default_project_id".into(), ("project".into(), "pB".into()));
                eve
            },
            entity(
                "grant",
                "",
                "eve-on-web",
                &[("user", "uE"), ("project", "pA"), ("role", "r1")],
                None,
            ),
            entity("credential", "cr2", "eve-cred", &[("user", "uE")], None),
            // A grant on the system to an acme user: authority over the
            // whole site, in no domain.
            {
                let mut g = entity(
                    "grant",
                    "",
                    "member to user alice on system",
                    &[("role", "r1"), ("user", "uA")],
                    None,
                );
                g.parts.push(Part::Text(
                    super::super::kinds::assignment::ON_SYSTEM.into(),
                ));
                g
            },
            // ... not one on a project whose name ends so.
            entity("project", "pS", "web on system", &[("domain", "dA")], None),
            entity(
                "grant",
                "",
                "member to user alice on project acme/web on system",
                &[("role", "r1"), ("user", "uA"), ("project", "pS")],
                None,
            ),
        ];
        let left_out = retain_in_scope(&mut state, &scope("domains:acme"));
        let kept: Vec<String> = state
            .iter()
            .map(|e| format!("{} {}{}", e.kind, e.key, e.id))
            .collect();
        assert_eq!(
            kept,
            [
                "domain acmedA",
                "user aliceuA",
                "group ggA",
                "role memberr1",
                "group_membership ",
                "user carluC",
                "project webpA",
                "grant ",
                "credential ccr1",
                "project web on systempS",
                "grant member to user alice on project acme/web on system",
            ]
        );
        assert_eq!(left_out, 11);
        let mut all = state.clone();
        assert_eq!(retain_in_scope(&mut all, &Scope::default()), 0);
        assert_eq!(retain_in_scope(&mut state, &scope("replicate:resource")), 8);
        assert_eq!(state.len(), 3, "{state:?}");
        // Classes alone do not follow references: an edge carrying grants
        // but not users keeps grants (its users come from elsewhere).
        let mut state = vec![
            entity("user", "uA", "alice", &[("domain", "default")], None),
            entity(
                "grant",
                "",
                "alice-on-web",
                &[("user", "uA"), ("project", "pA"), ("role", "r1")],
                None,
            ),
            entity("project", "pA", "web", &[("domain", "default")], None),
        ];
        retain_in_scope(&mut state, &scope("replicate:assignment"));
        let kept: Vec<&str> = state.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kept, ["grant"]);
    }
}
