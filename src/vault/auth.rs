//! Logging in: each `auth_method` turns what the configuration points at (a token
//! file, an AppRole secret id file, a service-account JWT) into a Vault token.
//! Credential files are read at every login, so an agent or kubelet may rotate them.
use std::path::Path;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use vaultrs::client::VaultClient;
use zeroize::Zeroizing;

use super::error::VaultError;
use super::settings::{VaultAuth, VaultSettings};

/// A token and how long Vault said it lives.
pub struct Login {
    pub token: SecretString,
    /// `None`: the token does not expire (a root token).
    pub ttl: Option<Duration>,
    pub renewable: bool,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("token", &"...")
            .field("ttl", &self.ttl)
            .field("renewable", &self.renewable)
            .finish()
    }
}

fn read_credential(
    what: &'static str,
    path: &Path,
    fix: &'static str,
) -> Result<SecretString, VaultError> {
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| VaultError::CredentialFile {
        what,
        path: path.into(),
        reason: e.to_string(),
        fix: fix.into(),
    })?);
    let text = std::str::from_utf8(&bytes).map_err(|_| VaultError::CredentialFile {
        what,
        path: path.into(),
        reason: "not UTF-8 text".into(),
        fix: fix.into(),
    })?;
    nonempty(what, path, text, fix)
}

/// Like [`read_credential`], for a secret rotator's operator puts in a file
/// (the AppRole secret id): refused when group or others may read it, by the
/// rule of the CA and sealing keys ([`crate::pki::read_private`]), since the
/// secret id and the role id together are a login.
fn read_private_credential(
    what: &'static str,
    path: &Path,
    fix: &'static str,
) -> Result<SecretString, VaultError> {
    let text = crate::pki::read_private(path, what).map_err(|e| match e {
        crate::pki::ReadPrivate::Io(e) => VaultError::CredentialFile {
            what,
            path: path.into(),
            reason: e.to_string(),
            fix: fix.into(),
        },
        crate::pki::ReadPrivate::Mode(e) => {
            let mode = match e {
                crate::pki::PkiError::KeyFileMode { mode, .. } => mode,
                _ => 0,
            };
            VaultError::CredentialFile {
                what,
                path: path.into(),
                reason: format!("it is readable or writable by group or others (mode {mode:04o})"),
                fix: format!(
                    "chmod 600 {} (only rotator's user may read the secret id)",
                    path.display()
                ),
            }
        }
    })?;
    nonempty(what, path, &text, fix)
}

fn nonempty(
    what: &'static str,
    path: &Path,
    text: &str,
    fix: &'static str,
) -> Result<SecretString, VaultError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(VaultError::CredentialFile {
            what,
            path: path.into(),
            reason: "the file is empty".into(),
            fix: fix.into(),
        });
    }
    Ok(SecretString::from(t.to_string()))
}

/// The token the `token` method uses: `token_file`, else `VAULT_TOKEN`.
pub fn configured_token(settings: &VaultSettings) -> Result<SecretString, VaultError> {
    match &settings.auth {
        VaultAuth::Token {
            token_file: Some(p),
            ..
        } => read_credential(
            "token file",
            p,
            "check vault.token_file: it must hold the Vault token rotator uses",
        ),
        VaultAuth::Token {
            env_token: Some(t), ..
        } => Ok(t.clone()),
        VaultAuth::Token { .. } => Err(VaultError::Login {
            address: settings.address.clone(),
            method: "token",
            reason: "no token: neither vault.token_file nor VAULT_TOKEN is set".into(),
            fix: "set vault.token_file to a file holding the token, or VAULT_TOKEN, or choose vault.auth_method = \"approle\" or \"kubernetes\"".into(),
        }),
        _ => unreachable!("only for the token method"),
    }
}

/// Logs in with AppRole or Kubernetes; the token method has nothing to log in
/// with (the client checks the token with a lookup instead).
pub async fn login(
    settings: &VaultSettings,
    client: &VaultClient,
) -> Result<vaultrs::api::AuthInfo, LoginFailure> {
    match &settings.auth {
        VaultAuth::Token { .. } => unreachable!("the token method does not log in"),
        VaultAuth::AppRole {
            mount,
            role_id,
            secret_id_file,
        } => {
            let secret_id = read_private_credential(
                "AppRole secret id file",
                secret_id_file,
                "check vault.secret_id_file: it must hold a secret id of vault.role_id (bao write -f auth/approle/role/NAME/secret-id)",
            )
            .map_err(LoginFailure::Local)?;
            vaultrs::auth::approle::login(client, mount, role_id, secret_id.expose_secret())
                .await
                .map_err(LoginFailure::Vault)
        }
        VaultAuth::Kubernetes {
            mount,
            role,
            jwt_file,
        } => {
            let jwt = read_credential(
                "service-account token file",
                jwt_file,
                "check vault.jwt_file: in a pod it is the projected service-account token (the default path)",
            )
            .map_err(LoginFailure::Local)?;
            vaultrs::auth::kubernetes::login(client, mount, role, jwt.expose_secret())
                .await
                .map_err(LoginFailure::Vault)
        }
    }
}

/// Why a login failed: before asking Vault, or Vault's answer.
pub enum LoginFailure {
    Local(VaultError),
    Vault(vaultrs::error::ClientError),
}

/// The fix for a refused login, per method.
pub fn login_fix(settings: &VaultSettings) -> String {
    match &settings.auth {
        VaultAuth::Token { token_file, .. } => match token_file {
            Some(p) => format!(
                "put a valid token in {} (the one there is revoked, expired or unknown)",
                p.display()
            ),
            None => "give a valid VAULT_TOKEN (the one set is revoked, expired or unknown), or use vault.token_file so it can be replaced without a restart".into(),
        },
        VaultAuth::AppRole { mount, .. } => format!(
            "check vault.role_id and the secret id in vault.secret_id_file against auth/{mount} (a secret id may have expired or run out of uses)"
        ),
        VaultAuth::Kubernetes { mount, role, .. } => format!(
            "check that role {role:?} exists at auth/{mount}, binds this service account and namespace, and that auth/{mount}/config can reach the API server's TokenReview"
        ),
    }
}
