//! What the user API does (self-service), apart from HTTP: parse a request, decide
//! who is asking, and issue through the saga. Every answer is a typed
//! [`ApiError`] with a stable code, or a [`Grant`].
use std::net::SocketAddr;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::warn;

use crate::app::App;
use crate::flows::enroll::{self, Accepted, Refusal};
use crate::flows::issue::{ClientRequest, IssueError};
use crate::pki::{self, CsrInfo};
use crate::store::credentials::Credential;
use crate::store::{StoreError, audit, credentials, issuances, users};
use crate::support::clock::rfc3339;

/// Largest request body the API reads. A CSR for an RSA-4096 key is about 1.7 KiB of PEM.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// A refusal as the client sees it: an HTTP status, a code that never changes
/// meaning, what was wrong, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})\nfix: {fix}")]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    pub code: String,
    pub message: String,
    pub fix: String,
}

impl ApiError {
    pub fn new(
        status: u16,
        code: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }

    fn internal(what: &str, e: &dyn std::fmt::Display) -> Self {
        // The detail goes to the operator's log, not to the client.
        warn!(error = %e, "{what}");
        Self::new(
            500,
            "internal",
            format!("the server failed while {what}"),
            "try again later; if it persists, tell the administrator (the daemon's log has the cause)",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Locked { .. } | StoreError::Queued { .. } => ApiError::new(
                503,
                "busy",
                "the server's database is busy",
                "retry in a few seconds",
            ),
            StoreError::UserBusy { .. } => ApiError::new(
                503,
                "busy",
                "another request is updating this user's access",
                "retry in a few seconds",
            ),
            other => ApiError::internal("reading its database", &other),
        }
    }
}

/// Who is on the other end of the connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client certificate the TLS layer verified against the client CA.
    pub certificate_der: Option<Vec<u8>>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SubjectRequest {
    #[serde(default)]
    pub token: Option<String>,
    /// The public key the CSR will carry (base64 of its DER SubjectPublicKeyInfo):
    /// the generation group ends with a digest of it.
    #[serde(default)]
    pub public_key: Option<String>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    pub token: String,
    pub csr: String,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
}

/// The subject a CSR must carry, and the key to make.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SubjectResponse {
    pub user: String,
    pub common_name: String,
    pub organizations: Vec<String>,
    pub key_type: String,
    pub generation: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterInfo {
    pub name: String,
    pub server: String,
    /// Base64 of the PEM bundle that verifies the API server, as in a kubeconfig.
    pub certificate_authority_data: String,
}

/// A certificate for the client's key, and where to use it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    pub user: String,
    pub certificate: String,
    pub serial: String,
    pub generation: i64,
    pub not_before: i64,
    pub not_after: i64,
    /// When the server's policy would renew it (the start of its renewal window).
    pub renew_after: i64,
    pub namespace: Option<String>,
    pub cluster: ClusterInfo,
    /// True when this repeats an earlier answer the client did not receive.
    pub replayed: bool,
}

/// Parses a JSON body into `T`; a clear 400 otherwise. Never panics.
pub fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(too_large(body.len()));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            400,
            "bad_request",
            format!("the body is not the JSON this endpoint takes: {e}"),
            "send a JSON object with the fields the API documents (README, \"The user API\")",
        )
    })
}

pub fn too_large(n: usize) -> ApiError {
    ApiError::new(
        413,
        "body_too_large",
        format!("the request body is over {MAX_BODY_BYTES} bytes ({n} or more)"),
        "send one PEM CSR for an ECDSA or RSA key; nothing else belongs in the body",
    )
}

