use super::Conn;

use super::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, serde::Serialize)]
pub struct Credential {
    pub id: String,
    pub user_name: String,
    pub generation: i64,
    pub serial: String,
    pub fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub state: String,
    pub signer: String,
    pub csr_name: Option<String>,
    pub key_type: String,
    #[serde(skip)]
    pub certificate: String,
    pub state_reason: Option<String>,
    pub state_at: i64,
    pub created_at: i64,
    /// When its generation group was last removed from the cluster's bindings.
    pub access_removed_at: Option<i64>,
    /// SHA-256 (hex) of the certificate's SubjectPublicKeyInfo.
    pub spki_sha256: Option<String>,
    /// The credential whose holder renewed into this one (self-service).
    pub renewed_from: Option<String>,
    /// The generation group in its certificate (NULL for credentials made
    /// before groups carried a key suffix).
    pub generation_group: Option<String>,
}

impl Credential {
    /// The generation group its certificate carries.
    pub fn group(&self) -> String {
        self.generation_group.clone().unwrap_or_else(|| {
            crate::policy::legacy_generation_group(&self.user_name, self.generation)
        })
    }
}

/// States in which a credential may still authenticate somewhere.
pub const LIVE_STATES: &[&str] = &["pending", "current", "superseded"];

pub struct NewCredential<'a> {
    pub id: &'a str,
    pub user_name: &'a str,
    pub generation: i64,
    pub serial: &'a str,
    pub fingerprint: &'a str,
    pub not_before: i64,
    pub not_after: i64,
    pub signer: &'a str,
    pub csr_name: Option<&'a str>,
    pub key_type: &'a str,
    pub certificate: &'a str,
    pub spki_sha256: &'a str,
    pub renewed_from: Option<&'a str>,
    pub generation_group: &'a str,
}

pub async fn insert_pending(
    conn: &mut Conn,
    c: &NewCredential<'_>,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO credentials (id, user_name, generation, serial, fingerprint, not_before, not_after, state, signer,
           csr_name, key_type, certificate, state_at, created_at, spki_sha256, renewed_from, generation_group)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(c.id)
    .bind(c.user_name)
    .bind(c.generation)
    .bind(c.serial)
    .bind(c.fingerprint)
    .bind(c.not_before)
    .bind(c.not_after)
    .bind(c.signer)
    .bind(c.csr_name)
    .bind(c.key_type)
    .bind(c.certificate)
    .bind(now)
    .bind(now)
    .bind(c.spki_sha256)
    .bind(c.renewed_from)
    .bind(c.generation_group)
    .execute(conn)
    .await?;
    Ok(())
}

/// The credential whose certificate has this SHA-256 fingerprint.
pub async fn by_fingerprint(
    conn: &mut Conn,
    fingerprint: &str,
) -> Result<Option<Credential>, StoreError> {
    Ok(
        sqlx::query_as("SELECT * FROM credentials WHERE fingerprint = $1")
            .bind(fingerprint)
            .fetch_optional(conn)
            .await?,
    )
}

/// The credential a holder of `from` already renewed into with this key, if any:
/// a retried renewal whose response was lost gets the same certificate again.
pub async fn renewal_of(
    conn: &mut Conn,
    from: &str,
    spki_sha256: &str,
) -> Result<Option<Credential>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT * FROM credentials WHERE renewed_from = $1 AND spki_sha256 = $2 AND state = 'current'",
    )
    .bind(from)
    .bind(spki_sha256)
    .fetch_optional(conn)
    .await?)
}

/// The newest generation of `user` above `generation` that was ever made
/// current (current now, or its attempt delivered), with its serial: while
/// one exists, `generation` may never become current (a rollback).
pub async fn newer_activated(
    conn: &mut Conn,
    user: &str,
    generation: i64,
) -> Result<Option<(i64, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT n.generation, n.serial FROM credentials n JOIN issuances ni ON ni.id = n.id
         WHERE n.user_name = $1 AND n.generation > $2 AND (n.state = 'current' OR ni.step = 'delivered')
         ORDER BY n.generation DESC LIMIT 1",
    )
    .bind(user)
    .bind(generation)
    .fetch_optional(conn)
    .await?)
}

