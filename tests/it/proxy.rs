//! The proxy forwards everything unchanged and answers upstream faults itself.

use std::time::Duration;

use serde_json::Value;

use crate::fake_keystone::FakeKeystone;
use crate::helpers::{config_for, spawn_app, spawn_app_with, start};

#[tokio::test]
async fn reads_pass_through_byte_identical_with_status_and_headers() {
    let app = spawn_app().await;
    let direct = app
        .client
        .get(format!("{}/bytes", app.fake.url()))
        .send()
        .await
        .unwrap();
    let direct_bytes = direct.bytes().await.unwrap();

    let resp = app.client.get(app.url("/bytes?x=1")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 203);
    assert_eq!(resp.headers()["x-custom"], "kept");
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), 3_000_000);
    assert!(body == direct_bytes, "body differs from the upstream's");

    let (method, path, _, _) = app.fake.last_request();
    assert_eq!((method.as_str(), path.as_str()), ("GET", "/bytes?x=1"));
}

/// A client connection's reads go out on one upstream connection kept for
/// it (no pool's checkout): two clients taking turns each keep their own,
/// where a pool hands both the one idle connection. One the upstream closes
/// is replaced, and the client never sees it; one whose client left is the
/// next client's.
#[tokio::test]
async fn each_client_connection_keeps_its_own_upstream_connection_and_a_closed_one_is_replaced() {
    let app = spawn_app().await;
    let client = || reqwest::Client::builder().no_proxy().build().unwrap();
    let (a, b) = (client(), client());
    let get = |client: &reqwest::Client, close: bool| {
        let mut req = client.get(app.url("/v3/projects"));
        if close {
            req = req.header("x-fake-close", "1");
        }
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            resp.bytes().await.unwrap();
            status
        }
    };
    for _ in 0..5 {
        for client in [&a, &b] {
            assert_eq!(get(client, false).await, 200);
        }
    }
    let peers = app.fake.peers();
    assert_eq!(peers.len(), 10);
    let (on_a, on_b): (Vec<_>, Vec<_>) = peers.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let one = |v: &[(usize, &std::net::SocketAddr)]| {
        let mut p: Vec<_> = v.iter().map(|(_, p)| **p).collect();
        p.dedup();
        p
    };
    let (on_a, on_b) = (one(&on_a), one(&on_b));
    assert_eq!((on_a.len(), on_b.len()), (1, 1), "{peers:?}");
    assert_ne!(on_a, on_b, "{peers:?}");
    // The upstream closes a's after answering: a's next reads go on a new one.
    assert_eq!(get(&a, true).await, 200);
    for _ in 0..3 {
        assert_eq!(get(&a, false).await, 200);
    }
    let peers = app.fake.peers();
    let after: Vec<_> = peers[11..].to_vec();
    assert!(after.iter().all(|p| *p == after[0]), "{peers:?}");
    assert!(after[0] != on_a[0] && after[0] != on_b[0], "{peers:?}");
    // Two open, kept for a and b; none waiting for a client.
    app.until_metric("syncgate_upstream_kept_connections 2")
        .await;
    app.until_metric("syncgate_upstream_unclaimed_connections 0")
        .await;
    // A client that leaves leaves its connection to the next one: b goes,
    // and a new client's reads go out on b's.
    drop(b);
    app.until_metric("syncgate_upstream_unclaimed_connections 1")
        .await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, false).await, 200);
    }
    let peers = app.fake.peers();
    assert!(
        peers[peers.len() - 3..].iter().all(|p| *p == on_b[0]),
        "{peers:?}"
    );
    app.until_metric("syncgate_upstream_unclaimed_connections 0")
        .await;
    app.until_metric("syncgate_upstream_kept_connections 2")
        .await;
}

#[tokio::test]
async fn upstream_errors_on_reads_are_passed_through() {
    let app = spawn_app().await;
    let resp = app
        .client
        .get(app.url("/v3/users/nobody"))
        .header("x-fake-status", "404")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["message"], "fake failure");
}

