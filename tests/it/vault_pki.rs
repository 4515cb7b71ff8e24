//! The `vault-pki` signer against a real OpenBao server (`bao server -dev`) whose
//! PKI mount holds the test cluster's client CA, with the real kubectl and openssl
//! as the independent checks.
use std::path::PathBuf;
use std::process::Output;

use testcluster::Options;

use crate::common::*;
use crate::kubernetes::Kx;
use crate::vault::Bao;

/// The PKI mount as an operator sets it up, with the `bao` CLI: the cluster's
/// client CA imported (`pki/config/ca`, pem_bundle = certificate + key), a role
/// `rotator` for sign-verbatim and a role `short` whose max_ttl (15m) forbids
/// the lifetimes the tests ask for. rotator's own token may only sign through
/// `rotator` and `short` (a least-privilege policy).
pub struct Pki {
    pub token_file: PathBuf,
    pub client_ca: PathBuf,
}

pub fn setup_pki(bao: &Bao, kx: &Kx) -> Pki {
    let bundle = kx.s.write(
        "vault-ca-bundle.pem",
        &format!(
            "{}{}",
            kx.cluster.client_ca_pem(),
            kx.cluster.client_ca_key_pem()
        ),
    );
    let client_ca = kx.s.write("client-ca.pem", kx.cluster.client_ca_pem());
    let b = |args: &[&str]| ok(&bao.cli(args));
    b(&["secrets", "enable", "pki"]);
    b(&["secrets", "tune", "-max-lease-ttl=8760h", "pki"]);
    b(&[
        "write",
        "pki/config/ca",
        &format!("pem_bundle=@{}", bundle.display()),
    ]);
    std::fs::remove_file(&bundle).unwrap();
    for (role, max_ttl) in [("rotator", "720h"), ("short", "15m")] {
        b(&[
            "write",
            &format!("pki/roles/{role}"),
            "allow_any_name=true",
            "enforce_hostnames=false",
            "key_type=any",
            "no_store=true",
            &format!("max_ttl={max_ttl}"),
        ]);
    }
    let policy = kx.s.write(
        "rotator-pki.hcl",
        "path \"pki/sign-verbatim/rotator\" { capabilities = [\"update\"] }\n\
         path \"pki/sign-verbatim/short\" { capabilities = [\"update\"] }\n",
    );
    b(&["policy", "write", "rotator-pki", policy.to_str().unwrap()]);
    let token = b(&[
        "token",
        "create",
        "-policy=rotator-pki",
        "-ttl=2h",
        "-field=token",
    ]);
    let token_file = kx.s.path("vault.token");
    std::fs::write(&token_file, token.trim()).unwrap();
    Pki {
        token_file,
        client_ca,
    }
}

/// The `[vault]` and `[vault_pki]` sections for `role`.
pub fn vault_toml(bao: &Bao, pki: &Pki, role: &str) -> String {
    format!(
        "[vault]\naddress = {:?}\nauth_method = \"token\"\ntoken_file = {:?}\n[vault_pki]\nmount = \"pki\"\nrole = {role:?}\n",
        bao.addr, pki.token_file
    )
}

/// A cluster, an OpenBao with its PKI mount, and rotator configured for vault-pki.
/// `None` (after saying so loudly) when `bao` is missing and the run allows it.
pub async fn setup(role: &str) -> Option<(Kx, Bao, Pki)> {
    setup_with(role, "").await
}

pub async fn setup_with(role: &str, extra_toml: &str) -> Option<(Kx, Bao, Pki)> {
    let bao = Bao::start("vault_pki")?;
    let kx = Kx::with_signer(Options::default(), "vault-pki", extra_toml).await;
    let pki = setup_pki(&bao, &kx);
    let cfg = std::fs::read_to_string(kx.s.path("rotator.toml")).unwrap();
    kx.s.write(
        "rotator.toml",
        &format!("{cfg}{}", vault_toml(&bao, &pki, role)),
    );
    Some((kx, bao, pki))
}

