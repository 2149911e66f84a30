//! `authd export`: every record of a stopped worker's store as JSON lines, the dump that
//! `authd import` reads to move a deployment into another store (e.g. PostgreSQL).
//!
//! A dump is one JSON object a line:
//!
//! 1. a header, `{"authd_export":1,"authd":"0.1.0","key_ids":[1,2]}`: the format version,
//!    the authd that wrote it, and the ids of the server keys that the dump's PSK hashes and
//!    tokens were made with (the target's key file must hold each of them);
//! 2. the records ([`Record`](crate::store::Record): entities, live tokens, rules under
//!    their ids, the next rule id), in the store's stable order;
//! 3. an end line, `{"authd_export_end":{"records":N}}`, so that a dump cut short (a full
//!    disk, a broken pipe) is told apart from a whole one.
//!
//! No secret is in it: a PSK hash is keyed with a server key and a token id yields a token
//! only with one, and the server key stays in the data directory; it is not exported. The
//! target needs a copy of the old `server.key`.

use std::io::{self, BufWriter, Write};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::crypto::KeyId;
use crate::store::{Store, StoreError};

/// The version of the dump format this build writes and reads.
pub const FORMAT: u32 = 1;

/// The first line of a dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The dump format's version ([`FORMAT`]).
    pub authd_export: u32,
    /// The version of the authd that wrote it (for people; not read).
    #[serde(default)]
    pub authd: Option<String>,
    /// The server keys the records were made with.
    pub key_ids: Vec<KeyId>,
}

/// The last line of a dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct End {
    pub authd_export_end: EndCount,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndCount {
    /// Record lines between the header and this line.
    pub records: u64,
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    pub records: u64,
    /// The server keys the target needs (the header's `key_ids`).
    pub key_ids: Vec<KeyId>,
}

/// Opens the store to export: the PostgreSQL one at `config.store`, or the embedded one in
/// `config.data`, refused while a worker holds it (sled's lock) and when there is no
/// database there (rather than making an empty one).
pub async fn open_stopped(config: &Config) -> anyhow::Result<Store> {
    if let Some(url) = &config.store {
        // A database server: no lock keeps workers out, so stop them (or their writes)
        // for a dump that is one moment's state.
        let keys =
            crate::crypto::ServerKeys::load(&crate::crypto::ServerKeys::file_in(&config.data))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        return crate::server::open_postgres(config, url, &keys).await;
    }
    // sled may write files at open: owner-only, as in the worker.
    crate::data_dir::restrict_umask();
    let data = config.data.display();
    let db = config.data.join("db");
    if !db.try_exists()? {
        anyhow::bail!(
            "no database in {data} (no {}): is --data the old worker's data directory?",
            db.display()
        );
    }
    Store::open_embedded(
        &db,
        config.cache_mib * 1024 * 1024,
        false,
        config.replay_policy(),
        config.events,
    )
    .map_err(|e| match e {
        StoreError::InUse => anyhow::anyhow!(
            "the database in {data} is in use: stop the worker first (an export reads a stopped worker's store, so that nothing changes while it runs)"
        ),
        e => anyhow::anyhow!("opening the database in {data}: {e}"),
    })
}

/// Writes the dump of `store` to `out`: the header, every record, the end line.
pub async fn export(store: &Store, out: impl Write + Send) -> anyhow::Result<Exported> {
    // A full scan before the records: the header comes first, so that an import can refuse
    // a target that lacks a key before it writes anything.
    let key_ids: Vec<KeyId> = store.key_usage().await?.into_keys().collect();
    let mut out = BufWriter::new(out);
    let header = Header {
        authd_export: FORMAT,
        authd: Some(env!("CARGO_PKG_VERSION").to_owned()),
        key_ids: key_ids.clone(),
    };
    write_line(&mut out, &header)?;
    let records = store
        .export(&mut |record| write_line(&mut out, &record))
        .await?;
    let end = End {
        authd_export_end: EndCount { records },
    };
    write_line(&mut out, &end)?;
    out.flush()?;
    Ok(Exported { records, key_ids })
}

fn write_line(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Change, RequestKey, TokenRecord};

    #[tokio::test]
    async fn a_dump_is_a_header_the_records_and_an_end_line() {
        let store = Store::temporary().unwrap();
        let request = RequestKey {
            src: "u",
            id: 1,
            at_ms: 1,
            binding: None,
        };
        let change = Change::ReplaceToken {
            user: "u".into(),
            host: "h".into(),
            record: TokenRecord {
                token_id: [1; 16],
                key_id: 3,
                created: 1,
                expires: None,
            },
            max_per_user: 10,
        };
        store.apply(&request, change).await.unwrap();
        let mut out = Vec::new();
        let exported = export(&store, &mut out).await.unwrap();
        assert_eq!(
            exported,
            Exported {
                records: 2,
                key_ids: vec![3]
            }
        );
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let header: Header = serde_json::from_str(lines[0]).unwrap();
        assert_eq!((header.authd_export, header.key_ids), (FORMAT, vec![3]));
        assert!(
            lines[1].starts_with(r#"{"record":"token","user":"u""#),
            "{text}"
        );
        assert_eq!(lines[2], r#"{"record":"next_rule_id","next_rule_id":1}"#);
        assert_eq!(lines[3], r#"{"authd_export_end":{"records":2}}"#);
    }
}
