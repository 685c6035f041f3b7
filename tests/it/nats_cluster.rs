//! A NATS cluster and leaf nodes, with real nats-server processes: central
//! connects to a three-node cluster by its seeds, each edge to its site's
//! leaf node whose uplink leads to the cluster. Core NATS keeps nothing for a
//! link that is down: what an edge misses comes back by replay from the op
//! log. Each test kills one part mid-stream and checks that nothing is lost,
//! nothing is applied twice and the audit ends clean.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::faults::{Fault, FaultProxy};
use crate::sync::{nats_server_path, sync_env, SyncEnv};

/// One nats-server process with its configuration file and monitoring port.
/// Every port is chosen by the server itself (`-1`) and read back, so no
/// other process can take one between its choice and the server's bind.
pub(crate) struct Node {
    child: tokio::process::Child,
    client: SocketAddr,
    monitor: u16,
    /// The ports `cluster {}` and `leafnodes {}` listen on, when configured.
    cluster_port: Option<u16>,
    leaf_port: Option<u16>,
    log: std::path::PathBuf,
}

impl Node {
    pub(crate) async fn start(bin: &Path, dir: &Path, name: &str, config: String) -> Node {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let file = home.join("server.conf");
        std::fs::write(
            &file,
            format!(
                "server_name: {name}\nlisten: 127.0.0.1:-1\nhttp: 127.0.0.1:-1\n\
                 ports_file_dir: {:?}\n{config}\n",
                home.display().to_string()
            ),
        )
        .unwrap();
        let log = home.join("server.log");
        let mut child = tokio::process::Command::new(bin)
            .arg("-c")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // The server writes its ports file once it listens on every port.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let monitor = loop {
            let ports = std::fs::read_dir(&home)
                .unwrap()
                .flatten()
                .find(|e| e.path().extension().is_some_and(|x| x == "ports"))
                .and_then(|e| std::fs::read_to_string(e.path()).ok())
                .and_then(|t| serde_json::from_str::<Value>(&t).ok());
            if let Some(url) = ports.as_ref().and_then(|p| p["monitoring"][0].as_str()) {
                let port = url.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
                break port.expect("a monitoring port in nats-server's ports file");
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited ({status}): {}", tail(&log));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} never wrote its ports file: {}",
                tail(&log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut node = Node {
            child,
            client: "127.0.0.1:0".parse().unwrap(),
            monitor,
            cluster_port: None,
            leaf_port: None,
            log,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let varz = loop {
            if let Some(v) = node.page("/varz").await {
                break v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} serving: timed out: {}",
                tail(&node.log)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let port = |v: &Value| v.as_u64().and_then(|p| u16::try_from(p).ok());
        node.client = format!("127.0.0.1:{}", port(&varz["port"]).expect("a client port"))
            .parse()
            .unwrap();
        node.cluster_port = port(&varz["cluster"]["cluster_port"]).filter(|p| *p != 0);
        node.leaf_port = port(&varz["leaf"]["port"]).filter(|p| *p != 0);
        node
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://{}", self.client)
    }

    /// One of the server's monitoring pages, when it answers.
    pub(crate) async fn page(&self, path: &str) -> Option<Value> {
        reqwest::get(format!("http://127.0.0.1:{}{path}", self.monitor))
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    pub(crate) async fn until(&self, what: &str, path: &str, ok: impl Fn(&Value) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(page) = self.page(path).await {
                if ok(&page) {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: timed out: {}",
                tail(&self.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether a client of this name is connected here.
    async fn serves(&self, client: &str) -> bool {
        self.page("/connz").await.is_some_and(|c| {
            c["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|conn| conn["name"] == client)
        })
    }

    pub(crate) async fn kill(&mut self) {
        self.child.kill().await.unwrap();
    }
}

/// The last lines a node wrote to its log, for a failure's message.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Three nodes routed to each other, each accepting leaf nodes.
struct Cluster {
    nodes: Vec<Node>,
    leaf_ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(bin: &Path) -> Cluster {
        Cluster::start_with(bin, "").await
    }

    /// A cluster whose nodes' configurations end with `extra` (users and
    /// their permissions).
    async fn start_with(bin: &Path, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<Node> = Vec::new();
        for i in 0..3 {
            // The first node is every other's seed; the cluster gossips the
            // rest of its routes itself.
            let routes = match nodes.first() {
                Some(seed) => format!(
                    ", routes: [\"nats://127.0.0.1:{}\"]",
                    seed.cluster_port.expect("the seed's cluster port")
                ),
                None => String::new(),
            };
            // `no_advertise`: a leaf node learns the other nodes' leaf
            // ports from the node it reaches and would go round a cut uplink
            // through them; each test chooses its leaf's way in itself.
            let config = format!(
                "cluster {{ name: sg, listen: \"127.0.0.1:-1\"{routes} }}\n\
                 leafnodes {{ listen: \"127.0.0.1:-1\", no_advertise: true }}\n{extra}"
            );
            nodes.push(Node::start(bin, dir.path(), &format!("n{i}"), config).await);
        }
        // Routed to both others (a route count alone counts a pool's
        // connections to one node).
        for (i, n) in nodes.iter().enumerate() {
            n.until("the cluster routed", "/routez", |r| {
                let peers: std::collections::HashSet<&str> = r["routes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|route| route["remote_name"].as_str())
                    .collect();
                (0..3)
                    .filter(|j| *j != i)
                    .all(|j| peers.contains(format!("n{j}").as_str()))
            })
            .await;
        }
        let leaf_ports = nodes
            .iter()
            .map(|n| n.leaf_port.expect("a node's leaf node port"))
            .collect();
        Cluster {
            nodes,
            leaf_ports,
            _dir: dir,
        }
    }

    /// Every node's client URL, comma-separated: the seeds central is given.
    fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A site's leaf node; its uplink leads to every node of the cluster or,
/// `cuttable`, to one through a proxy the test can cut.
struct Leaf {
    node: Node,
    uplink: Option<FaultProxy>,
}

impl Leaf {
    async fn start(bin: &Path, dir: &Path, cluster: &Cluster, cuttable: bool) -> Leaf {
        Leaf::start_as(bin, dir, cluster, cuttable, None).await
    }

    /// A leaf node whose uplink logs in to the cluster as `login`
    /// (`user:password`), when given.
    async fn start_as(
        bin: &Path,
        dir: &Path,
        cluster: &Cluster,
        cuttable: bool,
        login: Option<&str>,
    ) -> Leaf {
        let scheme = match login {
            Some(login) => format!("nats-leaf://{login}@"),
            None => "nats://".to_string(),
        };
        let mut uplink = None;
        let urls: Vec<String> = if cuttable {
            let to: SocketAddr = format!("127.0.0.1:{}", cluster.leaf_ports[0])
                .parse()
                .unwrap();
            let proxy = FaultProxy::start(to).await;
            let url = format!("{scheme}{}", proxy.addr);
            uplink = Some(proxy);
            vec![url]
        } else {
            cluster
                .leaf_ports
                .iter()
                .map(|p| format!("{scheme}127.0.0.1:{p}"))
                .collect()
        };
        let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        let config = format!(
            "leafnodes {{ reconnect: \"200ms\", remotes: [ {{ urls: [{}] }} ] }}",
            quoted.join(", ")
        );
        let name = "site-a-leaf";
        let node = Node::start(bin, dir, name, config).await;
        node.until("the leaf node connected", "/leafz", |l| {
            l["leafnodes"].as_u64() >= Some(1)
        })
        .await;
        Leaf { node, uplink }
    }
}

/// Central on the cluster's seeds, one edge on its site's leaf node.
async fn fleet(bin: &Path, cluster: &Cluster, dir: &Path, cuttable: bool) -> (SyncEnv, Leaf) {
    let leaf = Leaf::start(bin, dir, cluster, cuttable).await;
    let mut env = sync_env(&[], Some(cluster.seeds()), |c| {
        c.sync.edges = vec!["edge-a".into()];
    })
    .await;
    env.add_edge("edge-a", Some(leaf.node.url())).await;
    (env, leaf)
}

/// Creates `n` projects named `prefix-i` through central, each answered 201.
async fn creates(env: &SyncEnv, prefix: &str, n: usize) {
    for i in 0..n {
        let (status, body) = env
            .write(
                "POST",
                "/v3/projects",
                Some(json!({"project": {"name": format!("{prefix}-{i}")}})),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
}

/// The project creates the edge's Keystone received, whatever it answered.
fn edge_creates(env: &SyncEnv) -> usize {
    env.edges[0].site.create_requests("projects")
}

/// Every project central holds reached the edge, each created there once:
/// the edge's Keystone received one create per project, none twice.
async fn each_applied_once(env: &SyncEnv) {
    env.assert_in_sync().await;
    let creates = edge_creates(env);
    let central_creates = env
        .central_site
        .state
        .lock()
        .unwrap()
        .journal
        .iter()
        .filter(|l| l.starts_with("POST /v3/projects 201"))
        .count();
    assert_eq!(
        creates, central_creates,
        "the edge's Keystone got one create per project made at central"
    );
}

/// The cluster node central is connected to is killed mid-stream: central
/// reconnects to another seed; what it published meanwhile reaches the edge
/// (sent again by its client once reconnected, or, lost with the node, by
/// replay), each op applied once, and the audit ends clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_node_central_uses_killed_mid_stream_loses_nothing() {
    let Some(bin) = nats_server_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(&bin).await;
    let (env, _leaf) = fleet(&bin, &cluster, dir.path(), false).await;
    creates(&env, "before", 10).await;
    env.assert_in_sync().await;
    let mut on = None;
    for (i, n) in cluster.nodes.iter().enumerate() {
        if n.serves("syncgate-central").await {
            on = Some(i);
        }
    }
    let on = on.expect("central is connected to one node of the cluster");
    let writer = {
        let (http, proxy, token) = (env.http.clone(), env.proxy.clone(), env.token().to_string());
        tokio::spawn(async move {
            let mut acknowledged = 0;
            for i in 0..40 {
                let resp = http
                    .post(format!("{proxy}/v3/projects"))
                    .header("x-auth-token", &token)
                    .json(&json!({"project": {"name": format!("during-{i}")}}))
                    .send()
                    .await
                    .unwrap();
                if resp.status() == 201 {
                    acknowledged += 1;
                }
            }
            acknowledged
        })
    };
    cluster.nodes[on].kill().await;
    // Captures never depend on the broker: every write is acknowledged.
    assert_eq!(writer.await.unwrap(), 40);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut elsewhere = false;
        for (i, n) in cluster.nodes.iter().enumerate() {
            elsewhere |= i != on && n.serves("syncgate-central").await;
        }
        if elsewhere {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "central never reconnected to another node of the cluster"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    creates(&env, "after", 10).await;
    each_applied_once(&env).await;
    env.shutdown().await;
}

/// The site's leaf node loses its uplink to the cluster mid-stream: the ops
/// published meanwhile never reach the site (core NATS keeps nothing for it);
/// once the uplink is back the edge replays them from central's op log, each
/// applied once, and the audit ends clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_nodes_lost_uplink_is_made_good_by_replay() {
    let Some(bin) = nats_server_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&bin).await;
    let (env, leaf) = fleet(&bin, &cluster, dir.path(), true).await;
    let uplink = leaf.uplink.as_ref().unwrap();
    creates(&env, "before", 10).await;
    env.assert_in_sync().await;
    // The uplink is cut: its connection closed, new ones refused.
    uplink.set(Fault::Refuse);
    uplink.reset();
    let before = edge_creates(&env);
    leaf.node
        .until("the leaf node lost its uplink", "/leafz", |l| {
            l["leafnodes"].as_u64() == Some(0)
        })
        .await;
    creates(&env, "cut-off", 20).await;
    let leafz = leaf
        .node
        .page("/leafz")
        .await
        .expect("the leaf node's /leafz");
    assert_eq!(
        leafz["leafnodes"].as_u64(),
        Some(0),
        "the leaf node found no way round its cut uplink: {leafz}"
    );
    assert_eq!(edge_creates(&env), before, "nothing crosses a cut uplink");
    uplink.set(Fault::Pass);
    leaf.node
        .until("the leaf node reconnected", "/leafz", |l| {
            l["leafnodes"].as_u64() >= Some(1)
        })
        .await;
    creates(&env, "after", 10).await;
    each_applied_once(&env).await;
    env.shutdown().await;
}

/// The users of the tested per-site configuration (README, *NATS cluster and
/// leaf nodes*): central may do anything; a site's user, which its leaf
/// node's uplink logs in as, may publish only its own acks and hellos,
/// replay requests and replies to central, and receive only the op stream,
/// its own requests and the replies to its own requests.
const SITE_USERS: &str = r#"authorization { users: [
  { user: central, password: central-pw }
  { user: edge-a, password: edge-a-pw, permissions: {
      publish: ["syncgate.ack.edge-a", "syncgate.hello.edge-a", "syncgate.replay",
                "syncgate.inbox.central.edge-a.>"]
      subscribe: ["syncgate.ops", "syncgate.redo.edge-a", "syncgate.skip.edge-a",
                  "syncgate.outcomes.edge-a", "syncgate.state.edge-a",
                  "syncgate.resync.edge-a", "syncgate.inbox.edge.edge-a.>"] } }
] }"#;

/// The subjects and payloads a client receives until one named `marker`
/// arrives (in order: one connection's messages keep their order through a
/// leaf node).
async fn seen_until(sub: &mut async_nats::Subscriber, marker: &str) -> Vec<(String, String)> {
    use futures_util::StreamExt;
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("{marker} never arrived; seen {seen:?}"))
            .expect("a subscription that stays open");
        let subject = msg.subject.to_string();
        if subject == marker {
            return seen;
        }
        seen.push((subject, String::from_utf8_lossy(&msg.payload).into_owned()));
    }
}

/// Whether `subject` arrives within a moment (messages before it dropped).
async fn heard_within(sub: &mut async_nats::Subscriber, subject: &str) -> bool {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_millis(200), async {
        while let Some(m) = sub.next().await {
            if m.subject.as_str() == subject {
                return;
            }
        }
    })
    .await
    .is_ok()
}

/// A site whose leaf node logs in as the site's own user, narrowed by the
/// permissions the README gives: the edge syncs through it as usual (ops,
/// acks, hellos, replays, a resync's requests and replies), while whatever
/// the site sends on another site's subjects, or as an op, never reaches
/// the cluster, and another site's requests and replies never reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sites_broker_user_speaks_for_its_own_site_only() {
    let Some(bin) = nats_server_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start_with(&bin, SITE_USERS).await;
    let leaf = Leaf::start_as(&bin, dir.path(), &cluster, false, Some("edge-a:edge-a-pw")).await;
    let mut env = sync_env(&[], Some(cluster.seeds()), |c| {
        c.sync.edges = vec!["edge-a".into()];
        c.broker_client_auth = syncgate::broker::BrokerAuth::UserPassword {
            user: "central".into(),
            password: syncgate::broker::Secret::new("central-pw"),
        };
    })
    .await;
    // Ops made before the edge starts reach it by replay; later ones live.
    creates(&env, "before", 5).await;
    env.add_edge("edge-a", Some(leaf.node.url())).await;
    creates(&env, "live", 5).await;
    each_applied_once(&env).await;
    // A resync: central's requests to the site and the site's replies.
    let (status, body) = crate::resync::post(&env, "/v1/edges/edge-a/resync").await;
    assert_eq!(status, 202, "{body}");
    crate::resync::resync_ended(&env, "edge-a").await;
    creates(&env, "after", 3).await;
    each_applied_once(&env).await;

    // What the site sends: only its own subjects reach the cluster.
    let cluster_side =
        async_nats::ConnectOptions::with_user_and_password("central".into(), "central-pw".into())
            .connect(cluster.nodes[0].url())
            .await
            .unwrap();
    let mut heard = cluster_side.subscribe(">").await.unwrap();
    let site_side = async_nats::connect(leaf.node.url()).await.unwrap();
    let mut site_heard = site_side.subscribe("syncgate.>").await.unwrap();
    cluster_side.flush().await.unwrap();
    site_side.flush().await.unwrap();
    // Both subscriptions' interest crosses the leaf link before the probes.
    let probe = "syncgate.inbox.central.edge-a.probe-interest";
    let echo = "syncgate.inbox.edge.edge-a.probe-interest";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut up, mut down) = (false, false);
    while !(up && down) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "interest never crossed the leaf link (up {up}, down {down})"
        );
        site_side.publish(probe, "".into()).await.unwrap();
        cluster_side.publish(echo, "".into()).await.unwrap();
        site_side.flush().await.unwrap();
        cluster_side.flush().await.unwrap();
        up |= heard_within(&mut heard, probe).await;
        down |= heard_within(&mut site_heard, echo).await;
    }
    // Another site's acks and hellos, central's own subjects, answers to
    // central's requests to another site, another site's inbox.
    let forged = [
        "syncgate.ack.edge-b",
        "syncgate.hello.edge-b",
        "syncgate.ops",
        "syncgate.resync.edge-b",
        "syncgate.redo.edge-b",
        "syncgate.skip.edge-b",
        "syncgate.outcomes.edge-b",
        "syncgate.state.edge-b",
        "syncgate.inbox.central.edge-b.x",
        "syncgate.inbox.edge.edge-b.x",
        "_INBOX.x.y",
    ];
    // Through the site's leaf node, then logged in to the cluster directly
    // with the site's own credentials (what a hostile site holds).
    let direct =
        async_nats::ConnectOptions::with_user_and_password("edge-a".into(), "edge-a-pw".into())
            .connect(cluster.nodes[0].url())
            .await
            .unwrap();
    for (how, client) in [("through its leaf node", &site_side), ("directly", &direct)] {
        for subject in forged {
            client.publish(subject, "forged".into()).await.unwrap();
        }
        let marker = "syncgate.inbox.central.edge-a.marker";
        client.publish(marker, "".into()).await.unwrap();
        client.flush().await.unwrap();
        let seen = seen_until(&mut heard, marker).await;
        let crossed: Vec<_> = seen
            .iter()
            .filter(|(s, _)| forged.contains(&s.as_str()) || s.starts_with("_INBOX"))
            .collect();
        assert!(
            crossed.is_empty(),
            "the site spoke for others {how}: {crossed:?}"
        );
    }

    // What the site receives: another site's requests and replies stay out.
    let others = [
        "syncgate.resync.edge-b",
        "syncgate.state.edge-b",
        "syncgate.redo.edge-b",
        "syncgate.skip.edge-b",
        "syncgate.outcomes.edge-b",
        "syncgate.inbox.edge.edge-b.x",
        "syncgate.inbox.central.edge-a.x",
    ];
    for subject in others {
        cluster_side
            .publish(subject, "for-another".into())
            .await
            .unwrap();
    }
    let marker = "syncgate.inbox.edge.edge-a.marker";
    cluster_side.publish(marker, "".into()).await.unwrap();
    cluster_side.flush().await.unwrap();
    let seen = seen_until(&mut site_heard, marker).await;
    // The site's own client heard itself too (a leaf node delivers locally):
    // only what the cluster published matters here.
    let leaked: Vec<_> = seen
        .iter()
        .filter(|(s, payload)| others.contains(&s.as_str()) && payload == "for-another")
        .collect();
    assert!(leaked.is_empty(), "the site heard another's: {leaked:?}");
    env.assert_in_sync().await;
    env.shutdown().await;
}
