//! Who may do what in the cluster: the RoleBindings rotator manages follow the
//! database. A user's bindings name the generation groups of their credentials
//! that are current or pending, or superseded within the grace period; nothing else.
//!
//! One process at a time works on one user's bindings (`Store::lock_user`), and
//! it reads the database only once it holds the lock: a sync never writes what
//! it read before a revoke committed, so no later pass puts a revoked
//! generation back into a binding.
use std::time::Duration;

use serde_json::json;

use crate::cluster::rbac::{Scope, SyncFailure, SyncReport};
use crate::cluster::{Cluster, ClusterError};
use crate::store::credentials::{self, Credential};
use crate::store::{Store, StoreError, audit, users};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{}", describe_failures(user, failed))]
    Partial {
        user: String,
        failed: Vec<SyncFailure>,
    },
    #[error(
        "{user}'s RoleBindings were synced three times and each time the database session holding the user's lock ended before the sync did\nfix: check the database server (restarting? killing sessions?); the daemon's next pass syncs again"
    )]
    LockLost { user: String },
}

fn describe_failures(user: &str, failed: &[SyncFailure]) -> String {
    let list: Vec<String> = failed
        .iter()
        .map(|f| format!("{}: {}", f.binding, f.reason))
        .collect();
    let fix = if failed.iter().any(|f| f.not_found) {
        "create the missing namespace, or give the user other namespaces (remove-user, then add-user)"
    } else {
        "see the reasons; the daemon's next pass retries, and `rotator doctor` shows what is still granted"
    };
    format!(
        "{user}'s RoleBindings could not all be updated (the others were): {}\nfix: {fix}",
        list.join("; ")
    )
}

impl crate::support::exit::ExitStatus for AccessError {
    fn exit(&self) -> crate::support::exit::Exit {
        match self {
            AccessError::Cluster(e) => e.exit(),
            AccessError::Store(e) => e.exit(),
            AccessError::Partial { .. } => crate::support::exit::Exit::Signer,
            AccessError::LockLost { .. } => crate::support::exit::Exit::Database,
        }
    }
}

fn is_granted(c: &Credential, now: i64, grace: i64) -> bool {
    match c.state.as_str() {
        "current" | "pending" => c.not_after > now,
        "superseded" => c.not_after > now && c.state_at + grace > now,
        _ => false,
    }
}

/// Generations whose group the user's bindings must name now.
pub fn granted_generations(creds: &[Credential], now: i64, grace: Duration) -> Vec<i64> {
    let grace = grace.as_secs() as i64;
    let mut g: Vec<i64> = creds
        .iter()
        .filter(|c| is_granted(c, now, grace))
        .map(|c| c.generation)
        .collect();
    g.sort();
    g
}

/// The user's bindings as the database says they must be, read now.
struct Wanted {
    scope: Scope,
    role: String,
    granted: Vec<i64>,
    groups: Vec<String>,
    /// Generation groups that must be granted nowhere.
    take_away: Vec<String>,
}

async fn wanted(
    store: &Store,
    user: &str,
    now: i64,
    grace: Duration,
) -> Result<Wanted, StoreError> {
    let mut conn = store.conn().await?;
    let spec = users::get(&mut conn, user).await?;
    let creds = credentials::for_user(&mut conn, user).await?;
    let g = grace.as_secs() as i64;
    let granted = granted_generations(&creds, now, grace);
    let mut groups: Vec<String> = creds
        .iter()
        .filter(|c| is_granted(c, now, g))
        .map(Credential::group)
        .collect();
    groups.sort();
    let mut take_away: Vec<String> = creds
        .iter()
        .filter(|c| !is_granted(c, now, g))
        // Each credential's own group (the legacy `rotator:USER:GEN` only for a
        // credential that carried it: a suffixed group of another instance is not ours).
        .map(Credential::group)
        .filter(|grp| !groups.contains(grp))
        .collect();
    take_away.sort();
    take_away.dedup();
    let (namespaces, role) = match &spec {
        Some(u) if u.state == "active" => (u.spec.namespaces.clone(), u.spec.role.clone()),
        Some(u) => (Vec::new(), u.spec.role.clone()),
        None => (Vec::new(), String::new()),
    };
    let scope = Scope::of(&namespaces);
    Ok(Wanted {
        scope,
        role,
        granted,
        groups,
        take_away,
    })
}

