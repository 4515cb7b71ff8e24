//! Grants in the cluster that a revocation by rotator would not take away, found
//! for `rotator doctor`: bindings others made to generation groups, bindings
//! that look like rotator's but are not this instance's (or not what rotator
//! writes), bindings of privileged groups, and bootstrap tokens rotator did not
//! make. Read-only: nothing here changes the cluster.
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, Subject};
use kube::api::{Api, ListParams};

use super::rbac::Binding;
use super::{
    Backoff, Cluster, ClusterError, INSTANCE_ANNOTATION, MANAGED_BY, USER_ANNOTATION, retry,
};
use crate::policy::{GENERATION_GROUP_PREFIX, Pattern};

/// Kubernetes' own default bindings carry this label (`rbac-defaults`).
const BOOTSTRAPPING_LABEL: &str = "kubernetes.io/bootstrapping";

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// A grant rotator's revocations cannot reach: doctor fails.
    Fail,
    /// Worth knowing and often deliberate (a distribution's default, another
    /// rotator instance, a token that expires): doctor reports it and passes.
    Warn,
}

/// One finding, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// Stable, for scripts: `generation-group-binding`, `foreign-instance-binding`,
    /// `orphaned-binding`, `tampered-binding`, `privileged-group-binding`,
    /// `foreign-bootstrap-token`.
    pub kind: &'static str,
    /// `rolebinding NS/NAME`, `clusterrolebinding NAME` or `bootstrap token ID`.
    pub object: String,
    pub problem: String,
    pub fix: String,
}

/// What this rotator instance knows, to tell its grants from others'.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// Users of this database that are not removed.
    pub users: Vec<String>,
    /// `policy.denied_groups` (lowercase patterns); `system:masters` is always added.
    pub denied_groups: Vec<Pattern>,
    /// Bootstrap token ids this database holds as active (or being created).
    pub tokens: Vec<String>,
}

fn label(meta: &kube::api::ObjectMeta, key: &str) -> Option<String> {
    meta.labels.as_ref().and_then(|l| l.get(key)).cloned()
}

fn annotation(meta: &kube::api::ObjectMeta, key: &str) -> Option<String> {
    meta.annotations.as_ref().and_then(|a| a.get(key)).cloned()
}

fn is_generation_group(s: &Subject) -> bool {
    s.kind == "Group"
        && s.name
            .to_ascii_lowercase()
            .starts_with(GENERATION_GROUP_PREFIX)
}

/// The binding's name for messages and the kubectl command that deletes it.
fn describe<K: Binding>(b: &K) -> (String, String) {
    let name = b.meta().name.clone().unwrap_or_default();
    match &b.meta().namespace {
        Some(ns) if K::KIND == "RoleBinding" => (
            format!("rolebinding {ns}/{name}"),
            format!("kubectl delete rolebinding -n {ns} {name:?}"),
        ),
        _ => (
            format!("clusterrolebinding {name}"),
            format!("kubectl delete clusterrolebinding {name:?}"),
        ),
    }
}

