//! `authd bench`: the load generator is a binary of its own, `authd-bench` (the `bench/`
//! crate: it starts mosquitto and worker processes and reads `/proc`, which the product
//! does not), built beside `authd`. This command runs it with the same arguments.

use std::ffi::OsString;
use std::process::Command;

use clap::Args;

use super::Failure;

/// Everything after `bench`, passed through (`--help` too).
#[derive(Args)]
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// Arguments of authd-bench; `authd bench --help` lists them.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<OsString>,
}

/// Becomes `authd-bench` (on Unix; elsewhere waits for it and exits with its status).
pub(super) fn run(args: BenchArgs) -> Result<(), Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::Unable(format!("cannot locate this executable: {e}")))?;
    let bench = exe.with_file_name(format!("authd-bench{}", std::env::consts::EXE_SUFFIX));
    if !bench.is_file() {
        return Err(Failure::Unable(format!(
            "{} not found: the load generator is built beside authd by `cargo build --release` \
             (target/release/) or `cargo build` (target/debug/)",
            bench.display()
        )));
    }
    let mut command = Command::new(&bench);
    command.args(&args.args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Replaced rather than waited for: Ctrl-C, the output and the exit status are then
        // authd-bench's own. `exec` returns only on failure.
        let e = command.exec();
        Err(Failure::Unable(format!("{}: {e}", bench.display())))
    }
    #[cfg(not(unix))]
    {
        let status = command
            .status()
            .map_err(|e| Failure::Unable(format!("{}: {e}", bench.display())))?;
        match status.code() {
            Some(0) => Ok(()),
            code => Err(Failure::Reported(
                code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1),
            )),
        }
    }
}
