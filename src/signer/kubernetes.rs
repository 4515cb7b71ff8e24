//! The `kubernetes` signer: the cluster's CertificateSigningRequest API with
//! signer `kubernetes.io/kube-apiserver-client`, approved by rotator itself after
//! its policy check (the issuer checks policy before it ever calls `sign`).
use std::time::Duration;

use super::{BoxFuture, Progress, SignError, SignRequest, Signed, Signer};
use crate::cluster::Cluster;
use crate::cluster::csr::csr_name;
use crate::store::issuances::Step;

pub struct KubernetesSigner {
    cluster: Cluster,
    client_ca_pem: String,
    timeout: Duration,
}

impl std::fmt::Debug for KubernetesSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesSigner")
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl KubernetesSigner {
    pub fn new(cluster: Cluster, client_ca_pem: String, timeout: Duration) -> Self {
        Self {
            cluster,
            client_ca_pem,
            timeout,
        }
    }
}

impl Signer for KubernetesSigner {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn ca_bundle_pem(&self) -> &str {
        &self.client_ca_pem
    }

    fn sign<'a>(
        &'a self,
        req: SignRequest<'a>,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<Signed, SignError>> {
        Box::pin(async move {
            req.checked_csr()?;
            let name = csr_name(req.credential_id);
            // Recorded before the object exists, so a crash after creating it still finds it.
            progress.step(Step::CsrSubmitted, Some(&name)).await?;
            let pem = crate::pki::pem_encode("CERTIFICATE REQUEST", req.csr_der);
            self.cluster
                .create_csr(&name, req.user, &pem, req.ttl)
                .await?;
            self.cluster
                .approve_csr(
                    &name,
                    &format!(
                        "approved by rotator for user {} after its policy check",
                        req.user
                    ),
                )
                .await?;
            progress.step(Step::Approved, None).await?;
            let certificate_pem = self
                .cluster
                .wait_for_certificate(&name, self.timeout)
                .await?;
            Ok(Signed { certificate_pem })
        })
    }

    fn cleanup<'a>(&'a self, credential_id: &'a str) -> BoxFuture<'a, Result<(), SignError>> {
        Box::pin(async move { Ok(self.cluster.delete_csr(&csr_name(credential_id)).await?) })
    }
}
