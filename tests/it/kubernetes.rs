//! The kubernetes signer against the Kubernetes API test server, with rotator
//! running as the least-privileged identity of deploy/kubernetes/rbac.yaml and
//! the real kubectl as the user's client.
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;

use testcluster::{FaultAction, FaultRule, Options, SignerMode, TestCluster};

use crate::common::*;

pub struct Kx {
    pub cluster: TestCluster,
    pub s: Scratch,
    pub admin: PathBuf,
}

impl Kx {
    pub async fn new(opts: Options, extra_toml: &str) -> Self {
        Self::with_signer(opts, "kubernetes", extra_toml).await
    }

    /// As [`Kx::new`] with another signer that needs the cluster (vault-pki).
    pub async fn with_signer(opts: Options, signer: &str, extra_toml: &str) -> Self {
        let cluster = TestCluster::start(opts).await.unwrap();
        let s = Scratch::new();
        let admin = s.write("admin.kubeconfig", &cluster.admin_kubeconfig());
        let rbac = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/rbac.yaml");
        let kx = Self { cluster, s, admin };
        for ns in ["team-a", "team-b", "rotator"] {
            ok(&kx.admin_kubectl(&["create", "namespace", ns]).await);
        }
        ok(&kx.admin_kubectl(&["create", "-f", rbac]).await);
        // rotator's identity: the service account the manifests bind, nothing more.
        let own = kx.cluster.user_kubeconfig(
            "system:serviceaccount:rotator:rotator",
            &["system:serviceaccounts"],
        );
        let own = kx.s.write("rotator.kubeconfig", &own);
        // The scratch's database (PostgreSQL inside an `engines!` variant) goes
        // into the config, so every `--config rotator.toml` process and the
        // in-process App open it.
        let database =
            kx.s.database_url
                .as_ref()
                .map(|url| format!("database_url = {url:?}\n"))
                .unwrap_or_default();
        kx.s.write(
            "rotator.toml",
            &format!(
                "{database}signer = {signer:?}\n[kubernetes]\nkubeconfig = {:?}\nsigning_timeout = \"5s\"\n[cluster]\nname = \"test\"\n{extra_toml}",
                own
            ),
        );
        kx
    }

    /// What an in-process App is configured with besides the file (which
    /// names the scratch's database): the data directory.
    fn app_env(&self) -> Vec<(String, String)> {
        vec![(
            "ROTATOR_DATA_DIR".to_string(),
            self.s.path("rotator-data").display().to_string(),
        )]
    }

    /// The App in process, over the same configuration and data directory, with
    /// a clock the test moves.
    pub async fn app(
        &self,
        clock: &rotator::support::clock::ManualClock,
    ) -> Arc<rotator::app::App> {
        let cfg = self.s.path("rotator.toml");
        let env = self.app_env();
        let settings = rotator::config::load_with(Some(&cfg), &env, &Default::default()).unwrap();
        let app = rotator::app::App::open(
            settings,
            Arc::new(clock.clone()),
            Arc::new(rotator::flows::issue::NoFaults),
            "test".into(),
        );
        Arc::new(app.await.unwrap().0)
    }

    /// The App in process with `faults`, on the system clock.
    pub async fn app_with(
        &self,
        faults: Arc<dyn rotator::flows::issue::Faults>,
    ) -> rotator::app::App {
        let cfg = self.s.path("rotator.toml");
        let env = self.app_env();
        let settings = rotator::config::load_with(Some(&cfg), &env, &Default::default()).unwrap();
        rotator::app::App::open(
            settings,
            Arc::new(rotator::support::clock::SystemClock),
            faults,
            "test".into(),
        )
        .await
        .unwrap()
        .0
    }

    pub fn rotator(&self, args: &[&str]) -> Output {
        let mut a = vec!["--config", "rotator.toml"];
        a.extend_from_slice(args);
        self.s.rotator(&a)
    }

    pub async fn rotator_async(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        // The scratch's command: on its database, whichever the engine.
        let mut c = tokio::process::Command::from(self.s.command());
        c.args(["--config", "rotator.toml"]).args(args);
        c.envs(env.iter().copied());
        c.output().await.unwrap()
    }

