//! The admin listener: health, readiness, metrics and the audit API over the op
//! log. The audit API needs the admin bearer token when one is configured; bodies
//! it shows have their secrets redacted.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::time::Duration;
use tracing::warn;

use crate::central::sync::{RedriveError, SyncCentral};
use crate::core::admin::{bearer_ok, unauthorized, ApiError};
use crate::core::Secret;
use crate::keystone::routes::known_kinds;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::redact;
use crate::store::{OpFilter, OpRow, OpState, Store};

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;
/// Rows `/v1/out-of-sync` answers unless `limit` says otherwise.
const DEFAULT_OUT_OF_SYNC: i64 = 1000;

pub struct Admin {
    pub store: Store,
    pub proxy: Arc<Proxy>,
    pub metrics: Arc<Metrics>,
    pub token: Option<Secret>,
    /// Central's sync, while this process does the leader's duties.
    pub sync: std::sync::RwLock<Option<Arc<SyncCentral>>>,
    pub edge_offline_after: Duration,
    /// A delivery unanswered for longer is `timed_out`.
    pub ack_timeout: Duration,
    /// Op-log retention's window and edge expiry (`--retention`, `--edge-expiry`).
    pub retention: Option<Duration>,
    pub edge_expiry: Option<Duration>,
    /// Set when a task of the gateway stopped: readiness fails from then on.
    pub failed: std::sync::Mutex<Option<String>>,
    /// Resyncs and drift audits, while this process does the leader's duties.
    pub resyncer: std::sync::RwLock<Option<Arc<crate::central::resync::Resyncer>>>,
    /// Sends what only the leader does to it, from a replica that does not lead.
    pub forwarder: reqwest::Client,
    /// Who holds the op log, as `/v1/status` shows it.
    pub holder: std::sync::Mutex<Holder>,
    /// When `/metrics` last read its gauges from the op log.
    pub gauges_read_at: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// This process's hold on the op log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Holder {
    /// `sqlite` or `postgresql`.
    pub engine: &'static str,
    /// The database, as shown (never a password).
    pub database: String,
    /// This process, as other processes see it (`host:pid`).
    pub process: String,
    /// Whether it holds the op log now (on SQLite, while it runs).
    pub held: bool,
    /// Since when (RFC 3339).
    pub since: Option<String>,
    /// On PostgreSQL: this replica's number, and whether it leads (the
    /// leader's duties: publishing, acks, resyncs, drift audits), at which
    /// epoch and since when.
    pub replica: Option<i32>,
    pub leads: bool,
    pub epoch: Option<i64>,
    pub leads_since: Option<String>,
    #[serde(skip)]
    pub leads_since_unix: i64,
}

impl Admin {
    /// Records whether this process holds the op log, since now when it had
    /// not (and the lock's epoch, on PostgreSQL).
    pub fn set_held(&self, held: bool, replica: Option<i32>) {
        let mut h = self.holder.lock().unwrap_or_else(|p| p.into_inner());
        if held && !h.held {
            h.since = Some(now_rfc3339());
        }
        h.held = held;
        if replica.is_some() {
            h.replica = replica;
        }
        self.metrics.oplog_held.set(i64::from(held));
    }

