//! The issuance saga's journal.
use super::Conn;

use super::StoreError;
use crate::policy::UserSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Planned,
    CsrSubmitted,
    Approved,
    /// Never written on its own: nothing external happens between a signer
    /// handing back the certificate and the transaction that stores it (and
    /// refuses an attempt a revoke ended meanwhile), so that one transaction
    /// moves the journal past `issued` to `stored`; a commit of its own would
    /// only add one to every issuance. Kept for the rows older rotators wrote.
    Issued,
    Stored,
    Delivered,
    Failed,
    Abandoned,
}

impl Step {
    pub fn as_str(&self) -> &'static str {
        match self {
            Step::Planned => "planned",
            Step::CsrSubmitted => "csr_submitted",
            Step::Approved => "approved",
            Step::Issued => "issued",
            Step::Stored => "stored",
            Step::Delivered => "delivered",
            Step::Failed => "failed",
            Step::Abandoned => "abandoned",
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Issuance {
    pub id: String,
    pub user_name: String,
    pub generation: i64,
    pub kind: String,
    pub spec: String,
    pub step: String,
    pub signer: String,
    pub csr_name: Option<String>,
    pub error: Option<String>,
    pub owner: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Issuance {
    pub fn user_spec(&self) -> Result<UserSpec, StoreError> {
        serde_json::from_str(&self.spec)
            .map_err(|e| StoreError::Invalid(format!("issuance {}: {e}", self.id)))
    }
}

/// The generation the user's next attempt gets. Generations are never reused,
/// even for abandoned attempts.
pub async fn next_generation(conn: &mut Conn, user: &str) -> Result<i64, StoreError> {
    let (generation,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(MAX(generation), 0) + 1 FROM issuances WHERE user_name = $1",
    )
    .bind(user)
    .fetch_one(&mut *conn)
    .await?;
    Ok(generation)
}

/// Records a new attempt with the next generation for the user.
pub async fn plan(
    conn: &mut Conn,
    id: &str,
    spec: &UserSpec,
    kind: &str,
    signer: &str,
    owner: &str,
    now: i64,
) -> Result<i64, StoreError> {
    let generation = next_generation(conn, &spec.name).await?;
    sqlx::query(
        "INSERT INTO issuances (id, user_name, generation, kind, spec, step, signer, owner, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, 'planned', $6, $7, $8, $9)",
    )
    .bind(id)
    .bind(&spec.name)
    .bind(generation)
    .bind(kind)
    .bind(serde_json::to_string(spec).expect("json"))
    .bind(signer)
    .bind(owner)
    .bind(now)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(generation)
}

/// Moves an attempt to `step` unless it already ended (another process may have
/// abandoned it as stale). Returns false when it had ended: the caller must stop.
pub async fn set_step(
    conn: &mut Conn,
    id: &str,
    step: Step,
    error: Option<&str>,
    now: i64,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE issuances SET step = $1, error = COALESCE($2, error), updated_at = $3
         WHERE id = $4 AND step NOT IN ('delivered', 'failed', 'abandoned')",
    )
    .bind(step.as_str())
    .bind(error)
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Moves a stored attempt from a process that is gone to this one. False when
/// it is no longer at `stored` or another process took it first.
pub async fn take_over(
    conn: &mut Conn,
    id: &str,
    from: &str,
    to: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE issuances SET owner = $1, updated_at = $2 WHERE id = $3 AND owner = $4 AND step = 'stored'",
    )
    .bind(to)
    .bind(now)
    .bind(id)
    .bind(from)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Ends every unfinished attempt of `user` (a revoke or remove-user wins over
/// them): each later step of theirs finds its attempt ended and stops, and its
/// credential can never become current. Returns the attempts ended.
pub async fn cancel_open(
    conn: &mut Conn,
    user: &str,
    reason: &str,
    now: i64,
) -> Result<Vec<Issuance>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE issuances SET step = 'failed', error = $1, updated_at = $2
         WHERE user_name = $3 AND step NOT IN ('delivered', 'failed', 'abandoned') RETURNING *",
    )
    .bind(reason)
    .bind(now)
    .bind(user)
    .fetch_all(conn)
    .await?)
}

/// Ends one unfinished attempt (its credential was revoked by serial).
pub async fn cancel(conn: &mut Conn, id: &str, reason: &str, now: i64) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE issuances SET step = 'failed', error = $1, updated_at = $2
         WHERE id = $3 AND step NOT IN ('delivered', 'failed', 'abandoned')",
    )
    .bind(reason)
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Whether any attempt of `user` ended without being delivered (one that may
/// have left a CSR object behind).
pub async fn any_ended_undelivered(conn: &mut Conn, user: &str) -> Result<bool, StoreError> {
    // An integer, not a boolean: SQLite has none.
    let (any,): (i64,) = sqlx::query_as(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM issuances WHERE user_name = $1 AND step IN ('failed', 'abandoned')) THEN 1 ELSE 0 END",
    )
    .bind(user)
    .fetch_one(conn)
    .await?;
    Ok(any == 1)
}

pub async fn get(conn: &mut Conn, id: &str) -> Result<Option<Issuance>, StoreError> {
    Ok(sqlx::query_as("SELECT * FROM issuances WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

pub async fn set_csr_name(
    conn: &mut Conn,
    id: &str,
    csr_name: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE issuances SET csr_name = $1, updated_at = $2 WHERE id = $3")
        .bind(csr_name)
        .bind(now)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Attempts that have not reached a terminal step, oldest first.
pub async fn open_for_user(
    conn: &mut Conn,
    user: Option<&str>,
) -> Result<Vec<Issuance>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT * FROM issuances WHERE step NOT IN ('delivered', 'failed', 'abandoned') AND ($1 IS NULL OR user_name = $2) ORDER BY created_at, id",
    )
    .bind(user)
    .bind(user)
    .fetch_all(conn)
    .await?)
}

pub async fn for_user(conn: &mut Conn, user: &str) -> Result<Vec<Issuance>, StoreError> {
    Ok(
        sqlx::query_as("SELECT * FROM issuances WHERE user_name = $1 ORDER BY generation")
            .bind(user)
            .fetch_all(conn)
            .await?,
    )
}
