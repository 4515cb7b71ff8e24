//! Authentication: client certificates against the client CA (CN user, O groups),
//! the static admin token, service-account token Secrets, and bootstrap tokens
//! from kube-system Secrets.
//! The TLS layer accepts any client certificate whose holder proves its key; the
//! chain and validity are checked here, so a bad certificate is a 401 with a
//! Status body, as on a real API server, not a TLS alert.
use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::Value;

use crate::Shared;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// `user.extra`: for a client certificate its fingerprint, for a bound
    /// service-account token its JWT ID, under
    /// `authentication.kubernetes.io/credential-id` (fact 28).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Vec<String>>,
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn b64(v: &Value) -> Option<String> {
    let s = v.as_str()?;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).ok()?).ok()
}

pub fn authenticate(
    sh: &Shared,
    peer: Option<&[u8]>,
    authorization: Option<&str>,
) -> Option<UserInfo> {
    // A client certificate wins over a bearer token in the same request.
    if let Some(der) = peer {
        return cert_user(sh, der);
    }
    let token = authorization?.strip_prefix("Bearer ")?.trim();
    match crate::tokens::check(sh, token, &sh.opts.api_audiences) {
        crate::tokens::Verdict::User(u, _) => Some(u),
        crate::tokens::Verdict::Rejected(_) => None,
        crate::tokens::Verdict::NotMine => other_token_user(sh, token),
    }
}

/// The authenticators that know nothing of audiences: the static admin token,
/// legacy service-account token Secrets, bootstrap tokens.
pub(crate) fn other_token_user(sh: &Shared, token: &str) -> Option<UserInfo> {
    if constant_time_eq(token.as_bytes(), sh.opts.admin_token.as_bytes()) {
        return Some(UserInfo {
            username: "admin".into(),
            uid: String::new(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            extra: BTreeMap::new(),
        });
    }
    crate::serviceaccounts::token_user(sh, token).or_else(|| bootstrap_token_user(sh, token))
}

fn cert_user(sh: &Shared, der: &[u8]) -> Option<UserInfo> {
    let ca_der = CertificateDer::from(sh.client_ca.cert_der.as_slice());
    let anchor = webpki::anchor_from_trusted_cert(&ca_der).ok()?;
    let leaf = CertificateDer::from(der);
    let ee = webpki::EndEntityCert::try_from(&leaf).ok()?;
    let now = UnixTime::since_unix_epoch(Duration::from_secs(sh.now().max(0) as u64));
    ee.verify_for_usage(
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all,
        &[anchor],
        &[],
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let username = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let mut groups: Vec<String> = cert
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    groups.push("system:authenticated".into());
    let fingerprint =
        crate::hex(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref());
    Some(UserInfo {
        username,
        uid: String::new(),
        groups,
        extra: BTreeMap::from([(
            crate::tokens::CREDENTIAL_ID.to_string(),
            vec![format!("X509SHA256={fingerprint}")],
        )]),
    })
}

fn bootstrap_token_user(sh: &Shared, token: &str) -> Option<UserInfo> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if !ok(id, 6) || !ok(secret, 16) {
        return None;
    }
    let now = sh.now();
    if let Some((user, until)) = sh.token_cache.lock().unwrap().get(token).cloned()
        && until > now
    {
        return Some(user);
    }
    let s = sh.store.get(
        ("", "secrets"),
        "kube-system",
        &format!("bootstrap-token-{id}"),
    )?;
    if s["type"] != "bootstrap.kubernetes.io/token" {
        return None;
    }
    let d = &s["data"];
    if b64(&d["token-id"])? != id
        || !constant_time_eq(b64(&d["token-secret"])?.as_bytes(), secret.as_bytes())
    {
        return None;
    }
    if b64(&d["usage-bootstrap-authentication"]).as_deref() != Some("true") {
        return None;
    }
    if let Some(exp) = b64(&d["expiration"])
        && crate::store::parse_rfc3339(&exp)? <= now
    {
        return None;
    }
    let mut groups = vec!["system:bootstrappers".to_string()];
    if let Some(extra) = b64(&d["auth-extra-groups"]) {
        groups.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|g| g.starts_with("system:bootstrappers:"))
                .map(str::to_string),
        );
    }
    groups.push("system:authenticated".into());
    let user = UserInfo {
        username: format!("system:bootstrap:{id}"),
        uid: String::new(),
        groups,
        extra: BTreeMap::new(),
    };
    let ttl = sh.opts.token_cache_ttl.as_secs() as i64;
    if ttl > 0 {
        sh.token_cache
            .lock()
            .unwrap()
            .insert(token.to_string(), (user.clone(), now + ttl));
    }
    Some(user)
}
