//! Prometheus metrics, and the plain-HTTP listener for `/healthz`, `/readyz`
//! and `/metrics` (separate from any user-facing endpoint).
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::app::App;

type Labels = Vec<(String, String)>;

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Everything the daemon counts. Gauges that describe the database are filled
/// at scrape time, so they are never stale.
pub struct Metrics {
    registry: Registry,
    credentials: Family<Labels, Gauge>,
    expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    tokens: Family<Labels, Gauge>,
    pub issuance_duration: Histogram,
    pub issuances: Family<Labels, Counter>,
    pub job_runs: Family<Labels, Counter>,
    pub job_last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    pub job_duration: Family<Labels, Gauge<f64, AtomicU64>>,
    pub drift_repairs: Counter,
    pub api_requests: Family<Labels, Counter>,
    pub api_refusals: Family<Labels, Counter>,
    pub api_connections_refused: Family<Labels, Counter>,
    /// 1 for the Vault connection's state (`ready`, `sealed`, `unreachable`, ...), else 0.
    vault_state: Family<Labels, Gauge>,
    pub authz_decisions: Family<Labels, Counter>,
    pub authz_duration: Histogram,
    pub authz_snapshot_refreshed: Gauge<f64, AtomicU64>,
    pub authz_snapshot_credentials: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rotator");
        let credentials = Family::<Labels, Gauge>::default();
        registry.register("credentials", "Credentials by state", credentials.clone());
        let expiry = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "credential_expiry_timestamp_seconds",
            "notAfter of each active user's current credential (alert before it passes)",
            expiry.clone(),
        );
        let tokens = Family::<Labels, Gauge>::default();
        registry.register(
            "bootstrap_tokens",
            "Bootstrap tokens rotator made, by state",
            tokens.clone(),
        );
        let issuance_duration =
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]);
        registry.register(
            "issuance_duration_seconds",
            "Time from key generation to delivered credential",
            issuance_duration.clone(),
        );
        let issuances = Family::<Labels, Counter>::default();
        registry.register(
            "issuances",
            "Issuances by kind and result (failures by reason)",
            issuances.clone(),
        );
        let job_runs = Family::<Labels, Counter>::default();
        registry.register(
            "job_runs",
            "Scheduled job runs by job and result",
            job_runs.clone(),
        );
        let job_last_success = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "job_last_success_timestamp_seconds",
            "When each job last succeeded",
            job_last_success.clone(),
        );
        let job_duration = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "job_duration_seconds",
            "How long each job's last run took",
            job_duration.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "rbac_drift_repairs",
            "RoleBindings repaired by reconcile",
            drift_repairs.clone(),
        );
        let api_requests = Family::<Labels, Counter>::default();
        registry.register(
            "api_requests",
            "User API requests by endpoint and outcome (ok, or the HTTP status)",
            api_requests.clone(),
        );
        let api_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "api_refusals",
            "User API requests refused before they proved an identity, by code (summarized in the audit log as api.refusals)",
            api_refusals.clone(),
        );
        let api_connections_refused = Family::<Labels, Counter>::default();
        registry.register(
            "api_connections_refused",
            "User API connections closed at once because their address (address) or the listener (total) held all its slots",
            api_connections_refused.clone(),
        );
        let vault_state = Family::<Labels, Gauge>::default();
        registry.register(
            "vault_state",
            "The Vault connection's state: 1 for the current one (ready, sealed, unreachable, unauthenticated, unknown); absent without [vault]",
            vault_state.clone(),
        );
        let authz_decisions = Family::<Labels, Counter>::default();
        registry.register(
            "authz_decisions",
            "Authorization webhook answers by decision (denied, no_opinion, bad_request, unavailable) and reason",
            authz_decisions.clone(),
        );
        let authz_duration = Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
        ]);
        registry.register(
            "authz_decision_duration_seconds",
            "Time from a review's body read to its answer, in the webhook",
            authz_duration.clone(),
        );
        let authz_snapshot_refreshed = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "authz_snapshot_refreshed_timestamp_seconds",
            "When the webhook's in-memory credential states last matched the database (alert when it lags)",
            authz_snapshot_refreshed.clone(),
        );
        let authz_snapshot_credentials = Gauge::default();
        registry.register(
            "authz_snapshot_credentials",
            "Credentials the webhook holds in memory",
            authz_snapshot_credentials.clone(),
        );
        Self {
            authz_decisions,
            authz_duration,
            authz_snapshot_refreshed,
            authz_snapshot_credentials,
            vault_state,
            api_requests,
            api_refusals,
            api_connections_refused,
            registry,
            credentials,
            expiry,
            tokens,
            issuance_duration,
            issuances,
            job_runs,
            job_last_success,
            job_duration,
            drift_repairs,
        }
    }
}

