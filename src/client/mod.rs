//! The user's side of self-service: `rotator fetch` and the `rotator credential`
//! exec plugin. Keys are made here and never leave this machine.
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::flows::self_service::{ApiError, Grant, SubjectResponse};
use crate::pki::{self, KeyType, PrivateKey};
use crate::support::exit::{Exit, ExitStatus};

pub mod exec;
pub mod http;
pub mod state;

pub use http::ApiClient;
pub use state::{Cached, Pending, ServerDir};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "invalid server address {server:?}: {why}\nfix: give the URL your administrator printed, such as https://rotator.example.com:8443"
    )]
    BadServer { server: String, why: String },
    #[error(
        "cannot use the server CA: {0}\nfix: give --server-ca a PEM file with the CA that signed the rotator server's certificate"
    )]
    BadCa(String),
    #[error(
        "cannot reach the rotator server {server}: {why}\nfix: check the address and your network; your current credential keeps working until it expires"
    )]
    Unreachable { server: String, why: String },
    #[error(
        "the TLS handshake with the rotator server failed: {0}\nfix: check --server-ca; if the server refused your certificate, it is not one rotator issued (enroll again with a token)"
    )]
    Tls(String),
    #[error("the server refused the request: {0}")]
    Refused(ApiError),
    #[error(
        "the server's answer is not what rotator expects: {0}\nfix: check that --server points at a rotator server of this version"
    )]
    Protocol(String),
    #[error("{0}")]
    Cache(String),
    #[error("{0}\nfix: use a kubectl that speaks client.authentication.k8s.io/v1 (1.22 or newer)")]
    ExecInfo(String),
    #[error(
        "no credential for {server} is cached in {dir}\nfix: enroll first: rotator fetch --server {server} --token <token from your administrator>"
    )]
    NoCredential { server: String, dir: PathBuf },
    #[error(
        "the cached credential for {server} expired at {at}\nfix: ask your administrator for a new enrollment token and run rotator fetch --server {server} --token <token>"
    )]
    Expired { server: String, at: String },
    #[error("cannot make a key: {0}")]
    Key(#[from] pki::PkiError),
    #[error("cannot write the kubeconfig {path}: {why}\nfix: {fix}")]
    Kubeconfig {
        path: PathBuf,
        why: String,
        fix: &'static str,
    },
}

impl ExitStatus for ClientError {
    fn exit(&self) -> Exit {
        match self {
            ClientError::BadServer { .. } | ClientError::BadCa(_) | ClientError::ExecInfo(_) => {
                Exit::Usage
            }
            ClientError::Unreachable { .. } | ClientError::Tls(_) | ClientError::Protocol(_) => {
                Exit::Unreachable
            }
            ClientError::Refused(e) if e.status >= 500 => Exit::Unreachable,
            ClientError::Refused(_) => Exit::Refused,
            ClientError::NoCredential { .. } => Exit::NotFound,
            ClientError::Expired { .. } => Exit::Refused,
            ClientError::Cache(_) | ClientError::Kubeconfig { .. } => Exit::Output,
            ClientError::Key(e) => e.exit(),
        }
    }
}

/// How to reach the server.
#[derive(Debug, Clone)]
pub struct Connection {
    pub server: String,
    /// PEM; None: the one cached for this server, else the system roots.
    pub server_ca_pem: Option<String>,
    pub state_dir: PathBuf,
    pub timeout: Duration,
}

