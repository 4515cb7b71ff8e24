//! The authorization webhook (`serve --authz-addr`) over real HTTPS, against a
//! real daemon whose database other `rotator` processes change: decisions by
//! certificate fingerprint and by generation group, revocations from another
//! process within the refresh interval, client-certificate verification of the
//! API server, and bad input refused with a Status. (Through kubectl and the
//! test cluster's webhook authorizer: `with_cluster` / `authz_cluster`.)
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{Scratch, kubeconfig_parts, ok, run};
use crate::user_api::raw::{Conn, config};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The SHA-256 of a PEM certificate's DER, by openssl (independent of rotator).
pub fn openssl_fingerprint(dir: &std::path::Path, pem: &str) -> String {
    let f = dir.join(format!("fp-{}.pem", rand_name()));
    std::fs::write(&f, pem).unwrap();
    let out = ok(&run(
        "openssl",
        &[
            "x509",
            "-in",
            f.to_str().unwrap(),
            "-noout",
            "-fingerprint",
            "-sha256",
        ],
    ));
    out.trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_ascii_lowercase()
}

fn rand_name() -> String {
    rotator::pki::hex(&rotator::pki::random_bytes::<6>())
}

/// The certificate's subject organizations (groups), by openssl.
pub fn openssl_groups(dir: &std::path::Path, pem: &str) -> Vec<String> {
    let f = dir.join(format!("subj-{}.pem", rand_name()));
    std::fs::write(&f, pem).unwrap();
    let out = ok(&run(
        "openssl",
        &[
            "x509",
            "-in",
            f.to_str().unwrap(),
            "-noout",
            "-subject",
            "-nameopt",
            "RFC2253",
        ],
    ));
    out.trim()
        .trim_start_matches("subject=")
        .split(',')
        .filter_map(|p| p.strip_prefix("O="))
        .map(str::to_string)
        .collect()
}

/// A CA and a client certificate signed by it, made with openssl: the API
/// server's webhook client identity (or a stranger's). Returns (ca, cert, key) paths.
pub fn openssl_client(
    dir: &std::path::Path,
    name: &str,
    cn: &str,
    orgs: &[&str],
) -> (String, String, String) {
    let p = |x: &str| {
        dir.join(format!("{name}-{x}"))
            .to_str()
            .unwrap()
            .to_string()
    };
    ok(&run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("ca.key"),
            "-out",
            &p("ca.crt"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} CA"),
        ],
    ));
    let mut subj = format!("/CN={cn}");
    for o in orgs {
        subj.push_str(&format!("/O={o}"));
    }
    ok(&run(
        "openssl",
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &p("client.key"),
            "-out",
            &p("client.csr"),
            "-subj",
            &subj,
        ],
    ));
    let ext = p("ext.cnf");
    std::fs::write(
        &ext,
        "extendedKeyUsage = clientAuth\nbasicConstraints = CA:FALSE\n",
    )
    .unwrap();
    ok(&run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("client.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &p("client.crt"),
            "-extfile",
            &ext,
        ],
    ));
    (p("ca.crt"), p("client.crt"), p("client.key"))
}

/// A SubjectAccessReview as kube-apiserver's webhook authorizer sends it.
pub fn review(user: &str, groups: &[String], fingerprint: Option<&str>) -> Value {
    let mut all: Vec<String> = groups.to_vec();
    all.push("system:authenticated".into());
    let mut spec = json!({
        "resourceAttributes": {"namespace": "team-a", "verb": "get", "group": "", "version": "v1", "resource": "pods"},
        "user": user,
        "groups": all,
        "uid": "",
    });
    if let Some(fp) = fingerprint {
        spec["extra"] =
            json!({"authentication.kubernetes.io/credential-id": [format!("X509SHA256={fp}")]});
    }
    json!({"kind": "SubjectAccessReview", "apiVersion": "authorization.k8s.io/v1", "metadata": {"creationTimestamp": null}, "spec": spec, "status": {"allowed": false}})
}

/// A credential as the tests present it: the certificate's user, groups and fingerprint.
#[derive(Debug, Clone)]
pub struct Presented {
    pub user: String,
    pub groups: Vec<String>,
    pub fingerprint: String,
}

impl Presented {
    pub fn from_kubeconfig(
        dir: &std::path::Path,
        user: &str,
        kubeconfig: &std::path::Path,
    ) -> Self {
        let (_, _, cert, _) = kubeconfig_parts(kubeconfig);
        Self::from_pem(dir, user, &cert)
    }

