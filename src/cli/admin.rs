//! add-user, rotate, revoke, remove-user, list-users, show.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use serde_json::json;

use super::output::{self, OutputFormat, time};
use super::{CliResult, Failure};
use crate::app::App;
use crate::delivery::{FileSink, Sink, WriterSink};
use crate::flows::issue::Issued;
use crate::flows::revoke;
use crate::pki::KeyType;
use crate::policy::UserSpec;
use crate::store::{credentials, users};
use crate::support::exit::Exit;

#[derive(Debug, Args)]
pub struct AddUserArgs {
    /// The user name (certificate CN; Kubernetes username).
    #[arg(required_unless_present = "from")]
    pub name: Option<String>,
    /// A group (certificate O). Repeat for several.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// A namespace to bind the role in. Repeat for several.
    #[arg(
        long = "namespace",
        short = 'n',
        value_name = "NS",
        required_unless_present_any = ["cluster_wide", "from"],
        conflicts_with = "cluster_wide"
    )]
    pub namespaces: Vec<String>,
    /// Bind the role cluster-wide with a ClusterRoleBinding (only if policy.allow_cluster_role_bindings).
    #[arg(long)]
    pub cluster_wide: bool,
    /// The ClusterRole to bind in each namespace (policy.allowed_roles).
    #[arg(long, required_unless_present = "from")]
    pub role: Option<String>,
    /// Certificate lifetime, such as 30m, 8h, 24h (default policy.default_ttl).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    /// Key algorithm (default policy.default_key_type).
    #[arg(long, value_parser = parse_key_type)]
    pub key_type: Option<KeyType>,
    /// Where to write the kubeconfig (mode 0600); "-" for stdout. Default ./NAME.kubeconfig.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Where the daemon delivers this user's reissued kubeconfigs: `dir` (the
    /// delivery directory, default) or `secret:NAMESPACE/NAME` in one of their
    /// namespaces (the first kubeconfig goes there too; rotator creates that
    /// Secret and refuses one that already exists), or `vault:MOUNT/PATH`, a KV v2
    /// secret in Vault (`{user}` in PATH is the user's name; field `kubeconfig`).
    #[arg(long, value_name = "TARGET", value_parser = crate::delivery::Target::parse)]
    pub deliver: Option<crate::delivery::Target>,
    /// Issue nothing now: print a one-time enrollment token (valid for
    /// server.enroll_token_ttl) with which the user's own machine makes its key
    /// and fetches a certificate (`rotator fetch --token`).
    #[arg(long, conflicts_with_all = ["out", "deliver"])]
    pub enroll: bool,
    /// End the user's revocation (audited) and add them again: without it a
    /// revoked user is refused. Not with --from: a bulk rerun never reinstates.
    #[arg(long)]
    pub reinstate: bool,
    /// Add every user of a CSV file ("-" for stdin), one row per user:
    /// name,namespaces,role,groups,ttl,delivery (README, "Bulk onboarding").
    /// Every row is checked before anything is issued.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["name", "groups", "namespaces", "cluster_wide", "role", "ttl", "out", "deliver", "enroll", "reinstate"]
    )]
    pub from: Option<PathBuf>,
    /// With --from: the directory for the kubeconfigs (NAME.kubeconfig) and
    /// enrollment tokens (NAME.token); created with mode 0700. Default: the
    /// current directory.
    #[arg(long, value_name = "DIR", requires = "from")]
    pub out_dir: Option<PathBuf>,
    /// With --from: check the whole file (shape, policy, duplicates, existing
    /// users) and issue nothing.
    #[arg(long, requires = "from")]
    pub dry_run: bool,
    /// With --from: how many users are onboarded at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256), requires = "from")]
    pub concurrency: u16,
}

fn parse_key_type(s: &str) -> Result<KeyType, String> {
    s.parse::<KeyType>().map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    pub name: String,
    /// Where to write the new kubeconfig (mode 0600); "-" for stdout. Default ./NAME.kubeconfig.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// End the user's revocation (audited) and issue a new credential: the
    /// only way a revoked user gets access again.
    #[arg(long)]
    pub reinstate: bool,
}

fn sink_for(name: &str, out: &Option<PathBuf>) -> Box<dyn Sink> {
    match out {
        Some(p) if p.as_os_str() == "-" => Box::new(WriterSink {
            name: "stdout",
            writer: std::io::stdout(),
        }),
        Some(p) => Box::new(FileSink { path: p.clone() }),
        None => Box::new(FileSink {
            path: PathBuf::from(format!("{name}.kubeconfig")),
        }),
    }
}

