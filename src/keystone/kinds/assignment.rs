//! The assignment route class: roles, the roles they imply, and grants of
//! roles (direct, and inherited to a domain's or a project's subtree).

use std::collections::HashSet;

use futures_util::FutureExt;
use reqwest::Method;
use serde_json::{json, Value};

use super::identity::{GROUP, USER};
use super::resource::{DOMAIN, PROJECT};
use crate::keystone::client::{encode, KeystoneClient};
use crate::keystone::kind::{Coverage, Kind, Probe, ReadFn, Reading, Writes, BASE};
use crate::keystone::model::{route, Entity, NaturalKey, RouteClass, MEMBER, POST, PUT_DELETE};
use crate::keystone::reader::{
    entity, list, list_all, relation, str_of, Digester, Names, Sheet, StateError,
};

pub static ROLE: Kind = Kind {
    name: "role",
    class: RouteClass::Assignment,
    routes: &[
        route!(InBody, POST, ["roles"]),
        route!(No, MEMBER, ["roles", "*"]),
    ],
    collection: Some("roles"),
    member: "role",
    id_segments: &["roles", "implies"],
    ref_fields: &["role_id", "prior_role_id", "implied_role_id"],
    ref_objects: &["role", "roles"],
    key: NaturalKey::NameGlobalOrInDomain,
    probe: Probe::Key,
    state: Coverage::Read {
        read: Some(read_roles as ReadFn),
        writes: Writes::POSTED,
        caveat: None,
    },
    ..BASE
};

pub static IMPLIED_ROLE: Kind = Kind {
    name: "implied_role",
    class: RouteClass::Assignment,
    routes: &[route!(No, PUT_DELETE, ["roles", "*", "implies", "*"])],
    association: true,
    state: Coverage::Read {
        read: Some(read_implied_roles as ReadFn),
        writes: Writes::RELATION,
        caveat: None,
    },
    ..BASE
};

/// A role granted on a project, a domain or the system (older releases
/// named grants of both kinds `assignment`).
pub static GRANT: Kind = Kind {
    name: "grant",
    was: &["assignment"],
    class: RouteClass::Assignment,
    routes: &[
        route!(
            No,
            PUT_DELETE,
            ["projects", "*", "users", "*", "roles", "*"]
        ),
        route!(
            No,
            PUT_DELETE,
            ["projects", "*", "groups", "*", "roles", "*"]
        ),
        route!(No, PUT_DELETE, ["domains", "*", "users", "*", "roles", "*"]),
        route!(
            No,
            PUT_DELETE,
            ["domains", "*", "groups", "*", "roles", "*"]
        ),
        route!(No, PUT_DELETE, ["system", "users", "*", "roles", "*"]),
        route!(No, PUT_DELETE, ["system", "groups", "*", "roles", "*"]),
    ],
    association: true,
    state: Coverage::Read {
        read: Some(read_grants as ReadFn),
        writes: Writes::RELATION,
        caveat: None,
    },
    ..BASE
};

/// A role granted to a domain's or a project's subtree (`OS-INHERIT`); read
/// with the other grants (older releases: an `assignment` whose key ends
/// ` (inherited)`).
pub static INHERITED_GRANT: Kind = Kind {
    name: "inherited_grant",
    was: &["assignment"],
    class: RouteClass::Assignment,
    routes: &[
        route!(
            No,
            PUT_DELETE,
            [
                "OS-INHERIT",
                "domains",
                "*",
                "users",
                "*",
                "roles",
                "*",
                "inherited_to_projects"
            ]
        ),
        route!(
            No,
            PUT_DELETE,
            [
                "OS-INHERIT",
                "domains",
                "*",
                "groups",
                "*",
                "roles",
                "*",
                "inherited_to_projects"
            ]
        ),
        route!(
            No,
            PUT_DELETE,
            [
                "OS-INHERIT",
                "projects",
                "*",
                "users",
                "*",
                "roles",
                "*",
                "inherited_to_projects"
            ]
        ),
        route!(
            No,
            PUT_DELETE,
            [
                "OS-INHERIT",
                "projects",
                "*",
                "groups",
                "*",
                "roles",
                "*",
                "inherited_to_projects"
            ]
        ),
    ],
    association: true,
    state: Coverage::Read {
        read: None,
        writes: Writes::RELATION,
        caveat: None,
    },
    ..BASE
};

/// What ends the key of an inherited grant.
pub const INHERITED: &str = " (inherited)";

/// What ends the key of a grant on the system (no domain: see
/// `keystone::scope`).
pub const ON_SYSTEM: &str = " on system";

/// Roles: global ones, then each domain's.
fn read_roles<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        let mut roles = list_all(ks, "/v3/roles", "roles", &[]).await?;
        let mut seen: HashSet<String> = roles.iter().map(|r| str_of(r, "id").to_string()).collect();
        for d in &sheet.domain_ids {
            let path = format!("/v3/roles?domain_id={}", encode(d));
            for r in list_all(ks, &path, "roles", &[]).await? {
                if seen.insert(str_of(&r, "id").to_string()) {
                    roles.push(r);
                }
            }
        }
        for r in &roles {
            let key = match r["domain_id"].as_str() {
                Some(d) => format!("{}@{}", str_of(r, "name"), sheet.names.key(DOMAIN.name, d)),
                None => str_of(r, "name").to_string(),
            };
            sheet.names.add(ROLE.name, str_of(r, "id"), &key);
        }
        for r in &roles {
            let key = match r["domain_id"].as_str() {
                Some(d) => sheet
                    .names
                    .k()
                    .t(str_of(r, "name"))
                    .t("@")
                    .r(DOMAIN.name, d),
                None => sheet.names.k().t(str_of(r, "name")),
            };
            let e = entity(
                ROLE.name,
                key,
                r,
                &[("domain_id", DOMAIN.name)],
                &sheet.names,
                &[],
            );
            sheet.out.push(e);
        }
        sheet.listed.insert(ROLE.name, roles);
        Ok(())
    }
    .boxed()
}