    pub fn from_pem(dir: &std::path::Path, user: &str, cert: &str) -> Self {
        Self {
            user: user.into(),
            groups: openssl_groups(dir, cert),
            fingerprint: openssl_fingerprint(dir, cert),
        }
    }

    fn review(&self) -> Value {
        review(&self.user, &self.groups, Some(&self.fingerprint))
    }
}

pub(crate) struct Daemon {
    child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
    metrics: String,
    pub api_server: std::sync::Arc<rustls::ClientConfig>,
}

impl Daemon {
    pub async fn start(s: &Scratch, client_ca: &str, api_server: (&str, &str)) -> Self {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"))
            .current_dir(s.dir.path())
            .args([
                "--config",
                "rotator.toml",
                "serve",
                "--authz-addr",
                &addr.to_string(),
                "--metrics-addr",
                &metrics,
            ])
            .env_remove("ROTATOR_CONFIG")
            .envs(s.database_url.iter().map(|u| ("ROTATOR_DATABASE_URL", u)))
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let mut up = false;
        while let Ok(Ok(Some(l))) =
            tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
        {
            if l.contains("authorization webhook (HTTPS)") {
                up = true;
                break;
            }
        }
        assert!(up, "the daemon announced its webhook");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let ca = std::fs::read_to_string(s.path("rotator-data/ca/ca.crt")).unwrap();
        let cert = std::fs::read_to_string(api_server.0).unwrap();
        let key = std::fs::read_to_string(api_server.1).unwrap();
        let api_server = config(&ca, Some((&cert, &key)));
        let _ = client_ca;
        let d = Self {
            child,
            addr,
            metrics,
            api_server,
        };
        // Answers 503 until its first read of the database.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, _) = d.ask(&review("nobody", &[], None)).await;
            if status == 200 || Instant::now() > deadline {
                assert_eq!(status, 200, "the webhook loaded its snapshot");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d
    }

    pub async fn ask(&self, body: &Value) -> (u16, Value) {
        let mut c = Conn::new("127.0.0.1", self.addr, self.api_server.clone());
        let (status, text) = c
            .send(
                "POST",
                "/v1/authorize",
                "application/json",
                serde_json::to_vec(body).unwrap(),
            )
            .await
            .unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `None` for no opinion, `Some(reason)` for a denial; panics on anything else.
    pub async fn decision(&self, who: &Presented) -> Option<String> {
        let (status, v) = self.ask(&who.review()).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["apiVersion"], "authorization.k8s.io/v1");
        assert_eq!(v["kind"], "SubjectAccessReview");
        assert_eq!(v["status"]["allowed"], false, "rotator never allows: {v}");
        if v["status"]["denied"] == true {
            Some(v["status"]["reason"].as_str().unwrap().to_string())
        } else {
            assert!(v["status"].get("denied").is_none_or(|d| d == false), "{v}");
            None
        }
    }

    /// Waits (at most `within`) until `who` is denied.
    async fn until_denied(&self, who: &Presented, within: Duration) -> (String, Duration) {
        let started = Instant::now();
        loop {
            if let Some(r) = self.decision(who).await {
                return (r, started.elapsed());
            }
            assert!(started.elapsed() < within, "{who:?} still not denied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics").await.1
    }

    /// GET `path` on the health and metrics port: the status and the whole response.
    pub async fn get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.metrics).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, out)
    }

    pub async fn stop(mut self) {
        let _ = run("kill", &["-TERM", &self.child.id().unwrap().to_string()]);
        let status = tokio::time::timeout(Duration::from_secs(40), self.child.wait()).await;
        assert!(status.unwrap().unwrap().success());
    }
}

