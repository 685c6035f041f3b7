//! A fake identity API for in-process tests. Like Keystone it generates its own
//! IDs and ignores `id` in create bodies (domains take `explicit_domain_id`,
//! regions their `id`), answers in Keystone's shapes, and issues tokens whose
//! catalog names its own URL. A request header `x-fake-status: N` makes it answer
//! N instead; a path under `/slow`, or a request with `x-fake-hang`, never answers;
//! `x-fake-delay-ms: N` answers after N ms; `x-fake-big: N` answers 201 with N bytes;
//! `x-fake-close` closes the connection after the answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

#[derive(Default)]
pub struct Seen {
    /// Every request received: method, path and query, headers, body.
    pub requests: Mutex<Vec<(Method, String, HeaderMap, Bytes)>>,
    /// The connection each request came on (its peer's address), in order.
    pub peers: Mutex<Vec<SocketAddr>>,
    pub count: AtomicUsize,
}

pub struct FakeKeystone {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
}

impl FakeKeystone {
    pub async fn start() -> FakeKeystone {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let state = (seen.clone(), format!("http://{addr}"));
        let app = Router::new().fallback(handle).with_state(state);
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap()
        });
        FakeKeystone { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn count(&self) -> usize {
        self.seen.count.load(Ordering::SeqCst)
    }

    /// The connection each request came on, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.seen.peers.lock().unwrap().clone()
    }

    pub fn last_request(&self) -> (Method, String, HeaderMap, Bytes) {
        self.seen
            .requests
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request reached the fake")
    }
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The JSON key Keystone wraps a created entity in, by the path segment
/// its create or member route ends with: from syncgate's catalogue.
fn singular(collection: &str) -> &str {
    syncgate::keystone::kinds::ALL
        .iter()
        .filter(|k| !k.member.is_empty())
        .find(|k| {
            k.routes.iter().any(|r| match r.pattern {
                [.., last] if *last == collection => true,
                [.., coll, "*"] => *coll == collection,
                _ => false,
            })
        })
        .map_or(collection, |k| k.member)
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut resp = (status, text).into_response();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp.headers_mut().insert(
        "x-openstack-request-id",
        format!("req-{}", uuid::Uuid::new_v4()).parse().unwrap(),
    );
    resp
}

async fn handle(State(state): State<(Arc<Seen>, String)>, req: Request) -> Response {
    let close = req.headers().contains_key("x-fake-close");
    let mut resp = answer(state, req).await;
    if close {
        resp.headers_mut()
            .insert("connection", "close".parse().unwrap());
    }
    resp
}

async fn answer((seen, base): (Arc<Seen>, String), req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if let Some(peer) = parts
        .extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
    {
        seen.peers.lock().unwrap().push(peer.0);
    }
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let full = parts
        .uri
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    seen.requests.lock().unwrap().push((
        parts.method.clone(),
        full,
        parts.headers.clone(),
        body.clone(),
    ));
    seen.count.fetch_add(1, Ordering::SeqCst);

    if path.starts_with("/slow") || parts.headers.contains_key("x-fake-hang") {
        return std::future::pending().await;
    }
    if let Some(n) = parts.headers.get("x-fake-big") {
        let n: usize = n.to_str().unwrap().parse().unwrap();
        return json_response(
            StatusCode::CREATED,
            json!({"project": {"id": new_id(), "pad": "x".repeat(n)}}),
        );
    }
    if let Some(ms) = parts.headers.get("x-fake-delay-ms") {
        let ms: u64 = ms.to_str().unwrap().parse().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if let Some(status) = parts.headers.get("x-fake-status") {
        let code: u16 = status.to_str().unwrap().parse().unwrap();
        let status = StatusCode::from_u16(code).unwrap();
        return json_response(
            status,
            json!({"error": {"code": code, "title": "Fake", "message": "fake failure"}}),
        );
    }
    if path == "/v3/auth/tokens" && parts.method == Method::POST {
        let mut resp = json_response(
            StatusCode::CREATED,
            json!({"token": {
                "methods": ["password"],
                "catalog": [{"type": "identity", "endpoints": [
                    {"interface": "public", "url": format!("{base}/v3/")},
                    {"interface": "internal", "url": format!("{base}/v3")}
                ]}]
            }}),
        );
        resp.headers_mut()
            .insert("x-subject-token", "gAAAAfake-issued-token".parse().unwrap());
        return resp;
    }
    if path == "/echo" {
        let headers: HashMap<String, String> = parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        return json_response(StatusCode::OK, json!({"headers": headers}));
    }
    if path == "/bytes" {
        // A large body of every byte value, to check reads pass through unchanged.
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        return (
            StatusCode::NON_AUTHORITATIVE_INFORMATION,
            [
                ("content-type", "application/octet-stream"),
                ("x-custom", "kept"),
            ],
            payload,
        )
            .into_response();
    }

    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match parts.method {
        Method::GET | Method::HEAD => json_response(
            StatusCode::OK,
            json!({"links": {"self": format!("{base}{path}")}, "items": []}),
        ),
        Method::POST => {
            let collection = segments.last().copied().unwrap_or("");
            if matches!(collection, "limits" | "registered_limits") {
                let items: Vec<Value> = request[collection]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|mut item| {
                        item["id"] = json!(new_id());
                        item
                    })
                    .collect();
                return json_response(StatusCode::CREATED, json!({ collection: items }));
            }
            if collection == "password" {
                return json_response(StatusCode::NO_CONTENT, Value::Null);
            }
            let key = singular(collection);
            let mut entity = request.get(key).cloned().unwrap_or_else(|| json!({}));
            let id = match key {
                "domain" => entity["explicit_domain_id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(new_id),
                "region" => entity["id"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(new_id),
                _ => new_id(),
            };
            if collection == "OS-EC2" {
                entity = json!({"access": new_id(), "secret": new_id()});
            } else {
                entity["id"] = json!(id);
            }
            entity["links"] = json!({"self": format!("{base}{path}/{id}")});
            json_response(StatusCode::CREATED, json!({ key: entity }))
        }
        Method::PUT
            if segments.first() == Some(&"v3") && segments.get(1) == Some(&"OS-FEDERATION")
                || (segments.get(1) == Some(&"regions") && segments.len() == 3) =>
        {
            let id = segments.last().unwrap();
            let key = singular(segments[segments.len() - 2]);
            json_response(StatusCode::CREATED, json!({ key: {"id": id} }))
        }
        Method::PATCH => {
            let key = singular(segments[segments.len() - 2]);
            let id = segments.last().unwrap();
            json_response(StatusCode::OK, json!({ key: {"id": id} }))
        }
        _ => json_response(StatusCode::NO_CONTENT, Value::Null),
    }
}
