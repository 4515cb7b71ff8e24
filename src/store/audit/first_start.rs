//! The audit key and checkpoint at a database's first start.
//!
//! A database rotator never initialized (no instance id, no audit event) has
//! nothing a key could have keyed, so a missing key is made there, with its
//! checkpoint at the empty log's head: also where `audit.key_file` is
//! configured (the ha-postgres overlay points it at an empty shared volume).
//! Anywhere else a missing configured key is refused: a new one would leave
//! every event the old one keyed unverifiable.
//!
//! Several processes may start at once on one database and one volume (two
//! replicas): the decision is taken under the checkpoint's lock after looking
//! for the key again, and the key file is linked in without replacing anything,
//! so they end with one key that all of them use.
use std::path::Path;

use super::{Head, Keyring, StoreError, head, key_err, lock_file, read_key};
use crate::store::{Store, meta};

/// What the database holds that a key may have keyed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogState {
    events: i64,
    keyed: i64,
    initialized: bool,
}

impl LogState {
    pub(crate) async fn read(store: &Store) -> Result<Self, StoreError> {
        let mut conn = store.conn().await?;
        let (events, keyed): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN keyed = 1 THEN 1 ELSE 0 END), 0) FROM audit_events",
        )
        .fetch_one(&mut *conn)
        .await?;
        let initialized = meta::get(&mut conn, meta::INSTANCE_ID).await?.is_some();
        Ok(Self {
            events,
            keyed,
            initialized,
        })
    }

    /// A database no rotator process has initialized: no instance id, no event.
    pub fn fresh(&self) -> bool {
        self.events == 0 && !self.initialized
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Invalid(e.to_string()))?
}

/// Opens the key at `key_file`, making it (and the first checkpoint) where
/// that is safe: a fresh database, or with `default_path` (no key configured)
/// a log without keyed events, as before; and never beside an existing
/// checkpoint, which some other key made.
pub(super) async fn open(
    key_file: &Path,
    checkpoint: &Path,
    default_path: bool,
    store: &Store,
) -> Result<Keyring, StoreError> {
    let (kf, cp) = (key_file.to_path_buf(), checkpoint.to_path_buf());
    if let Some(k) = blocking(move || read_key(&kf)).await? {
        let ring = Keyring::from_bytes(&k, key_file, checkpoint);
        return checkpoint_if_fresh(ring, store).await;
    }
    let lock = blocking(move || lock_file(&cp)).await?;
    let kf = key_file.to_path_buf();
    if let Some(k) = blocking(move || read_key(&kf)).await? {
        drop(lock);
        let ring = Keyring::from_bytes(&k, key_file, checkpoint);
        return checkpoint_if_fresh(ring, store).await;
    }
    let log = LogState::read(store).await?;
    refuse_unless_safe(key_file, checkpoint, default_path, log)?;
    let mut conn = store.conn().await?;
    let head = head(&mut conn).await?;
    drop(conn);
    let (kf, cp) = (key_file.to_path_buf(), checkpoint.to_path_buf());
    blocking(move || {
        let _lock = lock;
        let ring = Keyring::from_bytes(&create_or_read(&kf)?, &kf, &cp);
        ring.write_checkpoint(&head, Some(head.seq + 1))?;
        tracing::info!(key = %kf.display(), checkpoint = %cp.display(), "audit key and checkpoint created");
        Ok(ring)
    })
    .await
}

fn refuse_unless_safe(
    key_file: &Path,
    checkpoint: &Path,
    default_path: bool,
    log: LogState,
) -> Result<(), StoreError> {
    let has_checkpoint = checkpoint.exists();
    if !has_checkpoint && (log.fresh() || (default_path && log.keyed == 0)) {
        return Ok(());
    }
    let found = match (has_checkpoint, log.events) {
        (true, 0) => format!("a checkpoint at {}", checkpoint.display()),
        (true, n) => format!(
            "{n} events ({} keyed events) and a checkpoint at {}",
            log.keyed,
            checkpoint.display()
        ),
        (false, 0) => "an instance id".to_string(),
        (false, n) => format!("{n} events ({} keyed events)", log.keyed),
    };
    Err(key_err(
        key_file,
        format!(
            "it does not exist, but the audit log already has {found}: a new key would make it unverifiable"
        ),
        if default_path {
            "restore the audit key from its backup (events it keyed cannot be verified without it)"
                .to_string()
        } else {
            format!(
                "restore the audit key from its backup to {} (events it keyed cannot be verified without it); rotator creates it only for a database without audit events",
                key_file.display()
            )
        },
    ))
}

/// The key another process may have linked in meanwhile (one not using this
/// checkpoint's lock) wins over ours.
fn create_or_read(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, StoreError> {
    let bytes = zeroize::Zeroizing::new(crate::pki::random_bytes::<32>().to_vec());
    let text = {
        use base64::Engine;
        zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&*bytes))
    };
    let created =
        crate::support::fsutil::create_private_new(path, text.as_bytes()).map_err(|e| {
            key_err(
                path,
                format!("cannot create it: {e}"),
                "make the key's directory writable by rotator",
            )
        })?;
    if created {
        return Ok(bytes);
    }
    read_key(path)?.ok_or_else(|| {
        key_err(
            path,
            "it appeared and vanished while rotator created it",
            "start rotator again",
        )
    })
}

