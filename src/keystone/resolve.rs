//! What became of a write whose outcome central does not know (the gateway
//! stopped, or the answer was lost, after it was forwarded): central's Keystone
//! is asked. A create: is it there, with which ID; a delete: is it gone; a
//! grant, membership or tag: does it exist; an update: what does the entity
//! hold now. The answer is what edges replay in the op's place.

use reqwest::Method;
use serde_json::Value;

use super::client::{ClientError, KeystoneClient, Reply};
use super::kind::{Answer, Held};
use super::kinds;
use super::probe::{find_created, Found};
use super::{Creates, RouteMatch};

/// What central's Keystone says of a write whose outcome was unknown, and
/// whether waiting could change it (`Checked::settled`).
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub resolution: Resolution,
    /// Final whatever happens next: what the write does is there (a create
    /// found, a delete gone, an update's values held), or nothing can tell. A
    /// write not seen yet may still land while it is held upstream: such an
    /// answer is final only once the write can no longer land.
    pub settled: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// It happened: edges apply it, with these created IDs and this body.
    Applied {
        created_ids: Vec<String>,
        body: Option<Value>,
        detail: String,
    },
    /// It did not happen: edges skip it.
    NotApplied { detail: String },
    /// Central's Keystone cannot tell: out of sync at every edge until an
    /// operator acts.
    Unresolvable { detail: String },
}

fn applied(created_ids: Vec<String>, body: Option<Value>, detail: &str) -> Resolution {
    Resolution::Applied {
        created_ids,
        body,
        detail: format!("outcome resolved at central: {detail}"),
    }
}

fn not_applied(detail: &str) -> Resolution {
    Resolution::NotApplied {
        detail: format!("outcome resolved at central: {detail}"),
    }
}

fn unresolvable(detail: &str) -> Resolution {
    Resolution::Unresolvable {
        detail: format!("outcome unknown: {detail}"),
    }
}

