//! `rotator serve`: the daemon. Stops on SIGTERM or Ctrl-C after the job in flight.
use anyhow::anyhow;
use std::sync::Arc;

use std::sync::atomic::Ordering;

use tokio::signal::unix::SignalKind;

use tracing::{error, info, warn};

use super::{CliResult, Failure};
use crate::app::App;
use crate::support::exit::Exit;

/// Runs the daemon. `reopen` builds the App again from the configuration (SIGHUP).
pub async fn serve<F, Fut>(app: App, reopen: F) -> CliResult
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = CliResult<App>>,
{
    // One daemon per database: the lock lives as long as the process.
    let data_dir = app.settings.data_dir.clone();
    let lock_path = data_dir.join("daemon.lock");
    // A FIFO there would block the open for ever: refused first, and opened non-blocking.
    let lock = crate::support::fsutil::check_replaceable(&lock_path)
        .and_then(|()| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(&lock_path)
        })
        .map_err(|e| {
            Failure::new(
                Exit::Config,
                anyhow!("cannot open {}: {e}", lock_path.display()),
            )
        })?;
    if let Err(e) = lock.try_lock() {
        return Err(Failure::new(
            Exit::Conflict,
            anyhow!(
                "another rotator daemon is already running on {} ({e})\nfix: stop it first; two daemons must never share one database",
                data_dir.display()
            ),
        ));
    }
    // Signal handlers first: a SIGTERM or SIGHUP during the start-up catch-up must
    // be handled, not take the default action (ending the process on the spot).
    let mut term = unix_signal(SignalKind::terminate())?;
    let mut hup = unix_signal(SignalKind::hangup())?;
    if app.settings.leader_election.is_some() && !app.store.shared() {
        // A standby with its own file would take over knowing none of the users.
        return Err(Failure::new(
            Exit::Config,
            anyhow!(
                "leader election needs a database every daemon shares, but this daemon's is the SQLite file {}\nfix: point every daemon at one PostgreSQL database (database_url; `rotator database copy --to URL` moves the data there), or set leader_election.enabled = false and run one daemon",
                app.settings.database
            ),
        ));
    }
    log_started(&app, "rotator daemon started");
    let app = Arc::new(app);
    let election = match (&app.settings.leader_election, &app.cluster) {
        (Some(le), Some(cluster)) => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            let identity = format!("{}-{}", host.trim(), std::process::id());
            let (le, cluster, app2) = (le.clone(), cluster.clone(), app.clone());
            app.leader.store(false, Ordering::SeqCst);
            // The first round before the scheduler starts, so a leader does not skip the catch-up.
            elect(&cluster, &le, &identity, &app2).await;
            Some(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(le.lease_duration / 3).await;
                    elect(&cluster, &le, &identity, &app2).await;
                }
            }))
        }
        (Some(_), None) => {
            return Err(Failure::new(
                Exit::Config,
                anyhow!(
                    "leader election needs the kubernetes signer (a Lease in the cluster)\nfix: set leader_election.enabled = false, or use signer = \"kubernetes\""
                ),
            ));
        }
        _ => None,
    };
    let addr = app.settings.metrics_addr;
    let listener = crate::daemon::health::bind(addr).await.map_err(|e| {
        Failure::new(Exit::Config, anyhow!("cannot listen on {addr} for health and metrics: {e}\nfix: pick a free address with --metrics-addr or metrics_addr"))
    })?;
    info!(%addr, "health and metrics at /healthz, /readyz, /metrics");
    let (apps_tx, apps_rx) = tokio::sync::watch::channel(app.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx2 = stop_rx.clone();
    let metrics = tokio::spawn(crate::daemon::health::serve(
        listener,
        apps_rx.clone(),
        async move {
            let mut rx = stop_rx;
            let _ = rx.changed().await;
        },
    ));
    let api = match app.settings.server.listen {
        Some(addr) => {
            let tls = crate::daemon::api::server_config(&app)?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Failure::new(Exit::Config, anyhow!("cannot listen on {addr} for the user API: {e}\nfix: pick a free address with --api-addr or server.listen"))
            })?;
            info!(%addr, "user API (HTTPS) at /v1/subject, /v1/enroll, /v1/renew");
            let mut rx = stop_rx2.clone();
            Some(tokio::spawn(crate::daemon::api::serve(
                listener,
                tls,
                apps_rx.clone(),
                async move {
                    let _ = rx.changed().await;
                },
            )))
        }
        None => {
            info!("user API off (set server.listen or --api-addr to serve it)");
            None
        }
    };
    let vault_renewer = tokio::spawn(renew_vault(apps_rx.clone()));
    let authz = match app.settings.authz.listen {
        Some(addr) => {
            let tls = crate::daemon::authz::server::tls_config(&app)?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Failure::new(Exit::Config, anyhow!("cannot listen on {addr} for the authorization webhook: {e}\nfix: pick a free address with --authz-addr or authz.listen"))
            })?;
            if app.settings.authz.client_ca_file.is_none() {
                warn!(
                    "authz.client_ca_file is not set: any client may ask the authorization webhook (it only ever denies, but set it to the API server's client CA)"
                );
            }
            info!(%addr, "authorization webhook (HTTPS) at POST /v1/authorize");
            let mut rx = stop_rx2.clone();
            Some(tokio::spawn(crate::daemon::authz::server::serve(
                listener,
                tls,
                crate::daemon::authz::Webhook::new(apps_rx.clone()),
                async move {
                    let _ = rx.changed().await;
                },
            )))
        }
        None => None,
    };
    let (changed_tx, mut changed) = tokio::sync::mpsc::channel::<()>(1);
    let watcher = app
        .settings
        .file
        .clone()
        .map(|f| tokio::spawn(watch_file(f, changed_tx)));
    let reload = async {
        loop {
            let trigger = tokio::select! {
                s = hup.recv() => match s { Some(()) => "SIGHUP", None => break },
                c = changed.recv() => match c { Some(()) => "file change", None => { std::future::pending::<()>().await; continue } },
            };
            info!(trigger, "reloading the configuration");
            match reopen().await {
                Ok(mut next) => {
                    if next.settings.data_dir != data_dir {
                        error!(from = %data_dir.display(), to = %next.settings.data_dir.display(), "reload refused: the data directory cannot change while running");
                        continue;
                    }
                    let cur = apps_tx.borrow().clone();
                    // Counters and in-flight issuances belong to the process, not the config.
                    next.metrics = cur.metrics.clone();
                    next.inflight = cur.inflight.clone();
                    next.leader = cur.leader.clone();
                    next.fence = cur.fence.clone();
                    // So is the audit keyring while it reads the same files: its
                    // tickets order this process's checkpoint writes, and a write
                    // that failed stays reported (and retried) until one heals it.
                    if let (Some(old), Some(new)) =
                        (cur.store.audit_keyring(), next.store.audit_keyring())
                        && old.key_path() == new.key_path()
                        && old.checkpoint_path() == new.checkpoint_path()
                    {
                        let old = old.clone();
                        next.store.set_audit(old);
                    }
                    log_started(&next, "configuration reloaded");
                    let _ = apps_tx.send(Arc::new(next));
                }
                Err(f) => {
                    error!(error = %format!("{:#}", f.error), "reload failed; keeping the running configuration")
                }
            }
        }
    };
    tokio::select! {
        _ = crate::daemon::scheduler::run(apps_rx, async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }) => {}
        _ = reload => {}
    }
    let _ = stop_tx.send(true);
    let _ = metrics.await;
    if let Some(api) = api {
        let _ = api.await;
    }
    if let Some(authz) = authz {
        let _ = authz.await;
    }
    if let Some(e) = election {
        e.abort();
    }
    if let Some(w) = watcher {
        w.abort();
    }
    vault_renewer.abort();
    let app = apps_tx.borrow().clone();
    // A job cut off at its grace may still be writing the audit checkpoint
    // for a commit it made: that write needs the pool, so it ends first.
    if let Some(ring) = app.store.audit_keyring()
        && !ring
            .settle(crate::store::audit::Keyring::SETTLE_LIMIT)
            .await
    {
        warn!(
            "an audit checkpoint write was still running at exit; the next change any rotator process commits covers it"
        );
    }
    app.store.close().await;
    info!("rotator daemon stopped");
    Ok(())
}

