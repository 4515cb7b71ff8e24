use super::Conn;

use super::{Store, StoreError};

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct TokenRow {
    pub id: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub description: String,
    pub groups: String,
    pub usages: String,
    pub expires_at: Option<i64>,
    pub state: String,
    pub created_by: String,
    pub created_at: i64,
    pub state_at: i64,
}

pub struct NewToken<'a> {
    pub id: &'a str,
    pub secret_hash: &'a str,
    pub description: &'a str,
    pub groups: &'a [String],
    pub usages: &'a [String],
    pub expires_at: Option<i64>,
    pub created_by: &'a str,
}

pub async fn insert_creating(
    conn: &mut Conn,
    t: &NewToken<'_>,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO bootstrap_tokens (id, secret_hash, description, groups, usages, expires_at, state, created_by, created_at, state_at)
         VALUES ($1, $2, $3, $4, $5, $6, 'creating', $7, $8, $9)",
    )
    .bind(t.id)
    .bind(t.secret_hash)
    .bind(t.description)
    .bind(serde_json::to_string(t.groups).expect("json"))
    .bind(serde_json::to_string(t.usages).expect("json"))
    .bind(t.expires_at)
    .bind(t.created_by)
    .bind(now)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_state(conn: &mut Conn, id: &str, state: &str, now: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE bootstrap_tokens SET state = $1, state_at = $2 WHERE id = $3")
        .bind(state)
        .bind(now)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn get(conn: &mut Conn, id: &str) -> Result<Option<TokenRow>, StoreError> {
    Ok(
        sqlx::query_as("SELECT * FROM bootstrap_tokens WHERE id = $1")
            .bind(id)
            .fetch_optional(conn)
            .await?,
    )
}

pub async fn list(store: &Store) -> Result<Vec<TokenRow>, StoreError> {
    Ok(
        sqlx::query_as("SELECT * FROM bootstrap_tokens ORDER BY created_at, id")
            .fetch_all(store.pool())
            .await?,
    )
}

/// Tokens whose Secret must go: active ones past expiry, and creations that
/// never finished (older than `stale_before`).
pub async fn due(
    conn: &mut Conn,
    now: i64,
    stale_before: i64,
) -> Result<Vec<TokenRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT * FROM bootstrap_tokens WHERE (state = 'active' AND expires_at IS NOT NULL AND expires_at <= $1)
            OR (state = 'creating' AND created_at <= $2) ORDER BY id",
    )
    .bind(now)
    .bind(stale_before)
    .fetch_all(conn)
    .await?)
}

pub async fn count_by_state(store: &Store) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        sqlx::query_as(
            "SELECT state, COUNT(*) FROM bootstrap_tokens GROUP BY state ORDER BY state",
        )
        .fetch_all(store.pool())
        .await?,
    )
}
