//! Which entities a write touches, and how: the keys that order conflicting
//! writes at capture (seq order must be Keystone's apply order for any two writes
//! that touch one entity) and that tell a re-drive whether re-applying an old op
//! could undo a later one.
//!
//! A write *changes* (exclusively) the entity its path addresses, the association
//! a grant-like path names, the name a create or rename claims and the IDs it
//! creates; it *references* (shared) every other ID in its path and body. Two
//! writes conflict when they share a key and at least one of them changes it.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ids::body_refs;
use super::routes::{path_params, Creates, RouteMatch};

/// One key a write touches.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Touch {
    pub key: String,
    /// The write changes what the key names (not only refers to it).
    pub exclusive: bool,
}

/// The keys a write touches, each once (exclusive wins), sorted.
pub fn touches(route: &RouteMatch, method: &str, path: &str, body: Option<&Value>) -> Vec<Touch> {
    let path = path.split('?').next().unwrap_or(path);
    let params = path_params(method, path);
    let mut out: Vec<Touch> = Vec::new();
    let mut add = |key: String, exclusive: bool| out.push(Touch { key, exclusive });
    match route.creates {
        // A POST to a collection changes only what it creates (added at commit)
        // and the name it claims.
        Creates::InBody => params.iter().for_each(|p| add(p.to_string(), false)),
        // An association: what changes is the association, not what it joins.
        _ if super::kinds::named(route.kind).is_some_and(|k| k.association) => {
            add(format!("{}:{path}", route.kind), true);
            params.iter().for_each(|p| add(p.to_string(), false));
        }
        _ => params.iter().for_each(|p| add(p.to_string(), true)),
    }
    if let Some(body) = body {
        if let Some(name) = body
            .get(route.kind)
            .and_then(|e| e.get("name"))
            .and_then(Value::as_str)
        {
            add(format!("{}:name:{name}", route.kind), true);
        }
        for r in body_refs(body) {
            add(r.id, false);
        }
    }
    normalise(out)
}

/// The keys of the IDs a write created: changed by it (an ID a client chose,
/// a region's, is never the key per-site scope marks ops with:
/// `scope::OWNERS_READ`).
pub fn created(ids: &[String]) -> Vec<Touch> {
    ids.iter()
        .filter(|id| id.as_str() != super::scope::OWNERS_READ)
        .map(|id| Touch {
            key: id.clone(),
            exclusive: true,
        })
        .collect()
}

/// Sorted, each key once; a key both changed and referenced counts as changed.
pub fn normalise(mut touches: Vec<Touch>) -> Vec<Touch> {
    touches.sort_by(|a, b| a.key.cmp(&b.key).then(b.exclusive.cmp(&a.exclusive)));
    touches.dedup_by(|later, first| later.key == first.key);
    touches
}

/// Whether two writes conflict: a shared key that at least one changes.
pub fn conflict(a: &[Touch], b: &[Touch]) -> bool {
    a.iter().any(|x| {
        b.iter()
            .any(|y| x.key == y.key && (x.exclusive || y.exclusive))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystone::{classify, Classification};
    use serde_json::json;

    const P: &str = "0123456789abcdef0123456789abcdef";
    const U: &str = "fedcba9876543210fedcba9876543210";
    const R: &str = "00000000000000000000000000000001";
    const D: &str = "00000000000000000000000000000002";

    fn t(method: &str, path: &str, body: Option<Value>) -> Vec<Touch> {
        let Classification::Replicable(route) = classify(method, path) else {
            panic!("{method} {path} is not replicable");
        };
        touches(&route, method, path, body.as_ref())
    }

    #[test]
    fn no_request_makes_the_key_per_site_scope_marks_ops_with() {
        use crate::keystone::scope::OWNERS_READ;
        let forged = [
            t("PATCH", "/v3/projects/%2Fscope%2Fowners-read", None),
            t(
                "PUT",
                &format!("/v3/projects/{P}/tags/%2Fscope%2Fowners-read"),
                None,
            ),
            t(
                "POST",
                "/v3/regions",
                Some(json!({"region": {"id": OWNERS_READ, "parent_region_id": OWNERS_READ}})),
            ),
            t(
                "POST",
                "/v3/projects",
                Some(json!({"project": {"name": OWNERS_READ, "domain_id": OWNERS_READ}})),
            ),
            created(&[OWNERS_READ.to_string(), P.to_string()]),
        ];
        for keys in forged {
            assert!(!keys.iter().any(|k| k.key == OWNERS_READ), "{keys:?}");
        }
    }

    #[test]
    fn updates_of_one_entity_conflict_and_of_two_do_not() {
        let a = t("PATCH", &format!("/v3/projects/{P}"), None);
        let b = t("DELETE", &format!("/v3/projects/{P}"), None);
        let c = t("PATCH", &format!("/v3/projects/{U}"), None);
        assert!(conflict(&a, &b));
        assert!(conflict(&a, &a));
        assert!(!conflict(&a, &c));
    }

    #[test]
    fn creates_in_one_domain_do_not_wait_on_each_other_but_on_the_domain() {
        let a = t(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": "a", "domain_id": D}})),
        );
        let b = t(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": "b", "domain_id": D}})),
        );
        let same_name = t(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": "a", "domain_id": D}})),
        );
        assert!(!conflict(&a, &b));
        assert!(conflict(&a, &same_name));
        assert!(conflict(
            &a,
            &t("DELETE", &format!("/v3/domains/{D}"), None)
        ));
    }

    #[test]
    fn grants_conflict_on_the_grant_and_with_their_entities() {
        let grant = format!("/v3/projects/{P}/users/{U}/roles/{R}");
        let put = t("PUT", &grant, None);
        let del = t("DELETE", &grant, None);
        assert!(conflict(&put, &del));
        let other = t(
            "PUT",
            &format!("/v3/projects/{P}/users/{D}/roles/{R}"),
            None,
        );
        assert!(
            !conflict(&put, &other),
            "two grants of one role in one project"
        );
        assert!(conflict(
            &put,
            &t("DELETE", &format!("/v3/roles/{R}"), None)
        ));
        assert!(conflict(
            &put,
            &t("DELETE", &format!("/v3/users/{U}"), None)
        ));
    }

    #[test]
    fn a_create_conflicts_with_later_writes_to_what_it_created() {
        let mut create = t(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": "a"}})),
        );
        create.extend(created(&[P.to_string()]));
        let create = normalise(create);
        assert!(conflict(
            &create,
            &t("DELETE", &format!("/v3/projects/{P}"), None)
        ));
    }
}
