//! The store's two engines behind one query code path: every query in the
//! per-table modules runs through sqlx's `Any` driver with `$N` placeholders
//! (which SQLite accepts too). What differs between the engines is here, once:
//! where the database is and how to connect ([`Location`]), how a write
//! transaction serializes against other writers, the per-user lock, and which
//! error codes mean "busy", "retry" or "corrupt".
//!
//! - [`sqlite`]: one file in the data directory, WAL, `BEGIN IMMEDIATE` (one
//!   writer at a time), flock per user. File modes are SQLite's alone.
//! - [`postgres`]: many processes on many machines. A write transaction takes
//!   a transaction-level advisory lock first, so writers queue exactly as they
//!   do on SQLite (every write appends to the one audit chain, which has to be
//!   serialized anyway); the per-user lock is a session advisory lock.
use std::path::{Path, PathBuf};

pub mod postgres;
pub mod sqlite;

/// Which engine a [`Location`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }
}

/// Where the database is: `database_url`, or the data directory's `rotator.db`.
/// Its `Display` and `Debug` never show a password.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// The URL as given (it may hold a password: only [`Location::redacted`] is shown).
    Postgres(String),
}

impl Location {
    /// Parses a `database_url`. The error is the problem, for a config error.
    pub fn parse(url: &str) -> Result<Self, String> {
        let lower = url.to_ascii_lowercase();
        if let Some(rest) = lower
            .strip_prefix("sqlite://")
            .or_else(|| lower.strip_prefix("sqlite:"))
        {
            // Keep the original case of the path.
            let path = &url[url.len() - rest.len()..];
            let path = path.split('?').next().unwrap_or_default();
            if path.is_empty() {
                return Err(
                    "a sqlite URL needs a file path (sqlite:///var/lib/rotator/rotator.db)".into(),
                );
            }
            return Ok(Location::Sqlite(PathBuf::from(path)));
        }
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return Ok(Location::Postgres(url.to_string()));
        }
        Err(format!(
            "unknown database scheme in {} (expected sqlite://, postgres:// or postgresql://)",
            redact(url)
        ))
    }

    pub fn sqlite_file(path: &Path) -> Self {
        Location::Sqlite(path.to_path_buf())
    }

    pub fn engine(&self) -> Engine {
        match self {
            Location::Sqlite(_) => Engine::Sqlite,
            Location::Postgres(_) => Engine::Postgres,
        }
    }

    /// The SQLite file, when it is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(p) => Some(p),
            Location::Postgres(_) => None,
        }
    }

    /// What may be shown: the path, or the URL without its password.
    pub fn redacted(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(u) => redact(u),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({})", self.redacted())
    }
}

/// A URL with the password of its user info and any `password=` parameter
/// replaced by `***`.
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _password)) => format!("{user}:***@{host}"),
                    None => format!("{userinfo}@{host}"),
                },
                None => authority.to_string(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => head.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_shown() {
        for (url, shown) in [
            (
                "postgres://rotator:s3cret@db.example:5432/rotator?sslmode=verify-full",
                "postgres://rotator:***@db.example:5432/rotator?sslmode=verify-full",
            ),
            (
                "postgresql://rotator:p%40ss@db/rotator",
                "postgresql://rotator:***@db/rotator",
            ),
            (
                "postgres:///rotator?host=/run/postgresql&user=r&password=s3cret",
                "postgres:///rotator?host=/run/postgresql&user=r&password=***",
            ),
            (
                "postgres://rotator@db/rotator",
                "postgres://rotator@db/rotator",
            ),
        ] {
            let l = Location::parse(url).unwrap();
            assert_eq!(l.engine(), Engine::Postgres);
            assert_eq!(l.to_string(), shown);
            assert!(!format!("{l:?}").contains("s3cret"));
            assert!(!format!("{l:?}").contains("p%40ss"));
        }
        let e = Location::parse("mysql://u:s3cret@h/db").unwrap_err();
        assert!(
            e.contains("mysql://u:***@h/db") && !e.contains("s3cret"),
            "{e}"
        );
    }

    #[test]
    fn sqlite_urls_name_a_file() {
        assert_eq!(
            Location::parse("sqlite:///var/lib/rotator/x.db").unwrap(),
            Location::Sqlite("/var/lib/rotator/x.db".into())
        );
        assert_eq!(
            Location::parse("sqlite://rel/X.db?mode=rwc").unwrap(),
            Location::Sqlite("rel/X.db".into())
        );
        assert!(Location::parse("sqlite://").is_err());
    }
}