    /// Records that this process leads from now at `epoch` (`Some`), or no
    /// longer does (`None`), with the duties' sync and resyncer.
    pub fn set_leader(
        &self,
        duties: Option<(
            Option<i64>,
            Arc<SyncCentral>,
            Arc<crate::central::resync::Resyncer>,
        )>,
    ) {
        let leads = duties.is_some();
        {
            let mut h = self.holder.lock().unwrap_or_else(|p| p.into_inner());
            if leads && !h.leads {
                let now = std::time::SystemTime::now();
                h.leads_since = Some(humantime::format_rfc3339_millis(now).to_string());
                h.leads_since_unix = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
            }
            if !leads {
                h.leads_since = None;
                h.leads_since_unix = 0;
            }
            h.leads = leads;
            h.epoch = duties.as_ref().and_then(|d| d.0);
        }
        let (sync, resyncer) = match duties {
            Some((_, s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        *self.sync.write().unwrap_or_else(|p| p.into_inner()) = sync;
        *self.resyncer.write().unwrap_or_else(|p| p.into_inner()) = resyncer;
        self.metrics.leader.set(i64::from(leads));
        let (epoch, since) = {
            let h = self.holder.lock().unwrap_or_else(|p| p.into_inner());
            (h.epoch.unwrap_or(0), h.leads_since_unix)
        };
        self.metrics.leader_epoch.set(epoch);
        self.metrics.leader_since.set(since);
    }

    /// Central's sync, while this process leads.
    pub fn sync(&self) -> Option<Arc<SyncCentral>> {
        self.sync.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Resyncs and drift audits, while this process leads.
    pub fn resyncer(&self) -> Option<Arc<crate::central::resync::Resyncer>> {
        self.resyncer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn leads(&self) -> bool {
        self.holder.lock().unwrap_or_else(|p| p.into_inner()).leads
    }

    pub fn set_failed(&self, why: &str) {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    }

    fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    warn!(error = %e, "audit query failed");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the op log could not be read".into(),
    )
}

pub fn router(admin: Arc<Admin>) -> Router {
    // What only the leader does: a replica that does not lead sends it there.
    let actions = Router::new()
        .route("/v1/ops/{seq}/retry", axum::routing::post(retry_op))
        .route("/v1/ops/{seq}/skip", axum::routing::post(skip_op))
        .route("/v1/edges/{edge}/resync", axum::routing::post(resync_edge))
        .route("/v1/drift/run", axum::routing::post(run_drift))
        .route("/v1/drift/repair", axum::routing::post(repair_drift))
        .route_layer(middleware::from_fn_with_state(admin.clone(), to_leader));
    let audit = Router::new()
        .route("/v1/ops", get(list_ops))
        .route("/v1/ops/{seq}", get(get_op))
        .route("/v1/edges", get(list_edges))
        .route("/v1/edges/{edge}", get(get_edge))
        .route("/v1/drift", get(list_drift))
        .route("/v1/out-of-sync", get(out_of_sync))
        .route("/v1/status", get(status))
        .merge(actions)
        .route_layer(middleware::from_fn_with_state(admin.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(audit)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(admin)
}

async fn require_token(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if !bearer_ok(admin.token.as_ref(), req.headers()) {
        return unauthorized();
    }
    next.run(req).await
}

/// Marks a request one replica sent another as the leader.
const FORWARDED: &str = "x-syncgate-forwarded";
/// Marks the answer of a replica sent a request as the leader that does not
/// lead (the sender asks who does again).
const NOT_LEADER: &str = "x-syncgate-not-leader";

/// How long a request only the leader answers waits for one to be elected
/// (a leader that is gone is replaced within a few seconds).
const LEADER_WAIT: Duration = Duration::from_secs(10);

/// Sends a request only the leader answers to it, from a replica that does
/// not lead (PostgreSQL): as it came, with its token, to the admin API the
/// leader registered. On SQLite, or on the leader, it is answered here.
/// While no replica leads (an election under way, or this replica's duties
/// starting), it waits up to `LEADER_WAIT`.
async fn to_leader(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if admin.store.dialect() != crate::store::Dialect::Postgres || admin.leads() {
        return next.run(req).await;
    }
    // Sent here by another replica that took this one for the leader: not
    // sent on again (two replicas never pass a request back and forth).
    let forwarded = req.headers().contains_key(FORWARDED);
    let unavailable = |why: String| {
        let mut resp = ApiError(StatusCode::SERVICE_UNAVAILABLE, why).into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("2"));
        resp
    };
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError(StatusCode::BAD_REQUEST, "the body could not be read".into())
                .into_response()
        }
    };
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    let mut last = "no replica leads yet".to_string();
    loop {
        if admin.leads() {
            let req = Request::from_parts(parts, axum::body::Body::from(body));
            return next.run(req).await;
        }
        if forwarded {
            // The sender read who leads before this replica stopped leading:
            // it asks again (`NOT_LEADER`).
            let mut resp = unavailable(
                "this replica was sent a request for the leader and does not lead".into(),
            );
            resp.headers_mut()
                .insert(NOT_LEADER, header::HeaderValue::from_static("1"));
            return resp;
        }
        match admin.store.leader().await {
            Ok(crate::store::LeaderRow {
                admin_url: Some(url),
                holder: Some(holder),
                replica,
                ..
            }) if replica != admin.store.replica() => {
                let mut out = admin
                    .forwarder
                    .post(format!("{}{path}", url.trim_end_matches('/')))
                    .header(FORWARDED, "1");
                if let Some(auth) = &auth {
                    out = out.header(header::AUTHORIZATION, auth);
                }
                match out.body(body.clone()).send().await {
                    // It no longer leads: who does is read again.
                    Ok(answer) if answer.headers().contains_key(NOT_LEADER) => {
                        last = format!("the replica that led ({holder}) no longer does");
                    }
                    Ok(answer) => return from_leader(answer, &holder).await,
                    // Not taken by it (gone, and not replaced yet): again.
                    Err(e) if e.is_connect() => {
                        last = format!("the leader ({holder}) cannot be reached at its admin API");
                    }
                    Err(e) => {
                        warn!(leader = %holder, error = %e, "the leader's answer was lost");
                        return unavailable(format!(
                            "the request was sent to the leader ({holder}) and its answer was lost: check its outcome in the audit API"
                        ));
                    }
                }
            }
            // Nobody elected yet, or this replica and its duties starting.
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "cannot read who leads");
                last = "who leads cannot be read".into();
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return unavailable(format!(
                "this replica does not lead and {last}; retry shortly"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader's answer, as this replica gives it.
async fn from_leader(answer: reqwest::Response, holder: &str) -> Response {
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let kind = answer.headers().get(reqwest::header::CONTENT_TYPE).cloned();
    match answer.bytes().await {
        Ok(bytes) => {
            let mut resp = (status, bytes).into_response();
            if let Some(k) = kind.and_then(|k| header::HeaderValue::from_bytes(k.as_bytes()).ok()) {
                resp.headers_mut().insert(header::CONTENT_TYPE, k);
            }
            resp
        }
        Err(e) => {
            warn!(leader = %holder, error = %e, "the leader's answer was cut");
            ApiError(
                StatusCode::BAD_GATEWAY,
                format!("the leader ({holder}) took the request and its answer was cut: check its outcome in the audit API"),
            )
            .into_response()
        }
    }
}

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
    let (upstream, oplog) = tokio::join!(
        admin.proxy.upstream_reachable(),
        admin.store.check_writable()
    );
    // A replica without its presence on a shared op log takes no writes.
    let oplog_ok = oplog.is_ok() && admin.store.present();
    if let Err(e) = &oplog {
        warn!(error = %e, "readiness: op log not writable");
    }
    let failed = admin.failed();
    let status = if upstream && oplog_ok && failed.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "ready": status == StatusCode::OK,
        "upstream": if upstream { "reachable" } else { "unreachable" },
        "oplog": if oplog_ok { "writable" } else { "failing" },
    });
    if let Some(why) = failed {
        body["failed"] = json!(why);
    }
    (status, Json(body)).into_response()
}

/// What this central is: its version, and its hold on the op log.
async fn status(State(admin): State<Arc<Admin>>) -> Json<Value> {
    let holder = admin
        .holder
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut out = json!({
        "role": "central",
        "version": env!("CARGO_PKG_VERSION"),
        "op_log": holder,
    });
    if admin.store.dialect() == crate::store::Dialect::Postgres {
        // Who leads and which replicas run, as the database says.
        out["leader"] = match admin.store.leader().await {
            Ok(l) => json!(l),
            Err(e) => json!({"error": format!("cannot be read: {e}")}),
        };
        out["replicas"] = match admin.store.replicas().await {
            Ok(r) => json!(r),
            Err(e) => json!({"error": format!("cannot be read: {e}")}),
        };
    }
    Json(out)
}

async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    refresh_gauges(&admin).await;
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        admin.metrics.render(),
    )
        .into_response()
}

/// Gauges read from the op log are at most this old when scraped.
const GAUGES_FRESH_FOR: Duration = Duration::from_secs(1);
/// A scrape waits this long for the op log at most (a scrape that times out
/// would hide every metric, the op log's failures first).
const GAUGES_READ_WITHIN: Duration = Duration::from_secs(2);

/// Brings the sync gauges of `/metrics` up to date as a scrape asks for them
/// (unless read within `GAUGES_FRESH_FOR`; scrapes at once share one read):
/// the last seq, open intents, and each edge's cursor, watermark, lag and
/// deliveries, from index look-ups. Read only when scraped, the op log's
/// per-edge reads cost nothing between scrapes, however many edges there are.
/// Unreadable, the gauges keep their last values (the next scrape tries again).
async fn refresh_gauges(admin: &Admin) {
    use crate::metrics::EdgeLabel;
    let mut read_at = admin.gauges_read_at.lock().await;
    if read_at.is_some_and(|t| t.elapsed() < GAUGES_FRESH_FOR) {
        return;
    }
    {
        let m = &admin.metrics;
        let store = &admin.store;
        let offline_ms = admin.edge_offline_after.as_millis() as i64;
        let read = tokio::time::timeout(GAUGES_READ_WITHIN, async {
            tokio::try_join!(
                store.last_seq(),
                store.open_intents(),
                store.edges(),
                store.edge_delivery_counts(admin.ack_timeout),
                store.failed_resyncs(),
            )
        });
        let (last, open, edges, counts, failed) = match read.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "metrics: cannot read the op log; its gauges keep their last values");
                return;
            }
            Err(_) => {
                tracing::warn!(
                    within = ?GAUGES_READ_WITHIN,
                    "metrics: the op log did not answer in time; its gauges keep their last values"
                );
                return;
            }
        };
        m.last_seq.set(last);
        m.open_intents.set(open);
        for e in edges {
            let label = EdgeLabel { edge: e.id };
            m.edge_cursor.get_or_create(&label).set(e.cursor);
            m.edge_acked.get_or_create(&label).set(e.acked_seq);
            m.edge_lag_ops.get_or_create(&label).set(e.lag_ops);
            m.edge_lag_seconds.get_or_create(&label).set(e.lag_seconds);
            let online = e.silent_ms.is_some_and(|ms| ms <= offline_ms);
            m.edge_online.get_or_create(&label).set(i64::from(online));
            // From the op log: every replica says the same, a restart too.
            let failed = failed.contains(&label.edge);
            m.resync_failed.get_or_create(&label).set(i64::from(failed));
        }
        let mut total = crate::store::DeliveryCounts::default();
        for (edge, c) in counts {
            m.edge_out_of_sync
                .get_or_create(&EdgeLabel { edge })
                .set(c.failed + c.timed_out);
            total.pending += c.pending;
            total.failed += c.failed;
            total.timed_out += c.timed_out;
        }
        m.deliveries_pending.set(total.pending);
        m.deliveries_failed.set(total.failed);
        m.deliveries_timed_out.set(total.timed_out);
    }
    *read_at = Some(std::time::Instant::now());
}

