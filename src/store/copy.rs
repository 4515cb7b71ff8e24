//! `rotator database copy --to URL`: everything in the current database (users,
//! credentials, issuance journal, enrollment and bootstrap tokens, delivery
//! Secrets, meta with the instance id, the audit chain, the leader epoch) into
//! an empty one, in one write transaction on the target read from one snapshot
//! of the source, then checked: the same row count in every table, and the
//! audit chain verified on the target against the checkpoint read before the
//! copy (same audit key: the key and checkpoint live outside the database).
//!
//! Rows are copied value by value as integers, text or NULL (the only types
//! rotator's schema uses on either engine), each bound as its column is
//! declared in the target (see [`super::schema`]), so the copy works between
//! engines whatever columns a migration adds.
use sqlx::Row;

use super::schema::{self, Kind};
use super::{Store, StoreError, audit};
use crate::support::exit::{Exit, ExitStatus};

/// Every table, in the order a copy fills them (what a row references first).
/// `the_copy_covers_every_table` fails when a migration adds one not listed.
pub const TABLES: &[&str] = &[
    "meta",
    "users",
    "issuances",
    "credentials",
    "enrollment_tokens",
    "bootstrap_tokens",
    "delivery_secrets",
    "audit_events",
    "leader_epoch",
    "change_counter",
];

/// Tables the target's own triggers keep (migration 0013's change counter
/// stamps every copied credential and user row as it is inserted): not copied,
/// so the counter matches the stamps in the target.
pub const KEPT: &[&str] = &["change_counter"];

