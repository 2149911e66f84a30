//! The state of authd, behind operations in the product's words.
//!
//! [`Store`] is what the methods see: reads ("the entity `id`", "the live token with this
//! id", "AuthorizeCommand's decision"), and [`Store::apply`], which makes one [`Change`] in
//! one transaction together with the record of the reply to the request that asked for it,
//! so that a redelivered request is answered identically and changes nothing. No type of a
//! storage engine crosses this boundary.
//!
//! Backends: [`embedded`] (sled in the data directory, the default, one worker) and
//! [`postgres`] (one PostgreSQL database that several workers share). A backend
//! promises, for every change: the change and its replay record commit together; a request
//! already recorded changes nothing and gets its recorded reply ([`Applied::Before`]); the
//! call returns once the change is durable; rule ids are never reused.
//!
//! Moving a deployment between stores goes through [`Record`]s: [`Store::export`] hands
//! over every record of one store, [`Store::restore`] writes them into another.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::crypto::{KeyId, TokenId};
use crate::rules::{Decision, Rule};

pub mod embedded;
pub mod postgres;
mod records;

pub use records::{
    Applied, Binding, Change, Changed, EntityKind, EntityPage, EntityRecord, ExportError, KeyUsage,
    LiveToken, PskHash, PutOutcome, Record, Recorded, ReplayPolicy, Reply, RequestKey, SignInState,
    StoreError, TokenPage, TokenRecord,
};

/// The authd database. Cheap to clone.
#[derive(Clone)]
pub enum Store {
    Embedded(embedded::EmbeddedStore),
    Postgres(postgres::PostgresStore),
}

impl Store {
    /// Opens (or creates) the embedded database in `dir`; see [`embedded::EmbeddedStore::open`].
    pub fn open_embedded(
        dir: &Path,
        cache_bytes: u64,
        flush_on_commit: bool,
        replays: ReplayPolicy,
    ) -> Result<Store, StoreError> {
        embedded::EmbeddedStore::open(dir, cache_bytes, flush_on_commit, replays)
            .map(Store::Embedded)
    }

    /// A throw-away embedded database (fuzzing, unit tests).
    pub fn temporary() -> Result<Store, StoreError> {
        embedded::EmbeddedStore::temporary().map(Store::Embedded)
    }

    /// The entity `id`. An unknown id costs what a known one does.
    pub async fn entity(&self, id: &str) -> Result<Option<EntityRecord>, StoreError> {
        match self {
            Store::Embedded(s) => s.entity(id),
            Store::Postgres(s) => s.entity(id).await,
        }
    }

    /// The entity `id` for a sign-in, with what a guard shared by several workers knows of
    /// it: one read.
    pub async fn sign_in(
        &self,
        id: &str,
        now_ms: u64,
    ) -> Result<(Option<EntityRecord>, SignInState), StoreError> {
        match self {
            Store::Embedded(s) => Ok((s.entity(id)?, SignInState::default())),
            Store::Postgres(s) => s.sign_in(id, now_ms).await,
        }
    }

    /// Counts a sign-in's outcome in the guard shared by several workers, if the store has
    /// one: the lock a failure starts, if any. (The embedded store has none: the worker's
    /// own guard is the whole guard.)
    pub async fn count_sign_in(
        &self,
        id: &str,
        ok: bool,
        seen: SignInState,
        now_ms: u64,
    ) -> Result<Option<Duration>, StoreError> {
        match self {
            Store::Embedded(_) => Ok(None),
            Store::Postgres(s) => s.count_sign_in(id, ok, seen, now_ms).await,
        }
    }

    /// Whether the store answered its last call (a shared database may be down; the
    /// embedded store always is there).
    pub fn available(&self) -> bool {
        match self {
            Store::Embedded(_) => true,
            Store::Postgres(s) => s.available(),
        }
    }

    /// Database round trips so far (a shared database; 0 for the embedded store).
    pub fn round_trips(&self) -> u64 {
        match self {
            Store::Embedded(_) => 0,
            Store::Postgres(s) => s.round_trips(),
        }
    }

    /// Up to `limit` entities in id order whose id starts with `prefix` and sorts after
    /// `after`, optionally only those of `owner`.
    pub async fn list_entities(
        &self,
        owner: Option<&str>,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<EntityPage, StoreError> {
        match self {
            Store::Embedded(s) => s.list_entities(owner, prefix, after, limit),
            Store::Postgres(s) => s.list_entities(owner, prefix, after, limit).await,
        }
    }

    /// Replaces the PSK hash of entity `id` with `psk` if its record is still exactly `seen`;
    /// whether it did. Records no reply: `Authenticate` moves a PSK to the newest server key
    /// with it, and losing that write loses nothing (the old hash still verifies).
    pub async fn replace_psk_hash(
        &self,
        id: &str,
        seen: &EntityRecord,
        psk: PskHash,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.replace_psk_hash(id, seen, psk),
            Store::Postgres(s) => s.replace_psk_hash(id, seen, psk).await,
        }
    }

    /// How many PSK hashes and live app tokens were made with each server key: what still
    /// needs a key before it can be removed from the key file. A full scan (operators only).
    pub async fn key_usage(&self) -> Result<BTreeMap<KeyId, KeyUsage>, StoreError> {
        match self {
            Store::Embedded(s) => s.key_usage(),
            Store::Postgres(s) => s.key_usage().await,
        }
    }

    /// The live token record of (user, host).
    pub async fn token(&self, user: &str, host: &str) -> Result<Option<TokenRecord>, StoreError> {
        match self {
            Store::Embedded(s) => s.token(user, host),
            Store::Postgres(s) => s.token(user, host).await,
        }
    }

