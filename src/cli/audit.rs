use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::anyhow;
use clap::Subcommand;
use futures_util::TryStreamExt;

use super::output::{self, OutputFormat, time};
use super::{CliResult, Failure};
use crate::app::App;
use crate::store::audit;
use crate::support::exit::Exit;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print audit events, oldest first.
    Log {
        /// Only events about this user.
        #[arg(long)]
        user: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Recompute the hash chain; exit 11 and name the first broken event if it does not hold.
    Verify,
    /// Stream the log as JSON lines (one event per line), to ship it off the machine.
    Export {
        /// First event to export.
        #[arg(long, default_value_t = 1)]
        from: i64,
        /// Where to write: a file (0600, written atomically) or `-` for stdout.
        #[arg(long, default_value = "-")]
        out: String,
    },
    /// After looking into a break `audit verify` found at the checkpoint (missing,
    /// old, invalid, or the log restored from a backup): vouch for the log as it is
    /// now. Refused while any event itself is broken; the reset is audited.
    ResetCheckpoint,
}

pub async fn run(app: &App, cmd: &AuditCommand, out: OutputFormat) -> CliResult {
    match cmd {
        AuditCommand::Log { user, limit } => {
            let events = audit::list(&app.store, user.as_deref(), *limit).await?;
            match out {
                OutputFormat::Json => output::json(&events),
                OutputFormat::Table => {
                    let rows: Vec<Vec<String>> = events
                        .iter()
                        .map(|e| {
                            vec![
                                e.seq.to_string(),
                                time(e.time),
                                e.actor.clone(),
                                e.action.clone(),
                                e.subject.clone(),
                                e.detail.clone(),
                            ]
                        })
                        .collect();
                    output::table(
                        &["SEQ", "TIME", "ACTOR", "ACTION", "SUBJECT", "DETAIL"],
                        &rows,
                    );
                }
            }
            Ok(())
        }
        AuditCommand::Verify => {
            let r = audit::verify(&app.store).await?;
            if out == OutputFormat::Json {
                output::json(&r);
            }
            match &r.first_break {
                None => {
                    if out == OutputFormat::Table {
                        println!("audit chain intact: {} events, head {}", r.events, r.head);
                    }
                    Ok(())
                }
                Some(b) => Err(Failure::new(
                    Exit::AuditBroken,
                    anyhow!(
                        "audit chain broken at event {} ({}): {}\nfix: events from {} on cannot be trusted; compare with a backup or an exported copy of the log (`rotator audit export`){}",
                        b.seq,
                        b.kind.name(),
                        b.reason,
                        b.seq,
                        match b.kind {
                            audit::BreakKind::CheckpointOld =>
                                "; `rotator doctor` checks that the checkpoint can be written (a failed write leaves it behind: the process that committed logged `audit checkpoint not updated`), and once it can, the next change any rotator process commits covers these events; if no write failed and no process died, an older checkpoint was put back: compare with an exported copy (`rotator audit export`), and once explained `rotator audit reset-checkpoint` vouches for the log as it is",
                            audit::BreakKind::CheckpointMissing
                            | audit::BreakKind::CheckpointInvalid
                            | audit::BreakKind::Truncated
                            | audit::BreakKind::Replaced
                            | audit::BreakKind::Emptied =>
                                "; once explained (for example a restored backup), `rotator audit reset-checkpoint` vouches for the log as it is",
                            _ => "",
                        }
                    ),
                )),
            }
        }
        AuditCommand::Export { from, out: dest } => export(app, *from, dest).await,
        AuditCommand::ResetCheckpoint => {
            let (before, head) = audit::reset_checkpoint(&app.store, app.clock.now(), &app.actor)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::Invalid(m) => Failure::new(
                        Exit::AuditBroken,
                        anyhow!("{m}\nfix: the checkpoint is not reset over a broken event; restore the database from a backup"),
                    ),
                    other => other.into(),
                })?;
            let was = match before {
                audit::CheckpointState::Missing => "missing".to_string(),
                audit::CheckpointState::Invalid(why) => format!("invalid ({why})"),
                audit::CheckpointState::Valid(c) => format!("at event {}", c.seq),
            };
            println!(
                "audit checkpoint reset to event {} (it was {was}); the reset is event {}",
                head.seq, head.seq
            );
            Ok(())
        }
    }
}

/// One event per line, streamed from the database (never the whole table in memory).
async fn export(app: &App, from: i64, dest: &str) -> CliResult {
    let out_err = |path: &Path, e: &dyn std::fmt::Display| {
        Failure::new(
            Exit::Output,
            anyhow!(
                "cannot write the audit export to {}: {e}\nfix: give --out a writable file path, or - for stdout",
                path.display()
            ),
        )
    };
    if dest == "-" {
        let mut w = std::io::BufWriter::new(super::pipe::Stdout(std::io::stdout().lock()));
        let n = write_lines(app, from, &mut w).await?;
        w.flush().map_err(write_fail)?;
        tracing::debug!(events = n, "audit export written to stdout");
        return Ok(());
    }
    let path = PathBuf::from(dest);
    // Replaced by rename: a symlink is replaced safely, anything else that is not a
    // regular file (a device, a FIFO, a directory) is refused before writing.
    if let Ok(m) = std::fs::symlink_metadata(&path)
        && !m.file_type().is_file()
        && !m.file_type().is_symlink()
    {
        return Err(out_err(&path, &"it exists and is not a regular file"));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".rotator-")
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .tempfile_in(&dir)
        .map_err(|e| out_err(&path, &e))?;
    let mut w = std::io::BufWriter::new(tmp);
    let n = write_lines(app, from, &mut w).await?;
    let tmp = w.into_inner().map_err(|e| out_err(&path, &e.error()))?;
    tmp.as_file().sync_all().map_err(|e| out_err(&path, &e))?;
    tmp.persist(&path).map_err(|e| out_err(&path, &e.error))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    eprintln!("exported {n} audit events to {}", path.display());
    Ok(())
}

fn write_fail(e: impl std::fmt::Display) -> Failure {
    Failure::new(
        Exit::Output,
        anyhow!(
            "writing the audit export failed: {e}\nfix: check the destination (disk space, a closed pipe)"
        ),
    )
}

async fn write_lines(app: &App, from: i64, w: &mut impl Write) -> Result<u64, Failure> {
    let mut rows = audit::stream(&app.store, from);
    let mut n = 0u64;
    while let Some(e) = rows.try_next().await? {
        serde_json::to_writer(&mut *w, &e).map_err(write_fail)?;
        w.write_all(b"\n").map_err(write_fail)?;
        n += 1;
    }
    Ok(n)
}
