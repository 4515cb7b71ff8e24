//! The audit log against someone who can write to the database file: deletion at
//! the end, deletion of everything, editing and re-hashing, the checkpoint lost or
//! rolled back; the export; bounded rows.
use base64::Engine;
use sqlx::Connection;

use crate::common::*;

/// Old (unkeyed) formula: SHA-256 of the JSON array, as rotator before 0008 and
/// anyone without the key would compute it.
fn unkeyed_hash(e: &Row) -> String {
    let c = serde_json::to_vec(&(
        e.seq,
        e.time,
        &e.actor,
        &e.action,
        &e.subject,
        &e.detail,
        &e.prev_hash,
    ))
    .unwrap();
    hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &c).as_ref())
}

/// The keyed formula, written independently of rotator's code (README "Audit").
fn keyed_mac(key: &[u8], e: &Row) -> String {
    let c = serde_json::to_vec(&(
        "rotator-audit-event-v1",
        e.seq,
        e.time,
        &e.actor,
        &e.action,
        &e.subject,
        &e.detail,
        &e.prev_hash,
    ))
    .unwrap();
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    hex(aws_lc_rs::hmac::sign(&k, &c).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Deserialize)]
struct Row {
    seq: i64,
    time: i64,
    actor: String,
    action: String,
    subject: String,
    detail: String,
    prev_hash: String,
    hash: String,
    keyed: bool,
}

/// A connection with the append-only triggers dropped: the file's owner can.
async fn tamper(s: &Scratch) -> sqlx::SqliteConnection {
    let url = format!("sqlite://{}", s.path("rotator-data/rotator.db").display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    for q in [
        "DROP TRIGGER IF EXISTS audit_events_no_update",
        "DROP TRIGGER IF EXISTS audit_events_no_delete",
    ] {
        sqlx::query(q).execute(&mut conn).await.unwrap();
    }
    conn
}

async fn rows(conn: &mut sqlx::SqliteConnection) -> Vec<Row> {
    sqlx::query_as("SELECT * FROM audit_events ORDER BY seq")
        .fetch_all(conn)
        .await
        .unwrap()
}

/// Some history: five or more events.
fn history(s: &Scratch) {
    ok(&s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]));
    ok(&s.rotator(&["rotate", "alice"]));
    ok(&s.rotator(&["add-user", "bob", "-n", "team-a", "--role", "view"]));
    ok(&s.rotator(&["revoke", "bob"]));
    // Three certificates, signed the way the scratch says (in process or by the signer).
    s.assert_signed("rotator-data", 3);
}

fn verify_fails(s: &Scratch, kind: &str) -> String {
    let e = fails_with(&s.rotator(&["audit", "verify"]), 11);
    assert!(e.contains(&format!("({kind})")), "expected {kind}: {e}");
    fails_with(&s.rotator(&["doctor"]), 11);
    e
}

/// Rewrites events from `from` on with the old unkeyed formula (what someone
/// without the key can do), optionally editing event `from` first.
async fn rehash_unkeyed(conn: &mut sqlx::SqliteConnection, from: i64, edit: bool) {
    let all = rows(conn).await;
    let mut prev = if from == 1 {
        "0".repeat(64)
    } else {
        all[(from - 2) as usize].hash.clone()
    };
    for mut r in all.into_iter().filter(|r| r.seq >= from) {
        if edit && r.seq == from {
            r.subject = "mallory".into();
        }
        r.prev_hash = prev.clone();
        r.hash = unkeyed_hash(&r);
        sqlx::query(
            "UPDATE audit_events SET subject = ?, prev_hash = ?, hash = ?, keyed = 0 WHERE seq = ?",
        )
        .bind(&r.subject)
        .bind(&r.prev_hash)
        .bind(&r.hash)
        .bind(r.seq)
        .execute(&mut *conn)
        .await
        .unwrap();
        prev = r.hash;
    }
}