fn show(s: &Scratch, user: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(&ok(&s.rotator(&[
        "--config",
        "rotator.toml",
        "--output",
        "json",
        "show",
        user,
    ])))
    .unwrap();
    v["credentials"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_daemon_refuses_revoked_superseded_and_unknown_certificates_and_nothing_else() {
    let s = Scratch::new();
    let (api_ca, api_cert, api_key) =
        openssl_client(s.dir.path(), "apiserver", "kube-apiserver", &[]);
    s.write(
        "rotator.toml",
        &format!("data_dir = \"rotator-data\"\n[rotation]\ngrace_period = \"6s\"\n[authz]\nclient_ca_file = {api_ca:?}\n"),
    );
    let r = |args: &[&str]| {
        let mut all = vec!["--config", "rotator.toml"];
        all.extend_from_slice(args);
        ok(&s.rotator(&all))
    };
    r(&["init"]);
    r(&[
        "add-user",
        "alice",
        "--group",
        "dev",
        "-n",
        "team-a",
        "--role",
        "edit",
        "--out",
        "alice1.kubeconfig",
    ]);
    r(&[
        "add-user",
        "bob",
        "--group",
        "dev",
        "-n",
        "team-a",
        "--role",
        "edit",
        "--out",
        "bob.kubeconfig",
    ]);
    let d = Daemon::start(&s, &api_ca, (&api_cert, &api_key)).await;
    let dir = s.dir.path();
    let alice1 = Presented::from_kubeconfig(dir, "alice", &s.path("alice1.kubeconfig"));
    let bob = Presented::from_kubeconfig(dir, "bob", &s.path("bob.kubeconfig"));
    assert!(
        alice1.groups.contains(&"dev".to_string())
            && alice1
                .groups
                .iter()
                .any(|g| g.starts_with("rotator:alice:1."))
    );
    assert_eq!(
        d.decision(&alice1).await,
        None,
        "a current certificate: no opinion"
    );

    // Two rotations: alice holds generations 1 and 2 (superseded, within
    // grace) and 3 (current). Revoking 2 by serial refuses 2 alone.
    r(&["rotate", "alice", "--out", "alice2.kubeconfig"]);
    r(&["rotate", "alice", "--out", "alice3.kubeconfig"]);
    let alice2 = Presented::from_kubeconfig(dir, "alice", &s.path("alice2.kubeconfig"));
    let alice3 = Presented::from_kubeconfig(dir, "alice", &s.path("alice3.kubeconfig"));
    let creds = show(&s, "alice");
    let serial2 = creds.iter().find(|c| c["generation"] == 2).unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    r(&["revoke", "alice", "--serial", &serial2]);
    let (reason, took) = d.until_denied(&alice2, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(3),
        "a revoke by another process reached the webhook in {took:?}"
    );
    assert!(
        reason.contains(&alice2.fingerprint)
            && reason.contains(&serial2)
            && reason.contains("revoked"),
        "{reason}"
    );
    // The reason names the credential and the revocation, never key material.
    let (_, _, _, key2) = kubeconfig_parts(&s.path("alice2.kubeconfig"));
    let key_body: String = key2.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !reason.contains("PRIVATE") && !reason.contains(&key_body[..40]),
        "{reason}"
    );
    assert_eq!(
        d.decision(&alice1).await,
        None,
        "superseded within grace still works"
    );
    assert_eq!(d.decision(&alice3).await, None);
    assert_eq!(d.decision(&bob).await, None);

    // Without the credential-id extra (an API server before 1.32), the generation group decides.
    let by_group = |p: &Presented| review(&p.user, &p.groups, None);
    let (_, v) = d.ask(&by_group(&alice2)).await;
    assert_eq!(v["status"]["denied"], true, "{v}");
    let (_, v) = d.ask(&by_group(&alice3)).await;
    assert!(v["status"].get("denied").is_none(), "{v}");

    // Past the grace period, generation 1 is refused while 3 keeps working.
    let (reason, _) = d.until_denied(&alice1, Duration::from_secs(12)).await;
    assert!(
        reason.contains("superseded") && reason.contains("grace period ended"),
        "{reason}"
    );
    assert_eq!(d.decision(&alice3).await, None);

    // A certificate rotator never recorded that carries alice's generation
    // group (signed outside rotator by the same CA): unknown, refused. One
    // for alice's name and static group only: not a rotator identity.
    let ca_key = s.path("rotator-data/ca/ca.key");
    let ca_crt = s.path("rotator-data/ca/ca.crt");
    let forge = |name: &str, subj: &str| -> String {
        let p = |x: &str| s.path(&format!("{name}.{x}")).to_str().unwrap().to_string();
        ok(&run(
            "openssl",
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &p("key"),
                "-out",
                &p("csr"),
                "-subj",
                subj,
            ],
        ));
        ok(&run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &p("csr"),
                "-CA",
                ca_crt.to_str().unwrap(),
                "-CAkey",
                ca_key.to_str().unwrap(),
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &p("crt"),
            ],
        ));
        std::fs::read_to_string(p("crt")).unwrap()
    };
    let g3 = alice3
        .groups
        .iter()
        .find(|g| g.starts_with("rotator:"))
        .unwrap()
        .clone();
    let forged = Presented::from_pem(
        dir,
        "alice",
        &forge("forged", &format!("/CN=alice/O=dev/O={g3}")),
    );
    let reason = d
        .decision(&forged)
        .await
        .expect("a certificate rotator never recorded is refused");
    assert!(
        reason.contains("unknown to rotator") && reason.contains(&forged.fingerprint),
        "{reason}"
    );
    let outside = Presented::from_pem(dir, "alice", &forge("outside", "/CN=alice/O=dev"));
    assert_eq!(
        d.decision(&outside).await,
        None,
        "a certificate made outside rotator is unaffected"
    );

    // remove-user refuses every certificate of the user, bob keeps working.
    r(&["remove-user", "alice"]);
    let (reason, _) = d.until_denied(&alice3, Duration::from_secs(5)).await;
    assert!(
        reason.contains("revoked") || reason.contains("removed"),
        "{reason}"
    );
    assert_eq!(d.decision(&bob).await, None);

    let m = d.metrics().await;
    assert!(
        m.contains("rotator_authz_decisions_total{decision=\"denied\",reason=\"revoked\"}"),
        "{m}"
    );
    assert!(
        m.contains("rotator_authz_decisions_total{decision=\"no_opinion\",reason=\"current\"}"),
        "{m}"
    );
    assert!(
        m.contains("rotator_authz_decision_duration_seconds_count"),
        "{m}"
    );
    assert!(m.contains("rotator_authz_snapshot_credentials 4"), "{m}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_api_servers_certificate_gets_in_and_bad_reviews_get_400_with_a_status() {
    let s = Scratch::new();
    let (api_ca, api_cert, api_key) =
        openssl_client(s.dir.path(), "apiserver", "kube-apiserver", &[]);
    let (_, other_cert, other_key) =
        openssl_client(s.dir.path(), "stranger", "kube-apiserver", &[]);
    s.write(
        "rotator.toml",
        &format!("data_dir = \"rotator-data\"\n[authz]\nclient_ca_file = {api_ca:?}\n"),
    );
    ok(&s.rotator(&["--config", "rotator.toml", "init"]));
    let d = Daemon::start(&s, &api_ca, (&api_cert, &api_key)).await;

    // No client certificate, or one from another CA: refused at TLS.
    let ca = std::fs::read_to_string(s.path("rotator-data/ca/ca.crt")).unwrap();
    let other = (
        std::fs::read_to_string(&other_cert).unwrap(),
        std::fs::read_to_string(&other_key).unwrap(),
    );
    for cfg in [config(&ca, None), config(&ca, Some((&other.0, &other.1)))] {
        let mut c = Conn::new("127.0.0.1", d.addr, cfg);
        let r = c
            .send(
                "POST",
                "/v1/authorize",
                "application/json",
                serde_json::to_vec(&review("u", &[], None)).unwrap(),
            )
            .await;
        assert!(
            r.is_err(),
            "a client without the API server's certificate got {r:?}"
        );
    }

    let good = review("u", &[], None);
    let mut wrong_version = good.clone();
    wrong_version["apiVersion"] = json!("authorization.k8s.io/v1beta1");
    let mut wrong_kind = good.clone();
    wrong_kind["kind"] = json!("TokenReview");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            b"{\"kind\": \"SubjectAccessReview\", ".to_vec(),
            "not a JSON",
        ),
        (b"\xff\xfe\x00garbage".to_vec(), "not a JSON"),
        (
            serde_json::to_vec(&wrong_version).unwrap(),
            "subjectAccessReviewVersion: v1",
        ),
        (serde_json::to_vec(&wrong_kind).unwrap(), "TokenReview"),
        (vec![b' '; 300 * 1024], "larger than"),
    ];
    let mut c = Conn::new("127.0.0.1", d.addr, d.api_server.clone());
    for (body, want) in cases {
        let (status, text) = c
            .send("POST", "/v1/authorize", "application/json", body)
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(status, 400, "{text}");
        assert_eq!(
            (v["kind"].as_str(), v["code"].as_i64(), v["status"].as_str()),
            (Some("Status"), Some(400), Some("Failure"))
        );
        assert!(
            v["message"].as_str().unwrap().contains(want),
            "{want:?} in {text}"
        );
    }
    // Still answering after all of that, on a fresh connection and the same one.
    assert_eq!(d.ask(&good).await.0, 200);
    let (status, _) = c
        .send("GET", "/v1/authorize", "application/json", vec![])
        .await
        .unwrap();
    assert_eq!(status, 405);
    let m = d.metrics().await;
    assert!(
        m.contains("rotator_authz_decisions_total{decision=\"bad_request\""),
        "{m}"
    );
    d.stop().await;
}

