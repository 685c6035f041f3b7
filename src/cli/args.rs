//! The command line: flags with their `SYNCGATE_*` environment variables and
//! defaults, turned into the typed configs in `settings::config`. Bad values
//! exit with code 2 and one line naming the option.

pub use crate::core::read_secret;
pub use crate::telemetry::LogFormat;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use reqwest::Url;

use crate::broker::{BrokerAuth, BrokerConfig};
use crate::keystone::client::Credentials;
use crate::keystone::RouteClass;
use crate::protocol::BrokerClientTls;
use crate::settings::config::{
    self, BrokerMode, CentralConfig, EdgeConfig, OnFailure, Secret, SyncConfig, SyncKey,
};
use crate::tls::CertFiles;

#[derive(Debug, Parser)]
#[command(
    name = "syncgate",
    version,
    about = "Keeps Keystone identity data in sync across sites"
)]
pub struct Cli {
    /// Log line format.
    #[arg(
        long,
        env = "SYNCGATE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// A TOML configuration file: one section per role, under environment
    /// variables and flags (see `syncgate config check`).
    #[arg(long, env = "SYNCGATE_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the central gateway in front of the central Keystone.
    Central(Box<CentralArgs>),
    /// Run an edge gateway: replay central's ops against this site's Keystone.
    Edge(Box<EdgeArgs>),
    /// Run the embedded NATS-protocol broker alone.
    Broker(Box<BrokerArgs>),
    /// Print a new sync key (32 random bytes, base64); with --edge, that edge's
    /// edge key, derived from the sync key (--sync-key, SYNCGATE_SYNC_KEY or
    /// --sync-key-file), for an edge with a scope at central.
    Keygen(KeygenArgs),
    /// Ask central's audit API: edges, ops, what is out of sync; re-drive an op.
    Audit(Box<AuditArgs>),
    /// Exit 0 when a gateway's admin listener says it is alive (/healthz):
    /// the container image's HEALTHCHECK, which has no shell or curl.
    Healthcheck(HealthcheckArgs),
    /// Check a configuration: print a role's effective options (file,
    /// environment, flags; secrets as ***), exit 2 naming the first error.
    Config(ConfigArgs),
    /// Work on central's op log while central is stopped: copy it into a new
    /// database (from one process on SQLite to PostgreSQL).
    Oplog(OplogArgs),
}

#[derive(Debug, Args)]
pub struct OplogArgs {
    #[command(subcommand)]
    pub verb: OplogVerb,
}

#[derive(Debug, Subcommand)]
pub enum OplogVerb {
    /// Copy an op log, with its edges, watermarks, exceptions, resyncs and
    /// drift audits, into a new, empty database; count the rows on both
    /// sides. Stop central first; start it again on the copy with the same
    /// keys (sealed request bodies are copied as they are).
    Copy {
        /// The op log to copy: `sqlite://FILE` or `postgres://USER@HOST:PORT/DB`.
        #[arg(long)]
        from: String,
        /// The database to copy it into (new, or holding no op log yet).
        #[arg(long)]
        to: String,
        /// A file holding the password of `--from` (PostgreSQL).
        #[arg(long)]
        from_password_file: Option<PathBuf>,
        /// A file holding the password of `--to` (PostgreSQL).
        #[arg(long)]
        to_password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The admin listener's URL; by default the address in SYNCGATE_ADMIN_LISTEN,
    /// else the admin_listen of the configuration file (SYNCGATE_CONFIG), an
    /// unspecified address meaning this host; else 127.0.0.1:9090, then :9091.
    #[arg(long, value_parser = config::parse_base_url)]
    pub url: Option<Url>,

    /// How long to wait for an answer.
    #[arg(long, default_value = "3s", value_parser = config::parse_duration)]
    pub timeout: Duration,
}

impl HealthcheckArgs {
    /// The URLs of `/healthz` to try, in order.
    pub fn targets(&self) -> Vec<String> {
        if let Some(url) = &self.url {
            return vec![format!("{}/healthz", url.as_str().trim_end_matches('/'))];
        }
        let from_file = |key: &str| {
            let path = std::env::var_os(crate::cli::CONFIG_ENV)?;
            let file = crate::cli::ConfigFile::load(Path::new(&path)).ok()?;
            ["central", "edge"]
                .iter()
                .find_map(|role| file.get(role, key))
                .map(str::to_string)
        };
        let listen = std::env::var("SYNCGATE_ADMIN_LISTEN")
            .ok()
            .or_else(|| from_file("admin_listen"))
            .and_then(|v| v.parse::<SocketAddr>().ok());
        // The admin listener serves HTTPS when a certificate is configured.
        let scheme =
            if std::env::var_os("SYNCGATE_TLS_CERT").is_some() || from_file("tls_cert").is_some() {
                "https"
            } else {
                "http"
            };
        match listen {
            Some(addr) => {
                let ip = match addr.ip() {
                    ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
                    ip if ip.is_unspecified() => "[::1]".to_string(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                    ip => ip.to_string(),
                };
                vec![format!("{scheme}://{ip}:{}/healthz", addr.port())]
            }
            None => vec![
                format!("{scheme}://127.0.0.1:9090/healthz"),
                format!("{scheme}://127.0.0.1:9091/healthz"),
            ],
        }
    }
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub verb: ConfigVerb,
}

#[derive(Debug, Subcommand)]
pub enum ConfigVerb {
    /// Validate and print the effective configuration of a role.
    Check {
        role: Role,
        /// The role's own options, as they would be given to it.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// A command that runs from a configuration.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Role {
    Central,
    Edge,
    Broker,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Central => "central",
            Role::Edge => "edge",
            Role::Broker => "broker",
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Central's admin listener.
    #[arg(long, env = "SYNCGATE_ADMIN_URL", default_value = "http://127.0.0.1:9090",
          value_parser = config::parse_base_url)]
    pub admin_url: Url,

    /// Trust only the CA certificates in this PEM file for an https
    /// --admin-url (central's --tls-cert signed by a private CA).
    #[arg(long, env = "SYNCGATE_ADMIN_CA")]
    pub admin_ca: Option<PathBuf>,

    #[command(flatten)]
    pub admin_token: AdminTokenArgs,

    /// Aligned columns, or the API's JSON.
    #[arg(long, default_value = "table", global = true)]
    pub format: OutputFormat,

