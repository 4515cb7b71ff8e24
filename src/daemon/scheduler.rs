//! Cron-scheduled jobs for `rotator serve`: rotate, expire, reconcile. Jobs run
//! one at a time in this loop, so a job still running at its next tick is never
//! started twice. Every job runs at each of its ticks, or, when another job
//! (or its own previous run) was still running then, once as soon as it can;
//! ticks missed while the daemon was down are caught up once at start, not
//! replayed one by one.
use std::future::Future;
use std::sync::Arc;

use chrono::{DateTime, Utc};
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

/// Who the audit log names for the expire job's changes (reconcile's are
/// `daemon:reconcile`, rotation's `daemon`).
pub const EXPIRE_ACTOR: &str = "daemon:expire";

/// Runs one job now; the summary says what it did.
pub async fn run_job(app: &Arc<App>, job: Job) -> Result<serde_json::Value, String> {
    match job {
        Job::Rotate => crate::flows::renew::rotate_pass(app)
            .await
            .map(|r| json!(r))
            .map_err(|e| e.to_string()),
        Job::Expire => {
            // The expire pass's changes are the daemon's, whoever started it.
            let app = &app.acting_as(EXPIRE_ACTOR);
            let expired = crate::flows::revoke::expire_pass(app)
                .await
                .map_err(|e| e.to_string())?;
            let access = crate::flows::revoke::remove_stale_access(app)
                .await
                .map_err(|e| e.to_string())?;
            let tokens = crate::flows::bootstrap_tokens::expire_pass(app)
                .await
                .map_err(|e| e.to_string())?;
            let enrollments = crate::flows::enroll::expire_pass(app)
                .await
                .map_err(|e| e.to_string())?;
            Ok(
                json!({"expired": expired, "access_removed_for_users": access, "tokens_deleted": tokens, "enrollment_tokens_expired": enrollments}),
            )
        }
        Job::Reconcile => crate::flows::renew::reconcile_pass(app)
            .await
            .map(|r| json!(r))
            .map_err(|e| e.to_string()),
    }
}

/// With leader election: makes sure this daemon, which holds the Lease, also
/// holds the leader epoch in the database (taking a new one when it has none,
/// or was fenced out of its old one). False when it could not: it then runs
/// no job this round.
pub async fn hold_epoch(app: &App, identity: &str) -> bool {
    let held = lock_fence(app).clone().filter(|f| !f.deposed());
    if held.is_some() {
        return true;
    }
    // Audited as the daemon's, like the jobs it is about to run.
    match crate::store::fence::take_over(&app.store, identity, app.clock.now(), "daemon").await {
        Ok(f) => {
            info!(epoch = f.epoch, identity, "took the leader epoch");
            *lock_fence(app) = Some(f);
            true
        }
        Err(e) => {
            // An unreachable database is logged once per outage (by `health`),
            // not at every election round.
            if app.store.health().await.is_ok() {
                tracing::warn!(error = %e, "holds the Lease but could not take the leader epoch in the database; standing by");
            } else {
                tracing::debug!(error = %e, "no leader epoch while the database is unreachable; standing by");
            }
            false
        }
    }
}

/// Lost the Lease: the epoch this daemon held is no longer its to write with.
pub fn drop_epoch(app: &App) {
    lock_fence(app).take();
}

fn lock_fence(app: &App) -> std::sync::MutexGuard<'_, Option<Arc<crate::store::fence::Fence>>> {
    app.fence.lock().unwrap_or_else(|p| p.into_inner())
}

/// The App a job runs with: without leader election the daemon's own; with it,
/// one whose store commits only under this daemon's leader epoch (None when it
/// holds none: not the leader).
fn job_app(app: &Arc<App>) -> Option<(Arc<App>, Option<Arc<crate::store::fence::Fence>>)> {
    if app.settings.leader_election.is_none() {
        return Some((app.clone(), None));
    }
    let fence = lock_fence(app).clone().filter(|f| !f.deposed())?;
    let mut fenced = app.acting_as(&app.actor);
    fenced.store = app.store.fenced(fence.clone());
    Some((Arc::new(fenced), Some(fence)))
}

