//! KV v2 as a delivery target (`--deliver vault:<mount>/<path>`): each kubeconfig
//! goes to the field `kubeconfig`, its credential's serial, notAfter and
//! generation to the fields `serial`, `not_after` and `generation` of the same
//! version and to the secret's custom metadata. Writes are check-and-set: rotator
//! writes on the version it read, so a writer that came in between wins and is
//! never overwritten; a secret that already holds a newer generation is left alone.
use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;

use super::capabilities;
use super::client::Vault;
use super::error::VaultError;
use crate::delivery::{Sink, SinkError};

/// What the delivered kubeconfig's credential is, for the custom metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub serial: String,
    pub not_after: i64,
    pub generation: i64,
}

/// Reads serial, notAfter and generation from the kubeconfig's client certificate.
pub fn describe_kubeconfig(user: &str, kubeconfig: &str) -> Result<Delivered, String> {
    let kc = kube::config::Kubeconfig::from_yaml(kubeconfig).map_err(|e| e.to_string())?;
    let cert_b64 = kc
        .auth_infos
        .first()
        .and_then(|a| a.auth_info.as_ref())
        .and_then(|a| a.client_certificate_data.clone())
        .ok_or("the kubeconfig has no client certificate")?;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(cert_b64.trim())
        .map_err(|e| e.to_string())?;
    let info = crate::pki::parse_cert_pem(&String::from_utf8_lossy(&pem), "kubeconfig")
        .map_err(|e| e.to_string())?;
    let generation = info
        .organizations
        .iter()
        .find_map(|o| crate::policy::parse_generation_group(user, o))
        .unwrap_or(0);
    Ok(Delivered {
        serial: info.serial,
        not_after: info.not_after,
        generation,
    })
}

/// Writes the kubeconfig to `mount/path` with check-and-set.
pub async fn write_kubeconfig(
    vault: &Vault,
    mount: &str,
    path: &str,
    kubeconfig: &str,
    d: &Delivered,
) -> Result<u64, VaultError> {
    let meta = vault
        .call(
            &format!("read metadata of {mount}/{path}"),
            |c| async move { vaultrs::kv2::read_metadata(&*c, mount, path).await },
        )
        .await;
    let (current, existing_generation) = match meta {
        Ok(m) => (
            m.current_version,
            m.custom_metadata
                .as_ref()
                .and_then(|cm| cm.get("generation"))
                .and_then(|g| g.parse::<i64>().ok()),
        ),
        Err(VaultError::Server { status: 404, .. }) => (0, None),
        Err(e) => return Err(e),
    };
    if let Some(g) = existing_generation
        && g > d.generation
    {
        return Err(VaultError::CasConflict {
            address: vault.address().to_string(),
            path: format!(
                "{mount}/{path} (it holds generation {g}, newer than {})",
                d.generation
            ),
            expected: current,
        });
    }
    // The credential's serial, notAfter and generation go into the version itself,
    // beside the kubeconfig, so a reader of any version sees the values that match
    // it (the custom metadata below is a second write, not atomic with this one).
    let data = HashMap::from([
        (
            "kubeconfig",
            zeroize::Zeroizing::new(kubeconfig.to_string()),
        ),
        ("serial", zeroize::Zeroizing::new(d.serial.clone())),
        (
            "not_after",
            zeroize::Zeroizing::new(d.not_after.to_string()),
        ),
        (
            "generation",
            zeroize::Zeroizing::new(d.generation.to_string()),
        ),
    ]);
    let data = &data;
    let written = vault
        .call(&format!("write {mount}/{path}"), |c| async move {
            vaultrs::kv2::set_with_options(
                &*c,
                mount,
                path,
                data,
                vaultrs::api::kv2::requests::SetSecretRequestOptions {
                    cas: current as u32,
                },
            )
            .await
        })
        .await;
    let version = match written {
        Ok(v) => v.version,
        // Vault's answer to a stale cas: another writer's version is there now.
        Err(VaultError::Server {
            status: 400,
            errors,
            ..
        }) if errors.iter().any(|e| e.contains("check-and-set")) => {
            return Err(VaultError::CasConflict {
                address: vault.address().to_string(),
                path: format!("{mount}/{path}"),
                expected: current,
            });
        }
        Err(e) => return Err(e),
    };
    let custom = HashMap::from([
        ("serial".to_string(), d.serial.clone()),
        ("not_after".to_string(), d.not_after.to_string()),
        ("generation".to_string(), d.generation.to_string()),
        ("written_by".to_string(), "rotator".to_string()),
    ]);
    let custom = &custom;
    vault
        .call(
            &format!("write metadata of {mount}/{path}"),
            |c| async move {
                let mut b = vaultrs::api::kv2::requests::SetSecretMetadataRequest::builder();
                b.custom_metadata(custom.clone());
                vaultrs::kv2::set_metadata(&*c, mount, path, Some(&mut b)).await
            },
        )
        .await?;
    Ok(version)
}

