//! Flow 2 end to end: the HTTPS user API in process (over the kubernetes signer
//! and the test server), the real `rotator fetch` / `rotator credential`
//! binaries on the user's side, and the real kubectl as the user's client.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rotator::app::App;
use rotator::client::{ApiClient, ClientError};
use rotator::pki::{self, KeyType, PrivateKey};
use rotator::support::clock::{Clock, ManualClock, SystemClock};
use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;

/// The user API in process over the kubernetes signer (`Kx`): the test
/// cluster's CSR API signs, so the tests built on it have no local-ca signing
/// variants (no local CA key is involved; #12 is about that key). The local-ca
/// user API, in process and through a real `rotator signer`, is
/// `a_real_daemon_with_the_local_ca_serves_enrollment_and_renewal`.
struct Api {
    kx: Kx,
    app: Arc<App>,
    clock: ManualClock,
    addr: SocketAddr,
    server_ca: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    served: tokio::task::JoinHandle<()>,
}

/// A throwaway CA in `dir`, made by rotator's own local-CA code.
fn make_ca(dir: &std::path::Path, name: &str) -> rotator::signer::LocalCa {
    let settings = rotator::config::LocalCaSettings {
        cert_file: dir.join(format!("{name}.crt")),
        key_file: dir.join(format!("{name}.key")),
        configured: true,
        socket: None,
        common_name: name.into(),
        validity: Duration::from_secs(86_400),
    };
    rotator::signer::LocalCa::create(&settings, Arc::new(SystemClock)).unwrap()
}

impl Api {
    async fn start() -> Self {
        Self::start_with("rate_limit_per_address = 1000\nrate_limit_per_user = 1000\n").await
    }

