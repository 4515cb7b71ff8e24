//! RoleBindings rotator manages: one per user and namespace, named
//! `rotator:<user>`, labelled as rotator's, whose subjects are the generation
//! groups of the user's live credentials. rotator never changes a binding it did
//! not create.
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

use super::{
    Backoff, Cluster, ClusterError, MANAGED_BY, USER_LABEL, is_not_found, retry, user_hash,
};

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";

pub fn binding_name(user: &str) -> String {
    format!("rotator:{user}")
}

/// What a sync changed, for the audit log.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
    /// Bindings rotator did not make from which it took revoked generation groups.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub swept: Vec<String>,
    /// Such bindings it could not change (reported, never retried into a loop).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unswept: Vec<String>,
    /// The user's own bindings that could not be synced, each on its own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<SyncFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncFailure {
    /// `NAMESPACE/NAME` or `cluster/NAME`.
    pub binding: String,
    pub reason: String,
    /// The namespace (or the object) does not exist.
    pub not_found: bool,
}

impl SyncReport {
    /// Whether the cluster changed.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty()
            && self.updated.is_empty()
            && self.deleted.is_empty()
            && self.swept.is_empty()
    }
}

/// RoleBinding and ClusterRoleBinding alike: rotator handles both the same way.
pub trait Binding:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    const KIND: &'static str;
    fn build(meta: ObjectMeta, role_ref: RoleRef, subjects: Vec<Subject>) -> Self;
    fn role_ref(&self) -> &RoleRef;
    fn subjects(&self) -> &[Subject];
}

impl Binding for RoleBinding {
    const KIND: &'static str = "RoleBinding";
    fn build(metadata: ObjectMeta, role_ref: RoleRef, subjects: Vec<Subject>) -> Self {
        RoleBinding {
            metadata,
            role_ref,
            subjects: Some(subjects),
        }
    }
    fn role_ref(&self) -> &RoleRef {
        &self.role_ref
    }
    fn subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
}

impl Binding for ClusterRoleBinding {
    const KIND: &'static str = "ClusterRoleBinding";
    fn build(metadata: ObjectMeta, role_ref: RoleRef, subjects: Vec<Subject>) -> Self {
        ClusterRoleBinding {
            metadata,
            role_ref,
            subjects: Some(subjects),
        }
    }
    fn role_ref(&self) -> &RoleRef {
        &self.role_ref
    }
    fn subjects(&self) -> &[Subject] {
        self.subjects.as_deref().unwrap_or_default()
    }
}

fn is_managed<K: Binding>(b: &K) -> bool {
    b.meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1)
}

/// Who made a binding, as far as rotator can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// This instance: its instance annotation.
    Us,
    /// rotator's label and no instance annotation: made before annotations
    /// existed (or forged). Adopted where the user's own binding belongs, and
    /// annotated then; never deleted on the label's word alone.
    Legacy,
    /// Another rotator instance (another database) made it.
    Other(String),
    Foreign,
}

impl Cluster {
    fn owner<K: Binding>(&self, b: &K) -> Owner {
        let annotated = b
            .meta()
            .annotations
            .as_ref()
            .and_then(|a| a.get(super::INSTANCE_ANNOTATION));
        match annotated {
            Some(i) if *i == self.instance => Owner::Us,
            Some(i) => Owner::Other(i.clone()),
            None if is_managed(b) => Owner::Legacy,
            None => Owner::Foreign,
        }
    }
}

fn subjects(groups: &[String]) -> Vec<Subject> {
    groups
        .iter()
        .map(|g| Subject {
            kind: "Group".into(),
            name: g.clone(),
            api_group: Some(RBAC_GROUP.into()),
            namespace: None,
        })
        .collect()
}

fn desired<K: Binding>(cluster: &Cluster, user: &str, role: &str, groups: &[String]) -> K {
    K::build(
        cluster.owned_meta(&binding_name(user), user),
        RoleRef {
            api_group: Some(RBAC_GROUP.into()),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects(groups),
    )
}

/// Where a user's role is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One RoleBinding per namespace.
    Namespaces(Vec<String>),
    /// One ClusterRoleBinding (only where policy allows it).
    Cluster,
}

