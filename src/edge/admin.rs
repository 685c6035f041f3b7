//! The edge's admin listener: `/healthz`, `/readyz` (database, broker, no
//! blocking error), `/metrics`, and `/v1/status` (behind the admin token).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::Status;
use crate::metrics::Metrics;
use crate::settings::config::Secret;
use crate::store::edge::EdgeStore;

pub(super) struct AdminState {
    pub(super) status: Arc<Status>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) store: EdgeStore,
    pub(super) token: Option<Secret>,
    pub(super) edge: String,
}

pub(super) fn router(state: Arc<AdminState>) -> Router {
    let status = Router::new()
        .route("/v1/status", get(status_json))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(status)
        .with_state(state)
}

async fn require_token(State(s): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    if !crate::central::admin::bearer_ok(s.token.as_ref(), req.headers()) {
        return crate::central::admin::unauthorized();
    }
    next.run(req).await
}

async fn status_json(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    let st = &s.status;
    Json(json!({
        "edge": s.edge,
        "cursor": st.cursor.load(Ordering::Relaxed),
        "id_map_size": st.id_map_size.load(Ordering::Relaxed),
        "broker_connected": st.connected.load(Ordering::Relaxed),
        "halted": st.halted.load(Ordering::Relaxed),
        "resync_hold": st.resync_hold.load(Ordering::Relaxed),
        "error": st.error(),
        "warning": st.warning(),
        "waiting": st.waiting(),
        "applied_total": st.applied.load(Ordering::Relaxed),
        "failed_total": st.failed.load(Ordering::Relaxed),
        "redriven_total": st.redriven.load(Ordering::Relaxed),
    }))
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let db = s.store.check().await.is_ok();
    let connected = s.status.connected.load(Ordering::Relaxed);
    let error = s.status.error();
    let ready = db && connected && error.is_none();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            json!({"ready": ready, "database": db, "broker_connected": connected, "error": error}),
        ),
    )
        .into_response()
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.render(),
    )
        .into_response()
}
