//! The capture path for replicable writes. The body is buffered (bounded), an
//! intent is made durable before anything is forwarded, and a 2xx answer turns it
//! into an op with the next seq before the client sees the response. A write whose
//! outcome is unknown (timeout, broken connection) is logged as such, never dropped.

use std::sync::Arc;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Request, Response, Uri};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tracing::{debug, error, info, warn, Instrument};
use uuid::Uuid;

use super::error::ProxyError;
use super::{build_response, Peer, Proxy, SendError, REQUEST_ID};
use crate::keystone::ids::{all_refs, every_ref, is_mappable_id, natural_key, referable, IdRef};
use crate::keystone::scope::owned_target;
use crate::keystone::touches::{self, Touch};
use crate::keystone::{self, kinds, RouteMatch};
use crate::metrics::inc;
use crate::protocol::messages::EntityRef;
use crate::store::{NewIntent, OpState, Outcome, StoreError};

pub(super) async fn forward_captured(
    proxy: &Arc<Proxy>,
    route: RouteMatch,
    uri: Uri,
    peer: &Arc<Peer>,
    req: Request<Body>,
) -> Result<Response<Body>, ProxyError> {
    let (parts, body) = req.into_parts();
    let body = read_bounded(proxy, &parts.headers, body).await?;
    if !body.is_empty() {
        super::json::check_exact(&body).map_err(ProxyError::InexactBody)?;
    }
    // From here the write runs to completion on a task of its own: a client that
    // disconnects or gives up drops only this await, never an intent or a write
    // already sent upstream.
    let request = tracing::Span::current();
    let span = tracing::info_span!(
        "capture",
        kind = route.kind,
        op_id = tracing::field::Empty,
        seq = tracing::field::Empty,
    );
    let captured = proxy.spawner.spawn(
        captured_section(
            proxy.clone(),
            route,
            uri,
            peer.clone(),
            parts,
            body,
            request,
        )
        .instrument(span),
    );
    match captured.await {
        Ok(Some(answer)) => answer,
        // Central is stopping hard: the intent is reported at the next start.
        Ok(None) => Err(ProxyError::Internal),
        Err(e) => {
            error!(error = %e, "the capture task failed");
            Err(ProxyError::Internal)
        }
    }
}

/// Removes an op ID from the in-flight set when the captured section ends.
struct InFlight<'a>(&'a Proxy, Uuid);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut running = self.0.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        running.remove(&self.1);
        if running.is_empty() {
            self.0.captures_done.notify_waiters();
        }
    }
}

/// Counts an applied write in the audit's `unlogged_writes` while it lives.
struct Unlogged<'a>(&'a Proxy, Uuid);

impl<'a> Unlogged<'a> {
    fn new(proxy: &'a Proxy, op_id: Uuid) -> Unlogged<'a> {
        proxy.unlogged().insert(op_id);
        Unlogged(proxy, op_id)
    }
}

impl Drop for Unlogged<'_> {
    fn drop(&mut self) {
        self.0.unlogged().remove(&self.1);
    }
}

