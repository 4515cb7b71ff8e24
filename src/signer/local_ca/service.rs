//! `rotator signer`: the process that alone holds the local CA key. It has no
//! database, no cluster client and no HTTP client; it listens on a Unix socket
//! and signs client certificates under its OWN policy, whatever its caller asks,
//! since the caller (the daemon) is the part exposed to the network and may be
//! compromised. Every signature and every refusal goes to its own append-only,
//! fsynced JSON-lines log, outside the daemon's reach (see `Log` for when).
use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tokio::net::UnixListener;

use super::backend::Backend;
use super::in_process::LocalCa;
use super::wire::{self, Code, ErrorBody, ErrorDetail};
use crate::config::{LocalCaSettings, SignerServiceSettings};
use crate::pki::{self, CsrInfo};
use crate::policy::{self, Pattern};
use crate::signer::SignRequest;
use crate::support::clock::Clock;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("signer socket {path}: {reason}\nfix: {fix}")]
    Socket {
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error("signer log {path}: {reason}\nfix: {fix}")]
    Log {
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error("CA key {reference:?}: {reason}\nfix: {fix}")]
    KeySource {
        reference: String,
        reason: String,
        fix: &'static str,
    },
    #[error(transparent)]
    Ca(#[from] crate::signer::SignError),
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
}

impl crate::support::exit::ExitStatus for ServiceError {
    fn exit(&self) -> crate::support::exit::Exit {
        match self {
            ServiceError::Ca(e) => e.exit(),
            ServiceError::Vault(e) => e.exit(),
            ServiceError::KeySource { .. } => crate::support::exit::Exit::Config,
            _ => crate::support::exit::Exit::Signer,
        }
    }
}

/// Where the CA key comes from: a file, or a `vault:` KV v2 reference read at
/// start into this process's memory only (the signer is still the only process
/// that ever holds the key; it then talks to Vault once, at start).
#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    Vault(crate::vault::VaultRef),
}

impl KeySource {
    pub fn from_settings(s: &LocalCaSettings) -> Result<Self, ServiceError> {
        match crate::vault::VaultRef::from_path(&s.key_file) {
            None => Ok(KeySource::File(s.key_file.clone())),
            Some(Ok(r)) => Ok(KeySource::Vault(r)),
            Some(Err(reason)) => Err(ServiceError::KeySource {
                reference: s.key_file.display().to_string(),
                reason,
                fix: "write vault:<kv-v2 mount>/<path>#<field>[?version=N], or a PEM key file",
            }),
        }
    }

    /// Loads a `vault:` key (the certificate may be a file or a reference too).
    pub async fn load_from_vault(
        s: &LocalCaSettings,
        vault: &crate::vault::VaultSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<LocalCa, ServiceError> {
        let v = crate::vault::Vault::new(vault)?;
        let (key, cert) = crate::vault::secrets::local_ca_pems(s, Some(&v))
            .await?
            .expect("called for a vault: reference");
        Ok(LocalCa::from_pems(
            &key,
            &s.key_file.display().to_string(),
            cert,
            &s.cert_file,
            clock,
        )?)
    }

    fn load(&self, s: &LocalCaSettings, clock: Arc<dyn Clock>) -> Result<LocalCa, ServiceError> {
        match self {
            KeySource::Vault(r) => Err(ServiceError::KeySource {
                reference: r.to_string(),
                reason: "a vault: key is read by Service::open_with (async)".into(),
                fix: "this is a bug: report it",
            }),
            KeySource::File(_) => {
                if !s.configured {
                    let dir = s.key_file.parent().unwrap_or(Path::new(".")).to_path_buf();
                    crate::support::fsutil::ensure_private_dir_repaired(&dir).map_err(|e| {
                        ServiceError::KeySource {
                            reference: dir.display().to_string(),
                            reason: e.to_string(),
                            fix: "make the data directory writable by the signer's user",
                        }
                    })?;
                }
                Ok(LocalCa::ensure(s, clock)?.0)
            }
        }
    }
}

/// A refusal: its stable code, what was wrong (with the value) and the fix.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: Code,
    pub message: String,
    pub fix: String,
}

fn refuse(code: Code, message: impl Into<String>, fix: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
        fix: fix.into(),
    }
}

/// Who is asking (SO_PEERCRED).
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

