//! `doctor`'s answer to "which Vault token can sign?" for the vault-pki
//! signer. A token with `update` on a PKI signing endpoint can get any
//! subject signed (sign-verbatim copies `O=system:masters` as it is), so it
//! must be the signer process's, never the daemon's (#22).
use crate::config::Settings;
use crate::vault::{Vault, capabilities};

/// The endpoints of a PKI mount that hand out a certificate or a CA.
pub fn signing_paths(mount: &str, role: &str) -> Vec<String> {
    [
        format!("{mount}/sign-verbatim/{role}"),
        format!("{mount}/sign-verbatim"),
        format!("{mount}/sign/{role}"),
        format!("{mount}/issue/{role}"),
        format!("{mount}/root/sign-intermediate"),
        format!("{mount}/root/sign-self-issued"),
        // The same, through the default issuer (Vault 1.11+, OpenBao).
        format!("{mount}/issuer/default/sign-verbatim/{role}"),
        format!("{mount}/issuer/default/sign-verbatim"),
        format!("{mount}/issuer/default/sign/{role}"),
        format!("{mount}/issuer/default/issue/{role}"),
        format!("{mount}/issuer/default/sign-intermediate"),
        format!("{mount}/issuer/default/sign-self-issued"),
    ]
    .into()
}

/// `(ok, detail)`: which token signs, and whether this process's may.
pub async fn signing_token(s: &Settings, vault: Option<&Vault>) -> (bool, String) {
    let vp = &s.vault_pki;
    let role = vp.role.as_deref().unwrap_or("ROLE");
    let who = match &vp.socket {
        Some(socket) => format!(
            "`rotator signer` at {} holds the token that signs, behind its policy and log",
            socket.display()
        ),
        None => {
            return (
                true,
                format!(
                    "this process's own Vault token signs (vault_pki.in_process = true): whoever holds it can have {}/sign-verbatim/{role} sign any subject, O=system:masters included",
                    vp.mount
                ),
            );
        }
    };
    let Some(vault) = vault else {
        return (true, who);
    };
    let paths = signing_paths(&vp.mount, role);
    match capabilities::of_self(vault, &paths).await {
        Ok(caps) => {
            let may: Vec<&str> = paths
                .iter()
                .filter(|p| capabilities::can_write(&caps[*p]))
                .map(String::as_str)
                .collect();
            if may.is_empty() {
                (
                    true,
                    format!(
                        "{who}; this process's token may call none of {}",
                        paths.join(", ")
                    ),
                )
            } else {
                (
                    false,
                    format!(
                        "{who}, but this process's own Vault token may call {} too, and so can have any subject signed (O=system:masters included); fix: remove every {}/ path from this process's Vault policy (docs/deploy-vault.md)",
                        may.join(", "),
                        vp.mount
                    ),
                )
            }
        }
        Err(e) => (
            false,
            format!("{who}; whether this process's token may sign is unknown: {e}"),
        ),
    }
}
