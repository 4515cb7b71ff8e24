//! The daemon's rotate pass over many tracked credentials: one pass that finds
//! nothing due, and one that renews 1,000 (against the Kubernetes API test
//! server), at 10,000 and 100,000 credentials, with the process's resident memory.
//!
//!   cargo bench --bench rotate_pass
//!   ROTATE_SIZES=10000,100000 ROTATE_DUE=1000 cargo bench --bench rotate_pass
use std::sync::Arc;
use std::time::Instant;

use testcluster::{Options, TestCluster};

fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// Starts a new peak-RSS measurement (Linux: "5" resets VmHWM to the current RSS).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The highest resident set size since `reset_peak`.
fn peak_mib() -> f64 {
    status_mib("VmHWM:")
}

fn status_mib(field: &str) -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| k / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn seed(app: &rotator::app::App, n: usize, due: usize, now: i64) {
    let mut tx = app.store.begin().await.unwrap();
    for i in 0..n {
        let user = format!("s{i}");
        let id = format!("{i:032x}");
        sqlx::query("INSERT INTO users (name, groups, namespaces, role, key_type, ttl_seconds, state, created_at, updated_at) VALUES (?, '[]', '[\"team-a\"]', 'view', 'ecdsa-p256', 3600, 'active', ?, ?)")
            .bind(&user).bind(now).bind(now).execute(&mut *tx).await.unwrap();
        sqlx::query("INSERT INTO issuances (id, user_name, generation, kind, spec, step, signer, owner, created_at, updated_at) VALUES (?, ?, 1, 'add-user', '{}', 'delivered', 'kubernetes', 'seed', ?, ?)")
            .bind(&id).bind(&user).bind(now).bind(now).execute(&mut *tx).await.unwrap();
        // The first `due` are in the last third of their lifetime; the rest have a month left.
        let (nb, na) = if i < due {
            (now - 3000, now + 600)
        } else {
            (now - 60, now + 30 * 86400)
        };
        sqlx::query("INSERT INTO credentials (id, user_name, generation, serial, fingerprint, not_before, not_after, state, signer, key_type, certificate, state_at, created_at) VALUES (?, ?, 1, ?, ?, ?, ?, 'current', 'kubernetes', 'ecdsa-p256', '', ?, ?)")
            .bind(&id).bind(&user).bind(&id).bind(format!("f{id}")).bind(nb).bind(na).bind(now).bind(now).execute(&mut *tx).await.unwrap();
    }
    rotator::store::commit(tx).await.unwrap();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("ROTATE_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let due: usize = std::env::var("ROTATE_DUE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "\n{:>12} {:>28} {:>12} {:>14} {:>14} {:>14}",
        "credentials", "pass", "seconds", "RSS before MiB", "peak MiB", "RSS after MiB"
    );
    for n in sizes {
        rt.block_on(async {
            let cluster = TestCluster::start(Options::default()).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let admin = dir.path().join("admin.kubeconfig");
            std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
            let o = std::process::Command::new("kubectl").arg("--kubeconfig").arg(&admin).args(["create", "namespace", "team-a"]).output().unwrap();
            assert!(o.status.success());
            let cfg = dir.path().join("rotator.toml");
            std::fs::write(&cfg, format!("data_dir = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\n[rotation]\njitter = 0.0\nconcurrency = 16\n", dir.path().join("data"), admin)).unwrap();
            let settings = rotator::config::load_with(Some(&cfg), &[], &Default::default()).unwrap();
            let app = Arc::new(rotator::app::App::open(settings, Arc::new(rotator::clock::SystemClock), Arc::new(rotator::issuer::NoFaults), "bench".into()).await.unwrap().0);
            let now = rotator::clock::Clock::now(&rotator::clock::SystemClock);
            // First a database where nothing is due, then the same size with `due` due.
            seed(&app, n, 0, now).await;
            let before = rss_mib();
            reset_peak();
            let t = Instant::now();
            let r = rotator::renewal::rotate_pass(&app).await.unwrap();
            assert_eq!(r.due, 0);
            println!("{:>12} {:>28} {:>12.3} {:>14.1} {:>14.1} {:>14.1}", n, "nothing due", t.elapsed().as_secs_f64(), before, peak_mib(), rss_mib());
            sqlx::query("UPDATE credentials SET not_before = ?, not_after = ? WHERE rowid IN (SELECT rowid FROM credentials ORDER BY id LIMIT ?)")
                .bind(now - 3000).bind(now + 600).bind(due as i64).execute(app.store.pool()).await.unwrap();
            let before = rss_mib();
            reset_peak();
            let t = Instant::now();
            let r = rotator::renewal::rotate_pass(&app).await.unwrap();
            assert_eq!((r.due, r.renewed), (due, due));
            println!("{:>12} {:>28} {:>12.3} {:>14.1} {:>14.1} {:>14.1}", n, format!("renews {due} (test server)"), t.elapsed().as_secs_f64(), before, peak_mib(), rss_mib());
            drop(cluster);
        });
    }
}
