//! Typed configuration: loaded once (defaults, then the file, then `ROTATOR_*`
//! environment variables, then CLI flags), validated into [`Settings`], passed down.
//! Nothing reads configuration from globals.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::pki::KeyType;
use crate::policy::{Pattern, Policy};
use crate::support::exit::{Exit, ExitStatus};

/// Environment variables that are not configuration keys.
/// `ROTATOR_REQUIRE_ALL` is the test suite's (scripts/test): every test must run.
const RESERVED_ENV: &[&str] = &[
    "ROTATOR_CONFIG",
    "ROTATOR_LOG",
    "ROTATOR_FAULT",
    "ROTATOR_REQUIRE_ALL",
];
/// The config file's sections. `ROTATOR_<SECTION>` alone is never configuration
/// (a section is not a value): `ROTATOR_SERVER` is `fetch --server`'s variable,
/// and only `ROTATOR_SERVER__<KEY>` sets a key of `[server]`.
const SECTIONS: &[&str] = &[
    "cluster",
    "kubernetes",
    "leader_election",
    "local_ca",
    "policy",
    "rotation",
    "schedule",
    "server",
    "sealing",
    "signer_service",
    "vault_pki",
    "vault",
    "authz",
];
pub const DEFAULT_CONFIG_PATH: &str = "config/rotator.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source}\nfix: check the path given by --config or ROTATOR_CONFIG"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{origin}: {message}\nfix: see config/rotator.toml for every key, its type and its default"
    )]
    Parse { origin: String, message: String },
    #[error("{origin}: key `{key}` = {value:?}: {problem}\nfix: {fix}")]
    Invalid {
        origin: String,
        key: String,
        value: String,
        problem: String,
        fix: String,
    },
}

impl ExitStatus for ConfigError {
    fn exit(&self) -> Exit {
        Exit::Config
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SignerKind {
    /// Sign with a CA key rotator holds: the zero-setup default.
    #[default]
    LocalCa,
    /// The cluster's CertificateSigningRequest API: the production choice.
    Kubernetes,
    /// Vault's PKI engine (`<mount>/sign-verbatim/<role>`), for an API server
    /// that trusts Vault's CA.
    VaultPki,
}

impl SignerKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SignerKind::LocalCa => "local-ca",
            SignerKind::Kubernetes => "kubernetes",
            SignerKind::VaultPki => "vault-pki",
        }
    }
}

