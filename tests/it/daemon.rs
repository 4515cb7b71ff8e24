//! The daemon's jobs: renewal inside the window driven by an injectable clock,
//! drift repair by reconcile, and a real `rotator serve` renewing on its own.
use std::sync::Arc;

use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;

async fn app_with_clock(kx: &Kx, clock: &rotator::clock::ManualClock) -> Arc<rotator::app::App> {
    let cfg = kx.s.path("rotator.toml");
    let env = [(
        "ROTATOR_DATA_DIR".to_string(),
        kx.s.path("rotator-data").display().to_string(),
    )];
    let settings = rotator::config::load_with(Some(&cfg), &env, &Default::default()).unwrap();
    Arc::new(
        rotator::app::App::open(
            settings,
            Arc::new(clock.clone()),
            Arc::new(rotator::issuer::NoFaults),
            "test".into(),
        )
        .await
        .unwrap()
        .0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_renewed_inside_their_window_and_the_old_one_loses_access_after_grace() {
    let kx = Kx::new(
        Options::default(),
        "[rotation]\ngrace_period = \"5m\"\njitter = 0.1\n",
    )
    .await;
    let clock =
        rotator::clock::ManualClock::new(rotator::clock::Clock::now(&rotator::clock::SystemClock));
    let app = app_with_clock(&kx, &clock).await;
    let mut first = rotator::sink::FileSink {
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
        rotator::renewal::rotate_pass(&app).await.unwrap().due,
        0,
        "not yet inside the window"
    );
    advance(20 * 60);
    let r = rotator::renewal::rotate_pass(&app).await.unwrap();
    assert_eq!((r.due, r.renewed, r.failed), (1, 1, 0));
    assert_eq!(
        rotator::renewal::rotate_pass(&app).await.unwrap().due,
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
    rotator::scheduler::run_job(&app, rotator::scheduler::Job::Expire)
        .await
        .unwrap();
    assert!(
        !kx.can_list_pods("first.kubeconfig", "team-a").await,
        "and loses it after"
    );
    assert!(kx.can_list_pods("renewed.kubeconfig", "team-a").await);
}

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
        rotator::clock::ManualClock::new(rotator::clock::Clock::now(&rotator::clock::SystemClock));
    let app = app_with_clock(&kx, &clock).await;
    let r = rotator::scheduler::run_job(&app, rotator::scheduler::Job::Reconcile)
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
    assert_eq!(subjects, "rotator:bob:1");
    let log = ok(&kx.rotator(&["audit", "log", "--output", "json"]));
    let events: Vec<serde_json::Value> = serde_json::from_str(&log).unwrap();
    assert!(events.iter().any(|e| e["action"] == "rbac.sync"
        && e["actor"] == "daemon:reconcile"
        && e["subject"] == "alice"));
    // Nothing drifted: a second pass repairs nothing.
    let r = rotator::scheduler::run_job(&app, rotator::scheduler::Job::Reconcile)
        .await
        .unwrap();
    assert_eq!(r["repaired"], serde_json::json!([]));
}

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
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"))
        .current_dir(kx.s.dir.path())
        .args(["--config", "rotator.toml", "serve", "--log-format", "json"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(daemon.stderr.take().unwrap()).lines();
    let mut renewed = None;
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
    }
    let renewed = renewed.expect("the catch-up rotate pass renewed alice");
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
    assert!(who.contains("rotator:alice:2"), "{who}");
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(daemon.wait().await.unwrap().success());
}
