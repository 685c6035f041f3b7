//! Central's op log at a fleet's scale, in process on SQLite (see
//! BENCHMARKS.md, "The audit API with a thousand edges" and "Retention"):
//!
//! 1. The audit API's queries with `BENCH_EDGES` edges (1,000) and
//!    `BENCH_OPS` ops (300): half the edges acknowledged every op, the others
//!    half of them, every tenth with a failed op: `/v1/edges` (the rows and
//!    retention's account), `/v1/out-of-sync` and the delivery counts behind
//!    the metrics, p50 and p95 over 50 rounds each.
//! 2. Retention under captured writes: writers capture at a steady pace for
//!    `BENCH_RETENTION_SECONDS` (20) while one edge acknowledges everything,
//!    once with nothing pruned and once with the pruner's loop (a 1 s window
//!    instead of days, batches of 500 as central prunes): the op log's size
//!    over time and capture p50/p99 in both.
//!
//! Prints figures; never fails on a timing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use syncgate::protocol::messages::{Ack, Outcome as Acked};
use syncgate::store::{NewIntent, OpState, Outcome, Store};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Millisecond quantiles of a set of durations.
fn quantiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.95), at(0.99))
}

/// Captures one create; its seq and op ID.
async fn capture(store: &Store, name: &str) -> (i64, String) {
    let body = format!(r#"{{"project": {{"name": "{name}"}}}}"#);
    let op = store
        .begin_intent(&NewIntent {
            method: "POST",
            path: "/v3/projects",
            class: "resource",
            kind: "project",
            body: Some(&body),
            refs: "[]",
            traceparent: None,
            touches: &[],
        })
        .await
        .expect("intent");
    let seq = store
        .commit_intent(
            op,
            OpState::Committed,
            &Outcome {
                created_ids: vec![uuid::Uuid::new_v4().simple().to_string()],
                upstream_status: Some(201),
                ..Outcome::default()
            },
        )
        .await
        .expect("commit");
    (seq, op.to_string())
}

async fn audit_at_scale(edges: usize, ops: usize) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("central.db").display());
    let store = Store::open(&url).await.unwrap();
    let names: Vec<String> = (0..edges).map(|i| format!("site{i:04}")).collect();
    for name in &names {
        store.register_edge(name, true).await.unwrap();
    }
    let mut op_ids = Vec::new();
    for i in 0..ops {
        op_ids.push(capture(&store, &format!("p{i}")).await.1);
    }
    let last = ops as i64;
    for (i, name) in names.iter().enumerate() {
        let through = if i % 2 == 0 { last } else { last / 2 };
        let failed: Vec<Ack> = (i % 10 == 1)
            .then(|| Ack {
                seq: 2,
                op_id: op_ids[1].clone(),
                outcome: Acked::Failed,
                status: Some(500),
                detail: Some("refused".into()),
                edge_id_created: vec![],
                operator_skipped: false,
            })
            .into_iter()
            .collect();
        store
            .record_outcomes(name, 0, through, &failed, now_ms())
            .await
            .unwrap();
        store
            .edge_hello(name, through, "bench", None, None)
            .await
            .unwrap();
    }
    // Every op not acknowledged counts as timed out.
    let timeout = Duration::ZERO;
    let window = Duration::from_secs(30 * 86_400);
    let rounds = 50;
    let mut edges_t = Vec::new();
    let mut retention_t = Vec::new();
    let mut out_t = Vec::new();
    let mut counts_t = Vec::new();
    let mut rows = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        let listed = store.edges().await.unwrap();
        assert_eq!(listed.len(), edges);
        edges_t.push(t.elapsed());
        let t = Instant::now();
        store.retention(window, None).await.unwrap();
        retention_t.push(t.elapsed());
        let t = Instant::now();
        rows = store.out_of_sync(None, timeout, 1001).await.unwrap().len();
        out_t.push(t.elapsed());
        let t = Instant::now();
        store.edge_delivery_counts(timeout).await.unwrap();
        counts_t.push(t.elapsed());
    }
    println!();
    println!("audit queries: {edges} edges, {ops} ops, half the edges {} ops behind, every tenth with a failed op; {rounds} rounds", ops / 2);
    println!();
    println!("| query | p50 | p95 |");
    println!("| --- | ---: | ---: |");
    for (what, t) in [
        ("edges (the rows of GET /v1/edges)", edges_t),
        ("retention (its account in GET /v1/edges)", retention_t),
        (
            &*format!("out of sync (GET /v1/out-of-sync, {rows} rows of 1,001 asked)"),
            out_t,
        ),
        ("delivery counts per edge (metrics)", counts_t),
    ] {
        let (p50, p95, _) = quantiles(t);
        println!("| {what} | {p50:.2} ms | {p95:.2} ms |");
    }
    store.close().await;
}

