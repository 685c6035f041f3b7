//! One client connection of the embedded broker: the read loop that parses and
//! routes operations, and the write loop that drains a bounded outbound buffer in
//! large writes. Publishers append to subscribers' buffers and never wait on a
//! subscriber's socket; a subscriber whose buffer overflows is closed as a slow
//! consumer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::parser::{self, Op, Parsed, ProtoError};
use super::sublist::{is_valid_literal_subject, subject_matches};
use super::{Shared, SubRef};

/// The largest read a connection asks for at once.
const READ_CHUNK: usize = 64 * 1024;
/// A quiet connection's read buffer: a fleet's connections are mostly idle,
/// and each holds a read buffer and two outbound ones.
const IDLE_BUFFER: usize = 4 * 1024;
/// The most an idle connection's outbound buffers keep of what a burst made
/// them grow to: more is given back once nothing was queued for `IDLE_AFTER`
/// (not at every pause, which would reallocate them between bursts).
const KEEP_IDLE: usize = 16 * 1024;
const IDLE_AFTER: Duration = Duration::from_secs(1);

/// A subscription: who receives, under which sid, and its auto-unsubscribe count.
pub(super) struct Subscription {
    pub client: Arc<Client>,
    pub sid: Box<[u8]>,
    pub subject: Box<[u8]>,
    pub queue: Option<Box<[u8]>>,
    /// Deliveries after which the subscription ends; 0 for none.
    max: AtomicU64,
    delivered: AtomicU64,
}

impl Subscription {
    /// Claims one delivery; false when the auto-unsubscribe count is used up.
    fn claim(&self) -> bool {
        let max = self.max.load(Ordering::Acquire);
        let mut delivered = self.delivered.load(Ordering::Acquire);
        loop {
            if max > 0 && delivered >= max {
                return false;
            }
            match self.delivered.compare_exchange_weak(
                delivered,
                delivered + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => delivered = now,
            }
        }
    }

    fn exhausted(&self) -> bool {
        let max = self.max.load(Ordering::Acquire);
        max > 0 && self.delivered.load(Ordering::Acquire) >= max
    }
}

/// What other connections may touch of a client: its outbound buffer, its
/// options that shape delivery, and its subscriptions.
pub(super) struct Client {
    pub cid: u64,
    out: Mutex<Outbound>,
    /// Wakes the write loop.
    wake: Notify,
    /// Tells the read loop to stop (slow consumer, write failure, shutdown).
    kill: Notify,
    closing: AtomicBool,
    headers: AtomicBool,
    echo: AtomicBool,
    subs: Mutex<HashMap<Box<[u8]>, Arc<Subscription>>>,
}

struct Outbound {
    buf: BytesMut,
    max_pending: usize,
}

/// The outcome of queueing bytes for a client.
enum Queued {
    Yes,
    /// The client is closing; the bytes were dropped.
    Closed,
    /// The bytes would overflow the buffer: the client is now closing.
    SlowConsumer,
}

impl Client {
    fn new(cid: u64, max_pending: usize) -> Client {
        Client {
            cid,
            out: Mutex::new(Outbound {
                buf: BytesMut::new(),
                max_pending,
            }),
            wake: Notify::new(),
            kill: Notify::new(),
            closing: AtomicBool::new(false),
            headers: AtomicBool::new(false),
            echo: AtomicBool::new(true),
            subs: Mutex::new(HashMap::new()),
        }
    }

    fn lock_out(&self) -> std::sync::MutexGuard<'_, Outbound> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Queues bytes built by `write` (which appends `len` bytes), unless they
    /// would overflow the pending limit.
    fn queue_with(&self, len: usize, write: impl FnOnce(&mut BytesMut)) -> Queued {
        if self.is_closing() {
            return Queued::Closed;
        }
        let mut out = self.lock_out();
        if out.buf.len() + len > out.max_pending {
            out.buf.clear();
            out.buf.extend_from_slice(b"-ERR 'Slow Consumer'\r\n");
            drop(out);
            self.begin_close();
            return Queued::SlowConsumer;
        }
        write(&mut out.buf);
        Queued::Yes
    }

