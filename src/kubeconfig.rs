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

#[cfg(test)]
mod tests {
    use super::*;

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
