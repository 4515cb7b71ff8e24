//! `rotator backup FILE` and `rotator database …`: copies of the store.
use std::path::Path;

use anyhow::anyhow;

use super::output::{self, OutputFormat};
use super::{CliResult, Failure};
use crate::app::App;
use crate::support::exit::Exit;

pub async fn backup(app: &App, file: &Path, out: OutputFormat) -> CliResult {
    let shown = app.settings.database.to_string();
    let r = crate::store::backup::backup(&app.store, &shown, file).await?;
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
                app.settings.database
            );
        }
    }
    app.store.close().await;
    Ok(())
}

#[derive(Debug, clap::Subcommand)]
pub enum DatabaseCommand {
    /// Copy everything (users, credentials, tokens, enrollment records, issuance
    /// journal, instance id, audit chain) into an EMPTY database, verify the copy
    /// (row counts, audit chain) and print what to change in the config. Stop the
    /// daemon first; the current database is left as it was.
    Copy {
        /// The target: `postgres://USER@HOST/DB?sslmode=verify-full`,
        /// `postgres:///DB?host=/SOCKET/DIR`, or `sqlite:///PATH` (or a path).
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

pub async fn run(cli: &super::Cli, cmd: &DatabaseCommand, out: OutputFormat) -> CliResult {
    match cmd {
        DatabaseCommand::Copy { to } => copy(cli, to, out).await,
    }
}

/// Held while copying: no daemon may start on the source (or be running) and
/// write what the copy would miss.
fn lock_daemon(data_dir: &Path) -> CliResult<Option<std::fs::File>> {
    let p = data_dir.join("daemon.lock");
    if !p.exists() {
        return Ok(None);
    }
    crate::support::fsutil::check_replaceable(&p)
        .map_err(|e| Failure::new(Exit::Config, anyhow!("cannot open {}: {e}", p.display())))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(|e| Failure::new(Exit::Config, anyhow!("cannot open {}: {e}", p.display())))?;
    if f.try_lock().is_err() {
        return Err(Failure::new(
            Exit::Conflict,
            anyhow!(
                "a rotator daemon is running on {}\nfix: stop it first (what it writes after the copy would not be in the copy), then run the copy again",
                data_dir.display()
            ),
        ));
    }
    Ok(Some(f))
}

async fn copy(cli: &super::Cli, to: &str, out: OutputFormat) -> CliResult {
    let (app, _) = super::open_app(cli, None).await?;
    let _daemon = lock_daemon(&app.settings.data_dir)?;
    // A bare path is a SQLite file, as in database_url.
    let to = if to.contains("://") || to.starts_with("sqlite:") {
        to.to_string()
    } else {
        format!("sqlite://{to}")
    };
    let location = crate::store::Location::parse(&to).map_err(|problem| {
        Failure::new(
            Exit::Usage,
            anyhow!(
                "--to {}: {problem}\nfix: give sqlite:///PATH or postgres://USER@HOST/DB",
                crate::store::engine::redact(&to)
            ),
        )
    })?;
    let shown = location.to_string();
    let source = app.settings.database.clone();
    let same = match (location.file(), source.file()) {
        (Some(a), Some(b)) => match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        },
        _ => location == source,
    };
    if same {
        return Err(crate::store::copy::CopyError::SameDatabase { target: shown }.into());
    }
    let target = crate::store::Store::open(&location).await?;
    // SQLite makes its files 0644 less the umask; this one holds every user's record.
    if let Some(path) = location.file() {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.to_path_buf().into_os_string();
            p.push(suffix);
            crate::support::fsutil::restrict_to_owner(
                Path::new(&p),
                crate::support::fsutil::PRIVATE_MODE,
            )
            .map_err(|e| {
                Failure::new(
                    Exit::Output,
                    anyhow!("cannot make {} private: {e}", path.display()),
                )
            })?;
        }
    }
    let r = crate::store::copy::copy(&app.store, &target, &shown).await;
    target.close().await;
    app.store.close().await;
    let r = r?;
    match out {
        OutputFormat::Json => output::json(&r),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = r
                .tables
                .iter()
                .map(|(t, n)| vec![t.clone(), n.to_string()])
                .collect();
            output::table(&["TABLE", "ROWS"], &rows);
            let done = if r.already {
                format!(
                    "{} already held this database (an earlier copy was stopped after its commit; nothing was written now)",
                    r.target
                )
            } else {
                format!("copied into {}", r.target)
            };
            println!(
                "{done}: row counts match and the audit chain verifies there ({} events, head {})",
                r.audit_events, r.audit_head
            );
            println!(
                "next: set database_url = {:?} in the config (or ROTATOR_DATABASE_URL) of every rotator process, keep audit.key_file, audit.checkpoint_file and sealing.key_file as they are, and start the daemon; {} is left as it was (keep it as a backup)",
                r.target, source
            );
            if source.engine() == crate::store::Engine::Postgres {
                // Other machines' daemons are not stopped by the lock above.
                println!(
                    "{source} was read in one consistent snapshot (REPEATABLE READ): whatever another rotator process wrote after it is not in the copy; stop every daemon on {source} before switching"
                );
            }
        }
    }
    Ok(())
}