fn report_issued(out: OutputFormat, issued: &Issued, to_stdout_taken: bool) {
    let c = &issued.credential;
    let v = json!({
        "user": c.user_name, "generation": c.generation, "serial": c.serial, "fingerprint": c.fingerprint,
        "not_after": time(c.not_after), "kubeconfig": issued.delivered_to, "superseded": issued.superseded,
        "lifetime_note": issued.lifetime_note,
    });
    let text = match out {
        OutputFormat::Json => serde_json::to_string_pretty(&v).expect("json"),
        OutputFormat::Table => {
            let mut s = format!(
                "issued {} generation {} serial {}\n  valid until {}\n  kubeconfig  {}",
                c.user_name,
                c.generation,
                c.serial,
                time(c.not_after),
                issued.delivered_to
            );
            if !issued.superseded.is_empty() {
                s.push_str(&format!("\n  superseded  {}", issued.superseded.join(", ")));
            }
            if let Some(n) = &issued.lifetime_note {
                s.push_str(&format!("\n  note        {n}"));
            }
            s
        }
    };
    // With --out - the kubeconfig owns stdout; the report goes to stderr.
    if to_stdout_taken {
        eprintln!("{text}")
    } else {
        println!("{text}")
    }
}

pub async fn add_user(app: &App, a: &AddUserArgs, out: OutputFormat) -> CliResult {
    let policy = &app.settings.policy;
    let (Some(name), Some(role)) = (&a.name, &a.role) else {
        return Err(Failure::new(
            Exit::Usage,
            anyhow!(
                "add-user needs a NAME and --role\nfix: `rotator add-user NAME --role ROLE -n NS`, or --from FILE"
            ),
        ));
    };
    let spec = UserSpec {
        name: name.clone(),
        groups: a.groups.clone(),
        namespaces: if a.cluster_wide {
            vec![crate::policy::ALL_NAMESPACES.to_string()]
        } else {
            a.namespaces.clone()
        },
        role: role.clone(),
        key_type: a.key_type.unwrap_or(policy.default_key_type),
        ttl_seconds: a.ttl.unwrap_or(policy.default_ttl).as_secs(),
    };
    if let Some(crate::delivery::Target::Secret { namespace, .. }) = &a.deliver
        && (app.cluster.is_none() || !(spec.namespaces.contains(namespace) || a.cluster_wide))
    {
        return Err(Failure::new(
            Exit::Refused,
            anyhow!(
                "cannot deliver to a Secret in namespace {namespace:?}\nfix: Secret delivery needs the kubernetes signer and one of the user's namespaces"
            ),
        ));
    }
    if a.reinstate {
        reinstate(app, &spec.name, true).await?;
    }
    if a.enroll {
        return enroll(app, &spec, out).await;
    }
    let mut sink = match (&a.deliver, app.cluster.as_ref()) {
        (Some(crate::delivery::Target::Secret { namespace, name }), Some(cluster)) => {
            if a.out.is_some() {
                return Err(Failure::new(
                    Exit::Usage,
                    anyhow!(
                        "--out and --deliver secret:{namespace}/{name} both say where the kubeconfig goes\nfix: drop --out: the first kubeconfig goes to the Secret too"
                    ),
                ));
            }
            secret_target_usable(app, cluster, namespace, name, &spec.name).await?;
            Box::new(crate::delivery::SecretSink {
                cluster: cluster.clone(),
                store: app.store.clone(),
                namespace: namespace.clone(),
                name: name.clone(),
                user: spec.name.clone(),
            }) as Box<dyn Sink>
        }
        (Some(crate::delivery::Target::Vault { mount, path }), _) => {
            if a.out.is_some() {
                return Err(Failure::new(
                    Exit::Usage,
                    anyhow!(
                        "--out and --deliver vault:{mount}/{path} both say where the kubeconfig goes\nfix: drop --out: the first kubeconfig goes to Vault too"
                    ),
                ));
            }
            let Some(vault) = app.vault.clone() else {
                return Err(Failure::new(
                    Exit::Config,
                    anyhow!(
                        "--deliver vault:{mount}/{path} needs a Vault connection, but vault.address is not set\nfix: configure [vault] (address and auth method; README, \"Vault\")"
                    ),
                ));
            };
            // Before anything is issued: Vault must be reachable and rotator logged in.
            vault.probe().await?;
            Box::new(crate::vault::kv::VaultSink::new(
                vault, mount, path, &spec.name,
            )) as Box<dyn Sink>
        }
        _ => sink_for(&spec.name, &a.out),
    };
    let user = spec.name.clone();
    let issued = app
        .issuer()
        .add_user(spec, sink.as_mut(), &app.actor)
        .await?;
    if let Some(t) = &a.deliver {
        record_delivery(app, &user, t).await?;
    }
    report_issued(out, &issued, sink.describe() == "stdout");
    Ok(())
}

