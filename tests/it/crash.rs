//! Crash safety: faults injected at each step of an issuance; the rerun finishes
//! the job with exactly one current credential, and generations never repeat.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rotator::delivery::FileSink;
use rotator::flows::issue::{FaultPoint, Faults, IssueError};

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

signing_variants! {
#[tokio::test]
async fn a_failure_after_signing_leaves_no_row_and_no_file_and_the_rerun_succeeds_once(signing: Signing) {
    for point in [
        FaultPoint::AfterPlan,
        FaultPoint::AfterSign,
        FaultPoint::BeforeStore,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let signer = signing.start(dir.path());
        let app = app(
            dir.path(),
            &local_ca_toml(signer.as_ref()),
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
        // Through the signer, the attempt that died after signing stays on the
        // signer's own record (a daemon cannot hide what it had signed), and
        // the rerun's certificate is the one more there.
        let died_after_signing = usize::from(point != FaultPoint::AfterPlan);
        assert_signed_at(dir.path(), signer.as_ref(), died_after_signing + 1);
        if let Some(p) = &signer {
            assert_eq!(
                p.signed_serials().last(),
                Some(&issued.credential.serial),
                "{point:?}"
            );
        }
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
}

signing_variants! {
#[tokio::test]
async fn a_crash_between_store_and_delivery_is_resumed_with_the_same_credential(signing: Signing) {
    let dir = tempfile::tempdir().unwrap();
    let signer = signing.start(dir.path());
    let local_ca = local_ca_toml(signer.as_ref());
    let app = app(
        dir.path(),
        &local_ca,
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
        &local_ca,
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

    // Its key was kept sealed, never in plain text.
    let pending_serial: String = {
        let mut conn = app2.store.conn().await.unwrap();
        let (serial, sealed): (String, String) =
            sqlx::query_as("SELECT serial, sealed_key FROM credentials WHERE state = 'pending'")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
        assert!(sealed.starts_with("v1.") && !sealed.contains("PRIVATE KEY"));
        serial
    };

    // The rerun resumes that attempt: the same credential is delivered, no new one issued.
    let issued = app2
        .issuer()
        .rotate("alice", &mut FileSink { path: out.clone() }, "t")
        .await
        .unwrap();
    assert_eq!(issued.credential.generation, 2);
    assert_eq!(issued.credential.serial, pending_serial);
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
            "SELECT COUNT(*) FROM credentials WHERE state = 'failed'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&app2, "SELECT COUNT(*) FROM issuances").await,
        2,
        "no third attempt"
    );
    assert_eq!(
        count(
            &app2,
            "SELECT COUNT(*) FROM credentials WHERE sealed_key IS NOT NULL"
        )
        .await,
        0,
        "the sealed key is gone once delivered"
    );
    assert_eq!(
        count(
            &app2,
            "SELECT COUNT(*) FROM credentials WHERE state = 'superseded' AND generation = 1"
        )
        .await,
        1
    );
    let (_, _, cert, _) = kubeconfig_parts(&out);
    assert_eq!(
        rotator::pki::parse_cert_pem(&cert, "delivered")
            .unwrap()
            .serial,
        pending_serial
    );
    // Two certificates signed in all (alice's first, the resumed one), none
    // for the rerun: it delivered what was stored.
    assert_signed_at(dir.path(), signer.as_ref(), 2);
    if let Some(p) = &signer {
        assert_eq!(p.signed_serials().last(), Some(&pending_serial));
    }
}
}

signing_variants! {
#[tokio::test]
async fn a_process_killed_mid_issuance_is_finished_by_the_next_run(signing: Signing) {
    let s = Scratch::signing(signing);
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
    // The aborted run's certificate and the one kept: both on the signer's record.
    s.assert_signed("rotator-data", 2);
}
}

signing_variants! {
    #[tokio::test]
    async fn concurrent_rotations_never_leave_two_current_credentials(signing: Signing) {
        let dir = tempfile::tempdir().unwrap();
        let signer = signing.start(dir.path());
        let app = app(
            dir.path(),
            &local_ca_toml(signer.as_ref()),
            Arc::new(rotator::flows::issue::NoFaults),
        )
        .await;
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
}

/// Fails its first `failures` deliveries, then writes like a FileSink.
pub(crate) struct FlakySink {
    pub(crate) inner: FileSink,
    pub(crate) failures: usize,
}

impl rotator::delivery::Sink for FlakySink {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn prepare(&self) -> Result<(), rotator::delivery::SinkError> {
        Ok(())
    }
    fn deliver<'a>(
        &'a mut self,
        kubeconfig: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<(), rotator::delivery::SinkError>> + Send + 'a>,
    > {
        if self.failures > 0 {
            self.failures -= 1;
            return Box::pin(async {
                Err(rotator::delivery::SinkError {
                    target: "flaky".into(),
                    reason: "the disk is full".into(),
                    fix: "free some space",
                })
            });
        }
        self.inner.deliver(kubeconfig)
    }
}

/// alice added with a working sink; then her kubeconfig file behind one that fails `failures` times.
async fn alice_with_a_flaky_sink(
    dir: &std::path::Path,
    failures: usize,
    signer: Option<&SignerProc>,
) -> (rotator::app::App, FlakySink) {
    let app = app(
        dir,
        &local_ca_toml(signer),
        Arc::new(rotator::flows::issue::NoFaults),
    )
    .await;
    let out = dir.join("k");
    app.issuer()
        .add_user(spec("alice"), &mut FileSink { path: out.clone() }, "t")
        .await
        .unwrap();
    let sink = FlakySink {
        inner: FileSink { path: out },
        failures,
    };
    (app, sink)
}

signing_variants! {
#[tokio::test]
async fn a_failed_delivery_is_retried_with_the_same_credential(signing: Signing) {
    let dir = tempfile::tempdir().unwrap();
    let signer = signing.start(dir.path());
    let (app, mut sink) = alice_with_a_flaky_sink(dir.path(), 2, signer.as_ref()).await;
    let out = sink.inner.path.clone();
    for _ in 0..2 {
        let e = app
            .issuer()
            .rotate("alice", &mut sink, "t")
            .await
            .unwrap_err();
        assert!(matches!(e, IssueError::Sink(_)), "{e}");
    }
    // Both failures concern one stored credential, still pending; the old one is current.
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM credentials WHERE state = 'pending' AND sealed_key IS NOT NULL"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM credentials WHERE state = 'current' AND generation = 1"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM audit_events WHERE action = 'delivery.fail'"
        )
        .await,
        2
    );
    let issued = app.issuer().rotate("alice", &mut sink, "t").await.unwrap();
    assert_eq!(issued.credential.generation, 2, "delivered, not reissued");
    assert_eq!(count(&app, "SELECT COUNT(*) FROM credentials").await, 2);
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM credentials WHERE sealed_key IS NOT NULL"
        )
        .await,
        0
    );
    let (_, _, cert, key) = kubeconfig_parts(&out);
    assert_eq!(
        rotator::pki::parse_cert_pem(&cert, "k").unwrap().serial,
        issued.credential.serial
    );
    let key = rotator::pki::PrivateKey::from_pem(&key, "k").unwrap();
    assert_eq!(
        key.spki_der(),
        rotator::pki::parse_cert_pem(&cert, "k").unwrap().spki_der,
        "the key that was sealed"
    );
    // Signed twice (alice's first, the rotation), not once per delivery attempt.
    assert_signed_at(dir.path(), signer.as_ref(), 2);
    assert!(
        rotator::store::audit::verify(&app.store)
            .await
            .unwrap()
            .first_break
            .is_none()
    );
}
}

