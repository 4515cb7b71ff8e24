use anyhow::anyhow;
use clap::Subcommand;

use super::output::{self, OutputFormat, time};
use super::{CliResult, Failure};
use crate::app::App;
use crate::exit::Exit;
use crate::store::audit;

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
                        "audit chain broken at event {}: {}\nfix: events from {} on cannot be trusted; compare with a backup or an exported copy of the log",
                        b.seq,
                        b.reason,
                        b.seq
                    ),
                )),
            }
        }
    }
}