impl Cluster {
    fn binding_findings<K: Binding>(&self, b: &K, known: &Known, out: &mut Vec<Finding>) {
        let meta = b.meta();
        let (object, delete) = describe(b);
        let role = format!("{} {}", b.role_ref().kind, b.role_ref().name);
        let managed = label(meta, MANAGED_BY.0).is_some_and(|v| v == MANAGED_BY.1);
        let subjects = b.subjects();
        if !managed {
            for s in subjects.iter().filter(|s| is_generation_group(s)) {
                out.push(Finding {
                    severity: Severity::Fail,
                    kind: "generation-group-binding",
                    object: object.clone(),
                    problem: format!(
                        "binds generation group {} to {role} but was not made by rotator: revoking that credential cannot remove it, so its certificate keeps this access until it expires",
                        s.name
                    ),
                    fix: format!(
                        "{delete} (or remove that subject from it); grant access with `rotator add-user`, which binds generation groups itself"
                    ),
                });
            }
        } else if !self.owns(meta) {
            out.push(Finding {
                severity: Severity::Warn,
                kind: "foreign-instance-binding",
                object: object.clone(),
                problem: format!(
                    "carries rotator's label but was made by rotator instance {}, not this one ({}): this instance never revokes through it",
                    annotation(meta, INSTANCE_ANNOTATION).unwrap_or_default(),
                    self.instance
                ),
                fix: format!(
                    "if that instance (another data directory or database) still runs, run its doctor; if it is gone, {delete}"
                ),
            });
        } else {
            let user = annotation(meta, USER_ANNOTATION);
            match user.as_deref() {
                Some(u) if known.users.iter().any(|k| k == u) => {
                    let own = format!("{GENERATION_GROUP_PREFIX}{u}:");
                    for s in subjects
                        .iter()
                        .filter(|s| !(s.kind == "Group" && s.name.starts_with(&own)))
                    {
                        out.push(Finding {
                            severity: Severity::Fail,
                            kind: "tampered-binding",
                            object: object.clone(),
                            problem: format!(
                                "is rotator's binding for {u}, but also binds {} {} to {role}, which rotator never writes: revoking {u} does not take that away",
                                s.kind, s.name
                            ),
                            fix: format!(
                                "remove that subject (`kubectl edit` the binding), or {delete} and let `rotator serve`'s reconcile recreate it"
                            ),
                        });
                    }
                }
                _ => out.push(Finding {
                    severity: Severity::Fail,
                    kind: "orphaned-binding",
                    object: object.clone(),
                    problem: format!(
                        "carries rotator's label, but {}: rotator's revocations and reconcile never touch it, and it binds {role}",
                        match &user {
                            Some(u) => format!("its user {u:?} is not a user of this database"),
                            None => "it names no user (annotation rotator.io/user)".into(),
                        }
                    ),
                    fix: format!("{delete}; rotator recreates the bindings its users need"),
                }),
            }
        }
        // Kubernetes' own default binding of system:masters to cluster-admin adds
        // nothing (system:masters bypasses RBAC) and cannot be removed: not reported.
        if label(meta, BOOTSTRAPPING_LABEL).as_deref() == Some("rbac-defaults") {
            return;
        }
        for s in subjects.iter().filter(|s| s.kind == "Group") {
            let lower = s.name.to_ascii_lowercase();
            let why = if lower == "system:masters" {
                "system:masters bypasses RBAC".to_string()
            } else if let Some(p) = known.denied_groups.iter().find(|p| p.matches(&lower)) {
                format!("it matches \"{p}\" in policy.denied_groups")
            } else {
                continue;
            };
            out.push(Finding {
                severity: Severity::Warn,
                kind: "privileged-group-binding",
                object: object.clone(),
                problem: format!(
                    "binds privileged group {} to {role} ({why}): any certificate carrying it, from any signer of the cluster's CA, has this access for its whole life and nothing can revoke it",
                    s.name
                ),
                fix: format!(
                    "rotator never issues {} (policy.denied_groups); keep anything that can (the CA key, kubeadm's admin.conf) offline, or {delete} if nothing needs it",
                    s.name
                ),
            });
        }
    }

    /// Every finding in the cluster, RoleBindings first, then ClusterRoleBindings,
    /// then bootstrap tokens.
    pub async fn grant_findings(&self, known: &Known) -> Result<Vec<Finding>, ClusterError> {
        let mut out = Vec::new();
        let lp = ListParams::default();
        let rbs: Api<RoleBinding> = Api::all(self.client.clone());
        for b in retry("listing RoleBindings", Backoff::default(), || rbs.list(&lp))
            .await?
            .items
        {
            self.binding_findings(&b, known, &mut out);
        }
        let crbs: Api<ClusterRoleBinding> = Api::all(self.client.clone());
        for b in retry("listing ClusterRoleBindings", Backoff::default(), || {
            crbs.list(&lp)
        })
        .await?
        .items
        {
            self.binding_findings(&b, known, &mut out);
        }
        let tokens = match self.bootstrap_tokens().await {
            Ok(t) => t,
            // Listing kube-system Secrets is an opt-in grant (it shows every
            // Secret there): without it, say what was not checked.
            Err(ClusterError::Api { code: 403, .. }) => {
                out.push(Finding {
                    severity: Severity::Warn,
                    kind: "bootstrap-tokens-not-checked",
                    object: "kube-system bootstrap tokens".into(),
                    problem: "rotator may not list kube-system Secrets, so bootstrap tokens it did not make are not reported".into(),
                    fix: "apply deploy/kubernetes/rbac-token-audit.yaml (knowing what it allows), or list them as an admin: kubectl -n kube-system get secrets --field-selector type=bootstrap.kubernetes.io/token".into(),
                });
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        for t in tokens {
            if known.tokens.contains(&t.id) {
                continue;
            }
            let (severity, until) = match &t.expiration {
                Some(e) => (Severity::Warn, format!("until {e}")),
                None => (
                    Severity::Fail,
                    "for ever (it has no expiration)".to_string(),
                ),
            };
            out.push(Finding {
                severity,
                kind: "foreign-bootstrap-token",
                object: format!("bootstrap token {}", t.id),
                problem: format!(
                    "was not made by this rotator (groups: {}): it authenticates {until}, and rotator never deletes it",
                    if t.groups.is_empty() {
                        "system:bootstrappers".to_string()
                    } else {
                        t.groups.join(", ")
                    }
                ),
                fix: format!(
                    "if nobody needs it: kubectl -n kube-system delete secret bootstrap-token-{} (or `kubeadm token delete {}`); make tokens with `rotator token create`, which deletes them when they expire",
                    t.id, t.id
                ),
            });
        }
        Ok(out)
    }
}
