//! Security invariants, each with a test that fails if it breaks.
use std::io::Write;

use std::sync::{Arc, Mutex};
use tracing_subscriber::Layer;

use rotator::sink::{FileSink, WriterSink};

use crate::common::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// Writes into the capture of the current thread, if it has one.
struct ThreadWriter;

impl Write for ThreadWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|c| {
            if let Some(c) = c.borrow().as_ref() {
                c.0.lock().unwrap().extend_from_slice(b);
            }
        });
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line (TRACE and up) emitted on this thread from now on.
/// One global subscriber for the whole test binary, filtered per event to the
/// threads that capture: a thread-local default subscriber loses events when
/// other tests' threads cache callsite interest first.
fn capture_logs() -> Captured {
    use tracing_subscriber::layer::SubscriberExt;
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(|| ThreadWriter)
            .with_ansi(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|_| {
                CAPTURE.with(|c| c.borrow().is_some())
            }));
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer));
    });
    let c = Captured::default();
    CAPTURE.with(|slot| *slot.borrow_mut() = Some(c.clone()));
    c
}

/// Lines of base64 in a PEM body, long enough to be unmistakable.
fn pem_body_lines(pem: &str) -> Vec<String> {
    pem.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn no_private_key_reaches_a_log_line_an_error_or_the_database() {
    let logs = capture_logs();

    let dir = tempfile::tempdir().unwrap();
    let app = plain_app(dir.path()).await;
    let mut delivered = Vec::new();
    let mut errors = Vec::new();
    for round in 0..2 {
        let mut buf = Vec::new();
        let r = if round == 0 {
            app.issuer()
                .add_user(
                    spec("alice"),
                    &mut WriterSink {
                        name: "buffer",
                        writer: &mut buf,
                    },
                    "test",
                )
                .await
        } else {
            app.issuer()
                .rotate(
                    "alice",
                    &mut WriterSink {
                        name: "buffer",
                        writer: &mut buf,
                    },
                    "test",
                )
                .await
        };
        r.unwrap();
        delivered.push(String::from_utf8(buf).unwrap());
    }
    // A failing delivery produces an error after the key exists.
    let mut bad = FileSink {
        path: dir.path().join("missing/dir/k"),
    };
    errors.push(format!(
        "{:?} {}",
        app.issuer()
            .rotate("alice", &mut bad, "test")
            .await
            .unwrap_err(),
        "x"
    ));
    // The CA key is a secret too.
    let ca_key = std::fs::read_to_string(dir.path().join("rotator-data/ca/ca.key")).unwrap();

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("credential stored"),
        "TRACE logging was captured: {logs}"
    );
    let db = std::fs::read(dir.path().join("rotator-data/rotator.db")).unwrap();
    let wal = std::fs::read(dir.path().join("rotator-data/rotator.db-wal")).unwrap_or_default();
    let db_text = String::from_utf8_lossy(&db).to_string() + &String::from_utf8_lossy(&wal);
    let mut secrets = pem_body_lines(&ca_key);
    for kc in &delivered {
        let kc = kube::config::Kubeconfig::from_yaml(kc).unwrap();
        use secrecy::ExposeSecret;
        let key_b64 = kc.auth_infos[0]
            .auth_info
            .as_ref()
            .unwrap()
            .client_key_data
            .as_ref()
            .unwrap()
            .expose_secret()
            .to_string();
        use base64::Engine;
        let key_pem = String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(&key_b64)
                .unwrap(),
        )
        .unwrap();
        secrets.extend(pem_body_lines(&key_pem));
        secrets.push(key_b64[..60].to_string());
    }
    assert!(secrets.len() >= 6);
    for s in &secrets {
        assert!(
            !logs.contains(s.as_str()),
            "a private key appears in the logs"
        );
        assert!(
            !db_text.contains(s.as_str()),
            "a private key appears in the database"
        );
        for e in &errors {
            assert!(!e.contains(s.as_str()), "a private key appears in an error");
        }
    }
}

