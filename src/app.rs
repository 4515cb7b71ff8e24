//! Everything a command needs, built once from the validated settings.
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use crate::clock::Clock;
use crate::config::{Settings, SignerKind};
use crate::exit::{Exit, ExitStatus};
use crate::issuer::{Faults, Inflight, Issuer, ProcessIdentity};
use crate::signer::{LocalCa, SignError, Signer};
use crate::store::{Store, StoreError, audit};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "cannot create data directory {path}: {source}\nfix: create it, or point --data-dir / ROTATOR_DATA_DIR somewhere rotator may write"
    )]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot read the cluster CA bundle {path}: {reason}\nfix: set cluster.ca_file to the PEM file that verifies the API server"
    )]
    ClusterCa { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sign(#[from] SignError),
}

impl ExitStatus for AppError {
    fn exit(&self) -> Exit {
        match self {
            AppError::DataDir { .. } => Exit::Config,
            AppError::ClusterCa { .. } => Exit::Config,
            AppError::Store(e) => e.exit(),
            AppError::Sign(e) => e.exit(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    pub data_dir: PathBuf,
    pub database: PathBuf,
    pub signer: &'static str,
    pub ca_certificate: PathBuf,
    pub created_ca: bool,
}

pub struct App {
    pub settings: Settings,
    pub store: Store,
    pub signer: Arc<dyn Signer>,
    pub clock: Arc<dyn Clock>,
    pub faults: Arc<dyn Faults>,
    pub cluster_ca_pem: String,
    /// Who the audit log names for this process's changes.
    pub actor: String,
    pub identity: ProcessIdentity,
    pub inflight: Arc<Inflight>,
}

impl App {
    /// Creates what is missing (data directory, database, local CA) and opens the
    /// rest. Running it twice changes nothing the second time.
    pub async fn open(
        settings: Settings,
        clock: Arc<dyn Clock>,
        faults: Arc<dyn Faults>,
        actor: String,
    ) -> Result<(Self, InitReport), AppError> {
        crate::fsutil::ensure_private_dir(&settings.data_dir).map_err(|source| {
            AppError::DataDir {
                path: settings.data_dir.clone(),
                source,
            }
        })?;
        let store = Store::open(&settings.database_path()).await?;
        let (signer, created_ca): (Arc<dyn Signer>, bool) = match settings.signer {
            SignerKind::LocalCa => {
                if !settings.local_ca.configured {
                    let dir = settings
                        .local_ca
                        .key_file
                        .parent()
                        .unwrap_or(&settings.data_dir)
                        .to_path_buf();
                    crate::fsutil::ensure_private_dir(&dir)
                        .map_err(|source| AppError::DataDir { path: dir, source })?;
                }
                let (ca, created) = LocalCa::ensure(&settings.local_ca, clock.clone())?;
                (Arc::new(ca), created)
            }
        };
        if created_ca {
            let now = clock.now();
            let mut tx = store.begin().await?;
            let info = crate::pki::parse_cert_pem(signer.ca_bundle_pem(), "local CA")
                .map_err(SignError::from)?;
            audit::append(
                &mut tx,
                now,
                &actor,
                "ca.create",
                "local-ca",
                json!({"certificate": settings.local_ca.cert_file, "fingerprint": info.fingerprint, "not_after": info.not_after}),
            )
            .await?;
            crate::store::commit(tx).await?;
        }
        let cluster_ca_pem = match &settings.cluster.ca_file {
            Some(p) => {
                let pem = std::fs::read_to_string(p).map_err(|e| AppError::ClusterCa {
                    path: p.clone(),
                    reason: e.to_string(),
                })?;
                crate::pki::pem_to_der_certs(&pem, &p.display().to_string()).map_err(|e| {
                    AppError::ClusterCa {
                        path: p.clone(),
                        reason: e.to_string(),
                    }
                })?;
                pem
            }
            None => signer.ca_bundle_pem().to_string(),
        };
        let report = InitReport {
            data_dir: settings.data_dir.clone(),
            database: settings.database_path(),
            signer: signer.kind(),
            ca_certificate: settings.local_ca.cert_file.clone(),
            created_ca,
        };
        let (identity, inflight) = (ProcessIdentity::current(), Arc::new(Inflight::default()));
        Ok((
            Self {
                settings,
                store,
                signer,
                clock,
                faults,
                cluster_ca_pem,
                actor,
                identity,
                inflight,
            },
            report,
        ))
    }

    pub fn issuer(&self) -> Issuer<'_> {
        Issuer {
            store: &self.store,
            identity: &self.identity,
            inflight: &self.inflight,
            signer: self.signer.as_ref(),
            settings: &self.settings,
            clock: self.clock.as_ref(),
            faults: self.faults.as_ref(),
            cluster_ca_pem: &self.cluster_ca_pem,
        }
    }
}
