//! Onboarding throughput against the Kubernetes API test server, beside the
//! hand-run flow a cluster admin scripts today, in the same run:
//!
//!   cargo bench --bench onboard
//!   ONBOARD_USERS=1000 ONBOARD_CONCURRENCY=16 ONBOARD_SIGNING_RATE=20 HAND_USERS=50 cargo bench --bench onboard
//!
//! Three flows: the issuer in process, the real `rotator add-user --from
//! users.csv` process (BULK_USERS, default ONBOARD_USERS; 0 skips it) into its
//! own database, each on SQLite and on PostgreSQL (BENCH_ENGINES, default
//! both; a throwaway server, see common/pg.rs: without `initdb` the bench says
//! loudly that PostgreSQL was not measured), and the hand-run flow once.
//!
//! ONBOARD_SIGNING_RATE models kube-controller-manager's client rate limit
//! (about 20 CSRs/s by default; 0 = unlimited). Prints a table; asserts nothing.
#[path = "common/pg.rs"]
mod pg;
#[path = "common/shared.rs"]
mod shared;

use pg::Engine;
use shared::{env, hand_flow, load_average, pct};

use std::sync::Arc;
use std::time::Instant;

use rotator::policy::UserSpec;
use testcluster::{Options, TestCluster};

fn main() {
    shared::run_bench(run);
}

/// What one engine's flows measured.
struct Measured {
    engine: Engine,
    users: usize,
    rate: f64,
    total_ms: Vec<f64>,
    signing_ms: Vec<f64>,
    bulk: Option<(usize, f64)>,
}

