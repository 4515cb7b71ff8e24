//! PostgreSQL: many rotator processes, possibly on many machines, on one
//! database. The invariants SQLite's single writer gives for free are kept the
//! same way: every write transaction first takes one transaction-level advisory
//! lock ([`WRITER_LOCK`]), so writers run one at a time, each seeing everything
//! committed before it (READ COMMITTED takes a new snapshot per statement, after
//! the lock). Every state change appends to the single audit chain in the same
//! transaction, so the chain head serializes writers anyway; the lock makes
//! that explicit and also covers generations (max + 1) and the one current
//! credential per user. Reads take no lock.
//!
//! The per-user lock is a session-level advisory lock held on a connection of
//! its own: released when the lock is dropped (the connection closes) or when
//! the process dies (the server ends its session).
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool};
use sqlx::{Connection, Executor};

use crate::store::{BUSY_TIMEOUT, StoreError, USER_LOCK_WAIT};

/// The advisory lock key every write transaction takes ("rotator" in ASCII).
pub(crate) const WRITER_LOCK: i64 = 0x0072_6f74_6174_6f72;

/// A write transaction: READ COMMITTED, so that every statement after the
/// writer lock sees what the previous writer committed (a REPEATABLE READ or
/// SERIALIZABLE snapshot would be taken before the lock is granted).
pub(crate) const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// Taken first in every write transaction.
pub(crate) const LOCK_WRITERS: &str = "SELECT pg_advisory_xact_lock(32210692986924914)";
const _: () = assert!(WRITER_LOCK == 32210692986924914);

pub(crate) async fn connect(url: &str, shown: &str) -> Result<AnyPool, StoreError> {
    // One plain connection first: the pool would only say it timed out, this
    // says why (refused, no such database, authentication failed).
    AnyConnection::connect(url)
        .await
        .map_err(|e| unreachable(shown, e))?
        .close()
        .await
        .map_err(|e| unreachable(shown, e))?;
    let busy_ms = BUSY_TIMEOUT.as_millis();
    AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                // A writer waits for the writer lock (or a row lock) as long as a
                // SQLite writer waits for a busy database, then fails with
                // "locked" (55P03), not forever.
                conn.execute(sqlx::AssertSqlSafe(format!(
                    "SET lock_timeout = {busy_ms}; SET application_name = 'rotator'"
                )))
                .await?;
                Ok(())
            })
        })
        .connect(url)
        .await
        .map_err(|e| unreachable(shown, e))
}

/// A connection or authentication failure, naming the URL without its password.
pub(crate) fn unreachable(shown: &str, e: sqlx::Error) -> StoreError {
    match StoreError::from(e) {
        StoreError::Query(reason) => StoreError::Unreachable {
            url: shown.to_string(),
            reason,
        },
        other => other,
    }
}

/// SQLSTATE codes with a meaning of their own.
pub(crate) fn map(db: &sqlx::postgres::PgDatabaseError) -> Option<StoreError> {
    match db.code() {
        // serialization_failure, deadlock_detected: the transaction lost a race
        // and may simply run again.
        "40001" | "40P01" => Some(StoreError::Conflict(db.message().to_string())),
        // lock_not_available: lock_timeout passed.
        "55P03" => Some(StoreError::Locked {
            waited: BUSY_TIMEOUT,
        }),
        _ => None,
    }
}

/// The advisory lock key of one user's cluster work (distinct from
/// [`WRITER_LOCK`] but for a 2^-64 chance).
fn user_key(user: &str) -> i64 {
    let h = crate::pki::sha256(format!("rotator user lock\0{user}").as_bytes());
    i64::from_be_bytes(h[..8].try_into().expect("8 bytes"))
}

/// Takes the user's session lock on a new connection and returns it: the lock
/// lives as long as the connection.
pub(crate) async fn lock_user(
    url: &str,
    shown: &str,
    user: &str,
) -> Result<AnyConnection, StoreError> {
    let mut conn = AnyConnection::connect(url)
        .await
        .map_err(|e| unreachable(shown, e))?;
    let key = user_key(user);
    let deadline = std::time::Instant::now() + USER_LOCK_WAIT;
    loop {
        let (got,): (i32,) =
            sqlx::query_as("SELECT CASE WHEN pg_try_advisory_lock($1) THEN 1 ELSE 0 END")
                .bind(key)
                .fetch_one(&mut conn)
                .await?;
        if got == 1 {
            return Ok(conn);
        }
        if std::time::Instant::now() >= deadline {
            let _ = conn.close().await;
            return Err(StoreError::UserBusy {
                user: user.to_string(),
                waited: USER_LOCK_WAIT,
                lock: format!("advisory lock {key} on {shown}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
