//! Kubernetes, through kube only: the connection, bounded retries, CSRs and RBAC.
use std::future::Future;
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::config::KubernetesSettings;
use crate::support::exit::{Exit, ExitStatus};

pub mod bootstrap_tokens;
pub mod csr;
pub mod findings;
pub mod lease;
pub mod rbac;

pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "rotator");
/// Label carrying a hash of the user name (label values cannot hold every user name).
pub const USER_LABEL: &str = "rotator.io/user-hash";
/// Annotation carrying the user name itself.
pub const USER_ANNOTATION: &str = "rotator.io/user";
/// Annotation naming the rotator instance (database) that made an object. A
/// label anyone may strip says "managed by rotator"; this says by which one.
pub const INSTANCE_ANNOTATION: &str = "rotator.io/instance";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "cannot load the Kubernetes connection ({source_desc}): {reason}\nfix: pass --kubeconfig FILE, set KUBECONFIG, or run in a pod with a service account"
    )]
    Config { source_desc: String, reason: String },
    #[error("the Kubernetes API refused {what}: {code} {reason}: {message}{fix}")]
    Api {
        what: String,
        code: u16,
        reason: String,
        message: String,
        fix: String,
    },
    #[error(
        "cannot reach the Kubernetes API server for {what} after {attempts} attempts: {reason}\nfix: check the server URL and the network, then run the command again: it finishes or cleans up whatever this attempt left in the cluster"
    )]
    Unreachable {
        what: String,
        attempts: u32,
        reason: String,
    },
    #[error(
        "CSR {name} was denied: {reason}: {message}\nfix: a policy in the cluster refused it; ask the cluster admins, or check the request"
    )]
    Denied {
        name: String,
        reason: String,
        message: String,
    },
    #[error(
        "CSR {name} failed to be signed: {reason}: {message}\nfix: check kube-controller-manager's csrsigning controller and its logs"
    )]
    Failed {
        name: String,
        reason: String,
        message: String,
    },
    #[error(
        "CSR {name} was approved but not signed within {timeout:?}\nfix: is kube-controller-manager running with the csrsigning controller (--cluster-signing-cert-file)? raise kubernetes.signing_timeout if it is slow"
    )]
    Timeout { name: String, timeout: Duration },
    #[error("{0}")]
    Conflict(String),
    /// The API server's authorization refused what rotator would have to do.
    #[error("{0}")]
    Forbidden(String),
    #[error("unexpected answer from the API server: {0}")]
    Invalid(String),
}

impl ExitStatus for ClusterError {
    fn exit(&self) -> Exit {
        match self {
            ClusterError::Config { .. } => Exit::Config,
            ClusterError::Conflict(_) => Exit::Conflict,
            ClusterError::Forbidden(_) => Exit::Refused,
            _ => Exit::Signer,
        }
    }
}

/// A connected client and what rotator learned about the cluster.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    /// The server URL this connection uses.
    pub url: String,
    /// The CA bundle this connection trusts for the server, PEM, if it has one.
    pub server_ca_pem: Option<String>,
    /// The instance id of the database this process works for (`App::instance`).
    pub instance: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// `--kubeconfig`/`kubernetes.kubeconfig`, else `KUBECONFIG` and `~/.kube/config`,
    /// else the in-cluster service account — kube's own loading in every case.
    pub async fn connect(s: &KubernetesSettings) -> Result<Self, ClusterError> {
        let opts = KubeConfigOptions {
            context: s.context.clone(),
            ..Default::default()
        };
        let (config, desc) = match &s.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path).map_err(|e| ClusterError::Config {
                    source_desc: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let c = kube::Config::from_custom_kubeconfig(kc, &opts)
                    .await
                    .map_err(|e| ClusterError::Config {
                        source_desc: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                (c, path.display().to_string())
            }
            None => match kube::Config::from_kubeconfig(&opts).await {
                Ok(c) => (c, "KUBECONFIG or ~/.kube/config".to_string()),
                Err(kerr) => match kube::Config::incluster() {
                    Ok(c) => (c, "in-cluster service account".to_string()),
                    Err(ierr) => {
                        return Err(ClusterError::Config {
                            source_desc: "KUBECONFIG, ~/.kube/config, in-cluster".into(),
                            reason: format!("{kerr}; {ierr}"),
                        });
                    }
                },
            },
        };
        let url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let server_ca_pem = config.root_cert.as_ref().map(|certs| {
            certs
                .iter()
                .map(|d| crate::pki::pem_encode("CERTIFICATE", d))
                .collect::<String>()
        });
        let client = kube::Client::try_from(config).map_err(|e| ClusterError::Config {
            source_desc: desc,
            reason: e.to_string(),
        })?;
        Ok(Self {
            client,
            url,
            server_ca_pem,
            instance: String::new(),
        })
    }

    pub fn from_client(client: kube::Client, url: String, server_ca_pem: Option<String>) -> Self {
        Self {
            client,
            url,
            server_ca_pem,
            instance: String::new(),
        }
    }
}