async fn run() {
    let users = env("ONBOARD_USERS", 1000) as usize;
    let concurrency = env("ONBOARD_CONCURRENCY", 16) as usize;
    let rate = env("ONBOARD_SIGNING_RATE", 20);
    let hand = env("HAND_USERS", 50) as usize;
    let bulk = env("BULK_USERS", users as u64) as usize;
    let wanted = std::env::var("BENCH_ENGINES").unwrap_or_else(|_| "sqlite,postgres".into());
    let server = wanted
        .contains("postgres")
        .then(|| pg::start_or_say("onboard"))
        .flatten();
    let engines = pg::engines(&wanted, server.as_ref());
    let load_start = load_average();
    let cluster = TestCluster::start(Options {
        signing_rate: (rate > 0).then_some(rate as f64),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.kubeconfig");
    std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
    hand_flow::kubectl(&admin, &["create", "namespace", "team-a"]);

    let mut measured = Vec::new();
    for &engine in &engines {
        // User names differ per engine and flow: all share one cluster.
        let tag = match engine {
            Engine::Sqlite => "s",
            Engine::Postgres => "p",
        };
        let db = engine.database_toml(server.as_ref());
        let (rate_in, total_ms, signing_ms) =
            in_process(dir.path(), &admin, &db, tag, users, concurrency).await;
        let bulk_rate = if bulk > 0 {
            // A test server of its own: the shared one keeps every object and
            // watch event of the runs before in memory, which slowed the
            // process that came after them to half its rate.
            let (_own, own_admin) = fresh_cluster(dir.path(), rate, &format!("{tag}-bulk")).await;
            let bulk_db = engine.database_toml(server.as_ref());
            let e = bulk_process(dir.path(), &own_admin, &bulk_db, tag, bulk, concurrency);
            Some((bulk, bulk as f64 / e.as_secs_f64()))
        } else {
            None
        };
        measured.push(Measured {
            engine,
            users,
            rate: rate_in,
            total_ms,
            signing_ms,
            bulk: bulk_rate,
        });
    }

    // The hand-run flow, one user after another, as a script would do it.
    let hand_elapsed = hand_flow::run(dir.path(), &admin, hand);
    let hand_rate = hand as f64 / hand_elapsed.as_secs_f64();

    println!(
        "\nonboarding against the test server (signing rate limit: {}; {concurrency} in flight; load average {load_start} at start, {} at end)",
        if rate > 0 {
            format!("{rate}/s")
        } else {
            "none".into()
        },
        load_average()
    );
    if server.is_none() && wanted.contains("postgres") {
        println!("!!! PostgreSQL was NOT measured (see above)");
    }
    println!(
        "{:<11} {:<58} {:>7} {:>9} {:>9} {:>9} {:>10}",
        "engine", "flow", "users", "users/s", "p50 ms", "p99 ms", "x hand-run"
    );
    for m in &measured {
        println!(
            "{:<11} {:<58} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>10.1}",
            m.engine.name(),
            "rotator in process: add-user end to end",
            m.users,
            m.rate,
            pct(&m.total_ms, 0.5),
            pct(&m.total_ms, 0.99),
            m.rate / hand_rate
        );
        println!(
            "{:<11} {:<58} {:>7} {:>9} {:>9.1} {:>9.1} {:>10}",
            m.engine.name(),
            "rotator in process: CSR creation to certificate stored",
            m.users,
            "",
            pct(&m.signing_ms, 0.5),
            pct(&m.signing_ms, 0.99),
            ""
        );
        if let Some((n, r)) = m.bulk {
            println!(
                "{:<11} {:<58} {:>7} {:>9.1} {:>9} {:>9} {:>10.1}",
                m.engine.name(),
                "rotator add-user --from users.csv (one process)",
                n,
                r,
                "",
                "",
                r / hand_rate
            );
        }
    }
    println!(
        "{:<11} {:<58} {:>7} {:>9.1} {:>9.1} {:>9} {:>10.1}",
        "-",
        "hand-run: openssl + kubectl create/approve/wait/get, serial",
        hand,
        hand_rate,
        hand_elapsed.as_secs_f64() * 1000.0 / hand as f64,
        "",
        1.0
    );
    if let [s, p] = &measured[..] {
        println!(
            "PostgreSQL / SQLite, users per second: in process {:.2}{}",
            p.rate / s.rate,
            match (s.bulk, p.bulk) {
                (Some((_, a)), Some((_, b))) => format!(", add-user --from {:.2}", b / a),
                _ => String::new(),
            }
        );
    }
}

/// `users` onboarded by the issuer in process, `concurrency` at a time, into a
/// fresh database (`db`: its config line); users/s, sorted end-to-end and
/// signing latencies (ms).
async fn in_process(
    dir: &std::path::Path,
    admin: &std::path::Path,
    db: &str,
    tag: &str,
    users: usize,
    concurrency: usize,
) -> (f64, Vec<f64>, Vec<f64>) {
    let cfg = dir.join(format!("{tag}-rotator.toml"));
    std::fs::write(
        &cfg,
        format!("{db}data_dir = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\nsigning_timeout = \"10m\"\n", dir.join(format!("{tag}-data")), admin),
    )
    .unwrap();
    let settings = rotator::config::load_with(Some(&cfg), &[], &Default::default()).unwrap();
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

    // Bounded concurrency over a queue of users.
    let queue = Arc::new(std::sync::Mutex::new((0..users).collect::<Vec<_>>()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (app, queue, dir, tag) = (
            app.clone(),
            queue.clone(),
            dir.to_path_buf(),
            tag.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(i) = queue.lock().unwrap().pop() else {
                    break;
                };
                let spec = UserSpec {
                    name: format!("{tag}u{i}"),
                    groups: vec![],
                    namespaces: vec!["team-a".into()],
                    role: "view".into(),
                    key_type: rotator::pki::KeyType::EcdsaP256,
                    ttl_seconds: 3600,
                };
                let t = Instant::now();
                let mut sink = rotator::delivery::FileSink {
                    path: dir.join(format!("{tag}u{i}.kubeconfig")),
                };
                app.issuer()
                    .add_user(spec, &mut sink, "bench")
                    .await
                    .expect("add-user");
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut total_ms = Vec::new();
    for t in tasks {
        total_ms.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    // CSR creation to certificate stored, as the issuer recorded it.
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT detail FROM audit_events WHERE action = 'credential.issue'")
            .fetch_all(app.store.pool())
            .await
            .unwrap();
    let mut signing: Vec<f64> = rows
        .iter()
        .filter_map(|(d,)| {
            serde_json::from_str::<serde_json::Value>(d).ok()?["signing_ms"].as_f64()
        })
        .collect();
    app.store.close().await;
    signing.sort_by(|a, b| a.partial_cmp(b).unwrap());
    total_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (users as f64 / elapsed.as_secs_f64(), total_ms, signing)
}

/// A test server with namespace `team-a`, and its admin kubeconfig in `dir`.
async fn fresh_cluster(
    dir: &std::path::Path,
    rate: u64,
    name: &str,
) -> (TestCluster, std::path::PathBuf) {
    let cluster = TestCluster::start(Options {
        signing_rate: (rate > 0).then_some(rate as f64),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = dir.join(format!("{name}-admin.kubeconfig"));
    std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
    hand_flow::kubectl(&admin, &["create", "namespace", "team-a"]);
    (cluster, admin)
}

/// The real command: one `rotator add-user --from users.csv` process on a
/// fresh database (`db`), the same cluster; its wall time.
fn bulk_process(
    dir: &std::path::Path,
    admin: &std::path::Path,
    db: &str,
    tag: &str,
    bulk: usize,
    concurrency: usize,
) -> std::time::Duration {
    let mut csv = String::from("name,namespaces,role,groups,ttl,delivery\n");
    for i in 0..bulk {
        csv.push_str(&format!("{tag}b{i},team-a,view,,1h,\n"));
    }
    let file = dir.join(format!("{tag}-users.csv"));
    std::fs::write(&file, csv).unwrap();
    let bulk_cfg = dir.join(format!("{tag}-bulk.toml"));
    std::fs::write(
        &bulk_cfg,
        format!("{db}data_dir = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\nsigning_timeout = \"10m\"\n", dir.join(format!("{tag}-bulk-data")), admin),
    )
    .unwrap();
    let rotator = |args: &[&str]| {
        let bin =
            std::env::var_os("ROTATOR_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_rotator").into());
        let mut c = std::process::Command::new(bin);
        c.arg("--config").arg(&bulk_cfg).args(args);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
            c.env_remove(k);
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "rotator {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    rotator(&["init"]);
    let out_dir = dir.join(format!("{tag}-bulk-out"));
    let started = Instant::now();
    let out = rotator(&[
        "add-user",
        "--from",
        file.to_str().unwrap(),
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--concurrency",
        &concurrency.to_string(),
        "--output",
        "json",
    ]);
    let elapsed = started.elapsed();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["summary"]["issued"], bulk, "{v}");
    elapsed
}
