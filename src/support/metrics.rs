//! Prometheus metrics: what the daemon counts. A leaf: the flows report into
//! it, and `health` fills the database gauges at scrape time and serves it.
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The gauges that describe the database and Vault, read at scrape time so
/// they are never stale.
#[derive(Debug, Default)]
pub struct Gauges {
    /// Credentials by state.
    pub credentials: Vec<(String, i64)>,
    /// The earliest notAfter of each active user's current credentials.
    pub expiry: Vec<(String, i64)>,
    /// Bootstrap and enrollment tokens by state.
    pub tokens: Vec<(String, i64)>,
    /// Every Vault state, and the current one (when Vault is configured).
    pub vault: Option<(Vec<&'static str>, &'static str)>,
    /// This process's audit checkpoint writes: how many failed, and whether
    /// the checkpoint is behind one of its commits now (with an audit key).
    pub audit_checkpoint: Option<(u64, bool)>,
    /// With a webhook: its states' age (`None`: never read) and whether it
    /// is past `authz.max_staleness`.
    pub authz_staleness: Option<(Option<Duration>, bool)>,
    /// The database could not be read: its gauges are left out.
    pub database_unreadable: bool,
}

type Labels = Vec<(String, String)>;

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Everything the daemon counts. Gauges that describe the database are filled
/// at scrape time, so they are never stale.
pub struct Metrics {
    registry: Registry,
    credentials: Family<Labels, Gauge>,
    expiry: Family<Labels, Gauge<f64, AtomicU64>>,
    tokens: Family<Labels, Gauge>,
    pub issuance_duration: Histogram,
    pub issuances: Family<Labels, Counter>,
    pub job_runs: Family<Labels, Counter>,
    pub job_last_success: Family<Labels, Gauge<f64, AtomicU64>>,
    pub job_duration: Family<Labels, Gauge<f64, AtomicU64>>,
    pub drift_repairs: Counter,
    pub api_requests: Family<Labels, Counter>,
    pub api_refusals: Family<Labels, Counter>,
    pub api_connections_refused: Family<Labels, Counter>,
    /// 1 for the Vault connection's state (`ready`, `sealed`, `unreachable`, ...), else 0.
    vault_state: Family<Labels, Gauge>,
    pub authz_decisions: Family<Labels, Counter>,
    pub authz_duration: Histogram,
    pub authz_snapshot_refreshed: Gauge<f64, AtomicU64>,
    pub authz_snapshot_credentials: Gauge,
    pub authz_connections_closed: Family<Labels, Counter>,
    /// When the webhook's states last matched the database (monotonic).
    authz_fresh_at: std::sync::Mutex<Option<std::time::Instant>>,
    authz_snapshot_age: Gauge<f64, AtomicU64>,
    authz_snapshot_stale: Gauge,
    /// When this daemon last became the leader (Unix seconds), 0 while it is not.
    leader_since: Gauge<f64, AtomicU64>,
    /// Failed audit checkpoint writes. The store counts them (it knows no
    /// metrics); each scrape adds what it counted since the last one.
    audit_checkpoint_failures: Counter,
    /// The store's count at the last scrape.
    audit_checkpoint_seen: AtomicU64,
    /// 1 while the audit checkpoint is behind a commit of this process.
    audit_checkpoint_behind: Gauge,
    /// Users' bindings whose namespace no longer exists.
    pub unbindable: crate::flows::unbindable::Unbindable,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rotator");
        let leader_since = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "leader_since_timestamp_seconds",
            "When this daemon became the leader (0 while it stands by; without leader election, its start)",
            leader_since.clone(),
        );
        let credentials = Family::<Labels, Gauge>::default();
        registry.register("credentials", "Credentials by state", credentials.clone());
        let unbindable = crate::flows::unbindable::Unbindable::default();
        registry.register(
            "bindings_namespace_missing",
            "Users' RoleBindings that cannot be written because their namespace no longer exists (`rotator doctor` names them)",
            unbindable.gauge(),
        );
        let expiry = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "credential_expiry_timestamp_seconds",
            "notAfter of each active user's current credential (alert before it passes)",
            expiry.clone(),
        );
        let tokens = Family::<Labels, Gauge>::default();
        registry.register(
            "bootstrap_tokens",
            "Bootstrap tokens rotator made, by state",
            tokens.clone(),
        );
        let issuance_duration =
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]);
        registry.register(
            "issuance_duration_seconds",
            "Time from key generation to delivered credential",
            issuance_duration.clone(),
        );
        let issuances = Family::<Labels, Counter>::default();
        registry.register(
            "issuances",
            "Issuances by kind and result (failures by reason)",
            issuances.clone(),
        );
        let job_runs = Family::<Labels, Counter>::default();
        registry.register(
            "job_runs",
            "Scheduled job runs by job and result",
            job_runs.clone(),
        );
        let job_last_success = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "job_last_success_timestamp_seconds",
            "When each job last succeeded",
            job_last_success.clone(),
        );
        let job_duration = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "job_duration_seconds",
            "How long each job's last run took",
            job_duration.clone(),
        );
        let drift_repairs = Counter::default();
        registry.register(
            "rbac_drift_repairs",
            "RoleBindings repaired by reconcile",
            drift_repairs.clone(),
        );
        let api_requests = Family::<Labels, Counter>::default();
        registry.register(
            "api_requests",
            "User API requests by endpoint and outcome (ok, or the HTTP status)",
            api_requests.clone(),
        );
        let api_refusals = Family::<Labels, Counter>::default();
        registry.register(
            "api_refusals",
            "User API requests refused before they proved an identity, by code (summarized in the audit log as api.refusals)",
            api_refusals.clone(),
        );
        let api_connections_refused = Family::<Labels, Counter>::default();
        registry.register(
            "api_connections_refused",
            "User API connections closed at once because their address (address) or the listener (total) held all its slots",
            api_connections_refused.clone(),
        );
        let vault_state = Family::<Labels, Gauge>::default();
        registry.register(
            "vault_state",
            "The Vault connection's state: 1 for the current one (ready, sealed, unreachable, unauthenticated, unknown); absent without [vault]",
            vault_state.clone(),
        );
        let authz_decisions = Family::<Labels, Counter>::default();
        registry.register(
            "authz_decisions",
            "Authorization webhook answers by decision (denied, no_opinion, bad_request, unavailable) and reason",
            authz_decisions.clone(),
        );
        let authz_duration = Histogram::new([
            0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25,
        ]);
        registry.register(
            "authz_decision_duration_seconds",
            "Time from a review's body read to its answer, in the webhook",
            authz_duration.clone(),
        );
        let authz_snapshot_refreshed = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "authz_snapshot_refreshed_timestamp_seconds",
            "When the webhook's in-memory credential states last matched the database (alert when it lags)",
            authz_snapshot_refreshed.clone(),
        );
        let authz_snapshot_credentials = Gauge::default();
        registry.register(
            "authz_snapshot_credentials",
            "Credentials the webhook holds in memory",
            authz_snapshot_credentials.clone(),
        );
        let authz_connections_closed = Family::<Labels, Counter>::default();
        registry.register(
            "authz_connections_closed",
            "Webhook connections closed before they were served: displaced from the pending-handshake pool by a newer one when their address (address) or the pool (total) was full, handshake not done in time (late), or no room among the connections that completed TLS (established)",
            authz_connections_closed.clone(),
        );
        let authz_snapshot_age = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "authz_snapshot_age_seconds",
            "Time since the webhook's in-memory credential states last matched the database, at scrape (0 without a webhook, +Inf before its first read)",
            authz_snapshot_age.clone(),
        );
        let authz_snapshot_stale = Gauge::default();
        registry.register(
            "authz_snapshot_stale",
            "1 while the webhook answers 503 (the API server's failurePolicy applies) because it has not read the database for longer than authz.max_staleness",
            authz_snapshot_stale.clone(),
        );
        let audit_checkpoint_failures = Counter::default();
        registry.register(
            "audit_checkpoint_write_failures",
            "Attempts to move the audit checkpoint forward that failed (after a commit, or a retry at a scrape); the changes stand, and `audit verify` reports checkpoint_old until a later write covers them",
            audit_checkpoint_failures.clone(),
        );
        let audit_checkpoint_behind = Gauge::default();
        registry.register(
            "audit_checkpoint_behind",
            "1 while the audit checkpoint is behind a commit of this process (its write failed; retried at each commit and scrape)",
            audit_checkpoint_behind.clone(),
        );
        Self {
            audit_checkpoint_failures,
            audit_checkpoint_seen: AtomicU64::new(0),
            audit_checkpoint_behind,
            authz_decisions,
            authz_duration,
            authz_snapshot_refreshed,
            authz_snapshot_credentials,
            authz_connections_closed,
            authz_fresh_at: Default::default(),
            authz_snapshot_age,
            authz_snapshot_stale,
            leader_since,
            vault_state,
            api_requests,
            api_refusals,
            api_connections_refused,
            registry,
            credentials,
            expiry,
            tokens,
            issuance_duration,
            issuances,
            job_runs,
            job_last_success,
            job_duration,
            drift_repairs,
            unbindable,
        }
    }
}

