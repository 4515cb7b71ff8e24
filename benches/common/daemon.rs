//! A real `rotator serve` process and its JSON log lines, read by a task into a
//! channel with the instant each arrived, so a benchmark can wait for a line
//! and time it. The minimal part of the integration tests' failover harness
//! (a copy: benches do not depend on tests/).
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

pub struct Daemon {
    pub child: tokio::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<(Instant, serde_json::Value)>,
    /// Every line read so far, for the panic message when one never comes.
    log: Vec<serde_json::Value>,
}

/// `rotator --config CONFIG --data-dir DATA serve` in `dir`, logging JSON, with
/// `env` (and no other ROTATOR_ variable from this process's environment).
pub fn spawn(dir: &Path, config: &Path, data: &str, env: &[(String, String)]) -> Daemon {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotator"));
    c.current_dir(dir);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("ROTATOR_")) {
        c.env_remove(k);
    }
    c.arg("--config")
        .arg(config)
        .args(["--data-dir", data, "serve", "--log-format", "json"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = c.spawn().expect("rotator serve");
    let mut raw = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(l)) = raw.next_line().await {
            let at = Instant::now();
            let v = serde_json::from_str(&l).unwrap_or(serde_json::json!({"raw": l}));
            if tx.send((at, v)).is_err() {
                break;
            }
        }
    });
    Daemon {
        child,
        lines,
        log: Vec::new(),
    }
}

impl Daemon {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Forgets the lines logged so far (what comes next is what is timed).
    pub fn drain(&mut self) {
        while let Ok((_, v)) = self.lines.try_recv() {
            self.log.push(v);
        }
    }

    /// Waits for a line whose message is one of `msgs`; when it arrived, and it.
    pub async fn wait_for(
        &mut self,
        msgs: &[&str],
        within: Duration,
    ) -> (Instant, serde_json::Value) {
        let found = tokio::time::timeout(within, async {
            while let Some((at, v)) = self.lines.recv().await {
                self.log.push(v.clone());
                if msgs.iter().any(|m| v["fields"]["message"] == *m) {
                    return Some((at, v));
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => v,
            Ok(None) => panic!("the daemon ended before {msgs:?}:\n{:#?}", self.log),
            Err(_) => panic!("no {msgs:?} within {within:?}:\n{:#?}", self.log),
        }
    }

    pub fn signal(&self, sig: &str) {
        std::process::Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
    }

    /// SIGKILL; the instant it was sent. The process is reaped by `reap`.
    pub fn kill9(&self) -> Instant {
        let at = Instant::now();
        self.signal("-KILL");
        at
    }

    pub async fn reap(mut self) -> std::process::ExitStatus {
        self.child.wait().await.unwrap()
    }

    /// SIGTERM and wait.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        if self.child.id().is_some() {
            self.signal("-TERM");
        }
        self.child.wait().await.unwrap()
    }
}
