//! What the benchmarks that compare rotator with the hand-run flow share: their
//! knobs and percentiles, and that flow itself as a cluster admin scripts it
//! today for one user's certificate: `openssl req` for a P-256 key and CSR, then
//! `kubectl create -f csr.yaml`, `kubectl certificate approve`, `kubectl wait` and
//! `kubectl get csr -o jsonpath`.
#![allow(dead_code)]

/// Runs a benchmark's body on a multi-threaded runtime, only under `cargo
/// bench` (which passes --bench); `cargo test --benches` runs nothing.
pub fn run_bench<F: std::future::Future<Output = ()>>(body: impl FnOnce() -> F) {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(body());
}

/// A numeric knob from the environment.
pub fn env(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// The `p` quantile of sorted values (0 when empty).
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The 1-minute load average (the machine is shared: every table says it).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

pub mod hand_flow {
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// Runs kubectl with `admin`; panics with its stderr on failure.
    pub fn kubectl(admin: &Path, args: &[&str]) -> Vec<u8> {
        let o = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(admin)
            .args(args)
            .output()
            .expect("kubectl");
        assert!(
            o.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    }

    /// `users` certificates one after another, named h0, h1, ...; the wall time.
    pub fn run(dir: &Path, admin: &Path, users: usize) -> Duration {
        let started = Instant::now();
        for i in 0..users {
            let key = dir.join(format!("h{i}.key"));
            let csr = dir.join(format!("h{i}.csr"));
            let o = std::process::Command::new("openssl")
                .args([
                    "req",
                    "-new",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    &format!("/O=dev/CN=h{i}"),
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&csr)
                .output()
                .unwrap();
            assert!(o.status.success());
            use base64::Engine;
            let req =
                base64::engine::general_purpose::STANDARD.encode(std::fs::read(&csr).unwrap());
            let yaml = dir.join(format!("h{i}.yaml"));
            std::fs::write(&yaml, format!("apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\nmetadata:\n  name: h{i}\nspec:\n  request: {req}\n  signerName: kubernetes.io/kube-apiserver-client\n  expirationSeconds: 3600\n  usages: [client auth]\n")).unwrap();
            kubectl(admin, &["create", "-f", yaml.to_str().unwrap()]);
            kubectl(admin, &["certificate", "approve", &format!("h{i}")]);
            kubectl(
                admin,
                &[
                    "wait",
                    "--for=jsonpath={.status.certificate}",
                    &format!("csr/h{i}"),
                    "--timeout=60s",
                ],
            );
            let cert = kubectl(
                admin,
                &[
                    "get",
                    "csr",
                    &format!("h{i}"),
                    "-o",
                    "jsonpath={.status.certificate}",
                ],
            );
            assert!(!cert.is_empty());
        }
        started.elapsed()
    }
}