    #[command(subcommand)]
    pub verb: AuditVerb,
}

#[derive(Debug, Subcommand)]
pub enum AuditVerb {
    /// Each edge: cursor, acknowledged watermark, lag, last seen, error.
    Edges,
    /// Ops, oldest first.
    Ops {
        /// Only ops after this seq.
        #[arg(long)]
        after: Option<i64>,
        /// At most this many (1-1000).
        #[arg(long)]
        limit: Option<i64>,
        /// Only this resource kind (user, project, grant, ...).
        #[arg(long)]
        kind: Option<String>,
        /// committed or unknown_outcome.
        #[arg(long)]
        state: Option<String>,
    },
    /// Every (op, edge) failed or timed out; exit code 1 when there is any.
    OutOfSync {
        /// Only this edge.
        #[arg(long)]
        edge: Option<String>,
    },
    /// One op, with its state at each edge.
    Op { seq: i64 },
    /// Re-drive one op at one edge (never applies it twice or out of order).
    Retry {
        seq: i64,
        #[arg(long)]
        edge: String,
    },
    /// Have one edge pass over one op it is stuck on (retried for ever, or
    /// halted on its failure) or that failed there: recorded
    /// operator_skipped with who and when; the site may then differ (run a
    /// drift audit, then a repair).
    Skip {
        seq: i64,
        #[arg(long)]
        edge: String,
        /// Who asks (recorded with the skip; default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// One edge: its position, resync, last drift audit, users needing a password.
    Edge { edge: String },
    /// Bring an edge to central's current identity state (initial sync).
    Resync {
        edge: String,
        /// Also delete what only the edge has.
        #[arg(long)]
        prune: bool,
    },
    /// The last drift audit's differences; exit code 1 when there is any.
    Drift {
        /// Only this edge.
        #[arg(long)]
        edge: Option<String>,
        /// Only this kind (user, project, assignment, ...).
        #[arg(long)]
        kind: Option<String>,
        /// missing_at_edge, only_at_edge or differs.
        #[arg(long)]
        category: Option<String>,
    },
    /// Run the drift audit now (every edge without --edge).
    DriftRun {
        #[arg(long)]
        edge: Option<String>,
        /// An edge with a scope: compare what it holds outside its scope too
        /// (what came from central and left the scope shows as only at the edge).
        #[arg(long, requires = "edge")]
        outside_scope: bool,
    },
    /// Apply central's state for what the drift audit found at an edge.
    Repair {
        #[arg(long)]
        edge: String,
        /// Also delete what only the edge has.
        #[arg(long)]
        prune: bool,
    },
}

impl AuditArgs {
    pub fn into_request(self) -> Result<crate::cli::audit::AuditRequest, String> {
        use crate::cli::audit::Verb;
        let token = self.admin_token.read()?.map(Secret::new);
        let verb = match self.verb {
            AuditVerb::Edges => Verb::Edges,
            AuditVerb::Ops {
                after,
                limit,
                kind,
                state,
            } => Verb::Ops {
                after,
                limit,
                kind,
                state,
            },
            AuditVerb::OutOfSync { edge } => Verb::OutOfSync { edge },
            AuditVerb::Op { seq } => Verb::Op { seq },
            AuditVerb::Retry { seq, edge } => Verb::Retry { seq, edge },
            AuditVerb::Skip { seq, edge, by } => Verb::Skip {
                seq,
                edge,
                by: by
                    .or_else(|| std::env::var("USER").ok())
                    .filter(|b| !b.is_empty())
                    .unwrap_or_else(|| "syncgate audit".into()),
            },
            AuditVerb::Edge { edge } => Verb::Edge { edge },
            AuditVerb::Resync { edge, prune } => Verb::Resync { edge, prune },
            AuditVerb::Drift {
                edge,
                kind,
                category,
            } => Verb::Drift {
                edge,
                kind,
                category,
            },
            AuditVerb::DriftRun {
                edge,
                outside_scope,
            } => Verb::DriftRun {
                edge,
                outside_scope,
            },
            AuditVerb::Repair { edge, prune } => Verb::Repair { edge, prune },
        };
        Ok(crate::cli::audit::AuditRequest {
            admin_url: self.admin_url,
            admin_ca: self.admin_ca,
            token,
            json: matches!(self.format, OutputFormat::Json),
            verb,
        })
    }
}

/// `syncgate keygen`.
#[derive(Debug, Clone, Args)]
pub struct KeygenArgs {
    /// Print this edge's edge key instead of a new sync key.
    #[arg(long, value_parser = parse_edge_id)]
    pub edge: Option<String>,

    /// The sync key (comma-separated for a rotation) the edge key is derived from.
    #[arg(long, env = "SYNCGATE_SYNC_KEY", hide_env_values = true)]
    pub sync_key: Option<String>,

    /// A file holding the sync key.
    #[arg(long, env = "SYNCGATE_SYNC_KEY_FILE", conflicts_with = "sync_key")]
    pub sync_key_file: Option<PathBuf>,
}

impl KeygenArgs {
    /// A new sync key, or the edge key of `--edge`.
    pub fn key(&self) -> Result<String, String> {
        let Some(edge) = &self.edge else {
            return Ok(crate::protocol::crypto::generate_key());
        };
        let key = read_secret(
            self.sync_key.clone(),
            self.sync_key_file.as_deref(),
            "--sync-key-file",
        )?
        .ok_or("--edge derives from the sync key: give --sync-key, SYNCGATE_SYNC_KEY or --sync-key-file")?;
        crate::protocol::crypto::Sealer::with_keys(&key)
            .and_then(|s| s.edge_key_text(edge))
            .map_err(|e| format!("--sync-key: {e}"))
    }
}

fn parse_edge_id(s: &str) -> Result<String, String> {
    if crate::protocol::messages::valid_edge_id(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not an edge ID (letters, digits, '-', '_')"
        ))
    }
}

/// Options of the sync protocol shared by central and edges.
#[derive(Debug, Clone, Args)]
pub struct SyncArgs {
    /// Shared AES-256-GCM key for op payloads (base64 of 32 bytes; `syncgate keygen`).
    #[arg(long, env = "SYNCGATE_SYNC_KEY", hide_env_values = true)]
    pub sync_key: Option<String>,

    /// A file holding the sync key (keeps it off the command line).
    #[arg(long, env = "SYNCGATE_SYNC_KEY_FILE", conflicts_with = "sync_key")]
    pub sync_key_file: Option<PathBuf>,

    /// Send ops unencrypted (tests and trusted networks only).
    #[arg(long, env = "SYNCGATE_INSECURE_PLAINTEXT_SYNC")]
    pub insecure_plaintext_sync: bool,

    /// Subject prefix on the broker.
    #[arg(long, env = "SYNCGATE_SYNC_PREFIX", default_value = "syncgate", value_parser = config::parse_prefix)]
    pub sync_prefix: String,
}

/// The admin API's bearer token, as a value or from a file.
#[derive(Debug, Clone, Args)]
pub struct AdminTokenArgs {
    /// Bearer token of the admin API (required when it listens off loopback).
    #[arg(long, env = "SYNCGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// A file holding the admin token.
    #[arg(
        long,
        env = "SYNCGATE_ADMIN_TOKEN_FILE",
        conflicts_with = "admin_token"
    )]
    pub admin_token_file: Option<PathBuf>,
}

