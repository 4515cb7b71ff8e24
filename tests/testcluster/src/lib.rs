//! A Kubernetes API test server: kube-apiserver plus the kube-controller-manager
//! CSR controllers, for everything rotator touches, faithful enough that the real
//! `kubectl` works against it unmodified. Real HTTPS (rustls), real client
//! certificate and bearer token authentication, real RBAC evaluation.
//!
//! ```no_run
//! # async fn f() -> std::io::Result<()> {
//! let cluster = testcluster::TestCluster::start(testcluster::Options::default()).await?;
//! std::fs::write("admin.kubeconfig", cluster.admin_kubeconfig())?;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod api;
mod authn;
pub mod authz;
pub mod bootstrap;
pub mod csr;
pub mod faults;
pub mod pki;
mod protobuf;
pub mod rbac;
pub mod resources;
pub mod serviceaccounts;
pub mod store;
mod table;
pub mod tokens;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use serde_json::json;
use tokio::task::JoinHandle;

pub use authn::UserInfo;
pub use csr::SignerMode;
pub use faults::{FaultAction, FaultRule, Faults};
use pki::Ca;

#[derive(Debug, Clone)]
pub struct Options {
    /// 0 picks a free port.
    pub port: u16,
    /// Static bearer token for a superuser (user "admin", group system:masters).
    pub admin_token: String,
    /// kube-controller-manager's `--cluster-signing-duration`.
    pub max_signing_duration: Duration,
    pub signer_mode: SignerMode,
    /// CSRs signed per second at most (kube-controller-manager's client QPS limits it to ~20).
    pub signing_rate: Option<f64>,
    /// csrcleaner: approved/denied/failed CSRs are deleted after this long...
    pub csr_decided_ttl: Duration,
    /// ...and pending ones after this long.
    pub csr_pending_ttl: Duration,
    /// Run the tokencleaner (many real clusters do not).
    pub token_cleaner: bool,
    /// How long a successful token authentication is cached (the real API server: about 10s).
    pub token_cache_ttl: Duration,
    /// How often the cleaners run.
    pub cleaner_interval: Duration,
    /// Behave like a pre-1.22 API server, which silently drops `expirationSeconds`:
    /// every certificate gets `max_signing_duration`.
    pub drop_expiration_seconds: bool,
    /// Separate CAs for the serving certificate and for client certificates. The
    /// default (false) is kubeadm's layout: one CA (`/etc/kubernetes/pki/ca.crt`)
    /// signs the serving certificate and every client certificate, so the
    /// kubeconfig's `certificate-authority-data` also verifies issued certificates.
    pub separate_client_ca: bool,
    /// `--service-account-issuer`: the `iss` of the tokens TokenRequest mints.
    pub service_account_issuer: String,
    /// `--api-audiences`: the audiences a token must name to authenticate a
    /// request to this server (kube-apiserver defaults them to the issuer).
    pub api_audiences: Vec<String>,
    /// `--authorization-config`'s `authorizers`, in order (after the
    /// `system:masters` shortcut). Empty means `[RBAC]`, kubeadm's chain; a
    /// chain with webhooks is checked when the cluster starts (see README).
    pub authorizers: Vec<authz::Authorizer>,
}

/// kubeadm's `--service-account-issuer`.
pub const DEFAULT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

