//! The command line: argument parsing, output, exit codes. `anyhow` lives here
//! and nowhere else; every library error carries its own exit code.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::App;
use crate::config::{self, Overrides, SignerKind};
use crate::flows::issue::{FaultPoint, Faults, IssueError, NoFaults};
use crate::support::clock::SystemClock;
use crate::support::exit::{Exit, ExitStatus};

mod admin;
mod audit;
mod bulk;
mod database;
mod docs;
mod doctor;
mod doctor_vault;
mod output;
mod pipe;
mod serve;
mod signer;
mod token;
mod user;

pub use output::OutputFormat;

#[derive(Debug, Parser)]
#[command(
    name = "rotator",
    version,
    about = "Short-lived, least-privilege, revocable Kubernetes client credentials"
)]
pub struct Cli {
    /// Config file (default: $ROTATOR_CONFIG, then config/rotator.toml, then built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the database and the local CA (overrides data_dir and ROTATOR_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Database: sqlite:///PATH or postgres://USER:PASSWORD@HOST/DB (overrides
    /// database_url and ROTATOR_DATABASE_URL; default DATA_DIR/rotator.db).
    #[arg(long, global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Signer for a new data directory: local-ca (default) or kubernetes. Recorded
    /// by the first command (usually `init`); later commands use the recorded one.
    #[arg(long, global = true, value_parser = parse_signer)]
    pub signer: Option<SignerKind>,
    /// Kubeconfig rotator uses to reach the cluster (kubernetes signer; default
    /// KUBECONFIG, ~/.kube/config, then the in-cluster service account). For
    /// `fetch`: the kubeconfig to merge the credential into.
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Output format for reports.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
    /// The audit keyrings this command opened, so that it can say at the end
    /// when one of its commits left the audit checkpoint behind.
    #[arg(skip)]
    pub(crate) keyrings: std::sync::Arc<std::sync::Mutex<Vec<Arc<crate::store::audit::Keyring>>>>,
}

fn parse_signer(s: &str) -> Result<SignerKind, String> {
    s.parse()
}

impl Cli {
    pub fn overrides(&self, metrics_addr: Option<String>) -> Overrides {
        Overrides {
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            api_addr: match &self.command {
                Command::Serve { api_addr, .. } => api_addr.clone(),
                _ => None,
            },
            authz_addr: match &self.command {
                Command::Serve { authz_addr, .. } => authz_addr.clone(),
                _ => None,
            },
            metrics_addr,
            signer: self.signer,
            kubeconfig: self.kubeconfig.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the data directory, database and (for local-ca) the CA. Idempotent.
    Init {
        /// Start a new, empty database in a data directory whose database was lost
        /// or emptied. The old one (if any) is moved aside, never deleted.
        /// Credentials issued before stay valid until their notAfter, and no
        /// generation group is ever reused, but rotator forgets them.
        #[arg(long)]
        new_database: bool,
    },
    /// Run the daemon: scheduled rotation, expiry and reconcile; health and metrics; the HTTPS user API.
    Serve {
        /// Address for health and metrics (overrides metrics_addr).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Address for the HTTPS user API (overrides server.listen; off when neither is set).
        #[arg(long, value_name = "ADDR")]
        api_addr: Option<String>,
        /// Address for the HTTPS authorization webhook (overrides authz.listen; off when neither is set).
        #[arg(long, value_name = "ADDR")]
        authz_addr: Option<String>,
    },
    /// Issue a first credential for a new user and write their kubeconfig.
    AddUser(admin::AddUserArgs),
    /// Remove a user and revoke every credential they hold.
    RemoveUser { name: String },
    /// List users and their current credential.
    ListUsers {
        /// Include removed users.
        #[arg(long)]
        all: bool,
    },
    /// Show one user and all their credentials.
    Show { name: String },
    /// Issue a new credential for a user; the old one is superseded once the new one is delivered.
    Rotate(admin::RotateArgs),
    /// Revoke a user's credentials (all live ones, or one by serial). Revoking
    /// a user is sticky: nothing is issued to them until `rotate --reinstate`.
    Revoke {
        name: String,
        /// Revoke only the credential with this serial (hex, as `show` prints it).
        #[arg(long)]
        serial: Option<String>,
    },
    /// Read or verify the hash-chained audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Bootstrap tokens in kube-system (kubernetes signer).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Check configuration, database, CA and audit chain; report what is wrong.
    Doctor,
    /// (user) Get a fresh credential from a rotator server and merge it into your
    /// kubeconfig (--kubeconfig, default $KUBECONFIG or ~/.kube/config). The key
    /// is made on this machine and never leaves it.
    Fetch(user::FetchArgs),
    /// (user) kubectl exec plugin: prints a client.authentication.k8s.io
    /// ExecCredential, renewing the cached credential when it is due.
    Credential(user::CredentialArgs),
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    Completions {
        #[arg(value_enum)]
        shell: docs::Shell,
    },
    /// Print the man page (roff) on stdout, or with --dir write one page per subcommand there.
    Man {
        /// Directory for rotator.1, rotator-add-user.1, ... (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Write a consistent copy of the database to FILE (mode 0600; never replaces
    /// a file) while the daemon runs, and verify it (integrity, audit chain).
    Backup {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Copies of the whole database: `database copy --to URL`.
    #[command(subcommand)]
    Database(database::DatabaseCommand),
    /// Run the local CA's signing process: the only process that opens the CA key.
    /// Listens on a Unix socket (HTTP/1.1 + JSON) and signs under its own policy.
    Signer(signer::SignerArgs),
}

/// A failure on its way out of the process: a message chain and an exit code.
pub struct Failure {
    pub exit: Exit,
    pub error: anyhow::Error,
}

impl<E: ExitStatus + std::error::Error + Send + Sync + 'static> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            exit: e.exit(),
            error: anyhow::Error::new(e),
        }
    }
}

impl Failure {
    pub fn new(exit: Exit, error: anyhow::Error) -> Self {
        Failure { exit, error }
    }
}

pub type CliResult<T = ()> = Result<T, Failure>;

/// `ROTATOR_FAULT=<point>:<error|abort|kill|sleep-MS>` makes an issuance fail at
/// that point: an error, SIGABRT, or a real SIGKILL of this process; or stall
/// there for MS milliseconds and go on (a slow step, for race tests). For
/// rotator's own crash tests; it can only make a command fail or slow, never
/// succeed.
struct EnvFaults {
    point: FaultPoint,
    mode: String,
}

impl Faults for EnvFaults {
    fn hit(&self, point: FaultPoint) -> Result<(), IssueError> {
        if point != self.point {
            return Ok(());
        }
        if let Some(ms) = self.mode.strip_prefix("sleep-")
            && let Ok(ms) = ms.parse::<u64>()
        {
            std::thread::sleep(std::time::Duration::from_millis(ms.min(60_000)));
            return Ok(());
        }
        match self.mode.as_str() {
            "abort" => std::process::abort(),
            "kill" => {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &std::process::id().to_string()])
                    .status();
                std::process::abort(); // not reached once the signal lands
            }
            _ => {}
        }
        Err(IssueError::Injected(point))
    }
}