/// Records where the daemon delivers the user's reissued kubeconfigs.
pub(super) async fn record_delivery(
    app: &App,
    user: &str,
    t: &crate::delivery::Target,
) -> Result<(), crate::store::StoreError> {
    let now = app.clock.now();
    let mut tx = app.store.begin().await?;
    users::set_delivery(&mut tx, user, &t.as_string(), now).await?;
    crate::store::audit::append(
        &mut tx,
        now,
        &app.actor,
        "user.delivery",
        user,
        serde_json::json!({"target": t.as_string()}),
    )
    .await?;
    crate::store::commit(tx).await
}

/// Refuses, before anything is issued, a delivery Secret that rotator could not
/// write: one rotator's identity is not granted (exit 4; asked first, so the fix
/// is the grant), one that exists and is not rotator's (exit 6), or one rotator
/// made for another user (exit 6).
pub(super) async fn secret_target_usable(
    app: &App,
    cluster: &crate::cluster::Cluster,
    ns: &str,
    name: &str,
    user: &str,
) -> CliResult {
    let missing = match cluster.kubeconfig_secret_access(ns, name).await? {
        crate::cluster::SecretAccess::Granted => String::new(),
        crate::cluster::SecretAccess::NoCreate => format!("create Secrets in namespace {ns:?}"),
        crate::cluster::SecretAccess::NoUpdate => format!("update Secret {ns}/{name}"),
    };
    if !missing.is_empty() {
        return Err(Failure::new(
            Exit::Refused,
            anyhow!(
                "rotator's identity may not {missing}, so it cannot deliver kubeconfigs there\nfix: apply deploy/kubernetes/rbac-secret-delivery.yaml with DELIVERY_NAMESPACE={ns} and DELIVERY_SECRET={name} (README, \"Delivering kubeconfigs to a Secret\")"
            ),
        ));
    }
    match crate::delivery::delivery_secret(&app.store, ns, name).await? {
        Some((owner, _)) if owner != user => {
            return Err(Failure::new(
                Exit::Conflict,
                anyhow!(
                    "Secret {ns}/{name} already holds the kubeconfig of user {owner:?}\nfix: give {user:?} a Secret of their own (--deliver secret:{ns}/OTHER-NAME)"
                ),
            ));
        }
        // rotator made it for this user (a re-added user): it is replaced in place.
        Some(_) => {}
        None => cluster.kubeconfig_secret_free(ns, name, user).await?,
    }
    Ok(())
}

async fn enroll(app: &App, spec: &UserSpec, out: OutputFormat) -> CliResult {
    let created = crate::flows::enroll::add_user(app, spec).await?;
    print_token(app, spec, &created, out);
    crate::flows::enroll::delivered(app, &created.id, &spec.name, "stdout").await?;
    Ok(())
}

fn print_token(
    app: &App,
    spec: &UserSpec,
    created: &crate::flows::enroll::Created,
    out: OutputFormat,
) {
    let server = app
        .settings
        .server
        .public_url
        .clone()
        .unwrap_or_else(|| "https://ROTATOR-SERVER:8443".into());
    match out {
        OutputFormat::Json => output::json(&json!({
            "user": spec.name, "token": created.token.as_str(), "token_id": created.id,
            "expires_at": time(created.expires_at), "server": server,
        })),
        OutputFormat::Table => {
            println!(
                "enrolled {}: one-time token (shown once, valid until {}):\n\n  {}\n\non the user's machine:\n\n  rotator fetch --server {server} --token {}\n",
                spec.name,
                time(created.expires_at),
                created.token.as_str(),
                created.token.as_str(),
            );
            if app.settings.server.public_url.is_none() {
                println!("(set server.public_url to print the real server address here)");
            }
        }
    }
}

