//! SQLite through sqlx: WAL, foreign keys, a busy timeout, migrations from
//! `migrations/sqlite/`. Every state change runs in one `BEGIN IMMEDIATE` transaction
//! together with its audit event.
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqliteConnection, SqlitePool, Transaction};

use crate::exit::{Exit, ExitStatus};

pub mod audit;
pub mod backup;
pub mod copy;
pub mod credentials;
pub mod enrollments;
pub mod fence;
pub mod issuances;
pub mod meta;
pub mod tokens;
pub mod users;

/// The connection the engine-neutral modules (fence, copy) take.
pub type Conn = SqliteConnection;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {reason}\nfix: {fix}")]
    Open {
        path: String,
        reason: String,
        fix: &'static str,
    },
    #[error(
        "database is locked by another process (waited {waited:?})\nfix: wait for the other rotator command to finish; two daemons must not share one database"
    )]
    Locked { waited: Duration },
    #[error(
        "database file is corrupt or not a rotator database: {0}\nfix: restore it from a backup; rotator will not write to it"
    )]
    Corrupt(String),
    #[error(
        "database schema migration failed: {0}\nfix: the database may be from a newer rotator; use that version or restore a backup"
    )]
    Migrate(String),
    #[error(
        "another rotator process has been working on {user:?}'s cluster access for {waited:?} (lock {lock})\nfix: wait for it to finish (a hung API server makes it slow), then run the command again; a process that died holds no lock"
    )]
    UserBusy {
        user: String,
        waited: Duration,
        lock: String,
    },
    #[error("database error: {0}")]
    Query(String),
    #[error("audit key or checkpoint {path}: {reason}\nfix: {fix}")]
    AuditKey {
        path: String,
        reason: String,
        fix: String,
    },
    #[error(
        "refused: this daemon led with epoch {mine}, but {holder:?} leads now (epoch {current}); nothing of this transaction was committed\nfix: nothing to do: the new leader runs the jobs, and this daemon stands by until it wins the Lease again"
    )]
    Fenced {
        mine: i64,
        current: i64,
        holder: String,
    },
    #[error("stored data is invalid: {0}")]
    Invalid(String),
}

impl ExitStatus for StoreError {
    fn exit(&self) -> Exit {
        match self {
            StoreError::AuditKey { .. } => Exit::Config,
            StoreError::UserBusy { .. } | StoreError::Fenced { .. } => Exit::Conflict,
            _ => Exit::Database,
        }
    }
}

pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            let code = db.code().unwrap_or_default();
            // SQLite primary result codes: 5 BUSY, 6 LOCKED, 11 CORRUPT, 26 NOTADB.
            match code.parse::<i32>().map(|c| c & 0xff) {
                Ok(5) | Ok(6) => {
                    return StoreError::Locked {
                        waited: BUSY_TIMEOUT,
                    };
                }
                Ok(11) | Ok(26) => return StoreError::Corrupt(db.message().to_string()),
                _ => {}
            }
        }
        StoreError::Query(e.to_string())
    }
}

/// A write transaction. Derefs to the connection; carries the audit key so
/// `audit::append` can MAC, and the head it appended so `commit` can move the
/// audit checkpoint forward once the transaction is durable.
pub struct Tx {
    inner: Transaction<'static, Sqlite>,
    pub(crate) audit: Option<std::sync::Arc<audit::Keyring>>,
    pub(crate) appended: Option<audit::Head>,
    pool: SqlitePool,
    fence: Option<std::sync::Arc<fence::Fence>>,
}

impl std::ops::Deref for Tx {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        &self.inner
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.inner
    }
}

impl Tx {
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.inner.rollback().await
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Lock files that serialize work on one user across processes.
    locks: std::path::PathBuf,
    audit: Option<std::sync::Arc<audit::Keyring>>,
    /// With leader election: the epoch every write transaction must still hold
    /// at its commit (a leader's jobs; see `fence`).
    fence: Option<std::sync::Arc<fence::Fence>>,
}

/// Held while one process works on one user's cluster access; released on drop,
/// and by the kernel when the process dies (no stale lock survives a crash).
#[derive(Debug)]
pub struct UserLock {
    _file: std::fs::File,
}