fn faults_from_env() -> Arc<dyn Faults> {
    let Ok(v) = std::env::var("ROTATOR_FAULT") else {
        return Arc::new(NoFaults);
    };
    let (p, mode) = v.split_once(':').unwrap_or((v.as_str(), "error"));
    match FaultPoint::parse(p) {
        Some(point) => Arc::new(EnvFaults {
            point,
            mode: mode.to_string(),
        }),
        None => Arc::new(NoFaults),
    }
}

fn actor() -> String {
    use std::os::unix::fs::MetadataExt;
    // The environment can lie about USER; record the real uid beside it.
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid().to_string())
        .unwrap_or_else(|_| "?".into());
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(who) => format!("cli:{who}(uid {uid})"),
        Err(_) => format!("cli:uid {uid}"),
    }
}

/// The log filter: `ROTATOR_LOG` if set (rotator's own, so it wins), else
/// `RUST_LOG` (the ecosystem's), else `default`. A filter that does not parse is
/// named on stderr and the default used.
fn log_filter(
    env: &dyn Fn(&str) -> Option<String>,
    default: &str,
) -> tracing_subscriber::EnvFilter {
    use tracing_subscriber::EnvFilter;
    for var in ["ROTATOR_LOG", "RUST_LOG"] {
        if let Some(v) = env(var).filter(|v| !v.trim().is_empty()) {
            match EnvFilter::try_new(&v) {
                Ok(f) => return f,
                Err(e) => {
                    eprintln!(
                        "warning: {var}={v:?} is not a log filter ({e}); using {default:?}\nfix: write a filter such as \"info\" or \"rotator=debug,warn\""
                    );
                    break;
                }
            }
        }
    }
    EnvFilter::new(default)
}

fn init_tracing(format: LogFormat, default: &str) {
    // vaultrs and rustify log every Vault error response themselves; rotator's
    // own error says it once, with the fix.
    let default = format!("{default},vaultrs=off,rustify=off");
    let filter = log_filter(&|k| std::env::var(k).ok(), &default);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => Exit::Usage.into(),
            };
        }
    };
    let default_level = if matches!(cli.command, Command::Serve { .. } | Command::Signer(_)) {
        "info"
    } else {
        "warn"
    };
    init_tracing(cli.log_format, default_level);
    pipe::install();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return Exit::Internal.into();
        }
    };
    let result = rt.block_on(run(cli));
    // Do not wait for blocking threads still in a system call (a lookup of a
    // name that never answers, a write to a stuck file system): the command
    // is done, so the process ends now, whatever they do.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away: what failed was only the writing to it.
        Err(_) if pipe::closed() => ExitCode::from(pipe::EXIT_CLOSED),
        Err(f) => {
            // Every typed error already says its cause; the chain would repeat it.
            eprintln!("error: {}", f.error);
            f.exit.into()
        }
    }
}

