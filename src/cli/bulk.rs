//! `rotator add-user --from FILE`: many users in one process, at the signer's
//! pace. The file is read and checked whole (crate::flows::onboard) before anything is
//! issued; then at most `--concurrency` users are onboarded at once.
//!
//! A rerun of the same file after an interruption finishes what is missing:
//! a user that exists with the same specification and a current credential
//! (or an enrollment) is `unchanged`; one whose add-user died half-way is
//! finished by the issuer (the same spec resumes it); one that exists with a
//! different specification is a per-row conflict (exit 6); a revoked user is
//! `revoked` and left alone (a rerun never reinstates anyone).
//!
//! Exit code: 0 when every row is issued, enrolled or unchanged; otherwise the
//! most severe failed row's code (crate::flows::onboard::severity: internal 1, database
//! 7, signer 8, unreachable 12, verification 9, output 10, conflict 6,
//! refused 4).
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::anyhow;
use serde::Serialize;
use serde_json::json;

use super::admin::{AddUserArgs, record_delivery, secret_target_usable};
use super::output::{self, OutputFormat, time};
use super::{CliResult, Failure};
use crate::app::App;
use crate::delivery::{FileSink, SecretSink, Sink};
use crate::flows::issue::IssueError;
use crate::flows::onboard::{self, Delivery, Row};
use crate::store::{credentials, enrollments, users};
use crate::support::exit::Exit;

/// What the checks before issuance decided for a row.
enum Plan {
    Issue,
    Unchanged,
    /// The user was revoked: a rerun never reinstates (`rotate --reinstate` does).
    Revoked(String),
    Conflict(Failure),
}

#[derive(Debug, Clone, Serialize)]
struct Outcome {
    line: u64,
    user: String,
    /// issued, enrolled, unchanged, revoked, would-issue, would-enroll, failed.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<String>,
    /// Where the kubeconfig (or the enrollment token) went.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Why a row was left alone (a revoked user).
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    exit_code: u8,
    #[serde(skip)]
    exit: Exit,
}

impl Outcome {
    fn new(row: &Row, status: &'static str) -> Self {
        Outcome {
            line: row.line,
            user: row.spec.name.clone(),
            status,
            serial: None,
            not_after: None,
            delivered_to: None,
            error: None,
            note: None,
            exit_code: 0,
            exit: Exit::Ok,
        }
    }
    fn failed(row: &Row, f: &Failure) -> Self {
        Outcome {
            error: Some(format!("{}", f.error)),
            exit_code: f.exit as u8,
            exit: f.exit,
            ..Outcome::new(row, "failed")
        }
    }
    fn line(&self) -> String {
        match &self.error {
            Some(e) => format!(
                "line {} {}: failed: {}",
                self.line,
                self.user,
                e.lines().next().unwrap_or_default()
            ),
            None => format!(
                "line {} {}: {}{}{}",
                self.line,
                self.user,
                self.status,
                self.delivered_to
                    .as_ref()
                    .map(|d| format!(" -> {d}"))
                    .unwrap_or_default(),
                self.note
                    .as_ref()
                    .map(|n| format!(": {n}"))
                    .unwrap_or_default()
            ),
        }
    }
}

fn read_input(from: &Path) -> CliResult<(String, Vec<u8>)> {
    let read_err = |name: String, e: std::io::Error| {
        Failure::from(onboard::BulkError::Read {
            source_name: name,
            reason: e.to_string(),
        })
    };
    if from.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| read_err("stdin".into(), e))?;
        return Ok(("stdin".into(), buf));
    }
    let name = from.display().to_string();
    match crate::support::fsutil::read_regular(from) {
        Ok(Some(b)) => Ok((name, b)),
        Ok(None) => Err(read_err(
            name,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        )),
        Err(e) => Err(read_err(name, e)),
    }
}

