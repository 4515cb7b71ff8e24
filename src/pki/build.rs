//! Building CSRs and certificates. The issuing profile is decided here and only
//! here: whatever a CSR asks for (validity, extensions, a CA bit) is ignored.
use std::time::Duration;

use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::der::asn1::Ia5String;
use x509_cert::der::asn1::{
    BitString, ObjectIdentifier, OctetString, SetOfVec, UtcTime, Utf8StringRef,
};
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::{Any, Decode, Encode};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::request::{CertReq, CertReqInfo};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

use super::{PkiError, PrivateKey, sha256};

const OID_CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
const OID_O: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
const OID_KP_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");
const OID_KP_SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");

fn enc<T>(r: Result<T, x509_cert::der::Error>) -> Result<T, PkiError> {
    r.map_err(|e| PkiError::Encode(e.to_string()))
}

fn rdn(oid: ObjectIdentifier, value: &str) -> Result<RelativeDistinguishedName, PkiError> {
    let value = enc(Any::encode_from(&enc(Utf8StringRef::new(value))?))?;
    Ok(RelativeDistinguishedName(enc(SetOfVec::try_from(vec![
        AttributeTypeAndValue { oid, value },
    ]))?))
}

/// `O=<each group>, CN=<user>`, one RDN per value, in the order Go's
/// `pkix.Name` writes them. Callers validate the values first (policy).
pub fn subject_name(common_name: &str, organizations: &[String]) -> Result<Name, PkiError> {
    let mut rdns = Vec::with_capacity(organizations.len() + 1);
    for o in organizations {
        rdns.push(rdn(OID_O, o)?);
    }
    rdns.push(rdn(OID_CN, common_name)?);
    Ok(RdnSequence(rdns))
}

/// A PKCS#10 request, DER, signed by `key`. No extensions are requested: the
/// signer decides them.
pub fn build_csr(key: &PrivateKey, subject: &Name) -> Result<Vec<u8>, PkiError> {
    let info = CertReqInfo {
        version: x509_cert::request::Version::V1,
        subject: subject.clone(),
        public_key: key.spki()?,
        attributes: SetOfVec::new(),
    };
    let tbs = enc(info.to_der())?;
    let signature = key.sign(&tbs)?;
    let req = CertReq {
        info,
        algorithm: key.signature_algorithm(),
        signature: enc(BitString::from_bytes(&signature))?,
    };
    enc(req.to_der())
}

/// What a certificate is for. Each variant fixes every extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProfile {
    /// A Kubernetes user: CA:FALSE, digitalSignature (+keyEncipherment for RSA), clientAuth.
    Client,
    /// A TLS server (rotator's own HTTPS endpoint): CA:FALSE, serverAuth.
    Server,
}

/// X.509 time for a Unix instant: UTCTime through 2049, GeneralizedTime after (RFC 5280 4.1.2.5).
pub fn x509_time(unix: i64) -> Result<Time, PkiError> {
    let d = Duration::from_secs(unix.max(0) as u64);
    if unix < 2_524_608_000 {
        Ok(Time::UtcTime(enc(UtcTime::from_unix_duration(d))?))
    } else {
        Ok(Time::GeneralTime(enc(
            x509_cert::der::asn1::GeneralizedTime::from_unix_duration(d),
        )?))
    }
}

fn ext<T: Encode + AssociatedOid>(critical: bool, v: &T) -> Result<Extension, PkiError> {
    Ok(Extension {
        extn_id: T::OID,
        critical,
        extn_value: enc(OctetString::new(enc(v.to_der())?))?,
    })
}

/// Key identifier as RFC 7093 method 1: the leftmost 160 bits of SHA-256 of the key bits.
fn key_identifier(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    sha256(spki.subject_public_key.raw_bytes())[..20].to_vec()
}

