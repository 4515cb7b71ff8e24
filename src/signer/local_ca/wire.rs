//! The signer's wire protocol: HTTP/1.1 over a Unix socket, JSON bodies.
//!
//! - `POST /v1/sign` `{"csr": "<PEM>", "ttl_seconds": N}` ->
//!   `{"certificate": "<PEM>", "serial": "<hex>", "not_after": UNIX}`
//! - `GET /v1/ca` -> `{"certificate": "<PEM>"}`
//! - `GET /healthz` -> `{"status": "ok"}`
//! - any error -> `{"error": {"code", "message", "fix"}}`; the codes are stable.
//!
//! The same protocol whatever signs behind it (the local CA key, or Vault's
//! PKI engine: `signer = "vault-pki"` in the signer's configuration).
use serde::{Deserialize, Serialize};

pub const SIGN_PATH: &str = "/v1/sign";
pub const CA_PATH: &str = "/v1/ca";
pub const HEALTH_PATH: &str = "/healthz";

#[derive(Debug, Serialize, Deserialize)]
pub struct SignBody {
    pub csr: String,
    pub ttl_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SignedBody {
    pub certificate: String,
    pub serial: String,
    pub not_after: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CaBody {
    pub certificate: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub fix: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The stable error codes, with their HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BadRequest,
    BodyTooLarge,
    NotFound,
    PeerNotAllowed,
    RateLimited,
    BadCsr,
    SubjectDenied,
    GroupDenied,
    GenerationGroupMissing,
    GenerationGroupMismatch,
    CaRequested,
    /// vault-pki: the CSR asks for extensions Vault would copy.
    ExtensionRequested,
    TtlTooLong,
    TtlTooShort,
    CaExpired,
    /// vault-pki: Vault refused what the signer asked (its role's words).
    VaultRefused,
    /// vault-pki: Vault unreachable, sealed or denying the signer's token.
    VaultUnavailable,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadRequest => "bad_request",
            Code::BodyTooLarge => "body_too_large",
            Code::NotFound => "not_found",
            Code::PeerNotAllowed => "peer_not_allowed",
            Code::RateLimited => "rate_limited",
            Code::BadCsr => "bad_csr",
            Code::SubjectDenied => "subject_denied",
            Code::GroupDenied => "group_denied",
            Code::GenerationGroupMissing => "generation_group_missing",
            Code::GenerationGroupMismatch => "generation_group_mismatch",
            Code::CaRequested => "ca_requested",
            Code::ExtensionRequested => "extension_requested",
            Code::TtlTooLong => "ttl_too_long",
            Code::TtlTooShort => "ttl_too_short",
            Code::CaExpired => "ca_expired",
            Code::VaultRefused => "vault_refused",
            Code::VaultUnavailable => "vault_unavailable",
            Code::Internal => "internal",
        }
    }

    pub fn status(self) -> u16 {
        match self {
            Code::BadRequest | Code::BadCsr => 400,
            Code::NotFound => 404,
            Code::PeerNotAllowed => 403,
            Code::BodyTooLarge => 413,
            Code::RateLimited => 429,
            Code::Internal | Code::CaExpired => 500,
            Code::VaultUnavailable => 503,
            _ => 422,
        }
    }
}
