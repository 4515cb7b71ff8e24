//! One-time enrollment tokens: `rotator add-user NAME --enroll` registers the
//! user without issuing anything and prints a token once; the user's own
//! machine makes the key and trades the token and a CSR for a certificate
//! (`POST /v1/enroll`). Only a SHA-256 hash of the secret is stored, and it is
//! compared in constant time.
use serde_json::json;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::app::App;
use crate::flows::issue::IssueError;
use crate::policy::UserSpec;
use crate::store::enrollments::{self, EnrollmentToken};
use crate::store::{StoreError, audit, credentials, users};
use crate::support::exit::{Exit, ExitStatus};

const ID_LEN: usize = 12;
const SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Issue(#[from] IssueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExitStatus for EnrollError {
    fn exit(&self) -> Exit {
        match self {
            EnrollError::Issue(e) => e.exit(),
            EnrollError::Store(e) => e.exit(),
        }
    }
}

/// A token as printed: `<id>.<secret>`. `Debug` never shows the secret.
pub struct Created {
    pub id: String,
    pub token: Zeroizing<String>,
    pub expires_at: i64,
}

impl std::fmt::Debug for Created {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Created")
            .field("id", &self.id)
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A token split into its parts, as a request presents it.
pub struct Presented<'a> {
    pub id: &'a str,
    secret: &'a str,
}

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Parses `<12 hex>.<43 base64url>`; the error says what is wrong without
/// echoing the secret.
pub fn parse(token: &str) -> Result<Presented<'_>, String> {
    let Some((id, secret)) = token.split_once('.') else {
        return Err(
            "a token looks like <12 hex digits>.<43 characters>; this one has no '.'".into(),
        );
    };
    if id.len() != ID_LEN
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "the id part {id:?} is not {ID_LEN} lowercase hex digits"
        ));
    }
    if secret.len() != 43
        || !secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "the secret part of token {id} is not 43 base64url characters ({} given)",
            secret.len()
        ));
    }
    Ok(Presented { id, secret })
}

fn hash(secret: &str) -> String {
    crate::pki::hex(&crate::pki::sha256(secret.as_bytes()))
}

/// Registers `spec` as an active user with no credential yet (or re-enrolls an
/// existing one that has none) and makes a token; one transaction, audited.
/// Earlier unused tokens of the user are revoked.
pub async fn add_user(app: &App, spec: &UserSpec) -> Result<Created, EnrollError> {
    app.settings.policy.check(spec).map_err(IssueError::from)?;
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    let existing = users::get(&mut tx, &spec.name).await?;
    if let Some(r) = existing.as_ref().and_then(|u| u.revoked.clone()) {
        return Err(IssueError::Revoked {
            user: spec.name.clone(),
            at: r.at,
            by: r.by,
        }
        .into());
    }
    if let Some(u) = existing.as_ref().filter(|u| u.state == "active") {
        if credentials::current(&mut tx, &spec.name).await?.is_some() {
            return Err(IssueError::UserExists(spec.name.clone()).into());
        }
        if u.spec != *spec {
            return Err(IssueError::SpecMismatch {
                user: spec.name.clone(),
                differs: crate::flows::issue::describe_diff(&u.spec, spec),
            }
            .into());
        }
    }
    users::upsert_active(&mut tx, spec, now).await?;
    users::set_delivery(&mut tx, &spec.name, "client", now).await?;
    audit::append(
        &mut tx,
        now,
        &app.actor,
        "user.add",
        &spec.name,
        json!({"groups": spec.groups, "namespaces": spec.namespaces, "role": spec.role,
               "readded": existing.is_some(), "enroll": true}),
    )
    .await?;
    let revoked = enrollments::revoke_unused(&mut tx, &spec.name, now).await?;
    let id = crate::pki::hex(&crate::pki::random_bytes::<{ ID_LEN / 2 }>());
    let secret = Zeroizing::new(base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        crate::pki::random_bytes::<SECRET_BYTES>(),
    ));
    let expires_at = now + app.settings.server.enroll_token_ttl.as_secs() as i64;
    enrollments::insert(
        &mut tx,
        &id,
        &spec.name,
        &hash(&secret),
        expires_at,
        &app.actor,
        now,
    )
    .await?;
    audit::append(
        &mut tx,
        now,
        &app.actor,
        "enrollment_token.create",
        &spec.name,
        json!({"token": id, "expires_at": expires_at, "revoked": revoked}),
    )
    .await?;
    crate::store::commit(tx).await?;
    Ok(Created {
        token: Zeroizing::new(format!("{id}.{}", secret.as_str())),
        id,
        expires_at,
    })
}

