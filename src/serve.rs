//! Serves HTTP (an axum router, or a hyper service per connection) on a bound
//! listener with the limits an exposed service needs: a header read timeout (a
//! client that trickles its request line and headers is dropped), a cap on concurrent connections (further
//! clients wait in the listen backlog), and a shutdown that stops accepting,
//! lets requests in flight finish, and closes what is left when the grace
//! period ends.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use axum::Router;
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::tls::ServerTls;

/// Limits of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time a client has to send its request line and headers.
    pub header_timeout: Duration,
    /// Longest pause while a client sends a request body.
    pub body_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// After shutdown starts: how long requests in flight may take.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// Work a connection's service hands to that connection's own task, polled
/// there beside the connection (the proxy's upstream connection kept for
/// one client): no other task is woken for it. What is left of it when the
/// connection ends goes on in a task of its own.
pub type Companion = BoxFuture<'static, ()>;

/// Where a connection's service sends its companions (none for most).
pub struct Companions(Option<mpsc::UnboundedReceiver<Companion>>);

impl Companions {
    pub fn none() -> Companions {
        Companions(None)
    }

    /// A sender for the service and what the connection's task polls.
    pub fn channel() -> (mpsc::UnboundedSender<Companion>, Companions) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Companions(Some(rx)))
    }
}

/// Serves `router` until `shutdown` resolves, then drains within the grace
/// period. Handlers see the peer address as `ConnectInfo<SocketAddr>`.
/// With `tls`, it serves HTTPS only.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_with(listener, limits, tls, shutdown, move |peer| {
        let service = TowerToHyperService::new(router.clone().map_request(
            move |mut req: axum::extract::Request<_>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        ));
        (service, Companions::none())
    })
    .await
}

/// Serves the service `make` builds for each connection (given the peer's
/// address; with the companions it may hand the connection's task), with
/// the same limits, TLS and shutdown as `serve`.
pub async fn serve_with<S, B>(
    listener: TcpListener,
    limits: HttpLimits,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
    make: impl Fn(SocketAddr) -> (S, Companions),
) -> std::io::Result<()>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    // The certificate is read again when its files change, while this serves.
    let mut fresh = JoinSet::new();
    if let Some(tls) = &tls {
        fresh.spawn(tls.clone().keep_fresh(crate::tls::RELOAD_EVERY));
    }
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pass, do not spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (service, companions) = make(peer);
        let stop = stop_rx.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let _permit = permit;
            let result = match tls {
                None => serve_connection(stream, service, companions, limits, stop).await,
                // The handshake has the time the request's headers have.
                Some(tls) => {
                    match tokio::time::timeout(limits.header_timeout, tls.acceptor().accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, service, companions, limits, stop).await
                        }
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
        // Reap finished connections as we go.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            open = conns.len(),
            "connections still open when the shutdown grace period ended; closing them"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    Ok(())
}

/// Serves HTTP/1.1 on one connection until it ends, or `stop` (then
/// gracefully: the request in flight finishes), polling its companions
/// beside it.
async fn serve_connection<I, S, B>(
    io: I,
    service: S,
    companions: Companions,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let Companions(mut handed) = companions;
    let mut running = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if !running.is_empty() {
                    tokio::spawn(async move { while running.next().await.is_some() {} });
                }
                return r;
            }
            Some(companion) = async {
                match handed.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => running.push(companion),
            Some(()) = running.next(), if !running.is_empty() => {}
            _ = crate::serve::stopped(&mut stop), if !stopping => {
                conn.as_mut().graceful_shutdown();
                stopping = true;
            }
        }
    }
}

/// A request body that fails when the client pauses longer than `idle`.
pub fn idle_timeout_body(body: axum::body::Body, idle: Duration) -> axum::body::Body {
    use futures_util::StreamExt;
    let stream = body.into_data_stream();
    let timed = futures_util::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(stream))),
            Ok(Some(Err(e))) => Some((Err(axum::Error::new(e)), None)),
            Ok(None) => None,
            Err(_) => Some((
                Err(axum::Error::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client paused sending its body for too long",
                ))),
                None,
            )),
        }
    });
    axum::body::Body::from_stream(timed)
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