fn parse_filter(params: &HashMap<String, String>) -> Result<OpFilter, ApiError> {
    let mut filter = OpFilter {
        after: 0,
        limit: DEFAULT_LIMIT,
        ..OpFilter::default()
    };
    for (key, value) in params {
        match key.as_str() {
            "after" => {
                filter.after = value
                    .parse()
                    .ok()
                    .filter(|n: &i64| *n >= 0)
                    .ok_or_else(|| {
                        bad_request(format!("'after' must be a seq (0 or more), got '{value}'"))
                    })?;
            }
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        bad_request(format!(
                            "'limit' must be between 1 and {MAX_LIMIT}, got '{value}'"
                        ))
                    })?;
            }
            "kind" => {
                let kinds = known_kinds();
                if !kinds.contains(&value.as_str()) {
                    return Err(bad_request(format!(
                        "unknown kind '{value}' (expected one of: {})",
                        kinds.join(", ")
                    )));
                }
                filter.kind = Some(value.clone());
            }
            "state" => {
                filter.state = Some(OpState::parse(value).ok_or_else(|| {
                    let states: Vec<_> = OpState::ALL.iter().map(|s| s.as_str()).collect();
                    bad_request(format!(
                        "unknown state '{value}' (expected one of: {})",
                        states.join(", ")
                    ))
                })?);
            }
            other => {
                return Err(bad_request(format!(
                    "unknown parameter '{other}' (expected after, limit, kind, state)"
                )))
            }
        }
    }
    Ok(filter)
}

