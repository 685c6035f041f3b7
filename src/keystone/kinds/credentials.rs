//! The credentials route class: credentials, and EC2 keys (credentials of
//! type `ec2` made through their own API).

use futures_util::FutureExt;
use serde_json::{json, Value};

use super::identity::USER;
use super::resource::PROJECT;
use crate::keystone::client::KeystoneClient;
use crate::keystone::kind::{Answer, Coverage, Kind, Probe, ReadFn, Reading, Writes, BASE};
use crate::keystone::model::{
    route, Creates, Entity, Part, Replay, RouteClass, Transform, DELETE, MEMBER, POST,
};
use crate::keystone::reader::{entity, list_all, str_of, Digester, Sheet};

pub static CREDENTIAL: Kind = Kind {
    name: "credential",
    class: RouteClass::Credentials,
    routes: &[
        route!(InBody, POST, ["credentials"]),
        route!(No, MEMBER, ["credentials", "*"]),
    ],
    collection: Some("credentials"),
    member: "credential",
    id_segments: &["credentials"],
    probe: Probe::LookAlike {
        query: &["user_id", "type"],
        fields: &["blob", "project_id"],
    },
    state: Coverage::Read {
        read: Some(read_credentials as ReadFn),
        writes: Writes::CONTENT,
        caveat: None,
    },
    ..BASE
};

pub static EC2_CREDENTIAL: Kind = Kind {
    name: "ec2_credential",
    class: RouteClass::Credentials,
    routes: &[
        route!(InBody, POST, ["users", "*", "credentials", "OS-EC2"]),
        route!(No, DELETE, ["users", "*", "credentials", "OS-EC2", "*"]),
    ],
    member: "credential",
    // Named by its access key.
    id_field: "access",
    probe: Probe::Ec2Key,
    derive: Some(ec2_key_made),
    answer: Answer::AtPath,
    transforms: &[Transform {
        method: "POST",
        why: "Keystone makes an EC2 key's access and secret: replayed through /v3/credentials \
              with central's, the key, and its credential ID (the access key's SHA-256), are the \
              same at every site, so revoking it anywhere revokes it everywhere",
        apply: ec2_key_as_credential,
    }],
    state: Coverage::PartOf(
        "credential",
        "an EC2 key is a credential of type ec2, read and compared as one",
    ),
    ..BASE
};

/// An EC2 key's access and secret are made by Keystone: the replay carries
/// central's (the edge creates the same key, see `ec2_key_as_credential`).
fn ec2_key_made(_: &Kind, creates: Creates, request: &mut Value, answer: Option<&Value>) -> bool {
    if creates != Creates::InBody {
        return false;
    }
    let made = answer.and_then(|r| r.get("credential"));
    let (Some(access), Some(secret)) = (
        made.and_then(|c| c.get("access")).and_then(Value::as_str),
        made.and_then(|c| c.get("secret")).and_then(Value::as_str),
    ) else {
        return false;
    };
    let Some(body) = request.as_object_mut() else {
        return false;
    };
    body.insert("access".into(), Value::String(access.to_string()));
    body.insert("secret".into(), Value::String(secret.to_string()));
    true
}

/// An EC2 key created at central (`POST /v3/users/{id}/credentials/OS-EC2`,
/// its replay body carrying central's access and secret) as the same key
/// created through `/v3/credentials`. An op without them (logged by an older
/// central) is replayed as sent.
fn ec2_key_as_credential(path: &str, body: Option<&Value>, _created: &[String]) -> Option<Replay> {
    let body = body?;
    let user = path
        .strip_prefix("/v3/users/")?
        .strip_suffix("/credentials/OS-EC2")?;
    let (access, secret) = (body.get("access")?.as_str()?, body.get("secret")?.as_str()?);
    // Written as Keystone writes it (Python's `json.dumps` of access, secret,
    // trust_id): the same blob, byte for byte, at every site (a drift audit
    // names a credential by a digest of its blob).
    let blob = format!(
        r#"{{"access": {}, "secret": {}, "trust_id": null}}"#,
        Value::String(access.to_string()),
        Value::String(secret.to_string())
    );
    let mut credential = json!({
        "type": "ec2",
        "user_id": user,
        "blob": blob,
    });
    if let Some(project) = body.get("tenant_id").filter(|p| p.is_string()) {
        credential["project_id"] = project.clone();
    }
    Some(Replay::as_sent(
        EC2_CREDENTIAL.name,
        "POST",
        "/v3/credentials",
        Some(json!({ "credential": credential })),
    ))
}

/// The credential ID Keystone gives an EC2 key created through
/// `/v3/credentials` with this blob: the SHA-256 of its access key, in hex.
pub fn ec2_credential_id(body: &Value) -> Option<String> {
    let credential = body.get("credential")?;
    if credential.get("type")?.as_str()? != "ec2" {
        return None;
    }
    let blob: Value = serde_json::from_str(credential.get("blob")?.as_str()?).ok()?;
    Some(ec2_access_credential_id(blob.get("access")?.as_str()?))
}

/// The credential ID Keystone gives the EC2 key of `access`: its SHA-256,
/// in hex.
pub fn ec2_access_credential_id(access: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, access.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Credentials, named by owner, type and a digest of the blob (a secret).
fn read_credentials<'a>(
    ks: &'a KeystoneClient,
    digester: &'a Digester,
    sheet: &'a mut Sheet,
) -> Reading<'a> {
    async move {
        for c in list_all(ks, "/v3/credentials", "credentials", &[]).await? {
            let key = sheet
                .names
                .k()
                .r(USER.name, str_of(&c, "user_id"))
                .t(&format!(
                    " {}:{}",
                    str_of(&c, "type"),
                    digester.digest(str_of(&c, "blob").as_bytes())
                ));
            let e = entity(
                CREDENTIAL.name,
                key,
                &c,
                &[("user_id", USER.name), ("project_id", PROJECT.name)],
                &sheet.names,
                &["blob"],
            );
            sheet.out.push(e);
        }
        Ok(())
    }
    .boxed()
}

/// Names the credentials of central's `entities` (read with another digester)
/// with `digester`, from their blobs: to compare with an edge that names them
/// so. What has no blob to read is left as it is.
pub fn rename_credentials(entities: &mut [Entity], digester: &Digester) {
    for e in entities.iter_mut().filter(|e| e.kind == CREDENTIAL.name) {
        let Some(raw) = e.raw.as_ref() else { continue };
        let (Some(blob), Some(kind)) = (raw["blob"].as_str(), raw["type"].as_str()) else {
            continue;
        };
        let text = format!(" {kind}:{}", digester.digest(blob.as_bytes()));
        let Some(at) = e.key.rfind(&format!(" {kind}:")) else {
            continue;
        };
        e.key.truncate(at);
        e.key.push_str(&text);
        if let Some(Part::Text(last)) = e.parts.last_mut() {
            *last = text;
        }
    }
}
