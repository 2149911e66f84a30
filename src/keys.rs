//! `authd key rotate|list`: the operator's side of server key rotation (docs/protocol.md#server-keys-and-rotation).
//!
//! Server keys live in `<data>/server.key`, one `<id> <base64>` line per key. `rotate` adds a
//! key with the next id; the worker signs and hashes with the newest key it loaded at start,
//! and verifies with every key in the file, so a rotation is: rotate, restart the worker.
//! Nothing stops working: tokens and PSK hashes made with an older key verify as before, and
//! a PSK moves to the newest key at its next successful sign-in. `list` shows, for each key,
//! how many PSK hashes and live tokens still use it; a key may be removed from the file only
//! when nothing does (or what does may break). See SECURITY.md.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::crypto::{rotate_key_file, KeyFileError, KeyId, ServerKeys};
use crate::store::{KeyUsage, Store};

/// The server key file of a data directory.
pub fn key_file(data: &Path) -> PathBuf {
    data.join("server.key")
}

/// Adds a fresh key to the data directory's key file; returns its id. Safe while the worker
/// runs (the file is replaced atomically and the worker reads it only at start), but the
/// worker uses the new key only after a restart.
pub fn rotate(data: &Path) -> Result<KeyId, KeyFileError> {
    rotate_key_file(&key_file(data))
}

/// One server key id as `authd key list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyStatus {
    pub id: KeyId,
    /// In the key file (a key id only the database names is one whose key was removed).
    pub in_key_file: bool,
    /// The key new tokens and PSK hashes use.
    pub newest: bool,
    #[serde(flatten)]
    pub usage: KeyUsage,
}

/// Every key id of the key file or the database, with what uses it. Opens the database, so
/// the worker must be stopped.
pub async fn list(config: &Config) -> anyhow::Result<Vec<KeyStatus>> {
    let keys = ServerKeys::load(&key_file(&config.data))?;
    let store = Store::open_embedded(
        &config.data.join("db"),
        config.cache_mib * 1024 * 1024,
        true,
        config.replay_policy(),
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "opening the database in {}: {e} (stop the worker first)",
            config.data.display()
        )
    })?;
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
