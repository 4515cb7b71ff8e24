//! A throwaway PostgreSQL server for a benchmark run, on a Unix socket in a temp
//! directory, run as `nobody` (postgres refuses root), with a fresh database
//! per measurement. The same approach as the integration tests' harness (a
//! copy: benches do not depend on tests/), but with the server's durability
//! left at its defaults (fsync, synchronous_commit, full_page_writes on), so
//! the figures compare with SQLite's `synchronous=FULL`.
//!
//! The server stops when the benchmark exits, however it exits: a reaper
//! process waits on a pipe whose write end only this process holds.
//!
//! Without `initdb` the caller prints loudly that PostgreSQL was not measured.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Server {
    /// Socket directory (and the data directory's parent).
    pub dir: PathBuf,
    bin: PathBuf,
    _reaper: Child,
}

static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

const NOBODY: &str = "65534";

/// The directory holding initdb, pg_ctl and psql together: PATH, then Debian's
/// layout (`/usr/lib/postgresql/N/bin`, the newest).
fn bin_dir() -> Option<PathBuf> {
    let has_all = |d: &Path| {
        ["initdb", "pg_ctl", "psql"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Ok(path) = std::env::var("PATH")
        && let Some(d) = std::env::split_paths(&path).find(|d| has_all(d))
    {
        return Some(d);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| has_all(d))
        .collect();
    found.sort();
    found.pop()
}

fn as_nobody(prog: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(prog);
    c
}

/// Starts a server, or says why it cannot.
pub fn start() -> Result<Server, String> {
    let bin = bin_dir().ok_or(
        "initdb not found on PATH or under /usr/lib/postgresql/*/bin (Debian package `postgresql`)",
    )?;
    let dir = tempfile::Builder::new()
        .prefix("rotator-bench-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    let chown = Command::new("chown")
        .args([&format!("{NOBODY}:{NOBODY}"), dir.to_str().unwrap()])
        .status()
        .map_err(|e| e.to_string())?;
    if !chown.success() {
        return Err(format!("chown {} failed", dir.display()));
    }
    let data = dir.join("data");
    let out = as_nobody(&bin.join("initdb"))
        .current_dir(&dir)
        .args(["-D", data.to_str().unwrap()])
        .args(["-U", "rotator", "-A", "trust", "-E", "UTF8", "--locale=C"])
        .output()
        .map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // The reaper first, so a failed start is cleaned up too.
    let stop = format!(
        "read -r _; {pg_ctl} -D {data} stop -m immediate >/dev/null 2>&1; rm -rf {dir}",
        pg_ctl = bin.join("pg_ctl").display(),
        data = data.display(),
        dir = dir.display()
    );
    let reaper = as_nobody(Path::new("sh"))
        .args(["-c", &stop])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("reaper: {e}"))?;
    // BENCH_PG_SYNCHRONOUS_COMMIT=off measures what the commits' WAL flushes cost.
    let sync = std::env::var("BENCH_PG_SYNCHRONOUS_COMMIT").unwrap_or_else(|_| "on".into());
    if !["on", "off", "local", "remote_write", "remote_apply"].contains(&sync.as_str()) {
        return Err(format!(
            "BENCH_PG_SYNCHRONOUS_COMMIT={sync:?} is not a synchronous_commit value (on, off, local)"
        ));
    }
    let opts = format!(
        "-k {} -c listen_addresses='' -c max_connections=200 -c synchronous_commit={sync}",
        dir.display()
    );
    let out = as_nobody(&bin.join("pg_ctl"))
        .current_dir(&dir)
        .args(["-D", data.to_str().unwrap(), "-o", &opts])
        .args(["-l", dir.join("log").to_str().unwrap(), "-w", "start"])
        .stdout(Stdio::null())
        .output()
        .map_err(|e| format!("pg_ctl: {e}"))?;
    let server = Server {
        dir: dir.clone(),
        bin,
        _reaper: reaper,
    };
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        return Err(format!(
            "pg_ctl start failed: {}{log}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(server)
}

/// The server, or None after saying loudly that PostgreSQL is not measured.
pub fn start_or_say(bench: &str) -> Option<Server> {
    match start() {
        Ok(s) => Some(s),
        Err(why) => {
            eprintln!(
                "\n!!! {bench}: PostgreSQL was NOT measured: {why}\n!!! install the `postgresql` package; only SQLite's rows below are figures\n"
            );
            None
        }
    }
}

impl Server {
    /// `psql` as the superuser on database `db`.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", self.dir.to_str().unwrap(), "-U", "rotator", "-d", db])
            .args(["-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A new, empty database; its URL.
    pub fn create_database(&self) -> String {
        let name = format!("b{}", NEXT_DB.fetch_add(1, Ordering::SeqCst));
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres:///{db}?host={}&user=rotator", self.dir.display())
    }
}

/// The engines a benchmark compares.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        }
    }

    /// As BENCH_ENGINES names it.
    pub fn key(self) -> &'static str {
        match self {
            Engine::Sqlite => "sqlite",
            Engine::Postgres => "postgres",
        }
    }

    /// The config line that puts a fresh database on this engine (none for
    /// SQLite: the data directory's rotator.db).
    pub fn database_toml(self, pg: Option<&Server>) -> String {
        match (self, pg) {
            (Engine::Postgres, Some(s)) => format!("database_url = {:?}\n", s.create_database()),
            _ => String::new(),
        }
    }
}

/// The engines BENCH_ENGINES names (default both), PostgreSQL only when its
/// server runs.
pub fn engines(wanted: &str, pg: Option<&Server>) -> Vec<Engine> {
    [Engine::Sqlite, Engine::Postgres]
        .into_iter()
        .filter(|e| wanted.split(',').any(|w| w.trim() == e.key()))
        .filter(|e| *e == Engine::Sqlite || pg.is_some())
        .collect()
}
