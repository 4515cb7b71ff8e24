//! The `vault-pki` signer: Vault's (or OpenBao's) PKI engine signs the CSR rotator
//! made, through `<mount>/sign-verbatim/<role>`. Not `<mount>/sign/<role>`: that
//! endpoint keeps only the CSR's CN and takes O from the role, so the generation
//! group (and with it revocation) would be lost (facts 31).
//!
//! `sign-verbatim` copies the CSR's subject *and its requested extensions* (SANs
//! and the like) into the certificate, so this signer enforces the issuing profile
//! before Vault sees the CSR: the subject must be exactly the user and groups the
//! issuer asked for, and no extension may be requested. Key usage and extended
//! key usage are set by the request (`DigitalSignature`, `ClientAuth`). What comes
//! back is verified by the issuer as for every signer (our key, our subject, the
//! validity, a chain to the CA the API server trusts).
use std::sync::Arc;

use serde::Deserialize;
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};

use super::{BoxFuture, Progress, SignError, SignRequest, Signed, Signer};
use crate::pki;
use crate::vault::{Vault, VaultError};

/// Vault's warning when a role's `max_ttl` shortened the lifetime asked for
/// (`TTL "72h0m0s" is longer than permitted maxTTL "48h0m0s", so maxTTL is being used`).
const MAX_TTL_WARNING: &str = "maxTTL";