async fn captured_section(
    proxy: Arc<Proxy>,
    route: RouteMatch,
    uri: Uri,
    peer: Arc<Peer>,
    parts: Parts,
    body: Bytes,
    request: tracing::Span,
) -> Result<Response<Body>, ProxyError> {
    let owner = proxy;
    let proxy = &*owner;
    // The op carries its trace to the edges: this write's span, or, when
    // traces are not exported here, the client's own `traceparent`.
    let traceparent = crate::telemetry::traceparent(&tracing::Span::current()).or_else(|| {
        parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::telemetry::valid_traceparent(v))
            .map(str::to_string)
    });
    let started = std::time::Instant::now();
    let path = match uri.query() {
        Some(q) => format!("{}?{q}", proxy.keystone_path(&uri)),
        None => proxy.keystone_path(&uri).to_string(),
    };
    // Checked to be UTF-8 JSON: kept byte for byte.
    let body_text = std::str::from_utf8(&body)
        .ok()
        .filter(|b| !b.is_empty())
        .map(str::to_string);
    let request_json: Option<Value> = serde_json::from_slice(&body).ok();
    let mut touched = touches::touches(&route, parts.method.as_str(), &path, request_json.as_ref());
    let (_order, owners, logged_before) = loop {
        // Conflicting writes wait here until the one ahead is logged (or dropped).
        let order = proxy.locks.acquire(&touched).await;
        // One ahead whose outcome is unknown may still land: not before it.
        if let Some(wait) = proxy.in_doubt.conflict(&touched) {
            inc(&proxy.metrics.writes_not_applied);
            return Err(ProxyError::InDoubt(wait.as_secs().max(1)));
        }
        // Where other replicas write too, what they log meanwhile is seen
        // after this write's intent is open (see `moved_meanwhile`).
        let logged_before = match proxy.store.dialect() {
            crate::store::Dialect::Postgres if owners_wanted(proxy, &route) => {
                match proxy.store.last_seq().await {
                    Ok(seq) => Some(seq),
                    Err(e) => {
                        error!(error = %e, "cannot read the op log; write not forwarded");
                        inc(&proxy.metrics.oplog_failures);
                        return Err(ProxyError::OpLogUnavailable);
                    }
                }
            }
            _ => None,
        };
        // Natural keys are read before forwarding: a delete's target is gone after.
        let owners = match owners_of(proxy, &route, &path, request_json.as_ref()).await {
            Ok(Some(owners)) => owners,
            Ok(None) => break (order, None, logged_before),
            Err(e) => {
                inc(&proxy.metrics.writes_not_applied);
                return Err(e);
            }
        };
        // The user a credential written by its ID belongs to is held too, as
        // the credential is read again under it: a write moving that user
        // out of a scope meanwhile waits (or goes first). Locks are taken
        // all at once, in order, never added to.
        let unheld = unheld_owners(&touched, &owners);
        if unheld.is_empty() {
            break (order, Some(owners), logged_before);
        }
        drop(order);
        touched.extend(unheld);
        touched = touches::normalise(touched);
    };
    // What decided where the write belongs: the users read, and the entity
    // whose owners were read.
    let mut deciding: Vec<String> = owners
        .iter()
        .flatten()
        .filter(|o| o.kind == kinds::USER.name)
        .map(|o| o.id.clone())
        .collect();
    if owners.is_some() {
        deciding.extend(owned_target(route.kind, &path).map(|t| t.id));
        // Logged with the op: it was counted by what was read.
        if keystone::scope::reads_owners(route.kind, &path, request_json.as_ref()) {
            touched.push(Touch {
                key: keystone::scope::OWNERS_READ.to_string(),
                exclusive: false,
            });
            touched = touches::normalise(touched);
        }
    }
    let refs = entity_refs(
        proxy,
        &path,
        request_json.as_ref(),
        owners.unwrap_or_default(),
    )
    .await;
    let refs = serde_json::to_string(&refs).expect("refs serialize");

    // A replica that lost its presence on a shared op log forwards nothing:
    // its intents may be settled by another meanwhile.
    if !proxy.store.present() {
        inc(&proxy.metrics.oplog_failures);
        return Err(ProxyError::OpLogUnavailable);
    }

    // 1. The intent is durable before anything is forwarded. It is known to
    // be running before it is durable: an open intent not running is one whose
    // section ended without logging it, which the sweeper logs at once.
    let op_id = Uuid::new_v4();
    proxy
        .in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(op_id);
    let _in_flight = InFlight(proxy, op_id);
    let intent = NewIntent {
        method: parts.method.as_str(),
        path: &path,
        class: route.class.as_str(),
        kind: route.kind,
        body: body_text.as_deref(),
        refs: &refs,
        traceparent: traceparent.as_deref(),
        touches: &touched,
    };
    // On PostgreSQL another replica's write of the same entity may be open:
    // this one waits for it (up to the upstream timeout), as it would here.
    let waiting_ends = std::time::Instant::now() + proxy.timeout;
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        match proxy.store.begin_intent_as(op_id, &intent).await {
            Ok(_) => break,
            Err(StoreError::Busy { in_doubt: true }) => {
                inc(&proxy.metrics.writes_not_applied);
                return Err(ProxyError::InDoubt(proxy.settle.as_secs().max(1)));
            }
            Err(StoreError::Busy { in_doubt: false })
                if std::time::Instant::now() + pause < waiting_ends =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(10));
            }
            Err(StoreError::Busy { .. }) => {
                inc(&proxy.metrics.writes_not_applied);
                return Err(ProxyError::ReplicaBusy);
            }
            Err(e) => {
                error!(error = %e, "op log refused an intent; write not forwarded");
                inc(&proxy.metrics.oplog_failures);
                return Err(ProxyError::OpLogUnavailable);
            }
        }
    }
    if let Some(before) = logged_before {
        if moved_meanwhile(proxy, &deciding, before).await {
            if !drop_intent(&owner, op_id).await {
                std::mem::forget(_in_flight);
            }
            inc(&proxy.metrics.writes_not_applied);
            return Err(ProxyError::ReplicaBusy);
        }
    }
    tracing::Span::current().record("op_id", tracing::field::display(op_id));
    request.record("op_id", tracing::field::display(op_id));

    // 2. Forward.
    let upstream_req = proxy.upstream_request(
        parts.method.clone(),
        uri.clone(),
        parts.headers.clone(),
        &peer,
        false,
        Body::from(body.clone()),
    );
    let resp = match proxy.send(upstream_req, true, None).await {
        Ok(resp) => resp,
        Err(SendError::Unreachable) => {
            if !drop_intent(&owner, op_id).await {
                std::mem::forget(_in_flight);
            }
            return Err(proxy.send_error(SendError::Unreachable, None));
        }
        Err(e) => {
            let detail = match e {
                SendError::Timeout => "no answer from the upstream within the timeout",
                _ => "the connection to the upstream broke before it answered",
            };
            let seq = record_unknown(proxy, op_id, None, detail, &touched).await;
            return Err(in_doubt_error(proxy, e, seq));
        }
    };

    // 3. On 2xx the intent becomes an op before the client hears back.
    let (upstream, resp) = resp.into_parts();
    let (status, mut upstream_headers) = (upstream.status, upstream.headers);
    let resp_body = match tokio::time::timeout(
        proxy.timeout,
        read_response(&upstream_headers, resp),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(ResponseError::TooLarge)) if status.is_success() => {
            let detail = "the upstream answered 2xx with a response larger than the gateway reads for a captured write";
            let seq = record_unknown(proxy, op_id, Some(status.as_u16()), detail, &touched).await;
            return Err(in_doubt_error(proxy, SendError::Broken, seq));
        }
        _ if status.is_success() => {
            let detail = "the upstream answered 2xx but its response body was lost";
            let seq = record_unknown(proxy, op_id, Some(status.as_u16()), detail, &touched).await;
            return Err(in_doubt_error(proxy, SendError::Broken, seq));
        }
        _ => {
            if !drop_intent(&owner, op_id).await {
                std::mem::forget(_in_flight);
            }
            return Err(proxy.send_error(SendError::Broken, None));
        }
    };

    if status.is_success() {
        let request_id = upstream_headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let response_json: Option<Value> = serde_json::from_slice(&resp_body).ok();
        let created_ids =
            keystone::created_ids(&route, proxy.keystone_path(&uri), response_json.as_ref());
        let replay_body = request_json.clone().and_then(|mut v| {
            let generated = keystone::inject_generated(&route, &mut v, &created_ids);
            let derived = keystone::inject_derived(&route, &mut v, response_json.as_ref());
            (generated || derived).then(|| v.to_string())
        });
        let learned = response_json
            .as_ref()
            .and_then(|v| learned_entity(route.kind, v));
        touched.extend(touches::created(&created_ids));
        let outcome = Outcome {
            touches: touches::normalise(touched),
            created_ids,
            body: replay_body,
            upstream_status: Some(status.as_u16()),
            request_id,
            detail: None,
            learned,
        };
        match proxy
            .store
            .commit_intent(op_id, OpState::Committed, &outcome)
            .await
        {
            Ok(seq) => {
                logged(proxy, seq);
                proxy
                    .metrics
                    .capture_duration
                    .observe(started.elapsed().as_secs_f64());
                tracing::Span::current().record("seq", seq);
                request.record("seq", seq);
                info!(seq, %op_id, class = %route.class, kind = route.kind, "op logged");
            }
            Err(e) => {
                error!(error = %e, %op_id, "upstream applied a write the op log could not record");
                inc(&proxy.metrics.oplog_failures);
                // Conflicting writes wait until its op is logged.
                proxy.in_doubt.hold(
                    &outcome.touches,
                    std::time::Instant::now() + proxy.settle + proxy.stale_after,
                );
                // Keystone answered 2xx: it is logged as the op it is, with
                // what the answer said (IDs made), as soon as the op log takes
                // it. It stays running meanwhile (the sweeper leaves it be; a
                // stop logs it as unknown_outcome).
                std::mem::forget(_in_flight);
                let owner = owner.clone();
                proxy
                    .spawner
                    .spawn(log_when_possible(owner, op_id, outcome).in_current_span());
                return Err(ProxyError::OpLogCommitFailed);
            }
        }
    } else {
        inc(&proxy.metrics.writes_not_applied);
        if !drop_intent(&owner, op_id).await {
            std::mem::forget(_in_flight);
        }
    }

    let body = match proxy.rewriter_for(&upstream_headers) {
        Some(mut rw) => {
            let mut out = rw.push(&resp_body).to_vec();
            out.extend_from_slice(&rw.finish());
            Bytes::from(out)
        }
        None => resp_body,
    };
    proxy.client_headers(&mut upstream_headers, false);
    upstream_headers.insert(header::CONTENT_LENGTH, body.len().into());
    Ok(build_response(status, upstream_headers, Body::from(body)))
}

