//! Small parts every layer uses: exit codes, the injectable clock, metrics,
//! and private files written atomically.
pub mod clock;
pub mod exit;
pub mod fsutil;
pub mod metrics;
