//! The issuance saga: one state machine for add-user, rotate and renewals.
//!
//! `planned → (csr_submitted → approved →) issued → stored → delivered`, or
//! `failed` / `abandoned`. The journal row is written before each external step;
//! `issued` has no write of its own (nothing external happens between it and
//! `stored`): the transaction that stores the certificate moves the journal on.
//! A private key made here lives only in memory; an attempt that dies before
//! `delivered` can never be finished (its key is gone), so the next attempt for
//! the same user abandons it (deleting its CSR object, failing its stored
//! credential) and starts over with a fresh key and a fresh generation. A
//! credential becomes current only once delivered; the previous one is
//! superseded in that same transaction.
use std::time::Duration;

use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Settings;
use crate::delivery::kubeconfig::ClientKubeconfig;
use crate::delivery::{Sink, SinkError};
use crate::flows::bindings::Sweep;
use crate::pki::{self, Expected, PrivateKey};
use crate::policy::{PolicyError, UserSpec, generation_group};
use crate::signer::{SignError, SignRequest, Signer};
use crate::store::credentials::{self, Credential, NewCredential};
use crate::store::issuances::{self, Step};
use crate::store::{Store, StoreError, audit, enrollments, users};
use crate::support::clock::Clock;
use crate::support::exit::{Exit, ExitStatus};

/// Places where tests (and `ROTATOR_FAULT` in process-level tests) make an issuance fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    AfterPlan,
    /// The CSR object's name is journaled (kubernetes signer), before it is created.
    CsrSubmitted,
    /// The CSR was approved (kubernetes signer).
    Approved,
    AfterSign,
    BeforeStore,
    AfterStore,
    AfterDeliver,
}

impl FaultPoint {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "after-plan" => FaultPoint::AfterPlan,
            "csr-submitted" => FaultPoint::CsrSubmitted,
            "approved" => FaultPoint::Approved,
            "after-sign" => FaultPoint::AfterSign,
            "before-store" => FaultPoint::BeforeStore,
            "after-store" => FaultPoint::AfterStore,
            "after-deliver" => FaultPoint::AfterDeliver,
            _ => return None,
        })
    }
}

pub trait Faults: Send + Sync {
    fn hit(&self, point: FaultPoint) -> Result<(), IssueError>;
}

#[derive(Debug, Default)]
pub struct NoFaults;

impl Faults for NoFaults {
    fn hit(&self, _: FaultPoint) -> Result<(), IssueError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(
        "user {0:?} already exists with a current credential\nfix: use `rotator rotate {0}` for a new credential, or `rotator remove-user {0}` first"
    )]
    UserExists(String),
    #[error(
        "user {user:?} already exists with a different specification ({differs})\nfix: remove the user first, or repeat the original command to finish an interrupted add-user"
    )]
    SpecMismatch { user: String, differs: String },
    #[error(
        "no active user {0:?}\nfix: `rotator list-users` shows who exists; `rotator add-user` creates one"
    )]
    NoSuchUser(String),
    #[error(
        "user {user:?} was revoked at {} by {by}; nothing is issued to them until an administrator reinstates them\nfix: if that is intended, `rotator rotate {user} --reinstate` ends the revocation and issues a new credential (`rotator add-user {user} ... --enroll --reinstate` for a new enrollment token)",
        crate::support::clock::rfc3339(*.at)
    )]
    Revoked { user: String, at: i64, by: String },
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(
        "the signer issued a certificate valid for {got}s, more than policy allows ({max}s)\nfix: lower the signer's maximum lifetime; the certificate was discarded"
    )]
    LifetimeTooLong { got: i64, max: i64 },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Access(#[from] crate::flows::bindings::AccessError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("injected fault at {0:?}")]
    Injected(FaultPoint),
    #[error(
        "issuance {0} was abandoned by another rotator process while it ran (it looked stale)\nfix: run the command again"
    )]
    Preempted(String),
    #[error(
        "{user}'s new credential ({serial}) was not made current: {reason}\n{written}fix: {fix}"
    )]
    Cancelled {
        user: String,
        serial: String,
        reason: String,
        /// Set when the kubeconfig had already been delivered there.
        written: String,
        fix: &'static str,
    },
    #[error(
        "{user}'s generation {generation} was not made current: generation {newer} ({newer_serial}) was made current after it began, and the older one would roll {user} back; it was abandoned\nfix: nothing to repair: {user}'s current credential is the newer one; `rotator rotate {user}` issues another"
    )]
    Overtaken {
        user: String,
        generation: i64,
        newer: i64,
        newer_serial: String,
    },
    #[error(
        "the request names generation {asked}, but the user's next generation is {next}\nfix: ask for the subject again and make a new request"
    )]
    GenerationStale { asked: i64, next: i64 },
    #[error(
        "the enrollment token was used or claimed by another key meanwhile\nfix: ask your administrator for a new token"
    )]
    TokenUnavailable,
    #[error(
        "the certificate signing request is not allowed: {0}\nfix: make the request with the subject /v1/subject returns"
    )]
    ClientCsr(String),
    #[error(
        "the request's key is {got}, but this user's credentials use {want}\nfix: generate a {want} key"
    )]
    ClientKeyType { got: String, want: &'static str },
}

impl IssueError {
    /// A short, lowercase reason for metrics labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            IssueError::Policy(_) => "policy",
            IssueError::UserExists(_)
            | IssueError::SpecMismatch { .. }
            | IssueError::NoSuchUser(_) => "request",
            IssueError::Revoked { .. } => "revoked",
            IssueError::Sign(crate::signer::SignError::Cluster(
                crate::cluster::ClusterError::Denied { .. },
            )) => "denied",
            IssueError::Sign(crate::signer::SignError::Cluster(
                crate::cluster::ClusterError::Timeout { .. },
            )) => "timeout",
            IssueError::Sign(crate::signer::SignError::Cluster(
                crate::cluster::ClusterError::Unreachable { .. },
            )) => "unreachable",
            IssueError::Sign(_) => "signer",
            IssueError::Pki(_) | IssueError::LifetimeTooLong { .. } => "verification",
            IssueError::Sink(_) => "delivery",
            IssueError::Access(crate::flows::bindings::AccessError::Cluster(
                crate::cluster::ClusterError::Unreachable { .. },
            )) => "unreachable",
            IssueError::Access(_) => "rbac",
            IssueError::Store(_) => "database",
            IssueError::Injected(_) | IssueError::Preempted(_) => "interrupted",
            IssueError::Cancelled { .. } => "revoked",
            IssueError::Overtaken { .. } => "overtaken",
            IssueError::GenerationStale { .. }
            | IssueError::TokenUnavailable
            | IssueError::ClientCsr(_)
            | IssueError::ClientKeyType { .. } => "request",
        }
    }
}

