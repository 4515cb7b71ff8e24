//! Local-CA issuance in process versus through a `rotator signer` socket (#12):
//! one at a time and 16 in flight. Prints a table; the socket's extra cost per
//! certificate must stay under 0.5 ms. The signer side is the real service code
//! (policy checks, HTTP/1.1 + JSON, the fsynced log) on a real Unix socket.
//! `cargo bench --bench signer`
use std::sync::Arc;
use std::time::{Duration, Instant};

use rotator::config::{LocalCaSettings, SignerServiceSettings};
use rotator::pki::{self, KeyType, PrivateKey};
use rotator::signer::local_ca::service::{self, Service};
use rotator::signer::{LocalCa, NoProgress, SignRequest, Signer, SocketSigner};

const N: usize = 400;

struct Csr {
    der: Vec<u8>,
    orgs: Vec<String>,
}

fn csrs() -> Vec<Csr> {
    (0..N)
        .map(|i| {
            let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
            let orgs = vec![
                "dev".to_string(),
                rotator::policy::generation_group("alice", i as i64 + 1, &key.spki_der()),
            ];
            let der = pki::build_csr(&key, &pki::subject_name("alice", &orgs).unwrap()).unwrap();
            Csr { der, orgs }
        })
        .collect()
}

async fn run(signer: Arc<dyn Signer>, csrs: Arc<Vec<Csr>>, in_flight: usize) -> Duration {
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..N {
        let (signer, csrs, gate) = (signer.clone(), csrs.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            let c = &csrs[i];
            signer
                .sign(
                    SignRequest {
                        credential_id: "bench",
                        user: "alice",
                        organizations: &c.orgs,
                        csr_der: &c.der,
                        ttl: Duration::from_secs(3600),
                    },
                    &NoProgress,
                )
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCaSettings {
        cert_file: dir.path().join("ca.crt"),
        key_file: dir.path().join("ca.key"),
        configured: true,
        socket: Some(dir.path().join("signer.sock")),
        common_name: "bench CA".into(),
        validity: Duration::from_secs(86_400),
    };
    let clock = Arc::new(rotator::clock::SystemClock);
    let in_process: Arc<dyn Signer> = Arc::new(LocalCa::create(&ca, clock.clone()).unwrap());
    let ss = SignerServiceSettings {
        socket: ca.socket.clone().unwrap(),
        max_ttl: Duration::from_secs(86_400),
        allowed_uids: vec![],
        rate_per_second: 1_000_000,
        burst: 1_000_000,
        max_body_bytes: 65_536,
        log_file: dir.path().join("signer.log"),
    };
    let denied = rotator::policy::denied_group_patterns(&["@defaults".into()]).unwrap();
    let csrs = Arc::new(csrs());
    let socket: Arc<dyn Signer> = rt.block_on(async {
        let svc = Arc::new(Service::open(&ca, &ss, denied, clock).unwrap());
        let listener = service::bind(&ss.socket).unwrap();
        tokio::spawn(svc.serve(listener, std::future::pending()));
        Arc::new(SocketSigner::connect(&ca).await.unwrap())
    });
    // Warm up both paths.
    rt.block_on(run(in_process.clone(), csrs.clone(), 16));
    rt.block_on(run(socket.clone(), csrs.clone(), 16));
    println!("local-ca issuance, {N} certificates each (ECDSA P-256), per certificate:");
    println!("| in flight | in process | through the socket | socket cost |");
    println!("|---|---|---|---|");
    let mut worst = 0.0f64;
    for in_flight in [1, 16] {
        let a = rt.block_on(run(in_process.clone(), csrs.clone(), in_flight));
        let b = rt.block_on(run(socket.clone(), csrs.clone(), in_flight));
        let (a, b) = (
            a.as_secs_f64() * 1e3 / N as f64,
            b.as_secs_f64() * 1e3 / N as f64,
        );
        worst = worst.max(b - a);
        println!("| {in_flight} | {a:.3} ms | {b:.3} ms | {:+.3} ms |", b - a);
    }
    println!(
        "socket cost: {worst:.3} ms per certificate at most ({})",
        if worst < 0.5 {
            "under the 0.5 ms budget"
        } else {
            "OVER the 0.5 ms budget"
        }
    );
}
