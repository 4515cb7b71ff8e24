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
    b(&[
        "policy",
        "write",
        "rotator-pki",
        policy.to_str().unwrap(),
    ]);
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
        bao.address(),
        pki.token_file
    )
}

/// A cluster, an OpenBao with its PKI mount, and rotator configured for vault-pki.
/// `None` (after saying so loudly) when `bao` is missing and the run allows it.
pub async fn setup(role: &str) -> Option<(Kx, Bao, Pki)> {
    let bao = Bao::start_or_skip("vault_pki")?;
    let kx = Kx::with_signer(Options::default(), "vault-pki", "").await;
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
    let (user, groups) = whoami(&kx.kubectl_as("alice.kubeconfig", &["auth", "whoami", "-o", "json"]).await);
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
        &["x509", "-in", cert_file.to_str().unwrap(), "-noout", "-text"],
    ));
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Subject Alternative Name"), "{text}");
    assert!(!text.contains("CA:TRUE"), "{text}");

    // The credential is recorded as vault-pki's.
    assert_eq!(
        kx.s
            .count("SELECT COUNT(*) FROM credentials WHERE signer = 'vault-pki' AND state = 'current'")
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
        kx.s.count("SELECT COUNT(*) FROM credentials WHERE state IN ('current', 'pending')").await,
        0
    );
    assert_eq!(kx.s.count("SELECT COUNT(*) FROM users WHERE state = 'active'").await, 0);
}
