//! `rotator database copy` on a database that went through every state,
//! compared row for row between engines in both directions; and a copy
//! SIGKILLed at random points, then run again: nothing lost, nothing doubled,
//! and the rerun succeeds.
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rotator::app::App;
use rotator::config::{self, Overrides};
use rotator::flows::issue::NoFaults;
use rotator::store::copy::{KEPT, TABLES};
use rotator::store::schema::{self, Kind};
use rotator::support::clock::{Clock, ManualClock, SystemClock};

use crate::common::*;

/// Columns the target's own triggers stamp as rows arrive (migration 0013's
/// change counter): they number the target's history, not the source's.
const STAMPED: &[&str] = &["change_seq"];

/// Every copied table's rows, each row its columns as `name=value`, sorted:
/// equal dumps mean the same rows, whichever engine holds them.
type Dump = BTreeMap<String, Vec<Vec<String>>>;

async fn dump(url: &str) -> Dump {
    sqlx::any::install_default_drivers();
    let engine = if url.starts_with("postgres") {
        Engine::Postgres
    } else {
        Engine::Sqlite
    };
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    let mut out = Dump::new();
    for t in TABLES.iter().filter(|t| !KEPT.contains(t)) {
        let columns: Vec<_> = schema::columns(&mut conn, engine, t)
            .await
            .unwrap()
            .into_iter()
            .filter(|c| !STAMPED.contains(&c.name.as_str()))
            .collect();
        let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
        let sql = format!("SELECT {} FROM {t}", names.join(", "));
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let mut table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                use sqlx::Row;
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let v = match c.kind {
                            Kind::Integer => r
                                .try_get::<Option<i64>, _>(i)
                                .unwrap()
                                .map(|v| v.to_string()),
                            Kind::Text => r.try_get::<Option<String>, _>(i).unwrap(),
                        };
                        format!("{}={}", c.name, v.as_deref().unwrap_or("NULL"))
                    })
                    .collect()
            })
            .collect();
        table.sort();
        out.insert(t.to_string(), table);
    }
    out
}

/// Rows of `source` missing from `copy`, and rows of `copy` beyond those of
/// `source` (a row twice counts once extra), over every table.
fn lost_and_doubled(source: &Dump, copy: &Dump) -> (usize, usize) {
    let mut lost = 0;
    let mut doubled = 0;
    for (t, rows) in source {
        let mut n: BTreeMap<&Vec<String>, i64> = BTreeMap::new();
        for r in rows {
            *n.entry(r).or_default() += 1;
        }
        for r in copy.get(t).into_iter().flatten() {
            *n.entry(r).or_default() -= 1;
        }
        lost += n.values().filter(|v| **v > 0).sum::<i64>() as usize;
        doubled += n.values().filter(|v| **v < 0).map(|v| -v).sum::<i64>() as usize;
    }
    (lost, doubled)
}

/// An App over the scratch directory's SQLite database, at `clock`'s time.
async fn app_at(dir: &Path, clock: Arc<dyn Clock>) -> App {
    let cfg = dir.join("in-process.toml");
    std::fs::write(&cfg, format!("data_dir = {:?}\n", dir.join("rotator-data"))).unwrap();
    let settings = config::load_with(Some(&cfg), &[], &Overrides::default()).unwrap();
    App::open(settings, clock, Arc::new(NoFaults), "test".into())
        .await
        .unwrap()
        .0
}

/// `grace`'s enrollment token traded for a certificate, as `POST /v1/enroll` does.
async fn enroll(app: &App, user: &str, token: String) {
    use rotator::pki::{self, KeyType, PrivateKey};
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let generation = {
        let mut conn = app.store.conn().await.unwrap();
        rotator::store::issuances::next_generation(&mut conn, user)
            .await
            .unwrap()
    };
    let spec = rotator::store::users::find(&app.store, user)
        .await
        .unwrap()
        .unwrap()
        .spec;
    let mut orgs = spec.groups.clone();
    orgs.push(rotator::policy::generation_group(
        user,
        generation,
        &key.spki_der(),
    ));
    let der = pki::build_csr(&key, &pki::subject_name(user, &orgs).unwrap()).unwrap();
    let peer = rotator::flows::self_service::Peer {
        addr: "127.0.0.1:1".parse().unwrap(),
        certificate_der: None,
    };
    let req = rotator::flows::self_service::EnrollRequest {
        token,
        csr: pki::pem_encode("CERTIFICATE REQUEST", &der),
    };
    if let Err(e) = rotator::flows::self_service::enroll(app, &peer, req).await {
        panic!("enroll {user}: {e:?}");
    }
}