impl ExitStatus for IssueError {
    fn exit(&self) -> Exit {
        match self {
            IssueError::Policy(e) => e.exit(),
            IssueError::UserExists(_) | IssueError::SpecMismatch { .. } => Exit::Conflict,
            IssueError::NoSuchUser(_) => Exit::NotFound,
            IssueError::Revoked { .. } => Exit::Refused,
            IssueError::Sign(e) => e.exit(),
            IssueError::Pki(e) => e.exit(),
            IssueError::LifetimeTooLong { .. } => Exit::Verification,
            IssueError::Sink(e) => e.exit(),
            IssueError::Access(e) => e.exit(),
            IssueError::Store(e) => e.exit(),
            IssueError::Injected(_) => Exit::Internal,
            IssueError::Preempted(_)
            | IssueError::Cancelled { .. }
            | IssueError::Overtaken { .. } => Exit::Conflict,
            IssueError::GenerationStale { .. } | IssueError::TokenUnavailable => Exit::Conflict,
            IssueError::ClientCsr(_) | IssueError::ClientKeyType { .. } => Exit::Refused,
        }
    }
}

/// A certificate signed, verified and stored as `pending`.
struct Stored {
    cert: pki::CertInfo,
    certificate_pem: String,
    lifetime_note: Option<String>,
}

/// A request made with a key that never leaves the client (self-service).
#[derive(Debug)]
pub struct ClientRequest<'a> {
    pub user: &'a str,
    pub csr: &'a pki::CsrInfo,
    /// The generation the CSR's subject names: the user's next one.
    pub generation: i64,
    /// The credential that authenticated a renewal (mutual TLS).
    pub renewed_from: Option<&'a str>,
    /// The enrollment token to claim for the CSR's key and burn.
    pub token: Option<&'a str>,
    /// Who asked, for the audit log.
    pub actor: &'a str,
    /// Where the certificate goes, for the audit log ("api 10.0.0.5:40112").
    pub delivered_to: &'a str,
}

/// What policy lets a client ask for: the user's CN, their groups plus the
/// generation group, the user's key type, and no CA.
fn check_client_csr(
    csr: &pki::CsrInfo,
    spec: &UserSpec,
    organizations: &[String],
) -> Result<(), IssueError> {
    let refuse = |problem: String| Err(IssueError::ClientCsr(problem));
    if csr.common_name != spec.name {
        return refuse(format!(
            "its CN is {:?}, but the credential is for {:?}",
            csr.common_name, spec.name
        ));
    }
    for o in &csr.organizations {
        if o.to_ascii_lowercase().starts_with("system:") {
            return refuse(format!(
                "it asks for group {o:?}; nothing under system: is ever issued"
            ));
        }
    }
    let (mut got, mut want) = (csr.organizations.clone(), organizations.to_vec());
    got.sort();
    want.sort();
    if got != want {
        return refuse(format!(
            "its groups (O) are {got:?}; policy gives {:?} exactly {want:?}",
            spec.name
        ));
    }
    if csr.requests_ca {
        return refuse("it asks for a CA certificate".into());
    }
    match csr.key_type() {
        Ok(k) if k == spec.key_type => Ok(()),
        Ok(k) => Err(IssueError::ClientKeyType {
            got: k.as_str().into(),
            want: spec.key_type.as_str(),
        }),
        Err(e) => Err(IssueError::ClientKeyType {
            got: e.to_string(),
            want: spec.key_type.as_str(),
        }),
    }
}

/// The result of a delivered issuance.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    pub credential: Credential,
    /// Serials this issuance superseded.
    pub superseded: Vec<String>,
    pub delivered_to: String,
    /// Set when the signer granted less than was asked (Kubernetes may cap lifetimes).
    pub lifetime_note: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AddUser,
    Rotate,
}

impl Kind {
    fn as_str(&self) -> &'static str {
        match self {
            Kind::AddUser => "add-user",
            Kind::Rotate => "rotate",
        }
    }
}

/// An attempt untouched this long is abandoned even if its process seems alive
/// (a pid can be reused). Longer than any signer's timeout.
pub const STALE_AFTER_SECONDS: i64 = 15 * 60;

/// This process, as the journal's `owner` column names it: `pid@boot-id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub boot_id: String,
}

impl ProcessIdentity {
    pub fn current() -> Self {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Self {
            pid: std::process::id(),
            boot_id,
        }
    }

    pub fn owner(&self) -> String {
        format!("{}@{}", self.pid, self.boot_id)
    }

    /// Whether the process that owns `owner` may still be running its attempt.
    fn may_be_running(&self, owner: &str) -> bool {
        let Some((pid, boot)) = owner.split_once('@') else {
            return false;
        };
        if boot != self.boot_id || boot.is_empty() {
            return false; // another boot: that process is gone
        }
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }
}

/// Attempts this process is running right now; never abandoned by it.
#[derive(Debug, Default)]
pub struct Inflight(std::sync::Mutex<std::collections::HashSet<String>>);

struct InflightGuard<'a>(&'a Inflight, String);

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

impl Inflight {
    fn enter(&self, id: &str) -> InflightGuard<'_> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        InflightGuard(self, id.to_string())
    }
    fn contains(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }
}

