//! The webhook over HTTPS: its own serving certificate, the API server's
//! client certificate verified against `authz.client_ca_file` (anyone else
//! fails the handshake), HTTP/1.1 with keep-alive, bodies capped, and a
//! refresher that keeps the snapshot within `authz.refresh_interval` of the
//! database (at once for this process's own commits).
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::review::{self, MAX_BODY_BYTES};
use super::snapshot::{Refreshed, Shared};
use super::{Rules, Verdict};
use crate::app::App;
use crate::daemon::api::{ConnectionSlots, Failed, Handshakes};
use crate::support::exit::{Exit, ExitStatus};

/// Connections that completed TLS (with `authz.client_ca_file`, the API
/// server's alone): it keeps them open and reuses them.
const MAX_CONNECTIONS: usize = 1024;
/// Connections still in their TLS handshake, which anyone who can connect can
/// open: a pool apart, in which a newcomer displaces the one that has gone
/// longest without sending (`server::Handshakes`), so a flood cannot take the
/// places of the API server's connections or keep its new ones out.
const PENDING_HANDSHAKES: usize = 256;
const PENDING_HANDSHAKES_PER_ADDRESS: usize = 64;
/// A handshake takes milliseconds; a client that needs longer is not the API server.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle kept-alive connections are closed after this.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("cannot use {what} {path}: {reason}\nfix: {fix}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error(transparent)]
    Serving(#[from] crate::daemon::api::TlsError),
    #[error("cannot set up the authorization webhook's TLS: {0}")]
    Setup(String),
}

impl ExitStatus for AuthzError {
    fn exit(&self) -> Exit {
        Exit::Config
    }
}

fn file_err(what: &'static str, path: &Path, reason: impl ToString) -> AuthzError {
    AuthzError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
        fix: "check the path and that it holds PEM; rotator needs to read it",
    }
}

