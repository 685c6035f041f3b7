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

/// Connects a NATS client to the broker (embedded or external). It does not wait
/// for the broker: it keeps trying in the background and reconnects by itself.
pub async fn connect_broker(
    url: &Url,
    auth: &BrokerAuth,
    name: &str,
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
    .retry_on_initial_connect()
    .connection_timeout(Duration::from_secs(5))
    .ping_interval(Duration::from_secs(20));
    if let Some(tx) = on_event {
        options = options.event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    }
    // The URL may carry user:password; async-nats reads them from it.
    options
        .connect(url.as_str())
        .await
        .with_context(|| format!("cannot connect to the broker at {}", redact_url(url)))
}

/// A URL for logs: without credentials.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}
