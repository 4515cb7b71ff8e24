//! What an API server's `AuthorizationConfiguration` (facts 29) means for
//! rotator's webhook: whether it is asked at all, before RBAC, for rotator's
//! identities, what happens while it is down, and the revocation latency its
//! cache TTLs imply. `rotator doctor` reports it.
use std::time::Duration;

use serde_json::Value;

/// The API server's default `unauthorizedTTL` when a webhook sets none.
pub const DEFAULT_UNAUTHORIZED_TTL: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setup {
    /// Everything is as rotator needs it.
    pub ok: bool,
    /// One sentence per finding, the problems first.
    pub notes: Vec<String>,
    /// How long a revocation made by another process may take to refuse a
    /// request the API server already answered from its cache.
    pub latency: Option<Duration>,
}

fn duration(v: &Value) -> Option<Duration> {
    v.as_str().and_then(|s| {
        // Go durations ("5s", "1m30s", "300ms") read as humantime's, without spaces.
        humantime::parse_duration(s).ok()
    })
}

/// Judges an AuthorizationConfiguration (YAML or JSON text).
pub fn inspect(text: &str, refresh: Duration) -> Result<Setup, String> {
    let doc: Value = serde_saphyr::from_str(text)
        .map_err(|e| format!("not an AuthorizationConfiguration: {e}"))?;
    if doc["kind"] != "AuthorizationConfiguration" {
        return Err(format!(
            "kind {} is not AuthorizationConfiguration",
            doc["kind"]
        ));
    }
    let authorizers = doc["authorizers"].as_array().cloned().unwrap_or_default();
    let rbac_at = authorizers.iter().position(|a| a["type"] == "RBAC");
    // The webhook that sends rotator's identities: its match conditions name
    // the `rotator:` prefix (or it has none, and is asked about everything).
    let rotator_at = authorizers.iter().position(|a| {
        if a["type"] != "Webhook" {
            return false;
        }
        let conds = a["webhook"]["matchConditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        conds.is_empty()
            || conds.iter().any(|c| {
                c["expression"]
                    .as_str()
                    .is_some_and(|e| e.contains("'rotator:'") || e.contains("\"rotator:\""))
            })
    });
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let Some(at) = rotator_at else {
        return Ok(Setup {
            ok: false,
            notes: vec![
                "no Webhook authorizer is asked about rotator identities (none matches groups starting with 'rotator:'): revoked certificates keep what other bindings grant; fix: add deploy/authz/authorization-config.yaml's webhook".into(),
            ],
            latency: None,
        });
    };
    let w = &authorizers[at]["webhook"];
    let name = authorizers[at]["name"].as_str().unwrap_or("?").to_string();
    match rbac_at {
        Some(r) if r < at => problems.push(format!(
            "webhook {name:?} comes after RBAC: RBAC allows before rotator is asked, so a revocation takes nothing away; fix: list it before RBAC"
        )),
        _ => notes.push(format!("webhook {name:?} is asked before RBAC")),
    }
    if w["matchConditions"].as_array().is_none_or(|c| c.is_empty()) {
        notes.push(format!(
            "webhook {name:?} has no matchConditions: every request waits for rotator, and with failurePolicy Deny every identity is refused while rotator is down; fix: add request.groups.exists(g, g.startsWith('rotator:'))"
        ));
    }
    match w["failurePolicy"].as_str() {
        Some("Deny") => notes.push(
            "failurePolicy Deny: while rotator is unreachable, only rotator identities are refused"
                .into(),
        ),
        other => problems.push(format!(
            "failurePolicy {}: while rotator is unreachable, a revoked certificate keeps what other bindings grant; fix: failurePolicy: Deny",
            other.unwrap_or("NoOpinion (the default)")
        )),
    }
    if w["subjectAccessReviewVersion"] != "v1" {
        problems.push(format!(
            "subjectAccessReviewVersion {} is not v1; fix: subjectAccessReviewVersion: v1",
            w["subjectAccessReviewVersion"]
        ));
    }
    let ttl = match &w["unauthorizedTTL"] {
        Value::Null => DEFAULT_UNAUTHORIZED_TTL,
        v => duration(v).ok_or_else(|| format!("unauthorizedTTL {v} is not a duration"))?,
    };
    let latency = ttl + refresh;
    notes.push(format!(
        "a revocation refuses its certificate within {} (unauthorizedTTL {} + refresh {}; rotator never allows, so authorizedTTL caches nothing)",
        humantime::format_duration(latency),
        humantime::format_duration(ttl),
        humantime::format_duration(refresh),
    ));
    let ok = problems.is_empty();
    problems.extend(notes);
    Ok(Setup {
        ok,
        notes: problems,
        latency: Some(latency),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../../deploy/authz/authorization-config.yaml");

    #[test]
    fn the_shipped_configuration_is_what_rotator_needs() {
        let s = inspect(SHIPPED, Duration::from_secs(1)).unwrap();
        assert!(s.ok, "{s:?}");
        assert_eq!(s.latency, Some(Duration::from_secs(6)));
    }

    #[test]
    fn a_webhook_after_rbac_or_without_deny_is_a_problem() {
        let after = SHIPPED.replace("  - type: RBAC\n    name: rbac\n", "");
        let after = after.replace(
            "authorizers:\n",
            "authorizers:\n  - type: RBAC\n    name: rbac\n",
        );
        let s = inspect(&after, Duration::from_secs(1)).unwrap();
        assert!(!s.ok && s.notes[0].contains("after RBAC"), "{s:?}");
        let lax = SHIPPED.replace("failurePolicy: Deny", "failurePolicy: NoOpinion");
        let s = inspect(&lax, Duration::from_secs(1)).unwrap();
        assert!(!s.ok && s.notes[0].contains("NoOpinion"), "{s:?}");
        let none = SHIPPED.replace("'rotator:'", "'team:'");
        let s = inspect(&none, Duration::from_secs(1)).unwrap();
        assert!(!s.ok && s.latency.is_none(), "{s:?}");
        let default_ttl = SHIPPED.replace("      unauthorizedTTL: 5s\n", "");
        let s = inspect(&default_ttl, Duration::from_secs(1)).unwrap();
        assert_eq!(s.latency, Some(Duration::from_secs(31)));
        assert!(inspect("kind: Pod\n", Duration::from_secs(1)).is_err());
    }
}