/// A key without a checkpoint (made by hand, or by a first start that was
/// killed before its checkpoint) on a fresh database: the first checkpoint, at
/// the empty log. Elsewhere a missing checkpoint is left missing, so `audit
/// verify` keeps reporting it until an operator resets it.
async fn checkpoint_if_fresh(ring: Keyring, store: &Store) -> Result<Keyring, StoreError> {
    if ring.checkpoint.exists() || !LogState::read(store).await?.fresh() {
        return Ok(ring);
    }
    blocking(move || {
        let lock = ring.lock()?;
        if !ring.checkpoint.exists() {
            ring.write_checkpoint(&Head::genesis(), Some(1))?;
            tracing::info!(checkpoint = %ring.checkpoint.display(), "audit checkpoint created for a new database");
        }
        drop(lock);
        Ok(ring)
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use super::super::{CheckpointState, append, verify};
    use super::*;
    use crate::store::{Location, commit};

    async fn store(dir: &Path) -> Store {
        Store::open(&Location::sqlite_file(&dir.join("rotator.db")))
            .await
            .unwrap()
    }

    fn paths(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("shared/audit.key"), dir.join("shared/audit.head"))
    }

    async fn event(store: &mut Store, ring: std::sync::Arc<Keyring>) {
        store.set_audit(ring);
        let mut tx = store.begin().await.unwrap();
        append(&mut tx, 1, "test", "test.event", "x", serde_json::json!({}))
            .await
            .unwrap();
        commit(tx).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn processes_starting_at_once_on_a_fresh_database_share_one_configured_key() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("shared")).unwrap();
        let (kf, cp) = paths(d.path());
        store(d.path()).await.close().await; // the schema, made once
        let mut starts = Vec::new();
        for _ in 0..8 {
            let (dir, kf, cp) = (d.path().to_path_buf(), kf.clone(), cp.clone());
            starts.push(tokio::spawn(async move {
                // Each its own handle on the database, as each replica has.
                let s = store(&dir).await;
                Keyring::open(&kf, &cp, false, &s).await
            }));
        }
        let mut rings = Vec::new();
        for s in starts {
            rings.push(s.await.unwrap().expect("every first start opens"));
        }
        let probe = rings[0].mac(b"probe");
        assert!(
            rings.iter().all(|r| r.mac(b"probe") == probe),
            "every process uses the one key"
        );
        let on_disk = read_key(&kf).unwrap().expect("the key file");
        assert_eq!(
            Keyring::from_bytes(&on_disk, &kf, &cp).mac(b"probe"),
            probe,
            "the key in memory is the key on the volume"
        );
        let mode = std::fs::metadata(&kf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            rings[0].read_checkpoint(),
            CheckpointState::Valid(super::super::Checkpoint {
                seq: 0,
                hash: super::super::GENESIS.into(),
                keyed_from: 1
            })
        );
        let mut names: Vec<String> = std::fs::read_dir(d.path().join("shared"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["audit.head", "audit.head.lock", "audit.key"]);
        // Each process's events verify under the key the others hold.
        for ring in rings.iter().take(2) {
            event(&mut store(d.path()).await, ring.clone()).await;
        }
        let mut s = store(d.path()).await;
        s.set_audit(rings[1].clone());
        let r = verify(&s).await.unwrap();
        assert!(r.first_break.is_none(), "{:?}", r.first_break);
        assert_eq!((r.events, r.checkpoint), (2, Some(2)));
    }

    #[tokio::test]
    async fn a_missing_configured_key_beside_events_is_refused_and_not_made() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("shared")).unwrap();
        let (kf, cp) = paths(d.path());
        let mut s = store(d.path()).await;
        let ring = Keyring::open(&kf, &cp, false, &s).await.unwrap();
        event(&mut s, ring).await;
        std::fs::remove_file(&kf).unwrap();
        std::fs::remove_file(&cp).unwrap();
        let e = Keyring::open(&kf, &cp, false, &store(d.path()).await)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("already has 1 events (1 keyed events)"), "{e}");
        assert!(
            e.contains("fix: restore the audit key from its backup"),
            "{e}"
        );
        assert!(!kf.exists() && !cp.exists(), "nothing was made: {e}");
    }

    #[tokio::test]
    async fn a_key_made_by_hand_for_a_fresh_database_gets_its_first_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("shared")).unwrap();
        let (kf, cp) = paths(d.path());
        crate::support::fsutil::write_private_atomic(
            &kf,
            b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
        )
        .unwrap();
        let mut s = store(d.path()).await;
        let ring = Keyring::open(&kf, &cp, false, &s).await.unwrap();
        assert!(matches!(ring.read_checkpoint(), CheckpointState::Valid(c) if c.seq == 0));
        event(&mut s, ring).await;
        let r = verify(&s).await.unwrap();
        assert!(r.first_break.is_none(), "{:?}", r.first_break);
        assert_eq!(r.checkpoint, Some(1));
        // Once the database has events, a lost checkpoint stays lost (visible
        // to `audit verify`), never made again by a start.
        std::fs::remove_file(&cp).unwrap();
        let ring = Keyring::open(&kf, &cp, false, &store(d.path()).await)
            .await
            .unwrap();
        assert_eq!(ring.read_checkpoint(), CheckpointState::Missing);
    }
}