/// Parses a PEM CSR field and checks its self-signature. Never panics.
pub fn parse_csr_field(pem: &str) -> Result<CsrInfo, ApiError> {
    if !pem
        .trim_start()
        .starts_with("-----BEGIN CERTIFICATE REQUEST-----")
    {
        return Err(ApiError::new(
            400,
            "malformed_csr",
            "the csr field is not a PEM \"CERTIFICATE REQUEST\"",
            "send the CSR as PEM text beginning with -----BEGIN CERTIFICATE REQUEST-----",
        ));
    }
    pki::parse_csr(pem.trim().as_bytes()).map_err(|e| {
        ApiError::new(
            400,
            "malformed_csr",
            format!("the CSR cannot be used: {e}"),
            "make the CSR with `rotator fetch`, or with openssl req -new for the key you hold",
        )
    })
}

fn refusal(r: Refusal) -> ApiError {
    let ask = "ask your administrator for a new one (`rotator add-user NAME --enroll`)";
    match r {
        Refusal::Invalid => ApiError::new(
            401,
            "token_invalid",
            "the enrollment token is not valid",
            ask,
        ),
        Refusal::Expired(at) => ApiError::new(
            401,
            "token_expired",
            format!("the enrollment token expired at {}", rfc3339(at)),
            ask,
        ),
        Refusal::Used => ApiError::new(
            401,
            "token_used",
            "the enrollment token was already used; tokens work once",
            format!(
                "if you enrolled already, run `rotator fetch` without --token to renew; otherwise {ask}"
            ),
        ),
        Refusal::Revoked => ApiError::new(
            401,
            "token_revoked",
            "the enrollment token was revoked (a newer one was made)",
            ask,
        ),
        Refusal::UserInactive(u) => ApiError::new(
            403,
            "user_inactive",
            format!("user {u:?} is not active"),
            "ask your administrator whether your access was removed",
        ),
    }
}

/// A revoked user's refusal: sticky until an administrator reinstates them.
/// Who revoked is for the administrators' audit log, not for the API.
fn revoked(user: &str, at: i64) -> ApiError {
    ApiError::new(
        403,
        "user_revoked",
        format!(
            "user {user:?} was revoked at {}; nothing is issued to it until an administrator reinstates it",
            rfc3339(at)
        ),
        "ask your administrator; only they can reinstate your access",
    )
}

