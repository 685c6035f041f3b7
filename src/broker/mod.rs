//! The embedded broker: a server for the NATS client protocol (protocol 1) that
//! unmodified NATS clients use, so that one `syncgate central` process serves a
//! site without an external server. `parser` reads the protocol, `sublist`
//! matches subjects, `conn` runs each connection.

mod conn;
pub mod parser;
pub mod sublist;

pub use crate::core::Secret;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::tls::{CertFiles, ServerTls};
use anyhow::Context;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use conn::{Client, Subscription};
use sublist::Sublist;

/// How clients must authenticate.
#[derive(Debug, Clone, Default)]
pub enum BrokerAuth {
    #[default]
    None,
    /// `auth_token` in CONNECT.
    Token(Secret),
    /// `user` and `pass` in CONNECT.
    UserPassword { user: String, password: Secret },
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub auth: BrokerAuth,
    /// The listener's certificate (read again when its files change).
    pub tls: Option<CertFiles>,
    /// With `tls`: clients must present a certificate this CA signed.
    pub tls_client_ca: Option<PathBuf>,
    /// Largest message (headers and payload) a client may publish.
    pub max_payload: usize,
    pub max_control_line: usize,
    /// Bytes queued for one client before it is closed as a slow consumer.
    pub max_pending: usize,
    /// How often an idle client is pinged.
    pub ping_interval: Duration,
    /// Unanswered pings after which a client is closed as stale.
    pub max_pings_out: u32,
    /// Time allowed for CONNECT (and the TLS handshake) when auth is on.
    pub auth_timeout: Duration,
    /// Clients connected at once; more are refused with nats-server's
    /// `maximum connections exceeded`.
    pub max_connections: usize,
    /// Subscriptions one client may hold; more are refused with
    /// `Maximum Subscriptions Exceeded` (the connection stays).
    pub max_subscriptions: usize,
    /// Longest subject a subscription may name, in bytes.
    pub max_subject_len: usize,
    /// Most tokens (dot-separated parts) in a subscription's subject.
    pub max_subject_tokens: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 4222)),
            auth: BrokerAuth::None,
            tls: None,
            tls_client_ca: None,
            max_payload: 1024 * 1024,
            max_control_line: 4096,
            max_pending: 64 * 1024 * 1024,
            ping_interval: Duration::from_secs(120),
            max_pings_out: 2,
            auth_timeout: Duration::from_secs(2),
            max_connections: 4096,
            max_subscriptions: 1024,
            max_subject_len: 256,
            max_subject_tokens: 16,
        }
    }
}

/// Counters, for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted since start.
    pub connections: AtomicU64,
    /// Connections open now.
    pub open_connections: AtomicU64,
    pub msgs_in: AtomicU64,
    pub msgs_out: AtomicU64,
    /// Payload and header bytes published to the broker.
    pub bytes_in: AtomicU64,
    /// Payload and header bytes the broker delivered.
    pub bytes_out: AtomicU64,
    pub slow_consumers: AtomicU64,
}

/// A subscription handle in the sublist, compared by identity.
#[derive(Clone)]
pub(crate) struct SubRef(Arc<Subscription>);

impl PartialEq for SubRef {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    config: Arc<BrokerConfig>,
    sublist: Sublist<SubRef>,
    stats: Arc<Stats>,
    server_id: String,
    next_cid: AtomicU64,
    queue_pick: AtomicUsize,
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    /// Connections open now (accepted, not yet closed).
    open: AtomicUsize,
}

impl Shared {
    fn auth_required(&self) -> bool {
        !matches!(self.config.auth, BrokerAuth::None)
    }

    /// Checks CONNECT credentials in constant time.
    fn check_auth(&self, token: Option<&str>, user: Option<&str>, pass: Option<&str>) -> bool {
        match &self.config.auth {
            BrokerAuth::None => true,
            BrokerAuth::Token(expected) => token.is_some_and(|t| expected.matches(t.as_bytes())),
            BrokerAuth::UserPassword { user: u, password } => {
                let user_ok = Secret::new(u.as_str()).matches(user.unwrap_or_default().as_bytes());
                let pass_ok = password.matches(pass.unwrap_or_default().as_bytes());
                user_ok & pass_ok & user.is_some() & pass.is_some()
            }
        }
    }

    /// Where to start in a queue group, spreading messages over members.
    fn next_queue_pick(&self, members: usize) -> usize {
        self.queue_pick.fetch_add(1, Ordering::Relaxed) % members.max(1)
    }

    fn register(&self, client: Arc<Client>) {
        self.lock_clients().insert(client.cid, client);
    }

