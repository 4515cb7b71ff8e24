//! `rotator signer`: the signing process (src/signer/local_ca/service.rs).
//! It reads the configuration for `local_ca.cert_file` / `key_file`,
//! `policy.denied_groups` and `[signer_service]` (and `[vault]` when the key is a
//! `vault:` reference), and nothing else: no database, no cluster, and no
//! outgoing connection but that one read from Vault at start. With
//! `signer = "vault-pki"` it holds no key but the only Vault token that may
//! sign (`[vault]`, `[vault_pki]`), and asks Vault for each signature its
//! policy allowed.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::anyhow;
use tokio::signal::unix::{SignalKind, signal};

use super::{Cli, CliResult, Failure};
use crate::config::{self, SignerKind};
use crate::signer::local_ca::backend::Backend;
use crate::signer::local_ca::service::{self, Service};
use crate::support::clock::SystemClock;
use crate::support::exit::Exit;

#[derive(Debug, clap::Args)]
pub struct SignerArgs {
    /// Unix socket to listen on (overrides signer_service.socket; default
    /// local_ca.socket, then /run/rotator/signer.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

pub async fn run(cli: &Cli, args: &SignerArgs) -> CliResult {
    let mut settings = config::load(cli.config.as_deref(), &cli.overrides(None))?;
    if let Some(s) = &args.socket {
        settings.signer_service.socket = s.clone();
    }
    let ss = settings.signer_service.clone();
    let denied = settings.policy.denied_groups.clone();
    let mut svc = if settings.signer == Some(SignerKind::VaultPki) {
        // This process holds the only Vault token that may sign, behind the
        // same policy, rate limit and log as a local CA key (#22).
        let backend = Backend::open_vault_pki(&settings).await?;
        Service::open_backend(backend, &ss, denied, Arc::new(SystemClock))?
    } else {
        local_ca_service(&settings, &ss, denied).await?
    };
    // rotator's own tests: `ROTATOR_FAULT=signer-sign:sleep-MS` stalls each signature.
    if let Some(ms) = std::env::var("ROTATOR_FAULT")
        .ok()
        .and_then(|v| v.strip_prefix("signer-sign:sleep-")?.parse::<u64>().ok())
    {
        svc.delay = Some(std::time::Duration::from_millis(ms.min(60_000)));
    }
    let listener = service::bind(&ss.socket)?;
    let sig = |k| {
        signal(k).map_err(|e| Failure::new(Exit::Internal, anyhow!("cannot handle signals: {e}")))
    };
    let (mut term, mut int) = (sig(SignalKind::terminate())?, sig(SignalKind::interrupt())?);
    tracing::info!(socket = %ss.socket.display(), log = %ss.log_file.display(), "signer listening");
    eprintln!("signer listening on {}", ss.socket.display());
    Arc::new(svc)
        .serve(listener, async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await;
    let _ = std::fs::remove_file(&ss.socket);
    Ok(())
}

/// The local CA service: its key from a file, or read once from Vault.
async fn local_ca_service(
    settings: &config::Settings,
    ss: &config::SignerServiceSettings,
    denied: Vec<crate::policy::Pattern>,
) -> Result<Service, service::ServiceError> {
    match (
        service::KeySource::from_settings(&settings.local_ca)?,
        &settings.vault,
    ) {
        (service::KeySource::Vault(_), Some(vault)) => {
            let ca = service::KeySource::load_from_vault(
                &settings.local_ca,
                vault,
                Arc::new(SystemClock),
            )
            .await?;
            Service::open_with(ca, ss, denied, Arc::new(SystemClock))
        }
        _ => Service::open(&settings.local_ca, ss, denied, Arc::new(SystemClock)),
    }
}
