//! `rotator backup FILE`: a consistent copy of the SQLite database while the
//! daemon and other commands go on writing to it. `VACUUM INTO` writes one
//! read transaction's snapshot; the copy is made in a locked 0600 temporary
//! file beside FILE, checked (SQLite's `integrity_check`, and the audit chain
//! against the checkpoint read before the snapshot), and only then linked in
//! as FILE, which must not exist: a backup never replaces anything.
use std::path::{Path, PathBuf};

use super::{Store, StoreError, audit};
use crate::support::exit::{Exit, ExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(
        "`rotator backup` copies a SQLite database; this one is on PostgreSQL ({database})\nfix: back it up with the server's tools: `pg_dump --format=custom --file=FILE DATABASE` (a consistent snapshot while rotator runs), or `rotator database copy --to sqlite:///FILE` with the daemons stopped"
    )]
    Shared { database: String },
    #[error(
        "{path} already exists; a backup never replaces a file\nfix: name a new file, or move the old one away first"
    )]
    Exists { path: PathBuf },
    #[error("cannot write the backup {path}: {reason}\nfix: {fix}")]
    Io {
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error(
        "the copy failed its check ({what}): {reason}; nothing was written to {path}\nfix: run `rotator doctor` and `rotator audit verify` on the live database; a backup of a damaged database would only preserve the damage"
    )]
    Check {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExitStatus for BackupError {
    fn exit(&self) -> Exit {
        match self {
            BackupError::Exists { .. } => Exit::Conflict,
            BackupError::Shared { .. } => Exit::Usage,
            BackupError::Io { .. } => Exit::Output,
            BackupError::Check { what, .. } if *what == "audit chain" => Exit::AuditBroken,
            BackupError::Check { .. } => Exit::Database,
            BackupError::Store(e) => e.exit(),
        }
    }
}

/// What a backup holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub users: i64,
    pub credentials: i64,
    pub audit_events: i64,
    pub audit_head: String,
}

/// Copies the database behind `store` (shown to the user as `shown`) to
/// `dest` (see the module comment).
pub async fn backup(store: &Store, shown: &str, dest: &Path) -> Result<BackupReport, BackupError> {
    if store.shared() {
        return Err(BackupError::Shared {
            database: shown.to_string(),
        });
    }
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(BackupError::Exists {
            path: dest.to_path_buf(),
        });
    }
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |reason: String, fix| BackupError::Io {
        path: dest.to_path_buf(),
        reason,
        fix,
    };
    if !dir.is_dir() {
        return Err(io(
            format!("directory {} does not exist", dir.display()),
            "create the directory first",
        ));
    }
    // Read before the snapshot: everything it vouches for is in the copy.
    let checkpoint = audit::checkpoint_now(store).await?;
    let tmp = crate::support::fsutil::PrivateTmp::new_in(&dir).map_err(|e| {
        io(
            format!("cannot create a temporary file in {}: {e}", dir.display()),
            "make the directory writable by rotator",
        )
    })?;
    let tmp_path = tmp
        .path()
        .to_str()
        .ok_or_else(|| {
            io(
                "the path is not UTF-8".into(),
                "choose a path SQLite can be given",
            )
        })?
        .to_string();
    sqlx::query("VACUUM INTO $1")
        .bind(&tmp_path)
        .execute(store.pool())
        .await
        .map_err(|e| {
            io(
                format!("SQLite could not write the copy: {e}"),
                "check the free space and that the directory is writable",
            )
        })?;
    let report = check_copy(store, tmp.path(), dest, checkpoint).await?;
    tmp.persist_new(dest).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => BackupError::Exists {
            path: dest.to_path_buf(),
        },
        _ => io(e.to_string(), "make the directory writable by rotator"),
    })?;
    Ok(report)
}

