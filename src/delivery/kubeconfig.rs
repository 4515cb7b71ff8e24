//! Rendering kubeconfigs with kube's own `Kubeconfig` type.
use base64::Engine;
use kube::config::{
    AuthInfo, Cluster, Context, Kubeconfig, NamedAuthInfo, NamedCluster, NamedContext,
};
use secrecy::SecretString;
use zeroize::Zeroizing;

/// Everything a client-certificate kubeconfig needs. Holds key material: `Debug` is redacted.
pub struct ClientKubeconfig<'a> {
    pub cluster_name: &'a str,
    pub server: &'a str,
    pub ca_bundle_pem: &'a str,
    pub user: &'a str,
    pub namespace: Option<&'a str>,
    pub certificate_pem: &'a str,
    pub key_pem: &'a str,
}

impl std::fmt::Debug for ClientKubeconfig<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientKubeconfig")
            .field("cluster_name", &self.cluster_name)
            .field("server", &self.server)
            .field("user", &self.user)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

impl ClientKubeconfig<'_> {
    pub fn context_name(&self) -> String {
        format!("{}@{}", self.user, self.cluster_name)
    }

    pub fn to_kubeconfig(&self) -> Kubeconfig {
        let ctx = self.context_name();
        Kubeconfig {
            api_version: Some("v1".into()),
            kind: Some("Config".into()),
            clusters: vec![NamedCluster {
                name: self.cluster_name.into(),
                cluster: Some(Cluster {
                    server: Some(self.server.into()),
                    certificate_authority_data: Some(b64(self.ca_bundle_pem)),
                    ..Default::default()
                }),
                other: Default::default(),
            }],
            auth_infos: vec![NamedAuthInfo {
                name: self.user.into(),
                auth_info: Some(AuthInfo {
                    client_certificate_data: Some(b64(self.certificate_pem)),
                    client_key_data: Some(SecretString::from(b64(self.key_pem))),
                    ..Default::default()
                }),
                other: Default::default(),
            }],
            contexts: vec![NamedContext {
                name: ctx.clone(),
                context: Some(Context {
                    cluster: self.cluster_name.into(),
                    user: Some(self.user.into()),
                    namespace: self.namespace.map(str::to_string),
                    ..Default::default()
                }),
                other: Default::default(),
            }],
            current_context: Some(ctx),
            ..Default::default()
        }
    }

    /// YAML, zeroized on drop since it carries the key.
    pub fn render(&self) -> Result<Zeroizing<String>, serde_saphyr::ser::Error> {
        serde_saphyr::to_string(&self.to_kubeconfig()).map(Zeroizing::new)
    }
}

/// How a merged kubeconfig's user authenticates.
pub enum UserAuth<'a> {
    /// The certificate and key, embedded.
    Embedded {
        certificate_pem: &'a str,
        key_pem: &'a str,
    },
    /// `rotator credential` as an exec plugin: kubectl asks it each time.
    Exec { command: String, args: Vec<String> },
}

/// One cluster, user and context to put into a user's kubeconfig.
pub struct Entry<'a> {
    pub cluster_name: &'a str,
    pub server: &'a str,
    /// Base64 of the CA bundle, as kubeconfigs carry it.
    pub ca_data: &'a str,
    pub user_name: &'a str,
    pub context_name: &'a str,
    pub namespace: Option<&'a str>,
    pub auth: UserAuth<'a>,
}

impl std::fmt::Debug for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("cluster_name", &self.cluster_name)
            .field("server", &self.server)
            .field("context_name", &self.context_name)
            .finish_non_exhaustive()
    }
}

