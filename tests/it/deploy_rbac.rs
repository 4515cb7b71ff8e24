//! deploy/kubernetes/rbac.yaml against the test server, applied with the real
//! kubectl: what rotator's own identity can be made to do by whoever holds it
//! (never read a Secret, never become another identity), that every verb it
//! grants is one the code uses and every flow runs with no more, and Secret
//! delivery that never takes over a Secret rotator did not create.
use std::collections::BTreeSet;

use base64::Engine;
use serde_json::Value;
use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;

const ROTATOR: &str = "system:serviceaccount:rotator:rotator";
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

/// Waits for the token controller to fill a service-account token Secret.
async fn minted_token(kx: &Kx, ns: &str, name: &str) -> String {
    for _ in 0..100 {
        let v = kx.admin_json(&["get", "secret", name, "-n", ns]).await;
        if let Some(t) = v["data"]["token"].as_str() {
            let t = base64::engine::general_purpose::STANDARD.decode(t).unwrap();
            return String::from_utf8(t).unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the token controller did not fill {ns}/{name}");
}

/// PATCH requests straight from a client with rotator's identity (kubectl's
/// `patch` reads the object first): an empty merge patch and a server-side apply,
/// each of which answers with the whole object. Returns what came back.
async fn raw_patches(kx: &Kx, ns: &str, name: &str) -> Vec<String> {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams};
    let kc = kube::config::Kubeconfig::read_from(kx.s.path("rotator.kubeconfig")).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let api: kube::Api<Secret> = kube::Api::namespaced(kube::Client::try_from(cfg).unwrap(), ns);
    let apply =
        serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}});
    let mut out = Vec::new();
    for (pp, patch) in [
        (PatchParams::default(), Patch::Merge(serde_json::json!({}))),
        (PatchParams::apply("attacker").force(), Patch::Apply(apply)),
    ] {
        if let Ok(s) = api.patch(name, &pp, &patch).await {
            out.push(serde_json::to_string(&s).unwrap());
        }
    }
    out
}

