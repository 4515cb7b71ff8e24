//! Who may do what in the cluster: the RoleBindings rotator manages follow the
//! database. A user's bindings name the generation groups of their credentials
//! that are current or pending, or superseded within the grace period; nothing else.
use std::time::Duration;

use serde_json::json;

use crate::cluster::rbac::{Scope, SyncReport};
use crate::cluster::{Cluster, ClusterError};
use crate::policy::generation_group;
use crate::store::credentials::{self, Credential};
use crate::store::{Store, StoreError, audit, users};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl crate::exit::ExitStatus for AccessError {
    fn exit(&self) -> crate::exit::Exit {
        match self {
            AccessError::Cluster(e) => e.exit(),
            AccessError::Store(e) => e.exit(),
        }
    }
}

/// Generations whose group the user's bindings must name now.
pub fn granted_generations(creds: &[Credential], now: i64, grace: Duration) -> Vec<i64> {
    let grace = grace.as_secs() as i64;
    let mut g: Vec<i64> = creds
        .iter()
        .filter(|c| match c.state.as_str() {
            "current" | "pending" => c.not_after > now,
            "superseded" => c.not_after > now && c.state_at + grace > now,
            _ => false,
        })
        .map(|c| c.generation)
        .collect();
    g.sort();
    g
}

/// Makes the cluster's bindings for `user` match the database, and records it.
pub async fn sync_user(
    store: &Store,
    cluster: &Cluster,
    grace: Duration,
    now: i64,
    user: &str,
    actor: &str,
) -> Result<SyncReport, AccessError> {
    let (spec, creds) = {
        let mut conn = store.conn().await?;
        (
            users::get(&mut conn, user).await?,
            credentials::for_user(&mut conn, user).await?,
        )
    };
    let granted = granted_generations(&creds, now, grace);
    let groups: Vec<String> = granted.iter().map(|g| generation_group(user, *g)).collect();
    let (namespaces, role) = match &spec {
        Some(u) if u.state == "active" => (u.spec.namespaces.clone(), u.spec.role.clone()),
        Some(u) => (Vec::new(), u.spec.role.clone()),
        None => (Vec::new(), String::new()),
    };
    let scope = if namespaces
        .iter()
        .any(|n| n == crate::policy::ALL_NAMESPACES)
    {
        Scope::Cluster
    } else {
        Scope::Namespaces(namespaces)
    };
    let report = cluster
        .sync_user_bindings(user, &scope, &role, &groups)
        .await?;
    let mut tx = store.begin().await?;
    credentials::mark_access_removed(&mut tx, user, &granted, now).await?;
    if !report.is_empty() {
        audit::append(
            &mut tx,
            now,
            actor,
            "rbac.sync",
            user,
            json!({"groups": groups, "changes": report}),
        )
        .await?;
    }
    crate::store::commit(tx).await?;
    tracing::info!(user, groups = ?groups, changed = !report.is_empty(), "RoleBindings in sync");
    Ok(report)
}

/// Takes away every group the database says must no longer be granted. Safe to
/// run at any time and repeatedly; a user whose sync fails is retried next time.
pub async fn remove_stale_access(
    store: &Store,
    cluster: &Cluster,
    grace: Duration,
    now: i64,
    actor: &str,
) -> Result<usize, AccessError> {
    let users = {
        let mut conn = store.conn().await?;
        credentials::users_needing_access_removal(&mut conn, now, grace.as_secs() as i64).await?
    };
    let mut first_err = None;
    for u in &users {
        if let Err(e) = sync_user(store, cluster, grace, now, u, actor).await {
            tracing::warn!(user = %u, error = %e, "could not remove stale access; will retry");
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(users.len()),
    }
}
