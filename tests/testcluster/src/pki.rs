//! The cluster's CAs and the certificates it signs. Independent of rotator's own
//! PKI code on purpose: this server is the oracle rotator is tested against.
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::der::asn1::{BitString, GeneralizedTime, ObjectIdentifier, OctetString, UtcTime};
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::{Decode, Encode};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints as XBasic, ExtendedKeyUsage, KeyUsage, KeyUsages,
};
use x509_cert::request::CertReq;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).expect("rng");
    b
}

pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for c in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(c).unwrap());
        out.push('\n');
    }
    out + &format!("-----END {label}-----\n")
}

/// A CA: its key, certificate, and what leaf certificates need from it.
pub struct Ca {
    pub key: KeyPair,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub not_after: i64,
    subject_der: Vec<u8>,
    key_id: Vec<u8>,
}

impl Ca {
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("keygen");
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let now = now();
        p.not_before = time::OffsetDateTime::from_unix_timestamp(now - 3600).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(now + 10 * 365 * 86400).unwrap();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&random_bytes::<16>()));
        let cert = p.self_signed(&key).expect("self-sign");
        Self::from_parts(key, cert.der().to_vec())
    }

    pub fn from_parts(key: KeyPair, cert_der: Vec<u8>) -> Self {
        let c = Certificate::from_der(&cert_der).expect("CA certificate");
        let subject_der = c.tbs_certificate.subject.to_der().unwrap();
        let not_after = c
            .tbs_certificate
            .validity
            .not_after
            .to_unix_duration()
            .as_secs() as i64;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der).expect("CA certificate");
        let key_id = parsed
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                    Some(k.0.to_vec())
                }
                _ => None,
            })
            .unwrap_or_default();
        Self {
            cert_pem: pem("CERTIFICATE", &cert_der),
            key,
            cert_der,
            not_after,
            subject_der,
            key_id,
        }
    }

    /// A TLS serving certificate for 127.0.0.1 / localhost.
    pub fn serving_cert(&self) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        p.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::DnsName("kubernetes.default.svc".try_into().unwrap()),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = now();
        p.not_before = time::OffsetDateTime::from_unix_timestamp(now - 3600).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(now + 365 * 86400).unwrap();
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&random_bytes::<16>()));
        let issuer = Issuer::from_ca_cert_der(&self.cert_der.clone().into(), &self.key).unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Signs a client certificate for a CSR the way kube-controller-manager's
    /// csrsigning controller does: subject and key from the request, everything
    /// else (usages, validity, no CA bit) from the signer.
    pub fn sign_client(
        &self,
        csr_der: &[u8],
        usages: &[String],
        not_before: i64,
        not_after: i64,
    ) -> Result<String, String> {
        let req = CertReq::from_der(csr_der).map_err(|e| e.to_string())?;
        let mut ku = KeyUsages::DigitalSignature.into();
        if usages.iter().any(|u| u == "key encipherment") {
            ku |= KeyUsages::KeyEncipherment;
        }
        let mut serial = random_bytes::<16>();
        serial[0] &= 0x7f;
        serial[0] |= 1;
        let ext = |critical: bool, oid: ObjectIdentifier, der: Vec<u8>| Extension {
            extn_id: oid,
            critical,
            extn_value: OctetString::new(der).unwrap(),
        };
        let mut extensions = vec![
            ext(true, KeyUsage::OID, KeyUsage(ku).to_der().unwrap()),
            ext(
                false,
                ExtendedKeyUsage::OID,
                ExtendedKeyUsage(vec![ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2")])
                    .to_der()
                    .unwrap(),
            ),
            ext(
                true,
                XBasic::OID,
                XBasic {
                    ca: false,
                    path_len_constraint: None,
                }
                .to_der()
                .unwrap(),
            ),
        ];
        if !self.key_id.is_empty() {
            let aki = AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(self.key_id.clone()).unwrap()),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            };
            extensions.push(ext(
                false,
                AuthorityKeyIdentifier::OID,
                aki.to_der().unwrap(),
            ));
        }
        let alg = x509_cert::spki::AlgorithmIdentifierOwned {
            oid: ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
            parameters: None,
        };
        let tbs = TbsCertificate {
            version: Version::V3,
            serial_number: SerialNumber::new(&serial).unwrap(),
            signature: alg.clone(),
            issuer: x509_cert::name::Name::from_der(&self.subject_der).unwrap(),
            validity: Validity {
                not_before: x509_time(not_before),
                not_after: x509_time(not_after),
            },
            subject: go_subject(&req.info.subject)?,
            subject_public_key_info: req.info.public_key,
            issuer_unique_id: None,
            subject_unique_id: None,
            extensions: Some(extensions),
        };
        let tbs_der = tbs.to_der().map_err(|e| e.to_string())?;
        use rcgen::SigningKey;
        let sig = self.key.sign(&tbs_der).map_err(|e| e.to_string())?;
        let cert = Certificate {
            tbs_certificate: tbs,
            signature_algorithm: alg,
            signature: BitString::from_bytes(&sig).unwrap(),
        };
        Ok(pem(
            "CERTIFICATE",
            &cert.to_der().map_err(|e| e.to_string())?,
        ))
    }

    /// A client certificate made directly (for the admin kubeconfig and tests).
    pub fn client_cert(&self, cn: &str, orgs: &[&str], lifetime: i64) -> (String, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = csr_der(&key, cn, orgs);
        let now = now();
        let cert = self
            .sign_client(&csr, &["client auth".into()], now - 300, now + lifetime)
            .unwrap();
        (cert, key.serialize_pem())
    }
}

