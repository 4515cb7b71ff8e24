//! The daemon's rotate pass over many tracked credentials, on SQLite and on
//! PostgreSQL in the same run: passes that find nothing due, and passes that
//! renew 1,000 (through the kubernetes signer against the Kubernetes API test
//! server, 16 at a time, no signer rate limit), at 10,000 and 100,000
//! credentials. Prints p50 and mean per pass and the PostgreSQL / SQLite ratio.
//!
//!   cargo bench --bench rotate_pass
//!   ROTATE_SIZES=10000,100000 ROTATE_DUE=1000 ROTATE_IDLE_PASSES=5 ROTATE_DUE_PASSES=3 \
//!     BENCH_ENGINES=sqlite,postgres cargo bench --bench rotate_pass
//!
//! The database is seeded through engine-neutral SQL (`$N` placeholders,
//! multi-row INSERTs, 1,000 users a transaction). PostgreSQL is a throwaway server on a
//! Unix socket with its default durability; without `initdb` the bench says
//! loudly that PostgreSQL was not measured.
#[path = "common/pg.rs"]
mod pg;
#[path = "common/shared.rs"]
mod shared;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use pg::Engine;
use shared::{env, load_average, pct};
use testcluster::{Options, TestCluster};

/// The highest resident set size since `reset_peak` (this process: rotator and
/// the test server, not the PostgreSQL server).
fn peak_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| k / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Starts a new peak-RSS measurement (Linux: "5" resets VmHWM to the current RSS).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Rows per INSERT: 9 parameters a row stays far under both engines' limits
/// (SQLite 32,766, PostgreSQL 65,535).
const BATCH: usize = 1000;

/// `INSERT INTO table (cols) VALUES ($1, ..), ($k, ..)` for `rows` rows.
fn insert_sql(head: &str, per_row: usize, consts: &str, rows: usize) -> String {
    let mut sql = String::from(head);
    for r in 0..rows {
        sql.push_str(if r == 0 { " VALUES (" } else { ", (" });
        for c in 0..per_row {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("${}", r * per_row + c + 1));
        }
        sql.push_str(consts);
        sql.push(')');
    }
    sql
}

