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
/// client CA imported (`pki/config/ca`, pem_bundle = certificate + key), the
/// role `rotator-client` of docs/deploy-vault.md and a role `short` whose
/// max_ttl (15m) forbids the lifetimes the tests ask for. The policies
/// `rotator` (the daemon's) and `rotator-signer` are the docs' own text; the
/// signer's token also gets `short` (a test-only policy).
pub struct Pki {
    /// The daemon's token: policy `rotator`, no path of the pki mount.
    pub token_file: PathBuf,
    /// The signer's token: the only one that may sign.
    pub signer_token_file: PathBuf,
    pub client_ca: PathBuf,
    /// The `rotator signer` process that holds the signer's token.
    pub signer: Option<SignerProc>,
}

/// The HCL of `vault policy write NAME - <<'POLICY'` in docs/deploy-vault.md.
pub fn documented_policy(name: &str) -> String {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/deploy-vault.md"),
    )
    .unwrap();
    let head = format!("vault policy write {name} - <<'POLICY'\n");
    let start = doc
        .find(&head)
        .unwrap_or_else(|| panic!("no policy {name} in the docs"))
        + head.len();
    let len = doc[start..].find("\nPOLICY").expect("the heredoc ends");
    doc[start..start + len].to_string()
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
    for (role, max_ttl) in [("rotator-client", "720h"), ("short", "15m")] {
        b(&[
            "write",
            &format!("pki/roles/{role}"),
            "allow_any_name=true",
            "enforce_hostnames=false",
            "server_flag=false",
            "client_flag=true",
            "key_usage=DigitalSignature",
            "ext_key_usage=ClientAuth",
            "key_type=any",
            "no_store=true",
            &format!("max_ttl={max_ttl}"),
        ]);
    }
    bao.policy("rotator", &documented_policy("rotator"));
    bao.policy("rotator-signer", &documented_policy("rotator-signer"));
    bao.policy(
        "test-short",
        "path \"pki/sign-verbatim/short\" { capabilities = [\"update\"] }\n",
    );
    let token_file = kx.s.path("vault.token");
    std::fs::write(&token_file, bao.token("rotator", "2h")).unwrap();
    let signer_token = ok(&bao.cli(&[
        "token",
        "create",
        "-policy=rotator-signer",
        "-policy=test-short",
        "-ttl=2h",
        "-field=token",
    ]));
    let signer_token_file = kx.s.path("signer.token");
    std::fs::write(&signer_token_file, signer_token.trim()).unwrap();
    Pki {
        token_file,
        signer_token_file,
        client_ca,
        signer: None,
    }
}

/// `[vault]` with `token_file` and `[vault_pki]` for `role`.
fn vault_sections(bao: &Bao, token_file: &std::path::Path, role: &str) -> String {
    format!(
        "[vault]\naddress = {:?}\nauth_method = \"token\"\ntoken_file = {token_file:?}\n[vault_pki]\nmount = \"pki\"\nrole = {role:?}\n",
        bao.addr
    )
}

/// `rotator signer` with the signer's token and `signer = "vault-pki"`.
pub fn start_signer(bao: &Bao, pki: &Pki, dir: &std::path::Path, role: &str) -> SignerProc {
    std::fs::create_dir_all(dir).unwrap();
    SignerProc::start(
        dir,
        &vault_sections(bao, &pki.signer_token_file, role),
        &[("ROTATOR_SIGNER", "vault-pki")],
    )
}

/// The daemon's `[vault]` (its own token) and `[vault_pki]` through `socket`.
pub fn vault_toml(bao: &Bao, pki: &Pki, role: &str, socket: &std::path::Path) -> String {
    format!(
        "{}socket = {socket:?}\n",
        vault_sections(bao, &pki.token_file, role)
    )
}

/// A cluster, an OpenBao with its PKI mount, a `rotator signer` holding the
/// signing token, and rotator configured for vault-pki through it, as
/// docs/deploy-vault.md sets them up. `None` (after saying so loudly) when
/// `bao` is missing and the run allows it.
pub async fn setup(role: &str) -> Option<(Kx, Bao, Pki)> {
    setup_with(role, "").await
}