/// The subject as kube-controller-manager's signer writes it: Go parses the
/// request's subject into a `pkix.Name` (C, ST, L, STREET, POSTALCODE, O, OU
/// kept in order; the last CN and SERIALNUMBER win; any other attribute is
/// dropped) and `ToRDNSequence` encodes it again in its own order, each
/// attribute type as one RDN holding all its values, every value a
/// PrintableString when its characters allow and a UTF8String otherwise. So
/// `/CN=u/O=dev` comes out as `O=dev, CN=u` (kubernetes-facts 26).
pub fn go_subject(subject: &x509_cert::name::Name) -> Result<x509_cert::name::Name, String> {
    use x509_cert::attr::AttributeTypeAndValue;
    use x509_cert::der::asn1::{PrintableStringRef, SetOfVec, Utf8StringRef};
    use x509_cert::der::{Tag, Tagged};
    use x509_cert::name::{RdnSequence, RelativeDistinguishedName};
    // Go's pkix.Name.ToRDNSequence order.
    const ORDER: [(&str, bool); 9] = [
        ("2.5.4.6", false),  // C
        ("2.5.4.8", false),  // ST
        ("2.5.4.7", false),  // L
        ("2.5.4.9", false),  // STREET
        ("2.5.4.17", false), // POSTALCODE
        ("2.5.4.10", false), // O
        ("2.5.4.11", false), // OU
        ("2.5.4.3", true),   // CN (one value: the last wins)
        ("2.5.4.5", true),   // SERIALNUMBER (likewise)
    ];
    let mut values: Vec<Vec<String>> = vec![Vec::new(); ORDER.len()];
    for rdn in subject.0.iter() {
        for atv in rdn.0.iter() {
            let Some(i) = ORDER
                .iter()
                .position(|(oid, _)| ObjectIdentifier::new_unwrap(oid) == atv.oid)
            else {
                continue;
            };
            // Go keeps only values it decodes as strings.
            let text = match atv.value.tag() {
                Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString => {
                    String::from_utf8(atv.value.value().to_vec()).ok()
                }
                _ => None,
            };
            let Some(text) = text else { continue };
            if ORDER[i].1 {
                values[i] = vec![text];
            } else {
                values[i].push(text);
            }
        }
    }
    let printable = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b" '()+,-./:=?".contains(&b))
    };
    let mut rdns = Vec::new();
    for (i, vs) in values.iter().enumerate() {
        let vs: Vec<&String> = vs
            .iter()
            .filter(|v| !(ORDER[i].1 && v.is_empty()))
            .collect();
        if vs.is_empty() {
            continue;
        }
        let oid = ObjectIdentifier::new_unwrap(ORDER[i].0);
        let mut atvs = Vec::new();
        for v in vs {
            let value = if printable(v) {
                x509_cert::der::Any::encode_from(
                    &PrintableStringRef::new(v).map_err(|e| e.to_string())?,
                )
            } else {
                x509_cert::der::Any::encode_from(&Utf8StringRef::new(v).map_err(|e| e.to_string())?)
            }
            .map_err(|e| e.to_string())?;
            atvs.push(AttributeTypeAndValue { oid, value });
        }
        rdns.push(RelativeDistinguishedName(
            SetOfVec::try_from(atvs).map_err(|e| e.to_string())?,
        ));
    }
    Ok(RdnSequence(rdns))
}

