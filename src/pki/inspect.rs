//! Reading certificates and CSRs (x509-parser) and checking an issued
//! certificate before anything is stored (chain by rustls-webpki).
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

use super::{KeyType, PkiError, hex, sha256};

/// What rotator records about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CertInfo {
    /// Lowercase hex of the serial's DER integer bytes.
    pub serial: String,
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint: String,
    pub common_name: String,
    pub organizations: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    pub spki_der: Vec<u8>,
    pub is_ca: bool,
}

impl CertInfo {
    pub fn lifetime_seconds(&self) -> i64 {
        self.not_after - self.not_before
    }
}

/// What a CSR asks for, after its self-signature was checked.
#[derive(Debug, Clone)]
pub struct CsrInfo {
    pub common_name: String,
    pub organizations: Vec<String>,
    pub spki_der: Vec<u8>,
    pub der: Vec<u8>,
    /// The request asked for a CA certificate (basicConstraints cA=TRUE).
    pub requests_ca: bool,
    key: Result<KeyType, String>,
}

impl CsrInfo {
    /// The request's key, if it is one rotator issues for.
    pub fn key_type(&self) -> Result<KeyType, PkiError> {
        self.key.clone().map_err(|reason| PkiError::UnsupportedKey {
            what: "certificate signing request",
            reason,
        })
    }
}

