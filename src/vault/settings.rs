//! `[vault]`: where the Vault (or OpenBao) server is and how rotator logs in.
//! Parsed by `config.rs` with the rest of the file and validated here, so the
//! section's rules live beside the client that uses them.
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;

/// Where a pod's service-account token is mounted (the Kubernetes auth method's JWT).
pub const POD_SA_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// The `[vault]` section as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaultSection {
    address: Option<String>,
    ca_file: Option<PathBuf>,
    namespace: Option<String>,
    auth_method: String,
    token_file: Option<PathBuf>,
    approle_mount: String,
    role_id: Option<String>,
    secret_id_file: Option<PathBuf>,
    kubernetes_mount: String,
    kubernetes_role: Option<String>,
    jwt_file: PathBuf,
    timeout: String,
}

impl Default for VaultSection {
    fn default() -> Self {
        Self {
            address: None,
            ca_file: None,
            namespace: None,
            auth_method: "token".into(),
            token_file: None,
            approle_mount: "approle".into(),
            role_id: None,
            secret_id_file: None,
            kubernetes_mount: "kubernetes".into(),
            kubernetes_role: None,
            jwt_file: PathBuf::from(POD_SA_TOKEN),
            timeout: "10s".into(),
        }
    }
}

/// How rotator logs in to Vault. Secrets are never held here: only where to read them.
#[derive(Debug, Clone)]
pub enum VaultAuth {
    /// `token_file` (re-read at every login, so an agent may rotate it), else the
    /// `VAULT_TOKEN` the process started with.
    Token {
        token_file: Option<PathBuf>,
        /// `VAULT_TOKEN`; `SecretString` keeps it out of `Debug`.
        env_token: Option<SecretString>,
    },
    AppRole {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
}

impl VaultAuth {
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Token { .. } => "token",
            VaultAuth::AppRole { .. } => "approle",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// The validated `[vault]` section; present only when `vault.address` is set.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    pub address: String,
    /// CA bundle that verifies Vault's TLS certificate; `None`: the system roots.
    pub ca_file: Option<PathBuf>,
    /// Sent as `X-Vault-Namespace` (Vault Enterprise / OpenBao namespaces).
    pub namespace: Option<String>,
    pub auth: VaultAuth,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// A rejected value: key, value, problem, fix (`config.rs` adds the origin).
pub type Invalid = (&'static str, String, String, String);

fn invalid(key: &'static str, value: impl ToString, problem: &str, fix: &str) -> Invalid {
    (key, value.to_string(), problem.into(), fix.into())
}

impl VaultSection {
    /// `env` is the process environment as `config::load_with` saw it (for `VAULT_TOKEN`).
    pub fn validate(self, env: &[(String, String)]) -> Result<Option<VaultSettings>, Invalid> {
        let Some(address) = self.address.filter(|a| !a.trim().is_empty()) else {
            return Ok(None);
        };
        let address = address.trim_end_matches('/').to_string();
        let scheme_ok = address
            .split_once("://")
            .is_some_and(|(s, rest)| matches!(s, "http" | "https") && !rest.is_empty());
        if !scheme_ok || url_host(&address).is_none() {
            return Err(invalid(
                "vault.address",
                &address,
                "not an http(s) URL",
                "write the server's URL, e.g. \"https://vault.example:8200\"",
            ));
        }
        let timeout = humantime::parse_duration(&self.timeout).map_err(|e| {
            invalid(
                "vault.timeout",
                &self.timeout,
                &e.to_string(),
                "write a duration such as \"10s\"",
            )
        })?;
        if timeout.is_zero() {
            return Err(invalid(
                "vault.timeout",
                &self.timeout,
                "a request that may never take any time",
                "use a positive duration; \"10s\" is the default",
            ));
        }
        let auth = match self.auth_method.as_str() {
            "token" => VaultAuth::Token {
                token_file: self.token_file,
                env_token: env
                    .iter()
                    .find(|(k, v)| k == "VAULT_TOKEN" && !v.is_empty())
                    .map(|(_, v)| SecretString::from(v.clone())),
            },
            "approle" => VaultAuth::AppRole {
                mount: mount("vault.approle_mount", self.approle_mount)?,
                role_id: self.role_id.filter(|r| !r.is_empty()).ok_or_else(|| {
                    invalid(
                        "vault.role_id",
                        "",
                        "auth_method = \"approle\" needs the role id",
                        "set vault.role_id (bao read auth/approle/role/NAME/role-id)",
                    )
                })?,
                secret_id_file: self.secret_id_file.ok_or_else(|| {
                    invalid(
                        "vault.secret_id_file",
                        "",
                        "auth_method = \"approle\" needs a file holding the secret id",
                        "set vault.secret_id_file to a 0600 file (bao write -f auth/approle/role/NAME/secret-id)",
                    )
                })?,
            },
            "kubernetes" => VaultAuth::Kubernetes {
                mount: mount("vault.kubernetes_mount", self.kubernetes_mount)?,
                role: self.kubernetes_role.filter(|r| !r.is_empty()).ok_or_else(|| {
                    invalid(
                        "vault.kubernetes_role",
                        "",
                        "auth_method = \"kubernetes\" needs the Vault role to log in as",
                        "set vault.kubernetes_role (bao write auth/kubernetes/role/NAME ...)",
                    )
                })?,
                jwt_file: self.jwt_file,
            },
            other => {
                return Err(invalid(
                    "vault.auth_method",
                    other,
                    "unknown auth method",
                    "use \"token\", \"approle\" or \"kubernetes\"",
                ));
            }
        };
        Ok(Some(VaultSettings {
            address,
            ca_file: self.ca_file,
            namespace: self.namespace.filter(|n| !n.is_empty()),
            auth,
            timeout,
        }))
    }
}

fn mount(key: &'static str, m: String) -> Result<String, Invalid> {
    let t = m.trim_matches('/').to_string();
    if t.is_empty() {
        return Err(invalid(
            key,
            m,
            "an empty mount path",
            "name the auth mount, e.g. \"approle\"",
        ));
    }
    Ok(t)
}

fn url_host(address: &str) -> Option<&str> {
    let rest = address.split_once("://")?.1;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml: &str) -> VaultSection {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn no_address_means_no_vault() {
        assert!(section("").validate(&[]).unwrap().is_none());
    }

    #[test]
    fn token_from_the_environment_is_kept_out_of_debug() {
        let env = vec![("VAULT_TOKEN".to_string(), "s.supersecret".to_string())];
        let s = section("address = \"http://127.0.0.1:8200\"")
            .validate(&env)
            .unwrap()
            .unwrap();
        assert!(matches!(
            s.auth,
            VaultAuth::Token {
                env_token: Some(_),
                ..
            }
        ));
        assert!(!format!("{s:?}").contains("supersecret"));
    }

    #[test]
    fn each_method_names_what_it_misses() {
        let e = section("address = \"http://v:8200\"\nauth_method = \"approle\"")
            .validate(&[])
            .unwrap_err();
        assert_eq!(e.0, "vault.role_id");
        let e = section("address = \"http://v:8200\"\nauth_method = \"approle\"\nrole_id = \"r\"")
            .validate(&[])
            .unwrap_err();
        assert_eq!(e.0, "vault.secret_id_file");
        let e = section("address = \"http://v:8200\"\nauth_method = \"kubernetes\"")
            .validate(&[])
            .unwrap_err();
        assert_eq!(e.0, "vault.kubernetes_role");
        let s = section(
            "address = \"http://v:8200\"\nauth_method = \"kubernetes\"\nkubernetes_role = \"rotator\"",
        )
        .validate(&[])
        .unwrap()
        .unwrap();
        match s.auth {
            VaultAuth::Kubernetes {
                mount, jwt_file, ..
            } => {
                assert_eq!(mount, "kubernetes");
                assert_eq!(jwt_file, PathBuf::from(POD_SA_TOKEN));
            }
            other => panic!("{other:?}"),
        }
        let e = section("address = \"http://v:8200\"\nauth_method = \"ldap\"")
            .validate(&[])
            .unwrap_err();
        assert_eq!(e.0, "vault.auth_method");
        let e = section("address = \"vault:8200\"")
            .validate(&[])
            .unwrap_err();
        assert_eq!(e.0, "vault.address");
    }
}
