//! The process's one Prometheus registry, served on the admin listener's
//! `/metrics` in the OpenMetrics text format. Only counts, states, durations
//! and bounded labels (method, route class, status, edge, outcome): never
//! paths, IDs, bodies or tokens.
//!
//! Counters move where things happen; central's sync gauges (per-edge
//! cursor, lag, out-of-sync counts) are read from the op log's indexes when
//! `/metrics` is scraped, at most once a second, so nothing reads every
//! edge's row between scrapes.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::protocol::control::Rejected;

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: &'static str,
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EdgeLabel {
    pub edge: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub edge: String,
    pub kind: String,
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabels {
    pub edge: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets: 0.25 ms to about 16 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

/// A method as a bounded label value.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    match *method {
        axum::http::Method::GET => "GET",
        axum::http::Method::HEAD => "HEAD",
        axum::http::Method::POST => "POST",
        axum::http::Method::PUT => "PUT",
        axum::http::Method::PATCH => "PATCH",
        axum::http::Method::DELETE => "DELETE",
        axum::http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Everything central or an edge counts, and the registry that shows it.
pub struct Metrics {
    registry: Registry,

    // The proxy.
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histograms<RouteLabels>,
    pub upstream_errors: Family<KindLabel, Counter>,
    pub writes_captured: Counter,
    pub capture_duration: Histogram,
    pub writes_not_applied: Counter,
    /// Upstream connections kept for client connections, open now.
    pub upstream_kept: Gauge,
    /// Of those, the ones whose clients left, waiting for another client.
    pub upstream_unclaimed: Gauge,
    pub unknown_outcomes: Counter,
    pub bodies_too_large: Counter,
    pub oplog_failures: Counter,

    // Central's side of sync.
    pub ops_published: Counter,
    pub ops_replayed: Counter,
    pub acks: Family<AckLabels, Counter>,
    pub control_rejected: Family<ReasonLabel, Counter>,
    pub last_seq: Gauge,
    /// The oldest op kept (retention prunes below it).
    pub first_seq: Gauge,
    pub ops_pruned: Counter,
    /// The op retention keeps the op log at: ops up to it may go now.
    pub prunable_through: Gauge,
    pub open_intents: Gauge,
    /// 1 while this process holds the op log (on PostgreSQL, its lock).
    pub oplog_held: Gauge,
    /// 1 while this process does the leader's duties (always, on SQLite).
    pub leader: Gauge,
    /// While this process leads: the election's epoch (PostgreSQL) and when
    /// it took the lead (Unix seconds); 0 otherwise.
    pub leader_epoch: Gauge,
    pub leader_since: Gauge,
    pub edge_cursor: Family<EdgeLabel, Gauge>,
    pub edge_acked: Family<EdgeLabel, Gauge>,
    pub edge_lag_ops: Family<EdgeLabel, Gauge>,
    pub edge_lag_seconds: Family<EdgeLabel, Gauge<f64, AtomicU64>>,
    pub edge_out_of_sync: Family<EdgeLabel, Gauge>,
    /// 1 while an edge is heard from (a hello within `--edge-offline-after`).
    pub edge_online: Family<EdgeLabel, Gauge>,
    /// Differences the last drift audit found, per edge, kind and category.
    pub drift: Family<DriftLabels, Gauge>,
    /// The running (or last) resync of each edge: steps done and planned.
    pub resync_done: Family<EdgeLabel, Gauge>,
    pub resync_total: Family<EdgeLabel, Gauge>,
    pub resync_running: Family<EdgeLabel, Gauge>,
    /// 1 when an edge's last resync or repair failed, 0 once one succeeds
    /// (read from the op log with the other sync gauges).
    pub resync_failed: Family<EdgeLabel, Gauge>,
    /// Users a resync created at each edge that have no password there yet.
    pub needs_password: Family<EdgeLabel, Gauge>,
    pub deliveries_pending: Gauge,
    pub deliveries_failed: Gauge,
    pub deliveries_timed_out: Gauge,

    // The edge.
    pub apply_duration: Histograms<OutcomeLabel>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    /// Metrics of central with no embedded broker.
    fn default() -> Self {
        Metrics::central(None)
    }
}

impl Metrics {
    fn unregistered() -> Metrics {
        Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            upstream_errors: Family::default(),
            writes_captured: Counter::default(),
            capture_duration: latency(),
            writes_not_applied: Counter::default(),
            upstream_kept: Gauge::default(),
            upstream_unclaimed: Gauge::default(),
            unknown_outcomes: Counter::default(),
            bodies_too_large: Counter::default(),
            oplog_failures: Counter::default(),
            ops_published: Counter::default(),
            ops_replayed: Counter::default(),
            acks: Family::default(),
            control_rejected: Family::default(),
            last_seq: Gauge::default(),
            first_seq: Gauge::default(),
            ops_pruned: Counter::default(),
            prunable_through: Gauge::default(),
            oplog_held: Gauge::default(),
            leader: Gauge::default(),
            leader_epoch: Gauge::default(),
            leader_since: Gauge::default(),
            open_intents: Gauge::default(),
            edge_cursor: Family::default(),
            edge_acked: Family::default(),
            edge_lag_ops: Family::default(),
            edge_lag_seconds: Family::default(),
            edge_out_of_sync: Family::default(),
            edge_online: Family::default(),
            drift: Family::default(),
            resync_done: Family::default(),
            resync_total: Family::default(),
            resync_running: Family::default(),
            resync_failed: Family::default(),
            needs_password: Family::default(),
            deliveries_pending: Gauge::default(),
            deliveries_failed: Gauge::default(),
            deliveries_timed_out: Gauge::default(),
            apply_duration: Family::new_with_constructor(latency),
        }
    }

    /// Central's metrics; `broker` adds the embedded broker's counters.
    pub fn central(broker: Option<Arc<crate::broker::Stats>>) -> Metrics {
        let mut m = Metrics::unregistered();
        for why in Rejected::ALL {
            // Every reason shows, at 0 until it happens.
            let _ = m.control_rejected.get_or_create(&ReasonLabel {
                reason: why.label(),
            });
        }
        for kind in ["unreachable", "broken", "timeout"] {
            let _ = m.upstream_errors.get_or_create(&KindLabel { kind });
        }
        let r = &mut m.registry;
        let p = "syncgate";
        r.register(
            format!("{p}_proxy_requests"),
            "Requests the proxy answered, by method, route class and status",
            m.requests.clone(),
        );
        r.register(
            format!("{p}_proxy_request_duration_seconds"),
            "Time from a request's headers to its response's headers",
            m.request_duration.clone(),
        );
        r.register(
            format!("{p}_upstream_errors"),
            "Requests the upstream did not answer: unreachable (502), broken (502), timeout (504)",
            m.upstream_errors.clone(),
        );
        r.register(
            format!("{p}_ops_captured"),
            "Writes the upstream accepted and the op log recorded",
            m.writes_captured.clone(),
        );
        r.register(
            format!("{p}_capture_duration_seconds"),
            "Time of a captured write: intent, upstream, op log commit",
            m.capture_duration.clone(),
        );
        r.register(
            format!("{p}_writes_not_applied"),
            "Replicable writes the upstream refused (not ops)",
            m.writes_not_applied.clone(),
        );
        r.register(
            format!("{p}_upstream_kept_connections"),
            "Upstream connections kept each for one client connection's reads, open now (at most 256; beyond, reads use the pool)",
            m.upstream_kept.clone(),
        );
        r.register(
            format!("{p}_upstream_unclaimed_connections"),
            "Kept upstream connections whose clients left, waiting (at most 30 s) for the next client connection",
            m.upstream_unclaimed.clone(),
        );
        r.register(
            format!("{p}_unknown_outcomes"),
            "Writes recorded with an unknown outcome",
            m.unknown_outcomes.clone(),
        );
        r.register(
            format!("{p}_bodies_too_large"),
            "Replicable writes refused with 413",
            m.bodies_too_large.clone(),
        );
        r.register(
            format!("{p}_oplog_failures"),
            "Writes refused or unrecorded because the op log failed",
            m.oplog_failures.clone(),
        );
        r.register(
            format!("{p}_ops_published"),
            "Ops published to the broker",
            m.ops_published.clone(),
        );
        r.register(
            format!("{p}_ops_replayed"),
            "Ops sent again to edges that asked for a replay",
            m.ops_replayed.clone(),
        );
        r.register(
            format!("{p}_acks"),
            "Acks received, by edge and outcome",
            m.acks.clone(),
        );
        r.register(
            format!("{p}_sync_rejected"),
            "Control messages dropped (forged, replayed, from unknown edges, ...)",
            m.control_rejected.clone(),
        );
        r.register(
            format!("{p}_oplog_last_seq"),
            "Highest seq in the op log",
            m.last_seq.clone(),
        );
        r.register(
            format!("{p}_oplog_first_seq"),
            "Lowest seq kept in the op log (retention prunes older ops every edge has passed)",
            m.first_seq.clone(),
        );
        r.register(
            format!("{p}_oplog_pruned_ops"),
            "Ops retention pruned from the op log",
            m.ops_pruned.clone(),
        );
        r.register(
            format!("{p}_oplog_prunable_through"),
            "Highest seq retention may prune now (below the first seq kept: none; see syncgate audit edges for what holds older ops)",
            m.prunable_through.clone(),
        );
        r.register(
            format!("{p}_oplog_held"),
            "1 while this central holds its op log (on PostgreSQL, the op log's lock; 0 while it is lost and taken again)",
            m.oplog_held.clone(),
        );
        r.register(
            format!("{p}_leader"),
            "1 while this central does the leader's duties (publishing, acks, resyncs, drift audits): one replica at a time on PostgreSQL, the one process on SQLite",
            m.leader.clone(),
        );
        r.register(
            format!("{p}_leader_epoch"),
            "The epoch of the election this central leads at (PostgreSQL; 0 while it does not lead, or on SQLite)",
            m.leader_epoch.clone(),
        );
        r.register(
            format!("{p}_leader_start_time_seconds"),
            "When this central took the lead, in Unix seconds (0 while it does not lead)",
            m.leader_since.clone(),
        );
        r.register(
            format!("{p}_oplog_open_intents"),
            "Writes forwarded and not yet answered",
            m.open_intents.clone(),
        );
        r.register(
            format!("{p}_edge_cursor"),
            "Highest seq each edge applied in order, as it last said",
            m.edge_cursor.clone(),
        );
        r.register(
            format!("{p}_edge_acked_seq"),
            "Each edge's watermark: every op at or below has a known outcome there",
            m.edge_acked.clone(),
        );
        r.register(
            format!("{p}_edge_lag_ops"),
            "Ops logged and not yet applied at each edge",
            m.edge_lag_ops.clone(),
        );
        r.register(
            format!("{p}_edge_lag_seconds"),
            "Age of the oldest op each edge has not applied",
            m.edge_lag_seconds.clone(),
        );
        r.register(
            format!("{p}_edge_out_of_sync"),
            "Deliveries failed or timed out at each edge",
            m.edge_out_of_sync.clone(),
        );
        r.register(
            format!("{p}_edge_online"),
            "1 while each edge is heard from (a hello within --edge-offline-after), 0 otherwise",
            m.edge_online.clone(),
        );
        r.register(
            format!("{p}_drift_differences"),
            "Differences the last drift audit found between central's and each edge's identity state",
            m.drift.clone(),
        );
        r.register(
            format!("{p}_resync_done"),
            "Changes (ID map entries and writes) applied by each edge's current or last resync",
            m.resync_done.clone(),
        );
        r.register(
            format!("{p}_resync_total"),
            "Changes each edge's current or last resync planned",
            m.resync_total.clone(),
        );
        r.register(
            format!("{p}_resync_running"),
            "1 while a resync or repair of the edge runs",
            m.resync_running.clone(),
        );
        r.register(
            format!("{p}_resync_failed"),
            "1 when each edge's last resync or repair failed (its error: syncgate audit edges), 0 once one succeeded",
            m.resync_failed.clone(),
        );
        r.register(
            format!("{p}_users_needing_password"),
            "Users a resync created at each edge that have no password there yet",
            m.needs_password.clone(),
        );
        r.register(
            format!("{p}_deliveries_pending"),
            "Op deliveries waiting for an edge's ack",
            m.deliveries_pending.clone(),
        );
        r.register(
            format!("{p}_deliveries_failed"),
            "Op deliveries an edge answered with an error (out of sync)",
            m.deliveries_failed.clone(),
        );
        r.register(
            format!("{p}_deliveries_timed_out"),
            "Op deliveries not acknowledged in time (out of sync)",
            m.deliveries_timed_out.clone(),
        );
        if let Some(stats) = broker {
            r.register_collector(Box::new(BrokerCollector(stats)));
        }
        m
    }

    /// An edge's metrics, with the collector that reads its status at
    /// scrape (the edge's own).
    pub fn edge(status: impl Collector + 'static) -> Metrics {
        let mut m = Metrics::unregistered();
        m.registry.register(
            "syncgate_edge_apply_duration_seconds",
            "Time to apply one op against this site's Keystone, by outcome",
            m.apply_duration.clone(),
        );
        m.registry.register_collector(Box::new(status));
        m
    }

    /// Counts a dropped control message; returns the count for its reason.
    pub fn control_rejected(&self, why: Rejected) -> u64 {
        self.control_rejected
            .get_or_create(&ReasonLabel {
                reason: why.label(),
            })
            .inc()
            + 1
    }

    /// Counts one proxied request.
    pub fn request(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        elapsed: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                method,
                route,
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels { method, route })
            .observe(elapsed.as_secs_f64());
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Counts one event.
pub fn inc(counter: &Counter) {
    counter.inc();
}

/// Writes one counter read at scrape (a collector's).
pub fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

/// Writes one gauge read at scrape (a collector's).
pub fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A counter's value, read at scrape.
pub fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// The embedded broker's own counters, read at scrape.
#[derive(Debug)]
struct BrokerCollector(Arc<crate::broker::Stats>);

impl Collector for BrokerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let p = "syncgate_broker";
        counter(
            &mut enc,
            &format!("{p}_connections"),
            "Client connections the embedded broker accepted",
            load(&s.connections),
        )?;
        gauge(
            &mut enc,
            &format!("{p}_open_connections"),
            "Client connections open now",
            load(&s.open_connections) as i64,
        )?;
        counter(
            &mut enc,
            &format!("{p}_msgs_in"),
            "Messages published to the embedded broker",
            load(&s.msgs_in),
        )?;
        counter(
            &mut enc,
            &format!("{p}_msgs_out"),
            "Messages the embedded broker delivered",
            load(&s.msgs_out),
        )?;
        counter(
            &mut enc,
            &format!("{p}_bytes_in"),
            "Bytes (headers and payloads) published to the embedded broker",
            load(&s.bytes_in),
        )?;
        counter(
            &mut enc,
            &format!("{p}_bytes_out"),
            "Bytes (headers and payloads) the embedded broker delivered",
            load(&s.bytes_out),
        )?;
        counter(
            &mut enc,
            &format!("{p}_slow_consumers"),
            "Clients closed as slow consumers",
            load(&s.slow_consumers),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openmetrics_with_bounded_labels() {
        let m = Metrics::central(Some(Arc::new(crate::broker::Stats::default())));
        m.request("GET", "read", 200, Duration::from_millis(3));
        m.upstream_error("timeout");
        m.edge_lag_seconds
            .get_or_create(&EdgeLabel {
                edge: "edge1".into(),
            })
            .set(1.5);
        let text = m.render();
        for line in [
            "syncgate_proxy_requests_total{method=\"GET\",route=\"read\",status=\"200\"} 1",
            "syncgate_proxy_request_duration_seconds_count{method=\"GET\",route=\"read\"} 1",
            "syncgate_upstream_errors_total{kind=\"timeout\"} 1",
            "syncgate_upstream_errors_total{kind=\"unreachable\"} 0",
            "syncgate_edge_lag_seconds{edge=\"edge1\"} 1.5",
            "syncgate_broker_bytes_in_total 0",
            "syncgate_sync_rejected_total{reason=\"forged\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