pub(crate) async fn open_app(
    cli: &Cli,
    metrics_addr: Option<String>,
) -> CliResult<(App, crate::app::InitReport)> {
    let settings = config::load(cli.config.as_deref(), &cli.overrides(metrics_addr))?;
    let opened = App::open(settings, Arc::new(SystemClock), faults_from_env(), actor()).await?;
    cli.opened(&opened.0);
    Ok(opened)
}

impl Cli {
    /// Remembers `app`'s audit keyring, for what [`run`] says at the end.
    fn opened(&self, app: &App) {
        if let Some(ring) = app.store.audit_keyring() {
            let mut rings = self.keyrings.lock().unwrap_or_else(|e| e.into_inner());
            rings.push(ring.clone());
        }
    }
}

/// Runs the command. One whose change committed but whose audit checkpoint
/// write failed still succeeds (exit 0): the change stands, and a failure
/// would have a script run it again; it ends with a warning on stderr instead.
pub async fn run(cli: Cli) -> CliResult {
    let keyrings = cli.keyrings.clone();
    let result = run_command(cli).await;
    let rings = keyrings.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for ring in &rings {
        // A write whose commit's caller was dropped (a daemon job past its
        // stop grace) still runs in a task: let it end before the runtime
        // stops, which would drop it.
        if !ring
            .settle(crate::store::audit::Keyring::SETTLE_LIMIT)
            .await
        {
            eprintln!(
                "warning: an audit checkpoint write was still running after 5s (is {} on a hung file system?); `rotator audit verify` reports checkpoint_old until the next change",
                ring.checkpoint_path().display()
            );
        }
        if let Some(b) = ring.checkpoint_health().behind {
            eprintln!(
                "warning: the change is committed (and audited), but the audit checkpoint {} is behind it (event {}): {}\n`rotator audit verify` reports checkpoint_old until the next change any rotator process commits after the fix",
                ring.checkpoint_path().display(),
                b.seq,
                b.error
            );
        }
    }
    result
}

async fn run_command(cli: Cli) -> CliResult {
    let out = cli.output;
    match &cli.command {
        Command::Init { new_database } => {
            let settings = config::load(cli.config.as_deref(), &cli.overrides(None))?;
            let mode = if *new_database {
                crate::app::DatabaseMode::New
            } else {
                crate::app::DatabaseMode::Existing
            };
            let (app, report) = App::open_with(
                settings,
                Arc::new(SystemClock),
                faults_from_env(),
                actor(),
                mode,
            )
            .await?;
            cli.opened(&app);
            output::init_report(out, &report);
            app.store.close().await;
            Ok(())
        }
        Command::Serve { metrics_addr, .. } => {
            let (app, _) = open_app(&cli, metrics_addr.clone()).await?;
            serve::serve(app, || async {
                open_app(&cli, metrics_addr.clone()).await.map(|(a, _)| a)
            })
            .await
        }
        Command::AddUser(args) if args.from.is_some() => {
            bulk::run(open_app(&cli, None).await?.0, args, out).await
        }
        Command::AddUser(args) => admin::add_user(&open_app(&cli, None).await?.0, args, out).await,
        Command::RemoveUser { name } => {
            admin::remove_user(&open_app(&cli, None).await?.0, name, out).await
        }
        Command::ListUsers { all } => {
            admin::list_users(&open_app(&cli, None).await?.0, *all, out).await
        }
        Command::Show { name } => admin::show(&open_app(&cli, None).await?.0, name, out).await,
        Command::Rotate(args) => admin::rotate(&open_app(&cli, None).await?.0, args, out).await,
        Command::Revoke { name, serial } => {
            admin::revoke(&open_app(&cli, None).await?.0, name, serial.as_deref(), out).await
        }
        Command::Audit(cmd) => audit::run(&open_app(&cli, None).await?.0, cmd, out).await,
        Command::Token(cmd) => token::run(&open_app(&cli, None).await?.0, cmd, out).await,
        Command::Doctor => doctor::run(&cli, out).await,
        Command::Fetch(a) => user::fetch(a, cli.kubeconfig.as_ref(), out).await,
        Command::Credential(a) => user::credential(a).await,
        Command::Completions { shell } => docs::completions(*shell),
        Command::Man { dir } => docs::man(dir.as_deref()),
        Command::Signer(a) => signer::run(&cli, a).await,
        Command::Database(cmd) => database::run(&cli, cmd, out).await,
        Command::Backup { file } => {
            database::backup(&open_app(&cli, None).await?.0, file, out).await
        }
    }
}