impl AdminTokenArgs {
    fn read(self) -> Result<Option<String>, String> {
        read_secret(
            self.admin_token,
            self.admin_token_file.as_deref(),
            "--admin-token-file",
        )
    }
}

impl SyncArgs {
    fn key(&self) -> Result<SyncKey, String> {
        let key = read_secret(
            self.sync_key.clone(),
            self.sync_key_file.as_deref(),
            "--sync-key-file",
        )?;
        SyncKey::from_options(key, self.insecure_plaintext_sync)
    }
}

/// Limits of the HTTP listeners.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Time a client has to send its request line and headers (slow clients are dropped).
    #[arg(long, env = "SYNCGATE_HEADER_TIMEOUT", default_value = "10s", value_parser = config::parse_duration)]
    pub header_timeout: Duration,

    /// Longest pause while a client sends a request body.
    #[arg(long, env = "SYNCGATE_BODY_TIMEOUT", default_value = "30s", value_parser = config::parse_duration)]
    pub body_timeout: Duration,

    /// Connections served at once per listener (more wait in the listen backlog).
    #[arg(long, env = "SYNCGATE_MAX_CONNECTIONS", default_value = "4096")]
    pub max_connections: usize,

    /// After SIGTERM: how long requests in flight may take before the process exits.
    #[arg(long, env = "SYNCGATE_SHUTDOWN_GRACE", default_value = "20s", value_parser = config::parse_duration)]
    pub shutdown_grace: Duration,

    /// Serve HTTPS on every HTTP listener with this certificate chain (PEM),
    /// read again when the file changes (with --tls-key).
    #[arg(long, env = "SYNCGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert, read again when it changes.
    #[arg(long, env = "SYNCGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl HttpArgs {
    fn tls(&self) -> Result<Option<CertFiles>, String> {
        CertFiles::pair(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            "--tls-cert",
            "--tls-key",
        )
    }

    fn limits(&self) -> Result<crate::serve::HttpLimits, String> {
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        Ok(crate::serve::HttpLimits {
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            max_connections: self.max_connections,
            shutdown_grace: self.shutdown_grace,
        })
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FailureMode {
    Continue,
    Halt,
}

#[derive(Debug, Clone, Args)]
pub struct EdgeArgs {
    /// This edge's ID (letters, digits, '-', '_').
    #[arg(long = "id", env = "SYNCGATE_EDGE_ID")]
    pub id: String,

    /// The broker to take ops from: nats://host:port, or several, comma-separated
    /// (a NATS cluster's seeds; at a site, usually its own leaf node).
    // Parsed in `into_config`: an error never repeats what was given (a URL
    // with credentials in it is refused, not shown).
    #[arg(long, env = "SYNCGATE_BROKER")]
    pub broker: String,

    /// Token for the broker.
    #[arg(long, env = "SYNCGATE_BROKER_TOKEN", hide_env_values = true)]
    pub broker_token: Option<String>,

    /// A file holding the broker token.
    #[arg(
        long,
        env = "SYNCGATE_BROKER_TOKEN_FILE",
        conflicts_with = "broker_token"
    )]
    pub broker_token_file: Option<PathBuf>,

    /// User name for the broker (with --broker-password or
    /// --broker-password-file): a NATS server's user for this site.
    #[arg(long, env = "SYNCGATE_BROKER_USER", conflicts_with_all = ["broker_token", "broker_token_file"])]
    pub broker_user: Option<String>,

    /// Password for the broker (with --broker-user).
    #[arg(long, env = "SYNCGATE_BROKER_PASSWORD", hide_env_values = true)]
    pub broker_password: Option<String>,

    /// A file holding the broker password.
    #[arg(
        long,
        env = "SYNCGATE_BROKER_PASSWORD_FILE",
        conflicts_with = "broker_password"
    )]
    pub broker_password_file: Option<PathBuf>,

    /// This site's Keystone base URL (also the auth URL of the service credentials).
    #[arg(long, env = "SYNCGATE_UPSTREAM", value_parser = config::parse_base_url)]
    pub upstream: Url,

    /// Trust only the CA certificates in this PEM file (not the system's)
    /// for an https --upstream.
    #[arg(long, env = "SYNCGATE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// Trust only the CA certificates in this PEM file for the broker
    /// (tls:// URLs, or a broker that requires TLS).
    #[arg(long, env = "SYNCGATE_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,

    /// This edge's client certificate (PEM) for a broker that requires one
    /// (with --broker-tls-key).
    #[arg(long, env = "SYNCGATE_BROKER_TLS_CERT")]
    pub broker_tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --broker-tls-cert.
    #[arg(long, env = "SYNCGATE_BROKER_TLS_KEY")]
    pub broker_tls_key: Option<PathBuf>,

    /// The edge's state database URL (created if missing).
    #[arg(long, env = "SYNCGATE_DB", default_value = "sqlite://syncgate-edge.db")]
    pub db: String,

    /// Address of health, metrics and status.
    #[arg(long, env = "SYNCGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    pub admin_listen: SocketAddr,

    #[command(flatten)]
    pub admin_token: AdminTokenArgs,

    /// After an op fails permanently: go on with the next, or stop until it is retried.
    #[arg(long, env = "SYNCGATE_ON_FAILURE", default_value = "continue")]
    pub on_failure: FailureMode,

    /// How many times to try an op this site's Keystone answers with a
    /// server error (500, or a 5xx other than 502, 503 and 504) while it
    /// answers other requests (a poison op), before recording it failed and
    /// going on as --on-failure says. An outage (no answer, 502, 503, 504,
    /// 429, or a server error to every request) is retried for as long as it
    /// lasts.
    #[arg(long, env = "SYNCGATE_MAX_ATTEMPTS", default_value = "10",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,

    /// How often to say hello to central (and look for missed ops).
    #[arg(long, env = "SYNCGATE_HELLO_INTERVAL", default_value = "10s", value_parser = config::parse_duration)]
    pub hello_interval: Duration,

    /// How long to wait for this site's Keystone.
    #[arg(long, env = "SYNCGATE_UPSTREAM_TIMEOUT", default_value = "30s", value_parser = config::parse_duration)]
    pub upstream_timeout: Duration,

    /// After a write got no answer (a timeout, a broken connection, a 502 or
    /// 504 from a load balancer), how long it may still reach this site's
    /// Keystone: nothing is sent again, and no later op applied, before. Longer
    /// than a request can be held there (load balancer and database lock
    /// timeouts).
    #[arg(long, env = "SYNCGATE_UPSTREAM_SETTLE", default_value = "120s", value_parser = config::parse_duration)]
    pub upstream_settle: Duration,

    /// Ask central to bring this site to central's current identity state
    /// before the op stream (once: a new site joining an existing cloud).
    #[arg(long, env = "SYNCGATE_INITIAL_SYNC")]
    pub initial_sync: bool,

    #[command(flatten)]
    pub http: HttpArgs,

    #[command(flatten)]
    pub sync: SyncArgs,
}