fn whoami(o: &Output) -> (String, Vec<String>) {
    let v: serde_json::Value = serde_json::from_str(&ok(o)).expect("whoami JSON");
    let u = &v["status"]["userInfo"];
    let groups = u["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| g.as_str().unwrap().to_string())
        .collect();
    (u["username"].as_str().unwrap().to_string(), groups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_issued_through_vault_works_in_kubectl_with_the_generation_group() {
    let Some((kx, _bao, pki)) = setup("rotator").await else {
        return;
    };
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
                "edit",
                "--out",
                "alice.kubeconfig",
            ],
            &[],
        )
        .await);
    assert!(out.contains("alice"), "{out}");
    let (user, groups) = whoami(
        &kx.kubectl_as("alice.kubeconfig", &["auth", "whoami", "-o", "json"])
            .await,
    );
    assert_eq!(user, "alice");
    assert!(groups.contains(&"dev".to_string()), "{groups:?}");
    let generation = groups
        .iter()
        .find(|g| g.starts_with("rotator:alice:1."))
        .unwrap_or_else(|| panic!("no generation group in {groups:?}: sign-verbatim must keep O"));
    // The binding rotator made names that group, and it works.
    assert!(kx.can_list_pods("alice.kubeconfig", "team-a").await);
    assert!(!kx.can_list_pods("alice.kubeconfig", "team-b").await);
    let rb = ok(&kx
        .admin_kubectl(&["get", "rolebindings", "-n", "team-a", "-o", "json"])
        .await);
    assert!(rb.contains(generation.as_str()), "{rb}");

    // openssl, independently: the chain to the API server's client CA, and the profile.
    let (_, _, cert, _) = kubeconfig_parts(&kx.s.path("alice.kubeconfig"));
    let cert_file = kx.s.write("alice.crt", &cert);
    let v = ok(&run(
        "openssl",
        &[
            "verify",
            "-purpose",
            "sslclient",
            "-CAfile",
            pki.client_ca.to_str().unwrap(),
            cert_file.to_str().unwrap(),
        ],
    ));
    assert!(v.contains(": OK"), "{v}");
    let text = ok(&run(
        "openssl",
        &[
            "x509",
            "-in",
            cert_file.to_str().unwrap(),
            "-noout",
            "-text",
        ],
    ));
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Subject Alternative Name"), "{text}");
    assert!(!text.contains("CA:TRUE"), "{text}");

    // The credential is recorded as vault-pki's.
    assert_eq!(
        kx.s.count(
            "SELECT COUNT(*) FROM credentials WHERE signer = 'vault-pki' AND state = 'current'"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_forbids_the_lifetime_is_refused_with_the_roles_message_and_leaves_nothing() {
    let Some((kx, _bao, _pki)) = setup("short").await else {
        return;
    };
    let o = kx
        .rotator_async(
            &[
                "add-user",
                "bob",
                "--namespace",
                "team-a",
                "--role",
                "view",
                "--ttl",
                "1h",
                "--out",
                "bob.kubeconfig",
            ],
            &[],
        )
        .await;
    let e = fails_with(&o, 8);
    assert!(e.contains("pki/roles/short"), "{e}");
    // Vault's own words: its max_ttl warning.
    assert!(e.contains("maxTTL \"15m0s\""), "{e}");
    assert!(e.contains("fix:"), "{e}");
    assert!(!kx.s.path("bob.kubeconfig").exists());
    let (rbs, csrs) = kx.rotator_objects().await;
    assert!(rbs.is_empty(), "no binding: {rbs}");
    assert!(csrs.is_empty(), "no CSR object: {csrs}");
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE state IN ('current', 'pending')")
            .await,
        0
    );
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM users WHERE state = 'active'")
            .await,
        0
    );
}

/// Vault stopped in the middle of the daemon's life, then sealed: each rotation
/// pass fails cleanly (the current credential stays current and keeps working,
/// nothing half-made is kept), says why, and the next pass after Vault is back
/// renews.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_mid_pass_fails_cleanly_is_reported_and_the_next_pass_renews() {
    let Some((kx, mut bao, _pki)) = setup("rotator").await else {
        return;
    };
    use rotator::clock::Clock;
    let clock = rotator::clock::ManualClock::new(rotator::clock::SystemClock.now());
    let app = kx.app(&clock).await;
    let mut sink = rotator::sink::FileSink {
        path: kx.s.path("first.kubeconfig"),
    };
    let mut s = spec("alice");
    s.ttl_seconds = 3600;
    app.issuer().add_user(s, &mut sink, "test").await.unwrap();
    let first_serial = || async {
        let mut conn = app.store.conn().await.unwrap();
        rotator::store::credentials::current(&mut conn, "alice")
            .await
            .unwrap()
            .expect("a current credential")
            .serial
    };
    let serial = first_serial().await;
    // Into the renewal window, rotator's clock and the cluster's together.
    clock.advance(55 * 60);
    kx.cluster.advance_clock(55 * 60);

    bao.stop();
    let r = rotator::renewal::rotate_pass(&app).await.unwrap();
    assert_eq!((r.due, r.renewed, r.failed), (1, 0, 1));
    let e = app
        .issuer()
        .rotate_replacing("alice", None, &mut sink, "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&bao.addr), "names the address: {e}");
    assert!(
        e.contains("sign-verbatim/rotator"),
        "names what was asked: {e}"
    );
    assert_eq!(
        first_serial().await,
        serial,
        "the credential in use is kept"
    );
    assert!(kx.can_list_pods("first.kubeconfig", "team-a").await);
    assert_eq!(
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE state IN ('current', 'pending')")
            .await,
        1,
        "nothing half-made"
    );

    // Back, but sealed: said as such.
    bao.restart();
    setup_pki(&bao, &kx);
    ok(&bao.cli(&["operator", "seal"]));
    let e = app
        .issuer()
        .rotate_replacing("alice", None, &mut sink, "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("sealed"), "{e}");
    assert_eq!(first_serial().await, serial);

    // Back for real (a fresh dev server, the same CA imported): the next pass renews.
    bao.restart();
    setup_pki(&bao, &kx);
    let r = rotator::renewal::rotate_pass(&app).await.unwrap();
    assert_eq!((r.due, r.renewed, r.failed), (1, 1, 0));
    assert_ne!(first_serial().await, serial);
    let delivered = app.settings.rotation.delivery_dir.join("alice.kubeconfig");
    std::fs::copy(&delivered, kx.s.path("renewed.kubeconfig")).unwrap();
    assert!(kx.can_list_pods("renewed.kubeconfig", "team-a").await);
}

// The kubernetes signer's signer-generic tests, through Vault.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_pki_revoke_takes_access_away_at_once_and_remove_user_leaves_nothing() {
    if let Some((kx, _bao, _)) = setup("rotator").await {
        crate::kubernetes::revoke_case(&kx).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_pki_rotation_keeps_the_old_credential_for_the_grace_period_only() {
    if let Some((kx, _bao, _)) = setup_with("rotator", crate::kubernetes::GRACE_TOML).await {
        crate::kubernetes::grace_period_case(&kx).await;
    }
}
