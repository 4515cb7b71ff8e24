//! `rotator signer`: the local CA key in a separate process (#12). The issuing
//! flows run in process and through a real signer process; a client speaking to
//! the socket directly, as a compromised daemon would, is refused and logged.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rotator::pki::{self, KeyType, PrivateKey};
use rotator::signer::local_ca::socket::call;

use crate::common::{Scratch, SignerProc, fails_with, mode, ok, run, signing_variants};

/// A PEM CSR for `cn` with `orgs`; `gen` adds cn's generation group for this key.
fn csr(key: &PrivateKey, cn: &str, orgs: &[&str], generation: Option<i64>) -> String {
    let mut o: Vec<String> = orgs.iter().map(|s| s.to_string()).collect();
    if let Some(g) = generation {
        o.push(rotator::policy::generation_group(cn, g, &key.spki_der()));
    }
    let der = pki::build_csr(key, &pki::subject_name(cn, &o).unwrap()).unwrap();
    pki::pem_encode("CERTIFICATE REQUEST", &der)
}

fn sign_body(csr: &str, ttl: u64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"csr": csr, "ttl_seconds": ttl})).unwrap()
}

async fn sign(socket: &Path, body: Vec<u8>) -> (u16, serde_json::Value) {
    let (status, bytes) = call(socket, "POST", "/v1/sign", body).await.expect("call");
    (status, serde_json::from_slice(&bytes).expect("JSON answer"))
}