    /// Queues a protocol line and wakes the writer.
    pub fn send(&self, data: &[u8]) {
        if let Queued::Yes = self.queue_with(data.len(), |b| b.extend_from_slice(data)) {
            self.wake.notify_one();
        }
    }

    /// Queues `-ERR '<text>'`, then closes once it is written.
    pub fn close_with_err(&self, text: &str) {
        if !self.is_closing() {
            let mut out = self.lock_out();
            out.buf
                .extend_from_slice(format!("-ERR '{text}'\r\n").as_bytes());
        }
        self.begin_close();
    }

    /// Marks the client closing: the writer flushes what is queued and stops,
    /// the reader stops.
    pub fn begin_close(&self) {
        self.closing.store(true, Ordering::Release);
        self.wake.notify_one();
        self.kill.notify_one();
    }
}

/// CONNECT options; every field optional and `null` accepted.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ConnectOpts {
    verbose: Option<bool>,
    pedantic: Option<bool>,
    auth_token: Option<String>,
    user: Option<String>,
    pass: Option<String>,
    name: Option<String>,
    lang: Option<String>,
    version: Option<String>,
    protocol: Option<i64>,
    echo: Option<bool>,
    headers: Option<bool>,
    no_responders: Option<bool>,
}

/// Per-connection state only the read loop touches.
struct Session {
    client: Arc<Client>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    connected: bool,
    verbose: bool,
    pedantic: bool,
    no_responders: bool,
    pings_out: u32,
    last_in: Instant,
    /// Clients that received messages during this read, woken once at its end.
    touched: Vec<Arc<Client>>,
}

/// Why the read loop stops.
enum Stop {
    /// The peer closed or the socket failed.
    Eof,
    /// A protocol or policy error already queued as `-ERR`.
    Closed,
}

/// Serves one connection until it closes. `send_info` writes the INFO line that
/// must precede everything (done by the caller for TLS, which needs it in clear).
pub(super) async fn serve<R, W>(
    shared: Arc<Shared>,
    cid: u64,
    peer: SocketAddr,
    mut reader: R,
    writer: W,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let config = &shared.config;
    let client = Arc::new(Client::new(cid, config.max_pending));
    shared.register(client.clone());
    // Ends with this connection's task, however that ends (a broker dropped
    // mid-way closes its sockets, as a stopped process would).
    let mut write_task = WriteTask(tokio::spawn(write_loop(client.clone(), writer)));

    let mut session = Session {
        client: client.clone(),
        shared: shared.clone(),
        peer,
        connected: false,
        verbose: false,
        pedantic: false,
        no_responders: false,
        pings_out: 0,
        last_in: Instant::now(),
        touched: Vec::new(),
    };
    let stop = session.read_loop(&mut reader).await;
    if let Stop::Eof = stop {
        debug!(cid, %peer, "client disconnected");
    }

    client.begin_close();
    session.unsubscribe_all();
    shared.deregister(cid);
    // Let the writer flush a final -ERR, but never hang on a dead peer.
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut write_task.0).await;
}

/// The writer of one connection, aborted when dropped.
struct WriteTask(tokio::task::JoinHandle<()>);

impl Drop for WriteTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(client: Arc<Client>, mut writer: W) {
    // Two buffers take turns: publishers fill one while this loop writes the
    // other, so each write carries everything queued since the last one.
    let mut chunk = BytesMut::new();
    loop {
        std::mem::swap(&mut client.lock_out().buf, &mut chunk);
        if chunk.is_empty() {
            if client.is_closing() {
                break;
            }
            let grown =
                chunk.capacity() > KEEP_IDLE || client.lock_out().buf.capacity() > KEEP_IDLE;
            if !grown {
                client.wake.notified().await;
                continue;
            }
            // Quiet for a moment: neither buffer keeps what a burst made it
            // grow to (a fleet's connections are mostly quiet).
            if tokio::time::timeout(IDLE_AFTER, client.wake.notified())
                .await
                .is_err()
            {
                chunk = BytesMut::new();
                let mut out = client.lock_out();
                if out.buf.is_empty() {
                    out.buf = BytesMut::new();
                }
            }
            continue;
        }
        if let Err(e) = writer.write_all(&chunk).await {
            debug!(cid = client.cid, error = %e, "write failed; closing");
            client.begin_close();
            break;
        }
        chunk.clear();
        // A burst must not pin a large buffer while the writes go on.
        if chunk.capacity() > 4 * 1024 * 1024 {
            chunk = BytesMut::new();
        }
    }
    let _ = writer.shutdown().await;
}

