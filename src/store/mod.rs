//! rotator's state through sqlx, on SQLite (the embedded default) or PostgreSQL
//! (`database_url`); what differs between the two is in [`engine`]. Every
//! state change runs in one write transaction together with its audit event,
//! and write transactions run one at a time on either engine.
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::{Any, Transaction};

use crate::support::exit::{Exit, ExitStatus};

pub use engine::{Engine, Location};

/// The connection every query module takes: the engine is chosen at run time.
pub type Conn = sqlx::AnyConnection;

pub mod audit;
pub mod backup;
pub mod bootstrap_tokens;
pub mod changes;
pub mod copy;
pub mod credentials;
pub mod enrollments;
pub mod fence;
pub mod issuances;
pub mod meta;
pub mod schema;
pub mod users;

pub mod engine;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
pub static MIGRATOR_POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

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
        "this process's other writes kept the database busy for {waited:?} (they queue one at a time)\nfix: retry; if it keeps happening, run fewer operations at once (--concurrency) or put the database on a faster disk"
    )]
    Queued { waited: Duration },
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
    #[error(
        "database {database} was migrated by a newer rotator (it has schema migration {version}, this rotator knows up to {known})\nfix: run the rotator version that last used this database, or restore a backup made with this version"
    )]
    Newer {
        database: String,
        version: i64,
        known: i64,
    },
    #[error(
        "cannot connect to the database {url}: {reason}\nfix: check that the PostgreSQL server is running and reachable, and the user, password, database name and sslmode in database_url (ROTATOR_DATABASE_URL, --database-url)"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the database ended this transaction because it conflicted with a concurrent one: {0}\nfix: run the command again"
    )]
    Conflict(String),
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
            let mapped = if let Some(db) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                engine::sqlite::map(db)
            } else if let Some(db) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                engine::postgres::map(db)
            } else {
                None
            };
            if let Some(m) = mapped {
                return m;
            }
        }
        StoreError::Query(e.to_string())
    }
}

impl StoreError {
    /// Whether running the same transaction again may succeed (a lost race).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict(_) | StoreError::Locked { .. } | StoreError::Queued { .. }
        )
    }
}

/// A write transaction. Derefs to the connection; carries the audit key so
/// `audit::append` can MAC, and the head it appended so `commit` can move the
/// audit checkpoint forward once the transaction is durable.
pub struct Tx {
    inner: Transaction<'static, Any>,
    pub(crate) audit: Option<std::sync::Arc<audit::Keyring>>,
    pub(crate) appended: Option<audit::Head>,
    pool: AnyPool,
    commits: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    fence: Option<std::sync::Arc<fence::Fence>>,
    /// SQLite: this process's writer turn, held until the commit.
    turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl std::ops::Deref for Tx {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.inner
    }
}