pub struct Issuer<'a> {
    pub store: &'a Store,
    pub identity: &'a ProcessIdentity,
    pub inflight: &'a Inflight,
    pub signer: &'a dyn Signer,
    pub settings: &'a Settings,
    pub clock: &'a dyn Clock,
    pub faults: &'a dyn Faults,
    /// With the kubernetes signer: the RoleBindings follow each issuance.
    pub cluster: Option<&'a crate::cluster::Cluster>,
    /// Server URL and CA bundle written into kubeconfigs.
    pub endpoint: &'a crate::cluster::Endpoint,
    pub metrics: &'a crate::support::metrics::Metrics,
    pub sealing: &'a pki::SealingKey,
}

/// Records a signer's external steps in the issuance journal.
struct Journal<'a> {
    store: &'a Store,
    clock: &'a dyn Clock,
    faults: &'a dyn Faults,
    id: &'a str,
}

impl crate::signer::Progress for Journal<'_> {
    fn step<'b>(
        &'b self,
        step: Step,
        csr_name: Option<&'b str>,
    ) -> crate::signer::BoxFuture<'b, Result<(), SignError>> {
        Box::pin(async move {
            let j = |e: StoreError| SignError::Journal(e.to_string());
            let now = self.clock.now();
            let mut tx = self.store.begin().await.map_err(j)?;
            if let Some(n) = csr_name {
                issuances::set_csr_name(&mut tx, self.id, n, now)
                    .await
                    .map_err(j)?;
            }
            if !issuances::set_step(&mut tx, self.id, step, None, now)
                .await
                .map_err(j)?
            {
                let why = issuances::get(&mut tx, self.id)
                    .await
                    .map_err(j)?
                    .and_then(|i| i.error)
                    .unwrap_or_else(|| "abandoned by another process".into());
                return Err(SignError::Journal(format!(
                    "issuance {} was ended while it ran ({why}); nothing of it is stored or handed out",
                    self.id
                )));
            }
            crate::store::commit(tx).await.map_err(j)?;
            let point = match step {
                Step::CsrSubmitted => Some(FaultPoint::CsrSubmitted),
                Step::Approved => Some(FaultPoint::Approved),
                _ => None,
            };
            match point.map(|p| self.faults.hit(p)) {
                Some(Err(e)) => Err(SignError::Journal(e.to_string())),
                _ => Ok(()),
            }
        })
    }
}

/// The user an issuance may be planned for: active, or revoked with a
/// credential to replace (a renewal or a pass that chose it before the revoke:
/// planning then says that credential is revoked, and refuses the user in any
/// case). A revoked user is refused with when and by whom.
fn issuable(
    found: Option<users::User>,
    name: &str,
    replacing: Option<&str>,
) -> Result<users::User, IssueError> {
    match found {
        Some(u) if u.state == "active" => Ok(u),
        Some(u) if u.state == "disabled" && replacing.is_some() => Ok(u),
        Some(users::User {
            revoked: Some(r), ..
        }) => Err(IssueError::Revoked {
            user: name.to_string(),
            at: r.at,
            by: r.by,
        }),
        _ => Err(IssueError::NoSuchUser(name.to_string())),
    }
}

fn new_id() -> String {
    pki::hex(&pki::random_bytes::<16>())
}