async fn list_ops(
    State(admin): State<Arc<Admin>>,
    params: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| bad_request(format!("bad query string: {e}")))?;
    let filter = parse_filter(&params)?;
    let ops = admin.store.list_ops(&filter).await.map_err(internal)?;
    let next = (ops.len() as i64 == filter.limit)
        .then(|| ops.last().map(|o| o.seq))
        .flatten();
    let ops: Vec<Value> = ops.iter().map(op_json).collect();
    Ok(Json(json!({"ops": ops, "next": next})))
}

/// Why there is no op `seq`: pruned by retention (below the first op kept),
/// or never logged.
async fn no_op(admin: &Admin, seq: i64) -> ApiError {
    let why = match admin.store.first_seq().await {
        Ok(Some(first)) if seq < first && seq > 0 => format!(
            "op {seq} was pruned by op-log retention (--retention): the op log starts at {first}"
        ),
        _ => format!("no op with seq {seq}"),
    };
    ApiError(StatusCode::NOT_FOUND, why)
}

async fn get_op(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let seq = parse_seq(&seq)?;
    let Some(op) = admin.store.get_op(seq).await.map_err(internal)? else {
        return Err(no_op(&admin, seq).await);
    };
    let mut body = op_json(&op);
    let deliveries = admin
        .store
        .deliveries(seq, admin.ack_timeout)
        .await
        .map_err(internal)?;
    let secrets = op_secrets(op.body.as_deref());
    let deliveries: Vec<_> = deliveries
        .into_iter()
        .map(|mut d| {
            d.detail = d.detail.map(|t| redact::scrub(&t, &secrets));
            d
        })
        .collect();
    body["deliveries"] = serde_json::to_value(deliveries).expect("rows serialize");
    Ok(Json(body))
}

