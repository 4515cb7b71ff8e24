//! The kubernetes signer's bindings under damage: a deleted namespace, a
//! stripped label, a generation group copied into someone else's binding, a
//! clashing binding, a role rotator may not bind, and other instances' CSRs.
//! Checked with kubectl, never with rotator's own view. Each on both engines.
use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;

async fn add(kx: &Kx, user: &str, namespaces: &[&str], role: &str) -> std::process::Output {
    let mut a = vec![
        "add-user", user, "--group", "dev", "--role", role, "--ttl", "1h",
    ];
    for ns in namespaces {
        a.extend_from_slice(&["--namespace", ns]);
    }
    kx.rotator_async(&a, &[]).await
}

/// The user's credentials as `show --output json` lists them: (serial, state, group).
fn credentials(kx: &Kx, user: &str) -> Vec<(String, String, String)> {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&kx.rotator(&["show", user, "--output", "json"]))).unwrap();
    v["credentials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["serial"].as_str().unwrap().to_string(),
                c["state"].as_str().unwrap().to_string(),
                c["generation_group"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

async fn subjects(kx: &Kx, ns: &str, name: &str) -> String {
    let o = kx
        .admin_kubectl(&[
            "get",
            "rolebinding",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.subjects[*].name}",
        ])
        .await;
    String::from_utf8_lossy(&o.stdout).into_owned()
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_namespace_blocks_neither_other_namespaces_nor_removals_and_costs_no_certificate()
{
    let kx = Kx::new(Options::default(), "").await;
    ok(&add(&kx, "nina", &["team-a", "team-b"], "view").await);
    ok(&kx
        .rotator_async(&["rotate", "nina", "--out", "nina2.kubeconfig"], &[])
        .await);
    let creds = credentials(&kx, "nina");
    let gen1 = creds[0].clone();
    assert!(
        kx.can_list_pods("nina.kubeconfig", "team-b").await,
        "inside the grace period"
    );

    // The first namespace goes away; revoking generation 1 must still reach team-b.
    ok(&kx.admin_kubectl(&["delete", "namespace", "team-a"]).await);
    let o = kx
        .rotator_async(&["revoke", "nina", "--serial", &gen1.0], &[])
        .await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "the missing namespace is reported");
    assert!(err.contains("team-a") && err.contains("fix:"), "{err}");
    let b = subjects(&kx, "team-b", "rotator:nina").await;
    assert!(
        !b.contains(&gen1.2),
        "team-b still names the revoked group: {b}"
    );
    assert!(
        !kx.can_list_pods("nina.kubeconfig", "team-b").await,
        "the revoked kubeconfig lost team-b"
    );
    assert!(kx.can_list_pods("nina2.kubeconfig", "team-b").await);

    // A rotation now fails before anything is signed: no generation burnt, no CSR.
    let before =
        kx.s.count("SELECT COUNT(*) FROM issuances WHERE user_name = 'nina'")
            .await;
    let o = kx
        .rotator_async(&["rotate", "nina", "--out", "nina3.kubeconfig"], &[])
        .await;
    let err = fails_with(&o, 6);
    assert!(err.contains("namespace \"team-a\" does not exist"), "{err}");
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM issuances WHERE user_name = 'nina'")
            .await,
        before,
        "no generation was planned"
    );
    assert_eq!(kx.rotator_objects().await.1, "", "no CSR object");
    assert!(!kx.s.path("nina3.kubeconfig").exists());
    // doctor names the user and the namespace.
    let o = kx.rotator_async(&["doctor"], &[]).await;
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(!o.status.success());
    assert!(
        report.contains("user bindings") && report.contains("nina") && report.contains("team-a"),
        "{report}"
    );
}

