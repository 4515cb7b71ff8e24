//! Criterion benchmarks: key generation and CSR building per key type, signing
//! with the local CA, and add-user end to end into SQLite. The comparison with
//! the hand-run openssl flow is `benches/compare-openssl.sh`.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rotator::pki::{self, KeyType, PrivateKey};

fn keys_and_csrs(c: &mut Criterion) {
    let mut g = c.benchmark_group("keygen");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    for kt in KeyType::ALL {
        g.bench_with_input(BenchmarkId::from_parameter(kt), &kt, |b, kt| {
            b.iter(|| PrivateKey::generate(*kt).unwrap())
        });
    }
    g.finish();
    let mut g = c.benchmark_group("csr");
    g.sample_size(20).measurement_time(Duration::from_secs(2));
    for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
        let key = PrivateKey::generate(kt).unwrap();
        let subject =
            pki::subject_name("alice", &["dev".into(), "rotator:alice:1".into()]).unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(kt), &kt, |b, _| {
            b.iter(|| pki::build_csr(&key, &subject).unwrap())
        });
    }
    g.finish();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn app(dir: &std::path::Path) -> rotator::app::App {
    let cfg = dir.join("rotator.toml");
    std::fs::write(&cfg, format!("data_dir = {:?}\n", dir.join("data"))).unwrap();
    let settings = rotator::config::load_with(Some(&cfg), &[], &Default::default()).unwrap();
    runtime()
        .block_on(rotator::app::App::open(
            settings,
            Arc::new(rotator::support::clock::SystemClock),
            Arc::new(rotator::flows::issue::NoFaults),
            "bench".into(),
        ))
        .unwrap()
        .0
}

fn signing(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let ca = rotator::signer::LocalCa::load(&app.settings.local_ca, app.clock.clone()).unwrap();
    let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
    let orgs = vec!["dev".to_string(), "rotator:alice:1".to_string()];
    let csr = pki::build_csr(&key, &pki::subject_name("alice", &orgs).unwrap()).unwrap();
    let req = rotator::signer::SignRequest {
        credential_id: "b",
        user: "alice",
        organizations: &orgs,
        csr_der: &csr,
        ttl: Duration::from_secs(3600),
    };
    c.bench_function("local-ca sign (parse CSR, check, sign P-256)", |b| {
        b.iter(|| ca.issue(&req, pki::CertProfile::Client).unwrap())
    });
}

fn add_user_end_to_end(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let rt = runtime();
    let n = AtomicU64::new(0);
    let mut g = c.benchmark_group("add-user");
    g.sample_size(30).measurement_time(Duration::from_secs(5));
    g.bench_function(
        "end to end into SQLite (ECDSA P-256, kubeconfig to a 0600 file)",
        |b| {
            b.iter(|| {
                let i = n.fetch_add(1, Ordering::Relaxed);
                let spec = rotator::policy::UserSpec {
                    name: format!("user{i}"),
                    groups: vec!["dev".into()],
                    namespaces: vec!["team-a".into()],
                    role: "view".into(),
                    key_type: KeyType::EcdsaP256,
                    ttl_seconds: 3600,
                };
                let mut sink = rotator::delivery::FileSink {
                    path: dir.path().join("out.kubeconfig"),
                };
                rt.block_on(app.issuer().add_user(spec, &mut sink, "bench"))
                    .unwrap();
            })
        },
    );
    g.finish();
}

criterion_group!(benches, keys_and_csrs, signing, add_user_end_to_end);
criterion_main!(benches);
