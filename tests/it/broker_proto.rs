//! The embedded broker over a raw TCP socket: the protocol's edge cases, with
//! nats-server's answers.

use std::time::Duration;

use syncgate::broker::{BrokerAuth, Secret};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::broker::{start_broker, TestBroker};

/// A raw protocol client that reads line by line.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(b: &TestBroker) -> Raw {
        let stream = TcpStream::connect(b.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        let info = raw.line().await;
        assert!(info.starts_with("INFO {"), "{info}");
        raw
    }

    async fn send(&mut self, data: &str) {
        self.stream.write_all(data.as_bytes()).await.unwrap();
    }

    /// The next line, without its CRLF.
    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).to_string();
                self.buf.drain(..i + 2);
                return line;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("a line within 10s")
                .unwrap();
            assert!(
                n > 0,
                "closed before a full line; have {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Everything until the server closes the connection.
    async fn rest(&mut self) -> String {
        let mut all = std::mem::take(&mut self.buf);
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut all))
            .await
            .expect("closed within 10s")
            .unwrap();
        String::from_utf8_lossy(&all).to_string()
    }
}

#[tokio::test]
async fn info_comes_first_with_the_fields_clients_need() {
    let b = start_broker(|c| c.auth = BrokerAuth::Token(Secret::new("t"))).await;
    let mut stream = TcpStream::connect(b.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    let json: serde_json::Value =
        serde_json::from_str(line.strip_prefix("INFO ").unwrap().trim_end()).unwrap();
    for field in ["server_id", "version", "max_payload", "client_id"] {
        assert!(json.get(field).is_some(), "{field} missing in {json}");
    }
    assert_eq!(json["proto"], 1);
    assert_eq!(json["headers"], true);
    assert_eq!(json["auth_required"], true);
}

#[tokio::test]
async fn ping_before_connect_without_auth_and_basic_pub_sub() {
    let b = start_broker(|_| {}).await;
    let mut c = Raw::connect(&b).await;
    c.send("PING\r\n").await;
    assert_eq!(c.line().await, "PONG");
    c.send("CONNECT {\"verbose\":false,\"pedantic\":null,\"name\":null,\"echo\":true}\r\nSUB foo 1\r\nPUB foo 5\r\nhello\r\n")
        .await;
    assert_eq!(c.line().await, "MSG foo 1 5");
    assert_eq!(c.line().await, "hello");
    c.send("SUB * 2\r\nPUB foo reply.to 2\r\nok\r\n").await;
    let mut msgs = vec![
        c.line().await,
        c.line().await,
        c.line().await,
        c.line().await,
    ];
    msgs.sort();
    assert_eq!(
        msgs,
        ["MSG foo 1 reply.to 2", "MSG foo 2 reply.to 2", "ok", "ok"]
    );
}

#[tokio::test]
async fn operations_before_connect_are_refused_when_auth_is_on() {
    let b = start_broker(|c| c.auth = BrokerAuth::Token(Secret::new("t"))).await;
    let mut c = Raw::connect(&b).await;
    c.send("PING\r\n").await;
    assert_eq!(c.rest().await, "-ERR 'Authorization Violation'\r\n");

    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {\"auth_token\":\"t\"}\r\nPING\r\n").await;
    assert_eq!(c.line().await, "PONG");
}

#[tokio::test]
async fn unknown_verbs_close_the_connection() {
    let b = start_broker(|_| {}).await;
    for bad in [
        "ZZZ",
        "PUBS foo 2\r\nok\r\n",
        "SUBZZZ foo 1\r\n",
        "MSG foo 1 2\r\nok\r\n",
    ] {
        let mut c = Raw::connect(&b).await;
        c.send(bad).await;
        assert_eq!(
            c.rest().await,
            "-ERR 'Unknown Protocol Operation'\r\n",
            "{bad:?}"
        );
    }
    // A payload that is not followed by CRLF is a protocol error too.
    let mut c = Raw::connect(&b).await;
    c.send("PUB foo 2\r\nokay\r\n").await;
    assert_eq!(c.rest().await, "-ERR 'Unknown Protocol Operation'\r\n");
    // So is a malformed CONNECT.
    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {not json}\r\n").await;
    assert!(c.rest().await.starts_with("-ERR '"));
}

#[tokio::test]
async fn bad_subjects_are_refused_and_the_connection_stays() {
    let b = start_broker(|_| {}).await;
    let mut c = Raw::connect(&b).await;
    for bad in ["foo..bar", "foo.>.bar", ".foo", "foo."] {
        c.send(&format!("SUB {bad} 1\r\n")).await;
        assert_eq!(c.line().await, "-ERR 'Invalid Subject'", "{bad}");
    }
    c.send("PING\r\n").await;
    assert_eq!(c.line().await, "PONG");
}

#[tokio::test]
async fn verbose_acknowledges_and_pedantic_checks_publish_subjects() {
    let b = start_broker(|_| {}).await;
    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {\"verbose\":true,\"pedantic\":true}\r\n")
        .await;
    assert_eq!(c.line().await, "+OK");
    c.send("SUB foo 1\r\n").await;
    assert_eq!(c.line().await, "+OK");
    c.send("PUB foo 2\r\nhi\r\n").await;
    let mut got = vec![c.line().await, c.line().await, c.line().await];
    got.sort();
    assert_eq!(got, ["+OK", "MSG foo 1 2", "hi"]);
    c.send("PUB foo.* 2\r\nhi\r\n").await;
    assert_eq!(c.line().await, "-ERR 'Invalid Publish Subject'");
    c.send("UNSUB 1\r\n").await;
    assert_eq!(c.line().await, "+OK");
}

#[tokio::test]
async fn frames_split_across_reads_are_reassembled() {
    let b = start_broker(|_| {}).await;
    let mut sub = Raw::connect(&b).await;
    sub.send("CONNECT {}\r\nSUB split.subject 9\r\nPING\r\n")
        .await;
    assert_eq!(sub.line().await, "PONG");
    let mut publisher = Raw::connect(&b).await;
    let frame = "PUB split.subject 11\r\nhello world\r\nPING\r\n";
    for byte in frame.as_bytes() {
        publisher.stream.write_all(&[*byte]).await.unwrap();
        publisher.stream.flush().await.unwrap();
    }
    assert_eq!(publisher.line().await, "PONG");
    assert_eq!(sub.line().await, "MSG split.subject 9 11");
    assert_eq!(sub.line().await, "hello world");
}

#[tokio::test]
async fn limits_close_with_nats_server_errors() {
    let b = start_broker(|c| c.max_payload = 64).await;
    let mut c = Raw::connect(&b).await;
    // Refused on the declared size, before any payload is sent.
    c.send("PUB foo 65\r\n").await;
    assert_eq!(c.rest().await, "-ERR 'Maximum Payload Violation'\r\n");

    let mut c = Raw::connect(&b).await;
    c.send(&format!("PUB {} 1\r\n", "x".repeat(5000))).await;
    assert_eq!(c.rest().await, "-ERR 'Maximum Control Line Exceeded'\r\n");
}

#[tokio::test]
async fn headers_are_stripped_for_subscribers_that_did_not_ask_for_them() {
    let b = start_broker(|_| {}).await;
    let mut plain = Raw::connect(&b).await;
    plain
        .send("CONNECT {\"headers\":false}\r\nSUB h 1\r\nPING\r\n")
        .await;
    assert_eq!(plain.line().await, "PONG");
    let mut hdr = Raw::connect(&b).await;
    hdr.send(
        "CONNECT {\"headers\":true}\r\nSUB h 2\r\nHPUB h 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nhi\r\n",
    )
    .await;
    assert_eq!(hdr.line().await, "HMSG h 2 18 20");
    assert_eq!(hdr.line().await, "NATS/1.0");
    assert_eq!(plain.line().await, "MSG h 1 2");
    assert_eq!(plain.line().await, "hi");

    // HPUB from a client that did not declare headers is refused.
    plain.send("HPUB h 12 12\r\nNATS/1.0\r\n\r\n\r\n").await;
    assert!(plain
        .rest()
        .await
        .ends_with("-ERR 'Message Headers Not Supported'\r\n"));
}

#[tokio::test]
async fn no_responders_answers_a_request_at_once() {
    let b = start_broker(|_| {}).await;
    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {\"headers\":true,\"no_responders\":true}\r\nSUB _INBOX.abc.* 7\r\nPUB nobody _INBOX.abc.1 0\r\n\r\n")
        .await;
    assert_eq!(c.line().await, "HMSG _INBOX.abc.1 7 38 38");
    assert_eq!(c.line().await, "NATS/1.0 503");
    assert_eq!(c.line().await, "Nats-Subject: nobody");

    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {\"headers\":false,\"no_responders\":true}\r\n")
        .await;
    assert!(c.rest().await.starts_with("-ERR"));
}

#[tokio::test]
async fn unsub_with_max_and_echo_off() {
    let b = start_broker(|_| {}).await;
    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {\"echo\":false}\r\nSUB self 1\r\nPUB self 1\r\na\r\nPING\r\n")
        .await;
    assert_eq!(c.line().await, "PONG", "no echo of its own message");

    let mut c = Raw::connect(&b).await;
    c.send("SUB m 1\r\nUNSUB 1 2\r\nPUB m 1\r\na\r\nPUB m 1\r\nb\r\nPUB m 1\r\nc\r\nPING\r\n")
        .await;
    let lines = [
        c.line().await,
        c.line().await,
        c.line().await,
        c.line().await,
        c.line().await,
    ];
    assert_eq!(lines, ["MSG m 1 1", "a", "MSG m 1 1", "b", "PONG"]);
}

#[tokio::test]
async fn idle_clients_are_pinged_and_stale_ones_closed() {
    let b = start_broker(|c| c.ping_interval = Duration::from_millis(50)).await;
    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {}\r\n").await;
    assert_eq!(c.line().await, "PING");
    c.send("PONG\r\n").await;
    assert_eq!(c.line().await, "PING");
    // Unanswered pings: the server gives up.
    assert_eq!(c.line().await, "PING");
    assert_eq!(c.rest().await, "-ERR 'Stale Connection'\r\n");
}

#[tokio::test]
async fn connect_must_come_within_the_authentication_timeout() {
    let b = start_broker(|c| {
        c.auth = BrokerAuth::Token(Secret::new("t"));
        c.auth_timeout = Duration::from_millis(100);
    })
    .await;
    let mut c = Raw::connect(&b).await;
    assert_eq!(c.rest().await, "-ERR 'Authentication Timeout'\r\n");
}

#[tokio::test]
async fn connections_subscriptions_and_subjects_are_capped() {
    let b = start_broker(|c| {
        c.max_connections = 2;
        c.max_subscriptions = 3;
        c.max_subject_len = 32;
        c.max_subject_tokens = 4;
    })
    .await;
    let mut c = Raw::connect(&b).await;
    c.send("CONNECT {}\r\nSUB a.b.c.d 1\r\nSUB a 2\r\nSUB b 3\r\nSUB c 4\r\nPING\r\n")
        .await;
    assert_eq!(c.line().await, "-ERR 'Maximum Subscriptions Exceeded'");
    assert_eq!(c.line().await, "PONG", "the connection stays");
    c.send("UNSUB 2\r\nSUB a.b.c.d.e 5\r\nSUB x 6\r\nPING\r\n")
        .await;
    assert_eq!(c.line().await, "-ERR 'Invalid Subject'", "five tokens");
    assert_eq!(c.line().await, "PONG");
    c.send(&format!("UNSUB 6\r\nSUB {} 7\r\nPING\r\n", "x".repeat(33)))
        .await;
    assert_eq!(c.line().await, "-ERR 'Invalid Subject'", "33 bytes");
    assert_eq!(c.line().await, "PONG");

    let _second = Raw::connect(&b).await;
    let mut third = Raw::connect(&b).await;
    assert_eq!(
        third.rest().await,
        "-ERR 'maximum connections exceeded'\r\n"
    );
    // Ten thousand deep subscriptions from one client hold nothing past the cap.
    let mut flood = String::from("CONNECT {}\r\n");
    for i in 0..10_000 {
        flood.push_str(&format!("SUB {}.{i} s{i}\r\n", ["t"; 20].join(".")));
    }
    flood.push_str("PING\r\n");
    drop(_second);
    let mut c2 = loop {
        let mut r = Raw::connect(&b).await;
        r.send("PING\r\n").await;
        if r.line().await == "PONG" {
            break r;
        }
    };
    c2.send(&flood).await;
    let mut refused = 0;
    loop {
        let line = c2.line().await;
        if line == "PONG" {
            break;
        }
        assert_eq!(line, "-ERR 'Invalid Subject'");
        refused += 1;
    }
    assert_eq!(refused, 10_000);
}
