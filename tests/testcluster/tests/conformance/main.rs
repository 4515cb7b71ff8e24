//! Conformance: every scenario runs twice, once through kube-rs and once through
//! the real kubectl, and both must see the same outcome, the one a real
//! kube-apiserver + kube-controller-manager would give.
mod authz;
mod common;
mod scenarios;
mod server;
mod tokens;
