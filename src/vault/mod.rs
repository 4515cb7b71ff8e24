//! Vault (or OpenBao): the connection and its auth methods ([`client`], [`auth`]),
//! `vault:` secret references in the configuration ([`reference`], [`secrets`]),
//! KV v2 as a delivery target ([`kv`]), and what the token's policy allows
//! ([`capabilities`]).
pub mod auth;
pub mod capabilities;
pub mod client;
pub mod error;
pub mod kv;
pub mod reference;
pub mod secrets;
pub mod settings;

pub use client::{State, Status, Vault};
pub use error::VaultError;
pub use reference::VaultRef;
pub use settings::{VaultAuth, VaultSection, VaultSettings};