/// The body of `POST <mount>/sign-verbatim/<role>`.
#[derive(Debug, serde::Serialize)]
struct SignVerbatim {
    #[serde(skip)]
    path: String,
    csr: String,
    /// Seconds, as Vault's duration syntax.
    ttl: String,
    key_usage: [&'static str; 1],
    ext_key_usage: [&'static str; 1],
    format: &'static str,
}

/// The whole response envelope: vaultrs' own helpers drop `warnings`, and the
/// role's `max_ttl` speaks only through them.
#[derive(Debug, Deserialize)]
struct Envelope {
    data: Option<SignedData>,
    #[serde(default)]
    warnings: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct SignedData {
    certificate: String,
    #[serde(default)]
    ca_chain: Vec<String>,
}

impl rustify::Endpoint for SignVerbatim {
    type Response = Envelope;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        self.path.clone()
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        serde_json::to_vec(self)
            .map(Some)
            .map_err(|e| rustify::errors::ClientError::DataParseError { source: e.into() })
    }
}

/// The CSR as this signer will let Vault copy it: exactly `user` and
/// `organizations` in the subject, no requested extension.
pub fn check_csr(req: &SignRequest<'_>) -> Result<(), SignError> {
    let csr = req.checked_csr()?;
    let (_, parsed) = X509CertificationRequest::from_der(&csr.der)
        .map_err(|e| SignError::Refused(format!("the CSR does not parse: {e}")))?;
    // sign-verbatim would copy these (SANs, constraints...) into the certificate.
    let requested: Vec<String> = parsed
        .requested_extensions()
        .into_iter()
        .flatten()
        .map(|e| format!("{e:?}"))
        .collect();
    let has_extension_request = parsed
        .certification_request_info
        .attributes()
        .iter()
        .any(|a| a.oid == x509_parser::oid_registry::OID_PKCS9_EXTENSION_REQUEST);
    if !requested.is_empty() || has_extension_request {
        return Err(SignError::Refused(format!(
            "the CSR requests extensions ({}); Vault's sign-verbatim would copy them into the certificate, so the vault-pki signer signs only CSRs without any",
            if requested.is_empty() {
                "an extension request".to_string()
            } else {
                requested.join(", ")
            }
        )));
    }
    Ok(())
}

/// The leaf, then whatever intermediates Vault's chain holds (a self-signed
/// root is the API server's business, not the kubeconfig's).
fn bundle(data: &SignedData) -> Result<String, SignError> {
    let mut out = data.certificate.trim().to_string();
    out.push('\n');
    for pem in &data.ca_chain {
        for der in pki::pem_to_der_certs(pem, "Vault's ca_chain")? {
            let (_, c) = X509Certificate::from_der(&der)
                .map_err(|e| SignError::Refused(format!("Vault's ca_chain does not parse: {e}")))?;
            if c.subject().as_raw() != c.issuer().as_raw() {
                out.push_str(&pki::pem_encode("CERTIFICATE", &der));
            }
        }
    }
    Ok(out)
}

/// A role's refusal, with Vault's own words.
fn role_refused(mount: &str, role: &str, what: &str, fix: &str) -> SignError {
    SignError::Refused(format!(
        "Vault's PKI role {mount}/roles/{role} refused the request: {what}\nfix: {fix}"
    ))
}

/// The signer for `signer = "vault-pki"`: `[vault_pki]` names the mount and
/// role, `[vault]` the connection. Vault is asked for the mount's CA chain at
/// once, so an unreachable or sealed Vault, or a wrong mount, is a clear error
/// now rather than at the first issuance.
pub async fn open(
    settings: &crate::config::Settings,
    vault: Option<Arc<Vault>>,
    client_ca_pem: String,
) -> Result<VaultPkiSigner, SignError> {
    let vp = &settings.vault_pki;
    let role = vp.role.clone().ok_or_else(|| SignError::CaUnavailable {
        path: "vault_pki.role".into(),
        reason: "signer = \"vault-pki\" needs the PKI role that signs".into(),
        fix: "set [vault_pki] role (and mount, default \"pki\") to a role allowed to sign-verbatim client certificates".into(),
    })?;
    let vault = vault.ok_or_else(|| SignError::CaUnavailable {
        path: "vault.address".into(),
        reason: "signer = \"vault-pki\" signs through Vault, but [vault] is not configured".into(),
        fix: "set [vault] address and its auth method (see config/rotator.toml)".into(),
    })?;
    let signer = VaultPkiSigner::new(vault, vp.mount.clone(), role, client_ca_pem);
    signer.mount_ca_chain().await?;
    Ok(signer)
}

/// The vault-pki backend of `rotator signer`: the same mount and role, and
/// the mount's own CA chain as the CA it reports (the signer process has no
/// cluster to ask for the client CA; the daemon checks the two match).
pub async fn open_for_signer_process(
    settings: &crate::config::Settings,
    vault: Option<Arc<Vault>>,
) -> Result<VaultPkiSigner, SignError> {
    let mut signer = open(settings, vault, String::new()).await?;
    signer.client_ca_pem = signer.mount_ca_chain().await?;
    Ok(signer)
}

pub struct VaultPkiSigner {
    vault: Arc<Vault>,
    mount: String,
    role: String,
    client_ca_pem: String,
}

impl std::fmt::Debug for VaultPkiSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the client: it holds the Vault token.
        f.debug_struct("VaultPkiSigner")
            .field("address", &self.vault.address())
            .field("mount", &self.mount)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl VaultPkiSigner {
    pub fn new(vault: Arc<Vault>, mount: String, role: String, client_ca_pem: String) -> Self {
        Self {
            vault,
            mount,
            role,
            client_ca_pem,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("{}/sign-verbatim/{}", self.mount, self.role)
    }

    /// The mount's CA chain (`<mount>/cert/ca_chain`), PEM.
    pub async fn mount_ca_chain(&self) -> Result<String, SignError> {
        let what = format!("read {}/cert/ca_chain", self.mount);
        let r = self
            .vault
            .call(&what, |c| {
                let mount = self.mount.clone();
                async move { vaultrs::pki::cert::read(&*c, &mount, "ca_chain").await }
            })
            .await?;
        Ok(r.certificate)
    }

    /// The certificate Vault signs for `req`, with no check of its own: the
    /// caller has checked the CSR ([`check_csr`], and in `rotator signer` the
    /// signer's policy).
    pub(crate) async fn sign_verbatim(&self, req: &SignRequest<'_>) -> Result<String, SignError> {
        let csr = pki::pem_encode("CERTIFICATE REQUEST", req.csr_der);
        let what = format!("sign through {}", self.endpoint());
        let signed = self
            .vault
            .call(&what, |c| {
                let endpoint = SignVerbatim {
                    path: self.endpoint(),
                    csr: csr.clone(),
                    ttl: format!("{}s", req.ttl.as_secs()),
                    key_usage: ["DigitalSignature"],
                    ext_key_usage: ["ClientAuth"],
                    format: "pem",
                };
                async move { vaultrs::api::exec_with_no_result(&*c, endpoint).await }
            })
            .await;
        let env = match signed {
            Ok(env) => env,
            // A role's refusal (400): its own words, a signer refusal.
            Err(VaultError::Server {
                status: 400,
                errors,
                ..
            }) => {
                return Err(role_refused(
                    &self.mount,
                    &self.role,
                    &errors.join("; "),
                    &format!(
                        "change the role (bao read {}/roles/{}) or what rotator asks for (policy, --ttl)",
                        self.mount, self.role
                    ),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        // A role whose max_ttl is shorter than the lifetime asked makes Vault sign
        // for less and only warn; rotator refuses instead of handing out a
        // credential that expires before policy says (the key is dropped here).
        if let Some(w) = env
            .warnings
            .iter()
            .flatten()
            .find(|w| w.contains(MAX_TTL_WARNING))
        {
            return Err(role_refused(
                &self.mount,
                &self.role,
                w,
                &format!(
                    "raise the role's max_ttl to at least {}s (bao write {}/roles/{} max_ttl=...), or ask for a shorter lifetime (--ttl, policy.default_ttl / max_ttl)",
                    req.ttl.as_secs(),
                    self.mount,
                    self.role
                ),
            ));
        }
        let data = env.data.ok_or_else(|| VaultError::Server {
            address: self.vault.address().to_string(),
            what,
            status: 200,
            errors: vec!["the answer holds no certificate".into()],
            fix: "check that the mount is a PKI secrets engine".into(),
        })?;
        bundle(&data)
    }
}

impl Signer for VaultPkiSigner {
    fn kind(&self) -> &'static str {
        "vault-pki"
    }

    /// The API server's client CA: what a certificate must chain to for the
    /// cluster to accept it, whatever Vault's mount holds.
    fn ca_bundle_pem(&self) -> &str {
        &self.client_ca_pem
    }

    fn sign<'a>(
        &'a self,
        req: SignRequest<'a>,
        // One external step, and nothing after it before the store: nothing to journal.
        _progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<Signed, SignError>> {
        Box::pin(async move {
            check_csr(&req)?;
            let certificate_pem = self.sign_verbatim(&req).await?;
            Ok(Signed { certificate_pem })
        })
    }

    fn check_trust<'a>(&'a self) -> BoxFuture<'a, Option<Result<String, String>>> {
        Box::pin(async move {
            Some(match self.mount_ca_chain().await {
                Ok(chain) => vault_ca_trusted(&chain, &self.client_ca_pem),
                Err(e) => Err(e.to_string()),
            })
        })
    }

    fn cleanup<'a>(&'a self, _credential_id: &'a str) -> BoxFuture<'a, Result<(), SignError>> {
        // Nothing of an issuance stays in Vault that rotator could remove: a
        // role with no_store keeps nothing, and a stored certificate whose key
        // rotator dropped grants nothing (its generation group is never bound).
        Box::pin(async { Ok(()) })
    }
}

/// Whether the API server, trusting `client_ca_pem`, would accept certificates
/// Vault's mount issues: one of the mount's CA chain is an anchor of the bundle.
pub fn vault_ca_trusted(vault_chain_pem: &str, client_ca_pem: &str) -> Result<String, String> {
    let ours = pki::pem_to_der_certs(client_ca_pem, "the cluster's client CA")
        .map_err(|e| e.to_string())?;
    let theirs = pki::pem_to_der_certs(vault_chain_pem, "the PKI mount's CA chain")
        .map_err(|e| e.to_string())?;
    let key = |der: &[u8]| -> Option<(Vec<u8>, Vec<u8>)> {
        let (_, c) = X509Certificate::from_der(der).ok()?;
        Some((c.subject().as_raw().to_vec(), c.public_key().raw.to_vec()))
    };
    let anchors: Vec<_> = ours.iter().filter_map(|d| key(d)).collect();
    let name = |der: &[u8]| {
        X509Certificate::from_der(der)
            .map(|(_, c)| c.subject().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    for der in &theirs {
        if let Some(k) = key(der)
            && anchors.contains(&k)
        {
            return Ok(format!(
                "the PKI mount's CA {} is one the API server trusts for client certificates",
                name(der)
            ));
        }
    }
    Err(format!(
        "the PKI mount's CA ({}) is not the API server's client CA ({}); every certificate Vault signs would be refused by the API server",
        theirs
            .iter()
            .map(|d| name(d))
            .collect::<Vec<_>>()
            .join(", "),
        ours.iter().map(|d| name(d)).collect::<Vec<_>>().join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{KeyType, PrivateKey};
    use std::time::Duration;

    fn request<'a>(csr: &'a [u8], orgs: &'a [String]) -> SignRequest<'a> {
        SignRequest {
            credential_id: "c1",
            user: "alice",
            organizations: orgs,
            csr_der: csr,
            ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn rotators_own_csr_passes_and_a_different_subject_is_refused() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let orgs = vec!["dev".to_string(), "rotator:alice:1.abc".to_string()];
        let der = pki::build_csr(&key, &pki::subject_name("alice", &orgs).unwrap()).unwrap();
        check_csr(&request(&der, &orgs)).unwrap();
        let fewer = vec!["dev".to_string()];
        let e = check_csr(&request(&der, &fewer)).unwrap_err().to_string();
        assert!(e.contains("are not the allowed groups"), "{e}");
    }

    #[test]
    fn a_csr_requesting_extensions_is_refused_before_vault_could_copy_them() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let kp = rcgen::KeyPair::from_pem(&key.to_pem()).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let der = p.serialize_request(&kp).unwrap().der().to_vec();
        let e = check_csr(&request(&der, &[])).unwrap_err().to_string();
        assert!(e.contains("requests extensions"), "{e}");
    }

    #[test]
    fn trust_is_decided_by_subject_and_key_not_by_file_bytes() {
        let ca = |cn: &str| {
            let k = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.self_signed(&k).unwrap().pem()
        };
        let (a, b) = (ca("cluster-ca"), ca("vault-ca"));
        assert!(vault_ca_trusted(&a, &a).unwrap().contains("cluster-ca"));
        let e = vault_ca_trusted(&b, &a).unwrap_err();
        assert!(e.contains("vault-ca") && e.contains("cluster-ca"), "{e}");
        // A bundle of several CAs: trusted when any one matches.
        assert!(vault_ca_trusted(&a, &format!("{b}{a}")).is_ok());
    }
}
