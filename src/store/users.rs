use super::Conn;

use super::{Store, StoreError, json_vec};
use crate::pki::KeyType;
use crate::policy::UserSpec;

#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    name: String,
    groups: String,
    namespaces: String,
    role: String,
    key_type: String,
    ttl_seconds: i64,
    state: String,
    created_at: i64,
    updated_at: i64,
    revoked_at: Option<i64>,
    revoked_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct User {
    pub spec: UserSpec,
    pub state: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Set while the user is revoked (state `disabled`): nothing is issued to
    /// them until an administrator reinstates them.
    pub revoked: Option<Revoked>,
}

/// When and by whom a user was revoked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Revoked {
    pub at: i64,
    pub by: String,
}

impl TryFrom<Row> for User {
    type Error = StoreError;
    fn try_from(r: Row) -> Result<Self, StoreError> {
        Ok(User {
            spec: UserSpec {
                name: r.name,
                groups: json_vec(&r.groups)?,
                namespaces: json_vec(&r.namespaces)?,
                role: r.role,
                key_type: r
                    .key_type
                    .parse::<KeyType>()
                    .map_err(|e| StoreError::Invalid(e.to_string()))?,
                ttl_seconds: r.ttl_seconds as u64,
            },
            revoked: (r.state == "disabled").then(|| Revoked {
                at: r.revoked_at.unwrap_or(r.updated_at),
                by: r.revoked_by.unwrap_or_default(),
            }),
            state: r.state,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
    }
}

pub async fn get(conn: &mut Conn, name: &str) -> Result<Option<User>, StoreError> {
    let row: Option<Row> = sqlx::query_as("SELECT * FROM users WHERE name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await?;
    row.map(User::try_from).transpose()
}

pub async fn find(store: &Store, name: &str) -> Result<Option<User>, StoreError> {
    let mut conn = store.conn().await?;
    get(&mut conn, name).await
}

pub async fn list(store: &Store, include_removed: bool) -> Result<Vec<User>, StoreError> {
    let rows: Vec<Row> =
        sqlx::query_as("SELECT * FROM users WHERE state != 'removed' OR $1 ORDER BY name")
            .bind(include_removed)
            .fetch_all(store.pool())
            .await?;
    rows.into_iter().map(User::try_from).collect()
}

/// Inserts the user, or reactivates a removed one with the new spec; a revoked
/// (disabled) user stays disabled: only a reinstatement ends that. A new or
/// re-added user gets a new incarnation (nothing made for the old record, such
/// as an enrollment token, carries over); an active one keeps its own.
pub async fn upsert_active(conn: &mut Conn, spec: &UserSpec, now: i64) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO users (name, groups, namespaces, role, key_type, ttl_seconds, state, created_at, updated_at, incarnation)
         VALUES ($1, $2, $3, $4, $5, $6, 'active', $7, $8, $9)
         ON CONFLICT (name) DO UPDATE SET groups = excluded.groups, namespaces = excluded.namespaces,
           role = excluded.role, key_type = excluded.key_type, ttl_seconds = excluded.ttl_seconds,
           incarnation = CASE WHEN users.state = 'active' AND users.incarnation IS NOT NULL
                              THEN users.incarnation ELSE excluded.incarnation END,
           state = CASE WHEN users.state = 'disabled' THEN 'disabled' ELSE 'active' END,
           updated_at = excluded.updated_at",
    )
    .bind(&spec.name)
    .bind(serde_json::to_string(&spec.groups).expect("json"))
    .bind(serde_json::to_string(&spec.namespaces).expect("json"))
    .bind(&spec.role)
    .bind(spec.key_type.as_str())
    .bind(spec.ttl_seconds as i64)
    .bind(now)
    .bind(now)
    .bind(crate::pki::hex(&crate::pki::random_bytes::<8>()))
    .execute(conn)
    .await?;
    Ok(())
}

/// The user record's incarnation (changes when a removed name is added again).
pub async fn incarnation(conn: &mut Conn, name: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(Option<String>,)> =
        sqlx::query_as("SELECT incarnation FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    Ok(row.and_then(|r| r.0))
}

/// Sets the state; any state but `disabled` ends a revocation's record (a
/// removed user's record ends, and its revocation with it).
pub async fn set_state(
    conn: &mut Conn,
    name: &str,
    state: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE users SET state = $1, updated_at = $2,
           revoked_at = CASE WHEN $1 = 'disabled' THEN revoked_at END,
           revoked_by = CASE WHEN $1 = 'disabled' THEN revoked_by END
         WHERE name = $3",
    )
    .bind(state)
    .bind(now)
    .bind(name)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks an active user revoked (sticky until reinstated). False when the user
/// was not active: a second revoke keeps the first one's time and actor.
pub async fn set_revoked(
    conn: &mut Conn,
    name: &str,
    actor: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE users SET state = 'disabled', revoked_at = $1, revoked_by = $2, updated_at = $3
         WHERE name = $4 AND state = 'active'",
    )
    .bind(now)
    .bind(actor)
    .bind(now)
    .bind(name)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Ends a revocation: the user is active again. False when the user was not
/// revoked (nothing changed).
pub async fn reinstate(conn: &mut Conn, name: &str, now: i64) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE users SET state = 'active', revoked_at = NULL, revoked_by = NULL, updated_at = $1
         WHERE name = $2 AND state = 'disabled'",
    )
    .bind(now)
    .bind(name)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn delivery(conn: &mut Conn, name: &str) -> Result<String, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT delivery FROM users WHERE name = $1")
        .bind(name)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|r| r.0).unwrap_or_else(|| "dir".into()))
}

pub async fn set_delivery(
    conn: &mut Conn,
    name: &str,
    target: &str,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE users SET delivery = $1, updated_at = $2 WHERE name = $3")
        .bind(target)
        .bind(now)
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}