#[tokio::test]
async fn a_compromised_daemon_is_refused_with_codes_and_every_refusal_is_logged() {
    let s = Scratch::new();
    let signer = SignerProc::start(s.dir.path(), "", &[]);
    assert_eq!(mode(&signer.socket), 0o660);
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let other = PrivateKey::generate(KeyType::EcdsaP256).unwrap();

    // CA:TRUE asked for in the CSR, with openssl, over an otherwise valid subject.
    let key_file = s.write("k.pem", &key.to_pem());
    let gg = rotator::policy::generation_group("alice", 1, &key.spki_der());
    let ca_csr = ok(&run(
        "openssl",
        &[
            "req",
            "-new",
            "-key",
            key_file.to_str().unwrap(),
            "-subj",
            &format!("/CN=alice/O=dev/O={gg}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    ));
    let wrong_suffix = {
        let mut o = vec!["dev".to_string()];
        o.push(rotator::policy::generation_group(
            "alice",
            1,
            &other.spki_der(),
        ));
        let der = pki::build_csr(&key, &pki::subject_name("alice", &o).unwrap()).unwrap();
        pki::pem_encode("CERTIFICATE REQUEST", &der)
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "O=system:masters",
            sign_body(&csr(&key, "alice", &["system:masters"], Some(1)), 3600),
            422,
            "group_denied",
        ),
        (
            "CN=system:admin",
            sign_body(&csr(&key, "system:admin", &[], None), 3600),
            422,
            "subject_denied",
        ),
        (
            "no generation group",
            sign_body(&csr(&key, "alice", &["dev"], None), 3600),
            422,
            "generation_group_missing",
        ),
        (
            "another key's suffix",
            sign_body(&wrong_suffix, 3600),
            422,
            "generation_group_mismatch",
        ),
        (
            "bob's generation group",
            sign_body(
                &{
                    let o = vec![
                        rotator::policy::generation_group("alice", 1, &key.spki_der()),
                        rotator::policy::generation_group("bob", 1, &key.spki_der()),
                    ];
                    let der =
                        pki::build_csr(&key, &pki::subject_name("alice", &o).unwrap()).unwrap();
                    pki::pem_encode("CERTIFICATE REQUEST", &der)
                },
                3600,
            ),
            422,
            "generation_group_mismatch",
        ),
        (
            "kubeadm:cluster-admins",
            sign_body(
                &csr(&key, "alice", &["kubeadm:cluster-admins"], Some(1)),
                3600,
            ),
            422,
            "group_denied",
        ),
        (
            "48h over the 24h maximum",
            sign_body(&csr(&key, "alice", &["dev"], Some(1)), 48 * 3600),
            422,
            "ttl_too_long",
        ),
        ("CA:TRUE", sign_body(&ca_csr, 3600), 422, "ca_requested"),
        (
            "garbage CSR",
            sign_body(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                3600,
            ),
            400,
            "bad_csr",
        ),
        ("not JSON", b"{csr".to_vec(), 400, "bad_request"),
        (
            "10 MB body",
            sign_body(&"A".repeat(10 << 20), 3600),
            413,
            "body_too_large",
        ),
    ];
    for (what, body, status, code) in &cases {
        let (got, answer) = sign(&signer.socket, body.clone()).await;
        assert_eq!(got, *status, "{what}: {answer}");
        assert_eq!(answer["error"]["code"], *code, "{what}: {answer}");
        assert!(
            !answer["error"]["fix"].as_str().unwrap().is_empty(),
            "{what}: {answer}"
        );
        assert!(answer.get("certificate").is_none(), "{what}: {answer}");
    }
    let lines = signer.log_lines();
    assert_eq!(lines.len(), cases.len(), "{lines:?}");
    assert!(lines.iter().all(|l| l["outcome"] == "refused"), "{lines:?}");
    for ((what, _, _, code), line) in cases.iter().zip(&lines) {
        assert_eq!(line["code"], *code, "{what}: {line}");
        assert_eq!(line["peer_uid"], rustix_uid(), "{what}: {line}");
        assert!(line["peer_pid"].as_i64().unwrap() > 0, "{line}");
        assert!(line["time"].as_str().unwrap().contains('T'), "{line}");
    }
    assert_eq!(mode(&signer.log), 0o600);

    // The same subject, done right, is signed: client auth only, not a CA, and
    // the lifetime the signer allows.
    let (status, answer) = sign(
        &signer.socket,
        sign_body(&csr(&key, "alice", &["dev"], Some(1)), 3600),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let pem = answer["certificate"].as_str().unwrap();
    let info = pki::parse_cert_pem(pem, "signed").unwrap();
    assert!(!info.is_ca);
    assert_eq!(answer["serial"], info.serial);
    assert!(info.not_after - info.not_before <= 3600 + 300);
    let cert = s.write("alice.crt", pem);
    let text = ok(&run(
        "openssl",
        &["x509", "-in", cert.to_str().unwrap(), "-noout", "-text"],
    ));
    assert!(text.contains("CA:FALSE") && text.contains("TLS Web Client Authentication"));
    assert!(!text.contains("Server Authentication"), "{text}");
    ok(&run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            signer.ca().to_str().unwrap(),
            "-purpose",
            "sslclient",
            cert.to_str().unwrap(),
        ],
    ));
    let last = signer.log_lines().pop().unwrap();
    assert_eq!(last["outcome"], "signed");
    assert_eq!(last["serial"], info.serial);
    assert_eq!(last["fingerprint"], info.fingerprint);
    assert_eq!(last["not_after"], info.not_after);

    // curl, as an operator would.
    let health = ok(&run(
        "curl",
        &[
            "-s",
            "--unix-socket",
            signer.socket.to_str().unwrap(),
            "http://signer/healthz",
        ],
    ));
    assert!(health.contains("ok"), "{health}");
}

fn rustix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::test]
async fn a_burst_of_1000_requests_is_rate_limited_and_each_answer_is_logged() {
    let s = Scratch::new();
    let signer = SignerProc::start(s.dir.path(), "rate_per_second = 20\nburst = 50\n", &[]);
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let body = sign_body(&csr(&key, "alice", &["dev"], Some(1)), 3600);
    let socket = Arc::new(signer.socket.clone());
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (socket, body, gate) = (socket.clone(), body.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            sign(&socket, body).await
        }));
    }
    let (mut signed, mut limited) = (0u64, 0u64);
    for t in tasks {
        let (status, answer) = t.await.unwrap();
        match status {
            200 => signed += 1,
            429 => {
                assert_eq!(answer["error"]["code"], "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other}: {answer}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(signed + limited, 1000);
    let allowed = 50 + (20.0 * elapsed).ceil() as u64;
    assert!(
        signed <= allowed,
        "{signed} signed in {elapsed:.2}s, allowed {allowed}"
    );
    assert!(limited >= 1000 - allowed, "{limited} limited");
    let lines = signer.log_lines();
    let count = |outcome: &str, code: Option<&str>| {
        lines
            .iter()
            .filter(|l| l["outcome"] == outcome && code.is_none_or(|c| l["code"] == c))
            .count() as u64
    };
    assert_eq!(count("signed", None), signed);
    assert_eq!(count("refused", Some("rate_limited")), limited);
    eprintln!("burst of 1000 in {elapsed:.2}s: {signed} signed, {limited} rate-limited");
}

#[tokio::test]
async fn peers_outside_allowed_uids_are_refused() {
    let s = Scratch::new();
    let me = rustix_uid();
    let signer = SignerProc::start(s.dir.path(), &format!("allowed_uids = [{}]\n", me + 1), &[]);
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let (status, answer) = sign(
        &signer.socket,
        sign_body(&csr(&key, "alice", &["dev"], Some(1)), 3600),
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["error"]["code"], "peer_not_allowed");
    let lines = signer.log_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["code"], "peer_not_allowed");
    assert_eq!(lines[0]["peer_uid"], me);
}

/// The daemon/CLI config: in process (`socket` None) or through the signer.
fn cli_config(s: &Scratch, socket: Option<&Path>) -> PathBuf {
    let mut t = format!(
        "data_dir = {:?}\n[cluster]\nserver = \"https://127.0.0.1:6443\"\n",
        s.path("rotator-data")
    );
    if let Some(p) = socket {
        t.push_str(&format!("[local_ca]\nsocket = {p:?}\n"));
    }
    s.write("rotator.toml", &t)
}

fn kubeconfig_cert_verifies(s: &Scratch, kubeconfig: &str, ca_pem: &str) -> String {
    let (_, ca, cert, _) = crate::common::kubeconfig_parts(&s.path(kubeconfig));
    assert_eq!(
        ca.trim(),
        ca_pem.trim(),
        "the kubeconfig trusts the signer's CA"
    );
    let c = s.write("check.crt", &cert);
    let a = s.write("check-ca.crt", ca_pem);
    ok(&run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            a.to_str().unwrap(),
            "-purpose",
            "sslclient",
            c.to_str().unwrap(),
        ],
    ));
    pki::parse_cert_pem(&cert, "kubeconfig").unwrap().serial
}