/// Without `authz.client_ca_file` the webhook answers whoever connects, and
/// its denials name users, credentials and revoke reasons: only on loopback.
#[test]
fn a_webhook_without_the_api_servers_ca_listens_on_loopback_only() {
    let s = Scratch::new();
    s.write("rotator.toml", "data_dir = \"rotator-data\"\n");
    ok(&s.rotator(&["--config", "rotator.toml", "init"]));
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let mut child = s
            .command()
            .args(["--config", "rotator.toml", "serve", "--authz-addr", addr])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A daemon that starts serving would never exit: stopped, and failed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let o = child.wait_with_output().unwrap();
        let err = crate::common::fails_with(&o, 3);
        assert!(
            err.contains("authz.listen")
                && err.contains(addr)
                && err.contains("client_ca_file")
                && err.contains("fix:"),
            "{err}"
        );
    }
}

#[test]
fn doctor_reads_the_api_servers_authorization_config_or_says_it_cannot_tell() {
    let s = Scratch::new();
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/authz/authorization-config.yaml"
    );
    let lax = s.write(
        "lax.yaml",
        &std::fs::read_to_string(shipped)
            .unwrap()
            .replace("failurePolicy: Deny", "failurePolicy: NoOpinion"),
    );
    let check = |extra: &str| -> (bool, String) {
        s.write(
            "rotator.toml",
            &format!("data_dir = \"rotator-data\"\n[authz]\nlisten = \"127.0.0.1:8444\"\nclient_ca_file = \"ca.crt\"\n{extra}"),
        );
        let out = s.rotator(&["--config", "rotator.toml", "--output", "json", "doctor"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let c = v
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "authorization webhook")
            .unwrap()
            .clone();
        (
            c["ok"].as_bool().unwrap(),
            c["detail"].as_str().unwrap().to_string(),
        )
    };
    ok(&s.rotator(&["--data-dir", "rotator-data", "init"]));
    let (good, detail) = check("");
    assert!(good && detail.contains("cannot tell"), "{detail}");
    let (good, detail) = check(&format!("apiserver_config = {shipped:?}\n"));
    assert!(good, "{detail}");
    assert!(
        detail.contains("before RBAC") && detail.contains("within 6s"),
        "{detail}"
    );
    let (good, detail) = check(&format!("apiserver_config = {:?}\n", lax.to_str().unwrap()));
    assert!(
        !good && detail.contains("failurePolicy NoOpinion"),
        "{detail}"
    );
    let (good, detail) = check("apiserver_config = \"missing.yaml\"\n");
    assert!(!good && detail.contains("cannot read"), "{detail}");
}

