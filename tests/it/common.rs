//! Helpers: run the real `rotator` binary in a scratch directory, run kubectl and
//! openssl as independent checks, and build an in-process `App` for fault tests.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rotator::app::App;
use rotator::config::{self, Overrides};
use rotator::flows::issue::{Faults, NoFaults};
use rotator::support::clock::SystemClock;

pub use rotator::store::Engine;

thread_local! {
    /// The engine `Scratch::new` gives its database: set by [`engines!`] per variant.
    static ENGINE: std::cell::Cell<Engine> = const { std::cell::Cell::new(Engine::Sqlite) };
}

/// Scratch directories on PostgreSQL and their database URLs, for [`app`].
static DATABASES: std::sync::Mutex<Vec<(PathBuf, String)>> = std::sync::Mutex::new(Vec::new());

/// Puts the engine back when the test ends.
pub struct EngineGuard;

impl Drop for EngineGuard {
    fn drop(&mut self) {
        ENGINE.with(|e| e.set(Engine::Sqlite));
    }
}

/// Makes `Scratch::new` on this thread use `engine`; `None` when PostgreSQL is
/// not there (and the test must not run: `pg::server_or_skip` said so).
pub fn use_engine(engine: Engine, test: &str) -> Option<EngineGuard> {
    if engine == Engine::Postgres {
        crate::pg::server_or_skip(test)?;
    }
    ENGINE.with(|e| e.set(engine));
    Some(EngineGuard)
}

/// Runs each test once per engine, as `NAME::sqlite` and `NAME::postgres`:
/// `Scratch::new()` inside it gets a fresh database on that engine, and every
/// `rotator` it runs (and [`app`]) uses it.
#[macro_export]
macro_rules! engines {
    () => {};
    ($(#[$m:meta])* async fn $name:ident() $body:block $($rest:tt)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$m])* async fn sqlite() {
                let Some(_engine) = $crate::common::use_engine($crate::common::Engine::Sqlite, concat!(module_path!(), "::sqlite")) else { return };
                $body
            }
            $(#[$m])* async fn postgres() {
                let Some(_engine) = $crate::common::use_engine($crate::common::Engine::Postgres, concat!(module_path!(), "::postgres")) else { return };
                $body
            }
        }
        $crate::engines! { $($rest)* }
    };
    ($(#[$m:meta])* fn $name:ident() $body:block $($rest:tt)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$m])* fn sqlite() {
                let Some(_engine) = $crate::common::use_engine($crate::common::Engine::Sqlite, concat!(module_path!(), "::sqlite")) else { return };
                $body
            }
            $(#[$m])* fn postgres() {
                let Some(_engine) = $crate::common::use_engine($crate::common::Engine::Postgres, concat!(module_path!(), "::postgres")) else { return };
                $body
            }
        }
        $crate::engines! { $($rest)* }
    };
}

pub struct Scratch {
    /// The `rotator signer` this scratch's commands issue through, if any
    /// (dropped, so killed, before the directory is removed).
    pub signer: Option<SignerProc>,
    pub dir: tempfile::TempDir,
    /// The PostgreSQL database of this scratch directory (`None`: SQLite in DATA_DIR).
    pub database_url: Option<String>,
}

impl Scratch {
    /// A scratch directory with a database on this thread's engine (SQLite unless
    /// inside an [`engines!`] PostgreSQL variant).
    pub fn new() -> Self {
        Self::on(ENGINE.with(|e| e.get()))
    }

