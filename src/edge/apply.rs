//! Applying one op at the edge Keystone: resolve every central ID it names (ID
//! map, else the natural key central sent), rewrite path and body, transform
//! calls an admin cannot replay as sent, send, and classify the answer.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::Value;

use crate::keystone::client::{ClientError, KeystoneClient, Reply};
use crate::keystone::ids::{self, is_mappable_id, natural_key};
use crate::keystone::{self, Classification, Creates};
use crate::protocol::messages::{EntityRef, OpContent, Outcome};
use crate::store::edge::{Commit, EdgeStore};

/// A result to record and acknowledge.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Outcome,
    pub status: Option<u16>,
    pub detail: Option<String>,
    pub edge_ids: Vec<String>,
    pub changes: Commit,
}

/// Why an op must be tried again later (the cursor does not move).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Transient(pub String);

impl From<ClientError> for Transient {
    fn from(e: ClientError) -> Self {
        Transient(e.to_string())
    }
}

impl From<crate::store::StoreError> for Transient {
    fn from(e: crate::store::StoreError) -> Self {
        Transient(format!("edge database: {e}"))
    }
}

fn failed(status: Option<u16>, detail: String) -> Applied {
    Applied {
        outcome: Outcome::Failed,
        status,
        detail: Some(detail),
        edge_ids: Vec::new(),
        changes: Commit::default(),
    }
}

pub struct Applier<'a> {
    pub keystone: &'a KeystoneClient,
    pub store: &'a EdgeStore,
    /// Ops applied before this one and not yet committed: their ID map
    /// changes come first.
    pub pending: &'a std::sync::Mutex<super::Pending>,
}

