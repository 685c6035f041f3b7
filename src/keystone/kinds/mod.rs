//! The catalogue: one entry per Keystone resource kind syncgate knows,
//! grouped by route class (one file each). Route classification, ID
//! rewriting, probes, touches, outcome checks, the state reader, resync and
//! drift iterate `ALL`; adding a kind is one entry here (and the test fakes).

pub mod assignment;
pub mod catalog;
pub mod credentials;
pub mod federation;
pub mod identity;
pub mod limits;
pub mod policy;
pub mod resource;

use super::client::{ClientError, KeystoneClient};
use super::kind::{Coverage, Kind};
use super::model::Entity;

pub use assignment::{GRANT, IMPLIED_ROLE, INHERITED_GRANT, ROLE};
pub use catalog::{
    ENDPOINT, ENDPOINT_GROUP, ENDPOINT_GROUP_PROJECT, PROJECT_ENDPOINT, REGION, SERVICE,
};
pub use credentials::{CREDENTIAL, EC2_CREDENTIAL};
pub use federation::{FEDERATION_PROTOCOL, IDENTITY_PROVIDER, MAPPING, SERVICE_PROVIDER};
pub use identity::{GROUP, GROUP_MEMBERSHIP, USER, USER_PASSWORD};
pub use limits::{LIMIT, REGISTERED_LIMIT};
pub use policy::{ENDPOINT_POLICY, POLICY};
pub use resource::{DOMAIN, DOMAIN_CONFIG, PROJECT, PROJECT_TAG};

/// Every kind, in the order a state is read and its creates are applied
/// (what an entity references comes before it).
pub static ALL: &[&Kind] = &[
    &DOMAIN,
    &DOMAIN_CONFIG,
    &PROJECT,
    &PROJECT_TAG,
    &ROLE,
    &IMPLIED_ROLE,
    &GROUP,
    &USER,
    &USER_PASSWORD,
    &GROUP_MEMBERSHIP,
    &GRANT,
    &INHERITED_GRANT,
    &POLICY,
    &ENDPOINT_POLICY,
    &CREDENTIAL,
    &EC2_CREDENTIAL,
    &SERVICE,
    &REGISTERED_LIMIT,
    &LIMIT,
    &IDENTITY_PROVIDER,
    &MAPPING,
    &FEDERATION_PROTOCOL,
    &SERVICE_PROVIDER,
    &REGION,
    &ENDPOINT,
    &ENDPOINT_GROUP,
    &PROJECT_ENDPOINT,
    &ENDPOINT_GROUP_PROJECT,
];

/// The entry of a kind by its name.
pub fn named(name: &str) -> Option<&'static Kind> {
    ALL.iter().copied().find(|k| k.name == name)
}

/// The name of a kind as this release spells it, from its name or a name an
/// older release wrote (`inherited`: whether the entity is an inherited grant,
/// where one old name held grants of both kinds). `None`: no kind of ours.
pub fn canonical(name: &str, inherited: bool) -> Option<&'static str> {
    if let Some(k) = named(name) {
        return Some(k.name);
    }
    let mut was = ALL.iter().filter(|k| k.was.contains(&name));
    let first = was.next()?;
    match was.next() {
        None => Some(first.name),
        Some(_) if inherited => Some(INHERITED_GRANT.name),
        Some(_) => Some(GRANT.name),
    }
}

/// The name of an entity's kind as this release spells it, as an older
/// edge may send it: an old grant is inherited when its path says so.
pub fn canonical_of(e: &Entity) -> Option<&'static str> {
    let inherited = match e.raw.as_ref().and_then(|r| r["path"].as_str()) {
        Some(path) => path.starts_with("/v3/OS-INHERIT/"),
        None => e.key.ends_with(assignment::INHERITED),
    };
    canonical(&e.kind, inherited)
}