signing_variants! {
// SQLite only: the tampering edits the SQLite file itself (triggers dropped,
// as the file's owner can); the signing variants still both run.
sqlite_only:
#[tokio::test]
async fn deleting_the_last_events_is_named_a_truncation(signing: Signing) {
    let s = Scratch::signing(signing);
    history(&s);
    ok(&s.rotator(&["audit", "verify"]));
    let mut conn = tamper(&s).await;
    let n = rows(&mut conn).await.len() as i64;
    sqlx::query("DELETE FROM audit_events WHERE seq > ?")
        .bind(n - 2)
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let e = verify_fails(&s, "truncated");
    assert!(e.contains(&format!("broken at event {}", n - 1)), "{e}");
    assert!(e.contains("the last 2 were deleted"), "{e}");
    // Later changes do not paper over it: the checkpoint is not moved forward
    // over a log that lost the event it recorded.
    let head = std::fs::read(s.path("rotator-data/audit.head")).unwrap();
    for u in ["carol", "dave", "erin"] {
        ok(&s.rotator(&["add-user", u, "-n", "team-a", "--role", "view"]));
    }
    assert_eq!(
        std::fs::read(s.path("rotator-data/audit.head")).unwrap(),
        head
    );
    let e = verify_fails(&s, "replaced");
    assert!(e.contains("reset-checkpoint"), "{e}");
    // Once looked into, the operator vouches for the log as it is; the reset is audited.
    ok(&s.rotator(&["audit", "reset-checkpoint"]));
    ok(&s.rotator(&["audit", "verify"]));
}
}

signing_variants! {
// SQLite only: the tampering edits the SQLite file itself (triggers dropped,
// as the file's owner can); the signing variants still both run.
sqlite_only:
#[tokio::test]
async fn deleting_every_event_is_named(signing: Signing) {
    let s = Scratch::signing(signing);
    history(&s);
    let mut conn = tamper(&s).await;
    sqlx::query("DELETE FROM audit_events")
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let e = verify_fails(&s, "emptied");
    assert!(e.contains("every event was deleted"), "{e}");
}
}

signing_variants! {
// SQLite only: the tampering edits the SQLite file itself (triggers dropped,
// as the file's owner can); the signing variants still both run.
sqlite_only:
#[tokio::test]
async fn an_edited_chain_re_hashed_without_the_key_is_named(signing: Signing) {
    // Edit event 3 and recompute the chain from there with the unkeyed formula.
    let s = Scratch::signing(signing);
    history(&s);
    let mut conn = tamper(&s).await;
    rehash_unkeyed(&mut conn, 3, true).await;
    drop(conn);
    let e = verify_fails(&s, "rehashed");
    assert!(e.contains("broken at event 3"), "{e}");

    // The whole chain recomputed, the checkpoint deleted too: still named.
    let s = Scratch::signing(signing);
    history(&s);
    let mut conn = tamper(&s).await;
    rehash_unkeyed(&mut conn, 1, true).await;
    drop(conn);
    let e = verify_fails(&s, "rehashed");
    assert!(e.contains("broken at event 1"), "{e}");
    std::fs::remove_file(s.path("rotator-data/audit.head")).unwrap();
    verify_fails(&s, "checkpoint_missing");

    // Edited but left keyed: its MAC no longer holds.
    let s = Scratch::signing(signing);
    history(&s);
    let mut conn = tamper(&s).await;
    let r = &rows(&mut conn).await[2];
    let mut edited = r.clone();
    edited.subject = "mallory".into();
    sqlx::query("UPDATE audit_events SET subject = ?, hash = ? WHERE seq = 3")
        .bind(&edited.subject)
        .bind(unkeyed_hash(&edited))
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    verify_fails(&s, "altered");
}
}

