//! Secret references: `vault:<kv-v2 mount>/<path>#<field>[?version=N]`, accepted
//! wherever the configuration names a file that holds a secret.
use std::fmt;
use std::path::Path;

/// Where a configured secret lives when it is not a file.
#[derive(Clone, PartialEq, Eq)]
pub struct VaultRef {
    /// The KV v2 mount (`secret`).
    pub mount: String,
    /// The secret's path under the mount (`rotator/ca`).
    pub path: String,
    /// The field of the secret's data (`key`).
    pub field: String,
    /// `None`: the current version.
    pub version: Option<u64>,
}

pub const PREFIX: &str = "vault:";

/// The shape, for error messages and `--help`.
pub const SHAPE: &str = "vault:<kv-v2 mount>/<path>#<field>[?version=N]";

impl VaultRef {
    /// `Some` when the configured path is a `vault:` reference.
    pub fn from_path(p: &Path) -> Option<Result<Self, String>> {
        let s = p.to_str()?;
        s.starts_with(PREFIX).then(|| s.parse())
    }
}

impl std::str::FromStr for VaultRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| format!("does not start with {PREFIX:?}"))?;
        let (rest, version) = match rest.split_once('?') {
            Some((r, q)) => {
                let v = q
                    .strip_prefix("version=")
                    .ok_or_else(|| format!("unknown query {q:?} (only version=N)"))?;
                let n: u64 = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("version {v:?} is not a positive number"))?;
                (r, Some(n))
            }
            None => (rest, None),
        };
        let (location, field) = rest
            .split_once('#')
            .ok_or("no #field (which field of the secret holds the value)")?;
        if field.is_empty() {
            return Err("empty #field".into());
        }
        let (mount, path) = location
            .trim_start_matches('/')
            .split_once('/')
            .ok_or("no path after the mount (mount/path)")?;
        let path = path.trim_matches('/');
        if mount.is_empty() || path.is_empty() {
            return Err("empty mount or path".into());
        }
        if path
            .split('/')
            .any(|seg| seg == ".." || seg == "." || seg.is_empty())
        {
            return Err("a path segment is empty, \".\" or \"..\"".into());
        }
        Ok(VaultRef {
            mount: mount.into(),
            path: path.into(),
            field: field.into(),
            version,
        })
    }
}

impl fmt::Display for VaultRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}/{}#{}", self.mount, self.path, self.field)?;
        if let Some(v) = self.version {
            write!(f, "?version={v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VaultRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_back() {
        for s in [
            "vault:secret/rotator/ca#key",
            "vault:kv/a#b?version=3",
            "vault:secret/x/y/z#tls.key",
        ] {
            let r: VaultRef = s.parse().unwrap();
            assert_eq!(r.to_string(), s);
        }
        let r: VaultRef = "vault:secret/rotator/ca#key?version=2".parse().unwrap();
        assert_eq!(
            (
                r.mount.as_str(),
                r.path.as_str(),
                r.field.as_str(),
                r.version
            ),
            ("secret", "rotator/ca", "key", Some(2))
        );
    }

    #[test]
    fn malformed_references_say_why() {
        for (s, why) in [
            ("vault:secret/ca", "#field"),
            ("vault:secret#key", "no path"),
            ("vault:secret/ca#", "empty #field"),
            ("vault:secret/ca#k?version=0", "positive"),
            ("vault:secret/ca#k?v=1", "unknown query"),
            ("vault:secret/../x#k", ".."),
        ] {
            let e = s.parse::<VaultRef>().unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
        assert!(VaultRef::from_path(Path::new("/etc/ca.key")).is_none());
    }
}
