//! The edge's admin listener: `/healthz`, `/readyz` (database, broker, no
//! blocking error), `/metrics`, and `/v1/status` (behind the admin token).

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::Status;
use crate::core::Secret;
use crate::metrics::{counter, gauge, load, Metrics};
use crate::store::edge::EdgeStore;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

pub(super) struct AdminState {
    pub(super) link: Arc<super::link::Link>,
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
    if !crate::core::admin::bearer_ok(s.token.as_ref(), req.headers()) {
        return crate::core::admin::unauthorized();
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
        // Granted the ID once, and its lease ran out since: ops wait.
        "lease_lapsed": s.link.lapsed(),
        "resync_hold": st.resync_hold.load(Ordering::Relaxed),
        "error": st.error(),
        "warning": st.warning(),
        "waiting": st.waiting(),
        "applied_total": st.applied.load(Ordering::Relaxed),
        "failed_total": st.failed.load(Ordering::Relaxed),
        "retries_total": st.retries.load(Ordering::Relaxed),
        "given_up_total": st.given_up.load(Ordering::Relaxed),
        "lease_lapses_total": st.lease_lapses.load(Ordering::Relaxed),
        "stream_gaps_total": st.stream_gaps.load(Ordering::Relaxed),
        "broker_reconnects_total": st.broker_reconnects.load(Ordering::Relaxed),
        "operator_skipped_total": st.skipped.load(Ordering::Relaxed),
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

/// An edge's status, read at scrape.
#[derive(Debug)]
pub struct EdgeCollector(pub Arc<Status>);

impl Collector for EdgeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let i = |a: &AtomicI64| a.load(Ordering::Relaxed);
        let b = |a: &AtomicBool| i64::from(a.load(Ordering::Relaxed));
        let p = "syncgate_edge";
        gauge(
            &mut enc,
            &format!("{p}_cursor"),
            "Highest seq applied in order",
            i(&s.cursor),
        )?;
        gauge(
            &mut enc,
            &format!("{p}_id_map_size"),
            "Central IDs mapped to this site's",
            i(&s.id_map_size),
        )?;
        counter(
            &mut enc,
            &format!("{p}_ops_applied"),
            "Ops applied, adopted or skipped",
            load(&s.applied),
        )?;
        counter(
            &mut enc,
            &format!("{p}_ops_failed"),
            "Ops that failed permanently",
            load(&s.failed),
        )?;
        counter(
            &mut enc,
            &format!("{p}_retries"),
            "Transient failures retried",
            load(&s.retries),
        )?;
        counter(
            &mut enc,
            &format!("{p}_ops_given_up"),
            "Ops recorded failed after --max-attempts server errors while the site answered other requests",
            load(&s.given_up),
        )?;
        counter(
            &mut enc,
            &format!("{p}_ops_operator_skipped"),
            "Ops passed over at an operator's request (POST /v1/ops/{seq}/skip at central)",
            load(&s.skipped),
        )?;
        counter(
            &mut enc,
            &format!("{p}_lease_lapses"),
            "Grants regained after this edge's lease lapsed (hellos answered late); the op stream waited meanwhile",
            load(&s.lease_lapses),
        )?;
        counter(
            &mut enc,
            &format!("{p}_stream_gaps"),
            "Live ops that showed ops missed before them, each followed by a replay from central",
            load(&s.stream_gaps),
        )?;
        counter(
            &mut enc,
            &format!("{p}_broker_reconnects"),
            "Connections to the broker after the first",
            load(&s.broker_reconnects),
        )?;
        counter(
            &mut enc,
            &format!("{p}_redriven"),
            "Re-drives from central handled",
            load(&s.redriven),
        )?;
        counter(
            &mut enc,
            &format!("{p}_control_rejected"),
            "Control messages from the broker dropped (forged, replayed, malformed)",
            load(&s.rejected),
        )?;
        gauge(
            &mut enc,
            &format!("{p}_broker_connected"),
            "1 when connected to the broker",
            b(&s.connected),
        )?;
        gauge(
            &mut enc,
            &format!("{p}_halted"),
            "1 when stopped after a failed op (--on-failure halt)",
            b(&s.halted),
        )?;
        gauge(
            &mut enc,
            &format!("{p}_resync_hold"),
            "1 while a resync from central holds the op stream",
            b(&s.resync_hold),
        )
    }
}