/// The first wait before the database is asked again after it did not
/// answer, doubled each time up to [`DB_RETRY_MAX`].
pub const DB_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(500);
pub const DB_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// How many times one tick's job is run again after the database came back
/// from an outage that made it fail.
const DB_RERUNS: usize = 3;

/// Tells a job that the daemon is stopping. A job that is only waiting for the
/// database (a backoff sleep, a health probe) has nothing to finish and gives
/// up its wait at once; work in flight does not look, and runs on within the
/// stop grace.
#[derive(Debug, Clone)]
pub struct Stopping(tokio::sync::watch::Receiver<bool>);

impl Stopping {
    /// `fut`'s output, or `None` (and `fut` dropped) once the daemon is stopping.
    pub async fn unless<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        let mut rx = self.0.clone();
        let stopping = async move {
            // A sender gone without a stop: nobody can stop this job any more.
            if rx.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            _ = stopping => None,
            v = fut => Some(v),
        }
    }
}

/// What a wait for the database came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// It answered at once.
    Up,
    /// It answered after an outage.
    Back,
    /// The daemon is stopping and the database had not answered.
    Stopped,
}

/// Waits while the database does not answer, asking again with backoff
/// ([`DB_RETRY_FIRST`] doubling to [`DB_RETRY_MAX`]), until it does or the
/// daemon stops. The outage's start and end are logged once each (by
/// `Store::health`).
async fn wait_for_database(app: &App, stopping: &Stopping) -> Waited {
    wait_until(|| async { app.store.health().await.is_ok() }, stopping).await
}

/// [`wait_for_database`] with the question asked by `up`.
async fn wait_until<F, Fut>(mut up: F, stopping: &Stopping) -> Waited
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    match stopping.unless(up()).await {
        None => return Waited::Stopped,
        Some(true) => return Waited::Up,
        Some(false) => {}
    }
    let mut wait = DB_RETRY_FIRST;
    loop {
        let asked = stopping.unless(async {
            tokio::time::sleep(wait).await;
            up().await
        });
        match asked.await {
            None => return Waited::Stopped,
            Some(true) => return Waited::Back,
            Some(false) => wait = (wait * 2).min(DB_RETRY_MAX),
        }
    }
}

/// Runs `job` if this daemon leads. A job is not started while the database
/// is unreachable (it waits, with backoff, for it to come back), and a job
/// that failed because the database went away in the middle runs again as
/// soon as it is back, instead of at its next tick: every user the pass had not
/// reached is renewed once the outage ends. A stop ends such a wait at once
/// (`stopping`); a run in progress is not interrupted by it.
pub async fn run_logged(app: &Arc<App>, job: Job, stopping: &Stopping) {
    let stopped = || info!(job = job.name(), "stopped while waiting for the database");
    for rerun in 0..=DB_RERUNS {
        match wait_for_database(app, stopping).await {
            Waited::Up => {}
            Waited::Back => info!(job = job.name(), "database back: running the job"),
            Waited::Stopped => return stopped(),
        }
        let ok = run_once(app, job).await;
        if ok != Some(false) || rerun == DB_RERUNS {
            return;
        }
        // Failed: because the database went away? Then wait for it and run again.
        match stopping.unless(app.store.health()).await {
            None => return stopped(),
            Some(Ok(())) => return,
            Some(Err(_)) => continue,
        }
    }
}

/// One run; `None` when this daemon does not lead, else whether it succeeded.
async fn run_once(app: &Arc<App>, job: Job) -> Option<bool> {
    let leads = app.leader.load(std::sync::atomic::Ordering::SeqCst);
    let Some((job_app, fence)) = job_app(app).filter(|_| leads) else {
        tracing::debug!(job = job.name(), "not the leader; skipping");
        return None;
    };
    let started = std::time::Instant::now();
    let result = run_job(&job_app, job).await;
    if fence.as_ref().is_some_and(|f| f.deposed()) {
        // Another daemon took a newer epoch: every commit of ours is refused
        // from now on, so stand by until this one wins the Lease again.
        app.leader.store(false, std::sync::atomic::Ordering::SeqCst);
        drop_epoch(app);
        error!(
            job = job.name(),
            "fenced: another daemon leads now; this job's changes after that were refused; standing by"
        );
    }
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
    Some(ok)
}

