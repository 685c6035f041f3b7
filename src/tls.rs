//! TLS for syncgate's listeners and clients: a server certificate read from
//! PEM files and read again when they change (as cert-manager rotates a
//! Secret's files), client certificates a listener may require, and the CA
//! certificates a client trusts instead of the system's.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// How often a listener looks whether its certificate's files changed.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// A listener's certificate chain and private key (PEM files), and the flags
/// that named them (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_flag: &'static str,
    pub key_flag: &'static str,
}

impl CertFiles {
    /// Both files or neither: `None` for neither, an error naming the flags
    /// for one alone.
    pub fn pair(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        cert_flag: &'static str,
        key_flag: &'static str,
    ) -> Result<Option<CertFiles>, String> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(CertFiles {
                cert,
                key,
                cert_flag,
                key_flag,
            })),
            (None, None) => Ok(None),
            _ => Err(format!("{cert_flag} and {key_flag} go together")),
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in a PEM file; an error names the file and its flag and
/// says so when there are none.
pub fn read_certs(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("cannot read certificates from {} ({flag})", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {} ({flag})", path.display());
    }
    Ok(certs)
}

/// The CA certificates in a PEM file, as the roots a client or a listener
/// trusts.
pub fn read_roots(path: &Path, flag: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path, flag)? {
        roots.add(cert).with_context(|| {
            format!(
                "{} ({flag}) holds a certificate that is not a usable CA",
                path.display()
            )
        })?;
    }
    Ok(roots)
}

/// Reads the pair, checks that the key is the certificate's; also answers
/// the files' bytes, to tell a later change.
fn load(files: &CertFiles) -> anyhow::Result<(Arc<CertifiedKey>, Vec<u8>)> {
    let cert_pem = std::fs::read(&files.cert)
        .with_context(|| format!("cannot read {} ({})", files.cert.display(), files.cert_flag))?;
    let key_pem = std::fs::read(&files.key)
        .with_context(|| format!("cannot read {} ({})", files.key.display(), files.key_flag))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!(
                "cannot read certificates from {} ({})",
                files.cert.display(),
                files.cert_flag
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!(
            "no certificate in {} ({})",
            files.cert.display(),
            files.cert_flag
        );
    }
    // The key's own error could quote the file: only where it is is said.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        anyhow::anyhow!(
            "no private key in {} ({})",
            files.key.display(),
            files.key_flag
        )
    })?;
    let certified = CertifiedKey::from_der(certs, key, &provider()).map_err(|e| {
        anyhow::anyhow!(
            "the certificate in {} ({}) and the key in {} ({}) do not form a usable pair: {e}",
            files.cert.display(),
            files.cert_flag,
            files.key.display(),
            files.key_flag
        )
    })?;
    let mut seen = cert_pem;
    seen.extend_from_slice(&key_pem);
    Ok((Arc::new(certified), seen))
}

/// The certificate a listener presents, swapped when its files change.
#[derive(Debug)]
struct Reloading {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' bytes as last loaded (or last found unusable).
    seen: Mutex<Vec<u8>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// A listener's TLS: its acceptor and the certificate behind it.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    cert: Arc<Reloading>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert.files.cert)
            .finish()
    }
}

impl ServerTls {
    /// TLS with the certificate in `files`; with `client_ca`, every client
    /// must present a certificate that CA signed.
    pub fn new(files: &CertFiles, client_ca: Option<(&Path, &str)>) -> anyhow::Result<ServerTls> {
        let (key, seen) = load(files)?;
        let cert = Arc::new(Reloading {
            files: files.clone(),
            current: RwLock::new(key),
            seen: Mutex::new(seen),
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match client_ca {
            Some((path, flag)) => {
                let roots = Arc::new(read_roots(path, flag)?);
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                    .build()
                    .with_context(|| {
                        format!("{} ({flag}) cannot verify clients", path.display())
                    })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert,
        })
    }

    /// Without ALPN: for a listener that does not speak HTTP (the broker).
    pub fn without_alpn(self) -> ServerTls {
        let mut config = (*self.acceptor.config().clone()).clone();
        config.alpn_protocols.clear();
        ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            cert: self.cert,
        }
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Reads the files again; when they changed and form a usable pair, new
    /// connections get the new certificate (answers true). Files that
    /// changed into something unusable keep the certificate in use, and are
    /// reported once (an error) until they change again.
    pub fn reload(&self) -> anyhow::Result<bool> {
        let bytes = |p: &Path| std::fs::read(p).unwrap_or_default();
        let mut now = bytes(&self.cert.files.cert);
        now.extend_from_slice(&bytes(&self.cert.files.key));
        let mut seen = self.cert.seen.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return Ok(false);
        }
        *seen = now;
        drop(seen);
        let (key, _) = load(&self.cert.files)?;
        *self.cert.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(true)
    }

    /// Looks for a new certificate every `every`, for as long as it runs.
    pub async fn keep_fresh(self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload()).await {
                Ok(Ok(true)) => info!(
                    cert = %self.cert.files.cert.display(),
                    "TLS certificate changed; new connections get the new one"
                ),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(
                    error = %format!("{e:#}"),
                    "the TLS certificate's files changed but cannot be used; the one in use is kept"
                ),
                Err(e) => warn!(error = %e, "checking the TLS certificate failed"),
            }
        }
    }
}

