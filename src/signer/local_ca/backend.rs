//! What `rotator signer` signs with once its policy has passed a request: the
//! local CA key it loaded, or Vault's PKI engine through a token only this
//! process holds. Vault's `sign-verbatim` copies whatever subject it is given
//! (`O=system:masters` included), so the token that may call it must sit
//! behind this process's policy, never in the daemon (#22).
use std::sync::Arc;

use super::in_process::LocalCa;
use super::service::{Refusal, ServiceError};
use super::wire::Code;
use crate::pki::CertProfile;
use crate::signer::vault_pki::{self, VaultPkiSigner};
use crate::signer::{SignError, SignRequest};

pub enum Backend {
    LocalCa(LocalCa),
    VaultPki(VaultPkiSigner),
}

impl Backend {
    /// The vault-pki backend for `rotator signer` (`signer = "vault-pki"` in
    /// its own configuration): Vault is asked for the mount's CA chain now, so
    /// a wrong token, mount or address stops the signer at start.
    pub async fn open_vault_pki(settings: &crate::config::Settings) -> Result<Self, ServiceError> {
        let vault = settings
            .vault
            .as_ref()
            .map(crate::vault::Vault::new)
            .transpose()?
            .map(Arc::new);
        Ok(Backend::VaultPki(
            vault_pki::open_for_signer_process(settings, vault).await?,
        ))
    }

    /// What the signer answers on `GET /v1/ca`: the local CA, or the PKI
    /// mount's CA chain (the daemon checks it against the cluster's client CA).
    pub fn ca_pem(&self) -> &str {
        match self {
            Backend::LocalCa(ca) => ca.certificate_pem(),
            Backend::VaultPki(v) => crate::signer::Signer::ca_bundle_pem(v),
        }
    }

    /// Signs a request the service's policy already accepted.
    pub async fn issue(&self, req: &SignRequest<'_>) -> Result<String, Refusal> {
        match self {
            Backend::LocalCa(ca) => ca
                .issue(req, CertProfile::Client)
                .map_err(|e| refusal(Code::CaExpired, &e)),
            Backend::VaultPki(v) => {
                // sign-verbatim would copy requested extensions (SANs,
                // basicConstraints) into the certificate: none may pass.
                vault_pki::check_csr(req).map_err(|e| refusal(Code::ExtensionRequested, &e))?;
                v.sign_verbatim(req).await.map_err(|e| match e {
                    SignError::Refused(_) => refusal(Code::VaultRefused, &e),
                    SignError::Vault(_) => refusal(Code::VaultUnavailable, &e),
                    _ => refusal(Code::Internal, &e),
                })
            }
        }
    }
}

/// A refusal carrying the error's own message and fix (split at `\nfix: `).
fn refusal(code: Code, e: &SignError) -> Refusal {
    let text = e.to_string();
    let (message, fix) = match text.split_once("\nfix: ") {
        Some((m, f)) => (m.to_string(), f.to_string()),
        None => (text, "see the message".to_string()),
    };
    Refusal { code, message, fix }
}
