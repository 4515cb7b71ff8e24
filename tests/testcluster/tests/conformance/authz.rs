//! The webhook authorizer of structured authorization configuration (fact 29)
//! against its counterpart: a tiny real HTTPS webhook written here, which
//! verifies the API server's client certificate, records every
//! SubjectAccessReview and answers by a per-user table.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use testcluster::authz::{Authorizer, FailurePolicy, WebhookConfig};
use testcluster::pki::Ca;
use testcluster::{Options, TestCluster};

use crate::common::Fx;

#[derive(Clone, Copy)]
enum Answer {
    Deny,
    NoOpinion,
}

#[derive(Default)]
struct Seen {
    reviews: Vec<Value>,
    answers: HashMap<String, Answer>,
}

struct Webhook {
    url: String,
    ca_pem: String,
    /// The CA whose client certificate the webhook requires.
    client_ca: Ca,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    async fn start() -> Self {
        let ca = Ca::new("webhook-ca");
        let client_ca = Ca::new("apiserver-client-ca");
        let (cert, key) = ca.serving_cert();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(client_ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/authorize",
            listener.local_addr().unwrap().port()
        );
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen) = (acceptor.clone(), s2.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let body = req.into_body().collect().await?.to_bytes();
                                let review: Value =
                                    serde_json::from_slice(&body).unwrap_or(Value::Null);
                                let user = review["spec"]["user"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .to_string();
                                let mut s = seen.lock().unwrap();
                                s.reviews.push(review);
                                let status = match s
                                    .answers
                                    .get(&user)
                                    .copied()
                                    .unwrap_or(Answer::NoOpinion)
                                {
                                    Answer::Deny => {
                                        json!({"allowed": false, "denied": true, "reason": format!("{user} is revoked (test webhook)")})
                                    }
                                    Answer::NoOpinion => json!({"allowed": false}),
                                };
                                let out = json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "status": status});
                                Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(
                                    out.to_string(),
                                ))))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            url,
            ca_pem: ca.cert_pem.clone(),
            client_ca,
            seen,
            task,
        }
    }

    fn config(&self) -> WebhookConfig {
        let (cert, key) = self.client_ca.client_cert("kube-apiserver", &[], 86400);
        WebhookConfig::new("test-webhook", &self.url, &self.ca_pem)
            .client_cert(&cert, &key)
            .match_condition("request.groups.exists(g, g.startsWith('rot:'))")
            .timeout(Duration::from_secs(2))
    }

    fn answer(&self, user: &str, a: Answer) {
        self.seen.lock().unwrap().answers.insert(user.into(), a);
    }

    fn reviews_of(&self, user: &str) -> Vec<Value> {
        let s = self.seen.lock().unwrap();
        s.reviews
            .iter()
            .filter(|r| r["spec"]["user"] == user)
            .cloned()
            .collect()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn cluster_with(cfg: WebhookConfig) -> Fx {
    Fx::new(Options {
        authorizers: vec![Authorizer::Webhook(cfg), Authorizer::Rbac],
        ..Default::default()
    })
    .await
}

/// A user (client certificate) bound to `view` cluster-wide; returns its kubeconfig.
async fn viewer(fx: &Fx, cn: &str, groups: &[&str]) -> std::path::PathBuf {
    let crb = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": format!("{cn}-view")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": cn}]});
    let f = fx.write(&format!("{cn}-crb.json"), &crb.to_string());
    let r = fx
        .admin_kubectl(&["apply", "-f", f.to_str().unwrap()])
        .await;
    assert!(r.ok, "{}", r.stderr);
    fx.write(
        &format!("{cn}.kubeconfig"),
        &fx.cluster.user_kubeconfig(cn, groups),
    )
}