/// `n` users, each with one delivered issuance and one current credential, a
/// month left on each; one transaction per BATCH users. Not one transaction
/// for all: on PostgreSQL every inserted user and credential row bumps the one
/// `change_counter` row (migration 0013's trigger), and inside one
/// transaction those versions of one row cannot be pruned, so each bump walks
/// all the previous ones: quadratic (10,000 users took 13.9 s in one
/// transaction, 100,000 did not finish in 8 minutes).
async fn seed(app: &rotator::app::App, n: usize, now: i64) {
    for start in (0..n).step_by(BATCH) {
        let mut tx = app.store.begin().await.unwrap();
        let rows = BATCH.min(n - start);
        let ids = start..start + rows;
        let sql = insert_sql(
            "INSERT INTO users (name, created_at, updated_at, groups, namespaces, role, key_type, ttl_seconds, state)",
            3,
            ", '[]', '[\"team-a\"]', 'view', 'ecdsa-p256', 3600, 'active'",
            rows,
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in ids.clone() {
            q = q.bind(format!("s{i}")).bind(now).bind(now);
        }
        q.execute(&mut *tx).await.unwrap();
        let sql = insert_sql(
            "INSERT INTO issuances (id, user_name, created_at, updated_at, generation, kind, spec, step, signer, owner)",
            4,
            ", 1, 'add-user', '{}', 'delivered', 'kubernetes', 'seed'",
            rows,
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in ids.clone() {
            q = q
                .bind(format!("{i:032x}"))
                .bind(format!("s{i}"))
                .bind(now)
                .bind(now);
        }
        q.execute(&mut *tx).await.unwrap();
        let sql = insert_sql(
            "INSERT INTO credentials (id, user_name, serial, fingerprint, not_before, not_after, state_at, created_at, generation, state, signer, key_type, certificate)",
            8,
            ", 1, 'current', 'kubernetes', 'ecdsa-p256', ''",
            rows,
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for i in ids {
            let id = format!("{i:032x}");
            q = q
                .bind(id.clone())
                .bind(format!("s{i}"))
                .bind(id.clone())
                .bind(format!("f{id}"))
                .bind(now - 60)
                .bind(now + 30 * 86400)
                .bind(now)
                .bind(now);
        }
        q.execute(&mut *tx).await.unwrap();
        rotator::store::commit(tx).await.unwrap();
    }
}

/// Puts `due` current credentials into the last sixth of their lifetime.
async fn make_due(app: &rotator::app::App, due: usize, now: i64) {
    let r = sqlx::query("UPDATE credentials SET not_before = $1, not_after = $2 WHERE id IN (SELECT id FROM credentials WHERE state = 'current' ORDER BY id LIMIT $3)")
        .bind(now - 3000)
        .bind(now + 600)
        .bind(due as i64)
        .execute(app.store.pool())
        .await
        .unwrap();
    assert_eq!(r.rows_affected() as usize, due);
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// One row of the table: p50 and mean seconds per pass, peak RSS.
struct Row {
    p50: f64,
    mean: f64,
    passes: usize,
    peak: f64,
}

fn row(mut secs: Vec<f64>, peak: f64) -> Row {
    secs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Row {
        p50: pct(&secs, 0.5),
        mean: mean(&secs),
        passes: secs.len(),
        peak,
    }
}

fn print_row(engine: Engine, n: usize, pass: &str, r: &Row) {
    println!(
        "{:<11} {:>12} {:>20} {:>7} {:>12.4} {:>12.4} {:>10.1}",
        engine.name(),
        n,
        pass,
        r.passes,
        r.p50,
        r.mean,
        r.peak
    );
}

fn main() {
    shared::run_bench(run);
}

async fn run() {
    let sizes: Vec<usize> = std::env::var("ROTATE_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let due = env("ROTATE_DUE", 1000) as usize;
    let idle_passes = env("ROTATE_IDLE_PASSES", 5).max(1) as usize;
    let due_passes = env("ROTATE_DUE_PASSES", 3).max(1) as usize;
    let wanted = std::env::var("BENCH_ENGINES").unwrap_or_else(|_| "sqlite,postgres".into());
    let server = wanted
        .contains("postgres")
        .then(|| pg::start_or_say("rotate_pass"))
        .flatten();
    let engines = pg::engines(&wanted, server.as_ref());
    let due_label = format!("renews {due}");
    println!(
        "\nrotate pass, {} (load average at start: {})",
        engines
            .iter()
            .map(|e| e.name())
            .collect::<Vec<_>>()
            .join(" and "),
        load_average()
    );
    println!(
        "{:<11} {:>12} {:>20} {:>7} {:>12} {:>12} {:>10}",
        "engine", "credentials", "pass", "passes", "p50 s", "mean s", "peak MiB"
    );
    let mut results: BTreeMap<(usize, bool, &'static str), Row> = BTreeMap::new();
    for &n in &sizes {
        for &engine in &engines {
            let cluster = TestCluster::start(Options::default()).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let admin = dir.path().join("admin.kubeconfig");
            std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
            shared::hand_flow::kubectl(&admin, &["create", "namespace", "team-a"]);
            let cfg = dir.path().join("rotator.toml");
            std::fs::write(
                &cfg,
                format!(
                    "{}data_dir = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\n[rotation]\njitter = 0.0\nconcurrency = 16\n",
                    engine.database_toml(server.as_ref()),
                    dir.path().join("data"),
                    admin
                ),
            )
            .unwrap();
            let settings =
                rotator::config::load_with(Some(&cfg), &[], &Default::default()).unwrap();
            let app = Arc::new(
                rotator::app::App::open(
                    settings,
                    Arc::new(rotator::support::clock::SystemClock),
                    Arc::new(rotator::flows::issue::NoFaults),
                    "bench".into(),
                )
                .await
                .unwrap()
                .0,
            );
            let now = rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock);
            let t = Instant::now();
            seed(&app, n, now).await;
            eprintln!(
                "{} {n}: seeded in {:.2} s",
                engine.name(),
                t.elapsed().as_secs_f64()
            );

            reset_peak();
            let mut secs = Vec::new();
            for _ in 0..idle_passes {
                let t = Instant::now();
                let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
                secs.push(t.elapsed().as_secs_f64());
                assert_eq!(r.due, 0);
            }
            let r = row(secs, peak_mib());
            print_row(engine, n, "nothing due", &r);
            results.insert((n, false, engine.name()), r);

            reset_peak();
            let mut secs = Vec::new();
            for _ in 0..due_passes {
                make_due(&app, due, now).await;
                let t = Instant::now();
                let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
                secs.push(t.elapsed().as_secs_f64());
                assert_eq!((r.due, r.renewed, r.failed), (due, due, 0));
            }
            let r = row(secs, peak_mib());
            print_row(engine, n, &due_label, &r);
            results.insert((n, true, engine.name()), r);
            app.store.close().await;
            drop(cluster);
        }
    }
    if engines.len() == 2 {
        println!("\nPostgreSQL / SQLite, time per pass");
        println!(
            "{:>12} {:>20} {:>10} {:>10}",
            "credentials", "pass", "p50", "mean"
        );
        for &n in &sizes {
            for due_pass in [false, true] {
                let (Some(s), Some(p)) = (
                    results.get(&(n, due_pass, Engine::Sqlite.name())),
                    results.get(&(n, due_pass, Engine::Postgres.name())),
                ) else {
                    continue;
                };
                println!(
                    "{:>12} {:>20} {:>10.2} {:>10.2}",
                    n,
                    if due_pass { &due_label } else { "nothing due" },
                    p.p50 / s.p50,
                    p.mean / s.mean
                );
            }
        }
    } else if wanted.contains("postgres") && server.is_none() {
        println!("\n!!! PostgreSQL was NOT measured (see above): no ratio");
    } else {
        println!("\n(one engine, BENCH_ENGINES={wanted}: no ratio)");
    }
    println!("load average at end: {}", load_average());
}