/// Backoff for retries: bounded, exponential, with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            attempts: 6,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(3),
        }
    }
}

impl Backoff {
    fn delay(&self, attempt: u32) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.cap);
        let r = u64::from_le_bytes(crate::pki::random_bytes::<8>());
        Duration::from_nanos(r % (exp.as_nanos() as u64 + 1))
    }
}

fn retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// Turns a kube error into a ClusterError that says what was being done.
pub fn describe(what: &str, e: kube::Error) -> ClusterError {
    match e {
        kube::Error::Api(s) => {
            let fix = match s.code {
                401 => "\nfix: the credentials in the kubeconfig are not accepted; refresh them",
                403 => {
                    "\nfix: rotator's identity lacks this permission; apply deploy/kubernetes/rbac.yaml"
                }
                _ => "",
            };
            ClusterError::Api {
                what: what.into(),
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
                fix: fix.into(),
            }
        }
        other => ClusterError::Unreachable {
            what: what.into(),
            attempts: 1,
            reason: other.to_string(),
        },
    }
}

/// Runs `f` until it succeeds, fails for good, or the attempts run out. Only
/// transient failures (429, 5xx, transport) are retried.
pub async fn retry<T, F, Fut>(what: &str, backoff: Backoff, mut f: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) && attempt + 1 < backoff.attempts => {
                tracing::warn!(what, attempt, error = %short(&e), "transient Kubernetes API failure; retrying");
                tokio::time::sleep(backoff.delay(attempt)).await;
                attempt += 1;
            }
            Err(e) if retryable(&e) => {
                return Err(ClusterError::Unreachable {
                    what: what.into(),
                    attempts: attempt + 1,
                    reason: short(&e),
                });
            }
            Err(e) => return Err(describe(what, e)),
        }
    }
}

fn short(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        other => other.to_string(),
    }
}

pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Cluster {
    /// Metadata for an object rotator makes for a user: `managed_meta` plus the
    /// instance annotation.
    pub fn owned_meta(&self, name: &str, user: &str) -> kube::api::ObjectMeta {
        let mut m = managed_meta(name, user);
        m.annotations
            .get_or_insert_with(Default::default)
            .insert(INSTANCE_ANNOTATION.into(), self.instance.clone());
        m
    }

    /// Whether this instance made `meta`'s object. Objects from before instance
    /// annotations existed (none at all) count as this instance's.
    pub fn owns(&self, meta: &kube::api::ObjectMeta) -> bool {
        match meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(INSTANCE_ANNOTATION))
        {
            Some(i) => *i == self.instance,
            None => true,
        }
    }
}

/// Metadata for an object rotator makes for a user: its name, rotator's label,
/// the user's hash label, and the user name in an annotation.
pub fn managed_meta(name: &str, user: &str) -> kube::api::ObjectMeta {
    kube::api::ObjectMeta {
        name: Some(name.into()),
        labels: Some(
            [
                (MANAGED_BY.0.into(), MANAGED_BY.1.into()),
                (USER_LABEL.into(), user_hash(user)),
            ]
            .into(),
        ),
        annotations: Some([(USER_ANNOTATION.into(), user.into())].into()),
        ..Default::default()
    }
}

/// Label value for a user: label values are at most 63 of [A-Za-z0-9._-], user
/// names are not, so it is a hash; the name itself goes in an annotation.
pub fn user_hash(user: &str) -> String {
    crate::pki::hex(&crate::pki::sha256(user.as_bytes())[..16])
}

/// Where the API server URL and CA bundle written into kubeconfigs came from.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub server: String,
    pub ca_pem: String,
    /// For `doctor`: e.g. "config", "kube-public/cluster-info", "rotator's own kubeconfig".
    pub source: String,
}