impl Session {
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> Stop {
        let config = self.shared.config.clone();
        let limits = parser::Limits {
            max_control_line: config.max_control_line,
            max_payload: config.max_payload,
        };
        let mut buf = BytesMut::with_capacity(IDLE_BUFFER);
        // How much the next read asks for: doubled while reads fill it (a
        // busy publisher), back to small once the connection goes quiet.
        let mut want = IDLE_BUFFER;
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + config.ping_interval,
            config.ping_interval,
        );
        let auth_deadline = tokio::time::sleep(config.auth_timeout);
        tokio::pin!(auth_deadline);
        let auth_required = self.shared.auth_required();

        loop {
            if buf.capacity() - buf.len() < want / 4 {
                buf.reserve(want);
            }
            let room = buf.capacity() - buf.len();
            tokio::select! {
                read = reader.read_buf(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => return Stop::Eof,
                        Ok(n) => n,
                    };
                    want = if n == room {
                        (want * 2).min(READ_CHUNK)
                    } else if n < want / 4 {
                        (want / 2).max(IDLE_BUFFER)
                    } else {
                        want
                    };
                    self.last_in = Instant::now();
                    let consumed = match self.process(&buf, &limits) {
                        Ok(n) => n,
                        Err(stop) => {
                            self.flush_touched();
                            return stop;
                        }
                    };
                    let _ = buf.split_to(consumed);
                    if buf.is_empty() && buf.capacity() > 2 * want {
                        buf = BytesMut::with_capacity(want);
                    }
                    self.flush_touched();
                }
                _ = ping.tick() => {
                    if let Err(stop) = self.ping_tick(config.ping_interval, config.max_pings_out) {
                        return stop;
                    }
                }
                _ = &mut auth_deadline, if auth_required && !self.connected => {
                    info!(cid = self.client.cid, peer = %self.peer, "no CONNECT before the authentication timeout");
                    self.client.close_with_err("Authentication Timeout");
                    return Stop::Closed;
                }
                _ = self.client.kill.notified() => return Stop::Closed,
            }
            if self.client.is_closing() {
                return Stop::Closed;
            }
        }
    }

    /// Processes every complete operation in `buf`; returns the bytes used.
    fn process(&mut self, buf: &[u8], limits: &parser::Limits) -> Result<usize, Stop> {
        let mut at = 0;
        while at < buf.len() {
            match parser::parse(&buf[at..], limits) {
                Ok(Parsed::Incomplete) => break,
                Ok(Parsed::Op(op, used)) => {
                    self.handle(op)?;
                    at += used;
                }
                Err(e) => {
                    self.protocol_error(&e);
                    return Err(Stop::Closed);
                }
            }
        }
        Ok(at)
    }

    fn protocol_error(&self, e: &ProtoError) {
        info!(cid = self.client.cid, peer = %self.peer, error = %e, "protocol error; closing");
        self.client.close_with_err(e.err_text());
    }

    fn handle(&mut self, op: Op<'_>) -> Result<(), Stop> {
        if !self.connected && self.shared.auth_required() && !matches!(op, Op::Connect(_)) {
            return Err(self.auth_violation("operation before CONNECT"));
        }
        match op {
            Op::Connect(json) => self.connect(json)?,
            Op::Ping => self.client.send(b"PONG\r\n"),
            Op::Pong => self.pings_out = 0,
            Op::Ignored => {}
            Op::Sub {
                subject,
                queue,
                sid,
            } => self.subscribe(subject, queue, sid),
            Op::Unsub { sid, max } => self.unsubscribe(sid, max),
            Op::Pub {
                subject,
                reply,
                payload,
            } => {
                self.publish(subject, reply, None, payload);
            }
            Op::HPub {
                subject,
                reply,
                headers,
                payload,
            } => {
                if !self.client.headers.load(Ordering::Relaxed) {
                    info!(
                        cid = self.client.cid,
                        "HPUB from a client that did not declare headers"
                    );
                    self.client.close_with_err("Message Headers Not Supported");
                    return Err(Stop::Closed);
                }
                self.publish(subject, reply, Some(headers), payload);
            }
        }
        Ok(())
    }

    fn ok(&self) {
        if self.verbose {
            self.client.send(b"+OK\r\n");
        }
    }

    fn auth_violation(&self, why: &str) -> Stop {
        // The reason is ours; credentials are never logged.
        warn!(cid = self.client.cid, peer = %self.peer, reason = why, "authorization violation");
        self.client.close_with_err("Authorization Violation");
        Stop::Closed
    }

    fn connect(&mut self, json: &[u8]) -> Result<(), Stop> {
        let opts: ConnectOpts = match serde_json::from_slice(json) {
            Ok(o) => o,
            Err(e) => {
                // serde's message names the field and position, never the value.
                info!(cid = self.client.cid, error = %e, "malformed CONNECT");
                self.client.close_with_err("Invalid CONNECT Options");
                return Err(Stop::Closed);
            }
        };
        if !self.shared.check_auth(
            opts.auth_token.as_deref(),
            opts.user.as_deref(),
            opts.pass.as_deref(),
        ) {
            return Err(self.auth_violation("bad or missing credentials"));
        }
        if !matches!(opts.protocol, None | Some(0) | Some(1)) {
            self.client.close_with_err("invalid client protocol");
            return Err(Stop::Closed);
        }
        let headers = opts.headers.unwrap_or(false);
        let no_responders = opts.no_responders.unwrap_or(false);
        if no_responders && !headers {
            self.client
                .close_with_err("no responders requires headers support");
            return Err(Stop::Closed);
        }
        self.verbose = opts.verbose.unwrap_or(false);
        self.pedantic = opts.pedantic.unwrap_or(false);
        self.no_responders = no_responders;
        self.client.headers.store(headers, Ordering::Relaxed);
        self.client
            .echo
            .store(opts.echo.unwrap_or(true), Ordering::Relaxed);
        if !self.connected {
            debug!(
                cid = self.client.cid,
                peer = %self.peer,
                name = opts.name.as_deref().unwrap_or(""),
                lang = opts.lang.as_deref().unwrap_or(""),
                version = opts.version.as_deref().unwrap_or(""),
                "client connected"
            );
        }
        self.connected = true;
        self.ok();
        Ok(())
    }

    fn subscribe(&mut self, subject: &[u8], queue: Option<&[u8]>, sid: &[u8]) {
        let config = &self.shared.config;
        // Bounds what one client can make the subject trie hold.
        if subject.len() > config.max_subject_len
            || subject.split(|b| *b == b'.').count() > config.max_subject_tokens
        {
            self.client.send(b"-ERR 'Invalid Subject'\r\n");
            return;
        }
        let mut subs = self.client.subs.lock().unwrap_or_else(|e| e.into_inner());
        if subs.contains_key(sid) {
            // A repeated sid is ignored, as nats-server does.
            drop(subs);
            self.ok();
            return;
        }
        if subs.len() >= config.max_subscriptions {
            drop(subs);
            self.client
                .send(b"-ERR 'Maximum Subscriptions Exceeded'\r\n");
            return;
        }
        let sub = Arc::new(Subscription {
            client: self.client.clone(),
            sid: sid.into(),
            subject: subject.into(),
            queue: queue.map(Into::into),
            max: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        });
        if self
            .shared
            .sublist
            .insert(subject, queue, SubRef(sub.clone()))
            .is_err()
        {
            drop(subs);
            self.client.send(b"-ERR 'Invalid Subject'\r\n");
            return;
        }
        subs.insert(sid.into(), sub);
        drop(subs);
        self.ok();
    }

    fn unsubscribe(&mut self, sid: &[u8], max: Option<u64>) {
        let sub = self
            .client
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sid)
            .cloned();
        if let Some(sub) = sub {
            match max {
                Some(max) if max > sub.delivered.load(Ordering::Acquire) => {
                    sub.max.store(max, Ordering::Release);
                }
                _ => remove_subscription(&self.shared, &sub),
            }
        }
        self.ok();
    }

    fn unsubscribe_all(&mut self) {
        let subs: Vec<_> = {
            let mut map = self.client.subs.lock().unwrap_or_else(|e| e.into_inner());
            map.drain().map(|(_, s)| s).collect()
        };
        for sub in subs {
            self.shared
                .sublist
                .remove(&sub.subject, sub.queue.as_deref(), &SubRef(sub.clone()));
        }
    }

    fn publish(
        &mut self,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) {
        if self.pedantic && !is_valid_literal_subject(subject) {
            self.client.send(b"-ERR 'Invalid Publish Subject'\r\n");
            return;
        }
        self.shared.stats.msgs_in.fetch_add(1, Ordering::Relaxed);
        let size = (payload.len() + headers.map_or(0, <[u8]>::len)) as u64;
        self.shared
            .stats
            .bytes_in
            .fetch_add(size, Ordering::Relaxed);
        let matches = self.shared.sublist.matches(subject);
        let echo = self.client.echo.load(Ordering::Relaxed);
        let mut delivered = false;
        for sub in &matches.plain {
            if !echo && sub.0.client.cid == self.client.cid {
                continue;
            }
            delivered |= self.deliver(&sub.0, subject, reply, headers, payload);
        }
        for members in &matches.groups {
            let start = self.shared.next_queue_pick(members.len());
            for i in 0..members.len() {
                let sub = &members[(start + i) % members.len()].0;
                if sub.client.is_closing() || (!echo && sub.client.cid == self.client.cid) {
                    continue;
                }
                if self.deliver(sub, subject, reply, headers, payload) {
                    delivered = true;
                    break;
                }
            }
        }
        if !delivered && self.no_responders {
            if let Some(reply) = reply {
                self.no_responders_reply(subject, reply);
            }
        }
        self.ok();
    }

    /// Queues one message for one subscription; false if it could not take it.
    fn deliver(
        &mut self,
        sub: &Arc<Subscription>,
        subject: &[u8],
        reply: Option<&[u8]>,
        headers: Option<&[u8]>,
        payload: &[u8],
    ) -> bool {
        if !sub.claim() {
            return false;
        }
        let target = &sub.client;
        let with_headers = headers.is_some() && target.headers.load(Ordering::Relaxed);
        let hdr = if with_headers {
            headers.unwrap_or_default()
        } else {
            &[]
        };
        let total = hdr.len() + payload.len();
        let mut nums = NumBuf::default();
        let len = 64 + subject.len() + sub.sid.len() + reply.map_or(0, <[u8]>::len) + total;
        let queued = target.queue_with(len, |b| {
            b.extend_from_slice(if with_headers { b"HMSG " } else { b"MSG " });
            b.extend_from_slice(subject);
            b.extend_from_slice(b" ");
            b.extend_from_slice(&sub.sid);
            if let Some(reply) = reply {
                b.extend_from_slice(b" ");
                b.extend_from_slice(reply);
            }
            if with_headers {
                b.extend_from_slice(b" ");
                b.extend_from_slice(nums.format(hdr.len()));
            }
            b.extend_from_slice(b" ");
            b.extend_from_slice(nums.format(total));
            b.extend_from_slice(b"\r\n");
            b.extend_from_slice(hdr);
            b.extend_from_slice(payload);
            b.extend_from_slice(b"\r\n");
        });
        match queued {
            Queued::Yes => {
                self.shared.stats.msgs_out.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .stats
                    .bytes_out
                    .fetch_add((hdr.len() + payload.len()) as u64, Ordering::Relaxed);
                if !self.touched.iter().any(|c| c.cid == target.cid) {
                    self.touched.push(target.clone());
                }
                if sub.exhausted() {
                    remove_subscription(&self.shared, sub);
                }
                true
            }
            Queued::SlowConsumer => {
                self.shared
                    .stats
                    .slow_consumers
                    .fetch_add(1, Ordering::Relaxed);
                warn!(
                    cid = target.cid,
                    "slow consumer: outbound buffer full; closing it"
                );
                false
            }
            Queued::Closed => false,
        }
    }

    /// Tells a requester at once that nobody listens on the subject, on its own
    /// subscription for the reply subject (a `503` status message).
    fn no_responders_reply(&mut self, subject: &[u8], reply: &[u8]) {
        let sid = {
            let subs = self.client.subs.lock().unwrap_or_else(|e| e.into_inner());
            subs.values()
                .find(|s| s.queue.is_none() && subject_matches(&s.subject, reply))
                .map(|s| s.sid.clone())
        };
        let Some(sid) = sid else { return };
        let mut header = b"NATS/1.0 503\r\nNats-Subject: ".to_vec();
        header.extend_from_slice(subject);
        header.extend_from_slice(b"\r\n\r\n");
        let mut nums = NumBuf::default();
        let mut msg = b"HMSG ".to_vec();
        msg.extend_from_slice(reply);
        msg.push(b' ');
        msg.extend_from_slice(&sid);
        msg.push(b' ');
        msg.extend_from_slice(nums.format(header.len()));
        msg.push(b' ');
        msg.extend_from_slice(nums.format(header.len()));
        msg.extend_from_slice(b"\r\n");
        msg.extend_from_slice(&header);
        msg.extend_from_slice(b"\r\n");
        self.client.send(&msg);
    }

    fn flush_touched(&mut self) {
        for client in self.touched.drain(..) {
            client.wake.notify_one();
        }
    }

    fn ping_tick(&mut self, interval: Duration, max_out: u32) -> Result<(), Stop> {
        if self.last_in.elapsed() < interval && self.pings_out == 0 {
            // Recent traffic proves the peer alive; no PING needed.
            return Ok(());
        }
        if self.pings_out + 1 > max_out {
            info!(cid = self.client.cid, peer = %self.peer, "stale connection; closing");
            self.client.close_with_err("Stale Connection");
            return Err(Stop::Closed);
        }
        self.pings_out += 1;
        self.client.send(b"PING\r\n");
        Ok(())
    }
}