/// A captured write is an op now: the publisher is woken and it is counted.
fn logged(proxy: &Proxy, seq: i64) {
    proxy.wake.notify_one();
    inc(&proxy.metrics.writes_captured);
    proxy.metrics.last_seq.set(seq);
}

/// Tries again to log a write Keystone applied, as committed, until the op
/// log takes it; conflicting writes stay refused meanwhile.
async fn log_when_possible(proxy: Arc<Proxy>, op_id: Uuid, outcome: Outcome) {
    let _running = InFlight(&proxy, op_id);
    let _unlogged = Unlogged::new(&proxy, op_id);
    let mut delays = crate::retry::delays(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    );
    loop {
        let delay = delays.next().unwrap_or(std::time::Duration::from_secs(2));
        tokio::time::sleep(delay).await;
        match proxy
            .store
            .commit_intent(op_id, OpState::Committed, &outcome)
            .await
        {
            Ok(seq) => {
                logged(&proxy, seq);
                warn!(seq, %op_id, "a write the op log could not record at first is logged now");
                return;
            }
            Err(crate::store::StoreError::NoIntent(_)) => return,
            Err(e) => {
                debug!(error = %e, %op_id, "the op log still cannot record an applied write");
                proxy.in_doubt.hold(
                    &outcome.touches,
                    std::time::Instant::now() + proxy.settle + delay * 4,
                );
            }
        }
    }
}

