//! The limits route class: registered (default) limits and project or
//! domain limits, each unique by what it limits.

use futures_util::FutureExt;
use serde_json::{json, Value};

use super::catalog::SERVICE;
use super::resource::{DOMAIN, PROJECT};
use crate::keystone::client::KeystoneClient;
use crate::keystone::kind::{
    posted_delete, posted_update, Coverage, Kind, Probe, ReadFn, Reading, Writes, BASE,
};
use crate::keystone::model::{route, Entity, RouteClass, Write, MEMBER, POST};
use crate::keystone::reader::{body_fields, entity, list_all, str_of, Digester, Sheet};

/// Limits are created in lists.
const WRITES: Writes = Writes {
    create: in_a_list,
    update: Some(posted_update),
    delete: posted_delete,
};

pub static REGISTERED_LIMIT: Kind = Kind {
    name: "registered_limit",
    class: RouteClass::Limits,
    routes: &[
        route!(InBody, POST, ["registered_limits"]),
        route!(No, MEMBER, ["registered_limits", "*"]),
    ],
    collection: Some("registered_limits"),
    member: "registered_limit",
    id_segments: &["registered_limits"],
    probe: Probe::Unique(&["service_id", "region_id", "resource_name"]),
    state: Coverage::Read {
        read: Some(read_registered_limits as ReadFn),
        writes: WRITES,
        caveat: None,
    },
    ..BASE
};

pub static LIMIT: Kind = Kind {
    name: "limit",
    class: RouteClass::Limits,
    routes: &[
        route!(InBody, POST, ["limits"]),
        route!(No, MEMBER, ["limits", "*"]),
    ],
    collection: Some("limits"),
    member: "limit",
    id_segments: &["limits"],
    probe: Probe::Unique(&[
        "project_id",
        "domain_id",
        "service_id",
        "region_id",
        "resource_name",
    ]),
    state: Coverage::Read {
        read: Some(read_limits as ReadFn),
        writes: WRITES,
        caveat: None,
    },
    ..BASE
};

/// `POST /v3/<collection>` with `{<collection>: [fields]}`.
fn in_a_list(k: &Kind, _: &Entity, raw: &Value) -> Option<Write> {
    let plural = k.plural()?;
    Some((
        reqwest::Method::POST,
        format!("/v3/{}", k.collection?),
        Some(json!({ plural: [body_fields(raw)] })),
    ))
}

/// Registered limits: named by service, region and resource.
fn read_registered_limits<'a>(
    ks: &'a KeystoneClient,
    _: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    async move {
        for r in list_all(ks, "/v3/registered_limits", "registered_limits", &[]).await? {
            let key = sheet
                .names
                .k()
                .r(SERVICE.name, str_of(&r, "service_id"))
                .t(&format!(
                    " {} {}",
                    str_of(&r, "region_id"),
                    str_of(&r, "resource_name")
                ));
            let e = entity(
                REGISTERED_LIMIT.name,
                key,
                &r,
                &[("service_id", SERVICE.name)],
                &sheet.names,
                &[],
            );
            sheet.out.push(e);
        }
        Ok(())
    }
    .boxed()
}

/// Limits: named by service, region, resource, and project or domain.
fn read_limits<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        for l in list_all(ks, "/v3/limits", "limits", &[]).await? {
            let key = sheet
                .names
                .k()
                .r(SERVICE.name, str_of(&l, "service_id"))
                .t(&format!(
                    " {} {} ",
                    str_of(&l, "region_id"),
                    str_of(&l, "resource_name")
                ));
            let key = match l["project_id"].as_str() {
                Some(p) => key.t("project ").r(PROJECT.name, p),
                None => key.t("domain ").r(DOMAIN.name, str_of(&l, "domain_id")),
            };
            let e = entity(
                LIMIT.name,
                key,
                &l,
                &[
                    ("service_id", SERVICE.name),
                    ("project_id", PROJECT.name),
                    ("domain_id", DOMAIN.name),
                ],
                &sheet.names,
                &[],
            );
            sheet.out.push(e);
        }
        Ok(())
    }
    .boxed()
}