#[derive(Debug, Serialize)]
struct LogLine<'a> {
    time: String,
    peer_uid: Option<u32>,
    peer_pid: Option<i32>,
    subject: Option<String>,
    serial: Option<&'a str>,
    fingerprint: Option<&'a str>,
    not_after: Option<i64>,
    outcome: &'static str,
    code: Option<&'static str>,
    message: Option<&'a str>,
}

/// The append-only log. Each line is written (write(2), O_APPEND) before its
/// answer leaves the signer, so it survives the signer being killed, and the
/// daemon (another user; the log is 0600) cannot take it back. A syncer
/// thread fdatasyncs behind the writes, one fsync for all that is pending
/// (group commit), so the answer does not wait for the disk: measured on the
/// 2-core development machine, the fsync was the whole socket cost of a
/// signature (benches/README.md). What this gives up is only the lines of the
/// last fsync interval when the *host* crashes (power, kernel panic): the
/// log's purpose is to show what a compromised daemon had signed, and an
/// unprivileged daemon cannot crash the host at will. It keeps: at most
/// `MAX_UNSYNCED` lines ever wait for the disk (more wait for their fsync),
/// and after a failed write or fsync the signer signs nothing more.
struct Log {
    shared: Arc<LogShared>,
    synced: tokio::sync::watch::Receiver<u64>,
}

struct LogShared {
    state: Mutex<LogState>,
    wake: std::sync::Condvar,
}

struct LogState {
    file: std::fs::File,
    /// Lines written so far.
    written: u64,
    failed: bool,
}

/// How many written lines may wait for their fsync at once.
const MAX_UNSYNCED: u64 = 256;

impl Log {
    fn open(path: &Path) -> Result<Self, ServiceError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let err = |reason: String| ServiceError::Log {
            path: path.to_path_buf(),
            reason,
            fix: "point signer_service.log_file at a file only the signer's user may read and write (0600), in a directory it may write",
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(|e| err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("not a regular file".into()));
        }
        let m = meta.permissions().mode() & 0o777;
        if m & 0o077 != 0 {
            return Err(err(format!(
                "mode {m:o}: group or others may read it (want 0600)"
            )));
        }
        let sync_file = file.try_clone().map_err(|e| err(e.to_string()))?;
        let shared = Arc::new(LogShared {
            state: Mutex::new(LogState {
                file,
                written: 0,
                failed: false,
            }),
            wake: std::sync::Condvar::new(),
        });
        let (tx, synced) = tokio::sync::watch::channel(0u64);
        let s = shared.clone();
        std::thread::Builder::new()
            .name("signer-log".into())
            .spawn(move || {
                let mut done = 0u64;
                loop {
                    let target = {
                        let mut st = s.state.lock().expect("signer log");
                        while st.written == done && !st.failed {
                            st = s.wake.wait(st).expect("signer log");
                        }
                        if st.failed {
                            break;
                        }
                        st.written
                    };
                    if let Err(e) = sync_file.sync_data() {
                        tracing::error!(error = %e, "the signer log could not be synced: refusing to sign");
                        s.state.lock().expect("signer log").failed = true;
                        break;
                    }
                    done = target;
                    let _ = tx.send(done);
                }
                // Wakes whoever waits for a sync that will not come.
                let _ = tx.send(u64::MAX);
            })
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { shared, synced })
    }

    /// Writes one line; false when the log cannot be written (nothing may be
    /// signed then).
    async fn append(&self, line: &LogLine<'_>) -> bool {
        let mut bytes = serde_json::to_vec(line).expect("log lines serialize");
        bytes.push(b'\n');
        let seq = {
            let mut st = self.shared.state.lock().expect("signer log");
            if st.failed {
                return false;
            }
            // One write(2) of the whole line on an O_APPEND file: lines never interleave.
            if let Err(e) = st.file.write_all(&bytes) {
                tracing::error!(error = %e, "the signer log could not be written: refusing to sign");
                st.failed = true;
                self.shared.wake.notify_one();
                return false;
            }
            st.written += 1;
            self.shared.wake.notify_one();
            st.written
        };
        if seq > MAX_UNSYNCED {
            let mut synced = self.synced.clone();
            let _ = synced
                .wait_for(|d| d.saturating_add(MAX_UNSYNCED) >= seq)
                .await;
        }
        !self.shared.state.lock().expect("signer log").failed
    }
}

/// A token bucket: `burst` at once, refilled at `rate` per second.
struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Service {
    backend: Backend,
    settings: SignerServiceSettings,
    denied: Vec<Pattern>,
    log: Log,
    bucket: Mutex<Bucket>,
    clock: Arc<dyn Clock>,
    /// Test hook (`ROTATOR_FAULT=signer-sign:sleep-MS`): wait this long before signing.
    pub delay: Option<Duration>,
}

