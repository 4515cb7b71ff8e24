//! Bulk onboarding: the users of a CSV file (`rotator add-user --from FILE`),
//! read and validated as a whole before anything is issued.
//!
//! Columns, in this order: `name, namespaces, role, groups, ttl, delivery`.
//! `namespaces` and `groups` are `;`-separated (`*` alone: cluster-wide);
//! `groups`, `ttl` and `delivery` may be empty or left off. `delivery` is empty
//! (the kubeconfig goes to the output directory), `dir`, `secret:NS/NAME`,
//! `vault:MOUNT/PATH` (KV v2, `{user}` in PATH is the user's name) or `enroll`.
//! A first line starting with `name` is a header; lines starting with `#` are
//! comments.
use std::collections::HashMap;
use std::time::Duration;

use crate::delivery::Target;
use crate::pki::KeyType;
use crate::policy::{Policy, UserSpec};
use crate::support::exit::{Exit, ExitStatus};

pub const COLUMNS: [&str; 6] = ["name", "namespaces", "role", "groups", "ttl", "delivery"];

/// Where a row's first credential goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// A kubeconfig file in the output directory; the daemon's default delivery after.
    Default,
    /// A kubeconfig file in the output directory; the daemon delivers reissues to its directory.
    Dir,
    /// The Secret `namespace/name` (kubernetes signer).
    Secret { namespace: String, name: String },
    /// KV v2 `mount/path` in Vault (`{user}` in the path is the row's name).
    Vault { mount: String, path: String },
    /// An enrollment token; the user's machine makes the key.
    Enroll,
}

impl Delivery {
    pub fn as_str(&self) -> String {
        match self {
            Delivery::Default => String::new(),
            Delivery::Dir => "dir".into(),
            Delivery::Secret { namespace, name } => format!("secret:{namespace}/{name}"),
            Delivery::Vault { mount, path } => format!("vault:{mount}/{path}"),
            Delivery::Enroll => "enroll".into(),
        }
    }
    /// The delivery target recorded for the user, if the row names one.
    pub fn target(&self) -> Option<Target> {
        match self {
            Delivery::Default | Delivery::Enroll => None,
            Delivery::Dir => Some(Target::Directory),
            Delivery::Secret { namespace, name } => Some(Target::Secret {
                namespace: namespace.clone(),
                name: name.clone(),
            }),
            Delivery::Vault { mount, path } => Some(Target::Vault {
                mount: mount.clone(),
                path: path.clone(),
            }),
        }
    }
}

/// One valid row.
#[derive(Debug, Clone)]
pub struct Row {
    /// The line in the file (1-based).
    pub line: u64,
    pub spec: UserSpec,
    pub delivery: Delivery,
}

/// One thing wrong with one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: u64,
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for RowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, {}: {}", self.line, self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error(
        "cannot read {source_name}: {reason}\nfix: give --from a readable CSV file, or - for stdin"
    )]
    Read { source_name: String, reason: String },
    #[error("{source_name} holds no users\nfix: one line per user: {}", COLUMNS.join(","))]
    Empty { source_name: String },
    #[error(
        "{source_name}: {} row(s) are invalid, nothing was issued:\n{}\nfix: correct these rows (columns: {}) and run the command again",
        .errors.len(),
        .errors.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"),
        COLUMNS.join(",")
    )]
    Invalid {
        source_name: String,
        errors: Vec<RowError>,
    },
}

