//! The `local-ca` signer with the CA key in this process. The key is read only here
//! (and, for `rotator signer`, only in that process: see `service.rs`).
use std::path::Path;
use std::sync::Arc;

use x509_cert::name::Name;
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

use crate::config::LocalCaSettings;
use crate::pki::{self, CertProfile, KeyType, PrivateKey};
use crate::signer::{BoxFuture, SignError, SignRequest, Signed, Signer};
use crate::support::clock::Clock;

/// Kubernetes' csrsigning controller backdates by five minutes for clock skew; so do we.
pub const BACKDATE_SECONDS: i64 = 300;

pub struct LocalCa {
    key: PrivateKey,
    cert_pem: String,
    subject: Name,
    key_id: Option<Vec<u8>>,
    not_after: i64,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("key", &self.key)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn unavailable(path: &Path, reason: impl ToString, fix: &str) -> SignError {
    SignError::CaUnavailable {
        path: path.display().to_string(),
        reason: reason.to_string(),
        fix: fix.to_string(),
    }
}

impl LocalCa {
    /// Loads the CA; creates it first when the paths are rotator's defaults and no
    /// CA exists yet. Returns whether it was created. A configured CA is never created.
    pub fn ensure(
        settings: &LocalCaSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, bool), SignError> {
        let cert_exists = settings.cert_file.exists();
        let key_exists = settings.key_file.exists();
        match (cert_exists, key_exists) {
            (true, true) => Ok((Self::load(settings, clock)?, false)),
            (false, false) if !settings.configured => Ok((Self::create(settings, clock)?, true)),
            (false, false) => Err(unavailable(
                &settings.cert_file,
                "the configured CA certificate and key do not exist",
                "point local_ca.cert_file and local_ca.key_file at your CA (kubeadm: /etc/kubernetes/pki/ca.crt and ca.key), or remove both to let rotator create one",
            )),
            (true, false) => Err(unavailable(
                &settings.key_file,
                "the CA key is missing but its certificate exists",
                "restore the key file; rotator will not replace a CA whose certificate is still trusted",
            )),
            (false, true) => Err(unavailable(
                &settings.cert_file,
                "the CA certificate is missing but its key exists",
                "restore the certificate file",
            )),
        }
    }

    pub fn load(settings: &LocalCaSettings, clock: Arc<dyn Clock>) -> Result<Self, SignError> {
        let cert_pem = std::fs::read_to_string(&settings.cert_file).map_err(|e| {
            unavailable(
                &settings.cert_file,
                e,
                "check the path and that rotator may read it",
            )
        })?;
        let key_pem =
            pki::read_private(&settings.key_file, "CA key file").map_err(|e| match e {
                pki::ReadPrivate::Mode(e) => SignError::Pki(e),
                pki::ReadPrivate::Io(e) => unavailable(
                    &settings.key_file,
                    e,
                    "check the path and that rotator may read it",
                ),
            })?;
        let key = PrivateKey::from_pem(&key_pem, &settings.key_file.display().to_string())?;
        Self::from_parts(key, cert_pem, &settings.cert_file, clock)
    }

    /// A CA from PEM text held in memory (`vault:` references: nothing of it
    /// is read from or written to disk). The origins name it in errors.
    pub fn from_pems(
        key_pem: &str,
        key_origin: &str,
        cert_pem: String,
        cert_origin: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SignError> {
        let key = PrivateKey::from_pem(key_pem, key_origin)?;
        Self::from_parts(key, cert_pem, cert_origin, clock)
    }

    fn from_parts(
        key: PrivateKey,
        cert_pem: String,
        cert_path: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SignError> {
        let origin = cert_path.display().to_string();
        let ders = pki::pem_to_der_certs(&cert_pem, &origin)?;
        let info = pki::parse_cert_der(&ders[0], &origin)?;
        if info.spki_der != key.spki_der() {
            return Err(unavailable(
                cert_path,
                "the CA key does not belong to this certificate",
                "pair the certificate with its own key",
            ));
        }
        if !info.is_ca {
            return Err(unavailable(
                cert_path,
                "the certificate is not a CA (basicConstraints cA is not TRUE)",
                "use the cluster's client CA",
            ));
        }
        let (_, x509) = X509Certificate::from_der(&ders[0])
            .map_err(|e| unavailable(cert_path, e, "give a DER/PEM X.509 certificate"))?;
        let key_id = x509
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
                _ => None,
            });
        let subject = pki::certificate_subject(&ders[0])?;
        Ok(Self {
            key,
            cert_pem,
            subject,
            key_id,
            not_after: info.not_after,
            clock,
        })
    }

