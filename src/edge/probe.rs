//! Finds out whether a create was already applied here by an earlier attempt
//! whose answer was lost (a crash between the call and the commit, a broken
//! connection), so that it is not sent twice. Each kind is looked up by what
//! identifies it at a site: the ID Keystone keeps (domains, regions, objects
//! created by `PUT`), the natural key (name within a domain), the unique
//! `(service, region, resource)` of registered limits and `(project or domain,
//! service, region, resource)` of limits, or the content (credential and policy
//! blobs, endpoint URLs).

use reqwest::Method;
use serde_json::Value;

use super::apply::Transient;
use crate::keystone::client::{encode, KeystoneClient};
use crate::keystone::ids::natural_key;
use crate::keystone::Creates;

/// The edge IDs of what the create made, in the order of its created IDs, when
/// it is found; `None` when it is not there (or the kind cannot be told apart).
pub async fn find_created(
    keystone: &KeystoneClient,
    kind: &str,
    creates: Creates,
    path: &str,
    body: Option<&Value>,
) -> Result<Option<Vec<String>>, Transient> {
    if creates == Creates::FromUrl {
        let reply = keystone.send(Method::GET, path, None).await?;
        check(&reply)?;
        let id = path.rsplit('/').next().unwrap_or_default().to_string();
        return Ok(reply.is_success().then(|| vec![id]));
    }
    let Some(body) = body else { return Ok(None) };
    let entity = body.get(kind).unwrap_or(&Value::Null);
    let one = |id: Option<String>| Ok(id.map(|i| vec![i]));
    match kind {
        "domain" => {
            if let Some(id) = entity.get("explicit_domain_id").and_then(Value::as_str) {
                let found = keystone.get_entity("domain", id).await?;
                return one(found.map(|_| id.to_string()));
            }
            by_name(keystone, kind, entity).await
        }
        "project" | "user" | "group" | "role" => by_name(keystone, kind, entity).await,
        "region" => match entity.get("id").and_then(Value::as_str) {
            Some(id) => {
                let reply = keystone
                    .send(Method::GET, &format!("/v3/regions/{}", encode(id)), None)
                    .await?;
                check(&reply)?;
                one(reply.is_success().then(|| id.to_string()))
            }
            None => Ok(None),
        },
        "credential" => {
            let q = query(entity, &["user_id", "type"]);
            one(find(keystone, "credentials", &q, entity, &["blob", "project_id"]).await?)
        }
        "policy" => {
            let q = query(entity, &["type"]);
            one(find(keystone, "policies", &q, entity, &["blob", "type"]).await?)
        }
        "service" => {
            let q = query(entity, &["type"]);
            one(find(keystone, "services", &q, entity, &["name", "type"]).await?)
        }
        "endpoint" => {
            let q = query(entity, &["service_id", "interface"]);
            one(find(keystone, "endpoints", &q, entity, &["url", "region_id"]).await?)
        }
        "endpoint_group" => one(find(
            keystone,
            "OS-EP-FILTER/endpoint_groups",
            "",
            entity,
            &["name", "filters"],
        )
        .await?),
        "ec2_credential" => {
            // The access key is made per site: an existing one for the same
            // project is the one the lost attempt made.
            let user_path = path.trim_end_matches('/');
            let reply = keystone.send(Method::GET, user_path, None).await?;
            check(&reply)?;
            let json = reply.json().unwrap_or(Value::Null);
            let tenant = body.get("tenant_id");
            Ok(json["credentials"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c.get("tenant_id") == tenant)
                .and_then(|c| c["access"].as_str())
                .map(|a| vec![a.to_string()]))
        }
        "limit" | "registered_limit" => {
            let coll = if kind == "limit" {
                "limits"
            } else {
                "registered_limits"
            };
            let keys: &[&str] = if kind == "limit" {
                &[
                    "project_id",
                    "domain_id",
                    "service_id",
                    "region_id",
                    "resource_name",
                ]
            } else {
                &["service_id", "region_id", "resource_name"]
            };
            let Some(items) = body.get(coll).and_then(Value::as_array) else {
                return Ok(None);
            };
            let mut ids = Vec::with_capacity(items.len());
            for item in items {
                let q = query(item, keys);
                match find(keystone, coll, &q, item, keys).await? {
                    Some(id) => ids.push(id),
                    None => return Ok(None),
                }
            }
            Ok((!ids.is_empty()).then_some(ids))
        }
        _ => Ok(None),
    }
}

async fn by_name(
    keystone: &KeystoneClient,
    kind: &str,
    entity: &Value,
) -> Result<Option<Vec<String>>, Transient> {
    let Some((name, domain)) = natural_key(kind, entity) else {
        return Ok(None);
    };
    Ok(keystone
        .find_by_name(kind, &name, domain.as_deref())
        .await?
        .map(|id| vec![id]))
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

/// The ID of the first listed entity whose `fields` equal the wanted entity's
/// (a field the wanted entity lacks must be absent or null).
async fn find(
    keystone: &KeystoneClient,
    collection: &str,
    query: &str,
    wanted: &Value,
    fields: &[&str],
) -> Result<Option<String>, Transient> {
    let reply = keystone
        .send(Method::GET, &format!("/v3/{collection}{query}"), None)
        .await?;
    check(&reply)?;
    if !reply.is_success() {
        return Ok(None);
    }
    let json = reply.json().unwrap_or(Value::Null);
    let key = collection.rsplit('/').next().unwrap_or(collection);
    let null = Value::Null;
    Ok(json[key]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            fields
                .iter()
                .all(|f| e.get(*f).unwrap_or(&null) == wanted.get(*f).unwrap_or(&null))
        })
        .and_then(|e| e["id"].as_str())
        .map(str::to_string))
}

fn check(reply: &crate::keystone::client::Reply) -> Result<(), Transient> {
    if reply.status >= 500 || reply.status == 429 {
        return Err(Transient(format!(
            "edge identity service answered HTTP {} to a look-up",
            reply.status
        )));
    }
    Ok(())
}