signing_variants! {
#[tokio::test]
async fn a_missing_checkpoint_stays_visible_until_reset(signing: Signing) {
    let s = Scratch::signing(signing);
    history(&s);
    let head = s.path("rotator-data/audit.head");
    std::fs::remove_file(&head).unwrap();
    let e = verify_fails(&s, "checkpoint_missing");
    assert!(e.contains("reset-checkpoint"), "{e}");
    // A later commit does not recreate it (that would hide a truncation made
    // together with its deletion).
    ok(&s.rotator(&["add-user", "carol", "-n", "team-a", "--role", "view"]));
    assert!(!head.exists());
    verify_fails(&s, "checkpoint_missing");
    let out = ok(&s.rotator(&["audit", "reset-checkpoint"]));
    assert!(out.contains("it was missing"), "{out}");
    assert_eq!(mode(&head), 0o600);
    ok(&s.rotator(&["audit", "verify"]));
    let log = ok(&s.rotator(&["audit", "log", "--output", "json"]));
    assert!(log.contains("audit.checkpoint_reset"), "{log}");
    ok(&s.rotator(&["add-user", "dave", "-n", "team-a", "--role", "view"]));
    ok(&s.rotator(&["audit", "verify"]));
}
}

signing_variants! {
#[tokio::test]
async fn an_old_checkpoint_put_back_or_a_forged_one_is_named(signing: Signing) {
    let s = Scratch::signing(signing);
    ok(&s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]));
    let head = s.path("rotator-data/audit.head");
    let old = std::fs::read(&head).unwrap();
    ok(&s.rotator(&["rotate", "alice"]));
    std::fs::write(&head, &old).unwrap();
    verify_fails(&s, "checkpoint_old");

    // A checkpoint edited to vouch for less: its MAC does not hold.
    let text = String::from_utf8(old).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["seq"] = serde_json::json!(1);
    std::fs::write(&head, v.to_string()).unwrap();
    verify_fails(&s, "checkpoint_invalid");
}
}

