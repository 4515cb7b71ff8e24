//! rotator's kubeconfigs against the Kubernetes API test server, with the real
//! kubectl as the user's client: a kubeadm-style setup where the local CA is the
//! cluster's client CA.
use testcluster::{Options, TestCluster};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubeconfig_from_the_local_ca_works_in_kubectl_against_the_cluster() {
    let cluster = TestCluster::start(Options::default()).await.unwrap();
    let s = Scratch::new();
    let ca_crt = s.write("ca.crt", cluster.client_ca_pem());
    let ca_key = s.write("ca.key", &cluster.client_ca_key_pem());
    let serving = s.write("serving-ca.crt", cluster.ca_pem());
    let admin = s.write("admin.kubeconfig", &cluster.admin_kubeconfig());
    s.write(
        "rotator.toml",
        &format!(
            "[cluster]\nname = \"test\"\nserver = \"{}\"\nca_file = {:?}\n[local_ca]\ncert_file = {:?}\nkey_file = {:?}\n",
            cluster.url(),
            serving,
            ca_crt,
            ca_key
        ),
    );
    let admin_s = admin.to_str().unwrap();
    ok(&run_async(
        "kubectl",
        &["--kubeconfig", admin_s, "create", "namespace", "team-a"],
    )
    .await);
    ok(&s.rotator(&[
        "--config",
        "rotator.toml",
        "add-user",
        "alice",
        "--group",
        "dev",
        "-n",
        "team-a",
        "--role",
        "view",
    ]));
    let kc = s.path("alice.kubeconfig");
    let kc_s = kc.to_str().unwrap();

    let who = ok(&run_async(
        "kubectl",
        &["--kubeconfig", kc_s, "auth", "whoami", "-o", "json"],
    )
    .await);
    let v: serde_json::Value = serde_json::from_str(&who).unwrap();
    assert_eq!(v["status"]["userInfo"]["username"], "alice");
    let groups: Vec<&str> = v["status"]["userInfo"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_str().unwrap())
        .collect();
    assert_eq!(groups.len(), 3, "{groups:?}");
    assert_eq!((groups[0], groups[2]), ("dev", "system:authenticated"));
    assert!(groups[1].starts_with("rotator:alice:1."), "{groups:?}");
    let group1 = groups[1].to_string();

    // RBAC bound to the generation group grants access; another namespace stays closed.
    let denied = run_async(
        "kubectl",
        &["--kubeconfig", kc_s, "get", "pods", "-n", "team-a"],
    )
    .await;
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Forbidden"),
        "no binding yet"
    );
    ok(&run_async(
        "kubectl",
        &[
            "--kubeconfig",
            admin_s,
            "create",
            "rolebinding",
            "alice-g1",
            "--clusterrole=view",
            &format!("--group={group1}"),
            "-n",
            "team-a",
        ],
    )
    .await);
    ok(&run_async(
        "kubectl",
        &["--kubeconfig", kc_s, "get", "pods", "-n", "team-a"],
    )
    .await);
    let other = run_async(
        "kubectl",
        &["--kubeconfig", kc_s, "get", "pods", "-n", "default"],
    )
    .await;
    assert!(
        !other.status.success() && String::from_utf8_lossy(&other.stderr).contains("forbidden")
    );

    // After rotation the new certificate carries generation 2: the old binding no longer applies.
    ok(&s.rotator(&["--config", "rotator.toml", "rotate", "alice"]));
    let rotated = run_async(
        "kubectl",
        &["--kubeconfig", kc_s, "get", "pods", "-n", "team-a"],
    )
    .await;
    assert!(String::from_utf8_lossy(&rotated.stderr).contains("Forbidden"));
    let who = ok(&run_async(
        "kubectl",
        &["--kubeconfig", kc_s, "auth", "whoami", "-o", "json"],
    )
    .await);
    assert!(who.contains("rotator:alice:2."), "{who}");
}
