//! The central proxy: every request goes to the upstream Keystone unchanged, with
//! bodies streamed both ways; replicable writes take the capture path instead,
//! which records them in the op log around the forward.

pub mod capture;
pub mod error;
pub mod json;
pub mod order;
pub mod rewrite;
pub mod target;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use axum::response::IntoResponse;
use futures_util::{FutureExt, Stream, StreamExt};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Notify;
use tracing::{debug, field, warn, Instrument, Span};

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

/// The upstream client: hyper's pooled HTTP/1 client, TLS by rustls when the
/// upstream is `https`.
type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Upstream connections kept each for one client connection, at most (the
/// rest go through the pool): as many as the pool keeps idle.
const MAX_KEPT: usize = 256;
/// How long a kept connection its client left may wait for another client.
const KEPT_IDLE: Duration = Duration::from_secs(30);

/// The upstream connections kept for client connections.
struct Kept {
    /// Open now (each counted by its driver's `KeptSlot`).
    open: std::sync::atomic::AtomicUsize,
    /// Those whose clients left, the latest last, with when each was left:
    /// the next client connection takes one before opening one.
    unclaimed: std::sync::Mutex<Vec<(SendRequest<Body>, Instant)>>,
    open_gauge: prometheus_client::metrics::gauge::Gauge,
    unclaimed_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Kept {
    /// Leaves `sender` for the next client.
    fn leave(&self, sender: SendRequest<Body>) {
        let mut unclaimed = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        unclaimed.retain(|(s, left)| left.elapsed() < KEPT_IDLE && !s.is_closed());
        unclaimed.push((sender, Instant::now()));
        self.unclaimed_gauge.set(unclaimed.len() as i64);
    }

    /// A connection a client left, ready and not idle too long.
    fn claim(&self) -> Option<SendRequest<Body>> {
        let mut unclaimed = self.unclaimed.lock().unwrap_or_else(|p| p.into_inner());
        let mut found = None;
        while let Some((sender, left)) = unclaimed.pop() {
            if left.elapsed() < KEPT_IDLE && sender.is_ready() {
                found = Some(sender);
                break;
            }
        }
        self.unclaimed_gauge.set(unclaimed.len() as i64);
        found
    }
}

/// What the proxy shares between requests: cheap handles, built once.
pub struct Proxy {
    client: UpstreamClient,
    /// Opens the upstream connections kept for one client connection each.
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/` of the upstream, what `connector` is given.
    upstream_root: Uri,
    /// Upstream connections kept for client connections.
    kept: Arc<Kept>,
    upstream_scheme: Scheme,
    upstream_authority: Authority,
    /// The `Host` a request on a kept connection carries (the pool's client
    /// sets it itself): the upstream's authority, read once.
    upstream_host: Option<HeaderValue>,
    /// The upstream base URL without a trailing slash.
    upstream_base: String,
    /// The path prefix of the upstream base URL (empty or `/identity`).
    upstream_prefix: String,
    public_url: Option<String>,
    /// What `X-Forwarded-Proto` says when the client did not: `https` when
    /// the proxy's listener serves TLS.
    scheme: HeaderValue,
    timeout: Duration,
    /// Longest pause while a client sends a request body.
    body_timeout: Duration,
    max_capture_body: usize,
    replicate: Vec<RouteClass>,
    store: Store,
    metrics: Arc<Metrics>,
    /// Central's service client, to learn natural keys of unseen entities.
    keystone: Option<Arc<KeystoneClient>>,
    /// The edges' scopes that limit domains: a write of a class one of them
    /// carries has its owners read (`capture::owners_of`).
    domain_scopes: Vec<crate::keystone::scope::Scope>,
    /// Wakes the publisher when an op is logged.
    pub wake: Arc<Notify>,
    /// Wakes the resolver when a write is logged with an unknown outcome.
    pub unknown: Arc<Notify>,
    /// Orders conflicting writes from intent to commit.
    locks: order::EntityLocks,
    /// Keys of writes whose outcome is unknown, while they may still land.
    in_doubt: order::InDoubt,
    /// How long a write without an answer may still land upstream.
    settle: Duration,
    /// How long before an intent left open is logged as an unknown outcome.
    stale_after: Duration,
    /// Intents whose captured section is still running (never swept).
    in_flight: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Writes Keystone applied whose op the op log has not taken yet (their
    /// client was answered): being logged again, in the background.
    unlogged: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Intents of writes known not to have happened (Keystone refused them,
    /// or was not reached) that the op log could not drop yet: dropped in the
    /// background, never logged with an unknown outcome.
    pub(super) undone: std::sync::Mutex<std::collections::HashSet<uuid::Uuid>>,
    /// Signalled when the last running capture ends.
    captures_done: Notify,
    /// IDs the central Keystone did not know when asked: not asked again for
    /// a while, so that a write never waits twice on the same miss.
    unknown_ids: capture::Misses,
    /// Spawns the captures (they outlive their clients, not central).
    spawner: crate::scope::Spawner,
}

/// The client end of one connection, as the upstream is told about it.
pub struct Peer {
    addr: SocketAddr,
    /// `X-Forwarded-For` when the client sent none: its address, formatted once.
    forwarded_for: Option<HeaderValue>,
    /// The upstream connection kept for this client's reads, when idle. A
    /// client's HTTP/1 requests come one at a time: each goes out on it
    /// without a pool's checkout, and its connection is driven by the
    /// client connection's own task (see `serve::Companions`).
    upstream: std::sync::Mutex<Option<SendRequest<Body>>>,
    /// Where a new upstream connection's driver goes (none: the pool only).
    companions: Option<tokio::sync::mpsc::UnboundedSender<crate::serve::Companion>>,
    /// Where its kept connection goes when the client leaves.
    kept: Option<Arc<Kept>>,
}

impl Drop for Peer {
    /// The connection kept for this client waits for the next one (its
    /// driver goes on in a task of its own: see `serve::Companions`).
    fn drop(&mut self) {
        let (Some(kept), Some(sender)) = (
            &self.kept,
            self.upstream
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        ) else {
            return;
        };
        if sender.is_ready() {
            kept.leave(sender);
        }
    }
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            forwarded_for: HeaderValue::from_str(&addr.ip().to_string()).ok(),
            upstream: std::sync::Mutex::new(None),
            companions: None,
            kept: None,
        }
    }
}

impl Peer {
    /// Keeps `sender` for this client's next request.
    fn keep(&self, sender: SendRequest<Body>) {
        *self.upstream.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
    }
}

/// Counts an upstream connection kept for a client until it closes.
struct KeptSlot(Arc<Kept>);

impl KeptSlot {
    fn take(kept: &Arc<Kept>) -> Option<KeptSlot> {
        use std::sync::atomic::Ordering;
        kept.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_KEPT).then_some(n + 1)
            })
            .ok()?;
        kept.open_gauge.inc();
        Some(KeptSlot(kept.clone()))
    }
}

impl Drop for KeptSlot {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.open_gauge.dec();
    }
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

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The upstream client. Redirects are passed to the client, never followed,
/// and no proxy from the environment is used.
fn upstream_client(
    config: &CentralConfig,
) -> anyhow::Result<(UpstreamClient, HttpsConnector<HttpConnector>)> {
    use tokio_rustls::rustls::{crypto::ring, ClientConfig, RootCertStore};
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.upstream_timeout.min(Duration::from_secs(10))));
    let tls = hyper_rustls::HttpsConnectorBuilder::new();
    let tls = if let Some(ca) = &config.upstream_ca {
        tls.with_tls_config(crate::tls::client_trusting(ca, "--upstream-ca")?)
    } else if config.upstream.scheme() == "https" {
        tls.with_provider_and_native_roots(ring::default_provider())
            .map_err(|e| {
                anyhow::anyhow!(
                    "--upstream is https, but the system's CA certificates cannot be read: {e}"
                )
            })?
    } else {
        // Never used: the upstream speaks plain HTTP.
        tls.with_tls_config(
            ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth(),
        )
    };
    let connector = tls.https_or_http().enable_http1().wrap_connector(http);
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(MAX_KEPT)
        .build(connector.clone());
    Ok((client, connector))
}

impl Proxy {
    pub fn new(
        config: &CentralConfig,
        store: Store,
        metrics: Arc<Metrics>,
        keystone: Option<Arc<KeystoneClient>>,
        spawner: crate::scope::Spawner,
    ) -> anyhow::Result<Proxy> {
        let base: Uri = config.upstream.as_str().parse()?;
        let (Some(upstream_scheme), Some(upstream_authority)) =
            (base.scheme().cloned(), base.authority().cloned())
        else {
            anyhow::bail!("--upstream must be an absolute http(s) URL");
        };
        let upstream_base = config.upstream.as_str().trim_end_matches('/').to_string();
        let upstream_prefix = config.upstream.path().trim_end_matches('/').to_string();
        let (client, connector) = upstream_client(config)?;
        let upstream_root = Uri::builder()
            .scheme(upstream_scheme.clone())
            .authority(upstream_authority.clone())
            .path_and_query("/")
            .build()?;
        Ok(Proxy {
            client,
            connector,
            upstream_root,
            kept: Arc::new(Kept {
                open: Default::default(),
                unclaimed: Default::default(),
                open_gauge: metrics.upstream_kept.clone(),
                unclaimed_gauge: metrics.upstream_unclaimed.clone(),
            }),
            upstream_scheme,
            upstream_host: HeaderValue::from_str(upstream_authority.as_str()).ok(),
            upstream_authority,
            upstream_base,
            upstream_prefix,
            scheme: HeaderValue::from_static(if config.tls.is_some() {
                "https"
            } else {
                "http"
            }),
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
            domain_scopes: config
                .sync
                .scopes
                .values()
                .filter(|s| s.domains.is_some())
                .cloned()
                .collect(),
            wake: Arc::new(Notify::new()),
            unknown: Arc::new(Notify::new()),
            locks: order::EntityLocks::default(),
            in_doubt: order::InDoubt::default(),
            settle: config.upstream_settle,
            stale_after: config.stale_intent_after,
            in_flight: Default::default(),
            unlogged: Default::default(),
            undone: Default::default(),
            captures_done: Notify::new(),
            unknown_ids: Default::default(),
            spawner,
        })
    }

    /// The upstream URI for a request path and query. A write's path is
    /// normalised first (see `target`), so that what is classified is what is
    /// forwarded; a read's goes as it came.
    fn upstream_uri(&self, method: &Method, uri: &Uri) -> Result<Uri, ProxyError> {
        target::check_method(method.as_str()).map_err(ProxyError::RefusedTarget)?;
        let is_write = matches!(
            *method,
            Method::POST | Method::PUT | Method::PATCH | Method::DELETE
        );
        if !uri.path().starts_with('/') {
            return Err(ProxyError::BadRequestTarget);
        }
        let normalised;
        let path = if is_write {
            normalised = target::normalise_path(uri.path()).map_err(ProxyError::RefusedTarget)?;
            normalised.as_str()
        } else {
            uri.path()
        };
        let query = uri.query();
        let mut s = String::with_capacity(
            self.upstream_prefix.len() + path.len() + query.map_or(0, |q| q.len() + 1),
        );
        s.push_str(&self.upstream_prefix);
        s.push_str(path);
        if let Some(q) = query {
            s.push('?');
            s.push_str(q);
        }
        let path_and_query = PathAndQuery::from_maybe_shared(bytes::Bytes::from(s))
            .map_err(|_| ProxyError::BadRequestTarget)?;
        Uri::builder()
            .scheme(self.upstream_scheme.clone())
            .authority(self.upstream_authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ProxyError::BadRequestTarget)
    }

    /// The path Keystone routes on: the upstream URI's path less the base prefix.
    fn keystone_path<'a>(&self, uri: &'a Uri) -> &'a str {
        uri.path()
            .strip_prefix(self.upstream_prefix.as_str())
            .unwrap_or(uri.path())
    }

    /// The request for the upstream: hop-by-hop headers dropped (and
    /// `Content-Length` unless `keep_length`), `X-Forwarded-*` added.
    fn upstream_request(
        &self,
        method: Method,
        uri: Uri,
        mut headers: HeaderMap,
        peer: &Peer,
        keep_length: bool,
        body: Body,
    ) -> Request<Body> {
        let host = headers.remove(header::HOST);
        let strip_encoding = self.public_url.is_some();
        remove_headers(&mut headers, |n| {
            (n == "content-length" && !keep_length) || (n == "accept-encoding" && strip_encoding)
        });
        let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", peer.addr.ip())).ok(),
            None => peer.forwarded_for.clone(),
        };
        if let Some(v) = forwarded_for {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO, self.scheme.clone());
        }
        if let Some(host) = host {
            if !headers.contains_key(&X_FORWARDED_HOST) {
                headers.insert(X_FORWARDED_HOST, host);
            }
        }
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        req
    }

    /// Response headers for the client, in place: hop-by-hop dropped,
    /// `Location` rewritten to the public URL, `Content-Length` dropped when the
    /// body is rewritten.
    fn client_headers(&self, headers: &mut HeaderMap, rewriting: bool) {
        remove_headers(headers, |n| rewriting && n == "content-length");
        let Some(public) = &self.public_url else {
            return;
        };
        if let Some(rewritten) = headers
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| l.strip_prefix(self.upstream_base.as_str()))
            .and_then(|rest| HeaderValue::from_str(&format!("{public}{rest}")).ok())
        {
            headers.insert(header::LOCATION, rewritten);
        }
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

    /// Whether a request that is not captured gets spans: when traces are
    /// exported or debug logs asked for. Otherwise a read costs no span.
    fn trace_reads(&self) -> bool {
        crate::telemetry::exporting() || tracing::enabled!(tracing::Level::DEBUG)
    }

    /// Sends `req` upstream, waiting at most the timeout for the response
    /// headers: on the connection kept for `peer`'s client connection when
    /// there is one (or one may be opened), else through the pool.
    async fn send(
        &self,
        mut req: Request<Body>,
        traced: bool,
        peer: Option<&Peer>,
    ) -> Result<Response<Incoming>, SendError> {
        let span = if traced {
            tracing::info_span!(
                "upstream",
                http.request.method = %req.method(),
                http.response.status_code = field::Empty,
            )
        } else {
            Span::none()
        };
        // Keystone's own traces join the client's.
        if let Some(tp) = traced
            .then(|| crate::telemetry::traceparent(&span))
            .flatten()
        {
            if let Ok(v) = HeaderValue::from_str(&tp) {
                req.headers_mut().insert("traceparent", v);
            }
        }
        let sent = tokio::time::timeout(self.timeout, self.dispatch(req, peer))
            .instrument(span.clone())
            .await;
        match sent {
            Err(_) => Err(SendError::Timeout),
            Ok(Ok(resp)) => {
                span.record("http.response.status_code", resp.status().as_u16());
                Ok(resp)
            }
            Ok(Err(e)) => Err(e),
        }
    }

    async fn dispatch(
        &self,
        req: Request<Body>,
        peer: Option<&Peer>,
    ) -> Result<Response<Incoming>, SendError> {
        let req = match peer.filter(|p| p.companions.is_some()) {
            Some(peer) => match self.send_kept(req, peer).await {
                Ok(answered) => return answered,
                Err(req) => req,
            },
            None => req,
        };
        self.client.request(req).await.map_err(|e| {
            let cause = std::error::Error::source(&e).map(ToString::to_string);
            warn!(error = %e, cause, "upstream request failed");
            if e.is_connect() {
                SendError::Unreachable
            } else {
                SendError::Broken
            }
        })
    }

    /// Sends on the upstream connection kept for `peer`, opening one when
    /// it has none ready; gives the request back (for the pool) when no
    /// more may be kept. A kept connection that closed before the request
    /// was written (Keystone's keep-alive ran out) is replaced, the request
    /// sent on the new one.
    async fn send_kept(
        &self,
        mut req: Request<Body>,
        peer: &Peer,
    ) -> Result<Result<Response<Incoming>, SendError>, Request<Body>> {
        let absolute = req.uri().clone();
        // Origin form, with the Host the pool's client would have set.
        if let Some(pq) = absolute.path_and_query() {
            *req.uri_mut() = Uri::from(pq.clone());
        }
        if let Some(host) = &self.upstream_host {
            if !req.headers().contains_key(header::HOST) {
                req.headers_mut().insert(header::HOST, host.clone());
            }
        }
        let kept = peer
            .upstream
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            // Busy or closed: dropped (it closes), another is found or opened.
            .filter(SendRequest::is_ready)
            .or_else(|| self.kept.claim());
        if let Some(mut sender) = kept {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    peer.keep(sender);
                    return Ok(Ok(resp));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => {
                        warn!(error = %e.error(), "upstream request failed");
                        return Ok(Err(SendError::Broken));
                    }
                },
            }
        }
        let (Some(companions), Some(slot)) = (&peer.companions, KeptSlot::take(&self.kept)) else {
            *req.uri_mut() = absolute;
            return Err(req);
        };
        let io =
            match tower::ServiceExt::oneshot(self.connector.clone(), self.upstream_root.clone())
                .await
            {
                Ok(io) => io,
                Err(e) => {
                    let cause = std::error::Error::source(&*e).map(ToString::to_string);
                    warn!(error = %e, cause, "upstream request failed: cannot connect");
                    return Ok(Err(SendError::Unreachable));
                }
            };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "upstream request failed: cannot connect");
                return Ok(Err(SendError::Unreachable));
            }
        };
        let driver = async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                debug!(error = %e, "a kept upstream connection ended with an error");
            }
        };
        if let Err(refused) = companions.send(Box::pin(driver)) {
            // The client's connection is ending: driven on its own.
            tokio::spawn(refused.0);
        }
        match sender.send_request(req).await {
            Ok(resp) => {
                peer.keep(sender);
                Ok(Ok(resp))
            }
            Err(e) => {
                let cause = std::error::Error::source(&e).map(ToString::to_string);
                warn!(error = %e, cause, "upstream request failed");
                Ok(Err(SendError::Broken))
            }
        }
    }

    /// Forwards a request that is not captured, streaming both bodies.
    async fn forward_streaming(
        &self,
        uri: Uri,
        peer: &Peer,
        req: Request<Incoming>,
        traced: bool,
    ) -> Result<Response<Body>, ProxyError> {
        let (parts, body) = req.into_parts();
        let body = if body.is_end_stream() {
            Body::empty()
        } else {
            crate::serve::idle_timeout_body(Body::new(body), self.body_timeout)
        };
        let req = self.upstream_request(parts.method, uri, parts.headers, peer, true, body);
        let resp = self
            .send(req, traced, Some(peer))
            .await
            .map_err(|e| self.send_error(e, None))?;
        let (mut parts, body) = resp.into_parts();
        let rewriter = self.rewriter_for(&parts.headers);
        self.client_headers(&mut parts.headers, rewriter.is_some());
        let body = match rewriter {
            Some(rw) => Body::from_stream(rewrite_stream(body.into_data_stream(), rw)),
            None => Body::new(body),
        };
        Ok(build_response(parts.status, parts.headers, body))
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
        // Writes known not to have happened are dropped, not logged (if the
        // op log still cannot, they stay open, as a crash would leave them).
        let undone: Vec<uuid::Uuid> = self
            .undone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        for op_id in &undone {
            if let Err(e) = self.store.drop_intent(*op_id).await {
                tracing::warn!(error = %e, %op_id, "an intent of a write that did not happen stays open");
            }
        }
        let running: Vec<uuid::Uuid> = self
            .running()
            .into_iter()
            .filter(|id| !undone.contains(id))
            .collect();
        Ok(self
            .store
            .log_unknown(&running, "the gateway stopped before the upstream answered")
            .await?)
    }

    /// Writes that may have been applied upstream whose client was answered
    /// and which are not ops yet: abandoned intents, and applied writes the op
    /// log refused (logged again in the background). Every edge may lack them.
    pub async fn unlogged_writes(&self) -> anyhow::Result<usize> {
        let abandoned = self.abandoned_intents().await?.len();
        let retrying = self
            .unlogged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        Ok(abandoned + retrying)
    }

    pub(super) fn unlogged(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashSet<uuid::Uuid>> {
        self.unlogged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open intents whose captured section is no longer running: writes that
    /// may have been applied upstream and are not ops yet, oldest first.
    pub async fn abandoned_intents(&self) -> anyhow::Result<Vec<uuid::Uuid>> {
        let open = self.store.open_intent_ids().await?;
        let running = self.running();
        Ok(open
            .into_iter()
            .filter(|id| !running.contains(id))
            .collect())
    }

    /// Logs the open intents whose captured section is no longer running (an
    /// op log failure left them open after their write was forwarded) as
    /// `unknown_outcome` ops. A capture is registered as running before its
    /// intent is durable, and the intents are listed before the running set is
    /// read: an intent listed and not running has been abandoned. While they
    /// cannot be logged (the op log still fails), writes that conflict with
    /// them stay refused for `hold` more.
    pub async fn sweep_abandoned_intents(&self, hold: Duration) -> anyhow::Result<Vec<i64>> {
        let abandoned = self.abandoned_intents().await?;
        if abandoned.is_empty() {
            return Ok(Vec::new());
        }
        let logged = self
            .store
            .log_unknown(
                &abandoned,
                "the write's outcome was never logged; it may have been applied",
            )
            .await;
        let seqs = match logged {
            Ok(seqs) => seqs,
            Err(e) => {
                for op_id in &abandoned {
                    if let Ok(touches) = self.store.intent_touches(*op_id).await {
                        self.in_doubt
                            .hold(&touches, Instant::now() + self.settle + hold);
                    }
                }
                return Err(e.into());
            }
        };
        if !seqs.is_empty() {
            self.hold_in_doubt(Some(&seqs)).await?;
            self.unknown.notify_one();
        }
        Ok(seqs)
    }

    /// Writes in doubt (logged as unknown outcomes, not found applied or not
    /// yet: `only` these seqs, or all) may still land until the settle period
    /// after they were sent: writes that conflict with them are refused until
    /// then.
    pub async fn hold_in_doubt(&self, only: Option<&[i64]>) -> anyhow::Result<()> {
        let ops = self.store.in_doubt(self.settle).await?;
        let held = ops
            .iter()
            .filter(|(seq, _)| only.is_none_or(|seqs| seqs.contains(seq)));
        for (seq, left_ms) in held {
            let left = std::time::Duration::from_millis(u64::try_from(*left_ms).unwrap_or(0));
            let touches = self.store.op_touches(*seq).await?;
            self.in_doubt.hold(&touches, Instant::now() + left);
        }
        Ok(())
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
        let Ok(uri) = self.upstream_uri(&Method::GET, &Uri::from_static("/")) else {
            return false;
        };
        let mut req = Request::new(Body::empty());
        *req.uri_mut() = uri;
        self.send(req, false, None).await.is_ok()
    }
}

/// Removes, in one pass, the hop-by-hop headers (RFC 9110 section 7.6.1, and
/// those `Connection` lists) and those `also` names.
fn remove_headers(headers: &mut HeaderMap, also: impl Fn(&str) -> bool) {
    let listed = |name: &str| {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case(name))
    };
    let doomed = |n: &HeaderName| {
        let n = n.as_str();
        HOP_BY_HOP.contains(&n) || also(n) || listed(n)
    };
    // Most requests and answers carry none: nothing is allocated for them.
    if !headers.keys().any(doomed) {
        return;
    }
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in doomed {
        headers.remove(name);
    }
}

fn build_response(status: StatusCode, headers: HeaderMap, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

fn rewrite_stream<S, E>(
    stream: S,
    rewriter: UrlRewriter,
) -> impl Stream<Item = Result<bytes::Bytes, E>>
where
    S: Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
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

/// The proxy's service for one client connection, and what that
/// connection's task drives beside it (the upstream connection kept for it).
pub fn service(
    proxy: Arc<Proxy>,
    addr: SocketAddr,
) -> (
    impl hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future = impl Send + 'static,
        > + Send
        + 'static,
    crate::serve::Companions,
) {
    let (companions, driven) = crate::serve::Companions::channel();
    let mut peer = Peer::new(addr);
    peer.companions = Some(companions);
    peer.kept = Some(proxy.kept.clone());
    let peer = Arc::new(peer);
    let service = hyper::service::service_fn(move |req| {
        let proxy = proxy.clone();
        let peer = peer.clone();
        async move {
            // A bug answers 500 in Keystone's shape instead of a dropped connection.
            let resp = AssertUnwindSafe(handle(proxy, peer, req))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    keystone_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &ProxyError::Internal.to_string(),
                    )
                });
            Ok::<_, Infallible>(resp)
        }
    });
    (service, driven)
}

async fn handle(proxy: Arc<Proxy>, peer: Arc<Peer>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = crate::metrics::method_label(req.method());
    let target = match target::rerouting_header(req.headers()) {
        Some(name) => Err(ProxyError::RefusedHeader(name)),
        None => proxy.upstream_uri(req.method(), req.uri()),
    };
    let class = target
        .as_ref()
        .ok()
        .map(|uri| keystone::classify(req.method().as_str(), proxy.keystone_path(uri)));
    let route = class.as_ref().map_or("invalid", route_label);
    let captured = matches!(
        &class,
        Some(Classification::Replicable(r)) if proxy.replicate.contains(&r.class)
    );
    // Captured writes are always traced; the rest when someone looks.
    let traced = captured || proxy.trace_reads();
    let span = if traced {
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
        span
    } else {
        Span::none()
    };
    let work = async move {
        let resp = match (target, class) {
            (Err(e), _) => Err(e),
            (Ok(uri), Some(Classification::Replicable(route))) if captured => {
                capture::forward_captured(&proxy, route, uri, &peer, req.map(Body::new)).await
            }
            (Ok(uri), _) => proxy.forward_streaming(uri, &peer, req, traced).await,
        };
        let resp = resp.unwrap_or_else(IntoResponse::into_response);
        let status = resp.status().as_u16();
        let elapsed = started.elapsed();
        Span::current().record("status", status);
        proxy.metrics.request(method, route, status, elapsed);
        // Per request only at debug: a read never waits on a log write.
        debug!(elapsed_ms = elapsed.as_millis() as u64, "request done");
        resp
    };
    if traced {
        work.instrument(span).await
    } else {
        work.await
    }
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
