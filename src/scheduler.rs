//! Cron-scheduled jobs for `rotator serve`: rotate, expire, reconcile. Jobs run
//! one at a time in this loop, so a job still running at its next tick is never
//! started twice, and the next tick is computed from "now", so ticks missed
//! while the daemon was down are caught up once, not replayed one by one.
use std::future::Future;
use std::sync::Arc;

use chrono::Utc;
use serde_json::json;
use tracing::{error, info};

use crate::app::App;
use crate::config::CronSchedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Rotate,
    Expire,
    Reconcile,
}

impl Job {
    pub const ALL: [Job; 3] = [Job::Rotate, Job::Expire, Job::Reconcile];

    pub fn name(&self) -> &'static str {
        match self {
            Job::Rotate => "rotate",
            Job::Expire => "expire",
            Job::Reconcile => "reconcile",
        }
    }

    pub fn schedule<'a>(&self, app: &'a App) -> &'a CronSchedule {
        match self {
            Job::Rotate => &app.settings.schedule.rotate,
            Job::Expire => &app.settings.schedule.expire,
            Job::Reconcile => &app.settings.schedule.reconcile,
        }
    }
}

/// How long a job in flight may run on after SIGTERM.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

fn next_after(s: &CronSchedule, now: chrono::DateTime<Utc>) -> Option<chrono::DateTime<Utc>> {
    s.schedule.after(&now).next()
}

/// Runs one job now; the summary says what it did.
pub async fn run_job(app: &Arc<App>, job: Job) -> Result<serde_json::Value, String> {
    match job {
        Job::Rotate => crate::renewal::rotate_pass(app)
            .await
            .map(|r| json!(r))
            .map_err(|e| e.to_string()),
        Job::Expire => {
            let expired = crate::lifecycle::expire_pass(app)
                .await
                .map_err(|e| e.to_string())?;
            let access = crate::lifecycle::remove_stale_access(app)
                .await
                .map_err(|e| e.to_string())?;
            let tokens = crate::tokens::expire_pass(app)
                .await
                .map_err(|e| e.to_string())?;
            let enrollments = crate::enrollment::expire_pass(app)
                .await
                .map_err(|e| e.to_string())?;
            Ok(
                json!({"expired": expired, "access_removed_for_users": access, "tokens_deleted": tokens, "enrollment_tokens_expired": enrollments}),
            )
        }
        Job::Reconcile => crate::renewal::reconcile_pass(app)
            .await
            .map(|r| json!(r))
            .map_err(|e| e.to_string()),
    }
}

pub async fn run_logged(app: &Arc<App>, job: Job) {
    if !app.leader.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::debug!(job = job.name(), "not the leader; skipping");
        return;
    }
    let started = std::time::Instant::now();
    let result = run_job(app, job).await;
    // A pass that had per-item failures (a user it could not renew) is not a success.
    let ok = result
        .as_ref()
        .is_ok_and(|s| s["failed"].as_u64().unwrap_or(0) == 0);
    app.metrics
        .job(job.name(), ok, started.elapsed(), app.clock.now());
    match result {
        Ok(summary) => {
            if let Some(n) = summary["repaired"].as_array().map(|r| r.len()) {
                app.metrics.drift_repairs.inc_by(n as u64);
            }
            info!(job = job.name(), ms = started.elapsed().as_millis() as u64, %summary, "job done")
        }
        Err(e) => error!(job = job.name(), error = %e, "job failed"),
    }
}

/// Runs the schedules until `shutdown` resolves; a job in flight finishes first.
/// A new `App` on `apps` (SIGHUP) takes effect at once: its schedules decide the next tick.
pub async fn run(
    mut apps: tokio::sync::watch::Receiver<Arc<App>>,
    shutdown: impl Future<Output = ()>,
) {
    // Catch up once at start: whatever fell due while the daemon was down.
    let app = apps.borrow_and_update().clone();
    for job in [Job::Expire, Job::Reconcile, Job::Rotate] {
        run_logged(&app, job).await;
    }
    tokio::pin!(shutdown);
    loop {
        let app = apps.borrow_and_update().clone();
        let now = Utc::now();
        let next = Job::ALL
            .iter()
            .filter_map(|j| next_after(j.schedule(&app), now).map(|t| (*j, t)))
            .min_by_key(|(_, t)| *t);
        let Some((job, at)) = next else {
            info!("no job has a future tick; scheduler idle until a reload or shutdown");
            tokio::select! {
                _ = &mut shutdown => return,
                r = apps.changed() => if r.is_err() { return } else { continue },
            }
        };
        let wait = (at - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = &mut shutdown => { info!("scheduler stopping"); return; }
            r = apps.changed() => {
                if r.is_err() { return; }
                info!("schedules reloaded");
                continue;
            }
            _ = tokio::time::sleep(wait) => {}
        }
        // A job in flight gets STOP_GRACE after a stop signal to finish; past that it
        // is dropped, which an issuance survives like any crash (its journal says where it was).
        let mut stopping = false;
        tokio::select! {
            _ = run_logged(&app, job) => {}
            _ = async { (&mut shutdown).await; stopping = true; tokio::time::sleep(STOP_GRACE).await } => {
                tracing::warn!(job = job.name(), grace = ?STOP_GRACE, "job still running after the stop grace period; stopping anyway");
                return;
            }
        }
        if stopping {
            info!("scheduler stopping");
            return;
        }
    }
}