fn parse_seq(seq: &str) -> Result<i64, ApiError> {
    seq.parse()
        .map_err(|_| bad_request(format!("'{seq}' is not a seq")))
}

/// Only the named parameters; returns the first one's value.
fn only_params<'a>(
    params: &'a HashMap<String, String>,
    allowed: &[&str],
) -> Result<Option<&'a str>, ApiError> {
    for key in params.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(bad_request(format!(
                "unknown parameter '{key}' (expected {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(allowed
        .first()
        .and_then(|k| params.get(*k))
        .map(String::as_str))
}

async fn retry_op(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let seq = parse_seq(&seq)?;
    let edge = only_params(&params, &["edge"])?
        .ok_or_else(|| bad_request("'edge' is required: which edge re-applies the op"))?;
    let (op, sync) = op_and_sync(&admin, seq).await?;
    redriven(seq, edge, sync.redrive(&op, edge).await)
}

/// `POST /v1/ops/{seq}/skip?edge=E&by=NAME`: the edge passes over the op.
async fn skip_op(
    State(admin): State<Arc<Admin>>,
    Path(seq): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let seq = parse_seq(&seq)?;
    only_params(&params, &["edge", "by"])?;
    let edge = params
        .get("edge")
        .ok_or_else(|| bad_request("'edge' is required: which edge passes over the op"))?;
    let by = params.get("by").map_or("the admin API", String::as_str);
    if by.is_empty() || by.chars().count() > 64 || by.chars().any(char::is_control) {
        return Err(bad_request(
            "'by' names who asks for the skip: 1 to 64 characters, no control characters",
        ));
    }
    let (op, sync) = op_and_sync(&admin, seq).await?;
    redriven(seq, edge, sync.skip(&op, edge, by).await)
}

/// The op a re-drive or a skip is for, and the sync that sends it.
async fn op_and_sync(
    admin: &Admin,
    seq: i64,
) -> Result<(crate::store::OpRow, Arc<crate::central::sync::SyncCentral>), ApiError> {
    let Some(op) = admin.store.get_op(seq).await.map_err(internal)? else {
        return Err(no_op(admin, seq).await);
    };
    let Some(sync) = admin.sync() else {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "sync is not running yet".into(),
        ));
    };
    Ok((op, sync))
}

