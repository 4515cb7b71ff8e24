//! One trait, several backends. A signer turns a CSR into a certificate; it never
//! sees a private key, and it enforces the issuing profile itself.
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::exit::{Exit, ExitStatus};
use crate::pki::PkiError;

mod local_ca;
pub use local_ca::LocalCa;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("local CA unavailable ({path}): {reason}\nfix: {fix}")]
    CaUnavailable {
        path: String,
        reason: String,
        fix: String,
    },
    #[error("the signer refused the request: {0}")]
    Refused(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
}

impl ExitStatus for SignError {
    fn exit(&self) -> Exit {
        match self {
            SignError::CaUnavailable { .. } => Exit::Signer,
            SignError::Refused(_) => Exit::Signer,
            SignError::Pki(e) => e.exit(),
        }
    }
}

/// What to sign. `organizations` is the full O list, generation group included:
/// the signer refuses a CSR whose subject says anything else.
#[derive(Debug, Clone)]
pub struct SignRequest<'a> {
    pub credential_id: &'a str,
    pub user: &'a str,
    pub organizations: &'a [String],
    pub csr_der: &'a [u8],
    pub ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Signed {
    /// The leaf certificate, PEM (intermediates may follow).
    pub certificate_pem: String,
}

pub trait Signer: Send + Sync {
    /// `local-ca`, `kubernetes`, ...; recorded with every credential.
    fn kind(&self) -> &'static str;
    /// The CA(s) issued certificates must chain to.
    fn ca_bundle_pem(&self) -> &str;
    fn sign<'a>(&'a self, req: SignRequest<'a>) -> BoxFuture<'a, Result<Signed, SignError>>;
    /// Removes whatever `sign` left outside rotator for this credential (a CSR
    /// object); called when an issuance is abandoned. Idempotent.
    fn abandon<'a>(&'a self, credential_id: &'a str) -> BoxFuture<'a, Result<(), SignError>>;
}
