//! Two real `rotator serve` processes on one PostgreSQL database with the test
//! cluster's Lease: the leader fenced out after it was paused past its lease,
//! the leader SIGKILLed at each issuance step while the standby finishes, and
//! the PostgreSQL server itself stopped and started again mid-pass; a SIGTERM
//! while it is down, and the Lease read to the microsecond.
use std::process::Stdio;
use std::time::Duration;

use testcluster::Options;
use tokio::io::AsyncBufReadExt;

use crate::common::*;
use crate::kubernetes::Kx;

const LEASE: &str = "[leader_election]\nenabled = true\nlease_duration = \"2s\"\n";

/// A daemon and its log lines (JSON), read by a task into a channel, so a test
/// can wait for a line and still see everything it logged.
pub struct Daemon {
    child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    log: Vec<serde_json::Value>,
}

impl Daemon {
    pub fn pid(&self) -> String {
        self.child.id().expect("running").to_string()
    }

    /// Waits for a line whose message is `msg` (and that `also` accepts).
    pub async fn wait_for(
        &mut self,
        msg: &str,
        within: Duration,
        also: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let found = tokio::time::timeout(within, async {
            while let Some(v) = self.lines.recv().await {
                self.log.push(v.clone());
                if v["fields"]["message"] == msg && also(&v) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            Ok(None) => panic!("the daemon ended before {msg:?}:\n{:#?}", self.log),
            Err(_) => panic!("no {msg:?} within {within:?}:\n{:#?}", self.log),
        }
    }

    pub fn signal(&self, sig: &str) {
        std::process::Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap();
    }

    /// Every line logged so far, the ones not yet waited for too.
    pub fn drain(&mut self) -> &[serde_json::Value] {
        while let Ok(v) = self.lines.try_recv() {
            self.log.push(v);
        }
        &self.log
    }

    /// How many lines so far have the message `msg`.
    pub fn count(&mut self, msg: &str) -> usize {
        self.drain()
            .iter()
            .filter(|v| v["fields"]["message"] == msg)
            .count()
    }

    pub async fn stop(mut self) -> std::process::ExitStatus {
        if self.child.id().is_some() {
            self.signal("-TERM");
        }
        self.child.wait().await.unwrap()
    }
}

/// The audit and sealing keys every daemon on the database shares (made by the
/// first command, in d1), as every replica mounts them from one Secret.
fn shared_keys(kx: &Kx) -> Vec<(String, String)> {
    let d1 = kx.s.path("d1");
    vec![
        (
            "ROTATOR_AUDIT__KEY_FILE".into(),
            d1.join("audit.key").display().to_string(),
        ),
        (
            "ROTATOR_AUDIT__CHECKPOINT_FILE".into(),
            d1.join("audit.head").display().to_string(),
        ),
        (
            "ROTATOR_SEALING__KEY_FILE".into(),
            d1.join("seal.key").display().to_string(),
        ),
    ]
}

fn spawn(kx: &Kx, dir: &str, env: &[(&str, &str)]) -> Daemon {
    spawn_on(kx, dir, env, "127.0.0.1:0")
}

/// As [`spawn`], with health and metrics on `metrics`.
fn spawn_on(kx: &Kx, dir: &str, env: &[(&str, &str)], metrics: &str) -> Daemon {
    let mut c = tokio::process::Command::from(kx.s.command());
    c.args([
        "--config",
        "rotator.toml",
        "--data-dir",
        dir,
        "serve",
        "--log-format",
        "json",
        "--metrics-addr",
        metrics,
    ]);
    for (k, v) in shared_keys(kx) {
        c.env(k, v);
    }
    c.envs(env.iter().copied());
    Daemon::start(c)
}

impl Daemon {
    /// Runs `c` (a `rotator serve --log-format json`), reading its log.
    pub fn start(mut c: tokio::process::Command) -> Daemon {
        c.stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut raw = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = raw.next_line().await {
                let v = serde_json::from_str(&l).unwrap_or(serde_json::json!({"raw": l}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Daemon {
            child,
            lines,
            log: Vec::new(),
        }
    }
}

/// The invariants counted after every scenario.
async fn assert_invariants(kx: &Kx, users: usize, what: &str) {
    let c = |sql: &'static str| kx.s.count(sql);
    assert_eq!(
        c("SELECT COUNT(DISTINCT user_name) FROM credentials WHERE state = 'current'").await,
        users as i64,
        "{what}: every user has a current credential"
    );
    assert_eq!(
        c("SELECT COUNT(*) FROM (SELECT user_name FROM credentials WHERE state = 'current' GROUP BY user_name HAVING COUNT(*) > 1) t").await,
        0,
        "{what}: nobody has two"
    );
    assert_eq!(
        c("SELECT COUNT(*) FROM (SELECT user_name, generation FROM issuances GROUP BY user_name, generation HAVING COUNT(*) > 1) t").await,
        0,
        "{what}: no generation reused"
    );
    assert_eq!(kx.rotator_objects().await.1, "", "{what}: no stray CSR");
    let env: Vec<(String, String)> = shared_keys(kx);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ok(&kx.s.rotator_env(
        &[
            "--config",
            "rotator.toml",
            "--data-dir",
            "d1",
            "audit",
            "verify",
        ],
        &env,
    ));
}

async fn setup(kx: &Kx, users: &[&str]) {
    for u in users {
        ok(&kx.s.rotator(&[
            "--config",
            "rotator.toml",
            "--data-dir",
            "d1",
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_cannot_commit_when_it_resumes() {
    let Some(_pg) = use_engine(Engine::Postgres, "failover::a_leader_paused_past_its_lease") else {
        return;
    };
    // Every credential is always due; rotate ticks every 2 s.
    let kx = Kx::new(
        Options::default(),
        &format!("{LEASE}[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"*/2 * * * * *\"\n"),
    )
    .await;
    setup(&kx, &["alice"]).await;
    // The leader stalls in its first issuance, signed but not yet stored.
    let mut a = spawn(&kx, "d1", &[("ROTATOR_FAULT", "before-store:sleep-6000")]);
    a.wait_for("became the leader", Duration::from_secs(30), |_| true)
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while kx
        .s
        .count("SELECT COUNT(*) FROM issuances WHERE step IN ('approved', 'issued')")
        .await
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "a reaches the stall");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Paused past its lease (SIGSTOP): the standby takes over and a new epoch.
    a.signal("-STOP");
    let mut b = spawn(&kx, "d2", &[]);
    b.wait_for("took the leader epoch", Duration::from_secs(30), |v| {
        v["fields"]["epoch"] == 2
    })
    .await;
    // The old leader resumes mid-job, believing it still leads: refused.
    a.signal("-CONT");
    let refused = a
        .wait_for(
            "a deposed leader's transaction was refused: another daemon leads now",
            Duration::from_secs(30),
            |_| true,
        )
        .await;
    assert_eq!(refused["fields"]["mine"], 1);
    assert_eq!(refused["fields"]["current"], 2);
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
            .await,
        1,
        "its credential was never stored: still the one from add-user"
    );
    // Once it is gone its attempt is abandoned, and the leader renews alice.
    a.stop().await;
    b.wait_for("renewed", Duration::from_secs(60), |v| {
        v["fields"]["user"] == "alice"
    })
    .await;
    assert!(b.stop().await.success());
    assert_invariants(&kx, 1, "after the fence").await;
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM audit_events WHERE action = 'leader.epoch'")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_finishes_the_pass_when_the_leader_is_sigkilled_at_any_step() {
    use std::os::unix::process::ExitStatusExt;
    let Some(_pg) = use_engine(Engine::Postgres, "failover::the_standby_finishes_the_pass") else {
        return;
    };
    let kx = Kx::new(
        Options::default(),
        &format!("{LEASE}[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"*/2 * * * * *\"\n"),
    )
    .await;
    let users = ["alice", "bob"];
    setup(&kx, &users).await;
    for step in [
        "after-plan",
        "csr-submitted",
        "approved",
        "after-sign",
        "before-store",
        "after-store",
        "after-deliver",
    ] {
        let mut a = spawn(&kx, "d1", &[("ROTATOR_FAULT", &format!("{step}:kill"))]);
        a.wait_for("became the leader", Duration::from_secs(30), |_| true)
            .await;
        let b_port = free_port();
        let mut b = spawn_on(&kx, "d2", &[], &format!("127.0.0.1:{b_port}"));
        b.wait_for("rotator daemon started", Duration::from_secs(30), |_| true)
            .await;
        let st = a.child.wait().await.unwrap();
        assert_eq!(st.signal(), Some(9), "{step}: the leader died mid-issuance");
        // Within the lease and one rotate period (plus the pass itself): the
        // standby leads and a whole pass renews every user.
        b.wait_for("became the leader", Duration::from_secs(2 + 2 + 10), |_| {
            true
        })
        .await;
        b.wait_for("job done", Duration::from_secs(30), |v| {
            v["fields"]["job"] == "rotate"
                && v["fields"]["summary"]
                    .as_str()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    .is_some_and(|s| s["failed"] == 0 && s["renewed"] == users.len())
        })
        .await;
        // Ready as the new leader, although its other jobs (reconcile, every
        // 10 minutes) have not run since it took over: late only after two ticks.
        readyz_until(b_port, "200 as the new leader", |code, _| code == 200).await;
        let holder = lease_field(&kx, "holderIdentity").await;
        assert!(
            holder.ends_with(&format!("-{}", b.pid())),
            "{step}: the standby holds the Lease"
        );
        assert!(b.stop().await.success(), "{step}");
        assert_invariants(&kx, users.len(), step).await;
    }
}

/// One `spec` field of the daemons' Lease, as kubectl reads it.
pub async fn lease_field(kx: &Kx, field: &str) -> String {
    let o = kx
        .admin_kubectl(&[
            "get",
            "lease",
            "rotator",
            "-n",
            "rotator",
            "-o",
            &format!("jsonpath={{.spec.{field}}}"),
        ])
        .await;
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A free local port (bound and released: the daemon binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn readyz(port: u16) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, buf.split_once("\r\n\r\n")?.1.to_string()))
}

/// Polls `/readyz` until `want` accepts its answer.
pub async fn readyz_until(port: u16, what: &str, want: impl Fn(u16, &str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        if let Some((code, body)) = readyz(port).await {
            if want(code, &body) {
                return body;
            }
            last = Some((code, body));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("/readyz on {port}: never {what}; last answer {last:?}");
}

const UNREACHABLE: &str = "database unreachable: jobs and requests that need it fail until it is back; retrying with backoff";
const REACHABLE: &str = "database reachable again";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pass_finishes_when_the_postgres_server_restarts_mid_pass() {
    // A server of this test's own: it is stopped twice under the daemons.
    let Some(pg) =
        crate::pg::private("failover::the_pass_finishes_when_the_postgres_server_restarts")
    else {
        return;
    };
    let mut kx = Kx::new(
        Options::default(),
        &format!("{LEASE}[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"*/2 * * * * *\"\n"),
    )
    .await;
    // A password in the URL (unused: the server trusts its socket) that must
    // never be shown, in /readyz or in a log line.
    kx.s.database_url = Some(format!("{}&password=s3cret-pw", pg.create_database()));
    let users = ["alice", "bob", "carol"];
    setup(&kx, &users).await;
    for mode in ["fast", "immediate"] {
        // The leader stalls 2 s before storing each certificate: a pass is
        // long enough to lose the server in the middle of it.
        let (pa, pb) = (free_port(), free_port());
        let mut a = spawn_on(
            &kx,
            "d1",
            &[("ROTATOR_FAULT", "before-store:sleep-2000")],
            &format!("127.0.0.1:{pa}"),
        );
        a.wait_for("became the leader", Duration::from_secs(30), |_| true)
            .await;
        let mut b = spawn_on(&kx, "d2", &[], &format!("127.0.0.1:{pb}"));
        b.wait_for("rotator daemon started", Duration::from_secs(30), |_| true)
            .await;
        // Mid-pass: an issuance signed and waiting to be stored.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while kx
            .s
            .count("SELECT COUNT(*) FROM issuances WHERE step IN ('approved', 'issued')")
            .await
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{mode}: a reaches the stall"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pg.stop(mode).unwrap();
        // Meanwhile both daemons say what is wrong, without the password.
        for port in [pa, pb] {
            let body = readyz_until(port, "503 naming the database", |code, body| {
                code == 503
                    && body.contains("FAIL database writable: cannot connect to the database")
            })
            .await;
            assert!(body.contains("password=***"), "{mode}: {body}");
            assert!(!body.contains("s3cret-pw"), "{mode}: {body}");
            assert!(body.contains("fix:"), "{mode}: {body}");
        }
        a.wait_for(UNREACHABLE, Duration::from_secs(30), |_| true)
            .await;
        // Down for a few seconds, as a restart or a failover of the server.
        tokio::time::sleep(Duration::from_secs(3)).await;
        pg.start().unwrap();
        a.wait_for(REACHABLE, Duration::from_secs(60), |_| true)
            .await;
        // The pass runs again at once and renews everyone.
        a.wait_for("job done", Duration::from_secs(60), |v| {
            v["fields"]["job"] == "rotate"
                && v["fields"]["summary"]
                    .as_str()
                    .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
                    .is_some_and(|s| s["failed"] == 0 && s["renewed"] == users.len())
        })
        .await;
        // (Only the database: a leader that won the Lease after its start-up
        // catch-up has not run reconcile yet, and says so.)
        for port in [pa, pb] {
            readyz_until(port, "the database writable again", |_, body| {
                body.contains("ok   database writable")
            })
            .await;
        }
        // One line when the outage began and one when it ended, not one per attempt.
        assert_eq!(a.count(UNREACHABLE), 1, "{mode}: a's outage lines");
        assert_eq!(a.count(REACHABLE), 1, "{mode}");
        assert!(b.count(UNREACHABLE) <= 1, "{mode}: b's outage lines");
        let logs = format!("{:?}{:?}", a.drain(), b.drain());
        assert!(
            !logs.contains("s3cret-pw"),
            "{mode}: a log line shows the password"
        );
        assert!(b.stop().await.success(), "{mode}");
        assert!(a.stop().await.success(), "{mode}");
        assert_invariants(&kx, users.len(), mode).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_database_outage_stops_the_daemon_at_once() {
    // A server of this test's own: it is stopped under the daemon.
    let Some(pg) = crate::pg::private("failover::sigterm_during_a_database_outage") else {
        return;
    };
    let mut kx = Kx::new(
        Options::default(),
        &format!("{LEASE}[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"*/2 * * * * *\"\n"),
    )
    .await;
    kx.s.database_url = Some(pg.create_database());
    setup(&kx, &["alice"]).await;
    let mut a = spawn(&kx, "d1", &[]);
    a.wait_for("became the leader", Duration::from_secs(30), |_| true)
        .await;
    a.wait_for("job done", Duration::from_secs(30), |v| {
        v["fields"]["job"] == "rotate"
    })
    .await;
    pg.stop("fast").unwrap();
    a.wait_for(UNREACHABLE, Duration::from_secs(30), |_| true)
        .await;
    // Well into its wait: probes between backoff sleeps of 0.5, 1 and 2 s.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let signalled = std::time::Instant::now();
    a.signal("-TERM");
    let st = tokio::time::timeout(
        rotator::daemon::scheduler::STOP_GRACE + Duration::from_secs(10),
        a.child.wait(),
    )
    .await
    .expect("the daemon ends after SIGTERM")
    .unwrap();
    let took = signalled.elapsed();
    eprintln!("stopped {took:?} after SIGTERM during a database outage");
    assert!(st.success(), "{st:?}: {:#?}", a.drain());
    // A job waiting for the database has nothing to finish: it does not get
    // the grace a job in flight gets (30 s).
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}, the stop grace is {:?}",
        rotator::daemon::scheduler::STOP_GRACE
    );
    a.wait_for(
        "stopped while waiting for the database",
        Duration::from_secs(5),
        |v| v["fields"]["job"].is_string(),
    )
    .await;
    a.wait_for("rotator daemon stopped", Duration::from_secs(5), |_| true)
        .await;
    assert_eq!(
        a.count("job still running after the stop grace period; stopping anyway"),
        0
    );
    pg.start().unwrap();
    assert_invariants(&kx, 1, "after a stop during the outage").await;
}

/// The Lease is compared to the microsecond it was renewed: renewed 0.9 s into
/// a second with a 2 s lease, it is held until 2.9 s (read to the second, it
/// would look renewed at 0 s and lapse at 2 s, and a standby would take over
/// early) and free just after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_held_to_the_microsecond_it_was_renewed() {
    use rotator::support::clock::Clock;
    let kx = Kx::new(Options::default(), "").await;
    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::SystemClock.now());
    let app = kx.app(&clock).await;
    let cluster = app.cluster.as_ref().unwrap();
    let lease = Duration::from_secs(2);
    // A whole second, and instants after it.
    let t = clock.now_micros();
    let at = |ms: i64| t + ms * 1000;
    let round = |who: &'static str, ms: i64| async move {
        cluster
            .try_lease("rotator", "rotator", who, lease, at(ms))
            .await
            .unwrap()
    };
    assert!(round("a", 900).await, "a takes the free Lease");
    let renewed = lease_field(&kx, "renewTime").await;
    assert!(renewed.ends_with(".900000Z"), "renewTime {renewed}");
    assert!(!round("b", 2500).await, "held at 2.5 s: renewed at 0.9 s");
    assert!(!round("b", 2899).await, "held at 2.899 s");
    assert!(round("b", 2950).await, "lapsed at 2.95 s: b takes over");
    // a, renewing late, finds b's: held by b until 4.95 s.
    assert!(!round("a", 4900).await, "b holds it at 4.9 s");
    assert!(round("a", 4951).await, "a takes it back at 4.951 s");
}