/// What each role implies: `<prior> -> <implied>`.
fn read_implied_roles<'a>(
    ks: &'a KeystoneClient,
    _: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    async move {
        let roles = sheet.listed(ROLE.name).to_vec();
        for r in &roles {
            let prior = str_of(r, "id");
            let path = format!("/v3/roles/{}/implies", encode(prior));
            let reply = ks.send(Method::GET, &path, None).await?;
            if reply.status >= 500 || reply.status == 429 {
                return Err(StateError::Http {
                    path: "/v3/roles/{id}/implies".into(),
                    status: reply.status,
                    message: reply.message(),
                });
            }
            let json = reply.json().unwrap_or(Value::Null);
            for implied in json["role_inference"]["implies"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let i = str_of(implied, "id");
                let e = relation(
                    IMPLIED_ROLE.name,
                    sheet
                        .names
                        .k()
                        .r(ROLE.name, prior)
                        .t(" -> ")
                        .r(ROLE.name, i),
                    vec![prior.to_string(), i.to_string()],
                    json!({"path": format!("/v3/roles/{prior}/implies/{i}")}),
                );
                sheet.out.push(e);
            }
        }
        Ok(())
    }
    .boxed()
}

/// Role assignments, direct ones and inherited ones, on every target.
fn read_grants<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        let mut assignments = Vec::new();
        match list(ks, "/v3/role_assignments", "role_assignments").await? {
            Some((items, false)) => assignments = items,
            Some((_, true)) => {
                for r in sheet.listed(ROLE.name) {
                    let path = format!("/v3/role_assignments?role.id={}", encode(str_of(r, "id")));
                    match list(ks, &path, "role_assignments").await? {
                        Some((_, true)) => return Err(StateError::Truncated { path }),
                        Some((items, false)) => assignments.extend(items),
                        None => {}
                    }
                }
            }
            None => {}
        }
        for a in &assignments {
            if let Some(e) = grant(a, &sheet.names) {
                sheet.out.push(e);
            }
        }
        Ok(())
    }
    .boxed()
}

/// One role assignment as a relation: role, actor, target, inheritance.
fn grant(a: &Value, names: &Names) -> Option<Entity> {
    let role = a["role"]["id"].as_str()?;
    let (actor_kind, actor, actor_seg) = match (a["user"]["id"].as_str(), a["group"]["id"].as_str())
    {
        (Some(u), _) => (USER.name, u, "users"),
        (None, Some(g)) => (GROUP.name, g, "groups"),
        _ => return None,
    };
    let scope = &a["scope"];
    let inherited = scope["OS-INHERIT:inherited_to"].as_str() == Some("projects");
    let key = names
        .k()
        .r(ROLE.name, role)
        .t(&format!(" to {actor_kind} "))
        .r(actor_kind, actor);
    let (key, target_path, target_id) = if let Some(p) = scope["project"]["id"].as_str() {
        (
            key.t(" on project ").r(PROJECT.name, p),
            format!("projects/{p}"),
            Some(p),
        )
    } else if let Some(d) = scope["domain"]["id"].as_str() {
        (
            key.t(" on domain ").r(DOMAIN.name, d),
            format!("domains/{d}"),
            Some(d),
        )
    } else if scope["system"].is_object() {
        (key.t(ON_SYSTEM), "system".to_string(), None)
    } else {
        return None;
    };
    let (kind, key, path) = if inherited {
        (
            INHERITED_GRANT.name,
            key.t(INHERITED),
            format!(
                "/v3/OS-INHERIT/{target_path}/{actor_seg}/{actor}/roles/{role}/inherited_to_projects"
            ),
        )
    } else {
        (
            GRANT.name,
            key,
            format!("/v3/{target_path}/{actor_seg}/{actor}/roles/{role}"),
        )
    };
    let mut ids = vec![role.to_string(), actor.to_string()];
    ids.extend(target_id.map(str::to_string));
    Some(relation(kind, key, ids, json!({"path": path})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_is_named_by_role_actor_target_and_inheritance() {
        let mut names = Names::default();
        names.add("role", "r1", "member");
        names.add("user", "u1", "Default/alice");
        names.add("project", "p1", "Default/demo");
        let a = json!({"role": {"id": "r1"}, "user": {"id": "u1"},
                       "scope": {"project": {"id": "p1"}, "OS-INHERIT:inherited_to": "projects"}});
        let e = grant(&a, &names).unwrap();
        assert_eq!(e.kind, INHERITED_GRANT.name);
        assert_eq!(
            e.key,
            "member to user Default/alice on project Default/demo (inherited)"
        );
        assert_eq!(
            e.raw.unwrap()["path"],
            "/v3/OS-INHERIT/projects/p1/users/u1/roles/r1/inherited_to_projects"
        );
        let s =
            json!({"role": {"id": "r1"}, "group": {"id": "g"}, "scope": {"system": {"all": true}}});
        assert_eq!(
            grant(&s, &names).unwrap().raw.unwrap()["path"],
            "/v3/system/groups/g/roles/r1"
        );
    }
}
