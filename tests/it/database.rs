//! Copies of the store: `rotator backup` while a real daemon rotates, and what
//! a restore from it looks like.
use crate::common::*;

/// Copies the data directory (keys, marker, checkpoint) and puts `db` in it as
/// the database: what an operator restoring a backup does.
fn restore_into(s: &Scratch, db: &std::path::Path, to: &str) -> std::path::PathBuf {
    let from = s.path("rotator-data");
    let dest = s.path(to);
    std::fs::create_dir(&dest).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if e.file_type().unwrap().is_file() && !name.starts_with("rotator.db") {
            std::fs::copy(e.path(), dest.join(&name)).unwrap();
        }
    }
    for sub in ["ca"] {
        std::fs::create_dir(dest.join(sub)).unwrap();
        for e in std::fs::read_dir(from.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dest.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(db, dest.join("rotator.db")).unwrap();
    dest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_the_daemon_rotates_opens_and_its_audit_chain_verifies() {
    let s = Scratch::new();
    // Every credential is always due (renew_before exceeds the lifetime) and the
    // rotate job ticks every second: the daemon writes all the time.
    s.write(
        "rotator.toml",
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"* * * * * *\"\n",
    );
    for u in ["alice", "bob", "carol"] {
        ok(&s.rotator(&[
            "--config",
            "rotator.toml",
            "add-user",
            u,
            "-n",
            "team-a",
            "--role",
            "view",
            "--ttl",
            "1h",
        ]));
    }
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"))
        .current_dir(s.dir.path())
        .args([
            "--config",
            "rotator.toml",
            "serve",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let events = || async { s.count("SELECT COUNT(*) FROM audit_events").await };
    let start = events().await;
    // Wait until the daemon is rotating, then take backups while it goes on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while events().await < start + 6 {
        assert!(std::time::Instant::now() < deadline, "the daemon rotates");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut backups = Vec::new();
    for i in 0..3 {
        let name = format!("backup-{i}.db");
        let out = ok(&s.rotator(&["--config", "rotator.toml", "backup", &name]));
        assert!(out.contains("integrity and audit chain verified"), "{out}");
        assert_eq!(mode(&s.path(&name)), 0o600, "{name}");
        backups.push(name);
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    }
    let after = events().await;
    // Refuses to replace a file, even its own earlier backup.
    let e = fails_with(
        &s.rotator(&["--config", "rotator.toml", "backup", "backup-0.db"]),
        6,
    );
    assert!(e.contains("already exists") && e.contains("fix:"), "{e}");
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().await.unwrap().success());
    assert!(
        after > start + 6,
        "the daemon kept writing during the backups"
    );

    for (i, b) in backups.iter().enumerate() {
        let dir = restore_into(&s, &s.path(b), &format!("restored-{i}"));
        let dd = dir.to_str().unwrap();
        // Events after the backup are gone from the restored log: verify says so
        // (never a silent pass), and a reset records the restore.
        let v = s.rotator(&["--data-dir", dd, "audit", "verify"]);
        if !v.status.success() {
            let e = fails_with(&v, 11);
            assert!(e.contains("(truncated)"), "{b}: {e}");
            ok(&s.rotator(&["--data-dir", dd, "audit", "reset-checkpoint"]));
        }
        let v = ok(&s.rotator(&["--data-dir", dd, "audit", "verify"]));
        assert!(v.contains("audit chain intact"), "{b}: {v}");
        // One current credential per user, as in the live database at that moment.
        let users = ok(&s.rotator(&["--data-dir", dd, "list-users", "--output", "json"]));
        let users: serde_json::Value = serde_json::from_str(&users).unwrap();
        assert_eq!(users.as_array().unwrap().len(), 3, "{b}: {users}");
        let url = format!("sqlite://{}?mode=ro", dir.join("rotator.db").display());
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .unwrap();
        let (two,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM (SELECT user_name FROM credentials WHERE state = 'current' GROUP BY user_name HAVING COUNT(*) > 1)",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(two, 0, "{b}");
    }
}

async fn counts(db: &std::path::Path) -> Vec<(String, i64)> {
    let url = format!("sqlite://{}?mode=ro", db.display());
    let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let mut out = Vec::new();
    for t in rotator::store::copy::TABLES {
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {t}")))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        out.push((t.to_string(), n));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_copy_moves_everything_into_an_empty_database_and_refuses_a_used_one() {
    let s = Scratch::new();
    for u in ["alice", "bob"] {
        ok(&s.rotator(&["add-user", u, "-n", "team-a", "--role", "view"]));
    }
    ok(&s.rotator(&[
        "add-user", "carol", "-n", "team-a", "--role", "view", "--enroll",
    ]));
    ok(&s.rotator(&["rotate", "alice"]));
    ok(&s.rotator(&["revoke", "bob"]));
    std::fs::create_dir(s.path("new")).unwrap();
    let target = s.path("new/rotator.db");
    let url = format!("sqlite://{}", target.display());
    let out = ok(&s.rotator(&["database", "copy", "--to", &url]));
    assert!(
        out.contains("row counts match and the audit chain verifies"),
        "{out}"
    );
    assert!(
        out.contains("database_url"),
        "it says what to change: {out}"
    );
    assert_eq!(mode(&target), 0o600);
    let source = counts(&s.path("rotator-data/rotator.db")).await;
    assert_eq!(counts(&target).await, source);
    for (t, n) in &source {
        if [
            "users",
            "credentials",
            "issuances",
            "enrollment_tokens",
            "audit_events",
            "meta",
        ]
        .contains(&t.as_str())
        {
            assert!(*n > 0, "{t} has rows to copy");
        }
    }
    // The copy is the whole database: the same users, and its audit chain
    // verifies with the same key and checkpoint.
    let dir = restore_into(&s, &target, "moved");
    let dd = dir.to_str().unwrap();
    assert!(ok(&s.rotator(&["--data-dir", dd, "audit", "verify"])).contains("audit chain intact"));
    let show = ok(&s.rotator(&["--data-dir", dd, "show", "bob", "--output", "json"]));
    assert!(show.contains("revoked"), "{show}");
    // bob's revocation is the user's too, and sticks in the copy.
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v["user"]["state"], "disabled", "{show}");
    assert!(v["user"]["revoked"]["at"].as_i64().unwrap() > 0, "{show}");
    assert!(
        !v["user"]["revoked"]["by"].as_str().unwrap().is_empty(),
        "{show}"
    );
    fails_with(&s.rotator(&["--data-dir", dd, "rotate", "bob"]), 4);
    // Run again unchanged (as after a copy killed past its commit): the target
    // is recognised as this very copy, checked, and nothing is written.
    let again = ok(&s.rotator(&["database", "copy", "--to", &url]));
    assert!(
        again.contains("already held this database") && again.contains("row counts match"),
        "{again}"
    );
    assert_eq!(counts(&target).await, source);
    // A database that is not empty (and not this one as it is now) is refused,
    // and left as it was.
    ok(&s.rotator(&["add-user", "erin", "-n", "team-a", "--role", "view"]));
    let e = fails_with(&s.rotator(&["database", "copy", "--to", &url]), 6);
    assert!(e.contains("is not empty") && e.contains("fix:"), "{e}");
    assert_eq!(counts(&target).await, source);
    // So is the database in use.
    let own = format!("sqlite://{}", s.path("rotator-data/rotator.db").display());
    fails_with(&s.rotator(&["database", "copy", "--to", &own]), 6);
    // And a copy while the daemon runs: what it writes afterwards would be lost.
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"))
        .current_dir(s.dir.path())
        .args(["serve", "--metrics-addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let other = format!("sqlite://{}", s.path("new/other.db").display());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let e = loop {
        let o = s.rotator(&["database", "copy", "--to", &other]);
        if o.status.code() == Some(6) || std::time::Instant::now() > deadline {
            break fails_with(&o, 6);
        }
        // The daemon had not taken its lock yet: start over on a new target.
        let _ = std::fs::remove_file(s.path("new/other.db"));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(e.contains("daemon is running"), "{e}");
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().await.unwrap().success());
}

/// Row counts per copied table of the database at `url`, whichever the engine.
async fn counts_at(url: &str) -> Vec<(String, i64)> {
    sqlx::any::install_default_drivers();
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    let mut out = Vec::new();
    for t in rotator::store::copy::TABLES {
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {t}")))
            .fetch_one(&mut conn)
            .await
            .unwrap();
        out.push((t.to_string(), n));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_copy_moves_sqlite_to_postgres_and_back_and_rotator_runs_on_each_copy() {
    let Some(pg) =
        crate::pg::server_or_skip("database::database_copy_moves_sqlite_to_postgres_and_back")
    else {
        return;
    };
    let s = Scratch::on(Engine::Sqlite);
    for u in ["alice", "bob"] {
        ok(&s.rotator(&["add-user", u, "-n", "team-a", "--role", "view"]));
    }
    ok(&s.rotator(&[
        "add-user", "carol", "-n", "team-a", "--role", "view", "--enroll",
    ]));
    ok(&s.rotator(&["rotate", "alice"]));
    ok(&s.rotator(&["revoke", "bob"]));
    // On SQLite the checkpoint beside the database is the whole story.
    let on_sqlite: serde_json::Value =
        serde_json::from_str(&ok(&s.rotator(&["doctor", "--output", "json"]))).unwrap();
    assert!(
        !on_sqlite
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "audit checkpoint"),
        "{on_sqlite:#}"
    );
    let sqlite = format!("sqlite://{}", s.path("rotator-data/rotator.db").display());
    let source = counts_at(&sqlite).await;
    // SQLite -> PostgreSQL.
    let url = pg.create_database();
    let out = ok(&s.rotator(&["database", "copy", "--to", &url]));
    assert!(
        out.contains("row counts match and the audit chain verifies"),
        "{out}"
    );
    assert_eq!(counts_at(&url).await, source);
    for t in [
        "users",
        "credentials",
        "issuances",
        "enrollment_tokens",
        "audit_events",
        "meta",
    ] {
        assert!(
            source.iter().any(|(n, c)| n == t && *c > 0),
            "{t} has rows to copy"
        );
    }
    // rotator runs on the copy: the same users, the chain verifies, a rotate works.
    let on_pg = |args: &[&str]| s.rotator_env(args, &[("ROTATOR_DATABASE_URL", &url)]);
    assert!(ok(&on_pg(&["audit", "verify"])).contains("audit chain intact"));
    let bob = ok(&on_pg(&["show", "bob", "--output", "json"]));
    assert!(bob.contains("revoked"), "{bob}");
    ok(&on_pg(&["rotate", "alice", "--out", "alice-pg.kc"]));
    assert!(ok(&on_pg(&["audit", "verify"])).contains("audit chain intact"));
    // doctor says what a checkpoint in the data directory means on a shared database.
    let doctor: serde_json::Value =
        serde_json::from_str(&ok(&on_pg(&["doctor", "--output", "json"]))).unwrap();
    let note = doctor
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "audit checkpoint")
        .unwrap_or_else(|| panic!("no audit checkpoint check: {doctor:#}"));
    let detail = note["detail"].as_str().unwrap();
    assert!(
        detail.contains("this host's data directory")
            && detail.contains("checkpoint_old")
            && detail.contains("fix:"),
        "{detail}"
    );
    // PostgreSQL as the source: read in one snapshot (a row committed after the
    // snapshot's first read is not seen by its later reads) ...
    let snap = rotator::store::copy::snapshot(Engine::Postgres);
    let mut reader = <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::Executor::execute(&mut reader, snap).await.unwrap();
    async fn users(c: &mut sqlx::AnyConnection) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users")
            .fetch_one(c)
            .await
            .unwrap();
        n
    }
    let before = users(&mut reader).await;
    ok(&on_pg(&[
        "add-user", "dave", "-n", "team-a", "--role", "view",
    ]));
    assert_eq!(users(&mut reader).await, before, "the snapshot moved");
    drop(reader);
    // ... and copied into SQLite.
    std::fs::create_dir(s.path("back")).unwrap();
    let back = s.path("back/rotator.db");
    let out = ok(&on_pg(&[
        "database",
        "copy",
        "--to",
        &format!("sqlite://{}", back.display()),
    ]));
    assert!(
        out.contains("row counts match and the audit chain verifies"),
        "{out}"
    );
    assert!(out.contains("one consistent snapshot"), "{out}");
    assert_eq!(mode(&back), 0o600);
    assert_eq!(
        counts_at(&format!("sqlite://{}", back.display())).await,
        counts_at(&url).await
    );
    let dir = restore_into(&s, &back, "moved-back");
    let dd = dir.to_str().unwrap();
    assert!(ok(&s.rotator(&["--data-dir", dd, "audit", "verify"])).contains("audit chain intact"));
    let dave = ok(&s.rotator(&["--data-dir", dd, "show", "dave", "--output", "json"]));
    assert!(dave.contains("current"), "{dave}");
    ok(&s.rotator(&[
        "--data-dir",
        dd,
        "rotate",
        "alice",
        "--out",
        "alice-back.kc",
    ]));
    assert!(ok(&s.rotator(&["--data-dir", dd, "audit", "verify"])).contains("audit chain intact"));
}
