//! The Vault connection: one vaultrs client per login, the token's lifetime, and
//! the state `/readyz` and the metrics report. Every call goes through
//! [`Vault::call`], which turns vaultrs errors into [`VaultError`]s (sealed,
//! unreachable, denied) and logs in again once when the token stopped working.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;

use super::auth::{self, LoginFailure};
use super::error::VaultError;
use super::settings::{VaultAuth, VaultSettings};

/// What rotator knows of Vault right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not asked yet.
    Unknown,
    Ready,
    Sealed,
    Unreachable,
    /// The server answers but rotator has no working token.
    Unauthenticated,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Unknown,
        State::Ready,
        State::Sealed,
        State::Unreachable,
        State::Unauthenticated,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            State::Unknown => "unknown",
            State::Ready => "ready",
            State::Sealed => "sealed",
            State::Unreachable => "unreachable",
            State::Unauthenticated => "unauthenticated",
        }
    }
}

/// The state and, when it is not ready, the last error (which never holds a secret).
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub detail: Option<String>,
}

/// A token's life as Vault last told it.
#[derive(Debug, Clone, Copy)]
struct TokenLife {
    obtained: Instant,
    /// `None`: does not expire.
    ttl: Option<Duration>,
    renewable: bool,
}

struct Session {
    client: Arc<VaultClient>,
    /// `None` until a login worked.
    life: Option<TokenLife>,
}

pub struct Vault {
    settings: VaultSettings,
    session: tokio::sync::RwLock<Session>,
    status: Mutex<Status>,
    /// Serializes logins, so a burst of failing calls logs in once.
    login_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("address", &self.settings.address)
            .field("namespace", &self.settings.namespace)
            .field("auth_method", &self.settings.auth.method())
            .field("token", &"...")
            .field("state", &self.status().state)
            .finish()
    }
}