/// Ends a revocation on purpose (`--reinstate`); a user who was not revoked is
/// left as it is.
async fn reinstate(app: &App, name: &str, adding: bool) -> CliResult {
    match revoke::reinstate(app, name).await {
        Ok(true) => eprintln!("reinstated {name}: its revocation is over"),
        Ok(false) => {}
        // add-user --reinstate of a new (or removed) user: nothing to end.
        Err(revoke::LifecycleError::NoSuchUser(_)) if adding => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

pub async fn rotate(app: &App, a: &RotateArgs, out: OutputFormat) -> CliResult {
    let mut sink = sink_for(&a.name, &a.out);
    if a.reinstate {
        reinstate(app, &a.name, false).await?;
    }
    let issued = app
        .issuer()
        .rotate(&a.name, sink.as_mut(), &app.actor)
        .await?;
    report_issued(out, &issued, sink.describe() == "stdout");
    Ok(())
}

fn revoked_report(
    out: OutputFormat,
    verb: &str,
    user: &str,
    revoked: &[credentials::Credential],
    signer: &str,
) {
    match out {
        OutputFormat::Json => output::json(&json!({
            "user": user, "action": verb,
            "revoked": revoked.iter().map(|c| json!({"serial": c.serial, "generation": c.generation})).collect::<Vec<_>>(),
        })),
        OutputFormat::Table => {
            println!("{verb} {user}: {} credential(s) revoked", revoked.len());
            for c in revoked {
                println!("  generation {} serial {}", c.generation, c.serial);
            }
            if signer == "local-ca" && !revoked.is_empty() {
                println!(
                    "  note: the local-ca signer manages no RBAC bindings, so a revoked certificate keeps whatever \
                     the cluster grants its subject until it expires; rotator itself will no longer renew it"
                );
            }
        }
    }
}

pub async fn revoke(app: &App, name: &str, serial: Option<&str>, out: OutputFormat) -> CliResult {
    let revoked = revoke::revoke(app, name, serial).await?;
    revoked_report(out, "revoke", name, &revoked, app.signer.kind());
    if serial.is_none() && out == OutputFormat::Table {
        println!(
            "  {name} stays revoked: nothing is issued to them (rotate, renewal, bulk rerun, daemon) until `rotator rotate {name} --reinstate`"
        );
    }
    Ok(())
}

/// The STATE column: a revoked user says since when and by whom.
fn state_text(u: &users::User) -> String {
    match &u.revoked {
        Some(r) => format!("revoked {} by {}", time(r.at), r.by),
        None => u.state.clone(),
    }
}

pub async fn remove_user(app: &App, name: &str, out: OutputFormat) -> CliResult {
    let revoked = revoke::remove_user(app, name).await?;
    revoked_report(out, "remove-user", name, &revoked, app.signer.kind());
    Ok(())
}

pub async fn list_users(app: &App, all: bool, out: OutputFormat) -> CliResult {
    let users = users::list(&app.store, all).await?;
    let mut rows = Vec::new();
    let mut json_rows = Vec::new();
    for u in &users {
        let creds = credentials::list_for_user(&app.store, &u.spec.name).await?;
        let current = creds.iter().find(|c| c.state == "current");
        rows.push(vec![
            u.spec.name.clone(),
            state_text(u),
            u.spec.role.clone(),
            u.spec.namespaces.join(","),
            u.spec.groups.join(","),
            current
                .map(|c| c.serial.clone())
                .unwrap_or_else(|| "-".into()),
            current
                .map(|c| time(c.not_after))
                .unwrap_or_else(|| "-".into()),
        ]);
        json_rows.push(json!({"user": u, "current": current}));
    }
    match out {
        OutputFormat::Json => output::json(&json_rows),
        OutputFormat::Table => output::table(
            &[
                "NAME",
                "STATE",
                "ROLE",
                "NAMESPACES",
                "GROUPS",
                "CURRENT SERIAL",
                "NOT AFTER",
            ],
            &rows,
        ),
    }
    Ok(())
}

pub async fn show(app: &App, name: &str, out: OutputFormat) -> CliResult {
    let Some(u) = users::find(&app.store, name).await? else {
        return Err(Failure::new(
            Exit::NotFound,
            anyhow!(
                "no user {name:?}\nfix: `rotator list-users --all` shows every user rotator knows"
            ),
        ));
    };
    let creds = credentials::list_for_user(&app.store, name).await?;
    match out {
        OutputFormat::Json => output::json(&json!({"user": u, "credentials": creds})),
        OutputFormat::Table => {
            println!("user        {}", u.spec.name);
            println!("state       {}", state_text(&u));
            if u.revoked.is_some() {
                println!(
                    "            nothing is issued to {name} until `rotator rotate {name} --reinstate`"
                );
            }
            println!(
                "role        {} in {}",
                u.spec.role,
                u.spec.namespaces.join(", ")
            );
            println!(
                "groups      {}",
                if u.spec.groups.is_empty() {
                    "-".into()
                } else {
                    u.spec.groups.join(", ")
                }
            );
            println!(
                "key type    {}   ttl {}s",
                u.spec.key_type, u.spec.ttl_seconds
            );
            println!();
            let rows: Vec<Vec<String>> = creds
                .iter()
                .map(|c| {
                    vec![
                        c.generation.to_string(),
                        c.group(),
                        c.serial.clone(),
                        c.fingerprint.clone(),
                        time(c.not_after),
                        c.state.clone(),
                        c.state_reason.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            output::table(
                &[
                    "GEN",
                    "GROUP",
                    "SERIAL",
                    "SHA-256 FINGERPRINT",
                    "NOT AFTER",
                    "STATE",
                    "REASON",
                ],
                &rows,
            );
        }
    }
    Ok(())
}
