//! Resolves the writes whose outcome central does not know (the gateway
//! stopped, or the answer was lost, after forwarding them): each is checked
//! against central's Keystone (see `keystone::resolve`) in seq order, within
//! seconds of being logged or of start-up. Until then it, and every op after
//! it, waits to be published; what is found is what edges apply in its place.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::keystone::client::KeystoneClient;
use crate::keystone::resolve::{resolve, Checked, Resolution};
use crate::keystone::{classify, Classification};
use crate::store::{OpRow, Store};

pub struct Resolver {
    pub store: Store,
    /// Central's client of its Keystone (service credentials), if any.
    pub keystone: Option<Arc<KeystoneClient>>,
    /// Wakes the publisher once an op is resolved.
    pub published: Arc<Notify>,
    /// Wakes this resolver when a write's outcome becomes unknown.
    pub kick: Arc<Notify>,
    /// How long a write may still land after it was forwarded: a write not
    /// seen at central's Keystone is concluded not applied only after that.
    pub settle: Duration,
}

/// How often pending resolutions are looked for without a kick.
const POLL: Duration = Duration::from_secs(2);
/// Longest wait before asking central's Keystone again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Resolver {
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut delays = crate::retry::delays(Duration::from_millis(200), MAX_BACKOFF);
        loop {
            let wait = match self.round().await {
                Ok(()) => {
                    delays = crate::retry::delays(Duration::from_millis(200), MAX_BACKOFF);
                    POLL
                }
                Err(why) => {
                    let wait = delays.next().unwrap_or(MAX_BACKOFF);
                    warn!(error = %why, retry_in_ms = wait.as_millis() as u64, "cannot resolve an unknown outcome yet; the ops after it wait");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.kick.notified() => {}
                _ = crate::serve::stopped(&mut stop) => return Ok(()),
            }
        }
    }

    /// Resolves every pending op, oldest first; stops at the first that
    /// cannot be resolved now.
    async fn round(&self) -> Result<(), String> {
        loop {
            let ops = self
                .store
                .pending_resolutions(50)
                .await
                .map_err(|e| e.to_string())?;
            if ops.is_empty() {
                return Ok(());
            }
            for op in ops {
                let checked = self.resolve(&op).await?;
                if !checked.settled {
                    // By the op log's clock, which dated the op.
                    let age = match self.store.op_age(op.seq).await {
                        Ok(Some(age)) => age,
                        _ => crate::keystone::client::parse_rfc3339(&op.created_at)
                            .unwrap_or_else(std::time::SystemTime::now)
                            .elapsed()
                            .unwrap_or_default(),
                    };
                    if age < self.settle {
                        // Not seen yet, but it may still land: look again then.
                        return Err(format!(
                            "op {}: not seen at central's identity service yet; concluded {}s \
                             after it was forwarded unless it lands (--upstream-settle)",
                            op.seq,
                            (self.settle - age).as_secs().max(1)
                        ));
                    }
                }
                let resolution = checked.resolution;
                self.store
                    .resolve_op(op.seq, &op.op_id, &resolution)
                    .await
                    .map_err(|e| e.to_string())?;
                let (how, detail) = match &resolution {
                    Resolution::Applied { detail, .. } => ("applied", detail),
                    Resolution::NotApplied { detail } => ("not_applied", detail),
                    Resolution::Unresolvable { detail } => ("unresolvable", detail),
                };
                info!(seq = op.seq, op_id = %op.op_id, resolution = how, %detail, "unknown outcome resolved");
                self.published.notify_one();
            }
        }
    }

    async fn resolve(&self, op: &OpRow) -> Result<Checked, String> {
        let unresolvable = |detail: &str| Checked {
            resolution: Resolution::Unresolvable {
                detail: format!("outcome unknown: {detail}"),
            },
            settled: true,
        };
        let Some(ks) = &self.keystone else {
            return Ok(unresolvable(
                "central has no OS_* service credentials to ask its identity service",
            ));
        };
        let path = op.path.split('?').next().unwrap_or(&op.path);
        // What an earlier op deleted is gone whether or not this delete ran:
        // the Keystone it reached answered 404, so it did nothing.
        if op.method == "DELETE" {
            if let Some(before) = self
                .store
                .deleted_before(&op.path, op.seq)
                .await
                .map_err(|e| format!("op {}: {e}", op.seq))?
            {
                return Ok(Checked {
                    resolution: Resolution::NotApplied {
                        detail: format!(
                            "outcome resolved at central: what it deletes was deleted by op \
                             {before} before it"
                        ),
                    },
                    settled: true,
                });
            }
        }
        let Classification::Replicable(route) = classify(&op.method, path) else {
            return Ok(unresolvable("not a route this version replicates"));
        };
        let body: Option<Value> = op
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str(b).ok());
        let store = self.store.clone();
        let seq = op.seq;
        let made_by_others = move |id: String| -> futures_util::future::BoxFuture<'static, bool> {
            let store = store.clone();
            Box::pin(async move { store.touched_by_another_op(&id, seq).await.unwrap_or(true) })
        };
        resolve(
            ks,
            &route,
            &op.method,
            &op.path,
            body.as_ref(),
            &made_by_others,
        )
        .await
        .map_err(|e| format!("op {}: {e}", op.seq))
    }
}
