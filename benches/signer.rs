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

/// `n` GET /healthz round trips one after another: the transport alone
/// (connection, HTTP/1.1, the server's task), no signing and no log.
async fn healthz(socket: &std::path::Path, n: usize) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        let (status, _) =
            rotator::signer::local_ca::socket::call(socket, "GET", "/healthz", vec![])
                .await
                .unwrap();
        assert_eq!(status, 200);
    }
    start.elapsed()
}

/// One log-sized append and fdatasync in `dir`, `n` times: the disk's commit.
fn fsync(dir: &std::path::Path, n: usize) -> Duration {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("fsync.probe"))
        .unwrap();
    let line = [b'x'; 320];
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&line).unwrap();
        f.sync_data().unwrap();
    }
    start.elapsed()
}

/// A signer service on a socket in `dir`, its log in `log_dir`, and a client.
fn signer_in(
    rt: &tokio::runtime::Runtime,
    ca: &LocalCaSettings,
    dir: &std::path::Path,
    log_dir: &std::path::Path,
) -> (Arc<dyn Signer>, std::path::PathBuf) {
    let clock = Arc::new(rotator::clock::SystemClock);
    let socket = dir.join("signer.sock");
    let ss = SignerServiceSettings {
        socket: socket.clone(),
        max_ttl: Duration::from_secs(86_400),
        allowed_uids: vec![],
        rate_per_second: 1_000_000,
        burst: 1_000_000,
        max_body_bytes: 65_536,
        log_file: log_dir.join("signer.log"),
    };
    let denied = rotator::policy::denied_group_patterns(&["@defaults".into()]).unwrap();
    let settings = LocalCaSettings {
        socket: Some(socket.clone()),
        ..ca.clone()
    };
    let signer: Arc<dyn Signer> = rt.block_on(async {
        let svc = Arc::new(Service::open(&settings, &ss, denied, clock).unwrap());
        let listener = service::bind(&ss.socket).unwrap();
        tokio::spawn(svc.serve(listener, std::future::pending()));
        Arc::new(SocketSigner::connect(&settings).await.unwrap())
    });
    (signer, socket)
}

/// The client without kept-open connections (as it was before): a new connection
/// for every signature (the same request and answer as SocketSigner's).
struct NewConnectionEach(std::path::PathBuf);

impl Signer for NewConnectionEach {
    fn kind(&self) -> &'static str {
        "local-ca"
    }
    fn ca_bundle_pem(&self) -> &str {
        ""
    }
    fn sign<'a>(
        &'a self,
        req: SignRequest<'a>,
        _: &'a dyn rotator::signer::Progress,
    ) -> rotator::signer::BoxFuture<'a, Result<rotator::signer::Signed, rotator::signer::SignError>>
    {
        Box::pin(async move {
            let body = serde_json::to_vec(&serde_json::json!({
                "csr": pki::pem_encode("CERTIFICATE REQUEST", req.csr_der),
                "ttl_seconds": req.ttl.as_secs(),
            }))
            .unwrap();
            let (status, body) =
                rotator::signer::local_ca::socket::call(&self.0, "POST", "/v1/sign", body)
                    .await
                    .unwrap();
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            Ok(rotator::signer::Signed {
                certificate_pem: v["certificate"].as_str().unwrap().to_string(),
            })
        })
    }
    fn cleanup<'a>(
        &'a self,
        _: &'a str,
    ) -> rotator::signer::BoxFuture<'a, Result<(), rotator::signer::SignError>> {
        Box::pin(async { Ok(()) })
    }
}

fn ms(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e3 / n as f64
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
        socket: None,
        common_name: "bench CA".into(),
        validity: Duration::from_secs(86_400),
    };
    let clock = Arc::new(rotator::clock::SystemClock);
    let in_process: Arc<dyn Signer> = Arc::new(LocalCa::create(&ca, clock).unwrap());
    let csrs = Arc::new(csrs());
    // The signer as deployed (its log on this machine's disk), and the same
    // with its log on tmpfs, where fdatasync costs nothing: the difference is
    // what the log's fsync costs a signature.
    let (socket, socket_path) = signer_in(&rt, &ca, dir.path(), dir.path());
    let shm = std::path::Path::new("/dev/shm");
    let tmpfs = shm.is_dir().then(|| tempfile::tempdir_in(shm).unwrap());
    let sock2 = tempfile::tempdir().unwrap();
    let on_tmpfs = tmpfs
        .as_ref()
        .map(|t| signer_in(&rt, &ca, sock2.path(), t.path()).0);
    let one_shot: Arc<dyn Signer> = Arc::new(NewConnectionEach(socket_path.clone()));
    // Warm up every path.
    rt.block_on(run(in_process.clone(), csrs.clone(), 16));
    rt.block_on(run(socket.clone(), csrs.clone(), 16));
    if let Some(t) = &on_tmpfs {
        rt.block_on(run(t.clone(), csrs.clone(), 16));
    }
    println!(
        "local-ca issuance, {N} certificates each (ECDSA P-256), per certificate; load average {}:",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "| in flight | in process | through the socket | socket cost | socket, log on tmpfs | socket, a new connection each |"
    );
    println!("|---|---|---|---|---|---|");
    let mut worst = 0.0f64;
    for in_flight in [1, 16] {
        let a = ms(
            rt.block_on(run(in_process.clone(), csrs.clone(), in_flight)),
            N,
        );
        let b = ms(rt.block_on(run(socket.clone(), csrs.clone(), in_flight)), N);
        let c = on_tmpfs
            .as_ref()
            .map(|t| ms(rt.block_on(run(t.clone(), csrs.clone(), in_flight)), N));
        let d = ms(
            rt.block_on(run(one_shot.clone(), csrs.clone(), in_flight)),
            N,
        );
        worst = worst.max(b - a);
        println!(
            "| {in_flight} | {a:.3} ms | {b:.3} ms | {:+.3} ms | {} | {d:.3} ms |",
            b - a,
            c.map(|c| format!("{c:.3} ms"))
                .unwrap_or_else(|| "(no /dev/shm)".into())
        );
    }
    let h = ms(rt.block_on(healthz(&socket_path, N)), N);
    let f = ms(fsync(dir.path(), N), N);
    println!(
        "parts, one at a time: GET /healthz round trip {h:.3} ms; append + fdatasync on the log's disk {f:.3} ms"
    );
    println!(
        "socket cost: {worst:.3} ms per certificate at most ({})",
        if worst < 0.5 {
            "under the 0.5 ms budget"
        } else {
            "OVER the 0.5 ms budget"
        }
    );
}
