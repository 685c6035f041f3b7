//! The resource route class: domains and their configurations, projects and
//! their tags.

use std::collections::HashMap;

use futures_util::FutureExt;
use reqwest::Method;
use serde_json::{json, Value};

use crate::keystone::client::{encode, KeystoneClient};
use crate::keystone::kind::{
    pick, posted_create, posted_delete, posted_update, token_domain, Answer, Coverage, Held, Kind,
    Probe, ReadFn, Reading, Writes, BASE,
};
use crate::keystone::model::{
    is_mappable_id, route, Entity, NaturalKey, Replay, RouteClass, Transform, Write, CONFIG,
    MEMBER, POST, PUT_DELETE,
};
use crate::keystone::reader::{entity, list_all, relation, str_of, Digester, Sheet, StateError};

pub static DOMAIN: Kind = Kind {
    name: "domain",
    class: RouteClass::Resource,
    routes: &[
        route!(InBody, POST, ["domains"]),
        route!(No, MEMBER, ["domains", "*"]),
    ],
    collection: Some("domains"),
    member: "domain",
    id_segments: &["domains"],
    ref_fields: &["domain_id"],
    ref_objects: &["domain"],
    keeps_id: Some("explicit_domain_id"),
    key: NaturalKey::Name,
    probe: Probe::KeptIdOrKey,
    state: Coverage::Read {
        read: Some(read_domains as ReadFn),
        writes: Writes {
            create: domain_create,
            update: Some(posted_update),
            delete: domain_delete,
        },
        caveat: None,
    },
    ..BASE
};

pub static DOMAIN_CONFIG: Kind = Kind {
    name: "domain_config",
    class: RouteClass::Resource,
    routes: &[
        route!(No, CONFIG, ["domains", "*", "config"]),
        route!(No, CONFIG, ["domains", "*", "config", "*"]),
        route!(No, CONFIG, ["domains", "*", "config", "*", "*"]),
    ],
    held: Held::Config,
    state: Coverage::Read {
        read: Some(read_domain_configs as ReadFn),
        writes: Writes {
            create: config_create,
            update: Some(config_update),
            delete: config_delete,
        },
        caveat: Some((
            "domain configuration passwords (ldap.password)",
            "the identity service never returns them: a resync copies a domain's configuration \
             without them and a drift audit cannot compare them; write the configuration again \
             through the gateway (or set it at the edge) after a resync",
        )),
    },
    ..BASE
};

pub static PROJECT: Kind = Kind {
    name: "project",
    class: RouteClass::Resource,
    routes: &[
        route!(InBody, POST, ["projects"]),
        route!(No, MEMBER, ["projects", "*"]),
    ],
    collection: Some("projects"),
    member: "project",
    id_segments: &["projects"],
    ref_fields: &["project_id", "default_project_id", "parent_id", "tenant_id"],
    ref_objects: &["project", "projects"],
    key: NaturalKey::NameInDomain,
    probe: Probe::Key,
    derive: Some(token_domain),
    answer: Answer::Entity,
    transforms: &[Transform {
        method: "POST",
        why: "a project acting as a domain (is_domain) is a domain, which logins name by ID: \
              replayed through the domain API with explicit_domain_id it keeps central's ID (the \
              projects API would give it another)",
        apply: domain_project_as_domain,
    }],
    state: Coverage::Read {
        read: Some(read_projects as ReadFn),
        writes: Writes {
            create: project_create,
            update: Some(posted_update),
            delete: posted_delete,
        },
        caveat: None,
    },
    ..BASE
};

pub static PROJECT_TAG: Kind = Kind {
    name: "project_tag",
    class: RouteClass::Resource,
    routes: &[
        route!(No, PUT_DELETE, ["projects", "*", "tags"]),
        route!(No, PUT_DELETE, ["projects", "*", "tags", "*"]),
    ],
    held: Held::Set("tags"),
    state: Coverage::PartOf("project", "a project's tags are one of its fields"),
    ..BASE
};

/// Created with central's ID (`explicit_domain_id`).
fn domain_create(k: &Kind, e: &Entity, raw: &Value) -> Option<Write> {
    let (method, path, mut body) = posted_create(k, e, raw)?;
    if is_mappable_id(&e.id) {
        body.as_mut()?[k.member]["explicit_domain_id"] = json!(e.id);
    }
    Some((method, path, body))
}

/// Keystone deletes only a disabled domain.
fn domain_delete(k: &Kind, e: &Entity, raw: &Value) -> Vec<Write> {
    let Some(at) = k.member_path(&e.id) else {
        return Vec::new();
    };
    let mut calls = vec![(
        Method::PATCH,
        at,
        Some(json!({ k.member: {"enabled": false} })),
    )];
    calls.extend(posted_delete(k, e, raw));
    calls
}

/// A top-level project's parent is its domain: not sent.
fn project_create(k: &Kind, e: &Entity, raw: &Value) -> Option<Write> {
    let (method, path, mut body) = posted_create(k, e, raw)?;
    if raw["parent_id"] == raw["domain_id"] {
        body.as_mut()?[k.member]
            .as_object_mut()?
            .remove("parent_id");
    }
    Some((method, path, body))
}

