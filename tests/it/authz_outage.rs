//! The webhook while something is wrong around it: a flood of connections
//! that never finish TLS (from other addresses and from the API server's own),
//! and a database it can no longer read. In both the API server must get an
//! answer it can act on: every review answered during the flood, and a 503
//! (its failurePolicy applies) rather than "no opinion" from states too old.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::authz::{Daemon, Presented, openssl_client, review};
use crate::common::{Scratch, ok};
use crate::user_api::raw::{self, Conn};

/// What a flood opened, and whether it held its numbers at least once.
#[derive(Debug, Default, Clone, Copy)]
struct Opened {
    idle: usize,
    stalled: usize,
}

/// Bytes that start a TLS handshake (a ClientHello), for a client that then
/// says nothing more.
fn client_hello(tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut c = rustls::ClientConnection::new(tls.clone(), name).unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

/// Whether the server has closed `c` (bytes it sent are read and dropped).
fn closed(c: &tokio::net::TcpStream) -> bool {
    let mut b = [0u8; 16 * 1024];
    loop {
        match c.try_read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Keeps `idle` connections that never start TLS and `stalled` ones that send
/// a ClientHello and nothing more open to `to`, spread over the source
/// addresses `from`, reopening each one the server closes, until `stop`.
/// `up` turns true once all of them were open at once.
async fn flood(
    from: Vec<String>,
    to: SocketAddr,
    idle: usize,
    stalled: usize,
    hello: Vec<u8>,
    up: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Opened {
    use tokio::io::AsyncWriteExt;
    let mut opened = Opened::default();
    let (mut held_idle, mut held_stalled): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    let (mut next, mut errors) = (0usize, 0usize);
    while !*stop.borrow() {
        held_idle.retain(|c| !closed(c));
        held_stalled.retain(|c| !closed(c));
        let mut failed = false;
        while held_idle.len() < idle || held_stalled.len() < stalled {
            let src = &from[next % from.len()];
            next += 1;
            let Ok(Ok(mut c)) =
                tokio::time::timeout(Duration::from_secs(1), raw::tcp(src, to)).await
            else {
                failed = true;
                break;
            };
            if held_stalled.len() < stalled {
                // Closed at once (displaced) is fine: it is reopened next round.
                let _ = c.write_all(&hello).await;
                held_stalled.push(c);
                opened.stalled += 1;
            } else {
                held_idle.push(c);
                opened.idle += 1;
            }
        }
        errors += failed as usize;
        if !failed && opened.idle >= idle && opened.stalled >= stalled {
            let _ = up.send(true);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("flood: {errors} rounds cut short by a connect that failed");
    opened
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Under a flood of `from`: REVIEWS reviews on a new connection each (each
/// needs a handshake while the flood holds its connections) and as many on a
/// connection opened before it (as the API server keeps them). The failures.
async fn reviews_during_flood(d: &Daemon, from: &[&str], hello: &[u8]) -> (Vec<String>, Opened) {
    const REVIEWS: usize = 40;
    let body = serde_json::to_vec(&review("nobody", &[], None)).unwrap();
    let mut kept = Conn::new("127.0.0.1", d.addr, d.api_server.clone());
    let first = kept
        .send("POST", "/v1/authorize", "application/json", body.clone())
        .await;
    assert_eq!(first.map(|r| r.0), Ok(200));
    let (up_tx, mut up) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let from: Vec<String> = from.iter().map(|s| s.to_string()).collect();
    let flooding = tokio::spawn(flood(
        from,
        d.addr,
        1100,
        60,
        hello.to_vec(),
        up_tx,
        stopped,
    ));
    tokio::time::timeout(Duration::from_secs(60), up.wait_for(|u| *u))
        .await
        .expect("the flood held 1,100 idle and 60 stalled connections open at once")
        .unwrap();
    let mut failures = Vec::new();
    for i in 0..REVIEWS {
        let mut fresh = Conn::new("127.0.0.1", d.addr, d.api_server.clone());
        for (what, c) in [
            ("new connection", &mut fresh),
            ("kept connection", &mut kept),
        ] {
            match c
                .send("POST", "/v1/authorize", "application/json", body.clone())
                .await
            {
                Ok((200, _)) => {}
                other => failures.push(format!("review {i} on a {what}: {other:?}")),
            }
        }
    }
    let _ = stop.send(true);
    let opened = flooding.await.unwrap();
    assert_eq!(kept.connects, 1, "the kept connection was never lost");
    (failures, opened)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_that_never_finish_tls_leaves_every_review_answered() {
    let s = Scratch::new();
    let (api_ca, api_cert, api_key) =
        openssl_client(s.dir.path(), "apiserver", "kube-apiserver", &[]);
    s.write(
        "rotator.toml",
        &format!("data_dir = \"rotator-data\"\n[authz]\nclient_ca_file = {api_ca:?}\n"),
    );
    ok(&s.rotator(&["--config", "rotator.toml", "init"]));
    let d = Daemon::start(&s, &api_ca, (&api_cert, &api_key)).await;
    let ca = std::fs::read_to_string(s.path("rotator-data/ca/ca.crt")).unwrap();
    let hello = client_hello(&raw::config(&ca, None));

    // From eight other addresses: each holds at most its share of pending
    // handshakes, and together they fill the pool the API server's new
    // connections come into.
    let others: Vec<String> = (2..10).map(|i| format!("127.0.0.{i}")).collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    let started = Instant::now();
    let (failures, opened) = reviews_during_flood(&d, &others, &hello).await;
    eprintln!(
        "flood from 127.0.0.2-9: {opened:?} opened, {} reviews failed, {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(opened.idle >= 1100 && opened.stalled >= 60, "{opened:?}");
    let displaced = |m: &str, reason: &str| {
        metric(
            m,
            &format!("rotator_authz_connections_closed_total{{reason=\"{reason}\"}}"),
        )
    };
    // Eight addresses fill the pool before any reaches its share.
    let m = d.metrics().await;
    assert!(displaced(&m, "total") >= 800.0, "{m}");

    // From the API server's own address: only the reserve for connections
    // that completed mutual TLS, and the order in which pending ones are
    // displaced (silent first), keep it answered.
    let started = Instant::now();
    let (failures, opened) = reviews_during_flood(&d, &["127.0.0.1"], &hello).await;
    eprintln!(
        "flood from 127.0.0.1: {opened:?} opened, {} reviews failed, {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(opened.idle >= 1100 && opened.stalled >= 60, "{opened:?}");
    // One address reaches its share first.
    let m = d.metrics().await;
    assert!(displaced(&m, "address") >= 800.0, "{m}");
    d.stop().await;
}

/// A replica cut off from PostgreSQL: after `authz.max_staleness` without a
/// read of the database it answers 503 (so the API server's failurePolicy
/// applies) and says why in /readyz and /metrics; once the database is back,
/// it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_cannot_read_its_database_stops_answering_from_old_states() {
    let Some(pg) = crate::pg::private("authz_outage::a_webhook_that_cannot_read_its_database")
    else {
        return;
    };
    let mut s = Scratch::new();
    s.database_url = Some(pg.create_database());
    let (api_ca, api_cert, api_key) =
        openssl_client(s.dir.path(), "apiserver", "kube-apiserver", &[]);
    // max_staleness left at its default: three refresh intervals (1.5 s).
    s.write(
        "rotator.toml",
        &format!("data_dir = \"rotator-data\"\n[authz]\nclient_ca_file = {api_ca:?}\nrefresh_interval = \"500ms\"\n"),
    );
    let r = |args: &[&str]| {
        let mut all = vec!["--config", "rotator.toml"];
        all.extend_from_slice(args);
        ok(&s.rotator(&all))
    };
    r(&["init"]);
    r(&[
        "add-user",
        "alice",
        "--group",
        "dev",
        "-n",
        "team-a",
        "--role",
        "edit",
        "--out",
        "alice.kubeconfig",
    ]);
    let d = Daemon::start(&s, &api_ca, (&api_cert, &api_key)).await;
    let alice = Presented::from_kubeconfig(s.dir.path(), "alice", &s.path("alice.kubeconfig"));
    let body = review(&alice.user, &alice.groups, Some(&alice.fingerprint));
    assert_eq!(d.decision(&alice).await, None, "current: no opinion");
    let (status, text) = d.get("/readyz").await;
    assert_eq!(status, 200, "{text}");
    assert!(
        text.contains("ok   authorization webhook states fresh"),
        "{text}"
    );

    pg.stop("fast").unwrap();
    let until = |want: u16| {
        let (d, body) = (&d, &body);
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let (status, v) = d.ask(body).await;
                if status == want {
                    return v;
                }
                assert!(
                    Instant::now() < deadline,
                    "still {status} instead of {want}: {v}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let v = until(503).await;
    assert_eq!(
        (v["kind"].as_str(), v["code"].as_i64()),
        (Some("Status"), Some(503)),
        "{v}"
    );
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("authz.max_staleness (1s 500ms)") && message.contains("failurePolicy"),
        "{message}"
    );
    let (status, text) = d.get("/readyz").await;
    assert_eq!(status, 503, "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("authorization webhook states fresh"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.starts_with("FAIL") && line.contains("max_staleness") && line.contains("fix:"),
        "{line}"
    );
    let (status, m) = d.get("/metrics").await;
    assert_eq!(
        status, 200,
        "metrics are served while the database is down: {m}"
    );
    assert_eq!(metric(&m, "rotator_authz_snapshot_stale"), 1.0, "{m}");
    assert!(
        metric(&m, "rotator_authz_snapshot_age_seconds") > 1.5,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "rotator_authz_decisions_total{decision=\"unavailable\",reason=\"stale\"}"
        ) >= 1.0,
        "{m}"
    );

    pg.start().unwrap();
    let v = until(200).await;
    assert!(v["status"].get("denied").is_none(), "current again: {v}");
    // Fresh again: ready, and the gauge says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = d.get("/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = d.metrics().await;
    assert_eq!(metric(&m, "rotator_authz_snapshot_stale"), 0.0, "{m}");
    d.stop().await;
}