fn issue_error(e: IssueError) -> ApiError {
    use crate::cluster::ClusterError;
    use crate::signer::SignError;
    match e {
        IssueError::Revoked { user, at, .. } => revoked(&user, at),
        IssueError::NoSuchUser(u) => ApiError::new(
            403,
            "user_inactive",
            format!("user {u:?} is not active"),
            "ask your administrator whether your access was removed",
        ),
        IssueError::Policy(p) => ApiError::new(
            403,
            "policy_refused",
            format!(
                "policy no longer allows this user's credential: {}",
                first_line(&p.to_string())
            ),
            "ask your administrator to update your access",
        ),
        IssueError::GenerationStale { asked, next } => ApiError::new(
            409,
            "generation_stale",
            format!("the CSR names generation {asked}; the next generation is {next}"),
            "ask /v1/subject again and make a new CSR (`rotator fetch` does this by itself)",
        ),
        IssueError::TokenUnavailable => refusal(Refusal::Used),
        IssueError::Cancelled { reason, .. } => ApiError::new(
            403,
            "credential_not_current",
            format!("the credential was revoked while the request ran: {reason}"),
            "ask your administrator whether your access was revoked",
        ),
        IssueError::ClientCsr(why) => ApiError::new(
            403,
            "subject_not_allowed",
            format!("the CSR is not allowed: {why}"),
            "use exactly the subject /v1/subject returns",
        ),
        IssueError::ClientKeyType { got, want } => ApiError::new(
            422,
            "key_type_not_allowed",
            format!("the CSR's key is {got}; this user's credentials use {want}"),
            format!("generate a {want} key"),
        ),
        IssueError::Store(s) => s.into(),
        IssueError::Sign(SignError::Cluster(
            ClusterError::Unreachable { .. } | ClusterError::Timeout { .. },
        )) => ApiError::new(
            503,
            "signer_unavailable",
            "the cluster did not sign the certificate in time",
            "retry in a minute; your current credential keeps working until it expires",
        ),
        other => ApiError::internal("issuing the certificate", &other),
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// The identity a verified client certificate proves: its credential, if that
/// credential is the user's current one.
enum CertIdentity {
    Current(Credential),
    /// Superseded by a renewal made with this same key: hand it back.
    Replay(Credential),
}

async fn identify(app: &App, der: &[u8], spki: Option<&str>) -> Result<CertIdentity, ApiError> {
    let fingerprint = pki::hex(&pki::sha256(der));
    let mut conn = app.store.conn().await?;
    let Some(c) = credentials::by_fingerprint(&mut conn, &fingerprint).await? else {
        return Err(ApiError::new(
            403,
            "unknown_certificate",
            format!("the client certificate (SHA-256 {fingerprint}) was not issued by rotator"),
            "enroll with a token from your administrator: `rotator fetch --token T`",
        ));
    };
    // A revoked user's certificate is refused below, saying why (its own
    // state first: that is what the client presented).
    let revoked_at = match users::get(&mut conn, &c.user_name).await? {
        Some(u) if u.state == "active" => None,
        Some(users::User {
            revoked: Some(r), ..
        }) => Some(r.at),
        _ => {
            return Err(ApiError::new(
                403,
                "user_inactive",
                format!("user {:?} is not active", c.user_name),
                "ask your administrator whether your access was removed",
            ));
        }
    };
    if !self_service(&mut conn, &c).await? {
        return Err(ApiError::new(
            403,
            "renewal_not_allowed",
            format!(
                "the client certificate (serial {}, generation {}) was issued by an administrator, not through enrollment; only enrolled credentials renew through the API",
                c.serial, c.generation
            ),
            format!(
                "ask your administrator for a new kubeconfig, or to switch you to enrollment: `rotator revoke {u}` then `rotator add-user {u} --enroll --reinstate` with the same access, and run `rotator fetch --token T`",
                u = c.user_name
            ),
        ));
    }
    if c.state == "superseded"
        && revoked_at.is_none()
        && let Some(s) = spki
        && let Some(next) = credentials::renewal_of(&mut conn, &c.id, s).await?
    {
        return Ok(CertIdentity::Replay(next));
    }
    let now = app.clock.now();
    if c.state != "current" || c.not_after <= now {
        let mut why = match c.state.as_str() {
            "current" => format!("it expired at {}", rfc3339(c.not_after)),
            "revoked" => "it was revoked".to_string(),
            "superseded" => "a newer credential replaced it".to_string(),
            other => format!("its state is {other}"),
        };
        if let Some(at) = revoked_at {
            why.push_str(&format!(
                "; user {:?} was revoked at {}: nothing is issued to it until an administrator reinstates it",
                c.user_name,
                rfc3339(at)
            ));
        }
        return Err(ApiError::new(
            403,
            "credential_not_current",
            format!(
                "the client certificate (serial {}, generation {}) may not renew: {why}",
                c.serial, c.generation
            ),
            "renew with your newest credential, or enroll again with a token from your administrator",
        ));
    }
    if let Some(at) = revoked_at {
        return Err(revoked(&c.user_name, at));
    }
    Ok(CertIdentity::Current(c))
}

/// Whether `c` may renew itself through the API: its user enrolled (delivery
/// `client`) and `c` itself came through the API, from an enrollment token or
/// a renewal of such a credential. A credential an administrator issued (and
/// delivered as a kubeconfig, with a key rotator made) never does: a stolen
/// copy must not become a chain its thief keeps renewing, and the daemon and a
/// client must not keep superseding each other.
async fn self_service(conn: &mut crate::store::Conn, c: &Credential) -> Result<bool, StoreError> {
    if users::delivery(conn, &c.user_name).await? != "client" {
        return Ok(false);
    }
    if c.renewed_from.is_some() {
        return Ok(true);
    }
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM enrollment_tokens WHERE credential_id = $1 AND user_name = $2",
    )
    .bind(&c.id)
    .bind(&c.user_name)
    .fetch_one(&mut *conn)
    .await?;
    Ok(n > 0)
}

/// `POST /v1/subject`: what the next CSR must say, for a token holder or the
/// holder of a current certificate. Changes nothing.
pub async fn subject(
    app: &App,
    peer: &Peer,
    req: SubjectRequest,
) -> Result<SubjectResponse, ApiError> {
    let user = match (&req.token, &peer.certificate_der) {
        (Some(t), _) => {
            let presented = enroll::parse(t).map_err(malformed_token)?;
            match enroll::check(app, &presented, None).await? {
                Ok(Accepted::Issue(t)) | Ok(Accepted::Replay(t, _)) => t.user_name,
                Err(r) => return Err(refusal(r)),
            }
        }
        (None, Some(der)) => match identify(app, der, None).await? {
            CertIdentity::Current(c) | CertIdentity::Replay(c) => c.user_name,
        },
        (None, None) => return Err(no_identity()),
    };
    let mut conn = app.store.conn().await?;
    let u = users::get(&mut conn, &user)
        .await?
        .filter(|u| u.state == "active")
        .ok_or_else(|| refusal(Refusal::UserInactive(user.clone())))?;
    let generation = issuances::next_generation(&mut conn, &user).await?;
    let mut organizations = u.spec.groups.clone();
    // Without the key the group's suffix is unknown: the client adds it
    // (`policy::generation_group`); with it, the answer is the exact subject.
    if let Some(spki) = req.public_key.as_deref() {
        let spki = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, spki.trim())
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 2048)
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    "bad_request",
                    "public_key is not base64 of a DER SubjectPublicKeyInfo",
                    "send the key the CSR will carry, base64 (standard alphabet) of its DER SPKI, or leave public_key out",
                )
            })?;
        organizations.push(crate::policy::generation_group(&user, generation, &spki));
    }
    Ok(SubjectResponse {
        common_name: user.clone(),
        user,
        organizations,
        key_type: u.spec.key_type.as_str().into(),
        generation,
    })
}

