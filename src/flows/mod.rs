//! What rotator does, apart from how it is asked (no clap, no HTTP, no
//! `anyhow`). Each flow takes the [`crate::app::App`] and typed inputs and
//! returns a typed error that knows its exit code.
pub mod bindings;
pub mod bootstrap_tokens;
pub mod enroll;
pub mod issue;
pub mod onboard;
pub mod renew;
pub mod revoke;
pub mod rollback;
pub mod self_service;
pub mod unbindable;
