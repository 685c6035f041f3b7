//! Errors the gateway answers itself, in Keystone's shape
//! (`{"error": {"code", "title", "message"}}`) so that clients such as the
//! openstack CLI show them like any Keystone error. Each says where the fault lies
//! and whether a retry may help; none carries request bodies or tokens.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream could not be reached; nothing was forwarded.
    #[error("the upstream identity service could not be reached; the request was not applied and may be retried")]
    UpstreamUnreachable,
    /// The upstream took the request but the exchange broke before an answer.
    #[error("the connection to the upstream identity service failed before it answered{}", unknown_suffix(*.0))]
    UpstreamBroken(Option<i64>),
    /// The upstream did not answer within the configured timeout.
    #[error("the upstream identity service did not answer within {}s{}", .secs, unknown_suffix(*.seq))]
    UpstreamTimeout { secs: u64, seq: Option<i64> },
    /// A replicable write larger than `--max-capture-body`.
    #[error("the request body exceeds the gateway's limit of {0} bytes for replicated writes; nothing was forwarded")]
    BodyTooLarge(usize),
    /// The request target cannot be joined to the upstream URL.
    #[error("the request path is not valid")]
    BadRequestTarget,
    /// A write whose target Keystone could read differently from the gateway.
    #[error("the request was refused before it reached the identity service: {0}")]
    RefusedTarget(super::target::TargetError),
    /// A request with a header the upstream could route by.
    #[error("the request was refused before it reached the identity service: the header '{0}' could make the identity service route it differently from the gateway (remove it; set --public-url for the links clients see)")]
    RefusedHeader(String),
    /// A replicated write's body Keystone could read differently.
    #[error("the request was refused before it reached the identity service: {0}")]
    InexactBody(String),
    /// The client paused sending its body for longer than the body timeout.
    #[error(
        "the client paused sending the request body for more than {0}s; nothing was forwarded"
    )]
    BodyTimeout(u64),
    /// The client's body could not be read.
    #[error("the request body could not be read")]
    BadRequestBody,
    /// An earlier write touching the same entity got no answer and may still
    /// land upstream: this one is refused until it cannot (seq order must stay
    /// the upstream's order).
    #[error("an earlier write to the same entity got no answer from the upstream identity service and may still be applied; nothing was forwarded, retry in {0}s")]
    InDoubt(u64),
    /// A write to the same entity is in flight on another replica, for
    /// longer than the upstream timeout (or in doubt there).
    #[error("a write to the same entity is in flight on another replica of the gateway; nothing was forwarded, retry shortly")]
    ReplicaBusy,
    /// What the write's entity references could not be read, and per-site
    /// scope needs it (see `capture::owners_of`).
    #[error("the gateway could not read what this write's entity references at the identity service, which it needs to tell which sites may receive the write; nothing was forwarded, retry shortly")]
    OwnersUnread,
    /// The op log cannot take the write, so it is not forwarded.
    #[error("the gateway cannot record this write for replication right now; nothing was forwarded, retry later")]
    OpLogUnavailable,
    /// The write may have been applied upstream (no whole answer), and the op
    /// log could not record that yet: its intent stays open, to be logged
    /// with an unknown outcome (and resolved) once the op log takes writes.
    #[error("the upstream identity service gave no whole answer, so the write may or may not have been applied; the gateway could not record that yet: it is kept as an open intent and logged with an unknown outcome once it can")]
    UnknownUnrecorded { timed_out: bool },
    /// The upstream applied the write but the gateway could not log it.
    #[error("the write was applied by the upstream identity service but the gateway could not record it for replication; it is kept as an open intent and will be reported as unknown outcome")]
    OpLogCommitFailed,
    /// A bug in the gateway.
    #[error("internal error in the gateway")]
    Internal,
}

fn unknown_suffix(seq: Option<i64>) -> String {
    match seq {
        Some(seq) => format!(
            "; the write may or may not have been applied and is recorded as op {seq} with an unknown outcome"
        ),
        None => "; the request may be retried".to_string(),
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamBroken(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout { .. }
            | ProxyError::UnknownUnrecorded { timed_out: true } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UnknownUnrecorded { timed_out: false } => StatusCode::BAD_GATEWAY,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BadRequestBody
            | ProxyError::BadRequestTarget
            | ProxyError::RefusedTarget(_)
            | ProxyError::RefusedHeader(_)
            | ProxyError::InexactBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::OpLogUnavailable
            | ProxyError::OwnersUnread
            | ProxyError::ReplicaBusy
            | ProxyError::OpLogCommitFailed
            | ProxyError::InDoubt(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A Keystone-shaped JSON error response.
pub fn keystone_error(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "error": {
            "code": status.as_u16(),
            "title": status.canonical_reason().unwrap_or("Error"),
            "message": message,
        }
    });
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut resp = keystone_error(self.status(), &self.to_string());
        match self {
            ProxyError::InDoubt(secs) => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ProxyError::ReplicaBusy | ProxyError::OwnersUnread => {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            }
            _ => {}
        }
        resp
    }
}
