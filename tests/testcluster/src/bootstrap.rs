//! What a fresh cluster holds: the standard namespaces, the default ClusterRoles
//! (with their real rules for the resources this server knows) and bindings,
//! `kube-root-ca.crt` in every namespace and kubeadm's `cluster-info`.
use serde_json::{Value, json};

use crate::store::Store;

const RBAC: &str = "rbac.authorization.k8s.io";
const RO: &[&str] = &["get", "list", "watch"];
const RW: &[&str] = &["create", "delete", "deletecollection", "patch", "update"];

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

fn cluster_role(name: &str, rules: Vec<Value>) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
           "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
                        "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
           "rules": rules})
}

fn cluster_binding(name: &str, role: &str, groups: &[&str]) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
           "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": role},
           "subjects": groups.iter().map(|g| json!({"apiGroup": RBAC, "kind": "Group", "name": g})).collect::<Vec<_>>()})
}

pub fn default_cluster_roles() -> Vec<Value> {
    let view_core = ["pods", "configmaps", "serviceaccounts"];
    let view = vec![
        rule(&[""], &view_core, RO),
        rule(&[""], &["namespaces"], RO),
        rule(&["coordination.k8s.io"], &["leases"], RO),
    ];
    let mut edit = view.clone();
    edit.push(rule(
        &[""],
        &["pods", "configmaps", "secrets", "serviceaccounts"],
        RW,
    ));
    edit.push(rule(&[""], &["secrets"], RO));
    edit.push(rule(&["coordination.k8s.io"], &["leases"], RW));
    let mut admin = edit.clone();
    admin.push(rule(
        &[RBAC],
        &["roles", "rolebindings"],
        &[
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ],
    ));
    admin.push(rule(
        &["authorization.k8s.io"],
        &["localsubjectaccessreviews"],
        &["create"],
    ));
    vec![
        cluster_role(
            "cluster-admin",
            vec![
                rule(&["*"], &["*"], &["*"]),
                json!({"nonResourceURLs": ["*"], "verbs": ["*"]}),
            ],
        ),
        cluster_role("admin", admin),
        cluster_role("edit", edit),
        cluster_role("view", view),
        cluster_role(
            "system:basic-user",
            vec![
                rule(
                    &["authorization.k8s.io"],
                    &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    &["create"],
                ),
                rule(
                    &["authentication.k8s.io"],
                    &["selfsubjectreviews"],
                    &["create"],
                ),
            ],
        ),
        cluster_role(
            "system:auth-delegator",
            vec![
                rule(&["authentication.k8s.io"], &["tokenreviews"], &["create"]),
                rule(
                    &["authorization.k8s.io"],
                    &["subjectaccessreviews"],
                    &["create"],
                ),
            ],
        ),
        cluster_role(
            "system:discovery",
            vec![
                json!({"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]}),
            ],
        ),
        cluster_role(
            "system:public-info-viewer",
            vec![
                json!({"nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}),
            ],
        ),
        cluster_role(
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            vec![rule(
                &["certificates.k8s.io"],
                &["certificatesigningrequests/nodeclient"],
                &["create"],
            )],
        ),
    ]
}

pub fn seed(store: &Store, server_url: &str, ca_pem: &str, client_ca_pem: &str) {
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        ensure_namespace(store, ns, ca_pem);
    }
    for r in default_cluster_roles() {
        let _ = store.create((RBAC, "clusterroles"), "", r);
    }
    for b in [
        cluster_binding("cluster-admin", "cluster-admin", &["system:masters"]),
        cluster_binding(
            "system:basic-user",
            "system:basic-user",
            &["system:authenticated"],
        ),
        cluster_binding(
            "system:discovery",
            "system:discovery",
            &["system:authenticated"],
        ),
        cluster_binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            &["system:authenticated", "system:unauthenticated"],
        ),
    ] {
        let _ = store.create((RBAC, "clusterrolebindings"), "", b);
    }
    // kube-apiserver publishes its client CA here for aggregated API servers.
    let _ = store.create(
        ("", "configmaps"),
        "kube-system",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extension-apiserver-authentication"},
               "data": {"client-ca-file": client_ca_pem}}),
    );
    use base64::Engine;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: {server_url}\n    certificate-authority-data: {}\ncontexts: []\nusers: []\n",
        base64::engine::general_purpose::STANDARD.encode(ca_pem)
    );
    let _ = store.create(
        ("", "configmaps"),
        "kube-public",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cluster-info"}, "data": {"kubeconfig": kubeconfig}}),
    );
}

/// Namespaces come with `kube-root-ca.crt`, as the root-ca-cert-publisher makes it.
pub fn ensure_namespace(store: &Store, ns: &str, ca_pem: &str) {
    let _ = store.create(
        ("", "namespaces"),
        "",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
               "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}),
    );
    publish_root_ca(store, ns, ca_pem);
}

pub fn publish_root_ca(store: &Store, ns: &str, ca_pem: &str) {
    let _ = store.create(
        ("", "configmaps"),
        ns,
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kube-root-ca.crt"}, "data": {"ca.crt": ca_pem}}),
    );
}