/// The most of a captured write's response the gateway reads (Keystone answers
/// a write with one entity, or a list of limits: far less).
pub const MAX_CAPTURED_RESPONSE: usize = 8 * 1024 * 1024;

enum ResponseError {
    TooLarge,
    Broken,
}

/// Reads a captured write's response, at most `MAX_CAPTURED_RESPONSE` bytes.
async fn read_response(headers: &HeaderMap, body: Incoming) -> Result<Bytes, ResponseError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_CAPTURED_RESPONSE as u64) {
        return Err(ResponseError::TooLarge);
    }
    match Limited::new(body, MAX_CAPTURED_RESPONSE).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(ResponseError::TooLarge),
        Err(_) => Err(ResponseError::Broken),
    }
}

/// Reads the whole request body, refusing more than `--max-capture-body`.
async fn read_bounded(proxy: &Proxy, headers: &HeaderMap, body: Body) -> Result<Bytes, ProxyError> {
    let limit = proxy.max_capture_body;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        inc(&proxy.metrics.bodies_too_large);
        return Err(ProxyError::BodyTooLarge(limit));
    }
    let body = crate::serve::idle_timeout_body(body, proxy.body_timeout);
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            inc(&proxy.metrics.bodies_too_large);
            Err(ProxyError::BodyTooLarge(limit))
        }
        Err(e) if timed_out(e.as_ref()) => {
            Err(ProxyError::BodyTimeout(proxy.body_timeout.as_secs().max(1)))
        }
        Err(_) => Err(ProxyError::BadRequestBody),
    }
}