/// A namespace deleted under a user whose old generation must be taken away
/// (#22 item 11): every expire pass succeeds, the other namespaces and users
/// lose what they must, the binding is a finding (a gauge, one audited sync,
/// doctor) and is not retried into an ERROR on every pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_namespace_is_a_finding_and_every_expire_pass_succeeds() {
    use rotator::daemon::scheduler::{Job, run_job};
    let kx = Kx::new(Options::default(), "").await;
    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock));
    let app = kx.app(&clock).await;
    let mut nina = spec("nina");
    nina.namespaces = vec!["team-a".into(), "team-b".into()];
    let sink = |name: &str| rotator::delivery::FileSink {
        path: kx.s.path(&format!("{name}.kubeconfig")),
    };
    app.issuer().add_user(nina, &mut sink("nina"), "t").await.unwrap();
    let mut olga = spec("olga");
    olga.namespaces = vec!["team-b".into()];
    app.issuer().add_user(olga, &mut sink("olga"), "t").await.unwrap();
    clock.advance(60);
    for user in ["nina", "olga"] {
        app.issuer()
            .rotate(user, &mut sink(&format!("{user}2")), "t")
            .await
            .unwrap();
    }
    ok(&kx.admin_kubectl(&["delete", "namespace", "team-a"]).await);
    // Past the grace period: both users' generation 1 must go.
    clock.advance(11 * 60);
    for pass in 0..4 {
        let r = run_job(&app, Job::Expire).await;
        let r = r.unwrap_or_else(|e| panic!("expire pass {pass} failed: {e}"));
        let want = if pass == 0 { 2 } else { 0 };
        assert_eq!(r["access_removed_for_users"], want, "pass {pass}: {r}");
    }
    for user in ["nina", "olga"] {
        assert!(
            !kx.can_list_pods(&format!("{user}.kubeconfig"), "team-b").await,
            "{user}'s generation 1 lost team-b"
        );
        assert!(kx.can_list_pods(&format!("{user}2.kubeconfig"), "team-b").await);
    }
    let metrics = app
        .metrics
        .render(&rotator::support::metrics::Gauges::default())
        .unwrap();
    assert!(
        metrics.contains("rotator_bindings_namespace_missing 1\n"),
        "{metrics}"
    );
    // Recorded once, not once per pass.
    assert_eq!(
        kx.s.count(
            "SELECT COUNT(*) FROM audit_events WHERE subject = 'nina' AND action = 'rbac.sync' AND detail LIKE '%not_found%'"
        )
        .await,
        1
    );
    let o = kx.rotator_async(&["doctor"], &[]).await;
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        report.contains("user bindings") && report.contains("nina") && report.contains("team-a"),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripped_label_or_a_copied_group_does_not_stop_a_revocation() {
    let kx = Kx::new(Options::default(), "").await;
    ok(&add(&kx, "alice", &["team-a"], "view").await);
    let gen1 = credentials(&kx, "alice")[0].clone();
    // Someone strips rotator's label, and copies the generation group into a binding of their own.
    ok(&kx
        .admin_kubectl(&[
            "label",
            "rolebinding",
            "rotator:alice",
            "-n",
            "team-a",
            "app.kubernetes.io/managed-by-",
        ])
        .await);
    ok(&kx
        .admin_kubectl(&[
            "create",
            "rolebinding",
            "copied",
            "--clusterrole=view",
            &format!("--group={}", gen1.2),
            "--group=unrelated",
            "-n",
            "team-b",
        ])
        .await);
    assert!(kx.can_list_pods("alice.kubeconfig", "team-b").await);

    // A rotation still works (the binding is recognised by its instance annotation).
    ok(&kx
        .rotator_async(&["rotate", "alice", "--out", "alice2.kubeconfig"], &[])
        .await);
    let labels = ok(&kx
        .admin_kubectl(&[
            "get",
            "rolebinding",
            "rotator:alice",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.metadata.labels.app\\.kubernetes\\.io/managed-by}",
        ])
        .await);
    assert_eq!(labels.trim(), "rotator", "the label is put back");

    // Revoking generation 1 takes its group out of every binding, and says so.
    ok(&kx
        .rotator_async(&["revoke", "alice", "--serial", &gen1.0], &[])
        .await);
    assert!(
        !subjects(&kx, "team-a", "rotator:alice")
            .await
            .contains(&gen1.2)
    );
    let copied = subjects(&kx, "team-b", "copied").await;
    assert_eq!(
        copied.trim(),
        "unrelated",
        "only the revoked group was taken out"
    );
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-a").await);
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-b").await);
    assert!(kx.can_list_pods("alice2.kubeconfig", "team-a").await);
    let log = ok(&kx.rotator(&["audit", "log", "--user", "alice", "--output", "json"]));
    assert!(log.contains("team-b/copied"), "the sweep is audited: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_are_found_before_signing() {
    let kx = Kx::new(
        Options::default(),
        "[policy]\nallowed_roles = [\"view\", \"edit\", \"admin\", \"cluster-admin\"]\n",
    )
    .await;
    // A binding of that name that rotator did not make.
    ok(&kx
        .admin_kubectl(&[
            "create",
            "rolebinding",
            "rotator:dave",
            "--clusterrole=view",
            "--group=someone",
            "-n",
            "team-a",
        ])
        .await);
    let err = fails_with(&add(&kx, "dave", &["team-a"], "view").await, 6);
    assert!(
        err.contains("not made by rotator") && err.contains("fix:"),
        "{err}"
    );
    // A role rotator may not bind (the API server's escalation check): exit 4, the real fix.
    let err = fails_with(&add(&kx, "erin", &["team-b"], "cluster-admin").await, 4);
    assert!(
        err.contains("may not bind ClusterRole \"cluster-admin\"") && err.contains("bind"),
        "{err}"
    );
    for user in ["dave", "erin"] {
        let q = format!("SELECT COUNT(*) FROM issuances WHERE user_name = '{user}'");
        let n = kx.s.count(Box::leak(q.into_boxed_str())).await;
        assert_eq!(n, 0, "{user}: nothing was planned or signed");
        let q = format!("SELECT COUNT(*) FROM users WHERE name = '{user}'");
        assert_eq!(
            kx.s.count(Box::leak(q.into_boxed_str())).await,
            0,
            "{user}: no user left behind"
        );
    }
    assert_eq!(kx.rotator_objects().await.1, "", "no CSR object");
    assert!(!kx.s.path("dave.kubeconfig").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_touches_only_this_instances_csrs_and_finishes_what_an_outage_left() {
    let kx = Kx::new(Options::default(), "").await;
    ok(&add(&kx, "alice", &["team-a"], "view").await);
    // A CSR object of another rotator instance (another database) for the same user name.
    let key = rotator::pki::PrivateKey::generate(rotator::pki::KeyType::EcdsaP256).unwrap();
    let der = rotator::pki::build_csr(
        &key,
        &rotator::pki::subject_name("alice", &["dev".to_string()]).unwrap(),
    )
    .unwrap();
    let pem = rotator::pki::pem_encode("CERTIFICATE REQUEST", &der);
    use base64::Engine;
    let csr = serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": "rotator-otherinstance", "labels": {
            "app.kubernetes.io/managed-by": "rotator",
            "rotator.io/user-hash": rotator::cluster::user_hash("alice")},
            "annotations": {"rotator.io/user": "alice", "rotator.io/instance": "0123456789abcdef"}},
        "spec": {"request": base64::engine::general_purpose::STANDARD.encode(pem),
                 "signerName": "kubernetes.io/kube-apiserver-client", "usages": ["client auth"]}
    });
    let f = kx.s.write("other.json", &csr.to_string());
    ok(&kx
        .admin_kubectl(&["create", "-f", f.to_str().unwrap()])
        .await);
    // A CSR this instance left behind (an attempt whose cleanup failed during an outage).
    let killed = kx
        .rotator_async(&["rotate", "alice"], &[("ROTATOR_FAULT", "approved:kill")])
        .await;
    assert!(!killed.status.success());
    let csrs = kx.rotator_objects().await.1;
    assert!(csrs.lines().count() == 2, "ours and theirs: {csrs}");

    // The next command for the user removes ours, never theirs.
    ok(&kx
        .rotator_async(&["rotate", "alice", "--out", "a2.kubeconfig"], &[])
        .await);
    let csrs = kx.rotator_objects().await.1;
    assert_eq!(
        csrs.trim(),
        "certificatesigningrequest.certificates.k8s.io/rotator-otherinstance"
    );
    // And the daemon's reconcile leaves it alone too.
    let app = kx
        .app_with(std::sync::Arc::new(rotator::flows::issue::NoFaults))
        .await;
    rotator::flows::renew::reconcile_pass(&app).await.unwrap();
    let csrs = kx.rotator_objects().await.1;
    assert_eq!(
        csrs.trim(),
        "certificatesigningrequest.certificates.k8s.io/rotator-otherinstance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_down_a_revoke_is_still_recorded() {
    let kx = Kx::new(Options::default(), "").await;
    ok(&add(&kx, "alice", &["team-a"], "view").await);
    let Kx { cluster, s, .. } = kx;
    let _snapshot = cluster.stop().await;
    // The client CA and the endpoint were cached by the first command: the
    // next ones start with the API server gone, and the revoke is in the
    // database although the cluster cannot be told yet.
    let listed = s.rotator(&["--config", "rotator.toml", "list-users"]);
    assert!(ok(&listed).contains("alice"));
    let o = s.rotator(&["--config", "rotator.toml", "revoke", "alice"]);
    let err = fails_with(&o, 8);
    assert!(
        err.contains("is recorded") && err.contains("next pass retries"),
        "{err}"
    );
    assert_eq!(
        s.count("SELECT COUNT(*) FROM credentials WHERE user_name = 'alice' AND state = 'revoked'")
            .await,
        1
    );
}
}
