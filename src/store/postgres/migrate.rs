//! The schema: the SQL files of `migrations/`, applied in order at open, each in its own
//! transaction, under an advisory lock (workers starting together apply each once), and
//! recorded in `authd_migrations`. A database with a version this build does not know is
//! refused: an older worker must not write to a newer schema.

use tokio_postgres::Client;

use crate::crypto::ServerKeys;
use crate::store::records::StoreError;

/// `(version, name, sql)`, in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "events_and_lifetimes",
        include_str!("../../../migrations/0002_events_and_lifetimes.sql"),
    ),
];

/// The newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Advisory lock key held while migrating ("authd" in ASCII).
const MIGRATION_LOCK: i64 = 0x0061_7574_6864;

fn db(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(Box::new(e))
}

/// Brings the schema to [`SCHEMA_VERSION`], or refuses a newer one.
pub async fn run(client: &mut Client) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    let result = apply(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db);
    result.and(unlocked.map(|_| ()))
}

async fn apply(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS authd_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(db)?;
    let current: i32 = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM authd_migrations",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            found: current.to_string(),
            known: SCHEMA_VERSION as u64,
        });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > current) {
        let tx = client.transaction().await.map_err(db)?;
        tx.batch_execute(sql).await.map_err(db)?;
        tx.execute(
            "INSERT INTO authd_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        tracing::info!(schema_version = version, name, "database schema migrated");
    }
    Ok(())
}

/// The check value recorded for a server key: a keyed hash of a fixed text under an
/// entity id no entity can have (ids are never empty), so it is no entity's PSK hash.
fn check_value(keys: &ServerKeys, key_id: crate::crypto::KeyId) -> Option<[u8; 32]> {
    keys.psk_hash(key_id, "", "authd server key check")
}

/// Records this worker's server key ids with their check values, and refuses a key file
/// that holds a different key under an id the database already knows.
pub async fn check_keys(client: &Client, keys: &ServerKeys) -> Result<(), StoreError> {
    for key_id in keys.ids() {
        let Some(check) = check_value(keys, key_id) else {
            continue;
        };
        let id = i64::from(key_id);
        client
            .execute(
                "INSERT INTO server_keys (key_id, check_value) VALUES ($1, $2) \
                 ON CONFLICT (key_id) DO NOTHING",
                &[&id, &&check[..]],
            )
            .await
            .map_err(db)?;
        let recorded: Vec<u8> = client
            .query_one(
                "SELECT check_value FROM server_keys WHERE key_id = $1",
                &[&id],
            )
            .await
            .map_err(db)?
            .get(0);
        if !crate::crypto::ct_eq(&recorded, &check) {
            return Err(StoreError::KeyMismatch { key_id });
        }
    }
    Ok(())
}
