//! The op log on a real PostgreSQL (Debian's `postgresql` package): a private
//! server started for the test as an unprivileged user, in a temporary
//! directory, on a free port. `SYNCGATE_REQUIRE_POSTGRES=1` (set by
//! `scripts/test.sh` as root) makes a missing server a failure.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use syncgate::store::{OpFilter, OpState, Outcome, Store};

/// A PostgreSQL server of its own, stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_nobody: bool,
    /// Listens on 127.0.0.1 too (TCP), requiring TLS there.
    tcp: bool,
}

/// Where the server's programs are: `SYNCGATE_POSTGRES_BIN`, else the newest
/// of Debian's `/usr/lib/postgresql/<version>/bin`.
fn postgres_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SYNCGATE_POSTGRES_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

impl Postgres {
    /// Starts one, or `None` (the test skips) when none is installed and
    /// none is required.
    pub fn start() -> Option<Postgres> {
        Postgres::start_with(None)
    }

    /// One that also listens on 127.0.0.1 (a free port) and takes TCP
    /// connections over TLS only, with this certificate.
    pub fn start_tls(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> Option<Postgres> {
        Postgres::start_with(Some(cert))
    }

    fn start_with(tls: Option<&rcgen::CertifiedKey<rcgen::KeyPair>>) -> Option<Postgres> {
        let Some(bin) = postgres_bin() else {
            assert!(
                std::env::var_os("SYNCGATE_REQUIRE_POSTGRES").is_none(),
                "PostgreSQL's programs not found (apt-get install postgresql, or set \
                 SYNCGATE_POSTGRES_BIN)"
            );
            eprintln!("skipping: no PostgreSQL installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        // PostgreSQL refuses to run as root: as root, it runs as nobody.
        let as_nobody = is_root();
        if as_nobody {
            let ok = Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the server's directory");
        }
        let port = match tls {
            // Names the socket file only: the server listens on no TCP port.
            None => 5432,
            Some(_) => std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        };
        let pg = Postgres {
            bin,
            port,
            dir,
            as_nobody,
            tcp: tls.is_some(),
        };
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "syncgate",
                "--auth=trust",
                "--no-sync",
                "--locale=C",
                "-E",
                "UTF8",
            ],
        );
        if let Some(cert) = tls {
            pg.require_tls(cert);
        }
        pg.launch();
        Some(pg)
    }

    /// Serves TLS with `cert`, and refuses TCP connections without it.
    fn require_tls(&self, cert: &rcgen::CertifiedKey<rcgen::KeyPair>) {
        use std::os::unix::fs::PermissionsExt;
        let data = self.data();
        std::fs::write(data.join("server.crt"), cert.cert.pem()).unwrap();
        let key = data.join("server.key");
        std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut conf,
            b"ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        )
        .unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        if self.as_nobody {
            let ok = Command::new("chown")
                .args(["-R", "nobody:nogroup"])
                .arg(&data)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the server's files");
        }
    }

    /// The URL of a database on this server over TCP (see `start_tls`).
    fn tcp_url(&self, name: &str, query: &str) -> String {
        format!("postgres://syncgate@localhost:{}/{name}?{query}", self.port)
    }

    /// Starts the server on its data, port and socket directory.
    fn launch(&self) {
        let data = self.data();
        let listen = if self.tcp { "127.0.0.1" } else { "" };
        let opts = format!(
            "-p {} -k {} -c listen_addresses='{listen}'",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-o",
                &opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let out = if self.as_nobody {
            Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(&path)
                .args(args)
                .current_dir(self.dir.path())
                .output()
        } else {
            Command::new(&path).args(args).output()
        }
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            out.status.success(),
            "{program} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
    }

    /// The URL of a database on this server: through its Unix socket only
    /// (no TCP port another process could take while it restarts).
    fn url(&self, name: &str) -> String {
        format!(
            "postgres://syncgate@localhost:{}/{name}?host={}",
            self.port,
            self.dir.path().display()
        )
    }

    /// A new, empty database on this server, by URL.
    pub async fn database(&self, name: &str) -> String {
        use sqlx::Connection;
        let admin = self.url("postgres");
        let mut c = sqlx::PgConnection::connect(&admin).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        self.url(name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let path = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap_or(""), "-m", "immediate", "stop"];
        let _ = if self.as_nobody {
            Command::new("runuser")
                .args(["-u", "nobody", "--"])
                .arg(&path)
                .args(args)
                .output()
        } else {
            Command::new(&path).args(args).output()
        };
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Tries `f` until it gives a value, for at most a minute (a lock or a
/// server coming back is awaited, never for ever).
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within a minute"
        );
        tokio::task::yield_now().await;
    }
}

/// Two central replicas capture concurrently (eight writers, each intent
/// made an op by a group commit of its replica) while a reader follows the
/// log: seqs are gap-free, each op is logged once with the seq its commit
/// answered, and the reader never sees a seq before the ones below it are
/// visible (so it never later finds an op below what it has read).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seqs_are_gap_free_and_become_visible_in_order_across_processes() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("oplog_order").await;
    let replicas = [
        Store::open(&url).await.unwrap(),
        Store::open(&url).await.unwrap(),
    ];
    let _joined = [
        replicas[0].join("a", None, None, false).await.unwrap(),
        replicas[1].join("b", None, None, false).await.unwrap(),
    ];
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let log = replicas[1].clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut cursor = 0;
            let mut reads = 0u64;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let filter = OpFilter {
                    after: cursor,
                    limit: 500,
                    kind: None,
                    state: None,
                    through: None,
                };
                for o in log.list_ops(&filter).await.unwrap() {
                    assert_eq!(
                        o.seq,
                        cursor + 1,
                        "seq {} seen while {} was not: a later read would find an op below",
                        o.seq,
                        cursor + 1
                    );
                    cursor = o.seq;
                }
                reads += 1;
                if finished {
                    return (cursor, reads);
                }
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let log = replicas[(w % 2) as usize].clone();
        writers.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            for i in 0..40u64 {
                let id = begin(&log, &format!("w{w}-{i}")).await;
                let seq = log
                    .commit_intent(id, OpState::Committed, &Outcome::default())
                    .await
                    .unwrap();
                answered.push((id.to_string(), seq));
            }
            answered
        }));
    }
    let mut answered = Vec::new();
    for w in writers {
        answered.extend(w.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let (cursor, reads) = reader.await.unwrap();
    let total = answered.len() as i64;
    assert_eq!(cursor, total, "the reader read every op ({reads} reads)");
    // Each op once, with the seq its commit answered; seqs 1..=total.
    let logged = replicas[0]
        .list_ops(&OpFilter {
            after: 0,
            limit: total + 10,
            kind: None,
            state: None,
            through: None,
        })
        .await
        .unwrap();
    let seqs: BTreeSet<i64> = logged.iter().map(|o| o.seq).collect();
    assert_eq!(seqs, (1..=total).collect::<BTreeSet<_>>());
    for (id, seq) in &answered {
        assert_eq!(&logged[(*seq - 1) as usize].op_id, id);
    }
    println!("{total} ops by 8 writers on 2 replicas, followed by {reads} reads");
}

/// A password never sits in the URL, and what the log says of a URL it
/// cannot open never shows one.
#[tokio::test]
async fn a_database_url_with_a_password_is_refused_without_showing_it() {
    let Err(e) = Store::open("postgres://sync:hunter2@127.0.0.1:1/oplog").await else {
        panic!("opened");
    };
    let text = e.to_string();
    assert!(text.contains("PGPASSFILE"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // In the query, the same.
    let Err(e) = Store::open("postgres://sync@127.0.0.1:1/oplog?password=hunter2").await else {
        panic!("opened");
    };
    let text = e.to_string();
    assert!(
        text.contains("PGPASSFILE") && !text.contains("hunter2"),
        "{text}"
    );
    // Unreachable: the error names the database, not a password.
    let Err(e) = Store::open("postgres://sync@127.0.0.1:1/oplog").await else {
        panic!("opened");
    };
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

/// TLS to PostgreSQL is the URL's `sslmode`: `verify-full` with the
/// server's CA in `sslrootcert` opens the op log over TLS (the server says
/// so of the connection); a server whose certificate the given CA did not
/// sign is refused with the reason, as is a connection without TLS where
/// the server requires it. No message shows the URL's query.
#[tokio::test]
async fn tls_to_postgresql_is_the_urls_sslmode() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let Some(pg) = Postgres::start_tls(&cert) else {
        return;
    };
    let name = "tls";
    pg.database(name).await;
    let certs = tempfile::tempdir().unwrap();
    let ca = certs.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let other = certs.path().join("other.pem");
    let stranger = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(&other, stranger.cert.pem()).unwrap();

    let verified = pg.tcp_url(
        name,
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    );
    let store = Store::open(&verified).await.expect("opened over TLS");
    store.last_seq().await.unwrap();
    // Seen from the server, through its socket: every connection the op log
    // holds is encrypted.
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&pg.url("postgres"))
        .await
        .unwrap();
    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl)
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = 'tls' AND a.application_name = 'syncgate'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        connections > 0 && encrypted == connections,
        "{encrypted} of {connections} encrypted"
    );
    drop(store);

    let refused = pg.tcp_url(
        name,
        &format!("sslmode=verify-full&sslrootcert={}", other.display()),
    );
    let Err(e) = Store::open(&refused).await else {
        panic!("a server the CA did not sign was taken");
    };
    let text = format!("{e:#}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert!(
        !text.contains("sslrootcert"),
        "the query is not shown: {text}"
    );

    let Err(e) = Store::open(&pg.tcp_url(name, "sslmode=disable")).await else {
        panic!("opened without TLS where the server requires it");
    };
    let text = format!("{e:#}");
    assert!(text.contains("no encryption"), "{text}");
}