impl Default for Options {
    fn default() -> Self {
        Self {
            port: 0,
            admin_token: format!("admin-{}", hex(&pki::random_bytes::<12>())),
            max_signing_duration: Duration::from_secs(365 * 86400),
            signer_mode: SignerMode::Sign,
            signing_rate: None,
            csr_decided_ttl: Duration::from_secs(3600),
            csr_pending_ttl: Duration::from_secs(24 * 3600),
            token_cleaner: true,
            token_cache_ttl: Duration::ZERO,
            cleaner_interval: Duration::from_secs(1),
            drop_expiration_seconds: false,
            separate_client_ca: false,
            service_account_issuer: DEFAULT_ISSUER.into(),
            api_audiences: vec![DEFAULT_ISSUER.into()],
            authorizers: Vec::new(),
        }
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// State every request handler and controller shares.
pub struct Shared {
    pub opts: Options,
    pub store: store::Store,
    pub serving_ca: Ca,
    pub client_ca: Ca,
    /// The service-account token signing key.
    pub sa_signer: tokens::TokenSigner,
    pub faults: Faults,
    pub signer_mode: Mutex<SignerMode>,
    pub(crate) token_cache: Mutex<HashMap<String, (UserInfo, i64)>>,
    clock_offset: AtomicI64,
    bucket: Mutex<(f64, Instant)>,
    pub(crate) shutdown: tokio::sync::watch::Sender<bool>,
    pub url: String,
    /// The authorizer chain built from `opts.authorizers`.
    pub(crate) authorizers: Vec<authz::Entry>,
}

impl Shared {
    /// The cluster's clock (token expiry, cleaner ages, certificate validity):
    /// wall time plus any offset a test added with [`TestCluster::advance_clock`].
    pub fn now(&self) -> i64 {
        pki::now() + self.clock_offset.load(Ordering::SeqCst)
    }

    fn take_signing_token(&self) -> bool {
        let Some(rate) = self.opts.signing_rate else {
            return true;
        };
        let mut b = self.bucket.lock().unwrap();
        let elapsed = b.1.elapsed().as_secs_f64();
        b.0 = (b.0 + elapsed * rate).min(rate.max(1.0));
        b.1 = Instant::now();
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What survives a [`TestCluster::stop`]: objects and CAs, for a restart.
pub struct Snapshot {
    data: store::Data,
    serving: (String, Vec<u8>),
    client: (String, Vec<u8>),
    sa_key: Vec<u8>,
    opts: Options,
}

pub struct TestCluster {
    sh: Arc<Shared>,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct AnyClientCert {
    hints: Vec<DistinguishedName>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }
    // The chain is checked by the authenticator so that a bad certificate is a 401
    // with a Status body, as kube-apiserver answers, rather than a TLS alert.
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    // Possession of the key is still proven in the handshake.
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

fn tls_config(serving_ca: &Ca, client_ca: &Ca) -> std::io::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let (cert_pem, key_pem) = serving_ca.serving_cert();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(std::io::Error::other)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(std::io::Error::other)?;
    let (_, ca) =
        x509_parser::parse_x509_certificate(&client_ca.cert_der).map_err(std::io::Error::other)?;
    let verifier = AnyClientCert {
        hints: vec![DistinguishedName::from(ca.subject().as_raw().to_vec())],
        algs: provider.signature_verification_algorithms,
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(std::io::Error::other)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

impl TestCluster {
    pub async fn start(opts: Options) -> std::io::Result<Self> {
        let serving = ca_parts(&Ca::new("testcluster-ca"));
        let client = if opts.separate_client_ca {
            ca_parts(&Ca::new("testcluster-client-ca"))
        } else {
            serving.clone()
        };
        let snap = Snapshot {
            data: store::Data::default(),
            serving,
            client,
            sa_key: tokens::TokenSigner::generate().pkcs8().to_vec(),
            opts,
        };
        Self::start_from(snap, true).await
    }

    /// Starts again from a snapshot: same CAs, same objects, same port if it is free.
    pub async fn restart(snapshot: Snapshot) -> std::io::Result<Self> {
        Self::start_from(snapshot, false).await
    }

    async fn start_from(snap: Snapshot, seed: bool) -> std::io::Result<Self> {
        let load = |(key, der): (String, Vec<u8>)| -> std::io::Result<Ca> {
            Ok(Ca::from_parts(
                rcgen::KeyPair::from_pem(&key).map_err(std::io::Error::other)?,
                der,
            ))
        };
        let serving_ca = load(snap.serving)?;
        let client_ca = load(snap.client)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", snap.opts.port)).await?;
        let addr = listener.local_addr()?;
        let url = format!("https://127.0.0.1:{}", addr.port());
        let acceptor =
            tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&serving_ca, &client_ca)?));
        let (shutdown, _) = tokio::sync::watch::channel(false);
        let mut opts = snap.opts;
        opts.port = addr.port();
        let authorizers = if opts.authorizers.is_empty() {
            vec![authz::Entry::Rbac]
        } else {
            authz::build(&opts.authorizers)?
        };
        let sh = Arc::new(Shared {
            signer_mode: Mutex::new(opts.signer_mode),
            opts,
            store: store::Store::new(snap.data),
            serving_ca,
            client_ca,
            sa_signer: tokens::TokenSigner::from_pkcs8(&snap.sa_key),
            faults: Faults::default(),
            token_cache: Mutex::new(HashMap::new()),
            clock_offset: AtomicI64::new(0),
            bucket: Mutex::new((0.0, Instant::now())),
            shutdown,
            url,
            authorizers,
        });
        if seed {
            bootstrap::seed(
                &sh.store,
                &sh.url,
                &sh.serving_ca.cert_pem,
                &sh.client_ca.cert_pem,
            );
        }
        let tasks = vec![
            tokio::spawn(serve(listener, acceptor, sh.clone())),
            tokio::spawn(controllers(sh.clone())),
        ];
        Ok(Self { sh, addr, tasks })
    }

    /// Stops serving (open connections and watches are cut) and returns the state.
    pub async fn stop(mut self) -> Snapshot {
        let _ = self.sh.shutdown.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        let data = std::mem::take(&mut *self.sh.store.lock());
        Snapshot {
            data,
            serving: ca_parts(&self.sh.serving_ca),
            client: ca_parts(&self.sh.client_ca),
            sa_key: self.sh.sa_signer.pkcs8().to_vec(),
            opts: self.sh.opts.clone(),
        }
    }

    pub fn url(&self) -> &str {
        &self.sh.url
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn shared(&self) -> &Arc<Shared> {
        &self.sh
    }
    /// The CA that verifies the API server's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.sh.serving_ca.cert_pem
    }
    /// The CA client certificates must chain to (`--client-ca-file`); it signs CSRs too.
    /// The same as [`TestCluster::ca_pem`] unless `Options::separate_client_ca`.
    pub fn client_ca_pem(&self) -> &str {
        &self.sh.client_ca.cert_pem
    }
    /// PKCS#8 PEM of the client CA key, for tests that act as a kubeadm `ca.key` holder.
    pub fn client_ca_key_pem(&self) -> String {
        self.sh.client_ca.key.serialize_pem()
    }
    pub fn admin_token(&self) -> &str {
        &self.sh.opts.admin_token
    }
    pub fn faults(&self) -> &Faults {
        &self.sh.faults
    }
    pub fn set_signer_mode(&self, m: SignerMode) {
        *self.sh.signer_mode.lock().unwrap() = m;
    }
    /// Moves the cluster's clock forward: token expiry, cleaner ages, the validity
    /// of the certificates the signer issues and of client certificates presented.
    pub fn advance_clock(&self, secs: i64) {
        self.sh.clock_offset.fetch_add(secs, Ordering::SeqCst);
    }
    /// Runs csrcleaner and tokencleaner now; returns how many objects they deleted.
    pub fn run_cleaners(&self) -> usize {
        csr::cleaner_pass(&self.sh)
    }
    pub fn store(&self) -> &store::Store {
        &self.sh.store
    }

    /// Creates a ServiceAccount (and its namespace if missing); returns its uid.
    /// An account that exists already is kept.
    pub fn create_service_account(&self, ns: &str, name: &str) -> String {
        bootstrap::ensure_namespace(&self.sh.store, ns, &self.sh.serving_ca.cert_pem);
        let _ = self.sh.store.create(
            ("", "serviceaccounts"),
            ns,
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}}),
        );
        let sa = self
            .sh
            .store
            .get(("", "serviceaccounts"), ns, name)
            .expect("service account");
        sa["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A token for an existing ServiceAccount, as TokenRequest mints it
    /// (`audiences` empty = [`Options::api_audiences`]). `None` if the account
    /// does not exist.
    pub fn service_account_token(
        &self,
        ns: &str,
        name: &str,
        audiences: &[&str],
        expiration: Duration,
    ) -> Option<String> {
        let aud: Vec<String> = audiences.iter().map(|a| a.to_string()).collect();
        tokens::mint(&self.sh, ns, name, &aud, expiration.as_secs() as i64).map(|(t, _)| t)
    }

    /// What Vault's or OpenBao's kubernetes auth method needs to check pods'
    /// tokens against this cluster (`auth/kubernetes/config`): creates the
    /// ServiceAccount `kube-system/token-reviewer`, binds it to
    /// `system:auth-delegator` (TokenReview) and mints its token.
    pub fn vault_kubernetes_auth(&self) -> VaultKubernetesAuth {
        self.create_service_account("kube-system", "token-reviewer");
        let _ = self.sh.store.create(
            ("rbac.authorization.k8s.io", "clusterrolebindings"),
            "",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "token-reviewer-auth-delegator"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
                   "subjects": [{"kind": "ServiceAccount", "name": "token-reviewer", "namespace": "kube-system"}]}),
        );
        VaultKubernetesAuth {
            kubernetes_host: self.sh.url.clone(),
            kubernetes_ca_cert: self.ca_pem().to_string(),
            token_reviewer_jwt: self
                .service_account_token(
                    "kube-system",
                    "token-reviewer",
                    &[],
                    Duration::from_secs(24 * 3600),
                )
                .expect("reviewer account"),
        }
    }

