//! One-time enrollment tokens (`add-user --enroll`), stored as hashes.
use super::Conn;

use super::StoreError;

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct EnrollmentToken {
    pub id: String,
    pub user_name: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub expires_at: i64,
    pub state: String,
    pub claimed_spki: Option<String>,
    pub credential_id: Option<String>,
    pub created_by: String,
    pub created_at: i64,
    pub state_at: i64,
    /// When the token reached its holder (printed, or its file written); NULL
    /// while it may have been lost (a run killed after the token committed).
    pub delivered_at: Option<i64>,
}

pub async fn insert(
    conn: &mut Conn,
    id: &str,
    user: &str,
    secret_hash: &str,
    expires_at: i64,
    created_by: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO enrollment_tokens (id, user_name, secret_hash, expires_at, state, created_by, created_at, state_at, user_incarnation)
         VALUES ($1, $2, $3, $4, 'active', $5, $6, $7, (SELECT incarnation FROM users WHERE name = $2))",
    )
    .bind(id)
    .bind(user)
    .bind(secret_hash)
    .bind(expires_at)
    .bind(created_by)
    .bind(now)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(conn: &mut Conn, id: &str) -> Result<Option<EnrollmentToken>, StoreError> {
    Ok(
        sqlx::query_as("SELECT * FROM enrollment_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

/// Revokes the user's tokens that were never used; returns their ids.
pub async fn revoke_unused(
    conn: &mut Conn,
    user: &str,
    now: i64,
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "UPDATE enrollment_tokens SET state = 'revoked', state_at = $1
         WHERE user_name = $2 AND state IN ('active', 'claimed') RETURNING id",
    )
    .bind(now)
    .bind(user)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Claims the token for one public key. True when this call (or an earlier one
/// with the same key) holds it; false when it was used, revoked or claimed by
/// another key meanwhile, or when it was made for an earlier record of the same
/// user name (removed and added again).
pub async fn claim(
    conn: &mut Conn,
    id: &str,
    spki_sha256: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE enrollment_tokens SET state = 'claimed', claimed_spki = $1, state_at = $2
         WHERE id = $3 AND expires_at > $4 AND (state = 'active' OR (state = 'claimed' AND claimed_spki = $5))
           AND user_incarnation IS NOT DISTINCT FROM (SELECT u.incarnation FROM users u
                                                          WHERE u.name = enrollment_tokens.user_name AND u.state = 'active')",
    )
    .bind(spki_sha256)
    .bind(now)
    .bind(id)
    .bind(now)
    .bind(spki_sha256)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Records that the token reached its holder.
pub async fn mark_delivered(conn: &mut Conn, id: &str, now: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE enrollment_tokens SET delivered_at = $1 WHERE id = $2")
        .bind(now)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// Burns a claimed token once its credential is current.
pub async fn mark_used(
    conn: &mut Conn,
    id: &str,
    credential_id: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE enrollment_tokens SET state = 'used', credential_id = $1, state_at = $2 WHERE id = $3",
    )
    .bind(credential_id)
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Unused tokens past their expiry: the expire job marks them.
pub async fn expire_due(conn: &mut Conn, now: i64) -> Result<Vec<(String, String)>, StoreError> {
    Ok(sqlx::query_as(
        "UPDATE enrollment_tokens SET state = 'expired', state_at = $1
         WHERE state IN ('active', 'claimed') AND expires_at <= $2 RETURNING id, user_name",
    )
    .bind(now)
    .bind(now)
    .fetch_all(conn)
    .await?)
}

pub async fn for_user(conn: &mut Conn, user: &str) -> Result<Vec<EnrollmentToken>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT * FROM enrollment_tokens WHERE user_name = $1 ORDER BY created_at, id",
    )
    .bind(user)
    .fetch_all(conn)
    .await?)
}