/// Whether a body sets a password (which no read of Keystone can check).
fn sets_password(body: Option<&Value>) -> bool {
    fn walk(v: &Value) -> bool {
        match v {
            Value::Object(m) => m
                .iter()
                .any(|(k, v)| k == "password" || k == "original_password" || walk(v)),
            Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    body.is_some_and(walk)
}

/// The entity a member URL's answer holds (`{"<kind>": {...}, "links": ...}`).
fn member(reply: &Reply) -> Option<Value> {
    let json = reply.json()?;
    json.as_object()?
        .iter()
        .find(|(k, v)| *k != "links" && v.is_object())
        .map(|(_, v)| v.clone())
}

fn check(reply: &Reply) -> Result<(), ClientError> {
    if reply.status >= 500 || reply.status == 429 {
        return Err(ClientError::Unreachable(format!(
            "the identity service answered HTTP {} while an unknown outcome was checked",
            reply.status
        )));
    }
    Ok(())
}

/// Asks central's Keystone what became of a write. `route` is its route, `path`
/// and `body` as forwarded; `made_by_others` says whether an ID is one another
/// op of the log created or changed (a look-alike found is then not this op's).
pub async fn resolve(
    ks: &KeystoneClient,
    route: &RouteMatch,
    method: &str,
    path: &str,
    body: Option<&Value>,
    made_by_others: &(dyn Fn(String) -> futures_util::future::BoxFuture<'static, bool> + Sync),
) -> Result<Checked, ClientError> {
    let resolution = look(ks, route, method, path, body, made_by_others).await?;
    let settled = match &resolution {
        Resolution::Applied { body: replay, .. } if method == "PATCH" => {
            // Settled when central holds what the update sets.
            replay.as_ref() == body
        }
        Resolution::Applied { .. } | Resolution::Unresolvable { .. } => true,
        Resolution::NotApplied { .. } => false,
    };
    Ok(Checked {
        resolution,
        settled,
    })
}

/// What central's answer to a create would have said of what it made, read
/// again (for `inject_derived`), as the kind's `answer` says: a user, group
/// or project as Keystone shows it, an EC2 key with its access and secret.
async fn answer_of(
    ks: &KeystoneClient,
    route: &RouteMatch,
    target: &str,
    ids: &[String],
) -> Result<Option<Value>, ClientError> {
    let [id] = ids else { return Ok(None) };
    let Some(k) = kinds::named(route.kind) else {
        return Ok(None);
    };
    match k.answer {
        Answer::Entity => Ok(k
            .get(ks, id)
            .await?
            .map(|e| serde_json::json!({ k.member: e }))),
        Answer::AtPath => {
            let path = format!(
                "{}/{}",
                target.trim_end_matches('/'),
                super::client::encode(id)
            );
            let reply = ks.send(Method::GET, &path, None).await?;
            check(&reply)?;
            Ok(reply.is_success().then(|| reply.json()).flatten())
        }
        Answer::None => Ok(None),
    }
}

async fn look(
    ks: &KeystoneClient,
    route: &RouteMatch,
    method: &str,
    path: &str,
    body: Option<&Value>,
    made_by_others: &(dyn Fn(String) -> futures_util::future::BoxFuture<'static, bool> + Sync),
) -> Result<Resolution, ClientError> {
    let target = path.split('?').next().unwrap_or(path);
    match (method, route.creates) {
        ("POST", Creates::InBody) => {
            let found = find_created(ks, route.kind, route.creates, target, body).await?;
            Ok(match found {
                Found::Unique(ids) => {
                    let answer = answer_of(ks, route, target, &ids).await?;
                    let mut body = body.cloned();
                    if let Some(b) = body.as_mut() {
                        super::inject_generated(route, b, &ids);
                        super::inject_derived(route, b, answer.as_ref());
                    }
                    applied(ids, body, "what it creates is there")
                }
                Found::Candidates(ids) => {
                    let mut ours = Vec::new();
                    for id in ids {
                        if !made_by_others(id.clone()).await {
                            ours.push(id);
                        }
                    }
                    match ours.len() {
                        0 => not_applied("nothing it could have created is there"),
                        1 => {
                            let answer = answer_of(ks, route, target, &ours).await?;
                            let mut body = body.cloned();
                            if let Some(b) = body.as_mut() {
                                super::inject_derived(route, b, answer.as_ref());
                            }
                            applied(ours, body, "one entity it could have created is there")
                        }
                        n => unresolvable(&format!(
                            "{n} {}s it could have created are there and none is known to be it; \
                             check them, then repair the edges (a drift audit shows them)",
                            route.kind
                        )),
                    }
                }
                Found::Nothing => not_applied("what it creates is not there"),
            })
        }
        ("POST", _) if sets_password(body) => Ok(unresolvable(
            "a password change cannot be checked without a login: set the password again \
             through the gateway",
        )),
        ("PUT", Creates::FromUrl) => {
            let reply = ks.send(Method::GET, target, None).await?;
            check(&reply)?;
            let id = target.rsplit('/').next().unwrap_or_default().to_string();
            Ok(if reply.is_success() {
                // With what Keystone made for it (an identity provider's
                // domain), as its answer would have said.
                let mut body = body.cloned();
                if let Some(b) = body.as_mut() {
                    super::inject_derived(route, b, reply.json().as_ref());
                }
                applied(vec![id], body, "what it creates is there")
            } else {
                not_applied("what it creates is not there")
            })
        }
        ("PUT", _) => {
            let held = kinds::named(route.kind).map_or(Held::Member, |k| k.held);
            if held == Held::Config && sets_password(body) {
                return Ok(unresolvable(
                    "a domain configuration with a password cannot be checked (Keystone never \
                     returns it): set it again through the gateway",
                ));
            }
            let reply = ks.send(Method::GET, target, None).await?;
            check(&reply)?;
            if !reply.is_success() {
                return Ok(not_applied("what it sets is not there"));
            }
            // A write that replaces a whole set is there only with its content.
            let same = match (body, held) {
                (Some(b), Held::Set(set)) => {
                    let mut want: Vec<&Value> = b[set].as_array().into_iter().flatten().collect();
                    let json = reply.json().unwrap_or(Value::Null);
                    let mut have: Vec<&Value> =
                        json[set].as_array().into_iter().flatten().collect();
                    want.sort_by_key(|v| v.to_string());
                    have.sort_by_key(|v| v.to_string());
                    want == have
                }
                (Some(b), Held::Config) => {
                    let json = reply.json().unwrap_or(Value::Null);
                    contains(&json["config"], &b["config"])
                }
                _ => true,
            };
            Ok(if same {
                applied(Vec::new(), body.cloned(), "what it sets is there")
            } else {
                not_applied("what it sets is not there")
            })
        }
        ("DELETE", _) => {
            let reply = ks.send(Method::GET, target, None).await?;
            check(&reply)?;
            Ok(if reply.status == 404 {
                applied(Vec::new(), None, "what it deletes is gone")
            } else if reply.is_success() {
                not_applied("what it deletes is still there")
            } else {
                unresolvable(&format!(
                    "reading what it deletes was answered HTTP {}",
                    reply.status
                ))
            })
        }
        ("PATCH", _) => {
            if sets_password(body) {
                return Ok(unresolvable(
                    "a password change cannot be checked without a login: set the password \
                     again through the gateway",
                ));
            }
            let reply = ks.send(Method::GET, target, None).await?;
            check(&reply)?;
            if reply.status == 404 {
                return Ok(not_applied("what it updates is gone"));
            }
            let config = kinds::named(route.kind).is_some_and(|k| k.held == Held::Config);
            let current = if config {
                reply.json().map(|v| v["config"].clone())
            } else {
                member(&reply)
            };
            let (Some(current), Some(body)) = (current, body) else {
                return Ok(unresolvable("what it updates could not be read"));
            };
            // Replayed with what central holds now for the fields it sets
            // (edges end as central is, whether it happened or a later write
            // changed them since); a field central does not hold was not set.
            let mut now = body.clone();
            let fields = if config {
                now.get_mut("config")
            } else {
                now.as_object_mut()
                    .and_then(|m| m.values_mut().find(|v| v.is_object()))
            };
            let Some(Value::Object(fields)) = fields else {
                return Ok(unresolvable("what it updates could not be read"));
            };
            fields.retain(|k, _| current.get(k).is_some());
            if fields.is_empty() {
                return Ok(not_applied("central holds none of the values it sets"));
            }
            for (k, v) in fields.iter_mut() {
                if let Some(held) = current.get(k) {
                    *v = held.clone();
                }
            }
            Ok(applied(
                Vec::new(),
                Some(now),
                "replayed with the values central holds now",
            ))
        }
        _ => Ok(unresolvable("a write of this kind cannot be checked")),
    }
}

/// Whether every value of `want` (nested objects) is in `have`.
fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|x| contains(x, v))),
        _ => have == want,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn passwords_are_found_at_any_depth() {
        assert!(sets_password(Some(&json!({"user": {"password": "x"}}))));
        assert!(sets_password(Some(
            &json!({"config": {"ldap": {"password": "x"}}})
        )));
        assert!(!sets_password(Some(&json!({"user": {"name": "x"}}))));
        assert!(!sets_password(None));
    }

    #[test]
    fn a_configuration_is_there_when_every_value_given_is() {
        let have =
            json!({"ldap": {"url": "ldap://a", "user": "u"}, "identity": {"driver": "ldap"}});
        assert!(contains(&have, &json!({"ldap": {"url": "ldap://a"}})));
        assert!(!contains(&have, &json!({"ldap": {"url": "ldap://b"}})));
        assert!(!contains(&have, &json!({"resource": {"driver": "sql"}})));
    }
}