/// Bytes of the op log's files (the database and its write-ahead log).
fn size_of(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

struct RetentionRun {
    captures: usize,
    latencies: Vec<Duration>,
    sizes: Vec<(u64, u64)>,
    pruned: i64,
}

async fn retention_run(seconds: u64, prune: bool) -> RetentionRun {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("central.db").display());
    let store = Store::open(&url).await.unwrap();
    store.register_edge("e1", true).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Writers: 4, each at 250 captures a second.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, stop) = (store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let t = Instant::now();
                capture(&store, &format!("w{w}-{n}")).await;
                latencies.push(t.elapsed());
                n += 1;
            }
            latencies
        }));
    }
    // The edge acknowledges everything, ten times a second.
    let edge = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = 0;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let last = store.last_seq().await.unwrap();
                if last > acked {
                    store
                        .record_outcomes("e1", acked, last, &[], now_ms())
                        .await
                        .unwrap();
                    store
                        .edge_hello("e1", last, "bench", None, None)
                        .await
                        .unwrap();
                    acked = last;
                }
            }
        })
    };
    // The pruner, as central's: batches of 500 while there is more.
    let pruner = prune.then(|| {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut pruned = 0;
            while !stop.load(Ordering::Relaxed) {
                let n = store
                    .prune(Duration::from_secs(1), None, 500, &[])
                    .await
                    .unwrap();
                pruned += n;
                if n < 500 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
            pruned
        })
    });
    let started = Instant::now();
    let mut sizes = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        sizes.push((started.elapsed().as_secs(), size_of(dir.path())));
    }
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for w in writers {
        latencies.extend(w.await.unwrap());
    }
    edge.await.unwrap();
    let pruned = match pruner {
        Some(p) => p.await.unwrap(),
        None => 0,
    };
    store.close().await;
    RetentionRun {
        captures: latencies.len(),
        latencies,
        sizes,
        pruned,
    }
}

async fn retention(seconds: u64) {
    let kept = retention_run(seconds, false).await;
    let pruned = retention_run(seconds, true).await;
    println!();
    println!(
        "retention: 4 writers at 250 captures/s each for {seconds} s, one edge acknowledging \
         every 100 ms; the pruner with a 1 s window in batches of 500"
    );
    println!();
    println!("| | captures | capture p50 | capture p99 | ops pruned |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (what, run) in [("nothing pruned", &kept), ("pruned as it runs", &pruned)] {
        let (p50, _, p99) = quantiles(run.latencies.clone());
        println!(
            "| {what} | {} | {p50:.2} ms | {p99:.2} ms | {} |",
            run.captures, run.pruned
        );
    }
    println!();
    println!("| seconds | op log, nothing pruned | op log, pruned |");
    println!("| ---: | ---: | ---: |");
    for ((t, a), (_, b)) in kept.sizes.iter().zip(&pruned.sizes) {
        println!(
            "| {t} | {:.1} MiB | {:.1} MiB |",
            *a as f64 / 1048576.0,
            *b as f64 / 1048576.0
        );
    }
}

fn main() {
    let edges = env_or("BENCH_EDGES", 1000);
    let ops = env_or("BENCH_OPS", 300);
    let seconds = env_or("BENCH_RETENTION_SECONDS", 20) as u64;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        audit_at_scale(edges, ops).await;
        retention(seconds).await;
    });
}
