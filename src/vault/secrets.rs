//! Reading `vault:` secret references from KV v2. The value is held only in
//! memory (`Zeroizing`, wiped on drop) and never written to disk.
use std::collections::HashMap;

use zeroize::Zeroizing;

use super::client::Vault;
use super::error::VaultError;
use super::reference::VaultRef;

/// Reads one reference; `key` is the configuration key that named it
/// (`local_ca.key_file`), for the error messages.
pub async fn read(vault: &Vault, key: &str, r: &VaultRef) -> Result<Zeroizing<String>, VaultError> {
    let what = format!("read {r} ({key})");
    let (mount, path, version) = (r.mount.as_str(), r.path.as_str(), r.version);
    let got = vault
        .call(&what, |c| async move {
            match version {
                Some(v) => {
                    vaultrs::kv2::read_version::<HashMap<String, serde_json::Value>>(
                        &*c, mount, path, v,
                    )
                    .await
                }
                None => {
                    vaultrs::kv2::read::<HashMap<String, serde_json::Value>>(&*c, mount, path).await
                }
            }
        })
        .await;
    let reference = || format!("{key} = {r}");
    let mut data = match got {
        Ok(d) => d,
        Err(VaultError::Denied { address, .. }) => {
            return Err(VaultError::Reference {
                reference: reference(),
                problem: format!("Vault at {address} denied reading it (policy)"),
                fix: format!(
                    "grant rotator's Vault token \"read\" on {mount}/data/{path} in its policy"
                ),
            });
        }
        Err(VaultError::Server { status: 404, .. })
        | Err(VaultError::Server { status: 200, .. }) => {
            return Err(not_found(vault, key, r).await);
        }
        Err(e) => return Err(e),
    };
    match data.remove(&r.field) {
        Some(serde_json::Value::String(s)) => Ok(Zeroizing::new(s)),
        Some(other) => {
            // Not echoed: a JSON value of the wrong type may still be the secret.
            let kind = match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                _ => "an object",
            };
            Err(VaultError::Reference {
                reference: reference(),
                problem: format!("field {:?} is {kind}, not a string", r.field),
                fix: format!(
                    "store the PEM/base64 text as a string: bao kv put {mount}/{path} {}=@FILE",
                    r.field
                ),
            })
        }
        None => {
            let mut fields: Vec<&String> = data.keys().collect();
            fields.sort();
            Err(VaultError::Reference {
                reference: reference(),
                problem: format!(
                    "the secret has no field {:?} (its fields: {})",
                    r.field,
                    if fields.is_empty() {
                        "none".to_string()
                    } else {
                        fields
                            .iter()
                            .map(|f| format!("{f:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
                fix: format!(
                    "name one of its fields after #, or add it: bao kv patch {mount}/{path} {}=@FILE",
                    r.field
                ),
            })
        }
    }
}

/// A 404: no secret at all, or no such version of one.
async fn not_found(vault: &Vault, key: &str, r: &VaultRef) -> VaultError {
    let reference = format!("{key} = {r}");
    let (mount, path) = (r.mount.as_str(), r.path.as_str());
    let meta = vault
        .call(
            &format!("read metadata of {mount}/{path}"),
            |c| async move { vaultrs::kv2::read_metadata(&*c, mount, path).await },
        )
        .await;
    match (r.version, meta) {
        (Some(v), Ok(m)) => VaultError::Reference {
            reference,
            problem: match m.versions.get(&v.to_string()) {
                Some(ver) if !ver.deletion_time.is_empty() => {
                    format!(
                        "version {v} was deleted (current version {})",
                        m.current_version
                    )
                }
                Some(_) => format!(
                    "version {v} has no data (current version {})",
                    m.current_version
                ),
                None => format!(
                    "version {v} does not exist (current version {})",
                    m.current_version
                ),
            },
            fix: format!(
                "use ?version={} or drop ?version to read the current one (bao kv metadata get {mount}/{path} lists them)",
                m.current_version
            ),
        },
        (None, Ok(m)) => VaultError::Reference {
            reference,
            problem: format!(
                "its current version ({}) is deleted or destroyed",
                m.current_version
            ),
            fix: format!(
                "write it again (bao kv put {mount}/{path} ...) or name an older ?version="
            ),
        },
        _ => VaultError::Reference {
            reference,
            problem: format!("no secret at {mount}/{path} (KV v2 mount {mount:?})"),
            fix: format!(
                "store it (bao kv put {mount}/{path} {}=@FILE), or correct the mount and path",
                r.field
            ),
        },
    }
}

/// The local CA's key and certificate PEM when either is a `vault:` reference
/// (the other may be a file); `None` when both are files.
pub async fn local_ca_pems(
    settings: &crate::config::LocalCaSettings,
    vault: Option<&Vault>,
) -> Result<Option<(Zeroizing<String>, String)>, VaultError> {
    let key_ref = VaultRef::from_path(&settings.key_file);
    let cert_ref = VaultRef::from_path(&settings.cert_file);
    if key_ref.is_none() && cert_ref.is_none() {
        return Ok(None);
    }
    let vault = vault.ok_or_else(|| VaultError::Reference {
        reference: "local_ca".into(),
        problem: "a vault: reference, but vault.address is not set".into(),
        fix: "configure [vault]".into(),
    })?;
    let key = match key_ref {
        Some(r) => {
            read(
                vault,
                "local_ca.key_file",
                &bad_ref("local_ca.key_file", r)?,
            )
            .await?
        }
        None => crate::pki::read_private(&settings.key_file, "CA key file").map_err(|e| {
            VaultError::Reference {
                reference: format!("local_ca.key_file = {}", settings.key_file.display()),
                problem: match e {
                    crate::pki::ReadPrivate::Mode(e) => e.to_string(),
                    crate::pki::ReadPrivate::Io(e) => e.to_string(),
                },
                fix: "check the path and its mode (0600)".into(),
            }
        })?,
    };
    let cert = match cert_ref {
        Some(r) => read(
            vault,
            "local_ca.cert_file",
            &bad_ref("local_ca.cert_file", r)?,
        )
        .await?
        .to_string(),
        None => {
            std::fs::read_to_string(&settings.cert_file).map_err(|e| VaultError::Reference {
                reference: format!("local_ca.cert_file = {}", settings.cert_file.display()),
                problem: e.to_string(),
                fix: "check the path and that rotator may read it".into(),
            })?
        }
    };
    Ok(Some((key, cert)))
}

/// The sealing key's base64 text when `sealing.key_file` is a `vault:` reference.
pub async fn sealing_key_text(
    settings: &crate::config::SealingSettings,
    vault: Option<&Vault>,
) -> Result<Option<Zeroizing<String>>, VaultError> {
    let Some(r) = VaultRef::from_path(&settings.key_file) else {
        return Ok(None);
    };
    let r = bad_ref("sealing.key_file", r)?;
    let vault = vault.ok_or_else(|| VaultError::Reference {
        reference: format!("sealing.key_file = {r}"),
        problem: "a vault: reference, but vault.address is not set".into(),
        fix: "configure [vault]".into(),
    })?;
    read(vault, "sealing.key_file", &r).await.map(Some)
}

/// Config validation already parsed every reference; this keeps the error typed.
fn bad_ref(key: &str, r: Result<VaultRef, String>) -> Result<VaultRef, VaultError> {
    r.map_err(|problem| VaultError::Reference {
        reference: key.into(),
        problem,
        fix: super::reference::SHAPE.into(),
    })
}