/// A server that asks for a password: the op log opens with the password
/// given apart from the URL (`--db-password-file`, read into a secret) or
/// from `PGPASSFILE` (here through `syncgate oplog copy`), and is refused
/// without one, never showing it. Every connection asks for
/// `synchronous_commit` whatever the server's default (here off): the server's
/// statement log shows it.
#[tokio::test]
async fn a_password_apart_from_the_url_opens_the_op_log_and_commits_are_synchronous() {
    use sqlx::Connection;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let mut admin = sqlx::PgConnection::connect(&pg.url("postgres"))
        .await
        .unwrap();
    for statement in [
        "CREATE ROLE writer LOGIN PASSWORD 'pw-4be1c7'",
        "CREATE DATABASE secured OWNER writer",
        "CREATE DATABASE copied OWNER writer",
        "ALTER SYSTEM SET synchronous_commit = off",
        "ALTER SYSTEM SET log_statement = 'all'",
    ] {
        sqlx::query(statement).execute(&mut admin).await.unwrap();
    }
    // The superuser of the test keeps trust; `writer` must give its password.
    std::fs::write(
        pg.data().join("pg_hba.conf"),
        "local all syncgate trust\nlocal all writer scram-sha-256\n",
    )
    .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut admin)
        .await
        .unwrap();
    let url = |db: &str| {
        format!(
            "postgres://writer@localhost:{}/{db}?host={}",
            pg.port,
            pg.dir.path().display()
        )
    };

    let Err(e) = Store::open(&url("secured")).await else {
        panic!("opened with no password");
    };
    assert!(format!("{e:#}").contains("password"), "{e:#}");
    let Err(e) = Store::connect(
        &url("secured"),
        Some(&syncgate::core::Secret::new("wrong-pw")),
        None,
    )
    .await
    else {
        panic!("opened with a wrong password");
    };
    assert!(!format!("{e:#}").contains("wrong-pw"), "{e:#}");

    let store = Store::connect(
        &url("secured"),
        Some(&syncgate::core::Secret::new("pw-4be1c7")),
        None,
    )
    .await
    .expect("opened with the password given apart");
    let op = begin(&store, "p").await;
    store
        .commit_intent(op, OpState::Committed, &Outcome::default())
        .await
        .unwrap();
    assert_eq!(store.last_seq().await.unwrap(), 1);
    store.close().await;
    let log = std::fs::read_to_string(pg.dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("SET synchronous_commit = 'on'"),
        "no connection asked for synchronous commits:\n{log}"
    );
    assert!(
        !log.contains("pw-4be1c7"),
        "the password is in the server's log"
    );

    // From PGPASSFILE, through the command line.
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("pgpass");
    std::fs::write(&passfile, "*:*:*:writer:pw-4be1c7\n").unwrap();
    std::fs::set_permissions(
        &passfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (from, to) = (url("secured"), url("copied"));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_syncgate"))
            .args(["oplog", "copy", "--from", &from, "--to", &to])
            .env("PGPASSFILE", &passfile)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("last seq 1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Random campaigns, resignations, deaths and fenced writes by three
/// replicas, some writing through the fenced store of a lease they have
/// lost: at most one lease is current, each election moves the epoch on by
/// one, a fenced write lands exactly when its epoch is the current one (a
/// deposed leader's writes are refused by the database), and what is
/// written is exactly what the model says landed.
/// The seed is printed; `SYNCGATE_LEADER_SEED=N` replays it.
#[tokio::test]
async fn leadership_chaos() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let seed = crate::helpers::seed_from("SYNCGATE_LEADER_SEED");
    println!("leadership_chaos seed {seed} (SYNCGATE_LEADER_SEED={seed} replays it)");
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let url = pg.database("oplog_chaos").await;
    let mut procs = Vec::new();
    for p in 0..3 {
        let store = Store::open(&url).await.unwrap();
        let presence = store
            .join(&format!("p{p}"), None, None, false)
            .await
            .unwrap();
        procs.push((store, presence));
    }
    // The model: which process holds the live lease, and the fenced store
    // each process believes it leads through (kept after it lost the lease).
    let mut leases: Vec<Option<syncgate::store::Lease>> = vec![None, None, None];
    let mut believed: Vec<Option<(i64, Store)>> = vec![None, None, None];
    let mut live: Option<usize> = None;
    let mut epoch = 0i64;
    let mut landed = BTreeSet::new();
    for step in 0..200 {
        let p = next(3) as usize;
        match next(4) {
            0 => {
                let name = format!("p{p}");
                let got = procs[p].0.campaign(&name).await.unwrap();
                let lease = match (got, live) {
                    (Some(l), None) => l,
                    (Some(_), Some(holder)) => {
                        panic!("step {step}: p{p} elected while p{holder} leads (seed {seed})")
                    }
                    (None, Some(_)) => continue,
                    // The last holder's close may not be seen yet: try
                    // again until it is (a lock is never held for ever).
                    (None, None) => loop {
                        if let Some(l) = procs[p].0.campaign(&name).await.unwrap() {
                            break l;
                        }
                        tokio::task::yield_now().await;
                    },
                };
                epoch += 1;
                assert_eq!(
                    lease.epoch, epoch,
                    "step {step}: one more epoch per election"
                );
                let fenced = procs[p].0.fenced(lease.epoch).await.unwrap();
                if let Some((_, old)) = believed[p].replace((lease.epoch, fenced)) {
                    old.close().await;
                }
                leases[p] = Some(lease);
                live = Some(p);
            }
            1 => {
                // The process loses its lease (resigns, or dies: its
                // connection dropped): it keeps its fenced store, whose
                // writes land until another is elected (nobody else leads
                // meanwhile), then are refused.
                if let Some(l) = leases[p].take() {
                    if next(2) == 0 {
                        l.resign().await;
                    } else {
                        drop(l);
                    }
                    live = None;
                }
            }
            _ => {
                let Some((e, fenced)) = &believed[p] else {
                    continue;
                };
                let edge = format!("s{step}");
                let r = fenced.register_edge(&edge, true).await;
                if *e == epoch {
                    r.unwrap_or_else(|err| panic!("step {step}: p{p} at the current epoch: {err}"));
                    landed.insert(edge);
                } else {
                    let err = r.expect_err("a write at an old epoch landed").to_string();
                    assert!(
                        err.contains("deposed"),
                        "step {step}: p{p} wrote at epoch {e}, current {epoch} (seed {seed}): {err}"
                    );
                }
            }
        }
        let leader = procs[0].0.leader().await.unwrap();
        assert_eq!(leader.epoch, epoch, "step {step}");
    }
    let written: BTreeSet<String> = procs[1]
        .0
        .edges()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(
        written, landed,
        "exactly the writes at the current epoch (seed {seed})"
    );
    println!("leadership_chaos: {epoch} elections in 200 steps");
}

impl Postgres {
    /// Stops the server (as a restart or a failover does), keeping its data.
    pub fn stop(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", data.to_str().unwrap(), "-m", "fast", "-w", "stop"],
        );
    }

    /// Starts it again on the same port.
    pub fn restart(&self) {
        self.launch();
    }
}