/// Whether an error, or one it wraps, is a timeout.
fn timed_out(mut e: &(dyn std::error::Error + 'static)) -> bool {
    loop {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        match e.source() {
            Some(next) => e = next,
            None => return false,
        }
    }
}

/// Drops an intent whose write did not happen; false when the op log could
/// not yet. Then a task drops it once the op log takes writes, keeping it
/// running meanwhile: the sweeper never logs it with an unknown outcome (the
/// resolver could find such a write "applied" where what it would have done
/// is there anyway, an op for a write Keystone refused).
async fn drop_intent(owner: &Arc<Proxy>, op_id: Uuid) -> bool {
    let Err(e) = owner.store.drop_intent(op_id).await else {
        return true;
    };
    warn!(error = %e, %op_id, "could not drop the intent of a write that did not happen; dropped once the op log takes writes");
    owner
        .undone
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(op_id);
    owner
        .spawner
        .spawn(drop_when_possible(owner.clone(), op_id).in_current_span());
    false
}

async fn drop_when_possible(proxy: Arc<Proxy>, op_id: Uuid) {
    let _running = InFlight(&proxy, op_id);
    let mut delays = crate::retry::delays(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(2),
    );
    loop {
        tokio::time::sleep(delays.next().unwrap_or(std::time::Duration::from_secs(2))).await;
        match proxy.store.drop_intent(op_id).await {
            Ok(()) => break,
            Err(e) => debug!(error = %e, %op_id, "the op log still cannot drop an intent"),
        }
    }
    proxy
        .undone
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&op_id);
}

/// The client's error for a write that may have been applied: naming its op
/// when it is logged, saying it stays open when it could not be.
fn in_doubt_error(proxy: &Proxy, e: SendError, seq: Option<i64>) -> ProxyError {
    let timed_out = matches!(e, SendError::Timeout);
    match seq {
        Some(_) => proxy.send_error(e, seq),
        None => {
            let _ = proxy.send_error(e, None);
            ProxyError::UnknownUnrecorded { timed_out }
        }
    }
}

/// Logs a write whose outcome is unknown; returns its seq when recorded.
async fn record_unknown(
    proxy: &Proxy,
    op_id: Uuid,
    status: Option<u16>,
    detail: &str,
    touched: &[Touch],
) -> Option<i64> {
    let outcome = Outcome {
        touches: touched.to_vec(),
        upstream_status: status,
        detail: Some(detail.to_string()),
        ..Outcome::default()
    };
    inc(&proxy.metrics.unknown_outcomes);
    // It may still land until the settle period after it was sent (at most
    // now): conflicting writes are refused until then.
    proxy
        .in_doubt
        .hold(touched, std::time::Instant::now() + proxy.settle);
    match proxy
        .store
        .commit_intent(op_id, OpState::UnknownOutcome, &outcome)
        .await
    {
        Ok(seq) => {
            proxy.unknown.notify_one();
            warn!(seq, %op_id, detail, "write logged with unknown outcome");
            Some(seq)
        }
        Err(e) => {
            error!(error = %e, %op_id, "could not log an unknown outcome; the intent stays open");
            None
        }
    }
}

/// An entity's natural key from a create or update response (`{"<kind>": {...}}`).
fn learned_entity(kind: &str, response: &Value) -> Option<EntityRef> {
    let entity = response.get(kind)?;
    let id = entity.get("id")?.as_str()?;
    let (name, domain_id) = natural_key(kind, entity)?;
    Some(EntityRef {
        id: id.to_string(),
        kind: kind.to_string(),
        name,
        domain_id,
    })
}

