//! Seeded, model-based chaos test of the repair path. Each seed is one run
//! against a central and an edge with fake sites that behave like Keystone
//! (their own IDs, 409 on a duplicate name or a rename onto one, cascading
//! deletes): random writes through the gateway (creates, renames, updates,
//! password changes, deletes, memberships, grants), random writes straight to
//! the edge's site (drift: entities and memberships of its own, deletes and
//! changes of central's), ops made to fail at the edge, resyncs with and
//! without prune (some with writes racing them, some with the edge or central
//! killed in the middle), drift audits (some during writes), re-drives, and
//! kills of the edge and of central. The sites are then compared by natural
//! key, as a model of what the audit must say:
//!
//! - a drift audit on a quiet system reports exactly the differences there are;
//! - the audit says in sync (no difference, nothing out of sync) only if the
//!   sites are equal;
//! - after a resync, the edge differs from central only by what it made itself
//!   (nothing with prune): nothing central deleted is back, nothing is doubled;
//! - after a final repair the sites are equal, every user's password from the
//!   op log works at the edge (or the user is listed as needing one), and a
//!   write to each of central's entities reaches the same entity at the edge
//!   (central's IDs map to the edge's entities of the same key).
//!
//! `SYNCGATE_REPAIR_SEEDS=N` runs N seeds (default 200 in the suite, 2000 in
//! the ignored long run), `SYNCGATE_REPAIR_SEED=S` one seed; a failure prints
//! its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fake_site::FakeSite;
use crate::fault_run::Rng;
use crate::resync::{can_log_in, found, post};
use crate::sync::{admin_token, sync_env, SyncEnv};

const USERS: [&str; 5] = ["u0", "u1", "u2", "u3", "u4"];
const GROUPS: [&str; 3] = ["g0", "g1", "g2"];
const PROJECTS: [&str; 4] = ["p0", "p1", "p2", "p3"];
/// Names only the edge's site makes (never written through the gateway).
const EDGE_USERS: [&str; 2] = ["xu0", "xu1"];
const EDGE_GROUPS: [&str; 2] = ["xg0", "xg1"];
/// Seeds run at once in one test.
const AT_ONCE: usize = 32;

struct Run {
    seed: u64,
    rng: Rng,
    /// Each user's password as the op log last set it.
    passwords: HashMap<String, String>,
    /// What happened, for a failure's report.
    log: Vec<String>,
    writes: usize,
}

impl Run {
    fn note(&mut self, line: String) {
        if std::env::var_os("SYNCGATE_REPAIR_TRACE").is_some() {
            eprintln!("{:?} seed {}: {line}", Instant::now(), self.seed);
        }
        self.log.push(line);
    }

    fn pick<'a>(&mut self, names: &[&'a str]) -> &'a str {
        names[self.rng.below(names.len())]
    }

    fn fail(&self, what: &str) -> ! {
        panic!(
            "repair run seed {} failed: {what}\nsteps:\n{}",
            self.seed,
            self.log.join("\n")
        );
    }
}

fn path_of(kind: &str) -> &'static str {
    match kind {
        "user" => "users",
        "group" => "groups",
        _ => "projects",
    }
}

