//! Typed configuration for each command, validated once at start-up, and the
//! `Secret` type (the ground floor's, `core::Secret`) that keeps tokens out of
//! `Debug` output and logs.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Url;

use crate::broker::{BrokerAuth, BrokerConfig};
use crate::keystone::client::Credentials;
use crate::keystone::scope::Scope;
use crate::keystone::RouteClass;
use crate::protocol::crypto::{self, KeyError, Sealer};

pub use crate::core::Secret;

/// Everything `syncgate central` needs.
#[derive(Debug, Clone)]
pub struct CentralConfig {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// The central Keystone's base URL.
    pub upstream: Url,
    /// CA certificates trusted for an https upstream instead of the system's.
    pub upstream_ca: Option<std::path::PathBuf>,
    /// HTTPS on the proxy and admin listeners.
    pub tls: Option<crate::tls::CertFiles>,
    /// CA certificates trusted for the other replicas' admin URLs.
    pub admin_ca: Option<std::path::PathBuf>,
    /// How central's own client trusts the broker, and proves who it is.
    pub broker_tls: crate::protocol::BrokerClientTls,
    /// Where the audit API, health and metrics listen.
    pub admin_listen: SocketAddr,
    /// Where other replicas reach this one's admin API (PostgreSQL op log).
    pub advertise_admin_url: Option<Url>,
    /// Bearer token for the audit API; required off loopback.
    pub admin_token: Option<Secret>,
    /// The op log's `sqlite://` or `postgres://` URL.
    pub db: String,
    /// The PostgreSQL op log's password (else PGPASSFILE's, or none).
    pub db_password: Option<Secret>,
    /// How long a central process starting on a PostgreSQL op log waits for
    /// another that holds it to go, before it refuses to start.
    pub oplog_lock_wait: Duration,
    /// The gateway's external URL, substituted for the upstream's in JSON bodies.
    pub public_url: Option<Url>,
    /// How long to wait for the upstream's response headers.
    pub upstream_timeout: Duration,
    /// How long a write forwarded without a whole answer may still land at the
    /// upstream: its unknown outcome is concluded "not applied" only after.
    pub upstream_settle: Duration,
    /// Largest replicable write body that is buffered and captured.
    pub max_capture_body: usize,
    /// The route classes that are replicated.
    pub replicate: Vec<RouteClass>,
    /// The broker ops are published through.
    pub broker: BrokerMode,
    /// How central's own client authenticates to an external broker.
    pub broker_client_auth: BrokerAuth,
    pub sync: SyncConfig,
    /// Central's service credentials, to learn natural keys of entities it has
    /// not seen pass through (optional).
    pub service_credentials: Option<Credentials>,
    /// Timeouts, connection cap and shutdown grace of both HTTP listeners.
    pub http: crate::serve::HttpLimits,
    /// Keys sealing request bodies in the op log (comma-separated, the first
    /// seals); the sync key when not set.
    pub oplog_key: Option<Secret>,
    /// Bounds a captured section's life. An intent whose captured section has
    /// ended without closing it (the op log failed) is logged as an
    /// `unknown_outcome` op at once, retried every quarter of this (at most a
    /// second); writes that conflict with it are refused for this long more.
    pub stale_intent_after: Duration,
}

/// How op payloads are protected on the wire.
#[derive(Clone)]
pub enum SyncKey {
    /// AES-256-GCM under this base64 key.
    Key(Secret),
    /// `--insecure-plaintext-sync`: deliberately unencrypted.
    Plaintext,
}

impl std::fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SyncKey::Key(_) => "SyncKey(***)",
            SyncKey::Plaintext => "SyncKey(plaintext)",
        })
    }
}

impl SyncKey {
    pub fn sealer(&self) -> Result<Sealer, KeyError> {
        match self {
            SyncKey::Key(k) => Sealer::with_key(k.expose()),
            SyncKey::Plaintext => Ok(Sealer::plaintext()),
        }
    }