/// The answer to a re-drive or a skip.
fn redriven(
    seq: i64,
    edge: &str,
    done: Result<crate::central::sync::Redriven, RedriveError>,
) -> Result<Response, ApiError> {
    match done {
        Ok(done) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "seq": seq,
                "edge": edge,
                "action": done.action,
                "state": done.state,
                "message": done.message,
            })),
        )
            .into_response()),
        Err(RedriveError::NoEdge(e)) => {
            Err(ApiError(StatusCode::NOT_FOUND, format!("no edge '{e}'")))
        }
        Err(
            e @ (RedriveError::WouldUndo(_)
            | RedriveError::NotReached(_)
            | RedriveError::Refused(_)),
        ) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
        Err(e @ RedriveError::NotConnected(_)) => {
            Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
        }
        Err(RedriveError::Broker(e)) => {
            warn!(error = %e, "re-drive failed");
            Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the message could not be sent to the broker".into(),
            ))
        }
        Err(RedriveError::Internal(e)) => Err(internal(e)),
    }
}

async fn list_edges(State(admin): State<Arc<Admin>>) -> Result<Json<Value>, ApiError> {
    let offline_ms = admin.edge_offline_after.as_millis() as i64;
    // Two reads on two of the reader's connections, side by side.
    let (edges, retention) = tokio::join!(admin.store.edges(), retention_json(&admin));
    let edges: Vec<Value> = edges
        .map_err(internal)?
        .into_iter()
        .map(|e| edge_json(e, offline_ms))
        .collect();
    Ok(Json(json!({
        "edges": edges,
        "retention": retention?,
    })))
}

/// What retention keeps and why (`null` for the window: every op is kept).
async fn retention_json(admin: &Admin) -> Result<Value, ApiError> {
    let Some(window) = admin.retention else {
        let (first, last) =
            tokio::try_join!(admin.store.first_seq(), admin.store.last_seq()).map_err(internal)?;
        return Ok(json!({
            "window_seconds": null,
            "first_seq": first.unwrap_or(0),
            "last_seq": last,
        }));
    };
    let r = admin
        .store
        .retention(window, admin.edge_expiry)
        .await
        .map_err(internal)?;
    Ok(json!({
        "window_seconds": window.as_secs(),
        "edge_expiry_seconds": admin.edge_expiry.map(|e| e.as_secs()),
        "first_seq": r.first_seq,
        "last_seq": r.last_seq,
        "old_through": r.old_through,
        "prunable_through": r.prunable_through,
        "pinned_by": r.pinned_by,
        "expired_edges": r.expired_edges,
        "unseen_edges": r.unseen_edges,
    }))
}

fn edge_json(e: crate::store::EdgeRow, offline_ms: i64) -> Value {
    let online = e.silent_ms.is_some_and(|ms| ms <= offline_ms);
    json!({
        "id": e.id,
        "declared": e.declared,
        "cursor": e.cursor,
        "acked_through": e.acked_seq,
        "lag_ops": e.lag_ops,
        "lag_seconds": (e.lag_seconds * 1000.0).round() / 1000.0,
        "last_seen": e.last_seen,
        "online": online,
        "version": e.version,
        "protocol": e.protocol,
        "error": e.error,
        "needs_resync": e.needs_resync,
        "clock_skew_ms": e.clock_skew_ms,
        "scope": e.scope.as_deref().unwrap_or("all"),
    })
}

fn resyncer(admin: &Admin) -> Result<Arc<crate::central::resync::Resyncer>, ApiError> {
    admin.resyncer().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "central's sync client is not up yet".into(),
        )
    })
}

fn start_error(e: crate::central::resync::StartError) -> ApiError {
    use crate::central::resync::StartError;
    match e {
        StartError::NoEdge(_) => ApiError(StatusCode::NOT_FOUND, e.to_string()),
        StartError::Busy(..) => ApiError(StatusCode::CONFLICT, e.to_string()),
        StartError::NoCredentials => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        StartError::Internal(e) => internal(e),
    }
}

/// `limit` of a list of rows: 1 to 10,000, default 1,000.
fn row_limit(params: &HashMap<String, String>) -> Result<i64, ApiError> {
    match params.get("limit") {
        None => Ok(DEFAULT_OUT_OF_SYNC),
        Some(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=MAX_LIMIT * 10).contains(n))
            .ok_or_else(|| {
                bad_request(format!(
                    "'limit' must be between 1 and {}, got '{v}'",
                    MAX_LIMIT * 10
                ))
            }),
    }
}