fn sa_token_secret(name: &str, sa: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
        "metadata": {"name": name, "annotations": {"kubernetes.io/service-account.name": sa}},
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_identity_can_neither_read_secrets_nor_mint_tokens() {
    let kx = Kx::new(Options::default(), "").await;
    kx.grant_secret_delivery("team-a", "alice-kubeconfig").await;
    // What an attacker holding rotator's credentials would go for: Secrets of
    // others, and service accounts bound to cluster-admin.
    for (ns, sa) in [("kube-system", "powerful"), ("team-a", "deployer")] {
        // (kubectl's `create serviceaccount` speaks protobuf; a manifest is JSON.)
        let f = kx.s.write(
            &format!("sa-{sa}.json"),
            &serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}}).to_string(),
        );
        ok(&kx
            .admin_kubectl(&["create", "-f", f.to_str().unwrap()])
            .await);
        ok(&kx
            .admin_kubectl(&[
                "create",
                "clusterrolebinding",
                &format!("{sa}-admin"),
                "--clusterrole=cluster-admin",
                &format!("--serviceaccount={ns}:{sa}"),
            ])
            .await);
    }
    for ns in ["team-a", "kube-system"] {
        ok(&kx
            .admin_kubectl(&[
                "create",
                "secret",
                "generic",
                "app-creds",
                "-n",
                ns,
                "--from-literal=password=hunter2-secret-value",
            ])
            .await);
    }
    let mut seen = String::new();
    let mut patched = String::new();
    let mut as_rotator = async |args: &[&str]| -> bool {
        let o = kx.kubectl_as("rotator.kubeconfig", args).await;
        seen.push_str(&String::from_utf8_lossy(&o.stdout));
        seen.push_str(&String::from_utf8_lossy(&o.stderr));
        o.status.success()
    };
    let mut escalations = Vec::new();
    // 1. Read a foreign Secret: get, list, watch, an empty PATCH (which answers
    //    with the whole object), a server-side apply.
    for ns in ["team-a", "kube-system"] {
        for args in [
            vec!["get", "secret", "app-creds", "-n", ns, "-o", "json"],
            vec!["get", "secrets", "-n", ns, "-o", "json"],
            vec!["get", "secrets", "-A", "-o", "json"],
            vec![
                "get",
                "secrets",
                "-n",
                ns,
                "--field-selector",
                "type=bootstrap.kubernetes.io/token",
                "-o",
                "json",
            ],
            vec![
                "patch",
                "secret",
                "app-creds",
                "-n",
                ns,
                "--type",
                "merge",
                "-p",
                r#"{"metadata":{"annotations":{"x":"y"}}}"#,
                "-o",
                "json",
            ],
            vec![
                "patch",
                "secret",
                "app-creds",
                "-n",
                ns,
                "--type",
                "json",
                "-p",
                "[]",
                "-o",
                "json",
            ],
        ] {
            if as_rotator(&args).await {
                escalations.push(args.join(" "));
            }
        }
        for got in raw_patches(&kx, ns, "app-creds").await {
            escalations.push(format!("PATCH secret {ns}/app-creds"));
            patched.push_str(&got);
        }
        let apply = kx.s.write(
            "apply.json",
            r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"app-creds"}}"#,
        );
        let args = [
            "apply",
            "--server-side",
            "--force-conflicts",
            "-n",
            ns,
            "-f",
            apply.to_str().unwrap(),
            "-o",
            "json",
        ];
        if as_rotator(&args).await {
            escalations.push(args.join(" "));
        }
    }
    // 2. Mint a token: create service-account-token Secrets (create cannot be
    //    refused by name: in kube-system and in the delivery namespace, under
    //    the very name rotator may update), let the token controller fill them,
    //    then try every way back to their content.
    let mut tokens = Vec::new();
    for (ns, sa, name) in [
        ("kube-system", "powerful", "mint-powerful"),
        ("team-a", "deployer", "alice-kubeconfig"),
    ] {
        let f =
            kx.s.write(&format!("{name}.json"), &sa_token_secret(name, sa));
        let created =
            as_rotator(&["create", "-n", ns, "-f", f.to_str().unwrap(), "-o", "json"]).await;
        if !created {
            continue; // refused outright: nothing to read back
        }
        let token = minted_token(&kx, ns, name).await;
        // The test server is faithful: the minted token is cluster-admin.
        kx.s.write(
            "minted.kubeconfig",
            &kx.cluster.kubeconfig_for_token(&token),
        );
        assert_eq!(
            ok(&kx
                .kubectl_as("minted.kubeconfig", &["auth", "can-i", "*", "*"])
                .await)
            .trim(),
            "yes"
        );
        for args in [
            vec!["get", "secret", name, "-n", ns, "-o", "json"],
            vec!["get", "secrets", "-n", ns, "-o", "json"],
            vec![
                "get",
                "secrets",
                "-n",
                ns,
                "--watch",
                "--request-timeout=1s",
                "-o",
                "json",
            ],
            vec![
                "patch",
                "secret",
                name,
                "-n",
                ns,
                "--type",
                "merge",
                "-p",
                r#"{"metadata":{"annotations":{"x":"y"}}}"#,
                "-o",
                "json",
            ],
        ] {
            if as_rotator(&args).await {
                escalations.push(args.join(" "));
            }
        }
        for got in raw_patches(&kx, ns, name).await {
            escalations.push(format!("PATCH secret {ns}/{name}"));
            patched.push_str(&got);
        }
        // A replace (allowed on alice-kubeconfig) answers with what was sent.
        let f =
            kx.s.write(&format!("{name}-put.json"), &sa_token_secret(name, sa));
        as_rotator(&["replace", "-n", ns, "-f", f.to_str().unwrap(), "-o", "json"]).await;
        // A delete (allowed in kube-system) answers with a Status.
        as_rotator(&["delete", "secret", name, "-n", ns, "-o", "json"]).await;
        tokens.push(token);
    }
    // 3. Become another identity directly.
    for args in [
        vec!["create", "token", "powerful", "-n", "kube-system"],
        vec!["auth", "can-i", "impersonate", "serviceaccounts"],
        vec!["auth", "can-i", "escalate", "clusterroles"],
        vec!["auth", "can-i", "bind", "clusterroles/cluster-admin"],
    ] {
        let o = kx.kubectl_as("rotator.kubeconfig", &args).await;
        if o.status.success() && String::from_utf8_lossy(&o.stdout).trim() != "no" {
            escalations.push(args.join(" "));
        }
    }
    seen.push_str(&patched);
    assert!(
        escalations.is_empty(),
        "rotator's identity could: {escalations:#?}"
    );
    assert!(
        !seen.contains("hunter2-secret-value")
            && !seen.contains(
                &base64::engine::general_purpose::STANDARD.encode("hunter2-secret-value")
            ),
        "a foreign Secret's value reached rotator's identity"
    );
    for t in &tokens {
        assert!(
            !seen.contains(t.as_str())
                && !seen.contains(&base64::engine::general_purpose::STANDARD.encode(t)),
            "a minted token reached rotator's identity"
        );
    }
    assert_eq!(
        tokens.len(),
        2,
        "both creates are allowed: the test reads back"
    );
}