impl Applier<'_> {
    /// The edge ID a central ID maps to, counting the uncommitted batch.
    async fn mapping(&self, central_id: &str) -> Result<Option<String>, Transient> {
        let batched = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .batch
            .mapping(central_id);
        match batched {
            Some(m) => Ok(m),
            None => Ok(self.store.mapping(central_id).await?),
        }
    }

    /// Applies one op. `maybe_applied` says an earlier attempt may have reached
    /// the site: a create is then looked for before it is sent again.
    pub async fn apply(&self, op: &OpContent, maybe_applied: bool) -> Result<Applied, Transient> {
        if op.state != "committed" {
            return Ok(Applied {
                outcome: Outcome::Skipped,
                status: None,
                detail: Some("the write's outcome at central is unknown; not applied here".into()),
                edge_ids: Vec::new(),
                changes: Commit::default(),
            });
        }
        let Ok(method) = Method::from_bytes(op.method.as_bytes()) else {
            return Ok(failed(None, format!("unsupported method '{}'", op.method)));
        };

        // Resolve every central ID the op names.
        let mut resolved: HashMap<String, String> = HashMap::new();
        let mut adds: Vec<(String, String, String)> = Vec::new();
        let mut ids: Vec<String> = op
            .path
            .split(['/', '?', '&', '='])
            .filter(|s| is_mappable_id(s))
            .map(str::to_string)
            .collect();
        if let Some(body) = &op.body {
            collect_id_strings(body, &mut ids);
        }
        for id in ids {
            if resolved.contains_key(&id) || op.created_ids.contains(&id) {
                continue;
            }
            if let Some(edge_id) = self.mapping(&id).await? {
                resolved.insert(id, edge_id);
            } else if let Some(r) = op.refs.iter().find(|r| r.id == id) {
                if let Some(edge_id) = self.resolve(r, &op.refs, &mut resolved, &mut adds).await? {
                    resolved.insert(id, edge_id);
                }
            }
        }
        let map = |id: &str| resolved.get(id).cloned();
        let path = ids::rewrite_path(&op.path, &map);
        let mut body = op.body.clone();
        if let Some(b) = body.as_mut() {
            ids::rewrite_body(b, &map);
        }
        let (send_method, send_path, send_body) =
            ids::replay_form(&op.kind, op.method.as_str(), &path, body.clone());
        let send_method = Method::from_bytes(send_method.as_bytes()).unwrap_or(method.clone());

        let route =
            match keystone::classify(op.method.as_str(), op.path.split('?').next().unwrap_or("")) {
                Classification::Replicable(r) => Some(r),
                Classification::NotReplicated(_) => None,
            };
        let creates = route.map(|r| r.creates).unwrap_or(Creates::No);
        if maybe_applied && creates != Creates::No {
            let found = super::probe::find_created(
                self.keystone,
                &op.kind,
                creates,
                &send_path,
                send_body.as_ref(),
            )
            .await?;
            if let Some(edge_ids) = found {
                for (central, edge) in op.created_ids.iter().zip(&edge_ids) {
                    adds.push((central.clone(), edge.clone(), op.kind.clone()));
                }
                return Ok(Applied {
                    outcome: Outcome::Applied,
                    status: None,
                    detail: Some("applied by an earlier attempt whose answer was lost".into()),
                    edge_ids,
                    changes: Commit {
                        map_adds: adds,
                        map_removes: Vec::new(),
                        advance: true,
                    },
                });
            }
        }

        let reply = self
            .keystone
            .send(send_method, &send_path, send_body.as_ref())
            .await?;

        if reply.is_success() {
            let edge_ids = match route {
                Some(r) => keystone::created_ids(&r, &send_path, reply.json().as_ref()),
                None => Vec::new(),
            };
            for (central, edge) in op.created_ids.iter().zip(&edge_ids) {
                adds.push((central.clone(), edge.clone(), op.kind.clone()));
            }
            let removes = ids::deleted_id(&op.method, &op.path).into_iter().collect();
            return Ok(Applied {
                outcome: Outcome::Applied,
                status: Some(reply.status),
                detail: None,
                edge_ids,
                changes: Commit {
                    map_adds: adds,
                    map_removes: removes,
                    advance: true,
                },
            });
        }
        if reply.status >= 500 || reply.status == 429 {
            return Err(Transient(format!(
                "edge identity service answered HTTP {}: {}",
                reply.status,
                reply.message()
            )));
        }
        if reply.status == 409 && creates != Creates::No {
            return self.adopt(op, creates, body.as_ref(), adds, &reply).await;
        }
        if reply.status == 404 && op.method == "DELETE" {
            // Already absent here: the end state is what central has.
            let removes = ids::deleted_id(&op.method, &op.path).into_iter().collect();
            return Ok(Applied {
                outcome: Outcome::Applied,
                status: Some(reply.status),
                detail: Some("already absent at this edge".into()),
                edge_ids: Vec::new(),
                changes: Commit {
                    map_adds: adds,
                    map_removes: removes,
                    advance: true,
                },
            });
        }
        let mut detail = reply.message();
        let unresolved: Vec<&EntityRef> = op
            .refs
            .iter()
            .filter(|r| !resolved.contains_key(&r.id))
            .collect();
        if !unresolved.is_empty() {
            let names: Vec<String> = unresolved
                .iter()
                .map(|r| format!("{} '{}'", r.kind, r.name))
                .collect();
            detail.push_str(&format!(
                " (not found at this edge by natural key: {})",
                names.join(", ")
            ));
        }
        Ok(Applied {
            outcome: Outcome::Failed,
            status: Some(reply.status),
            detail: Some(detail),
            edge_ids: Vec::new(),
            changes: Commit {
                map_adds: adds,
                map_removes: Vec::new(),
                advance: true,
            },
        })
    }

    /// A create answered 409: the entity already exists here. Adopt its ID.
    async fn adopt(
        &self,
        op: &OpContent,
        creates: Creates,
        body: Option<&Value>,
        mut adds: Vec<(String, String, String)>,
        reply: &Reply,
    ) -> Result<Applied, Transient> {
        let existing = match creates {
            // Created by PUT to its URL: the same ID exists here.
            Creates::FromUrl => op.created_ids.first().cloned(),
            _ => match body
                .and_then(|b| b.get(&op.kind))
                .and_then(|e| natural_key(&op.kind, e))
            {
                Some((name, domain)) => {
                    self.keystone
                        .find_by_name(&op.kind, &name, domain.as_deref())
                        .await?
                }
                None => None,
            },
        };
        match (existing, op.created_ids.first()) {
            (Some(edge_id), Some(central_id)) => {
                adds.push((central_id.clone(), edge_id.clone(), op.kind.clone()));
                Ok(Applied {
                    outcome: Outcome::Adopted,
                    status: Some(reply.status),
                    detail: Some("already existed at this edge; its ID was adopted".into()),
                    edge_ids: vec![edge_id],
                    changes: Commit {
                        map_adds: adds,
                        map_removes: Vec::new(),
                        advance: true,
                    },
                })
            }
            _ => Ok(failed(
                Some(reply.status),
                format!(
                    "{} (and no existing entity was found to adopt)",
                    reply.message()
                ),
            )),
        }
    }

    /// Finds an entity central named by natural key; maps it.
    async fn resolve(
        &self,
        r: &EntityRef,
        refs: &[EntityRef],
        resolved: &mut HashMap<String, String>,
        adds: &mut Vec<(String, String, String)>,
    ) -> Result<Option<String>, Transient> {
        let domain = match r.domain_id.as_deref() {
            None => None,
            Some(d) if !is_mappable_id(d) => Some(d.to_string()),
            Some(d) => match resolved.get(d) {
                Some(x) => Some(x.clone()),
                None => match self.mapping(d).await? {
                    Some(x) => Some(x),
                    None => {
                        let Some(dref) = refs.iter().find(|x| x.id == d && x.kind == "domain")
                        else {
                            return Ok(None);
                        };
                        let Some(found) = self
                            .keystone
                            .find_by_name("domain", &dref.name, None)
                            .await?
                        else {
                            return Ok(None);
                        };
                        resolved.insert(d.to_string(), found.clone());
                        adds.push((d.to_string(), found.clone(), "domain".into()));
                        Some(found)
                    }
                },
            },
        };
        let found = self
            .keystone
            .find_by_name(&r.kind, &r.name, domain.as_deref())
            .await?;
        if let Some(edge_id) = &found {
            adds.push((r.id.clone(), edge_id.clone(), r.kind.clone()));
        }
        Ok(found)
    }
}

/// Every string value that looks like a Keystone ID, at any depth.
fn collect_id_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if is_mappable_id(s) => out.push(s.clone()),
        Value::Object(m) => m.values().for_each(|x| collect_id_strings(x, out)),
        Value::Array(a) => a.iter().for_each(|x| collect_id_strings(x, out)),
        _ => {}
    }
}
