//! The user's commands: `fetch` (enroll or renew, merge into a kubeconfig) and
//! `credential` (the kubectl exec plugin). Neither needs a data directory.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use serde_json::json;

use super::output::{OutputFormat, time};
use super::{CliResult, Failure};
use crate::client::{self, Connection};
use crate::delivery::kubeconfig::{Entry, UserAuth};
use crate::support::exit::Exit;

#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The rotator server, such as https://rotator.example.com:8443.
    #[arg(long, env = "ROTATOR_SERVER", value_name = "URL")]
    pub server: String,
    /// PEM CA that verifies the rotator server (remembered after the first fetch;
    /// default: the remembered one, else the system's trust roots).
    #[arg(long, value_name = "FILE")]
    pub server_ca: Option<PathBuf>,
    /// Where credentials are cached (default $XDG_CONFIG_HOME/rotator or ~/.config/rotator).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Renew this long before the certificate expires (default: when the server's policy says).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub renew_before: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// One-time enrollment token from your administrator (first fetch only).
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
    /// Context name to write (default USER@CLUSTER).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Write a kubeconfig that runs `rotator credential` instead of embedding the key.
    #[arg(long)]
    pub exec: bool,
    /// Give up after this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct CredentialArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Give up renewing after this long and answer with the cached credential.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn connection(s: &ServerArgs, timeout: Duration) -> CliResult<Connection> {
    let server_ca_pem = match &s.server_ca {
        Some(p) => Some(
            crate::support::fsutil::read_regular_string(p)
                .and_then(|t| {
                    t.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
                })
                .map_err(|e| {
                    Failure::new(
                        Exit::Usage,
                        anyhow!("cannot read --server-ca {}: {e}\nfix: give the PEM file your administrator handed out", p.display()),
                    )
                })?,
        ),
        None => None,
    };
    let state_dir = match &s.state_dir {
        Some(d) => d.clone(),
        None => client::state::default_dir()?,
    };
    Ok(Connection {
        server: s.server.trim_end_matches('/').to_string(),
        server_ca_pem,
        state_dir,
        timeout,
    })
}

/// `$KUBECONFIG`'s first file, else ~/.kube/config.
fn default_kubeconfig() -> CliResult<PathBuf> {
    if let Some(k) = std::env::var_os("KUBECONFIG")
        && let Some(first) = std::env::split_paths(&k).find(|p| !p.as_os_str().is_empty())
    {
        return Ok(first);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".kube").join("config")),
        None => Err(Failure::new(
            Exit::Usage,
            anyhow!(
                "HOME is not set, so there is no default kubeconfig\nfix: pass --kubeconfig FILE"
            ),
        )),
    }
}

pub async fn fetch(a: &FetchArgs, kubeconfig: Option<&PathBuf>, out: OutputFormat) -> CliResult {
    let conn = connection(&a.server, a.timeout)?;
    let path = match kubeconfig {
        Some(p) => p.clone(),
        None => default_kubeconfig()?,
    };
    // Before anything is asked of the server (a token spent, a credential renewed).
    crate::support::fsutil::check_replaceable(&path).map_err(|e| {
        Failure::new(
            Exit::Output,
            anyhow!("cannot write the kubeconfig {}: {e}\nfix: pass --kubeconfig with a regular file's path", path.display()),
        )
    })?;
    // --timeout bounds the whole exchange (lock, requests, a retry round), not each request.
    let c = tokio::time::timeout(a.timeout, client::obtain(&conn, a.token.as_deref()))
        .await
        .unwrap_or_else(|_| {
            Err(client::ClientError::Unreachable {
                server: conn.server.clone(),
                why: format!("no answer within {}s", a.timeout.as_secs()),
            })
        })?;
    let user_entry = format!("{}@{}", c.user, c.cluster.name);
    let context = a.context.clone().unwrap_or_else(|| user_entry.clone());
    let auth = if a.exec {
        let exe = std::env::current_exe()
            .and_then(|p| p.canonicalize())
            .map_err(|e| {
                Failure::new(
                    Exit::Internal,
                    anyhow!("cannot find rotator's own path for the exec plugin: {e}"),
                )
            })?;
        let mut args = vec![
            "credential".to_string(),
            "--server".into(),
            conn.server.clone(),
        ];
        if let Some(d) = &a.server.state_dir {
            args.push("--state-dir".into());
            args.push(
                std::path::absolute(d)
                    .unwrap_or(d.clone())
                    .display()
                    .to_string(),
            );
        }
        if let Some(r) = a.server.renew_before {
            args.push("--renew-before".into());
            args.push(humantime::format_duration(r).to_string());
        }
        UserAuth::Exec {
            command: exe.display().to_string(),
            args,
        }
    } else {
        UserAuth::Embedded {
            certificate_pem: &c.certificate,
            key_pem: &c.key,
        }
    };
    let entry = Entry {
        cluster_name: &c.cluster.name,
        server: &c.cluster.server,
        ca_data: &c.cluster.certificate_authority_data,
        user_name: &user_entry,
        context_name: &context,
        namespace: c.namespace.as_deref(),
        auth,
    };
    let backup = crate::delivery::kubeconfig::merge_file(&path, &entry)
        .map_err(|e| Failure::new(Exit::Output, anyhow!(e)))?;
    match out {
        OutputFormat::Json => super::output::json(&json!({
            "user": c.user, "generation": c.generation, "serial": c.serial, "not_after": time(c.not_after),
            "kubeconfig": path, "context": context, "backup": backup, "exec": a.exec,
        })),
        OutputFormat::Table => {
            println!(
                "fetched {} generation {} serial {}\n  valid until {}\n  kubeconfig  {} (context {context}{})",
                c.user,
                c.generation,
                c.serial,
                time(c.not_after),
                path.display(),
                if a.exec { ", exec plugin" } else { "" }
            );
            if let Some(b) = backup {
                println!("  backup      {}", b.display());
            }
        }
    }
    Ok(())
}

pub async fn credential(a: &CredentialArgs) -> CliResult {
    let version =
        client::exec::requested_version(std::env::var("KUBERNETES_EXEC_INFO").ok().as_deref())?;
    let conn = connection(&a.server, a.timeout)?;
    let now = crate::support::clock::Clock::now(&crate::support::clock::SystemClock);
    let answer = client::exec::run(&conn, a.server.renew_before, now).await?;
    if let Some(w) = &answer.warning {
        eprintln!(
            "rotator: could not renew the credential; using the cached one (valid until {}): {}",
            time(answer.credential.not_after),
            w.lines().next().unwrap_or_default()
        );
    }
    let v = client::exec::exec_credential(version, &answer.credential, answer.expires);
    println!(
        "{}",
        zeroize::Zeroizing::new(serde_json::to_string(&v).expect("json")).as_str()
    );
    Ok(())
}