/// One random write through the gateway; `renames` allows renames (a failed
/// rename leaves a mapped entity under its old name, which the model below
/// does not follow).
async fn gateway_write(env: &SyncEnv, run: &mut Run, renames: bool) {
    let central = &env.central_site;
    let id = |kind: &str, name: &str| central.id_of(kind, name);
    let n = run.writes;
    run.writes += 1;
    let (method, path, body): (&str, String, Option<Value>) = match run.rng.below(12) {
        0 | 1 => {
            let name = run.pick(&USERS);
            let mut user = json!({"name": name, "description": format!("d{n}")});
            if run.rng.chance(60) {
                user["password"] = json!(format!("pw-{}-{n}", run.seed));
            }
            ("POST", "/v3/users".into(), Some(json!({ "user": user })))
        }
        2 => {
            let name = run.pick(&GROUPS);
            let group = json!({"group": {"name": name, "description": format!("d{n}")}});
            ("POST", "/v3/groups".into(), Some(group))
        }
        3 => {
            let name = run.pick(&PROJECTS);
            let project = json!({"project": {"name": name, "description": format!("d{n}")}});
            ("POST", "/v3/projects".into(), Some(project))
        }
        4 => {
            let kind = ["user", "group", "project"][run.rng.below(3)];
            let names: &[&str] = match kind {
                "user" => &USERS,
                "group" => &GROUPS,
                _ => &PROJECTS,
            };
            let name = run.pick(names);
            let Some(i) = id(kind, name) else { return };
            let body = json!({ kind: {"description": format!("d{n}")} });
            ("PATCH", format!("/v3/{}/{i}", path_of(kind)), Some(body))
        }
        5 if renames => {
            let (from, to) = (run.pick(&PROJECTS), run.pick(&PROJECTS));
            let Some(i) = id("project", from) else { return };
            let body = json!({"project": {"name": to}});
            ("PATCH", format!("/v3/projects/{i}"), Some(body))
        }
        6 => {
            let name = run.pick(&USERS);
            let Some(i) = id("user", name) else { return };
            let body = json!({"user": {"password": format!("pw-{}-{n}", run.seed)}});
            ("PATCH", format!("/v3/users/{i}"), Some(body))
        }
        7 => {
            let kind = ["user", "group", "project"][run.rng.below(3)];
            let names: &[&str] = match kind {
                "user" => &USERS,
                "group" => &GROUPS,
                _ => &PROJECTS,
            };
            let name = run.pick(names);
            let Some(i) = id(kind, name) else { return };
            ("DELETE", format!("/v3/{}/{i}", path_of(kind)), None)
        }
        8 | 9 => {
            let (u, g) = (run.pick(&USERS), run.pick(&GROUPS));
            let (Some(u), Some(g)) = (id("user", u), id("group", g)) else {
                return;
            };
            let method = if run.rng.chance(70) { "PUT" } else { "DELETE" };
            (method, format!("/v3/groups/{g}/users/{u}"), None)
        }
        _ => {
            let (u, p) = (run.pick(&USERS), run.pick(&PROJECTS));
            let (Some(u), Some(p)) = (id("user", u), id("project", p)) else {
                return;
            };
            let role = id("role", "member").expect("the member role");
            let method = if run.rng.chance(70) { "PUT" } else { "DELETE" };
            (
                method,
                format!("/v3/projects/{p}/users/{u}/roles/{role}"),
                None,
            )
        }
    };
    let (status, answer) = env.write(method, &path, body.clone()).await;
    run.note(format!(
        "gateway {method} {path} {} -> {status}",
        short(&body)
    ));
    if status >= 500 {
        run.fail(&format!("the gateway answered {status}: {answer}"));
    }
    // The passwords the op log carries, as the resync will find them.
    if (200..300).contains(&status) {
        if let Some(user) = body.as_ref().map(|b| &b["user"]) {
            let name = match method {
                "POST" => user["name"].as_str().map(str::to_string),
                _ => answer["user"]["name"].as_str().map(str::to_string),
            };
            if let (Some(name), Some(pw)) = (name, user["password"].as_str()) {
                run.passwords.insert(name, pw.to_string());
            }
        }
        if method == "DELETE" && path.starts_with("/v3/users/") {
            let gone: Vec<String> = run
                .passwords
                .keys()
                .filter(|n| central.id_of("user", n).is_none())
                .cloned()
                .collect();
            for n in gone {
                run.passwords.remove(&n);
            }
        }
    }
}

fn short(body: &Option<Value>) -> String {
    body.as_ref().map(Value::to_string).unwrap_or_default()
}

/// A write straight to a site; the status.
async fn at_site(env: &SyncEnv, site: &FakeSite, method: &str, path: &str, body: Value) -> u16 {
    let token = admin_token(&env.http, &site.url(), &site.admin_password).await;
    let mut req = env
        .http
        .request(method.parse().unwrap(), format!("{}{path}", site.url()))
        .header("x-auth-token", token);
    if !body.is_null() {
        req = req.json(&body);
    }
    req.send().await.unwrap().status().as_u16()
}

