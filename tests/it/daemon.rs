//! The daemon's jobs: renewal inside the window driven by an injectable clock,
//! drift repair by reconcile, and a real `rotator serve` renewing on its own.
//!
//! Every test here runs over the kubernetes signer (`Kx`: the test cluster's
//! CSR API signs and its client CA is what kubectl is checked against), so none
//! has local-ca signing variants: no local CA key is involved. The daemon
//! issuing with the local CA, in process and through `rotator signer`, is
//! `user_api::a_real_daemon_with_the_local_ca_serves_enrollment_and_renewal`.

use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_renewed_inside_their_window_and_the_old_one_loses_access_after_grace() {
    let kx = Kx::new(
        Options::default(),
        "[rotation]\ngrace_period = \"5m\"\njitter = 0.1\n",
    )
    .await;
    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock));
    let app = kx.app(&clock).await;
    let mut first = rotator::delivery::FileSink {
        path: kx.s.path("first.kubeconfig"),
    };
    let mut s = spec("alice");
    s.ttl_seconds = 3600;
    app.issuer().add_user(s, &mut first, "test").await.unwrap();

    // rotator's clock and the cluster's move together.
    let advance = |secs: i64| {
        clock.advance(secs);
        kx.cluster.advance_clock(secs);
    };
    // notBefore is backdated 5 minutes: the real lifetime is 65 minutes, the window its last third.
    advance(30 * 60);
    assert_eq!(
        rotator::flows::renew::rotate_pass(&app).await.unwrap().due,
        0,
        "not yet inside the window"
    );
    advance(20 * 60);
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.due, r.renewed, r.failed), (1, 1, 0));
    assert_eq!(
        rotator::flows::renew::rotate_pass(&app).await.unwrap().due,
        0,
        "a second pass finds nothing due"
    );
    let delivered = app.settings.rotation.delivery_dir.join("alice.kubeconfig");
    assert_eq!(mode(&delivered), 0o600);
    std::fs::copy(&delivered, kx.s.path("renewed.kubeconfig")).unwrap();
    assert!(kx.can_list_pods("renewed.kubeconfig", "team-a").await);
    assert!(
        kx.can_list_pods("first.kubeconfig", "team-a").await,
        "the old credential keeps access during the grace period"
    );
    advance(6 * 60);
    rotator::daemon::scheduler::run_job(&app, rotator::daemon::scheduler::Job::Expire)
        .await
        .unwrap();
    assert!(
        !kx.can_list_pods("first.kubeconfig", "team-a").await,
        "and loses it after"
    );
    assert!(kx.can_list_pods("renewed.kubeconfig", "team-a").await);
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_restores_a_hand_deleted_binding_and_audits_the_repair() {
    let kx = Kx::new(Options::default(), "").await;
    ok(&kx
        .rotator_async(
            &["add-user", "alice", "-n", "team-a", "--role", "view"],
            &[],
        )
        .await);
    ok(&kx
        .admin_kubectl(&["delete", "rolebinding", "rotator:alice", "-n", "team-a"])
        .await);
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-a").await);
    // Someone also adds a subject to another user's binding by hand.
    ok(&kx
        .rotator_async(&["add-user", "bob", "-n", "team-b", "--role", "view"], &[])
        .await);
    let patch =
        r#"{"subjects":[{"kind":"User","name":"mallory","apiGroup":"rbac.authorization.k8s.io"}]}"#;
    ok(&kx
        .admin_kubectl(&[
            "patch",
            "rolebinding",
            "rotator:bob",
            "-n",
            "team-b",
            "--type=merge",
            "-p",
            patch,
        ])
        .await);

    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock));
    let app = kx.app(&clock).await;
    let r = rotator::daemon::scheduler::run_job(&app, rotator::daemon::scheduler::Job::Reconcile)
        .await
        .unwrap();
    assert_eq!(r["repaired"], serde_json::json!(["alice", "bob"]), "{r}");
    assert!(kx.can_list_pods("alice.kubeconfig", "team-a").await);
    let subjects = ok(&kx
        .admin_kubectl(&[
            "get",
            "rolebinding",
            "rotator:bob",
            "-n",
            "team-b",
            "-o",
            "jsonpath={.subjects[*].name}",
        ])
        .await);
    assert!(
        subjects.starts_with("rotator:bob:1.") && !subjects.contains(' '),
        "{subjects}"
    );
    let log = ok(&kx.rotator(&["audit", "log", "--output", "json"]));
    let events: Vec<serde_json::Value> = serde_json::from_str(&log).unwrap();
    assert!(events.iter().any(|e| e["action"] == "rbac.sync"
        && e["actor"] == "daemon:reconcile"
        && e["subject"] == "alice"));
    // Nothing drifted: a second pass repairs nothing.
    let r = rotator::daemon::scheduler::run_job(&app, rotator::daemon::scheduler::Job::Reconcile)
        .await
        .unwrap();
    assert_eq!(r["repaired"], serde_json::json!([]));
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_daemon_renews_what_is_due_and_delivers_it() {
    // renew_before longer than the lifetime: every credential is due at once.
    let kx = Kx::new(
        Options::default(),
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"0 0 0 1 1 *\"\n",
    )
    .await;
    ok(&kx
        .rotator_async(
            &[
                "add-user", "alice", "-n", "team-a", "--role", "view", "--ttl", "1h",
            ],
            &[],
        )
        .await);
    let mut daemon = tokio::process::Command::from(kx.s.command())
        // A port of its own: the default (9464) is another test's too.
        .args(["--config", "rotator.toml", "serve", "--log-format", "json", "--metrics-addr", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(daemon.stderr.take().unwrap()).lines();
    let mut renewed = None;
    let mut seen = Vec::new();
    while let Ok(Some(l)) =
        tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .unwrap_or(Ok(None))
    {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
        if v["fields"]["message"] == "renewed" {
            renewed = Some(v);
            break;
        }
        seen.push(l);
    }
    let Some(renewed) = renewed else {
        let _ = daemon.start_kill();
        let status = daemon.wait().await;
        panic!(
            "the catch-up rotate pass did not renew alice (the daemon: {status:?}); its log:\n{}",
            seen.join("\n")
        );
    };
    // Structured logs carry the user and the credential.
    assert_eq!(renewed["fields"]["user"], "alice");
    assert!(
        renewed["fields"]["credential"]
            .as_str()
            .is_some_and(|c| c.len() == 32)
    );
    let delivered = kx.s.path("rotator-data/kubeconfigs/alice.kubeconfig");
    std::fs::copy(&delivered, kx.s.path("from-daemon.kubeconfig")).unwrap();
    let who = ok(&kx
        .kubectl_as("from-daemon.kubeconfig", &["auth", "whoami", "-o", "json"])
        .await);
    assert!(who.contains("rotator:alice:2."), "{who}");
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().await.unwrap().success());
}
}

