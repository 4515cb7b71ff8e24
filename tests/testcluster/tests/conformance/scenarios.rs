//! The five scenarios of the issue, each through kube-rs and through kubectl.
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use serde_json::json;
use testcluster::{Options, SignerMode};

use crate::common::*;

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        ..Default::default()
    }
}

async fn namespace(fx: &Fx, name: &str) {
    Api::<Namespace>::all(fx.admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: meta(name),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

async fn bind(fx: &Fx, ns: &str, name: &str, role: &str, kind: &str, subject: &str) {
    let rb = RoleBinding {
        metadata: meta(name),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            kind: kind.into(),
            name: subject.into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            namespace: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(fx.admin.clone(), ns)
        .create(&PostParams::default(), &rb)
        .await
        .unwrap();
}

// ---- 1. create, approve, issue; approving without the signers permission is 403 ----

#[derive(Debug, PartialEq)]
struct Issued {
    approve_without_signer_forbidden: bool,
    condition: String,
    cn: String,
    orgs: Vec<String>,
    lifetime: i64,
}

async fn csr_lifecycle(fx: &Fx, via: Via) -> Issued {
    let name = format!("csr-{}", via.tag());
    let (req, _) = csr_pem(&name, &["dev"]);
    let approver = fx.write(
        &format!("approver-{}.kubeconfig", via.tag()),
        &fx.cluster.user_kubeconfig("approver", &[]),
    );
    let forbidden;
    let pem;
    let condition;
    match via {
        Via::KubeRs => {
            let api: Api<CertificateSigningRequest> = Api::all(fx.admin.clone());
            api.create(&PostParams::default(), &csr_object(&name, &req, Some(3600)))
                .await
                .unwrap();
            let e = approve(
                &client(&std::fs::read_to_string(&approver).unwrap()).await,
                &name,
            )
            .await
            .unwrap_err();
            forbidden = api_code(&e) == 403 && api_message(&e).contains("user not permitted to approve requests with signerName \"kubernetes.io/kube-apiserver-client\"");
            approve(&fx.admin, &name).await.unwrap();
            let c = watch_csr(&fx.admin, &name, |c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.certificate.as_ref())
                    .is_some()
            })
            .await;
            condition = conditions(&c);
            pem = String::from_utf8(c.status.unwrap().certificate.unwrap().0).unwrap();
        }
        Via::Kubectl => {
            let f = fx.write(&format!("{name}.yaml"), &csr_yaml(&name, &req, 3600));
            assert!(
                fx.admin_kubectl(&["create", "-f", f.to_str().unwrap()])
                    .await
                    .ok
            );
            let r = fx
                .kubectl(&approver, &["certificate", "approve", &name])
                .await;
            forbidden = !r.ok && r.stderr.contains("user not permitted to approve requests with signerName \"kubernetes.io/kube-apiserver-client\"");
            let r = fx.admin_kubectl(&["certificate", "approve", &name]).await;
            assert!(r.ok, "{}", r.stderr);
            let r = fx
                .admin_kubectl(&[
                    "wait",
                    "--for=jsonpath={.status.certificate}",
                    &format!("csr/{name}"),
                    "--timeout=20s",
                ])
                .await;
            assert!(r.ok, "{}", r.stderr);
            let row = fx
                .admin_kubectl(&["get", "csr", &name, "--no-headers"])
                .await
                .stdout;
            condition = row.split_whitespace().last().unwrap().to_string();
            let b64 = fx
                .admin_kubectl(&["get", "csr", &name, "-o", "jsonpath={.status.certificate}"])
                .await
                .stdout;
            use base64::Engine;
            pem = String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .unwrap(),
            )
            .unwrap();
        }
    }
    let (cn, orgs, lifetime) = cert_facts(&pem);
    Issued {
        approve_without_signer_forbidden: forbidden,
        condition,
        cn: cn.replace(via.tag(), "X"),
        orgs,
        lifetime,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_is_created_approved_and_issued_with_the_requested_lifetime() {
    let fx = Fx::new(Options::default()).await;
    // An approver with every CSR permission except `approve` on the signer.
    let role = ClusterRole {
        metadata: meta("csr-approver-without-signer"),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec!["certificates.k8s.io".into()]),
                resources: Some(vec!["certificatesigningrequests".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                ..Default::default()
            },
            PolicyRule {
                api_groups: Some(vec!["certificates.k8s.io".into()]),
                resources: Some(vec!["certificatesigningrequests/approval".into()]),
                verbs: vec!["update".into(), "patch".into()],
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    Api::<ClusterRole>::all(fx.admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    fx.admin_kubectl(&[
        "create",
        "clusterrolebinding",
        "approver",
        "--clusterrole=csr-approver-without-signer",
        "--user=approver",
    ])
    .await;
    let a = csr_lifecycle(&fx, Via::KubeRs).await;
    let b = csr_lifecycle(&fx, Via::Kubectl).await;
    assert_eq!(a, b);
    // Under 8h the csrsigning backdate extends the lifetime by five minutes.
    assert_eq!(
        a,
        Issued {
            approve_without_signer_forbidden: true,
            condition: "Approved,Issued".into(),
            cn: "csr-X".into(),
            orgs: vec!["dev".into()],
            lifetime: 3600 + 300
        }
    );
}

#[tokio::test]
async fn lifetimes_are_capped_and_backdated_like_the_real_signer() {
    let fx = Fx::new(Options {
        max_signing_duration: std::time::Duration::from_secs(86400),
        ..Default::default()
    })
    .await;
    for (asked, expected) in [
        (Some(600), 900),
        (Some(8 * 3600), 8 * 3600),
        (Some(30 * 86400), 86400),
        (None, 86400),
    ] {
        let name = format!("life-{}", asked.unwrap_or(0));
        let (req, _) = csr_pem("life", &[]);
        Api::<CertificateSigningRequest>::all(fx.admin.clone())
            .create(&PostParams::default(), &csr_object(&name, &req, asked))
            .await
            .unwrap();
        approve(&fx.admin, &name).await.unwrap();
        let c = watch_csr(&fx.admin, &name, |c| {
            c.status
                .as_ref()
                .and_then(|s| s.certificate.as_ref())
                .is_some()
        })
        .await;
        let (_, _, lifetime) =
            cert_facts(std::str::from_utf8(&c.status.unwrap().certificate.unwrap().0).unwrap());
        assert_eq!(lifetime, expected, "asked {asked:?}");
    }
}

// ---- 2. the certificate authenticates as the user; RBAC grants exactly the bindings ----

#[derive(Debug, PartialEq)]
struct Access {
    username: String,
    groups: Vec<String>,
    can_list_a: bool,
    can_list_b: bool,
    list_a: bool,
    list_b_forbidden_message: String,
    list_a_after_unbind: bool,
    can_list_a_after_unbind: bool,
}

async fn access(fx: &Fx, via: Via) -> Access {
    let t = via.tag();
    let (ns_a, ns_b, user, group) = (
        format!("a-{t}"),
        format!("b-{t}"),
        format!("user-{t}"),
        format!("team-{t}"),
    );
    namespace(fx, &ns_a).await;
    namespace(fx, &ns_b).await;
    bind(fx, &ns_a, "viewers", "view", "Group", &group).await;
    let (cert, key) = issue(fx, &user, &user, &[&group]).await;
    let kc_text = fx.cluster.kubeconfig_for_cert(&cert, &key);
    let kc = fx.write(&format!("{user}.kubeconfig"), &kc_text);
    let norm = |s: &str| s.replace(t, "X");
    let mut out = match via {
        Via::KubeRs => {
            let c = client(&kc_text).await;
            let r = Api::<SelfSubjectReview>::all(c.clone())
                .create(&PostParams::default(), &SelfSubjectReview::default())
                .await
                .unwrap();
            let ui = r.status.unwrap().user_info.unwrap();
            let can = |ns: &str| {
                let c = c.clone();
                let ns = ns.to_string();
                async move {
                    let ssar = SelfSubjectAccessReview {
                        spec: SelfSubjectAccessReviewSpec {
                            resource_attributes: Some(ResourceAttributes {
                                namespace: Some(ns),
                                verb: Some("list".into()),
                                resource: Some("pods".into()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    Api::<SelfSubjectAccessReview>::all(c)
                        .create(&PostParams::default(), &ssar)
                        .await
                        .unwrap()
                        .status
                        .unwrap()
                        .allowed
                }
            };
            let list_b = Api::<Pod>::namespaced(c.clone(), &ns_b)
                .list(&ListParams::default())
                .await
                .unwrap_err();
            Access {
                username: ui.username.unwrap(),
                groups: ui.groups.unwrap(),
                can_list_a: can(&ns_a).await,
                can_list_b: can(&ns_b).await,
                list_a: Api::<Pod>::namespaced(c.clone(), &ns_a)
                    .list(&ListParams::default())
                    .await
                    .is_ok(),
                list_b_forbidden_message: if api_code(&list_b) == 403 {
                    api_message(&list_b)
                } else {
                    String::new()
                },
                list_a_after_unbind: false,
                can_list_a_after_unbind: false,
            }
        }
        Via::Kubectl => {
            let who: serde_json::Value = serde_json::from_str(
                &fx.kubectl(&kc, &["auth", "whoami", "-o", "json"])
                    .await
                    .stdout,
            )
            .unwrap();
            let ui = &who["status"]["userInfo"];
            let can = |ns: String| {
                let kc = kc.clone();
                async move {
                    fx.kubectl(&kc, &["auth", "can-i", "list", "pods", "-n", &ns])
                        .await
                        .stdout
                        .trim()
                        == "yes"
                }
            };
            let list_b = fx.kubectl(&kc, &["get", "pods", "-n", &ns_b]).await;
            Access {
                username: ui["username"].as_str().unwrap().into(),
                groups: ui["groups"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_str().unwrap().to_string())
                    .collect(),
                can_list_a: can(ns_a.clone()).await,
                can_list_b: can(ns_b.clone()).await,
                list_a: fx.kubectl(&kc, &["get", "pods", "-n", &ns_a]).await.ok,
                list_b_forbidden_message: list_b
                    .stderr
                    .trim()
                    .strip_prefix("Error from server (Forbidden): ")
                    .unwrap_or_default()
                    .to_string(),
                list_a_after_unbind: false,
                can_list_a_after_unbind: false,
            }
        }
    };
    // Take the binding away: the very next request is refused.
    Api::<RoleBinding>::namespaced(fx.admin.clone(), &ns_a)
        .delete("viewers", &DeleteParams::default())
        .await
        .unwrap();
    match via {
        Via::KubeRs => {
            let c = client(&kc_text).await;
            out.list_a_after_unbind = Api::<Pod>::namespaced(c, &ns_a)
                .list(&ListParams::default())
                .await
                .is_ok();
        }
        Via::Kubectl => {
            out.list_a_after_unbind = fx.kubectl(&kc, &["get", "pods", "-n", &ns_a]).await.ok;
            out.can_list_a_after_unbind = fx
                .kubectl(&kc, &["auth", "can-i", "list", "pods", "-n", &ns_a])
                .await
                .stdout
                .trim()
                == "yes";
        }
    }
    out.username = norm(&out.username);
    out.groups = out.groups.iter().map(|g| norm(g)).collect();
    out.list_b_forbidden_message = norm(&out.list_b_forbidden_message);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_authenticate_and_rbac_grants_exactly_the_bindings() {
    let fx = Fx::new(Options::default()).await;
    let a = access(&fx, Via::KubeRs).await;
    let b = access(&fx, Via::Kubectl).await;
    assert_eq!(a, b);
    assert_eq!(a.username, "user-X");
    assert_eq!(a.groups, ["team-X", "system:authenticated"]);
    assert!(a.can_list_a && a.list_a && !a.can_list_b && !a.list_a_after_unbind);
    assert_eq!(
        a.list_b_forbidden_message,
        "pods is forbidden: User \"user-X\" cannot list resource \"pods\" in API group \"\" in the namespace \"b-X\""
    );
}

// ---- 3. bootstrap tokens: authenticate until expiration, then 401; tokencleaner removes them ----

fn token_secret(id: &str, secret: &str, expiration: &str, auth: bool) -> Secret {
    let mut data = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(
            k.to_string(),
            k8s_openapi::ByteString(v.as_bytes().to_vec()),
        );
    };
    put("token-id", id);
    put("token-secret", secret);
    put("expiration", expiration);
    put("auth-extra-groups", "system:bootstrappers:rotator");
    if auth {
        put("usage-bootstrap-authentication", "true");
    }
    Secret {
        metadata: meta(&format!("bootstrap-token-{id}")),
        type_: Some("bootstrap.kubernetes.io/token".into()),
        data: Some(data),
        ..Default::default()
    }
}

#[derive(Debug, PartialEq)]
struct TokenOutcome {
    username: String,
    groups: Vec<String>,
    wrong_secret_unauthorized: bool,
    no_auth_usage_unauthorized: bool,
    expired_unauthorized: bool,
}

async fn whoami(fx: &Fx, via: Via, token: &str) -> Result<(String, Vec<String>), bool> {
    let text = fx.cluster.kubeconfig_for_token(token);
    match via {
        Via::KubeRs => {
            let c = client(&text).await;
            match Api::<SelfSubjectReview>::all(c)
                .create(&PostParams::default(), &SelfSubjectReview::default())
                .await
            {
                Ok(r) => {
                    let ui = r.status.unwrap().user_info.unwrap();
                    Ok((ui.username.unwrap(), ui.groups.unwrap()))
                }
                Err(e) => Err(api_code(&e) == 401),
            }
        }
        Via::Kubectl => {
            let kc = fx.write("token.kubeconfig", &text);
            let r = fx.kubectl(&kc, &["auth", "whoami", "-o", "json"]).await;
            if r.ok {
                let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
                let ui = &v["status"]["userInfo"];
                Ok((
                    ui["username"].as_str().unwrap().into(),
                    ui["groups"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|g| g.as_str().unwrap().to_string())
                        .collect(),
                ))
            } else {
                Err(r.stderr.contains("Unauthorized"))
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_tokens_authenticate_until_they_expire_and_are_then_cleaned_up() {
    let fx = Fx::new(Options::default()).await;
    let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), "kube-system");
    let mut outcomes = Vec::new();
    for (i, via) in Via::BOTH.into_iter().enumerate() {
        let id = format!("abcde{i}");
        let exp = testcluster::store::rfc3339(fx.cluster.shared().now() + 3600);
        secrets
            .create(
                &PostParams::default(),
                &token_secret(&id, "0123456789abcdef", &exp, true),
            )
            .await
            .unwrap();
        secrets
            .create(
                &PostParams::default(),
                &token_secret(&format!("noaut{i}"), "0123456789abcdef", &exp, false),
            )
            .await
            .unwrap();
        let (username, groups) = whoami(&fx, via, &format!("{id}.0123456789abcdef"))
            .await
            .expect("token authenticates");
        let wrong = whoami(&fx, via, &format!("{id}.0123456789abcdee")).await;
        let no_usage = whoami(&fx, via, &format!("noaut{i}.0123456789abcdef")).await;
        fx.cluster.advance_clock(7200);
        let expired = whoami(&fx, via, &format!("{id}.0123456789abcdef")).await;
        outcomes.push(TokenOutcome {
            username: username.replace(&id, "ID"),
            groups,
            wrong_secret_unauthorized: wrong == Err(true),
            no_auth_usage_unauthorized: no_usage == Err(true),
            expired_unauthorized: expired == Err(true),
        });
        // The tokencleaner deletes the expired Secrets.
        assert!(fx.cluster.run_cleaners() >= 2);
        assert!(
            secrets
                .get_opt(&format!("bootstrap-token-{id}"))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(outcomes[0], outcomes[1]);
    assert_eq!(
        outcomes[0],
        TokenOutcome {
            username: "system:bootstrap:ID".into(),
            groups: vec![
                "system:bootstrappers".into(),
                "system:bootstrappers:rotator".into(),
                "system:authenticated".into()
            ],
            wrong_secret_unauthorized: true,
            no_auth_usage_unauthorized: true,
            expired_unauthorized: true,
        }
    );
}

#[tokio::test]
async fn the_tokencleaner_can_be_switched_off_like_on_many_real_clusters() {
    let fx = Fx::new(Options {
        token_cleaner: false,
        ..Default::default()
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), "kube-system");
    let exp = testcluster::store::rfc3339(fx.cluster.shared().now() - 10);
    secrets
        .create(
            &PostParams::default(),
            &token_secret("zzzzzz", "0123456789abcdef", &exp, true),
        )
        .await
        .unwrap();
    assert_eq!(fx.cluster.run_cleaners(), 0);
    assert!(
        secrets
            .get_opt("bootstrap-token-zzzzzz")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        whoami(&fx, Via::KubeRs, "zzzzzz.0123456789abcdef").await,
        Err(true),
        "expired tokens are refused even before deletion"
    );
}

// ---- 4. Denied and Failed CSRs; invalid CSRs are 422 ----

#[derive(Debug, PartialEq)]
struct Refusals {
    denied: String,
    failed: String,
    short_lifetime: (u16, String),
    garbage_request: u16,
    masters: (u16, String),
}

async fn refusals(fx: &Fx, via: Via) -> Refusals {
    let t = via.tag();
    let api: Api<CertificateSigningRequest> = Api::all(fx.admin.clone());
    let create = |name: String, req: String, exp: i64| {
        let api = api.clone();
        async move {
            match via {
                Via::KubeRs => api
                    .create(
                        &PostParams::default(),
                        &csr_object(&name, &req, Some(exp as i32)),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| (api_code(&e), api_message(&e))),
                Via::Kubectl => {
                    let f = fx.write(&format!("{name}.yaml"), &csr_yaml(&name, &req, exp));
                    let r = fx
                        .admin_kubectl(&["create", "-f", f.to_str().unwrap()])
                        .await;
                    if r.ok {
                        Ok(())
                    } else if let Some(m) = r
                        .stderr
                        .trim()
                        .strip_prefix("Error from server (Forbidden): error when creating \"")
                    {
                        Err((403, m.split_once("\": ").unwrap().1.to_string()))
                    } else {
                        // kubectl prints 422s as: The CertificateSigningRequest "x" is invalid: ...
                        Err((422, r.stderr.trim().to_string()))
                    }
                }
            }
        }
    };
    // Denied.
    let (req, _) = csr_pem("denied", &[]);
    create(format!("denied-{t}"), req, 3600).await.unwrap();
    match via {
        Via::KubeRs => {
            let p = json!({"status": {"conditions": [{"type": "Denied", "status": "True", "reason": "Test", "message": "no"}]}});
            api.patch_approval(
                &format!("denied-{t}"),
                &Default::default(),
                &kube::api::Patch::Merge(&p),
            )
            .await
            .unwrap();
        }
        Via::Kubectl => assert!(
            fx.admin_kubectl(&["certificate", "deny", &format!("denied-{t}")])
                .await
                .ok
        ),
    }
    testcluster::csr::signing_pass(fx.cluster.shared());
    let denied = conditions(&api.get(&format!("denied-{t}")).await.unwrap());
    // Failed: the signer refuses a request whose usages it cannot honour.
    fx.cluster.set_signer_mode(SignerMode::Fail);
    let (req, _) = csr_pem("failed", &[]);
    create(format!("failed-{t}"), req, 3600).await.unwrap();
    approve(&fx.admin, &format!("failed-{t}")).await.unwrap();
    let failed = conditions(
        &watch_csr(&fx.admin, &format!("failed-{t}"), |c| {
            conditions(c).contains("Failed")
        })
        .await,
    );
    fx.cluster.set_signer_mode(SignerMode::Sign);
    // Invalid.
    let (req, _) = csr_pem("short", &[]);
    let short = create(format!("short-{t}"), req, 599).await.unwrap_err();
    let garbage = create(
        format!("garbage-{t}"),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
        3600,
    )
    .await
    .unwrap_err();
    let (req, _) = csr_pem("root", &["system:masters"]);
    let masters = create(format!("masters-{t}"), req, 3600).await.unwrap_err();
    let short_msg = short.1.rsplit(": ").next().unwrap_or_default().to_string();
    Refusals {
        denied,
        failed,
        short_lifetime: (short.0, short_msg),
        garbage_request: garbage.0,
        masters: (masters.0, masters.1.replace(t, "X")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_failed_and_invalid_csrs_behave_like_the_real_server() {
    let fx = Fx::new(Options::default()).await;
    let a = refusals(&fx, Via::KubeRs).await;
    let b = refusals(&fx, Via::Kubectl).await;
    assert_eq!(a, b);
    assert_eq!(a.denied, "Denied");
    assert_eq!(a.failed, "Approved,Failed");
    assert_eq!(
        a.short_lifetime,
        (
            422,
            "may not specify a duration less than 600 seconds".to_string()
        )
    );
    assert_eq!(a.garbage_request, 422);
    assert_eq!(a.masters.0, 403);
    assert!(a.masters.1.contains("use of kubernetes.io/kube-apiserver-client signer with system:masters group is not allowed"), "{}", a.masters.1);
    // A denied CSR is never signed, and cannot be approved afterwards.
    let e = approve(&fx.admin, "denied-kubers").await.unwrap_err();
    assert_eq!(api_code(&e), 422);
    assert!(api_message(&e).contains("Denied"), "{}", api_message(&e));
    let r = fx
        .admin_kubectl(&["certificate", "approve", "denied-kubectl"])
        .await;
    assert!(!r.ok && r.stderr.contains("already Denied"), "{}", r.stderr);
}

// ---- 5. two concurrent updates of one object: one wins, the other gets 409 ----

async fn race(fx: &Fx, via: Via) -> (usize, usize, String) {
    let name = format!("race-{}", via.tag());
    let api: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), "default");
    let cm = api
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: meta(&name),
                data: Some([("v".to_string(), "0".to_string())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let results: Vec<Result<(), String>> = match via {
        Via::KubeRs => {
            let mk = |v: &str| {
                let mut c = cm.clone();
                c.data = Some([("v".to_string(), v.to_string())].into());
                let api = api.clone();
                let name = name.clone();
                async move {
                    api.replace(&name, &PostParams::default(), &c)
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("{} {}", api_code(&e), api_message(&e)))
                }
            };
            let (a, b) = tokio::join!(mk("1"), mk("2"));
            vec![a, b]
        }
        Via::Kubectl => {
            let mk = |v: &str| {
                let mut c = serde_json::to_value(&cm).unwrap();
                c["data"]["v"] = json!(v);
                let f = fx.write(&format!("{name}-{v}.json"), &c.to_string());
                async move {
                    let r = fx
                        .admin_kubectl(&["replace", "-f", f.to_str().unwrap()])
                        .await;
                    if r.ok { Ok(()) } else { Err(r.stderr) }
                }
            };
            let (a, b) = tokio::join!(mk("1"), mk("2"));
            vec![a, b]
        }
    };
    let won = results.iter().filter(|r| r.is_ok()).count();
    let conflict = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .cloned()
        .collect::<Vec<_>>();
    let msg = conflict.first().cloned().unwrap_or_default();
    let normalized = if msg.contains("the object has been modified; please apply your changes to the latest version and try again") { "conflict".to_string() } else { msg };
    (won, conflict.len(), normalized)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_one_wins_the_other_gets_409() {
    let fx = Fx::new(Options::default()).await;
    let a = race(&fx, Via::KubeRs).await;
    let b = race(&fx, Via::Kubectl).await;
    assert_eq!(a, b);
    assert_eq!(a, (1, 1, "conflict".to_string()));
}
