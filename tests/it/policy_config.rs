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