pub async fn setup_with(role: &str, extra_toml: &str) -> Option<(Kx, Bao, Pki)> {
    let bao = Bao::start("vault_pki")?;
    let kx = Kx::with_signer(Options::default(), "vault-pki", extra_toml).await;
    let mut pki = setup_pki(&bao, &kx);
    let signer = start_signer(&bao, &pki, &kx.s.path("signer"), role);
    let cfg = std::fs::read_to_string(kx.s.path("rotator.toml")).unwrap();
    kx.s.write(
        "rotator.toml",
        &format!("{cfg}{}", vault_toml(&bao, &pki, role, &signer.socket)),
    );
    pki.signer = Some(signer);
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
    let Some((kx, _bao, pki)) = setup("rotator-client").await else {
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

    // Signed by the signer process (its log), not by the daemon's own token.
    let signed = pki.signer.as_ref().unwrap().signed_serials();
    assert_eq!(signed.len(), 1, "{signed:?}");
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
    let Some((kx, mut bao, _pki)) = setup("rotator-client").await else {
        return;
    };
    use rotator::support::clock::Clock;
    let clock =
        rotator::support::clock::ManualClock::new(rotator::support::clock::SystemClock.now());
    let app = kx.app(&clock).await;
    let mut sink = rotator::delivery::FileSink {
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
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
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
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.due, r.renewed, r.failed), (1, 1, 0));
    assert_ne!(first_serial().await, serial);
    let delivered = app.settings.rotation.delivery_dir.join("alice.kubeconfig");
    std::fs::copy(&delivered, kx.s.path("renewed.kubeconfig")).unwrap();
    assert!(kx.can_list_pods("renewed.kubeconfig", "team-a").await);
}