signing_variants! {
#[tokio::test]
async fn the_sealing_key_file_is_private_and_revocation_wipes_a_sealed_key(signing: Signing) {
    let dir = tempfile::tempdir().unwrap();
    let signer = signing.start(dir.path());
    let (app, mut sink) = alice_with_a_flaky_sink(dir.path(), 1, signer.as_ref()).await;
    app.issuer()
        .rotate("alice", &mut sink, "t")
        .await
        .unwrap_err();
    assert_eq!(mode(&dir.path().join("rotator-data/seal.key")), 0o600);
    // Revoking the user wipes the sealed key with the pending credential.
    rotator::flows::revoke::revoke(&app, "alice", None)
        .await
        .unwrap();
    assert_eq!(
        count(
            &app,
            "SELECT COUNT(*) FROM credentials WHERE sealed_key IS NOT NULL"
        )
        .await,
        0
    );
    assert_signed_at(dir.path(), signer.as_ref(), 2);
}
}

/// `.rotator-*.tmp` files under `dir`, recursively.
fn temp_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().unwrap().is_dir() {
            found.extend(temp_files(&p));
        } else if name.starts_with(".rotator-") && name.ends_with(".tmp") {
            found.push(p);
        }
    }
    found
}

signing_variants! {
// SQLite only: a third run on PostgreSQL took 32 s (100 processes, each
// connecting), and the temporary files it looks for do not depend on the engine.
sqlite_only:
#[test]
fn add_user_and_rotate_sigkilled_at_random_points_leave_no_temporary_file_with_a_key(signing: Signing) {
    use std::time::{Duration, Instant};
    let s = Scratch::signing(signing);
    ok(&s.rotator(&["init"]));
    std::fs::create_dir_all(s.path("out")).unwrap();
    ok(&s.rotator(&[
        "add-user",
        "alice",
        "-n",
        "team-a",
        "--role",
        "view",
        "--out",
        "out/alice.kubeconfig",
    ]));
    let started = Instant::now();
    ok(&s.rotator(&["rotate", "alice", "--out", "out/alice.kubeconfig"]));
    let took = started.elapsed();
    // A small deterministic generator: the kill points differ from round to round.
    let mut seed: u64 = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Kill points drawn over the fastest whole run seen so far (a slow first
    // run on a loaded machine would leave most rounds finishing before their
    // kill); rounds go on until 50 were killed mid-run.
    let mut fastest = took;
    let (want_killed, max_rounds) = (50, 400);
    let (mut rounds, mut killed) = (0, 0);
    while killed < want_killed && rounds < max_rounds {
        let round = rounds;
        rounds += 1;
        let name = format!("k{round}");
        let out = format!("out/{name}.kubeconfig");
        let args: Vec<&str> = if round % 2 == 0 {
            vec![
                "add-user", &name, "-n", "team-a", "--role", "view", "--out", &out,
            ]
        } else {
            vec!["rotate", "alice", "--out", "out/alice.kubeconfig"]
        };
        let started = Instant::now();
        let mut child = s
            .command()
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let at = Duration::from_micros(next() % (fastest.as_micros() as u64 + 1));
        std::thread::sleep(at);
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill(); // SIGKILL
            killed += 1;
            let _ = child.wait();
        } else {
            fastest = fastest.min(started.elapsed());
        }
    }
    let left_by_kills = temp_files(s.dir.path()).len();
    // The next run writing into each directory cleans up after the killed ones.
    ok(&s.rotator(&["rotate", "alice", "--out", "out/alice.kubeconfig"]));
    ok(&s.rotator(&["add-user", "final", "-n", "team-a", "--role", "view"]));
    let left = temp_files(s.dir.path());
    eprintln!(
        "{rounds} rounds, {killed} killed mid-run (a run takes {took:?}); temporary files after the kills: {left_by_kills}, after the next runs: {}",
        left.len()
    );
    assert!(
        killed >= want_killed,
        "only {killed} of {rounds} runs were killed mid-run"
    );
    assert!(left.is_empty(), "temporary files survived: {left:?}");
    if let Some(p) = &s.signer {
        // Every run signed through the signer: the four that ran to the end at least.
        assert!(p.signed_serials().len() >= 4);
        assert!(!s.path("rotator-data/ca/ca.key").exists());
    }
}
}
