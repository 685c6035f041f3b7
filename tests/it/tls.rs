//! TLS on every listener: central's proxy and admin listeners and an edge's
//! admin listener serve HTTPS with `--tls-cert`/`--tls-key` and take a
//! rotated certificate without a restart; `--upstream-ca` trusts a private
//! CA for the upstream Keystone; the embedded broker can require client
//! certificates (`--broker-tls-client-ca`), which edges present.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use syncgate::protocol::BrokerClientTls;
use syncgate::settings::config::BrokerMode;
use syncgate::tls::CertFiles;

use crate::fake_keystone::FakeKeystone;
use crate::helpers::{config_for, start};

/// A private CA.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = issuer.pem();
        Ca { issuer, pem }
    }

    /// A certificate for `localhost` and 127.0.0.1 (server and client use),
    /// as (certificate PEM, key PEM).
    pub fn issue(&self, name: &str) -> (String, String) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes the CA's certificate as `<name>.pem` in `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

/// Writes a certificate and key `ca` issues as `<name>.crt`/`<name>.key`.
pub fn cert_files(
    ca: &Ca,
    dir: &Path,
    name: &str,
    flags: (&'static str, &'static str),
) -> CertFiles {
    let (cert, key) = ca.issue(name);
    let files = CertFiles {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        cert_flag: flags.0,
        key_flag: flags.1,
    };
    std::fs::write(&files.cert, cert).unwrap();
    std::fs::write(&files.key, key).unwrap();
    files
}

/// A client that trusts only `ca`.
fn client_trusting(ca: &Ca) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The certificate (DER) `addr` presents to a client trusting the CA in `ca`.
async fn presented(addr: &str, ca: &Path) -> Option<Vec<u8>> {
    use tokio_rustls::rustls;
    let config = syncgate::tls::client_trusting(ca, "test").ok()?;
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    Some(tls.get_ref().1.peer_certificates()?.first()?.to_vec())
}

