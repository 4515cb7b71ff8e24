//! What may be issued. Names are validated, never escaped: a value that is not
//! plainly safe is refused with the reason, before any key or CSR exists.
use std::time::Duration;

use crate::pki::KeyType;
use crate::support::exit::{Exit, ExitStatus};

/// Kubernetes refuses `expirationSeconds` under 600.
pub const ABSOLUTE_MIN_TTL: Duration = Duration::from_secs(600);
/// Prefix of the per-credential generation groups rotator puts in O; nobody may ask for it.
pub const GENERATION_GROUP_PREFIX: &str = "rotator:";
const MAX_NAME_BYTES: usize = 253;
/// Namespaces Kubernetes itself runs in: a user is given access to one only when
/// `policy.allowed_namespaces` names it exactly (`*` or `kube-*` is not enough).
pub const PROTECTED_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];
/// The entry of `policy.denied_groups` that stands for [`DEFAULT_DENIED_GROUPS`].
pub const DENIED_GROUPS_DEFAULTS: &str = "@defaults";
/// Groups known to be bound to cluster-admin (or close to it) on common
/// distributions; `system:*` is refused by prefix besides these. Why each is
/// here is in config/rotator.toml.
pub const DEFAULT_DENIED_GROUPS: &[&str] = &[
    // kubeadm >= 1.29: admin.conf's group, bound to cluster-admin by kubeadm.
    "kubeadm:cluster-admins",
    // OpenShift Dedicated / ROSA: bound to cluster-admin, and to dedicated-admin.
    "cluster-admins",
    "dedicated-admins",
    // Amazon EKS: groups of EKS's own components (eks:*); nobody's user should carry them.
    "eks:*",
];
/// The namespace list of a user bound cluster-wide (a ClusterRoleBinding).
pub const ALL_NAMESPACES: &str = "*";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("invalid {what} {value:?}: {problem}\nfix: {fix}")]
    InvalidName {
        what: &'static str,
        value: String,
        problem: String,
        fix: &'static str,
    },
    #[error(
        "{what} {value:?} is reserved: {why}\nfix: pick a name that does not start with {prefix:?}"
    )]
    Reserved {
        what: &'static str,
        value: String,
        prefix: &'static str,
        why: &'static str,
    },
    #[error(
        "role {role:?} is not allowed by policy (allowed: {allowed})\nfix: use one of the allowed roles, or add it to policy.allowed_roles"
    )]
    UnknownRole { role: String, allowed: String },
    #[error(
        "cluster-wide access (a ClusterRoleBinding) is not allowed by policy\nfix: bind the role in namespaces with --namespace, or set policy.allow_cluster_role_bindings = true"
    )]
    ClusterWideNotAllowed,
    #[error(
        "{what} {value:?} is not allowed by policy (allowed: {allowed})\nfix: use an allowed {what}, or extend policy.allowed_{what}s"
    )]
    NotAllowed {
        what: &'static str,
        value: String,
        allowed: String,
    },
    #[error(
        "TTL {ttl} is outside policy bounds [{min}, {max}]\nfix: ask for a lifetime between {min} and {max}"
    )]
    Ttl {
        ttl: String,
        min: String,
        max: String,
    },
    #[error(
        "group {value:?} is denied by policy (it matches {pattern:?} in policy.denied_groups): it is privileged on common distributions, and a certificate keeps its groups for its whole life\nfix: bind a role to a group of your own instead; if {value:?} really is harmless in this cluster, remove it from policy.denied_groups (keep \"@defaults\" there to keep the built-in list)"
    )]
    DeniedGroup { value: String, pattern: String },
    #[error(
        "namespace {value:?} is one Kubernetes itself runs in, and policy.allowed_namespaces does not name it (\"*\" or a prefix does not count for it)\nfix: bind the user in another namespace, or add \"{value}\" by its exact name to policy.allowed_namespaces"
    )]
    ProtectedNamespace { value: String },
    #[error(
        "at least one namespace is required\nfix: add --namespace NAME (one RoleBinding is made per namespace)"
    )]
    NoNamespace,
}