/// Signs a leaf certificate for `subject_key` with the CA's key. `serial` is random
/// (rcgen's default of a key hash would repeat across re-issues of one key).
#[allow(clippy::too_many_arguments)]
pub fn sign_certificate(
    ca_key: &PrivateKey,
    ca_subject: &Name,
    ca_key_id: Option<&[u8]>,
    subject: Name,
    subject_key: SubjectPublicKeyInfoOwned,
    serial: &[u8],
    not_before: i64,
    not_after: i64,
    profile: CertProfile,
    server_names: &[String],
) -> Result<Vec<u8>, PkiError> {
    let is_rsa = subject_key.algorithm.oid == ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
    let mut usages = KeyUsages::DigitalSignature.into();
    if is_rsa {
        usages |= KeyUsages::KeyEncipherment;
    }
    let eku = match profile {
        CertProfile::Client => OID_KP_CLIENT_AUTH,
        CertProfile::Server => OID_KP_SERVER_AUTH,
    };
    let mut extensions = vec![
        ext(true, &KeyUsage(usages))?,
        ext(false, &ExtendedKeyUsage(vec![eku]))?,
        ext(
            true,
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
        )?,
        ext(
            false,
            &SubjectKeyIdentifier(enc(OctetString::new(key_identifier(&subject_key)))?),
        )?,
    ];
    if profile == CertProfile::Server {
        // TLS clients match names against the SAN only, never the CN.
        let mut names = Vec::with_capacity(server_names.len());
        for n in server_names {
            names.push(match n.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(ip)) => {
                    GeneralName::IpAddress(enc(OctetString::new(ip.octets().to_vec()))?)
                }
                Ok(std::net::IpAddr::V6(ip)) => {
                    GeneralName::IpAddress(enc(OctetString::new(ip.octets().to_vec()))?)
                }
                Err(_) => GeneralName::DnsName(enc(Ia5String::new(n))?),
            });
        }
        extensions.push(ext(false, &SubjectAltName(names))?);
    }
    // The AKI must repeat the CA's own SKI byte for byte (openssl matches on it),
    // whatever method the CA's maker used; without one, leave it out.
    if let Some(id) = ca_key_id {
        extensions.push(ext(
            false,
            &AuthorityKeyIdentifier {
                key_identifier: Some(enc(OctetString::new(id))?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?);
    }
    let tbs = TbsCertificate {
        version: Version::V3,
        serial_number: enc(SerialNumber::new(serial))?,
        signature: ca_key.signature_algorithm(),
        issuer: ca_subject.clone(),
        validity: Validity {
            not_before: x509_time(not_before)?,
            not_after: x509_time(not_after)?,
        },
        subject,
        subject_public_key_info: subject_key,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    };
    let tbs_der = enc(tbs.to_der())?;
    let signature = ca_key.sign(&tbs_der)?;
    let cert = Certificate {
        tbs_certificate: tbs,
        signature_algorithm: ca_key.signature_algorithm(),
        signature: enc(BitString::from_bytes(&signature))?,
    };
    enc(cert.to_der())
}

/// A positive 128-bit serial (top bit clear so DER needs no sign byte games).
pub fn random_serial() -> [u8; 16] {
    let mut s = super::random_bytes::<16>();
    s[0] &= 0x7f;
    s[0] |= 0x01;
    s
}

/// The subject Name of a certificate, as x509-cert sees it, for use as an issuer.
pub fn certificate_subject(cert_der: &[u8]) -> Result<Name, PkiError> {
    Certificate::from_der(cert_der)
        .map(|c| c.tbs_certificate.subject)
        .map_err(|e| PkiError::CertParse {
            origin: "CA certificate".into(),
            reason: e.to_string(),
        })
}

/// The SPKI of a DER CSR (signature already checked by [`super::parse_csr`]).
pub fn csr_public_key(csr_der: &[u8]) -> Result<SubjectPublicKeyInfoOwned, PkiError> {
    CertReq::from_der(csr_der)
        .map(|r| r.info.public_key)
        .map_err(|e| PkiError::CsrParse {
            reason: e.to_string(),
        })
}