fn x509_time(unix: i64) -> Time {
    let d = std::time::Duration::from_secs(unix.max(0) as u64);
    if unix < 2_524_608_000 {
        Time::UtcTime(UtcTime::from_unix_duration(d).unwrap())
    } else {
        Time::GeneralTime(GeneralizedTime::from_unix_duration(d).unwrap())
    }
}

/// A CSR with one O per group (tests and the admin credential).
pub fn csr_der(key: &KeyPair, cn: &str, orgs: &[&str]) -> Vec<u8> {
    let mut attrs: Vec<(&str, &str)> = orgs.iter().map(|o| ("2.5.4.10", *o)).collect();
    attrs.push(("2.5.4.3", cn));
    csr_der_attrs(key, &attrs)
}

/// A CSR whose subject holds these (OID, UTF8String value) attributes, one RDN
/// each, in this order.
pub fn csr_der_attrs(key: &KeyPair, attrs: &[(&str, &str)]) -> Vec<u8> {
    use x509_cert::attr::AttributeTypeAndValue;
    use x509_cert::der::asn1::{SetOfVec, Utf8StringRef};
    use x509_cert::name::{RdnSequence, RelativeDistinguishedName};
    let rdn = |oid: &str, v: &str| {
        RelativeDistinguishedName(
            SetOfVec::try_from(vec![AttributeTypeAndValue {
                oid: ObjectIdentifier::new_unwrap(oid),
                value: x509_cert::der::Any::encode_from(&Utf8StringRef::new(v).unwrap()).unwrap(),
            }])
            .unwrap(),
        )
    };
    let rdns: Vec<_> = attrs.iter().map(|(o, v)| rdn(o, v)).collect();
    use rcgen::PublicKeyData;
    let info = x509_cert::request::CertReqInfo {
        version: x509_cert::request::Version::V1,
        subject: RdnSequence(rdns),
        public_key: x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(
            &key.subject_public_key_info(),
        )
        .unwrap(),
        attributes: SetOfVec::new(),
    };
    use rcgen::SigningKey;
    let sig = key.sign(&info.to_der().unwrap()).unwrap();
    CertReq {
        info,
        algorithm: x509_cert::spki::AlgorithmIdentifierOwned {
            oid: ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
            parameters: None,
        },
        signature: BitString::from_bytes(&sig).unwrap(),
    }
    .to_der()
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RDNs of a certificate's subject in DER order: (oid, DER tag, value) per RDN.
    fn rdns(cert_pem: &str) -> Vec<Vec<(String, u8, String)>> {
        let (_, p) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(&p.contents).unwrap();
        c.subject()
            .iter()
            .map(|rdn| {
                rdn.iter()
                    .map(|a| {
                        (
                            a.attr_type().to_id_string(),
                            a.attr_value().header.tag().0 as u8,
                            a.as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_signer_encodes_the_subject_as_go_does() {
        let ca = Ca::new("t");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // In the request: CN first, O values apart, an OU with a character
        // PrintableString lacks, and an attribute Go's pkix.Name does not keep.
        let csr = csr_der_attrs(
            &key,
            &[
                ("2.5.4.3", "u"),
                ("2.5.4.10", "dev"),
                ("2.5.4.11", "a_b"),
                ("2.5.4.10", "rotator:u:1"),
                ("1.2.840.113549.1.9.1", "u@example.org"),
            ],
        );
        let now = now();
        let cert = ca
            .sign_client(&csr, &["client auth".into()], now - 300, now + 600)
            .unwrap();
        const PRINTABLE: u8 = 19;
        const UTF8: u8 = 12;
        let mut o = vec![
            ("2.5.4.10".to_string(), PRINTABLE, "dev".to_string()),
            ("2.5.4.10".to_string(), PRINTABLE, "rotator:u:1".to_string()),
        ];
        o.sort(); // a SET: DER order
        assert_eq!(
            rdns(&cert),
            vec![
                o,
                vec![("2.5.4.11".to_string(), UTF8, "a_b".to_string())],
                vec![("2.5.4.3".to_string(), PRINTABLE, "u".to_string())],
            ]
        );
        // openssl, independently, sees O before CN and no emailAddress.
        let dir = std::env::temp_dir().join(format!("tc-subject-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.pem");
        std::fs::write(&f, &cert).unwrap();
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-nameopt", "oneline", "-in"])
            .arg(&f)
            .output()
            .expect("openssl");
        let _ = std::fs::remove_dir_all(&dir);
        let subject = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            subject.trim().trim_start_matches("subject=").trim(),
            "O = dev + O = rotator:u:1, OU = a_b, CN = u",
            "{subject}"
        );
    }
}