/// The natural keys of the named entities a write references: from what central
/// has seen, else asked of the central Keystone with the service credentials.
/// A domain an entity lives in is included too, and so are `owners`.
async fn entity_refs(
    proxy: &Proxy,
    path: &str,
    body: Option<&Value>,
    owners: Vec<EntityRef>,
) -> Vec<EntityRef> {
    let mut queue: Vec<IdRef> = all_refs(path, body)
        .into_iter()
        .filter(|r| referable(r.kind))
        .collect();
    // The owners' domains (the owners themselves are known).
    queue.extend(owners.iter().filter_map(|e| {
        e.domain_id
            .as_deref()
            .filter(|d| is_mappable_id(d))
            .map(|d| IdRef {
                id: d.to_string(),
                kind: kinds::DOMAIN.name,
            })
    }));
    let mut out: Vec<EntityRef> = owners;
    while let Some(r) = queue.pop() {
        if out.iter().any(|e| e.id == r.id) {
            continue;
        }
        let known = match proxy.store.entity(&r.id).await {
            Ok(Some(e)) => Some(e),
            _ => look_up(proxy, &r).await,
        };
        if let Some(e) = known {
            if let Some(d) = e.domain_id.as_deref().filter(|d| is_mappable_id(d)) {
                queue.push(IdRef {
                    id: d.to_string(),
                    kind: crate::keystone::kinds::DOMAIN.name,
                });
            }
            out.push(e);
        }
    }
    out
}

/// What per-site scope (`keystone::scope`) counts for a write beyond the IDs
/// it names, read from the central Keystone before the write is forwarded,
/// when some edge's scope limits its domains and carries the write's class:
/// what the entity it names by its own ID belongs to (`owned_target`), and the
/// default project of every user it names or that entity belongs to (a user
/// whose default project is outside a scope is outside it, and so is every
/// write naming that user), with their natural keys, each read once. IDs of
/// any form are read (an LDAP user's, an EC2 credential's). What cannot be
/// read (an error, a refusal other than 404, an answer without the entity)
/// refuses the write: sent on, it could reach an edge whose scope it is not
/// in. None: no scope limiting domains carries the write's class, and
/// nothing was read. Natural keys are read now, never from what central learned (which
/// keeps what was deleted since: a deleted default project adds nothing, as
/// in a state).
async fn owners_of(
    proxy: &Proxy,
    route: &RouteMatch,
    path: &str,
    body: Option<&Value>,
) -> Result<Option<Vec<EntityRef>>, ProxyError> {
    if !owners_wanted(proxy, route) {
        return Ok(None);
    }
    let mut found: Vec<IdRef> = Vec::new();
    if let Some(target) = owned_target(route.kind, path) {
        if let Some(entity) = read_strictly(proxy, &target).await? {
            found.extend(every_ref("", Some(&entity)));
        }
    }
    let users: Vec<IdRef> = every_ref(path, body)
        .into_iter()
        .chain(found.iter().cloned())
        .filter(|r| r.kind == kinds::USER.name)
        .collect();
    let keyed = |r: &IdRef, entity: &Value| {
        natural_key(r.kind, entity).map(|(name, domain_id)| EntityRef {
            id: r.id.clone(),
            kind: r.kind.to_string(),
            name,
            domain_id,
        })
    };
    let mut owners: Vec<EntityRef> = Vec::new();
    for user in users {
        if owners.iter().any(|e| e.id == user.id) {
            continue;
        }
        if let Some(entity) = read_strictly(proxy, &user).await? {
            found.extend(
                every_ref("", Some(&entity))
                    .into_iter()
                    .filter(|r| r.kind == kinds::PROJECT.name),
            );
            owners.extend(keyed(&user, &entity));
        }
    }
    for r in found
        .into_iter()
        .filter(|r| referable(r.kind) && r.kind != kinds::USER.name)
    {
        if owners.iter().any(|e| e.id == r.id) {
            continue;
        }
        // Absent (a default project deleted since): it adds nothing.
        if let Some(entity) = read_strictly(proxy, &r).await? {
            owners.extend(keyed(&r, &entity));
        }
    }
    Ok(Some(owners))
}