impl Vault {
    /// A client that has not logged in yet: no request is made.
    pub fn new(settings: &VaultSettings) -> Result<Self, VaultError> {
        let client = build_client(settings, "")?;
        Ok(Self {
            settings: settings.clone(),
            session: tokio::sync::RwLock::new(Session {
                client: Arc::new(client),
                life: None,
            }),
            status: Mutex::new(Status {
                state: State::Unknown,
                detail: None,
            }),
            login_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// A client that has logged in: fails when Vault cannot be reached or refuses.
    pub async fn connect(settings: &VaultSettings) -> Result<Arc<Self>, VaultError> {
        let v = Arc::new(Self::new(settings)?);
        v.login().await?;
        Ok(v)
    }

    pub fn address(&self) -> &str {
        &self.settings.address
    }

    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    pub fn status(&self) -> Status {
        self.status.lock().expect("vault status").clone()
    }

    fn set_status(&self, state: State, detail: Option<String>) {
        let mut s = self.status.lock().expect("vault status");
        if s.state != state {
            match state {
                State::Ready => tracing::info!(address = %self.settings.address, "Vault is ready"),
                _ => {
                    tracing::warn!(address = %self.settings.address, state = state.as_str(), detail = detail.as_deref().unwrap_or(""), "Vault is not ready")
                }
            }
        }
        *s = Status { state, detail };
    }

    fn record(&self, e: &VaultError) {
        let state = match e {
            VaultError::Unreachable { .. } => State::Unreachable,
            VaultError::Sealed { .. } => State::Sealed,
            VaultError::Login { .. } | VaultError::CredentialFile { .. } => State::Unauthenticated,
            // A denied path or a missing secret says nothing about the connection.
            _ => return,
        };
        self.set_status(state, Some(e.to_string()));
    }

    /// The client with the current token, for calls that [`Vault::call`] does not fit.
    pub async fn client(&self) -> Arc<VaultClient> {
        self.session.read().await.client.clone()
    }

    /// Logs in (or, for the token method, checks the token) and installs the new token.
    pub async fn login(&self) -> Result<(), VaultError> {
        let _one = self.login_lock.lock().await;
        let r = self.login_locked().await;
        match &r {
            Ok(()) => self.set_status(State::Ready, None),
            Err(e) => self.record(e),
        }
        r
    }

    async fn login_locked(&self) -> Result<(), VaultError> {
        let address = self.settings.address.clone();
        let method = self.settings.auth.method();
        let refused = |reason: String| VaultError::Login {
            address: address.clone(),
            method,
            reason,
            fix: auth::login_fix(&self.settings),
        };
        let (client, life) = match &self.settings.auth {
            VaultAuth::Token { .. } => {
                let token = auth::configured_token(&self.settings)?;
                let client = build_client(&self.settings, token.expose_secret())?;
                let info = vaultrs::token::lookup_self(&client).await.map_err(|e| {
                    match self.classify("token lookup", e) {
                        VaultError::Denied { .. } => {
                            refused("the token is not valid (revoked, expired or unknown)".into())
                        }
                        other => other,
                    }
                })?;
                let life = TokenLife {
                    obtained: Instant::now(),
                    ttl: (info.ttl > 0).then(|| Duration::from_secs(info.ttl)),
                    renewable: info.renewable.unwrap_or(false),
                };
                (client, life)
            }
            _ => {
                let anon = self.session.read().await.client.clone();
                let info = match auth::login(&self.settings, &anon).await {
                    Ok(i) => i,
                    Err(LoginFailure::Local(e)) => return Err(e),
                    Err(LoginFailure::Vault(e)) => {
                        // Vault's reason ("service account name not authorized",
                        // "invalid role or secret ID") is the operator's clue;
                        // it never echoes the JWT or the secret id.
                        let said = match &e {
                            ClientError::APIError { errors, .. } if !errors.is_empty() => {
                                format!(": {}", errors.join("; "))
                            }
                            _ => String::new(),
                        };
                        return Err(match self.classify(&format!("{method} login"), e) {
                            VaultError::Denied { .. } => {
                                refused(format!("permission denied{said}"))
                            }
                            VaultError::Server { errors, status, .. } if status < 500 => {
                                refused(if errors.is_empty() {
                                    format!("status {status}")
                                } else {
                                    errors.join("; ")
                                })
                            }
                            other => other,
                        });
                    }
                };
                let client = build_client(&self.settings, &info.client_token)?;
                let life = TokenLife {
                    obtained: Instant::now(),
                    ttl: (info.lease_duration > 0)
                        .then(|| Duration::from_secs(info.lease_duration)),
                    renewable: info.renewable,
                };
                (client, life)
            }
        };
        tracing::info!(address = %self.settings.address, method, ttl_s = life.ttl.map(|t| t.as_secs()), renewable = life.renewable, "logged in to Vault");
        let mut s = self.session.write().await;
        s.client = Arc::new(client);
        s.life = Some(life);
        Ok(())
    }

    /// Runs one request. `what` names it in errors ("read secret/rotator/ca").
    /// When it is refused because the token stopped working (revoked, expired),
    /// logs in again once and repeats it.
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, VaultError>
    where
        F: Fn(Arc<VaultClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        if self.session.read().await.life.is_none() {
            // Named for what was asked: "read vault:... (sealing.key_file)", not "token lookup".
            self.login().await.map_err(|e| e.asked_for(what))?;
        }
        let first = f(self.client().await).await;
        let e = match first {
            Ok(v) => {
                self.set_status(State::Ready, None);
                return Ok(v);
            }
            Err(e) => self.classify(what, e),
        };
        if matches!(e, VaultError::Denied { .. }) && !self.token_works().await {
            tracing::info!(address = %self.settings.address, "the Vault token stopped working; logging in again");
            self.login().await.map_err(|e| e.asked_for(what))?;
            return match f(self.client().await).await {
                Ok(v) => Ok(v),
                Err(e) => {
                    let e = self.classify(what, e);
                    self.record(&e);
                    Err(e)
                }
            };
        }
        self.record(&e);
        Err(e)
    }

    async fn token_works(&self) -> bool {
        vaultrs::token::lookup_self(&*self.client().await)
            .await
            .is_ok()
    }

    /// When the token should next be renewed (two thirds into its remaining
    /// life); `None`: it does not expire, or there is none.
    pub async fn renew_at(&self) -> Option<Instant> {
        let life = self.session.read().await.life?;
        life.ttl.map(|ttl| life.obtained + ttl.mul_f64(2.0 / 3.0))
    }

    /// Renews the token; when Vault refuses (revoked, expired, not renewable, or
    /// at its max TTL) logs in again instead.
    pub async fn renew_or_login(&self) -> Result<(), VaultError> {
        let life = self.session.read().await.life;
        let Some(life) = life else {
            return self.login().await;
        };
        if life.renewable {
            let client = self.client().await;
            match vaultrs::token::renew_self(&*client, None).await {
                // A renewal that gave back less than a third of the previous TTL
                // means the max TTL is near: log in for a fresh token instead.
                Ok(info)
                    if info.lease_duration > 0
                        && life
                            .ttl
                            .is_none_or(|t| Duration::from_secs(info.lease_duration) * 3 >= t) =>
                {
                    let mut s = self.session.write().await;
                    s.life = Some(TokenLife {
                        obtained: Instant::now(),
                        ttl: Some(Duration::from_secs(info.lease_duration)),
                        renewable: info.renewable,
                    });
                    drop(s);
                    self.set_status(State::Ready, None);
                    tracing::debug!(address = %self.settings.address, ttl_s = info.lease_duration, "renewed the Vault token");
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => {
                    let e = self.classify("token renewal", e);
                    if e.is_outage() {
                        self.record(&e);
                        return Err(e);
                    }
                    tracing::info!(address = %self.settings.address, error = %e, "Vault refused to renew the token; logging in again");
                }
            }
        }
        self.login().await
    }

    /// Checks the server and the token (a token lookup): for the renewer when the
    /// token does not expire, and after an outage.
    pub async fn probe(&self) -> Result<(), VaultError> {
        self.call("token lookup", |c| async move {
            vaultrs::token::lookup_self(&*c).await.map(|_| ())
        })
        .await
    }

    /// Keeps the token alive until `shutdown`: renews it before its TTL runs out,
    /// logs in again when that is refused, and retries with backoff (1 s doubling
    /// to 60 s) while Vault is down, sealed or refuses the login.
    pub async fn run_renewer(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_secs(1);
        loop {
            let state = self.status().state;
            let wait = if state == State::Unknown {
                Duration::ZERO
            } else if state != State::Ready {
                backoff
            } else {
                match self.renew_at().await {
                    Some(at) => at.saturating_duration_since(Instant::now()),
                    None => PROBE_INTERVAL,
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let has_ttl = self.renew_at().await.is_some();
            let r = if self.status().state != State::Ready && self.status().state != State::Unknown
            {
                // After an outage the old token may still be good: check it first.
                match self.probe().await {
                    Ok(()) if has_ttl => self.renew_or_login().await,
                    other => other,
                }
            } else if has_ttl {
                self.renew_or_login().await
            } else {
                self.probe().await
            };
            match r {
                Ok(()) => backoff = Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!(address = %self.settings.address, error = %e, retry_s = backoff.as_secs(), "Vault not ready");
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Maps a vaultrs error to what it means for rotator.
    pub fn classify(&self, what: &str, e: ClientError) -> VaultError {
        let address = self.settings.address.clone();
        let what = what.to_string();
        match e {
            ClientError::APIError { code: 503, .. } => VaultError::Sealed { address, what },
            ClientError::APIError { code: 403, .. } => VaultError::Denied { address, what },
            ClientError::APIError { code, errors } => VaultError::Server {
                address,
                what,
                status: code,
                errors,
                fix: server_fix(code),
            },
            ClientError::RestClientError { source } => match source {
                rustify::errors::ClientError::ServerResponseError { code: 503, .. } => {
                    VaultError::Sealed { address, what }
                }
                rustify::errors::ClientError::ServerResponseError { code: 403, .. } => {
                    VaultError::Denied { address, what }
                }
                rustify::errors::ClientError::ServerResponseError { code, .. } => {
                    VaultError::Server {
                        address,
                        what,
                        status: code,
                        errors: Vec::new(),
                        fix: server_fix(code),
                    }
                }
                rustify::errors::ClientError::RequestError { source, .. } => {
                    VaultError::Unreachable {
                        address,
                        what,
                        reason: innermost(source.as_ref()),
                    }
                }
                other => VaultError::Unreachable {
                    address,
                    what,
                    reason: innermost(&other),
                },
            },
            ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
                VaultError::Server {
                    address,
                    what,
                    status: 200,
                    errors: vec!["the response had no data".into()],
                    fix: "check the path: a deleted or destroyed version has no data".into(),
                }
            }
            other => VaultError::Client {
                address,
                reason: other.to_string(),
                fix: "check the [vault] settings; this is Vault's answer rotator could not read",
            },
        }
    }
}

/// How often a token that does not expire is checked (it may have been revoked).
pub const PROBE_INTERVAL: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn server_fix(code: u16) -> String {
    match code {
        404 => "check the mount and path".into(),
        400 => "check the request's parameters against the mount's configuration".into(),
        500..=599 => "check the Vault server's log; rotator retries on the next pass".into(),
        _ => "see Vault's message above".into(),
    }
}

/// The last cause of an error chain ("Connection refused (os error 111)"), which
/// says more than reqwest's "error sending request".
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn build_client(settings: &VaultSettings, token: &str) -> Result<VaultClient, VaultError> {
    let mut b = VaultClientSettingsBuilder::default();
    b.address(&settings.address)
        .token(token)
        .timeout(Some(settings.timeout))
        // Only what the configuration says: no VAULT_* variable sneaks in
        // (vaultrs would read VAULT_CACERT, VAULT_SKIP_VERIFY, VAULT_CLIENT_CERT).
        .verify(true)
        .identity(None)
        .ca_certs(
            settings
                .ca_file
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        )
        .namespace(settings.namespace.clone());
    let client_settings = b.build().map_err(|e| VaultError::Client {
        address: settings.address.clone(),
        reason: e.to_string(),
        fix: "check vault.address",
    })?;
    if let Some(ca) = &settings.ca_file {
        // vaultrs reads it too, but its error does not say why; check first.
        let pem = std::fs::read(ca).map_err(|e| VaultError::Client {
            address: settings.address.clone(),
            reason: format!("cannot read vault.ca_file {}: {e}", ca.display()),
            fix: "point vault.ca_file at the PEM bundle of the CA that signed Vault's certificate",
        })?;
        if crate::pki::pem_to_der_certs(&String::from_utf8_lossy(&pem), &ca.display().to_string())
            .is_err()
        {
            return Err(VaultError::Client {
                address: settings.address.clone(),
                reason: format!("vault.ca_file {} holds no PEM certificate", ca.display()),
                fix: "point vault.ca_file at the PEM bundle of the CA that signed Vault's certificate",
            });
        }
    }
    VaultClient::new(client_settings).map_err(|e| VaultError::Client {
        address: settings.address.clone(),
        reason: e.to_string(),
        fix: "check vault.address and vault.ca_file",
    })
}
