//! Where a rendered kubeconfig goes. `prepare` runs before any key exists, so
//! an unwritable target fails the command before anything is issued.
use std::io::Write;
use std::path::PathBuf;

use crate::exit::{Exit, ExitStatus};

#[derive(Debug, thiserror::Error)]
#[error("cannot deliver the kubeconfig to {target}: {reason}\nfix: {fix}")]
pub struct SinkError {
    pub target: String,
    pub reason: String,
    pub fix: &'static str,
}

impl ExitStatus for SinkError {
    fn exit(&self) -> Exit {
        Exit::Output
    }
}

pub trait Sink: Send {
    fn describe(&self) -> String;
    fn prepare(&self) -> Result<(), SinkError>;
    fn deliver(&mut self, kubeconfig: &str) -> Result<(), SinkError>;
}

/// A file written atomically with mode 0600.
#[derive(Debug, Clone)]
pub struct FileSink {
    pub path: PathBuf,
}

impl FileSink {
    fn err(&self, e: std::io::Error) -> SinkError {
        SinkError {
            target: self.path.display().to_string(),
            reason: e.to_string(),
            fix: "choose a path in an existing directory you can write to (or --out - for stdout)",
        }
    }
}

impl Sink for FileSink {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn prepare(&self) -> Result<(), SinkError> {
        crate::fsutil::check_writable_target(&self.path).map_err(|e| self.err(e))
    }
    fn deliver(&mut self, kubeconfig: &str) -> Result<(), SinkError> {
        crate::fsutil::write_private_atomic(&self.path, kubeconfig.as_bytes())
            .map_err(|e| self.err(e))
    }
}

/// Any writer: stdout for `--out -`, a buffer in tests.
pub struct WriterSink<W: Write + Send> {
    pub name: &'static str,
    pub writer: W,
}

impl<W: Write + Send> Sink for WriterSink<W> {
    fn describe(&self) -> String {
        self.name.to_string()
    }
    fn prepare(&self) -> Result<(), SinkError> {
        Ok(())
    }
    fn deliver(&mut self, kubeconfig: &str) -> Result<(), SinkError> {
        self.writer
            .write_all(kubeconfig.as_bytes())
            .and_then(|_| self.writer.flush())
            .map_err(|e| SinkError {
                target: self.name.to_string(),
                reason: e.to_string(),
                fix: "check that the output stream is open",
            })
    }
}
