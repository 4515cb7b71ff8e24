//! API machinery and operations: authentication failures, escalation checks,
//! selectors, watch, fault injection, restart with state kept.
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams, WatchEvent, WatchParams};
use testcluster::{FaultAction, FaultRule, Options, TestCluster};

use crate::common::*;

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_credentials_are_401_with_a_status_body() {
    let fx = Fx::new(Options::default()).await;
    // A certificate from a CA the cluster does not trust, and a made-up token.
    let other = TestCluster::start(Options::default()).await.unwrap();
    let (cert, key) = {
        let kc = other.user_kubeconfig("mallory", &["system:masters"]);
        let v: serde_json::Value = serde_json::from_str(&kc).unwrap();
        use base64::Engine;
        let d = |k: &str| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(v["users"][0]["user"][k].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        (d("client-certificate-data"), d("client-key-data"))
    };
    for kc in [
        fx.cluster.kubeconfig_for_cert(&cert, &key),
        fx.cluster.kubeconfig_for_token("not-a-token"),
        fx.cluster.kubeconfig_for_token("abcdef.0123456789abcdef"),
    ] {
        let e = Api::<Namespace>::all(client(&kc).await)
            .list(&ListParams::default())
            .await
            .unwrap_err();
        assert_eq!(api_code(&e), 401);
        assert_eq!(api_message(&e), "Unauthorized");
        let f = fx.write("bad.kubeconfig", &kc);
        let r = fx.kubectl(&f, &["get", "ns"]).await;
        // kubectl's words for a 401, as against a real API server.
        assert!(
            !r.ok && r.stderr.contains("You must be logged in to the server"),
            "{}",
            r.stderr
        );
    }
    // A client certificate wins over a bearer token in the same request.
    let admin_token = fx.cluster.admin_token().to_string();
    let mut kc: serde_json::Value =
        serde_json::from_str(&fx.cluster.user_kubeconfig("nobody", &[])).unwrap();
    kc["users"][0]["user"]["token"] = serde_json::json!(admin_token);
    let e = Api::<Namespace>::all(client(&kc.to_string()).await)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(
        api_code(&e),
        403,
        "the certificate's user, not the token's, is used"
    );
}

#[tokio::test]
async fn binding_a_role_needs_its_permissions_or_bind() {
    let fx = Fx::new(Options::default()).await;
    Api::<Namespace>::all(fx.admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("t".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // A namespace admin may create RoleBindings, but not to cluster-admin.
    let rb = |name: &str, role: &str| RoleBinding {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(vec![Subject {
            kind: "User".into(),
            name: "x".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            namespace: None,
        }]),
    };
    Api::<RoleBinding>::namespaced(fx.admin.clone(), "t")
        .create(&PostParams::default(), &rb("ns-admin", "admin"))
        .await
        .unwrap();
    let mut first = rb("ns-admin-user", "admin");
    first.subjects.as_mut().unwrap()[0].name = "nsadmin".into();
    Api::<RoleBinding>::namespaced(fx.admin.clone(), "t")
        .create(&PostParams::default(), &first)
        .await
        .unwrap();
    let nsadmin = client(&fx.cluster.user_kubeconfig("nsadmin", &[])).await;
    let api = Api::<RoleBinding>::namespaced(nsadmin, "t");
    api.create(&PostParams::default(), &rb("ok-view", "view"))
        .await
        .expect("view is within admin");
    let e = api
        .create(&PostParams::default(), &rb("escalate", "cluster-admin"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), 403);
    assert!(
        api_message(&e).contains("not currently held"),
        "{}",
        api_message(&e)
    );
}

#[tokio::test]
async fn selectors_generate_name_and_namespace_deletion() {
    let fx = Fx::new(Options::default()).await;
    let api: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), "default");
    api.create(
        &PostParams::default(),
        &cm(
            "a",
            &[
                ("app.kubernetes.io/managed-by", "rotator"),
                ("user", "alice"),
            ],
        ),
    )
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &cm(
            "b",
            &[("app.kubernetes.io/managed-by", "rotator"), ("user", "bob")],
        ),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &cm("c", &[]))
        .await
        .unwrap();
    let names = |l: kube::api::ObjectList<ConfigMap>| {
        l.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("app.kubernetes.io/managed-by=rotator"))
                .await
                .unwrap()
        ),
        ["a", "b"]
    );
    assert_eq!(
        names(
            api.list(
                &ListParams::default().labels("app.kubernetes.io/managed-by=rotator,user!=alice")
            )
            .await
            .unwrap()
        ),
        ["b"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("user in (alice, carol)"))
                .await
                .unwrap()
        ),
        ["a"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().labels("!user"))
                .await
                .unwrap()
        ),
        ["c", "kube-root-ca.crt"]
    );
    assert_eq!(
        names(
            api.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let mut g = cm("", &[]);
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let made = api.create(&PostParams::default(), &g).await.unwrap();
    let n = made.metadata.name.unwrap();
    assert!(n.starts_with("gen-") && n.len() == 9, "{n}");
    let e = api
        .create(&PostParams::default(), &cm("a", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        (api_code(&e), api_message(&e)),
        (409, "configmaps \"a\" already exists".to_string())
    );
    let e = api.get("nope").await.unwrap_err();
    assert_eq!(
        (api_code(&e), api_message(&e)),
        (404, "configmaps \"nope\" not found".to_string())
    );
    let e = Api::<ConfigMap>::namespaced(fx.admin.clone(), "missing")
        .create(&PostParams::default(), &cm("x", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        (api_code(&e), api_message(&e)),
        (404, "namespaces \"missing\" not found".to_string())
    );
    // Namespaces are created with kube-root-ca.crt, and their contents go with them.
    Api::<Namespace>::all(fx.admin.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("gone".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let root = Api::<ConfigMap>::namespaced(fx.admin.clone(), "gone")
        .get("kube-root-ca.crt")
        .await
        .unwrap();
    assert_eq!(root.data.unwrap()["ca.crt"], fx.cluster.ca_pem());
    Api::<Namespace>::all(fx.admin.clone())
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        Api::<ConfigMap>::namespaced(fx.admin.clone(), "gone")
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn watch_streams_changes_after_a_resource_version() {
    let fx = Fx::new(Options::default()).await;
    let api: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), "default");
    let first = api
        .create(&PostParams::default(), &cm("w1", &[]))
        .await
        .unwrap();
    let rv = first.metadata.resource_version.clone().unwrap();
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &cm("w2", &[]))
        .await
        .unwrap();
    api.delete("w1", &DeleteParams::default()).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match stream.next().await.unwrap().unwrap() {
            WatchEvent::Added(c) => seen.push(format!("ADDED {}", c.metadata.name.unwrap())),
            WatchEvent::Deleted(c) => seen.push(format!("DELETED {}", c.metadata.name.unwrap())),
            WatchEvent::Modified(c) => seen.push(format!("MODIFIED {}", c.metadata.name.unwrap())),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        ["ADDED w2", "DELETED w1"],
        "events before the resourceVersion are not replayed"
    );
}

#[tokio::test]
async fn faults_are_injected_on_the_nth_matching_request() {
    let fx = Fx::new(Options::default()).await;
    let pods: Api<Pod> = Api::namespaced(fx.admin.clone(), "default");
    fx.cluster.faults().add(
        FaultRule::on(Some("GET"), "/pods")
            .nth(2)
            .times(1)
            .action(FaultAction::Status(500)),
    );
    fx.cluster.faults().add(
        FaultRule::on(Some("GET"), "/pods")
            .nth(3)
            .times(1)
            .action(FaultAction::TooManyRequests { retry_after: 1 }),
    );
    assert!(pods.list(&ListParams::default()).await.is_ok());
    assert_eq!(
        api_code(&pods.list(&ListParams::default()).await.unwrap_err()),
        500
    );
    // kube-rs honours Retry-After by itself: the 429 is absorbed and the retry succeeds.
    assert!(pods.list(&ListParams::default()).await.is_ok());
    assert_eq!(fx.cluster.faults().fired(), 2);
    // The 429 carries Retry-After, as the real server's does.
    let raw = reqwest_like_get(
        &fx,
        "/api/v1/namespaces/default/pods",
        FaultAction::TooManyRequests { retry_after: 3 },
    )
    .await;
    assert!(raw.contains("retry-after: 3"), "{raw}");
    // A dropped connection and a hang surface as transport errors, not API errors.
    fx.cluster.faults().clear();
    fx.cluster
        .faults()
        .add(FaultRule::on(None, "/configmaps").action(FaultAction::Drop));
    let e = Api::<ConfigMap>::namespaced(fx.admin.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert!(!matches!(e, kube::Error::Api(_)), "{e:?}");
    fx.cluster
        .faults()
        .add(FaultRule::on(None, "/secrets").action(FaultAction::Hang));
    let hung = tokio::time::timeout(
        Duration::from_millis(300),
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(fx.admin.clone(), "default")
            .list(&ListParams::default()),
    )
    .await;
    assert!(hung.is_err(), "the request must hang");
    assert!(fx.cluster.faults().fired() >= 2);
}

/// The raw response head of one request that hits `action`, via curl-free TLS: kubectl -v=8 shows headers.
async fn reqwest_like_get(fx: &Fx, path: &str, action: FaultAction) -> String {
    fx.cluster
        .faults()
        .add(FaultRule::on(Some("GET"), path).action(action));
    let r = fx.admin_kubectl(&["get", "--raw", path, "-v=8"]).await;
    (r.stdout + &r.stderr).to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_objects_cas_and_the_port() {
    let fx = Fx::new(Options::default()).await;
    Api::<ConfigMap>::namespaced(fx.admin.clone(), "default")
        .create(&PostParams::default(), &cm("kept", &[]))
        .await
        .unwrap();
    let Fx {
        cluster,
        dir,
        admin_kc,
        ..
    } = fx;
    let url = cluster.url().to_string();
    let snap = cluster.stop().await;
    let r = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&admin_kc)
        .args(["get", "cm", "kept", "--request-timeout=2s"])
        .output()
        .await
        .unwrap();
    assert!(!r.status.success(), "the server is down");
    let cluster = TestCluster::restart(snap).await.unwrap();
    assert_eq!(cluster.url(), url);
    let r = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&admin_kc)
        .args(["get", "cm", "kept", "-o", "name"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        "configmap/kept",
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    drop(dir);
}

#[tokio::test]
async fn discovery_answers_what_kubectl_asks_first() {
    let fx = Fx::new(Options::default()).await;
    let v = fx.admin.apiserver_version().await.unwrap();
    assert_eq!(v.major, "1");
    let groups = fx.admin.list_api_groups().await.unwrap();
    let names: Vec<&str> = groups.groups.iter().map(|g| g.name.as_str()).collect();
    for g in [
        "certificates.k8s.io",
        "rbac.authorization.k8s.io",
        "authentication.k8s.io",
        "authorization.k8s.io",
        "coordination.k8s.io",
    ] {
        assert!(names.contains(&g), "{g} missing from {names:?}");
    }
    let core = fx.admin.list_core_api_resources("v1").await.unwrap();
    assert!(
        core.resources
            .iter()
            .any(|r| r.name == "secrets" && r.namespaced)
    );
    let csr = fx
        .admin
        .list_api_group_resources("certificates.k8s.io/v1")
        .await
        .unwrap();
    let names: Vec<&str> = csr.resources.iter().map(|r| r.name.as_str()).collect();
    assert!(
        names.contains(&"certificatesigningrequests/approval")
            && names.contains(&"certificatesigningrequests/status")
    );
    let r = fx
        .admin_kubectl(&[
            "api-resources",
            "--api-group=certificates.k8s.io",
            "-o",
            "name",
        ])
        .await;
    assert_eq!(
        r.stdout.trim(),
        "certificatesigningrequests.certificates.k8s.io",
        "{}",
        r.stderr
    );
}