/// One random write straight to the edge's site (drift).
async fn edge_write(env: &SyncEnv, run: &mut Run) {
    let site = &env.edges[0].site;
    let n = run.writes;
    run.writes += 1;
    let (method, path, body) = match run.rng.below(6) {
        0 => {
            let name = run.pick(&EDGE_USERS);
            (
                "POST",
                "/v3/users".to_string(),
                json!({"user": {"name": name}}),
            )
        }
        1 => {
            let name = run.pick(&EDGE_GROUPS);
            (
                "POST",
                "/v3/groups".to_string(),
                json!({"group": {"name": name}}),
            )
        }
        2 => {
            let u = run.pick(&EDGE_USERS);
            let all: Vec<&str> = GROUPS.iter().chain(EDGE_GROUPS.iter()).copied().collect();
            let g = run.pick(&all);
            let (Some(u), Some(g)) = (site.id_of("user", u), site.id_of("group", g)) else {
                return;
            };
            ("PUT", format!("/v3/groups/{g}/users/{u}"), Value::Null)
        }
        3 => {
            let kind = ["user", "group", "project"][run.rng.below(3)];
            let names: &[&str] = match kind {
                "user" => &USERS,
                "group" => &GROUPS,
                _ => &PROJECTS,
            };
            let name = run.pick(names);
            let Some(i) = site.id_of(kind, name) else {
                return;
            };
            ("DELETE", format!("/v3/{}/{i}", path_of(kind)), Value::Null)
        }
        4 => {
            let kind = ["user", "group", "project"][run.rng.below(3)];
            let names: &[&str] = match kind {
                "user" => &USERS,
                "group" => &GROUPS,
                _ => &PROJECTS,
            };
            let name = run.pick(names);
            let Some(i) = site.id_of(kind, name) else {
                return;
            };
            let body = json!({ kind: {"description": format!("edge {n}")} });
            ("PATCH", format!("/v3/{}/{i}", path_of(kind)), body)
        }
        _ => {
            let (u, g) = (run.pick(&USERS), run.pick(&GROUPS));
            let (Some(u), Some(g)) = (site.id_of("user", u), site.id_of("group", g)) else {
                return;
            };
            ("DELETE", format!("/v3/groups/{g}/users/{u}"), Value::Null)
        }
    };
    let status = at_site(env, site, method, &path, body.clone()).await;
    run.note(format!("edge {method} {path} {body} -> {status}"));
}

