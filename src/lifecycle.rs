//! Taking credentials away: revoke, remove a user, expire. Each change and its
//! audit event share one transaction.
use serde_json::json;
use tracing::info;

use crate::app::App;
use crate::exit::{Exit, ExitStatus};
use crate::store::credentials::{self, Credential, LIVE_STATES};
use crate::store::{StoreError, audit, users};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("no user {0:?}\nfix: `rotator list-users` shows who exists")]
    NoSuchUser(String),
    #[error(
        "user {user:?} has no live credential with serial {serial:?}\nfix: `rotator show {user}` lists serials and states"
    )]
    NoSuchSerial { user: String, serial: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExitStatus for LifecycleError {
    fn exit(&self) -> Exit {
        match self {
            LifecycleError::NoSuchUser(_) | LifecycleError::NoSuchSerial { .. } => Exit::NotFound,
            LifecycleError::Store(e) => e.exit(),
        }
    }
}

/// Revokes one live credential (by serial) or all of a user's. Returns what was revoked.
pub async fn revoke(
    app: &App,
    user: &str,
    serial: Option<&str>,
) -> Result<Vec<Credential>, LifecycleError> {
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    if users::get(&mut tx, user).await?.is_none() {
        return Err(LifecycleError::NoSuchUser(user.into()));
    }
    let live: Vec<Credential> = credentials::for_user(&mut tx, user)
        .await?
        .into_iter()
        .filter(|c| LIVE_STATES.contains(&c.state.as_str()))
        .filter(|c| {
            serial.is_none_or(|s| c.serial.eq_ignore_ascii_case(s.trim_start_matches("0x")))
        })
        .collect();
    if let (Some(s), true) = (serial, live.is_empty()) {
        return Err(LifecycleError::NoSuchSerial {
            user: user.into(),
            serial: s.into(),
        });
    }
    for c in &live {
        credentials::set_state(
            &mut tx,
            &c.id,
            "revoked",
            Some("revoked by an administrator"),
            now,
        )
        .await?;
        audit::append(
            &mut tx,
            now,
            &app.actor,
            "credential.revoke",
            user,
            json!({"credential": c.id, "serial": c.serial, "generation": c.generation, "previous_state": c.state}),
        )
        .await?;
    }
    crate::store::commit(tx).await?;
    info!(user, revoked = live.len(), "revoked");
    Ok(live)
}

/// Marks the user removed and revokes every live credential, in one transaction.
pub async fn remove_user(app: &App, user: &str) -> Result<Vec<Credential>, LifecycleError> {
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    match users::get(&mut tx, user).await? {
        Some(u) if u.state != "removed" => {}
        _ => return Err(LifecycleError::NoSuchUser(user.into())),
    }
    let live: Vec<Credential> = credentials::for_user(&mut tx, user)
        .await?
        .into_iter()
        .filter(|c| LIVE_STATES.contains(&c.state.as_str()))
        .collect();
    for c in &live {
        credentials::set_state(&mut tx, &c.id, "revoked", Some("user removed"), now).await?;
    }
    users::set_state(&mut tx, user, "removed", now).await?;
    let serials: Vec<&str> = live.iter().map(|c| c.serial.as_str()).collect();
    audit::append(
        &mut tx,
        now,
        &app.actor,
        "user.remove",
        user,
        json!({"revoked": serials}),
    )
    .await?;
    crate::store::commit(tx).await?;
    info!(user, revoked = live.len(), "user removed");
    Ok(live)
}

/// Marks live credentials past `notAfter` expired. Safe to run concurrently and
/// repeatedly: each row changes state once, inside its own transaction.
pub async fn expire_pass(app: &App) -> Result<usize, LifecycleError> {
    let mut total = 0;
    loop {
        let now = app.clock.now();
        let mut tx = app.store.begin().await?;
        let batch = credentials::expired_live(&mut tx, now, 200).await?;
        if batch.is_empty() {
            break;
        }
        for c in &batch {
            credentials::set_state(&mut tx, &c.id, "expired", Some("notAfter passed"), now).await?;
            audit::append(
                &mut tx,
                now,
                &app.actor,
                "credential.expire",
                &c.user_name,
                json!({"credential": c.id, "serial": c.serial, "not_after": c.not_after, "previous_state": c.state}),
            )
            .await?;
        }
        crate::store::commit(tx).await?;
        total += batch.len();
    }
    if total > 0 {
        info!(expired = total, "expiry pass");
    }
    Ok(total)
}