impl Scope {
    /// The scope a user's namespaces (as the database holds them) ask for.
    pub fn of(namespaces: &[String]) -> Self {
        if namespaces
            .iter()
            .any(|n| n == crate::policy::ALL_NAMESPACES)
        {
            Scope::Cluster
        } else {
            Scope::Namespaces(namespaces.to_vec())
        }
    }
}

async fn delete_one<K: Binding>(api: &Api<K>, name: &str, what: &str) -> Result<(), ClusterError> {
    retry(&format!("deleting {what}"), Backoff::default(), || async {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
}

async fn read_one<K: Binding>(
    api: &Api<K>,
    name: &str,
    what: &str,
) -> Result<Option<K>, ClusterError> {
    retry(&format!("reading {what}"), Backoff::default(), || async {
        match api.get(name).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await
}

fn not_ours(what: &str, owner: &Owner) -> ClusterError {
    match owner {
        Owner::Other(i) => ClusterError::Conflict(format!(
            "{what} was made by another rotator instance ({i})\nfix: two rotator databases manage the same user name; remove the user from one of them, or rename it"
        )),
        _ => ClusterError::Conflict(format!(
            "{what} exists and was not made by rotator\nfix: rotator never takes over a binding it did not create; rename or remove that binding"
        )),
    }
}

impl Cluster {
    /// Makes one binding say `want` (or not exist when `groups` is empty). Returns
    /// what it did: "created", "updated", "deleted", or None.
    async fn sync_one<K: Binding>(
        &self,
        api: &Api<K>,
        want: &K,
        groups_empty: bool,
        what: &str,
    ) -> Result<Option<&'static str>, ClusterError> {
        let name = want.meta().name.clone().unwrap_or_default();
        let pp = PostParams::default();
        let current = read_one(api, &name, what).await?;
        if let Some(b) = &current {
            let owner = self.owner(b);
            if !matches!(owner, Owner::Us | Owner::Legacy) {
                return Err(not_ours(what, &owner));
            }
        }
        Ok(match current {
            None if groups_empty => None,
            None => {
                retry(&format!("creating {what}"), Backoff::default(), || {
                    api.create(&pp, want)
                })
                .await?;
                Some("created")
            }
            Some(_) if groups_empty => {
                delete_one(api, &name, what).await?;
                Some("deleted")
            }
            Some(b) if b.role_ref() != want.role_ref() => {
                // roleRef is immutable: replace the binding.
                delete_one(api, &name, what).await?;
                retry(&format!("creating {what}"), Backoff::default(), || {
                    api.create(&pp, want)
                })
                .await?;
                Some("updated")
            }
            // A stripped label (or a missing annotation) is put back with the subjects.
            Some(b)
                if b.subjects() != want.subjects()
                    || !is_managed(&b)
                    || !self.owns(b.meta())
                    || b.meta()
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(super::INSTANCE_ANNOTATION))
                        .is_none() =>
            {
                let mut next = want.clone();
                next.meta_mut().resource_version = b.meta().resource_version.clone();
                match retry(&format!("updating {what}"), Backoff::default(), || {
                    api.replace(&name, &pp, &next)
                })
                .await
                {
                    Ok(_) => Some("updated"),
                    // Someone changed it since we read it: the next sync (or reconcile) repairs it.
                    Err(ClusterError::Api { code: 409, .. }) => {
                        return Err(ClusterError::Conflict(format!(
                            "{what} changed while rotator updated it\nfix: run the command again"
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
            Some(_) => None,
        })
    }

    /// Before anything is signed: could the user's bindings be written? A
    /// namespace that does not exist, a binding of that name rotator did not
    /// make, or a role rotator may not bind (the escalation check) is found
    /// here, by reading and by a server-side dry run, instead of after a
    /// certificate exists.
    pub async fn check_user_bindings(
        &self,
        user: &str,
        scope: &Scope,
        role: &str,
    ) -> Result<(), ClusterError> {
        let name = binding_name(user);
        // The dry run needs a subject; it is never stored.
        let probe = [format!(
            "{}{user}:0",
            crate::policy::GENERATION_GROUP_PREFIX
        )];
        match scope {
            Scope::Namespaces(namespaces) => {
                for ns in namespaces {
                    let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), ns);
                    let what = format!("RoleBinding {ns}/{name}");
                    match read_one(&api, &name, &what).await {
                        Ok(Some(b)) => {
                            let owner = self.owner(&b);
                            if !matches!(owner, Owner::Us | Owner::Legacy) {
                                return Err(not_ours(&what, &owner));
                            }
                            if b.role_ref().name == role {
                                continue;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => return Err(e),
                    }
                    let want = desired::<RoleBinding>(self, user, role, &probe);
                    let mut want = want;
                    want.metadata.name = Some(format!("{name}:dry-run"));
                    dry_run_create(&api, &want, &what, ns, role).await?;
                }
            }
            Scope::Cluster => {
                let api: Api<ClusterRoleBinding> = Api::all(self.client.clone());
                let what = format!("ClusterRoleBinding {name}");
                // Cluster-wide users need rbac-cluster-wide.yaml, which grants `get`.
                if let Some(b) = read_one(&api, &name, &what).await? {
                    let owner = self.owner(&b);
                    if !matches!(owner, Owner::Us | Owner::Legacy) {
                        return Err(not_ours(&what, &owner));
                    }
                    if b.role_ref().name == role {
                        return Ok(());
                    }
                }
                let mut want = desired::<ClusterRoleBinding>(self, user, role, &probe);
                want.metadata.name = Some(format!("{name}:dry-run"));
                dry_run_create(&api, &want, &what, "", role).await?;
            }
        }
        Ok(())
    }
}

async fn dry_run_create<K: Binding>(
    api: &Api<K>,
    want: &K,
    what: &str,
    ns: &str,
    role: &str,
) -> Result<(), ClusterError> {
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let r = retry(&format!("checking {what}"), Backoff::default(), || async {
        match api.create(&dry, want).await {
            Ok(_) => Ok(()),
            Err(e) if super::is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await;
    match r {
        Err(ClusterError::Api { code: 404, .. }) if !ns.is_empty() => {
            Err(ClusterError::Conflict(format!(
                "namespace {ns:?} does not exist, so {what} cannot be made\nfix: create the namespace, or change the user's namespaces (remove-user and add-user again)"
            )))
        }
        Err(ClusterError::Api {
            code: 403, message, ..
        }) => Err(ClusterError::Forbidden(format!(
            "rotator may not bind ClusterRole {role:?} ({what}): {message}\nfix: grant rotator's service account `bind` on clusterroles/{role} (deploy/kubernetes/rbac.yaml lists the roles), or choose a role it may bind"
        ))),
        other => other,
    }
}

fn record(report: &mut SyncReport, done: Option<&'static str>, what: String) {
    match done {
        Some("created") => report.created.push(what),
        Some("updated") => report.updated.push(what),
        Some("deleted") => report.deleted.push(what),
        _ => {}
    }
}

fn fail(report: &mut SyncReport, what: String, e: ClusterError) {
    let reason = e.to_string();
    report.failed.push(SyncFailure {
        binding: what,
        reason: reason.lines().next().unwrap_or_default().to_string(),
        not_found: matches!(e, ClusterError::Api { code: 404, .. }),
    });
}

impl Cluster {
    /// Makes the user's bindings say exactly `groups` in `scope` (nothing when
    /// `groups` is empty), and removes rotator's bindings for them elsewhere.
    /// Each binding is synced on its own: one that fails (a deleted namespace)
    /// is reported in `failed` and never keeps the others, or a removal, from
    /// happening. With `take_away`, those groups are also taken out of any
    /// other binding that names them (someone copied a generation group into
    /// a binding of their own, or stripped rotator's marks from its binding).
    pub async fn sync_user_bindings(
        &self,
        user: &str,
        scope: &Scope,
        role: &str,
        groups: &[String],
        take_away: &[String],
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let name = binding_name(user);
        let mine = ListParams::default().labels(&format!(
            "{}={},{}={}",
            MANAGED_BY.0,
            MANAGED_BY.1,
            USER_LABEL,
            user_hash(user)
        ));
        let namespaces: &[String] = match scope {
            Scope::Namespaces(ns) => ns,
            Scope::Cluster => &[],
        };
        for ns in namespaces {
            let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), ns);
            let what = format!("RoleBinding {ns}/{name}");
            match self
                .sync_one(
                    &api,
                    &desired::<RoleBinding>(self, user, role, groups),
                    groups.is_empty(),
                    &what,
                )
                .await
            {
                Ok(done) => record(&mut report, done, format!("{ns}/{name}")),
                Err(e) => fail(&mut report, format!("{ns}/{name}"), e),
            }
        }
        let crbs: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        if *scope == Scope::Cluster {
            let what = format!("ClusterRoleBinding {name}");
            match self
                .sync_one(
                    &crbs,
                    &desired::<ClusterRoleBinding>(self, user, role, groups),
                    groups.is_empty(),
                    &what,
                )
                .await
            {
                Ok(done) => record(&mut report, done, format!("cluster/{name}")),
                Err(e) => fail(&mut report, format!("cluster/{name}"), e),
            }
        } else {
            // Listing is enough to find one rotator made earlier; reading it by name would need `get`.
            match retry(
                &format!("listing {user}'s ClusterRoleBindings"),
                Backoff::default(),
                || crbs.list(&mine),
            )
            .await
            {
                Ok(list) => {
                    for b in list
                        .items
                        .into_iter()
                        .filter(|b| self.owner(b) == Owner::Us)
                    {
                        let n = b.metadata.name.clone().unwrap_or_default();
                        match delete_one(&crbs, &n, &format!("ClusterRoleBinding {n}")).await {
                            Ok(()) => report.deleted.push(format!("cluster/{n}")),
                            Err(e) => fail(&mut report, format!("cluster/{n}"), e),
                        }
                    }
                }
                Err(e) => fail(&mut report, "cluster/*".into(), e),
            }
        }
        // The user's RoleBindings in namespaces they no longer have.
        let all: Api<RoleBinding> = Api::all(self.client.clone());
        match retry(
            &format!("listing {user}'s RoleBindings"),
            Backoff::default(),
            || all.list(&mine),
        )
        .await
        {
            Ok(existing) => {
                for rb in existing
                    .items
                    .into_iter()
                    .filter(|b| self.owner(b) == Owner::Us)
                {
                    let ns = rb.metadata.namespace.clone().unwrap_or_default();
                    let n = rb.metadata.name.clone().unwrap_or_default();
                    if namespaces.contains(&ns) && n == name {
                        continue;
                    }
                    let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), &ns);
                    match delete_one(&api, &n, &format!("RoleBinding {ns}/{n}")).await {
                        Ok(()) => report.deleted.push(format!("{ns}/{n}")),
                        Err(e) => fail(&mut report, format!("{ns}/{n}"), e),
                    }
                }
            }
            Err(e) => fail(&mut report, "*/".to_string() + &name, e),
        }
        if !take_away.is_empty() {
            self.sweep(user, take_away, &mut report).await;
        }
        report
    }

    /// Takes `groups` out of every binding other than the user's own that
    /// names them. A binding rotator may not change (a role it may not bind)
    /// is reported in `unswept`: access it grants is not rotator's to remove.
    async fn sweep(&self, user: &str, groups: &[String], report: &mut SyncReport) {
        let lp = ListParams::default();
        let own = binding_name(user);
        let rbs: Api<RoleBinding> = Api::all(self.client.clone());
        match retry("listing RoleBindings", Backoff::default(), || rbs.list(&lp)).await {
            Ok(list) => {
                for b in list.items {
                    let ns = b.metadata.namespace.clone().unwrap_or_default();
                    let n = b.metadata.name.clone().unwrap_or_default();
                    if n == own && matches!(self.owner(&b), Owner::Us | Owner::Legacy) {
                        continue;
                    }
                    let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), &ns);
                    self.sweep_one(&api, b, groups, format!("{ns}/{n}"), report)
                        .await;
                }
            }
            Err(e) => sweep_failed(report, "RoleBindings (listing them)".into(), e),
        }
        let crbs: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        match retry("listing ClusterRoleBindings", Backoff::default(), || {
            crbs.list(&lp)
        })
        .await
        {
            Ok(list) => {
                for b in list.items {
                    let n = b.metadata.name.clone().unwrap_or_default();
                    if n == own && matches!(self.owner(&b), Owner::Us | Owner::Legacy) {
                        continue;
                    }
                    self.sweep_one(&crbs, b, groups, format!("cluster/{n}"), report)
                        .await;
                }
            }
            Err(e) => sweep_failed(report, "ClusterRoleBindings (listing them)".into(), e),
        }
    }

    async fn sweep_one<K: Binding>(
        &self,
        api: &Api<K>,
        b: K,
        groups: &[String],
        what: String,
        report: &mut SyncReport,
    ) {
        let hit = |s: &Subject| s.kind == "Group" && groups.contains(&s.name);
        if !b.subjects().iter().any(hit) {
            return;
        }
        let kept: Vec<Subject> = b.subjects().iter().filter(|s| !hit(s)).cloned().collect();
        let taken: Vec<String> = b
            .subjects()
            .iter()
            .filter(|s| hit(s))
            .map(|s| s.name.clone())
            .collect();
        let name = b.meta().name.clone().unwrap_or_default();
        let next = K::build(b.meta().clone(), b.role_ref().clone(), kept);
        let pp = PostParams::default();
        let r = retry(&format!("updating {what}"), Backoff::default(), || {
            api.replace(&name, &pp, &next)
        })
        .await;
        match r {
            Ok(_) => {
                tracing::warn!(binding = %what, groups = ?taken, "took revoked generation groups out of a binding rotator did not make");
                report.swept.push(format!("{what} ({})", taken.join(", ")));
            }
            Err(e) => sweep_failed(report, format!("{what} ({})", taken.join(", ")), e),
        }
    }
}

/// A sweep rotator may not do (a role it may not bind, a verb it lacks) is
/// `unswept`: reported, never retried into a loop. A conflict or an outage is
/// `failed`: the removal is not done, and the next pass retries it.
fn sweep_failed(report: &mut SyncReport, what: String, e: ClusterError) {
    match e {
        ClusterError::Api {
            code: 403 | 422, ..
        }
        | ClusterError::Forbidden(_) => report.unswept.push(format!(
            "{what}: {}",
            e.to_string().lines().next().unwrap_or_default()
        )),
        e => fail(report, what, e),
    }
}

/// A binding rotator did not make that names a user (or one of their groups)
/// directly: it would survive a revocation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DirectGrant {
    pub binding: String,
    pub role: String,
    pub subject: String,
}

impl Cluster {
    /// Bindings outside rotator's that grant any of `names` (kind User) or `groups` (kind Group).
    pub async fn direct_grants(
        &self,
        names: &[String],
        groups: &[String],
    ) -> Result<Vec<DirectGrant>, ClusterError> {
        let mut out = Vec::new();
        let hit = |s: &Subject| {
            (s.kind == "User" && names.contains(&s.name))
                || (s.kind == "Group" && groups.contains(&s.name))
        };
        let rbs: Api<RoleBinding> = Api::all(self.client.clone());
        let lp = ListParams::default();
        for rb in retry("listing RoleBindings", Backoff::default(), || rbs.list(&lp))
            .await?
            .items
        {
            if is_managed(&rb) {
                continue;
            }
            for s in rb.subjects.iter().flatten().filter(|s| hit(s)) {
                out.push(DirectGrant {
                    binding: format!(
                        "rolebinding {}/{}",
                        rb.metadata.namespace.clone().unwrap_or_default(),
                        rb.metadata.name.clone().unwrap_or_default()
                    ),
                    role: format!("{}/{}", rb.role_ref.kind, rb.role_ref.name),
                    subject: format!("{} {}", s.kind, s.name),
                });
            }
        }
        let crbs: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        for b in retry("listing ClusterRoleBindings", Backoff::default(), || {
            crbs.list(&lp)
        })
        .await?
        .items
        {
            for s in b.subjects.iter().flatten().filter(|s| hit(s)) {
                out.push(DirectGrant {
                    binding: format!(
                        "clusterrolebinding {}",
                        b.metadata.name.clone().unwrap_or_default()
                    ),
                    role: format!("{}/{}", b.role_ref.kind, b.role_ref.name),
                    subject: format!("{} {}", s.kind, s.name),
                });
            }
        }
        Ok(out)
    }
}
