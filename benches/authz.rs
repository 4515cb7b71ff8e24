//! The authorization webhook with 100,000 credentials tracked (25,000 users,
//! four generations each: revoked, superseded past grace, superseded within
//! grace, current): decisions per second and latency, in process (the
//! handler's core: parse the review, decide from the snapshot, write the
//! answer) and over HTTPS (kept-alive connections, as kube-apiserver holds
//! them), one and 16 in flight; plus the snapshot's full load and a refresh
//! after one revocation.
//!
//!   cargo bench --bench authz
//!   AUTHZ_USERS=25000 AUTHZ_REQUESTS=200000 AUTHZ_HTTPS_REQUESTS=40000 cargo bench --bench authz
//!
//! Prints a table; asserts nothing.
#[path = "common/shared.rs"]
mod shared;

use shared::{env, pct};

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rotator::daemon::authz::Webhook;
use serde_json::json;

fn main() {
    shared::run_bench(run);
}

/// Fills the database with `users` users of four credentials each, in one
/// transaction of plain SQL (the issuer would take minutes for 100k).
async fn fill(app: &rotator::app::App, users: u64, now: i64) {
    let mut tx = app.store.pool().begin().await.unwrap();
    let q = |sql: &'static str| sqlx::query(sql).bind(users as i64).bind(now);
    q("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
       INSERT INTO users (name, groups, namespaces, role, key_type, ttl_seconds, state, created_at, updated_at, incarnation)
       SELECT 'u' || i, '[\"dev\"]', '[\"team-a\"]', 'edit', 'ecdsa-p256', 86400, 'active', ?2, ?2, 'x' FROM n")
        .execute(&mut *tx)
        .await
        .unwrap();
    q("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 * 4)
       INSERT INTO issuances (id, user_name, generation, kind, spec, step, signer, owner, created_at, updated_at)
       SELECT 'c' || i, 'u' || ((i - 1) / 4 + 1), (i - 1) % 4 + 1, 'rotate', '{}', 'delivered', 'local-ca', 'bench', ?2, ?2 FROM n")
        .execute(&mut *tx)
        .await
        .unwrap();
    q("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1 * 4)
       INSERT INTO credentials (id, user_name, generation, serial, fingerprint, not_before, not_after, state, signer,
                                key_type, certificate, state_at, created_at, generation_group)
       SELECT 'c' || i, 'u' || ((i - 1) / 4 + 1), (i - 1) % 4 + 1, printf('%x', i), printf('%064x', i), ?2 - 60, ?2 + 86400,
              CASE (i - 1) % 4 WHEN 0 THEN 'revoked' WHEN 3 THEN 'current' ELSE 'superseded' END,
              'local-ca', 'ecdsa-p256', '', CASE (i - 1) % 4 WHEN 1 THEN ?2 - 86400 ELSE ?2 - 10 END, ?2,
              'rotator:u' || ((i - 1) / 4 + 1) || ':' || ((i - 1) % 4 + 1) || '.0123456789ab' FROM n")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Review bodies for credential `i` (1-based): its user, groups and fingerprint.
fn body(i: u64) -> Vec<u8> {
    let (user, generation) = ((i - 1) / 4 + 1, (i - 1) % 4 + 1);
    serde_json::to_vec(&json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "resourceAttributes": {"namespace": "team-a", "verb": "get", "version": "v1", "resource": "pods"},
            "user": format!("u{user}"),
            "groups": ["dev", format!("rotator:u{user}:{generation}.0123456789ab"), "system:authenticated"],
            "extra": {"authentication.kubernetes.io/credential-id": [format!("X509SHA256={i:064x}")]},
            "uid": ""
        }
    }))
    .unwrap()
}

/// A spread of credentials over all users and states (a cheap LCG, fixed seed).
fn bodies(credentials: u64, n: usize) -> Arc<Vec<Vec<u8>>> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    Arc::new(
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                body((x >> 33) % credentials + 1)
            })
            .collect(),
    )
}

struct Row {
    what: String,
    n: usize,
    wall: Duration,
    lat: Vec<f64>,
}

fn print(rows: &[Row]) {
    println!(
        "\n| path | in flight | decisions | decisions/s | p50 | p99 | max |\n|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let us = |p| format!("{:.1} µs", pct(&r.lat, p) * 1000.0);
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} |",
            r.what.split('@').next().unwrap(),
            r.what.split('@').nth(1).unwrap_or("1"),
            r.n,
            r.n as f64 / r.wall.as_secs_f64(),
            us(0.50),
            us(0.99),
            us(1.0),
        );
    }
}

