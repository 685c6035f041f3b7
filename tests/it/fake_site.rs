//! A stateful fake identity API for sync tests: one per site. Like Keystone it
//! generates its own IDs (ignoring `id` in bodies; domains honour
//! `explicit_domain_id`), requires a token it issued, answers 409 to a duplicate
//! name, 404 to unknown IDs, checks passwords, and bootstraps its own admin
//! project, user and roles with IDs of its own. `fail_next` makes the next writes
//! answer given statuses.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use crate::fake_keystone::new_id;

/// The kinds this fake holds, (collection, kind), from syncgate's
/// catalogue: those named by name (within a domain).
pub fn kinds() -> Vec<(&'static str, &'static str)> {
    syncgate::keystone::kinds::ALL
        .iter()
        .filter(|k| k.key.by_name())
        .filter_map(|k| Some((k.collection?, k.name)))
        .collect()
}

#[derive(Default)]
pub struct SiteState {
    pub entities: HashMap<&'static str, BTreeMap<String, Value>>,
    pub passwords: HashMap<String, String>,
    pub grants: BTreeSet<String>,
    /// Domain configurations, by domain ID (group -> option -> value).
    pub configs: HashMap<String, Value>,
    pub members: BTreeSet<(String, String)>,
    pub implied: BTreeSet<(String, String)>,
    /// Tokens issued, with the domain of their project scope (where a
    /// create without `domain_id` lands, as in Keystone).
    tokens: HashMap<String, Option<String>>,
    /// Statuses to answer, in order, to the next writes.
    pub fail_next: Vec<u16>,
    /// Writes answered this status every time, by `METHOD /path` (a Keystone
    /// that cannot take one kind of write: "database is locked").
    pub fail_writes_to: HashMap<String, u16>,
    /// Every request (a token too) answered this status (an outage).
    pub fail_all: Option<u16>,
    /// A domain create naming `explicit_domain_id` is answered this status
    /// (400: a release without it; 500: one that fails on it).
    pub refuse_explicit_domain_id: Option<u16>,
    /// Writes refused by `fail_writes_to`, by `METHOD /path`.
    pub refused_writes: HashMap<String, usize>,
    /// Creates made, by kind (to prove nothing is applied twice).
    pub creates: HashMap<String, usize>,
    /// Creates answered 409 because what they create exists already.
    pub conflicts: usize,
    /// Every write handled, in order: method, path, status (for a failing
    /// test's report).
    pub journal: Vec<String>,
    /// Create requests received, by collection, whatever the answer (a
    /// second create of a named entity is answered 409 and makes nothing).
    pub create_requests: HashMap<String, usize>,
    /// Create requests in the order received: `collection name`.
    pub create_order: Vec<String>,
    /// Keystone's `[security_compliance] change_password_upon_first_use`: a
    /// password an admin sets is expired at once (its user must change it
    /// with the self-service call before logging in).
    pub change_password_upon_first_use: bool,
    pub writes: usize,
    /// The next write waits this long before it is handled (a slow Keystone).
    pub delay_next: Option<std::time::Duration>,
    /// The next write is held this long and then handled, whether or not its
    /// client still waits (a database lock wait, or a load balancer that gave
    /// up while Keystone carries on).
    pub hold_next: Option<std::time::Duration>,
    /// Held writes handled so far.
    pub held_done: usize,
    /// The next successful write is applied and then never answered (the
    /// answer is lost: a crash or a cut after Keystone committed).
    pub hang_after_next_write: bool,
    /// This many successful writes are answered, then one is applied and never
    /// answered (as `hang_after_next_write`).
    pub hang_after_writes: Option<usize>,
    /// The next write is refused with 400 and a message that echoes the user's
    /// password (as Keystone's validation errors echo refused values).
    pub echo_next: bool,
    /// Every write's answer leaves up to this long after the write was applied
    /// (as Keystone's does: applied in one order, answered in another).
    pub answer_jitter: Option<std::time::Duration>,
    /// Kinds without a natural key, by kind: ID -> entity.
    pub unnamed: HashMap<&'static str, BTreeMap<String, Value>>,
    /// The paths of the reads received, in order.
    pub reads: Vec<String>,
    /// Lists answer at most this many entities, flagged `truncated`.
    pub list_limit: Option<usize>,
    /// The same for one collection (`users`), before `list_limit`.
    pub list_limits: HashMap<String, usize>,
    /// Reads of paths starting with one of these are refused with 403 (a
    /// service account without the role to read them).
    pub refused_reads: Vec<String>,
    /// The next reads are answered these statuses, one each (a site that
    /// failed for a moment while read).
    pub fail_next_reads: Vec<u16>,
    /// The paths of reads answered by `fail_next_reads` or `refused_reads`.
    pub failed_reads: Vec<String>,
    /// Collections whose list (and, of kinds without a natural key, whose
    /// members) are answered with JSON that is not what was asked for.
    pub garbled: HashSet<String>,
    /// While set, reads wait until it holds `true` (a slow state read, opened
    /// by the test when it has done what it does meanwhile).
    pub reads_wait: Option<tokio::sync::watch::Receiver<bool>>,
    /// When set, only reads of this path wait on `reads_wait`.
    pub reads_wait_path: Option<String>,
    /// While set, writes wait until it holds `true` (a site that stopped
    /// answering, opened by the test); `writes_waiting` counts them.
    pub writes_wait: Option<tokio::sync::watch::Receiver<bool>>,
    pub writes_waiting: usize,
    /// Identity providers (`OS-FEDERATION`), by ID.
    pub idps: BTreeMap<String, Value>,
    /// Federation protocols, by `<provider>/<protocol>`.
    pub protocols: BTreeMap<String, Value>,
}

/// A project acting as a domain as the projects API shows it.
fn as_project(domain: &Value) -> Value {
    let mut p = domain.clone();
    p["is_domain"] = json!(true);
    p["domain_id"] = Value::Null;
    p["parent_id"] = Value::Null;
    p
}

/// Kinds without a natural key the fake keeps: (collection, kind, JSON key of a
/// create's body and answer).
pub const UNNAMED: [(&str, &str, &str); 7] = [
    ("credentials", "credential", "credential"),
    ("policies", "policy", "policy"),
    ("services", "service", "service"),
    ("endpoints", "endpoint", "endpoint"),
    ("regions", "region", "region"),
    ("limits", "limit", "limits"),
    ("registered_limits", "registered_limit", "registered_limits"),
];

/// Fields that identify a limit or registered limit (Keystone keeps them unique).
fn unique_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "limit" => &[
            "project_id",
            "domain_id",
            "service_id",
            "region_id",
            "resource_name",
        ],
        "registered_limit" => &["service_id", "region_id", "resource_name"],
        _ => &[],
    }
}