#[tokio::test]
async fn request_headers_are_forwarded_with_hop_by_hop_dropped_and_forwarding_added() {
    let app = spawn_app().await;
    let resp = app
        .client
        .get(app.url("/echo"))
        .header("x-auth-token", "tok")
        .header("x-subject-token", "subj")
        .header("openstack-request-id", "req-1")
        .header("connection", "x-private-hop")
        .header("x-private-hop", "1")
        .header("te", "trailers")
        .header("x-forwarded-for", "10.9.9.9")
        .send()
        .await
        .unwrap();
    let echoed: Value = resp.json().await.unwrap();
    let h = &echoed["headers"];
    assert_eq!(h["x-auth-token"], "tok");
    assert_eq!(h["x-subject-token"], "subj");
    assert_eq!(h["openstack-request-id"], "req-1");
    assert!(
        h.get("x-private-hop").is_none(),
        "a header listed in Connection leaked: {h}"
    );
    assert!(h.get("te").is_none());
    assert_eq!(h["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["x-forwarded-host"],
        app.proxy.trim_start_matches("http://")
    );
    assert_eq!(h["host"], app.fake.addr.to_string());
}

#[tokio::test]
async fn token_responses_keep_the_subject_token_header() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post(app.url("/v3/auth/tokens"))
        .json(&serde_json::json!({"auth": {"identity": {"methods": ["password"]}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(resp.headers()["x-subject-token"], "gAAAAfake-issued-token");
    assert!(resp.headers().contains_key("x-openstack-request-id"));
}

#[tokio::test]
async fn public_url_replaces_the_upstream_url_in_links_and_catalog() {
    let app = spawn_app_with(|c| {
        c.public_url = Some(
            syncgate::settings::config::parse_base_url("https://identity.example.org/").unwrap(),
        )
    })
    .await;
    let resp = app
        .client
        .post(app.url("/v3/auth/tokens"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(
        !text.contains(&app.fake.url()),
        "upstream URL left in {text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    let urls: Vec<_> = body["token"]["catalog"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["url"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        urls,
        [
            "https://identity.example.org/v3/",
            "https://identity.example.org/v3"
        ]
    );

    // A streamed read and a captured write are rewritten too.
    let read: Value = app
        .client
        .get(app.url("/v3/projects"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        read["links"]["self"],
        "https://identity.example.org/v3/projects"
    );
    let created: Value = app
        .write(
            "POST",
            "/v3/projects",
            Some(serde_json::json!({"project": {"name": "p"}})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(created["project"]["links"]["self"]
        .as_str()
        .unwrap()
        .starts_with("https://identity.example.org/v3/projects/"));
}

#[tokio::test]
async fn upstream_down_is_502_in_keystone_shape() {
    let fake = FakeKeystone::start().await;
    // A port that refuses connections: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(
        &fake,
        &format!("sqlite://{}", dir.path().join("c.db").display()),
    );
    config.upstream =
        syncgate::settings::config::parse_base_url(&format!("http://{closed}")).unwrap();
    let app = start(fake, config).await;

    for (method, path) in [("GET", "/v3/users"), ("POST", "/v3/projects")] {
        let resp = app
            .write(
                method,
                path,
                Some(serde_json::json!({"project": {"name": "p"}})),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 502, "{method} {path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], 502);
        assert_eq!(body["error"]["title"], "Bad Gateway");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be reached"));
    }
    // A write that never reached the upstream is no op.
    assert!(app.all_ops().await.is_empty());
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["upstream"], "unreachable");
    drop(dir);
}

#[tokio::test]
async fn slow_upstream_is_504_and_a_slow_write_is_logged_as_unknown_outcome() {
    let app = spawn_app_with(|c| c.upstream_timeout = Duration::from_millis(300)).await;
    let resp = app.client.get(app.url("/slow/read")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 504);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], 504);
    assert_eq!(body["error"]["title"], "Gateway Timeout");

    // The write reached the upstream and may have been applied: it must not vanish.
    let resp = app
        .client
        .post(app.url("/v3/projects"))
        .header("x-fake-hang", "1")
        .json(&serde_json::json!({"project": {"name": "p"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 504);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("op 1 with an unknown outcome"),
        "{body}"
    );
    let ops = app.all_ops().await;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["state"], "unknown_outcome");
    assert_eq!(ops[0]["kind"], "project");
    assert!(ops[0]["detail"].as_str().unwrap().contains("timeout"));
}

#[tokio::test]
async fn ready_when_upstream_answers_and_op_log_writable() {
    let app = spawn_app().await;
    let resp = app.admin_get("/readyz").await;
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"ready": true, "upstream": "reachable", "oplog": "writable"})
    );
    assert_eq!(app.admin_get("/healthz").await.status().as_u16(), 200);
    let metrics = app.admin_get("/metrics").await.text().await.unwrap();
    assert!(metrics.contains("syncgate_oplog_last_seq 0"), "{metrics}");
    // Central's own sync client is connected to the embedded broker.
    assert!(
        metrics.contains("# TYPE syncgate_broker_connections counter"),
        "{metrics}"
    );
}

/// A TLS front for a plain HTTP server: what an operator's Keystone behind
/// `https` looks like. Returns the port, on `localhost`.
async fn tls_front(cert: &rcgen::CertifiedKey<rcgen::KeyPair>, plain: String) -> u16 {
    tls_front_pem(&cert.cert.pem(), &cert.signing_key.serialize_pem(), plain).await
}

/// `tls_front` with a certificate and key as PEM.
pub async fn tls_front_pem(cert: &str, key: &str, plain: String) -> u16 {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::PrivateKeyDer};
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = plain
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn an_https_upstream_is_verified_against_the_systems_ca_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let trusted = dir.path().join("trusted.pem");
    std::fs::write(&trusted, cert.cert.pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let untrusted = dir.path().join("other.pem");
    std::fs::write(&untrusted, other.cert.pem()).unwrap();

    let fake = FakeKeystone::start().await;
    let port = tls_front(&cert, fake.url()).await;
    let upstream =
        syncgate::settings::config::parse_base_url(&format!("https://localhost:{port}")).unwrap();
    // The system's CA bundle is read from SSL_CERT_FILE (each test is its own
    // process under nextest).
    std::env::set_var("SSL_CERT_FILE", &trusted);
    let mut config = config_for(
        &fake,
        &format!("sqlite://{}", dir.path().join("c.db").display()),
    );
    config.upstream = upstream.clone();
    let app = start(fake, config).await;
    let read = app
        .client
        .get(app.url("/v3/projects"))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status().as_u16(), 200);
    let resp = app
        .write(
            "POST",
            "/v3/projects",
            Some(serde_json::json!({"project": {"name": "over-tls"}})),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(app.all_ops().await.len(), 1, "the write was captured");
    let (fake, _) = app.stop().await;

    // A certificate the system does not trust: nothing is sent, no op logged.
    std::env::set_var("SSL_CERT_FILE", &untrusted);
    let mut config = config_for(
        &fake,
        &format!("sqlite://{}", dir.path().join("d.db").display()),
    );
    config.upstream = upstream;
    let app = start(fake, config).await;
    let reached = app.fake.count();
    for (method, path) in [("GET", "/v3/projects"), ("POST", "/v3/projects")] {
        let resp = app
            .write(
                method,
                path,
                Some(serde_json::json!({"project": {"name": "refused"}})),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 502, "{method} {path}");
    }
    assert!(app.all_ops().await.is_empty());
    assert_eq!(app.fake.count(), reached, "nothing reached the upstream");
    app.stop().await;
}
