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