    pub async fn admin_kubectl(&self, args: &[&str]) -> Output {
        let mut a = vec!["--kubeconfig", self.admin.to_str().unwrap()];
        a.extend_from_slice(args);
        run_async("kubectl", &a).await
    }

    pub async fn kubectl_as(&self, kubeconfig: &str, args: &[&str]) -> Output {
        let p = self.s.path(kubeconfig);
        let mut a = vec!["--kubeconfig", p.to_str().unwrap()];
        a.extend_from_slice(args);
        run_async("kubectl", &a).await
    }

    /// Whether `kubeconfig` may list pods in `ns`: Ok(true) allowed, Ok(false) Forbidden.
    pub async fn can_list_pods(&self, kubeconfig: &str, ns: &str) -> bool {
        let o = self
            .kubectl_as(kubeconfig, &["get", "pods", "-n", ns])
            .await;
        if o.status.success() {
            return true;
        }
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("Forbidden"),
            "expected a clean Forbidden, got: {e}"
        );
        false
    }

    pub async fn rotator_objects(&self) -> (String, String) {
        let rbs = self
            .admin_kubectl(&[
                "get",
                "rolebindings",
                "-A",
                "-l",
                "app.kubernetes.io/managed-by=rotator",
                "-o",
                "name",
            ])
            .await;
        let csrs = self.admin_kubectl(&["get", "csr", "-o", "name"]).await;
        (ok(&rbs).trim().to_string(), ok(&csrs).trim().to_string())
    }
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_user_grants_exactly_the_namespace_asked_for() {
    let kx = Kx::new(Options::default(), "").await;
    let out = ok(&kx
        .rotator_async(
            &[
                "add-user",
                "alice",
                "--group",
                "dev",
                "--namespace",
                "team-a",
                "--role",
                "view",
                "--ttl",
                "1h",
            ],
            &[],
        )
        .await);
    assert!(out.contains("generation 1"), "{out}");
    let who = ok(&kx
        .kubectl_as("alice.kubeconfig", &["auth", "whoami", "-o", "json"])
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
    // The generation group: generation 1, suffixed by the certificate key's digest.
    assert_eq!(
        rotator::policy::parse_generation_group("alice", groups[1]),
        Some(1),
        "{groups:?}"
    );
    assert!(groups[1].len() > "rotator:alice:1".len(), "{groups:?}");
    assert!(kx.can_list_pods("alice.kubeconfig", "team-a").await);
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-b").await);
    // The CSR is gone once the certificate is stored; the binding is labelled as rotator's.
    let (rbs, csrs) = kx.rotator_objects().await;
    assert_eq!(rbs, "rolebinding.rbac.authorization.k8s.io/rotator:alice");
    assert_eq!(csrs, "", "no CSR is left behind");
    // The certificate's lifetime is what was asked (the signer backdates by five minutes).
    let (server, _, cert, _) = kubeconfig_parts(&kx.s.path("alice.kubeconfig"));
    assert_eq!(
        server,
        kx.cluster.url(),
        "the server URL comes from the cluster's cluster-info"
    );
    let info = rotator::pki::parse_cert_pem(&cert, "t").unwrap();
    assert_eq!(info.lifetime_seconds(), 3600 + 300);
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_old_credential_for_the_grace_period_only() {
    grace_period_case(&Kx::new(Options::default(), GRACE_TOML).await).await;
}
}

pub const GRACE_TOML: &str = "[rotation]\ngrace_period = \"10m\"\n";

/// Signer-generic (kubernetes here, vault-pki in `vault_pki`): `kx` configured with [`GRACE_TOML`].
pub async fn grace_period_case(kx: &Kx) {
    // In process, with a clock the test moves.
    let clock = rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(
        &rotator::support::clock::SystemClock,
    ));
    let app = kx.app(&clock).await;
    let mut old = rotator::delivery::FileSink {
        path: kx.s.path("old.kubeconfig"),
    };
    app.issuer()
        .add_user(spec("alice"), &mut old, "test")
        .await
        .unwrap();
    clock.advance(60);
    let mut new = rotator::delivery::FileSink {
        path: kx.s.path("new.kubeconfig"),
    };
    let issued = app
        .issuer()
        .rotate("alice", &mut new, "test")
        .await
        .unwrap();
    assert_eq!(issued.credential.generation, 2);
    // spec() binds "edit" in team-a.
    assert!(kx.can_list_pods("new.kubeconfig", "team-a").await);
    assert!(
        kx.can_list_pods("old.kubeconfig", "team-a").await,
        "inside the grace period the old one still works"
    );
    clock.advance(9 * 60);
    rotator::flows::revoke::remove_stale_access(&app)
        .await
        .unwrap();
    assert!(
        kx.can_list_pods("old.kubeconfig", "team-a").await,
        "still inside the grace period"
    );
    clock.advance(2 * 60);
    assert_eq!(
        rotator::flows::revoke::remove_stale_access(&app)
            .await
            .unwrap(),
        1
    );
    assert!(
        !kx.can_list_pods("old.kubeconfig", "team-a").await,
        "after the grace period the old certificate is Forbidden"
    );
    assert!(kx.can_list_pods("new.kubeconfig", "team-a").await);
    // Nothing left to do on the next pass.
    assert_eq!(
        rotator::flows::revoke::remove_stale_access(&app)
            .await
            .unwrap(),
        0
    );
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_takes_access_away_at_once_and_remove_user_leaves_nothing() {
    revoke_case(&Kx::new(Options::default(), "").await).await;
}
}