signing_variants! {
    #[tokio::test]
    async fn cli_add_user_rotate_revoke(signing: Signing) {
        let s = Scratch::signing(signing);
        // The socket comes from the environment (Scratch::signing).
        let cfg = cli_config(&s, None);
        let cfg = cfg.to_str().unwrap();
        let cli = |args: &[&str]| {
            let mut a = vec!["--config", cfg];
            a.extend_from_slice(args);
            s.rotator(&a)
        };
        ok(&cli(&[
            "add-user",
            "alice",
            "--group",
            "dev",
            "--namespace",
            "team-a",
            "--role",
            "edit",
        ]));
        let ca_pem = std::fs::read_to_string(s.ca_cert("rotator-data")).unwrap();
        let first = kubeconfig_cert_verifies(&s, "alice.kubeconfig", &ca_pem);
        ok(&cli(&["rotate", "alice"]));
        let second = kubeconfig_cert_verifies(&s, "alice.kubeconfig", &ca_pem);
        assert_ne!(first, second);
        ok(&cli(&["revoke", "alice"]));
        let shown = ok(&cli(&["show", "alice", "--output", "json"]));
        assert!(shown.contains("revoked"), "{shown}");
        match &s.signer {
            Some(p) => {
                // The daemon side made no CA of its own and read no key.
                assert!(!s.path("rotator-data/ca").exists());
                assert_eq!(p.signed_serials(), vec![first, second]);
            }
            None => assert!(s.path("rotator-data/ca/ca.key").exists()),
        }
    }
}