/// Central's and the edge's states by natural key, as the audit names them:
/// (kind, key) -> compared fields.
fn model(site: &FakeSite) -> BTreeMap<(String, String), String> {
    let st = site.state.lock().unwrap();
    let name = |kind: &str, id: &str| -> String {
        st.entities[kind]
            .get(id)
            .and_then(|e| e["name"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let mut out = BTreeMap::new();
    for kind in ["user", "group", "project"] {
        for e in st.entities[kind].values() {
            let mut fields: BTreeMap<&str, Value> = BTreeMap::new();
            for (k, v) in e.as_object().unwrap() {
                if !["id", "links", "domain_id", "parent_id", "name"].contains(&k.as_str())
                    && !v.is_null()
                {
                    fields.insert(k, v.clone());
                }
            }
            let key = format!("Default/{}", e["name"].as_str().unwrap_or("?"));
            out.insert((kind.to_string(), key), json!(fields).to_string());
        }
    }
    for (g, u) in &st.members {
        let key = format!(
            "Default/{} in Default/{}",
            name("user", u),
            name("group", g)
        );
        out.insert(("group_membership".to_string(), key), String::new());
    }
    for g in &st.grants {
        let parts: Vec<&str> = g.split('/').collect();
        if let ["projects", p, "users", u, "roles", r] = parts.as_slice() {
            let key = format!(
                "{} to user Default/{} on project Default/{}",
                name("role", r),
                name("user", u),
                name("project", p)
            );
            out.insert(("grant".to_string(), key), String::new());
        }
    }
    out
}

/// What a drift audit should report: (category, kind, key).
fn differences(env: &SyncEnv) -> BTreeSet<(String, String, String)> {
    let central = model(&env.central_site);
    let edge = model(&env.edges[0].site);
    let mut out = BTreeSet::new();
    for (k, fields) in &central {
        match edge.get(k) {
            None => out.insert(("missing_at_edge".into(), k.0.clone(), k.1.clone())),
            Some(f) if f != fields => out.insert(("differs".into(), k.0.clone(), k.1.clone())),
            Some(_) => false,
        };
    }
    for k in edge.keys().filter(|k| !central.contains_key(*k)) {
        out.insert(("only_at_edge".into(), k.0.clone(), k.1.clone()));
    }
    out
}

/// Waits until the edge has applied every op central logged.
async fn settle(env: &SyncEnv, run: &Run) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = env.last_seq().await;
        let row = env.audit("/v1/edges/e1").await;
        if row["cursor"].as_i64() >= Some(last) && row["lag_ops"] == 0 {
            return;
        }
        if Instant::now() >= deadline {
            run.fail(&format!("the edge never applied up to op {last}: {row:#}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a drift audit on a quiet system: it must report exactly the
/// differences there are, and the audit says in sync only if there are none.
async fn check_drift(env: &SyncEnv, run: &mut Run) {
    settle(env, run).await;
    run.note("settled".into());
    let d = audit_drift(env, run).await;
    let reported: BTreeSet<(String, String, String)> = found(&d)
        .into_iter()
        .filter(|(_, kind, _, _)| {
            ["user", "group", "project", "group_membership", "grant"].contains(&kind.as_str())
        })
        .map(|(c, k, key, _)| (c, k, key))
        .collect();
    let others: Vec<_> = found(&d)
        .into_iter()
        .filter(|(_, kind, _, _)| {
            !["user", "group", "project", "group_membership", "grant"].contains(&kind.as_str())
        })
        .collect();
    let real = differences(env);
    if reported != real || !others.is_empty() {
        run.fail(&format!(
            "the drift audit reported {reported:#?}\n(and {others:?})\nthe sites differ by {real:#?}"
        ));
    }
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    let says_in_sync = reported.is_empty() && oos["out_of_sync"] == json!([]);
    if says_in_sync && !real.is_empty() {
        run.fail(&format!(
            "the audit says in sync; the sites differ by {real:#?}"
        ));
    }
    run.note(format!("drift: {} differences", reported.len()));
}

async fn audit_drift(env: &SyncEnv, run: &Run) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        let (status, body) = post(env, "/v1/drift/run?edge=e1").await;
        // A resync central restarted may still hold the edge's slot; a
        // central just started says its sync client is not up yet (503).
        if ![409, 503].contains(&status) || Instant::now() >= deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if status != 202 {
        run.fail(&format!("drift audit not started: {status} {body}"));
    }
    loop {
        let d = env.audit("/v1/drift?edge=e1").await;
        match d["runs"][0]["state"].as_str() {
            Some("done") => return d,
            Some("failed") => run.fail(&format!("drift audit failed: {d:#}")),
            _ => {}
        }
        if Instant::now() >= deadline {
            run.fail(&format!("drift audit never ended: {d:#}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a resync; true if it started.
async fn start_resync(env: &SyncEnv, run: &mut Run, prune: bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = post(env, &format!("/v1/edges/e1/resync?prune={prune}")).await;
        match status {
            202 => return true,
            409 | 503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            _ => run.fail(&format!("resync not started: {status} {body}")),
        }
    }
}

/// Waits for the edge's resync to end; its row, or why it failed.
async fn resync_end(env: &SyncEnv, run: &Run) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let row = env.audit("/v1/edges/e1").await;
        match row["resync"]["phase"].as_str() {
            Some("done") => return Ok(row),
            Some("failed") => return Err(row["resync"]["error"].to_string()),
            _ => {}
        }
        if Instant::now() >= deadline {
            run.fail(&format!("resync never ended: {row:#}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A resync (or a repair) run to its end: started again if a fault failed it.
async fn resync(env: &mut SyncEnv, run: &mut Run, prune: bool) {
    start_resync(env, run, prune).await;
    let fault = run.rng.below(10);
    match fault {
        // Writes race the resync.
        0..=3 => {
            for _ in 0..1 + run.rng.below(4) {
                gateway_write(env, run, true).await;
                run.note("  (that write raced the resync)".into());
            }
        }
        // The edge or central is killed in the middle.
        4 | 5 => {
            tokio::time::sleep(Duration::from_millis(run.rng.below(40) as u64)).await;
            run.note("  (kill -9 of the edge during the resync)".into());
            env.kill_edge(0).await;
            env.restart_edge(0).await;
        }
        6 => {
            tokio::time::sleep(Duration::from_millis(run.rng.below(40) as u64)).await;
            run.note("  (kill -9 of central during the resync)".into());
            env.kill_central_and_restart().await;
        }
        _ => {}
    }
    let mut row = resync_end(env, run).await;
    if let Err(why) = &row {
        // A fault may fail a run; the next one must succeed.
        run.note(format!("  resync failed ({why}); run again"));
        start_resync(env, run, prune).await;
        row = resync_end(env, run).await;
    }
    let row = match row {
        Ok(r) => r,
        Err(why) => run.fail(&format!("resync failed twice: {why}")),
    };
    run.note(format!("resync prune={prune}: {}", row["resync"]["result"]));
    // After it: the edge differs only by what it made itself.
    settle(env, run).await;
    let left: Vec<_> = differences(env)
        .into_iter()
        .filter(|(category, _, key)| prune || category != "only_at_edge" || !key.contains('x'))
        .collect();
    if !left.is_empty() {
        run.fail(&format!(
            "after a resync (prune={prune}) the sites differ by {left:#?}"
        ));
    }
}

/// Re-drives an op the edge has out of sync, if any: accepted or refused
/// with a reason, never an error.
async fn redrive(env: &SyncEnv, run: &mut Run) {
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    let rows = oos["out_of_sync"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return;
    }
    let seq = rows[run.rng.below(rows.len())]["seq"].as_i64().unwrap();
    // After a restart of central the edge may not have said hello yet: the
    // re-drive is refused 503 (it could not be delivered) until it has.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        let resp = env
            .http
            .post(format!("{}/v1/ops/{seq}/retry?edge=e1", env.admin))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status != 503 || Instant::now() >= deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    run.note(format!(
        "re-drive of op {seq} -> {status} {}",
        body["action"]
    ));
    if ![202, 409].contains(&status) {
        run.fail(&format!("re-drive answered {status}: {body}"));
    }
}

async fn episode(seed: u64) {
    if std::env::var_os("SYNCGATE_REPAIR_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("syncgate=debug"))
            .with_test_writer()
            .try_init();
    }
    let mut env = sync_env(&["e1"], None, |c| {
        c.sync.drift_interval = None;
    })
    .await;
    let mut run = Run {
        seed,
        rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        passwords: HashMap::new(),
        log: Vec::new(),
        writes: 0,
    };
    let steps = 10 + run.rng.below(10);
    for _ in 0..steps {
        match run.rng.below(100) {
            0..=37 => gateway_write(&env, &mut run, true).await,
            38..=51 => edge_write(&env, &mut run).await,
            52..=58 => {
                // The edge refuses the next op.
                settle(&env, &run).await;
                env.edges[0].site.fail_next(&[400]);
                run.note("the edge's site refuses its next write".into());
                gateway_write(&env, &mut run, false).await;
                settle(&env, &run).await;
                env.edges[0].site.state.lock().unwrap().fail_next.clear();
            }
            59..=69 => {
                let prune = run.rng.chance(50);
                resync(&mut env, &mut run, prune).await;
            }
            70..=77 => check_drift(&env, &mut run).await,
            78..=81 => {
                // An audit while writes go on: it ends, and leaves out what
                // they change.
                let writes = async {
                    for _ in 0..3 {
                        gateway_write(&env, &mut run, true).await;
                    }
                };
                let (d, ()) = tokio::join!(
                    async {
                        let (status, body) = post(&env, "/v1/drift/run?edge=e1").await;
                        (status, body)
                    },
                    writes
                );
                if ![202, 409, 503].contains(&d.0) {
                    run.fail(&format!("drift audit not started: {d:?}"));
                }
            }
            82..=88 => redrive(&env, &mut run).await,
            89..=94 => {
                run.note("kill -9 of the edge".into());
                env.kill_edge(0).await;
                env.restart_edge(0).await;
            }
            _ => {
                run.note("kill -9 of central".into());
                env.kill_central_and_restart().await;
            }
        }
    }

    // Quiet now: the audit must tell the truth, then a repair must heal.
    check_drift(&env, &mut run).await;
    resync(&mut env, &mut run, true).await;
    settle(&env, &run).await;
    let left = differences(&env);
    if !left.is_empty() {
        run.fail(&format!("after the repair the sites differ by {left:#?}"));
    }
    check_drift(&env, &mut run).await;
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    if oos["out_of_sync"] != json!([]) {
        run.fail(&format!("out of sync after the repair: {oos:#}"));
    }
    // Every password the op log set works at the edge, or is listed.
    let row = env.audit("/v1/edges/e1").await;
    let needing = row["needs_password"].to_string();
    for (user, password) in run.passwords.clone() {
        if env.central_site.id_of("user", &user).is_none() {
            continue;
        }
        let works = can_log_in(&env.edges[0].site, &user, &password).await;
        if !works && !needing.contains(&format!("\"{user}\"")) {
            run.fail(&format!(
                "{user}'s password from the op log does not work at the edge, and the user is \
                 not listed as needing one: {row:#}"
            ));
        }
    }
    // Central's IDs map to the edge's entities of the same key: a write to
    // each reaches the same entity there.
    for kind in ["user", "group", "project"] {
        let names: &[&str] = match kind {
            "user" => &USERS,
            "group" => &GROUPS,
            _ => &PROJECTS,
        };
        for name in names {
            if let Some(id) = env.central_site.id_of(kind, name) {
                let body = json!({ kind: {"description": format!("final {name}")} });
                let (status, answer) = env
                    .write("PATCH", &format!("/v3/{}/{id}", path_of(kind)), Some(body))
                    .await;
                if status != 200 {
                    run.fail(&format!("final write of {kind} {name}: {status} {answer}"));
                }
            }
        }
    }
    settle(&env, &run).await;
    let left = differences(&env);
    if !left.is_empty() {
        run.fail(&format!(
            "a write to each of central's entities did not reach the same one at the edge: \
             {left:#?}"
        ));
    }
    let oos = env.audit("/v1/out-of-sync?edge=e1").await;
    if oos["out_of_sync"] != json!([]) {
        run.fail(&format!("out of sync after the final writes: {oos:#}"));
    }
    env.shutdown().await;
}

async fn run_seeds(default: u64) {
    let seeds: Vec<u64> = match std::env::var("SYNCGATE_REPAIR_SEED") {
        Ok(s) => vec![s.parse().expect("SYNCGATE_REPAIR_SEED is a number")],
        Err(_) => {
            let n = std::env::var("SYNCGATE_REPAIR_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(default);
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                % 1_000_000
                * 10_000;
            (base..base + n).collect()
        }
    };
    println!(
        "repair run: seeds {}..={} (SYNCGATE_REPAIR_SEED=S replays one)",
        seeds[0],
        seeds[seeds.len() - 1]
    );
    let started = Instant::now();
    for chunk in seeds.chunks(AT_ONCE) {
        let runs: Vec<_> = chunk
            .iter()
            .map(|&seed| (seed, tokio::spawn(episode(seed))))
            .collect();
        for (seed, task) in runs {
            if let Err(e) = task.await {
                eprintln!(
                    "repair run: seed {seed} failed (SYNCGATE_REPAIR_SEED={seed} replays it)"
                );
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    println!(
        "repair run: {} seeds passed in {:.1}s",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_run() {
    run_seeds(200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long run: cargo nextest run --run-ignored only repair_run_long"]
async fn repair_run_long() {
    run_seeds(2000).await;
}