/// A PEM certificate's DER.
fn der(pem: &str) -> Vec<u8> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn central_serves_https_on_both_listeners_and_takes_a_rotated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("syncgate test CA");
    let files = cert_files(&ca, dir.path(), "first", ("--tls-cert", "--tls-key"));
    let fake = FakeKeystone::start().await;
    let mut config = config_for(
        &fake,
        &format!("sqlite://{}", dir.path().join("c.db").display()),
    );
    config.tls = Some(files.clone());
    let mut app = start(fake, config).await;
    let plain_admin = app.admin.clone();
    app.proxy = app.proxy.replace("http://", "https://");
    app.admin = app.admin.replace("http://", "https://");
    app.client = client_trusting(&ca);

    // Both listeners answer over TLS, checked against the CA.
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status().as_u16(), 200);
    let resp = app
        .write(
            "POST",
            "/v3/projects",
            Some(serde_json::json!({"project": {"name": "over-https"}})),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(app.all_ops().await.len(), 1, "the write was captured");
    // Keystone is told the client came over https.
    let proto: Vec<String> = app
        .fake
        .seen
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, p, _, _)| p.starts_with("/v3/projects"))
        .map(|(_, _, h, _)| {
            h.get("x-forwarded-proto")
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(proto, ["https"]);
    // Plain HTTP is not served.
    let plain = reqwest::Client::new()
        .get(format!("{plain_admin}/readyz"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");

    // cert-manager rotates the Secret: a new pair in the same files (the key
    // first, as a rename of each file would leave them for a moment).
    let first = der(&std::fs::read_to_string(&files.cert).unwrap());
    let (cert, key) = ca.issue("rotated");
    let rotated = der(&cert);
    let admin_addr = app.admin.trim_start_matches("https://").to_string();
    let ca_file = ca.write(dir.path(), "ca");
    assert_eq!(presented(&admin_addr, &ca_file).await, Some(first));
    std::fs::write(&files.key, key).unwrap();
    std::fs::write(&files.cert, cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while presented(&admin_addr, &ca_file).await.as_ref() != Some(&rotated) {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never presented"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let proxy_addr = app.proxy.trim_start_matches("https://").to_string();
    assert_eq!(presented(&proxy_addr, &ca_file).await, Some(rotated));
    // (Files that turn unusable keep the certificate in use: the tls
    // module's unit tests drive its reloads one by one.)
    app.stop().await;
}

#[tokio::test]
async fn a_listener_certificate_that_cannot_be_used_stops_the_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("syncgate test CA");
    let good = cert_files(&ca, dir.path(), "good", ("--tls-cert", "--tls-key"));
    let other = cert_files(&ca, dir.path(), "other", ("--tls-cert", "--tls-key"));
    let fake = FakeKeystone::start().await;
    let db = format!("sqlite://{}", dir.path().join("c.db").display());
    // A key that is not the certificate's.
    let mut config = config_for(&fake, &db);
    config.tls = Some(CertFiles {
        key: other.key.clone(),
        ..good.clone()
    });
    let err = format!(
        "{:#}",
        syncgate::Central::build(config).await.err().unwrap()
    );
    assert!(
        err.contains("do not form a usable pair") && err.contains("--tls-key"),
        "{err}"
    );
    // The key's bytes are never in the error.
    let key_text = std::fs::read_to_string(&other.key).unwrap();
    let body = key_text.lines().nth(1).unwrap();
    assert!(!err.contains(body), "{err}");
    // A missing file.
    let mut config = config_for(&fake, &db);
    config.tls = Some(CertFiles {
        cert: dir.path().join("missing.crt"),
        ..good
    });
    let err = format!(
        "{:#}",
        syncgate::Central::build(config).await.err().unwrap()
    );
    assert!(
        err.contains("missing.crt") && err.contains("--tls-cert"),
        "{err}"
    );
}

#[tokio::test]
async fn an_upstream_signed_by_a_private_ca_is_trusted_with_upstream_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("keystone's CA");
    let (cert, key) = ca.issue("keystone");
    let fake = FakeKeystone::start().await;
    let port = crate::proxy::tls_front_pem(&cert, &key, fake.url()).await;
    let upstream =
        syncgate::settings::config::parse_base_url(&format!("https://localhost:{port}")).unwrap();
    let db = |n: &str| format!("sqlite://{}", dir.path().join(n).display());

    let mut config = config_for(&fake, &db("a.db"));
    config.upstream = upstream.clone();
    config.upstream_ca = Some(ca.write(dir.path(), "keystone-ca"));
    let app = start(fake, config).await;
    let resp = app
        .write(
            "POST",
            "/v3/projects",
            Some(serde_json::json!({"project": {"name": "private-ca"}})),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(app.all_ops().await.len(), 1);
    let (fake, _) = app.stop().await;

    // Another CA: the upstream is not trusted, nothing is forwarded or logged.
    let stranger = Ca::new("another CA");
    let mut config = config_for(&fake, &db("b.db"));
    config.upstream = upstream;
    config.upstream_ca = Some(stranger.write(dir.path(), "stranger"));
    let before = fake.seen.requests.lock().unwrap().len();
    let app = start(fake, config).await;
    let resp = app
        .write(
            "POST",
            "/v3/projects",
            Some(serde_json::json!({"project": {"name": "refused"}})),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 502);
    assert_eq!(app.fake.seen.requests.lock().unwrap().len(), before);
    assert!(app.all_ops().await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_embedded_broker_requires_client_certificates_and_an_edge_with_one_syncs() {
    use crate::sync::sync_env;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("broker CA");
    let server = cert_files(
        &ca,
        dir.path(),
        "broker",
        ("--broker-tls-cert", "--broker-tls-key"),
    );
    let ca_file = ca.write(dir.path(), "ca");
    let central_id = cert_files(
        &ca,
        dir.path(),
        "central",
        ("--broker-client-cert", "--broker-client-key"),
    );
    let edge_id = cert_files(
        &ca,
        dir.path(),
        "edge1",
        ("--broker-tls-cert", "--broker-tls-key"),
    );
    let mut env = sync_env(&[], None, |c| {
        c.sync.edges = vec!["edge1".into()];
        if let BrokerMode::Embedded(b) = &mut c.broker {
            b.tls = Some(server.clone());
            b.tls_client_ca = Some(ca_file.clone());
        }
        // Central's own client trusts exactly its broker's certificate: no
        // CA is given to it (that certificate need not name 127.0.0.1).
        c.broker_tls = BrokerClientTls {
            ca: None,
            identity: Some(central_id.clone()),
        };
    })
    .await;
    let port = env.broker_url.rsplit(':').next().unwrap().to_string();
    let url = format!("tls://localhost:{port}");
    env.edge_broker_tls = BrokerClientTls {
        ca: Some(ca_file.clone()),
        identity: Some(edge_id.clone()),
    };
    env.add_edge("edge1", Some(url.clone())).await;
    env.create(
        "/v3/projects",
        "project",
        serde_json::json!({"project": {"name": "through-mtls"}}),
    )
    .await;
    env.until_delivered(&["edge1"], &["applied"]).await;
    env.assert_in_sync().await;

    // A client with a certificate the CA signed is served; one without a
    // certificate is refused at the handshake, and one whose certificate
    // another CA signed.
    assert!(served(&url, &ca_file, Some(&edge_id)).await);
    assert!(
        !served(&url, &ca_file, None).await,
        "a client without a certificate was served"
    );
    let stranger = Ca::new("another CA");
    let foreign = cert_files(
        &stranger,
        dir.path(),
        "foreign",
        ("--broker-tls-cert", "--broker-tls-key"),
    );
    assert!(
        !served(&url, &ca_file, Some(&foreign)).await,
        "a client whose certificate another CA signed was served"
    );
    env.shutdown().await;
}

/// Whether a NATS client trusting `ca`, presenting `identity`, is served by
/// the broker at `url` (connected and a round trip answered).
async fn served(url: &str, ca: &Path, identity: Option<&CertFiles>) -> bool {
    let mut options = async_nats::ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(ca.to_path_buf())
        .connection_timeout(Duration::from_secs(5));
    if let Some(id) = identity {
        options = options.add_client_certificate(id.cert.clone(), id.key.clone());
    }
    let attempt = tokio::time::timeout(Duration::from_secs(20), options.connect(url))
        .await
        .expect("the connection attempt ends");
    match attempt {
        Err(_) => false,
        Ok(c) => c.flush().await.is_ok(),
    }
}
