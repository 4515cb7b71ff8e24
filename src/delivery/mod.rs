//! Where a rendered kubeconfig goes. `prepare` runs before any key exists, so
//! an unwritable target fails the command before anything is issued.
pub mod kubeconfig;

use std::io::Write;
use std::path::PathBuf;

use crate::support::exit::{Exit, ExitStatus};

#[derive(Debug, thiserror::Error)]
#[error("cannot deliver the kubeconfig to {target}: {reason}\nfix: {fix}")]
pub struct SinkError {
    pub target: String,
    pub reason: String,
    pub fix: &'static str,
}

impl ExitStatus for SinkError {
    fn exit(&self) -> Exit {
        Exit::Output
    }
}

pub trait Sink: Send {
    fn describe(&self) -> String;
    fn prepare(&self) -> Result<(), SinkError>;
    /// Asks the target's server, before anything is issued, whether it would
    /// refuse the delivery (a Vault policy): a refusal found only at the end
    /// would leave a user with a credential nobody received. An outage is not
    /// a refusal here; the delivery itself reports it.
    fn preflight(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
    fn deliver<'a>(&'a mut self, kubeconfig: &'a str) -> BoxFuture<'a, Result<(), SinkError>>;
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A file written atomically with mode 0600.
#[derive(Debug, Clone)]
pub struct FileSink {
    pub path: PathBuf,
}

impl FileSink {
    fn err(&self, e: std::io::Error) -> SinkError {
        SinkError {
            target: self.path.display().to_string(),
            reason: e.to_string(),
            fix: "choose a path in an existing directory you can write to, not a FIFO or device (or --out - for stdout)",
        }
    }
}

impl Sink for FileSink {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn prepare(&self) -> Result<(), SinkError> {
        crate::support::fsutil::check_writable_target(&self.path).map_err(|e| self.err(e))
    }
    /// The write runs on a blocking thread: a slow or stuck file system holds
    /// up this delivery only, never the async runtime (the daemon's other jobs,
    /// its signal handling).
    fn deliver<'a>(&'a mut self, kubeconfig: &'a str) -> BoxFuture<'a, Result<(), SinkError>> {
        let path = self.path.clone();
        let bytes = zeroize::Zeroizing::new(kubeconfig.as_bytes().to_vec());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                crate::support::fsutil::write_private_atomic(&path, &bytes)
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map_err(|e| self.err(e))
        })
    }
}

/// Any writer: stdout for `--out -`, a buffer in tests.
pub struct WriterSink<W: Write + Send> {
    pub name: &'static str,
    pub writer: W,
}

impl<W: Write + Send> Sink for WriterSink<W> {
    fn describe(&self) -> String {
        self.name.to_string()
    }
    fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }
    fn deliver<'a>(&'a mut self, kubeconfig: &'a str) -> BoxFuture<'a, Result<(), SinkError>> {
        let r = self
            .writer
            .write_all(kubeconfig.as_bytes())
            .and_then(|_| self.writer.flush())
            .map_err(|e| SinkError {
                target: self.name.to_string(),
                reason: e.to_string(),
                fix: "check that the output stream is open",
            });
        Box::pin(async move { r })
    }
}

/// A Kubernetes Secret in one of the user's namespaces: type Opaque, key
/// `kubeconfig`, made by rotator. rotator writes only the Secret it created
/// itself, known by the uid recorded in `delivery_secrets` when it created it:
/// later writes are replaces conditional on that uid. So rotator needs `create`
/// on secrets in the namespace and `update` on this one name, never a verb that
/// returns a Secret's content (`get`, `list`, `watch`, `patch`).
pub struct SecretSink {
    pub cluster: crate::cluster::Cluster,
    pub store: crate::store::Store,
    pub namespace: String,
    pub name: String,
    pub user: String,
}

/// The user whose kubeconfigs the Secret rotator created at `ns/name` holds,
/// and its uid, if rotator created one there.
pub async fn delivery_secret(
    store: &crate::store::Store,
    ns: &str,
    name: &str,
) -> Result<Option<(String, String)>, crate::store::StoreError> {
    let mut conn = store.conn().await?;
    Ok(sqlx::query_as::<_, (String, String)>(
        "SELECT user_name, uid FROM delivery_secrets WHERE namespace = $1 AND name = $2",
    )
    .bind(ns)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await?)
}

