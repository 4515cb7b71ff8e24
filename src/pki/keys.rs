use std::fmt;
use std::str::FromStr;

use rcgen::{KeyPair, PublicKeyData, SignatureAlgorithm, SigningKey};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use x509_cert::der::asn1::{Null, ObjectIdentifier};
use x509_cert::der::{Any, Decode};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use zeroize::Zeroizing;

use super::PkiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl KeyType {
    pub const ALL: [KeyType; 5] = [
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown key type {0:?} (expected one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096)"
)]
pub struct UnknownKeyType(String);

impl FromStr for KeyType {
    type Err = UnknownKeyType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownKeyType(s.to_string()))
    }
}

const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_RSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

/// A private key held in memory. `Debug` never prints key material; the PEM is
/// only ever handed out wrapped in `Zeroizing`.
pub struct PrivateKey {
    inner: KeyPair,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("algorithm", &self.algorithm_name())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PrivateKey {
    pub fn generate(key_type: KeyType) -> Result<Self, PkiError> {
        let err = |e: rcgen::Error| PkiError::KeyGeneration {
            key_type,
            reason: e.to_string(),
        };
        let inner = match key_type {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
            KeyType::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_3072)
            }
            KeyType::Rsa4096 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_4096)
            }
        }
        .map_err(err)?;
        Ok(Self { inner })
    }

    /// Reads PKCS#8, PKCS#1 RSA (kubeadm's `ca.key`) and SEC1 EC (openssl's default) keys.
    /// `origin` names the file in errors; the key text itself never appears in one.
    pub fn from_pem(pem: &str, origin: &str) -> Result<Self, PkiError> {
        let bad = |reason: &str| PkiError::KeyParse {
            origin: origin.to_string(),
            reason: reason.to_string(),
        };
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| bad("no PEM private key found"))?;
        let candidates: &[&'static SignatureAlgorithm] = match &der {
            PrivateKeyDer::Pkcs1(_) => &[&rcgen::PKCS_RSA_SHA256],
            PrivateKeyDer::Sec1(_) => &[
                &rcgen::PKCS_ECDSA_P256_SHA256,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ],
            PrivateKeyDer::Pkcs8(_) => &[
                &rcgen::PKCS_ECDSA_P256_SHA256,
                &rcgen::PKCS_ECDSA_P384_SHA384,
                &rcgen::PKCS_RSA_SHA256,
            ],
            _ => return Err(bad("unknown key encoding")),
        };
        for alg in candidates {
            if let Ok(inner) = KeyPair::from_der_and_sign_algo(&der, alg) {
                return Ok(Self { inner });
            }
        }
        Err(bad(
            "the key is not ECDSA P-256/P-384 or RSA, or it is corrupt",
        ))
    }

    /// PKCS#8 PEM of a key rotator generated.
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.inner.serialize_pem())
    }

    pub fn spki_der(&self) -> Vec<u8> {
        self.inner.subject_public_key_info()
    }

    pub fn spki(&self) -> Result<SubjectPublicKeyInfoOwned, PkiError> {
        SubjectPublicKeyInfoOwned::from_der(&self.spki_der())
            .map_err(|e| PkiError::Encode(e.to_string()))
    }

    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
        self.inner
            .sign(msg)
            .map_err(|e| PkiError::Sign(e.to_string()))
    }

    /// The X.509 signature algorithm this key signs with.
    pub fn signature_algorithm(&self) -> AlgorithmIdentifierOwned {
        let alg = self.inner.algorithm();
        if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            AlgorithmIdentifierOwned {
                oid: OID_ECDSA_SHA384,
                parameters: None,
            }
        } else if alg == &rcgen::PKCS_RSA_SHA256 {
            AlgorithmIdentifierOwned {
                oid: OID_RSA_SHA256,
                parameters: Some(Any::from(Null)),
            }
        } else {
            AlgorithmIdentifierOwned {
                oid: OID_ECDSA_SHA256,
                parameters: None,
            }
        }
    }

    fn algorithm_name(&self) -> &'static str {
        let alg = self.inner.algorithm();
        if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
            "ecdsa-p256"
        } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            "ecdsa-p384"
        } else {
            "rsa"
        }
    }

    /// For the local CA's self-signed certificate, which rcgen builds.
    pub(crate) fn rcgen(&self) -> &KeyPair {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_type_generates_and_round_trips() {
        for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let k = PrivateKey::generate(kt).unwrap();
            let back = PrivateKey::from_pem(&k.to_pem(), "test").unwrap();
            assert_eq!(back.spki_der(), k.spki_der(), "{kt}");
            assert_eq!(kt.as_str().parse::<KeyType>().unwrap(), kt);
        }
        assert!(
            "dsa-1024"
                .parse::<KeyType>()
                .unwrap_err()
                .to_string()
                .contains("dsa-1024")
        );
    }

    #[test]
    fn debug_is_redacted() {
        let k = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let dbg = format!("{k:?}");
        assert!(dbg.contains("<redacted>"));
        let pem = k.to_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!dbg.contains(&body[..20]));
    }

    #[test]
    fn garbage_key_error_names_origin_not_content() {
        let e = PrivateKey::from_pem(
            "-----BEGIN PRIVATE KEY-----\nAAAASECRETSECRET\n-----END PRIVATE KEY-----\n",
            "/etc/x.key",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/etc/x.key"), "{e}");
        assert!(!e.contains("SECRETSECRET"), "{e}");
    }
}
