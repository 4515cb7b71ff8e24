//! `testcluster`: the Kubernetes API test server as a process, for scripts and
//! benchmarks. Writes admin.kubeconfig, ca.crt, client-ca.crt, client-ca.key and
//! token into --dir, prints `ready <url>`, and serves until SIGTERM or Ctrl-C.
use std::time::Duration;

use testcluster::{Options, SignerMode, TestCluster};

fn usage() -> ! {
    eprintln!(
        "usage: testcluster --dir DIR [--port N] [--max-signing-duration SECS] [--signer-mode sign|never|fail|deny] [--signing-rate PER_SEC] [--no-token-cleaner]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut opts = Options::default();
    let mut dir = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--dir" => dir = Some(std::path::PathBuf::from(val())),
            "--port" => opts.port = val().parse().unwrap_or_else(|_| usage()),
            "--max-signing-duration" => {
                opts.max_signing_duration =
                    Duration::from_secs(val().parse().unwrap_or_else(|_| usage()))
            }
            "--signing-rate" => opts.signing_rate = Some(val().parse().unwrap_or_else(|_| usage())),
            "--no-token-cleaner" => opts.token_cleaner = false,
            "--signer-mode" => {
                opts.signer_mode = match val().as_str() {
                    "sign" => SignerMode::Sign,
                    "never" => SignerMode::Never,
                    "fail" => SignerMode::Fail,
                    "deny" => SignerMode::Deny,
                    _ => usage(),
                }
            }
            _ => usage(),
        }
    }
    let Some(dir) = dir else { usage() };
    std::fs::create_dir_all(&dir)?;
    let c = TestCluster::start(opts).await?;
    std::fs::write(dir.join("admin.kubeconfig"), c.admin_kubeconfig())?;
    std::fs::write(dir.join("ca.crt"), c.ca_pem())?;
    std::fs::write(dir.join("client-ca.crt"), c.client_ca_pem())?;
    {
        // A CA key: readable by its owner only.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join("client-ca.key"))?;
        f.write_all(c.client_ca_key_pem().as_bytes())?;
    }
    std::fs::write(dir.join("token"), c.admin_token())?;
    println!("ready {}", c.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    c.stop().await;
    Ok(())
}