    /// Up to `limit` live tokens of a user whose host sorts after `after`, in host order.
    pub async fn tokens_of(
        &self,
        user: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<TokenPage, StoreError> {
        match self {
            Store::Embedded(s) => s.tokens_of(user, after, limit),
            Store::Postgres(s) => s.tokens_of(user, after, limit).await,
        }
    }

    /// The live token with this id: whose it is and for which host.
    pub async fn live_token(&self, token_id: &TokenId) -> Result<Option<LiveToken>, StoreError> {
        match self {
            Store::Embedded(s) => s.live_token(token_id),
            Store::Postgres(s) => s.live_token(token_id).await,
        }
    }

    /// Rules with an id above `after`, in id order, at most `limit`.
    pub async fn rules(&self, after: u64, limit: usize) -> Result<Vec<(u64, Rule)>, StoreError> {
        match self {
            Store::Embedded(s) => s.rules(after, limit),
            Store::Postgres(s) => s.rules(after, limit).await,
        }
    }

    /// AuthorizeCommand's decision for (src, dst, cmd), with what it needs of the entities
    /// `src` and `dst` read in the same call: see [`crate::rules::RuleIndex::decide`].
    pub async fn authorize(&self, src: &str, dst: &str, cmd: &str) -> Result<Decision, StoreError> {
        match self {
            Store::Embedded(s) => s.authorize(src, dst, cmd),
            Store::Postgres(s) => s.authorize(src, dst, cmd).await,
        }
    }

    /// Makes `change` for `request`, in one transaction with the record of its reply. If a
    /// reply is already recorded for `request` (within the replay window), changes nothing
    /// and returns that reply; if another request used its `src` and `id`, changes nothing
    /// ([`Applied::IdReused`]).
    pub async fn apply(
        &self,
        request: &RequestKey<'_>,
        change: Change,
    ) -> Result<Applied, StoreError> {
        match self {
            Store::Embedded(s) => s.apply(request, change).await,
            Store::Postgres(s) => s.apply(request, change).await,
        }
    }

    /// What is recorded for `request`'s `src` and `id` within the replay window, judged
    /// against its binding. Nothing for a request that records nothing (import).
    pub async fn recorded(&self, request: &RequestKey<'_>) -> Result<Recorded, StoreError> {
        match self {
            Store::Embedded(s) => s.recorded(request),
            Store::Postgres(s) => s.recorded(request).await,
        }
    }

    /// Deletes replay records older than the window, then the oldest beyond the policy's
    /// count. Returns how many went.
    pub async fn prune_replays(&self, now_ms: u64) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.prune_replays(now_ms))
                    .await
                    .map_err(|_| StoreError::Writer)?
            }
            Store::Postgres(s) => s.prune_replays(now_ms).await,
        }
    }

    /// Resolves when there are more replay records than the policy keeps (the pruner should
    /// run now rather than at its next tick).
    async fn too_many_replays(&self) {
        match self {
            Store::Embedded(s) => s.too_many_replays().await,
            // Pruned on the clock only: the count is the database's, and every worker prunes.
            Store::Postgres(_) => std::future::pending().await,
        }
    }

    /// Returns once every change visible now is durable: a reply that depends on a record
    /// seen by a read (a redelivery) waits on it.
    pub async fn durable(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.durable().await,
            // A committed change is durable (synchronous_commit), and nothing is visible
            // before its commit.
            Store::Postgres(_) => Ok(()),
        }
    }

    /// Whether each change is durable when [`Store::apply`] returns (false only for a store
    /// opened for bulk import).
    pub fn durable_on_commit(&self) -> bool {
        match self {
            Store::Embedded(s) => s.flushes_on_commit(),
            Store::Postgres(_) => true,
        }
    }

    /// Hands every record of the store to `sink`, one at a time, in a stable order: entities
    /// by id, then live tokens, then rules by id, then [`Record::NextRuleId`]. Memory stays
    /// constant however large the store. Returns how many records it handed over. Replay
    /// records are not records (see [`Record`]). Meant for a store no worker writes to (a
    /// stopped one): a change made meanwhile may or may not be in it.
    pub async fn export(
        &self,
        sink: &mut (dyn FnMut(Record) -> std::io::Result<()> + Send),
    ) -> Result<u64, ExportError> {
        match self {
            Store::Embedded(s) => s.export(sink),
            Store::Postgres(s) => s.export(sink).await,
        }
    }

    /// Writes `records` (one batch, in one transaction) as they are: an entity replaces
    /// the one with its id (its `created` included, and without removing the user's tokens,
    /// as a re-provisioning put would), a token becomes the live token of its (user, host),
    /// a rule is stored under its id, and the next rule id becomes the largest of the
    /// store's, a [`Record::NextRuleId`]'s and one above every rule id restored. Idempotent:
    /// restoring the same records again changes nothing. Every index stays true (an owner's
    /// entities, token ids, per-user token counts, the rule index). Records no reply.
    pub async fn restore(&self, records: Vec<Record>) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.restore(records).await,
            Store::Postgres(s) => s.restore(records).await,
        }
    }

    /// Writes everything to stable storage (at the end of an import, at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => {
                let s = s.clone();
                tokio::task::spawn_blocking(move || s.flush())
                    .await
                    .map_err(|_| StoreError::Flush)?
            }
            Store::Postgres(_) => Ok(()),
        }
    }
}

/// Prunes replay records every `every`, and as soon as there are more than the policy keeps,
/// until the task is dropped.
pub async fn prune_replays_every(store: Store, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = store.too_many_replays() => {}
        }
        match store.prune_replays(crate::unix_ms()).await {
            Ok(n) if n > 0 => tracing::debug!(pruned = n, "replay records pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning replay records failed"),
        }
    }
}

#[cfg(test)]
mod tests;