async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

fn metric(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    label: Option<(&str, &str)>,
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => {
                h.iter().map(|b| b.count).fold(0.0, f64::max)
            }
            _ => f64::NAN,
        })
}

async fn scrape(port: u16) -> prometheus_parse::Scrape {
    let (code, body) = http_get(port, "/metrics").await;
    assert_eq!(code, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text parses")
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_through_an_api_outage() {
    // Rotation always due and ticking every second, so the outage is felt at once.
    let kx = Kx::new(
        Options::default(),
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"* * * * * *\"\n",
    )
    .await;
    ok(&kx
        .rotator_async(
            &[
                "add-user", "alice", "-n", "team-a", "--role", "view", "--ttl", "1h",
            ],
            &[],
        )
        .await);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut daemon = tokio::process::Command::from(kx.s.command())
        .args([
            "--config",
            "rotator.toml",
            "serve",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let until = |what: &'static str| {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
    };
    // Ready once every job has succeeded.
    let mut last = (0, String::new());
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            last = http_get(port, "/readyz").await;
            if last.0 == 200 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {last:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(http_get(port, "/healthz").await, (200, "ok\n".to_string()));
    let m = scrape(port).await;
    assert_eq!(
        metric(&m, "rotator_credentials", Some(("state", "current"))),
        Some(1.0)
    );
    assert!(
        metric(
            &m,
            "rotator_credential_expiry_timestamp_seconds",
            Some(("user", "alice"))
        )
        .unwrap()
            > rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock) as f64
    );
    assert!(metric(&m, "rotator_issuances_total", Some(("result", "success"))).unwrap() >= 1.0);
    assert!(metric(&m, "rotator_issuance_duration_seconds", None).is_some());
    for job in ["rotate", "expire", "reconcile"] {
        assert!(
            metric(
                &m,
                "rotator_job_last_success_timestamp_seconds",
                Some(("job", job))
            )
            .unwrap()
                > 0.0,
            "{job}"
        );
    }

    // The API server answers 500 to everything for a while.
    kx.cluster.faults().add(
        testcluster::FaultRule::on(None, "/")
            .times(u64::MAX)
            .action(testcluster::FaultAction::Status(500)),
    );
    let (code, why) = loop {
        let r = http_get(port, "/readyz").await;
        if r.0 == 503 {
            break r;
        }
        until("not ready during the outage");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503);
    assert!(why.contains("FAIL cluster reachable"), "{why}");
    loop {
        let m = scrape(port).await;
        // Both counted, whichever job fails first (reconcile may fail before
        // the rotate pass has counted its unreachable issuance).
        let failed_jobs =
            metric(&m, "rotator_job_runs_total", Some(("result", "failure"))).unwrap_or(0.0);
        let unreachable = metric(
            &m,
            "rotator_issuances_total",
            Some(("result", "unreachable")),
        )
        .unwrap_or(0.0);
        if failed_jobs >= 1.0 && unreachable >= 1.0 {
            break;
        }
        until("failures counted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon keeps running through the outage"
    );

    // Recovery: everything catches up.
    kx.cluster.faults().clear();
    let before = metric(
        &scrape(port).await,
        "rotator_issuances_total",
        Some(("result", "success")),
    )
    .unwrap_or(0.0);
    loop {
        let m = scrape(port).await;
        if metric(&m, "rotator_issuances_total", Some(("result", "success"))).unwrap_or(0.0)
            > before
            && http_get(port, "/readyz").await.0 == 200
        {
            break;
        }
        until("recovery");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().await.unwrap().success());
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
            .await,
        1
    );
}
}

/// Runs `rotator serve` until it logs `until` (then SIGTERMs it) or dies; returns
/// its exit status and what it logged.
async fn serve_once(
    kx: &Kx,
    env: &[(&str, &str)],
    until: &str,
) -> (std::process::ExitStatus, String) {
    use tokio::io::AsyncBufReadExt;
    // The scratch's command: its database, no ROTATOR_* from the environment.
    let mut c = tokio::process::Command::from(kx.s.command());
    c.args([
        "--config",
        "rotator.toml",
        "serve",
        "--log-format",
        "json",
        "--metrics-addr",
        "127.0.0.1:0",
    ]);
    c.envs(env.iter().copied())
        .stderr(std::process::Stdio::piped());
    let mut d = c.spawn().unwrap();
    let mut lines = tokio::io::BufReader::new(d.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            log.push_str(&l);
            log.push('\n');
            if serde_json::from_str::<serde_json::Value>(&l)
                .is_ok_and(|v| v["fields"]["message"] == until)
            {
                return;
            }
        }
    })
    .await;
    // Found, or timed out: either way it is stopped (a dead process has no id to signal).
    if let Some(pid) = d.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    while let Ok(Some(l)) = lines.next_line().await {
        log.push_str(&l);
        log.push('\n');
    }
    (d.wait().await.unwrap(), log)
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_sigkilled_at_each_step_of_an_issuance_recovers_with_one_credential() {
    use std::os::unix::process::ExitStatusExt;
    // Every start renews (renew_before exceeds the lifetime), exactly once (yearly tick).
    let kx = Kx::new(
        Options::default(),
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"0 0 0 1 1 *\"\n",
    )
    .await;
    ok(&kx
        .rotator_async(
            &[
                "add-user", "alice", "-n", "team-a", "--role", "view", "--ttl", "1h",
            ],
            &[],
        )
        .await);
    for step in [
        "after-plan",
        "csr-submitted",
        "approved",
        "after-sign",
        "before-store",
        "after-store",
        "after-deliver",
    ] {
        let (st, _) = serve_once(&kx, &[("ROTATOR_FAULT", &format!("{step}:kill"))], "never").await;
        assert_eq!(
            st.signal(),
            Some(9),
            "{step}: the daemon was SIGKILLed mid-issuance"
        );
        let (st, log) = serve_once(&kx, &[], "renewed").await;
        assert!(
            st.success() && log.contains("\"renewed\""),
            "{step}: the restarted daemon renewed and stopped cleanly ({st:?}):\n{log}"
        );
        assert_eq!(
            kx.s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
                .await,
            1,
            "{step}"
        );
        assert_eq!(kx.s.count("SELECT COUNT(*) FROM issuances WHERE step NOT IN ('delivered', 'failed', 'abandoned')").await, 0, "{step}");
        assert_eq!(kx.rotator_objects().await.1, "", "{step}: no stray CSR");
        let current =
            kx.s.count("SELECT generation FROM credentials WHERE state = 'current'")
                .await;
        std::fs::copy(
            kx.s.path("rotator-data/kubeconfigs/alice.kubeconfig"),
            kx.s.path("delivered.kubeconfig"),
        )
        .unwrap();
        let who = ok(&kx
            .kubectl_as("delivered.kubeconfig", &["auth", "whoami", "-o", "json"])
            .await);
        assert!(
            who.contains(&format!("rotator:alice:{current}.")),
            "{step}: the delivered kubeconfig is the current credential: {who}"
        );
        assert!(
            kx.can_list_pods("delivered.kubeconfig", "team-a").await,
            "{step}"
        );
    }
    // Seven interrupted attempts. The five that died before the certificate was
    // stored lost their key and were abandoned; the two that died after it
    // (after-store, after-deliver) were resumed with their sealed key and the
    // same credential. No generation was reused.
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM issuances WHERE step = 'abandoned'")
            .await,
        5
    );
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM issuances").await,
        1 + 7 + 5,
        "a resumed attempt is finished, not replaced"
    );
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE sealed_key IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        kx.s.count("SELECT COUNT(DISTINCT generation) FROM issuances")
            .await,
        kx.s.count("SELECT COUNT(*) FROM issuances").await
    );
    ok(&kx.rotator(&["audit", "verify"]));
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reissued_kubeconfigs_can_be_delivered_to_a_secret_in_the_users_namespace() {
    let kx = Kx::new(
        Options::default(),
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n",
    )
    .await;
    kx.grant_secret_delivery("team-a", "bob-kubeconfig").await;
    let e = fails_with(
        &kx.rotator_async(
            &[
                "add-user",
                "bob",
                "-n",
                "team-a",
                "--role",
                "view",
                "--deliver",
                "secret:team-b/bob",
            ],
            &[],
        )
        .await,
        4,
    );
    assert!(e.contains("team-b"), "{e}");
    fails_with(
        &kx.rotator_async(
            &[
                "add-user",
                "bob",
                "-n",
                "team-a",
                "--role",
                "view",
                "--deliver",
                "secret:team-a",
            ],
            &[],
        )
        .await,
        2,
    );
    ok(&kx
        .rotator_async(
            &[
                "add-user",
                "bob",
                "-n",
                "team-a",
                "--role",
                "view",
                "--ttl",
                "1h",
                "--deliver",
                "secret:team-a/bob-kubeconfig",
            ],
            &[],
        )
        .await);
    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock));
    let app = kx.app(&clock).await;
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (1, 0));
    let secret = ok(&kx
        .admin_kubectl(&[
            "get",
            "secret",
            "bob-kubeconfig",
            "-n",
            "team-a",
            "-o",
            "json",
        ])
        .await);
    let v: serde_json::Value = serde_json::from_str(&secret).unwrap();
    assert_eq!(v["type"], "Opaque");
    assert_eq!(
        v["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "rotator"
    );
    use base64::Engine;
    let kc = base64::engine::general_purpose::STANDARD
        .decode(v["data"]["kubeconfig"].as_str().unwrap())
        .unwrap();
    kx.s.write("from-secret.kubeconfig", &String::from_utf8(kc).unwrap());
    let who = ok(&kx
        .kubectl_as("from-secret.kubeconfig", &["auth", "whoami", "-o", "json"])
        .await);
    assert!(who.contains("rotator:bob:2."), "{who}");
    // A second renewal replaces the Secret in place.
    rotator::flows::renew::rotate_pass(&app).await.unwrap();
    let data = ok(&kx
        .admin_kubectl(&[
            "get",
            "secret",
            "bob-kubeconfig",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.data.kubeconfig}",
        ])
        .await);
    let kc = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .unwrap(),
    )
    .unwrap();
    kx.s.write("from-secret.kubeconfig", &kc);
    assert!(
        ok(&kx
            .kubectl_as("from-secret.kubeconfig", &["auth", "whoami", "-o", "json"])
            .await)
        .contains("rotator:bob:3.")
    );
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_or_an_edited_file_reloads_the_config_and_a_broken_one_is_refused() {
    use tokio::io::AsyncBufReadExt;
    let kx = Kx::new(Options::default(), "[schedule]\nrotate = \"0 0 0 1 1 *\"\n").await;
    ok(&kx
        .rotator_async(
            &[
                "add-user", "alice", "-n", "team-a", "--role", "view", "--ttl", "1h",
            ],
            &[],
        )
        .await);
    let base = std::fs::read_to_string(kx.s.path("rotator.toml")).unwrap();
    let mut d = tokio::process::Command::from(kx.s.command())
        .args([
            "--config",
            "rotator.toml",
            "serve",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = d.id().unwrap().to_string();
    let mut lines = tokio::io::BufReader::new(d.stderr.take().unwrap()).lines();
    let mut wait_for = async |msg: &str| -> serde_json::Value {
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Ok(Some(l)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
                if v["fields"]["message"] == msg {
                    return v;
                }
            }
            panic!("the daemon ended before logging {msg:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {msg:?}"))
    };
    wait_for("rotator daemon started").await;
    // A broken file is refused and the running configuration kept.
    std::fs::write(
        kx.s.path("rotator.toml"),
        format!("{base}\n[schedule]\nrotate = \"bogus\"\n"),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let failed = wait_for("reload failed; keeping the running configuration").await;
    assert!(
        failed["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("schedule"),
        "{failed}"
    );
    // A good one takes effect: rotation every second, everything due.
    std::fs::write(kx.s.path("rotator.toml"), base.replace("[schedule]\nrotate = \"0 0 0 1 1 *\"\n", "[schedule]\nrotate = \"* * * * * *\"\n[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n")).unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let reloaded = wait_for("configuration reloaded").await;
    assert_eq!(reloaded["fields"]["rotate"], "* * * * * *");
    let renewed = wait_for("renewed").await;
    assert_eq!(renewed["fields"]["user"], "alice");
    // No signal at all: a changed file is picked up by itself.
    let now = std::fs::read_to_string(kx.s.path("rotator.toml")).unwrap();
    std::fs::write(
        kx.s.path("rotator.toml"),
        now.replace("rotate = \"* * * * * *\"", "rotate = \"0 0 0 1 1 *\""),
    )
    .unwrap();
    let mut picked_up = false;
    for _ in 0..20 {
        let r = wait_for("configuration reloaded").await;
        if r["fields"]["rotate"] == "0 0 0 1 1 *" {
            picked_up = true;
            break;
        }
    }
    assert!(picked_up, "the edited file was reloaded without SIGHUP");
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(d.wait().await.unwrap().success());
}
}

// SQLite only: the refusal of leader election on SQLite is what it checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_on_sqlite_is_refused() {
    // Two daemons with a file each would each believe they hold every user:
    // a standby taking over would know none of the leader's. Leader election
    // (and its Lease and fence) is for daemons on one PostgreSQL database
    // (tests/it/failover.rs).
    let kx = Kx::new(
        Options::default(),
        "[leader_election]\nenabled = true\nlease_duration = \"2s\"\n",
    )
    .await;
    let e = fails_with(&kx.rotator(&["serve", "--metrics-addr", "127.0.0.1:0"]), 3);
    assert!(
        e.contains("leader election needs a database every daemon shares")
            && e.contains("rotator.db")
            && e.contains("fix:"),
        "{e}"
    );
    let lease = kx
        .admin_kubectl(&["get", "lease", "rotator", "-n", "rotator"])
        .await;
    assert!(!lease.status.success(), "no Lease was taken");
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tied_and_overlapping_schedules_run_every_job_at_each_of_its_ticks() {
    // rotate and expire tie every 3 s; reconcile every 5 s ties with both on :00, :15, :30, :45.
    use std::str::FromStr;
    use tokio::io::AsyncBufReadExt;
    let kx = Kx::new(
        Options::default(),
        "[schedule]\nrotate = \"*/3 * * * * *\"\nexpire = \"*/3 * * * * *\"\nreconcile = \"*/5 * * * * *\"\n",
    )
    .await;
    ok(&kx
        .rotator_async(
            &["add-user", "alice", "-n", "team-a", "--role", "view"],
            &[],
        )
        .await);
    let mut d = tokio::process::Command::from(kx.s.command())
        .args([
            "--config",
            "rotator.toml",
            "serve",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = d.id().unwrap().to_string();
    let mut lines = tokio::io::BufReader::new(d.stderr.take().unwrap()).lines();
    let runs = |v: &serde_json::Value| -> Option<String> {
        (v["fields"]["message"] == "job done" || v["fields"]["message"] == "job failed")
            .then(|| v["fields"]["job"].as_str().unwrap_or_default().to_string())
    };
    // The start-up catch-up runs each job once; the window starts after it.
    let mut caught_up = 0;
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while caught_up < 3 {
            let l = lines.next_line().await.unwrap().expect("the daemon runs");
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            caught_up += runs(&v).is_some() as usize;
        }
    })
    .await
    .expect("the catch-up pass ran");
    let start = chrono::Utc::now();
    let window = std::time::Duration::from_secs(16);
    let mut count = std::collections::BTreeMap::<String, usize>::new();
    let _ = tokio::time::timeout(window, async {
        while let Ok(Some(l)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            if let Some(job) = runs(&v) {
                *count.entry(job).or_default() += 1;
            }
        }
    })
    .await;
    let end = chrono::Utc::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(d.wait().await.unwrap().success());
    let ticks = |e: &str| {
        cron::Schedule::from_str(e)
            .unwrap()
            .after(&start)
            .take_while(|t| *t <= end)
            .count()
    };
    let expected = [
        ("rotate", ticks("*/3 * * * * *")),
        ("expire", ticks("*/3 * * * * *")),
        ("reconcile", ticks("*/5 * * * * *")),
    ];
    eprintln!("runs {count:?}, ticks {expected:?} over {:?}", end - start);
    for (job, n) in expected {
        let ran = count.get(job).copied().unwrap_or(0);
        // A tick in the last moment of the window may be logged just after it.
        assert!(
            ran == n || ran + 1 == n,
            "{job} ran {ran} times for {n} ticks (runs {count:?})"
        );
        assert!(n >= 3, "{job}: the window holds several ticks");
    }
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expire_pass_is_audited_as_the_daemon() {
    let kx = Kx::new(Options::default(), "[rotation]\ngrace_period = \"5m\"\n").await;
    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock));
    let app = kx.app(&clock).await;
    let mut first = rotator::delivery::FileSink {
        path: kx.s.path("first.kubeconfig"),
    };
    let mut s = spec("alice");
    s.ttl_seconds = 3600;
    app.issuer().add_user(s, &mut first, "test").await.unwrap();
    let mut second = rotator::delivery::FileSink {
        path: kx.s.path("second.kubeconfig"),
    };
    app.issuer()
        .rotate("alice", &mut second, "test")
        .await
        .unwrap();
    ok(&kx
        .rotator_async(
            &[
                "token",
                "create",
                "--ttl",
                "30m",
                "--groups",
                "system:bootstrappers:workers",
            ],
            &[],
        )
        .await);
    // Past the grace period (the superseded group goes), the first notAfter
    // (it expires) and the token's expiry (it is deleted).
    clock.advance(2 * 3600);
    kx.cluster.advance_clock(2 * 3600);
    let r = rotator::daemon::scheduler::run_job(&app, rotator::daemon::scheduler::Job::Expire)
        .await
        .unwrap();
    assert!(r["tokens_deleted"].as_u64() >= Some(1), "{r}");
    let log = ok(&kx.rotator(&["audit", "log", "--output", "json"]));
    let events: Vec<serde_json::Value> = serde_json::from_str(&log).unwrap();
    // What came after the token was made is the expire pass's.
    let since = events
        .iter()
        .position(|e| e["action"] == "token.create")
        .expect("token.create audited");
    for action in ["rbac.sync", "credential.expire", "token.expire"] {
        let by: Vec<_> = events[since..]
            .iter()
            .filter(|e| e["action"] == action)
            .map(|e| e["actor"].as_str().unwrap_or_default())
            .collect();
        assert!(
            !by.is_empty(),
            "{action}: no event after the expire pass: {log}"
        );
        assert!(
            by.iter().all(|a| *a == rotator::daemon::scheduler::EXPIRE_ACTOR),
            "{action} is audited as the daemon's expire job, not as {by:?}"
        );
    }
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_the_delivery_directory_stops_neither_the_other_jobs_nor_sigterm() {
    use std::os::unix::fs::FileTypeExt;
    use tokio::io::AsyncBufReadExt;
    // alice is always due and her delivery path is a FIFO; bob's is a file.
    let kx = Kx::new(
        Options::default(),
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n[schedule]\nrotate = \"*/2 * * * * *\"\nexpire = \"*/2 * * * * *\"\nreconcile = \"*/2 * * * * *\"\n",
    )
    .await;
    for u in ["alice", "bob"] {
        ok(&kx
            .rotator_async(
                &[
                    "add-user", u, "-n", "team-a", "--role", "view", "--ttl", "1h",
                ],
                &[],
            )
            .await);
    }
    let dir = kx.s.path("rotator-data/kubeconfigs");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("alice.kubeconfig");
    let _ = std::fs::remove_file(&fifo);
    ok(&run("mkfifo", &[fifo.to_str().unwrap()]));
    let mut d = tokio::process::Command::from(kx.s.command())
        .args([
            "--config",
            "rotator.toml",
            "serve",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = d.id().unwrap().to_string();
    let mut lines = tokio::io::BufReader::new(d.stderr.take().unwrap()).lines();
    let mut refused = false;
    let mut after = std::collections::BTreeMap::<String, usize>::new();
    let mut bob = 0;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(40), async {
        while let Ok(Some(l)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            let f = &v["fields"];
            if f["message"] == "renewal failed; retried on the next pass"
                && f["user"] == "alice"
                && f["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("is a FIFO")
            {
                refused = true;
            }
            if f["message"] == "renewed" && f["user"] == "bob" {
                bob += 1;
            }
            if refused && f["message"] == "job done" {
                *after
                    .entry(f["job"].as_str().unwrap_or_default().to_string())
                    .or_default() += 1;
            }
            if after.values().filter(|n| **n >= 2).count() == 3 && bob >= 2 {
                return;
            }
        }
    })
    .await;
    assert!(
        refused,
        "alice's delivery to the FIFO is refused, not blocked on"
    );
    assert!(bob >= 2, "bob keeps being renewed ({bob})");
    for job in ["rotate", "expire", "reconcile"] {
        assert!(
            after.get(job).copied().unwrap_or(0) >= 2,
            "{job} keeps running after the refusal: {after:?}"
        );
    }
    let stopped = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let st = tokio::time::timeout(rotator::daemon::scheduler::STOP_GRACE, d.wait())
        .await
        .expect("SIGTERM ends the daemon within its grace period")
        .unwrap();
    assert!(st.success(), "{st:?}");
    eprintln!("stopped {:?} after SIGTERM", stopped.elapsed());
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_daemon_within_its_grace_period_while_a_job_hangs() {
    use tokio::io::AsyncBufReadExt;
    let kx = Kx::new(
        Options::default(),
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n",
    )
    .await;
    kx.grant_secret_delivery("team-a", "bob-kubeconfig").await;
    ok(&kx
        .rotator_async(
            &[
                "add-user",
                "bob",
                "-n",
                "team-a",
                "--role",
                "view",
                "--ttl",
                "1h",
                "--deliver",
                "secret:team-a/bob-kubeconfig",
            ],
            &[],
        )
        .await);
    // The API server never answers the delivery (a conditional replace of the
    // Secret): the catch-up rotation hangs in it.
    kx.cluster.faults().add(
        testcluster::FaultRule::on(Some("PUT"), "/secrets/")
            .times(u64::MAX)
            .action(testcluster::FaultAction::Hang),
    );
    let mut d = tokio::process::Command::from(kx.s.command())
        .args([
            "--config",
            "rotator.toml",
            "serve",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = d.id().unwrap().to_string();
    let mut lines = tokio::io::BufReader::new(d.stderr.take().unwrap()).lines();
    // Expire and reconcile are caught up; then rotate starts and hangs.
    let mut done = 0;
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while done < 2 {
            let l = lines.next_line().await.unwrap().expect("the daemon runs");
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            done += (v["fields"]["message"] == "job done") as usize;
        }
    })
    .await
    .expect("expire and reconcile ran");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let stopped = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let mut log = String::new();
    let st = tokio::time::timeout(
        rotator::daemon::scheduler::STOP_GRACE + std::time::Duration::from_secs(10),
        async {
            while let Ok(Some(l)) = lines.next_line().await {
                log.push_str(&l);
                log.push('\n');
            }
            d.wait().await.unwrap()
        },
    )
    .await
    .expect("SIGTERM ends the daemon within its grace period, though a job hangs");
    let took = stopped.elapsed();
    eprintln!("stopped {took:?} after SIGTERM with the rotate job hung");
    assert!(st.success(), "{st:?}\n{log}");
    assert!(
        log.contains("job still running after the stop grace period"),
        "the hung job was given its grace, then dropped:\n{log}"
    );
    assert!(took >= rotator::daemon::scheduler::STOP_GRACE, "{took:?}");
    kx.cluster.faults().clear();
}
}