#[tokio::test]
async fn debug_output_of_key_holding_types_is_redacted() {
    let k = rotator::pki::PrivateKey::generate(rotator::pki::KeyType::EcdsaP384).unwrap();
    let pem = k.to_pem();
    let line = &pem_body_lines(&pem)[0];
    assert!(!format!("{k:?}").contains(line.as_str()));

    let dir = tempfile::tempdir().unwrap();
    let app = plain_app(dir.path()).await;
    let ca_key = std::fs::read_to_string(dir.path().join("rotator-data/ca/ca.key")).unwrap();
    let signer_dbg = format!(
        "{:?}",
        rotator::signer::LocalCa::load(&app.settings.local_ca, app.clock.clone()).unwrap()
    );
    for l in pem_body_lines(&ca_key) {
        assert!(
            !signer_dbg.contains(&l),
            "LocalCa Debug leaks its key: {signer_dbg}"
        );
    }
    let kc = rotator::kubeconfig::ClientKubeconfig {
        cluster_name: "c",
        server: "https://x",
        ca_bundle_pem: "",
        user: "u",
        namespace: None,
        certificate_pem: "",
        key_pem: &pem,
    };
    assert!(!format!("{kc:?}").contains(line.as_str()));
}

#[test]
fn key_files_are_0600_and_nothing_else_is_left_readable() {
    let s = Scratch::new();
    // A permissive umask must not widen what rotator writes.
    let o = std::process::Command::new("sh")
        .current_dir(s.dir.path())
        .args([
            "-c",
            &format!(
                "umask 000 && {} add-user alice -n team-a --role view",
                env!("CARGO_BIN_EXE_rotator")
            ),
        ])
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(mode(&s.path("alice.kubeconfig")), 0o600);
    assert_eq!(mode(&s.path("rotator-data/ca/ca.key")), 0o600);
    assert_eq!(mode(&s.path("rotator-data")), 0o700);
    // Rewriting over an existing, world-readable file tightens it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        s.path("alice.kubeconfig"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    ok(&s.rotator(&["rotate", "alice"]));
    assert_eq!(mode(&s.path("alice.kubeconfig")), 0o600);
    let stray: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(".rotator-"))
        .collect();
    assert!(stray.is_empty(), "temporary files left: {stray:?}");
}

#[tokio::test]
async fn the_issuing_profile_ignores_what_the_csr_asks_for() {
    // A request that asks to be a CA, signed by the right subject.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::OrganizationName, "dev");
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "alice");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let csr = p.serialize_request(&key).unwrap();
    let info = rotator::pki::parse_csr(csr.der()).unwrap();
    assert!(info.requests_ca, "the test request really asks for CA:TRUE");

    let dir = tempfile::tempdir().unwrap();
    let app = plain_app(dir.path()).await;
    let ca = rotator::signer::LocalCa::load(&app.settings.local_ca, app.clock.clone()).unwrap();
    let orgs = vec!["dev".to_string()];
    let req = rotator::signer::SignRequest {
        credential_id: "x",
        user: "alice",
        organizations: &orgs,
        csr_der: csr.der(),
        ttl: std::time::Duration::from_secs(3600),
    };
    let pem = ca.issue(&req, rotator::pki::CertProfile::Client).unwrap();
    let cert = rotator::pki::parse_cert_pem(&pem, "t").unwrap();
    assert!(
        !cert.is_ca,
        "CA:TRUE was requested and must come out CA:FALSE"
    );
    assert_eq!(cert.not_after - cert.not_before, 3600 + 300);
    // Checked by openssl too.
    let f = dir.path().join("c.pem");
    std::fs::write(&f, &pem).unwrap();
    let text = ok(&run(
        "openssl",
        &[
            "x509",
            "-in",
            f.to_str().unwrap(),
            "-noout",
            "-ext",
            "basicConstraints,keyUsage",
        ],
    ));
    assert!(
        text.contains("CA:FALSE") && !text.contains("Certificate Sign"),
        "{text}"
    );

    // A CSR for another subject is refused, whatever it asks.
    let other = vec!["system:masters".to_string()];
    let req = rotator::signer::SignRequest {
        organizations: &other,
        ..req
    };
    let e = ca
        .issue(&req, rotator::pki::CertProfile::Client)
        .unwrap_err()
        .to_string();
    assert!(e.contains("groups"), "{e}");
}

#[test]
fn malformed_csrs_are_refused_with_a_reason() {
    for (input, needle) in [
        (&b"not a csr"[..], "malformed"),
        (
            &b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"[..],
            "malformed",
        ),
    ] {
        let e = rotator::pki::parse_csr(input).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    // A valid CSR with one flipped signature byte.
    let key = rotator::pki::PrivateKey::generate(rotator::pki::KeyType::EcdsaP256).unwrap();
    let mut der =
        rotator::pki::build_csr(&key, &rotator::pki::subject_name("alice", &[]).unwrap()).unwrap();
    let n = der.len();
    der[n - 5] ^= 0xff;
    let e = rotator::pki::parse_csr(&der).unwrap_err().to_string();
    assert!(e.contains("signature"), "{e}");
}
