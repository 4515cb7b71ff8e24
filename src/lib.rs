//! rotator: short-lived, least-privilege, revocable X.509 client credentials for
//! Kubernetes users. The binary is thin; everything lives here.
#![forbid(unsafe_code)]

pub mod access;
pub mod app;
pub mod authz;
pub mod bulk;
pub mod cli;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod enrollment;
pub mod exit;
pub mod fsutil;
pub mod health;
pub mod issuer;
pub mod kubeconfig;
pub mod lifecycle;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod renewal;
pub mod rollback;
pub mod scheduler;
pub mod selfservice;
pub mod server;
pub mod signer;
pub mod sink;
pub mod store;
pub mod tokens;
pub mod unbindable;
pub mod vault;
