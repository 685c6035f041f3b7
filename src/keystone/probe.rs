//! Finds out whether a create was applied at a site although its answer was
//! lost: at an edge, by an earlier attempt (a crash between the call and the
//! commit, a broken connection), so that it is not sent twice; at central, a
//! write whose outcome is unknown (see `resolve`). Each kind is looked up by what
//! identifies it at a site: the ID Keystone keeps (domains, regions, objects
//! created by `PUT`), the natural key (name within a domain), the unique
//! `(service, region, resource)` of registered limits and `(project or domain,
//! service, region, resource)` of limits. Kinds Keystone lets exist twice
//! (credential and policy blobs, services, endpoint URLs, EC2 keys) are found by
//! content, and only as candidates: the applier claims one only if the site did
//! not hold it before the create was sent and no other central ID maps to it.

use reqwest::Method;
use serde_json::Value;

use super::client::{encode, ClientError, KeystoneClient, Reply};
use super::kind::{Kind, Probe};
use super::kinds::{self, credentials::ec2_credential_id, CREDENTIAL, DOMAIN, PROJECT};
use super::Creates;

/// What a look for a create found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// Nothing that could be it.
    Nothing,
    /// The edge IDs of what the create made, one per created item, for kinds a
    /// site keeps unique (by ID, by natural key, by scope): whatever matches
    /// is the entity this op makes, made by it or before it.
    Unique(Vec<String>),
    /// Entities that look like the one wanted, for kinds Keystone lets exist
    /// twice (credentials, policies, services, endpoints, endpoint groups, EC2
    /// keys): only one this op could have made may be claimed.
    Candidates(Vec<String>),
}

/// Looks for what a create makes, as it is sent here (path and body rewritten).
pub async fn find_created(
    keystone: &KeystoneClient,
    kind: &str,
    creates: Creates,
    path: &str,
    body: Option<&Value>,
) -> Result<Found, ClientError> {
    if creates == Creates::FromUrl {
        let reply = keystone.send(Method::GET, path, None).await?;
        check(&reply)?;
        let id = path.rsplit('/').next().unwrap_or_default().to_string();
        return Ok(unique(reply.is_success().then(|| vec![id])));
    }
    let (Some(body), Some(k)) = (body, kinds::named(kind)) else {
        return Ok(Found::Nothing);
    };
    let entity = body.get(k.member).unwrap_or(&Value::Null);
    let one = |id: Option<String>| Ok(unique(id.map(|i| vec![i])));
    let kept = k
        .keeps_id
        .and_then(|f| entity.get(f))
        .and_then(Value::as_str);
    match k.probe {
        Probe::None => Ok(Found::Nothing),
        Probe::KeptId | Probe::KeptIdOrKey if kept.is_some() => {
            let id = kept.unwrap_or_default();
            let found = k.get(keystone, id).await?;
            one(found.map(|_| id.to_string()))
        }
        Probe::KeptId => Ok(Found::Nothing),
        // An entity acting as a domain is a domain (the projects API lists
        // none): looked for as one.
        Probe::Key
            if std::ptr::eq(k, &PROJECT) && entity.get("is_domain") == Some(&Value::Bool(true)) =>
        {
            by_key(keystone, &DOMAIN, entity).await
        }
        Probe::Key | Probe::KeptIdOrKey => by_key(keystone, k, entity).await,
        Probe::Unique(keys) => {
            let Some(items) = k
                .plural()
                .and_then(|p| body.get(p))
                .and_then(Value::as_array)
            else {
                return Ok(Found::Nothing);
            };
            let collection = k.collection.unwrap_or_default();
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let q = query(item, keys);
                match find(keystone, collection, &q, item, keys).await?.first() {
                    Some(id) => ids.push(id.clone()),
                    None => return Ok(Found::Nothing),
                }
            }
            Ok(unique((!ids.is_empty()).then_some(ids)))
        }
        // An EC2 key sent with central's access key (through /v3/credentials)
        // has the ID Keystone derives from it: looked for by that ID.
        Probe::Ec2Key if ec2_credential_id(body).is_some() => {
            let id = ec2_credential_id(body).unwrap_or_default();
            let found = CREDENTIAL.get(keystone, &id).await?;
            one(found.map(|_| id))
        }
        Probe::LookAlike { .. } | Probe::Ec2Key => Ok(candidates(
            look_alikes(keystone, kind, path, Some(body)).await?,
        )),
    }
}