async fn record_delivery_secret(
    store: &crate::store::Store,
    ns: &str,
    name: &str,
    user: &str,
    uid: &str,
) -> Result<(), crate::store::StoreError> {
    let mut conn = store.conn().await?;
    sqlx::query(
        "INSERT INTO delivery_secrets (namespace, name, user_name, uid, created_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (namespace, name) DO UPDATE SET user_name = excluded.user_name, uid = excluded.uid, created_at = excluded.created_at",
    )
    .bind(ns)
    .bind(name)
    .bind(user)
    .bind(uid)
    .bind(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

impl SecretSink {
    fn err(&self, reason: String, fix: &'static str) -> SinkError {
        SinkError {
            target: self.describe(),
            reason,
            fix,
        }
    }

    async fn write(&self, kubeconfig: &str) -> Result<(), SinkError> {
        let (ns, name) = (self.namespace.as_str(), self.name.as_str());
        let known = delivery_secret(&self.store, ns, name)
            .await
            .map_err(|e| self.err(e.to_string(), "check the database"))?;
        if let Some((owner, _)) = &known
            && *owner != self.user
        {
            return Err(self.err(
                format!(
                    "rotator made this Secret for user {owner:?}, not {:?}",
                    self.user
                ),
                "give each user a Secret of their own",
            ));
        }
        let uid = known.map(|(_, uid)| uid);
        match self
            .cluster
            .write_kubeconfig_secret(ns, name, &self.user, kubeconfig, uid.as_deref())
            .await
        {
            Ok(Some(created)) => record_delivery_secret(&self.store, ns, name, &self.user, &created)
                .await
                .map_err(|e| self.err(e.to_string(), "check the database")),
            Ok(None) => Ok(()),
            Err(e @ crate::cluster::ClusterError::Conflict(_)) => {
                let text = e.to_string();
                let reason = text.split("\nfix: ").next().unwrap_or_default().to_string();
                Err(self.err(
                    reason,
                    "rotator writes only Secrets it created: delete that Secret if it is a stale copy, or deliver elsewhere",
                ))
            }
            Err(e) => Err(self.err(
                e.to_string(),
                "check that the namespace exists and that deploy/kubernetes/rbac-secret-delivery.yaml grants rotator this Secret",
            )),
        }
    }
}

impl Sink for SecretSink {
    fn describe(&self) -> String {
        format!("secret {}/{}", self.namespace, self.name)
    }
    fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }
    fn deliver<'a>(&'a mut self, kubeconfig: &'a str) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.write(kubeconfig))
    }
}

/// Where a user's reissued kubeconfigs go, as recorded with the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `<rotation.delivery_dir>/<user>.kubeconfig`.
    Directory,
    /// A Secret `namespace/name`.
    Secret { namespace: String, name: String },
    /// The user renews through the HTTPS API with a key only they hold
    /// (`add-user --enroll`); the daemon never reissues for them.
    Client,
    /// KV v2 `mount/path` in Vault (`{user}` in the path is the user's name):
    /// [`crate::vault::kv::VaultSink`].
    Vault { mount: String, path: String },
}

impl Target {
    /// `dir` or `secret:NAMESPACE/NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "dir" => return Ok(Target::Directory),
            "client" => return Ok(Target::Client),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("vault:") {
            let (mount, path) = rest
                .trim_start_matches('/')
                .split_once('/')
                .ok_or_else(|| format!("{s:?}: no path after the mount (vault:MOUNT/PATH)"))?;
            let path = path.trim_end_matches('/');
            if mount.is_empty()
                || path.is_empty()
                || path
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..")
                || path.contains(['#', '?'])
            {
                return Err(format!(
                    "{s:?} is not a Vault KV v2 path (vault:MOUNT/PATH, e.g. vault:secret/kubeconfigs/{{user}})"
                ));
            }
            return Ok(Target::Vault {
                mount: mount.into(),
                path: path.into(),
            });
        }
        let Some((ns, name)) = s.strip_prefix("secret:").and_then(|r| r.split_once('/')) else {
            return Err(format!(
                "{s:?} is not a delivery target (use dir, client, secret:NAMESPACE/NAME or vault:MOUNT/PATH)"
            ));
        };
        crate::policy::validate_dns_label(ns).map_err(|e| format!("namespace {ns:?}: {e}"))?;
        if name.is_empty()
            || name.len() > 253
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(format!("secret name {name:?} is not a DNS subdomain"));
        }
        Ok(Target::Secret {
            namespace: ns.into(),
            name: name.into(),
        })
    }

    pub fn as_string(&self) -> String {
        match self {
            Target::Directory => "dir".into(),
            Target::Secret { namespace, name } => format!("secret:{namespace}/{name}"),
            Target::Client => "client".into(),
            Target::Vault { mount, path } => format!("vault:{mount}/{path}"),
        }
    }
}