signing_variants! {
#[tokio::test]
async fn concurrent_writers_never_move_the_checkpoint_back(signing: Signing) {
    let s = Scratch::signing(signing);
    ok(&s.rotator(&["init"]));
    let mut kids = Vec::new();
    for i in 0..8 {
        kids.push(
            tokio::process::Command::from(s.command())
                .args([
                    "add-user",
                    &format!("u{i}"),
                    "-n",
                    "team-a",
                    "--role",
                    "view",
                ])
                .output(),
        );
    }
    for k in kids {
        ok(&k.await.unwrap());
    }
    let out = ok(&s.rotator(&["audit", "verify", "--output", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["checkpoint"], v["events"], "{v}");
    assert!(v["first_break"].is_null(), "{v}");
}
}

signing_variants! {
// SQLite only: the tampering edits the SQLite file itself (triggers dropped,
// as the file's owner can); the signing variants still both run.
sqlite_only:
#[tokio::test]
async fn an_older_database_with_unkeyed_events_still_verifies_and_is_protected(signing: Signing) {
    let s = Scratch::signing(signing);
    history(&s);
    // Make it look like a database from before keyed events: every event unkeyed,
    // no key, no checkpoint.
    let mut conn = tamper(&s).await;
    rehash_unkeyed(&mut conn, 1, false).await;
    let old = rows(&mut conn).await.len() as i64;
    drop(conn);
    std::fs::remove_file(s.path("rotator-data/audit.key")).unwrap();
    std::fs::remove_file(s.path("rotator-data/audit.head")).unwrap();
    ok(&s.rotator(&["audit", "verify"]));
    assert_eq!(mode(&s.path("rotator-data/audit.key")), 0o600);
    ok(&s.rotator(&["add-user", "carol", "-n", "team-a", "--role", "view"]));
    let out = ok(&s.rotator(&["audit", "verify", "--output", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["first_break"].is_null(), "{v}");
    assert_eq!(
        v["events"].as_i64().unwrap() - v["keyed"].as_i64().unwrap(),
        old
    );
    // Re-hashing the old, unkeyed part is caught by the first keyed event.
    let mut conn = tamper(&s).await;
    rehash_unkeyed(&mut conn, 2, true).await;
    drop(conn);
    // (rehash_unkeyed rewrote the keyed tail as unkeyed too: named at the first.)
    verify_fails(&s, "rehashed");
}
}

signing_variants! {
#[tokio::test]
async fn a_key_readable_by_others_is_refused_and_a_lost_key_is_not_replaced(signing: Signing) {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::signing(signing);
    history(&s);
    let key = s.path("rotator-data/audit.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = fails_with(&s.rotator(&["audit", "verify"]), 3);
    assert!(e.contains("mode 0644") && e.contains("chmod 600"), "{e}");
    std::fs::remove_file(&key).unwrap();
    let e = fails_with(&s.rotator(&["audit", "verify"]), 3);
    assert!(e.contains("keyed events") && e.contains("restore"), "{e}");
    assert!(!key.exists());
}
}

signing_variants! {
// SQLite only: the tampering edits the SQLite file itself (triggers dropped,
// as the file's owner can); the signing variants still both run.
sqlite_only:
#[tokio::test]
async fn export_streams_every_event_as_a_json_line_that_verifies(signing: Signing) {
    let s = Scratch::signing(signing);
    history(&s);
    let out = ok(&s.rotator(&["audit", "export", "--out", "audit.jsonl"]));
    assert!(out.is_empty(), "the export goes to the file: {out}");
    let file = s.path("audit.jsonl");
    assert_eq!(mode(&file), 0o600);
    let key = base64::engine::general_purpose::STANDARD
        .decode(
            std::fs::read_to_string(s.path("rotator-data/audit.key"))
                .unwrap()
                .trim(),
        )
        .unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<Row> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let n = s.count("SELECT COUNT(*) FROM audit_events").await;
    assert_eq!(lines.len() as i64, n);
    let mut conn = tamper(&s).await;
    let db = rows(&mut conn).await;
    let mut prev = "0".repeat(64);
    for (l, d) in lines.iter().zip(&db) {
        assert_eq!((l.seq, &l.hash, &l.detail), (d.seq, &d.hash, &d.detail));
        assert_eq!(l.prev_hash, prev);
        assert!(l.keyed);
        assert_eq!(keyed_mac(&key, l), l.hash, "event {}", l.seq);
        prev = l.hash.clone();
    }
    // From a seq, to stdout.
    let out = ok(&s.rotator(&["audit", "export", "--from", "3"]));
    let seqs: Vec<i64> = out
        .lines()
        .map(|l| serde_json::from_str::<Row>(l).unwrap().seq)
        .collect();
    assert_eq!(seqs, (3..=n).collect::<Vec<_>>());
    // A FIFO at --out is refused, nothing written, nothing hangs.
    let fifo = s.path("fifo");
    run("mkfifo", &[fifo.to_str().unwrap()]);
    fails_with(
        &s.rotator(&["audit", "export", "--out", fifo.to_str().unwrap()]),
        10,
    );
}
}

#[tokio::test]
async fn a_60kb_value_makes_a_small_row() {
    let d = tempfile::tempdir().unwrap();
    let app = plain_app(d.path()).await;
    let big = "A".repeat(60 * 1024);
    let mut tx = app.store.begin().await.unwrap();
    let seq = rotator::store::audit::append(
        &mut tx,
        1,
        &big,
        "api.refuse",
        &big,
        serde_json::json!({"path": big, "headers": vec![big.clone(); 500], "nested": {"x": [big]}}),
    )
    .await
    .unwrap();
    rotator::store::commit(tx).await.unwrap();
    let (len, subject): (i64, String) = sqlx::query_as(
        "SELECT length(actor) + length(subject) + length(detail), subject FROM audit_events WHERE seq = ?",
    )
    .bind(seq)
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert!(len < 10_000, "row holds {len} bytes");
    assert!(subject.ends_with("[cut: 61440 bytes]"), "{subject}");
    let r = rotator::store::audit::verify(&app.store).await.unwrap();
    assert!(r.first_break.is_none(), "{r:?}");
}

#[tokio::test]
async fn verify_and_export_page_through_a_long_log() {
    use futures_util::TryStreamExt;
    let d = tempfile::tempdir().unwrap();
    let app = plain_app(d.path()).await;
    let mut tx = app.store.begin().await.unwrap();
    for i in 0..2500 {
        rotator::store::audit::append(
            &mut tx,
            i,
            "test",
            "bench.event",
            "u",
            serde_json::json!({"i": i}),
        )
        .await
        .unwrap();
    }
    rotator::store::commit(tx).await.unwrap();
    let r = rotator::store::audit::verify(&app.store).await.unwrap();
    assert!(r.first_break.is_none(), "{r:?}");
    assert_eq!(r.checkpoint, Some(r.events));
    let seqs: Vec<i64> = rotator::store::audit::stream(&app.store, 990)
        .map_ok(|e| e.seq)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(seqs, (990..=r.events).collect::<Vec<_>>());
    // A gap on a page boundary is still a gap.
    let mut conn = app.store.pool().acquire().await.unwrap();
    sqlx::query("DROP TRIGGER audit_events_no_delete")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_events WHERE seq = 1000")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let b = rotator::store::audit::verify(&app.store)
        .await
        .unwrap()
        .first_break
        .unwrap();
    assert_eq!((b.seq, b.kind.name()), (1001, "gap"), "{b:?}");
}

signing_variants! {
// SQLite only: the tampering edits the SQLite file itself (triggers dropped,
// as the file's owner can); the signing variants still both run.
sqlite_only:
#[tokio::test]
async fn processes_starting_together_on_an_unkeyed_log_share_one_new_key(signing: Signing) {
    let s = Scratch::signing(signing);
    ok(&s.rotator(&["init"]));
    let mut conn = tamper(&s).await;
    rehash_unkeyed(&mut conn, 1, false).await;
    drop(conn);
    std::fs::remove_file(s.path("rotator-data/audit.key")).unwrap();
    std::fs::remove_file(s.path("rotator-data/audit.head")).unwrap();
    let kids: Vec<_> = (0..6)
        .map(|i| {
            tokio::process::Command::from(s.command())
                .args([
                    "add-user",
                    &format!("u{i}"),
                    "-n",
                    "team-a",
                    "--role",
                    "view",
                ])
                .output()
        })
        .collect();
    for k in kids {
        ok(&k.await.unwrap());
    }
    let out = ok(&s.rotator(&["audit", "verify", "--output", "json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["first_break"].is_null(), "{v}");
    assert_eq!(v["checkpoint"], v["events"], "{v}");
}
}

/// The checkpoint's seq, read from its file.
fn checkpoint_seq(s: &Scratch) -> i64 {
    let text = std::fs::read_to_string(s.path("rotator-data/audit.head")).unwrap();
    serde_json::from_str::<serde_json::Value>(text.trim()).unwrap()["seq"]
        .as_i64()
        .unwrap()
}

/// One event committed through `app`'s store.
async fn event(app: &rotator::app::App, subject: &str) {
    let mut tx = app.store.begin().await.unwrap();
    rotator::store::audit::append(
        &mut tx,
        app.clock.now(),
        "test",
        "test.event",
        subject,
        serde_json::json!({}),
    )
    .await
    .unwrap();
    rotator::store::commit(tx).await.unwrap();
}

/// A long-running process (the daemon) whose log lost its last events and
/// whose checkpoint another process reset behind them: each commit it makes
/// afterwards still returns only once the checkpoint covers it (what it
/// remembered of the checkpoint from before is not trusted: seqs went back).
// SQLite only: the tampering edits the SQLite file itself.
#[tokio::test]
async fn a_running_process_keeps_covering_its_commits_after_the_checkpoint_was_reset_behind_it() {
    let s = Scratch::on(crate::common::Engine::Sqlite);
    ok(&s.rotator(&["init"]));
    let app = crate::common::plain_app(s.dir.path()).await;
    for i in 0..5 {
        event(&app, &format!("before-{i}")).await;
    }
    let n = checkpoint_seq(&s);
    let mut conn = tamper(&s).await;
    sqlx::query("DELETE FROM audit_events WHERE seq > ?")
        .bind(n - 3)
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    ok(&s.rotator(&["audit", "reset-checkpoint"]));
    // The reset is itself an audited event, committed by the CLI.
    let reset = checkpoint_seq(&s);
    assert!(reset < n, "the checkpoint went back ({reset} < {n})");
    for i in 0..3 {
        event(&app, &format!("after-{i}")).await;
        let (last,): (i64,) = sqlx::query_as("SELECT MAX(seq) FROM audit_events")
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        assert_eq!(
            checkpoint_seq(&s),
            last,
            "commit {i} after the reset returned with the checkpoint behind it"
        );
    }
    ok(&s.rotator(&["audit", "verify"]));
}

/// The seq of the checkpoint at `path`.
fn checkpoint_seq_at(path: &std::path::Path) -> i64 {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str::<serde_json::Value>(text.trim()).unwrap()["seq"]
        .as_i64()
        .unwrap()
}

async fn last_seq(app: &rotator::app::App) -> i64 {
    let (last,): (i64,) = sqlx::query_as("SELECT MAX(seq) FROM audit_events")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    last
}

/// Makes every checkpoint write of `data` fail: a directory where its lock
/// file goes (we run as root, so file modes would not stop a write).
fn break_checkpoint_lock(data: &std::path::Path) -> std::path::PathBuf {
    let lock = data.join("audit.head.lock");
    let _ = std::fs::remove_file(&lock);
    std::fs::create_dir(&lock).unwrap();
    lock
}

/// The value of the sample `name` (no labels) in a metrics text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

crate::engines! {
/// A command whose change committed but whose checkpoint write failed exits 0
/// (the change stands: a failure would make a script run it again) and says so
/// on stderr with the fix; `audit verify` and `doctor` name it; the next
/// change after the fix brings the checkpoint up to date.
#[tokio::test]
async fn a_failed_checkpoint_write_is_reported_and_the_next_commit_heals_it() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let before = checkpoint_seq(&s);
    let lock = break_checkpoint_lock(&s.path("rotator-data"));
    let o = s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("audit checkpoint not updated")
            && err.contains("warning: the change is committed (and audited), but the audit checkpoint")
            && err.contains("rotator-data/audit.head.lock: Is a directory")
            && err.contains("fix:"),
        "{err}"
    );
    ok(&s.rotator(&["show", "alice"]));
    assert_eq!(checkpoint_seq(&s), before, "the checkpoint did not move");
    let e = verify_fails(&s, "checkpoint_old");
    assert!(e.contains("that write failed"), "{e}");
    let o = s.rotator(&["doctor", "--output", "json"]);
    fails_with(&o, 11);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let checks: serde_json::Value = serde_json::from_str(&out).unwrap();
    let w = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "audit checkpoint writable")
        .unwrap_or_else(|| panic!("{checks}"));
    assert_eq!(w["ok"], false, "{w}");
    let detail = w["detail"].as_str().unwrap();
    assert!(
        detail.contains("rotator-data/audit.head.lock") && detail.contains("fix:"),
        "{detail}"
    );
    // Fixed, but nothing written since: still behind until the next change.
    std::fs::remove_dir(&lock).unwrap();
    verify_fails(&s, "checkpoint_old");
    let o = s.rotator(&["add-user", "bob", "-n", "team-a", "--role", "view"]);
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("checkpoint not updated") && !err.contains("warning:"),
        "{err}"
    );
    ok(&s.rotator(&["audit", "verify"]));
    let out = ok(&s.rotator(&["doctor", "--output", "json"]));
    assert!(out.contains("can be replaced atomically"), "{out}");
}
}

crate::engines! {
/// In a daemon: the failure is counted in /metrics and shown in /readyz (which
/// stays ready: the change is committed), and a scrape after the fix retries the
/// write and heals it without waiting for another commit.
#[tokio::test]
async fn a_failed_checkpoint_write_is_counted_and_shown_until_a_retry_heals_it() {
    let d = tempfile::tempdir().unwrap();
    let app = plain_app(d.path()).await;
    let data = d.path().join("rotator-data");
    let head = data.join("audit.head");
    event(&app, "before").await;
    assert_eq!(checkpoint_seq_at(&head), last_seq(&app).await);
    let m = rotator::daemon::health::metrics_text(&app).await.unwrap();
    assert_eq!(sample(&m, "rotator_audit_checkpoint_write_failures_total"), 0.0);
    assert_eq!(sample(&m, "rotator_audit_checkpoint_behind"), 0.0);
    assert!(rotator::daemon::health::warnings(&app).await.is_empty());

    let lock = break_checkpoint_lock(&data);
    event(&app, "while broken").await; // committed: commit returns Ok
    let last = last_seq(&app).await;
    assert!(checkpoint_seq_at(&head) < last);
    let h = app.store.audit_keyring().unwrap().checkpoint_health();
    assert_eq!(h.failures, 1, "{h:?}");
    assert_eq!(h.behind.as_ref().map(|b| b.seq), Some(last), "{h:?}");
    let m = rotator::daemon::health::metrics_text(&app).await.unwrap();
    // The scrape retried once, and failed again.
    assert_eq!(sample(&m, "rotator_audit_checkpoint_write_failures_total"), 2.0);
    assert_eq!(sample(&m, "rotator_audit_checkpoint_behind"), 1.0);
    let w = rotator::daemon::health::warnings(&app).await;
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].0, "audit checkpoint");
    assert!(
        w[0].1.contains(&format!("behind event {last}"))
            && w[0].1.contains(&lock.display().to_string())
            && w[0].1.contains("fix:")
            && w[0].1.contains("committed"),
        "{w:?}"
    );
    assert!(
        rotator::store::audit::verify(&app.store)
            .await
            .unwrap()
            .first_break
            .is_some_and(|b| b.kind.name() == "checkpoint_old")
    );

    std::fs::remove_dir(&lock).unwrap();
    assert!(rotator::daemon::health::warnings(&app).await.is_empty(), "healed by the retry");
    assert_eq!(checkpoint_seq_at(&head), last);
    let m = rotator::daemon::health::metrics_text(&app).await.unwrap();
    assert_eq!(sample(&m, "rotator_audit_checkpoint_write_failures_total"), 3.0);
    assert_eq!(sample(&m, "rotator_audit_checkpoint_behind"), 0.0);
    let r = rotator::store::audit::verify(&app.store).await.unwrap();
    assert!(r.first_break.is_none(), "{r:?}");
}
}

crate::engines! {
/// A commit future dropped after its COMMIT, while it waits for the
/// checkpoint (a daemon job cut off at its stop grace): the checkpoint still
/// comes to cover it, without waiting for another commit, and `settle` (what
/// the CLI awaits before its runtime stops) waits for that write.
#[tokio::test]
async fn a_commit_dropped_before_its_checkpoint_write_is_still_covered() {
    let d = tempfile::tempdir().unwrap();
    let app = plain_app(d.path()).await;
    let data = d.path().join("rotator-data");
    let head = data.join("audit.head");
    event(&app, "before").await;
    // Another process's checkpoint write holds the lock.
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(data.join("audit.head.lock"))
        .unwrap();
    held.lock().unwrap();
    let mut tx = app.store.begin().await.unwrap();
    rotator::store::audit::append(&mut tx, app.clock.now(), "test", "test.event", "cut", serde_json::json!({}))
        .await
        .unwrap();
    let cut = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        rotator::store::commit(tx),
    )
    .await;
    assert!(cut.is_err(), "the commit waited for the checkpoint lock");
    let last = last_seq(&app).await;
    assert!(checkpoint_seq_at(&head) < last, "committed, not yet covered");
    let ring = app.store.audit_keyring().unwrap();
    // What a process waits for before its runtime stops: the write goes on.
    assert!(
        !ring.settle(std::time::Duration::from_millis(200)).await,
        "the write waits for the lock"
    );
    drop(held);
    assert!(
        ring.settle(std::time::Duration::from_secs(10)).await,
        "the write ended"
    );
    assert_eq!(
        checkpoint_seq_at(&head),
        last,
        "the dropped commit's head was never covered"
    );
    let r = rotator::store::audit::verify(&app.store).await.unwrap();
    assert!(r.first_break.is_none(), "{r:?}");
}
}
