//! Crash safety: faults injected at each step of an issuance; the rerun finishes
//! the job with exactly one current credential, and generations never repeat.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rotator::issuer::{FaultPoint, Faults, IssueError};
use rotator::sink::FileSink;

use crate::common::*;

/// Fails once at `point`, then lets everything through, like a process that
/// died there and was started again.
struct Once {
    point: FaultPoint,
    armed: AtomicBool,
}

impl Faults for Once {
    fn hit(&self, p: FaultPoint) -> Result<(), IssueError> {
        if p == self.point && self.armed.swap(false, Ordering::SeqCst) {
            return Err(IssueError::Injected(p));
        }
        Ok(())
    }
}

async fn count(app: &rotator::app::App, sql: &'static str) -> i64 {
    let (n,): (i64,) = sqlx::query_as(sql)
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    n
}

#[tokio::test]
async fn a_failure_after_signing_leaves_no_row_and_no_file_and_the_rerun_succeeds_once() {
    for point in [
        FaultPoint::AfterPlan,
        FaultPoint::AfterSign,
        FaultPoint::BeforeStore,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let app = app(
            dir.path(),
            "",
            Arc::new(Once {
                point,
                armed: AtomicBool::new(true),
            }),
        )
        .await;
        let out = dir.path().join("alice.kubeconfig");
        let e = app
            .issuer()
            .add_user(spec("alice"), &mut FileSink { path: out.clone() }, "t")
            .await
            .unwrap_err();
        assert!(matches!(e, IssueError::Injected(p) if p == point));
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM credentials").await,
            0,
            "{point:?}"
        );
        assert_eq!(
            count(&app, "SELECT COUNT(*) FROM users").await,
            0,
            "{point:?}"
        );
        assert!(!out.exists(), "{point:?}: no kubeconfig may exist");

        let issued = app
            .issuer()
            .add_user(spec("alice"), &mut FileSink { path: out.clone() }, "t")
            .await
            .unwrap();
        assert!(out.exists());
        assert_eq!(count(&app, "SELECT COUNT(*) FROM credentials").await, 1);
        assert_eq!(
            count(
                &app,
                "SELECT COUNT(*) FROM credentials WHERE state = 'current'"
            )
            .await,
            1
        );
        // The interrupted attempt's generation is burnt: a certificate the signer may
        // have made for it must never gain the new credential's permissions.
        assert_eq!(issued.credential.generation, 2, "{point:?}");
        assert_eq!(
            count(
                &app,
                "SELECT COUNT(*) FROM issuances WHERE step = 'abandoned'"
            )
            .await,
            1
        );
        assert_eq!(
            count(
                &app,
                "SELECT COUNT(*) FROM audit_events WHERE action = 'issuance.abandon'"
            )
            .await,
            1
        );
        assert!(
            rotator::store::audit::verify(&app.store)
                .await
                .unwrap()
                .first_break
                .is_none()
        );
    }
}

#[tokio::test]
async fn a_crash_between_store_and_delivery_is_failed_and_redone_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(
        dir.path(),
        "",
        Arc::new(Once {
            point: FaultPoint::AfterStore,
            armed: AtomicBool::new(false),
        }),
    )
    .await;
    let out = dir.path().join("k");
    app.issuer()
        .add_user(spec("alice"), &mut FileSink { path: out.clone() }, "t")
        .await
        .unwrap();
    let first = std::fs::read(&out).unwrap();

    // Rotation dies after storing the new certificate, before delivering it.
    let app2 = crate::common::app(
        dir.path(),
        "",
        Arc::new(Once {
            point: FaultPoint::AfterStore,
            armed: AtomicBool::new(true),
        }),
    )
    .await;
    app2.issuer()
        .rotate("alice", &mut FileSink { path: out.clone() }, "t")
        .await
        .unwrap_err();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        first,
        "the old kubeconfig is untouched"
    );
    assert_eq!(
        count(
            &app2,
            "SELECT COUNT(*) FROM credentials WHERE state = 'current' AND generation = 1"
        )
        .await,
        1,
        "the old credential stays current"
    );
    assert_eq!(
        count(
            &app2,
            "SELECT COUNT(*) FROM credentials WHERE state = 'pending'"
        )
        .await,
        1
    );

    // The rerun: the stored-but-undelivered credential's key is gone, so it is failed, and a new one issued.
    let issued = app2
        .issuer()
        .rotate("alice", &mut FileSink { path: out.clone() }, "t")
        .await
        .unwrap();
    assert_eq!(issued.credential.generation, 3);
    assert_eq!(
        count(
            &app2,
            "SELECT COUNT(*) FROM credentials WHERE state = 'current'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &app2,
            "SELECT COUNT(*) FROM credentials WHERE state = 'failed' AND generation = 2"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &app2,
            "SELECT COUNT(*) FROM credentials WHERE state = 'superseded' AND generation = 1"
        )
        .await,
        1
    );
    assert_ne!(std::fs::read(&out).unwrap(), first);
}

#[tokio::test]
async fn a_process_killed_mid_issuance_is_finished_by_the_next_run() {
    let s = Scratch::new();
    // SIGABRT between signing and storing: the process dies with the key in memory.
    let o = s.rotator_env(
        &["add-user", "alice", "-n", "team-a", "--role", "view"],
        &[("ROTATOR_FAULT", "after-sign:abort")],
    );
    assert!(!o.status.success());
    assert!(!s.path("alice.kubeconfig").exists());
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);
    assert_eq!(
        s.count("SELECT COUNT(*) FROM issuances WHERE step = 'planned'")
            .await,
        1
    );
    ok(&s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]));
    assert_eq!(
        s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
            .await,
        1
    );
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 1);
    // Rerunning the finished command is refused, not repeated.
    fails_with(
        &s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]),
        6,
    );
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 1);
}

#[tokio::test]
async fn concurrent_rotations_never_leave_two_current_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let app = plain_app(dir.path()).await;
    app.issuer()
        .add_user(
            spec("alice"),
            &mut FileSink {
                path: dir.path().join("k0"),
            },
            "t",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    let app = Arc::new(app);
    for i in 0..6 {
        let app = app.clone();
        let path = dir.path().join(format!("k{}", i + 1));
        tasks.push(tokio::spawn(async move {
            app.issuer()
                .rotate("alice", &mut FileSink { path }, "t")
                .await
                .map(|i| i.credential.generation)
        }));
    }
    let mut gens = Vec::new();
    for t in tasks {
        if let Ok(g) = t.await.unwrap() {
            gens.push(g);
        }
    }
    assert!(!gens.is_empty());
    gens.sort();
    gens.dedup();
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM credentials WHERE state = 'current'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&app, "SELECT COUNT(DISTINCT generation) FROM issuances").await,
        count(&app, "SELECT COUNT(*) FROM issuances").await
    );
    assert!(
        rotator::store::audit::verify(&app.store)
            .await
            .unwrap()
            .first_break
            .is_none()
    );
}
