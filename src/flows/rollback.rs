//! No rollback: an issuance overtaken by a newer generation of its user is
//! abandoned, never made current.
//!
//! A process paused between storing and activating (a deposed leader, a
//! stopped container) may find, when it resumes or when its attempt is
//! recovered, that another process has made a newer generation current since.
//! Activating the older one would supersede a credential that expires later
//! and hand out the older kubeconfig: the user would go back a generation.
use serde_json::json;
use tracing::warn;

use crate::flows::issue::{IssueError, Issuer};
use crate::store::issuances::Step;
use crate::store::{Conn, StoreError, audit, credentials};

/// An attempt at `generation` that a newer generation overtook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overtaken {
    pub user: String,
    pub generation: i64,
    pub newer: i64,
    pub newer_serial: String,
}

impl Overtaken {
    pub fn reason(&self) -> String {
        format!(
            "generation {} ({}) was made current after it began; making generation {} current would roll {} back",
            self.newer, self.newer_serial, self.generation, self.user
        )
    }
}

/// Whether the stored credential `id` was overtaken (`None` when it is not
/// stored, or nothing newer was ever made current).
pub async fn overtaken(conn: &mut Conn, id: &str) -> Result<Option<Overtaken>, StoreError> {
    let Some(c) = credentials::get(conn, id).await? else {
        return Ok(None);
    };
    Ok(
        credentials::newer_activated(conn, &c.user_name, c.generation)
            .await?
            .map(|(newer, newer_serial)| Overtaken {
                user: c.user_name,
                generation: c.generation,
                newer,
                newer_serial,
            }),
    )
}

impl Issuer<'_> {
    /// Abandons an overtaken attempt: its signer objects deleted, its journal
    /// row and pending credential ended with the reason, and an audit event
    /// saying why. Returns the error its command reports.
    pub(crate) async fn abandon_overtaken(
        &self,
        id: &str,
        o: &Overtaken,
        actor: &str,
    ) -> IssueError {
        if let Err(e) = self.signer.cleanup(id).await {
            warn!(credential = %id, error = %e, "could not delete the CSR object; the next command for the user or the next reconcile removes it");
        }
        let reason = o.reason();
        let res: Result<(), StoreError> = async {
            let now = self.clock.now();
            let mut tx = self.store.begin().await?;
            if !crate::store::issuances::set_step(&mut tx, id, Step::Abandoned, Some(&reason), now)
                .await?
            {
                return Ok(()); // another process ended it first, and audited that
            }
            if credentials::get(&mut tx, id)
                .await?
                .is_some_and(|c| c.state == "pending")
            {
                credentials::set_state(&mut tx, id, "failed", Some(&reason), now).await?;
            }
            audit::append(
                &mut tx,
                now,
                actor,
                "issuance.abandon",
                &o.user,
                json!({"credential": id, "generation": o.generation, "reason": reason,
                       "newer_generation": o.newer, "newer_serial": o.newer_serial}),
            )
            .await?;
            crate::store::commit(tx).await
        }
        .await;
        if let Err(e) = res {
            warn!(credential = %id, error = %e, "could not record the abandoned issuance; the next attempt for the user abandons it");
        }
        warn!(user = %o.user, credential = %id, generation = o.generation, newer = o.newer, "abandoned an issuance a newer generation overtook");
        IssueError::Overtaken {
            user: o.user.clone(),
            generation: o.generation,
            newer: o.newer,
            newer_serial: o.newer_serial.clone(),
        }
    }
}
