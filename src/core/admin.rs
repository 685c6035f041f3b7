//! What both admin listeners share: their error answers and the bearer-token
//! check.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::Secret;

/// An audit API error: a status and a message, as JSON.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.0.as_u16(), "message": self.1}});
        (self.0, Json(body)).into_response()
    }
}

/// Whether `Authorization: Bearer <token>` matches (constant time); true when no
/// token is configured.
pub fn bearer_ok(token: Option<&Secret>, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = token else { return true };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|p| token.matches(p))
}

/// 401 with `WWW-Authenticate: Bearer`.
pub fn unauthorized() -> Response {
    let mut resp = ApiError(
        StatusCode::UNAUTHORIZED,
        "a valid admin bearer token is required".into(),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}
