//! The federation route class: identity providers and their protocols,
//! mappings, service providers. Their IDs are the names their creator gives
//! them in the URL, the same at every site.

use futures_util::FutureExt;
use reqwest::Method;
use serde_json::{json, Value};

use super::resource::DOMAIN;
use crate::keystone::client::{encode, KeystoneClient};
use crate::keystone::kind::{pick, Coverage, Kind, ReadFn, Reading, Writes, BASE};
use crate::keystone::model::{
    route, Creates, Entity, Replay, RouteClass, Transform, Write, MEMBER, PUT,
};
use crate::keystone::reader::{body_fields, entity, list_all, str_of, Digester, Sheet, StateError};

/// Created by PUT to their URL, updated by PATCH to it, deleted there.
const WRITES: Writes = Writes {
    create: at_url_create,
    update: Some(at_url_update),
    delete: at_url_delete,
};

pub static IDENTITY_PROVIDER: Kind = Kind {
    name: "identity_provider",
    class: RouteClass::Federation,
    routes: &[
        route!(FromUrl, PUT, ["OS-FEDERATION", "identity_providers", "*"]),
        route!(No, MEMBER, ["OS-FEDERATION", "identity_providers", "*"]),
    ],
    member: "identity_provider",
    derive: Some(idp_domain_made),
    transforms: &[Transform {
        method: "PUT",
        why: "an identity provider created without a domain gets one Keystone makes (ID and name \
              a new UUID): the op carries central's, made first at the edge with that ID, so the \
              provider and what is made in its domain name the same domain at every site",
        apply: idp_with_its_domain,
    }],
    state: Coverage::Read {
        read: Some(read_identity_providers as ReadFn),
        writes: WRITES,
        caveat: None,
    },
    ..BASE
};

pub static MAPPING: Kind = Kind {
    name: "mapping",
    class: RouteClass::Federation,
    routes: &[
        route!(FromUrl, PUT, ["OS-FEDERATION", "mappings", "*"]),
        route!(No, MEMBER, ["OS-FEDERATION", "mappings", "*"]),
    ],
    member: "mapping",
    state: Coverage::Read {
        read: Some(read_mappings as ReadFn),
        writes: WRITES,
        caveat: None,
    },
    ..BASE
};

pub static FEDERATION_PROTOCOL: Kind = Kind {
    name: "federation_protocol",
    was: &["protocol"],
    class: RouteClass::Federation,
    routes: &[
        route!(
            FromUrl,
            PUT,
            ["OS-FEDERATION", "identity_providers", "*", "protocols", "*"]
        ),
        route!(
            No,
            MEMBER,
            ["OS-FEDERATION", "identity_providers", "*", "protocols", "*"]
        ),
    ],
    member: "protocol",
    state: Coverage::Read {
        read: Some(read_protocols as ReadFn),
        writes: WRITES,
        caveat: None,
    },
    ..BASE
};

pub static SERVICE_PROVIDER: Kind = Kind {
    name: "service_provider",
    class: RouteClass::Federation,
    routes: &[
        route!(FromUrl, PUT, ["OS-FEDERATION", "service_providers", "*"]),
        route!(No, MEMBER, ["OS-FEDERATION", "service_providers", "*"]),
    ],
    member: "service_provider",
    state: Coverage::Read {
        read: Some(read_service_providers as ReadFn),
        writes: WRITES,
        caveat: None,
    },
    ..BASE
};

/// The top-level field of an identity provider's replay body naming the
/// domain Keystone made for it at central (see `idp_domain_made`); never sent.
pub const IDP_MADE_DOMAIN: &str = "domain_made_by_keystone";

/// An identity provider created without a domain is given one Keystone
/// makes: the replay names it, and says it was made so (the edge makes it
/// first, with this ID; see `idp_with_its_domain`).
fn idp_domain_made(
    k: &Kind,
    creates: Creates,
    request: &mut Value,
    answer: Option<&Value>,
) -> bool {
    if creates != Creates::FromUrl {
        return false;
    }
    let Some(domain) = answer
        .and_then(|r| r.get(k.member))
        .and_then(|i| i.get("domain_id"))
        .and_then(Value::as_str)
    else {
        return false;
    };
    let Some(body) = request.as_object_mut() else {
        return false;
    };
    let Some(idp) = body.get_mut(k.member).and_then(Value::as_object_mut) else {
        return false;
    };
    if !idp.get("domain_id").is_none_or(Value::is_null) {
        return false;
    }
    idp.insert("domain_id".into(), Value::String(domain.to_string()));
    body.insert(IDP_MADE_DOMAIN.into(), Value::String(domain.to_string()));
    true
}

