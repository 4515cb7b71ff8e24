//! Onboarding throughput against the Kubernetes API test server, beside the
//! hand-run flow a cluster admin scripts today, in the same run:
//!
//!   cargo bench --bench onboard
//!   ONBOARD_USERS=1000 ONBOARD_CONCURRENCY=16 ONBOARD_SIGNING_RATE=20 HAND_USERS=50 cargo bench --bench onboard
//!
//! Three flows: the issuer in process, the real `rotator add-user --from
//! users.csv` process (BULK_USERS, default ONBOARD_USERS; 0 skips it) into its
//! own data directory, and the hand-run flow.
//!
//! ROTATOR_BIN runs another `rotator` binary for the process flow (a build
//! from before a change, to compare both in the same conditions).
//!
//! ONBOARD_SIGNING_RATE models kube-controller-manager's client rate limit
//! (about 20 CSRs/s by default; 0 = unlimited). Prints a table; asserts nothing.
#[path = "common/shared.rs"]
mod shared;

use shared::{env, hand_flow, pct};

use std::sync::Arc;
use std::time::Instant;

use rotator::policy::UserSpec;
use testcluster::{Options, TestCluster};

fn main() {
    shared::run_bench(run);
}

async fn run() {
    let users = env("ONBOARD_USERS", 1000) as usize;
    let concurrency = env("ONBOARD_CONCURRENCY", 16) as usize;
    let rate = env("ONBOARD_SIGNING_RATE", 20);
    let hand = env("HAND_USERS", 50) as usize;
    let cluster = TestCluster::start(Options {
        signing_rate: (rate > 0).then_some(rate as f64),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.kubeconfig");
    std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
    let k = |args: &[&str]| hand_flow::kubectl(&admin, args);
    k(&["create", "namespace", "team-a"]);
    let cfg = dir.path().join("rotator.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\nsigning_timeout = \"10m\"\n", dir.path().join("data"), admin),
    )
    .unwrap();
    let settings = rotator::config::load_with(Some(&cfg), &[], &Default::default()).unwrap();
    let app = Arc::new(
        rotator::app::App::open(
            settings,
            Arc::new(rotator::clock::SystemClock),
            Arc::new(rotator::issuer::NoFaults),
            "bench".into(),
        )
        .await
        .unwrap()
        .0,
    );

    // rotator: bounded concurrency over a queue of users.
    let queue = Arc::new(std::sync::Mutex::new((0..users).collect::<Vec<_>>()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (app, queue, dir) = (app.clone(), queue.clone(), dir.path().to_path_buf());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(i) = queue.lock().unwrap().pop() else {
                    break;
                };
                let spec = UserSpec {
                    name: format!("u{i}"),
                    groups: vec![],
                    namespaces: vec!["team-a".into()],
                    role: "view".into(),
                    key_type: rotator::pki::KeyType::EcdsaP256,
                    ttl_seconds: 3600,
                };
                let t = Instant::now();
                let mut sink = rotator::sink::FileSink {
                    path: dir.join(format!("u{i}.kubeconfig")),
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
    signing.sort_by(|a, b| a.partial_cmp(b).unwrap());
    total_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rotator_rate = users as f64 / elapsed.as_secs_f64();

    // The real command: one `rotator add-user --from users.csv` process, its
    // own data directory, against a test server of its own: the one above
    // keeps every object and watch event of the in-process run in memory,
    // which slowed the process that came after it to half its rate.
    let bulk = env("BULK_USERS", users as u64) as usize;
    let bulk_cluster = TestCluster::start(Options {
        signing_rate: (rate > 0).then_some(rate as f64),
        ..Default::default()
    })
    .await
    .unwrap();
    let bulk_admin = dir.path().join("bulk-admin.kubeconfig");
    std::fs::write(&bulk_admin, bulk_cluster.admin_kubeconfig()).unwrap();
    hand_flow::kubectl(&bulk_admin, &["create", "namespace", "team-a"]);
    let bulk_elapsed = (bulk > 0).then(|| {
        let mut csv = String::from("name,namespaces,role,groups,ttl,delivery\n");
        for i in 0..bulk {
            csv.push_str(&format!("b{i},team-a,view,,1h,\n"));
        }
        let file = dir.path().join("users.csv");
        std::fs::write(&file, csv).unwrap();
        let bulk_cfg = dir.path().join("bulk.toml");
        std::fs::write(
            &bulk_cfg,
            format!("data_dir = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\nsigning_timeout = \"10m\"\n", dir.path().join("bulk-data"), bulk_admin),
        )
        .unwrap();
        let rotator = |args: &[&str]| {
            let bin = std::env::var_os("ROTATOR_BIN")
                .unwrap_or_else(|| env!("CARGO_BIN_EXE_rotator").into());
            let o = std::process::Command::new(bin)
                .arg("--config")
                .arg(&bulk_cfg)
                .args(args)
                .env_remove("ROTATOR_DATA_DIR")
                .env_remove("ROTATOR_CONFIG")
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "rotator {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            o.stdout
        };
        rotator(&["init"]);
        let out_dir = dir.path().join("bulk-out");
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
    });

    // The hand-run flow, one user after another, as a script would do it.
    let hand_elapsed = hand_flow::run(dir.path(), &admin, hand);
    let hand_rate = hand as f64 / hand_elapsed.as_secs_f64();

    println!(
        "\nonboarding against the test server (signing rate limit: {})",
        if rate > 0 {
            format!("{rate}/s")
        } else {
            "none".into()
        }
    );
    println!(
        "{:<64} {:>10} {:>12} {:>10} {:>10}",
        "flow", "users", "users/s", "p50 ms", "p99 ms"
    );
    println!(
        "{:<64} {:>10} {:>12.1} {:>10.1} {:>10.1}",
        format!("rotator add-user, {concurrency} in flight: add-user end to end"),
        users,
        rotator_rate,
        pct(&total_ms, 0.5),
        pct(&total_ms, 0.99)
    );
    if let Some(e) = bulk_elapsed {
        println!(
            "{:<64} {:>10} {:>12.1} {:>10} {:>10}",
            format!("rotator add-user --from users.csv, --concurrency {concurrency} (process)"),
            bulk,
            bulk as f64 / e.as_secs_f64(),
            "",
            ""
        );
    }
    println!(
        "{:<64} {:>10} {:>12} {:>10.1} {:>10.1}",
        "rotator: CSR creation to certificate stored",
        users,
        "",
        pct(&signing, 0.5),
        pct(&signing, 0.99)
    );
    println!(
        "{:<64} {:>10} {:>12.1} {:>10.1} {:>10}",
        "hand-run: openssl + kubectl create/approve/wait/get, serial",
        hand,
        hand_rate,
        hand_elapsed.as_secs_f64() * 1000.0 / hand as f64,
        ""
    );
    println!(
        "{:<64} {:>10} {:>12.1}",
        "ratio rotator / hand-run (users per second)",
        "",
        rotator_rate / hand_rate
    );
}