fn flag(params: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(v) => Err(bad_request(format!(
            "'{name}' must be true or false, got '{v}'"
        ))),
    }
}

/// Edge status, with its resync, its last drift audit and its users that
/// need a password.
async fn get_edge(
    State(admin): State<Arc<Admin>>,
    Path(edge): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let offline_ms = admin.edge_offline_after.as_millis() as i64;
    let Some(row) = admin.store.edge(&edge).await.map_err(internal)? else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("no edge '{edge}'")));
    };
    if let Some(r) = admin.resyncer() {
        r.refresh_needs_password(&edge).await;
    }
    let mut out = edge_json(row, offline_ms);
    let audit = admin
        .store
        .edge_audit(&edge, MAX_LIMIT)
        .await
        .map_err(internal)?;
    out["resync"] = match audit.resync {
        Some(r) => {
            let result: Value = r
                .result
                .as_deref()
                .and_then(|t| serde_json::from_str(t).ok())
                .unwrap_or(Value::Null);
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            v["result"] = result;
            v
        }
        None => Value::Null,
    };
    out["drift"] = json!(audit.drift);
    let (count, users) = audit.needs_password;
    out["needs_password"] = json!({"count": count, "users": users});
    Ok(Json(out))
}

async fn resync_edge(
    State(admin): State<Arc<Admin>>,
    Path(edge): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    only_params(&params, &["prune"])?;
    start_resync(&admin, edge, "resync", flag(&params, "prune")?).await
}

async fn repair_drift(
    State(admin): State<Arc<Admin>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let edge = only_params(&params, &["edge", "prune"])?
        .ok_or_else(|| bad_request("'edge' is required"))?
        .to_string();
    start_resync(&admin, edge, "repair", flag(&params, "prune")?).await
}

/// Starts a resync (`repair`: after a drift audit): 202, to be followed in
/// the edge's row.
async fn start_resync(
    admin: &Admin,
    edge: String,
    kind: &'static str,
    prune: bool,
) -> Result<Response, ApiError> {
    resyncer(admin)?
        .start(&edge, kind, prune)
        .await
        .map_err(start_error)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "edge": edge,
            kind: "started",
            "prune": prune,
            "message": format!("follow it with GET /v1/edges/{edge}"),
        })),
    )
        .into_response())
}

/// The edge a request names, or every edge.
async fn edge_or_all(admin: &Admin, edge: Option<&str>) -> Result<Vec<String>, ApiError> {
    Ok(match edge {
        Some(e) => vec![e.to_string()],
        None => admin
            .store
            .edges()
            .await
            .map_err(internal)?
            .into_iter()
            .map(|e| e.id)
            .collect(),
    })
}

async fn run_drift(
    State(admin): State<Arc<Admin>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let edge = only_params(&params, &["edge", "outside_scope"])?;
    let outside_scope = flag(&params, "outside_scope")?;
    if outside_scope && edge.is_none() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "outside_scope audits one edge: give edge=<edge>".into(),
        ));
    }
    let r = resyncer(&admin)?;
    let (edges, skipped) = match edge {
        Some(e) => {
            r.start_drift(e, outside_scope).await.map_err(start_error)?;
            (vec![e.to_string()], Vec::new())
        }
        // Every edge connected now, against one read of central's state.
        None => {
            let round = r.drift_round().await.map_err(start_error)?;
            (round.audited, round.skipped)
        }
    };
    let skipped: Vec<Value> = skipped
        .into_iter()
        .map(|(edge, why)| json!({"edge": edge, "reason": why}))
        .collect();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "edges": edges,
            "skipped": skipped,
            "drift_audit": "started",
            "message": "results in GET /v1/drift?edge=<edge>",
        })),
    )
        .into_response())
}