/// Puts `e` into `existing`, replacing entries of the same names and keeping
/// every other cluster, user and context; the new context becomes current.
pub fn merge(existing: Option<Kubeconfig>, e: &Entry<'_>) -> Kubeconfig {
    let mut k = existing.unwrap_or_else(|| Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        ..Default::default()
    });
    let auth_info = match &e.auth {
        UserAuth::Embedded {
            certificate_pem,
            key_pem,
        } => AuthInfo {
            client_certificate_data: Some(b64(certificate_pem)),
            client_key_data: Some(SecretString::from(b64(key_pem))),
            ..Default::default()
        },
        UserAuth::Exec { command, args } => AuthInfo {
            exec: Some(kube::config::ExecConfig {
                api_version: Some("client.authentication.k8s.io/v1".into()),
                command: Some(command.clone()),
                args: Some(args.clone()),
                interactive_mode: Some(kube::config::ExecInteractiveMode::Never),
                install_hint: Some(
                    "rotator fetches and renews this credential; install rotator and run `rotator fetch --exec`".into(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    k.clusters.retain(|c| c.name != e.cluster_name);
    k.clusters.push(NamedCluster {
        name: e.cluster_name.into(),
        cluster: Some(Cluster {
            server: Some(e.server.into()),
            certificate_authority_data: Some(e.ca_data.into()),
            ..Default::default()
        }),
        other: Default::default(),
    });
    k.auth_infos.retain(|a| a.name != e.user_name);
    k.auth_infos.push(NamedAuthInfo {
        name: e.user_name.into(),
        auth_info: Some(auth_info),
        other: Default::default(),
    });
    k.contexts.retain(|c| c.name != e.context_name);
    k.contexts.push(NamedContext {
        name: e.context_name.into(),
        context: Some(Context {
            cluster: e.cluster_name.into(),
            user: Some(e.user_name.into()),
            namespace: e.namespace.map(str::to_string),
            ..Default::default()
        }),
        other: Default::default(),
    });
    k.current_context = Some(e.context_name.into());
    k
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(
        "cannot read the existing kubeconfig {path}: {why}\nfix: repair or move it away; rotator does not overwrite a kubeconfig it cannot read"
    )]
    Read { path: String, why: String },
    #[error(
        "cannot write the kubeconfig {path}: {why}\nfix: choose a --kubeconfig path in a directory you can write to"
    )]
    Write { path: String, why: String },
}

/// Merges `e` into the kubeconfig at `path` atomically (mode 0600). The old
/// file is kept as `<path>.rotator-backup` (0600) first. Returns the backup's path.
pub fn merge_file(
    path: &std::path::Path,
    e: &Entry<'_>,
) -> Result<Option<std::path::PathBuf>, MergeError> {
    let shown = path.display().to_string();
    // A FIFO or device at the path is refused before it is opened.
    let existing = match crate::support::fsutil::read_regular_string(path) {
        Ok(None) => None,
        Ok(Some(text)) if text.trim().is_empty() => None,
        Ok(Some(text)) => Some((
            Kubeconfig::from_yaml(&text).map_err(|err| MergeError::Read {
                path: shown.clone(),
                why: err.to_string(),
            })?,
            text,
        )),
        Err(err) => {
            return Err(MergeError::Read {
                path: shown,
                why: err.to_string(),
            });
        }
    };
    let write = |p: &std::path::Path, bytes: &[u8]| {
        crate::support::fsutil::write_private_atomic(p, bytes).map_err(|err| MergeError::Write {
            path: p.display().to_string(),
            why: err.to_string(),
        })
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::support::fsutil::ensure_private_dir(dir).map_err(|err| MergeError::Write {
            path: dir.display().to_string(),
            why: err.to_string(),
        })?;
    }
    let (old, backup) = match existing {
        Some((k, text)) => {
            let mut b = path.as_os_str().to_owned();
            b.push(".rotator-backup");
            let b = std::path::PathBuf::from(b);
            write(&b, text.as_bytes())?;
            (Some(k), Some(b))
        }
        None => (None, None),
    };
    let merged = merge(old, e);
    let yaml = serde_saphyr::to_string(&merged)
        .map(Zeroizing::new)
        .map_err(|err| MergeError::Write {
            path: shown.clone(),
            why: err.to_string(),
        })?;
    write(path, yaml.as_bytes())?;
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_other_entries_and_replaces_its_own() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config");
        let other = ClientKubeconfig {
            cluster_name: "other",
            server: "https://10.9.9.9:6443",
            ca_bundle_pem: "OTHERCA",
            user: "bob",
            namespace: None,
            certificate_pem: "BOBCERT",
            key_pem: "BOBKEY",
        };
        std::fs::write(&p, other.render().unwrap().as_bytes()).unwrap();
        let entry = |cert: &'static str| Entry {
            cluster_name: "prod",
            server: "https://10.0.0.1:6443",
            ca_data: "Q0E=",
            user_name: "alice@prod",
            context_name: "alice@prod",
            namespace: Some("team-a"),
            auth: UserAuth::Embedded {
                certificate_pem: cert,
                key_pem: "KEY",
            },
        };
        let backup = merge_file(&p, &entry("CERT1")).unwrap().unwrap();
        merge_file(&p, &entry("CERT2")).unwrap();
        let k = Kubeconfig::read_from(&p).unwrap();
        let names: Vec<_> = k.contexts.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["bob@other", "alice@prod"]);
        assert_eq!(k.current_context.as_deref(), Some("alice@prod"));
        let alice: Vec<_> = k
            .auth_infos
            .iter()
            .filter(|a| a.name == "alice@prod")
            .collect();
        assert_eq!(alice.len(), 1, "replaced, not duplicated");
        assert_eq!(
            alice[0]
                .auth_info
                .as_ref()
                .unwrap()
                .client_certificate_data
                .as_deref(),
            Some(b64("CERT2").as_str())
        );
        use std::os::unix::fs::PermissionsExt;
        for f in [&p, &backup] {
            assert_eq!(
                std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        // A kubeconfig rotator cannot read is left alone.
        std::fs::write(&p, "clusters: [ {").unwrap();
        assert!(matches!(
            merge_file(&p, &entry("X")),
            Err(MergeError::Read { .. })
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "clusters: [ {");
    }

    #[test]
    fn renders_and_parses_back_with_kube() {
        let k = ClientKubeconfig {
            cluster_name: "prod",
            server: "https://10.0.0.1:6443",
            ca_bundle_pem: "CA",
            user: "alice",
            namespace: Some("team-a"),
            certificate_pem: "CERT",
            key_pem: "KEY",
        };
        let yaml = k.render().unwrap();
        let back = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(back.current_context.as_deref(), Some("alice@prod"));
        let auth = back.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(
            auth.client_certificate_data.as_deref(),
            Some(b64("CERT").as_str())
        );
        use secrecy::ExposeSecret;
        assert_eq!(
            auth.client_key_data.as_ref().unwrap().expose_secret(),
            b64("KEY")
        );
        assert_eq!(
            back.contexts[0]
                .context
                .as_ref()
                .unwrap()
                .namespace
                .as_deref(),
            Some("team-a")
        );
        assert!(
            !format!("{k:?}").contains("KEY\""),
            "Debug must not print the key"
        );
    }
}
