//! What rotator's own token may do on a path, as Vault's policy says
//! (`sys/capabilities-self`, which the `default` policy grants every token).
//! Asked before an action that would leave something half-made if Vault
//! refused it at the end (a kubeconfig delivery), and by `doctor` to say
//! which token can sign.
use std::collections::HashMap;

use serde::Serialize;

use super::{Vault, VaultError};

#[derive(Debug, Serialize)]
struct CapabilitiesSelf {
    paths: Vec<String>,
}

impl rustify::Endpoint for CapabilitiesSelf {
    type Response = serde_json::Value;
    const REQUEST_BODY_TYPE: rustify::enums::RequestType = rustify::enums::RequestType::JSON;
    const RESPONSE_BODY_TYPE: rustify::enums::ResponseType = rustify::enums::ResponseType::JSON;

    fn path(&self) -> String {
        "sys/capabilities-self".into()
    }

    fn method(&self) -> rustify::enums::RequestMethod {
        rustify::enums::RequestMethod::POST
    }

    fn body(&self) -> Result<Option<Vec<u8>>, rustify::errors::ClientError> {
        serde_json::to_vec(self)
            .map(Some)
            .map_err(|e| rustify::errors::ClientError::DataParseError { source: e.into() })
    }
}

/// The capabilities of this process's token on each path (`deny` when none).
pub async fn of_self(
    vault: &Vault,
    paths: &[String],
) -> Result<HashMap<String, Vec<String>>, VaultError> {
    let what = format!("sys/capabilities-self for {}", paths.join(", "));
    let answer = vault
        .call(&what, |c| {
            let endpoint = CapabilitiesSelf {
                paths: paths.to_vec(),
            };
            async move { vaultrs::api::exec_with_no_result(&*c, endpoint).await }
        })
        .await?;
    // Vault answers each path at the top level and again under `data`.
    let body = answer.get("data").unwrap_or(&answer);
    Ok(paths
        .iter()
        .map(|p| {
            let caps = body
                .get(p)
                .or_else(|| answer.get(p))
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_else(|| vec!["deny".to_string()]);
            (p.clone(), caps)
        })
        .collect())
}

/// Whether `caps` lets a token write (create or update) on its path.
pub fn can_write(caps: &[String]) -> bool {
    caps.iter()
        .any(|c| matches!(c.as_str(), "create" | "update" | "root"))
}

/// Whether `caps` lets a token read its path.
pub fn can_read(caps: &[String]) -> bool {
    caps.iter().any(|c| matches!(c.as_str(), "read" | "root"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn deny_and_read_only_cannot_write_root_and_update_can() {
        assert!(!can_write(&v(&["deny"])));
        assert!(!can_write(&v(&["read", "list"])));
        assert!(can_write(&v(&["update"])));
        assert!(can_write(&v(&["root"])));
        assert!(can_read(&v(&["read"])));
        assert!(!can_read(&v(&["create", "update"])));
    }
}