/// The kinds an audit filter names: a kind, or every kind an older name
/// stood for (`assignment`: grants of both kinds).
pub fn filter(name: &str) -> Vec<&'static str> {
    match named(name) {
        Some(k) => vec![k.name],
        None => ALL
            .iter()
            .filter(|k| k.was.contains(&name))
            .map(|k| k.name)
            .collect(),
    }
}

/// The name older releases wrote for a kind (its own when it had no other),
/// for a central of such a release.
pub fn as_formerly(name: &str) -> &str {
    named(name)
        .and_then(|k| k.was.first().copied())
        .unwrap_or(name)
}

/// The kinds a state holds and compares (the audit's drift filter), in order.
pub fn compared() -> impl Iterator<Item = &'static Kind> {
    ALL.iter()
        .copied()
        .filter(|k| matches!(k.state, Coverage::Read { .. }))
}

/// Every kind with write routes, sorted by name (the audit's op filter).
pub fn replicated() -> Vec<&'static str> {
    let mut names: Vec<_> = ALL
        .iter()
        .filter(|k| k.replicated())
        .map(|k| k.name)
        .collect();
    names.sort_unstable();
    names
}

/// The ID of the entity of `kind` named `name` at a site (in `domain_id`;
/// for a role `None` means a global one); `None` for a kind without one.
pub async fn find_by_name(
    ks: &KeystoneClient,
    kind: &str,
    name: &str,
    domain_id: Option<&str>,
) -> Result<Option<String>, ClientError> {
    match named(kind) {
        Some(k) => k.find_by_key(ks, name, domain_id).await,
        None => Ok(None),
    }
}

/// The entity of `kind` with this ID at a site, `None` when it does not
/// exist or the kind is not read by ID.
pub async fn get_entity(
    ks: &KeystoneClient,
    kind: &str,
    id: &str,
) -> Result<Option<serde_json::Value>, ClientError> {
    match named(kind) {
        Some(k) => k.get(ks, id).await,
        None => Ok(None),
    }
}

