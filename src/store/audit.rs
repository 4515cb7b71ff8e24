//! The hash-chained audit log. Appended only inside the transaction of the
//! change it records; `verify` recomputes the chain and names the first break.
use serde_json::Value;
use sqlx::SqliteConnection;

use super::{Store, StoreError};
use crate::pki::{hex, sha256};

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct AuditEvent {
    pub seq: i64,
    pub time: i64,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

fn event_hash(
    seq: i64,
    time: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
    prev_hash: &str,
) -> String {
    // A JSON array of scalars has exactly one serialization: unambiguous framing.
    let canonical = serde_json::to_vec(&(seq, time, actor, action, subject, detail, prev_hash))
        .expect("serializable");
    hex(&sha256(&canonical))
}

/// Appends one event. Call only inside the transaction that makes the change.
pub async fn append(
    conn: &mut SqliteConnection,
    time: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: Value,
) -> Result<i64, StoreError> {
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (seq, prev_hash) = match last {
        Some((s, h)) => (s + 1, h),
        None => (1, GENESIS.to_string()),
    };
    let detail = detail.to_string();
    let hash = event_hash(seq, time, actor, action, subject, &detail, &prev_hash);
    sqlx::query("INSERT INTO audit_events (seq, time, actor, action, subject, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
        .bind(seq)
        .bind(time)
        .bind(actor)
        .bind(action)
        .bind(subject)
        .bind(&detail)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
    Ok(seq)
}

pub async fn list(
    store: &Store,
    subject: Option<&str>,
    limit: i64,
) -> Result<Vec<AuditEvent>, StoreError> {
    // Newest `limit` events, returned oldest first.
    let mut rows: Vec<AuditEvent> = match subject {
        Some(s) => {
            sqlx::query_as("SELECT * FROM audit_events WHERE subject = ? ORDER BY seq DESC LIMIT ?")
                .bind(s)
                .bind(limit)
        }
        None => sqlx::query_as("SELECT * FROM audit_events ORDER BY seq DESC LIMIT ?").bind(limit),
    }
    .fetch_all(store.pool())
    .await?;
    rows.reverse();
    Ok(rows)
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Break {
    pub seq: i64,
    pub reason: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub events: i64,
    pub head: String,
    pub first_break: Option<Break>,
}

pub async fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    let rows: Vec<AuditEvent> = sqlx::query_as("SELECT * FROM audit_events ORDER BY seq")
        .fetch_all(store.pool())
        .await?;
    let mut prev = GENESIS.to_string();
    for (expected_seq, e) in (1..).zip(rows.iter()) {
        let broken = |reason: String| VerifyReport {
            events: rows.len() as i64,
            head: prev.clone(),
            first_break: Some(Break { seq: e.seq, reason }),
        };
        if e.seq != expected_seq {
            return Ok(broken(format!(
                "sequence jumps from {} to {}: events are missing",
                expected_seq - 1,
                e.seq
            )));
        }
        if e.prev_hash != prev {
            return Ok(broken(
                "prev_hash does not match the previous event's hash".into(),
            ));
        }
        let recomputed = event_hash(
            e.seq,
            e.time,
            &e.actor,
            &e.action,
            &e.subject,
            &e.detail,
            &e.prev_hash,
        );
        if recomputed != e.hash {
            return Ok(broken(
                "the event's content does not match its hash: it was altered".into(),
            ));
        }
        prev = e.hash.clone();
    }
    Ok(VerifyReport {
        events: rows.len() as i64,
        head: prev,
        first_break: None,
    })
}
