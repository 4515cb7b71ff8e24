//! A revoke always wins: `revoke` and `remove-user` run at every step of an
//! issuance in flight (rotate through the CLI's path, and a renewal through
//! the user API's path), in another App over the same data directory (as
//! another process would), over both signers; and randomized concurrent
//! rounds. After a revoke that succeeded, nobody may hold a current
//! credential, no binding may name a generation group of theirs, and no CSR
//! object may be left.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rotator::app::App;
use rotator::delivery::FileSink;
use rotator::flows::issue::{ClientRequest, FaultPoint, Faults, IssueError, NoFaults};
use rotator::pki::{self, KeyType, PrivateKey};
use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Revoke,
    Remove,
}

/// At `point`, runs the action through `other` (another App on the same data
/// directory), waits for it to finish, then lets the issuance go on.
struct RevokeAt {
    point: FaultPoint,
    action: Action,
    user: String,
    other: Arc<App>,
    armed: AtomicBool,
    outcome: Mutex<Option<Result<usize, String>>>,
}

impl Faults for RevokeAt {
    fn hit(&self, p: FaultPoint) -> Result<(), IssueError> {
        if p != self.point || !self.armed.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let r = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                match self.action {
                    Action::Revoke => rotator::flows::revoke::revoke(&self.other, &self.user, None)
                        .await
                        .map(|v| v.len())
                        .map_err(|e| e.to_string()),
                    Action::Remove => rotator::flows::revoke::remove_user(&self.other, &self.user)
                        .await
                        .map(|v| v.len())
                        .map_err(|e| e.to_string()),
                }
            })
        });
        *self.outcome.lock().unwrap() = Some(r);
        Ok(())
    }
}

const ALL_POINTS: [FaultPoint; 7] = [
    FaultPoint::AfterPlan,
    FaultPoint::CsrSubmitted,
    FaultPoint::Approved,
    FaultPoint::AfterSign,
    FaultPoint::BeforeStore,
    FaultPoint::AfterStore,
    FaultPoint::AfterDeliver,
];

