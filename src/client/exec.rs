//! `rotator credential`: a `client.authentication.k8s.io` ExecCredential plugin.
//! kubectl runs it before talking to the cluster; it answers from the cache,
//! renews through `/v1/renew` once the credential is inside its renewal
//! window, and never prompts or hangs: when renewal fails it answers with the
//! still-valid cached credential, or fails at once saying what to do. The
//! process ends by `--timeout` whatever the network does (one deadline over the
//! renewal; the runtime does not wait for a stalled name lookup at exit), and a
//! failed renewal is remembered for [`RETRY_AFTER`] seconds (`renew-failed.json`,
//! 0600, in the server's state directory), so kubectl is not slowed on every
//! call while the server is down.
use std::time::Duration;

use serde_json::json;

use super::{Cached, ClientError, Connection, ServerDir};

pub const API_V1: &str = "client.authentication.k8s.io/v1";
pub const API_V1BETA1: &str = "client.authentication.k8s.io/v1beta1";

/// The apiVersion kubectl asked for in `KUBERNETES_EXEC_INFO` (v1 when absent).
pub fn requested_version(exec_info: Option<&str>) -> Result<&'static str, ClientError> {
    let Some(raw) = exec_info.filter(|s| !s.trim().is_empty()) else {
        return Ok(API_V1);
    };
    let v: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| ClientError::ExecInfo(format!("KUBERNETES_EXEC_INFO is not JSON: {e}")))?;
    match v.get("apiVersion").and_then(|a| a.as_str()) {
        Some(API_V1) | None => Ok(API_V1),
        Some(API_V1BETA1) => Ok(API_V1BETA1),
        Some(other) => Err(ClientError::ExecInfo(format!(
            "kubectl asked for ExecCredential {other:?}; rotator speaks {API_V1} and {API_V1BETA1}"
        ))),
    }
}

/// When to renew: `renew_before` ahead of notAfter if given, else when the
/// server said (the start of its renewal window).
pub fn renew_at(c: &Cached, renew_before: Option<Duration>) -> i64 {
    match renew_before {
        Some(d) => c.not_after - d.as_secs() as i64,
        None => c.renew_after,
    }
}

/// The ExecCredential kubectl reads from stdout. `expires` tells client-go
/// when to run the plugin again.
pub fn exec_credential(version: &str, c: &Cached, expires: i64) -> serde_json::Value {
    json!({
        "apiVersion": version,
        "kind": "ExecCredential",
        "status": {
            "clientCertificateData": c.certificate,
            "clientKeyData": c.key.as_str(),
            "expirationTimestamp": crate::support::clock::rfc3339(expires),
        }
    })
}

/// How long a failed renewal is remembered: calls in the meantime answer with
/// the cached credential at once instead of waiting for the server again.
pub const RETRY_AFTER: i64 = 60;

/// The outcome of one plugin run.
#[derive(Debug)]
pub struct Answer {
    pub credential: Cached,
    /// When client-go should ask again.
    pub expires: i64,
    pub renewed: bool,
    /// Why a due renewal did not happen (the cached credential was used).
    pub warning: Option<String>,
}

/// Decides what to hand kubectl. `now` is the machine's clock.
pub async fn run(
    conn: &Connection,
    renew_before: Option<Duration>,
    now: i64,
) -> Result<Answer, ClientError> {
    let dir = ServerDir::for_server(&conn.state_dir, &conn.server)?;
    let cached = dir.credential()?.ok_or_else(|| ClientError::NoCredential {
        server: conn.server.clone(),
        dir: dir.path.clone(),
    })?;
    // Come back when renewal is due, but not in a tight loop, and never past notAfter.
    let next = |c: &Cached| renew_at(c, renew_before).max(now + 30).min(c.not_after);
    if now < renew_at(&cached, renew_before) {
        let expires = next(&cached);
        return Ok(Answer {
            credential: cached,
            expires,
            renewed: false,
            warning: None,
        });
    }
    // A renewal failed moments ago: do not make this kubectl call wait again.
    if let Some(f) = dir.renew_failure()
        && now >= f.at
        && now < f.at + RETRY_AFTER
        && cached.not_after > now + 10
    {
        let expires = (f.at + RETRY_AFTER).min(cached.not_after);
        return Ok(Answer {
            credential: cached,
            expires,
            renewed: false,
            warning: Some(format!(
                "the last renewal failed {}s ago and is tried again in {}s: {}",
                now - f.at,
                f.at + RETRY_AFTER - now,
                f.error.lines().next().unwrap_or_default()
            )),
        });
    }
    // One deadline over the whole renewal (lock, requests, retries), not per request.
    let renewed = match tokio::time::timeout(conn.timeout, super::obtain(conn, None)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Unreachable {
            server: conn.server.clone(),
            why: format!("no answer within {}s", conn.timeout.as_secs()),
        }),
    };
    match renewed {
        Ok(fresh) => {
            dir.clear_renew_failure();
            let expires = next(&fresh);
            Ok(Answer {
                credential: fresh,
                expires,
                renewed: true,
                warning: None,
            })
        }
        // Still valid for a while: use it, and ask again soon.
        Err(e) if cached.not_after > now + 10 => {
            // Best effort: without the memory, the next call just tries again.
            let _ = dir.store_renew_failure(&super::state::RenewFailure {
                at: now,
                error: e.to_string(),
            });
            let expires = (now + RETRY_AFTER).min(cached.not_after);
            Ok(Answer {
                credential: cached,
                expires,
                renewed: false,
                warning: Some(e.to_string()),
            })
        }
        Err(e) => Err(e),
    }
}