/// Whether another replica logged a write changing one of `deciding` (the
/// users whose default projects this write read, the entity whose owners it
/// read) after `before` (read before them): what was read may be stale, so
/// the write is not forwarded (its intent, open now, orders any later one
/// after it). An op log that cannot say counts as yes.
async fn moved_meanwhile(proxy: &Proxy, deciding: &[String], before: i64) -> bool {
    if deciding.is_empty() {
        return false;
    }
    match proxy.store.changed_since(deciding, before).await {
        Ok(changed) => changed,
        Err(e) => {
            warn!(error = %e, "cannot read what other replicas logged meanwhile; write not forwarded");
            true
        }
    }
}

/// The users among `owners` no key of `touched` holds, as keys it references.
fn unheld_owners(touched: &[Touch], owners: &[EntityRef]) -> Vec<Touch> {
    owners
        .iter()
        .filter(|o| o.kind == kinds::USER.name && !touched.iter().any(|t| t.key == o.id))
        .map(|o| Touch {
            key: o.id.clone(),
            exclusive: false,
        })
        .collect()
}

/// Whether some scope limiting domains carries the write's class: then
/// `owners_of` reads what it belongs to.
fn owners_wanted(proxy: &Proxy, route: &RouteMatch) -> bool {
    proxy
        .domain_scopes
        .iter()
        .any(|s| s.carries_class(route.class.as_str()))
}

/// One entity from the central Keystone, absent only when it says so.
async fn read_strictly(proxy: &Proxy, target: &IdRef) -> Result<Option<Value>, ProxyError> {
    let client = proxy.keystone.as_ref().ok_or(ProxyError::OwnersUnread)?;
    let found = tokio::time::timeout(
        proxy.timeout,
        kinds::get_entity_strict(client, target.kind, &target.id),
    )
    .await;
    match found {
        Ok(Ok(entity)) => Ok(entity),
        Ok(Err(e)) => {
            warn!(kind = target.kind, error = %e, "could not read what a write references at the central identity service; write refused");
            Err(ProxyError::OwnersUnread)
        }
        Err(_) => {
            warn!(
                kind = target.kind,
                "reading what a write references at the central identity service timed out; write refused"
            );
            Err(ProxyError::OwnersUnread)
        }
    }
}

/// IDs recently looked up in vain, with when: bounded, forgotten after a while.
#[derive(Default)]
pub(super) struct Misses(std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>);

impl Misses {
    /// How long a miss is remembered.
    const TTL: std::time::Duration = std::time::Duration::from_secs(60);
    /// Most misses remembered; past it the oldest half is forgotten.
    const MAX: usize = 10_000;

    fn recent(&self, id: &str) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(id).is_some_and(|at| at.elapsed() < Self::TTL)
    }

    fn remember(&self, id: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= Self::MAX {
            map.retain(|_, at| at.elapsed() < Self::TTL / 2);
            if map.len() >= Self::MAX {
                map.clear();
            }
        }
        map.insert(id.to_string(), std::time::Instant::now());
    }
}

async fn look_up(proxy: &Proxy, r: &IdRef) -> Option<EntityRef> {
    let client = proxy.keystone.as_ref()?;
    if proxy.unknown_ids.recent(&r.id) {
        return None;
    }
    let found = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::keystone::kinds::get_entity(client, r.kind, &r.id),
    )
    .await;
    match found {
        Ok(Ok(Some(entity))) => {
            let (name, domain_id) = natural_key(r.kind, &entity)?;
            let e = EntityRef {
                id: r.id.clone(),
                kind: r.kind.to_string(),
                name,
                domain_id,
            };
            // Remembered later: the write does not wait for it.
            let store = proxy.store.clone();
            let learned = e.clone();
            proxy.spawner.spawn(async move {
                if let Err(err) = store.learn_entity(&learned).await {
                    warn!(error = %err, "could not remember an entity's natural key");
                }
            });
            Some(e)
        }
        Ok(Ok(None)) => {
            proxy.unknown_ids.remember(&r.id);
            None
        }
        Ok(Err(e)) => {
            warn!(kind = r.kind, error = %e, "could not look up an entity at the central identity service");
            None
        }
        Err(_) => {
            warn!(
                kind = r.kind,
                "looking up an entity at the central identity service timed out"
            );
            None
        }
    }
}