impl EdgeArgs {
    /// Validates as start-up would, without starting anything.
    pub fn check(&self) -> Result<(), String> {
        self.clone().into_config().map(drop)
    }

    pub fn into_config(self) -> Result<EdgeConfig, String> {
        if !crate::protocol::messages::valid_edge_id(&self.id) {
            return Err(format!(
                "--id '{}' must be letters, digits, '-' or '_' (at most 64)",
                self.id
            ));
        }
        let credentials = Credentials::from_env()?.ok_or(
            "the edge needs its own service credentials: set OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME \
             (and OS_USER_DOMAIN_NAME, OS_PROJECT_DOMAIN_NAME), or OS_APPLICATION_CREDENTIAL_ID and \
             OS_APPLICATION_CREDENTIAL_SECRET",
        )?;
        let admin_token = self.admin_token.read()?.map(Secret::new);
        let broker_token = read_secret(
            self.broker_token,
            self.broker_token_file.as_deref(),
            "--broker-token-file",
        )?;
        if !self.admin_listen.ip().is_loopback() && admin_token.is_none() {
            return Err(format!(
                "--admin-token (SYNCGATE_ADMIN_TOKEN) is required when --admin-listen is not a loopback address (got {})",
                self.admin_listen
            ));
        }
        let broker_password = read_secret(
            self.broker_password,
            self.broker_password_file.as_deref(),
            "--broker-password-file",
        )?;
        let broker = config::parse_nats_urls(&self.broker).map_err(|e| format!("--broker: {e}"))?;
        let upstream_ca = upstream_ca(&self.upstream, self.upstream_ca)?;
        if self.broker_tls_cert.is_some() && self.broker_ca.is_none() {
            return Err(
                "--broker-tls-cert needs --broker-ca: the CA certificates the broker's \
                        certificate is checked against"
                    .into(),
            );
        }
        Ok(EdgeConfig {
            id: self.id,
            broker,
            broker_auth: client_auth(broker_token, self.broker_user, broker_password)?,
            broker_tls: BrokerClientTls {
                ca: self.broker_ca,
                identity: CertFiles::pair(
                    self.broker_tls_cert,
                    self.broker_tls_key,
                    "--broker-tls-cert",
                    "--broker-tls-key",
                )?,
            },
            upstream: self.upstream,
            upstream_ca,
            tls: self.http.tls()?,
            credentials,
            db: self.db,
            admin_listen: self.admin_listen,
            admin_token,
            key: self.sync.key()?,
            sync_prefix: self.sync.sync_prefix,
            on_failure: match self.on_failure {
                FailureMode::Continue => OnFailure::Continue,
                FailureMode::Halt => OnFailure::Halt,
            },
            max_attempts: self.max_attempts,
            hello_interval: self.hello_interval,
            upstream_timeout: self.upstream_timeout,
            upstream_settle: self.upstream_settle,
            initial_sync: self.initial_sync,
            http: self.http.limits()?,
        })
    }
}

/// `--upstream-ca`, which only an https upstream uses.
fn upstream_ca(upstream: &Url, ca: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    if ca.is_some() && upstream.scheme() != "https" {
        return Err(format!(
            "--upstream-ca is for an https --upstream; {upstream} is plain HTTP"
        ));
    }
    Ok(ca)
}

/// Route classes as one comma-separated value.
#[derive(Debug, Clone)]
pub struct Classes(pub Vec<RouteClass>);

fn parse_classes(s: &str) -> Result<Classes, String> {
    config::parse_classes(s).map(Classes)
}

#[derive(Debug, Clone, Args)]
pub struct CentralArgs {
    /// Address the proxy listens on.
    #[arg(long, env = "SYNCGATE_LISTEN", default_value = "0.0.0.0:5000")]
    pub listen: SocketAddr,

    /// The central Keystone's base URL, e.g. http://keystone:5000.
    #[arg(long, env = "SYNCGATE_UPSTREAM", value_parser = config::parse_base_url)]
    pub upstream: Url,

    /// Trust only the CA certificates in this PEM file (not the system's)
    /// for an https --upstream.
    #[arg(long, env = "SYNCGATE_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,

    /// Trust only the CA certificates in this PEM file for the broker:
    /// central's own client, to the embedded broker (with --broker-tls-cert)
    /// or an external one.
    #[arg(long, env = "SYNCGATE_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,

    /// Trust only the CA certificates in this PEM file for the other central
    /// replicas' HTTPS admin URLs (what only the leader does is sent there).
    #[arg(long, env = "SYNCGATE_ADMIN_CA")]
    pub admin_ca: Option<PathBuf>,

    /// Central's own client certificate (PEM) for a broker that requires
    /// one: the embedded broker with --broker-tls-client-ca, or an external
    /// one (with --broker-client-key).
    #[arg(long, env = "SYNCGATE_BROKER_CLIENT_CERT")]
    pub broker_client_cert: Option<PathBuf>,

    /// The private key (PEM) of --broker-client-cert.
    #[arg(long, env = "SYNCGATE_BROKER_CLIENT_KEY")]
    pub broker_client_key: Option<PathBuf>,

    /// Address of the audit API, health and metrics.
    #[arg(long, env = "SYNCGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// Where the other central replicas on a PostgreSQL op log reach this
    /// one's admin API (what only the leader does is sent there); by default
    /// http:// and the admin listen address (this host's name for an
    /// unspecified one).
    #[arg(long, env = "SYNCGATE_ADVERTISE_ADMIN_URL", value_parser = config::parse_base_url)]
    pub advertise_admin_url: Option<Url>,

    #[command(flatten)]
    pub admin_token: AdminTokenArgs,

