//! The central proxy: every request goes to the upstream Keystone unchanged, with
//! bodies streamed both ways; replicable writes take the capture path instead,
//! which records them in the op log around the forward.

pub mod capture;
pub mod error;
pub mod json;
pub mod order;
pub mod rewrite;
pub mod target;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::{Stream, StreamExt};
use reqwest::Url;
use tokio::sync::Notify;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::{debug, field, warn, Instrument};

use crate::keystone::client::KeystoneClient;
use crate::keystone::{self, Classification, RouteClass};
use crate::metrics::Metrics;
use crate::settings::config::CentralConfig;
use crate::store::Store;
use error::{keystone_error, ProxyError};
use rewrite::UrlRewriter;

/// Headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The response header carrying Keystone's request id.
pub const REQUEST_ID: &str = "x-openstack-request-id";

/// What the proxy shares between requests: cheap handles, built once.
pub struct Proxy {
    client: reqwest::Client,
    /// The upstream base URL without a trailing slash.
    upstream_base: String,
    /// The path prefix of the upstream base URL (empty or `/identity`).
    upstream_prefix: String,
    public_url: Option<String>,
    timeout: Duration,
    /// Longest pause while a client sends a request body.
    body_timeout: Duration,
    max_capture_body: usize,
    replicate: Vec<RouteClass>,
    store: Store,
    metrics: Arc<Metrics>,
    /// Central's service client, to learn natural keys of unseen entities.
    keystone: Option<Arc<KeystoneClient>>,
    /// Wakes the publisher when an op is logged.
    pub wake: Arc<Notify>,
    /// Orders conflicting writes from intent to commit.
    locks: order::EntityLocks,
    /// Intents whose captured section is still running (never swept).
    in_flight: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Signalled when the last running capture ends.
    captures_done: Notify,
    /// IDs the central Keystone did not know when asked: not asked again for
    /// a while, so that a write never waits twice on the same miss.
    unknown_ids: capture::Misses,
}

/// Why a request could not be sent or answered.
#[derive(Debug)]
pub enum SendError {
    /// Nothing reached the upstream (connection refused, DNS, connect timeout).
    Unreachable,
    /// The request may have reached the upstream, but the exchange broke.
    Broken,
    /// No response headers within the timeout.
    Timeout,
}

impl Proxy {
    pub fn new(
        config: &CentralConfig,
        store: Store,
        metrics: Arc<Metrics>,
        keystone: Option<Arc<KeystoneClient>>,
    ) -> anyhow::Result<Proxy> {
        let client = reqwest::Client::builder()
            // A proxy passes redirects to its client instead of following them.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(config.upstream_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        let upstream_base = config.upstream.as_str().trim_end_matches('/').to_string();
        let upstream_prefix = config.upstream.path().trim_end_matches('/').to_string();
        Ok(Proxy {
            client,
            upstream_base,
            upstream_prefix,
            public_url: config
                .public_url
                .as_ref()
                .map(|u| u.as_str().trim_end_matches('/').to_string()),
            timeout: config.upstream_timeout,
            body_timeout: config.http.body_timeout,
            max_capture_body: config.max_capture_body,
            replicate: config.replicate.clone(),
            store,
            metrics,
            keystone,
            wake: Arc::new(Notify::new()),
            locks: order::EntityLocks::default(),
            in_flight: Default::default(),
            captures_done: Notify::new(),
            unknown_ids: Default::default(),
        })
    }

    /// The upstream URL for a request path and query. A write's path is
    /// normalised first (see `target`), so that what is classified is what is
    /// forwarded; a read's goes as it came.
    fn upstream_url(&self, method: &Method, uri: &axum::http::Uri) -> Result<Url, ProxyError> {
        target::check_method(method.as_str()).map_err(ProxyError::RefusedTarget)?;
        let is_write = matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        let normalised;
        let path = if is_write {
            normalised = target::normalise_path(uri.path()).map_err(ProxyError::RefusedTarget)?;
            normalised.as_str()
        } else {
            uri.path()
        };
        let mut s = String::with_capacity(self.upstream_base.len() + path.len() + 32);
        s.push_str(&self.upstream_base);
        s.push_str(path);
        if let Some(q) = uri.query() {
            s.push('?');
            s.push_str(q);
        }
        Url::parse(&s).map_err(|_| ProxyError::BadRequestTarget)
    }

