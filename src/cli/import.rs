//! `authd import`: bulk provisioning into a stopped worker's data directory
//! ([`crate::import`]).

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use super::Failure;
use crate::config::Config;

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
/// the import could not run.
pub(super) async fn run(args: ImportArgs) -> Result<(), Failure> {
    // Of the environment, only AUTHD_DATA and AUTHD_CONFIG count (through clap), as they
    // always have: the other variables are the running worker's.
    let config = Config::load(args.config.as_deref(), |_| None, &args).map_err(Failure::unable)?;
    let report = if args.file.as_os_str() == "-" {
        crate::import::import(&config, std::io::stdin().lock()).await
    } else {
        let file = std::fs::File::open(&args.file)
            .map_err(|e| Failure::Unable(format!("{}: {e}", args.file.display())))?;
        crate::import::import(&config, std::io::BufReader::new(file)).await
    }
    .map_err(Failure::unable)?;
    for (line, error) in &report.errors {
        eprintln!("line {line}: {error}");
    }
    println!("{} applied, {} refused", report.applied, report.refused);
    match report.refused {
        0 => Ok(()),
        _ => Err(Failure::Reported(1)),
    }
}
