//! The CLI as a new user meets it: quick start, outputs, bad input, exit codes.
use crate::common::*;

signing_variants! {
    #[test]
    fn quick_start_issues_a_kubeconfig_that_kubectl_and_openssl_accept(signing: Signing) {
        let s = Scratch::signing(signing);
        ok(&s.rotator(&["init"]));
        let out = ok(&s.rotator(&[
            "add-user", "alice", "--group", "dev", "-n", "team-a", "--role", "edit", "--ttl", "1h",
        ]));
        assert!(out.contains("issued alice generation 1"), "{out}");
        let kc = s.path("alice.kubeconfig");
        assert_eq!(mode(&kc), 0o600);

        // kubectl reads it back: server, CA, certificate and key round-trip.
        let view = run(
            "kubectl",
            &[
                "config",
                "view",
                "--kubeconfig",
                kc.to_str().unwrap(),
                "--raw",
                "-o",
                "json",
            ],
        );
        let v: serde_json::Value = serde_json::from_slice(&ok(&view).into_bytes()).unwrap();
        let (server, ca, cert, key) = kubeconfig_parts(&kc);
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(v["clusters"][0]["cluster"]["server"], server.as_str());
        assert_eq!(server, "https://127.0.0.1:6443");
        assert_eq!(
            v["clusters"][0]["cluster"]["certificate-authority-data"],
            b64(&ca).as_str()
        );
        assert_eq!(
            v["users"][0]["user"]["client-certificate-data"],
            b64(&cert).as_str()
        );
        assert_eq!(v["users"][0]["user"]["client-key-data"], b64(&key).as_str());
        assert_eq!(v["current-context"], "alice@kubernetes");
        assert_eq!(v["contexts"][0]["context"]["namespace"], "team-a");
        assert!(key.contains("PRIVATE KEY"));

        // openssl, independently: the certificate chains to the CA and says what we asked.
        std::fs::write(s.path("alice.crt"), &cert).unwrap();
        let ca_path = s.ca_cert("rotator-data");
        ok(&run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                ca_path.to_str().unwrap(),
                s.path("alice.crt").to_str().unwrap(),
            ],
        ));
        let text = ok(&run(
            "openssl",
            &[
                "x509",
                "-in",
                s.path("alice.crt").to_str().unwrap(),
                "-noout",
                "-subject",
                "-ext",
                "basicConstraints,extendedKeyUsage",
            ],
        ));
        assert!(
            text.contains("O = dev, O = rotator:alice:1.") && text.contains(", CN = alice"),
            "{text}"
        );
        assert!(
            text.contains("CA:FALSE") && text.contains("TLS Web Client Authentication"),
            "{text}"
        );
        // And the private key matches the certificate.
        std::fs::write(s.path("alice.key"), &key).unwrap();
        let pk_cert = ok(&run(
            "openssl",
            &[
                "x509",
                "-in",
                s.path("alice.crt").to_str().unwrap(),
                "-noout",
                "-pubkey",
            ],
        ));
        let pk_key = ok(&run(
            "openssl",
            &[
                "pkey",
                "-in",
                s.path("alice.key").to_str().unwrap(),
                "-pubout",
            ],
        ));
        assert_eq!(pk_cert, pk_key);
        s.assert_signed("rotator-data", 1);
    }
}

crate::engines! {
#[tokio::test]
async fn init_twice_changes_nothing() {
    let s = Scratch::new();
    let first = ok(&s.rotator(&["init"]));
    assert!(first.contains("created now"));
    let ca = std::fs::read(s.path("rotator-data/ca/ca.crt")).unwrap();
    let key = std::fs::read(s.path("rotator-data/ca/ca.key")).unwrap();
    let events = s.count("SELECT COUNT(*) FROM audit_events").await;
    let second = ok(&s.rotator(&["init"]));
    assert!(!second.contains("created now"));
    assert_eq!(std::fs::read(s.path("rotator-data/ca/ca.crt")).unwrap(), ca);
    assert_eq!(
        std::fs::read(s.path("rotator-data/ca/ca.key")).unwrap(),
        key
    );
    assert_eq!(s.count("SELECT COUNT(*) FROM audit_events").await, events);
    assert_eq!(mode(&s.path("rotator-data")), 0o700);
    assert_eq!(mode(&s.path("rotator-data/ca/ca.key")), 0o600);
}
}

