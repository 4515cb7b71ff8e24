//! The API's TLS: a serving certificate (configured, or issued by the local CA
//! and kept in the data directory), TLS 1.3 preferred and 1.2 allowed, and
//! client certificates verified against the CA rotator's credentials chain to.
//! A certificate from any other CA fails the handshake; no certificate at all
//! is allowed (enrollment), and the handlers decide what it may do.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::app::App;
use crate::pki::{KeyType, PrivateKey};
use crate::support::exit::{Exit, ExitStatus};

/// Lifetime of a serving certificate rotator issues itself; reissued at start
/// when less than a third is left.
const SERVING_CERT_TTL: Duration = Duration::from_secs(90 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot use {what} {path}: {reason}\nfix: {fix}")]
    File {
        what: String,
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error(
        "{purpose} needs a serving certificate, and neither the kubernetes signer nor a local CA behind local_ca.socket issues one\nfix: set {section}.tls_cert and {section}.tls_key"
    )]
    NoServingCert {
        purpose: &'static str,
        section: &'static str,
    },
    #[error("cannot set up TLS: {0}")]
    Setup(String),
}

impl ExitStatus for TlsError {
    fn exit(&self) -> Exit {
        Exit::Config
    }
}

fn file_err(what: impl Into<String>, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        what: what.into(),
        path: path.to_path_buf(),
        reason: reason.to_string(),
        fix: "check the path and that it holds PEM; rotator needs to read it",
    }
}

/// Where one TLS listener's serving certificate comes from.
pub struct Serving<'a> {
    /// The config section (`server`, `authz`): named in errors and fixes.
    pub section: &'static str,
    /// What listens, for errors ("the user API").
    pub purpose: &'static str,
    /// `SECTION.tls_cert` and `tls_key`, when configured.
    pub files: &'a Option<(PathBuf, PathBuf)>,
    /// The names a certificate from the local CA is issued for.
    pub hostnames: &'a [String],
}

/// The serving chain and key: the configured files, or a certificate from the
/// local CA kept in `DATA_DIR/SECTION/`.
pub fn serving_identity(
    app: &App,
    s: &Serving<'_>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let (cert_pem, key_pem) = match s.files {
        Some((cert, key)) => (
            std::fs::read_to_string(cert)
                .map_err(|e| file_err(format!("{}.tls_cert", s.section), cert, e))?,
            zeroize::Zeroizing::new(
                std::fs::read_to_string(key)
                    .map_err(|e| file_err(format!("{}.tls_key", s.section), key, e))?,
            ),
        ),
        None => {
            // With `local_ca.socket` the key is in the signer process, which
            // issues client certificates only: the serving certificate must be given.
            if app.signer.kind() != "local-ca" || app.settings.local_ca.socket.is_some() {
                return Err(TlsError::NoServingCert {
                    purpose: s.purpose,
                    section: s.section,
                });
            }
            let dir = app.settings.data_dir.join(s.section);
            local_ca_serving_pem(app, s.hostnames, &dir)?
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Setup(format!("serving certificate: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Setup(
            "the serving certificate file holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::Setup(format!("serving key: {e}")))?;
    Ok((chain, key))
}

/// A serving certificate for `hostnames` from the local CA, kept in `dir` and
/// reused while two thirds of its life are left and the names are the same.
/// The caller checks the local CA key is in this process.
pub fn local_ca_serving_pem(
    app: &App,
    hostnames: &[String],
    dir: &Path,
) -> Result<(String, zeroize::Zeroizing<String>), TlsError> {
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    let now = app.clock.now();
    let reusable = std::fs::read_to_string(&cert_path)
        .ok()
        .zip(std::fs::read_to_string(&key_path).ok())
        .filter(|(c, _)| {
            crate::pki::parse_cert_pem(c, "serving certificate").is_ok_and(|i| {
                let left = i.not_after - now;
                left * 3 > i.lifetime_seconds()
            })
        });
    // Names changed in the config: a fresh certificate, so clients can verify them.
    let names_file = dir.join("tls.names");
    let names = hostnames.join(",");
    let same_names = std::fs::read_to_string(&names_file).is_ok_and(|n| n == names);
    if let Some((c, k)) = reusable.filter(|_| same_names) {
        return Ok((c, zeroize::Zeroizing::new(k)));
    }
    let ca = crate::signer::LocalCa::load(&app.settings.local_ca, app.clock.clone())
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let key =
        PrivateKey::generate(KeyType::EcdsaP256).map_err(|e| TlsError::Setup(e.to_string()))?;
    let cert = ca
        .issue_server(&key, hostnames, SERVING_CERT_TTL)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    crate::support::fsutil::ensure_private_dir(dir).map_err(|e| file_err("directory", dir, e))?;
    crate::support::fsutil::write_private_atomic(&key_path, key.to_pem().as_bytes())
        .map_err(|e| file_err("serving key", &key_path, e))?;
    crate::support::fsutil::write_public_atomic(&cert_path, cert.as_bytes())
        .map_err(|e| file_err("serving certificate", &cert_path, e))?;
    crate::support::fsutil::write_public_atomic(&names_file, names.as_bytes())
        .map_err(|e| file_err("serving names", &names_file, e))?;
    tracing::info!(path = %cert_path.display(), names = %names, "issued a serving certificate from the local CA");
    Ok((cert, key.to_pem()))
}

/// The rustls configuration for the user API.
pub fn server_config(app: &App) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (chain, key) = serving_identity(
        app,
        &Serving {
            section: "server",
            purpose: "the user API",
            files: &app.settings.server.tls,
            hostnames: &app.settings.server.hostnames,
        },
    )?;
    let roots = crate::pki::root_store(app.signer.ca_bundle_pem())
        .map_err(|e| TlsError::Setup(format!("client CA: {e}")))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Setup(format!("client verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Setup(format!("serving certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
