//! The op log on a real PostgreSQL (Debian's `postgresql` package): a private
//! server started for the test as an unprivileged user, in a temporary
//! directory, on a free port. `SYNCGATE_REQUIRE_POSTGRES=1` (set by
//! `scripts/test.sh` as root) makes a missing server a failure.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use syncgate::store::postgres::{NewOp, PgOpLog};

/// A PostgreSQL server of its own, stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_nobody: bool,
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
        let pg = Postgres {
            bin,
            // Names the socket file only: the server listens on no TCP port.
            port: 5432,
            dir,
            as_nobody,
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
        pg.launch();
        Some(pg)
    }

    /// Starts the server on its data, port and socket directory.
    fn launch(&self) {
        let data = self.data();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=''",
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

fn op(id: &str) -> NewOp<'_> {
    NewOp {
        op_id: id,
        state: "committed",
        method: "POST",
        path: "/v3/projects",
        class: "resource",
        kind: "project",
        created_ids: "[]",
        body: None,
    }
}

/// Two central processes (two pools) append concurrently, in batches of one
/// to three, while a reader follows the log: seqs are gap-free, each op is
/// logged once with the seq its append answered, and the reader never sees
/// a seq before the ones below it are visible (so it never later finds an
/// op below what it has read).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seqs_are_gap_free_and_become_visible_in_order_across_processes() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("oplog_order").await;
    let replicas = [
        PgOpLog::open(&url, None).await.unwrap(),
        PgOpLog::open(&url, None).await.unwrap(),
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
                for o in log.after(cursor, 500).await.unwrap() {
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
                let n = 1 + (w + i) % 3;
                let ids: Vec<String> = (0..n).map(|k| format!("w{w}-{i}-{k}")).collect();
                let ops: Vec<NewOp<'_>> = ids.iter().map(|id| op(id)).collect();
                let seqs = log.append(&ops).await.unwrap();
                assert_eq!(seqs.len(), ops.len());
                assert!(seqs.windows(2).all(|s| s[1] == s[0] + 1), "{seqs:?}");
                answered.extend(ids.into_iter().zip(seqs));
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
    assert_eq!(replicas[0].head().await.unwrap(), total);
    // Each op once, with the seq its append answered; seqs 1..=total.
    let logged = replicas[0].after(0, total + 10).await.unwrap();
    let seqs: BTreeSet<i64> = logged.iter().map(|o| o.seq).collect();
    assert_eq!(seqs, (1..=total).collect::<BTreeSet<_>>());
    for (id, seq) in &answered {
        assert_eq!(&logged[(*seq - 1) as usize].op_id, id);
    }
    println!("{total} ops by 8 writers on 2 processes, followed by {reads} reads");
    for r in replicas {
        r.close().await;
    }
}

/// A password never sits in the URL, and what the log says of a URL it
/// cannot open never shows one.
#[tokio::test]
async fn a_database_url_with_a_password_is_refused_without_showing_it() {
    let Err(e) = PgOpLog::open("postgres://sync:hunter2@127.0.0.1:1/oplog", None).await else {
        panic!("opened");
    };
    let text = e.to_string();
    assert!(text.contains("PGPASSFILE"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // In the query, the same.
    let Err(e) = PgOpLog::open("postgres://sync@127.0.0.1:1/oplog?password=hunter2", None).await
    else {
        panic!("opened");
    };
    let text = e.to_string();
    assert!(
        text.contains("PGPASSFILE") && !text.contains("hunter2"),
        "{text}"
    );
    // Unreachable: the error names the database, not a password.
    let Err(e) = PgOpLog::open("postgres://sync@127.0.0.1:1/oplog", None).await else {
        panic!("opened");
    };
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
}

/// Two processes campaign: one leads, the other waits; the leader gone (its
/// lock connection closed, as a kill closes it), the other is elected at the
/// next epoch, and the old leader's fenced writes are refused by the database.
#[tokio::test]
async fn one_leader_at_a_time_and_a_deposed_leaders_writes_are_refused() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("oplog_leader").await;
    let a = PgOpLog::open(&url, None).await.unwrap();
    let b = PgOpLog::open(&url, None).await.unwrap();
    assert_eq!(a.leader().await.unwrap().epoch, 0);
    let lease = a.campaign("central-a").await.unwrap().expect("a leads");
    assert!(
        b.campaign("central-b").await.unwrap().is_none(),
        "one leader"
    );
    let first = lease.epoch;
    a.set_published(first, 5).await.unwrap();
    let leader = b.leader().await.unwrap();
    assert_eq!(
        (leader.epoch, leader.holder.as_deref()),
        (first, Some("central-a"))
    );
    assert!(leader.since.is_some());

    // Gone as a killed process goes: its connection dropped, not closed.
    drop(lease);
    // The lock is free once the server has seen the connection go.
    let lease_b = until("b elected", || async {
        b.campaign("central-b").await.unwrap()
    })
    .await;
    assert_eq!(lease_b.epoch, first + 1);
    let err = a.set_published(first, 9).await.unwrap_err();
    assert!(
        matches!(err, syncgate::store::StoreError::Deposed { epoch, current } if epoch == first && current == first + 1),
        "{err}"
    );
    b.set_published(lease_b.epoch, 7).await.unwrap();
    assert_eq!(
        a.published().await.unwrap(),
        7,
        "the old leader's write left nothing"
    );
    assert_eq!(
        a.leader().await.unwrap().holder.as_deref(),
        Some("central-b")
    );
}

/// Random campaigns, resignations and fenced writes by three processes,
/// some holding leases they have lost: at most one lease is current, each
/// election moves the epoch on by one, a fenced write lands exactly when its
/// epoch is the current one, and what is published is the last such write.
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
    for _ in 0..3 {
        procs.push(PgOpLog::open(&url, None).await.unwrap());
    }
    // The model: which process holds the live lease, and the epoch each
    // process believes it leads at (kept after it lost the lease).
    let mut leases: Vec<Option<syncgate::store::postgres::Lease>> = vec![None, None, None];
    let mut believed: Vec<Option<i64>> = vec![None; 3];
    let mut live: Option<usize> = None;
    let mut epoch = 0i64;
    let mut published = 0i64;
    for step in 0..300 {
        let p = next(3) as usize;
        match next(4) {
            0 => {
                let got = procs[p].campaign(&format!("p{p}")).await.unwrap();
                match (got, live) {
                    (Some(l), None) => {
                        epoch += 1;
                        assert_eq!(l.epoch, epoch, "step {step}: one more epoch per election");
                        believed[p] = Some(l.epoch);
                        leases[p] = Some(l);
                        live = Some(p);
                    }
                    (Some(_), Some(holder)) => {
                        panic!("step {step}: p{p} elected while p{holder} leads (seed {seed})")
                    }
                    (None, Some(_)) => {}
                    (None, None) => {
                        // The last holder's close may not be seen yet: try
                        // again until it is (a lock is never held for ever).
                        let l = loop {
                            if let Some(l) = procs[p].campaign(&format!("p{p}")).await.unwrap() {
                                break l;
                            }
                            tokio::task::yield_now().await;
                        };
                        epoch += 1;
                        assert_eq!(l.epoch, epoch, "step {step}");
                        believed[p] = Some(l.epoch);
                        leases[p] = Some(l);
                        live = Some(p);
                    }
                }
            }
            1 => {
                // The process loses its lease (resigns, or dies: its
                // connection dropped): it keeps believing in its epoch, and
                // its writes land until another is elected (nobody else
                // leads meanwhile), then are refused.
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
                let Some(e) = believed[p] else { continue };
                let value = step as i64 + 1;
                let r = procs[p].set_published(e, value).await;
                if e == epoch {
                    r.unwrap_or_else(|err| panic!("step {step}: p{p} at the current epoch: {err}"));
                    published = value;
                } else {
                    assert!(
                        matches!(r, Err(syncgate::store::StoreError::Deposed { .. })),
                        "step {step}: p{p} wrote at epoch {e}, current {epoch} (seed {seed})"
                    );
                }
            }
        }
        let leader = procs[0].leader().await.unwrap();
        assert_eq!(leader.epoch, epoch, "step {step}");
    }
    assert_eq!(procs[1].published().await.unwrap(), published);
    println!("leadership_chaos: {epoch} elections in 300 steps");
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

/// While PostgreSQL is down an append fails (nothing is answered as logged),
/// and once it is back the same log takes writes again by itself, with no
/// seq lost or reused and every append answered before still there.
#[tokio::test]
async fn appends_fail_while_the_database_is_down_and_resume_by_themselves() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("oplog_restart").await;
    let log = PgOpLog::open(&url, None).await.unwrap();
    assert_eq!(log.append(&[op("before")]).await.unwrap(), [1]);
    pg.stop();
    assert!(
        log.append(&[op("while-down")]).await.is_err(),
        "nothing logged while down"
    );
    pg.restart();
    // The pool's connections died with the server: new ones are made.
    let seqs = until("appends after the restart", || async {
        log.append(&[op("after")]).await.ok()
    })
    .await;
    assert_eq!(seqs, [2], "no seq lost or reused");
    let logged: Vec<String> = log
        .after(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.op_id)
        .collect();
    assert_eq!(logged, ["before", "after"]);
}

/// An append whose answer was lost is tried again: it answers the seqs the
/// ops have and logs nothing twice; the next append takes the next seq.
#[tokio::test]
async fn an_append_tried_again_logs_nothing_twice() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("oplog_retry").await;
    let log = PgOpLog::open(&url, None).await.unwrap();
    assert_eq!(log.append(&[op("a"), op("b")]).await.unwrap(), [1, 2]);
    assert_eq!(log.append(&[op("a"), op("b")]).await.unwrap(), [1, 2]);
    assert_eq!(log.head().await.unwrap(), 2, "the retry took no seq");
    // Half logged is no append of ours: refused, nothing taken.
    assert!(log.append(&[op("b"), op("c")]).await.is_err());
    assert_eq!(log.append(&[op("c")]).await.unwrap(), [3]);
    assert_eq!(log.after(0, 10).await.unwrap().len(), 3);
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
    let a = PgOpLog::open(&url, None).await.unwrap();
    let b = PgOpLog::open(&url, None).await.unwrap();
    let lease = a.campaign("central-a").await.unwrap().unwrap();
    // A write of a's in flight: its fence taken, not committed yet.
    let mut inflight = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut tx = inflight.begin().await.unwrap();
    let seen: i64 = sqlx::query_scalar("SELECT epoch FROM leader WHERE id = 1 FOR SHARE")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(seen, lease.epoch);
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
    sqlx::query(
        "INSERT INTO oplog_meta (key, value) VALUES ('published_seq', 4) \
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let epoch = election.await.unwrap();
    assert_eq!(epoch, seen + 1);
    assert_eq!(
        a.published().await.unwrap(),
        4,
        "the write in flight landed"
    );
    assert!(matches!(
        a.set_published(seen, 9).await,
        Err(syncgate::store::StoreError::Deposed { .. })
    ));
}

/// One central process per PostgreSQL op log until several are supported: a
/// second is refused, naming the first; once the first is gone (its
/// connection closed, as a kill closes it) another starts.
#[tokio::test]
async fn a_second_central_on_one_op_log_is_refused_until_the_first_is_gone() {
    let Some(pg) = Postgres::start() else {
        return;
    };
    let url = pg.database("two_centrals").await;
    let fake = crate::fake_keystone::FakeKeystone::start().await;
    let mut config = crate::helpers::config_for(&fake, &url);
    config.oplog_lock_wait = std::time::Duration::from_millis(500);
    let first = syncgate::Central::build(config.clone()).await.unwrap();
    let refused = match syncgate::Central::build(config.clone()).await {
        Ok(_) => panic!("a second central started on the same op log"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("another central process runs on this op log")
            && refused.contains(&format!(":{}", std::process::id())),
        "{refused}"
    );
    drop(first);
    let again = syncgate::Central::build(config).await;
    assert!(again.is_ok(), "{:?}", again.err());
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

    let forwarded = app.fake.count();
    let resp = app
        .write("POST", "/v3/projects", Some(project("while-down")))
        .await;
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("nothing was forwarded"), "{text}");
    assert_eq!(
        app.fake.count(),
        forwarded,
        "a refused write is never forwarded"
    );
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
