//! The authorization webhook (`serve --authz-addr`): kube-apiserver asks it,
//! before RBAC and only for requests that carry a `rotator:` group, whether
//! rotator refuses a request; rotator denies those made with a revoked,
//! expired, superseded-past-grace or unknown certificate, or by a removed or
//! disabled user, and has no opinion otherwise. It never allows.
//!
//! `review` reads SubjectAccessReviews and writes answers, `decide` is the
//! pure decision (and defines what a rotator identity is), `snapshot` holds
//! the states in memory, `server` is the HTTPS listener and its refresher.
pub mod decide;
pub mod review;
pub mod server;
pub mod setup;
pub mod snapshot;

pub use decide::{Decision, Rules, Verdict, decide};
pub use server::{AuthzError, Webhook};
pub use snapshot::Shared;