/// `vault:<mount>/<path>`, `{user}` in the path replaced by the user's name.
pub struct VaultSink {
    pub vault: Arc<Vault>,
    pub mount: String,
    pub path: String,
    pub user: String,
}

impl VaultSink {
    pub fn new(vault: Arc<Vault>, mount: &str, path_template: &str, user: &str) -> Self {
        Self {
            vault,
            mount: mount.into(),
            path: path_template.replace("{user}", user),
            user: user.into(),
        }
    }

    fn err(&self, e: impl ToString, fix: &'static str) -> SinkError {
        SinkError {
            target: self.describe(),
            reason: e.to_string(),
            fix,
        }
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl VaultSink {
    /// Refuses, before anything is issued, a path the token's policy does not
    /// let it write (`write_kubeconfig` reads the metadata, writes the data,
    /// then the metadata). When Vault cannot say (down, or
    /// sys/capabilities-self denied by a policy without `default`), the
    /// delivery itself is the check, as before.
    async fn check_policy(&self) -> Result<(), SinkError> {
        let data = format!("{}/data/{}", self.mount, self.path);
        let meta = format!("{}/metadata/{}", self.mount, self.path);
        let caps = match capabilities::of_self(&self.vault, &[data.clone(), meta.clone()]).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(target = %self.describe(), error = %e, "cannot ask Vault what the token may do here; the delivery will tell");
                return Ok(());
            }
        };
        let (d, m) = (&caps[&data], &caps[&meta]);
        if capabilities::can_write(d) && capabilities::can_write(m) && capabilities::can_read(m) {
            return Ok(());
        }
        Err(self.err(
            format!(
                "rotator's Vault token may not write there: its policy gives {data} {d:?} and {meta} {m:?} (it needs create or update on the first, read and create or update on the second)"
            ),
            "grant rotator's Vault policy [\"create\", \"update\", \"read\"] on MOUNT/data/PATH and MOUNT/metadata/PATH (docs/deploy-vault.md), then run the same command again: nothing was issued",
        ))
    }
}

impl Sink for VaultSink {
    fn describe(&self) -> String {
        format!("vault:{}/{}", self.mount, self.path)
    }
    fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }
    fn preflight(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.check_policy())
    }
    fn deliver<'a>(
        &'a mut self,
        kubeconfig: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SinkError>> + Send + 'a>>
    {
        Box::pin(async move {
            let d = describe_kubeconfig(&self.user, kubeconfig)
                .map_err(|e| self.err(e, "this is a bug: report it"))?;
            match write_kubeconfig(&self.vault, &self.mount, &self.path, kubeconfig, &d).await {
                Ok(version) => {
                    tracing::info!(user = %self.user, target = %self.describe(), version, generation = d.generation, "kubeconfig written to Vault");
                    Ok(())
                }
                Err(e) => {
                    // The typed error already has its own fix; keep only its first line.
                    let text = e.to_string();
                    let (reason, _) = text.split_once("\nfix: ").unwrap_or((&text, ""));
                    Err(self.err(
                        reason,
                        match e {
                            VaultError::Unreachable { .. } | VaultError::Sealed { .. } => {
                                "nothing to do once Vault is back: the credential is kept sealed and delivered on the next pass"
                            }
                            VaultError::Denied { .. } => {
                                "grant rotator's Vault policy create/update on MOUNT/data/PATH and MOUNT/metadata/PATH"
                            }
                            VaultError::CasConflict { .. } => {
                                "another writer put a newer version there; give each user a path of their own"
                            }
                            _ => "check the [vault] settings and the delivery path",
                        },
                    ))
                }
            }
        })
    }
}
