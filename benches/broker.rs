//! Broker benchmark: the embedded broker (`syncgate broker`) against a real
//! `nats-server`, driven in one run by the same client (async-nats) on the same
//! machine. Prints a table of figures and the ratio embedded / nats-server; it
//! never fails on a figure.
//!
//! Run with `scripts/bench-broker.sh` (it provides nats-server from the venv), or
//! `NATS_SERVER=/path/to/nats-server cargo bench --bench broker`.
//! `BENCH_SCALE=0.1` shortens every workload.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;

/// A broker process and its client URL.
struct Server {
    name: &'static str,
    child: Child,
    url: String,
}

impl Server {
    fn embedded() -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_syncgate"))
            .args([
                "broker",
                "--broker-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .env("SYNCGATE_LOG", "warn,syncgate::broker=info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start syncgate broker");
        let addr = address_from_log(&mut child, |line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            (v["fields"]["message"] == "broker listening")
                .then(|| v["fields"]["addr"].as_str().map(str::to_string))
                .flatten()
        });
        Server {
            name: "embedded",
            child,
            url: format!("nats://{addr}"),
        }
    }

    fn nats_server(path: &str) -> Server {
        let mut child = Command::new(path)
            .args(["-a", "127.0.0.1", "-p", "-1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {path}: {e}"));
        let addr = address_from_log(&mut child, |line| {
            line.split("Listening for client connections on ")
                .nth(1)
                .map(|a| a.trim().to_string())
        });
        Server {
            name: "nats-server",
            child,
            url: format!("nats://{addr}"),
        }
    }

    /// Resident memory of the server process now (VmRSS), in KiB.
    fn rss_kib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    }

    /// Peak resident memory of the server process, in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }
}

/// Reads a server's stderr until `find` recognises its listening address, then
/// keeps draining it so the server never blocks on a full pipe.
fn address_from_log(child: &mut Child, find: impl Fn(&str) -> Option<String>) -> String {
    let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let addr = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|line| find(&line))
        .expect("the server logs its listening address");
    std::thread::spawn(move || lines.for_each(drop));
    addr
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One publisher, `subscribers` subscribers: deliveries per second.
async fn throughput(url: &str, size: usize, count: usize, subscribers: usize) -> f64 {
    let mut receivers = Vec::new();
    let mut subs = Vec::new();
    for _ in 0..subscribers {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(url)
            .await
            .unwrap();
        let sub = client.subscribe("bench.tp").await.unwrap();
        client.flush().await.unwrap();
        subs.push((client, sub));
    }
    let publisher = async_nats::ConnectOptions::new()
        .client_capacity(1 << 16)
        .connect(url)
        .await
        .unwrap();
    let payload = Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    for (client, mut sub) in subs {
        receivers.push(tokio::spawn(async move {
            let _keep = client;
            for _ in 0..count {
                sub.next().await.expect("subscription open");
            }
        }));
    }
    for _ in 0..count {
        publisher
            .publish("bench.tp", payload.clone())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for r in receivers {
        r.await.unwrap();
    }
    (count * subscribers) as f64 / start.elapsed().as_secs_f64()
}

/// A responder on its own connection that answers each request on
/// `subject` with its payload; subscribed when this returns.
async fn echo(url: &str, subject: &'static str) -> tokio::task::JoinHandle<()> {
    let responder = async_nats::connect(url).await.unwrap();
    let mut service = responder.subscribe(subject).await.unwrap();
    responder.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(msg) = service.next().await {
            if let Some(reply) = msg.reply {
                responder.publish(reply, msg.payload).await.unwrap();
            }
        }
    })
}

/// Sequential request/reply round trips: p50 and p99 in microseconds.
async fn request_latency(url: &str, count: usize) -> (f64, f64) {
    let task = echo(url, "bench.rr").await;
    let client = async_nats::connect(url).await.unwrap();
    let payload = Bytes::from_static(b"ping-payload-16b");
    // Warm up connections and caches.
    for _ in 0..100 {
        client.request("bench.rr", payload.clone()).await.unwrap();
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        client.request("bench.rr", payload.clone()).await.unwrap();
        samples.push(t.elapsed());
    }
    task.abort();
    samples.sort();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1e6
    };
    (pct(0.50), pct(0.99))
}