/// A broker client's TLS from its options, every file read now (a bad one
/// is an error naming it, not a connection retried for ever): `None` when
/// it has none (TLS then only as a `tls://` URL asks, against the system's
/// CA certificates).
pub fn broker_client(
    ca: Option<&Path>,
    identity: Option<&CertFiles>,
    ca_flag: &str,
) -> anyhow::Result<Option<rustls::ClientConfig>> {
    let Some(ca) = ca else {
        if let Some(id) = identity {
            anyhow::bail!(
                "{} needs {ca_flag}: the CA certificates the broker's certificate is checked against",
                id.cert_flag
            );
        }
        return Ok(None);
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(read_roots(ca, ca_flag)?);
    Ok(Some(match identity {
        Some(id) => with_identity(builder, id)?,
        None => builder.with_no_client_auth(),
    }))
}

/// Central's own client of its embedded broker: it trusts exactly the
/// certificate the broker presents now (whatever names it carries, and
/// whichever CA signed it), presenting `identity` when given.
pub fn client_of(
    server: &ServerTls,
    identity: Option<&CertFiles>,
) -> anyhow::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Itself {
            cert: server.cert.clone(),
            provider: provider(),
        }));
    Ok(match identity {
        Some(id) => with_identity(builder, id)?,
        None => builder.with_no_client_auth(),
    })
}

fn with_identity(
    builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
    id: &CertFiles,
) -> anyhow::Result<rustls::ClientConfig> {
    let (key, _) = load(id)?;
    let private = PrivateKeyDer::from_pem_file(&id.key)
        .map_err(|_| anyhow::anyhow!("no private key in {} ({})", id.key.display(), id.key_flag))?;
    builder
        .with_client_auth_cert(key.cert.clone(), private)
        .map_err(|e| anyhow::anyhow!("{} and {}: {e}", id.cert_flag, id.key_flag))
}

/// Accepts only the certificate a listener of this process presents.
#[derive(Debug)]
struct Itself {
    cert: Arc<Reloading>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Itself {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let current = self
            .cert
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if current
            .cert
            .first()
            .is_some_and(|c| c.as_ref() == end_entity.as_ref())
        {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration that trusts the CA certificates in `ca` (not the
/// system's).
pub fn client_trusting(ca: &Path, flag: &str) -> anyhow::Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(read_roots(ca, flag)?)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let _ = dir;
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn files(dir: &Path) -> CertFiles {
        CertFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            cert_flag: "--tls-cert",
            key_flag: "--tls-key",
        }
    }

    fn presented(tls: &ServerTls) -> Vec<u8> {
        tls.cert.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn a_changed_pair_is_taken_an_unusable_one_is_refused_once_and_the_one_in_use_kept() {
        use rustls::pki_types::pem::PemObject;
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        let (c1, k1) = pair(dir.path(), "first");
        std::fs::write(&f.cert, &c1).unwrap();
        std::fs::write(&f.key, &k1).unwrap();
        let tls = ServerTls::new(&f, None).unwrap();
        let der = |pem: &str| {
            CertificateDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .to_vec()
        };
        assert_eq!(presented(&tls), der(&c1));
        // Unchanged: nothing to do.
        assert!(!tls.reload().unwrap());
        // A new certificate with the old key: refused, the first kept.
        let (c2, k2) = pair(dir.path(), "second");
        std::fs::write(&f.cert, &c2).unwrap();
        let err = format!("{:#}", tls.reload().unwrap_err());
        assert!(err.contains("do not form a usable pair"), "{err}");
        assert!(
            !err.contains(k1.lines().nth(1).unwrap()),
            "the key's bytes in {err}"
        );
        assert_eq!(presented(&tls), der(&c1));
        // Reported once, until the files change again.
        assert!(!tls.reload().unwrap());
        // Its key arrives: the pair is taken.
        std::fs::write(&f.key, &k2).unwrap();
        assert!(tls.reload().unwrap());
        assert_eq!(presented(&tls), der(&c2));
        // Garbage, or a file gone: refused, the second kept.
        std::fs::write(&f.cert, "not a certificate").unwrap();
        assert!(tls.reload().is_err());
        std::fs::remove_file(&f.key).unwrap();
        assert!(tls.reload().is_err());
        assert_eq!(presented(&tls), der(&c2));
    }

    #[test]
    fn one_file_of_a_pair_is_refused_naming_both_flags() {
        let e = CertFiles::pair(Some("c".into()), None, "--tls-cert", "--tls-key").unwrap_err();
        assert_eq!(e, "--tls-cert and --tls-key go together");
        assert_eq!(
            CertFiles::pair(None, None, "--tls-cert", "--tls-key"),
            Ok(None)
        );
    }
}