impl ExitStatus for PolicyError {
    fn exit(&self) -> Exit {
        Exit::Refused
    }
}

/// `*`, an exact value, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(Pattern::Any);
        }
        let (body, prefix) = match s.strip_suffix('*') {
            Some(b) => (b, true),
            None => (s, false),
        };
        if body.is_empty() || body.contains('*') {
            return Err("'*' may appear only alone or at the end".into());
        }
        Ok(if prefix {
            Pattern::Prefix(body.into())
        } else {
            Pattern::Exact(body.into())
        })
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => e == v,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Any => f.write_str("*"),
            Pattern::Exact(e) => f.write_str(e),
            Pattern::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// What a user asks for; validated by [`Policy::check`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserSpec {
    pub name: String,
    pub groups: Vec<String>,
    pub namespaces: Vec<String>,
    pub role: String,
    pub key_type: KeyType,
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub allowed_roles: Vec<String>,
    pub allowed_namespaces: Vec<Pattern>,
    pub allowed_groups: Vec<Pattern>,
    /// Refused whatever `allowed_groups` says; lowercase, matched case-insensitively.
    pub denied_groups: Vec<Pattern>,
    pub default_ttl: Duration,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub default_key_type: KeyType,
    pub allow_cluster_role_bindings: bool,
    pub default_token_ttl: Duration,
    pub max_token_ttl: Duration,
    /// A bootstrap token with TTL 0 never expires; refused unless this is set.
    pub allow_non_expiring_tokens: bool,
}

impl Policy {
    /// The one gate every issuance passes. Refuses rather than repairs.
    pub fn check(&self, spec: &UserSpec) -> Result<(), PolicyError> {
        validate_user_name(&spec.name)?;
        for g in &spec.groups {
            validate_group_name(g)?;
            let lower = g.to_ascii_lowercase();
            if let Some(p) = self.denied_groups.iter().find(|p| p.matches(&lower)) {
                return Err(PolicyError::DeniedGroup {
                    value: g.clone(),
                    pattern: p.to_string(),
                });
            }
            if !self.allowed_groups.iter().any(|p| p.matches(g)) {
                return Err(PolicyError::NotAllowed {
                    what: "group",
                    value: g.clone(),
                    allowed: join(&self.allowed_groups),
                });
            }
        }
        if spec.namespaces.is_empty() {
            return Err(PolicyError::NoNamespace);
        }
        if spec.namespaces.iter().any(|n| n == ALL_NAMESPACES) {
            if !self.allow_cluster_role_bindings || spec.namespaces.len() != 1 {
                return Err(PolicyError::ClusterWideNotAllowed);
            }
            return self.check_role_and_ttl(spec);
        }
        for ns in &spec.namespaces {
            validate_dns_label(ns).map_err(|problem| PolicyError::InvalidName {
                what: "namespace",
                value: ns.clone(),
                problem,
                fix: "namespaces are DNS labels: lowercase letters, digits and '-', at most 63 characters",
            })?;
            if !self.allowed_namespaces.iter().any(|p| p.matches(ns)) {
                return Err(PolicyError::NotAllowed {
                    what: "namespace",
                    value: ns.clone(),
                    allowed: join(&self.allowed_namespaces),
                });
            }
            if PROTECTED_NAMESPACES.contains(&ns.as_str())
                && !self
                    .allowed_namespaces
                    .iter()
                    .any(|p| matches!(p, Pattern::Exact(e) if e == ns))
            {
                return Err(PolicyError::ProtectedNamespace { value: ns.clone() });
            }
        }
        self.check_role_and_ttl(spec)
    }

