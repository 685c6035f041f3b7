//! The policy route class: policy blobs, and their associations with
//! endpoints, services and regions (`OS-ENDPOINT-POLICY`).

use futures_util::FutureExt;

use crate::keystone::client::KeystoneClient;
use crate::keystone::kind::{Coverage, Kind, Probe, ReadFn, Reading, Writes, BASE};
use crate::keystone::model::{route, RouteClass, MEMBER, POST, PUT_DELETE};
use crate::keystone::reader::{digest, entity, list_all, str_of, Digester, Sheet};

pub static POLICY: Kind = Kind {
    name: "policy",
    class: RouteClass::Policy,
    routes: &[
        route!(InBody, POST, ["policies"]),
        route!(No, MEMBER, ["policies", "*"]),
    ],
    collection: Some("policies"),
    member: "policy",
    id_segments: &["policies"],
    ref_fields: &["policy_id"],
    probe: Probe::LookAlike {
        query: &["type"],
        fields: &["blob", "type"],
    },
    state: Coverage::Read {
        read: Some(read_policies as ReadFn),
        writes: Writes::CONTENT,
        caveat: None,
    },
    ..BASE
};

pub static ENDPOINT_POLICY: Kind = Kind {
    name: "endpoint_policy",
    class: RouteClass::Policy,
    routes: &[
        route!(
            No,
            PUT_DELETE,
            ["policies", "*", "OS-ENDPOINT-POLICY", "endpoints", "*"]
        ),
        route!(
            No,
            PUT_DELETE,
            ["policies", "*", "OS-ENDPOINT-POLICY", "services", "*"]
        ),
        route!(
            No,
            PUT_DELETE,
            [
                "policies",
                "*",
                "OS-ENDPOINT-POLICY",
                "services",
                "*",
                "regions",
                "*"
            ]
        ),
    ],
    association: true,
    state: Coverage::NotRead {
        what: "endpoint policy associations (OS-ENDPOINT-POLICY)",
        why: "they name endpoints, services and regions, which are each site's own catalog: the \
              identity service lists no association to compare; a resync neither copies nor \
              checks them",
        reported: true,
    },
    ..BASE
};

/// Policies, named by their type and a digest of their content.
fn read_policies<'a>(ks: &'a KeystoneClient, _: &'a Digester, sheet: &'a mut Sheet) -> Reading<'a> {
    async move {
        for p in list_all(ks, "/v3/policies", "policies", &[]).await? {
            let key = format!(
                "{}:{}",
                str_of(&p, "type"),
                digest(str_of(&p, "blob").as_bytes())
            );
            let e = entity(
                POLICY.name,
                sheet.names.k().t(&key),
                &p,
                &[],
                &sheet.names,
                &["blob"],
            );
            sheet.out.push(e);
        }
        Ok(())
    }
    .boxed()
}