/// Opens the copy without writing to it and checks it is whole.
async fn check_copy(
    live: &Store,
    copy: &Path,
    dest: &Path,
    checkpoint: audit::CheckpointState,
) -> Result<BackupReport, BackupError> {
    let fail = |what, reason: String| BackupError::Check {
        path: dest.to_path_buf(),
        what,
        reason,
    };
    // Immutable: no lock, no -wal or -shm file made beside the copy.
    let url = format!("sqlite://{}?mode=ro&immutable=true", copy.display());
    let pool: sqlx::AnyPool = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .map_err(|e| fail("open", e.to_string()))?;
    let result = async {
        let rows: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
            .fetch_all(&pool)
            .await
            .map_err(|e| fail("integrity_check", e.to_string()))?;
        let found: Vec<String> = rows.into_iter().map(|r| r.0).collect();
        if found != ["ok"] {
            return Err(fail("integrity_check", found.join("; ")));
        }
        let copy_store = Store {
            pool: pool.clone(),
            location: super::Location::sqlite_file(copy),
            locks: PathBuf::from("/nonexistent"),
            audit: live.audit.clone(),
            commits: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            fence: None,
            outage: Default::default(),
            writers: Default::default(),
        };
        let r = audit::verify_snapshot(&copy_store, checkpoint).await?;
        if let Some(b) = r.first_break {
            return Err(fail(
                "audit chain",
                format!("event {} ({}): {}", b.seq, b.kind.name(), b.reason),
            ));
        }
        let count = |sql: &'static str| {
            let pool = pool.clone();
            async move {
                sqlx::query_as::<_, (i64,)>(sql)
                    .fetch_one(&pool)
                    .await
                    .map(|r| r.0)
                    .map_err(StoreError::from)
            }
        };
        Ok(BackupReport {
            path: dest.to_path_buf(),
            bytes: std::fs::metadata(copy).map(|m| m.len()).unwrap_or(0),
            users: count("SELECT COUNT(*) FROM users").await?,
            credentials: count("SELECT COUNT(*) FROM credentials").await?,
            audit_events: r.events,
            audit_head: r.head,
        })
    }
    .await;
    pool.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    async fn store(dir: &Path) -> Store {
        let mut s = Store::open(&crate::store::Location::sqlite_file(
            &dir.join("rotator.db"),
        ))
        .await
        .unwrap();
        let ring = audit::Keyring::open(&dir.join("audit.key"), &dir.join("audit.head"), true, &s)
            .await
            .unwrap();
        s.set_audit(ring);
        for i in 0..3 {
            let mut tx = s.begin().await.unwrap();
            audit::append(
                &mut tx,
                1,
                "test",
                "test.event",
                &format!("e{i}"),
                serde_json::json!({}),
            )
            .await
            .unwrap();
            super::super::commit(tx).await.unwrap();
        }
        s
    }

    #[tokio::test]
    async fn a_backup_is_0600_verified_and_never_replaces_a_file() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path()).await;
        let dest = d.path().join("b.db");
        let r = backup(&s, "test", &dest).await.unwrap();
        assert_eq!(r.audit_events, 3);
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = backup(&s, "test", &dest).await.unwrap_err();
        assert!(matches!(again, BackupError::Exists { .. }), "{again}");
        assert_eq!(again.exit(), Exit::Conflict);
        // No temporary file, -wal or -shm left beside it.
        let mut names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("b.db") || n.starts_with(".rotator-"))
            .collect();
        names.sort();
        assert_eq!(names, ["b.db"]);
    }

    #[tokio::test]
    async fn a_log_damaged_before_the_backup_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let s = store(d.path()).await;
        // The last event deleted behind rotator's back (the triggers only guard mistakes).
        let mut c = s.conn().await.unwrap();
        sqlx::query("DROP TRIGGER audit_events_no_delete")
            .execute(&mut *c)
            .await
            .unwrap();
        sqlx::query("DELETE FROM audit_events WHERE seq = (SELECT MAX(seq) FROM audit_events)")
            .execute(&mut *c)
            .await
            .unwrap();
        drop(c);
        let dest = d.path().join("b.db");
        let e = backup(&s, "test", &dest).await.unwrap_err();
        assert_eq!(e.exit(), Exit::AuditBroken, "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        assert!(!dest.exists(), "nothing is written when the check fails");
    }
}
