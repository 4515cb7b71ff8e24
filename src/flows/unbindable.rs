//! A user's bindings in namespaces that no longer exist (someone deleted the
//! namespace the user's specification names). Nothing is granted there, so it
//! holds nobody's access back; it is a finding: `rotator doctor` lists it
//! ("user bindings"), the gauge `rotator_bindings_namespace_missing` counts it,
//! and the daemon logs one WARN when a user's set changes, not one per pass.
use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::gauge::Gauge;

#[derive(Debug, Default)]
pub struct Unbindable {
    by_user: Mutex<BTreeMap<String, Vec<String>>>,
    gauge: Gauge,
}

impl Unbindable {
    pub fn gauge(&self) -> Gauge {
        self.gauge.clone()
    }

    /// Records what a sync of `user` found (`bindings` empty: nothing missing).
    /// True when that differs from what the last sync of the user found.
    pub fn note(&self, user: &str, mut bindings: Vec<String>) -> bool {
        bindings.sort();
        let mut by_user = self.by_user.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match by_user.get(user) {
            Some(had) => *had != bindings,
            None => !bindings.is_empty(),
        };
        if bindings.is_empty() {
            by_user.remove(user);
        } else {
            by_user.insert(user.to_string(), bindings);
        }
        let total: usize = by_user.values().map(Vec::len).sum();
        self.gauge.set(i64::try_from(total).unwrap_or(i64::MAX));
        changed
    }

    /// Logs the change, if the sync of `user` changed what is missing.
    pub fn report(&self, user: &str, bindings: Vec<String>) {
        let shown = bindings.join(", ");
        let now_missing = !bindings.is_empty();
        if !self.note(user, bindings) {
            return;
        }
        if now_missing {
            tracing::warn!(
                user,
                bindings = %shown,
                "the user's namespace no longer exists, so these bindings cannot be written; nothing is granted there (`rotator doctor` lists it; fix: recreate the namespace, or remove-user and add-user with other namespaces)"
            );
        } else {
            tracing::info!(user, "every binding of the user can be written again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_noted_once_and_the_gauge_counts_bindings() {
        let u = Unbindable::default();
        assert!(!u.note("alice", vec![]));
        assert!(u.note("alice", vec!["gone/rotator-alice".into()]));
        assert!(!u.note("alice", vec!["gone/rotator-alice".into()]));
        assert!(u.note("bob", vec!["b/x".into(), "a/x".into()]));
        assert!(!u.note("bob", vec!["a/x".into(), "b/x".into()]));
        assert_eq!(u.gauge().get(), 3);
        assert!(u.note("alice", vec![]));
        assert_eq!(u.gauge().get(), 2);
    }
}
