//! Keystone IDs in requests: which IDs a path or body names and of what kind,
//! the natural key (name + domain) of named entities, rewriting central IDs to an
//! edge's, and the replay transforms for calls an admin cannot replay as sent.
//! Keystone IDs are 32-hex UUIDs, so matching whole tokens is safe.

use serde_json::Value;

use super::kinds::{self, ALL};
pub use super::model::{is_mappable_id, Call, IdRef, Replay, Transform};

/// Whether a kind has a natural key by name (within a domain).
pub fn named(kind: &str) -> bool {
    kinds::named(kind).is_some_and(|k| k.key.by_name())
}

/// The entity kind of the member segment after a path segment.
fn kind_of_collection(segment: &str) -> Option<&'static str> {
    ALL.iter()
        .find(|k| k.id_segments.contains(&segment))
        .map(|k| k.name)
}

/// The entity kind a body field names by ID.
fn kind_of_field(key: &str) -> Option<&'static str> {
    ALL.iter()
        .find(|k| k.ref_fields.contains(&key))
        .map(|k| k.name)
}

/// IDs named in a path (query ignored).
pub fn path_refs(path: &str) -> Vec<IdRef> {
    path_refs_where(path, is_mappable_id)
}

/// Whatever stands in an ID's place: Keystone's own IDs, and those it does
/// not make (an LDAP or federated user's, a domain made with a chosen ID).
fn any_id(s: &str) -> bool {
    !s.is_empty()
}

fn path_refs_where(path: &str, is_id: fn(&str) -> bool) -> Vec<IdRef> {
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    segments
        .windows(2)
        .filter_map(|w| {
            let kind = kind_of_collection(w[0])?;
            is_id(w[1]).then(|| IdRef {
                id: w[1].to_string(),
                kind,
            })
        })
        .collect()
}

/// IDs named in a body, by field name, at any depth.
pub fn body_refs(body: &Value) -> Vec<IdRef> {
    let mut out = Vec::new();
    collect_body_refs(body, is_mappable_id, &mut out);
    out
}

fn collect_body_refs(value: &Value, is_id: fn(&str) -> bool, out: &mut Vec<IdRef>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (kind_of_field(key), v.as_str()) {
                    (Some(kind), Some(id)) if is_id(id) => out.push(IdRef {
                        id: id.to_string(),
                        kind,
                    }),
                    _ => collect_body_refs(v, is_id, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_body_refs(v, is_id, out)),
        _ => {}
    }
}

/// Every ID a request names, each once.
pub fn all_refs(path: &str, body: Option<&Value>) -> Vec<IdRef> {
    refs_where(path, body, is_mappable_id)
}

/// Every ID a request names in an ID's place, whatever its form, each once:
/// what a rule that must not miss one (per-site scope) reads.
pub fn every_ref(path: &str, body: Option<&Value>) -> Vec<IdRef> {
    refs_where(path, body, any_id)
}

fn refs_where(path: &str, body: Option<&Value>, is_id: fn(&str) -> bool) -> Vec<IdRef> {
    let mut refs = path_refs_where(path, is_id);
    if let Some(body) = body {
        collect_body_refs(body, is_id, &mut refs);
    }
    let mut seen = std::collections::HashSet::new();
    refs.retain(|r| seen.insert(r.id.clone()));
    refs
}

/// Kinds whose IDs differ per site and that an op may reference by natural
/// key: the named kinds, and services (by type and name: the catalog is each
/// site's own, so a limit or an endpoint policy names the edge's service).
pub fn referable(kind: &str) -> bool {
    kinds::named(kind).is_some_and(|k| k.key != super::model::NaturalKey::None)
}

/// The natural key an entity's JSON carries: (name, domain ID); see
/// `Kind::natural_key`.
pub fn natural_key(kind: &str, entity: &Value) -> Option<(String, Option<String>)> {
    kinds::named(kind)?.natural_key(entity)
}

/// For a DELETE of an entity (`/v3/<collection>/<id>`), the deleted ID.
pub fn deleted_id(method: &str, path: &str) -> Option<String> {
    if method != "DELETE" {
        return None;
    }
    let path = path.split('?').next().unwrap_or(path);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (id, collection) = segments.split_last()?;
    let collection = collection.strip_prefix(&["v3"])?.join("/");
    ALL.iter()
        .any(|k| k.collection == Some(collection.as_str()))
        .then(|| id.to_string())
}

