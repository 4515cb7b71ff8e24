use super::Conn;

use super::StoreError;

/// The `meta` key under which a database keeps its instance id.
pub const INSTANCE_ID: &str = "instance_id";

pub async fn get(conn: &mut Conn, key: &str) -> Result<Option<String>, StoreError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT value FROM meta WHERE key = $1")
        .bind(key)
        .fetch_optional(conn)
        .await?;
    Ok(row.map(|r| r.0))
}

pub async fn set(conn: &mut Conn, key: &str, value: &str) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        .bind(key)
        .bind(value)
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets `key` only if it has no value; false when it had one (committed by
/// another process, which a concurrent insert waits for), left as it was.
pub async fn insert_new(conn: &mut Conn, key: &str, value: &str) -> Result<bool, StoreError> {
    let done =
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(conn)
            .await?;
    Ok(done.rows_affected() == 1)
}