    fn deregister(&self, cid: u64) {
        self.lock_clients().remove(&cid);
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Client>>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info_line(&self, cid: u64, peer: SocketAddr, local: SocketAddr) -> Vec<u8> {
        let mut info = json!({
            "server_id": self.server_id,
            "server_name": "syncgate",
            "version": env!("CARGO_PKG_VERSION"),
            "proto": 1,
            "host": local.ip().to_string(),
            "port": local.port(),
            "headers": true,
            "max_payload": self.config.max_payload,
            "client_id": cid,
            "client_ip": peer.ip().to_string(),
        });
        if self.auth_required() {
            info["auth_required"] = json!(true);
        }
        if self.config.tls.is_some() {
            info["tls_required"] = json!(true);
        }
        if self.config.tls_client_ca.is_some() {
            info["tls_verify"] = json!(true);
        }
        format!("INFO {info}\r\n").into_bytes()
    }
}

/// A bound broker, not yet serving.
pub struct Broker {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<ServerTls>,
}

impl Broker {
    pub async fn bind(config: BrokerConfig) -> anyhow::Result<Broker> {
        let tls = match &config.tls {
            Some(files) => Some(
                ServerTls::new(
                    files,
                    config
                        .tls_client_ca
                        .as_deref()
                        .map(|ca| (ca, "--broker-tls-client-ca")),
                )?
                .without_alpn(),
            ),
            None if config.tls_client_ca.is_some() => {
                anyhow::bail!("--broker-tls-client-ca needs --broker-tls-cert and --broker-tls-key")
            }
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (--broker-listen)", config.listen))?;
        let shared = Arc::new(Shared {
            config: Arc::new(config),
            sublist: Sublist::new(),
            stats: Arc::new(Stats::default()),
            server_id: format!("SG{}", uuid::Uuid::new_v4().simple()).to_uppercase(),
            next_cid: AtomicU64::new(1),
            queue_pick: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
        });
        Ok(Broker {
            listener,
            shared,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The listener's TLS, when it serves TLS.
    pub fn tls(&self) -> Option<&ServerTls> {
        self.tls.as_ref()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.shared.stats.clone()
    }

    /// Serves until `shutdown` resolves, then closes every connection.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let local = self.local_addr();
        info!(addr = %local, tls = self.tls.is_some(), auth = self.shared.auth_required(), "broker listening");
        let mut conns = JoinSet::new();
        // The certificate is read again when its files change, while this serves.
        let mut fresh = JoinSet::new();
        if let Some(tls) = &self.tls {
            fresh.spawn(tls.clone().keep_fresh(crate::tls::RELOAD_EVERY));
        }
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        conns.spawn(handle(self.shared.clone(), stream, peer, local, self.tls.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        warn!(error = %e, "broker accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                _ = &mut shutdown => break,
            }
        }
        let clients: Vec<_> = self.shared.lock_clients().values().cloned().collect();
        for client in clients {
            client.begin_close();
        }
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            conns.abort_all();
        }
        info!("broker stopped");
        Ok(())
    }
}

async fn handle(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<ServerTls>,
) {
    let _ = stream.set_nodelay(true);
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    let _open = OpenConnection::count(&shared);
    let cid = shared.next_cid.fetch_add(1, Ordering::Relaxed);
    debug!(cid, %peer, "client connection");
    if stream
        .write_all(&shared.info_line(cid, peer, local))
        .await
        .is_err()
    {
        return;
    }
    // As nats-server: INFO first, then the refusal.
    if shared.open.load(Ordering::Relaxed) > shared.config.max_connections {
        refuse(stream, b"-ERR 'maximum connections exceeded'\r\n").await;
        return;
    }
    match tls {
        None => {
            let (reader, writer) = stream.into_split();
            conn::serve(shared, cid, peer, reader, writer).await;
        }
        Some(tls) => {
            let timeout = shared.config.auth_timeout.max(Duration::from_secs(2));
            // A TLS client's first byte is a handshake record (0x16).
            let mut first = [0u8; 1];
            match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == 0x16 => {}
                Ok(Ok(_)) => {
                    refuse(stream, b"-ERR 'Secure Connection - TLS Required'\r\n").await;
                    return;
                }
                _ => return,
            }
            match tokio::time::timeout(timeout, tls.acceptor().accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    let (reader, writer) = tokio::io::split(tls_stream);
                    conn::serve(shared, cid, peer, reader, writer).await;
                }
                Ok(Err(e)) => info!(cid, %peer, error = %e, "TLS handshake failed"),
                Err(_) => info!(cid, %peer, "TLS handshake timed out"),
            }
        }
    }
}

/// Counts a connection while it is open.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn count(shared: &Arc<Shared>) -> OpenConnection {
        shared.open.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        OpenConnection(shared.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0
            .stats
            .open_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sends a last error and closes gracefully: reading what the peer already sent
/// keeps the kernel from resetting the connection before the error is read.
async fn refuse(mut stream: TcpStream, err: &[u8]) {
    use tokio::io::AsyncReadExt;
    if stream.write_all(err).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let drain = async {
        while let Ok(n) = stream.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
