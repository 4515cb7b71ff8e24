//! RoleBindings rotator manages: one per user and namespace, named
//! `rotator:<user>`, labelled as rotator's, whose subjects are the generation
//! groups of the user's live credentials. rotator never changes a binding it did
//! not create.
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

use super::{
    Backoff, Cluster, ClusterError, MANAGED_BY, USER_ANNOTATION, USER_LABEL, is_not_found, retry,
    user_hash,
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

fn is_managed(rb: &RoleBinding) -> bool {
    rb.metadata
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

fn desired(user: &str, role: &str, groups: &[String]) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(binding_name(user)),
            labels: Some(
                [
                    (MANAGED_BY.0.into(), MANAGED_BY.1.into()),
                    (USER_LABEL.into(), user_hash(user)),
                ]
                .into(),
            ),
            annotations: Some([(USER_ANNOTATION.into(), user.into())].into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some(RBAC_GROUP.into()),
            kind: "ClusterRole".into(),
            name: role.into(),
        },
        subjects: Some(subjects(groups)),
    }
}

impl Cluster {
    /// Makes the user's bindings say exactly `groups` in `namespaces` (none when
    /// `groups` is empty), and removes rotator's bindings for them elsewhere.
    pub async fn sync_user_bindings(
        &self,
        user: &str,
        namespaces: &[String],
        role: &str,
        groups: &[String],
    ) -> Result<SyncReport, ClusterError> {
        let mut report = SyncReport::default();
        let name = binding_name(user);
        let want = desired(user, role, groups);
        let pp = PostParams::default();
        for ns in namespaces {
            let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), ns);
            let what = format!("RoleBinding {ns}/{name}");
            let current = retry(&format!("reading {what}"), Backoff::default(), || async {
                match api.get(&name).await {
                    Ok(rb) => Ok(Some(rb)),
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
            match current {
                Some(rb) if !is_managed(&rb) => {
                    return Err(ClusterError::Conflict(format!(
                        "{what} exists and was not made by rotator\nfix: rotator never changes a binding it did not create; rename or remove that binding"
                    )));
                }
                None if groups.is_empty() => {}
                None => {
                    retry(&format!("creating {what}"), Backoff::default(), || {
                        api.create(&pp, &want)
                    })
                    .await?;
                    report.created.push(format!("{ns}/{name}"));
                }
                Some(_) if groups.is_empty() => {
                    self.delete_binding(&api, &name, &what).await?;
                    report.deleted.push(format!("{ns}/{name}"));
                }
                Some(rb) if rb.role_ref != want.role_ref => {
                    // roleRef is immutable: replace the binding.
                    self.delete_binding(&api, &name, &what).await?;
                    retry(&format!("creating {what}"), Backoff::default(), || {
                        api.create(&pp, &want)
                    })
                    .await?;
                    report.updated.push(format!("{ns}/{name}"));
                }
                Some(rb)
                    if rb.subjects.as_deref().unwrap_or_default()
                        != want.subjects.as_deref().unwrap_or_default() =>
                {
                    let mut next = want.clone();
                    next.metadata.resource_version = rb.metadata.resource_version.clone();
                    match retry(&format!("updating {what}"), Backoff::default(), || {
                        api.replace(&name, &pp, &next)
                    })
                    .await
                    {
                        Ok(_) => {}
                        // Someone changed it since we read it: the next sync (or reconcile) repairs it.
                        Err(ClusterError::Api { code: 409, .. }) => {
                            return Err(ClusterError::Conflict(format!(
                                "{what} changed while rotator updated it\nfix: run the command again"
                            )));
                        }
                        Err(e) => return Err(e),
                    }
                    report.updated.push(format!("{ns}/{name}"));
                }
                Some(_) => {}
            }
        }
        // The user's bindings in namespaces they no longer have.
        let all: Api<RoleBinding> = Api::all(self.client.clone());
        let lp = ListParams::default().labels(&format!(
            "{}={},{}={}",
            MANAGED_BY.0,
            MANAGED_BY.1,
            USER_LABEL,
            user_hash(user)
        ));
        let existing = retry(
            &format!("listing {user}'s RoleBindings"),
            Backoff::default(),
            || all.list(&lp),
        )
        .await?;
        for rb in existing.items {
            let ns = rb.metadata.namespace.clone().unwrap_or_default();
            let n = rb.metadata.name.clone().unwrap_or_default();
            if namespaces.contains(&ns) && n == name {
                continue;
            }
            let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), &ns);
            self.delete_binding(&api, &n, &format!("RoleBinding {ns}/{n}"))
                .await?;
            report.deleted.push(format!("{ns}/{n}"));
        }
        Ok(report)
    }

    async fn delete_binding(
        &self,
        api: &Api<RoleBinding>,
        name: &str,
        what: &str,
    ) -> Result<(), ClusterError> {
        retry(&format!("deleting {what}"), Backoff::default(), || async {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
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
        use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
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
