//! The `local-ca` signer, in two shapes behind one [`Signer`](super::Signer) seam:
//!
//! - [`in_process`]: the CA key is loaded into this process (`local_ca.key_file`).
//! - [`socket`]: the key stays in a separate `rotator signer` process and this
//!   process asks it over a Unix socket (`local_ca.socket`); it never opens the key.
//! - [`service`]: that `rotator signer` process: it alone loads the key (from a
//!   file today; a `vault:` reference is the [`service::KeySource`] seam) and
//!   enforces its own policy whatever its caller asks.
//! - [`backend`]: what that process signs with: the CA key, or Vault's PKI
//!   engine through the one token that may sign (`signer = "vault-pki"`).
//! - [`wire`]: the HTTP/1.1 + JSON protocol both sides speak.
pub mod backend;
pub mod in_process;
pub mod service;
pub mod socket;
pub mod wire;

pub use in_process::{BACKDATE_SECONDS, LocalCa};
