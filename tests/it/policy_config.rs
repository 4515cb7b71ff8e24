//! Policy defaults, configuration errors and file modes, through the real binary.
use crate::common::*;

#[tokio::test]
async fn privileged_groups_system_namespaces_and_rotator_user_names_are_refused() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    for (args, needle) in [
        (
            vec![
                "add-user",
                "rotator:bob:1",
                "-n",
                "team-a",
                "--role",
                "view",
            ],
            "rotator:bob:1",
        ),
        (
            vec![
                "add-user",
                "carl",
                "--group",
                "kubeadm:cluster-admins",
                "-n",
                "team-a",
                "--role",
                "view",
            ],
            "kubeadm:cluster-admins",
        ),
        (
            vec![
                "add-user",
                "carl",
                "--group",
                "KUBEADM:Cluster-Admins",
                "-n",
                "team-a",
                "--role",
                "view",
            ],
            "KUBEADM:Cluster-Admins",
        ),
        (
            vec!["add-user", "dora", "-n", "kube-system", "--role", "admin"],
            "kube-system",
        ),
        (
            vec![
                "add-user",
                "dora",
                "-n",
                "kube-node-lease",
                "--role",
                "view",
            ],
            "kube-node-lease",
        ),
    ] {
        let e = fails_with(&s.rotator(&args), 4);
        assert!(e.contains(needle) && e.contains("fix:"), "{args:?}: {e}");
    }
    assert_eq!(s.count("SELECT COUNT(*) FROM users").await, 0);
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);

    // An explicit allow by exact name opens kube-system, and only it; denied
    // groups can be extended while keeping the built-in list.
    s.write(
        "rotator.toml",
        "[policy]\nallowed_namespaces = [\"*\", \"kube-system\"]\ndenied_groups = [\"@defaults\", \"Corp:Admins\"]\n",
    );
    fn with<'a>(rest: &[&'a str]) -> Vec<&'a str> {
        [&["--config", "rotator.toml"][..], rest].concat()
    }
    ok(&s.rotator(&with(&[
        "add-user",
        "dora",
        "-n",
        "kube-system",
        "--role",
        "view",
    ])));
    fails_with(
        &s.rotator(&with(&[
            "add-user",
            "eve",
            "-n",
            "kube-public",
            "--role",
            "view",
        ])),
        4,
    );
    for g in ["corp:admins", "kubeadm:cluster-admins"] {
        let e = fails_with(
            &s.rotator(&with(&[
                "add-user", "fay", "--group", g, "-n", "team-a", "--role", "view",
            ])),
            4,
        );
        assert!(e.contains("policy.denied_groups"), "{e}");
    }
    ok(&s.rotator(&with(&[
        "add-user",
        "fay",
        "--group",
        "kubeadm:get-nodes",
        "-n",
        "team-a",
        "--role",
        "view",
    ])));
}

#[tokio::test]
async fn a_ca_or_sealing_key_others_may_read_is_refused_before_it_is_used() {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    // As the messages show them: relative to the working directory, like data_dir.
    let (ca_key, seal_key) = ("./rotator-data/ca/ca.key", "./rotator-data/seal.key");
    for (file, m) in [(ca_key, 0o644), (ca_key, 0o640), (seal_key, 0o644)] {
        let path = s.path(file);
        chmod(&path, m);
        for args in [
            &["add-user", "alice", "-n", "team-a", "--role", "view"][..],
            &["init"][..],
        ] {
            let e = fails_with(&s.rotator(args), 3);
            assert!(
                e.contains(&format!("{file} has mode {m:o}"))
                    && e.contains(&format!("chmod 600 {file}")),
                "{args:?}: {e}"
            );
        }
        chmod(&path, 0o600);
    }
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);
    assert!(!s.path("alice.kubeconfig").exists());
    ok(&s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]));

    // A configured CA (kubeadm's /etc/kubernetes/pki/ca.key is 0600) likewise.
    let t = Scratch::new();
    let key = t.path("ca.key");
    ok(&run(
        "openssl",
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            key.to_str().unwrap(),
        ],
    ));
    ok(&run(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/CN=kubernetes",
            "-days",
            "30",
            "-out",
            t.path("ca.crt").to_str().unwrap(),
        ],
    ));
    chmod(&key, 0o604);
    t.write(
        "rotator.toml",
        "[local_ca]\ncert_file = \"ca.crt\"\nkey_file = \"ca.key\"\n",
    );
    let e = fails_with(&t.rotator(&["--config", "rotator.toml", "init"]), 3);
    assert!(
        e.contains("ca.key has mode 604") && e.contains("chmod 600 ca.key"),
        "{e}"
    );
    chmod(&key, 0o400);
    ok(&t.rotator(&["--config", "rotator.toml", "init"]));
}

