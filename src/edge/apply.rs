//! Applying one op at the edge Keystone: resolve every central ID it names (ID
//! map, else the natural key central sent), rewrite path and body, transform
//! calls an admin cannot replay as sent, send, and classify the answer.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::Value;

use crate::keystone::client::{ClientError, KeystoneClient, Reply};
use crate::keystone::ids::{self, is_mappable_id, natural_key, Replay};
use crate::keystone::{self, Classification, Creates};
use crate::protocol::messages::{EntityRef, OpContent, Outcome, OUT_OF_SCOPE};
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
#[error("{reason}")]
pub struct Transient {
    pub reason: String,
    /// The write was sent and may still reach Keystone (no answer in time, a
    /// broken connection, a gateway's 502 or 504 while Keystone carries on).
    pub in_doubt: bool,
    /// The identity service's own server error (a 500, or a 5xx other than a
    /// gateway's 502, 503 or 504): an outage while the site answers nothing
    /// else either, an op it cannot take (a poison op) while it does.
    pub server_error: Option<u16>,
}

impl Transient {
    pub fn new(reason: impl Into<String>) -> Transient {
        Transient {
            reason: reason.into(),
            in_doubt: false,
            server_error: None,
        }
    }

    /// A reply that says to try again later (5xx, 429). A 502 or 504 comes
    /// from a gateway in front of Keystone, which may carry on.
    fn of_reply(reply: &crate::keystone::client::Reply) -> Option<Transient> {
        // Keystone's own 501 (its JSON error): the site's Keystone (its
        // release, or its driver) does not do this at all; trying again
        // cannot change that. A 501 of something else in front of it (a
        // proxy, a pod being replaced) is a server error like any other.
        let not_implemented = reply.status == 501
            && reply
                .json()
                .is_some_and(|v| v["error"]["code"].as_u64() == Some(501));
        let retried = (reply.status >= 500 && !not_implemented) || reply.status == 429;
        retried.then(|| Transient {
            reason: format!(
                "edge identity service answered HTTP {}: {}",
                reply.status,
                reply.message()
            ),
            in_doubt: matches!(reply.status, 502 | 504),
            server_error: (reply.status >= 500 && !matches!(reply.status, 502..=504))
                .then_some(reply.status),
        })
    }

    /// A failed read (a look-up) changed nothing at the site.
    fn read(self) -> Transient {
        Transient {
            in_doubt: false,
            ..self
        }
    }
}

impl From<ClientError> for Transient {
    fn from(e: ClientError) -> Self {
        Transient {
            in_doubt: matches!(e, ClientError::InDoubt(_)),
            reason: e.to_string(),
            server_error: None,
        }
    }
}

impl From<crate::store::StoreError> for Transient {
    fn from(e: crate::store::StoreError) -> Self {
        Transient::new(format!("edge database: {e}"))
    }
}

/// Fields of a create an adopted entity keeps its own of: what names it or
/// places it (matched already), and what Keystone does not let change.
/// A domain's `explicit_domain_id` names it too (an update would keep it
/// as an attribute of its own).
const ADOPTION_KEEPS: [&str; 7] = [
    "id",
    "name",
    "domain_id",
    "parent_id",
    "is_domain",
    "links",
    "explicit_domain_id",
];

/// A domain create's body without `explicit_domain_id` (None for any other
/// write): for a site that refuses it, or fails on it every try.
fn domain_without_kept_id(replay: &Replay) -> Option<Value> {
    if replay.kind != keystone::kinds::DOMAIN.name || replay.method != "POST" {
        return None;
    }
    let mut body = replay.body.clone()?;
    body.get_mut(keystone::kinds::DOMAIN.member)?
        .as_object_mut()?
        .remove("explicit_domain_id")?;
    Some(body)
}

/// Whether `op` creates a domain under central's ID (`explicit_domain_id`).
pub(super) fn keeps_a_domain_id(op: &OpContent) -> bool {
    let replay = ids::replay_form(
        &op.kind,
        op.method.as_str(),
        &op.path,
        op.body.clone(),
        &op.created_ids,
    );
    domain_without_kept_id(&replay).is_some()
}

pub(super) fn failed(status: Option<u16>, detail: String) -> Applied {
    Applied {
        outcome: Outcome::Failed,
        status,
        detail: Some(detail),
        edge_ids: Vec::new(),
        changes: Commit::default(),
    }
}