/// `n` connections shaped like edges': five subscriptions and a request
/// inbox each, one request answered, then a burst of 64 ops of 1 KiB
/// delivered to every one (a replay's worth). Returns the server's resident
/// memory per connection, in KiB, once the connections have been quiet for
/// two seconds after the burst (both servers give back buffers when idle).
async fn memory_per_connection(server: &Server, n: usize) -> f64 {
    let url = &server.url;
    let task = echo(url, "bench.hello.*").await;
    let publisher = async_nats::connect(url).await.unwrap();
    publisher.flush().await.unwrap();
    let before = server.rss_kib();
    let hello = Bytes::from(vec![b'h'; 200]);
    let mut edges = Vec::with_capacity(n);
    for i in 0..n {
        let client = async_nats::connect(url).await.unwrap();
        let ops = client.subscribe("bench.ops").await.unwrap();
        let mut others = Vec::new();
        for kind in ["redo", "outcomes", "resync", "state"] {
            others.push(client.subscribe(format!("bench.{kind}.{i}")).await.unwrap());
        }
        client
            .request(format!("bench.hello.{i}"), hello.clone())
            .await
            .unwrap();
        edges.push((client, ops, others));
    }
    let op = Bytes::from(vec![b'o'; 1024]);
    for _ in 0..64 {
        publisher.publish("bench.ops", op.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for (_, ops, _) in &mut edges {
        for _ in 0..64 {
            ops.next().await.expect("subscription open");
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let after = server.rss_kib();
    task.abort();
    (after - before) / n as f64
}

struct Figures {
    tp16: f64,
    tp1k: f64,
    fanout: f64,
    p50: f64,
    p99: f64,
    rss: f64,
}

/// Edge-shaped connections for the memory figure (a fleet's worth).
const CONNECTIONS: usize = 1000;

async fn measure(server: &Server, scale: f64) -> Figures {
    let n = |base: f64| ((base * scale) as usize).max(1000);
    eprintln!("measuring {} at {}", server.name, server.url);
    let tp16 = throughput(&server.url, 16, n(1_000_000.0), 1).await;
    let tp1k = throughput(&server.url, 1024, n(200_000.0), 1).await;
    let fanout = throughput(&server.url, 16, n(250_000.0), 4).await;
    let (p50, p99) = request_latency(&server.url, n(20_000.0)).await;
    Figures {
        tp16,
        tp1k,
        fanout,
        p50,
        p99,
        rss: server.peak_rss_mib(),
    }
}

fn main() {
    let nats_path = std::env::var("NATS_SERVER").unwrap_or_else(|_| ".venv/bin/nats-server".into());
    if !std::path::Path::new(&nats_path).exists() {
        eprintln!(
            "nats-server not found at {nats_path}: run scripts/bench-broker.sh, or set NATS_SERVER"
        );
        std::process::exit(1);
    }
    let scale: f64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ((ours, ours_mem), (theirs, theirs_mem)) = runtime.block_on(async {
        // Alternate the order so neither side always runs on a cold machine.
        let theirs_server = Server::nats_server(&nats_path);
        let theirs = measure(&theirs_server, scale).await;
        drop(theirs_server);
        let ours_server = Server::embedded();
        let ours = measure(&ours_server, scale).await;
        drop(ours_server);
        // Each in a server of its own: what the runs above left resident
        // says nothing of a fleet's connections.
        let theirs_mem = memory_per_connection(&Server::nats_server(&nats_path), CONNECTIONS).await;
        let ours_mem = memory_per_connection(&Server::embedded(), CONNECTIONS).await;
        ((ours, ours_mem), (theirs, theirs_mem))
    });

    let version = Command::new(&nats_path)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!();
    println!("broker benchmark (client: async-nats; {version}; BENCH_SCALE={scale})");
    println!();
    println!("| workload | embedded | nats-server | embedded / nats-server |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |name: &str, a: f64, b: f64, unit: &str| {
        println!("| {name} | {a:.0} {unit} | {b:.0} {unit} | {:.2} |", a / b);
    };
    row("1 → 1, 16 B", ours.tp16, theirs.tp16, "msg/s");
    row("1 → 1, 1 KiB", ours.tp1k, theirs.tp1k, "msg/s");
    row(
        "1 → 4 fan-out, 16 B (deliveries)",
        ours.fanout,
        theirs.fanout,
        "msg/s",
    );
    row("request/reply p50", ours.p50, theirs.p50, "µs");
    row("request/reply p99", ours.p99, theirs.p99, "µs");
    println!(
        "| peak memory (VmHWM) | {:.1} MiB | {:.1} MiB | {:.2} |",
        ours.rss,
        theirs.rss,
        ours.rss / theirs.rss
    );
    println!(
        "| memory per edge-shaped connection ({CONNECTIONS}, VmRSS, a fresh server) | {:.0} KiB | {:.0} KiB | {:.2} |",
        ours_mem,
        theirs_mem,
        ours_mem / theirs_mem
    );
}
