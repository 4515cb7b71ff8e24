//! Taking credentials away: revoke, remove a user, expire. Each change and its
//! audit event share one transaction.
use serde_json::json;
use tracing::info;

use crate::app::App;
use crate::store::credentials::{self, Credential, LIVE_STATES};
use crate::store::{StoreError, audit, enrollments, issuances, users};
use crate::support::exit::{Exit, ExitStatus};

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
    #[error("bootstrap token expiry failed: {0}")]
    Tokens(String),
    #[error(
        "{what} is recorded, but the cluster's RoleBindings could not be updated yet: {source}\nthe daemon's next pass retries; run `rotator doctor` to see what is still granted"
    )]
    Access {
        what: String,
        source: crate::flows::bindings::AccessError,
    },
}

impl ExitStatus for LifecycleError {
    fn exit(&self) -> Exit {
        match self {
            LifecycleError::NoSuchUser(_) | LifecycleError::NoSuchSerial { .. } => Exit::NotFound,
            LifecycleError::Store(e) => e.exit(),
            LifecycleError::Access { source, .. } => source.exit(),
            LifecycleError::Tokens(_) => Exit::Signer,
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
        if serial.is_some() {
            return Err(LifecycleError::NoSuchUser(user.into()));
        }
        return only_in_flight(
            tx,
            app,
            user,
            "the user was revoked while it was added",
            now,
        )
        .await;
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
        // A pending credential's attempt ends with it: it can never be made current.
        if c.state == "pending" {
            issuances::cancel(
                &mut tx,
                &c.id,
                "its credential was revoked while it was issued",
                now,
            )
            .await?;
        }
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
    // Revoking everything wins over whatever is in flight for the user, in any
    // process: each open attempt is ended here, so its next step (or its
    // activation) finds it ended; unused enrollment tokens go too.
    if serial.is_none() {
        end_in_flight(
            &mut tx,
            app,
            user,
            "the user's credentials were revoked while it ran",
            now,
        )
        .await?;
        // Sticky: nothing issues to the user again until an administrator
        // reinstates them, checked where an issuance plans and activates.
        if users::set_revoked(&mut tx, user, &app.actor, now).await? {
            audit::append(
                &mut tx,
                now,
                &app.actor,
                "user.revoke",
                user,
                json!({"revoked": live.iter().map(|c| &c.serial).collect::<Vec<_>>()}),
            )
            .await?;
        }
    }
    crate::store::commit(tx).await?;
    info!(user, revoked = live.len(), "revoked");
    take_away(app, user, "the revocation").await?;
    Ok(live)
}

/// Ends a user's revocation on purpose (`rotate --reinstate`), audited. False
/// when the user was not revoked.
pub async fn reinstate(app: &App, user: &str) -> Result<bool, LifecycleError> {
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    let revoked = match users::get(&mut tx, user).await? {
        Some(u) if u.state != "removed" => u.revoked,
        _ => return Err(LifecycleError::NoSuchUser(user.into())),
    };
    let Some(r) = revoked else {
        return Ok(false);
    };
    users::reinstate(&mut tx, user, now).await?;
    audit::append(
        &mut tx,
        now,
        &app.actor,
        "user.reinstate",
        user,
        json!({"revoked_at": r.at, "revoked_by": r.by}),
    )
    .await?;
    crate::store::commit(tx).await?;
    info!(user, "reinstated");
    Ok(true)
}

/// Marks the user removed and revokes every live credential, in one transaction.
pub async fn remove_user(app: &App, user: &str) -> Result<Vec<Credential>, LifecycleError> {
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    match users::get(&mut tx, user).await? {
        Some(u) if u.state != "removed" => {}
        _ => {
            return only_in_flight(
                tx,
                app,
                user,
                "the user was removed while it was added",
                now,
            )
            .await;
        }
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
    end_in_flight(&mut tx, app, user, "the user was removed while it ran", now).await?;
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
    take_away(app, user, "the removal").await?;
    Ok(live)
}

/// For a user with no (active) row: a first add-user (or a re-add) may be in
/// flight, its row written only when its credential is stored. The revoke or
/// removal wins over it too; with nothing in flight the user does not exist.
async fn only_in_flight(
    mut tx: crate::store::Tx,
    app: &App,
    user: &str,
    reason: &str,
    now: i64,
) -> Result<Vec<Credential>, LifecycleError> {
    if end_in_flight(&mut tx, app, user, reason, now).await? == 0 {
        return Err(LifecycleError::NoSuchUser(user.into()));
    }
    crate::store::commit(tx).await?;
    info!(user, "ended an add-user in flight");
    Ok(Vec::new())
}

/// Ends the user's open issuances and revokes their unused enrollment tokens,
/// in the caller's transaction, with an audit event for what it ended.
async fn end_in_flight(
    tx: &mut crate::store::Tx,
    app: &App,
    user: &str,
    reason: &str,
    now: i64,
) -> Result<usize, StoreError> {
    let ended = issuances::cancel_open(tx, user, reason, now).await?;
    let tokens = enrollments::revoke_unused(tx, user, now).await?;
    if !ended.is_empty() || !tokens.is_empty() {
        let attempts: Vec<serde_json::Value> = ended
            .iter()
            .map(|i| json!({"credential": i.id, "generation": i.generation, "step": i.step}))
            .collect();
        audit::append(
            tx,
            now,
            &app.actor,
            "issuance.cancel",
            user,
            json!({"reason": reason, "issuances": attempts, "enrollment_tokens_revoked": tokens}),
        )
        .await?;
    }
    Ok(ended.len())
}

/// The database is the authority and has already changed; now the cluster follows.
async fn take_away(app: &App, user: &str, what: &str) -> Result<(), LifecycleError> {
    let Some(cluster) = &app.cluster else {
        return Ok(());
    };
    crate::flows::bindings::sync_user(
        &app.store,
        cluster,
        app.settings.rotation.grace_period,
        app.clock.now(),
        user,
        &app.actor,
        crate::flows::bindings::Sweep::Everywhere,
    )
    .await
    .map(|_| ())
    .map_err(|source| LifecycleError::Access {
        what: what.into(),
        source,
    })
}

/// Removes from the cluster every generation group that must no longer be
/// granted (revoked, expired, or superseded past the grace period).
pub async fn remove_stale_access(app: &App) -> Result<usize, LifecycleError> {
    let Some(cluster) = &app.cluster else {
        return Ok(0);
    };
    let synced = crate::flows::bindings::remove_stale_access(
        &app.store,
        cluster,
        app.settings.rotation.grace_period,
        app.clock.now(),
        &app.actor,
    )
    .await
    .map_err(|source| LifecycleError::Access {
        what: "expiry".into(),
        source,
    })?;
    let n = synced.len();
    for (user, missing) in synced {
        app.metrics.unbindable.report(&user, missing);
    }
    Ok(n)
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
