//! Thin entry point: parse arguments, set up tracing, dispatch, map errors to exit codes.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    rotator::cli::main()
}