// The kubernetes signer's signer-generic tests, through Vault.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_pki_revoke_takes_access_away_at_once_and_remove_user_leaves_nothing() {
    if let Some((kx, _bao, _)) = setup("rotator-client").await {
        crate::kubernetes::revoke_case(&kx).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_pki_rotation_keeps_the_old_credential_for_the_grace_period_only() {
    if let Some((kx, _bao, _)) = setup_with("rotator-client", crate::kubernetes::GRACE_TOML).await {
        crate::kubernetes::grace_period_case(&kx).await;
    }
}

/// A PEM CSR made by openssl for `subj`, with `addext` extensions requested.
fn openssl_csr(kx: &Kx, key: &rotator::pki::PrivateKey, subj: &str, addext: &[&str]) -> String {
    let key_file = kx.s.write("hostile.key", &key.to_pem());
    let mut args = vec![
        "req",
        "-new",
        "-key",
        key_file.to_str().unwrap(),
        "-subj",
        subj,
    ];
    for e in addext {
        args.extend(["-addext", e]);
    }
    ok(&run("openssl", &args))
}

/// #22 item 1: with the documented setup, the daemon's own Vault token can
/// get no certificate from Vault by any endpoint of the mount, and the
/// subjects that would be cluster-admin or a CA are refused on every path
/// that does sign: the daemon's own flow, and the signer's socket spoken to
/// directly as a compromised daemon would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_vault_token_cannot_sign_and_privileged_subjects_are_refused_everywhere() {
    let Some((kx, bao, pki)) = setup("rotator-client").await else {
        return;
    };
    let signer = pki.signer.as_ref().unwrap();
    let key = rotator::pki::PrivateKey::generate(rotator::pki::KeyType::EcdsaP256).unwrap();
    let gg = rotator::policy::generation_group("mallory", 1, &key.spki_der());
    let masters = openssl_csr(
        &kx,
        &key,
        &format!("/CN=mallory/O=system:masters/O={gg}"),
        &[],
    );
    let masters_file = kx.s.write("masters.csr", &masters);
    let csr_arg = format!("csr=@{}", masters_file.display());

    // 1. The daemon's token, straight to Vault: every endpoint that signs or
    // issues is refused with 403, whatever the subject.
    let daemon_token = std::fs::read_to_string(&pki.token_file).unwrap();
    let attempts: Vec<Vec<&str>> = vec![
        vec!["write", "pki/sign-verbatim/rotator-client", &csr_arg],
        vec!["write", "pki/sign-verbatim", &csr_arg],
        vec![
            "write",
            "pki/sign/rotator-client",
            &csr_arg,
            "common_name=mallory",
        ],
        vec!["write", "pki/issue/rotator-client", "common_name=mallory"],
        vec![
            "write",
            "pki/root/sign-intermediate",
            &csr_arg,
            "common_name=mallory",
        ],
        vec![
            "write",
            "pki/root/sign-self-issued",
            "certificate=@/dev/null",
        ],
        vec![
            "write",
            "pki/issuer/default/sign-verbatim/rotator-client",
            &csr_arg,
        ],
    ];
    for args in &attempts {
        let o = bao.cli_as(daemon_token.trim(), args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("403") && err.contains("permission denied"),
            "the daemon's token must not reach {args:?}: {err}"
        );
    }
    // Not vacuous: the signer's token does reach sign-verbatim, which copies
    // the subject as it is; that is why only the signer may hold it.
    let signer_token = std::fs::read_to_string(&pki.signer_token_file).unwrap();
    let direct = ok(&bao.cli_as(
        signer_token.trim(),
        &[
            "write",
            "-field=certificate",
            "pki/sign-verbatim/rotator-client",
            &csr_arg,
        ],
    ));
    let info = rotator::pki::parse_cert_pem(&direct, "direct").unwrap();
    assert!(
        info.organizations.iter().any(|o| o == "system:masters"),
        "{info:?}"
    );

    // 2. The signer's socket, spoken to directly: each privileged request is
    // refused with its code, logged, and nothing is signed.
    let san = openssl_csr(
        &kx,
        &key,
        &format!("/CN=mallory/O=dev/O={gg}"),
        &["subjectAltName=DNS:kubernetes.default.svc"],
    );
    let ca = openssl_csr(
        &kx,
        &key,
        &format!("/CN=mallory/O=dev/O={gg}"),
        &["basicConstraints=critical,CA:TRUE"],
    );
    let sys_gg = rotator::policy::generation_group("system:admin", 1, &key.spki_der());
    let sys_cn = openssl_csr(&kx, &key, &format!("/CN=system:admin/O={sys_gg}"), &[]);
    for (csr, code) in [
        (&masters, "group_denied"),
        (&sys_cn, "subject_denied"),
        (&ca, "ca_requested"),
        (&san, "extension_requested"),
    ] {
        let body =
            serde_json::to_vec(&serde_json::json!({"csr": csr, "ttl_seconds": 3600})).unwrap();
        let (status, answer) =
            rotator::signer::local_ca::socket::call(&signer.socket, "POST", "/v1/sign", body)
                .await
                .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["error"]["code"], code, "{answer}");
        assert_eq!(status, 422, "{answer}");
    }
    let lines = signer.log_lines();
    assert_eq!(lines.len(), 4, "every refusal is logged: {lines:?}");
    assert!(lines.iter().all(|l| l["outcome"] == "refused"), "{lines:?}");

    // 3. Through the daemon: its policy refuses before the signer is asked.
    for (args, what) in [
        (
            vec![
                "add-user",
                "mallory",
                "--group",
                "system:masters",
                "-n",
                "team-a",
                "--role",
                "view",
            ],
            "system:masters",
        ),
        (
            vec!["add-user", "system:admin", "-n", "team-a", "--role", "view"],
            "system:admin",
        ),
    ] {
        let e = fails_with(&kx.rotator_async(&args, &[]).await, 4);
        assert!(e.contains(what), "{e}");
    }
    assert_eq!(signer.log_lines().len(), 4, "the signer was not even asked");
    let (rbs, csrs) = kx.rotator_objects().await;
    assert!(rbs.is_empty() && csrs.is_empty(), "{rbs} {csrs}");

    // doctor says which token signs, and fails when the daemon's own token
    // could sign too (here: the signer's token given to the daemon by mistake).
    let signing_check = |o: &Output| -> serde_json::Value {
        let checks: serde_json::Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {o:?}"));
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "vault signing token")
            .unwrap_or_else(|| panic!("no signing-token check in {checks}"))
            .clone()
    };
    let doctor = ["--output", "json", "doctor"];
    let c = signing_check(&kx.rotator_async(&doctor, &[]).await);
    assert_eq!(c["ok"], true, "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains("`rotator signer` at") && detail.contains("may call none"),
        "{c}"
    );
    std::fs::write(&pki.token_file, signer_token.trim()).unwrap();
    let c = signing_check(&kx.rotator_async(&doctor, &[]).await);
    assert_eq!(c["ok"], false, "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert!(
        detail.contains("pki/sign-verbatim/rotator-client") && detail.contains("fix:"),
        "{c}"
    );
    std::fs::write(&pki.token_file, daemon_token.trim()).unwrap();

    // 4. A daemon configured to sign with its own token refuses to start, and
    // says why; on purpose (in_process = true) it may.
    let cfg = std::fs::read_to_string(kx.s.path("rotator.toml")).unwrap();
    let socket_line = format!("socket = {:?}\n", signer.socket);
    kx.s.write("rotator.toml", &cfg.replace(&socket_line, ""));
    let e = fails_with(
        &kx.rotator_async(&["add-user", "bob", "-n", "team-a", "--role", "view"], &[])
            .await,
        3,
    );
    assert!(
        e.contains("O=system:masters") && e.contains("vault_pki.socket"),
        "{e}"
    );
    assert!(e.contains("fix:") && e.contains("in_process = true"), "{e}");
    assert_eq!(kx.s.count("SELECT COUNT(*) FROM users").await, 0);
}
