//! Op-log retention: on the leader, ops older than the window that every
//! edge has passed are pruned in small batches (see `store::retention`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::resync::{password_kinds, password_of};
use crate::metrics::Metrics;
use crate::store::Store;

/// Ops pruned per transaction: a capture waits for one batch at most.
pub const BATCH: i64 = 500;
/// Longest time between two rounds.
const EVERY: Duration = Duration::from_secs(60);
/// Pause between two batches of one round, so captures go first.
const BREATHE: Duration = Duration::from_millis(20);

pub struct Pruner {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Ops older than this may go.
    pub window: Duration,
    /// Edges not heard from for this long pin nothing.
    pub edge_expiry: Option<Duration>,
}

impl Pruner {
    /// Prunes one batch of the oldest ops retention lets go, keeping aside
    /// each user's latest password among them (a resync sets it at an edge
    /// that missed it).
    async fn batch(&self) -> Result<i64, crate::store::StoreError> {
        let r = self.store.retention(self.window, self.edge_expiry).await?;
        let upto = r.prunable_through.min(r.first_seq + BATCH - 1);
        if upto < r.first_seq {
            return Ok(0);
        }
        // Every op of the batch (users' and self-service password changes).
        let ops = self
            .store
            .list_ops(&crate::store::OpFilter {
                after: r.first_seq - 1,
                limit: BATCH,
                kind: None,
                state: None,
                through: Some(upto),
            })
            .await?;
        let passwords: Vec<(String, i64)> = ops
            .iter()
            .filter(|o| o.state == "committed" && password_kinds().contains(&o.kind.as_str()))
            .filter_map(|o| password_of(o).map(|(user, _)| (user, o.seq)))
            .collect();
        self.store
            .prune(
                self.window,
                self.edge_expiry,
                upto - r.first_seq + 1,
                &passwords,
            )
            .await
    }

    /// How often a round runs: a tenth of the window, at most a minute.
    fn every(&self) -> Duration {
        (self.window / 10).clamp(Duration::from_millis(100), EVERY)
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pinned_before = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = crate::serve::stopped(&mut stop) => return Ok(()),
            }
            let mut round = 0;
            loop {
                match self.batch().await {
                    Ok(0) => break,
                    Ok(n) => {
                        round += n;
                        self.metrics.ops_pruned.inc_by(n as u64);
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot prune the op log now; tried again later");
                        break;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(BREATHE) => {}
                    _ = crate::serve::stopped(&mut stop) => return Ok(()),
                }
            }
            match self.store.retention(self.window, self.edge_expiry).await {
                Ok(r) => {
                    self.metrics.first_seq.set(r.first_seq);
                    self.metrics.prunable_through.set(r.prunable_through);
                    if round > 0 {
                        info!(
                            pruned = round,
                            first_seq = r.first_seq,
                            "op log pruned of ops older than the retention window"
                        );
                    }
                    // Said once each time it starts, not every round.
                    let pinned = !r.pinned_by.is_empty();
                    if pinned && !pinned_before {
                        let p = &r.pinned_by[0];
                        warn!(
                            edge = p.edge.as_deref().unwrap_or("every edge"),
                            why = %p.why,
                            "ops older than the retention window are kept (see syncgate audit edges)"
                        );
                    }
                    pinned_before = pinned;
                }
                Err(e) => debug!(error = %e, "cannot read what retention keeps"),
            }
        }
    }
}
