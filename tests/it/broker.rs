//! The embedded broker with a real NATS client (async-nats), unchanged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ConnectOptions, HeaderMap, RequestErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use syncgate::broker::{Broker, BrokerAuth, BrokerConfig, Secret, Stats};
use tokio::sync::oneshot;

/// A broker on a random loopback port, stopped when dropped.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub stats: std::sync::Arc<Stats>,
    _stop: oneshot::Sender<()>,
}

impl TestBroker {
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }
}

pub async fn start_broker(tweak: impl FnOnce(&mut BrokerConfig)) -> TestBroker {
    let mut config = BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..BrokerConfig::default()
    };
    tweak(&mut config);
    let broker = Broker::bind(config).await.unwrap();
    let addr = broker.local_addr();
    let stats = broker.stats();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(broker.run(async {
        let _ = rx.await;
    }));
    TestBroker {
        addr,
        stats,
        _stop: tx,
    }
}

async fn client(b: &TestBroker) -> async_nats::Client {
    async_nats::connect(b.url()).await.unwrap()
}

/// Receives one message or fails after a generous bound (a hang, not a timing goal).
/// Returns once the broker has handled everything `c` sent before: it reads a
/// connection in order, and answers a request nobody subscribes to with "no
/// responders" only once read. (`flush` only writes to the socket: another
/// connection's message may reach the broker before a subscription does.)
async fn handled(c: &async_nats::Client) {
    let err = c
        .request("syncgate.test.nobody", Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
}

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a message")
        .expect("open")
}

#[tokio::test]
async fn publish_subscribe_and_wildcards() {
    let b = start_broker(|_| {}).await;
    let c = client(&b).await;
    let mut exact = c.subscribe("orders.created").await.unwrap();
    let mut star = c.subscribe("orders.*").await.unwrap();
    let mut tail = c.subscribe("orders.>").await.unwrap();
    c.flush().await.unwrap();

    c.publish("orders.created", Bytes::from_static(b"one"))
        .await
        .unwrap();
    c.publish("orders.eu.created", Bytes::from_static(b"two"))
        .await
        .unwrap();
    c.publish("orders", Bytes::from_static(b"none"))
        .await
        .unwrap();
    c.flush().await.unwrap();

    assert_eq!(next(&mut exact).await.payload, "one");
    assert_eq!(next(&mut star).await.payload, "one");
    let first = next(&mut tail).await;
    let second = next(&mut tail).await;
    assert_eq!(
        (first.payload, second.subject.as_str()),
        (Bytes::from("one"), "orders.eu.created")
    );

    // Nothing else arrived: a marker published now is the next message of each.
    c.publish("orders.marker", Bytes::new()).await.unwrap();
    assert_eq!(next(&mut star).await.subject.as_str(), "orders.marker");
    assert_eq!(next(&mut tail).await.subject.as_str(), "orders.marker");
}

#[tokio::test]
async fn queue_groups_deliver_each_message_to_one_member() {
    let b = start_broker(|_| {}).await;
    let c = client(&b).await;
    let mut members = Vec::new();
    for i in 0..3 {
        let sub = c.queue_subscribe("work", "workers".into()).await.unwrap();
        members.push(sub.map(move |m| (i, m)));
    }
    let mut merged = futures_util::stream::select_all(members);
    let mut watcher = c.subscribe("work").await.unwrap();
    c.flush().await.unwrap();
    let total = 300;
    for i in 0..total {
        c.publish("work", Bytes::from(i.to_string())).await.unwrap();
    }
    c.flush().await.unwrap();

    let mut seen = HashMap::new();
    let mut per_member = [0; 3];
    for _ in 0..total {
        let (member, msg) = tokio::time::timeout(Duration::from_secs(10), merged.next())
            .await
            .unwrap()
            .unwrap();
        *seen.entry(msg.payload).or_insert(0) += 1;
        per_member[member] += 1;
    }
    assert_eq!(
        seen.len(),
        total,
        "no message twice, none lost: {per_member:?}"
    );
    assert!(
        per_member.iter().all(|&n| n > 0),
        "spread over members: {per_member:?}"
    );
    // Nothing more is queued for the group: the next one is a fresh marker.
    c.publish("work", Bytes::from_static(b"marker"))
        .await
        .unwrap();
    let (_, msg) = tokio::time::timeout(Duration::from_secs(10), merged.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.payload, "marker");
    // A plain subscriber beside the group gets every message.
    for _ in 0..=total {
        next(&mut watcher).await;
    }
}

#[tokio::test]
async fn request_reply_and_no_responders() {
    let b = start_broker(|_| {}).await;
    let responder = client(&b).await;
    let mut service = responder.subscribe("svc.echo").await.unwrap();
    handled(&responder).await;
    tokio::spawn(async move {
        while let Some(msg) = service.next().await {
            let reply = msg.reply.unwrap();
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&msg.payload);
            responder.publish(reply, answer.into()).await.unwrap();
        }
    });

    let c = ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(30)))
        .connect(b.url())
        .await
        .unwrap();
    let answer = c
        .request("svc.echo", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    assert_eq!(answer.payload, "echo:hi");

    // Nobody listens: the client hears so from the broker, not from its timeout.
    let err = c.request("svc.nobody", Bytes::new()).await.unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
}

#[tokio::test]
async fn headers_round_trip() {
    let b = start_broker(|_| {}).await;
    let c = client(&b).await;
    let mut sub = c.subscribe("h").await.unwrap();
    c.flush().await.unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "op-1");
    headers.insert("Syncgate-Seq", "42");
    c.publish_with_headers("h", headers, Bytes::from_static(b"body"))
        .await
        .unwrap();
    let msg = next(&mut sub).await;
    let h = msg.headers.expect("headers");
    assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "op-1");
    assert_eq!(h.get("Syncgate-Seq").unwrap().as_str(), "42");
    assert_eq!(msg.payload, "body");
}