/// Replaces every mapped ID in a path.
pub fn rewrite_path(path: &str, map: &dyn Fn(&str) -> Option<String>) -> String {
    let (p, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    // Only a segment in an ID's place (after a collection's name) is an ID:
    // a tag or a name in a path is kept as sent.
    let mut previous: Option<&str> = None;
    let rewritten: Vec<String> = p
        .split('/')
        .map(|seg| {
            let at_id = previous.is_some_and(|p| kind_of_collection(p).is_some());
            previous = Some(seg);
            if at_id && is_mappable_id(seg) {
                map(seg).unwrap_or_else(|| seg.to_string())
            } else {
                seg.to_string()
            }
        })
        .collect();
    let mut out = rewritten.join("/");
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Replaces the mapped IDs a body references, at any depth: the values of
/// reference fields (`project_id`, `domain_id`, ...; see `kind_of_field`) and
/// the `id` of an object a kind's name holds (`{"group": {"id": ..}}` in a
/// federation mapping). Anything else (a name, a tag, a description, a
/// password, an extra attribute) is kept as sent, whatever it looks like.
pub fn rewrite_body(body: &mut Value, map: &dyn Fn(&str) -> Option<String>) {
    rewrite_under(body, None, map);
}

/// Whether an object under this key stands for an entity referenced by `id`.
fn names_an_entity(key: &str) -> bool {
    ALL.iter().any(|k| k.ref_objects.contains(&key))
}

fn rewrite_under(value: &mut Value, key: Option<&str>, map: &dyn Fn(&str) -> Option<String>) {
    match value {
        Value::Object(m) => {
            let entity = key.is_some_and(names_an_entity);
            for (k, v) in m.iter_mut() {
                let reference = kind_of_field(k).is_some() || (entity && k == "id");
                match v {
                    Value::String(s) if reference && is_mappable_id(s) => {
                        if let Some(to) = map(s) {
                            *s = to;
                        }
                    }
                    Value::Array(items) if kind_of_field(k).is_some() => {
                        for item in items.iter_mut() {
                            if let Value::String(s) = item {
                                if let Some(to) = is_mappable_id(s).then(|| map(s)).flatten() {
                                    *s = to;
                                }
                            } else {
                                rewrite_under(item, Some(k), map);
                            }
                        }
                    }
                    _ => rewrite_under(v, Some(k), map),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| rewrite_under(v, key, map)),
        _ => {}
    }
}

/// What to send at an edge for an op (after ID rewriting), given the IDs
/// central made.
pub fn replay_form(
    kind: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    created: &[String],
) -> Replay {
    kinds::named(kind)
        .and_then(|k| k.transforms.iter().find(|t| t.method == method))
        .and_then(|t| (t.apply)(path, body.as_ref(), created))
        .unwrap_or_else(|| Replay::as_sent(kind, method, path, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "0123456789abcdef0123456789abcdef";
    const B: &str = "fedcba9876543210fedcba9876543210";
    const C: &str = "00000000000000000000000000000001";

    #[test]
    fn finds_ids_in_paths_and_bodies() {
        let refs = path_refs(&format!("/v3/projects/{A}/users/{B}/roles/{C}"));
        let kinds: Vec<_> = refs.iter().map(|r| (r.id.as_str(), r.kind)).collect();
        assert_eq!(kinds, [(A, "project"), (B, "user"), (C, "role")]);
        let refs = path_refs(&format!("/v3/roles/{A}/implies/{B}"));
        assert_eq!(
            refs[1],
            IdRef {
                id: B.into(),
                kind: "role"
            }
        );
        assert!(path_refs("/v3/domains/default").is_empty());
        let body =
            json!({"user": {"name": "u", "domain_id": A, "default_project_id": B, "options": {}}});
        let mut refs: Vec<_> = body_refs(&body)
            .into_iter()
            .map(|r| (r.id, r.kind))
            .collect();
        refs.sort();
        assert_eq!(
            refs,
            [(A.to_string(), "domain"), (B.to_string(), "project")]
        );
        let all = all_refs(
            &format!("/v3/users/{A}"),
            Some(&json!({"user": {"domain_id": A}})),
        );
        assert_eq!(all.len(), 1);
    }

    #[test]
    fn only_references_are_rewritten() {
        let map = |id: &str| (id == A).then(|| "edge-a".to_string());
        let mut body = json!({
            "project": {"name": A, "description": A, "tags": [A], "domain_id": A,
                        "parent_id": A, "extra_field": A},
            "user": {"password": A, "default_project_id": A},
            "rules": [{"local": [{"group": {"id": A}}, {"domain": {"id": A}}],
                       "remote": [{"type": A}]}],
            "filters": {"service_id": A},
        });
        rewrite_body(&mut body, &map);
        assert_eq!(body["project"]["name"], A);
        assert_eq!(body["project"]["description"], A);
        assert_eq!(body["project"]["tags"][0], A);
        assert_eq!(body["project"]["extra_field"], A);
        assert_eq!(body["user"]["password"], A);
        assert_eq!(body["rules"][0]["remote"][0]["type"], A);
        assert_eq!(body["project"]["domain_id"], "edge-a");
        assert_eq!(body["project"]["parent_id"], "edge-a");
        assert_eq!(body["user"]["default_project_id"], "edge-a");
        assert_eq!(body["rules"][0]["local"][0]["group"]["id"], "edge-a");
        assert_eq!(body["rules"][0]["local"][1]["domain"]["id"], "edge-a");
        assert_eq!(body["filters"]["service_id"], "edge-a");
        // In a path, only IDs in an ID's place.
        assert_eq!(
            rewrite_path(&format!("/v3/projects/{A}/tags/{A}"), &map),
            format!("/v3/projects/edge-a/tags/{A}")
        );
        assert_eq!(
            rewrite_path(&format!("/v3/projects/{A}/users/{A}/roles/{A}"), &map),
            "/v3/projects/edge-a/users/edge-a/roles/edge-a"
        );
    }

    #[test]
    fn natural_keys() {
        assert_eq!(
            natural_key("domain", &json!({"name": "d"})),
            Some(("d".into(), None))
        );
        assert_eq!(
            natural_key("project", &json!({"name": "p"})),
            Some(("p".into(), Some("default".into())))
        );
        assert_eq!(
            natural_key("role", &json!({"name": "r"})),
            Some(("r".into(), None))
        );
        assert_eq!(
            natural_key("role", &json!({"name": "r", "domain_id": A})),
            Some(("r".into(), Some(A.into())))
        );
        assert_eq!(natural_key("credential", &json!({"name": "x"})), None);
    }

    #[test]
    fn rewrites_mapped_ids_only() {
        let map = |id: &str| (id == A).then(|| B.to_string());
        assert_eq!(
            rewrite_path(&format!("/v3/users/{A}/groups/{C}?x={A}"), &map),
            format!("/v3/users/{B}/groups/{C}?x={A}")
        );
        let mut body =
            json!({"user": {"default_project_id": A, "name": A, "list": [A, "x"], "n": 1}});
        rewrite_body(&mut body, &map);
        // A reference is rewritten; a name or a list of anything else is not.
        assert_eq!(
            body,
            json!({"user": {"default_project_id": B, "name": A, "list": [A, "x"], "n": 1}})
        );
    }

    #[test]
    fn deletes_name_their_entity() {
        assert_eq!(
            deleted_id("DELETE", &format!("/v3/users/{A}")),
            Some(A.into())
        );
        assert_eq!(
            deleted_id("DELETE", &format!("/v3/groups/{A}/users/{B}")),
            None
        );
        assert_eq!(deleted_id("PATCH", &format!("/v3/users/{A}")), None);
    }

    #[test]
    fn a_password_change_is_replayed_as_sent_and_its_admin_form_is_a_patch() {
        let body = json!({"user": {"password": "new", "original_password": "old"}});
        let path = format!("/v3/users/{B}/password");
        let sent = replay_form("user_password", "POST", &path, Some(body.clone()), &[]);
        assert_eq!(
            sent,
            Replay::as_sent("user_password", "POST", &path, Some(body.clone()))
        );
        let (method, path, body) =
            kinds::identity::password_change_as_patch(&path, Some(&body)).unwrap();
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("PATCH", format!("/v3/users/{B}").as_str())
        );
        assert_eq!(body, Some(json!({"user": {"password": "new"}})));
        // Everything else is replayed as sent.
        let sent = replay_form("user", "PATCH", "/v3/users/x", None, &[]);
        assert_eq!(sent, Replay::as_sent("user", "PATCH", "/v3/users/x", None));
        assert_eq!(
            ALL.iter().map(|k| k.transforms.len()).sum::<usize>(),
            3,
            "each transform has a test here"
        );
    }

    #[test]
    fn an_ec2_key_is_replayed_as_the_same_credential() {
        // An EC2 key with central's access and secret: the same key through
        // /v3/credentials.
        let body = json!({"tenant_id": "p1", "access": "ak", "secret": "sk"});
        let sent = replay_form(
            "ec2_credential",
            "POST",
            &format!("/v3/users/{B}/credentials/OS-EC2"),
            Some(body),
            &["ak".into()],
        );
        assert_eq!(
            (sent.method.as_str(), sent.path.as_str()),
            ("POST", "/v3/credentials")
        );
        let credential = &sent.body.unwrap()["credential"];
        assert_eq!(credential["type"], "ec2");
        assert_eq!(credential["user_id"], B);
        assert_eq!(credential["project_id"], "p1");
        assert_eq!(
            credential["blob"], r#"{"access": "ak", "secret": "sk", "trust_id": null}"#,
            "as Keystone writes it"
        );
        let blob: Value = serde_json::from_str(credential["blob"].as_str().unwrap()).unwrap();
        assert_eq!(
            (blob["access"].as_str(), blob["secret"].as_str()),
            (Some("ak"), Some("sk"))
        );
        // Logged by an older central, without them: as sent.
        let sent = replay_form(
            "ec2_credential",
            "POST",
            &format!("/v3/users/{B}/credentials/OS-EC2"),
            Some(json!({"tenant_id": "p1"})),
            &[],
        );
        assert!(sent.path.ends_with("/OS-EC2"));
    }

    #[test]
    fn a_project_acting_as_a_domain_is_made_as_a_domain_with_centrals_id() {
        let body = json!({"project": {"name": "dp", "is_domain": true, "description": "d",
                                      "tags": ["t"], "domain_id": null, "colour": "red"}});
        let sent = replay_form("project", "POST", "/v3/projects", Some(body), &[A.into()]);
        assert_eq!(
            (sent.method.as_str(), sent.path.as_str(), sent.kind.as_str()),
            ("POST", "/v3/domains", "domain")
        );
        assert_eq!(
            sent.body,
            Some(
                json!({"domain": {"explicit_domain_id": A, "name": "dp", "description": "d",
                                   "tags": ["t"], "colour": "red"}})
            )
        );
        // Any other project: as sent.
        let plain = json!({"project": {"name": "p", "is_domain": false}});
        let sent = replay_form(
            "project",
            "POST",
            "/v3/projects",
            Some(plain.clone()),
            &[A.into()],
        );
        assert_eq!(
            sent,
            Replay::as_sent("project", "POST", "/v3/projects", Some(plain))
        );
    }

    #[test]
    fn an_identity_providers_domain_made_by_keystone_is_made_first() {
        let path = "/v3/OS-FEDERATION/identity_providers/idp1";
        let body = json!({"identity_provider": {"enabled": true, "domain_id": A},
                          kinds::federation::IDP_MADE_DOMAIN: A});
        let sent = replay_form(
            "identity_provider",
            "PUT",
            path,
            Some(body),
            &["idp1".into()],
        );
        assert_eq!(
            sent.body,
            Some(json!({"identity_provider": {"enabled": true, "domain_id": A}})),
            "the marker is never sent"
        );
        let (method, path, made) = sent.first.unwrap();
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/v3/domains"));
        assert_eq!(
            made,
            Some(
                json!({"domain": {"explicit_domain_id": A, "name": A, "enabled": true,
                "description": "Auto generated federated domain for Identity Provider: idp1"}})
            )
        );
        // Given a domain by its creator: as sent.
        let given = json!({"identity_provider": {"domain_id": A}});
        let sent = replay_form("identity_provider", "PUT", "/v3/x/idp1", Some(given), &[]);
        assert!(sent.first.is_none());
    }
}