fn no_identity() -> ApiError {
    ApiError::new(
        401,
        "client_certificate_required",
        "the request carries neither an enrollment token nor a client certificate",
        "enroll with `rotator fetch --token T`, or renew with your current certificate",
    )
}

pub fn malformed_token(why: String) -> ApiError {
    ApiError::new(
        400,
        "malformed_token",
        format!("the enrollment token is malformed: {why}"),
        "paste the whole token `rotator add-user --enroll` printed",
    )
}

/// The generation the CSR names in its `rotator:<user>:<n>.<suffix>` group.
fn csr_generation(csr: &CsrInfo) -> Result<i64, ApiError> {
    let prefix = format!("rotator:{}:", csr.common_name);
    let gens: Vec<i64> = csr
        .organizations
        .iter()
        .filter_map(|o| crate::policy::parse_generation_group(&csr.common_name, o))
        .collect();
    match gens.as_slice() {
        [g] => Ok(*g),
        _ => Err(ApiError::new(
            403,
            "subject_not_allowed",
            format!(
                "the CSR's groups {:?} do not name exactly one generation group {prefix}N",
                csr.organizations
            ),
            "use exactly the subject /v1/subject returns",
        )),
    }
}

/// `POST /v1/enroll`: trade a one-time token and a CSR for a certificate.
pub async fn enroll(app: &App, peer: &Peer, req: EnrollRequest) -> Result<Grant, ApiError> {
    let presented = enroll::parse(&req.token).map_err(malformed_token)?;
    let csr = parse_csr_field(&req.csr)?;
    let spki = pki::hex(&pki::sha256(&csr.spki_der));
    let token = match enroll::check(app, &presented, Some(&spki)).await? {
        Ok(Accepted::Replay(_, c)) => return grant(app, &c, true).await,
        Ok(Accepted::Issue(t)) => t,
        Err(r) => return Err(refusal(r)),
    };
    let generation = csr_generation(&csr)?;
    let actor = format!("api:{}@{}", token.user_name, peer.addr.ip());
    let to = format!("api {}", peer.addr);
    let issued = app
        .issuer()
        .issue_for_client(ClientRequest {
            user: &token.user_name,
            csr: &csr,
            generation,
            renewed_from: None,
            token: Some(&token.id),
            actor: &actor,
            delivered_to: &to,
        })
        .await
        .map_err(issue_error)?;
    grant(app, &issued.credential, false).await
}