pub struct FakeSite {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<SiteState>>,
    pub admin_password: String,
}

fn kind_of(coll: &str) -> Option<&'static str> {
    kinds()
        .into_iter()
        .find(|(c, _)| *c == coll)
        .map(|(_, k)| k)
}

impl FakeSite {
    pub async fn start(admin_password: &str) -> FakeSite {
        let mut st = SiteState::default();
        for (_, kind) in kinds() {
            st.entities.insert(kind, BTreeMap::new());
        }
        st.entities.get_mut("domain").unwrap().insert(
            "default".into(),
            json!({"id": "default", "name": "Default", "enabled": true}),
        );
        let project = new_id();
        st.entities.get_mut("project").unwrap().insert(
            project.clone(),
            json!({"id": project, "name": "admin", "domain_id": "default", "enabled": true}),
        );
        let admin = new_id();
        st.entities.get_mut("user").unwrap().insert(
            admin.clone(),
            json!({"id": admin, "name": "admin", "domain_id": "default", "enabled": true}),
        );
        st.passwords.insert(admin.clone(), admin_password.into());
        for role in ["admin", "member", "reader"] {
            let id = new_id();
            st.entities.get_mut("role").unwrap().insert(
                id.clone(),
                json!({"id": id, "name": role, "domain_id": null}),
            );
        }
        let state = Arc::new(Mutex::new(st));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(handle).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeSite {
            addr,
            state,
            admin_password: admin_password.into(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn fail_next(&self, statuses: &[u16]) {
        self.state
            .lock()
            .unwrap()
            .fail_next
            .extend_from_slice(statuses);
    }

    /// Forgets every token issued (as a restarted Keystone with new keys would).
    pub fn revoke_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    pub fn creates(&self) -> usize {
        self.state.lock().unwrap().creates.values().sum()
    }

    /// Create requests received for a collection (`users`), answered or not.
    pub fn create_requests(&self, collection: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .create_requests
            .get(collection)
            .copied()
            .unwrap_or(0)
    }

    /// The names of a collection's create requests, in the order received.
    pub fn create_order(&self, collection: &str) -> Vec<String> {
        let prefix = format!("{collection} ");
        self.state
            .lock()
            .unwrap()
            .create_order
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }

    pub fn creates_of(&self, kind: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .creates
            .get(kind)
            .copied()
            .unwrap_or(0)
    }

    /// Reads received of this path.
    pub fn reads_of(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .reads
            .iter()
            .filter(|p| *p == path)
            .count()
    }

    pub fn writes(&self) -> usize {
        self.state.lock().unwrap().writes
    }

    /// The entities of a kind without a natural key.
    pub fn unnamed(&self, kind: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.unnamed
            .get(kind)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// One field of an entity with a natural key, by name.
    pub fn field_of(&self, kind: &str, name: &str, field: &str) -> Value {
        let st = self.state.lock().unwrap();
        st.entities[kind]
            .values()
            .find(|e| e["name"] == name)
            .map(|e| e[field].clone())
            .unwrap_or(Value::Null)
    }

    /// Whether a grant exists (`projects/{p}/users/{u}/roles/{r}`, ...).
    pub fn has_grant(&self, key: &str) -> bool {
        self.state.lock().unwrap().grants.contains(key)
    }

    pub fn has_member(&self, group: &str, user: &str) -> bool {
        let key = (group.to_string(), user.to_string());
        self.state.lock().unwrap().members.contains(&key)
    }

    pub fn id_of(&self, kind: &str, name: &str) -> Option<String> {
        let st = self.state.lock().unwrap();
        st.entities[kind]
            .values()
            .find(|e| e["name"] == name)
            .map(|e| e["id"].as_str().unwrap().to_string())
    }

    /// The site's identity data by natural key: comparable across sites.
    pub fn snapshot(&self) -> BTreeSet<String> {
        let st = self.state.lock().unwrap();
        let name = |kind: &str, id: &str| -> String {
            match st.entities[kind].get(id) {
                Some(e) => match e["domain_id"].as_str() {
                    Some(d) if kind != "domain" => {
                        let dn = st.entities["domain"]
                            .get(d)
                            .map(|x| x["name"].as_str().unwrap_or("?").to_string());
                        format!(
                            "{}@{}",
                            e["name"].as_str().unwrap_or("?"),
                            dn.unwrap_or_else(|| "?".into())
                        )
                    }
                    _ => e["name"].as_str().unwrap_or("?").to_string(),
                },
                None => format!("<missing {kind}>"),
            }
        };
        let mut out = BTreeSet::new();
        for (_, kind) in kinds() {
            for (id, e) in &st.entities[kind] {
                let mut line = format!("{kind} {}", name(kind, id));
                for field in ["description", "email", "enabled", "tags"] {
                    if let Some(v) = e.get(field) {
                        line.push_str(&format!(" {field}={v}"));
                    }
                }
                if let Some(p) = e.get("default_project_id").and_then(Value::as_str) {
                    line.push_str(&format!(" default_project={}", name("project", p)));
                }
                out.insert(line);
            }
        }
        for g in &st.grants {
            // projects/<id>/users/<id>/roles/<id>[/inherited]
            let parts: Vec<&str> = g.split('/').collect();
            let target_kind = match parts[0] {
                "projects" => "project",
                "domains" => "domain",
                _ => "system",
            };
            let actor_kind = if parts[2] == "users" || parts[1] == "users" {
                "user"
            } else {
                "group"
            };
            let (target, actor, role) = if parts[0] == "system" {
                (
                    "all".to_string(),
                    name(actor_kind, parts[2]),
                    name("role", parts[4]),
                )
            } else {
                (
                    name(target_kind, parts[1]),
                    name(actor_kind, parts[3]),
                    name("role", parts[5]),
                )
            };
            let inherited = if g.ends_with("inherited") {
                " inherited"
            } else {
                ""
            };
            out.insert(format!(
                "grant {role} to {actor_kind} {actor} on {target_kind} {target}{inherited}"
            ));
        }
        for (g, u) in &st.members {
            out.insert(format!(
                "member {} in {}",
                name("user", u),
                name("group", g)
            ));
        }
        for (p, i) in &st.implied {
            out.insert(format!(
                "implied {} -> {}",
                name("role", p),
                name("role", i)
            ));
        }
        for (id, idp) in &st.idps {
            let mut fields = idp.clone();
            let domain = fields["domain_id"].as_str().map(|d| name("domain", d));
            fields["domain_id"] = json!(domain);
            out.insert(format!("identity_provider {id} {fields}"));
        }
        out
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    if body.is_null() {
        return status.into_response();
    }
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    reply(
        status,
        json!({"error": {"code": status.as_u16(), "title": "Fake", "message": message}}),
    )
}

async fn handle(State(state): State<Arc<Mutex<SiteState>>>, req: Request) -> Response {
    let write = req.method() != Method::GET && req.uri().path() != "/v3/auth/tokens";
    if req.method() == Method::GET {
        let failed = {
            let mut st = state.lock().unwrap();
            let failed = (!st.fail_next_reads.is_empty()).then(|| st.fail_next_reads.remove(0));
            if failed.is_some() {
                st.failed_reads.push(req.uri().path().to_string());
            }
            failed
        };
        if let Some(code) = failed {
            return error(StatusCode::from_u16(code).unwrap(), "injected failure");
        }
        let refused = {
            let mut st = state.lock().unwrap();
            let refused = st
                .refused_reads
                .iter()
                .any(|p| req.uri().path().starts_with(p.as_str()));
            if refused {
                st.failed_reads.push(req.uri().path().to_string());
            }
            refused
        };
        if refused {
            return error(
                StatusCode::FORBIDDEN,
                "You are not authorized to perform the requested action.",
            );
        }
        let wait = {
            let mut st = state.lock().unwrap();
            st.reads.push(req.uri().path().to_string());
            let this_path = st
                .reads_wait_path
                .as_deref()
                .is_none_or(|p| p == req.uri().path());
            st.reads_wait.clone().filter(|_| this_path)
        };
        if let Some(mut open) = wait {
            let _ = open.wait_for(|open| *open).await;
        }
    }
    if write {
        let wait = {
            let mut st = state.lock().unwrap();
            let wait = st.writes_wait.clone();
            st.writes_waiting += usize::from(wait.is_some());
            wait
        };
        if let Some(mut open) = wait {
            let _ = open.wait_for(|open| *open).await;
        }
    }
    let held = if write {
        state.lock().unwrap().hold_next.take()
    } else {
        None
    };
    if let Some(d) = held {
        let state = state.clone();
        let late = tokio::spawn(async move {
            tokio::time::sleep(d).await;
            let (method, path) = (req.method().clone(), req.uri().path().to_string());
            let resp = handle_now(state.clone(), req).await;
            let line = format!("{method} {path} {} (held)", resp.status().as_u16());
            state.lock().unwrap().journal.push(line);
            state.lock().unwrap().held_done += 1;
            resp
        });
        return late.await.unwrap();
    }
    let delay = if write {
        state.lock().unwrap().delay_next.take()
    } else {
        None
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = handle_now(state.clone(), req).await;
    if write {
        let line = format!("{method} {path} {}", resp.status().as_u16());
        state.lock().unwrap().journal.push(line);
    }
    let jitter = if write {
        state.lock().unwrap().answer_jitter
    } else {
        None
    };
    if let Some(max) = jitter {
        let r = u128::from_le_bytes(*uuid::Uuid::new_v4().as_bytes());
        tokio::time::sleep(max.mul_f64((r % 1000) as f64 / 1000.0)).await;
    }
    let hang = write && resp.status().is_success() && {
        let mut st = state.lock().unwrap();
        let counted = match st.hang_after_writes {
            Some(0) => {
                st.hang_after_writes = None;
                true
            }
            Some(n) => {
                st.hang_after_writes = Some(n - 1);
                false
            }
            None => false,
        };
        std::mem::take(&mut st.hang_after_next_write) || counted
    };
    if hang {
        std::future::pending::<()>().await;
    }
    resp
}

async fn handle_now(state: Arc<Mutex<SiteState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = parts.uri.path().to_string();
    let query: HashMap<String, String> = parts
        .uri
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect()
        })
        .unwrap_or_default();
    let mut st = state.lock().unwrap();
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();

    if let Some(code) = st.fail_all {
        return error(StatusCode::from_u16(code).unwrap(), "injected outage");
    }
    if parts.method == Method::POST && path == "/v3/auth/tokens" {
        return issue_token(&mut st, &body);
    }
    let caller = parts
        .headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| st.tokens.get(t).cloned());
    let authed = caller.is_some();
    let token_domain = caller.flatten();
    if !authed {
        return error(
            StatusCode::UNAUTHORIZED,
            "The request you have made requires authentication.",
        );
    }
    if parts.method != Method::GET {
        if std::mem::take(&mut st.echo_next) {
            let pw = body["user"]["password"].as_str().unwrap_or_default();
            return error(
                StatusCode::BAD_REQUEST,
                &format!("Invalid input for field 'password': '{pw}' is too short."),
            );
        }
        if let Some(code) = st.refuse_explicit_domain_id {
            if parts.method == Method::POST
                && path == "/v3/domains"
                && !body["domain"]["explicit_domain_id"].is_null()
            {
                *st.create_requests.entry("domains".into()).or_default() += 1;
                let message = if code == 400 {
                    "Invalid input for field 'domain': Additional properties are not allowed \
                     ('explicit_domain_id' was unexpected)"
                } else {
                    "An unexpected error prevented the server from fulfilling your request."
                };
                return error(StatusCode::from_u16(code).unwrap(), message);
            }
        }
        let write = format!("{} {path}", parts.method);
        if let Some(code) = st.fail_writes_to.get(&write).copied() {
            *st.refused_writes.entry(write).or_default() += 1;
            return error(
                StatusCode::from_u16(code).unwrap(),
                "An unexpected error prevented the server from fulfilling your request. \
                 (sqlite3.OperationalError) database is locked",
            );
        }
        if !st.fail_next.is_empty() {
            let code = st.fail_next.remove(0);
            return error(StatusCode::from_u16(code).unwrap(), "injected failure");
        }
        st.writes += 1;
        if parts.method == Method::POST && segs.len() == 2 && segs[0] == "v3" {
            *st.create_requests.entry(segs[1].to_string()).or_default() += 1;
            let name = body
                .as_object()
                .and_then(|o| o.values().next())
                .and_then(|e| e["name"].as_str())
                .unwrap_or_default()
                .to_string();
            st.create_order.push(format!("{} {name}", segs[1]));
        }
    }
    let exists = |st: &SiteState, kind: &str, id: &str| {
        st.entities.get(kind).is_some_and(|m| m.contains_key(id))
    };

    match (parts.method.clone(), segs.as_slice()) {
        (Method::GET, ["v3", "role_assignments"]) => {
            let items: Vec<Value> = st
                .grants
                .iter()
                .map(|g| {
                    let p: Vec<&str> = g.split('/').collect();
                    let actor = |seg: &str, id: &str| {
                        if seg == "users" {
                            ("user", id.to_string())
                        } else {
                            ("group", id.to_string())
                        }
                    };
                    if p[0] == "system" {
                        let (ak, aid) = actor(p[1], p[2]);
                        json!({"role": {"id": p[4]}, ak: {"id": aid},
                               "scope": {"system": {"all": true}}})
                    } else {
                        let (ak, aid) = actor(p[2], p[3]);
                        let tk = if p[0] == "projects" {
                            "project"
                        } else {
                            "domain"
                        };
                        let mut scope = json!({ tk: {"id": p[1]} });
                        if g.ends_with("/inherited") {
                            scope["OS-INHERIT:inherited_to"] = json!("projects");
                        }
                        json!({"role": {"id": p[5]}, ak: {"id": aid}, "scope": scope})
                    }
                })
                .filter(|a| {
                    query
                        .get("role.id")
                        .is_none_or(|r| a["role"]["id"].as_str() == Some(r.as_str()))
                })
                .collect();
            let limit = st.list_limit.unwrap_or(usize::MAX);
            let truncated = items.len() > limit;
            let items: Vec<Value> = items.into_iter().take(limit).collect();
            reply(
                StatusCode::OK,
                json!({"role_assignments": items, "truncated": truncated}),
            )
        }
        (m, ["v3", "domains", d, "config"]) => {
            if !exists(&st, "domain", d) {
                return error(StatusCode::NOT_FOUND, "Could not find domain.");
            }
            let d = d.to_string();
            match m {
                Method::GET => match st.configs.get(&d) {
                    Some(c) => reply(StatusCode::OK, json!({"config": c})),
                    None => error(StatusCode::NOT_FOUND, "Could not find Domain Config."),
                },
                Method::PUT if body["config"].is_object() => {
                    if st.configs.contains_key(&d) {
                        return error(StatusCode::CONFLICT, "Domain config exists.");
                    }
                    st.configs.insert(d, body["config"].clone());
                    reply(StatusCode::CREATED, json!({"config": body["config"]}))
                }
                Method::PATCH if body["config"].is_object() => {
                    let Some(c) = st.configs.get_mut(&d) else {
                        return error(StatusCode::NOT_FOUND, "Could not find Domain Config.");
                    };
                    for (group, options) in body["config"].as_object().unwrap() {
                        for (k, v) in options.as_object().into_iter().flatten() {
                            c[group.as_str()][k.as_str()] = v.clone();
                        }
                    }
                    let out = c.clone();
                    reply(StatusCode::OK, json!({"config": out}))
                }
                Method::DELETE => match st.configs.remove(&d) {
                    Some(_) => reply(StatusCode::NO_CONTENT, Value::Null),
                    None => error(StatusCode::NOT_FOUND, "Could not find Domain Config."),
                },
                _ => error(StatusCode::BAD_REQUEST, "Invalid input"),
            }
        }
        (Method::GET, ["v3", "groups", g, "users"]) => {
            if !exists(&st, "group", g) {
                return error(StatusCode::NOT_FOUND, "Could not find group.");
            }
            let users: Vec<Value> = st
                .members
                .iter()
                .filter(|(gg, _)| gg == g)
                .filter_map(|(_, u)| st.entities["user"].get(u).cloned())
                .collect();
            reply(StatusCode::OK, json!({"users": users}))
        }
        (Method::GET, ["v3", "roles", p, "implies"]) => {
            let Some(prior) = st.entities["role"].get(*p).cloned() else {
                return error(StatusCode::NOT_FOUND, "Could not find role.");
            };
            let implies: Vec<Value> = st
                .implied
                .iter()
                .filter(|(pp, _)| pp == p)
                .filter_map(|(_, i)| st.entities["role"].get(i).cloned())
                .collect();
            reply(
                StatusCode::OK,
                json!({"role_inference": {"prior_role": prior, "implies": implies}}),
            )
        }
        (Method::GET, ["v3", coll]) if kind_of(coll).is_some() => {
            let kind = kind_of(coll).unwrap();
            let items: Vec<Value> = st.entities[kind]
                .values()
                .filter(|e| {
                    query
                        .get("name")
                        .is_none_or(|n| e["name"].as_str() == Some(n.as_str()))
                })
                .filter(|e| {
                    query
                        .get("domain_id")
                        .is_none_or(|d| e["domain_id"].as_str() == Some(d.as_str()))
                })
                .cloned()
                .collect();
            // As Keystone with `list_limit` set: the first ones, and a flag.
            let limit = st
                .list_limits
                .get(*coll)
                .copied()
                .or(st.list_limit)
                .unwrap_or(usize::MAX);
            let truncated = items.len() > limit;
            let items: Vec<Value> = items.into_iter().take(limit).collect();
            reply(
                StatusCode::OK,
                json!({ *coll: items, "truncated": truncated }),
            )
        }
        (Method::GET, ["v3", "projects", id])
            if !exists(&st, "project", id) && exists(&st, "domain", id) =>
        {
            reply(
                StatusCode::OK,
                json!({"project": as_project(&st.entities["domain"][*id])}),
            )
        }
        (Method::GET, ["v3", coll, id]) if kind_of(coll).is_some() => {
            let kind = kind_of(coll).unwrap();
            match st.entities[kind].get(*id) {
                Some(e) => reply(StatusCode::OK, json!({ kind: e })),
                None => error(
                    StatusCode::NOT_FOUND,
                    &format!("Could not find {kind}: {id}."),
                ),
            }
        }
        (Method::POST, ["v3", coll]) if kind_of(coll).is_some() => {
            let kind = kind_of(coll).unwrap();
            let Some(mut entity) = body.get(kind).cloned().filter(Value::is_object) else {
                return error(StatusCode::BAD_REQUEST, "Invalid input");
            };
            let Some(name) = entity["name"].as_str().map(str::to_string) else {
                return error(StatusCode::BAD_REQUEST, "name is required");
            };
            // A project acting as a domain is a domain, as in Keystone: it
            // gets an ID of this site's, and the domain API shows it.
            if kind == "project" && entity["is_domain"] == json!(true) {
                if st.entities["domain"]
                    .values()
                    .any(|d| d["name"] == name.as_str())
                {
                    st.conflicts += 1;
                    return error(
                        StatusCode::CONFLICT,
                        "Conflict occurred attempting to store project - Duplicate entry.",
                    );
                }
                let id = new_id();
                let mut domain = entity.clone();
                for field in ["is_domain", "domain_id", "parent_id"] {
                    domain.as_object_mut().unwrap().remove(field);
                }
                domain["id"] = json!(id);
                if domain.get("enabled").is_none() {
                    domain["enabled"] = json!(true);
                }
                *st.creates.entry("domain".to_string()).or_default() += 1;
                st.entities
                    .get_mut("domain")
                    .unwrap()
                    .insert(id, domain.clone());
                return reply(StatusCode::CREATED, json!({"project": as_project(&domain)}));
            }
            let domain = match kind {
                "domain" => None,
                "role" => entity["domain_id"].as_str().map(str::to_string),
                // Without one, the domain of the caller's token scope.
                _ => Some(
                    entity["domain_id"]
                        .as_str()
                        .map(str::to_string)
                        .or_else(|| token_domain.clone())
                        .unwrap_or_else(|| "default".to_string()),
                ),
            };
            if let Some(d) = &domain {
                if !exists(&st, "domain", d) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        &format!("Could not find domain: {d}."),
                    );
                }
            }
            let duplicate = st.entities[kind].values().any(|e| {
                e["name"] == name.as_str() && e["domain_id"].as_str() == domain.as_deref()
            });
            if duplicate {
                st.conflicts += 1;
                return error(
                    StatusCode::CONFLICT,
                    &format!("Conflict occurred attempting to store {kind} - Duplicate entry."),
                );
            }
            let id = match (
                kind,
                entity.get("explicit_domain_id").and_then(Value::as_str),
            ) {
                ("domain", Some(explicit)) => explicit.to_string(),
                _ => new_id(),
            };
            let obj = entity.as_object_mut().unwrap();
            obj.remove("explicit_domain_id");
            let password = obj.remove("password");
            obj.insert("id".into(), json!(id));
            // Keystone's default.
            if matches!(kind, "domain" | "project" | "user") {
                obj.entry("enabled").or_insert(json!(true));
            }
            if kind != "domain" {
                obj.insert("domain_id".into(), json!(domain));
            }
            if kind == "user" {
                let expired = password.is_some() && st.change_password_upon_first_use;
                obj.insert(
                    "password_expires_at".into(),
                    if expired {
                        json!("2000-01-01T00:00:00.000000")
                    } else {
                        Value::Null
                    },
                );
            }
            if let Some(Value::String(pw)) = password {
                st.passwords.insert(id.clone(), pw);
            }
            *st.creates.entry(kind.to_string()).or_default() += 1;
            st.entities
                .get_mut(kind)
                .unwrap()
                .insert(id.clone(), entity.clone());
            reply(StatusCode::CREATED, json!({ kind: entity }))
        }
        (Method::PATCH, ["v3", coll, id]) if kind_of(coll).is_some() => {
            let mut kind = kind_of(coll).unwrap();
            let Some(changes) = body.get(kind).and_then(Value::as_object).cloned() else {
                return error(StatusCode::BAD_REQUEST, "Invalid input");
            };
            // A project acting as a domain, updated through the projects API.
            if kind == "project" && !exists(&st, "project", id) && exists(&st, "domain", id) {
                kind = "domain";
            }
            if changes.get("id").is_some_and(|v| v != id) {
                return error(StatusCode::BAD_REQUEST, "Cannot change ID");
            }
            // A rename to a name another entity has in its domain: 409, as
            // Keystone answers it.
            if let (Some(name), Some(current)) =
                (changes.get("name"), st.entities[kind].get(*id).cloned())
            {
                let clash = st.entities[kind].values().any(|e| {
                    e["id"] != *id && e["name"] == *name && e["domain_id"] == current["domain_id"]
                });
                if clash {
                    return error(
                        StatusCode::CONFLICT,
                        &format!("Conflict occurred attempting to store {kind} - duplicate name."),
                    );
                }
            }
            let st_first_use = st.change_password_upon_first_use;
            let Some(entity) = st.entities.get_mut(kind).unwrap().get_mut(*id) else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("Could not find {kind}: {id}."),
                );
            };
            let mut password = None;
            for (k, v) in changes {
                if k == "password" {
                    password = v.as_str().map(str::to_string);
                } else {
                    entity[k] = v;
                }
            }
            if kind == "user" && password.is_some() {
                entity["password_expires_at"] = if st_first_use {
                    json!("2000-01-01T00:00:00.000000")
                } else {
                    Value::Null
                };
            }
            let out = entity.clone();
            if let Some(pw) = password {
                st.passwords.insert(id.to_string(), pw);
            }
            if kind_of(coll) != Some(kind) {
                return reply(StatusCode::OK, json!({"project": as_project(&out)}));
            }
            reply(StatusCode::OK, json!({ kind: out }))
        }
        (Method::DELETE, ["v3", coll, id]) if kind_of(coll).is_some() => {
            let mut kind = kind_of(coll).unwrap();
            if kind == "project" && !exists(&st, "project", id) && exists(&st, "domain", id) {
                kind = "domain";
            }
            if st.entities.get_mut(kind).unwrap().remove(*id).is_none() {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("Could not find {kind}: {id}."),
                );
            }
            let id = id.to_string();
            st.grants.retain(|g| !g.contains(&id));
            st.members.retain(|(g, u)| *g != id && *u != id);
            st.implied.retain(|(p, i)| *p != id && *i != id);
            // As Keystone does: a user's credentials go with the user.
            if kind == "user" {
                if let Some(creds) = st.unnamed.get_mut("credential") {
                    creds.retain(|_, c| c["user_id"] != id.as_str());
                }
            }
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        (Method::POST, ["v3", "users", id, "password"]) => {
            let (Some(new), Some(old)) = (
                body["user"]["password"].as_str(),
                body["user"]["original_password"].as_str(),
            ) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "password and original_password are required",
                );
            };
            if !exists(&st, "user", id) {
                return error(StatusCode::NOT_FOUND, "Could not find user.");
            }
            if st.passwords.get(*id).map(String::as_str) != Some(old) {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "The request you have made requires authentication.",
                );
            }
            st.passwords.insert(id.to_string(), new.to_string());
            if let Some(u) = st.entities.get_mut("user").and_then(|m| m.get_mut(*id)) {
                u["password_expires_at"] = Value::Null;
            }
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        // Checks, as Keystone answers them: 204 when it exists, else 404.
        (Method::GET | Method::HEAD, ["v3", "groups", g, "users", u]) => {
            let key = (g.to_string(), u.to_string());
            check_answer(st.members.contains(&key))
        }
        (Method::GET | Method::HEAD, rest) if grant_key(rest).is_some() => {
            let (key, _) = grant_key(rest).unwrap();
            check_answer(st.grants.contains(&key))
        }
        (Method::GET, ["v3", "roles", p, "implies", i]) => {
            let key = (p.to_string(), i.to_string());
            if st.implied.contains(&key) {
                reply(
                    StatusCode::OK,
                    json!({"role_inference": {"prior_role": {"id": p}, "implies": {"id": i}}}),
                )
            } else {
                error(StatusCode::NOT_FOUND, "No such inference.")
            }
        }
        (m, ["v3", "groups", g, "users", u]) if m == Method::PUT || m == Method::DELETE => {
            if !exists(&st, "group", g) || !exists(&st, "user", u) {
                return error(StatusCode::NOT_FOUND, "Could not find group or user.");
            }
            let key = (g.to_string(), u.to_string());
            if m == Method::PUT {
                st.members.insert(key);
            } else if !st.members.remove(&key) {
                return error(StatusCode::NOT_FOUND, "User is not a member.");
            }
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        (m, ["v3", "roles", p, "implies", i]) if m == Method::PUT || m == Method::DELETE => {
            if !exists(&st, "role", p) || !exists(&st, "role", i) {
                return error(StatusCode::NOT_FOUND, "Could not find role.");
            }
            let key = (p.to_string(), i.to_string());
            if m == Method::PUT {
                st.implied.insert(key);
                reply(
                    StatusCode::CREATED,
                    json!({"role_inference": {"prior_role": {"id": p}, "implies": {"id": i}}}),
                )
            } else if st.implied.remove(&key) {
                reply(StatusCode::NO_CONTENT, Value::Null)
            } else {
                error(StatusCode::NOT_FOUND, "No such inference.")
            }
        }
        (m, rest) if (m == Method::PUT || m == Method::DELETE) && grant_key(rest).is_some() => {
            let (key, refs) = grant_key(rest).unwrap();
            if refs.iter().any(|(kind, id)| !exists(&st, kind, id)) {
                return error(
                    StatusCode::NOT_FOUND,
                    "Could not find an entity of the grant.",
                );
            }
            if m == Method::PUT {
                st.grants.insert(key);
            } else if !st.grants.remove(&key) {
                return error(StatusCode::NOT_FOUND, "No such grant.");
            }
            reply(StatusCode::NO_CONTENT, Value::Null)
        }
        // EC2 keys, as Keystone makes them: access and secret its own, kept
        // as a credential of type ec2 whose ID is the access key's SHA-256.
        (Method::POST, ["v3", "users", u, "credentials", "OS-EC2"]) => {
            if !exists(&st, "user", u) {
                return error(StatusCode::NOT_FOUND, "Could not find user.");
            }
            let (access, secret) = (new_id(), new_id());
            let tenant = body["tenant_id"].clone();
            // As Keystone writes it (Python's json.dumps).
            let blob =
                format!(r#"{{"access": "{access}", "secret": "{secret}", "trust_id": null}}"#);
            let id = sha256_hex(&access);
            st.unnamed.entry("credential").or_default().insert(
                id.clone(),
                json!({"id": id, "type": "ec2", "user_id": u, "project_id": tenant,
                       "blob": blob}),
            );
            *st.creates.entry("credential".to_string()).or_default() += 1;
            reply(
                StatusCode::CREATED,
                json!({"credential": {"access": access, "secret": secret, "user_id": u,
                                      "tenant_id": tenant, "trust_id": null}}),
            )
        }
        (Method::GET, ["v3", "users", u, "credentials", "OS-EC2"]) => {
            let keys: Vec<Value> = st
                .unnamed
                .get("credential")
                .into_iter()
                .flat_map(|t| t.values())
                .filter(|c| c["type"] == "ec2" && c["user_id"] == *u)
                .filter_map(|c| {
                    serde_json::from_str::<Value>(c["blob"].as_str()?)
                        .ok()
                        .map(|b| {
                            json!({"access": b["access"], "secret": b["secret"], "user_id": u,
                           "tenant_id": c["project_id"]})
                        })
                })
                .collect();
            reply(StatusCode::OK, json!({"credentials": keys}))
        }
        (Method::DELETE, ["v3", "users", _, "credentials", "OS-EC2", access]) => {
            let id = sha256_hex(access);
            match st.unnamed.get_mut("credential").and_then(|t| t.remove(&id)) {
                Some(_) => reply(StatusCode::NO_CONTENT, Value::Null),
                None => error(StatusCode::NOT_FOUND, "Could not find credential."),
            }
        }
        (Method::POST, ["v3", "credentials"]) if body["credential"]["type"] == "ec2" => {
            let mut item = body["credential"].clone();
            let Some(access) = item["blob"]
                .as_str()
                .and_then(|b| serde_json::from_str::<Value>(b).ok())
                .and_then(|b| b["access"].as_str().map(str::to_string))
            else {
                return error(StatusCode::BAD_REQUEST, "Invalid blob in credential");
            };
            let id = sha256_hex(&access);
            let table = st.unnamed.entry("credential").or_default();
            if table.contains_key(&id) {
                return error(StatusCode::CONFLICT, "Duplicate ID.");
            }
            item["id"] = json!(id);
            table.insert(id, item.clone());
            *st.creates.entry("credential".to_string()).or_default() += 1;
            reply(StatusCode::CREATED, json!({"credential": item}))
        }
        // Identity providers, as Keystone keeps them: one created without
        // a domain gets one Keystone makes for it (ID and name a new UUID).
        (Method::GET, ["v3", "OS-FEDERATION", "identity_providers"]) => {
            let items: Vec<Value> = st.idps.values().cloned().collect();
            reply(StatusCode::OK, json!({"identity_providers": items}))
        }
        (m, ["v3", "OS-FEDERATION", "identity_providers", id]) => {
            let id = id.to_string();
            match m {
                Method::GET => match st.idps.get(&id) {
                    Some(i) => reply(StatusCode::OK, json!({"identity_provider": i})),
                    None => error(StatusCode::NOT_FOUND, "Could not find identity provider."),
                },
                Method::PUT => {
                    if st.idps.contains_key(&id) {
                        st.conflicts += 1;
                        return error(StatusCode::CONFLICT, "Duplicate entry.");
                    }
                    let mut idp = body["identity_provider"].clone();
                    if !idp.is_object() {
                        idp = json!({});
                    }
                    // A remote ID belongs to one provider.
                    let taken = idp["remote_ids"].as_array().into_iter().flatten().any(|r| {
                        st.idps
                            .values()
                            .any(|i| i["remote_ids"].as_array().is_some_and(|x| x.contains(r)))
                    });
                    if taken {
                        st.conflicts += 1;
                        return error(StatusCode::CONFLICT, "Duplicate remote ID.");
                    }
                    match idp["domain_id"].as_str() {
                        Some(d) if !exists(&st, "domain", d) => {
                            return error(
                                StatusCode::NOT_FOUND,
                                &format!("Could not find domain: {d}."),
                            );
                        }
                        Some(_) => {}
                        None => {
                            let d = new_id();
                            st.entities.get_mut("domain").unwrap().insert(
                                d.clone(),
                                json!({"id": d, "name": d, "enabled": true,
                                       "description": format!(
                                           "Auto generated federated domain for Identity Provider: {id}")}),
                            );
                            idp["domain_id"] = json!(d);
                        }
                    }
                    idp["id"] = json!(id);
                    if idp.get("remote_ids").is_none() {
                        idp["remote_ids"] = json!([]);
                    }
                    *st.creates
                        .entry("identity_provider".to_string())
                        .or_default() += 1;
                    st.idps.insert(id, idp.clone());
                    reply(StatusCode::CREATED, json!({"identity_provider": idp}))
                }
                Method::PATCH => {
                    let Some(changes) = body["identity_provider"].as_object().cloned() else {
                        return error(StatusCode::BAD_REQUEST, "Invalid input");
                    };
                    let Some(idp) = st.idps.get_mut(&id) else {
                        return error(StatusCode::NOT_FOUND, "Could not find identity provider.");
                    };
                    for (k, v) in changes {
                        idp[k] = v;
                    }
                    let out = idp.clone();
                    reply(StatusCode::OK, json!({"identity_provider": out}))
                }
                Method::DELETE => match st.idps.remove(&id) {
                    Some(_) => reply(StatusCode::NO_CONTENT, Value::Null),
                    None => error(StatusCode::NOT_FOUND, "Could not find identity provider."),
                },
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed."),
            }
        }
        // A provider's protocols, as Keystone keeps them: made by PUT at
        // their URL (409 when there), changed by PATCH.
        (Method::GET, ["v3", "OS-FEDERATION", "identity_providers", idp, "protocols"]) => {
            let prefix = format!("{idp}/");
            let items: Vec<Value> = st
                .protocols
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v.clone())
                .collect();
            reply(StatusCode::OK, json!({"protocols": items}))
        }
        (m, ["v3", "OS-FEDERATION", "identity_providers", idp, "protocols", id]) => {
            let key = format!("{idp}/{id}");
            match m {
                Method::GET => match st.protocols.get(&key) {
                    Some(p) => reply(StatusCode::OK, json!({"protocol": p})),
                    None => error(StatusCode::NOT_FOUND, "Could not find federation protocol."),
                },
                Method::PUT => {
                    if !st.idps.contains_key(*idp) {
                        return error(StatusCode::NOT_FOUND, "Could not find identity provider.");
                    }
                    if st.protocols.contains_key(&key) {
                        st.conflicts += 1;
                        return error(StatusCode::CONFLICT, "Duplicate entry.");
                    }
                    let Some(mut protocol) = body["protocol"].as_object().cloned() else {
                        return error(StatusCode::BAD_REQUEST, "Invalid input");
                    };
                    protocol.insert("id".into(), json!(id));
                    let protocol = Value::Object(protocol);
                    *st.creates
                        .entry("federation_protocol".to_string())
                        .or_default() += 1;
                    st.protocols.insert(key, protocol.clone());
                    reply(StatusCode::CREATED, json!({"protocol": protocol}))
                }
                Method::PATCH => {
                    let Some(changes) = body["protocol"].as_object().cloned() else {
                        return error(StatusCode::BAD_REQUEST, "Invalid input");
                    };
                    let Some(protocol) = st.protocols.get_mut(&key) else {
                        return error(StatusCode::NOT_FOUND, "Could not find federation protocol.");
                    };
                    for (k, v) in changes {
                        protocol[k] = v;
                    }
                    let out = protocol.clone();
                    reply(StatusCode::OK, json!({"protocol": out}))
                }
                Method::DELETE => match st.protocols.remove(&key) {
                    Some(_) => reply(StatusCode::NO_CONTENT, Value::Null),
                    None => error(StatusCode::NOT_FOUND, "Could not find federation protocol."),
                },
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed."),
            }
        }
        (m, ["v3", coll, rest @ ..]) if UNNAMED.iter().any(|(c, _, _)| c == coll) => {
            let (_, kind, key) = *UNNAMED.iter().find(|(c, _, _)| c == coll).unwrap();
            unnamed(&mut st, m, kind, key, rest.first().copied(), &query, &body)
        }
        _ => error(StatusCode::NOT_FOUND, "The resource could not be found."),
    }
}