impl std::ops::DerefMut for Tx {
    fn deref_mut(&mut self) -> &mut Conn {
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
    pool: AnyPool,
    location: Location,
    /// SQLite: lock files that serialize work on one user across processes.
    locks: std::path::PathBuf,
    audit: Option<std::sync::Arc<audit::Keyring>>,
    /// Counts this process's committed write transactions: the authorization
    /// snapshot refreshes on each at once instead of waiting for its next poll.
    commits: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    /// With leader election: the epoch every write transaction must still hold
    /// at its commit (a leader's jobs; see `fence`).
    fence: Option<std::sync::Arc<fence::Fence>>,
    /// Since when [`Store::health`] has found the database unreachable: one log
    /// line when an outage starts and one when it ends, whoever noticed.
    outage: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// SQLite: one writer of this process at a time, queued here in order. Left
    /// to SQLite's busy handler, the writers of one process poll the write lock
    /// with sleeps of up to 100 ms, and the lock stands idle between them.
    writers: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Held while one process works on one user's cluster access; released on drop,
/// and when the process dies (no stale lock survives a crash): a flock on
/// SQLite, a session advisory lock (on a connection of its own) on PostgreSQL.
#[derive(Debug)]
pub struct UserLock {
    _held: Held,
}

enum Held {
    File(#[allow(dead_code)] std::fs::File),
    Session(Conn),
}

impl UserLock {
    /// Whether the lock is still held. A flock lasts as long as this process;
    /// a session advisory lock as long as its connection, which a server
    /// restart or a killed backend ends without telling anyone: a sync that
    /// finds it gone may have interleaved with another process's and must run
    /// again under a new lock.
    pub async fn still_held(&mut self) -> bool {
        match &mut self._held {
            Held::File(_) => true,
            Held::Session(conn) => {
                tokio::time::timeout(HEALTH_TIMEOUT, sqlx::query("SELECT 1").execute(&mut *conn))
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
        }
    }
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Held::File(_) => "Held::File",
            Held::Session(_) => "Held::Session",
        })
    }
}

/// How long a command waits for another process working on the same user.
pub const USER_LOCK_WAIT: Duration = Duration::from_secs(120);

/// How long [`Store::health`] waits for an answer (the pool itself would wait
/// its acquire timeout, longer than a readiness probe's).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

impl Store {
    /// Opens (creating if needed, on SQLite) and migrates the database.
    pub async fn open(location: &Location) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let shown = location.redacted();
        let (pool, migrator) = match location {
            Location::Sqlite(path) => (engine::sqlite::connect(path).await?, &MIGRATOR),
            Location::Postgres(url) => (
                engine::postgres::connect(url, &shown).await?,
                &MIGRATOR_POSTGRES,
            ),
        };
        migrate(migrator, &pool, &shown).await?;
        if location.engine() == Engine::Sqlite {
            engine::sqlite::check(&pool).await?;
        }
        let locks = match location {
            Location::Sqlite(path) => engine::sqlite::locks_dir(path),
            Location::Postgres(_) => std::path::PathBuf::new(),
        };
        Ok(Self {
            pool,
            location: location.clone(),
            locks,
            audit: None,
            commits: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            fence: None,
            outage: Default::default(),
            writers: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// Whether the database answers now (a pooled connection runs `SELECT 1`
    /// within [`HEALTH_TIMEOUT`]). The pool reconnects by itself once the
    /// server is back; meanwhile it only says it timed out, so on PostgreSQL a
    /// failure is probed with a connection of its own, whose error says why
    /// (refused, shutting down, starting up, authentication), URL redacted.
    /// Logs once when an outage starts and once when it ends.
    pub async fn health(&self) -> Result<(), StoreError> {
        let r = self.probe().await;
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        match (&r, *outage) {
            (Err(e), None) => {
                *outage = Some(std::time::Instant::now());
                tracing::error!(database = %self.location, error = %e, "database unreachable: jobs and requests that need it fail until it is back; retrying with backoff");
            }
            (Ok(()), Some(since)) => {
                *outage = None;
                tracing::info!(database = %self.location, down_ms = since.elapsed().as_millis() as u64, "database reachable again");
            }
            _ => {}
        }
        r
    }

    async fn probe(&self) -> Result<(), StoreError> {
        let pooled = || async {
            match tokio::time::timeout(HEALTH_TIMEOUT, async {
                let mut c = self.pool.acquire().await?;
                sqlx::query("SELECT 1").execute(&mut *c).await?;
                Ok::<_, sqlx::Error>(())
            })
            .await
            {
                Ok(r) => r.map_err(StoreError::from),
                Err(_) => Err(StoreError::Query(format!(
                    "no connection answered within {HEALTH_TIMEOUT:?}"
                ))),
            }
        };
        let err = match pooled().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let Location::Postgres(url) = &self.location else {
            return Err(err);
        };
        let shown = self.location.redacted();
        match tokio::time::timeout(
            HEALTH_TIMEOUT,
            <sqlx::AnyConnection as sqlx::Connection>::connect(url),
        )
        .await
        {
            // The server answers: the pool's connection was one it had closed;
            // the pool replaces it on the next try.
            Ok(Ok(c)) => {
                let _ = sqlx::Connection::close(c).await;
                pooled().await
            }
            Ok(Err(e)) => Err(engine::postgres::unreachable(&shown, e)),
            Err(_) => Err(StoreError::Unreachable {
                url: shown,
                reason: format!("no answer within {HEALTH_TIMEOUT:?}"),
            }),
        }
    }

    /// Whether several daemons can share this database. A SQLite file is one
    /// machine's; PostgreSQL is shared.
    pub fn shared(&self) -> bool {
        self.engine() == Engine::Postgres
    }

    /// The same store whose write transactions commit only while `fence`'s
    /// epoch is the leader's: what a leader's jobs write through.
    pub fn fenced(&self, fence: std::sync::Arc<fence::Fence>) -> Store {
        Store {
            fence: Some(fence),
            ..self.clone()
        }
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn engine(&self) -> Engine {
        self.location.engine()
    }

    /// Attaches the audit key and checkpoint (`App::open` does, before any write).
    pub fn set_audit(&mut self, keyring: std::sync::Arc<audit::Keyring>) {
        self.audit = Some(keyring);
    }

    /// Changes each time a write transaction of this process commits.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.commits.subscribe()
    }

    pub fn audit_keyring(&self) -> Option<&std::sync::Arc<audit::Keyring>> {
        self.audit.as_ref()
    }

    /// Serializes, across every process on this database, the work that makes
    /// the cluster follow the database for `user`: whoever holds it reads the
    /// database after taking it, so nobody writes what they read earlier.
    pub async fn lock_user(&self, user: &str) -> Result<UserLock, StoreError> {
        let held = match &self.location {
            Location::Sqlite(_) => Held::File(engine::sqlite::lock_user(&self.locks, user).await?),
            Location::Postgres(url) => Held::Session(
                engine::postgres::lock_user(url, &self.location.redacted(), user).await?,
            ),
        };
        Ok(UserLock { _held: held })
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// A write transaction. It waits for any other writer (SQLite's write lock,
    /// PostgreSQL's writer advisory lock) up to the busy timeout, so two writers
    /// queue instead of failing halfway through.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let mut turn = None;
        let inner = match self.engine() {
            Engine::Sqlite => {
                // Taken before a connection, so queued writers hold none; bounded
                // by the busy timeout as SQLite's own wait is.
                turn = Some(
                    tokio::time::timeout(BUSY_TIMEOUT, self.writers.clone().lock_owned())
                        .await
                        .map_err(|_| StoreError::Queued {
                            waited: BUSY_TIMEOUT,
                        })?,
                );
                self.pool.begin_with(engine::sqlite::BEGIN).await?
            }
            Engine::Postgres => {
                // READ COMMITTED whatever the server's default: each statement's
                // snapshot must start after the writer lock is granted.
                let mut tx = self.pool.begin_with(engine::postgres::BEGIN).await?;
                sqlx::query(engine::postgres::LOCK_WRITERS)
                    .execute(&mut *tx)
                    .await?;
                tx
            }
        };
        Ok(Tx {
            inner,
            audit: self.audit.clone(),
            appended: None,
            pool: self.pool.clone(),
            commits: self.commits.clone(),
            fence: self.fence.clone(),
            turn,
        })
    }

    pub async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Any>, StoreError> {
        Ok(self.pool.acquire().await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Applies the engine's migrations; a database that has one this rotator does
/// not know was written by a newer rotator and is refused.
async fn migrate(
    migrator: &sqlx::migrate::Migrator,
    pool: &AnyPool,
    shown: &str,
) -> Result<(), StoreError> {
    let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    migrator.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::VersionMissing(version) => StoreError::Newer {
            database: shown.to_string(),
            version,
            known,
        },
        sqlx::migrate::MigrateError::Execute(inner) => match StoreError::from(inner) {
            StoreError::Query(m) => StoreError::Migrate(m),
            other => other,
        },
        other => StoreError::Migrate(other.to_string()),
    })
}

pub(crate) fn json_vec(s: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Invalid(format!("bad JSON list {s:?}: {e}")))
}

/// Commits, then (if the transaction appended audit events) moves the audit
/// checkpoint forward ([`audit::cover`]: in a task of its own, so a caller
/// dropped after the COMMIT still gets its head covered). The change is
/// committed whatever the checkpoint write does: a failed write is logged,
/// counted in [`audit::Keyring::checkpoint_health`] (the daemon's `/metrics`
/// and `/readyz`), retried by the next commit, and named by `audit verify`.
pub async fn commit(tx: Tx) -> Result<(), StoreError> {
    let Tx {
        mut inner,
        audit,
        appended,
        pool,
        commits,
        fence,
        turn,
    } = tx;
    if let Some(f) = &fence {
        // Refused: dropping `inner` rolls the whole transaction back.
        fence::check(&mut inner, f).await?;
    }
    inner.commit().await?;
    // Published while the turn is held (SQLite): in commit order.
    let published = match (audit, appended) {
        (Some(ring), Some(head)) => {
            let ticket = ring.publish(head, turn.is_some());
            Some((ring, ticket))
        }
        _ => None,
    };
    // The next writer may start while this one moves the checkpoint.
    drop(turn);
    commits.send_modify(|n| *n += 1);
    if let Some((ring, ticket)) = published {
        audit::cover(ring, ticket, pool).await;
    }
    Ok(())
}
