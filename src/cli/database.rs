//! `rotator backup FILE` and `rotator database …`: copies of the store.
use std::path::Path;

use super::CliResult;
use super::output::{self, OutputFormat};
use crate::app::App;

pub async fn backup(app: &App, file: &Path, out: OutputFormat) -> CliResult {
    let r = crate::store::backup::backup(&app.store, file).await?;
    match out {
        OutputFormat::Json => output::json(&r),
        OutputFormat::Table => {
            println!(
                "backup written to {} (mode 0600, {} bytes): {} users, {} credentials, {} audit events (head {}); integrity and audit chain verified",
                r.path.display(),
                r.bytes,
                r.users,
                r.credentials,
                r.audit_events,
                r.audit_head
            );
            println!(
                "to restore: stop rotator, copy it over {} (remove its -wal and -shm files), then `rotator audit verify`; events after the backup are gone, so verify names the truncation, and `rotator audit reset-checkpoint` records the restore and vouches for the log as restored",
                app.settings.database_path().display()
            );
        }
    }
    app.store.close().await;
    Ok(())
}
