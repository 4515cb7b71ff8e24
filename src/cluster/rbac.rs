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
}

impl SyncReport {
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
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

/// Makes one binding say `want` (or not exist when `groups` is empty). Returns
/// what it did: "created", "updated", "deleted", or None.
async fn sync_one<K: Binding>(
    api: &Api<K>,
    want: &K,
    groups_empty: bool,
    what: &str,
) -> Result<Option<&'static str>, ClusterError> {
    let name = want.meta().name.clone().unwrap_or_default();
    let pp = PostParams::default();
    let current = retry(&format!("reading {what}"), Backoff::default(), || async {
        match api.get(&name).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    })
    .await?;
    Ok(match current {
        Some(b) if !is_managed(&b) => {
            return Err(ClusterError::Conflict(format!(
                "{what} exists and was not made by rotator\nfix: rotator never changes a binding it did not create; rename or remove that binding"
            )));
        }
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
        Some(b) if b.subjects() != want.subjects() => {
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

fn record(report: &mut SyncReport, done: Option<&'static str>, what: String) {
    match done {
        Some("created") => report.created.push(what),
        Some("updated") => report.updated.push(what),
        Some("deleted") => report.deleted.push(what),
        _ => {}
    }
}

impl Cluster {
    /// Makes the user's bindings say exactly `groups` in `scope` (nothing when
    /// `groups` is empty), and removes rotator's bindings for them elsewhere.
    pub async fn sync_user_bindings(
        &self,
        user: &str,
        scope: &Scope,
        role: &str,
        groups: &[String],
    ) -> Result<SyncReport, ClusterError> {
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
            let done = sync_one(
                &api,
                &desired::<RoleBinding>(self, user, role, groups),
                groups.is_empty(),
                &format!("RoleBinding {ns}/{name}"),
            )
            .await?;
            record(&mut report, done, format!("{ns}/{name}"));
        }
        let crbs: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        if *scope == Scope::Cluster {
            let done = sync_one(
                &crbs,
                &desired::<ClusterRoleBinding>(self, user, role, groups),
                groups.is_empty(),
                &format!("ClusterRoleBinding {name}"),
            )
            .await?;
            record(&mut report, done, format!("cluster/{name}"));
        } else {
            // Listing is enough to find one rotator made earlier; reading it by name would need `get`.
            for b in retry(
                &format!("listing {user}'s ClusterRoleBindings"),
                Backoff::default(),
                || crbs.list(&mine),
            )
            .await?
            .items
            {
                let n = b.metadata.name.clone().unwrap_or_default();
                delete_one(&crbs, &n, &format!("ClusterRoleBinding {n}")).await?;
                report.deleted.push(format!("cluster/{n}"));
            }
        }
        // The user's RoleBindings in namespaces they no longer have.
        let all: Api<RoleBinding> = Api::all(self.client.clone());
        let existing = retry(
            &format!("listing {user}'s RoleBindings"),
            Backoff::default(),
            || all.list(&mine),
        )
        .await?;
        for rb in existing.items {
            let ns = rb.metadata.namespace.clone().unwrap_or_default();
            let n = rb.metadata.name.clone().unwrap_or_default();
            if namespaces.contains(&ns) && n == name {
                continue;
            }
            let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), &ns);
            delete_one(&api, &n, &format!("RoleBinding {ns}/{n}")).await?;
            report.deleted.push(format!("{ns}/{n}"));
        }
        Ok(report)
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