/// The checks that need the database and the cluster: an existing user, a
/// delivery Secret rotator may write.
async fn plan(app: &App, row: &Row) -> CliResult<Plan> {
    let found = users::find(&app.store, &row.spec.name).await?;
    if let Some(r) = found.as_ref().and_then(|u| u.revoked.as_ref()) {
        return Ok(Plan::Revoked(format!(
            "revoked at {} by {}; not reissued (fix: `rotator rotate {} --reinstate`, if intended)",
            time(r.at),
            r.by,
            row.spec.name
        )));
    }
    if let Some(u) = found.filter(|u| u.state == "active") {
        if u.spec != row.spec {
            let e = IssueError::SpecMismatch {
                user: row.spec.name.clone(),
                differs: crate::flows::issue::describe_diff(&u.spec, &row.spec),
            };
            return Ok(Plan::Conflict(e.into()));
        }
        let mut conn = app.store.conn().await?;
        let has_current = credentials::current(&mut conn, &row.spec.name)
            .await?
            .is_some();
        let delivery = users::delivery(&mut conn, &row.spec.name).await?;
        drop(conn);
        let enrolled = row.delivery == Delivery::Enroll && delivery == "client";
        if has_current || (enrolled && !token_lost(app, &row.spec.name).await?) {
            return Ok(Plan::Unchanged);
        }
        // A token a killed run never delivered: enrolled again below (the new
        // token revokes the lost one, audited with it).
        // Same spec, no current credential: an interrupted add-user; finished below.
    }
    if let Delivery::Secret { namespace, name } = &row.delivery {
        let Some(cluster) = app.cluster.as_ref() else {
            return Err(Failure::new(
                Exit::Refused,
                anyhow!(
                    "cannot deliver to a Secret in namespace {namespace:?}\nfix: Secret delivery needs the kubernetes signer"
                ),
            ));
        };
        if let Err(f) = secret_target_usable(app, cluster, namespace, name, &row.spec.name).await {
            if f.exit == Exit::Conflict {
                return Ok(Plan::Conflict(f));
            }
            return Err(f);
        }
    }
    Ok(Plan::Issue)
}

/// Whether the user's only usable enrollment tokens were never delivered (a run
/// killed between the token's commit and its file): nobody holds them.
async fn token_lost(app: &App, user: &str) -> CliResult<bool> {
    let now = app.clock.now();
    let mut conn = app.store.conn().await?;
    let live: Vec<_> = enrollments::for_user(&mut conn, user)
        .await?
        .into_iter()
        .filter(|t| matches!(t.state.as_str(), "active" | "claimed") && t.expires_at > now)
        .collect();
    Ok(!live.is_empty() && live.iter().all(|t| t.delivered_at.is_none()))
}

/// Rows delivering to Vault need a Vault connection, reachable and logged in,
/// as `add-user --deliver vault:` does: checked once for the file, before
/// anything is issued.
async fn vault_usable(app: &App, source: &str, rows: &[Row]) -> CliResult {
    let lines: Vec<String> = rows
        .iter()
        .filter(|r| matches!(r.delivery, Delivery::Vault { .. }))
        .map(|r| r.line.to_string())
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    let Some(vault) = app.vault.as_ref() else {
        return Err(Failure::new(
            Exit::Config,
            anyhow!(
                "{source}: line(s) {} deliver to Vault, but vault.address is not set; nothing was issued\nfix: configure [vault] (address and auth method; README, \"Vault\")",
                lines.join(", ")
            ),
        ));
    };
    vault.probe().await?;
    Ok(())
}

async fn onboard(app: &App, row: &Row, out_dir: &Path) -> Outcome {
    match onboard_inner(app, row, out_dir).await {
        Ok(o) => o,
        Err(f) => Outcome::failed(row, &f),
    }
}