    /// Makes an ECDSA P-256 CA, writes the key (0600) and certificate atomically.
    pub fn create(settings: &LocalCaSettings, clock: Arc<dyn Clock>) -> Result<Self, SignError> {
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let now = clock.now();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, settings.common_name.as_str());
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&pki::random_serial()));
        params.not_before =
            time::OffsetDateTime::from_unix_timestamp(now - BACKDATE_SECONDS).expect("valid time");
        params.not_after =
            time::OffsetDateTime::from_unix_timestamp(now + settings.validity.as_secs() as i64)
                .expect("valid time");
        let cert = params
            .self_signed(key.rcgen())
            .map_err(|e| SignError::Pki(pki::PkiError::Sign(e.to_string())))?;
        let cert_pem = cert.pem();
        let dir_fix = "make the data directory writable by rotator";
        crate::support::fsutil::write_private_atomic(&settings.key_file, key.to_pem().as_bytes())
            .map_err(|e| unavailable(&settings.key_file, e, dir_fix))?;
        crate::support::fsutil::write_public_atomic(&settings.cert_file, cert_pem.as_bytes())
            .map_err(|e| unavailable(&settings.cert_file, e, dir_fix))?;
        Self::from_parts(key, cert_pem, &settings.cert_file, clock)
    }

    pub fn certificate_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The issuing profile: subject, validity, serial and every extension are set
    /// here; the CSR contributes only its public key, once its subject matched.
    pub fn issue(&self, req: &SignRequest<'_>, profile: CertProfile) -> Result<String, SignError> {
        let csr = req.checked_csr()?;
        let now = self.clock.now();
        let not_after = (now + req.ttl.as_secs() as i64).min(self.not_after);
        if not_after <= now {
            return Err(SignError::Refused(
                "the local CA has expired; create or configure a new one".into(),
            ));
        }
        let der = pki::sign_certificate(
            &self.key,
            &self.subject,
            self.key_id.as_deref(),
            pki::subject_name(req.user, req.organizations)?,
            pki::csr_public_key(&csr.der)?,
            &pki::random_serial(),
            now - BACKDATE_SECONDS,
            not_after,
            profile,
            &[],
        )?;
        Ok(pki::pem_encode("CERTIFICATE", &der))
    }

    /// A serving certificate for rotator's own HTTPS API, for `names` (DNS names
    /// or IP addresses), valid for `ttl` or until the CA expires.
    pub fn issue_server(
        &self,
        key: &PrivateKey,
        names: &[String],
        ttl: std::time::Duration,
    ) -> Result<String, SignError> {
        let now = self.clock.now();
        let not_after = (now + ttl.as_secs() as i64).min(self.not_after);
        let cn = names.first().map(String::as_str).unwrap_or("rotator");
        let der = pki::sign_certificate(
            &self.key,
            &self.subject,
            self.key_id.as_deref(),
            pki::subject_name(cn, &[])?,
            key.spki()?,
            &pki::random_serial(),
            now - BACKDATE_SECONDS,
            not_after,
            CertProfile::Server,
            names,
        )?;
        Ok(pki::pem_encode("CERTIFICATE", &der))
    }
}

impl Signer for LocalCa {
    fn kind(&self) -> &'static str {
        "local-ca"
    }

    fn ca_bundle_pem(&self) -> &str {
        &self.cert_pem
    }

    fn sign<'a>(
        &'a self,
        req: SignRequest<'a>,
        _: &'a dyn crate::signer::Progress,
    ) -> BoxFuture<'a, Result<Signed, SignError>> {
        Box::pin(async move {
            Ok(Signed {
                certificate_pem: self.issue(&req, CertProfile::Client)?,
            })
        })
    }

    fn cleanup<'a>(&'a self, _credential_id: &'a str) -> BoxFuture<'a, Result<(), SignError>> {
        // Nothing outside rotator exists for a local signature.
        Box::pin(async { Ok(()) })
    }
}
