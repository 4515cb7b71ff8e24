//! The `authorization.k8s.io/v1` SubjectAccessReview as kube-apiserver's webhook
//! authorizer sends it, and the answers. Parsing never panics, whatever the
//! bytes; anything that is not a v1 SubjectAccessReview is a `BadReview` (400).
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

pub const API_VERSION: &str = "authorization.k8s.io/v1";
pub const KIND: &str = "SubjectAccessReview";
/// The key of `spec.extra` that names the credential a request authenticated
/// with (Kubernetes 1.32+; facts 28): `X509SHA256=<hex>` for a client certificate.
pub const CREDENTIAL_ID_EXTRA: &str = "authentication.kubernetes.io/credential-id";
/// A review from the API server is a few hundred bytes to a few KiB (groups and
/// extras); anything larger is refused unread past this.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// What the webhook reads of a review's `spec`. Unknown fields are ignored: the
/// API server adds attributes (field and label selectors) over releases.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReviewSpec {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub resource_attributes: Option<ResourceAttributes>,
    #[serde(default)]
    pub non_resource_attributes: Option<NonResourceAttributes>,
}

/// For log lines only: the decision never depends on what is asked, only on who asks.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct ResourceAttributes {
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub verb: String,
    #[serde(default)]
    pub resource: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct NonResourceAttributes {
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub verb: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    api_version: Option<String>,
    kind: Option<String>,
    spec: Option<ReviewSpec>,
}

impl ReviewSpec {
    /// The SHA-256 (lowercase hex) of the client certificate the request
    /// authenticated with, when the API server says so. Other credential ids
    /// (`JTI=` of service-account tokens) are not certificates: `None`.
    pub fn certificate_sha256(&self) -> Option<String> {
        let values = self
            .extra
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(CREDENTIAL_ID_EXTRA))?
            .1;
        values.iter().find_map(|v| {
            let hex = v.strip_prefix("X509SHA256=")?;
            (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| hex.to_ascii_lowercase())
        })
    }

    /// "get pods in team-a", for logs.
    pub fn what(&self) -> String {
        if let Some(r) = &self.resource_attributes {
            let ns = if r.namespace.is_empty() {
                String::new()
            } else {
                format!(" in {}", r.namespace)
            };
            format!("{} {}{ns}", r.verb, r.resource)
        } else if let Some(n) = &self.non_resource_attributes {
            format!("{} {}", n.verb, n.path)
        } else {
            String::new()
        }
    }
}

/// Why a body is not a review this webhook answers: a 400 with a Status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadReview {
    pub message: String,
}

fn bad(message: impl Into<String>) -> BadReview {
    BadReview {
        message: message.into(),
    }
}

/// Parses a request body. Checks the envelope first, so a v1beta1 review is
/// told to change its version rather than half-read.
pub fn parse(body: &[u8]) -> Result<ReviewSpec, BadReview> {
    if body.len() > MAX_BODY_BYTES {
        return Err(too_large(body.len()));
    }
    let env: Envelope = serde_json::from_slice(body).map_err(|e| {
        // serde's message names a line and column; it may quote a little of the
        // input, which for a review is names, never secrets. Kept short anyway.
        let mut m = e.to_string();
        m.truncate(200);
        bad(format!("the body is not a JSON SubjectAccessReview: {m}"))
    })?;
    match env.api_version.as_deref() {
        Some(API_VERSION) => {}
        other => {
            return Err(bad(format!(
                "apiVersion {other:?} is not {API_VERSION:?}; set subjectAccessReviewVersion: v1 (and matchConditionSubjectAccessReviewVersion: v1) in the AuthorizationConfiguration"
            )));
        }
    }
    if env.kind.as_deref() != Some(KIND) {
        return Err(bad(format!(
            "kind {:?} is not {KIND:?}",
            env.kind.as_deref().unwrap_or_default()
        )));
    }
    let spec = env
        .spec
        .ok_or_else(|| bad("the SubjectAccessReview has no spec"))?;
    if spec.user.is_empty() && spec.groups.is_empty() {
        return Err(bad("the SubjectAccessReview names no user and no group"));
    }
    Ok(spec)
}