    /// The op log: `sqlite://FILE` (created if missing) or
    /// `postgres://USER@HOST:PORT/DB` (TLS as the URL's `sslmode` says; the
    /// password from --db-password-file or PGPASSFILE, never in the URL).
    #[arg(
        long,
        env = "SYNCGATE_DB",
        hide_env_values = true,
        default_value = "sqlite://syncgate-central.db"
    )]
    pub db: String,

    /// A file holding the PostgreSQL op log's password.
    #[arg(long, env = "SYNCGATE_DB_PASSWORD_FILE")]
    pub db_password_file: Option<PathBuf>,

    /// The gateway's external URL; replaces the upstream's URL in JSON responses.
    #[arg(long, env = "SYNCGATE_PUBLIC_URL", value_parser = config::parse_base_url)]
    pub public_url: Option<Url>,

    /// How long to wait for the upstream's response headers.
    #[arg(long, env = "SYNCGATE_UPSTREAM_TIMEOUT", default_value = "30s",
          value_parser = config::parse_duration)]
    pub upstream_timeout: Duration,

    /// How long a write the upstream did not answer (or the gateway could not
    /// log) may still land there: its outcome is concluded "not applied" only
    /// after, and the ops after it wait to be published meanwhile. Longer than
    /// Keystone can hold a request (load balancer and database lock timeouts).
    #[arg(long, env = "SYNCGATE_UPSTREAM_SETTLE", default_value = "120s",
          value_parser = config::parse_duration)]
    pub upstream_settle: Duration,

    /// Largest replicable write body accepted (larger: 413).
    #[arg(long, env = "SYNCGATE_MAX_CAPTURE_BODY", default_value = "1MiB",
          value_parser = config::parse_size)]
    pub max_capture_body: usize,

    /// Route classes to replicate, comma-separated (identity, resource, assignment,
    /// credentials, policy, limits, federation, catalog, or all).
    #[arg(long, env = "SYNCGATE_REPLICATE",
          default_value = "identity,resource,assignment,credentials,policy,limits,federation",
          value_parser = parse_classes)]
    pub replicate: Classes,

    /// Use this external NATS server (nats://host:port) instead of the embedded
    /// broker; or a NATS cluster: its seeds, comma-separated.
    // Parsed in `into_config`, as the edge's.
    #[arg(long = "broker", env = "SYNCGATE_BROKER")]
    pub external_broker: Option<String>,

    #[command(flatten)]
    pub broker: BrokerArgs,

    #[command(flatten)]
    pub sync: SyncArgs,

    /// Edges expected to acknowledge every op, comma-separated. Only these are
    /// accepted, unless --allow-new-edges.
    #[arg(long, env = "SYNCGATE_EDGES", default_value = "", value_parser = config::parse_edges)]
    pub edges: EdgeList,

    /// Per-site scope: EDGE=SCOPE entries (whitespace-separated, or the flag
    /// repeated), SCOPE being domains:NAME,... and/or replicate:CLASS,...
    /// joined by ';' (site2=domains:Default,acme;replicate:identity,resource).
    /// Such an edge is declared, holds its edge key (`syncgate keygen --edge
    /// EDGE`) instead of the sync key, and gets only what is in its scope.
    #[arg(long, env = "SYNCGATE_EDGE_SCOPE", action = clap::ArgAction::Append, value_parser = config::parse_edge_scopes)]
    pub edge_scope: Vec<config::EdgeScopes>,

    /// Register an edge that says hello (with the sync key) without being declared in --edges.
    #[arg(long, env = "SYNCGATE_ALLOW_NEW_EDGES")]
    pub allow_new_edges: bool,

    /// An op not acknowledged by an edge within this is `timed_out` there.
    #[arg(long, env = "SYNCGATE_ACK_TIMEOUT", default_value = "30s", value_parser = config::parse_duration)]
    pub ack_timeout: Duration,

    /// How often each edge's identity state is compared with central's (the
    /// drift audit; needs OS_* service credentials); 0 disables it.
    #[arg(long, env = "SYNCGATE_DRIFT_INTERVAL", default_value = "1h", value_parser = config::parse_interval)]
    pub drift_interval: Duration,

    /// Ops older than this that every edge has acknowledged are pruned from
    /// the op log in the background; an edge whose next op is gone is resynced
    /// from central's state. 0 keeps every op for ever.
    #[arg(long, env = "SYNCGATE_RETENTION", default_value = "30d", value_parser = config::parse_retention)]
    pub retention: Duration,

    /// An edge not heard from for this long no longer keeps ops in the op log
    /// (one dead site cannot pin it for ever); it is resynced when it comes
    /// back. 0 (the default): edges never expire.
    #[arg(long, env = "SYNCGATE_EDGE_EXPIRY", default_value = "0", value_parser = config::parse_retention)]
    pub edge_expiry: Duration,

    /// Take control messages of protocol 1 from edges of syncgate 0.1.0 (their
    /// replay protection rests on clocks) until each speaks protocol 2. Set it
    /// to false once every edge is upgraded.
    #[arg(long, env = "SYNCGATE_ACCEPT_PROTOCOL_1", default_value_t = true, action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub accept_protocol_1: bool,

    #[command(flatten)]
    pub http: HttpArgs,

    /// Keys sealing request bodies in the op log (base64, comma-separated; the
    /// first seals). Default: the sync key. Losing it loses the bodies.
    #[arg(long, env = "SYNCGATE_OPLOG_KEY", hide_env_values = true)]
    pub oplog_key: Option<String>,

    /// A file holding the op log keys.
    #[arg(long, env = "SYNCGATE_OPLOG_KEY_FILE", conflicts_with = "oplog_key")]
    pub oplog_key_file: Option<PathBuf>,
}

/// Edge IDs as one comma-separated value (an alias, so that clap parses the list
/// as one value instead of collecting repeated flags).
pub type EdgeList = Vec<String>;

/// Options of the embedded broker (`syncgate broker`, and `syncgate central`
/// unless `--broker` names an external server).
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Address the embedded broker listens on.
    #[arg(long, env = "SYNCGATE_BROKER_LISTEN", default_value = "0.0.0.0:4222")]
    pub broker_listen: SocketAddr,

    /// Token clients must present (CONNECT auth_token).
    #[arg(
        long,
        env = "SYNCGATE_BROKER_TOKEN",
        hide_env_values = true,
        conflicts_with = "broker_user"
    )]
    pub broker_token: Option<String>,

    /// A file holding the broker token.
    #[arg(
        long,
        env = "SYNCGATE_BROKER_TOKEN_FILE",
        conflicts_with_all = ["broker_token", "broker_user"]
    )]
    pub broker_token_file: Option<PathBuf>,

    /// User name clients must present (with --broker-password).
    #[arg(long, env = "SYNCGATE_BROKER_USER")]
    pub broker_user: Option<String>,

    /// Password clients must present (with --broker-user).
    #[arg(long, env = "SYNCGATE_BROKER_PASSWORD", hide_env_values = true)]
    pub broker_password: Option<String>,

    /// A file holding the broker password.
    #[arg(
        long,
        env = "SYNCGATE_BROKER_PASSWORD_FILE",
        conflicts_with = "broker_password"
    )]
    pub broker_password_file: Option<PathBuf>,

    /// TLS certificate chain (PEM) for the broker listener.
    #[arg(long, env = "SYNCGATE_BROKER_TLS_CERT")]
    pub broker_tls_cert: Option<std::path::PathBuf>,

    /// TLS private key (PEM) for the broker listener.
    #[arg(long, env = "SYNCGATE_BROKER_TLS_KEY")]
    pub broker_tls_key: Option<std::path::PathBuf>,

    /// Require every broker client to present a certificate signed by a CA
    /// in this PEM file (with --broker-tls-cert).
    #[arg(long, env = "SYNCGATE_BROKER_TLS_CLIENT_CA")]
    pub broker_tls_client_ca: Option<std::path::PathBuf>,

    /// Largest message a client may publish.
    #[arg(long, env = "SYNCGATE_BROKER_MAX_PAYLOAD", default_value = "1MiB",
          value_parser = config::parse_size)]
    pub broker_max_payload: usize,

    /// Bytes queued for one client before it is closed as a slow consumer.
    #[arg(long, env = "SYNCGATE_BROKER_MAX_PENDING", default_value = "64MiB",
          value_parser = config::parse_size)]
    pub broker_max_pending: usize,

    /// How often idle clients are pinged.
    #[arg(long, env = "SYNCGATE_BROKER_PING_INTERVAL", default_value = "2m",
          value_parser = config::parse_duration)]
    pub broker_ping_interval: Duration,

    /// Clients connected at once.
    #[arg(long, env = "SYNCGATE_BROKER_MAX_CONNECTIONS", default_value = "4096")]
    pub broker_max_connections: usize,

    /// Subscriptions one client may hold.
    #[arg(
        long,
        env = "SYNCGATE_BROKER_MAX_SUBSCRIPTIONS",
        default_value = "1024"
    )]
    pub broker_max_subscriptions: usize,
}