signing_variants! {
    #[tokio::test]
    async fn show_list_rotate_revoke_remove_and_audit(signing: Signing) {
        let s = Scratch::signing(signing);
        ok(&s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]));
        ok(&s.rotator(&["rotate", "alice", "--out", "new.kubeconfig"]));
        let show = ok(&s.rotator(&["show", "alice", "--output", "json"]));
        let v: serde_json::Value = serde_json::from_str(&show).unwrap();
        let states: Vec<&str> = v["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["superseded", "current"]);
        let serial = v["credentials"][1]["serial"].as_str().unwrap().to_string();
        assert_eq!(
            v["credentials"][1]["fingerprint"].as_str().unwrap().len(),
            64
        );
        // The new kubeconfig carries the current credential.
        let (_, _, cert, _) = kubeconfig_parts(&s.path("new.kubeconfig"));
        let info = rotator::pki::parse_cert_pem(&cert, "test").unwrap();
        assert_eq!(info.serial, serial);
        assert!(
            info.organizations
                .iter()
                .any(|o| o.starts_with("rotator:alice:2.")),
            "{:?}",
            info.organizations
        );

        let table = ok(&s.rotator(&["list-users"]));
        assert!(
            table.starts_with("NAME") && table.contains(&serial),
            "{table}"
        );

        ok(&s.rotator(&["revoke", "alice", "--serial", &serial]));
        assert_eq!(
            s.count("SELECT COUNT(*) FROM credentials WHERE state = 'revoked'")
                .await,
            1
        );
        let e = fails_with(&s.rotator(&["revoke", "alice", "--serial", "00ff"]), 5);
        assert!(e.contains("00ff"), "{e}");
        ok(&s.rotator(&["remove-user", "alice"]));
        assert_eq!(
            s.count(
                "SELECT COUNT(*) FROM credentials WHERE state IN ('current','superseded','pending')"
            )
            .await,
            0
        );
        let listed = ok(&s.rotator(&["list-users", "--output", "json"]));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&listed)
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            0
        );

        let log = ok(&s.rotator(&["audit", "log", "--user", "alice", "--output", "json"]));
        let actions: Vec<String> = serde_json::from_str::<Vec<serde_json::Value>>(&log)
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap().to_string())
            .collect();
        for a in [
            "user.add",
            "credential.issue",
            "credential.activate",
            "credential.revoke",
            "user.remove",
        ] {
            assert!(
                actions.iter().any(|x| x == a),
                "{a} missing from {actions:?}"
            );
        }
        let verify = ok(&s.rotator(&["audit", "verify"]));
        assert!(verify.contains("audit chain intact"), "{verify}");
        s.assert_signed("rotator-data", 2);
    }
}

#[tokio::test]
async fn audit_verify_names_the_first_altered_event() {
    let s = Scratch::new();
    ok(&s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]));
    ok(&s.rotator(&["rotate", "alice"]));
    // Someone with write access to the file edits history (the triggers are
    // a guard against mistakes, not against the file's owner).
    let db = s.path("rotator-data/rotator.db");
    let url = format!("sqlite://{}", db.display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("DROP TRIGGER audit_events_no_update")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_events SET subject = 'mallory' WHERE seq = 3")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let e = fails_with(&s.rotator(&["audit", "verify"]), 11);
    assert!(e.contains("broken at event 3"), "{e}");
    fails_with(&s.rotator(&["doctor"]), 11);
}

#[tokio::test]
async fn audit_events_cannot_be_updated_or_deleted_through_sql() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let url = format!("sqlite://{}", s.path("rotator-data/rotator.db").display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let e = sqlx::query("DELETE FROM audit_events")
        .execute(&mut conn)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("append-only"), "{e}");
    let e = sqlx::query("UPDATE audit_events SET actor = 'x'")
        .execute(&mut conn)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("append-only"), "{e}");
}