/// While PostgreSQL is down a capture fails (nothing is answered as
/// logged), and once it is back the same store takes writes again by
/// itself, with no seq lost or reused and every op answered before still
/// there.
#[tokio::test]
async fn captures_fail_while_the_database_is_down_and_resume_by_themselves() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("oplog_restart").await;
    let log = Store::open(&url).await.unwrap();
    let capture = |name: &'static str| {
        let log = log.clone();
        async move {
            let (path, body) = intent(name);
            let id = log
                .begin_intent(&syncgate::store::NewIntent {
                    method: "POST",
                    path: &path,
                    class: "resource",
                    kind: "project",
                    body: Some(&body),
                    refs: "[]",
                    traceparent: None,
                    touches: &[],
                })
                .await
                .ok()?;
            log.commit_intent(id, OpState::Committed, &Outcome::default())
                .await
                .ok()
        }
    };
    assert_eq!(capture("before").await, Some(1));
    pg.stop();
    assert_eq!(
        capture("while-down").await,
        None,
        "nothing logged while down"
    );
    pg.restart();
    // The pool's connections died with the server: new ones are made.
    let seq = until("captures after the restart", || capture("after")).await;
    assert_eq!(seq, 2, "no seq lost or reused");
    let logged = log
        .list_ops(&OpFilter {
            after: 0,
            limit: 10,
            kind: None,
            state: None,
            through: None,
        })
        .await
        .unwrap();
    assert_eq!(logged.iter().map(|o| o.seq).collect::<Vec<_>>(), [1, 2]);
}

/// An election waits for a fenced write in flight at the old epoch: that
/// write commits first, and once the new epoch is current no write at the
/// old one commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_election_waits_for_a_fenced_write_in_flight() {
    use sqlx::Connection;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("oplog_fence").await;
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let lease = a.campaign("central-a").await.unwrap().unwrap();
    let first = lease.epoch;
    // A write of a's duties in flight: past its fence, not committed yet.
    let mut inflight = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(&format!("SET syncgate.epoch = '{first}'"))
        .execute(&mut inflight)
        .await
        .unwrap();
    let mut tx = inflight.begin().await.unwrap();
    sqlx::query("INSERT INTO meta (key, value) VALUES ('published_seq', 4)")
        .execute(&mut *tx)
        .await
        .unwrap();
    drop(lease);
    let election = tokio::spawn(async move {
        until("b elected", || async {
            b.campaign("central-b").await.unwrap()
        })
        .await
        .epoch
    });
    // The election's epoch update waits on the write's fence.
    let watch = sqlx::PgPool::connect(&url).await.unwrap();
    until("the election waiting on the fence", || {
        let watch = watch.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE leader%'",
            )
            .fetch_one(&watch)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        }
    })
    .await;
    assert!(
        !election.is_finished(),
        "elected past a fenced write in flight"
    );
    tx.commit().await.unwrap();
    let epoch = election.await.unwrap();
    assert_eq!(epoch, first + 1);
    assert_eq!(
        a.published_seq().await.unwrap(),
        4,
        "the write in flight landed"
    );
    let late = a.fenced(first).await.unwrap().mark_published(9).await;
    assert!(
        late.as_ref()
            .is_err_and(|e| e.to_string().contains("deposed")),
        "{late:?}"
    );
    assert_eq!(a.published_seq().await.unwrap(), 4);
}

/// A replica of central on a PostgreSQL op log, started beside others.
struct Replica {
    proxy: String,
    admin: String,
    running: Option<crate::sync::Running>,
}

impl Replica {
    async fn start(config: &syncgate::CentralConfig) -> Replica {
        let mut config = config.clone();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.admin_listen = "127.0.0.1:0".parse().unwrap();
        let central = syncgate::Central::build(config).await.unwrap();
        let proxy = format!("http://{}", central.proxy_addr());
        let admin = format!("http://{}", central.admin_addr());
        let running = crate::sync::Running::spawn(|rx| {
            central.run(async {
                let _ = rx.await;
            })
        });
        Replica {
            proxy,
            admin,
            running: Some(running),
        }
    }
}