async fn onboard_inner(app: &App, row: &Row, out_dir: &Path) -> CliResult<Outcome> {
    if row.delivery == Delivery::Enroll {
        let created = crate::flows::enroll::add_user(app, &row.spec).await?;
        let path = out_dir.join(format!("{}.token", row.spec.name));
        let p = path.clone();
        let token = zeroize::Zeroizing::new(format!("{}\n", created.token.as_str()));
        tokio::task::spawn_blocking(move || {
            crate::support::fsutil::write_private_atomic(&p, token.as_bytes())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|e| {
            Failure::new(
                Exit::Output,
                anyhow!(
                    "{}: the enrollment token could not be written to {}: {e}\nfix: run the same command again for a new token (the unused one is revoked)",
                    row.spec.name,
                    path.display()
                ),
            )
        })?;
        let to = path.display().to_string();
        crate::flows::enroll::delivered(app, &created.id, &row.spec.name, &to).await?;
        return Ok(Outcome {
            not_after: Some(time(created.expires_at)),
            delivered_to: Some(path.display().to_string()),
            ..Outcome::new(row, "enrolled")
        });
    }
    let mut sink: Box<dyn Sink> = match (&row.delivery, app.cluster.as_ref()) {
        (Delivery::Secret { namespace, name }, Some(cluster)) => Box::new(SecretSink {
            cluster: cluster.clone(),
            store: app.store.clone(),
            namespace: namespace.clone(),
            name: name.clone(),
            user: row.spec.name.clone(),
        }),
        (Delivery::Vault { mount, path }, _) => match app.vault.clone() {
            Some(vault) => Box::new(crate::vault::kv::VaultSink::new(
                vault,
                mount,
                path,
                &row.spec.name,
            )),
            // vault_usable refused such a file before anything was issued.
            None => {
                return Err(Failure::new(
                    Exit::Config,
                    anyhow!(
                        "{}: --deliver vault:{mount}/{path} needs [vault]\nfix: configure [vault] (README, \"Vault\")",
                        row.spec.name
                    ),
                ));
            }
        },
        _ => Box::new(FileSink {
            path: out_dir.join(format!("{}.kubeconfig", row.spec.name)),
        }),
    };
    let issued = app
        .issuer()
        .add_user(row.spec.clone(), sink.as_mut(), &app.actor)
        .await?;
    if let Some(t) = row.delivery.target() {
        record_delivery(app, &row.spec.name, &t).await?;
    }
    Ok(Outcome {
        serial: Some(issued.credential.serial.clone()),
        not_after: Some(time(issued.credential.not_after)),
        delivered_to: Some(issued.delivered_to.clone()),
        ..Outcome::new(row, "issued")
    })
}

pub async fn run(app: App, a: &AddUserArgs, out: OutputFormat) -> CliResult {
    let from = a.from.clone().expect("--from");
    let (source, bytes) = read_input(&from)?;
    let rows = onboard::parse(&source, bytes.as_slice(), &app.settings.policy, a.key_type)?;
    // Everything that can be checked is checked before anything is issued.
    vault_usable(&app, &source, &rows).await?;
    let mut refused = Vec::new();
    let mut plans = Vec::with_capacity(rows.len());
    for row in &rows {
        match plan(&app, row).await {
            Ok(p) => plans.push(p),
            Err(f) => {
                refused.push(format!(
                    "  line {}, delivery: {}",
                    row.line,
                    f.error.to_string().replace('\n', "\n    ")
                ));
                plans.push(Plan::Issue);
            }
        }
    }
    if !refused.is_empty() {
        return Err(Failure::new(
            Exit::Refused,
            anyhow!(
                "{source}: {} row(s) cannot be onboarded, nothing was issued:\n{}",
                refused.len(),
                refused.join("\n")
            ),
        ));
    }
    let out_dir = a.out_dir.clone().unwrap_or_else(|| PathBuf::from("."));
    let mut outcomes: Vec<Outcome> = Vec::with_capacity(rows.len());
    let mut todo = Vec::new();
    for (row, plan) in rows.into_iter().zip(plans) {
        match plan {
            Plan::Unchanged => outcomes.push(Outcome::new(&row, "unchanged")),
            Plan::Revoked(note) => outcomes.push(Outcome {
                note: Some(note),
                ..Outcome::new(&row, "revoked")
            }),
            Plan::Conflict(f) => outcomes.push(Outcome::failed(&row, &f)),
            Plan::Issue if a.dry_run => outcomes.push(Outcome::new(
                &row,
                if row.delivery == Delivery::Enroll {
                    "would-enroll"
                } else {
                    "would-issue"
                },
            )),
            Plan::Issue => todo.push(row),
        }
    }
    if !a.dry_run {
        // One line per user: those decided already (unchanged, conflicts) first.
        for o in &outcomes {
            eprintln!("{}", o.line());
        }
    }
    if !todo.is_empty() {
        if let Some(d) = &a.out_dir {
            crate::support::fsutil::ensure_private_dir(d).map_err(|e| {
                Failure::new(
                    Exit::Output,
                    anyhow!(
                        "cannot create the output directory {}: {e}\nfix: give --out-dir a directory you may write",
                        d.display()
                    ),
                )
            })?;
        }
        outcomes.extend(issue_all(app, todo, &out_dir, a.concurrency.into()).await);
    }
    outcomes.sort_by_key(|o| o.line);
    report(out, &source, &outcomes, a.dry_run);
    let worst = outcomes
        .iter()
        .map(|o| o.exit)
        .max_by_key(|e| onboard::severity(*e))
        .unwrap_or(Exit::Ok);
    if worst == Exit::Ok {
        Ok(())
    } else {
        let failed = outcomes.iter().filter(|o| o.exit != Exit::Ok).count();
        Err(Failure::new(
            worst,
            anyhow!(
                "{failed} of {} row(s) failed (see the summary); the others are done\nfix: correct what the failed rows say and run the same command again: done rows stay unchanged",
                outcomes.len()
            ),
        ))
    }
}

async fn issue_all(app: App, todo: Vec<Row>, out_dir: &Path, concurrency: usize) -> Vec<Outcome> {
    let app = Arc::new(app);
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(todo.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} users  {per_sec}  eta {eta}  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut set = tokio::task::JoinSet::new();
    let mut lines = std::collections::HashMap::new();
    for row in todo {
        let app = app.clone();
        let permits = permits.clone();
        let out_dir = out_dir.to_path_buf();
        let r = row.clone();
        let id = set
            .spawn(async move {
                let _permit = permits.acquire_owned().await;
                onboard(&app, &row, &out_dir).await
            })
            .id();
        lines.insert(id, r);
    }
    let mut outcomes = Vec::new();
    while let Some(done) = set.join_next_with_id().await {
        let o = match done {
            Ok((_, o)) => o,
            Err(e) => {
                let row = &lines[&e.id()];
                Outcome::failed(
                    row,
                    &Failure::new(Exit::Internal, anyhow!("the onboarding task failed: {e}")),
                )
            }
        };
        match &bar {
            Some(b) => {
                if o.error.is_some() {
                    b.println(o.line());
                }
                b.set_message(o.user.clone());
                b.inc(1);
            }
            None => eprintln!("{}", o.line()),
        }
        outcomes.push(o);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    outcomes
}

fn report(out: OutputFormat, source: &str, outcomes: &[Outcome], dry_run: bool) {
    let count = |s: &str| outcomes.iter().filter(|o| o.status == s).count();
    match out {
        OutputFormat::Json => output::json(&json!({
            "source": source,
            "dry_run": dry_run,
            "summary": {
                "rows": outcomes.len(),
                "issued": count("issued"),
                "enrolled": count("enrolled"),
                "unchanged": count("unchanged"),
                "revoked": count("revoked"),
                "would_issue": count("would-issue") + count("would-enroll"),
                "failed": count("failed"),
            },
            "users": outcomes,
        })),
        OutputFormat::Table => {
            let rows: Vec<Vec<String>> = outcomes
                .iter()
                .map(|o| {
                    vec![
                        o.line.to_string(),
                        o.user.clone(),
                        o.status.to_string(),
                        o.serial.clone().unwrap_or_else(|| "-".into()),
                        o.delivered_to.clone().unwrap_or_else(|| "-".into()),
                        o.error
                            .as_deref()
                            .or(o.note.as_deref())
                            .and_then(|e| e.lines().next())
                            .unwrap_or("")
                            .to_string(),
                    ]
                })
                .collect();
            output::table(
                &["LINE", "USER", "STATUS", "SERIAL", "DELIVERED TO", "ERROR"],
                &rows,
            );
            println!(
                "\n{} row(s): {} issued, {} enrolled, {} unchanged, {} revoked, {} failed{}",
                outcomes.len(),
                count("issued"),
                count("enrolled"),
                count("unchanged"),
                count("revoked"),
                count("failed"),
                if dry_run {
                    format!(
                        ", {} to issue (dry run: nothing was issued)",
                        count("would-issue") + count("would-enroll")
                    )
                } else {
                    String::new()
                }
            );
        }
    }
}
