//! `rotator doctor`: every check, each with what is wrong and how to fix it.
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::anyhow;
use serde_json::json;

use super::output::{self, OutputFormat, time};
use super::{Cli, CliResult, Failure, actor, faults_from_env};
use crate::app::App;
use crate::cluster::findings::{Finding, Known, Severity};
use crate::config;
use crate::store::{audit, issuances};
use crate::support::clock::SystemClock;
use crate::support::exit::{Exit, ExitStatus};

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    exit: Exit,
}

fn mode_of(p: &std::path::Path) -> Option<u32> {
    std::fs::metadata(p)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

/// Whether a key file is readable by its owner alone, and what to say about it.
fn private_file(k: &std::path::Path, note: &str) -> (bool, String) {
    if let Some(Ok(r)) = crate::vault::VaultRef::from_path(k) {
        return (true, format!("in Vault, {r} (held in memory only{note})"));
    }
    match mode_of(k) {
        Some(0o600) | Some(0o400) => (true, format!("{} (mode 600{note})", k.display())),
        m => (
            false,
            format!(
                "{} has mode {:o}; fix: chmod 600 {}",
                k.display(),
                m.unwrap_or(0),
                k.display()
            ),
        ),
    }
}

/// Whether a directory or file rotator owns is closed to group and others now,
/// and what it was before this run repaired it.
fn owner_only(p: &std::path::Path, want: u32, before: Option<u32>) -> (bool, String) {
    let shown = p.display();
    match mode_of(p) {
        Some(m) if m & 0o077 != 0 => (
            false,
            format!(
                "{shown} has mode {m:03o}: group or others may use it; fix: chmod {want:o} {shown}"
            ),
        ),
        Some(m) => match before {
            Some(b) if b != m => (
                true,
                format!("{shown} (mode {m:03o}; it was {b:03o} and was repaired now)"),
            ),
            _ => (true, format!("{shown} (mode {m:03o})")),
        },
        None => (false, format!("{shown} is missing")),
    }
}

/// `local_ca.socket`: the signer answers, and its CA is the configured one.
async fn signer_socket(socket: &Path, ca: &crate::config::LocalCaSettings) -> (bool, String) {
    use crate::signer::local_ca::socket::{SocketSigner, call, check_same_ca};
    let shown = socket.display();
    match call(socket, "GET", "/healthz", Vec::new()).await {
        Ok((200, _)) => {}
        Ok((status, _)) => return (false, format!("{shown}: /healthz answered {status}")),
        Err(e) => {
            return (
                false,
                format!(
                    "{shown}: {e}; fix: start `rotator signer` and check that this user may open the socket"
                ),
            );
        }
    }
    let signer_ca = match SocketSigner::fetch_ca(socket).await {
        Ok(c) => c,
        Err(e) => return (false, e.to_string()),
    };
    if !ca.configured {
        return (true, format!("{shown} answers; CA taken from the signer"));
    }
    match std::fs::read_to_string(&ca.cert_file)
        .map_err(|e| e.to_string())
        .and_then(|want| check_same_ca(&signer_ca, &want, &ca.cert_file).map_err(|e| e.to_string()))
    {
        Ok(()) => (
            true,
            format!("{shown} answers; its CA is {}", ca.cert_file.display()),
        ),
        Err(e) => (false, e),
    }
}

/// With `local_ca.socket`, this process must not be able to read the CA key.
fn key_unreadable(key: &Path) -> (bool, String) {
    let shown = key.display();
    match std::fs::File::open(key) {
        Ok(_) => (
            false,
            format!(
                "{shown} is readable by this process (uid {}); fix: make the key readable only by the signer's user (0600, its own uid) so a compromised daemon cannot take it",
                uid()
            ),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            (true, format!("{shown} does not exist here"))
        }
        Err(e) => (
            true,
            format!(
                "{shown} cannot be opened by this process (uid {}): {e}",
                uid()
            ),
        ),
    }
}

fn uid() -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// The check that carries the cluster's grant findings.
const GRANTS_CHECK: &str = "grants outside rotator";

/// The API server's authorization configuration rotator ships.
const SHIPPED_AUTHZ: &str = include_str!("../../deploy/authz/authorization-config.yaml");

/// Whether the API server asks the webhook, as far as this host can tell, and
/// the revocation latency its configuration implies.
fn authz_check(a: &crate::config::AuthzSettings) -> (bool, String) {
    let refresh = humantime::format_duration(a.refresh_interval);
    let listen = match a.listen {
        Some(l) => format!("serve listens on {l}"),
        None => "off (authz.listen / serve --authz-addr not set)".into(),
    };
    let client = if a.client_ca_file.is_some() || a.listen.is_none() {
        String::new()
    } else {
        "; authz.client_ca_file is not set, so any client may ask it".into()
    };
    let Some(path) = &a.apiserver_config else {
        // The figure of the file rotator ships, read from it: never a copy that drifts.
        let shipped = crate::daemon::authz::setup::inspect(SHIPPED_AUTHZ, a.refresh_interval)
            .ok()
            .and_then(|s| s.latency)
            .map(|l| format!(" within {}", humantime::format_duration(l)))
            .unwrap_or_default();
        return (
            true,
            format!(
                "{listen}{client}; cannot tell whether the API server asks it (set authz.apiserver_config to its --authorization-config file to check); with deploy/authz/authorization-config.yaml a revocation refuses its certificate{shipped} (its unauthorizedTTL + refresh {refresh})"
            ),
        );
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return (
                false,
                format!(
                    "{listen}; cannot read authz.apiserver_config {}: {e}; fix: point it at the API server's --authorization-config file, or unset it",
                    path.display()
                ),
            );
        }
    };
    match crate::daemon::authz::setup::inspect(&text, a.refresh_interval) {
        Ok(s) => (
            s.ok && a.listen.is_some(),
            format!(
                "{listen}{client}; {}: {}",
                path.display(),
                s.notes.join("; ")
            ),
        ),
        Err(e) => (
            false,
            format!(
                "{listen}; {}: {e}; fix: point authz.apiserver_config at the API server's AuthorizationConfiguration",
                path.display()
            ),
        ),
    }
}