/// `get_entity`, absent only when Keystone says so (`Kind::get_strict`).
pub async fn get_entity_strict(
    ks: &KeystoneClient,
    kind: &str,
    id: &str,
) -> Result<Option<serde_json::Value>, ClientError> {
    match named(kind) {
        Some(k) => k.get_strict(ks, id).await,
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystone::kind::Probe;
    use crate::keystone::model::Creates;
    use crate::keystone::{classify, Classification};
    use std::collections::HashSet;

    /// A path a route pattern matches: every `*` an ID.
    fn path_of(pattern: &[&str]) -> String {
        let segs: Vec<&str> = pattern
            .iter()
            .map(|s| {
                if *s == "*" {
                    "0123456789abcdef0123456789abcdef"
                } else {
                    s
                }
            })
            .collect();
        format!("/v3/{}", segs.join("/"))
    }

    #[test]
    fn every_route_of_an_entry_is_classified_as_that_kind_and_no_other() {
        for k in ALL {
            for r in k.routes {
                for m in r.methods {
                    let path = path_of(r.pattern);
                    match classify(m, &path) {
                        Classification::Replicable(found) => {
                            assert_eq!(
                                (found.kind, found.class, found.creates),
                                (k.name, k.class, r.creates),
                                "{m} {path}"
                            );
                        }
                        other => panic!("{m} {path}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn names_old_names_and_what_names_an_id_belong_to_one_kind_each() {
        let mut names = HashSet::new();
        for k in ALL {
            assert!(names.insert(k.name), "{} twice", k.name);
        }
        for k in ALL {
            for w in k.was {
                assert!(!names.contains(w), "{w} is a name and an old name");
                let inherited = k.name == INHERITED_GRANT.name;
                assert_eq!(canonical(w, inherited), Some(k.name));
                assert!(filter(w).contains(&k.name));
                assert_eq!(as_formerly(k.name), *w);
            }
        }
        // One old name held grants of both kinds, and only those.
        assert_eq!(filter("assignment"), [GRANT.name, INHERITED_GRANT.name]);
        assert_eq!(canonical("nonsense", false), None);
        assert_eq!(as_formerly(USER.name), USER.name);
        for pick in [
            |k: &Kind| k.id_segments,
            |k: &Kind| k.ref_fields,
            |k: &Kind| k.ref_objects,
        ] {
            let mut seen = HashSet::new();
            for k in ALL {
                for s in pick(k) {
                    assert!(seen.insert(*s), "{s} names an ID of two kinds");
                }
            }
        }
    }

    /// Every kind the routes replicate is covered by the state reader (read,
    /// or read as part of a kind that is) or says why not; every create can
    /// be found again when its answer is lost.
    #[test]
    fn every_replicated_kind_is_read_or_says_why_not_and_every_create_can_be_found_again() {
        let read_here: HashSet<&str> = compared().map(|k| k.name).collect();
        for k in ALL.iter().filter(|k| k.replicated()) {
            match &k.state {
                Coverage::Read { read, .. } => {
                    // Read by another kind's reader: one of its class has one.
                    assert!(
                        read.is_some()
                            || ALL.iter().any(|o| o.class == k.class
                                && matches!(o.state, Coverage::Read { read: Some(_), .. })),
                        "{}: nothing reads it",
                        k.name
                    );
                }
                Coverage::ReferenceOnly(_) => {}
                Coverage::PartOf(whole, why) => {
                    assert!(
                        read_here.contains(whole),
                        "{}: part of {whole}, not read",
                        k.name
                    );
                    assert!(!why.is_empty(), "{}", k.name);
                }
                Coverage::NotRead {
                    what,
                    why,
                    reported,
                } => {
                    assert!(!why.is_empty(), "{}: not read, and no reason", k.name);
                    assert!(!reported || !what.is_empty(), "{}", k.name);
                }
            }
            for r in k.routes.iter().filter(|r| r.creates == Creates::InBody) {
                assert!(
                    k.probe != Probe::None,
                    "{}: a create at {:?} cannot be found again",
                    k.name,
                    r.pattern
                );
                assert!(
                    !k.member.is_empty(),
                    "{}: a create without a member key",
                    k.name
                );
            }
        }
        // What every resync and drift report lists as not covered.
        let listed = crate::keystone::state::not_covered();
        assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed:#}");
    }

    /// Each kind is named (as a kind: compared, matched or given) in its
    /// catalogue entry and at most one other file of `src/`; everything
    /// else asks the catalogue.
    #[test]
    fn each_kind_is_named_in_its_entry_and_at_most_one_other_file() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(d).unwrap() {
                let p = entry.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&p).unwrap();
                    let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
                    let code: String = code
                        .lines()
                        .filter(|l| !l.trim_start().starts_with("//"))
                        .collect::<Vec<_>>()
                        .join("\n");
                    files.push((p, code));
                }
            }
        }
        // Words that are a kind's name and something else too.
        let other_meaning = [(
            LIMIT.name,
            "the audit API's page size",
            ["src/central/admin.rs", "src/cli/audit.rs"],
        )];
        for k in ALL {
            let n = k.name;
            let uses = [
                format!("kind == \"{n}\""),
                format!("kind != \"{n}\""),
                format!("\"{n}\" =>"),
                format!("\"{n}\" |"),
                format!("| \"{n}\""),
                format!("kind: \"{n}\""),
                format!("name: \"{n}\""),
                format!("Some(\"{n}\")"),
                format!("(\"{n}\","),
            ];
            let naming: Vec<_> = files
                .iter()
                .filter(|(_, code)| uses.iter().any(|u| code.contains(u.as_str())))
                .map(|(p, _)| p.display().to_string())
                .filter(|p| {
                    !other_meaning
                        .iter()
                        .any(|(word, _, files)| *word == n && files.iter().any(|f| p.ends_with(f)))
                })
                .collect();
            assert!(
                naming.len() <= 2,
                "{n} is named as a kind in {} files: {naming:?}",
                naming.len()
            );
        }
    }
}