/// Takes the SQLite database of `s` through every state a credential, a
/// user, an issuance and a token can be in, by the commands that do it.
async fn every_state(s: &Scratch) {
    let add = |u: &str, extra: &[&str]| {
        let mut args = vec![
            "--output", "json", "add-user", u, "-n", "team-a", "--role", "view",
        ];
        args.extend_from_slice(extra);
        ok(&s.rotator(&args))
    };
    for u in ["alice", "bob", "carol", "dave", "erin"] {
        add(u, &[]);
    }
    add("henry", &["--ttl", "10m"]);
    ok(&s.rotator(&["rotate", "bob"]));
    ok(&s.rotator(&["revoke", "carol"]));
    ok(&s.rotator(&["remove-user", "dave"]));
    add("frank", &["--enroll"]); // its token stays unused
    let grace: serde_json::Value = serde_json::from_str(&add("grace", &["--enroll"])).unwrap();
    // An attempt that dies after planning, abandoned by the next one.
    let o = s.rotator_env(
        &["rotate", "alice"],
        &[("ROTATOR_FAULT", "after-plan:error")],
    );
    assert!(!o.status.success());
    ok(&s.rotator(&["rotate", "alice"]));

    let app = app_at(s.dir.path(), Arc::new(SystemClock)).await;
    // A delivery that fails: the credential waits, pending with its key sealed.
    let mut flaky = crate::crash::FlakySink {
        inner: rotator::delivery::FileSink {
            path: s.path("erin.kubeconfig"),
        },
        failures: 1,
    };
    let e = app.issuer().rotate("erin", &mut flaky, "test").await;
    assert!(e.is_err(), "the delivery fails");
    enroll(&app, "grace", grace["token"].as_str().unwrap().to_string()).await;
    // Tokens the kubernetes signer would record (no cluster here): one that
    // never expires (a NULL integer), one revoked.
    let mut conn = app.store.conn().await.unwrap();
    let now = SystemClock.now();
    for (id, expires, state) in [
        ("abcdef", None, "active"),
        ("ghijkl", Some(now + 3600), "revoked"),
    ] {
        let t = rotator::store::bootstrap_tokens::NewToken {
            id,
            secret_hash: "0123456789abcdef",
            description: "node join",
            groups: &["system:bootstrappers:nodes".into()],
            usages: &["authentication".into(), "signing".into()],
            expires_at: expires,
            created_by: "test",
        };
        rotator::store::bootstrap_tokens::insert_creating(&mut conn, &t, now)
            .await
            .unwrap();
        rotator::store::bootstrap_tokens::set_state(&mut conn, id, state, now)
            .await
            .unwrap();
    }
    sqlx::query(
        "INSERT INTO delivery_secrets (namespace, name, user_name, uid, created_at) VALUES ('team-a', 'alice-kubeconfig', 'alice', 'uid-1', $1)",
    )
    .bind(now)
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    app.store.close().await;
    // Twenty minutes on, henry's ten-minute credential has expired.
    let later = app_at(s.dir.path(), Arc::new(ManualClock::new(now + 1200))).await;
    assert!(rotator::flows::revoke::expire_pass(&later).await.unwrap() >= 1);
    later.store.close().await;
}

/// What a database in every state holds, so the copy is shown to carry each.
async fn assert_every_state(s: &Scratch) {
    let has = |sql: &'static str| async move { s.count(sql).await > 0 };
    for state in ["current", "superseded", "revoked", "expired", "pending"] {
        let sql: &'static str = Box::leak(
            format!("SELECT COUNT(*) FROM credentials WHERE state = '{state}'").into_boxed_str(),
        );
        assert!(has(sql).await, "a {state} credential");
    }
    for (what, sql) in [
        (
            "a removed user",
            "SELECT COUNT(*) FROM users WHERE state = 'removed'",
        ),
        (
            "a used enrollment token",
            "SELECT COUNT(*) FROM enrollment_tokens WHERE state = 'used'",
        ),
        (
            "an unused enrollment token",
            "SELECT COUNT(*) FROM enrollment_tokens WHERE state = 'active'",
        ),
        (
            "an abandoned issuance",
            "SELECT COUNT(*) FROM issuances WHERE step = 'abandoned'",
        ),
        (
            "a stored, undelivered issuance",
            "SELECT COUNT(*) FROM issuances WHERE step = 'stored'",
        ),
        (
            "a sealed key",
            "SELECT COUNT(*) FROM credentials WHERE sealed_key IS NOT NULL",
        ),
        (
            "a bootstrap token without expiry",
            "SELECT COUNT(*) FROM bootstrap_tokens WHERE expires_at IS NULL",
        ),
        ("a delivery Secret", "SELECT COUNT(*) FROM delivery_secrets"),
        (
            "a failed delivery",
            "SELECT COUNT(*) FROM audit_events WHERE action = 'delivery.fail'",
        ),
        (
            "an expiry",
            "SELECT COUNT(*) FROM audit_events WHERE action = 'credential.expire'",
        ),
        (
            "a renewal through the API",
            "SELECT COUNT(*) FROM issuances WHERE kind = 'renew'",
        ),
    ] {
        assert!(has(sql).await, "{what}");
    }
}

