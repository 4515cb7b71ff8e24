//! Helpers: run the real `rotator` binary in a scratch directory, run kubectl and
//! openssl as independent checks, and build an in-process `App` for fault tests.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use rotator::app::App;
use rotator::clock::SystemClock;
use rotator::config::{self, Overrides};
use rotator::issuer::{Faults, NoFaults};

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
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
        let mut c = Command::new(env!("CARGO_BIN_EXE_rotator"));
        c.current_dir(self.dir.path()).args(args);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
            c.env_remove(k);
        }
        c.envs(env.iter().copied());
        c.output().expect("run rotator")
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    /// A database connection for assertions that the CLI does not expose.
    pub async fn count(&self, sql: &'static str) -> i64 {
        let url = format!(
            "sqlite://{}?mode=ro",
            self.path("rotator-data/rotator.db").display()
        );
        let mut conn = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
            .await
            .expect("open db");
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

/// An in-process App over a scratch data directory.
pub async fn app(dir: &Path, toml: &str, faults: Arc<dyn Faults>) -> App {
    let cfg = dir.join("rotator.toml");
    std::fs::write(
        &cfg,
        format!("data_dir = {:?}\n{toml}", dir.join("rotator-data")),
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
