//! Keys, CSRs, certificates. rcgen makes keys (and the self-signed local CA);
//! x509-cert builds subjects with several O values, which rcgen's map-based
//! `DistinguishedName` cannot (Kubernetes reads one group per O); x509-parser reads.
mod build;
mod inspect;
mod keys;
mod seal;

pub use build::{
    CertProfile, build_csr, certificate_subject, csr_public_key, random_serial, sign_certificate,
    subject_name, x509_time,
};
pub use inspect::{
    CertInfo, CsrInfo, Expected, parse_cert_der, parse_cert_pem, parse_csr, pem_to_der_certs,
    root_store, verify_issued,
};
pub use keys::{KeyType, PrivateKey, UnknownKeyType};
pub use seal::{ReadPrivate, SealingKey, read_private};

use crate::support::exit::{Exit, ExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("key generation failed for {key_type}: {reason}")]
    KeyGeneration { key_type: KeyType, reason: String },
    #[error(
        "cannot read private key from {origin}: {reason}\nfix: give a PEM file with a PKCS#8 (BEGIN PRIVATE KEY), PKCS#1 RSA (BEGIN RSA PRIVATE KEY) or SEC1 EC (BEGIN EC PRIVATE KEY) key on P-256 or P-384"
    )]
    KeyParse { origin: String, reason: String },
    #[error(
        "cannot read certificate from {origin}: {reason}\nfix: give a PEM file that starts with -----BEGIN CERTIFICATE-----"
    )]
    CertParse { origin: String, reason: String },
    #[error(
        "malformed certificate signing request: {reason}\nfix: send a PEM or DER PKCS#10 request signed by its own key"
    )]
    CsrParse { reason: String },
    #[error(
        "unsupported key in {what}: {reason}\nfix: use ECDSA P-256 or P-384, or RSA of 2048, 3072 or 4096 bits"
    )]
    UnsupportedKey { what: &'static str, reason: String },
    #[error("encoding failed: {0}")]
    Encode(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error(
        "issued certificate rejected: {0}\nfix: check the signer's CA and configuration; nothing was stored"
    )]
    Verify(String),
    #[error(
        "sealed key storage: {0}\nfix: check sealing.key_file (it must be the 0600 file rotator created, base64 of 32 bytes)"
    )]
    Seal(String),
    #[error(
        "{what} {path} has mode {mode:03o}: group or others may read it, and rotator refuses a private key others can read (as ssh does)\nfix: chmod 600 {path}; if others could read it, treat the key as exposed"
    )]
    KeyFileMode {
        what: &'static str,
        path: String,
        mode: u32,
    },
}

impl ExitStatus for PkiError {
    fn exit(&self) -> Exit {
        match self {
            PkiError::Verify(_) => Exit::Verification,
            PkiError::KeyParse { .. }
            | PkiError::CertParse { .. }
            | PkiError::Seal(_)
            | PkiError::KeyFileMode { .. } => Exit::Config,
            PkiError::CsrParse { .. } | PkiError::UnsupportedKey { .. } => Exit::Refused,
            _ => Exit::Internal,
        }
    }
}

/// Lowercase hex, no separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    d.as_ref().try_into().expect("sha256 is 32 bytes")
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("system RNG");
    b
}

/// PEM armour for DER (64-column base64, as openssl writes it).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