#[tokio::test]
async fn webhook_deny_ends_the_chain_no_opinion_falls_through_and_conditions_skip() {
    let hook = Webhook::start().await;
    let fx = cluster_with(hook.config().unauthorized_ttl(Duration::ZERO)).await;
    let alice = viewer(&fx, "alice", &["rot:alice-1", "dev"]).await;
    let bob = viewer(&fx, "bob", &["rot:bob-1"]).await;
    let carol = viewer(&fx, "carol", &["dev"]).await;
    hook.answer("alice", Answer::Deny);

    let r = fx
        .kubectl(&alice, &["get", "configmaps", "-n", "default"])
        .await;
    assert!(
        !r.ok,
        "a webhook deny must end the chain even though RBAC allows"
    );
    assert!(
        r.stderr.contains("Forbidden") || r.stderr.contains("forbidden"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("alice is revoked (test webhook)"),
        "the reason is shown: {}",
        r.stderr
    );

    // What kube-apiserver sends: v1 SubjectAccessReview with the user, groups,
    // the certificate's credential-id extra and full resource attributes.
    let rev = hook.reviews_of("alice").pop().expect("alice was reviewed");
    assert_eq!(rev["apiVersion"], "authorization.k8s.io/v1");
    assert_eq!(rev["kind"], "SubjectAccessReview");
    let spec = &rev["spec"];
    assert!(
        spec["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "rot:alice-1"),
        "{spec}"
    );
    let cid = spec["extra"]["authentication.kubernetes.io/credential-id"][0]
        .as_str()
        .unwrap();
    assert!(
        cid.starts_with("X509SHA256=") && cid.len() == 11 + 64,
        "{cid}"
    );
    let ra = &spec["resourceAttributes"];
    assert_eq!(
        (
            ra["namespace"].as_str(),
            ra["verb"].as_str(),
            ra["version"].as_str(),
            ra["resource"].as_str()
        ),
        (
            Some("default"),
            Some("list"),
            Some("v1"),
            Some("configmaps")
        ),
        "{ra}"
    );

    let r = fx
        .kubectl(&bob, &["get", "configmaps", "-n", "default"])
        .await;
    assert!(r.ok, "no opinion: RBAC decides: {}", r.stderr);
    assert!(!hook.reviews_of("bob").is_empty());
    // A non-resource request is reviewed with nonResourceAttributes.
    let r = fx.kubectl(&bob, &["get", "--raw", "/version"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        hook.reviews_of("bob")
            .iter()
            .any(|r| r["spec"]["nonResourceAttributes"]["path"] == "/version")
    );

    let r = fx
        .kubectl(&carol, &["get", "configmaps", "-n", "default"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        hook.reviews_of("carol").is_empty(),
        "matchConditions keep carol away from the webhook"
    );

    // RBAC still refuses what it does not grant after a no-opinion.
    let r = fx
        .kubectl(&bob, &["create", "configmap", "x", "-n", "default"])
        .await;
    assert!(!r.ok && r.stderr.contains("forbidden"), "{}", r.stderr);
}

#[tokio::test]
async fn webhook_failure_policy_deny_refuses_only_matching_users() {
    let hook = Webhook::start().await;
    let cfg = hook.config().failure_policy(FailurePolicy::Deny);
    drop(hook); // the webhook is down: connections are refused
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fx = cluster_with(cfg).await;
    let bob = viewer(&fx, "bob", &["rot:bob-1"]).await;
    let carol = viewer(&fx, "carol", &["dev"]).await;
    let r = fx
        .kubectl(&bob, &["get", "configmaps", "-n", "default"])
        .await;
    assert!(
        !r.ok,
        "failurePolicy Deny with the webhook down refuses a matching user"
    );
    assert!(
        r.stderr.contains("InternalError") || r.stderr.contains("Internal error"),
        "{}",
        r.stderr
    );
    let r = fx
        .kubectl(&carol, &["get", "configmaps", "-n", "default"])
        .await;
    assert!(
        r.ok,
        "a user the conditions do not match is unaffected: {}",
        r.stderr
    );
}

#[tokio::test]
async fn webhook_answers_are_cached_for_their_ttl() {
    let hook = Webhook::start().await;
    let fx = cluster_with(hook.config().unauthorized_ttl(Duration::from_secs(3))).await;
    let bob = viewer(&fx, "bob", &["rot:bob-1"]).await;
    let args = ["get", "configmaps", "-n", "default", "--request-timeout=5s"];
    assert!(fx.kubectl(&bob, &args).await.ok);
    let n = hook.reviews_of("bob").len();
    // Within the TTL the cached no-opinion stands: a deny now is not seen...
    hook.answer("bob", Answer::Deny);
    let r = fx.kubectl(&bob, &args).await;
    assert!(r.ok, "cached answer: {}", r.stderr);
    assert_eq!(
        hook.reviews_of("bob").len(),
        n,
        "the same review is not asked again within the TTL"
    );
    // ...after it, the webhook is asked again and its deny holds.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let r = fx.kubectl(&bob, &args).await;
    assert!(!r.ok && r.stderr.contains("bob is revoked"), "{}", r.stderr);
    assert!(hook.reviews_of("bob").len() > n);
}

#[tokio::test]
async fn webhook_unknown_match_condition_is_refused_at_start() {
    let hook = Webhook::start().await;
    let cfg = hook.config().match_condition("has(request.extra)");
    let err = TestCluster::start(Options {
        authorizers: vec![Authorizer::Webhook(cfg), Authorizer::Rbac],
        ..Default::default()
    })
    .await
    .err()
    .expect("an unknown expression is refused");
    assert!(
        err.to_string().contains("matchConditions[1].expression"),
        "{err}"
    );
}