impl Cluster {
    async fn configmap(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<Option<k8s_openapi::api::core::v1::ConfigMap>, ClusterError> {
        let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(self.client.clone(), ns);
        retry(
            &format!("reading ConfigMap {ns}/{name}"),
            Backoff::default(),
            || async {
                match api.get(name).await {
                    Ok(c) => Ok(Some(c)),
                    Err(e)
                        if is_not_found(&e)
                            || matches!(&e, kube::Error::Api(s) if s.code == 403) =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await
    }

    /// The API server's client CA, as it publishes it for aggregated servers.
    pub async fn client_ca_from_cluster(&self) -> Result<String, ClusterError> {
        let cm = self
            .configmap("kube-system", "extension-apiserver-authentication")
            .await?;
        cm.and_then(|c| c.data).and_then(|d| d.get("client-ca-file").cloned()).ok_or_else(|| {
            ClusterError::Invalid(
                "the cluster's client CA is not readable from kube-system/extension-apiserver-authentication\nfix: set kubernetes.client_ca_file to the API server's --client-ca-file, or grant rotator get on that ConfigMap".into(),
            )
        })
    }

    /// The server URL and CA for kubeconfigs: kubeadm's `cluster-info`, else the
    /// connection rotator itself uses (its URL, and its CA or `kube-root-ca.crt`).
    pub async fn endpoint_from_cluster(&self) -> Result<Endpoint, ClusterError> {
        if let Some(kc) = self
            .configmap("kube-public", "cluster-info")
            .await?
            .and_then(|c| c.data)
            .and_then(|d| d.get("kubeconfig").cloned())
            && let Ok(k) = Kubeconfig::from_yaml(&kc)
            && let Some(c) = k.clusters.first().and_then(|c| c.cluster.clone())
        {
            use base64::Engine;
            let ca = c
                .certificate_authority_data
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|b| String::from_utf8(b).ok());
            if let (Some(server), Some(ca_pem)) = (c.server, ca) {
                return Ok(Endpoint {
                    server,
                    ca_pem,
                    source: "kube-public/cluster-info".into(),
                });
            }
        }
        let ca_pem = match &self.server_ca_pem {
            Some(p) => p.clone(),
            None => self
                .configmap("default", "kube-root-ca.crt")
                .await?
                .and_then(|c| c.data)
                .and_then(|d| d.get("ca.crt").cloned())
                .ok_or_else(|| {
                    ClusterError::Invalid(
                        "no CA bundle for the API server\nfix: set cluster.ca_file".into(),
                    )
                })?,
        };
        Ok(Endpoint {
            server: self.url.clone(),
            ca_pem,
            source: "rotator's own connection".into(),
        })
    }
}

/// Checks that `ca_pem` verifies the TLS server at `server` (an https URL), with
/// a real handshake: what a user's kubectl will do with the kubeconfig.
pub fn check_server_ca(server: &str, ca_pem: &str) -> Result<(), String> {
    use std::io::Write;
    use std::sync::Arc;
    let rest = server
        .strip_prefix("https://")
        .ok_or("the server URL is not https")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or("bad IPv6 address")?;
        (
            h.to_string(),
            p.strip_prefix(':').unwrap_or("443").to_string(),
        )
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.to_string()),
            None => (authority.to_string(), "443".to_string()),
        }
    };
    let mut roots = rustls::RootCertStore::empty();
    for der in crate::pki::pem_to_der_certs(ca_pem, "CA bundle").map_err(|e| e.to_string())? {
        roots
            .add(rustls_pki_types::CertificateDer::from(der))
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(
        host.as_str(),
        port.parse::<u16>().map_err(|e| e.to_string())?,
    ))
    .map_err(|e| format!("cannot resolve {host}: {e}"))?
    .next()
    .ok_or("no address")?;
    let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    tls.flush()
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(tls.sock)
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
    }
    Ok(())
}

/// What rotator may do with the Secret a user's kubeconfigs are delivered to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretAccess {
    /// rotator may create it and replace it later.
    Granted,
    /// `create` on secrets in the namespace is missing.
    NoCreate,
    /// `update` on this Secret's name is missing (rotations would fail).
    NoUpdate,
}