impl Issuer<'_> {
    pub async fn add_user(
        &self,
        spec: UserSpec,
        sink: &mut dyn Sink,
        actor: &str,
    ) -> Result<Issued, IssueError> {
        self.settings.policy.check(&spec)?;
        let mut conn = self.store.conn().await?;
        let existing = users::get(&mut conn, &spec.name).await?;
        if let Some(r) = existing.as_ref().and_then(|u| u.revoked.clone()) {
            return Err(IssueError::Revoked {
                user: spec.name,
                at: r.at,
                by: r.by,
            });
        }
        if let Some(existing) = existing
            && existing.state == "active"
        {
            if credentials::current(&mut conn, &spec.name).await?.is_some() {
                return Err(IssueError::UserExists(spec.name));
            }
            // An add-user that died before delivering: the same command finishes it.
            if existing.spec != spec {
                return Err(IssueError::SpecMismatch {
                    user: spec.name.clone(),
                    differs: describe_diff(&existing.spec, &spec),
                });
            }
        }
        drop(conn);
        self.issue(spec, Kind::AddUser, None, sink, actor).await
    }

    pub async fn rotate(
        &self,
        user: &str,
        sink: &mut dyn Sink,
        actor: &str,
    ) -> Result<Issued, IssueError> {
        self.rotate_replacing(user, None, sink, actor).await
    }

    /// A rotation decided from what the database said earlier (the daemon's
    /// pass): with `replacing`, the attempt is planned only if that credential
    /// is still current, in the planning transaction, so a revoke that ran
    /// since the pass read it wins.
    pub async fn rotate_replacing(
        &self,
        user: &str,
        replacing: Option<&str>,
        sink: &mut dyn Sink,
        actor: &str,
    ) -> Result<Issued, IssueError> {
        let u = issuable(users::find(self.store, user).await?, user, replacing)?;
        // Policy may have tightened since the user was added: re-check.
        self.settings.policy.check(&u.spec)?;
        self.issue(u.spec, Kind::Rotate, replacing, sink, actor)
            .await
    }

    async fn issue(
        &self,
        spec: UserSpec,
        kind: Kind,
        replacing: Option<&str>,
        sink: &mut dyn Sink,
        actor: &str,
    ) -> Result<Issued, IssueError> {
        sink.prepare()?;
        sink.preflight().await?;
        if let Some(done) = self.redeliver(&spec, kind, sink, actor).await? {
            return Ok(done);
        }
        self.abandon_open(Some(&spec.name), actor).await?;
        if let Err(e) = self.check_bindings(&spec).await {
            self.metrics.issuance(kind.as_str(), e.metric_label());
            warn!(user = %spec.name, error = %e, "refused before anything was signed");
            return Err(e);
        }
        let id = new_id();
        let _running = self.inflight.enter(&id);
        let generation = self
            .plan(&id, &spec, kind.as_str(), None, None, replacing, actor)
            .await?;
        let span = info_span!("issuance", user = %spec.name, credential = %id, generation);
        self.observed(
            kind.as_str(),
            span,
            self.run(&id, generation, &spec, kind, sink, actor),
        )
        .await
    }

    /// Journals a new attempt (and claims an enrollment token for the client's
    /// key, in the same transaction). With `want`, the attempt must get exactly
    /// that generation: a client's CSR already names it.
    #[allow(clippy::too_many_arguments)]
    async fn plan(
        &self,
        id: &str,
        spec: &UserSpec,
        kind: &str,
        want: Option<i64>,
        claim: Option<(&str, &str)>,
        replacing: Option<&str>,
        actor: &str,
    ) -> Result<i64, IssueError> {
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        // The credential this attempt replaces (a renewal's, or the one the
        // daemon's pass chose) must still be current now, in the transaction a
        // revoke serializes with: authorized before a revoke is not enough.
        if let Some(prev) = replacing {
            let state = credentials::get(&mut tx, prev).await?.map(|c| c.state);
            if state.as_deref() != Some("current") {
                drop(tx);
                return Err(cancelled(
                    &spec.name,
                    "",
                    format!(
                        "the credential it replaces is {} now",
                        state.as_deref().unwrap_or("gone")
                    ),
                    None,
                ));
            }
        }
        // A revoke of the user that committed before this transaction wins
        // (one that commits after it ends this attempt itself).
        if let Some(u) = users::get(&mut tx, &spec.name).await?
            && let Some(r) = u.revoked
        {
            return Err(IssueError::Revoked {
                user: spec.name.clone(),
                at: r.at,
                by: r.by,
            });
        }
        let generation = issuances::plan(
            &mut tx,
            id,
            spec,
            kind,
            self.signer.kind(),
            &self.identity.owner(),
            now,
        )
        .await?;
        if let Some(asked) = want
            && asked != generation
        {
            return Err(IssueError::GenerationStale {
                asked,
                next: generation,
            });
        }
        if let Some((token, spki)) = claim
            && !enrollments::claim(&mut tx, token, spki, now).await?
        {
            return Err(IssueError::TokenUnavailable);
        }
        audit::append(
            &mut tx,
            now,
            actor,
            "issuance.plan",
            &spec.name,
            json!({"credential": id, "generation": generation, "kind": kind, "signer": self.signer.kind()}),
        )
        .await?;
        crate::store::commit(tx).await?;
        Ok(generation)
    }

    /// Runs an attempt inside its span, counting it in the metrics.
    async fn observed(
        &self,
        kind: &str,
        span: tracing::Span,
        attempt: impl std::future::Future<Output = Result<Issued, IssueError>>,
    ) -> Result<Issued, IssueError> {
        let started = std::time::Instant::now();
        let result = attempt.instrument(span.clone()).await;
        match &result {
            Ok(_) => {
                self.metrics
                    .issuance_duration
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.issuance(kind, "success");
            }
            Err(e) => {
                self.metrics.issuance(kind, e.metric_label());
                let _g = span.enter();
                warn!(error = %e, "issuance failed");
            }
        }
        result
    }

    async fn run(
        &self,
        id: &str,
        generation: i64,
        spec: &UserSpec,
        kind: Kind,
        sink: &mut dyn Sink,
        actor: &str,
    ) -> Result<Issued, IssueError> {
        self.faults.hit(FaultPoint::AfterPlan)?;
        let key = PrivateKey::generate(spec.key_type)?;
        let mut organizations = spec.groups.clone();
        organizations.push(generation_group(&spec.name, generation, &key.spki_der()));
        let csr = pki::build_csr(&key, &pki::subject_name(&spec.name, &organizations)?)?;
        let stored = self
            .sign_and_store(
                id,
                generation,
                spec,
                kind == Kind::AddUser,
                &csr,
                &key.spki_der(),
                &organizations,
                None,
                Some(&key),
                actor,
            )
            .await?;

        self.deliver(
            id,
            spec,
            &stored.certificate_pem,
            &stored.cert.serial,
            &key,
            sink,
            actor,
            stored.lifetime_note,
        )
        .await
    }

    /// Renders the kubeconfig, delivers it, and makes the credential current. A
    /// failed delivery leaves the credential pending with its key sealed: the
    /// next attempt for the user delivers this same credential.
    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        id: &str,
        spec: &UserSpec,
        certificate_pem: &str,
        serial: &str,
        key: &PrivateKey,
        sink: &mut dyn Sink,
        actor: &str,
        lifetime_note: Option<String>,
    ) -> Result<Issued, IssueError> {
        let key_pem = key.to_pem();
        let kc = ClientKubeconfig {
            cluster_name: &self.settings.cluster.name,
            server: &self.endpoint.server,
            ca_bundle_pem: &self.endpoint.ca_pem,
            user: &spec.name,
            namespace: spec
                .namespaces
                .first()
                .map(String::as_str)
                .filter(|n| *n != crate::policy::ALL_NAMESPACES),
            certificate_pem,
            key_pem: &key_pem,
        };
        // A revoke that ran since the attempt began wins: write nothing for it.
        if let Some(reason) = self.cancelled(id).await? {
            return Err(cancelled(&spec.name, serial, reason, None));
        }
        // So does a newer generation made current meanwhile: never a rollback.
        let overtaken =
            crate::flows::rollback::overtaken(&mut *self.store.conn().await?, id).await?;
        if let Some(o) = overtaken {
            return Err(self.abandon_overtaken(id, &o, actor).await);
        }
        let delivered = match kc.render() {
            Ok(yaml) => sink.deliver(&yaml).await,
            Err(e) => Err(SinkError {
                target: sink.describe(),
                reason: e.to_string(),
                fix: "report this bug",
            }),
        };
        if let Err(e) = delivered {
            return Err(self.delivery_failed(id, &spec.name, actor, e).await);
        }
        self.faults.hit(FaultPoint::AfterDeliver)?;
        let (credential, superseded) = match self
            .activate(id, &spec.name, serial, &sink.describe(), None, actor)
            .await
        {
            Err(IssueError::Cancelled { user, reason, .. }) => {
                return Err(cancelled(&user, serial, reason, Some(sink.describe())));
            }
            other => other?,
        };
        info!(serial = %serial, to = %sink.describe(), "credential delivered and current");
        Ok(Issued {
            credential,
            superseded,
            delivered_to: sink.describe(),
            lifetime_note,
        })
    }

    /// Records a failed delivery; the credential stays pending (key sealed) and
    /// its issuance at `stored`, for the next attempt to deliver.
    async fn delivery_failed(
        &self,
        id: &str,
        user: &str,
        actor: &str,
        err: SinkError,
    ) -> IssueError {
        let reason = err.to_string();
        let reason = reason.lines().next().unwrap_or_default().to_string();
        let res: Result<(), StoreError> = async {
            let now = self.clock.now();
            let mut tx = self.store.begin().await?;
            issuances::set_step(&mut tx, id, Step::Stored, Some(&reason), now).await?;
            audit::append(
                &mut tx,
                now,
                actor,
                "delivery.fail",
                user,
                json!({"credential": id, "reason": reason, "retry": "the next rotation delivers this credential"}),
            )
            .await?;
            crate::store::commit(tx).await
        }
        .await;
        if let Err(e) = res {
            warn!(credential = %id, error = %e, "could not record the failed delivery");
        }
        err.into()
    }

    /// Delivers a credential an earlier attempt stored but could not deliver
    /// (its delivery failed, or its process died), if one is still valid for a
    /// while and no live process is on it. `None`: nothing to resume.
    async fn redeliver(
        &self,
        spec: &UserSpec,
        kind: Kind,
        sink: &mut dyn Sink,
        actor: &str,
    ) -> Result<Option<Issued>, IssueError> {
        let now = self.clock.now();
        let found = {
            let mut conn = self.store.conn().await?;
            credentials::redeliverable(&mut conn, &spec.name, now + 60).await?
        };
        let Some((cred, sealed, owner)) = found else {
            return Ok(None);
        };
        let me = self.identity.owner();
        let busy = if owner == me {
            self.inflight.contains(&cred.id)
        } else {
            self.identity.may_be_running(&owner)
        };
        if busy {
            return Ok(None);
        }
        let mut tx = self.store.begin().await?;
        if !issuances::take_over(&mut tx, &cred.id, &owner, &me, now).await? {
            return Ok(None); // another process took it first
        }
        crate::store::commit(tx).await?;
        let _running = self.inflight.enter(&cred.id);
        let span = info_span!("issuance", user = %spec.name, credential = %cred.id, generation = cred.generation);
        let attempt = async {
            let pem = self.sealing.open(&cred.id, &sealed)?;
            let pem = std::str::from_utf8(&pem).map_err(|e| pki::PkiError::Seal(e.to_string()))?;
            let key = PrivateKey::from_pem(pem, "sealed key")?;
            info!(serial = %cred.serial, "resuming the delivery of a stored credential");
            // The attempt may have died before these; both are idempotent.
            if let Err(e) = self.signer.cleanup(&cred.id).await {
                warn!(error = %e, "could not delete the CSR object; the next reconcile removes it");
            }
            if let Some(cluster) = self.cluster {
                crate::flows::bindings::sync_user(
                    self.store,
                    cluster,
                    self.settings.rotation.grace_period,
                    self.clock.now(),
                    &spec.name,
                    actor,
                    Sweep::Own,
                )
                .await?;
            }
            self.deliver(
                &cred.id,
                spec,
                &cred.certificate,
                &cred.serial,
                &key,
                sink,
                actor,
                None,
            )
            .await
        };
        self.observed(kind.as_str(), span, attempt).await.map(Some)
    }

    /// Issues a certificate for a key that never leaves the client (self-service): the
    /// CSR's subject must be exactly what policy gives the user at the generation
    /// it names, and the key of the type the user is set up for. The credential is
    /// current once stored and bound: the API response is its delivery.
    pub async fn issue_for_client(&self, req: ClientRequest<'_>) -> Result<Issued, IssueError> {
        let u = issuable(
            users::find(self.store, req.user).await?,
            req.user,
            req.renewed_from,
        )?;
        let spec = u.spec;
        self.settings.policy.check(&spec)?;
        let mut organizations = spec.groups.clone();
        organizations.push(generation_group(
            &spec.name,
            req.generation,
            &req.csr.spki_der,
        ));
        check_client_csr(req.csr, &spec, &organizations)?;
        let spki = pki::hex(&pki::sha256(&req.csr.spki_der));
        self.abandon_open(Some(&spec.name), req.actor).await?;
        if let Err(e) = self.check_bindings(&spec).await {
            self.metrics.issuance("renew", e.metric_label());
            return Err(e);
        }
        let id = new_id();
        let _running = self.inflight.enter(&id);
        let claim = req.token.map(|t| (t, spki.as_str()));
        self.plan(
            &id,
            &spec,
            "renew",
            Some(req.generation),
            claim,
            req.renewed_from,
            req.actor,
        )
        .await?;
        let span = info_span!("issuance", user = %spec.name, credential = %id, generation = req.generation);
        let attempt = async {
            self.faults.hit(FaultPoint::AfterPlan)?;
            let stored = self
                .sign_and_store(
                    &id,
                    req.generation,
                    &spec,
                    false,
                    &req.csr.der,
                    &req.csr.spki_der,
                    &organizations,
                    req.renewed_from,
                    None,
                    req.actor,
                )
                .await?;
            let (credential, superseded) = self
                .activate(
                    &id,
                    &spec.name,
                    &stored.cert.serial,
                    req.delivered_to,
                    req.token,
                    req.actor,
                )
                .await?;
            info!(serial = %stored.cert.serial, to = %req.delivered_to, "client credential issued and current");
            Ok(Issued {
                credential,
                superseded,
                delivered_to: req.delivered_to.to_string(),
                lifetime_note: stored.lifetime_note,
            })
        };
        self.observed("renew", span, attempt).await
    }

    /// Signs `csr`, checks the certificate, stores it as pending, removes the
    /// signer's objects and binds the new generation group: everything up to
    /// delivery.
    #[allow(clippy::too_many_arguments)]
    async fn sign_and_store(
        &self,
        id: &str,
        generation: i64,
        spec: &UserSpec,
        adds_user: bool,
        csr: &[u8],
        spki_der: &[u8],
        organizations: &[String],
        renewed_from: Option<&str>,
        seal: Option<&PrivateKey>,
        actor: &str,
    ) -> Result<Stored, IssueError> {
        let ttl = Duration::from_secs(spec.ttl_seconds);
        let started = std::time::Instant::now();
        let req = SignRequest {
            credential_id: id,
            user: &spec.name,
            organizations,
            csr_der: csr,
            ttl,
        };
        let journal = Journal {
            store: self.store,
            clock: self.clock,
            faults: self.faults,
            id,
        };
        let signed = match self.signer.sign(req, &journal).await {
            Ok(s) => s,
            // A revoke ended the attempt while the signer ran: say so, not "journal".
            Err(e) if matches!(self.cancelled(id).await, Ok(Some(_))) => {
                if let Err(c) = self.signer.cleanup(id).await {
                    warn!(error = %c, "could not delete the CSR object; the next command for the user or the next reconcile removes it");
                }
                warn!(error = %e, "signing stopped: the attempt was ended");
                return Err(self.ended(id, &spec.name, "", None).await);
            }
            Err(e) => return Err(self.fail(id, &spec.name, actor, e.into()).await),
        };
        self.faults.hit(FaultPoint::AfterSign)?;

        let now = self.clock.now();
        let expected = Expected {
            spki_der,
            common_name: &spec.name,
            organizations,
        };
        let cert = match pki::verify_issued(
            &signed.certificate_pem,
            &expected,
            self.signer.ca_bundle_pem(),
            now,
        ) {
            Ok(c) => c,
            Err(e) => return Err(self.fail(id, &spec.name, actor, e.into()).await),
        };
        // The signer backdates notBefore for clock skew; that is not extra lifetime.
        let usable = cert.not_after - now;
        let max = self.settings.policy.max_ttl.as_secs() as i64;
        if usable > max + 60 {
            return Err(self
                .fail(
                    id,
                    &spec.name,
                    actor,
                    IssueError::LifetimeTooLong { got: usable, max },
                )
                .await);
        }
        let lifetime_note = (usable + 60 < spec.ttl_seconds as i64).then(|| {
            format!(
                "the signer granted {}s of the {}s asked for (notAfter {})",
                usable, spec.ttl_seconds, cert.not_after
            )
        });
        self.faults.hit(FaultPoint::BeforeStore)?;

        let mut tx = self.store.begin().await?;
        if adds_user {
            let existed = users::get(&mut tx, &spec.name).await?.is_some();
            users::upsert_active(&mut tx, spec, now).await?;
            audit::append(
                &mut tx,
                now,
                actor,
                "user.add",
                &spec.name,
                json!({"groups": spec.groups, "namespaces": spec.namespaces, "role": spec.role, "readded": existed}),
            )
            .await?;
        }
        let spki_sha256 = pki::hex(&pki::sha256(spki_der));
        let new = NewCredential {
            id,
            user_name: &spec.name,
            generation,
            serial: &cert.serial,
            fingerprint: &cert.fingerprint,
            not_before: cert.not_before,
            not_after: cert.not_after,
            signer: self.signer.kind(),
            csr_name: None,
            key_type: spec.key_type.as_str(),
            certificate: &signed.certificate_pem,
            spki_sha256: &spki_sha256,
            renewed_from,
            generation_group: organizations.last().map(String::as_str).unwrap_or_default(),
        };
        credentials::insert_pending(&mut tx, &new, now).await?;
        // Kept (sealed) until delivered, so a failed delivery can be retried.
        if let Some(key) = seal {
            let sealed = self.sealing.seal(id, key.to_pem().as_bytes())?;
            credentials::set_sealed_key(&mut tx, id, &sealed).await?;
        }
        if !issuances::set_step(&mut tx, id, Step::Stored, None, now).await? {
            drop(tx); // nothing of this attempt is stored
            if let Err(e) = self.signer.cleanup(id).await {
                warn!(error = %e, "could not delete the CSR object; the next command for the user or the next reconcile removes it");
            }
            return Err(self.ended(id, &spec.name, &cert.serial, None).await);
        }
        audit::append(
            &mut tx,
            now,
            actor,
            "credential.issue",
            &spec.name,
            json!({
                "credential": id, "generation": generation, "serial": cert.serial, "fingerprint": cert.fingerprint,
                "not_before": cert.not_before, "not_after": cert.not_after, "signer": self.signer.kind(),
                "signing_ms": started.elapsed().as_millis() as u64, "lifetime_note": lifetime_note,
                "renewed_from": renewed_from,
            }),
        )
        .await?;
        if let Err(e) = crate::store::commit(tx).await {
            // Not stored (a deposed leader's fenced commit, a lost database): the
            // CSR object is stray now. Had the commit landed after all, the CSR
            // would have done its job: deleting it is right either way.
            if let Err(c) = self.signer.cleanup(id).await {
                warn!(error = %c, "could not delete the CSR object; the next command for the user or the next reconcile removes it");
            }
            return Err(e.into());
        }
        info!(serial = %cert.serial, not_after = cert.not_after, "credential stored");
        self.faults.hit(FaultPoint::AfterStore)?;
        // The certificate is ours now; the CSR object has done its job.
        if let Err(e) = self.signer.cleanup(id).await {
            warn!(error = %e, "could not delete the CSR object; the cluster's csrcleaner or the next reconcile removes it");
        }
        // The new generation group must be bound before the credential is handed out.
        if let Some(cluster) = self.cluster {
            let grace = self.settings.rotation.grace_period;
            if let Err(e) = crate::flows::bindings::sync_user(
                self.store,
                cluster,
                grace,
                self.clock.now(),
                &spec.name,
                actor,
                Sweep::Own,
            )
            .await
            {
                return Err(self.fail(id, &spec.name, actor, e.into()).await);
            }
        }
        Ok(Stored {
            cert,
            certificate_pem: signed.certificate_pem,
            lifetime_note,
        })
    }

    /// Makes a delivered credential current, superseding the previous one (and
    /// burning the enrollment token it came with) in one transaction.
    async fn activate(
        &self,
        id: &str,
        user: &str,
        serial: &str,
        delivered_to: &str,
        token: Option<&str>,
        actor: &str,
    ) -> Result<(Credential, Vec<String>), IssueError> {
        let now = self.clock.now();
        let mut tx = self.store.begin().await?;
        if let Some(o) = crate::flows::rollback::overtaken(&mut tx, id).await? {
            drop(tx);
            return Err(self.abandon_overtaken(id, &o, actor).await);
        }
        // Conditional, in the one transaction that decides: only from pending,
        // only for an active user, only if no revoke ended the attempt and no
        // newer generation was made current. The previous credential is
        // superseded first (one current per user); a refusal rolls that back
        // with the rest.
        let open = issuances::get(&mut tx, id)
            .await?
            .is_some_and(|i| !matches!(i.step.as_str(), "delivered" | "failed" | "abandoned"));
        let previous = credentials::current(&mut tx, user).await?;
        let mut superseded = Vec::new();
        if open && let Some(prev) = previous {
            credentials::set_state(
                &mut tx,
                &prev.id,
                "superseded",
                Some(&format!("superseded by {serial}")),
                now,
            )
            .await?;
            superseded.push(prev.serial);
        }
        if !open || !credentials::activate_pending(&mut tx, id, now).await? {
            drop(tx);
            return Err(self.ended(id, user, serial, None).await);
        }
        if !issuances::set_step(&mut tx, id, Step::Delivered, None, now).await? {
            return Err(IssueError::Preempted(id.to_string()));
        }
        if let Some(t) = token {
            enrollments::mark_used(&mut tx, t, id, now).await?;
        }
        audit::append(
            &mut tx,
            now,
            actor,
            "credential.activate",
            user,
            json!({"credential": id, "serial": serial, "delivered_to": delivered_to, "superseded": superseded, "enrollment_token": token}),
        )
        .await?;
        let credential = credentials::get(&mut tx, id)
            .await?
            .ok_or_else(|| StoreError::Invalid("credential vanished".into()))?;
        crate::store::commit(tx).await?;
        Ok((credential, superseded))
    }

    /// Why the attempt may no longer finish (a revoke or remove-user ended it,
    /// or its user is no longer active), if it may not.
    async fn cancelled(&self, id: &str) -> Result<Option<String>, IssueError> {
        let mut conn = self.store.conn().await?;
        let Some(i) = issuances::get(&mut conn, id).await? else {
            return Ok(Some("its journal entry is gone".into()));
        };
        if matches!(i.step.as_str(), "failed" | "abandoned") {
            return Ok(Some(
                i.error.unwrap_or_else(|| format!("it was {}", i.step)),
            ));
        }
        let stored = credentials::get(&mut conn, id).await?;
        // An add-user makes (or re-activates) its user only when it stores the
        // credential: before that the user's record says nothing about it.
        if stored.is_some() || i.kind != "add-user" {
            match users::get(&mut conn, &i.user_name).await? {
                Some(u) if u.state == "active" => {}
                Some(users::User {
                    revoked: Some(r), ..
                }) => {
                    return Ok(Some(format!(
                        "the user was revoked at {} by {}",
                        crate::support::clock::rfc3339(r.at),
                        r.by
                    )));
                }
                Some(u) => return Ok(Some(format!("the user is {}", u.state))),
                None => return Ok(Some("the user does not exist".into())),
            }
        }
        if let Some(c) = stored
            && c.state != "pending"
        {
            return Ok(Some(format!(
                "the credential is {}{}",
                c.state,
                c.state_reason
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )));
        }
        Ok(None)
    }

    /// The error for an attempt a revoke (or remove-user) ended, with its reason.
    async fn ended(
        &self,
        id: &str,
        user: &str,
        serial: &str,
        written: Option<String>,
    ) -> IssueError {
        let reason = match self.cancelled(id).await {
            Ok(Some(r)) => r,
            Ok(None) => "it was ended by another process".into(),
            Err(e) => e.to_string(),
        };
        warn!(credential = %id, %reason, "issuance lost the race with a revoke; nothing was made current");
        cancelled(user, serial, reason, written)
    }

    /// Records a failed attempt (journal, credential if stored, audit) and gives the error back.
    async fn fail(&self, id: &str, user: &str, actor: &str, err: IssueError) -> IssueError {
        let reason = err.to_string();
        let reason = reason.lines().next().unwrap_or_default();
        if let Err(e) = self.signer.cleanup(id).await {
            warn!(credential = %id, error = %e, "could not clean up the signer's objects; the next attempt retries");
        }
        let res: Result<(), StoreError> = async {
            let now = self.clock.now();
            let mut tx = self.store.begin().await?;
            issuances::set_step(&mut tx, id, Step::Failed, Some(reason), now).await?;
            // A credential a revoke already took keeps that state.
            if credentials::get(&mut tx, id)
                .await?
                .is_some_and(|c| c.state == "pending")
            {
                credentials::set_state(&mut tx, id, "failed", Some(reason), now).await?;
            }
            audit::append(
                &mut tx,
                now,
                actor,
                "issuance.fail",
                user,
                json!({"credential": id, "reason": reason}),
            )
            .await?;
            crate::store::commit(tx).await?;
            Ok(())
        }
        .await;
        if let Err(e) = res {
            warn!(credential = %id, error = %e, "could not record the failure; the next attempt will abandon it");
        }
        err
    }

    /// Deletes this instance's CSR objects for `user` that no open attempt is
    /// waiting for: an earlier attempt that failed while the API server was
    /// unreachable could not delete its own.
    async fn remove_stray_csrs(&self, user: &str, cluster: &crate::cluster::Cluster) {
        // CSRs first, then the journal: an attempt journals itself before it
        // creates its CSR, so every CSR listed here has its attempt in `open`.
        let names = match cluster.managed_csrs(Some(user)).await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "could not list the user's CSR objects; a later run retries");
                return;
            }
        };
        let stray = match stray_csrs(self.store, names, Some(user)).await {
            Ok(s) => s,
            Err(_) => return,
        };
        for n in &stray {
            match cluster.delete_csr(n).await {
                Ok(()) => info!(csr = %n, "deleted a CSR object an earlier attempt left"),
                Err(e) => {
                    warn!(csr = %n, error = %e, "could not delete a stray CSR object; a later run retries")
                }
            }
        }
    }

    /// Before a generation is planned or anything signed: can the user's
    /// bindings be written (kubernetes signer)? A missing namespace, a clashing
    /// binding or a role rotator may not bind fails here, costing nothing.
    async fn check_bindings(&self, spec: &UserSpec) -> Result<(), IssueError> {
        let Some(cluster) = self.cluster else {
            return Ok(());
        };
        let scope = crate::cluster::rbac::Scope::of(&spec.namespaces);
        cluster
            .check_user_bindings(&spec.name, &scope, &spec.role)
            .await
            .map_err(|e| IssueError::Access(e.into()))
    }

    /// Abandons every unfinished attempt (for one user, or all) that no process is
    /// still running: their keys are gone, so they can only be cleaned up.
    /// Returns how many were abandoned.
    pub async fn abandon_open(&self, user: Option<&str>, actor: &str) -> Result<usize, IssueError> {
        let open = {
            let mut conn = self.store.conn().await?;
            issuances::open_for_user(&mut conn, user).await?
        };
        let now = self.clock.now();
        let me = self.identity.owner();
        let open: Vec<_> = open
            .into_iter()
            .filter(|i| {
                if i.owner == me {
                    !self.inflight.contains(&i.id)
                } else {
                    !self.identity.may_be_running(&i.owner)
                        || i.updated_at < now - STALE_AFTER_SECONDS
                }
            })
            .collect();
        let mut abandoned = 0;
        for i in &open {
            // Outside objects first: if this fails, the journal still says open and a later run retries.
            self.signer.cleanup(&i.id).await?;
            let overtaken =
                crate::flows::rollback::overtaken(&mut *self.store.conn().await?, &i.id).await?;
            if let Some(o) = overtaken {
                self.abandon_overtaken(&i.id, &o, actor).await;
                abandoned += 1;
                continue;
            }
            let now = self.clock.now();
            let mut tx = self.store.begin().await?;
            if !issuances::set_step(
                &mut tx,
                &i.id,
                Step::Abandoned,
                Some(&format!("abandoned at step {}", i.step)),
                now,
            )
            .await?
            {
                continue; // it finished or failed meanwhile
            }
            abandoned += 1;
            if credentials::get(&mut tx, &i.id).await?.is_some() {
                credentials::set_state(
                    &mut tx,
                    &i.id,
                    "failed",
                    Some("abandoned before delivery; its key was lost"),
                    now,
                )
                .await?;
            }
            audit::append(
                &mut tx,
                now,
                actor,
                "issuance.abandon",
                &i.user_name,
                json!({"credential": i.id, "generation": i.generation, "step": i.step}),
            )
            .await?;
            crate::store::commit(tx).await?;
            warn!(user = %i.user_name, credential = %i.id, step = %i.step, "abandoned an interrupted issuance");
        }
        // Only an attempt that ended without being delivered can have left a
        // CSR object behind: a user with none (new, or every attempt delivered)
        // costs no listing of the cluster's CSRs.
        if let (Some(user), Some(cluster)) = (user, self.cluster) {
            let mut conn = self.store.conn().await?;
            let may_have_left = issuances::any_ended_undelivered(&mut conn, user).await?;
            drop(conn);
            if abandoned > 0 || may_have_left {
                self.remove_stray_csrs(user, cluster).await;
            }
        }
        Ok(abandoned)
    }
}

