//! The credential and user states the webhook answers from, in memory, so a
//! decision costs a few hash lookups and keeps working while the cluster, Vault
//! or even the database is unavailable. Kept current by `refresh` ("what
//! changed since", migration 0013's counter), which the server runs on each
//! commit of its own process and at least every `authz.refresh_interval`.
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::store::changes::{Changes, CredentialRow, UserRow};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredState {
    Pending,
    Current,
    Superseded,
    Revoked,
    Expired,
    Failed,
}

impl CredState {
    fn parse(s: &str) -> Self {
        match s {
            "pending" => Self::Pending,
            "current" => Self::Current,
            "superseded" => Self::Superseded,
            "revoked" => Self::Revoked,
            "expired" => Self::Expired,
            // A state this binary does not know grants nothing.
            _ => Self::Failed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserState {
    Active,
    Disabled,
    Removed,
}

impl UserState {
    fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "disabled" => Self::Disabled,
            _ => Self::Removed,
        }
    }
}

/// One credential as the webhook judges it.
#[derive(Debug, Clone)]
pub struct Cred {
    pub id: String,
    pub user: String,
    pub generation: i64,
    pub serial: String,
    pub fingerprint: String,
    pub group: String,
    pub not_after: i64,
    pub state: CredState,
    pub state_at: i64,
    pub state_reason: Option<String>,
}

impl Cred {
    fn from_row(r: CredentialRow) -> Self {
        let group = r
            .generation_group
            .clone()
            .unwrap_or_else(|| crate::policy::legacy_generation_group(&r.user_name, r.generation));
        Self {
            group,
            id: r.id,
            user: r.user_name,
            generation: r.generation,
            serial: r.serial,
            fingerprint: r.fingerprint.to_ascii_lowercase(),
            not_after: r.not_after,
            state: CredState::parse(&r.state),
            state_at: r.state_at,
            // A reason is an operator's words: kept short in answers.
            state_reason: r.state_reason.map(|mut s| {
                if s.len() > 200 {
                    let mut cut = 200;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                }
                s
            }),
        }
    }
}

/// The states, indexed the three ways a review names a credential.
#[derive(Debug, Default)]
pub struct Snapshot {
    creds: Vec<Cred>,
    by_id: HashMap<String, usize>,
    by_fingerprint: HashMap<[u8; 32], usize>,
    by_group: HashMap<String, usize>,
    users: HashMap<String, UserState>,
    /// The change counter last applied; `None` until the first full load.
    seq: Option<i64>,
}

fn fingerprint_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Snapshot {
    /// Applies one read (a full one replaces everything).
    pub fn apply(&mut self, changes: Changes, full: bool) {
        if full {
            *self = Snapshot::default();
        }
        for u in changes.users {
            let UserRow { name, state, .. } = u;
            self.users.insert(name, UserState::parse(&state));
        }
        for row in changes.credentials {
            let c = Cred::from_row(row);
            let idx = match self.by_id.get(&c.id) {
                Some(&i) => {
                    let old = &self.creds[i];
                    if let Some(k) = fingerprint_key(&old.fingerprint) {
                        self.by_fingerprint.remove(&k);
                    }
                    self.by_group.remove(&old.group);
                    self.creds[i] = c;
                    i
                }
                None => {
                    self.creds.push(c);
                    let i = self.creds.len() - 1;
                    self.by_id.insert(self.creds[i].id.clone(), i);
                    i
                }
            };
            let c = &self.creds[idx];
            if let Some(k) = fingerprint_key(&c.fingerprint) {
                self.by_fingerprint.insert(k, idx);
            }
            self.by_group.insert(c.group.clone(), idx);
        }
        self.seq = Some(changes.seq);
    }

    pub fn loaded(&self) -> bool {
        self.seq.is_some()
    }

    pub fn seq(&self) -> Option<i64> {
        self.seq
    }

    pub fn len(&self) -> usize {
        self.creds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.creds.is_empty()
    }

    pub fn by_fingerprint(&self, hex: &str) -> Option<&Cred> {
        self.by_fingerprint
            .get(&fingerprint_key(hex)?)
            .map(|&i| &self.creds[i])
    }

    pub fn by_group(&self, group: &str) -> Option<&Cred> {
        self.by_group.get(group).map(|&i| &self.creds[i])
    }

    pub fn user(&self, name: &str) -> Option<UserState> {
        self.users.get(name).copied()
    }
}

/// The snapshot shared by the server's connections and its refresher. Readers
/// hold the lock for one decision (microseconds); the refresher for applying
/// what one read returned.
#[derive(Debug, Default)]
pub struct Shared {
    inner: RwLock<Snapshot>,
    /// When the states last matched the database (a refresh that succeeded,
    /// changes or not); `None` until the first.
    fresh_at: Mutex<Option<Instant>>,
}

/// What one refresh did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    Unchanged,
    Changed { credentials: usize, users: usize },
    Full { credentials: usize },
}

