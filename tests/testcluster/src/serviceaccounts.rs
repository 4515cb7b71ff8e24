//! The legacy service-account token controller of kube-controller-manager: a
//! Secret of type `kubernetes.io/service-account-token` whose annotation
//! `kubernetes.io/service-account.name` names a ServiceAccount of its namespace
//! is filled with a token for that account (`token`, `ca.crt`, `namespace`), and
//! such a token authenticates as the account. Anyone who may create Secrets in a
//! namespace can so mint a token for any of its service accounts; whoever can
//! then read that Secret holds the account's identity (reference/access-authn-authz/
//! service-accounts-admin, "Manually create an API token for a ServiceAccount").
use base64::Engine;
use serde_json::{Value, json};

use crate::Shared;
use crate::authn::{UserInfo, constant_time_eq};

pub const TOKEN_TYPE: &str = "kubernetes.io/service-account-token";
const NAME_ANNOTATION: &str = "kubernetes.io/service-account.name";
const UID_ANNOTATION: &str = "kubernetes.io/service-account.uid";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Fills new token Secrets; deletes those whose service account does not exist
/// (as the real controller does). Returns how many Secrets it changed.
pub fn token_controller_pass(sh: &Shared) -> usize {
    let (items, _) = sh.store.list(("", "secrets"), None);
    let mut changed = 0;
    for s in items.iter().filter(|s| s["type"] == TOKEN_TYPE) {
        let ns = s["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = s["metadata"]["name"].as_str().unwrap_or_default();
        if !s["data"]["token"].is_null() {
            continue;
        }
        let sa_name = s["metadata"]["annotations"][NAME_ANNOTATION]
            .as_str()
            .unwrap_or_default();
        let Some(sa) = sh.store.get(("", "serviceaccounts"), ns, sa_name) else {
            sh.store.delete(("", "secrets"), ns, name);
            changed += 1;
            continue;
        };
        let token = format!(
            "testcluster-sa.{}",
            crate::hex(&crate::pki::random_bytes::<24>())
        );
        let (ca, sa_uid) = (
            sh.serving_ca.cert_pem.clone(),
            sa["metadata"]["uid"].clone(),
        );
        let r = sh
            .store
            .update(("", "secrets"), ns, name, None, |cur: &Value| {
                let mut n = cur.clone();
                n["data"]["token"] = json!(b64(&token));
                n["data"]["ca.crt"] = json!(b64(&ca));
                n["data"]["namespace"] = json!(b64(ns));
                n["metadata"]["annotations"][UID_ANNOTATION] = sa_uid.clone();
                Ok(n)
            });
        if r.is_ok() {
            changed += 1;
        }
    }
    changed
}

/// The service account a bearer token from a token Secret stands for.
pub fn token_user(sh: &Shared, token: &str) -> Option<UserInfo> {
    if !token.starts_with("testcluster-sa.") {
        return None;
    }
    let want = b64(token);
    let (items, _) = sh.store.list(("", "secrets"), None);
    let s = items.iter().find(|s| {
        s["type"] == TOKEN_TYPE
            && s["data"]["token"]
                .as_str()
                .is_some_and(|t| constant_time_eq(t.as_bytes(), want.as_bytes()))
    })?;
    let ns = s["metadata"]["namespace"].as_str()?;
    let sa = s["metadata"]["annotations"][NAME_ANNOTATION].as_str()?;
    sh.store.get(("", "serviceaccounts"), ns, sa)?;
    Some(UserInfo {
        username: format!("system:serviceaccount:{ns}:{sa}"),
        uid: String::new(),
        groups: vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ],
        extra: Default::default(),
    })
}