#[test]
fn the_data_directory_and_database_are_made_private_and_doctor_says_so() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    // A permissive umask must not leave the database readable.
    let o = std::process::Command::new("sh")
        .current_dir(s.dir.path())
        .args([
            "-c",
            &format!("umask 000 && {} init", env!("CARGO_BIN_EXE_rotator")),
        ])
        .output()
        .unwrap();
    ok(&o);
    let (dir, db) = (s.path("rotator-data"), s.path("rotator-data/rotator.db"));
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    for f in ["rotator.db-wal", "rotator.db-shm"] {
        let p = dir.join(f);
        if p.exists() {
            assert_eq!(mode(&p) & 0o077, 0, "{f}");
        }
    }
    // Opened up by hand (or by a restore from backup): repaired, and doctor says what it was.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = ok(&s.rotator(&["doctor"]));
    assert!(
        out.contains("data directory") && out.contains("mode 700; it was 755"),
        "{out}"
    );
    assert!(
        out.contains("database file") && out.contains("mode 600; it was 644"),
        "{out}"
    );
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&db), 0o600);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&s.rotator(&["--output", "json", "doctor"]))).unwrap();
    let db_check = json
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "database file")
        .expect("a database file check");
    assert_eq!(db_check["ok"], true);
    assert!(
        db_check["detail"].as_str().unwrap().contains("mode 600"),
        "{db_check}"
    );
    // An add-user in a repaired directory also runs and leaves it private.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = s.rotator(&["add-user", "alice", "-n", "team-a", "--role", "view"]);
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mode is now 700"),
        "the repair is announced"
    );
    assert_eq!(mode(&dir), 0o700);
}

#[test]
fn config_errors_name_their_origin_and_never_echo_a_file() {
    let s = Scratch::new();
    ok(&s.rotator(&["init"]));
    let e = fails_with(
        &s.rotator_env(&["list-users"], &[("ROTATOR_POLICY__MAX_TTL", "banana")]),
        3,
    );
    assert!(
        e.contains("environment variable ROTATOR_POLICY__MAX_TTL")
            && e.contains("banana")
            && e.contains("fix:")
            && !e.contains("built-in defaults"),
        "{e}"
    );
    // `ROTATOR_SERVER` is fetch's --server: admin commands are not disturbed by it.
    ok(&s.rotator_env(
        &["list-users"],
        &[("ROTATOR_SERVER", "https://rotator.example:8443")],
    ));
    ok(&s.rotator_env(
        &["add-user", "alice", "-n", "team-a", "--role", "view"],
        &[("ROTATOR_SERVER", "https://rotator.example:8443")],
    ));
    // A secret given as the config file: the error names it, never shows it.
    let seal = std::fs::read_to_string(s.path("rotator-data/seal.key")).unwrap();
    let o = s.rotator(&["--config", "rotator-data/seal.key", "list-users"]);
    let e = fails_with(&o, 3);
    assert!(
        e.contains("rotator-data/seal.key") && e.contains("line 1"),
        "{e}"
    );
    let all = format!("{e}{}", String::from_utf8_lossy(&o.stdout));
    for part in seal.trim().split(['+', '/', '=']).filter(|p| p.len() >= 4) {
        assert!(!all.contains(part), "the sealing key leaked: {all}");
    }
    let ca_key = std::fs::read_to_string(s.path("rotator-data/ca/ca.key")).unwrap();
    let o = s.rotator(&["--config", "rotator-data/ca/ca.key", "list-users"]);
    let e = fails_with(&o, 3);
    for l in ca_key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!e.contains(l), "the CA key leaked: {e}");
    }
}