/// How long a command waits for another process working on the same user.
pub const USER_LOCK_WAIT: Duration = Duration::from_secs(120);

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: e.to_string(),
                fix: "check data_dir",
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Query(reason) => StoreError::Open {
                    path: path.display().to_string(),
                    reason,
                    fix: "check that the data directory exists and rotator may write to it",
                },
                other => other,
            })?;
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(inner) => match StoreError::from(inner) {
                StoreError::Query(m) => StoreError::Migrate(m),
                other => other,
            },
            other => StoreError::Migrate(other.to_string()),
        })?;
        // A corrupt file can still open and migrate lazily; ask SQLite outright.
        let (check,): (String,) = sqlx::query_as("PRAGMA quick_check")
            .fetch_one(&pool)
            .await?;
        if check != "ok" {
            return Err(StoreError::Corrupt(check));
        }
        let locks = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.join("locks"),
            _ => std::path::PathBuf::from("locks"),
        };
        Ok(Self {
            pool,
            locks,
            audit: None,
            fence: None,
        })
    }

    /// Whether several daemons can share this database. A SQLite file is one
    /// machine's; PostgreSQL (once its engine is here) is shared.
    pub fn shared(&self) -> bool {
        false
    }

    /// The same store whose write transactions commit only while `fence`'s
    /// epoch is the leader's: what a leader's jobs write through.
    pub fn fenced(&self, fence: std::sync::Arc<fence::Fence>) -> Store {
        Store {
            fence: Some(fence),
            ..self.clone()
        }
    }

    /// Attaches the audit key and checkpoint (`App::open` does, before any write).
    pub fn set_audit(&mut self, keyring: std::sync::Arc<audit::Keyring>) {
        self.audit = Some(keyring);
    }

    pub fn audit_keyring(&self) -> Option<&std::sync::Arc<audit::Keyring>> {
        self.audit.as_ref()
    }

    /// Serializes, across every process on this data directory, the work that
    /// makes the cluster follow the database for `user`: whoever holds it reads
    /// the database after taking it, so nobody writes what they read earlier.
    pub async fn lock_user(&self, user: &str) -> Result<UserLock, StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |e: std::io::Error| StoreError::Open {
            path: self.locks.display().to_string(),
            reason: e.to_string(),
            fix: "make the data directory writable by rotator",
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.locks)
            .map_err(io)?;
        let name = crate::pki::hex(&crate::pki::sha256(user.as_bytes())[..16]);
        let path = self.locks.join(&name);
        // Only a regular file (or none): opening a FIFO planted here would block.
        if let Ok(m) = std::fs::symlink_metadata(&path)
            && !m.file_type().is_file()
        {
            return Err(io(std::io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            ))));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let deadline = std::time::Instant::now() + USER_LOCK_WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(UserLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::UserBusy {
                        user: user.to_string(),
                        waited: USER_LOCK_WAIT,
                        lock: path.display().to_string(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// A write transaction that takes SQLite's write lock at once, so two writers
    /// queue on the busy timeout instead of failing halfway through.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(Tx {
            inner: self.pool.begin_with("BEGIN IMMEDIATE").await?,
            audit: self.audit.clone(),
            appended: None,
            pool: self.pool.clone(),
            fence: self.fence.clone(),
        })
    }

    pub async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Sqlite>, StoreError> {
        Ok(self.pool.acquire().await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

pub(crate) fn json_vec(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Invalid(format!("bad JSON list {s:?}: {e}")))
}

/// Commits, then (if the transaction appended audit events) moves the audit
/// checkpoint forward. The change is committed whatever the checkpoint write
/// does; a failed write is logged, and `audit verify` names it.
pub async fn commit(tx: Tx) -> Result<(), StoreError> {
    let Tx {
        mut inner,
        audit,
        appended,
        pool,
        fence,
    } = tx;
    if let Some(f) = &fence {
        // Refused: dropping `inner` rolls the whole transaction back.
        fence::check(&mut inner, f).await?;
    }
    inner.commit().await?;
    if let (Some(ring), Some(head)) = (audit, appended)
        && let Err(e) = audit::advance_checkpoint(ring, head, pool).await
    {
        tracing::error!(error = %e, "audit checkpoint not updated");
    }
    Ok(())
}