#[tokio::test]
async fn unsubscribe_after_max_messages() {
    let b = start_broker(|_| {}).await;
    let c = client(&b).await;
    let mut sub = c.subscribe("limited").await.unwrap();
    sub.unsubscribe_after(2).await.unwrap();
    c.flush().await.unwrap();
    for i in 0..5 {
        c.publish("limited", Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "0");
    assert_eq!(next(&mut sub).await.payload, "1");
    let end = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap();
    assert!(end.is_none(), "the subscription ended after 2: {end:?}");
}

#[tokio::test]
async fn credentials_are_checked() {
    let b = start_broker(|c| c.auth = BrokerAuth::Token(Secret::new("s3cret-token"))).await;
    let err = ConnectOptions::new()
        .token("wrong".into())
        .connect(b.url())
        .await
        .unwrap_err();
    assert_eq!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );
    let err = async_nats::connect(b.url()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );
    let ok = ConnectOptions::new()
        .token("s3cret-token".into())
        .connect(b.url())
        .await
        .unwrap();
    ok.flush().await.unwrap();

    let b = start_broker(|c| {
        c.auth = BrokerAuth::UserPassword {
            user: "edge".into(),
            password: Secret::new("pw"),
        }
    })
    .await;
    let err = ConnectOptions::with_user_and_password("edge".into(), "bad".into())
        .connect(b.url())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ConnectErrorKind::AuthorizationViolation);
    let ok = ConnectOptions::with_user_and_password("edge".into(), "pw".into())
        .connect(b.url())
        .await
        .unwrap();
    ok.flush().await.unwrap();
}

#[tokio::test]
async fn over_size_payload_is_refused() {
    let b = start_broker(|c| c.max_payload = 1024).await;
    let c = client(&b).await;
    assert_eq!(c.server_info().max_payload, 1024);
    let err = c
        .publish("big", Bytes::from(vec![0u8; 2048]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("payload"), "{err}");
    c.publish("small", Bytes::from(vec![0u8; 1024]))
        .await
        .unwrap();
    c.flush().await.unwrap();
}

#[tokio::test]
async fn a_slow_consumer_is_closed_while_a_fast_one_gets_everything() {
    let b = start_broker(|c| c.max_pending = 256 * 1024).await;
    // The slow consumer: subscribes and never reads, with a small socket buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(b.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    slow.write_all(b"CONNECT {}\r\nSUB feed 1\r\nPING\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("PONG") {
        let mut chunk = [0u8; 1024];
        let n = slow.read(&mut chunk).await.unwrap();
        seen.extend_from_slice(&chunk[..n]);
    }

    let fast = client(&b).await;
    let mut fast_sub = fast.subscribe("feed").await.unwrap();
    let publisher = client(&b).await;
    handled(&fast).await;
    let total = 20_000;
    let payload = Bytes::from(vec![b'x'; 1024]);
    let receiver = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            next(&mut fast_sub).await;
            n += 1;
        }
        n
    });
    for _ in 0..total {
        publisher.publish("feed", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    assert_eq!(receiver.await.unwrap(), total);
    assert_eq!(
        b.stats
            .slow_consumers
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // The slow one was told and closed: its stream ends with the error.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let tail = String::from_utf8_lossy(&rest[rest.len().saturating_sub(64)..]).to_string();
    assert!(tail.ends_with("-ERR 'Slow Consumer'\r\n"), "{tail:?}");
}

#[tokio::test]
async fn tls_from_cert_and_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let b = start_broker(|c| {
        c.tls = Some(syncgate::tls::CertFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
            cert_flag: "--broker-tls-cert",
            key_flag: "--broker-tls-key",
        })
    })
    .await;
    let c = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(cert_path.clone())
        .connect(format!("tls://localhost:{}", b.addr.port()))
        .await
        .unwrap();
    let mut sub = c.subscribe("secure").await.unwrap();
    c.flush().await.unwrap();
    c.publish("secure", Bytes::from_static(b"sealed"))
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.payload, "sealed");

    // A client that will not speak TLS is told so.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    plain.write_all(b"CONNECT {}\r\n").await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("INFO ") && text.contains("\"tls_required\":true"),
        "{text}"
    );
    assert!(
        text.ends_with("-ERR 'Secure Connection - TLS Required'\r\n"),
        "{text}"
    );
}

/// A connection's buffers start small, grow for what comes and are given
/// back when it goes quiet: messages far larger than a quiet connection's
/// buffers, between small ones and after quiet spells, arrive whole and in
/// order, both ways through the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_larger_than_a_quiet_connections_buffers_arrive_whole_and_in_order() {
    let b = start_broker(|_| {}).await;
    let publisher = client(&b).await;
    let subscriber = client(&b).await;
    let mut sub = subscriber.subscribe("sizes").await.unwrap();
    handled(&subscriber).await;
    let sizes = [1usize, 900 * 1024, 3, 70 * 1024, 5 * 1024, 1, 1000 * 1024];
    for round in 0..3u8 {
        for (i, size) in sizes.iter().enumerate() {
            let fill = b'a' + (i as u8 + round) % 26;
            publisher
                .publish("sizes", Bytes::from(vec![fill; *size]))
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        for (i, size) in sizes.iter().enumerate() {
            let fill = b'a' + (i as u8 + round) % 26;
            let msg = next(&mut sub).await;
            assert_eq!(msg.payload.len(), *size, "round {round}, message {i}");
            assert!(
                msg.payload.iter().all(|b| *b == fill),
                "round {round}, message {i}: its bytes"
            );
        }
        // Quiet past the broker's idle mark: the next round starts on
        // buffers given back.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
}
