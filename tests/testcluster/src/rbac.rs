//! RBAC evaluation as kube-apiserver's authorizer does it: the union of the rules
//! of every ClusterRoleBinding, and of every RoleBinding in the request's
//! namespace, whose subjects name the user, one of their groups, or their
//! service account. `system:masters` is a superuser.
use serde_json::Value;

use crate::authn::UserInfo;
use crate::store::Store;

#[derive(Debug, Clone, Default)]
pub struct Attrs {
    pub verb: String,
    pub group: String,
    /// The API version of the request (sent to webhooks; RBAC ignores it).
    pub version: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// Set for non-resource requests (`/version`, `/api`, ...).
    pub path: Option<String>,
}

fn has(list: &Value, v: &str) -> bool {
    list.as_array()
        .is_some_and(|a| a.iter().any(|x| x == "*" || x == v))
}

fn rule_allows(rule: &Value, a: &Attrs) -> bool {
    if let Some(path) = &a.path {
        let Some(urls) = rule["nonResourceURLs"].as_array() else {
            return false;
        };
        return has(&rule["verbs"], &a.verb)
            && urls.iter().filter_map(Value::as_str).any(|u| {
                u == path || u == "*" || u.strip_suffix('*').is_some_and(|p| path.starts_with(p))
            });
    }
    if !has(&rule["verbs"], &a.verb) || !has(&rule["apiGroups"], &a.group) {
        return false;
    }
    let combined = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let res_ok = rule["resources"].as_array().is_some_and(|rs| {
        rs.iter().filter_map(Value::as_str).any(|r| {
            r == "*"
                || r == combined
                || (!a.subresource.is_empty() && r == format!("*/{}", a.subresource))
        })
    });
    if !res_ok {
        return false;
    }
    match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => names.iter().any(|n| n == a.name.as_str()),
        _ => true,
    }
}