/// A broker client's credentials: a token, or a user and its password.
fn client_auth(
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
) -> Result<BrokerAuth, String> {
    match (token, user, password) {
        (Some(t), _, _) if t.is_empty() => Err("--broker-token must not be empty".into()),
        (Some(t), None, None) => Ok(BrokerAuth::Token(Secret::new(t))),
        (Some(_), _, _) => Err("--broker-token and --broker-user go apart: give one".into()),
        (None, Some(user), Some(password)) if !user.is_empty() && !password.is_empty() => {
            Ok(BrokerAuth::UserPassword {
                user,
                password: Secret::new(password),
            })
        }
        (None, Some(_), Some(_)) => {
            Err("--broker-user and --broker-password must not be empty".into())
        }
        (None, Some(_), None) => {
            Err("--broker-user needs --broker-password or --broker-password-file".into())
        }
        (None, None, Some(_)) => Err("--broker-password needs --broker-user".into()),
        (None, None, None) => Ok(BrokerAuth::None),
    }
}

impl BrokerArgs {
    /// Validates as start-up would, without starting anything.
    pub fn check(&self) -> Result<(), String> {
        self.clone().into_config().map(drop)
    }

    pub fn into_config(self) -> Result<BrokerConfig, String> {
        let broker_token = read_secret(
            self.broker_token,
            self.broker_token_file.as_deref(),
            "--broker-token-file",
        )?;
        let broker_password = read_secret(
            self.broker_password,
            self.broker_password_file.as_deref(),
            "--broker-password-file",
        )?;
        // Pairs are checked here rather than by clap, so that one half may come
        // from the configuration file and the other from the environment.
        if self.broker_user.is_some() && broker_password.is_none() {
            return Err("--broker-user needs --broker-password or --broker-password-file".into());
        }
        if self.broker_user.is_none() && broker_password.is_some() {
            return Err("--broker-password needs --broker-user".into());
        }
        let auth = match (broker_token, self.broker_user, broker_password) {
            (Some(t), _, _) if t.is_empty() => {
                return Err("--broker-token must not be empty".into())
            }
            (Some(t), _, _) => BrokerAuth::Token(Secret::new(t)),
            (None, Some(user), Some(password)) => {
                if user.is_empty() || password.is_empty() {
                    return Err("--broker-user and --broker-password must not be empty".into());
                }
                BrokerAuth::UserPassword {
                    user,
                    password: Secret::new(password),
                }
            }
            _ => BrokerAuth::None,
        };
        let tls = CertFiles::pair(
            self.broker_tls_cert,
            self.broker_tls_key,
            "--broker-tls-cert",
            "--broker-tls-key",
        )?;
        if tls.is_none() && self.broker_tls_client_ca.is_some() {
            return Err(
                "--broker-tls-client-ca needs --broker-tls-cert and --broker-tls-key".into(),
            );
        }
        if self.broker_max_payload > i32::MAX as usize {
            return Err("--broker-max-payload must be below 2GiB".into());
        }
        if self.broker_max_pending < self.broker_max_payload {
            return Err("--broker-max-pending must be at least --broker-max-payload".into());
        }
        Ok(BrokerConfig {
            listen: self.broker_listen,
            auth,
            tls,
            tls_client_ca: self.broker_tls_client_ca,
            max_payload: self.broker_max_payload,
            max_pending: self.broker_max_pending,
            ping_interval: self.broker_ping_interval,
            max_connections: self.broker_max_connections.max(1),
            max_subscriptions: self.broker_max_subscriptions.max(1),
            ..BrokerConfig::default()
        })
    }
}

impl CentralArgs {
    /// Validates as start-up would, without starting anything.
    pub fn check(&self) -> Result<(), String> {
        self.clone().into_config().map(drop)
    }

