//! `authd key rotate|list`: the operator's side of server key rotation
//! (docs/protocol.md#server-keys-and-rotation, SECURITY.md).
//!
//! Server keys live in `<data>/server.key`, one `<id> <base64>` line per key. `rotate` adds a
//! key with the next id; the worker signs and hashes with the newest key it loaded at start,
//! and verifies with every key in the file, so a rotation is: rotate, restart the worker.
//! Nothing stops working: tokens and PSK hashes made with an older key verify as before, and
//! a PSK moves to the newest key at its next successful sign-in. `list` shows, for each key,
//! how many PSK hashes and live tokens still use it; a key may be removed from the file only
//! when nothing does (or what does may break).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Subcommand;
use serde::Serialize;
use serde_json::json;

use super::Failure;
use crate::config::{default_data_dir, Config};
use crate::crypto::{rotate_key_file, KeyId, ServerKeys};
use crate::store::{KeyUsage, Store};

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
        /// The PostgreSQL store the workers use (as `authd serve --store`); the workers may
        /// keep running.
        #[arg(long, env = "AUTHD_STORE", hide_env_values = true, value_name = "URL")]
        store: Option<crate::secret::Secret>,
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
pub(super) async fn run(command: KeyCommand) -> Result<(), Failure> {
    match command {
        KeyCommand::Rotate { data } => {
            // Safe while the worker runs (the file is replaced atomically and the worker reads
            // it only at start), but the worker uses the new key only after a restart.
            let file = ServerKeys::file_in(&data.unwrap_or_else(default_data_dir));
            let id = rotate_key_file(&file).map_err(Failure::unable)?;
            println!("{id}");
            // What to do next goes to stderr: stdout is the id alone, for scripts.
            eprintln!("authd key rotate: added server key {id} to {}; restart the worker to use it, and keep the older keys while tokens or PSK hashes use them (authd key list)", file.display());
            Ok(())
        }
        KeyCommand::List { data, store } => {
            let config = Config {
                data: data.unwrap_or_else(default_data_dir),
                store,
                ..Config::default()
            };
            let keys = list(&config).await.map_err(Failure::unable)?;
            let text =
                serde_json::to_string_pretty(&json!({ "keys": keys })).map_err(Failure::unable)?;
            println!("{text}");
            Ok(())
        }
    }
}

/// One server key id as `authd key list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct KeyStatus {
    id: KeyId,
    /// In the key file (a key id only the database names is one whose key was removed).
    in_key_file: bool,
    /// The key new tokens and PSK hashes use.
    newest: bool,
    #[serde(flatten)]
    usage: KeyUsage,
}

/// Every key id of the key file or the database, with what uses it. Opens the database, so
/// the worker must be stopped.
async fn list(config: &Config) -> anyhow::Result<Vec<KeyStatus>> {
    // Restricted umask: sled makes a database here if there is none.
    crate::data_dir::restrict_umask();
    // The message already names the cause: not a chain that repeats it.
    let keys =
        ServerKeys::load(&ServerKeys::file_in(&config.data)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = match &config.store {
        Some(url) => crate::server::open_postgres(config, url, &keys).await?,
        None => Store::open_embedded(
            &config.data.join("db"),
            config.cache_mib * 1024 * 1024,
            true,
            config.replay_policy(),
            config.events,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "opening the database in {}: {e} (stop the worker first)",
                config.data.display()
            )
        })?,
    };
    let mut usage: BTreeMap<KeyId, KeyUsage> = store.key_usage().await?;
    for id in keys.ids() {
        usage.entry(id).or_default();
    }
    let in_file: Vec<KeyId> = keys.ids().collect();
    Ok(usage
        .into_iter()
        .map(|(id, usage)| KeyStatus {
            id,
            in_key_file: in_file.contains(&id),
            newest: id == keys.newest(),
            usage,
        })
        .collect())
}