impl Metrics {
    pub fn issuance(&self, kind: &str, result: &str) {
        self.issuances
            .get_or_create(&l(&[("kind", kind), ("result", result)]))
            .inc();
    }

    /// One user API answer; unknown paths count as `other` so labels stay bounded.
    pub fn api(&self, endpoint: &str, outcome: &str) {
        let endpoint = match endpoint {
            "/v1/subject" | "/v1/enroll" | "/v1/renew" => endpoint,
            _ => "other",
        };
        self.api_requests
            .get_or_create(&l(&[("endpoint", endpoint), ("outcome", outcome)]))
            .inc();
    }

    /// A refusal of a request that did not authenticate; `code` is the API's own.
    pub fn api_refusal(&self, code: &str) {
        self.api_refusals.get_or_create(&l(&[("code", code)])).inc();
    }

    /// One webhook answer; `reason` is one of the decision's bounded labels.
    pub fn authz_decision(&self, decision: &str, reason: &str, took: Duration) {
        self.authz_decisions
            .get_or_create(&l(&[("decision", decision), ("reason", reason)]))
            .inc();
        self.authz_duration.observe(took.as_secs_f64());
    }

    /// The webhook's snapshot matched the database at `now` with `credentials` rows.
    pub fn authz_snapshot(&self, credentials: usize, now: i64) {
        self.authz_snapshot_refreshed.set(now as f64);
        self.authz_snapshot_credentials
            .set(i64::try_from(credentials).unwrap_or(i64::MAX));
    }