/// The rustls configuration: `authz.tls_cert`/`tls_key` or a certificate from
/// the local CA (kept in `DATA_DIR/authz/`), and client certificates required
/// and verified against `authz.client_ca_file` when it is set.
pub fn tls_config(app: &App) -> Result<Arc<ServerConfig>, AuthzError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let s = &app.settings.authz;
    let (chain, key) = crate::daemon::api::serving_identity(
        app,
        &crate::daemon::api::Serving {
            section: "authz",
            purpose: "the authorization webhook",
            files: &s.tls,
            hostnames: &s.hostnames,
        },
    )?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| AuthzError::Setup(e.to_string()))?;
    let builder = match &s.client_ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| file_err("authz.client_ca_file", path, e))?;
            let roots = crate::pki::root_store(&pem)
                .map_err(|e| file_err("authz.client_ca_file", path, e))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| AuthzError::Setup(format!("client verifier: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| AuthzError::Setup(format!("serving certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The webhook's state: the snapshot and where settings come from.
#[derive(Clone)]
pub struct Webhook {
    pub snapshot: Arc<Shared>,
    pub apps: tokio::sync::watch::Receiver<Arc<App>>,
}

impl Webhook {
    pub fn new(apps: tokio::sync::watch::Receiver<Arc<App>>) -> Self {
        Self {
            snapshot: Arc::new(Shared::default()),
            apps,
        }
    }

    fn rules(app: &App) -> Rules {
        Rules {
            grace_seconds: i64::try_from(app.settings.rotation.grace_period.as_secs())
                .unwrap_or(i64::MAX),
            deny_unknown_users: app.settings.authz.deny_unknown_users,
        }
    }

    /// One refresh from the current App's database, with its metrics and logs.
    pub async fn refresh(&self) -> bool {
        let app = self.apps.borrow().clone();
        match self.snapshot.refresh(&app.store).await {
            Ok(r) => {
                match r {
                    Refreshed::Full { credentials } => {
                        info!(credentials, "authorization snapshot loaded")
                    }
                    Refreshed::Changed { credentials, users } => {
                        debug!(credentials, users, "authorization snapshot refreshed")
                    }
                    Refreshed::Unchanged => {}
                }
                app.metrics
                    .authz_snapshot(self.snapshot.read().len(), app.clock.now());
                app.metrics.authz_fresh(self.snapshot.fresh_at());
                true
            }
            Err(e) => {
                warn!(error = %e, "authorization snapshot not refreshed; answering from the last one");
                false
            }
        }
    }

    /// Keeps the snapshot fresh until `shutdown`: on each commit of this
    /// process's store, and every `authz.refresh_interval` for other processes'.
    pub async fn keep_fresh(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut apps = self.apps.clone();
        // Kept across rounds: a commit made while a refresh runs is not lost.
        let mut commits = apps.borrow_and_update().store.commits();
        // Reads begin every interval whatever a read takes, so another
        // process's change is read within one interval plus one read.
        let mut interval = apps.borrow().settings.authz.refresh_interval;
        let mut ticks = ticker(interval);
        loop {
            let now = apps.borrow().settings.authz.refresh_interval;
            if now != interval {
                interval = now;
                ticks = ticker(interval);
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = ticks.tick() => {}
                r = commits.changed() => {
                    if r.is_err() {
                        // That store is gone (a reload): poll until the new App arrives.
                        tokio::time::sleep(interval).await;
                    }
                }
                r = apps.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // A reload opened the database again: follow its commits.
                    commits = apps.borrow_and_update().store.commits();
                }
            }
            // A read stuck on an unreachable database (the pool waits for a
            // connection) gives up, so the next one starts once it is back.
            let bound = apps.borrow().settings.authz.max_staleness;
            if tokio::time::timeout(bound, self.refresh()).await.is_err() {
                warn!(waited = ?bound, "authorization snapshot not refreshed: the database did not answer");
            }
        }
    }

    /// Answers one review body, first reading the database's changes when the
    /// snapshot does not know the certificate or generation: a credential
    /// another process (the CLI) has just issued is not in the snapshot until
    /// the next refresh, and a denial would be cached by the API server for
    /// `unauthorizedTTL`, so a new user's first requests would fail. The look
    /// is one counter read when nothing changed, bounded in time.
    pub async fn answer_fresh(&self, app: &App, body: &[u8]) -> (u16, serde_json::Value) {
        if self.unknown_to_snapshot(app, body) {
            let _ = tokio::time::timeout(FRESH_LOOK, self.refresh()).await;
        }
        self.answer(app, body)
    }

    fn unknown_to_snapshot(&self, app: &App, body: &[u8]) -> bool {
        let Ok(spec) = review::parse(body) else {
            return false;
        };
        let snap = self.snapshot.read();
        snap.loaded()
            && matches!(
                super::decide(&snap, &spec, app.clock.now(), Self::rules(app)).why,
                "unknown_certificate" | "unknown_generation"
            )
    }

    /// The answer while the states are older than `authz.max_staleness`: a
    /// revocation made since (by a replica that still reaches the database)
    /// may be unknown here, so rather than "no opinion" the API server gets
    /// an error and applies its failurePolicy (Deny in the shipped config).
    fn stale(&self, app: &App) -> Option<(u16, serde_json::Value)> {
        let bound = app.settings.authz.max_staleness;
        let age = self.snapshot.age().filter(|a| *a > bound)?;
        Some((
            503,
            review::status(
                503,
                "ServiceUnavailable",
                &format!(
                    "rotator last read its credential states {}s ago, more than authz.max_staleness ({}): it cannot reach its database, and a revocation since may be unknown to it; the API server's failurePolicy applies",
                    age.as_secs(),
                    humantime::format_duration(bound)
                ),
            ),
        ))
    }

    /// Answers one review body (the handler's core; benchmarks call it directly).
    pub fn answer(&self, app: &App, body: &[u8]) -> (u16, serde_json::Value) {
        let started = Instant::now();
        let spec = match review::parse(body) {
            Ok(s) => s,
            Err(e) => {
                app.metrics
                    .authz_decision("bad_request", "bad_request", started.elapsed());
                debug!(error = %e, "authorization review refused");
                return (400, review::status(400, "BadRequest", &e.message));
            }
        };
        let now = app.clock.now();
        let decision = {
            let snap = self.snapshot.read();
            if !snap.loaded() {
                drop(snap);
                app.metrics
                    .authz_decision("unavailable", "not_loaded", started.elapsed());
                return (
                    503,
                    review::status(
                        503,
                        "ServiceUnavailable",
                        "rotator has not read its credential states yet; the API server's failurePolicy applies",
                    ),
                );
            }
            if let Some(r) = self.stale(app) {
                drop(snap);
                app.metrics
                    .authz_decision("unavailable", "stale", started.elapsed());
                return r;
            }
            super::decide(&snap, &spec, now, Self::rules(app))
        };
        let (label, body) = match &decision.verdict {
            Verdict::Deny(reason) => {
                info!(user = %spec.user, credential = decision.credential.as_deref().unwrap_or("-"),
                      why = decision.why, request = %spec.what(), "authorization webhook denied a request");
                ("denied", review::answer(true, Some(reason)))
            }
            Verdict::NoOpinion => {
                debug!(user = %spec.user, credential = decision.credential.as_deref().unwrap_or("-"),
                       why = decision.why, "authorization webhook: no opinion");
                ("no_opinion", review::answer(false, None))
            }
        };
        app.metrics
            .authz_decision(label, decision.why, started.elapsed());
        (200, body)
    }
}

fn respond(status: u16, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(body).expect("json"),
    )));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// How long a review waits for the database when the snapshot does not know its