/// On a database several hosts share, what the audit head checkpoint (a file,
/// deliberately outside the database) can vouch for: each process moves the
/// checkpoint it is configured with after its own commits only.
fn shared_checkpoint_note(s: &crate::config::Settings) -> Option<String> {
    if s.database.engine() != crate::store::Engine::Postgres {
        return None;
    }
    let cp = &s.audit.checkpoint_file;
    Some(if cp.starts_with(&s.data_dir) {
        format!(
            "{} is in this host's data directory, but the database is PostgreSQL: every other daemon or admin host keeps its own checkpoint, moved only by its own commits, so this one vouches for the chain only up to the last event written from here: `audit verify` here reports checkpoint_old whenever another host wrote last, and cannot tell a deletion of the others' last events from their not having been written; fix: put audit.checkpoint_file (with audit.key_file) on storage every rotator process on this database shares (deploy/components/ha-postgres mounts the ReadWriteMany volume rotator-shared), or run `rotator audit verify` from the host whose checkpoint is the newest",
            cp.display()
        )
    } else {
        format!(
            "{} is outside the data directory: every rotator process on this PostgreSQL database must use this same file (shared storage with flock, e.g. the rotator-shared volume of deploy/components/ha-postgres); a process with a checkpoint of its own vouches only for the events it wrote",
            cp.display()
        )
    })
}

