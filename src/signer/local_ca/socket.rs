//! The `local-ca` signer through a `rotator signer` process (`local_ca.socket`).
//! This process never opens the CA key: it sends the CSR over the Unix socket and
//! gets a certificate or a refusal back. Connections are kept open between
//! requests (HTTP/1.1 keep-alive) and reused one request at a time; one the
//! signer closed (it restarted, or timed the idle connection out) is dropped and
//! a new one opened, so a restarted signer is picked up by the next request.
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::wire;
use crate::config::LocalCaSettings;
use crate::signer::{BoxFuture, SignError, SignRequest, Signed, Signer};

/// How long one exchange with the signer may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

const FIX: &str = "start `rotator signer` (systemd: rotator-signer.service; Kubernetes: the signer sidecar), and check that this user may open local_ca.socket or vault_pki.socket (mode 0660: same group)";

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub struct SocketSigner {
    socket: PathBuf,
    /// `local-ca`, or `vault-pki` when the signer signs through Vault.
    kind: &'static str,
    /// What issued certificates must chain to: the signer's CA (local-ca), or
    /// the cluster's client CA (vault-pki).
    ca_pem: String,
    /// Open connections no request is using.
    idle: std::sync::Mutex<Vec<Sender>>,
}

impl std::fmt::Debug for SocketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketSigner")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// At most this many idle connections are kept (more in flight is fine: the
/// extra ones are closed after their request).
const MAX_IDLE: usize = 32;

fn unavailable(socket: &Path, reason: impl ToString) -> SignError {
    SignError::CaUnavailable {
        path: socket.display().to_string(),
        reason: reason.to_string(),
        fix: FIX.to_string(),
    }
}

fn io(e: impl ToString) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A new HTTP/1.1 connection to the signer.
async fn connect(socket: &Path) -> std::io::Result<Sender> {
    let stream = tokio::net::UnixStream::connect(socket).await?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(io)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> std::io::Result<hyper::Request<Full<Bytes>>> {
    hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "signer")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(io)
}