pub fn too_large(len: usize) -> BadReview {
    bad(format!(
        "the body ({len} bytes or more) is larger than the {MAX_BODY_BYTES} bytes a SubjectAccessReview may have"
    ))
}

/// The answer to a review. `denied: true` ends the API server's authorizer
/// chain; `allowed: false, denied: false` is no opinion. Never `allowed: true`.
pub fn answer(denied: bool, reason: Option<&str>) -> Value {
    let mut status = json!({ "allowed": false });
    if denied {
        status["denied"] = json!(true);
    }
    if let Some(r) = reason {
        status["reason"] = json!(r);
    }
    json!({ "apiVersion": API_VERSION, "kind": KIND, "status": status })
}

/// A `meta.k8s.io/v1` Status, as the API server's own errors are.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(spec: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": KIND, "spec": spec})).unwrap()
    }

    #[test]
    fn reads_a_review_as_kube_apiserver_sends_it() {
        let fp = "AB".repeat(32);
        let body = review(json!({
            "resourceAttributes": {"namespace": "team-a", "verb": "get", "group": "", "version": "v1", "resource": "pods"},
            "user": "alice",
            "groups": ["dev", "rotator:alice:3.0123456789ab", "system:authenticated"],
            "extra": {"authentication.kubernetes.io/credential-id": [format!("X509SHA256={fp}")]},
            "uid": "",
            "someFutureField": {"x": 1}
        }));
        let spec = parse(&body).unwrap();
        assert_eq!(spec.user, "alice");
        assert_eq!(spec.groups.len(), 3);
        assert_eq!(spec.certificate_sha256(), Some(fp.to_ascii_lowercase()));
        assert_eq!(spec.what(), "get pods in team-a");
    }

    #[test]
    fn only_a_well_formed_x509_credential_id_names_a_certificate() {
        for v in [
            "JTI=abc".to_string(),
            "X509SHA256=abc".to_string(),
            format!("X509SHA256={}", "g".repeat(64)),
            format!("x509sha256={}", "a".repeat(64)),
        ] {
            let spec = parse(&review(
                json!({"user": "u", "extra": {CREDENTIAL_ID_EXTRA: [v]}}),
            ))
            .unwrap();
            assert_eq!(spec.certificate_sha256(), None);
        }
    }

    #[test]
    fn bad_bodies_are_refused_with_what_was_wrong() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{not json".to_vec(), "not a JSON"),
            (b"".to_vec(), "not a JSON"),
            (b"[1,2]".to_vec(), "not a JSON"),
            (
                serde_json::to_vec(&json!({"apiVersion": "authorization.k8s.io/v1beta1", "kind": KIND, "spec": {"user": "u"}})).unwrap(),
                "subjectAccessReviewVersion: v1",
            ),
            (
                serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": "TokenReview", "spec": {"user": "u"}})).unwrap(),
                "kind \"TokenReview\"",
            ),
            (serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": KIND})).unwrap(), "no spec"),
            (review(json!({})), "no user"),
            (review(json!({"user": "u", "groups": "dev"})), "not a JSON"),
            (vec![b' '; MAX_BODY_BYTES + 1], "larger than"),
        ];
        for (body, want) in cases {
            let e = parse(&body).unwrap_err();
            assert!(e.message.contains(want), "{want:?} not in {:?}", e.message);
        }
    }

    #[test]
    fn answers_never_allow() {
        let d = answer(true, Some("revoked"));
        assert_eq!(
            d["status"],
            json!({"allowed": false, "denied": true, "reason": "revoked"})
        );
        assert_eq!(answer(false, None)["status"], json!({"allowed": false}));
        assert_eq!(d["apiVersion"], API_VERSION);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse(&body);
        }

        #[test]
        fn any_json_spec_parses_or_fails_without_panicking(user in ".{0,20}", groups in proptest::collection::vec(".{0,30}", 0..5), id in ".{0,80}") {
            let body = review(json!({"user": user, "groups": groups, "extra": {CREDENTIAL_ID_EXTRA: [id]}}));
            if let Ok(s) = parse(&body) {
                let _ = s.certificate_sha256();
            }
        }
    }
}
