//! `authd key rotate|list`: the operator's side of server key rotation ([`crate::keys`]).

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use super::Failure;
use crate::config::{default_data_dir, Config};

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Add a fresh server key to `<data>/server.key` and print its id (never the key). The
    /// worker uses it after a restart; older keys keep verifying.
    Rotate {
        /// Data directory of the worker.
        #[arg(long, env = "AUTHD_DATA")]
        data: Option<PathBuf>,
    },
    /// For each server key id: whether it is in the key file, whether it is the newest, and
    /// how many PSK hashes and live tokens use it (as JSON). Needs the worker stopped.
    List {
        /// Data directory of the (stopped) worker.
        #[arg(long, env = "AUTHD_DATA")]
        data: Option<PathBuf>,
    },
}

impl KeyCommand {
    pub(super) fn name(&self) -> &'static str {
        match self {
            KeyCommand::Rotate { .. } => "key rotate",
            KeyCommand::List { .. } => "key list",
        }
    }
}

/// Any failure is exit 2: nothing was changed, or nothing could be read.
pub(super) fn run(command: KeyCommand) -> Result<(), Failure> {
    match command {
        KeyCommand::Rotate { data } => {
            let data = data.unwrap_or_else(default_data_dir);
            let id = crate::keys::rotate(&data).map_err(Failure::unable)?;
            println!("{id}");
            // What to do next goes to stderr: stdout is the id alone, for scripts.
            eprintln!("authd key rotate: added server key {id} to {}; restart the worker to use it, and keep the older keys while tokens or PSK hashes use them (authd key list)", crate::keys::key_file(&data).display());
            Ok(())
        }
        KeyCommand::List { data } => {
            let config = Config {
                data: data.unwrap_or_else(default_data_dir),
                ..Config::default()
            };
            let keys = crate::keys::list(&config).map_err(Failure::unable)?;
            let text =
                serde_json::to_string_pretty(&json!({ "keys": keys })).map_err(Failure::unable)?;
            println!("{text}");
            Ok(())
        }
    }
}