/// Hex SHA-256, as Keystone names an EC2 credential by its access key.
fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn coll_of(kind: &str) -> &'static str {
    UNNAMED.iter().find(|(_, k, _)| *k == kind).unwrap().0
}

/// Kinds without a natural key: IDs of the site's own (regions keep a given
/// `id`), lists filtered by any query field, limits unique by their scope.
fn unnamed(
    st: &mut SiteState,
    method: Method,
    kind: &'static str,
    key: &str,
    id: Option<&str>,
    query: &HashMap<String, String>,
    body: &Value,
) -> Response {
    let single = key == kind;
    let garbled = st.garbled.contains(coll_of(kind));
    let table = st.unnamed.entry(kind).or_default();
    match (method, id) {
        (Method::GET, None) => {
            let items: Vec<Value> = table
                .values()
                .filter(|e| {
                    query
                        .iter()
                        .all(|(k, v)| e[k.as_str()].as_str() == Some(v.as_str()))
                })
                .cloned()
                .collect();
            let coll = coll_of(kind);
            if garbled {
                return reply(StatusCode::OK, json!({"unexpected": "shape"}));
            }
            match st.list_limits.get(coll).copied() {
                Some(limit) if items.len() > limit => {
                    let items: Vec<Value> = items.into_iter().take(limit).collect();
                    reply(StatusCode::OK, json!({ coll: items, "truncated": true }))
                }
                _ => reply(StatusCode::OK, json!({ coll: items })),
            }
        }
        (Method::GET, Some(_)) if garbled => reply(StatusCode::OK, json!({"unexpected": "shape"})),
        (Method::GET, Some(id)) => match table.get(id) {
            Some(e) => reply(StatusCode::OK, json!({ kind: e })),
            None => error(
                StatusCode::NOT_FOUND,
                &format!("Could not find {kind}: {id}."),
            ),
        },
        (Method::POST, None) => {
            let items: Vec<Value> = if single {
                body.get(key)
                    .cloned()
                    .filter(Value::is_object)
                    .into_iter()
                    .collect()
            } else {
                body.get(key)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            };
            if items.is_empty() {
                return error(StatusCode::BAD_REQUEST, "Invalid input");
            }
            let mut made = Vec::new();
            for mut item in items {
                let fields = unique_fields(kind);
                if !fields.is_empty()
                    && table
                        .values()
                        .any(|e| fields.iter().all(|f| e.get(*f) == item.get(*f)))
                {
                    return error(StatusCode::CONFLICT, "Duplicate entry.");
                }
                if (kind == "limit" || kind == "registered_limit") && item.get("id").is_some() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "Additional properties are not allowed ('id' was unexpected)",
                    );
                }
                let id = match (kind, item.get("id").and_then(Value::as_str)) {
                    ("region", Some(given)) => given.to_string(),
                    _ => new_id(),
                };
                if table.contains_key(&id) {
                    return error(StatusCode::CONFLICT, "Duplicate ID.");
                }
                item["id"] = json!(id);
                table.insert(id, item.clone());
                made.push(item);
            }
            *st.creates.entry(kind.to_string()).or_default() += 1;
            if single {
                reply(StatusCode::CREATED, json!({ kind: made[0] }))
            } else {
                reply(StatusCode::CREATED, json!({ key: made }))
            }
        }
        (Method::PATCH, Some(id)) => {
            let changes = body
                .get(kind)
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let Some(e) = table.get_mut(id) else {
                return error(
                    StatusCode::NOT_FOUND,
                    &format!("Could not find {kind}: {id}."),
                );
            };
            for (k, v) in changes {
                if k != "id" {
                    e[k] = v;
                }
            }
            let out = e.clone();
            reply(StatusCode::OK, json!({ kind: out }))
        }
        (Method::DELETE, Some(id)) => match table.remove(id) {
            Some(_) => reply(StatusCode::NO_CONTENT, Value::Null),
            None => error(
                StatusCode::NOT_FOUND,
                &format!("Could not find {kind}: {id}."),
            ),
        },
        _ => error(StatusCode::NOT_FOUND, "The resource could not be found."),
    }
}