/// How thoroughly a sync looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sweep {
    /// Only the user's own bindings (an issuance binding its new group).
    Own,
    /// Also every other binding that names a generation group the user must no
    /// longer have (revoke, remove-user, grace cuts, reconcile).
    Everywhere,
}

/// Makes the cluster's bindings for `user` match the database, and records it.
/// A binding that cannot be synced is reported (`AccessError::Partial`) after
/// every other one was; removals are never held back by it.
pub async fn sync_user(
    store: &Store,
    cluster: &Cluster,
    grace: Duration,
    now: i64,
    user: &str,
    actor: &str,
    sweep: Sweep,
) -> Result<SyncReport, AccessError> {
    let (w, report) = {
        let mut attempt = 1;
        loop {
            let mut lock = store.lock_user(user).await?;
            let w = wanted(store, user, now, grace).await?;
            let take_away: &[String] = match sweep {
                Sweep::Everywhere => &w.take_away,
                Sweep::Own => &[],
            };
            let report = cluster
                .sync_user_bindings(user, &w.scope, &w.role, &w.groups, take_away)
                .await;
            if lock.still_held().await {
                break (w, report);
            }
            // Another process may have synced this user meanwhile from a newer
            // state (a revoke): sync again, from what the database says now.
            tracing::warn!(
                user,
                attempt,
                "the user lock's database session ended during the sync; syncing again"
            );
            if attempt == 3 {
                return Err(AccessError::LockLost {
                    user: user.to_string(),
                });
            }
            attempt += 1;
        }
    };
    let mut tx = store.begin().await?;
    // A generation counts as taken away only once every binding was updated;
    // one whose namespace (or object) does not exist grants nothing, so it
    // does not hold that back (else every pass would retry it for ever).
    if report.failed.iter().all(|f| f.not_found) {
        credentials::mark_access_removed(&mut tx, user, &w.granted, now).await?;
    }
    if !report.is_empty() || !report.failed.is_empty() || !report.unswept.is_empty() {
        audit::append(
            &mut tx,
            now,
            actor,
            "rbac.sync",
            user,
            json!({"groups": w.groups, "changes": report}),
        )
        .await?;
    }
    crate::store::commit(tx).await?;
    for u in &report.unswept {
        tracing::warn!(user, binding = %u, "a binding rotator did not make still names a revoked generation group and could not be changed; remove it by hand (`rotator doctor` lists it)");
    }
    if !report.failed.is_empty() {
        return Err(AccessError::Partial {
            user: user.to_string(),
            failed: report.failed.clone(),
        });
    }
    tracing::info!(user, groups = ?w.groups, changed = !report.is_empty(), "RoleBindings in sync");
    Ok(report)
}

/// Takes away every group the database says must no longer be granted. Safe to
/// run at any time and repeatedly; a user whose sync fails is retried next time.
/// Returns each user synced with the bindings it found without a namespace.
pub async fn remove_stale_access(
    store: &Store,
    cluster: &Cluster,
    grace: Duration,
    now: i64,
    actor: &str,
) -> Result<Vec<(String, Vec<String>)>, AccessError> {
    let users = {
        let mut conn = store.conn().await?;
        credentials::users_needing_access_removal(&mut conn, now, grace.as_secs() as i64).await?
    };
    let mut first_err = None;
    let mut synced = Vec::new();
    for u in &users {
        match sync_user(store, cluster, grace, now, u, actor, Sweep::Everywhere).await {
            Ok(_) => synced.push((u.clone(), Vec::new())),
            Err(e) => match missing_only(&e) {
                Some(missing) => synced.push((u.clone(), missing)),
                None => {
                    tracing::warn!(user = %u, error = %e, "could not remove stale access; will retry");
                    first_err.get_or_insert(e);
                }
            },
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(synced),
    }
}

/// The bindings a sync could not write only because their namespace (or
/// object) does not exist: a finding, not a failure (nothing is granted there).
/// `None` for any other error.
pub fn missing_only(e: &AccessError) -> Option<Vec<String>> {
    match e {
        AccessError::Partial { failed, .. } if failed.iter().all(|f| f.not_found) => {
            Some(failed.iter().map(|f| f.binding.clone()).collect())
        }
        _ => None,
    }
}
