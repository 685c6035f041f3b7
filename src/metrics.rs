//! Counters the gateway keeps, rendered in the Prometheus text format on the
//! admin listener's `/metrics`. Only counts and states: never paths, bodies or
//! tokens.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub writes_captured: AtomicU64,
    pub writes_not_applied: AtomicU64,
    pub unknown_outcomes: AtomicU64,
    pub upstream_unreachable: AtomicU64,
    pub upstream_timeouts: AtomicU64,
    pub bodies_too_large: AtomicU64,
    pub oplog_failures: AtomicU64,
    /// Control messages dropped, by `Rejected::ALL` index.
    pub control_rejected: [AtomicU64; 6],
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Counts a dropped control message; returns the count for its reason.
    pub fn control_rejected(&self, why: crate::sync::control::Rejected) -> u64 {
        let i = crate::sync::control::Rejected::ALL
            .iter()
            .position(|r| *r == why)
            .expect("every reason is listed");
        self.control_rejected[i].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `syncgate_sync_rejected_total{reason="..."}` lines.
    pub fn render_rejected(&self) -> String {
        let mut out = String::from(
            "# HELP syncgate_sync_rejected_total Control messages dropped (forged, replayed, from unknown edges, ...).\n\
             # TYPE syncgate_sync_rejected_total counter\n",
        );
        for (i, why) in crate::sync::control::Rejected::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "syncgate_sync_rejected_total{{reason=\"{}\"}} {}",
                why.label(),
                self.control_rejected[i].load(Ordering::Relaxed)
            );
        }
        out
    }

    /// Renders the counters plus the gauges given by the caller.
    pub fn render(&self, gauges: &[(&str, &str, i64)]) -> String {
        let counters: [(&str, &str, &AtomicU64); 8] = [
            (
                "syncgate_proxy_requests_total",
                "Requests received by the proxy.",
                &self.requests,
            ),
            (
                "syncgate_ops_captured_total",
                "Writes the upstream accepted and the op log recorded.",
                &self.writes_captured,
            ),
            (
                "syncgate_writes_not_applied_total",
                "Replicable writes the upstream refused (not ops).",
                &self.writes_not_applied,
            ),
            (
                "syncgate_unknown_outcomes_total",
                "Writes recorded with an unknown outcome.",
                &self.unknown_outcomes,
            ),
            (
                "syncgate_upstream_unreachable_total",
                "Requests answered 502: upstream unreachable or connection broken.",
                &self.upstream_unreachable,
            ),
            (
                "syncgate_upstream_timeouts_total",
                "Requests answered 504: upstream too slow.",
                &self.upstream_timeouts,
            ),
            (
                "syncgate_bodies_too_large_total",
                "Replicable writes refused with 413.",
                &self.bodies_too_large,
            ),
            (
                "syncgate_oplog_failures_total",
                "Writes refused or unrecorded because the op log failed.",
                &self.oplog_failures,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out.push_str(&self.render_rejected());
        out
    }
}