    /// `limits`: the `[server]` rate-limit keys.
    async fn start_with(limits: &str) -> Self {
        // The API's serving certificate comes from a CA the user is handed.
        let pre = Scratch::new();
        let ca = make_ca(pre.dir.path(), "serving-ca");
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let cert = ca
            .issue_server(&key, &["127.0.0.1".into()], Duration::from_secs(3600))
            .unwrap();
        let kx = Kx::new(
            Options::default(),
            &format!(
                "[server]\ntls_cert = {:?}\ntls_key = {:?}\n{limits}",
                pre.write("tls.crt", &cert),
                pre.write("tls.key", &key.to_pem()),
            ),
        )
        .await;
        let server_ca = kx.s.write("server-ca.pem", ca.certificate_pem());
        std::mem::forget(pre); // keeps the serving key's directory for the test's life
        let clock = ManualClock::new(SystemClock.now());
        let app = kx.app(&clock).await;
        let tls = rotator::daemon::api::server_config(&app).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_apps_tx, apps) = tokio::sync::watch::channel(app.clone());
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let served = tokio::spawn(rotator::daemon::api::serve(
            listener,
            tls,
            apps,
            async move {
                let _ = stopped.changed().await;
            },
        ));
        Api {
            kx,
            app,
            clock,
            addr,
            server_ca,
            stop,
            served,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `rotator add-user NAME ... --enroll`, returning the printed token.
    async fn enroll_user(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "--output", "json", "add-user", name, "--group", "dev", "-n", "team-a", "--role",
            "view", "--enroll",
        ];
        args.extend_from_slice(extra);
        let out = ok(&self.kx.rotator_async(&args, &[]).await);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// The real `rotator fetch` as the user runs it, with its own state dir and kubeconfig.
    async fn fetch(&self, home: &str, extra: &[&str]) -> std::process::Output {
        let state = self.kx.s.path(&format!("{home}/state"));
        let kubeconfig = self.kx.s.path(&format!("{home}/kube/config"));
        let url = self.url();
        let mut args = vec![
            "fetch",
            "--server",
            &url,
            "--server-ca",
            self.server_ca.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.kx.rotator_async(&args, &[]).await
    }

    fn client(&self, identity: Option<(&str, &str)>) -> ApiClient {
        let ca = std::fs::read_to_string(&self.server_ca).unwrap();
        ApiClient::new(&self.url(), Some(&ca), identity, Duration::from_secs(10)).unwrap()
    }

    async fn credentials_of(&self, user: &str) -> Vec<rotator::store::credentials::Credential> {
        rotator::store::credentials::list_for_user(&self.app.store, user)
            .await
            .unwrap()
    }

    async fn audit_count(&self, action: &str, code: &str) -> usize {
        rotator::store::audit::list(&self.app.store, None, 100_000)
            .await
            .unwrap()
            .iter()
            .filter(|e| e.action == action && e.detail.contains(code))
            .count()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.served.await;
    }
}

fn cached(api: &Api, home: &str) -> rotator::client::Cached {
    let dir = rotator::client::ServerDir::for_server(
        &api.kx.s.path(&format!("{home}/state")),
        &api.url(),
    )
    .unwrap();
    dir.credential().unwrap().expect("a cached credential")
}

/// A CSR with any subject and key, as a hostile or confused client might send.
/// A CSR for `cn` with `orgs`; a generation group written `rotator:CN:N` gets
/// the suffix of this CSR's key, as `rotator fetch` would make it.
fn csr(cn: &str, orgs: &[&str], key_type: KeyType) -> String {
    let key = PrivateKey::generate(key_type).unwrap();
    let orgs: Vec<String> = orgs
        .iter()
        .map(|o| match rotator::policy::parse_generation_group(cn, o) {
            Some(g) if !o.contains('.') => {
                rotator::policy::generation_group(cn, g, &key.spki_der())
            }
            _ => o.to_string(),
        })
        .collect();
    let der = pki::build_csr(&key, &pki::subject_name(cn, &orgs).unwrap()).unwrap();
    pki::pem_encode("CERTIFICATE REQUEST", &der)
}

fn refused(r: Result<serde_json::Value, ClientError>) -> rotator::flows::self_service::ApiError {
    match r {
        Err(ClientError::Refused(e)) => e,
        other => panic!("expected a refusal from the server, got {other:?}"),
    }
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_with_a_token_then_kubectl_works_and_the_token_is_single_use() {
    let api = Api::start().await;
    let token = api.enroll_user("alice", &[]).await;
    // The user's kubeconfig already has another cluster; it must survive the merge.
    std::fs::create_dir_all(api.kx.s.path("alice/kube")).unwrap();
    std::fs::copy(&api.kx.admin, api.kx.s.path("alice/kube/config")).unwrap();
    let before = std::fs::read_to_string(api.kx.s.path("alice/kube/config")).unwrap();

    let out = ok(&api.fetch("alice", &["--token", &token]).await);
    assert!(out.contains("fetched alice generation 1"), "{out}");
    let merged = api.kx.s.path("alice/kube/config");
    assert_eq!(mode(&merged), 0o600);
    assert_eq!(
        std::fs::read_to_string(api.kx.s.path("alice/kube/config.rotator-backup")).unwrap(),
        before,
        "the backup is the file as it was"
    );
    let kubeconfig = merged.to_str().unwrap();
    ok(&api
        .kx
        .kubectl_as(kubeconfig, &["get", "pods", "-n", "team-a"])
        .await);
    assert!(!api.kx.can_list_pods(kubeconfig, "team-b").await);
    let who = ok(&api
        .kx
        .kubectl_as(
            kubeconfig,
            &[
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )
        .await);
    assert_eq!(who, "alice");
    let contexts = ok(&api
        .kx
        .kubectl_as(kubeconfig, &["config", "get-contexts", "-o", "name"])
        .await);
    assert!(
        contexts.lines().count() == 2 && contexts.contains("alice@test"),
        "{contexts}"
    );
    // The key was made on the user's side: the server never stored one.
    let creds = api.credentials_of("alice").await;
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].state, "current");
    let c = cached(&api, "alice");
    assert_eq!(c.serial, creds[0].serial);
    assert_eq!(
        mode(
            &api.kx
                .s
                .path("alice/state")
                .join(format!("127.0.0.1_{}", api.addr.port()))
                .join("credential.json")
        ),
        0o600
    );
    let key_line = c.key.lines().nth(1).unwrap().to_string();
    let secret = token.split_once('.').unwrap().1.to_string();
    // On SQLite the file and its WAL byte for byte; on PostgreSQL every row of
    // every table, as text.
    let stored: Vec<(String, String)> = match api.kx.s.engine() {
        Engine::Sqlite => ["rotator.db", "rotator.db-wal"]
            .iter()
            .map(|f| {
                let db = std::fs::read(api.kx.s.path(&format!("rotator-data/{f}")))
                    .unwrap_or_default();
                (f.to_string(), String::from_utf8_lossy(&db).into_owned())
            })
            .collect(),
        Engine::Postgres => pg_rows_as_text(&api.kx.s).await,
    };
    assert!(
        stored.iter().any(|(_, text)| text.contains("alice")),
        "the check reads the stored data"
    );
    for (f, text) in &stored {
        assert!(
            !text.contains(&key_line),
            "the client's key reached the server's {f}"
        );
        assert!(
            !text.contains(&secret),
            "the token's secret is stored in plain text in {f}"
        );
    }

    // Used once: a second enrollment with it (another machine, another key) is refused.
    let second = api.fetch("mallory", &["--token", &token]).await;
    let err = fails_with(&second, 4);
    assert!(err.contains("token_used"), "{err}");
    assert!(
        !api.kx.s.path("mallory/kube/config").exists(),
        "nothing written on refusal"
    );
    assert_eq!(api.credentials_of("alice").await.len(), 1);

    // Expired: bob's token outlives its hour only on paper.
    let bob = api.enroll_user("bob", &[]).await;
    // The token was made by the CLI on the real clock, which has moved on since
    // the manual one started (seconds, on a loaded machine).
    api.clock.set(SystemClock.now() + 3601);
    let late = api.fetch("bob", &["--token", &bob]).await;
    let err = fails_with(&late, 4);
    assert!(err.contains("token_expired"), "{err}");
    assert!(api.credentials_of("bob").await.is_empty());
    // Every call is audited, refusals included.
    assert_eq!(api.audit_count("api.refuse", "token_used").await, 1);
    assert_eq!(api.audit_count("api.refuse", "token_expired").await, 1);
    assert!(api.audit_count("api.call", "/v1/enroll").await >= 1);
    api.stop().await;
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_needs_the_current_certificate_of_an_active_user_from_our_ca() {
    let api = Api::start().await;
    let token = api.enroll_user("alice", &[]).await;
    ok(&api.fetch("alice", &["--token", &token]).await);
    let first = cached(&api, "alice");

    // Renew with mutual TLS: same command, no token.
    let out = ok(&api.fetch("alice", &[]).await);
    assert!(out.contains("generation 2"), "{out}");
    let second = cached(&api, "alice");
    assert_ne!(first.serial, second.serial);
    let kubeconfig = api.kx.s.path("alice/kube/config");
    ok(&api
        .kx
        .kubectl_as(
            kubeconfig.to_str().unwrap(),
            &["get", "pods", "-n", "team-a"],
        )
        .await);
    let creds = api.credentials_of("alice").await;
    let states: Vec<&str> = creds.iter().map(|c| c.state.as_str()).collect();
    assert_eq!(states, ["superseded", "current"]);
    assert_eq!(creds[1].renewed_from.as_deref(), Some(creds[0].id.as_str()));

    // The superseded certificate still chains to the CA, but may not renew.
    let old = api.client(Some((&first.certificate, &first.key)));
    let e = refused(old.post("/v1/renew", &serde_json::json!({"csr": csr("alice", &["dev", "rotator:alice:3"], KeyType::EcdsaP256)})).await);
    assert_eq!(
        (e.status, e.code.as_str()),
        (403, "credential_not_current"),
        "{e:?}"
    );
    assert!(
        e.message.contains("a newer credential replaced it"),
        "{}",
        e.message
    );

    // A revoked user's current certificate is refused too.
    ok(&api.kx.rotator_async(&["revoke", "alice"], &[]).await);
    let cur = api.client(Some((&second.certificate, &second.key)));
    let e = refused(cur.post("/v1/renew", &serde_json::json!({"csr": csr("alice", &["dev", "rotator:alice:3"], KeyType::EcdsaP256)})).await);
    assert_eq!((e.status, e.code.as_str()), (403, "credential_not_current"));
    assert!(e.message.contains("revoked"), "{}", e.message);
    // The user's revocation sticks, and the refusal says so.
    assert!(
        e.message.contains("user \"alice\" was revoked at") && e.message.contains("reinstates"),
        "{}",
        e.message
    );
    let err = fails_with(&api.fetch("alice", &[]).await, 4);
    assert!(err.contains("credential_not_current"), "{err}");
    assert_eq!(api.credentials_of("alice").await.len(), 2, "nothing issued");

    // A certificate for "alice" from any other CA never gets past the handshake.
    let scratch = Scratch::new();
    let foreign = make_ca(scratch.dir.path(), "foreign");
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let orgs = vec![
        "dev".to_string(),
        rotator::policy::generation_group("alice", 2, &key.spki_der()),
    ];
    let der = pki::build_csr(&key, &pki::subject_name("alice", &orgs).unwrap()).unwrap();
    let cert = foreign
        .issue(
            &rotator::signer::SignRequest {
                credential_id: "x",
                user: "alice",
                organizations: &orgs,
                csr_der: &der,
                ttl: Duration::from_secs(3600),
            },
            pki::CertProfile::Client,
        )
        .unwrap();
    let forged = api.client(Some((&cert, &key.to_pem())));
    match forged
        .post::<serde_json::Value>("/v1/subject", &serde_json::json!({}))
        .await
    {
        Err(ClientError::Tls(_)) | Err(ClientError::Unreachable { .. }) => {}
        other => panic!("a foreign certificate got an HTTP answer: {other:?}"),
    }
    api.stop().await;
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_with_the_exec_plugin_keeps_working_across_renewals() {
    let api = Api::start().await;
    let token = api.enroll_user("carol", &["--ttl", "10m"]).await;
    // Renewing whenever less than 10 minutes are left means every run renews.
    ok(&api
        .fetch(
            "carol",
            &["--token", &token, "--exec", "--renew-before", "10m"],
        )
        .await);
    let kubeconfig = api.kx.s.path("carol/kube/config");
    let text = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(
        text.contains("client.authentication.k8s.io/v1") && !text.contains("client-key-data"),
        "{text}"
    );
    let mut last = 1;
    for _ in 0..3 {
        ok(&api
            .kx
            .kubectl_as(
                kubeconfig.to_str().unwrap(),
                &["get", "pods", "-n", "team-a"],
            )
            .await);
        let creds = api.credentials_of("carol").await;
        let current = creds.iter().find(|c| c.state == "current").unwrap();
        assert!(current.generation > last, "kubectl ran without a renewal");
        last = current.generation;
        assert_eq!(cached(&api, "carol").serial, current.serial);
    }
    // The plugin on its own speaks ExecCredential v1.
    let state = api.kx.s.path("carol/state");
    let url = api.url();
    let plugin = |info: &'static str| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_rotator"));
        c.args([
            "credential",
            "--server",
            &url,
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .env("KUBERNETES_EXEC_INFO", info);
        c.output().unwrap()
    };
    let o = plugin(
        r#"{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","spec":{"interactive":false}}"#,
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["kind"], "ExecCredential");
    assert!(
        v["status"]["clientCertificateData"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE")
    );
    assert!(
        v["status"]["clientKeyData"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert!(
        v["status"]["expirationTimestamp"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    fails_with(
        &plugin(r#"{"apiVersion":"client.authentication.k8s.io/v9"}"#),
        2,
    );

    // The server goes away: kubectl still works on the cached, still-valid credential.
    let last_cached = cached(&api, "carol").certificate;
    let server_gone = api.stop.send(true);
    assert!(server_gone.is_ok());
    let _ = api.served.await;
    let o = api
        .kx
        .kubectl_as(
            kubeconfig.to_str().unwrap(),
            &["get", "pods", "-n", "team-a"],
        )
        .await;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("could not renew"), "the user is told: {err}");

    // That failure is remembered (0600) so the next kubectl calls do not wait
    // for the server again (tested below); forgotten here so this one tries.
    let memory = rotator::client::ServerDir::for_server(&state, &url)
        .unwrap()
        .path
        .join("renew-failed.json");
    assert_eq!(mode(&memory), 0o600);
    std::fs::remove_file(&memory).unwrap();

    // Something answers TCP on the server's port and then says nothing: the
    // plugin gives up at its deadline and still answers.
    let hole = tokio::net::TcpListener::bind(api.addr).await.unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = hole.accept().await {
            conns.push(c);
        }
    });
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"));
    c.args([
        "credential",
        "--server",
        &url,
        "--state-dir",
        state.to_str().unwrap(),
        "--timeout",
        "2s",
        "--renew-before",
        "10m",
    ]);
    let started = std::time::Instant::now();
    let o = c.output().await.unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no answer within 2s"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["status"]["clientCertificateData"].as_str().unwrap(),
        last_cached
    );
    // The process itself ends by its deadline, not only its answer.
    eprintln!("credential --timeout 2s against a server that never answers exited after {took:?}");
    assert!(took < Duration::from_millis(2900), "exited after {took:?}");
    // The next call, still against the silent server, answers at once from the
    // cache: the failure is remembered for a minute.
    let started = std::time::Instant::now();
    let o = c.output().await.unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("the last renewal failed") && err.contains("no answer within 2s"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["status"]["clientCertificateData"].as_str().unwrap(),
        last_cached
    );
    eprintln!("the call after it, within the minute, took {took:?}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    held.abort();
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_enrollment_is_finished_by_a_rerun_with_the_same_key() {
    let api = Api::start().await;
    let token = api.enroll_user("erin", &[]).await;
    let f = api.kx.cluster.faults();
    // The cluster refuses to create the CSR: the enrollment fails server-side.
    f.add(
        testcluster::FaultRule::on(Some("POST"), "/certificatesigningrequests")
            .times(1)
            .action(testcluster::FaultAction::Status(403)),
    );
    let first = api.fetch("erin", &["--token", &token]).await;
    let err = fails_with(&first, 12);
    assert!(err.contains("internal"), "{err}");
    assert_eq!(f.fired(), 1);
    let dir =
        rotator::client::ServerDir::for_server(&api.kx.s.path("erin/state"), &api.url()).unwrap();
    let pending = dir
        .pending()
        .unwrap()
        .expect("the request is kept for the rerun");
    assert!(dir.credential().unwrap().is_none());
    assert!(!api.kx.s.path("erin/kube/config").exists());
    assert_eq!(
        api.kx
            .s
            .count("SELECT COUNT(*) FROM issuances WHERE user_name = 'erin' AND step = 'failed'")
            .await,
        1
    );

    // The same command again: the token is still good for the same key.
    ok(&api.fetch("erin", &["--token", &token]).await);
    let c = cached(&api, "erin");
    assert_eq!(
        *c.key, *pending.key,
        "the rerun finished the same request, with the same key"
    );
    assert!(dir.pending().unwrap().is_none());
    let creds = api.credentials_of("erin").await;
    assert_eq!(creds.len(), 1);
    assert_eq!(creds[0].state, "current");
    let (_, csrs) = api.kx.rotator_objects().await;
    assert!(csrs.is_empty(), "no stray CSR: {csrs}");
    ok(&api
        .kx
        .kubectl_as(
            api.kx.s.path("erin/kube/config").to_str().unwrap(),
            &["get", "pods", "-n", "team-a"],
        )
        .await);
    api.stop().await;
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_4xx_and_change_nothing() {
    let api = Api::start().await;
    let token = api.enroll_user("alice", &[]).await;
    let anon = api.client(None);
    let raw = |path: &'static str, ct: &'static str, body: Vec<u8>| {
        let anon = &anon;
        async move {
            let (status, body) = anon.post_raw(path, ct, body).await.unwrap();
            let v: serde_json::Value =
                serde_json::from_slice(&body).unwrap_or_else(|_| panic!("{path}: not JSON"));
            (
                status,
                v["error"]["code"].as_str().unwrap_or_default().to_string(),
                v["error"]["fix"].as_str().unwrap_or_default().to_string(),
            )
        }
    };
    let json = "application/json";
    let good_csr = |orgs: &[&str], kt| csr("alice", orgs, kt);
    let cases: Vec<(&str, u16, &str, Vec<u8>)> = vec![
        ("/v1/enroll", 400, "bad_request", b"garbage{".to_vec()),
        ("/v1/enroll", 400, "bad_request", br#"{"token": 5}"#.to_vec()),
        ("/v1/enroll", 413, "body_too_large", vec![b' '; 100_000]),
        ("/v1/enroll", 400, "malformed_token", serde_json::to_vec(&serde_json::json!({"token": "abc", "csr": good_csr(&["dev", "rotator:alice:1"], KeyType::EcdsaP256)})).unwrap()),
        ("/v1/enroll", 400, "malformed_csr", serde_json::to_vec(&serde_json::json!({"token": token, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"})).unwrap()),
        ("/v1/enroll", 403, "subject_not_allowed", serde_json::to_vec(&serde_json::json!({"token": token, "csr": csr("bob", &["dev", "rotator:bob:1"], KeyType::EcdsaP256)})).unwrap()),
        ("/v1/enroll", 403, "subject_not_allowed", serde_json::to_vec(&serde_json::json!({"token": token, "csr": good_csr(&["dev", "system:masters", "rotator:alice:1"], KeyType::EcdsaP256)})).unwrap()),
        ("/v1/enroll", 422, "key_type_not_allowed", serde_json::to_vec(&serde_json::json!({"token": token, "csr": good_csr(&["dev", "rotator:alice:1"], KeyType::Rsa2048)})).unwrap()),
        ("/v1/enroll", 409, "generation_stale", serde_json::to_vec(&serde_json::json!({"token": token, "csr": good_csr(&["dev", "rotator:alice:7"], KeyType::EcdsaP256)})).unwrap()),
        ("/v1/renew", 401, "client_certificate_required", serde_json::to_vec(&serde_json::json!({"csr": good_csr(&["dev", "rotator:alice:1"], KeyType::EcdsaP256)})).unwrap()),
        ("/v1/subject", 401, "token_invalid", serde_json::to_vec(&serde_json::json!({"token": format!("{}.{}", &token[..12], "A".repeat(43))})).unwrap()),
        ("/v1/nothing", 404, "not_found", b"{}".to_vec()),
    ];
    let refusals = cases.len();
    for (path, status, code, body) in cases {
        let (got, got_code, fix) = raw(path, json, body).await;
        assert_eq!((got, got_code.as_str()), (status, code), "{path} {code}");
        assert!(!fix.is_empty(), "{code}: every refusal says what to do");
    }
    let (s, c, _) = raw("/v1/enroll", "text/plain", b"{}".to_vec()).await;
    assert_eq!((s, c.as_str()), (415, "unsupported_media_type"));
    // Nothing was issued, no token was burnt, every refusal was accounted for,
    // and the server is still there: the real enrollment goes through. The four
    // that presented alice's valid token are audited one row each; the other
    // nine proved no identity and are counted for the summary (below).
    assert!(api.credentials_of("alice").await.is_empty());
    assert_eq!(
        api.kx
            .s
            .count("SELECT COUNT(*) FROM enrollment_tokens WHERE state = 'active'")
            .await,
        1
    );
    let authenticated = 4;
    assert_eq!(
        api.kx
            .s
            .count("SELECT COUNT(*) FROM audit_events WHERE action = 'api.refuse'")
            .await as usize,
        authenticated
    );
    ok(&api.fetch("alice", &["--token", &token]).await);
    assert_eq!(api.credentials_of("alice").await.len(), 1);
    let (_, csrs) = api.kx.rotator_objects().await;
    assert!(csrs.is_empty(), "no CSR left in the cluster: {csrs}");
    let metrics = rotator::daemon::health::metrics_text(&api.app).await.unwrap();
    for series in [
        r#"rotator_api_requests_total{endpoint="/v1/enroll",outcome="ok"} 1"#,
        r#"rotator_api_requests_total{endpoint="/v1/enroll",outcome="403"} 2"#,
        r#"rotator_api_requests_total{endpoint="other",outcome="404"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    let mut api = api;
    let _ = api.stop.send(true);
    (&mut api.served).await.unwrap();
    let summary = rotator::store::audit::list(&api.app.store, None, 1000)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.action == "api.refusals")
        .expect("a summary of the unauthenticated refusals");
    let d: serde_json::Value = serde_json::from_str(&summary.detail).unwrap();
    assert_eq!(
        d["total"].as_u64(),
        Some((refusals + 1 - authenticated) as u64),
        "{d}"
    );
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_is_replayed_and_floods_are_rate_limited() {
    let api = Api::start().await;
    let token = api.enroll_user("dave", &[]).await;
    let anon = api.client(None);
    let subject: rotator::flows::self_service::SubjectResponse = anon
        .post("/v1/subject", &serde_json::json!({"token": token}))
        .await
        .unwrap();
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let mut orgs_owned: Vec<String> = subject.organizations.clone();
    orgs_owned.push(rotator::policy::generation_group(
        "dave",
        subject.generation,
        &key.spki_der(),
    ));
    let der = pki::build_csr(&key, &pki::subject_name("dave", &orgs_owned).unwrap()).unwrap();
    let pem = pki::pem_encode("CERTIFICATE REQUEST", &der);
    let body = serde_json::json!({"token": token, "csr": pem});
    let first: rotator::flows::self_service::Grant = anon.post("/v1/enroll", &body).await.unwrap();
    // The client never saw that answer and retries with the same key: same certificate.
    let again: rotator::flows::self_service::Grant = anon.post("/v1/enroll", &body).await.unwrap();
    assert_eq!(again.serial, first.serial);
    assert!(again.replayed && !first.replayed);
    assert_eq!(
        api.credentials_of("dave").await.len(),
        1,
        "no duplicate credential"
    );
    api.stop().await;

    // Per-address limit: the burst passes, the next request is told when to come back.
    let api = Api::start_with("rate_limit_per_address = 3\n").await;
    let c = api.client(None);
    for _ in 0..3 {
        let (s, _) = c
            .post_raw("/v1/subject", "application/json", b"{}".to_vec())
            .await
            .unwrap();
        assert_eq!(s, 401);
    }
    let (s, body) = c
        .post_raw("/v1/subject", "application/json", b"{}".to_vec())
        .await
        .unwrap();
    assert_eq!(s, 429, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("rate_limited"));
    api.stop().await;

    // Per-user limit: one user's requests run out while the address has plenty.
    let api = Api::start_with("rate_limit_per_address = 1000\nrate_limit_per_user = 2\n").await;
    let token = api.enroll_user("gina", &[]).await;
    let c = api.client(None);
    let body = serde_json::json!({ "token": token });
    for _ in 0..2 {
        c.post::<serde_json::Value>("/v1/subject", &body)
            .await
            .unwrap();
    }
    let e = refused(c.post("/v1/subject", &body).await);
    assert_eq!((e.status, e.code.as_str()), (429, "rate_limited"));
    assert!(e.message.contains("for user gina"), "{}", e.message);
    // Another user is not held back by gina's bucket.
    let other = api.enroll_user("hank", &[]).await;
    c.post::<serde_json::Value>("/v1/subject", &serde_json::json!({ "token": other }))
        .await
        .unwrap();
    api.stop().await;
}
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

signing_variants! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_real_daemon_with_the_local_ca_serves_enrollment_and_renewal(signing: Signing) {
        let s = Scratch::signing(signing);
        // In process the daemon issues its serving certificate from the local CA;
        // the signer signs client certificates only, so with it the API is given one.
        let serving = s.signer.as_ref().map(|_| {
            let ca = make_ca(s.dir.path(), "serving-ca");
            let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
            let cert = ca
                .issue_server(&key, &["127.0.0.1".into()], Duration::from_secs(3600))
                .unwrap();
            (
                s.write("tls.crt", &cert),
                s.write("tls.key", &key.to_pem()),
                s.write("serving-ca.crt", ca.certificate_pem()),
            )
        });
        let server_ca = match &serving {
            Some((_, _, ca)) => ca.clone(),
            None => s.path("data/ca/ca.crt"),
        };
        let (api_port, metrics_port) = (free_port(), free_port());
        let api_addr = format!("127.0.0.1:{api_port}");
        let metrics_addr = format!("127.0.0.1:{metrics_port}");
        ok(&s.rotator(&["--data-dir", "data", "init"]));
        // The scratch's command: its database (engine) and signer socket.
        let mut daemon = tokio::process::Command::from(s.command());
        if let Some((cert, key, _)) = &serving {
            daemon
                .env("ROTATOR_SERVER__TLS_CERT", cert)
                .env("ROTATOR_SERVER__TLS_KEY", key);
        }
        let mut daemon = daemon
            .args([
                "--data-dir",
                "data",
                "serve",
                "--log-format",
                "json",
                "--api-addr",
                &api_addr,
                "--metrics-addr",
                &metrics_addr,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(daemon.stderr.take().unwrap()).lines();
        let mut up = false;
        while let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
        {
            if l.contains("user API (HTTPS)") {
                up = true;
                break;
            }
        }
        assert!(up, "the daemon announced its user API");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if serving.is_none() {
            // The serving certificate was issued by the local CA, its key kept private.
            assert_eq!(mode(&s.path("data/server/tls.key")), 0o600);
        }

        let out = ok(&s.rotator(&[
            "--data-dir",
            "data",
            "--output",
            "json",
            "add-user",
            "frank",
            "-n",
            "team-a",
            "--role",
            "view",
            "--enroll",
        ]));
        let token = serde_json::from_str::<serde_json::Value>(&out).unwrap()["token"]
            .as_str()
            .unwrap()
            .to_string();
        let url = format!("https://{api_addr}");
        let fetch = |extra: &[&str]| {
            let mut a = vec![
                "fetch",
                "--server",
                &url,
                "--server-ca",
                server_ca.to_str().unwrap(),
                "--state-dir",
                "state",
                "--kubeconfig",
                "kube/config",
            ];
            a.extend_from_slice(extra);
            s.rotator(&a)
        };
        assert!(ok(&fetch(&["--token", &token])).contains("generation 1"));
        // Renewal over mutual TLS; the server CA was remembered, so it is not needed again.
        let out = ok(&s.rotator(&[
            "fetch",
            "--server",
            &url,
            "--state-dir",
            "state",
            "--kubeconfig",
            "kube/config",
        ]));
        assert!(out.contains("generation 2"), "{out}");
        let (server, _ca, cert, key) = kubeconfig_parts(&s.path("kube/config"));
        assert_eq!(server, "https://127.0.0.1:6443");
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        // openssl agrees the certificate chains to the local CA and names generation 2.
        std::fs::write(s.path("frank.crt"), &cert).unwrap();
        let v = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                s.ca_cert("data").to_str().unwrap(),
                s.path("frank.crt").to_str().unwrap(),
            ],
        );
        ok(&v);
        let subject = ok(&run(
            "openssl",
            &[
                "x509",
                "-noout",
                "-subject",
                "-in",
                s.path("frank.crt").to_str().unwrap(),
            ],
        ));
        assert!(
            subject.contains("rotator:frank:2.") && subject.contains("CN = frank"),
            "{subject}"
        );

        std::process::Command::new("kill")
            .args(["-TERM", &daemon.id().unwrap().to_string()])
            .status()
            .unwrap();
        assert!(daemon.wait().await.unwrap().success());
        s.assert_signed("data", 2);
    }
}

/// HTTPS from a chosen loopback source address, below `ApiClient`: the tests of
/// the listener's limits need to be another client (127.0.0.2 …) than the
/// flood (127.0.0.1), and to send requests no well-behaved client would.
pub mod raw {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::net::TcpSocket;

    pub type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    pub fn config(server_ca: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let roots = rotator::pki::root_store(server_ca).unwrap();
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut c = match identity {
            Some((cert, key)) => b
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .collect::<Result<_, _>>()
                        .unwrap(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }

    pub async fn tcp(from: &str, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let s = TcpSocket::new_v4()?;
        s.bind(format!("{from}:0").parse().unwrap())?;
        s.connect(to).await
    }

    pub async fn tls(
        from: &str,
        to: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Tls> {
        let t = tcp(from, to).await?;
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("127.0.0.1").unwrap(), t)
            .await
    }

    /// A kept-alive HTTP/1.1 connection that reconnects when the server closed it.
    pub struct Conn {
        from: String,
        to: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
        pub connects: usize,
    }

    impl Conn {
        pub fn new(from: &str, to: SocketAddr, config: Arc<rustls::ClientConfig>) -> Self {
            Self {
                from: from.into(),
                to,
                config,
                sender: None,
                connects: 0,
            }
        }

        /// One request; the status and the body. Errors are the transport's.
        pub async fn send(
            &mut self,
            method: &str,
            path: &str,
            content_type: &str,
            body: Vec<u8>,
        ) -> Result<(u16, String), String> {
            let ready = match self.sender.as_mut() {
                Some(s) => s.ready().await.is_ok(),
                None => false,
            };
            if !ready {
                let t = tls(&self.from, self.to, &self.config)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let (s, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(t))
                        .await
                        .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(conn);
                self.sender = Some(s);
                self.connects += 1;
            }
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, "127.0.0.1")
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let resp = self
                .sender
                .as_mut()
                .unwrap()
                .send_request(req)
                .await
                .map_err(|e| {
                    self.sender = None;
                    format!("request: {e}")
                })?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        }

        pub async fn post(
            &mut self,
            path: &str,
            body: &serde_json::Value,
        ) -> Result<(u16, serde_json::Value), String> {
            let (s, b) = self
                .send(
                    "POST",
                    path,
                    "application/json",
                    serde_json::to_vec(body).unwrap(),
                )
                .await?;
            let v = serde_json::from_str(&b).map_err(|e| format!("{path} {s}: {e}: {b}"))?;
            Ok((s, v))
        }
    }
}

/// A CSR for the subject `/v1/subject` returned, and its key.
fn csr_for(subject: &serde_json::Value) -> (String, PrivateKey) {
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let mut orgs: Vec<String> = serde_json::from_value(subject["organizations"].clone()).unwrap();
    let cn = subject["common_name"].as_str().unwrap();
    // The generation group ends with this key's digest, as `rotator fetch` makes it.
    orgs.push(rotator::policy::generation_group(
        cn,
        subject["generation"].as_i64().unwrap(),
        &key.spki_der(),
    ));
    let der = pki::build_csr(&key, &pki::subject_name(cn, &orgs).unwrap()).unwrap();
    (pki::pem_encode("CERTIFICATE REQUEST", &der), key)
}

/// Enrolls with `token` and renews `renewals` times, `pause` apart, all from
/// `from`; the calls that did not succeed, and why.
async fn enroll_and_renew(
    api: &Api,
    from: &str,
    token: &str,
    renewals: usize,
    pause: Duration,
) -> Vec<String> {
    let ca = std::fs::read_to_string(&api.server_ca).unwrap();
    let mut failures = Vec::new();
    let mut anon = raw::Conn::new(from, api.addr, raw::config(&ca, None));
    let step = |r: Result<(u16, serde_json::Value), String>,
                what: &str,
                failures: &mut Vec<String>| match r {
        Ok((200, v)) => Some(v),
        Ok((s, v)) => {
            failures.push(format!("{what}: {s} {v}"));
            None
        }
        Err(e) => {
            failures.push(format!("{what}: {e}"));
            None
        }
    };
    let Some(subject) = step(
        anon.post("/v1/subject", &serde_json::json!({ "token": token }))
            .await,
        "subject",
        &mut failures,
    ) else {
        return failures;
    };
    let (pem, mut key) = csr_for(&subject);
    let Some(mut grant) = step(
        anon.post(
            "/v1/enroll",
            &serde_json::json!({"token": token, "csr": pem}),
        )
        .await,
        "enroll",
        &mut failures,
    ) else {
        return failures;
    };
    for i in 0..renewals {
        tokio::time::sleep(pause).await;
        let identity = (
            grant["certificate"].as_str().unwrap().to_string(),
            key.to_pem(),
        );
        let mut me = raw::Conn::new(
            from,
            api.addr,
            raw::config(&ca, Some((&identity.0, &identity.1))),
        );
        let Some(subject) = step(
            me.post("/v1/subject", &serde_json::json!({})).await,
            &format!("subject {i}"),
            &mut failures,
        ) else {
            return failures;
        };
        let (pem, next_key) = csr_for(&subject);
        let Some(next) = step(
            me.post("/v1/renew", &serde_json::json!({ "csr": pem }))
                .await,
            &format!("renew {i}"),
            &mut failures,
        ) else {
            return failures;
        };
        grant = next;
        key = next_key;
    }
    failures
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_hundreds_of_idle_and_slow_connections_starves_no_one() {
    use tokio::io::AsyncWriteExt;
    let api = Api::start_with(
        "rate_limit_per_address = 1000\nrate_limit_per_user = 1000\nheader_timeout = \"3s\"\nbody_timeout = \"3s\"\n",
    )
    .await;
    let ca = std::fs::read_to_string(&api.server_ca).unwrap();
    let tokens = [
        api.enroll_user("ann", &[]).await,
        api.enroll_user("ben", &[]).await,
        api.enroll_user("cat", &[]).await,
    ];
    // The flood, from 127.0.0.1: 300 idle TCP connections and 40 TLS
    // connections that announce a body and trickle it, all reopened when the
    // server closes them, until the real client is done.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let to = api.addr;
    let idle = tokio::spawn({
        let stopped = stopped.clone();
        async move {
            let mut held = Vec::new();
            let mut opened = 0usize;
            for _round in 0..200 {
                if *stopped.borrow() {
                    break;
                }
                held.retain(|c: &tokio::net::TcpStream| {
                    let mut b = [0u8; 1];
                    !matches!(c.try_read(&mut b), Ok(0))
                });
                while held.len() < 300 {
                    match raw::tcp("127.0.0.1", to).await {
                        Ok(c) => {
                            held.push(c);
                            opened += 1;
                        }
                        Err(_) => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            opened
        }
    });
    let slow = tokio::spawn({
        let config = raw::config(&ca, None);
        async move {
            let mut opened = 0usize;
            let mut held: Vec<raw::Tls> = Vec::new();
            for _round in 0..400 {
                if *stopped.borrow() {
                    break;
                }
                while held.len() < 40 {
                    let Ok(Ok(mut t)) = tokio::time::timeout(
                        Duration::from_secs(1),
                        raw::tls("127.0.0.1", to, &config),
                    )
                    .await
                    else {
                        break;
                    };
                    let head = "POST /v1/enroll HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 16000\r\n\r\n{";
                    if t.write_all(head.as_bytes()).await.is_ok() {
                        held.push(t);
                        opened += 1;
                    } else {
                        break;
                    }
                }
                let mut alive = Vec::new();
                for mut t in held.drain(..) {
                    if t.write_all(b" ").await.is_ok() && t.flush().await.is_ok() {
                        alive.push(t);
                    }
                }
                held = alive;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            opened
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The real client, from 127.0.0.2: three users enroll and renew six times
    // each, over more than the header and body deadlines, so the flood's slots
    // turn over while it runs.
    let started = std::time::Instant::now();
    let mut failures = Vec::new();
    let mut calls = 0;
    for token in &tokens {
        let pause = Duration::from_millis(500);
        failures.extend(enroll_and_renew(&api, "127.0.0.2", token, 6, pause).await);
        calls += 2 + 6 * 2;
    }
    let took = started.elapsed();
    let _ = stop.send(true);
    let (idle_opened, slow_opened) = (idle.await.unwrap(), slow.await.unwrap());
    let metrics = rotator::daemon::health::metrics_text(&api.app).await.unwrap();
    let turned_away = metric(
        &metrics,
        r#"rotator_api_connections_refused_total{reason="address"}"#,
    );
    eprintln!(
        "flood: {idle_opened} idle and {slow_opened} slow connections opened from 127.0.0.1, \
         {turned_away} turned away; real client: {calls} calls in {took:?}, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "the real client failed: {failures:#?}");
    assert!(idle_opened >= 300, "the flood ran: {idle_opened}");
    assert!(
        turned_away >= 284.0,
        "the cap turned the flood away: {turned_away}"
    );
    for u in ["ann", "ben", "cat"] {
        let creds = api.credentials_of(u).await;
        assert_eq!(creds.len(), 7, "{u}: enrolled and renewed six times");
    }
    api.stop().await;
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_lose_their_slot_and_an_oversized_body_is_refused_unread() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = Api::start_with(
        "rate_limit_per_address = 1000\nmax_connections_per_address = 4\nheader_timeout = \"2s\"\nbody_timeout = \"2s\"\n",
    )
    .await;
    let ca = std::fs::read_to_string(&api.server_ca).unwrap();
    let config = raw::config(&ca, None);
    async fn closed_after(mut s: impl tokio::io::AsyncRead + Unpin) -> (Duration, String) {
        let t0 = std::time::Instant::now();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got)).await;
        (t0.elapsed(), String::from_utf8_lossy(&got).into_owned())
    }
    // Silent before TLS, silent after TLS, silent after one answered request.
    let t = raw::tcp("127.0.0.1", api.addr).await.unwrap();
    let (took, _) = closed_after(t).await;
    assert!(took < Duration::from_secs(4), "idle TCP held {took:?}");
    let t = raw::tls("127.0.0.1", api.addr, &config).await.unwrap();
    let (took, _) = closed_after(t).await;
    assert!(took < Duration::from_secs(4), "idle TLS held {took:?}");
    let mut t = raw::tls("127.0.0.1", api.addr, &config).await.unwrap();
    t.write_all(b"POST /v1/subject HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    let (took, answer) = closed_after(t).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        took < Duration::from_secs(4),
        "kept-alive idle held {took:?}"
    );
    // A body that never finishes: 408 at the body deadline, and the slot is freed.
    let mut t = raw::tls("127.0.0.1", api.addr, &config).await.unwrap();
    t.write_all(b"POST /v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"tok")
        .await
        .unwrap();
    let (took, answer) = closed_after(t).await;
    assert!(
        answer.starts_with("HTTP/1.1 408") && answer.contains("body_timeout"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(4), "slow body held {took:?}");
    // 10 GB announced: refused at once, not a byte of it read.
    let mut t = raw::tls("127.0.0.1", api.addr, &config).await.unwrap();
    t.write_all(b"POST /v1/enroll HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 10000000000\r\n\r\n")
        .await
        .unwrap();
    let (took, answer) = closed_after(t).await;
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("body_too_large"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(1), "the 413 waited {took:?}");
    // Four held connections fill 127.0.0.1's share; 127.0.0.2 is still served,
    // and once the deadline frees them, 127.0.0.1 is too.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(raw::tcp("127.0.0.1", api.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fifth = raw::tls("127.0.0.1", api.addr, &config).await;
    assert!(
        fifth.is_err(),
        "a fifth connection from 127.0.0.1 was served"
    );
    let mut other = raw::Conn::new("127.0.0.2", api.addr, config.clone());
    let (s, _) = other
        .post("/v1/subject", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(s, 401);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut again = raw::Conn::new("127.0.0.1", api.addr, config.clone());
    let (s, _) = again
        .post("/v1/subject", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(s, 401);
    drop(held);
    api.stop().await;
}
}

/// Every table of a PostgreSQL scratch database and its rows as text.
async fn pg_rows_as_text(s: &Scratch) -> Vec<(String, String)> {
    let mut db = s.db().await;
    let tables: Vec<(String,)> = sqlx::query_as(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    let mut out = Vec::new();
    for (table,) in tables {
        // The table names come from the catalog, not from input.
        let (text,): (String,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT COALESCE(string_agg(r::text, E'\\n'), '') FROM \"{table}\" r"
        )))
        .fetch_one(&mut db)
        .await
        .unwrap();
        out.push((table, text));
    }
    out
}

/// The size of the database once its WAL is folded in (on PostgreSQL, whose
/// files grow by preallocated pages, the bytes of its rows).
async fn db_bytes(api: &Api) -> u64 {
    if api.kx.s.engine() == Engine::Postgres {
        return pg_rows_as_text(&api.kx.s)
            .await
            .iter()
            .map(|(_, rows)| rows.len() as u64)
            .sum();
    }
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(api.app.store.pool())
        .await
        .unwrap();
    ["rotator.db", "rotator.db-wal"]
        .iter()
        .map(|f| {
            std::fs::metadata(api.kx.s.path(&format!("rotator-data/{f}")))
                .map(|m| m.len())
                .unwrap_or(0)
        })
        .sum()
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_refusals_are_counted_and_summarized_not_logged_row_by_row() {
    let mut api = Api::start().await;
    let token = api.enroll_user("alice", &[]).await;
    let ca = std::fs::read_to_string(&api.server_ca).unwrap();
    let config = raw::config(&ca, None);
    let wrong = format!("{}.{}", &token[..12], "W".repeat(43));
    let alice_csr = csr("alice", &["dev", "rotator:alice:1"], KeyType::EcdsaP256);
    let long_path = format!("/{}", "x".repeat(4000));
    let before = db_bytes(&api).await;
    let rows_before = api
        .kx
        .s
        .count("SELECT COALESCE(MAX(seq), 0) FROM audit_events")
        .await;

    let addresses = ["127.0.0.1", "127.0.0.3", "127.0.0.4", "127.0.0.5"];
    let mut sent = 0;
    for (a, from) in addresses.iter().enumerate() {
        let mut c = raw::Conn::new(from, api.addr, config.clone());
        for i in 0..500 {
            let (path, body): (&str, Vec<u8>) = match (i + a) % 5 {
                0 => (long_path.as_str(), b"{}".to_vec()),
                1 => (
                    "/v1/enroll",
                    format!("{{\"token\": \"{}\"", "g".repeat(3000)).into_bytes(),
                ),
                2 => (
                    "/v1/subject",
                    serde_json::to_vec(&serde_json::json!({"token": wrong})).unwrap(),
                ),
                3 => (
                    "/v1/enroll",
                    serde_json::to_vec(&serde_json::json!({"token": wrong, "csr": alice_csr}))
                        .unwrap(),
                ),
                _ => (
                    "/v1/renew",
                    serde_json::to_vec(&serde_json::json!({"csr": alice_csr})).unwrap(),
                ),
            };
            let (s, _) = c
                .send("POST", path, "application/json", body)
                .await
                .unwrap();
            assert!((400..500).contains(&s) && s != 429, "{path}: {s}");
            sent += 1;
        }
    }
    assert_eq!(sent, 2000);
    // Authenticated calls stay audited one row each, refusals included.
    let mut c = raw::Conn::new("127.0.0.1", api.addr, config.clone());
    let (s, v) = c
        .post(
            "/v1/enroll",
            &serde_json::json!({"token": token, "csr": csr("alice", &["dev", "rotator:alice:9"], KeyType::EcdsaP256)}),
        )
        .await
        .unwrap();
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("generation_stale"))
    );
    let metrics = rotator::daemon::health::metrics_text(&api.app).await.unwrap();
    // Stopping the listener writes the last summary.
    let _ = api.stop.send(true);
    (&mut api.served).await.unwrap();
    let app = &api.app;

    let after = db_bytes(&api).await;
    let grew = after.saturating_sub(before);
    eprintln!(
        "2000 unauthenticated refusals from 4 addresses: the database grew {grew} bytes ({before} -> {after})"
    );
    for (code, n) in [
        ("not_found", 400.0),
        ("bad_request", 400.0),
        ("token_invalid", 800.0),
        ("client_certificate_required", 400.0),
    ] {
        let series = format!("rotator_api_refusals_total{{code=\"{code}\"}}");
        assert_eq!(metric(&metrics, &series), n, "{series} in\n{metrics}");
    }
    let events = rotator::store::audit::list(&app.store, None, 100_000)
        .await
        .unwrap();
    let new: Vec<_> = events.iter().filter(|e| e.seq > rows_before).collect();
    let summaries: Vec<_> = new.iter().filter(|e| e.action == "api.refusals").collect();
    assert_eq!(summaries.len(), 1, "{new:#?}");
    let d: serde_json::Value = serde_json::from_str(&summaries[0].detail).unwrap();
    assert_eq!(d["total"], 2000, "{d}");
    assert_eq!(d["addresses"], 4, "{d}");
    assert_eq!(d["by_code"]["token_invalid"], 800, "{d}");
    let rows: Vec<_> = new.iter().filter(|e| e.action == "api.refuse").collect();
    assert_eq!(
        rows.len(),
        1,
        "only the authenticated refusal has a row: {rows:#?}"
    );
    assert!(rows[0].detail.contains("generation_stale") && rows[0].actor.contains("alice"));
    for e in &new {
        assert!(e.detail.len() < 512, "a long audit row: {e:?}");
        assert!(
            !e.detail.contains("xxxx") && !e.detail.contains("gggg"),
            "client text in {e:?}"
        );
    }

    assert!(grew <= 8192, "the database grew {grew} bytes");
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secrets_with_a_users_token_id_neither_lock_her_out_nor_name_her() {
    // The default per-user limit (12 a minute); addresses have plenty.
    let api = Api::start_with("rate_limit_per_address = 1000\n").await;
    let token = api.enroll_user("alice", &[]).await;
    let ca = std::fs::read_to_string(&api.server_ca).unwrap();
    let config = raw::config(&ca, None);
    let id = &token[..12];
    let wrong = format!("{id}.{}", "W".repeat(43));
    let unknown = format!("{}.{}", "0123456789ab", "W".repeat(43));
    let alice_csr = csr("alice", &["dev", "rotator:alice:1"], KeyType::EcdsaP256);
    let mut mallory = raw::Conn::new("127.0.0.1", api.addr, config.clone());
    let mut answers = Vec::new();
    for i in 0..20 {
        for t in [&wrong, &unknown] {
            let body = if i % 2 == 0 {
                ("/v1/subject", serde_json::json!({ "token": t }))
            } else {
                (
                    "/v1/enroll",
                    serde_json::json!({"token": t, "csr": alice_csr}),
                )
            };
            let (s, v) = mallory.post(body.0, &body.1).await.unwrap();
            let text = v.to_string();
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (401, Some("token_invalid")),
                "{text}"
            );
            assert!(
                !text.contains("alice"),
                "a wrong secret named the user: {text}"
            );
            answers.push((body.0, text));
        }
    }
    // Known id with a wrong secret and an unknown id answer the same, word for word.
    for pair in answers.chunks(2) {
        assert_eq!(pair[0], pair[1]);
    }
    // And take about as long (reported, not asserted: a shared machine is noisy).
    let mut took = [Vec::new(), Vec::new()];
    for _ in 0..100 {
        for (i, t) in [&wrong, &unknown].into_iter().enumerate() {
            let t0 = std::time::Instant::now();
            let (s, _) = mallory
                .post("/v1/subject", &serde_json::json!({ "token": t }))
                .await
                .unwrap();
            took[i].push(t0.elapsed());
            assert_eq!(s, 401);
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (known, unknown_id) = (median(&mut took[0]), median(&mut took[1]));
    eprintln!("median answer: known id, wrong secret {known:?}; unknown id {unknown_id:?}");
    // Nor does the audit log charge alice with them.
    let charged = rotator::store::audit::list(&api.app.store, Some("alice"), 1000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.action.starts_with("api."))
        .count();
    assert_eq!(charged, 0);
    // Alice, from another address, with her real token: not locked out.
    let failures = enroll_and_renew(&api, "127.0.0.2", &token, 1, Duration::ZERO).await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(api.credentials_of("alice").await.len(), 2);
    api.stop().await;
}
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_issued_credential_cannot_renew_itself_through_the_api() {
    let api = Api::start().await;
    // bob's kubeconfig was made and handed over by the administrator.
    ok(&api
        .kx
        .rotator_async(
            &[
                "add-user",
                "bob",
                "--group",
                "dev",
                "-n",
                "team-a",
                "--role",
                "view",
                "--out",
                "bob.kubeconfig",
            ],
            &[],
        )
        .await);
    let (_, _, cert, key) = kubeconfig_parts(&api.kx.s.path("bob.kubeconfig"));
    let stolen = api.client(Some((&cert, &key)));
    let e = refused(
        stolen
            .post(
                "/v1/renew",
                &serde_json::json!({"csr": csr("bob", &["dev", "rotator:bob:2"], KeyType::EcdsaP256)}),
            )
            .await,
    );
    assert_eq!(
        (e.status, e.code.as_str()),
        (403, "renewal_not_allowed"),
        "{e:?}"
    );
    assert!(e.fix.contains("--enroll"), "{}", e.fix);
    let e = refused(stolen.post("/v1/subject", &serde_json::json!({})).await);
    assert_eq!((e.status, e.code.as_str()), (403, "renewal_not_allowed"));
    assert_eq!(api.credentials_of("bob").await.len(), 1, "nothing issued");
    assert_eq!(
        api.audit_count("api.refuse", "renewal_not_allowed").await,
        2
    );

    // The fix the error gives works: revoke, re-add with --enroll --reinstate
    // (the revoke sticks: without --reinstate the re-add is refused), fetch, renew.
    assert!(e.fix.contains("--reinstate"), "{}", e.fix);
    ok(&api.kx.rotator_async(&["revoke", "bob"], &[]).await);
    let o = api
        .kx
        .rotator_async(&["add-user", "bob", "--group", "dev", "-n", "team-a", "--role", "view", "--enroll"], &[])
        .await;
    let err = fails_with(&o, 4);
    assert!(err.contains("was revoked") && err.contains("--reinstate"), "{err}");
    let token = api.enroll_user("bob", &["--reinstate"]).await;
    ok(&api.fetch("bob", &["--token", &token]).await);
    let out = ok(&api.fetch("bob", &[]).await);
    assert!(out.contains("generation 3"), "{out}");
    // The old admin-issued certificate stays refused.
    let e = refused(
        stolen
            .post(
                "/v1/renew",
                &serde_json::json!({"csr": csr("bob", &["dev", "rotator:bob:4"], KeyType::EcdsaP256)}),
            )
            .await,
    );
    assert_eq!(e.status, 403, "{e:?}");
    api.stop().await;
}
}

// One engine: `rotator credential` is the user's side and opens no database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_exits_by_its_deadline_while_dns_never_answers() {
    // A resolver that never answers, without touching the host: a private mount
    // and network namespace whose /etc/resolv.conf names a UDP socket that
    // reads queries and says nothing. Needs the right to unshare (root here).
    let can = std::process::Command::new("unshare")
        .args(["--mount", "--net", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !can {
        eprintln!("skipped: cannot make a mount and network namespace here");
        return;
    }
    let s = Scratch::new();
    // A cached credential that is due, for a server whose name never resolves.
    let ca = make_ca(s.dir.path(), "ca");
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let cert = ca
        .issue_server(&key, &["u".into()], Duration::from_secs(3600))
        .unwrap();
    let server = "https://stall.example:8443";
    let now = SystemClock.now();
    rotator::client::ServerDir::for_server(&s.path("state"), server)
        .unwrap()
        .store_credential(&rotator::client::Cached {
            server: server.into(),
            user: "u".into(),
            certificate: cert.clone(),
            key: key.to_pem(),
            serial: "01".into(),
            generation: 1,
            not_before: now - 60,
            not_after: now + 3000,
            renew_after: now - 1,
            namespace: None,
            cluster: rotator::flows::self_service::ClusterInfo {
                name: "c".into(),
                server: "https://127.0.0.1:6443".into(),
                certificate_authority_data: String::new(),
            },
        })
        .unwrap();
    s.write(
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:10 attempts:3\n",
    );
    let script = format!(
        r#"ip link set lo up || exit 90
mount --bind resolv.conf /etc/resolv.conf || exit 91
python3 -c 'import socket,time; s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(("127.0.0.1",53)); open("ready","w").close(); time.sleep(30)' </dev/null >/dev/null 2>&1 &
silent=$!
n=0; while [ ! -f ready ]; do sleep 0.1; n=$((n+1)); [ $n -lt 300 ] || exit 93; done
getent hosts stall.example </dev/null >/dev/null 2>&1 & lookup=$!
sleep 1
kill -0 $lookup 2>/dev/null || exit 92
kill $lookup
start=$(date +%s%N)
{} credential --server {server} --state-dir state --timeout 2s > answer.json
rc=$?
echo $(( ($(date +%s%N) - start) / 1000000 )) > took-ms
kill $silent
exit $rc"#,
        env!("CARGO_BIN_EXE_rotator")
    );
    let o = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("unshare")
            .args(["--mount", "--net", "sh", "-c", &script])
            .current_dir(s.dir.path())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the plugin ended")
    .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_ne!(o.status.code(), Some(92), "the lookup did not stall: {err}");
    assert!(o.status.success(), "{:?} {err}", o.status);
    assert!(err.contains("no answer within 2s"), "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("answer.json")).unwrap()).unwrap();
    assert_eq!(v["status"]["clientCertificateData"], cert.as_str());
    let took: u64 = std::fs::read_to_string(s.path("took-ms"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("credential --timeout 2s with a resolver that never answers exited after {took} ms");
    assert!(took < 2900, "the process exited after {took} ms");
}

crate::engines! {
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_refuses_a_fifo_kubeconfig_and_sigkilled_fetches_leave_no_temporary_file() {
    let api = Api::start().await;
    let token = api.enroll_user("erin", &["--ttl", "1h"]).await;
    // A FIFO as the kubeconfig: refused at once (exit 10), the token not spent.
    std::fs::create_dir_all(api.kx.s.path("erin/kube")).unwrap();
    let fifo = api.kx.s.path("erin/kube/config");
    ok(&run("mkfifo", &[fifo.to_str().unwrap()]));
    let o = tokio::time::timeout(
        Duration::from_secs(20),
        api.fetch("erin", &["--token", &token]),
    )
    .await
    .expect("fetch with a FIFO kubeconfig must not hang");
    let e = fails_with(&o, 10);
    assert!(e.contains("is a FIFO") && e.contains("fix:"), "{e}");
    std::fs::remove_file(&fifo).unwrap();
    ok(&api.fetch("erin", &["--token", &token]).await);

    // Renewals SIGKILLed at random points.
    let state = api.kx.s.path("erin/state");
    let kubeconfig = api.kx.s.path("erin/kube/config");
    let url = api.url();
    let args = [
        "fetch",
        "--server",
        &url,
        "--server-ca",
        api.server_ca.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_rotator"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let started = std::time::Instant::now();
    assert!(spawn().wait().unwrap().success());
    let took = started.elapsed();
    let temp_files = || -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![api.kx.s.path("erin")];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().unwrap().is_dir() {
                    dirs.push(e.path());
                } else if name.starts_with(".rotator-") && name.ends_with(".tmp") {
                    found.push(e.path());
                }
            }
        }
        found
    };
    let mut seed: u64 = std::process::id() as u64 ^ 0x2545_f491_4f6c_dd1d;
    // Kill points drawn over the fastest whole run seen so far, so a slow first
    // run (cold caches, a loaded machine) does not leave most rounds finishing
    // before their kill; rounds go on until enough were killed mid-run.
    let mut fastest = took;
    let (want_killed, max_rounds) = (20, 200);
    let (mut rounds, mut killed) = (0, 0);
    while killed < want_killed && rounds < max_rounds {
        rounds += 1;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let started = std::time::Instant::now();
        let mut child = spawn();
        std::thread::sleep(Duration::from_micros(
            seed % (fastest.as_micros() as u64 + 1),
        ));
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            killed += 1;
            let _ = child.wait();
        } else {
            fastest = fastest.min(started.elapsed());
        }
    }
    let left_by_kills = temp_files().len();
    ok(&api.fetch("erin", &[]).await);
    let left = temp_files();
    eprintln!(
        "{rounds} fetches, {killed} killed mid-run (a fetch takes {took:?}); temporary files after the kills: {left_by_kills}, after the next fetch: {}",
        left.len()
    );
    assert!(
        killed >= want_killed,
        "only {killed} of {rounds} fetches were killed mid-run"
    );
    assert!(left.is_empty(), "temporary files survived: {left:?}");
    api.stop().await;
}
}
