//! `rotator serve`: the daemon. Stops on SIGTERM or Ctrl-C after the job in flight.
use anyhow::anyhow;
use tracing::info;

use super::{CliResult, Failure};
use crate::app::App;
use crate::exit::Exit;

pub async fn serve(app: App) -> CliResult {
    // One daemon per database: the lock lives as long as the process.
    let lock_path = app.settings.data_dir.join("daemon.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
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
                app.settings.data_dir.display()
            ),
        ));
    }
    info!(
        data_dir = %app.settings.data_dir.display(),
        signer = app.signer.kind(),
        rotate = %app.settings.schedule.rotate.expression,
        expire = %app.settings.schedule.expire.expression,
        reconcile = %app.settings.schedule.reconcile.expression,
        "rotator daemon started"
    );
    let app = std::sync::Arc::new(app);
    let addr = app.settings.metrics_addr;
    let listener = crate::metrics::bind(addr).await.map_err(|e| {
        Failure::new(Exit::Config, anyhow!("cannot listen on {addr} for health and metrics: {e}\nfix: pick a free address with --metrics-addr or metrics_addr"))
    })?;
    info!(%addr, "health and metrics at /healthz, /readyz, /metrics");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics = tokio::spawn(crate::metrics::serve(listener, app.clone(), async move {
        let mut rx = stop_rx;
        let _ = rx.changed().await;
    }));
    crate::scheduler::run(app.clone(), shutdown_signal()).await;
    let _ = stop_tx.send(true);
    let _ = metrics.await;
    app.store.close().await;
    info!("rotator daemon stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