impl Service {
    pub fn open(
        local_ca: &LocalCaSettings,
        settings: &SignerServiceSettings,
        denied: Vec<Pattern>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ServiceError> {
        let ca = KeySource::from_settings(local_ca)?.load(local_ca, clock.clone())?;
        Self::open_with(ca, settings, denied, clock)
    }

    /// A service over a CA already loaded (from Vault: [`KeySource::load_from_vault`]).
    pub fn open_with(
        ca: LocalCa,
        settings: &SignerServiceSettings,
        denied: Vec<Pattern>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ServiceError> {
        Self::open_backend(Backend::LocalCa(ca), settings, denied, clock)
    }

    /// A service over any backend: the same policy, rate limit and log.
    pub fn open_backend(
        backend: Backend,
        settings: &SignerServiceSettings,
        denied: Vec<Pattern>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ServiceError> {
        let log = Log::open(&settings.log_file)?;
        Ok(Self {
            backend,
            settings: settings.clone(),
            denied,
            log,
            bucket: Mutex::new(Bucket {
                tokens: settings.burst as f64,
                last: Instant::now(),
                rate: settings.rate_per_second as f64,
                burst: settings.burst as f64,
            }),
            clock,
            delay: None,
        })
    }

    pub fn ca_pem(&self) -> &str {
        self.backend.ca_pem()
    }

    /// The signer's policy, on a CSR whose self-signature verified.
    pub fn check(&self, csr: &CsrInfo, ttl_seconds: u64) -> Result<(), Refusal> {
        let max = self.settings.max_ttl.as_secs();
        if ttl_seconds > max {
            return Err(refuse(
                Code::TtlTooLong,
                format!("ttl_seconds {ttl_seconds} is over the signer's maximum of {max}"),
                "ask for a shorter lifetime, or raise signer_service.max_ttl in the signer's configuration",
            ));
        }
        let min = policy::ABSOLUTE_MIN_TTL.as_secs();
        if ttl_seconds < min {
            return Err(refuse(
                Code::TtlTooShort,
                format!("ttl_seconds {ttl_seconds} is under Kubernetes' minimum of {min}"),
                format!("ask for at least {min} seconds"),
            ));
        }
        if csr.requests_ca {
            return Err(refuse(
                Code::CaRequested,
                "the CSR asks for a CA certificate (basicConstraints cA=TRUE)",
                "the signer issues client certificates only: drop the basicConstraints extension from the CSR",
            ));
        }
        if let Err(e) = csr.key_type() {
            return Err(refuse(
                Code::BadCsr,
                e.to_string(),
                "use an ECDSA P-256/P-384 or RSA 2048/3072/4096 key",
            ));
        }
        let cn = &csr.common_name;
        if cn.to_ascii_lowercase().starts_with("system:") {
            return Err(refuse(
                Code::SubjectDenied,
                format!("common name {cn:?} is a system: identity"),
                "the signer never issues for system: users",
            ));
        }
        if let Err(e) = policy::validate_user_name(cn) {
            return Err(refuse(
                Code::SubjectDenied,
                e.to_string(),
                "use a plain user name",
            ));
        }
        let mut own = Vec::new();
        for g in &csr.organizations {
            let lower = g.to_ascii_lowercase();
            if lower.starts_with("system:") {
                return Err(refuse(
                    Code::GroupDenied,
                    format!("group {g:?} is a system: group"),
                    "the signer never issues system: groups",
                ));
            }
            if let Some(p) = self.denied.iter().find(|p| p.matches(&lower)) {
                return Err(refuse(
                    Code::GroupDenied,
                    format!("group {g:?} is denied (it matches {p:?} in policy.denied_groups)"),
                    "bind a role to a group of your own instead",
                ));
            }
            if lower.starts_with(policy::GENERATION_GROUP_PREFIX) {
                match policy::parse_generation_group(cn, g) {
                    Some(generation) => own.push((g, generation)),
                    None => {
                        return Err(refuse(
                            Code::GenerationGroupMismatch,
                            format!("group {g:?} is not a generation group of {cn:?}"),
                            "a CSR carries only its own user's generation group",
                        ));
                    }
                }
            }
        }
        let (group, generation) = match own.as_slice() {
            [] => {
                return Err(refuse(
                    Code::GenerationGroupMissing,
                    format!("common name {cn:?} comes without its generation group"),
                    format!(
                        "add O={}{cn}:GEN.SUFFIX (rotator does this for every credential)",
                        policy::GENERATION_GROUP_PREFIX
                    ),
                ));
            }
            [one] => *one,
            _ => {
                return Err(refuse(
                    Code::GenerationGroupMismatch,
                    format!(
                        "{} generation groups for {cn:?}; exactly one is allowed",
                        own.len()
                    ),
                    "ask for one generation group",
                ));
            }
        };
        let want = policy::generation_group(cn, generation, &csr.spki_der);
        if *group != want {
            return Err(refuse(
                Code::GenerationGroupMismatch,
                format!(
                    "generation group {group:?} does not end with this key's suffix (want {want:?})"
                ),
                "the suffix is the first 12 hex digits of the SHA-256 of the CSR's public key",
            ));
        }
        Ok(())
    }

    /// Checks, signs and logs one request.
    pub async fn sign(&self, peer: Peer, body: &[u8]) -> Result<wire::SignedBody, Refusal> {
        let mut subject = None;
        let result = self.sign_inner(body, &mut subject).await;
        let (signed, refusal) = match &result {
            Ok(s) => (Some(s), None),
            Err(r) => (None, Some(r)),
        };
        let info = signed.and_then(|s| pki::parse_cert_pem(&s.certificate, "issued").ok());
        let line = LogLine {
            time: self.time(),
            peer_uid: peer.uid,
            peer_pid: peer.pid,
            subject,
            serial: info.as_ref().map(|i| i.serial.as_str()),
            fingerprint: info.as_ref().map(|i| i.fingerprint.as_str()),
            not_after: info.as_ref().map(|i| i.not_after),
            outcome: if signed.is_some() {
                "signed"
            } else {
                "refused"
            },
            code: refusal.map(|r| r.code.as_str()),
            message: refusal.map(|r| r.message.as_str()),
        };
        if !self.log.append(&line).await && result.is_ok() {
            return Err(refuse(
                Code::Internal,
                "the signer could not write its log",
                "check the signer's log file and its disk; nothing is signed unlogged",
            ));
        }
        result
    }

    /// A refusal decided before the body was read (peer, rate, size).
    async fn refused_early(&self, peer: Peer, r: &Refusal) {
        let line = LogLine {
            time: self.time(),
            peer_uid: peer.uid,
            peer_pid: peer.pid,
            subject: None,
            serial: None,
            fingerprint: None,
            not_after: None,
            outcome: "refused",
            code: Some(r.code.as_str()),
            message: Some(&r.message),
        };
        self.log.append(&line).await;
    }

    fn time(&self) -> String {
        chrono::DateTime::from_timestamp(self.clock.now(), 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default()
    }

    async fn sign_inner(
        &self,
        body: &[u8],
        subject: &mut Option<String>,
    ) -> Result<wire::SignedBody, Refusal> {
        let req: wire::SignBody = serde_json::from_slice(body).map_err(|e| {
            refuse(
                Code::BadRequest,
                format!("the body is not a sign request: {e}"),
                r#"send {"csr": "<PEM CERTIFICATE REQUEST>", "ttl_seconds": N}"#,
            )
        })?;
        let csr = pki::parse_csr(req.csr.as_bytes()).map_err(|e| {
            refuse(
                Code::BadCsr,
                e.to_string(),
                "send a PEM CERTIFICATE REQUEST signed by its own key",
            )
        })?;
        *subject = Some(format!(
            "CN={}{}",
            csr.common_name,
            csr.organizations
                .iter()
                .map(|o| format!(",O={o}"))
                .collect::<String>()
        ));
        self.check(&csr, req.ttl_seconds)?;
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        let sign_req = SignRequest {
            credential_id: "",
            user: &csr.common_name,
            organizations: &csr.organizations,
            csr_der: &csr.der,
            ttl: Duration::from_secs(req.ttl_seconds),
        };
        let pem = self.backend.issue(&sign_req).await?;
        let info = pki::parse_cert_pem(&pem, "issued")
            .map_err(|e| refuse(Code::Internal, e.to_string(), "report this as a bug"))?;
        Ok(wire::SignedBody {
            certificate: pem,
            serial: info.serial,
            not_after: info.not_after,
        })
    }

    fn allowed(&self, peer: Peer) -> bool {
        self.settings.allowed_uids.is_empty()
            || peer
                .uid
                .is_some_and(|u| self.settings.allowed_uids.contains(&u))
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
        peer: Peer,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path().to_string();
        let resp = match (req.method().clone(), path.as_str()) {
            (Method::GET, wire::HEALTH_PATH) => json(200, &serde_json::json!({"status": "ok"})),
            (_, wire::CA_PATH | wire::SIGN_PATH) if !self.allowed(peer) => {
                let r = refuse(
                    Code::PeerNotAllowed,
                    format!(
                        "peer uid {:?} is not in signer_service.allowed_uids",
                        peer.uid
                    ),
                    "run the daemon as a uid listed in signer_service.allowed_uids",
                );
                self.refused_early(peer, &r).await;
                error(&r)
            }
            (Method::GET, wire::CA_PATH) => json(
                200,
                &wire::CaBody {
                    certificate: self.ca_pem().to_string(),
                },
            ),
            (Method::POST, wire::SIGN_PATH) => match self.read_and_sign(req, peer).await {
                Ok(s) => json(200, &s),
                Err(r) => error(&r),
            },
            _ => error(&refuse(
                Code::NotFound,
                format!("no such endpoint: {path}"),
                "use POST /v1/sign, GET /v1/ca or GET /healthz",
            )),
        };
        Ok(resp)
    }

    async fn read_and_sign(
        &self,
        req: Request<hyper::body::Incoming>,
        peer: Peer,
    ) -> Result<wire::SignedBody, Refusal> {
        let early = |r: Refusal| async move {
            self.refused_early(peer, &r).await;
            Err(r)
        };
        if !self.bucket.lock().expect("bucket").take() {
            return early(refuse(
                Code::RateLimited,
                format!(
                    "more than {} signatures a second (burst {})",
                    self.settings.rate_per_second, self.settings.burst
                ),
                "retry later, or raise signer_service.rate_per_second",
            ))
            .await;
        }
        let max = self.settings.max_body_bytes;
        let too_large = || {
            refuse(
                Code::BodyTooLarge,
                format!("the body is over the signer's limit of {max} bytes"),
                "send one CSR; raise signer_service.max_body_bytes only for very large keys",
            )
        };
        let declared = req
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if let Some(n) = declared.filter(|&n| n > max) {
            // Read and drop a body of bounded size before answering: a client
            // still writing it when the connection closes never sees the 413.
            if n <= DRAIN_LIMIT {
                let mut body = req.into_body();
                let drain = async { while let Some(Ok(_)) = body.frame().await {} };
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
            }
            return early(too_large()).await;
        }
        let body = match Limited::new(req.into_body(), max).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return early(too_large()).await,
        };
        self.sign(peer, &body).await
    }

    /// Accepts connections until `shutdown` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                a = listener.accept() => match a {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let peer = stream
                .peer_cred()
                .map(|c| Peer {
                    uid: Some(c.uid()),
                    pid: c.pid(),
                })
                .unwrap_or_default();
            let svc = self.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| svc.clone().handle(req, peer));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }
}

/// The largest announced body read and dropped before its 413; a larger one
/// is refused with the connection closed.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;
/// How long a refused body may take to arrive.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn json<T: Serialize>(status: u16, body: &T) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).expect("valid status"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("bodies serialize"),
        )))
        .expect("valid response")
}

fn error(r: &Refusal) -> Response<Full<Bytes>> {
    json(
        r.code.status(),
        &ErrorBody {
            error: ErrorDetail {
                code: r.code.as_str().into(),
                message: r.message.clone(),
                fix: r.fix.clone(),
            },
        },
    )
}

/// Binds the signer's socket, mode 0660. A stale socket (nothing answers) is
/// replaced; a live one, or anything that is not a socket, is refused.
pub fn bind(path: &Path) -> Result<UnixListener, ServiceError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |reason: String, fix: &'static str| ServiceError::Socket {
        path: path.to_path_buf(),
        reason,
        fix,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            err(
                e.to_string(),
                "create the socket directory (systemd: RuntimeDirectory=rotator)",
            )
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(
                "exists and is not a socket".into(),
                "remove it or choose another signer_service.socket",
            ));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(
                "another signer is listening on it".into(),
                "stop the other `rotator signer` first",
            ));
        }
        std::fs::remove_file(path).map_err(|e| err(e.to_string(), "remove the stale socket"))?;
    }
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o117));
    let listener = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = listener.map_err(|e| {
        err(
            e.to_string(),
            "make the socket directory writable by the signer's user",
        )
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(e.to_string(), "check the socket directory"))?;
    Ok(listener)
}
