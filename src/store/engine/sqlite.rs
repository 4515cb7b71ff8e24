//! SQLite: one file, WAL, one writer at a time (`BEGIN IMMEDIATE` waits up to the
//! busy timeout), a flock per user under `DATA_DIR/locks`.
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::{Connection, Executor};

use crate::store::{BUSY_TIMEOUT, StoreError, USER_LOCK_WAIT};

/// Takes SQLite's write lock at once, so two writers queue on the busy timeout
/// instead of failing halfway through.
pub(crate) const BEGIN: &str = "BEGIN IMMEDIATE";

/// A `sqlite://` URL for the Any driver: the path made absolute (a relative one
/// would read as a host) and the characters the parser decodes escaped.
fn url(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut s = String::from("sqlite://");
    for c in abs.display().to_string().chars() {
        match c {
            '%' => s.push_str("%25"),
            '?' => s.push_str("%3F"),
            '#' => s.push_str("%23"),
            ' ' => s.push_str("%20"),
            c => s.push(c),
        }
    }
    // rwc: create the file if it is missing.
    s.push_str("?mode=rwc");
    s
}

pub(crate) async fn connect(path: &Path) -> Result<AnyPool, StoreError> {
    let open_err = |reason: String| StoreError::Open {
        path: path.display().to_string(),
        reason,
        fix: "check that the data directory exists and rotator may write to it",
    };
    let busy_ms = BUSY_TIMEOUT.as_millis();
    // Readers run beside the one writer (WAL): enough connections that the
    // reads of 16 onboardings in flight do not queue behind each other.
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        // A connection to a local file does not go stale, and the ping each
        // acquire would send crosses to the driver's thread and back: under the
        // writer turn that was a sixth of every write transaction's time.
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                // The driver's defaults already turn foreign keys on and wait 5 s on
                // a busy database; say so explicitly, with FULL sync for WAL.
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = {busy_ms}; PRAGMA synchronous = FULL"
                )))
                .await?;
                Ok(())
            })
        })
        .connect(&url(path))
        .await
        .map_err(|e| match StoreError::from(e) {
            StoreError::Query(reason) => open_err(reason),
            other => other,
        })?;
    // WAL is a property of the file: set once, when it is not WAL yet (setting
    // it takes a lock the busy timeout cannot wait for).
    let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await?;
    if !mode.eq_ignore_ascii_case("wal") {
        let mut conn = pool.acquire().await?;
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&mut *conn)
            .await?;
        conn.ping().await?;
    }
    Ok(pool)
}

/// A corrupt file can still open and migrate lazily; ask SQLite outright.
pub(crate) async fn check(pool: &AnyPool) -> Result<(), StoreError> {
    let (check,): (String,) = sqlx::query_as("PRAGMA quick_check").fetch_one(pool).await?;
    if check != "ok" {
        return Err(StoreError::Corrupt(check));
    }
    Ok(())
}

/// SQLite primary result codes: 5 BUSY, 6 LOCKED, 11 CORRUPT, 26 NOTADB.
pub(crate) fn map(db: &sqlx::sqlite::SqliteError) -> Option<StoreError> {
    use sqlx::error::DatabaseError;
    let code = db.code().unwrap_or_default();
    match code.parse::<i32>().map(|c| c & 0xff) {
        Ok(5) | Ok(6) => Some(StoreError::Locked {
            waited: BUSY_TIMEOUT,
        }),
        Ok(11) | Ok(26) => Some(StoreError::Corrupt(db.message().to_string())),
        _ => None,
    }
}

/// The lock directory beside the database file.
pub(crate) fn locks_dir(db: &Path) -> PathBuf {
    match db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join("locks"),
        _ => PathBuf::from("locks"),
    }
}

/// An exclusive flock on `LOCKS/<hash of user>`: released on drop, and by the
/// kernel when the process dies (no stale lock survives a crash).
pub(crate) async fn lock_user(locks: &Path, user: &str) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |e: std::io::Error| StoreError::Open {
        path: locks.display().to_string(),
        reason: e.to_string(),
        fix: "make the data directory writable by rotator",
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(locks)
        .map_err(io)?;
    let name = crate::pki::hex(&crate::pki::sha256(user.as_bytes())[..16]);
    let path = locks.join(&name);
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
            Ok(()) => return Ok(file),
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
