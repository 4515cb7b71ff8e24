//! "What changed since": the rows the authorization snapshot needs, all of them
//! or only those stamped after a sequence number (migration 0013's triggers).
use super::{Store, StoreError};

/// What the webhook needs to judge one credential. Never key material.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CredentialRow {
    pub id: String,
    pub user_name: String,
    pub generation: i64,
    pub serial: String,
    /// SHA-256 (lowercase hex) of the certificate's DER: what the API server
    /// sends as `X509SHA256=` in the `credential-id` extra.
    pub fingerprint: String,
    pub not_after: i64,
    pub state: String,
    pub state_reason: Option<String>,
    pub state_at: i64,
    pub generation_group: Option<String>,
    pub change_seq: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct UserRow {
    pub name: String,
    pub state: String,
    pub change_seq: i64,
}

/// One consistent read: rows changed after `since` (all rows for `None`) and
/// the counter they were read at.
#[derive(Debug, Default)]
pub struct Changes {
    pub credentials: Vec<CredentialRow>,
    pub users: Vec<UserRow>,
    /// The counter at the time of the read: the next `since`.
    pub seq: i64,
}

/// The counter alone: the cheap check a refresh starts with.
pub async fn seq(store: &Store) -> Result<i64, StoreError> {
    let (seq,): (i64,) = sqlx::query_as("SELECT seq FROM change_counter WHERE id = 1")
        .fetch_one(store.pool())
        .await?;
    Ok(seq)
}

/// Rows changed after `since`, read in one transaction so the counter and the
/// rows agree (a commit between two reads could otherwise be skipped for ever).
pub async fn since(store: &Store, since: Option<i64>) -> Result<Changes, StoreError> {
    // Rows from before migration 0013 carry 0: a full read asks for all above -1.
    let since = since.unwrap_or(-1);
    let mut tx = store.pool().begin().await?;
    let (seq,): (i64,) = sqlx::query_as("SELECT seq FROM change_counter WHERE id = 1")
        .fetch_one(&mut *tx)
        .await?;
    let credentials = sqlx::query_as(
        "SELECT id, user_name, generation, serial, fingerprint, not_after, state, state_reason, state_at,
                generation_group, change_seq FROM credentials WHERE change_seq > $1",
    )
    .bind(since)
    .fetch_all(&mut *tx)
    .await?;
    let users = sqlx::query_as("SELECT name, state, change_seq FROM users WHERE change_seq > $1")
        .bind(since)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Changes {
        credentials,
        users,
        seq,
    })
}