/// An identity provider whose domain central's Keystone made: that domain
/// (as Keystone makes it: ID and name the same UUID, enabled, described as
/// made for this provider) is created first, with central's ID.
fn idp_with_its_domain(path: &str, body: Option<&Value>, _created: &[String]) -> Option<Replay> {
    let domain = body?.get(IDP_MADE_DOMAIN)?.as_str()?.to_string();
    let idp = path.rsplit('/').next()?;
    let mut sent = body?.clone();
    sent.as_object_mut()?.remove(IDP_MADE_DOMAIN);
    let made = json!({ DOMAIN.member: {
        "explicit_domain_id": domain,
        "name": domain,
        "description": format!("Auto generated federated domain for Identity Provider: {idp}"),
        "enabled": true,
    }});
    Some(Replay {
        first: Some(("POST".into(), "/v3/domains".into(), Some(made))),
        ..Replay::as_sent(IDENTITY_PROVIDER.name, "PUT", path, Some(sent))
    })
}

/// The URL of a federation entity, and what of its raw form is its body
/// (a protocol's reader keeps its provider beside it).
fn at_url<'a>(k: &Kind, e: &Entity, raw: &'a Value) -> Option<(String, &'a Value)> {
    let id = encode(&e.id);
    let fed = "/v3/OS-FEDERATION";
    Some(match k.name {
        "identity_provider" => (format!("{fed}/identity_providers/{id}"), raw),
        "mapping" => (format!("{fed}/mappings/{id}"), raw),
        "service_provider" => (format!("{fed}/service_providers/{id}"), raw),
        "federation_protocol" => (
            format!(
                "{fed}/identity_providers/{}/protocols/{id}",
                encode(str_of(raw, "idp"))
            ),
            &raw["protocol"],
        ),
        _ => return None,
    })
}

fn at_url_create(k: &Kind, e: &Entity, raw: &Value) -> Option<Write> {
    let (path, inner) = at_url(k, e, raw)?;
    let mut body = body_fields(inner);
    // Named by the URL: not in a body.
    body.remove("idp_id");
    Some((Method::PUT, path, Some(json!({ k.member: body }))))
}

fn at_url_update(k: &Kind, e: &Entity, raw: &Value, fields: &[String]) -> Option<Write> {
    let (path, inner) = at_url(k, e, raw)?;
    let mut body = pick(inner, fields);
    body.remove("idp_id");
    Some((Method::PATCH, path, Some(json!({ k.member: body }))))
}

fn at_url_delete(k: &Kind, e: &Entity, raw: &Value) -> Vec<Write> {
    at_url(k, e, raw)
        .map(|(p, _)| vec![(Method::DELETE, p, None)])
        .unwrap_or_default()
}

/// Identity providers, named by ID.
fn read_identity_providers<'a>(
    ks: &'a KeystoneClient,
    _: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    async move {
        let path = "/v3/OS-FEDERATION/identity_providers";
        let idps = list_all(ks, path, "identity_providers", &[]).await?;
        for i in &idps {
            let mut e = entity(
                IDENTITY_PROVIDER.name,
                sheet.names.k().t(str_of(i, "id")),
                i,
                &[("domain_id", DOMAIN.name)],
                &sheet.names,
                &[],
            );
            if let Some(ids) = e.fields.get_mut("remote_ids").and_then(Value::as_array_mut) {
                ids.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
            sheet.out.push(e);
        }
        sheet.listed.insert(IDENTITY_PROVIDER.name, idps);
        Ok(())
    }
    .boxed()
}

fn read_mappings<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    by_id(ks, sheet, &MAPPING, "mappings").boxed()
}

/// Each identity provider's protocols, named `<provider>/<protocol>`.
fn read_protocols<'a>(
    ks: &'a KeystoneClient,
    _: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    async move {
        let idps = sheet.listed(IDENTITY_PROVIDER.name).to_vec();
        for i in &idps {
            let idp = str_of(i, "id");
            let path = format!(
                "/v3/OS-FEDERATION/identity_providers/{}/protocols",
                encode(idp)
            );
            for p in list_all(ks, &path, "protocols", &[]).await? {
                let mut e = entity(
                    FEDERATION_PROTOCOL.name,
                    sheet.names.k().t(&format!("{idp}/{}", str_of(&p, "id"))),
                    &p,
                    &[],
                    &sheet.names,
                    &[],
                );
                e.raw = Some(json!({"idp": idp, "protocol": p}));
                sheet.out.push(e);
            }
        }
        Ok(())
    }
    .boxed()
}

fn read_service_providers<'a>(
    ks: &'a KeystoneClient,
    _: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    by_id(ks, sheet, &SERVICE_PROVIDER, "service_providers").boxed()
}

/// The entities of `/v3/OS-FEDERATION/<plural>`, named by ID.
async fn by_id(
    ks: &KeystoneClient,
    sheet: &mut Sheet,
    kind: &Kind,
    plural: &str,
) -> Result<(), StateError> {
    let path = format!("/v3/OS-FEDERATION/{plural}");
    for v in list_all(ks, &path, plural, &[]).await? {
        let e = entity(
            kind.name,
            sheet.names.k().t(str_of(&v, "id")),
            &v,
            &[],
            &sheet.names,
            &[],
        );
        sheet.out.push(e);
    }
    Ok(())
}