/// One exchange on `sender`: the status and the body.
async fn exchange(
    sender: &mut Sender,
    req: hyper::Request<Full<Bytes>>,
) -> Result<(u16, Bytes), hyper::Error> {
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// One HTTP/1.1 exchange over the Unix socket on a new connection: the status
/// and the body.
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> std::io::Result<(u16, Bytes)> {
    let once = async {
        let mut sender = connect(socket).await?;
        exchange(&mut sender, request(method, path, body)?)
            .await
            .map_err(io)
    };
    tokio::time::timeout(REQUEST_TIMEOUT, once)
        .await
        .map_err(|_| io(format!("no answer within {REQUEST_TIMEOUT:?}")))?
}

/// The signer's error object, or a description of a body that is not one.
fn refusal(status: u16, body: &[u8]) -> String {
    match serde_json::from_slice::<wire::ErrorBody>(body) {
        Ok(e) => format!(
            "{} ({}): {}\nfix: {}",
            e.error.code, status, e.error.message, e.error.fix
        ),
        Err(_) => format!("HTTP {status} with a body that is not a signer error"),
    }
}

impl SocketSigner {
    /// Asks the signer for its CA; when `local_ca.cert_file` is configured, the
    /// signer's CA must be that certificate.
    pub async fn connect(settings: &LocalCaSettings) -> Result<Self, SignError> {
        let socket = settings
            .socket
            .clone()
            .expect("SocketSigner::connect needs local_ca.socket");
        let ca_pem = Self::fetch_ca(&socket).await?;
        if settings.configured {
            let want = std::fs::read_to_string(&settings.cert_file).map_err(|e| {
                SignError::CaUnavailable {
                    path: settings.cert_file.display().to_string(),
                    reason: e.to_string(),
                    fix: "check local_ca.cert_file, or unset it to take the CA from the signer"
                        .into(),
                }
            })?;
            check_same_ca(&ca_pem, &want, &settings.cert_file)?;
        }
        Ok(Self::new(socket, "local-ca", ca_pem))
    }

    fn new(socket: PathBuf, kind: &'static str, ca_pem: String) -> Self {
        Self {
            socket,
            kind,
            ca_pem,
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The vault-pki signer through `rotator signer` (`vault_pki.socket`): the
    /// signer holds the only Vault token that may sign. It must answer now,
    /// so a missing signer is a clear error at start; whether its Vault CA is
    /// the cluster's client CA is `doctor`'s check (`check_trust`).
    pub async fn connect_vault(socket: PathBuf, client_ca_pem: String) -> Result<Self, SignError> {
        Self::fetch_ca(&socket).await?;
        Ok(Self::new(socket, "vault-pki", client_ca_pem))
    }

    /// One exchange, on an idle connection when there is one that is still
    /// open. A reused connection that fails before any answer came (the signer
    /// closed it as the request went out) is retried once on a new one; the
    /// signer logs every signature, so even a request it saw twice is on record.
    async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> std::io::Result<(u16, Bytes)> {
        let once = async {
            let reused = loop {
                let Some(mut s) = self.idle.lock().expect("idle connections").pop() else {
                    break None;
                };
                if s.ready().await.is_ok() {
                    break Some(s);
                }
            };
            let (mut sender, was_reused) = match reused {
                Some(s) => (s, true),
                None => (connect(&self.socket).await?, false),
            };
            let answer = match exchange(&mut sender, request(method, path, body.clone())?).await {
                Err(e)
                    if was_reused
                        && (e.is_closed() || e.is_incomplete_message() || e.is_canceled()) =>
                {
                    sender = connect(&self.socket).await?;
                    exchange(&mut sender, request(method, path, body)?).await
                }
                other => other,
            }
            .map_err(io)?;
            let mut idle = self.idle.lock().expect("idle connections");
            if idle.len() < MAX_IDLE && !sender.is_closed() {
                idle.push(sender);
            }
            Ok::<_, std::io::Error>(answer)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, once)
            .await
            .map_err(|_| io(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }

    pub async fn fetch_ca(socket: &Path) -> Result<String, SignError> {
        let (status, body) = call(socket, "GET", wire::CA_PATH, Vec::new())
            .await
            .map_err(|e| unavailable(socket, e))?;
        if status != 200 {
            return Err(unavailable(socket, refusal(status, &body)));
        }
        let ca: wire::CaBody = serde_json::from_slice(&body)
            .map_err(|e| unavailable(socket, format!("GET /v1/ca: {e}")))?;
        Ok(ca.certificate)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

/// The signer's CA and the configured one are the same certificate.
pub fn check_same_ca(signer_pem: &str, configured_pem: &str, path: &Path) -> Result<(), SignError> {
    let origin = path.display().to_string();
    let a = crate::pki::parse_cert_pem(signer_pem, "the signer's CA")?;
    let b = crate::pki::parse_cert_pem(configured_pem, &origin)?;
    if a.fingerprint != b.fingerprint {
        return Err(SignError::CaUnavailable {
            path: origin,
            reason: format!(
                "the signer's CA (sha256 {}) is not local_ca.cert_file (sha256 {})",
                a.fingerprint, b.fingerprint
            ),
            fix: "give the daemon and the signer the same CA certificate".into(),
        });
    }
    Ok(())
}

impl Signer for SocketSigner {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn check_trust<'a>(&'a self) -> BoxFuture<'a, Option<Result<String, String>>> {
        Box::pin(async move {
            if self.kind != "vault-pki" {
                return None;
            }
            Some(match Self::fetch_ca(&self.socket).await {
                Ok(chain) => crate::signer::vault_pki::vault_ca_trusted(&chain, &self.ca_pem),
                Err(e) => Err(e.to_string()),
            })
        })
    }

    fn ca_bundle_pem(&self) -> &str {
        &self.ca_pem
    }

    fn sign<'a>(
        &'a self,
        req: SignRequest<'a>,
        _: &'a dyn crate::signer::Progress,
    ) -> BoxFuture<'a, Result<Signed, SignError>> {
        Box::pin(async move {
            // The signer checks its own policy, not what this issuer decided for
            // the user: a CSR whose subject is not exactly that is refused here,
            // before it leaves, as the in-process CA refuses it.
            req.checked_csr()?;
            let body = serde_json::to_vec(&wire::SignBody {
                csr: crate::pki::pem_encode("CERTIFICATE REQUEST", req.csr_der),
                ttl_seconds: req.ttl.as_secs(),
            })
            .expect("sign bodies serialize");
            let (status, body) = self
                .call("POST", wire::SIGN_PATH, body)
                .await
                .map_err(|e| unavailable(&self.socket, e))?;
            if status != 200 {
                return Err(SignError::Refused(refusal(status, &body)));
            }
            let signed: wire::SignedBody = serde_json::from_slice(&body)
                .map_err(|e| unavailable(&self.socket, format!("POST /v1/sign answered: {e}")))?;
            Ok(Signed {
                certificate_pem: signed.certificate,
            })
        })
    }

    fn cleanup<'a>(&'a self, _credential_id: &'a str) -> BoxFuture<'a, Result<(), SignError>> {
        Box::pin(async { Ok(()) })
    }
}