    pub fn on(engine: Engine) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = match engine {
            Engine::Sqlite => None,
            Engine::Postgres => {
                let server = crate::pg::server().expect("PostgreSQL server");
                let url = server.create_database();
                DATABASES
                    .lock()
                    .unwrap()
                    .push((dir.path().to_path_buf(), url.clone()));
                Some(url)
            }
        };
        Self {
            signer: None,
            dir,
            database_url,
        }
    }

    pub fn engine(&self) -> Engine {
        match self.database_url {
            None => Engine::Sqlite,
            Some(_) => Engine::Postgres,
        }
    }

    /// A scratch directory whose `rotator` commands sign the way `signing`
    /// says: with `Signing::Socket`, a real `rotator signer` runs in it and every
    /// command gets `ROTATOR_LOCAL_CA__SOCKET`.
    pub fn signing(signing: Signing) -> Self {
        let mut s = Self::new();
        s.signer = signing.start(s.dir.path());
        s
    }

    /// That the commands really signed the way this scratch says: through the
    /// signer, `n` signatures in its log and no CA key of the data directory's
    /// own; in process, the data directory's CA key.
    pub fn assert_signed(&self, data_dir: &str, n: usize) {
        let own_key = self.path(data_dir).join("ca/ca.key");
        match &self.signer {
            Some(p) => {
                assert_eq!(
                    p.signed_serials().len(),
                    n,
                    "signatures in the signer's log"
                );
                assert!(!own_key.exists(), "no CA key beside the data: {own_key:?}");
            }
            None => assert!(own_key.exists(), "the in-process CA key: {own_key:?}"),
        }
    }

    /// The CA certificate that local-ca credentials of `data_dir` chain to.
    pub fn ca_cert(&self, data_dir: &str) -> PathBuf {
        match &self.signer {
            Some(p) => p.ca(),
            None => self.path(data_dir).join("ca/ca.crt"),
        }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `rotator ARGS` with the scratch directory as working directory and no
    /// configuration leaking in from the environment.
    pub fn rotator(&self, args: &[&str]) -> Output {
        self.rotator_env(args, &[])
    }

    pub fn rotator_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = self.command();
        c.args(args);
        c.envs(env.iter().copied());
        c.output().expect("run rotator")
    }

    /// The `rotator` command in the scratch directory, on its database, with no
    /// other configuration leaking in from the environment.
    pub fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_rotator"));
        c.current_dir(self.dir.path());
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
            c.env_remove(k);
        }
        if let Some(url) = &self.database_url {
            c.env("ROTATOR_DATABASE_URL", url);
        }
        if let Some(p) = &self.signer {
            c.env("ROTATOR_LOCAL_CA__SOCKET", &p.socket);
        }
        c
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// A connection to this scratch directory's database, whichever the engine.
    pub async fn db(&self) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        let url = match &self.database_url {
            Some(u) => u.clone(),
            None => format!(
                "sqlite://{}",
                self.path("rotator-data/rotator.db").display()
            ),
        };
        <sqlx::AnyConnection as sqlx::Connection>::connect(&url)
            .await
            .expect("open db")
    }

    /// A count for assertions that the CLI does not expose (SQL both engines speak).
    pub async fn count(&self, sql: &'static str) -> i64 {
        let mut conn = self.db().await;
        let (n,): (i64,) = sqlx::query_as(sql)
            .fetch_one(&mut conn)
            .await
            .expect("query");
        n
    }
}

pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed ({:?})\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn fails_with(o: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit {code}\nstdout: {}\nstderr: {stderr}",
        String::from_utf8_lossy(&o.stdout)
    );
    stderr
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"))
}

pub async fn run_async(cmd: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"))
}

pub fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// The client certificate and key inside a kubeconfig, read back by kube's own parser.
pub fn kubeconfig_parts(path: &Path) -> (String, String, String, String) {
    use base64::Engine;
    use secrecy::ExposeSecret;
    let kc = kube::config::Kubeconfig::read_from(path).expect("kubeconfig parses");
    let d = |s: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .expect("base64"),
        )
        .expect("utf8")
    };
    let auth = kc.auth_infos[0].auth_info.as_ref().expect("user");
    let cluster = kc.clusters[0].cluster.as_ref().expect("cluster");
    (
        cluster.server.clone().expect("server"),
        d(cluster.certificate_authority_data.as_deref().expect("ca")),
        d(auth.client_certificate_data.as_deref().expect("cert")),
        d(auth.client_key_data.as_ref().expect("key").expose_secret()),
    )
}