    /// The path Keystone routes on: the upstream URL's path less the base prefix.
    fn keystone_path<'a>(&self, url: &'a Url) -> &'a str {
        url.path()
            .strip_prefix(self.upstream_prefix.as_str())
            .unwrap_or(url.path())
    }

    /// Request headers for the upstream: hop-by-hop dropped, `X-Forwarded-*` added.
    fn request_headers(&self, src: &HeaderMap, peer: SocketAddr, keep_length: bool) -> HeaderMap {
        let listed = connection_listed(src);
        let mut out = HeaderMap::with_capacity(src.len() + 3);
        for (name, value) in src {
            let n = name.as_str();
            if HOP_BY_HOP.contains(&n)
                || n == "host"
                || (n == "content-length" && !keep_length)
                || (n == "accept-encoding" && self.public_url.is_some())
                || listed.iter().any(|l| l == n)
            {
                continue;
            }
            out.append(name.clone(), value.clone());
        }
        let client_ip = peer.ip().to_string();
        let xff = match src.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {client_ip}"),
            None => client_ip,
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            out.insert("x-forwarded-for", v);
        }
        if !out.contains_key("x-forwarded-proto") {
            out.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        }
        if !out.contains_key("x-forwarded-host") {
            if let Some(host) = src.get(header::HOST) {
                out.insert("x-forwarded-host", host.clone());
            }
        }
        out
    }

    /// Response headers for the client: hop-by-hop dropped, `Location` rewritten
    /// to the public URL, `Content-Length` dropped when the body is rewritten.
    fn response_headers(&self, src: &HeaderMap, rewriting: bool) -> HeaderMap {
        let listed = connection_listed(src);
        let mut out = HeaderMap::with_capacity(src.len());
        for (name, value) in src {
            let n = name.as_str();
            if HOP_BY_HOP.contains(&n)
                || (rewriting && n == "content-length")
                || listed.iter().any(|l| l == n)
            {
                continue;
            }
            out.append(name.clone(), value.clone());
        }
        if let (Some(public), Some(location)) = (&self.public_url, src.get(header::LOCATION)) {
            if let Some(rewritten) = location
                .to_str()
                .ok()
                .and_then(|l| l.strip_prefix(self.upstream_base.as_str()))
                .and_then(|rest| HeaderValue::from_str(&format!("{public}{rest}")).ok())
            {
                out.insert(header::LOCATION, rewritten);
            }
        }
        out
    }

    /// A rewriter when the response body carries the upstream's URL to replace.
    fn rewriter_for(&self, headers: &HeaderMap) -> Option<UrlRewriter> {
        let public = self.public_url.as_ref()?;
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        let encoded = headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity");
        (is_json && !encoded).then(|| UrlRewriter::new(&self.upstream_base, public))
    }

    /// Sends a request, waiting at most the timeout for the response headers.
    async fn send(&self, mut req: reqwest::Request) -> Result<reqwest::Response, SendError> {
        let span = tracing::info_span!(
            "upstream",
            http.request.method = %req.method(),
            http.response.status_code = field::Empty,
        );
        // Keystone's own traces join the client's.
        if let Some(tp) = crate::telemetry::traceparent(&span) {
            if let Ok(v) = HeaderValue::from_str(&tp) {
                req.headers_mut().insert("traceparent", v);
            }
        }
        let sent = tokio::time::timeout(self.timeout, self.client.execute(req))
            .instrument(span.clone())
            .await;
        if let Ok(Ok(resp)) = &sent {
            span.record("http.response.status_code", resp.status().as_u16());
        }
        match sent {
            Err(_) => Err(SendError::Timeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => {
                let e = e.without_url();
                warn!(error = %e, "upstream request failed");
                if e.is_connect() {
                    Err(SendError::Unreachable)
                } else if e.is_timeout() {
                    Err(SendError::Timeout)
                } else {
                    Err(SendError::Broken)
                }
            }
        }
    }

    /// Forwards a request that is not captured, streaming both bodies.
    async fn forward_streaming(
        &self,
        url: Url,
        peer: SocketAddr,
        req: Request,
    ) -> Result<Response, ProxyError> {
        let (parts, body) = req.into_parts();
        let mut upstream_req = reqwest::Request::new(parts.method, url);
        *upstream_req.headers_mut() = self.request_headers(&parts.headers, peer, true);
        let body = crate::serve::idle_timeout_body(body, self.body_timeout);
        *upstream_req.body_mut() = Some(reqwest::Body::wrap_stream(body.into_data_stream()));
        let resp = self
            .send(upstream_req)
            .await
            .map_err(|e| self.send_error(e, None))?;
        let status = resp.status();
        let rewriter = self.rewriter_for(resp.headers());
        let headers = self.response_headers(resp.headers(), rewriter.is_some());
        let stream = resp.bytes_stream();
        let body = match rewriter {
            Some(rw) => Body::from_stream(rewrite_stream(stream, rw)),
            None => Body::from_stream(stream),
        };
        Ok(build_response(status, headers, body))
    }

    /// Maps a send failure to the client's error, counting it.
    fn send_error(&self, e: SendError, seq: Option<i64>) -> ProxyError {
        match e {
            SendError::Unreachable => {
                self.metrics.upstream_error("unreachable");
                ProxyError::UpstreamUnreachable
            }
            SendError::Broken => {
                self.metrics.upstream_error("broken");
                ProxyError::UpstreamBroken(seq)
            }
            SendError::Timeout => {
                self.metrics.upstream_error("timeout");
                ProxyError::UpstreamTimeout {
                    secs: self.timeout.as_secs().max(1),
                    seq,
                }
            }
        }
    }

    /// Waits (at most `limit`) for captures still running, whose clients may have
    /// gone: at shutdown they are let finish before the op log closes.
    pub async fn drain_captures(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let done = self.captures_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
            {
                return true;
            }
            if tokio::time::timeout_at(deadline, done).await.is_err() {
                return false;
            }
        }
    }

    /// At the end of the shutdown grace period: the intents of captures still
    /// running are logged as `unknown_outcome` ops, so none is left open.
    pub async fn abandon_running_captures(&self) -> anyhow::Result<Vec<i64>> {
        let running: Vec<uuid::Uuid> = self.running().into_iter().collect();
        Ok(self
            .store
            .log_unknown(&running, "the gateway stopped before the upstream answered")
            .await?)
    }

    /// Logs intents open for longer than `older_than` whose captured section is no
    /// longer running (an op log failure left them) as `unknown_outcome` ops.
    pub async fn sweep_stale_intents(&self, older_than: Duration) -> anyhow::Result<Vec<i64>> {
        let running = self.running();
        let stale: Vec<uuid::Uuid> = self
            .store
            .intents_older_than(older_than)
            .await?
            .into_iter()
            .filter(|id| !running.contains(id))
            .collect();
        let seqs = self
            .store
            .log_unknown(
                &stale,
                "the write's outcome was never logged; it may have been applied",
            )
            .await?;
        if !seqs.is_empty() {
            self.wake.notify_one();
        }
        Ok(seqs)
    }

    /// The op IDs of the captures running now.
    fn running(&self) -> std::collections::HashSet<uuid::Uuid> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the upstream answers at all (readiness).
    pub async fn upstream_reachable(&self) -> bool {
        let Ok(url) = Url::parse(&format!("{}/", self.upstream_base)) else {
            return false;
        };
        let req = reqwest::Request::new(Method::GET, url);
        self.send(req).await.is_ok()
    }
}