impl Metrics {
    pub fn issuance(&self, kind: &str, result: &str) {
        self.issuances
            .get_or_create(&l(&[("kind", kind), ("result", result)]))
            .inc();
    }

    /// One user API answer; unknown paths count as `other` so labels stay bounded.
    pub fn api(&self, endpoint: &str, outcome: &str) {
        let endpoint = match endpoint {
            "/v1/subject" | "/v1/enroll" | "/v1/renew" => endpoint,
            _ => "other",
        };
        self.api_requests
            .get_or_create(&l(&[("endpoint", endpoint), ("outcome", outcome)]))
            .inc();
    }

    /// A refusal of a request that did not authenticate; `code` is the API's own.
    pub fn api_refusal(&self, code: &str) {
        self.api_refusals.get_or_create(&l(&[("code", code)])).inc();
    }

    /// One webhook answer; `reason` is one of the decision's bounded labels.
    pub fn authz_decision(&self, decision: &str, reason: &str, took: Duration) {
        self.authz_decisions
            .get_or_create(&l(&[("decision", decision), ("reason", reason)]))
            .inc();
        self.authz_duration.observe(took.as_secs_f64());
    }

    /// The webhook's snapshot matched the database at `now` with `credentials` rows.
    pub fn authz_snapshot(&self, credentials: usize, now: i64) {
        self.authz_snapshot_refreshed.set(now as f64);
        self.authz_snapshot_credentials
            .set(i64::try_from(credentials).unwrap_or(i64::MAX));
    }

    pub fn api_connection_refused(&self, reason: &str) {
        self.api_connections_refused
            .get_or_create(&l(&[("reason", reason)]))
            .inc();
    }

    pub fn job(&self, job: &str, ok: bool, took: Duration, now: i64) {
        self.job_runs
            .get_or_create(&l(&[
                ("job", job),
                ("result", if ok { "success" } else { "failure" }),
            ]))
            .inc();
        self.job_duration
            .get_or_create(&l(&[("job", job)]))
            .set(took.as_secs_f64());
        if ok {
            self.job_last_success
                .get_or_create(&l(&[("job", job)]))
                .set(now as f64);
        }
    }

    /// Refreshes the database-backed gauges and renders the text format.
    pub async fn render(&self, app: &App) -> Result<String, crate::store::StoreError> {
        self.credentials.clear();
        for state in [
            "pending",
            "current",
            "superseded",
            "revoked",
            "expired",
            "failed",
        ] {
            self.credentials
                .get_or_create(&l(&[("state", state)]))
                .set(0);
        }
        for (state, n) in crate::store::credentials::count_by_state(&app.store).await? {
            self.credentials
                .get_or_create(&l(&[("state", &state)]))
                .set(n);
        }
        self.expiry.clear();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT c.user_name, MIN(c.not_after) FROM credentials c JOIN users u ON u.name = c.user_name
             WHERE c.state = 'current' AND u.state = 'active' GROUP BY c.user_name",
        )
        .fetch_all(app.store.pool())
        .await?;
        for (user, not_after) in rows {
            self.expiry
                .get_or_create(&l(&[("user", &user)]))
                .set(not_after as f64);
        }
        if let Some(v) = &app.vault {
            let now = v.status().state;
            for s in crate::vault::State::ALL {
                self.vault_state
                    .get_or_create(&l(&[("state", s.as_str())]))
                    .set((s == now) as i64);
            }
        }
        self.tokens.clear();
        for (state, n) in crate::store::tokens::count_by_state(&app.store).await? {
            self.tokens.get_or_create(&l(&[("state", &state)])).set(n);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(|e| crate::store::StoreError::Invalid(e.to_string()))?;
        Ok(out)
    }
}

