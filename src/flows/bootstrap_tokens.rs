//! Bootstrap tokens: created exactly as kubeadm would, recorded with only a hash
//! of their secret, deleted when revoked or expired (the cluster may not run the
//! tokencleaner), and foreign ones reported.
use std::time::Duration;

use serde_json::json;
use zeroize::Zeroizing;

use crate::app::App;
use crate::cluster::bootstrap_tokens::{ClusterToken, TokenSpec};
use crate::cluster::{Cluster, ClusterError};
use crate::store::bootstrap_tokens::{self, NewToken};
use crate::store::{StoreError, audit};
use crate::support::clock::rfc3339;
use crate::support::exit::{Exit, ExitStatus};

pub const USAGES: &[&str] = &["authentication", "signing"];

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "bootstrap tokens live in a cluster, and this data directory uses the local-ca signer\nfix: use a data directory initialized with `rotator init --signer kubernetes`"
    )]
    NoCluster,
    #[error("invalid {what} {value:?}: {problem}\nfix: {fix}")]
    Invalid {
        what: &'static str,
        value: String,
        problem: String,
        fix: &'static str,
    },
    #[error(
        "no bootstrap token {0:?} made by rotator\nfix: `rotator token list` shows the tokens; a foreign one can be deleted with kubectl"
    )]
    NotFound(String),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ExitStatus for TokenError {
    fn exit(&self) -> Exit {
        match self {
            TokenError::NoCluster => Exit::Config,
            TokenError::Invalid { .. } => Exit::Refused,
            TokenError::NotFound(_) => Exit::NotFound,
            TokenError::Cluster(e) => e.exit(),
            TokenError::Store(e) => e.exit(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct CreateToken {
    /// None: policy's default; Some(0): never expires (if policy allows).
    pub ttl: Option<Duration>,
    pub description: String,
    pub groups: Vec<String>,
    pub usages: Vec<String>,
}

/// The token, shown once. `Debug` is redacted.
pub struct Created {
    pub id: String,
    pub token: Zeroizing<String>,
    pub expires_at: Option<i64>,
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

fn random_chars(n: usize) -> Zeroizing<String> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Zeroizing::new(String::with_capacity(n));
    while out.len() < n {
        for b in crate::pki::random_bytes::<32>() {
            // 252 = 7 * 36: rejection keeps every character equally likely.
            if b < 252 && out.len() < n {
                out.push(ALPHABET[(b % 36) as usize] as char);
            }
        }
    }
    out
}

fn cluster(app: &App) -> Result<&Cluster, TokenError> {
    app.cluster.as_ref().ok_or(TokenError::NoCluster)
}

fn validate(app: &App, req: &CreateToken) -> Result<(Option<i64>, Vec<String>), TokenError> {
    let p = &app.settings.policy;
    let ttl = req.ttl.unwrap_or(p.default_token_ttl);
    if ttl.is_zero() && !p.allow_non_expiring_tokens {
        return Err(TokenError::Invalid {
            what: "TTL",
            value: "0".into(),
            problem: "a token that never expires is refused by policy".into(),
            fix: "give a TTL such as 30m, or set policy.allow_non_expiring_tokens = true",
        });
    }
    if ttl > p.max_token_ttl || (!ttl.is_zero() && ttl < Duration::from_secs(60)) {
        return Err(TokenError::Invalid {
            what: "TTL",
            value: humantime::format_duration(ttl).to_string(),
            problem: format!(
                "outside [1m, {}]",
                humantime::format_duration(p.max_token_ttl)
            ),
            fix: "ask for a shorter lifetime, or raise policy.max_token_ttl",
        });
    }
    for g in &req.groups {
        let rest = g.strip_prefix("system:bootstrappers:").unwrap_or("");
        let ok = !rest.is_empty()
            && rest.len() <= 256
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b':' || b == b'-')
            && rest
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !ok {
            return Err(TokenError::Invalid {
                what: "group",
                value: g.clone(),
                problem: "bootstrap token groups must look like system:bootstrappers:<name>".into(),
                fix: "use lowercase letters, digits, ':' and '-' after system:bootstrappers:",
            });
        }
    }
    let usages = if req.usages.is_empty() {
        USAGES.iter().map(|u| u.to_string()).collect()
    } else {
        req.usages.clone()
    };
    for u in &usages {
        if !USAGES.contains(&u.as_str()) {
            return Err(TokenError::Invalid {
                what: "usage",
                value: u.clone(),
                problem: "unknown usage".into(),
                fix: "use authentication, signing, or both",
            });
        }
    }
    if req.description.chars().any(char::is_control) || req.description.len() > 256 {
        return Err(TokenError::Invalid {
            what: "description",
            value: req.description.clone(),
            problem: "control characters or over 256 bytes".into(),
            fix: "use a short plain sentence",
        });
    }
    let expires = (!ttl.is_zero()).then(|| app.clock.now() + ttl.as_secs() as i64);
    Ok((expires, usages))
}

pub async fn create(app: &App, req: &CreateToken) -> Result<Created, TokenError> {
    let cluster = cluster(app)?;
    let (expires_at, usages) = validate(app, req)?;
    let id = random_chars(6).to_string();
    let secret = random_chars(16);
    let now = app.clock.now();
    let hash = crate::pki::hex(&crate::pki::sha256(secret.as_bytes()));
    let mut tx = app.store.begin().await?;
    let row = NewToken {
        id: &id,
        secret_hash: &hash,
        description: &req.description,
        groups: &req.groups,
        usages: &usages,
        expires_at,
        created_by: &app.actor,
    };
    bootstrap_tokens::insert_creating(&mut tx, &row, now).await?;
    audit::append(&mut tx, now, &app.actor, "token.create", &id, json!({"expires_at": expires_at, "groups": req.groups, "usages": usages, "description": req.description})).await?;
    crate::store::commit(tx).await?;
    let spec = TokenSpec {
        id: &id,
        secret: &secret,
        expiration: expires_at.map(rfc3339),
        description: &req.description,
        usages: &usages,
        groups: &req.groups,
    };
    if let Err(e) = cluster.create_bootstrap_token(&spec).await {
        // Nothing half-made may authenticate: remove whatever may exist, then record it.
        let _ = cluster.delete_bootstrap_token(&id).await;
        let mut tx = app.store.begin().await?;
        bootstrap_tokens::set_state(&mut tx, &id, "failed", app.clock.now()).await?;
        audit::append(
            &mut tx,
            app.clock.now(),
            &app.actor,
            "token.fail",
            &id,
            json!({"reason": e.to_string().lines().next()}),
        )
        .await?;
        crate::store::commit(tx).await?;
        return Err(e.into());
    }
    let mut tx = app.store.begin().await?;
    bootstrap_tokens::set_state(&mut tx, &id, "active", app.clock.now()).await?;
    crate::store::commit(tx).await?;
    let token = Zeroizing::new(format!("{id}.{}", secret.as_str()));
    Ok(Created {
        id,
        token,
        expires_at,
    })
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenView {
    pub id: String,
    pub state: String,
    /// RFC 3339, or "never".
    pub expires: String,
    pub usages: Vec<String>,
    pub groups: Vec<String>,
    pub description: String,
    /// Not made by rotator (or not recorded by it).
    pub foreign: bool,
}

pub async fn list(app: &App) -> Result<Vec<TokenView>, TokenError> {
    let cluster = cluster(app)?;
    let ours = bootstrap_tokens::list(&app.store).await?;
    // Without `list` on kube-system Secrets (deploy/kubernetes/rbac.yaml does not
    // grant it: it would read every Secret there) the cluster is not checked.
    let in_cluster = match cluster.bootstrap_tokens().await {
        Ok(v) => v,
        Err(crate::cluster::ClusterError::Api { code: 403, .. }) => {
            tracing::warn!(
                "bootstrap tokens rotator did not make are not reported: rotator may not list kube-system Secrets (grant deploy/kubernetes/rbac-token-audit.yaml, knowing what it allows, or ask an admin to list them)"
            );
            return Ok(ours_only(&ours));
        }
        Err(e) => return Err(e.into()),
    };
    let parse = |s: &str| serde_json::from_str::<Vec<String>>(s).unwrap_or_default();
    let mut out: Vec<TokenView> = ours
        .iter()
        .filter(|t| t.state == "active" || t.state == "creating")
        .map(|t| TokenView {
            id: t.id.clone(),
            state: if in_cluster.iter().any(|c| c.id == t.id) {
                t.state.clone()
            } else {
                format!("{} (missing in cluster)", t.state)
            },
            expires: t.expires_at.map(rfc3339).unwrap_or_else(|| "never".into()),
            usages: parse(&t.usages),
            groups: parse(&t.groups),
            description: t.description.clone(),
            foreign: false,
        })
        .collect();
    for c in in_cluster.iter().filter(|c: &&ClusterToken| {
        !ours
            .iter()
            .any(|o| o.id == c.id && (o.state == "active" || o.state == "creating"))
    }) {
        out.push(TokenView {
            id: c.id.clone(),
            state: "in cluster".into(),
            expires: c.expiration.clone().unwrap_or_else(|| "never".into()),
            usages: c.usages.clone(),
            groups: c.groups.clone(),
            description: c.description.clone(),
            foreign: true,
        });
    }
    Ok(out)
}

/// rotator's own live tokens, as the database knows them (the cluster unchecked).
fn ours_only(ours: &[bootstrap_tokens::TokenRow]) -> Vec<TokenView> {
    let parse = |s: &str| serde_json::from_str::<Vec<String>>(s).unwrap_or_default();
    ours.iter()
        .filter(|t| t.state == "active" || t.state == "creating")
        .map(|t| TokenView {
            id: t.id.clone(),
            state: t.state.clone(),
            expires: t.expires_at.map(rfc3339).unwrap_or_else(|| "never".into()),
            usages: parse(&t.usages),
            groups: parse(&t.groups),
            description: t.description.clone(),
            foreign: false,
        })
        .collect()
}

pub async fn revoke(app: &App, id: &str) -> Result<(), TokenError> {
    let cluster = cluster(app)?;
    let row = {
        let mut conn = app.store.conn().await?;
        bootstrap_tokens::get(&mut conn, id).await?
    };
    let Some(row) = row.filter(|r| r.state == "active" || r.state == "creating") else {
        return Err(TokenError::NotFound(id.into()));
    };
    let existed = cluster.delete_bootstrap_token(&row.id).await?;
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    bootstrap_tokens::set_state(&mut tx, &row.id, "revoked", now).await?;
    audit::append(
        &mut tx,
        now,
        &app.actor,
        "token.revoke",
        &row.id,
        json!({"secret_deleted": existed}),
    )
    .await?;
    crate::store::commit(tx).await?;
    Ok(())
}

/// Deletes rotator's expired tokens (and creations that never finished) from the cluster.
pub async fn expire_pass(app: &App) -> Result<usize, TokenError> {
    let Some(cluster) = &app.cluster else {
        return Ok(0);
    };
    let now = app.clock.now();
    let due = {
        let mut conn = app.store.conn().await?;
        bootstrap_tokens::due(&mut conn, now, now - 600).await?
    };
    for t in &due {
        let existed = cluster.delete_bootstrap_token(&t.id).await?;
        let state = if t.state == "creating" {
            "failed"
        } else {
            "expired"
        };
        let mut tx = app.store.begin().await?;
        bootstrap_tokens::set_state(&mut tx, &t.id, state, now).await?;
        audit::append(
            &mut tx,
            now,
            &app.actor,
            &format!(
                "token.{}",
                if state == "failed" { "fail" } else { "expire" }
            ),
            &t.id,
            json!({"secret_deleted": existed, "expires_at": t.expires_at}),
        )
        .await?;
        crate::store::commit(tx).await?;
    }
    Ok(due.len())
}