impl Cluster {
    fn kubeconfig_secret(
        &self,
        ns: &str,
        name: &str,
        user: &str,
        kubeconfig: &str,
        uid: Option<&str>,
    ) -> k8s_openapi::api::core::v1::Secret {
        k8s_openapi::api::core::v1::Secret {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                uid: uid.map(str::to_string),
                ..self.owned_meta(name, user)
            },
            type_: Some("Opaque".into()),
            data: Some(
                [(
                    "kubeconfig".to_string(),
                    k8s_openapi::ByteString(kubeconfig.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Default::default()
        }
    }

    fn foreign_secret(ns: &str, name: &str) -> ClusterError {
        ClusterError::Conflict(format!(
            "Secret {ns}/{name} already exists and rotator did not create it: rotator writes only Opaque Secrets it created itself, so it never takes over someone else's Secret (nor one of another type, such as a TLS Secret)\nfix: choose another name (--deliver secret:{ns}/OTHER-NAME, and grant it in rbac-secret-delivery.yaml), or delete that Secret if it is an old copy of this kubeconfig"
        ))
    }

    /// Whether rotator may create the kubeconfig Secret `ns/name` now: a dry-run
    /// create, since rotator may not read Secrets. A Secret of that name that
    /// exists is someone else's ([`ClusterError::Conflict`]); the caller knows
    /// the ones rotator made (by uid) and does not ask about those.
    pub async fn kubeconfig_secret_free(
        &self,
        ns: &str,
        name: &str,
        user: &str,
    ) -> Result<(), ClusterError> {
        use k8s_openapi::api::core::v1::Secret;
        let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), ns);
        let secret = self.kubeconfig_secret(ns, name, user, "", None);
        let pp = kube::api::PostParams {
            dry_run: true,
            ..Default::default()
        };
        retry(
            &format!("checking Secret {ns}/{name}"),
            Backoff::default(),
            || async {
                match api.create(&pp, &secret).await {
                    Ok(_) => Ok(Ok(())),
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        Ok(Err(Self::foreign_secret(ns, name)))
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await?
    }

    /// Asks the API server (SelfSubjectAccessReview) whether rotator may create
    /// `ns/name` and replace it later, so that a missing grant is found before
    /// anything is issued rather than at the first rotation.
    pub async fn kubeconfig_secret_access(
        &self,
        ns: &str,
        name: &str,
    ) -> Result<SecretAccess, ClusterError> {
        use k8s_openapi::api::authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let api: kube::Api<SelfSubjectAccessReview> = kube::Api::all(self.client.clone());
        for (verb, missing) in [
            ("create", SecretAccess::NoCreate),
            ("update", SecretAccess::NoUpdate),
        ] {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        resource: Some("secrets".into()),
                        namespace: Some(ns.into()),
                        name: (verb == "update").then(|| name.to_string()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let pp = kube::api::PostParams::default();
            let r = retry(
                &format!("asking whether rotator may {verb} Secret {ns}/{name}"),
                Backoff::default(),
                || api.create(&pp, &review),
            )
            .await?;
            if !r.status.is_some_and(|s| s.allowed) {
                return Ok(missing);
            }
        }
        Ok(SecretAccess::Granted)
    }

    /// Writes the kubeconfig into the Secret rotator created, without ever
    /// reading a Secret: with `uid` (recorded when rotator created it) a replace
    /// conditional on that uid, so a Secret that someone deleted and made again
    /// is refused, not overwritten; a Secret that is gone is created again;
    /// without `uid`, a create, which refuses any Secret of that name that
    /// exists. Returns the uid of a Secret it created.
    pub async fn write_kubeconfig_secret(
        &self,
        ns: &str,
        name: &str,
        user: &str,
        kubeconfig: &str,
        uid: Option<&str>,
    ) -> Result<Option<String>, ClusterError> {
        use k8s_openapi::api::core::v1::Secret;
        let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), ns);
        let pp = kube::api::PostParams::default();
        if let Some(uid) = uid {
            let secret = self.kubeconfig_secret(ns, name, user, kubeconfig, Some(uid));
            let replaced = retry(&format!("writing Secret {ns}/{name}"), Backoff::default(), || async {
                match api.replace(name, &pp, &secret).await {
                    Ok(_) => Ok(Ok(true)),
                    Err(e) if is_not_found(&e) => Ok(Ok(false)),
                    Err(kube::Error::Api(s)) if s.code == 409 => Ok(Err(ClusterError::Conflict(format!(
                        "Secret {ns}/{name} is no longer the Secret rotator created (uid {uid}): someone deleted it and made another of that name, which rotator does not overwrite\nfix: delete Secret {ns}/{name} so that rotator creates its own again"
                    )))),
                    Err(e) => Err(e),
                }
            })
            .await??;
            if replaced {
                return Ok(None);
            }
        }
        let secret = self.kubeconfig_secret(ns, name, user, kubeconfig, None);
        let created = retry(
            &format!("creating Secret {ns}/{name}"),
            Backoff::default(),
            || async {
                match api.create(&pp, &secret).await {
                    Ok(s) => Ok(Ok(s)),
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        Ok(Err(Self::foreign_secret(ns, name)))
                    }
                    Err(e) => Err(e),
                }
            },
        )
        .await??;
        created.metadata.uid.map(Some).ok_or_else(|| {
            ClusterError::Invalid(format!("the created Secret {ns}/{name} has no uid"))
        })
    }
}