/// What must hold for `user` after a revoke or remove-user that succeeded.
/// Returns the problems found (empty: none).
async fn problems(app: &App, user: &str, kx: Option<&Kx>) -> Vec<String> {
    let mut bad = Vec::new();
    // One planned before the revoke must have lost. (None planned after it
    // succeeds either: the revoke disables the user; tests/it/sticky.rs.)
    let revoked_at = "(SELECT MIN(seq) FROM audit_events WHERE subject = ?1
                        AND action IN ('credential.revoke', 'user.remove', 'issuance.cancel'))";
    let planned_before = format!(
        "EXISTS (SELECT 1 FROM audit_events p WHERE p.subject = ?1 AND p.action = 'issuance.plan'
                 AND json_extract(p.detail, '$.credential') = c.id AND p.seq < {revoked_at})"
    );
    let q = |what: &str| {
        format!(
            "SELECT COUNT(*) FROM credentials c WHERE c.user_name = ?1 AND c.state = '{what}' AND {planned_before}"
        )
    };
    for state in ["current", "pending"] {
        let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(q(state)))
            .bind(user)
            .fetch_one(app.store.pool())
            .await
            .unwrap();
        if n != 0 {
            bad.push(format!(
                "{user}: {n} {state} credential(s) from an issuance in flight at the revoke"
            ));
        }
    }
    // Only constant fragments are joined here (the user is a bound parameter).
    let (after,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM audit_events a JOIN credentials c ON c.id = json_extract(a.detail, '$.credential')
          WHERE a.subject = ?1 AND a.action = 'credential.activate' AND a.seq > {revoked_at} AND {planned_before}"
    )))
    .bind(user)
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    if after != 0 {
        bad.push(format!(
            "{user}: an issuance in flight at the revoke was activated after it"
        ));
    }
    // Generation groups the cluster may still name: those of credentials that
    // are current now (a rotation that began after the revoke).
    let (live,): (String,) = sqlx::query_as(
        "SELECT COALESCE(json_group_array(generation_group), '[]') FROM credentials
          WHERE user_name = ? AND state IN ('current', 'pending')",
    )
    .bind(user)
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    let live: Vec<String> = serde_json::from_str(&live).unwrap();
    if let Some(kx) = kx {
        // The cluster, through kubectl: no binding names one of the user's groups.
        let out = kx
            .admin_kubectl(&[
                "get",
                "rolebindings,clusterrolebindings",
                "-A",
                "-o",
                "json",
            ])
            .await;
        let v: serde_json::Value = serde_json::from_slice(&ok_bytes(&out)).unwrap();
        let prefix = format!("rotator:{user}:");
        for b in v["items"].as_array().unwrap() {
            for s in b["subjects"].as_array().into_iter().flatten() {
                let name = s["name"].as_str().unwrap_or_default();
                if name.starts_with(&prefix) && !live.iter().any(|l| l == name) {
                    bad.push(format!(
                        "{user}: binding {}/{} still names {name}",
                        b["metadata"]["namespace"].as_str().unwrap_or("cluster"),
                        b["metadata"]["name"].as_str().unwrap_or_default()
                    ));
                }
            }
        }
        let out = kx.admin_kubectl(&["get", "csr", "-o", "json"]).await;
        let v: serde_json::Value = serde_json::from_slice(&ok_bytes(&out)).unwrap();
        for c in v["items"].as_array().unwrap() {
            if c["metadata"]["annotations"]["rotator.io/user"].as_str() == Some(user) {
                bad.push(format!(
                    "{user}: CSR {} left in the cluster",
                    c["metadata"]["name"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    bad
}

/// Whether the cluster has signed the CSR object of `user`'s generation-2
/// attempt (the step after `approved`, which the journal does not record).
async fn certificate_issued(kx: &Kx, app: &App, user: &str) -> bool {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT csr_name FROM issuances WHERE user_name = $1 AND generation = 2")
            .bind(user)
            .fetch_optional(app.store.pool())
            .await
            .unwrap();
    let Some((Some(name),)) = row else {
        return false;
    };
    let o = kx
        .admin_kubectl(&["get", "csr", &name, "-o", "jsonpath={.status.certificate}"])
        .await;
    o.status.success() && !o.stdout.is_empty()
}

fn ok_bytes(o: &std::process::Output) -> Vec<u8> {
    ok(o);
    o.stdout.clone()
}

/// A data directory with its App factory: local-ca in a temp dir, or the
/// kubernetes signer against a fresh test cluster.
pub enum Env {
    Local(tempfile::TempDir),
    Kube(Box<Kx>),
}

impl Env {
    pub async fn new(kubernetes: bool) -> Self {
        if kubernetes {
            Env::Kube(Box::new(Kx::new(Options::default(), "").await))
        } else {
            Env::Local(tempfile::tempdir().unwrap())
        }
    }

    pub async fn app(&self, faults: Arc<dyn Faults>) -> App {
        match self {
            Env::Local(d) => app(d.path(), "", faults).await,
            Env::Kube(kx) => kx.app_with(faults).await,
        }
    }

    pub fn kx(&self) -> Option<&Kx> {
        match self {
            Env::Kube(kx) => Some(kx),
            Env::Local(_) => None,
        }
    }

    pub fn out(&self, name: &str) -> std::path::PathBuf {
        match self {
            Env::Local(d) => d.path().join(name),
            Env::Kube(kx) => kx.s.path(name),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            Env::Local(_) => "local-ca",
            Env::Kube(_) => "kubernetes",
        }
    }
}

/// A renewal as the user API makes it: a CSR with the next generation's subject.
async fn client_request(app: &App, user: &str) -> (PrivateKey, pki::CsrInfo, i64) {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let generation = {
        let mut conn = app.store.conn().await.unwrap();
        rotator::store::issuances::next_generation(&mut conn, user)
            .await
            .unwrap()
    };
    let orgs = vec![
        "dev".to_string(),
        rotator::policy::generation_group(user, generation, &key.spki_der()),
    ];
    let der = pki::build_csr(&key, &pki::subject_name(user, &orgs).unwrap()).unwrap();
    (key, pki::parse_csr(&der).unwrap(), generation)
}

/// Every step of a rotation and of an API renewal, against revoke and remove-user.
async fn every_interleaving(kubernetes: bool) {
    let env = Env::new(kubernetes).await;
    let other = Arc::new(env.app(Arc::new(NoFaults)).await);
    let mut rounds = 0;
    let mut n = 0;
    let mut bad = Vec::new();
    for path in ["rotate", "api-renew", "add-user"] {
        for action in [Action::Revoke, Action::Remove] {
            for point in ALL_POINTS {
                n += 1;
                let user = format!(
                    "u{}-{}-{}",
                    n,
                    if action == Action::Revoke { "rv" } else { "rm" },
                    path.len()
                );
                let first = env.out(&format!("{user}.kubeconfig"));
                // The add-user path races the revoke against the user's very first issuance.
                if path != "add-user" {
                    other
                        .issuer()
                        .add_user(
                            spec(&user),
                            &mut FileSink {
                                path: first.clone(),
                            },
                            "t",
                        )
                        .await
                        .unwrap();
                }
                let faults = Arc::new(RevokeAt {
                    point,
                    action,
                    user: user.clone(),
                    other: other.clone(),
                    armed: AtomicBool::new(true),
                    outcome: Mutex::new(None),
                });
                let app = Arc::new(env.app(faults.clone()).await);
                let next = env.out(&format!("{user}.next.kubeconfig"));
                let (a, u, n) = (app.clone(), user.clone(), next.clone());
                let result: Result<String, IssueError> = tokio::spawn(async move {
                    if path == "rotate" {
                        a.issuer()
                            .rotate(&u, &mut FileSink { path: n }, "t")
                            .await
                            .map(|i| i.credential.serial)
                    } else if path == "add-user" {
                        a.issuer()
                            .add_user(spec(&u), &mut FileSink { path: n }, "t")
                            .await
                            .map(|i| i.credential.serial)
                    } else {
                        let current = rotator::store::credentials::list_for_user(&a.store, &u)
                            .await
                            .unwrap()
                            .into_iter()
                            .find(|c| c.state == "current")
                            .unwrap();
                        let (_key, csr, generation) = client_request(&a, &u).await;
                        a.issuer()
                            .issue_for_client(ClientRequest {
                                user: &u,
                                csr: &csr,
                                generation,
                                renewed_from: Some(&current.id),
                                token: None,
                                actor: "api:test",
                                delivered_to: "api 127.0.0.1:1",
                            })
                            .await
                            .map(|i| i.credential.serial)
                    }
                })
                .await
                .unwrap();
                let outcome = faults.outcome.lock().unwrap().clone();
                let fired = outcome.is_some();
                let label = format!("{} {path} {action:?} at {point:?}", env.label());
                // Signers without a CSR object never reach the CSR steps; AfterDeliver
                // is the rotate path's alone.
                let reachable = match point {
                    FaultPoint::CsrSubmitted | FaultPoint::Approved => kubernetes,
                    FaultPoint::AfterDeliver => path != "api-renew",
                    _ => true,
                };
                assert_eq!(fired, reachable, "{label}: the fault point fired: {fired}");
                if !fired {
                    continue;
                }
                rounds += 1;
                if let Some(Err(e)) = &outcome {
                    bad.push(format!("{label}: the revoke itself failed: {e}"));
                    continue;
                }
                match &result {
                    Ok(serial) => bad.push(format!(
                        "{label}: the issuance succeeded after the revoke (serial {serial})"
                    )),
                    Err(e) => {
                        let msg = e.to_string();
                        // The issuing side says what happened, and whether a file was written.
                        if point == FaultPoint::AfterDeliver {
                            if !(msg.contains("already been written") && msg.contains("revoked")) {
                                bad.push(format!("{label}: unclear error: {msg}"));
                            }
                        } else if next.exists() {
                            bad.push(format!("{label}: a kubeconfig was written: {msg}"));
                        }
                    }
                }
                bad.extend(
                    problems(&app, &user, env.kx())
                        .await
                        .into_iter()
                        .map(|p| format!("{label}: {p}")),
                );
                if point == FaultPoint::AfterDeliver
                    && let Some(kx) = env.kx()
                {
                    // The kubeconfig that was written grants nothing.
                    let name = next.file_name().unwrap().to_str().unwrap();
                    if kx.can_list_pods(name, "team-a").await {
                        bad.push(format!("{label}: the written kubeconfig still lists pods"));
                    }
                }
                app.store.close().await;
            }
        }
    }
    println!(
        "{}: {rounds} interleavings of revoke/remove-user with an issuance step; problems: {}",
        env.label(),
        bad.len()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(rounds, if kubernetes { 40 } else { 28 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_remove_user_win_at_every_step_local_ca() {
    every_interleaving(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_remove_user_win_at_every_step_kubernetes() {
    every_interleaving(true).await;
}

/// Rotations and revokes started together, with random offsets, many times:
/// after each revoke that succeeded, count users who still hold a current
/// credential or a binding.
async fn randomized(kubernetes: bool, rounds: usize) {
    let env = Env::new(kubernetes).await;
    let a = Arc::new(env.app(Arc::new(NoFaults)).await);
    let b = Arc::new(env.app(Arc::new(NoFaults)).await);
    let mut bad = Vec::new();
    let (mut won, mut in_flight) = (0, 0);
    for round in 0..rounds {
        let user = format!("r{round}");
        let started = std::time::Instant::now();
        a.issuer()
            .add_user(
                spec(&user),
                &mut FileSink {
                    path: env.out(&format!("{user}.kubeconfig")),
                },
                "t",
            )
            .await
            .unwrap();
        // The revoke lands anywhere from before the rotation starts to just after it ends.
        let span_us = (started.elapsed().as_micros() as u64 * 6 / 5).max(1);
        let delay_us = u64::from_le_bytes(pki::random_bytes::<8>()) % span_us;
        let remove = round % 3 == 2;
        let (a2, u2, out) = (
            a.clone(),
            user.clone(),
            env.out(&format!("{user}.2.kubeconfig")),
        );
        let rotating = tokio::spawn(async move {
            a2.issuer()
                .rotate(&u2, &mut FileSink { path: out }, "t")
                .await
                .is_err()
        });
        let (b2, u3) = (b.clone(), user.clone());
        let revoking = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_micros(delay_us)).await;
            if remove {
                rotator::flows::revoke::remove_user(&b2, &u3)
                    .await
                    .map(|_| ())
            } else {
                rotator::flows::revoke::revoke(&b2, &u3, None)
                    .await
                    .map(|_| ())
            }
        });
        let revoked = revoking.await.unwrap();
        if rotating.await.unwrap() {
            in_flight += 1; // the revoke ran while the rotation was under way, and won
        }
        if revoked.is_ok() {
            won += 1;
            bad.extend(problems(&a, &user, env.kx()).await);
        }
    }
    println!(
        "{}: {rounds} randomized rounds of rotate || revoke/remove-user; {won} revokes succeeded, {in_flight} of them while the rotation was in flight; users left with access: {}",
        env.label(),
        bad.len()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(won, rounds, "every revoke must succeed");
    // Not vacuous: a good share of the revokes hit a rotation under way.
    assert!(
        in_flight * 5 >= rounds,
        "only {in_flight} of {rounds} rounds raced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotate_and_revoke_local_ca_leave_nobody_with_access() {
    randomized(false, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotate_and_revoke_kubernetes_leave_nobody_with_access() {
    randomized(true, 100).await;
}

/// Whether `token` would still be accepted by the user API's check.
async fn token_usable(app: &App, token: &str) -> Result<(), String> {
    let presented = rotator::flows::enroll::parse(token).unwrap();
    match rotator::flows::enroll::check(app, &presented, None)
        .await
        .unwrap()
    {
        Ok(_) => Ok(()),
        Err(r) => Err(format!("{r:?}")),
    }
}

#[tokio::test]
async fn revoke_and_remove_user_revoke_unused_enrollment_tokens_and_a_readded_user_inherits_none() {
    let s = Scratch::new();
    let token = |user: &str, ns: &str, role: &str| {
        let out = ok(&s.rotator(&[
            "add-user", user, "-n", ns, "--role", role, "--enroll", "--output", "json",
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let t1 = token("tk1", "team-a", "view");
    ok(&s.rotator(&["revoke", "tk1"]));
    let dave_old = token("dave", "team-a", "view");
    ok(&s.rotator(&["remove-user", "dave"]));
    let dave_new = token("dave", "team-b", "edit");

    let dir = s.dir.path();
    let settings = rotator::config::load_with(
        None,
        &[(
            "ROTATOR_DATA_DIR".into(),
            dir.join("rotator-data").display().to_string(),
        )],
        &Default::default(),
    )
    .unwrap();
    let app = App::open(
        settings,
        Arc::new(rotator::support::clock::SystemClock),
        Arc::new(NoFaults),
        "test".into(),
    )
    .await
    .unwrap()
    .0;
    assert_eq!(
        token_usable(&app, &t1).await,
        Err("Revoked".into()),
        "revoke took tk1's token"
    );
    assert_eq!(
        token_usable(&app, &dave_old).await,
        Err("Revoked".into()),
        "remove-user took dave's token"
    );
    assert_eq!(
        token_usable(&app, &dave_new).await,
        Ok(()),
        "the new record's token works"
    );
    // Even if the old token's row were put back to active, it belongs to the old record.
    sqlx::query("UPDATE enrollment_tokens SET state = 'active' WHERE id = ?")
        .bind(rotator::flows::enroll::parse(&dave_old).unwrap().id)
        .execute(app.store.pool())
        .await
        .unwrap();
    let mut conn = app.store.conn().await.unwrap();
    let claimed = rotator::store::enrollments::claim(
        &mut conn,
        rotator::flows::enroll::parse(&dave_old).unwrap().id,
        "0000",
        rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock),
    )
    .await
    .unwrap();
    assert!(
        !claimed,
        "a token of dave's earlier record can never be claimed"
    );
    let log = ok(&s.rotator(&["audit", "log", "--output", "json"]));
    assert!(
        log.contains("issuance.cancel") && log.contains("enrollment_tokens_revoked"),
        "{log}"
    );
}

#[tokio::test]
async fn an_emptied_or_deleted_database_is_refused_and_generation_groups_never_repeat() {
    let s = Scratch::new();
    ok(&s.rotator(&["add-user", "u1", "-n", "team-a", "--role", "view"]));
    let db = s.path("rotator-data/rotator.db");
    let marker = std::fs::read_to_string(s.path("rotator-data/instance")).unwrap();
    assert!(marker.contains("instance "), "{marker}");

    // Emptied: refused with exit 7 and a fix, and nothing is written.
    std::fs::write(&db, b"").unwrap();
    for args in [
        &["add-user", "u1", "-n", "team-a", "--role", "view"][..],
        &["list-users"][..],
        &["doctor"][..],
    ] {
        let err = fails_with(&s.rotator(args), 7);
        assert!(
            err.contains("is empty") && err.contains("init --new-database"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::metadata(&db).unwrap().len(),
        0,
        "nothing was written"
    );
    // Deleted: the same.
    std::fs::remove_file(&db).unwrap();
    let err = fails_with(&s.rotator(&["list-users"]), 7);
    assert!(err.contains("is missing"), "{err}");
    assert!(!db.exists());

    // On purpose: a new database, a new instance.
    ok(&s.rotator(&["init", "--new-database"]));
    let marker2 = std::fs::read_to_string(s.path("rotator-data/instance")).unwrap();
    assert_ne!(marker, marker2, "a new database is a new instance");
    ok(&s.rotator(&[
        "add-user",
        "u1",
        "-n",
        "team-a",
        "--role",
        "view",
        "--out",
        "again.kubeconfig",
    ]));

    // A database restored from an older backup counts generations again, but
    // the groups differ: an old certificate never matches a new binding.
    let group = |s: &Scratch| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&s.rotator(&["show", "u1", "--output", "json"]))).unwrap();
        v["credentials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["generation_group"].as_str().unwrap().to_string())
            .collect()
    };
    // A file-level backup taken while no rotator runs: the database and its WAL.
    let files = |dir: &std::path::Path| ["", "-wal"].map(|x| dir.join(format!("rotator.db{x}")));
    let (data, saved) = (s.path("rotator-data"), s.path("backup"));
    std::fs::create_dir(&saved).unwrap();
    for (from, to) in files(&data).iter().zip(files(&saved).iter()) {
        if from.exists() {
            std::fs::copy(from, to).unwrap();
        }
    }
    ok(&s.rotator(&["rotate", "u1", "--out", "r1.kubeconfig"]));
    let before = group(&s);
    let _ = std::fs::remove_file(data.join("rotator.db-shm"));
    for (to, from) in files(&data).iter().zip(files(&saved).iter()) {
        let _ = std::fs::remove_file(to);
        if from.exists() {
            std::fs::copy(from, to).unwrap();
        }
    }
    ok(&s.rotator(&["rotate", "u1", "--out", "r2.kubeconfig"]));
    let after = group(&s);
    assert_eq!(before.len(), 2);
    assert_eq!(after.len(), 2);
    assert_eq!(before[0], after[0], "generation 1 is the same credential");
    assert!(before[1].starts_with("rotator:u1:2.") && after[1].starts_with("rotator:u1:2."));
    assert_ne!(
        before[1], after[1],
        "generation 2 issued twice names two different groups"
    );
}

/// Through the CLI, in two real processes: `rotator rotate` stalls at a step
/// (ROTATOR_FAULT=<step>:sleep-MS) while `rotator revoke` or `remove-user`
/// runs; the revoke wins and the rotating process says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_cli_a_revoke_wins_over_a_rotation_in_another_process() {
    let kx = Kx::new(Options::default(), "").await;
    let app = kx.app_with(Arc::new(NoFaults)).await;
    let rounds = [
        ("after-plan", "revoke"),
        ("csr-submitted", "revoke"),
        ("approved", "revoke"),
        ("after-sign", "revoke"),
        ("before-store", "revoke"),
        ("after-store", "revoke"),
        ("after-deliver", "revoke"),
        ("after-plan", "remove-user"),
        ("after-store", "remove-user"),
        ("after-deliver", "remove-user"),
    ];
    let mut bad = Vec::new();
    for (i, (point, action)) in rounds.iter().enumerate() {
        let user = format!("cli{i}");
        let label = format!("{action} during `rotate` at {point}");
        ok(&kx
            .rotator_async(
                &[
                    "add-user", &user, "--group", "dev", "-n", "team-a", "--role", "view",
                ],
                &[],
            )
            .await);
        let fault = format!("{point}:sleep-3000");
        let out = format!("{user}.next.kubeconfig");
        let (rotate_args, rotate_env) = (
            ["rotate", user.as_str(), "--out", out.as_str()],
            [("ROTATOR_FAULT", fault.as_str())],
        );
        let rotating = kx.rotator_async(&rotate_args, &rotate_env);
        let revoking = async {
            // Wait until the rotation has reached its step (it then stalls there
            // for 3 s), so the revoke lands exactly at that step.
            let reached = |step: &str| {
                match step {
                    "after-plan" => "SELECT COUNT(*) >= 2 FROM issuances WHERE user_name = ?1".to_string(),
                    "csr-submitted" | "approved" => format!(
                        "SELECT COUNT(*) >= 1 FROM issuances WHERE user_name = ?1 AND generation = 2 AND step = '{}'",
                        step.replace('-', "_")
                    ),
                    // `issued` is not journaled on its own: the signer's last
                    // journaled step, then the certificate in the CSR object.
                    "after-sign" | "before-store" => "SELECT COUNT(*) >= 1 FROM issuances WHERE user_name = ?1 AND generation = 2 AND step = 'approved'".to_string(),
                    _ => "SELECT COUNT(*) >= 2 FROM credentials WHERE user_name = ?1".to_string(),
            }
            };
            let q = reached(point);
            for _ in 0..400 {
                // An integer: through sqlx's Any driver SQLite has no booleans.
                let (done,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(q.clone()))
                    .bind(&user)
                    .fetch_one(app.store.pool())
                    .await
                    .unwrap();
                let delivered = *point != "after-deliver" || kx.s.path(&out).exists();
                let signed = !matches!(*point, "after-sign" | "before-store")
                    || (done != 0 && certificate_issued(&kx, &app, &user).await);
                if done != 0 && delivered && signed {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            kx.rotator_async(&[action, &user], &[]).await
        };
        let (r, v) = tokio::join!(rotating, revoking);
        if !v.status.success() {
            bad.push(format!(
                "{label}: the revoke failed: {}",
                String::from_utf8_lossy(&v.stderr)
            ));
            continue;
        }
        let err = String::from_utf8_lossy(&r.stderr).into_owned();
        if r.status.success() {
            bad.push(format!("{label}: rotate exited 0 after the revoke"));
        } else if r.status.code() != Some(6) || !err.contains("not made current") {
            bad.push(format!(
                "{label}: rotate's error is unclear ({:?}): {err}",
                r.status.code()
            ));
        } else if *point == "after-deliver" {
            if !err.contains("already been written") {
                bad.push(format!(
                    "{label}: rotate does not say the file was written: {err}"
                ));
            }
        } else if !err.contains("No kubeconfig was written") || kx.s.path(&out).exists() {
            bad.push(format!(
                "{label}: a kubeconfig was written, or rotate does not say: {err}"
            ));
        }
        bad.extend(
            problems(&app, &user, Some(&kx))
                .await
                .into_iter()
                .map(|p| format!("{label}: {p}")),
        );
    }
    println!(
        "CLI: {} rounds of revoke/remove-user against a rotation stalled at a step; problems: {}",
        rounds.len(),
        bad.len()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

crate::engines! {
/// Authorized before the revoke, planned after it: an API renewal (whose
/// client certificate was current when it was checked) and a daemon rotation
/// (whose pass read the credential before the revoke) must lose too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_or_a_pass_decided_before_a_revoke_is_refused_when_it_plans() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path(), "", Arc::new(NoFaults)).await;
    for (user, via_api) in [("ren", true), ("pas", false)] {
        app.issuer()
            .add_user(
                spec(user),
                &mut FileSink {
                    path: dir.path().join(format!("{user}.kubeconfig")),
                },
                "t",
            )
            .await
            .unwrap();
        let current = rotator::store::credentials::list_for_user(&app.store, user)
            .await
            .unwrap()
            .remove(0);
        // The API checked the certificate (or the pass chose the credential) here.
        rotator::flows::revoke::revoke(&app, user, None).await.unwrap();
        let out = dir.path().join(format!("{user}.next.kubeconfig"));
        let e = if via_api {
            let (_key, csr, generation) = client_request(&app, user).await;
            app.issuer()
                .issue_for_client(ClientRequest {
                    user,
                    csr: &csr,
                    generation,
                    renewed_from: Some(&current.id),
                    token: None,
                    actor: "api:test",
                    delivered_to: "api 127.0.0.1:1",
                })
                .await
                .unwrap_err()
        } else {
            app.issuer()
                .rotate_replacing(
                    user,
                    Some(&current.id),
                    &mut FileSink { path: out.clone() },
                    "daemon",
                )
                .await
                .unwrap_err()
        };
        assert!(
            matches!(e, IssueError::Cancelled { .. })
                && e.to_string().contains("it replaces is revoked"),
            "{user}: {e}"
        );
        assert!(!out.exists());
        let creds = rotator::store::credentials::list_for_user(&app.store, user)
            .await
            .unwrap();
        assert_eq!(creds.len(), 1, "{user}: nothing was planned or stored");
        assert_eq!(creds[0].state, "revoked");
        let mut conn = app.store.conn().await.unwrap();
        let planned = rotator::store::issuances::for_user(&mut conn, user)
            .await
            .unwrap();
        assert_eq!(planned.len(), 1, "{user}: no generation was burnt");
    }
}
}