/// Of the CSR objects listed (after listing them, the journal is read: an
/// attempt journals itself before it creates its CSR), those no open attempt
/// waits for. An object without the instance annotation counts only if its
/// name comes from an issuance in this database.
pub(crate) async fn stray_csrs(
    store: &Store,
    listed: Vec<(String, bool)>,
    user: Option<&str>,
) -> Result<Vec<String>, StoreError> {
    if listed.is_empty() {
        return Ok(Vec::new());
    }
    let mut conn = store.conn().await?;
    let open: Vec<String> = issuances::open_for_user(&mut conn, user)
        .await?
        .into_iter()
        .map(|i| {
            i.csr_name
                .unwrap_or_else(|| crate::cluster::csr::csr_name(&i.id))
        })
        .collect();
    let mut stray = Vec::new();
    for (name, annotated) in listed {
        if open.contains(&name) {
            continue;
        }
        let ours = annotated
            || match name.strip_prefix("rotator-") {
                Some(id) => issuances::get(&mut conn, id).await?.is_some(),
                None => false,
            };
        if ours {
            stray.push(name);
        }
    }
    Ok(stray)
}

fn cancelled(user: &str, serial: &str, reason: String, written: Option<String>) -> IssueError {
    let serial = if serial.is_empty() {
        "not signed".to_string()
    } else {
        format!("serial {serial}")
    };
    let (written, fix) = match written {
        Some(to) => (
            format!(
                "The kubeconfig had already been written to {to}, but its credential is revoked and grants nothing.\n"
            ),
            "delete that kubeconfig; the attempt was ended by a revoke, a remove-user or another process (the reason above), and a revoke always wins over an issuance in flight (rotate, or add the user again, if access is wanted)",
        ),
        None => (
            "No kubeconfig was written.\n".to_string(),
            "nothing to clean up; the attempt was ended by a revoke, a remove-user or another process (the reason above), and a revoke always wins over an issuance in flight (rotate, or add the user again, if access is wanted)",
        ),
    };
    IssueError::Cancelled {
        user: user.to_string(),
        serial,
        reason,
        written,
        fix,
    }
}

pub(crate) fn describe_diff(a: &UserSpec, b: &UserSpec) -> String {
    let mut d = Vec::new();
    if a.groups != b.groups {
        d.push(format!("groups {:?} vs {:?}", a.groups, b.groups));
    }
    if a.namespaces != b.namespaces {
        d.push(format!(
            "namespaces {:?} vs {:?}",
            a.namespaces, b.namespaces
        ));
    }
    if a.role != b.role {
        d.push(format!("role {:?} vs {:?}", a.role, b.role));
    }
    if a.key_type != b.key_type {
        d.push(format!("key type {} vs {}", a.key_type, b.key_type));
    }
    if a.ttl_seconds != b.ttl_seconds {
        d.push(format!("ttl {}s vs {}s", a.ttl_seconds, b.ttl_seconds));
    }
    d.join("; ")
}
