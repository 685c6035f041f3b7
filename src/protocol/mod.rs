//! The wire contract central and edges share: the messages and their subjects on
//! the broker (`messages`), sealing with the sync key (`crypto`), sealed and
//! stamped control messages (`control`), and the NATS client connection.

pub mod control;
pub mod crypto;
pub mod messages;

use std::time::Duration;

use anyhow::Context;
use reqwest::Url;

use crate::broker::BrokerAuth;

/// Connects a NATS client to the broker (embedded or external: one server, or
/// a cluster's seeds, any of which it connects to, learning the others from
/// it). It does not wait for the broker: it keeps trying in the background and
/// reconnects by itself, to another server of a cluster when one is gone.
/// Replies to its requests come below `inbox` (see `Subjects::central_inbox`
/// and `Subjects::edge_inbox`), so a broker's permissions can keep each
/// site's replies to that site.
pub async fn connect_broker(
    urls: &BrokerUrls,
    auth: &BrokerAuth,
    tls: Option<tokio_rustls::rustls::ClientConfig>,
    name: &str,
    inbox: String,
    on_event: Option<tokio::sync::mpsc::UnboundedSender<async_nats::Event>>,
) -> anyhow::Result<async_nats::Client> {
    let mut options = match auth {
        BrokerAuth::None => async_nats::ConnectOptions::new(),
        BrokerAuth::Token(t) => async_nats::ConnectOptions::with_token(t.expose().to_string()),
        BrokerAuth::UserPassword { user, password } => {
            async_nats::ConnectOptions::with_user_and_password(
                user.clone(),
                password.expose().to_string(),
            )
        }
    }
    .name(name)
    .custom_inbox_prefix(inbox)
    .retry_on_initial_connect()
    .connection_timeout(Duration::from_secs(5))
    .ping_interval(Duration::from_secs(20));
    // TLS as configured (the files were read when the configuration was):
    // then required, whatever the URL's scheme.
    if let Some(config) = tls {
        options = options.tls_client_config(config).require_tls(true);
    }
    if let Some(tx) = on_event {
        options = options.event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    }
    // A URL may carry user:password; async-nats reads them from it.
    let addrs: Vec<&str> = urls.urls().iter().map(Url::as_str).collect();
    options
        .connect(addrs.as_slice())
        .await
        .with_context(|| format!("cannot connect to the broker at {}", urls.redacted()))
}

/// How a client trusts the broker's certificate (the CA certificates in
/// `ca` instead of the system's) and proves who it is (`identity`, for a
/// broker that requires client certificates).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BrokerClientTls {
    pub ca: Option<std::path::PathBuf>,
    pub identity: Option<crate::tls::CertFiles>,
}

/// A broker's address: one NATS server, or several (the seeds of a cluster:
/// the client connects to any and learns the others from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<Url>);

impl BrokerUrls {
    /// `urls`, at least one (checked where they are parsed).
    pub fn new(urls: Vec<Url>) -> BrokerUrls {
        BrokerUrls(urls)
    }

    pub fn one(url: Url) -> BrokerUrls {
        BrokerUrls(vec![url])
    }

    pub fn urls(&self) -> &[Url] {
        &self.0
    }

    /// For logs: comma-separated, without credentials.
    pub fn redacted(&self) -> String {
        self.0
            .iter()
            .map(crate::redact::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
