//! Failover time: two real `rotator serve` processes on one PostgreSQL database,
//! leader election through the Kubernetes API test server's Lease. The leader
//! is SIGKILLed FAILOVER_KILLS times (default 20) and restarted each time as
//! the new standby; each kill is timed until the standby logs "became the
//! leader" and until it logs its first "job done" (the first job it runs).
//!
//!   cargo bench --bench failover
//!   FAILOVER_KILLS=20 FAILOVER_USERS=20 cargo bench --bench failover
//!
//! Short settings so the run takes a few minutes: lease_duration = "2s" (the
//! smallest the config accepts), so the daemon renews every 667 ms (a third of
//! it) and a standby tries as often; the rotate job every second. Expected:
//! the lease's remaining time (up to 2 s) plus up to one election round
//! (0.67 s), then up to one rotate tick (1 s). Without `initdb` it says loudly
//! that nothing was measured.
#[path = "common/daemon.rs"]
mod daemon;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/shared.rs"]
mod shared;

use std::path::Path;
use std::time::Duration;

use daemon::Daemon;
use shared::{env, load_average, pct};
use testcluster::{Options, TestCluster};

const LEASE_DURATION: &str = "2s";
const ROTATE: &str = "* * * * * *";

fn main() {
    shared::run_bench(run);
}

/// The audit and sealing keys every daemon on the database shares (made by
/// `init` in d1), as every replica mounts them from one Secret.
fn shared_keys(dir: &Path) -> Vec<(String, String)> {
    let d1 = dir.join("d1");
    [
        ("ROTATOR_AUDIT__KEY_FILE", "audit.key"),
        ("ROTATOR_AUDIT__CHECKPOINT_FILE", "audit.head"),
        ("ROTATOR_SEALING__KEY_FILE", "seal.key"),
    ]
    .iter()
    .map(|(k, f)| (k.to_string(), d1.join(f).display().to_string()))
    .collect()
}

fn rotator(dir: &Path, args: &[&str]) -> Vec<u8> {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_rotator"));
    c.current_dir(dir);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
        c.env_remove(k);
    }
    let o = c
        .args(["--config", "rotator.toml"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "rotator {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

async fn run() {
    let kills = env("FAILOVER_KILLS", 20).max(1) as usize;
    let users = env("FAILOVER_USERS", 20) as usize;
    let Some(server) = pg::start_or_say("failover") else {
        println!("\n!!! failover: NOTHING measured (needs PostgreSQL; see above)");
        return;
    };
    let load_start = load_average();
    let cluster = TestCluster::start(Options::default()).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let admin = dir.join("admin.kubeconfig");
    std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
    for ns in ["team-a", "rotator"] {
        shared::hand_flow::kubectl(&admin, &["create", "namespace", ns]);
    }
    std::fs::write(
        dir.join("rotator.toml"),
        format!(
            "database_url = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\n[cluster]\nname = \"test\"\n[leader_election]\nenabled = true\nlease_duration = {LEASE_DURATION:?}\n[schedule]\nrotate = {ROTATE:?}\n",
            server.create_database(),
            admin
        ),
    )
    .unwrap();
    // Some users, so the pass the new leader runs reads real rows.
    rotator(dir, &["--data-dir", "d1", "init"]);
    if users > 0 {
        let mut csv = String::from("name,namespaces,role,groups,ttl,delivery\n");
        for i in 0..users {
            csv.push_str(&format!("f{i},team-a,view,,1h,\n"));
        }
        std::fs::write(dir.join("users.csv"), csv).unwrap();
        rotator(
            dir,
            &[
                "--data-dir",
                "d1",
                "add-user",
                "--from",
                "users.csv",
                "--out-dir",
                "out",
                "--output",
                "json",
            ],
        );
    }
    let keys = shared_keys(dir);
    let cfg = dir.join("rotator.toml");
    let up = Duration::from_secs(60);
    let mut leader = daemon::spawn(dir, &cfg, "d1", &keys);
    leader.wait_for(&["became the leader"], up).await;
    let mut leader_dir = "d1";
    let mut standby = daemon::spawn(dir, &cfg, "d2", &keys);
    standby.wait_for(&["rotator daemon started"], up).await;

    let mut to_leader = Vec::new();
    let mut to_job = Vec::new();
    let mut failed_first = 0;
    for k in 0..kills {
        // The standby has had an election round; the leader is mid-routine.
        // Spread the kill over the leader's 667 ms renew cycle.
        leader.wait_for(&["job done"], up).await;
        tokio::time::sleep(Duration::from_millis(300 + (k as u64 * 137) % 667)).await;
        standby.drain();
        let killed = leader.kill9();
        let (led, _) = standby.wait_for(&["became the leader"], up).await;
        let (ran, v) = standby.wait_for(&["job done", "job failed"], up).await;
        if v["fields"]["message"] == "job failed" {
            failed_first += 1;
        }
        to_leader.push((led - killed).as_secs_f64() * 1000.0);
        to_job.push((ran - killed).as_secs_f64() * 1000.0);
        eprintln!(
            "kill {:>2}: standby leads after {:>6.0} ms, first job ({}) done after {:>6.0} ms",
            k + 1,
            to_leader[k],
            v["fields"]["job"].as_str().unwrap_or("?"),
            to_job[k]
        );
        // The killed leader comes back as the new standby.
        leader.reap().await;
        let next = spawn_standby(dir, &cfg, leader_dir, &keys).await;
        leader_dir = if leader_dir == "d1" { "d2" } else { "d1" };
        leader = std::mem::replace(&mut standby, next);
    }
    leader.stop().await;
    standby.stop().await;
    drop(cluster);

    to_leader.sort_by(|a, b| a.partial_cmp(b).unwrap());
    to_job.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "\nfailover on PostgreSQL, {kills} SIGKILLs of the leader (lease_duration {LEASE_DURATION}, renewed every {} ms, rotate {ROTATE:?} i.e. every second; {users} users; load average {load_start} at start, {} at end)",
        2000 / 3,
        load_average()
    );
    println!(
        "{:<52} {:>7} {:>9} {:>9} {:>9}",
        "leader killed ->", "kills", "p50 ms", "max ms", "min ms"
    );
    let line = |what: &str, v: &[f64]| {
        println!(
            "{:<52} {:>7} {:>9.0} {:>9.0} {:>9.0}",
            what,
            v.len(),
            pct(v, 0.5),
            v.last().copied().unwrap_or(0.0),
            v.first().copied().unwrap_or(0.0)
        )
    };
    line("standby logs \"became the leader\"", &to_leader);
    line("standby's first job done", &to_job);
    if failed_first > 0 {
        println!("!!! {failed_first} of the first jobs after a takeover FAILED (timed anyway)");
    }
}

async fn spawn_standby(dir: &Path, cfg: &Path, data: &str, keys: &[(String, String)]) -> Daemon {
    let mut d = daemon::spawn(dir, cfg, data, keys);
    d.wait_for(&["rotator daemon started"], Duration::from_secs(60))
        .await;
    d
}
