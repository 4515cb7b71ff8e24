//! rotator: short-lived, least-privilege, revocable X.509 client credentials for
//! Kubernetes users. The binary is thin; everything lives here.
//!
//! # Layout
//!
//! The folders say which code is an edge, which is a flow and which is an
//! adapter. Calls go down this list: an edge calls flows, a flow calls
//! adapters and delivery, and nothing below calls back up.
//!
//! - **Edges**, where requests come in (clap, HTTP and `anyhow` live only here):
//!   - [`cli`]: the admin commands; each parses, calls a flow and prints.
//!   - [`daemon`]: `rotator serve`'s long-running parts: the
//!     [`daemon::scheduler`] (rotate, expire, reconcile), [`daemon::health`]
//!     (`/healthz`, `/readyz`, `/metrics`), the user API server
//!     ([`daemon::api`]) and the authorization webhook ([`daemon::authz`]).
//!   - [`client`]: the user's side: `rotator fetch` and the kubectl exec plugin.
//! - **Flows** ([`flows`]), what rotator does, with no clap, no HTTP and no
//!   `anyhow`: issue (the issuance saga), renew, revoke (with remove and
//!   expire), enroll, onboard (bulk), bindings (RBAC follows the database),
//!   self-service (what the user API decides) and bootstrap tokens.
//! - **Delivery** ([`delivery`]): how a kubeconfig is rendered and where it
//!   goes (a file, stdout, a Secret, Vault).
//! - **Adapters**, one outside system each: [`cluster`] (Kubernetes: CSRs,
//!   RBAC, leases, bootstrap tokens), [`store`] (sqlx on SQLite and
//!   PostgreSQL, the audit chain), [`signer`] (the `Signer` seam: kubernetes,
//!   local CA in process or over a socket, vault-pki), [`vault`] and [`pki`]
//!   (keys, CSRs, certificates, sealing).
//! - **Shared**: [`app`] (the composition root: builds the adapters once from
//!   the [`config`]), [`policy`] (what may be issued) and [`support`] (exit
//!   codes, the clock, metrics, private files written atomically).
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod delivery;
pub mod flows;
pub mod pki;
pub mod policy;
pub mod signer;
pub mod store;
pub mod support;
pub mod vault;
