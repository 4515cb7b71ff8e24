//! The decision: who a review's request is, in rotator's eyes, and whether
//! rotator refuses it. Pure: a snapshot, a review, a time and the rules in;
//! a verdict out. rotator never allows: at most it has no opinion and RBAC decides.
//!
//! **What counts as a rotator identity of this instance** (everything else gets
//! no opinion, so certificates made outside rotator, service accounts and other
//! tokens are never affected):
//! 1. the request's `credential-id` extra names (`X509SHA256=`) a certificate
//!    this database recorded: decided by that exact certificate; or
//! 2. one of its groups is a generation group `rotator:USER:GEN[.SUFFIX]` whose
//!    USER is a user in this database, in any state (removed users stay known):
//!    a certificate this database does not know that carries such a group was
//!    never stored by rotator (an abandoned issuance, a database restored from
//!    an older backup, or a signature made outside rotator) and is refused.
//!
//! A generation group of a user this database never had belongs to another
//! rotator instance sharing the cluster, or to a database this one replaced:
//! no opinion, unless `authz.deny_unknown_users` (one rotator per cluster).
use crate::daemon::authz::review::ReviewSpec;
use crate::daemon::authz::snapshot::{Cred, CredState, Snapshot, UserState};
use crate::policy::{GENERATION_GROUP_PREFIX, parse_generation_group};
use crate::support::clock::rfc3339;

/// The settings a decision depends on (from the running configuration).
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// How long a superseded credential keeps working (`rotation.grace_period`).
    pub grace_seconds: i64,
    /// Refuse generation groups of users this database does not know.
    pub deny_unknown_users: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `allowed: false, denied: false`: the next authorizer (RBAC) decides.
    NoOpinion,
    /// `denied: true`, with a reason for the API server's log and the user.
    Deny(String),
}

/// A verdict, why (a bounded metric label) and the credential it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub why: &'static str,
    pub credential: Option<String>,
}

impl Decision {
    fn none(why: &'static str, c: Option<&Cred>) -> Self {
        Self {
            verdict: Verdict::NoOpinion,
            why,
            credential: c.map(|c| c.id.clone()),
        }
    }

    fn deny(why: &'static str, c: Option<&Cred>, reason: String) -> Self {
        Self {
            verdict: Verdict::Deny(reason),
            why,
            credential: c.map(|c| c.id.clone()),
        }
    }

    pub fn denied(&self) -> bool {
        matches!(self.verdict, Verdict::Deny(_))
    }
}

/// The user and generation a `rotator:` group names, whichever user asks.
fn generation_group_owner(group: &str) -> Option<&str> {
    let rest = group.strip_prefix(GENERATION_GROUP_PREFIX)?;
    let (user, _) = rest.rsplit_once(':')?;
    parse_generation_group(user, group).map(|_| user)
}

fn describe(c: &Cred) -> String {
    format!(
        "rotator credential {} (generation {} of user {:?}, serial {}, certificate SHA-256 {})",
        c.id, c.generation, c.user, c.serial, c.fingerprint
    )
}

/// Judges one known credential.
fn judge(snap: &Snapshot, c: &Cred, now: i64, rules: Rules) -> Decision {
    let who = describe(c);
    let since = |t: i64| rfc3339(t);
    let because = c
        .state_reason
        .as_deref()
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    match c.state {
        CredState::Revoked => {
            return Decision::deny(
                "revoked",
                Some(c),
                format!("{who} was revoked at {}{because}", since(c.state_at)),
            );
        }
        CredState::Failed => {
            return Decision::deny(
                "failed",
                Some(c),
                format!(
                    "{who} belongs to an issuance that ended unfinished at {}{because}",
                    since(c.state_at)
                ),
            );
        }
        CredState::Expired => {
            return Decision::deny(
                "expired",
                Some(c),
                format!("{who} expired at {}", since(c.not_after)),
            );
        }
        _ => {}
    }
    if c.not_after <= now {
        return Decision::deny(
            "expired",
            Some(c),
            format!("{who} expired at {}", since(c.not_after)),
        );
    }
    match snap.user(&c.user) {
        Some(UserState::Active) => {}
        Some(UserState::Disabled) => {
            return Decision::deny(
                "user_disabled",
                Some(c),
                format!("{who}: the user is disabled"),
            );
        }
        Some(UserState::Removed) | None => {
            return Decision::deny(
                "user_removed",
                Some(c),
                format!("{who}: the user was removed"),
            );
        }
    }
    match c.state {
        CredState::Superseded => {
            let end = c.state_at.saturating_add(rules.grace_seconds);
            if now < end {
                Decision::none("within_grace", Some(c))
            } else {
                Decision::deny(
                    "superseded",
                    Some(c),
                    format!(
                        "{who} was superseded at {} and its grace period ended at {}",
                        since(c.state_at),
                        since(end)
                    ),
                )
            }
        }
        CredState::Pending => Decision::none("pending", Some(c)),
        _ => Decision::none("current", Some(c)),
    }
}

