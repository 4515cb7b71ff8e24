//! The user API over HTTPS: `POST /v1/subject`, `/v1/enroll`,
//! `/v1/renew`. Bounded everywhere: a connection cap per source address and in
//! all, deadlines for the handshake, the headers (and idle keep-alive time) and
//! the body, a body limit checked against `Content-Length` before reading, and
//! rate limits per source address and (once a request proved who it is) per user.
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::app::App;
use crate::flows::self_service::{self, ApiError, MAX_BODY_BYTES, Peer};
use crate::store::credentials;

mod handshakes;
mod ratelimit;
mod refusals;
mod slots;
mod tls;

pub use handshakes::{Displaced, Failed, Handshakes, Ticket, Watched, has_sent};
pub use ratelimit::RateLimiter;
pub use refusals::Refusals;
pub use slots::{ConnectionSlots, Full as SlotsFull, Slot, client_key};
pub use tls::{Serving, TlsError, local_ca_serving_pem, server_config, serving_identity};

/// The longest one connection is served, whatever it does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// How often refusals of unauthenticated requests are summarized in the audit log.
const REFUSAL_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Limits outlive configuration reloads: they belong to the listener.
#[derive(Debug)]
pub struct Limits {
    pub per_address: RateLimiter<IpAddr>,
    pub per_user: RateLimiter<String>,
    pub connections: Arc<ConnectionSlots>,
    pub refusals: Refusals,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
}

impl Limits {
    pub fn new(app: &App) -> Self {
        let s = &app.settings.server;
        Self {
            per_address: RateLimiter::new(s.rate_limit_per_address),
            per_user: RateLimiter::new(s.rate_limit_per_user),
            connections: ConnectionSlots::new(s.max_connections, s.max_connections_per_address),
            refusals: Refusals::default(),
            header_timeout: s.header_timeout,
            body_timeout: s.body_timeout,
        }
    }
}

/// Serves the API until `shutdown` resolves. Each connection uses the
/// configuration current when it was accepted.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    apps: tokio::sync::watch::Receiver<Arc<App>>,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Arc::new(Limits::new(&apps.borrow()));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut summary = tokio::time::interval(REFUSAL_SUMMARY_EVERY);
    summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    summary.tick().await;
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            _ = summary.tick() => {
                let (app, limits) = (apps.borrow().clone(), limits.clone());
                tokio::spawn(async move { flush_refusals(&app, &limits).await });
                continue;
            }
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let app = apps.borrow().clone();
        let slot = match limits.connections.try_acquire(addr.ip()) {
            Ok(s) => s,
            Err(full) => {
                // Closed before TLS: it costs the server nothing more.
                debug!(%addr, reason = full.label(), "connection refused: too many open connections");
                app.metrics.api_connection_refused(full.label());
                continue;
            }
        };
        let (limits, acceptor) = (limits.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp));
            let stream = match handshake.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // A certificate from another CA ends here, before any handler runs.
                    info!(%addr, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let certificate_der = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec());
            let peer = Peer {
                addr,
                certificate_der,
            };
            let header_timeout = limits.header_timeout;
            let svc = hyper::service::service_fn(move |req| {
                let (app, limits, peer) = (app.clone(), limits.clone(), peer.clone());
                async move { Ok::<_, std::convert::Infallible>(route(&app, &limits, &peer, req).await) }
            });
            // The header deadline also bounds idle time between kept-alive requests.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
    let app = apps.borrow().clone();
    flush_refusals(&app, &limits).await;
}

