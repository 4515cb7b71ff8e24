use std::path::PathBuf;

use futures_util::StreamExt;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::Client;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use testcluster::{Options, TestCluster};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    KubeRs,
    Kubectl,
}

impl Via {
    pub const BOTH: [Via; 2] = [Via::KubeRs, Via::Kubectl];
    pub fn tag(&self) -> &'static str {
        match self {
            Via::KubeRs => "kubers",
            Via::Kubectl => "kubectl",
        }
    }
}

pub struct Fx {
    pub cluster: TestCluster,
    pub dir: tempfile::TempDir,
    pub admin: Client,
    pub admin_kc: PathBuf,
}

pub struct Kubectl {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Fx {
    pub async fn new(opts: Options) -> Self {
        let cluster = TestCluster::start(opts).await.expect("start test cluster");
        let dir = tempfile::tempdir().unwrap();
        let admin_text = cluster.admin_kubeconfig();
        let admin_kc = dir.path().join("admin.kubeconfig");
        std::fs::write(&admin_kc, &admin_text).unwrap();
        let admin = client(&admin_text).await;
        Self {
            cluster,
            dir,
            admin,
            admin_kc,
        }
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub async fn kubectl(&self, kubeconfig: &std::path::Path, args: &[&str]) -> Kubectl {
        let o = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .await
            .expect("kubectl must be installed");
        Kubectl {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }

    pub async fn admin_kubectl(&self, args: &[&str]) -> Kubectl {
        self.kubectl(&self.admin_kc, args).await
    }
}

pub async fn client(kubeconfig_text: &str) -> Client {
    let kc = Kubeconfig::from_yaml(kubeconfig_text).expect("kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(cfg).expect("client")
}

/// A PEM CSR and its key (PEM), with one O per group.
pub fn csr_pem(cn: &str, orgs: &[&str]) -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let der = testcluster::pki::csr_der(&key, cn, orgs);
    (
        testcluster::pki::pem("CERTIFICATE REQUEST", &der),
        key.serialize_pem(),
    )
}

pub fn csr_object(
    name: &str,
    request_pem: &str,
    expiration: Option<i32>,
) -> CertificateSigningRequest {
    CertificateSigningRequest {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: k8s_openapi::ByteString(request_pem.as_bytes().to_vec()),
            signer_name: "kubernetes.io/kube-apiserver-client".into(),
            expiration_seconds: expiration,
            usages: Some(vec!["client auth".into()]),
            ..Default::default()
        },
        status: None,
    }
}

pub fn csr_yaml(name: &str, request_pem: &str, expiration: i64) -> String {
    use base64::Engine;
    format!(
        "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: {name}\nspec:\n  request: {}\n  signerName: kubernetes.io/kube-apiserver-client\n  expirationSeconds: {expiration}\n  usages: [client auth]\n",
        base64::engine::general_purpose::STANDARD.encode(request_pem)
    )
}

/// Waits with a watch (no polling sleeps) until `done` holds for the named CSR.
pub async fn watch_csr(
    client: &Client,
    name: &str,
    done: impl Fn(&CertificateSigningRequest) -> bool,
) -> CertificateSigningRequest {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(20);
    let mut stream = api.watch(&wp, "0").await.expect("watch").boxed();
    while let Some(ev) = stream.next().await {
        match ev.expect("watch event") {
            WatchEvent::Added(c) | WatchEvent::Modified(c) if done(&c) => return c,
            WatchEvent::Error(e) => panic!("watch error: {e:?}"),
            _ => {}
        }
    }
    panic!("CSR {name} never reached the awaited state");
}

pub fn conditions(c: &CertificateSigningRequest) -> String {
    let st = c.status.clone().unwrap_or_default();
    let mut parts: Vec<String> = st
        .conditions
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.status == "True")
        .map(|c| c.type_)
        .collect();
    if st.certificate.is_some() {
        parts.push("Issued".into());
    }
    if parts.is_empty() {
        "Pending".into()
    } else {
        parts.join(",")
    }
}

/// Issues a client certificate through the CSR API as the admin.
pub async fn issue(fx: &Fx, name: &str, cn: &str, orgs: &[&str]) -> (String, String) {
    let (req, key) = csr_pem(cn, orgs);
    let api: Api<CertificateSigningRequest> = Api::all(fx.admin.clone());
    api.create(&PostParams::default(), &csr_object(name, &req, Some(3600)))
        .await
        .unwrap();
    approve(&fx.admin, name).await.unwrap();
    let c = watch_csr(&fx.admin, name, |c| {
        c.status
            .as_ref()
            .and_then(|s| s.certificate.as_ref())
            .is_some()
    })
    .await;
    (
        String::from_utf8(c.status.unwrap().certificate.unwrap().0).unwrap(),
        key,
    )
}

pub async fn approve(
    client: &Client,
    name: &str,
) -> Result<CertificateSigningRequest, kube::Error> {
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let patch = serde_json::json!({"status": {"conditions": [{"type": "Approved", "status": "True", "reason": "Test", "message": "approved by the conformance suite"}]}});
    api.patch_approval(name, &Default::default(), &kube::api::Patch::Merge(&patch))
        .await
}

pub fn api_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => panic!("expected an API error, got {other:?}"),
    }
}

pub fn cert_facts(pem: &str) -> (String, Vec<String>, i64) {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, c) = x509_parser::parse_x509_certificate(&p.contents).unwrap();
    let cn = c
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let o = c
        .subject()
        .iter_organization()
        .map(|o| o.as_str().unwrap().to_string())
        .collect();
    (
        cn,
        o,
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp(),
    )
}