/// Runs the schedules until `shutdown` resolves; a job in flight gets
/// [`STOP_GRACE`] to finish, one waiting for the database stops at once. A
/// new `App` on `apps` (SIGHUP) takes effect at once: its schedules decide the
/// next tick.
pub async fn run(apps: tokio::sync::watch::Receiver<Arc<App>>, shutdown: impl Future<Output = ()>) {
    drive(
        apps,
        shutdown,
        &WallTime,
        STOP_GRACE,
        |app: Arc<App>, job, stopping| async move { run_logged(&app, job, &stopping).await },
    )
    .await
}

/// What the loop needs to know of time: the wall clock the cron expressions
/// are read against, and a way to wait. Tests drive a virtual one.
pub trait Time {
    fn now(&self) -> DateTime<Utc>;
    fn sleep(&self, d: std::time::Duration) -> impl Future<Output = ()> + Send;
}

/// The system clock and tokio's timer.
pub struct WallTime;

impl Time for WallTime {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
    fn sleep(&self, d: std::time::Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(d)
    }
}

/// Where the loop reads each job's schedule.
pub trait Plan: Clone {
    fn schedule(&self, job: Job) -> &cron::Schedule;
}

impl Plan for Arc<App> {
    fn schedule(&self, job: Job) -> &cron::Schedule {
        &job.schedule(self).schedule
    }
}

fn slot(job: Job) -> usize {
    match job {
        Job::Rotate => 0,
        Job::Expire => 1,
        Job::Reconcile => 2,
    }
}

/// The loop. Each job keeps its own mark, the instant its last run started:
/// its next tick is the first one after that mark, whatever the other jobs
/// did. Jobs run one at a time; the job whose pending tick is the oldest runs
/// first (on a tie, the one that last ran longest ago), so a job whose tick
/// fell while another ran is run as soon as that one ends, once however many
/// of its ticks it missed, and no schedule can starve another. A tick waits at
/// most for the run in progress and one run of each job with an older tick.
/// Each run is told through its [`Stopping`] when `shutdown` resolves.
pub async fn drive<P, T, R, F>(
    mut plans: tokio::sync::watch::Receiver<P>,
    shutdown: impl Future<Output = ()>,
    time: &T,
    grace: std::time::Duration,
    mut run: R,
) where
    P: Plan,
    T: Time,
    R: FnMut(P, Job, Stopping) -> F,
    F: Future<Output = ()>,
{
    tokio::pin!(shutdown);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let stopping = Stopping(stopping);
    let mut plan = plans.borrow_and_update().clone();
    let mut mark = [time.now(); 3];
    // Catch up once at start: whatever fell due while the daemon was down.
    for job in [Job::Expire, Job::Reconcile, Job::Rotate] {
        mark[slot(job)] = time.now();
        if run_within(
            &mut shutdown,
            &stop,
            time,
            grace,
            job,
            run(plan.clone(), job, stopping.clone()),
        )
        .await
        {
            return;
        }
    }
    loop {
        if plans.has_changed().unwrap_or(false) {
            plan = plans.borrow_and_update().clone();
        }
        let next = Job::ALL
            .iter()
            .filter_map(|j| {
                plan.schedule(*j)
                    .after(&mark[slot(*j)])
                    .next()
                    .map(|t| (*j, t))
            })
            .min_by_key(|(j, t)| (*t, mark[slot(*j)]));
        let Some((job, at)) = next else {
            info!("no job has a future tick; scheduler idle until a reload or shutdown");
            tokio::select! {
                _ = &mut shutdown => return,
                r = plans.changed() => if r.is_err() { return } else { continue },
            }
        };
        let now = time.now();
        if at > now {
            let wait = (at - now).to_std().unwrap_or_default();
            tokio::select! {
                _ = &mut shutdown => { info!("scheduler stopping"); return; }
                r = plans.changed() => {
                    if r.is_err() { return; }
                    plan = plans.borrow_and_update().clone();
                    info!("schedules reloaded");
                }
                _ = time.sleep(wait) => {}
            }
            // Look again: a reload, or a timer that fired a hair early.
            continue;
        }
        // Ticks up to now are all served by this run; a tick that falls while
        // it runs makes the job due again at once.
        mark[slot(job)] = now.max(at);
        if run_within(
            &mut shutdown,
            &stop,
            time,
            grace,
            job,
            run(plan.clone(), job, stopping.clone()),
        )
        .await
        {
            return;
        }
    }
}

