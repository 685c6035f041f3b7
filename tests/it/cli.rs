//! The binary's command line: bad values exit 2 with one line naming the option.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .args(args)
        .env_remove("SYNCGATE_UPSTREAM")
        .env_remove("SYNCGATE_ADMIN_TOKEN")
        .env_remove("OS_USERNAME")
        .env_remove("OS_APPLICATION_CREDENTIAL_ID")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_values_exit_2_with_one_line_naming_the_option() {
    let cases: [(&[&str], &str); 7] = [
        (&["central"], "--upstream"),
        (
            &["central", "--upstream", "http://k", "--listen", "nowhere"],
            "--listen",
        ),
        (
            &[
                "central",
                "--upstream",
                "http://k",
                "--max-capture-body",
                "huge",
            ],
            "--max-capture-body",
        ),
        (
            &[
                "central",
                "--upstream",
                "http://k",
                "--replicate",
                "identity,bogus",
            ],
            "--replicate",
        ),
        (
            &[
                "central",
                "--upstream",
                "http://k",
                "--admin-listen",
                "0.0.0.0:0",
                "--insecure-plaintext-sync",
            ],
            "--admin-token",
        ),
        (&["central", "--upstream", "http://k"], "--sync-key"),
        (
            &[
                "edge",
                "--id",
                "e1",
                "--broker",
                "nats://127.0.0.1:1",
                "--upstream",
                "http://k",
                "--insecure-plaintext-sync",
            ],
            "OS_USERNAME",
        ),
    ];
    for (args, option) in cases {
        let (code, stderr) = run(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(option), "{args:?}: {stderr}");
    }
}

#[test]
fn an_unwritable_op_log_fails_clearly() {
    let (code, stderr) = run(&[
        "central",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--db",
        "sqlite:///nonexistent-dir/x/central.db",
        "--insecure-plaintext-sync",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("op log"), "{stderr}");
}

#[test]
fn keygen_prints_a_usable_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    assert!(
        syncgate::sync::crypto::validate_key(key.trim()).is_ok(),
        "{key}"
    );
}

/// SIGTERM ends the process within `--shutdown-grace`, exit code 0, even while
/// a client trickles its request and another holds a keep-alive connection.
#[test]
fn sigterm_ends_the_process_within_the_grace_period() {
    use std::io::{BufRead, BufReader, Write};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("c.db").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncgate"))
        .args([
            "--log-format",
            "json",
            "central",
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--broker-listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--insecure-plaintext-sync",
            "--shutdown-grace",
            "1s",
        ])
        .env_remove("OS_USERNAME")
        .env_remove("OS_APPLICATION_CREDENTIAL_ID")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let proxy = loop {
        let line = lines.next().expect("central logs").unwrap();
        if line.contains("syncgate central serving") {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            break v["fields"]["proxy_addr"].as_str().unwrap().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let mut trickler = std::net::TcpStream::connect(&proxy).unwrap();
    trickler
        .write_all(b"POST /v3/projects HTTP/1.1\r\nHo")
        .unwrap();
    let mut idle = std::net::TcpStream::connect(&proxy).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();

    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stopped in {:?} with a 1s grace",
        started.elapsed()
    );
}
