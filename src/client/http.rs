//! A small HTTPS client for the user API: rustls (the same provider as the rest
//! of rotator), the server verified against a given CA or the system roots,
//! an optional client certificate, and one deadline over connect, handshake,
//! request and response, so a command never hangs.
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::ClientError;
use crate::flows::self_service::ApiError;

/// Largest response read: a certificate and a CA bundle.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

pub struct ApiClient {
    server: String,
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// Splits `https://host[:port][/]` into host and port.
pub fn parse_server(server: &str) -> Result<(String, u16), ClientError> {
    let bad = |why: &str| ClientError::BadServer {
        server: server.to_string(),
        why: why.to_string(),
    };
    let uri: hyper::Uri = server.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("the URL must start with https://"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(bad("give the server's address only, without a path"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(443)))
}

impl ApiClient {
    /// `server_ca_pem`: the CA that verifies the server (None: system roots).
    /// `identity`: a client certificate chain and its key, for `/v1/renew`.
    pub fn new(
        server: &str,
        server_ca_pem: Option<&str>,
        identity: Option<(&str, &str)>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let (host, port) = parse_server(server)?;
        let roots = match server_ca_pem {
            Some(pem) => crate::pki::root_store(pem).map_err(ClientError::BadCa)?,
            None => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                roots
            }
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert_pem, key_pem)) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                        .collect::<Result<_, _>>()
                        .map_err(|e| ClientError::Cache(format!("cached certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|e| ClientError::Cache(format!("cached key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Cache(format!("cached certificate and key: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            server: server.trim_end_matches('/').to_string(),
            host,
            port,
            tls: Arc::new(config),
            timeout,
        })
    }

    /// POSTs `body` as JSON and decodes a 200 answer into `T`; any other status
    /// becomes [`ClientError::Refused`] with the server's error.
    pub async fn post<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        let bytes = serde_json::to_vec(body).expect("json");
        let (status, resp) = self.post_raw(path, "application/json", bytes).await?;
        if status == 200 {
            return serde_json::from_slice(&resp)
                .map_err(|e| ClientError::Protocol(format!("{path}: {e}")));
        }
        #[derive(serde::Deserialize)]
        struct Envelope {
            error: ApiError,
        }
        match serde_json::from_slice::<Envelope>(&resp) {
            Ok(mut env) => {
                env.error.status = status;
                Err(ClientError::Refused(env.error))
            }
            Err(_) => Err(ClientError::Protocol(format!(
                "{path} answered {status} without an error body"
            ))),
        }
    }

    /// One request with arbitrary bytes; the status and body of the answer.
    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        match tokio::time::timeout(self.timeout, self.exchange(path, content_type, body)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Unreachable {
                server: self.server.clone(),
                why: format!("no answer within {}s", self.timeout.as_secs()),
            }),
        }
    }

    async fn exchange(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let unreachable = |why: String| ClientError::Unreachable {
            server: self.server.clone(),
            why,
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| unreachable(format!("server name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(format!("the connection failed: {e}")))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(format!("reading the answer: {e}")))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok((status, body))
    }
}
