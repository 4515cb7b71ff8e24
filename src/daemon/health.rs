//! The plain-HTTP listener for `/healthz`, `/readyz` and `/metrics`, separate
//! from any user-facing endpoint: what it checks and what it reads at scrape time.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

use crate::app::App;
use crate::store::StoreError;
use crate::support::metrics::Gauges;

/// The `/metrics` text: the counters, and the gauges read from the database now.
/// While the database cannot be read its gauges are left out, and the rest
/// (the counters, the webhook's staleness) is still served: an outage is when
/// they matter.
pub async fn metrics_text(app: &App) -> Result<String, StoreError> {
    let g = match gauges(app).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(error = %e, "metrics: the database's gauges left out");
            Gauges {
                database_unreadable: true,
                ..Gauges::default()
            }
        }
    };
    let g = Gauges {
        authz_staleness: authz_staleness(app),
        ..g
    };
    app.metrics
        .render(&g)
        .map_err(|e| StoreError::Invalid(format!("rendering the metrics: {e}")))
}

/// With a webhook: its states' age and whether it is past `authz.max_staleness`.
fn authz_staleness(app: &App) -> Option<(Option<Duration>, bool)> {
    app.settings.authz.listen?;
    let age = app.metrics.authz_age();
    Some((
        age,
        age.is_none_or(|a| a > app.settings.authz.max_staleness),
    ))
}

/// The webhook's readiness: it answers from states read from the database
/// within `authz.max_staleness` (else it answers 503 and the API server's
/// failurePolicy applies, so a load balancer should send reviews elsewhere).
fn authz_fresh(app: &App) -> Option<(String, Result<(), String>)> {
    let (age, stale) = authz_staleness(app)?;
    let bound = humantime::format_duration(app.settings.authz.max_staleness);
    let r = match (age, stale) {
        (_, false) => Ok(()),
        (None, _) => Err(
            "has not read the credential states from the database yet: it answers 503 and the API server's failurePolicy applies; fix: make the database reachable from this daemon (see 'database writable')".to_string()
        ),
        (Some(a), true) => Err(format!(
            "last read the credential states from the database {}s ago, more than authz.max_staleness ({bound}): a revocation since then may be unknown here, so it answers 503 and the API server's failurePolicy applies; fix: make the database reachable from this daemon (see 'database writable'), answers resume at its next read",
            a.as_secs()
        )),
    };
    Some(("authorization webhook states fresh".to_string(), r))
}

/// Reads the gauges that describe the database and Vault.
pub async fn gauges(app: &App) -> Result<Gauges, StoreError> {
    let credentials = crate::store::credentials::count_by_state(&app.store).await?;
    let expiry: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.user_name, MIN(c.not_after) FROM credentials c JOIN users u ON u.name = c.user_name
         WHERE c.state = 'current' AND u.state = 'active' GROUP BY c.user_name",
    )
    .fetch_all(app.store.pool())
    .await?;
    let tokens = crate::store::bootstrap_tokens::count_by_state(&app.store).await?;
    let vault = app.vault.as_ref().map(|v| {
        (
            crate::vault::State::ALL
                .iter()
                .map(|s| s.as_str())
                .collect(),
            v.status().state.as_str(),
        )
    });
    let audit_checkpoint = crate::store::audit::catch_up(&app.store)
        .await
        .map(|h| (h.failures, h.behind.is_some()));
    Ok(Gauges {
        credentials,
        expiry,
        tokens,
        vault,
        audit_checkpoint,
        ..Gauges::default()
    })
}

/// What `/readyz` reports without failing: the daemon works, but something
/// needs an operator. An audit checkpoint behind a commit of this process is
/// one (retried here first): every change is still committed with its audit
/// event, only the check of the log's end lags, so taking the daemon out of
/// service (on a shared checkpoint volume, every replica at once) would not
/// help; alert on `rotator_audit_checkpoint_behind` instead.
pub async fn warnings(app: &App) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(h) = crate::store::audit::catch_up(&app.store).await
        && let Some(b) = h.behind
    {
        out.push((
            "audit checkpoint".to_string(),
            format!(
                "behind event {} since {}s ago ({} failed writes): {}; the changes are committed and audited, and the checkpoint catches up at the next commit or scrape once that is fixed (until then `rotator audit verify` reports checkpoint_old)",
                b.seq,
                (app.clock.now() - b.since).max(0),
                h.failures,
                b.error.replace('\n', "; ")
            ),
        ));
    }
    out
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
    checks.extend(authz_fresh(app));
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
    // A daemon that became the leader after its start (a failover) runs each
    // job at its next tick: it is late only once two ticks have passed since.
    let since = app.metrics.leader_since();
    for job in crate::daemon::scheduler::Job::ALL {
        let last = app.metrics.last_success(job.name());
        // A job is late when it has not succeeded since two of its ticks ago.
        let sched = &job.schedule(app).schedule;
        let ok = match (sched.upcoming(chrono::Utc).next(), last) {
            _ if last == 0.0 && since == 0.0 => Err("has not succeeded yet".to_string()),
            (Some(next), l) => {
                let period = sched
                    .after(&next)
                    .next()
                    .map(|n| (n - next).num_seconds())
                    .unwrap_or(60);
                let from = l.max(since);
                if (now as f64) - from > (2 * period + 60) as f64 {
                    Err(if l == 0.0 {
                        format!(
                            "has not succeeded since this daemon became the leader {}s ago",
                            now - since as i64
                        )
                    } else {
                        format!("last success {}s ago", now - l as i64)
                    })
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
            let mut body: String = checks
                .iter()
                .map(|(n, r)| match r {
                    Ok(()) => format!("ok   {n}\n"),
                    Err(e) => format!("FAIL {n}: {e}\n"),
                })
                .collect();
            for (n, w) in warnings(&app).await {
                body.push_str(&format!("WARN {n}: {w}\n"));
            }
            text(if ready { 200 } else { 503 }, body)
        }
        "/metrics" => match metrics_text(&app).await {
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