    pub fn into_config(self) -> Result<CentralConfig, String> {
        // Every scoped edge is declared; `all` is the scope of the others.
        let mut scopes = config::EdgeScopes::new();
        for (edge, scope) in self.edge_scope.iter().flatten() {
            if scopes.insert(edge.clone(), scope.clone()).is_some() {
                return Err(format!("--edge-scope: edge {edge} is given two scopes"));
            }
        }
        let mut declared = self.edges.clone();
        for edge in scopes.keys() {
            if !declared.contains(edge) {
                declared.push(edge.clone());
            }
        }
        scopes.retain(|_, scope| !scope.is_all());
        let client_token = read_secret(
            self.broker.broker_token.clone(),
            self.broker.broker_token_file.as_deref(),
            "--broker-token-file",
        )?;
        let upstream_ca = upstream_ca(&self.upstream, self.upstream_ca.clone())?;
        let broker_tls = BrokerClientTls {
            ca: self.broker_ca.clone(),
            identity: CertFiles::pair(
                self.broker_client_cert.clone(),
                self.broker_client_key.clone(),
                "--broker-client-cert",
                "--broker-client-key",
            )?,
        };
        let config = CentralConfig {
            listen: self.listen,
            upstream: self.upstream,
            upstream_ca,
            tls: self.http.tls()?,
            admin_ca: self.admin_ca.clone(),
            broker_tls,
            admin_listen: self.admin_listen,
            advertise_admin_url: self.advertise_admin_url,
            admin_token: self.admin_token.read()?.map(Secret::new),
            db_password: read_secret(None, self.db_password_file.as_deref(), "--db-password-file")?
                .map(Secret::new),
            db: self.db,
            oplog_lock_wait: Duration::from_secs(40),
            public_url: self.public_url,
            upstream_timeout: self.upstream_timeout,
            upstream_settle: self.upstream_settle,
            max_capture_body: self.max_capture_body,
            replicate: self.replicate.0,
            // With an external broker, the broker options are this client's
            // credentials (a token, or a user and password); with the
            // embedded one, what its clients must present (and central's
            // own client presents the token).
            broker_client_auth: match &self.external_broker {
                Some(_) => client_auth(
                    client_token,
                    self.broker.broker_user.clone(),
                    read_secret(
                        self.broker.broker_password.clone(),
                        self.broker.broker_password_file.as_deref(),
                        "--broker-password-file",
                    )?,
                )?,
                None => client_token
                    .map(|t| BrokerAuth::Token(Secret::new(t)))
                    .unwrap_or_default(),
            },
            broker: match &self.external_broker {
                Some(_)
                    if self.broker.broker_tls_cert.is_some()
                        || self.broker.broker_tls_key.is_some()
                        || self.broker.broker_tls_client_ca.is_some() =>
                {
                    return Err(
                        "--broker-tls-cert, --broker-tls-key and --broker-tls-client-ca are the \
                                embedded broker's; with an external --broker, central's own client \
                                certificate is --broker-client-cert and --broker-client-key"
                            .into(),
                    );
                }
                Some(urls) => BrokerMode::External(
                    config::parse_nats_urls(urls).map_err(|e| format!("--broker: {e}"))?,
                ),
                None => BrokerMode::Embedded(Box::new(self.broker.into_config()?)),
            },
            sync: SyncConfig {
                key: self.sync.key()?,
                prefix: self.sync.sync_prefix,
                edges: declared,
                scopes,
                allow_new_edges: self.allow_new_edges,
                ack_timeout: self.ack_timeout,
                drift_interval: (!self.drift_interval.is_zero()).then_some(self.drift_interval),
                retention: (!self.retention.is_zero()).then_some(self.retention),
                edge_expiry: (!self.edge_expiry.is_zero()).then_some(self.edge_expiry),
                accept_protocol_1: self.accept_protocol_1,
                ..SyncConfig::default()
            },
            service_credentials: Credentials::from_env()?,
            stale_intent_after: CentralConfig::stale_intent_bound(self.upstream_timeout),
            http: self.http.limits()?,
            oplog_key: read_secret(
                self.oplog_key,
                self.oplog_key_file.as_deref(),
                "--oplog-key-file",
            )?
            .map(Secret::new),
        };
        if let Some(k) = &config.oplog_key {
            crate::protocol::crypto::validate_key(k.expose())
                .map_err(|e| format!("--oplog-key: {e}"))?;
        }
        config.validate()?;
        Ok(config)
    }
}

/// What the command line asked for, or how to exit.
pub enum Parsed {
    Run(Box<Cli>),
    /// Print this and exit with this code (help, version, or a usage error).
    Exit {
        text: String,
        code: i32,
    },
}