#[test]
fn rust_log_is_honoured_and_rotator_log_wins() {
    let s = Scratch::new();
    let quiet = s.rotator_env(&["init"], &[("RUST_LOG", "off")]);
    ok(&quiet);
    let loud = s.rotator_env(&["list-users"], &[("RUST_LOG", "trace")]);
    ok(&loud);
    let stderr = String::from_utf8_lossy(&loud.stderr);
    assert!(
        stderr.contains("TRACE") || stderr.contains("DEBUG"),
        "RUST_LOG=trace shows debug output: {stderr}"
    );
    let both = s.rotator_env(
        &["list-users"],
        &[("RUST_LOG", "trace"), ("ROTATOR_LOG", "off")],
    );
    ok(&both);
    assert!(
        both.stderr.is_empty(),
        "ROTATOR_LOG wins over RUST_LOG: {}",
        String::from_utf8_lossy(&both.stderr)
    );
    let bad = s.rotator_env(&["list-users"], &[("RUST_LOG", "rotator=loud")]);
    ok(&bad);
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(e.contains("RUST_LOG") && e.contains("fix:"), "{e}");
}

/// doctor finds every grant a revocation by rotator would not take away, each
/// with a fix, in the table and in `--output json`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_grants_that_survive_a_revocation() {
    use crate::kubernetes::Kx;
    let kx = Kx::new(testcluster::Options::default(), "").await;
    // Foreign bootstrap tokens are reported only with the opt-in grant.
    let audit_rbac = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/rbac-token-audit.yaml"
    );
    ok(&kx.admin_kubectl(&["apply", "-f", audit_rbac]).await);
    let doctor = |json: bool| {
        let kx = &kx;
        async move {
            let mut args = vec!["doctor"];
            if json {
                args = vec!["--output", "json", "doctor"];
            }
            kx.rotator_async(&args, &[]).await
        }
    };
    ok(&kx
        .rotator_async(
            &["add-user", "alice", "-n", "team-a", "--role", "view"],
            &[],
        )
        .await);
    ok(&kx
        .rotator_async(&["add-user", "p2", "-n", "team-a", "--role", "edit"], &[])
        .await);
    let clean = ok(&doctor(false).await);
    assert!(
        clean.contains("no binding or bootstrap token outside"),
        "{clean}"
    );
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&kx.rotator(&["show", "p2", "--output", "json"]))).unwrap();
    let p2_group = shown["credentials"][0]["generation_group"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&kx.rotator_async(&["revoke", "p2"], &[]).await);

    // 1. A hand-made binding to p2's (now revoked) generation group, made after
    // the revoke (the revoke itself takes the group out of bindings it finds).
    ok(&kx
        .admin_kubectl(&[
            "create",
            "rolebinding",
            "hand-p2",
            "--clusterrole=edit",
            &format!("--group={p2_group}"),
            "-n",
            "team-a",
        ])
        .await);
    assert!(
        kx.can_list_pods("p2.kubeconfig", "team-a").await,
        "the revoked certificate still has access through it"
    );
    // 2. rotator's label, another instance; 3. rotator's label, a user this database
    // does not have.
    let labelled = |name: &str, annotations: &str| {
        format!(
            r#"{{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"RoleBinding","metadata":{{"name":"{name}","namespace":"team-b","labels":{{"app.kubernetes.io/managed-by":"rotator"}},"annotations":{{{annotations}}}}},"roleRef":{{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"edit"}},"subjects":[{{"apiGroup":"rbac.authorization.k8s.io","kind":"Group","name":"rotator:{name}:1"}}]}}"#
        )
    };
    let f = kx.s.write(
        "foreign.json",
        &labelled(
            "rotator:zed",
            r#""rotator.io/instance":"0123456789abcdef","rotator.io/user":"zed""#,
        ),
    );
    ok(&kx
        .admin_kubectl(&["create", "-f", f.to_str().unwrap()])
        .await);
    let f = kx.s.write(
        "orphan.json",
        &labelled("rotator:ghost", r#""rotator.io/user":"ghost""#),
    );
    ok(&kx
        .admin_kubectl(&["create", "-f", f.to_str().unwrap()])
        .await);
    // 4. rotator's own binding with a subject added by hand.
    let mine = ok(&kx
        .admin_kubectl(&[
            "get",
            "rolebinding",
            "rotator:alice",
            "-n",
            "team-a",
            "-o",
            "json",
        ])
        .await);
    let mut v: serde_json::Value = serde_json::from_str(&mine).unwrap();
    v["subjects"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}));
    let f = kx.s.write("tampered.json", &v.to_string());
    ok(&kx
        .admin_kubectl(&["replace", "-f", f.to_str().unwrap()])
        .await);
    // 5. Privileged groups: a denied one (any case) and system:masters.
    ok(&kx
        .admin_kubectl(&[
            "create",
            "clusterrolebinding",
            "kubeadm-admins",
            "--clusterrole=cluster-admin",
            "--group=Kubeadm:Cluster-Admins",
        ])
        .await);
    ok(&kx
        .admin_kubectl(&[
            "create",
            "rolebinding",
            "masters",
            "--clusterrole=admin",
            "--group=system:masters",
            "-n",
            "team-b",
        ])
        .await);
    // 6. A bootstrap token rotator did not make, that never expires.
    ok(&kx
        .admin_kubectl(&[
            "create",
            "secret",
            "generic",
            "bootstrap-token-abc123",
            "-n",
            "kube-system",
            "--type=bootstrap.kubernetes.io/token",
            "--from-literal=token-id=abc123",
            "--from-literal=token-secret=0123456789abcdef",
            "--from-literal=usage-bootstrap-authentication=true",
        ])
        .await);

    let expected = [
        (
            "generation-group-binding",
            "fail",
            "rolebinding team-a/hand-p2",
            "rotator:p2:1",
        ),
        (
            "foreign-instance-binding",
            "warn",
            "rolebinding team-b/rotator:zed",
            "0123456789abcdef",
        ),
        (
            "orphaned-binding",
            "fail",
            "rolebinding team-b/rotator:ghost",
            "ghost",
        ),
        (
            "tampered-binding",
            "fail",
            "rolebinding team-a/rotator:alice",
            "User mallory",
        ),
        (
            "privileged-group-binding",
            "warn",
            "clusterrolebinding kubeadm-admins",
            "Kubeadm:Cluster-Admins",
        ),
        (
            "privileged-group-binding",
            "warn",
            "rolebinding team-b/masters",
            "system:masters",
        ),
        (
            "foreign-bootstrap-token",
            "fail",
            "bootstrap token abc123",
            "for ever",
        ),
    ];
    let o = doctor(false).await;
    fails_with(&o, 6);
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    for (kind, severity, object, needle) in expected {
        let row = table
            .lines()
            .find(|l| l.contains(kind) && l.contains(object))
            .unwrap_or_else(|| panic!("no {kind} row for {object}:\n{table}"));
        assert!(
            row.contains(needle)
                && row.contains("fix:")
                && row.contains(if severity == "fail" { "FAIL" } else { "warn" }),
            "{row}"
        );
    }
    let o = doctor(true).await;
    fails_with(&o, 6);
    let checks: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let grants = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "grants outside rotator")
        .expect("the grants check");
    assert_eq!(grants["ok"], false);
    let findings = grants["findings"].as_array().unwrap();
    for (kind, severity, object, needle) in expected {
        let f = findings
            .iter()
            .find(|f| f["kind"] == kind && f["object"] == object)
            .unwrap_or_else(|| panic!("no {kind} finding for {object}: {grants}"));
        assert_eq!(f["severity"], severity, "{f}");
        assert!(f["problem"].as_str().unwrap().contains(needle), "{f}");
        assert!(!f["fix"].as_str().unwrap().is_empty(), "{f}");
    }
    assert_eq!(
        findings.len(),
        expected.len(),
        "nothing else is reported: {grants}"
    );
    // Kubernetes' own cluster-admin binding of system:masters is not reported.
    assert!(
        !table.contains("clusterrolebinding cluster-admin "),
        "{table}"
    );

    // Following the fixes for the failures leaves only what is to review.
    ok(&kx
        .admin_kubectl(&["delete", "rolebinding", "-n", "team-a", "hand-p2"])
        .await);
    ok(&kx
        .admin_kubectl(&["delete", "rolebinding", "-n", "team-b", "rotator:ghost"])
        .await);
    let mut restored: serde_json::Value = serde_json::from_str(&mine).unwrap();
    restored["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let f = kx.s.write("mine.json", &restored.to_string());
    ok(&kx
        .admin_kubectl(&["replace", "-f", f.to_str().unwrap()])
        .await);
    ok(&kx
        .admin_kubectl(&[
            "-n",
            "kube-system",
            "delete",
            "secret",
            "bootstrap-token-abc123",
        ])
        .await);
    assert!(!kx.can_list_pods("p2.kubeconfig", "team-a").await);
    let out = ok(&doctor(false).await);
    assert!(out.contains("0 to act on, 3 to review"), "{out}");
}