crate::engines! {
#[tokio::test]
async fn bad_input_gets_a_clear_message_a_distinct_code_and_changes_nothing() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let before = s.count("SELECT COUNT(*) FROM audit_events").await;
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["add-user", "system:admin", "-n", "a", "--role", "view"],
            4,
            "system:admin",
        ),
        (
            &[
                "add-user",
                "alice",
                "--group",
                "system:masters",
                "-n",
                "a",
                "--role",
                "view",
            ],
            4,
            "system:masters",
        ),
        (
            &["add-user", "alice", "-n", "a", "--role", "cluster-admin"],
            4,
            "cluster-admin",
        ),
        (
            &["add-user", "al ice", "-n", "a", "--role", "view"],
            4,
            "whitespace",
        ),
        (
            &["add-user", "alice", "-n", "Team_A", "--role", "view"],
            4,
            "Team_A",
        ),
        (
            &[
                "add-user", "alice", "-n", "a", "--role", "view", "--ttl", "5m",
            ],
            4,
            "5m",
        ),
        (
            &[
                "add-user", "alice", "-n", "a", "--role", "view", "--ttl", "30d",
            ],
            4,
            "30days",
        ),
        (
            &[
                "add-user",
                "alice",
                "-n",
                "a",
                "--role",
                "view",
                "--out",
                "no/such/dir/k",
            ],
            10,
            "no/such/dir/k",
        ),
        (
            &[
                "add-user",
                "alice",
                "-n",
                "a",
                "--role",
                "view",
                "--key-type",
                "dsa",
            ],
            2,
            "dsa",
        ),
        (&["rotate", "nobody"], 5, "nobody"),
        (&["show", "nobody"], 5, "nobody"),
        (&["remove-user", "nobody"], 5, "nobody"),
    ];
    for (args, code, needle) in cases {
        let e = fails_with(&s.rotator(args), *code);
        assert!(e.contains(needle), "{args:?}: {e}");
    }
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);
    assert_eq!(s.count("SELECT COUNT(*) FROM users").await, 0);
    assert_eq!(
        s.count("SELECT COUNT(*) FROM audit_events").await,
        before,
        "refused requests change no state"
    );
    assert!(!s.path("alice.kubeconfig").exists());

    ok(&s.rotator(&["add-user", "alice", "-n", "a", "--role", "view"]));
    let e = fails_with(
        &s.rotator(&["add-user", "alice", "-n", "a", "--role", "view"]),
        6,
    );
    assert!(e.contains("rotator rotate alice"), "{e}");
}
}

#[test]
fn a_broken_config_names_the_file_the_key_and_the_fix() {
    let s = Scratch::new();
    s.write("bad.toml", "[policy]\nmax_ttl = 7\n");
    let e = fails_with(&s.rotator(&["--config", "bad.toml", "list-users"]), 3);
    assert!(
        e.contains("bad.toml") && e.contains("max_ttl") && e.contains("fix:"),
        "{e}"
    );
    s.write("typo.toml", "[polciy]\n");
    let e = fails_with(&s.rotator(&["--config", "typo.toml", "init"]), 3);
    assert!(e.contains("polciy"), "{e}");
    let e = fails_with(
        &s.rotator_env(&["init"], &[("ROTATOR_SCHEDULE__ROTATE", "every day")]),
        3,
    );
    assert!(
        e.contains("ROTATOR_SCHEDULE__ROTATE") || e.contains("schedule.rotate"),
        "{e}"
    );
    let e = fails_with(&s.rotator(&["--config", "missing.toml", "init"]), 3);
    assert!(e.contains("missing.toml"), "{e}");
    assert!(
        !s.path("rotator-data").exists(),
        "nothing is created when the config is broken"
    );
}