/// One permission: verb, API group, resource (with subresource), and where
/// ("*" for a ClusterRole bound cluster-wide, else the Role's namespace).
type Grant = (String, String, String, String);

/// What the rotator service account is granted, as the cluster holds it.
async fn granted(kx: &Kx) -> BTreeSet<Grant> {
    let mut out = BTreeSet::new();
    let names_sa = |b: &Value| {
        b["subjects"].as_array().into_iter().flatten().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == "rotator" && s["namespace"] == "rotator"
        })
    };
    let mut roles = Vec::new();
    for b in kx.admin_json(&["get", "clusterrolebindings"]).await["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| names_sa(b))
    {
        let r = b["roleRef"]["name"].as_str().unwrap().to_string();
        roles.push((
            kx.admin_json(&["get", "clusterrole", &r]).await,
            "*".to_string(),
        ));
    }
    for b in kx.admin_json(&["get", "rolebindings", "-A"]).await["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| names_sa(b))
    {
        let ns = b["metadata"]["namespace"].as_str().unwrap().to_string();
        let r = b["roleRef"]["name"].as_str().unwrap().to_string();
        let kind = b["roleRef"]["kind"].as_str().unwrap().to_lowercase();
        roles.push((kx.admin_json(&["get", &kind, &r, "-n", &ns]).await, ns));
    }
    for (role, scope) in roles {
        for rule in role["rules"].as_array().unwrap() {
            let strs = |k: &str| -> Vec<String> {
                rule[k]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for v in strs("verbs") {
                for g in strs("apiGroups") {
                    for r in strs("resources") {
                        out.insert((v.clone(), g.clone(), r, scope.clone()));
                    }
                }
            }
        }
    }
    out
}

/// Fails if the deploy identity was refused anything (but listing kube-system
/// Secrets: the optional rbac-token-audit.yaml), or was granted a (verb, group,
/// resource, scope) it never used (`only`: look at this resource alone).
async fn assert_used_exactly(kx: &Kx, only: Option<&str>) {
    let decisions: Vec<_> = kx
        .cluster
        .store()
        .authz
        .lock()
        .unwrap()
        .iter()
        .filter(|d| d.username == ROTATOR)
        .cloned()
        .collect();
    let res = |a: &testcluster::rbac::Attrs| {
        if a.subresource.is_empty() {
            a.resource.clone()
        } else {
            format!("{}/{}", a.resource, a.subresource)
        }
    };
    // Needed and missing: every refusal is one the code expects and handles
    // (listing kube-system Secrets: rbac-token-audit.yaml is optional).
    let refused: Vec<String> = decisions
        .iter()
        .filter(|d| !d.allowed)
        .map(|d| format!("{} {} {}", d.attrs.verb, res(&d.attrs), d.attrs.namespace))
        .filter(|d| d != "list secrets kube-system")
        .collect();
    assert!(refused.is_empty(), "flows were refused: {refused:#?}");
    // Granted and unused.
    let used: BTreeSet<Grant> = decisions
        .iter()
        .filter(|d| d.allowed)
        .map(|d| {
            (
                d.attrs.verb.clone(),
                d.attrs.group.clone(),
                res(&d.attrs),
                d.attrs.namespace.clone(),
            )
        })
        .collect();
    let unused: Vec<Grant> = granted(kx)
        .await
        .into_iter()
        .filter(|(_, _, r, _)| only.is_none_or(|o| o == r))
        .filter(|(v, g, r, scope)| {
            !used.iter().any(|(uv, ug, ur, uns)| {
                uv == v && ug == g && ur == r && (scope == "*" || scope == uns)
            })
        })
        .collect();
    assert!(unused.is_empty(), "granted but never used: {unused:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_yaml_grants_exactly_what_the_flows_use() {
    // A signer that signs one CSR every two seconds (its bucket holds one), so
    // that the issuances after the first wait for their certificate by watching.
    let kx = Kx::new(
        Options {
            signing_rate: Some(0.5),
            ..Options::default()
        },
        "[rotation]\nrenew_before = \"2h\"\njitter = 0.0\n",
    )
    .await;
    kx.grant_secret_delivery("team-a", "alice-kubeconfig").await;
    kx.cluster.store().authz.lock().unwrap().clear();
    // Every flow of the kubernetes signer, as the deploy identity.
    ok(&kx
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
    ok(&kx
        .rotator_async(
            &[
                "add-user", "bob", "-n", "team-b", "--role", "edit", "--ttl", "1h",
            ],
            &[],
        )
        .await);
    ok(&kx
        .rotator_async(&["rotate", "bob", "--out", "bob2.kubeconfig"], &[])
        .await);
    ok(&kx.rotator_async(&["revoke", "bob"], &[]).await);
    ok(&kx.rotator_async(&["remove-user", "bob"], &[]).await);
    let token = ok(&kx.rotator_async(&["token", "create"], &[]).await);
    let id = token
        .trim()
        .split_once('.')
        .expect("id.secret")
        .0
        .to_string();
    ok(&kx.rotator_async(&["token", "list"], &[]).await);
    ok(&kx.rotator_async(&["token", "revoke", &id], &[]).await);
    ok(&kx.rotator_async(&["doctor"], &[]).await);
    let clock = rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(
        &rotator::support::clock::SystemClock,
    ));
    let app = kx.app(&clock).await;
    // The daemon's passes: rotation (the Secret is replaced), reconcile (a stale
    // CSR of this instance is deleted), leader election.
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (1, 0));
    let instance = instance_id(&kx);
    let (_, csr) = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "stale");
        (
            key.serialize_pem(),
            p.serialize_request(&key).unwrap().pem().unwrap(),
        )
    };
    let stale = serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "metadata": {"name": "rotator-stale-0000", "labels": {"app.kubernetes.io/managed-by": "rotator"},
                     "annotations": {"rotator.io/instance": instance}},
        "spec": {"request": base64::engine::general_purpose::STANDARD.encode(csr),
                 "signerName": "kubernetes.io/kube-apiserver-client", "usages": ["client auth"]},
    });
    let f = kx.s.write("stale.json", &stale.to_string());
    ok(&kx
        .admin_kubectl(&["create", "-f", f.to_str().unwrap()])
        .await);
    rotator::flows::renew::reconcile_pass(&app).await.unwrap();
    let cluster = app.cluster.as_ref().unwrap();
    let now = rotator::support::clock::Clock::now_micros(&clock);
    let lease = std::time::Duration::from_secs(15);
    assert!(
        cluster
            .try_lease("rotator", "rotator", "me", lease, now)
            .await
            .unwrap()
    );
    assert!(
        cluster
            .try_lease("rotator", "rotator", "me", lease, now + 5_000_000)
            .await
            .unwrap()
    );

    assert_used_exactly(&kx, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_cluster_wide_yaml_grants_exactly_what_cluster_wide_access_uses() {
    let kx = Kx::new(
        Options::default(),
        "[policy]\nallow_cluster_role_bindings = true\n",
    )
    .await;
    let f = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/rbac-cluster-wide.yaml"
    );
    ok(&kx.admin_kubectl(&["apply", "-f", f]).await);
    kx.cluster.store().authz.lock().unwrap().clear();
    ok(&kx
        .rotator_async(
            &["add-user", "ops", "--cluster-wide", "--role", "view"],
            &[],
        )
        .await);
    ok(&kx
        .rotator_async(&["rotate", "ops", "--out", "ops2.kubeconfig"], &[])
        .await);
    ok(&kx.rotator_async(&["revoke", "ops"], &[]).await);
    ok(&kx.rotator_async(&["remove-user", "ops"], &[]).await);
    let clock = rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(
        &rotator::support::clock::SystemClock,
    ));
    let app = kx.app(&clock).await;
    rotator::flows::renew::reconcile_pass(&app).await.unwrap();
    assert_used_exactly(&kx, Some("clusterrolebindings")).await;
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
    // In a namespace with no delivery grant at all, the missing create is named.
    let e = fails_with(
        &kx.rotator_async(
            &[
                "add-user",
                "erin",
                "-n",
                "team-b",
                "--role",
                "view",
                "--deliver",
                "secret:team-b/erin-kc",
            ],
            &[],
        )
        .await,
        4,
    );
    assert!(
        e.contains("create Secrets in namespace \"team-b\"")
            && e.contains("DELIVERY_NAMESPACE=team-b"),
        "{e}"
    );
    // The kubeconfig has one destination: --out with a Secret target is refused.
    let e = fails_with(
        &kx.rotator_async(
            &[
                "add-user",
                "dora",
                "-n",
                "team-a",
                "--role",
                "view",
                "--out",
                "dora.kubeconfig",
                "--deliver",
                "secret:team-a/alice-kubeconfig",
            ],
            &[],
        )
        .await,
        2,
    );
    assert!(e.contains("--out") && e.contains("fix:"), "{e}");
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
    let clock = rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(
        &rotator::support::clock::SystemClock,
    ));
    let app = kx.app(&clock).await;
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
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
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
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
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (1, 0));
    let v4 = read_secret().await;
    assert_eq!(
        v4["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "rotator"
    );
}
