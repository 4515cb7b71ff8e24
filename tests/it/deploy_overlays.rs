//! deploy/overlays as a cluster would get them: each overlay rendered with the
//! real `kubectl kustomize` (offline), then the pod checked for what the README
//! promises, and each container's rotator configuration (its ConfigMap's file
//! plus its ROTATOR_* variables, exactly as in the pod) loaded by rotator's own
//! config loader, so a key name or a path that does not match is caught here
//! rather than by a crash-looping pod.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rotator::config::{self, Overrides, Settings, SignerKind};
use serde_json::Value;

const OVERLAYS: &[&str] = &[
    "authz-webhook",
    "ha-postgres",
    "kubernetes-signer",
    "local-ca",
    "vault",
];

/// Overlays whose configuration uses keys of features built on other branches
/// (PostgreSQL and leader election #11, Vault #13, the webhook #14). Their pods
/// are checked like every other; their configuration is loaded only once those
/// keys exist in this build. Empty this list when they are merged.
const CONFIG_AWAITS_MERGE: &[&str] = &[];

fn render(overlay: &str) -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/overlays")
        .join(overlay);
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).expect("the render parses")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn deployment(docs: &[Value]) -> &Value {
    find(docs, "Deployment", "rotator").expect("the rotator Deployment")
}