impl FromStr for SignerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local-ca" => Ok(SignerKind::LocalCa),
            "kubernetes" => Ok(SignerKind::Kubernetes),
            "vault-pki" => Ok(SignerKind::VaultPki),
            other => Err(format!(
                "unknown signer {other:?} (expected local-ca, kubernetes or vault-pki)"
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    signer: Option<SignerKind>,
    metrics_addr: String,
    cluster: ClusterSection,
    kubernetes: KubernetesSection,
    leader_election: LeaderSection,
    local_ca: LocalCaSection,
    policy: PolicySection,
    rotation: RotationSection,
    schedule: ScheduleSection,
    server: ServerSection,
    sealing: SealingSection,
    audit: AuditSection,
    signer_service: SignerServiceSection,
    vault_pki: VaultPkiSection,
    vault: crate::vault::VaultSection,
    authz: AuthzSection,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            data_dir: None,
            database_url: None,
            signer: None,
            metrics_addr: "127.0.0.1:9464".into(),
            cluster: ClusterSection::default(),
            kubernetes: KubernetesSection::default(),
            leader_election: LeaderSection::default(),
            local_ca: LocalCaSection::default(),
            policy: PolicySection::default(),
            rotation: RotationSection::default(),
            schedule: ScheduleSection::default(),
            server: ServerSection::default(),
            sealing: SealingSection::default(),
            audit: AuditSection::default(),
            signer_service: SignerServiceSection::default(),
            vault_pki: VaultPkiSection::default(),
            vault: crate::vault::VaultSection::default(),
            authz: AuthzSection::default(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ClusterSection {
    name: String,
    server: Option<String>,
    ca_file: Option<PathBuf>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        Self {
            name: "kubernetes".into(),
            server: None,
            ca_file: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LeaderSection {
    enabled: bool,
    namespace: String,
    name: String,
    lease_duration: String,
}

impl Default for LeaderSection {
    fn default() -> Self {
        Self {
            enabled: false,
            namespace: "rotator".into(),
            name: "rotator".into(),
            lease_duration: "15s".into(),
        }
    }
}

/// Several daemons, one leader: only the Lease holder runs the jobs.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub namespace: String,
    pub name: String,
    pub lease_duration: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct KubernetesSection {
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    client_ca_file: Option<PathBuf>,
    signing_timeout: String,
}

impl Default for KubernetesSection {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            context: None,
            client_ca_file: None,
            signing_timeout: "2m".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LocalCaSection {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    socket: Option<PathBuf>,
    common_name: String,
    validity: String,
}

/// `[signer_service]`: the separate `rotator signer` process that alone holds the
/// local CA key (the top-level `signer` key already names the signer kind).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SignerServiceSection {
    socket: Option<PathBuf>,
    max_ttl: String,
    allowed_uids: Vec<u32>,
    rate_per_second: u32,
    burst: u32,
    max_body_bytes: usize,
    log_file: Option<PathBuf>,
}

impl Default for SignerServiceSection {
    fn default() -> Self {
        Self {
            socket: None,
            max_ttl: "24h".into(),
            allowed_uids: Vec::new(),
            rate_per_second: 50,
            burst: 100,
            max_body_bytes: 64 * 1024,
            log_file: None,
        }
    }
}

/// `[vault_pki]`: the `vault-pki` signer's PKI mount and role (the connection
/// itself is `[vault]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct VaultPkiSection {
    mount: String,
    role: Option<String>,
    socket: Option<PathBuf>,
    in_process: bool,
}

impl Default for VaultPkiSection {
    fn default() -> Self {
        Self {
            mount: "pki".into(),
            role: None,
            socket: None,
            in_process: false,
        }
    }
}

/// Where the `vault-pki` signer signs: `<mount>/sign-verbatim/<role>`.
#[derive(Debug, Clone)]
pub struct VaultPkiSettings {
    pub mount: String,
    /// `None` when not configured: the vault-pki signer then refuses to start.
    pub role: Option<String>,
    /// Sign through the `rotator signer` process listening here, which alone
    /// holds a Vault token that may sign.
    pub socket: Option<PathBuf>,
    /// This process signs with its own Vault token, on purpose: that token can
    /// then have Vault sign any subject (`O=system:masters` included).
    pub in_process: bool,
}

/// What `rotator signer` enforces, whatever the daemon asks.
#[derive(Debug, Clone)]
pub struct SignerServiceSettings {
    pub socket: PathBuf,
    pub max_ttl: Duration,
    /// Peer uids (SO_PEERCRED) that may ask; empty: any peer that can open the socket.
    pub allowed_uids: Vec<u32>,
    pub rate_per_second: u32,
    pub burst: u32,
    pub max_body_bytes: usize,
    /// Append-only JSON lines of every signature and refusal (0600).
    pub log_file: PathBuf,
}

pub const DEFAULT_SIGNER_SOCKET: &str = "/run/rotator/signer.sock";

impl Default for LocalCaSection {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            socket: None,
            common_name: "rotator local CA".into(),
            validity: "3650d".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PolicySection {
    allowed_roles: Vec<String>,
    allowed_namespaces: Vec<String>,
    allowed_groups: Vec<String>,
    denied_groups: Vec<String>,
    default_ttl: String,
    min_ttl: String,
    max_ttl: String,
    default_key_type: String,
    allow_cluster_role_bindings: bool,
    default_token_ttl: String,
    max_token_ttl: String,
    allow_non_expiring_tokens: bool,
}

impl Default for PolicySection {
    fn default() -> Self {
        Self {
            allowed_roles: vec!["view".into(), "edit".into(), "admin".into()],
            allowed_namespaces: vec!["*".into()],
            allowed_groups: vec!["*".into()],
            denied_groups: vec![crate::policy::DENIED_GROUPS_DEFAULTS.into()],
            default_ttl: "24h".into(),
            min_ttl: "10m".into(),
            max_ttl: "7d".into(),
            default_key_type: "ecdsa-p256".into(),
            allow_cluster_role_bindings: false,
            default_token_ttl: "24h".into(),
            max_token_ttl: "7d".into(),
            allow_non_expiring_tokens: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RotationSection {
    renew_fraction: f64,
    renew_before: Option<String>,
    jitter: f64,
    grace_period: String,
    concurrency: usize,
    delivery_dir: Option<PathBuf>,
}

impl Default for RotationSection {
    fn default() -> Self {
        Self {
            renew_fraction: 1.0 / 3.0,
            renew_before: None,
            jitter: 0.1,
            grace_period: "10m".into(),
            concurrency: 4,
            delivery_dir: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SealingSection {
    key_file: Option<PathBuf>,
}

/// The key that seals private keys of stored-but-undelivered credentials.
#[derive(Debug, Clone)]
pub struct SealingSettings {
    pub key_file: PathBuf,
    /// True when the path was configured: rotator then never creates it.
    pub configured: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AuditSection {
    key_file: Option<PathBuf>,
    checkpoint_file: Option<PathBuf>,
}

/// The audit chain's HMAC key and head checkpoint, both outside the database.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    pub key_file: PathBuf,
    /// True when the key path was configured: rotator then never creates it.
    pub key_configured: bool,
    pub checkpoint_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerSection {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    hostnames: Vec<String>,
    public_url: Option<String>,
    enroll_token_ttl: String,
    rate_limit_per_address: u32,
    rate_limit_per_user: u32,
    max_connections: u32,
    max_connections_per_address: u32,
    header_timeout: String,
    body_timeout: String,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: None,
            tls_cert: None,
            tls_key: None,
            hostnames: vec!["localhost".into(), "127.0.0.1".into()],
            public_url: None,
            enroll_token_ttl: "1h".into(),
            rate_limit_per_address: 60,
            rate_limit_per_user: 12,
            max_connections: 256,
            max_connections_per_address: 16,
            header_timeout: "5s".into(),
            body_timeout: "10s".into(),
        }
    }
}

/// The HTTPS API users fetch their credentials from (self-service).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// `None`: `serve` runs no user API.
    pub listen: Option<SocketAddr>,
    /// The serving certificate and key; `None`: issued by the local CA.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Names in a serving certificate rotator issues itself.
    pub hostnames: Vec<String>,
    /// The URL users reach the API at, printed with enrollment tokens.
    pub public_url: Option<String>,
    pub enroll_token_ttl: Duration,
    /// Requests a minute from one source address (burst: the same number).
    pub rate_limit_per_address: u32,
    /// Requests a minute for one user.
    pub rate_limit_per_user: u32,
    /// Connections the API holds open at once, in all and from one address
    /// (`max_connections_per_address <= max_connections`).
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// How long a connection may take to send a request's headers (also the
    /// TLS handshake, and idle time between requests on a kept-alive connection).
    pub header_timeout: Duration,
    /// How long a request may take to send its body.
    pub body_timeout: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct AuthzSection {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    hostnames: Vec<String>,
    client_ca_file: Option<PathBuf>,
    refresh_interval: String,
    max_staleness: Option<String>,
    deny_unknown_users: bool,
    apiserver_config: Option<PathBuf>,
}

impl Default for AuthzSection {
    fn default() -> Self {
        Self {
            listen: None,
            tls_cert: None,
            tls_key: None,
            hostnames: vec!["localhost".into(), "127.0.0.1".into()],
            client_ca_file: None,
            refresh_interval: "1s".into(),
            max_staleness: None,
            deny_unknown_users: false,
            apiserver_config: None,
        }
    }
}

/// The authorization webhook the API server asks about rotator's identities.
#[derive(Debug, Clone)]
pub struct AuthzSettings {
    /// `None`: `serve` runs no webhook.
    pub listen: Option<SocketAddr>,
    /// The serving certificate and key; `None`: issued by the local CA.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Names in a serving certificate rotator issues itself.
    pub hostnames: Vec<String>,
    /// The CA of the API server's client certificate; a client without a
    /// certificate from it fails the handshake. `None`: any client (doctor warns).
    pub client_ca_file: Option<PathBuf>,
    /// The longest the in-memory states lag a change another process made.
    pub refresh_interval: Duration,
    /// How long the webhook answers from states it could not refresh (the
    /// database unreachable) before it answers 503, so the API server's
    /// failurePolicy applies; default three refresh intervals.
    pub max_staleness: Duration,
    /// Refuse generation groups of users this database never had (one rotator per cluster).
    pub deny_unknown_users: bool,
    /// The API server's `--authorization-config` file, when readable here:
    /// `doctor` checks it asks the webhook.
    pub apiserver_config: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ScheduleSection {
    rotate: String,
    expire: String,
    reconcile: String,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            rotate: "0 * * * * *".into(),
            expire: "30 * * * * *".into(),
            reconcile: "0 */10 * * * *".into(),
        }
    }
}

/// When a credential enters its renewal window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RenewWindow {
    /// The last `f` of the certificate's real lifetime (0 < f < 1).
    Fraction(f64),
    /// A fixed time before `notAfter`.
    Before(Duration),
}

#[derive(Debug, Clone)]
pub struct CronSchedule {
    pub expression: String,
    pub schedule: cron::Schedule,
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The name used for the cluster entry in rendered kubeconfigs.
    pub name: String,
    /// The API server URL written into rendered kubeconfigs; `None`: from the
    /// cluster (kubernetes signer) or `https://127.0.0.1:6443` (local-ca).
    pub server: Option<String>,
    /// CA bundle that verifies the API server; `None`: from the cluster, or the local CA.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct KubernetesSettings {
    /// `None`: `KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// The API server's client CA; `None`: read from kube-system/extension-apiserver-authentication.
    pub client_ca_file: Option<PathBuf>,
    /// How long to wait for a CSR to be signed.
    pub signing_timeout: Duration,
}

pub const LOCAL_DEFAULT_SERVER: &str = "https://127.0.0.1:6443";

#[derive(Debug, Clone)]
pub struct LocalCaSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// True when the paths were configured: rotator then never creates them.
    /// With `socket`: when `cert_file` was, the CA the signer must have.
    pub configured: bool,
    /// `local_ca.socket`: sign through a `rotator signer` process; the key file is
    /// then never read by this process.
    pub socket: Option<PathBuf>,
    pub common_name: String,
    pub validity: Duration,
}

#[derive(Debug, Clone)]
pub struct RotationSettings {
    pub window: RenewWindow,
    pub jitter: f64,
    pub grace_period: Duration,
    /// Reissues the rotate job runs at once.
    pub concurrency: usize,
    /// Where the daemon delivers reissued kubeconfigs: one `<user>.kubeconfig` each.
    pub delivery_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ScheduleSettings {
    pub rotate: CronSchedule,
    pub expire: CronSchedule,
    pub reconcile: CronSchedule,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the configuration came from, for `doctor` and error messages.
    pub origin: String,
    /// The file the configuration was read from, if any: `serve` reloads when it changes.
    pub file: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Where the database is (`database_url`; default the data directory's
    /// `rotator.db`). Shown without its password.
    pub database: crate::store::Location,
    /// The signer asked for; `None` when nothing chose one (the database's record,
    /// or local-ca for a new one, decides).
    pub signer: Option<SignerKind>,
    pub kubernetes: KubernetesSettings,
    /// `None`: this daemon runs the jobs alone.
    pub leader_election: Option<LeaderElection>,
    pub metrics_addr: SocketAddr,
    pub cluster: ClusterSettings,
    pub local_ca: LocalCaSettings,
    pub policy: Policy,
    pub rotation: RotationSettings,
    pub schedule: ScheduleSettings,
    pub server: ServerSettings,
    pub sealing: SealingSettings,
    pub audit: AuditSettings,
    pub signer_service: SignerServiceSettings,
    pub vault_pki: VaultPkiSettings,
    /// `[vault]`; `None` when `vault.address` is not set.
    pub vault: Option<crate::vault::VaultSettings>,
    pub authz: AuthzSettings,
}

impl Settings {
    /// The SQLite database file (`DATA_DIR/rotator.db` unless `database_url`
    /// names another); `None` on PostgreSQL.
    pub fn database_file(&self) -> Option<PathBuf> {
        self.database.file().map(Path::to_path_buf)
    }
}

/// Overrides that come from CLI flags; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    /// `--database-url`.
    pub database_url: Option<String>,
    pub metrics_addr: Option<String>,
    pub signer: Option<SignerKind>,
    pub kubeconfig: Option<PathBuf>,
    /// `serve --api-addr`.
    pub api_addr: Option<String>,
    /// `serve --authz-addr`.
    pub authz_addr: Option<String>,
}

/// Finds the config file: `--config`, then `ROTATOR_CONFIG`, then
/// `config/rotator.toml` if it exists, else built-in defaults.
pub fn locate(explicit: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = env("ROTATOR_CONFIG").filter(|s| !s.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let default = PathBuf::from(DEFAULT_CONFIG_PATH);
    default.exists().then_some(default)
}

/// Loads from the process environment.
pub fn load(explicit: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
    let env = |k: &str| std::env::var(k).ok();
    let vars: Vec<(String, String)> = std::env::vars().collect();
    load_with(locate(explicit, &env).as_deref(), &vars, overrides)
}

/// Loads with an explicit environment, so tests never touch the process's.
pub fn load_with(
    path: Option<&Path>,
    env: &[(String, String)],
    overrides: &Overrides,
) -> Result<Settings, ConfigError> {
    let (mut table, origin) = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.into(),
                source,
            })?;
            let origin = format!("config file {}", p.display());
            // Deserialize the text itself first: its errors carry line and column,
            // and name the file rather than an env var.
            toml::from_str::<FileConfig>(&text)
                .map_err(|e| file_parse_error(&origin, &text, &e))?;
            let table: toml::Table =
                toml::from_str(&text).map_err(|e| file_parse_error(&origin, &text, &e))?;
            (table, origin)
        }
        None => (toml::Table::new(), "built-in defaults".to_string()),
    };
    let mut env_sorted: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("ROTATOR_") && !RESERVED_ENV.contains(&k.as_str()))
        .collect();
    env_sorted.sort();
    // Which keys the environment set, so a value that fails validation later is
    // reported as coming from its variable, not from the file or the defaults.
    let mut from_env = std::collections::BTreeMap::new();
    for (key, raw) in env_sorted {
        let origin = format!("environment variable {key}");
        let path: Vec<String> = key["ROTATOR_".len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if let [only] = path.as_slice()
            && SECTIONS.contains(&only.as_str())
        {
            continue;
        }
        from_env.insert(path.join("."), key.clone());
        if path.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::Parse {
                origin,
                message: "empty key segment (sections are separated by a double underscore: ROTATOR_POLICY__MAX_TTL)".into(),
            });
        }
        set_path(&mut table, &path, parse_env_value(raw));
        table
            .clone()
            .try_into::<FileConfig>()
            .map_err(|e| ConfigError::Parse {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
    }
    let mut file: FileConfig =
        table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
    let vault = std::mem::take(&mut file.vault);
    let mut settings = validate(file, origin.clone(), &from_env, overrides)?;
    let cx = Ctx {
        origin: &origin,
        from_env: &from_env,
    };
    settings.vault = vault
        .validate(env)
        .map_err(|(key, value, problem, fix)| cx.invalid(key, value, problem, fix))?;
    vault_references(&cx, &settings)?;
    settings.file = path.map(Path::to_path_buf);
    Ok(settings)
}

/// Keys that name a secret file may name a `vault:` reference instead: each must
/// parse, and needs `[vault]`.
fn vault_references(cx: &Ctx<'_>, s: &Settings) -> Result<(), ConfigError> {
    use crate::vault::reference::{SHAPE, VaultRef};
    for (key, path) in [
        ("local_ca.cert_file", &s.local_ca.cert_file),
        ("local_ca.key_file", &s.local_ca.key_file),
        ("sealing.key_file", &s.sealing.key_file),
    ] {
        match VaultRef::from_path(path) {
            None => {}
            Some(Err(problem)) => {
                return Err(cx.invalid(
                    key,
                    path.display(),
                    format!("not a Vault reference: {problem}"),
                    format!("write {SHAPE}, e.g. \"vault:secret/rotator/ca#key\""),
                ));
            }
            Some(Ok(_)) if s.vault.is_none() => {
                return Err(cx.invalid(
                    key,
                    path.display(),
                    "a vault: reference, but vault.address is not set",
                    "set [vault] address (and its auth method), or name a file",
                ));
            }
            Some(Ok(_)) => {}
        }
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    // `ROTATOR_POLICY__ALLOWED_ROLES=["view"]` is TOML; `ROTATOR_DATA_DIR=/x` is a plain string.
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let (last, sections) = path.split_last().expect("non-empty path");
    let mut cur = table;
    for s in sections {
        let entry = cur
            .entry(s.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        cur = entry.as_table_mut().expect("just made a table");
    }
    cur.insert(last.clone(), value);
}

/// A syntax or type error in the file, by line and column. The toml crate's own
/// message quotes the offending line: never shown, since the file may not be a
/// config file at all (`--config seal.key`) and its content may be a secret.
fn file_parse_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let ident = |s: &str| {
        let s = s.trim();
        (!s.is_empty()
            && s.len() <= 40
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        .then(|| s.to_string())
    };
    let at = e.span().map(|span| {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.len() - line_start + 1;
        // Name the key, but only a plain lowercase identifier such as every
        // config key is: anything else may be the content of a secret.
        let this_line = text[line_start..].lines().next().unwrap_or_default();
        let key = this_line.split_once('=').and_then(|(k, _)| ident(k));
        let section = before.lines().rev().find_map(|l| {
            l.trim()
                .strip_prefix('[')?
                .strip_suffix(']')
                .and_then(ident)
        });
        let header = this_line
            .trim()
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .and_then(ident);
        match (section, key) {
            _ if header.is_some() => format!(
                "line {line}, column {column} (table [{}]): ",
                header.unwrap_or_default()
            ),
            (Some(s), Some(k)) => format!("line {line}, column {column} (key {s}.{k}): "),
            (None, Some(k)) => format!("line {line}, column {column} (key {k}): "),
            _ => format!("line {line}, column {column}: "),
        }
    });
    ConfigError::Parse {
        origin: origin.to_string(),
        message: format!("{}{}", at.unwrap_or_default(), e.message().trim_end()),
    }
}

struct Ctx<'a> {
    origin: &'a str,
    /// Dotted key (`policy.max_ttl`) -> the environment variable that set it.
    from_env: &'a std::collections::BTreeMap<String, String>,
}

impl Ctx<'_> {
    /// Where `key`'s value came from: its environment variable if one set it.
    fn origin_of(&self, key: &str) -> String {
        if let Some(var) = self.from_env.get(key) {
            return format!("environment variable {var}");
        }
        let section = format!("{key}.");
        match self.from_env.iter().find(|(k, _)| k.starts_with(&section)) {
            Some((_, var)) => format!("{} with environment variable {var}", self.origin),
            None => self.origin.to_string(),
        }
    }

    fn invalid(
        &self,
        key: &str,
        value: impl ToString,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin_of(key),
            key: key.into(),
            value: value.to_string(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    fn duration(&self, key: &str, value: &str) -> Result<Duration, ConfigError> {
        humantime::parse_duration(value).map_err(|e| {
            self.invalid(
                key,
                value,
                e.to_string(),
                "write a duration such as \"90s\", \"10m\", \"24h\" or \"7d\"",
            )
        })
    }

    fn cron(&self, key: &str, value: &str) -> Result<CronSchedule, ConfigError> {
        parse_cron(value)
            .map(|schedule| CronSchedule { expression: value.to_string(), schedule })
            .map_err(|e| {
                self.invalid(
                    key,
                    value,
                    format!("not a cron expression: {e}"),
                    "use five fields (\"*/5 * * * *\") or six with seconds first (\"0 */5 * * * *\")",
                )
            })
    }
}

/// Accepts the five-field form people type as well as the `cron` crate's six or seven.
pub fn parse_cron(expr: &str) -> Result<cron::Schedule, cron::error::Error> {
    let fields = expr.split_whitespace().count();
    if fields == 5 {
        cron::Schedule::from_str(&format!("0 {expr}"))
    } else {
        cron::Schedule::from_str(expr)
    }
}

fn validate(
    f: FileConfig,
    origin: String,
    from_env: &std::collections::BTreeMap<String, String>,
    ov: &Overrides,
) -> Result<Settings, ConfigError> {
    let cx = Ctx {
        origin: &origin,
        from_env,
    };
    let data_dir = ov
        .data_dir
        .clone()
        .or(f.data_dir)
        .unwrap_or_else(|| PathBuf::from("./rotator-data"));
    if data_dir.as_os_str().is_empty() {
        return Err(cx.invalid(
            "data_dir",
            "",
            "empty path",
            "name a directory, for example \"/var/lib/rotator\"",
        ));
    }
    let metrics_raw = ov.metrics_addr.clone().unwrap_or(f.metrics_addr);
    let metrics_addr = metrics_raw.parse::<SocketAddr>().map_err(|e| {
        cx.invalid(
            "metrics_addr",
            &metrics_raw,
            e.to_string(),
            "write an address and port, such as \"127.0.0.1:9464\"",
        )
    })?;

    if let Some(server) = f
        .cluster
        .server
        .as_ref()
        .filter(|s| !s.starts_with("https://") || s.len() <= 8)
    {
        return Err(cx.invalid(
            "cluster.server",
            server,
            "the API server URL must use https",
            "write the URL kubectl should use, such as \"https://10.0.0.1:6443\"",
        ));
    }
    crate::policy::validate_dns_label(&f.cluster.name).map_err(|p| {
        cx.invalid(
            "cluster.name",
            &f.cluster.name,
            p,
            "use lowercase letters, digits and '-' (it names the kubeconfig cluster)",
        )
    })?;

    let ca_dir = data_dir.join("ca");
    // Through a socket the key is the signer's: cert_file alone pins the CA the
    // signer must have (and key_file, if set, is only what doctor checks this
    // process cannot read).
    let through_socket = f.local_ca.socket.is_some();
    let configured = if through_socket {
        f.local_ca.cert_file.is_some()
    } else {
        f.local_ca.cert_file.is_some() || f.local_ca.key_file.is_some()
    };
    if !through_socket
        && configured
        && (f.local_ca.cert_file.is_none() || f.local_ca.key_file.is_none())
    {
        return Err(cx.invalid(
            "local_ca",
            "",
            "cert_file and key_file must be set together",
            "set both local_ca.cert_file and local_ca.key_file, or neither to let rotator create a CA",
        ));
    }
    let local_ca = LocalCaSettings {
        cert_file: f
            .local_ca
            .cert_file
            .unwrap_or_else(|| ca_dir.join("ca.crt")),
        key_file: f.local_ca.key_file.unwrap_or_else(|| ca_dir.join("ca.key")),
        configured,
        socket: f.local_ca.socket.clone(),
        common_name: f.local_ca.common_name,
        validity: cx.duration("local_ca.validity", &f.local_ca.validity)?,
    };
    if local_ca.validity < Duration::from_secs(86_400) {
        return Err(cx.invalid(
            "local_ca.validity",
            &f.local_ca.validity,
            "shorter than a day",
            "use at least \"1d\"; \"3650d\" is the default",
        ));
    }
    // Past this, certificate times stop being representable; nobody needs a CA for longer.
    if local_ca.validity > Duration::from_secs(100 * 365 * 86_400) {
        return Err(cx.invalid(
            "local_ca.validity",
            &f.local_ca.validity,
            "longer than 100 years",
            "\"3650d\" (ten years) is the default",
        ));
    }

    let p = &f.policy;
    let min_ttl = cx.duration("policy.min_ttl", &p.min_ttl)?;
    let max_ttl = cx.duration("policy.max_ttl", &p.max_ttl)?;
    let default_ttl = cx.duration("policy.default_ttl", &p.default_ttl)?;
    if min_ttl < crate::policy::ABSOLUTE_MIN_TTL {
        return Err(cx.invalid(
            "policy.min_ttl",
            &p.min_ttl,
            "Kubernetes refuses certificate lifetimes under 10 minutes",
            "use \"10m\" or more",
        ));
    }
    // Short-lived credentials are the point; ten years also keeps every time representable.
    const TEN_YEARS: Duration = Duration::from_secs(3650 * 86_400);
    for (key, raw) in [
        ("policy.max_ttl", &p.max_ttl),
        ("policy.max_token_ttl", &p.max_token_ttl),
    ] {
        if cx.duration(key, raw)? > TEN_YEARS {
            return Err(cx.invalid(
                key,
                raw,
                "longer than ten years",
                "short lifetimes are what make revocation bounded; \"7d\" is the default",
            ));
        }
    }
    if max_ttl < min_ttl {
        return Err(cx.invalid(
            "policy.max_ttl",
            &p.max_ttl,
            format!("smaller than policy.min_ttl ({})", p.min_ttl),
            "raise max_ttl or lower min_ttl",
        ));
    }
    if default_ttl < min_ttl || default_ttl > max_ttl {
        return Err(cx.invalid(
            "policy.default_ttl",
            &p.default_ttl,
            format!("outside [{}, {}]", p.min_ttl, p.max_ttl),
            "pick a default between policy.min_ttl and policy.max_ttl",
        ));
    }
    let default_key_type = KeyType::from_str(&p.default_key_type).map_err(|e| {
        cx.invalid(
            "policy.default_key_type",
            &p.default_key_type,
            e.to_string(),
            "use one of ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096",
        )
    })?;
    if p.allowed_roles.is_empty() {
        return Err(cx.invalid(
            "policy.allowed_roles",
            "[]",
            "no role could ever be granted",
            "list at least one ClusterRole, such as [\"view\"]",
        ));
    }
    for r in &p.allowed_roles {
        crate::policy::validate_role_name(r).map_err(|e| {
            cx.invalid(
                "policy.allowed_roles",
                r,
                e,
                "list ClusterRole names such as \"view\" or \"edit\"",
            )
        })?;
    }
    let allowed_namespaces = patterns(&cx, "policy.allowed_namespaces", &p.allowed_namespaces)?;
    let allowed_groups = patterns(&cx, "policy.allowed_groups", &p.allowed_groups)?;
    let denied_groups = crate::policy::denied_group_patterns(&p.denied_groups).map_err(|(v, e)| {
        cx.invalid(
            "policy.denied_groups",
            v,
            e,
            "write \"@defaults\" (the built-in list), exact group names, or prefixes ending in '*' such as \"corp-admins:*\"",
        )
    })?;
    let policy = Policy {
        allowed_roles: p.allowed_roles.clone(),
        allowed_namespaces,
        allowed_groups,
        denied_groups,
        default_ttl,
        min_ttl,
        max_ttl,
        default_key_type,
        allow_cluster_role_bindings: p.allow_cluster_role_bindings,
        default_token_ttl: cx.duration("policy.default_token_ttl", &p.default_token_ttl)?,
        max_token_ttl: cx.duration("policy.max_token_ttl", &p.max_token_ttl)?,
        allow_non_expiring_tokens: p.allow_non_expiring_tokens,
    };
    if policy.default_token_ttl > policy.max_token_ttl || policy.default_token_ttl.is_zero() {
        return Err(cx.invalid(
            "policy.default_token_ttl",
            &p.default_token_ttl,
            format!(
                "must be above zero and at most policy.max_token_ttl ({})",
                p.max_token_ttl
            ),
            "kubeadm's default is \"24h\"",
        ));
    }

    let r = &f.rotation;
    let window = match &r.renew_before {
        Some(s) => RenewWindow::Before(cx.duration("rotation.renew_before", s)?),
        None => {
            if !(r.renew_fraction > 0.0 && r.renew_fraction < 1.0) {
                return Err(cx.invalid(
                    "rotation.renew_fraction",
                    r.renew_fraction,
                    "must be strictly between 0 and 1",
                    "0.333 renews in the last third of a certificate's lifetime",
                ));
            }
            RenewWindow::Fraction(r.renew_fraction)
        }
    };
    if !(0.0..=0.5).contains(&r.jitter) {
        return Err(cx.invalid(
            "rotation.jitter",
            r.jitter,
            "must be between 0 and 0.5",
            "0.1 spreads renewals over a tenth of the window",
        ));
    }
    if !(1..=64).contains(&r.concurrency) {
        return Err(cx.invalid(
            "rotation.concurrency",
            r.concurrency,
            "must be between 1 and 64",
            "4 keeps a fleet's renewals flowing without crowding the signer",
        ));
    }
    let rotation = RotationSettings {
        concurrency: r.concurrency,
        delivery_dir: r
            .delivery_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("kubeconfigs")),
        window,
        jitter: r.jitter,
        grace_period: cx.duration("rotation.grace_period", &r.grace_period)?,
    };

    let schedule = ScheduleSettings {
        rotate: cx.cron("schedule.rotate", &f.schedule.rotate)?,
        expire: cx.cron("schedule.expire", &f.schedule.expire)?,
        reconcile: cx.cron("schedule.reconcile", &f.schedule.reconcile)?,
    };

    let le = &f.leader_election;
    let leader_election = if le.enabled {
        crate::policy::validate_dns_label(&le.namespace).map_err(|p| {
            cx.invalid(
                "leader_election.namespace",
                &le.namespace,
                p,
                "name the namespace rotator runs in",
            )
        })?;
        let lease_duration = cx.duration("leader_election.lease_duration", &le.lease_duration)?;
        if lease_duration < Duration::from_secs(2) {
            return Err(cx.invalid(
                "leader_election.lease_duration",
                &le.lease_duration,
                "shorter than 2s",
                "15s is usual",
            ));
        }
        Some(LeaderElection {
            namespace: le.namespace.clone(),
            name: le.name.clone(),
            lease_duration,
        })
    } else {
        None
    };
    let server = server_settings(&cx, f.server, ov)?;
    let authz = authz_settings(&cx, f.authz, ov)?;
    let sealing = SealingSettings {
        configured: f.sealing.key_file.is_some(),
        key_file: f
            .sealing
            .key_file
            .unwrap_or_else(|| data_dir.join("seal.key")),
    };
    let audit = AuditSettings {
        key_configured: f.audit.key_file.is_some(),
        key_file: f
            .audit
            .key_file
            .unwrap_or_else(|| data_dir.join("audit.key")),
        checkpoint_file: f
            .audit
            .checkpoint_file
            .unwrap_or_else(|| data_dir.join("audit.head")),
    };
    let ss = &f.signer_service;
    let signer_service = SignerServiceSettings {
        socket: ss
            .socket
            .clone()
            .or_else(|| local_ca.socket.clone())
            .or_else(|| f.vault_pki.socket.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SIGNER_SOCKET)),
        max_ttl: cx.duration("signer_service.max_ttl", &ss.max_ttl)?,
        allowed_uids: ss.allowed_uids.clone(),
        rate_per_second: ss.rate_per_second,
        burst: ss.burst.max(1),
        max_body_bytes: ss.max_body_bytes,
        log_file: ss
            .log_file
            .clone()
            .unwrap_or_else(|| data_dir.join("signer.log")),
    };
    if signer_service.max_ttl < crate::policy::ABSOLUTE_MIN_TTL {
        return Err(cx.invalid(
            "signer_service.max_ttl",
            &ss.max_ttl,
            "shorter than Kubernetes' 10-minute minimum certificate lifetime",
            "use at least \"10m\"; \"24h\" is the default",
        ));
    }
    if signer_service.rate_per_second == 0 {
        return Err(cx.invalid(
            "signer_service.rate_per_second",
            "0",
            "a signer that may sign nothing",
            "use a positive number; 50 is the default",
        ));
    }
    let vault_pki = vault_pki_settings(&cx, &f.vault_pki)?;
    let kubernetes = KubernetesSettings {
        kubeconfig: ov.kubeconfig.clone().or(f.kubernetes.kubeconfig),
        context: f.kubernetes.context,
        client_ca_file: f.kubernetes.client_ca_file,
        signing_timeout: cx
            .duration("kubernetes.signing_timeout", &f.kubernetes.signing_timeout)?,
    };
    let database = match ov.database_url.clone().or(f.database_url) {
        None => crate::store::Location::sqlite_file(&data_dir.join("rotator.db")),
        Some(url) => crate::store::Location::parse(&url).map_err(|problem| {
            cx.invalid(
                "database_url",
                crate::store::engine::redact(&url),
                problem,
                "use sqlite:///PATH, postgres://USER:PASSWORD@HOST:PORT/DB?sslmode=verify-full or postgres:///DB?host=/SOCKET/DIR, or leave database_url unset for DATA_DIR/rotator.db",
            )
        })?,
    };
    Ok(Settings {
        origin,
        file: None,
        database,
        data_dir,
        signer: ov.signer.or(f.signer),
        kubernetes,
        leader_election,
        metrics_addr,
        cluster: ClusterSettings {
            name: f.cluster.name,
            server: f.cluster.server,
            ca_file: f.cluster.ca_file,
        },
        local_ca,
        signer_service,
        vault_pki,
        vault: None,
        policy,
        rotation,
        schedule,
        server,
        sealing,
        audit,
        authz,
    })
}

/// `SECTION.listen`: an address and port, when set.
fn listener(
    cx: &Ctx<'_>,
    section: &str,
    raw: Option<String>,
    example_port: u16,
) -> Result<Option<SocketAddr>, ConfigError> {
    raw.map(|raw| {
        raw.parse::<SocketAddr>().map_err(|e| {
            cx.invalid(
                &format!("{section}.listen"),
                &raw,
                e.to_string(),
                format!("write an address and port, such as \"0.0.0.0:{example_port}\""),
            )
        })
    })
    .transpose()
}

/// `SECTION.tls_cert` and `SECTION.tls_key`: both or neither.
fn tls_pair(
    cx: &Ctx<'_>,
    section: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (cert, key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        _ => Err(cx.invalid(
            section,
            "",
            "tls_cert and tls_key must be set together",
            format!(
                "set both {section}.tls_cert and {section}.tls_key, or neither to have the local CA issue one"
            ),
        )),
    }
}

fn authz_settings(
    cx: &Ctx<'_>,
    f: AuthzSection,
    ov: &Overrides,
) -> Result<AuthzSettings, ConfigError> {
    let listen = listener(cx, "authz", ov.authz_addr.clone().or(f.listen), 9443)?;
    let tls = tls_pair(cx, "authz", f.tls_cert, f.tls_key)?;
    let refresh_interval = cx.duration("authz.refresh_interval", &f.refresh_interval)?;
    if refresh_interval < Duration::from_millis(50) || refresh_interval > Duration::from_secs(1) {
        return Err(cx.invalid(
            "authz.refresh_interval",
            &f.refresh_interval,
            "outside [50ms, 1s]",
            "a revocation made by another process reaches the webhook within this time; \"1s\" is the default",
        ));
    }
    let max_staleness = match &f.max_staleness {
        None => refresh_interval * 3,
        Some(raw) => {
            let d = cx.duration("authz.max_staleness", raw)?;
            if d < refresh_interval || d > Duration::from_secs(3600) {
                return Err(cx.invalid(
                    "authz.max_staleness",
                    raw,
                    format!(
                        "outside [authz.refresh_interval ({}), 1h]",
                        humantime::format_duration(refresh_interval)
                    ),
                    "a revocation made while this webhook cannot read the database goes unseen this long at most; leave it unset for three refresh intervals",
                ));
            }
            d
        }
    };
    // Without a client CA anyone who can connect is answered, and a denial
    // names the user, the credential and the revoke's reason.
    if let Some(addr) = listen.filter(|a| !a.ip().is_loopback())
        && f.client_ca_file.is_none()
    {
        return Err(cx.invalid(
            "authz.listen",
            addr,
            "not a loopback address, and authz.client_ca_file is not set: anyone who can connect would be answered",
            "set authz.client_ca_file to the CA of the API server's webhook client certificate (docs/deploy-authz-webhook.md), or listen on 127.0.0.1",
        ));
    }
    Ok(AuthzSettings {
        listen,
        tls,
        hostnames: f.hostnames,
        client_ca_file: f.client_ca_file,
        refresh_interval,
        max_staleness,
        deny_unknown_users: f.deny_unknown_users,
        apiserver_config: f.apiserver_config,
    })
}

/// A mount or role is one path segment of a Vault API path (a mount may nest:
/// `pki/clients`); anything else would address another endpoint.
fn vault_pki_settings(cx: &Ctx<'_>, f: &VaultPkiSection) -> Result<VaultPkiSettings, ConfigError> {
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && s != "."
            && s != ".."
    };
    let mount = f.mount.trim_matches('/');
    if !mount.split('/').all(segment_ok) {
        return Err(cx.invalid(
            "vault_pki.mount",
            &f.mount,
            "not a Vault mount path",
            "name the PKI secrets engine's mount, e.g. \"pki\" (`bao secrets list` shows it)",
        ));
    }
    if let Some(role) = &f.role
        && !segment_ok(role)
    {
        return Err(cx.invalid(
            "vault_pki.role",
            role,
            "not a Vault PKI role name (letters, digits, - _ .)",
            "name the role that may sign-verbatim (`bao list pki/roles` shows them)",
        ));
    }
    if let (Some(socket), true) = (&f.socket, f.in_process) {
        return Err(cx.invalid(
            "vault_pki.in_process",
            "true",
            format!(
                "vault_pki.socket ({}) says a `rotator signer` process signs, in_process says this one does",
                socket.display()
            ),
            "keep vault_pki.socket (the signer holds the signing token) and remove in_process",
        ));
    }
    Ok(VaultPkiSettings {
        mount: mount.to_string(),
        role: f.role.clone(),
        socket: f.socket.clone(),
        in_process: f.in_process,
    })
}

fn server_settings(
    cx: &Ctx<'_>,
    f: ServerSection,
    ov: &Overrides,
) -> Result<ServerSettings, ConfigError> {
    let listen = listener(cx, "server", ov.api_addr.clone().or(f.listen), 8443)?;
    let tls = tls_pair(cx, "server", f.tls_cert, f.tls_key)?;
    for h in &f.hostnames {
        let ok = h.parse::<std::net::IpAddr>().is_ok()
            || (!h.is_empty()
                && h.len() <= 253
                && h.split('.')
                    .all(|l| crate::policy::validate_dns_label(l).is_ok()));
        if !ok {
            return Err(cx.invalid(
                "server.hostnames",
                h,
                "neither an IP address nor a DNS name",
                "list the names users reach the API by, such as \"rotator.example.com\"",
            ));
        }
    }
    if let Some(u) = f.public_url.as_ref().filter(|u| !u.starts_with("https://")) {
        return Err(cx.invalid(
            "server.public_url",
            u,
            "must be an https URL",
            "write the URL users pass to `rotator fetch --server`, such as \"https://rotator.example.com:8443\"",
        ));
    }
    let enroll_token_ttl = cx.duration("server.enroll_token_ttl", &f.enroll_token_ttl)?;
    if enroll_token_ttl < Duration::from_secs(60)
        || enroll_token_ttl > Duration::from_secs(7 * 86_400)
    {
        return Err(cx.invalid(
            "server.enroll_token_ttl",
            &f.enroll_token_ttl,
            "outside [1m, 7d]",
            "a one-time token should live minutes to hours; \"1h\" is the default",
        ));
    }
    for (key, v) in [
        ("server.rate_limit_per_address", f.rate_limit_per_address),
        ("server.rate_limit_per_user", f.rate_limit_per_user),
    ] {
        if !(1..=100_000).contains(&v) {
            return Err(cx.invalid(
                key,
                v,
                "must be between 1 and 100000 requests a minute",
                "the defaults are 60 per address and 12 per user",
            ));
        }
    }
    if !(1..=100_000).contains(&f.max_connections) {
        return Err(cx.invalid(
            "server.max_connections",
            f.max_connections,
            "must be between 1 and 100000",
            "the default is 256",
        ));
    }
    if !(1..=f.max_connections).contains(&f.max_connections_per_address) {
        return Err(cx.invalid(
            "server.max_connections_per_address",
            f.max_connections_per_address,
            format!(
                "must be between 1 and server.max_connections ({})",
                f.max_connections
            ),
            "the default is 16; keep it well below max_connections so one address cannot take them all",
        ));
    }
    let deadline = |key: &str, raw: &str| -> Result<Duration, ConfigError> {
        let d = cx.duration(key, raw)?;
        if d < Duration::from_secs(1) || d > Duration::from_secs(300) {
            return Err(cx.invalid(
                key,
                raw,
                "outside [1s, 5m]",
                "a few seconds: the defaults are 5s for headers and 10s for the body",
            ));
        }
        Ok(d)
    };
    let header_timeout = deadline("server.header_timeout", &f.header_timeout)?;
    let body_timeout = deadline("server.body_timeout", &f.body_timeout)?;
    Ok(ServerSettings {
        listen,
        tls,
        hostnames: f.hostnames,
        public_url: f.public_url,
        enroll_token_ttl,
        rate_limit_per_address: f.rate_limit_per_address,
        rate_limit_per_user: f.rate_limit_per_user,
        max_connections: f.max_connections as usize,
        max_connections_per_address: f.max_connections_per_address as usize,
        header_timeout,
        body_timeout,
    })
}

fn patterns(cx: &Ctx<'_>, key: &str, values: &[String]) -> Result<Vec<Pattern>, ConfigError> {
    values
        .iter()
        .map(|v| {
            Pattern::parse(v).map_err(|e| {
                cx.invalid(
                    key,
                    v,
                    e,
                    "write \"*\", an exact name, or a prefix ending in '*' such as \"team-*\"",
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("rotator.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn defaults_are_valid() {
        let s = load_with(None, &[], &Overrides::default()).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("./rotator-data"));
        assert_eq!(
            s.local_ca.cert_file,
            PathBuf::from("./rotator-data/ca/ca.crt")
        );
        assert!(!s.local_ca.configured);
        assert_eq!(s.policy.min_ttl, Duration::from_secs(600));
        assert_eq!(s.metrics_addr.port(), 9464);
    }

    #[test]
    fn the_shipped_example_config_is_valid_and_matches_defaults() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
        let s = load_with(Some(&p), &[], &Overrides::default()).unwrap();
        let d = load_with(None, &[], &Overrides::default()).unwrap();
        assert_eq!(s.policy.allowed_roles, d.policy.allowed_roles);
        assert_eq!(s.schedule.rotate.expression, d.schedule.rotate.expression);
        assert_eq!(s.rotation.grace_period, d.rotation.grace_period);
    }

    #[test]
    fn vault_pki_socket_and_in_process_together_are_refused() {
        let (_d, p) = write("[vault_pki]\nsocket = \"/run/s.sock\"\nin_process = true\n");
        let e = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vault_pki.in_process") && e.contains("/run/s.sock"),
            "{e}"
        );
        assert!(e.contains("fix:"), "{e}");
        let (_d, p) = write("[vault_pki]\nsocket = \"/run/s.sock\"\n");
        let s = load_with(Some(&p), &[], &Overrides::default()).unwrap();
        assert_eq!(s.vault_pki.socket, Some(PathBuf::from("/run/s.sock")));
        assert!(!s.vault_pki.in_process);
        // The signer listens where the daemon looks when nothing else says.
        assert_eq!(s.signer_service.socket, PathBuf::from("/run/s.sock"));
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let (_d, p) = write("[policy]\nmax_tll = \"1d\"\n");
        let e = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("rotator.toml"), "{e}");
        assert!(e.contains("max_tll"), "{e}");
    }

    #[test]
    fn wrong_type_and_impossible_values_are_errors() {
        let (_d, p) = write("[rotation]\njitter = \"lots\"\n");
        let e = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("jitter"), "{e}");
        let (_d, p) = write("[policy]\nmin_ttl = \"1m\"\n");
        let e = load_with(Some(&p), &[], &Overrides::default()).unwrap_err();
        assert!(
            matches!(e, ConfigError::Invalid { ref key, .. } if key == "policy.min_ttl"),
            "{e}"
        );
        let (_d, p) = write("[schedule]\nrotate = \"every minute\"\n");
        let e = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("schedule.rotate") && e.contains("every minute"),
            "{e}"
        );
    }

    #[test]
    fn connection_caps_and_deadlines_are_checked() {
        let (_d, p) = write("");
        let s = load_with(Some(&p), &[], &Overrides::default()).unwrap();
        assert_eq!(
            (
                s.server.max_connections,
                s.server.max_connections_per_address
            ),
            (256, 16)
        );
        assert_eq!(s.server.header_timeout, Duration::from_secs(5));
        assert_eq!(s.server.body_timeout, Duration::from_secs(10));
        for (toml, key) in [
            (
                "[server]\nmax_connections = 8\nmax_connections_per_address = 9\n",
                "server.max_connections_per_address",
            ),
            ("[server]\nmax_connections = 0\n", "server.max_connections"),
            (
                "[server]\nheader_timeout = \"0s\"\n",
                "server.header_timeout",
            ),
            ("[server]\nbody_timeout = \"1h\"\n", "server.body_timeout"),
        ] {
            let (_d, p) = write(toml);
            let e = load_with(Some(&p), &[], &Overrides::default()).unwrap_err();
            assert!(
                matches!(e, ConfigError::Invalid { key: ref k, .. } if k == key),
                "{toml}: {e}"
            );
            assert!(e.to_string().contains("fix:"), "{e}");
        }
    }

    #[test]
    fn authz_settings_are_checked() {
        let (_d, p) = write("");
        let s = load_with(Some(&p), &[], &Overrides::default()).unwrap();
        assert_eq!(s.authz.listen, None);
        assert_eq!(s.authz.refresh_interval, Duration::from_secs(1));
        assert_eq!(s.authz.max_staleness, Duration::from_secs(3));
        let env = [(
            "ROTATOR_AUTHZ__LISTEN".to_string(),
            "127.0.0.1:8444".to_string(),
        )];
        let s = load_with(Some(&p), &env, &Overrides::default()).unwrap();
        assert_eq!(s.authz.listen, Some("127.0.0.1:8444".parse().unwrap()));
        // Any address with the API server's CA; loopback and [::1] without it.
        let (_d, with_ca) =
            write("[authz]\nlisten = \"0.0.0.0:8444\"\nclient_ca_file = \"ca.crt\"\n");
        let s = load_with(Some(&with_ca), &[], &Overrides::default()).unwrap();
        assert_eq!(s.authz.listen, Some("0.0.0.0:8444".parse().unwrap()));
        let (_d, v6) = write("[authz]\nlisten = \"[::1]:8444\"\n");
        assert!(load_with(Some(&v6), &[], &Overrides::default()).is_ok());
        for (toml, key) in [
            ("[authz]\nlisten = \"nowhere\"\n", "authz.listen"),
            (
                "[authz]\nrefresh_interval = \"5s\"\n",
                "authz.refresh_interval",
            ),
            ("[authz]\ntls_cert = \"c.pem\"\n", "authz"),
            (
                "[authz]\nrefresh_interval = \"500ms\"\nmax_staleness = \"400ms\"\n",
                "authz.max_staleness",
            ),
            ("[authz]\nlisten = \"0.0.0.0:8444\"\n", "authz.listen"),
            ("[authz]\nlisten = \"10.0.0.5:8444\"\n", "authz.listen"),
            ("[authz]\nlisten = \"[::]:8444\"\n", "authz.listen"),
        ] {
            let (_d, p) = write(toml);
            let e = load_with(Some(&p), &[], &Overrides::default()).unwrap_err();
            assert!(
                matches!(e, ConfigError::Invalid { key: ref k, .. } if k == key),
                "{toml}: {e}"
            );
            assert!(e.to_string().contains("fix:"), "{e}");
        }
    }

    #[test]
    fn absurd_durations_are_refused_not_overflowed() {
        let (_d, p) = write("[local_ca]\nvalidity = \"1000000000d\"\n");
        let e = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("local_ca.validity") && e.contains("100 years"),
            "{e}"
        );
        let (_d, p) = write("[policy]\nmax_token_ttl = \"1000000000d\"\n");
        let e = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policy.max_token_ttl") && e.contains("ten years"),
            "{e}"
        );
    }

    #[test]
    fn env_and_flags_override_the_file_in_order() {
        let (_d, p) = write("data_dir = \"/from/file\"\n[policy]\nmax_ttl = \"2d\"\n");
        let env = vec![
            ("ROTATOR_DATA_DIR".to_string(), "/from/env".to_string()),
            ("ROTATOR_POLICY__MAX_TTL".to_string(), "3d".to_string()),
            (
                "ROTATOR_POLICY__ALLOWED_ROLES".to_string(),
                "[\"view\"]".to_string(),
            ),
            ("ROTATOR_CONFIG".to_string(), "ignored".to_string()),
        ];
        let s = load_with(Some(&p), &env, &Overrides::default()).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/from/env"));
        assert_eq!(s.policy.max_ttl, Duration::from_secs(3 * 86400));
        assert_eq!(s.policy.allowed_roles, vec!["view".to_string()]);
        let ov = Overrides {
            data_dir: Some("/from/flag".into()),
            ..Default::default()
        };
        assert_eq!(
            load_with(Some(&p), &env, &ov).unwrap().data_dir,
            PathBuf::from("/from/flag")
        );
    }

    #[test]
    fn unknown_env_key_is_named() {
        let env = vec![("ROTATOR_POLICY__NOPE".to_string(), "1".to_string())];
        let e = load_with(None, &env, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ROTATOR_POLICY__NOPE") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_env_value_is_reported_as_coming_from_its_variable() {
        let env = vec![("ROTATOR_POLICY__MAX_TTL".to_string(), "banana".to_string())];
        let e = load_with(None, &env, &Overrides::default()).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("environment variable ROTATOR_POLICY__MAX_TTL")
                && m.contains("policy.max_ttl")
                && m.contains("banana")
                && !m.contains("built-in defaults"),
            "{m}"
        );
        // Also when a file is in play, and for a value checked against another key.
        let (_d, p) = write("[policy]\nmin_ttl = \"1h\"\n");
        let env = vec![("ROTATOR_POLICY__MAX_TTL".to_string(), "30m".to_string())];
        let m = load_with(Some(&p), &env, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("environment variable ROTATOR_POLICY__MAX_TTL"),
            "{m}"
        );
        // A bad value from the file still names the file.
        let (_d, p) = write("[policy]\nmax_ttl = \"banana\"\n");
        let m = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("config file") && m.contains("rotator.toml"),
            "{m}"
        );
    }

    #[test]
    fn a_bare_section_name_in_the_environment_is_not_configuration() {
        // `ROTATOR_SERVER` is `rotator fetch --server`'s variable.
        let env = vec![
            (
                "ROTATOR_SERVER".to_string(),
                "https://rotator.example:8443".to_string(),
            ),
            ("ROTATOR_POLICY".to_string(), "x".to_string()),
            (
                "ROTATOR_SERVER__ENROLL_TOKEN_TTL".to_string(),
                "2h".to_string(),
            ),
        ];
        let s = load_with(None, &env, &Overrides::default()).unwrap();
        assert_eq!(s.server.enroll_token_ttl, Duration::from_secs(7200));
    }

    #[test]
    fn a_file_that_is_not_toml_is_not_echoed_in_the_error() {
        // What a sealing key file looks like: base64, with '+', '/' and '='.
        let secret = "q8Vn+2mZx/Jt0bLrW4yK9sPd3fHc7uAeG1oQvNiE5Tk=";
        let (_d, p) = write(&format!("{secret}\n"));
        let m = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(m.contains("rotator.toml") && m.contains("line 1"), "{m}");
        for part in secret.split(['+', '/', '=']).filter(|p| p.len() >= 4) {
            assert!(!m.contains(part), "the file's content leaked: {m}");
        }
        let (_d, p) = write("[policy]\nmax_ttl = 5\n");
        let m = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(m.contains("line 2") && m.contains("policy.max_ttl"), "{m}");
        let (_d, p) = write("[schedule]\n[schedule]\n");
        let m = load_with(Some(&p), &[], &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("line 2") && m.contains("table [schedule]"),
            "{m}"
        );
    }

    #[test]
    fn five_field_cron_is_accepted() {
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("0 */5 * * * *").is_ok());
        assert!(parse_cron("61 * * * *").is_err());
    }

    // The overlays' configuration (ConfigMap + ROTATOR_* variables, as
    // rendered by kubectl kustomize) is loaded by tests/it/deploy_overlays.rs.

    #[test]
    fn database_url_comes_from_file_env_or_flag_and_never_shows_its_password() {
        use crate::store::{Engine, Location};
        let (_d, p) =
            write("data_dir = \"/d\"\ndatabase_url = \"postgres://r:file-pw@db/rotator\"\n");
        let s = load_with(Some(&p), &[], &Overrides::default()).unwrap();
        assert_eq!(s.database.engine(), Engine::Postgres);
        assert_eq!(s.database.to_string(), "postgres://r:***@db/rotator");
        assert!(!format!("{s:?}").contains("file-pw"));
        assert_eq!(s.database_file(), None);
        let env = vec![(
            "ROTATOR_DATABASE_URL".to_string(),
            "sqlite:///srv/r.db".to_string(),
        )];
        let s = load_with(Some(&p), &env, &Overrides::default()).unwrap();
        assert_eq!(s.database, Location::Sqlite("/srv/r.db".into()));
        let ov = Overrides {
            database_url: Some("postgresql:///rotator?host=/run/postgresql".into()),
            ..Default::default()
        };
        let s = load_with(Some(&p), &env, &ov).unwrap();
        assert_eq!(s.database.engine(), Engine::Postgres);
        let (_d2, p2) = write("data_dir = \"/d\"\n");
        let s = load_with(Some(&p2), &[], &Overrides::default()).unwrap();
        assert_eq!(s.database_file(), Some(PathBuf::from("/d/rotator.db")));
        let bad = vec![(
            "ROTATOR_DATABASE_URL".to_string(),
            "mysql://r:env-pw@db/rotator".to_string(),
        )];
        let e = load_with(Some(&p2), &bad, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ROTATOR_DATABASE_URL") && e.contains("fix:") && !e.contains("env-pw"),
            "{e}"
        );
    }

    #[test]
    fn shipped_config_files_load() {
        for f in [
            "config/rotator.toml",
            "deploy/rotator.toml",
            "deploy/base/rotator.toml",
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let s = load_with(Some(&p), &[], &Overrides::default())
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(s.server.enroll_token_ttl, Duration::from_secs(3600), "{f}");
        }
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rotator.toml");
        let s = load_with(Some(&deploy), &[], &Overrides::default()).unwrap();
        assert_eq!(s.server.listen, Some("0.0.0.0:8443".parse().unwrap()));
        let bad = [(
            "ROTATOR_SERVER__ENROLL_TOKEN_TTL".to_string(),
            "30d".to_string(),
        )];
        let e = load_with(Some(&deploy), &bad, &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.enroll_token_ttl") && e.contains("30d"),
            "{e}"
        );
    }
}
