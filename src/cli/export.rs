//! `authd export`: a stopped worker's store as JSON lines ([`crate::export`]), to move the
//! deployment with `authd import`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::progress::seconds;
use super::Failure;
use crate::config::Config;
use crate::crypto::ServerKeys;
use crate::export::{export, open_stopped, Exported};

/// Where the worker's data is, and where the dump goes. `data` is a configuration key, so
/// this struct is the flag layer over the file.
#[derive(Args, Serialize)]
#[command(after_help = "\
The dump holds every entity (kind, owner, disabled, created, PSK hash and server key id, \
certificate SHA-256), every live app token (user, host, token id, server key id, created), \
every rule under its id, and the next rule id; not the replay records, which only answer \
redeliveries to the stopped worker. It holds no secret: PSK hashes are keyed hashes, and a \
token id yields no token without the server key, which stays in the data directory and is \
NOT exported. Copy server.key from this data directory to the new one yourself, then run \
`authd import --data NEW [--store URL] FILE`.

Stop the worker first, cleanly (SIGTERM): the export refuses a database a worker holds.")]
pub struct ExportArgs {
    /// TOML configuration file (for `data` and `cache_mib`).
    #[arg(long, env = "AUTHD_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Data directory of the (stopped) worker.
    #[arg(long, env = "AUTHD_DATA")]
    data: Option<PathBuf>,
    /// Export from this PostgreSQL store (as `authd serve --store`) instead of the
    /// embedded database in --data: moving back out, or to another database.
    #[arg(long, env = "AUTHD_STORE", hide_env_values = true, value_name = "URL")]
    store: Option<crate::secret::Secret>,
    /// Where to write the dump: a file (owner-only; it appears only once complete) or `-`,
    /// standard output.
    #[arg(long, value_name = "FILE", default_value = "-")]
    #[serde(skip)]
    out: PathBuf,
}

/// Exit 0 when the whole dump is written; 2 when it could not be (nothing at `--out`).
/// One summary line on stderr: stdout may be the dump.
pub(super) async fn run(args: ExportArgs) -> Result<(), Failure> {
    // Of the environment, only AUTHD_DATA and AUTHD_CONFIG count (through clap), as for
    // `import`: the other variables are the running worker's.
    let config = Config::load(args.config.as_deref(), |_| None, &args).map_err(Failure::unable)?;
    let store = open_stopped(&config).await.map_err(Failure::unable)?;
    let started = Instant::now();
    let exported = if args.out.as_os_str() == "-" {
        export(&store, std::io::stdout())
            .await
            .map_err(Failure::unable)?
    } else {
        to_file(&args.out, &store).await?
    };
    let keys = exported
        .key_ids
        .iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let to = match args.out.as_os_str() == "-" {
        true => "standard output".to_owned(),
        false => args.out.display().to_string(),
    };
    eprintln!(
        "authd export: {} records to {to} in {}",
        exported.records,
        seconds(started.elapsed())
    );
    if !exported.key_ids.is_empty() {
        eprintln!(
            "authd export: they need server key {keys}: copy {} to the new data directory",
            ServerKeys::file_in(&config.data).display()
        );
    }
    Ok(())
}

/// Writes the dump to `FILE.part`, syncs it and renames it to `out`, so that a file at
/// `out` is always a whole dump. Owner-only (the umask is 077 once the data directory is
/// opened).
async fn to_file(out: &Path, store: &crate::store::Store) -> Result<Exported, Failure> {
    let mut name = out.file_name().unwrap_or_default().to_owned();
    name.push(".part");
    let part = out.with_file_name(name);
    let failed = |e: &dyn std::fmt::Display| {
        let _ = std::fs::remove_file(&part);
        Failure::Unable(format!("{}: {e}", out.display()))
    };
    let mut file = std::fs::File::create(&part).map_err(|e| failed(&e))?;
    let exported = export(store, &mut file).await.map_err(|e| failed(&e))?;
    let written = file
        .flush()
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&part, out))
        .and_then(|()| crate::durable::sync_parent(out));
    written.map_err(|e| failed(&e))?;
    Ok(exported)
}