async fn status(http: &reqwest::Client, admin: &str) -> Option<serde_json::Value> {
    http.get(format!("{admin}/v1/status"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The replica that leads, once exactly one of `admins` says it does and
/// the database agrees: its index and epoch.
async fn the_leader(http: &reqwest::Client, admins: &[Option<String>]) -> (usize, i64) {
    leader_after(http, admins, 0).await
}

/// The same, once it leads at an epoch after `epoch`.
async fn leader_after(
    http: &reqwest::Client,
    admins: &[Option<String>],
    epoch: i64,
) -> (usize, i64) {
    let after = epoch;
    until("exactly one replica leading", || async {
        let mut leading = Vec::new();
        let mut said = None;
        for (i, admin) in admins.iter().enumerate() {
            let Some(admin) = admin else { continue };
            let s = status(http, admin).await?;
            if s["op_log"]["leads"] == true {
                leading.push((i, s["op_log"]["epoch"].as_i64()?));
            }
            said = Some(s["leader"]["epoch"].as_i64()?);
        }
        match leading[..] {
            [(i, epoch)] if said == Some(epoch) && epoch > after => Some((i, epoch)),
            _ => None,
        }
    })
    .await
}

/// The subscriptions on central's answer inbox of the connections named
/// `syncgate-central` on a nats-server's `/connz?subs=detail` page: one entry
/// per such connection, whether it holds one.
fn inbox_holders(connz: &serde_json::Value) -> Vec<bool> {
    connz["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == "syncgate-central")
        .map(|c| {
            c["subscriptions_list_detail"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| s["subject"] == "syncgate.inbox.central.*.*")
        })
        .collect()
}

/// Answers to central's requests (resync steps, state reads, outcome
/// requests) are read by the replica that leads only: one that does not
/// holds no subscription on central's answer inbox (an answer meant for the
/// leader is never delivered to, or dropped by, another), and once the
/// leader is gone the replica elected in its place holds it. Read from a
/// real nats-server's monitoring page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_leading_replica_subscribes_to_central_s_answer_inbox() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let Some(bin) = crate::sync::nats_server_path() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut node = crate::nats_cluster::Node::start(&bin, dir.path(), "n1", String::new()).await;
    let url = pg.database("inbox").await;
    let mut base = None;
    let mut env = crate::sync::sync_env(&["edge-a"], Some(node.url()), |c| {
        c.db = url.clone();
        base = Some(c.clone());
    })
    .await;
    let mut other = Replica::start(&base.unwrap()).await;
    let http = env.http.clone();
    let mut admins = [Some(env.admin.clone()), Some(other.admin.clone())];
    let (leader, epoch) = the_leader(&http, &admins).await;
    node.until(
        "two central connections, one holding the answer inbox",
        "/connz?subs=detail",
        |c| {
            let mut held = inbox_holders(c);
            held.sort();
            held == [false, true]
        },
    )
    .await;
    // The leader goes; the other replica leads and reads the answers.
    match other.running.take() {
        Some(r) if leader == 1 => r.kill().await,
        r => {
            other.running = r;
            env.kill_central().await;
        }
    }
    admins[leader] = None;
    let (now, _) = leader_after(&http, &admins, epoch).await;
    assert_eq!(now, 1 - leader);
    node.until(
        "the elected replica holding the answer inbox",
        "/connz?subs=detail",
        |c| inbox_holders(c) == [true],
    )
    .await;
    if let Some(r) = other.running.take() {
        r.stop().await;
    }
    drop(env);
    node.kill().await;
    pg.stop();
}

/// Three central replicas on one PostgreSQL op log and a real nats-server:
/// every replica captures, one leads (publishing, acks); writes go through
/// all three at once, among them concurrent updates of one project through
/// two replicas; the leader is killed mid-stream. Another is elected (a
/// later epoch), nothing acknowledged is lost, seqs stay gap-free, the edge
/// applies each create once and ends equal to central, and the audit of any
/// replica says so. Actions only the leader does, sent to another replica,
/// are answered by the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn central_replicas_on_one_postgresql_capture_lead_once_and_fail_over() {
    use serde_json::json;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let Some(nats) = crate::sync::nats_server_path() else {
        return;
    };
    if std::env::var_os("SYNCGATE_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("syncgate=info"))
            .with_test_writer()
            .try_init();
    }
    let (mut nats, addr) = crate::sync::spawn_nats_server(&nats).await;
    let url = pg.database("replicas").await;
    let mut base = None;
    let mut env = crate::sync::sync_env(&["edge-a"], Some(format!("nats://{addr}")), |c| {
        c.db = url.clone();
        base = Some(c.clone());
    })
    .await;
    let base = base.unwrap();
    let mut replicas = vec![Replica {
        proxy: env.proxy.clone(),
        admin: env.admin.clone(),
        running: None,
    }];
    for _ in 0..2 {
        replicas.push(Replica::start(&base).await);
    }
    let http = env.http.clone();
    let admins: Vec<Option<String>> = replicas.iter().map(|r| Some(r.admin.clone())).collect();
    let (leader, epoch) = the_leader(&http, &admins).await;
    let s = status(&http, &replicas[0].admin).await.unwrap();
    assert_eq!(s["replicas"].as_array().map(Vec::len), Some(3), "{s}");

    // An action only the leader does, sent to a replica that does not lead.
    let other = (leader + 1) % 3;
    let resp = http
        .post(format!(
            "{}/v1/drift/run?edge=edge-a",
            replicas[other].admin
        ))
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert!(
        code == 202 || text.contains("no service credentials"),
        "{code}: {text}"
    );

    let token = env.token().to_string();
    let (client, token) = (http.clone(), token);
    let write =
        move |proxy: String, method: &'static str, path: String, body: serde_json::Value| {
            let http = client.clone();
            let token = token.clone();
            async move {
                http.request(method.parse().unwrap(), format!("{proxy}{path}"))
                    .header("x-auth-token", token)
                    .json(&body)
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().as_u16())
            }
        };
    let shared = env
        .create(
            "/v3/projects",
            "project",
            json!({"project": {"name": "shared"}}),
        )
        .await;
    // Writers through every replica at once: creates, and updates of one
    // project through two of them.
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut writers = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let (proxy, acked) = (r.proxy.clone(), acknowledged.clone());
        let creates = write.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..25 {
                let name = format!("p-{i}-{n}");
                let body = json!({"project": {"name": name}});
                match creates(proxy.clone(), "POST", "/v3/projects".into(), body).await {
                    Some(201) => acked.lock().unwrap().push(name),
                    // The replica was killed: its writers stop.
                    None => return,
                    Some(_) => {}
                }
            }
        }));
        if i < 2 {
            let (proxy, shared) = (r.proxy.clone(), shared.clone());
            let write = write.clone();
            writers.push(tokio::spawn(async move {
                for n in 0..10 {
                    let body = json!({"project": {"description": format!("from {i}, {n}")}});
                    if write(
                        proxy.clone(),
                        "PATCH",
                        format!("/v3/projects/{shared}"),
                        body,
                    )
                    .await
                    .is_none()
                    {
                        return;
                    }
                }
            }));
        }
    }
    // The leader killed mid-stream.
    let survivor = Replica {
        proxy: replicas[(leader + 1) % 3].proxy.clone(),
        admin: replicas[(leader + 1) % 3].admin.clone(),
        running: None,
    };
    let last = |admin: String| {
        let http = http.clone();
        async move {
            let ops: serde_json::Value = http
                .get(format!("{admin}/v1/ops?after=0&limit=1000"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(ops["ops"].as_array()?.len())
        }
    };
    until("writes under way", || async {
        (last(survivor.admin.clone()).await? >= 20).then_some(())
    })
    .await;
    match replicas[leader].running.take() {
        Some(r) => r.kill().await,
        None => env.kill_central().await,
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut admins = admins;
    admins[leader] = None;
    let (new_leader, new_epoch) = the_leader(&http, &admins).await;
    assert_ne!(new_leader, leader);
    assert!(new_epoch > epoch, "{new_epoch} after {epoch}");

    // The survivors answer the audit; the edge ends equal to central.
    env.proxy = survivor.proxy.clone();
    env.admin = survivor.admin.clone();
    // A write the leader had forwarded when it was killed is settled as an
    // unknown outcome: applied, or skipped at the edge when it never landed.
    env.assert_in_sync_with(&["applied", "adopted", "skipped"])
        .await;
    let ops = last(survivor.admin.clone()).await.unwrap() as i64;
    assert_eq!(env.last_seq().await, ops, "seqs are gap-free: 1..={ops}");
    let all: serde_json::Value = http
        .get(format!("{}/v1/ops?after=0&limit=1000", survivor.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // In seq order: the order they were applied at central.
    let in_seq_order: Vec<String> = all["ops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["method"] == "POST")
        .filter_map(|o| o["body"]["project"]["name"].as_str().map(str::to_string))
        .collect();
    let names: BTreeSet<String> = in_seq_order.iter().cloned().collect();
    for name in acknowledged.lock().unwrap().iter() {
        assert!(
            names.contains(name),
            "{name} was acknowledged and is not logged"
        );
    }
    let central_creates = env.central_site.creates_of("project");
    let edge = &env.edges[0].site;
    assert_eq!(
        edge.create_requests("projects"),
        central_creates,
        "each project central made was created once at the edge"
    );
    // Nothing published out of order across the failover: the edge made
    // them in seq order (an op skipped at the edge, its write never having
    // landed, is left out of both).
    let edge_order = edge.create_order("projects");
    assert!(edge_order.len() > 1, "{edge_order:?}");
    let central_order: Vec<String> = in_seq_order
        .iter()
        .filter(|n| edge_order.contains(n))
        .cloned()
        .collect();
    assert_eq!(edge_order, central_order, "the edge applied in seq order");
    for r in &mut replicas {
        if let Some(running) = r.running.take() {
            running.stop().await;
        }
    }
    env.shutdown().await;
    let _ = nats.kill().await;
}

/// PostgreSQL restarted under a running central (as Patroni or a managed
/// service does it): while the op log is down a write is answered 503 and
/// never forwarded, a read keeps flowing; a write forwarded just before is
/// answered 503 (it could not be recorded) and logged, as the committed op
/// it is, once the database is back; captures resume by themselves, and
/// every write answered 2xx is an op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_under_central_refuses_writes_keeps_reads_and_resumes() {
    use serde_json::json;
    let Some(pg) = Postgres::start() else {
        return;
    };
    if std::env::var_os("SYNCGATE_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("syncgate=info"))
            .with_test_writer()
            .try_init();
    }
    let url = pg.database("pg_restart").await;
    let fake = crate::fake_keystone::FakeKeystone::start().await;
    let mut config = crate::helpers::config_for(&fake, &url);
    config.upstream_timeout = std::time::Duration::from_secs(30);
    let app = crate::helpers::start(fake, config).await;
    let project = |name: &str| json!({"project": {"name": name}});
    let resp = app
        .write("POST", "/v3/projects", Some(project("before")))
        .await;
    assert_eq!(resp.status(), 201);

    // A write whose answer is late: its intent is durable, the database
    // goes down before its op can be.
    let held = app
        .client
        .post(app.url("/v3/projects"))
        .header("x-auth-token", "client-token-abc")
        .header("x-fake-delay-ms", "1500")
        .json(&project("in-flight"));
    let before = app.fake.count();
    let answer = tokio::spawn(held.send());
    until("the write reaching upstream", || async {
        (app.fake.count() > before).then_some(())
    })
    .await;
    pg.stop();

    refused_unforwarded(&app, project("while-down")).await;
    let read = app
        .client
        .get(app.url("/v3/projects"))
        .header("x-auth-token", "client-token-abc")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200, "reads keep flowing");
    let resp = answer.await.unwrap().unwrap();
    assert_eq!(resp.status(), 503);
    let text = resp.text().await.unwrap();
    assert!(text.contains("could not record it"), "{text}");

    pg.restart();
    let after = until("a write captured after the restart", || async {
        let resp = app
            .write("POST", "/v3/projects", Some(project("after")))
            .await;
        match resp.status().as_u16() {
            201 => Some(()),
            503 => None,
            other => panic!("{other}: {}", resp.text().await.unwrap()),
        }
    });
    tokio::time::timeout(std::time::Duration::from_secs(60), after)
        .await
        .expect("captures resume within a minute");
    let ops = until("the in-flight write logged", || async {
        let ops = app.all_ops().await;
        (ops.len() >= 3).then_some(ops)
    })
    .await;
    let names: Vec<(String, String)> = ops
        .iter()
        .map(|o| {
            (
                o["state"].as_str().unwrap_or_default().to_string(),
                o["body"]["project"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    let expected: Vec<(String, String)> = ["after", "before", "in-flight"]
        .iter()
        .map(|n| ("committed".to_string(), n.to_string()))
        .collect();
    assert_eq!(sorted, expected, "one op per forwarded write: {ops:#?}");
    app.stop().await;
}

/// PostgreSQL restarts under two central replicas and an edge (as Patroni
/// or a managed service restarts it): while it is down every replica answers
/// writes 503 with nothing forwarded and keeps answering reads; once it is
/// back both capture again by themselves, a leader is elected anew (a new
/// epoch: the old one's lock went with its session), publishing resumes, and
/// the edge ends equal to central with every op applied once, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgresql_restart_under_replicas_and_an_edge_resumes_capture_lead_and_sync() {
    use serde_json::json;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let Some(nats) = crate::sync::nats_server_path() else {
        return;
    };
    let (mut nats, addr) = crate::sync::spawn_nats_server(&nats).await;
    let url = pg.database("replicas_restart").await;
    let mut base = None;
    let env = crate::sync::sync_env(&["edge-a"], Some(format!("nats://{addr}")), |c| {
        c.db = url.clone();
        base = Some(c.clone());
    })
    .await;
    let mut other = Replica::start(&base.unwrap()).await;
    let http = env.http.clone();
    let admins = [Some(env.admin.clone()), Some(other.admin.clone())];
    let (_, epoch) = the_leader(&http, &admins).await;
    let proxies = [env.proxy.clone(), other.proxy.clone()];
    let token = env.token().to_string();
    let create = |proxy: &str, name: String| {
        http.post(format!("{proxy}/v3/projects"))
            .header("x-auth-token", &token)
            .json(&json!({"project": {"name": name}}))
            .send()
    };
    for (i, proxy) in proxies.iter().enumerate() {
        let resp = create(proxy, format!("before-{i}")).await.unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
    }
    env.assert_in_sync().await;

    pg.stop();
    let writes = env.central_site.writes();
    for (i, proxy) in proxies.iter().enumerate() {
        let resp = create(proxy, format!("down-{i}")).await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("nothing was forwarded"), "{text}");
        let read = http
            .get(format!("{proxy}/v3/projects"))
            .header("x-auth-token", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(read.status(), 200, "reads keep flowing through replica {i}");
    }
    assert_eq!(
        env.central_site.writes(),
        writes,
        "a refused write is never forwarded"
    );

    pg.restart();
    for (i, proxy) in proxies.iter().enumerate() {
        until("a write captured after the restart", || async {
            let resp = create(proxy, format!("after-{i}")).await.ok()?;
            match resp.status().as_u16() {
                201 => Some(()),
                503 => None,
                other => panic!("{other}: {}", resp.text().await.unwrap()),
            }
        })
        .await;
    }
    // The leader finds its lock gone with its session within a second or
    // two, and one is elected anew.
    leader_after(&http, &admins, epoch).await;
    env.create(
        "/v3/projects",
        "project",
        json!({"project": {"name": "last"}}),
    )
    .await;
    env.assert_in_sync().await;

    let edge = &env.edges[0].site;
    assert_eq!(
        edge.create_requests("projects"),
        env.central_site.creates_of("project"),
        "each project created once at the edge"
    );
    let ops = env.audit("/v1/ops?after=0&limit=1000").await;
    let in_seq_order: Vec<String> = ops["ops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["method"] == "POST")
        .filter_map(|o| o["body"]["project"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        in_seq_order,
        ["before-0", "before-1", "after-0", "after-1", "last"],
        "one op per write forwarded, none for a refused one"
    );
    assert_eq!(edge.create_order("projects"), in_seq_order, "in seq order");
    if let Some(r) = other.running.take() {
        r.stop().await;
    }
    env.shutdown().await;
    let _ = nats.kill().await;
}

/// The server ends the session central's writer keeps between batches (an
/// administrator, a pooler's idle timeout, a failover of a proxy in front):
/// the next writes are captured on a new session, none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writers_session_ended_by_the_server_fails_no_write() {
    use sqlx::Connection;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("ended_session").await;
    let app = central_with_one_write(&url).await;
    // The writers' sessions, named for their writer: central's (and its
    // leader's).
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    let ended: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND application_name LIKE 'syncgate writer %'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(ended > 0, "no session of central's writer found");
    for name in ["second", "third"] {
        let resp = app.write("POST", "/v3/projects", Some(project(name))).await;
        let status = resp.status();
        assert_eq!(status, 201, "{}", resp.text().await.unwrap());
    }
    assert_eq!(logged_names(&app).await, ["first", "second", "third"]);
    app.stop().await;
}

/// The answer to a batch's call lost after the server made it (the
/// connection broken as it came): what the call did is read back from the
/// op log and its writes answered as made, an opening and a commit alike;
/// nothing is written twice, none is lost, no intent is left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_answer_is_lost_is_settled_from_the_op_log() {
    use sqlx::Connection;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let direct = pg.database("lost_answer").await;
    let cutter = AnswerCutter::start(&pg).await;
    let app = central_with_one_write(&cutter.url(&pg, "lost_answer")).await;
    // An opening's rows name its method; a commit's its state.
    let cuts: [(&str, &[u8]); 2] = [
        ("opened", br#""method":"POST""#),
        ("committed", br#""state":"committed""#),
    ];
    for (n, (name, marker)) in cuts.into_iter().enumerate() {
        cutter.arm(marker, true);
        let resp = app.write("POST", "/v3/projects", Some(project(name))).await;
        let status = resp.status();
        assert_eq!(status, 201, "{}", resp.text().await.unwrap());
        assert_eq!(
            cutter.cuts(),
            n + 1,
            "the answer to the {name} call was cut"
        );
    }
    assert_eq!(app.fake.count(), 3, "each write forwarded once");
    assert_eq!(logged_names(&app).await, ["first", "opened", "committed"]);
    let mut conn = sqlx::PgConnection::connect(&direct).await.unwrap();
    let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM intents")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(open, 0, "no intent left open");
    app.stop().await;
}

/// A batch's connection broken while the server still runs its call (it
/// waits for a lock here, not knowing its client gone): the call's session
/// is ended before the op log is read, so that the call cannot commit
/// after it was found not done and written again. The write is logged
/// once and answered as logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_still_running_when_its_connection_broke_is_ended_before_it_is_settled() {
    use sqlx::Connection;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let direct = pg.database("running_call").await;
    let cutter = AnswerCutter::start(&pg).await;
    let app = Arc::new(central_with_one_write(&cutter.url(&pg, "running_call")).await);
    // The head row held: the next commit's call waits for it.
    let mut holder = sqlx::PgConnection::connect(&direct).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT seq FROM oplog_head WHERE id = 1 FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    // The writers' sessions (central's, and its leader's), each kept
    // between batches, named for their writer.
    let mut watcher = sqlx::PgConnection::connect(&direct).await.unwrap();
    let kept: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
           AND application_name LIKE 'syncgate writer %'",
    )
    .fetch_all(&mut watcher)
    .await
    .unwrap();
    assert!(!kept.is_empty(), "no writer's session found");
    cutter.arm(br#""state":"committed""#, false);
    let writer = app.clone();
    let second = tokio::spawn(async move {
        let resp = writer
            .write("POST", "/v3/projects", Some(project("second")))
            .await;
        (resp.status(), resp.text().await.unwrap())
    });
    // The commit's call, cut at once, waits for the head row on its kept
    // session; written again on a new one, it waits there too: by then the
    // first is ended, not waiting beside it (to commit once the row is let
    // go, after the op log was read).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the commit was not written again"
        );
        let waiting: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
               AND wait_event_type = 'Lock' AND query LIKE '%FROM pg_temp.sg_batch_%'",
        )
        .fetch_all(&mut watcher)
        .await
        .unwrap();
        if waiting.iter().any(|pid| !kept.contains(pid)) {
            assert!(
                waiting.iter().all(|pid| !kept.contains(pid)),
                "the broken call still waits beside its rerun"
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    let (status, text) = second.await.unwrap();
    assert_eq!(status, 201, "{text}");
    assert_eq!(cutter.cuts(), 1);
    assert_eq!(logged_names(&app).await, ["first", "second"]);
    let open: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM intents")
        .fetch_one(&mut watcher)
        .await
        .unwrap();
    assert_eq!(open, 0, "no intent left open");
    let Ok(app) = Arc::try_unwrap(app) else {
        panic!("the app is still shared")
    };
    app.stop().await;
}

/// A relay to the test server's socket that, once armed with a marker,
/// passes the next message that carries it and lets the server answer it
/// whole (to its ReadyForQuery: the call made and committed), then closes
/// the connection without passing the answer on.
struct AnswerCutter {
    dir: tempfile::TempDir,
    armed: Arc<std::sync::Mutex<Option<Cut>>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
    accept: tokio::task::AbortHandle,
}

/// Where `AnswerCutter` cuts: after the message with this marker, once the
/// server has answered it (`answered`) or at once.
struct Cut {
    marker: Vec<u8>,
    answered: bool,
}

impl AnswerCutter {
    async fn start(pg: &Postgres) -> AnswerCutter {
        let dir = tempfile::tempdir().unwrap();
        let socket = format!(".s.PGSQL.{}", pg.port);
        let listener = tokio::net::UnixListener::bind(dir.path().join(&socket)).unwrap();
        let target = pg.dir.path().join(&socket);
        let armed: Arc<std::sync::Mutex<Option<Cut>>> = Arc::default();
        let cuts: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let (a, c) = (armed.clone(), cuts.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(server) = tokio::net::UnixStream::connect(&target).await {
                    tokio::spawn(Self::relay(client, server, a.clone(), c.clone()));
                }
            }
        })
        .abort_handle();
        AnswerCutter {
            dir,
            armed,
            cuts,
            accept,
        }
    }

    fn url(&self, pg: &Postgres, name: &str) -> String {
        format!(
            "postgres://syncgate@localhost:{}/{name}?host={}",
            pg.port,
            self.dir.path().display()
        )
    }

    fn arm(&self, marker: &[u8], answered: bool) {
        *self.armed.lock().unwrap() = Some(Cut {
            marker: marker.to_vec(),
            answered,
        });
    }

    fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }

    async fn relay(
        client: tokio::net::UnixStream,
        server: tokio::net::UnixStream,
        armed: Arc<std::sync::Mutex<Option<Cut>>>,
        cuts: Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let (mut up, mut down) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        let mut cutting = false;
        let mut at_once = false;
        // What the client sent last, a marker split over two reads found.
        let mut seen: Vec<u8> = Vec::new();
        loop {
            tokio::select! {
                n = cr.read(&mut up) => {
                    let Ok(n @ 1..) = n else { return };
                    let chunk = &up[..n];
                    {
                        let mut cut = armed.lock().unwrap();
                        let m = cut.as_ref().map(|c| c.marker.as_slice()).unwrap_or_default();
                        // Only what was sent since it was armed counts.
                        if m.is_empty() {
                            seen.clear();
                        } else {
                            seen.drain(..seen.len().saturating_sub(m.len() - 1));
                            seen.extend_from_slice(chunk);
                        }
                        if !m.is_empty() && seen.windows(m.len()).any(|w| w == m) {
                            seen.clear();
                            at_once = cut.take().is_some_and(|c| !c.answered);
                            cutting = true;
                        }
                    }
                    if sw.write_all(chunk).await.is_err() {
                        return;
                    }
                    if at_once {
                        cuts.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                n = sr.read(&mut down) => {
                    let Ok(n @ 1..) = n else { return };
                    let chunk = &down[..n];
                    if cutting {
                        // ReadyForQuery, idle: the call is over, committed.
                        if chunk.ends_with(b"Z\0\0\0\x05I") {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    } else if cw.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for AnswerCutter {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Central on `url` in front of a fake Keystone, with one project
/// ("first") created through it.
async fn central_with_one_write(url: &str) -> crate::helpers::TestApp {
    let fake = crate::fake_keystone::FakeKeystone::start().await;
    let config = crate::helpers::config_for(&fake, url);
    let app = crate::helpers::start(fake, config).await;
    let resp = app
        .write("POST", "/v3/projects", Some(project("first")))
        .await;
    assert_eq!(resp.status(), 201);
    app
}

/// A project create's body.
fn project(name: &str) -> serde_json::Value {
    serde_json::json!({"project": {"name": name}})
}

/// The names of the projects in the op log's ops, in seq order.
async fn logged_names(app: &crate::helpers::TestApp) -> Vec<String> {
    app.all_ops()
        .await
        .iter()
        .map(|o| {
            o["body"]["project"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// A create through `app` is answered 503 and never forwarded.
async fn refused_unforwarded(app: &crate::helpers::TestApp, body: serde_json::Value) {
    let forwarded = app.fake.count();
    let resp = app.write("POST", "/v3/projects", Some(body)).await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("nothing was forwarded"), "{text}");
    assert_eq!(
        app.fake.count(),
        forwarded,
        "a refused write is never forwarded"
    );
}

fn intent(name: &str) -> (String, String) {
    (
        "/v3/projects".to_string(),
        serde_json::json!({"project": {"name": name}}).to_string(),
    )
}

/// Three replicas (a, b, c) joined on the database at `url`, and their
/// presences.
async fn replicas_on(url: &str) -> ([Store; 3], [syncgate::store::Presence; 3]) {
    let mut stores = Vec::new();
    let mut presences = Vec::new();
    for name in ["a", "b", "c"] {
        let store = Store::open(url).await.unwrap();
        presences.push(store.join(name, None, None, false).await.unwrap().unwrap());
        stores.push(store);
    }
    let (Ok(stores), Ok(presences)) = (stores.try_into(), presences.try_into()) else {
        unreachable!("three of each")
    };
    (stores, presences)
}

/// The seqs the leader logs once it finds a replica gone (the server sees
/// a dropped connection's session end a moment later).
async fn settled(fenced: &Store, lease: &mut syncgate::store::Lease) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let seqs = fenced.settle_gone(lease).await.unwrap();
        if !seqs.is_empty() {
            return seqs;
        }
        assert!(tokio::time::Instant::now() < deadline, "no intent settled");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn begin(store: &syncgate::store::Store, name: &str) -> uuid::Uuid {
    let (path, body) = intent(name);
    store
        .begin_intent(&syncgate::store::NewIntent {
            method: "POST",
            path: &path,
            class: "resource",
            kind: "project",
            body: Some(&body),
            refs: "[]",
            traceparent: None,
            touches: &[],
        })
        .await
        .unwrap()
}

/// A replica killed with writes in flight: the leader finds it gone (its
/// presence lock free) and logs its open intents as `unknown_outcome`,
/// never those of a replica that lives; the dead replica's late commit finds
/// no intent, and the live one's commit takes the next seq.
#[tokio::test]
async fn a_gone_replicas_open_intents_are_settled_by_the_leader_and_a_live_ones_are_not() {
    use syncgate::store::{OpState, Outcome, StoreError};
    let Some(pg) = Postgres::start() else {
        return;
    };
    let ([a, b, c], [pa, _pb, _pc]) = replicas_on(&pg.database("settle").await).await;
    let from_a = begin(&a, "from-a").await;
    let from_b = begin(&b, "from-b").await;
    assert_eq!(
        a.open_intent_ids().await.unwrap(),
        vec![from_a],
        "a replica lists its own"
    );
    let mut lease = c.campaign("c").await.unwrap().unwrap();
    let fenced = c.fenced(lease.epoch).await.unwrap();
    assert_eq!(
        fenced.settle_gone(&mut lease).await.unwrap(),
        Vec::<i64>::new(),
        "the intents of live replicas are left alone"
    );
    drop(pa);
    let seqs = settled(&fenced, &mut lease).await;
    assert_eq!(seqs.len(), 1);
    let op = c.get_op(seqs[0]).await.unwrap().unwrap();
    assert_eq!(
        (op.op_id.as_str(), op.state.as_str()),
        (from_a.to_string().as_str(), "unknown_outcome")
    );
    assert_eq!(b.open_intent_ids().await.unwrap(), vec![from_b]);
    let names: Vec<String> = c
        .replicas()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(
        names,
        ["b", "c"],
        "a gone replica is forgotten once settled"
    );
    let late = a
        .commit_intent(from_a, OpState::Committed, &Outcome::default())
        .await;
    assert!(matches!(late, Err(StoreError::NoIntent(_))), "{late:?}");
    let seq = b
        .commit_intent(from_b, OpState::Committed, &Outcome::default())
        .await
        .unwrap();
    assert_eq!(seq, seqs[0] + 1);
}

/// The leader's duties write through a store fenced by its epoch: once
/// another replica is elected, the database refuses the deposed one's
/// writes to the leader's tables, while the new leader's, and writes no
/// leader makes (registering an edge from a hello, capture), go through.
#[tokio::test]
async fn a_deposed_leaders_writes_are_refused_by_the_database() {
    use syncgate::store::Store;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("fencing").await;
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    let _pa = a.join("a", None, None, false).await.unwrap().unwrap();
    let _pb = b.join("b", None, None, false).await.unwrap().unwrap();
    let lease_a = a.campaign("a").await.unwrap().unwrap();
    assert!(
        b.campaign("b").await.unwrap().is_none(),
        "one leader at a time"
    );
    let fa = a.fenced(lease_a.epoch).await.unwrap();
    fa.register_edge("site-1", true).await.unwrap();
    fa.mark_published(0).await.unwrap();
    lease_a.resign().await;
    let lease_b = until("b elected", || async { b.campaign("b").await.unwrap() }).await;
    assert_eq!(lease_b.epoch, 2);
    let fb = b.fenced(lease_b.epoch).await.unwrap();
    let refused = fa
        .register_edge("site-2", true)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("deposed"), "{refused}");
    let refused = fa.mark_published(1).await.unwrap_err().to_string();
    assert!(refused.contains("deposed"), "{refused}");
    fb.register_edge("site-2", true).await.unwrap();
    a.register_edge("site-3", false).await.unwrap();
    let leader = b.leader().await.unwrap();
    assert_eq!((leader.epoch, leader.holder.as_deref()), (2, Some("b")));
}

/// Writes that touch one entity are ordered across replicas: an intent is
/// refused while another replica's open intent shares a key one of the two
/// changes (the write waits), or while an op of the key is logged with an
/// outcome not yet resolved (`in_doubt`, the write is refused); keys only
/// referred to are shared; a replica's own intents never refuse its own; a
/// gone replica's intents hold their keys until settled, and then as writes
/// in doubt.
#[tokio::test]
async fn an_intent_is_refused_while_another_replica_writes_or_doubts_its_keys() {
    use syncgate::keystone::touches::Touch;
    use syncgate::store::{NewIntent, StoreError};
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("intent_keys").await;
    let ([a, b, c], [pa, _pb, _pc]) = replicas_on(&url).await;
    let t = |key: &str, exclusive: bool| Touch {
        key: key.into(),
        exclusive,
    };
    let open = |store: &Store, touches: Vec<Touch>| {
        let store = store.clone();
        async move {
            store
                .begin_intent(&NewIntent {
                    method: "PATCH",
                    path: "/v3/projects/p1",
                    class: "resource",
                    kind: "project",
                    body: Some("{}"),
                    refs: "[]",
                    traceparent: None,
                    touches: &touches,
                })
                .await
        }
    };
    let busy = |r: Result<uuid::Uuid, StoreError>| match r {
        Err(StoreError::Busy { in_doubt }) => Some(in_doubt),
        Ok(_) => None,
        Err(e) => panic!("{e}"),
    };
    let first = open(&a, vec![t("project:p1", true), t("domain:d", false)])
        .await
        .unwrap();
    assert_eq!(
        busy(open(&b, vec![t("project:p1", false)]).await),
        Some(false)
    );
    assert_eq!(
        busy(open(&b, vec![t("domain:d", false)]).await),
        None,
        "shared"
    );
    assert_eq!(busy(open(&b, vec![t("domain:d", true)]).await), Some(false));
    let own = open(&a, vec![t("project:p1", true)])
        .await
        .expect("its own never refuse it");
    a.drop_intent(own).await.unwrap();
    a.commit_intent(first, OpState::Committed, &Outcome::default())
        .await
        .unwrap();
    let second = open(&b, vec![t("project:p1", true)]).await.unwrap();
    // In doubt: its keys refuse writes until its outcome is resolved.
    let outcome = Outcome {
        touches: vec![t("project:p1", true)],
        ..Outcome::default()
    };
    let seq = b
        .commit_intent(second, OpState::UnknownOutcome, &outcome)
        .await
        .unwrap();
    assert_eq!(
        busy(open(&a, vec![t("project:p1", false)]).await),
        Some(true)
    );
    assert_eq!(busy(open(&a, vec![t("project:p2", true)]).await), None);
    // Concluded unresolvable (no way to look): in doubt still, until the
    // settle period has passed; found applied, no longer.
    let resolve = |to: &'static str| {
        let url = url.clone();
        async move {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query("UPDATE ops SET resolution = $1 WHERE seq = $2")
                .bind(to)
                .bind(seq)
                .execute(&mut c)
                .await
                .unwrap();
        }
    };
    resolve("unresolvable").await;
    assert_eq!(
        busy(open(&a, vec![t("project:p1", true)]).await),
        Some(true)
    );
    resolve("applied").await;
    let after = open(&a, vec![t("project:p1", true)])
        .await
        .expect("no longer in doubt");
    a.drop_intent(after).await.unwrap();
    // A replica gone with an intent open: its keys are held until it is
    // settled, then as a write in doubt.
    let held = open(&a, vec![t("user:u1", true)]).await.unwrap();
    drop(pa);
    assert_eq!(busy(open(&c, vec![t("user:u1", true)]).await), Some(false));
    let mut lease = c.campaign("c").await.unwrap().unwrap();
    let fenced = c.fenced(lease.epoch).await.unwrap();
    settled(&fenced, &mut lease).await;
    let settled = c
        .list_ops(&OpFilter {
            after: seq,
            limit: 10,
            kind: None,
            state: Some(OpState::UnknownOutcome),
            through: None,
        })
        .await
        .unwrap();
    assert!(
        settled.iter().any(|o| o.op_id == held.to_string()),
        "{settled:?}"
    );
    assert_eq!(busy(open(&c, vec![t("user:u1", true)]).await), Some(true));
}

/// With the embedded broker (which replicas cannot share) central holds its
/// PostgreSQL op log alone: another central is refused, saying why, whether
/// it has the embedded broker too or an external one; once the first is gone
/// (its connection closed, as a kill closes it) another starts. And replicas
/// with an external broker keep a central with the embedded one out.
#[tokio::test]
async fn a_central_with_the_embedded_broker_holds_its_op_log_alone() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("alone").await;
    let fake = crate::fake_keystone::FakeKeystone::start().await;
    let mut embedded = crate::helpers::config_for(&fake, &url);
    embedded.oplog_lock_wait = std::time::Duration::from_millis(300);
    let mut external = embedded.clone();
    external.broker = syncgate::settings::config::BrokerMode::External(
        syncgate::settings::config::parse_nats_urls("nats://127.0.0.1:4222").unwrap(),
    );
    let first = syncgate::Central::build(embedded.clone()).await.unwrap();
    for other in [&embedded, &external] {
        let refused = match syncgate::Central::build(other.clone()).await {
            Ok(_) => panic!("a second central started beside one with the embedded broker"),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            refused.contains("another central holds this op log alone")
                && refused.contains("--broker"),
            "{refused}"
        );
    }
    drop(first);
    let replica = until("the first gone", || async {
        syncgate::Central::build(external.clone()).await.ok()
    })
    .await;
    let refused = match syncgate::Central::build(embedded.clone()).await {
        Ok(_) => panic!("a central with the embedded broker started beside a replica"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("other central replicas run on this op log"),
        "{refused}"
    );
    drop(replica);
}

/// A replica whose presence is lost (its session ended on the server while
/// its other connections live) stops capturing at once: a write is answered
/// 503 and never forwarded, and it is not ready, until it holds its presence
/// again (here, once the test lets go of its lock); then it captures again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_its_presence_captures_nothing_until_it_holds_it_again() {
    use serde_json::json;
    use sqlx::Connection;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("presence").await;
    let fake = crate::fake_keystone::FakeKeystone::start().await;
    let config = crate::helpers::config_for(&fake, &url);
    let app = crate::helpers::start(fake, config).await;
    let project = |name: &str| json!({"project": {"name": name}});
    assert_eq!(
        app.write("POST", "/v3/projects", Some(project("before")))
            .await
            .status(),
        201
    );
    let status: serde_json::Value = app.admin_get("/v1/status").await.json().await.unwrap();
    let no = status["op_log"]["replica"].as_i64().unwrap();
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_locks \
         WHERE locktype = 'advisory' AND classid = 1397183056 AND objid = $1 AND granted",
    )
    .bind(no)
    .fetch_all(&mut holder)
    .await
    .unwrap();
    assert_eq!(ended, [true], "the presence's session");
    // Its lock, taken as soon as the ended session lets go of it.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        sqlx::query("SELECT pg_advisory_lock(1397183056, $1)")
            .bind(no as i32)
            .execute(&mut holder),
    )
    .await
    .expect("the ended session's lock")
    .unwrap();
    until("the replica not ready", || async {
        let r = app
            .client
            .get(format!("{}/readyz", app.admin))
            .send()
            .await
            .ok()?;
        (r.status() == 503).then_some(())
    })
    .await;
    refused_unforwarded(&app, project("while-absent")).await;
    holder.close().await.unwrap();
    until("the replica ready again", || async {
        let r = app
            .client
            .get(format!("{}/readyz", app.admin))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    assert_eq!(
        app.write("POST", "/v3/projects", Some(project("after")))
            .await
            .status(),
        201
    );
    assert_eq!(logged_names(&app).await, ["before", "after"]);
    app.stop().await;
}

/// An op log an earlier version made on PostgreSQL (its migrations, 0001 to
/// 0003, holding ops, an edge with its watermark, a learned entity and a
/// write that version left open) is taken over whole by this one: nothing of
/// it is lost, the open write is logged `unknown_outcome` after the others,
/// and new writes continue the sequence.
#[tokio::test]
async fn an_op_log_an_earlier_version_made_is_taken_over_whole() {
    use serde_json::json;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("earlier").await;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let mut earlier = sqlx::migrate!("./migrations/central-postgres");
    earlier.migrations = earlier
        .migrations
        .iter()
        .filter(|m| m.version <= 3)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    earlier.run(&pool).await.unwrap();
    for statement in [
        "INSERT INTO ops (seq, op_id, state, method, path, class, kind, created_ids, body,
                          upstream_status, created_at, logged_at, refs)
         VALUES (1, 'a0000000-0000-4000-8000-000000000001', 'committed', 'POST', '/v3/projects',
                 'resource', 'project', '[\"p1\"]', '{\"project\": {\"name\": \"one\"}}', 201,
                 '2026-11-01T00:00:00.000Z', '2026-11-01T00:00:00.000Z', '[]'),
                (2, 'a0000000-0000-4000-8000-000000000002', 'committed', 'PATCH',
                 '/v3/projects/p1', 'resource', 'project', '[]',
                 '{\"project\": {\"description\": \"d\"}}', 200,
                 '2026-11-01T00:00:01.000Z', '2026-11-01T00:00:01.000Z', '[]')",
        "UPDATE oplog_head SET seq = 2",
        "INSERT INTO op_keys (key, seq, exclusive) VALUES ('p1', 1, TRUE), ('p1', 2, TRUE)",
        "INSERT INTO entities (id, kind, name, domain_id, updated_at)
         VALUES ('p1', 'project', 'one', 'default', '2026-11-01T00:00:00.000Z')",
        "INSERT INTO edges (id, declared, cursor, first_seen_ms, acked_seq)
         VALUES ('e1', TRUE, 2, 1, 2)",
        "INSERT INTO intents (op_id, method, path, class, kind, body, created_at)
         VALUES ('a0000000-0000-4000-8000-000000000003', 'POST', '/v3/projects', 'resource',
                 'project', '{\"project\": {\"name\": \"left-open\"}}',
                 '2026-11-01T00:00:02.000Z')",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    pool.close().await;

    let fake = crate::fake_keystone::FakeKeystone::start().await;
    let config = crate::helpers::config_for(&fake, &url);
    let app = crate::helpers::start(fake, config).await;
    let ops = app.all_ops().await;
    let seen: Vec<(i64, &str, &str)> = ops
        .iter()
        .map(|o| {
            (
                o["seq"].as_i64().unwrap(),
                o["method"].as_str().unwrap(),
                o["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, "POST", "committed"),
            (2, "PATCH", "committed"),
            (3, "POST", "unknown_outcome")
        ],
        "{ops:#?}"
    );
    assert_eq!(ops[0]["created_ids"], json!(["p1"]));
    assert_eq!(ops[2]["body"]["project"]["name"], "left-open");
    let edges: serde_json::Value = app.admin_get("/v1/edges").await.json().await.unwrap();
    let e1 = edges["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == "e1")
        .unwrap_or_else(|| panic!("the earlier edge is kept: {edges:#}"));
    assert_eq!(
        (&e1["acked_through"], &e1["lag_ops"]),
        (&json!(2), &json!(1)),
        "{e1:#}"
    );
    let resp = app
        .write(
            "POST",
            "/v3/projects",
            Some(json!({"project": {"name": "after"}})),
        )
        .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(app.all_ops().await.last().unwrap()["seq"], 4);
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let kept: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM entities WHERE id = 'p1' AND name = 'one'),
                (SELECT COUNT(*) FROM op_keys WHERE key = 'p1' AND seq IN (1, 2))",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        kept,
        (1, 2),
        "the entity learned and the ops' keys are kept"
    );
    pool.close().await;
}

/// Replays are answered by any replica, not only the leader (each reads the
/// op log itself): an edge that was offline catches up from whichever
/// replica its request reaches, and one that does not lead answers with the
/// ops, until the edge is in sync again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replays_are_answered_by_replicas_that_do_not_lead() {
    use serde_json::json;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let Some(nats) = crate::sync::nats_server_path() else {
        return;
    };
    let (_nats, addr) = crate::sync::spawn_nats_server(&nats).await;
    let url = pg.database("replays").await;
    let mut base = None;
    let mut env = crate::sync::sync_env(&["edge-a"], Some(format!("nats://{addr}")), |c| {
        c.db = url.clone();
        base = Some(c.clone());
    })
    .await;
    let other = Replica::start(&base.unwrap()).await;
    let http = env.http.clone();
    let admins = [Some(env.admin.clone()), Some(other.admin.clone())];
    let (leader, _) = the_leader(&http, &admins).await;
    let follower = admins[1 - leader].clone().unwrap();
    let replayed = |admin: String| {
        let http = http.clone();
        async move {
            let text = http
                .get(format!("{admin}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("syncgate_ops_replayed_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    // The edge is offline while ops are made, then catches up by replay:
    // each time, its request reaches either replica.
    for round in 0..30 {
        env.stop_edge(0).await;
        for n in 0..3 {
            env.create(
                "/v3/projects",
                "project",
                json!({"project": {"name": format!("p-{round}-{n}")}}),
            )
            .await;
        }
        env.restart_edge(0).await;
        env.assert_in_sync().await;
        if replayed(follower.clone()).await > 0.0 {
            drop(other);
            env.shutdown().await;
            return;
        }
    }
    panic!("30 catch-ups, none answered by the replica that does not lead");
}

/// Per-site scope across replicas: a credential written by its ID through
/// one replica while another moves its user out of an edge's scope. The
/// credential's write read where the user was before the move was logged;
/// it waits for the move's intent (they share the user's key), then sees the
/// move logged meanwhile and is refused (503), nothing forwarded, instead of
/// being counted by where the user was. Tried again, it is counted by where
/// the user is now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_written_on_one_replica_while_another_moves_its_user_is_refused() {
    use serde_json::json;
    let Some(pg) = Postgres::start() else {
        return;
    };
    let Some(nats) = crate::sync::nats_server_path() else {
        return;
    };
    let (mut nats, addr) = crate::sync::spawn_nats_server(&nats).await;
    let url = pg.database("scoped_replicas").await;
    let mut base = None;
    let mut env = crate::sync::sync_env(&[], Some(format!("nats://{addr}")), |c| {
        c.db = url.clone();
        c.sync.edges = vec!["site2".into()];
        c.sync
            .scopes
            .insert("site2".into(), "domains:acme".parse().unwrap());
        base = Some(c.clone());
    })
    .await;
    let (key2, _) = crate::scope::edge_key(&env, "site2");
    env.add_edge_with_key("site2", None, key2).await;
    let other = Replica::start(&base.unwrap()).await;

    let (_, far, erin, cred) = crate::scope::erin_and_far(&env).await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;

    // erin's move, through the first replica, waits at central's Keystone;
    // the credential's update goes through the other.
    let cred_path = format!("/v3/credentials/{cred}");
    let update = |blob: &'static str| {
        env.http
            .patch(format!("{}{cred_path}", other.proxy))
            .header("x-auth-token", env.token())
            .json(&json!({"credential": {"blob": blob}}))
            .send()
    };
    let (moved, refused) =
        crate::scope::move_racing(&env, &erin, &cred, &far, update("race-blob-0002")).await;
    let refused = refused.unwrap();
    assert_eq!(moved, 200);
    let status = refused.status().as_u16();
    let text = refused.text().await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("another replica"), "{text}");
    let blob = |site: &crate::fake_site::FakeSite| -> Vec<serde_json::Value> {
        site.unnamed("credential")
            .into_iter()
            .map(|c| c["blob"].clone())
            .collect()
    };
    assert_eq!(
        blob(&env.central_site),
        [json!("erin-blob-0001")],
        "nothing forwarded"
    );

    // Tried again: erin is outside acme now, and so is her credential.
    let again = update("race-blob-0003").await.unwrap();
    assert_eq!(again.status().as_u16(), 200);
    let last = env.last_seq().await;
    env.until_delivered(&["site2"], &["applied", "out_of_scope"])
        .await;
    assert_eq!(env.delivery(last, "site2").await, "out_of_scope");
    assert_eq!(blob(&env.edges[0].site), [json!("erin-blob-0001")]);
    drop(other);
    env.shutdown().await;
    let _ = nats.kill().await;
}