/// The answer to a check of whether something exists.
fn check_answer(exists: bool) -> Response {
    if exists {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "Not found.")
    }
}

/// A grant path's canonical key and the entities it names.
fn grant_key(segs: &[&str]) -> Option<(String, Vec<(&'static str, String)>)> {
    let actor = |s: &str| match s {
        "users" => Some("user"),
        "groups" => Some("group"),
        _ => None,
    };
    // Project and domain grants, direct or inherited (OS-INHERIT), and system grants.
    let (segs, inherited) = match segs {
        ["v3", "OS-INHERIT", rest @ .., "inherited_to_projects"] => (rest, "/inherited"),
        ["v3", rest @ ..] => (rest, ""),
        _ => return None,
    };
    match segs {
        [t @ ("projects" | "domains"), tid, a, aid, "roles", rid] => {
            let tk = if *t == "projects" {
                "project"
            } else {
                "domain"
            };
            let ak = actor(a)?;
            let refs = vec![
                (tk, tid.to_string()),
                (ak, aid.to_string()),
                ("role", rid.to_string()),
            ];
            Some((format!("{t}/{tid}/{a}/{aid}/roles/{rid}{inherited}"), refs))
        }
        ["system", a, aid, "roles", rid] if inherited.is_empty() => {
            let ak = actor(a)?;
            Some((
                format!("system/{a}/{aid}/roles/{rid}"),
                vec![(ak, aid.to_string()), ("role", rid.to_string())],
            ))
        }
        _ => None,
    }
}

fn issue_token(st: &mut SiteState, body: &Value) -> Response {
    let user = &body["auth"]["identity"]["password"]["user"];
    let password = user["password"].as_str().unwrap_or_default();
    let found = st.entities["user"].values().find(|u| {
        let by_id = user["id"].as_str().is_some_and(|id| u["id"] == id);
        let domain_ok = match (&user["domain"]["id"], &user["domain"]["name"]) {
            (Value::String(d), _) => u["domain_id"] == d.as_str(),
            (_, Value::String(n)) => st.entities["domain"]
                .values()
                .any(|d| d["name"] == n.as_str() && u["domain_id"] == d["id"]),
            _ => false,
        };
        by_id || (user["name"].as_str().is_some_and(|n| u["name"] == n) && domain_ok)
    });
    let Some(found) = found.cloned() else {
        return error(
            StatusCode::UNAUTHORIZED,
            "The request you have made requires authentication.",
        );
    };
    let uid = found["id"].as_str().unwrap().to_string();
    let expired = found["password_expires_at"]
        .as_str()
        .is_some_and(|at| at < "2026");
    if st.passwords.get(&uid).map(String::as_str) != Some(password)
        || found["enabled"] == false
        || expired
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "The request you have made requires authentication.",
        );
    }
    let token = format!("tok-{}", new_id());
    st.tokens.insert(token.clone(), None);
    let mut answer = json!({"token": {
        "expires_at": "2999-01-01T00:00:00.000000Z",
        "user": {"id": uid, "name": found["name"], "domain": {"id": found["domain_id"]}},
    }});
    // A project scope shows the project and the user's roles there, as
    // Keystone's token does.
    let scope = &body["auth"]["scope"]["project"];
    let domain_of = |d: &Value| match (&d["id"], &d["name"]) {
        (Value::String(id), _) => Some(id.clone()),
        (_, Value::String(n)) => st.entities["domain"]
            .values()
            .find(|x| x["name"] == n.as_str())
            .and_then(|x| x["id"].as_str().map(str::to_string)),
        _ => None,
    };
    let project = st.entities["project"]
        .values()
        .find(|p| {
            scope["id"].as_str().is_some_and(|id| p["id"] == id)
                || (scope["name"].as_str().is_some_and(|n| p["name"] == n)
                    && domain_of(&scope["domain"]).is_some_and(|d| p["domain_id"] == d.as_str()))
        })
        .cloned();
    if let Some(p) = project {
        let pid = p["id"].as_str().unwrap_or_default();
        let prefix = format!("projects/{pid}/users/{uid}/roles/");
        let roles: Vec<Value> = st
            .grants
            .iter()
            .filter_map(|g| g.strip_prefix(&prefix))
            .map(|r| json!({"id": r}))
            .collect();
        answer["token"]["project"] = json!({"id": pid, "domain": {"id": p["domain_id"]}});
        st.tokens
            .insert(token.clone(), p["domain_id"].as_str().map(str::to_string));
        answer["token"]["roles"] = json!(roles);
    }
    let mut resp = reply(StatusCode::CREATED, answer);
    resp.headers_mut()
        .insert("x-subject-token", token.parse().unwrap());
    resp
}

/// Decodes `%XX` escapes in a query value.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