/// The decision for one review.
pub fn decide(snap: &Snapshot, spec: &ReviewSpec, now: i64, rules: Rules) -> Decision {
    let fingerprint = spec.certificate_sha256();
    if let Some(fp) = &fingerprint
        && let Some(c) = snap.by_fingerprint(fp)
    {
        if c.user != spec.user {
            return Decision::deny(
                "mismatch",
                Some(c),
                format!(
                    "{} was presented for user {:?}, not its own",
                    describe(c),
                    spec.user
                ),
            );
        }
        return judge(snap, c, now, rules);
    }
    // Not a certificate rotator recorded (or no certificate named): decided by
    // the generation groups of users this instance knows.
    let ours = |owner: &str| rules.deny_unknown_users || snap.user(owner).is_some();
    let mut last = None;
    for group in &spec.groups {
        let Some(owner) = generation_group_owner(group) else {
            continue;
        };
        if !ours(owner) {
            continue;
        }
        if let Some(fp) = &fingerprint {
            // The API server named the certificate, and it is none of ours,
            // yet it carries one of our users' generation groups.
            return Decision::deny(
                "unknown_certificate",
                None,
                format!(
                    "the certificate SHA-256 {fp} carries rotator generation group {group:?} of user {owner:?} but rotator never recorded it (unknown to rotator)"
                ),
            );
        }
        let Some(c) = snap.by_group(group) else {
            return Decision::deny(
                "unknown_generation",
                None,
                format!(
                    "rotator generation group {group:?} of user {owner:?} names no credential rotator recorded (unknown to rotator)"
                ),
            );
        };
        if owner != spec.user {
            return Decision::deny(
                "mismatch",
                Some(c),
                format!(
                    "{} has its generation group in a request of user {:?}",
                    describe(c),
                    spec.user
                ),
            );
        }
        let d = judge(snap, c, now, rules);
        if d.denied() {
            return d;
        }
        last = Some(d);
    }
    // Every generation group judged and none refused.
    last.unwrap_or_else(|| Decision::none("not_rotator", None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::authz::review::CREDENTIAL_ID_EXTRA;
    use crate::daemon::authz::snapshot::tests::row;
    use crate::store::changes::{Changes, UserRow};

    const NOW: i64 = 1_500_000_000;
    const RULES: Rules = Rules {
        grace_seconds: 600,
        deny_unknown_users: false,
    };

    fn user(name: &str, state: &str) -> UserRow {
        UserRow {
            name: name.into(),
            state: state.into(),
            change_seq: 1,
        }
    }

    /// alice: gen 1 revoked, gen 2 superseded 5 min ago, gen 3 current, gen 4
    /// superseded an hour ago; bob (removed): gen 1; carol (disabled): gen 1.
    fn snapshot() -> Snapshot {
        let mut rows = vec![
            row("a1", "alice", 1, "revoked"),
            row("a2", "alice", 2, "superseded"),
            row("a3", "alice", 3, "current"),
            row("a4", "alice", 4, "superseded"),
            row("b1", "bob", 1, "current"),
            row("c1", "carol", 1, "current"),
            row("d1", "dave", 1, "current"),
        ];
        rows[0].state_reason = Some("laptop stolen".into());
        rows[0].state_at = NOW - 60;
        rows[1].state_at = NOW - 300;
        rows[3].state_at = NOW - 3600;
        rows[6].not_after = NOW - 1;
        let mut s = Snapshot::default();
        s.apply(
            Changes {
                credentials: rows,
                users: vec![
                    user("alice", "active"),
                    user("bob", "removed"),
                    user("carol", "disabled"),
                    user("dave", "active"),
                ],
                seq: 1,
            },
            true,
        );
        s
    }

    fn spec(user: &str, groups: &[&str], cert_of: Option<&str>) -> ReviewSpec {
        let mut s = ReviewSpec {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        };
        if let Some(id) = cert_of {
            let fp = crate::pki::hex(&crate::pki::sha256(id.as_bytes()));
            s.extra
                .insert(CREDENTIAL_ID_EXTRA.into(), vec![format!("X509SHA256={fp}")]);
        }
        s
    }

    fn g(user: &str, generation: i64) -> String {
        format!("rotator:{user}:{generation}.0123456789ab")
    }

    #[test]
    fn by_certificate_each_state_gets_its_verdict() {
        let s = snapshot();
        let cases = [
            ("alice", "a1", "revoked", true),
            ("alice", "a2", "within_grace", false),
            ("alice", "a3", "current", false),
            ("alice", "a4", "superseded", true),
            ("bob", "b1", "user_removed", true),
            ("carol", "c1", "user_disabled", true),
            ("dave", "d1", "expired", true),
        ];
        for (u, id, why, denied) in cases {
            let d = decide(&s, &spec(u, &["dev"], Some(id)), NOW, RULES);
            assert_eq!((d.why, d.denied()), (why, denied), "{id}");
            assert_eq!(d.credential.as_deref(), Some(id));
            if let Verdict::Deny(r) = &d.verdict {
                assert!(r.contains(id) && r.contains("SHA-256"), "{r}");
            }
        }
        let Verdict::Deny(r) = decide(&s, &spec("alice", &[], Some("a1")), NOW, RULES).verdict
        else {
            panic!()
        };
        assert!(
            r.contains("revoked at") && r.contains("laptop stolen"),
            "{r}"
        );
    }

    #[test]
    fn the_certificate_decides_not_the_groups_it_is_sent_with() {
        let s = snapshot();
        // The revoked certificate with the current generation's group (an
        // impersonation header, say) is still the revoked certificate.
        let d = decide(
            &s,
            &spec("alice", &[&g("alice", 3)], Some("a1")),
            NOW,
            RULES,
        );
        assert_eq!(d.why, "revoked");
        // And the current one is not refused for another's group it does not carry.
        let d = decide(
            &s,
            &spec("alice", &[&g("alice", 1)], Some("a3")),
            NOW,
            RULES,
        );
        assert_eq!(d.why, "current");
        // A certificate of alice's sent for bob's name.
        let d = decide(&s, &spec("bob", &[], Some("a3")), NOW, RULES);
        assert_eq!(d.why, "mismatch");
    }

    #[test]
    fn without_a_credential_id_the_generation_group_decides() {
        let s = snapshot();
        for (groups, why, denied) in [
            (vec![g("alice", 1)], "revoked", true),
            (vec![g("alice", 3)], "current", false),
            (vec![g("alice", 2)], "within_grace", false),
            (vec![g("alice", 4)], "superseded", true),
            (
                vec!["rotator:alice:4".to_string()],
                "unknown_generation",
                true,
            ),
            (vec![g("alice", 9)], "unknown_generation", true),
            (vec![g("alice", 3), g("alice", 1)], "revoked", true),
            (vec![g("bob", 1)], "mismatch", true),
        ] {
            let gs: Vec<&str> = groups.iter().map(String::as_str).collect();
            let d = decide(&s, &spec("alice", &gs, None), NOW, RULES);
            assert_eq!((d.why, d.denied()), (why, denied), "{groups:?}");
        }
    }

    #[test]
    fn a_certificate_rotator_never_recorded_with_a_known_users_group_is_refused() {
        let s = snapshot();
        let d = decide(
            &s,
            &spec("alice", &[&g("alice", 3)], Some("forged")),
            NOW,
            RULES,
        );
        assert_eq!((d.why, d.denied()), ("unknown_certificate", true));
    }

    #[test]
    fn identities_rotator_does_not_know_get_no_opinion() {
        let s = snapshot();
        let cases = [
            // A certificate made outside rotator, for a rotator user's name and static group.
            spec(
                "alice",
                &["dev", "system:authenticated"],
                Some("kubeadm-made"),
            ),
            // No credential id at all (a token, an older API server).
            spec("alice", &["dev"], None),
            spec(
                "system:serviceaccount:ns:sa",
                &["system:serviceaccounts"],
                None,
            ),
            // Another instance's user.
            spec("zoe", &[&g("zoe", 1)], Some("other-instance")),
            // Look-alikes that are not generation groups.
            spec(
                "alice",
                &["rotator:alice", "rotator:alice:x", "rotator:alice:0"],
                None,
            ),
        ];
        for sp in cases {
            let d = decide(&s, &sp, NOW, RULES);
            assert_eq!((d.why, d.denied()), ("not_rotator", false), "{sp:?}");
        }
        let claim_all = Rules {
            deny_unknown_users: true,
            ..RULES
        };
        let d = decide(&s, &spec("zoe", &[&g("zoe", 1)], None), NOW, claim_all);
        assert_eq!(d.why, "unknown_generation");
    }

    #[test]
    fn grace_ends_exactly_at_its_end() {
        let s = snapshot();
        let at = |now| decide(&s, &spec("alice", &[], Some("a2")), now, RULES).why;
        assert_eq!(at(NOW - 300 + 599), "within_grace");
        assert_eq!(at(NOW - 300 + 600), "superseded");
    }
}
