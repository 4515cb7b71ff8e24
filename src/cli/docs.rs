//! `rotator completions SHELL` and `rotator man`: generated from the clap
//! definitions, so they never drift from the real options.
use std::path::Path;

use anyhow::anyhow;
use clap::{CommandFactory, ValueEnum};

use super::{Cli, CliResult, Failure};
use crate::support::exit::Exit;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub fn completions(shell: Shell) -> CliResult {
    let mut cmd = Cli::command();
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(shell, &mut cmd, "rotator", &mut super::pipe::stdout());
    Ok(())
}

/// Without a directory: the page of `rotator` itself on stdout. With one: a
/// page per subcommand (`rotator-add-user.1`, ...) beside `rotator.1`.
pub fn man(dir: Option<&Path>) -> CliResult {
    let cmd = Cli::command();
    match dir {
        None => clap_mangen::Man::new(cmd)
            .render(&mut super::pipe::stdout())
            .map_err(|e| Failure::new(Exit::Output, anyhow!("cannot write the man page: {e}"))),
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| {
                Failure::new(
                    Exit::Output,
                    anyhow!(
                        "cannot create {}: {e}\nfix: give --dir a directory you may write",
                        d.display()
                    ),
                )
            })?;
            clap_mangen::generate_to(cmd, d).map_err(|e| {
                Failure::new(
                    Exit::Output,
                    anyhow!(
                        "cannot write man pages to {}: {e}\nfix: give --dir a directory you may write",
                        d.display()
                    ),
                )
            })
        }
    }
}