/// Runs `job`; true when the scheduler must stop. On a stop signal the job is
/// told (`stop`): one only waiting for the database returns at once, one in
/// flight gets `grace` to finish; past that it is dropped, which an issuance
/// survives like any crash (its journal says where it was). File I/O in jobs
/// runs on blocking threads, so a job stuck in a system call still lets this
/// future see the signal.
async fn run_within<T: Time>(
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    stop: &tokio::sync::watch::Sender<bool>,
    time: &T,
    grace: std::time::Duration,
    job: Job,
    fut: impl Future<Output = ()>,
) -> bool {
    let mut stopping = false;
    tokio::select! {
        _ = fut => {}
        _ = async { shutdown.as_mut().await; stopping = true; stop.send_replace(true); time.sleep(grace).await } => {
            tracing::warn!(job = job.name(), ?grace, "job still running after the stop grace period; stopping anyway");
            return true;
        }
    }
    if stopping {
        info!("scheduler stopping");
    }
    stopping
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::str::FromStr;
    use std::time::Duration;

    /// Virtual wall time: a sleep moves it on at once.
    struct Virtual(std::sync::Mutex<DateTime<Utc>>);

    impl Time for Virtual {
        fn now(&self) -> DateTime<Utc> {
            *self.0.lock().unwrap()
        }
        fn sleep(&self, d: Duration) -> impl Future<Output = ()> + Send {
            *self.0.lock().unwrap() += chrono::Duration::from_std(d).unwrap();
            std::future::ready(())
        }
    }

    #[derive(Clone)]
    struct Fixed([cron::Schedule; 3]);

    impl Plan for Fixed {
        fn schedule(&self, job: Job) -> &cron::Schedule {
            &self.0[slot(job)]
        }
    }

    fn plan(rotate: &str, expire: &str, reconcile: &str) -> Fixed {
        Fixed([rotate, expire, reconcile].map(|e| cron::Schedule::from_str(e).unwrap()))
    }

    /// Runs the loop over virtual time from `start` until the first run that
    /// starts after `end`; each job takes `took` of virtual time. Returns every
    /// run's job and start, the start-up catch-up excluded.
    async fn simulate(
        p: &Fixed,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        took: [Duration; 3],
    ) -> Vec<(Job, DateTime<Utc>)> {
        let time = Virtual(std::sync::Mutex::new(start));
        let runs = RefCell::new(Vec::new());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stop_tx = RefCell::new(Some(stop_tx));
        let (_keep, plans) = tokio::sync::watch::channel(p.clone());
        drive(
            plans,
            async move {
                let _ = stop_rx.await;
            },
            &time,
            Duration::from_secs(30),
            |_, job, _| {
                let at = time.now();
                if at > end {
                    if let Some(tx) = stop_tx.borrow_mut().take() {
                        let _ = tx.send(());
                    }
                } else {
                    runs.borrow_mut().push((job, at));
                }
                time.sleep(took[slot(job)])
            },
        )
        .await;
        let mut runs = runs.into_inner();
        runs.drain(..3); // the catch-up pass
        runs
    }

    fn ticks(s: &cron::Schedule, start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        s.after(&start).take_while(|t| *t <= end).collect()
    }

    fn counts(runs: &[(Job, DateTime<Utc>)]) -> [usize; 3] {
        let mut n = [0; 3];
        for (j, _) in runs {
            n[slot(*j)] += 1;
        }
        n
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[tokio::test]
    async fn tied_and_overlapping_schedules_run_every_job_at_each_of_its_ticks() {
        // The review's schedules: rotate and expire tie every 3 s, reconcile every 5 s
        // ties with both on every 15th second; over 5 min 19 s.
        let p = plan("*/3 * * * * *", "*/3 * * * * *", "*/5 * * * * *");
        let (start, end) = (
            at("2026-12-01T07:00:00.250Z"),
            at("2026-12-01T07:05:19.250Z"),
        );
        let runs = simulate(&p, start, end, [Duration::ZERO; 3]).await;
        let expected = Job::ALL.map(|j| ticks(p.schedule(j), start, end).len());
        assert_eq!(expected, [106, 106, 63]);
        assert_eq!(
            counts(&runs),
            expected,
            "runs per job (rotate, expire, reconcile)"
        );
        // Each at its tick, on :00, :15, :30 and :45 too.
        for j in Job::ALL {
            let starts: Vec<_> = runs.iter().filter(|r| r.0 == j).map(|r| r.1).collect();
            assert_eq!(starts, ticks(p.schedule(j), start, end), "{}", j.name());
        }
    }

    #[tokio::test]
    async fn the_shipped_defaults_run_reconcile_every_ten_minutes() {
        // rotate at second 0 of every minute, expire at second 30, reconcile at
        // second 0 of every tenth minute: a tie with rotate each time.
        let p = plan("0 * * * * *", "30 * * * * *", "0 */10 * * * *");
        let (start, end) = (at("2026-12-01T07:00:05Z"), at("2026-12-01T09:00:05Z"));
        let runs = simulate(&p, start, end, [Duration::ZERO; 3]).await;
        assert_eq!(counts(&runs), [120, 120, 12]);
    }

    #[tokio::test]
    async fn a_slow_job_delays_the_others_but_never_starves_them() {
        // rotate takes 4 s though it ticks every 3 s; expire takes 1 s.
        let p = plan("*/3 * * * * *", "*/3 * * * * *", "*/5 * * * * *");
        let (start, end) = (
            at("2026-12-01T07:00:00.250Z"),
            at("2026-12-01T07:05:19.250Z"),
        );
        let took = [
            Duration::from_secs(4),
            Duration::from_secs(1),
            Duration::ZERO,
        ];
        let runs = simulate(&p, start, end, took).await;
        // The longest a tick waits: the run in progress, then at most one run
        // of each job whose pending tick is older (that one's included).
        let bound = chrono::Duration::seconds(4 + (4 + 1));
        for j in Job::ALL {
            let starts: Vec<_> = runs.iter().filter(|r| r.0 == j).map(|r| r.1).collect();
            let ticks = ticks(p.schedule(j), start, end);
            // A tick near the end is served after the window: not counted.
            for t in ticks.iter().filter(|t| **t + bound <= end) {
                assert!(
                    starts.iter().any(|s| *s >= *t && *s <= *t + bound),
                    "{} tick {t} was not served within {bound}: {starts:?}",
                    j.name()
                );
            }
            assert!(
                starts.len() <= ticks.len(),
                "{}: no run without a tick",
                j.name()
            );
        }
        // Runs never overlap: each starts after the one before ended.
        for w in runs.windows(2) {
            assert!(w[1].1 >= w[0].1 + chrono::Duration::from_std(took[slot(w[0].0)]).unwrap());
        }
        let n = counts(&runs);
        // Rotation takes longer than its period, so every cycle is rotate + expire
        // (5 s): each runs once per cycle, reconcile every other one.
        assert_eq!(n, [63, 63, 31], "runs per job (rotate, expire, reconcile)");
    }
}

/// Stopping on real (tokio) time: what a job waiting for the database and a
/// job in flight each do when the daemon is told to stop.
#[cfg(test)]
mod stop_tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::str::FromStr;
    use std::time::{Duration, Instant};

    #[derive(Clone)]
    struct Never(cron::Schedule);

    impl Plan for Never {
        fn schedule(&self, _: Job) -> &cron::Schedule {
            &self.0
        }
    }

    fn never() -> tokio::sync::watch::Receiver<Never> {
        let (tx, rx) = tokio::sync::watch::channel(Never(
            cron::Schedule::from_str("0 0 0 1 1 * 2099").unwrap(),
        ));
        std::mem::forget(tx); // the plan never changes
        rx
    }

    #[tokio::test]
    async fn a_job_waiting_for_the_database_stops_at_once_on_the_signal() {
        let stop = tokio::sync::Notify::new();
        let probes = Cell::new(0);
        let waited = RefCell::new(Vec::new());
        let (stop, probes, waited) = (&stop, &probes, &waited);
        // The grace is far longer than the test may take: only a wait that
        // gives up at the signal lets the loop end in time.
        let grace = Duration::from_secs(3600);
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(20),
            drive(
                never(),
                stop.notified(),
                &WallTime,
                grace,
                |_, _, stopping| async move {
                    let w = wait_until(
                        || async {
                            probes.set(probes.get() + 1);
                            // The signal comes while the job sleeps before its third probe.
                            if probes.get() == 2 {
                                stop.notify_one();
                            }
                            false
                        },
                        &stopping,
                    )
                    .await;
                    waited.borrow_mut().push(w);
                },
            ),
        )
        .await
        .expect("the loop stopped without waiting out the grace");
        assert_eq!(
            *waited.borrow(),
            [Waited::Stopped],
            "one run, stopped in its wait"
        );
        assert_eq!(probes.get(), 2, "no probe after the signal");
        // The first backoff sleep (0.5 s) was waited for; that the second was
        // not is the probe count above (an upper bound on wall time would only
        // measure how loaded the machine is).
        let took = started.elapsed();
        assert!(took >= DB_RETRY_FIRST, "{took:?}");
    }

    #[tokio::test]
    async fn the_database_answering_again_ends_the_wait() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stopping = Stopping(rx);
        assert_eq!(wait_until(|| async { true }, &stopping).await, Waited::Up);
        let answers = RefCell::new(vec![true, false, false]);
        let started = Instant::now();
        let w = wait_until(|| async { answers.borrow_mut().pop().unwrap() }, &stopping).await;
        assert_eq!(w, Waited::Back);
        assert!(answers.borrow().is_empty(), "asked three times");
        assert!(started.elapsed() >= DB_RETRY_FIRST * 3, "0.5 s, then 1 s");
        // Already stopping: not even asked.
        tx.send_replace(true);
        let asked = Cell::new(false);
        let w = wait_until(
            || async {
                asked.set(true);
                true
            },
            &stopping,
        )
        .await;
        assert_eq!((w, asked.get()), (Waited::Stopped, false));
    }

    #[tokio::test]
    async fn a_job_in_flight_keeps_its_grace_and_is_dropped_after_it() {
        let grace = Duration::from_millis(300);
        for (work, finishes) in [
            (Duration::from_millis(100), true),
            (Duration::from_secs(3600), false),
        ] {
            let stop = tokio::sync::Notify::new();
            let (runs, done) = (Cell::new(0), Cell::new(false));
            let (stop, runs, done) = (&stop, &runs, &done);
            let started = Instant::now();
            tokio::time::timeout(
                Duration::from_secs(20),
                drive(
                    never(),
                    stop.notified(),
                    &WallTime,
                    grace,
                    |_, _, _| async move {
                        runs.set(runs.get() + 1);
                        stop.notify_one();
                        // Work that does not look at `stopping`.
                        tokio::time::sleep(work).await;
                        done.set(true);
                    },
                ),
            )
            .await
            .expect("the loop stopped");
            let took = started.elapsed();
            assert_eq!(runs.get(), 1, "no job is started after the signal");
            assert_eq!(done.get(), finishes, "{work:?}");
            assert!(took >= work.min(grace), "{work:?}: stopped after {took:?}");
        }
    }
}
