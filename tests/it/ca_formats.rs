//! An existing CA can be configured instead of rotator's own: a kubeadm cluster's
//! PKCS#1 RSA key, openssl's SEC1 EC key, or PKCS#8 — all made here by openssl.
use crate::common::*;

/// An openssl key (`keygen` is the openssl subcommand and its options; genrsa
/// takes its size last) and a self-signed CA certificate for it.
fn make_ca(s: &Scratch, name: &str, keygen: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let key = s.path(&format!("{name}.key"));
    let key_s = key.to_str().unwrap().to_string();
    let mut args: Vec<&str> = keygen.to_vec();
    let size = (args[0] == "genrsa").then(|| args.pop().unwrap());
    args.extend(["-out", &key_s]);
    args.extend(size);
    ok(&run("openssl", &args));
    let crt = s.path(&format!("{name}.crt"));
    ok(&run(
        "openssl",
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &key_s,
            "-subj",
            "/CN=kubernetes",
            "-days",
            "3650",
            "-out",
            crt.to_str().unwrap(),
        ],
    ));
    (key, crt)
}

#[test]
fn kubeadm_openssl_and_pkcs8_ca_keys_all_sign_verifiable_certificates() {
    let s = Scratch::new();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "rsa-pkcs1",
            &["genrsa", "-traditional", "2048"],
            "BEGIN RSA PRIVATE KEY",
        ),
        (
            "ec-sec1",
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "ec-p384-pkcs8",
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
            ],
            "BEGIN PRIVATE KEY",
        ),
        (
            "rsa-pkcs8",
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            "BEGIN PRIVATE KEY",
        ),
    ];
    for (name, keygen, header) in cases {
        let (key, crt) = make_ca(&s, name, keygen);
        assert!(
            std::fs::read_to_string(&key).unwrap().contains(header),
            "{name}: openssl wrote another format"
        );
        s.write(
            &format!("{name}.toml"),
            &format!(
                "data_dir = \"data-{name}\"\n[local_ca]\ncert_file = {:?}\nkey_file = {:?}\n",
                crt, key
            ),
        );
        let cfg = format!("{name}.toml");
        let out = format!("{name}.kubeconfig");
        ok(&s.rotator(&[
            "--config", &cfg, "add-user", "alice", "-n", "team-a", "--role", "view", "--out", &out,
        ]));
        let (_, ca, cert, _) = kubeconfig_parts(&s.path(&out));
        assert_eq!(
            ca,
            std::fs::read_to_string(&crt).unwrap(),
            "{name}: the kubeconfig carries the configured CA"
        );
        let leaf = s.write(&format!("{name}.leaf.crt"), &cert);
        let v = run(
            "openssl",
            &[
                "verify",
                "-CAfile",
                crt.to_str().unwrap(),
                leaf.to_str().unwrap(),
            ],
        );
        assert!(
            v.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&v.stdout)
        );
        // rotator never rewrites a CA it was given.
        assert!(!s.path(&format!("data-{name}/ca")).exists(), "{name}");
    }
}

#[test]
fn a_configured_ca_that_is_missing_or_mismatched_is_an_error_not_a_new_ca() {
    let s = Scratch::new();
    s.write(
        "missing.toml",
        "[local_ca]\ncert_file = \"nope.crt\"\nkey_file = \"nope.key\"\n",
    );
    let e = fails_with(&s.rotator(&["--config", "missing.toml", "init"]), 8);
    assert!(e.contains("nope.crt") && e.contains("fix:"), "{e}");
    assert!(!s.path("nope.key").exists());

    make_ca(
        &s,
        "a",
        &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
    );
    make_ca(
        &s,
        "b",
        &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
    );
    s.write(
        "mixed.toml",
        "[local_ca]\ncert_file = \"a.crt\"\nkey_file = \"b.key\"\n",
    );
    let e = fails_with(&s.rotator(&["--config", "mixed.toml", "init"]), 8);
    assert!(e.contains("does not belong"), "{e}");
    s.write("half.toml", "[local_ca]\ncert_file = \"a.crt\"\n");
    let e = fails_with(&s.rotator(&["--config", "half.toml", "init"]), 3);
    assert!(e.contains("together"), "{e}");
}
