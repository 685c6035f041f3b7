//! The catalog route class: regions, services, endpoints and endpoint
//! groups, and their associations with projects (`OS-EP-FILTER`). Each
//! site has its own catalog (its own URLs): replicated only when the
//! operator asks (`--replicate catalog`), and never read by a resync or a
//! drift audit but for services, which limits and endpoint policies name.

use futures_util::FutureExt;

use crate::keystone::client::KeystoneClient;
use crate::keystone::kind::{Coverage, Kind, Probe, ReadFn, Reading, BASE};
use crate::keystone::model::{route, NaturalKey, RouteClass, MEMBER, POST, PUT, PUT_DELETE};
use crate::keystone::reader::{entity, list_all, str_of, Digester, Sheet};

const SITE_OWN: &str = "each site has its own catalog (its own URLs): a resync neither copies \
                        nor checks it";

pub static REGION: Kind = Kind {
    name: "region",
    class: RouteClass::Catalog,
    routes: &[
        route!(InBody, POST, ["regions"]),
        route!(FromUrl, PUT, ["regions", "*"]),
        route!(No, MEMBER, ["regions", "*"]),
    ],
    collection: Some("regions"),
    member: "region",
    id_segments: &["regions"],
    keeps_id: Some("id"),
    probe: Probe::KeptId,
    state: Coverage::NotRead {
        what: "regions",
        why: SITE_OWN,
        reported: false,
    },
    ..BASE
};

/// Named `<type>/<name>`: an op that names a service names the site's
/// service of that type and name.
pub static SERVICE: Kind = Kind {
    name: "service",
    class: RouteClass::Catalog,
    routes: &[
        route!(InBody, POST, ["services"]),
        route!(No, MEMBER, ["services", "*"]),
    ],
    collection: Some("services"),
    member: "service",
    id_segments: &["services"],
    ref_fields: &["service_id"],
    key: NaturalKey::TypeAndName,
    probe: Probe::LookAlike {
        query: &["type"],
        fields: &["name", "type"],
    },
    state: Coverage::ReferenceOnly(read_services as ReadFn),
    ..BASE
};

pub static ENDPOINT: Kind = Kind {
    name: "endpoint",
    class: RouteClass::Catalog,
    routes: &[
        route!(InBody, POST, ["endpoints"]),
        route!(No, MEMBER, ["endpoints", "*"]),
    ],
    collection: Some("endpoints"),
    member: "endpoint",
    id_segments: &["endpoints"],
    ref_fields: &["endpoint_id"],
    probe: Probe::LookAlike {
        query: &["service_id", "interface"],
        fields: &["url", "region_id"],
    },
    state: Coverage::NotRead {
        what: "endpoints",
        why: SITE_OWN,
        reported: false,
    },
    ..BASE
};

pub static ENDPOINT_GROUP: Kind = Kind {
    name: "endpoint_group",
    class: RouteClass::Catalog,
    routes: &[
        route!(InBody, POST, ["OS-EP-FILTER", "endpoint_groups"]),
        route!(No, MEMBER, ["OS-EP-FILTER", "endpoint_groups", "*"]),
    ],
    collection: Some("OS-EP-FILTER/endpoint_groups"),
    member: "endpoint_group",
    id_segments: &["endpoint_groups"],
    probe: Probe::LookAlike {
        query: &[],
        fields: &["name", "filters"],
    },
    state: Coverage::NotRead {
        what: "endpoint groups",
        why: SITE_OWN,
        reported: false,
    },
    ..BASE
};

pub static PROJECT_ENDPOINT: Kind = Kind {
    name: "project_endpoint",
    class: RouteClass::Catalog,
    routes: &[route!(
        No,
        PUT_DELETE,
        ["OS-EP-FILTER", "projects", "*", "endpoints", "*"]
    )],
    association: true,
    state: Coverage::NotRead {
        what: "project endpoint associations",
        why: SITE_OWN,
        reported: false,
    },
    ..BASE
};

pub static ENDPOINT_GROUP_PROJECT: Kind = Kind {
    name: "endpoint_group_project",
    class: RouteClass::Catalog,
    routes: &[route!(
        No,
        PUT_DELETE,
        ["OS-EP-FILTER", "endpoint_groups", "*", "projects", "*"]
    )],
    association: true,
    state: Coverage::NotRead {
        what: "endpoint group project associations",
        why: SITE_OWN,
        reported: false,
    },
    ..BASE
};

/// Services, to name what limits are for; never compared.
fn read_services<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        for s in list_all(ks, "/v3/services", "services", &[]).await? {
            let key = format!("{}/{}", str_of(&s, "type"), str_of(&s, "name"));
            sheet.names.add(SERVICE.name, str_of(&s, "id"), &key);
            let mut e = entity(
                SERVICE.name,
                sheet.names.k().t(&key),
                &s,
                &[],
                &sheet.names,
                &[],
            );
            e.fields.clear();
            sheet.out.push(e);
        }
        Ok(())
    }
    .boxed()
}