/// What `/readyz` checks, each with the reason it fails.
pub async fn readiness(app: &App) -> Vec<(String, Result<(), String>)> {
    let mut checks = Vec::new();
    let db = async {
        // Unreachable (a server restarting): why, at once, not the pool's timeout.
        app.store
            .health()
            .await
            .map_err(|e| e.to_string().replace('\n', "; "))?;
        let mut tx = app.store.begin().await.map_err(|e| e.to_string())?;
        sqlx::query("SELECT 1")
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        tx.rollback().await.map_err(|e| e.to_string())
    }
    .await;
    checks.push(("database writable".to_string(), db));
    if let Some(c) = &app.cluster {
        let r = tokio::time::timeout(Duration::from_secs(3), c.client.apiserver_version()).await;
        let r = match r {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 3s".to_string()),
        };
        checks.push(("cluster reachable".to_string(), r));
    }
    if let Some(v) = &app.vault {
        let s = v.status();
        let r = match s.state {
            crate::vault::State::Ready => Ok(()),
            other => Err(match s.detail {
                Some(d) => format!("{}: {}", other.as_str(), d.lines().next().unwrap_or("")),
                None => other.as_str().to_string(),
            }),
        };
        checks.push((format!("vault {} ready", v.address()), r));
    }
    let now = app.clock.now();
    if !app.leader.load(std::sync::atomic::Ordering::SeqCst) {
        checks.push(("jobs".to_string(), Ok(())));
        return checks; // a standby runs no job: nothing can be late
    }
    for job in crate::scheduler::Job::ALL {
        let last = app
            .metrics
            .job_last_success
            .get_or_create(&l(&[("job", job.name())]))
            .get();
        // A job is late when it has not succeeded since two of its ticks ago.
        let sched = &job.schedule(app).schedule;
        let ok = match (sched.upcoming(chrono::Utc).next(), last) {
            _ if last == 0.0 => Err("has not succeeded yet".to_string()),
            (Some(next), l) => {
                let period = sched
                    .after(&next)
                    .next()
                    .map(|n| (n - next).num_seconds())
                    .unwrap_or(60);
                if (now as f64) - l > (2 * period + 60) as f64 {
                    Err(format!("last success {}s ago", now - l as i64))
                } else {
                    Ok(())
                }
            }
            (None, _) => Ok(()),
        };
        checks.push((format!("job {} on schedule", job.name()), ok));
    }
    checks
}

type Body = Full<Bytes>;

fn text(code: u16, body: String) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .expect("response")
}

async fn route(
    app: Arc<App>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match req.uri().path() {
        "/healthz" => text(200, "ok\n".into()),
        "/readyz" => {
            let checks = readiness(&app).await;
            let ready = checks.iter().all(|(_, r)| r.is_ok());
            let body: String = checks
                .iter()
                .map(|(n, r)| match r {
                    Ok(()) => format!("ok   {n}\n"),
                    Err(e) => format!("FAIL {n}: {e}\n"),
                })
                .collect();
            text(if ready { 200 } else { 503 }, body)
        }
        "/metrics" => match app.metrics.render(&app).await {
            Ok(m) => Response::builder()
                .status(200)
                .header(
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .body(Full::new(Bytes::from(m)))
                .expect("response"),
            Err(e) => text(500, format!("cannot read the database: {e}\n")),
        },
        _ => text(404, "not found: try /healthz, /readyz or /metrics\n".into()),
    })
}

/// Serves health and metrics on `addr` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    apps: tokio::sync::watch::Receiver<Arc<App>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => {
                let Ok((tcp, _)) = r else { continue };
                // The current configuration, also after a reload.
                let app = apps.borrow().clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| route(app.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), svc).await;
                });
            }
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