impl ExitStatus for BulkError {
    fn exit(&self) -> Exit {
        match self {
            BulkError::Read { .. } => Exit::Usage,
            BulkError::Empty { .. } | BulkError::Invalid { .. } => Exit::Refused,
        }
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(';')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Reads and validates every row: CSV shape, each field, the policy, and
/// duplicate names. Either all rows are valid or every problem is returned.
pub fn parse(
    source_name: &str,
    mut input: impl std::io::Read,
    policy: &Policy,
    key_type: Option<KeyType>,
) -> Result<Vec<Row>, BulkError> {
    let mut text = Vec::new();
    input.read_to_end(&mut text).map_err(|e| BulkError::Read {
        source_name: source_name.into(),
        reason: e.to_string(),
    })?;
    // Comment lines become empty ones (not dropped, as csv's own comment
    // support does), so that each record's line is its line in the file.
    let text: Vec<u8> = text
        .split(|b| *b == b'\n')
        .map(|l| {
            if l.trim_ascii_start().starts_with(b"#") {
                &[][..]
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join(&b'\n');
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_slice());
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut lines = Lines::new(&text);
    let mut first = true;
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map(|p| lines.at(p.byte())).unwrap_or(0);
                match e.kind() {
                    csv::ErrorKind::Io(_) => {
                        return Err(BulkError::Read {
                            source_name: source_name.into(),
                            reason: e.to_string(),
                        });
                    }
                    _ => errors.push(RowError {
                        line,
                        field: "row",
                        message: format!("not CSV: {e}"),
                    }),
                }
                continue;
            }
        };
        let line = record.position().map(|p| lines.at(p.byte())).unwrap_or(0);
        if first {
            first = false;
            if record
                .get(0)
                .is_some_and(|f| f.eq_ignore_ascii_case("name"))
            {
                continue; // a header
            }
        }
        if record.iter().all(|f| f.is_empty()) {
            continue;
        }
        match row(line, &record, policy, key_type) {
            Ok(r) => {
                if let Some(prev) = seen.get(&r.spec.name) {
                    errors.push(RowError {
                        line,
                        field: "name",
                        message: format!(
                            "user {:?} is already on line {prev}; one row per user",
                            r.spec.name
                        ),
                    });
                } else {
                    seen.insert(r.spec.name.clone(), line);
                    rows.push(r);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(BulkError::Invalid {
            source_name: source_name.into(),
            errors,
        });
    }
    if rows.is_empty() {
        return Err(BulkError::Empty {
            source_name: source_name.into(),
        });
    }
    Ok(rows)
}

/// Line numbers of byte offsets, counted as the parser goes: records come in
/// file order, so each count starts where the last one ended (counting from
/// the start for every record made a 100k-row file take minutes).
struct Lines<'a> {
    text: &'a [u8],
    /// Bytes before `counted` hold `newlines` newlines.
    counted: usize,
    newlines: u64,
}

impl<'a> Lines<'a> {
    fn new(text: &'a [u8]) -> Self {
        Self {
            text,
            counted: 0,
            newlines: 0,
        }
    }

    /// The 1-based line of the record starting at `byte` (csv's own line
    /// count skips empty lines).
    fn at(&mut self, byte: u64) -> u64 {
        let text = self.text;
        let mut at = (byte as usize).min(text.len());
        while at < text.len() && (text[at] == b'\n' || text[at] == b'\r') {
            at += 1;
        }
        if at < self.counted {
            // Never happens with csv's positions; stay right if it does.
            self.counted = 0;
            self.newlines = 0;
        }
        self.newlines += text[self.counted..at]
            .iter()
            .filter(|b| **b == b'\n')
            .count() as u64;
        self.counted = at;
        1 + self.newlines
    }
}

fn row(
    line: u64,
    record: &csv::StringRecord,
    policy: &Policy,
    key_type: Option<KeyType>,
) -> Result<Row, Vec<RowError>> {
    let err = |field: &'static str, message: String| RowError {
        line,
        field,
        message,
    };
    if record.len() < 3 || record.len() > COLUMNS.len() {
        return Err(vec![err(
            "row",
            format!(
                "{} field(s); a row has 3 to {} ({})",
                record.len(),
                COLUMNS.len(),
                COLUMNS.join(",")
            ),
        )]);
    }
    let field = |i: usize| record.get(i).unwrap_or("");
    let mut errors = Vec::new();
    let name = field(0).to_string();
    if name.is_empty() {
        errors.push(err("name", "empty".into()));
    }
    let namespaces = split_list(field(1));
    if namespaces.is_empty() {
        errors.push(err(
            "namespaces",
            "empty; name one or more namespaces separated by ';' (or * for cluster-wide)".into(),
        ));
    }
    let role = field(2).to_string();
    if role.is_empty() {
        errors.push(err("role", "empty".into()));
    }
    let groups = split_list(field(3));
    let ttl = match field(4) {
        "" => policy.default_ttl,
        t => match humantime::parse_duration(t) {
            Ok(d) => d,
            Err(e) => {
                errors.push(err(
                    "ttl",
                    format!("{t:?} is not a duration ({e}); write e.g. 8h or 30m"),
                ));
                Duration::ZERO
            }
        },
    };
    let delivery = match field(5) {
        "" => Delivery::Default,
        "enroll" => Delivery::Enroll,
        d => match Target::parse(d) {
            Ok(Target::Directory) => Delivery::Dir,
            Ok(Target::Secret { namespace, name }) => {
                if !namespaces.contains(&namespace)
                    && !namespaces
                        .iter()
                        .any(|n| n == crate::policy::ALL_NAMESPACES)
                {
                    errors.push(err(
                        "delivery",
                        format!(
                            "the Secret's namespace {namespace:?} is not one of the user's namespaces"
                        ),
                    ));
                }
                Delivery::Secret { namespace, name }
            }
            Ok(Target::Vault { mount, path }) => Delivery::Vault { mount, path },
            // The parser's own message says what is wrong with a vault: value.
            Err(e) if d.starts_with("vault:") => {
                errors.push(err("delivery", e));
                Delivery::Default
            }
            Ok(Target::Client) | Err(_) => {
                errors.push(err(
                    "delivery",
                    format!(
                        "{d:?} is not a delivery (empty, dir, secret:NAMESPACE/NAME, vault:MOUNT/PATH or enroll)"
                    ),
                ));
                Delivery::Default
            }
        },
    };
    let spec = UserSpec {
        name,
        groups,
        namespaces,
        role,
        key_type: key_type.unwrap_or(policy.default_key_type),
        ttl_seconds: ttl.as_secs(),
    };
    if errors.is_empty()
        && let Err(e) = policy.check(&spec)
    {
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default().to_string();
        errors.push(err(policy_field(&first), first));
    }
    if errors.is_empty() {
        Ok(Row {
            line,
            spec,
            delivery,
        })
    } else {
        Err(errors)
    }
}

/// The column a policy refusal is about, from its message.
fn policy_field(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("namespace") {
        "namespaces"
    } else if m.contains("group") {
        "groups"
    } else if m.contains("role") {
        "role"
    } else if m.contains("ttl") || m.contains("lifetime") || m.contains("duration") {
        "ttl"
    } else {
        "name"
    }
}

/// How bad a row's exit code is, for the command's own: the worst row wins.
pub fn severity(e: Exit) -> u8 {
    match e {
        Exit::Ok => 0,
        Exit::NotFound => 1,
        Exit::Refused => 2,
        Exit::Conflict => 3,
        Exit::Usage | Exit::Config => 4,
        Exit::Output => 5,
        Exit::Verification => 6,
        Exit::Unreachable => 7,
        Exit::Signer => 8,
        Exit::Database | Exit::AuditBroken => 9,
        Exit::Internal => 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        use crate::policy::{DENIED_GROUPS_DEFAULTS, Pattern, denied_group_patterns};
        Policy {
            allowed_roles: vec!["view".into(), "edit".into()],
            allowed_namespaces: vec![Pattern::Any],
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

    #[test]
    fn good_rows_with_header_and_comments() {
        let csv = "name,namespaces,role,groups,ttl,delivery\n# a comment\nalice,dev;ops,view,team-a;team-b,8h,dir\nbob,dev,edit\n";
        let rows = parse("t.csv", csv.as_bytes(), &policy(), None).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].line, 3);
        assert_eq!(rows[0].spec.namespaces, vec!["dev", "ops"]);
        assert_eq!(rows[0].spec.groups, vec!["team-a", "team-b"]);
        assert_eq!(rows[0].spec.ttl_seconds, 8 * 3600);
        assert_eq!(rows[0].delivery, Delivery::Dir);
        assert_eq!(rows[1].delivery, Delivery::Default);
        assert!(rows[1].spec.groups.is_empty());
    }

    #[test]
    fn a_vault_delivery_column_keeps_its_user_placeholder() {
        let csv = "alice,dev,view,,,vault:secret/kubeconfigs/{user}\nbob,dev,view,,,vault:secret\n";
        let Err(BulkError::Invalid { errors, .. }) =
            parse("t.csv", csv.as_bytes(), &policy(), None)
        else {
            panic!("must refuse bob's row")
        };
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!((errors[0].line, errors[0].field), (2, "delivery"));
        assert!(
            errors[0].message.contains("vault:MOUNT/PATH"),
            "{}",
            errors[0].message
        );
        let rows = parse(
            "t.csv",
            "alice,dev,view,,,vault:secret/kubeconfigs/{user}\n".as_bytes(),
            &policy(),
            None,
        )
        .unwrap();
        let d = &rows[0].delivery;
        assert_eq!(
            d,
            &Delivery::Vault {
                mount: "secret".into(),
                path: "kubeconfigs/{user}".into()
            }
        );
        assert_eq!(d.as_str(), "vault:secret/kubeconfigs/{user}");
        assert_eq!(
            d.target().map(|t| t.as_string()).as_deref(),
            Some("vault:secret/kubeconfigs/{user}")
        );
    }

    #[test]
    fn bad_rows_name_their_line_and_field() {
        let csv = "alice,dev,view\nbob,dev,view,,forever\ncarol,,view\nalice,dev,view\ndave,dev\nerin,dev,view,,,nowhere\n";
        let Err(BulkError::Invalid { errors, .. }) =
            parse("t.csv", csv.as_bytes(), &policy(), None)
        else {
            panic!("must refuse")
        };
        let got: Vec<(u64, &str)> = errors.iter().map(|e| (e.line, e.field)).collect();
        assert_eq!(
            got,
            vec![
                (2, "ttl"),
                (3, "namespaces"),
                (4, "name"),
                (5, "row"),
                (6, "delivery")
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn line_numbers_stay_right_deep_into_a_long_file() {
        // Blank lines, comments, CRLF endings and a quoted field that spans
        // two lines between the rows: each bad row is named by its own line.
        let mut csv = String::from("name,namespaces,role\n");
        let mut want = Vec::new();
        let mut line = 1;
        for i in 0..3000 {
            let (text, lines) = match i % 7 {
                0 => ("\n".to_string(), 1),
                1 => ("# a comment\r\n".to_string(), 1),
                2 => {
                    // Refused (a namespace has no newline), at its first line.
                    want.push((line + 1, "namespaces"));
                    (format!("u{i},\"dev\nops\",view\n"), 2)
                }
                3 => (format!("u{i},dev,view\r\n"), 1),
                _ if i % 500 == 4 => {
                    want.push((line + 1, "ttl"));
                    (format!("u{i},dev,view,,forever\n"), 1)
                }
                _ => (format!("u{i},dev,view\n"), 1),
            };
            csv.push_str(&text);
            line += lines;
        }
        csv.push_str("u-last,dev\n");
        want.push((line + 1, "row"));
        let Err(BulkError::Invalid { errors, .. }) =
            parse("t.csv", csv.as_bytes(), &policy(), None)
        else {
            panic!("must refuse")
        };
        let got: Vec<(u64, &str)> = errors.iter().map(|e| (e.line, e.field)).collect();
        assert_eq!(got, want, "{:?}", &errors[..3.min(errors.len())]);
    }
}