/// The test cluster with rotator's real webhook before RBAC (fact 29):
/// `matchConditions` send only rotator identities, `failurePolicy: Deny`, 1 s
/// TTLs; the daemon's serving certificate and the API server's client
/// certificate come from two throwaway CAs.
struct Wired {
    kx: crate::kubernetes::Kx,
    addr: std::net::SocketAddr,
}

impl Wired {
    async fn new(grace: &str) -> Self {
        use testcluster::authz::{Authorizer, FailurePolicy, WebhookConfig};
        let serving_ca = testcluster::pki::Ca::new("rotator-authz-ca");
        let (tls_cert, tls_key) = serving_ca.serving_cert();
        let api_ca = testcluster::pki::Ca::new("apiserver-client-ca");
        let (api_cert, api_key) = api_ca.client_cert("kube-apiserver", &[], 86400);
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let hook = WebhookConfig::new(
            "rotator",
            &format!("https://{addr}/v1/authorize"),
            &serving_ca.cert_pem,
        )
        .client_cert(&api_cert, &api_key)
        .failure_policy(FailurePolicy::Deny)
        // Generous: on a loaded 2-core CI machine a debug-build answer can be
        // late, and a timeout under Deny would read as a wrong refusal.
        .timeout(Duration::from_secs(10))
        .authorized_ttl(Duration::from_secs(1))
        .unauthorized_ttl(Duration::from_secs(1))
        .match_condition("request.groups.exists(g, g.startsWith('rotator:'))");
        // Relative to the data directory's folder, where rotator runs; written below.
        let extra = format!(
            "[rotation]\ngrace_period = \"{grace}\"\n[authz]\ntls_cert = \"authz.crt\"\ntls_key = \"authz.key\"\nclient_ca_file = \"apiserver-ca.crt\"\n"
        );
        let kx = crate::kubernetes::Kx::new(
            testcluster::Options {
                authorizers: vec![Authorizer::Webhook(hook), Authorizer::Rbac],
                ..Default::default()
            },
            &extra,
        )
        .await;
        for (n, t) in [
            ("authz.crt", &tls_cert),
            ("authz.key", &tls_key),
            ("apiserver-ca.crt", &api_ca.cert_pem),
        ] {
            kx.s.write(n, t);
        }
        ok(&kx.rotator(&["init"]));
        Self { kx, addr }
    }

