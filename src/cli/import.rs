//! `authd import`: bulk provisioning into a stopped worker's store, or a dump of `authd
//! export` moved in ([`crate::import`]).

use std::io::BufReader;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::progress::{per_second, seconds, Progress, Unit};
use super::Failure;
use crate::config::Config;
use crate::import::{import_observed, ImportReport};
use crate::secret::Secret;

/// The file to import, and where the data directory and store are. `data` and `store` are
/// configuration keys, so this struct is the flag layer over the file.
#[derive(Args, Serialize)]
#[command(
    after_help = "A file whose first line is the header of `authd export` ({\"authd_export\":1,…}) is a dump: its records are restored as they are, 1000 to a transaction (entities with their PSK hashes and certificates, tokens, which keep working, rules under their ids, the next rule id). The server key file in --data must hold every key id of the header: copy server.key from the old data directory first. Importing the same dump again changes nothing."
)]
pub struct ImportArgs {
    /// JSON lines file; `-` reads standard input.
    #[serde(skip)]
    file: PathBuf,
    /// TOML configuration file (for `data`, `store` and `cache_mib`).
    #[arg(long, env = "AUTHD_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory of the (stopped) worker: its server key, and its database unless
    /// --store names another.
    #[arg(long, env = "AUTHD_DATA")]
    data: Option<PathBuf>,
    /// The store to import into, as `authd serve --store`: postgres://USER@HOST[:PORT]/DB
    /// [default: the embedded database in --data]. Prefer AUTHD_STORE when the URL holds a
    /// password.
    #[arg(long, value_name = "URL", env = "AUTHD_STORE", hide_env_values = true)]
    store: Option<Secret>,
}

/// Exit 0 when every line applied, 1 when some were refused (each listed on stderr), 2 when
/// the import could not run. On a terminal, progress on stderr while it runs (see
/// [`super::progress`]); then one summary line on stdout.
pub(super) async fn run(args: ImportArgs) -> Result<(), Failure> {
    // Of the environment, only AUTHD_DATA, AUTHD_STORE and AUTHD_CONFIG count (through
    // clap): the other variables are the running worker's.
    let config = Config::load(args.config.as_deref(), |_| None, &args).map_err(Failure::unable)?;
    // Position: bytes read; the total, for a file, its size (stdin: unknown).
    let (progress, report) = if args.file.as_os_str() == "-" {
        let progress = Progress::start(None, Unit::Bytes);
        let input = BufReader::new(progress.wrap_read(std::io::stdin()));
        let report = import_observed(&config, input, show(&progress)).await;
        (progress, report)
    } else {
        let file = std::fs::File::open(&args.file)
            .map_err(|e| Failure::Unable(format!("{}: {e}", args.file.display())))?;
        let size = file.metadata().ok().map(|m| m.len());
        let progress = Progress::start(size, Unit::Bytes);
        let input = BufReader::new(progress.wrap_read(file));
        let report = import_observed(&config, input, show(&progress)).await;
        (progress, report)
    };
    let elapsed = progress.finish();
    let report = report.map_err(Failure::unable)?;
    for (line, error) in &report.errors {
        eprintln!("line {line}: {error}");
    }
    let lines = report.applied + report.refused;
    println!(
        "{} applied, {} refused in {} ({})",
        report.applied,
        report.refused,
        seconds(elapsed),
        per_second(lines, elapsed, "lines")
    );
    match report.refused {
        0 => Ok(()),
        _ => Err(Failure::Reported(1)),
    }
}

/// Shows the counts so far beside the bar, every 256 lines (a message is a string to build).
fn show(progress: &Progress) -> impl FnMut(&ImportReport) + '_ {
    move |report| {
        let lines = report.applied + report.refused;
        if lines % 256 == 1 {
            progress.set_message(match report.refused {
                0 => format!("{} applied", report.applied),
                refused => format!("{} applied, {refused} refused", report.applied),
            });
        }
    }
}
