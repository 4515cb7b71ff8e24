//! A new installation of the ha-postgres overlay, from nothing: the
//! configuration the overlay ships (its ConfigMap and its pod's variables,
//! rendered by `kubectl kustomize`), on a throwaway PostgreSQL database, with a
//! temporary directory as the empty shared volume, both replicas started at
//! once; and the refusal when the database has events but the key is gone.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use testcluster::Options;

use crate::common::*;
use crate::failover::{Daemon, free_port, lease_field, readyz_until};
use crate::kubernetes::Kx;

/// Where the overlay mounts what, and the directory standing in for it here.
fn mapped(value: &str, shared: &Path, tls: &Path) -> String {
    value
        .replace("/var/lib/rotator-shared", shared.to_str().unwrap())
        .replace("/etc/rotator-tls", tls.to_str().unwrap())
}

/// The rotator container's variables as the overlay sets them, on this
/// machine: the shared volume and the TLS Secret mapped to directories, the
/// database URL the Secret would hold. Then what only a test needs: the test
/// cluster's kubeconfig instead of the in-cluster one, ports of its own, and
/// a short Lease so the takeover below is quick.
fn pod_env(kx: &Kx, vars: &[(String, String)], shared: &Path, tls: &Path) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| match k.as_str() {
            "ROTATOR_DATABASE_URL" => (k.clone(), kx.s.database_url.clone().unwrap()),
            _ => (k.clone(), mapped(v, shared, tls)),
        })
        .collect();
    assert!(
        env.iter().any(|(k, _)| k == "ROTATOR_AUDIT__KEY_FILE"),
        "the overlay configures the shared audit key: {env:?}"
    );
    let own = kx.s.path("rotator.kubeconfig").display().to_string();
    env.extend([
        ("ROTATOR_KUBERNETES__KUBECONFIG".to_string(), own),
        ("ROTATOR_SERVER__LISTEN".into(), "127.0.0.1:0".into()),
        (
            "ROTATOR_LEADER_ELECTION__LEASE_DURATION".into(),
            "2s".into(),
        ),
    ]);
    env
}

fn serving_cert(dir: &Path) {
    std::fs::create_dir(dir).unwrap();
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    ok(&run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=rotator.example.internal",
            "-addext",
            "subjectAltName=DNS:rotator.example.internal,DNS:rotator.rotator.svc",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            crt.to_str().unwrap(),
        ],
    ));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn replica(kx: &Kx, pod: &str, env: &[(String, String)], metrics: u16) -> Daemon {
    let mut c = tokio::process::Command::from(kx.s.command());
    c.args([
        "--config",
        "ha.toml",
        "--data-dir",
        &format!("{pod}/data"),
        "serve",
        "--log-format",
        "json",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics}"),
    ]);
    c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Daemon::start(c)
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_the_ha_overlay_start_at_once_from_nothing_with_one_key() {
    let Some(_pg) = use_engine(
        Engine::Postgres,
        "first_start::two_replicas_of_the_ha_overlay_start_at_once_from_nothing_with_one_key",
    ) else {
        return;
    };
    let kx = Kx::new(Options::default(), "").await;
    let (config, vars) = crate::deploy_overlays::shipped("ha-postgres", "rotator");
    kx.s.write("ha.toml", &config);
    let (shared, tls) = (kx.s.path("rotator-shared"), kx.s.path("rotator-tls"));
    std::fs::create_dir(&shared).unwrap();
    serving_cert(&tls);
    let env = pod_env(&kx, &vars, &shared, &tls);

    // Both at once, on an empty database and an empty shared volume.
    let (pa, pb) = (free_port(), free_port());
    let mut a = replica(&kx, "pod-a", &env, pa);
    let mut b = replica(&kx, "pod-b", &env, pb);
    for (port, d) in [(pa, &mut a), (pb, &mut b)] {
        d.wait_for("rotator daemon started", Duration::from_secs(30), |_| true)
            .await;
        readyz_until(port, "ready", |code, _| code == 200).await;
    }
    assert_eq!(
        files(&shared),
        ["audit.head", "audit.head.lock", "audit.key", "seal.key"],
        "one audit key, one checkpoint, one sealing key on the shared volume"
    );
    for f in ["audit.key", "audit.head", "seal.key"] {
        let mode = std::fs::metadata(shared.join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let seal = std::fs::read(shared.join("seal.key")).unwrap();

    // The leader steps down; the other takes over and writes its epoch: an
    // event keyed by the second process, which verifies only if it holds the
    // key the first one made.
    let holder = lease_field(&kx, "holderIdentity").await;
    let (leader, mut standby) = if holder.ends_with(&format!("-{}", a.pid())) {
        (a, b)
    } else {
        (b, a)
    };
    assert!(holder.ends_with(&format!("-{}", leader.pid())), "{holder}");
    assert!(leader.stop().await.success());
    standby
        .wait_for("became the leader", Duration::from_secs(30), |_| true)
        .await;
    assert!(standby.stop().await.success());

    let count = |sql: &'static str| kx.s.count(sql);
    assert_eq!(
        count("SELECT COUNT(*) FROM audit_events WHERE action = 'leader.epoch'").await,
        2,
        "each replica led once"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM audit_events WHERE action IN ('store.instance', 'store.init')")
            .await,
        2,
        "the database was initialized once, not once per replica"
    );
    let (instance,): (String,) = sqlx::query_as("SELECT value FROM meta WHERE key = 'instance_id'")
        .fetch_one(&mut kx.s.db().await)
        .await
        .unwrap();
    for pod in ["pod-a", "pod-b"] {
        let marker = std::fs::read_to_string(kx.s.path(pod).join("data/instance")).unwrap();
        assert!(
            marker.contains(&format!("instance {instance}")),
            "{pod}'s data directory names the database's instance {instance}: {marker}"
        );
    }
    assert_eq!(
        std::fs::read(shared.join("seal.key")).unwrap(),
        seal,
        "the sealing key was made once"
    );
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let verify = ok(&kx.s.rotator_env(
        &[
            "--config",
            "ha.toml",
            "--data-dir",
            "pod-a/data",
            "audit",
            "verify",
        ],
        &env_ref,
    ));
    assert!(verify.contains("audit chain intact"), "{verify}");

    // Events exist and the key is gone: refused, and no new key is made.
    std::fs::remove_file(shared.join("audit.key")).unwrap();
    let o = kx.s.rotator_env(
        &["--config", "ha.toml", "--data-dir", "pod-c/data", "init"],
        &env_ref,
    );
    let err = fails_with(&o, 3);
    assert!(
        err.contains("it does not exist, but the audit log already has"),
        "{err}"
    );
    assert!(
        err.contains("fix: restore the audit key from its backup"),
        "{err}"
    );
    assert!(!shared.join("audit.key").exists(), "a key was made: {err}");
}