/// kubelet makes a Secret volume's files root-owned 0440 with the pod's fsGroup
/// (kubernetes#57923), whatever `defaultMode` says: the one group-readable shape
/// accepted. Needs root (to make the files and run rotator as another user).
#[test]
fn a_ca_key_mounted_from_a_secret_with_fs_group_is_accepted_and_nothing_wider() {
    use std::os::unix::fs::{PermissionsExt, chown};
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root || run("sh", &["-c", "command -v setpriv"]).stdout.is_empty() {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    let s = Scratch::new();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = s.path("ca.key");
    ok(&run(
        "openssl",
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            key.to_str().unwrap(),
        ],
    ));
    ok(&run(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/CN=kubernetes",
            "-days",
            "30",
            "-out",
            s.path("ca.crt").to_str().unwrap(),
        ],
    ));
    std::fs::create_dir(s.path("data")).unwrap();
    chown(s.path("data"), Some(65534), Some(65534)).unwrap();
    s.write(
        "rotator.toml",
        &format!(
            "data_dir = {:?}\n[local_ca]\ncert_file = {:?}\nkey_file = {:?}\n",
            s.path("data/d"),
            s.path("ca.crt"),
            key
        ),
    );
    let as_nobody = || {
        std::process::Command::new("setpriv")
            .current_dir(s.dir.path())
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_rotator"))
            .args(["--config", "rotator.toml", "init"])
            .env_remove("ROTATOR_CONFIG")
            .output()
            .unwrap()
    };
    for (uid, gid, mode, accepted) in [
        (0, 65534, 0o440, true),
        (0, 65534, 0o460, false),
        (0, 65534, 0o444, false),
        (65534, 65534, 0o440, false),
    ] {
        chown(&key, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let o = as_nobody();
        if accepted {
            ok(&o);
        } else {
            let e = fails_with(&o, 3);
            assert!(
                e.contains(&format!("mode {mode:o}")),
                "{uid}:{gid} {mode:o}: {e}"
            );
        }
    }
}
