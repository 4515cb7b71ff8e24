//! The store on either engine: many rotator processes at once on one database
//! keep every invariant, a database from a newer rotator is refused, an
//! unreachable server is named without its password.
use crate::common::*;

/// SQL both engines speak: rows breaking an invariant.
const TWO_CURRENT: &str = "SELECT COUNT(*) FROM (SELECT user_name FROM credentials WHERE state = 'current' GROUP BY user_name HAVING COUNT(*) > 1) x";
const REUSED_GENERATION: &str = "SELECT COUNT(*) FROM (SELECT user_name, generation FROM issuances GROUP BY user_name, generation HAVING COUNT(*) > 1) x";
const REUSED_GROUP: &str = "SELECT COUNT(*) FROM (SELECT generation_group FROM credentials WHERE generation_group IS NOT NULL GROUP BY generation_group HAVING COUNT(*) > 1) x";
const TWO_SUCCESSORS: &str = "SELECT COUNT(*) FROM (SELECT prev_hash FROM audit_events GROUP BY prev_hash HAVING COUNT(*) > 1) x";
const SEQ_GAPS: &str = "SELECT COUNT(*) FROM audit_events a WHERE a.seq > 1 AND NOT EXISTS (SELECT 1 FROM audit_events b WHERE b.seq = a.seq - 1)";

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_at_once_never_make_two_current_credentials_or_reuse_a_generation() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let users = ["alice", "bob", "carol"];
    for u in users {
        ok(&s.rotator(&["add-user", u, "-n", "team-a", "--role", "view", "--out", &format!("{u}.kc")]));
    }
    // Per user, at once: rotations, a revoke, a remove-user and an add-user.
    let mut children = Vec::new();
    for round in 0..6 {
        for u in users {
            let out = format!("{u}-{round}.kc");
            let args: Vec<String> = match round {
                0..=2 => vec!["rotate".into(), u.into(), "--out".into(), out],
                3 => vec!["revoke".into(), u.into()],
                4 if u == "carol" => vec!["remove-user".into(), u.into()],
                _ => vec!["add-user".into(), u.into(), "-n".into(), "team-a".into(), "--role".into(), "view".into(), "--out".into(), out],
            };
            let mut c = s.command();
            c.args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            children.push((args, c.spawn().unwrap()));
        }
    }
    let mut database_errors = Vec::new();
    for (args, child) in children {
        let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let code = o.status.code();
        assert!(code.is_some(), "{args:?} was killed by a signal");
        // Losing a race is a refusal or a conflict; never a database error.
        if code == Some(7) || code == Some(1) {
            database_errors.push((args, String::from_utf8_lossy(&o.stderr).into_owned()));
        }
    }
    assert!(database_errors.is_empty(), "{database_errors:#?}");
    assert_eq!(s.count(TWO_CURRENT).await, 0, "a user with two current credentials");
    assert_eq!(s.count(REUSED_GENERATION).await, 0, "a generation used twice");
    assert_eq!(s.count(REUSED_GROUP).await, 0, "a generation group used twice");
    assert_eq!(s.count(TWO_SUCCESSORS).await, 0, "an audit event with two successors");
    assert_eq!(s.count(SEQ_GAPS).await, 0, "a gap in the audit sequence");
    let verify = ok(&s.rotator(&["audit", "verify"]));
    assert!(verify.contains("audit chain intact"), "{verify}");
    // A revoke now leaves nobody current, whatever ran before.
    for u in ["alice", "bob"] {
        ok(&s.rotator(&["revoke", u]));
    }
    assert_eq!(
        s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current' AND user_name IN ('alice', 'bob')").await,
        0
    );
}

#[tokio::test]
async fn a_database_from_a_newer_rotator_is_refused_and_left_alone() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let mut db = s.db().await;
    sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES ($1, $2, $3, $4, $5)")
        .bind(9999i64)
        .bind("from a newer rotator")
        .bind(true)
        .bind(vec![0u8; 48])
        .bind(0i64)
        .execute(&mut db)
        .await
        .unwrap();
    drop(db);
    let events = s.count("SELECT COUNT(*) FROM audit_events").await;
    let e = fails_with(&s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]), 7);
    assert!(e.contains("newer rotator") && e.contains("9999") && e.contains("fix:"), "{e}");
    assert_eq!(s.count("SELECT COUNT(*) FROM audit_events").await, events);
    assert_eq!(s.count("SELECT COUNT(*) FROM users").await, 0);
}