pub async fn run(cli: &Cli, out: OutputFormat) -> CliResult {
    let mut findings: Vec<Finding> = Vec::new();
    let mut checks = Vec::new();
    let mut push = |name, ok, detail: String, exit| {
        checks.push(Check {
            name,
            ok,
            detail,
            exit,
        })
    };
    let settings = match config::load(cli.config.as_deref(), &cli.overrides(None)) {
        Ok(s) => s,
        Err(e) => return Err(e.into()),
    };
    push("config", true, settings.origin.clone(), Exit::Config);
    // Modes as they were before opening repairs them, so doctor can say so.
    let dir_mode_before = mode_of(&settings.data_dir);
    let db_mode_before = settings.database_file().and_then(|f| mode_of(&f));
    match App::open(settings, Arc::new(SystemClock), faults_from_env(), actor()).await {
        Err(e) => push("open", false, e.to_string(), e.exit()),
        Ok((app, _)) => {
            let s = &app.settings;
            let mut owned = vec![("data directory", s.data_dir.clone(), 0o700, dir_mode_before)];
            // File modes are SQLite's alone; a PostgreSQL server keeps its own files.
            if let Some(f) = s.database_file() {
                owned.push(("database file", f, 0o600, db_mode_before));
            }
            for (name, path, want, before) in owned {
                let (ok, detail) = owner_only(&path, want, before);
                push(name, ok, detail, Exit::Config);
            }
            push(
                "database",
                true,
                match s.database.engine() {
                    crate::store::Engine::Sqlite => format!("{} (integrity ok)", s.database),
                    crate::store::Engine::Postgres => {
                        format!("{} (PostgreSQL, schema current)", s.database)
                    }
                },
                Exit::Database,
            );
            let now = app.clock.now();
            match crate::pki::parse_cert_pem(app.signer.ca_bundle_pem(), "signer CA") {
                Ok(ca) => {
                    let days = (ca.not_after - now) / 86_400;
                    push(
                        "signer CA",
                        days >= 30,
                        format!(
                            "{} CN={} expires {} ({days} days){}",
                            app.signer.kind(),
                            ca.common_name,
                            time(ca.not_after),
                            if days < 30 {
                                "; fix: plan a CA rotation now"
                            } else {
                                ""
                            }
                        ),
                        Exit::Signer,
                    );
                }
                Err(e) => push("signer CA", false, e.to_string(), Exit::Signer),
            }
            if let Some(trust) = app.signer.check_trust().await {
                let ok = trust.is_ok();
                let detail = match trust {
                    Ok(d) => d,
                    Err(e) => format!(
                        "{e}; fix: import the cluster's client CA into the mount (pki/config/ca), or set kubernetes.client_ca_file to the CA the API server really trusts"
                    ),
                };
                push("vault CA trusted", ok, detail, Exit::Signer);
            }
            if app.signer.kind() == "vault-pki" {
                let (ok, detail) =
                    super::doctor_vault::signing_token(s, app.vault.as_deref()).await;
                push("vault signing token", ok, detail, Exit::Config);
            }
            if let Some(socket) = s
                .local_ca
                .socket
                .clone()
                .filter(|_| app.signer.kind() == "local-ca")
            {
                let (ok, detail) = signer_socket(&socket, &s.local_ca).await;
                push("signer socket", ok, detail, Exit::Signer);
                if s.local_ca.configured {
                    let (ok, detail) = key_unreadable(&s.local_ca.key_file);
                    push("CA key unreadable", ok, detail, Exit::Config);
                }
            } else if app.signer.kind() == "local-ca" {
                let (ok, detail) = private_file(&s.local_ca.key_file, "");
                push("CA key file", ok, detail, Exit::Config);
            }
            let (ok, detail) =
                private_file(&s.sealing.key_file, &format!(", key {}", app.sealing.id()));
            push("sealing key file", ok, detail, Exit::Config);
            let (ok, detail) = private_file(&s.audit.key_file, "");
            push("audit key file", ok, detail, Exit::Config);
            if let Some(v) = &app.vault {
                let (ok, detail) = match v.probe().await {
                    Ok(()) => (
                        true,
                        format!("{} (auth {})", v.address(), v.settings().auth.method()),
                    ),
                    Err(e) => (false, e.to_string()),
                };
                push("vault", ok, detail, Exit::Config);
            }
            let ep = app.endpoint.clone();
            let checked = ep.source != "local-ca defaults" || s.cluster.server.is_some();
            let verdict = if checked {
                let (server, ca) = (ep.server.clone(), ep.ca_pem.clone());
                tokio::task::spawn_blocking(move || crate::cluster::check_server_ca(&server, &ca))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            } else {
                Ok(())
            };
            match verdict {
                Ok(()) => push(
                    "kubeconfig endpoint",
                    true,
                    format!(
                        "{} from {}{}",
                        ep.server,
                        ep.source,
                        if checked {
                            "; its CA verifies the server"
                        } else {
                            "; not checked (no cluster configured)"
                        }
                    ),
                    Exit::Config,
                ),
                Err(e) => push(
                    "kubeconfig endpoint",
                    false,
                    format!(
                        "{} from {}: {e}; fix: set cluster.server and cluster.ca_file to what users must use",
                        ep.server, ep.source
                    ),
                    Exit::Config,
                ),
            }
            if let Some(cluster) = &app.cluster {
                let users = crate::store::users::list(&app.store, false).await?;
                let names: Vec<String> = users.iter().map(|u| u.spec.name.clone()).collect();
                let mut groups: Vec<String> =
                    users.iter().flat_map(|u| u.spec.groups.clone()).collect();
                groups.sort();
                groups.dedup();
                match cluster.direct_grants(&names, &groups).await {
                    Ok(g) if g.is_empty() => push(
                        "direct grants",
                        true,
                        "no binding outside rotator names a user or their groups".into(),
                        Exit::Conflict,
                    ),
                    Ok(g) => push(
                        "direct grants",
                        false,
                        format!(
                            "these survive a revocation: {}; fix: grant through rotator instead, or remove them",
                            g.iter()
                                .map(|d| format!("{} -> {} ({})", d.binding, d.subject, d.role))
                                .collect::<Vec<_>>()
                                .join("; ")
                        ),
                        Exit::Conflict,
                    ),
                    Err(e) => push("direct grants", false, e.to_string(), e.exit()),
                }
                let known = Known {
                    users: names,
                    denied_groups: s.policy.denied_groups.clone(),
                    tokens: crate::store::bootstrap_tokens::list(&app.store)
                        .await?
                        .into_iter()
                        .filter(|t| t.state == "active" || t.state == "creating")
                        .map(|t| t.id)
                        .collect(),
                };
                match cluster.grant_findings(&known).await {
                    Ok(f) => {
                        let fails = f.iter().filter(|f| f.severity == Severity::Fail).count();
                        let detail = if f.is_empty() {
                            "no binding or bootstrap token outside this rotator's control".into()
                        } else {
                            format!(
                                "{fails} to act on, {} to review (below; `--output json` lists them under \"findings\")",
                                f.len() - fails
                            )
                        };
                        push(GRANTS_CHECK, fails == 0, detail, Exit::Conflict);
                        findings = f;
                    }
                    Err(e) => push(GRANTS_CHECK, false, e.to_string(), e.exit()),
                }
                // Each active user's bindings could be written now (a server-side
                // dry run): a namespace deleted since, or a role rotator may no
                // longer bind, shows here before a rotation fails on it.
                let mut unbindable = Vec::new();
                for u in users.iter().filter(|u| u.state == "active") {
                    let scope = crate::cluster::rbac::Scope::of(&u.spec.namespaces);
                    if let Err(e) = cluster
                        .check_user_bindings(&u.spec.name, &scope, &u.spec.role)
                        .await
                    {
                        let e = e.to_string();
                        unbindable.push(format!(
                            "{}: {}",
                            u.spec.name,
                            e.lines().next().unwrap_or_default()
                        ));
                    }
                }
                push(
                    "user bindings",
                    unbindable.is_empty(),
                    if unbindable.is_empty() {
                        format!(
                            "every active user's RoleBindings can be written ({} users)",
                            users.len()
                        )
                    } else {
                        format!(
                            "rotations of these users fail before signing until fixed: {}; fix: create the namespace (or remove-user and add-user with others), or grant rotator `bind` on the role",
                            unbindable.join("; ")
                        )
                    },
                    Exit::Conflict,
                );
            }
            match audit::verify(&app.store).await {
                Ok(r) => match r.first_break {
                    None => push(
                        "audit chain",
                        true,
                        format!(
                            "{} events intact ({} keyed), checkpoint at event {} ({})",
                            r.events,
                            r.keyed,
                            r.checkpoint.unwrap_or_default(),
                            app.settings.audit.checkpoint_file.display()
                        ),
                        Exit::AuditBroken,
                    ),
                    Some(b) => push(
                        "audit chain",
                        false,
                        format!(
                            "broken at event {} ({}): {}",
                            b.seq,
                            b.kind.name(),
                            b.reason
                        ),
                        Exit::AuditBroken,
                    ),
                },
                Err(e) => push("audit chain", false, e.to_string(), e.exit()),
            }
            if let Some(ring) = app.store.audit_keyring().cloned() {
                // What a commit's checkpoint write needs: a write that fails
                // leaves the change committed and the checkpoint behind.
                let shown = ring.checkpoint_path().display().to_string();
                let r = tokio::task::spawn_blocking(move || ring.probe_writable())
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
                let ok = r.is_ok();
                push(
                    "audit checkpoint writable",
                    ok,
                    match r {
                        Ok(()) => format!("{shown} can be replaced atomically under its lock"),
                        Err(e) => format!(
                            "{shown}: {e}; until then every commit leaves the checkpoint behind (the change itself is committed; `audit verify` reports checkpoint_old), and the first commit after the fix moves it forward"
                        ),
                    },
                    Exit::Config,
                );
            }
            if let Some(detail) = shared_checkpoint_note(s) {
                push("audit checkpoint", true, detail, Exit::Config);
            }
            let (ok, detail) = authz_check(&app.settings.authz);
            push("authorization webhook", ok, detail, Exit::Config);
            let mut conn = app.store.conn().await?;
            let open = issuances::open_for_user(&mut conn, None).await?;
            push(
                "interrupted issuances",
                true,
                if open.is_empty() {
                    "none".into()
                } else {
                    format!(
                        "{} (they are abandoned and redone by the next rotate or add-user of that user)",
                        open.len()
                    )
                },
                Exit::Internal,
            );
        }
    }
    match out {
        OutputFormat::Json => output::json(
            &checks
                .iter()
                .map(|c| {
                    let mut v = json!({"check": c.name, "ok": c.ok, "detail": c.detail});
                    if c.name == GRANTS_CHECK {
                        v["findings"] = json!(findings);
                    }
                    v
                })
                .collect::<Vec<_>>(),
        ),
        OutputFormat::Table => {
            let mut rows: Vec<Vec<String>> = Vec::new();
            for c in &checks {
                rows.push(vec![
                    c.name.to_string(),
                    if c.ok { "ok".into() } else { "FAIL".into() },
                    c.detail.clone(),
                ]);
                if c.name == GRANTS_CHECK {
                    for f in &findings {
                        rows.push(vec![
                            format!("  {}", f.kind),
                            match f.severity {
                                Severity::Fail => "FAIL".into(),
                                Severity::Warn => "warn".into(),
                            },
                            format!("{} {}; fix: {}", f.object, f.problem, f.fix),
                        ]);
                    }
                }
            }
            output::table(&["CHECK", "STATUS", "DETAIL"], &rows);
        }
    }
    match checks.iter().find(|c| !c.ok) {
        None => Ok(()),
        Some(c) => Err(Failure::new(
            c.exit,
            anyhow!("doctor: check {:?} failed: {}", c.name, c.detail),
        )),
    }
}
