//! A TCP fault proxy for tests: it sits between a process and a dependency
//! (central and its Keystone, central or an edge and the broker, an edge and its
//! Keystone) and, on demand, passes, stalls, slows, black-holes one direction,
//! refuses new connections, or resets every open one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Bytes flow both ways.
    Pass,
    /// Nothing flows (connections stay open) until the fault changes.
    Stall,
    /// Each chunk waits this long.
    Slow(Duration),
    /// What the client sends is discarded; what the target sends flows.
    DropFromClient,
    /// What the target sends is discarded (and counted, see
    /// `FaultProxy::dropped`); what the client sends flows.
    DropToClient,
    /// New connections are closed at once (open ones are not touched).
    Refuse,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    fault: watch::Sender<Fault>,
    conns: Arc<Mutex<Vec<(AbortHandle, AbortHandle)>>>,
    accept: AbortHandle,
    /// Bytes from the target discarded under `Fault::DropToClient`.
    dropped: Arc<AtomicU64>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (fault, rx) = watch::channel(Fault::Pass);
        let conns: Arc<Mutex<Vec<(AbortHandle, AbortHandle)>>> = Arc::default();
        let tracked = conns.clone();
        let target = Arc::new(Mutex::new(target));
        let current = target.clone();
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if *rx.borrow() == Fault::Refuse {
                    let _ = client.set_linger_zero();
                    continue;
                }
                let to = *current.lock().unwrap();
                let Ok(server) = TcpStream::connect(to).await else {
                    let _ = client.set_linger_zero();
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let _ = client.set_linger_zero();
                let _ = server.set_linger_zero();
                // Checked again under the list's lock: a connection accepted
                // before `Refuse` whose target answered after a `reset` is
                // refused, never left open past the cut.
                let mut list = tracked.lock().unwrap();
                if *rx.borrow() == Fault::Refuse {
                    continue;
                }
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = tokio::spawn(pump(cr, sw, rx.clone(), None));
                let down = tokio::spawn(pump(sr, cw, rx.clone(), Some(counted.clone())));
                list.retain(|(a, b)| !a.is_finished() || !b.is_finished());
                list.push((up.abort_handle(), down.abort_handle()));
            }
        })
        .abort_handle();
        FaultProxy {
            addr,
            target,
            fault,
            conns,
            accept,
            dropped,
        }
    }

    /// How many bytes from the target were discarded so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn set(&self, fault: Fault) {
        let _ = self.fault.send(fault);
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// New connections go to `to` (a dependency that came back elsewhere).
    pub fn retarget(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = to;
    }

    /// Resets every open connection (both ends see a broken connection).
    pub fn reset(&self) {
        for (a, b) in self.conns.lock().unwrap().drain(..) {
            a.abort();
            b.abort();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset();
    }
}

/// Closing with a zero linger sends a reset at once; it never blocks.
trait ResetOnClose {
    fn set_linger_zero(&self) -> std::io::Result<()>;
}

impl ResetOnClose for TcpStream {
    #[allow(deprecated)]
    fn set_linger_zero(&self) -> std::io::Result<()> {
        self.set_linger(Some(Duration::ZERO))
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    // Set on the target's side: where its discarded bytes are counted.
    to_client: Option<Arc<AtomicU64>>,
) {
    let from_client = to_client.is_none();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // A stalled link reads nothing either.
        while *fault.borrow() == Fault::Stall {
            if fault.changed().await.is_err() {
                return;
            }
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let now = *fault.borrow();
        match now {
            Fault::DropFromClient if from_client => continue,
            Fault::DropToClient => {
                if let Some(count) = &to_client {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
            }
            Fault::Slow(d) => tokio::time::sleep(d).await,
            Fault::Stall => {
                while *fault.borrow() == Fault::Stall {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