/// What the applier knows of earlier attempts at an op.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attempt {
    /// An earlier attempt may have reached the site: a create is looked for
    /// before it is sent again.
    pub maybe_sent: bool,
    /// The op is the stream's (its seq is its own): a create of a kind that
    /// has look-alikes is marked in flight, with them, before it is sent.
    pub marks: bool,
    /// Earlier attempts were made by a version that kept no such marks: what
    /// looks like the entity is claimed without them.
    pub unmarked: bool,
    /// The op comes after a resync's fence, and the state the resync applied
    /// was read after it: what the op changes may be gone already.
    pub after_resync: bool,
    /// A domain create the site failed on `--max-attempts` times with its
    /// central ID: made without `explicit_domain_id`, under the site's own.
    pub without_kept_id: bool,
}

pub struct Applier<'a> {
    pub keystone: &'a KeystoneClient,
    pub store: &'a EdgeStore,
    /// Ops applied before this one and not yet committed: their ID map
    /// changes come first.
    pub pending: &'a std::sync::Mutex<super::Pending>,
}

impl Applier<'_> {
    /// A self-service password change the site refused (its current password
    /// is not central's original, or its policy refuses a change now) is set
    /// by an admin's PATCH; a password Keystone then marks expired (it runs
    /// with `change_password_upon_first_use`) is reported failed: at central
    /// the user logs in with it, here they would have to change it first.
    async fn password_as_admin(
        &self,
        path: &str,
        body: Option<&Value>,
        refused: &crate::keystone::client::Reply,
        adds: &mut Vec<(String, String, String)>,
    ) -> Result<Applied, Transient> {
        let Some((_, user_path, patch)) =
            keystone::kinds::identity::password_change_as_patch(path, body)
        else {
            return Ok(failed(
                Some(refused.status),
                format!(
                    "self-service password change refused: {}",
                    refused.message()
                ),
            ));
        };
        let reply = self
            .keystone
            .send(Method::PATCH, &user_path, patch.as_ref())
            .await?;
        if let Some(t) = Transient::of_reply(&reply) {
            return Err(t);
        }
        if !reply.is_success() {
            return Ok(failed(
                Some(reply.status),
                format!(
                    "self-service password change refused ({}), and an admin's change too: {}",
                    refused.status,
                    reply.message()
                ),
            ));
        }
        let expired = reply
            .json()
            .and_then(|v| {
                v[keystone::kinds::USER.member]["password_expires_at"]
                    .as_str()
                    .map(str::to_string)
            })
            .and_then(|at| crate::keystone::client::parse_rfc3339(&at))
            .is_some_and(|at| {
                at <= std::time::SystemTime::now() + std::time::Duration::from_secs(60)
            });
        if expired {
            return Ok(failed(
                Some(reply.status),
                "the password was set by an admin here (the site refused the self-service change) \
                 and this site's Keystone marks it expired (change_password_upon_first_use): the \
                 user must change it here before logging in, unlike at central"
                    .into(),
            ));
        }
        Ok(Applied {
            outcome: Outcome::Applied,
            status: Some(reply.status),
            detail: Some(format!(
                "set by an admin here: the site refused the self-service change ({})",
                refused.status
            )),
            edge_ids: Vec::new(),
            changes: Commit {
                map_adds: std::mem::take(adds),
                map_removes: Vec::new(),
                advance: true,
            },
        })
    }

    /// The edge entities every ID this op creates maps to, when each is
    /// mapped and still at the site.
    async fn mapped_and_present(&self, op: &OpContent) -> Result<Option<Vec<String>>, Transient> {
        if op.created_ids.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(op.created_ids.len());
        for central in &op.created_ids {
            let Some(edge) = self.mapping(central).await? else {
                return Ok(None);
            };
            let present = keystone::kinds::get_entity(self.keystone, &op.kind, &edge)
                .await
                .map_err(|e| Transient::from(e).read())?;
            if present.is_none() {
                return Ok(None);
            }
            out.push(edge);
        }
        Ok(Some(out))
    }

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

    /// The central ID an edge entity is mapped from, counting the uncommitted
    /// batch.
    async fn central_of(&self, edge_id: &str) -> Result<Option<String>, Transient> {
        let batched = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .batch
            .central_of(edge_id);
        match batched {
            Some(c) => Ok(c),
            None => Ok(self.store.central_of(edge_id).await?),
        }
    }

    /// Whether the edge's entity `edge_id`, of `kind`, stands for a central ID
    /// other than `central_id` (an entity stands for one of central's, but of
    /// a kind that lets look-alikes be: see `store::edge::stands_for_one`).
    async fn claimed_by_another(
        &self,
        kind: &str,
        edge_id: &str,
        central_id: &str,
    ) -> Result<bool, Transient> {
        if !crate::store::edge::stands_for_one(kind) {
            return Ok(false);
        }
        Ok(self
            .central_of(edge_id)
            .await?
            .is_some_and(|c| c != central_id))
    }

    /// Applies one op; `attempt` says what earlier attempts may have done.
    pub async fn apply(&self, op: &OpContent, attempt: Attempt) -> Result<Applied, Transient> {
        if op.state == OUT_OF_SCOPE {
            return Ok(Applied {
                outcome: Outcome::OutOfScope,
                status: None,
                detail: None,
                edge_ids: Vec::new(),
                changes: Commit::default(),
            });
        }
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
        for id in ids_named(op) {
            if resolved.contains_key(&id) || op.created_ids.contains(&id) {
                continue;
            }
            if let Some(edge_id) = self.mapping(&id).await? {
                resolved.insert(id, edge_id);
            } else if let Some(r) = op.refs.iter().find(|r| r.id == id) {
                if let Some(edge_id) = self
                    .resolve(r, &op.refs, &mut resolved, &mut adds)
                    .await
                    .map_err(Transient::read)?
                {
                    resolved.insert(id, edge_id);
                }
            }
        }
        // After a resync, the state it applied (central's, read after this
        // op) no longer has what this op references and the edge cannot find:
        // a later write at central removed it, and with it this op's effect.
        if attempt.after_resync {
            let gone: Vec<String> = op
                .refs
                .iter()
                .filter(|r| {
                    is_mappable_id(&r.id)
                        && !resolved.contains_key(&r.id)
                        && !op.created_ids.contains(&r.id)
                        && ids_named(op).contains(&r.id)
                })
                .map(|r| format!("{} '{}'", r.kind, r.name))
                .collect();
            if !gone.is_empty() {
                return Ok(Applied {
                    outcome: Outcome::Applied,
                    status: None,
                    detail: Some(format!(
                        "not sent: after a resync, what it references is not here ({}): \
                         central's later state, which the resync applied, removed it",
                        gone.join(", ")
                    )),
                    edge_ids: Vec::new(),
                    changes: Commit {
                        map_adds: adds,
                        map_removes: Vec::new(),
                        advance: true,
                    },
                });
            }
        }
        let map = |id: &str| resolved.get(id).cloned();
        let path = ids::rewrite_path(&op.path, &map);
        let mut body = op.body.clone();
        if let Some(b) = body.as_mut() {
            ids::rewrite_body(b, &map);
        }
        let replay = ids::replay_form(
            &op.kind,
            op.method.as_str(),
            &path,
            body.clone(),
            &op.created_ids,
        );
        let send_method = Method::from_bytes(replay.method.as_bytes()).unwrap_or(method.clone());
        let (send_path, mut send_body) = (replay.path.clone(), replay.body.clone());
        // Why a domain is made under an ID of the site's own, if it is.
        let mut kept_id_dropped: Option<String> = None;
        if attempt.without_kept_id {
            if let Some(plain) = domain_without_kept_id(&replay) {
                send_body = Some(plain);
                kept_id_dropped = Some(
                    "this site failed on its explicit_domain_id each try (--max-attempts)".into(),
                );
            }
        }

        let route =
            match keystone::classify(op.method.as_str(), op.path.split('?').next().unwrap_or("")) {
                Classification::Replicable(r) => Some(r),
                Classification::NotReplicated(_) => None,
            };
        let creates = route.map(|r| r.creates).unwrap_or(Creates::No);
        if let Some(applied) = self
            .owner_missing(op, &attempt, send_body.as_ref(), &adds)
            .await?
        {
            return Ok(applied);
        }
        if creates != Creates::No {
            if let Some(applied) = self
                .before_create(op, attempt, creates, &replay, &mut adds)
                .await
                .map_err(Transient::read)?
            {
                return Ok(applied);
            }
        }
        if let Some(refused) = self.make_first(&replay).await? {
            return Ok(Applied {
                outcome: Outcome::Failed,
                status: None,
                detail: Some(refused),
                edge_ids: Vec::new(),
                changes: Commit {
                    map_adds: adds,
                    map_removes: Vec::new(),
                    advance: true,
                },
            });
        }
        let reply = self
            .keystone
            .send(send_method, &send_path, send_body.as_ref())
            .await?;
        // A domain create whose central ID this site refuses (a release
        // without `explicit_domain_id`) is made under an ID of its own, mapped
        // like any other; one an earlier try made is found by name and
        // adopted (its 409). One the site fails on is retried first.
        let refuses_kept_id = reply.status == 400 && reply.message().contains("explicit_domain_id");
        let reply = match domain_without_kept_id(&replay).filter(|_| refuses_kept_id) {
            Some(plain) => {
                tracing::warn!(
                    seq = op.seq,
                    "this site refuses explicit_domain_id: the domain is made under an ID of its \
                     own, mapped to central's"
                );
                kept_id_dropped = Some("this site refuses explicit_domain_id (HTTP 400)".into());
                self.keystone
                    .send(Method::POST, &send_path, Some(&plain))
                    .await?
            }
            None => reply,
        };
        if op.kind == keystone::kinds::USER_PASSWORD.name && matches!(reply.status, 400 | 401 | 403)
        {
            return self
                .password_as_admin(&send_path, send_body.as_ref(), &reply, &mut adds)
                .await;
        }

        if reply.is_success() {
            let edge_ids = match route {
                Some(r) => keystone::created_ids(&r, &send_path, reply.json().as_ref()),
                None => Vec::new(),
            };
            if attempt.marks
                && creates != Creates::No
                && crate::keystone::probe::lets_look_alikes(&op.kind)
            {
                // Noted at once: until the batch commits, this is how the
                // entity is known to be this op's.
                self.store
                    .inflight_made(op.seq, &edge_ids)
                    .await
                    .map_err(Transient::from)?;
            }
            for (central, edge) in op.created_ids.iter().zip(&edge_ids) {
                adds.push((central.clone(), edge.clone(), op.kind.clone()));
            }
            let removes = ids::deleted_id(&op.method, &op.path).into_iter().collect();
            return Ok(Applied {
                outcome: Outcome::Applied,
                status: Some(reply.status),
                detail: kept_id_dropped.map(|why| {
                    format!(
                        "made without explicit_domain_id ({why}): the domain has an ID of its own \
                         here, mapped to central's"
                    )
                }),
                edge_ids,
                changes: Commit {
                    map_adds: adds,
                    map_removes: removes,
                    advance: true,
                },
            });
        }
        if let Some(t) = Transient::of_reply(&reply) {
            return Err(t);
        }
        if reply.status == 409 && creates != Creates::No {
            return self
                .adopt(op, creates, &replay, adds, &reply)
                .await
                .map_err(Transient::read);
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
        if reply.status == 404 && attempt.after_resync && creates == Creates::No {
            // The resync applied central's state as it was after this op: a
            // later write there removed what this one changes.
            return Ok(Applied {
                outcome: Outcome::Applied,
                status: Some(reply.status),
                detail: Some(
                    "what it changes is gone here: the resync applied central's state from after \
                     it, in which a later write removed it"
                        .into(),
                ),
                edge_ids: Vec::new(),
                changes: Commit {
                    map_adds: adds,
                    map_removes: Vec::new(),
                    advance: true,
                },
            });
        }
        let mut detail = reply.message();
        if matches!(reply.status, 405 | 501) {
            detail.push_str(&format!(
                " (HTTP {}: not done by this site's Keystone, a release or a driver without it; \
                 compare the site's release with central's)",
                reply.status
            ));
        }
        let named = ids_named(op);
        let unresolved: Vec<&EntityRef> = op
            .refs
            .iter()
            .filter(|r| !resolved.contains_key(&r.id) && named.contains(&r.id))
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

    /// Before a create is sent: when an earlier attempt may have made it, look
    /// for it and claim it if this op made it (the result to record); for a
    /// kind Keystone lets exist twice, note what looks like it now, durably, so
    /// that a later look can tell this op's entity from those.
    async fn before_create(
        &self,
        op: &OpContent,
        attempt: Attempt,
        creates: Creates,
        replay: &Replay,
        adds: &mut Vec<(String, String, String)>,
    ) -> Result<Option<Applied>, Transient> {
        use crate::keystone::probe::{find_created, lets_look_alikes, look_alikes, Found};
        let (path, body) = (replay.path.as_str(), replay.body.as_ref());
        let look_alike = lets_look_alikes(&op.kind);
        if attempt.maybe_sent {
            // What this op's earlier attempt noted before it was sent, and
            // after its answer came.
            let noted = if look_alike && attempt.marks {
                self.store
                    .inflight(op.seq)
                    .await?
                    .filter(|i| i.op_id == op.op_id)
            } else {
                None
            };
            if let Some(made) = noted.as_ref().and_then(|n| n.made.clone()) {
                for (central, edge) in op.created_ids.iter().zip(&made) {
                    adds.push((central.clone(), edge.clone(), op.kind.clone()));
                }
                return Ok(Some(Applied {
                    outcome: Outcome::Applied,
                    status: None,
                    detail: Some("applied by an earlier attempt, recorded now".into()),
                    edge_ids: made,
                    changes: Commit {
                        map_adds: std::mem::take(adds),
                        map_removes: Vec::new(),
                        advance: true,
                    },
                }));
            }
            // A kind with look-alikes, never marked in flight: never sent.
            let never_sent = look_alike && attempt.marks && !attempt.unmarked && noted.is_none();
            let before = noted.and_then(|n| n.before).unwrap_or_default();
            // The ID map first: an entity central's IDs map to already (a
            // resync made it, or an earlier attempt was recorded) is the one
            // this op creates, whatever it is named now; its values second.
            let mapped = self.mapped_and_present(op).await?;
            let found = if let Some(ids) = mapped {
                Found::Unique(ids)
            } else if never_sent {
                Found::Nothing
            } else {
                find_created(self.keystone, &replay.kind, creates, path, body)
                    .await
                    .map_err(|e| Transient::from(e).read())?
            };
            let claimed = match found {
                Found::Nothing => None,
                Found::Unique(ids) => {
                    for id in &ids {
                        if let Some(other) = self.central_of(id).await? {
                            if !op.created_ids.contains(&other) {
                                return Ok(Some(failed(
                                    None,
                                    format!(
                                        "the {} this op creates exists here already and stands for \
                                         another entity of central's (the ID map says so): not \
                                         claimed twice",
                                        op.kind
                                    ),
                                )));
                            }
                        }
                    }
                    Some(ids)
                }
                Found::Candidates(ids) => {
                    let mut free = Vec::new();
                    for id in ids {
                        if before.contains(&id) {
                            continue;
                        }
                        match self.central_of(&id).await? {
                            Some(c) if !op.created_ids.contains(&c) => continue,
                            _ => free.push(id),
                        }
                    }
                    match free.len() {
                        0 => None,
                        1 => Some(free),
                        n => {
                            return Ok(Some(failed(
                                None,
                                format!(
                                    "{n} {}s here look like the one this op creates and none is \
                                     known to be it; none is claimed (a drift audit shows them)",
                                    op.kind
                                ),
                            )))
                        }
                    }
                }
            };
            if let Some(edge_ids) = claimed {
                for (central, edge) in op.created_ids.iter().zip(&edge_ids) {
                    adds.push((central.clone(), edge.clone(), op.kind.clone()));
                }
                // What is found may have been there before (or be the
                // resync's copy of central's state, which lacks what Keystone
                // never shows, a password): it takes the create's values, as
                // adopted.
                let found = if attempt.after_resync {
                    "found after a resync (made by it, or by an earlier attempt)"
                } else {
                    "found here (made by an earlier attempt whose answer was lost, or there \
                     before)"
                };
                let refused = match edge_ids.first() {
                    Some(id) => self.update_adopted(creates, replay, id).await?,
                    None => None,
                };
                let (outcome, detail) = match refused {
                    None => (
                        Outcome::Applied,
                        format!("{found} and given the create's values"),
                    ),
                    Some(why) => (
                        Outcome::Failed,
                        format!("{found}, but it could not be given the create's values: {why}"),
                    ),
                };
                return Ok(Some(Applied {
                    outcome,
                    status: None,
                    detail: Some(detail),
                    edge_ids,
                    changes: Commit {
                        map_adds: std::mem::take(adds),
                        map_removes: Vec::new(),
                        advance: true,
                    },
                }));
            }
        }
        if look_alike && attempt.marks {
            let before = look_alikes(self.keystone, &op.kind, path, body)
                .await
                .map_err(|e| Transient::from(e).read())?;
            self.store
                .mark_inflight(op.seq, &op.op_id, Some(&before))
                .await?;
        }
        Ok(None)
    }

    /// Keystone takes a credential (an EC2 key too, replayed as one) for any
    /// user ID: one written for a user this site does not have (a resync
    /// deleted it, central having deleted it after the op; or it went
    /// missing here) would belong to no one, and no later delete of the user
    /// would remove it. Such a write is not sent: after a resync it is moot
    /// (central's later state removed the user), otherwise it fails, for a
    /// repair to settle. A user that cannot be read now (the site's backend
    /// fails) does not hold the stream: the write is sent, as Keystone would
    /// take it.
    async fn owner_missing(
        &self,
        op: &OpContent,
        attempt: &Attempt,
        body: Option<&Value>,
        adds: &[(String, String, String)],
    ) -> Result<Option<Applied>, Transient> {
        use keystone::kinds::{CREDENTIAL, EC2_CREDENTIAL, USER};
        if ![CREDENTIAL.name, EC2_CREDENTIAL.name].contains(&op.kind.as_str())
            || !matches!(op.method.as_str(), "POST" | "PATCH")
        {
            return Ok(None);
        }
        let Some(user) = body
            .and_then(|b| b[CREDENTIAL.name]["user_id"].as_str())
            .filter(|u| is_mappable_id(u))
        else {
            return Ok(None);
        };
        // A user ID this edge does not map is sent as central's: central's
        // Keystone took the credential for it whether or not central had the
        // user, and this site's takes it the same (what central holds, this
        // site holds). Only a user mapped here to an ID the site no longer
        // has is looked at.
        let central = op
            .body
            .as_ref()
            .and_then(|b| b[CREDENTIAL.name]["user_id"].as_str())
            .or_else(|| op.path.strip_prefix("/v3/users/")?.split('/').next());
        if central == Some(user) {
            return Ok(None);
        }
        match keystone::kinds::get_entity_strict(self.keystone, USER.name, user).await {
            Ok(None) => {}
            Ok(Some(_)) => return Ok(None),
            Err(e) => {
                tracing::debug!(seq = op.seq, error = %e, "a credential's user could not be read here; the credential is sent");
                return Ok(None);
            }
        }
        let owner = op.refs.iter().find(|r| r.kind == USER.name);
        let named = owner.map_or_else(|| "its user".to_string(), |r| format!("user '{}'", r.name));
        let (outcome, detail) = if attempt.after_resync {
            (
                Outcome::Applied,
                format!(
                    "not sent: after a resync, what it references is not here ({named}): \
                     central's later state, which the resync applied, removed it"
                ),
            )
        } else if owner.is_some_and(|r| r.id != user) {
            (
                Outcome::Failed,
                format!(
                    "not sent: {named} is mapped here to {user}, which this site no longer has, \
                     and Keystone would take a credential for it"
                ),
            )
        } else {
            (
                Outcome::Failed,
                format!(
                    "not sent: Keystone would take a credential for a user this site does not \
                     have (not found at this edge by natural key: {named})"
                ),
            )
        };
        Ok(Some(Applied {
            outcome,
            status: None,
            detail: Some(detail),
            edge_ids: Vec::new(),
            changes: Commit {
                map_adds: adds.to_vec(),
                map_removes: Vec::new(),
                advance: true,
            },
        }))
    }

    /// Makes the write a replay needs first (what Keystone made at central
    /// on its own for this write); one answered 409 exists already.
    /// `Some(why)` when the site refused it.
    async fn make_first(&self, replay: &Replay) -> Result<Option<String>, Transient> {
        let Some((method, path, body)) = &replay.first else {
            return Ok(None);
        };
        let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::POST);
        let reply = self.keystone.send(method, path, body.as_ref()).await?;
        if reply.is_success() || reply.status == 409 {
            return Ok(None);
        }
        if let Some(t) = Transient::of_reply(&reply) {
            return Err(t);
        }
        Ok(Some(format!(
            "what central's identity service made for this write could not be made here first \
             ({path}): HTTP {}: {}",
            reply.status,
            reply.message()
        )))
    }

    /// A create answered 409: the entity already exists here. Adopt its ID.
    async fn adopt(
        &self,
        op: &OpContent,
        creates: Creates,
        replay: &Replay,
        mut adds: Vec<(String, String, String)>,
        reply: &Reply,
    ) -> Result<Applied, Transient> {
        // Looked for as what the call makes (a project acting as a domain is
        // a domain), in the form it was sent.
        let kind = replay.kind.as_str();
        let existing = match creates {
            // Created by PUT to its URL: the same ID, if it is there (the
            // 409 may be for another reason: an identity provider whose
            // remote ID another one holds).
            Creates::FromUrl => {
                let held = self.keystone.send(Method::GET, &replay.path, None).await?;
                if let Some(t) = Transient::of_reply(&held) {
                    return Err(t);
                }
                if !held.is_success() {
                    return Ok(failed(
                        Some(reply.status),
                        format!(
                            "{} (and nothing at {} to adopt)",
                            reply.message(),
                            replay.path
                        ),
                    ));
                }
                op.created_ids.first().cloned()
            }
            _ => match replay
                .body
                .as_ref()
                .and_then(|b| b.get(member_key(kind)))
                .and_then(|e| natural_key(kind, e))
            {
                Some((name, domain)) => {
                    keystone::kinds::find_by_name(self.keystone, kind, &name, domain.as_deref())
                        .await?
                }
                None => None,
            },
        };
        match (existing, op.created_ids.first()) {
            (Some(edge_id), Some(central_id)) => {
                adds.push((central_id.clone(), edge_id.clone(), op.kind.clone()));
                // The entity here takes the create's values (a password
                // included): adopted, it is what central made.
                let refused = self.update_adopted(creates, replay, &edge_id).await?;
                let (outcome, detail) = match refused {
                    None => (
                        Outcome::Adopted,
                        "already existed at this edge; its ID was adopted and it was given the \
                         create's values"
                            .to_string(),
                    ),
                    Some(why) => (
                        Outcome::Failed,
                        format!(
                            "already existed at this edge and its ID was adopted, but it could \
                             not be given the create's values: {why}"
                        ),
                    ),
                };
                Ok(Applied {
                    outcome,
                    status: Some(reply.status),
                    detail: Some(detail),
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

    /// Gives an adopted entity the values its create carries (all but what
    /// names it, or cannot change); `Some(why)` when the site refused.
    async fn update_adopted(
        &self,
        creates: Creates,
        replay: &Replay,
        edge_id: &str,
    ) -> Result<Option<String>, Transient> {
        let kind = replay.kind.as_str();
        // Created by PUT: updated at the same URL; only a kind with a natural
        // key is adopted by one: at its member URL.
        let at = keystone::kinds::named(kind)
            .filter(|k| k.key.by_name())
            .and_then(|k| k.member_path(edge_id));
        let path = match (creates, at) {
            (Creates::FromUrl, _) => replay.path.clone(),
            (_, Some(at)) => at,
            (_, None) => return Ok(None),
        };
        // What a body holds the entity under (a federation protocol's body
        // says `protocol`).
        let member = member_key(kind);
        let Some(Value::Object(fields)) = replay.body.as_ref().and_then(|b| b.get(member)) else {
            return Ok(None);
        };
        if creates == Creates::FromUrl {
            // What an update cannot change (an identity provider's domain)
            // must be the create's already.
            let held = self.keystone.send(Method::GET, &path, None).await?;
            if let Some(t) = Transient::of_reply(&held) {
                return Err(t);
            }
            if !held.is_success() {
                return Ok(Some(format!("nothing is at {path} (HTTP {})", held.status)));
            }
            let held = held.json().and_then(|j| j.get(member).cloned());
            let differs: Vec<&str> = ["domain_id"]
                .into_iter()
                .filter(|f| {
                    fields.get(*f).is_some_and(|v| {
                        !v.is_null() && held.as_ref().and_then(|h| h.get(*f)) != Some(v)
                    })
                })
                .collect();
            if !differs.is_empty() {
                return Ok(Some(format!(
                    "it has another {} here, which an update cannot change",
                    differs.join(", ")
                )));
            }
        }
        let update: serde_json::Map<String, Value> = fields
            .iter()
            .filter(|(k, _)| !ADOPTION_KEEPS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if update.is_empty() {
            return Ok(None);
        }
        let patch = serde_json::json!({ member: update });
        let reply = self
            .keystone
            .send(Method::PATCH, &path, Some(&patch))
            .await?;
        if reply.is_success() {
            return Ok(None);
        }
        if reply.status >= 500 || reply.status == 429 {
            return Err(Transient {
                reason: format!(
                    "edge identity service answered HTTP {} updating an adopted {}: {}",
                    reply.status,
                    kind,
                    reply.message()
                ),
                in_doubt: matches!(reply.status, 502 | 504),
                server_error: (reply.status >= 500 && !matches!(reply.status, 502..=504))
                    .then_some(reply.status),
            });
        }
        Ok(Some(format!("HTTP {}: {}", reply.status, reply.message())))
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
                        let domain = &keystone::kinds::DOMAIN;
                        let Some(dref) = refs.iter().find(|x| x.id == d && x.kind == domain.name)
                        else {
                            return Ok(None);
                        };
                        let Some(found) =
                            domain.find_by_key(self.keystone, &dref.name, None).await?
                        else {
                            return Ok(None);
                        };
                        if self.claimed_by_another(domain.name, &found, d).await? {
                            return Ok(None);
                        }
                        resolved.insert(d.to_string(), found.clone());
                        adds.push((d.to_string(), found.clone(), domain.name.into()));
                        Some(found)
                    }
                },
            },
        };
        let mut found =
            keystone::kinds::find_by_name(self.keystone, &r.kind, &r.name, domain.as_deref())
                .await?;
        if let Some(edge_id) = &found {
            if self.claimed_by_another(&r.kind, edge_id, &r.id).await? {
                // It stands for another of central's entities (a resync
                // mapped the one now under this name): `r` is gone here.
                found = None;
            }
        }
        if let Some(edge_id) = &found {
            adds.push((r.id.clone(), edge_id.clone(), r.kind.clone()));
        }
        Ok(found)
    }
}

/// The IDs an op names (in its path and body), as central knows them.
pub fn ids_named(op: &OpContent) -> Vec<String> {
    let mut ids: Vec<String> = op
        .path
        .split(['/', '?', '&', '='])
        .filter(|s| is_mappable_id(s))
        .map(str::to_string)
        .collect();
    if let Some(body) = &op.body {
        collect_id_strings(body, &mut ids);
    }
    ids
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

/// The JSON key a request or an answer holds one entity of `kind` under.
fn member_key(kind: &str) -> &str {
    keystone::kinds::named(kind)
        .map(|k| k.member)
        .filter(|m| !m.is_empty())
        .unwrap_or(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, message: &str) -> Reply {
        Reply {
            status,
            body: serde_json::to_vec(&serde_json::json!({"error": {"message": message}}))
                .unwrap()
                .into(),
        }
    }

    /// A gateway's 502, 503, 504 and a 429 are outages; a 500 (or another
    /// 5xx) is the site's own server error, which may be the op's.
    #[test]
    fn server_errors_are_told_from_outages() {
        for (status, server_error, in_doubt) in [
            (500, Some(500), false),
            (507, Some(507), false),
            (502, None, true),
            (503, None, false),
            (504, None, true),
            (429, None, false),
        ] {
            let t = Transient::of_reply(&reply(status, "x")).unwrap();
            assert_eq!(
                (t.server_error, t.in_doubt),
                (server_error, in_doubt),
                "{status}"
            );
        }
        // Not implemented by the site's Keystone (an older release): failed
        // at once; a 501 that is not Keystone's is a server error.
        let keystone_501 = crate::keystone::client::Reply {
            status: 501,
            body: bytes::Bytes::from_static(
                br#"{"error": {"code": 501, "title": "Not Implemented", "message": "no"}}"#,
            ),
        };
        assert!(Transient::of_reply(&keystone_501).is_none());
        let t = Transient::of_reply(&reply(501, "x")).unwrap();
        assert_eq!(t.server_error, Some(501));
        assert!(Transient::of_reply(&reply(400, "x")).is_none());
        assert!(Transient::of_reply(&reply(409, "x")).is_none());
    }

    /// Only a domain create carrying `explicit_domain_id` is sent without it.
    #[test]
    fn only_a_domain_create_carrying_its_central_id_is_sent_without_it() {
        let create = Replay {
            method: "POST".into(),
            path: "/v3/domains".into(),
            body: Some(serde_json::json!({"domain": {"name": "d", "explicit_domain_id": "c1"}})),
            kind: "domain".into(),
            first: None,
        };
        assert_eq!(
            domain_without_kept_id(&create),
            Some(serde_json::json!({"domain": {"name": "d"}}))
        );
        let without = Replay {
            body: Some(serde_json::json!({"domain": {"name": "d"}})),
            ..create.clone()
        };
        assert!(domain_without_kept_id(&without).is_none());
        let update = Replay {
            method: "PATCH".into(),
            path: "/v3/domains/c1".into(),
            ..create.clone()
        };
        assert!(domain_without_kept_id(&update).is_none());
        let project = Replay {
            kind: "project".into(),
            path: "/v3/projects".into(),
            body: Some(serde_json::json!({"project": {"name": "p"}})),
            ..create
        };
        assert!(domain_without_kept_id(&project).is_none());
    }
}
