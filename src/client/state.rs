//! What the client keeps on the user's machine, one directory per server under
//! the state directory (`$XDG_CONFIG_HOME/rotator` or `~/.config/rotator`):
//! the credential (certificate and key, 0600), the server's CA, and a pending
//! request while one is in flight, so a retry after a lost answer presents the
//! same key and gets the same certificate back. A lock file serialises
//! concurrent kubectl invocations.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::ClientError;
use crate::flows::self_service::ClusterInfo;

/// The default state directory.
pub fn default_dir() -> Result<PathBuf, ClientError> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("rotator"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => Ok(PathBuf::from(h).join(".config").join("rotator")),
        None => Err(ClientError::Cache(
            "neither XDG_CONFIG_HOME nor HOME is set; pass --state-dir".into(),
        )),
    }
}

/// A credential as cached: holds the private key, so `Debug` is redacted and
/// the key is zeroized on drop.
#[derive(Clone, Serialize, Deserialize)]
pub struct Cached {
    pub server: String,
    pub user: String,
    pub certificate: String,
    pub key: Zeroizing<String>,
    pub serial: String,
    pub generation: i64,
    pub not_before: i64,
    pub not_after: i64,
    pub renew_after: i64,
    pub namespace: Option<String>,
    pub cluster: ClusterInfo,
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cached")
            .field("server", &self.server)
            .field("user", &self.user)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A request in flight: its key and CSR, kept until the answer is stored.
#[derive(Clone, Serialize, Deserialize)]
pub struct Pending {
    /// "enroll:<token id>" or "renew:<serial>": a pending request is reused only
    /// for the same kind of request from the same starting point.
    pub purpose: String,
    pub key: Zeroizing<String>,
    pub csr: String,
}

/// A renewal that failed, remembered briefly so that every kubectl call in
/// the meantime does not wait for the server again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewFailure {
    /// Unix seconds.
    pub at: i64,
    /// The error, as the user was told it.
    pub error: String,
}

/// The directory for one server.
#[derive(Debug, Clone)]
pub struct ServerDir {
    pub path: PathBuf,
}

impl ServerDir {
    pub fn for_server(state_dir: &Path, server: &str) -> Result<Self, ClientError> {
        let (host, port) = super::http::parse_server(server)?;
        let name: String = format!("{host}_{port}")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = state_dir.join(name);
        crate::support::fsutil::ensure_private_dir(&path)
            .map_err(|e| ClientError::Cache(format!("cannot create {}: {e}", path.display())))?;
        Ok(Self { path })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, ClientError> {
        let p = self.file(name);
        match crate::support::fsutil::read_regular(&p) {
            Ok(None) => Ok(None),
            Ok(Some(b)) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                ClientError::Cache(format!(
                    "{} is damaged ({e}); delete it and fetch again",
                    p.display()
                ))
            }),
            Err(e) => Err(ClientError::Cache(format!(
                "cannot read {}: {e}\nfix: move it away; the state directory holds only files rotator writes",
                p.display()
            ))),
        }
    }

    fn write_json<T: Serialize>(&self, name: &str, v: &T) -> Result<(), ClientError> {
        let p = self.file(name);
        let bytes = Zeroizing::new(serde_json::to_vec_pretty(v).expect("json"));
        crate::support::fsutil::write_private_atomic(&p, &bytes)
            .map_err(|e| {
                ClientError::Cache(format!(
                    "cannot write {}: {e}\nfix: move it away; the state directory holds only files rotator writes",
                    p.display()
                ))
            })
    }

    pub fn credential(&self) -> Result<Option<Cached>, ClientError> {
        self.read_json("credential.json")
    }

    pub fn store_credential(&self, c: &Cached) -> Result<(), ClientError> {
        self.write_json("credential.json", c)
    }

    pub fn pending(&self) -> Result<Option<Pending>, ClientError> {
        self.read_json("pending.json")
    }

    pub fn store_pending(&self, p: &Pending) -> Result<(), ClientError> {
        self.write_json("pending.json", p)
    }

    pub fn clear_pending(&self) {
        let _ = std::fs::remove_file(self.file("pending.json"));
    }

    /// The last failed renewal, if one is remembered (a damaged file is ignored).
    pub fn renew_failure(&self) -> Option<RenewFailure> {
        self.read_json("renew-failed.json").ok().flatten()
    }

    pub fn store_renew_failure(&self, f: &RenewFailure) -> Result<(), ClientError> {
        self.write_json("renew-failed.json", f)
    }

    pub fn clear_renew_failure(&self) {
        let _ = std::fs::remove_file(self.file("renew-failed.json"));
    }

    pub fn server_ca(&self) -> Option<String> {
        crate::support::fsutil::read_regular_string(&self.file("server-ca.pem"))
            .ok()
            .flatten()
    }

    pub fn store_server_ca(&self, pem: &str) -> Result<(), ClientError> {
        let p = self.file("server-ca.pem");
        crate::support::fsutil::write_private_atomic(&p, pem.as_bytes())
            .map_err(|e| ClientError::Cache(format!("cannot write {}: {e}", p.display())))
    }

    /// An exclusive lock on this server's state, waited for at most `timeout`.
    pub fn lock(&self, timeout: Duration) -> Result<File, ClientError> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.file("lock");
        let f = crate::support::fsutil::check_replaceable(&p)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                    .open(&p)
            })
            .map_err(|e| ClientError::Cache(format!("cannot open {}: {e}", p.display())))?;
        let deadline = Instant::now() + timeout;
        loop {
            match f.try_lock() {
                Ok(()) => return Ok(f),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(ClientError::Cache(format!(
                        "{} is locked by another rotator ({e}); try again",
                        p.display()
                    )));
                }
            }
        }
    }
}
