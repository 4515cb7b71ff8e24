//! Fencing a deposed leader out of the database. Winning the Lease is not
//! enough to write: the new leader first bumps the epoch row
//! (`leader_epoch`, migration 0015) in an audited transaction, and each write
//! transaction of the jobs it runs checks, as its last statement before the
//! commit, that the epoch is still its own. A leader that was paused past its
//! lease, partitioned or slow finds a higher epoch there and its transaction is
//! rolled back: nothing of a job it was in the middle of is committed.
//!
//! Why this holds on both engines with plain SQL: the check is an `UPDATE ...
//! WHERE epoch = mine`, so it takes the row's write lock. On SQLite every write
//! transaction holds the database's one write lock from `BEGIN IMMEDIATE`; on
//! PostgreSQL a bump that is in flight makes the check wait for it and then
//! match no row, and a check that came first makes the bump wait until that
//! transaction committed. Either way each commit is ordered wholly before or
//! wholly after the new leader's epoch: never a write from the old epoch after
//! the new leader read the database.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::json;

use super::{Store, StoreError, audit};

/// The epoch one leader took; carried by every write transaction of its jobs.
#[derive(Debug)]
pub struct Fence {
    pub epoch: i64,
    pub holder: String,
    /// Set once a transaction carrying this fence was refused: the holder has
    /// lost the leadership and must stop running jobs.
    deposed: AtomicBool,
}

impl Fence {
    pub fn deposed(&self) -> bool {
        self.deposed.load(Ordering::SeqCst)
    }
}

/// Who holds the epoch now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Epoch {
    pub epoch: i64,
    pub holder: String,
    pub since: i64,
}

pub async fn current(store: &Store) -> Result<Epoch, StoreError> {
    let (epoch, holder, since): (i64, String, i64) =
        sqlx::query_as("SELECT epoch, holder, since FROM leader_epoch WHERE id = 1")
            .fetch_one(store.pool())
            .await?;
    Ok(Epoch {
        epoch,
        holder,
        since,
    })
}

/// Becomes the leader in the database: a new epoch, audited as `leader.epoch`.
/// Called by a daemon that just won the Lease, before it runs any job.
pub async fn take_over(
    store: &Store,
    holder: &str,
    now: i64,
    actor: &str,
) -> Result<Arc<Fence>, StoreError> {
    let mut tx = store.begin().await?;
    let (previous, previous_holder): (i64, String) =
        sqlx::query_as("SELECT epoch, holder FROM leader_epoch WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
    let epoch = previous + 1;
    sqlx::query("UPDATE leader_epoch SET epoch = $1, holder = $2, since = $3 WHERE id = 1")
        .bind(epoch)
        .bind(holder)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    audit::append(
        &mut tx,
        now,
        actor,
        "leader.epoch",
        holder,
        json!({"epoch": epoch, "previous": previous, "previous_holder": previous_holder}),
    )
    .await?;
    super::commit(tx).await?;
    Ok(Arc::new(Fence {
        epoch,
        holder: holder.to_string(),
        deposed: AtomicBool::new(false),
    }))
}

/// The last statement of a fenced transaction: it may commit only while the
/// epoch is still `fence`'s.
pub(crate) async fn check(conn: &mut super::Conn, fence: &Fence) -> Result<(), StoreError> {
    let done = sqlx::query("UPDATE leader_epoch SET epoch = epoch WHERE id = 1 AND epoch = $1")
        .bind(fence.epoch)
        .execute(&mut *conn)
        .await?;
    if done.rows_affected() == 1 {
        return Ok(());
    }
    let (current, holder): (i64, String) =
        sqlx::query_as("SELECT epoch, holder FROM leader_epoch WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    fence.deposed.store(true, Ordering::SeqCst);
    tracing::error!(
        mine = fence.epoch,
        current,
        holder = %holder,
        "a deposed leader's transaction was refused: another daemon leads now"
    );
    Err(StoreError::Fenced {
        mine: fence.epoch,
        current,
        holder,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::exit::ExitStatus;

    async fn open(path: &std::path::Path) -> Store {
        let mut s = Store::open(&crate::store::Location::sqlite_file(
            &path.join("rotator.db"),
        ))
        .await
        .unwrap();
        let ring =
            audit::Keyring::open(&path.join("audit.key"), &path.join("audit.head"), true, &s)
                .await
                .unwrap();
        s.set_audit(ring);
        s
    }

    async fn write(store: &Store, what: &str) -> Result<(), StoreError> {
        let mut tx = store.begin().await?;
        super::super::meta::set(&mut tx, "test", what).await?;
        super::super::commit(tx).await
    }

    #[tokio::test]
    async fn a_leader_whose_epoch_was_taken_can_no_longer_commit() {
        let d = tempfile::tempdir().unwrap();
        // Two handles on one database, as two daemons on one PostgreSQL.
        let (a, b) = (open(d.path()).await, open(d.path()).await);
        let fa = take_over(&a, "a", 1, "daemon").await.unwrap();
        assert_eq!(fa.epoch, 1);
        let a_jobs = a.fenced(fa.clone());
        write(&a_jobs, "a1").await.unwrap();
        // b wins the Lease and takes a new epoch; a does not know yet.
        let fb = take_over(&b, "b", 2, "daemon").await.unwrap();
        assert_eq!(fb.epoch, 2);
        // a's transaction is open when the epoch moves: refused at commit.
        let mut tx = a_jobs.begin().await.unwrap();
        super::super::meta::set(&mut tx, "test", "a2")
            .await
            .unwrap();
        let e = super::super::commit(tx).await.unwrap_err();
        assert!(
            matches!(e, StoreError::Fenced { mine: 1, current: 2, ref holder } if holder == "b"),
            "{e}"
        );
        assert_eq!(e.exit(), crate::support::exit::Exit::Conflict);
        assert!(e.to_string().contains("fix:"), "{e}");
        assert!(fa.deposed());
        // And every later one.
        assert!(matches!(
            write(&a_jobs, "a3").await,
            Err(StoreError::Fenced { .. })
        ));
        let mut c = a.conn().await.unwrap();
        assert_eq!(
            super::super::meta::get(&mut c, "test")
                .await
                .unwrap()
                .as_deref(),
            Some("a1"),
            "nothing of the deposed leader was committed after the new epoch"
        );
        drop(c);
        write(&b.fenced(fb), "b1").await.unwrap();
        // The epochs are in the audit log, and the chain holds.
        let r = audit::verify(&b).await.unwrap();
        assert!(r.first_break.is_none(), "{:?}", r.first_break);
        let ev = audit::list(&b, None, 100).await.unwrap();
        assert_eq!(ev.iter().filter(|e| e.action == "leader.epoch").count(), 2);
        // Unfenced writes (the CLI, the user API) are not a leader's and go on.
        write(&a, "cli").await.unwrap();
    }
}
