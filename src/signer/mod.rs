//! One trait, several backends. A signer turns a CSR into a certificate; it never
//! sees a private key, and it enforces the issuing profile itself.
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::pki::PkiError;
use crate::support::exit::{Exit, ExitStatus};

mod kubernetes;
pub mod local_ca;
pub mod vault_pki;
pub use kubernetes::KubernetesSigner;
pub use local_ca::LocalCa;
pub use local_ca::socket::SocketSigner;
pub use vault_pki::VaultPkiSigner;

use crate::store::issuances::Step;

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
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("the issuance could not record its progress: {0}")]
    Journal(String),
    /// Vault (vault-pki) unreachable, sealed, denying: the issuance fails
    /// cleanly and the next pass retries it.
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
}

impl ExitStatus for SignError {
    fn exit(&self) -> Exit {
        match self {
            SignError::CaUnavailable { .. } => Exit::Signer,
            SignError::Refused(_) => Exit::Signer,
            SignError::Pki(e) => e.exit(),
            SignError::Cluster(e) => e.exit(),
            SignError::Journal(_) => Exit::Database,
            SignError::Vault(e) => e.exit(),
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

impl SignRequest<'_> {
    /// The CSR, parsed, once its subject is exactly the user and groups the
    /// issuer decided, with a key rotator issues for: the contract every
    /// signer keeps before anything leaves the process.
    pub fn checked_csr(&self) -> Result<crate::pki::CsrInfo, SignError> {
        let csr = crate::pki::parse_csr(self.csr_der)?;
        if csr.common_name != self.user {
            return Err(SignError::Refused(format!(
                "CSR common name {:?} is not the user {:?}",
                csr.common_name, self.user
            )));
        }
        let (mut got, mut want) = (csr.organizations.clone(), self.organizations.to_vec());
        got.sort();
        want.sort();
        if got != want {
            return Err(SignError::Refused(format!(
                "CSR groups {got:?} are not the allowed groups {want:?}"
            )));
        }
        csr.key_type()?;
        Ok(csr)
    }
}

#[derive(Debug, Clone)]
pub struct Signed {
    /// The leaf certificate, PEM (intermediates may follow).
    pub certificate_pem: String,
}

/// Where a signer records each external step before taking the next, so a
/// crashed issuance can be found and cleaned up (the issuance journal).
pub trait Progress: Send + Sync {
    fn step<'a>(
        &'a self,
        step: Step,
        csr_name: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), SignError>>;
}

/// For signing outside an issuance (benchmarks, tests).
pub struct NoProgress;

impl Progress for NoProgress {
    fn step<'a>(&'a self, _: Step, _: Option<&'a str>) -> BoxFuture<'a, Result<(), SignError>> {
        Box::pin(async { Ok(()) })
    }
}

pub trait Signer: Send + Sync {
    /// `local-ca`, `kubernetes`, ...; recorded with every credential.
    fn kind(&self) -> &'static str;
    /// The CA(s) issued certificates must chain to.
    fn ca_bundle_pem(&self) -> &str;
    fn sign<'a>(
        &'a self,
        req: SignRequest<'a>,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<Signed, SignError>>;
    /// Removes whatever `sign` left outside rotator for this credential (a CSR
    /// object): once the certificate is stored, and when an issuance fails or is
    /// abandoned. Idempotent.
    fn cleanup<'a>(&'a self, credential_id: &'a str) -> BoxFuture<'a, Result<(), SignError>>;
    /// For `doctor`, when what signs is not itself the CA the API server trusts
    /// (vault-pki): `Ok(detail)` when the API server would accept what this
    /// signer issues, `Err(why not)` otherwise. `None`: nothing to check.
    fn check_trust<'a>(&'a self) -> BoxFuture<'a, Option<Result<String, String>>> {
        Box::pin(async { None })
    }
}