    /// From `--sync-key` and `--insecure-plaintext-sync`; one is required.
    pub fn from_options(key: Option<String>, insecure_plaintext: bool) -> Result<SyncKey, String> {
        match (key, insecure_plaintext) {
            (Some(_), true) => Err("--sync-key and --insecure-plaintext-sync exclude each other".into()),
            (Some(k), false) => {
                crypto::validate_key(&k).map_err(|e| format!("--sync-key: {e}"))?;
                Ok(SyncKey::Key(Secret::new(k)))
            }
            (None, true) => Ok(SyncKey::Plaintext),
            (None, false) => Err("--sync-key (SYNCGATE_SYNC_KEY) is required: make one with `syncgate keygen` \
                 and give the same key to central and every edge, or pass --insecure-plaintext-sync"
                .into()),
        }
    }
}

/// Central's side of the sync protocol.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Subject prefix (`<prefix>.ops`, ...).
    pub prefix: String,
    pub key: SyncKey,
    /// Edges expected to acknowledge every op.
    pub edges: Vec<String>,
    /// Register an edge that says hello without being declared in `edges`.
    pub allow_new_edges: bool,
    /// No ack within this marks a delivery `timed_out`.
    pub ack_timeout: Duration,
    /// An edge not heard from for this long shows as offline.
    pub edge_offline_after: Duration,
    /// How often each edge's identity state is compared with central's (`None`: never).
    pub drift_interval: Option<Duration>,
    /// Ops older than this that every edge has passed are pruned from the op
    /// log (`None`: kept for ever).
    pub retention: Option<Duration>,
    /// An edge not heard from for this long keeps no op in the op log; it is
    /// resynced when it comes back (`None`: edges never expire).
    pub edge_expiry: Option<Duration>,
    /// Take control messages of protocol 1 (edges of syncgate 0.1.0, whose
    /// replay protection rests on clocks) from edges not yet upgraded.
    pub accept_protocol_1: bool,
    /// Edges with a scope (`--edge-scope`): they hold an edge key and get
    /// only what is in their scope. Every other edge gets everything.
    pub scopes: std::collections::BTreeMap<String, Scope>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            prefix: "syncgate".into(),
            key: SyncKey::Key(Secret::new(crypto::generate_key())),
            edges: Vec::new(),
            allow_new_edges: false,
            ack_timeout: Duration::from_secs(30),
            edge_offline_after: Duration::from_secs(30),
            drift_interval: Some(Duration::from_secs(3600)),
            retention: Some(Duration::from_secs(30 * 86_400)),
            edge_expiry: None,
            accept_protocol_1: true,
            scopes: Default::default(),
        }
    }
}

/// What an edge does after an op fails permanently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Acknowledge `failed` and go on with the next op.
    Continue,
    /// Acknowledge `failed` and stop until the op is re-driven.
    Halt,
}

/// Everything `syncgate edge` needs.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub id: String,
    pub broker: BrokerUrls,
    pub broker_auth: BrokerAuth,
    /// The edge Keystone's base URL.
    pub upstream: Url,
    /// CA certificates trusted for an https upstream instead of the system's.
    pub upstream_ca: Option<std::path::PathBuf>,
    /// HTTPS on the admin listener.
    pub tls: Option<crate::tls::CertFiles>,
    /// How the edge trusts the broker, and proves who it is.
    pub broker_tls: crate::protocol::BrokerClientTls,
    pub credentials: Credentials,
    pub db: String,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<Secret>,
    pub sync_prefix: String,
    pub key: SyncKey,
    pub on_failure: OnFailure,
    /// How many times an op the site answers with a server error of its own
    /// (while it answers other requests) is tried before it is recorded
    /// failed and `on_failure` applies.
    pub max_attempts: u32,
    /// How often the edge says hello (and polls for missed ops).
    pub hello_interval: Duration,
    pub upstream_timeout: Duration,
    /// How long a write that got no answer may still reach the site.
    pub upstream_settle: Duration,
    /// Ask central for an initial sync from its state before the first op.
    pub initial_sync: bool,
    /// Limits of the admin listener.
    pub http: crate::serve::HttpLimits,
}