/// The PostgreSQL database of the scratch directory `dir` is in; inside a
/// PostgreSQL variant, a directory made without `Scratch` gets one on first use.
pub fn database_for(dir: &Path) -> Option<String> {
    let mut dbs = DATABASES.lock().unwrap();
    if let Some((_, url)) = dbs.iter().find(|(d, _)| dir.starts_with(d)) {
        return Some(url.clone());
    }
    if ENGINE.with(|e| e.get()) != Engine::Postgres {
        return None;
    }
    let url = crate::pg::server()
        .expect("PostgreSQL server")
        .create_database();
    dbs.push((dir.to_path_buf(), url.clone()));
    Some(url)
}

/// An in-process App over a scratch data directory.
pub async fn app(dir: &Path, toml: &str, faults: Arc<dyn Faults>) -> App {
    let cfg = dir.join("rotator.toml");
    let database = database_for(dir)
        .map(|url| format!("database_url = {url:?}\n"))
        .unwrap_or_default();
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n{database}{toml}",
            dir.join("rotator-data")
        ),
    )
    .unwrap();
    let settings = config::load_with(Some(&cfg), &[], &Overrides::default()).expect("config");
    App::open(settings, Arc::new(SystemClock), faults, "test".into())
        .await
        .expect("app")
        .0
}

pub async fn plain_app(dir: &Path) -> App {
    app(dir, "", Arc::new(NoFaults)).await
}

pub fn spec(name: &str) -> rotator::policy::UserSpec {
    rotator::policy::UserSpec {
        name: name.into(),
        groups: vec!["dev".into()],
        namespaces: vec!["team-a".into()],
        role: "edit".into(),
        key_type: rotator::pki::KeyType::EcdsaP256,
        ttl_seconds: 3600,
    }
}

/// A running `rotator signer`, killed on drop.
pub struct SignerProc {
    child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub data: PathBuf,
}