#[test]
fn config_file_and_env_choose_the_data_dir() {
    let s = Scratch::new();
    std::fs::create_dir(s.path("config")).unwrap();
    s.write("config/rotator.toml", "data_dir = \"from-file\"\n");
    ok(&s.rotator(&["init"]));
    assert!(s.path("from-file/rotator.db").exists());
    ok(&s.rotator_env(&["init"], &[("ROTATOR_DATA_DIR", "from-env")]));
    assert!(s.path("from-env/rotator.db").exists());
    ok(&s.rotator_env(
        &["--data-dir", "from-flag", "init"],
        &[("ROTATOR_DATA_DIR", "from-env")],
    ));
    assert!(s.path("from-flag/rotator.db").exists());
}

#[test]
fn a_corrupt_database_is_refused_without_being_written() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.path("rotator-data")).unwrap();
    let junk = vec![0x42u8; 8192];
    std::fs::write(s.path("rotator-data/rotator.db"), &junk).unwrap();
    let e = fails_with(&s.rotator(&["list-users"]), 7);
    assert!(e.contains("corrupt") || e.contains("not a database"), "{e}");
    assert_eq!(
        std::fs::read(s.path("rotator-data/rotator.db")).unwrap(),
        junk
    );
}

crate::engines! {
#[test]
fn stdout_delivery_keeps_stdout_for_the_kubeconfig() {
    let s = Scratch::new();
    let o = s.rotator(&[
        "add-user", "bob", "-n", "team-a", "--role", "view", "--out", "-",
    ]);
    let stdout = ok(&o);
    let kc = kube::config::Kubeconfig::from_yaml(&stdout).expect("stdout is exactly a kubeconfig");
    assert_eq!(kc.current_context.as_deref(), Some("bob@kubernetes"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("issued bob"));
}
}

crate::engines! {
#[test]
fn doctor_reports_a_world_readable_ca_key() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    ok(&s.rotator(&["doctor"]));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        s.path("rotator-data/ca/ca.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let o = s.rotator(&["doctor"]);
    let e = fails_with(&o, 3);
    assert!(e.contains("chmod 600"), "{e}");
    // The sealing key is checked the same way.
    std::fs::set_permissions(
        s.path("rotator-data/ca/ca.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    ok(&s.rotator(&["doctor"]));
    std::fs::set_permissions(
        s.path("rotator-data/seal.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let e = fails_with(&s.rotator(&["doctor"]), 3);
    assert!(e.contains("seal.key has mode 640"), "{e}");
}
}

crate::engines! {
#[test]
fn serve_runs_until_sigterm_and_a_second_daemon_refuses_to_start() {
    use std::io::BufRead;
    let s = Scratch::new();
    // Ports of their own (the default is other tests' too): the second daemon
    // must be refused for the lock, not for the port.
    let mut daemon = s.command()
        .args(["serve", "--metrics-addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The "started" line is logged after the lock is taken.
    let mut lines = std::io::BufReader::new(daemon.stderr.take().unwrap()).lines();
    assert!(
        lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("rotator daemon started"))
    );
    let mut second = s.command()
        .args(["serve", "--metrics-addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let code = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st.code();
        }
        if std::time::Instant::now() > deadline {
            second.kill().unwrap();
            panic!("a second daemon started on the same database");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(code, Some(6));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("another rotator daemon"), "{err}");
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    let status = daemon.wait().unwrap();
    assert!(
        status.success(),
        "SIGTERM ends the daemon cleanly: {status:?}"
    );
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_is_a_clear_error_after_the_busy_timeout() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let url = format!("sqlite://{}", s.path("rotator-data/rotator.db").display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut conn)
        .await
        .unwrap();
    let dir = s.dir.path().to_path_buf();
    let o = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_rotator"))
            .current_dir(dir)
            .args(["add-user", "alice", "-n", "team-a", "--role", "view"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
    let e = fails_with(&o, 7);
    assert!(e.contains("locked") && e.contains("fix:"), "{e}");
    assert!(!s.path("alice.kubeconfig").exists());
    drop(conn);
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);
}

/// `rotator ARGS` in `s`, killed if it runs longer than `limit`; None then.
fn rotator_within(
    s: &Scratch,
    args: &[&str],
    limit: std::time::Duration,
) -> Option<std::process::Output> {
    let mut c = s.command();
    c.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

crate::engines! {
#[test]
fn add_user_out_a_fifo_or_a_device_is_refused_with_exit_10_and_nothing_written() {
    use std::os::unix::fs::FileTypeExt;
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let fifo = s.path("fifo");
    ok(&run("mkfifo", &[fifo.to_str().unwrap()]));
    let o = rotator_within(
        &s,
        &[
            "add-user", "f1", "-n", "team-a", "--role", "view", "--out", "fifo",
        ],
        std::time::Duration::from_secs(20),
    )
    .expect("add-user --out FIFO must not hang");
    let e = fails_with(&o, 10);
    assert!(e.contains("is a FIFO") && e.contains("fix:"), "{e}");
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // A character device: a node of our own when we may make one (as root, a
    // copy of /dev/null's, so a regression can only replace that copy), else
    // /dev/null itself, which a non-root rotator could never replace.
    let dev = s.path("null-device");
    let own = run("mknod", &[dev.to_str().unwrap(), "c", "1", "3"])
        .status
        .success();
    let root = run("id", &["-u"]).stdout.trim_ascii() == b"0";
    if own || !root {
        let target = if own {
            dev.to_str().unwrap()
        } else {
            "/dev/null"
        };
        let o = rotator_within(
            &s,
            &[
                "add-user", "f2", "-n", "team-a", "--role", "view", "--out", target,
            ],
            std::time::Duration::from_secs(20),
        )
        .expect("add-user --out DEVICE must not hang");
        let e = fails_with(&o, 10);
        assert!(e.contains("is a character device"), "{e}");
        assert!(
            std::fs::symlink_metadata(target)
                .unwrap()
                .file_type()
                .is_char_device()
        );
    }
    assert!(
        std::fs::symlink_metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );
    // Refused before anything was issued.
    let users = ok(&s.rotator(&["list-users", "--output", "json"]));
    assert!(!users.contains("f1") && !users.contains("f2"), "{users}");
    let stray: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".rotator-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}
}

#[test]
fn a_fifo_where_serve_or_fetch_reads_is_refused_at_once() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    ok(&run(
        "mkfifo",
        &[s.path("rotator-data/daemon.lock").to_str().unwrap()],
    ));
    let o = rotator_within(
        &s,
        &["serve", "--metrics-addr", "127.0.0.1:0"],
        std::time::Duration::from_secs(20),
    )
    .expect("serve with a FIFO as its lock file must not hang");
    let e = fails_with(&o, 3);
    assert!(e.contains("is a FIFO"), "{e}");
    ok(&run("mkfifo", &[s.path("ca-fifo").to_str().unwrap()]));
    let o = rotator_within(
        &s,
        &[
            "fetch",
            "--server",
            "https://127.0.0.1:9",
            "--server-ca",
            "ca-fifo",
            "--state-dir",
            "st",
            "--kubeconfig",
            "kc",
        ],
        std::time::Duration::from_secs(20),
    )
    .expect("fetch --server-ca FIFO must not hang");
    let e = fails_with(&o, 2);
    assert!(e.contains("is a FIFO"), "{e}");
}

#[test]
fn fetch_gives_up_at_its_timeout_when_the_server_never_answers() {
    let s = Scratch::new();
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hole.incoming() {
            held.push(c);
        }
    });
    let url = format!("https://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let o = rotator_within(
        &s,
        &[
            "fetch",
            "--server",
            &url,
            "--token",
            "abcdef.0123456789abcdef",
            "--state-dir",
            "st",
            "--kubeconfig",
            "kc",
            "--timeout",
            "2s",
        ],
        std::time::Duration::from_secs(20),
    )
    .expect("fetch ends by itself");
    let took = started.elapsed();
    let e = fails_with(&o, 12);
    assert!(e.contains("no answer within 2s"), "{e}");
    assert!(took < std::time::Duration::from_millis(2900), "{took:?}");
    assert!(!s.path("kc").exists());
}
