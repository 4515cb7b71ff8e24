//! deploy/kubernetes/ against the test server, applied with the real kubectl:
//! Secret delivery that never takes over a Secret rotator did not create.
use base64::Engine;
use serde_json::Value;
use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;

const DELIVERY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/kubernetes/rbac-secret-delivery.yaml"
);

impl Kx {
    /// Applies rbac-secret-delivery.yaml for one Secret, as the README says.
    pub async fn grant_secret_delivery(&self, ns: &str, name: &str) {
        let text = std::fs::read_to_string(DELIVERY)
            .unwrap()
            .replace("DELIVERY_NAMESPACE", ns)
            .replace("DELIVERY_SECRET", name);
        let f = self.s.write(&format!("delivery-{ns}-{name}.yaml"), &text);
        ok(&self
            .admin_kubectl(&["apply", "-f", f.to_str().unwrap()])
            .await);
    }

    async fn admin_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&ok(&self.admin_kubectl(&a).await)).unwrap()
    }
}

/// The instance id in DATA_DIR/instance (its `instance ID` line).
fn instance_id(kx: &Kx) -> String {
    let text = std::fs::read_to_string(kx.s.path("rotator-data/instance")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("instance "))
        .expect("an instance line")
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_delivery_creates_its_own_secret_at_add_user_and_never_takes_one_over() {
    let kx = Kx::new(
        Options::default(),
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n",
    )
    .await;
    for name in ["app-creds", "tls-creds", "alice-kubeconfig"] {
        kx.grant_secret_delivery("team-a", name).await;
    }
    ok(&kx
        .admin_kubectl(&[
            "create",
            "secret",
            "generic",
            "app-creds",
            "-n",
            "team-a",
            "--from-literal=kubeconfig=theirs",
        ])
        .await);
    let (cert, key) = {
        let k = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["app.example".into()])
            .unwrap()
            .self_signed(&k)
            .unwrap();
        (
            kx.s.write("tls.crt", &c.pem()),
            kx.s.write("tls.key", &k.serialize_pem()),
        )
    };
    ok(&kx
        .admin_kubectl(&[
            "create",
            "secret",
            "tls",
            "tls-creds",
            "-n",
            "team-a",
            &format!("--cert={}", cert.display()),
            &format!("--key={}", key.display()),
        ])
        .await);
    let before: Vec<Value> = [
        kx.admin_json(&["get", "secret", "app-creds", "-n", "team-a"])
            .await,
        kx.admin_json(&["get", "secret", "tls-creds", "-n", "team-a"])
            .await,
    ]
    .into();
    // A foreign Secret, Opaque or TLS, is refused at add-user, before anything is issued.
    for (user, target) in [("hank", "app-creds"), ("tina", "tls-creds")] {
        let e = fails_with(
            &kx.rotator_async(
                &[
                    "add-user",
                    user,
                    "-n",
                    "team-a",
                    "--role",
                    "view",
                    "--deliver",
                    &format!("secret:team-a/{target}"),
                ],
                &[],
            )
            .await,
            6,
        );
        assert!(
            e.contains(&format!("team-a/{target}"))
                && e.contains("did not create")
                && e.contains("fix:"),
            "{e}"
        );
    }
    // A name rotator's identity is not granted is refused too, with the fix.
    let e = fails_with(
        &kx.rotator_async(
            &[
                "add-user",
                "carol",
                "-n",
                "team-a",
                "--role",
                "view",
                "--deliver",
                "secret:team-a/carol-kc",
            ],
            &[],
        )
        .await,
        4,
    );
    assert!(
        e.contains("rbac-secret-delivery.yaml") && e.contains("carol-kc"),
        "{e}"
    );
    assert_eq!(kx.s.count("SELECT COUNT(*) FROM credentials").await, 0);
    assert_eq!(kx.s.count("SELECT COUNT(*) FROM users").await, 0);
    let (rbs, csrs) = kx.rotator_objects().await;
    assert_eq!((rbs.as_str(), csrs.as_str()), ("", ""), "nothing was made");
    let after: Vec<Value> = [
        kx.admin_json(&["get", "secret", "app-creds", "-n", "team-a"])
            .await,
        kx.admin_json(&["get", "secret", "tls-creds", "-n", "team-a"])
            .await,
    ]
    .into();
    assert_eq!(before, after, "the foreign Secrets are untouched");

    // The first kubeconfig goes to the chosen Secret, which rotator creates now.
    let out = ok(&kx
        .rotator_async(
            &[
                "add-user",
                "alice",
                "-n",
                "team-a",
                "--role",
                "view",
                "--ttl",
                "1h",
                "--deliver",
                "secret:team-a/alice-kubeconfig",
            ],
            &[],
        )
        .await);
    assert!(out.contains("secret team-a/alice-kubeconfig"), "{out}");
    assert!(!kx.s.path("alice.kubeconfig").exists(), "no local copy");
    let read_secret = async || {
        let v = kx
            .admin_json(&["get", "secret", "alice-kubeconfig", "-n", "team-a"])
            .await;
        let kc = base64::engine::general_purpose::STANDARD
            .decode(v["data"]["kubeconfig"].as_str().unwrap())
            .unwrap();
        kx.s.write("from-secret.kubeconfig", &String::from_utf8(kc).unwrap());
        v
    };
    let v = read_secret().await;
    assert_eq!(v["type"], "Opaque");
    assert_eq!(
        v["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "rotator"
    );
    let instance = instance_id(&kx);
    assert_eq!(
        v["metadata"]["annotations"]["rotator.io/instance"],
        instance.trim()
    );
    let who = ok(&kx
        .kubectl_as("from-secret.kubeconfig", &["auth", "whoami", "-o", "json"])
        .await);
    assert!(
        who.contains("\"alice\"") && who.contains("rotator:alice:1"),
        "{who}"
    );
    // Another user may not take it, nor the same name again for a new user.
    let e = fails_with(
        &kx.rotator_async(
            &[
                "add-user",
                "bob",
                "-n",
                "team-a",
                "--role",
                "view",
                "--deliver",
                "secret:team-a/alice-kubeconfig",
            ],
            &[],
        )
        .await,
        6,
    );
    assert!(e.contains("alice"), "{e}");

    // A rotation replaces rotator's own Secret in place (same uid).
    let clock =
        rotator::clock::ManualClock::new(rotator::clock::Clock::now(&rotator::clock::SystemClock));
    let app = kx.app(&clock).await;
    let r = rotator::renewal::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (1, 0));
    let v2 = read_secret().await;
    assert_eq!(v2["metadata"]["uid"], v["metadata"]["uid"]);
    let who = ok(&kx
        .kubectl_as("from-secret.kubeconfig", &["auth", "whoami", "-o", "json"])
        .await);
    assert!(who.contains("rotator:alice:2"), "{who}");

    // Someone replaces it with their own Secret of that name: rotator does not
    // overwrite it (the rotation fails and says why), and the Secret is theirs still.
    ok(&kx
        .admin_kubectl(&["delete", "secret", "alice-kubeconfig", "-n", "team-a"])
        .await);
    ok(&kx
        .admin_kubectl(&[
            "create",
            "secret",
            "generic",
            "alice-kubeconfig",
            "-n",
            "team-a",
            "--from-literal=kubeconfig=theirs",
        ])
        .await);
    let r = rotator::renewal::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (0, 1));
    let v3 = kx
        .admin_json(&["get", "secret", "alice-kubeconfig", "-n", "team-a"])
        .await;
    assert_eq!(
        v3["data"]["kubeconfig"],
        base64::engine::general_purpose::STANDARD.encode("theirs")
    );
    assert!(v3["metadata"]["labels"].is_null(), "{v3}");
    // Once it is gone, rotator creates its own again.
    ok(&kx
        .admin_kubectl(&["delete", "secret", "alice-kubeconfig", "-n", "team-a"])
        .await);
    let r = rotator::renewal::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (1, 0));
    let v4 = read_secret().await;
    assert_eq!(
        v4["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "rotator"
    );
}