/// In process: `in_flight` OS threads each answering its share of `bodies`.
fn in_process(
    hook: &Webhook,
    app: &Arc<rotator::app::App>,
    bodies: &Arc<Vec<Vec<u8>>>,
    in_flight: usize,
) -> Row {
    let started = Instant::now();
    let per = bodies.len() / in_flight;
    let lat: Vec<f64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..in_flight)
            .map(|t| {
                let (hook, app, bodies) = (hook.clone(), app.clone(), bodies.clone());
                s.spawn(move || {
                    let mut lat = Vec::with_capacity(per);
                    for b in &bodies[t * per..(t + 1) * per] {
                        let t0 = Instant::now();
                        let (status, _) = hook.answer(&app, b);
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                        assert_eq!(status, 200);
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let wall = started.elapsed();
    let mut lat = lat;
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Row {
        what: format!("in process@{in_flight}"),
        n: per * in_flight,
        wall,
        lat,
    }
}

async fn https(
    addr: std::net::SocketAddr,
    ca: &str,
    bodies: &Arc<Vec<Vec<u8>>>,
    in_flight: usize,
) -> Row {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rotator::pki::root_store(ca).unwrap())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    let per = bodies.len() / in_flight;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let (cfg, bodies) = (cfg.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.set_nodelay(true).unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(
                    rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
                    tcp,
                )
                .await
                .unwrap();
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut lat = Vec::with_capacity(per);
            for b in &bodies[t * per..(t + 1) * per] {
                let t0 = Instant::now();
                send.ready().await.unwrap();
                let req = hyper::Request::post("/v1/authorize")
                    .header(hyper::header::HOST, "127.0.0.1")
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(b.clone())))
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Row {
        what: format!("HTTPS (TLS 1.3, kept alive)@{in_flight}"),
        n: per * in_flight,
        wall,
        lat,
    }
}

async fn run() {
    let users = env("AUTHZ_USERS", 25_000);
    let requests = env("AUTHZ_REQUESTS", 200_000) as usize;
    let https_requests = env("AUTHZ_HTTPS_REQUESTS", 32_000) as usize;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("rotator.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[authz]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data")
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
    let now = rotator::support::clock::Clock::now(&*app.clock);
    fill(&app, users, now).await;
    let (_tx, apps) = tokio::sync::watch::channel(app.clone());
    let hook = Webhook::new(apps);

    let t = Instant::now();
    assert!(hook.refresh().await);
    let full = t.elapsed();
    let tracked = hook.snapshot.read().len();
    sqlx::query("UPDATE credentials SET state = 'revoked', state_at = ? WHERE id = 'c8'")
        .bind(now)
        .execute(app.store.pool())
        .await
        .unwrap();
    let t = Instant::now();
    assert!(hook.refresh().await);
    let incremental = t.elapsed();
    let t = Instant::now();
    assert!(hook.refresh().await);
    let unchanged = t.elapsed();

    let credentials = users * 4;
    let mut rows = Vec::new();
    let b = bodies(credentials, requests);
    for in_flight in [1, 16] {
        rows.push(in_process(&hook, &app, &b, in_flight));
    }
    // The real listener and TLS config, on a free port.
    let tls = rotator::daemon::authz::server::tls_config(&app).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(rotator::daemon::authz::server::serve(
        listener,
        tls,
        hook.clone(),
        async move {
            let _ = stop_rx.changed().await;
        },
    ));
    let ca = std::fs::read_to_string(dir.path().join("data/ca/ca.crt")).unwrap();
    let b = bodies(credentials, https_requests);
    for in_flight in [1, 16] {
        rows.push(https(addr, &ca, &b, in_flight).await);
    }
    let _ = stop_tx.send(true);
    let _ = server.await;

    println!(
        "\nauthorization webhook, {tracked} credentials tracked ({users} users x 4 generations)"
    );
    println!(
        "snapshot: full load {:.1} ms, refresh after one revoke {:.2} ms, refresh with nothing changed {:.3} ms",
        full.as_secs_f64() * 1000.0,
        incremental.as_secs_f64() * 1000.0,
        unchanged.as_secs_f64() * 1000.0
    );
    print(&rows);
}
