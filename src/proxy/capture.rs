//! The capture path for replicable writes. The body is buffered (bounded), an
//! intent is made durable before anything is forwarded, and a 2xx answer turns it
//! into an op with the next seq before the client sees the response. A write whose
//! outcome is unknown (timeout, broken connection) is logged as such, never dropped.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use reqwest::Url;
use serde_json::Value;
use tracing::{error, info, warn};
use uuid::Uuid;

use super::error::ProxyError;
use super::{build_response, Proxy, SendError, REQUEST_ID};
use crate::keystone::{self, RouteMatch};
use crate::metrics::inc;
use crate::store::{NewIntent, OpState, Outcome};

pub(super) async fn forward_captured(
    proxy: &Proxy,
    route: RouteMatch,
    url: Url,
    peer: SocketAddr,
    req: Request,
) -> Result<Response, ProxyError> {
    let (parts, body) = req.into_parts();
    let body = read_bounded(proxy, &parts.headers, body).await?;
    let path = match url.query() {
        Some(q) => format!("{}?{q}", proxy.keystone_path(&url)),
        None => proxy.keystone_path(&url).to_string(),
    };
    let body_text = (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned());

    // 1. The intent is durable before anything is forwarded.
    let op_id = proxy
        .store
        .begin_intent(&NewIntent {
            method: parts.method.as_str(),
            path: &path,
            class: route.class.as_str(),
            kind: route.kind,
            body: body_text.as_deref(),
        })
        .await
        .map_err(|e| {
            error!(error = %e, "op log refused an intent; write not forwarded");
            inc(&proxy.metrics.oplog_failures);
            ProxyError::OpLogUnavailable
        })?;
    tracing::Span::current().record("op_id", tracing::field::display(op_id));

    // 2. Forward.
    let mut upstream_req = reqwest::Request::new(parts.method.clone(), url.clone());
    *upstream_req.headers_mut() = proxy.request_headers(&parts.headers, peer, false);
    *upstream_req.body_mut() = Some(reqwest::Body::from(body.clone()));
    let resp = match proxy.send(upstream_req).await {
        Ok(resp) => resp,
        Err(SendError::Unreachable) => {
            drop_intent(proxy, op_id).await;
            return Err(proxy.send_error(SendError::Unreachable, None));
        }
        Err(e) => {
            let detail = match e {
                SendError::Timeout => "no answer from the upstream within the timeout",
                _ => "the connection to the upstream broke before it answered",
            };
            let seq = record_unknown(proxy, op_id, None, detail).await;
            return Err(proxy.send_error(e, seq));
        }
    };

    // 3. On 2xx the intent becomes an op before the client hears back.
    let status = resp.status();
    let upstream_headers = resp.headers().clone();
    let resp_body = match tokio::time::timeout(proxy.timeout, resp.bytes()).await {
        Ok(Ok(bytes)) => bytes,
        _ if status.is_success() => {
            let detail = "the upstream answered 2xx but its response body was lost";
            let seq = record_unknown(proxy, op_id, Some(status.as_u16()), detail).await;
            return Err(proxy.send_error(SendError::Broken, seq));
        }
        _ => {
            drop_intent(proxy, op_id).await;
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
            keystone::created_ids(&route, proxy.keystone_path(&url), response_json.as_ref());
        let replay_body = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|mut v| {
                keystone::inject_generated(&route, &mut v, &created_ids).then(|| v.to_string())
            });
        let outcome = Outcome {
            created_ids,
            body: replay_body,
            upstream_status: Some(status.as_u16()),
            request_id,
            detail: None,
        };
        match proxy
            .store
            .commit_intent(op_id, OpState::Committed, &outcome)
            .await
        {
            Ok(seq) => {
                inc(&proxy.metrics.writes_captured);
                tracing::Span::current().record("seq", seq);
                info!(seq, %op_id, class = %route.class, kind = route.kind, "op logged");
            }
            Err(e) => {
                error!(error = %e, %op_id, "upstream applied a write the op log could not record");
                inc(&proxy.metrics.oplog_failures);
                return Err(ProxyError::OpLogCommitFailed);
            }
        }
    } else {
        inc(&proxy.metrics.writes_not_applied);
        drop_intent(proxy, op_id).await;
    }

    let body = match proxy.rewriter_for(&upstream_headers) {
        Some(mut rw) => {
            let mut out = rw.push(&resp_body).to_vec();
            out.extend_from_slice(&rw.finish());
            Bytes::from(out)
        }
        None => resp_body,
    };
    let mut headers = proxy.response_headers(&upstream_headers, false);
    headers.insert(header::CONTENT_LENGTH, body.len().into());
    Ok(build_response(status, headers, Body::from(body)))
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
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            inc(&proxy.metrics.bodies_too_large);
            Err(ProxyError::BodyTooLarge(limit))
        }
        Err(_) => Err(ProxyError::BadRequestBody),
    }
}

/// Drops an intent whose write did not happen. A failure here leaves the intent
/// open, to be reported as unknown outcome at the next start: noisy, never lossy.
async fn drop_intent(proxy: &Proxy, op_id: Uuid) {
    if let Err(e) = proxy.store.drop_intent(op_id).await {
        warn!(error = %e, %op_id, "could not drop an intent; it will show as unknown outcome");
    }
}

/// Logs a write whose outcome is unknown; returns its seq when recorded.
async fn record_unknown(
    proxy: &Proxy,
    op_id: Uuid,
    status: Option<u16>,
    detail: &str,
) -> Option<i64> {
    let outcome = Outcome {
        upstream_status: status,
        detail: Some(detail.to_string()),
        ..Outcome::default()
    };
    inc(&proxy.metrics.unknown_outcomes);
    match proxy
        .store
        .commit_intent(op_id, OpState::UnknownOutcome, &outcome)
        .await
    {
        Ok(seq) => {
            warn!(seq, %op_id, detail, "write logged with unknown outcome");
            Some(seq)
        }
        Err(e) => {
            error!(error = %e, %op_id, "could not log an unknown outcome; the intent stays open");
            None
        }
    }
}
