//! The `authd` command: parses the arguments and runs them (see [`authd::cli`]).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    authd::cli::run(authd::cli::Cli::parse())
}