fn containers(pod: &Value) -> Vec<&Value> {
    pod["containers"].as_array().unwrap().iter().collect()
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    containers(pod)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// (volume name, mount path) of a container.
fn mounts(c: &Value) -> Vec<(String, String)> {
    c["volumeMounts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap().to_string(),
                        m["mountPath"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Whether `path` lies inside one of the container's mounts.
fn mounted(c: &Value, path: &Path) -> bool {
    mounts(c)
        .iter()
        .any(|(_, m)| path.starts_with(Path::new(m)))
}

/// The container's environment; a value from a Secret stands in as a
/// placeholder of the shape the key takes.
fn env(c: &Value) -> Vec<(String, String)> {
    c["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let name = e["name"].as_str().unwrap().to_string();
                    let value = match e["value"].as_str() {
                        Some(v) => v.to_string(),
                        None => {
                            assert!(
                                e["valueFrom"]["secretKeyRef"].is_object(),
                                "{name}: neither a value nor a Secret"
                            );
                            "postgres://rotator@db.example.internal:5432/rotator".to_string()
                        }
                    };
                    (name, value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A container's rotator configuration file (the ConfigMap's text mounted
/// where its ROTATOR_CONFIG points) and the name of its key there.
fn config_file(docs: &[Value], pod: &Value, c: &Value) -> (String, String) {
    let vars = env(c);
    let config_path = PathBuf::from(
        &vars
            .iter()
            .find(|(k, _)| k == "ROTATOR_CONFIG")
            .expect("ROTATOR_CONFIG")
            .1,
    );
    let (vol, mount) = mounts(c)
        .into_iter()
        .find(|(_, m)| config_path.starts_with(m))
        .expect("ROTATOR_CONFIG is in a mount");
    let cm_name = volume(pod, &vol)["configMap"]["name"]
        .as_str()
        .expect("the config is a ConfigMap");
    let key = config_path
        .strip_prefix(&mount)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let text = find(docs, "ConfigMap", cm_name).expect("the config's ConfigMap")["data"][&key]
        .as_str()
        .expect("the config file in the ConfigMap")
        .to_string();
    (key, text)
}

/// What `overlay` gives its `container`, as the pod would see it: the
/// configuration file's text and the other ROTATOR_* variables (a value
/// from a Secret as a placeholder, see [`env`]).
pub fn shipped(overlay: &str, container_name: &str) -> (String, Vec<(String, String)>) {
    let docs = render(overlay);
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    let c = container(pod, container_name);
    let (_, text) = config_file(&docs, pod, c);
    let vars = env(c)
        .into_iter()
        .filter(|(k, _)| k != "ROTATOR_CONFIG")
        .collect();
    (text, vars)
}

/// Loads a container's rotator configuration: the file its ROTATOR_CONFIG
/// names, taken from the ConfigMap mounted there, plus its other variables.
fn load(docs: &[Value], pod: &Value, c: &Value, tmp: &Path) -> Settings {
    let (key, text) = config_file(docs, pod, c);
    let file = tmp.join(format!("{}-{key}", c["name"].as_str().unwrap()));
    std::fs::write(&file, text).unwrap();
    let vars: Vec<(String, String)> = env(c)
        .into_iter()
        .filter(|(k, _)| k != "ROTATOR_CONFIG")
        .collect();
    config::load_with(Some(&file), &vars, &Overrides::default())
        .unwrap_or_else(|e| panic!("container {}: {e}", c["name"]))
}

fn uid(pod: &Value, c: &Value) -> u64 {
    c["securityContext"]["runAsUser"]
        .as_u64()
        .or_else(|| pod["securityContext"]["runAsUser"].as_u64())
        .expect("a runAsUser")
}

#[test]
fn every_overlay_runs_a_hardened_pod() {
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let pod = &deployment(&docs)["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false, "{overlay}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}");
        let mut uids = BTreeMap::new();
        for c in containers(pod) {
            let name = c["name"].as_str().unwrap();
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}/{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{overlay}/{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{overlay}/{name}"
            );
            assert_eq!(
                sc["seccompProfile"]["type"], "RuntimeDefault",
                "{overlay}/{name}"
            );
            let u = uid(pod, c);
            assert!(u >= 10000, "{overlay}/{name}: uid {u}");
            assert!(
                uids.insert(u, name).is_none(),
                "{overlay}: two containers run as {u}"
            );
            for what in ["requests", "limits"] {
                for r in ["cpu", "memory"] {
                    assert!(
                        c["resources"][what][r].is_string(),
                        "{overlay}/{name}: no {what}.{r}"
                    );
                }
            }
            let image = c["image"].as_str().unwrap();
            assert!(
                image.contains("@sha256:"),
                "{overlay}/{name}: {image} is not pinned by digest"
            );
            // Every file a variable names is in one of the container's mounts.
            for (k, v) in env(c) {
                if v.starts_with('/') {
                    assert!(
                        mounted(c, Path::new(&v)),
                        "{overlay}/{name}: {k}={v} is in no mount"
                    );
                }
            }
        }
        // The daemon has both probes, on the metrics port.
        let daemon = container(pod, "rotator");
        assert_eq!(
            daemon["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{overlay}"
        );
        assert_eq!(
            daemon["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{overlay}"
        );
        // The service-account token: into the rotator container alone, and only
        // where rotator talks to the cluster.
        let talks_to_cluster = *overlay != "local-ca";
        for c in containers(pod) {
            let has_token = mounts(c)
                .iter()
                .any(|(_, m)| m == "/var/run/secrets/kubernetes.io/serviceaccount");
            assert_eq!(
                has_token,
                talks_to_cluster && c["name"] == "rotator",
                "{overlay}/{}: token mounted = {has_token}",
                c["name"]
            );
        }
        // Egress is restricted (DNS in the base policy), and reaches the API
        // server only where rotator talks to it.
        let policies: Vec<&Value> = docs
            .iter()
            .filter(|d| d["kind"] == "NetworkPolicy")
            .collect();
        let base = find(&docs, "NetworkPolicy", "rotator").expect("the base NetworkPolicy");
        assert!(
            base["spec"]["policyTypes"]
                .as_array()
                .unwrap()
                .contains(&Value::from("Egress")),
            "{overlay}"
        );
        assert_eq!(
            policies
                .iter()
                .any(|p| p["metadata"]["name"] == "rotator-egress-apiserver"),
            talks_to_cluster,
            "{overlay}"
        );
    }
}

/// The webhook port admits the addresses the API server connects from, named
/// in the overlay's knob (apiserver-sources.yaml), and no one else: not every
/// address, and not through the base policy's ports.
#[test]
fn the_webhook_port_admits_only_the_api_servers_addresses() {
    let docs = render("authz-webhook");
    let authz = find(&docs, "NetworkPolicy", "rotator-authz").expect("rotator-authz");
    let ingress = authz["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 1, "{authz}");
    assert_eq!(ingress[0]["ports"][0]["port"], "authz", "{authz}");
    let from = ingress[0]["from"]
        .as_array()
        .expect("a `from` list: none admits all");
    assert!(!from.is_empty(), "an empty `from` admits every source");
    for f in from {
        let cidr = f["ipBlock"]["cidr"]
            .as_str()
            .unwrap_or_else(|| panic!("{f}"));
        let (ip, len) = cidr.split_once('/').unwrap();
        let len: u8 = len.parse().unwrap();
        let host = if ip.contains(':') { 128 } else { 32 };
        // At most a /16 of control-plane addresses, never "anywhere".
        assert!(
            len >= host / 2,
            "{cidr} admits far more than the API server"
        );
        assert!(f.get("namespaceSelector").is_none() && f.get("podSelector").is_none());
    }
    let base = find(&docs, "NetworkPolicy", "rotator").unwrap();
    for rule in base["spec"]["ingress"].as_array().unwrap() {
        for p in rule["ports"].as_array().unwrap() {
            assert_ne!(p["port"], "authz", "the base policy opens the webhook port");
        }
    }
    let knob = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/overlays/authz-webhook/apiserver-sources.yaml"
    ))
    .unwrap();
    assert!(knob.contains("ipBlock") && knob.contains("deploy-authz-webhook.md"));
}

#[test]
fn local_ca_overlay_keeps_the_key_in_the_signer_sidecar() {
    let docs = render("local-ca");
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    let (daemon, signer) = (container(pod, "rotator"), container(pod, "signer"));
    let names = |c: &Value| -> Vec<String> { mounts(c).into_iter().map(|(n, _)| n).collect() };
    assert_eq!(volume(pod, "ca")["secret"]["secretName"], "rotator-ca");
    assert!(names(signer).contains(&"ca".to_string()));
    assert!(
        !names(daemon).contains(&"ca".to_string()),
        "the daemon mounts the CA"
    );
    let socket = volume(pod, "signer-socket");
    assert_eq!(socket["emptyDir"]["medium"], "Memory");
    assert!(names(daemon).contains(&"signer-socket".to_string()));
    assert!(names(signer).contains(&"signer-socket".to_string()));
    assert_eq!(signer["args"][0], "signer");
    assert!(signer["ports"].is_null(), "the signer listens on no port");
    // No RBAC at all: this rotator never talks to the cluster.
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"].as_str().unwrap().contains("Role")),
        "local-ca grants RBAC"
    );

    let tmp = tempfile::tempdir().unwrap();
    let d = load(&docs, pod, daemon, tmp.path());
    assert_eq!(d.signer, Some(SignerKind::LocalCa));
    let sock = d
        .local_ca
        .socket
        .clone()
        .expect("the daemon signs through the socket");
    assert!(mounted(daemon, &sock));
    assert!(
        !d.local_ca.configured || !mounted(daemon, &d.local_ca.key_file),
        "the daemon's config names a key it can read: {}",
        d.local_ca.key_file.display()
    );
    let s = load(&docs, pod, signer, tmp.path());
    assert_eq!(
        s.signer_service.socket, sock,
        "signer and daemon agree on the socket"
    );
    assert!(
        mounted(signer, &s.local_ca.key_file),
        "{}",
        s.local_ca.key_file.display()
    );
    assert!(mounted(signer, &s.local_ca.cert_file));
    assert!(mounted(signer, &s.signer_service.log_file));
    assert!(
        !mounted(daemon, &s.signer_service.log_file),
        "the daemon can reach the signer's log"
    );
    // Only the daemon may ask (SO_PEERCRED), and the daemon is not the signer.
    assert_eq!(s.signer_service.allowed_uids, vec![uid(pod, daemon) as u32]);
    assert_ne!(uid(pod, daemon), uid(pod, signer));
    // The key's Secret files are root:fsGroup 0440 under kubelet; the signer
    // accepts that shape only when the group is its own (pki::read_private).
    assert_eq!(
        signer["securityContext"]["runAsGroup"], pod["securityContext"]["fsGroup"],
        "the signer's group must be the pod's fsGroup, or it refuses the mounted key"
    );
}

#[test]
fn each_overlay_configures_its_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let mut awaiting = Vec::new();
    for overlay in OVERLAYS {
        if CONFIG_AWAITS_MERGE.contains(overlay) {
            awaiting.push(*overlay);
            continue;
        }
        let docs = render(overlay);
        let pod = &deployment(&docs)["spec"]["template"]["spec"];
        let daemon = container(pod, "rotator");
        let s = load(&docs, pod, daemon, tmp.path());
        // kubelet probes /healthz and /readyz on the pod's IP.
        assert_eq!(s.metrics_addr, "0.0.0.0:9464".parse().unwrap(), "{overlay}");
        let expected = match *overlay {
            "local-ca" => SignerKind::LocalCa,
            "vault" => SignerKind::VaultPki,
            _ => SignerKind::Kubernetes,
        };
        assert_eq!(s.signer, Some(expected), "{overlay}");
        // No overlay's signer issues the user API's certificate: it comes from
        // the Secret rotator-tls, mounted into the daemon.
        let (cert, key) = s.server.tls.clone().expect("server.tls_cert/tls_key");
        assert!(mounted(daemon, &cert) && mounted(daemon, &key), "{overlay}");
        // The data directory is in the data volume, never the read-only root.
        assert!(
            mounted(daemon, &s.data_dir),
            "{overlay}: {}",
            s.data_dir.display()
        );
    }
    if !awaiting.is_empty() {
        eprintln!(
            "NOTE: the configuration of overlays {awaiting:?} was NOT loaded: its keys \
             (database_url, [vault], [authz]) come with other branches; empty \
             CONFIG_AWAITS_MERGE in tests/it/deploy_overlays.rs once they are merged"
        );
    }
}

/// #22 item 1: in the vault overlay the daemon signs through the signer
/// sidecar, and only the sidecar holds the token (audience vault-signer)
/// that logs in to the Vault role allowed to sign.
#[test]
fn vault_overlay_keeps_the_signing_token_in_the_signer_sidecar() {
    let docs = render("vault");
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    let (daemon, signer) = (container(pod, "rotator"), container(pod, "signer"));
    let names = |c: &Value| -> Vec<String> { mounts(c).into_iter().map(|(n, _)| n).collect() };
    let token = volume(pod, "vault-signer-token");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "vault-signer"
    );
    assert!(names(signer).contains(&"vault-signer-token".to_string()));
    assert!(
        !names(daemon).contains(&"vault-signer-token".to_string()),
        "the daemon mounts the signer's Vault token"
    );
    assert!(signer["ports"].is_null(), "the signer listens on no port");

    let tmp = tempfile::tempdir().unwrap();
    let d = load(&docs, pod, daemon, tmp.path());
    let s = load(&docs, pod, signer, tmp.path());
    assert_eq!(d.signer, Some(SignerKind::VaultPki));
    assert!(!d.vault_pki.in_process);
    let sock = d.vault_pki.socket.clone().expect("vault_pki.socket");
    assert_eq!(s.signer, Some(SignerKind::VaultPki));
    assert_eq!(s.signer_service.socket, sock, "signer and daemon agree");
    assert_eq!(
        (d.vault_pki.mount.as_str(), d.vault_pki.role.as_deref()),
        (s.vault_pki.mount.as_str(), s.vault_pki.role.as_deref())
    );
    let login = |v: Option<rotator::vault::VaultSettings>| match v.expect("[vault]").auth {
        rotator::vault::VaultAuth::Kubernetes { role, jwt_file, .. } => (role, jwt_file),
        other => panic!("not the kubernetes auth method: {other:?}"),
    };
    let ((d_role, _), (s_role, s_jwt)) = (login(d.vault.clone()), login(s.vault.clone()));
    assert_eq!(d_role, "rotator", "the daemon's role (policy without pki)");
    assert_eq!(s_role, "rotator-signer");
    assert!(
        mounted(signer, &s_jwt) && !mounted(daemon, &s_jwt),
        "{}",
        s_jwt.display()
    );
    assert!(mounted(signer, &s.signer_service.log_file));
    assert!(!mounted(daemon, &s.signer_service.log_file));
    assert_eq!(s.signer_service.allowed_uids, vec![uid(pod, daemon) as u32]);
    assert_ne!(uid(pod, daemon), uid(pod, signer));
}
