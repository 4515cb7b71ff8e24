//! Everything a command needs, built once from the validated settings.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::cluster::{Cluster, ClusterError, Endpoint};
use crate::config::{LOCAL_DEFAULT_SERVER, Settings, SignerKind};
use crate::flows::issue::{Faults, Inflight, Issuer, ProcessIdentity};
use crate::signer::{KubernetesSigner, LocalCa, SignError, Signer};
use crate::store::{Store, StoreError, audit, meta};
use crate::support::clock::Clock;
use crate::support::exit::{Exit, ExitStatus};

mod instance;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(
        "cannot create data directory {path}: {source}\nfix: create it, or point --data-dir / ROTATOR_DATA_DIR somewhere rotator may write"
    )]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {what} {path}: {reason}\nfix: {fix}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error(
        "this data directory was initialized with signer {recorded:?}, but {asked:?} was asked for\nfix: use the signer it was made with, or a new --data-dir for the other signer (credentials from one signer cannot be managed by another)"
    )]
    SignerMismatch { recorded: String, asked: String },
    #[error(
        "the data directory {dir} was initialized (instance {instance}), but its database {db} is {what}\nfix: restore {db} from a backup (`rotator backup` makes one); or, to start over on purpose, `rotator init --new-database` (credentials issued before stay valid until their notAfter; their generation groups are never reused)"
    )]
    DatabaseLost {
        dir: PathBuf,
        db: String,
        instance: String,
        what: &'static str,
    },
    #[error(
        "the database {db} belongs to rotator instance {found}, but the data directory {dir} was initialized for instance {expected}\nfix: point --data-dir at the directory this database came from, or restore this directory's own database"
    )]
    ForeignDatabase {
        dir: PathBuf,
        db: String,
        found: String,
        expected: String,
    },
    #[error(
        "signer = \"vault-pki\" would sign in this process, with this process's Vault token: a token that may call {endpoint} gets any subject signed that it asks for, O=system:masters (cluster-admin that no revoke takes back) included, whatever rotator's policy says\nfix: run `rotator signer` with signer = \"vault-pki\" and the only token that may sign, and set vault_pki.socket here to its socket (docs/deploy-vault.md); or, if this process is the signing process on purpose, set vault_pki.in_process = true"
    )]
    VaultSigningInProcess { endpoint: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
}