/// Enrolls with `token`, or renews with the cached credential, and caches the
/// result. Safe to rerun after any failure: an interrupted request is retried
/// with the same key, and the server recognises it.
pub async fn obtain(conn: &Connection, token: Option<&str>) -> Result<Cached, ClientError> {
    let dir = ServerDir::for_server(&conn.state_dir, &conn.server)?;
    let _lock = dir.lock(conn.timeout)?;
    let ca = conn.server_ca_pem.clone().or_else(|| dir.server_ca());
    let cached = dir.credential()?;
    let now = crate::support::clock::Clock::now(&crate::support::clock::SystemClock);
    let (purpose, client) = match (token, &cached) {
        (Some(t), _) => {
            let id = t.split_once('.').map(|(id, _)| id).unwrap_or(t);
            (
                format!("enroll:{id}"),
                ApiClient::new(&conn.server, ca.as_deref(), None, conn.timeout)?,
            )
        }
        (None, Some(c)) => {
            if c.not_after <= now {
                return Err(ClientError::Expired {
                    server: conn.server.clone(),
                    at: crate::support::clock::rfc3339(c.not_after),
                });
            }
            let client = ApiClient::new(
                &conn.server,
                ca.as_deref(),
                Some((&c.certificate, &c.key)),
                conn.timeout,
            )?;
            (format!("renew:{}", c.serial), client)
        }
        (None, None) => {
            return Err(ClientError::NoCredential {
                server: conn.server.clone(),
                dir: dir.path.clone(),
            });
        }
    };
    // At most two rounds: a stale generation (an attempt failed, or someone
    // renewed meanwhile) asks for the subject again but keeps the key, so a
    // token already claimed for this key stays usable.
    let mut last = None;
    let mut stale: Option<Pending> = None;
    for _ in 0..2 {
        let pending = match (
            dir.pending()?.filter(|p| p.purpose == purpose),
            stale.take(),
        ) {
            (Some(p), _) => p,
            (None, keep) => {
                let key = new_key(keep.map(|k| k.key))?;
                let subject: SubjectResponse = client
                    .post("/v1/subject", &json!({ "token": token }))
                    .await?;
                let p = new_request(&purpose, &subject, key)?;
                dir.store_pending(&p)?;
                p
            }
        };
        let answer: Result<Grant, ClientError> = match token {
            Some(t) => {
                client
                    .post("/v1/enroll", &json!({"token": t, "csr": pending.csr}))
                    .await
            }
            None => client.post("/v1/renew", &json!({"csr": pending.csr})).await,
        };
        match answer {
            Ok(g) => {
                let c = accept(&conn.server, g, &pending)?;
                dir.store_credential(&c)?;
                if let Some(pem) = &conn.server_ca_pem {
                    dir.store_server_ca(pem)?;
                }
                dir.clear_pending();
                return Ok(c);
            }
            // The server decided: this CSR will never be accepted.
            Err(ClientError::Refused(e)) if e.status < 500 && e.status != 429 => {
                dir.clear_pending();
                if e.code == "generation_stale" {
                    last = Some(ClientError::Refused(e));
                    stale = Some(pending);
                    continue;
                }
                return Err(ClientError::Refused(e));
            }
            // Unknown outcome: keep the pending request; a rerun presents the same key.
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("a round ran"))
}

/// The key kept from a stale round, if any (a new one is made once the key type is known).
fn new_key(keep: Option<zeroize::Zeroizing<String>>) -> Result<Option<PrivateKey>, ClientError> {
    Ok(match keep {
        Some(pem) => Some(PrivateKey::from_pem(&pem, "pending request")?),
        None => None,
    })
}

/// A CSR for `s`, with a new key or (after a stale generation) the same one.
fn new_request(
    purpose: &str,
    s: &SubjectResponse,
    key: Option<PrivateKey>,
) -> Result<Pending, ClientError> {
    let key_type: KeyType = s
        .key_type
        .parse()
        .map_err(|e: pki::UnknownKeyType| ClientError::Protocol(e.to_string()))?;
    let key = match key {
        Some(k) => k,
        None => PrivateKey::generate(key_type)?,
    };
    // The server names the user's groups; the generation group ends with a
    // digest of this key (`policy::generation_group`).
    let mut organizations: Vec<String> = s
        .organizations
        .iter()
        .filter(|o| crate::policy::parse_generation_group(&s.common_name, o).is_none())
        .cloned()
        .collect();
    organizations.push(crate::policy::generation_group(
        &s.common_name,
        s.generation,
        &key.spki_der(),
    ));
    let der = pki::build_csr(&key, &pki::subject_name(&s.common_name, &organizations)?)?;
    Ok(Pending {
        purpose: purpose.into(),
        key: key.to_pem(),
        csr: pki::pem_encode("CERTIFICATE REQUEST", &der),
    })
}

/// Checks that the certificate is for our key before anything is cached.
fn accept(server: &str, g: Grant, p: &Pending) -> Result<Cached, ClientError> {
    let key = PrivateKey::from_pem(&p.key, "pending request")?;
    let info = pki::parse_cert_pem(&g.certificate, "the server's certificate")?;
    if info.spki_der != key.spki_der() {
        return Err(ClientError::Protocol(
            "the certificate the server returned is not for the key this machine made".into(),
        ));
    }
    Ok(Cached {
        server: server.to_string(),
        user: g.user,
        certificate: g.certificate,
        key: p.key.clone(),
        serial: g.serial,
        generation: g.generation,
        not_before: info.not_before,
        not_after: info.not_after,
        renew_after: g.renew_after,
        namespace: g.namespace,
        cluster: g.cluster,
    })
}
