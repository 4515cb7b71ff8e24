//! The CertificateSigningRequest flow: create (or find the one a previous run
//! made), approve through `/approval`, wait with a watch, delete.
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};

use super::{Backoff, Cluster, ClusterError, MANAGED_BY, is_not_found, retry};

pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";

/// Deterministic, so a rerun after a crash finds the object instead of making another.
pub fn csr_name(credential_id: &str) -> String {
    format!("rotator-{credential_id}")
}

fn condition(s: &CertificateSigningRequest, t: &str) -> Option<CertificateSigningRequestCondition> {
    s.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == t && c.status == "True")
        .cloned()
}

fn certificate(s: &CertificateSigningRequest) -> Option<String> {
    s.status
        .as_ref()?
        .certificate
        .as_ref()
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

impl Cluster {
    fn csrs(&self) -> Api<CertificateSigningRequest> {
        Api::all(self.client.clone())
    }

    /// Creates the CSR, or adopts the one already there if it carries the same request.
    pub async fn create_csr(
        &self,
        name: &str,
        user: &str,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<CertificateSigningRequest, ClusterError> {
        let obj = CertificateSigningRequest {
            metadata: self.owned_meta(name, user),
            spec: CertificateSigningRequestSpec {
                request: k8s_openapi::ByteString(csr_pem.as_bytes().to_vec()),
                signer_name: CLIENT_SIGNER.into(),
                expiration_seconds: Some(ttl.as_secs().min(i32::MAX as u64) as i32),
                usages: Some(vec!["client auth".into(), "digital signature".into()]),
                ..Default::default()
            },
            status: None,
        };
        let api = self.csrs();
        let pp = PostParams::default();
        let created = retry(
            &format!("creating CSR {name}"),
            Backoff::default(),
            || async {
                match api.create(&pp, &obj).await {
                    Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {
                        api.get(name).await
                    }
                    other => other,
                }
            },
        )
        .await?;
        if created.spec.request.0 != obj.spec.request.0 {
            return Err(ClusterError::Conflict(format!(
                "a CSR named {name} already exists with another request\nfix: it was not made for this issuance; delete it if it is stale (kubectl delete csr {name})"
            )));
        }
        Ok(created)
    }

    /// Adds the Approved condition through the `approval` subresource (verb
    /// `update`, as `kubectl certificate approve` does), re-reading on conflicts.
    pub async fn approve_csr(&self, name: &str, message: &str) -> Result<(), ClusterError> {
        let api = self.csrs();
        let pp = PostParams::default();
        for _ in 0..5 {
            let mut cur = retry(&format!("reading CSR {name}"), Backoff::default(), || {
                api.get(name)
            })
            .await?;
            if let Some(d) = condition(&cur, "Denied") {
                return Err(ClusterError::Denied {
                    name: name.into(),
                    reason: d.reason.unwrap_or_default(),
                    message: d.message.unwrap_or_default(),
                });
            }
            if condition(&cur, "Approved").is_some() {
                return Ok(());
            }
            let status = cur
                .status
                .get_or_insert_with(CertificateSigningRequestStatus::default);
            status.conditions.get_or_insert_with(Vec::new).push(
                CertificateSigningRequestCondition {
                    type_: "Approved".into(),
                    status: "True".into(),
                    reason: Some("RotatorPolicyApproved".into()),
                    message: Some(message.into()),
                    ..Default::default()
                },
            );
            let what = format!("approving CSR {name}");
            let res = retry(&what, Backoff::default(), || {
                api.replace_subresource("approval", name, &pp, &cur)
            })
            .await;
            match res {
                Ok(_) => return Ok(()),
                Err(ClusterError::Api { code: 409, .. }) => continue, // stale read: read again
                Err(e) => return Err(e),
            }
        }
        Err(ClusterError::Conflict(format!(
            "CSR {name} kept changing while rotator approved it\nfix: run the command again"
        )))
    }

    /// Waits with a watch (never a sleep loop) until the certificate appears, or
    /// the CSR is Denied or Failed, or `timeout` passes.
    pub async fn wait_for_certificate(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<String, ClusterError> {
        let api = self.csrs();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let cur = retry(&format!("reading CSR {name}"), Backoff::default(), || {
                api.get(name)
            })
            .await?;
            if let Some(pem) = certificate(&cur) {
                return Ok(pem);
            }
            if let Some(d) = condition(&cur, "Denied") {
                return Err(ClusterError::Denied {
                    name: name.into(),
                    reason: d.reason.unwrap_or_default(),
                    message: d.message.unwrap_or_default(),
                });
            }
            if let Some(f) = condition(&cur, "Failed") {
                return Err(ClusterError::Failed {
                    name: name.into(),
                    reason: f.reason.unwrap_or_default(),
                    message: f.message.unwrap_or_default(),
                });
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ClusterError::Timeout {
                    name: name.into(),
                    timeout,
                });
            }
            let rv = cur.metadata.resource_version.clone().unwrap_or_default();
            let wp = WatchParams::default()
                .fields(&format!("metadata.name={name}"))
                .timeout(left.as_secs().clamp(1, 290) as u32);
            let stream = match api.watch(&wp, &rv).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(csr = name, error = %e, "watch failed; reading again");
                    tokio::time::sleep(Duration::from_millis(200).min(left)).await;
                    continue;
                }
            };
            let mut stream = Box::pin(stream);
            // Any event (or the stream ending) sends us back to a fresh read above.
            let _ = tokio::time::timeout(left, async {
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(WatchEvent::Modified(c)) | Ok(WatchEvent::Added(c))
                            if certificate(&c).is_some()
                                || condition(&c, "Denied").is_some()
                                || condition(&c, "Failed").is_some() =>
                        {
                            return;
                        }
                        Ok(WatchEvent::Deleted(_)) | Ok(WatchEvent::Error(_)) | Err(_) => return,
                        _ => {}
                    }
                }
            })
            .await;
        }
    }

    /// Deletes a CSR; a missing one is fine.
    pub async fn delete_csr(&self, name: &str) -> Result<(), ClusterError> {
        let api = self.csrs();
        retry(
            &format!("deleting CSR {name}"),
            Backoff::default(),
            || async {
                match api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_not_found(&e) => Ok(()),
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    /// The CSR objects this rotator instance made (for cleanup and `doctor`),
    /// for one user or all: `(name, annotated)`. Another instance's CSRs
    /// (another database) are never listed here. An object with rotator's
    /// label and no instance annotation (an older rotator) is listed with
    /// `annotated: false`: callers clean it up only if the issuance its name
    /// comes from is in their own journal.
    pub async fn managed_csrs(
        &self,
        user: Option<&str>,
    ) -> Result<Vec<(String, bool)>, ClusterError> {
        let api = self.csrs();
        let mut selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
        if let Some(u) = user {
            selector.push_str(&format!(",{}={}", super::USER_LABEL, super::user_hash(u)));
        }
        let lp = kube::api::ListParams::default().labels(&selector);
        let list = retry("listing rotator's CSRs", Backoff::default(), || {
            api.list(&lp)
        })
        .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|c| self.owns(&c.metadata))
            .filter_map(|c| {
                let annotated = c
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(super::INSTANCE_ANNOTATION));
                c.metadata.name.map(|n| (n, annotated))
            })
            .collect())
    }
}
