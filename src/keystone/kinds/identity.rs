//! The identity route class: users, their passwords, groups and memberships.

use futures_util::FutureExt;
use serde_json::{json, Value};

use super::resource::{DOMAIN, PROJECT};
use crate::keystone::client::{encode, KeystoneClient};
use crate::keystone::kind::{
    token_domain, Answer, Coverage, Kind, Probe, ReadFn, Reading, Writes, BASE,
};
use crate::keystone::model::{route, NaturalKey, RouteClass, MEMBER, POST, PUT_DELETE};
use crate::keystone::reader::{
    entity, list, list_all, relation, str_of, Digester, Sheet, StateError,
};

pub static USER: Kind = Kind {
    name: "user",
    class: RouteClass::Identity,
    routes: &[
        route!(InBody, POST, ["users"]),
        route!(No, MEMBER, ["users", "*"]),
    ],
    collection: Some("users"),
    member: "user",
    id_segments: &["users"],
    ref_fields: &["user_id"],
    ref_objects: &["user"],
    key: NaturalKey::NameInDomain,
    probe: Probe::Key,
    derive: Some(token_domain),
    answer: Answer::Entity,
    state: Coverage::Read {
        read: Some(read_users as ReadFn),
        writes: Writes::POSTED,
        caveat: None,
    },
    ..BASE
};

/// A self-service password change (`POST /v3/users/{id}/password`) is
/// replayed as sent: an admin's PATCH would leave the password expired where
/// Keystone runs with `change_password_upon_first_use`; the edge falls back
/// to the PATCH (`password_change_as_patch`) only when the site refuses it.
pub static USER_PASSWORD: Kind = Kind {
    name: "user_password",
    class: RouteClass::Identity,
    routes: &[route!(No, POST, ["users", "*", "password"])],
    member: "user",
    state: Coverage::NotRead {
        what: "passwords",
        why: "the identity service never returns them: a resync cannot copy them; central \
              lists the users whose password it has not seen (needs_password)",
        reported: false,
    },
    ..BASE
};

pub static GROUP: Kind = Kind {
    name: "group",
    class: RouteClass::Identity,
    routes: &[
        route!(InBody, POST, ["groups"]),
        route!(No, MEMBER, ["groups", "*"]),
    ],
    collection: Some("groups"),
    member: "group",
    id_segments: &["groups"],
    ref_fields: &["group_id"],
    ref_objects: &["group", "groups"],
    key: NaturalKey::NameInDomain,
    probe: Probe::Key,
    derive: Some(token_domain),
    answer: Answer::Entity,
    state: Coverage::Read {
        read: Some(read_groups as ReadFn),
        writes: Writes::POSTED,
        caveat: None,
    },
    ..BASE
};

pub static GROUP_MEMBERSHIP: Kind = Kind {
    name: "group_membership",
    was: &["membership"],
    class: RouteClass::Identity,
    routes: &[route!(No, PUT_DELETE, ["groups", "*", "users", "*"])],
    association: true,
    state: Coverage::Read {
        read: Some(read_memberships as ReadFn),
        writes: Writes::RELATION,
        caveat: None,
    },
    ..BASE
};

/// An admin's form of a self-service password change: PATCH the user with
/// the new password.
pub fn password_change_as_patch(
    path: &str,
    body: Option<&Value>,
) -> Option<(String, String, Option<Value>)> {
    let user_path = path.strip_suffix("/password")?;
    let password = body?.get(USER.member)?.get("password")?.clone();
    Some((
        "PATCH".into(),
        user_path.to_string(),
        Some(json!({ USER.member: {"password": password} })),
    ))
}

/// Groups and users are named within their domain.
fn read_groups<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        let groups = list_all(ks, "/v3/groups", "groups", &sheet.domain_ids).await?;
        for g in &groups {
            in_domain(sheet, &GROUP, g, &[("domain_id", DOMAIN.name)], &[]);
        }
        sheet.listed.insert(GROUP.name, groups);
        Ok(())
    }
    .boxed()
}

fn read_users<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        let users = list_all(ks, "/v3/users", "users", &sheet.domain_ids).await?;
        for u in &users {
            in_domain(
                sheet,
                &USER,
                u,
                &[
                    ("domain_id", DOMAIN.name),
                    ("default_project_id", PROJECT.name),
                ],
                &["password"],
            );
        }
        Ok(())
    }
    .boxed()
}

/// One group or user: named `<domain>/<name>`.
fn in_domain(
    sheet: &mut Sheet,
    kind: &Kind,
    v: &Value,
    refs: &[(&str, &'static str)],
    drop: &[&str],
) {
    let key = format!(
        "{}/{}",
        sheet.names.key(DOMAIN.name, str_of(v, "domain_id")),
        str_of(v, "name")
    );
    sheet.names.add(kind.name, str_of(v, "id"), &key);
    let key = sheet
        .names
        .k()
        .r(DOMAIN.name, str_of(v, "domain_id"))
        .t("/")
        .t(str_of(v, "name"));
    let e = entity(kind.name, key, v, refs, &sheet.names, drop);
    sheet.out.push(e);
}

fn read_memberships<'a>(
    ks: &'a KeystoneClient,
    _: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    async move {
        let groups = sheet.listed(GROUP.name).to_vec();
        for g in &groups {
            let gid = str_of(g, "id");
            let path = format!("/v3/groups/{}/users", encode(gid));
            let Some((members, truncated)) = list(ks, &path, "users").await? else {
                continue;
            };
            if truncated {
                return Err(StateError::Truncated { path });
            }
            for u in members {
                let uid = str_of(&u, "id");
                let e = relation(
                    GROUP_MEMBERSHIP.name,
                    sheet
                        .names
                        .k()
                        .r(USER.name, uid)
                        .t(" in ")
                        .r(GROUP.name, gid),
                    vec![gid.to_string(), uid.to_string()],
                    json!({"path": format!("/v3/groups/{gid}/users/{uid}")}),
                );
                sheet.out.push(e);
            }
        }
        Ok(())
    }
    .boxed()
}