/// Records, audited, that token `id` reached its holder (`to`: where it went).
/// Until then a rerun of a bulk onboarding replaces it: a token whose file a
/// killed run never wrote is active but nobody holds it.
pub async fn delivered(app: &App, id: &str, user: &str, to: &str) -> Result<(), StoreError> {
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    enrollments::mark_delivered(&mut tx, id, now).await?;
    audit::append(
        &mut tx,
        now,
        &app.actor,
        "enrollment_token.deliver",
        user,
        json!({"token": id, "to": to}),
    )
    .await?;
    crate::store::commit(tx).await
}

/// Why a presented token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No such token, or the secret does not match: indistinguishable on purpose.
    Invalid,
    Expired(i64),
    /// Used or claimed by another key.
    Used,
    Revoked,
    UserInactive(String),
}

/// What a valid token allows.
#[derive(Debug)]
pub enum Accepted {
    /// Unused, or claimed by this same key and not yet used: issue.
    Issue(EnrollmentToken),
    /// Already used by this same key: the client lost the response; hand back
    /// the credential it got (if it is still the current one).
    Replay(EnrollmentToken, Box<credentials::Credential>),
}

/// Checks a token. `spki_sha256` is the key the request is for; `None` only
/// asks whether the token is usable at all (`/v1/subject`).
pub async fn check(
    app: &App,
    presented: &Presented<'_>,
    spki_sha256: Option<&str>,
) -> Result<Result<Accepted, Refusal>, StoreError> {
    let mut conn = app.store.conn().await?;
    let Some(t) = enrollments::get(&mut conn, presented.id).await? else {
        // Spend the same work as a real comparison.
        let _ = hash(presented.secret).as_bytes().ct_eq(&[0u8; 64]);
        return Ok(Err(Refusal::Invalid));
    };
    if !bool::from(
        hash(presented.secret)
            .as_bytes()
            .ct_eq(t.secret_hash.as_bytes()),
    ) {
        return Ok(Err(Refusal::Invalid));
    }
    let now = app.clock.now();
    let same_key = spki_sha256.is_some() && t.claimed_spki.as_deref() == spki_sha256;
    match t.state.as_str() {
        "used" if same_key => {
            let current = match &t.credential_id {
                Some(id) => credentials::get(&mut conn, id)
                    .await?
                    .filter(|c| c.state == "current"),
                None => None,
            };
            return Ok(match current {
                Some(c) => Ok(Accepted::Replay(t, Box::new(c))),
                None => Err(Refusal::Used),
            });
        }
        "used" => return Ok(Err(Refusal::Used)),
        "claimed" if !same_key && spki_sha256.is_some() => return Ok(Err(Refusal::Used)),
        "revoked" => return Ok(Err(Refusal::Revoked)),
        _ => {}
    }
    if t.expires_at <= now || t.state == "expired" {
        return Ok(Err(Refusal::Expired(t.expires_at)));
    }
    match users::get(&mut conn, &t.user_name).await? {
        Some(u) if u.state == "active" => Ok(Ok(Accepted::Issue(t))),
        _ => Ok(Err(Refusal::UserInactive(t.user_name.clone()))),
    }
}

/// The user whose token this is, only when its secret matches: who a request
/// proved to be, before anything is counted against that user. An unknown id
/// costs the same work as a wrong secret, and neither names anyone.
pub async fn owner(app: &App, presented: &Presented<'_>) -> Result<Option<String>, StoreError> {
    let mut conn = app.store.conn().await?;
    let token = enrollments::get(&mut conn, presented.id).await?;
    let stored = token
        .as_ref()
        .map_or(UNKNOWN_HASH, |t| t.secret_hash.as_str());
    let matched = bool::from(hash(presented.secret).as_bytes().ct_eq(stored.as_bytes()));
    Ok(token.filter(|_| matched).map(|t| t.user_name))
}

/// Compared against when the id is unknown: the hash of no secret anyone holds.
const UNKNOWN_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The expire job's share: unused tokens past their time become `expired`.
pub async fn expire_pass(app: &App) -> Result<usize, StoreError> {
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    let expired = enrollments::expire_due(&mut tx, now).await?;
    for (id, user) in &expired {
        audit::append(
            &mut tx,
            now,
            "daemon",
            "enrollment_token.expire",
            user,
            json!({"token": id}),
        )
        .await?;
    }
    crate::store::commit(tx).await?;
    Ok(expired.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_only_the_printed_shape() {
        let good = format!("{}.{}", "0123456789ab", "A".repeat(43));
        assert_eq!(parse(&good).unwrap().id, "0123456789ab");
        for bad in [
            "",
            "nodot",
            "0123456789ab.",
            "0123456789AB.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "0123456789a.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "0123456789ab.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            let e = parse(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(!e.contains("AAAA"), "the secret is echoed: {e}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let t = format!("{}.{}", "0123456789ab", "s".repeat(43));
        let p = parse(&t).unwrap();
        assert!(!format!("{p:?}").contains("sss"));
        let c = Created {
            id: "x".into(),
            token: Zeroizing::new(t.clone()),
            expires_at: 0,
        };
        assert!(!format!("{c:?}").contains("sss"));
    }
}
