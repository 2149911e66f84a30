//! `authd import`: bulk provisioning into a stopped worker's data directory
//! ([`crate::import`]).

use std::io::BufReader;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::progress::{per_second, seconds, Progress, Unit};
use super::Failure;
use crate::config::Config;
use crate::import::{import_observed, ImportReport};

/// The file to import, and where the data directory is. `data` is a configuration key,
/// so this struct is the flag layer over the file.
#[derive(Args, Serialize)]
pub struct ImportArgs {
    /// JSON lines file; `-` reads standard input.
    #[serde(skip)]
    file: PathBuf,
    /// TOML configuration file (for `data` and `cache_mib`).
    #[arg(long, env = "AUTHD_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory of the (stopped) worker.
    #[arg(long, env = "AUTHD_DATA")]
    data: Option<PathBuf>,
}

/// Exit 0 when every line applied, 1 when some were refused (each listed on stderr), 2 when
/// the import could not run. On a terminal, progress on stderr while it runs (see
/// [`super::progress`]); then one summary line on stdout.
pub(super) async fn run(args: ImportArgs) -> Result<(), Failure> {
    // Of the environment, only AUTHD_DATA and AUTHD_CONFIG count (through clap), as they
    // always have: the other variables are the running worker's.
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
