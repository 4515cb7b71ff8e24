//! `rotator serve`: the daemon. Stops on SIGTERM or Ctrl-C after the job in flight.
use tracing::info;

use super::CliResult;
use crate::app::App;

pub async fn serve(app: App) -> CliResult {
    info!(
        data_dir = %app.settings.data_dir.display(),
        signer = app.signer.kind(),
        expire = %app.settings.schedule.expire.expression,
        "rotator daemon started"
    );
    crate::scheduler::run(&app, shutdown_signal()).await;
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