async fn elect(
    cluster: &crate::cluster::Cluster,
    le: &crate::config::LeaderElection,
    identity: &str,
    app: &App,
) {
    let now = app.clock.now();
    let mut lead = match cluster
        .try_lease(
            &le.namespace,
            &le.name,
            identity,
            le.lease_duration,
            app.clock.now_micros(),
        )
        .await
    {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, "leader election failed; standing by");
            false
        }
    };
    if lead {
        lead = crate::daemon::scheduler::hold_epoch(app, identity).await;
    } else {
        crate::daemon::scheduler::drop_epoch(app);
    }
    if app.leader.swap(lead, Ordering::SeqCst) != lead {
        app.metrics.leading_since(lead.then_some(now));
        if lead {
            info!(identity, lease = %format!("{}/{}", le.namespace, le.name), "became the leader");
        } else {
            warn!(identity, "lost the leadership; standing by");
        }
    }
}

/// Keeps the current App's Vault token alive (a reload brings a new connection:
/// the renewer follows it).
async fn renew_vault(mut apps: tokio::sync::watch::Receiver<Arc<App>>) {
    loop {
        let vault = apps.borrow_and_update().vault.clone();
        let changed = async {
            if apps.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        match vault {
            Some(v) => v.run_renewer(changed).await,
            None => changed.await,
        }
    }
}

fn log_started(app: &App, what: &str) {
    info!(
        data_dir = %app.settings.data_dir.display(),
        signer = app.signer.kind(),
        rotate = %app.settings.schedule.rotate.expression,
        expire = %app.settings.schedule.expire.expression,
        reconcile = %app.settings.schedule.reconcile.expression,
        "{what}"
    );
}

/// How often the config file is checked for changes.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// What identifies a version of a file without reading it.
fn file_version(p: &std::path::Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Signals when the config file changes (written in place or replaced by a
/// rename, as editors and ConfigMap updates do). Polling keeps it portable
/// and needs no extra dependency; a reload every few seconds at most is plenty.
async fn watch_file(path: std::path::PathBuf, changed: tokio::sync::mpsc::Sender<()>) {
    let mut last = file_version(&path);
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now = file_version(&path);
        if now != last && now.is_some() {
            last = now;
            if changed.send(()).await.is_err() {
                return;
            }
        }
    }
}

fn unix_signal(kind: SignalKind) -> CliResult<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind)
        .map_err(|e| Failure::new(Exit::Internal, anyhow!("cannot handle signals: {e}")))
}