/// certificate (well inside the API server's webhook timeout).
const FRESH_LOOK: Duration = Duration::from_millis(500);

/// The largest announced body that is read and dropped before its 400.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// Reads `body` to its end, keeping nothing; false when it errs or is late.
async fn drain(mut body: Incoming) -> bool {
    let all = async {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(BODY_TIMEOUT, all)
        .await
        .unwrap_or(false)
}

async fn handle(hook: &Webhook, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let app = hook.apps.borrow().clone();
    if req.uri().path() != "/v1/authorize" {
        return respond(
            404,
            &review::status(
                404,
                "NotFound",
                &format!(
                    "no endpoint {:?}; the webhook is POST /v1/authorize",
                    req.uri().path()
                ),
            ),
        );
    }
    if req.method() != hyper::Method::POST {
        return respond(
            405,
            &review::status(
                405,
                "MethodNotAllowed",
                "the webhook answers POST /v1/authorize",
            ),
        );
    }
    let announced = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = announced.filter(|n| *n > MAX_BODY_BYTES) {
        app.metrics
            .authz_decision("bad_request", "too_large", Duration::ZERO);
        // Read and dropped (never kept) up to a limit, so the client that is
        // still writing gets its 400 instead of a reset; past it, closed.
        let drained = n <= DRAIN_LIMIT && drain(req.into_body()).await;
        let mut r = respond(
            400,
            &review::status(400, "BadRequest", &review::too_large(n).message),
        );
        if !drained {
            r.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
        }
        return r;
    }
    let read = Limited::new(req.into_body(), MAX_BODY_BYTES + 1).collect();
    let body = match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => {
            let message = if e.is::<http_body_util::LengthLimitError>() {
                review::too_large(MAX_BODY_BYTES + 1).message
            } else {
                format!("the body could not be read: {e}")
            };
            app.metrics
                .authz_decision("bad_request", "unreadable", Duration::ZERO);
            let mut r = respond(400, &review::status(400, "BadRequest", &message));
            r.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            return r;
        }
        Err(_) => {
            return respond(
                408,
                &review::status(408, "Timeout", "the body did not arrive in time"),
            );
        }
    };
    let (status, answer) = hook.answer_fresh(&app, &body).await;
    respond(status, &answer)
}

/// Serves the webhook until `shutdown` resolves; loads the snapshot first, so
/// the first review is answered from the database's states, not refused.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    hook: Webhook,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if !hook.refresh().await {
        warn!("the authorization webhook answers 503 until it can read the database");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let fresh = {
        let hook = hook.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(hook.keep_fresh(async move {
            let _ = rx.changed().await;
        }))
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshakes = Handshakes::new(
        PENDING_HANDSHAKES,
        PENDING_HANDSHAKES_PER_ADDRESS,
        HANDSHAKE_TIMEOUT,
    );
    let established = ConnectionSlots::new(MAX_CONNECTIONS, MAX_CONNECTIONS);
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "authorization webhook: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Nothing here waits: a flood is taken in as fast as it comes and
        // displaces only pending handshakes, never a connection being served.
        let Ok((tcp, sent)) = crate::daemon::api::has_sent(tcp) else {
            continue;
        };
        let (ticket, displaced) = handshakes.admit(addr.ip(), sent);
        if let Some(d) = displaced {
            hook.apps
                .borrow()
                .metrics
                .authz_connection_closed(d.label());
        }
        let (acceptor, hook, established) = (acceptor.clone(), hook.clone(), established.clone());
        tokio::spawn(async move {
            let stream = match ticket.handshake(&acceptor, tcp).await {
                Ok(s) => s,
                Err(Failed::Tls(e)) => {
                    // A client without a certificate from authz.client_ca_file ends here.
                    info!(%addr, error = %e, "authorization webhook: TLS handshake refused");
                    return;
                }
                Err(Failed::Late) => {
                    debug!(%addr, "authorization webhook: handshake not done in time");
                    hook.apps.borrow().metrics.authz_connection_closed("late");
                    return;
                }
                Err(Failed::Displaced) => {
                    debug!(%addr, "authorization webhook: pending handshake displaced by a newer connection");
                    return;
                }
            };
            let Ok(_slot) = established.try_acquire(addr.ip()) else {
                warn!(%addr, "authorization webhook: connection closed, all {MAX_CONNECTIONS} served connections held");
                hook.apps
                    .borrow()
                    .metrics
                    .authz_connection_closed("established");
                return;
            };
            let svc = hyper::service::service_fn(move |req| {
                let hook = hook.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&hook, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = conn.await;
        });
    }
    let _ = stop_tx.send(true);
    let _ = fresh.await;
}
