//! A resync's plan: from central's state and the edge's, the changes to send
//! (ID map entries, then groups of independent creates, updates and deletes),
//! and the tally of what the edge made of them.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::keystone::state::{self, Category, Entity};
use crate::protocol::messages::{Ack, OpContent, Outcome};

/// Items listed in a resync's result.
pub(super) const SAMPLE: usize = 100;

/// One change of a plan, as an op the edge's applier takes.
pub(super) struct Planned {
    pub(super) op: OpContent,
    pub(super) kind: String,
    pub(super) key: String,
    pub(super) what: &'static str,
    /// The user (central's ID) whose password this change sets.
    pub(super) user: Option<String>,
}

/// What a resync sends: ID map entries, then groups of independent changes,
/// in order (a group's changes depend only on earlier groups').
pub(super) struct Plan {
    pub(super) maps: Vec<(String, String, String)>,
    pub(super) groups: Vec<Vec<Planned>>,
    pub(super) only_at_edge: Vec<(String, String)>,
    /// What differs and cannot be updated in place.
    pub(super) not_updatable: Vec<(String, String)>,
    /// What only the edge has (or central deleted) and the edge's own service
    /// identity needs: never deleted.
    pub(super) kept: Vec<(String, String)>,
}

pub(super) fn planned(
    kind: &str,
    key: &str,
    what: &'static str,
    call: state::Call,
    created: Vec<String>,
) -> Planned {
    let (method, path, body) = call;
    Planned {
        op: OpContent {
            seq: 0,
            op_id: format!("{what} {kind} {key}"),
            state: "committed".into(),
            method: method.to_string(),
            path,
            kind: kind.to_string(),
            body,
            created_ids: created,
            refs: Vec::new(),
        },
        kind: kind.to_string(),
        key: key.to_string(),
        what,
        user: None,
    }
}

impl Plan {
    /// `deleted`: what central deleted (kind, key); held at the edge only, it
    /// is deleted there with or without `prune`, as is what the edge maps from
    /// an ID central no longer has.
    pub(super) fn new(
        central: &[Entity],
        edge: &[Entity],
        prune: bool,
        deleted: &HashSet<(String, String)>,
    ) -> Plan {
        // Central's ID of what the edge already maps (its IDs come as central's).
        let maps = state::matched_ids(central, edge)
            .filter(|(c, e)| e.ids.first().is_none_or(|mapped| *mapped != c.id))
            .map(|(c, e)| (c.id.clone(), e.id.clone(), c.kind.clone()))
            .collect();
        // Each change with its group: creates and updates by kind, then by
        // level (a parent project first); deletes after them, what references
        // first (children before parents, a domain's disable before its delete).
        let mut changes: Vec<((u8, i64, i64, bool), Planned)> = Vec::new();
        let mut only_at_edge = Vec::new();
        let mut not_updatable = Vec::new();
        let mut kept = Vec::new();
        for d in state::diff(central, edge) {
            match d.category {
                Category::MissingAtEdge => {
                    let c = &central[d.central.expect("central's side")];
                    if let Some((call, created)) = c.create() {
                        let group = (0, state::rank(&c.kind) as i64, i64::from(c.level), false);
                        changes.push((group, planned(&c.kind, &c.key, "create", call, created)));
                    }
                }
                Category::Differs => {
                    let c = &central[d.central.expect("central's side")];
                    if let Some(call) = c.update(&d.fields) {
                        let group = (0, state::rank(&c.kind) as i64, i64::from(c.level), false);
                        changes.push((group, planned(&c.kind, &c.key, "update", call, Vec::new())));
                    } else {
                        // Keystone has no update for it (a credential's owner).
                        not_updatable.push((c.kind.clone(), c.key.clone()));
                    }
                }
                Category::OnlyAtEdge => {
                    let e = &edge[d.edge.expect("the edge's side")];
                    let gone = e.mapped || deleted.contains(&(e.kind.clone(), e.key.clone()));
                    if e.own {
                        if prune || gone {
                            kept.push((e.kind.clone(), e.key.clone()));
                        } else {
                            only_at_edge.push((e.kind.clone(), e.key.clone()));
                        }
                        continue;
                    }
                    if !gone {
                        only_at_edge.push((e.kind.clone(), e.key.clone()));
                    }
                    if prune || gone {
                        for call in e.delete() {
                            let group = (
                                1,
                                -(state::rank(&e.kind) as i64),
                                -i64::from(e.level),
                                call.0 == reqwest::Method::DELETE,
                            );
                            changes.push((
                                group,
                                planned(&e.kind, &e.key, "delete", call, Vec::new()),
                            ));
                        }
                    }
                }
            }
        }
        changes.sort_by_key(|(group, _)| *group);
        let mut groups: Vec<Vec<Planned>> = Vec::new();
        let mut last = None;
        for (group, p) in changes {
            if last != Some(group) {
                groups.push(Vec::new());
                last = Some(group);
            }
            groups.last_mut().expect("a group").push(p);
        }
        Plan {
            maps,
            groups,
            only_at_edge,
            not_updatable,
            kept,
        }
    }

    pub(super) fn ops(&self) -> usize {
        self.groups.iter().map(Vec::len).sum()
    }
}

/// What a resync's changes came to.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) created: usize,
    pub(super) updated: usize,
    pub(super) adopted: usize,
    pub(super) deleted: usize,
    pub(super) failed: usize,
    pub(super) failures: Vec<Value>,
    pub(super) created_users: Vec<(String, String)>,
    /// Users whose password from the op log was set.
    pub(super) passwords: HashSet<String>,
}

impl Tally {
    pub(super) fn count(&mut self, p: &Planned, ack: &Ack) {
        match ack.outcome {
            // A plan never sends a marker: an edge that says so did nothing.
            Outcome::Failed | Outcome::OperatorSkipped | Outcome::OutOfScope => {
                self.failed += 1;
                if self.failures.len() < SAMPLE {
                    self.failures.push(json!({
                        "kind": p.kind,
                        "key": p.key,
                        "change": p.what,
                        "status": ack.status,
                        "detail": ack.detail,
                    }));
                }
            }
            Outcome::Adopted => self.adopted += 1,
            Outcome::Applied | Outcome::Skipped => match p.what {
                "create" => {
                    self.created += 1;
                    if p.kind == crate::keystone::kinds::USER.name {
                        if let Some(id) = p.op.created_ids.first() {
                            self.created_users.push((id.clone(), p.key.clone()));
                        }
                    }
                }
                "update" => self.updated += 1,
                "password" => {
                    self.passwords.extend(p.user.clone());
                }
                _ => self.deleted += 1,
            },
        }
    }
}