async fn list_drift(
    State(admin): State<Arc<Admin>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let edge = only_params(&params, &["edge", "kind", "category", "limit"])?;
    let category = params.get("category").map(String::as_str);
    if let Some(c) = category {
        if !["missing_at_edge", "only_at_edge", "differs"].contains(&c) {
            return Err(bad_request(format!(
                "'category' must be missing_at_edge, only_at_edge or differs, got '{c}'"
            )));
        }
    }
    // A kind as this release names it, or as an older one did (which may
    // stand for several).
    let kinds: Vec<&str> = match params.get("kind") {
        Some(k) => {
            let kinds = crate::keystone::kinds::filter(k);
            if kinds.is_empty()
                || !kinds
                    .iter()
                    .all(|c| crate::keystone::state::kinds().any(|s| s == *c))
            {
                let known: Vec<_> = crate::keystone::state::kinds().collect();
                return Err(bad_request(format!(
                    "unknown kind '{k}' (expected one of {})",
                    known.join(", ")
                )));
            }
            kinds
        }
        None => Vec::new(),
    };
    let limit = row_limit(&params)?;
    if let Some(e) = edge {
        if admin
            .store
            .edge_position(e)
            .await
            .map_err(internal)?
            .is_none()
        {
            return Err(ApiError(StatusCode::NOT_FOUND, format!("no edge '{e}'")));
        }
    }
    let edges = edge_or_all(&admin, edge).await?;
    let report = admin
        .store
        .drift_report(&edges, &kinds, category, limit + 1)
        .await
        .map_err(internal)?;
    let runs: Vec<Value> = report
        .runs
        .into_iter()
        .map(|(e, run)| match run {
            Some(run) => json!(run),
            None => json!({"edge": e, "state": "never_run"}),
        })
        .collect();
    let rows = report.rows;
    let truncated = rows.len() as i64 > limit;
    let differences: Vec<Value> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| {
            let fields: Value = serde_json::from_str(&r.fields).unwrap_or(json!([]));
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            if r.category == "differs" {
                v["fields"] = fields;
            }
            v
        })
        .collect();
    Ok(Json(json!({
        "runs": runs,
        "differences": differences,
        "truncated": truncated,
        "not_covered": crate::keystone::state::not_covered(),
    })))
}

async fn out_of_sync(
    State(admin): State<Arc<Admin>>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let edge = only_params(&params, &["edge", "limit"])?;
    let limit = row_limit(&params)?;
    let rows = admin
        .store
        .out_of_sync(edge, admin.ack_timeout, limit + 1)
        .await
        .map_err(internal)?;
    // A write forwarded whose op could not be logged yet (the op log failed)
    // may be missing at every edge: it is reported until it is an op.
    let unlogged = admin.proxy.unlogged_writes().await.map_err(internal)?;
    let truncated = rows.len() as i64 > limit;
    let rows: Vec<_> = rows
        .into_iter()
        .take(limit as usize)
        .map(|mut r| {
            let secrets = op_secrets(r.body.as_deref());
            r.detail = r.detail.map(|t| redact::scrub(&t, &secrets));
            r.path = redact::redact_query(&r.path);
            r
        })
        .collect();
    Ok(Json(json!({
        "out_of_sync": rows,
        "truncated": truncated,
        "unlogged_writes": unlogged,
    })))
}

/// An op as the audit API shows it, secrets redacted.
/// The secrets an op's body carries, to scrub from texts shown beside it.
fn op_secrets(body: Option<&str>) -> Vec<String> {
    body.and_then(|b| serde_json::from_str::<Value>(b).ok())
        .map(|v| redact::secret_values(&v))
        .unwrap_or_default()
}

pub fn op_json(op: &OpRow) -> Value {
    let body = op
        .body
        .as_deref()
        .map(|text| match serde_json::from_str::<Value>(text) {
            Ok(mut v) => {
                redact::redact(&mut v);
                v
            }
            Err(_) => Value::String(format!("<{} bytes, not JSON, not shown>", text.len())),
        });
    let created_ids: Value = serde_json::from_str(&op.created_ids).unwrap_or(Value::Null);
    json!({
        "seq": op.seq,
        "op_id": op.op_id,
        "state": op.state,
        "resolution": op.resolution,
        "method": op.method,
        "path": redact::redact_query(&op.path),
        "class": op.class,
        "kind": op.kind,
        "created_ids": created_ids,
        "body": body,
        "upstream_status": op.upstream_status,
        "request_id": op.request_id,
        "detail": op.detail,
        "created_at": op.created_at,
        "logged_at": op.logged_at,
    })
}
