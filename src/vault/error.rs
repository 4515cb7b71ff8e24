//! What can go wrong talking to Vault. No variant ever holds a token, a secret id,
//! a JWT or a secret value: only addresses, paths, references and Vault's own
//! error messages (which never echo credentials).
use std::path::PathBuf;

use crate::support::exit::{Exit, ExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(
        "Vault at {address} cannot be reached ({what}): {reason}\nfix: check vault.address and that the server is running and reachable from here"
    )]
    Unreachable {
        address: String,
        what: String,
        reason: String,
    },
    #[error(
        "Vault at {address} is sealed ({what})\nfix: unseal it (bao operator unseal / vault operator unseal); rotator retries by itself"
    )]
    Sealed { address: String, what: String },
    #[error("Vault at {address} refused the {method} login: {reason}\nfix: {fix}")]
    Login {
        address: String,
        method: &'static str,
        reason: String,
        fix: String,
    },
    #[error("Vault {what}: cannot read {path}: {reason}\nfix: {fix}")]
    CredentialFile {
        what: &'static str,
        path: PathBuf,
        reason: String,
        fix: String,
    },
    #[error(
        "Vault at {address}: permission denied for {what}\nfix: grant rotator's Vault policy access to it (bao policy read POLICY), or use another path"
    )]
    Denied { address: String, what: String },
    #[error("Vault at {address}: {what}: {status}{}\nfix: {fix}", messages(.errors))]
    Server {
        address: String,
        what: String,
        status: u16,
        errors: Vec<String>,
        fix: String,
    },
    #[error("Vault client for {address}: {reason}\nfix: {fix}")]
    Client {
        address: String,
        reason: String,
        fix: &'static str,
    },
    #[error("{reference}: {problem}\nfix: {fix}")]
    Reference {
        reference: String,
        problem: String,
        fix: String,
    },
    #[error(
        "Vault at {address}: {path} was changed by another writer (check-and-set expected version {expected})\nfix: nothing to do: the newer version is kept and this delivery is retried on the next pass"
    )]
    CasConflict {
        address: String,
        path: String,
        expected: u64,
    },
}

fn messages(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(" ({})", errors.join("; "))
    }
}

impl VaultError {
    /// A short label for metrics and `/readyz`.
    pub fn state(&self) -> &'static str {
        match self {
            VaultError::Unreachable { .. } => "unreachable",
            VaultError::Sealed { .. } => "sealed",
            VaultError::Login { .. } | VaultError::CredentialFile { .. } => "unauthenticated",
            _ => "error",
        }
    }

    /// An outage met while logging in for `what`: named for `what`.
    pub fn asked_for(self, asked: &str) -> Self {
        match self {
            VaultError::Unreachable {
                address, reason, ..
            } => VaultError::Unreachable {
                address,
                what: asked.to_string(),
                reason,
            },
            VaultError::Sealed { address, .. } => VaultError::Sealed {
                address,
                what: asked.to_string(),
            },
            other => other,
        }
    }

    /// True when the server, not the request, is at fault: retrying later may work.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            VaultError::Unreachable { .. } | VaultError::Sealed { .. }
        )
    }
}

impl ExitStatus for VaultError {
    fn exit(&self) -> Exit {
        match self {
            VaultError::CasConflict { .. } => Exit::Conflict,
            // Rotator cannot do what the configuration asks without Vault.
            _ => Exit::Config,
        }
    }
}