fn key_type_of(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyType, String> {
    match spki.parsed() {
        Ok(x509_parser::public_key::PublicKey::EC(ec)) => match ec.key_size() {
            256 => Ok(KeyType::EcdsaP256),
            384 => Ok(KeyType::EcdsaP384),
            n => Err(format!("EC key of {n} bits")),
        },
        Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => match rsa.key_size() {
            2048 => Ok(KeyType::Rsa2048),
            3072 => Ok(KeyType::Rsa3072),
            4096 => Ok(KeyType::Rsa4096),
            n => Err(format!("RSA key of {n} bits")),
        },
        Ok(_) => Err(format!("key algorithm {}", spki.algorithm.algorithm)),
        Err(e) => Err(format!("unreadable public key: {e}")),
    }
}

/// A rustls trust store from a PEM bundle; an error names what is wrong, and an
/// empty bundle is one.
pub fn root_store(pem: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(der.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in the bundle".into());
    }
    Ok(roots)
}

pub fn pem_to_der_certs(pem: &str, origin: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| PkiError::CertParse {
        origin: origin.into(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(PkiError::CertParse {
            origin: origin.into(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs.into_iter().map(|c| c.to_vec()).collect())
}

fn names(name: &X509Name<'_>) -> Result<(String, Vec<String>), String> {
    let mut cns = name.iter_common_name();
    let cn = match (cns.next(), cns.next()) {
        (Some(a), None) => a
            .as_str()
            .map_err(|e| format!("common name is not a string: {e}"))?
            .to_string(),
        (None, _) => return Err("no common name".into()),
        (Some(_), Some(_)) => return Err("more than one common name".into()),
    };
    let orgs = name
        .iter_organization()
        .map(|o| {
            o.as_str()
                .map(str::to_string)
                .map_err(|e| format!("organization is not a string: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((cn, orgs))
}

pub fn parse_cert_der(der: &[u8], origin: &str) -> Result<CertInfo, PkiError> {
    let bad = |reason: String| PkiError::CertParse {
        origin: origin.into(),
        reason,
    };
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the certificate".into()));
    }
    let (common_name, organizations) = names(cert.subject()).map_err(bad)?;
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| bad(e.to_string()))?
        .is_some_and(|b| b.value.ca);
    Ok(CertInfo {
        serial: hex(cert.tbs_certificate.raw_serial()),
        fingerprint: hex(&sha256(der)),
        common_name,
        organizations,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        spki_der: cert.public_key().raw.to_vec(),
        is_ca,
    })
}

/// The first certificate of a PEM bundle.
pub fn parse_cert_pem(pem: &str, origin: &str) -> Result<CertInfo, PkiError> {
    let ders = pem_to_der_certs(pem, origin)?;
    parse_cert_der(&ders[0], origin)
}

/// Parses a PEM or DER CSR and checks that it is signed by the key it carries.
pub fn parse_csr(input: &[u8]) -> Result<CsrInfo, PkiError> {
    let bad = |reason: String| PkiError::CsrParse { reason };
    let der = if input.starts_with(b"-----BEGIN") {
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(input)
            .map_err(|e| bad(format!("not a PEM CERTIFICATE REQUEST: {e}")))?
            .as_ref()
            .to_vec()
    } else {
        input.to_vec()
    };
    let (rest, csr) = X509CertificationRequest::from_der(&der).map_err(|e| bad(e.to_string()))?;
    if !rest.is_empty() {
        return Err(bad("trailing bytes after the request".into()));
    }
    csr.verify_signature().map_err(|e| {
        bad(format!(
            "signature does not verify with the request's own key: {e}"
        ))
    })?;
    let info = &csr.certification_request_info;
    let (common_name, organizations) = names(&info.subject).map_err(bad)?;
    let requests_ca = csr
        .requested_extensions()
        .into_iter()
        .flatten()
        .any(|e| matches!(e, ParsedExtension::BasicConstraints(b) if b.ca));
    let key = key_type_of(&info.subject_pki);
    Ok(CsrInfo {
        common_name,
        organizations,
        spki_der: info.subject_pki.raw.to_vec(),
        der,
        requests_ca,
        key,
    })
}

/// What the issued certificate must be.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    pub spki_der: &'a [u8],
    pub common_name: &'a str,
    pub organizations: &'a [String],
}

/// Checks an issued certificate before anything is stored: it parses, carries our
/// public key and the subject we asked for, is valid now, is not a CA, and chains
/// to one of the CAs in `ca_bundle_pem` for client authentication.
pub fn verify_issued(
    cert_pem: &str,
    expected: &Expected<'_>,
    ca_bundle_pem: &str,
    now: i64,
) -> Result<CertInfo, PkiError> {
    let v = |m: String| PkiError::Verify(m);
    let ders = pem_to_der_certs(cert_pem, "issued certificate").map_err(|e| v(e.to_string()))?;
    let info = parse_cert_der(&ders[0], "issued certificate").map_err(|e| v(e.to_string()))?;
    if info.spki_der != expected.spki_der {
        return Err(v("its public key is not the one we generated".into()));
    }
    if info.common_name != expected.common_name {
        return Err(v(format!(
            "its CN is {:?}, expected {:?}",
            info.common_name, expected.common_name
        )));
    }
    let (mut got, mut want) = (info.organizations.clone(), expected.organizations.to_vec());
    got.sort();
    want.sort();
    if got != want {
        return Err(v(format!("its groups (O) are {got:?}, expected {want:?}")));
    }
    if info.is_ca {
        return Err(v("it is a CA certificate".into()));
    }
    if info.not_after <= now {
        return Err(v(format!("it expired at {} (now {now})", info.not_after)));
    }
    if info.not_before > now {
        return Err(v(format!(
            "it is not valid until {} (now {now}); check clocks",
            info.not_before
        )));
    }
    let anchors_der = pem_to_der_certs(ca_bundle_pem, "CA bundle").map_err(|e| v(e.to_string()))?;
    let anchors = anchors_der
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(d.as_slice()))
                .map(|a| a.to_owned())
                .map_err(|e| v(format!("CA bundle: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = CertificateDer::from(ders[0].as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| v(format!("{e:?}")))?;
    let intermediates: Vec<CertificateDer<'_>> = ders[1..]
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    ee.verify_for_usage(
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all,
        &anchors,
        &intermediates,
        UnixTime::since_unix_epoch(Duration::from_secs(now.max(0) as u64)),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| {
        v(format!(
            "it does not chain to the signer's CA for client auth: {e:?}"
        ))
    })?;
    Ok(info)
}