    /// The webhook's states matched the database at `at`.
    pub fn authz_fresh(&self, at: Option<std::time::Instant>) {
        *self
            .authz_fresh_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = at;
    }

    /// How long since the webhook's states matched the database (`None`: never).
    pub fn authz_age(&self) -> Option<Duration> {
        self.authz_fresh_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    /// A webhook connection closed before it was served; `reason` is a fixed label.
    pub fn authz_connection_closed(&self, reason: &str) {
        self.authz_connections_closed
            .get_or_create(&l(&[("reason", reason)]))
            .inc();
    }

    pub fn api_connection_refused(&self, reason: &str) {
        self.api_connections_refused
            .get_or_create(&l(&[("reason", reason)]))
            .inc();
    }

    /// This daemon leads from `now` on (`None`: it stands by).
    pub fn leading_since(&self, now: Option<i64>) {
        self.leader_since.set(now.unwrap_or(0) as f64);
    }

    /// When this daemon became the leader, 0 while it is not.
    pub fn leader_since(&self) -> f64 {
        self.leader_since.get()
    }

    /// When `job` last succeeded (Unix seconds), 0 when it never has.
    pub fn last_success(&self, job: &str) -> f64 {
        self.job_last_success
            .get_or_create(&l(&[("job", job)]))
            .get()
    }

    pub fn job(&self, job: &str, ok: bool, took: Duration, now: i64) {
        self.job_runs
            .get_or_create(&l(&[
                ("job", job),
                ("result", if ok { "success" } else { "failure" }),
            ]))
            .inc();
        self.job_duration
            .get_or_create(&l(&[("job", job)]))
            .set(took.as_secs_f64());
        if ok {
            self.job_last_success
                .get_or_create(&l(&[("job", job)]))
                .set(now as f64);
        }
    }

    /// Sets the gauges that describe the database and Vault from `now`,
    /// then renders the text format.
    pub fn render(&self, now: &Gauges) -> Result<String, std::fmt::Error> {
        if let Some((age, stale)) = now.authz_staleness {
            self.authz_snapshot_age
                .set(age.map_or(f64::INFINITY, |a| a.as_secs_f64()));
            self.authz_snapshot_stale.set(stale as i64);
        }
        self.credentials.clear();
        self.expiry.clear();
        self.tokens.clear();
        if now.database_unreadable {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
            return Ok(out);
        }
        for state in [
            "pending",
            "current",
            "superseded",
            "revoked",
            "expired",
            "failed",
        ] {
            self.credentials
                .get_or_create(&l(&[("state", state)]))
                .set(0);
        }
        for (state, n) in &now.credentials {
            self.credentials
                .get_or_create(&l(&[("state", state)]))
                .set(*n);
        }
        for (user, not_after) in &now.expiry {
            self.expiry
                .get_or_create(&l(&[("user", user)]))
                .set(*not_after as f64);
        }
        if let Some((states, current)) = &now.vault {
            for s in states {
                self.vault_state
                    .get_or_create(&l(&[("state", s)]))
                    .set((s == current) as i64);
            }
        }
        for (state, n) in &now.tokens {
            self.tokens.get_or_create(&l(&[("state", state)])).set(*n);
        }
        if let Some((failures, behind)) = now.audit_checkpoint {
            use std::sync::atomic::Ordering;
            let seen = self.audit_checkpoint_seen.swap(failures, Ordering::SeqCst);
            // Fewer than last time: a reload brought a new store, counting from 0.
            self.audit_checkpoint_failures
                .inc_by(failures.checked_sub(seen).unwrap_or(failures));
            self.audit_checkpoint_behind.set(behind as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