    fn kubeconfig(&self, user: serde_json::Value) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let kc = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "testcluster", "cluster": {"server": self.sh.url, "certificate-authority-data": b64(self.ca_pem())}}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "testcluster", "context": {"cluster": "testcluster", "user": "user"}}],
            "current-context": "testcluster",
        });
        serde_json::to_string_pretty(&kc).expect("json")
    }

    /// A kubeconfig (JSON, which kubectl reads as YAML) with a client certificate.
    pub fn kubeconfig_for_cert(&self, cert_pem: &str, key_pem: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        self.kubeconfig(
            json!({"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}),
        )
    }
    pub fn kubeconfig_for_token(&self, token: &str) -> String {
        self.kubeconfig(json!({"token": token}))
    }
    /// kubeadm-style admin: CN=kubernetes-admin, O=system:masters.
    pub fn admin_kubeconfig(&self) -> String {
        self.user_kubeconfig("kubernetes-admin", &["system:masters"])
    }
    /// A certificate signed directly by the client CA.
    pub fn user_kubeconfig(&self, cn: &str, groups: &[&str]) -> String {
        let (cert, key) = self.sh.client_ca.client_cert(cn, groups, 86400);
        self.kubeconfig_for_cert(&cert, &key)
    }
}

/// The values of Vault's/OpenBao's `auth/kubernetes/config` for this cluster
/// (see [`TestCluster::vault_kubernetes_auth`]). `Debug` leaves out the JWT.
pub struct VaultKubernetesAuth {
    pub kubernetes_host: String,
    pub kubernetes_ca_cert: String,
    pub token_reviewer_jwt: String,
}

impl std::fmt::Debug for VaultKubernetesAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultKubernetesAuth")
            .field("kubernetes_host", &self.kubernetes_host)
            .finish_non_exhaustive()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = self.sh.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn ca_parts(ca: &Ca) -> (String, Vec<u8>) {
    (ca.key.serialize_pem(), ca.cert_der.clone())
}

async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    sh: Arc<Shared>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut stop = sh.shutdown.subscribe();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        tokio::select! {
            r = listener.accept() => {
                let Ok((tcp, _)) = r else { continue };
                let (acceptor, sh) = (acceptor.clone(), sh.clone());
                conns.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| Arc::new(c.to_vec()));
                    let svc = hyper::service::service_fn(move |req| api::handle(sh.clone(), req, peer.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
            // `wait_for` sees a stop sent before this task first ran.
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn controllers(sh: Arc<Shared>) {
    let mut changes = sh.store.subscribe();
    let mut stop = sh.shutdown.subscribe();
    let mut last_clean = Instant::now();
    loop {
        csr::signing_pass(&sh);
        serviceaccounts::token_controller_pass(&sh);
        if last_clean.elapsed() >= sh.opts.cleaner_interval {
            csr::cleaner_pass(&sh);
            last_clean = Instant::now();
        }
        // With a signing rate limit, throttled CSRs are retried promptly.
        let tick = if sh.opts.signing_rate.is_some() {
            Duration::from_millis(5)
        } else {
            Duration::from_millis(250)
        };
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
