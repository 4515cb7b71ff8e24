//! Self-service against the Kubernetes API test server: users enroll
//! with a one-time token and then renew over mutual TLS through rotator's HTTPS
//! API, with the real client code (`rotator fetch` without the kubeconfig
//! merge), beside the hand-run openssl + kubectl flow in the same run:
//!
//!   cargo bench --bench self_service
//!   SELF_USERS=500 SELF_CONCURRENCY=16 SELF_SIGNING_RATE=20 HAND_USERS=20 cargo bench --bench self_service
//!
//! Prints a table; asserts nothing.
#[path = "common/shared.rs"]
mod shared;

use shared::{env, hand_flow, pct};

use std::sync::Arc;
use std::time::{Duration, Instant};

use rotator::client::{self, Connection};
use rotator::pki::{KeyType, PrivateKey};
use rotator::policy::UserSpec;
use testcluster::{Options, TestCluster};

fn main() {
    shared::run_bench(run);
}

/// Runs `work(i)` for every user, `concurrency` at a time; latencies in ms and the wall time.
async fn timed<F, Fut>(users: usize, concurrency: usize, work: F) -> (Vec<f64>, Duration)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let work = Arc::new(work);
    let queue = Arc::new(std::sync::Mutex::new((0..users).collect::<Vec<_>>()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (work, queue) = (work.clone(), queue.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(i) = queue.lock().unwrap().pop() else {
                    break;
                };
                let t = Instant::now();
                work(i).await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (all, started.elapsed())
}

async fn run() {
    let users = env("SELF_USERS", 200) as usize;
    let concurrency = env("SELF_CONCURRENCY", 16) as usize;
    let rate = env("SELF_SIGNING_RATE", 20);
    let hand = env("HAND_USERS", 20) as usize;
    let cluster = TestCluster::start(Options {
        signing_rate: (rate > 0).then_some(rate as f64),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.kubeconfig");
    std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
    let k = |args: &[&str]| hand_flow::kubectl(&admin, args);
    k(&["create", "namespace", "team-a"]);

    // The API's serving certificate, from a throwaway CA the clients trust.
    let ca = rotator::signer::LocalCa::create(
        &rotator::config::LocalCaSettings {
            cert_file: dir.path().join("serving-ca.crt"),
            key_file: dir.path().join("serving-ca.key"),
            configured: true,
            socket: None,
            common_name: "bench serving CA".into(),
            validity: Duration::from_secs(86_400),
        },
        Arc::new(rotator::support::clock::SystemClock),
    )
    .unwrap();
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let cert = ca
        .issue_server(&key, &["127.0.0.1".into()], Duration::from_secs(3600))
        .unwrap();
    std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.to_pem().as_bytes()).unwrap();
    let cfg = dir.path().join("rotator.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\nsigner = \"kubernetes\"\n[kubernetes]\nkubeconfig = {:?}\nsigning_timeout = \"10m\"\n[server]\ntls_cert = {:?}\ntls_key = {:?}\nrate_limit_per_address = 100000\nrate_limit_per_user = 100\n",
            dir.path().join("data"),
            admin,
            dir.path().join("tls.crt"),
            dir.path().join("tls.key"),
        ),
    )
    .unwrap();
    let settings = rotator::config::load_with(Some(&cfg), &[], &Default::default()).unwrap();
    let app = Arc::new(
        rotator::app::App::open(
            settings,
            Arc::new(rotator::support::clock::SystemClock),
            Arc::new(rotator::flows::issue::NoFaults),
            "bench".into(),
        )
        .await
        .unwrap()
        .0,
    );
    let tls = rotator::daemon::api::server_config(&app).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("https://{}", listener.local_addr().unwrap());
    let (_tx, apps) = tokio::sync::watch::channel(app.clone());
    tokio::spawn(rotator::daemon::api::serve(
        listener,
        tls,
        apps,
        std::future::pending(),
    ));

    // The admin's part, untimed: one token per user.
    let mut tokens = Vec::new();
    for i in 0..users {
        let spec = UserSpec {
            name: format!("u{i}"),
            groups: vec!["dev".into()],
            namespaces: vec!["team-a".into()],
            role: "view".into(),
            key_type: KeyType::EcdsaP256,
            ttl_seconds: 3600,
        };
        tokens.push(
            rotator::flows::enroll::add_user(&app, &spec)
                .await
                .unwrap()
                .token
                .to_string(),
        );
    }
    let tokens = Arc::new(tokens);
    let conn = |i: usize| Connection {
        server: server.clone(),
        server_ca_pem: Some(ca.certificate_pem().to_string()),
        state_dir: dir.path().join(format!("state-u{i}")),
        timeout: Duration::from_secs(600),
    };
    let conns: Arc<Vec<Connection>> = Arc::new((0..users).map(conn).collect());

    let (c, t) = (conns.clone(), tokens.clone());
    let (enroll, enroll_wall) = timed(users, concurrency, move |i| {
        let (c, t) = (c.clone(), t.clone());
        async move {
            client::obtain(&c[i], Some(&t[i])).await.expect("enroll");
        }
    })
    .await;
    let c = conns.clone();
    let (renew, renew_wall) = timed(users, concurrency, move |i| {
        let c = c.clone();
        async move {
            client::obtain(&c[i], None).await.expect("renew");
        }
    })
    .await;

    // The hand-run flow, one user after another, as a script would do it.
    let hand_wall = hand_flow::run(dir.path(), &admin, hand);
    let hand_rate = hand as f64 / hand_wall.as_secs_f64();
    let enroll_rate = users as f64 / enroll_wall.as_secs_f64();
    let renew_rate = users as f64 / renew_wall.as_secs_f64();

    println!(
        "\nself-service through the user API against the test server (signing rate limit: {})",
        if rate > 0 {
            format!("{rate}/s")
        } else {
            "none".into()
        }
    );
    println!(
        "{:<66} {:>7} {:>10} {:>9} {:>9}",
        "flow", "users", "users/s", "p50 ms", "p99 ms"
    );
    for (name, n, r, lat) in [
        (
            format!("enroll: token + local key + CSR over HTTPS, {concurrency} in flight"),
            users,
            enroll_rate,
            &enroll,
        ),
        (
            format!("renew: mutual TLS + new local key + CSR, {concurrency} in flight"),
            users,
            renew_rate,
            &renew,
        ),
    ] {
        println!(
            "{name:<66} {n:>7} {r:>10.1} {:>9.1} {:>9.1}",
            pct(lat, 0.5),
            pct(lat, 0.99)
        );
    }
    println!(
        "{:<66} {:>7} {:>10.1} {:>9.1} {:>9}",
        "hand-run: openssl + kubectl create/approve/wait/get, serial",
        hand,
        hand_rate,
        hand_wall.as_secs_f64() * 1000.0 / hand as f64,
        ""
    );
    println!(
        "{:<66} {:>7} {:>10.1}",
        "ratio renew / hand-run (users per second)",
        "",
        renew_rate / hand_rate
    );
    println!(
        "{:<66} {:>7} {:>10.1}",
        "ratio hand-run / renew (latency of one credential, p50)",
        "",
        (hand_wall.as_secs_f64() * 1000.0 / hand as f64) / pct(&renew, 0.5)
    );
}