fn remove_subscription(shared: &Shared, sub: &Arc<Subscription>) {
    shared
        .sublist
        .remove(&sub.subject, sub.queue.as_deref(), &SubRef(sub.clone()));
    let mut subs = sub.client.subs.lock().unwrap_or_else(|e| e.into_inner());
    if subs.get(&sub.sid).is_some_and(|s| Arc::ptr_eq(s, sub)) {
        subs.remove(&sub.sid);
    }
}

/// Formats integers without allocating.
#[derive(Default)]
struct NumBuf([u8; 20]);

impl NumBuf {
    fn format(&mut self, mut n: usize) -> &[u8] {
        let mut i = self.0.len();
        loop {
            i -= 1;
            self.0[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        &self.0[i..]
    }
}

#[cfg(test)]
mod tests {
    use super::NumBuf;

    #[test]
    fn formats_numbers() {
        let mut n = NumBuf::default();
        assert_eq!(n.format(0), b"0");
        assert_eq!(n.format(1048576), b"1048576");
        assert_eq!(n.format(usize::MAX), usize::MAX.to_string().as_bytes());
    }

    /// A burst grows a connection's outbound buffers; once nothing was
    /// queued for a second they are given back, and what was queued was
    /// written whole.
    #[tokio::test(start_paused = true)]
    async fn outbound_buffers_grown_by_a_burst_are_given_back_when_quiet() {
        use super::{write_loop, Client, IDLE_AFTER, KEEP_IDLE};
        use std::sync::Arc;
        use tokio::io::AsyncReadExt;
        let client = Arc::new(Client::new(1, 64 * 1024 * 1024));
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(write_loop(client.clone(), ours));
        let burst: Vec<u8> = (0..300 * 1024).map(|i| (i % 251) as u8).collect();
        for part in burst.chunks(1000) {
            client.send(part);
        }
        let mut got = vec![0u8; burst.len()];
        theirs.read_exact(&mut got).await.unwrap();
        assert!(got == burst, "the burst arrives whole and in order");
        // Quiet: the paused clock runs on while every task waits.
        tokio::time::sleep(IDLE_AFTER * 2).await;
        let kept = client.lock_out().buf.capacity();
        assert!(kept <= KEEP_IDLE, "an idle connection keeps {kept} bytes");
        client.begin_close();
        writer.await.unwrap();
    }
}
