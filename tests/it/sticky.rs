//! A revoke of a user sticks (#22 item 3): rotations launched just before and
//! just after `revoke USER` leave the user with no current credential, no
//! binding and no allowing decision; later rotations, renewals, passes and
//! bulk reruns are refused; only `rotate --reinstate` issues again.
use std::sync::Arc;

use rotator::app::App;
use rotator::daemon::authz::decide::{Rules, decide};
use rotator::daemon::authz::review::ReviewSpec;
use rotator::daemon::authz::snapshot::Shared;
use rotator::delivery::FileSink;
use rotator::flows::issue::{IssueError, NoFaults};
use rotator::pki;

use crate::common::*;
use crate::revocation::Env;

/// What must hold for a revoked `user`; the problems found (empty: none).
async fn access_left(app: &App, user: &str, env: &Env) -> Vec<String> {
    let mut bad = Vec::new();
    let creds = rotator::store::credentials::list_for_user(&app.store, user)
        .await
        .unwrap();
    for c in creds
        .iter()
        .filter(|c| matches!(c.state.as_str(), "current" | "pending"))
    {
        bad.push(format!(
            "{user}: credential generation {} is {}",
            c.generation, c.state
        ));
    }
    let u = rotator::store::users::find(&app.store, user)
        .await
        .unwrap()
        .unwrap();
    if u.state != "disabled" || u.revoked.is_none() {
        bad.push(format!("{user}: state {} after the revoke", u.state));
    }
    // The authorization decision, from the database as the webhook loads it.
    let shared = Shared::default();
    shared.refresh(&app.store).await.unwrap();
    let rules = Rules {
        grace_seconds: 300,
        deny_unknown_users: false,
    };
    for c in &creds {
        let review = crate::authz::review(user, &[c.group()], Some(&c.fingerprint));
        let spec: ReviewSpec = serde_json::from_value(review["spec"].clone()).unwrap();
        if !decide(&shared.read(), &spec, app.clock.now(), rules).denied() {
            bad.push(format!(
                "{user}: the webhook would not deny generation {} ({})",
                c.generation, c.state
            ));
        }
    }
    if let Some(kx) = env.kx() {
        let out = kx
            .admin_kubectl(&[
                "get",
                "rolebindings,clusterrolebindings",
                "-A",
                "-o",
                "json",
            ])
            .await;
        ok(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let prefix = format!("rotator:{user}:");
        for b in v["items"].as_array().unwrap() {
            for s in b["subjects"].as_array().into_iter().flatten() {
                let name = s["name"].as_str().unwrap_or_default();
                if name.starts_with(&prefix) {
                    bad.push(format!(
                        "{user}: binding {} still names {name}",
                        b["metadata"]["name"].as_str().unwrap_or_default()
                    ));
                }
            }
        }
    }
    bad
}

/// 50 rounds: a rotation launched just before the revoke (the revoke lands
/// anywhere during it) or just after it (planned once the revoke committed).
async fn race(kubernetes: bool) {
    let env = Env::new(kubernetes).await;
    let a = Arc::new(env.app(Arc::new(NoFaults)).await);
    let b = Arc::new(env.app(Arc::new(NoFaults)).await);
    let rounds = 50;
    let (mut bad, mut refused_at_plan, mut ended_in_flight) = (Vec::new(), 0, 0);
    for round in 0..rounds {
        let user = format!("s{round}");
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
        let span_us = (started.elapsed().as_micros() as u64).max(1);
        let delay = |span: u64| {
            std::time::Duration::from_micros(
                u64::from_le_bytes(pki::random_bytes::<8>()) % span.max(1),
            )
        };
        // Even rounds: the rotation first, the revoke within its run; odd
        // rounds: the revoke first, the rotation launched just after it.
        let (rotate_after, revoke_after) = if round % 2 == 0 {
            (std::time::Duration::ZERO, delay(span_us))
        } else {
            (delay(span_us / 10), std::time::Duration::ZERO)
        };
        let (a2, u2, out) = (
            a.clone(),
            user.clone(),
            env.out(&format!("{user}.2.kubeconfig")),
        );
        let rotating = tokio::spawn(async move {
            tokio::time::sleep(rotate_after).await;
            a2.issuer()
                .rotate(&u2, &mut FileSink { path: out }, "t")
                .await
        });
        let (b2, u3) = (b.clone(), user.clone());
        let revoking = tokio::spawn(async move {
            tokio::time::sleep(revoke_after).await;
            rotator::flows::revoke::revoke(&b2, &u3, None).await
        });
        revoking.await.unwrap().unwrap();
        match rotating.await.unwrap() {
            Ok(_) => {} // done before the revoke: the revoke took it
            Err(IssueError::Revoked { .. }) => refused_at_plan += 1,
            Err(IssueError::Cancelled { .. }) => ended_in_flight += 1,
            Err(e) => panic!("{user}: unexpected rotation error: {e}"),
        }
        bad.extend(access_left(&a, &user, &env).await);
        // A rotation after the revoke: refused, with when and by whom.
        let later = a
            .issuer()
            .rotate(
                &user,
                &mut FileSink {
                    path: env.out(&format!("{user}.3.kubeconfig")),
                },
                "t",
            )
            .await;
        match later {
            Err(IssueError::Revoked { .. }) => {}
            Ok(i) => bad.push(format!(
                "{user}: a later rotation issued generation {}",
                i.credential.generation
            )),
            Err(e) => bad.push(format!("{user}: a later rotation failed otherwise: {e}")),
        }
    }
    println!(
        "{}: {rounds} rounds of rotate || revoke USER; refused when planning: {refused_at_plan}, ended in flight: {ended_in_flight}; users left with access: {}",
        env.label(),
        bad.len()
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // Not vacuous: both sides of the race were hit.
    assert!(
        refused_at_plan > 0 && refused_at_plan + ended_in_flight >= rounds / 4,
        "only {refused_at_plan} refused at planning, {ended_in_flight} ended in flight"
    );

    // The explicit re-issue works and gives a working credential.
    let out = env.out("s0.reinstated.kubeconfig");
    assert!(rotator::flows::revoke::reinstate(&a, "s0").await.unwrap());
    let issued = a
        .issuer()
        .rotate("s0", &mut FileSink { path: out.clone() }, "t")
        .await
        .unwrap();
    assert_eq!(issued.credential.state, "current");
    let u = rotator::store::users::find(&a.store, "s0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((u.state.as_str(), u.revoked), ("active", None));
    if let Some(kx) = env.kx() {
        assert!(kx.can_list_pods(out.to_str().unwrap(), "team-a").await);
    }
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM audit_events WHERE subject = 's0' AND action = 'user.reinstate'",
    )
    .fetch_one(a.store.pool())
    .await
    .unwrap();
    assert_eq!(n, 1, "the reinstatement is audited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_user_stays_revoked_through_racing_rotations_local_ca() {
    race(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_user_stays_revoked_through_racing_rotations_kubernetes() {
    race(true).await;
}

const LIVE: &str = "SELECT COUNT(*) FROM credentials WHERE user_name = 'alice' AND state IN ('current', 'pending')";

/// Through the CLI: what a revoked user looks like, and everything that would
/// issue to them refused (rotate, add-user, add-user --enroll, a bulk rerun),
/// until `rotate --reinstate`.
#[tokio::test]
async fn the_cli_shows_a_revoked_user_refuses_them_and_reinstates_only_on_purpose() {
    let s = Scratch::new();
    let add = ["add-user", "alice", "-n", "team-a", "--role", "view"];
    ok(&s.rotator(&add));
    ok(&s.rotator(&["add-user", "bob", "-n", "team-a", "--role", "view"]));
    let out = ok(&s.rotator(&["revoke", "alice"]));
    assert!(out.contains("rotate alice --reinstate"), "{out}");
    let show = ok(&s.rotator(&["show", "alice"]));
    assert!(
        show.contains("revoked ") && show.contains(" by ") && show.contains("--reinstate"),
        "{show}"
    );
    let list = ok(&s.rotator(&["list-users"]));
    let line = list.lines().find(|l| l.starts_with("alice")).unwrap();
    assert!(line.contains("revoked") && line.contains(" by "), "{list}");
    for args in [
        &["rotate", "alice"][..],
        &add[..],
        &[
            "add-user", "alice", "-n", "team-a", "--role", "view", "--enroll",
        ][..],
    ] {
        let err = fails_with(&s.rotator(args), 4);
        assert!(
            err.contains("was revoked at") && err.contains("--reinstate") && err.contains("fix:"),
            "{args:?}: {err}"
        );
    }
    // A bulk rerun of the onboarding file leaves her alone and says so.
    s.write("team.csv", "alice,team-a,view\nbob,team-a,view\n");
    let o = s.rotator(&["add-user", "--from", "team.csv", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["summary"]["revoked"], 1, "{v}");
    assert_eq!(v["summary"]["unchanged"], 1, "{v}");
    assert!(
        v["users"][0]["note"]
            .as_str()
            .unwrap()
            .contains("--reinstate"),
        "{v}"
    );
    // `--reinstate` is no option of a bulk run.
    fails_with(
        &s.rotator(&["add-user", "--from", "team.csv", "--reinstate"]),
        2,
    );
    assert_eq!(s.count(LIVE).await, 0, "nothing was issued to alice");
    assert_eq!(
        s.count(
            "SELECT COUNT(*) FROM audit_events WHERE subject = 'alice' AND action = 'user.revoke'"
        )
        .await,
        1
    );
    // The deliberate act: reinstated (audited) and issued at once.
    let o = s.rotator(&["rotate", "alice", "--reinstate"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("reinstated alice"));
    assert_eq!(s.count(LIVE).await, 1);
    assert_eq!(
        s.count("SELECT COUNT(*) FROM audit_events WHERE subject = 'alice' AND action = 'user.reinstate'")
            .await,
        1
    );
    let list = ok(&s.rotator(&["list-users"]));
    let line = list.lines().find(|l| l.starts_with("alice")).unwrap();
    assert!(line.contains("active"), "{list}");
}