impl ExitStatus for AppError {
    fn exit(&self) -> Exit {
        match self {
            AppError::DataDir { .. }
            | AppError::File { .. }
            | AppError::SignerMismatch { .. }
            | AppError::VaultSigningInProcess { .. } => Exit::Config,
            AppError::DatabaseLost { .. } | AppError::ForeignDatabase { .. } => Exit::Database,
            AppError::Store(e) => e.exit(),
            AppError::Sign(e) => e.exit(),
            AppError::Cluster(e) => e.exit(),
            AppError::Vault(e) => e.exit(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InitReport {
    pub data_dir: PathBuf,
    /// The database file, or the PostgreSQL URL without its password.
    pub database: String,
    pub signer: &'static str,
    /// The local CA certificate (or, through a socket without
    /// `local_ca.cert_file`, where the signer is), or the cluster's server URL.
    pub signer_detail: String,
    pub created_ca: bool,
    /// The database's instance id (also in `DATA_DIR/instance`).
    pub instance: String,
    pub kubeconfig_server: String,
    pub kubeconfig_server_source: String,
}

pub struct App {
    pub settings: Settings,
    pub store: Store,
    pub signer: Arc<dyn Signer>,
    /// Present with the kubernetes signer: RBAC follows the database there.
    pub cluster: Option<Cluster>,
    /// The API server URL and CA that go into the kubeconfigs rotator hands out.
    pub endpoint: Endpoint,
    pub clock: Arc<dyn Clock>,
    pub faults: Arc<dyn Faults>,
    /// Who the audit log names for this process's changes.
    pub actor: String,
    pub identity: ProcessIdentity,
    pub inflight: Arc<Inflight>,
    pub metrics: Arc<crate::support::metrics::Metrics>,
    /// Whether this daemon may run the jobs (always, without leader election).
    pub leader: Arc<std::sync::atomic::AtomicBool>,
    /// With leader election: the epoch this daemon took in the database when it
    /// became the leader; its jobs write only through it (`store::fence`).
    pub fence: Arc<std::sync::Mutex<Option<Arc<crate::store::fence::Fence>>>>,
    /// Seals the key of a credential stored but not yet delivered.
    pub sealing: Arc<crate::pki::SealingKey>,
    /// This database's identity: what the cluster objects rotator makes are
    /// annotated with, so one instance never touches another's.
    pub instance: String,
    /// `[vault]`: logged in at open only when the configuration reads a secret
    /// from it; otherwise on first use (and by the daemon's renewer).
    pub vault: Option<Arc<crate::vault::Vault>>,
}

/// What rotator read from the cluster at start (the client CA, the endpoint
/// for kubeconfigs), kept under `DATA_DIR/cluster/` after each successful read,
/// so a command can still run while the API server is unreachable: a revoke is
/// recorded, and the daemon starts and reports itself degraded.
fn cached(
    data_dir: &std::path::Path,
    name: &str,
    fresh: Result<String, ClusterError>,
) -> Result<String, AppError> {
    let path = data_dir.join("cluster").join(name);
    match fresh {
        Ok(text) => {
            let dir = data_dir.join("cluster");
            if crate::support::fsutil::ensure_private_dir(&dir).is_ok()
                && std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str())
                && let Err(e) = crate::support::fsutil::write_public_atomic(&path, text.as_bytes())
            {
                tracing::warn!(path = %path.display(), error = %e, "could not cache what the cluster said");
            }
            Ok(text)
        }
        Err(e @ ClusterError::Unreachable { .. }) => match std::fs::read_to_string(&path) {
            Ok(text) => {
                tracing::warn!(path = %path.display(), error = %e, "the API server is unreachable; using what it said last time");
                Ok(text)
            }
            Err(_) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// How `App::open` treats the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DatabaseMode {
    /// Refuse a missing or emptied database in an initialized data directory.
    #[default]
    Existing,
    /// `init --new-database`: start a new, empty database (a new instance) on purpose.
    New,
}

fn read_pem(what: &'static str, path: &PathBuf, fix: &'static str) -> Result<String, AppError> {
    let pem = std::fs::read_to_string(path).map_err(|e| AppError::File {
        what,
        path: path.clone(),
        reason: e.to_string(),
        fix,
    })?;
    crate::pki::pem_to_der_certs(&pem, &path.display().to_string()).map_err(|e| {
        AppError::File {
            what,
            path: path.clone(),
            reason: e.to_string(),
            fix,
        }
    })?;
    Ok(pem)
}

impl App {
    /// The same App (one store, signer, metrics and in-flight set) whose changes
    /// the audit log names as `actor`: the daemon's jobs are not the CLI user
    /// who started it.
    pub fn acting_as(&self, actor: &str) -> App {
        App {
            settings: self.settings.clone(),
            store: self.store.clone(),
            signer: self.signer.clone(),
            cluster: self.cluster.clone(),
            endpoint: self.endpoint.clone(),
            clock: self.clock.clone(),
            faults: self.faults.clone(),
            actor: actor.to_string(),
            identity: self.identity.clone(),
            inflight: self.inflight.clone(),
            metrics: self.metrics.clone(),
            leader: self.leader.clone(),
            fence: self.fence.clone(),
            sealing: self.sealing.clone(),
            instance: self.instance.clone(),
            vault: self.vault.clone(),
        }
    }

    /// Creates what is missing (data directory, database, local CA) and opens the
    /// rest. Running it twice changes nothing the second time.
    pub async fn open(
        settings: Settings,
        clock: Arc<dyn Clock>,
        faults: Arc<dyn Faults>,
        actor: String,
    ) -> Result<(Self, InitReport), AppError> {
        Self::open_with(settings, clock, faults, actor, DatabaseMode::Existing).await
    }

    pub async fn open_with(
        mut settings: Settings,
        clock: Arc<dyn Clock>,
        faults: Arc<dyn Faults>,
        actor: String,
        mode: DatabaseMode,
    ) -> Result<(Self, InitReport), AppError> {
        // The data directory is rotator's alone: created 0700, and repaired to it
        // (with a warning) when a umask or a hand-made directory left it open.
        if let Some(old) = crate::support::fsutil::ensure_private_dir_repaired(&settings.data_dir)
            .map_err(|source| AppError::DataDir {
            path: settings.data_dir.clone(),
            source,
        })? {
            tracing::warn!(dir = %settings.data_dir.display(), mode = format!("{old:03o}"), "the data directory was accessible to group or others; its mode is now 700");
        }
        let location = settings.database.clone();
        let shown = location.redacted();
        let marker = instance::read_marker(&settings.data_dir)?;
        // The database file's own checks and repairs: SQLite only (a PostgreSQL
        // database's loss shows as a missing instance id below).
        if let Some(db_path) = location.file().map(Path::to_path_buf) {
            if let (Some(instance), DatabaseMode::Existing) = (&marker, mode) {
                let what = match std::fs::metadata(&db_path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("missing"),
                    Ok(m) if m.len() == 0 => Some("empty"),
                    _ => None,
                };
                if let Some(what) = what {
                    return Err(AppError::DatabaseLost {
                        dir: settings.data_dir.clone(),
                        db: shown.clone(),
                        instance: instance.clone(),
                        what,
                    });
                }
            }
            if mode == DatabaseMode::New {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = db_path.clone().into_os_string();
                    p.push(suffix);
                    let p = PathBuf::from(p);
                    if std::fs::metadata(&p).is_ok_and(|m| m.len() > 0) && suffix.is_empty() {
                        let aside = db_path.with_extension(format!("db.replaced-{}", clock.now()));
                        std::fs::rename(&p, &aside).map_err(|source| AppError::DataDir {
                            path: p.clone(),
                            source,
                        })?;
                        tracing::warn!(kept = %aside.display(), "init --new-database: the previous database was moved aside");
                    } else {
                        let _ = std::fs::remove_file(&p);
                    }
                }
            }
        }
        let db_existed = location.file().is_some_and(Path::exists);
        let mut store = Store::open(&location).await?;
        if let Some(db_path) = location.file().map(Path::to_path_buf) {
            // SQLite creates its files 0644 (less the umask); they hold every user's
            // record and sealed keys, so they are made 0600 (-wal and -shm follow).
            for suffix in ["", "-wal", "-shm"] {
                let mut p = db_path.clone().into_os_string();
                p.push(suffix);
                let p = PathBuf::from(p);
                match crate::support::fsutil::restrict_to_owner(
                    &p,
                    crate::support::fsutil::PRIVATE_MODE,
                ) {
                    Ok(Some(old)) if suffix.is_empty() && db_existed => {
                        tracing::warn!(file = %p.display(), mode = format!("{old:03o}"), "the database was readable by group or others; its mode is now 600")
                    }
                    Ok(_) => {}
                    Err(source) => return Err(AppError::DataDir { path: p, source }),
                }
            }
        }
        // Refused before anything is made for it: a lost or foreign database.
        let found_instance = {
            let mut conn = store.conn().await?;
            meta::get(&mut conn, meta::INSTANCE_ID).await?
        };
        instance::check(
            &settings,
            &shown,
            marker.as_ref(),
            found_instance.as_ref(),
            mode,
        )?;
        // A database no process initialized yet gets its keys even where they
        // are configured (an empty shared volume); see `audit::first_start`.
        let fresh = audit::LogState::read(&store).await?.fresh();
        let keyring = audit::Keyring::open(
            &settings.audit.key_file,
            &settings.audit.checkpoint_file,
            !settings.audit.key_configured,
            &store,
        )
        .await?;
        if mode == DatabaseMode::New {
            // A new, empty log on purpose: the old checkpoint vouches for the old one.
            keyring.reset(&audit::Head::genesis(), 1)?;
        }
        store.set_audit(keyring);
        let vault = match &settings.vault {
            Some(vs) => Some(Arc::new(crate::vault::Vault::new(vs)?)),
            None => None,
        };
        let sealing = Arc::new(
            match crate::vault::secrets::sealing_key_text(&settings.sealing, vault.as_deref())
                .await?
            {
                Some(text) => crate::pki::SealingKey::from_base64(
                    &text,
                    &settings.sealing.key_file.display().to_string(),
                ),
                None => crate::pki::SealingKey::load(
                    &settings.sealing.key_file,
                    !settings.sealing.configured || fresh,
                ),
            }
            .map_err(SignError::from)?,
        );

        // The signer a data directory was made with sticks to it (`init --signer`).
        let (recorded, recorded_kubeconfig) = {
            let mut conn = store.conn().await?;
            (
                meta::get(&mut conn, "signer").await?,
                meta::get(&mut conn, "kubeconfig").await?,
            )
        };
        let instance = match found_instance {
            Some(found) => found,
            None => instance::claim(&store, clock.now(), &actor, marker.as_deref(), mode).await?,
        };
        if marker.as_deref() != Some(instance.as_str()) {
            instance::write_marker(&settings.data_dir, &instance)?;
        }
        let kind = match (settings.signer, recorded.as_deref()) {
            (Some(asked), Some(r)) if asked.as_str() != r => {
                return Err(AppError::SignerMismatch {
                    recorded: r.into(),
                    asked: asked.as_str().into(),
                });
            }
            (Some(asked), _) => asked,
            (None, Some(r)) => r.parse::<SignerKind>().map_err(StoreError::Invalid)?,
            (None, None) => SignerKind::LocalCa,
        };
        if settings.kubernetes.kubeconfig.is_none() {
            settings.kubernetes.kubeconfig = recorded_kubeconfig.map(PathBuf::from);
        }

        let mut created_ca = false;
        let mut cluster = None;
        let signer: Arc<dyn Signer> = match kind {
            SignerKind::LocalCa if settings.local_ca.socket.is_some() => {
                // The key stays in the `rotator signer` process: never opened here.
                Arc::new(crate::signer::SocketSigner::connect(&settings.local_ca).await?)
            }
            SignerKind::LocalCa => {
                match crate::vault::secrets::local_ca_pems(&settings.local_ca, vault.as_deref())
                    .await?
                {
                    Some((key_pem, cert_pem)) => Arc::new(LocalCa::from_pems(
                        &key_pem,
                        &settings.local_ca.key_file.display().to_string(),
                        cert_pem,
                        &settings.local_ca.cert_file,
                        clock.clone(),
                    )?),
                    None => {
                        if !settings.local_ca.configured {
                            let dir = settings
                                .local_ca
                                .key_file
                                .parent()
                                .unwrap_or(&settings.data_dir)
                                .to_path_buf();
                            crate::support::fsutil::ensure_private_dir_repaired(&dir)
                                .map_err(|source| AppError::DataDir { path: dir, source })?;
                        }
                        let (ca, created) = LocalCa::ensure(&settings.local_ca, clock.clone())?;
                        created_ca = created;
                        Arc::new(ca)
                    }
                }
            }
            SignerKind::Kubernetes => {
                let (c, client_ca) = Self::cluster_and_client_ca(&settings, &instance).await?;
                cluster = Some(c.clone());
                Arc::new(KubernetesSigner::new(
                    c,
                    client_ca,
                    settings.kubernetes.signing_timeout,
                ))
            }
            // Vault signs; the cluster is still where bindings live and what
            // decides which CA a certificate must chain to.
            // The token that may sign stays behind the signer process's
            // policy: sign-verbatim itself would sign any subject (#22).
            SignerKind::VaultPki => {
                let vp = &settings.vault_pki;
                if vp.socket.is_none() && !vp.in_process {
                    return Err(AppError::VaultSigningInProcess {
                        endpoint: format!(
                            "{}/sign-verbatim/{}",
                            vp.mount,
                            vp.role.as_deref().unwrap_or("ROLE")
                        ),
                    });
                }
                let (c, client_ca) = Self::cluster_and_client_ca(&settings, &instance).await?;
                cluster = Some(c);
                match &vp.socket {
                    Some(socket) => Arc::new(
                        crate::signer::SocketSigner::connect_vault(socket.clone(), client_ca)
                            .await?,
                    ),
                    None => Arc::new(
                        crate::signer::vault_pki::open(&settings, vault.clone(), client_ca).await?,
                    ),
                }
            }
        };

        let now = clock.now();
        if recorded.is_none() || created_ca {
            let mut tx = store.begin().await?;
            // Another process starting on the new database at the same time may
            // have recorded it first: then it is checked, not recorded again.
            let first =
                recorded.is_none() && meta::insert_new(&mut tx, "signer", kind.as_str()).await?;
            if recorded.is_none() && !first {
                let theirs = meta::get(&mut tx, "signer").await?.unwrap_or_default();
                if theirs != kind.as_str() {
                    return Err(AppError::SignerMismatch {
                        recorded: theirs,
                        asked: kind.as_str().into(),
                    });
                }
            }
            if first {
                if let Some(k) = &settings.kubernetes.kubeconfig {
                    meta::set(&mut tx, "kubeconfig", &k.display().to_string()).await?;
                }
                audit::append(
                    &mut tx,
                    now,
                    &actor,
                    "store.init",
                    "rotator",
                    json!({"signer": kind.as_str(), "kubeconfig": settings.kubernetes.kubeconfig}),
                )
                .await?;
            }
            if created_ca {
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
            }
            crate::store::commit(tx).await?;
        }

        let endpoint = Self::endpoint(&settings, cluster.as_ref(), signer.as_ref()).await?;
        let report = InitReport {
            data_dir: settings.data_dir.clone(),
            database: settings.database.redacted(),
            signer: signer.kind(),
            signer_detail: match (&cluster, &settings.local_ca.socket) {
                (Some(c), _) => c.url.clone(),
                (None, Some(socket)) if !settings.local_ca.configured => {
                    format!("the signer's, from {}", socket.display())
                }
                (None, _) => settings.local_ca.cert_file.display().to_string(),
            },
            created_ca,
            instance: instance.clone(),
            kubeconfig_server: endpoint.server.clone(),
            kubeconfig_server_source: endpoint.source.clone(),
        };
        let (identity, inflight) = (ProcessIdentity::current(), Arc::new(Inflight::default()));
        Ok((
            Self {
                settings,
                store,
                signer,
                cluster,
                endpoint,
                clock,
                faults,
                actor,
                identity,
                inflight,
                metrics: Arc::new(crate::support::metrics::Metrics::default()),
                leader: Arc::new(std::sync::atomic::AtomicBool::new(true)),
                fence: Arc::default(),
                sealing,
                instance,
                vault,
            },
            report,
        ))
    }

    /// The cluster connection and the API server's client CA (configured, else
    /// read from the cluster and cached), for the signers that need a cluster.
    async fn cluster_and_client_ca(
        settings: &Settings,
        instance: &str,
    ) -> Result<(Cluster, String), AppError> {
        let mut c = Cluster::connect(&settings.kubernetes).await?;
        c.instance = instance.to_string();
        let client_ca = match &settings.kubernetes.client_ca_file {
            Some(p) => read_pem(
                "client CA",
                p,
                "set kubernetes.client_ca_file to the API server's --client-ca-file",
            )?,
            None => cached(
                &settings.data_dir,
                "client-ca.pem",
                c.client_ca_from_cluster().await,
            )?,
        };
        Ok((c, client_ca))
    }

    /// Config wins; otherwise the cluster says (kubernetes), or the local CA and
    /// the conventional local URL (local-ca). Never guessed from anything else.
    async fn endpoint(
        settings: &Settings,
        cluster: Option<&Cluster>,
        signer: &dyn Signer,
    ) -> Result<Endpoint, AppError> {
        let ca_fix = "set cluster.ca_file to the PEM bundle that verifies the API server";
        let configured_ca = match &settings.cluster.ca_file {
            Some(p) => Some(read_pem("cluster CA bundle", p, ca_fix)?),
            None => None,
        };
        if let (Some(server), Some(ca_pem)) = (&settings.cluster.server, &configured_ca) {
            return Ok(Endpoint {
                server: server.clone(),
                ca_pem: ca_pem.clone(),
                source: "config".into(),
            });
        }
        let found = match cluster {
            Some(c) => {
                let fresh = c
                    .endpoint_from_cluster()
                    .await
                    .map(|e| serde_json::json!({"server": e.server, "ca_pem": e.ca_pem, "source": e.source}).to_string());
                let text = cached(&settings.data_dir, "endpoint.json", fresh)?;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| StoreError::Invalid(format!("cached endpoint: {e}")))?;
                Endpoint {
                    server: v["server"].as_str().unwrap_or_default().to_string(),
                    ca_pem: v["ca_pem"].as_str().unwrap_or_default().to_string(),
                    source: v["source"].as_str().unwrap_or_default().to_string(),
                }
            }
            None => Endpoint {
                server: LOCAL_DEFAULT_SERVER.into(),
                ca_pem: signer.ca_bundle_pem().into(),
                source: "local-ca defaults".into(),
            },
        };
        Ok(Endpoint {
            server: settings.cluster.server.clone().unwrap_or(found.server),
            ca_pem: configured_ca.unwrap_or(found.ca_pem),
            source: if settings.cluster.server.is_some() || settings.cluster.ca_file.is_some() {
                format!("config and {}", found.source)
            } else {
                found.source
            },
        })
    }

    pub fn issuer(&self) -> Issuer<'_> {
        Issuer {
            store: &self.store,
            identity: &self.identity,
            inflight: &self.inflight,
            signer: self.signer.as_ref(),
            cluster: self.cluster.as_ref(),
            settings: &self.settings,
            clock: self.clock.as_ref(),
            faults: self.faults.as_ref(),
            endpoint: &self.endpoint,
            metrics: &self.metrics,
            sealing: &self.sealing,
        }
    }
}