/// Tables a migration fills by itself; replaced, not refused, on the target.
const SEEDED: &[&str] = &["leader_epoch"];

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error(
        "the target database {target} is not empty: table {table} has {rows} rows\nfix: copy into a new, empty database (for PostgreSQL: `createdb NAME`); rotator never merges two databases"
    )]
    NotEmpty {
        target: String,
        table: &'static str,
        rows: i64,
    },
    #[error(
        "the target {target} is the database rotator is using now\nfix: name another database with --to"
    )]
    SameDatabase { target: String },
    #[error(
        "the copy in {target} does not match: table {table} has {copied} rows there but {source_rows} here; the target transaction was rolled back\nfix: run the copy again into an empty database; report it if it repeats"
    )]
    Mismatch {
        target: String,
        table: &'static str,
        copied: i64,
        source_rows: i64,
    },
    #[error(
        "the audit chain in the copy {target} does not verify: event {seq} ({kind}): {reason}\nfix: run `rotator audit verify` on the current database; a copy of a damaged log keeps the damage"
    )]
    Audit {
        target: String,
        seq: i64,
        kind: &'static str,
        reason: String,
    },
    #[error(
        "table {table} has other columns in {target} ({target_columns}) than here ({source_columns}); nothing was copied\nfix: open both databases with the same rotator version (it migrates each), then copy again"
    )]
    Schema {
        target: String,
        table: &'static str,
        source_columns: String,
        target_columns: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExitStatus for CopyError {
    fn exit(&self) -> Exit {
        match self {
            CopyError::NotEmpty { .. } | CopyError::SameDatabase { .. } => Exit::Conflict,
            CopyError::Mismatch { .. } | CopyError::Schema { .. } => Exit::Database,
            CopyError::Audit { .. } => Exit::AuditBroken,
            CopyError::Store(e) => e.exit(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub target: String,
    /// Rows per table, in copy order.
    pub tables: Vec<(String, i64)>,
    pub audit_events: i64,
    pub audit_head: String,
    /// The target held this copy already (a rerun after a copy killed past its
    /// commit): nothing was written.
    pub already: bool,
}

async fn count(conn: &mut super::Conn, table: &str) -> Result<i64, StoreError> {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    let (n,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await?;
    Ok(n)
}

/// One stored value, as its column is declared.
enum Value {
    Int(Option<i64>),
    Text(Option<String>),
}

fn value<R>(row: &R, table: &str, i: usize, column: &schema::Column) -> Result<Value, StoreError>
where
    R: Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let read = match column.kind {
        Kind::Integer => row.try_get::<Option<i64>, _>(i).map(Value::Int),
        Kind::Text => row.try_get::<Option<String>, _>(i).map(Value::Text),
    };
    read.map_err(|e| {
        StoreError::Invalid(format!(
            "{table}.{} (declared {}) holds a value of another type: {e}",
            column.name, column.declared
        ))
    })
}

/// The target's columns of `table`, checked against the source's: a column
/// only one side has would be lost or left empty.
async fn matching_columns(
    src: &mut super::Conn,
    source: &Store,
    tgt: &mut super::Conn,
    target: &Store,
    table: &'static str,
    shown: &str,
) -> Result<Vec<schema::Column>, CopyError> {
    let theirs = schema::columns(tgt, target.engine(), table).await?;
    let ours = schema::columns(src, source.engine(), table).await?;
    let names = |c: &[schema::Column]| {
        let mut n: Vec<&str> = c.iter().map(|c| c.name.as_str()).collect();
        n.sort_unstable();
        n.join(", ")
    };
    let same_kind =
        |a: &schema::Column| theirs.iter().any(|t| t.name == a.name && t.kind == a.kind);
    if ours.len() != theirs.len() || !ours.iter().all(same_kind) {
        return Err(CopyError::Schema {
            target: shown.to_string(),
            table,
            source_columns: names(&ours),
            target_columns: names(&theirs),
        });
    }
    Ok(theirs)
}

/// How a copy's read transaction begins on the source, so that every table is
/// read from one snapshot while other processes write. SQLite (WAL): a
/// deferred transaction's snapshot is taken at its first read and kept.
/// PostgreSQL: READ COMMITTED (the default) takes a new snapshot per
/// statement, so a user added between two tables' reads would be copied
/// without its credential; REPEATABLE READ keeps the first statement's
/// snapshot for the whole transaction (READ ONLY: it never takes a row lock or
/// the writer lock, and cannot fail with a serialization error).
pub fn snapshot(engine: super::Engine) -> &'static str {
    match engine {
        super::Engine::Sqlite => "BEGIN DEFERRED",
        super::Engine::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    }
}

/// Copies `source` into `target` (an empty rotator database, migrated), which
/// is shown to the user as `shown`.
pub async fn copy(source: &Store, target: &Store, shown: &str) -> Result<CopyReport, CopyError> {
    let mut tconn = target.conn().await?;
    for &t in TABLES
        .iter()
        .filter(|t| !SEEDED.contains(t) && !KEPT.contains(t))
    {
        let rows = count(&mut tconn, t).await?;
        if rows > 0 {
            drop(tconn);
            if let Some(counts) = already_copied(source, target).await? {
                // A rerun after a copy killed past its commit: check it, as the copy would have.
                let checkpoint = audit::checkpoint_now(source).await?;
                return verified(source, target, shown, checkpoint, counts, true).await;
            }
            return Err(CopyError::NotEmpty {
                target: shown.to_string(),
                table: t,
                rows,
            });
        }
    }
    drop(tconn);
    // Before the snapshot: everything the checkpoint vouches for is in the copy.
    let checkpoint = audit::checkpoint_now(source).await?;
    // One read transaction: the copy is a single point in the source's history.
    let mut src = source
        .pool()
        .begin_with(snapshot(source.engine()))
        .await
        .map_err(StoreError::from)?;
    let mut tx = target.begin().await?;
    let mut counts = Vec::new();
    for &t in TABLES {
        if KEPT.contains(&t) {
            continue;
        }
        if SEEDED.contains(&t) {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {t}")))
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        let columns = matching_columns(&mut src, source, &mut tx, target, t, shown).await?;
        let names: Vec<String> = columns.iter().map(|c| format!("\"{}\"", c.name)).collect();
        let names = names.join(", ");
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {names} FROM {t}")))
            .fetch_all(&mut *src)
            .await
            .map_err(StoreError::from)?;
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let insert = format!("INSERT INTO {t} ({names}) VALUES ({})", marks.join(", "));
        for row in &rows {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(insert.clone()));
            for (i, c) in columns.iter().enumerate() {
                q = match value(row, t, i, c)? {
                    Value::Int(v) => q.bind(v),
                    Value::Text(v) => q.bind(v),
                };
            }
            q.execute(&mut *tx).await.map_err(StoreError::from)?;
        }
        let source_rows = rows.len() as i64;
        let copied = count(&mut tx, t).await?;
        if copied != source_rows {
            return Err(CopyError::Mismatch {
                target: shown.to_string(),
                table: t,
                copied,
                source_rows,
            });
        }
        counts.push((t.to_string(), copied));
    }
    drop(src);
    super::commit(tx).await?;
    verified(source, target, shown, checkpoint, counts, false).await
}

/// The copy's report, once its audit chain verified on the target on its own:
/// read back from it, under the source's key and against the checkpoint read
/// before the copy.
async fn verified(
    source: &Store,
    target: &Store,
    shown: &str,
    checkpoint: audit::CheckpointState,
    tables: Vec<(String, i64)>,
    already: bool,
) -> Result<CopyReport, CopyError> {
    let mut check = target.clone();
    if let Some(ring) = source.audit_keyring() {
        check.set_audit(ring.clone());
    }
    let r = audit::verify_snapshot(&check, checkpoint).await?;
    if let Some(b) = r.first_break {
        return Err(CopyError::Audit {
            target: shown.to_string(),
            seq: b.seq,
            kind: b.kind.name(),
            reason: b.reason,
        });
    }
    Ok(CopyReport {
        target: shown.to_string(),
        tables,
        audit_events: r.events,
        audit_head: r.head,
        already,
    })
}

/// The target's row counts, if it already holds the source as it is now (a
/// copy killed after its commit, before it reported): the same instance id,
/// the same last audit event (every change is audited in its own
/// transaction, so nothing changed since) and the same row count in every
/// table. Read from one snapshot of the source.
async fn already_copied(
    source: &Store,
    target: &Store,
) -> Result<Option<Vec<(String, i64)>>, StoreError> {
    let mut src = source.pool().begin_with(snapshot(source.engine())).await?;
    let mut tgt = target.conn().await?;
    let id = super::meta::get(&mut src, super::meta::INSTANCE_ID).await?;
    if id.is_none() || id != super::meta::get(&mut tgt, super::meta::INSTANCE_ID).await? {
        return Ok(None);
    }
    let last = "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1";
    let ours: Option<(i64, String)> = sqlx::query_as(last).fetch_optional(&mut *src).await?;
    let theirs: Option<(i64, String)> = sqlx::query_as(last).fetch_optional(&mut *tgt).await?;
    if ours != theirs {
        return Ok(None);
    }
    let mut counts = Vec::new();
    for &t in TABLES.iter().filter(|t| !KEPT.contains(t)) {
        let n = count(&mut tgt, t).await?;
        if n != count(&mut src, t).await? {
            return Ok(None);
        }
        counts.push((t.to_string(), n));
    }
    Ok(Some(counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_copy_covers_every_table() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&crate::store::Location::sqlite_file(
            &d.path().join("rotator.db"),
        ))
        .await
        .unwrap();
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' AND name != '_sqlx_migrations' ORDER BY name",
        )
        .fetch_all(s.pool())
        .await
        .unwrap();
        let mut listed: Vec<&str> = TABLES.to_vec();
        listed.sort();
        let names: Vec<String> = names.into_iter().map(|n| n.0).collect();
        assert_eq!(
            names, listed,
            "a migration added or dropped a table: list it in TABLES (after what it references)"
        );
    }
}
