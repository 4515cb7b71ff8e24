//! `rotator serve`'s long-running edges: the job scheduler, the health and
//! metrics listener, the user API server and the authorization webhook.
pub mod api;
pub mod authz;
pub mod health;
pub mod scheduler;