impl SignerProc {
    pub fn start(dir: &Path, extra: &str, env: &[(&str, &str)]) -> Self {
        let data = dir.join("signer-data");
        let socket = dir.join("run/signer.sock");
        let cfg = dir.join("signer.toml");
        std::fs::write(
            &cfg,
            format!("data_dir = {data:?}\n[signer_service]\nsocket = {socket:?}\n{extra}\n"),
        )
        .unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_rotator"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
            c.env_remove(k);
        }
        let child = c
            .args(["--config", cfg.to_str().unwrap(), "signer"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rotator signer");
        let s = Self {
            child,
            log: data.join("signer.log"),
            socket,
            data,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&s.socket).is_err() {
            assert!(Instant::now() < deadline, "the signer did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    pub fn ca(&self) -> PathBuf {
        self.data.join("ca/ca.crt")
    }

    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log lines are JSON"))
            .collect()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SignerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The two ways a local-ca test issues (#12): the CA key inside the issuing
/// process, or a real `rotator signer` process over its Unix socket. A test
/// written once as `async fn NAME(signing: Signing)` inside `signing_variants!`
/// runs as `NAME::in_process` and `NAME::through_signer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signing {
    InProcess,
    Socket,
}

impl Signing {
    /// What this way of signing needs, started in `dir`: nothing, or a signer.
    pub fn start(self, dir: &Path) -> Option<SignerProc> {
        (self == Signing::Socket).then(|| SignerProc::start(dir, "", &[]))
    }
}

/// The config snippet that points `local_ca` at `signer` (empty in process).
pub fn local_ca_toml(signer: Option<&SignerProc>) -> String {
    signer
        .map(|p| format!("[local_ca]\nsocket = {:?}\n", p.socket))
        .unwrap_or_default()
}

impl SignerProc {
    /// The serials the signer logged as signed, in order.
    pub fn signed_serials(&self) -> Vec<String> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["outcome"] == "signed")
            .map(|l| l["serial"].as_str().expect("serial").to_string())
            .collect()
    }
}

/// Writes each test given to it twice, once per `Signing`, as a module of
/// the test's name: `NAME::in_process` and `NAME::through_signer` (and
/// `NAME::postgres`, in process on PostgreSQL). Takes any number of tests; one
/// written `sqlite_only: async fn ...` gets the two signing variants only, on
/// SQLite (for a test that reads or edits the SQLite file itself, or one too
/// slow to run a third time: the test says which in a comment).
macro_rules! signing_variants {
    () => {};
    (sqlite_only: $(#[$m:meta])* async fn $name:ident($s:ident: Signing) $body:block $($rest:tt)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn variant($s: $crate::common::Signing) $body
            $(#[$m])*
            async fn in_process() {
                variant($crate::common::Signing::InProcess).await
            }
            $(#[$m])*
            async fn through_signer() {
                variant($crate::common::Signing::Socket).await
            }
        }
        $crate::common::signing_variants! { $($rest)* }
    };
    (sqlite_only: $(#[$m:meta])* fn $name:ident($s:ident: Signing) $body:block $($rest:tt)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn variant($s: $crate::common::Signing) $body
            $(#[$m])*
            fn in_process() {
                variant($crate::common::Signing::InProcess)
            }
            $(#[$m])*
            fn through_signer() {
                variant($crate::common::Signing::Socket)
            }
        }
        $crate::common::signing_variants! { $($rest)* }
    };
    ($(#[$m:meta])* async fn $name:ident($s:ident: Signing) $body:block $($rest:tt)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn variant($s: $crate::common::Signing) $body
            $(#[$m])*
            async fn in_process() {
                variant($crate::common::Signing::InProcess).await
            }
            $(#[$m])*
            async fn through_signer() {
                variant($crate::common::Signing::Socket).await
            }
            // The store engine is a second axis: PostgreSQL with the in-process
            // signer (the signer never touches the database).
            $(#[$m])*
            async fn postgres() {
                let Some(_engine) = $crate::common::use_engine($crate::common::Engine::Postgres, concat!(module_path!(), "::postgres")) else { return };
                variant($crate::common::Signing::InProcess).await
            }
        }
        $crate::common::signing_variants! { $($rest)* }
    };
    ($(#[$m:meta])* fn $name:ident($s:ident: Signing) $body:block $($rest:tt)*) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn variant($s: $crate::common::Signing) $body
            $(#[$m])*
            fn in_process() {
                variant($crate::common::Signing::InProcess)
            }
            $(#[$m])*
            fn through_signer() {
                variant($crate::common::Signing::Socket)
            }
            $(#[$m])*
            fn postgres() {
                let Some(_engine) = $crate::common::use_engine($crate::common::Engine::Postgres, concat!(module_path!(), "::postgres")) else { return };
                variant($crate::common::Signing::InProcess)
            }
        }
        $crate::common::signing_variants! { $($rest)* }
    };
}
pub(crate) use signing_variants;

/// That an in-process [`app`] over `dir` signed the way `signer` says: through
/// the signer, `n` signatures in its log and no CA key beside the data; in
/// process, the data directory's own CA key (what [`Scratch::assert_signed`]
/// checks for CLI runs).
pub fn assert_signed_at(dir: &Path, signer: Option<&SignerProc>, n: usize) {
    let own_key = dir.join("rotator-data/ca/ca.key");
    match signer {
        Some(p) => {
            assert_eq!(
                p.signed_serials().len(),
                n,
                "signatures in the signer's log"
            );
            assert!(!own_key.exists(), "no CA key beside the data: {own_key:?}");
        }
        None => assert!(own_key.exists(), "the in-process CA key: {own_key:?}"),
    }
}