/// Stores the sealed key of a pending credential.
pub async fn set_sealed_key(conn: &mut Conn, id: &str, sealed: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE credentials SET sealed_key = $1 WHERE id = $2 AND state = 'pending'")
        .bind(sealed)
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A pending credential of `user` whose delivery can still be retried: its key
/// is sealed and it is valid past `after`, and no newer generation was made
/// current since (that one is abandoned instead). With its issuance's owner.
pub async fn redeliverable(
    conn: &mut Conn,
    user: &str,
    after: i64,
) -> Result<Option<(Credential, String, String)>, StoreError> {
    let Some((id, sealed, owner)): Option<(String, String, String)> = sqlx::query_as(
        "SELECT c.id, c.sealed_key, i.owner FROM credentials c JOIN issuances i ON i.id = c.id
         WHERE c.user_name = $1 AND c.state = 'pending' AND c.sealed_key IS NOT NULL
           AND c.not_after > $2 AND i.step = 'stored'
           AND NOT EXISTS (SELECT 1 FROM credentials n JOIN issuances ni ON ni.id = n.id
             WHERE n.user_name = c.user_name AND n.generation > c.generation
               AND (n.state = 'current' OR ni.step = 'delivered'))
         ORDER BY c.generation DESC LIMIT 1",
    )
    .bind(user)
    .bind(after)
    .fetch_optional(&mut *conn)
    .await?
    else {
        return Ok(None);
    };
    Ok(get(conn, &id).await?.map(|c| (c, sealed, owner)))
}

pub async fn get(conn: &mut Conn, id: &str) -> Result<Option<Credential>, StoreError> {
    Ok(sqlx::query_as("SELECT * FROM credentials WHERE id = $1")
        .bind(id)
        .fetch_optional(conn)
        .await?)
}

pub async fn for_user(conn: &mut Conn, user: &str) -> Result<Vec<Credential>, StoreError> {
    Ok(
        sqlx::query_as("SELECT * FROM credentials WHERE user_name = $1 ORDER BY generation")
            .bind(user)
            .fetch_all(conn)
            .await?,
    )
}

pub async fn list_for_user(store: &Store, user: &str) -> Result<Vec<Credential>, StoreError> {
    let mut conn = store.conn().await?;
    for_user(&mut conn, user).await
}

pub async fn current(conn: &mut Conn, user: &str) -> Result<Option<Credential>, StoreError> {
    Ok(
        sqlx::query_as("SELECT * FROM credentials WHERE user_name = $1 AND state = 'current'")
            .bind(user)
            .fetch_optional(conn)
            .await?,
    )
}

/// Changes a credential's state. A sealed key never outlives the pending state:
/// it goes in the same statement.
pub async fn set_state(
    conn: &mut Conn,
    id: &str,
    state: &str,
    reason: Option<&str>,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE credentials SET state = $1, state_reason = $2, state_at = $3,
           sealed_key = CASE WHEN $1 = 'pending' THEN sealed_key END
         WHERE id = $4",
    )
    .bind(state)
    .bind(reason)
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Makes a pending credential current, but only if it is still pending and its
/// user still active (a revoke or remove-user that ran meanwhile wins), and no
/// newer generation of the user was ever made current (never a rollback).
/// False when the credential was not activated.
pub async fn activate_pending(conn: &mut Conn, id: &str, now: i64) -> Result<bool, StoreError> {
    let r = sqlx::query(
        "UPDATE credentials SET state = 'current', state_reason = NULL, state_at = $1, sealed_key = NULL
         WHERE id = $2 AND state = 'pending'
           AND EXISTS (SELECT 1 FROM users u WHERE u.name = credentials.user_name AND u.state = 'active')
           AND NOT EXISTS (SELECT 1 FROM credentials n JOIN issuances ni ON ni.id = n.id
             WHERE n.user_name = credentials.user_name AND n.generation > credentials.generation
               AND (n.state = 'current' OR ni.step = 'delivered'))",
    )
    .bind(now)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Live credentials whose `notAfter` has passed: the expiry job's work list.
pub async fn expired_live(
    conn: &mut Conn,
    now: i64,
    limit: i64,
) -> Result<Vec<Credential>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT * FROM credentials WHERE state IN ('pending', 'current', 'superseded') AND not_after <= $1 ORDER BY not_after LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

pub async fn count_by_state(store: &Store) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT state, COUNT(*) FROM credentials GROUP BY state ORDER BY state")
            .fetch_all(store.pool())
            .await?,
    )
}

/// Users with a credential whose generation group should no longer be granted
/// but has not been removed from the cluster yet: revoked, expired, failed, or
/// superseded longer than `grace` ago.
pub async fn users_needing_access_removal(
    conn: &mut Conn,
    now: i64,
    grace: i64,
) -> Result<Vec<String>, StoreError> {
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT user_name FROM credentials WHERE access_removed_at IS NULL
           AND (state IN ('revoked', 'expired', 'failed') OR (state = 'superseded' AND state_at + $1 <= $2))",
    )
    .bind(grace)
    .bind(now)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// Marks every credential of `user` that `sync` no longer granted as removed.
/// The few candidates are filtered here rather than in SQL: neither engine's
/// JSON functions are the other's.
pub async fn mark_access_removed(
    conn: &mut Conn,
    user: &str,
    granted: &[i64],
    now: i64,
) -> Result<(), StoreError> {
    let candidates: Vec<(String, i64)> = sqlx::query_as(
        "SELECT id, generation FROM credentials WHERE user_name = $1 AND access_removed_at IS NULL
           AND state IN ('revoked', 'expired', 'failed', 'superseded')",
    )
    .bind(user)
    .fetch_all(&mut *conn)
    .await?;
    for (id, generation) in candidates {
        if granted.contains(&generation) {
            continue;
        }
        sqlx::query(
            "UPDATE credentials SET access_removed_at = $1 WHERE id = $2 AND access_removed_at IS NULL",
        )
        .bind(now)
        .bind(&id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
