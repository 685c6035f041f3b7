//! What syncgate knows about Keystone v3. A small model (`model`: route
//! classes, IDs, entities, replays), the catalogue of resource kinds
//! (`kinds/`, each entry shaped as `kind::Kind`), and the engines that
//! iterate it: route classification (`routes`), IDs in requests and their
//! rewriting (`ids`), what a write touches (`touches`), finding a create
//! again (`probe`), an unknown outcome (`resolve`), and a site's state read,
//! compared and written (`state`, with the kit in `reader`).

pub mod client;
pub mod ids;
pub mod kind;
pub mod kinds;
pub mod model;
pub mod probe;
pub mod reader;
pub mod resolve;
pub mod routes;
pub mod scope;
pub mod state;
pub mod touches;

use serde_json::Value;

pub use model::EntityRef;
pub use routes::{classify, Classification, Creates, Reason, RouteClass, RouteMatch};

/// The central IDs of what a successful write created, read from Keystone's
/// response (or the URL for resources created by `PUT`).
pub fn created_ids(route: &RouteMatch, path: &str, response: Option<&Value>) -> Vec<String> {
    match route.creates {
        Creates::No => Vec::new(),
        Creates::FromUrl => path
            .rsplit('/')
            .find(|s| !s.is_empty())
            .map(|s| vec![s.to_string()])
            .unwrap_or_default(),
        Creates::InBody => response
            .map(|body| ids_in_body(route.kind, body))
            .unwrap_or_default(),
    }
}

/// Keystone answers a create with `{"<singular>": {...}}`, or for limits
/// `{"<plural>": [{...}, ...]}`; `links` may sit beside it.
fn ids_in_body(kind: &str, body: &Value) -> Vec<String> {
    let id_field = kinds::named(kind).map_or("id", |k| k.id_field);
    let Some(obj) = body.as_object() else {
        return Vec::new();
    };
    let Some(entity) = obj.iter().find(|(k, _)| *k != "links").map(|(_, v)| v) else {
        return Vec::new();
    };
    let id_of = |v: &Value| v.get(id_field).and_then(Value::as_str).map(str::to_string);
    match entity {
        Value::Array(items) => items.iter().filter_map(id_of).collect(),
        other => id_of(other).into_iter().collect(),
    }
}

/// Injects the values Keystone generated at central into a create's request
/// body, where Keystone honours a client-supplied value (a kind's
/// `keeps_id`: a domain's `explicit_domain_id`, a region's `id`). Keystone
/// ignores `id` on most other creates and rejects it on limits and endpoint
/// groups, so nothing else is touched. Returns whether the body changed.
pub fn inject_generated(route: &RouteMatch, request: &mut Value, created: &[String]) -> bool {
    if route.creates != Creates::InBody {
        return false;
    }
    let [id] = created else { return false };
    let Some((member, field)) =
        kinds::named(route.kind).and_then(|k| Some((k.member, k.keeps_id?)))
    else {
        return false;
    };
    match request.get_mut(member).and_then(Value::as_object_mut) {
        Some(entity) => {
            entity.insert(field.to_string(), Value::String(id.clone()));
            true
        }
        None => false,
    }
}