#[tokio::test]
async fn a_password_in_the_database_url_is_never_printed() {
    let s = Scratch::new();
    // SQLite: a URL naming the file; PostgreSQL: the test database with a
    // password parameter (the test server trusts the socket, so it is unused).
    let url = match &s.database_url {
        Some(u) => format!("{u}&password=s3cret-pw"),
        None => format!("sqlite://{}", s.path("elsewhere.db").display()),
    };
    for args in [&["init"][..], &["doctor"], &["add-user", "alice", "-n", "team-a", "--role", "view"], &["list-users"]] {
        let o = s.rotator_env(args, &[("ROTATOR_DATABASE_URL", &url)]);
        let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{args:?}: {all}");
        assert!(!all.contains("s3cret-pw"), "{args:?} printed the password: {all}");
    }
    if s.database_url.is_none() {
        assert!(s.path("elsewhere.db").exists());
        assert!(!s.path("rotator-data/rotator.db").exists());
    }
}
}

#[test]
fn an_unreachable_server_is_named_without_its_password() {
    let s = Scratch::on(Engine::Sqlite);
    let url = "postgres://rotator:s3cret-pw@127.0.0.1:9/rotator?sslmode=disable";
    for o in [
        s.rotator(&["--database-url", url, "list-users"]),
        s.rotator_env(&["list-users"], &[("ROTATOR_DATABASE_URL", url)]),
    ] {
        let e = fails_with(&o, 7);
        assert!(
            e.contains("postgres://rotator:***@127.0.0.1:9/rotator"),
            "{e}"
        );
        assert!(e.contains("fix:"), "{e}");
        assert!(!e.contains("s3cret-pw"), "{e}");
    }
    let e = fails_with(
        &s.rotator(&["--database-url", "mysql://u:s3cret-pw@h/db", "list-users"]),
        3,
    );
    assert!(
        e.contains("database_url") && !e.contains("s3cret-pw"),
        "{e}"
    );
}

crate::engines! {
#[tokio::test]
async fn change_stamps_follow_commits_and_a_reader_never_skips_an_open_transaction() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    for u in ["alice", "bob", "carol"] {
        ok(&s.rotator(&["add-user", u, "-n", "team-a", "--role", "view", "--out", &format!("{u}.kc")]));
    }
    let counter = "SELECT seq FROM change_counter WHERE id = 1";
    let before = s.count(counter).await;
    // A writer touches every user twice in one transaction and has not
    // committed: a reader still sees the counter as it was, so the rows it
    // cannot see yet are not behind the `since` it will ask from next.
    let mut writer = s.db().await;
    let mut tx = sqlx::Connection::begin(&mut writer).await.unwrap();
    for _ in 0..2 {
        sqlx::query("UPDATE users SET state = state").execute(&mut *tx).await.unwrap();
    }
    assert_eq!(s.count(counter).await, before, "an open transaction's stamps are not visible");
    tx.commit().await.unwrap();
    let after = s.count(counter).await;
    assert!(after > before);
    let stamped = users_stamped(&s, before, after).await;
    assert_eq!(stamped, 3, "every row the transaction changed is after the counter it was read at");
    // The next transaction's stamps are all after this one's.
    let mut tx = sqlx::Connection::begin(&mut writer).await.unwrap();
    sqlx::query("UPDATE users SET state = state WHERE name = 'bob'").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    let later = users_stamped(&s, after, i64::MAX).await;
    assert_eq!(later, 1);
}
}

/// Users whose change stamp is in (`after`, `upto`].
async fn users_stamped(s: &Scratch, after: i64, upto: i64) -> i64 {
    let (n,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM users WHERE change_seq > $1 AND change_seq <= $2")
            .bind(after)
            .bind(upto)
            .fetch_one(&mut s.db().await)
            .await
            .unwrap();
    n
}

/// A user lock whose database session ends (a server restart, a killed
/// backend) says so, and the lock is free for another process at once: a sync
/// that held it must run again (`access::sync_user` does).
#[tokio::test]
async fn a_user_lock_whose_session_ended_says_so() {
    let Some(_pg) = use_engine(
        Engine::Postgres,
        "engines::a_user_lock_whose_session_ended_says_so",
    ) else {
        return;
    };
    let s = Scratch::new();
    let app = plain_app(s.dir.path()).await;
    let mut lock = app.store.lock_user("alice").await.unwrap();
    assert!(lock.still_held().await);
    // The lock's own backend, killed from another session.
    let (killed,): (i64,) = sqlx::query_as(
        // This test's database only: the server is shared with other tests.
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()
            AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&mut s.db().await)
    .await
    .unwrap();
    assert_eq!(killed, 1, "the user lock's session");
    assert!(
        !lock.still_held().await,
        "a lock whose session ended is not held"
    );
    // Another process could take it now: so can this one.
    let mut again = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.store.lock_user("alice"),
    )
    .await
    .expect("the lock is free")
    .unwrap();
    assert!(again.still_held().await);
}