#[tokio::test]
async fn api_enrollment_in_process_app_through_the_signer_and_it_reconnects_after_a_restart() {
    let s = Scratch::new();
    let mut signer = SignerProc::start(s.dir.path(), "", &[]);
    let app = crate::common::app(
        s.dir.path(),
        &format!(
            "[cluster]\nserver = \"https://127.0.0.1:6443\"\n[local_ca]\nsocket = {:?}\n",
            signer.socket
        ),
        Arc::new(rotator::flows::issue::NoFaults),
    )
    .await;
    assert_eq!(
        app.signer.ca_bundle_pem(),
        std::fs::read_to_string(signer.ca()).unwrap()
    );
    let peer = rotator::flows::self_service::Peer {
        addr: "127.0.0.1:1".parse().unwrap(),
        certificate_der: None,
    };
    let mut serials = Vec::new();
    for (round, name) in ["alice", "bob"].into_iter().enumerate() {
        if round == 1 {
            // A restarted signer (same key, same socket): the next request reconnects.
            signer.kill();
            signer = SignerProc::start(s.dir.path(), "", &[]);
        }
        let created = rotator::flows::enroll::add_user(&app, &crate::common::spec(name))
            .await
            .unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        use base64::Engine;
        let subject = rotator::flows::self_service::subject(
            &app,
            &peer,
            rotator::flows::self_service::SubjectRequest {
                token: Some(created.token.to_string()),
                public_key: Some(base64::engine::general_purpose::STANDARD.encode(key.spki_der())),
            },
        )
        .await
        .unwrap();
        let der = pki::build_csr(
            &key,
            &pki::subject_name(&subject.common_name, &subject.organizations).unwrap(),
        )
        .unwrap();
        let grant = rotator::flows::self_service::enroll(
            &app,
            &peer,
            rotator::flows::self_service::EnrollRequest {
                token: created.token.to_string(),
                csr: pki::pem_encode("CERTIFICATE REQUEST", &der),
            },
        )
        .await
        .unwrap();
        serials.push(grant.serial);
    }
    let signed: Vec<_> = signer
        .log_lines()
        .into_iter()
        .filter(|l| l["outcome"] == "signed")
        .map(|l| l["serial"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(signed, serials);
}

#[tokio::test]
async fn signer_killed_mid_request_fails_cleanly_and_a_rerun_finishes() {
    let s = Scratch::new();
    let mut signer = SignerProc::start(
        s.dir.path(),
        "",
        &[("ROTATOR_FAULT", "signer-sign:sleep-5000")],
    );
    let socket = signer.socket.clone();
    let cfg = cli_config(&s, Some(&socket));
    let mut cli = Command::new(env!("CARGO_BIN_EXE_rotator"));
    cli.current_dir(s.dir.path()).args([
        "--config",
        cfg.to_str().unwrap(),
        "add-user",
        "alice",
        "--group",
        "dev",
        "--namespace",
        "team-a",
        "--role",
        "edit",
    ]);
    let pending = tokio::process::Command::from(cli).output();
    let killer = async {
        // The request is in the signer (its log has nothing yet): kill it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        signer.kill();
    };
    let (out, ()) = tokio::join!(pending, killer);
    let out = out.unwrap();
    let err = fails_with(&out, 8);
    assert!(err.contains("fix:"), "{err}");
    assert!(!s.path("alice.kubeconfig").exists());
    assert!(signer.log_lines().is_empty());

    // A signer again (the stale socket is replaced); the rerun finishes.
    let signer = SignerProc::start(s.dir.path(), "", &[]);
    let cfg = cfg.to_str().unwrap();
    let again = s.rotator(&[
        "--config",
        cfg,
        "add-user",
        "alice",
        "--group",
        "dev",
        "--namespace",
        "team-a",
        "--role",
        "edit",
    ]);
    let again = if again.status.success() {
        again
    } else {
        // The user was recorded before the signature failed: rotate issues it.
        s.rotator(&["--config", cfg, "rotate", "alice"])
    };
    ok(&again);
    let ca = std::fs::read_to_string(signer.ca()).unwrap();
    kubeconfig_cert_verifies(&s, "alice.kubeconfig", &ca);
    let live = s
        .count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
        .await;
    assert_eq!(live, 1);
}

#[tokio::test]
async fn the_daemon_never_opens_the_key_file() {
    let root = rustix_uid() == 0;
    if !root || run("sh", &["-c", "command -v setpriv"]).stdout.is_empty() {
        eprintln!("SKIPPED the_daemon_never_opens_the_key_file: needs root and setpriv");
        return;
    }
    let s = Scratch::new();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let signer = SignerProc::start(s.dir.path(), "", &[]);
    let key = signer.data.join("ca/ca.key");
    assert_eq!(mode(&key), 0o600);
    // The daemon's user (nobody) may open the socket through its group, read the
    // CA certificate, and is configured with the key file it must never read.
    std::os::unix::fs::chown(&signer.socket, None, Some(65534)).unwrap();
    std::fs::set_permissions(
        signer.socket.parent().unwrap(),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let ca = s.write("ca.crt", &std::fs::read_to_string(signer.ca()).unwrap());
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let daemon_dir = s.path("daemon");
    std::fs::create_dir(&daemon_dir).unwrap();
    std::os::unix::fs::chown(&daemon_dir, Some(65534), Some(65534)).unwrap();
    let cfg = |socket: bool| {
        let mut t = format!(
            "data_dir = {:?}\n[cluster]\nserver = \"https://127.0.0.1:6443\"\n[local_ca]\ncert_file = {ca:?}\nkey_file = {key:?}\n",
            daemon_dir.join("data")
        );
        if socket {
            t.push_str(&format!("socket = {:?}\n", signer.socket));
        }
        let p = s.write(if socket { "sock.toml" } else { "key.toml" }, &t);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    };
    let as_nobody = |cfg: &Path, args: &[&str]| {
        Command::new("setpriv")
            .current_dir(&daemon_dir)
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_rotator"))
            .arg("--config")
            .arg(cfg)
            .args(args)
            .env_remove("ROTATOR_CONFIG")
            .output()
            .unwrap()
    };
    let add = [
        "add-user",
        "alice",
        "--group",
        "dev",
        "--namespace",
        "team-a",
        "--role",
        "edit",
    ];
    // Without the socket the same user cannot sign: the key is unreadable to it.
    let denied = as_nobody(&cfg(false), &add);
    assert!(!denied.status.success(), "nobody read the CA key");
    std::fs::remove_dir_all(daemon_dir.join("data")).ok();
    // Through the signer it can, and never touches the key.
    ok(&as_nobody(&cfg(true), &add));
    let doctor = as_nobody(&cfg(true), &["doctor"]);
    let text = String::from_utf8_lossy(&doctor.stdout);
    assert!(text.contains("signer socket"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("CA key unreadable") && !l.contains("FAIL")),
        "{text}"
    );
    assert_eq!(
        signer
            .log_lines()
            .iter()
            .filter(|l| l["outcome"] == "signed" && l["peer_uid"] == 65534)
            .count(),
        1
    );
}

/// Through the socket the key is the signer's: `local_ca.cert_file` alone pins
/// the CA it must have (README, "The signer process"), and `init` names the CA
/// it really uses, never a path in the data directory that does not exist.
#[tokio::test]
async fn through_the_socket_cert_file_alone_pins_the_ca_and_init_names_it() {
    let s = Scratch::new();
    let signer = SignerProc::start(s.dir.path(), "", &[]);
    let ca = s.write("ca.crt", &std::fs::read_to_string(signer.ca()).unwrap());
    let init = |name: &str, local_ca: &str| {
        let cfg = s.write(
            name,
            &format!(
                "data_dir = {:?}\n[cluster]\nserver = \"https://127.0.0.1:6443\"\n[local_ca]\nsocket = {:?}\n{local_ca}",
                s.path(&format!("{name}-data")),
                signer.socket
            ),
        );
        s.rotator(&["--config", cfg.to_str().unwrap(), "init"])
    };
    let out = ok(&init("pinned.toml", &format!("cert_file = {ca:?}\n")));
    let line = out
        .lines()
        .find(|l| l.starts_with("CA certificate"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.ends_with(ca.to_str().unwrap()), "{out}");

    let out = ok(&init("unpinned.toml", ""));
    let line = out
        .lines()
        .find(|l| l.starts_with("CA certificate"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains(&format!("the signer's, from {}", signer.socket.display())),
        "{out}"
    );
    assert!(!s.path("unpinned.toml-data/ca").exists(), "{out}");
}