/// Puts into a create's replay body what Keystone derived at central and
/// the edge's own call would not (a kind's `derive`): the domain of a user,
/// group or project created without one (the token's scope domain at
/// central), an EC2 key's access and secret, an identity provider's domain.
/// True when it changed.
pub fn inject_derived(route: &RouteMatch, request: &mut Value, response: Option<&Value>) -> bool {
    match kinds::named(route.kind) {
        Some(k) => k
            .derive
            .is_some_and(|derive| derive(k, route.creates, request, response)),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_create_without_a_domain_takes_the_one_central_gave_it() {
        let r = route("POST", "/v3/users");
        let mut body = json!({"user": {"name": "bob"}});
        let answer = json!({"user": {"id": "u1", "name": "bob", "domain_id": "d1"}});
        assert!(inject_derived(&r, &mut body, Some(&answer)));
        assert_eq!(body["user"]["domain_id"], "d1");
        // Given explicitly: kept as sent.
        let mut given = json!({"user": {"name": "bob", "domain_id": "d2"}});
        assert!(!inject_derived(&r, &mut given, Some(&answer)));
        assert_eq!(given["user"]["domain_id"], "d2");
        // Roles are global unless given a domain: nothing derived.
        let roles = route("POST", "/v3/roles");
        let mut role = json!({"role": {"name": "r"}});
        let answer = json!({"role": {"id": "r1", "name": "r", "domain_id": null}});
        assert!(!inject_derived(&roles, &mut role, Some(&answer)));
    }

    #[test]
    fn an_identity_provider_without_a_domain_names_the_one_keystone_made() {
        let path = "/v3/OS-FEDERATION/identity_providers/idp1";
        let r = route("PUT", path);
        let answer = json!({"identity_provider": {"id": "idp1", "domain_id": "d9"}});
        let mut body = json!({"identity_provider": {"enabled": true}});
        assert!(inject_derived(&r, &mut body, Some(&answer)));
        assert_eq!(
            body,
            json!({"identity_provider": {"enabled": true, "domain_id": "d9"},
                   kinds::federation::IDP_MADE_DOMAIN: "d9"})
        );
        // Given one: kept as sent, nothing made.
        let mut given = json!({"identity_provider": {"domain_id": "d9"}});
        assert!(!inject_derived(&r, &mut given, Some(&answer)));
        assert_eq!(given, json!({"identity_provider": {"domain_id": "d9"}}));
    }

    fn route(method: &str, path: &str) -> RouteMatch {
        match classify(method, path) {
            Classification::Replicable(m) => m,
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    #[test]
    fn created_id_comes_from_the_response_body() {
        let r = route("POST", "/v3/projects");
        let resp = json!({"project": {"id": "abc", "name": "p"}});
        assert_eq!(created_ids(&r, "/v3/projects", Some(&resp)), vec!["abc"]);
    }

    #[test]
    fn limits_create_many_ids() {
        let r = route("POST", "/v3/limits");
        let resp = json!({"limits": [{"id": "a"}, {"id": "b"}], "links": {}});
        assert_eq!(created_ids(&r, "/v3/limits", Some(&resp)), vec!["a", "b"]);
    }

    #[test]
    fn ec2_credentials_are_named_by_access_key() {
        let r = route("POST", "/v3/users/u/credentials/OS-EC2");
        let resp = json!({"credential": {"access": "ak", "secret": "s"}});
        assert_eq!(created_ids(&r, "", Some(&resp)), vec!["ak"]);
    }

    #[test]
    fn federation_ids_come_from_the_url() {
        let path = "/v3/OS-FEDERATION/identity_providers/idp1";
        let r = route("PUT", path);
        assert_eq!(created_ids(&r, path, None), vec!["idp1"]);
    }

    #[test]
    fn updates_create_nothing() {
        let r = route("PATCH", "/v3/users/u1");
        assert!(created_ids(&r, "/v3/users/u1", Some(&json!({"user": {"id": "u1"}}))).is_empty());
    }

    #[test]
    fn domain_create_carries_explicit_domain_id() {
        let r = route("POST", "/v3/domains");
        let mut body = json!({"domain": {"name": "d"}});
        assert!(inject_generated(&r, &mut body, &["d1".into()]));
        assert_eq!(
            body,
            json!({"domain": {"name": "d", "explicit_domain_id": "d1"}})
        );
    }

    #[test]
    fn region_create_keeps_its_id_and_other_bodies_are_untouched() {
        let r = route("POST", "/v3/regions");
        let mut body = json!({"region": {"description": "x"}});
        assert!(inject_generated(&r, &mut body, &["RegionTwo".into()]));
        assert_eq!(body["region"]["id"], "RegionTwo");

        for path in [
            "/v3/projects",
            "/v3/limits",
            "/v3/OS-EP-FILTER/endpoint_groups",
        ] {
            let r = route("POST", path);
            let mut body = json!({"x": {"name": "n"}});
            let before = body.clone();
            assert!(!inject_generated(&r, &mut body, &["id1".into()]));
            assert_eq!(body, before);
        }
    }
}
