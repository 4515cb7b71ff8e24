//! rotator's integration tests: one binary, so linking stays cheap.
mod access;
mod audit;
mod bulk;
mod ca_formats;
mod cli;
mod common;
mod crash;
mod daemon;
mod database;
mod deploy_rbac;
pub mod kubernetes;
mod policy_config;
mod revocation;
mod security;
mod signer;
mod user_api;
mod with_cluster;