/// Header names listed in `Connection`, which are hop-by-hop for this hop.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

fn build_response(status: StatusCode, headers: HeaderMap, body: Body) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

fn rewrite_stream<S>(
    stream: S,
    rewriter: UrlRewriter,
) -> impl Stream<Item = Result<bytes::Bytes, reqwest::Error>>
where
    S: Stream<Item = Result<bytes::Bytes, reqwest::Error>> + Send + Unpin + 'static,
{
    futures_util::stream::unfold(Some((stream, rewriter)), |state| async move {
        let (mut stream, mut rw) = state?;
        match stream.next().await {
            Some(Ok(chunk)) => Some((Ok(rw.push(&chunk)), Some((stream, rw)))),
            Some(Err(e)) => Some((Err(e), None)),
            None => Some((Ok(rw.finish()), None)),
        }
    })
}

/// The proxy's router: one fallback handler for every method and path.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(proxy)
        // Outermost: a bug answers 500 in Keystone's shape instead of a dropped connection.
        .layer(CatchPanicLayer::custom(|_| {
            keystone_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &ProxyError::Internal.to_string(),
            )
        }))
}

async fn handle(
    State(proxy): State<Arc<Proxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let method = crate::metrics::method_label(req.method());
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        status = field::Empty,
        seq = field::Empty,
        op_id = field::Empty,
    );
    // A client's trace continues through the gateway.
    crate::telemetry::follow(
        &span,
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    async move {
        let started = Instant::now();
        let mut route = "invalid";
        let resp = match proxy.upstream_url(req.method(), req.uri()) {
            Err(e) => Err(e),
            Ok(url) => {
                let class = keystone::classify(req.method().as_str(), proxy.keystone_path(&url));
                route = route_label(&class);
                match class {
                    Classification::Replicable(route) if proxy.replicate.contains(&route.class) => {
                        capture::forward_captured(&proxy, route, url, peer, req).await
                    }
                    _ => proxy.forward_streaming(url, peer, req).await,
                }
            }
        };
        let resp = resp.unwrap_or_else(IntoResponse::into_response);
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        tracing::Span::current().record("status", status);
        proxy.metrics.request(method, route, status, elapsed);
        // Per request only at debug: a read never waits on a log write.
        debug!(elapsed_ms = elapsed.as_millis() as u64, "request done");
        resp
    }
    .instrument(span)
    .await
}

/// The route class of a request, as a metrics label.
fn route_label(class: &Classification) -> &'static str {
    match class {
        Classification::Replicable(route) => route.class.as_str(),
        Classification::NotReplicated(keystone::Reason::Read) => "read",
        Classification::NotReplicated(keystone::Reason::TokenFlow) => "token",
        Classification::NotReplicated(keystone::Reason::SiteLocal) => "site_local",
        Classification::NotReplicated(keystone::Reason::UnknownRoute) => "unknown",
    }
}
