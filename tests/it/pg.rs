//! One throwaway PostgreSQL server per test binary, on a Unix socket in a temp
//! directory, run as `nobody` (postgres refuses root), and a fresh database per
//! test. The server is stopped when the test binary exits, however it exits: a
//! reaper process waits on a pipe whose write end only this process holds, and
//! stops the server (and removes its directory) when the pipe closes.
//!
//! A test that must stop and start its server (connections lost mid-pass) gets
//! a [`private`] one of its own, on the same terms; the shared one is left alone.
//!
//! Without `initdb` the PostgreSQL variants say loudly that they did not run,
//! and fail when `ROTATOR_REQUIRE_ALL=1` (scripts/test sets it).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

pub struct Server {
    /// Socket directory (and the data directory's parent).
    pub dir: PathBuf,
    bin: PathBuf,
    /// The server's options (`pg_ctl -o`), for a restart.
    opts: String,
    /// Dropping it closes the reaper's pipe: the server stops, its directory goes.
    _reaper: Mutex<Child>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);
static SKIPPED: AtomicUsize = AtomicUsize::new(0);

const NOBODY: &str = "65534";

/// The directory holding initdb, pg_ctl and psql together: PATH, then Debian's
/// layout (`/usr/lib/postgresql/N/bin`, the newest).
fn bin_dir() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            if ["initdb", "pg_ctl", "psql"]
                .iter()
                .all(|b| d.join(b).is_file())
            {
                return Some(d);
            }
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|d| {
            ["initdb", "pg_ctl", "psql"]
                .iter()
                .all(|b| d.join(b).is_file())
        })
        .collect();
    found.sort();
    found.pop()
}

fn as_nobody(bin: &Path, prog: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(bin.join(prog));
    c
}

/// A new server. `durable`: fsync and synchronous commits on, as in
/// production; without, a crash (`stop -m immediate`) loses commits the client
/// was told were done, which only a server that is never crashed can afford.
fn start(durable: bool) -> Result<Server, String> {
    let bin = bin_dir().ok_or(
        "initdb not found on PATH or under /usr/lib/postgresql/*/bin (Debian package `postgresql`)",
    )?;
    let dir = tempfile::Builder::new()
        .prefix("rotator-pg-")
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
    let out = as_nobody(&bin, "initdb")
        .current_dir(&dir)
        .args(["-D", data.to_str().unwrap()])
        .args([
            "-U",
            "rotator",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
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
    let reaper = Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .args(["sh", "-c", &stop])
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("reaper: {e}"))?;
    let fast = if durable {
        ""
    } else {
        " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    };
    let opts = format!(
        "-k {} -c listen_addresses=''{fast} -c max_connections=300 -c shared_buffers=16MB",
        dir.display()
    );
    let server = Server {
        dir: dir.clone(),
        bin,
        opts,
        _reaper: Mutex::new(reaper),
    };
    server.start()?;
    Ok(server)
}

/// The server, started on first use.
pub fn server() -> Result<&'static Server, String> {
    SERVER
        .get_or_init(|| start(false))
        .as_ref()
        .map_err(Clone::clone)
}

/// A durable server of the caller's own, which it may [`Server::stop`] and
/// [`Server::start`] again; stopped and removed when dropped. `None` after
/// saying loudly that `test` did not run (as [`server_or_skip`]).
pub fn private(test: &str) -> Option<Server> {
    // Durable: it is crashed, and what it acknowledged must survive that.
    match start(true) {
        Ok(s) => Some(s),
        Err(why) => {
            skipped(test, &why);
            None
        }
    }
}

impl Server {
    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start(&self) -> Result<(), String> {
        let out = as_nobody(&self.bin, "pg_ctl")
            .current_dir(&self.dir)
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap(),
                "-o",
                &self.opts,
            ])
            .args(["-l", self.dir.join("log").to_str().unwrap(), "-w", "start"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
            return Err(format!(
                "pg_ctl start failed: {}{log}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// `pg_ctl stop -m MODE` (`fast`: sessions are terminated, a clean shutdown;
    /// `immediate`: as a crash, recovery at the next start), waiting until it is down.
    pub fn stop(&self, mode: &str) -> Result<(), String> {
        let out = as_nobody(&self.bin, "pg_ctl")
            .current_dir(&self.dir)
            .args(["-D", self.dir.join("data").to_str().unwrap()])
            .args(["-m", mode, "-w", "stop"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl stop -m {mode} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

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
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres:///{db}?host={}&user=rotator", self.dir.display())
    }
}

/// Whether every test must run (`ROTATOR_REQUIRE_ALL=1`).
pub fn require_all() -> bool {
    std::env::var("ROTATOR_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// The server for a PostgreSQL test, or `None` after saying loudly (on the real
/// stderr, past the test harness's capture) that `test` did not run. Panics
/// instead when every test must run.
pub fn server_or_skip(test: &str) -> Option<&'static Server> {
    match server() {
        Ok(s) => Some(s),
        Err(why) => {
            skipped(test, &why);
            None
        }
    }
}

/// Says loudly that `test` did not run, or panics when every test must run.
fn skipped(test: &str, why: &str) {
    if require_all() {
        panic!("PostgreSQL test {test} cannot run: {why} (ROTATOR_REQUIRE_ALL=1)");
    }
    let n = SKIPPED.fetch_add(1, Ordering::SeqCst) + 1;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "\n!!! PostgreSQL test {test} did NOT run: {why}\n!!! ({n} PostgreSQL tests skipped so far; install postgresql or run scripts/test, which also sets ROTATOR_REQUIRE_ALL=1)"
    );
}
