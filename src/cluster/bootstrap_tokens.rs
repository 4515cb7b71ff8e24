//! Bootstrap token Secrets in kube-system, exactly as kubeadm writes them.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};

use super::{Backoff, Cluster, ClusterError, MANAGED_BY, is_not_found, retry};

pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";

/// A bootstrap token as the cluster holds it (never its secret half).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterToken {
    pub id: String,
    pub expiration: Option<String>,
    pub description: String,
    pub usages: Vec<String>,
    pub groups: Vec<String>,
    pub managed_by_rotator: bool,
}

pub struct TokenSpec<'a> {
    pub id: &'a str,
    pub secret: &'a str,
    pub expiration: Option<String>,
    pub description: &'a str,
    pub usages: &'a [String],
    pub groups: &'a [String],
}

impl std::fmt::Debug for TokenSpec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSpec")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn secrets(c: &Cluster) -> Api<Secret> {
    Api::namespaced(c.client.clone(), "kube-system")
}

impl Cluster {
    pub async fn create_bootstrap_token(&self, t: &TokenSpec<'_>) -> Result<(), ClusterError> {
        let mut data: BTreeMap<String, String> = BTreeMap::new();
        data.insert("token-id".into(), t.id.into());
        data.insert("token-secret".into(), t.secret.into());
        if let Some(e) = &t.expiration {
            data.insert("expiration".into(), e.clone());
        }
        if !t.description.is_empty() {
            data.insert("description".into(), t.description.into());
        }
        for u in t.usages {
            data.insert(format!("usage-bootstrap-{u}"), "true".into());
        }
        if !t.groups.is_empty() {
            data.insert("auth-extra-groups".into(), t.groups.join(","));
        }
        let s = Secret {
            metadata: ObjectMeta {
                name: Some(format!("bootstrap-token-{}", t.id)),
                namespace: Some("kube-system".into()),
                labels: Some([(MANAGED_BY.0.into(), MANAGED_BY.1.into())].into()),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.into()),
            string_data: Some(data),
            ..Default::default()
        };
        let api = secrets(self);
        let pp = PostParams::default();
        retry(
            &format!("creating bootstrap token {}", t.id),
            Backoff::default(),
            || api.create(&pp, &s),
        )
        .await
        .map(|_| ())
    }

    pub async fn delete_bootstrap_token(&self, id: &str) -> Result<bool, ClusterError> {
        let api = secrets(self);
        let name = format!("bootstrap-token-{id}");
        retry(
            &format!("deleting bootstrap token {id}"),
            Backoff::default(),
            || async {
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_not_found(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    /// Every bootstrap token in the cluster, rotator's or not.
    pub async fn bootstrap_tokens(&self) -> Result<Vec<ClusterToken>, ClusterError> {
        let api = secrets(self);
        let lp = ListParams::default().fields(&format!("type={SECRET_TYPE}"));
        let list = retry("listing bootstrap tokens", Backoff::default(), || {
            api.list(&lp)
        })
        .await?;
        let text = |s: &Secret, k: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(k))
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        Ok(list
            .items
            .iter()
            .filter(|s| s.type_.as_deref() == Some(SECRET_TYPE))
            .filter_map(|s| {
                let id = text(s, "token-id")?;
                Some(ClusterToken {
                    expiration: text(s, "expiration"),
                    description: text(s, "description").unwrap_or_default(),
                    usages: ["authentication", "signing"]
                        .into_iter()
                        .filter(|u| {
                            text(s, &format!("usage-bootstrap-{u}")).as_deref() == Some("true")
                        })
                        .map(str::to_string)
                        .collect(),
                    groups: text(s, "auth-extra-groups")
                        .map(|g| g.split(',').map(str::to_string).collect())
                        .unwrap_or_default(),
                    managed_by_rotator: s
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(MANAGED_BY.0))
                        .is_some_and(|v| v == MANAGED_BY.1),
                    id,
                })
            })
            .collect())
    }
}