/// `POST /v1/renew`: the holder of the user's current certificate (mutual TLS)
/// trades a CSR for the next one.
pub async fn renew(app: &App, peer: &Peer, req: RenewRequest) -> Result<Grant, ApiError> {
    let der = peer.certificate_der.as_deref().ok_or_else(no_identity)?;
    let csr = parse_csr_field(&req.csr)?;
    let spki = pki::hex(&pki::sha256(&csr.spki_der));
    let current = match identify(app, der, Some(&spki)).await? {
        CertIdentity::Replay(c) => return grant(app, &c, true).await,
        CertIdentity::Current(c) => c,
    };
    let generation = csr_generation(&csr)?;
    let actor = format!("api:{}@{}", current.user_name, peer.addr.ip());
    let to = format!("api {}", peer.addr);
    let issued = app
        .issuer()
        .issue_for_client(ClientRequest {
            user: &current.user_name,
            csr: &csr,
            generation,
            renewed_from: Some(&current.id),
            token: None,
            actor: &actor,
            delivered_to: &to,
        })
        .await
        .map_err(issue_error)?;
    grant(app, &issued.credential, false).await
}

async fn grant(app: &App, c: &Credential, replayed: bool) -> Result<Grant, ApiError> {
    let u = users::find(&app.store, &c.user_name)
        .await?
        .ok_or_else(|| refusal(Refusal::UserInactive(c.user_name.clone())))?;
    let r = &app.settings.rotation;
    Ok(Grant {
        user: c.user_name.clone(),
        certificate: c.certificate.clone(),
        serial: c.serial.clone(),
        generation: c.generation,
        not_before: c.not_before,
        not_after: c.not_after,
        renew_after: crate::flows::renew::renew_at(c, r.window, r.jitter),
        namespace: u
            .spec
            .namespaces
            .first()
            .filter(|n| n.as_str() != crate::policy::ALL_NAMESPACES)
            .cloned(),
        cluster: ClusterInfo {
            name: app.settings.cluster.name.clone(),
            server: app.endpoint.server.clone(),
            certificate_authority_data: base64::engine::general_purpose::STANDARD
                .encode(app.endpoint.ca_pem.as_bytes()),
        },
        replayed,
    })
}

/// Records one API call in the audit log: who, from where, what, and the outcome.
pub async fn audit_call(
    app: &App,
    peer: &Peer,
    endpoint: &str,
    user: Option<&str>,
    outcome: Result<&str, &ApiError>,
) -> Result<(), StoreError> {
    let now = app.clock.now();
    // The path is the client's to choose: keep the log's entry bounded.
    let endpoint: String = endpoint.chars().take(128).collect();
    let actor = match user {
        Some(u) => format!("api:{u}@{}", peer.addr.ip()),
        None => format!("api:{}", peer.addr.ip()),
    };
    let (action, detail) = match outcome {
        Ok(serial) => (
            "api.call",
            json!({"endpoint": endpoint, "peer": peer.addr.to_string(), "result": "ok", "serial": serial}),
        ),
        Err(e) => (
            "api.refuse",
            // The code, not the message: a message may quote what the client sent.
            json!({"endpoint": endpoint, "peer": peer.addr.to_string(), "status": e.status, "code": e.code}),
        ),
    };
    let mut tx = app.store.begin().await?;
    audit::append(&mut tx, now, &actor, action, user.unwrap_or("-"), detail).await?;
    crate::store::commit(tx).await
}