fn config_path(raw: &Value) -> String {
    format!("/v3/domains/{}/config", encode(str_of(raw, "domain_id")))
}

fn config_create(_: &Kind, _: &Entity, raw: &Value) -> Option<Write> {
    Some((
        Method::PUT,
        config_path(raw),
        Some(json!({"config": raw["config"]})),
    ))
}

fn config_update(_: &Kind, _: &Entity, raw: &Value, fields: &[String]) -> Option<Write> {
    Some((
        Method::PATCH,
        config_path(raw),
        Some(json!({"config": pick(&raw["config"], fields)})),
    ))
}

fn config_delete(_: &Kind, _: &Entity, raw: &Value) -> Vec<Write> {
    vec![(Method::DELETE, config_path(raw), None)]
}

/// A project created with `is_domain: true` as the domain it is, with
/// central's ID. The domain API takes what the project carries (its extra
/// attributes too) but where it sits.
fn domain_project_as_domain(
    path: &str,
    body: Option<&Value>,
    created: &[String],
) -> Option<Replay> {
    let project = body?.get(PROJECT.member)?.as_object()?;
    if path != "/v3/projects" || project.get("is_domain") != Some(&Value::Bool(true)) {
        return None;
    }
    let [id] = created else { return None };
    let mut domain: serde_json::Map<String, Value> = project
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "is_domain" | "domain_id" | "parent_id" | "id"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    domain.insert("explicit_domain_id".into(), Value::String(id.clone()));
    Some(Replay {
        method: "POST".into(),
        path: "/v3/domains".into(),
        body: Some(json!({ DOMAIN.member: domain })),
        kind: DOMAIN.name.into(),
        first: None,
    })
}

/// Domains, named by name.
fn read_domains<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        let domains = list_all(ks, "/v3/domains", "domains", &[]).await?;
        sheet.domain_ids = domains
            .iter()
            .map(|d| str_of(d, "id").to_string())
            .collect();
        for d in &domains {
            sheet
                .names
                .add(DOMAIN.name, str_of(d, "id"), str_of(d, "name"));
        }
        for d in &domains {
            let key = sheet.names.k().t(str_of(d, "name"));
            let e = entity(DOMAIN.name, key, d, &[], &sheet.names, &[]);
            sheet.out.push(e);
        }
        Ok(())
    }
    .boxed()
}

/// Each domain's configuration, named by its domain.
fn read_domain_configs<'a>(
    ks: &'a KeystoneClient,
    _: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    async move {
        for id in sheet.domain_ids.clone() {
            let path = format!("/v3/domains/{}/config", encode(&id));
            let reply = ks.send(Method::GET, &path, None).await?;
            if reply.is_success() {
                let config = reply.json().map(|v| v["config"].clone());
                if let Some(config @ Value::Object(_)) = config {
                    let fields = config
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let mut e = relation(
                        DOMAIN_CONFIG.name,
                        sheet.names.k().r(DOMAIN.name, &id),
                        vec![id.clone()],
                        json!({"domain_id": id, "config": config}),
                    );
                    e.fields = fields;
                    sheet.out.push(e);
                }
            } else if reply.status >= 500 || reply.status == 429 {
                return Err(StateError::Http {
                    path: "/v3/domains/{id}/config".into(),
                    status: reply.status,
                    message: reply.message(),
                });
            }
        }
        Ok(())
    }
    .boxed()
}

/// Projects: named within their domain; a child after its parent.
fn read_projects<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        let projects = list_all(ks, "/v3/projects", "projects", &sheet.domain_ids).await?;
        for p in &projects {
            let key = format!(
                "{}/{}",
                sheet.names.key(DOMAIN.name, str_of(p, "domain_id")),
                str_of(p, "name")
            );
            sheet.names.add(PROJECT.name, str_of(p, "id"), &key);
        }
        let parents: HashMap<&str, &str> = projects
            .iter()
            .map(|p| (str_of(p, "id"), str_of(p, "parent_id")))
            .collect();
        for p in &projects {
            let mut level = 0;
            let mut at = str_of(p, "parent_id");
            while let Some(up) = parents.get(at) {
                level += 1;
                at = up;
                if level > 64 {
                    break;
                }
            }
            let key = sheet
                .names
                .k()
                .r(DOMAIN.name, str_of(p, "domain_id"))
                .t("/")
                .t(str_of(p, "name"));
            // A top-level project's parent is its domain: nothing to compare.
            let drop: &[&str] = if p["parent_id"] == p["domain_id"] {
                &["parent_id"]
            } else {
                &[]
            };
            let mut e = entity(
                PROJECT.name,
                key,
                p,
                &[("domain_id", DOMAIN.name), ("parent_id", PROJECT.name)],
                &sheet.names,
                drop,
            );
            if let Some(tags) = e.fields.get_mut("tags").and_then(Value::as_array_mut) {
                tags.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
            e.level = level;
            sheet.out.push(e);
        }
        Ok(())
    }
    .boxed()
}
