//! A closed stdout (`rotator audit log | head`) ends the command quietly, as
//! a Unix filter ends, with 141 (128 + SIGPIPE): never a panic with a
//! backtrace. Rust ignores SIGPIPE, so a write to a pipe whose reader went
//! away fails with EPIPE: `print!` panics on it, a writer returns it. Both are
//! caught here once for every command, not at each print.
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status of a command whose reader went away.
pub const EXIT_CLOSED: u8 = 141;

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a write to stdout found its reader gone.
pub fn closed() -> bool {
    CLOSED.load(Ordering::SeqCst)
}

/// Makes `print!`'s panic on a closed stdout (and any panic after a writer
/// found stdout closed) end the process quietly with [`EXIT_CLOSED`]; every
/// other panic goes to the hook that was there.
pub fn install() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
        if closed() || message.is_some_and(is_closed_stdout) {
            std::process::exit(EXIT_CLOSED.into());
        }
        previous(info)
    }));
}

/// std's message when `print!` meets EPIPE: "failed printing to stdout:
/// Broken pipe (os error 32)".
fn is_closed_stdout(message: &str) -> bool {
    message.starts_with("failed printing to stdout")
        && message.to_ascii_lowercase().contains("broken pipe")
}

/// Stdout for commands that stream through a writer: EPIPE is remembered, so
/// the error it becomes ends the command quietly in [`super::main`].
pub struct Stdout<W>(pub W);

pub fn stdout() -> Stdout<std::io::Stdout> {
    Stdout(std::io::stdout())
}

impl<W> Stdout<W> {
    fn seen<T>(r: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &r
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            CLOSED.store(true, Ordering::SeqCst);
        }
        r
    }
}

impl<W: Write> Write for Stdout<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Self::seen(self.0.write(buf))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Self::seen(self.0.flush())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prints_to_a_closed_stdout_are_recognised() {
        // What std prints, from the OS's own error text.
        let e = std::io::Error::from_raw_os_error(32);
        assert!(is_closed_stdout(&format!("failed printing to stdout: {e}")));
        let other = std::io::Error::from_raw_os_error(28);
        assert!(!is_closed_stdout(&format!(
            "failed printing to stdout: {other}"
        )));
        assert!(!is_closed_stdout(&format!(
            "failed printing to stderr: {e}"
        )));
        assert!(!is_closed_stdout("index out of bounds"));
    }
}