    fn check_role_and_ttl(&self, spec: &UserSpec) -> Result<(), PolicyError> {
        if !self.allowed_roles.iter().any(|r| r == &spec.role) {
            return Err(PolicyError::UnknownRole {
                role: spec.role.clone(),
                allowed: self.allowed_roles.join(", "),
            });
        }
        self.check_ttl(Duration::from_secs(spec.ttl_seconds))
    }

    pub fn check_ttl(&self, ttl: Duration) -> Result<(), PolicyError> {
        if ttl < self.min_ttl.max(ABSOLUTE_MIN_TTL) || ttl > self.max_ttl {
            return Err(PolicyError::Ttl {
                ttl: humantime::format_duration(ttl).to_string(),
                min: humantime::format_duration(self.min_ttl.max(ABSOLUTE_MIN_TTL)).to_string(),
                max: humantime::format_duration(self.max_ttl).to_string(),
            });
        }
        Ok(())
    }
}

fn join(p: &[Pattern]) -> String {
    p.iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Hex digits of the public key's SHA-256 that end a generation group.
pub const GENERATION_SUFFIX_HEX: usize = 12;

/// The generation group a credential carries in O: `rotator:USER:GEN.SUFFIX`.
/// RBAC bindings name it, so revoking a credential is removing its group from
/// the bindings. The generation number alone could repeat (a database restored
/// from an older backup, or recreated, counts again from what it knows); the
/// suffix, from the SHA-256 of the certificate's public key, never does, so a
/// group names one credential for ever and an old certificate can never inherit
/// a new credential's bindings.
pub fn generation_group(user: &str, generation: i64, spki_der: &[u8]) -> String {
    let digest = crate::pki::hex(&crate::pki::sha256(spki_der));
    format!(
        "{GENERATION_GROUP_PREFIX}{user}:{generation}.{}",
        &digest[..GENERATION_SUFFIX_HEX]
    )
}

/// The group of a credential from before suffixes existed: `rotator:USER:GEN`.
pub fn legacy_generation_group(user: &str, generation: i64) -> String {
    format!("{GENERATION_GROUP_PREFIX}{user}:{generation}")
}

/// The generation `group` names if it is one of `user`'s generation groups
/// (with or without a suffix).
pub fn parse_generation_group(user: &str, group: &str) -> Option<i64> {
    let rest = group
        .strip_prefix(GENERATION_GROUP_PREFIX)?
        .strip_prefix(user)?
        .strip_prefix(':')?;
    let (number, suffix) = match rest.split_once('.') {
        Some((n, s)) => (n, Some(s)),
        None => (rest, None),
    };
    if let Some(s) = suffix
        && (s.len() != GENERATION_SUFFIX_HEX || !s.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    number.parse().ok().filter(|n| *n >= 1)
}

fn validate_subject_value(what: &'static str, value: &str) -> Result<(), PolicyError> {
    let bad = |problem: String| PolicyError::InvalidName {
        what,
        value: value.to_string(),
        problem,
        fix: "use letters, digits and . _ @ + - : (starting with a letter or digit), at most 253 bytes",
    };
    if value.is_empty() {
        return Err(bad("empty".into()));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(bad(format!(
            "{} bytes, more than {MAX_NAME_BYTES}",
            value.len()
        )));
    }
    if let Some(c) = value.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(format!(
            "contains whitespace or a control character ({:?})",
            c
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._@+-:".contains(*c)))
    {
        return Err(bad(format!("contains {c:?}")));
    }
    if !value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Err(bad("must start with a letter or digit".into()));
    }
    // Case-insensitive on purpose: "System:masters" is not special to Kubernetes,
    // but nobody should be handed a name that reads like it is.
    if value.to_ascii_lowercase().starts_with("system:") {
        return Err(PolicyError::Reserved {
            what,
            value: value.to_string(),
            prefix: "system:",
            why: "names under system: belong to Kubernetes itself (system:masters bypasses RBAC, system:node:* impersonates a node)",
        });
    }
    Ok(())
}

pub fn validate_user_name(name: &str) -> Result<(), PolicyError> {
    validate_subject_value("user name", name)?;
    // A user named `rotator:bob:1` would read like bob's generation group.
    if name
        .to_ascii_lowercase()
        .starts_with(GENERATION_GROUP_PREFIX)
    {
        return Err(PolicyError::Reserved {
            what: "user name",
            value: name.to_string(),
            prefix: GENERATION_GROUP_PREFIX,
            why: "rotator: names are the per-credential generation groups revocation depends on",
        });
    }
    Ok(())
}

/// `policy.denied_groups` as configured: [`DENIED_GROUPS_DEFAULTS`] expands to
/// the built-in list; every entry is lowercased (matching is case-insensitive).
pub fn denied_group_patterns(entries: &[String]) -> Result<Vec<Pattern>, (String, String)> {
    let mut out = Vec::new();
    for e in entries {
        if e == DENIED_GROUPS_DEFAULTS {
            out.extend(DEFAULT_DENIED_GROUPS.iter().map(|d| {
                Pattern::parse(d).expect("the built-in denied groups are valid patterns")
            }));
            continue;
        }
        out.push(Pattern::parse(&e.to_ascii_lowercase()).map_err(|p| (e.clone(), p))?);
    }
    Ok(out)
}

pub fn validate_group_name(group: &str) -> Result<(), PolicyError> {
    validate_subject_value("group", group)?;
    if group
        .to_ascii_lowercase()
        .starts_with(GENERATION_GROUP_PREFIX)
    {
        return Err(PolicyError::Reserved {
            what: "group",
            value: group.to_string(),
            prefix: GENERATION_GROUP_PREFIX,
            why: "rotator: groups are the per-credential generation groups revocation depends on",
        });
    }
    Ok(())
}

/// RFC 1123 label, as Kubernetes requires for namespaces.
pub fn validate_dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("must be 1 to 63 characters, got {}", s.len()));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lowercase letters, digits and '-' are allowed".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

/// ClusterRole names are path segments: no '/', no '%', not "." or "..".
pub fn validate_role_name(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.len() > MAX_NAME_BYTES
        || s == "."
        || s == ".."
        || s.contains(['/', '%'])
        || s.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("not a valid ClusterRole name".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            allowed_roles: vec!["view".into(), "edit".into()],
            allowed_namespaces: vec![Pattern::parse("team-*").unwrap()],
            allowed_groups: vec![Pattern::Any],
            denied_groups: denied_group_patterns(&[DENIED_GROUPS_DEFAULTS.into()]).unwrap(),
            default_ttl: Duration::from_secs(3600),
            min_ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(86400),
            default_key_type: KeyType::EcdsaP256,
            allow_cluster_role_bindings: false,
            default_token_ttl: Duration::from_secs(86400),
            max_token_ttl: Duration::from_secs(7 * 86400),
            allow_non_expiring_tokens: false,
        }
    }

    fn spec() -> UserSpec {
        UserSpec {
            name: "alice".into(),
            groups: vec!["dev".into()],
            namespaces: vec!["team-a".into()],
            role: "edit".into(),
            key_type: KeyType::EcdsaP256,
            ttl_seconds: 3600,
        }
    }

    #[test]
    fn accepts_a_plain_request() {
        policy().check(&spec()).unwrap();
        let mut s = spec();
        s.name = "alice.smith@example.com".into();
        policy().check(&s).unwrap();
    }

    #[test]
    fn refuses_system_users_and_groups_in_any_case() {
        for name in [
            "system:admin",
            "system:node:worker-1",
            "SYSTEM:kube-proxy",
            "System:masters",
        ] {
            let mut s = spec();
            s.name = name.into();
            assert!(
                matches!(policy().check(&s), Err(PolicyError::Reserved { .. })),
                "{name}"
            );
        }
        for g in ["system:masters", "system:nodes", "System:Masters"] {
            let mut s = spec();
            s.groups = vec![g.into()];
            assert!(
                matches!(policy().check(&s), Err(PolicyError::Reserved { .. })),
                "{g}"
            );
        }
    }

    #[test]
    fn refuses_forged_generation_groups() {
        let mut s = spec();
        s.groups = vec!["rotator:bob:7".into()];
        let e = policy().check(&s).unwrap_err();
        assert!(
            matches!(
                e,
                PolicyError::Reserved {
                    prefix: "rotator:",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn refuses_bad_names_with_the_value_in_the_message() {
        let long = "a".repeat(254);
        for (name, needle) in [
            ("", "empty"),
            ("al ice", "whitespace"),
            ("al\u{7}ice", "control"),
            (long.as_str(), "254 bytes"),
            ("alice,O=system:masters", "','"),
            ("CN=x/O=y", "'='"),
            ("-alice", "start"),
        ] {
            let mut s = spec();
            s.name = name.into();
            let e = policy().check(&s).unwrap_err().to_string();
            assert!(e.contains(needle), "{name:?}: {e}");
            assert!(e.contains("fix:"), "{e}");
        }
    }

    #[test]
    fn roles_namespaces_and_ttl_follow_policy() {
        let mut s = spec();
        s.role = "cluster-admin".into();
        let e = policy().check(&s).unwrap_err().to_string();
        assert!(
            e.contains("cluster-admin") && e.contains("view, edit"),
            "{e}"
        );
        let mut s = spec();
        s.namespaces = vec!["kube-system".into()];
        assert!(matches!(
            policy().check(&s),
            Err(PolicyError::NotAllowed {
                what: "namespace",
                ..
            })
        ));
        let mut s = spec();
        s.namespaces = vec!["Team-A".into()];
        assert!(matches!(
            policy().check(&s),
            Err(PolicyError::InvalidName {
                what: "namespace",
                ..
            })
        ));
        let mut s = spec();
        s.namespaces.clear();
        assert_eq!(policy().check(&s), Err(PolicyError::NoNamespace));
        for ttl in [599, 86401] {
            let mut s = spec();
            s.ttl_seconds = ttl;
            assert!(
                matches!(policy().check(&s), Err(PolicyError::Ttl { .. })),
                "{ttl}"
            );
        }
    }

    #[test]
    fn cluster_wide_access_needs_policy() {
        let mut s = spec();
        s.namespaces = vec![ALL_NAMESPACES.into()];
        assert_eq!(policy().check(&s), Err(PolicyError::ClusterWideNotAllowed));
        let mut p = policy();
        p.allow_cluster_role_bindings = true;
        p.check(&s).unwrap();
        s.namespaces.push("team-a".into());
        assert_eq!(
            p.check(&s),
            Err(PolicyError::ClusterWideNotAllowed),
            "cluster-wide stands alone"
        );
    }

    #[test]
    fn user_names_under_rotator_are_refused_in_any_case() {
        for name in ["rotator:bob:1", "Rotator:bob", "ROTATOR:x"] {
            let mut s = spec();
            s.name = name.into();
            let e = policy().check(&s).unwrap_err();
            assert!(
                matches!(
                    e,
                    PolicyError::Reserved {
                        prefix: "rotator:",
                        what: "user name",
                        ..
                    }
                ),
                "{name}: {e}"
            );
            assert!(
                e.to_string().contains(name) && e.to_string().contains("fix:"),
                "{e}"
            );
        }
        let mut s = spec();
        s.name = "rotatorbob".into();
        policy().check(&s).unwrap();
    }

    #[test]
    fn privileged_groups_are_denied_by_default_in_any_case() {
        for g in [
            "kubeadm:cluster-admins",
            "KubeAdm:Cluster-Admins",
            "cluster-admins",
            "eks:node-manager",
        ] {
            let mut s = spec();
            s.groups = vec![g.into()];
            let e = policy().check(&s).unwrap_err();
            assert!(matches!(e, PolicyError::DeniedGroup { .. }), "{g}: {e}");
            let m = e.to_string();
            assert!(
                m.contains(g) && m.contains("policy.denied_groups") && m.contains("fix:"),
                "{m}"
            );
        }
        // kubeadm:get-nodes only lets a joining node read nodes: harmless, not denied.
        let mut s = spec();
        s.groups = vec!["kubeadm:get-nodes".into()];
        policy().check(&s).unwrap();
    }

    #[test]
    fn denied_groups_extend_or_replace_the_defaults() {
        let extended =
            denied_group_patterns(&[DENIED_GROUPS_DEFAULTS.into(), "Corp:Admins".into()]).unwrap();
        let mut p = policy();
        p.denied_groups = extended;
        for g in ["corp:admins", "CORP:ADMINS", "kubeadm:cluster-admins"] {
            let mut s = spec();
            s.groups = vec![g.into()];
            assert!(
                matches!(p.check(&s), Err(PolicyError::DeniedGroup { .. })),
                "{g}"
            );
        }
        p.denied_groups = denied_group_patterns(&["corp:*".into()]).unwrap();
        let mut s = spec();
        s.groups = vec!["cluster-admins".into()];
        p.check(&s)
            .expect("without @defaults the built-in list is dropped");
        s.groups = vec!["corp:ops".into()];
        assert!(matches!(p.check(&s), Err(PolicyError::DeniedGroup { .. })));
        assert!(denied_group_patterns(&["a*b".into()]).is_err());
    }

    #[test]
    fn system_namespaces_need_an_explicit_allow() {
        let mut p = policy();
        for allowed in [vec!["*"], vec!["kube-*"], vec!["kube-*", "team-*"]] {
            p.allowed_namespaces = allowed.iter().map(|a| Pattern::parse(a).unwrap()).collect();
            for ns in PROTECTED_NAMESPACES {
                let mut s = spec();
                s.namespaces = vec![ns.to_string()];
                let e = p.check(&s).unwrap_err();
                assert_eq!(
                    e,
                    PolicyError::ProtectedNamespace {
                        value: ns.to_string()
                    },
                    "{allowed:?}"
                );
                let m = e.to_string();
                assert!(
                    m.contains(ns) && m.contains("allowed_namespaces") && m.contains("fix:"),
                    "{m}"
                );
            }
        }
        p.allowed_namespaces = vec![Pattern::Any, Pattern::parse("kube-system").unwrap()];
        let mut s = spec();
        s.namespaces = vec!["kube-system".into()];
        p.check(&s).expect("named exactly, kube-system is allowed");
        s.namespaces = vec!["kube-public".into()];
        assert!(p.check(&s).is_err(), "naming one does not allow the others");
        s.namespaces = vec!["kube-flannel".into()];
        p.check(&s)
            .expect("only the three namespaces Kubernetes runs in are protected");
    }

    #[test]
    fn generation_groups_are_distinct_per_generation_and_per_key() {
        let (k1, k2) = (b"key one".as_slice(), b"key two".as_slice());
        let g = generation_group("alice", 3, k1);
        assert!(g.starts_with("rotator:alice:3."), "{g}");
        assert_eq!(g.len(), "rotator:alice:3.".len() + GENERATION_SUFFIX_HEX);
        assert_ne!(
            generation_group("alice", 1, k1),
            generation_group("alice", 11, k1)
        );
        // The same generation number with another key (a restored database) is another group.
        assert_ne!(
            generation_group("alice", 3, k1),
            generation_group("alice", 3, k2)
        );
        assert_eq!(parse_generation_group("alice", &g), Some(3));
        assert_eq!(parse_generation_group("alice", "rotator:alice:3"), Some(3));
        assert_eq!(parse_generation_group("alice", "rotator:alice:3.xyz"), None);
        assert_eq!(parse_generation_group("al", &g), None);
        assert_eq!(parse_generation_group("alice", "rotator:alice:0"), None);
        assert_eq!(legacy_generation_group("alice", 3), "rotator:alice:3");
    }
}