fn subject_matches(s: &Value, user: &UserInfo, binding_ns: &str) -> bool {
    let name = s["name"].as_str().unwrap_or_default();
    match s["kind"].as_str() {
        Some("User") => name == user.username,
        Some("Group") => user.groups.iter().any(|g| g == name),
        Some("ServiceAccount") => {
            let ns = s["namespace"]
                .as_str()
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            user.username == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

/// Every rule that applies to `user` in `namespace` ("" = cluster scope only).
pub fn rules_for(store: &Store, user: &UserInfo, namespace: &str) -> Vec<Value> {
    let mut rules = Vec::new();
    let mut add_role = |kind: &str, role_ns: &str, name: &str| {
        let res = if kind == "ClusterRole" {
            ("rbac.authorization.k8s.io", "clusterroles")
        } else {
            ("rbac.authorization.k8s.io", "roles")
        };
        let ns = if kind == "ClusterRole" { "" } else { role_ns };
        if let Some(r) = store.get(res, ns, name)
            && let Some(rs) = r["rules"].as_array()
        {
            rules.extend(rs.iter().cloned());
        }
    };
    let (crbs, _) = store.list(("rbac.authorization.k8s.io", "clusterrolebindings"), None);
    for b in &crbs {
        if b["subjects"]
            .as_array()
            .is_some_and(|ss| ss.iter().any(|s| subject_matches(s, user, "")))
        {
            add_role(
                "ClusterRole",
                "",
                b["roleRef"]["name"].as_str().unwrap_or_default(),
            );
        }
    }
    if !namespace.is_empty() {
        let (rbs, _) = store.list(
            ("rbac.authorization.k8s.io", "rolebindings"),
            Some(namespace),
        );
        for b in &rbs {
            if b["subjects"]
                .as_array()
                .is_some_and(|ss| ss.iter().any(|s| subject_matches(s, user, namespace)))
            {
                add_role(
                    b["roleRef"]["kind"].as_str().unwrap_or_default(),
                    namespace,
                    b["roleRef"]["name"].as_str().unwrap_or_default(),
                );
            }
        }
    }
    rules
}

pub fn is_superuser(user: &UserInfo) -> bool {
    user.groups.iter().any(|g| g == "system:masters")
}

/// One decision of the authorizer, as an audit log would show it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub username: String,
    pub attrs: Attrs,
    pub allowed: bool,
}

/// Authorizes a request (or a check the API server makes for one, such as
/// `bind` or `approve`) and records the decision in [`Store::authz`].
pub fn authorize(store: &Store, user: &UserInfo, a: &Attrs) -> bool {
    if is_superuser(user) {
        return true;
    }
    let allowed = evaluate(store, user, a);
    store
        .authz
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Decision {
            username: user.username.clone(),
            attrs: a.clone(),
            allowed,
        });
    allowed
}

/// The decision without recording it (SelfSubjectAccessReview: a question, not a use).
pub fn evaluate(store: &Store, user: &UserInfo, a: &Attrs) -> bool {
    is_superuser(user)
        || rules_for(store, user, &a.namespace)
            .iter()
            .any(|r| rule_allows(r, a))
}

/// The 403 message kube-apiserver writes.
pub fn forbidden_message(user: &UserInfo, a: &Attrs, qualified: &str) -> String {
    if let Some(path) = &a.path {
        return format!(
            "forbidden: User \"{}\" cannot {} path \"{}\"",
            user.username, a.verb, path
        );
    }
    let what = if a.name.is_empty() {
        qualified.to_string()
    } else {
        format!("{qualified} \"{}\"", a.name)
    };
    let res = if a.subresource.is_empty() {
        a.resource.clone()
    } else {
        format!("{}/{}", a.resource, a.subresource)
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{res}\" in API group \"{}\" {scope}",
        user.username, a.verb, a.group
    )
}

/// RBAC's escalation check: binding a role needs either every permission the role
/// grants (in that namespace) or the `bind` verb on it.
pub fn may_bind(
    store: &Store,
    user: &UserInfo,
    namespace: &str,
    role_kind: &str,
    role_name: &str,
) -> bool {
    if is_superuser(user) {
        return true;
    }
    let res = if role_kind == "ClusterRole" {
        "clusterroles"
    } else {
        "roles"
    };
    let bind = Attrs {
        verb: "bind".into(),
        group: "rbac.authorization.k8s.io".into(),
        resource: res.into(),
        namespace: namespace.into(),
        name: role_name.into(),
        ..Default::default()
    };
    if authorize(store, user, &bind) {
        return true;
    }
    let role = if role_kind == "ClusterRole" {
        store.get(("rbac.authorization.k8s.io", "clusterroles"), "", role_name)
    } else {
        store.get(("rbac.authorization.k8s.io", "roles"), namespace, role_name)
    };
    let Some(role) = role else { return false };
    let held = rules_for(store, user, namespace);
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    role["rules"].as_array().into_iter().flatten().all(|rule| {
        let verbs = strs(&rule["verbs"]);
        if let Some(urls) = rule["nonResourceURLs"].as_array() {
            return urls.iter().filter_map(Value::as_str).all(|u| {
                verbs.iter().all(|v| {
                    let a = Attrs {
                        verb: v.clone(),
                        path: Some(u.to_string()),
                        ..Default::default()
                    };
                    held.iter().any(|h| rule_allows(h, &a))
                })
            });
        }
        let names = strs(&rule["resourceNames"]);
        let names = if names.is_empty() {
            vec![String::new()]
        } else {
            names
        };
        strs(&rule["apiGroups"]).iter().all(|g| {
            strs(&rule["resources"]).iter().all(|r| {
                let (resource, sub) = r
                    .split_once('/')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .unwrap_or((r.clone(), String::new()));
                verbs.iter().all(|v| {
                    names.iter().all(|n| {
                        let a = Attrs {
                            verb: v.clone(),
                            group: g.clone(),
                            resource: resource.clone(),
                            subresource: sub.clone(),
                            namespace: namespace.into(),
                            name: n.clone(),
                            path: None,
                            ..Default::default()
                        };
                        held.iter().any(|h| rule_allows(h, &a))
                    })
                })
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rule_matching_follows_kubernetes() {
        let r = json!({"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval"], "verbs": ["update"]});
        let mut a = Attrs {
            verb: "update".into(),
            group: "certificates.k8s.io".into(),
            resource: "certificatesigningrequests".into(),
            subresource: "approval".into(),
            ..Default::default()
        };
        assert!(rule_allows(&r, &a));
        a.subresource.clear();
        assert!(
            !rule_allows(&r, &a),
            "the subresource rule must not grant the main resource"
        );
        let signer = json!({"apiGroups": ["certificates.k8s.io"], "resources": ["signers"], "verbs": ["approve"], "resourceNames": ["kubernetes.io/kube-apiserver-client"]});
        let mut s = Attrs {
            verb: "approve".into(),
            group: "certificates.k8s.io".into(),
            resource: "signers".into(),
            name: "kubernetes.io/kube-apiserver-client".into(),
            ..Default::default()
        };
        assert!(rule_allows(&signer, &s));
        s.name = "kubernetes.io/kubelet-serving".into();
        assert!(!rule_allows(&signer, &s));
        let sub_wild = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["get"]});
        assert!(rule_allows(
            &sub_wild,
            &Attrs {
                verb: "get".into(),
                group: "x".into(),
                resource: "pods".into(),
                subresource: "status".into(),
                ..Default::default()
            }
        ));
        let nr = json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]});
        assert!(rule_allows(
            &nr,
            &Attrs {
                verb: "get".into(),
                path: Some("/apis/rbac.authorization.k8s.io/v1".into()),
                ..Default::default()
            }
        ));
        assert!(!rule_allows(
            &nr,
            &Attrs {
                verb: "get".into(),
                path: Some("/metrics".into()),
                ..Default::default()
            }
        ));
    }
}