/// The entities of a kind Keystone lets exist twice that look like the one a
/// create makes (empty for other kinds): taken before such a create is sent,
/// so that a later look can tell the one it made from those already there.
pub async fn look_alikes(
    keystone: &KeystoneClient,
    kind: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Vec<String>, ClientError> {
    let (Some(body), Some(k)) = (body, kinds::named(kind)) else {
        return Ok(Vec::new());
    };
    let entity = body.get(k.member).unwrap_or(&Value::Null);
    match k.probe {
        Probe::LookAlike { query: q, fields } => {
            let q = query(entity, q);
            find(
                keystone,
                k.collection.unwrap_or_default(),
                &q,
                entity,
                fields,
            )
            .await
        }
        // Sent with central's access key: its ID is its own, nothing
        // looks alike.
        Probe::Ec2Key if ec2_credential_id(body).is_some() => Ok(Vec::new()),
        Probe::Ec2Key => {
            // The access key is made per site: any key of the user for the
            // same project looks alike.
            let user_path = path.trim_end_matches('/');
            let reply = keystone.send(Method::GET, user_path, None).await?;
            check(&reply)?;
            if !reply.is_success() {
                return Ok(Vec::new());
            }
            let json = reply.json().unwrap_or(Value::Null);
            let tenant = body.get("tenant_id");
            Ok(json["credentials"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c.get("tenant_id") == tenant)
                .filter_map(|c| c["access"].as_str().map(str::to_string))
                .collect())
        }
        _ => Ok(Vec::new()),
    }
}

/// Whether Keystone lets two entities of a kind look alike (no unique key).
pub fn lets_look_alikes(kind: &str) -> bool {
    kinds::named(kind).is_some_and(Kind::lets_look_alikes)
}

fn unique(ids: Option<Vec<String>>) -> Found {
    ids.map_or(Found::Nothing, Found::Unique)
}

fn candidates(ids: Vec<String>) -> Found {
    if ids.is_empty() {
        Found::Nothing
    } else {
        Found::Candidates(ids)
    }
}

async fn by_key(
    keystone: &KeystoneClient,
    kind: &Kind,
    entity: &Value,
) -> Result<Found, ClientError> {
    let Some((name, domain)) = kind.natural_key(entity) else {
        return Ok(Found::Nothing);
    };
    Ok(unique(
        kind.find_by_key(keystone, &name, domain.as_deref())
            .await?
            .map(|id| vec![id]),
    ))
}

/// `?k=v&...` for the fields the entity has.
fn query(entity: &Value, keys: &[&str]) -> String {
    let parts: Vec<String> = keys
        .iter()
        .filter_map(|k| {
            entity
                .get(*k)
                .and_then(Value::as_str)
                .map(|v| format!("{k}={}", encode(v)))
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// The IDs of the listed entities whose `fields` equal the wanted entity's
/// (a field the wanted entity lacks must be absent or null), in list order.
async fn find(
    keystone: &KeystoneClient,
    collection: &str,
    query: &str,
    wanted: &Value,
    fields: &[&str],
) -> Result<Vec<String>, ClientError> {
    let reply = keystone
        .send(Method::GET, &format!("/v3/{collection}{query}"), None)
        .await?;
    check(&reply)?;
    if !reply.is_success() {
        return Ok(Vec::new());
    }
    let json = reply.json().unwrap_or(Value::Null);
    let key = collection.rsplit('/').next().unwrap_or(collection);
    let null = Value::Null;
    Ok(json[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            fields
                .iter()
                .all(|f| e.get(*f).unwrap_or(&null) == wanted.get(*f).unwrap_or(&null))
        })
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect())
}

fn check(reply: &Reply) -> Result<(), ClientError> {
    if reply.status >= 500 || reply.status == 429 {
        return Err(ClientError::Unreachable(format!(
            "the identity service answered HTTP {} to a look-up",
            reply.status
        )));
    }
    Ok(())
}