/// `rotator audit verify` on the database at `url`, with the source's data
/// directory (its audit key and checkpoint).
fn verify_at(s: &Scratch, url: &str) {
    let out = ok(&s.rotator_env(&["audit", "verify"], &[("ROTATOR_DATABASE_URL", url)]));
    assert!(out.contains("audit chain intact"), "{url}: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_in_every_state_copies_row_for_row_sqlite_to_postgres_and_back() {
    let Some(pg) = crate::pg::server_or_skip("copy::a_database_in_every_state_copies_row_for_row")
    else {
        return;
    };
    let s = Scratch::on(Engine::Sqlite);
    every_state(&s).await;
    assert_every_state(&s).await;
    let sqlite = format!("sqlite://{}", s.path("rotator-data/rotator.db").display());
    let source = dump(&sqlite).await;

    let url = pg.create_database();
    let out = ok(&s.rotator(&["database", "copy", "--to", &url]));
    assert!(out.contains("row counts match"), "{out}");
    let on_pg = dump(&url).await;
    assert_eq!(lost_and_doubled(&source, &on_pg), (0, 0));
    assert_eq!(on_pg, source, "SQLite -> PostgreSQL, row for row");
    verify_at(&s, &url);

    std::fs::create_dir(s.path("back")).unwrap();
    let back = format!("sqlite://{}", s.path("back/rotator.db").display());
    ok(&s.rotator_env(
        &["database", "copy", "--to", &back],
        &[("ROTATOR_DATABASE_URL", &url)],
    ));
    let on_sqlite = dump(&back).await;
    assert_eq!(lost_and_doubled(&source, &on_sqlite), (0, 0));
    assert_eq!(on_sqlite, source, "PostgreSQL -> SQLite, row for row");
    verify_at(&s, &back);
}

/// Copies the every-state database into new targets on `engine`, each run
/// SIGKILLed after a random delay up to a whole copy's time and then run
/// again, as an operator would: the target ends with exactly the source's rows.
async fn killed_and_rerun(engine: Engine, label: &str) {
    let pg = match engine {
        Engine::Postgres => match crate::pg::server_or_skip(label) {
            Some(pg) => Some(pg),
            None => return,
        },
        Engine::Sqlite => None,
    };
    let s = Scratch::on(Engine::Sqlite);
    every_state(&s).await;
    let sqlite = format!("sqlite://{}", s.path("rotator-data/rotator.db").display());
    let source = dump(&sqlite).await;
    const ROUNDS: usize = 8;
    let target = |round: usize| match engine {
        Engine::Postgres => pg.as_ref().expect("PostgreSQL").create_database(),
        Engine::Sqlite => {
            let dir = s.path(&format!("t{round}"));
            std::fs::create_dir(&dir).unwrap();
            format!("sqlite://{}", dir.join("rotator.db").display())
        }
    };
    // How long a whole copy takes here (the faster of two: the first pays
    // for cold caches): the kills fall anywhere inside it.
    let mut whole = u64::MAX;
    for round in [0, ROUNDS + 1] {
        let started = std::time::Instant::now();
        ok(&s.rotator(&["database", "copy", "--to", &target(round)]));
        whole = whole.min(started.elapsed().as_millis() as u64 + 1);
    }
    let (mut before_commit, mut after_commit, mut finished) = (0, 0, 0);
    let (mut lost, mut doubled) = (0, 0);
    for round in 1..=ROUNDS {
        let url = target(round);
        let delay = u64::from(u16::from_le_bytes(rotator::pki::random_bytes::<2>())) % whole;
        let mut child = s
            .command()
            .args(["database", "copy", "--to", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        let done_already = child.try_wait().unwrap().is_some();
        child.kill().unwrap_or(());
        child.wait().unwrap();
        // Run again, as an operator would: it finishes, or finds the copy
        // the killed run committed and checks it.
        let rerun = s.rotator(&["database", "copy", "--to", &url]);
        assert!(
            rerun.status.success(),
            "round {round} (killed after {delay} ms): the rerun failed: {}",
            String::from_utf8_lossy(&rerun.stderr)
        );
        if !String::from_utf8_lossy(&rerun.stdout).contains("already held this database") {
            before_commit += 1
        } else if done_already {
            finished += 1
        } else {
            after_commit += 1
        }
        let (l, d) = lost_and_doubled(&source, &dump(&url).await);
        lost += l;
        doubled += d;
        verify_at(&s, &url);
    }
    eprintln!(
        "{label}: {ROUNDS} rounds, kills within {whole} ms: {before_commit} before the commit (the rerun copied), {after_commit} after it (the rerun found the copy whole), {finished} after the copy ended; rows lost {lost}, doubled {doubled}"
    );
    assert_eq!((lost, doubled), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_postgres_killed_at_random_points_and_rerun_loses_and_doubles_nothing() {
    killed_and_rerun(Engine::Postgres, "copy::a_copy_into_postgres_killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_into_sqlite_killed_at_random_points_and_rerun_loses_and_doubles_nothing() {
    killed_and_rerun(Engine::Sqlite, "copy::a_copy_into_sqlite_killed").await;
}