/// Signer-generic (kubernetes here, vault-pki in `vault_pki`).
pub async fn revoke_case(kx: &Kx) {
    ok(&kx
        .rotator_async(
            &[
                "add-user", "alice", "-n", "team-a", "-n", "team-b", "--role", "view",
            ],
            &[],
        )
        .await);
    assert!(kx.can_list_pods("alice.kubeconfig", "team-a").await);
    ok(&kx.rotator_async(&["revoke", "alice"], &[]).await);
    // The certificate is still valid; every permission rotator granted is gone.
    let (_, _, cert, _) = kubeconfig_parts(&kx.s.path("alice.kubeconfig"));
    assert!(
        rotator::pki::parse_cert_pem(&cert, "t").unwrap().not_after
            > rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock)
    );
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-a").await);
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-b").await);
    // The revoke sticks: a plain rotate is refused; only a reinstatement issues.
    fails_with(&kx.rotator_async(&["rotate", "alice"], &[]).await, 4);
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-b").await);
    ok(&kx
        .rotator_async(&["rotate", "alice", "--reinstate"], &[])
        .await);
    assert!(kx.can_list_pods("alice.kubeconfig", "team-b").await);
    ok(&kx.rotator_async(&["remove-user", "alice"], &[]).await);
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-a").await);
    assert_eq!(
        kx.rotator_objects().await,
        (String::new(), String::new()),
        "no rotator object is left in the cluster"
    );
    let log = ok(&kx.rotator(&["audit", "log", "--user", "alice", "--output", "json"]));
    assert!(log.contains("rbac.sync"), "binding changes are audited");
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_api_failures_are_retried_and_a_crash_mid_issuance_leaves_one_credential() {
    let kx = Kx::new(Options::default(), "").await;
    let f = kx.cluster.faults();
    f.add(
        FaultRule::on(Some("POST"), "/certificatesigningrequests")
            .times(2)
            .action(FaultAction::Status(500)),
    );
    f.add(
        FaultRule::on(Some("PUT"), "/approval")
            .times(1)
            .action(FaultAction::TooManyRequests { retry_after: 0 }),
    );
    f.add(
        FaultRule::on(Some("PUT"), "/approval")
            .nth(2)
            .times(1)
            .action(FaultAction::Status(409)),
    );
    f.add(
        FaultRule::on(Some("POST"), "/rolebindings")
            .times(1)
            .action(FaultAction::Status(503)),
    );
    ok(&kx
        .rotator_async(
            &["add-user", "alice", "-n", "team-a", "--role", "view"],
            &[],
        )
        .await);
    assert!(
        f.fired() >= 4,
        "every fault was met and survived ({} fired)",
        f.fired()
    );
    assert!(kx.can_list_pods("alice.kubeconfig", "team-a").await);
    f.clear();

    // The process dies after the cluster signed and before the certificate is stored.
    let o = kx
        .rotator_async(
            &["rotate", "alice", "--out", "bob.kubeconfig"],
            &[("ROTATOR_FAULT", "after-sign:abort")],
        )
        .await;
    assert!(!o.status.success());
    let (_, csrs) = kx.rotator_objects().await;
    assert_ne!(csrs, "", "the interrupted issuance left its CSR behind");
    ok(&kx.rotator_async(&["rotate", "alice"], &[]).await);
    let (_, csrs) = kx.rotator_objects().await;
    assert_eq!(csrs, "", "the rerun removed the stray CSR");
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
            .await,
        1
    );
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials").await,
        2,
        "the lost certificate was never recorded as a credential"
    );
    assert_eq!(
        kx.s.count("SELECT MAX(generation) FROM credentials").await,
        3,
        "its generation was burnt"
    );
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denying_or_silent_signer_is_a_clear_error_in_bounded_time() {
    let kx = Kx::new(
        Options {
            signer_mode: SignerMode::Deny,
            ..Default::default()
        },
        "",
    )
    .await;
    let o = kx
        .rotator_async(
            &["add-user", "alice", "-n", "team-a", "--role", "view"],
            &[],
        )
        .await;
    let e = fails_with(&o, 8);
    assert!(e.contains("denied") && e.contains("fix:"), "{e}");
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM issuances WHERE step = 'failed'")
            .await,
        1
    );
    assert_eq!(kx.s.count("SELECT COUNT(*) FROM credentials").await, 0);
    assert_eq!(kx.rotator_objects().await, (String::new(), String::new()));

    kx.cluster.set_signer_mode(SignerMode::Never);
    let o = kx
        .rotator_async(&["add-user", "bob", "-n", "team-a", "--role", "view"], &[])
        .await;
    let e = fails_with(&o, 8);
    assert!(e.contains("not signed within 5s"), "{e}");
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM issuances WHERE step = 'failed' AND user_name = 'bob'")
            .await,
        1
    );
    assert_eq!(
        kx.rotator_objects().await.1,
        "",
        "the unsigned CSR is deleted"
    );
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_rotator_did_not_make_are_never_changed() {
    let kx = Kx::new(Options::default(), "").await;
    ok(&kx
        .admin_kubectl(&[
            "create",
            "rolebinding",
            "rotator:alice",
            "--clusterrole=admin",
            "--user=someone",
            "-n",
            "team-a",
        ])
        .await);
    let o = kx
        .rotator_async(
            &["add-user", "alice", "-n", "team-a", "--role", "view"],
            &[],
        )
        .await;
    let e = fails_with(&o, 6);
    assert!(e.contains("was not made by rotator"), "{e}");
    let rb = ok(&kx
        .admin_kubectl(&[
            "get",
            "rolebinding",
            "rotator:alice",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.roleRef.name} {.subjects[0].name}",
        ])
        .await);
    assert_eq!(rb, "admin someone");
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
            .await,
        0
    );
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_tokens_are_created_like_kubeadm_listed_revoked_and_expired() {
    let kx = Kx::new(Options::default(), "").await;
    let o = kx
        .rotator_async(
            &[
                "token",
                "create",
                "--ttl",
                "30m",
                "--description",
                "node join",
                "--groups",
                "system:bootstrappers:workers",
            ],
            &[],
        )
        .await;
    let token = ok(&o).trim().to_string();
    let (id, secret) = token.split_once('.').expect("id.secret");
    assert!(
        id.len() == 6
            && secret.len() == 16
            && token
                .bytes()
                .all(|b| b == b'.' || b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{token}"
    );
    // Only a hash of the secret is stored.
    let db = std::fs::read(kx.s.path("rotator-data/rotator.db")).unwrap();
    let wal = std::fs::read(kx.s.path("rotator-data/rotator.db-wal")).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&db).contains(secret)
            && !String::from_utf8_lossy(&wal).contains(secret)
    );
    // The Secret is what kubeadm would write.
    let data = ok(&kx
        .admin_kubectl(&[
            "get",
            "secret",
            &format!("bootstrap-token-{id}"),
            "-n",
            "kube-system",
            "-o",
            "json",
        ])
        .await);
    let v: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(v["type"], "bootstrap.kubernetes.io/token");
    use base64::Engine;
    let d = |k: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v["data"][k].as_str().unwrap_or_default())
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(d("token-id"), id);
    assert_eq!(
        (
            d("usage-bootstrap-authentication"),
            d("usage-bootstrap-signing")
        ),
        ("true".into(), "true".into())
    );
    assert_eq!(d("auth-extra-groups"), "system:bootstrappers:workers");
    assert!(d("expiration").ends_with('Z'));

    // kubectl authenticates with it (a kubeconfig holding only the token).
    kx.s.write("token.kubeconfig", &kx.cluster.kubeconfig_for_token(&token));
    let who = ok(&kx
        .kubectl_as("token.kubeconfig", &["auth", "whoami", "-o", "json"])
        .await);
    assert!(
        who.contains(&format!("system:bootstrap:{id}"))
            && who.contains("system:bootstrappers:workers"),
        "{who}"
    );

    // A token rotator did not make is listed as foreign, with its expiry.
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
    // rbac.yaml does not let rotator list kube-system Secrets: it lists its own
    // tokens and says foreign ones were not checked.
    let o = kx
        .rotator_async(&["token", "list", "--output", "json"], &[])
        .await;
    let list: Vec<serde_json::Value> = serde_json::from_str(&ok(&o)).unwrap();
    assert!(list.iter().any(|t| t["id"] == id) && !list.iter().any(|t| t["id"] == "abc123"));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("rbac-token-audit.yaml"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // With the optional rbac-token-audit.yaml it reports them.
    let audit = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/kubernetes/rbac-token-audit.yaml"
    );
    ok(&kx.admin_kubectl(&["apply", "-f", audit]).await);
    let list: Vec<serde_json::Value> = serde_json::from_str(&ok(&kx
        .rotator_async(&["token", "list", "--output", "json"], &[])
        .await))
    .unwrap();
    let ours = list.iter().find(|t| t["id"] == id).unwrap();
    let foreign = list.iter().find(|t| t["id"] == "abc123").unwrap();
    assert_eq!(
        (ours["foreign"].as_bool(), foreign["foreign"].as_bool()),
        (Some(false), Some(true))
    );
    assert_eq!(foreign["expires"], "never");

    ok(&kx.rotator_async(&["token", "revoke", id], &[]).await);
    let who = kx.kubectl_as("token.kubeconfig", &["auth", "whoami"]).await;
    assert!(!who.status.success() && String::from_utf8_lossy(&who.stderr).contains("Unauthorized"));
    fails_with(&kx.rotator_async(&["token", "revoke", id], &[]).await, 5);
    fails_with(
        &kx.rotator_async(&["token", "revoke", "abc123"], &[]).await,
        5,
    );

    // Policy: never-expiring and badly named tokens are refused before anything exists.
    let e = fails_with(
        &kx.rotator_async(&["token", "create", "--ttl", "0"], &[])
            .await,
        4,
    );
    assert!(e.contains("never expires"), "{e}");
    let e = fails_with(
        &kx.rotator_async(&["token", "create", "--groups", "system:masters"], &[])
            .await,
        4,
    );
    assert!(e.contains("system:bootstrappers:"), "{e}");
    let audit = ok(&kx.rotator(&["audit", "log", "--output", "json"]));
    assert!(
        audit.contains("token.create") && audit.contains("token.revoke") && !audit.contains(secret)
    );
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_deleted_by_the_expiry_pass_even_without_a_tokencleaner() {
    let kx = Kx::new(
        Options {
            token_cleaner: false,
            ..Default::default()
        },
        "",
    )
    .await;
    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::Clock::now(&rotator::support::clock::SystemClock));
    let app = kx.app(&clock).await;
    let req = rotator::flows::bootstrap_tokens::CreateToken {
        ttl: Some(std::time::Duration::from_secs(120)),
        ..Default::default()
    };
    let t = rotator::flows::bootstrap_tokens::create(&app, &req).await.unwrap();
    assert!(
        !format!("{t:?}").contains(t.token.split_once('.').unwrap().1),
        "Debug is redacted"
    );
    assert_eq!(rotator::flows::bootstrap_tokens::expire_pass(&app).await.unwrap(), 0);
    clock.advance(180);
    assert_eq!(rotator::flows::bootstrap_tokens::expire_pass(&app).await.unwrap(), 1);
    let gone = kx
        .admin_kubectl(&[
            "get",
            "secret",
            &format!("bootstrap-token-{}", t.id),
            "-n",
            "kube-system",
        ])
        .await;
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
    assert_eq!(
        rotator::flows::bootstrap_tokens::expire_pass(&app).await.unwrap(),
        0,
        "each token is deleted once"
    );
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_records_the_kubernetes_signer_and_doctor_checks_the_cluster() {
    let kx = &Kx::new(
        Options {
            max_signing_duration: std::time::Duration::from_secs(3600),
            ..Default::default()
        },
        "",
    )
    .await;
    let run = |args: &'static [&'static str]| async move {
        let mut a = vec!["--data-dir", "d2"];
        a.extend_from_slice(args);
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"));
        c.current_dir(kx.s.dir.path()).args(&a);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
            c.env_remove(k);
        }
        c.output().await.unwrap()
    };
    let init = ok(&run(&[
        "init",
        "--signer",
        "kubernetes",
        "--kubeconfig",
        "rotator.kubeconfig",
    ])
    .await);
    assert!(
        init.contains("kubernetes") && init.contains("kube-public/cluster-info"),
        "{init}"
    );
    // Later commands need no flags: the data directory remembers its signer.
    let out = ok(&run(&[
        "add-user", "alice", "-n", "team-a", "--role", "view", "--ttl", "2h",
    ])
    .await);
    assert!(
        out.contains("the signer granted"),
        "a shorter lifetime than asked is reported: {out}"
    );
    let e = fails_with(&run(&["--signer", "local-ca", "list-users"]).await, 3);
    assert!(e.contains("initialized with signer \"kubernetes\""), "{e}");
    let doc = ok(&run(&["doctor"]).await);
    assert!(
        doc.contains("its CA verifies the server") && doc.contains("no binding outside rotator"),
        "{doc}"
    );
    // A binding made by hand for alice would survive her revocation: doctor says so.
    ok(&kx
        .admin_kubectl(&[
            "create",
            "rolebinding",
            "direct",
            "--clusterrole=edit",
            "--user=alice",
            "-n",
            "team-b",
        ])
        .await);
    let o = run(&["doctor"]).await;
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    fails_with(&o, 6);
    assert!(
        stdout.contains("rolebinding team-b/direct -> User alice"),
        "{stdout}"
    );
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_living_longer_than_policy_allows_is_refused_and_discarded() {
    // An old API server drops expirationSeconds: the signer's one-year default comes back.
    let kx = Kx::new(
        Options {
            drop_expiration_seconds: true,
            ..Default::default()
        },
        "",
    )
    .await;
    let o = kx
        .rotator_async(
            &[
                "add-user", "alice", "-n", "team-a", "--role", "view", "--ttl", "1h",
            ],
            &[],
        )
        .await;
    let e = fails_with(&o, 9);
    assert!(e.contains("more than policy allows"), "{e}");
    assert_eq!(kx.s.count("SELECT COUNT(*) FROM credentials").await, 0);
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM issuances WHERE step = 'failed'")
            .await,
        1
    );
    assert!(!kx.s.path("alice.kubeconfig").exists());
    assert_eq!(
        kx.rotator_objects().await,
        (String::new(), String::new()),
        "no CSR and no binding is left"
    );
}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wide_access_only_where_policy_allows_it() {
    let kx = Kx::new(Options::default(), "").await;
    let e = fails_with(
        &kx.rotator_async(
            &["add-user", "ops", "--cluster-wide", "--role", "view"],
            &[],
        )
        .await,
        4,
    );
    assert!(e.contains("allow_cluster_role_bindings"), "{e}");

    let kx = Kx::new(
        Options::default(),
        "[policy]\nallow_cluster_role_bindings = true\n",
    )
    .await;
    ok(&kx
        .admin_kubectl(&[
            "create",
            "-f",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/deploy/kubernetes/rbac-cluster-wide.yaml"
            ),
        ])
        .await);
    ok(&kx
        .rotator_async(
            &["add-user", "ops", "--cluster-wide", "--role", "view"],
            &[],
        )
        .await);
    assert!(
        kx.can_list_pods("ops.kubeconfig", "team-a").await
            && kx.can_list_pods("ops.kubeconfig", "team-b").await
    );
    let crb = ok(&kx
        .admin_kubectl(&[
            "get",
            "clusterrolebindings",
            "-l",
            "app.kubernetes.io/managed-by=rotator",
            "-o",
            "name",
        ])
        .await);
    assert_eq!(
        crb.trim(),
        "clusterrolebinding.rbac.authorization.k8s.io/rotator:ops"
    );
    ok(&kx.rotator_async(&["revoke", "ops"], &[]).await);
    assert!(!kx.can_list_pods("ops.kubeconfig", "team-b").await);
    ok(&kx.rotator_async(&["remove-user", "ops"], &[]).await);
    let crb = ok(&kx
        .admin_kubectl(&[
            "get",
            "clusterrolebindings",
            "-l",
            "app.kubernetes.io/managed-by=rotator",
            "-o",
            "name",
        ])
        .await);
    assert_eq!(crb.trim(), "", "no rotator binding is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_server_has_kubeadms_one_ca_by_default_and_separate_cas_on_request() {
    for separate in [false, true] {
        let kx = Kx::new(
            Options {
                separate_client_ca: separate,
                ..Options::default()
            },
            "",
        )
        .await;
        assert_eq!(kx.cluster.ca_pem() == kx.cluster.client_ca_pem(), !separate);
        ok(&kx
            .rotator_async(
                &[
                    "add-user", "alice", "--group", "dev", "-n", "team-a", "--role", "view",
                ],
                &[],
            )
            .await);
        assert!(kx.can_list_pods("alice.kubeconfig", "team-a").await);
        let (_, ca, cert, _) = kubeconfig_parts(&kx.s.path("alice.kubeconfig"));
        let ca = kx.s.write("kubeconfig-ca.pem", &ca);
        let client_ca = kx.s.write("client-ca.pem", kx.cluster.client_ca_pem());
        let cert = kx.s.write("alice.pem", &cert);
        let verify = |ca: &std::path::Path| {
            run(
                "openssl",
                &[
                    "verify",
                    "-CAfile",
                    ca.to_str().unwrap(),
                    cert.to_str().unwrap(),
                ],
            )
            .status
            .success()
        };
        // kubeadm: the kubeconfig's certificate-authority-data also verifies
        // the issued client certificate; with separate CAs only the client CA does.
        assert_eq!(verify(&ca), !separate, "separate={separate}");
        assert!(verify(&client_ca));
        // The signer re-encodes the subject in Go's order: O before CN.
        let subject = ok(&run(
            "openssl",
            &[
                "x509",
                "-noout",
                "-subject",
                "-nameopt",
                "oneline",
                "-in",
                cert.to_str().unwrap(),
            ],
        ));
        assert!(
            subject
                .trim()
                .trim_start_matches("subject=")
                .trim()
                .starts_with("O = dev")
                && subject.trim().ends_with("CN = alice"),
            "{subject}"
        );
    }
}