/// Checks a subject prefix: dot-separated plain tokens.
pub fn parse_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a subject prefix (letters, digits, '-', '_', separated by '.')"
        ))
    }
}

/// Parses a comma-separated list of edge IDs.
pub fn parse_edges(s: &str) -> Result<Vec<String>, String> {
    let mut edges = Vec::new();
    for e in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if !crate::protocol::messages::valid_edge_id(e) {
            return Err(format!(
                "'{e}' is not an edge ID (letters, digits, '-', '_')"
            ));
        }
        if !edges.iter().any(|x| x == e) {
            edges.push(e.to_string());
        }
    }
    Ok(edges)
}

/// Parses `--edge-scope`: `EDGE=SCOPE` entries separated by whitespace, each
/// SCOPE `domains:<name>,...`, `replicate:<class>,...`, both joined by `;`,
/// or `all` (see `keystone::scope`).
pub fn parse_edge_scopes(s: &str) -> Result<EdgeScopes, String> {
    let mut out = EdgeScopes::new();
    for entry in s.split_whitespace() {
        let (edge, spec) = entry.split_once('=').ok_or_else(|| {
            format!("'{entry}': expected EDGE=SCOPE (site2=domains:Default,acme)")
        })?;
        if !crate::protocol::messages::valid_edge_id(edge) {
            return Err(format!(
                "'{edge}' is not an edge ID (letters, digits, '-', '_')"
            ));
        }
        let scope: Scope = spec.parse().map_err(|e| format!("edge {edge}: {e}"))?;
        if out.insert(edge.to_string(), scope).is_some() {
            return Err(format!("edge {edge} is given two scopes"));
        }
    }
    Ok(out)
}

/// Each edge's scope, by edge ID.
pub type EdgeScopes = std::collections::BTreeMap<String, Scope>;

/// Where central's broker is.
#[derive(Debug, Clone)]
pub enum BrokerMode {
    /// Served inside the central process.
    Embedded(Box<BrokerConfig>),
    /// An external NATS server or cluster; no embedded broker starts.
    External(BrokerUrls),
}

