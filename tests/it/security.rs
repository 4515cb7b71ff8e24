//! Security invariants, each with a test that fails if it breaks.
use std::io::Write;

use std::sync::{Arc, Mutex};
use tracing_subscriber::Layer;

use rotator::delivery::{FileSink, WriterSink};

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

signing_variants! {
// SQLite only: the database is searched as the bytes of its file (and WAL), so
// that a key in any table, index or free page is found.
sqlite_only:
#[tokio::test]
async fn no_private_key_reaches_a_log_line_an_error_or_the_database(signing: Signing) {
    let logs = capture_logs();

    let dir = tempfile::tempdir().unwrap();
    let signer = signing.start(dir.path());
    let app = app(
        dir.path(),
        &local_ca_toml(signer.as_ref()),
        Arc::new(rotator::flows::issue::NoFaults),
    )
    .await;
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
    // The CA key is a secret too (the signer's, through it: the data directory has none).
    // Signed for add-user and rotate; the delivery into a missing directory is
    // refused before anything is signed.
    assert_signed_at(dir.path(), signer.as_ref(), 2);
    let ca_key = std::fs::read_to_string(match &signer {
        Some(p) => p.data.join("ca/ca.key"),
        None => dir.path().join("rotator-data/ca/ca.key"),
    })
    .unwrap();

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
    let kc = rotator::delivery::kubeconfig::ClientKubeconfig {
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

signing_variants! {
#[test]
fn key_files_are_0600_and_nothing_else_is_left_readable(signing: Signing) {
    let s = Scratch::signing(signing);
    // A permissive umask must not widen what rotator writes. The shell gets the
    // scratch command's environment: its database and signer socket.
    let scratch = s.command();
    let mut sh = std::process::Command::new("sh");
    for (k, v) in scratch.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let o = sh
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
    s.assert_signed("rotator-data", 1);
    match &s.signer {
        // The signer's own key and log (it runs under the test's umask).
        Some(p) => {
            assert_eq!(mode(&p.data.join("ca/ca.key")), 0o600);
            assert_eq!(mode(&p.log), 0o600);
        }
        None => assert_eq!(mode(&s.path("rotator-data/ca/ca.key")), 0o600),
    }
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
}

/// A CSR for alice (O=her generation group) that asks for more than a
/// client certificate: `is_ca`, key usages, a server name and server auth.
fn greedy_csr(is_ca: bool) -> (Vec<u8>, Vec<String>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = |orgs: &[String]| {
        let mut p = rcgen::CertificateParams::new(vec!["api.example.com".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for o in orgs {
            p.distinguished_name
                .push(rcgen::DnType::OrganizationName, o.as_str());
        }
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        if is_ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.serialize_request(&key).unwrap().der().to_vec()
    };
    // The generation group ends with the suffix of this key (as `rotator fetch` makes it).
    let spki = rotator::pki::parse_csr(&params(&[])).unwrap().spki_der;
    // (One O only: rcgen keeps one value per attribute type.)
    let orgs = vec![rotator::policy::generation_group("alice", 1, &spki)];
    let der = params(&orgs);
    let info = rotator::pki::parse_csr(&der).unwrap();
    assert_eq!(
        info.requests_ca, is_ca,
        "the test request asks for CA:{is_ca}"
    );
    (der, orgs)
}

signing_variants! {
#[tokio::test]
async fn the_issuing_profile_ignores_what_the_csr_asks_for(signing: Signing) {
    use rotator::signer::{NoProgress, SignRequest};
    let dir = tempfile::tempdir().unwrap();
    let signer = signing.start(dir.path());
    let app = app(
        dir.path(),
        &local_ca_toml(signer.as_ref()),
        Arc::new(rotator::flows::issue::NoFaults),
    )
    .await;
    // Whichever way it signs, the app's signer: the in-process CA, or the
    // socket to `rotator signer`, whose own policy sets the profile.
    async fn sign_as_alice(
        app: &rotator::app::App,
        der: &[u8],
        orgs: &[String],
    ) -> Result<rotator::signer::Signed, rotator::signer::SignError> {
        let req = SignRequest {
            credential_id: "x",
            user: "alice",
            organizations: orgs,
            csr_der: der,
            ttl: std::time::Duration::from_secs(3600),
        };
        app.signer.sign(req, &NoProgress).await
    }
    let (der, orgs) = greedy_csr(false);
    let pem = sign_as_alice(&app, &der, &orgs).await.unwrap().certificate_pem;
    let cert = rotator::pki::parse_cert_pem(&pem, "t").unwrap();
    assert!(!cert.is_ca);
    // The lifetime is what the issuer asked, backdated five minutes, whatever the CSR says.
    assert_eq!(cert.not_after - cert.not_before, 3600 + 300);
    // Checked by openssl too: a client certificate, nothing the CSR added.
    let f = dir.path().join("c.pem");
    std::fs::write(&f, &pem).unwrap();
    let text = ok(&run(
        "openssl",
        &["x509", "-in", f.to_str().unwrap(), "-noout", "-text"],
    ));
    assert!(
        text.contains("CA:FALSE")
            && text.contains("TLS Web Client Authentication")
            && !text.contains("Certificate Sign")
            && !text.contains("Server Authentication")
            && !text.contains("api.example.com"),
        "{text}"
    );
    if let Some(p) = &signer {
        assert_eq!(p.signed_serials(), vec![cert.serial.clone()], "signed by the signer");
    }

    // A request that asks to be a CA: in process it comes out CA:FALSE; the
    // signer refuses it outright (ca_requested) and logs the refusal.
    let (ca_der, ca_orgs) = greedy_csr(true);
    let r = sign_as_alice(&app, &ca_der, &ca_orgs).await;
    match &signer {
        None => {
            let cert = rotator::pki::parse_cert_pem(&r.unwrap().certificate_pem, "t").unwrap();
            assert!(!cert.is_ca, "CA:TRUE was requested and must come out CA:FALSE");
        }
        Some(p) => {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("ca_requested"), "{e}");
            let last = p.log_lines().pop().unwrap();
            assert_eq!((&last["outcome"], &last["code"]), (&"refused".into(), &"ca_requested".into()));
            assert_eq!(p.signed_serials().len(), 1, "nothing more signed");
        }
    }

    // A CSR for other groups than the issuer was told is refused, whatever it asks.
    let other = vec!["system:masters".to_string()];
    let e = sign_as_alice(&app, &der, &other).await.unwrap_err().to_string();
    assert!(e.contains("groups"), "{e}");
    // And through the signer, a CSR that really asks for system:masters (what
    // a compromised daemon would send) is refused by the signer itself.
    if let Some(p) = &signer {
        let key = rotator::pki::PrivateKey::generate(rotator::pki::KeyType::EcdsaP256).unwrap();
        let orgs = vec![
            "system:masters".to_string(),
            rotator::policy::generation_group("alice", 1, &key.spki_der()),
        ];
        let der = rotator::pki::build_csr(
            &key,
            &rotator::pki::subject_name("alice", &orgs).unwrap(),
        )
        .unwrap();
        let e = sign_as_alice(&app, &der, &orgs).await.unwrap_err().to_string();
        assert!(e.contains("group_denied"), "{e}");
        let last = p.log_lines().pop().unwrap();
        assert_eq!((&last["outcome"], &last["code"]), (&"refused".into(), &"group_denied".into()));
        assert_eq!(p.signed_serials().len(), 1, "nothing more signed");
    }
}
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