impl Shared {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        // A panic while holding the lock cannot leave a half-applied change
        // worse than a stale one; keep answering.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the snapshot with rows built elsewhere (benchmarks, tests).
    pub fn replace(&self, changes: Changes) {
        self.write().apply(changes, true);
        self.mark_fresh(Instant::now());
    }

    fn mark_fresh(&self, at: Instant) {
        *self.fresh_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// When the states last matched the database; `None` before the first read.
    pub fn fresh_at(&self) -> Option<Instant> {
        *self.fresh_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long since the states last matched the database; `None` before the first read.
    pub fn age(&self) -> Option<Duration> {
        self.fresh_at().map(|t| t.elapsed())
    }

    /// Reads what changed since the last refresh and applies it. A counter that
    /// went backwards (the database was restored or replaced) means a full load.
    pub async fn refresh(&self, store: &Store) -> Result<Refreshed, StoreError> {
        // The states match the database as of when the read began.
        let started = Instant::now();
        let have = self.read().seq();
        let now = crate::store::changes::seq(store).await?;
        let full = match have {
            Some(h) if now == h => {
                self.mark_fresh(started);
                return Ok(Refreshed::Unchanged);
            }
            Some(h) => now < h,
            None => true,
        };
        let changes = crate::store::changes::since(store, if full { None } else { have }).await?;
        let r = if full {
            Refreshed::Full {
                credentials: changes.credentials.len(),
            }
        } else {
            Refreshed::Changed {
                credentials: changes.credentials.len(),
                users: changes.users.len(),
            }
        };
        self.write().apply(changes, full);
        self.mark_fresh(started);
        Ok(r)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn row(id: &str, user: &str, generation: i64, state: &str) -> CredentialRow {
        CredentialRow {
            id: id.into(),
            user_name: user.into(),
            generation,
            serial: format!("{generation:02x}"),
            fingerprint: crate::pki::hex(&crate::pki::sha256(id.as_bytes())),
            not_after: 2_000_000_000,
            state: state.into(),
            state_reason: None,
            state_at: 1_000,
            generation_group: Some(format!("rotator:{user}:{generation}.0123456789ab")),
            change_seq: 1,
        }
    }

    #[test]
    fn a_change_replaces_the_row_and_its_indexes() {
        let mut s = Snapshot::default();
        s.apply(
            Changes {
                credentials: vec![row("c1", "alice", 1, "current")],
                users: vec![UserRow {
                    name: "alice".into(),
                    state: "active".into(),
                    change_seq: 1,
                }],
                seq: 1,
            },
            true,
        );
        let fp = s
            .by_group("rotator:alice:1.0123456789ab")
            .unwrap()
            .fingerprint
            .clone();
        assert_eq!(s.by_fingerprint(&fp.to_ascii_uppercase()).unwrap().id, "c1");
        let mut r = row("c1", "alice", 1, "revoked");
        r.change_seq = 2;
        s.apply(
            Changes {
                credentials: vec![r],
                users: vec![],
                seq: 2,
            },
            false,
        );
        assert_eq!(s.len(), 1);
        assert_eq!(s.by_fingerprint(&fp).unwrap().state, CredState::Revoked);
        assert_eq!(s.user("alice"), Some(UserState::Active));
        assert_eq!(s.seq(), Some(2));
    }

    #[test]
    fn a_legacy_credential_is_found_by_its_group_without_suffix() {
        let mut s = Snapshot::default();
        let mut r = row("c1", "bob", 4, "current");
        r.generation_group = None;
        s.apply(
            Changes {
                credentials: vec![r],
                users: vec![],
                seq: 1,
            },
            true,
        );
        assert_eq!(s.by_group("rotator:bob:4").unwrap().id, "c1");
    }
}