async fn flush_refusals(app: &App, limits: &Limits) {
    if let Err(e) = limits.refusals.flush(app).await {
        warn!(error = %e, "could not write the summary of refused API requests; kept for the next one");
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
    r.headers_mut().insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    r
}

fn error_response(e: &ApiError, retry_after: Option<Duration>) -> Response<Full<Bytes>> {
    let mut r = respond(e.status, &json!({ "error": e }));
    if let Some(d) = retry_after
        && let Ok(v) = hyper::header::HeaderValue::from_str(&d.as_secs().max(1).to_string())
    {
        r.headers_mut().insert(hyper::header::RETRY_AFTER, v);
    }
    r
}

fn rate_limited(what: &str, wait: Duration) -> Response<Full<Bytes>> {
    let e = ApiError::new(
        429,
        "rate_limited",
        format!("too many requests {what}"),
        format!("wait {}s and try again", wait.as_secs().max(1)),
    );
    error_response(&e, Some(wait))
}

/// The user a request proved to be: the owner of the enrollment token whose
/// secret matched, or of the rotator credential the client certificate (already
/// verified against the client CA by TLS) is. `None` for anything else: such a
/// request is refused, counted in the refusal summary and never charged to a user.
async fn authenticated_user(app: &App, peer: &Peer, token: Option<&str>) -> Option<String> {
    if let Some(t) = token {
        let presented = crate::flows::enroll::parse(t).ok()?;
        return crate::flows::enroll::owner(app, &presented)
            .await
            .ok()
            .flatten();
    }
    let der = peer.certificate_der.as_deref()?;
    let fp = crate::pki::hex(&crate::pki::sha256(der));
    let mut conn = app.store.conn().await.ok()?;
    credentials::by_fingerprint(&mut conn, &fp)
        .await
        .ok()
        .flatten()
        .map(|c| c.user_name)
}

enum Call {
    Subject(self_service::SubjectRequest),
    Enroll(self_service::EnrollRequest),
    Renew(self_service::RenewRequest),
}

impl Call {
    fn token(&self) -> Option<&str> {
        match self {
            Call::Subject(r) => r.token.as_deref(),
            Call::Enroll(r) => Some(&r.token),
            Call::Renew(_) => None,
        }
    }
}

/// Parses a request body for `path`. Never panics, whatever the bytes.
pub fn parse_call(path: &str, body: &[u8]) -> Result<(), ApiError> {
    parse(path, body).map(|_| ())
}

fn parse(path: &str, body: &[u8]) -> Result<Call, ApiError> {
    Ok(match path {
        "/v1/subject" => Call::Subject(self_service::parse_body(body)?),
        "/v1/enroll" => {
            let r: self_service::EnrollRequest = self_service::parse_body(body)?;
            self_service::parse_csr_field(&r.csr)?;
            crate::flows::enroll::parse(&r.token).map_err(self_service::malformed_token)?;
            Call::Enroll(r)
        }
        "/v1/renew" => {
            let r: self_service::RenewRequest = self_service::parse_body(body)?;
            self_service::parse_csr_field(&r.csr)?;
            Call::Renew(r)
        }
        other => {
            return Err(ApiError::new(
                404,
                "not_found",
                format!("no endpoint {other:?}"),
                "the API has POST /v1/subject, /v1/enroll and /v1/renew",
            ));
        }
    })
}

async fn route(
    app: &App,
    limits: &Limits,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let resp = answer(app, limits, peer, req).await;
    let outcome = if resp.status() == StatusCode::OK {
        "ok".to_string()
    } else {
        format!("{}", resp.status().as_u16())
    };
    app.metrics.api(&path, &outcome);
    resp
}

/// A refusal of a request that did not authenticate: counted, not logged a row each.
fn refuse(app: &App, limits: &Limits, peer: &Peer, e: &ApiError) -> Response<Full<Bytes>> {
    debug!(peer = %peer.addr, status = e.status, code = %e.code, "API request refused before authentication");
    limits.refusals.count(app, &e.code, peer.addr.ip());
    error_response(e, None)
}

/// Largest announced body that is read and dropped before a 413, rather than
/// the connection closed under a client still writing it.
const DRAIN_LIMIT: u64 = 256 * 1024;

/// Reads `body` to its end, keeping nothing; false when it errs or is late.
async fn drain(mut body: Incoming, deadline: Duration) -> bool {
    let all = async {
        while let Some(frame) = body.frame().await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    tokio::time::timeout(deadline, all).await.unwrap_or(false)
}

/// Ends the connection after this answer: the rest of the request is not read.
fn closing(mut r: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("close"),
    );
    r
}

async fn answer(
    app: &App,
    limits: &Limits,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        return respond(200, &json!({"status": "ok"}));
    }
    if let Err(wait) = limits.per_address.check(&client_key(peer.addr.ip())) {
        debug!(peer = %peer.addr, "rate limited (address)");
        limits.refusals.count(app, "rate_limited", peer.addr.ip());
        return rate_limited(&format!("from {}", peer.addr.ip()), wait);
    }
    let misdirected = if !matches!(path.as_str(), "/v1/subject" | "/v1/enroll" | "/v1/renew") {
        parse(&path, b"").err()
    } else if req.method() != hyper::Method::POST {
        Some(ApiError::new(
            405,
            "method_not_allowed",
            format!("{} {path} is not served", req.method()),
            format!("use POST {path}"),
        ))
    } else {
        None
    };
    if let Some(e) = misdirected {
        return refuse(app, limits, peer, &e);
    }
    // An announced body over the limit is refused before a byte of it is read.
    let announced = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = announced.filter(|n| *n > MAX_BODY_BYTES as u64) {
        let e = self_service::too_large(usize::try_from(n).unwrap_or(usize::MAX));
        // A body a little too large is read and dropped (never kept), so a client
        // still sending it reads this answer instead of a reset connection.
        if n <= DRAIN_LIMIT && drain(req.into_body(), limits.body_timeout).await {
            return refuse(app, limits, peer, &e);
        }
        return closing(refuse(app, limits, peer, &e));
    }
    let json_body = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
    if !json_body {
        let e = ApiError::new(
            415,
            "unsupported_media_type",
            "the request's Content-Type is not application/json",
            "send the body as JSON with Content-Type: application/json",
        );
        return closing(refuse(app, limits, peer, &e));
    }
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    let parsed = match tokio::time::timeout(limits.body_timeout, body).await {
        Ok(Ok(b)) => parse(&path, &b.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            let e = self_service::too_large(MAX_BODY_BYTES + 1);
            return closing(refuse(app, limits, peer, &e));
        }
        Ok(Err(e)) => Err(ApiError::new(
            400,
            "bad_request",
            format!("the request body could not be read: {e}"),
            "send the whole body",
        )),
        Err(_) => {
            let e = ApiError::new(
                408,
                "body_timeout",
                format!(
                    "the request body did not arrive within {}s",
                    limits.body_timeout.as_secs()
                ),
                "send the whole request at once; the body is one small JSON object",
            );
            return closing(refuse(app, limits, peer, &e));
        }
    };
    let call = match parsed {
        Ok(c) => c,
        Err(e) => return refuse(app, limits, peer, &e),
    };
    // Counted against a user only once the request proved to be that user: a
    // guessed or stolen token id alone neither locks the user out nor names them.
    let user = authenticated_user(app, peer, call.token()).await;
    if let Some(u) = &user
        && let Err(wait) = limits.per_user.check(u)
    {
        debug!(user = %u, "rate limited (user)");
        limits.refusals.count(app, "rate_limited", peer.addr.ip());
        return rate_limited(&format!("for user {u}"), wait);
    }
    let result = match call {
        Call::Subject(r) => self_service::subject(app, peer, r).await.map(|s| {
            (
                format!("generation {}", s.generation),
                serde_json::to_value(s).expect("json"),
            )
        }),
        Call::Enroll(r) => self_service::enroll(app, peer, r).await.map(|g| {
            (
                format!("serial {}", g.serial),
                serde_json::to_value(g).expect("json"),
            )
        }),
        Call::Renew(r) => self_service::renew(app, peer, r).await.map(|g| {
            (
                format!("serial {}", g.serial),
                serde_json::to_value(g).expect("json"),
            )
        }),
    };
    match (result, &user) {
        (Ok((summary, body)), _) => {
            audit(app, peer, &path, user.as_deref(), Ok(&summary)).await;
            respond(200, &body)
        }
        (Err(e), Some(u)) => {
            audit(app, peer, &path, Some(u), Err(&e)).await;
            error_response(&e, None)
        }
        (Err(e), None) => refuse(app, limits, peer, &e),
    }
}