impl CentralConfig {
    /// A config for tests and embedding: loopback listeners on port 0.
    pub fn for_upstream(upstream: Url, db: impl Into<String>) -> CentralConfig {
        CentralConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            upstream,
            upstream_ca: None,
            tls: None,
            admin_ca: None,
            broker_tls: Default::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise_admin_url: None,
            admin_token: None,
            db: db.into(),
            db_password: None,
            oplog_lock_wait: Duration::from_secs(40),
            public_url: None,
            upstream_timeout: Duration::from_secs(30),
            upstream_settle: Duration::from_secs(120),
            max_capture_body: 1024 * 1024,
            replicate: RouteClass::default_set(),
            broker: BrokerMode::Embedded(Box::new(BrokerConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..BrokerConfig::default()
            })),
            broker_client_auth: BrokerAuth::None,
            sync: SyncConfig::default(),
            service_credentials: None,
            stale_intent_after: Self::stale_intent_bound(Duration::from_secs(30)),
            http: crate::serve::HttpLimits::default(),
            oplog_key: None,
        }
    }

    /// Longer than any captured section can legitimately take: the wait for the
    /// response headers and for the body, and a margin for the op log.
    pub fn stale_intent_bound(upstream_timeout: Duration) -> Duration {
        upstream_timeout * 2 + Duration::from_secs(30)
    }

    /// Checks what each option cannot say alone. Errors name the option.
    /// What seals request bodies at rest: `--oplog-key`, else the sync key.
    pub fn oplog_sealer(&self) -> Result<Sealer, String> {
        match &self.oplog_key {
            Some(k) => Sealer::with_keys(k.expose()).map_err(|e| format!("--oplog-key: {e}")),
            None => self
                .sync
                .key
                .sealer()
                .map_err(|e| format!("--sync-key: {e}")),
        }
    }

    /// TLS options that would do nothing, or leave central's own broker
    /// client unable to connect, are refused with the reason.
    fn validate_tls(&self) -> Result<(), String> {
        if self.tls.is_some()
            && self
                .advertise_admin_url
                .as_ref()
                .is_some_and(|u| u.scheme() != "https")
        {
            return Err(
                "--advertise-admin-url must be https:// when --tls-cert makes the admin listener serve HTTPS \
                 (the other replicas send the admin token there)"
                    .into(),
            );
        }
        let client = &self.broker_tls;
        match &self.broker {
            BrokerMode::Embedded(b) => {
                if client.ca.is_some() {
                    return Err(
                        "--broker-ca is for an external broker (--broker): central trusts its \
                                embedded broker's own certificate"
                            .into(),
                    );
                }
                if b.tls.is_none() && client.identity.is_some() {
                    return Err(
                        "--broker-client-cert needs TLS at the broker: the embedded broker's \
                                --broker-tls-cert and --broker-tls-key, or an external --broker"
                            .into(),
                    );
                }
                if b.tls_client_ca.is_some() && client.identity.is_none() {
                    return Err("--broker-tls-client-ca makes the embedded broker require client \
                                certificates, central's own client too: give it --broker-client-cert \
                                and --broker-client-key"
                        .into());
                }
            }
            BrokerMode::External(_) => {
                if client.identity.is_some() && client.ca.is_none() {
                    return Err(
                        "--broker-client-cert needs --broker-ca: the CA certificates the \
                                broker's certificate is checked against"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.admin_listen.ip().is_loopback() && self.admin_token.is_none() {
            return Err(format!(
                "--admin-token (SYNCGATE_ADMIN_TOKEN) is required when --admin-listen is not a \
                 loopback address (got {})",
                self.admin_listen
            ));
        }
        if matches!(&self.admin_token, Some(t) if t.expose().is_empty()) {
            return Err("--admin-token must not be empty".into());
        }
        if self.upstream_is_self() {
            return Err(format!(
                "--upstream {} points at the gateway's own --listen address {}; give one of them another port",
                self.upstream, self.listen
            ));
        }
        if self.replicate.is_empty() {
            return Err("--replicate must name at least one route class".into());
        }
        self.validate_scopes()?;
        self.validate_tls()?;
        match crate::store::dialect_of(&self.db) {
            None => {
                return Err(format!(
                    "--db {}: the op log is a sqlite://FILE or a postgres://USER@HOST:PORT/DB URL",
                    crate::store::shown(&self.db)
                ))
            }
            Some(crate::store::Dialect::Postgres) if crate::store::has_password(&self.db) => {
                return Err(format!(
                    "--db {}: a password in the URL would show wherever the URL does (process \
                     lists, logs); give it in --db-password-file or PGPASSFILE",
                    crate::store::shown(&self.db)
                ))
            }
            Some(crate::store::Dialect::Sqlite) if self.db_password.is_some() => {
                return Err("--db-password-file is for a postgres:// op log".into())
            }
            _ => {}
        }
        Ok(())
    }
}

impl CentralConfig {
    /// Scopes need sealing (an edge key is what keeps the rest from that
    /// edge), and name only classes central replicates.
    fn validate_scopes(&self) -> Result<(), String> {
        // Central holds the keys edge keys are derived from, never one.
        let edge_key = |key: &str| {
            Sealer::with_keys(key)
                .ok()
                .and_then(|s| s.edge().map(str::to_string))
        };
        if let Some(edge) = match &self.sync.key {
            SyncKey::Key(k) => edge_key(k.expose()),
            SyncKey::Plaintext => None,
        } {
            return Err(format!(
                "--sync-key is the edge key of edge '{edge}': central holds the sync key the \
                 edge keys are derived from"
            ));
        }
        if let Some(edge) = self.oplog_key.as_ref().and_then(|k| edge_key(k.expose())) {
            return Err(format!(
                "--oplog-key is the edge key of edge '{edge}': give central's op log a key of its own"
            ));
        }
        if self.sync.scopes.is_empty() {
            return Ok(());
        }
        if matches!(self.sync.key, SyncKey::Plaintext) {
            return Err(
                "--edge-scope needs a sync key: with --insecure-plaintext-sync any \
                        edge could read every op"
                    .into(),
            );
        }
        for (edge, scope) in &self.sync.scopes {
            for class in scope.classes.iter().flatten() {
                if !self.replicate.contains(class) {
                    return Err(format!(
                        "--edge-scope {edge}: replicate:{class} is not replicated by central \
                         (--replicate {})",
                        self.replicate
                            .iter()
                            .map(|c| c.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether the upstream is this gateway itself, which would forward forever.
    fn upstream_is_self(&self) -> bool {
        if self.upstream.port_or_known_default() != Some(self.listen.port()) {
            return false;
        }
        let host = self.upstream.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => {
                ip.is_loopback() || self.listen.ip().is_unspecified() || self.listen.ip() == ip
            }
            Err(_) => host == "localhost",
        }
    }
}

/// Parses a base URL for an upstream or public URL: http(s), a host, no query.
pub fn parse_base_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| format!("'{s}' is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("'{s}' must start with http:// or https://"));
    }
    if url.host_str().is_none() {
        return Err(format!("'{s}' has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("'{s}' must not carry a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not accepted".into());
    }
    Ok(url)
}

pub use crate::protocol::BrokerUrls;

/// Parses one broker URL or several, comma-separated
/// (`nats://a:4222,nats://b:4222`; a list in the configuration file).
pub fn parse_nats_urls(s: &str) -> Result<BrokerUrls, String> {
    let mut urls = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("'{}' has an empty URL in its list", masked(s)));
        }
        let url = parse_nats_url(part)?;
        if urls.contains(&url) {
            return Err(format!("'{}' is listed twice", crate::redact::url(&url)));
        }
        urls.push(url);
    }
    Ok(BrokerUrls::new(urls))
}

/// Parses a NATS server URL: `nats://host:port` (or `tls://`), no path, no
/// credentials (a URL is shown in logs and by `syncgate config check`; they
/// go in their own options).
pub fn parse_nats_url(s: &str) -> Result<Url, String> {
    let shown = masked(s);
    let url = Url::parse(s).map_err(|e| format!("'{shown}' is not a URL ({e})"))?;
    if !matches!(url.scheme(), "nats" | "tls") {
        return Err(format!("'{shown}' must start with nats:// or tls://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("'{shown}' has no host"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() {
        return Err(format!("'{shown}' must be only nats://host:port"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "'{shown}' carries credentials: give them with --broker-token(-file), or \
             --broker-user and --broker-password-file"
        ));
    }
    Ok(url)
}

/// `s` with whatever stands between `://` and `@` masked (what a URL's
/// credentials would be), for error messages.
fn masked(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split(',').enumerate() {
        if i > 0 {
            out.push(',');
        }
        match (part.find("://"), part.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme + 3 => {
                out.push_str(&part[..scheme + 3]);
                out.push_str("***");
                out.push_str(&part[at..]);
            }
            _ => out.push_str(part),
        }
    }
    out
}

/// Parses a duration such as `30s`, `500ms` or `2m`.
/// Parses an interval where `0` means never (a zero duration).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

/// `--retention` and `--edge-expiry`: 0 (off) or an hour or more. Shorter
/// would prune what central may still need (a write in doubt settles, an ack
/// times out, an edge restarts) or forget an edge over a network blip.
pub fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = parse_interval(s)?;
    if !d.is_zero() && d < Duration::from_secs(3600) {
        return Err(format!(
            "'{s}' is too short: give 0 (off) or at least 1h (such as 30d)"
        ));
    }
    Ok(d)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration such as 30s or 500ms ({e})"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

/// Parses a size in bytes: `1048576`, `512KiB`, `1MiB`, `1MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size such as 1048576, 512KiB or 1MiB"))?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit '{other}' (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes == 0 {
        return Err("must be greater than zero".into());
    }
    Ok(bytes)
}

/// Parses a comma-separated list of route classes.
pub fn parse_classes(s: &str) -> Result<Vec<RouteClass>, String> {
    let mut classes = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all" {
            classes.extend(RouteClass::ALL);
        } else {
            classes.push(part.parse()?);
        }
    }
    classes.sort();
    classes.dedup();
    Ok(classes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert!(s.matches(b"hunter2"));
        assert!(!s.matches(b"hunter3"));
        assert!(!s.matches(b"hunter"));
    }

    #[test]
    fn retention_is_off_or_an_hour_or_more() {
        assert_eq!(parse_retention("0"), Ok(Duration::ZERO));
        assert_eq!(parse_retention("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_retention("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_retention("5m").unwrap_err().contains("at least 1h"));
        assert!(parse_retention("soon").is_err());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1XB").unwrap_err().contains("XB"));
        assert!(parse_size("99999999999999999999GiB").is_err());
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn base_urls() {
        assert!(parse_base_url("http://keystone:5000").is_ok());
        assert!(parse_base_url("https://id.example.org/identity").is_ok());
        assert!(parse_base_url("ftp://x").is_err());
        assert!(parse_base_url("keystone:5000").is_err());
        assert!(parse_base_url("http://u:p@keystone")
            .unwrap_err()
            .contains("credentials"));
    }

    #[test]
    fn nats_urls() {
        assert!(parse_nats_url("nats://127.0.0.1:4222").is_ok());
        assert!(parse_nats_url("tls://nats.example.org:4222").is_ok());
        assert!(parse_nats_url("http://x:4222").is_err());
        assert!(parse_nats_url("nats://x:4222/path").is_err());
        assert!(parse_nats_url("nats://").is_err());
        let seeds = parse_nats_urls("nats://a:4222, nats://b:4222,tls://c:4222").unwrap();
        assert_eq!(seeds.urls().len(), 3);
        assert_eq!(seeds.redacted(), "nats://a:4222,nats://b:4222,tls://c:4222");
        for with_secret in [
            "nats://u:sekrit@a:4222,nats://b:4222",
            "nats://u:sekrit@a:4222/x",
            "ftp://u:sekrit@a:4222",
            "nats://u:sekrit@",
            "nats://a:4222,,nats://u:sekrit@b:4222",
        ] {
            let e = parse_nats_urls(with_secret).unwrap_err();
            assert!(!e.contains("sekrit"), "{e}");
        }
        for bad in [
            "nats://a:4222,",
            "nats://a:4222,,nats://b:4222",
            "nats://a:4222,nats://a:4222",
            "nats://a:4222,http://b:80",
        ] {
            assert!(parse_nats_urls(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn classes() {
        assert_eq!(
            parse_classes("identity, policy,identity"),
            Ok(vec![RouteClass::Identity, RouteClass::Policy])
        );
        assert_eq!(parse_classes("all").unwrap().len(), 8);
        assert!(parse_classes("identity,bogus").is_err());
    }

    #[test]
    fn admin_token_required_off_loopback() {
        let url = parse_base_url("http://k:5000").unwrap();
        let mut c = CentralConfig::for_upstream(url, "sqlite://x.db");
        assert!(c.validate().is_ok());
        c.admin_listen = "0.0.0.0:9090".parse().unwrap();
        assert!(c.validate().unwrap_err().contains("--admin-token"));
        c.admin_token = Some(Secret::new("t"));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn upstream_cannot_be_the_gateway_itself() {
        let mut c =
            CentralConfig::for_upstream(parse_base_url("http://127.0.0.1:5000").unwrap(), "x");
        c.listen = "0.0.0.0:5000".parse().unwrap();
        assert!(c.validate().unwrap_err().contains("--upstream"));
        c.upstream = parse_base_url("http://localhost:5000").unwrap();
        assert!(c.validate().is_err());
        c.upstream = parse_base_url("http://keystone:5000").unwrap();
        assert!(c.validate().is_ok());
        c.upstream = parse_base_url("http://127.0.0.1:5001").unwrap();
        assert!(c.validate().is_ok());
    }
}
