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