    fn serve(&self) -> tokio::process::Child {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"));
        c.current_dir(self.kx.s.dir.path())
            .args(["--config", "rotator.toml", "serve", "--authz-addr"])
            .arg(self.addr.to_string())
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())]);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
            c.env_remove(k);
        }
        let log = std::fs::File::create(self.kx.s.path("serve.log")).unwrap();
        c.stderr(log).kill_on_drop(true).spawn().unwrap()
    }

    async fn kubectl(&self, kc: &str, args: &[&str]) -> std::process::Output {
        let kc = self.kx.s.path(kc);
        let mut a = vec![
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--request-timeout=10s",
        ];
        a.extend_from_slice(args);
        crate::common::run_async("kubectl", &a).await
    }

    /// Bindings rotator did not make, which only the webhook can take away:
    /// group `dev` may view everywhere, user `alice` may edit in `team-a`.
    async fn hand_made_bindings(&self) {
        for args in [
            &[
                "create",
                "clusterrolebinding",
                "dev-view",
                "--clusterrole=view",
                "--group=dev",
            ][..],
            &[
                "create",
                "rolebinding",
                "alice-by-name",
                "--clusterrole=edit",
                "--user=alice",
                "-n",
                "team-a",
            ],
        ] {
            ok(&self.kx.admin_kubectl(args).await);
        }
    }

    /// `kubectl ARGS` as `kc` succeeds; otherwise fails with its error and
    /// the daemon's log (which names the webhook's decision).
    async fn allowed(&self, kc: &str, args: &[&str]) {
        let o = self.kubectl(kc, args).await;
        assert!(
            o.status.success(),
            "kubectl {args:?} as {kc} refused: {}\nrotator serve: {}",
            String::from_utf8_lossy(&o.stderr),
            std::fs::read_to_string(self.kx.s.path("serve.log")).unwrap_or_default()
        );
    }

    /// Waits (at most `within`) until `kubectl ARGS` as `kc` succeeds (`want`)
    /// or fails; returns the last output.
    async fn until(
        &self,
        kc: &str,
        args: &[&str],
        want: bool,
        within: Duration,
    ) -> std::process::Output {
        let started = Instant::now();
        loop {
            let o = self.kubectl(kc, args).await;
            if o.status.success() == want {
                return o;
            }
            assert!(
                started.elapsed() < within,
                "kubectl {args:?} as {kc}: still {} after {within:?}: {}\nrotator serve: {}",
                if want { "refused" } else { "allowed" },
                String::from_utf8_lossy(&o.stderr),
                std::fs::read_to_string(self.kx.s.path("serve.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_kubectl_a_revoked_certificate_is_refused_whatever_binds_it() {
    let w = Wired::new("6s").await;
    let r = |args: &[&str]| ok(&w.kx.rotator(args));
    for u in ["alice", "bob"] {
        r(&[
            "add-user",
            u,
            "--group",
            "dev",
            "-n",
            "team-a",
            "--role",
            "edit",
            "--out",
            &format!("{u}.kubeconfig"),
        ]);
    }
    w.hand_made_bindings().await;
    let _daemon = w.serve();
    let in_ns = ["get", "configmaps", "-n", "team-a"];
    let cluster_wide = ["get", "configmaps", "-n", "team-b"];
    let up = Duration::from_secs(20);
    w.until("alice.kubeconfig", &in_ns, true, up).await;
    w.until("alice.kubeconfig", &cluster_wide, true, up).await;
    w.until("bob.kubeconfig", &cluster_wide, true, up).await;

    r(&["revoke", "alice"]);
    // Snapshot refresh (<= 1 s) plus the 1 s TTLs bound how long this takes.
    let o = w
        .until("alice.kubeconfig", &in_ns, false, Duration::from_secs(5))
        .await;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("Forbidden") || err.contains("forbidden"),
        "{err}"
    );
    assert!(
        err.contains("revoked"),
        "the webhook's reason reaches kubectl: {err}"
    );
    // The static group's binding does not help either, once the API server's
    // cached "allowed" for this request (authorizedTTL, 1 s) has run out.
    let o = w
        .until(
            "alice.kubeconfig",
            &cluster_wide,
            false,
            Duration::from_secs(5),
        )
        .await;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("revoked"), "refused by the webhook: {err}");
    // Another member of `dev` keeps both its own and the hand-made permissions.
    w.allowed("bob.kubeconfig", &in_ns).await;
    w.allowed("bob.kubeconfig", &cluster_wide).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_kubectl_grace_fingerprints_outsiders_and_rotator_down() {
    let w = Wired::new("10s").await;
    let r = |args: &[&str]| ok(&w.kx.rotator(args));
    r(&[
        "add-user",
        "alice",
        "--group",
        "dev",
        "-n",
        "team-a",
        "--role",
        "edit",
        "--out",
        "alice1.kubeconfig",
    ]);
    w.hand_made_bindings().await;
    let mut daemon = w.serve();
    let in_ns = ["get", "configmaps", "-n", "team-a"];
    w.until("alice1.kubeconfig", &in_ns, true, Duration::from_secs(20))
        .await;

    // Superseded: works within the grace period.
    r(&["rotate", "alice", "--out", "alice2.kubeconfig"]);
    w.allowed("alice1.kubeconfig", &in_ns).await;
    // A certificate another process has just issued works at once: the daemon
    // reads the database's changes before it would call it unknown (a denial
    // would be cached by the API server for unauthorizedTTL).
    w.allowed("alice2.kubeconfig", &in_ns).await;

    // Three valid certificates; revoking one by serial refuses that one alone
    // (the credential-id fingerprint decides).
    r(&["rotate", "alice", "--out", "alice3.kubeconfig"]);
    w.allowed("alice3.kubeconfig", &in_ns).await;
    let serial2 = show(&w.kx.s, "alice")
        .iter()
        .find(|c| c["generation"] == 2)
        .unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    r(&["revoke", "alice", "--serial", &serial2]);
    let o = w
        .until("alice2.kubeconfig", &in_ns, false, Duration::from_secs(5))
        .await;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("revoked") && err.contains(&serial2), "{err}");
    w.allowed("alice1.kubeconfig", &in_ns).await;
    w.allowed("alice3.kubeconfig", &in_ns).await;

    // Past the grace period the superseded generation 1 is refused; 3 works.
    let o = w
        .until("alice1.kubeconfig", &in_ns, false, Duration::from_secs(16))
        .await;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("superseded"), "{err}");
    w.allowed("alice3.kubeconfig", &in_ns).await;

    // A certificate made outside rotator (same cluster CA, group dev, even the
    // name alice) is not a rotator identity: the webhook is not asked.
    w.kx.s.write(
        "outside.kubeconfig",
        &w.kx.cluster.user_kubeconfig("alice", &["dev"]),
    );
    w.allowed("outside.kubeconfig", &in_ns).await;

    // rotator down, failurePolicy Deny: rotator identities are refused (after
    // the 1 s TTL), everyone else is unaffected.
    daemon.kill().await.unwrap();
    let o = w
        .until("alice3.kubeconfig", &in_ns, false, Duration::from_secs(5))
        .await;
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        err.contains("InternalError") || err.contains("Internal error"),
        "{err}"
    );
    w.allowed("outside.kubeconfig", &in_ns).await;
    ok(&w
        .kubectl("outside.kubeconfig", &["get", "configmaps", "-n", "team-b"])
        .await);
}