async fn audit(
    app: &App,
    peer: &Peer,
    path: &str,
    user: Option<&str>,
    outcome: Result<&str, &ApiError>,
) {
    if let Err(e) = self_service::audit_call(app, peer, path, user, outcome).await {
        warn!(error = %e, peer = %peer.addr, "could not audit an API call");
    }
}

#[cfg(test)]
mod fuzz {
    //! Request parsing faces the network: whatever the bytes, it answers Ok or
    //! a 4xx, and never panics. Bounded by the case count (PROPTEST_CASES).
    use super::parse_call;
    use crate::pki::{self, KeyType, PrivateKey};
    use proptest::prelude::*;
    use std::sync::LazyLock;

    const PATHS: [&str; 4] = ["/v1/subject", "/v1/enroll", "/v1/renew", "/elsewhere"];

    static CSR: LazyLock<String> = LazyLock::new(|| {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let orgs = vec!["dev".to_string(), "rotator:alice:1".to_string()];
        let der = pki::build_csr(&key, &pki::subject_name("alice", &orgs).unwrap()).unwrap();
        pki::pem_encode("CERTIFICATE REQUEST", &der)
    });

    fn answered(path: &str, body: &[u8]) -> Result<(), TestCaseError> {
        match parse_call(path, body) {
            Ok(()) => Ok(()),
            Err(e) => {
                prop_assert!(
                    (400..500).contains(&e.status),
                    "{path}: status {} for {e}",
                    e.status
                );
                prop_assert!(!e.code.is_empty() && !e.fix.is_empty());
                Ok(())
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

        #[test]
        fn any_bytes(path in 0..PATHS.len(), body in proptest::collection::vec(any::<u8>(), 0..4096)) {
            answered(PATHS[path], &body)?;
        }

        #[test]
        fn json_shaped(path in 0..3usize, token in ".{0,80}", csr in ".{0,200}", extra in proptest::option::of("[a-z]{1,8}")) {
            let mut v = serde_json::json!({"token": token, "csr": csr});
            if let Some(k) = extra {
                v[k] = serde_json::json!(1);
            }
            answered(PATHS[path], &serde_json::to_vec(&v).unwrap())?;
        }

        #[test]
        fn damaged_csrs(flips in proptest::collection::vec((0..2000usize, any::<u8>()), 1..8), cut in 0..2000usize) {
            let mut pem = CSR.as_bytes().to_vec();
            for (at, b) in flips {
                let n = pem.len();
                pem[at % n] = b;
            }
            pem.truncate(cut.max(1).min(pem.len()));
            let csr = String::from_utf8_lossy(&pem).to_string();
            let token = format!("0123456789ab.{}", "A".repeat(43));
            for path in ["/v1/enroll", "/v1/renew"] {
                let body = serde_json::to_vec(&serde_json::json!({"token": token, "csr": csr})).unwrap();
                let body = if path == "/v1/renew" {
                    serde_json::to_vec(&serde_json::json!({"csr": csr})).unwrap()
                } else {
                    body
                };
                answered(path, &body)?;
            }
        }
    }

    #[test]
    fn the_intact_csr_parses() {
        let token = format!("0123456789ab.{}", "A".repeat(43));
        let body = serde_json::to_vec(&serde_json::json!({"token": token, "csr": *CSR})).unwrap();
        assert!(parse_call("/v1/enroll", &body).is_ok());
    }
}
