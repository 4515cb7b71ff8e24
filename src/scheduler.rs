//! Cron-scheduled jobs for `rotator serve`. Jobs run one at a time in this loop,
//! so a job still running at its next tick is never started twice, and the next
//! tick is computed from "now", so ticks missed while down are caught up once.
use std::future::Future;

use chrono::Utc;
use tracing::{error, info};

use crate::app::App;
use crate::config::CronSchedule;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Expire,
}

impl Job {
    pub fn name(&self) -> &'static str {
        match self {
            Job::Expire => "expire",
        }
    }
}

fn next_after(s: &CronSchedule, now: chrono::DateTime<Utc>) -> Option<chrono::DateTime<Utc>> {
    s.schedule.after(&now).next()
}

/// Runs one job now.
pub async fn run_job(app: &App, job: Job) -> Result<usize, crate::lifecycle::LifecycleError> {
    match job {
        Job::Expire => {
            let n = crate::lifecycle::expire_pass(app).await?;
            let m = crate::lifecycle::remove_stale_access(app).await?;
            let t = crate::tokens::expire_pass(app)
                .await
                .map_err(|e| crate::lifecycle::LifecycleError::Tokens(e.to_string()))?;
            Ok(n + m + t)
        }
    }
}

/// Runs the schedules until `shutdown` resolves; a job in flight finishes first.
pub async fn run(app: &App, shutdown: impl Future<Output = ()>) {
    let jobs = [(Job::Expire, &app.settings.schedule.expire)];
    // Catch up once at start: whatever was due while the daemon was down.
    for (job, _) in &jobs {
        if let Err(e) = run_job(app, *job).await {
            error!(job = job.name(), error = %e, "job failed");
        }
    }
    tokio::pin!(shutdown);
    loop {
        let now = Utc::now();
        let Some((job, at)) = jobs
            .iter()
            .filter_map(|(j, s)| next_after(s, now).map(|t| (*j, t)))
            .min_by_key(|(_, t)| *t)
        else {
            info!("no job has a future tick; scheduler idle");
            shutdown.await;
            return;
        };
        let wait = (at - now).to_std().unwrap_or_default();
        tokio::select! {
            _ = &mut shutdown => { info!("scheduler stopping"); return; }
            _ = tokio::time::sleep(wait) => {}
        }
        let started = std::time::Instant::now();
        match run_job(app, job).await {
            Ok(n) => info!(
                job = job.name(),
                changed = n,
                ms = started.elapsed().as_millis() as u64,
                "job done"
            ),
            Err(e) => error!(job = job.name(), error = %e, "job failed"),
        }
    }
}
