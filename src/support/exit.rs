//! Process exit codes. They are part of the CLI's contract (README, "Exit codes"):
//! scripts branch on them, so a code never changes meaning.
use std::process::ExitCode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// A bug or an unexpected condition; the message says what.
    Internal = 1,
    /// The command line itself is wrong (clap's own code).
    Usage = 2,
    /// The configuration file or environment is invalid.
    Config = 3,
    /// The request was refused: invalid name, unknown role, TTL out of bounds, `system:`.
    Refused = 4,
    /// The named user, credential or object does not exist.
    NotFound = 5,
    /// The user or object already exists.
    Conflict = 6,
    /// The database is corrupt, locked, or from a newer rotator.
    Database = 7,
    /// The signer failed: CA unreadable, cluster unreachable, CSR denied or timed out.
    Signer = 8,
    /// A certificate came back that does not match what was asked.
    Verification = 9,
    /// The kubeconfig could not be written where asked.
    Output = 10,
    /// `audit verify` found a broken link in the hash chain.
    AuditBroken = 11,
    /// `fetch` / `credential`: the rotator server could not be reached, its TLS
    /// identity did not verify, or it failed (5xx). Retrying later may work.
    Unreachable = 12,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// Implemented by every error that can reach the CLI, so each maps to one code.
pub trait ExitStatus {
    fn exit(&self) -> Exit;
}