impl Cli {
    /// Parses the process arguments over the configuration file, if any.
    /// Usage errors become one line.
    pub fn parse_args<I, T>(args: I) -> Parsed
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        match crate::cli::parse(args) {
            crate::cli::Outcome::Run(layered) => Parsed::Run(Box::new(layered.cli)),
            crate::cli::Outcome::Exit { text, code } => Parsed::Exit { text, code },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn central(args: &[&str]) -> Result<CentralConfig, String> {
        let argv = ["syncgate", "central", "--insecure-plaintext-sync"]
            .iter()
            .chain(args);
        match Cli::parse_args(argv) {
            Parsed::Run(cli) => match cli.command {
                Command::Central(a) => a.into_config(),
                _ => unreachable!("central arguments"),
            },
            Parsed::Exit { text, code } => Err(format!("{code}: {text}")),
        }
    }

    #[test]
    fn defaults() {
        let c = central(&["--upstream", "http://keystone:5000"]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:5000");
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(c.db, "sqlite://syncgate-central.db");
        assert_eq!(c.upstream_timeout, Duration::from_secs(30));
        assert_eq!(c.max_capture_body, 1 << 20);
        assert_eq!(c.replicate, RouteClass::default_set());
    }

    #[test]
    fn bad_values_are_one_line_naming_the_option() {
        let e = central(&["--upstream", "http://k", "--upstream-timeout", "never"]).unwrap_err();
        assert!(
            e.starts_with("2: error:") && e.contains("--upstream-timeout"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        let e = central(&["--upstream", "nope"]).unwrap_err();
        assert!(e.contains("--upstream"), "{e}");
        let e = central(&["--upstream", "http://k", "--replicate", "identity,x"]).unwrap_err();
        assert!(e.contains("--replicate") && e.contains("'x'"), "{e}");
        let e = central(&[]).unwrap_err();
        assert!(e.contains("--upstream"), "{e}");
        let e = central(&["--upstream", "http://k", "--admin-listen", "0.0.0.0:9090"]).unwrap_err();
        assert!(e.contains("--admin-token"), "{e}");
        let e = central(&["--upstream", "http://k", "--broker", "http://n:4222"]).unwrap_err();
        assert!(e.contains("--broker"), "{e}");
        let e = central(&["--upstream", "http://k", "--broker-user", "u"]).unwrap_err();
        assert!(e.contains("--broker-password"), "{e}");
        let e = central(&[
            "--upstream",
            "http://k",
            "--broker-token",
            "t",
            "--broker-user",
            "u",
            "--broker-password",
            "p",
        ])
        .unwrap_err();
        assert!(
            e.contains("--broker-token") || e.contains("--broker-user"),
            "{e}"
        );
        let e = central(&["--upstream", "http://k", "--broker-tls-cert", "c.pem"]).unwrap_err();
        assert!(e.contains("--broker-tls-key"), "{e}");
    }

    #[test]
    fn sync_key_is_required_and_checked() {
        let argv = |extra: &[&str]| {
            let mut v = vec!["syncgate", "central", "--upstream", "http://k"];
            v.extend_from_slice(extra);
            match Cli::parse_args(v) {
                Parsed::Run(cli) => match cli.command {
                    Command::Central(a) => a.into_config(),
                    _ => unreachable!(),
                },
                Parsed::Exit { text, .. } => Err(text),
            }
        };
        assert!(argv(&[]).unwrap_err().contains("--sync-key"));
        assert!(argv(&["--sync-key", "short"])
            .unwrap_err()
            .contains("32 bytes"));
        let key = crate::protocol::crypto::generate_key();
        assert!(matches!(
            argv(&["--sync-key", &key]).unwrap().sync.key,
            SyncKey::Key(_)
        ));
        assert!(argv(&["--sync-key", &key, "--insecure-plaintext-sync"]).is_err());
        let c = argv(&[
            "--insecure-plaintext-sync",
            "--edges",
            "a, b,a",
            "--ack-timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(c.sync.edges, ["a", "b"]);
        assert!(argv(&["--insecure-plaintext-sync", "--edges", "a.b"]).is_err());

        // Every secret also from a file, never echoed in an error.
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("sync.key");
        std::fs::write(&key_file, format!("{key}\n")).unwrap();
        let token_file = dir.path().join("admin.token");
        std::fs::write(&token_file, "admin-secret-77\n").unwrap();
        let broker_file = dir.path().join("broker.token");
        std::fs::write(&broker_file, "broker-secret-88").unwrap();
        let c = argv(&[
            "--sync-key-file",
            key_file.to_str().unwrap(),
            "--admin-token-file",
            token_file.to_str().unwrap(),
            "--broker-token-file",
            broker_file.to_str().unwrap(),
        ])
        .unwrap();
        assert!(matches!(c.sync.key, SyncKey::Key(ref k) if k.expose() == key));
        assert_eq!(c.admin_token.unwrap().expose(), "admin-secret-77");
        match c.broker {
            BrokerMode::Embedded(b) => {
                assert!(
                    matches!(b.auth, BrokerAuth::Token(ref t) if t.expose() == "broker-secret-88")
                )
            }
            other => panic!("{other:?}"),
        }
        let missing = argv(&["--sync-key-file", "/nonexistent/sync.key"]).unwrap_err();
        assert!(missing.contains("--sync-key-file") && missing.contains("/nonexistent/sync.key"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(argv(&["--sync-key-file", empty.to_str().unwrap()])
            .unwrap_err()
            .contains("is empty"));
        let bad = dir.path().join("bad.key");
        std::fs::write(&bad, "not-a-key-secret-99").unwrap();
        let err = argv(&["--sync-key-file", bad.to_str().unwrap()]).unwrap_err();
        assert!(!err.contains("not-a-key-secret-99"), "{err}");
        assert!(argv(&[
            "--sync-key",
            &key,
            "--sync-key-file",
            key_file.to_str().unwrap()
        ])
        .is_err());
    }

    #[test]
    fn tls_options_that_would_do_nothing_or_cannot_connect_are_refused_with_the_reason() {
        let refused = |args: &[&str], says: &str| {
            let mut all = vec!["--upstream", "http://k"];
            all.extend_from_slice(args);
            let e = central(&all).unwrap_err();
            assert!(e.contains(says), "{args:?}: {e}");
        };
        refused(&["--tls-cert", "c.pem"], "--tls-key");
        refused(&["--upstream-ca", "ca.pem"], "plain HTTP");
        refused(
            &["--broker-ca", "ca.pem"],
            "embedded broker's own certificate",
        );
        refused(
            &["--broker-client-cert", "c", "--broker-client-key", "k"],
            "needs TLS at the broker",
        );
        refused(
            &[
                "--broker-tls-cert",
                "c",
                "--broker-tls-key",
                "k",
                "--broker-tls-client-ca",
                "ca",
            ],
            "give it --broker-client-cert",
        );
        refused(&["--broker-tls-client-ca", "ca"], "needs --broker-tls-cert");
        refused(
            &[
                "--broker",
                "tls://n:4222",
                "--broker-client-cert",
                "c",
                "--broker-client-key",
                "k",
            ],
            "needs --broker-ca",
        );
        refused(
            &[
                "--broker",
                "tls://n:4222",
                "--broker-tls-cert",
                "c",
                "--broker-tls-key",
                "k",
            ],
            "--broker-client-cert",
        );
        refused(
            &[
                "--tls-cert",
                "c",
                "--tls-key",
                "k",
                "--advertise-admin-url",
                "http://central-0:9090",
            ],
            "must be https://",
        );
        // What is accepted.
        let c = central(&[
            "--upstream",
            "https://k",
            "--upstream-ca",
            "ca.pem",
            "--tls-cert",
            "c",
            "--tls-key",
            "k",
            "--broker-tls-cert",
            "bc",
            "--broker-tls-key",
            "bk",
            "--broker-tls-client-ca",
            "ca",
            "--broker-client-cert",
            "cc",
            "--broker-client-key",
            "ck",
        ])
        .unwrap();
        assert!(c.tls.is_some() && c.upstream_ca.is_some());
        assert!(c.broker_tls.identity.is_some() && c.broker_tls.ca.is_none());
    }

    #[test]
    fn broker_mode() {
        let c = central(&["--upstream", "http://k"]).unwrap();
        match c.broker {
            BrokerMode::Embedded(b) => {
                assert_eq!(b.listen.to_string(), "0.0.0.0:4222");
                assert!(matches!(b.auth, BrokerAuth::None));
            }
            other => panic!("{other:?}"),
        }
        let c = central(&["--upstream", "http://k", "--broker", "nats://n:4222"]).unwrap();
        assert!(matches!(c.broker, BrokerMode::External(_)));
        let c = central(&["--upstream", "http://k", "--broker-token", "s3"]).unwrap();
        match c.broker {
            BrokerMode::Embedded(b) => assert!(matches!(b.auth, BrokerAuth::Token(_))),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_external_brokers_credentials_are_options_never_in_its_url() {
        let seeds = "nats://a:4222,nats://b:4222";
        let c = central(&[
            "--upstream",
            "http://k",
            "--broker",
            seeds,
            "--broker-user",
            "central",
            "--broker-password",
            "pw-central",
        ])
        .unwrap();
        assert!(
            matches!(&c.broker_client_auth, BrokerAuth::UserPassword { user, .. } if user == "central")
        );
        assert!(!format!("{c:?}").contains("pw-central"));
        let c = central(&[
            "--upstream",
            "http://k",
            "--broker",
            seeds,
            "--broker-token",
            "t",
        ]);
        assert!(matches!(
            c.unwrap().broker_client_auth,
            BrokerAuth::Token(_)
        ));
        let e = central(&[
            "--upstream",
            "http://k",
            "--broker",
            seeds,
            "--broker-user",
            "u",
        ])
        .unwrap_err();
        assert!(e.contains("--broker-password"), "{e}");
        let e =
            central(&["--upstream", "http://k", "--broker", "nats://u:pw-x@a:4222"]).unwrap_err();
        assert!(
            e.contains("carries credentials") && !e.contains("pw-x"),
            "{e}"
        );
        assert!(client_auth(None, None, Some("p".into())).is_err());
        assert!(client_auth(Some("t".into()), Some("u".into()), Some("p".into())).is_err());
        assert!(matches!(
            client_auth(None, None, None),
            Ok(BrokerAuth::None)
        ));
    }
}
